//! `palisade up`: the local mesh. Starts the control plane, then for each workload of the mesh
//! file its app (if it has a `command`) and its sidecar, all as child processes; prints the
//! table, waits until every proxy holds a certificate and its config (`mesh ready`), writes
//! `STATE_DIR/mesh.json`, and on SIGINT/SIGTERM drains and stops every child.
//!
//! Children watch their parent (`PALISADE_WATCH_PARENT`), so even a killed `up` leaves no
//! orphans. The control plane is restarted if it dies (proxies keep serving meanwhile); if an
//! app or a proxy dies, the mesh is stopped and `up` exits non-zero.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use palisade_control_plane::mesh::{Mesh, Workload};
use tokio::process::{Child, Command};

use super::http_util;

#[derive(clap::Args)]
pub struct UpArgs {
    /// The mesh file.
    #[arg(long, env = "PALISADE_MESH", default_value = "deploy/local/mesh.yaml")]
    pub mesh: PathBuf,
    /// Where certificates, tokens, logs and mesh.json go.
    #[arg(long, env = "PALISADE_STATE_DIR", default_value = ".palisade")]
    pub state_dir: PathBuf,
    /// How long to wait for every proxy to be ready.
    #[arg(long, default_value = "60s", value_parser = super::proxy::duration)]
    pub ready_timeout: Duration,
    /// The sidecar binary to run for each workload (`palisade-proxy`, as a sidecar image ships
    /// it); by default this binary's `proxy` command, which can never be out of date with it.
    #[arg(long, env = "PALISADE_PROXY_BIN")]
    pub proxy_bin: Option<PathBuf>,
}

struct Proc {
    label: String,
    child: Child,
}

struct WorkloadProcs {
    name: String,
    admin: SocketAddr,
    app: Option<Proc>,
    proxy: Proc,
}

pub fn run(args: UpArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(up(args))
}

fn exe() -> anyhow::Result<PathBuf> {
    std::env::current_exe().context("cannot find the palisade binary")
}

fn random_token() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Secrets are replaced whole (temp file + rename, 0600): the control plane may read the tokens
/// file at any moment, and nothing planted at the path is written through.
fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    palisade_certs::secure_fs::write_private_atomic(path, contents.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Gives `w`'s proxy a fresh bootstrap token, right before it starts: its own token file, and
/// the tokens file the control plane re-reads when a proxy presents a token. A token
/// certifies one proxy start, so every start needs a new one.
fn issue_token(
    w: &Workload,
    p: &Paths,
    tokens: &mut BTreeMap<String, String>,
) -> anyhow::Result<()> {
    let t = random_token();
    write_private(&p.state.join("tokens").join(&w.name), &t)?;
    tokens.insert(w.name.clone(), t);
    write_private(&p.tokens, &serde_json::to_string_pretty(tokens)?)
}

/// The state directory holds the bootstrap tokens and the CA: created 0700 if missing, and
/// refused (one sentence naming the path) if another user owns it, `ca/` or `tokens/`, or can
/// write to them, or if a CA key there is not ours and 0600. A directory pre-created by another
/// local user would otherwise receive our tokens, and a CA planted in it would become the mesh's
/// trust anchor.
fn prepare_state_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    use palisade_certs::secure_fs::{ensure_private_dir, read_private_key};
    ensure_private_dir(dir)?;
    let state =
        std::fs::canonicalize(dir).with_context(|| format!("cannot resolve {}", dir.display()))?;
    ensure_private_dir(&state.join("tokens"))?;
    let ca = state.join(palisade_control_plane::CA_DIR);
    ensure_private_dir(&ca)?;
    for key in [
        palisade_certs::ca::ISSUER_KEY_FILE,
        palisade_certs::ca::ROOT_KEY_FILE,
    ] {
        let path = ca.join(key);
        if std::fs::symlink_metadata(&path).is_ok() {
            read_private_key(&path)?;
        }
    }
    Ok(state)
}

fn log_file(dir: &Path, name: &str) -> anyhow::Result<(Stdio, Stdio)> {
    let path = dir.join(format!("{name}.log"));
    let f = std::fs::File::create(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    Ok((Stdio::from(f.try_clone()?), Stdio::from(f)))
}

struct Paths {
    mesh: PathBuf,
    /// The control plane's metrics and status port.
    cp_metrics: SocketAddr,
    state: PathBuf,
    logs: PathBuf,
    tokens: PathBuf,
    bundle: PathBuf,
    proxy_bin: Option<PathBuf>,
}

fn spawn_control_plane(p: &Paths) -> anyhow::Result<Proc> {
    let (out, err) = log_file(&p.logs, "control-plane")?;
    let child = Command::new(exe()?)
        .arg("control-plane")
        .arg("--config")
        .arg(&p.mesh)
        .arg("--state-dir")
        .arg(&p.state)
        .arg("--tokens")
        .arg(&p.tokens)
        .arg("--metrics")
        .arg(p.cp_metrics.to_string())
        .env("PALISADE_WATCH_PARENT", "1")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .context("cannot start the control plane")?;
    Ok(Proc {
        label: "control plane".into(),
        child,
    })
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The demo app learns its upstreams as `NAME=ADDR` (service name without the namespace).
fn demo_upstreams(w: &Workload) -> String {
    w.upstreams
        .iter()
        .map(|u| {
            let short = u.service.split('.').next().unwrap_or(&u.service);
            format!("{short}={}", loopback(u.local_port))
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn spawn_app(w: &Workload, p: &Paths) -> anyhow::Result<Option<Proc>> {
    let Some(cmd) = w.command.as_ref().filter(|c| !c.is_empty()) else {
        return Ok(None);
    };
    let program = if cmd[0] == "palisade" {
        exe()?
    } else {
        PathBuf::from(&cmd[0])
    };
    let (out, err) = log_file(&p.logs, &format!("{}-app", w.name))?;
    let mut c = Command::new(&program);
    c.args(&cmd[1..])
        .env("PALISADE_WORKLOAD", &w.name)
        .env("PALISADE_DEMO_UPSTREAMS", demo_upstreams(w))
        .env("PALISADE_WATCH_PARENT", "1")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true);
    for (k, v) in &w.env {
        c.env(k, v);
    }
    let child = c
        .spawn()
        .with_context(|| format!("cannot start the app of {}: {}", w.name, program.display()))?;
    Ok(Some(Proc {
        label: format!("{}'s app", w.name),
        child,
    }))
}

fn spawn_proxy(w: &Workload, mesh: &Mesh, p: &Paths) -> anyhow::Result<Proc> {
    let token_file = p.state.join("tokens").join(&w.name);
    let (out, err) = log_file(&p.logs, &format!("{}-proxy", w.name))?;
    let upstreams = w
        .upstreams
        .iter()
        .map(|u| format!("{}:{}={}", u.service, u.port, loopback(u.local_port)))
        .collect::<Vec<_>>()
        .join(",");
    let mut c = match &p.proxy_bin {
        Some(bin) => Command::new(bin),
        None => {
            let mut c = Command::new(exe()?);
            c.arg("proxy");
            c
        }
    };
    c.env("PALISADE_WORKLOAD", &w.name)
        .env("PALISADE_IDENTITY", w.spiffe_id(mesh)?.as_str())
        .env(
            "PALISADE_INBOUND_ADDR",
            loopback(w.inbound_port).to_string(),
        )
        .env("PALISADE_ADMIN_ADDR", loopback(w.admin_port).to_string())
        .env("PALISADE_UPSTREAMS", upstreams)
        .env(
            "PALISADE_CONTROL_PLANE",
            loopback(mesh.control_plane.port).to_string(),
        )
        .env("PALISADE_TOKEN_FILE", &token_file)
        .env("PALISADE_TRUST_BUNDLE", &p.bundle)
        .env("PALISADE_WATCH_PARENT", "1")
        // `up` drains its sidecars with POST /shutdown.
        .env("PALISADE_ADMIN_SHUTDOWN", "true")
        .env_remove("PALISADE_TOKEN")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true);
    if let Some(port) = w.app_port {
        c.env("PALISADE_APP_ADDR", loopback(port).to_string());
    }
    let program = PathBuf::from(c.as_std().get_program());
    let child = c.spawn().with_context(|| {
        format!(
            "cannot start the proxy of {} ({})",
            w.name,
            program.display()
        )
    })?;
    Ok(Proc {
        label: format!("{}'s proxy", w.name),
        child,
    })
}

async fn wait_for_control_plane(p: &Paths, addr: SocketAddr, cp: &mut Proc) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if p.bundle.exists() && tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if let Some(status) = cp.child.try_wait()? {
            bail!(
                "the control plane exited ({status}); see {}",
                p.logs.join("control-plane.log").display()
            );
        }
        if Instant::now() > deadline {
            bail!("the control plane did not start listening on {addr} within 30s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn up(args: UpArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let mesh_path = std::fs::canonicalize(&args.mesh)
        .with_context(|| format!("cannot read the mesh file {}", args.mesh.display()))?;
    let mesh = palisade_control_plane::mesh::load(&mesh_path)?;
    let state = prepare_state_dir(&args.state_dir)?;
    let cp_metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("no free port for the control plane's status")?;
    let paths = Paths {
        mesh: mesh_path,
        cp_metrics,
        logs: state.join("logs"),
        tokens: state.join("tokens.json"),
        bundle: state.join("ca").join("root-cert.pem"),
        state,
        proxy_bin: args.proxy_bin.clone(),
    };
    std::fs::create_dir_all(&paths.logs)
        .with_context(|| format!("cannot create {}", paths.logs.display()))?;
    let _ = std::fs::remove_file(paths.state.join("mesh.json"));

    // Bootstrap tokens: none yet, one per proxy as it starts (the control plane signs only
    // that workload's ID for it, once). Tokens of an earlier run are dropped.
    let mut tokens = BTreeMap::new();
    write_private(&paths.tokens, &serde_json::to_string_pretty(&tokens)?)?;

    let cp_addr = loopback(mesh.control_plane.port);
    let mut cp = spawn_control_plane(&paths)?;
    wait_for_control_plane(&paths, cp_addr, &mut cp).await?;

    let mut procs = Vec::new();
    for w in &mesh.workloads {
        let app = spawn_app(w, &paths)?;
        issue_token(w, &paths, &mut tokens)?;
        let proxy = spawn_proxy(w, &mesh, &paths)?;
        procs.push(WorkloadProcs {
            name: w.name.clone(),
            admin: loopback(w.admin_port),
            app,
            proxy,
        });
    }
    print_table(&mesh)?;

    let ready = wait_ready(&mut procs, &mut cp, &paths, args.ready_timeout).await;
    if let Err(e) = ready {
        eprintln!("error: {e}; logs are in {}", paths.logs.display());
        stop_all(&mut procs, &mut cp).await;
        return Ok(ExitCode::from(1));
    }
    write_mesh_json(&mesh, &paths, &procs, &cp)?;
    println!(
        "mesh ready: {} workloads in {} ms (state in {}, logs in {})",
        procs.len(),
        started.elapsed().as_millis(),
        paths.state.display(),
        paths.logs.display()
    );

    let code = supervise(&mut procs, &mut cp, &paths, &mesh).await;
    let _ = std::fs::remove_file(paths.state.join("mesh.json"));
    stop_all(&mut procs, &mut cp).await;
    println!("mesh stopped");
    Ok(code)
}

fn print_table(mesh: &Mesh) -> anyhow::Result<()> {
    println!(
        "{:<12} {:<48} {:>7} {:>8} {:>6}  upstreams",
        "WORKLOAD", "SPIFFE ID", "APP", "INBOUND", "ADMIN"
    );
    for w in &mesh.workloads {
        let ups = w
            .upstreams
            .iter()
            .map(|u| format!("{}:{}->{}", u.service, u.port, u.local_port))
            .collect::<Vec<_>>()
            .join(" ");
        println!(
            "{:<12} {:<48} {:>7} {:>8} {:>6}  {}",
            w.name,
            w.spiffe_id(mesh)?.as_str(),
            w.app_port
                .map(|p| p.to_string())
                .unwrap_or_else(|| "-".into()),
            w.inbound_port,
            w.admin_port,
            if ups.is_empty() { "-".into() } else { ups }
        );
    }
    Ok(())
}

/// Waits until every proxy is ready. Before that, any child exiting is fatal, the control plane
/// included: once the mesh is up `up` restarts a dead control plane, but one that dies while the
/// mesh starts (its port taken, say) would only die again.
async fn wait_ready(
    procs: &mut [WorkloadProcs],
    cp: &mut Proc,
    paths: &Paths,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut pending: Vec<usize> = (0..procs.len()).collect();
    while !pending.is_empty() {
        if let Some(status) = cp.child.try_wait()? {
            bail!(
                "the control plane exited before the mesh was ready ({status}); see {}",
                paths.logs.join("control-plane.log").display()
            );
        }
        let mut still = Vec::new();
        for i in pending {
            let w = &mut procs[i];
            if let Some(status) = w.proxy.child.try_wait()? {
                bail!("{} exited before it was ready ({status})", w.proxy.label);
            }
            if let Some(app) = w.app.as_mut()
                && let Some(status) = app.child.try_wait()?
            {
                bail!("{} exited ({status})", app.label);
            }
            match http_util::get(w.admin, "/ready").await {
                Ok((s, _)) if s.is_success() => {}
                _ => still.push(i),
            }
        }
        pending = still;
        if pending.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            let names: Vec<_> = pending.iter().map(|&i| procs[i].name.as_str()).collect();
            bail!("not ready within {timeout:?}: {}", names.join(", "));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

fn write_mesh_json(
    mesh: &Mesh,
    p: &Paths,
    procs: &[WorkloadProcs],
    cp: &Proc,
) -> anyhow::Result<()> {
    let mut workloads = Vec::new();
    for (w, pr) in mesh.workloads.iter().zip(procs) {
        workloads.push(serde_json::json!({
            "name": w.name,
            "spiffeId": w.spiffe_id(mesh)?.as_str(),
            "appAddr": w.app_port.map(|port| loopback(port).to_string()),
            "inboundAddr": loopback(w.inbound_port).to_string(),
            "adminAddr": loopback(w.admin_port).to_string(),
            "upstreams": w.upstreams.iter().map(|u| serde_json::json!({
                "service": format!("{}:{}", u.service, u.port),
                "localAddr": loopback(u.local_port).to_string(),
            })).collect::<Vec<_>>(),
            "proxyPid": pr.proxy.child.id(),
            "appPid": pr.app.as_ref().and_then(|a| a.child.id()),
        }));
    }
    let doc = serde_json::json!({
        "controlPlane": loopback(mesh.control_plane.port).to_string(),
        "controlPlanePid": cp.child.id(),
        "controlPlaneStatus": p.cp_metrics.to_string(),
        "trustDomain": mesh.trust_domain.as_str(),
        "workloads": workloads,
    });
    let path = p.state.join("mesh.json");
    let tmp = p.state.join("mesh.json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&doc)?)?;
    std::fs::rename(&tmp, &path)?;
    Ok(())
}

/// Runs until a signal (exit 0) or until an app or proxy dies (exit 1). A dead control plane
/// is restarted: proxies keep serving with their last config and certificate meanwhile.
async fn supervise(
    procs: &mut [WorkloadProcs],
    cp: &mut Proc,
    paths: &Paths,
    mesh: &Mesh,
) -> ExitCode {
    let signal = super::shutdown_signal();
    tokio::pin!(signal);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = &mut signal => return ExitCode::SUCCESS,
            _ = tick.tick() => {}
        }
        if let Ok(Some(status)) = cp.child.try_wait() {
            eprintln!("the control plane exited ({status}); restarting it");
            tokio::time::sleep(Duration::from_millis(500)).await;
            match spawn_control_plane(paths) {
                Ok(new) => {
                    *cp = new;
                    let _ = write_mesh_json(mesh, paths, procs, cp);
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(1);
                }
            }
        }
        for w in procs.iter_mut() {
            let mut died = None;
            if let Ok(Some(status)) = w.proxy.child.try_wait() {
                died = Some((w.proxy.label.clone(), status));
            }
            if let Some(app) = w.app.as_mut()
                && let Ok(Some(status)) = app.child.try_wait()
            {
                died = Some((app.label.clone(), status));
            }
            if let Some((label, status)) = died {
                eprintln!("{label} exited ({status}); stopping the mesh");
                return ExitCode::from(1);
            }
        }
    }
}

/// Proxies drain first (POST /shutdown), then apps and the control plane stop.
async fn stop_all(procs: &mut [WorkloadProcs], cp: &mut Proc) {
    for w in procs.iter() {
        let _ = http_util::shutdown(w.admin, Duration::from_millis(500)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(12);
    for w in procs.iter_mut() {
        let left = deadline.saturating_duration_since(Instant::now());
        if tokio::time::timeout(left, w.proxy.child.wait())
            .await
            .is_err()
        {
            let _ = w.proxy.child.kill().await;
        }
    }
    for w in procs.iter_mut() {
        if let Some(app) = w.app.as_mut() {
            let _ = app.child.kill().await;
        }
    }
    let _ = cp.child.kill().await;
}
