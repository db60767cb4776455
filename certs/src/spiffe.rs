//! SPIFFE IDs, validated exactly as the SPIFFE-ID standard says, so that an ID that passes here
//! is safe to compare byte for byte in authorization decisions.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// Longest SPIFFE ID we accept (the standard's "MUST accept up to").
pub const MAX_ID_LEN: usize = 2048;
/// Longest trust domain name.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Why a string is not a SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("SPIFFE ID is empty")]
    Empty,
    #[error("SPIFFE ID is longer than {MAX_ID_LEN} bytes")]
    TooLong,
    #[error("SPIFFE ID must start with spiffe://")]
    WrongScheme,
    #[error("SPIFFE ID has no trust domain")]
    MissingTrustDomain,
    #[error("trust domain is longer than {MAX_TRUST_DOMAIN_LEN} bytes")]
    TrustDomainTooLong,
    #[error(
        "trust domain may contain only lowercase letters, digits, '.', '-' and '_' (no port, no userinfo): {0:?}"
    )]
    BadTrustDomainChar(char),
    #[error("SPIFFE ID path has an empty segment")]
    EmptySegment,
    #[error("SPIFFE ID path has a '.' or '..' segment")]
    DotSegment,
    #[error("SPIFFE ID path ends with '/'")]
    TrailingSlash,
    #[error("SPIFFE ID path may contain only letters, digits, '.', '-' and '_': {0:?}")]
    BadPathChar(char),
    #[error("SPIFFE ID has a query or fragment")]
    QueryOrFragment,
    #[error(
        "SPIFFE ID {0} is not of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
    )]
    NotWorkloadId(String),
}

/// A validated trust domain name (`cluster.local`).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(Arc<str>);

impl TrustDomain {
    /// Validates a bare trust domain name.
    pub fn new(name: &str) -> Result<Self, SpiffeIdError> {
        validate_trust_domain(name)?;
        Ok(Self(name.into()))
    }

    /// `cluster.local`, the default trust domain (Kubernetes' default cluster domain, as
    /// Istio's).
    pub fn cluster_local() -> Self {
        Self("cluster.local".into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The ID of the trust domain itself (`spiffe://td`), which CA certificates carry.
    pub fn id(&self) -> SpiffeId {
        SpiffeId {
            full: format!("spiffe://{}", self.0).into(),
            td_len: self.0.len(),
        }
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// A validated SPIFFE ID. Cheap to clone: the string is shared.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    full: Arc<str>,
    td_len: usize,
}

const SCHEME: &str = "spiffe://";

impl SpiffeId {
    /// Parses and validates `spiffe://td/path`.
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if s.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        let rest = match s.get(..SCHEME.len()) {
            Some(p) if p.eq_ignore_ascii_case(SCHEME) => &s[SCHEME.len()..],
            _ => return Err(SpiffeIdError::WrongScheme),
        };
        if rest.contains(['?', '#']) {
            return Err(SpiffeIdError::QueryOrFragment);
        }
        let (td, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        validate_trust_domain(td)?;
        validate_path(path)?;
        // The scheme is case-insensitive; store it canonically so equality is byte equality.
        Ok(Self {
            full: format!("{SCHEME}{td}{path}").into(),
            td_len: td.len(),
        })
    }

    /// The Kubernetes-style workload ID `spiffe://td/ns/<ns>/sa/<sa>`.
    pub fn for_workload(
        td: &TrustDomain,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        Self::parse(&format!(
            "{SCHEME}{}/ns/{namespace}/sa/{service_account}",
            td.as_str()
        ))
    }

    pub fn as_str(&self) -> &str {
        &self.full
    }

    pub fn trust_domain_str(&self) -> &str {
        &self.full[SCHEME.len()..SCHEME.len() + self.td_len]
    }

    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.trust_domain_str().into())
    }

    /// The path, including its leading `/`; empty for a trust domain's own ID.
    pub fn path(&self) -> &str {
        &self.full[SCHEME.len() + self.td_len..]
    }

    /// The ID without `spiffe://` (Istio's principal format `td/ns/x/sa/y`).
    pub fn without_scheme(&self) -> &str {
        &self.full[SCHEME.len()..]
    }

    /// True for a trust domain's own ID, which a leaf SVID must never carry.
    pub fn is_root(&self) -> bool {
        self.path().is_empty()
    }

    /// `(namespace, service_account)` when the ID follows `/ns/<ns>/sa/<sa>`.
    pub fn namespace_and_sa(&self) -> Option<(&str, &str)> {
        let mut it = self.path().strip_prefix('/')?.split('/');
        match (it.next(), it.next(), it.next(), it.next(), it.next()) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
            _ => None,
        }
    }

    pub fn namespace(&self) -> Option<&str> {
        self.namespace_and_sa().map(|(ns, _)| ns)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.full)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

fn validate_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::MissingTrustDomain);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong);
    }
    match td
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
    {
        Some(c) => Err(SpiffeIdError::BadTrustDomainChar(c)),
        None => Ok(()),
    }
}

fn validate_path(path: &str) -> Result<(), SpiffeIdError> {
    if path.is_empty() {
        return Ok(());
    }
    if path.ends_with('/') {
        return Err(SpiffeIdError::TrailingSlash);
    }
    for seg in path[1..].split('/') {
        match seg {
            "" => return Err(SpiffeIdError::EmptySegment),
            "." | ".." => return Err(SpiffeIdError::DotSegment),
            _ => {}
        }
        if let Some(c) = seg
            .chars()
            .find(|c| !matches!(c, 'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_'))
        {
            return Err(SpiffeIdError::BadPathChar(c));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_ids() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/demo/sa/web").unwrap();
        assert_eq!(id.trust_domain_str(), "cluster.local");
        assert_eq!(id.path(), "/ns/demo/sa/web");
        assert_eq!(id.namespace_and_sa(), Some(("demo", "web")));
        assert_eq!(id.without_scheme(), "cluster.local/ns/demo/sa/web");
        assert!(!id.is_root());
        let root = SpiffeId::parse("spiffe://example.org").unwrap();
        assert!(root.is_root());
        assert_eq!(root.namespace(), None);
        // Scheme is case-insensitive and canonicalised.
        let upper = SpiffeId::parse("SPIFFE://td/a").unwrap();
        assert_eq!(upper.as_str(), "spiffe://td/a");
        let td = TrustDomain::new("cluster.local").unwrap();
        assert_eq!(td, TrustDomain::cluster_local());
        assert_eq!(
            SpiffeId::for_workload(&td, "demo", "api").unwrap(),
            SpiffeId::parse("spiffe://cluster.local/ns/demo/sa/api").unwrap()
        );
        assert_eq!(td.id().as_str(), "spiffe://cluster.local");
    }

    #[test]
    fn invalid_ids_each_have_their_reason() {
        use SpiffeIdError::*;
        let cases: &[(&str, SpiffeIdError)] = &[
            ("", Empty),
            ("http://td/a", WrongScheme),
            ("spiffe:/td/a", WrongScheme),
            ("spiffe:///a", MissingTrustDomain),
            ("spiffe://TD/a", BadTrustDomainChar('T')),
            ("spiffe://td:8080/a", BadTrustDomainChar(':')),
            ("spiffe://user@td/a", BadTrustDomainChar('@')),
            ("spiffe://td%41/a", BadTrustDomainChar('%')),
            ("spiffe://td//a", EmptySegment),
            ("spiffe://td/a/./b", DotSegment),
            ("spiffe://td/a/../b", DotSegment),
            ("spiffe://td/a/", TrailingSlash),
            ("spiffe://td/a%20b", BadPathChar('%')),
            ("spiffe://td/a?x=1", QueryOrFragment),
            ("spiffe://td/a#f", QueryOrFragment),
        ];
        for (input, want) in cases {
            assert_eq!(SpiffeId::parse(input).unwrap_err(), *want, "{input}");
        }
        let long = format!("spiffe://td/{}", "a".repeat(MAX_ID_LEN));
        assert_eq!(SpiffeId::parse(&long).unwrap_err(), TooLong);
        let long_td = format!("spiffe://{}/a", "a".repeat(256));
        assert_eq!(SpiffeId::parse(&long_td).unwrap_err(), TrustDomainTooLong);
        // Exactly at the limit is accepted.
        let at_limit = format!(
            "spiffe://td/{}",
            "a".repeat(MAX_ID_LEN - "spiffe://td/".len())
        );
        assert!(SpiffeId::parse(&at_limit).is_ok());
    }
}
