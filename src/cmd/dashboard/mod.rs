//! `palisade dashboard`: a local web page over the same figures as `stat`, `edges`,
//! `describe`, `tap` and `cost` — a live topology graph, a table of workloads, a page per
//! workload (its traffic, its proxy's configuration, a live tap) and the cost view.
//!
//! Nothing here measures anything: a background task reads the figures every few seconds
//! through one [`source::Source`] (the proxies of a local mesh, or a Prometheus server, via
//! [`crate::observe`]), and the HTTP server ([`server`]) answers the page's JSON API from the
//! last reading, relays taps from the proxies' admin `/tap`, and serves the page itself, whose
//! assets are compiled into the binary (no CDN, no build step, works offline).
//!
//! The page shows request metadata, so it is served on loopback only unless `--allow-remote`
//! says otherwise, and refuses requests for any other `Host` (a rebound DNS name) or from
//! another origin. docs/observe.md ("The dashboard") says what each part shows.

mod server;
mod source;

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};

pub use source::{Figures, Source};

/// Linkerd's dashboard port: what a mesh user has in their fingers.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50750";

#[derive(clap::Args, Debug)]
pub struct DashboardArgs {
    /// Where to serve the page (plain HTTP), `IP:PORT`; port 0 picks a free port. Loopback
    /// only, unless --allow-remote.
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Serve on a --listen address that is not loopback. Whoever can reach it then sees the
    /// mesh's topology, configuration and live request metadata (tap): only on a network you
    /// trust.
    #[arg(long)]
    pub allow_remote: bool,
    /// Read the traffic figures from this Prometheus server (`http://HOST:PORT[/PREFIX]`)
    /// instead of the proxies of a local mesh (the last minute, and the last hour). Describe
    /// and tap still need a local mesh (--state-dir); the cost view asks the same server.
    #[arg(long, value_name = "URL")]
    pub prometheus: Option<String>,
    /// The state directory of the `palisade up` whose mesh to show [default: .palisade].
    #[arg(long, env = "PALISADE_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

pub fn run(a: DashboardArgs) -> anyhow::Result<ExitCode> {
    if !a.listen.ip().to_canonical().is_loopback() && !a.allow_remote {
        bail!(
            "--listen {} is not a loopback address: the dashboard shows the mesh's request metadata (tap) to whoever can open it; listen on 127.0.0.1, or add --allow-remote to serve it on {} anyway",
            a.listen,
            a.listen
        );
    }
    let source = Source::new(a.prometheus.as_deref(), a.state_dir.as_ref())?;
    let state_dir = a
        .state_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(".palisade"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(a.listen)
            .await
            .with_context(|| format!("cannot listen on {}", a.listen))?;
        let addr = listener.local_addr()?;
        if a.allow_remote && !addr.ip().to_canonical().is_loopback() {
            eprintln!(
                "warning: serving on {addr} (--allow-remote): whoever reaches it sees the mesh's request metadata"
            );
        }
        let shared = Arc::new(server::Shared::new(
            addr,
            a.allow_remote,
            state_dir,
            a.prometheus.clone(),
        ));
        tokio::spawn(source::poll_forever(source, shared.clone()));
        // The one line scripts (and the tests) wait for.
        let mut out = std::io::stdout().lock();
        writeln!(out, "dashboard: http://{addr}/")?;
        out.flush()?;
        drop(out);
        tokio::select! {
            r = server::serve(listener, shared) => r?,
            _ = super::shutdown_signal() => {}
        }
        Ok(ExitCode::SUCCESS)
    })
}
