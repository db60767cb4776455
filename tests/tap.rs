//! `palisade tap` on a running local mesh, as a user runs it: the demo mesh (web -> api -> db,
//! with the demo's policies: web -> db is denied) and an HTTPRoute on api. A tap started in the
//! background shows a request made after it connected within a second, with both identities,
//! the method, the path without its query, the status, the authorization decision and the
//! route; a denied request shows as 403 `deny`; the filters; the admin `/tap` refuses a web
//! page and a sixth tap; the tap exits 0 when its `--duration` has passed.

mod support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

const WEB: &str = "spiffe://cluster.local/ns/demo/sa/web";
const API: &str = "spiffe://cluster.local/ns/demo/sa/api";
const DB: &str = "spiffe://cluster.local/ns/demo/sa/db";

/// A rule on api, so that tapped requests carry a route.
const API_ROUTES: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: api-routes, namespace: demo }
spec:
  parentRefs: [ { group: "", kind: Service, name: api, port: 8080 } ]
  rules:
    - name: tapped
      matches: [ { path: { type: PathPrefix, value: /tapped } } ]
    - name: rest
"#;

/// The demo mesh with the route above.
fn demo_mesh() -> Mesh {
    demo_mesh_with(&[("api-routes.yaml", API_ROUTES)])
}

/// A `palisade tap` running in the background, its stdout lines on a channel.
struct Tap {
    child: Option<Child>,
    lines: mpsc::Receiver<String>,
    /// Every line seen so far.
    seen: Vec<String>,
}

impl Tap {
    /// Starts `palisade tap ARGS` and returns once it says `tapping` on stderr (it has
    /// connected to the proxy: requests from now on are in its stream).
    fn start(state: &Path, args: &[&str]) -> Tap {
        let mut child = Command::new(palisade())
            .arg("tap")
            .args(args)
            .arg("--state-dir")
            .arg(state)
            .env_remove("PALISADE_STATE_DIR")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn palisade tap");
        let (out_tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        let name = args.join(" ");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                println!("[tap {name}] {line}");
                if out_tx.send(line).is_err() {
                    return;
                }
            }
        });
        let (err_tx, errs) = mpsc::channel();
        let stderr = child.stderr.take().expect("stderr");
        let name = args.join(" ");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                println!("[tap {name} stderr] {line}");
                if err_tx.send(line).is_err() {
                    return;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match errs.recv_timeout(left) {
                Ok(line) if line.starts_with("tapping ") => break,
                Ok(_) => {}
                Err(_) => {
                    let _ = child.kill();
                    panic!("palisade tap {args:?} did not say `tapping` within 10s");
                }
            }
        }
        Tap {
            child: Some(child),
            lines,
            seen: Vec::new(),
        }
    }

    /// The first line (seen before or arriving within `within`) that `pred` accepts.
    fn wait_for(&mut self, within: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        if let Some(l) = self.seen.iter().find(|l| pred(l)) {
            return Some(l.clone());
        }
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let line = self.lines.recv_timeout(left).ok()?;
            self.seen.push(line.clone());
            if pred(&line) {
                return Some(line);
            }
        }
    }

    /// The first JSON event (seen before or arriving within `within`) whose `path` is `path`.
    fn event(&mut self, within: Duration, path: &str) -> Option<Value> {
        let line = self.wait_for(within, |l| {
            serde_json::from_str::<Value>(l).is_ok_and(|v| v["path"] == path)
        })?;
        serde_json::from_str(&line).ok()
    }

    /// Waits for the tap to exit on its own (its `--duration`), at most `timeout`.
    fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = child.try_wait().expect("wait for palisade tap") {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("palisade tap was still running after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A request to a workload's app (which calls through its sidecar), and its status checked.
fn call(mesh: &Mesh, from: &str, path: &str, want: u16) {
    let (status, body) = http_get(mesh.app(from), path).expect("the demo app answers");
    assert_eq!(status, want, "{from} {path}: {body}");
}

/// Sends a raw request and reads the start of the status line (`HTTP/1.1 200`); the
/// connection stays open.
fn raw_request(addr: std::net::SocketAddr, req: &str) -> (std::net::TcpStream, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(req.as_bytes()).expect("write");
    let mut head = [0u8; 12];
    s.read_exact(&mut head).expect("a status line");
    (s, String::from_utf8_lossy(&head).into_owned())
}

fn raw_head(addr: std::net::SocketAddr, req: &str) -> String {
    raw_request(addr, req).1
}

fn is_rfc3339_now(t: &Value) -> bool {
    let Some(s) = t.as_str() else { return false };
    let Ok(t) = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
    else {
        return false;
    };
    (time::OffsetDateTime::now_utc() - t).abs() < time::Duration::minutes(1)
}

#[test]
fn tap_shows_the_requests_flowing_now() {
    let mesh = demo_mesh();
    let state = mesh.state.clone();
    let admin = |w: &str| mesh.admin(w);
    let second = Duration::from_secs(1);

    // Inbound on api: web's app calls api through both sidecars; api's proxy answers the tap.
    let mut api = Tap::start(&state, &["api", "-o", "json", "--duration", "10s"]);
    call(&mesh, "web", "/call/api/tapped/one", 200);
    let e = api
        .event(second, "/tapped/one")
        .expect("the request in api's tap within 1s");
    assert_eq!(e["direction"], "inbound", "{e}");
    assert_eq!(e["srcIdentity"], WEB, "{e}");
    assert_eq!(e["dstIdentity"], API, "{e}");
    assert_eq!(e["method"], "GET", "{e}");
    assert_eq!(e["status"], 200, "{e}");
    assert_eq!(e["authz"], "allow", "{e}");
    assert_eq!(e["route"], "demo/api-routes/tapped", "{e}");
    assert!(e["latencyMs"].as_f64().is_some_and(|l| l >= 0.0), "{e}");
    assert!(is_rfc3339_now(&e["time"]), "{e}");

    // A query is never shown (it may hold secrets): the tap sees the path alone.
    let (status, _) = http_get(
        mesh.upstream("web", "api.demo"),
        "/tapped/two?token=secret-value",
    )
    .expect("web's sidecar answers");
    assert_eq!(status, 200);
    let e = api
        .event(second, "/tapped/two")
        .expect("the second request in api's tap within 1s");
    assert!(!e.to_string().contains("secret-value"), "{e}");
    // From the test, through web's sidecar: web's identity all the same.
    assert_eq!(e["srcIdentity"], WEB, "{e}");

    // Denied: web -> db, on db's tap.
    let mut db = Tap::start(&state, &["db", "-o", "json", "--duration", "10s"]);
    call(&mesh, "web", "/call/db/denied", 403);
    let e = db
        .event(second, "/denied")
        .expect("the denied request in db's tap within 1s");
    assert_eq!(e["direction"], "inbound", "{e}");
    assert_eq!(e["srcIdentity"], WEB, "{e}");
    assert_eq!(e["dstIdentity"], DB, "{e}");
    assert_eq!(e["method"], "GET", "{e}");
    assert_eq!(e["status"], 403, "{e}");
    assert_eq!(e["authz"], "deny", "{e}");

    // Outbound on web, filtered to db: the request to api is not shown, the one to db is
    // (denied by db's proxy: web's outbound side sees the 403 and decides nothing itself).
    let mut web_to_db = Tap::start(&state, &["web", "-o", "json", "--to", "db"]);
    call(&mesh, "web", "/call/api/not-db", 200);
    call(&mesh, "web", "/call/db/to-db", 403);
    let e = web_to_db
        .event(second, "/to-db")
        .expect("the request to db in web's tap within 1s");
    assert_eq!(e["direction"], "outbound", "{e}");
    assert_eq!(e["srcIdentity"], WEB, "{e}");
    assert_eq!(e["dstIdentity"], DB, "{e}");
    assert_eq!(e["status"], 403, "{e}");
    assert_eq!(e["authz"], Value::Null, "{e}");
    assert!(
        !web_to_db.seen.iter().any(|l| l.contains("/not-db")),
        "--to db shows only requests to db: {:?}",
        web_to_db.seen
    );

    // The table, filtered by path prefix and method: one line per request, names for
    // identities.
    let mut table = Tap::start(&state, &["api", "--path", "/tapped/t", "--method", "get"]);
    call(&mesh, "web", "/call/api/other", 200);
    call(&mesh, "web", "/call/api/tapped/table", 200);
    let line = table
        .wait_for(second, |l| l.contains("/tapped/table"))
        .expect("the request in the table within 1s");
    for want in [
        "inbound",
        "web -> api",
        "GET /tapped/table",
        " 200 ",
        "allow",
    ] {
        assert!(line.contains(want), "{want:?} in {line:?}");
    }
    assert!(
        !table.seen.iter().any(|l| l.contains("/other")),
        "--path filters: {:?}",
        table.seen
    );

    // Who may tap: not a web page; at most a few at once (api has two taps connected, and
    // maybe a closed one not yet noticed, so the sixth connection is refused at the latest).
    let (status, body) = http_request(
        admin("api"),
        "GET",
        "/tap",
        &[("Origin", "http://evil.example")],
    )
    .expect("admin answers");
    assert_eq!(status, 403, "{body}");
    // ... nor a page whose name was rebound to 127.0.0.1 (no Origin on a same-origin GET).
    let rebound = format!(
        "GET /tap HTTP/1.1\r\nHost: evil.example:{}\r\nConnection: close\r\n\r\n",
        admin("api").port()
    );
    let head = raw_head(admin("api"), &rebound);
    assert!(head.ends_with("403"), "{head}");
    let (status, _) = http_request(admin("api"), "POST", "/tap", &[]).expect("admin answers");
    assert_eq!(status, 405);
    let (status, body) = http_get(admin("api"), "/tap?pth=/x").expect("admin answers");
    assert_eq!(status, 400, "a filter typo is refused: {body}");
    let mut held = Vec::new();
    let mut refused = false;
    for _ in 0..6 {
        let (s, head) = raw_request(admin("api"), "GET /tap HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
        if head.ends_with("503") {
            refused = true;
            break;
        }
        assert!(head.ends_with("200"), "{head}");
        held.push(s);
    }
    assert!(refused, "a sixth tap is refused (503)");
    assert!(held.len() <= 4, "{} taps held", held.len());
    drop(held);

    // The metrics say how many taps are connected and what slow ones lost.
    let metrics = mesh.metrics("api");
    assert!(
        metrics.contains("palisade_tap_events_dropped_total"),
        "{metrics}"
    );
    assert!(metrics.contains("palisade_tap_clients"), "{metrics}");

    // `--duration` passed: the taps end on their own, exit 0.
    assert!(api.wait_exit(Duration::from_secs(20)).success());
    assert!(db.wait_exit(Duration::from_secs(20)).success());
}

#[test]
fn tap_errors_are_one_sentence() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(palisade())
        .args(["tap", "api", "--state-dir"])
        .arg(dir.path())
        .env_remove("PALISADE_STATE_DIR")
        .output()
        .expect("run palisade tap");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no running mesh"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    std::fs::write(
        dir.path().join("mesh.json"),
        r#"{"workloads": [{"name": "web", "spiffeId": "spiffe://cluster.local/ns/demo/sa/web", "adminAddr": "127.0.0.1:9"}]}"#,
    )
    .expect("write mesh.json");
    let out = Command::new(palisade())
        .args(["tap", "nope", "--state-dir"])
        .arg(dir.path())
        .output()
        .expect("run palisade tap");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no workload named \"nope\""), "{err}");
    assert!(err.contains("web"), "{err}");
}
