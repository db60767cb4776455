//! `palisade bench cold-start` and `palisade bench idle` end to end, small: a sidecar started
//! a few times each way, and a few hundred idle connections. The figures depend on the machine
//! (and these are debug builds); the tests check that every figure is there, measured, and
//! consistent with the others, not how fast or small anything is.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Runs `palisade bench ARGS`, killing it if it is still running after `limit`.
fn bench(args: &[&str], limit: Duration) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_palisade"))
        .arg("bench")
        .args(args)
        .env("PALISADE_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start palisade bench");
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait().expect("wait for palisade bench") {
            Some(_) => break,
            None if Instant::now() > deadline => {
                let _ = child.kill();
                let out = child.wait_with_output().expect("collect output");
                panic!(
                    "palisade bench {args:?} ran past {limit:?}; stderr: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    child.wait_with_output().expect("collect output")
}

fn succeeded(out: Output) -> String {
    assert!(
        out.status.success(),
        "palisade bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).expect("read --out file");
    serde_json::from_str(&text).expect("--out is JSON")
}

fn num(v: &serde_json::Value, what: &str) -> f64 {
    let x = v
        .as_f64()
        .unwrap_or_else(|| panic!("{what} is not a number: {v}"));
    assert!(x.is_finite(), "{what} is not finite: {v}");
    x
}

#[test]
fn cold_start_times_every_start_in_both_modes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("cold-start.json");
    let stdout = succeeded(bench(
        &[
            "cold-start",
            "--runs",
            "3",
            "--out",
            json.to_str().expect("utf-8 path"),
        ],
        Duration::from_secs(90),
    ));
    // `cargo test` builds the binaries side by side: the sidecar binary is what starts.
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("sidecar: ") && l.ends_with("palisade-proxy")),
        "{stdout}"
    );
    for row in ["static ", "control-plane "] {
        assert!(stdout.lines().any(|l| l.starts_with(row)), "{stdout}");
    }

    let report = read_json(&json);
    assert_eq!(report["runs"].as_u64(), Some(3), "{report}");
    for mode in ["static", "control_plane"] {
        let m = &report[mode];
        let samples: Vec<f64> = m["samples_ms"]
            .as_array()
            .unwrap_or_else(|| panic!("no {mode}.samples_ms: {report}"))
            .iter()
            .map(|s| num(s, "a sample"))
            .collect();
        assert_eq!(samples.len(), 3, "3 starts measured: {m}");
        assert!(samples.iter().all(|s| *s > 0.0), "{m}");
        let [min, p50, p90, max] =
            ["min_ms", "p50_ms", "p90_ms", "max_ms"].map(|k| num(&m[k], &format!("{mode}.{k}")));
        assert!(min > 0.0, "{m}");
        assert!(min <= p50 && p50 <= p90 && p90 <= max, "out of order: {m}");
        // The summary is of the samples reported.
        let lowest = samples.iter().copied().fold(f64::INFINITY, f64::min);
        let highest = samples.iter().copied().fold(0.0, f64::max);
        assert_eq!((min, max), (lowest, highest), "{m}");
        assert!(samples.contains(&p50), "{m}");
        assert!(num(&m["first_ms"], "first_ms") > 0.0, "{m}");
    }
}

#[test]
fn idle_reports_both_proxies_and_the_cost_per_connection_from_its_readings() {
    const N: f64 = 200.0;
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("idle.json");
    let stdout = succeeded(bench(
        &[
            "idle",
            "--connections",
            "200",
            "--out",
            json.to_str().expect("utf-8 path"),
        ],
        Duration::from_secs(90),
    ));
    assert!(stdout.contains("200 keep-alive, idle"), "{stdout}");
    assert!(stdout.contains("200 silent, past detection"), "{stdout}");
    assert!(stdout.contains("200 silent, in detection"), "{stdout}");

    let report = read_json(&json);
    assert_eq!(report["connections"].as_u64(), Some(200), "{report}");
    let proxies = report["proxies"].as_array().expect("proxies");
    let names: Vec<&str> = proxies.iter().filter_map(|p| p["name"].as_str()).collect();
    assert_eq!(names, ["client", "server"], "{report}");
    for p in proxies {
        let field = |k: &str| num(&p[k], k);
        for reading in [
            "baseline",
            "keepalive",
            "keepalive_closed",
            "silent_baseline",
            "silent",
            "detecting_baseline",
            "detecting",
        ] {
            let rss = field(&format!("{reading}_rss_bytes"));
            let anon = field(&format!("{reading}_anon_bytes"));
            assert!(rss > 1e6, "a proxy cannot run in under 1 MB: {p}");
            assert!(
                anon > 0.0 && anon <= rss,
                "private pages are part of RSS: {p}"
            );
        }
        // Each figure per connection is its readings' difference over N, against the
        // baseline of its own mesh.
        for (per, after, before) in [
            (
                "keepalive_bytes_per_connection",
                "keepalive_rss_bytes",
                "baseline_rss_bytes",
            ),
            (
                "keepalive_anon_bytes_per_connection",
                "keepalive_anon_bytes",
                "baseline_anon_bytes",
            ),
            (
                "silent_bytes_per_connection",
                "silent_rss_bytes",
                "silent_baseline_rss_bytes",
            ),
            (
                "silent_anon_bytes_per_connection",
                "silent_anon_bytes",
                "silent_baseline_anon_bytes",
            ),
            (
                "detecting_bytes_per_connection",
                "detecting_rss_bytes",
                "detecting_baseline_rss_bytes",
            ),
            (
                "detecting_anon_bytes_per_connection",
                "detecting_anon_bytes",
                "detecting_baseline_anon_bytes",
            ),
        ] {
            let expected = (field(after) - field(before)) / N;
            assert!((field(per) - expected).abs() < 1e-6, "{per}: {p}");
        }
    }
    // The readings are of the process that holds the connections: 200 of them cost the client
    // proxy some private memory.
    let client = &proxies[0];
    assert!(
        num(&client["keepalive_anon_bytes"], "keepalive")
            > num(&client["baseline_anon_bytes"], "baseline"),
        "{client}"
    );
}

/// What cannot be measured is refused in one sentence before anything starts.
#[test]
fn impossible_sizes_are_refused_before_anything_starts() {
    for (args, needle) in [
        (
            &["cold-start", "--runs", "0"][..],
            "--runs must be at least 1",
        ),
        (
            &["idle", "--connections", "0"][..],
            "--connections must be at least 1",
        ),
        // More than any open-files limit Linux allows (fs.nr_open is at most 2^30).
        (&["idle", "--connections", "2000000000"][..], "open files"),
    ] {
        let out = bench(args, Duration::from_secs(30));
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "one sentence: {err}");
        assert!(
            lines[0].starts_with("error: ") && lines[0].contains(needle),
            "{args:?}: {err}"
        );
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("sidecar:"),
            "{args:?}"
        );
    }
    let out = Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(["bench", "--help"])
        .output()
        .expect("run palisade bench --help");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("cold-start") && help.contains("idle"),
        "{help}"
    );
}
