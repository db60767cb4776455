//! Palisade's benchmarks, as their own crate and binary (`palisade-bench`), so that the
//! `palisade` CLI and the `palisade-proxy` sidecar carry no load generator, backend or report:
//!
//! - `palisade-bench [--rate RPS]...`: the latency benchmark, direct vs through the mesh
//!   ([`latency`]);
//! - `palisade-bench control-plane`: the control-plane scale benchmark ([`control_plane`]);
//! - `palisade-bench cold-start`: a sidecar's time from exec to ready ([`cold_start`]);
//! - `palisade-bench idle`: the proxies' memory per idle client connection ([`idle`]);
//! - `palisade-bench relay`: the plain TCP relay that `--relays` measures the mesh against
//!   ([`relay`]).
//!
//! `palisade bench ARGS` runs this binary with the same arguments (and builds it first under
//! `cargo run`), so the command, its flags and its JSON stay what the spec says. The mesh under
//! test is always the `palisade` binary (`--palisade-bin`, default: the one next to this
//! binary), started as a child process, never this code.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

pub mod cold_start;
pub mod control_plane;
pub mod idle;
pub mod latency;
pub mod relay;
pub mod support;

/// What `palisade bench` sets to the name it was run as, so that usage and `--help` read
/// `palisade bench …`, the command the user typed.
pub const DISPLAY_NAME_ENV: &str = "PALISADE_BENCH_DISPLAY_NAME";

#[derive(Parser)]
#[command(
    name = "palisade-bench",
    version,
    about = "The latency benchmark: direct vs through the mesh, open loop, HDR histograms",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    latency: latency::BenchArgs,
    /// The `palisade` binary whose mesh (`up`) or control plane to run. Default: `palisade`
    /// next to this binary (`cargo build` puts them side by side), else the first on PATH.
    #[arg(long, env = "PALISADE_BIN", global = true)]
    palisade_bin: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// The control-plane scale benchmark: a real control plane, N simulated proxies over
    /// gRPC + mTLS, endpoints churning.
    ControlPlane(control_plane::ControlPlaneBenchArgs),
    /// A sidecar's cold start: exec to `/ready` 200, with static certificates and with a
    /// control plane on loopback.
    ColdStart(cold_start::ColdStartArgs),
    /// Memory per idle client connection: each proxy's RSS with N idle keep-alive
    /// connections, and with N that have sent nothing.
    Idle(idle::IdleArgs),
    /// A plain TCP relay: the floor `--relays` measures the mesh against.
    #[command(hide = true)]
    Relay(relay::RelayArgs),
}

/// The `palisade-bench` binary: parses the command line, runs the benchmark, and ends with its
/// exit code or the error as one sentence on stderr (exit 1); clap's usage errors exit 2.
pub fn main() -> ExitCode {
    palisade_certs::tls::install_default_provider();
    init_tracing();
    let mut command = Cli::command();
    if let Ok(name) = std::env::var(DISPLAY_NAME_ENV)
        && !name.trim().is_empty()
    {
        command = command.bin_name(name);
    }
    let cli = match Cli::from_arg_matches(&command.get_matches()) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let palisade_bin = cli.palisade_bin;
    let result = match cli.command {
        None => latency::run(cli.latency, palisade_bin),
        Some(Command::ControlPlane(a)) => control_plane::run(a, palisade_bin),
        Some(Command::ColdStart(a)) => cold_start::run(a, palisade_bin),
        Some(Command::Idle(a)) => idle::run(a, palisade_bin),
        Some(Command::Relay(a)) => relay::run(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", one_sentence(&e));
            ExitCode::from(1)
        }
    }
}

/// Logs go to stderr, as the CLI's do; `PALISADE_LOG` (or `RUST_LOG`) sets the filter.
fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("PALISADE_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info".to_string());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(filter))
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

/// An error chain as one line: "outer: inner: root cause", without repeating a message that
/// an outer error already includes (the CLI's errors read the same way).
fn one_sentence(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let msg = cause.to_string();
        if out.contains(&msg) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&msg);
    }
    out
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    #[test]
    fn the_spec_flags_parse_and_subcommands_do_not_mix_with_them() {
        let cli = super::Cli::try_parse_from([
            "palisade-bench",
            "--rate",
            "100",
            "--rate",
            "200",
            "--duration",
            "2s",
            "--protocol",
            "tcp",
            "--palisade-bin",
            "/x/palisade",
        ])
        .expect("parses");
        assert_eq!(cli.latency.rates, [100, 200]);
        assert!(cli.command.is_none());
        assert_eq!(
            cli.palisade_bin.as_deref(),
            Some(std::path::Path::new("/x/palisade"))
        );
        let cp = super::Cli::try_parse_from([
            "palisade-bench",
            "control-plane",
            "--proxies",
            "3",
            "--palisade-bin",
            "/y/palisade",
        ])
        .expect("parses");
        assert!(matches!(
            cp.command,
            Some(super::Command::ControlPlane(ref a)) if a.proxies == 3
        ));
        assert!(cp.palisade_bin.is_some());
        let cold = super::Cli::try_parse_from(["palisade-bench", "cold-start", "--runs", "3"])
            .expect("parses");
        assert!(matches!(
            cold.command,
            Some(super::Command::ColdStart(ref a)) if a.runs == 3 && a.out.is_none()
        ));
        let idle = super::Cli::try_parse_from([
            "palisade-bench",
            "idle",
            "--connections",
            "200",
            "--out",
            "/x/idle.json",
        ])
        .expect("parses");
        assert!(matches!(
            idle.command,
            Some(super::Command::Idle(ref a)) if a.connections == 200 && a.out.is_some()
        ));
        assert!(
            super::Cli::try_parse_from(["palisade-bench", "--rate", "1", "control-plane"]).is_err()
        );
    }

    #[test]
    fn errors_read_as_one_sentence() {
        let e = anyhow::anyhow!("root cause").context("outer");
        assert_eq!(super::one_sentence(&e), "outer: root cause");
    }
}
