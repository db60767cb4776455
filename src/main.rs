//! The `palisade` command line. Only wiring lives here: every subcommand calls into the
//! library crates (certs, proxy, control-plane), where the behaviour and its tests are.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use palisade::cmd;

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
    /// The sidecar proxy (configured by PALISADE_* variables or flags).
    Proxy(Box<cmd::proxy::ProxyArgs>),
    /// The control plane alone.
    ControlPlane(cmd::control_plane::ControlPlaneArgs),
    /// The demo app of the local mesh: says who called it, calls other services.
    DemoApp(cmd::demo_app::DemoAppArgs),
    /// Check a running local mesh: proxies ready, certificates valid, configs received.
    Check(cmd::check::CheckArgs),
    /// Policy files.
    #[command(subcommand)]
    Policy(cmd::policy::PolicyCommand),
    /// Inject the sidecar into Kubernetes YAML (or answer an AdmissionReview), as the webhook does.
    Inject(cmd::inject::InjectArgs),
    /// Authorization decisions.
    #[command(subcommand)]
    Authz(cmd::policy::AuthzCommand),
    /// The iptables rules of a meshed pod (the injected init container): inbound TCP to the
    /// proxy's inbound port, outbound TCP to its transparent listener.
    Init(cmd::init::InitArgs),
    /// Print the Kubernetes manifests (CRDs, control plane, RBAC, mesh CA, injector webhook)
    /// for `kubectl apply -f -`.
    Install(cmd::install::InstallArgs),
    /// A bounded fault-injection experiment on a running local mesh: abort and/or delay a
    /// share of a service's requests, then report the success rate its callers saw.
    Chaos(cmd::chaos::ChaosArgs),
    /// What each caller (or route) costs: CPU-seconds and bytes of the proxies, priced, from a
    /// running local mesh or from Prometheus.
    Cost(cmd::cost::CostArgs),
    /// Live traffic per workload (or route) of a running local mesh: requests, rate, success
    /// rate, latency percentiles, mTLS share, denials.
    Stat(cmd::stat::StatArgs),
    /// Who talks to whom in a running local mesh: caller -> callee with both identities,
    /// mTLS or not, requests, success rate, denials.
    Edges(cmd::edges::EdgesArgs),
    /// The requests flowing through a workload's proxy now (time, direction, identities,
    /// method, path, status, latency, authorization, route), streamed from its admin port.
    Tap(cmd::tap::TapArgs),
    /// One workload of a running local mesh: identity and live certificate, effective mTLS mode
    /// and its source, the policies and routes that apply, endpoints, config version held vs
    /// served.
    Describe(cmd::describe::DescribeArgs),
    /// A local web page over a running mesh: live topology (mTLS, success, latency, denials),
    /// workloads, a page per workload (describe and a live tap), and cost.
    Dashboard(cmd::dashboard::DashboardArgs),
    /// The benchmarks: latency direct vs through the mesh, and `bench control-plane`.
    ///
    /// Runs the `palisade-bench` binary with these arguments; `palisade bench --help` is its
    /// help.
    #[command(disable_help_flag = true)]
    Bench(cmd::bench::BenchArgs),
}

fn main() -> ExitCode {
    palisade_certs::tls::install_default_provider();
    cmd::init_tracing();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Up(args) => cmd::up::run(args),
        Command::Ca(c) => cmd::ca::run_ca(c),
        Command::Cert(c) => cmd::ca::run_cert(c),
        Command::Proxy(a) => cmd::proxy::run(*a),
        Command::ControlPlane(a) => cmd::control_plane::run(a),
        Command::DemoApp(a) => cmd::demo_app::run(a),
        Command::Check(a) => cmd::check::run(a),
        Command::Init(a) => cmd::init::run(a),
        Command::Install(a) => cmd::install::run(a),
        Command::Bench(a) => cmd::bench::run(a),
        Command::Chaos(a) => cmd::chaos::run(a),
        Command::Cost(a) => cmd::cost::run(a),
        Command::Stat(a) => cmd::stat::run(a),
        Command::Edges(a) => cmd::edges::run(a),
        Command::Tap(a) => cmd::tap::run(a),
        Command::Describe(a) => cmd::describe::run(a),
        Command::Dashboard(a) => cmd::dashboard::run(a),
        Command::Inject(a) => cmd::inject::run(a),
        Command::Policy(cmd::policy::PolicyCommand::Check(a)) => cmd::policy::check(a),
        Command::Policy(cmd::policy::PolicyCommand::WhatIf(a)) => cmd::what_if::run(a),
        Command::Authz(cmd::policy::AuthzCommand::Explain(a)) => cmd::policy::explain(a),
    };
    cmd::exit(result)
}
