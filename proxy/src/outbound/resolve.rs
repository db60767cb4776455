//! On-demand discovery for a transparent proxy: services are resolved the first time the app
//! dials them, not pushed for the whole mesh.
//!
//! A redirected connection whose original destination the outbound table does not know waits
//! for one lookup on the Discovery stream (`DeltaRequest.lookups`); concurrent connections to
//! the same destination share it. The control plane answers in a delta that carries the
//! service, so when the answer arrives the table already holds it. A destination that is no
//! mesh service passes through and is remembered as such for [`NOT_FOUND_TTL`]. When the
//! control plane cannot answer (no stream, or no answer within [`LOOKUP_TIMEOUT`]) the
//! connection is refused: sending it through in plaintext would bypass mTLS for what may be a
//! mesh service. This follows linkerd2-proxy's per-target discovery and ztunnel's on-demand
//! lookups.
//!
//! The services resolved on demand are capped ([`crate::config::Limits`]); past the cap the
//! least recently dialled are released, and the control plane removes them with its next
//! delta. A reconnecting proxy names what it holds in its hello, so a new stream (on any
//! replica) starts with them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use palisade_api::delta::Lookups;
use palisade_api::v1;
use tokio::sync::watch;

use crate::telemetry::{Metrics, ResultLabels};

/// How long a connection waits for the control plane to resolve its destination.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a destination that is no mesh service is passed through without asking again.
pub const NOT_FOUND_TTL: Duration = Duration::from_secs(5);

/// The most remembered not-found destinations; past it the expired ones are forgotten, and all
/// of them if none has expired.
const MAX_NOT_FOUND: usize = 4096;

/// What a lookup came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolved {
    /// A mesh service: the outbound table now holds it.
    Found,
    /// No mesh service has this address: pass through.
    NotFound,
    /// The control plane could not answer (disconnected, timed out, or over its per-proxy cap):
    /// refuse the connection.
    Unavailable(&'static str),
}

/// One service held on demand.
#[derive(Debug)]
struct Held {
    key: v1::ServiceKey,
    last_used: Instant,
}

#[derive(Default)]
struct State {
    /// The current stream's lookup handle; none while disconnected.
    lookups: Option<Lookups>,
    /// The stream carries the whole mesh (a control plane of an earlier release, on `Watch`):
    /// a destination the table does not know is no mesh service.
    whole_mesh: bool,
    /// Destinations asked about and not answered yet.
    pending: HashMap<SocketAddr, watch::Sender<Option<Resolved>>>,
    /// Destinations that are no mesh service, until when that answer holds.
    not_found: HashMap<SocketAddr, Instant>,
    /// Services resolved on demand, by the outbound table's key (`name.namespace:port`).
    held: HashMap<String, Held>,
    /// Services released and not yet gone from the config: neither held nor counted.
    releasing: std::collections::HashSet<String>,
}

/// The on-demand resolver of one proxy.
pub struct OnDemand {
    state: Mutex<State>,
    /// Most services held on demand.
    cap: usize,
    /// Declared upstreams (`name.namespace:port`): always held, never released.
    declared: Vec<String>,
}

fn table_key(k: &v1::ServiceKey) -> String {
    format!("{}.{}:{}", k.name, k.namespace, k.port)
}

impl OnDemand {
    pub fn new(cap: usize, declared: Vec<String>) -> Self {
        Self {
            state: Mutex::new(State::default()),
            cap: cap.max(1),
            declared,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A stream is open: lookups go through `lookups`.
    pub fn attach(&self, lookups: Lookups) {
        self.state().lookups = Some(lookups);
    }

    /// A stream that carries the whole mesh is open (no lookups to make).
    pub fn attach_whole_mesh(&self) {
        self.state().whole_mesh = true;
    }

    /// The services held on demand, for a new stream's hello.
    pub fn held(&self) -> Vec<v1::ServiceKey> {
        self.state().held.values().map(|h| h.key.clone()).collect()
    }

    /// The stream is gone: waiting connections are refused now rather than at their timeout.
    pub fn detach(&self, metrics: &Metrics) {
        let mut st = self.state();
        st.lookups = None;
        st.whole_mesh = false;
        for (_, tx) in st.pending.drain() {
            count(metrics, "unavailable");
            tx.send_replace(Some(Resolved::Unavailable("discovery_unavailable")));
        }
    }

    /// Records that the app dialled `service` (a table key), for the least-recently-used order.
    pub fn touch(&self, service: &str) {
        if let Some(h) = self.state().held.get_mut(service) {
            h.last_used = Instant::now();
        }
    }

    /// Resolves `dst`, which the outbound table does not know, through the control plane,
    /// within [`LOOKUP_TIMEOUT`] in all (asking included).
    pub async fn resolve(&self, dst: SocketAddr, metrics: &Metrics) -> Resolved {
        let deadline = tokio::time::Instant::now() + LOOKUP_TIMEOUT;
        let (mut rx, ask) = {
            let mut st = self.state();
            if st.whole_mesh {
                return Resolved::NotFound;
            }
            let now = Instant::now();
            if let Some(until) = st.not_found.get(&dst) {
                if *until > now {
                    return Resolved::NotFound;
                }
                st.not_found.remove(&dst);
            }
            if let Some(tx) = st.pending.get(&dst) {
                (tx.subscribe(), None)
            } else {
                let Some(lookups) = st.lookups.clone() else {
                    count(metrics, "unavailable");
                    return Resolved::Unavailable("discovery_unavailable");
                };
                let (tx, rx) = watch::channel(None);
                st.pending.insert(dst, tx);
                (rx, Some(lookups))
            }
        };
        if let Some(lookups) = ask {
            let asked =
                tokio::time::timeout_at(deadline, lookups.send(vec![dst.to_string()], Vec::new()))
                    .await;
            if !matches!(asked, Ok(true)) {
                self.answer(dst, Resolved::Unavailable("discovery_unavailable"), metrics);
            }
        }
        match tokio::time::timeout_at(deadline, rx.wait_for(Option::is_some)).await {
            Ok(Ok(r)) => r.unwrap_or(Resolved::Unavailable("discovery_unavailable")),
            Ok(Err(_)) => Resolved::Unavailable("discovery_unavailable"),
            Err(_) => {
                // Nobody answered: the next connection asks again.
                if self.state().pending.remove(&dst).is_some() {
                    count(metrics, "timeout");
                }
                Resolved::Unavailable("discovery_timeout")
            }
        }
    }

    fn answer(&self, dst: SocketAddr, r: Resolved, metrics: &Metrics) {
        let mut st = self.state();
        if r == Resolved::NotFound {
            if st.not_found.len() >= MAX_NOT_FOUND {
                let now = Instant::now();
                st.not_found.retain(|_, until| *until > now);
                if st.not_found.len() >= MAX_NOT_FOUND {
                    st.not_found.clear();
                }
            }
            st.not_found.insert(dst, Instant::now() + NOT_FOUND_TTL);
        }
        if let Some(tx) = st.pending.remove(&dst) {
            count(
                metrics,
                match r {
                    Resolved::Found => "found",
                    Resolved::NotFound => "not_found",
                    Resolved::Unavailable(_) => "unavailable",
                },
            );
            tx.send_replace(Some(r));
        }
    }

    /// A delta arrived and was applied (the table holds its services): wakes the connections
    /// waiting for its answers.
    pub fn answered(&self, lookups: &[v1::Lookup], metrics: &Metrics) {
        self.deliver(lookups, true, metrics);
    }

    /// A delta arrived that could not be applied (a full snapshot follows): its "not found" and
    /// "refused" answers stand; its "found" ones wait for a config that holds the service
    /// ([`Self::wake_held`]).
    pub fn answered_unless_found(&self, lookups: &[v1::Lookup], metrics: &Metrics) {
        self.deliver(lookups, false, metrics);
    }

    /// Wakes the connections waiting for a destination that the table now holds.
    pub fn wake_held(&self, in_table: impl Fn(SocketAddr) -> bool, metrics: &Metrics) {
        let held: Vec<SocketAddr> = self
            .state()
            .pending
            .keys()
            .copied()
            .filter(|d| in_table(*d))
            .collect();
        for dst in held {
            self.answer(dst, Resolved::Found, metrics);
        }
    }

    fn deliver(&self, lookups: &[v1::Lookup], found_too: bool, metrics: &Metrics) {
        for l in lookups {
            let Ok(dst) = l.destination.parse::<SocketAddr>() else {
                continue;
            };
            let r = match l.result() {
                v1::LookupResult::LookupFound if !found_too => continue,
                v1::LookupResult::LookupFound => Resolved::Found,
                v1::LookupResult::LookupNotFound => Resolved::NotFound,
                v1::LookupResult::LookupRefused => Resolved::Unavailable("lookup_refused"),
            };
            self.answer(dst, r, metrics);
        }
    }

    /// The proxy now holds `cfg`: the services it resolved on demand are those of `cfg` that
    /// it did not declare (and did not release). Past the cap, the least recently used are
    /// released; returns their keys (to send on the stream). `idle_of` says how long a
    /// service's endpoints have had no request (from their load, so requests on long-lived
    /// connections count as use, not only new connections).
    pub fn held_now(
        &self,
        cfg: &v1::ProxyConfig,
        now: Instant,
        idle_of: impl Fn(&str) -> Option<Duration>,
        metrics: &Metrics,
    ) -> Vec<v1::ServiceKey> {
        let mut st = self.state();
        let mut held = HashMap::with_capacity(cfg.services.len());
        let mut still_releasing = std::collections::HashSet::new();
        for s in &cfg.services {
            let key = palisade_api::delta::key_of(s);
            let name = table_key(&key);
            if self.declared.contains(&name) {
                continue;
            }
            if st.releasing.contains(&name) {
                still_releasing.insert(name);
                continue;
            }
            let touched = st.held.get(&name).map_or(now, |h| h.last_used);
            let active = idle_of(&name).and_then(|idle| now.checked_sub(idle));
            let last_used = active.map_or(touched, |a| a.max(touched));
            held.insert(name, Held { key, last_used });
        }
        st.releasing = still_releasing;
        let mut released = Vec::new();
        if held.len() > self.cap {
            let mut by_age: Vec<(&String, Instant)> =
                held.iter().map(|(k, h)| (k, h.last_used)).collect();
            by_age.sort_by_key(|(_, t)| *t);
            let evict: Vec<String> = by_age
                .iter()
                .take(held.len() - self.cap)
                .map(|(k, _)| (*k).clone())
                .collect();
            for k in evict {
                if let Some(h) = held.remove(&k) {
                    released.push(h.key);
                    st.releasing.insert(k);
                }
            }
            metrics.on_demand_evictions.inc_by(released.len() as u64);
        }
        metrics.on_demand_services.set(held.len() as i64);
        st.held = held;
        released
    }

    /// The handle of the current stream, to send releases on.
    pub fn lookups(&self) -> Option<Lookups> {
        self.state().lookups.clone()
    }
}

fn count(metrics: &Metrics, result: &'static str) {
    metrics
        .lookups
        .get_or_create(&ResultLabels { result })
        .inc();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str) -> v1::Service {
        v1::Service {
            name: name.into(),
            namespace: "ns".into(),
            port: 80,
            ..Default::default()
        }
    }

    fn cfg(names: &[&str]) -> v1::ProxyConfig {
        v1::ProxyConfig {
            services: names.iter().map(|n| svc(n)).collect(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn without_a_stream_a_lookup_is_refused_and_a_not_found_answer_is_remembered() {
        let m = Metrics::new();
        let od = OnDemand::new(10, vec![]);
        let dst: SocketAddr = "10.0.0.1:80".parse().unwrap();
        assert_eq!(
            od.resolve(dst, &m).await,
            Resolved::Unavailable("discovery_unavailable")
        );
        // An answer for a destination nobody asked about is still remembered when it is a
        // not-found, and wakes nobody.
        od.answered(
            &[v1::Lookup {
                destination: dst.to_string(),
                result: v1::LookupResult::LookupNotFound as i32,
            }],
            &m,
        );
        assert_eq!(od.resolve(dst, &m).await, Resolved::NotFound);
    }

    #[test]
    fn past_the_cap_the_least_recently_dialled_are_released_declared_ones_never() {
        let m = Metrics::new();
        let od = OnDemand::new(2, vec!["up.ns:80".into()]);
        let never = |_: &str| None;
        // The clock is passed in: a and b held a second ago, a dialled now, c new a second
        // from now.
        let now = Instant::now();
        let earlier = now
            .checked_sub(Duration::from_secs(1))
            .expect("uptime over 1 s");
        assert!(
            od.held_now(&cfg(&["a", "b", "up"]), earlier, never, &m)
                .is_empty()
        );
        od.touch("a.ns:80");
        let later = now + Duration::from_secs(1);
        let released = od.held_now(&cfg(&["a", "b", "c", "up"]), later, never, &m);
        let names: Vec<&str> = released.iter().map(|k| k.name.as_str()).collect();
        // b is held since the start, a was dialled since, c is new: b goes.
        assert_eq!(names, ["b"]);
        let mut held: Vec<String> = od.held().into_iter().map(|k| k.name).collect();
        held.sort();
        assert_eq!(held, ["a", "c"]);
        // b is still in the next config (the control plane has not removed it yet): it is not
        // held again, so nothing else is evicted for it.
        assert!(
            od.held_now(&cfg(&["a", "b", "c", "up"]), later, never, &m)
                .is_empty()
        );
        // A service whose endpoints are busy counts as used even without new connections: a
        // (recently dialled) d forces out c, not a, which carries requests right now.
        let busy = |k: &str| (k == "a.ns:80").then_some(Duration::ZERO);
        let latest = now + Duration::from_secs(2);
        let released = od.held_now(&cfg(&["a", "c", "d", "up"]), latest, busy, &m);
        let names: Vec<&str> = released.iter().map(|k| k.name.as_str()).collect();
        assert_eq!(names, ["c"]);
    }
}
