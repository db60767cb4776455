//! The control plane <-> proxy API of Palisade (gRPC, generated from `proto/` at build time
//! without a system protoc) and the Kubernetes-shaped policy resources both sides share.
#![forbid(unsafe_code)]

/// Generated messages and services of `palisade.v1`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("palisade.v1");
}

pub mod client;
pub mod policy;
