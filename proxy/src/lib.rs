//! Palisade's sidecar data plane (being written).
#![forbid(unsafe_code)]

pub mod authz;
