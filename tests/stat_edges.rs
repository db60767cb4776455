//! `palisade stat` and `palisade edges` on a running local mesh, as a user runs them: the demo
//! mesh (web -> api -> db, with the demo's policies: web -> db is denied) and an HTTPRoute on
//! api, known traffic, and exact counts — since the proxies started, and over a window taken
//! while the traffic flows — with rates, shares and latencies within bounds; then the
//! tables, `--watch`, and the errors.

mod support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

const WEB: &str = "spiffe://cluster.local/ns/demo/sa/web";
const API: &str = "spiffe://cluster.local/ns/demo/sa/api";
const DB: &str = "spiffe://cluster.local/ns/demo/sa/db";

/// Two rules on api, so that `stat --by route` has two rows.
const API_ROUTES: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: api-routes, namespace: demo }
spec:
  parentRefs: [ { group: "", kind: Service, name: api, port: 8080 } ]
  rules:
    - name: hello
      matches: [ { path: { type: PathPrefix, value: /hello } } ]
    - name: rest
"#;

/// The demo mesh with the route above.
fn demo_mesh() -> Mesh {
    demo_mesh_with(&[("api-routes.yaml", API_ROUTES)])
}

fn palisade_cmd(state: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(palisade());
    c.args(args)
        .arg("--state-dir")
        .arg(state)
        .env_remove("PALISADE_STATE_DIR");
    c
}

fn run(state: &Path, args: &[&str]) -> Output {
    palisade_cmd(state, args).output().expect("run palisade")
}

fn json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

/// Sends `n` requests to `path` of a workload's app (which calls through its sidecar) and
/// checks each answer's status.
fn calls(mesh: &Mesh, from: &str, path: &str, n: usize, want: u16) {
    for i in 0..n {
        let (status, body) = http_get(mesh.app(from), path).expect("the demo app answers");
        assert_eq!(status, want, "{from} {path} #{i}: {body}");
    }
}

fn row<'a>(doc: &'a Value, list: &str, key: &str, name: &str) -> &'a Value {
    doc[list]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r[key] == name))
        .unwrap_or_else(|| panic!("no {key} {name:?} in {doc:#}"))
}

fn edge<'a>(doc: &'a Value, src: &str, dst: &str) -> &'a Value {
    doc["edges"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["src"] == src && r["dst"] == dst))
        .unwrap_or_else(|| panic!("no edge {src} -> {dst} in {doc:#}"))
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("{v} is not a number"))
}

/// A `stat`/`edges` run over a window, started in the background: returns once it has read
/// the proxies the first time (it says `measuring` on stderr).
fn start_windowed(state: &Path, args: &[&str]) -> (Child, mpsc::Receiver<String>) {
    let mut child = palisade_cmd(state, args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn palisade");
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().expect("stderr");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            println!("[stderr] {line}");
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.contains("measuring") => return (child, rx),
            Ok(_) => {}
            Err(_) => {
                let _ = child.kill();
                panic!("{args:?} never said it was measuring");
            }
        }
    }
}

fn finish(child: Child) -> Value {
    json(&child.wait_with_output().expect("wait for palisade"))
}

#[test]
fn stat_and_edges_count_known_traffic_exactly() {
    let mesh = demo_mesh();
    let state = mesh.state.clone();

    // Known traffic: web -> api 20 times (16 on the route's `rest` rule, 4 on `hello`),
    // web -> db 5 times (denied by the demo's db policy: 403), api -> db 3 times.
    calls(&mesh, "web", "/call/api", 16, 200);
    calls(&mesh, "web", "/call/api/hello", 4, 200);
    calls(&mesh, "web", "/call/db", 5, 403);
    calls(&mesh, "api", "/call/db", 3, 200);

    // Since the proxies started: exact totals (each proxy counts a request when its response
    // head passes, before the caller has it).
    let s = json(&run(&state, &["stat", "--since-start", "-o", "json"]));
    println!("{s:#}");
    assert_eq!(s["sinceStart"], true);
    assert!(f(&s["window"]) > 0.0, "{s:#}");
    assert_eq!(s["workloads"].as_array().map(Vec::len), Some(3), "{s:#}");
    let api = row(&s, "workloads", "name", "api");
    assert_eq!(api["requests"], 20, "{s:#}");
    assert_eq!(api["successRate"], 1.0);
    assert_eq!(api["mtlsShare"], 1.0);
    assert_eq!(api["denied"], 0);
    assert!(f(&api["rps"]) > 0.0, "{api}");
    let (p50, p95, p99) = (
        f(&api["latencyMs"]["p50"]),
        f(&api["latencyMs"]["p95"]),
        f(&api["latencyMs"]["p99"]),
    );
    assert!(
        0.0 < p50 && p50 <= p95 && p95 <= p99 && p99 <= 10_000.0,
        "{api}"
    );
    let db = row(&s, "workloads", "name", "db");
    assert_eq!(db["requests"], 8, "{s:#}");
    assert_eq!(db["denied"], 5, "{s:#}");
    assert_eq!(db["allowed"], 3, "{s:#}");
    assert_eq!(db["successRate"], 1.0, "a 403 is not a failure: {s:#}");
    assert_eq!(db["mtlsShare"], 1.0);
    // web is only a caller here (the test calls its app directly): no requests, no rates.
    let web = row(&s, "workloads", "name", "web");
    assert_eq!(web["requests"], 0, "{s:#}");
    assert_eq!(web["rps"], 0.0);
    assert_eq!(web["successRate"], Value::Null);
    assert_eq!(web["mtlsShare"], Value::Null);
    assert_eq!(web["latencyMs"]["p50"], Value::Null);

    // One workload.
    let only = json(&run(&state, &["stat", "db", "--since-start", "-o", "json"]));
    assert_eq!(
        only["workloads"].as_array().map(Vec::len),
        Some(1),
        "{only:#}"
    );
    assert_eq!(only["workloads"][0]["name"], "db");
    assert_eq!(only["workloads"][0]["requests"], 8);

    // By route: the rules api's proxy matched.
    let r = json(&run(
        &state,
        &["stat", "--by", "route", "--since-start", "-o", "json"],
    ));
    println!("{r:#}");
    assert_eq!(r["routes"].as_array().map(Vec::len), Some(2), "{r:#}");
    let rest = row(&r, "routes", "route", "demo/api-routes/rest");
    assert_eq!(rest["requests"], 16, "{r:#}");
    assert_eq!(rest["workloads"], serde_json::json!(["api"]));
    assert_eq!(rest["mtlsShare"], 1.0);
    let hello = row(&r, "routes", "route", "demo/api-routes/hello");
    assert_eq!(hello["requests"], 4, "{r:#}");
    assert_eq!(hello["successRate"], 1.0);

    // Edges: each counted once, at the callee, with both identities.
    let e = json(&run(&state, &["edges", "--since-start", "-o", "json"]));
    println!("{e:#}");
    assert_eq!(e["edges"].as_array().map(Vec::len), Some(3), "{e:#}");
    let web_api = edge(&e, "web", "api");
    assert_eq!(web_api["srcIdentity"], WEB);
    assert_eq!(web_api["dstIdentity"], API);
    assert_eq!(web_api["secured"], true);
    assert_eq!(web_api["requests"], 20);
    assert_eq!(web_api["successRate"], 1.0);
    assert_eq!(web_api["denied"], 0);
    let web_db = edge(&e, "web", "db");
    assert_eq!(web_db["dstIdentity"], DB);
    assert_eq!(web_db["secured"], true);
    assert_eq!(web_db["requests"], 5);
    assert_eq!(web_db["denied"], 5);
    let api_db = edge(&e, "api", "db");
    assert_eq!(
        (&api_db["requests"], &api_db["denied"]),
        (&3.into(), &0.into())
    );

    // Over a window: both commands read the proxies, the traffic flows, they read them again
    // 5 s after the first read; only what happened in between counts, exactly.
    let window = 5.0;
    let started = Instant::now();
    let (stat_run, _stat_err) = start_windowed(&state, &["stat", "-o", "json", "--window", "5s"]);
    let (edges_run, _edges_err) =
        start_windowed(&state, &["edges", "-o", "json", "--window", "5s"]);
    calls(&mesh, "web", "/call/api", 10, 200);
    calls(&mesh, "web", "/call/db", 2, 403);
    assert!(
        started.elapsed() < Duration::from_secs_f64(window - 0.5),
        "the traffic took {:?}: not inside the window",
        started.elapsed()
    );
    let s = finish(stat_run);
    let e = finish(edges_run);
    println!("{s:#}\n{e:#}");
    assert_eq!(s["sinceStart"], false);
    let measured = f(&s["window"]);
    assert!((window..window + 3.0).contains(&measured), "{s:#}");
    let api = row(&s, "workloads", "name", "api");
    assert_eq!(api["requests"], 10, "{s:#}");
    let rps = f(&api["rps"]);
    assert!(
        (10.0 / (window + 3.0)..=10.0 / window).contains(&rps),
        "rps {rps} for 10 requests in ~{window}s: {s:#}"
    );
    assert_eq!(api["successRate"], 1.0);
    assert_eq!(api["mtlsShare"], 1.0);
    let db = row(&s, "workloads", "name", "db");
    assert_eq!(
        (&db["requests"], &db["denied"]),
        (&2.into(), &2.into()),
        "{s:#}"
    );
    assert_eq!(
        row(&s, "workloads", "name", "web")["successRate"],
        Value::Null
    );
    assert_eq!(edge(&e, "web", "api")["requests"], 10, "{e:#}");
    assert_eq!(edge(&e, "web", "db")["denied"], 2, "{e:#}");
    // A quiet edge the proxies know of: 0 requests, no success rate.
    let quiet = edge(&e, "api", "db");
    assert_eq!(quiet["requests"], 0, "{e:#}");
    assert_eq!(quiet["successRate"], Value::Null);

    // The tables.
    let out = run(&state, &["stat", "--since-start"]);
    let table = String::from_utf8_lossy(&out.stdout);
    println!("{table}");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "NAME",
        "REQUESTS",
        "SUCCESS",
        "P99",
        "MTLS",
        "DENIED",
        "api",
        "db",
        "100%",
        "since the proxies started",
    ] {
        assert!(table.contains(needle), "no {needle:?} in:\n{table}");
    }
    let out = run(&state, &["edges", "--since-start"]);
    let table = String::from_utf8_lossy(&out.stdout);
    println!("{table}");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in ["SRC", "DST", "SECURED", "yes", WEB, DB] {
        assert!(table.contains(needle), "no {needle:?} in:\n{table}");
    }

    // --watch: a JSON line per window until Ctrl-C, which ends it cleanly.
    let mut watch = palisade_cmd(&state, &["stat", "--watch", "--window", "1s", "-o", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn stat --watch");
    let stdout = watch.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    for i in 0..2 {
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("no report {i} from stat --watch"));
        let doc: Value = serde_json::from_str(&line).expect("one JSON document per line");
        assert_eq!(doc["workloads"].as_array().map(Vec::len), Some(3), "{doc}");
    }
    let _ = Command::new("kill")
        .arg("-INT")
        .arg(watch.id().to_string())
        .status();
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(st) = watch.try_wait().expect("wait") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = watch.kill();
            panic!("stat --watch did not stop at Ctrl-C");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "stat --watch ended with {status}");

    // A workload the mesh does not have: one sentence naming those it has.
    let out = run(&state, &["stat", "nosuch", "--since-start"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no workload named \"nosuch\""), "{stderr}");
    assert!(stderr.contains("web, api, db"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");

    // A proxy that cannot be read is named, and the others still count.
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
    let out = run(other.path(), &["stat", "--since-start", "-o", "json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("gone's proxy"), "{stderr}");
    let s = json(&out);
    assert_eq!(s["missing"], serde_json::json!(["gone"]));
    assert_eq!(row(&s, "workloads", "name", "api")["requests"], 30);
}

#[test]
fn without_a_running_mesh_they_say_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    for cmd in ["stat", "edges"] {
        let out = run(dir.path(), &[cmd, "--window", "1s"]);
        assert!(!out.status.success(), "{cmd}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("no running mesh"), "{cmd}: {stderr}");
        assert!(stderr.contains("palisade up"), "{cmd}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "one sentence: {stderr}");
        assert!(out.stdout.is_empty());
    }
}
