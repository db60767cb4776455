//! Opaque TCP: bidirectional copy with half-close, counted in `palisade_tcp_bytes_total`.

use tokio::io::{AsyncRead, AsyncWrite};

use crate::telemetry::{DirLabels, Direction, Metrics};

/// Copies both ways until both sides are done. A FIN from one side is passed on as a
/// shutdown of the other side's write half, so half-closed protocols keep working.
pub async fn splice<A, B>(
    metrics: &Metrics,
    direction: Direction,
    a: &mut A,
    b: &mut B,
) -> std::io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let r = tokio::io::copy_bidirectional(a, b).await;
    if let Ok((ab, ba)) = r {
        metrics
            .tcp_bytes
            .get_or_create(&DirLabels { direction })
            .inc_by(ab + ba);
    }
    r
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
