//! `palisade bench control-plane` (`palisade-bench control-plane`): what the control plane
//! costs as the mesh grows.
//!
//! Runs a real control plane (`palisade control-plane`, a child process, so its RSS and CPU are
//! its own) on a generated mesh file of N workloads and M services, and simulates N proxies in
//! this process, each as a real proxy starts: a key and CSR, `Identity.Certify` with its
//! bootstrap token over TLS, then `Discovery.Deltas` over mTLS with the certificate it got,
//! acknowledging each delta it applies.
//! Then it churns endpoints: R times a second one workload moves from one service to another
//! (its `app` label changes in the mesh file, which the control plane watches).
//!
//! Figures: time until all N hold their first config; push latency (from the write of a change
//! to each proxy's first config of a generation that includes it: the control plane's
//! `palisade_config_generation` is polled to learn which generation took which writes, and a
//! proxy counts for a generation when it receives a config of that generation or a later one);
//! bytes pushed per change (encoded config bytes received by all proxies, first snapshots
//! excluded, divided by the changes written); the control plane's peak RSS (VmHWM) and its CPU
//! seconds per change written (a burst of writes may make one generation: the control plane
//! debounces 100 ms).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use palisade_certs::{TrustBundle, TrustDomain};
use tokio::sync::Semaphore;

use proxy::{Mode, Received, start_proxy};

mod proxy;

#[derive(clap::Args, Debug, Clone)]
pub struct ControlPlaneBenchArgs {
    /// Simulated proxies (one workload each).
    #[arg(long, default_value_t = 1000)]
    pub proxies: usize,
    /// Services; workload i backs service i mod M.
    #[arg(long, default_value_t = 100)]
    pub services: usize,
    /// Endpoint changes per second during the churn.
    #[arg(long, default_value_t = 10.0)]
    pub churn: f64,
    /// How long to churn.
    #[arg(long, default_value = "30s", value_parser = crate::support::duration)]
    pub duration: Duration,
    /// Write the figures as JSON.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Keep the generated mesh, the CA and the control plane's log here instead of a
    /// temporary directory.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// The `palisade` binary whose control plane to measure (another build, for an A/B in one
    /// run); default: the `palisade` binary (`--palisade-bin`).
    #[arg(long)]
    pub control_plane_bin: Option<PathBuf>,
    /// Proxies connecting at once.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Workloads declare no upstreams, so every proxy gets every service, as transparent
    /// proxies of earlier releases (and any proxy on `Watch`) did.
    #[arg(long)]
    pub transparent: bool,
    /// Simulated proxies watch full snapshots (`Discovery.Watch`, what proxies of earlier
    /// releases use) instead of deltas: an A/B of the two in one build.
    #[arg(long)]
    pub full_snapshots: bool,
    /// Workloads declare no upstreams (as with `--transparent`) and each simulated proxy
    /// resolves the one service it calls on demand, as this release's transparent proxies do:
    /// it opens Deltas with `on_demand` and looks up an endpoint address of its service.
    #[arg(long, conflicts_with = "full_snapshots")]
    pub on_demand: bool,
}

const NAMESPACE: &str = "bench";
/// Ports of the generated workloads start here (the control plane binds none of them).
const FIRST_PORT: usize = 10_000;

fn workload(i: usize) -> String {
    format!("w{i}")
}

/// The mesh file with workload `i` labelled `app: s<label_of[i]>`.
fn mesh_yaml(cp_port: u16, label_of: &[usize], services: usize, transparent: bool) -> String {
    let n = label_of.len();
    let mut y = String::with_capacity(n * 120 + services * 80);
    y.push_str(&format!(
        "trustDomain: cluster.local\ncontrolPlane: {{ port: {cp_port} }}\nworkloads:\n"
    ));
    for (i, s) in label_of.iter().enumerate() {
        let upstream = (i + 1) % services;
        let upstreams = if transparent {
            String::new()
        } else {
            format!(
                ", upstreams: [ {{ service: s{upstream}.{NAMESPACE}, port: 8080, localPort: {lp} }} ]",
                lp = FIRST_PORT + 2 * n + i
            )
        };
        y.push_str(&format!(
            "  - {{ name: {w}, namespace: {NAMESPACE}, labels: {{ app: s{s} }}, inboundPort: {ip}, adminPort: {ap}{upstreams} }}\n",
            w = workload(i),
            ip = FIRST_PORT + i,
            ap = FIRST_PORT + n + i,
        ));
    }
    y.push_str("services:\n");
    for s in 0..services {
        y.push_str(&format!(
            "  - {{ name: s{s}, namespace: {NAMESPACE}, port: 8080, selector: {{ app: s{s} }}, protocol: http }}\n"
        ));
    }
    y
}

/// A bootstrap token, as `palisade up` makes them: 32 random bytes in hex.
fn random_token() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The mesh file and the tokens are replaced whole (temp file + rename, 0600), as `palisade up`
/// writes them: the control plane watches the mesh file and may read it at any moment.
fn write_private(path: &std::path::Path, contents: &str) -> anyhow::Result<()> {
    palisade_certs::secure_fs::write_private_atomic(path, contents.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The control plane's `palisade_config_generation`, from its metrics endpoint.
async fn generation(metrics: SocketAddr) -> Option<u64> {
    let (status, text) = crate::support::get(metrics, "/metrics").await.ok()?;
    if !status.is_success() {
        return None;
    }
    let g = crate::support::metric(&text, "palisade_config_generation")?;
    (g.is_finite() && g >= 0.0).then_some(g as u64)
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// Runs the control-plane benchmark against the control plane of `--control-plane-bin`, else of
/// `palisade_bin` (see [`crate::support::palisade_bin`] for the default).
pub fn run(args: ControlPlaneBenchArgs, palisade_bin: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    if args.proxies == 0 || args.services == 0 {
        bail!("--proxies and --services must be at least 1");
    }
    // Three ports per workload (inbound, admin, one upstream) from 10000 up.
    if FIRST_PORT + 3 * args.proxies > 65_535 {
        bail!(
            "--proxies {} needs more local ports than there are (at most {})",
            args.proxies,
            (65_535 - FIRST_PORT) / 3
        );
    }
    if !(args.churn > 0.0 && args.churn <= 1000.0) {
        bail!("--churn must be above 0 and at most 1000 changes per second");
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(bench(args, palisade_bin))
}

async fn bench(
    args: ControlPlaneBenchArgs,
    palisade_bin: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    palisade_certs::tls::install_default_provider();
    let tmp;
    let dir = match &args.state_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let n = args.proxies;
    let m = args.services;
    // The mesh file names the control plane's port: never one of the generated workloads'.
    let generated = FIRST_PORT..FIRST_PORT + 3 * n;
    let mut cp_port = free_port()?;
    for _ in 0..100 {
        if !generated.contains(&usize::from(cp_port)) {
            break;
        }
        cp_port = free_port()?;
    }
    if generated.contains(&usize::from(cp_port)) {
        bail!("no free port outside {generated:?} for the control plane");
    }
    let metrics_port = free_port()?;
    let cp: SocketAddr = ([127, 0, 0, 1], cp_port).into();
    let metrics: SocketAddr = ([127, 0, 0, 1], metrics_port).into();
    let mut label_of: Vec<usize> = (0..n).map(|i| i % m).collect();
    let mesh = dir.join("mesh.yaml");
    write_private(
        &mesh,
        &mesh_yaml(cp_port, &label_of, m, args.transparent || args.on_demand),
    )?;
    let tokens: BTreeMap<String, String> = (0..n).map(|i| (workload(i), random_token())).collect();
    let tokens_file = dir.join("tokens.json");
    write_private(&tokens_file, &serde_json::to_string(&tokens)?)?;
    let log = std::fs::File::create(dir.join("control-plane.log"))?;
    let bin = match &args.control_plane_bin {
        Some(b) => b.clone(),
        None => crate::support::palisade_bin(palisade_bin.as_deref())?,
    };
    let mut child = tokio::process::Command::new(&bin)
        .arg("control-plane")
        .arg("--config")
        .arg(&mesh)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--tokens")
        .arg(&tokens_file)
        .arg("--listen")
        .arg(cp.to_string())
        .arg("--metrics")
        .arg(metrics.to_string())
        .env("PALISADE_LOG", "warn")
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("cannot start the control plane")?;
    let pid = child.id().context("the control plane exited at once")?;
    println!("control plane: pid {pid}, {n} workloads, {m} services");

    // Ready, and its trust anchor written.
    let started = Instant::now();
    loop {
        if let Ok((status, _)) = crate::support::get(metrics, "/ready").await
            && status.is_success()
        {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!(
                "the control plane exited ({status}); see {}",
                dir.join("control-plane.log").display()
            );
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("the control plane was not ready within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let td = TrustDomain::new("cluster.local")?;
    let root = std::fs::read(
        dir.join("state/ca")
            .join(palisade_certs::ca::ROOT_CERT_FILE),
    )
    .context("the control plane's trust anchor")?;
    let mut bundle = TrustBundle::new();
    bundle.add_pem(&td, &root)?;

    // Every proxy: Certify, then Deltas (or Watch).
    let received: Vec<Arc<Received>> = (0..n).map(|_| Arc::new(Mutex::new(Vec::new()))).collect();
    let slots = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let sync_start = Instant::now();
    let mut starts = Vec::with_capacity(n);
    for (i, r) in received.iter().enumerate() {
        let permit = slots.clone().acquire_owned().await?;
        let (td, bundle, r) = (td.clone(), bundle.clone(), r.clone());
        let token = tokens[&workload(i)].clone();
        let mode = if args.full_snapshots {
            Mode::FullSnapshots
        } else if args.on_demand {
            // An endpoint of the service it calls: workload `upstream` is labelled for it
            // until the churn moves it.
            let upstream = (i + 1) % m;
            Mode::OnDemand {
                dials: ([127, 0, 0, 1], u16::try_from(FIRST_PORT + upstream)?).into(),
            }
        } else {
            Mode::Deltas
        };
        starts.push(tokio::spawn(async move {
            let _permit = permit;
            start_proxy(i, cp, &td, &bundle, &token, r, mode).await
        }));
    }
    let mut failed = 0usize;
    for s in starts {
        match s.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                failed += 1;
                if failed <= 3 {
                    eprintln!("proxy failed to start: {e:#}");
                }
            }
            Err(e) => bail!("a proxy task panicked: {e}"),
        }
    }
    // All first configs in.
    let deadline = Instant::now() + Duration::from_secs(120);
    let first_of = |r: &Received| r.lock().ok().and_then(|v| v.first().map(|x| x.1));
    while received.iter().filter(|r| first_of(r).is_some()).count() < n - failed
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let firsts: Vec<Instant> = received.iter().filter_map(|r| first_of(r)).collect();
    let synced = firsts.len();
    let initial_sync = firsts
        .iter()
        .max()
        .map_or(0.0, |t| t.duration_since(sync_start).as_secs_f64());
    println!(
        "{synced}/{n} proxies hold their first config after {initial_sync:.2} s ({failed} failed to start)"
    );

    // Churn: one workload moves to another service per tick; the generation poller learns
    // which generation took which writes.
    let gen0 = generation(metrics).await.unwrap_or(0);
    let cpu0 = crate::support::proc_usage(pid).map_or(0.0, |u| u.cpu());
    let writes: Arc<Mutex<Vec<Instant>>> = Arc::new(Mutex::new(Vec::new()));
    // The two services each write changed: the one workload k left and the one it joined.
    let mut changed: Vec<[usize; 2]> = Vec::new();
    let seen: Arc<Mutex<Vec<(u64, Instant)>>> = Arc::new(Mutex::new(Vec::new()));
    let polling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let poller = {
        let (seen, polling) = (seen.clone(), polling.clone());
        tokio::spawn(async move {
            let mut last = gen0;
            while polling.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(g) = generation(metrics).await
                    && g > last
                {
                    last = g;
                    if let Ok(mut s) = seen.lock() {
                        s.push((g, Instant::now()));
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let period = Duration::from_secs_f64(1.0 / args.churn);
    let changes = ((args.duration.as_secs_f64() * args.churn).round() as usize).clamp(1, n);
    let churn_start = Instant::now();
    for k in 0..changes {
        let at = churn_start + period.mul_f64(k as f64);
        tokio::time::sleep_until(at.into()).await;
        // Workload k moves to the service half the mesh away (a different one when M > 1).
        let from = label_of[k];
        label_of[k] = (from + m.div_ceil(2)) % m;
        changed.push([from, label_of[k]]);
        write_private(
            &mesh,
            &mesh_yaml(cp_port, &label_of, m, args.transparent || args.on_demand),
        )?;
        if let Ok(mut w) = writes.lock() {
            w.push(Instant::now());
        }
    }
    // Settle: the generation no longer moves and no proxy has heard anything for 500 ms (a
    // proxy a change does not concern hears nothing at all), or 30 s.
    let settle_deadline = Instant::now() + Duration::from_secs(30);
    let mut final_gen = gen0;
    let mut stable_since = Instant::now();
    while Instant::now() < settle_deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let g = generation(metrics).await.unwrap_or(final_gen);
        if g != final_gen {
            final_gen = g;
            stable_since = Instant::now();
        }
        let last_heard = received
            .iter()
            .filter_map(|r| r.lock().ok().and_then(|v| v.last().map(|x| x.1)))
            .max();
        let quiet =
            |t: Option<Instant>| t.is_some_and(|t| t.elapsed() > Duration::from_millis(500));
        let last_write = writes.lock().ok().and_then(|w| w.last().copied());
        if g > gen0
            && quiet(last_write)
            && quiet(last_heard)
            && stable_since.elapsed() > Duration::from_millis(500)
        {
            break;
        }
    }
    polling.store(false, std::sync::atomic::Ordering::Relaxed);
    let _ = poller.await;
    let (cpu, rss) =
        crate::support::proc_usage(pid).map_or((0.0, 0), |u| (u.cpu() - cpu0, u.peak_rss));

    // Which generation took each write: the first seen after it was written.
    let writes = writes.lock().map(|w| w.clone()).unwrap_or_default();
    let seen = seen.lock().map(|s| s.clone()).unwrap_or_default();
    let first_service_counts: Vec<usize> = received
        .iter()
        .map(|r| {
            r.lock()
                .ok()
                .and_then(|v| v.first().map(|x| x.3))
                .unwrap_or(0)
        })
        .collect();
    let write_gen: Vec<Option<u64>> = writes
        .iter()
        .map(|t| seen.iter().find(|(_, at)| at >= t).map(|(g, _)| *g))
        .collect();
    let mut pushed_gens: Vec<u64> = write_gen.iter().flatten().copied().collect();
    pushed_gens.dedup();
    // A proxy is concerned by a write when it gets one of the services the write changed: its
    // upstream (every workload declares one), or every service if the control plane sends
    // them all, which its first config shows.
    let mut latencies: Vec<f64> = Vec::new();
    let mut churn_bytes = 0usize;
    for (p, r) in received.iter().enumerate() {
        let Ok(r) = r.lock() else { continue };
        churn_bytes += r.iter().skip(1).map(|x| x.2).sum::<usize>();
        let gets_all = first_service_counts.get(p).is_some_and(|c| *c > 1);
        let upstream = (p + 1) % m;
        for (k, written) in writes.iter().enumerate() {
            let Some(g) = write_gen[k] else { continue };
            if !gets_all && !changed[k].contains(&upstream) {
                continue;
            }
            if let Some((_, at, _, _)) = r.iter().find(|(v, at, _, _)| *v >= g && at >= written) {
                latencies.push(at.duration_since(*written).as_secs_f64() * 1000.0);
            }
        }
    }
    let gens: Vec<u64> = pushed_gens;
    // Per change written (several writes may make one generation).
    let per_change = writes.len().max(1);
    latencies.sort_by(f64::total_cmp);
    let figures = serde_json::json!({
        "proxies": n,
        "services": m,
        "proxiesSynced": synced,
        "initialSyncSeconds": initial_sync,
        "pushLatencyMs": {
            "p50": percentile(&latencies, 0.5),
            "p99": percentile(&latencies, 0.99),
            "max": latencies.last().copied().unwrap_or(0.0),
        },
        "bytesPerChange": churn_bytes / per_change,
        "controlPlanePeakRssBytes": rss,
        "cpuSecondsPerChange": cpu / per_change as f64,
        "changesWritten": writes.len(),
        "generationsPushed": gens.len(),
        "finalGeneration": final_gen,
    });
    println!(
        "{} changes written, {} generations pushed; push latency p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        writes.len(),
        gens.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or(0.0)
    );
    println!(
        "bytes pushed per change {:.1} kB; control plane peak RSS {:.0} MB; CPU {:.4} s per change",
        (churn_bytes / per_change) as f64 / 1e3,
        rss as f64 / 1048576.0,
        cpu / per_change as f64
    );
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_string_pretty(&figures)? + "\n")
            .with_context(|| format!("cannot write {}", out.display()))?;
    }
    let _ = child.start_kill();
    let _ = child.wait().await;
    Ok(if synced == n {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
