//! `palisade up`: the local mesh.

use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct UpArgs {
    /// The mesh file.
    #[arg(long, env = "PALISADE_MESH", default_value = "deploy/local/mesh.yaml")]
    pub mesh: PathBuf,
    /// Where certificates, logs and mesh.json go.
    #[arg(long, env = "PALISADE_STATE_DIR", default_value = ".palisade")]
    pub state_dir: PathBuf,
}

pub fn run(_args: UpArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`palisade up` is not implemented yet")
}
