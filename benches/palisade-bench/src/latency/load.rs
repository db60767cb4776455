//! The load: the backend app the bench measures against, and the open-loop (or, at max
//! throughput, closed-loop) generator with one connection per worker.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::BenchProtocol;
use super::report::RunResult;

pub(crate) async fn backend(protocol: BenchProtocol) -> anyhow::Result<SocketAddr> {
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
pub(super) async fn load(
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

pub(super) async fn run_with_progress(
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
