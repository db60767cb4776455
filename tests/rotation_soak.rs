//! Certificate rotation under steady load, through the binary: every proxy of a `palisade up`
//! mesh renews its certificate again and again (at half its lifetime) while four loops send
//! requests through web's sidecar to api's two endpoints, each on a new app connection.
//! Every renewal swaps the certificate new handshakes use, and every pooled connection between
//! the proxies is closed (gracefully) when a certificate it was made with runs out; not one
//! request may fail.
//!
//! The run is 10 minutes with a rotation every minute (≥ 100k requests):
//! `PALISADE_SOAK_SECS=600 PALISADE_SOAK_LIFETIME=2m cargo test --test rotation_soak --
//! --nocapture`. CI runs 30 s with 6 s certificates (a rotation every ~3 s) and asks for the
//! same request rate pro rata.

mod support;

use std::time::{Duration, Instant};

use support::*;

#[test]
fn certificates_rotate_under_load_and_no_request_fails() {
    let secs: u64 = std::env::var("PALISADE_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let lifetime: &'static str = std::env::var("PALISADE_SOAK_LIFETIME")
        .ok()
        .map_or("6s", |s| Box::leak(s.into_boxed_str()));
    let lifetime_secs = humantime::parse_duration(lifetime)
        .expect("PALISADE_SOAK_LIFETIME is a duration")
        .as_secs_f64();
    let mesh = MeshSpec {
        lifetime,
        default_policy: "allow",
        workloads: vec![
            WorkloadSpec::demo("web", "app: web", vec![("api.demo", 8080)]),
            WorkloadSpec::demo("api", "app: api", vec![]),
            WorkloadSpec::demo("api2", "app: api", vec![]),
        ],
        services: vec![("api", 8080, "app: api", "http")],
    }
    .start(&[]);
    let renewals =
        |w: &str| mesh.metric_sum(w, "palisade_identity_renewals_total", &["result=\"ok\""]);
    let before: Vec<f64> = ["web", "api", "api2"].iter().map(|w| renewals(w)).collect();
    let limit = Duration::from_secs(secs + 60);
    let loads: Vec<Load> = (0..4)
        .map(|_| Load::start(mesh.upstream("web", "api.demo"), "/", limit))
        .collect();
    let started = Instant::now();
    // The soak's length is the experiment, not a wait for something.
    while started.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_millis(500));
    }
    let rotated: Vec<f64> = ["web", "api", "api2"]
        .iter()
        .zip(&before)
        .map(|(w, b)| renewals(w) - b)
        .collect();
    let (mut ok, mut failed, mut errors) = (0, 0, Vec::new());
    for l in loads {
        let (o, f, e) = l.finish();
        ok += o;
        failed += f;
        errors.extend(e);
    }
    let took = started.elapsed().as_secs_f64();
    println!(
        "{secs} s with {lifetime} certificates: renewals web/api/api2 {rotated:?}; {ok} \
         requests succeeded ({:.0}/s), {failed} failed",
        ok as f64 / took
    );
    assert_eq!(failed, 0, "requests failed during rotations: {errors:?}");
    // Renewal at half the lifetime (±10% jitter): every proxy rotated most of the times it
    // could, and the connections made with each certificate were recycled.
    let expected = secs as f64 / (lifetime_secs / 2.0);
    for (w, n) in ["web", "api", "api2"].iter().zip(&rotated) {
        assert!(
            *n >= (expected * 0.6).floor().max(1.0),
            "{w} renewed {n} times in {secs} s of {lifetime} certificates"
        );
    }
    // The rate: 100k requests in 10 minutes, pro rata.
    let wanted = 100_000 * secs / 600;
    assert!(ok >= wanted, "{ok} requests, fewer than {wanted}");
}
