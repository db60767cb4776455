//! Sampling: the head decision at the first proxy of a trace (OpenTelemetry's
//! consistent-probability sampling, so later hops and collectors can agree), and the tail
//! decision when a response has ended (errors and slow requests always kept, ordinary ones
//! within a per-route span budget).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use http::HeaderValue;

use crate::ratelimit::Bucket;
use crate::telemetry::Label;

/// 2^56: trace-id randomness is the low 56 bits (W3C trace context level 2).
const MAX_THRESHOLD: u64 = 1 << 56;

/// `OTEL_TRACES_SAMPLER` with its ratio: keep a trace when its randomness is at least the
/// rejection threshold `(1 - ratio) * 2^56`.
#[derive(Clone, Debug)]
pub struct Sampler {
    /// Follow the caller's sampled flag when a request comes with a trace.
    parent_based: bool,
    threshold: u64,
    /// `ot=th:…` for traces this proxy starts; None at ratio 1 (the default adds nothing).
    tracestate: Option<HeaderValue>,
}

impl Default for Sampler {
    /// `parentbased_always_on`, OpenTelemetry's default.
    fn default() -> Self {
        Sampler::new(true, 1.0)
    }
}

/// An `OTEL_TRACES_SAMPLER` value this proxy does not implement (e.g. `jaeger_remote`).
#[derive(Debug, thiserror::Error)]
#[error(
    "unsupported sampler {0:?}: use always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off or parentbased_traceidratio"
)]
pub struct UnknownSampler(pub String);

impl Sampler {
    /// `ratio` is clamped to 0..=1 (NaN: 1).
    pub fn new(parent_based: bool, ratio: f64) -> Self {
        let ratio = if ratio.is_nan() {
            1.0
        } else {
            ratio.clamp(0.0, 1.0)
        };
        // 2^56 minus the kept share: `ratio * 2^56` is exact in f64 to well under one unit,
        // where `(1 - ratio)` would first lose the low bits (1% must give th:fd70a3d70a3d71).
        let kept = (ratio * MAX_THRESHOLD as f64).round() as u64;
        let threshold = MAX_THRESHOLD.saturating_sub(kept);
        let tracestate = (threshold > 0 && threshold < MAX_THRESHOLD).then(|| {
            let hex = format!("{threshold:014x}");
            let th = hex.trim_end_matches('0');
            HeaderValue::from_str(&format!("ot=th:{th}"))
                .unwrap_or_else(|_| HeaderValue::from_static("ot=th:0"))
        });
        Sampler {
            parent_based,
            threshold,
            tracestate,
        }
    }

    /// From `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG` (a ratio; default 1).
    pub fn from_otel(name: Option<&str>, arg: Option<f64>) -> Result<Self, UnknownSampler> {
        let ratio = arg.unwrap_or(1.0);
        Ok(
            match name.map(str::trim).unwrap_or("parentbased_always_on") {
                "always_on" => Sampler::new(false, 1.0),
                "always_off" => Sampler::new(false, 0.0),
                "traceidratio" => Sampler::new(false, ratio),
                "" | "parentbased_always_on" => Sampler::new(true, 1.0),
                "parentbased_always_off" => Sampler::new(true, 0.0),
                "parentbased_traceidratio" => Sampler::new(true, ratio),
                other => return Err(UnknownSampler(other.to_string())),
            },
        )
    }

    /// The head decision for a trace this proxy starts.
    pub fn samples(&self, trace_id: [u8; 16]) -> bool {
        randomness(trace_id) >= self.threshold
    }

    /// The head decision for a trace a caller started with `parent_sampled`.
    pub fn continues(&self, trace_id: [u8; 16], parent_sampled: bool) -> bool {
        if self.parent_based {
            parent_sampled
        } else {
            self.samples(trace_id)
        }
    }

    pub fn tracestate(&self) -> Option<&HeaderValue> {
        self.tracestate.as_ref()
    }
}

/// The low 56 bits of a trace id, as a number.
fn randomness(trace_id: [u8; 16]) -> u64 {
    let mut r = [0u8; 8];
    r[1..].copy_from_slice(&trace_id[9..]);
    u64::from_be_bytes(r)
}

/// Why a finished span was kept or dropped (the `reason` label of
/// `palisade_trace_spans_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Head-sampled, within its route's budget.
    Sampled,
    /// Failed: 5xx, a gRPC error status, or an authorization deny.
    Error,
    /// Slower than its route's threshold.
    Slow,
    /// Not sampled at the head, and neither failed nor slow.
    NotSampled,
    /// Sampled, but its route had spent its span budget for now.
    Budget,
}

impl Decision {
    pub fn kept(self) -> bool {
        matches!(self, Decision::Sampled | Decision::Error | Decision::Slow)
    }

    pub fn reason(self) -> &'static str {
        match self {
            Decision::Sampled => "sampled",
            Decision::Error => "error",
            Decision::Slow => "slow",
            Decision::NotSampled => "not_sampled",
            Decision::Budget => "budget",
        }
    }
}

/// Most routes with a span budget of their own; past it, routes share one bucket.
const MAX_BUDGETS: usize = 4096;

/// One span budget (spans per second, GCRA) per route.
pub struct Budgets {
    epoch: Instant,
    buckets: RwLock<HashMap<(Label, u32), Arc<Bucket>>>,
}

impl Default for Budgets {
    fn default() -> Self {
        Budgets {
            epoch: Instant::now(),
            buckets: RwLock::new(HashMap::new()),
        }
    }
}

impl Budgets {
    /// Takes one span from `route`'s budget of `per_second`; false when it is spent.
    pub fn take(&self, route: &Label, per_second: u32) -> bool {
        let now = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let key = (route.clone(), per_second);
        let found = self.buckets.read().ok().and_then(|b| b.get(&key).cloned());
        let bucket = match found {
            Some(b) => b,
            None => {
                let Ok(mut all) = self.buckets.write() else {
                    return false;
                };
                let key = if all.len() >= MAX_BUDGETS {
                    (Label::new("overflow"), per_second)
                } else {
                    key
                };
                all.entry(key)
                    .or_insert_with(|| Arc::new(Bucket::new(per_second)))
                    .clone()
            }
        };
        bucket.take(now).is_ok()
    }
}

/// The tail decision for a finished request; `admitted`: it fit its route's span budget when
/// its response began ([`Budgets::take`]).
pub fn decide(
    head_sampled: bool,
    admitted: bool,
    failed: bool,
    elapsed: Duration,
    slow: Duration,
) -> Decision {
    if failed {
        Decision::Error
    } else if elapsed >= slow {
        Decision::Slow
    } else if !head_sampled {
        Decision::NotSampled
    } else if !admitted {
        Decision::Budget
    } else {
        Decision::Sampled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id_with_randomness(r: u64) -> [u8; 16] {
        let mut id = [0xabu8; 16];
        id[9..].copy_from_slice(&r.to_be_bytes()[1..]);
        id
    }

    #[test]
    fn the_threshold_follows_the_opentelemetry_encoding() {
        assert!(Sampler::new(true, 1.0).tracestate().is_none());
        let s = Sampler::new(true, 0.5);
        assert_eq!(s.tracestate().unwrap(), "ot=th:8");
        let s = Sampler::new(true, 0.25);
        assert_eq!(s.tracestate().unwrap(), "ot=th:c");
        let s = Sampler::new(true, 0.01);
        assert_eq!(s.tracestate().unwrap(), "ot=th:fd70a3d70a3d71");
        // Randomness at or above the threshold is kept.
        let half = Sampler::new(false, 0.5);
        assert!(half.samples(id_with_randomness(1 << 55)));
        assert!(!half.samples(id_with_randomness((1 << 55) - 1)));
        assert!(!Sampler::new(false, 0.0).samples(id_with_randomness(MAX_THRESHOLD - 1)));
        assert!(Sampler::new(false, 1.0).samples(id_with_randomness(0)));
    }

    #[test]
    fn parent_based_follows_the_caller_and_ratio_samplers_do_not() {
        let id = id_with_randomness(0);
        let pb = Sampler::from_otel(Some("parentbased_traceidratio"), Some(0.01)).unwrap();
        assert!(pb.continues(id, true));
        assert!(!pb.continues(id, false));
        let ratio = Sampler::from_otel(Some("traceidratio"), Some(0.01)).unwrap();
        assert!(!ratio.continues(id, true));
        assert!(Sampler::from_otel(Some("jaeger_remote"), None).is_err());
        assert!(Sampler::from_otel(None, None).unwrap().continues(id, true));
    }

    #[test]
    fn a_ratio_keeps_about_that_share_of_random_traces() {
        let s = Sampler::new(false, 0.1);
        let kept = (0..20_000).filter(|_| s.samples(rand::random())).count();
        assert!((1_600..2_400).contains(&kept), "{kept} of 20000 at 10%");
    }

    #[test]
    fn errors_and_slow_requests_are_kept_whatever_the_head_or_budget_said() {
        let slow = Duration::from_millis(500);
        let fast = Duration::from_millis(1);
        assert_eq!(decide(false, false, true, fast, slow), Decision::Error);
        assert_eq!(decide(true, false, true, fast, slow), Decision::Error);
        assert_eq!(decide(false, false, false, slow, slow), Decision::Slow);
        assert_eq!(
            decide(false, false, false, fast, slow),
            Decision::NotSampled
        );
        assert_eq!(decide(true, false, false, fast, slow), Decision::Budget);
        assert_eq!(decide(true, true, false, fast, slow), Decision::Sampled);
    }

    #[test]
    fn a_budget_admits_its_rate_per_route() {
        let b = Budgets::default();
        let r = Label::new("demo/api/0");
        // A budget of 2 per second lets two through at once, then refuses.
        let kept = (0..10).filter(|_| b.take(&r, 2)).count();
        assert_eq!(kept, 2);
        // Another route has its own budget.
        assert!(b.take(&Label::new("demo/api/1"), 2));
    }
}
