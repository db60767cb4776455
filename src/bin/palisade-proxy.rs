//! `palisade-proxy`: the sidecar alone, with the flags and `PALISADE_*` variables of
//! `palisade proxy`. It is the binary a sidecar image ships and `palisade bench` measures; it
//! links only the data plane, so its resident set stays small.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use palisade::cmd;

#[derive(Parser)]
#[command(
    name = "palisade-proxy",
    version,
    about = "The Palisade sidecar proxy (configured by PALISADE_* variables or flags)"
)]
struct Cli {
    #[command(flatten)]
    args: cmd::proxy::ProxyArgs,
}

fn main() -> ExitCode {
    palisade_certs::tls::install_default_provider();
    cmd::init_tracing();
    let cli = Cli::parse();
    cmd::exit(cmd::proxy::run(cli.args))
}
