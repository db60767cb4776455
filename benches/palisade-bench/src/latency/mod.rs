//! `palisade bench` (`palisade-bench`): what the mesh costs per request.
//!
//! Runs a backend app (in this process), a mesh around it (`palisade up` of the `palisade`
//! binary on a generated mesh file: control plane + a client-side and a server-side proxy, as
//! child processes; [`mesh`]), and an open-loop load generator written on hyper ([`load`]):
//! requests are scheduled at a constant arrival rate and latency is measured from the
//! *intended* send time, so a stall is charged to every request it delays (no coordinated
//! omission). Each rate runs direct (client → app) and through the mesh (client → proxy → mTLS
//! → proxy → app); then both at max throughput. CPU seconds and peak RSS of each proxy come
//! from /proc. The table and the JSON are [`report`]'s, the SVG [`plot`]'s.

pub(crate) mod load;
pub(crate) mod mesh;
mod plot;
mod report;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use anyhow::{Context, bail};

use report::RunResult;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchProtocol {
    /// HTTP/1.1 with keep-alive.
    Http1,
    /// HTTP/2, requests multiplexed on each connection.
    Http2,
    /// HTTP/1.1 with a new connection per request.
    Http1New,
    /// TCP echo of a 64-byte message.
    Tcp,
}

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Request rates to run at (requests per second); repeat for several.
    #[arg(long = "rate", default_values_t = vec![1000u64])]
    pub rates: Vec<u64>,
    /// Duration of each run.
    #[arg(long, default_value = "30s", value_parser = crate::support::duration)]
    pub duration: Duration,
    /// Client connections.
    #[arg(long, default_value_t = 16)]
    pub connections: usize,
    #[arg(long, value_enum, default_value = "http1")]
    pub protocol: BenchProtocol,
    /// Skip the max-throughput runs.
    #[arg(long)]
    pub no_max: bool,
    /// Write the results as JSON.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write a latency-percentile SVG (direct vs mesh).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Keep the generated mesh directory (logs) here instead of a temporary one.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// The sidecar binary to measure. Default: `palisade-proxy` next to this binary (or next to
    /// the `palisade` binary) when it is there (what a sidecar image runs; `cargo build
    /// --release` builds them side by side), else the `palisade` binary's `proxy` command.
    #[arg(long, env = "PALISADE_PROXY_BIN")]
    pub proxy_bin: Option<PathBuf>,
    /// Also run each rate through two plain TCP relays (no TLS, no HTTP, one thread each):
    /// the least two extra hops cost on this machine, measured in the same run.
    #[arg(long)]
    pub relays: bool,
}

/// Runs the latency benchmark; the mesh is `palisade up` of `palisade_bin` (see
/// [`crate::support::palisade_bin`] for the default).
pub fn run(args: BenchArgs, palisade_bin: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(bench(args, palisade_bin))
}

async fn bench(args: BenchArgs, palisade_bin: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    if args.connections == 0 {
        bail!("--connections must be at least 1");
    }
    if args.duration.is_zero() {
        bail!(
            "--duration must be longer than 0s: it is how long each run sends requests (e.g. 10s)"
        );
    }
    if let Some(r) = args.rates.iter().find(|r| **r == 0) {
        bail!("--rate {r}: a rate must be at least 1 request per second");
    }
    for path in [&args.out, &args.plot].into_iter().flatten() {
        create_parent(path)?;
    }
    let palisade = crate::support::palisade_bin(palisade_bin.as_deref())?;
    let app = load::backend(args.protocol).await?;
    println!("palisade: {}", palisade.display());
    let sidecar = mesh::proxy_bin(args.proxy_bin.as_deref(), &palisade);
    match &sidecar {
        Some(bin) => println!("sidecar: {}", bin.display()),
        None => println!("sidecar: palisade proxy"),
    }
    let mut mesh = mesh::start_mesh(
        &palisade,
        app,
        args.protocol,
        args.state_dir.as_deref(),
        sidecar.as_deref(),
        &[],
    )
    .await?;
    let relays = if args.relays {
        Some(mesh::start_relays(app).await?)
    } else {
        None
    };
    let progress = Arc::new(AtomicU64::new(0));
    let mut results = Vec::new();
    let mut plan: Vec<Option<u64>> = args.rates.iter().map(|r| Some(*r)).collect();
    if !args.no_max {
        plan.push(None);
    }
    let usage = |procs: &[(String, u32)]| -> Vec<Option<crate::support::Usage>> {
        procs
            .iter()
            .map(|(_, pid)| crate::support::proc_usage(*pid))
            .collect()
    };
    // Each mode: where the load goes, and the processes between it and the app.
    let mut modes = vec![("direct", app, &[][..])];
    if let Some(r) = &relays {
        modes.push(("relays", r.addr, &r.procs[..]));
    }
    modes.push(("mesh", mesh.client_addr, &mesh.proxies[..]));
    for rate in plan {
        for &(mode, addr, procs) in &modes {
            let label = format!(
                "{mode} at {}",
                rate.map(|r| format!("{r} rps"))
                    .unwrap_or_else(|| "max".into())
            );
            let before = usage(procs);
            let mut r = load::run_with_progress(
                label,
                load::load(
                    addr,
                    args.protocol,
                    args.connections,
                    rate,
                    args.duration,
                    mode,
                    progress.clone(),
                ),
                progress.clone(),
            )
            .await?;
            let after = usage(procs);
            let per_k = (r.requests + r.errors).max(1) as f64 / 1000.0;
            // Each reading is whole ticks, so the difference is good to one tick.
            r.cpu_resolution = 1.0 / crate::support::clock_ticks_per_second() as f64 / per_k;
            for (i, (name, _)) in procs.iter().enumerate() {
                if let (Some(u0), Some(u1)) = (before[i], after[i]) {
                    r.proxy_cpu.push(report::HopCpu {
                        name: name.clone(),
                        user: (u1.user - u0.user) / per_k,
                        system: (u1.system - u0.system) / per_k,
                    });
                }
            }
            results.push(r);
        }
    }
    let proxies = report::hop_figures(&results, "mesh", &mesh.proxies);
    let relay_figures = relays
        .as_ref()
        .map(|r| report::hop_figures(&results, "relays", &r.procs));
    drop(relays);
    let _ = mesh.child.start_kill();
    let _ = mesh.child.wait().await;

    report::print_table(&results, &proxies, relay_figures.as_deref(), args.protocol);
    let added = report::added_latency(&results, "mesh");
    if let Some(path) = &args.out {
        let mut doc = serde_json::json!({
            "protocol": format!("{:?}", args.protocol).to_lowercase(),
            "connections": args.connections,
            "duration_s": args.duration.as_secs_f64(),
            "runs": results.iter().map(RunResult::json).collect::<Vec<_>>(),
            "proxies": proxies,
            "added_latency_ms": { "p50": added.0, "p99": added.1 },
        });
        if let Some(relays) = &relay_figures {
            let added = report::added_latency(&results, "relays");
            doc["relays"] = serde_json::json!(relays);
            doc["relays_added_latency_ms"] = serde_json::json!({ "p50": added.0, "p99": added.1 });
        }
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        plot::plot(path, &results)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Output files may go in a directory that does not exist yet (`.palisade/bench/`): it is
/// created 0700, as `up` wants its state directory, so a later `up` there does not refuse it.
pub(crate) fn create_parent(path: &Path) -> anyhow::Result<()> {
    let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) else {
        return Ok(());
    };
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(parent)
        .with_context(|| format!("cannot create {}", parent.display()))
}
