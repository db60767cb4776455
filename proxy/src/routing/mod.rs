//! Gateway API routes (HTTPRoute, GRPCRoute) compiled for matching: what a request to a
//! service is, which rule takes it, where that rule sends it.
//!
//! Compiled once per config (regular expressions included, with the control plane's size
//! bound); a request only walks the service's rules in precedence order, reading its own path,
//! headers and query. Precedence is Gateway API's: an exact path before prefixes, a longer
//! prefix before a shorter one, then a method match, then more header matches, then more query
//! matches, then the route's `namespace/name` order and the rule's order.

mod filters;

pub use filters::{apply_headers, redirect, rewrite};

use std::sync::Arc;
use std::time::Duration;

use http::Request;
use palisade_api::call::RetryPolicy;
use palisade_api::v1;
use regex::Regex;

use crate::telemetry::Label;
use crate::trace::TracePolicy;

/// Why a route in a config cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("route {route}: {message}")]
pub struct RouteError {
    pub route: String,
    pub message: String,
}

#[derive(Debug)]
enum Text {
    Exact(String),
    Regex(Regex),
}

impl Text {
    fn new(value: &str, regex: bool) -> Result<Self, String> {
        if !regex {
            return Ok(Text::Exact(value.to_string()));
        }
        if value.len() > palisade_api::policy::route::MAX_REGEX_LEN {
            return Err("regular expression too long".into());
        }
        // Anchored (Gateway API's RegularExpression matches the whole value), compiled exactly
        // as the control plane checked it.
        palisade_api::policy::route::anchored(value)
            .map(Text::Regex)
            .map_err(|e| e.to_string())
    }

    fn is_match(&self, s: &str) -> bool {
        match self {
            Text::Exact(v) => v == s,
            Text::Regex(r) => r.is_match(s),
        }
    }
}

#[derive(Debug)]
enum PathRule {
    Exact(String),
    /// Without a trailing slash (`/` stays `/`): matches the prefix as whole segments.
    Prefix(String),
    Regex(Regex),
}

impl PathRule {
    fn is_match(&self, path: &str) -> bool {
        match self {
            PathRule::Exact(p) => p == path,
            PathRule::Prefix(p) => {
                p == "/"
                    || path
                        .strip_prefix(p.as_str())
                        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            }
            PathRule::Regex(r) => r.is_match(path),
        }
    }
}

#[derive(Debug)]
struct Match {
    path: Option<PathRule>,
    headers: Vec<(http::HeaderName, Text)>,
    query: Vec<(String, Text)>,
    method: Option<http::Method>,
    grpc_service: Option<Text>,
    grpc_method: Option<Text>,
}

impl Match {
    fn is_match<B>(&self, req: &Request<B>) -> bool {
        if let Some(m) = &self.method
            && req.method() != m
        {
            return false;
        }
        let path = req.uri().path();
        if let Some(p) = &self.path
            && !p.is_match(path)
        {
            return false;
        }
        if self.grpc_service.is_some() || self.grpc_method.is_some() {
            // `/package.Service/Method`
            let Some((service, method)) = path.strip_prefix('/').and_then(|p| p.split_once('/'))
            else {
                return false;
            };
            if self
                .grpc_service
                .as_ref()
                .is_some_and(|s| !s.is_match(service))
                || self
                    .grpc_method
                    .as_ref()
                    .is_some_and(|m| !m.is_match(method))
            {
                return false;
            }
        }
        for (name, value) in &self.headers {
            // A repeated header is one value, joined with `,` (as authorization reads it).
            let mut values = req.headers().get_all(name).iter();
            let Some(first) = values.next() else {
                return false;
            };
            let ok = match values.next() {
                None => first.to_str().is_ok_and(|v| value.is_match(v)),
                Some(second) => {
                    let joined: Vec<&str> = std::iter::once(first)
                        .chain(std::iter::once(second))
                        .chain(values)
                        .filter_map(|v| v.to_str().ok())
                        .collect();
                    value.is_match(&joined.join(","))
                }
            };
            if !ok {
                return false;
            }
        }
        if !self.query.is_empty() {
            let q = req.uri().query().unwrap_or("");
            for (name, value) in &self.query {
                // The first occurrence of the parameter, as Gateway API says.
                let found = q
                    .split('&')
                    .filter_map(|kv| {
                        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                        (k == name).then_some(v)
                    })
                    .next();
                if !found.is_some_and(|v| value.is_match(v)) {
                    return false;
                }
            }
        }
        true
    }

    /// Sorts before a less specific match (smaller is more specific).
    fn precedence(
        &self,
    ) -> (
        u8,
        usize,
        bool,
        std::cmp::Reverse<usize>,
        std::cmp::Reverse<usize>,
    ) {
        let (kind, len) = match &self.path {
            Some(PathRule::Exact(p)) => (0, usize::MAX - p.len()),
            Some(PathRule::Prefix(p)) => (1, usize::MAX - p.len()),
            Some(PathRule::Regex(_)) => (2, 0),
            None => match (&self.grpc_service, &self.grpc_method) {
                (Some(Text::Exact(_)), Some(Text::Exact(_))) => (0, 0),
                (Some(_), Some(_)) => (1, 0),
                (Some(_), None) | (None, Some(_)) => (2, 0),
                (None, None) => (3, usize::MAX - 1),
            },
        };
        (
            kind,
            len,
            self.method.is_none(),
            std::cmp::Reverse(self.headers.len()),
            std::cmp::Reverse(self.query.len()),
        )
    }
}

/// A header modifier, names parsed.
#[derive(Debug, Default)]
pub struct Headers {
    pub set: Vec<(http::HeaderName, http::HeaderValue)>,
    pub add: Vec<(http::HeaderName, http::HeaderValue)>,
    pub remove: Vec<http::HeaderName>,
}

#[derive(Debug, Clone)]
pub enum PathChange {
    Full(String),
    /// Replaces the PathPrefix the request matched (which [`Routes::select`] returns).
    Prefix(String),
}

#[derive(Debug)]
pub struct Redirect {
    pub scheme: Option<http::uri::Scheme>,
    pub hostname: Option<String>,
    pub path: Option<PathChange>,
    pub port: Option<u16>,
    pub status: http::StatusCode,
}

#[derive(Debug)]
pub struct Rewrite {
    pub hostname: Option<http::HeaderValue>,
    pub path: Option<PathChange>,
}

#[derive(Debug)]
pub struct Mirror {
    /// `name.namespace:port`, a key of the outbound table.
    pub service: Arc<str>,
    pub percent: u32,
}

/// An HTTPFault: a share of requests delayed, a share aborted.
#[derive(Debug)]
pub struct Fault {
    pub name: Label,
    pub delay: Duration,
    pub delay_ppm: u32,
    pub abort_status: Option<http::StatusCode>,
    pub abort_grpc: Option<u8>,
    pub abort_ppm: u32,
}

/// One rule of a route: what it does to the requests it takes.
#[derive(Debug)]
pub struct Rule {
    /// `namespace/name/rule`: the `route` label.
    pub label: Label,
    pub request_headers: Option<Headers>,
    pub response_headers: Option<Headers>,
    pub redirect: Option<Redirect>,
    pub rewrite: Option<Rewrite>,
    pub mirrors: Vec<Mirror>,
    /// `(service key, weight)`; empty: the parent service.
    pub backends: Vec<(Arc<str>, u32)>,
    pub total_weight: u64,
    pub request_timeout: Option<Duration>,
    pub backend_timeout: Option<Duration>,
    pub retry: Option<RetryPolicy>,
    pub fault: Option<Fault>,
    /// The trace policy of its requests: its route's, over the parent service's field by
    /// field.
    pub trace: TracePolicy,
}

impl Rule {
    /// The backend for a draw in `0..total_weight`; None when every weight is zero.
    pub fn backend(&self, draw: u64) -> Option<&Arc<str>> {
        let mut left = draw;
        for (svc, w) in &self.backends {
            let w = u64::from(*w);
            if left < w {
                return Some(svc);
            }
            left -= w;
        }
        None
    }
}

#[derive(Debug)]
struct Candidate {
    route: usize,
    rule: Arc<Rule>,
    matcher: Match,
    /// The PathPrefix of this match (`/` for a match without a path), what a
    /// ReplacePrefixMatch replaces.
    prefix: Arc<str>,
}

#[derive(Debug)]
struct RouteHosts {
    hostnames: Vec<String>,
}

impl RouteHosts {
    fn matches(&self, host: &str) -> bool {
        self.hostnames.is_empty()
            || self.hostnames.iter().any(|h| match h.strip_prefix('*') {
                Some(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
                None => h == host,
            })
    }
}

/// The routes of one service, compiled; `source` is what they came from (to compare
/// configs).
#[derive(Debug, Default)]
pub struct Routes {
    source: Vec<v1::Route>,
    hosts: Vec<RouteHosts>,
    /// In precedence order.
    candidates: Vec<Candidate>,
}

impl PartialEq for Routes {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}
impl Eq for Routes {}

/// What a request matched.
pub enum Matched<'a> {
    /// The service has no routes: it goes to the service.
    Unrouted,
    /// The rule, and the PathPrefix that matched (for ReplacePrefixMatch).
    Rule(&'a Arc<Rule>, &'a Arc<str>),
    /// Routes are attached and none matches: 404 (gRPC `UNIMPLEMENTED`), as Gateway API says.
    NoRoute,
}

impl Routes {
    pub fn is_empty(&self) -> bool {
        self.source.is_empty()
    }

    /// The routes as they came, in their order: what the admin `/config` lists by name.
    pub fn source(&self) -> &[v1::Route] {
        &self.source
    }

    /// The rule that takes `req` (sent to `host`, lower case without port).
    pub fn select<B>(&self, host: &str, req: &Request<B>) -> Matched<'_> {
        if self.source.is_empty() {
            return Matched::Unrouted;
        }
        self.candidates
            .iter()
            .find(|c| self.hosts[c.route].matches(host) && c.matcher.is_match(req))
            .map_or(Matched::NoRoute, |c| Matched::Rule(&c.rule, &c.prefix))
    }

    /// Compiles the routes of a service. `key` makes a backend key the way the outbound table
    /// names services.
    pub fn compile(routes: &[v1::Route]) -> Result<Self, RouteError> {
        Self::compile_with(routes, &Defaults::default())
    }

    /// Compiles the routes of a service whose own timeout and retry policy are `defaults`:
    /// a rule without its own uses the parent service's, whichever backend it picks.
    pub fn compile_with(routes: &[v1::Route], defaults: &Defaults) -> Result<Self, RouteError> {
        let mut out = Routes {
            source: routes.to_vec(),
            ..Default::default()
        };
        for (ri, r) in routes.iter().enumerate() {
            let name = format!("{}/{}", r.namespace, r.name);
            let err = |message: String| RouteError {
                route: name.clone(),
                message,
            };
            out.hosts.push(RouteHosts {
                hostnames: r.hostnames.iter().map(|h| h.to_ascii_lowercase()).collect(),
            });
            let trace = palisade_api::trace::TracePolicy::from_proto(r.trace.as_ref())
                .map_err(|e| err(format!("trace.{e}")))?
                .or(defaults.trace);
            for (ni, rule) in r.rules.iter().enumerate() {
                let compiled = Arc::new(
                    compile_rule(&name, rule, defaults, trace)
                        .map_err(|m| err(format!("rules[{ni}]: {m}")))?,
                );
                let mut matches = Vec::new();
                for (mi, m) in rule.matches.iter().enumerate() {
                    matches.push(
                        compile_match(m, r.grpc)
                            .map_err(|e| err(format!("rules[{ni}].matches[{mi}]: {e}")))?,
                    );
                }
                if matches.is_empty() {
                    matches.push(Match {
                        path: (!r.grpc).then(|| PathRule::Prefix("/".into())),
                        headers: Vec::new(),
                        query: Vec::new(),
                        method: None,
                        grpc_service: None,
                        grpc_method: None,
                    });
                }
                for matcher in matches {
                    let prefix: Arc<str> = match &matcher.path {
                        Some(PathRule::Prefix(p)) => Arc::from(p.as_str()),
                        _ => Arc::from("/"),
                    };
                    out.candidates.push(Candidate {
                        route: ri,
                        rule: compiled.clone(),
                        matcher,
                        prefix,
                    });
                }
            }
        }
        // Stable: equal precedence keeps route order, then rule order, then match order.
        out.candidates.sort_by_key(|c| c.matcher.precedence());
        Ok(out)
    }
}

fn compile_match(m: &v1::RouteMatch, grpc: bool) -> Result<Match, String> {
    let path = match &m.path {
        // Gateway API's default path match is the prefix `/`: a header-only match ranks as
        // that prefix, with its headers breaking the tie.
        None if !grpc => Some(PathRule::Prefix("/".into())),
        None => None,
        Some(p) => Some(match v1::path_match::Kind::try_from(p.kind) {
            Ok(v1::path_match::Kind::Exact) => PathRule::Exact(p.value.clone()),
            Ok(v1::path_match::Kind::Prefix) => {
                let t = p.value.trim_end_matches('/');
                PathRule::Prefix(if t.is_empty() { "/".into() } else { t.into() })
            }
            Ok(v1::path_match::Kind::Regex) => match Text::new(&p.value, true)? {
                Text::Regex(r) => PathRule::Regex(r),
                Text::Exact(_) => return Err("regex expected".into()),
            },
            Err(_) => return Err(format!("unknown path match kind {}", p.kind)),
        }),
    };
    let mut headers = Vec::with_capacity(m.headers.len());
    for h in &m.headers {
        let name = http::HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| format!("bad header name {:?}", h.name))?;
        headers.push((name, Text::new(&h.value, h.regex)?));
    }
    let mut query = Vec::with_capacity(m.query_params.len());
    for q in &m.query_params {
        query.push((q.name.clone(), Text::new(&q.value, q.regex)?));
    }
    let method = if m.method.is_empty() {
        None
    } else {
        Some(
            http::Method::from_bytes(m.method.as_bytes())
                .map_err(|_| format!("bad method {:?}", m.method))?,
        )
    };
    let part = |s: &str| {
        (!s.is_empty())
            .then(|| Text::new(s, m.grpc_regex))
            .transpose()
    };
    Ok(Match {
        path,
        headers,
        query,
        method,
        grpc_service: if grpc { part(&m.grpc_service)? } else { None },
        grpc_method: if grpc { part(&m.grpc_method)? } else { None },
    })
}

fn header_pairs(h: &[v1::Header]) -> Result<Vec<(http::HeaderName, http::HeaderValue)>, String> {
    h.iter()
        .map(|h| {
            Ok((
                http::HeaderName::from_bytes(h.name.as_bytes())
                    .map_err(|_| format!("bad header name {:?}", h.name))?,
                http::HeaderValue::from_str(&h.value)
                    .map_err(|_| format!("bad header value for {:?}", h.name))?,
            ))
        })
        .collect()
}

fn headers(m: &v1::HeaderModifier) -> Result<Headers, String> {
    Ok(Headers {
        set: header_pairs(&m.set)?,
        add: header_pairs(&m.add)?,
        remove: m
            .remove
            .iter()
            .map(|n| {
                http::HeaderName::from_bytes(n.as_bytes()).map_err(|_| format!("bad header {n:?}"))
            })
            .collect::<Result<_, _>>()?,
    })
}

pub fn service_key(k: &v1::ServiceKey) -> String {
    format!("{}.{}:{}", k.name, k.namespace, k.port)
}

fn path_change(p: &Option<v1::PathModifier>) -> Option<PathChange> {
    match p.as_ref()?.kind.as_ref()? {
        v1::path_modifier::Kind::ReplaceFullPath(s) => Some(PathChange::Full(s.clone())),
        v1::path_modifier::Kind::ReplacePrefixMatch(s) => Some(PathChange::Prefix(s.clone())),
    }
}

/// What a rule falls back to: its parent service's call and trace policy.
#[derive(Debug, Default, Clone)]
pub struct Defaults {
    pub request_timeout: Option<Duration>,
    pub retry: Option<RetryPolicy>,
    pub trace: palisade_api::trace::TracePolicy,
}

/// The proxy's form of a trace policy received from the control plane.
fn compile_rule(
    route: &str,
    r: &v1::RouteRule,
    defaults: &Defaults,
    trace: palisade_api::trace::TracePolicy,
) -> Result<Rule, String> {
    let ms = |v: u64| (v > 0).then(|| Duration::from_millis(v));
    let mut rule = Rule {
        label: Label::new(&format!("{route}/{}", r.name)),
        request_headers: None,
        response_headers: None,
        redirect: None,
        rewrite: None,
        mirrors: Vec::new(),
        backends: Vec::with_capacity(r.backends.len()),
        total_weight: 0,
        request_timeout: ms(r.request_timeout_ms).or(defaults.request_timeout),
        backend_timeout: ms(r.backend_timeout_ms),
        retry: r
            .retry
            .as_ref()
            .map(RetryPolicy::from_proto)
            .transpose()
            .map_err(|e| format!("retry: {e}"))?
            .or_else(|| defaults.retry.clone()),
        fault: None,
        trace,
    };
    for f in &r.filters {
        match &f.filter {
            None => {}
            Some(v1::route_filter::Filter::RequestHeaderModifier(h)) => {
                rule.request_headers = Some(headers(h)?)
            }
            Some(v1::route_filter::Filter::ResponseHeaderModifier(h)) => {
                rule.response_headers = Some(headers(h)?)
            }
            Some(v1::route_filter::Filter::RequestRedirect(rd)) => {
                rule.redirect = Some(Redirect {
                    scheme: match rd.scheme.as_str() {
                        "" => None,
                        "http" => Some(http::uri::Scheme::HTTP),
                        "https" => Some(http::uri::Scheme::HTTPS),
                        s => return Err(format!("bad redirect scheme {s:?}")),
                    },
                    hostname: (!rd.hostname.is_empty()).then(|| rd.hostname.clone()),
                    path: path_change(&rd.path),
                    port: u16::try_from(rd.port).ok().filter(|p| *p > 0),
                    status: u16::try_from(rd.status_code)
                        .ok()
                        .and_then(|s| http::StatusCode::from_u16(s).ok())
                        .filter(|s| s.is_redirection())
                        .unwrap_or(http::StatusCode::FOUND),
                })
            }
            Some(v1::route_filter::Filter::UrlRewrite(rw)) => {
                rule.rewrite = Some(Rewrite {
                    hostname: if rw.hostname.is_empty() {
                        None
                    } else {
                        Some(
                            http::HeaderValue::from_str(&rw.hostname)
                                .map_err(|_| format!("bad hostname {:?}", rw.hostname))?,
                        )
                    },
                    path: path_change(&rw.path),
                })
            }
            Some(v1::route_filter::Filter::RequestMirror(m)) => {
                let Some(k) = &m.backend else {
                    return Err("mirror without a backend".into());
                };
                rule.mirrors.push(Mirror {
                    service: Arc::from(service_key(k)),
                    percent: m.percent.min(100),
                });
            }
        }
    }
    for b in &r.backends {
        let Some(k) = &b.service else {
            return Err("backend without a service".into());
        };
        rule.total_weight += u64::from(b.weight);
        rule.backends.push((Arc::from(service_key(k)), b.weight));
    }
    if let Some(f) = &r.fault {
        let ppm = |v: u32| v.min(palisade_api::policy::traffic::MILLION);
        rule.fault = Some(Fault {
            name: Label::new(&f.name),
            delay: Duration::from_millis(f.delay_ms),
            delay_ppm: if f.delay_ms > 0 { ppm(f.delay_ppm) } else { 0 },
            abort_status: u16::try_from(f.abort_http_status)
                .ok()
                .and_then(|s| http::StatusCode::from_u16(s).ok()),
            abort_grpc: u8::try_from(f.abort_grpc_status).ok().filter(|c| *c > 0),
            abort_ppm: ppm(f.abort_ppm),
        });
    }
    Ok(rule)
}

/// The request's host, lower case and without a port: from the URI's authority (HTTP/2, or
/// an absolute HTTP/1 target) or the Host header.
pub fn request_host<B>(req: &Request<B>) -> String {
    let raw = req
        .uri()
        .host()
        .map(str::to_string)
        .or_else(|| {
            req.headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(|h| {
                    h.parse::<http::uri::Authority>()
                        .map_or_else(|_| h.to_string(), |a| a.host().to_string())
                })
        })
        .unwrap_or_default();
    raw.to_ascii_lowercase()
}

#[cfg(test)]
mod tests;
