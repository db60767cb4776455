//! The wiring of Palisade's command line, shared by its two binaries: `palisade`, every
//! command, and `palisade-proxy`, the sidecar alone. The sidecar binary exists so that a pod
//! maps only data-plane code: the full CLI also carries the control plane, the benchmark and
//! its plotting, and a sidecar process touches pages of all of it.
#![forbid(unsafe_code)]

pub mod cmd;
pub mod observe;
