//! `palisade bench` (`palisade-bench`): what the mesh costs per request.
//!
//! Runs a backend app (in this process), a mesh around it (`palisade up` of the `palisade`
//! binary on a generated mesh file: control plane + a client-side and a server-side proxy, as
//! child processes), and an
//! open-loop load generator written on hyper: requests are scheduled at a constant arrival
//! rate and latency is measured from the *intended* send time, so a stall is charged to every
//! request it delays (no coordinated omission). Each rate runs direct (client → app) and through
//! the mesh (client → proxy → mTLS → proxy → app); then both at max throughput. CPU seconds and
//! peak RSS of each proxy come from /proc.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

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

struct RunResult {
    mode: &'static str,
    rate: Option<u64>,
    requests: u64,
    errors: u64,
    elapsed: Duration,
    hist: Histogram<u64>,
    /// Mesh and relay runs: CPU seconds per 1000 requests of each hop's process.
    proxy_cpu: Vec<(String, f64)>,
    /// The resolution of those figures: one clock tick of /proc's CPU times per 1000 requests.
    cpu_resolution: f64,
}

impl RunResult {
    fn ms(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "mode": self.mode,
            "rate": self.rate,
            "requests": self.requests,
            "errors": self.errors,
            "rps": self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9),
            "latency_ms": {
                "p50": self.ms(0.5), "p90": self.ms(0.9), "p99": self.ms(0.99),
                "p999": self.ms(0.999), "max": self.hist.max() as f64 / 1000.0,
            },
            "proxy_cpu_seconds_per_1000_requests": self.proxy_cpu.iter()
                .map(|(n, c)| (n.clone(), serde_json::json!(c)))
                .collect::<serde_json::Map<_, _>>(),
        })
    }
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

async fn backend(protocol: BenchProtocol) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                if protocol == BenchProtocol::Tcp {
                    let mut buf = [0u8; 4096];
                    loop {
                        match tcp.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if tcp.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                }
                let svc = hyper::service::service_fn(|_req: Request<Incoming>| async {
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(
                        b"ok\n",
                    ))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

struct Mesh {
    child: tokio::process::Child,
    client_addr: SocketAddr,
    proxies: Vec<(String, u32)>,
    _tmp: Option<tempfile::TempDir>,
}

/// Two `palisade-bench relay` processes (this binary) in a row in front of the app.
struct Relays {
    _children: Vec<tokio::process::Child>,
    addr: SocketAddr,
    procs: Vec<(String, u32)>,
}

async fn start_relays(app: SocketAddr) -> anyhow::Result<Relays> {
    let mut children = Vec::new();
    let mut procs = Vec::new();
    let mut to = app;
    for name in ["relay-2", "relay-1"] {
        let mut child = tokio::process::Command::new(std::env::current_exe()?)
            .arg("relay")
            .arg("--to")
            .arg(to.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start a relay")?;
        let stdout = child.stdout.take().context("relay stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .context("the relay did not say where it listens within 10s")??
            .context("the relay exited before listening")?;
        to = line
            .strip_prefix("listening on ")
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("unexpected relay output {line:?}"))?;
        procs.push((name.to_string(), child.id().context("relay pid")?));
        children.push(child);
    }
    procs.reverse();
    Ok(Relays {
        _children: children,
        addr: to,
        procs,
    })
}

/// The sidecar binary the bench runs: the one asked for, else `palisade-proxy` beside this
/// binary or beside `palisade`, else `None` for the `palisade` binary's own `proxy` command.
fn proxy_bin(asked: Option<&Path>, palisade: &Path) -> Option<PathBuf> {
    if let Some(p) = asked {
        return Some(p.to_path_buf());
    }
    crate::support::sibling("palisade-proxy").or_else(|| {
        let beside = palisade.with_file_name("palisade-proxy");
        beside.is_file().then_some(beside)
    })
}

async fn start_mesh(
    palisade: &Path,
    app: SocketAddr,
    protocol: BenchProtocol,
    state_dir: Option<&Path>,
    proxy_bin: Option<&Path>,
) -> anyhow::Result<Mesh> {
    let (tmp, dir) = match state_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            (None, d.to_path_buf())
        }
        None => {
            let t = tempfile::tempdir()?;
            let p = t.path().to_path_buf();
            (Some(t), p)
        }
    };
    let local = crate::support::free_port()?;
    let svc_protocol = match protocol {
        BenchProtocol::Tcp => "opaque",
        BenchProtocol::Http2 => "http2",
        _ => "http",
    };
    let mesh = format!(
        "trustDomain: cluster.local\n\
         certificateLifetime: 1h\n\
         controlPlane: {{ port: {cp} }}\n\
         defaultPolicy: allow\n\
         workloads:\n\
         \x20 - {{ name: client, namespace: bench, serviceAccount: client, labels: {{ app: client }}, inboundPort: {ci}, adminPort: {ca},\n\
         \x20     upstreams: [ {{ service: server.bench, port: 8080, localPort: {local} }} ] }}\n\
         \x20 - {{ name: server, namespace: bench, serviceAccount: server, labels: {{ app: server }}, appPort: {app}, inboundPort: {si}, adminPort: {sa} }}\n\
         services:\n\
         \x20 - {{ name: server, namespace: bench, port: 8080, selector: {{ app: server }}, protocol: {svc_protocol} }}\n",
        cp = crate::support::free_port()?,
        ci = crate::support::free_port()?,
        ca = crate::support::free_port()?,
        si = crate::support::free_port()?,
        sa = crate::support::free_port()?,
        app = app.port(),
    );
    let mesh_path = dir.join("mesh.yaml");
    std::fs::write(&mesh_path, mesh)?;
    let state = dir.join("state");
    let log = std::fs::File::create(dir.join("up.log"))?;
    let mut up = tokio::process::Command::new(palisade);
    up.arg("up")
        .arg("--mesh")
        .arg(&mesh_path)
        .arg("--state-dir")
        .arg(&state);
    if let Some(bin) = proxy_bin {
        up.arg("--proxy-bin").arg(bin);
    }
    let mut child = up
        .env("PALISADE_WATCH_PARENT", "1")
        .env(
            "PALISADE_LOG",
            std::env::var("PALISADE_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .context("cannot start the mesh")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let json = state.join("mesh.json");
    let doc: serde_json::Value = loop {
        if let Ok(text) = std::fs::read_to_string(&json)
            && let Ok(v) = serde_json::from_str(&text)
        {
            break v;
        }
        if let Some(status) = child.try_wait()? {
            let why = format!("palisade up exited before the bench mesh was ready ({status})");
            return Err(mesh_failed(tmp, &dir, &why));
        }
        if Instant::now() > deadline {
            return Err(mesh_failed(
                tmp,
                &dir,
                "the bench mesh was not ready within 60s",
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut proxies = Vec::new();
    for w in doc["workloads"].as_array().into_iter().flatten() {
        if let (Some(name), Some(pid)) = (w["name"].as_str(), w["proxyPid"].as_u64()) {
            proxies.push((name.to_string(), pid as u32));
        }
    }
    Ok(Mesh {
        child,
        client_addr: SocketAddr::from(([127, 0, 0, 1], local)),
        proxies,
        _tmp: tmp,
    })
}

/// The error for a mesh that did not come up: the generated mesh file and the logs are kept
/// (a temporary directory would be gone by the time anyone reads the message), and the last
/// line `palisade up` logged says why, most of the time.
fn mesh_failed(tmp: Option<tempfile::TempDir>, dir: &Path, why: &str) -> anyhow::Error {
    if let Some(t) = tmp {
        let _ = t.keep();
    }
    let log = dir.join("up.log");
    let last = std::fs::read_to_string(&log).ok().and_then(|t| {
        t.lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .map(str::to_owned)
    });
    match last {
        Some(line) => anyhow::anyhow!("{why}; see {}; its last line: {line}", log.display()),
        None => anyhow::anyhow!("{why}; see {}", log.display()),
    }
}

enum Conn {
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
    Tcp(tokio::net::TcpStream),
    New,
}

async fn connect(addr: SocketAddr, p: BenchProtocol) -> anyhow::Result<Conn> {
    if p == BenchProtocol::Http1New {
        return Ok(Conn::New);
    }
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    Ok(match p {
        BenchProtocol::Http1 | BenchProtocol::Http1New => {
            let (s, c) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
            tokio::spawn(c);
            Conn::H1(s)
        }
        BenchProtocol::Http2 => {
            let (s, c) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                    .await?;
            tokio::spawn(c);
            Conn::H2(s)
        }
        BenchProtocol::Tcp => Conn::Tcp(tcp),
    })
}

async fn one_request(conn: &mut Conn, addr: SocketAddr, p: BenchProtocol) -> anyhow::Result<()> {
    let req = || {
        Request::builder()
            .uri("/")
            .header(http::header::HOST, "server.bench")
            .body(Empty::<Bytes>::new())
    };
    match conn {
        Conn::H1(s) => {
            s.ready().await?;
            let rsp = s.send_request(req()?).await?;
            if !rsp.status().is_success() {
                bail!("status {}", rsp.status());
            }
            rsp.into_body().collect().await?;
        }
        Conn::H2(s) => {
            let mut r = req()?;
            *r.uri_mut() = "http://server.bench/".parse()?;
            let rsp = s.send_request(r).await?;
            if !rsp.status().is_success() {
                bail!("status {}", rsp.status());
            }
            rsp.into_body().collect().await?;
        }
        Conn::Tcp(t) => {
            let msg = [b'x'; 64];
            t.write_all(&msg).await?;
            let mut buf = [0u8; 64];
            t.read_exact(&mut buf).await?;
        }
        Conn::New => {
            let mut c = connect(addr, BenchProtocol::Http1).await?;
            Box::pin(one_request(&mut c, addr, BenchProtocol::Http1)).await?;
        }
    }
    let _ = p;
    Ok(())
}

/// Open loop at `rate` (or closed loop as fast as possible when `rate` is None).
///
/// Open loop: a dispatcher thread wakes at each intended send time (`std::thread::sleep` is
/// precise to tens of microseconds, tokio's timer only to a millisecond) and hands the
/// intended time to a connection's worker, round robin. Latency is measured from the intended
/// time, so a worker that falls behind charges its queueing to the requests it delayed.
async fn load(
    addr: SocketAddr,
    p: BenchProtocol,
    connections: usize,
    rate: Option<u64>,
    duration: Duration,
    mode: &'static str,
    progress: Arc<AtomicU64>,
) -> anyhow::Result<RunResult> {
    let start = Instant::now() + Duration::from_millis(50);
    let end = start + duration;
    let mut senders = Vec::new();
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
        senders.push(tx);
        let progress = progress.clone();
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            let mut errors = 0u64;
            let mut conn = connect(addr, p).await?;
            loop {
                let intended = match rate {
                    Some(_) => match rx.recv().await {
                        Some(t) => t,
                        None => break,
                    },
                    None => {
                        let now = Instant::now();
                        if now >= end {
                            break;
                        }
                        if now < start {
                            tokio::time::sleep_until(start.into()).await;
                        }
                        Instant::now()
                    }
                };
                let ok = one_request(&mut conn, addr, p).await.is_ok();
                let lat = intended.elapsed();
                if ok {
                    hist.saturating_record(lat.as_micros().max(1) as u64);
                } else {
                    errors += 1;
                    if let Ok(c2) = connect(addr, p).await {
                        conn = c2;
                    }
                }
                progress.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok((hist, errors))
        }));
    }
    let dispatcher = match rate {
        Some(r) if r > 0 => Some(std::thread::spawn(move || {
            let mut i: u64 = 0;
            loop {
                let t = start + Duration::from_secs_f64(i as f64 / r as f64);
                if t >= end {
                    break;
                }
                let now = Instant::now();
                if t > now {
                    std::thread::sleep(t - now);
                }
                let n = senders.len().max(1);
                if let Some(tx) = senders.get((i as usize) % n) {
                    let _ = tx.send(t);
                }
                i += 1;
            }
            // Dropping the senders ends the workers once their queues are drained.
        })),
        Some(_) => bail!("--rate must be at least 1"),
        None => {
            drop(senders);
            None
        }
    };
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut errors = 0;
    for t in tasks {
        let (h, e) = t.await??;
        hist.add(&h)?;
        errors += e;
    }
    if let Some(d) = dispatcher {
        let _ = d.join();
    }
    let elapsed = start.elapsed();
    Ok(RunResult {
        mode,
        rate,
        requests: hist.len(),
        errors,
        elapsed,
        hist,
        proxy_cpu: Vec::new(),
        cpu_resolution: 0.0,
    })
}

async fn run_with_progress(
    label: String,
    fut: impl std::future::Future<Output = anyhow::Result<RunResult>>,
    progress: Arc<AtomicU64>,
) -> anyhow::Result<RunResult> {
    progress.store(0, Ordering::Relaxed);
    let ticker = tokio::spawn({
        let progress = progress.clone();
        async move {
            let t0 = Instant::now();
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                eprint!(
                    "\r{label}: {} requests, {:.0}s   ",
                    progress.load(Ordering::Relaxed),
                    t0.elapsed().as_secs_f64()
                );
            }
        }
    });
    let r = fut.await;
    ticker.abort();
    eprint!("\r{:70}\r", "");
    r
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
    let app = backend(args.protocol).await?;
    println!("palisade: {}", palisade.display());
    let sidecar = proxy_bin(args.proxy_bin.as_deref(), &palisade);
    match &sidecar {
        Some(bin) => println!("sidecar: {}", bin.display()),
        None => println!("sidecar: palisade proxy"),
    }
    let mut mesh = start_mesh(
        &palisade,
        app,
        args.protocol,
        args.state_dir.as_deref(),
        sidecar.as_deref(),
    )
    .await?;
    let relays = if args.relays {
        Some(start_relays(app).await?)
    } else {
        None
    };
    let progress = Arc::new(AtomicU64::new(0));
    let mut results = Vec::new();
    let mut plan: Vec<Option<u64>> = args.rates.iter().map(|r| Some(*r)).collect();
    if !args.no_max {
        plan.push(None);
    }
    let usage = |procs: &[(String, u32)]| -> Vec<Option<(f64, u64)>> {
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
            let mut r = run_with_progress(
                label,
                load(
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
                if let (Some((c0, _)), Some((c1, _))) = (before[i], after[i]) {
                    r.proxy_cpu.push((name.clone(), (c1 - c0) / per_k));
                }
            }
            results.push(r);
        }
    }
    let proxies = hop_figures(&results, "mesh", &mesh.proxies);
    let relay_figures = relays
        .as_ref()
        .map(|r| hop_figures(&results, "relays", &r.procs));
    drop(relays);
    let _ = mesh.child.start_kill();
    let _ = mesh.child.wait().await;

    print_table(&results, &proxies, relay_figures.as_deref(), args.protocol);
    let added = added_latency(&results, "mesh");
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
            let added = added_latency(&results, "relays");
            doc["relays"] = serde_json::json!(relays);
            doc["relays_added_latency_ms"] = serde_json::json!({ "p50": added.0, "p99": added.1 });
        }
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        plot(path, &results)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The figures of the spec for each process of a mode (the proxies of the mesh, the relays):
/// CPU at the first fixed rate (else max throughput), peak RSS over the whole benchmark.
fn hop_figures(
    results: &[RunResult],
    mode: &str,
    procs: &[(String, u32)],
) -> Vec<serde_json::Value> {
    let reference = results
        .iter()
        .find(|r| r.mode == mode && r.rate.is_some())
        .or_else(|| results.iter().find(|r| r.mode == mode));
    let mut out = Vec::new();
    for (name, pid) in procs {
        let cpu = reference
            .and_then(|r| r.proxy_cpu.iter().find(|(n, _)| n == name))
            .map(|(_, c)| *c);
        let resolution = reference.map(|r| r.cpu_resolution).unwrap_or(0.0);
        if let (Some(cpu), Some((_, rss))) = (cpu, crate::support::proc_usage(*pid)) {
            out.push(serde_json::json!({
                "name": name,
                "cpu_seconds_per_1000_requests": cpu,
                "cpu_resolution_seconds_per_1000_requests": resolution,
                "peak_rss_bytes": rss,
                "rss_anon_bytes": crate::support::rss_anon(*pid),
            }));
        }
    }
    out
}

/// A mode's latency minus direct's at the first fixed rate.
fn added_latency(results: &[RunResult], mode: &str) -> (f64, f64) {
    let rate = results.iter().find_map(|r| r.rate);
    let find = |mode| results.iter().find(|r| r.mode == mode && r.rate == rate);
    match (find("direct"), find(mode)) {
        (Some(d), Some(m)) => (m.ms(0.5) - d.ms(0.5), m.ms(0.99) - d.ms(0.99)),
        _ => (0.0, 0.0),
    }
}

fn print_table(
    results: &[RunResult],
    proxies: &[serde_json::Value],
    relays: Option<&[serde_json::Value]>,
    p: BenchProtocol,
) {
    println!("protocol: {p:?}");
    println!(
        "{:<7} {:>9} {:>9} {:>7} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "mode",
        "rate",
        "requests",
        "errors",
        "rps",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "p999 ms",
        "max ms"
    );
    for r in results {
        println!(
            "{:<7} {:>9} {:>9} {:>7} {:>10.0} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3}",
            r.mode,
            r.rate
                .map(|x| x.to_string())
                .unwrap_or_else(|| "max".into()),
            r.requests,
            r.errors,
            r.requests as f64 / r.elapsed.as_secs_f64().max(1e-9),
            r.ms(0.5),
            r.ms(0.9),
            r.ms(0.99),
            r.ms(0.999),
            r.hist.max() as f64 / 1000.0
        );
    }
    let (a50, a99) = added_latency(results, "mesh");
    println!("added latency (mesh - direct): p50 {a50:.3} ms, p99 {a99:.3} ms");
    if let Some(relays) = relays {
        let (r50, r99) = added_latency(results, "relays");
        println!("added latency (relays - direct): p50 {r50:.3} ms, p99 {r99:.3} ms");
        for r in relays {
            println!(
                "relay {:<8} cpu {} s/1000 req (two plain TCP relays: the floor of two hops)",
                r["name"].as_str().unwrap_or("?"),
                cpu_figure(r),
            );
        }
        let cpu = |hops: &[serde_json::Value]| -> f64 {
            hops.iter()
                .filter_map(|h| h["cpu_seconds_per_1000_requests"].as_f64())
                .sum()
        };
        let (mesh_cpu, relay_cpu) = (cpu(proxies), cpu(relays));
        let ratio = if relay_cpu > 0.0 {
            format!("{:.1}x the CPU", mesh_cpu / relay_cpu)
        } else {
            "CPU of the relays below the clock's resolution".to_string()
        };
        println!(
            "mesh vs relays: {ratio}, p50 {:+.3} ms, p99 {:+.3} ms",
            a50 - r50,
            a99 - r99
        );
    }
    for px in proxies {
        println!(
            "proxy {:<8} cpu {} s/1000 req, peak RSS {:.1} MB (private {:.1} MB; the rest is the shared binary)",
            px["name"].as_str().unwrap_or("?"),
            cpu_figure(px),
            px["peak_rss_bytes"].as_f64().unwrap_or(0.0) / 1_048_576.0,
            px["rss_anon_bytes"].as_f64().unwrap_or(0.0) / 1_048_576.0
        );
    }
}

/// A hop's CPU figure with its resolution: `0.0452 ±0.0050`. /proc counts CPU time in clock
/// ticks (10 ms), so over N requests a figure per 1000 requests is only good to 10 s / N.
fn cpu_figure(hop: &serde_json::Value) -> String {
    let cpu = hop["cpu_seconds_per_1000_requests"].as_f64().unwrap_or(0.0);
    let res = hop["cpu_resolution_seconds_per_1000_requests"]
        .as_f64()
        .unwrap_or(0.0);
    // Down to the resolution's first significant digit, no further: more would be noise.
    let decimals = if res > 0.0 {
        (-res.log10()).ceil().clamp(1.0, 9.0) as usize
    } else {
        4
    };
    format!("{cpu:.decimals$} ±{res:.decimals$}")
}

/// Output files may go in a directory that does not exist yet (`.palisade/bench/`): it is
/// created 0700, as `up` wants its state directory, so a later `up` there does not refuse it.
fn create_parent(path: &Path) -> anyhow::Result<()> {
    let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) else {
        return Ok(());
    };
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(parent)
        .with_context(|| format!("cannot create {}", parent.display()))
}

/// The percentiles the plot's x axis marks.
const PLOT_TICKS: [(f64, &str); 4] = [(0.5, "p50"), (0.9, "p90"), (0.99, "p99"), (0.999, "p99.9")];

/// The x position of quantile `q`: the number of nines, so p50, p90, p99 and p99.9 spread out.
fn nines(q: f64) -> f64 {
    -(1.0f64 - q).log10()
}

/// The plot's x axis: [`nines`] from p20 to past p99.9, ticks at [`PLOT_TICKS`] only, each
/// labelled with its percentile.
struct PercentileAxis;

impl PercentileAxis {
    const RANGE: std::ops::Range<f64> = 0.2..3.1;
}

impl plotters::coord::ranged1d::Ranged for PercentileAxis {
    type FormatOption = plotters::coord::ranged1d::NoDefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        let span = Self::RANGE.end - Self::RANGE.start;
        let at = (value - Self::RANGE.start) / span;
        limit.0 + (f64::from(limit.1 - limit.0) * at).round() as i32
    }

    fn key_points<H: plotters::coord::ranged1d::KeyPointHint>(&self, hint: H) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            PLOT_TICKS.iter().map(|(q, _)| nines(*q)).collect()
        }
    }

    fn range(&self) -> std::ops::Range<f64> {
        Self::RANGE
    }
}

impl plotters::coord::ranged1d::ValueFormatter<f64> for PercentileAxis {
    fn format(value: &f64) -> String {
        PLOT_TICKS
            .iter()
            .find(|(q, _)| (nines(*q) - value).abs() < 1e-9)
            .map(|(_, name)| name.to_string())
            .unwrap_or_default()
    }
}

fn plot(path: &Path, results: &[RunResult]) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let quantiles = [0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999];
    // One line per mode and fixed rate; the closed-loop max-throughput runs measure something
    // else (and would flatten the rest), they are in the table and the JSON.
    /// (legend label, mode, points).
    type Series<'a> = (String, &'a str, Vec<(f64, f64)>);
    let series: Vec<Series> = results
        .iter()
        .filter_map(|r| {
            let rate = r.rate?;
            let pts = quantiles.iter().map(|q| (nines(*q), r.ms(*q))).collect();
            Some((format!("{} {rate} rps", r.mode), r.mode, pts))
        })
        .collect();
    let ymax = series
        .iter()
        .flat_map(|(_, _, p)| p.iter().map(|x| x.1))
        .fold(0.1f64, f64::max)
        * 1.1;
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "latency by percentile, per mode and rate",
            ("sans-serif", 20),
        )
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(PercentileAxis, 0.0f64..ymax)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (ms)")
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    // A colour family per mode, darker for higher rates.
    let mut seen: Vec<&str> = Vec::new();
    for (label, mode, pts) in series {
        let nth = seen.iter().filter(|m| **m == mode).count();
        seen.push(mode);
        let base: RGBColor = match mode {
            "direct" => BLUE,
            "relays" => GREEN,
            _ => RED,
        };
        let fade = 1.0 / (1.0 + nth as f64);
        let color = RGBColor(
            (f64::from(base.0) * fade) as u8,
            (f64::from(base.1) * fade) as u8,
            (f64::from(base.2) * fade) as u8,
        );
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}
