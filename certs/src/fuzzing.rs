//! Entry points of the fuzz targets (`fuzz/fuzz_targets/`) and of the corpus replay test
//! (`tests/fuzz_corpus.rs`), so that what the fuzzer ran and what `cargo test` replays cannot
//! drift apart. Each takes raw bytes, runs the real parser, asserts what must hold of whatever
//! it returns, and says whether the input was accepted. A panic is a bug, in the parser or in
//! the property. Not an API: hidden from the docs, no stability promised.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::client::danger::ServerCertVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::bundle::TrustBundle;
use crate::duration::{MAX_DIGITS, MAX_LEN, parse_duration};
use crate::spiffe::{MAX_ID_LEN, SpiffeId, TrustDomain};
use crate::store::SharedBundle;
use crate::tls::{ExpectedServerVerifier, SvidClientVerifier};
use crate::verify::{SvidError, inspect, peer_id, verify_svid};

/// A SPIFFE ID as it arrives in a URI SAN, a policy principal or a flag.
pub fn spiffe_id(data: &[u8]) -> bool {
    let Ok(s) = std::str::from_utf8(data) else {
        return false;
    };
    if let Ok(td) = TrustDomain::new(s) {
        assert_eq!(td.as_str(), s);
        assert_eq!(SpiffeId::parse(td.id().as_str()), Ok(td.id()));
    }
    let id = match SpiffeId::parse(s) {
        Ok(id) => id,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return false;
        }
    };
    // The stored form is the input with the scheme lower-cased, and parses to itself.
    assert!(id.as_str().starts_with("spiffe://"));
    assert_eq!(id.as_str().get(9..), s.get(9..));
    assert!(id.as_str().len() <= MAX_ID_LEN);
    assert_eq!(SpiffeId::parse(id.as_str()).as_ref(), Ok(&id));
    // Nothing that could smuggle a second meaning into a byte-for-byte comparison.
    assert!(id.as_str().is_ascii());
    assert!(
        !id.without_scheme()
            .contains(['?', '#', '%', '\0', '@', ':', '\\'])
    );
    assert!(!id.path().contains("//") && !id.path().ends_with('/'));
    assert!(TrustDomain::new(id.trust_domain_str()).is_ok());
    assert_eq!(id.is_root(), id.path().is_empty());
    assert_eq!(
        id.without_scheme(),
        format!("{}{}", id.trust_domain_str(), id.path())
    );
    if let Some((ns, sa)) = id.namespace_and_sa() {
        assert_eq!(
            SpiffeId::for_workload(&id.trust_domain(), ns, sa).as_ref(),
            Ok(&id)
        );
    }
    true
}

/// A duration as the mesh file's `certificateLifetime` and every CLI duration flag take it.
pub fn duration(data: &[u8]) -> bool {
    let Ok(s) = std::str::from_utf8(data) else {
        return false;
    };
    let d = match parse_duration(s) {
        Ok(d) => d,
        Err(e) => {
            // The error quotes a shortened input: one log line, whatever was written.
            let msg = e.to_string();
            assert!(!msg.is_empty() && msg.len() < 400, "{} bytes", msg.len());
            return false;
        }
    };
    assert!(s.trim().len() <= MAX_LEN);
    // The bound the module promises: far below u64::MAX seconds, and an Instant plus it fits.
    assert!(d.as_secs() < 3_100_000_000_000_000_000, "{d:?} from {s:?}");
    assert!(std::time::Instant::now().checked_add(d).is_some(), "{s:?}");
    // What was read is what a canonical spelling reads as.
    if d.as_secs() < 10u64.pow(MAX_DIGITS as u32) {
        let canonical = format!("{}s {}ns", d.as_secs(), d.subsec_nanos());
        assert_eq!(parse_duration(&canonical), Ok(d), "{s:?} -> {canonical:?}");
    }
    true
}

/// The trust anchor of the SVID corpus (`fuzz/corpus/svid_der/`): a throwaway CA whose keys
/// were discarded after issuing the seeds. Public, like any root.
const FUZZ_ROOT_PEM: &[u8] = include_bytes!("fuzzing-root.pem");
/// A fixed "now" inside every seed's validity (2026-12-02T07:25:22Z), so that the replay
/// verifies the same way in ten years.
pub const FUZZ_NOW: u64 = 1_796_196_322;

fn fuzz_bundle() -> &'static SharedBundle {
    static BUNDLE: OnceLock<SharedBundle> = OnceLock::new();
    BUNDLE.get_or_init(|| {
        let root = CertificateDer::from_pem_slice(FUZZ_ROOT_PEM).expect("the fixture root parses");
        let bundle = TrustBundle::with_roots(&TrustDomain::cluster_local(), [root])
            .expect("the fixture root is a trust anchor");
        Arc::new(ArcSwap::from_pointee(bundle))
    })
}

/// The length of the DER element at the start of `d` (tag, length, content), if its header
/// can be read.
fn der_len(d: &[u8]) -> Option<usize> {
    let first = usize::from(*d.get(1)?);
    if first < 0x80 {
        return Some(2 + first);
    }
    let k = first & 0x7f;
    if k == 0 || k > 3 {
        return None;
    }
    let n = d
        .get(2..2 + k)?
        .iter()
        .fold(0usize, |n, &b| n << 8 | usize::from(b));
    Some(2 + k + n)
}

/// The input as a certificate chain, leaf first: consecutive DER elements, at most four (the
/// last takes whatever remains).
pub fn split_chain(mut data: &[u8]) -> Vec<CertificateDer<'_>> {
    let mut chain = Vec::new();
    while !data.is_empty() {
        let n = match der_len(data) {
            Some(n) if n <= data.len() && chain.len() < 3 => n,
            _ => data.len(),
        };
        chain.push(CertificateDer::from(&data[..n]));
        data = &data[n..];
    }
    chain
}

/// A certificate chain a peer presents in a handshake (the input: DER certificates back to
/// back, leaf first), through the verifiers the proxies install in rustls, against a fixed
/// trust bundle for `cluster.local` at [`FUZZ_NOW`].
pub fn svid_der(data: &[u8]) -> bool {
    let chain = split_chain(data);
    let bundle = fuzz_bundle();
    let td = TrustDomain::cluster_local();
    let now = UnixTime::since_unix_epoch(Duration::from_secs(FUZZ_NOW));
    let direct = verify_svid(&chain, &bundle.load(), Some(&td), now);
    let Some((leaf, rest)) = chain.split_first() else {
        assert_eq!(direct, Err(SvidError::NoCertificate));
        return false;
    };
    // Inbound: any identity of the trust domain.
    let inbound = SvidClientVerifier::new(bundle.clone(), Some(td.clone()));
    let inbound_ok = inbound.verify_client_cert(leaf, rest, now).is_ok();
    assert_eq!(inbound_ok, direct.is_ok(), "{direct:?}");
    // Outbound: exactly the identity the control plane expects for the endpoint.
    let web = SpiffeId::parse("spiffe://cluster.local/ns/demo/sa/web").expect("a valid ID");
    let outbound = ExpectedServerVerifier::new(bundle.clone(), web.clone());
    let name = ServerName::try_from("web.demo.svc").expect("a valid DNS name");
    let outbound_ok = outbound
        .verify_server_cert(leaf, rest, &name, &[], now)
        .is_ok();
    assert_eq!(outbound_ok, direct.as_ref().is_ok_and(|id| *id == web));
    // Reading a peer's ID and `palisade cert inspect` take any bytes too.
    let peer = peer_id(leaf);
    let info = inspect(leaf);
    match &direct {
        Ok(id) => {
            assert!(!id.is_root());
            assert_eq!(id.trust_domain_str(), td.as_str());
            assert_eq!(peer.as_ref(), Ok(id));
            let info = info.expect("a verified leaf can be inspected");
            assert!(!info.is_ca);
            assert_eq!(info.svid_conformance, Ok(()));
            assert_eq!(info.spiffe_id.as_ref(), Some(id));
            assert!(info.not_before <= FUZZ_NOW as i64 && FUZZ_NOW as i64 <= info.not_after);
            true
        }
        Err(e) => {
            assert!(!e.reason().is_empty());
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_a_chain_on_der_boundaries() {
        let a = [0x30, 0x03, 1, 2, 3];
        let b = [0x30, 0x81, 0x02, 9, 9];
        let joined: Vec<u8> = a.iter().chain(&b).copied().collect();
        let chain = split_chain(&joined);
        assert_eq!(chain.len(), 2);
        assert_eq!(chain[0].as_ref(), &a);
        assert_eq!(chain[1].as_ref(), &b);
        // A header claiming more than there is: the rest is one (malformed) certificate.
        assert_eq!(split_chain(&[0x30, 0x84, 0xff]).len(), 1);
        assert!(split_chain(&[]).is_empty());
    }

    #[test]
    fn garbage_is_refused_everywhere() {
        assert!(!svid_der(b""));
        assert!(!svid_der(&[0x30, 0x03, 1, 2, 3]));
        assert!(!spiffe_id(b"spiffe://"));
        assert!(spiffe_id(b"SPIFFE://cluster.local/ns/a/sa/b"));
        assert!(!duration(b"10"));
        assert!(duration(b"1h30m"));
    }
}
