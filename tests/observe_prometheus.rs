//! `palisade stat`, `edges` and `cost` with `--prometheus`, against a real Prometheus (Debian's
//! `prometheus` package; `.ci/run` installs it) that the test runs on a temp dir and points at
//! the demo mesh's admin ports, scraping every second. Known traffic, then once Prometheus has
//! scraped every proxy after it: the counts from Prometheus over a window that covers all of
//! it are exactly those the proxies report since they started (raw counters at two instants,
//! not `increase()`, which would extrapolate). Without the prometheus binary the test says so
//! and passes.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use support::*;

const WEB: &str = "spiffe://cluster.local/ns/demo/sa/web";
const API: &str = "spiffe://cluster.local/ns/demo/sa/api";

/// The prometheus binary: `PALISADE_TEST_PROMETHEUS`, else the first `prometheus` on PATH or
/// in /usr/bin (Debian's).
fn prometheus_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PALISADE_TEST_PROMETHEUS") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin")])
        .map(|d| d.join("prometheus"))
        .find(|p| p.is_file())
}

/// A Prometheus the test started; killed (and waited for) when dropped.
struct Prometheus {
    child: Child,
    addr: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts `bin` scraping `targets` every second, on a free port, and waits until it is
    /// ready (bounded).
    fn start(bin: &Path, targets: &[String]) -> Prometheus {
        let dir = tempfile::tempdir().expect("tempdir");
        let quoted: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: palisade\n    static_configs:\n      - targets: [{}]\n",
            quoted.join(", ")
        );
        let config_file = dir.path().join("prometheus.yml");
        std::fs::write(&config_file, config).expect("write prometheus.yml");
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log file");
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        let p = Prometheus {
            child,
            addr,
            _dir: dir,
        };
        let ready = eventually(Duration::from_secs(30), || {
            matches!(http_get(p.addr, "/-/ready"), Ok((200, _)))
        });
        assert!(ready, "prometheus not ready within 30 s: {}", p.log());
        p
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// When Prometheus last scraped each proxy (unix seconds), if it has all three.
    fn last_scrapes(&self) -> Option<Vec<f64>> {
        let r = self.query("timestamp(palisade_proxy_start_time_seconds)")?;
        let times: Vec<f64> = r
            .iter()
            .filter_map(|s| s["value"][1].as_str()?.parse().ok())
            .collect();
        (times.len() == 3).then_some(times)
    }

    /// Waits (bounded) until Prometheus has scraped every proxy after `t`; returns the
    /// latest of those scrapes.
    fn scraped_after(&self, t: f64) -> f64 {
        let mut latest = 0.0;
        let done = eventually(Duration::from_secs(30), || {
            self.last_scrapes().is_some_and(|times| {
                latest = times.iter().copied().fold(0.0, f64::max);
                times.iter().all(|s| *s > t)
            })
        });
        assert!(
            done,
            "prometheus did not scrape the 3 proxies after {t} within 30 s: {:?}\n{}",
            self.query("up"),
            self.log()
        );
        latest
    }

    /// An instant query's result list (None when it cannot be asked or read).
    fn query(&self, q: &str) -> Option<Vec<Value>> {
        let path = format!("/api/v1/query?query={}", encode(q));
        let (status, body) = http_get(self.addr, &path).ok()?;
        if status != 200 {
            return None;
        }
        let doc: Value = serde_json::from_str(&body)
            .or_else(|_| serde_json::from_str(&dechunk(&body)))
            .ok()?;
        doc["data"]["result"].as_array().cloned()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A chunked HTTP/1.1 body without its framing.
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

fn run_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(palisade())
        .args(args)
        .current_dir(dir)
        .env_remove("PALISADE_STATE_DIR")
        .output()
        .expect("run palisade")
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

fn calls(mesh: &Mesh, from: &str, path: &str, n: usize, want: u16) {
    for i in 0..n {
        let (status, body) = http_get(mesh.app(from), path).expect("the demo app answers");
        assert_eq!(status, want, "{from} {path} #{i}: {body}");
    }
}

fn find<'a>(doc: &'a Value, list: &str, key: &str, name: &str) -> &'a Value {
    doc[list]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r[key] == name))
        .unwrap_or_else(|| panic!("no {key} {name:?} in {doc:#}"))
}

/// What must agree between two sources: everything but the rates and the window.
fn figures(row: &Value) -> Value {
    let mut r = row.clone();
    if let Some(o) = r.as_object_mut() {
        o.remove("rps");
    }
    r
}

#[test]
fn stat_edges_and_cost_from_prometheus_count_what_the_proxies_count() {
    let Some(bin) = prometheus_binary() else {
        println!(
            "skipped: no prometheus binary (apt-get install --no-install-recommends prometheus, or set PALISADE_TEST_PROMETHEUS)"
        );
        return;
    };
    let mesh = demo_mesh_with(&[]);
    let state = mesh.state.clone();
    let st = path_str(&state);
    let doc = mesh.mesh_json();
    let targets: Vec<String> = doc["workloads"]
        .as_array()
        .expect("workloads")
        .iter()
        .map(|w| w["adminAddr"].as_str().expect("adminAddr").to_string())
        .collect();
    assert_eq!(targets.len(), 3);
    let prom = Prometheus::start(&bin, &targets);
    let url = prom.url();

    // Known traffic: web -> api 12 times, web -> db 4 times (denied: 403), api -> db 3 times.
    calls(&mesh, "web", "/call/api", 12, 200);
    calls(&mesh, "web", "/call/db", 4, 403);
    calls(&mesh, "api", "/call/db", 3, 200);
    let traffic_end = unix_now();

    // Until Prometheus has scraped every proxy after the traffic (bounded).
    let after_round_1 = prom.scraped_after(traffic_end);

    let here = mesh.dir.path();
    // stat: the window (5m) covers all the traffic, so Prometheus's figures are the proxies'.
    let local = json(&run_in(
        here,
        &["stat", "--since-start", "-o", "json", "--state-dir", st],
    ));
    let remote = json(&run_in(
        here,
        &[
            "stat",
            "--prometheus",
            &url,
            "--window",
            "5m",
            "-o",
            "json",
            "--state-dir",
            st,
        ],
    ));
    println!("{remote:#}");
    assert_eq!(remote["sinceStart"], false);
    assert!(
        remote["window"].as_f64().is_some_and(|w| w > 0.0),
        "{remote:#}"
    );
    assert_eq!(remote["missing"], serde_json::json!([]), "{remote:#}");
    let names: Vec<&str> = remote["workloads"]
        .as_array()
        .expect("workloads")
        .iter()
        .filter_map(|w| w["name"].as_str())
        .collect();
    assert_eq!(
        names,
        ["web", "api", "db"],
        "the mesh file's order: {remote:#}"
    );
    for name in ["web", "api", "db"] {
        assert_eq!(
            figures(find(&remote, "workloads", "name", name)),
            figures(find(&local, "workloads", "name", name)),
            "{name}: from Prometheus {remote:#}\nfrom the proxies {local:#}"
        );
    }
    let api = find(&remote, "workloads", "name", "api");
    assert_eq!(api["requests"], 12, "{remote:#}");
    assert!(api["rps"].as_f64().is_some_and(|r| r > 0.0), "{api}");
    let db = find(&remote, "workloads", "name", "db");
    assert_eq!((&db["requests"], &db["denied"]), (&7.into(), &4.into()));

    // One workload, and a name the mesh does not have.
    let only = json(&run_in(
        here,
        &[
            "stat",
            "db",
            "--prometheus",
            &url,
            "--window",
            "5m",
            "-o",
            "json",
            "--state-dir",
            st,
        ],
    ));
    assert_eq!(
        only["workloads"].as_array().map(Vec::len),
        Some(1),
        "{only:#}"
    );

    // edges: the same edges, the same counts.
    let local = json(&run_in(
        here,
        &["edges", "--since-start", "-o", "json", "--state-dir", st],
    ));
    let remote = json(&run_in(
        here,
        &[
            "edges",
            "--prometheus",
            &url,
            "--window",
            "5m",
            "-o",
            "json",
            "--state-dir",
            st,
        ],
    ));
    println!("{remote:#}");
    let edges = |doc: &Value| -> Vec<Value> {
        doc["edges"]
            .as_array()
            .expect("edges")
            .iter()
            .map(figures)
            .collect()
    };
    assert_eq!(edges(&remote), edges(&local), "{remote:#}\n{local:#}");
    assert_eq!(edges(&remote).len(), 3, "{remote:#}");
    let web_db = remote["edges"]
        .as_array()
        .and_then(|e| e.iter().find(|r| r["src"] == "web" && r["dst"] == "db"))
        .unwrap_or_else(|| panic!("no web -> db in {remote:#}"));
    assert_eq!(
        (&web_db["requests"], &web_db["denied"]),
        (&4.into(), &4.into())
    );
    assert_eq!(web_db["secured"], true);

    // On a cluster there is no mesh.json: the proxies are named by their target labels (here
    // the `instance`, their admin address), with the same counts.
    let no_mesh = tempfile::tempdir().expect("tempdir");
    let remote = json(&run_in(
        no_mesh.path(),
        &["stat", "--prometheus", &url, "--window", "5m", "-o", "json"],
    ));
    let api_admin = mesh.admin("api").to_string();
    assert_eq!(
        find(&remote, "workloads", "name", &api_admin)["requests"],
        12,
        "{remote:#}"
    );
    let remote = json(&run_in(
        no_mesh.path(),
        &[
            "edges",
            "--prometheus",
            &url,
            "--window",
            "5m",
            "-o",
            "json",
        ],
    ));
    let db_admin = mesh.admin("db").to_string();
    let web_db = remote["edges"]
        .as_array()
        .and_then(|e| {
            e.iter()
                .find(|r| r["srcIdentity"] == WEB && r["dst"] == db_admin.as_str())
        })
        .unwrap_or_else(|| panic!("no web -> db in {remote:#}"));
    assert_eq!(
        (&web_db["requests"], &web_db["denied"]),
        (&4.into(), &4.into())
    );

    // cost: the same requests as the proxies count (CPU moves on with every scrape).
    let local = json(&run_in(here, &["cost", "-o", "json", "--state-dir", st]));
    let remote = json(&run_in(
        here,
        &[
            "cost",
            "--prometheus",
            &url,
            "--window",
            "5m",
            "-o",
            "json",
            "--state-dir",
            st,
        ],
    ));
    println!("{remote:#}");
    assert_eq!(remote["source"], "prometheus");
    assert_eq!(remote["window"], 300.0);
    let requests = |doc: &Value, id: &str| find(doc, "rows", "identity", id)["requests"].clone();
    assert_eq!(requests(&remote, WEB), 16, "{remote:#}");
    assert_eq!(requests(&remote, API), 3, "{remote:#}");
    assert_eq!(requests(&local, WEB), requests(&remote, WEB));
    assert!(
        find(&remote, "rows", "identity", WEB)["cpuSeconds"]
            .as_f64()
            .is_some_and(|c| c > 0.0),
        "{remote:#}"
    );
    let table = run_in(
        here,
        &[
            "cost",
            "--prometheus",
            &url,
            "--window",
            "5m",
            "--state-dir",
            st,
        ],
    );
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.status.success(),
        "{}",
        String::from_utf8_lossy(&table.stderr)
    );
    assert!(text.contains("over the last 5m"), "{text}");

    // A window that starts after the first round: only the second round counts, exactly (the
    // raw counters at both ends). Its start must fall after a scrape that followed round 1
    // and before round 2: Prometheus scrapes every proxy once more after `after_round_1`
    // (a gap of at least a scrape interval), then round 2 starts.
    prom.scraped_after(after_round_1 + 1.5);
    let round_2 = unix_now();
    calls(&mesh, "web", "/call/api", 5, 200);
    calls(&mesh, "web", "/call/db", 2, 403);
    prom.scraped_after(unix_now());
    // The window's start: just after `after_round_1`, computed right before each command
    // (launching it only moves the start later, towards `round_2`).
    let windowed = |cmd: &str| -> (Value, f64) {
        let secs = unix_now() - (after_round_1 + 0.1);
        let window = format!("{}ms", (secs * 1000.0) as u64);
        let args = [
            cmd,
            "--prometheus",
            &url,
            "--window",
            &window,
            "-o",
            "json",
            "--state-dir",
            st,
        ];
        (json(&run_in(here, &args)), secs)
    };
    let (s, asked) = windowed("stat");
    let (e, _) = windowed("edges");
    println!(
        "{:.2} s between round 1's scrape and round 2:\n{s:#}\n{e:#}",
        round_2 - after_round_1
    );
    let api = find(&s, "workloads", "name", "api");
    assert_eq!(api["requests"], 5, "{s:#}");
    let db = find(&s, "workloads", "name", "db");
    assert_eq!(
        (&db["requests"], &db["denied"]),
        (&2.into(), &2.into()),
        "{s:#}"
    );
    let secs = s["window"].as_f64().expect("a window");
    assert!(secs > 0.0 && secs <= asked + 1.5, "{s:#}");
    assert!(api["rps"].as_f64().is_some_and(|r| r > 0.0), "{api}");
    let web_api = e["edges"]
        .as_array()
        .and_then(|e| e.iter().find(|r| r["src"] == "web" && r["dst"] == "api"))
        .unwrap_or_else(|| panic!("no web -> api in {e:#}"));
    assert_eq!(web_api["requests"], 5, "{e:#}");
    let api_db = e["edges"]
        .as_array()
        .and_then(|e| e.iter().find(|r| r["src"] == "api" && r["dst"] == "db"))
        .unwrap_or_else(|| panic!("no api -> db in {e:#}"));
    assert_eq!(
        api_db["requests"], 0,
        "quiet in the window, still listed: {e:#}"
    );

    // Errors: one sentence each.
    let out = run_in(
        here,
        &[
            "stat",
            "--prometheus",
            &url,
            "--since-start",
            "--state-dir",
            st,
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--since-start"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    let out = run_in(
        here,
        &[
            "stat",
            "nosuch",
            "--prometheus",
            &url,
            "--window",
            "5m",
            "--state-dir",
            st,
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("no workload named \"nosuch\""), "{stderr}");
    let gone = format!("http://127.0.0.1:{}", free_port());
    for cmd in ["stat", "edges", "cost"] {
        let out = run_in(no_mesh.path(), &[cmd, "--prometheus", &gone]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{cmd}");
        assert!(
            stderr.contains("cannot reach Prometheus"),
            "{cmd}: {stderr}"
        );
        assert_eq!(stderr.lines().count(), 1, "{cmd}: {stderr}");
    }
    let out = run_in(
        no_mesh.path(),
        &["stat", "--prometheus", &format!("{url}/nosuchprefix")],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}
