//! `palisade check` on the unhappy path, through the binary: one mesh started with
//! `palisade up`, broken one way at a time; each time `check` exits 1 with exactly one FAIL line
//! that names the problem, and passes again once it is repaired. Last, `up` is killed and the
//! `mesh.json` it leaves behind is reported as a mesh that is not running.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use support::*;

/// An app the test runs itself (the `ext` workload's): answers any HTTP request with 200,
/// until dropped, after which its port refuses connections.
struct ExternalApp {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl ExternalApp {
    fn start(addr: SocketAddr) -> ExternalApp {
        let listener = TcpListener::bind(addr).expect("bind the external app");
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut c, _)) => {
                        let _ = c.set_nonblocking(false);
                        let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
                        let mut buf = [0u8; 1024];
                        let _ = c.read(&mut buf);
                        let _ = c.write_all(
                            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n",
                        );
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        ExternalApp {
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for ExternalApp {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// SIGSTOPs a process; SIGCONTs it when dropped, so a failing test leaves nothing frozen.
struct Frozen(u64);

impl Frozen {
    fn new(pid: u64) -> Frozen {
        signal("-STOP", pid);
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        signal("-CONT", self.0);
    }
}

fn signal(sig: &str, pid: u64) {
    let st = Command::new("kill")
        .arg(sig)
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(st.success(), "kill {sig} {pid} failed");
}

fn process_exists(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next());
        !matches!(state, Some("Z" | "X"))
    })
}

/// Runs `palisade check` on the mesh's state dir: (exit code, stdout).
fn check(mesh: &Mesh) -> (Option<i32>, String) {
    let out = Command::new(palisade())
        .arg("check")
        .arg("--state-dir")
        .arg(&mesh.state)
        .output()
        .expect("run palisade check");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn fail_lines(report: &str) -> Vec<&str> {
    report.lines().filter(|l| l.starts_with("[FAIL]")).collect()
}

/// `check` exits 1 with exactly one FAIL line, which starts with `prefix` and contains every
/// one of `needles`; returns that line.
fn assert_one_failure(mesh: &Mesh, prefix: &str, needles: &[&str]) -> String {
    let (code, report) = check(mesh);
    assert_eq!(code, Some(1), "check should fail:\n{report}");
    let fails = fail_lines(&report);
    assert_eq!(fails.len(), 1, "exactly one FAIL line expected:\n{report}");
    let line = fails[0];
    assert!(line.starts_with(prefix), "{line}\n{report}");
    for n in needles {
        assert!(line.contains(n), "{line:?} should contain {n:?}\n{report}");
    }
    line.to_string()
}

fn assert_passes(mesh: &Mesh) {
    let (code, report) = check(mesh);
    assert_eq!(code, Some(0), "check should pass:\n{report}");
    assert!(fail_lines(&report).is_empty(), "{report}");
    assert!(report.contains("all checks passed"), "{report}");
}

fn cp_status(mesh: &Mesh) -> serde_json::Value {
    let addr: SocketAddr = mesh.mesh_json()["controlPlaneStatus"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .expect("controlPlaneStatus in mesh.json");
    http_get(addr, "/status")
        .ok()
        .and_then(|(_, body)| serde_json::from_str(&body).ok())
        .unwrap_or_default()
}

/// Waits until the control plane's status satisfies `f`, then until every running proxy holds
/// the config it serves (so no "config in sync" line lags behind the change).
fn wait_for_status(mesh: &Mesh, what: &str, f: impl Fn(&serde_json::Value) -> bool) {
    wait_for_status_of(mesh, what, &["web", "api", "ext"], f)
}

/// [`wait_for_status`] for the proxies of `synced` only.
fn wait_for_status_of(
    mesh: &Mesh,
    what: &str,
    synced: &[&str],
    f: impl Fn(&serde_json::Value) -> bool,
) {
    assert!(
        eventually(Duration::from_secs(15), || f(&cp_status(mesh))),
        "the control plane's status never showed {what}: {}\n{}",
        cp_status(mesh),
        mesh.logs()
    );
    let digests = cp_status(mesh)["configDigests"].clone();
    for &w in synced {
        let want = digests[w].as_u64();
        assert!(
            eventually(Duration::from_secs(15), || {
                http_get(mesh.admin(w), "/status")
                    .ok()
                    .and_then(|(_, b)| serde_json::from_str::<serde_json::Value>(&b).ok())
                    .and_then(|v| v["configDigest"].as_u64())
                    == want
            }),
            "{w}'s proxy never got the control plane's config {want:?}"
        );
    }
}

fn write_mesh_file(mesh: &Mesh, text: &str) {
    let tmp = mesh.mesh_file.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write mesh file");
    std::fs::rename(&tmp, &mesh.mesh_file).expect("replace mesh file");
}

#[test]
fn check_names_each_broken_part_of_the_mesh_then_a_stale_mesh_json() {
    let spec = MeshSpec {
        lifetime: "1h",
        default_policy: "allow",
        workloads: vec![
            WorkloadSpec::demo("web", "app: web", vec![("api.demo", 8080)]),
            WorkloadSpec::demo("api", "app: api", vec![]),
            WorkloadSpec::external("ext", "app: ext"),
        ],
        services: vec![("api", 8080, "app: api", "http")],
    };
    let ports = spec.allocate();
    let ext_addr = SocketAddr::from(([127, 0, 0, 1], ports[2].1.app));
    let mut ext_app = Some(ExternalApp::start(ext_addr));
    let mut mesh = spec.start_with_ports(ports, &[]);

    // Healthy: every check passes, and says what it checked. One call web -> api first, so
    // there is an mTLS connection between proxies whose key exchange check reports.
    let (status, _) = http_get(mesh.upstream("web", "api.demo"), "/").expect("web -> api");
    assert_eq!(status, 200);
    let (code, report) = check(&mesh);
    assert_eq!(code, Some(0), "{report}");
    for line in [
        "[pass] post-quantum mTLS: all 1 mTLS connections between proxies negotiated X25519MLKEM768",
        "[pass] config: generation 1 serving, no rejected change",
        "[pass] service api.demo: 1 endpoint(s): api",
        "[pass] web app:",
        "[pass] ext app:",
    ] {
        assert!(report.contains(line), "{line:?} missing:\n{report}");
    }
    // Remaining validity as people read it: "59m 58s" or "1h 0m", not "3599s".
    let prefix = "[pass] web certificate: spiffe://cluster.local/ns/demo/sa/web expires in ";
    let left = report
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no certificate line:\n{report}"));
    assert!(
        left == "1h 0m" || (left.starts_with("59m ") && left.ends_with('s')),
        "{left:?}"
    );

    // 1. A policy change the control plane rejects: the error text, until it is fixed.
    mesh.write_policy(
        "bad.yaml",
        "apiVersion: palisade.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: { name: no, namespace: demo }\nspec:\n  rules: [ {} ]\n",
    );
    wait_for_status(&mesh, "the rejection", |st| {
        st["lastRejection"]["error"].is_string()
    });
    assert_one_failure(
        &mesh,
        "[FAIL] config: the last change was rejected",
        &[
            "generation 1 keeps serving",
            "bad.yaml",
            "metadata.name: must be a string",
        ],
    );
    mesh.remove_policy("bad.yaml");
    wait_for_status(&mesh, "no rejection", |st| st["lastRejection"].is_null());
    assert_passes(&mesh);

    // 2. A service whose selector matches no workload.
    let original = std::fs::read_to_string(&mesh.mesh_file).expect("read mesh file");
    write_mesh_file(
        &mesh,
        &format!(
            "{original}  - {{ name: orphan, namespace: demo, port: 9090, selector: {{ app: nothing }}, protocol: http }}\n"
        ),
    );
    wait_for_status(&mesh, "the orphan service", |st| {
        st["services"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["name"] == "orphan"))
    });
    assert_one_failure(
        &mesh,
        "[FAIL] service orphan.demo: no endpoints",
        &["{app: nothing}", "namespace demo"],
    );

    // 3. A workload of the mesh with no running proxy: added to the mesh file while `up`
    // runs, with its admin port taken by something else, so `up` cannot start it.
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = squatter.local_addr().expect("addr").port();
    let ghost = original.replace(
        "services:\n",
        &format!(
            "  - {{ name: ghost, namespace: demo, labels: {{ app: ghost }}, inboundPort: {}, adminPort: {taken} }}\nservices:\n",
            free_port(),
        ),
    );
    write_mesh_file(&mesh, &ghost);
    wait_for_status(&mesh, "the ghost workload", |st| {
        st["workloads"]
            .as_array()
            .is_some_and(|w| w.iter().any(|w| w == "ghost"))
            && st["services"].as_array().is_some_and(|s| s.len() == 1)
    });
    drop(squatter);
    assert_one_failure(
        &mesh,
        "[FAIL] ghost proxy: no running proxy",
        &[
            "admin port",
            "does not answer",
            "`palisade up` is not running it",
        ],
    );

    // 3b. The other way round: a workload removed from the mesh file is stopped by `up`, and
    // the mesh checks clean without it.
    let start = original
        .find("  - name: ext\n")
        .expect("ext in the mesh file");
    let end = original
        .find("services:\n")
        .expect("services in the mesh file");
    let without_ext = format!("{}{}", &original[..start], &original[end..]);
    write_mesh_file(&mesh, &without_ext);
    wait_for_status_of(&mesh, "ext removed", &["web", "api"], |st| {
        st["workloads"].as_array().is_some_and(|w| w.len() == 2)
    });
    assert!(
        eventually(Duration::from_secs(20), || {
            let (code, _) = check(&mesh);
            code == Some(0)
        }),
        "check does not pass once ext is removed:\n{}",
        check(&mesh).1
    );

    write_mesh_file(&mesh, &original);
    wait_for_status(&mesh, "the original mesh", |st| {
        st["workloads"].as_array().is_some_and(|w| w.len() == 3)
    });
    assert_passes(&mesh);

    // 4. An app that accepts connections (the kernel does) but does not answer: frozen.
    let web_app_pid = mesh.mesh_json()["workloads"]
        .as_array()
        .and_then(|ws| ws.iter().find(|w| w["name"] == "web"))
        .and_then(|w| w["appPid"].as_u64())
        .expect("web's appPid in mesh.json");
    {
        let _frozen = Frozen::new(web_app_pid);
        assert_one_failure(
            &mesh,
            "[FAIL] web app:",
            &[
                &mesh.app("web").to_string(),
                "did not answer an HTTP request",
            ],
        );
    }
    assert!(
        eventually(Duration::from_secs(10), || http_get(mesh.app("web"), "/")
            .is_ok_and(|(s, _)| s == 200)),
        "web's app did not resume"
    );
    assert_passes(&mesh);

    // 5. An app that is not running at all: its port refuses connections.
    drop(ext_app.take());
    assert!(
        eventually(Duration::from_secs(5), || std::net::TcpStream::connect(
            ext_addr
        )
        .is_err()),
        "the external app still listens"
    );
    assert_one_failure(
        &mesh,
        "[FAIL] ext app:",
        &[&ext_addr.to_string(), "refuses connections"],
    );

    // 6. `up` killed outright: its mesh.json stays behind, its children stop on their own.
    let doc = mesh.mesh_json();
    let cp_pid = doc["controlPlanePid"].as_u64().expect("controlPlanePid");
    let mut up = mesh.child.take().expect("palisade up runs");
    up.kill().expect("SIGKILL palisade up");
    up.wait().expect("reap palisade up");
    assert!(
        eventually(Duration::from_secs(15), || !process_exists(cp_pid)
            && ["web", "api", "ext"]
                .iter()
                .all(|w| std::net::TcpStream::connect(mesh.admin(w)).is_err())),
        "the mesh's children outlived `up`"
    );
    assert!(mesh.state.join("mesh.json").exists(), "mesh.json is left");
    let line = assert_one_failure(&mesh, "[FAIL] mesh: mesh not running", &["is stale"]);
    assert!(
        line.contains(mesh.state.join("mesh.json").to_str().expect("utf-8")),
        "{line}"
    );
}
