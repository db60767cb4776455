//! Key and CSR generation on the workload side. The private key is created here and never
//! leaves the process: only the CSR (public key + proof of possession) goes to the CA.

use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use rustls_pki_types::PrivatePkcs8KeyDer;

use crate::ca::CaError;
use crate::spiffe::SpiffeId;
use crate::svid::Svid;

pub struct KeyAndCsr {
    key: KeyPair,
    csr_der: Vec<u8>,
}

impl KeyAndCsr {
    /// A fresh P-256 key and a CSR asking for `id` (the CA decides the ID anyway).
    pub fn generate(id: &SpiffeId) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(id.as_str().try_into()?)];
        let csr = params.serialize_request(&key)?;
        Ok(Self {
            csr_der: csr.der().to_vec(),
            key,
        })
    }

    pub fn csr_der(&self) -> &[u8] {
        &self.csr_der
    }

    /// Joins the key with the chain the CA returned. Fails if the leaf is not for this key.
    pub fn into_svid(self, mut issued: Svid) -> Result<Svid, CaError> {
        let (_, leaf) =
            x509_parser::parse_x509_certificate(issued.leaf()).map_err(|_| CaError::BadCsr)?;
        if leaf.public_key().raw
            != rcgen::PublicKeyData::subject_public_key_info(&self.key).as_slice()
        {
            return Err(CaError::BadCsr);
        }
        issued.key = Some(PrivatePkcs8KeyDer::from(self.key.serialize_der()));
        Ok(issued)
    }
}
