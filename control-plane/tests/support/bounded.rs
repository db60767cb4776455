//! Bounded waits and free ports for the tests that run real proxies on a control plane.

use std::future::Future;
use std::time::{Duration, Instant};

/// Every wait in these tests ends by then.
pub const T: Duration = Duration::from_secs(15);

pub async fn within<F: Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(T, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out: {what}"),
    }
}

/// Polls `cond` every 20 ms until it holds; fails the test after [`T`].
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + T;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A port nothing listens on now. Never the same port twice in one process: the kernel can hand a just-released port out
/// again at once, and a mesh file with two workloads on one port is refused (CI saw it).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    for _ in 0..1000 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        if GIVEN.lock().expect("ports given").insert(port) {
            return port;
        }
    }
    panic!("no port not handed out before in 1000 tries");
}

/// Two control-plane replicas of the mesh at `mesh_path`, with one CA (the second reads the CA
/// the first created under `state_dir`): both, their addresses as a proxy is given them, and
/// the trust anchor's file.
pub async fn two_replicas(
    mesh_path: std::path::PathBuf,
    state_dir: std::path::PathBuf,
    tokens: std::collections::HashMap<String, String>,
) -> (
    palisade_control_plane::RunningControlPlane,
    palisade_control_plane::RunningControlPlane,
    palisade_proxy::control_plane::ControlPlaneAddrs,
    std::path::PathBuf,
) {
    let cfg = palisade_control_plane::ControlPlaneConfig {
        mesh_path,
        state_dir: state_dir.clone(),
        listen: Some("127.0.0.1:0".parse().expect("addr")),
        tokens,
        tokens_file: None,
        metrics_listen: None,
    };
    let cp1 = within("replica 1", palisade_control_plane::start(cfg.clone()))
        .await
        .expect("replica 1 starts");
    let cp2 = within("replica 2", palisade_control_plane::start(cfg))
        .await
        .expect("replica 2 starts");
    let addrs = palisade_proxy::control_plane::ControlPlaneAddrs::parse(&format!(
        "{},{}",
        cp1.addr(),
        cp2.addr()
    ))
    .expect("addrs");
    let bundle = state_dir
        .join("ca")
        .join(palisade_certs::ca::ROOT_CERT_FILE);
    (cp1, cp2, addrs, bundle)
}
