//! One scrape of every proxy of a local mesh, and what changed between two of them.
//!
//! A [`Snapshot`] holds, per workload, the cumulative counters that `stat` and `edges` read:
//! `palisade_requests_total` and the `palisade_request_duration_seconds` buckets by
//! (direction, src_identity, dst_identity, status_code, route), and
//! `palisade_authz_decisions_total` by (decision, policy), with the proxy's
//! `palisade_proxy_start_time_seconds`. A [`Window`] is the increase of those counters
//! between two snapshots (what PromQL's `increase()` gives, without extrapolation), or since
//! each proxy started.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::cost;
use super::histogram::Histogram;
use super::mesh::LocalMesh;
use crate::cmd::prom::{self, Sample};

pub const REQUESTS: &str = "palisade_requests_total";
pub const DURATION_BUCKET: &str = "palisade_request_duration_seconds_bucket";
pub const AUTHZ: &str = "palisade_authz_decisions_total";
pub const START_TIME: &str = "palisade_proxy_start_time_seconds";

/// The labels of a request series (the latency histogram's, less `le`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Series {
    /// `inbound` (to this workload) or `outbound` (from its app).
    pub direction: String,
    pub src: String,
    pub dst: String,
    /// The response status (0: none could be read).
    pub status: u16,
    /// The matched route rule (`namespace/name/rule`), empty when none applies.
    pub route: String,
}

impl Series {
    fn of(s: &Sample) -> Self {
        Series {
            direction: s.label("direction").to_string(),
            src: s.label("src_identity").to_string(),
            dst: s.label("dst_identity").to_string(),
            status: s.label("status_code").parse().unwrap_or(0),
            route: s.label("route").to_string(),
        }
    }

    pub fn inbound(&self) -> bool {
        self.direction == "inbound"
    }

    pub fn outbound(&self) -> bool {
        self.direction == "outbound"
    }
}

/// The counters of one proxy that matter here, cumulative (a scrape) or an increase (a
/// window).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counters {
    pub requests: BTreeMap<Series, f64>,
    pub latency: BTreeMap<Series, Histogram>,
    /// `palisade_authz_decisions_total` by (decision, policy).
    pub authz: BTreeMap<(String, String), f64>,
    /// The `palisade_cost_*` counters (`palisade cost`, the dashboard's cost view).
    pub cost: cost::Counters,
}

impl Counters {
    pub fn from_samples(samples: &[Sample]) -> Self {
        let mut c = Counters {
            cost: cost::Counters::from_samples(samples),
            ..Counters::default()
        };
        for s in samples.iter().filter(|s| s.value.is_finite()) {
            if s.name == REQUESTS {
                *c.requests.entry(Series::of(s)).or_default() += s.value;
            } else if s.name == DURATION_BUCKET {
                let le = match s.label("le") {
                    "+Inf" | "Inf" => f64::INFINITY,
                    v => match v.parse() {
                        Ok(le) => le,
                        Err(_) => continue,
                    },
                };
                c.latency
                    .entry(Series::of(s))
                    .or_default()
                    .insert(le, s.value);
            } else if s.name == AUTHZ {
                *c.authz
                    .entry((
                        s.label("decision").to_string(),
                        s.label("policy").to_string(),
                    ))
                    .or_default() += s.value;
            }
        }
        c
    }

    /// What grew from `before` to `self`, series by series; a series that went down (its
    /// proxy restarted between the scrapes) counts from zero, as `increase()` does.
    pub fn increase_since(&self, before: &Counters) -> Counters {
        fn counter(after: f64, before: Option<&f64>) -> f64 {
            match before {
                Some(b) if *b <= after => after - b,
                _ => after,
            }
        }
        Counters {
            requests: self
                .requests
                .iter()
                .map(|(k, v)| (k.clone(), counter(*v, before.requests.get(k))))
                .collect(),
            latency: self
                .latency
                .iter()
                .map(|(k, h)| {
                    let d = before
                        .latency
                        .get(k)
                        .map_or_else(|| h.clone(), |b| h.increase_since(b));
                    (k.clone(), d)
                })
                .collect(),
            authz: self
                .authz
                .iter()
                .map(|(k, v)| (k.clone(), counter(*v, before.authz.get(k))))
                .collect(),
            cost: cost::Counters::increase(&before.cost, &self.cost),
        }
    }

    /// Adds another proxy's counters to these: the pods of one workload, on a cluster, are
    /// one row.
    pub fn add(&mut self, other: &Counters) {
        for (k, v) in &other.requests {
            *self.requests.entry(k.clone()).or_default() += v;
        }
        for (k, h) in &other.latency {
            self.latency.entry(k.clone()).or_default().add(h);
        }
        for (k, v) in &other.authz {
            *self.authz.entry(k.clone()).or_default() += v;
        }
        self.cost.add(&other.cost);
    }

    /// Authorization decisions of one kind (`allow`, `deny`, `audit`), over every policy.
    pub fn decisions(&self, decision: &str) -> f64 {
        self.authz
            .iter()
            .filter(|((d, _), _)| d == decision)
            // From +0: an empty float sum is -0, which prints as "-0".
            .fold(0.0, |sum, (_, v)| sum + v)
    }
}

/// One proxy's scrape.
#[derive(Clone, Debug)]
pub struct ProxySnapshot {
    pub counters: Counters,
    /// `palisade_proxy_start_time_seconds`: when the proxy started (unix seconds).
    pub start_time: Option<f64>,
    /// When its answer arrived.
    pub at: Instant,
    /// The same, in unix seconds (for the age of the proxy).
    pub unix_time: f64,
}

/// Every proxy of a mesh, scraped at (about) the same time.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// By workload name.
    pub proxies: BTreeMap<String, ProxySnapshot>,
    /// Workloads whose proxy could not be read, with why.
    pub failed: BTreeMap<String, String>,
}

/// How long a proxy has to answer a scrape.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Snapshot {
    /// Scrapes every proxy of `mesh` at once. A proxy that does not answer (or a workload
    /// without an admin address) is in [`Snapshot::failed`], not an error: the others count.
    pub async fn scrape(mesh: &LocalMesh) -> Snapshot {
        let futures = mesh.workloads.iter().map(|w| async move {
            let Some(admin) = w.admin else {
                return Err(format!("{} gives it no admin address", mesh.path.display()));
            };
            let (status, text) = crate::cmd::http_util::request(
                http::Method::GET,
                admin,
                "/metrics",
                SCRAPE_TIMEOUT,
            )
            .await
            .map_err(|e| format!("{admin}: {}", crate::cmd::one_sentence(&e)))?;
            if !status.is_success() {
                return Err(format!("{admin}/metrics answered {status}"));
            }
            Ok(Self::proxy_from_text(&text))
        });
        let results = futures_util::future::join_all(futures).await;
        let mut snap = Snapshot::default();
        for (w, r) in mesh.workloads.iter().zip(results) {
            match r {
                Ok(p) => {
                    snap.proxies.insert(w.name.clone(), p);
                }
                Err(e) => {
                    snap.failed.insert(w.name.clone(), e);
                }
            }
        }
        snap
    }

    /// [`Snapshot::scrape`], failing (in one sentence) when no proxy answered at all.
    pub async fn scrape_some(mesh: &LocalMesh) -> anyhow::Result<Snapshot> {
        let snap = Self::scrape(mesh).await;
        if snap.proxies.is_empty() {
            let first = snap
                .failed
                .iter()
                .next()
                .map(|(name, why)| format!(" ({name}: {why})"))
                .unwrap_or_default();
            anyhow::bail!(
                "none of the {} proxies of {} answers on its admin port{first}: is `palisade up` still running with that state dir?",
                mesh.workloads.len(),
                mesh.path.display()
            );
        }
        Ok(snap)
    }

    /// A proxy's scrape from its `/metrics` text, taken now.
    pub fn proxy_from_text(text: &str) -> ProxySnapshot {
        let samples = prom::parse(text);
        ProxySnapshot {
            counters: Counters::from_samples(&samples),
            start_time: prom::value(&samples, START_TIME).filter(|t| *t > 0.0),
            at: Instant::now(),
            unix_time: unix_now(),
        }
    }
}

/// One proxy's counters over a window, and how long the window was for it.
#[derive(Clone, Debug)]
pub struct ProxyWindow {
    pub counters: Counters,
    /// Seconds (for rates); None when unknown (a proxy that does not say when it started).
    pub seconds: Option<f64>,
}

/// The increase of every proxy's counters over a window.
#[derive(Clone, Debug, Default)]
pub struct Window {
    /// By workload name: the proxies read at both ends of the window.
    pub proxies: BTreeMap<String, ProxyWindow>,
    /// Workloads left out (not read at one end), with why.
    pub missing: BTreeMap<String, String>,
    /// The window's length as reported (the longest of the proxies'), in seconds.
    pub seconds: Option<f64>,
    /// True for [`Window::since_start`].
    pub since_start: bool,
}

impl Window {
    /// What grew between two snapshots of the same mesh. A proxy that restarted in between
    /// (another start time) counts from its start.
    pub fn between(first: &Snapshot, second: &Snapshot) -> Window {
        let mut w = Window::default();
        for (name, b) in &second.proxies {
            let Some(a) = first.proxies.get(name) else {
                let why = first
                    .failed
                    .get(name)
                    .cloned()
                    .unwrap_or_else(|| "not read at the start of the window".into());
                w.missing.insert(name.clone(), why);
                continue;
            };
            let restarted = matches!((a.start_time, b.start_time), (Some(x), Some(y)) if x != y);
            let (counters, seconds) = if restarted {
                (
                    b.counters.clone(),
                    b.start_time.map(|s| (b.unix_time - s).max(0.0)),
                )
            } else {
                (
                    b.counters.increase_since(&a.counters),
                    Some(b.at.saturating_duration_since(a.at).as_secs_f64()),
                )
            };
            w.proxies
                .insert(name.clone(), ProxyWindow { counters, seconds });
        }
        for (name, why) in &second.failed {
            w.missing.insert(name.clone(), why.clone());
        }
        w.seconds = w.longest();
        w
    }

    /// Everything the proxies counted since each of them started: exact totals, each proxy's
    /// rates over its own age.
    pub fn since_start(snap: &Snapshot) -> Window {
        let proxies = snap
            .proxies
            .iter()
            .map(|(name, p)| {
                (
                    name.clone(),
                    ProxyWindow {
                        counters: p.counters.clone(),
                        seconds: p.start_time.map(|s| (p.unix_time - s).max(0.0)),
                    },
                )
            })
            .collect();
        let mut w = Window {
            proxies,
            missing: snap.failed.clone(),
            seconds: None,
            since_start: true,
        };
        w.seconds = w.longest();
        w
    }

    fn longest(&self) -> Option<f64> {
        self.proxies
            .values()
            .filter_map(|p| p.seconds)
            .max_by(f64::total_cmp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WEB: &str = "spiffe://cluster.local/ns/demo/sa/web";
    const API: &str = "spiffe://cluster.local/ns/demo/sa/api";

    fn text(ok: u64, fast: u64, denied: u64, start: f64) -> String {
        format!(
            r#"# TYPE palisade_requests counter
palisade_requests_total{{direction="inbound",src_identity="{WEB}",dst_identity="{API}",status_code="200",route=""}} {ok}
palisade_requests_total{{direction="outbound",src_identity="{API}",dst_identity="unknown",status_code="503",route=""}} 1
# TYPE palisade_request_duration_seconds histogram
palisade_request_duration_seconds_sum{{direction="inbound",src_identity="{WEB}",dst_identity="{API}",status_code="200",route=""}} 0.01
palisade_request_duration_seconds_count{{direction="inbound",src_identity="{WEB}",dst_identity="{API}",status_code="200",route=""}} {ok}
palisade_request_duration_seconds_bucket{{le="0.001",direction="inbound",src_identity="{WEB}",dst_identity="{API}",status_code="200",route=""}} {fast}
palisade_request_duration_seconds_bucket{{le="+Inf",direction="inbound",src_identity="{WEB}",dst_identity="{API}",status_code="200",route=""}} {ok}
# TYPE palisade_authz_decisions counter
palisade_authz_decisions_total{{decision="deny",policy="no_allow_match"}} {denied}
palisade_authz_decisions_total{{decision="allow",policy="demo/api-from-web"}} {ok}
# TYPE palisade_proxy_start_time_seconds gauge
palisade_proxy_start_time_seconds {start}
# EOF
"#
        )
    }

    fn snap(name: &str, p: ProxySnapshot) -> Snapshot {
        let mut s = Snapshot::default();
        s.proxies.insert(name.into(), p);
        s
    }

    #[test]
    fn a_scrape_keeps_requests_latency_authz_and_start_time() {
        let p = Snapshot::proxy_from_text(&text(10, 7, 2, 1000.5));
        let inbound = Series {
            direction: "inbound".into(),
            src: WEB.into(),
            dst: API.into(),
            status: 200,
            route: String::new(),
        };
        assert_eq!(p.counters.requests[&inbound], 10.0);
        assert_eq!(p.counters.requests.len(), 2);
        assert_eq!(p.counters.latency[&inbound].count(), 10.0);
        assert_eq!(p.counters.latency[&inbound].buckets.len(), 2);
        assert_eq!(p.counters.decisions("deny"), 2.0);
        assert_eq!(p.counters.decisions("allow"), 10.0);
        assert!(p.counters.decisions("audit").is_sign_positive());
        assert_eq!(p.start_time, Some(1000.5));
    }

    #[test]
    fn a_window_is_the_increase_and_a_restart_counts_from_zero() {
        let a = Snapshot::proxy_from_text(&text(10, 7, 2, 1000.0));
        let b = Snapshot::proxy_from_text(&text(25, 9, 3, 1000.0));
        let w = Window::between(&snap("api", a.clone()), &snap("api", b));
        let c = &w.proxies["api"].counters;
        assert_eq!(c.requests.values().sum::<f64>(), 15.0);
        assert_eq!(c.decisions("deny"), 1.0);
        let h = c.latency.values().next().unwrap();
        assert_eq!((h.buckets[0].1, h.count()), (2.0, 15.0));
        assert!(w.proxies["api"].seconds.is_some());
        assert!(!w.since_start);

        // Restarted in between: everything since the new start.
        let r = Snapshot::proxy_from_text(&text(3, 3, 0, 2000.0));
        let w = Window::between(&snap("api", a.clone()), &snap("api", r));
        let c = &w.proxies["api"].counters;
        assert_eq!(c.requests.values().sum::<f64>(), 4.0);

        // Since start: the counters as they are.
        let w = Window::since_start(&snap("api", a.clone()));
        assert!(w.since_start);
        assert_eq!(w.proxies["api"].counters, a.counters);
        assert!(w.seconds.unwrap() > 0.0);

        // A proxy read only at the end is missing, with why.
        let mut first = Snapshot::default();
        first.failed.insert("api".into(), "refused".into());
        let w = Window::between(&first, &snap("api", a));
        assert!(w.proxies.is_empty());
        assert_eq!(w.missing["api"], "refused");
    }
}
