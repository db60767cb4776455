//! Security negatives (issue 24) at the certificate layer: a NUL byte in a SAN.
//!
//! A C-string comparison would read `spiffe://example.org/ns/demo/sa/web\0.evil` as web's ID;
//! the verifier must refuse it rather than truncate, wherever the NUL is, and the CA must
//! never copy one from a CSR into a certificate. (The other negatives of the list — two URI
//! SANs, a CA leaf, the trust domain's own ID, another trust domain — are cases of
//! `svid_rules.rs::every_rejection_reason_has_its_own_error`, and are refused over real
//! handshakes in `proxy/tests/negatives.rs`.)

use std::time::Duration;

use palisade_certs::ca::sign_with_issuer_for_tests;
use palisade_certs::{
    Ca, SpiffeId, SpiffeIdError, SvidError, TrustBundle, TrustDomain, verify_svid,
};
use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls_pki_types::{CertificateDer, UnixTime};

const TD: &str = "example.org";
const WEB: &str = "spiffe://example.org/ns/demo/sa/web";

fn td() -> TrustDomain {
    TrustDomain::new(TD).expect("td")
}

/// A conforming leaf with `sans`.
fn leaf(ca: &Ca, sans: Vec<SanType>) -> Vec<CertificateDer<'static>> {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = sans;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let (der, _key) = sign_with_issuer_for_tests(ca, &p).expect("sign");
    vec![der, ca.issuer_der().clone()]
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().expect("IA5 string"))
}

#[test]
fn a_nul_byte_in_a_uri_san_is_refused_not_truncated() {
    let ca = Ca::generate(&td(), None).expect("CA");
    let bundle = TrustBundle::with_roots(&td(), [ca.root_der().clone()]).expect("bundle");
    // Control: the same leaf without the NUL verifies.
    assert_eq!(
        verify_svid(
            &leaf(&ca, vec![uri(WEB)]),
            &bundle,
            Some(&td()),
            UnixTime::now()
        ),
        Ok(SpiffeId::parse(WEB).expect("id"))
    );
    let cases = [
        (
            "after the ID",
            "spiffe://example.org/ns/demo/sa/web\0.evil.org",
            SpiffeIdError::BadPathChar('\0'),
        ),
        (
            "at the end",
            "spiffe://example.org/ns/demo/sa/web\0",
            SpiffeIdError::BadPathChar('\0'),
        ),
        (
            "in the trust domain",
            "spiffe://example.org\0.evil.org/ns/demo/sa/web",
            SpiffeIdError::BadTrustDomainChar('\0'),
        ),
        (
            "between segments",
            "spiffe://example.org/ns/demo\0/sa/web",
            SpiffeIdError::BadPathChar('\0'),
        ),
    ];
    for (what, san, want) in cases {
        let chain = leaf(&ca, vec![uri(san)]);
        let got = verify_svid(&chain, &bundle, Some(&td()), UnixTime::now());
        assert_eq!(got, Err(SvidError::InvalidId(want.clone())), "{what}");
        assert_eq!(
            got.as_ref().map_err(SvidError::reason),
            Err("invalid_spiffe_id"),
            "{what}"
        );
        // Reading the ID off a connection refuses it too, and so does `cert inspect`.
        assert!(
            palisade_certs::verify::peer_id(&chain[0]).is_err(),
            "{what}"
        );
        let info = palisade_certs::verify::inspect(&chain[0]).expect("parses");
        assert_eq!(info.spiffe_id, None, "{what}");
        assert!(info.svid_conformance.is_err(), "{what}");
        // And the ID parser itself, for any other way a string reaches it.
        assert_eq!(SpiffeId::parse(san), Err(want), "{what}");
    }
}

#[test]
fn a_nul_byte_san_in_a_csr_never_reaches_the_certificate() {
    let ca = Ca::generate(&td(), None).expect("CA");
    let caller = SpiffeId::parse(WEB).expect("id");
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
    let mut req = CertificateParams::default();
    req.distinguished_name = DistinguishedName::new();
    req.subject_alt_names = vec![
        uri("spiffe://example.org/ns/demo/sa/web\0/../../kube-system/sa/admin"),
        SanType::DnsName("web\0.evil.org".try_into().expect("IA5 string")),
    ];
    let csr = req.serialize_request(&key).expect("csr");
    let svid = ca
        .sign_csr(csr.der(), &caller, Duration::from_secs(600))
        .expect("signed for the caller");
    let leaf = svid.leaf();
    for copied in [&b"web\0"[..], b"kube-system", b"evil.org"] {
        assert!(
            !contains(leaf, copied),
            "{:?} from the CSR was copied into the certificate",
            String::from_utf8_lossy(copied)
        );
    }
    // Its only SAN is the caller's URI.
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).expect("DER");
    let names: Vec<String> = cert
        .subject_alternative_name()
        .expect("SAN extension")
        .map(|e| {
            e.value
                .general_names
                .iter()
                .map(|n| format!("{n:?}"))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(names, [format!("URI({WEB:?})")]);
    let info = palisade_certs::verify::inspect(leaf).expect("parses");
    assert_eq!(info.spiffe_id, Some(caller));
    assert_eq!(info.svid_conformance, Ok(()));
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}
