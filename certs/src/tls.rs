//! rustls configs for mesh mTLS: TLS 1.3 only, ring, no session resumption (connections are
//! pooled, and a resumed session would skip the identity check of the verifier), SPIFFE verifiers.

use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::spiffe::{SpiffeId, TrustDomain};
use crate::store::{CredentialStore, SharedBundle, StoreResolver};
use crate::verify::{SvidError, verify_svid};

/// ALPN for HTTP/2 between proxies.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN for opaque TCP between proxies: the stream is the app's bytes, nothing else.
pub const ALPN_OPAQUE: &[u8] = b"palisade.dev/opaque";

/// The process's one crypto provider: ring, with the post-quantum hybrid X25519MLKEM768
/// preferred for key exchange ([`crate::kx`]; docs/ARCHITECTURE.md says why). Configs are built
/// with it explicitly, so nothing depends on a process-default provider having been installed.
pub fn provider() -> &'static Arc<CryptoProvider> {
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| Arc::new(crate::kx::provider()))
}

/// Installs the same provider as the process default, for libraries (tonic) that build their
/// own configs.
pub fn install_default_provider() {
    let _ = crate::kx::provider().install_default();
}

fn to_rustls(e: SvidError) -> rustls::Error {
    let cert_err = match e {
        SvidError::Expired(_) => CertificateError::Expired,
        SvidError::NotYetValid(_) => CertificateError::NotValidYet,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(cert_err)
}

/// Recovers our reason from a rustls handshake error, for metrics.
pub fn handshake_error_reason(e: &rustls::Error) -> &'static str {
    match e {
        rustls::Error::InvalidCertificate(CertificateError::Expired) => "expired",
        rustls::Error::InvalidCertificate(CertificateError::NotValidYet) => "not_yet_valid",
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => inner
            .downcast_ref::<SvidError>()
            .map(|s| s.reason())
            .unwrap_or("invalid_certificate"),
        rustls::Error::InvalidCertificate(_) => "invalid_certificate",
        rustls::Error::NoCertificatesPresented => "no_client_certificate",
        rustls::Error::AlertReceived(_) => "alert_received",
        rustls::Error::NoApplicationProtocol => "alpn",
        rustls::Error::PeerIncompatible(_) => "incompatible",
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
            "bad_message"
        }
        _ => "other",
    }
}

/// Client side: the server must present a valid SVID with exactly the expected SPIFFE ID.
#[derive(Debug)]
pub struct ExpectedServerVerifier {
    bundle: SharedBundle,
    expected: SpiffeId,
}

impl ExpectedServerVerifier {
    pub fn new(bundle: SharedBundle, expected: SpiffeId) -> Self {
        Self { bundle, expected }
    }
}

impl ServerCertVerifier for ExpectedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut chain = Vec::with_capacity(1 + intermediates.len());
        chain.push(end_entity.clone());
        chain.extend(intermediates.iter().cloned());
        let bundle = self.bundle.load();
        let id = verify_svid(&chain, &bundle, None, now).map_err(to_rustls)?;
        if id != self.expected {
            return Err(to_rustls(SvidError::UnexpectedIdentity {
                got: id,
                want: self.expected.clone(),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Server side: the client must present a valid SVID from an accepted trust domain. Which
/// identity it is does not matter here; authorization decides that after the handshake.
#[derive(Debug)]
pub struct SvidClientVerifier {
    bundle: SharedBundle,
    accept: Option<TrustDomain>,
    mandatory: bool,
}

impl SvidClientVerifier {
    pub fn new(bundle: SharedBundle, accept: Option<TrustDomain>) -> Self {
        Self {
            bundle,
            accept,
            mandatory: true,
        }
    }

    /// A verifier that also admits clients without a certificate (the control plane's API,
    /// where a bootstrapping proxy has only a token). A certificate that is sent must still be
    /// a valid SVID.
    pub fn optional(bundle: SharedBundle, accept: Option<TrustDomain>) -> Self {
        Self {
            bundle,
            accept,
            mandatory: false,
        }
    }
}

impl ClientCertVerifier for SvidClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let mut chain = Vec::with_capacity(1 + intermediates.len());
        chain.push(end_entity.clone());
        chain.extend(intermediates.iter().cloned());
        let bundle = self.bundle.load();
        verify_svid(&chain, &bundle, self.accept.as_ref(), now).map_err(to_rustls)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A server config that requires a client SVID and presents the store's current SVID.
pub fn server_config(
    store: &Arc<CredentialStore>,
    accept: Option<TrustDomain>,
    alpn: &[&[u8]],
) -> Result<ServerConfig, rustls::Error> {
    let verifier = SvidClientVerifier::new(store.bundle().clone(), accept);
    build_server_config(store, verifier, alpn)
}

/// A server config like [`server_config`] where the client certificate is optional.
pub fn server_config_optional_client(
    store: &Arc<CredentialStore>,
    accept: Option<TrustDomain>,
    alpn: &[&[u8]],
) -> Result<ServerConfig, rustls::Error> {
    let verifier = SvidClientVerifier::optional(store.bundle().clone(), accept);
    build_server_config(store, verifier, alpn)
}

fn build_server_config(
    store: &Arc<CredentialStore>,
    verifier: SvidClientVerifier,
    alpn: &[&[u8]],
) -> Result<ServerConfig, rustls::Error> {
    let mut cfg = ServerConfig::builder_with_provider(provider().clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(StoreResolver(store.clone())));
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(cfg)
}

/// A client config that presents the store's SVID and accepts only `expected` as the server.
pub fn client_config(
    store: &Arc<CredentialStore>,
    expected: SpiffeId,
    alpn: &[&[u8]],
) -> Result<ClientConfig, rustls::Error> {
    build_client_config(store, expected, alpn, true)
}

/// A client config like [`client_config`] that presents no certificate: for asking the
/// control plane for a new one with a token when the current one has expired (an expired
/// certificate would fail the handshake before the token is read).
pub fn client_config_without_cert(
    store: &Arc<CredentialStore>,
    expected: SpiffeId,
    alpn: &[&[u8]],
) -> Result<ClientConfig, rustls::Error> {
    build_client_config(store, expected, alpn, false)
}

fn build_client_config(
    store: &Arc<CredentialStore>,
    expected: SpiffeId,
    alpn: &[&[u8]],
    present_svid: bool,
) -> Result<ClientConfig, rustls::Error> {
    let verifier = Arc::new(ExpectedServerVerifier::new(
        store.bundle().clone(),
        expected,
    ));
    let builder = ClientConfig::builder_with_provider(provider().clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut cfg = if present_svid {
        builder.with_client_cert_resolver(Arc::new(StoreResolver(store.clone())))
    } else {
        builder.with_no_client_auth()
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    cfg.resumption = rustls::client::Resumption::disabled();
    cfg.enable_sni = false;
    Ok(cfg)
}

/// The verified peer's SPIFFE ID after a handshake (None if it sent no certificate).
pub fn peer_identity(conn: &rustls::CommonState) -> Option<SpiffeId> {
    let leaf = conn.peer_certificates()?.first()?;
    crate::verify::peer_id(leaf).ok()
}

/// The verified peer's SPIFFE ID and when its certificate expires (Unix seconds).
pub fn peer_identity_until(conn: &rustls::CommonState) -> Option<(SpiffeId, i64)> {
    let leaf = conn.peer_certificates()?.first()?;
    crate::verify::peer_id_until(leaf).ok()
}

/// The current TLS serving certificate of a server that is not a mesh workload (the injector
/// webhook): swapped in place when it is renewed, so the next handshake presents the new one
/// and open connections are untouched.
pub struct ServingCertStore {
    current: arc_swap::ArcSwap<rustls::sign::CertifiedKey>,
    not_after: std::sync::atomic::AtomicI64,
}

impl std::fmt::Debug for ServingCertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingCertStore")
            .field("not_after", &self.not_after())
            .finish_non_exhaustive()
    }
}

fn certified(cert: &crate::ca::ServingCert) -> Result<rustls::sign::CertifiedKey, rustls::Error> {
    let key = provider()
        .key_provider
        .load_private_key(rustls_pki_types::PrivateKeyDer::Pkcs8(cert.key.clone_key()))?;
    Ok(rustls::sign::CertifiedKey::new(cert.chain.clone(), key))
}

impl ServingCertStore {
    pub fn new(cert: &crate::ca::ServingCert) -> Result<Arc<Self>, rustls::Error> {
        Ok(Arc::new(Self {
            current: arc_swap::ArcSwap::from_pointee(certified(cert)?),
            not_after: std::sync::atomic::AtomicI64::new(cert.not_after),
        }))
    }

    /// Serves `cert` from the next handshake on.
    pub fn install(&self, cert: &crate::ca::ServingCert) -> Result<(), rustls::Error> {
        self.current.store(Arc::new(certified(cert)?));
        self.not_after
            .store(cert.not_after, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// When the certificate being served expires (Unix seconds).
    pub fn not_after(&self) -> i64 {
        self.not_after.load(std::sync::atomic::Ordering::Acquire)
    }
}

#[derive(Debug)]
struct ServingResolver(Arc<ServingCertStore>);

impl rustls::server::ResolvesServerCert for ServingResolver {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.current.load_full())
    }
}

/// A server config for HTTPS to clients outside the mesh (the Kubernetes API server calling
/// the injector webhook): no client certificate asked, TLS 1.2 and 1.3 (the API server's
/// `--tls-min-version` may be 1.2), the store's certificate, these ALPN protocols.
pub fn serving_config(
    store: Arc<ServingCertStore>,
    alpn: &[&[u8]],
) -> Result<ServerConfig, rustls::Error> {
    let mut cfg = ServerConfig::builder_with_provider(provider().clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(ServingResolver(store)));
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
}
