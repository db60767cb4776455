//! What the load goes through: the mesh (`palisade up` of the `palisade` binary on a
//! generated mesh file, a client-side and a server-side proxy) and, with `--relays`, two plain
//! TCP relays (`palisade-bench relay`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::AsyncBufReadExt;

use super::BenchProtocol;

pub(crate) struct Mesh {
    pub(crate) child: tokio::process::Child,
    pub(crate) client_addr: SocketAddr,
    pub(crate) proxies: Vec<(String, u32)>,
    /// Each proxy's admin address (`/metrics`, `/ready`), in the order of `proxies`.
    pub(crate) admins: Vec<(String, SocketAddr)>,
    _tmp: Option<tempfile::TempDir>,
}

/// Two `palisade-bench relay` processes (this binary) in a row in front of the app.
pub(super) struct Relays {
    _children: Vec<tokio::process::Child>,
    pub(super) addr: SocketAddr,
    pub(super) procs: Vec<(String, u32)>,
}

pub(super) async fn start_relays(app: SocketAddr) -> anyhow::Result<Relays> {
    let mut children = Vec::new();
    let mut procs = Vec::new();
    let mut to = app;
    for name in ["relay-2", "relay-1"] {
        let mut child = tokio::process::Command::new(std::env::current_exe()?)
            .arg("relay")
            .arg("--to")
            .arg(to.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start a relay")?;
        let stdout = child.stdout.take().context("relay stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .context("the relay did not say where it listens within 10s")??
            .context("the relay exited before listening")?;
        to = line
            .strip_prefix("listening on ")
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("unexpected relay output {line:?}"))?;
        procs.push((name.to_string(), child.id().context("relay pid")?));
        children.push(child);
    }
    procs.reverse();
    Ok(Relays {
        _children: children,
        addr: to,
        procs,
    })
}

/// The sidecar binary the bench runs: the one asked for, else `palisade-proxy` beside the
/// `palisade` whose mesh is measured (the same build: an A/B run with `--palisade-bin` gets
/// that build's sidecar), else beside this binary, else `None` for the `palisade` binary's own
/// `proxy` command.
pub(crate) fn proxy_bin(asked: Option<&Path>, palisade: &Path) -> Option<PathBuf> {
    if let Some(p) = asked {
        return Some(p.to_path_buf());
    }
    let beside = palisade.with_file_name("palisade-proxy");
    if beside.is_file() {
        return Some(beside);
    }
    crate::support::sibling("palisade-proxy")
}

/// `env` is set on `palisade up`, whose sidecars inherit it: a `PALISADE_*` proxy setting
/// there applies to both proxies.
pub(crate) async fn start_mesh(
    palisade: &Path,
    app: SocketAddr,
    protocol: BenchProtocol,
    state_dir: Option<&Path>,
    proxy_bin: Option<&Path>,
    env: &[(&str, String)],
) -> anyhow::Result<Mesh> {
    let (tmp, dir) = match state_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            (None, d.to_path_buf())
        }
        None => {
            let t = tempfile::tempdir()?;
            let p = t.path().to_path_buf();
            (Some(t), p)
        }
    };
    let local = crate::support::free_port()?;
    let svc_protocol = match protocol {
        BenchProtocol::Tcp => "opaque",
        BenchProtocol::Http2 => "http2",
        _ => "http",
    };
    let mesh = format!(
        "trustDomain: cluster.local\n\
         certificateLifetime: 1h\n\
         controlPlane: {{ port: {cp} }}\n\
         defaultPolicy: allow\n\
         workloads:\n\
         \x20 - {{ name: client, namespace: bench, serviceAccount: client, labels: {{ app: client }}, inboundPort: {ci}, adminPort: {ca},\n\
         \x20     upstreams: [ {{ service: server.bench, port: 8080, localPort: {local} }} ] }}\n\
         \x20 - {{ name: server, namespace: bench, serviceAccount: server, labels: {{ app: server }}, appPort: {app}, inboundPort: {si}, adminPort: {sa} }}\n\
         services:\n\
         \x20 - {{ name: server, namespace: bench, port: 8080, selector: {{ app: server }}, protocol: {svc_protocol} }}\n",
        cp = crate::support::free_port()?,
        ci = crate::support::free_port()?,
        ca = crate::support::free_port()?,
        si = crate::support::free_port()?,
        sa = crate::support::free_port()?,
        app = app.port(),
    );
    let mesh_path = dir.join("mesh.yaml");
    std::fs::write(&mesh_path, mesh)?;
    let state = dir.join("state");
    let log = std::fs::File::create(dir.join("up.log"))?;
    let mut up = tokio::process::Command::new(palisade);
    up.arg("up")
        .arg("--mesh")
        .arg(&mesh_path)
        .arg("--state-dir")
        .arg(&state);
    if let Some(bin) = proxy_bin {
        up.arg("--proxy-bin").arg(bin);
    }
    for (k, v) in env {
        up.env(k, v);
    }
    let mut child = up
        .env("PALISADE_WATCH_PARENT", "1")
        .env(
            "PALISADE_LOG",
            std::env::var("PALISADE_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .context("cannot start the mesh")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let json = state.join("mesh.json");
    let doc: serde_json::Value = loop {
        if let Ok(text) = std::fs::read_to_string(&json)
            && let Ok(v) = serde_json::from_str(&text)
        {
            break v;
        }
        if let Some(status) = child.try_wait()? {
            let why = format!("palisade up exited before the bench mesh was ready ({status})");
            return Err(mesh_failed(tmp, &dir, &why));
        }
        if Instant::now() > deadline {
            return Err(mesh_failed(
                tmp,
                &dir,
                "the bench mesh was not ready within 60s",
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut proxies = Vec::new();
    let mut admins = Vec::new();
    for w in doc["workloads"].as_array().into_iter().flatten() {
        if let (Some(name), Some(pid)) = (w["name"].as_str(), w["proxyPid"].as_u64()) {
            proxies.push((name.to_string(), pid as u32));
            if let Some(admin) = w["adminAddr"].as_str().and_then(|a| a.parse().ok()) {
                admins.push((name.to_string(), admin));
            }
        }
    }
    Ok(Mesh {
        child,
        client_addr: SocketAddr::from(([127, 0, 0, 1], local)),
        proxies,
        admins,
        _tmp: tmp,
    })
}

/// The error for a mesh that did not come up: the generated mesh file and the logs are kept
/// (a temporary directory would be gone by the time anyone reads the message), and the last
/// line `palisade up` logged says why, most of the time.
fn mesh_failed(tmp: Option<tempfile::TempDir>, dir: &Path, why: &str) -> anyhow::Error {
    if let Some(t) = tmp {
        let _ = t.keep();
    }
    let log = dir.join("up.log");
    let last = std::fs::read_to_string(&log).ok().and_then(|t| {
        t.lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .map(str::to_owned)
    });
    match last {
        Some(line) => anyhow::anyhow!("{why}; see {}; its last line: {line}", log.display()),
        None => anyhow::anyhow!("{why}; see {}", log.display()),
    }
}
