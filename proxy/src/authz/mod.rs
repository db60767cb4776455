//! Authorization with Istio's semantics, compiled per workload.
//!
//! The control plane sends the AuthorizationPolicies that select this workload, typed
//! (`v1::Authorization`: patterns already exact / prefix / suffix / presence, CIDRs and ports as
//! numbers, header names lowercased); they are compiled once per config snapshot into matchers
//! that own their strings, so a decision only borrows: no allocation, no lock.
//!
//! Order (Istio): any matching DENY → deny; no ALLOW policy → the mesh `defaultPolicy`; any
//! matching ALLOW → allow; else deny. AUDIT only records.
//!
//! TCP (Istio's documented handling): in an ALLOW policy a rule using HTTP-only fields (methods,
//! paths, hosts, request headers) cannot match a TCP connection; in a DENY policy those fields
//! are ignored, so the rule denies the connection more broadly (fail closed).
//!
//! Explaining (`palisade authz explain`): the matchers take a reporter that hears, where a
//! matcher fails, which field did not match and why. The proxy passes a no-op reporter
//! (monomorphized away, so decisions stay allocation-free); `Authorizer::explain_*` passes a
//! recording one. There is one matching logic, so an explanation cannot drift from a decision.

use std::net::IpAddr;
use std::sync::Arc;

use http::{HeaderMap, HeaderName};
use ipnet::IpNet;
use palisade_api::policy::{
    Action, AuthorizationPolicy, Condition, DefaultPolicy, Operation, Rule, Source,
};

#[cfg(test)]
mod tests;

#[derive(Debug, thiserror::Error)]
pub enum AuthzError {
    #[error("policy {policy}: {field}: {message}")]
    Invalid {
        policy: String,
        field: String,
        message: String,
    },
}

/// What the connection says about the caller.
#[derive(Clone, Copy, Debug)]
pub struct ConnContext<'a> {
    /// The verified SPIFFE ID (`spiffe://…`), None for plaintext.
    pub peer: Option<&'a str>,
    pub source_ip: IpAddr,
    pub dest_port: u16,
}

/// What an HTTP request adds.
#[derive(Clone, Copy, Debug)]
pub struct HttpContext<'a> {
    pub method: &'a str,
    /// Path, possibly with a query string (ignored when matching).
    pub path: &'a str,
    pub host: &'a str,
    pub headers: &'a HeaderMap,
    /// The route rule the request matched (`namespace/name/rule`), if routes apply.
    pub route: Option<&'a str>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// `namespace/name` of the deciding policy; None when the default policy decided, or
    /// when ALLOW policies exist and none matched.
    pub policy: Option<Arc<str>>,
    /// Index of the matching rule within that policy.
    pub rule: Option<usize>,
    /// The mesh's `defaultPolicy` decided (no ALLOW policy selects the workload).
    pub by_default: bool,
    /// An AUDIT policy that matched.
    pub audit: Option<Arc<str>>,
}

#[derive(Debug)]
enum Str {
    Exact(Box<str>),
    Prefix(Box<str>),
    Suffix(Box<str>),
    Any,
}

impl Str {
    fn new(s: &str) -> Str {
        if s == "*" {
            Str::Any
        } else if let Some(p) = s.strip_suffix('*') {
            Str::Prefix(p.into())
        } else if let Some(p) = s.strip_prefix('*') {
            Str::Suffix(p.into())
        } else {
            Str::Exact(s.into())
        }
    }

    fn principal(s: &str) -> Str {
        Str::new(s.strip_prefix("spiffe://").unwrap_or(s))
    }

    fn matches(&self, v: &str) -> bool {
        match self {
            Str::Exact(e) => **e == *v,
            Str::Prefix(p) => v.starts_with(&**p),
            Str::Suffix(p) => v.ends_with(&**p),
            Str::Any => true,
        }
    }

    fn matches_ci(&self, v: &str) -> bool {
        match self {
            Str::Exact(e) => e.eq_ignore_ascii_case(v),
            Str::Prefix(p) => v.len() >= p.len() && v[..p.len()].eq_ignore_ascii_case(p),
            Str::Suffix(p) => v.len() >= p.len() && v[v.len() - p.len()..].eq_ignore_ascii_case(p),
            Str::Any => true,
        }
    }
}

/// A principal pattern of the policy language (`exact`, `prefix*`, `*suffix`, `*`), for other
/// stages that match callers the way authorization does (rate-limit overrides).
#[derive(Debug)]
pub struct StringMatcher(Str);

impl StringMatcher {
    pub fn from_proto(m: &palisade_api::v1::StringMatch) -> Result<Self, String> {
        wire::str_match(m)
            .map(StringMatcher)
            .map_err(str::to_string)
    }

    pub fn matches(&self, v: &str) -> bool {
        self.0.matches(v)
    }
}

/// The pattern as written in the policy (principals without `spiffe://`).
impl std::fmt::Display for Str {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Str::Exact(e) => f.write_str(e),
            Str::Prefix(p) => write!(f, "{p}*"),
            Str::Suffix(p) => write!(f, "*{p}"),
            Str::Any => f.write_str("*"),
        }
    }
}

fn any(list: &[Str], v: &str) -> bool {
    list.iter().any(|m| m.matches(v))
}

// ---------------------------------------------------------------------------------------------
// Reporting. The matchers below are the only matching logic there is: each takes a reporter
// (`R: FnMut(Event)`) and tells it, at the point where it returns false, what failed. The
// proxy's decisions pass a reporter that does nothing, which inlines away (no allocation, no
// formatting: an `Event` only borrows); `Authorizer::explain_*` passes one that records.
// ---------------------------------------------------------------------------------------------

/// Where in a rule a mismatch is: the rule itself, or entry `index` of `count` in its `from`,
/// `to` or `when` list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum At {
    Rule,
    From { index: usize, count: usize },
    To { index: usize, count: usize },
    When,
}

impl At {
    /// Which part of the rule: only the misses of the part that failed the rule explain it.
    fn part(self) -> u8 {
        match self {
            At::Rule => 0,
            At::From { .. } => 1,
            At::To { .. } => 2,
            At::When => 3,
        }
    }
}

/// The field that did not match.
#[derive(Clone, Copy, Debug)]
enum Field<'a> {
    /// A `source` or `operation` field (`principals`, `notMethods`, …).
    Named(&'static str),
    /// The `values` (or `notValues`) of a `when` condition.
    When { key: &'a CondKey, not: bool },
}

/// The patterns of that field.
#[derive(Clone, Copy, Debug)]
enum Pats<'a> {
    Strs(&'a [Str]),
    Ports(&'a [u16]),
    Nets(&'a [IpNet]),
}

/// What the request had for that field.
#[derive(Clone, Copy, Debug)]
enum Val<'a> {
    Str(&'a str),
    Port(u16),
    Ip(IpAddr),
    /// The request has no value at all; says which.
    Absent(&'static str),
}

const NO_IDENTITY: &str = "the caller has no mTLS identity (plaintext)";
const NO_HEADER: &str = "the request has no such header";

#[derive(Clone, Copy, Debug)]
enum Miss<'a> {
    /// A positive list none of whose patterns matches the value.
    NotIn {
        at: At,
        field: Field<'a>,
        pats: Pats<'a>,
        val: Val<'a>,
    },
    /// A negative (`not…`) list one of whose patterns matches the value.
    In {
        at: At,
        field: Field<'a>,
        pats: Pats<'a>,
        val: Val<'a>,
    },
    /// An ALLOW rule with HTTP-only fields, asked about a TCP connection.
    HttpOnlyOnTcp,
}

/// What the matchers tell a reporter, in evaluation order.
#[derive(Clone, Copy, Debug)]
enum Event<'a> {
    /// A policy is about to be evaluated.
    Policy {
        name: &'a Arc<str>,
        action: Action,
        rules: usize,
    },
    /// Why the rule being evaluated does not match (several for a `from` or `to` list whose
    /// entries all fail).
    Miss(Miss<'a>),
    /// The rule `index` of the current policy was evaluated.
    RuleEnd { index: usize, matched: bool },
}

impl Miss<'_> {
    fn at(&self) -> At {
        match self {
            Miss::NotIn { at, .. } | Miss::In { at, .. } => *at,
            Miss::HttpOnlyOnTcp => At::Rule,
        }
    }
}

impl std::fmt::Display for CondKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CondKey::Header(h) => write!(f, "request.headers[{h}]"),
            CondKey::SourceIp => f.write_str("source.ip"),
            CondKey::SourceNamespace => f.write_str("source.namespace"),
            CondKey::SourcePrincipal => f.write_str("source.principal"),
            CondKey::DestinationPort => f.write_str("destination.port"),
        }
    }
}

impl std::fmt::Display for Field<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Field::Named(n) => f.write_str(n),
            Field::When { key, not: false } => write!(f, "when {key} values"),
            Field::When { key, not: true } => write!(f, "when {key} notValues"),
        }
    }
}

impl std::fmt::Display for Pats<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        fn list<T: std::fmt::Display>(
            f: &mut std::fmt::Formatter<'_>,
            items: &[T],
        ) -> std::fmt::Result {
            f.write_str("[")?;
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                write!(f, "{x}")?;
            }
            f.write_str("]")
        }
        match self {
            Pats::Strs(v) => list(f, v),
            Pats::Ports(v) => list(f, v),
            Pats::Nets(v) => list(f, v),
        }
    }
}

impl std::fmt::Display for Val<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Val::Str("") => f.write_str("\"\""),
            Val::Str(s) => f.write_str(s),
            Val::Port(p) => write!(f, "{p}"),
            Val::Ip(ip) => write!(f, "{ip}"),
            Val::Absent(what) => f.write_str(what),
        }
    }
}

impl std::fmt::Display for Miss<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.at() {
            At::From { index, count } if count > 1 => write!(f, "from[{index}]: ")?,
            At::To { index, count } if count > 1 => write!(f, "to[{index}]: ")?,
            _ => {}
        }
        match self {
            Miss::NotIn {
                field,
                pats,
                val: val @ Val::Absent(_),
                ..
            } => write!(f, "{field} {pats}: {val}"),
            Miss::NotIn {
                field, pats, val, ..
            } => write!(f, "{field} {pats} does not contain {val}"),
            Miss::In {
                field, pats, val, ..
            } => write!(f, "{field} {pats} contains {val}"),
            Miss::HttpOnlyOnTcp => f.write_str(
                "it uses HTTP-only fields (methods, paths, hosts or request headers), so as an ALLOW rule it cannot match a TCP connection",
            ),
        }
    }
}

/// A positive list: matches if empty or if a pattern matches `v`; `None` (no value) matches
/// only an empty list.
fn pos<R: FnMut(Event<'_>)>(
    r: &mut R,
    at: At,
    field: Field<'_>,
    pats: &[Str],
    v: Option<&str>,
    absent: &'static str,
) -> bool {
    if pats.is_empty() {
        return true;
    }
    let val = match v {
        Some(v) if any(pats, v) => return true,
        Some(v) => Val::Str(v),
        None => Val::Absent(absent),
    };
    r(Event::Miss(Miss::NotIn {
        at,
        field,
        pats: Pats::Strs(pats),
        val,
    }));
    false
}

/// A negative list: matches unless a pattern matches `v` (no value: matches).
fn neg<R: FnMut(Event<'_>)>(
    r: &mut R,
    at: At,
    field: Field<'_>,
    pats: &[Str],
    v: Option<&str>,
) -> bool {
    match v {
        Some(v) if any(pats, v) => {
            r(Event::Miss(Miss::In {
                at,
                field,
                pats: Pats::Strs(pats),
                val: Val::Str(v),
            }));
            false
        }
        _ => true,
    }
}

/// `ipBlocks`-like lists: the positive one matches if empty or containing `ip`, the negative
/// one if not containing it.
fn nets_match<R: FnMut(Event<'_>)>(
    r: &mut R,
    at: At,
    (field, pos): (Field<'_>, &[IpNet]),
    (not_field, neg): (Field<'_>, &[IpNet]),
    ip: IpAddr,
) -> bool {
    if !pos.is_empty() && !pos.iter().any(|b| b.contains(&ip)) {
        r(Event::Miss(Miss::NotIn {
            at,
            field,
            pats: Pats::Nets(pos),
            val: Val::Ip(ip),
        }));
        return false;
    }
    if neg.iter().any(|b| b.contains(&ip)) {
        r(Event::Miss(Miss::In {
            at,
            field: not_field,
            pats: Pats::Nets(neg),
            val: Val::Ip(ip),
        }));
        return false;
    }
    true
}

#[derive(Debug, Default)]
struct CSource {
    principals: Vec<Str>,
    not_principals: Vec<Str>,
    namespaces: Vec<Str>,
    not_namespaces: Vec<Str>,
    ip_blocks: Vec<IpNet>,
    not_ip_blocks: Vec<IpNet>,
}

/// `td/ns/<ns>/sa/<sa>` → `<ns>`.
fn namespace_of(principal: &str) -> Option<&str> {
    let mut it = principal.split('/');
    it.next()?;
    if it.next()? != "ns" {
        return None;
    }
    it.next()
}

impl CSource {
    #[inline]
    fn matches<R: FnMut(Event<'_>)>(&self, c: &ConnContext<'_>, at: At, r: &mut R) -> bool {
        use Field::Named;
        let principal = c.peer.map(|p| p.strip_prefix("spiffe://").unwrap_or(p));
        let ns = principal.and_then(namespace_of);
        // Identity-based fields need an mTLS identity; negative ones also match a caller that
        // has none (Envoy's `not authenticated(…)`).
        pos(
            r,
            at,
            Named("principals"),
            &self.principals,
            principal,
            NO_IDENTITY,
        ) && neg(
            r,
            at,
            Named("notPrincipals"),
            &self.not_principals,
            principal,
        ) && pos(
            r,
            at,
            Named("namespaces"),
            &self.namespaces,
            ns,
            NO_IDENTITY,
        ) && neg(r, at, Named("notNamespaces"), &self.not_namespaces, ns)
            && nets_match(
                r,
                at,
                (Named("ipBlocks"), &self.ip_blocks),
                (Named("notIpBlocks"), &self.not_ip_blocks),
                c.source_ip,
            )
    }
}

#[derive(Debug, Default)]
struct COperation {
    hosts: Vec<Str>,
    not_hosts: Vec<Str>,
    ports: Vec<u16>,
    not_ports: Vec<u16>,
    methods: Vec<Str>,
    not_methods: Vec<Str>,
    paths: Vec<Str>,
    not_paths: Vec<Str>,
    routes: Vec<Str>,
    not_routes: Vec<Str>,
    http_only: bool,
}

impl COperation {
    #[inline]
    fn matches_port<R: FnMut(Event<'_>)>(&self, port: u16, at: At, r: &mut R) -> bool {
        if !self.ports.is_empty() && !self.ports.contains(&port) {
            r(Event::Miss(Miss::NotIn {
                at,
                field: Field::Named("ports"),
                pats: Pats::Ports(&self.ports),
                val: Val::Port(port),
            }));
            return false;
        }
        if self.not_ports.contains(&port) {
            r(Event::Miss(Miss::In {
                at,
                field: Field::Named("notPorts"),
                pats: Pats::Ports(&self.not_ports),
                val: Val::Port(port),
            }));
            return false;
        }
        true
    }

    #[inline]
    fn matches_http<R: FnMut(Event<'_>)>(
        &self,
        c: &ConnContext<'_>,
        h: &HttpContext<'_>,
        at: At,
        r: &mut R,
    ) -> bool {
        use Field::Named;
        let path = h.path.split_once('?').map_or(h.path, |(p, _)| p);
        let (host, bare) = (h.host, strip_port(h.host));
        // A host pattern matches the request's host with or without its port, whatever
        // its case: `api.demo` covers `API.demo:8080`.
        let host_matches = |m: &Str| m.matches_ci(host) || m.matches_ci(bare);
        if !self.matches_port(c.dest_port, at, r)
            || !pos(r, at, Named("methods"), &self.methods, Some(h.method), "")
            || !neg(
                r,
                at,
                Named("notMethods"),
                &self.not_methods,
                Some(h.method),
            )
            || !pos(r, at, Named("paths"), &self.paths, Some(path), "")
            || !neg(r, at, Named("notPaths"), &self.not_paths, Some(path))
        {
            return false;
        }
        if !self.routes.is_empty() || !self.not_routes.is_empty() {
            // `ns/name` names every rule of the route: compare it and `ns/name/rule`.
            let route_only = h
                .route
                .and_then(|r| r.rsplit_once('/').map(|(route, _)| route));
            let any = |pats: &[Str]| {
                h.route.is_some_and(|full| {
                    pats.iter()
                        .any(|m| m.matches(full) || route_only.is_some_and(|ro| m.matches(ro)))
                })
            };
            if !self.routes.is_empty() && !any(&self.routes) {
                r(Event::Miss(Miss::NotIn {
                    at,
                    field: Named("routes"),
                    pats: Pats::Strs(&self.routes),
                    val: Val::Str(h.route.unwrap_or("")),
                }));
                return false;
            }
            if any(&self.not_routes) {
                r(Event::Miss(Miss::In {
                    at,
                    field: Named("notRoutes"),
                    pats: Pats::Strs(&self.not_routes),
                    val: Val::Str(h.route.unwrap_or("")),
                }));
                return false;
            }
        }
        if !self.hosts.is_empty() && !self.hosts.iter().any(host_matches) {
            r(Event::Miss(Miss::NotIn {
                at,
                field: Named("hosts"),
                pats: Pats::Strs(&self.hosts),
                val: Val::Str(host),
            }));
            return false;
        }
        if self.not_hosts.iter().any(host_matches) {
            r(Event::Miss(Miss::In {
                at,
                field: Named("notHosts"),
                pats: Pats::Strs(&self.not_hosts),
                val: Val::Str(host),
            }));
            return false;
        }
        true
    }
}

/// `host:port` → `host`; `[::1]:80` → `[::1]`; a host without a port is returned as is.
fn strip_port(host: &str) -> &str {
    match host.rfind(':') {
        Some(i)
            if !host[i..].contains(']') && host[i + 1..].bytes().all(|b| b.is_ascii_digit()) =>
        {
            &host[..i]
        }
        _ => host,
    }
}

#[derive(Debug)]
enum CondKey {
    Header(HeaderName),
    SourceIp,
    SourceNamespace,
    SourcePrincipal,
    DestinationPort,
}

#[derive(Debug)]
struct CCondition {
    key: CondKey,
    values: Vec<Str>,
    not_values: Vec<Str>,
    ips: Vec<IpNet>,
    not_ips: Vec<IpNet>,
}

impl CCondition {
    fn is_http(&self) -> bool {
        matches!(self.key, CondKey::Header(_))
    }

    fn check<R: FnMut(Event<'_>)>(&self, v: Option<&str>, absent: &'static str, r: &mut R) -> bool {
        let (key, at) = (&self.key, At::When);
        pos(
            r,
            at,
            Field::When { key, not: false },
            &self.values,
            v,
            absent,
        ) && neg(r, at, Field::When { key, not: true }, &self.not_values, v)
    }

    #[inline]
    fn matches<R: FnMut(Event<'_>)>(
        &self,
        c: &ConnContext<'_>,
        h: Option<&HttpContext<'_>>,
        r: &mut R,
    ) -> bool {
        let principal = c.peer.map(|p| p.strip_prefix("spiffe://").unwrap_or(p));
        match &self.key {
            CondKey::Header(name) => match h {
                // A repeated header is one value, its values joined with `,` (Envoy's and
                // Istio's semantics): matching each value alone would let a second header
                // slip past a DENY on the first. A value that is not text never matches a
                // value and is caught by `notValues` only through the other values, so it
                // is checked as the empty string.
                Some(h) => {
                    let mut all = h.headers.get_all(name).iter();
                    let Some(first) = all.next() else {
                        return self.check(None, NO_HEADER, r);
                    };
                    let text = |v: &http::HeaderValue| v.to_str().unwrap_or("").to_owned();
                    match all.next() {
                        None => self.check(Some(first.to_str().unwrap_or("")), NO_HEADER, r),
                        Some(second) => {
                            let mut joined = text(first);
                            for v in std::iter::once(second).chain(all) {
                                joined.push(',');
                                joined.push_str(&text(v));
                            }
                            self.check(Some(&joined), NO_HEADER, r)
                        }
                    }
                }
                None => true,
            },
            CondKey::SourceIp => {
                let key = &self.key;
                nets_match(
                    r,
                    At::When,
                    (Field::When { key, not: false }, &self.ips),
                    (Field::When { key, not: true }, &self.not_ips),
                    c.source_ip,
                )
            }
            CondKey::SourceNamespace => {
                self.check(principal.and_then(namespace_of), NO_IDENTITY, r)
            }
            CondKey::SourcePrincipal => self.check(principal, NO_IDENTITY, r),
            CondKey::DestinationPort => {
                let mut buf = itoa_buf();
                self.check(Some(fmt_port(&mut buf, c.dest_port)), "", r)
            }
        }
    }
}

fn itoa_buf() -> [u8; 5] {
    [0; 5]
}

/// Formats a port without allocating.
fn fmt_port(buf: &mut [u8; 5], mut p: u16) -> &str {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (p % 10) as u8;
        p /= 10;
        if p == 0 {
            break;
        }
    }
    std::str::from_utf8(&buf[i..]).unwrap_or("0")
}

#[derive(Debug)]
struct CRule {
    from: Vec<CSource>,
    to: Vec<COperation>,
    when: Vec<CCondition>,
    /// Uses a field that only HTTP has.
    http_only: bool,
}

impl CRule {
    #[inline]
    fn matches<R: FnMut(Event<'_>)>(
        &self,
        c: &ConnContext<'_>,
        h: Option<&HttpContext<'_>>,
        action: Action,
        r: &mut R,
    ) -> bool {
        if h.is_none() && self.http_only && action != Action::Deny {
            r(Event::Miss(Miss::HttpOnlyOnTcp));
            return false;
        }
        // At least one source (each one that fails says why).
        let count = self.from.len();
        if count > 0
            && !self
                .from
                .iter()
                .enumerate()
                .any(|(index, s)| s.matches(c, At::From { index, count }, r))
        {
            return false;
        }
        let count = self.to.len();
        if count > 0
            && !self.to.iter().enumerate().any(|(index, o)| {
                let at = At::To { index, count };
                match h {
                    Some(h) => o.matches_http(c, h, at, r),
                    None => o.matches_port(c.dest_port, at, r),
                }
            })
        {
            return false;
        }
        self.when
            .iter()
            .all(|w| (h.is_none() && w.is_http()) || w.matches(c, h, r))
    }
}

#[derive(Debug)]
struct CPolicy {
    name: Arc<str>,
    rules: Vec<CRule>,
}

impl CPolicy {
    #[inline]
    fn first_match<R: FnMut(Event<'_>)>(
        &self,
        c: &ConnContext<'_>,
        h: Option<&HttpContext<'_>>,
        action: Action,
        r: &mut R,
    ) -> Option<usize> {
        r(Event::Policy {
            name: &self.name,
            action,
            rules: self.rules.len(),
        });
        self.rules.iter().enumerate().find_map(|(index, rule)| {
            let matched = rule.matches(c, h, action, r);
            r(Event::RuleEnd { index, matched });
            matched.then_some(index)
        })
    }
}

/// Why one rule of a policy did not match the request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleMiss {
    /// Index of the rule in the policy's `rules`.
    pub rule: usize,
    /// The first condition that failed, e.g. `methods [GET] does not contain POST` (one per
    /// entry when every entry of a `from` or `to` list failed, joined with `; `).
    pub reason: String,
}

/// One policy as the decision evaluated it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyTrace {
    /// `namespace/name`.
    pub name: Arc<str>,
    pub action: Action,
    /// How many rules it has (0: it matches nothing).
    pub rules: usize,
    /// The rules evaluated that did not match, in order. The evaluation of a policy stops
    /// at its first matching rule, so rules after it are not listed.
    pub misses: Vec<RuleMiss>,
}

/// A decision and how it was reached: the policies evaluated, in the order the decision
/// evaluated them (AUDIT, then DENY, then ALLOW), each with why its rules did not match.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Explanation {
    pub decision: Decision,
    pub policies: Vec<PolicyTrace>,
}

impl Explanation {
    /// The ALLOW policies evaluated (all of them when no ALLOW policy matched).
    pub fn allow_policies(&self) -> impl Iterator<Item = &PolicyTrace> {
        self.policies.iter().filter(|p| p.action == Action::Allow)
    }
}

/// Records the events of one decision as an [`Explanation`]'s traces.
#[derive(Default)]
struct Recorder {
    policies: Vec<PolicyTrace>,
    /// The misses of the rule being evaluated, with the part of the rule they are in.
    pending: Vec<(u8, String)>,
}

impl Recorder {
    fn event(&mut self, e: Event<'_>) {
        match e {
            Event::Policy {
                name,
                action,
                rules,
            } => self.policies.push(PolicyTrace {
                name: name.clone(),
                action,
                rules,
                misses: Vec::new(),
            }),
            Event::Miss(m) => self.pending.push((m.at().part(), m.to_string())),
            Event::RuleEnd { index, matched } => {
                let pending = std::mem::take(&mut self.pending);
                if matched {
                    return;
                }
                // Evaluation stops at the part that fails the rule; misses of an earlier part
                // come from entries of a list where a later entry matched, and explain nothing.
                let failed = pending.last().map(|(part, _)| *part);
                let reason = pending
                    .into_iter()
                    .filter(|(part, _)| Some(*part) == failed)
                    .map(|(_, m)| m)
                    .collect::<Vec<_>>()
                    .join("; ");
                if let Some(p) = self.policies.last_mut() {
                    p.misses.push(RuleMiss {
                        rule: index,
                        reason,
                    });
                }
            }
        }
    }
}

/// A workload's compiled policies.
#[derive(Debug)]
pub struct Authorizer {
    default: DefaultPolicy,
    deny: Vec<CPolicy>,
    allow: Vec<CPolicy>,
    audit: Vec<CPolicy>,
}

fn invalid(policy: &str, field: String, message: String) -> AuthzError {
    AuthzError::Invalid {
        policy: policy.to_string(),
        field,
        message,
    }
}

impl CRule {
    fn new(from: Vec<CSource>, to: Vec<COperation>, when: Vec<CCondition>) -> Self {
        let http_only = to.iter().any(|o| o.http_only) || when.iter().any(CCondition::is_http);
        CRule {
            from,
            to,
            when,
            http_only,
        }
    }
}

impl COperation {
    fn set_http_only(mut self) -> Self {
        self.http_only = !(self.hosts.is_empty()
            && self.not_hosts.is_empty()
            && self.methods.is_empty()
            && self.not_methods.is_empty()
            && self.paths.is_empty()
            && self.not_paths.is_empty()
            && self.routes.is_empty()
            && self.not_routes.is_empty());
        self
    }
}

// ---------------------------------------------------------------------------------------------
// From the wire (`v1::Authorization`): the proxy's path. Everything is typed already; what is
// checked is what a proto can hold and a policy cannot (an unset match, a 5-byte address, port
// 70000), each error naming its field from `authorization_policies[i]` down.
// ---------------------------------------------------------------------------------------------

mod wire {
    use super::*;
    use palisade_api::authorization::ip_net;
    use palisade_api::v1;
    use palisade_api::v1::condition::Key;
    use palisade_api::v1::string_match::MatchType;

    /// Where errors are: the policy's name and the field path being compiled.
    pub(super) struct Loc<'a> {
        pub policy: &'a str,
        pub path: String,
    }

    impl Loc<'_> {
        fn at(&self, field: &str) -> Loc<'_> {
            Loc {
                policy: self.policy,
                path: format!("{}.{field}", self.path),
            }
        }

        fn err(&self, message: impl Into<String>) -> AuthzError {
            invalid(self.policy, self.path.clone(), message.into())
        }

        fn err_at(&self, i: usize, message: impl Into<String>) -> AuthzError {
            invalid(self.policy, format!("{}[{i}]", self.path), message.into())
        }
    }

    pub(super) fn str_match(m: &v1::StringMatch) -> Result<Str, &'static str> {
        Ok(match &m.match_type {
            None => return Err("no match type (exact, prefix, suffix or presence)"),
            Some(MatchType::Exact(e)) => Str::Exact(e.as_str().into()),
            Some(MatchType::Prefix(p)) => Str::Prefix(p.as_str().into()),
            Some(MatchType::Suffix(s)) => Str::Suffix(s.as_str().into()),
            Some(MatchType::Presence(())) => Str::Any,
        })
    }

    fn strs(at: Loc<'_>, v: &[v1::StringMatch]) -> Result<Vec<Str>, AuthzError> {
        v.iter()
            .enumerate()
            .map(|(i, m)| str_match(m).map_err(|e| at.err_at(i, e)))
            .collect()
    }

    /// Principals are compared without `spiffe://`: a match that keeps it could never match,
    /// which in a `notPrincipals` or a DENY policy would fail open, so it is refused.
    fn principals(at: Loc<'_>, v: &[v1::StringMatch]) -> Result<Vec<Str>, AuthzError> {
        v.iter()
            .enumerate()
            .map(|(i, m)| {
                let s = str_match(m).map_err(|e| at.err_at(i, e))?;
                if let Str::Exact(p) | Str::Prefix(p) = &s
                    && p.starts_with("spiffe:")
                {
                    return Err(at.err_at(
                        i,
                        format!("{p:?}: principals are matched without the `spiffe://` scheme"),
                    ));
                }
                Ok(s)
            })
            .collect()
    }

    fn nets(at: Loc<'_>, v: &[v1::Cidr]) -> Result<Vec<IpNet>, AuthzError> {
        v.iter()
            .enumerate()
            .map(|(i, c)| ip_net(c).map_err(|e| at.err_at(i, e)))
            .collect()
    }

    fn ports(at: Loc<'_>, v: &[u32]) -> Result<Vec<u16>, AuthzError> {
        v.iter()
            .enumerate()
            .map(|(i, p)| u16::try_from(*p).map_err(|_| at.err_at(i, format!("{p} is not a port"))))
            .collect()
    }

    fn source(at: Loc<'_>, s: Option<&v1::Source>) -> Result<CSource, AuthzError> {
        let s = s.ok_or_else(|| at.err("missing"))?;
        Ok(CSource {
            principals: principals(at.at("principals"), &s.principals)?,
            not_principals: principals(at.at("not_principals"), &s.not_principals)?,
            namespaces: strs(at.at("namespaces"), &s.namespaces)?,
            not_namespaces: strs(at.at("not_namespaces"), &s.not_namespaces)?,
            ip_blocks: nets(at.at("ip_blocks"), &s.ip_blocks)?,
            not_ip_blocks: nets(at.at("not_ip_blocks"), &s.not_ip_blocks)?,
        })
    }

    fn operation(at: Loc<'_>, o: Option<&v1::Operation>) -> Result<COperation, AuthzError> {
        let o = o.ok_or_else(|| at.err("missing"))?;
        let op = COperation {
            hosts: strs(at.at("hosts"), &o.hosts)?,
            not_hosts: strs(at.at("not_hosts"), &o.not_hosts)?,
            ports: ports(at.at("ports"), &o.ports)?,
            not_ports: ports(at.at("not_ports"), &o.not_ports)?,
            methods: strs(at.at("methods"), &o.methods)?,
            not_methods: strs(at.at("not_methods"), &o.not_methods)?,
            paths: strs(at.at("paths"), &o.paths)?,
            not_paths: strs(at.at("not_paths"), &o.not_paths)?,
            routes: strs(at.at("routes"), &o.routes)?,
            not_routes: strs(at.at("not_routes"), &o.not_routes)?,
            http_only: false,
        };
        Ok(op.set_http_only())
    }

    fn condition(at: Loc<'_>, c: &v1::Condition) -> Result<CCondition, AuthzError> {
        let plain = |key: CondKey, values: Vec<Str>, not_values: Vec<Str>| CCondition {
            key,
            values,
            not_values,
            ips: Vec::new(),
            not_ips: Vec::new(),
        };
        Ok(match &c.key {
            None => return Err(at.err("no key")),
            Some(Key::RequestHeader(h)) => {
                let at = at.at("request_header");
                let name = HeaderName::from_bytes(h.name.to_ascii_lowercase().as_bytes())
                    .map_err(|_| at.at("name").err(format!("bad header name {:?}", h.name)))?;
                plain(
                    CondKey::Header(name),
                    strs(at.at("values"), &h.values)?,
                    strs(at.at("not_values"), &h.not_values)?,
                )
            }
            Some(Key::SourceIp(ips)) => {
                let at = at.at("source_ip");
                CCondition {
                    key: CondKey::SourceIp,
                    values: Vec::new(),
                    not_values: Vec::new(),
                    ips: nets(at.at("values"), &ips.values)?,
                    not_ips: nets(at.at("not_values"), &ips.not_values)?,
                }
            }
            Some(Key::SourceNamespace(s)) => {
                let at = at.at("source_namespace");
                plain(
                    CondKey::SourceNamespace,
                    strs(at.at("values"), &s.values)?,
                    strs(at.at("not_values"), &s.not_values)?,
                )
            }
            Some(Key::SourcePrincipal(s)) => {
                let at = at.at("source_principal");
                plain(
                    CondKey::SourcePrincipal,
                    principals(at.at("values"), &s.values)?,
                    principals(at.at("not_values"), &s.not_values)?,
                )
            }
            Some(Key::DestinationPort(s)) => {
                let at = at.at("destination_port");
                plain(
                    CondKey::DestinationPort,
                    strs(at.at("values"), &s.values)?,
                    strs(at.at("not_values"), &s.not_values)?,
                )
            }
        })
    }

    pub(super) fn rule(at: Loc<'_>, r: &v1::Rule) -> Result<CRule, AuthzError> {
        let from = r
            .from
            .iter()
            .enumerate()
            .map(|(j, f)| source(at.at(&format!("from[{j}].source")), f.source.as_ref()))
            .collect::<Result<_, _>>()?;
        let to =
            r.to.iter()
                .enumerate()
                .map(|(j, t)| operation(at.at(&format!("to[{j}].operation")), t.operation.as_ref()))
                .collect::<Result<_, _>>()?;
        let when = r
            .when
            .iter()
            .enumerate()
            .map(|(j, c)| condition(at.at(&format!("when[{j}]")), c))
            .collect::<Result<_, _>>()?;
        Ok(CRule::new(from, to, when))
    }
}

// ---------------------------------------------------------------------------------------------
// From the resources as written (`AuthorizationPolicy`), reading the policy language's strings:
// the reference the wire path is tested against, and what tools holding parsed policies use.
// ---------------------------------------------------------------------------------------------

mod spec {
    use super::*;

    fn strs(v: &[String]) -> Vec<Str> {
        v.iter().map(|s| Str::new(s)).collect()
    }

    fn principals(v: &[String]) -> Vec<Str> {
        v.iter().map(|s| Str::principal(s)).collect()
    }

    fn nets(policy: &str, field: String, v: &[String]) -> Result<Vec<IpNet>, AuthzError> {
        v.iter()
            .enumerate()
            .map(|(i, s)| {
                s.parse::<IpNet>()
                    .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| {
                        invalid(
                            policy,
                            format!("{field}[{i}]"),
                            format!("{s:?} is not a CIDR"),
                        )
                    })
            })
            .collect()
    }

    fn ports(policy: &str, field: String, v: &[String]) -> Result<Vec<u16>, AuthzError> {
        v.iter()
            .enumerate()
            .map(|(i, s)| {
                s.parse::<u16>().map_err(|_| {
                    invalid(
                        policy,
                        format!("{field}[{i}]"),
                        format!("{s:?} is not a port"),
                    )
                })
            })
            .collect()
    }

    fn source(name: &str, path: &str, s: &Source) -> Result<CSource, AuthzError> {
        Ok(CSource {
            principals: principals(&s.principals),
            not_principals: principals(&s.not_principals),
            namespaces: strs(&s.namespaces),
            not_namespaces: strs(&s.not_namespaces),
            ip_blocks: nets(name, format!("{path}.ipBlocks"), &s.ip_blocks)?,
            not_ip_blocks: nets(name, format!("{path}.notIpBlocks"), &s.not_ip_blocks)?,
        })
    }

    fn operation(name: &str, path: &str, o: &Operation) -> Result<COperation, AuthzError> {
        let op = COperation {
            hosts: strs(&o.hosts),
            not_hosts: strs(&o.not_hosts),
            ports: ports(name, format!("{path}.ports"), &o.ports)?,
            not_ports: ports(name, format!("{path}.notPorts"), &o.not_ports)?,
            methods: strs(&o.methods),
            not_methods: strs(&o.not_methods),
            paths: strs(&o.paths),
            not_paths: strs(&o.not_paths),
            routes: strs(&o.routes),
            not_routes: strs(&o.not_routes),
            http_only: false,
        };
        Ok(op.set_http_only())
    }

    fn condition(name: &str, path: &str, w: &Condition) -> Result<CCondition, AuthzError> {
        let key = if let Some(h) = w.header_name() {
            CondKey::Header(
                HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).map_err(|_| {
                    invalid(name, format!("{path}.key"), format!("bad header {h:?}"))
                })?,
            )
        } else {
            match w.key.as_str() {
                "source.ip" => CondKey::SourceIp,
                "source.namespace" => CondKey::SourceNamespace,
                "source.principal" => CondKey::SourcePrincipal,
                "destination.port" => CondKey::DestinationPort,
                other => {
                    return Err(invalid(
                        name,
                        format!("{path}.key"),
                        format!("unsupported key {other:?}"),
                    ));
                }
            }
        };
        let (ips, not_ips) = if matches!(key, CondKey::SourceIp) {
            (
                nets(name, format!("{path}.values"), &w.values)?,
                nets(name, format!("{path}.notValues"), &w.not_values)?,
            )
        } else {
            (Vec::new(), Vec::new())
        };
        let (values, not_values) = match key {
            CondKey::SourcePrincipal => (principals(&w.values), principals(&w.not_values)),
            CondKey::SourceIp => (Vec::new(), Vec::new()),
            _ => (strs(&w.values), strs(&w.not_values)),
        };
        Ok(CCondition {
            key,
            values,
            not_values,
            ips,
            not_ips,
        })
    }

    pub(super) fn rule(name: &str, path: &str, r: &Rule) -> Result<CRule, AuthzError> {
        let from = r
            .from
            .iter()
            .enumerate()
            .map(|(j, f)| source(name, &format!("{path}.from[{j}].source"), &f.source))
            .collect::<Result<_, _>>()?;
        let to =
            r.to.iter()
                .enumerate()
                .map(|(j, t)| operation(name, &format!("{path}.to[{j}].operation"), &t.operation))
                .collect::<Result<_, _>>()?;
        let when = r
            .when
            .iter()
            .enumerate()
            .map(|(j, w)| condition(name, &format!("{path}.when[{j}]"), w))
            .collect::<Result<_, _>>()?;
        Ok(CRule::new(from, to, when))
    }
}

impl Authorizer {
    /// Everything allowed: the config before the control plane has said anything.
    pub fn allow_all() -> Self {
        Self::empty(DefaultPolicy::Allow)
    }

    fn empty(default: DefaultPolicy) -> Self {
        Authorizer {
            default,
            deny: Vec::new(),
            allow: Vec::new(),
            audit: Vec::new(),
        }
    }

    fn add(&mut self, name: &str, action: Action, rules: Vec<CRule>) {
        let cp = CPolicy {
            name: Arc::from(name),
            rules,
        };
        match action {
            Action::Deny => self.deny.push(cp),
            Action::Allow => self.allow.push(cp),
            Action::Audit => self.audit.push(cp),
        }
    }

    /// Compiles the policies that select one workload, as the control plane sends them. Error
    /// fields are paths from `authorization_policies[i]`, the caller's list.
    pub fn compile(
        default: DefaultPolicy,
        policies: &[palisade_api::v1::Authorization],
    ) -> Result<Self, AuthzError> {
        let mut a = Self::empty(default);
        for (i, p) in policies.iter().enumerate() {
            let name = format!("{}/{}", p.namespace, p.name);
            let at = wire::Loc {
                policy: &name,
                path: format!("authorization_policies[{i}]"),
            };
            let action = Action::from_proto(p.action).ok_or_else(|| {
                invalid(
                    &name,
                    format!("{}.action", at.path),
                    format!("unknown value {}", p.action),
                )
            })?;
            let rules = p
                .rules
                .iter()
                .enumerate()
                .map(|(j, r)| {
                    let at = wire::Loc {
                        policy: &name,
                        path: format!("{}.rules[{j}]", at.path),
                    };
                    wire::rule(at, r)
                })
                .collect::<Result<_, _>>()?;
            a.add(&name, action, rules);
        }
        Ok(a)
    }

    /// Compiles policies as written, reading the policy language's strings itself: the
    /// reference that the wire conversion (`palisade_api::authorization`) and [`Authorizer::compile`]
    /// are tested against. Error fields are the resource's (`spec.rules[0]…`).
    pub fn compile_spec(
        default: DefaultPolicy,
        policies: &[AuthorizationPolicy],
    ) -> Result<Self, AuthzError> {
        let mut a = Self::empty(default);
        for p in policies {
            let name = p.qualified_name();
            let rules = p
                .spec
                .rules
                .iter()
                .flatten()
                .enumerate()
                .map(|(i, r)| spec::rule(&name, &format!("spec.rules[{i}]"), r))
                .collect::<Result<_, _>>()?;
            a.add(&name, p.spec.action, rules);
        }
        Ok(a)
    }

    pub fn authorize_tcp(&self, c: &ConnContext<'_>) -> Decision {
        self.decide(c, None, &mut |_| {})
    }

    pub fn authorize_http(&self, c: &ConnContext<'_>, h: &HttpContext<'_>) -> Decision {
        self.decide(c, Some(h), &mut |_| {})
    }

    /// [`Authorizer::authorize_tcp`], and why each policy rule it evaluated did not match.
    /// The same evaluation as the decision (not a second copy of the rules), so the two
    /// cannot disagree; it allocates, so it is for tools, not the request path.
    pub fn explain_tcp(&self, c: &ConnContext<'_>) -> Explanation {
        self.explain(c, None)
    }

    /// [`Authorizer::authorize_http`], and why each policy rule it evaluated did not match.
    pub fn explain_http(&self, c: &ConnContext<'_>, h: &HttpContext<'_>) -> Explanation {
        self.explain(c, Some(h))
    }

    fn explain(&self, c: &ConnContext<'_>, h: Option<&HttpContext<'_>>) -> Explanation {
        let mut rec = Recorder::default();
        let decision = self.decide(c, h, &mut |e| rec.event(e));
        Explanation {
            decision,
            policies: rec.policies,
        }
    }

    /// Whether ALLOW policies exist (otherwise the default policy decides).
    pub fn has_allow_policies(&self) -> bool {
        !self.allow.is_empty()
    }

    /// The mesh's `defaultPolicy` this authorizer falls back to.
    pub fn default_policy(&self) -> DefaultPolicy {
        self.default
    }

    /// `namespace/name` and action of every compiled policy (AUDIT, DENY, then ALLOW).
    pub fn policies(&self) -> impl Iterator<Item = (&str, Action)> {
        fn named(ps: &[CPolicy], a: Action) -> impl Iterator<Item = (&str, Action)> {
            ps.iter().map(move |p| (&*p.name, a))
        }
        named(&self.audit, Action::Audit)
            .chain(named(&self.deny, Action::Deny))
            .chain(named(&self.allow, Action::Allow))
    }

    /// The one decision procedure; `r` hears why rules do not match (a no-op on the request
    /// path, which compiles away).
    #[inline]
    fn decide<R: FnMut(Event<'_>)>(
        &self,
        c: &ConnContext<'_>,
        h: Option<&HttpContext<'_>>,
        r: &mut R,
    ) -> Decision {
        let audit = self
            .audit
            .iter()
            .find(|p| p.first_match(c, h, Action::Audit, r).is_some())
            .map(|p| p.name.clone());
        for p in &self.deny {
            if let Some(i) = p.first_match(c, h, Action::Deny, r) {
                return Decision {
                    allowed: false,
                    policy: Some(p.name.clone()),
                    rule: Some(i),
                    by_default: false,
                    audit,
                };
            }
        }
        if self.allow.is_empty() {
            let allowed = match self.default {
                DefaultPolicy::Allow => true,
                DefaultPolicy::Deny => false,
                DefaultPolicy::Authenticated => c.peer.is_some(),
            };
            return Decision {
                allowed,
                policy: None,
                rule: None,
                by_default: true,
                audit,
            };
        }
        for p in &self.allow {
            if let Some(i) = p.first_match(c, h, Action::Allow, r) {
                return Decision {
                    allowed: true,
                    policy: Some(p.name.clone()),
                    rule: Some(i),
                    by_default: false,
                    audit,
                };
            }
        }
        Decision {
            allowed: false,
            policy: None,
            rule: None,
            by_default: false,
            audit,
        }
    }
}
