//! Palisade on Kubernetes: the CRDs and the manifests `palisade install` prints.

pub mod crd;
pub mod manifests;
