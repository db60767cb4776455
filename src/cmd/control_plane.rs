//! `palisade control-plane`: identity (CA) and discovery for the proxies, fed by the local
//! mesh file and its policies directory.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct ControlPlaneArgs {
    /// The mesh file (the local config source).
    #[arg(long, env = "PALISADE_MESH", default_value = "deploy/local/mesh.yaml")]
    pub config: PathBuf,
    /// Where the CA lives (`ca/`), created on first start.
    #[arg(long, env = "PALISADE_STATE_DIR", default_value = ".palisade")]
    pub state_dir: PathBuf,
    /// JSON map of workload name to bootstrap token (written by `palisade up`); re-read when a
    /// proxy presents a token, and each token certifies one proxy start.
    #[arg(long, env = "PALISADE_TOKENS")]
    pub tokens: Option<PathBuf>,
    /// gRPC listen address; default 127.0.0.1 and the mesh file's `controlPlane.port`.
    #[arg(long, env = "PALISADE_CONTROL_PLANE_ADDR")]
    pub listen: Option<SocketAddr>,
    /// Serve /metrics and /ready here.
    #[arg(long, env = "PALISADE_CONTROL_PLANE_METRICS_ADDR")]
    pub metrics: Option<SocketAddr>,
}

pub fn run(args: ControlPlaneArgs) -> anyhow::Result<ExitCode> {
    let cfg = palisade_control_plane::ControlPlaneConfig {
        mesh_path: args.config,
        state_dir: args.state_dir,
        listen: args.listen,
        tokens: HashMap::new(),
        tokens_file: args.tokens,
        metrics_listen: args.metrics,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        palisade_control_plane::run(cfg, super::shutdown_signal()).await?;
        Ok(ExitCode::SUCCESS)
    })
}
