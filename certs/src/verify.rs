//! X509-SVID verification: the chain against the bundle of the SVID's own trust domain, then the
//! leaf rules of the X509-SVID standard. Every rejection has its own error so that metrics and
//! logs say exactly why a peer was refused.

use rustls_pki_types::{CertificateDer, UnixTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use crate::bundle::TrustBundle;
use crate::spiffe::{SpiffeId, SpiffeIdError, TrustDomain};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvidError {
    #[error("no certificate presented")]
    NoCertificate,
    #[error("certificate cannot be parsed")]
    Malformed,
    #[error("certificate has no URI SAN")]
    NoUriSan,
    #[error("certificate has {0} URI SANs; an X509-SVID has exactly one")]
    MultipleUriSans(usize),
    #[error("URI SAN {0:?} is not a spiffe:// ID")]
    NotSpiffe(String),
    #[error("URI SAN is not a valid SPIFFE ID: {0}")]
    InvalidId(SpiffeIdError),
    #[error("leaf SVID carries the trust domain's root ID {0}")]
    RootPathId(SpiffeId),
    #[error("leaf certificate is a CA (basicConstraints cA=TRUE)")]
    CaLeaf,
    #[error("leaf certificate may sign certificates or CRLs (keyCertSign/cRLSign)")]
    SigningLeaf,
    #[error("leaf key usage is missing, not critical, or lacks digitalSignature")]
    BadKeyUsage,
    #[error("leaf extended key usage lacks serverAuth or clientAuth")]
    BadExtendedKeyUsage,
    #[error("SVID of trust domain {got} is not accepted here (expected {want})")]
    ForeignTrustDomain { got: String, want: TrustDomain },
    #[error("no trust bundle for trust domain {0}")]
    NoBundle(String),
    #[error("certificate expired at unix time {0}")]
    Expired(i64),
    #[error("certificate is not valid before unix time {0}")]
    NotYetValid(i64),
    #[error("certificate chain does not verify against the trust bundle: {0}")]
    UntrustedChain(String),
    #[error("peer is {got}, expected {want}")]
    UnexpectedIdentity { got: SpiffeId, want: SpiffeId },
}

impl SvidError {
    /// A short, stable label for metrics (`palisade_tls_handshake_errors_total{reason}`).
    pub fn reason(&self) -> &'static str {
        match self {
            SvidError::NoCertificate => "no_certificate",
            SvidError::Malformed => "malformed",
            SvidError::NoUriSan => "no_uri_san",
            SvidError::MultipleUriSans(_) => "multiple_uri_sans",
            SvidError::NotSpiffe(_) => "not_spiffe",
            SvidError::InvalidId(_) => "invalid_spiffe_id",
            SvidError::RootPathId(_) => "root_path_id",
            SvidError::CaLeaf => "ca_leaf",
            SvidError::SigningLeaf => "signing_leaf",
            SvidError::BadKeyUsage => "bad_key_usage",
            SvidError::BadExtendedKeyUsage => "bad_extended_key_usage",
            SvidError::ForeignTrustDomain { .. } => "foreign_trust_domain",
            SvidError::NoBundle(_) => "no_bundle",
            SvidError::Expired(_) => "expired",
            SvidError::NotYetValid(_) => "not_yet_valid",
            SvidError::UntrustedChain(_) => "untrusted_chain",
            SvidError::UnexpectedIdentity { .. } => "unexpected_identity",
        }
    }
}

pub(crate) fn uri_sans<'a>(cert: &'a X509Certificate<'_>) -> Result<Vec<&'a str>, SvidError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|_| SvidError::Malformed)?;
    Ok(san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// The SPIFFE ID of a leaf, by the X509-SVID rules for URI SANs only (no chain, no time).
pub fn spiffe_id_of(cert: &X509Certificate<'_>) -> Result<SpiffeId, SvidError> {
    let uris = uri_sans(cert)?;
    match uris.as_slice() {
        [] => Err(SvidError::NoUriSan),
        [uri] => {
            if !uri
                .get(..9)
                .is_some_and(|s| s.eq_ignore_ascii_case("spiffe://"))
            {
                return Err(SvidError::NotSpiffe((*uri).to_string()));
            }
            SpiffeId::parse(uri).map_err(SvidError::InvalidId)
        }
        many => Err(SvidError::MultipleUriSans(many.len())),
    }
}

/// The SPIFFE ID of a DER leaf, without any further checks: for reading a peer's ID off a
/// connection whose handshake already verified it.
pub fn peer_id(der: &[u8]) -> Result<SpiffeId, SvidError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|_| SvidError::Malformed)?;
    spiffe_id_of(&cert)
}

/// [`peer_id`] and the leaf's `notAfter` (Unix seconds), from one parse: a connection must not
/// outlive the certificate it was authenticated with.
pub fn peer_id_until(der: &[u8]) -> Result<(SpiffeId, i64), SvidError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|_| SvidError::Malformed)?;
    Ok((spiffe_id_of(&cert)?, cert.validity().not_after.timestamp()))
}

/// Checks the leaf rules of X509-SVID section 4 on a parsed leaf.
fn check_leaf_rules(cert: &X509Certificate<'_>) -> Result<SpiffeId, SvidError> {
    let id = spiffe_id_of(cert)?;
    if id.is_root() {
        return Err(SvidError::RootPathId(id));
    }
    let bc = cert.basic_constraints().map_err(|_| SvidError::Malformed)?;
    if bc.is_some_and(|bc| bc.value.ca) {
        return Err(SvidError::CaLeaf);
    }
    let ku = cert.key_usage().map_err(|_| SvidError::Malformed)?;
    match ku {
        Some(ku) if ku.value.key_cert_sign() || ku.value.crl_sign() => {
            return Err(SvidError::SigningLeaf);
        }
        Some(ku) if ku.critical && ku.value.digital_signature() => {}
        _ => return Err(SvidError::BadKeyUsage),
    }
    let eku = cert
        .extended_key_usage()
        .map_err(|_| SvidError::Malformed)?;
    // Both mesh purposes, and nothing else (X509-SVID: other purposes MUST NOT be set).
    if let Some(eku) = eku
        && !(eku.value.server_auth
            && eku.value.client_auth
            && !eku.value.any
            && !eku.value.code_signing
            && !eku.value.email_protection
            && !eku.value.time_stamping
            && !eku.value.ocsp_signing
            && eku.value.other.is_empty())
    {
        return Err(SvidError::BadExtendedKeyUsage);
    }
    Ok(id)
}

fn check_time(cert: &X509Certificate<'_>, now: i64) -> Result<(), SvidError> {
    let nb = cert.validity().not_before.timestamp();
    let na = cert.validity().not_after.timestamp();
    if now < nb {
        return Err(SvidError::NotYetValid(nb));
    }
    if now > na {
        return Err(SvidError::Expired(na));
    }
    Ok(())
}

/// Verifies an X509-SVID chain (leaf first) at time `now` and returns its SPIFFE ID.
/// `accept` limits the trust domains a peer may come from (None: any domain the bundle has).
pub fn verify_svid(
    chain: &[CertificateDer<'_>],
    bundle: &TrustBundle,
    accept: Option<&TrustDomain>,
    now: UnixTime,
) -> Result<SpiffeId, SvidError> {
    let leaf_der = chain.first().ok_or(SvidError::NoCertificate)?;
    let (_, leaf) =
        x509_parser::parse_x509_certificate(leaf_der).map_err(|_| SvidError::Malformed)?;
    let id = spiffe_id_of(&leaf)?;
    if let Some(want) = accept
        && id.trust_domain_str() != want.as_str()
    {
        return Err(SvidError::ForeignTrustDomain {
            got: id.trust_domain_str().to_string(),
            want: want.clone(),
        });
    }
    let anchors = bundle
        .anchors(id.trust_domain_str())
        .ok_or_else(|| SvidError::NoBundle(id.trust_domain_str().to_string()))?;
    let id = check_leaf_rules(&leaf)?;
    let now_secs = now.as_secs() as i64;
    check_time(&leaf, now_secs)?;
    let ee = webpki::EndEntityCert::try_from(leaf_der).map_err(|_| SvidError::Malformed)?;
    ee.verify_for_usage(
        SUPPORTED_ALGS,
        anchors,
        &chain[1..],
        now,
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map_err(|e| SvidError::UntrustedChain(format!("{e:?}")))?;
    Ok(id)
}

/// P-256 is what Palisade issues; P-384 and Ed25519 roots from an external CA are accepted too.
static SUPPORTED_ALGS: &[&dyn rustls_pki_types::SignatureVerificationAlgorithm] = &[
    webpki::ring::ECDSA_P256_SHA256,
    webpki::ring::ECDSA_P256_SHA384,
    webpki::ring::ECDSA_P384_SHA256,
    webpki::ring::ECDSA_P384_SHA384,
    webpki::ring::ED25519,
];

/// What `palisade cert inspect` prints.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CertInfo {
    pub spiffe_id: Option<SpiffeId>,
    pub subject: String,
    pub issuer: String,
    pub serial: String,
    pub not_before: i64,
    pub not_after: i64,
    pub is_ca: bool,
    /// `Ok` when the cert is a conforming leaf X509-SVID (chain not checked), else the reason.
    pub svid_conformance: Result<(), String>,
}

pub fn inspect(der: &[u8]) -> Result<CertInfo, SvidError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|_| SvidError::Malformed)?;
    let is_ca = cert.is_ca();
    let conformance = if is_ca {
        // A signing certificate: SPIFFE wants keyCertSign and (SHOULD) a path-less ID.
        match spiffe_id_of(&cert) {
            Ok(id) if id.is_root() => Ok(()),
            Ok(id) => Err(format!("CA certificate carries a non-root ID {id}")),
            Err(e) => Err(e.to_string()),
        }
    } else {
        check_leaf_rules(&cert)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    Ok(CertInfo {
        spiffe_id: spiffe_id_of(&cert).ok(),
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        serial: cert.raw_serial_as_string(),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        is_ca,
        svid_conformance: conformance,
    })
}
