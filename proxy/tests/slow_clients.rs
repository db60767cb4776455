//! Floods of slow or heavy HTTP/1.1 clients against the inbound port (over mTLS with a valid
//! mesh certificate: an insider) and the outbound listener (the app's side), with legitimate
//! requests flowing through the same proxies:
//!
//! - slowloris: hundreds of connections that send a request head one header every 300 ms and
//!   never finish it. hyper's header read timer is a deadline, not reset by each byte, so each
//!   is closed at `PALISADE_HTTP_HEADER_TIMEOUT`, counted as `header_timeout`, and no partial
//!   request reaches the app;
//! - oversized bodies: concurrent 32 MiB uploads, streamed through both proxies to the app and
//!   back (the echo app answers with the body), never buffered whole: the process grows by
//!   far less than what is in flight.
//!
//! Each prints its figures (legitimate success and p99 during the attack, the process's RSS
//! and descriptors) for docs/reliability.md.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use palisade_proxy::config::Timeouts;
use support::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const HEADER_TIMEOUT: Duration = Duration::from_secs(2);

/// The two floods take turns: each measures this process's RSS and descriptors, and each holds
/// both ends of its connections here, so running side by side they would measure each other.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Takes this test's turn and lifts the descriptor limit (see [`raise_fd_limit`]).
async fn turn() -> tokio::sync::MutexGuard<'static, ()> {
    let guard = ONE_AT_A_TIME.lock().await;
    let limit = raise_fd_limit();
    println!("descriptor limit {limit}");
    guard
}

#[derive(Clone, Copy, Debug)]
enum Target {
    /// The server proxy's inbound port, over mTLS with web's valid certificate, ALPN
    /// `http/1.1`.
    Inbound,
    /// The client proxy's outbound listener, plain TCP from the app's side.
    Outbound,
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Connects as the attacker: one client configuration (certificate and all) shared by every
/// connection, as a real attacker would.
#[derive(Clone)]
struct Attacker {
    target: Target,
    addr: SocketAddr,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Attacker {
    fn new(m: &Mesh, target: Target) -> Attacker {
        match target {
            Target::Inbound => {
                let cert = m.pki.issue(WEB);
                Attacker {
                    target,
                    addr: m.server.inbound_addr,
                    tls: Some(tls_client_config(&m.pki, Some(&cert), b"http/1.1")),
                }
            }
            Target::Outbound => Attacker {
                target,
                addr: m.upstream,
                tls: None,
            },
        }
    }

    async fn connect(&self) -> Box<dyn Io> {
        match &self.tls {
            Some(cfg) => Box::new(
                within(tls_connect(self.addr, cfg.clone()))
                    .await
                    .expect("mTLS"),
            ),
            None => Box::new(
                within(tokio::net::TcpStream::connect(self.addr))
                    .await
                    .expect("connect"),
            ),
        }
    }

    /// The proxy that serves the target, and the direction it counts under.
    fn victim<'m>(&self, m: &'m Mesh) -> (&'m palisade_proxy::Proxy, &'static str) {
        match self.target {
            Target::Inbound => (&m.server, "inbound"),
            Target::Outbound => (&m.client, "outbound"),
        }
    }
}

async fn mesh_with_header_timeout() -> (Mesh, EchoApp) {
    let app = echo_app().await;
    let m = mesh(
        app.addr,
        MeshOpts {
            timeouts: Timeouts {
                header_read: HEADER_TIMEOUT,
                ..test_timeouts()
            },
            ..MeshOpts::default()
        },
    )
    .await;
    // The pair's pooled connection exists before the attack, as in a running mesh.
    assert_eq!(get(m.upstream, "/").await.expect("warm").status, 200);
    (m, app)
}

/// A slowloris connection: a request head begun and continued one header every 300 ms, never
/// finished. Returns how long after its first byte the proxy closed it (None: still open when
/// the attacker gave up, after 20 s).
async fn slowloris(mut io: Box<dyn Io>) -> Option<Duration> {
    let started = Instant::now();
    if io
        .write_all(b"GET /slowloris HTTP/1.1\r\nhost: api.demo\r\n")
        .await
        .is_err()
    {
        return Some(started.elapsed());
    }
    let mut buf = [0u8; 1024];
    for i in 0..70 {
        tokio::select! {
            r = io.read(&mut buf) => {
                // A response (a 408 or anything else) or the close: either way the proxy
                // ended the request; wait for the close itself.
                if matches!(r, Ok(0) | Err(_)) {
                    return Some(started.elapsed());
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(300)) => {
                let header = format!("x-slow-{i}: a\r\n");
                if io.write_all(header.as_bytes()).await.is_err() {
                    return Some(started.elapsed());
                }
            }
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_are_closed_at_the_header_timeout() {
    let _turn = turn().await;
    for (target, n) in [(Target::Inbound, 200), (Target::Outbound, 1_000)] {
        let (m, mut app) = mesh_with_header_timeout().await;
        let attacker = Attacker::new(&m, target);
        let (rss0, fds0) = (rss_mib(), open_fds());
        let legit = Legit::start(m.upstream, 4);
        let started = Instant::now();
        let mut conns = Vec::with_capacity(n);
        for _ in 0..n {
            conns.push(attacker.connect().await);
        }
        let opened_in = started.elapsed();
        let (rss_peak, fds_peak) = (rss_mib(), open_fds());
        let tasks: Vec<_> = conns
            .into_iter()
            .map(|io| tokio::spawn(slowloris(io)))
            .collect();
        let mut closed_after = Vec::with_capacity(n);
        for t in tasks {
            closed_after.push(within_for(Duration::from_secs(30), t).await.expect("task"));
        }
        let (requests, ok, p99) = legit.finish().await;
        let longest = closed_after.iter().flatten().max().copied();
        println!(
            "slowloris against {target:?}: {n} connections opened in {opened_in:.2?}, each \
             trickling a header every 300 ms; all closed by the proxy, the last {longest:?} \
             after its first byte (timeout {HEADER_TIMEOUT:?}); legitimate {ok}/{requests} ok, \
             p99 {p99:.2?}; RSS {rss0:.1} -> {rss_peak:.1} MiB, descriptors {fds0} -> {fds_peak}"
        );
        // Every one closed by the proxy, none allowed to outlast the deadline by trickling.
        assert!(
            closed_after.iter().all(Option::is_some),
            "{target:?}: {} of {n} still open after 20 s",
            closed_after.iter().filter(|c| c.is_none()).count()
        );
        let limit = HEADER_TIMEOUT + Duration::from_secs(3);
        assert!(
            longest.is_some_and(|l| l < limit),
            "{target:?}: a connection lasted {longest:?}, over {limit:?}"
        );
        assert!(
            requests >= 20 && ok * 100 >= requests * 99,
            "{target:?}: legitimate {ok}/{requests}"
        );
        let (p, dir) = attacker.victim(&m);
        wait_metric(
            p,
            "palisade_http_connection_errors_total",
            &[("direction", dir), ("reason", "header_timeout")],
            n as f64,
        )
        .await;
        // No partial request reached the app.
        let mut reached = 0;
        while let Ok(path) = app.arrivals.try_recv() {
            reached += usize::from(path == "/slowloris");
        }
        assert_eq!(
            reached, 0,
            "{target:?}: a slowloris request reached the app"
        );
        assert_eq!(get(m.upstream, "/").await.expect("after").status, 200);
    }
}

/// How far one upload got: printed if the uploads do not finish in time.
#[derive(Default, Debug)]
struct Progress {
    written: AtomicUsize,
    read: AtomicUsize,
    done: AtomicBool,
    /// Why the writer stopped before the end of the body, if it did.
    write_error: std::sync::Mutex<Option<String>>,
}

/// One upload of `size` bytes with `content-length`, reading the echoed body while writing;
/// returns the status and how many body bytes came back.
async fn upload(io: Box<dyn Io>, size: usize, progress: Arc<Progress>) -> (u16, usize) {
    // Both halves in this one task, and a failed write ends the upload (a writer that gave up
    // silently would leave the reader waiting for an echo that cannot end).
    let (mut r, mut w) = tokio::io::split(io);
    let writer = async {
        let head = format!(
            "POST /upload HTTP/1.1\r\nhost: api.demo\r\ncontent-length: {size}\r\n\
             connection: close\r\n\r\n"
        );
        w.write_all(head.as_bytes()).await?;
        let chunk = vec![b'u'; 64 * 1024];
        let mut left = size;
        while left > 0 {
            let n = left.min(chunk.len());
            w.write_all(&chunk[..n]).await?;
            left -= n;
            progress.written.fetch_add(n, Ordering::Relaxed);
        }
        w.flush().await
    };
    // The head, then the body to its end (the proxy closes after it: `connection: close`).
    let mut got = Vec::with_capacity(64 * 1024);
    let mut body_from = None;
    let mut total = 0usize;
    let reader = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(k) => {
                    total += k;
                    progress.read.store(total, Ordering::Relaxed);
                    if body_from.is_none() {
                        got.extend_from_slice(&buf[..k]);
                        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                            body_from = Some(end + 4);
                        }
                    }
                }
            }
        }
    };
    {
        tokio::pin!(writer, reader);
        let mut writing = true;
        loop {
            tokio::select! {
                res = &mut writer, if writing => {
                    writing = false;
                    if let Err(e) = res {
                        if let Ok(mut slot) = progress.write_error.lock() {
                            *slot = Some(e.to_string());
                        }
                        // What the proxy answered before the write failed (a 4xx and a
                        // close) is still there to read; a little while for it, no more.
                        let _ = tokio::time::timeout(Duration::from_secs(2), &mut reader).await;
                        break;
                    }
                }
                () = &mut reader => break,
            }
        }
    }
    progress.done.store(true, Ordering::Relaxed);
    let text = String::from_utf8_lossy(&got);
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|t| t.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    // Chunked framing adds a few bytes per chunk: count what is at least the body.
    (status, total.saturating_sub(body_from.unwrap_or(total)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_stream_through_without_growing_the_proxy() {
    let _turn = turn().await;
    const UPLOADS: usize = 8;
    const SIZE: usize = 32 << 20;
    for target in [Target::Inbound, Target::Outbound] {
        let (m, _app) = mesh_with_header_timeout().await;
        let attacker = Attacker::new(&m, target);
        let rss0 = rss_mib();
        let legit = Legit::start(m.upstream, 4);
        let started = Instant::now();
        let mut tasks = Vec::new();
        let mut progress = Vec::new();
        for _ in 0..UPLOADS {
            let io = attacker.connect().await;
            let p = Arc::new(Progress::default());
            progress.push(p.clone());
            tasks.push(tokio::spawn(upload(io, SIZE, p)));
        }
        // Sample the process while the bodies are in flight (a second here; bounded at 120 s
        // for a slow machine).
        let mut rss_peak = rss0;
        while !tasks.iter().all(|t| t.is_finished()) {
            rss_peak = rss_peak.max(rss_mib());
            if started.elapsed() > Duration::from_secs(120) {
                let (p, dir) = attacker.victim(&m);
                panic!(
                    "{target:?}: uploads unfinished after {:.0?}: {progress:?}; {dir} \
                     connection errors: {:?}",
                    started.elapsed(),
                    p.metrics()
                        .encode()
                        .lines()
                        .filter(|l| l.starts_with("palisade_http_connection_errors_total"))
                        .collect::<Vec<_>>(),
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut results = Vec::new();
        for t in tasks {
            results.push(within(t).await.expect("upload"));
        }
        let took = started.elapsed();
        let (requests, ok, p99) = legit.finish().await;
        let sent_mib = (UPLOADS * SIZE) as f64 / f64::from(1 << 20);
        println!(
            "oversized bodies against {target:?}: {UPLOADS} uploads of {} MiB at once, echoed \
             back, in {took:.2?}; legitimate {ok}/{requests} ok, p99 {p99:.2?}; RSS {rss0:.1} \
             -> peak {rss_peak:.1} MiB while {sent_mib:.0} MiB went each way",
            SIZE >> 20
        );
        for (i, (status, echoed)) in results.iter().enumerate() {
            assert_eq!(*status, 200, "{target:?}: upload {i}");
            assert!(
                *echoed >= SIZE,
                "{target:?}: upload {i} echoed {echoed} of {SIZE} bytes"
            );
        }
        assert!(
            requests >= 20 && ok * 100 >= requests * 99,
            "{target:?}: legitimate {ok}/{requests}"
        );
        // Streamed, not buffered: far less than one upload's size, let alone all of them.
        assert!(
            rss_peak - rss0 < 48.0,
            "{target:?}: {sent_mib:.0} MiB of uploads grew the process by {:.1} MiB",
            rss_peak - rss0
        );
    }
}
