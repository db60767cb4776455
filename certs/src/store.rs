//! The credentials store: the current key and chain behind an atomic pointer. rustls asks the
//! store for a certificate on every handshake, so a renewal takes effect for the next handshake
//! with no config rebuild and no lock, while open connections keep the session they have.

use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};
use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::PrivateKeyDer;

use crate::bundle::TrustBundle;
use crate::spiffe::SpiffeId;
use crate::svid::Svid;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the SVID has no private key")]
    NoKey,
    #[error("the private key cannot be used for TLS: {0}")]
    BadKey(String),
    #[error("the SVID is for {got}, but this store holds {want}")]
    WrongIdentity { got: SpiffeId, want: SpiffeId },
}

/// What a handshake needs, plus the metadata renewal and metrics read.
#[derive(Debug)]
pub struct Credentials {
    pub svid: Svid,
    pub certified: Arc<CertifiedKey>,
}

/// Shared trust bundle: verifiers load it per handshake, so a bundle update (root rotation)
/// applies to the next handshake.
pub type SharedBundle = Arc<ArcSwap<TrustBundle>>;

/// The workload's own identity and its current credentials (absent until first certified).
#[derive(Debug)]
pub struct CredentialStore {
    id: SpiffeId,
    current: ArcSwapOption<Credentials>,
    bundle: SharedBundle,
}

impl CredentialStore {
    pub fn new(id: SpiffeId, bundle: TrustBundle) -> Arc<Self> {
        Arc::new(Self {
            id,
            current: ArcSwapOption::empty(),
            bundle: Arc::new(ArcSwap::from_pointee(bundle)),
        })
    }

    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    pub fn bundle(&self) -> &SharedBundle {
        &self.bundle
    }

    pub fn set_bundle(&self, bundle: TrustBundle) {
        self.bundle.store(Arc::new(bundle));
    }

    /// Installs new credentials; the next handshake uses them.
    pub fn install(&self, svid: Svid) -> Result<(), StoreError> {
        if svid.id != self.id {
            return Err(StoreError::WrongIdentity {
                got: svid.id.clone(),
                want: self.id.clone(),
            });
        }
        let key = svid.key.as_ref().ok_or(StoreError::NoKey)?;
        let signing = crate::tls::provider()
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(key.clone_key()))
            .map_err(|e| StoreError::BadKey(e.to_string()))?;
        let certified = Arc::new(CertifiedKey::new(svid.chain.clone(), signing));
        self.current
            .store(Some(Arc::new(Credentials { svid, certified })));
        Ok(())
    }

    pub fn current(&self) -> Option<Arc<Credentials>> {
        self.current.load_full()
    }

    /// Holds a certificate that has not expired: what `/ready` reports. An expired one is
    /// still presented until a renewal replaces it, and peers refuse it: the mesh fails
    /// closed, and a readiness probe takes the proxy out of rotation meanwhile.
    pub fn is_ready(&self) -> bool {
        let now = rustls_pki_types::UnixTime::now().as_secs();
        self.current
            .load()
            .as_ref()
            .is_some_and(|c| u64::try_from(c.svid.not_after).is_ok_and(|t| t > now))
    }

    /// Holds a certificate at all, expired or not.
    pub fn has_certificate(&self) -> bool {
        self.current.load().is_some()
    }

    /// Unix seconds at which the current certificate expires.
    pub fn expiry(&self) -> Option<i64> {
        self.current.load().as_ref().map(|c| c.svid.not_after)
    }
}

/// rustls resolver over the store (server side).
#[derive(Debug)]
pub struct StoreResolver(pub Arc<CredentialStore>);

impl ResolvesServerCert for StoreResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.current.load().as_ref().map(|c| c.certified.clone())
    }
}

impl ResolvesClientCert for StoreResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.0.current.load().as_ref().map(|c| c.certified.clone())
    }

    fn has_certs(&self) -> bool {
        self.0.has_certificate()
    }
}
