//! Palisade's identity core: SPIFFE IDs, the CA that issues X509-SVIDs, CSRs, SVID verification,
//! trust bundles, the rustls configs and verifiers of mesh mTLS, and the credentials store that
//! lets a renewed certificate take over without touching open connections.
//!
//! Everything that decides "who is this peer" lives here, so the proxy and the control plane
//! share one implementation of the SPIFFE rules.
#![forbid(unsafe_code)]

pub mod bundle;
pub mod ca;
pub mod csr;
pub mod pem;
pub mod spiffe;
pub mod store;
pub mod svid;
pub mod tls;
pub mod verify;

pub use bundle::TrustBundle;
pub use ca::{Ca, CaError};
pub use csr::KeyAndCsr;
pub use spiffe::{SpiffeId, SpiffeIdError, TrustDomain};
pub use store::{CredentialStore, Credentials, SharedBundle};
pub use svid::Svid;
pub use verify::{SvidError, verify_svid};

/// Parses a duration like `24h`, `90m`, `30s`, `1h30m` or `500ms`.
pub fn parse_duration(s: &str) -> Option<std::time::Duration> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    let mut total = std::time::Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        total += match unit {
            "ms" => std::time::Duration::from_millis(n),
            "s" => std::time::Duration::from_secs(n),
            "m" => std::time::Duration::from_secs(n.checked_mul(60)?),
            "h" => std::time::Duration::from_secs(n.checked_mul(3600)?),
            "d" => std::time::Duration::from_secs(n.checked_mul(86400)?),
            _ => return None,
        };
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("24h"), Some(Duration::from_secs(86400)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("10"), None);
        assert_eq!(parse_duration("h"), None);
        assert_eq!(parse_duration("5y"), None);
        assert_eq!(parse_duration(""), None);
    }
}
