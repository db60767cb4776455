//! Routes and faults in their wire form (`v1::Route`, `v1::Fault`): what the control plane
//! sends and a proxy's static config holds.

use std::collections::BTreeMap;
use std::time::Duration;

use super::route::{Filter, HeaderModifier, PathMatch, PathModifier, Route, RouteMatch, RouteRule};
use super::traffic::{HttpFault, RateLimitPolicy};

/// A RateLimitPolicy in its wire form (its selector stays with the control plane).
pub fn wire_rate_limit(p: &RateLimitPolicy) -> v1::RateLimit {
    v1::RateLimit {
        name: p.qualified_name(),
        total_rps: p.total.unwrap_or(0),
        identity_rps: p.identity.unwrap_or(0),
        overrides: p
            .overrides
            .iter()
            .map(|o| v1::RateLimitOverride {
                requests_per_second: o.requests_per_second,
                principals: o
                    .principals
                    .iter()
                    .map(|p| crate::authorization::principal_match(p))
                    .collect(),
            })
            .collect(),
    }
}
use crate::v1;

pub(crate) fn ms(d: Option<Duration>) -> u64 {
    d.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn key(namespace: &str, name: &str, port: u16) -> v1::ServiceKey {
    v1::ServiceKey {
        name: name.to_string(),
        namespace: namespace.to_string(),
        port: u32::from(port),
    }
}

fn headers(m: &HeaderModifier) -> v1::HeaderModifier {
    let h = |v: &[(String, String)]| {
        v.iter()
            .map(|(name, value)| v1::Header {
                name: name.clone(),
                value: value.clone(),
            })
            .collect()
    };
    v1::HeaderModifier {
        set: h(&m.set),
        add: h(&m.add),
        remove: m.remove.clone(),
    }
}

fn path_modifier(p: &Option<PathModifier>) -> Option<v1::PathModifier> {
    p.as_ref().map(|p| v1::PathModifier {
        kind: Some(match p {
            PathModifier::ReplaceFullPath(s) => v1::path_modifier::Kind::ReplaceFullPath(s.clone()),
            PathModifier::ReplacePrefixMatch(s) => {
                v1::path_modifier::Kind::ReplacePrefixMatch(s.clone())
            }
        }),
    })
}

fn route_match(m: &RouteMatch) -> v1::RouteMatch {
    let values = |v: &[super::route::ValueMatch]| {
        v.iter()
            .map(|m| v1::ValueMatch {
                name: m.name.clone(),
                value: m.value.clone(),
                regex: m.regex,
            })
            .collect()
    };
    v1::RouteMatch {
        path: m.path.as_ref().map(|p| {
            let (kind, value) = match p {
                PathMatch::Exact(v) => (v1::path_match::Kind::Exact, v),
                PathMatch::Prefix(v) => (v1::path_match::Kind::Prefix, v),
                PathMatch::Regex(v) => (v1::path_match::Kind::Regex, v),
            };
            v1::PathMatch {
                kind: kind as i32,
                value: value.clone(),
            }
        }),
        headers: values(&m.headers),
        query_params: values(&m.query_params),
        method: m.method.clone().unwrap_or_default(),
        grpc_service: m
            .grpc
            .as_ref()
            .and_then(|g| g.service.clone())
            .unwrap_or_default(),
        grpc_method: m
            .grpc
            .as_ref()
            .and_then(|g| g.method.clone())
            .unwrap_or_default(),
        grpc_regex: m.grpc.as_ref().is_some_and(|g| g.regex),
    }
}

/// A fault in its wire form.
pub fn wire_fault(f: &HttpFault) -> v1::Fault {
    v1::Fault {
        name: f.qualified_name(),
        delay_ms: ms(f.delay.as_ref().map(|d| d.fixed)),
        delay_ppm: f.delay.as_ref().map_or(0, |d| d.ppm),
        abort_http_status: f.abort.as_ref().map_or(0, |a| u32::from(a.http_status)),
        abort_grpc_status: f
            .abort
            .as_ref()
            .and_then(|a| a.grpc_status)
            .map_or(0, u32::from),
        abort_ppm: f.abort.as_ref().map_or(0, |a| a.ppm),
    }
}

/// A fault that answers every request 500: what a rule naming a missing `HTTPFault` does
/// (Gateway API: a filter that cannot be applied makes its rule answer 500), so a chaos
/// experiment that lost its fault is seen, not silently a no-op.
fn missing_fault(ns: &str, name: &str) -> v1::Fault {
    v1::Fault {
        name: format!("{ns}/{name}"),
        abort_http_status: 500,
        abort_ppm: super::traffic::MILLION,
        ..Default::default()
    }
}

fn rule(
    r: &Route,
    rule: &RouteRule,
    faults: &BTreeMap<(String, String), HttpFault>,
) -> v1::RouteRule {
    let ns = r.metadata.namespace();
    let mut filters = Vec::new();
    let mut fault = None;
    for f in &rule.filters {
        let filter = match f {
            Filter::RequestHeaders(h) => {
                v1::route_filter::Filter::RequestHeaderModifier(headers(h))
            }
            Filter::ResponseHeaders(h) => {
                v1::route_filter::Filter::ResponseHeaderModifier(headers(h))
            }
            Filter::Redirect(rd) => v1::route_filter::Filter::RequestRedirect(v1::Redirect {
                scheme: rd.scheme.clone().unwrap_or_default(),
                hostname: rd.hostname.clone().unwrap_or_default(),
                path: path_modifier(&rd.path),
                port: rd.port.map_or(0, u32::from),
                status_code: u32::from(rd.status),
            }),
            Filter::Rewrite(rw) => v1::route_filter::Filter::UrlRewrite(v1::UrlRewrite {
                hostname: rw.hostname.clone().unwrap_or_default(),
                path: path_modifier(&rw.path),
            }),
            Filter::Mirror(m) => v1::route_filter::Filter::RequestMirror(v1::Mirror {
                backend: Some(key(&m.backend.namespace, &m.backend.name, m.backend.port)),
                percent: m.percent,
            }),
            Filter::Fault(name) => {
                fault = Some(
                    faults
                        .get(&(ns.to_string(), name.clone()))
                        .map_or_else(|| missing_fault(ns, name), wire_fault),
                );
                continue;
            }
        };
        filters.push(v1::RouteFilter {
            filter: Some(filter),
        });
    }
    v1::RouteRule {
        name: rule.name.clone(),
        matches: rule.matches.iter().map(route_match).collect(),
        filters,
        backends: rule
            .backends
            .iter()
            .map(|b| v1::Backend {
                service: Some(key(&b.namespace, &b.name, b.port)),
                weight: b.weight,
            })
            .collect(),
        request_timeout_ms: ms(rule.request_timeout),
        backend_timeout_ms: ms(rule.backend_timeout),
        retry: rule.retry.as_ref().map(|r| r.to_proto()),
        fault,
    }
}

/// A route in its wire form, with each `HTTPFault` it names resolved.
pub fn wire_route(r: &Route, faults: &BTreeMap<(String, String), HttpFault>) -> v1::Route {
    v1::Route {
        namespace: r.metadata.namespace().to_string(),
        name: r.metadata.name.clone(),
        grpc: r.kind == super::RouteKind::Grpc,
        hostnames: r.hostnames.clone(),
        rules: r.rules.iter().map(|x| rule(r, x, faults)).collect(),
        trace: r.trace.to_proto(),
    }
}
