//! `palisade cost` on a running local mesh, as a user runs it: two callers send `api` requests
//! in a 9:1 ratio, and the command reports each caller's requests (counted once, though both
//! proxies of a call see it), bytes, and CPU-seconds in about the same 9:1 ratio.

mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use support::*;

/// Rounds of `WEB_PER_ROUND` requests from web, then a ninth of that from batch (see the test).
const ROUNDS: u64 = 3;
const WEB_PER_ROUND: u64 = 1800;

const WEB: &str = "spiffe://cluster.local/ns/demo/sa/web";
const BATCH: &str = "spiffe://cluster.local/ns/demo/sa/batch";
const API: &str = "spiffe://cluster.local/ns/demo/sa/api";

/// A workload with no app of its own that only calls `api` (the test is its app).
fn caller(name: &'static str, labels: &'static str) -> WorkloadSpec {
    WorkloadSpec {
        name,
        labels,
        app: false,
        upstreams: vec![("api.demo", 8080)],
        extra_command: vec![],
        external_app: false,
    }
}

fn cost(state: &Path, args: &[&str]) -> Output {
    Command::new(palisade())
        .arg("cost")
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .env_remove("PALISADE_STATE_DIR")
        .output()
        .expect("run palisade cost")
}

fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "palisade cost failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

/// The row of `key` (by identity or route), if there is one.
fn row<'a>(report: &'a serde_json::Value, field: &str, key: &str) -> Option<&'a serde_json::Value> {
    report["rows"]
        .as_array()?
        .iter()
        .find(|r| r[field].as_str() == Some(key))
}

fn figures(report: &serde_json::Value, who: &str) -> (u64, u64, f64) {
    row(report, "identity", who).map_or((0, 0, 0.0), |r| {
        (
            r["requests"].as_u64().unwrap_or(0),
            r["bytes"].as_u64().unwrap_or(0),
            r["cpuSeconds"].as_f64().unwrap_or(0.0),
        )
    })
}

#[test]
fn two_callers_with_a_9_to_1_request_ratio_cost_about_9_to_1() {
    let mesh = MeshSpec {
        lifetime: "1h",
        default_policy: "allow",
        workloads: vec![
            caller("web", "app: web"),
            caller("batch", "app: batch"),
            WorkloadSpec::demo("api", "app: api", vec![]),
        ],
        services: vec![("api", 8080, "app: api", "http")],
    }
    .start(&[]);
    let web = mesh.upstream("web", "api.demo");
    let batch = mesh.upstream("batch", "api.demo");
    // A proxy apportions the CPU of an interval to the requests that finished in it: the work
    // of starting (certificate, config) must be in an interval of its own, without requests,
    // or the caller with fewer requests would carry a larger share of it. A scrape ends an
    // interval; one without requests shows as unattributed CPU.
    for w in ["web", "batch", "api"] {
        assert!(
            eventually(Duration::from_secs(10), || {
                mesh.metric_sum(w, "palisade_cost_unattributed_cpu_seconds_total", &[]) > 0.0
            }),
            "{w}'s proxy reports no idle interval: {}",
            mesh.metrics(w)
        );
    }
    // Rounds of 1800 requests from web, then 200 from batch: each caller's own proxy serves
    // its requests back to back, as the other's does. Both proxies have fixed costs besides
    // (the first mTLS handshake, waking from idle at each round, background work in the
    // intervals they serve in) that weigh more on the smaller caller; rounds of this size keep
    // them small next to batch's own work (with 100 a round, 8.2-9.6 was measured). And
    // one batch request after every nine of web's would make batch's proxy wake from idle for
    // each of its requests (measured 6.2-6.5): a real cost of a sparse caller, not the 9:1 this
    // checks. Three rounds rather than one spread both callers over the same stretch of time,
    // so that whatever else runs on the machine weighs on both alike.
    for round in 0..ROUNDS {
        for (via, who, n) in [
            (web, "web", WEB_PER_ROUND),
            (batch, "batch", WEB_PER_ROUND / 9),
        ] {
            for i in 0..n {
                let (status, body) = http_get(via, "/").expect("api through the mesh");
                assert_eq!(status, 200, "round {round}, request {i} from {who}: {body}");
                assert!(body.contains("hello from api"), "{body}");
            }
        }
    }
    let (want_web, want_batch) = (WEB_PER_ROUND * ROUNDS, WEB_PER_ROUND / 9 * ROUNDS);

    // Each proxy counts a request when its response has ended and apportions its CPU once a
    // second and at each scrape: the report is complete once the counts are and the CPU-seconds
    // stopped moving between two reports.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last: Option<serde_json::Value> = None;
    let report = loop {
        let report = json(&cost(&mesh.state, &["-o", "json"]));
        let (wr, _, wc) = figures(&report, WEB);
        let (br, _, bc) = figures(&report, BATCH);
        let settled = last.as_ref().is_some_and(|l| {
            figures(l, WEB) == figures(&report, WEB) && figures(l, BATCH) == figures(&report, BATCH)
        });
        if (wr, br) == (want_web, want_batch) && wc > 0.0 && bc > 0.0 && settled {
            break report;
        }
        if Instant::now() > deadline {
            panic!(
                "the report did not settle on {want_web} and {want_batch} requests within 30 s: {report:#}"
            );
        }
        last = Some(report);
        std::thread::sleep(Duration::from_millis(300));
    };
    let (web_requests, web_bytes, web_cpu) = figures(&report, WEB);
    let (batch_requests, batch_bytes, batch_cpu) = figures(&report, BATCH);
    assert_eq!(
        (web_requests, batch_requests),
        (want_web, want_batch),
        "{report:#}"
    );
    assert!(web_bytes > 0 && batch_bytes > 0, "{report:#}");
    let ratio = web_cpu / batch_cpu;
    println!("CPU-seconds web/batch: {ratio:.2}\n{}", breakdown(&mesh));
    // Within 20%: on the 2-core machine runs of this test measured 7.2 (with other work
    // running beside it) to 10.5 (a quiet CI run). Each caller's own proxy is most of its
    // figure, and the two proxies' CPU clocks (10 ms ticks, read once a second) differ by
    // more than the 9:1 of their requests with the scheduling of the moment: the test checks
    // that CPU follows the work, not the machine's noise.
    assert!(
        (7.2..=10.8).contains(&ratio),
        "CPU-seconds web/batch = {ratio:.2}, not within 20% of 9: {report:#}\nper proxy:\n{}",
        breakdown(&mesh)
    );
    assert_eq!(report["currency"], "USD");
    assert!(
        report["window"].as_f64().is_some_and(|w| w > 0.0),
        "{report:#}"
    );
    for r in report["rows"].as_array().expect("rows") {
        assert!(r["cost"].as_f64().is_some_and(|c| c > 0.0), "{r}");
        assert!(r["costPer1000Requests"].as_f64().is_some(), "{r}");
    }
    // Costlier rows first.
    assert_eq!(report["rows"][0]["identity"], WEB, "{report:#}");

    // The table names both callers, and their workloads.
    let out = cost(
        &mesh.state,
        &["--price-vcpu-hour", "1", "--currency", "EUR"],
    );
    let table = String::from_utf8_lossy(&out.stdout);
    println!("{table}");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let total = format!("total: {} requests", want_web + want_batch);
    for needle in [WEB, BATCH, " web ", " batch ", "COST (EUR)", &total] {
        assert!(table.contains(needle), "no {needle:?} in:\n{table}");
    }

    // By route: no route applies, so the traffic is keyed by its destination, once.
    let by_route = json(&cost(&mesh.state, &["--by", "route", "-o", "json"]));
    let api = row(&by_route, "route", API).unwrap_or_else(|| panic!("{by_route:#}"));
    assert_eq!(api["requests"], want_web + want_batch, "{by_route:#}");

    // Over a window with no traffic: nothing to charge.
    let quiet = json(&cost(&mesh.state, &["--window", "1s", "-o", "json"]));
    assert!(
        quiet["window"].as_f64().is_some_and(|w| w >= 1.0),
        "{quiet:#}"
    );
    assert_eq!(quiet["rows"], serde_json::json!([]), "{quiet:#}");

    // A proxy that cannot be scraped is named, and the others still count.
    let other = tempfile::tempdir().expect("tempdir");
    let mut doc = mesh.mesh_json();
    doc["workloads"]
        .as_array_mut()
        .expect("workloads")
        .push(serde_json::json!({
            "name": "gone",
            "spiffeId": "spiffe://cluster.local/ns/demo/sa/gone",
            "adminAddr": format!("127.0.0.1:{}", free_port()),
        }));
    std::fs::write(other.path().join("mesh.json"), doc.to_string()).expect("write mesh.json");
    let out = cost(other.path(), &["-o", "json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("gone's proxy"), "{stderr}");
    assert_eq!(figures(&json(&out), WEB).0, want_web);
}

/// Each proxy's CPU-seconds per caller, for a failure message.
fn breakdown(mesh: &Mesh) -> String {
    let mut out = String::new();
    for w in ["web", "batch", "api"] {
        for caller in [WEB, BATCH] {
            let needle = format!("src_identity=\"{caller}\"");
            let cpu = mesh.metric_sum(w, "palisade_cost_cpu_seconds_total", &[&needle]);
            if cpu > 0.0 {
                out.push_str(&format!("  {w}'s proxy, for {caller}: {cpu:.4} s\n"));
            }
        }
    }
    out
}

#[test]
fn without_a_running_mesh_it_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = cost(dir.path(), &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("palisade up"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one sentence: {stderr}");
    assert!(out.stdout.is_empty());
}
