//! What the inbound side has authorized recently, kept so that `palisade policy what-if` can
//! replay a proposed policy against real traffic before it is applied (docs/observe.md,
//! "policy what-if"). Istio's dry-run annotation only tells after the fact; this answers before.
//!
//! One entry per distinct request shape that authorization looked at: the caller's identity
//! and address, the workload's port, and for HTTP the method, the normalized path (never the
//! query string: it often carries secrets), the host and the route rule; with how many of them
//! were allowed and denied. Header values are not kept (they carry credentials), so a policy
//! whose `when` conditions read headers is evaluated without them; the CLI says so.
//!
//! Bounded twice: at most `entries` shapes per generation (an attacker inventing paths fills
//! it; later new shapes are counted in `palisade_traffic_summary_overflow_requests_total`, not
//! kept), and two generations of `window` each, so what it holds is the last one to two
//! windows of traffic. A hit costs one hash of the borrowed fields and one uncontended lock;
//! only a new shape allocates.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};

/// Shapes kept per generation unless configured (`PALISADE_TRAFFIC_SUMMARY_ENTRIES`).
pub const DEFAULT_ENTRIES: usize = 1024;
/// Length of a generation unless configured (`PALISADE_TRAFFIC_SUMMARY_WINDOW`).
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(600);

/// One request (or TCP connection) as authorization saw it, borrowed from the request: the
/// lookup key, so that a shape already seen costs no allocation.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct Seen<'a> {
    pub peer: Option<&'a str>,
    pub source_ip: IpAddr,
    pub port: u16,
    /// None for an opaque TCP connection.
    pub http: Option<HttpSeen<'a>>,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct HttpSeen<'a> {
    pub method: &'a str,
    /// Without the query string.
    pub path: &'a str,
    pub host: &'a str,
    pub route: Option<&'a str>,
}

/// A kept shape (owned) and its counts.
#[derive(Clone, Debug)]
struct Entry {
    peer: Option<Box<str>>,
    source_ip: IpAddr,
    port: u16,
    http: Option<HttpOwned>,
    allowed: u64,
    denied: u64,
}

#[derive(Clone, Debug)]
struct HttpOwned {
    method: Box<str>,
    path: Box<str>,
    host: Box<str>,
    route: Option<Box<str>>,
}

impl Entry {
    fn new(s: &Seen<'_>) -> Self {
        Entry {
            peer: s.peer.map(Box::from),
            source_ip: s.source_ip,
            port: s.port,
            http: s.http.map(|h| HttpOwned {
                method: h.method.into(),
                path: h.path.into(),
                host: h.host.into(),
                route: h.route.map(Box::from),
            }),
            allowed: 0,
            denied: 0,
        }
    }

    fn seen(&self) -> Seen<'_> {
        Seen {
            peer: self.peer.as_deref(),
            source_ip: self.source_ip,
            port: self.port,
            http: self.http.as_ref().map(|h| HttpSeen {
                method: &h.method,
                path: &h.path,
                host: &h.host,
                route: h.route.as_deref(),
            }),
        }
    }

    fn json(&self) -> Value {
        let mut v = json!({
            "srcIdentity": self.peer.as_deref(),
            "sourceIp": self.source_ip.to_string(),
            "port": self.port,
            "protocol": if self.http.is_some() { "http" } else { "tcp" },
            "allowed": self.allowed,
            "denied": self.denied,
        });
        if let (Some(h), Some(o)) = (&self.http, v.as_object_mut()) {
            o.insert("method".into(), json!(&*h.method));
            o.insert("path".into(), json!(&*h.path));
            o.insert("host".into(), json!(&*h.host));
            o.insert("route".into(), json!(h.route.as_deref()));
        }
        v
    }
}

/// A map keyed by [`TrafficSummary::hasher`]'s output, which is already a keyed SipHash of the
/// shape: hashing that hash again (SipHash per request, a measurable share of the inbound
/// path under callgrind) would add nothing.
type ByHash<V> = HashMap<u64, V, BuildHasherDefault<Prehashed>>;

/// Passes a `u64` key through as its own hash.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys use this hasher; fold anything else in rather than lose it.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        // One `u64` per key: the key is the hash.
        debug_assert_eq!(self.0, 0, "Prehashed takes one u64 per key");
        self.0 = n;
    }
}

/// One window's shapes, by the hash of their [`Seen`] (collisions chained).
#[derive(Default)]
struct Generation {
    shapes: ByHash<Vec<Entry>>,
    len: usize,
    /// Requests (or connections) not kept because the generation was full.
    overflow: u64,
}

struct Generations {
    current: Generation,
    previous: Generation,
    /// When `current` started; `previous` started one window earlier (or with the proxy).
    started: Instant,
    started_wall: SystemTime,
    previous_wall: SystemTime,
}

/// The summary of one proxy's inbound side.
pub struct TrafficSummary {
    /// Keyed per process, so that nobody can choose paths that collide.
    hasher: RandomState,
    entries: AtomicUsize,
    window_ms: AtomicU64,
    inner: Mutex<Generations>,
    overflow: Counter,
    kept: Gauge,
}

impl Default for TrafficSummary {
    fn default() -> Self {
        let now = SystemTime::now();
        TrafficSummary {
            hasher: RandomState::new(),
            entries: AtomicUsize::new(DEFAULT_ENTRIES),
            window_ms: AtomicU64::new(millis(DEFAULT_WINDOW)),
            inner: Mutex::new(Generations {
                current: Generation::default(),
                previous: Generation::default(),
                started: Instant::now(),
                started_wall: now,
                previous_wall: now,
            }),
            overflow: Counter::default(),
            kept: Gauge::default(),
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl TrafficSummary {
    /// Sets the bounds (from the proxy's config); 0 entries turns the summary off.
    pub fn configure(&self, entries: usize, window: Duration) {
        self.entries.store(entries, Ordering::Relaxed);
        self.window_ms
            .store(millis(window).max(1000), Ordering::Relaxed);
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "palisade_traffic_summary_overflow_requests",
            "Inbound requests and connections not kept in the traffic summary (for `palisade policy what-if`) because it held its maximum of distinct shapes",
            self.overflow.clone(),
        );
        registry.register(
            "palisade_traffic_summary_entries",
            "Distinct request shapes (caller, port, method, path, host, route) the traffic summary holds now",
            self.kept.clone(),
        );
    }

    /// Counts one authorization decision.
    pub fn record(&self, seen: &Seen<'_>, allowed: bool) {
        let cap = self.entries.load(Ordering::Relaxed);
        if cap == 0 {
            return;
        }
        let hash = self.hasher.hash_one(seen);
        let Ok(mut g) = self.inner.lock() else {
            return;
        };
        let gen_ = &mut g.current;
        let chain = gen_.shapes.entry(hash).or_default();
        let entry = match chain.iter_mut().position(|e| e.seen() == *seen) {
            Some(i) => &mut chain[i],
            None if gen_.len < cap => {
                chain.push(Entry::new(seen));
                gen_.len += 1;
                self.kept.inc();
                let last = chain.len() - 1;
                &mut chain[last]
            }
            None => {
                if chain.is_empty() {
                    gen_.shapes.remove(&hash);
                }
                gen_.overflow += 1;
                self.overflow.inc();
                return;
            }
        };
        if allowed {
            entry.allowed += 1;
        } else {
            entry.denied += 1;
        }
    }

    /// Starts a new generation once the current one is a window old (called every second).
    pub fn tick(&self) {
        let window = Duration::from_millis(self.window_ms.load(Ordering::Relaxed));
        let Ok(mut g) = self.inner.lock() else {
            return;
        };
        if g.started.elapsed() >= window {
            self.rotate(&mut g);
        }
    }

    fn rotate(&self, g: &mut Generations) {
        g.previous = std::mem::take(&mut g.current);
        g.previous_wall = g.started_wall;
        g.started = Instant::now();
        g.started_wall = SystemTime::now();
        self.kept
            .set(i64::try_from(g.previous.len).unwrap_or(i64::MAX));
    }

    /// Both generations merged, as the admin port's `/traffic` serves them.
    pub fn json(&self) -> Value {
        let Ok(g) = self.inner.lock() else {
            return json!({"error": "the traffic summary is unavailable"});
        };
        let mut merged: ByHash<Vec<Entry>> = ByHash::default();
        for e in g
            .previous
            .shapes
            .values()
            .chain(g.current.shapes.values())
            .flatten()
        {
            let hash = self.hasher.hash_one(e.seen());
            let chain = merged.entry(hash).or_default();
            match chain.iter_mut().find(|m| m.seen() == e.seen()) {
                Some(m) => {
                    m.allowed = m.allowed.saturating_add(e.allowed);
                    m.denied = m.denied.saturating_add(e.denied);
                }
                None => chain.push(e.clone()),
            }
        }
        let since = g
            .previous_wall
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let mut entries: Vec<&Entry> = merged.values().flatten().collect();
        entries.sort_by_key(|e| std::cmp::Reverse(e.allowed.saturating_add(e.denied)));
        json!({
            "since": since,
            "windowSeconds": self.window_ms.load(Ordering::Relaxed) as f64 / 1000.0,
            "maxEntries": self.entries.load(Ordering::Relaxed),
            "overflowRequests": g.previous.overflow + g.current.overflow,
            "entries": entries.iter().map(|e| e.json()).collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http<'a>(peer: Option<&'a str>, path: &'a str) -> Seen<'a> {
        Seen {
            peer,
            source_ip: IpAddr::from([127, 0, 0, 1]),
            port: 8080,
            http: Some(HttpSeen {
                method: "GET",
                path,
                host: "api",
                route: None,
            }),
        }
    }

    fn entries(s: &TrafficSummary) -> Vec<Value> {
        s.json()["entries"].as_array().cloned().unwrap_or_default()
    }

    #[test]
    fn prehashed_keys_are_their_own_hash() {
        let b = BuildHasherDefault::<Prehashed>::default();
        for k in [0u64, 1, 0xdead_beef, u64::MAX] {
            assert_eq!(b.hash_one(k), k);
        }
        // Keys that all fall in one bucket with one tag (low bits and top 7 bits zero) are still
        // told apart by comparing keys. Real keys are keyed SipHash outputs, spread over both.
        let mut m: ByHash<u32> = ByHash::default();
        for i in 0..1000u32 {
            m.insert(u64::from(i) << 40, i);
        }
        assert_eq!(m.len(), 1000);
        assert!((0..1000u32).all(|i| m.get(&(u64::from(i) << 40)) == Some(&i)));
    }

    #[test]
    fn counts_allowed_and_denied_per_shape() {
        let s = TrafficSummary::default();
        let web_id = "spiffe://td/ns/demo/sa/web";
        let web = Some(web_id);
        for _ in 0..3 {
            s.record(&http(web, "/a"), true);
        }
        s.record(&http(web, "/a"), false);
        s.record(&http(None, "/a"), false);
        s.record(
            &Seen {
                http: None,
                ..http(web, "")
            },
            true,
        );
        let e = entries(&s);
        assert_eq!(e.len(), 3);
        let a = e
            .iter()
            .find(|v| v["path"] == "/a" && v["srcIdentity"] == web_id)
            .expect("web /a kept");
        assert_eq!(
            (a["allowed"].as_u64(), a["denied"].as_u64()),
            (Some(3), Some(1))
        );
        assert!(
            e.iter()
                .any(|v| v["srcIdentity"].is_null() && v["denied"] == 1)
        );
        assert!(
            e.iter()
                .any(|v| v["protocol"] == "tcp" && v.get("path").is_none())
        );
    }

    #[test]
    fn full_summary_counts_new_shapes_without_keeping_them() {
        let s = TrafficSummary::default();
        s.configure(2, Duration::from_secs(60));
        for p in ["/1", "/2", "/3", "/4"] {
            s.record(&http(None, p), true);
        }
        // Shapes already kept still count.
        s.record(&http(None, "/1"), true);
        let v = s.json();
        assert_eq!(v["entries"].as_array().map(Vec::len), Some(2));
        assert_eq!(v["overflowRequests"], 2);
        assert_eq!(s.overflow.get(), 2);
    }

    #[test]
    fn two_generations_then_the_oldest_is_forgotten() {
        let s = TrafficSummary::default();
        s.record(&http(None, "/old"), true);
        {
            let mut g = s.inner.lock().expect("lock");
            s.rotate(&mut g);
        }
        s.record(&http(None, "/new"), true);
        s.record(&http(None, "/old"), true);
        let e = entries(&s);
        let old = e.iter().find(|v| v["path"] == "/old").expect("old kept");
        assert_eq!(old["allowed"], 2, "merged across generations");
        {
            let mut g = s.inner.lock().expect("lock");
            s.rotate(&mut g);
            s.rotate(&mut g);
        }
        assert!(entries(&s).is_empty());
    }

    #[test]
    fn zero_entries_is_off() {
        let s = TrafficSummary::default();
        s.configure(0, DEFAULT_WINDOW);
        s.record(&http(None, "/a"), true);
        assert!(entries(&s).is_empty());
        assert_eq!(s.overflow.get(), 0);
    }
}
