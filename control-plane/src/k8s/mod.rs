//! Palisade on Kubernetes: the config source, TokenReview identities and the control plane
//! that serves them (`palisade control-plane --source kubernetes`), and the CRDs and manifests
//! `palisade install` prints.

pub mod control_plane;
pub mod crd;
pub mod manifests;
pub mod routes;
pub mod source;
pub mod status;
pub mod tokenreview;
pub mod trust_bundle;
