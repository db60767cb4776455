//! Seeing the mesh: the one place where the proxies' metrics are read and aggregated, for
//! `palisade stat`, `palisade edges`, `palisade cost` and the dashboard. It is not a second
//! metrics pipeline: it reads what the proxies already export on their admin `/metrics`
//! (parsed with [`crate::cmd::prom`]), or what a Prometheus server scraped from them, and
//! does the arithmetic a PromQL query would (`increase`, `histogram_quantile`) on two reads.
//!
//! - [`mesh`]: the workloads of a running local mesh (`STATE_DIR/mesh.json`): names, SPIFFE
//!   IDs, admin addresses; and what the reports need of any mesh ([`MeshView`]).
//! - [`snapshot`]: one scrape of every proxy ([`Snapshot`]: per workload, the counters and
//!   histograms that matter), and the increase between two scrapes, or since the proxies
//!   started ([`Window`]).
//! - [`prometheus`]: the same [`Window`] from a Prometheus server's HTTP API.
//! - [`cost`]: the proxies' cost counters, read with the others.
//! - [`histogram`]: latency buckets and Prometheus's `histogram_quantile` interpolation.
//! - [`report`]: a window turned into rows: per workload or route ([`report::stat`]), per
//!   edge ([`report::edges`]), and their JSON.
//! - [`Source`]: either source behind one call, for whatever shows live traffic.
//!
//! docs/observe.md describes the figures, what each counts, and where they come from.

pub mod cost;
pub mod histogram;
pub mod mesh;
pub mod prometheus;
pub mod report;
pub mod snapshot;

use std::time::Duration;

pub use mesh::{LocalMesh, MeshView, Workload};
pub use prometheus::{Families, Prometheus, Server};
pub use report::{By, EdgeRow, StatRow};
pub use snapshot::{Counters, Snapshot, Window};

/// The identity label of a request without an mTLS peer (a plaintext caller), as the proxies
/// write it.
pub const UNKNOWN: &str = "unknown";

/// Where the figures come from: the proxies of a running local mesh, read directly, or a
/// Prometheus server that scrapes them (a cluster, or a local mesh). One entry for the
/// dashboard and any other live view, so that it does not care which.
#[derive(Clone, Debug)]
pub enum Source {
    Local(LocalMesh),
    Prometheus(Prometheus),
}

impl Source {
    /// The workloads, and what they did over the last `d`: every metric the reports use
    /// (traffic and cost).
    ///
    /// A local mesh's proxies are scraped, then again `d` later: this waits `d` (a live view
    /// that refreshes keeps its last [`Snapshot`] and uses [`Window::between`] instead).
    /// Prometheus is asked for both ends of the window at once and answers at once. Fails in
    /// one sentence when nothing can be read at all (no proxy answering, Prometheus
    /// unreachable, answering an error, or scraping no proxy); a proxy that cannot be read is
    /// in [`Window::missing`].
    pub async fn window(&self, d: Duration) -> anyhow::Result<(MeshView, Window)> {
        self.window_of(d, Families::All).await
    }

    /// [`Source::window`] for some metrics only (Prometheus is asked for fewer series; a local
    /// scrape reads them all anyway).
    pub async fn window_of(
        &self,
        d: Duration,
        families: Families,
    ) -> anyhow::Result<(MeshView, Window)> {
        match self {
            Source::Local(mesh) => {
                let first = Snapshot::scrape_some(mesh).await?;
                tokio::time::sleep(d).await;
                let second = Snapshot::scrape(mesh).await;
                Ok((mesh.view.clone(), Window::between(&first, &second)))
            }
            Source::Prometheus(p) => p.window(d, families).await,
        }
    }
}
