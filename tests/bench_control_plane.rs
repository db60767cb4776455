//! `palisade bench control-plane` end to end, small and short: a real control plane, a few
//! simulated proxies over gRPC + mTLS, a few endpoint changes. The figures depend on the
//! machine; this checks that the report is there, consistent, and that every proxy synced and
//! heard the changes that concern it.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs the bench on 24 proxies and 4 services with `extra` arguments; its stdout and JSON.
fn bench(extra: &[&str]) -> (String, serde_json::Value, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("cp.json");
    let mut child = Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args([
            "bench",
            "control-plane",
            "--proxies",
            "24",
            "--services",
            "4",
        ])
        .args(["--churn", "5", "--duration", "1s", "--out"])
        .arg(&out)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(extra)
        .env("PALISADE_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start palisade bench control-plane");
    let deadline = Instant::now() + Duration::from_secs(180);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("palisade bench control-plane ran past 3 minutes");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().expect("output");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("24/24 proxies hold their first config"),
        "{stdout}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).expect("--out")).expect("JSON");
    (stdout, v, dir)
}

#[test]
fn the_control_plane_bench_reports_every_figure_of_the_spec() {
    let (_stdout, v, dir) = bench(&[]);
    assert_eq!(v["proxies"], 24);
    assert_eq!(v["services"], 4);
    assert_eq!(v["proxiesSynced"], 24);
    for key in [
        "initialSyncSeconds",
        "bytesPerChange",
        "controlPlanePeakRssBytes",
        "cpuSecondsPerChange",
    ] {
        assert!(v[key].as_f64().is_some_and(|x| x > 0.0), "{key}: {v}");
    }
    let p = &v["pushLatencyMs"];
    let (p50, p99, max) = (
        p["p50"].as_f64().expect("p50"),
        p["p99"].as_f64().expect("p99"),
        p["max"].as_f64().expect("max"),
    );
    assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{p}");
    // Five changes written, each pushed (alone or with the next) to the proxies it concerns.
    assert_eq!(v["changesWritten"], 5);
    let pushed = v["generationsPushed"].as_u64().expect("generations");
    assert!((1..=5).contains(&pushed), "{v}");
    assert!(dir.path().join("state/control-plane.log").exists());
}

/// Transparent proxies get every service: a full snapshot per change carries all of them, a
/// delta only the two services a moved endpoint left and joined.
#[test]
fn deltas_push_less_than_full_snapshots_to_transparent_proxies() {
    let (_, deltas, _d1) = bench(&["--transparent"]);
    let (_, full, _d2) = bench(&["--transparent", "--full-snapshots"]);
    let bytes = |v: &serde_json::Value| v["bytesPerChange"].as_f64().expect("bytesPerChange");
    assert!(bytes(&deltas) > 0.0, "{deltas}");
    assert!(
        bytes(&deltas) < bytes(&full),
        "deltas {deltas}\nfull snapshots {full}"
    );
    for v in [&deltas, &full] {
        assert_eq!(v["proxiesSynced"], 24, "{v}");
    }
}

/// Transparent proxies that resolve on demand hold the one service they call, not the mesh: a
/// change reaches only the proxies calling one of the two services it touched.
#[test]
fn proxies_on_demand_are_pushed_less_than_proxies_holding_the_mesh() {
    let (stdout, on_demand, _d1) = bench(&["--on-demand"]);
    let (_, whole, _d2) = bench(&["--transparent"]);
    let bytes = |v: &serde_json::Value| v["bytesPerChange"].as_f64().expect("bytesPerChange");
    assert_eq!(on_demand["proxiesSynced"], 24, "{stdout}");
    assert!(bytes(&on_demand) > 0.0, "{on_demand}");
    assert!(
        bytes(&on_demand) < bytes(&whole),
        "on demand {on_demand}\nwhole mesh {whole}"
    );
}
