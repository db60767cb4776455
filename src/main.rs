//! The `palisade` command line. Only wiring lives here: every subcommand calls into the
//! library crates (certs, proxy, control-plane), where the behaviour and its tests are.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cmd;

#[derive(Parser)]
#[command(
    name = "palisade",
    version,
    about = "Palisade: a zero-trust service mesh (SPIFFE mTLS, authorization, load balancing)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the local mesh: control plane, demo apps and one sidecar per workload.
    Up(cmd::up::UpArgs),
    /// Certificate authority operations.
    #[command(subcommand)]
    Ca(cmd::ca::CaCommand),
    /// Certificate inspection.
    #[command(subcommand)]
    Cert(cmd::ca::CertCommand),
}

fn main() -> ExitCode {
    palisade_certs::tls::install_default_provider();
    cmd::init_tracing();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Up(args) => cmd::up::run(args),
        Command::Ca(c) => cmd::ca::run_ca(c),
        Command::Cert(c) => cmd::ca::run_cert(c),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", cmd::one_sentence(&e));
            ExitCode::from(1)
        }
    }
}
