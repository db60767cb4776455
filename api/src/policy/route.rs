//! Gateway API `HTTPRoute` and `GRPCRoute` (`gateway.networking.k8s.io/v1`) as mesh routes
//! (GAMMA: a Service is the parent), read from a policy file or from the API server with the
//! same strict checks as the authorization policies: every field Palisade does not implement is
//! an error naming it, never silently ignored.
//!
//! Supported (docs/routing.md has the table): parent Services (with or without a port),
//! hostnames, matches on path (Exact, PathPrefix, RegularExpression), headers, query params and
//! method; gRPC service/method matches; weighted Service `backendRefs`; the filters
//! RequestHeaderModifier, ResponseHeaderModifier, RequestRedirect, URLRewrite, RequestMirror and
//! the `palisade.dev` `HTTPFault` ExtensionRef; `timeouts.request` / `backendRequest`; `retry`.
//! Refused with an error: consumer routes (a route in another namespace than its parent
//! Service), backends other than Services, per-backend filters, `sessionPersistence`.

use std::time::Duration;

use serde_json::{Map, Value};

pub use super::wire::{wire_fault, wire_route};
use super::{Ctx, ObjectMeta, join, kind_of, list, object};

pub const GATEWAY_API_VERSION: &str = "gateway.networking.k8s.io/v1";

/// The longest regular expression a match may hold, and the most memory one may compile to:
/// a route is user input the proxy runs against every request.
pub const MAX_REGEX_LEN: usize = 1024;
pub const REGEX_SIZE_LIMIT: usize = 64 * 1024;

/// Which route type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RouteKind {
    Http,
    Grpc,
}

impl RouteKind {
    pub fn from_kind(kind: &str) -> Option<Self> {
        match kind {
            "HTTPRoute" => Some(Self::Http),
            "GRPCRoute" => Some(Self::Grpc),
            _ => None,
        }
    }

    pub fn kind(self) -> &'static str {
        match self {
            Self::Http => "HTTPRoute",
            Self::Grpc => "GRPCRoute",
        }
    }
}

/// A Service the route attaches to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ParentRef {
    pub namespace: String,
    pub name: String,
    /// The Service port it applies to; None for every port.
    pub port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub kind: RouteKind,
    pub metadata: ObjectMeta,
    pub parents: Vec<ParentRef>,
    /// Lower case; `*.example.com` matches one or more labels before `.example.com`.
    pub hostnames: Vec<String>,
    pub rules: Vec<RouteRule>,
    /// The `trace.palisade.dev/span-budget` and `trace.palisade.dev/slow` annotations: the
    /// trace policy of the route's requests, over its parent service's field by field.
    pub trace: crate::trace::TracePolicy,
}

impl Route {
    /// `namespace/name`.
    pub fn qualified_name(&self) -> String {
        format!("{}/{}", self.metadata.namespace(), self.metadata.name)
    }

    /// Whether it applies to calls to the Service `name.namespace`, port `port`.
    pub fn attaches_to(&self, name: &str, namespace: &str, port: u16) -> bool {
        self.parents
            .iter()
            .any(|p| p.name == name && p.namespace == namespace && p.port.is_none_or(|p| p == port))
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteRule {
    /// The rule's `name`, or its index: the `rule` part of the route label.
    pub name: String,
    /// None: every request (a path prefix `/`).
    pub matches: Vec<RouteMatch>,
    pub filters: Vec<Filter>,
    /// None: the parent Service itself.
    pub backends: Vec<BackendRef>,
    /// `timeouts.request`: the whole call, retries included.
    pub request_timeout: Option<Duration>,
    /// `timeouts.backendRequest`: each attempt.
    pub backend_timeout: Option<Duration>,
    pub retry: Option<crate::call::RetryPolicy>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
    Regex(String),
}

/// A header or query parameter match.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValueMatch {
    /// Headers: lower case.
    pub name: String,
    pub value: String,
    pub regex: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteMatch {
    pub path: Option<PathMatch>,
    pub headers: Vec<ValueMatch>,
    pub query_params: Vec<ValueMatch>,
    pub method: Option<String>,
    /// GRPCRoute: the `/service/method` of the request's path.
    pub grpc: Option<GrpcMethodMatch>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrpcMethodMatch {
    pub service: Option<String>,
    pub method: Option<String>,
    pub regex: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Filter {
    RequestHeaders(HeaderModifier),
    ResponseHeaders(HeaderModifier),
    Redirect(Redirect),
    Rewrite(Rewrite),
    Mirror(Mirror),
    /// An `ExtensionRef` to a `palisade.dev` `HTTPFault` of the route's namespace (by name).
    Fault(String),
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderModifier {
    /// Lower-case names.
    pub set: Vec<(String, String)>,
    pub add: Vec<(String, String)>,
    pub remove: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathModifier {
    ReplaceFullPath(String),
    ReplacePrefixMatch(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
    pub port: Option<u16>,
    pub status: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rewrite {
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mirror {
    pub backend: BackendRef,
    /// Of requests, 0–100.
    pub percent: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendRef {
    pub namespace: String,
    pub name: String,
    pub port: u16,
    pub weight: u32,
}

const METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// A Gateway API duration (GEP-2257): 1–4 groups of 1–5 digits and a unit (h, m, s, ms), like
/// `10s`, `500ms`, `1h30m`.
pub fn parse_gateway_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a Gateway API duration (like 10s, 500ms, 1m30s)");
    let mut rest = s;
    let mut total = Duration::ZERO;
    let mut groups = 0;
    while !rest.is_empty() {
        let digits = rest.chars().take_while(char::is_ascii_digit).count();
        if !(1..=5).contains(&digits) {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        let after = &rest[digits..];
        let (unit, len) = if after.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else if after.starts_with('h') {
            (Duration::from_secs(3600), 1)
        } else if after.starts_with('m') {
            (Duration::from_secs(60), 1)
        } else if after.starts_with('s') {
            (Duration::from_secs(1), 1)
        } else {
            return Err(bad());
        };
        // At most 99,999 hours four times: no overflow in u32 multiplication of a Duration.
        total += unit * u32::try_from(n).map_err(|_| bad())?;
        rest = &after[len..];
        groups += 1;
    }
    if groups == 0 || groups > 4 {
        return Err(bad());
    }
    Ok(total)
}

/// Compiles `re` as the proxy will, with the same bounds.
pub fn check_regex(re: &str) -> Result<(), String> {
    if re.len() > MAX_REGEX_LEN {
        return Err(format!(
            "a regular expression of at most {MAX_REGEX_LEN} characters (found {})",
            re.len()
        ));
    }
    // Exactly what the proxy compiles (anchored: Gateway API matches the whole value), so a
    // pattern that compiles alone but not anchored (`(?x)a#`, whose comment swallows the
    // anchor) is refused here, not by every proxy.
    anchored(re)
        .map(|_| ())
        .map_err(|e| format!("not a valid regular expression: {e}"))
}

/// The compiled form of a match's regular expression, as the proxy uses it.
pub fn anchored(re: &str) -> Result<regex::Regex, regex::Error> {
    regex::RegexBuilder::new(&format!("^(?:{re})$"))
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_SIZE_LIMIT)
        .build()
}

/// The most regular expressions one route may hold: each is compiled in every caller's proxy.
pub const MAX_REGEXES_PER_ROUTE: usize = 32;

fn string(c: &mut Ctx<'_>, m: &Map<String, Value>, key: &str, path: &str) -> Option<String> {
    match m.get(key) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => {
            c.err(
                &join(path, key),
                format!("expected a string, found {}", kind_of(other)),
            );
            None
        }
    }
}

fn required(c: &mut Ctx<'_>, m: &Map<String, Value>, key: &str, path: &str) -> Option<String> {
    let s = string(c, m, key, path);
    match &s {
        None if !m.contains_key(key) || m.get(key).is_some_and(Value::is_null) => {
            c.err(&join(path, key), "missing");
            None
        }
        Some(v) if v.is_empty() => {
            c.err(&join(path, key), "must not be empty");
            None
        }
        _ => s,
    }
}

fn int(
    c: &mut Ctx<'_>,
    m: &Map<String, Value>,
    key: &str,
    path: &str,
    range: std::ops::RangeInclusive<u64>,
) -> Option<u64> {
    let v = m.get(key).filter(|v| !v.is_null())?;
    match v.as_u64() {
        Some(n) if range.contains(&n) => Some(n),
        _ => {
            c.err(
                &join(path, key),
                format!(
                    "expected a whole number {}–{}, found {v}",
                    range.start(),
                    range.end()
                ),
            );
            None
        }
    }
}

fn one_of(
    c: &mut Ctx<'_>,
    m: &Map<String, Value>,
    key: &str,
    path: &str,
    allowed: &[&str],
) -> Option<String> {
    let s = string(c, m, key, path)?;
    if !allowed.contains(&s.as_str()) {
        c.err(
            &join(path, key),
            format!("{s:?} is not one of {}", allowed.join(", ")),
        );
        return None;
    }
    Some(s)
}

fn duration(c: &mut Ctx<'_>, m: &Map<String, Value>, key: &str, path: &str) -> Option<Duration> {
    let s = string(c, m, key, path)?;
    match parse_gateway_duration(&s) {
        Ok(d) if d.is_zero() => {
            c.err(&join(path, key), "must be more than zero");
            None
        }
        Ok(d) => Some(d),
        Err(e) => {
            c.err(&join(path, key), e);
            None
        }
    }
}

fn header_name(c: &mut Ctx<'_>, path: &str, name: &str) -> String {
    if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
        c.err(path, format!("{name:?} is not a valid header name"));
    }
    name.to_ascii_lowercase()
}

fn is_service(group: Option<&str>, kind: Option<&str>) -> bool {
    matches!(group, None | Some("" | "core")) && matches!(kind, None | Some("Service"))
}

/// Parses and checks the `spec` of a route whose metadata is `meta`.
pub(super) fn parse(
    c: &mut Ctx<'_>,
    kind: RouteKind,
    meta: &ObjectMeta,
    doc: &Value,
) -> Option<Route> {
    let before = c.errors.len();
    let map = object(
        c,
        doc,
        "",
        &["apiVersion", "kind", "metadata", "spec", "status"],
    )?;
    let Some(spec) = map.get("spec") else {
        c.err("spec", "missing field `spec`");
        return None;
    };
    let spec = object(c, spec, "spec", &["parentRefs", "hostnames", "rules"])?;
    let ns = meta.namespace().to_string();

    let mut parents = Vec::new();
    for (i, p) in list(
        c,
        spec.get("parentRefs").unwrap_or(&Value::Null),
        "spec.parentRefs",
    )
    .iter()
    .enumerate()
    {
        let f = format!("spec.parentRefs[{i}]");
        let Some(p) = object(
            c,
            p,
            &f,
            &["group", "kind", "namespace", "name", "sectionName", "port"],
        ) else {
            continue;
        };
        let group = string(c, p, "group", &f);
        let pkind = string(c, p, "kind", &f);
        let name = required(c, p, "name", &f);
        let pns = string(c, p, "namespace", &f).unwrap_or_else(|| ns.clone());
        let port = int(c, p, "port", &f, 1..=65535).map(|p| p as u16);
        if p.contains_key("sectionName") {
            c.err(
                &format!("{f}.sectionName"),
                "not supported for a Service parent (name the port with `port`)",
            );
        }
        // Gateway API's default parent kind is Gateway: a mesh route names `kind: Service`.
        if !(matches!(group.as_deref(), None | Some("" | "core"))
            && pkind.as_deref() == Some("Service"))
        {
            c.err(
                &f,
                "a mesh route's parent is a Service (group \"\", kind: Service); routes of \
                 Gateways belong to a gateway controller",
            );
            continue;
        }
        if pns != ns {
            c.err(
                &format!("{f}.namespace"),
                format!(
                    "a route in namespace {ns:?} for a Service in {pns:?} (a consumer route) is \
                     not supported: put the route in the Service's namespace"
                ),
            );
            continue;
        }
        if let Some(name) = name {
            parents.push(ParentRef {
                namespace: pns,
                name,
                port,
            });
        }
    }
    if parents.is_empty() && c.errors.len() == before {
        c.err(
            "spec.parentRefs",
            "missing: a mesh route needs a Service among its parents",
        );
    }
    parents.sort();
    parents.dedup();

    let mut hostnames = Vec::new();
    for (i, h) in list(
        c,
        spec.get("hostnames").unwrap_or(&Value::Null),
        "spec.hostnames",
    )
    .iter()
    .enumerate()
    {
        let f = format!("spec.hostnames[{i}]");
        match h.as_str() {
            Some(h) if valid_hostname(h) => hostnames.push(h.to_ascii_lowercase()),
            Some(h) => c.err(
                &f,
                format!("{h:?} is not a hostname (a `*.` prefix is the only wildcard)"),
            ),
            None => c.err(&f, format!("expected a string, found {}", kind_of(h))),
        }
    }

    let mut rules = Vec::new();
    let rules_v = list(c, spec.get("rules").unwrap_or(&Value::Null), "spec.rules");
    if rules_v.len() > 64 {
        c.err("spec.rules", "at most 64 rules");
    }
    for (i, r) in rules_v.iter().enumerate() {
        if let Some(rule) = parse_rule(c, kind, &ns, &format!("spec.rules[{i}]"), i, r) {
            rules.push(rule);
        }
    }
    // Rule names are the `rule` part of the route label, which authorization can name: two
    // rules must never share one (an unnamed rule is named by its index).
    let mut names = std::collections::BTreeMap::new();
    for (i, r) in rules.iter().enumerate() {
        if let Some(other) = names.insert(r.name.clone(), i) {
            c.err(
                &format!("spec.rules[{i}].name"),
                format!(
                    "{:?} already names rule {other} (an unnamed rule is named by its index)",
                    r.name
                ),
            );
        }
    }
    let regexes: usize = rules
        .iter()
        .flat_map(|r| &r.matches)
        .map(|m| {
            usize::from(matches!(m.path, Some(PathMatch::Regex(_))))
                + m.headers.iter().filter(|h| h.regex).count()
                + m.query_params.iter().filter(|q| q.regex).count()
                + m.grpc.as_ref().map_or(0, |g| {
                    if g.regex {
                        usize::from(g.service.is_some()) + usize::from(g.method.is_some())
                    } else {
                        0
                    }
                })
        })
        .sum();
    if regexes > MAX_REGEXES_PER_ROUTE {
        c.err(
            "spec.rules",
            format!(
                "{regexes} regular expressions; a route may hold at most {MAX_REGEXES_PER_ROUTE} \
                 (each is compiled in every caller's proxy)"
            ),
        );
    }
    if rules_v.is_empty() && c.errors.len() == before {
        // Gateway API's default is one rule sending everything to the parent.
        rules.push(RouteRule {
            name: "0".into(),
            ..Default::default()
        });
    }
    let trace = trace_annotations(c, meta);
    if c.errors.len() > before {
        return None;
    }
    Some(Route {
        kind,
        metadata: meta.clone(),
        parents,
        hostnames,
        rules,
        trace,
    })
}

/// The route's trace policy, from its `trace.palisade.dev/*` annotations; a bad or unknown
/// one is an error naming it (`metadata.annotations.trace.palisade.dev/slow`).
fn trace_annotations(c: &mut Ctx<'_>, meta: &ObjectMeta) -> crate::trace::TracePolicy {
    let (policy, errors) = crate::trace::TracePolicy::from_annotations(&meta.annotations);
    for e in errors {
        c.err(&join("metadata.annotations", &e.field), e.message);
    }
    policy
}

fn valid_hostname(h: &str) -> bool {
    let bare = h.strip_prefix("*.").unwrap_or(h);
    !bare.is_empty()
        && h.len() <= 253
        && bare.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn parse_rule(
    c: &mut Ctx<'_>,
    kind: RouteKind,
    ns: &str,
    f: &str,
    index: usize,
    r: &Value,
) -> Option<RouteRule> {
    let known: &[&str] = match kind {
        RouteKind::Http => &[
            "name",
            "matches",
            "filters",
            "backendRefs",
            "timeouts",
            "retry",
        ],
        RouteKind::Grpc => &["name", "matches", "filters", "backendRefs"],
    };
    if let Some(m) = r.as_object() {
        if m.contains_key("sessionPersistence") {
            c.err(
                &format!("{f}.sessionPersistence"),
                "not supported (Palisade balances by load, per request)",
            );
        }
        if kind == RouteKind::Grpc && (m.contains_key("timeouts") || m.contains_key("retry")) {
            c.err(
                f,
                "GRPCRoute rules have no timeouts or retry in Gateway API v1 (set them on the \
                 Service: timeout.palisade.dev/request, retry.palisade.dev/*)",
            );
        }
    }
    let allowed: Vec<&str> = known
        .iter()
        .copied()
        .chain(["sessionPersistence"])
        .chain(
            if kind == RouteKind::Grpc {
                &["timeouts", "retry"][..]
            } else {
                &[]
            }
            .iter()
            .copied(),
        )
        .collect();
    let r = object(c, r, f, &allowed)?;
    let name = match string(c, r, "name", f) {
        Some(n) => {
            // Gateway API's SectionName: a DNS label-like name (no `/`, which separates the
            // parts of a route label).
            let ok = !n.is_empty()
                && n.len() <= 253
                && n.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !n.starts_with('-')
                && !n.ends_with('-');
            if !ok {
                c.err(
                    &join(f, "name"),
                    format!("{n:?} is not a rule name (lower-case letters, digits and '-')"),
                );
            }
            n
        }
        None => index.to_string(),
    };
    let mut rule = RouteRule {
        name,
        ..Default::default()
    };
    let matches = list(
        c,
        r.get("matches").unwrap_or(&Value::Null),
        &join(f, "matches"),
    );
    if matches.len() > 64 {
        c.err(&join(f, "matches"), "at most 64 matches");
    }
    for (j, m) in matches.iter().enumerate() {
        if let Some(m) = parse_match(c, kind, &format!("{f}.matches[{j}]"), m) {
            rule.matches.push(m);
        }
    }
    rule.filters = parse_filters(c, kind, ns, &join(f, "filters"), r.get("filters"));
    // Gateway API: ReplacePrefixMatch only with PathPrefix matches (a match without a path is
    // the prefix `/`), so the prefix it replaces is the one that matched.
    let replaces_prefix = rule.filters.iter().any(|f| match f {
        Filter::Rewrite(Rewrite { path, .. }) | Filter::Redirect(Redirect { path, .. }) => {
            matches!(path, Some(PathModifier::ReplacePrefixMatch(_)))
        }
        _ => false,
    });
    if replaces_prefix {
        for (j, m) in rule.matches.iter().enumerate() {
            if matches!(m.path, Some(PathMatch::Exact(_) | PathMatch::Regex(_))) {
                c.err(
                    &format!("{f}.matches[{j}].path.type"),
                    "a rule with ReplacePrefixMatch takes PathPrefix matches only (Gateway API)",
                );
            }
        }
    }
    if rule
        .filters
        .iter()
        .filter(|f| matches!(f, Filter::Fault(_)))
        .count()
        > 1
    {
        c.err(
            &join(f, "filters"),
            "at most one HTTPFault ExtensionRef per rule",
        );
    }
    for (j, b) in list(
        c,
        r.get("backendRefs").unwrap_or(&Value::Null),
        &join(f, "backendRefs"),
    )
    .iter()
    .enumerate()
    {
        let bf = format!("{f}.backendRefs[{j}]");
        let Some(b) = object(
            c,
            b,
            &bf,
            &[
                "group",
                "kind",
                "name",
                "namespace",
                "port",
                "weight",
                "filters",
            ],
        ) else {
            continue;
        };
        if b.get("filters")
            .is_some_and(|v| v.as_array().is_none_or(|a| !a.is_empty()))
        {
            c.err(
                &format!("{bf}.filters"),
                "per-backend filters are not supported (put them on the rule)",
            );
        }
        let weight = int(c, b, "weight", &bf, 0..=1_000_000).unwrap_or(1) as u32;
        if let Some(backend) = backend_ref(c, ns, &bf, b) {
            rule.backends.push(BackendRef { weight, ..backend });
        }
    }
    if let Some(t) = r.get("timeouts") {
        let tf = join(f, "timeouts");
        if let Some(t) = object(c, t, &tf, &["request", "backendRequest"]) {
            rule.request_timeout = duration(c, t, "request", &tf);
            rule.backend_timeout = duration(c, t, "backendRequest", &tf);
            if let (Some(req), Some(be)) = (rule.request_timeout, rule.backend_timeout)
                && be > req
            {
                c.err(
                    &format!("{tf}.backendRequest"),
                    "must not be longer than timeouts.request",
                );
            }
        }
    }
    if let Some(rt) = r.get("retry") {
        let rf = join(f, "retry");
        if let Some(rt) = object(c, rt, &rf, &["codes", "attempts", "backoff"]) {
            let mut codes = Vec::new();
            for (k, code) in list(
                c,
                rt.get("codes").unwrap_or(&Value::Null),
                &join(&rf, "codes"),
            )
            .iter()
            .enumerate()
            {
                match code.as_u64() {
                    Some(n @ 400..=599) => codes.push(n as u16),
                    _ => c.err(
                        &format!("{rf}.codes[{k}]"),
                        format!("{code} is not an HTTP status 400–599"),
                    ),
                }
            }
            // Gateway API counts retries; Palisade's policy counts attempts, the first included.
            let retries = int(
                c,
                rt,
                "attempts",
                &rf,
                0..=u64::from(crate::call::MAX_ATTEMPTS - 1),
            )
            .unwrap_or(1) as u32;
            if retries == 0 {
                c.err(
                    &format!("{rf}.attempts"),
                    "0 is not supported (leave out `retry` for the service's own policy)",
                );
            }
            let backoff = string(c, rt, "backoff", &rf);
            let backoff = match backoff.as_deref().map(parse_gateway_duration) {
                None => Duration::from_millis(25),
                Some(Ok(d)) if d <= crate::call::MAX_BACKOFF => d,
                Some(Ok(_)) => {
                    c.err(
                        &format!("{rf}.backoff"),
                        format!("at most {:?}", crate::call::MAX_BACKOFF),
                    );
                    Duration::ZERO
                }
                Some(Err(e)) => {
                    c.err(&format!("{rf}.backoff"), e);
                    Duration::ZERO
                }
            };
            codes.sort_unstable();
            codes.dedup();
            if retries > 0 {
                rule.retry = Some(crate::call::RetryPolicy {
                    codes,
                    attempts: retries + 1,
                    backoff,
                });
            }
        }
    }
    Some(rule)
}

fn backend_ref(c: &mut Ctx<'_>, ns: &str, f: &str, b: &Map<String, Value>) -> Option<BackendRef> {
    let group = string(c, b, "group", f);
    let kind = string(c, b, "kind", f);
    if !is_service(group.as_deref(), kind.as_deref()) {
        c.err(
            f,
            "only Service backends are supported (group \"\", kind Service)",
        );
        return None;
    }
    let name = required(c, b, "name", f);
    let bns = string(c, b, "namespace", f).unwrap_or_else(|| ns.to_string());
    if bns != ns {
        // Gateway API needs a ReferenceGrant from the other namespace for this, which Palisade
        // does not read: without it a route's owner could send (rewritten) requests of every
        // caller to another namespace's service, under the callers' identities.
        c.err(
            &join(f, "namespace"),
            format!(
                "a backend in namespace {bns:?} for a route in {ns:?} is not supported (no \
                 ReferenceGrant support): backends must be in the route's namespace"
            ),
        );
        return None;
    }
    let port = int(c, b, "port", f, 1..=65535).map(|p| p as u16);
    if port.is_none() && !b.contains_key("port") {
        c.err(
            &join(f, "port"),
            "missing (a Service backend needs its port)",
        );
    }
    Some(BackendRef {
        namespace: bns,
        name: name?,
        port: port?,
        weight: 1,
    })
}

fn value_matches(c: &mut Ctx<'_>, v: Option<&Value>, f: &str, header: bool) -> Vec<ValueMatch> {
    let mut out = Vec::new();
    let items = list(c, v.unwrap_or(&Value::Null), f);
    if items.len() > 16 {
        c.err(f, "at most 16 entries");
    }
    for (k, h) in items.iter().enumerate() {
        let hf = format!("{f}[{k}]");
        let Some(h) = object(c, h, &hf, &["type", "name", "value"]) else {
            continue;
        };
        let t = one_of(c, h, "type", &hf, &["Exact", "RegularExpression"]);
        let name = required(c, h, "name", &hf);
        let value = string(c, h, "value", &hf);
        if value.is_none() {
            c.err(&join(&hf, "value"), "missing");
        }
        let regex = t.as_deref() == Some("RegularExpression");
        if regex
            && let Some(v) = &value
            && let Err(e) = check_regex(v)
        {
            c.err(&join(&hf, "value"), e);
        }
        if let (Some(name), Some(value)) = (name, value) {
            let name = if header {
                header_name(c, &join(&hf, "name"), &name)
            } else {
                name
            };
            out.push(ValueMatch { name, value, regex });
        }
    }
    out
}

fn parse_match(c: &mut Ctx<'_>, kind: RouteKind, f: &str, m: &Value) -> Option<RouteMatch> {
    let known: &[&str] = match kind {
        RouteKind::Http => &["path", "headers", "queryParams", "method"],
        RouteKind::Grpc => &["method", "headers"],
    };
    let m = object(c, m, f, known)?;
    let mut out = RouteMatch {
        headers: value_matches(c, m.get("headers"), &join(f, "headers"), true),
        ..Default::default()
    };
    match kind {
        RouteKind::Http => {
            if let Some(p) = m.get("path") {
                let pf = join(f, "path");
                if let Some(p) = object(c, p, &pf, &["type", "value"]) {
                    let t = one_of(
                        c,
                        p,
                        "type",
                        &pf,
                        &["Exact", "PathPrefix", "RegularExpression"],
                    )
                    .unwrap_or_else(|| "PathPrefix".into());
                    let v = string(c, p, "value", &pf).unwrap_or_else(|| "/".into());
                    out.path = match t.as_str() {
                        "RegularExpression" => match check_regex(&v) {
                            Ok(()) => Some(PathMatch::Regex(v)),
                            Err(e) => {
                                c.err(&join(&pf, "value"), e);
                                None
                            }
                        },
                        _ if !v.starts_with('/') => {
                            c.err(&join(&pf, "value"), format!("{v:?} must start with /"));
                            None
                        }
                        "Exact" => Some(PathMatch::Exact(v)),
                        // A prefix matches whole segments: `/v2` and `/v2/` are the same
                        // prefix (Gateway API), kept without the trailing slash.
                        _ => {
                            let trimmed = v.trim_end_matches('/');
                            Some(PathMatch::Prefix(if trimmed.is_empty() {
                                "/".into()
                            } else {
                                trimmed.into()
                            }))
                        }
                    };
                }
            }
            out.query_params =
                value_matches(c, m.get("queryParams"), &join(f, "queryParams"), false);
            out.method = one_of(c, m, "method", f, METHODS);
        }
        RouteKind::Grpc => {
            if let Some(gm) = m.get("method") {
                let mf = join(f, "method");
                if let Some(gm) = object(c, gm, &mf, &["type", "service", "method"]) {
                    let regex = one_of(c, gm, "type", &mf, &["Exact", "RegularExpression"])
                        .as_deref()
                        == Some("RegularExpression");
                    let service = string(c, gm, "service", &mf);
                    let method = string(c, gm, "method", &mf);
                    if service.is_none() && method.is_none() {
                        c.err(&mf, "needs a service, a method or both");
                    }
                    for (key, v) in [("service", &service), ("method", &method)] {
                        if let Some(v) = v {
                            let bad = if regex {
                                check_regex(v).err()
                            } else if v.contains('/') || v.is_empty() {
                                Some(format!("{v:?} is not a gRPC {key} name"))
                            } else {
                                None
                            };
                            if let Some(e) = bad {
                                c.err(&join(&mf, key), e);
                            }
                        }
                    }
                    out.grpc = Some(GrpcMethodMatch {
                        service,
                        method,
                        regex,
                    });
                }
            }
        }
    }
    Some(out)
}

const HTTP_FILTERS: &[&str] = &[
    "RequestHeaderModifier",
    "ResponseHeaderModifier",
    "RequestMirror",
    "RequestRedirect",
    "URLRewrite",
    "ExtensionRef",
];
const GRPC_FILTERS: &[&str] = &[
    "RequestHeaderModifier",
    "ResponseHeaderModifier",
    "RequestMirror",
    "ExtensionRef",
];

fn parse_filters(
    c: &mut Ctx<'_>,
    kind: RouteKind,
    ns: &str,
    f: &str,
    v: Option<&Value>,
) -> Vec<Filter> {
    let allowed = match kind {
        RouteKind::Http => HTTP_FILTERS,
        RouteKind::Grpc => GRPC_FILTERS,
    };
    let mut out = Vec::new();
    for (i, flt) in list(c, v.unwrap_or(&Value::Null), f).iter().enumerate() {
        let ff = format!("{f}[{i}]");
        let Some(m) = flt.as_object() else {
            c.err(&ff, format!("expected a mapping, found {}", kind_of(flt)));
            continue;
        };
        let Some(t) = one_of(c, m, "type", &ff, allowed) else {
            if !m.contains_key("type") {
                c.err(&join(&ff, "type"), "missing");
            }
            continue;
        };
        // The settings live in the field named after the type, in lower camel case.
        let field = match t.as_str() {
            "URLRewrite" => "urlRewrite".to_string(),
            t => format!("{}{}", t[..1].to_ascii_lowercase(), &t[1..]),
        };
        let Some(body) = m.get(&field) else {
            c.err(&join(&ff, &field), format!("missing (type {t})"));
            continue;
        };
        for k in m.keys() {
            if k != "type" && *k != field {
                c.err(&join(&ff, k), format!("does not go with type {t}"));
            }
        }
        let bf = join(&ff, &field);
        let filter = match t.as_str() {
            "RequestHeaderModifier" => header_modifier(c, &bf, body).map(Filter::RequestHeaders),
            "ResponseHeaderModifier" => header_modifier(c, &bf, body).map(Filter::ResponseHeaders),
            "RequestRedirect" => redirect(c, &bf, body).map(Filter::Redirect),
            "URLRewrite" => rewrite(c, &bf, body).map(Filter::Rewrite),
            "RequestMirror" => mirror(c, ns, &bf, body).map(Filter::Mirror),
            _ => extension(c, &bf, body).map(Filter::Fault),
        };
        out.extend(filter);
    }
    let redirects = out
        .iter()
        .filter(|f| matches!(f, Filter::Redirect(_)))
        .count();
    let rewrites = out
        .iter()
        .filter(|f| matches!(f, Filter::Rewrite(_)))
        .count();
    if redirects > 1 || rewrites > 1 || (redirects > 0 && rewrites > 0) {
        c.err(
            f,
            "at most one RequestRedirect or URLRewrite per rule, not both (Gateway API)",
        );
    }
    out
}

fn header_modifier(c: &mut Ctx<'_>, f: &str, v: &Value) -> Option<HeaderModifier> {
    let m = object(c, v, f, &["set", "add", "remove"])?;
    let mut out = HeaderModifier::default();
    for (key, dst) in [("set", &mut out.set), ("add", &mut out.add)] {
        let lf = join(f, key);
        for (i, h) in list(c, m.get(key).unwrap_or(&Value::Null), &lf)
            .iter()
            .enumerate()
        {
            let hf = format!("{lf}[{i}]");
            let Some(h) = object(c, h, &hf, &["name", "value"]) else {
                continue;
            };
            let name = required(c, h, "name", &hf);
            let value = string(c, h, "value", &hf).unwrap_or_default();
            if http::HeaderValue::from_str(&value).is_err() {
                c.err(&join(&hf, "value"), "not a valid header value");
            }
            if let Some(name) = name {
                let name = header_name(c, &join(&hf, "name"), &name);
                dst.push((name, value));
            }
        }
    }
    let rf = join(f, "remove");
    for (i, h) in list(c, m.get("remove").unwrap_or(&Value::Null), &rf)
        .iter()
        .enumerate()
    {
        match h.as_str() {
            Some(h) => {
                let name = header_name(c, &format!("{rf}[{i}]"), h);
                out.remove.push(name);
            }
            None => c.err(&format!("{rf}[{i}]"), "expected a string"),
        }
    }
    Some(out)
}

fn path_modifier(c: &mut Ctx<'_>, f: &str, v: &Value) -> Option<PathModifier> {
    let m = object(c, v, f, &["type", "replaceFullPath", "replacePrefixMatch"])?;
    let t = one_of(c, m, "type", f, &["ReplaceFullPath", "ReplacePrefixMatch"]);
    let (key, make): (&str, fn(String) -> PathModifier) = match t.as_deref() {
        Some("ReplaceFullPath") => ("replaceFullPath", PathModifier::ReplaceFullPath),
        Some(_) => ("replacePrefixMatch", PathModifier::ReplacePrefixMatch),
        None => {
            if !m.contains_key("type") {
                c.err(&join(f, "type"), "missing");
            }
            return None;
        }
    };
    let value = required(c, m, key, f)?;
    if !value.starts_with('/') {
        c.err(&join(f, key), format!("{value:?} must start with /"));
        return None;
    }
    Some(make(value))
}

fn redirect(c: &mut Ctx<'_>, f: &str, v: &Value) -> Option<Redirect> {
    let m = object(
        c,
        v,
        f,
        &["scheme", "hostname", "path", "port", "statusCode"],
    )?;
    let scheme = one_of(c, m, "scheme", f, &["http", "https"]);
    let hostname = string(c, m, "hostname", f);
    if let Some(h) = &hostname
        && (h.starts_with("*.") || !valid_hostname(h))
    {
        c.err(&join(f, "hostname"), format!("{h:?} is not a hostname"));
    }
    let path = m
        .get("path")
        .and_then(|p| path_modifier(c, &join(f, "path"), p));
    let port = int(c, m, "port", f, 1..=65535).map(|p| p as u16);
    let status = match int(c, m, "statusCode", f, 0..=999) {
        None => 302,
        Some(s @ (301 | 302 | 303 | 307 | 308)) => s as u16,
        Some(s) => {
            c.err(
                &join(f, "statusCode"),
                format!("{s} is not one of 301, 302, 303, 307, 308"),
            );
            302
        }
    };
    Some(Redirect {
        scheme,
        hostname,
        path,
        port,
        status,
    })
}

fn rewrite(c: &mut Ctx<'_>, f: &str, v: &Value) -> Option<Rewrite> {
    let m = object(c, v, f, &["hostname", "path"])?;
    let hostname = string(c, m, "hostname", f);
    if let Some(h) = &hostname
        && (h.starts_with("*.") || !valid_hostname(h))
    {
        c.err(&join(f, "hostname"), format!("{h:?} is not a hostname"));
    }
    let path = m
        .get("path")
        .and_then(|p| path_modifier(c, &join(f, "path"), p));
    Some(Rewrite { hostname, path })
}

fn mirror(c: &mut Ctx<'_>, ns: &str, f: &str, v: &Value) -> Option<Mirror> {
    let m = object(c, v, f, &["backendRef", "percent", "fraction"])?;
    if m.contains_key("fraction") {
        c.err(&join(f, "fraction"), "not supported (use percent)");
    }
    let percent = int(c, m, "percent", f, 0..=100).unwrap_or(100) as u32;
    let Some(b) = m.get("backendRef") else {
        c.err(&join(f, "backendRef"), "missing");
        return None;
    };
    let bf = join(f, "backendRef");
    let b = object(c, b, &bf, &["group", "kind", "name", "namespace", "port"])?;
    let backend = backend_ref(c, ns, &bf, b)?;
    Some(Mirror { backend, percent })
}

fn extension(c: &mut Ctx<'_>, f: &str, v: &Value) -> Option<String> {
    let m = object(c, v, f, &["group", "kind", "name"])?;
    let group = string(c, m, "group", f);
    let kind = string(c, m, "kind", f);
    let name = required(c, m, "name", f);
    if group.as_deref() != Some("palisade.dev") || kind.as_deref() != Some("HTTPFault") {
        c.err(
            f,
            "the only extension filter is group palisade.dev, kind HTTPFault",
        );
        return None;
    }
    name
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::policy::{Resource, parse_str};

    fn route(spec: &str) -> Result<Route, Vec<String>> {
        let text = format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{ name: r, namespace: demo }}\nspec:\n{spec}"
        );
        match parse_str(Path::new("r.yaml"), &text) {
            Ok(mut v) => match v.remove(0) {
                Resource::Route(r) => Ok(r),
                other => panic!("not a route: {other:?}"),
            },
            Err(e) => Err(e.into_iter().map(|e| e.field).collect()),
        }
    }

    const PARENT: &str = "  parentRefs: [ { kind: Service, name: api, port: 8080 } ]\n";

    #[test]
    fn a_full_route_reads_as_typed_rules() {
        let r = route(&format!(
            "{PARENT}  hostnames: [ API.demo, \"*.example.com\" ]\n  rules:\n    - name: canary\n      matches: [ {{ path: {{ value: /v2/ }}, method: GET, headers: [ {{ name: X-Canary, value: \"1\" }} ], queryParams: [ {{ type: RegularExpression, name: v, value: \"[0-9]+\" }} ] }} ]\n      filters:\n        - {{ type: RequestHeaderModifier, requestHeaderModifier: {{ set: [ {{ name: X-A, value: b }} ], remove: [ X-B ] }} }}\n        - {{ type: RequestMirror, requestMirror: {{ backendRef: {{ name: shadow, port: 8080 }}, percent: 10 }} }}\n      backendRefs: [ {{ name: api-v2, port: 8080, weight: 90 }}, {{ name: api, port: 8080, weight: 10 }} ]\n      timeouts: {{ request: 1m30s, backendRequest: 500ms }}\n      retry: {{ codes: [503], attempts: 2, backoff: 50ms }}\n"
        ))
        .unwrap();
        assert_eq!(r.qualified_name(), "demo/r");
        assert_eq!(r.hostnames, ["api.demo", "*.example.com"]);
        assert!(r.attaches_to("api", "demo", 8080) && !r.attaches_to("api", "demo", 9090));
        let rule = &r.rules[0];
        assert_eq!(rule.name, "canary");
        assert_eq!(rule.matches[0].path, Some(PathMatch::Prefix("/v2".into())));
        assert_eq!(rule.matches[0].headers[0].name, "x-canary");
        assert!(rule.matches[0].query_params[0].regex);
        assert_eq!(rule.backends.len(), 2);
        assert_eq!(rule.backends[0].weight, 90);
        assert_eq!(rule.request_timeout, Some(Duration::from_secs(90)));
        assert_eq!(rule.backend_timeout, Some(Duration::from_millis(500)));
        let retry = rule.retry.as_ref().unwrap();
        assert_eq!((retry.attempts, retry.codes.as_slice()), (3, &[503u16][..]));
        assert!(
            matches!(&rule.filters[1], Filter::Mirror(m) if m.percent == 10 && m.backend.name == "shadow")
        );
        // No rules: one that sends everything to the parent.
        let all = route(PARENT).unwrap();
        assert_eq!(all.rules.len(), 1);
        assert!(all.rules[0].matches.is_empty() && all.rules[0].backends.is_empty());
    }

    #[test]
    fn every_problem_is_named_by_its_field() {
        let errs = route(&format!(
            "{PARENT}  rules:\n    - matchs: []\n      matches: [ {{ path: {{ type: RegularExpression, value: \"(\" }}, method: FETCH }} ]\n      filters: [ {{ type: Teleport }}, {{ type: URLRewrite }}, {{ type: RequestRedirect, requestRedirect: {{ statusCode: 304 }} }} ]\n      backendRefs: [ {{ name: v2, weight: -1 }}, {{ kind: Bucket, name: b, port: 1 }} ]\n      timeouts: {{ request: 1s, backendRequest: 2s }}\n      retry: {{ codes: [200], attempts: 99, backoff: soon }}\n"
        ))
        .unwrap_err();
        for f in [
            "spec.rules[0].matchs",
            "spec.rules[0].matches[0].path.value",
            "spec.rules[0].matches[0].method",
            "spec.rules[0].filters[0].type",
            "spec.rules[0].filters[1].urlRewrite",
            "spec.rules[0].filters[2].requestRedirect.statusCode",
            "spec.rules[0].backendRefs[0].weight",
            "spec.rules[0].backendRefs[0].port",
            "spec.rules[0].backendRefs[1]",
            "spec.rules[0].timeouts.backendRequest",
            "spec.rules[0].retry.codes[0]",
            "spec.rules[0].retry.attempts",
            "spec.rules[0].retry.backoff",
        ] {
            assert!(errs.iter().any(|e| e == f), "{f} not in {errs:?}");
        }
        assert_eq!(route("  rules: []\n").unwrap_err(), ["spec.parentRefs"]);
    }

    #[test]
    fn what_would_fail_open_or_break_proxies_is_refused() {
        let rule = |r: &str| route(&format!("{PARENT}  rules:\n{r}"));
        let field = |r: &str| rule(r).unwrap_err();
        // A backend or a mirror in another namespace (no ReferenceGrant).
        assert_eq!(
            field("    - backendRefs: [ { name: ledger, namespace: prod, port: 80 } ]\n"),
            ["spec.rules[0].backendRefs[0].namespace"]
        );
        assert_eq!(
            field(
                "    - filters: [ { type: RequestMirror, requestMirror: { backendRef: { name: l, namespace: prod, port: 80 } } } ]\n"
            ),
            ["spec.rules[0].filters[0].requestMirror.backendRef.namespace"]
        );
        // ReplacePrefixMatch with an Exact match; a rule without matches is the prefix `/`.
        assert_eq!(
            field(
                "    - matches: [ { path: { type: Exact, value: /a } } ]\n      filters: [ { type: URLRewrite, urlRewrite: { path: { type: ReplacePrefixMatch, replacePrefixMatch: /b } } } ]\n"
            ),
            ["spec.rules[0].matches[0].path.type"]
        );
        assert!(rule("    - filters: [ { type: URLRewrite, urlRewrite: { path: { type: ReplacePrefixMatch, replacePrefixMatch: /b } } } ]\n").is_ok());
        // Rule names: one label each, no `/`.
        assert_eq!(
            field(
                "    - { name: \"1\", matches: [ { path: { value: /admin } } ] }\n    - { matches: [ { path: { value: /public } } ] }\n"
            ),
            ["spec.rules[1].name"]
        );
        assert_eq!(field("    - { name: a/b }\n"), ["spec.rules[0].name"]);
        // A regex that compiles alone but not anchored, as every proxy compiles it.
        assert_eq!(
            field("    - matches: [ { path: { type: RegularExpression, value: \"(?x)a#\" } } ]\n"),
            ["spec.rules[0].matches[0].path.value"]
        );
        // Too many regular expressions for one route.
        let many: String = (0..33)
            .map(|i| format!("    - matches: [ {{ path: {{ type: RegularExpression, value: \"/r{i}/.*\" }} }} ]\n"))
            .collect();
        assert_eq!(field(&many), ["spec.rules"]);
        assert_eq!(
            field(
                "    - filters:\n        - { type: ExtensionRef, extensionRef: { group: palisade.dev, kind: HTTPFault, name: a } }\n        - { type: ExtensionRef, extensionRef: { group: palisade.dev, kind: HTTPFault, name: b } }\n"
            ),
            ["spec.rules[0].filters"]
        );
        assert_eq!(
            field("    - retry: { attempts: 0 }\n"),
            ["spec.rules[0].retry.attempts"]
        );
    }

    #[test]
    fn authorization_by_route_only_allows() {
        let policy = |action: &str, op: &str| {
            parse_str(
                Path::new("p.yaml"),
                &format!("apiVersion: palisade.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{ name: p, namespace: demo }}\nspec:\n  action: {action}\n  rules: [ {{ to: [ {{ operation: {{ {op} }} }} ] }} ]\n"),
            )
            .map_err(|e| e.into_iter().map(|e| e.field).collect::<Vec<_>>())
        };
        assert!(policy("ALLOW", "routes: [demo/api/public]").is_ok());
        assert!(policy("AUDIT", "routes: [demo/api]").is_ok());
        assert_eq!(
            policy("DENY", "routes: [demo/api/admin]").unwrap_err(),
            ["spec.rules[0].to[0].operation.routes"]
        );
        assert_eq!(
            policy("ALLOW", "notRoutes: [demo/api/admin]").unwrap_err(),
            ["spec.rules[0].to[0].operation.notRoutes"]
        );
    }

    #[test]
    fn trace_annotations_give_the_route_its_policy_and_a_bad_one_is_refused() {
        let parse = |kind: &str, annotations: &str| {
            let text = format!(
                "apiVersion: gateway.networking.k8s.io/v1\nkind: {kind}\nmetadata:\n  name: r\n  namespace: demo\n  annotations: {{ {annotations} }}\nspec:\n{PARENT}"
            );
            match parse_str(Path::new("r.yaml"), &text) {
                Ok(mut v) => match v.remove(0) {
                    Resource::Route(r) => Ok(r),
                    other => panic!("not a route: {other:?}"),
                },
                Err(e) => Err(e
                    .into_iter()
                    .map(|e| format!("{}: {}", e.field, e.message))
                    .collect::<Vec<_>>()),
            }
        };
        for kind in ["HTTPRoute", "GRPCRoute"] {
            let r = parse(
                kind,
                "trace.palisade.dev/span-budget: \"50\", trace.palisade.dev/slow: 500ms, team: payments",
            )
            .unwrap_or_else(|e| panic!("{kind}: {e:?}"));
            assert_eq!(
                r.trace,
                crate::trace::TracePolicy {
                    span_budget: Some(50),
                    slow: Some(Duration::from_millis(500)),
                },
                "{kind}"
            );
            let wire = super::super::wire::wire_route(&r, &Default::default());
            let t = wire.trace.expect("sent");
            assert_eq!((t.span_budget_per_second, t.slow_ms), (50, 500));
        }
        // One field alone; none: nothing on the wire.
        let r = parse("HTTPRoute", "trace.palisade.dev/slow: 2s").unwrap();
        assert_eq!(r.trace.span_budget, None);
        assert_eq!(r.trace.slow, Some(Duration::from_secs(2)));
        let r = parse("HTTPRoute", "team: payments").unwrap();
        assert!(r.trace.is_empty());
        assert_eq!(
            super::super::wire::wire_route(&r, &Default::default()).trace,
            None
        );
        for (annotation, field) in [
            (
                "trace.palisade.dev/span-budget: \"0\"",
                "metadata.annotations.trace.palisade.dev/span-budget",
            ),
            (
                "trace.palisade.dev/span-budget: \"2000000\"",
                "metadata.annotations.trace.palisade.dev/span-budget",
            ),
            (
                "trace.palisade.dev/span-budget: many",
                "metadata.annotations.trace.palisade.dev/span-budget",
            ),
            (
                "trace.palisade.dev/slow: soon",
                "metadata.annotations.trace.palisade.dev/slow",
            ),
            (
                "trace.palisade.dev/slow: 0s",
                "metadata.annotations.trace.palisade.dev/slow",
            ),
            (
                "trace.palisade.dev/slow-request: 1s",
                "metadata.annotations.trace.palisade.dev/slow-request",
            ),
        ] {
            let errs = parse("HTTPRoute", annotation).expect_err(annotation);
            assert_eq!(errs.len(), 1, "{annotation}: {errs:?}");
            assert!(
                errs[0].starts_with(&format!("{field}: ")),
                "{annotation}: {errs:?}"
            );
        }
    }

    #[test]
    fn gateway_durations_follow_gep_2257() {
        for (s, d) in [
            ("10s", 10_000),
            ("500ms", 500),
            ("1h30m", 5_400_000),
            ("1m1s1ms", 61_001),
        ] {
            assert_eq!(
                parse_gateway_duration(s),
                Ok(Duration::from_millis(d)),
                "{s}"
            );
        }
        for bad in ["", "10", "1.5s", "123456s", "1h1h1h1h1h", "-1s", "1d"] {
            assert!(parse_gateway_duration(bad).is_err(), "{bad}");
        }
    }
}
