//! `palisade up`: the local mesh. Starts the control plane, then for each workload of the mesh
//! file its app (if it has a `command`) and its sidecar, all as child processes; prints the
//! table, waits until every proxy holds a certificate and its config (`mesh ready`), writes
//! `STATE_DIR/mesh.json`, and on SIGINT/SIGTERM drains and stops every child.
//!
//! The unhappy paths are the point of most of this module:
//! - `preflight.rs`: before anything starts, the state directory is locked (a second `up`
//!   names the first one's pid and touches nothing), every port of the mesh file is checked
//!   (naming the field of a port in use), and the policies are validated.
//! - `children.rs`: children log to appended files and are stopped by signal, never through an
//!   address another mesh could own; a child that dies is reported with the last error line of
//!   its log.
//! - `supervise.rs`: while the mesh runs, dead children are restarted with backoff (apps too,
//!   unless `--exit-on-app-failure`), and config edits are answered in the terminal: applied
//!   (what changed), rejected (why), workloads added, removed or changed started and stopped.
//!
//! Children watch their parent (`PALISADE_WATCH_PARENT`), so even a killed `up` leaves no
//! orphans.

mod children;
mod preflight;
mod supervise;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use palisade_control_plane::Model;

use self::children::{Paths, Proc, loopback};
use self::supervise::{Running, Up};

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
    /// Stop the mesh and exit 1 when an app exits, instead of restarting it with backoff
    /// (for scripts that treat an app's death as the end of a run).
    #[arg(long)]
    pub exit_on_app_failure: bool,
    /// Export every proxy's spans (and those of apps instrumented with OpenTelemetry) to this
    /// OTLP/gRPC collector, e.g. `http://127.0.0.1:4317`.
    #[arg(long, value_name = "ENDPOINT", value_parser = otlp_endpoint)]
    pub otlp: Option<String>,
}

pub fn run(args: UpArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(up(args))
}

/// `--otlp` as a URL (`host:port` means `http://host:port`): parsed with the flags, so a bad
/// one is refused before anything touches the state directory.
fn otlp_endpoint(e: &str) -> Result<String, String> {
    let e = e.trim();
    let url = if e.contains("://") {
        e.to_string()
    } else {
        format!("http://{e}")
    };
    let ok = url.parse::<http::Uri>().is_ok_and(|u| {
        let Some(a) = u.authority() else {
            return false;
        };
        // `http::Uri` reads a port it cannot hold (99999) as no port: look at what was written.
        let port_written = a
            .as_str()
            .rsplit_once(':')
            .is_some_and(|(_, p)| !p.contains(']'));
        !a.host().is_empty()
            && matches!(u.scheme_str(), Some("http" | "https"))
            && (!port_written || a.port_u16().is_some_and(|n| n > 0))
    });
    if ok {
        Ok(url)
    } else {
        Err(format!(
            "{e:?} is not a collector address (like http://127.0.0.1:4317)"
        ))
    }
}

/// A bootstrap token: 32 random bytes, hex (what the control plane's tokens file holds).
pub(crate) fn random_token() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Secrets are replaced whole (temp file + rename, 0600): the control plane may read the tokens
/// file at any moment, and nothing planted at the path is written through.
pub(crate) fn write_private(path: &std::path::Path, contents: &str) -> anyhow::Result<()> {
    palisade_certs::secure_fs::write_private_atomic(path, contents.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// The state directory holds the bootstrap tokens and the CA: created 0700 if missing, and
/// refused (one sentence naming the path) if another user owns it, `ca/` or `tokens/`, or can
/// write to them, or if a CA key there is not ours and 0600. A directory pre-created by another
/// local user would otherwise receive our tokens, and a CA planted in it would become the mesh's
/// trust anchor.
fn prepare_state_dir(dir: &std::path::Path) -> anyhow::Result<PathBuf> {
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

async fn wait_for_control_plane(
    p: &Paths,
    addr: std::net::SocketAddr,
    cp: &mut Proc,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if p.bundle.exists() && tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if let Some(status) = cp.exited() {
            bail!("{}", cp.death_note(status));
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
    // Nothing is written or started before these pass: a second `up` must leave a running
    // mesh, its state directory and its logs alone.
    let state = prepare_state_dir(&args.state_dir)?;
    let _lock = preflight::lock_state(&state, &args.state_dir)?;
    preflight::check_ports(&preflight::mesh_ports(&mesh))?;
    let model: Model = preflight::load_model(mesh)?;

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
        otlp: args.otlp.clone(),
    };
    std::fs::create_dir_all(&paths.logs)
        .with_context(|| format!("cannot create {}", paths.logs.display()))?;
    let _ = std::fs::remove_file(paths.state.join("mesh.json"));

    // Bootstrap tokens: none yet, one per proxy as it starts (the control plane signs only
    // that workload's ID for it, once). Tokens of an earlier run are dropped.
    let tokens = BTreeMap::new();
    write_private(&paths.tokens, &serde_json::to_string_pretty(&tokens)?)?;

    let cp_addr = loopback(model.mesh.control_plane.port);
    let mut cp = children::spawn_control_plane(&paths)?;
    if let Err(e) = wait_for_control_plane(&paths, cp_addr, &mut cp).await {
        eprintln!("error: {e}");
        eprintln!("logs are in {}", paths.logs.display());
        cp.terminate(Duration::from_secs(2)).await;
        return Ok(ExitCode::from(1));
    }

    let mut up = Up::new(paths, model, cp, tokens, args.exit_on_app_failure);
    let workloads = up.model.mesh.workloads.clone();
    for w in &workloads {
        match up.start_workload(w) {
            Ok(r) => up.workloads.push(r),
            Err(e) => {
                eprintln!("error: {e:#}");
                up.stop_all().await;
                return Ok(ExitCode::from(1));
            }
        }
    }
    print_table(&up.model)?;

    if let Err(e) = up.wait_ready(args.ready_timeout).await {
        eprintln!("error: {e}");
        eprintln!("logs are in {}", up.paths.logs.display());
        up.stop_all().await;
        return Ok(ExitCode::from(1));
    }
    up.write_mesh_json()?;
    println!(
        "mesh ready: {} workloads in {} ms (state in {}, logs in {})",
        up.workloads.len(),
        started.elapsed().as_millis(),
        up.paths.state.display(),
        up.paths.logs.display()
    );

    let code = up.supervise().await;
    let _ = std::fs::remove_file(up.paths.state.join("mesh.json"));
    up.stop_all().await;
    println!("mesh stopped");
    Ok(code)
}

fn print_table(model: &Model) -> anyhow::Result<()> {
    let mesh = &model.mesh;
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

impl Running {
    fn name(&self) -> &str {
        &self.w.name
    }
}
