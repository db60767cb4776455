//! `palisade bench idle` (`palisade-bench idle`): what an idle client connection costs the
//! proxies in memory.
//!
//! A mesh as the latency benchmark runs it (`palisade up`: a client proxy with a local
//! upstream port, a server proxy, this process's HTTP/1.1 app), and N connections to the
//! client proxy's upstream port, held open by this process:
//!
//! - keep-alive: each sends one GET and reads the whole response, then stays open and idle,
//!   as a client's connection pool leaves it;
//! - silent: each is opened and sends nothing; read past the proxy's detection timeout (the
//!   HTTP/1.1 server waits for a request head), and, on a mesh whose detection timeout is
//!   longer than the reading takes, while still in detection.
//!
//! Each proxy's VmRSS and RssAnon (its current resident set, not its peak) are read before
//! and with the N connections open, once they stop moving; the cost per connection is the
//! difference divided by N. Each set gets a mesh of its own: memory the proxy freed when the
//! keep-alive set closed stays in the allocator (the reading after they closed shows how
//! much), and a later set would reuse it and look free.
//!
//! Kernel socket buffers are not in either reading: they are not the process's pages.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::latency::BenchProtocol;
use crate::latency::mesh::{self, Mesh};
use crate::support::Resident;

/// Connections being opened (and, for the keep-alive set, served) at once.
const CONCURRENCY: usize = 200;
/// Files this process and the client proxy hold besides the N connections: listeners, the
/// app's connections, logs, the control plane's and the admin port's connections.
const SPARE_FILES: u64 = 200;
/// The proxy's default connection limit; raised for the bench when N would not fit in it.
const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// The proxy's protocol-detection timeout, set explicitly (it is the default): a silent
/// connection leaves detection after it for the HTTP/1.1 server of its (HTTP) service.
const DETECT_TIMEOUT: Duration = Duration::from_secs(1);
/// The detection timeout of the mesh whose silent connections are read while still in
/// detection: longer than opening and reading them takes.
const LONG_DETECT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an HTTP/1.1 connection may sit without a request head before the proxy closes it,
/// set explicitly (it is the default): every reading must come before it.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Readings this far apart that agree within 1% mean the proxies have stopped moving.
const SETTLE_STEP: Duration = Duration::from_millis(200);
const SETTLE_LIMIT: Duration = Duration::from_secs(10);
/// For one connection to open (and be answered).
const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);

#[derive(clap::Args)]
pub struct IdleArgs {
    /// Idle connections to hold open through the client proxy.
    #[arg(long, default_value_t = 10_000)]
    pub connections: usize,
    /// Write the figures as JSON.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The sidecar binary to measure. Default: as for the latency benchmark, `palisade-proxy`
    /// next to the `palisade` binary (or next to this one), else `palisade proxy`.
    #[arg(long, env = "PALISADE_PROXY_BIN")]
    pub proxy_bin: Option<PathBuf>,
    /// Keep the generated meshes (logs) here instead of temporary directories.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
}

pub fn run(args: IdleArgs, palisade_bin: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let n = args.connections;
    if n == 0 {
        bail!("--connections must be at least 1");
    }
    // Before anything starts: the mesh's processes inherit the limit from this one.
    let need = n as u64 + SPARE_FILES;
    let soft = crate::support::raise_nofile_limit()?;
    if soft.is_some_and(|s| s < need) {
        let (soft, hard) = crate::support::nofile_limit()?;
        let show = |l: Option<u64>| l.map_or_else(|| "unlimited".to_string(), |l| l.to_string());
        if hard.is_some_and(|h| h < need) {
            bail!(
                "--connections {n} needs {need} open files in this process and in the client \
                 proxy, above the hard open-files limit (RLIMIT_NOFILE) of {}: raise it \
                 (`ulimit -Hn`, LimitNOFILE=) or ask for fewer connections",
                show(hard)
            );
        }
        bail!(
            "--connections {n} needs {need} open files in this process and in the client proxy, \
             above the soft open-files limit of {}, which could not be raised: run \
             `ulimit -n {}` first",
            show(soft),
            show(hard)
        );
    }
    if let Some(out) = &args.out {
        crate::latency::create_parent(out)?;
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(bench(args, palisade_bin))
}

/// One proxy's readings.
#[derive(Debug, Clone, Default, PartialEq)]
struct ProxyFigures {
    name: String,
    baseline: Resident,
    keepalive: Resident,
    keepalive_closed: Resident,
    silent_baseline: Resident,
    silent: Resident,
    detecting_baseline: Resident,
    detecting: Resident,
}

fn per_connection(after: u64, before: u64, n: usize) -> f64 {
    (after as f64 - before as f64) / n as f64
}

impl ProxyFigures {
    fn json(&self, n: usize) -> serde_json::Value {
        let mut doc = serde_json::json!({ "name": self.name });
        let readings = [
            ("baseline", self.baseline),
            ("keepalive", self.keepalive),
            ("keepalive_closed", self.keepalive_closed),
            ("silent_baseline", self.silent_baseline),
            ("silent", self.silent),
            ("detecting_baseline", self.detecting_baseline),
            ("detecting", self.detecting),
        ];
        for (name, r) in readings {
            doc[format!("{name}_rss_bytes")] = r.rss.into();
            doc[format!("{name}_anon_bytes")] = r.anon.into();
        }
        let costs = [
            ("keepalive", self.keepalive, self.baseline),
            ("silent", self.silent, self.silent_baseline),
            ("detecting", self.detecting, self.detecting_baseline),
        ];
        for (name, with, base) in costs {
            doc[format!("{name}_bytes_per_connection")] =
                per_connection(with.rss, base.rss, n).into();
            doc[format!("{name}_anon_bytes_per_connection")] =
                per_connection(with.anon, base.anon, n).into();
        }
        doc
    }
}

/// What every mesh of the run shares.
struct Setup {
    palisade: PathBuf,
    sidecar: Option<PathBuf>,
    app: SocketAddr,
    state_dir: Option<PathBuf>,
    max_connections: usize,
}

/// A mesh ready to measure: warmed up, idle, its proxies' baseline read.
struct Ready {
    mesh: Mesh,
    client_admin: SocketAddr,
    baseline: Vec<Resident>,
}

impl Setup {
    /// A fresh mesh for one set of connections (its logs under `STATE_DIR/SET`), whose
    /// proxies give up protocol detection after `detect`.
    async fn start(&self, set: &str, detect: Duration) -> anyhow::Result<Ready> {
        let env = [
            ("PALISADE_MAX_CONNECTIONS", self.max_connections.to_string()),
            (
                "PALISADE_DETECT_TIMEOUT",
                format!("{}ms", detect.as_millis()),
            ),
            (
                "PALISADE_HTTP_HEADER_TIMEOUT",
                format!("{}s", IDLE_TIMEOUT.as_secs()),
            ),
        ];
        let dir = self.state_dir.as_ref().map(|d| d.join(set));
        let mesh = mesh::start_mesh(
            &self.palisade,
            self.app,
            BenchProtocol::Http1,
            dir.as_deref(),
            self.sidecar.as_deref(),
            &env,
        )
        .await?;
        let client_admin = mesh
            .admins
            .iter()
            .find(|(name, _)| name == "client")
            .map(|(_, a)| *a)
            .context("the bench mesh has no client proxy admin address")?;
        // Paths, pools and the mTLS connection to the server proxy, set up before the
        // baseline: what every connection costs, not what the first one does.
        let warm = keepalive_connection(mesh.client_addr)
            .await
            .context("the warm-up request through the mesh failed")?;
        drop(warm);
        wait_open(client_admin, "the warm-up connection to close", |open| {
            open == 0.0
        })
        .await?;
        let baseline = settle(&mesh.proxies, Instant::now()).await?;
        Ok(Ready {
            mesh,
            client_admin,
            baseline,
        })
    }

    /// N silent connections on a fresh mesh, read `read_after` once the proxy has accepted
    /// them all: (the proxies, their baseline, their reading).
    async fn silent(
        &self,
        set: &str,
        n: usize,
        detect: Duration,
        read_after: Duration,
    ) -> anyhow::Result<(Vec<(String, u32)>, Vec<Resident>, Vec<Resident>)> {
        let mut ready = self.start(set, detect).await?;
        eprintln!("opening {n} silent connections ({set})");
        let addr = ready.mesh.client_addr;
        let opened = Instant::now();
        let held = open_all(n, "silent", move |_| silent_connection(addr)).await?;
        wait_open(
            ready.client_admin,
            "the proxy to accept every silent connection",
            |open| open >= n as f64,
        )
        .await?;
        let reading = settle(&ready.mesh.proxies, Instant::now() + read_after).await?;
        let open = open_connections(ready.client_admin).await?;
        if open < n as f64 {
            bail!(
                "the client proxy had {open} connections open when read, not the {n} silent \
                 ones held"
            );
        }
        if read_after.is_zero() && opened.elapsed() >= detect {
            bail!(
                "the silent connections took {:.0}s to open and read, past the {}s detection \
                 timeout they were to be read within",
                opened.elapsed().as_secs_f64(),
                detect.as_secs()
            );
        }
        drop(held);
        stop(&mut ready.mesh).await;
        Ok((ready.mesh.proxies, ready.baseline, reading))
    }
}

async fn bench(args: IdleArgs, palisade_bin: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let n = args.connections;
    let palisade = crate::support::palisade_bin(palisade_bin.as_deref())?;
    let sidecar = mesh::proxy_bin(args.proxy_bin.as_deref(), &palisade);
    println!("palisade: {}", palisade.display());
    match &sidecar {
        Some(bin) => println!("sidecar: {}", bin.display()),
        None => println!("sidecar: palisade proxy"),
    }
    let setup = Setup {
        palisade,
        sidecar,
        app: crate::latency::load::backend(BenchProtocol::Http1).await?,
        state_dir: args.state_dir.clone(),
        max_connections: DEFAULT_MAX_CONNECTIONS.max(n + 64),
    };

    // Keep-alive: N connections that have each had one request answered.
    let mut ka = setup.start("keepalive", DETECT_TIMEOUT).await?;
    eprintln!("opening {n} keep-alive connections");
    let addr = ka.mesh.client_addr;
    let first_request = Instant::now();
    let held = open_all(n, "keep-alive", move |_| keepalive_connection(addr)).await?;
    let keepalive = settle(&ka.mesh.proxies, Instant::now()).await?;
    let open = open_connections(ka.client_admin).await?;
    let age = first_request.elapsed();
    if open < n as f64 || age >= IDLE_TIMEOUT {
        bail!(
            "the client proxy had {open} connections open when read, not the {n} idle \
             keep-alive ones held ({:.0}s after the first was answered; it closes an HTTP/1.1 \
             connection idle for {}s)",
            age.as_secs_f64(),
            IDLE_TIMEOUT.as_secs()
        );
    }
    drop(held);
    wait_open(
        ka.client_admin,
        "the keep-alive connections to close",
        |open| open == 0.0,
    )
    .await?;
    let keepalive_closed = settle(&ka.mesh.proxies, Instant::now()).await?;
    stop(&mut ka.mesh).await;

    // Silent: N connections that have sent nothing, each on a fresh mesh. Read once they have
    // all left detection (the HTTP/1.1 server then waits for a request head: where a silent
    // connection spends the rest of its life), and read while still in detection, with a
    // detection timeout long enough to read them within.
    let (silent_procs, silent_baseline, silent) = setup
        .silent("silent", n, DETECT_TIMEOUT, DETECT_TIMEOUT)
        .await?;
    let (detecting_procs, detecting_baseline, detecting) = setup
        .silent("detecting", n, LONG_DETECT_TIMEOUT, Duration::ZERO)
        .await?;

    let mut figures = Vec::new();
    for (i, (name, _)) in ka.mesh.proxies.iter().enumerate() {
        let at = |procs: &[(String, u32)]| procs.iter().position(|(s, _)| s == name);
        let (Some(j), Some(k)) = (at(&silent_procs), at(&detecting_procs)) else {
            continue;
        };
        figures.push(ProxyFigures {
            name: name.clone(),
            baseline: ka.baseline[i],
            keepalive: keepalive[i],
            keepalive_closed: keepalive_closed[i],
            silent_baseline: silent_baseline[j],
            silent: silent[j],
            detecting_baseline: detecting_baseline[k],
            detecting: detecting[k],
        });
    }
    print_table(n, setup.max_connections, &figures);
    if let Some(path) = &args.out {
        let doc = serde_json::json!({
            "connections": n,
            "max_connections": setup.max_connections,
            "detect_timeout_s": DETECT_TIMEOUT.as_secs_f64(),
            "keepalive_idle_timeout_s": IDLE_TIMEOUT.as_secs_f64(),
            "keepalive_read_after_s": age.as_secs_f64(),
            "proxies": figures.iter().map(|f| f.json(n)).collect::<Vec<_>>(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn stop(mesh: &mut Mesh) {
    let _ = mesh.child.start_kill();
    let _ = mesh.child.wait().await;
}

fn print_table(n: usize, max_connections: usize, figures: &[ProxyFigures]) {
    const MIB: f64 = 1_048_576.0;
    println!(
        "{n} idle connections through the client proxy (its max_connections {max_connections}; \
         HTTP/1.1 idle timeout {}s, detection timeout {}s)",
        IDLE_TIMEOUT.as_secs(),
        DETECT_TIMEOUT.as_secs_f64()
    );
    println!(
        "{:<7} {:<34} {:>9} {:>9} {:>12} {:>12}",
        "proxy", "reading", "RSS MiB", "anon MiB", "RSS B/conn", "anon B/conn"
    );
    for f in figures {
        let rows = [
            (
                "baseline (after a warm-up request)".to_string(),
                f.baseline,
                None,
            ),
            (
                format!("{n} keep-alive, idle"),
                f.keepalive,
                Some(f.baseline),
            ),
            ("after they closed".to_string(), f.keepalive_closed, None),
            ("baseline, fresh mesh".to_string(), f.silent_baseline, None),
            (
                format!("{n} silent, past detection"),
                f.silent,
                Some(f.silent_baseline),
            ),
            (
                "baseline, fresh mesh".to_string(),
                f.detecting_baseline,
                None,
            ),
            (
                format!("{n} silent, in detection"),
                f.detecting,
                Some(f.detecting_baseline),
            ),
        ];
        for (what, r, base) in rows {
            let per = |after: u64, before: u64| format!("{:.0}", per_connection(after, before, n));
            println!(
                "{:<7} {:<34} {:>9.1} {:>9.1} {:>12} {:>12}",
                f.name,
                what,
                r.rss as f64 / MIB,
                r.anon as f64 / MIB,
                base.map(|b| per(r.rss, b.rss)).unwrap_or_default(),
                base.map(|b| per(r.anon, b.anon)).unwrap_or_default(),
            );
        }
    }
}

/// Opens `n` connections with `open`, [`CONCURRENCY`] at a time, each within
/// [`CONNECTION_DEADLINE`], and returns them all, open.
async fn open_all<F, Fut>(n: usize, what: &'static str, open: F) -> anyhow::Result<Vec<TcpStream>>
where
    F: Fn(usize) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = anyhow::Result<TcpStream>> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..CONCURRENCY.min(n) {
        let (next, open) = (next.clone(), open.clone());
        workers.push(tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return anyhow::Ok(held);
                }
                let tcp = tokio::time::timeout(CONNECTION_DEADLINE, open(i))
                    .await
                    .map_err(|_| {
                        anyhow::anyhow!(
                            "{what} connection {i} of {n} did not open within {}s",
                            CONNECTION_DEADLINE.as_secs()
                        )
                    })?
                    .with_context(|| format!("{what} connection {i} of {n}"))?;
                held.push(tcp);
            }
        }));
    }
    let mut all = Vec::with_capacity(n);
    for w in workers {
        all.extend(w.await.context("a connection worker panicked")??);
    }
    Ok(all)
}

/// A connection to the client proxy that has had one GET answered in full and is left open.
async fn keepalive_connection(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: server.bench\r\n\r\n")
        .await?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 1024];
    let rsp = loop {
        if let Some(r) = crate::support::http1_response(&buf)? {
            break r;
        }
        let n = tcp.read(&mut chunk).await?;
        if n == 0 {
            bail!("the proxy closed the connection before a whole response");
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    if rsp.status != 200 {
        bail!("the mesh answered {} through the client proxy", rsp.status);
    }
    if rsp.close {
        bail!("the proxy answered with Connection: close: it would not keep the connection");
    }
    Ok(tcp)
}

async fn silent_connection(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    Ok(TcpStream::connect(addr).await?)
}

/// The client proxy's open connections, all directions.
async fn open_connections(admin: SocketAddr) -> anyhow::Result<f64> {
    let (status, text) = crate::support::get(admin, "/metrics").await?;
    if !status.is_success() {
        bail!("{admin}/metrics answered {status}");
    }
    Ok(crate::support::metric_sum(&text, "palisade_tcp_open_connections").unwrap_or(0.0))
}

/// Polls the proxy's open-connections gauge until `done` says so, within 30 s.
async fn wait_open(
    admin: SocketAddr,
    what: &str,
    done: impl Fn(f64) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let open = open_connections(admin).await?;
        if done(open) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("waited 30s for {what}; the client proxy still has {open} connections open");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn read_all(procs: &[(String, u32)]) -> anyhow::Result<Vec<Resident>> {
    procs
        .iter()
        .map(|(name, pid)| {
            crate::support::resident(*pid)
                .with_context(|| format!("the {name} proxy (pid {pid}) is gone"))
        })
        .collect()
}

fn agree(a: &[Resident], b: &[Resident]) -> bool {
    let close = |x: u64, y: u64| x.abs_diff(y) * 100 <= x.max(y);
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(a, b)| close(a.rss, b.rss) && close(a.anon, b.anon))
}

/// Each proxy's reading once two in a row, [`SETTLE_STEP`] apart and none before
/// `not_before`, agree within 1%; after [`SETTLE_LIMIT`] the last one, with a warning.
async fn settle(procs: &[(String, u32)], not_before: Instant) -> anyhow::Result<Vec<Resident>> {
    tokio::time::sleep_until(not_before.into()).await;
    let deadline = Instant::now() + SETTLE_LIMIT;
    let mut prev = read_all(procs)?;
    loop {
        tokio::time::sleep(SETTLE_STEP).await;
        let now = read_all(procs)?;
        if agree(&prev, &now) {
            return Ok(now);
        }
        if Instant::now() > deadline {
            eprintln!(
                "warning: the proxies' memory was still moving after {}s; using the last reading",
                SETTLE_LIMIT.as_secs()
            );
            return Ok(now);
        }
        prev = now;
    }
}

#[cfg(test)]
mod tests {
    use crate::support::Resident;

    #[test]
    fn readings_agree_within_one_percent_of_each_figure() {
        let r = |rss, anon| Resident { rss, anon };
        assert!(super::agree(&[r(1000, 500)], &[r(1010, 495)]));
        assert!(!super::agree(&[r(1000, 500)], &[r(1000, 510)]));
        assert!(!super::agree(&[r(1000, 500)], &[]));
    }

    #[test]
    fn the_cost_per_connection_is_the_difference_over_n_and_may_be_negative() {
        assert_eq!(super::per_connection(3_000, 1_000, 1_000), 2.0);
        assert_eq!(super::per_connection(1_000, 3_000, 1_000), -2.0);
        let f = super::ProxyFigures {
            name: "client".into(),
            baseline: Resident {
                rss: 10_000,
                anon: 4_000,
            },
            keepalive: Resident {
                rss: 30_000,
                anon: 14_000,
            },
            ..Default::default()
        };
        let j = f.json(10);
        assert_eq!(j["keepalive_bytes_per_connection"], 2_000.0);
        assert_eq!(j["keepalive_anon_bytes_per_connection"], 1_000.0);
        assert_eq!(j["name"], "client");
    }
}
