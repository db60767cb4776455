//! Cost attribution: what each (caller, callee, route) costs this proxy, in requests, bytes and
//! CPU time.
//!
//! CPU cannot be metered per request cheaply (a thread-CPU clock read per poll costs more than
//! a small request), so the proxy measures its own process CPU time and apportions it. Every
//! finished request adds work units to its key: [`UNITS_PER_REQUEST`] plus one per byte it
//! moved (request and response bodies). Once a second (and at each scrape) the CPU time the
//! process used since the last tick is shared among the keys in proportion to the units they
//! added in that interval; an interval with no finished request is counted as unattributed,
//! and gives the proxy's idle rate (CPU per second with no request: timers, config, scrapes),
//! which stays unattributed in busy intervals too — otherwise a caller with few requests
//! would pay for its proxy's idle work.
//! The ratio of per-request to per-byte cost comes from the benchmark: about 100 µs of proxy
//! CPU per request and about 2 ns per byte carried (TLS + copies), so a request weighs as much
//! as 50 kB.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;

use super::{Direction, Label};

/// Work units of one request beyond its bytes (see the module docs).
pub const UNITS_PER_REQUEST: u64 = 50_000;

/// Most keys kept; past it, new keys share one `overflow` key (the labels are bounded by the
/// identities and routes of the mesh, but a mesh can be large).
const MAX_KEYS: usize = 10_000;

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Key {
    src: Label,
    dst: Label,
    route: Label,
}

/// What one side of a proxy (inbound or outbound) counted for a key.
#[derive(Debug, Default)]
struct Side {
    requests: AtomicU64,
    request_bytes: AtomicU64,
    response_bytes: AtomicU64,
}

#[derive(Debug, Default)]
struct Cell {
    /// Units added since the last tick.
    units: AtomicU64,
    cpu_ns: AtomicU64,
    inbound: Side,
    outbound: Side,
}

#[derive(Debug)]
pub struct Cost {
    /// Never pruned or replaced: connections keep [`CostCell`]s of these cells and count into
    /// them directly, which only works while the cell is still the one in the map.
    cells: RwLock<HashMap<Key, Arc<Cell>>>,
    /// Where keys past [`MAX_KEYS`] go, made once: a caller past the cap takes no write lock.
    overflow: Arc<Cell>,
    last: Mutex<Option<Tick>>,
    unattributed_ns: AtomicU64,
}

impl Default for Cost {
    fn default() -> Self {
        let overflow = Arc::new(Cell::default());
        let label = Label::new("overflow");
        let mut cells = HashMap::new();
        cells.insert(
            Key {
                src: label.clone(),
                dst: label.clone(),
                route: label,
            },
            overflow.clone(),
        );
        Cost {
            cells: RwLock::new(cells),
            overflow,
            last: Mutex::new(None),
            unattributed_ns: AtomicU64::new(0),
        }
    }
}

/// Where one key's requests are counted: looked up once and kept by a connection for the
/// shapes of request it sees again, so that a request costs no hash of three labels and no
/// lock.
#[derive(Clone, Debug)]
pub struct CostCell(Arc<Cell>);

impl CostCell {
    /// Records one finished request.
    pub fn record(&self, direction: Direction, request_bytes: u64, response_bytes: u64) {
        let cell = &self.0;
        let units = UNITS_PER_REQUEST
            .saturating_add(request_bytes)
            .saturating_add(response_bytes);
        cell.units.fetch_add(units, Ordering::Relaxed);
        let side = match direction {
            Direction::inbound => &cell.inbound,
            Direction::outbound => &cell.outbound,
        };
        side.requests.fetch_add(1, Ordering::Relaxed);
        side.request_bytes
            .fetch_add(request_bytes, Ordering::Relaxed);
        side.response_bytes
            .fetch_add(response_bytes, Ordering::Relaxed);
    }
}

impl Cost {
    /// Records one finished request.
    pub fn record(
        &self,
        direction: Direction,
        src: &Label,
        dst: &Label,
        route: &Label,
        request_bytes: u64,
        response_bytes: u64,
    ) {
        self.cell_for(src, dst, route)
            .record(direction, request_bytes, response_bytes);
    }

    /// The cell requests of this key are counted in (the overflow cell past [`MAX_KEYS`]).
    pub fn cell_for(&self, src: &Label, dst: &Label, route: &Label) -> CostCell {
        CostCell(self.cell(src, dst, route))
    }

    fn cell(&self, src: &Label, dst: &Label, route: &Label) -> Arc<Cell> {
        let key = Key {
            src: src.clone(),
            dst: dst.clone(),
            route: route.clone(),
        };
        {
            let Ok(cells) = self.cells.read() else {
                return self.overflow.clone();
            };
            if let Some(c) = cells.get(&key) {
                return c.clone();
            }
            if cells.len() > MAX_KEYS {
                return self.overflow.clone();
            }
        }
        let Ok(mut cells) = self.cells.write() else {
            return self.overflow.clone();
        };
        cells.entry(key).or_default().clone()
    }

    /// Shares the CPU time used since the last tick among the keys that did work.
    pub fn tick(&self) {
        // The clocks are read under the lock: two ticks (the timer's and a scrape's) never
        // share out one interval twice.
        let Ok(mut last) = self.last.lock() else {
            return;
        };
        if let Some(cpu_ns) = process_cpu_ns() {
            self.tick_locked(&mut last, cpu_ns, Instant::now());
        }
    }

    #[cfg(test)]
    fn tick_with(&self, cpu_ns: u64, wall: Instant) {
        if let Ok(mut last) = self.last.lock() {
            self.tick_locked(&mut last, cpu_ns, wall);
        }
    }

    fn tick_locked(&self, last: &mut Option<Tick>, cpu_ns: u64, wall: Instant) {
        let prev = last.replace(Tick {
            cpu_ns,
            wall,
            idle_ns_per_s: last.as_ref().and_then(|t| t.idle_ns_per_s),
        });
        let Some(prev) = prev else { return };
        let delta = cpu_ns.saturating_sub(prev.cpu_ns);
        let seconds = wall.saturating_duration_since(prev.wall).as_secs_f64();
        let Ok(cells) = self.cells.read() else { return };
        let taken: Vec<(&Arc<Cell>, u64)> = cells
            .values()
            .map(|c| (c, c.units.swap(0, Ordering::Relaxed)))
            .filter(|(_, u)| *u > 0)
            .collect();
        let total: u128 = taken.iter().map(|(_, u)| u128::from(*u)).sum();
        if total == 0 {
            self.unattributed_ns.fetch_add(delta, Ordering::Relaxed);
            // What the proxy burns with no request (timers, config, scrapes), per second of
            // wall time, smoothed; only from intervals long enough to mean something.
            if seconds >= 0.5
                && let Some(t) = last.as_mut()
            {
                let rate = delta as f64 / seconds;
                t.idle_ns_per_s = Some(t.idle_ns_per_s.map_or(rate, |r| 0.7 * r + 0.3 * rate));
            }
            return;
        }
        // The idle work goes on while requests are served: it is nobody's request.
        let idle = last
            .as_ref()
            .and_then(|t| t.idle_ns_per_s)
            .map_or(0, |r| (r * seconds) as u64)
            .min(delta);
        self.unattributed_ns.fetch_add(idle, Ordering::Relaxed);
        let shared = u128::from(delta - idle);
        for (cell, units) in taken {
            let share = shared * u128::from(units) / total;
            cell.cpu_ns
                .fetch_add(u64::try_from(share).unwrap_or(u64::MAX), Ordering::Relaxed);
        }
    }
}

/// The clocks at the last tick.
#[derive(Debug)]
struct Tick {
    cpu_ns: u64,
    wall: Instant,
    /// CPU the proxy uses per second when no request finishes.
    idle_ns_per_s: Option<f64>,
}

/// CPU time (user + system) of this process, from the kernel's per-process clock.
fn process_cpu_ns() -> Option<u64> {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    let secs = u64::try_from(ts.tv_sec).ok()?;
    let nanos = u64::try_from(ts.tv_nsec).ok()?;
    secs.checked_mul(1_000_000_000)?.checked_add(nanos)
}

fn seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct KeyLabels {
    src_identity: Label,
    dst_identity: Label,
    route: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct BytesLabels {
    src_identity: Label,
    dst_identity: Label,
    route: Label,
    /// `request` or `response`.
    flow: &'static str,
    /// The side of this proxy that carried them: both proxies of a request count its bytes.
    direction: Direction,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct RequestsLabels {
    src_identity: Label,
    dst_identity: Label,
    route: Label,
    direction: Direction,
}

impl Collector for Cost {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Ok(cells) = self.cells.read() else {
            return Ok(());
        };
        let labels = |k: &Key| KeyLabels {
            src_identity: k.src.clone(),
            dst_identity: k.dst.clone(),
            route: k.route.clone(),
        };
        {
            let mut family = encoder.encode_descriptor(
                "palisade_cost_cpu_seconds",
                "This proxy's CPU time apportioned to the requests of a caller, callee and route (by requests and bytes, see docs/cost.md)",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (k, c) in cells.iter() {
                let counter = ConstCounter::new(seconds(c.cpu_ns.load(Ordering::Relaxed)));
                counter.encode(family.encode_family(&labels(k))?)?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "palisade_cost_bytes",
                "Request and response body bytes carried for a caller, callee and route",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (k, c) in cells.iter() {
                for (direction, side) in [
                    (Direction::inbound, &c.inbound),
                    (Direction::outbound, &c.outbound),
                ] {
                    if side.requests.load(Ordering::Relaxed) == 0 {
                        continue;
                    }
                    for (flow, v) in [
                        ("request", &side.request_bytes),
                        ("response", &side.response_bytes),
                    ] {
                        let l = BytesLabels {
                            src_identity: k.src.clone(),
                            dst_identity: k.dst.clone(),
                            route: k.route.clone(),
                            flow,
                            direction,
                        };
                        ConstCounter::new(v.load(Ordering::Relaxed))
                            .encode(family.encode_family(&l)?)?;
                    }
                }
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "palisade_cost_requests",
                "Finished requests of a caller, callee and route, by the side of this proxy that saw them",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (k, c) in cells.iter() {
                for (direction, side) in [
                    (Direction::inbound, &c.inbound),
                    (Direction::outbound, &c.outbound),
                ] {
                    let n = side.requests.load(Ordering::Relaxed);
                    if n == 0 {
                        continue;
                    }
                    let l = RequestsLabels {
                        src_identity: k.src.clone(),
                        dst_identity: k.dst.clone(),
                        route: k.route.clone(),
                        direction,
                    };
                    ConstCounter::new(n).encode(family.encode_family(&l)?)?;
                }
            }
        }
        let family = encoder.encode_descriptor(
            "palisade_cost_unattributed_cpu_seconds",
            "This proxy's CPU time in intervals when no request finished (idle work: timers, config, scrapes)",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        ConstCounter::new(seconds(self.unattributed_ns.load(Ordering::Relaxed))).encode(family)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_shared_by_requests_and_bytes_of_the_interval() {
        let cost = Cost::default();
        let (a, b, api, r) = (
            Label::new("a"),
            Label::new("b"),
            Label::new("api"),
            Label::new(""),
        );
        let t0 = Instant::now();
        let at = |ms: u64| t0 + std::time::Duration::from_millis(ms);
        cost.tick_with(1_000, at(0));
        // An idle second is unattributed, and sets the idle rate (1000 ns/s).
        cost.tick_with(2_000, at(1_000));
        assert_eq!(cost.unattributed_ns.load(Ordering::Relaxed), 1_000);
        for _ in 0..9 {
            cost.record(Direction::inbound, &a, &api, &r, 0, 0);
        }
        cost.record(Direction::inbound, &b, &api, &r, 0, 0);
        // A busy second: its idle part (1000 ns) stays unattributed, the rest is shared 9:1.
        cost.tick_with(1_002_000, at(2_000));
        let cpu = |who: &Label| cost.cell(who, &api, &r).cpu_ns.load(Ordering::Relaxed);
        assert_eq!((cpu(&a), cpu(&b)), (899_100, 99_900));
        // A request that moved 50 kB weighs as much as two bodiless ones.
        cost.record(Direction::inbound, &a, &api, &r, 25_000, 25_000);
        cost.record(Direction::inbound, &b, &api, &r, 0, 0);
        cost.tick_with(1_302_000, at(2_500));
        assert_eq!((cpu(&a), cpu(&b)), (899_100 + 199_666, 99_900 + 99_833));
        assert_eq!(cost.unattributed_ns.load(Ordering::Relaxed), 2_500);
    }

    #[test]
    fn the_metrics_name_each_key_and_count_each_side_once() {
        let cost = Arc::new(Cost::default());
        let (a, api, r) = (
            Label::new("spiffe://td/ns/x/sa/a"),
            Label::new("spiffe://td/ns/x/sa/api"),
            Label::new("x/r/0"),
        );
        cost.record(Direction::outbound, &a, &api, &r, 10, 20);
        cost.record(Direction::inbound, &a, &api, &r, 10, 20);
        let mut reg = prometheus_client::registry::Registry::default();
        reg.register_collector(Box::new(cost.clone()));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        let key = r#"src_identity="spiffe://td/ns/x/sa/a",dst_identity="spiffe://td/ns/x/sa/api",route="x/r/0""#;
        assert!(
            text.contains(&format!(
                "palisade_cost_bytes_total{{{key},flow=\"request\",direction=\"inbound\"}} 10"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "palisade_cost_bytes_total{{{key},flow=\"response\",direction=\"outbound\"}} 20"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "palisade_cost_requests_total{{{key},direction=\"inbound\"}} 1"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "palisade_cost_requests_total{{{key},direction=\"outbound\"}} 1"
            )),
            "{text}"
        );
        assert!(text.contains("palisade_cost_cpu_seconds_total{"), "{text}");
        assert!(
            text.contains("palisade_cost_unattributed_cpu_seconds_total "),
            "{text}"
        );
        assert!(process_cpu_ns().is_some_and(|n| n > 0));
    }
}
