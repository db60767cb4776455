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
