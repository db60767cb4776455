//! `palisade.dev/v1alpha1` traffic resources: `HTTPFault` (fault injection, referenced from a
//! route rule's `ExtensionRef` filter) and `RateLimitPolicy` (local rate limits enforced by the
//! inbound proxy, the shape of Linkerd's HTTPLocalRateLimitPolicy with a selector).

use std::time::Duration;

use serde_json::{Map, Value};

pub use super::wire::wire_rate_limit;
use super::{Ctx, ObjectMeta, WorkloadSelector, join, kind_of, list, object};

/// A percentage as parts per million, so a resource stays `Eq` and the proxy compares
/// integers.
pub const MILLION: u32 = 1_000_000;

/// The longest injected delay.
pub const MAX_FAULT_DELAY: Duration = Duration::from_secs(60);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpFault {
    pub metadata: ObjectMeta,
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaultDelay {
    pub fixed: Duration,
    /// Of matching requests, in parts per million.
    pub ppm: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaultAbort {
    /// The HTTP status answered (an HTTP route), 0 when only a gRPC status is set.
    pub http_status: u16,
    /// The gRPC status answered to a gRPC request, when set (1–16).
    pub grpc_status: Option<u8>,
    pub ppm: u32,
}

impl HttpFault {
    pub fn qualified_name(&self) -> String {
        format!("{}/{}", self.metadata.namespace(), self.metadata.name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimitPolicy {
    pub metadata: ObjectMeta,
    pub selector: Option<WorkloadSelector>,
    /// Requests per second for the workload, all callers together.
    pub total: Option<u32>,
    /// Requests per second for each caller identity.
    pub identity: Option<u32>,
    pub overrides: Vec<RateLimitOverride>,
}

/// A per-identity limit for the named callers instead of `identity`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimitOverride {
    pub requests_per_second: u32,
    /// Full SPIFFE IDs (`spiffe://` optional), or `prefix*` / `*suffix` / `*` patterns.
    pub principals: Vec<String>,
}

impl RateLimitPolicy {
    pub fn qualified_name(&self) -> String {
        format!("{}/{}", self.metadata.namespace(), self.metadata.name)
    }

    pub fn selects(&self, ns: &str, labels: &std::collections::BTreeMap<String, String>) -> bool {
        self.metadata.namespace() == ns && self.selector.as_ref().is_none_or(|s| s.matches(labels))
    }
}

fn spec<'v>(c: &mut Ctx<'_>, doc: &'v Value, allowed: &[&str]) -> Option<&'v Map<String, Value>> {
    let map = object(c, doc, "", &["apiVersion", "kind", "metadata", "spec"])?;
    let Some(spec) = map.get("spec") else {
        c.err("spec", "missing field `spec`");
        return None;
    };
    object(c, spec, "spec", allowed)
}

/// A percentage 0–100 (fractions allowed) as parts per million.
fn percentage(c: &mut Ctx<'_>, m: &Map<String, Value>, path: &str) -> u32 {
    let f = join(path, "percentage");
    match m.get("percentage") {
        None | Some(Value::Null) => MILLION,
        Some(v) => match v.as_f64() {
            Some(p) if (0.0..=100.0).contains(&p) => (p * 10_000.0).round() as u32,
            _ => {
                c.err(&f, format!("expected a number 0–100, found {v}"));
                0
            }
        },
    }
}

pub(super) fn parse_fault(c: &mut Ctx<'_>, meta: &ObjectMeta, doc: &Value) -> Option<HttpFault> {
    let before = c.errors.len();
    let spec = spec(c, doc, &["delay", "abort"])?;
    let mut fault = HttpFault {
        metadata: meta.clone(),
        delay: None,
        abort: None,
    };
    if let Some(d) = spec.get("delay")
        && let Some(d) = object(c, d, "spec.delay", &["fixedDelay", "percentage"])
    {
        let ppm = percentage(c, d, "spec.delay");
        match d.get("fixedDelay").and_then(Value::as_str) {
            None => c.err("spec.delay.fixedDelay", "missing (a duration, like 100ms)"),
            Some(s) => match super::route::parse_gateway_duration(s) {
                Ok(fixed) if fixed <= MAX_FAULT_DELAY => {
                    fault.delay = Some(FaultDelay { fixed, ppm });
                }
                Ok(_) => c.err(
                    "spec.delay.fixedDelay",
                    format!("at most {MAX_FAULT_DELAY:?}"),
                ),
                Err(e) => c.err("spec.delay.fixedDelay", e),
            },
        }
    }
    if let Some(a) = spec.get("abort")
        && let Some(a) = object(
            c,
            a,
            "spec.abort",
            &["httpStatus", "grpcStatus", "percentage"],
        )
    {
        let ppm = percentage(c, a, "spec.abort");
        let http_status = match a.get("httpStatus") {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_u64() {
                Some(s @ 200..=599) => Some(s as u16),
                _ => {
                    c.err(
                        "spec.abort.httpStatus",
                        format!("expected an HTTP status 200–599, found {v}"),
                    );
                    None
                }
            },
        };
        let grpc_status = match a.get("grpcStatus") {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_u64() {
                Some(s @ 1..=16) => Some(s as u8),
                _ => {
                    c.err(
                        "spec.abort.grpcStatus",
                        format!("expected a gRPC status code 1–16, found {v}"),
                    );
                    None
                }
            },
        };
        if http_status.is_none() && grpc_status.is_none() && !a.contains_key("httpStatus") {
            c.err("spec.abort", "needs httpStatus, grpcStatus or both");
        }
        fault.abort = Some(FaultAbort {
            http_status: http_status.unwrap_or(0),
            grpc_status,
            ppm,
        });
    }
    if fault.delay.is_none() && fault.abort.is_none() && c.errors.len() == before {
        c.err("spec", "an HTTPFault needs a delay, an abort or both");
    }
    (c.errors.len() == before).then_some(fault)
}

fn rps(c: &mut Ctx<'_>, v: &Value, path: &str) -> Option<u32> {
    let m = object(c, v, path, &["requestsPerSecond"])?;
    let f = join(path, "requestsPerSecond");
    match m.get("requestsPerSecond") {
        None | Some(Value::Null) => {
            c.err(&f, "missing");
            None
        }
        Some(v) => match v.as_u64() {
            Some(n @ 1..=1_000_000) => Some(n as u32),
            _ => {
                c.err(&f, format!("expected a whole number 1–1000000, found {v}"));
                None
            }
        },
    }
}

pub(super) fn parse_rate_limit(
    c: &mut Ctx<'_>,
    meta: &ObjectMeta,
    doc: &Value,
) -> Option<RateLimitPolicy> {
    let before = c.errors.len();
    let spec = spec(c, doc, &["selector", "total", "identity", "overrides"])?;
    let selector = match spec.get("selector") {
        None | Some(Value::Null) => None,
        Some(s) => {
            object(c, s, "spec.selector", &["matchLabels"]);
            match serde_json::from_value::<WorkloadSelector>(s.clone()) {
                Ok(sel) => Some(sel),
                Err(e) => {
                    c.err("spec.selector", e.to_string());
                    None
                }
            }
        }
    };
    let total = spec.get("total").and_then(|v| rps(c, v, "spec.total"));
    let identity = spec
        .get("identity")
        .and_then(|v| rps(c, v, "spec.identity"));
    let mut overrides = Vec::new();
    for (i, o) in list(
        c,
        spec.get("overrides").unwrap_or(&Value::Null),
        "spec.overrides",
    )
    .iter()
    .enumerate()
    {
        let f = format!("spec.overrides[{i}]");
        let Some(m) = object(c, o, &f, &["requestsPerSecond", "principals"]) else {
            continue;
        };
        let limit = rps(
            c,
            &Value::Object(
                m.iter()
                    .filter(|(k, _)| *k == "requestsPerSecond")
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            ),
            &f,
        );
        let mut principals = Vec::new();
        let pf = join(&f, "principals");
        let items = list(c, m.get("principals").unwrap_or(&Value::Null), &pf);
        if items.is_empty() {
            c.err(&pf, "missing: name the callers this limit is for");
        }
        for (k, p) in items.iter().enumerate() {
            match p.as_str() {
                Some(p) => {
                    if let Some(why) = super::principal_problem(p) {
                        c.err(&format!("{pf}[{k}]"), why);
                    }
                    principals.push(p.to_string());
                }
                None => c.err(
                    &format!("{pf}[{k}]"),
                    format!("expected a string, found {}", kind_of(p)),
                ),
            }
        }
        if let Some(limit) = limit {
            overrides.push(RateLimitOverride {
                requests_per_second: limit,
                principals,
            });
        }
    }
    if total.is_none() && identity.is_none() && overrides.is_empty() && c.errors.len() == before {
        c.err(
            "spec",
            "a RateLimitPolicy needs total, identity or overrides",
        );
    }
    (c.errors.len() == before).then(|| RateLimitPolicy {
        metadata: meta.clone(),
        selector,
        total,
        identity,
        overrides,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::policy::{Resource, parse_str};

    fn parse(text: &str) -> Result<Resource, Vec<String>> {
        parse_str(Path::new("t.yaml"), text)
            .map(|mut v| v.remove(0))
            .map_err(|e| e.into_iter().map(|e| e.field).collect())
    }

    #[test]
    fn a_fault_reads_as_parts_per_million() {
        let Ok(Resource::HttpFault(f)) = parse(
            "apiVersion: palisade.dev/v1alpha1\nkind: HTTPFault\nmetadata: { name: f, namespace: demo }\nspec: { delay: { fixedDelay: 1s, percentage: 12.5 }, abort: { grpcStatus: 14 } }\n",
        ) else {
            panic!("an HTTPFault");
        };
        assert_eq!(
            f.delay,
            Some(FaultDelay {
                fixed: Duration::from_secs(1),
                ppm: 125_000
            })
        );
        let abort = f.abort.expect("abort");
        assert_eq!(
            (abort.http_status, abort.grpc_status, abort.ppm),
            (0, Some(14), MILLION)
        );
        let errs = parse(
            "apiVersion: palisade.dev/v1alpha1\nkind: HTTPFault\nmetadata: { name: f }\nspec: { delay: { fixedDelay: 2m, percentage: 101 }, abort: { httpStatus: 99, grpcStatus: 17 }, typo: 1 }\n",
        )
        .unwrap_err();
        for f in [
            "spec.typo",
            "spec.delay.percentage",
            "spec.delay.fixedDelay",
            "spec.abort.httpStatus",
            "spec.abort.grpcStatus",
        ] {
            assert!(errs.iter().any(|e| e == f), "{f} not in {errs:?}");
        }
        assert_eq!(
            parse("apiVersion: palisade.dev/v1alpha1\nkind: HTTPFault\nmetadata: { name: f }\nspec: {}\n")
                .unwrap_err(),
            ["spec"]
        );
    }

    #[test]
    fn a_rate_limit_needs_a_limit_and_callers_that_can_match() {
        let Ok(Resource::RateLimitPolicy(p)) = parse(
            "apiVersion: palisade.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: { name: rl, namespace: demo }\nspec:\n  selector: { matchLabels: { app: api } }\n  total: { requestsPerSecond: 100 }\n  overrides: [ { requestsPerSecond: 50, principals: [\"cluster.local/ns/demo/sa/batch\"] } ]\n",
        ) else {
            panic!("a RateLimitPolicy");
        };
        assert_eq!((p.total, p.identity), (Some(100), None));
        let labels = [("app".to_string(), "api".to_string())].into();
        assert!(p.selects("demo", &labels) && !p.selects("prod", &labels));
        let errs = parse(
            "apiVersion: palisade.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: { name: rl }\nspec:\n  identity: { requestsPerSecond: 0 }\n  overrides: [ { requestsPerSecond: 5, principals: [\"spiffe://Bad/ns\"] }, { requestsPerSecond: 5 } ]\n",
        )
        .unwrap_err();
        for f in [
            "spec.identity.requestsPerSecond",
            "spec.overrides[0].principals[0]",
            "spec.overrides[1].principals",
        ] {
            assert!(errs.iter().any(|e| e == f), "{f} not in {errs:?}");
        }
    }
}
