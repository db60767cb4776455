//! Authorization with Istio's semantics, compiled per workload.
//!
//! The control plane sends the AuthorizationPolicies that select this workload; they are
//! compiled once per config snapshot into matchers (strings pre-split into exact / prefix /
//! suffix / any, CIDRs parsed, ports as integers, header names lowercased), so a decision only
//! borrows: no allocation, no lock.
//!
//! Order (Istio): any matching DENY → deny; no ALLOW policy → the mesh `defaultPolicy`; any
//! matching ALLOW → allow; else deny. AUDIT only records.
//!
//! TCP (Istio's documented handling): in an ALLOW policy a rule using HTTP-only fields (methods,
//! paths, hosts, request headers) cannot match a TCP connection; in a DENY policy those fields
//! are ignored, so the rule denies the connection more broadly (fail closed).

use std::net::IpAddr;
use std::sync::Arc;

use http::{HeaderMap, HeaderName};
use ipnet::IpNet;
use palisade_api::policy::{
    Action, AuthorizationPolicy, Condition, DefaultPolicy, Operation, Source,
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

fn any(list: &[Str], v: &str) -> bool {
    list.iter().any(|m| m.matches(v))
}

/// A positive list matches if empty or if any entry matches; a negative list matches if no
/// entry matches.
fn pos_neg(pos: &[Str], neg: &[Str], v: &str) -> bool {
    (pos.is_empty() || any(pos, v)) && !any(neg, v)
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
    fn matches(&self, c: &ConnContext<'_>) -> bool {
        let principal = c.peer.map(|p| p.strip_prefix("spiffe://").unwrap_or(p));
        // Identity-based fields need an mTLS identity; negative ones also match a caller that
        // has none (Envoy's `not authenticated(…)`).
        if !self.principals.is_empty() && !principal.is_some_and(|p| any(&self.principals, p)) {
            return false;
        }
        if principal.is_some_and(|p| any(&self.not_principals, p)) {
            return false;
        }
        let ns = principal.and_then(namespace_of);
        if !self.namespaces.is_empty() && !ns.is_some_and(|n| any(&self.namespaces, n)) {
            return false;
        }
        if ns.is_some_and(|n| any(&self.not_namespaces, n)) {
            return false;
        }
        if !self.ip_blocks.is_empty() && !self.ip_blocks.iter().any(|b| b.contains(&c.source_ip)) {
            return false;
        }
        !self.not_ip_blocks.iter().any(|b| b.contains(&c.source_ip))
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
    http_only: bool,
}

impl COperation {
    fn matches_port(&self, port: u16) -> bool {
        (self.ports.is_empty() || self.ports.contains(&port)) && !self.not_ports.contains(&port)
    }

    fn matches_http(&self, c: &ConnContext<'_>, h: &HttpContext<'_>) -> bool {
        let path = h.path.split_once('?').map_or(h.path, |(p, _)| p);
        let (host, bare) = (h.host, strip_port(h.host));
        // A host pattern matches the request's host with or without its port, whatever
        // its case: `api.demo` covers `API.demo:8080`.
        let host_matches = |m: &Str| m.matches_ci(host) || m.matches_ci(bare);
        self.matches_port(c.dest_port)
            && pos_neg(&self.methods, &self.not_methods, h.method)
            && pos_neg(&self.paths, &self.not_paths, path)
            && (self.hosts.is_empty() || self.hosts.iter().any(host_matches))
            && !self.not_hosts.iter().any(host_matches)
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

    fn check(&self, v: Option<&str>) -> bool {
        match v {
            Some(v) => pos_neg(&self.values, &self.not_values, v),
            None => self.values.is_empty(),
        }
    }

    fn matches(&self, c: &ConnContext<'_>, h: Option<&HttpContext<'_>>) -> bool {
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
                        return self.check(None);
                    };
                    let text = |v: &http::HeaderValue| v.to_str().unwrap_or("").to_owned();
                    match all.next() {
                        None => self.check(Some(first.to_str().unwrap_or(""))),
                        Some(second) => {
                            let mut joined = text(first);
                            for v in std::iter::once(second).chain(all) {
                                joined.push(',');
                                joined.push_str(&text(v));
                            }
                            self.check(Some(&joined))
                        }
                    }
                }
                None => true,
            },
            CondKey::SourceIp => {
                (self.ips.is_empty() || self.ips.iter().any(|b| b.contains(&c.source_ip)))
                    && !self.not_ips.iter().any(|b| b.contains(&c.source_ip))
            }
            CondKey::SourceNamespace => self.check(principal.and_then(namespace_of)),
            CondKey::SourcePrincipal => self.check(principal),
            CondKey::DestinationPort => {
                let mut buf = itoa_buf();
                self.check(Some(fmt_port(&mut buf, c.dest_port)))
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
    fn matches(&self, c: &ConnContext<'_>, h: Option<&HttpContext<'_>>, action: Action) -> bool {
        if h.is_none() && self.http_only && action != Action::Deny {
            return false;
        }
        if !self.from.is_empty() && !self.from.iter().any(|s| s.matches(c)) {
            return false;
        }
        if !self.to.is_empty() {
            let ok = match h {
                Some(h) => self.to.iter().any(|o| o.matches_http(c, h)),
                None => self.to.iter().any(|o| o.matches_port(c.dest_port)),
            };
            if !ok {
                return false;
            }
        }
        self.when
            .iter()
            .all(|w| (h.is_none() && w.is_http()) || w.matches(c, h))
    }
}

#[derive(Debug)]
struct CPolicy {
    name: Arc<str>,
    rules: Vec<CRule>,
}

impl CPolicy {
    fn first_match(
        &self,
        c: &ConnContext<'_>,
        h: Option<&HttpContext<'_>>,
        action: Action,
    ) -> Option<usize> {
        self.rules.iter().position(|r| r.matches(c, h, action))
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

fn strs(v: &[String]) -> Vec<Str> {
    v.iter().map(|s| Str::new(s)).collect()
}

fn nets(policy: &str, field: &str, v: &[String]) -> Result<Vec<IpNet>, AuthzError> {
    v.iter()
        .map(|s| {
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| invalid(policy, field.into(), format!("{s:?} is not a CIDR")))
        })
        .collect()
}

fn ports(policy: &str, field: &str, v: &[String]) -> Result<Vec<u16>, AuthzError> {
    v.iter()
        .map(|s| {
            s.parse::<u16>()
                .map_err(|_| invalid(policy, field.into(), format!("{s:?} is not a port")))
        })
        .collect()
}

fn compile_source(name: &str, s: &Source) -> Result<CSource, AuthzError> {
    Ok(CSource {
        principals: s.principals.iter().map(|p| Str::principal(p)).collect(),
        not_principals: s.not_principals.iter().map(|p| Str::principal(p)).collect(),
        namespaces: strs(&s.namespaces),
        not_namespaces: strs(&s.not_namespaces),
        ip_blocks: nets(name, "ipBlocks", &s.ip_blocks)?,
        not_ip_blocks: nets(name, "notIpBlocks", &s.not_ip_blocks)?,
    })
}

fn compile_operation(name: &str, o: &Operation) -> Result<COperation, AuthzError> {
    Ok(COperation {
        hosts: strs(&o.hosts),
        not_hosts: strs(&o.not_hosts),
        ports: ports(name, "ports", &o.ports)?,
        not_ports: ports(name, "notPorts", &o.not_ports)?,
        methods: strs(&o.methods),
        not_methods: strs(&o.not_methods),
        paths: strs(&o.paths),
        not_paths: strs(&o.not_paths),
        http_only: o.has_http_fields(),
    })
}

fn compile_condition(name: &str, w: &Condition) -> Result<CCondition, AuthzError> {
    let key = if let Some(h) = w.header_name() {
        CondKey::Header(
            HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes())
                .map_err(|_| invalid(name, "when.key".into(), format!("bad header {h:?}")))?,
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
                    "when.key".into(),
                    format!("unsupported key {other:?}"),
                ));
            }
        }
    };
    let (ips, not_ips) = if matches!(key, CondKey::SourceIp) {
        (
            nets(name, "when.values", &w.values)?,
            nets(name, "when.notValues", &w.not_values)?,
        )
    } else {
        (Vec::new(), Vec::new())
    };
    let principal = matches!(key, CondKey::SourcePrincipal);
    let conv = |v: &[String]| -> Vec<Str> {
        if principal {
            v.iter().map(|p| Str::principal(p)).collect()
        } else {
            strs(v)
        }
    };
    Ok(CCondition {
        values: conv(&w.values),
        not_values: conv(&w.not_values),
        key,
        ips,
        not_ips,
    })
}

impl Authorizer {
    /// Everything allowed: the config before the control plane has said anything.
    pub fn allow_all() -> Self {
        Authorizer {
            default: DefaultPolicy::Allow,
            deny: Vec::new(),
            allow: Vec::new(),
            audit: Vec::new(),
        }
    }

    /// Compiles the policies that select one workload.
    pub fn compile(
        default: DefaultPolicy,
        policies: &[AuthorizationPolicy],
    ) -> Result<Self, AuthzError> {
        let mut a = Authorizer {
            default,
            deny: Vec::new(),
            allow: Vec::new(),
            audit: Vec::new(),
        };
        for p in policies {
            let name = p.qualified_name();
            let mut rules = Vec::new();
            for r in p.spec.rules.iter().flatten() {
                let from = r
                    .from
                    .iter()
                    .map(|f| compile_source(&name, &f.source))
                    .collect::<Result<Vec<_>, _>>()?;
                let to =
                    r.to.iter()
                        .map(|t| compile_operation(&name, &t.operation))
                        .collect::<Result<Vec<_>, _>>()?;
                let when = r
                    .when
                    .iter()
                    .map(|w| compile_condition(&name, w))
                    .collect::<Result<Vec<_>, _>>()?;
                let http_only =
                    to.iter().any(|o| o.http_only) || when.iter().any(CCondition::is_http);
                rules.push(CRule {
                    from,
                    to,
                    when,
                    http_only,
                });
            }
            let cp = CPolicy {
                name: Arc::from(name.as_str()),
                rules,
            };
            match p.spec.action {
                Action::Deny => a.deny.push(cp),
                Action::Allow => a.allow.push(cp),
                Action::Audit => a.audit.push(cp),
            }
        }
        Ok(a)
    }

    pub fn authorize_tcp(&self, c: &ConnContext<'_>) -> Decision {
        self.decide(c, None)
    }

    pub fn authorize_http(&self, c: &ConnContext<'_>, h: &HttpContext<'_>) -> Decision {
        self.decide(c, Some(h))
    }

    /// Whether ALLOW policies exist (otherwise the default policy decides).
    pub fn has_allow_policies(&self) -> bool {
        !self.allow.is_empty()
    }

    fn decide(&self, c: &ConnContext<'_>, h: Option<&HttpContext<'_>>) -> Decision {
        let audit = self
            .audit
            .iter()
            .find(|p| p.first_match(c, h, Action::Audit).is_some())
            .map(|p| p.name.clone());
        for p in &self.deny {
            if let Some(i) = p.first_match(c, h, Action::Deny) {
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
            if let Some(i) = p.first_match(c, h, Action::Allow) {
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
