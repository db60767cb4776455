//! `palisade bench` end to end, at a low rate and for a short time: it starts its own mesh,
//! drives load direct and through the proxies, and writes the table, the JSON and the SVG of the
//! spec. The figures themselves depend on the machine; these tests check that every part of the
//! report is there and consistent, not how fast anything is.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The fixed rate every test runs at, low enough for a debug build on a busy machine.
const RATE: u64 = 200;

/// Runs `palisade bench` for one second at `RATE` over two connections, plus `args`, killing
/// it if it is still running after two minutes.
fn bench(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_palisade"))
        .arg("bench")
        .arg("--rate")
        .arg(RATE.to_string())
        .args(["--duration", "1s", "--connections", "2"])
        .args(args)
        .env("PALISADE_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start palisade bench");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match child.try_wait().expect("wait for palisade bench") {
            Some(_) => break,
            None if Instant::now() > deadline => {
                let _ = child.kill();
                let out = child.wait_with_output().expect("collect output");
                panic!(
                    "palisade bench ran past 2 minutes; stderr: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    let out = child.wait_with_output().expect("collect output");
    assert!(
        out.status.success(),
        "palisade bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).expect("read --out file");
    serde_json::from_str(&text).expect("--out is JSON")
}

fn num(v: &serde_json::Value, what: &str) -> f64 {
    v.as_f64()
        .unwrap_or_else(|| panic!("{what} is not a number: {v}"))
}

/// Checks one run of the JSON report and returns its request count.
fn check_run(run: &serde_json::Value) -> u64 {
    let requests = run["requests"].as_u64().expect("requests");
    assert!(requests > 0, "a run with no requests: {run}");
    assert_eq!(run["errors"].as_u64(), Some(0), "errors in {run}");
    assert!(num(&run["rps"], "rps") > 0.0, "{run}");
    let l = &run["latency_ms"];
    let order = ["p50", "p90", "p99", "p999", "max"].map(|k| num(&l[k], k));
    assert!(order[0] > 0.0, "p50 must be positive: {run}");
    assert!(
        order.windows(2).all(|w| w[0] <= w[1]),
        "percentiles out of order: {run}"
    );
    requests
}

#[test]
fn http1_report_has_every_run_both_proxies_and_a_plot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("bench.json");
    let svg = dir.path().join("bench.svg");
    // A second, lower rate: the plot has a line per mode and rate.
    let low = (RATE / 2).to_string();
    let out = bench(&[
        "--rate",
        &low,
        "--out",
        json.to_str().expect("utf-8 path"),
        "--plot",
        svg.to_str().expect("utf-8 path"),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    // `cargo test` builds both binaries side by side, so the bench measures the sidecar binary.
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("sidecar: ") && l.ends_with("palisade-proxy")),
        "{stdout}"
    );
    assert!(stdout.contains("added latency (mesh - direct)"), "{stdout}");
    for name in ["client", "server"] {
        // CPU with its resolution: 1000 / RATE requests per clock tick of 10 ms, so ±0.05.
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("proxy {name}")))
            .unwrap_or_else(|| panic!("no line for the {name} proxy: {stdout}"));
        let res: f64 = line
            .split_once('±')
            .and_then(|(_, r)| r.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no ± resolution: {line}"));
        assert!((0.04..=0.06).contains(&res), "{line}");
        assert!(line.contains(" s/1000 req"), "{line}");
    }

    let report = read_json(&json);
    let runs = report["runs"].as_array().expect("runs");
    let find = |mode: &str, rate: Option<u64>| {
        runs.iter()
            .find(|r| r["mode"] == mode && r["rate"].as_u64() == rate)
            .unwrap_or_else(|| panic!("no {mode} run at {rate:?}: {report}"))
    };
    for mode in ["direct", "mesh"] {
        // Open loop for 1 s: the generator sends on schedule whatever the latency, so the
        // count is the rate, within 10%.
        let fixed = check_run(find(mode, Some(RATE)));
        assert!(
            (RATE * 9 / 10..=RATE * 11 / 10).contains(&fixed),
            "{mode} sent {fixed} requests"
        );
        check_run(find(mode, Some(RATE / 2)));
        let max = find(mode, None);
        assert!(max["rate"].is_null(), "{max}");
        check_run(max);
    }
    assert_eq!(runs.len(), 6, "{report}");

    let proxies = report["proxies"].as_array().expect("proxies");
    let names: Vec<&str> = proxies.iter().filter_map(|p| p["name"].as_str()).collect();
    assert_eq!(names, ["client", "server"], "{report}");
    for p in proxies {
        let cpu = num(&p["cpu_seconds_per_1000_requests"], "cpu");
        assert!(cpu > 0.0, "{p}");
        // The split is of the same reading: user and kernel add up to the total.
        let user = num(&p["cpu_user_seconds_per_1000_requests"], "user cpu");
        let system = num(&p["cpu_system_seconds_per_1000_requests"], "kernel cpu");
        assert!(user >= 0.0 && system >= 0.0, "{p}");
        assert!((user + system - cpu).abs() < 1e-9, "{p}");
        // One tick (1/100 s) over the RATE requests of the first run, per 1000 requests.
        let res = num(&p["cpu_resolution_seconds_per_1000_requests"], "resolution");
        assert!((0.04..=0.06).contains(&res), "{p}");
        let rss = num(&p["peak_rss_bytes"], "peak_rss_bytes");
        assert!(rss > 1e6, "a proxy cannot run in under 1 MB: {p}");
    }
    let added = &report["added_latency_ms"];
    let p50 = num(&added["p50"], "added p50");
    let p99 = num(&added["p99"], "added p99");
    assert!(p50.is_finite() && p99.is_finite(), "{added}");

    let plot = std::fs::read_to_string(&svg).expect("read --plot file");
    assert!(
        plot.contains("<svg"),
        "not an SVG: {}",
        &plot[..plot.len().min(200)]
    );
    let texts = svg_texts(&plot);
    for rate in [RATE, RATE / 2] {
        for mode in ["direct", "mesh"] {
            let label = format!("{mode} {rate} rps");
            assert!(texts.contains(&label), "no {label:?} line: {texts:?}");
        }
    }
    // The x axis is marked at the percentiles people quote, and only there.
    let ticks: Vec<&String> = texts
        .iter()
        .filter(|t| {
            t.strip_prefix('p')
                .is_some_and(|n| n.starts_with(|c: char| c.is_ascii_digit()))
        })
        .collect();
    assert_eq!(ticks, ["p50", "p90", "p99", "p99.9"], "{texts:?}");
}

/// The text of every `<text>` element of an SVG, in order.
fn svg_texts(svg: &str) -> Vec<String> {
    svg.split("<text")
        .skip(1)
        .filter_map(|t| {
            let body = t.split_once('>')?.1;
            Some(body.split_once("</text>")?.0.trim().to_string())
        })
        .collect()
}

/// `palisade bench` runs the benchmarks' own binary, `palisade-bench`: its help, under the
/// command's name, with the spec's flags and the control-plane benchmark.
#[test]
fn bench_help_is_the_benchmarks_help() {
    let out = Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(["bench", "--help"])
        .output()
        .expect("run palisade bench --help");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{help}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(help.contains("Usage: palisade bench"), "{help}");
    for flag in [
        "--rate",
        "--duration",
        "--connections",
        "--protocol",
        "--out",
        "--plot",
        "--relays",
        "--palisade-bin",
        "control-plane",
    ] {
        assert!(help.contains(flag), "no {flag}: {help}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(["bench", "control-plane", "--help"])
        .output()
        .expect("run palisade bench control-plane --help");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{help}");
    assert!(
        help.contains("--proxies") && help.contains("--churn"),
        "{help}"
    );
    // The product CLI has no relay any more: it is the bench's (`palisade-bench relay`).
    let out = Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(["relay", "--to", "127.0.0.1:1"])
        .output()
        .expect("run palisade relay");
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn a_zero_duration_or_rate_is_refused_before_anything_starts() {
    for (args, needle) in [
        (
            &["--duration", "0s"][..],
            "--duration must be longer than 0s",
        ),
        (&["--rate", "0", "--duration", "1s"][..], "--rate 0"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_palisade"))
            .arg("bench")
            .args(args)
            .output()
            .expect("run palisade bench");
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "one sentence: {err}");
        assert!(
            lines[0].starts_with("error: ") && lines[0].contains(needle),
            "{err}"
        );
        // Refused before the mesh: nothing printed about the sidecar it would measure.
        assert!(!String::from_utf8_lossy(&out.stdout).contains("sidecar:"));
    }
}

#[test]
fn tcp_and_http2_go_through_the_mesh_without_errors() {
    for protocol in ["tcp", "http2"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let json = dir.path().join("bench.json");
        bench(&[
            "--protocol",
            protocol,
            "--no-max",
            "--out",
            json.to_str().expect("utf-8 path"),
        ]);
        let report = read_json(&json);
        assert_eq!(report["protocol"], protocol, "{report}");
        let runs = report["runs"].as_array().expect("runs");
        assert_eq!(runs.len(), 2, "--no-max leaves one direct and one mesh run");
        for run in runs {
            assert_eq!(run["rate"].as_u64(), Some(RATE), "{run}");
            check_run(run);
        }
    }
}

#[test]
fn relays_mode_measures_two_plain_tcp_relays_in_the_same_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("bench.json");
    let out = bench(&[
        "--relays",
        "--no-max",
        "--out",
        json.to_str().expect("utf-8 path"),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("added latency (relays - direct)"),
        "{stdout}"
    );
    assert!(stdout.contains("mesh vs relays: "), "{stdout}");
    let report = read_json(&json);
    let runs = report["runs"].as_array().expect("runs");
    let modes: Vec<&str> = runs.iter().filter_map(|r| r["mode"].as_str()).collect();
    assert_eq!(modes, ["direct", "relays", "mesh"], "{report}");
    for run in runs {
        let n = check_run(run);
        assert!((RATE * 9 / 10..=RATE * 11 / 10).contains(&n), "{run}");
    }
    // The relay run's hops are the relays, not the proxies.
    let relay_run = &runs[1]["proxy_cpu_seconds_per_1000_requests"];
    assert!(relay_run.get("relay-1").is_some(), "{report}");
    assert!(relay_run.get("client").is_none(), "{report}");
    let relays = report["relays"].as_array().expect("relays");
    let names: Vec<&str> = relays.iter().filter_map(|p| p["name"].as_str()).collect();
    assert_eq!(names, ["relay-1", "relay-2"], "{report}");
    for r in relays {
        // A relay at this rate may use less than one clock tick: zero is a valid reading.
        let cpu = num(&r["cpu_seconds_per_1000_requests"], "cpu");
        assert!(cpu >= 0.0, "{r}");
        let user = num(&r["cpu_user_seconds_per_1000_requests"], "user cpu");
        let system = num(&r["cpu_system_seconds_per_1000_requests"], "kernel cpu");
        assert!((user + system - cpu).abs() < 1e-9, "{r}");
    }
    assert!(stdout.contains("(user "), "the split is printed: {stdout}");
    let added = &report["relays_added_latency_ms"];
    assert!(
        num(&added["p50"], "relays added p50").is_finite(),
        "{report}"
    );
    assert_eq!(
        report["proxies"].as_array().map(Vec::len),
        Some(2),
        "{report}"
    );
}
