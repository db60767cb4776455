//! Palisade on Kubernetes: the config source, TokenReview identities and the control plane
//! that serves them (`palisade control-plane --source kubernetes`).

pub mod control_plane;
pub mod routes;
pub mod source;
pub mod tokenreview;
