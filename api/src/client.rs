//! Connecting to the control plane: a tonic [`Channel`] whose transport is our own TCP + rustls
//! connector rather than tonic's built-in TLS.
//!
//! Why not tonic's TLS: it verifies the server by DNS name against web PKI roots, while a
//! Palisade proxy must verify the control plane by its SPIFFE ID against the mesh trust bundle,
//! and must present its own SVID from the credential store that renews it in place. The caller builds that `rustls::ClientConfig` (normally
//! `palisade_certs::tls::client_config(store, control_plane_id, &[b"h2"])`) and this module only
//! dials, handshakes and hands the stream to tonic. The channel reconnects through the same
//! connector, so a reconnect after a renewal presents the new certificate.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// How long dialing plus the TLS handshake may take before `connect` gives up.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The server name passed to rustls. SNI is disabled in the mesh configs and the verifier checks
/// the SPIFFE ID, not a DNS name, so any syntactically valid name does; a fixed one keeps the
/// connector independent of how the address was spelled.
const SERVER_NAME: &str = "control-plane.palisade.invalid";

/// Why a connection to the control plane could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The address cannot be turned into a URI (should not happen for a `SocketAddr`).
    #[error("invalid control-plane address {addr}: {message}")]
    Address { addr: SocketAddr, message: String },
    /// TCP, TLS or HTTP/2 setup failed; the message carries the whole cause chain, since tonic's
    /// own error prints only "transport error".
    #[error("cannot connect to the control plane at {addr}: {message}")]
    Transport { addr: SocketAddr, message: String },
    /// Nothing answered within [`CONNECT_TIMEOUT`].
    #[error("connecting to the control plane at {addr} timed out after {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
}

/// Joins an error and its sources into one line.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

/// Opens a gRPC channel to the control plane at `addr`, over mTLS configured by `tls` (whose
/// ALPN should offer `h2`). The first connection is made eagerly, so a refused handshake (wrong
/// control-plane identity, untrusted root) is reported here rather than on the first call.
pub async fn connect(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
) -> Result<Channel, ConnectError> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| ConnectError::Address {
            addr,
            message: chain(&e),
        })?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true);
    let connector = tokio_rustls::TlsConnector::from(tls);
    let service = tower::service_fn(move |_: Uri| {
        let connector = connector.clone();
        async move {
            let tcp = TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from(SERVER_NAME)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            let stream = connector.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    });
    match tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect_with_connector(service)).await {
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(e)) => Err(ConnectError::Transport {
            addr,
            message: chain(&e),
        }),
        Err(_) => Err(ConnectError::Timeout {
            addr,
            timeout: CONNECT_TIMEOUT,
        }),
    }
}
