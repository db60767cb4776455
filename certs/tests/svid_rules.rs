//! The X509-SVID rules, checked from the outside: certificates the CA issues are parsed with an
//! independent parser (x509-parser) and every rule of the SPIFFE X509-SVID standard is checked
//! field by field; then certificates crafted to break one rule each are fed to `verify_svid`,
//! which must reject each with exactly the matching `SvidError` variant. Also: SPIFFE ID parsing,
//! trust bundles (rotation, PEM, SPIFFE JSON) and the credentials store.

use std::time::Duration;

use palisade_certs::ca::{self, CLOCK_SKEW_ALLOWANCE, sign_with_issuer_for_tests};
use palisade_certs::spiffe::MAX_ID_LEN;
use palisade_certs::store::StoreError;
use palisade_certs::{
    Ca, CaError, CredentialStore, KeyAndCsr, SpiffeId, SpiffeIdError, Svid, SvidError, TrustBundle,
    TrustDomain, verify_svid,
};
use rcgen::{
    CertificateParams, CustomExtension, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, SanType,
};
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer, UnixTime};
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_SIG_ECDSA_WITH_SHA256,
};

const TD: &str = "example.org";
const WEB: &str = "spiffe://example.org/ns/demo/sa/web";

fn td(name: &str) -> TrustDomain {
    TrustDomain::new(name).unwrap()
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

fn new_ca(name: &str) -> Ca {
    Ca::generate(&td(name), None).unwrap()
}

fn bundle_of(ca: &Ca) -> TrustBundle {
    TrustBundle::with_roots(ca.trust_domain(), [ca.root_der().clone()]).unwrap()
}

fn parse(der: &[u8]) -> X509Certificate<'_> {
    x509_parser::parse_x509_certificate(der).unwrap().1
}

fn now_secs() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

fn at(unix: i64) -> UnixTime {
    UnixTime::since_unix_epoch(Duration::from_secs(unix as u64))
}

fn uris<'a>(cert: &'a X509Certificate<'_>) -> Vec<&'a str> {
    cert.subject_alternative_name()
        .unwrap()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Issued leaves, parsed independently.
// ---------------------------------------------------------------------------------------------

/// Checks every X509-SVID leaf rule on `svid` (issued by `ca` for `want`).
fn assert_conforming_leaf(ca: &Ca, svid: &Svid, want: &SpiffeId) {
    assert_eq!(&svid.id, want);
    // Chain: the leaf, then the issuer; the root is not sent.
    assert_eq!(svid.chain.len(), 2, "chain is leaf + issuer");
    assert_eq!(&svid.chain[1], ca.issuer_der());
    assert_ne!(&svid.chain[0], ca.root_der());

    let leaf = parse(&svid.chain[0]);
    let issuer = parse(&svid.chain[1]);
    assert_eq!(
        leaf.issuer(),
        issuer.subject(),
        "leaf is issued by the issuer"
    );
    leaf.verify_signature(Some(issuer.public_key()))
        .expect("leaf signature verifies with the issuer key");
    assert!(issuer.is_ca());

    // ECDSA P-256 key, ECDSA-with-SHA256 signature.
    let spki = leaf.public_key();
    assert_eq!(spki.algorithm.algorithm, OID_KEY_TYPE_EC_PUBLIC_KEY);
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .unwrap()
        .as_oid()
        .unwrap();
    assert_eq!(curve, OID_EC_P256);
    assert_eq!(
        spki.subject_public_key.data.len(),
        65,
        "uncompressed P-256 point"
    );
    assert_eq!(
        leaf.signature_algorithm.algorithm,
        OID_SIG_ECDSA_WITH_SHA256
    );

    // Exactly one SAN entry, a URI equal to the ID; critical because the subject is empty.
    let san = leaf
        .subject_alternative_name()
        .unwrap()
        .expect("SAN present");
    assert_eq!(
        san.value.general_names.len(),
        1,
        "{:?}",
        san.value.general_names
    );
    assert_eq!(uris(&leaf), vec![want.as_str()]);
    assert!(leaf.subject().as_raw().len() <= 2, "empty subject");
    assert_eq!(leaf.subject().iter_attributes().count(), 0, "empty subject");
    assert!(san.critical, "SAN is critical when the subject is empty");

    // basicConstraints CA:FALSE.
    let bc = leaf
        .basic_constraints()
        .unwrap()
        .expect("basicConstraints present");
    assert!(!bc.value.ca);
    assert!(bc.value.path_len_constraint.is_none());
    assert!(!leaf.is_ca());

    // keyUsage critical, digitalSignature only.
    let ku = leaf.key_usage().unwrap().expect("keyUsage present");
    assert!(ku.critical, "keyUsage is critical");
    assert!(ku.value.digital_signature());
    assert_eq!(ku.value.flags, 1, "digitalSignature only: {}", ku.value);
    assert!(!ku.value.key_cert_sign() && !ku.value.crl_sign());

    // EKU serverAuth + clientAuth, nothing else.
    let eku = leaf.extended_key_usage().unwrap().expect("EKU present");
    assert!(eku.value.server_auth && eku.value.client_auth);
    assert!(!eku.value.any && !eku.value.code_signing && eku.value.other.is_empty());

    // Validity fits inside the issuer's, and Svid's metadata matches the cert.
    let (nb, na) = (
        leaf.validity().not_before.timestamp(),
        leaf.validity().not_after.timestamp(),
    );
    assert_eq!(svid.not_before, nb);
    assert_eq!(svid.not_after, na);
    assert!(nb >= issuer.validity().not_before.timestamp());
    assert!(na <= issuer.validity().not_after.timestamp());

    // And the crate's own verifier agrees.
    assert_eq!(
        verify_svid(
            &svid.chain,
            &bundle_of(ca),
            Some(ca.trust_domain()),
            UnixTime::now()
        ),
        Ok(want.clone())
    );
}

#[test]
fn issued_leaf_follows_every_x509_svid_rule() {
    let ca = new_ca(TD);
    let web = id(WEB);
    let t0 = now_secs();
    let svid = ca.issue(&web, Duration::from_secs(3600)).unwrap();
    let t1 = now_secs();
    assert_conforming_leaf(&ca, &svid, &web);
    assert!(svid.key.is_some(), "issue() generates the key");

    // NotBefore backdated by the clock-skew allowance (60 s); NotAfter = issuance + TTL.
    assert_eq!(CLOCK_SKEW_ALLOWANCE, Duration::from_secs(60));
    assert!(
        (t0 - 61..=t1 - 59).contains(&svid.not_before),
        "not_before {} not ~60s before issuance [{t0}, {t1}]",
        svid.not_before
    );
    assert!(
        (t0 + 3600 - 1..=t1 + 3600 + 1).contains(&svid.not_after),
        "not_after {} is not issuance + 1h",
        svid.not_after
    );
    // Valid right now even for a verifier whose clock is 59 s behind.
    assert!(verify_svid(&svid.chain, &bundle_of(&ca), None, at(t1 - 59)).is_ok());
}

#[test]
fn serials_are_unique_and_positive() {
    let ca = new_ca(TD);
    let a = ca.issue(&id(WEB), Duration::from_secs(60)).unwrap();
    let b = ca.issue(&id(WEB), Duration::from_secs(60)).unwrap();
    let (la, lb) = (parse(a.leaf()), parse(b.leaf()));
    assert_ne!(la.raw_serial(), lb.raw_serial());
    for s in [la.raw_serial(), lb.raw_serial()] {
        assert!(s.len() <= 20, "RFC 5280: at most 20 octets");
        assert_eq!(s[0] & 0x80, 0, "positive serial");
    }
}

#[test]
fn csr_san_is_ignored_the_leaf_carries_the_callers_id() {
    let ca = new_ca(TD);
    let caller = id(WEB);
    // The CSR asks for another (privileged) ID, a DNS name, a subject and CA usages.
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut req = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "admin");
    req.distinguished_name = dn;
    req.subject_alt_names = vec![
        SanType::URI(
            "spiffe://example.org/ns/kube-system/sa/admin"
                .try_into()
                .unwrap(),
        ),
        SanType::DnsName("admin.example.org".try_into().unwrap()),
    ];
    req.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    req.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let csr = req.serialize_request(&key).unwrap();

    for csr_bytes in [csr.der().to_vec(), csr.pem().unwrap().into_bytes()] {
        let svid = ca
            .sign_csr(&csr_bytes, &caller, Duration::from_secs(600))
            .unwrap();
        assert_conforming_leaf(&ca, &svid, &caller);
        assert!(svid.key.is_none(), "the CA never sees the workload's key");
        let leaf = parse(svid.leaf());
        assert!(!uris(&leaf).contains(&"spiffe://example.org/ns/kube-system/sa/admin"));
        // The leaf certifies the CSR's key.
        assert_eq!(
            leaf.public_key().raw,
            rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()
        );
    }
}

#[test]
fn key_and_csr_round_trip_through_the_ca() {
    let ca = new_ca(TD);
    let caller = id(WEB);
    let kc = KeyAndCsr::generate(&id("spiffe://example.org/ns/other/sa/asked")).unwrap();
    let issued = ca
        .sign_csr(kc.csr_der(), &caller, Duration::from_secs(600))
        .unwrap();
    let svid = kc.into_svid(issued).unwrap();
    assert_eq!(svid.id, caller);
    assert!(svid.key.is_some());
    assert_conforming_leaf(&ca, &svid, &caller);
    // A store accepts it (key and cert match, same identity).
    let store = CredentialStore::new(caller.clone(), bundle_of(&ca));
    store.install(svid).unwrap();

    // A chain issued for another key is refused.
    let kc2 = KeyAndCsr::generate(&caller).unwrap();
    let other = ca.issue(&caller, Duration::from_secs(600)).unwrap();
    assert!(matches!(kc2.into_svid(other), Err(CaError::BadCsr)));
}

#[test]
fn ca_refuses_what_it_must_not_sign() {
    let ca = new_ca(TD);
    let ttl = Duration::from_secs(600);
    assert!(matches!(
        ca.issue(&id("spiffe://other.org/ns/demo/sa/web"), ttl),
        Err(CaError::ForeignTrustDomain { .. })
    ));
    assert!(matches!(
        ca.issue(&id("spiffe://example.org"), ttl),
        Err(CaError::RootId(_))
    ));
    assert!(matches!(
        ca.issue(&id(WEB), Duration::from_millis(10)),
        Err(CaError::Lifetime(_))
    ));
    assert!(matches!(
        ca.issue(&id(WEB), ca::MAX_LEAF_TTL + Duration::from_secs(1)),
        Err(CaError::Lifetime(_))
    ));
    // Garbage and a tampered CSR.
    assert!(matches!(
        ca.sign_csr(b"not a csr", &id(WEB), ttl),
        Err(CaError::BadCsr)
    ));
    let kc = KeyAndCsr::generate(&id(WEB)).unwrap();
    let mut tampered = kc.csr_der().to_vec();
    let last = tampered.len() - 1;
    tampered[last] ^= 0x01;
    assert!(matches!(
        ca.sign_csr(&tampered, &id(WEB), ttl),
        Err(CaError::BadCsr)
    ));
    // A P-384 key is not what X509-SVIDs of this mesh use.
    let p384 = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
    let mut req = CertificateParams::default();
    req.distinguished_name = DistinguishedName::new();
    let csr = req.serialize_request(&p384).unwrap();
    assert!(matches!(
        ca.sign_csr(csr.der(), &id(WEB), ttl),
        Err(CaError::UnsupportedKey)
    ));
}

#[test]
fn leaf_not_after_is_clamped_to_the_issuer() {
    let ca = Ca::generate(&td(TD), Some(Duration::from_secs(600))).unwrap();
    let issuer_na = parse(ca.issuer_der()).validity().not_after.timestamp();
    let svid = ca.issue(&id(WEB), Duration::from_secs(24 * 3600)).unwrap();
    assert_eq!(
        svid.not_after, issuer_na,
        "leaf outliving its issuer is clamped"
    );
    assert_conforming_leaf(&ca, &svid, &id(WEB));
    // Same through a CSR.
    let kc = KeyAndCsr::generate(&id(WEB)).unwrap();
    let signed = ca
        .sign_csr(kc.csr_der(), &id(WEB), Duration::from_secs(24 * 3600))
        .unwrap();
    assert_eq!(signed.not_after, issuer_na);
}

#[test]
fn expired_issuer_signs_nothing() {
    let ca = Ca::generate(&td(TD), Some(Duration::ZERO)).unwrap();
    assert!(matches!(
        ca.issue(&id(WEB), Duration::from_secs(60)),
        Err(CaError::IssuerExpired)
    ));
}

#[test]
fn ca_survives_save_and_load() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca(TD);
    ca.save(dir.path()).unwrap();
    assert!(matches!(
        ca.save(dir.path()),
        Err(CaError::AlreadyExists(_))
    ));
    let loaded = Ca::load(dir.path()).unwrap();
    assert_eq!(loaded.trust_domain(), ca.trust_domain());
    assert_eq!(loaded.root_der(), ca.root_der());
    assert_eq!(loaded.issuer_der(), ca.issuer_der());
    let svid = loaded.issue(&id(WEB), Duration::from_secs(600)).unwrap();
    assert_conforming_leaf(&ca, &svid, &id(WEB));
}

#[test]
fn ca_certificates_are_spiffe_signing_certs() {
    let ca = new_ca(TD);
    for der in [ca.root_der(), ca.issuer_der()] {
        let c = parse(der);
        assert!(c.is_ca());
        assert_eq!(uris(&c), vec!["spiffe://example.org"]);
        let ku = c.key_usage().unwrap().unwrap();
        assert!(ku.critical && ku.value.key_cert_sign());
        assert!(!ku.value.digital_signature());
    }
    let issuer = parse(ca.issuer_der());
    assert_eq!(
        issuer
            .basic_constraints()
            .unwrap()
            .unwrap()
            .value
            .path_len_constraint,
        Some(0),
        "the issuer signs leaves only"
    );
    assert_eq!(ca.chain(), vec![ca.issuer_der().clone()]);
}

// ---------------------------------------------------------------------------------------------
// Crafted certificates: one per rejection reason.
// ---------------------------------------------------------------------------------------------

/// Params for a conforming leaf with the given URI SANs; each case then breaks one rule.
fn leaf_params(uri_sans: &[&str]) -> CertificateParams {
    let now = OffsetDateTime::now_utc();
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = uri_sans
        .iter()
        .map(|u| SanType::URI((*u).try_into().unwrap()))
        .collect();
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.not_before = now - time::Duration::seconds(60);
    p.not_after = now + time::Duration::hours(1);
    p.use_authority_key_identifier_extension = true;
    p
}

fn chain_for(ca: &Ca, params: &CertificateParams) -> Vec<CertificateDer<'static>> {
    let (leaf, _key) = sign_with_issuer_for_tests(ca, params).unwrap();
    vec![leaf, ca.issuer_der().clone()]
}

fn with<F: FnOnce(&mut CertificateParams)>(uri_sans: &[&str], f: F) -> CertificateParams {
    let mut p = leaf_params(uri_sans);
    f(&mut p);
    p
}

/// A keyUsage extension with digitalSignature that is NOT marked critical.
fn non_critical_digital_signature_ku() -> CustomExtension {
    // BIT STRING, 7 unused bits, 0x80 = digitalSignature.
    let mut ext = CustomExtension::from_oid_content(&[2, 5, 29, 15], vec![0x03, 0x02, 0x07, 0x80]);
    ext.set_criticality(false);
    ext
}

#[test]
fn crafted_control_leaf_is_accepted() {
    // The base of every bad case below verifies: each case fails for its one broken rule only.
    let ca = new_ca(TD);
    let chain = chain_for(&ca, &leaf_params(&[WEB]));
    assert_eq!(
        verify_svid(&chain, &bundle_of(&ca), Some(&td(TD)), UnixTime::now()),
        Ok(id(WEB))
    );
}

#[test]
fn every_rejection_reason_has_its_own_error() {
    let ca = new_ca(TD);
    let other_td_ca = new_ca("other.org");
    let same_td_other_ca = new_ca(TD);
    let bundle = bundle_of(&ca);
    let example = td(TD);
    let now = now_secs();
    let hour = time::Duration::hours(1);

    struct Case {
        name: &'static str,
        chain: Vec<CertificateDer<'static>>,
        accept: Option<TrustDomain>,
        want: SvidError,
    }
    let case = |name, params: CertificateParams, want| Case {
        name,
        chain: chain_for(&ca, &params),
        accept: Some(td(TD)),
        want,
    };

    let expired = with(&[WEB], |p| {
        p.not_before = OffsetDateTime::now_utc() - hour * 2;
        p.not_after = OffsetDateTime::now_utc() - hour;
    });
    let expired_at = expired.not_after.unix_timestamp();
    let future = with(&[WEB], |p| {
        p.not_before = OffsetDateTime::now_utc() + hour;
        p.not_after = OffsetDateTime::now_utc() + hour * 2;
    });
    let future_at = future.not_before.unix_timestamp();

    let cases = vec![
        Case {
            name: "empty chain",
            chain: vec![],
            accept: None,
            want: SvidError::NoCertificate,
        },
        Case {
            name: "not DER",
            chain: vec![CertificateDer::from(b"garbage".to_vec())],
            accept: None,
            want: SvidError::Malformed,
        },
        case("no URI SAN", leaf_params(&[]), SvidError::NoUriSan),
        case(
            "only a DNS SAN",
            with(&[], |p| {
                p.subject_alt_names = vec![SanType::DnsName("web.example.org".try_into().unwrap())]
            }),
            SvidError::NoUriSan,
        ),
        case(
            "two URI SANs",
            leaf_params(&[WEB, "spiffe://example.org/ns/demo/sa/api"]),
            SvidError::MultipleUriSans(2),
        ),
        case(
            "three URI SANs",
            leaf_params(&[WEB, WEB, "spiffe://example.org/ns/demo/sa/api"]),
            SvidError::MultipleUriSans(3),
        ),
        case(
            "https URI",
            leaf_params(&["https://example.org/ns/demo/sa/web"]),
            SvidError::NotSpiffe("https://example.org/ns/demo/sa/web".into()),
        ),
        case(
            "urn URI",
            leaf_params(&["urn:example:web"]),
            SvidError::NotSpiffe("urn:example:web".into()),
        ),
        case(
            "uppercase trust domain",
            leaf_params(&["spiffe://Example.org/ns/demo/sa/web"]),
            SvidError::InvalidId(SpiffeIdError::BadTrustDomainChar('E')),
        ),
        case(
            "dot segment",
            leaf_params(&["spiffe://example.org/ns/../sa/web"]),
            SvidError::InvalidId(SpiffeIdError::DotSegment),
        ),
        case(
            "percent-encoded path",
            leaf_params(&["spiffe://example.org/ns/demo/sa/w%65b"]),
            SvidError::InvalidId(SpiffeIdError::BadPathChar('%')),
        ),
        case(
            "trust domain ID on a leaf",
            leaf_params(&["spiffe://example.org"]),
            SvidError::RootPathId(id("spiffe://example.org")),
        ),
        case(
            "CA leaf",
            with(&[WEB], |p| {
                p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained)
            }),
            SvidError::CaLeaf,
        ),
        case(
            "keyCertSign leaf",
            with(&[WEB], |p| {
                p.key_usages = vec![
                    KeyUsagePurpose::DigitalSignature,
                    KeyUsagePurpose::KeyCertSign,
                ]
            }),
            SvidError::SigningLeaf,
        ),
        case(
            "cRLSign leaf",
            with(&[WEB], |p| {
                p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::CrlSign]
            }),
            SvidError::SigningLeaf,
        ),
        case(
            "no key usage",
            with(&[WEB], |p| p.key_usages = vec![]),
            SvidError::BadKeyUsage,
        ),
        case(
            "key usage without digitalSignature",
            with(&[WEB], |p| {
                p.key_usages = vec![KeyUsagePurpose::KeyEncipherment]
            }),
            SvidError::BadKeyUsage,
        ),
        case(
            "non-critical key usage",
            with(&[WEB], |p| {
                p.key_usages = vec![];
                p.custom_extensions = vec![non_critical_digital_signature_ku()];
            }),
            SvidError::BadKeyUsage,
        ),
        case(
            "EKU without clientAuth",
            with(&[WEB], |p| {
                p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth]
            }),
            SvidError::BadExtendedKeyUsage,
        ),
        case(
            "EKU without serverAuth",
            with(&[WEB], |p| {
                p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth]
            }),
            SvidError::BadExtendedKeyUsage,
        ),
        case(
            "EKU codeSigning only",
            with(&[WEB], |p| {
                p.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning]
            }),
            SvidError::BadExtendedKeyUsage,
        ),
        Case {
            name: "foreign trust domain",
            chain: {
                let (leaf, _) = sign_with_issuer_for_tests(
                    &other_td_ca,
                    &leaf_params(&["spiffe://other.org/ns/demo/sa/web"]),
                )
                .unwrap();
                vec![leaf, other_td_ca.issuer_der().clone()]
            },
            accept: Some(example.clone()),
            want: SvidError::ForeignTrustDomain {
                got: "other.org".into(),
                want: example.clone(),
            },
        },
        Case {
            name: "no bundle for the SVID's trust domain",
            chain: {
                let (leaf, _) = sign_with_issuer_for_tests(
                    &other_td_ca,
                    &leaf_params(&["spiffe://other.org/ns/demo/sa/web"]),
                )
                .unwrap();
                vec![leaf, other_td_ca.issuer_der().clone()]
            },
            accept: None,
            want: SvidError::NoBundle("other.org".into()),
        },
        case("expired", expired, SvidError::Expired(expired_at)),
        case("not yet valid", future, SvidError::NotYetValid(future_at)),
        Case {
            name: "signed by another CA of the same trust domain",
            chain: {
                let (leaf, _) =
                    sign_with_issuer_for_tests(&same_td_other_ca, &leaf_params(&[WEB])).unwrap();
                vec![leaf, same_td_other_ca.issuer_der().clone()]
            },
            accept: Some(example.clone()),
            want: SvidError::UntrustedChain(String::new()),
        },
        Case {
            name: "issuer missing from the chain",
            chain: {
                let mut c = chain_for(&ca, &leaf_params(&[WEB]));
                c.truncate(1);
                c
            },
            accept: Some(example.clone()),
            want: SvidError::UntrustedChain(String::new()),
        },
        Case {
            name: "another CA's issuer sent along with our leaf",
            chain: {
                let mut c = chain_for(&ca, &leaf_params(&[WEB]));
                c[1] = same_td_other_ca.issuer_der().clone();
                c
            },
            accept: Some(example.clone()),
            want: SvidError::UntrustedChain(String::new()),
        },
    ];

    let mut seen = std::collections::BTreeSet::new();
    for c in &cases {
        let got = verify_svid(&c.chain, &bundle, c.accept.as_ref(), at(now));
        match (&got, &c.want) {
            // The webpki detail is informative only; the variant is what matters.
            (Err(SvidError::UntrustedChain(detail)), SvidError::UntrustedChain(_)) => {
                assert!(
                    !detail.is_empty(),
                    "{}: UntrustedChain carries webpki's reason",
                    c.name
                )
            }
            _ => assert_eq!(got.as_ref(), Err(&c.want), "case {:?}", c.name),
        }
        seen.insert(c.want.reason());
    }
    // Every verify-time reason (all but the TLS-layer UnexpectedIdentity) is covered.
    let all = [
        "no_certificate",
        "malformed",
        "no_uri_san",
        "multiple_uri_sans",
        "not_spiffe",
        "invalid_spiffe_id",
        "root_path_id",
        "ca_leaf",
        "signing_leaf",
        "bad_key_usage",
        "bad_extended_key_usage",
        "foreign_trust_domain",
        "no_bundle",
        "expired",
        "not_yet_valid",
        "untrusted_chain",
    ];
    for r in all {
        assert!(seen.contains(r), "no case for {r}");
    }
}

#[test]
fn missing_eku_is_allowed_as_the_standard_says() {
    // X509-SVID §4.4: leaves SHOULD carry an EKU; when present it MUST have both purposes.
    // An absent EKU is therefore accepted (only a present-but-wrong EKU is rejected above).
    let ca = new_ca(TD);
    let chain = chain_for(&ca, &with(&[WEB], |p| p.extended_key_usages = vec![]));
    assert!(parse(&chain[0]).extended_key_usage().unwrap().is_none());
    assert_eq!(
        verify_svid(&chain, &bundle_of(&ca), None, UnixTime::now()),
        Ok(id(WEB))
    );
}

#[test]
fn validity_bounds_are_inclusive_and_time_comes_from_now() {
    let ca = new_ca(TD);
    let svid = ca.issue(&id(WEB), Duration::from_secs(600)).unwrap();
    let b = bundle_of(&ca);
    let (nb, na) = (svid.not_before, svid.not_after);
    assert_eq!(verify_svid(&svid.chain, &b, None, at(nb)), Ok(id(WEB)));
    assert_eq!(verify_svid(&svid.chain, &b, None, at(na)), Ok(id(WEB)));
    assert_eq!(
        verify_svid(&svid.chain, &b, None, at(na + 1)),
        Err(SvidError::Expired(na))
    );
    assert_eq!(
        verify_svid(&svid.chain, &b, None, at(nb - 1)),
        Err(SvidError::NotYetValid(nb))
    );
}

#[test]
fn reasons_are_distinct_metric_labels() {
    let errors = [
        SvidError::NoCertificate,
        SvidError::Malformed,
        SvidError::NoUriSan,
        SvidError::MultipleUriSans(2),
        SvidError::NotSpiffe("x".into()),
        SvidError::InvalidId(SpiffeIdError::Empty),
        SvidError::RootPathId(id("spiffe://td")),
        SvidError::CaLeaf,
        SvidError::SigningLeaf,
        SvidError::BadKeyUsage,
        SvidError::BadExtendedKeyUsage,
        SvidError::ForeignTrustDomain {
            got: "a".into(),
            want: td("b"),
        },
        SvidError::NoBundle("a".into()),
        SvidError::Expired(0),
        SvidError::NotYetValid(0),
        SvidError::UntrustedChain(String::new()),
        SvidError::UnexpectedIdentity {
            got: id("spiffe://td/a"),
            want: id("spiffe://td/b"),
        },
    ];
    let labels: std::collections::BTreeSet<_> = errors.iter().map(|e| e.reason()).collect();
    assert_eq!(labels.len(), errors.len());
    for l in labels {
        assert!(l.chars().all(|c| c.is_ascii_lowercase() || c == '_'), "{l}");
    }
}

#[test]
fn inspect_reports_conformance() {
    let ca = new_ca(TD);
    let svid = ca.issue(&id(WEB), Duration::from_secs(600)).unwrap();
    let info = palisade_certs::verify::inspect(svid.leaf()).unwrap();
    assert_eq!(info.spiffe_id, Some(id(WEB)));
    assert!(!info.is_ca);
    assert_eq!(info.svid_conformance, Ok(()));
    let root = palisade_certs::verify::inspect(ca.root_der()).unwrap();
    assert!(root.is_ca);
    assert_eq!(root.svid_conformance, Ok(()));
    let (bad, _) =
        sign_with_issuer_for_tests(&ca, &with(&[WEB], |p| p.key_usages = vec![])).unwrap();
    let info = palisade_certs::verify::inspect(&bad).unwrap();
    assert_eq!(
        info.svid_conformance,
        Err(SvidError::BadKeyUsage.to_string())
    );
}

// ---------------------------------------------------------------------------------------------
// SPIFFE ID parsing (SPIFFE-ID standard §2).
// ---------------------------------------------------------------------------------------------

#[test]
fn spiffe_id_valid_table() {
    let at_limit = {
        let prefix = "spiffe://example.org/";
        format!("{prefix}{}", "a".repeat(MAX_ID_LEN - prefix.len()))
    };
    let td_255 = format!("spiffe://{}/a", "t".repeat(255));
    // (input, canonical form, trust domain, path)
    let valid: Vec<(&str, &str, &str, &str)> = vec![
        (WEB, WEB, "example.org", "/ns/demo/sa/web"),
        (
            "spiffe://example.org",
            "spiffe://example.org",
            "example.org",
            "",
        ),
        ("spiffe://td/a", "spiffe://td/a", "td", "/a"),
        (
            "spiffe://my-td_1.example.org/a.b/c-d/e_f/G9",
            "spiffe://my-td_1.example.org/a.b/c-d/e_f/G9",
            "my-td_1.example.org",
            "/a.b/c-d/e_f/G9",
        ),
        // Only "." and ".." are dot segments; "..." and ".x" are ordinary names.
        (
            "spiffe://td/.../.x/x.",
            "spiffe://td/.../.x/x.",
            "td",
            "/.../.x/x.",
        ),
        // The path is case-sensitive and kept as is.
        (
            "spiffe://td/Ns/Demo",
            "spiffe://td/Ns/Demo",
            "td",
            "/Ns/Demo",
        ),
        // The scheme is case-insensitive and canonicalised to lowercase.
        ("SPIFFE://td/a", "spiffe://td/a", "td", "/a"),
        ("Spiffe://td", "spiffe://td", "td", ""),
        // Trust domains that look like IPs are just names.
        (
            "spiffe://10.0.0.1/a",
            "spiffe://10.0.0.1/a",
            "10.0.0.1",
            "/a",
        ),
        (
            &at_limit,
            &at_limit,
            "example.org",
            &at_limit["spiffe://example.org".len()..],
        ),
        (&td_255, &td_255, &td_255[9..264], "/a"),
    ];
    for (input, canonical, want_td, want_path) in valid {
        let parsed = SpiffeId::parse(input).unwrap_or_else(|e| panic!("{input:?}: {e}"));
        assert_eq!(parsed.as_str(), canonical, "{input}");
        assert_eq!(parsed.trust_domain_str(), want_td, "{input}");
        assert_eq!(parsed.path(), want_path, "{input}");
        assert_eq!(parsed.is_root(), want_path.is_empty());
        assert_eq!(input.parse::<SpiffeId>().unwrap(), parsed);
        // Round trip through the canonical string and through serde.
        assert_eq!(SpiffeId::parse(parsed.as_str()).unwrap(), parsed);
        let json = serde_json::to_string(&parsed).unwrap();
        assert_eq!(serde_json::from_str::<SpiffeId>(&json).unwrap(), parsed);
    }
    assert_eq!(at_limit.len(), MAX_ID_LEN);
}

#[test]
fn spiffe_id_invalid_table() {
    use SpiffeIdError::*;
    let too_long = format!("spiffe://example.org/{}", "a".repeat(MAX_ID_LEN));
    let one_over = {
        let prefix = "spiffe://example.org/";
        format!("{prefix}{}", "a".repeat(MAX_ID_LEN - prefix.len() + 1))
    };
    let td_256 = format!("spiffe://{}/a", "t".repeat(256));
    let cases: Vec<(&str, SpiffeIdError)> = vec![
        ("", Empty),
        // Wrong or missing scheme.
        ("http://example.org/ns/demo", WrongScheme),
        ("https://example.org/ns/demo", WrongScheme),
        ("spiffe:/example.org/a", WrongScheme),
        ("spiffe:example.org/a", WrongScheme),
        ("example.org/ns/demo", WrongScheme),
        ("spiff://example.org/a", WrongScheme),
        (" spiffe://example.org/a", WrongScheme),
        // Trust domain problems.
        ("spiffe://", MissingTrustDomain),
        ("spiffe:///ns/demo", MissingTrustDomain),
        ("spiffe://Example.org/a", BadTrustDomainChar('E')),
        ("spiffe://EXAMPLE.ORG", BadTrustDomainChar('E')),
        ("spiffe://example.org:8443/a", BadTrustDomainChar(':')),
        ("spiffe://user@example.org/a", BadTrustDomainChar('@')),
        ("spiffe://user:pw@example.org/a", BadTrustDomainChar(':')),
        ("spiffe://exa%6Dple.org/a", BadTrustDomainChar('%')),
        ("spiffe://[::1]/a", BadTrustDomainChar('[')),
        ("spiffe://exämple.org/a", BadTrustDomainChar('ä')),
        ("spiffe://exa mple.org/a", BadTrustDomainChar(' ')),
        (&td_256, TrustDomainTooLong),
        // Path segments.
        ("spiffe://example.org/", TrailingSlash),
        ("spiffe://example.org/ns/demo/", TrailingSlash),
        ("spiffe://example.org//ns", EmptySegment),
        ("spiffe://example.org/ns//sa", EmptySegment),
        ("spiffe://example.org/.", DotSegment),
        ("spiffe://example.org/ns/./sa", DotSegment),
        ("spiffe://example.org/..", DotSegment),
        ("spiffe://example.org/ns/../sa", DotSegment),
        // Characters: percent-encoding and anything outside [A-Za-z0-9._-].
        ("spiffe://example.org/ns/w%65b", BadPathChar('%')),
        ("spiffe://example.org/a%2Fb", BadPathChar('%')),
        ("spiffe://example.org/a b", BadPathChar(' ')),
        ("spiffe://example.org/a:b", BadPathChar(':')),
        ("spiffe://example.org/a@b", BadPathChar('@')),
        ("spiffe://example.org/a+b", BadPathChar('+')),
        ("spiffe://example.org/caf\u{e9}", BadPathChar('\u{e9}')),
        // Query and fragment.
        ("spiffe://example.org/a?x=1", QueryOrFragment),
        ("spiffe://example.org/a#frag", QueryOrFragment),
        ("spiffe://example.org?x", QueryOrFragment),
        // Length.
        (&too_long, TooLong),
        (&one_over, TooLong),
    ];
    for (input, want) in cases {
        assert_eq!(
            SpiffeId::parse(input).unwrap_err(),
            want,
            "{input:?} should fail with {want:?}"
        );
        assert!(input.parse::<SpiffeId>().is_err());
        assert!(
            serde_json::from_value::<SpiffeId>(serde_json::Value::String(input.into())).is_err()
        );
    }
    assert_eq!(one_over.len(), MAX_ID_LEN + 1);
}

#[test]
fn trust_domain_and_workload_ids() {
    assert_eq!(td("cluster.local").id().as_str(), "spiffe://cluster.local");
    assert!(td("cluster.local").id().is_root());
    for bad in ["", "Cluster.local", "td:80", "a/b", "u@td"] {
        assert!(TrustDomain::new(bad).is_err(), "{bad:?}");
    }
    let web = SpiffeId::for_workload(&td(TD), "demo", "web").unwrap();
    assert_eq!(web, id(WEB));
    assert_eq!(web.namespace_and_sa(), Some(("demo", "web")));
    assert_eq!(web.namespace(), Some("demo"));
    assert_eq!(web.without_scheme(), "example.org/ns/demo/sa/web");
    assert_eq!(web.trust_domain(), td(TD));
    assert_eq!(
        SpiffeId::for_workload(&td(TD), "", "web").unwrap_err(),
        SpiffeIdError::EmptySegment
    );
    assert_eq!(
        SpiffeId::for_workload(&td(TD), "demo", "..").unwrap_err(),
        SpiffeIdError::DotSegment
    );
    assert_eq!(id("spiffe://td/ns/a/sa/b/extra").namespace_and_sa(), None);
    assert_eq!(id("spiffe://td/other/path").namespace(), None);
}

// ---------------------------------------------------------------------------------------------
// Trust bundles.
// ---------------------------------------------------------------------------------------------

#[test]
fn bundle_with_two_roots_verifies_both_during_rotation() {
    let old = new_ca(TD);
    let new = new_ca(TD);
    let old_leaf = old.issue(&id(WEB), Duration::from_secs(600)).unwrap();
    let new_leaf = new.issue(&id(WEB), Duration::from_secs(600)).unwrap();
    let example = td(TD);

    let mut b = bundle_of(&old);
    let seq0 = b.sequence();
    assert!(matches!(
        verify_svid(&new_leaf.chain, &b, None, UnixTime::now()),
        Err(SvidError::UntrustedChain(_))
    ));
    b.add_root(&example, new.root_der().clone()).unwrap();
    assert!(b.sequence() > seq0, "adding a root bumps the sequence");
    assert_eq!(b.roots(&example).len(), 2);
    for leaf in [&old_leaf, &new_leaf] {
        assert_eq!(
            verify_svid(&leaf.chain, &b, Some(&example), UnixTime::now()),
            Ok(id(WEB))
        );
    }
    // Adding the same root again is a no-op.
    let seq1 = b.sequence();
    b.add_root(&example, new.root_der().clone()).unwrap();
    assert_eq!(b.sequence(), seq1);
    assert_eq!(b.roots(&example).len(), 2);

    // End of rotation: the old root goes, its leaves stop verifying, the new ones still do.
    assert!(b.remove_root(&example, old.root_der()));
    assert!(!b.remove_root(&example, old.root_der()));
    assert!(b.sequence() > seq1);
    assert!(matches!(
        verify_svid(&old_leaf.chain, &b, None, UnixTime::now()),
        Err(SvidError::UntrustedChain(_))
    ));
    assert_eq!(
        verify_svid(&new_leaf.chain, &b, None, UnixTime::now()),
        Ok(id(WEB))
    );
    // With no root left, the domain has no bundle at all.
    assert!(b.remove_root(&example, new.root_der()));
    assert_eq!(
        verify_svid(&new_leaf.chain, &b, None, UnixTime::now()),
        Err(SvidError::NoBundle(TD.into()))
    );
}

#[test]
fn bundle_keeps_trust_domains_apart() {
    let a = new_ca(TD);
    let b = new_ca("other.org");
    let mut bundle = bundle_of(&a);
    // A root of other.org filed under example.org must not make other.org's leaves valid
    // for example.org, nor example.org's roots valid for other.org.
    bundle
        .add_root(&td("other.org"), b.root_der().clone())
        .unwrap();
    let domains: Vec<_> = bundle
        .trust_domains()
        .map(|t| t.as_str().to_string())
        .collect();
    assert_eq!(domains, vec!["example.org", "other.org"]);
    let b_leaf = b
        .issue(
            &id("spiffe://other.org/ns/x/sa/y"),
            Duration::from_secs(600),
        )
        .unwrap();
    assert_eq!(
        verify_svid(&b_leaf.chain, &bundle, None, UnixTime::now()),
        Ok(id("spiffe://other.org/ns/x/sa/y"))
    );
    assert!(matches!(
        verify_svid(&b_leaf.chain, &bundle, Some(&td(TD)), UnixTime::now()),
        Err(SvidError::ForeignTrustDomain { .. })
    ));
    // A leaf of a.org's CA claiming an other.org ID is checked against other.org's roots only.
    let (forged, _) =
        sign_with_issuer_for_tests(&a, &leaf_params(&["spiffe://other.org/ns/x/sa/y"])).unwrap();
    assert!(matches!(
        verify_svid(
            &[forged, a.issuer_der().clone()],
            &bundle,
            None,
            UnixTime::now()
        ),
        Err(SvidError::UntrustedChain(_))
    ));
}

#[test]
fn bundle_rejects_non_anchors() {
    let mut b = TrustBundle::new();
    assert!(
        b.add_root(&td(TD), CertificateDer::from(b"junk".to_vec()))
            .is_err()
    );
    assert!(b.add_pem(&td(TD), b"no pem here").is_err());
    assert_eq!(b.roots(&td(TD)).len(), 0);
}

#[test]
fn bundle_pem_round_trip() {
    let (a, b) = (new_ca(TD), new_ca(TD));
    let example = td(TD);
    let bundle =
        TrustBundle::with_roots(&example, [a.root_der().clone(), b.root_der().clone()]).unwrap();
    let pem = bundle.to_pem(&example);
    assert_eq!(pem.matches("-----BEGIN CERTIFICATE-----").count(), 2);

    let mut from_pem = TrustBundle::new();
    assert_eq!(from_pem.add_pem(&example, pem.as_bytes()).unwrap(), 2);
    assert_eq!(from_pem.roots(&example), bundle.roots(&example));

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bundle.pem");
    std::fs::write(&path, &pem).unwrap();
    let loaded = TrustBundle::load_pem(&example, &path).unwrap();
    assert_eq!(loaded.roots(&example), bundle.roots(&example));
    assert_eq!(loaded.to_pem(&example), pem);
    let leaf = b.issue(&id(WEB), Duration::from_secs(600)).unwrap();
    assert_eq!(
        verify_svid(&leaf.chain, &loaded, None, UnixTime::now()),
        Ok(id(WEB))
    );
    assert!(TrustBundle::load_pem(&example, &dir.path().join("missing.pem")).is_err());
}

#[test]
fn bundle_spiffe_json_format_and_round_trip() {
    use base64::Engine;
    let (a, b) = (new_ca(TD), new_ca(TD));
    let example = td(TD);
    let mut bundle =
        TrustBundle::with_roots(&example, [a.root_der().clone(), b.root_der().clone()]).unwrap();
    bundle.set_sequence(42);
    let json = bundle.to_spiffe_json(&example, 300);

    let keys = json["keys"].as_array().expect("keys array");
    assert_eq!(keys.len(), 2);
    assert_eq!(json["spiffe_sequence"], 42);
    assert_eq!(json["spiffe_refresh_hint"], 300);
    for (k, root) in keys.iter().zip([a.root_der(), b.root_der()]) {
        assert_eq!(k["use"], "x509-svid");
        assert_eq!(k["kty"], "EC");
        assert_eq!(k["crv"], "P-256");
        let x5c = k["x5c"].as_array().unwrap();
        assert_eq!(x5c.len(), 1);
        let der = base64::engine::general_purpose::STANDARD
            .decode(x5c[0].as_str().unwrap())
            .unwrap();
        assert_eq!(der.as_slice(), root.as_ref());
        // x and y are the root's public point (base64url, no padding).
        let point = parse(root).public_key().subject_public_key.data.to_vec();
        let url = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        assert_eq!(url.decode(k["x"].as_str().unwrap()).unwrap(), point[1..33]);
        assert_eq!(url.decode(k["y"].as_str().unwrap()).unwrap(), point[33..]);
    }

    let text = serde_json::to_string(&json).unwrap();
    let back = TrustBundle::from_spiffe_json(&example, &text).unwrap();
    assert_eq!(back.roots(&example), bundle.roots(&example));
    assert_eq!(back.sequence(), 42);
    assert_eq!(back.to_spiffe_json(&example, 300), json);
    let leaf = a.issue(&id(WEB), Duration::from_secs(600)).unwrap();
    assert_eq!(
        verify_svid(&leaf.chain, &back, None, UnixTime::now()),
        Ok(id(WEB))
    );

    // Keys for other uses (JWT-SVID) are skipped; a document without keys is an error.
    let mut mixed = json.clone();
    mixed["keys"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"use": "jwt-svid", "kty": "EC", "kid": "k1"}));
    let back = TrustBundle::from_spiffe_json(&example, &mixed.to_string()).unwrap();
    assert_eq!(back.roots(&example).len(), 2);
    assert!(TrustBundle::from_spiffe_json(&example, "{}").is_err());
    assert!(TrustBundle::from_spiffe_json(&example, "not json").is_err());
    let bad_b64 = serde_json::json!({"keys": [{"use": "x509-svid", "x5c": ["%%%"]}]});
    assert!(TrustBundle::from_spiffe_json(&example, &bad_b64.to_string()).is_err());
}

// ---------------------------------------------------------------------------------------------
// Credentials store.
// ---------------------------------------------------------------------------------------------

#[test]
fn store_install_swaps_credentials_and_refuses_other_identities() {
    let ca = new_ca(TD);
    let web = id(WEB);
    let store = CredentialStore::new(web.clone(), bundle_of(&ca));
    assert_eq!(store.id(), &web);
    assert!(!store.is_ready());
    assert!(store.current().is_none());
    assert_eq!(store.expiry(), None);

    let first = ca.issue(&web, Duration::from_secs(600)).unwrap();
    store.install(first.clone()).unwrap();
    assert!(store.is_ready());
    let cur = store.current().unwrap();
    assert_eq!(cur.svid.leaf(), first.leaf());
    assert_eq!(cur.certified.cert, first.chain);
    assert_eq!(store.expiry(), Some(first.not_after));

    let second = ca.issue(&web, Duration::from_secs(1200)).unwrap();
    store.install(second.clone()).unwrap();
    let now = store.current().unwrap();
    assert_eq!(now.svid.leaf(), second.leaf());
    assert_ne!(now.svid.leaf(), first.leaf());
    assert_eq!(store.expiry(), Some(second.not_after));
    // A reader that loaded the old credentials keeps them intact.
    assert_eq!(cur.svid.leaf(), first.leaf());

    // Another workload's SVID is refused and the current one stays.
    let api = ca
        .issue(
            &id("spiffe://example.org/ns/demo/sa/api"),
            Duration::from_secs(600),
        )
        .unwrap();
    match store.install(api) {
        Err(StoreError::WrongIdentity { got, want }) => {
            assert_eq!(got, id("spiffe://example.org/ns/demo/sa/api"));
            assert_eq!(want, web);
        }
        other => panic!("expected WrongIdentity, got {other:?}"),
    }
    assert_eq!(store.current().unwrap().svid.leaf(), second.leaf());

    // An SVID without its private key (what the CA returns for a CSR) cannot be installed.
    let kc = KeyAndCsr::generate(&web).unwrap();
    let keyless = ca
        .sign_csr(kc.csr_der(), &web, Duration::from_secs(600))
        .unwrap();
    assert!(matches!(store.install(keyless), Err(StoreError::NoKey)));
    // Nor can one whose key is not a usable PKCS#8 key.
    let mut broken = ca.issue(&web, Duration::from_secs(600)).unwrap();
    broken.key = Some(PrivatePkcs8KeyDer::from(b"not a key".to_vec()));
    assert!(matches!(store.install(broken), Err(StoreError::BadKey(_))));
    assert_eq!(store.current().unwrap().svid.leaf(), second.leaf());
}

#[test]
fn store_bundle_can_be_replaced() {
    let (a, b) = (new_ca(TD), new_ca(TD));
    let store = CredentialStore::new(id(WEB), bundle_of(&a));
    assert_eq!(
        store.bundle().load().roots(&td(TD)),
        &[a.root_der().clone()]
    );
    store.set_bundle(bundle_of(&b));
    assert_eq!(
        store.bundle().load().roots(&td(TD)),
        &[b.root_der().clone()]
    );
}

#[test]
fn svid_files_round_trip_with_private_key_mode() {
    let ca = new_ca(TD);
    let svid = ca.issue(&id(WEB), Duration::from_secs(600)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    svid.write(dir.path()).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let loaded = Svid::load(&dir.path().join("cert.pem"), &dir.path().join("key.pem")).unwrap();
    assert_eq!(loaded.id, svid.id);
    assert_eq!(loaded.chain, svid.chain);
    assert_eq!(loaded.not_after, svid.not_after);
    assert_eq!(
        loaded.key.as_ref().unwrap().secret_pkcs8_der(),
        svid.key.as_ref().unwrap().secret_pkcs8_der()
    );
}

#[test]
fn p384_key_behind_a_sha256_signature_is_refused() {
    // rcgen reads the CSR's algorithm from its signature OID, so a P-384 key signing with
    // ecdsa-with-SHA256 looks like "P-256" to it. The CA must look at the key itself. ring cannot
    // sign P-384/SHA-256, so the CSR comes from openssl when it is installed.
    let dir = tempfile::tempdir().unwrap();
    let csr_path = dir.path().join("p384.csr");
    let out = std::process::Command::new("openssl")
        .args([
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-384",
        ])
        .args(["-sha256", "-subj", "/CN=x", "-nodes", "-outform", "DER"])
        .arg("-keyout")
        .arg(dir.path().join("p384.key"))
        .arg("-out")
        .arg(&csr_path)
        .output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            eprintln!(
                "skipping: openssl req failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            return;
        }
        Err(e) => {
            eprintln!("skipping: openssl is not available ({e})");
            return;
        }
    }
    let ca = new_ca(TD);
    let csr = std::fs::read(&csr_path).unwrap();
    match ca.sign_csr(&csr, &id(WEB), Duration::from_secs(600)) {
        Err(CaError::UnsupportedKey) => {}
        Ok(svid) => {
            let leaf = parse(svid.leaf());
            panic!(
                "CA issued a leaf for a P-384 key (SPKI point of {} bytes labelled P-256)",
                leaf.public_key().subject_public_key.data.len()
            );
        }
        Err(e) => panic!("expected UnsupportedKey, got {e:?}"),
    }
}
