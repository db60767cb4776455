//! Where the dashboard's traffic figures come from, behind one type: [`Source::poll`] reads
//! them once, and [`poll_forever`] calls it every [`Source::every`] and publishes the result
//! for the HTTP handlers, which then answer from memory at once.
//!
//! - A local mesh's proxies are scraped directly ([`crate::observe::Snapshot::scrape`], the
//!   same read as `palisade stat`); the last readings are kept so that the recent window is
//!   the increase over the last [`RECENT`], and the totals are what the last reading says the
//!   proxies counted since they started (a quiet mesh still shows who talked to whom).
//! - A Prometheus server ([`crate::observe::Prometheus`], as `stat --prometheus`) is asked for
//!   the last [`PROMETHEUS_RECENT`] and the last [`PROMETHEUS_TOTAL`]: its scrapes are
//!   typically 15–30 s apart, so a 10 s window would often hold none.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::server::Shared;
use crate::cmd::one_sentence;
use crate::observe::{Families, LocalMesh, MeshView, Prometheus, Snapshot, Window};

/// How often the proxies are read: often enough for a live page, cheap for the proxies (one
/// `/metrics` each, what a Prometheus server scraping every 2 s would cost).
pub const POLL_EVERY: Duration = Duration::from_secs(2);

/// The recent window the page shows rates, success and latency over (as `palisade stat`'s
/// default window).
pub const RECENT: Duration = Duration::from_secs(10);

/// With Prometheus: how often it is asked, the recent window and the "totals" window.
pub const PROMETHEUS_EVERY: Duration = Duration::from_secs(5);
pub const PROMETHEUS_RECENT: Duration = Duration::from_secs(60);
pub const PROMETHEUS_TOTAL: Duration = Duration::from_secs(3600);

/// The figures at one reading.
#[derive(Clone, Debug)]
pub struct Figures {
    /// The workloads (names, identities), from `mesh.json` or from what Prometheus scrapes.
    pub mesh: MeshView,
    /// The increase of the counters over about the last [`RECENT`] (shorter just after the
    /// dashboard started), or [`PROMETHEUS_RECENT`].
    pub recent: Window,
    /// Everything since each proxy started, or the last [`PROMETHEUS_TOTAL`].
    pub total: Window,
    /// When they were read (Unix seconds).
    pub at: f64,
    /// `proxies` or `prometheus`: where they came from.
    pub source: &'static str,
}

/// The one place the dashboard reads traffic figures from.
pub enum Source {
    /// The proxies of a running local mesh (`STATE_DIR/mesh.json`), scraped.
    Local(Local),
    /// A Prometheus server that scrapes the proxies.
    Prometheus(Prometheus),
}

/// A local mesh and its last readings.
pub struct Local {
    state_dir: PathBuf,
    /// Readings, oldest first: the first one is the recent window's start.
    history: VecDeque<(Instant, Snapshot)>,
}

impl Source {
    /// The source the flags ask for: Prometheus at `prometheus` (naming its targets by the
    /// local mesh of `state_dir`, if there is one, as `stat --prometheus` does), else the local
    /// mesh of `state_dir` (default `.palisade`), which must be running now: a mistake in the
    /// state directory is said at once, not on a page nobody has opened yet.
    pub fn new(prometheus: Option<&str>, state_dir: Option<&PathBuf>) -> anyhow::Result<Source> {
        if let Some(url) = prometheus {
            return Ok(Source::Prometheus(crate::cmd::stat::prometheus_source(
                url, state_dir,
            )?));
        }
        let dir = state_dir
            .cloned()
            .unwrap_or_else(|| PathBuf::from(".palisade"));
        LocalMesh::read(&dir)?;
        Ok(Source::Local(Local {
            state_dir: dir,
            history: VecDeque::new(),
        }))
    }

    /// How often [`Source::poll`] is called.
    pub fn every(&self) -> Duration {
        match self {
            Source::Local(_) => POLL_EVERY,
            Source::Prometheus(_) => PROMETHEUS_EVERY,
        }
    }

    /// Reads the figures once. An error is one sentence for the page (no running mesh, no
    /// proxy answering, Prometheus unreachable); the next poll tries again.
    pub async fn poll(&mut self) -> Result<Figures, String> {
        match self {
            Source::Local(l) => l.poll().await,
            Source::Prometheus(p) => {
                let (recent, total) = tokio::join!(
                    p.window(PROMETHEUS_RECENT, Families::Traffic),
                    p.window(PROMETHEUS_TOTAL, Families::Traffic),
                );
                let (mesh, recent) = recent.map_err(|e| one_sentence(&e))?;
                let (_, total) = total.map_err(|e| one_sentence(&e))?;
                Ok(Figures {
                    mesh,
                    recent,
                    total,
                    at: unix_now(),
                    source: "prometheus",
                })
            }
        }
    }
}

impl Local {
    async fn poll(&mut self) -> Result<Figures, String> {
        // Read each time: a restarted `palisade up` may have new ports or workloads.
        let mesh = LocalMesh::read(&self.state_dir).map_err(|e| one_sentence(&e))?;
        let snap = Snapshot::scrape_some(&mesh)
            .await
            .map_err(|e| one_sentence(&e))?;
        let now = Instant::now();
        self.history.push_back((now, snap));
        // Keep the newest reading that is at least RECENT old (the window's start) and every
        // later one.
        if let Some(start) = now.checked_sub(RECENT) {
            while self.history.len() > 1 && self.history[1].0 <= start {
                self.history.pop_front();
            }
        }
        let (first, last) = match (self.history.front(), self.history.back()) {
            (Some((_, f)), Some((_, l))) => (f, l),
            _ => return Err("no reading of the proxies yet".into()),
        };
        Ok(Figures {
            recent: Window::between(first, last),
            total: Window::since_start(last),
            mesh: mesh.view,
            at: unix_now(),
            source: "proxies",
        })
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The last reading as the handlers see it.
#[derive(Clone, Debug, Default)]
pub struct Polled {
    /// The last figures read (kept while later reads fail, and shown with `error`).
    pub figures: Option<Arc<Figures>>,
    /// Why the last read failed, if it did.
    pub error: Option<String>,
    /// How many reads were made: 0 until the first one ends.
    pub polls: u64,
}

/// Reads the figures every [`Source::every`] until the process ends.
pub async fn poll_forever(mut source: Source, shared: Arc<Shared>) {
    let mut every = tokio::time::interval(source.every());
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let read = source.poll().await;
        shared.polled.send_modify(|p| {
            p.polls += 1;
            match read {
                Ok(f) => {
                    p.figures = Some(Arc::new(f));
                    p.error = None;
                }
                Err(e) => p.error = Some(e),
            }
        });
    }
}
