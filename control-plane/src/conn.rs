//! Accepting API connections: TCP, then our own rustls handshake, then the stream goes to
//! tonic carrying the verified peer identity.
//!
//! The handshake is done here rather than by tonic's TLS so that the server presents the
//! control plane's renewable SVID (through the credential store) and verifies clients as
//! SPIFFE SVIDs, and so that the handler can read the caller's SPIFFE ID from the request
//! extensions ([`PeerInfo`]) to decide what it may have.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use palisade_certs::SpiffeId;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

use crate::metrics::{Metrics, ReasonLabel};

/// A client that has not finished its handshake by then is dropped, so idle sockets cannot
/// pile up.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who is on the other end of an API connection. Available in every request's extensions.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote: SocketAddr,
    /// The SPIFFE ID of the verified client SVID; None when the client sent no certificate
    /// (a bootstrapping proxy that has only its token).
    pub identity: Option<SpiffeId>,
}

impl PeerInfo {
    /// The peer of a request, if the request came through [`accept_loop`].
    pub fn of<T>(req: &tonic::Request<T>) -> Option<&PeerInfo> {
        req.extensions().get::<PeerInfo>()
    }
}

/// A TLS stream with its peer info, as tonic's server wants it.
#[derive(Debug)]
pub struct PeerStream {
    inner: TlsStream<TcpStream>,
    info: PeerInfo,
}

impl Connected for PeerStream {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepts connections until `stop` flips, handshaking each in its own task (a slow client
/// must not hold up the others) and handing finished streams to `out`.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    metrics: Arc<Metrics>,
    out: mpsc::Sender<PeerStream>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let (tcp, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "control-plane accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let metrics = metrics.clone();
        let out = out.clone();
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    // Closed before finishing without a TLS alert: a port probe (`palisade
                    // up` waits for the port this way) or a client that went away. Not a
                    // handshake failure worth an alarm.
                    tracing::debug!(%remote, "connection closed before the TLS handshake finished");
                    return;
                }
                Ok(Err(e)) => {
                    let reason = e
                        .get_ref()
                        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                        .map(palisade_certs::tls::handshake_error_reason)
                        .unwrap_or("io");
                    metrics
                        .handshake_errors
                        .get_or_create(&ReasonLabel { reason })
                        .inc();
                    tracing::info!(%remote, reason, error = %e, "control-plane TLS handshake failed");
                    return;
                }
                Err(_) => {
                    metrics
                        .handshake_errors
                        .get_or_create(&ReasonLabel { reason: "timeout" })
                        .inc();
                    tracing::info!(%remote, "control-plane TLS handshake timed out");
                    return;
                }
            };
            let identity = palisade_certs::tls::peer_identity(stream.get_ref().1);
            tracing::debug!(%remote, peer = ?identity, "control-plane connection");
            let _ = out
                .send(PeerStream {
                    inner: stream,
                    info: PeerInfo { remote, identity },
                })
                .await;
        });
    }
}
