//! mTLS for the data plane, on top of `palisade_certs::tls`: the ALPN protocols spoken between
//! proxies, per-endpoint client configs, and error classification for metrics.

use std::sync::Arc;

use palisade_certs::{CredentialStore, SpiffeId};
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::ServerName;

/// HTTP requests multiplexed over one connection per peer endpoint.
pub const ALPN_H2: &[u8] = palisade_certs::tls::ALPN_H2;
/// HTTP/1.1, for upgrades (WebSocket), which are not multiplexed.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";
/// The app's bytes, unchanged.
pub const ALPN_OPAQUE: &[u8] = palisade_certs::tls::ALPN_OPAQUE;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alpn {
    H2,
    Http1,
    Opaque,
}

/// Client configs for one expected peer identity, one per ALPN. They read the credentials
/// store at each handshake, so a renewed certificate is used without rebuilding them.
pub struct ClientConfigs {
    h2: Arc<ClientConfig>,
    http1: Arc<ClientConfig>,
    opaque: Arc<ClientConfig>,
}

impl ClientConfigs {
    pub fn new(store: &Arc<CredentialStore>, expected: SpiffeId) -> Result<Self, rustls::Error> {
        let mk = |alpn: &[u8]| {
            palisade_certs::tls::client_config(store, expected.clone(), &[alpn]).map(|mut c| {
                // Bigger records mean fewer syscalls and AEAD calls per request body.
                c.max_fragment_size = None;
                Arc::new(c)
            })
        };
        Ok(ClientConfigs {
            h2: mk(ALPN_H2)?,
            http1: mk(ALPN_HTTP1)?,
            opaque: mk(ALPN_OPAQUE)?,
        })
    }

    pub fn get(&self, alpn: Alpn) -> Arc<ClientConfig> {
        match alpn {
            Alpn::H2 => self.h2.clone(),
            Alpn::Http1 => self.http1.clone(),
            Alpn::Opaque => self.opaque.clone(),
        }
    }
}

/// Mesh peers are identified by SPIFFE ID, not by name; SNI is off and the verifier ignores
/// the server name, so any fixed name does.
pub fn server_name() -> ServerName<'static> {
    ServerName::try_from("palisade.mesh").unwrap_or(ServerName::IpAddress(
        std::net::IpAddr::from([127, 0, 0, 1]).into(),
    ))
}

/// The inbound server config: client SVID required, ALPN h2 / http/1.1 / opaque.
pub fn inbound_server_config(
    store: &Arc<CredentialStore>,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let accept = Some(store.id().trust_domain());
    let cfg =
        palisade_certs::tls::server_config(store, accept, &[ALPN_H2, ALPN_HTTP1, ALPN_OPAQUE])?;
    Ok(Arc::new(cfg))
}

/// The metric reason of a failed handshake that tokio-rustls reported as an `io::Error`.
pub fn io_error_reason(e: &std::io::Error) -> &'static str {
    if let Some(inner) = e.get_ref()
        && let Some(tls) = inner.downcast_ref::<rustls::Error>()
    {
        return palisade_certs::tls::handshake_error_reason(tls);
    }
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof => "eof",
        std::io::ErrorKind::TimedOut => "timeout",
        std::io::ErrorKind::ConnectionReset => "reset",
        _ => "io",
    }
}
