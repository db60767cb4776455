//! Seeing the mesh: the one place where the proxies' metrics are read and aggregated, for
//! `palisade stat`, `palisade edges` and whatever else shows live traffic (the dashboard).
//! It is not a second metrics pipeline: it reads what the proxies already export on their
//! admin `/metrics` (parsed with [`crate::cmd::prom`]) and does the arithmetic a PromQL query
//! would (`increase`, `histogram_quantile`) on two scrapes.
//!
//! - [`mesh`]: the workloads of a running local mesh (`STATE_DIR/mesh.json`): names, SPIFFE
//!   IDs, admin addresses.
//! - [`snapshot`]: one scrape of every proxy ([`Snapshot`]: per workload, the counters and
//!   histograms that matter), and the increase between two scrapes, or since the proxies
//!   started ([`Window`]).
//! - [`histogram`]: latency buckets and Prometheus's `histogram_quantile` interpolation.
//! - [`report`]: a window turned into rows: per workload or route ([`report::stat`]), per
//!   edge ([`report::edges`]), and their JSON.
//!
//! docs/observe.md describes the figures, what each counts, and where they come from.

pub mod histogram;
pub mod mesh;
pub mod report;
pub mod snapshot;

pub use mesh::{LocalMesh, Workload};
pub use report::{By, EdgeRow, StatRow};
pub use snapshot::{Counters, Snapshot, Window};

/// The identity label of a request without an mTLS peer (a plaintext caller), as the proxies
/// write it.
pub const UNKNOWN: &str = "unknown";
