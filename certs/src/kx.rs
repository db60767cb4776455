//! X25519MLKEM768 hybrid key exchange for rustls' *ring* provider.
//!
//! rustls 0.23 ships X25519MLKEM768 only in its aws-lc-rs provider. This module adds the same
//! TLS 1.3 group to the *ring* provider, so a process keeps exactly one crypto provider:
//!
//! * the X25519 half is rustls' own *ring* group ([`rustls::crypto::ring::kx_group::X25519`],
//!   i.e. `ring::agreement`, which rejects the all-zero shared secret);
//! * the ML-KEM-768 half is RustCrypto's pure-Rust `ml-kem` crate (FIPS 203). All of its
//!   randomness (the 64-byte key-generation seed `d || z` and the 32-byte encapsulation
//!   message `m`) comes from `ring::rand::SystemRandom`, so there is one RNG and no panicking
//!   RNG adapter.
//!
//! Wire format, per draft-ietf-tls-ecdhe-mlkem (codepoint 0x11EC), ML-KEM always first:
//!
//! | value            | layout                                              | bytes |
//! |------------------|-----------------------------------------------------|-------|
//! | client key share | ML-KEM-768 encapsulation key `ek` ‖ X25519 public    | 1216  |
//! | server key share | ML-KEM-768 ciphertext `ct` ‖ X25519 public           | 1120  |
//! | shared secret    | ML-KEM-768 shared key ‖ X25519 shared secret         | 64    |
//!
//! The server checks the client's encapsulation key with the FIPS 203 §7.2 modulus check
//! (`EncapsulationKey::new`), as the draft requires; the client decapsulates with implicit
//! rejection, so a corrupted ciphertext yields an unrelated secret and the handshake then fails
//! at `Finished`.
//!
//! Like rustls' own hybrid, the client's active exchange exposes its X25519 half through
//! [`ActiveKeyExchange::hybrid_component`]: with `X25519` also listed in the provider's
//! `kx_groups`, the `ClientHello` carries both shares (one X25519 key, reused), so a peer that
//! only knows X25519 completes without a `HelloRetryRequest` — what a mixed-version rollout needs.
//!
//! Use [`provider`] (ring's default provider with this group preferred) or put
//! [`X25519MLKEM768`] first in a provider's `kx_groups` yourself.

use std::fmt;

use ml_kem::kem::{Decapsulate, KeyExport};
use ml_kem::ml_kem_768;
use ring::rand::{SecureRandom, SystemRandom};
use rustls::crypto::ring::kx_group::X25519 as RING_X25519;
use rustls::crypto::{
    ActiveKeyExchange, CompletedKeyExchange, CryptoProvider, SharedSecret, SupportedKxGroup,
};
use rustls::ffdhe_groups::FfdheGroup;
use rustls::{Error, NamedGroup, PeerMisbehaved, ProtocolVersion};
use zeroize::Zeroize;

/// ML-KEM-768 encapsulation key length (FIPS 203, k = 3: 384·k + 32).
pub const MLKEM768_ENCAPSULATION_KEY_LEN: usize = 1184;
/// ML-KEM-768 ciphertext length (FIPS 203: 32·(du·k + dv)).
pub const MLKEM768_CIPHERTEXT_LEN: usize = 1088;
/// ML-KEM shared key length.
pub const MLKEM768_SHARED_KEY_LEN: usize = 32;
/// X25519 public key and shared secret length (RFC 7748).
pub const X25519_LEN: usize = 32;
/// Length of the client's key share.
pub const CLIENT_SHARE_LEN: usize = MLKEM768_ENCAPSULATION_KEY_LEN + X25519_LEN;
/// Length of the server's key share.
pub const SERVER_SHARE_LEN: usize = MLKEM768_CIPHERTEXT_LEN + X25519_LEN;
/// Length of the combined shared secret fed into the TLS 1.3 key schedule.
pub const SHARED_SECRET_LEN: usize = MLKEM768_SHARED_KEY_LEN + X25519_LEN;

/// The X25519MLKEM768 group, backed by *ring* (X25519) and `ml-kem` (ML-KEM-768).
pub static X25519MLKEM768: &dyn SupportedKxGroup = &X25519MlKem768;

/// *ring*'s default [`CryptoProvider`] with [`X25519MLKEM768`] preferred.
///
/// Group order matches rustls' aws-lc-rs provider with `prefer-post-quantum`:
/// X25519MLKEM768, X25519, secp256r1, secp384r1. Because X25519 is listed, clients also send a
/// plain X25519 share (see the module docs), so classical-only peers still interoperate.
pub fn provider() -> CryptoProvider {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .kx_groups
        .retain(|g| g.name() != NamedGroup::X25519MLKEM768);
    provider.kx_groups.insert(0, X25519MLKEM768);
    provider
}

const INVALID_KEY_SHARE: Error = Error::PeerMisbehaved(PeerMisbehaved::InvalidKeyShare);

struct X25519MlKem768;

impl fmt::Debug for X25519MlKem768 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("X25519MLKEM768 (ring + ml-kem)")
    }
}

impl SupportedKxGroup for X25519MlKem768 {
    /// Client side: fresh ML-KEM-768 key pair and X25519 key pair.
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, Error> {
        let mut seed = ml_kem::Seed::default();
        fill_random(&mut seed)?;
        let decapsulation_key = Box::new(ml_kem_768::DecapsulationKey::from_seed(seed));
        seed.zeroize();

        let x25519 = RING_X25519.start()?;

        let mut pub_key = Vec::with_capacity(CLIENT_SHARE_LEN);
        pub_key.extend_from_slice(&decapsulation_key.encapsulation_key().to_bytes());
        pub_key.extend_from_slice(x25519.pub_key());
        debug_assert_eq!(pub_key.len(), CLIENT_SHARE_LEN);

        Ok(Box::new(ClientKeyExchange {
            decapsulation_key,
            x25519,
            pub_key,
        }))
    }

    /// Server side: encapsulate to the client's ML-KEM key and do X25519 with its public key.
    fn start_and_complete(&self, client_share: &[u8]) -> Result<CompletedKeyExchange, Error> {
        if client_share.len() != CLIENT_SHARE_LEN {
            return Err(INVALID_KEY_SHARE);
        }
        let (ek_bytes, x25519_peer) = client_share.split_at(MLKEM768_ENCAPSULATION_KEY_LEN);

        // `new` performs the FIPS 203 encapsulation-key (modulus) check.
        let ek_bytes = ek_bytes.try_into().map_err(|_| INVALID_KEY_SHARE)?;
        let encapsulation_key =
            ml_kem_768::EncapsulationKey::new(ek_bytes).map_err(|_| INVALID_KEY_SHARE)?;

        let mut m = ml_kem::B32::default();
        fill_random(&mut m)?;
        // ML-KEM.Encaps (FIPS 203 Alg. 20) is Encaps_internal with a fresh random 32-byte `m`;
        // `m` comes from ring's RNG so that an RNG failure is an error, not a panic.
        let (ciphertext, mut mlkem_secret) = encapsulation_key.encapsulate_deterministic(&m);
        m.zeroize();

        let x25519 = RING_X25519.start_and_complete(x25519_peer)?;

        let mut pub_key = Vec::with_capacity(SERVER_SHARE_LEN);
        pub_key.extend_from_slice(&ciphertext);
        pub_key.extend_from_slice(&x25519.pub_key);

        let secret = combine(&mlkem_secret, x25519.secret.secret_bytes());
        mlkem_secret.zeroize();

        Ok(CompletedKeyExchange {
            group: NamedGroup::X25519MLKEM768,
            pub_key,
            secret,
        })
    }

    fn ffdhe_group(&self) -> Option<FfdheGroup<'static>> {
        None
    }

    fn name(&self) -> NamedGroup {
        NamedGroup::X25519MLKEM768
    }

    fn fips(&self) -> bool {
        // Neither ring nor ml-kem is a FIPS-validated module.
        false
    }

    fn usable_for_version(&self, version: ProtocolVersion) -> bool {
        version == ProtocolVersion::TLSv1_3
    }
}

/// The client's in-progress exchange.
struct ClientKeyExchange {
    /// Boxed: the expanded ML-KEM-768 decapsulation key is several KiB.
    decapsulation_key: Box<ml_kem_768::DecapsulationKey>,
    x25519: Box<dyn ActiveKeyExchange>,
    /// `ek || x25519_public`.
    pub_key: Vec<u8>,
}

impl ActiveKeyExchange for ClientKeyExchange {
    fn complete(self: Box<Self>, server_share: &[u8]) -> Result<SharedSecret, Error> {
        if server_share.len() != SERVER_SHARE_LEN {
            return Err(INVALID_KEY_SHARE);
        }
        let (ciphertext, x25519_peer) = server_share.split_at(MLKEM768_CIPHERTEXT_LEN);
        let ciphertext: &ml_kem_768::Ciphertext =
            ciphertext.try_into().map_err(|_| INVALID_KEY_SHARE)?;

        // Implicit rejection: a bad ciphertext gives a pseudo-random key, never an error.
        let mut mlkem_secret = self.decapsulation_key.decapsulate(ciphertext);
        let x25519_secret = self.x25519.complete(x25519_peer)?;

        let secret = combine(&mlkem_secret, x25519_secret.secret_bytes());
        mlkem_secret.zeroize();
        Ok(secret)
    }

    fn hybrid_component(&self) -> Option<(NamedGroup, &[u8])> {
        Some((NamedGroup::X25519, self.x25519.pub_key()))
    }

    fn complete_hybrid_component(
        self: Box<Self>,
        server_share: &[u8],
    ) -> Result<SharedSecret, Error> {
        self.x25519.complete(server_share)
    }

    fn pub_key(&self) -> &[u8] {
        &self.pub_key
    }

    fn ffdhe_group(&self) -> Option<FfdheGroup<'static>> {
        None
    }

    fn group(&self) -> NamedGroup {
        NamedGroup::X25519MLKEM768
    }
}

/// `mlkem_ss || x25519_ss`, moved straight into a zeroize-on-drop [`SharedSecret`].
fn combine(mlkem: &[u8], x25519: &[u8]) -> SharedSecret {
    let mut secret = Vec::with_capacity(SHARED_SECRET_LEN);
    secret.extend_from_slice(mlkem);
    secret.extend_from_slice(x25519);
    SharedSecret::from(secret)
}

fn fill_random(buf: &mut [u8]) -> Result<(), Error> {
    SystemRandom::new()
        .fill(buf)
        .map_err(|_| Error::FailedToGetRandomBytes)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::crypto::CryptoProvider;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use rustls::server::WebPkiClientVerifier;
    use rustls::{
        ClientConfig, ClientConnection, HandshakeKind, RootCertStore, ServerConfig,
        ServerConnection,
    };

    use super::*;

    // ---- the group on its own -------------------------------------------------------------

    fn exchange() -> (Vec<u8>, CompletedKeyExchange, Box<dyn ActiveKeyExchange>) {
        let client = X25519MLKEM768.start().unwrap();
        let client_share = client.pub_key().to_vec();
        let server = X25519MLKEM768.start_and_complete(&client_share).unwrap();
        (client_share, server, client)
    }

    #[test]
    fn shares_and_secret_have_draft_lengths_and_agree() {
        let (client_share, server, client) = exchange();
        assert_eq!(client_share.len(), CLIENT_SHARE_LEN);
        assert_eq!(CLIENT_SHARE_LEN, 1216);
        assert_eq!(server.pub_key.len(), SERVER_SHARE_LEN);
        assert_eq!(SERVER_SHARE_LEN, 1120);
        assert_eq!(server.group, NamedGroup::X25519MLKEM768);

        let client_secret = client.complete(&server.pub_key).unwrap();
        assert_eq!(client_secret.secret_bytes().len(), SHARED_SECRET_LEN);
        assert_eq!(client_secret.secret_bytes(), server.secret.secret_bytes());
    }

    #[test]
    fn x25519_half_is_plain_x25519_and_sits_last() {
        // The X25519 public key at the end of the client share is the hybrid component, and the
        // X25519 half of the secret equals a plain ring X25519 exchange with that key.
        let client = X25519MLKEM768.start().unwrap();
        let (group, x_pub) = client.hybrid_component().unwrap();
        assert_eq!(group, NamedGroup::X25519);
        assert_eq!(x_pub, &client.pub_key()[MLKEM768_ENCAPSULATION_KEY_LEN..]);

        let server = RING_X25519.start_and_complete(x_pub).unwrap();
        let secret = client.complete_hybrid_component(&server.pub_key).unwrap();
        assert_eq!(secret.secret_bytes(), server.secret.secret_bytes());
    }

    #[test]
    fn each_exchange_is_fresh() {
        let (a, _, _) = exchange();
        let (b, _, _) = exchange();
        assert_ne!(
            a[..MLKEM768_ENCAPSULATION_KEY_LEN],
            b[..MLKEM768_ENCAPSULATION_KEY_LEN]
        );
        assert_ne!(
            a[MLKEM768_ENCAPSULATION_KEY_LEN..],
            b[MLKEM768_ENCAPSULATION_KEY_LEN..]
        );
    }

    #[test]
    fn server_rejects_client_share_of_wrong_length() {
        let (client_share, _, _) = exchange();
        for len in [
            0,
            32,
            CLIENT_SHARE_LEN - 1,
            CLIENT_SHARE_LEN + 1,
            SERVER_SHARE_LEN,
        ] {
            let mut share = client_share.clone();
            share.resize(len, 0);
            assert_eq!(
                X25519MLKEM768.start_and_complete(&share).err(),
                Some(INVALID_KEY_SHARE)
            );
        }
    }

    #[test]
    fn server_rejects_encapsulation_key_failing_modulus_check() {
        // Set the first 12-bit coefficient to 0xFFF >= q = 3329.
        let (mut client_share, _, _) = exchange();
        client_share[0] = 0xFF;
        client_share[1] |= 0x0F;
        assert_eq!(
            X25519MLKEM768.start_and_complete(&client_share).err(),
            Some(INVALID_KEY_SHARE)
        );
    }

    #[test]
    fn server_rejects_small_order_x25519_point() {
        // u = 0 gives the all-zero X25519 secret, which RFC 8446 §7.4.2 says to abort on.
        let (mut client_share, _, _) = exchange();
        client_share[MLKEM768_ENCAPSULATION_KEY_LEN..].fill(0);
        assert!(X25519MLKEM768.start_and_complete(&client_share).is_err());
    }

    #[test]
    fn client_rejects_server_share_of_wrong_length() {
        for len in [
            0,
            32,
            SERVER_SHARE_LEN - 1,
            SERVER_SHARE_LEN + 1,
            CLIENT_SHARE_LEN,
        ] {
            let (_, server, client) = exchange();
            let mut share = server.pub_key.clone();
            share.resize(len, 0);
            assert_eq!(client.complete(&share).err(), Some(INVALID_KEY_SHARE));
        }
    }

    #[test]
    fn tampered_ciphertext_gives_a_different_secret() {
        let (_, server, client) = exchange();
        let mut share = server.pub_key.clone();
        share[10] ^= 1;
        let client_secret = client.complete(&share).unwrap();
        let (c, s) = (client_secret.secret_bytes(), server.secret.secret_bytes());
        assert_ne!(c[..MLKEM768_SHARED_KEY_LEN], s[..MLKEM768_SHARED_KEY_LEN]);
        assert_eq!(c[MLKEM768_SHARED_KEY_LEN..], s[MLKEM768_SHARED_KEY_LEN..]);
    }

    #[test]
    fn provider_prefers_the_hybrid_and_keeps_classical_groups() {
        let names: Vec<_> = provider().kx_groups.iter().map(|g| g.name()).collect();
        assert_eq!(
            names,
            [
                NamedGroup::X25519MLKEM768,
                NamedGroup::X25519,
                NamedGroup::secp256r1,
                NamedGroup::secp384r1
            ]
        );
        assert!(!X25519MLKEM768.usable_for_version(ProtocolVersion::TLSv1_2));
    }

    // ---- whole rustls mTLS handshakes (ring only) ------------------------------------------

    struct Pki {
        roots: Arc<RootCertStore>,
        chain: Vec<CertificateDer<'static>>,
        key: PrivatePkcs8KeyDer<'static>,
    }

    /// A P-256 CA and one P-256 leaf with a SPIFFE URI SAN and a DNS SAN, like a mesh SVID.
    fn pki() -> Pki {
        use rcgen::{
            BasicConstraints, CertificateParams, IsCa, KeyPair, PKCS_ECDSA_P256_SHA256, SanType,
        };
        let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);

        let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut leaf = CertificateParams::new(vec!["svc.test".to_string()]).unwrap();
        leaf.subject_alt_names.push(SanType::URI(
            "spiffe://palisade.test/ns/default/sa/svc"
                .try_into()
                .unwrap(),
        ));
        let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();

        let mut roots = RootCertStore::empty();
        roots.add(ca_cert.der().clone()).unwrap();
        Pki {
            roots: Arc::new(roots),
            chain: vec![leaf_cert.der().clone(), ca_cert.der().clone()],
            key: PrivatePkcs8KeyDer::from(leaf_key.serialize_der()),
        }
    }

    fn client_config(pki: &Pki, provider: CryptoProvider) -> Arc<ClientConfig> {
        let mut cfg = ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(pki.roots.clone())
            .with_client_auth_cert(pki.chain.clone(), PrivateKeyDer::Pkcs8(pki.key.clone_key()))
            .unwrap();
        cfg.resumption = rustls::client::Resumption::disabled();
        Arc::new(cfg)
    }

    fn server_config(pki: &Pki, provider: CryptoProvider) -> Arc<ServerConfig> {
        let provider = Arc::new(provider);
        let verifier =
            WebPkiClientVerifier::builder_with_provider(pki.roots.clone(), provider.clone())
                .build()
                .unwrap();
        let cfg = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(pki.chain.clone(), PrivateKeyDer::Pkcs8(pki.key.clone_key()))
            .unwrap();
        Arc::new(cfg)
    }

    /// In-memory handshake; returns (client's group, server's group, client's handshake kind).
    fn handshake(
        client: Arc<ClientConfig>,
        server: Arc<ServerConfig>,
    ) -> Result<(NamedGroup, NamedGroup, HandshakeKind), Error> {
        let mut c = ClientConnection::new(client, ServerName::try_from("svc.test").unwrap())?;
        let mut s = ServerConnection::new(server)?;
        let mut buf = Vec::new();
        while c.is_handshaking() || s.is_handshaking() {
            buf.clear();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).unwrap();
                s.process_new_packets()?;
            }
            buf.clear();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).unwrap();
                c.process_new_packets()?;
            }
        }
        let group = |g: Option<&'static dyn SupportedKxGroup>| g.unwrap().name();
        Ok((
            group(c.negotiated_key_exchange_group()),
            group(s.negotiated_key_exchange_group()),
            c.handshake_kind().unwrap(),
        ))
    }

    fn classical() -> CryptoProvider {
        rustls::crypto::ring::default_provider()
    }

    #[test]
    fn mtls_handshake_negotiates_the_hybrid() {
        let pki = pki();
        let got = handshake(
            client_config(&pki, provider()),
            server_config(&pki, provider()),
        );
        assert_eq!(
            got.unwrap(),
            (
                NamedGroup::X25519MLKEM768,
                NamedGroup::X25519MLKEM768,
                HandshakeKind::Full
            )
        );
    }

    #[test]
    fn hybrid_client_and_classical_server_agree_on_x25519_without_retry() {
        let pki = pki();
        let got = handshake(
            client_config(&pki, provider()),
            server_config(&pki, classical()),
        );
        assert_eq!(
            got.unwrap(),
            (NamedGroup::X25519, NamedGroup::X25519, HandshakeKind::Full)
        );
    }

    #[test]
    fn classical_client_and_hybrid_server_agree_on_x25519() {
        let pki = pki();
        let got = handshake(
            client_config(&pki, classical()),
            server_config(&pki, provider()),
        );
        assert_eq!(
            got.unwrap(),
            (NamedGroup::X25519, NamedGroup::X25519, HandshakeKind::Full)
        );
    }

    #[test]
    fn hybrid_only_peers_refuse_classical_only_peers() {
        // A policy of "post-quantum or nothing" is expressible: drop the classical groups.
        let pki = pki();
        let mut pq_only = provider();
        pq_only.kx_groups = vec![X25519MLKEM768];
        let got = handshake(
            client_config(&pki, classical()),
            server_config(&pki, pq_only),
        );
        assert!(got.is_err());
    }
}
