//! The certificate authority: a self-signed trust anchor and an intermediate issuer that signs
//! leaf X509-SVIDs. The issuer, not the CSR, decides the SPIFFE ID: a workload can only ever get
//! the identity its caller authenticated, whatever its CSR asks for.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use rustls_pki_types::{
    CertificateDer, CertificateSigningRequestDer, PrivatePkcs8KeyDer, pem::PemObject,
};
use time::OffsetDateTime;

use crate::pem::read_file;
use crate::spiffe::{SpiffeId, TrustDomain};
use crate::svid::Svid;

/// How far back a leaf's NotBefore is set, so peers with a slightly slow clock accept it.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(60);
/// Shortest leaf lifetime the CA issues; anything shorter would churn renewals.
pub const MIN_LEAF_TTL: Duration = Duration::from_secs(1);
/// Longest leaf lifetime the CA issues.
pub const MAX_LEAF_TTL: Duration = Duration::from_secs(90 * 24 * 3600);
/// Lifetime of a generated trust anchor; an issuer may not outlive it.
pub const ROOT_TTL: Duration = Duration::from_secs(3650 * 24 * 3600);

pub const ROOT_CERT_FILE: &str = "root-cert.pem";
pub const ROOT_KEY_FILE: &str = "root-key.pem";
pub const ISSUER_CERT_FILE: &str = "issuer-cert.pem";
pub const ISSUER_KEY_FILE: &str = "issuer-key.pem";

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a PEM {what}")]
    BadPem { path: PathBuf, what: &'static str },
    #[error("{0} already exists; refusing to overwrite a CA")]
    AlreadyExists(PathBuf),
    #[error("the CSR cannot be parsed or its signature is invalid")]
    BadCsr,
    #[error("the CSR's key is not ECDSA P-256")]
    UnsupportedKey,
    #[error("the issuer certificate is not valid for trust domain {0}")]
    IssuerTrustDomain(TrustDomain),
    #[error("{id} belongs to trust domain {}, but this CA issues for {ca}", id.trust_domain_str())]
    ForeignTrustDomain { id: SpiffeId, ca: TrustDomain },
    #[error("a leaf SVID needs a SPIFFE ID with a path, not {0}")]
    RootId(SpiffeId),
    #[error("lifetime {0:?} is outside {MIN_LEAF_TTL:?}..={MAX_LEAF_TTL:?}")]
    Lifetime(Duration),
    #[error("issuer lifetime {0:?} is longer than the root's ({ROOT_TTL:?})")]
    IssuerLifetime(Duration),
    #[error("the issuer certificate has expired")]
    IssuerExpired,
    #[error(transparent)]
    Unsafe(#[from] crate::secure_fs::UnsafePath),
    #[error("the system random number generator failed; nothing was signed")]
    Random,
    #[error("a serving certificate needs at least one DNS name")]
    NoDnsNames,
    #[error("{0:?} is not a DNS name")]
    BadDnsName(String),
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
}

/// Where serial numbers get their randomness. Internal, so that a test can make it fail:
/// ring's own `SecureRandom` is a sealed trait that only ring can implement.
trait SerialRandom: Send + Sync {
    fn fill(&self, dest: &mut [u8]) -> Result<(), CaError>;
}

impl SerialRandom for ring::rand::SystemRandom {
    fn fill(&self, dest: &mut [u8]) -> Result<(), CaError> {
        ring::rand::SecureRandom::fill(self, dest).map_err(|_| CaError::Random)
    }
}

fn system_random() -> Arc<dyn SerialRandom> {
    Arc::new(ring::rand::SystemRandom::new())
}

/// A loaded CA: the trust anchor (certificate only is needed for bundles) and the issuer.
pub struct Ca {
    trust_domain: TrustDomain,
    root_der: CertificateDer<'static>,
    issuer_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    issuer_not_before: OffsetDateTime,
    issuer_not_after: OffsetDateTime,
    /// Only present right after `generate` or when the root key was loaded.
    root_key_pem: Option<String>,
    issuer_key_pem: String,
    rng: Arc<dyn SerialRandom>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

fn ca_params(
    td: &TrustDomain,
    cn: &str,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    path_len: Option<u8>,
    rng: &dyn SerialRandom,
) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, td.as_str());
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(match path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    // A SPIFFE signing certificate SHOULD carry the trust domain's own ID.
    params.subject_alt_names = vec![SanType::URI(td.id().as_str().try_into()?)];
    params.not_before = not_before;
    params.not_after = not_after;
    params.serial_number = Some(random_serial(rng)?);
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// A CSPRNG serial keeps serials unguessable (the defence against chosen-prefix collisions);
/// if the generator fails, signing fails rather than issue all-zero or predictable serials.
fn random_serial(rng: &dyn SerialRandom) -> Result<SerialNumber, CaError> {
    let mut bytes = [0u8; 16];
    rng.fill(&mut bytes)?;
    bytes[0] &= 0x7f; // positive INTEGER
    bytes[0] |= 0x01; // no leading zero byte to strip
    Ok(SerialNumber::from_slice(&bytes))
}

fn to_offset(d: Duration) -> time::Duration {
    time::Duration::try_from(d).unwrap_or(time::Duration::MAX)
}

impl Ca {
    /// A new trust anchor (10 years) and issuer (1 year, or `issuer_ttl`).
    pub fn generate(td: &TrustDomain, issuer_ttl: Option<Duration>) -> Result<Self, CaError> {
        Self::generate_with(td, issuer_ttl, system_random())
    }

    fn generate_with(
        td: &TrustDomain,
        issuer_ttl: Option<Duration>,
        rng: Arc<dyn SerialRandom>,
    ) -> Result<Self, CaError> {
        let issuer_ttl = issuer_ttl.unwrap_or(Duration::from_secs(365 * 24 * 3600));
        // The TTL comes from a flag: bound it before any date arithmetic, which panics on
        // overflow.
        if issuer_ttl > ROOT_TTL {
            return Err(CaError::IssuerLifetime(issuer_ttl));
        }
        let now = OffsetDateTime::now_utc();
        let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let root_params = ca_params(
            td,
            "Palisade root CA",
            now - to_offset(CLOCK_SKEW_ALLOWANCE),
            now + to_offset(ROOT_TTL),
            None,
            rng.as_ref(),
        )?;
        let root_cert = root_params.self_signed(&root_key)?;
        let root_issuer = Issuer::new(root_params, &root_key);

        let issuer_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let issuer_params = ca_params(
            td,
            "Palisade issuer",
            now - to_offset(CLOCK_SKEW_ALLOWANCE),
            now + to_offset(issuer_ttl),
            Some(0),
            rng.as_ref(),
        )?;
        let issuer_cert = issuer_params.signed_by(&issuer_key, &root_issuer)?;
        let (nb, na) = (issuer_params.not_before, issuer_params.not_after);
        let root_key_pem = root_key.serialize_pem();
        let issuer_key_pem = issuer_key.serialize_pem();
        Ok(Self {
            trust_domain: td.clone(),
            root_der: root_cert.der().clone(),
            issuer_der: issuer_cert.der().clone(),
            issuer: Issuer::new(issuer_params, issuer_key),
            issuer_not_before: nb,
            issuer_not_after: na,
            root_key_pem: Some(root_key_pem),
            issuer_key_pem,
            rng,
        })
    }

    /// Loads `root-cert.pem`, `issuer-cert.pem` and `issuer-key.pem` from `dir`. The trust domain
    /// comes from the issuer's URI SAN.
    pub fn load(dir: &Path) -> Result<Self, CaError> {
        let root_path = dir.join(ROOT_CERT_FILE);
        let issuer_path = dir.join(ISSUER_CERT_FILE);
        let key_path = dir.join(ISSUER_KEY_FILE);
        let root_pem = read_file(&root_path)?;
        let issuer_pem = read_file(&issuer_path)?;
        // Whoever can write the key decides what the mesh trusts: only ours, 0600, no symlink.
        let key_pem = crate::secure_fs::read_private_key(&key_path)?;
        Self::from_pem_named(
            [
                (&root_pem, root_path),
                (&issuer_pem, issuer_path),
                (&key_pem, key_path),
            ],
            system_random(),
        )
    }

    /// A CA from PEM held in memory (the Kubernetes Secret `palisade-identity`: `ca.crt`,
    /// `tls.crt`, `tls.key`): the trust anchor certificate, the issuer certificate (the first
    /// certificate of `issuer_pem`, which may be followed by its chain) and the issuer key.
    /// `origin` names where they came from in errors (`secret palisade-system/palisade-identity`).
    /// The trust domain comes from the issuer's URI SAN.
    pub fn from_pem(
        origin: &str,
        root_pem: &[u8],
        issuer_pem: &[u8],
        issuer_key_pem: &[u8],
    ) -> Result<Self, CaError> {
        let name = |key: &str| PathBuf::from(format!("{origin}: {key}"));
        Self::from_pem_named(
            [
                (root_pem, name("ca.crt")),
                (issuer_pem, name("tls.crt")),
                (issuer_key_pem, name("tls.key")),
            ],
            system_random(),
        )
    }

    /// `[(root cert, its name), (issuer cert, ..), (issuer key, ..)]`; the names are for errors.
    fn from_pem_named(
        [
            (root_pem, root_path),
            (issuer_pem, issuer_path),
            (key_bytes, key_path),
        ]: [(&[u8], PathBuf); 3],
        rng: Arc<dyn SerialRandom>,
    ) -> Result<Self, CaError> {
        let root_der = CertificateDer::from_pem_slice(root_pem).map_err(|_| CaError::BadPem {
            path: root_path.clone(),
            what: "certificate",
        })?;
        let issuer_der =
            CertificateDer::from_pem_slice(issuer_pem).map_err(|_| CaError::BadPem {
                path: issuer_path.clone(),
                what: "certificate",
            })?;
        let key_pem = String::from_utf8(key_bytes.to_vec()).map_err(|_| CaError::BadPem {
            path: key_path.clone(),
            what: "private key",
        })?;
        let key = KeyPair::from_pem(&key_pem).map_err(|_| CaError::BadPem {
            path: key_path.clone(),
            what: "private key",
        })?;
        let (_, parsed) =
            x509_parser::parse_x509_certificate(&issuer_der).map_err(|_| CaError::BadPem {
                path: issuer_path.clone(),
                what: "certificate",
            })?;
        let td = crate::verify::uri_sans(&parsed)
            .ok()
            .and_then(|uris| uris.first().and_then(|u| SpiffeId::parse(u).ok()))
            .map(|id| id.trust_domain())
            .ok_or(CaError::BadPem {
                path: issuer_path.clone(),
                what: "SPIFFE issuer certificate (no spiffe://<trust-domain> URI SAN)",
            })?;
        let nb = parsed.validity().not_before.to_datetime();
        let na = parsed.validity().not_after.to_datetime();
        let issuer = Issuer::from_ca_cert_der(&issuer_der, key)?;
        Ok(Self {
            trust_domain: td,
            root_der,
            issuer_der,
            issuer,
            issuer_not_before: nb,
            issuer_not_after: na,
            root_key_pem: None,
            issuer_key_pem: key_pem,
            rng,
        })
    }

    /// Writes the CA into `dir` (created 0700 if missing; keys 0600, certificates 0644).
    /// Refuses to overwrite an existing CA: every file is created new, without following a
    /// symlink, so nothing planted there (a file, a dangling symlink) is written through.
    pub fn save(&self, dir: &Path) -> Result<(), CaError> {
        let files = [
            ROOT_CERT_FILE,
            ISSUER_CERT_FILE,
            ISSUER_KEY_FILE,
            ROOT_KEY_FILE,
        ];
        for f in files {
            let p = dir.join(f);
            // symlink_metadata: a dangling symlink counts as there.
            if std::fs::symlink_metadata(&p).is_ok() {
                return Err(CaError::AlreadyExists(p));
            }
        }
        let mut b = std::fs::DirBuilder::new();
        b.recursive(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt;
            b.mode(crate::secure_fs::PRIVATE_DIR_MODE);
        }
        b.create(dir).map_err(|source| CaError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
        let create = |name: &str, contents: &str, mode: u32| {
            let p = dir.join(name);
            crate::secure_fs::create_new(&p, contents.as_bytes(), mode).map_err(|source| {
                if source.kind() == std::io::ErrorKind::AlreadyExists {
                    CaError::AlreadyExists(p.clone())
                } else {
                    CaError::Write {
                        path: p.clone(),
                        source,
                    }
                }
            })
        };
        create(ROOT_CERT_FILE, &crate::pem::cert_pem(&self.root_der), 0o644)?;
        create(
            ISSUER_CERT_FILE,
            &crate::pem::cert_pem(&self.issuer_der),
            0o644,
        )?;
        create(
            ISSUER_KEY_FILE,
            &self.issuer_key_pem,
            crate::secure_fs::PRIVATE_FILE_MODE,
        )?;
        if let Some(root_key) = &self.root_key_pem {
            create(ROOT_KEY_FILE, root_key, crate::secure_fs::PRIVATE_FILE_MODE)?;
        }
        Ok(())
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn root_der(&self) -> &CertificateDer<'static> {
        &self.root_der
    }

    pub fn issuer_der(&self) -> &CertificateDer<'static> {
        &self.issuer_der
    }

    /// The issuer's private key (PKCS#8 PEM), for `palisade install` to put into the
    /// Kubernetes Secret the control plane signs with. A secret: never log it.
    pub fn issuer_key_pem(&self) -> &str {
        &self.issuer_key_pem
    }

    /// The chain a leaf is sent with, after the leaf itself (the root is not sent: peers have it).
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        vec![self.issuer_der.clone()]
    }

    /// Signs a leaf for `id` over the public key of a PEM or DER CSR. Nothing else in the CSR is
    /// used: the SAN, subject, usages and lifetime are the CA's.
    pub fn sign_csr(&self, csr: &[u8], id: &SpiffeId, ttl: Duration) -> Result<Svid, CaError> {
        let parsed = if csr.starts_with(b"-----BEGIN") {
            let der =
                CertificateSigningRequestDer::from_pem_slice(csr).map_err(|_| CaError::BadCsr)?;
            CertificateSigningRequestParams::from_der(&der)
        } else {
            CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr))
        }
        .map_err(|_| CaError::BadCsr)?;
        // The algorithm comes from the CSR's signature OID (a P-384 key signing with SHA-256 reads
        // as P-256), so the key itself must be checked too: a P-256 point is 65 bytes.
        if parsed.public_key.algorithm() != &PKCS_ECDSA_P256_SHA256
            || rcgen::PublicKeyData::der_bytes(&parsed.public_key).len() != 65
        {
            return Err(CaError::UnsupportedKey);
        }
        let params = self.leaf_params(id, ttl)?;
        let (not_before, not_after) = (params.not_before, params.not_after);
        let req = CertificateSigningRequestParams {
            params,
            public_key: parsed.public_key,
        };
        let cert = req.signed_by(&self.issuer)?;
        Ok(Svid {
            id: id.clone(),
            chain: vec![cert.der().clone(), self.issuer_der.clone()],
            key: None,
            not_before: not_before.unix_timestamp(),
            not_after: not_after.unix_timestamp(),
        })
    }

    /// Generates a key here and signs a leaf for it (`palisade ca issue`, tests, benchmarks).
    pub fn issue(&self, id: &SpiffeId, ttl: Duration) -> Result<Svid, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let params = self.leaf_params(id, ttl)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Svid {
            id: id.clone(),
            chain: vec![cert.der().clone(), self.issuer_der.clone()],
            key: Some(key.serialize_der().into()),
            not_before: params.not_before.unix_timestamp(),
            not_after: params.not_after.unix_timestamp(),
        })
    }

    /// Issues a TLS serving certificate for `dns_names` (the injector webhook's
    /// `palisade-control-plane.palisade-system.svc`), with a key generated here.
    ///
    /// It is not an X509-SVID: no SPIFFE ID, only DNS SANs, `serverAuth` only. Its chain ends
    /// at this CA's trust anchor, so a client that trusts the root (the Kubernetes API server,
    /// given the root as the webhook's `caBundle`) verifies it as any web PKI certificate. The
    /// lifetime rules are the leaves' ([`MIN_LEAF_TTL`]..=[`MAX_LEAF_TTL`], never past the
    /// issuer).
    pub fn issue_serving_cert(
        &self,
        dns_names: &[&str],
        ttl: Duration,
    ) -> Result<ServingCert, CaError> {
        let Some(first) = dns_names.first() else {
            return Err(CaError::NoDnsNames);
        };
        let mut sans = Vec::with_capacity(dns_names.len());
        for name in dns_names {
            // rustls' own DNS-name rules: what a rustls (or Go) client will match against.
            if rustls_pki_types::DnsName::try_from(*name).is_err() || name.ends_with('.') {
                return Err(CaError::BadDnsName(name.to_string()));
            }
            let ia5 = (*name)
                .try_into()
                .map_err(|_| CaError::BadDnsName(name.to_string()))?;
            sans.push(SanType::DnsName(ia5));
        }
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = self.base_leaf_params(ttl)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, *first);
        params.distinguished_name = dn;
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(ServingCert {
            dns_names: dns_names.iter().map(|n| n.to_string()).collect(),
            chain: vec![cert.der().clone(), self.issuer_der.clone()],
            key: key.serialize_der().into(),
            not_before: params.not_before.unix_timestamp(),
            not_after: params.not_after.unix_timestamp(),
        })
    }

    fn leaf_params(&self, id: &SpiffeId, ttl: Duration) -> Result<CertificateParams, CaError> {
        if id.trust_domain_str() != self.trust_domain.as_str() {
            return Err(CaError::ForeignTrustDomain {
                id: id.clone(),
                ca: self.trust_domain.clone(),
            });
        }
        if id.is_root() {
            return Err(CaError::RootId(id.clone()));
        }
        let mut params = self.base_leaf_params(ttl)?;
        // Empty subject: the SAN extension is then critical, as X509-SVID requires.
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(id.as_str().try_into()?)];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        Ok(params)
    }

    /// What every leaf shares: not a CA, `digitalSignature` only, a bounded lifetime inside the
    /// issuer's, a random serial.
    fn base_leaf_params(&self, ttl: Duration) -> Result<CertificateParams, CaError> {
        if !(MIN_LEAF_TTL..=MAX_LEAF_TTL).contains(&ttl) {
            return Err(CaError::Lifetime(ttl));
        }
        let now = OffsetDateTime::now_utc();
        if now >= self.issuer_not_after {
            return Err(CaError::IssuerExpired);
        }
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = (now - to_offset(CLOCK_SKEW_ALLOWANCE)).max(self.issuer_not_before);
        params.not_after = (now + to_offset(ttl)).min(self.issuer_not_after);
        params.serial_number = Some(random_serial(self.rng.as_ref())?);
        params.use_authority_key_identifier_extension = true;
        Ok(params)
    }
}

/// A TLS serving certificate for DNS names, issued by [`Ca::issue_serving_cert`].
pub struct ServingCert {
    pub dns_names: Vec<String>,
    /// Leaf first, then the issuer (the root is not sent: clients have it).
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivatePkcs8KeyDer<'static>,
    /// Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
}

impl std::fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingCert")
            .field("dns_names", &self.dns_names)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl ServingCert {
    /// The chain as PEM (leaf, then issuer).
    pub fn chain_pem(&self) -> String {
        crate::pem::certs_pem(&self.chain)
    }

    /// The private key as PKCS#8 PEM.
    pub fn key_pem(&self) -> String {
        crate::pem::encode("PRIVATE KEY", self.key.secret_pkcs8_der())
    }
}

/// Builds a root and leaf with arbitrary params, for tests that need certificates the CA
/// would never issue (a CA leaf, two URI SANs, an expired leaf...).
#[doc(hidden)]
pub fn sign_with_issuer_for_tests(
    ca: &Ca,
    params: &CertificateParams,
) -> Result<(CertificateDer<'static>, Vec<u8>), CaError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let cert = params.signed_by(&key, &ca.issuer)?;
    Ok((cert.der().clone(), key.serialize_der()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A generator that always fails, as `getrandom` can (no entropy source, seccomp).
    struct FailingRandom;

    impl SerialRandom for FailingRandom {
        fn fill(&self, _: &mut [u8]) -> Result<(), CaError> {
            Err(CaError::Random)
        }
    }

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    #[cfg(unix)]
    #[test]
    fn save_never_writes_through_a_planted_file_and_load_checks_the_key() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let ca = Ca::generate(&td(), None).unwrap();

        // A dangling symlink planted where the issuer key goes: refused, target not created.
        let dir = tmp.path().join("ca");
        std::fs::create_dir(&dir).unwrap();
        let target = tmp.path().join("stolen-key.pem");
        std::os::unix::fs::symlink(&target, dir.join(ISSUER_KEY_FILE)).unwrap();
        assert!(matches!(ca.save(&dir), Err(CaError::AlreadyExists(_))));
        assert!(!target.exists());

        // A fresh directory is 0700, keys 0600, and the CA loads back.
        let fresh = tmp.path().join("fresh/ca");
        ca.save(&fresh).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&fresh), 0o700);
        assert_eq!(mode(&fresh.join(ISSUER_KEY_FILE)), 0o600);
        assert_eq!(mode(&fresh.join(ISSUER_CERT_FILE)), 0o644);
        Ca::load(&fresh).unwrap();

        // A key anyone else can read (or that is not ours) is not loaded.
        let key = fresh.join(ISSUER_KEY_FILE);
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Ca::load(&fresh).unwrap_err().to_string();
        assert!(e.contains("issuer-key.pem") && e.contains("0600"), "{e}");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        if crate::secure_fs::current_uid() == 0 {
            std::os::unix::fs::chown(&key, Some(65534), None).unwrap();
            let e = Ca::load(&fresh).unwrap_err().to_string();
            assert!(e.contains("owned by uid 65534"), "{e}");
        }
    }

    #[test]
    fn a_failing_rng_fails_signing_instead_of_issuing_a_predictable_serial() {
        let mut ca = Ca::generate(&td(), None).unwrap();
        let id = SpiffeId::for_workload(&td(), "demo", "web").unwrap();
        assert!(ca.issue(&id, Duration::from_secs(60)).is_ok());
        ca.rng = Arc::new(FailingRandom);
        assert!(matches!(
            ca.issue(&id, Duration::from_secs(60)),
            Err(CaError::Random)
        ));
        let kc = crate::KeyAndCsr::generate(&id).unwrap();
        assert!(matches!(
            ca.sign_csr(kc.csr_der(), &id, Duration::from_secs(60)),
            Err(CaError::Random)
        ));
        assert!(matches!(
            Ca::generate_with(&td(), None, Arc::new(FailingRandom)),
            Err(CaError::Random)
        ));
    }

    /// The Kubernetes Secret holds the CA as PEM: it loads from memory as from files, the
    /// issuer may be followed by its chain, and a bad part is named by its key.
    #[test]
    fn a_ca_loads_from_pem_in_memory() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = Ca::generate(&td(), None).unwrap();
        let dir = tmp.path().join("ca");
        ca.save(&dir).unwrap();
        let read = |f: &str| std::fs::read(dir.join(f)).unwrap();
        let mut issuer_chain = read(ISSUER_CERT_FILE);
        issuer_chain.extend(read(ROOT_CERT_FILE));
        let loaded = Ca::from_pem(
            "secret ns/palisade-identity",
            &read(ROOT_CERT_FILE),
            &issuer_chain,
            &read(ISSUER_KEY_FILE),
        )
        .unwrap();
        assert_eq!(loaded.trust_domain(), &td());
        assert_eq!(loaded.root_der(), ca.root_der());
        assert_eq!(loaded.issuer_der(), ca.issuer_der());
        let id = SpiffeId::for_workload(&td(), "demo", "web").unwrap();
        let svid = loaded.issue(&id, Duration::from_secs(60)).unwrap();
        let bundle = crate::TrustBundle::with_roots(&td(), [ca.root_der().clone()]).unwrap();
        let got = crate::verify::verify_svid(
            &svid.chain,
            &bundle,
            Some(&td()),
            rustls_pki_types::UnixTime::now(),
        )
        .unwrap();
        assert_eq!(got, id);

        let e = Ca::from_pem(
            "secret ns/palisade-identity",
            &read(ROOT_CERT_FILE),
            &read(ISSUER_CERT_FILE),
            b"not a key",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("secret ns/palisade-identity: tls.key"), "{e}");
    }
}
