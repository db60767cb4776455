//! PEM files: keys are written 0600 and never world-readable, even for an instant.

use std::path::Path;

use base64::Engine;
use rustls_pki_types::CertificateDer;

use crate::ca::CaError;

pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>, CaError> {
    std::fs::read(path).map_err(|source| CaError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Replaces `path` whole (temp file + rename): a symlink or file planted there is replaced,
/// never written through.
fn write_mode(path: &Path, contents: &str, mode: u32) -> Result<(), CaError> {
    crate::secure_fs::write_atomic(path, contents.as_bytes(), mode).map_err(|source| {
        CaError::Write {
            path: path.to_path_buf(),
            source,
        }
    })
}

pub(crate) fn write_private(path: &Path, contents: &str) -> Result<(), CaError> {
    write_mode(path, contents, 0o600)
}

pub(crate) fn write_public(path: &Path, contents: &str) -> Result<(), CaError> {
    write_mode(path, contents, 0o644)
}

/// PEM-encodes DER with the given label.
pub fn encode(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 64);
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    out
}

pub fn cert_pem(der: &CertificateDer<'_>) -> String {
    encode("CERTIFICATE", der)
}

pub fn certs_pem(ders: &[CertificateDer<'_>]) -> String {
    ders.iter().map(|d| cert_pem(d)).collect()
}
