//! An X509-SVID as held by a workload: its leaf, the chain up to (not including) the root, and
//! the private key when this process owns it.

use std::path::Path;

use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject};

use crate::ca::CaError;
use crate::pem::{certs_pem, encode, read_file, write_private, write_public};
use crate::spiffe::SpiffeId;

pub const CERT_FILE: &str = "cert.pem";
pub const KEY_FILE: &str = "key.pem";

pub struct Svid {
    pub id: SpiffeId,
    /// Leaf first, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: Option<PrivatePkcs8KeyDer<'static>>,
    /// Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
}

impl Clone for Svid {
    fn clone(&self) -> Self {
        Self {
            id: self.id.clone(),
            chain: self.chain.clone(),
            key: self.key.as_ref().map(|k| k.clone_key()),
            not_before: self.not_before,
            not_after: self.not_after,
        }
    }
}

impl std::fmt::Debug for Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Svid")
            .field("id", &self.id)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Svid {
    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }

    pub fn chain_pem(&self) -> String {
        certs_pem(&self.chain)
    }

    pub fn key_pem(&self) -> Option<String> {
        self.key
            .as_ref()
            .map(|k| encode("PRIVATE KEY", k.secret_pkcs8_der()))
    }

    /// Writes `cert.pem` (leaf then chain) and `key.pem` (0600) into `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), CaError> {
        std::fs::create_dir_all(dir).map_err(|source| CaError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
        if let Some(key) = self.key_pem() {
            write_private(&dir.join(KEY_FILE), &key)?;
        }
        write_public(&dir.join(CERT_FILE), &self.chain_pem())
    }

    /// Loads a cert chain and key from PEM files; the SPIFFE ID and validity come from the leaf.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, CaError> {
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(&read_file(cert_path)?)
                .collect::<Result<_, _>>()
                .map_err(|_| CaError::BadPem {
                    path: cert_path.to_path_buf(),
                    what: "certificate chain",
                })?;
        let key = match PrivateKeyDer::from_pem_slice(&read_file(key_path)?) {
            Ok(PrivateKeyDer::Pkcs8(k)) => k,
            _ => {
                return Err(CaError::BadPem {
                    path: key_path.to_path_buf(),
                    what: "PKCS#8 private key",
                });
            }
        };
        let bad = || CaError::BadPem {
            path: cert_path.to_path_buf(),
            what: "X509-SVID",
        };
        let leaf = chain.first().ok_or_else(bad)?;
        let info = crate::verify::inspect(leaf).map_err(|_| bad())?;
        let id = info.spiffe_id.ok_or_else(bad)?;
        Ok(Self {
            id,
            not_before: info.not_before,
            not_after: info.not_after,
            chain,
            key: Some(key),
        })
    }
}
