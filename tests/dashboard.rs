//! `palisade dashboard` on a running local mesh, as a user opens it: the demo mesh (web -> api
//! -> db; the demo's policies deny web -> db), known traffic, then the dashboard on a free
//! port. Its JSON API has the edges with their denials, describes a workload, relays a tap,
//! and refuses a foreign `Host` (DNS rebinding) and another site's page; a non-loopback
//! `--listen` is refused. Then the page itself in headless Chromium (Debian's `chromium`;
//! skipped with a printed reason when it is not installed): the three workloads are nodes of
//! the graph and the web -> db edge is marked denied, checked from the DOM, and screenshots
//! are saved for a person to look at.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

const WEB: &str = "spiffe://cluster.local/ns/demo/sa/web";
const DB: &str = "spiffe://cluster.local/ns/demo/sa/db";

/// `palisade dashboard` in the background, killed when dropped.
struct Dashboard {
    child: Child,
    addr: SocketAddr,
}

impl Dashboard {
    /// Starts it on a free port and returns once it printed `dashboard: http://ADDR/`.
    fn start(state: &Path) -> Dashboard {
        let mut child = Command::new(palisade())
            .args(["dashboard", "--listen", "127.0.0.1:0", "--state-dir"])
            .arg(state)
            .env_remove("PALISADE_STATE_DIR")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn palisade dashboard");
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                println!("[dashboard] {line}");
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) => {
                    if let Some(url) = l.strip_prefix("dashboard: http://") {
                        break url.trim_end_matches('/').parse().expect("an ip:port");
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    panic!("palisade dashboard did not print its URL within 30s");
                }
            }
        };
        Dashboard { child, addr }
    }

    fn url(&self, fragment: &str) -> String {
        format!("http://{}/{fragment}", self.addr)
    }

    /// GET `path` as the page's own fetch would (Host: the address it listens on).
    fn get(&self, path: &str) -> (u16, String, String) {
        raw_get(self.addr, path, &[("Host", &self.addr.to_string())])
    }

    fn json(&self, path: &str) -> Value {
        let (status, _, body) = self.get(path);
        assert_eq!(status, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path} is not JSON ({e}): {body}"))
    }
}

impl Drop for Dashboard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A GET with exactly these headers; returns (status, head, body). Bodies the tests read
/// have a Content-Length (the JSON answers).
fn raw_get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, String, String) {
    let mut s =
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut req = format!("GET {path} HTTP/1.1\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).expect("write");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).expect("read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    (status, head.to_string(), body.to_string())
}

/// Requests through the demo apps (each calls through its sidecar), checking each status.
fn calls(mesh: &Mesh, from: &str, path: &str, n: usize, want: u16) {
    for i in 0..n {
        let (status, body) = http_get(mesh.app(from), path).expect("the demo app answers");
        assert_eq!(status, want, "{from} {path} #{i}: {body}");
    }
}

fn edge<'a>(doc: &'a Value, src: &str, dst: &str) -> Option<&'a Value> {
    doc["edges"]
        .as_array()?
        .iter()
        .find(|e| e["src"] == src && e["dst"] == dst)
}

#[test]
fn dashboard_shows_the_mesh_and_refuses_other_sites() {
    let mesh = demo_mesh_with(&[]);
    // Known traffic: web -> api 10 times, web -> db 5 times (denied: 403), api -> db 3 times.
    calls(&mesh, "web", "/call/api", 10, 200);
    calls(&mesh, "web", "/call/db", 5, 403);
    calls(&mesh, "api", "/call/db", 3, 200);

    let dash = Dashboard::start(&mesh.state);

    // The edges, since the proxies started (the traffic was before the dashboard's first
    // reading), and listed in the recent window too, quiet.
    let mut edges = Value::Null;
    let seen = eventually(Duration::from_secs(15), || {
        edges = dash.json("/api/edges");
        edge(&edges["totals"], "web", "db").is_some_and(|e| e["denied"].as_u64() > Some(0))
    });
    println!("{edges:#}");
    assert!(seen, "no denied web -> db edge: {edges:#}");
    let totals = &edges["totals"];
    let web_db = edge(totals, "web", "db").expect("web -> db");
    assert_eq!(web_db["requests"], 5, "{web_db}");
    assert_eq!(web_db["denied"], 5, "{web_db}");
    assert_eq!(web_db["secured"], true);
    assert_eq!(web_db["srcIdentity"], WEB);
    assert_eq!(web_db["dstIdentity"], DB);
    let web_api = edge(totals, "web", "api").expect("web -> api");
    assert_eq!(web_api["requests"], 10, "{web_api}");
    assert_eq!(web_api["denied"], 0);
    assert_eq!(edge(totals, "api", "db").expect("api -> db")["requests"], 3);
    assert!(
        edge(&edges, "web", "db").is_some(),
        "quiet edges stay listed"
    );
    assert_eq!(edges["sinceStart"], false);
    assert_eq!(totals["sinceStart"], true);

    let stat = dash.json("/api/stat");
    let names: Vec<&str> = stat["workloads"]
        .as_array()
        .expect("workloads")
        .iter()
        .filter_map(|w| w["name"].as_str())
        .collect();
    assert_eq!(names, ["web", "api", "db"], "{stat:#}");
    let db_total = stat["totals"]["workloads"]
        .as_array()
        .and_then(|r| r.iter().find(|w| w["name"] == "db"))
        .expect("db since start");
    assert_eq!(db_total["denied"], 5, "{stat:#}");
    assert_eq!(db_total["requests"], 8, "{stat:#}");

    // A workload page's API: describe.
    let db = dash.json("/api/workloads/db");
    assert_eq!(db["workload"], "db");
    assert_eq!(db["identity"], DB);
    assert!(
        db["policies"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["name"] == "demo/db-from-api")),
        "{db:#}"
    );
    let (status, _, body) = dash.get("/api/workloads/nope");
    assert_eq!(status, 404, "{body}");
    assert!(
        body.contains("\"error\"") && body.contains("web, api, db"),
        "{body}"
    );

    // Cost: the proxies export cost counters, and there was traffic.
    let cost = dash.json("/api/cost");
    assert_eq!(cost["available"], true, "{cost:#}");
    let rows = cost["rows"].as_array().expect("rows");
    assert!(
        rows.iter()
            .any(|r| r["identity"] == "spiffe://cluster.local/ns/demo/sa/web"
                && r["requests"].as_f64() > Some(0.0)),
        "web's calls cost something: {cost:#}"
    );

    // Refused: a Host that is a DNS name (a rebinding page), another site's page, and a
    // cross-site request to the API; never a CORS header.
    let port = dash.addr.port();
    let evil = format!("evil.example:{port}");
    let (status, head, body) = raw_get(dash.addr, "/api/edges", &[("Host", &evil)]);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("\"error\""), "{body}");
    assert!(
        !head.to_ascii_lowercase().contains("access-control-"),
        "{head}"
    );
    let host = dash.addr.to_string();
    let (status, _, body) = raw_get(
        dash.addr,
        "/api/edges",
        &[("Host", &host), ("Origin", "http://evil.example")],
    );
    assert_eq!(status, 403, "{body}");
    let (status, _, body) = raw_get(
        dash.addr,
        "/api/workloads/api/tap",
        &[("Host", &host), ("Sec-Fetch-Site", "cross-site")],
    );
    assert_eq!(status, 403, "{body}");
    let (status, head, _) = dash.get("/");
    assert_eq!(status, 200);
    assert!(
        !head.to_ascii_lowercase().contains("access-control-"),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase()
            .contains("content-security-policy"),
        "{head}"
    );
    let (status, _, _) = raw_get(dash.addr, "/", &[("Host", &format!("localhost:{port}"))]);
    assert_eq!(status, 200, "localhost is this machine");

    // A live tap relayed from api's proxy: a request made once it is connected shows.
    tap_shows_a_request(&mesh, &dash);

    // The page, in a browser.
    browser(&mesh, &dash);
}

/// Opens `/api/workloads/api/tap`, waits for its first line, makes web -> api requests and
/// reads until one shows (bounded), then closes the connection.
fn tap_shows_a_request(mesh: &Mesh, dash: &Dashboard) {
    let mut s =
        std::net::TcpStream::connect_timeout(&dash.addr, Duration::from_secs(2)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let req = format!(
        "GET /api/workloads/api/tap HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        dash.addr
    );
    s.write_all(req.as_bytes()).expect("write");
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut called = false;
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("reading the tap: {e}"),
        }
        if !called && seen.contains("\"tapping\":\"api\"") {
            assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
            calls(mesh, "web", "/call/api", 2, 200);
            called = true;
        }
        if called && seen.contains("\"direction\":\"inbound\"") && seen.contains(WEB) {
            println!("tap relayed:\n{seen}");
            return;
        }
    }
    panic!("the relayed tap showed no request of web within 15s:\n{seen}");
}

/// Requests through the mesh until dropped, so that the page shows live rates.
struct Traffic {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Traffic {
    fn start(mesh: &Mesh) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let (web, api) = (mesh.app("web"), mesh.app("api"));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut i = 0u64;
            while !flag.load(Ordering::Relaxed) {
                let _ = http_get(web, "/call/api");
                if i.is_multiple_of(4) {
                    let _ = http_get(api, "/call/db");
                }
                if i.is_multiple_of(10) {
                    let _ = http_get(web, "/call/db");
                }
                i += 1;
                std::thread::sleep(Duration::from_millis(40));
            }
        });
        Traffic {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn chromium() -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("chromium"))
            .find(|p| p.is_file())
    })
}

/// Runs headless Chromium with `args` (and a fresh profile), at most `timeout`; its stdout.
fn run_chromium(exe: &Path, args: &[String], timeout: Duration) -> String {
    let profile = tempfile::tempdir().expect("profile dir");
    let mut child = Command::new(exe)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn chromium");
    let mut stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        let _ = stdout.read_to_string(&mut out);
        out
    });
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait().expect("wait for chromium").is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium {args:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    reader.join().unwrap_or_default()
}

/// The opening tags `<g class="KIND…">` of a DOM dump.
fn tags<'a>(dom: &'a str, kind: &str) -> Vec<&'a str> {
    let open = format!("<g class=\"{kind}");
    dom.match_indices(&open)
        .filter_map(|(i, _)| dom[i..].split_once('>').map(|(tag, _)| tag))
        .collect()
}

fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let key = format!(" {name}=\"");
    let start = tag.find(&key)? + key.len();
    tag[start..].split_once('"').map(|(v, _)| v)
}

fn browser(mesh: &Mesh, dash: &Dashboard) {
    let Some(exe) = chromium() else {
        println!(
            "SKIPPED the browser part: no `chromium` on PATH (Debian: apt-get install chromium; .ci/run installs it)"
        );
        return;
    };
    let _traffic = Traffic::start(mesh);
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR"));

    let dom = run_chromium(
        &exe,
        &[
            "--virtual-time-budget=8000".into(),
            "--dump-dom".into(),
            dash.url(""),
        ],
        Duration::from_secs(90),
    );
    let nodes: Vec<&str> = tags(&dom, "node")
        .into_iter()
        .filter_map(|t| attr(t, "data-workload"))
        .collect();
    for w in ["web", "api", "db"] {
        assert!(
            nodes.contains(&w),
            "no node {w} in the page: {nodes:?}\n{dom}"
        );
    }
    let edges = tags(&dom, "edge");
    let web_db = edges
        .iter()
        .find(|t| attr(t, "data-src") == Some("web") && attr(t, "data-dst") == Some("db"))
        .unwrap_or_else(|| panic!("no web -> db edge in the page:\n{dom}"));
    println!("web -> db in the page: {web_db}>");
    let denied: u64 = attr(web_db, "data-denied")
        .and_then(|d| d.parse().ok())
        .unwrap_or(0);
    assert!(denied >= 5, "web -> db is not marked denied: {web_db}");
    assert!(
        attr(web_db, "class").is_some_and(|c| c.split(' ').any(|c| c == "denied")),
        "{web_db}"
    );
    assert_eq!(attr(web_db, "data-secured"), Some("true"), "{web_db}");
    let web_api = edges
        .iter()
        .find(|t| attr(t, "data-src") == Some("web") && attr(t, "data-dst") == Some("api"))
        .unwrap_or_else(|| panic!("no web -> api edge in the page:\n{dom}"));
    assert_eq!(attr(web_api, "data-denied"), Some("0"), "{web_api}");
    assert!(
        dom.contains("<tr data-workload=\"api\""),
        "no row for api in the table"
    );

    // A workload's page: its describe, and its live tap connected.
    let dom = run_chromium(
        &exe,
        &[
            "--virtual-time-budget=6000".into(),
            "--dump-dom".into(),
            dash.url("#/workload/db"),
        ],
        Duration::from_secs(90),
    );
    assert!(
        dom.contains("demo/db-from-api"),
        "db's policy is not on its page:\n{dom}"
    );
    assert!(
        dom.contains("id=\"tap-status\">tapping db"),
        "db's tap is not connected:\n{dom}"
    );
    println!(
        "db's page shows {} tapped requests",
        dom.matches("<tr class=\"deny\"").count() + dom.matches("<tr class=\"\"").count()
    );

    for (fragment, file) in [("", "dashboard.png"), ("#/workload/db", "dashboard-db.png")] {
        let path = out_dir.join(file);
        let _ = std::fs::remove_file(&path);
        run_chromium(
            &exe,
            &[
                "--virtual-time-budget=6000".into(),
                "--window-size=1280,900".into(),
                format!("--screenshot={}", path.display()),
                dash.url(fragment),
            ],
            Duration::from_secs(90),
        );
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        assert!(
            size > 10_000,
            "no screenshot at {} ({size} bytes)",
            path.display()
        );
        println!("screenshot of the dashboard{fragment}: {}", path.display());
    }
}
