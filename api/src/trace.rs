//! The trace policy of a service or route: how many of its ordinary sampled spans the proxies
//! keep per second, and past which latency a request's span is always kept. As users write it
//! (mesh file and static config `services[].tracing: {spanBudget, slowRequest}`, the
//! `trace.palisade.dev/span-budget` and `trace.palisade.dev/slow` annotations of a Kubernetes
//! Service or of an HTTPRoute / GRPCRoute) and as it travels (`v1::TracePolicy` on
//! `v1::Service` and `v1::Route`).
//!
//! Validated once where it is read, checked again where a proxy receives it; a route's policy
//! overrides its service's field by field ([`TracePolicy::or`]).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::v1;

/// The most spans per second a policy may keep.
pub const MAX_SPAN_BUDGET: u32 = 1_000_000;
/// The longest slow-request threshold (that of a request timeout).
pub const MAX_SLOW: Duration = crate::call::MAX_TIMEOUT;

/// Every trace annotation starts with this; another key under it is a typo.
pub const ANNOTATION_PREFIX: &str = "trace.palisade.dev/";
/// Spans kept per second (`"50"`).
pub const SPAN_BUDGET_ANNOTATION: &str = "trace.palisade.dev/span-budget";
/// The slow-request threshold (`500ms`).
pub const SLOW_ANNOTATION: &str = "trace.palisade.dev/slow";

/// A validated trace policy; None in a field: the proxy's default (or, for a route, its
/// service's).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TracePolicy {
    /// Ordinary sampled spans kept per second, 1..=[`MAX_SPAN_BUDGET`].
    pub span_budget: Option<u32>,
    /// A request slower than this is always kept; more than zero, at most [`MAX_SLOW`].
    pub slow: Option<Duration>,
}

/// `tracing:` as written in a mesh file or a static proxy config:
/// `{spanBudget: 50, slowRequest: 500ms}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TraceSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub span_budget: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_request: Option<String>,
}

/// Why a trace policy was refused, with the field (of `tracing:`, an annotation key, or of
/// the wire message) that is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct TraceError {
    pub field: String,
    pub message: String,
}

impl TraceError {
    fn new(field: &str, message: impl Into<String>) -> Self {
        TraceError {
            field: field.to_string(),
            message: message.into(),
        }
    }
}

fn budget_range(n: u64) -> Result<u32, String> {
    u32::try_from(n)
        .ok()
        .filter(|n| (1..=MAX_SPAN_BUDGET).contains(n))
        .ok_or_else(|| format!("must be 1–{MAX_SPAN_BUDGET} spans a second, not {n}"))
}

/// A span budget as an annotation writes it (`"50"`).
pub fn parse_span_budget(s: &str) -> Result<u32, String> {
    let t = s.trim();
    match t.parse::<u64>() {
        Ok(n) => budget_range(n),
        Err(_) => Err(format!(
            "{s:?} is not a whole number of spans a second (1–{MAX_SPAN_BUDGET})"
        )),
    }
}

/// A slow-request threshold as written (`500ms`, `2s`): positive, at most [`MAX_SLOW`].
pub fn parse_slow(s: &str) -> Result<Duration, String> {
    crate::call::parse_timeout(s).map_err(|e| e.to_string())
}

impl TraceSpec {
    /// The policy it says; the error names `spanBudget` or `slowRequest`.
    pub fn validate(&self) -> Result<TracePolicy, TraceError> {
        let span_budget = self
            .span_budget
            .map(|n| budget_range(u64::from(n)))
            .transpose()
            .map_err(|m| TraceError::new("spanBudget", m))?;
        let slow = self
            .slow_request
            .as_deref()
            .map(parse_slow)
            .transpose()
            .map_err(|m| TraceError::new("slowRequest", m))?;
        Ok(TracePolicy { span_budget, slow })
    }

    /// The spec of the `trace.palisade.dev/*` annotations among `annotations`, with the good
    /// ones only, and one error per bad or unknown one (the field is the annotation's key).
    /// A Service keeps the good ones (a bad annotation is left out, as the others are).
    pub fn from_annotations(annotations: &BTreeMap<String, String>) -> (Self, Vec<TraceError>) {
        let read = read_annotations(annotations);
        let spec = TraceSpec {
            span_budget: read.span_budget,
            slow_request: read.slow.map(|(text, _)| text.to_string()),
        };
        (spec, read.errors)
    }

    pub fn is_empty(&self) -> bool {
        self.span_budget.is_none() && self.slow_request.is_none()
    }
}

/// The trace annotations of an object, parsed.
struct Annotations<'a> {
    span_budget: Option<u32>,
    /// As written (trimmed), and parsed.
    slow: Option<(&'a str, Duration)>,
    errors: Vec<TraceError>,
}

fn read_annotations(annotations: &BTreeMap<String, String>) -> Annotations<'_> {
    let mut out = Annotations {
        span_budget: None,
        slow: None,
        errors: Vec::new(),
    };
    // The keys under the prefix are contiguous in a sorted map.
    for (key, value) in annotations.range(ANNOTATION_PREFIX.to_string()..) {
        if !key.starts_with(ANNOTATION_PREFIX) {
            break;
        }
        match key.as_str() {
            SPAN_BUDGET_ANNOTATION => match parse_span_budget(value) {
                Ok(n) => out.span_budget = Some(n),
                Err(m) => out.errors.push(TraceError::new(key, m)),
            },
            SLOW_ANNOTATION => match parse_slow(value) {
                Ok(d) => out.slow = Some((value.trim(), d)),
                Err(m) => out.errors.push(TraceError::new(key, m)),
            },
            _ => out.errors.push(TraceError::new(
                key,
                format!(
                    "unknown trace annotation (the known ones are {SPAN_BUDGET_ANNOTATION} and \
                     {SLOW_ANNOTATION})"
                ),
            )),
        }
    }
    out
}

impl TracePolicy {
    /// The policy of the `trace.palisade.dev/*` annotations among `annotations`, from the
    /// good ones, and one error per bad or unknown one (the field is the annotation's key). A
    /// route is refused for any error.
    pub fn from_annotations(annotations: &BTreeMap<String, String>) -> (Self, Vec<TraceError>) {
        let read = read_annotations(annotations);
        let policy = TracePolicy {
            span_budget: read.span_budget,
            slow: read.slow.map(|(_, d)| d),
        };
        (policy, read.errors)
    }

    /// Neither field set: the proxy's defaults.
    pub fn is_empty(&self) -> bool {
        self.span_budget.is_none() && self.slow.is_none()
    }

    /// This policy, with each field it leaves unset taken from `fallback` (a route's policy
    /// over its service's).
    #[must_use]
    pub fn or(self, fallback: TracePolicy) -> TracePolicy {
        TracePolicy {
            span_budget: self.span_budget.or(fallback.span_budget),
            slow: self.slow.or(fallback.slow),
        }
    }

    /// The wire form; None for an empty policy (nothing is sent).
    pub fn to_proto(&self) -> Option<v1::TracePolicy> {
        (!self.is_empty()).then(|| v1::TracePolicy {
            span_budget_per_second: self.span_budget.unwrap_or(0),
            slow_ms: crate::call::timeout_to_proto(self.slow),
        })
    }

    /// What a proxy received, checked as the control plane checked what it read; the error
    /// names the wire field.
    pub fn from_proto(p: Option<&v1::TracePolicy>) -> Result<Self, TraceError> {
        let Some(p) = p else {
            return Ok(TracePolicy::default());
        };
        let span_budget = match p.span_budget_per_second {
            0 => None,
            n => Some(
                budget_range(u64::from(n))
                    .map_err(|m| TraceError::new("span_budget_per_second", m))?,
            ),
        };
        let slow = crate::call::timeout_from_proto(p.slow_ms)
            .map_err(|e| TraceError::new("slow_ms", e.to_string()))?;
        Ok(TracePolicy { span_budget, slow })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_spec_is_validated_and_survives_the_wire() {
        let spec = TraceSpec {
            span_budget: Some(50),
            slow_request: Some("500ms".into()),
        };
        let p = spec.validate().expect("valid");
        assert_eq!(
            p,
            TracePolicy {
                span_budget: Some(50),
                slow: Some(Duration::from_millis(500)),
            }
        );
        let wire = p.to_proto().expect("sent");
        assert_eq!((wire.span_budget_per_second, wire.slow_ms), (50, 500));
        assert_eq!(TracePolicy::from_proto(Some(&wire)), Ok(p));
        // Each field alone, and none.
        for p in [
            TracePolicy {
                span_budget: Some(1),
                slow: None,
            },
            TracePolicy {
                span_budget: None,
                slow: Some(Duration::from_secs(2)),
            },
            TracePolicy::default(),
        ] {
            assert_eq!(TracePolicy::from_proto(p.to_proto().as_ref()), Ok(p));
        }
        assert_eq!(TracePolicy::default().to_proto(), None);

        let bad = |s: TraceSpec| s.validate().expect_err("refused");
        let e = bad(TraceSpec {
            span_budget: Some(0),
            ..spec.clone()
        });
        assert_eq!(e.field, "spanBudget", "{e}");
        let e = bad(TraceSpec {
            span_budget: Some(MAX_SPAN_BUDGET + 1),
            ..spec.clone()
        });
        assert_eq!(e.field, "spanBudget", "{e}");
        assert!(
            TraceSpec {
                span_budget: Some(MAX_SPAN_BUDGET),
                ..spec.clone()
            }
            .validate()
            .is_ok()
        );
        for slow in ["soon", "0s", "2d", "-1s"] {
            let e = bad(TraceSpec {
                slow_request: Some(slow.into()),
                ..spec.clone()
            });
            assert_eq!(e.field, "slowRequest", "{slow}: {e}");
        }
    }

    #[test]
    fn a_bad_wire_policy_is_refused_naming_the_field() {
        let e = TracePolicy::from_proto(Some(&v1::TracePolicy {
            span_budget_per_second: MAX_SPAN_BUDGET + 1,
            slow_ms: 0,
        }))
        .expect_err("refused");
        assert_eq!(e.field, "span_budget_per_second");
        let e = TracePolicy::from_proto(Some(&v1::TracePolicy {
            span_budget_per_second: 0,
            slow_ms: u64::MAX,
        }))
        .expect_err("refused");
        assert_eq!(e.field, "slow_ms");
        assert_eq!(
            TracePolicy::from_proto(Some(&v1::TracePolicy::default())),
            Ok(TracePolicy::default())
        );
    }

    #[test]
    fn a_route_overrides_its_service_field_by_field() {
        let service = TracePolicy {
            span_budget: Some(10),
            slow: Some(Duration::from_secs(1)),
        };
        let route = TracePolicy {
            span_budget: None,
            slow: Some(Duration::from_millis(200)),
        };
        assert_eq!(
            route.or(service),
            TracePolicy {
                span_budget: Some(10),
                slow: Some(Duration::from_millis(200)),
            }
        );
        assert_eq!(TracePolicy::default().or(service), service);
        assert_eq!(service.or(TracePolicy::default()), service);
    }

    #[test]
    fn annotations_are_read_and_each_bad_one_is_named() {
        let (spec, errors) = TraceSpec::from_annotations(&annotations(&[
            ("trace.palisade.dev/span-budget", " 50 "),
            ("trace.palisade.dev/slow", "500ms"),
            ("timeout.palisade.dev/request", "2s"),
            ("trace.palisade.dev0", "x"),
        ]));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            spec.validate().expect("valid"),
            TracePolicy {
                span_budget: Some(50),
                slow: Some(Duration::from_millis(500)),
            }
        );
        let (spec, errors) = TraceSpec::from_annotations(&annotations(&[
            ("trace.palisade.dev/span-budget", "lots"),
            ("trace.palisade.dev/slow", "250ms"),
            ("trace.palisade.dev/sample", "1"),
        ]));
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "trace.palisade.dev/sample",
                "trace.palisade.dev/span-budget"
            ]
        );
        // The good one stays.
        assert_eq!(
            spec,
            TraceSpec {
                span_budget: None,
                slow_request: Some("250ms".into()),
            }
        );
        for (key, value) in [
            (SPAN_BUDGET_ANNOTATION, "0"),
            (SPAN_BUDGET_ANNOTATION, "1000001"),
            (SPAN_BUDGET_ANNOTATION, "-5"),
            (SLOW_ANNOTATION, "later"),
            (SLOW_ANNOTATION, "0ms"),
        ] {
            let (spec, errors) = TraceSpec::from_annotations(&annotations(&[(key, value)]));
            assert!(spec.is_empty(), "{key}={value}");
            assert_eq!(errors.len(), 1, "{key}={value}");
            assert_eq!(errors[0].field, key, "{key}={value}");
        }
        assert_eq!(
            TraceSpec::from_annotations(&BTreeMap::new()),
            (TraceSpec::default(), Vec::new())
        );
    }
}
