//! Trust bundles: the roots of each trust domain. A domain may hold several roots at once, so a
//! trust anchor can be rotated by publishing old and new together, then dropping the old one.

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine;
use rustls_pki_types::{CertificateDer, TrustAnchor, pem::PemObject};

use crate::ca::CaError;
use crate::spiffe::TrustDomain;

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("certificate is not a valid trust anchor")]
    BadAnchor,
    #[error("no certificates found in PEM")]
    Empty,
    #[error("bad PEM: {0}")]
    Pem(String),
    #[error("bad SPIFFE bundle JSON: {0}")]
    Json(String),
    #[error(transparent)]
    Io(#[from] CaError),
}

#[derive(Clone, Default)]
struct DomainRoots {
    ders: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
}

/// Roots per trust domain, plus a sequence number that changes on every update.
#[derive(Clone, Default)]
pub struct TrustBundle {
    domains: BTreeMap<TrustDomain, DomainRoots>,
    sequence: u64,
}

impl std::fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let counts: Vec<_> = self
            .domains
            .iter()
            .map(|(td, r)| (td.as_str(), r.ders.len()))
            .collect();
        f.debug_struct("TrustBundle")
            .field("domains", &counts)
            .field("sequence", &self.sequence)
            .finish()
    }
}

impl TrustBundle {
    pub fn new() -> Self {
        Self::default()
    }

    /// A bundle with the given roots for one domain.
    pub fn with_roots(
        td: &TrustDomain,
        roots: impl IntoIterator<Item = CertificateDer<'static>>,
    ) -> Result<Self, BundleError> {
        let mut b = Self::new();
        for r in roots {
            b.add_root(td, r)?;
        }
        Ok(b)
    }

    /// Adds a root (no-op if already present) and bumps the sequence.
    pub fn add_root(
        &mut self,
        td: &TrustDomain,
        der: CertificateDer<'static>,
    ) -> Result<(), BundleError> {
        let anchor = webpki::anchor_from_trusted_cert(&der)
            .map_err(|_| BundleError::BadAnchor)?
            .to_owned();
        let roots = self.domains.entry(td.clone()).or_default();
        if !roots.ders.contains(&der) {
            roots.ders.push(der);
            roots.anchors.push(anchor);
            self.sequence += 1;
        }
        Ok(())
    }

    /// Removes a root (end of a rotation). Returns whether it was there.
    pub fn remove_root(&mut self, td: &TrustDomain, der: &CertificateDer<'_>) -> bool {
        let Some(roots) = self.domains.get_mut(td) else {
            return false;
        };
        let Some(i) = roots.ders.iter().position(|d| d.as_ref() == der.as_ref()) else {
            return false;
        };
        roots.ders.remove(i);
        roots.anchors.remove(i);
        self.sequence += 1;
        true
    }

    pub fn anchors(&self, td: &str) -> Option<&[TrustAnchor<'static>]> {
        // BTreeMap lookup by &str needs a TrustDomain; domains are few, so a scan is fine.
        self.domains
            .iter()
            .find(|(k, _)| k.as_str() == td)
            .map(|(_, r)| r.anchors.as_slice())
            .filter(|a| !a.is_empty())
    }

    pub fn roots(&self, td: &TrustDomain) -> &[CertificateDer<'static>] {
        self.domains
            .get(td)
            .map(|r| r.ders.as_slice())
            .unwrap_or_default()
    }

    pub fn trust_domains(&self) -> impl Iterator<Item = &TrustDomain> {
        self.domains.keys()
    }

    pub fn sequence(&self) -> u64 {
        self.sequence
    }

    pub fn set_sequence(&mut self, seq: u64) {
        self.sequence = seq;
    }

    /// Adds every certificate in a PEM blob as a root of `td`.
    pub fn add_pem(&mut self, td: &TrustDomain, pem: &[u8]) -> Result<usize, BundleError> {
        let ders: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<_, _>>()
            .map_err(|e| BundleError::Pem(format!("{e:?}")))?;
        if ders.is_empty() {
            return Err(BundleError::Empty);
        }
        let n = ders.len();
        for d in ders {
            self.add_root(td, d)?;
        }
        Ok(n)
    }

    pub fn load_pem(td: &TrustDomain, path: &Path) -> Result<Self, BundleError> {
        let data = std::fs::read(path).map_err(|source| {
            BundleError::Io(CaError::Read {
                path: path.to_path_buf(),
                source,
            })
        })?;
        let mut b = Self::new();
        b.add_pem(td, &data)?;
        Ok(b)
    }

    pub fn to_pem(&self, td: &TrustDomain) -> String {
        crate::pem::certs_pem(self.roots(td))
    }

    /// The SPIFFE bundle format (RFC 7517 JWK Set) for one trust domain.
    pub fn to_spiffe_json(&self, td: &TrustDomain, refresh_hint_secs: u64) -> serde_json::Value {
        let b64 = base64::engine::general_purpose::STANDARD;
        let b64url = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let keys: Vec<serde_json::Value> = self
            .roots(td)
            .iter()
            .filter_map(|der| {
                let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
                let point = cert.public_key().subject_public_key.data.as_ref();
                // Uncompressed EC point: 0x04 || X || Y.
                let (crv, n) = match point.len() {
                    65 => ("P-256", 32),
                    97 => ("P-384", 48),
                    _ => return None,
                };
                if point[0] != 4 {
                    return None;
                }
                Some(serde_json::json!({
                    "kty": "EC",
                    "use": "x509-svid",
                    "crv": crv,
                    "x": b64url.encode(&point[1..1 + n]),
                    "y": b64url.encode(&point[1 + n..]),
                    "x5c": [b64.encode(der.as_ref())],
                }))
            })
            .collect();
        serde_json::json!({
            "keys": keys,
            "spiffe_sequence": self.sequence,
            "spiffe_refresh_hint": refresh_hint_secs,
        })
    }

    /// Reads a SPIFFE bundle (JWK Set): `x509-svid` entries' first `x5c` value become roots.
    pub fn from_spiffe_json(td: &TrustDomain, json: &str) -> Result<Self, BundleError> {
        let v: serde_json::Value =
            serde_json::from_str(json).map_err(|e| BundleError::Json(e.to_string()))?;
        let keys = v
            .get("keys")
            .and_then(|k| k.as_array())
            .ok_or_else(|| BundleError::Json("missing \"keys\" array".into()))?;
        let mut b = Self::new();
        for k in keys {
            if k.get("use").and_then(|u| u.as_str()) != Some("x509-svid") {
                continue;
            }
            let Some(first) = k
                .get("x5c")
                .and_then(|x| x.as_array())
                .and_then(|a| a.first())
                .and_then(|s| s.as_str())
            else {
                continue;
            };
            let der = base64::engine::general_purpose::STANDARD
                .decode(first)
                .map_err(|e| BundleError::Json(format!("x5c: {e}")))?;
            b.add_root(td, CertificateDer::from(der))?;
        }
        if let Some(seq) = v.get("spiffe_sequence").and_then(|s| s.as_u64()) {
            b.sequence = seq;
        }
        Ok(b)
    }
}
