//! Routing on a running local mesh, as a user drives it: an HTTPRoute written into the policies
//! directory splits traffic between two versions within a second, and `palisade chaos` runs
//! a bounded fault experiment and reports what the callers saw.

mod support;

use std::process::Command;
use std::time::Duration;

use support::*;

fn mesh() -> Mesh {
    MeshSpec {
        lifetime: "1h",
        default_policy: "allow",
        workloads: vec![
            WorkloadSpec::demo("web", "app: web", vec![("api.demo", 8080)]),
            WorkloadSpec::demo("api", "app: api", vec![]),
            WorkloadSpec::demo("api2", "app: api-v2", vec![]),
        ],
        services: vec![
            ("api", 8080, "app: api", "http"),
            ("api-v2", 8080, "app: api-v2", "http"),
        ],
    }
    .start(&[])
}

const SPLIT: &str = "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: api-canary, namespace: demo }
spec:
  parentRefs: [ { group: \"\", kind: Service, name: api, port: 8080 } ]
  rules:
    - name: v2-header
      matches: [ { headers: [ { name: x-version, value: \"2\" } ] } ]
      backendRefs: [ { name: api-v2, port: 8080 } ]
    - name: split
      backendRefs: [ { name: api, port: 8080, weight: 50 }, { name: api-v2, port: 8080, weight: 50 } ]
";

#[test]
fn a_route_written_live_splits_traffic_and_removing_it_restores_the_service() {
    let mesh = mesh();
    let up = mesh.upstream("web", "api.demo");
    let from = |body: &str| {
        if body.contains("hello from api2") {
            2
        } else if body.contains("hello from api") {
            1
        } else {
            0
        }
    };
    let (status, body) = http_get(up, "/").expect("api");
    assert_eq!((status, from(&body)), (200, 1), "{body}");

    mesh.write_policy("canary.yaml", SPLIT);
    assert!(
        eventually(Duration::from_secs(5), || {
            http_request(up, "GET", "/", &[("x-version", "2")])
                .is_ok_and(|(s, b)| s == 200 && from(&b) == 2)
        }),
        "the route never applied:\n{}",
        mesh.logs()
    );
    let mut counts = [0usize; 3];
    for _ in 0..200 {
        let (s, b) = http_get(up, "/").expect("api");
        assert_eq!(s, 200, "{b}");
        counts[from(&b)] += 1;
    }
    assert_eq!(counts[0], 0);
    assert!(
        (60..=140).contains(&counts[1]),
        "api got {} of 200",
        counts[1]
    );
    let labelled = mesh.metric_sum(
        "web",
        "palisade_requests_total",
        &["direction=\"outbound\"", "route=\"demo/api-canary/split\""],
    );
    assert_eq!(labelled, 200.0);

    mesh.remove_policy("canary.yaml");
    assert!(eventually(Duration::from_secs(5), || {
        http_request(up, "GET", "/", &[("x-version", "2")]).is_ok_and(|(_, b)| from(&b) == 1)
    }));
}

#[test]
fn chaos_aborts_its_share_for_its_duration_and_cleans_up() {
    let mesh = mesh();
    let out = Command::new(palisade())
        .args([
            "chaos",
            "--service",
            "api.demo:8080",
            "--abort-percent",
            "40",
        ])
        .args(["--duration", "3s", "--load", "100", "-o", "json"])
        .arg("--state-dir")
        .arg(&mesh.state)
        .output()
        .expect("run palisade chaos");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        mesh.logs()
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    let requests = report["requests"].as_f64().expect("requests");
    assert!(requests >= 150.0, "{report}");
    let success = report["successRate"].as_f64().expect("successRate");
    assert!((0.45..=0.75).contains(&success), "{report}");
    let aborted = report["faultsInjected"]["abort"].as_f64().expect("abort");
    assert_eq!(
        report["byStatus"]["503"].as_f64(),
        Some(aborted),
        "{report}"
    );
    assert!(
        !mesh.policies.join("palisade-chaos.yaml").exists(),
        "the experiment is removed"
    );
    // Back to normal: every request succeeds.
    let up = mesh.upstream("web", "api.demo");
    for _ in 0..50 {
        assert_eq!(http_get(up, "/").expect("api").0, 200);
    }
    // Interrupted, the experiment still ends: its file is removed and the report printed.
    let mut child = Command::new(palisade())
        .args([
            "chaos",
            "--service",
            "api.demo:8080",
            "--abort-percent",
            "10",
        ])
        .args(["--duration", "60s"])
        .arg("--state-dir")
        .arg(&mesh.state)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start palisade chaos");
    let file = mesh.policies.join("palisade-chaos.yaml");
    // Wait for the experiment to be in force (chaos says so on stderr), then interrupt it.
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let running = loop {
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(line) if line.contains("experiment running") => break true,
            Ok(_) => continue,
            Err(_) => break false,
        }
    };
    assert!(running, "chaos never said the experiment was running");
    assert!(file.exists());
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break st;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "chaos did not stop on SIGINT"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    assert!(!file.exists(), "an interrupted experiment is removed");

    // A service with routes of its own is not rerouted by an experiment.
    mesh.write_policy("canary.yaml", SPLIT);
    let out = Command::new(palisade())
        .args([
            "chaos",
            "--service",
            "api.demo:8080",
            "--abort-percent",
            "10",
        ])
        .arg("--state-dir")
        .arg(&mesh.state)
        .output()
        .expect("run palisade chaos");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("demo/api-canary"), "{err}");
}
