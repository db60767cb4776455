//! Harness for end-to-end tests: runs `palisade up` on a generated mesh file with free ports in
//! a temp dir, waits for `mesh ready`, and stops it (SIGTERM, then SIGKILL) when dropped.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

pub fn palisade() -> &'static str {
    env!("CARGO_BIN_EXE_palisade")
}

/// A port that was free a moment ago, below the ephemeral range (see `palisade::cmd::free_port`).
pub fn free_port() -> u16 {
    palisade::cmd::free_port().expect("a free port on 127.0.0.1")
}

pub struct WorkloadSpec {
    pub name: &'static str,
    pub labels: &'static str,
    pub app: bool,
    pub upstreams: Vec<(&'static str, u16)>,
    pub extra_command: Vec<String>,
    /// The test runs this workload's app itself on `Ports::app` (no `command`).
    pub external_app: bool,
}

impl WorkloadSpec {
    pub fn demo(
        name: &'static str,
        labels: &'static str,
        upstreams: Vec<(&'static str, u16)>,
    ) -> Self {
        WorkloadSpec {
            name,
            labels,
            app: true,
            upstreams,
            extra_command: vec![],
            external_app: false,
        }
    }

    pub fn external(name: &'static str, labels: &'static str) -> Self {
        WorkloadSpec {
            name,
            labels,
            app: false,
            upstreams: vec![],
            extra_command: vec![],
            external_app: true,
        }
    }
}

pub struct Ports {
    pub app: u16,
    pub inbound: u16,
    pub admin: u16,
    pub upstreams: Vec<(String, u16)>,
}

pub struct MeshSpec {
    pub lifetime: &'static str,
    pub default_policy: &'static str,
    pub workloads: Vec<WorkloadSpec>,
    /// (name, port, selector, protocol)
    pub services: Vec<(&'static str, u16, &'static str, &'static str)>,
}

pub struct Mesh {
    pub dir: tempfile::TempDir,
    pub mesh_file: PathBuf,
    pub policies: PathBuf,
    pub state: PathBuf,
    pub ports: Vec<(String, Ports)>,
    pub cp_port: u16,
    pub child: Option<Child>,
    pub stdout: mpsc::Receiver<String>,
}

impl MeshSpec {
    pub fn render(&self, cp_port: u16, ports: &[(String, Ports)]) -> String {
        let mut s = format!(
            "trustDomain: cluster.local\ncertificateLifetime: {}\ncontrolPlane: {{ port: {cp_port} }}\ndefaultPolicy: {}\npolicies: policies/\nworkloads:\n",
            self.lifetime, self.default_policy
        );
        for (w, (_, p)) in self.workloads.iter().zip(ports) {
            s.push_str(&format!(
                "  - name: {n}\n    namespace: demo\n    serviceAccount: {n}\n    labels: {{ {l} }}\n    inboundPort: {i}\n    adminPort: {a}\n",
                n = w.name,
                l = w.labels,
                i = p.inbound,
                a = p.admin
            ));
            if w.app {
                let mut cmd = vec![
                    "palisade".to_string(),
                    "demo-app".into(),
                    "--listen".into(),
                    format!("127.0.0.1:{}", p.app),
                ];
                cmd.extend(w.extra_command.iter().cloned());
                let quoted: Vec<String> = cmd.iter().map(|c| format!("{c:?}")).collect();
                s.push_str(&format!(
                    "    command: [{}]\n    appPort: {}\n",
                    quoted.join(", "),
                    p.app
                ));
            } else if w.external_app {
                s.push_str(&format!("    appPort: {}\n", p.app));
            }
            if !p.upstreams.is_empty() {
                s.push_str("    upstreams:\n");
                for ((svc, port), (_, local)) in w.upstreams.iter().zip(&p.upstreams) {
                    s.push_str(&format!(
                        "      - {{ service: {svc}, port: {port}, localPort: {local} }}\n"
                    ));
                }
            }
        }
        s.push_str("services:\n");
        for (name, port, sel, proto) in &self.services {
            s.push_str(&format!(
                "  - {{ name: {name}, namespace: demo, port: {port}, selector: {{ {sel} }}, protocol: {proto} }}\n"
            ));
        }
        s
    }

    /// Writes the mesh file and policies and starts `palisade up`; waits for `mesh ready`.
    pub fn start(self, policies: &[(&str, &str)]) -> Mesh {
        let ports = self.allocate();
        self.start_with_ports(ports, policies)
    }

    pub fn allocate(&self) -> Vec<(String, Ports)> {
        self.workloads
            .iter()
            .map(|w| {
                (
                    w.name.to_string(),
                    Ports {
                        app: free_port(),
                        inbound: free_port(),
                        admin: free_port(),
                        upstreams: w
                            .upstreams
                            .iter()
                            .map(|(s, _)| (s.to_string(), free_port()))
                            .collect(),
                    },
                )
            })
            .collect()
    }

    /// Starts with pre-allocated ports (so the test can start external apps first).
    pub fn start_with_ports(self, ports: Vec<(String, Ports)>, policies: &[(&str, &str)]) -> Mesh {
        let mut mesh = self.launch(free_port(), ports, policies);
        mesh.wait_line("mesh ready", Duration::from_secs(90));
        mesh
    }

    /// Writes the mesh file and policies and starts `palisade up` with the control plane on
    /// `cp_port`, without waiting for anything. What `up` prints, on stdout and stderr, is
    /// echoed to the test's output and readable through `Mesh::stdout`.
    pub fn launch(
        self,
        cp_port: u16,
        ports: Vec<(String, Ports)>,
        policies: &[(&str, &str)],
    ) -> Mesh {
        self.launch_with(cp_port, ports, policies, &[])
    }

    /// [`MeshSpec::launch`] with extra arguments for `up`.
    pub fn launch_with(
        self,
        cp_port: u16,
        ports: Vec<(String, Ports)>,
        policies: &[(&str, &str)],
        extra: &[&str],
    ) -> Mesh {
        let dir = tempfile::tempdir().expect("tempdir");
        let mesh_file = dir.path().join("mesh.yaml");
        std::fs::write(&mesh_file, self.render(cp_port, &ports)).expect("write mesh");
        let pol = dir.path().join("policies");
        std::fs::create_dir_all(&pol).expect("policies dir");
        for (name, text) in policies {
            std::fs::write(pol.join(name), text).expect("write policy");
        }
        let state = dir.path().join("state");
        let mut child = Command::new(palisade())
            .arg("up")
            .arg("--mesh")
            .arg(&mesh_file)
            .arg("--state-dir")
            .arg(&state)
            .args(extra)
            .env("PALISADE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn palisade up");
        let (tx, rx) = mpsc::channel();
        forward_lines(child.stdout.take().expect("stdout"), tx.clone());
        forward_lines(child.stderr.take().expect("stderr"), tx);
        Mesh {
            dir,
            mesh_file,
            policies: pol,
            state,
            ports,
            cp_port,
            child: Some(child),
            stdout: rx,
        }
    }
}

/// Echoes each line of `out` to the test's output and sends it on `tx`, until either ends.
fn forward_lines(out: impl std::io::Read + Send + 'static, tx: mpsc::Sender<String>) {
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            println!("[up] {line}");
            if tx.send(line).is_err() {
                return;
            }
        }
    });
}

impl Mesh {
    pub fn wait_line(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(_) => {
                    let logs = self.logs();
                    panic!("no line containing {needle:?} within {timeout:?}\n{logs}");
                }
            }
        }
    }

    /// Waits for `up` to exit on its own, for at most `timeout` (then kills it and fails the
    /// test), and returns its status with every line it printed.
    pub fn wait_exit(&mut self, timeout: Duration) -> (std::process::ExitStatus, Vec<String>) {
        let mut child = self.child.take().expect("palisade up is running");
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(st) = child.try_wait().expect("wait for palisade up") {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("palisade up was still running after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(25));
        };
        // Its output ends with it: the pipes close once it is gone (bounded all the same).
        let mut lines = Vec::new();
        let drained_by = Instant::now() + Duration::from_secs(5);
        while let Some(left) = drained_by.checked_duration_since(Instant::now()) {
            match self.stdout.recv_timeout(left) {
                Ok(line) => lines.push(line),
                Err(_) => break,
            }
        }
        (status, lines)
    }

    pub fn logs(&self) -> String {
        let mut s = String::new();
        if let Ok(rd) = std::fs::read_dir(self.state.join("logs")) {
            for e in rd.flatten() {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(30).collect();
                s.push_str(&format!("== {}\n", e.path().display()));
                for l in tail.into_iter().rev() {
                    s.push_str(l);
                    s.push('\n');
                }
            }
        }
        s
    }

    pub fn ports(&self, workload: &str) -> &Ports {
        &self
            .ports
            .iter()
            .find(|(n, _)| n == workload)
            .expect("workload")
            .1
    }

    pub fn upstream(&self, workload: &str, service: &str) -> SocketAddr {
        let p = self.ports(workload);
        let port = p
            .upstreams
            .iter()
            .find(|(s, _)| s == service)
            .expect("upstream")
            .1;
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    pub fn admin(&self, workload: &str) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.ports(workload).admin))
    }

    pub fn app(&self, workload: &str) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.ports(workload).app))
    }

    /// The pid of `workload`'s proxy, as mesh.json names it.
    pub fn proxy_pid(&self, workload: &str) -> Option<u64> {
        self.mesh_json()["workloads"]
            .as_array()?
            .iter()
            .find(|w| w["name"] == workload)?["proxyPid"]
            .as_u64()
    }

    pub fn mesh_json(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(self.state.join("mesh.json")).expect("mesh.json");
        serde_json::from_str(&text).expect("mesh.json is JSON")
    }

    pub fn write_policy(&self, name: &str, text: &str) {
        let tmp = self.policies.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).expect("write policy");
        std::fs::rename(&tmp, self.policies.join(name)).expect("rename policy");
    }

    pub fn remove_policy(&self, name: &str) {
        std::fs::remove_file(self.policies.join(name)).expect("remove policy");
    }

    pub fn metrics(&self, workload: &str) -> String {
        http_get(self.admin(workload), "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default()
    }

    /// Sum of the samples of a metric whose line contains every `needle`.
    pub fn metric_sum(&self, workload: &str, name: &str, needles: &[&str]) -> f64 {
        metric_sum(&self.metrics(workload), name, needles)
    }

    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return child.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn metric_sum(text: &str, name: &str, needles: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.starts_with(name)
                && l[name.len()..].starts_with(['{', ' '])
                && needles.iter().all(|n| l.contains(n))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A blocking HTTP/1.1 GET with `Connection: close`; returns (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http_request(addr, "GET", path, &[])
}

pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("Content-Length: 0\r\n\r\n");
    s.write_all(req.as_bytes())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad response: {text:?}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    // Responses may be chunked; tests only look for substrings, so the chunk framing is fine.
    Ok((status, body))
}

/// Polls `f` until it returns true or `timeout` passes; returns whether it did.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    f()
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The demo mesh of deploy/local (its workloads, services and policies) on free ports, with
/// `extra` policy files (name, YAML) beside the demo's.
pub fn demo_mesh_with(extra: &[(&str, &str)]) -> Mesh {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/local/policies");
    let demo: Vec<(&str, String)> = ["api.yaml", "db.yaml", "mesh.yaml"]
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(dir.join(f)).expect("a demo policy");
            (*f, text)
        })
        .collect();
    let policies: Vec<(&str, &str)> = demo
        .iter()
        .map(|(n, t)| (*n, t.as_str()))
        .chain(extra.iter().copied())
        .collect();
    MeshSpec {
        lifetime: "1h",
        default_policy: "allow",
        workloads: vec![
            WorkloadSpec::demo(
                "web",
                "app: web",
                vec![("api.demo", 8080), ("db.demo", 5432)],
            ),
            WorkloadSpec::demo("api", "app: api", vec![("db.demo", 5432)]),
            WorkloadSpec::demo("db", "app: db", vec![]),
        ],
        services: vec![
            ("api", 8080, "app: api", "http"),
            ("db", 5432, "app: db", "http"),
        ],
    }
    .start(&policies)
}

/// Requests in a loop on a background thread (a new connection each) until stopped or
/// `limit` passes; counts successes (200) and failures, and keeps the first few errors.
pub struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    handle: Option<std::thread::JoinHandle<Vec<String>>>,
}

impl Load {
    pub fn start(addr: SocketAddr, path: &'static str, limit: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let (s, o, f) = (stop.clone(), ok.clone(), failed.clone());
        let handle = std::thread::spawn(move || {
            let mut errors = Vec::new();
            let deadline = Instant::now() + limit;
            while !s.load(Ordering::Relaxed) && Instant::now() < deadline {
                match http_get(addr, path) {
                    Ok((200, _)) => {
                        o.fetch_add(1, Ordering::Relaxed);
                    }
                    other => {
                        f.fetch_add(1, Ordering::Relaxed);
                        if errors.len() < 5 {
                            errors.push(format!("{other:?}"));
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            errors
        });
        Load {
            stop,
            ok,
            failed,
            handle: Some(handle),
        }
    }

    /// Successes so far.
    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Failures so far.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// Stops; (successes, failures, the first errors).
    pub fn finish(mut self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let errors = self
            .handle
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            errors,
        )
    }
}
