//! Endpoint selection: power of two choices over peak-EWMA latency (the default, as in
//! Linkerd), or round robin.
//!
//! Picking reads atomics only. Per-endpoint state (latency estimate, requests in flight, the
//! pooled connection) outlives config snapshots: an endpoint that stays in the config keeps its
//! state and its connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Decay time of the latency estimate.
const TAU: Duration = Duration::from_secs(10);
/// Latency assumed for an endpoint that has not answered yet.
const DEFAULT_RTT_NS: f64 = 1_000_000.0;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Strategy {
    #[default]
    PeakEwma,
    RoundRobin,
}

/// Load estimate of one endpoint.
pub struct Load {
    in_flight: AtomicU32,
    ewma_ns: AtomicU64,
    stamp_ns: AtomicU64,
    epoch: Instant,
}

impl Default for Load {
    fn default() -> Self {
        Load {
            in_flight: AtomicU32::new(0),
            ewma_ns: AtomicU64::new(DEFAULT_RTT_NS.to_bits()),
            stamp_ns: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }
}

impl Load {
    fn cost(&self) -> f64 {
        let ewma = f64::from_bits(self.ewma_ns.load(Ordering::Relaxed));
        ewma * f64::from(self.in_flight.load(Ordering::Relaxed) + 1)
    }

    /// Marks a request as started; the guard records its latency when dropped.
    pub fn start(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            load: self,
            start: Instant::now(),
        }
    }

    fn observe(&self, rtt: Duration) {
        let now = self.epoch.elapsed().as_nanos() as u64;
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
}

pub struct InFlight<'a> {
    load: &'a Load,
    start: Instant,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.load.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.load.observe(self.start.elapsed());
    }
}

/// Something the balancer can pick.
pub trait HasLoad {
    fn load(&self) -> &Load;
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
        let n = self.endpoints.len();
        match n {
            0 => None,
            1 => self.endpoints.first(),
            _ => match self.strategy {
                Strategy::RoundRobin => {
                    let i = self.next.fetch_add(1, Ordering::Relaxed) % n;
                    self.endpoints.get(i)
                }
                Strategy::PeakEwma => {
                    let r = fast_random();
                    let a = (r % n as u64) as usize;
                    let mut b = ((r >> 32) % (n as u64 - 1)) as usize;
                    if b >= a {
                        b += 1;
                    }
                    let (ea, eb) = (&self.endpoints[a], &self.endpoints[b]);
                    Some(if ea.load().cost() <= eb.load().cost() {
                        ea
                    } else {
                        eb
                    })
                }
            },
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
        b.endpoints()[0].0.observe(Duration::from_millis(50));
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
        let b = Balancer::new(vec![Arc::new(E(Load::default()))], Strategy::PeakEwma);
        assert!(b.pick().is_some());
    }
}
