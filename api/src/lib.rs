//! The control plane <-> proxy API of Palisade (gRPC, generated from `proto/` at build time
//! without a system protoc) and the Kubernetes-shaped policy resources both sides share.
#![forbid(unsafe_code)]

/// Generated messages and services of `palisade.v1`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("palisade.v1");
}

pub mod app_probe;
pub mod authorization;
pub mod call;
pub mod client;
pub mod codec;
pub mod delta;
#[doc(hidden)]
pub mod fuzzing;
pub mod mtls;
pub mod path;
pub mod policy;
pub mod protocol;
pub mod trace;

pub use mtls::MtlsMode;
pub use path::PathNormalization;
pub use protocol::Protocol;

/// A digest of what a proxy is configured with, ignoring the version and the trust bundle
/// (which travel with every snapshot): the control plane and a proxy that report the same
/// digest for a workload are in sync (`palisade check`).
pub fn config_digest(cfg: &v1::ProxyConfig) -> u64 {
    use prost::Message;
    let mut c = cfg.clone();
    c.version = 0;
    c.trust_bundle_der.clear();
    // FNV-1a: stable across processes and builds, unlike the std hasher.
    c.encode_to_vec()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
}
