//! The proxies' cost counters (docs/cost.md): per (caller identity, callee identity, route),
//! the CPU time a proxy spent, the body bytes it carried and the requests it finished, plus
//! the CPU time it could charge to no request. They are read with the traffic counters of a
//! scrape (or a Prometheus read), so that `palisade cost` and the dashboard take them from
//! the same [`super::Snapshot`]/[`super::Window`] as `stat` and `edges`; `palisade cost` turns
//! them into rows and prices (`src/cmd/cost/model.rs`).

use std::collections::BTreeMap;

use crate::cmd::prom::Sample;

pub const CPU: &str = "palisade_cost_cpu_seconds_total";
pub const BYTES: &str = "palisade_cost_bytes_total";
pub const REQUESTS: &str = "palisade_cost_requests_total";
pub const UNATTRIBUTED: &str = "palisade_cost_unattributed_cpu_seconds_total";

/// The key every cost metric carries: who called whom, through which route rule
/// (`namespace/name/rule`, empty when no route applied).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub src: String,
    pub dst: String,
    pub route: String,
}

impl Key {
    fn of(s: &Sample) -> Key {
        Key {
            src: s.label("src_identity").to_string(),
            dst: s.label("dst_identity").to_string(),
            route: s.label("route").to_string(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    Inbound,
    Outbound,
}

/// One counter series of the cost metrics. Bytes of both flows (request and response) count
/// alike, so they are summed as they are read; bytes and requests keep the side of the proxy
/// that counted them, so that each is counted once.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Series {
    Cpu(Key),
    Bytes(Key, Direction),
    Requests(Key, Direction),
    Unattributed,
}

/// Counter values by series: one proxy's, or several added up.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counters(pub BTreeMap<Series, f64>);

impl Counters {
    /// The cost counters among `samples` (one proxy's `/metrics`); everything else is ignored.
    pub fn from_samples(samples: &[Sample]) -> Counters {
        let mut c = Counters::default();
        for s in samples {
            if !s.value.is_finite() {
                continue;
            }
            let series = match s.name.as_str() {
                CPU => Series::Cpu(Key::of(s)),
                // Proxies before the `direction` label counted bytes on both sides alike.
                BYTES => match s.label("direction") {
                    "inbound" => Series::Bytes(Key::of(s), Direction::Inbound),
                    _ => Series::Bytes(Key::of(s), Direction::Outbound),
                },
                REQUESTS => match s.label("direction") {
                    "inbound" => Series::Requests(Key::of(s), Direction::Inbound),
                    "outbound" => Series::Requests(Key::of(s), Direction::Outbound),
                    _ => continue,
                },
                UNATTRIBUTED => Series::Unattributed,
                _ => continue,
            };
            *c.0.entry(series).or_default() += s.value;
        }
        c
    }

    pub fn add(&mut self, other: &Counters) {
        for (k, v) in &other.0 {
            *self.0.entry(k.clone()).or_default() += v;
        }
    }

    /// How much each counter of one proxy grew from `before` to `after`. A counter that went
    /// down was reset (the proxy restarted in between): its whole `after` value is the
    /// increase, as Prometheus' `increase()` counts it.
    pub fn increase(before: &Counters, after: &Counters) -> Counters {
        Counters(
            after
                .0
                .iter()
                .map(|(k, &v)| {
                    let b = before.0.get(k).copied().unwrap_or(0.0);
                    (k.clone(), if v >= b { v - b } else { v })
                })
                .collect(),
        )
    }

    pub fn unattributed_cpu(&self) -> f64 {
        self.0.get(&Series::Unattributed).copied().unwrap_or(0.0)
    }
}
