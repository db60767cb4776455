//! Endpoint selection: power of two choices over peak-EWMA latency (the default, as in
//! Linkerd), or round robin, over the endpoints that are not ejected for failing.
//!
//! Picking reads atomics only. Per-endpoint state (latency estimate, requests in flight,
//! failure accrual, the pooled connection) outlives config snapshots: an endpoint that stays
//! in the config keeps its state and its connection.
//!
//! Failure awareness: the latency estimate is fed only by real responses, timed from the
//! moment the request is sent, so a refused connection never looks like a fast endpoint; a
//! failure records a penalty instead. Consecutive failures eject an endpoint for a backoff
//! that doubles with each ejection in a row; when it ends the endpoint is half-open: the
//! next success readmits it fully, the next failure ejects it again at once. A hard failure
//! (the peer refused the connection, or answered that its app is unreachable) ejects at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Decay time of the latency estimate.
const TAU: Duration = Duration::from_secs(10);
/// Latency assumed for an endpoint that has not answered yet.
const DEFAULT_RTT_NS: f64 = 1_000_000.0;
/// The latency a failure counts as: far above a healthy response, so P2C moves traffic away,
/// and forgotten within a minute or so if the endpoint recovers.
const FAILURE_PENALTY: Duration = Duration::from_millis(100);
/// Consecutive soft failures (5xx, resets, timeouts) that eject an endpoint (Linkerd's
/// default for HTTP failure accrual).
pub const EJECT_AFTER: u32 = 7;
/// The first ejection lasts this long; each further one in a row doubles it, up to
/// [`EJECT_MAX`].
pub const EJECT_BASE: Duration = Duration::from_secs(1);
pub const EJECT_MAX: Duration = Duration::from_secs(60);
/// The longest an endpoint's `Retry-After` keeps it out of rotation.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Strategy {
    #[default]
    PeakEwma,
    RoundRobin,
}

/// How a request to an endpoint went, as far as the endpoint is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The endpoint cannot serve at all (connection refused, its app unreachable): eject now.
    Hard,
    /// A failed request (5xx, reset, timeout): ejected after [`EJECT_AFTER`] in a row.
    Soft,
}

/// Load estimate and failure accrual of one endpoint.
pub struct Load {
    in_flight: AtomicU32,
    ewma_ns: AtomicU64,
    stamp_ns: AtomicU64,
    /// Consecutive failures since the last success.
    failures: AtomicU32,
    /// Ejections in a row since the last success: the backoff exponent.
    ejections: AtomicU32,
    /// Until when (ns since `epoch`) the endpoint is out of rotation; 0 when it is not.
    ejected_until_ns: AtomicU64,
    epoch: Instant,
}

impl Default for Load {
    fn default() -> Self {
        Load {
            in_flight: AtomicU32::new(0),
            ewma_ns: AtomicU64::new(DEFAULT_RTT_NS.to_bits()),
            stamp_ns: AtomicU64::new(0),
            failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejected_until_ns: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }
}

impl Load {
    fn ns(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// The estimate decays toward zero while nothing is observed (as tower's PeakEwma), so an
    /// endpoint penalized once is tried again once its penalty has faded.
    ///
    /// Half-open (readmitted after an ejection, no success since) it wins its pair for one
    /// request at a time: the probe. Its failure penalty would otherwise keep it out of P2C
    /// for ~45 s after it recovered (100 ms decaying to a healthy peer's sub-millisecond cost
    /// with τ = 10 s), so a restarted endpoint would sit idle. The probe (which is ready to
    /// go elsewhere, the endpoint being suspect) either readmits it or ejects it again, for
    /// twice as long.
    fn cost(&self, now: Instant) -> f64 {
        if self.ejections.load(Ordering::Relaxed) > 0 {
            return if self.in_flight.load(Ordering::Relaxed) == 0 {
                0.0
            } else {
                f64::MAX
            };
        }
        let ewma = f64::from_bits(self.ewma_ns.load(Ordering::Relaxed));
        let stamp = self.stamp_ns.load(Ordering::Relaxed);
        let idle = self.ns(now).saturating_sub(stamp) as f64;
        let decayed = ewma * (-idle / TAU.as_nanos() as f64).exp();
        decayed * f64::from(self.in_flight.load(Ordering::Relaxed) + 1)
    }

    fn available(&self, now: Instant) -> bool {
        self.ejected_until_ns.load(Ordering::Relaxed) <= self.ns(now)
    }

    /// Failed recently, or readmitted after an ejection without a success since: a request
    /// sent to it should be ready to go elsewhere.
    pub fn is_suspect(&self) -> bool {
        self.failures.load(Ordering::Relaxed) > 0 || self.ejections.load(Ordering::Relaxed) > 0
    }

    /// How long nothing has been asked of the endpoint: zero while a request is in flight,
    /// else the time since its last response.
    pub fn idle_for(&self, now: Instant) -> Duration {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        let stamp = self.stamp_ns.load(Ordering::Relaxed);
        Duration::from_nanos(self.ns(now).saturating_sub(stamp))
    }

    pub fn is_ejected(&self) -> bool {
        !self.available(Instant::now())
    }

    /// Marks a request as started. The guard reports its outcome; dropped without one (the
    /// caller went away) it only ends the request.
    pub fn start(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            load: self,
            sent: Instant::now(),
        }
    }

    fn observe(&self, rtt: Duration, now: Instant) {
        let now = self.ns(now);
        let prev_stamp = self.stamp_ns.swap(now, Ordering::Relaxed);
        let sample = rtt.as_nanos() as f64;
        let prev = f64::from_bits(self.ewma_ns.load(Ordering::Relaxed));
        let next = if sample > prev {
            // Peak: react to a slow endpoint at once, forget it slowly.
            sample
        } else {
            let elapsed = now.saturating_sub(prev_stamp) as f64;
            let w = (-elapsed / TAU.as_nanos() as f64).exp();
            prev * w + sample * (1.0 - w)
        };
        self.ewma_ns.store(next.to_bits(), Ordering::Relaxed);
    }

    fn succeeded(&self, rtt: Duration, now: Instant) {
        self.observe(rtt, now);
        self.readmit();
    }

    fn readmit(&self) {
        if self.is_suspect() {
            self.failures.store(0, Ordering::Relaxed);
            self.ejections.store(0, Ordering::Relaxed);
            self.ejected_until_ns.store(0, Ordering::Relaxed);
        }
    }

    /// The endpoint said it is overloaded (HTTP 429, gRPC `RESOURCE_EXHAUSTED`): traffic moves
    /// away, for `retry_after` (capped at [`MAX_RETRY_AFTER`]) when it said how long, else by
    /// the latency penalty. Not a failure: it counts toward no ejection, the endpoint works.
    fn throttled(&self, retry_after: Option<Duration>, now: Instant) {
        self.observe(FAILURE_PENALTY, now);
        if let Some(d) = retry_after {
            let until = self.ns(now).saturating_add(
                u64::try_from(d.min(MAX_RETRY_AFTER).as_nanos()).unwrap_or(u64::MAX),
            );
            self.ejected_until_ns.fetch_max(until, Ordering::Relaxed);
        }
    }

    /// Records a failure; returns how long the endpoint is ejected for, if this ejected it.
    fn failed(&self, kind: Failure, now: Instant) -> Option<Duration> {
        self.observe(FAILURE_PENALTY, now);
        let failures = self
            .failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        let half_open = self.ejections.load(Ordering::Relaxed) > 0;
        if kind == Failure::Soft && failures < EJECT_AFTER && !half_open {
            return None;
        }
        if !self.available(now) {
            // Already out (a request that was in flight when it was ejected).
            return None;
        }
        let n = self.ejections.fetch_add(1, Ordering::Relaxed).min(16);
        let backoff = EJECT_BASE.saturating_mul(1 << n).min(EJECT_MAX);
        // ±10% so endpoints ejected together are not probed in lockstep.
        let jitter = 0.9 + (fast_random() % 1000) as f64 / 5000.0;
        let backoff = backoff.mul_f64(jitter);
        let until = self
            .ns(now)
            .saturating_add(u64::try_from(backoff.as_nanos()).unwrap_or(u64::MAX));
        self.ejected_until_ns.store(until, Ordering::Relaxed);
        self.failures.store(0, Ordering::Relaxed);
        Some(backoff)
    }
}

/// One request in flight to an endpoint.
pub struct InFlight<'a> {
    load: &'a Load,
    sent: Instant,
}

impl InFlight<'_> {
    /// The request is leaving now (its connection is ready): latency is timed from here, so
    /// dialling is not counted as the endpoint's response time.
    pub fn sent(&mut self) {
        self.sent = Instant::now();
    }

    /// A response came back that was not a failure.
    pub fn success(self) {
        self.load.succeeded(self.sent.elapsed(), Instant::now());
    }

    /// An opaque connection was made: the endpoint works, but a handshake is no latency
    /// sample for requests.
    pub fn connected(self) {
        self.load.readmit();
    }

    /// The endpoint answered that it is overloaded (429 / `RESOURCE_EXHAUSTED`).
    pub fn throttled(self, retry_after: Option<Duration>) {
        self.load.throttled(retry_after, Instant::now());
    }

    /// The request failed because of the endpoint; returns the ejection time if it was
    /// ejected now (for the caller to log and count once).
    pub fn failure(self, kind: Failure) -> Option<Duration> {
        self.load.failed(kind, Instant::now())
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.load.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Something the balancer can pick.
pub trait HasLoad {
    fn load(&self) -> &Load;
    /// Its share of traffic relative to the others' (`EndpointConfig.weight`): P2C compares
    /// cost per unit of weight, so an endpoint of weight 3 is picked over one of weight 1
    /// until it carries three times the load.
    fn weight(&self) -> u32 {
        1
    }
}

/// A set of endpoints and how to choose among them.
pub struct Balancer<E> {
    endpoints: Box<[Arc<E>]>,
    strategy: Strategy,
    next: AtomicUsize,
}

impl std::str::FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "peak-ewma" | "p2c" => Ok(Strategy::PeakEwma),
            "round-robin" => Ok(Strategy::RoundRobin),
            other => Err(format!(
                "unknown balancer {other:?} (expected peak-ewma or round-robin)"
            )),
        }
    }
}

impl<E: HasLoad> Balancer<E> {
    pub fn new(endpoints: Vec<Arc<E>>, strategy: Strategy) -> Self {
        Balancer {
            endpoints: endpoints.into_boxed_slice(),
            strategy,
            next: AtomicUsize::new(0),
        }
    }

    pub fn endpoints(&self) -> &[Arc<E>] {
        &self.endpoints
    }

    pub fn pick(&self) -> Option<&Arc<E>> {
        self.pick_at(Instant::now(), None)
    }

    /// A pick that avoids `not` (a retry goes to another endpoint when there is one).
    pub fn pick_other(&self, not: &Arc<E>) -> Option<&Arc<E>> {
        self.pick_at(Instant::now(), Some(not))
    }

    fn pick_at(&self, now: Instant, not: Option<&Arc<E>>) -> Option<&Arc<E>> {
        let n = self.endpoints.len();
        let usable = |e: &Arc<E>| e.load().available(now) && not.is_none_or(|x| !Arc::ptr_eq(x, e));
        // The first usable endpoint at or after `from`, scanning around once.
        let scan = |from: usize, skip: Option<usize>| {
            (0..n)
                .map(|k| (from + k) % n)
                .find(|&i| Some(i) != skip && usable(&self.endpoints[i]))
        };
        let chosen = match self.strategy {
            Strategy::RoundRobin => {
                scan(self.next.fetch_add(1, Ordering::Relaxed) % n.max(1), None)
            }
            Strategy::PeakEwma if n > 0 => {
                let r = fast_random();
                let a = scan((r % n as u64) as usize, None);
                let b = a.and_then(|a| scan(((r >> 32) % n as u64) as usize, Some(a)));
                match (a, b) {
                    (Some(a), Some(b)) => {
                        let (ea, eb) = (&self.endpoints[a], &self.endpoints[b]);
                        // cost_a / weight_a <= cost_b / weight_b, without dividing.
                        let ca = ea.load().cost(now) * f64::from(eb.weight().max(1));
                        let cb = eb.load().cost(now) * f64::from(ea.weight().max(1));
                        Some(if ca <= cb { a } else { b })
                    }
                    (a, _) => a,
                }
            }
            Strategy::PeakEwma => None,
        };
        match chosen {
            Some(i) => self.endpoints.get(i),
            // Every endpoint is ejected (or excluded): rather than fail every request, use
            // the one whose ejection ends first; a retry still avoids `not`.
            None => self
                .endpoints
                .iter()
                .filter(|e| not.is_none_or(|x| !Arc::ptr_eq(x, e)))
                .min_by_key(|e| e.load().ejected_until_ns.load(Ordering::Relaxed)),
        }
    }
}

/// A per-thread xorshift64* generator: picking needs speed, not cryptographic randomness
/// (the thread RNG costs more than the rest of a pick).
fn fast_random() -> u64 {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new(rand::random::<u64>() | 1);
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct E(Load);
    impl HasLoad for E {
        fn load(&self) -> &Load {
            &self.0
        }
    }

    struct W(Load, u32);
    impl HasLoad for W {
        fn load(&self) -> &Load {
            &self.0
        }
        fn weight(&self) -> u32 {
            self.1
        }
    }

    #[test]
    fn p2c_sends_more_to_a_heavier_endpoint() {
        let b = Balancer::new(
            vec![
                Arc::new(W(Load::default(), 3)),
                Arc::new(W(Load::default(), 1)),
            ],
            Strategy::PeakEwma,
        );
        // Both as fast; the heavy one carries up to three times the requests in flight
        // before the light one is preferred.
        let mut counts = [0usize; 2];
        for _ in 0..400 {
            let e = b.pick().unwrap();
            let i = usize::from(!Arc::ptr_eq(e, &b.endpoints()[0]));
            counts[i] += 1;
            e.0.in_flight.fetch_add(1, Ordering::Relaxed);
        }
        println!("weight 3 vs 1: {counts:?}");
        assert!(counts[0] > 2 * counts[1], "{counts:?}");
    }

    #[test]
    fn a_throttled_endpoint_gets_nothing_for_its_retry_after_and_is_not_ejected() {
        let b = three(Strategy::PeakEwma);
        let now = Instant::now();
        b.endpoints()[2]
            .0
            .throttled(Some(Duration::from_secs(2)), now);
        for _ in 0..100 {
            assert_ne!(index(&b, b.pick_at(now, None).unwrap()), 2);
        }
        let e2 = &b.endpoints()[2].0;
        assert!(!e2.is_suspect(), "busy, not failing");
        assert!(e2.available(now + Duration::from_millis(2001)));
        // A Retry-After of an hour is capped.
        e2.throttled(Some(Duration::from_secs(3600)), now);
        assert!(e2.available(now + MAX_RETRY_AFTER + Duration::from_millis(1)));
        // Without Retry-After only the penalty: still available, but P2C avoids it.
        let b = three(Strategy::PeakEwma);
        for e in b.endpoints() {
            e.0.observe(Duration::from_millis(2), now);
        }
        b.endpoints()[0].0.throttled(None, now);
        assert!(b.endpoints()[0].0.available(now));
        for _ in 0..100 {
            assert_ne!(index(&b, b.pick_at(now, None).unwrap()), 0);
        }
    }

    #[test]
    fn round_robin_visits_all() {
        let b = Balancer::new(
            (0..3).map(|_| Arc::new(E(Load::default()))).collect(),
            Strategy::RoundRobin,
        );
        let mut seen = [0usize; 3];
        for _ in 0..30 {
            let e = b.pick().unwrap();
            let i = b
                .endpoints()
                .iter()
                .position(|x| Arc::ptr_eq(x, e))
                .unwrap();
            seen[i] += 1;
        }
        assert_eq!(seen, [10, 10, 10]);
    }

    #[test]
    fn p2c_avoids_the_slow_and_busy_endpoint() {
        let b = Balancer::new(
            (0..2).map(|_| Arc::new(E(Load::default()))).collect(),
            Strategy::PeakEwma,
        );
        // Endpoint 0 is slow: one observed 50 ms request.
        b.endpoints()[0]
            .0
            .observe(Duration::from_millis(50), Instant::now());
        let _busy = b.endpoints()[0].0.start();
        for _ in 0..100 {
            let e = b.pick().unwrap();
            assert!(Arc::ptr_eq(e, &b.endpoints()[1]));
        }
    }

    #[test]
    fn empty_and_single() {
        let b: Balancer<E> = Balancer::new(vec![], Strategy::PeakEwma);
        assert!(b.pick().is_none());
        let b: Balancer<E> = Balancer::new(vec![], Strategy::RoundRobin);
        assert!(b.pick().is_none());
        let b = Balancer::new(vec![Arc::new(E(Load::default()))], Strategy::PeakEwma);
        assert!(b.pick().is_some());
    }

    fn three(strategy: Strategy) -> Balancer<E> {
        Balancer::new(
            (0..3).map(|_| Arc::new(E(Load::default()))).collect(),
            strategy,
        )
    }

    fn index(b: &Balancer<E>, e: &Arc<E>) -> usize {
        b.endpoints()
            .iter()
            .position(|x| Arc::ptr_eq(x, e))
            .unwrap()
    }

    #[test]
    fn a_fast_failure_does_not_look_like_a_fast_endpoint() {
        // The old estimate was fed by the guard's drop, failures included: an endpoint that
        // refuses at once looked faster than a healthy one at 2 ms.
        let b = three(Strategy::PeakEwma);
        let now = Instant::now();
        for e in b.endpoints() {
            e.0.observe(Duration::from_millis(2), now);
        }
        // Two soft failures: not ejected, but penalized.
        assert!(b.endpoints()[0].0.failed(Failure::Soft, now).is_none());
        assert!(b.endpoints()[0].0.failed(Failure::Soft, now).is_none());
        let mut counts = [0usize; 3];
        for _ in 0..300 {
            counts[index(&b, b.pick_at(now, None).unwrap())] += 1;
        }
        // P2C picks 0 only when it draws it twice, which it cannot (distinct pair).
        assert_eq!(counts[0], 0, "{counts:?}");
    }

    #[test]
    fn consecutive_failures_eject_with_backoff_and_a_probe_readmits() {
        let b = three(Strategy::RoundRobin);
        let e0 = &b.endpoints()[0].0;
        let t0 = Instant::now();
        for i in 1..EJECT_AFTER {
            assert!(e0.failed(Failure::Soft, t0).is_none(), "failure {i}");
        }
        let first = e0.failed(Failure::Soft, t0).expect("ejected");
        assert!(first >= EJECT_BASE.mul_f64(0.9) && first <= EJECT_BASE.mul_f64(1.1));
        for _ in 0..30 {
            assert_ne!(index(&b, b.pick_at(t0, None).unwrap()), 0);
        }
        // After the backoff it is half-open: one failure ejects it again, twice as long.
        let t1 = t0 + first + Duration::from_millis(1);
        assert!(e0.available(t1) && e0.is_suspect());
        let second = e0
            .failed(Failure::Soft, t1)
            .expect("probe failed: ejected again");
        assert!(second >= EJECT_BASE.mul_f64(1.8), "{second:?}");
        assert!(!e0.available(t1 + first));
        // The next probe succeeds: fully back.
        let t2 = t1 + second + Duration::from_millis(1);
        e0.succeeded(Duration::from_millis(1), t2);
        assert!(!e0.is_suspect() && e0.available(t2));
        assert!(
            e0.failed(Failure::Soft, t2).is_none(),
            "counting starts over"
        );
    }

    #[test]
    fn an_endpoint_back_from_an_ejection_is_probed_at_once_not_after_its_penalty_fades() {
        let b = three(Strategy::PeakEwma);
        let t0 = Instant::now();
        let (e0, e1, e2) = (
            &b.endpoints()[0].0,
            &b.endpoints()[1].0,
            &b.endpoints()[2].0,
        );
        // The others are healthy and fast.
        for e in [e1, e2] {
            e.succeeded(Duration::from_micros(500), t0);
        }
        // e0 refuses connections (its proxy restarting): ejected at once.
        let out = e0.failed(Failure::Hard, t0).expect("ejected");
        // Back after the ejection: within a few picks it gets a probe.
        let t1 = t0 + out + Duration::from_millis(1);
        let picked = (0..30).any(|_| index(&b, b.pick_at(t1, None).unwrap()) == 0);
        assert!(picked, "a readmitted endpoint must be probed");
        // The probe succeeds: it is fully back, and its real latency counts from now on.
        e0.succeeded(Duration::from_micros(500), t1);
        assert!(!e0.is_suspect());
    }

    #[test]
    fn hard_failures_eject_at_once_and_retries_go_elsewhere() {
        let b = three(Strategy::PeakEwma);
        let now = Instant::now();
        assert!(b.endpoints()[1].0.failed(Failure::Hard, now).is_some());
        for _ in 0..100 {
            let e = b.pick_at(now, None).unwrap();
            assert_ne!(index(&b, e), 1);
            let other = b.pick_at(now, Some(e)).unwrap();
            assert!(!Arc::ptr_eq(e, other));
            assert_ne!(index(&b, other), 1);
        }
    }

    #[test]
    fn all_ejected_uses_the_one_due_first() {
        let b = three(Strategy::PeakEwma);
        let now = Instant::now();
        let base = b.endpoints()[0].0.ns(now);
        for (i, until) in [
            (0, 3_000_000_000u64),
            (1, 1_000_000_000),
            (2, 2_000_000_000),
        ] {
            b.endpoints()[i]
                .0
                .ejected_until_ns
                .store(base + until, Ordering::Relaxed);
        }
        for _ in 0..20 {
            assert_eq!(index(&b, b.pick_at(now, None).unwrap()), 1);
        }
        let one = b.endpoints()[1].clone();
        assert_eq!(index(&b, b.pick_at(now, Some(&one)).unwrap()), 2);
    }
}
