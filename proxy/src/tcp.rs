//! Opaque TCP: bidirectional copy with half-close and an idle timeout, counted in
//! `palisade_tcp_bytes_total`.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::telemetry::{DirLabels, Direction, Metrics};

/// Copies both ways until both sides are done, or until neither side has sent a byte for
/// `idle`. A FIN from one side is passed on as a shutdown of the other side's write half, so
/// half-closed protocols keep working. The idle timeout keeps a forgotten or hostile tunnel
/// from holding two descriptors for ever.
pub async fn splice<A, B>(
    metrics: &Metrics,
    direction: Direction,
    a: &mut A,
    b: &mut B,
    idle: Duration,
) -> std::io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let start = tokio::time::Instant::now();
    // Milliseconds since `start` of the last byte read from either side.
    let last = AtomicU64::new(0);
    let mut a = Activity {
        inner: a,
        last: &last,
        start,
    };
    let mut b = Activity {
        inner: b,
        last: &last,
        start,
    };
    let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
    tokio::pin!(copy);
    let r = loop {
        let quiet_since = start + Duration::from_millis(last.load(Ordering::Relaxed));
        tokio::select! {
            r = &mut copy => break r,
            _ = tokio::time::sleep_until(quiet_since + idle) => {
                let seen = start + Duration::from_millis(last.load(Ordering::Relaxed));
                if seen + idle <= tokio::time::Instant::now() {
                    metrics.refuse(direction, "tcp_idle_timeout");
                    return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "idle timeout"));
                }
            }
        }
    };
    if let Ok((ab, ba)) = r {
        metrics
            .tcp_bytes
            .get_or_create(&DirLabels { direction })
            .inc_by(ab + ba);
    }
    r
}

/// A stream that notes when it last delivered bytes.
struct Activity<'a, T: ?Sized> {
    inner: &'a mut T,
    last: &'a AtomicU64,
    start: tokio::time::Instant,
}

impl<T: AsyncRead + Unpin + ?Sized> AsyncRead for Activity<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut *self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
            self.last.store(ms, Ordering::Relaxed);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin + ?Sized> AsyncWrite for Activity<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

/// Connects to `addr` with a timeout and `TCP_NODELAY`.
pub async fn connect(
    addr: std::net::SocketAddr,
    timeout: std::time::Duration,
) -> std::io::Result<tokio::net::TcpStream> {
    let tcp = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// The next connection on a listener, or None once the proxy stops. An accept error (such as
/// running out of file descriptors) is logged and retried after a pause instead of ending the
/// listener.
pub(crate) async fn accept(
    listener: &tokio::net::TcpListener,
    stop: &mut tokio::sync::watch::Receiver<bool>,
    what: &'static str,
) -> Option<(tokio::net::TcpStream, std::net::SocketAddr)> {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => return Some(x),
                Err(e) => {
                    tracing::warn!(listener = what, error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            },
            _ = stop.changed() => return None,
        }
    }
}
