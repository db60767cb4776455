//! Policy resources, Kubernetes-shaped (apiVersion, kind, metadata, spec) with Istio's field
//! names, so the Kubernetes source can derive CRDs from them and Istio users can bring their
//! policies: `AuthorizationPolicy` and `PeerAuthentication` in `palisade.dev/v1alpha1`
//! (`security.istio.io/v1` and `v1beta1` are accepted unchanged).
//!
//! Parsing is strict: unknown fields, unknown `when` keys, malformed CIDRs or ports,
//! misplaced wildcards, and principals or namespaces that can never match a caller (not a
//! valid SPIFFE ID, or the beginning or end of one) are errors naming the file, the document
//! index and the field path. A typo in a DENY policy must never silently become "allow".

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use palisade_certs::SpiffeId;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub mod egress;
pub mod route;
#[cfg(feature = "schema")]
pub mod schema;
pub mod traffic;
mod wire;

pub use crate::MtlsMode;
pub use egress::EgressPolicy;
pub use route::{Route, RouteKind};
pub use traffic::{HttpFault, RateLimitPolicy};

pub const API_VERSION: &str = "palisade.dev/v1alpha1";
const ISTIO_VERSIONS: &[&str] = &["security.istio.io/v1", "security.istio.io/v1beta1"];
/// Policies in this namespace apply to every workload of the mesh (Istio's root namespace).
pub const ROOT_NAMESPACE: &str = "palisade-system";
/// The namespace of a resource that names none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// What the mesh does for a workload that no ALLOW policy selects.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DefaultPolicy {
    #[default]
    Allow,
    Deny,
    /// Allow any caller with a valid mesh identity (mTLS), deny the rest.
    Authenticated,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectMeta {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl ObjectMeta {
    pub fn namespace(&self) -> &str {
        self.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE)
    }
}

/// Which workloads of the policy's namespace it applies to: those with all these labels.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    /// Labels a workload must all have.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

impl WorkloadSelector {
    pub(crate) fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// What a matching rule does: ALLOW (the default), DENY, or AUDIT (log only).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    #[default]
    Allow,
    Deny,
    Audit,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicy {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: AuthorizationPolicySpec,
}

/// Who may call the selected workloads, with Istio's semantics: any matching DENY denies; no
/// ALLOW policy selecting a workload means the mesh's default policy; else a matching ALLOW
/// rule allows and nothing else does.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    /// Absent: every workload of the policy's namespace (every workload of the mesh in the
    /// root namespace, palisade-system).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub action: Action,
    /// Absent: the policy matches nothing (an ALLOW policy without rules allows nothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<Vec<Rule>>,
}

/// Matches a request when one `from` source, one `to` operation and every `when` condition
/// match (an absent list matches anything; `{}` matches every request).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<RuleFrom>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<RuleTo>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<Condition>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleFrom {
    pub source: Source,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleTo {
    pub operation: Operation,
}

/// Who calls. Patterns: exact, `prefix*`, `*suffix` or `*`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "schema", schemars(transform = schema::not_empty))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "schema", schemars(inner(pattern(schema::PRINCIPAL), length(max = schema::MAX_ID_PATTERN_LEN))))]
    pub principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "schema", schemars(inner(pattern(schema::PRINCIPAL), length(max = schema::MAX_ID_PATTERN_LEN))))]
    pub not_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "schema", schemars(inner(pattern(schema::NAMESPACE), length(max = schema::MAX_ID_PATTERN_LEN))))]
    pub namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "schema", schemars(inner(pattern(schema::NAMESPACE), length(max = schema::MAX_ID_PATTERN_LEN))))]
    pub not_namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "schema", schemars(inner(pattern(schema::IP_BLOCK))))]
    pub ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "schema", schemars(inner(pattern(schema::IP_BLOCK))))]
    pub not_ip_blocks: Vec<String>,
}

/// What is called. Patterns: exact, `prefix*`, `*suffix` or `*`; ports are strings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "schema", schemars(transform = schema::not_empty))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "schema", schemars(inner(pattern(schema::WILDCARD))))]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "schema", schemars(inner(pattern(schema::WILDCARD))))]
    pub not_hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "schema", schemars(inner(pattern(schema::PORT))))]
    pub ports: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "schema", schemars(inner(pattern(schema::PORT))))]
    pub not_ports: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "schema", schemars(inner(pattern(schema::WILDCARD))))]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "schema", schemars(inner(pattern(schema::WILDCARD))))]
    pub not_methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "schema", schemars(inner(pattern(schema::WILDCARD))))]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "schema", schemars(inner(pattern(schema::WILDCARD))))]
    pub not_paths: Vec<String>,
    /// Palisade's addition: the route (`namespace/name` of an HTTPRoute or GRPCRoute, or
    /// `namespace/name/rule`) the receiving proxy matched the request to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "schema", schemars(inner(pattern(schema::WILDCARD))))]
    pub routes: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "schema", schemars(inner(pattern(schema::WILDCARD))))]
    pub not_routes: Vec<String>,
}

impl Operation {
    /// Fields that only exist for HTTP (Istio's TCP handling depends on them).
    pub fn has_http_fields(&self) -> bool {
        !(self.hosts.is_empty()
            && self.not_hosts.is_empty()
            && self.methods.is_empty()
            && self.not_methods.is_empty()
            && self.paths.is_empty()
            && self.not_paths.is_empty()
            && self.routes.is_empty()
            && self.not_routes.is_empty())
    }
}

/// A condition on the request: `key` is `request.headers[NAME]`, `source.ip`,
/// `source.namespace`, `source.principal` or `destination.port`; it matches when the value
/// matches one of `values` (if given) and none of `notValues`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "schema", schemars(transform = schema::condition))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    #[cfg_attr(feature = "schema", schemars(pattern(schema::CONDITION_KEY)))]
    pub key: String,
    /// Patterns: exact, `prefix*`, `*suffix` or `*` (for `source.principal`, principal
    /// patterns, which may start with `spiffe://`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_values: Vec<String>,
}

/// The `when` keys we understand. Others are errors, not ignored.
pub const CONDITION_KEYS: &[&str] = &[
    "request.headers[<name>]",
    "source.ip",
    "source.namespace",
    "source.principal",
    "destination.port",
];

impl Condition {
    /// The header name of a `request.headers[NAME]` key.
    pub fn header_name(&self) -> Option<&str> {
        header_key(&self.key)
    }
}

/// The header name inside a `request.headers[NAME]` condition key, shared by validation and
/// evaluation so both read the key the same way.
fn header_key(key: &str) -> Option<&str> {
    key.strip_prefix("request.headers[")
        .and_then(|r| r.strip_suffix(']'))
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mtls {
    #[serde(default)]
    pub mode: MtlsMode,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthentication {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PeerAuthenticationSpec,
}

/// The mTLS mode of the selected workloads' inbound side: per namespace (no selector), per
/// workload (selector), per port (`portLevelMtls`, with a selector). Without any: STRICT.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "schema", schemars(transform = schema::peer_authentication_spec))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationSpec {
    /// Absent: every workload of the namespace (of the mesh, in palisade-system).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<Mtls>,
    /// Keyed by port number (a string in YAML, as in Istio).
    #[cfg_attr(feature = "schema", schemars(transform = schema::port_level_mtls))]
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub port_level_mtls: BTreeMap<u32, Mtls>,
}

/// One document of the policies directory: authorization, mTLS, routing, faults, rate limits,
/// egress.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resource {
    AuthorizationPolicy(AuthorizationPolicy),
    PeerAuthentication(PeerAuthentication),
    /// `HTTPRoute` or `GRPCRoute` (Gateway API, a Service as parent).
    Route(Route),
    HttpFault(HttpFault),
    RateLimitPolicy(RateLimitPolicy),
    EgressPolicy(EgressPolicy),
}

impl Resource {
    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Resource::AuthorizationPolicy(p) => &p.metadata,
            Resource::PeerAuthentication(p) => &p.metadata,
            Resource::Route(r) => &r.metadata,
            Resource::HttpFault(f) => &f.metadata,
            Resource::RateLimitPolicy(r) => &r.metadata,
            Resource::EgressPolicy(e) => &e.metadata,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Resource::AuthorizationPolicy(_) => "AuthorizationPolicy",
            Resource::PeerAuthentication(_) => "PeerAuthentication",
            Resource::Route(r) => r.kind.kind(),
            Resource::HttpFault(_) => "HTTPFault",
            Resource::RateLimitPolicy(_) => "RateLimitPolicy",
            Resource::EgressPolicy(_) => "EgressPolicy",
        }
    }
}

fn selects(
    meta: &ObjectMeta,
    selector: Option<&WorkloadSelector>,
    ns: &str,
    labels: &BTreeMap<String, String>,
    root_ns: &str,
) -> bool {
    let pns = meta.namespace();
    (pns == root_ns || pns == ns) && selector.is_none_or(|s| s.matches(labels))
}

impl AuthorizationPolicy {
    /// Whether this policy applies to a workload: same namespace (or the root namespace) and
    /// a selector whose labels the workload has (no selector: every workload in scope).
    pub fn selects(&self, ns: &str, labels: &BTreeMap<String, String>, root_ns: &str) -> bool {
        selects(
            &self.metadata,
            self.spec.selector.as_ref(),
            ns,
            labels,
            root_ns,
        )
    }

    /// `namespace/name`, how metrics and logs name the policy.
    pub fn qualified_name(&self) -> String {
        format!("{}/{}", self.metadata.namespace(), self.metadata.name)
    }
}

impl AuthorizationPolicy {
    /// Every principal pattern of the policy with the field that holds it: `principals`,
    /// `notPrincipals`, and the values and notValues of `source.principal` conditions.
    pub fn principal_patterns(&self) -> Vec<(String, &str)> {
        let mut out = Vec::new();
        for (i, rule) in self.spec.rules.iter().flatten().enumerate() {
            for (j, from) in rule.from.iter().enumerate() {
                let s = &from.source;
                for (field, values) in [
                    ("principals", &s.principals),
                    ("notPrincipals", &s.not_principals),
                ] {
                    for (k, v) in values.iter().enumerate() {
                        out.push((
                            format!("spec.rules[{i}].from[{j}].source.{field}[{k}]"),
                            v.as_str(),
                        ));
                    }
                }
            }
            for (j, w) in rule.when.iter().enumerate() {
                if w.key != "source.principal" {
                    continue;
                }
                for (field, values) in [("values", &w.values), ("notValues", &w.not_values)] {
                    for (k, v) in values.iter().enumerate() {
                        out.push((
                            format!("spec.rules[{i}].when[{j}].{field}[{k}]"),
                            v.as_str(),
                        ));
                    }
                }
            }
        }
        out
    }

    /// The principal patterns that cannot match any identity of `trust_domain` (the mesh's):
    /// principals of another trust domain, legal (Istio allows them) but often a mistake.
    pub fn foreign_principals(&self, trust_domain: &str) -> Vec<(String, &str)> {
        self.principal_patterns()
            .into_iter()
            .filter(|(_, p)| !principal_in_trust_domain(p, trust_domain))
            .collect()
    }
}

/// Whether a principal pattern can match an identity of `trust_domain`. A `*suffix` pattern
/// fixes no trust domain, so it can.
pub fn principal_in_trust_domain(pattern: &str, trust_domain: &str) -> bool {
    let p = pattern.strip_prefix(SCHEME).unwrap_or(pattern);
    let td = format!("{trust_domain}/");
    match split_pattern(p) {
        Ok(Pattern::Any | Pattern::Suffix(_)) => true,
        Ok(Pattern::Prefix(fixed)) => td.starts_with(fixed) || fixed.starts_with(&td),
        Ok(Pattern::Exact(id)) => id.starts_with(&td),
        // Invalid patterns are reported by validation, not here.
        Err(_) => true,
    }
}

impl PeerAuthentication {
    pub fn selects(&self, ns: &str, labels: &BTreeMap<String, String>, root_ns: &str) -> bool {
        selects(
            &self.metadata,
            self.spec.selector.as_ref(),
            ns,
            labels,
            root_ns,
        )
    }
}

/// The mTLS mode of a workload, and its per-port overrides.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MtlsSettings {
    pub mode: MtlsMode,
    pub port_modes: BTreeMap<u32, MtlsMode>,
    /// The PeerAuthentication (`namespace/name`) that set `mode`; None: the mesh default
    /// (STRICT, no PeerAuthentication says otherwise).
    pub source: Option<String>,
    /// The PeerAuthentication that set each of `port_modes`.
    pub port_sources: BTreeMap<u32, String>,
}

impl MtlsSettings {
    /// The mode for the workload's `port` (a `portLevelMtls` entry, else the workload's).
    pub fn mode_for(&self, port: u32) -> MtlsMode {
        self.port_modes.get(&port).copied().unwrap_or(self.mode)
    }

    /// Where the mode for `port` came from: `PeerAuthentication ns/name`, or `mesh default`.
    pub fn source_for(&self, port: u32) -> String {
        match self
            .port_sources
            .get(&port)
            .filter(|_| self.port_modes.contains_key(&port))
            .or(self.source.as_ref())
        {
            Some(name) => format!("PeerAuthentication {name}"),
            None => "mesh default".to_string(),
        }
    }
}

/// Istio's precedence: a workload-selector policy beats a namespace policy, which beats the
/// root-namespace (mesh) policy; UNSET inherits from the level above; nothing at all: STRICT.
pub fn effective_mtls(
    peer_auths: &[PeerAuthentication],
    ns: &str,
    labels: &BTreeMap<String, String>,
) -> MtlsSettings {
    let pick = |level: u8| {
        let mut v: Vec<&PeerAuthentication> = peer_auths
            .iter()
            .filter(|p| {
                let pns = p.metadata.namespace();
                match level {
                    0 => pns == ROOT_NAMESPACE && p.spec.selector.is_none(),
                    1 => pns == ns && pns != ROOT_NAMESPACE && p.spec.selector.is_none(),
                    _ => pns == ns && p.spec.selector.as_ref().is_some_and(|s| s.matches(labels)),
                }
            })
            .collect();
        // Deterministic when several apply: the oldest name wins, as Istio picks the oldest.
        v.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        v.first().copied()
    };
    let mut settings = MtlsSettings {
        mode: MtlsMode::Strict,
        port_modes: BTreeMap::new(),
        source: None,
        port_sources: BTreeMap::new(),
    };
    for level in 0..3 {
        if let Some(p) = pick(level) {
            let name = || format!("{}/{}", p.metadata.namespace(), p.metadata.name);
            if let Some(m) = &p.spec.mtls
                && m.mode != MtlsMode::Unset
            {
                settings.mode = m.mode;
                settings.source = Some(name());
            }
            // Port-level settings only make sense with a workload selector (Istio).
            if level == 2 {
                for (port, m) in &p.spec.port_level_mtls {
                    if m.mode != MtlsMode::Unset {
                        settings.port_modes.insert(*port, m.mode);
                        settings.port_sources.insert(*port, name());
                    }
                }
            }
        }
    }
    settings
}

/// A parse or validation error, naming where it is.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}: document {document}: {field}: {message}", file.display())]
pub struct PolicyError {
    pub file: PathBuf,
    pub document: usize,
    pub field: String,
    pub message: String,
}

/// A resource and where it came from.
#[derive(Clone, Debug)]
pub struct Loaded {
    pub file: PathBuf,
    pub index: usize,
    pub resource: Resource,
}

struct Ctx<'a> {
    file: &'a Path,
    document: usize,
    errors: Vec<PolicyError>,
}

impl Ctx<'_> {
    fn err(&mut self, field: &str, message: impl Into<String>) {
        self.errors.push(PolicyError {
            file: self.file.to_path_buf(),
            document: self.document,
            field: if field.is_empty() {
                "(document)".into()
            } else {
                field.to_string()
            },
            message: message.into(),
        });
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Checks an object's keys against the allowed ones; returns its map if it is an object.
fn object<'v>(
    c: &mut Ctx<'_>,
    v: &'v Value,
    path: &str,
    allowed: &[&str],
) -> Option<&'v serde_json::Map<String, Value>> {
    let Some(map) = v.as_object() else {
        c.err(path, format!("expected a mapping, found {}", kind_of(v)));
        return None;
    };
    for k in map.keys() {
        if !allowed.contains(&k.as_str()) {
            c.err(
                &join(path, k),
                format!("unknown field; expected one of: {}", allowed.join(", ")),
            );
        }
    }
    Some(map)
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

fn list<'v>(c: &mut Ctx<'_>, v: &'v Value, path: &str) -> &'v [Value] {
    match v {
        Value::Array(a) => a,
        Value::Null => &[],
        other => {
            c.err(path, format!("expected a list, found {}", kind_of(other)));
            &[]
        }
    }
}

/// A string pattern read as the proxy reads it: the fixed part without its `*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pattern<'a> {
    Any,
    Exact(&'a str),
    Prefix(&'a str),
    Suffix(&'a str),
}

/// Exact, `prefix*`, `*suffix` or `*`; anything else is an error message.
fn split_pattern(s: &str) -> Result<Pattern<'_>, String> {
    if s.is_empty() {
        return Err("empty string".into());
    }
    if s == "*" {
        return Ok(Pattern::Any);
    }
    let (fixed, pattern) = if let Some(p) = s.strip_prefix('*') {
        if p.ends_with('*') {
            return Err(format!("{s:?}: use `*` at the start or the end, not both"));
        }
        (p, Pattern::Suffix(p))
    } else if let Some(p) = s.strip_suffix('*') {
        (p, Pattern::Prefix(p))
    } else {
        (s, Pattern::Exact(s))
    };
    if fixed.contains('*') {
        return Err(format!(
            "{s:?}: `*` is allowed only at the start or the end"
        ));
    }
    Ok(pattern)
}

/// Exact, `prefix*`, `*suffix` or `*`.
fn check_pattern(c: &mut Ctx<'_>, path: &str, s: &str) {
    if let Err(m) = split_pattern(s) {
        c.err(path, m);
    }
}

const SCHEME: &str = "spiffe://";

/// Why a principal pattern can never match a caller's SPIFFE ID, if it cannot.
///
/// The proxy drops a leading `spiffe://` from the pattern and from the caller's ID, then
/// compares strings (exact, prefix, suffix). So after the scheme, an exact pattern must be a
/// valid SPIFFE ID with a path (no workload has a trust domain's own ID), the fixed part of
/// `prefix*` a valid beginning of one, and that of `*suffix` a valid end of one. The rules are
/// `palisade_certs::SpiffeId`'s, applied to probe IDs built around the fixed part, so a
/// pattern accepted here can match an ID the SVID verifiers accept.
pub fn principal_problem(s: &str) -> Option<String> {
    let id = match s.strip_prefix(SCHEME) {
        Some(rest) => rest,
        None if s
            .get(..SCHEME.len() - 2)
            .is_some_and(|p| p.eq_ignore_ascii_case("spiffe:")) =>
        {
            return Some(format!(
                "{s:?} can never match a caller: write the scheme as `spiffe://`, in lower \
                 case, or leave it out"
            ));
        }
        None => s,
    };
    if id.is_empty() && !s.is_empty() {
        return Some(format!(
            "{s:?} can never match a caller: no SPIFFE ID after the scheme"
        ));
    }
    let why = match split_pattern(id) {
        Err(m) if id == s => return Some(m),
        Err(m) => return Some(format!("{s:?}: {m}")),
        Ok(Pattern::Any) => return None,
        Ok(Pattern::Exact(id)) => match SpiffeId::parse(&format!("{SCHEME}{id}")) {
            Ok(parsed) if parsed.is_root() => format!(
                "a trust domain alone is no workload's identity \
                 (`{id}/*` matches every identity of the trust domain)"
            ),
            Ok(_) => return None,
            Err(e) => format!("it is not a valid SPIFFE ID: {e}"),
        },
        Ok(Pattern::Prefix(p)) => {
            // A prefix may be a whole ID (it matches that ID too), or lack the rest of its
            // last segment: one more character must make it valid.
            if SpiffeId::parse(&format!("{SCHEME}{p}")).is_ok() {
                return None;
            }
            match SpiffeId::parse(&format!("{SCHEME}{p}x")) {
                Ok(_) => return None,
                Err(e) => format!("{p:?} does not begin any valid SPIFFE ID: {e}"),
            }
        }
        Ok(Pattern::Suffix(p)) => {
            // Put the suffix after a trust domain and the start of a path segment.
            let sep = if p.starts_with('/') { "" } else { "/x" };
            match SpiffeId::parse(&format!("{SCHEME}t{sep}{p}")) {
                Ok(_) => return None,
                Err(e) => format!("{p:?} does not end any valid SPIFFE ID: {e}"),
            }
        }
    };
    Some(format!("{s:?} can never match a caller: {why}"))
}

/// Why a namespace pattern can never match the namespace of a caller's SPIFFE ID (the
/// segment after `/ns/`), if it cannot: the namespace must be one valid path segment.
pub fn namespace_problem(s: &str) -> Option<String> {
    let (fixed, id) = match split_pattern(s) {
        Err(m) => return Some(m),
        Ok(Pattern::Any) => return None,
        Ok(Pattern::Exact(n)) => (n, format!("{SCHEME}t/{n}")),
        Ok(Pattern::Prefix(p)) => (p, format!("{SCHEME}t/{p}x")),
        Ok(Pattern::Suffix(p)) => (p, format!("{SCHEME}t/x{p}")),
    };
    let why = if fixed.contains('/') {
        "a namespace is one segment of a SPIFFE ID path and cannot contain '/'".to_string()
    } else {
        match SpiffeId::parse(&id) {
            Ok(_) => return None,
            Err(e) => format!("not a valid namespace name: {e}"),
        }
    };
    Some(format!("{s:?} can never match a caller's namespace: {why}"))
}

fn check_principal(c: &mut Ctx<'_>, path: &str, s: &str) {
    if let Some(m) = principal_problem(s) {
        c.err(path, m);
    }
}

fn check_namespace(c: &mut Ctx<'_>, path: &str, s: &str) {
    if let Some(m) = namespace_problem(s) {
        c.err(path, m);
    }
}

fn strings(c: &mut Ctx<'_>, v: &Value, path: &str, check: Check) {
    for (i, item) in list(c, v, path).iter().enumerate() {
        let p = format!("{path}[{i}]");
        match item {
            Value::String(s) => check(c, &p, s),
            // Istio writes ports as strings, but YAML users write numbers.
            Value::Number(n) if path.ends_with("orts") => check(c, &p, &n.to_string()),
            other => c.err(&p, format!("expected a string, found {}", kind_of(other))),
        }
    }
}

fn check_ip_block(c: &mut Ctx<'_>, path: &str, s: &str) {
    if s.parse::<ipnet::IpNet>().is_err() && s.parse::<std::net::IpAddr>().is_err() {
        c.err(path, format!("{s:?} is not an IP address or CIDR block"));
    }
}

fn check_port(c: &mut Ctx<'_>, path: &str, s: &str) {
    if !matches!(s.parse::<u32>(), Ok(1..=65535)) {
        c.err(path, format!("{s:?} is not a port number (1-65535)"));
    }
}

/// How one field of a source or an operation is checked.
type Check = fn(&mut Ctx<'_>, &str, &str);

/// Validates `rule.from` or `rule.to`: a list of `{inner: {field: [strings]}}` entries, where
/// `inner` is `source` or `operation`, `allowed` names its fields and `check_for` picks the
/// checker of each field.
fn clauses(
    c: &mut Ctx<'_>,
    list_v: &Value,
    list_path: &str,
    inner: &str,
    allowed: &[&str],
    check_for: fn(&str) -> Check,
) {
    for (j, item) in list(c, list_v, list_path).iter().enumerate() {
        let ip = format!("{list_path}[{j}]");
        let Some(item) = object(c, item, &ip, &[inner]) else {
            continue;
        };
        let Some(body) = item.get(inner) else {
            c.err(&ip, format!("missing field `{inner}`"));
            continue;
        };
        let bp = format!("{ip}.{inner}");
        let Some(fields) = object(c, body, &bp, allowed) else {
            continue;
        };
        for (k, v) in fields {
            strings(c, v, &join(&bp, k), check_for(k));
        }
    }
}

/// The fields of `rule.from[].source`.
const SOURCE_FIELDS: &[&str] = &[
    "principals",
    "notPrincipals",
    "namespaces",
    "notNamespaces",
    "ipBlocks",
    "notIpBlocks",
];

/// The fields of `rule.to[].operation`.
const OPERATION_FIELDS: &[&str] = &[
    "hosts",
    "notHosts",
    "ports",
    "notPorts",
    "methods",
    "notMethods",
    "paths",
    "notPaths",
    "routes",
    "notRoutes",
];

fn source_check(field: &str) -> Check {
    match field {
        "ipBlocks" | "notIpBlocks" => check_ip_block,
        "principals" | "notPrincipals" => check_principal,
        "namespaces" | "notNamespaces" => check_namespace,
        _ => check_pattern,
    }
}

fn operation_check(field: &str) -> Check {
    match field {
        "ports" | "notPorts" => check_port,
        _ => check_pattern,
    }
}

fn validate_authz(c: &mut Ctx<'_>, doc: &Value) {
    let Some(map) = object(c, doc, "", &["apiVersion", "kind", "metadata", "spec"]) else {
        return;
    };
    let Some(spec) = map.get("spec") else {
        return;
    };
    let Some(spec) = object(
        c,
        spec,
        "spec",
        &["selector", "action", "rules", "provider"],
    ) else {
        return;
    };
    if spec.contains_key("provider") {
        c.err(
            "spec.provider",
            "CUSTOM actions and providers are not supported",
        );
    }
    if let Some(sel) = spec.get("selector") {
        object(c, sel, "spec.selector", &["matchLabels"]);
    }
    if let Some(a) = spec.get("action")
        && !matches!(a.as_str(), Some("ALLOW" | "DENY" | "AUDIT"))
    {
        c.err(
            "spec.action",
            format!("{a} is not one of ALLOW, DENY, AUDIT"),
        );
    }
    let Some(rules) = spec.get("rules") else {
        return;
    };
    for (i, rule) in list(c, rules, "spec.rules").iter().enumerate() {
        let rp = format!("spec.rules[{i}]");
        let Some(r) = object(c, rule, &rp, &["from", "to", "when"]) else {
            continue;
        };
        if let Some(from) = r.get("from") {
            let path = format!("{rp}.from");
            clauses(c, from, &path, "source", SOURCE_FIELDS, source_check);
        }
        if let Some(to) = r.get("to") {
            let path = format!("{rp}.to");
            clauses(c, to, &path, "operation", OPERATION_FIELDS, operation_check);
        }
        if let Some(when) = r.get("when") {
            for (j, w) in list(c, when, &format!("{rp}.when")).iter().enumerate() {
                let wp = format!("{rp}.when[{j}]");
                let Some(w) = object(c, w, &wp, &["key", "values", "notValues"]) else {
                    continue;
                };
                let key = w.get("key").and_then(Value::as_str);
                match key {
                    None => c.err(&format!("{wp}.key"), "missing or not a string"),
                    Some(k) => {
                        let ok = match header_key(k) {
                            Some(h) => http::HeaderName::from_bytes(h.as_bytes()).is_ok(),
                            None => CONDITION_KEYS[1..].contains(&k),
                        };
                        if !ok {
                            c.err(
                                &format!("{wp}.key"),
                                format!(
                                    "unsupported key {k:?}; supported: {}",
                                    CONDITION_KEYS.join(", ")
                                ),
                            );
                        }
                    }
                }
                if w.get("values").is_none() && w.get("notValues").is_none() {
                    c.err(&wp, "a condition needs `values` or `notValues`");
                }
                let check: Check = match key {
                    // The proxy matches source.ip by address, so a pattern would be refused
                    // by every proxy the policy reaches: refuse it here, with its field.
                    Some("source.ip") => check_ip_block,
                    Some("source.principal") => check_principal,
                    Some("source.namespace") => check_namespace,
                    _ => check_pattern,
                };
                for k in ["values", "notValues"] {
                    if let Some(v) = w.get(k) {
                        strings(c, v, &format!("{wp}.{k}"), check);
                    }
                }
            }
        }
    }
}

fn validate_peer_auth(c: &mut Ctx<'_>, doc: &Value) {
    let Some(map) = object(c, doc, "", &["apiVersion", "kind", "metadata", "spec"]) else {
        return;
    };
    let Some(spec) = map.get("spec") else {
        return;
    };
    let Some(spec) = object(c, spec, "spec", &["selector", "mtls", "portLevelMtls"]) else {
        return;
    };
    if let Some(sel) = spec.get("selector") {
        object(c, sel, "spec.selector", &["matchLabels"]);
    }
    let mode_ok = |c: &mut Ctx<'_>, v: &Value, path: &str| {
        if let Some(m) = object(c, v, path, &["mode"])
            && let Some(mode) = m.get("mode")
            && !matches!(
                mode.as_str(),
                Some("UNSET" | "STRICT" | "PERMISSIVE" | "DISABLE")
            )
        {
            c.err(
                &format!("{path}.mode"),
                format!("{mode} is not one of UNSET, STRICT, PERMISSIVE, DISABLE"),
            );
        }
    };
    if let Some(m) = spec.get("mtls") {
        mode_ok(c, m, "spec.mtls");
    }
    if let Some(p) = spec.get("portLevelMtls") {
        match p.as_object() {
            None => c.err(
                "spec.portLevelMtls",
                format!("expected a mapping of port to mtls, found {}", kind_of(p)),
            ),
            Some(map) => {
                for (k, v) in map {
                    let path = format!("spec.portLevelMtls.{k}");
                    check_port(c, &path, k);
                    mode_ok(c, v, &path);
                }
                if spec.get("selector").is_none() && !map.is_empty() {
                    c.err(
                        "spec.portLevelMtls",
                        "port-level mTLS needs a workload selector (as in Istio)",
                    );
                }
            }
        }
    }
}

fn validate_meta(c: &mut Ctx<'_>, doc: &Value) {
    let Some(meta) = doc.get("metadata") else {
        c.err("metadata", "missing field `metadata`");
        return;
    };
    let Some(m) = object(
        c,
        meta,
        "metadata",
        &["name", "namespace", "labels", "annotations"],
    ) else {
        return;
    };
    match m.get("name") {
        None | Some(Value::Null) => c.err("metadata.name", "missing"),
        Some(Value::String(n)) if n.is_empty() => c.err("metadata.name", "must not be empty"),
        Some(Value::String(_)) => {}
        Some(other) => c.err("metadata.name", not_a_string(other)),
    }
    match m.get("namespace") {
        None => {}
        Some(Value::String(ns)) if !ns.is_empty() => {}
        Some(Value::String(_) | Value::Null) => {
            c.err("metadata.namespace", "must be a non-empty string")
        }
        Some(other) => c.err("metadata.namespace", not_a_string(other)),
    }
}

/// For a name YAML read as another type: `name: no` is the boolean false, `name: 0123` a number.
fn not_a_string(v: &Value) -> String {
    let hint = match v {
        Value::Bool(_) => {
            "; YAML reads unquoted yes/no/on/off/true/false as booleans, so quote it (name: \"no\")"
        }
        Value::Number(_) => "; quote it to make it a string",
        _ => "",
    };
    format!("must be a string, found {}{hint}", kind_of(v))
}

/// Parses one document that is already a JSON value.
fn parse_value(c: &mut Ctx<'_>, doc: &Value) -> Option<Resource> {
    let before = c.errors.len();
    let Some(map) = doc.as_object() else {
        c.err("", format!("expected a mapping, found {}", kind_of(doc)));
        return None;
    };
    let api = map.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let kind = map.get("kind").and_then(Value::as_str).unwrap_or("");
    match kind {
        "AuthorizationPolicy" | "PeerAuthentication" => {}
        "HTTPRoute" | "GRPCRoute" | "HTTPFault" | "RateLimitPolicy" | "EgressPolicy" => {
            return parse_traffic(c, kind, api, doc);
        }
        "" => {
            c.err("kind", "missing field `kind`");
            return None;
        }
        other => {
            c.err(
                "kind",
                format!(
                    "unknown kind {other:?}; expected AuthorizationPolicy, PeerAuthentication, \
                     HTTPRoute, GRPCRoute, HTTPFault, RateLimitPolicy or EgressPolicy"
                ),
            );
            return None;
        }
    }
    if api != API_VERSION && !ISTIO_VERSIONS.contains(&api) {
        c.err(
            "apiVersion",
            format!("{api:?} is not {API_VERSION} (or security.istio.io/v1, v1beta1)"),
        );
    }
    validate_meta(c, doc);
    if kind == "AuthorizationPolicy" {
        validate_authz(c, doc);
    } else {
        validate_peer_auth(c, doc);
    }
    if c.errors.len() > before {
        return None;
    }
    let r = if kind == "AuthorizationPolicy" {
        serde_json::from_value(doc.clone()).map(Resource::AuthorizationPolicy)
    } else {
        serde_json::from_value(doc.clone()).map(Resource::PeerAuthentication)
    };
    match r {
        Ok(Resource::AuthorizationPolicy(p)) => {
            route_operations_fail_closed(c, &p);
            (c.errors.len() == before).then_some(Resource::AuthorizationPolicy(p))
        }
        Ok(r) => Some(r),
        Err(e) => {
            c.err("spec", e.to_string());
            None
        }
    }
}

/// `to.operation.routes` may only widen what an ALLOW policy allows. The route is what the
/// receiving proxy matched, and a caller can always make a request match no route (a rewrite
/// at its own proxy, another Host, a path no rule takes): a DENY by route, or a `notRoutes`,
/// would then let the request through. So both are refused, and an ALLOW by route fails
/// closed: no route matched, nothing allowed.
fn route_operations_fail_closed(c: &mut Ctx<'_>, p: &AuthorizationPolicy) {
    for (i, rule) in p.spec.rules.iter().flatten().enumerate() {
        for (j, to) in rule.to.iter().enumerate() {
            let at = format!("spec.rules[{i}].to[{j}].operation");
            if !to.operation.not_routes.is_empty() {
                c.err(
                    &format!("{at}.notRoutes"),
                    "not supported: a caller can make a request match no route, so it would \
                     fail open; allow the routes you mean with `routes` in an ALLOW policy",
                );
            }
            if !to.operation.routes.is_empty() && p.spec.action == Action::Deny {
                c.err(
                    &format!("{at}.routes"),
                    "only in ALLOW policies: a caller can make a request match no route, so a \
                     DENY by route would fail open (deny by path, method or host instead)",
                );
            }
        }
    }
}

/// Routes (Gateway API), faults, rate limits and egress policies: their own API versions and
/// parsers.
fn parse_traffic(c: &mut Ctx<'_>, kind: &str, api: &str, doc: &Value) -> Option<Resource> {
    let before = c.errors.len();
    let want = if RouteKind::from_kind(kind).is_some() {
        route::GATEWAY_API_VERSION
    } else {
        API_VERSION
    };
    if api != want {
        c.err("apiVersion", format!("{api:?} is not {want} (kind {kind})"));
    }
    validate_meta(c, doc);
    if c.errors.len() > before {
        return None;
    }
    let meta: ObjectMeta = match doc.get("metadata").cloned().map(serde_json::from_value) {
        Some(Ok(m)) => m,
        Some(Err(e)) => {
            c.err("metadata", e.to_string());
            return None;
        }
        None => return None,
    };
    match (kind, RouteKind::from_kind(kind)) {
        (_, Some(k)) => route::parse(c, k, &meta, doc).map(Resource::Route),
        ("HTTPFault", None) => traffic::parse_fault(c, &meta, doc).map(Resource::HttpFault),
        ("EgressPolicy", None) => egress::parse(c, &meta, doc).map(Resource::EgressPolicy),
        _ => traffic::parse_rate_limit(c, &meta, doc).map(Resource::RateLimitPolicy),
    }
}

/// Ports in YAML may be written as numbers; the typed model keeps Istio's strings.
fn normalize(doc: &mut Value) {
    match doc {
        Value::Object(m) => {
            for (k, v) in m.iter_mut() {
                if (k == "ports" || k == "notPorts")
                    && let Value::Array(a) = v
                {
                    for p in a.iter_mut() {
                        if let Value::Number(n) = p {
                            *p = Value::String(n.to_string());
                        }
                    }
                }
                normalize(v);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(normalize),
        _ => {}
    }
}

/// Why a file without documents (empty, blank, comments, `---` or null documents only) is
/// refused.
pub const NO_DOCUMENTS: &str =
    "the file has no policy documents (delete the file to remove its policies)";

/// Parses a multi-document YAML text. All errors of all documents are reported. A text with
/// no document at all is an error: see [`NO_DOCUMENTS`].
pub fn parse_str(file: &Path, text: &str) -> Result<Vec<Resource>, Vec<PolicyError>> {
    let docs: Vec<Value> = match serde_saphyr::from_multiple(text) {
        Ok(d) => d,
        Err(e) => {
            return Err(vec![PolicyError {
                file: file.to_path_buf(),
                document: 0,
                field: "(yaml)".into(),
                message: e.to_string(),
            }]);
        }
    };
    // An empty file is far more likely a truncated or half-written save than a wish to drop
    // its policies, and applying it as "no policy" would turn a DENY into an allow: refuse it,
    // as the control plane refuses an empty mesh file.
    if docs.iter().all(Value::is_null) {
        return Err(vec![PolicyError {
            file: file.to_path_buf(),
            document: 0,
            field: "(file)".into(),
            message: NO_DOCUMENTS.into(),
        }]);
    }
    let mut c = Ctx {
        file,
        document: 0,
        errors: Vec::new(),
    };
    let mut out = Vec::new();
    for (i, mut doc) in docs.into_iter().enumerate() {
        c.document = i;
        if doc.is_null() {
            continue;
        }
        normalize(&mut doc);
        if let Some(r) = parse_value(&mut c, &doc) {
            out.push(r);
        }
    }
    if c.errors.is_empty() {
        Ok(out)
    } else {
        Err(c.errors)
    }
}

/// The annotation `kubectl apply` keeps a whole copy of the object in: never worth sending
/// to a proxy with the policy.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Parses one object as the Kubernetes API server returns it (a watch event's or a list
/// item's JSON), with the same validation as a policy file. `origin` names it in errors
/// (`kubernetes:AuthorizationPolicy demo/name`): a [`PolicyError`]'s `file`, document 0.
///
/// What the API server adds is dropped before validation: `status`, and every `metadata`
/// field but `name`, `namespace`, `labels` and `annotations` (uid, resourceVersion,
/// managedFields...), and the `kubectl apply` copy of the object among the annotations.
/// Everything else is checked as strictly as in a file, so a field the parser does not know
/// is an error here too.
pub fn parse_object(origin: &str, object: &Value) -> Result<Resource, Vec<PolicyError>> {
    let file = Path::new(origin);
    let mut c = Ctx {
        file,
        document: 0,
        errors: Vec::new(),
    };
    let mut doc = object.clone();
    if let Value::Object(map) = &mut doc {
        map.remove("status");
        if let Some(Value::Object(meta)) = map.get_mut("metadata") {
            meta.retain(|k, _| {
                matches!(k.as_str(), "name" | "namespace" | "labels" | "annotations")
            });
            if let Some(Value::Object(annotations)) = meta.get_mut("annotations") {
                annotations.remove(LAST_APPLIED);
                if annotations.is_empty() {
                    meta.remove("annotations");
                }
            }
        }
    }
    normalize(&mut doc);
    match parse_value(&mut c, &doc) {
        Some(r) if c.errors.is_empty() => Ok(r),
        _ => {
            if c.errors.is_empty() {
                c.err("", "not a policy resource");
            }
            Err(c.errors)
        }
    }
}

/// Loads a file, or every `*.yaml` / `*.yml` of a directory (sorted, not recursive), as one
/// set: any error anywhere rejects the whole set. Duplicate `namespace/name` of one kind is an
/// error.
pub fn load_path(path: &Path) -> Result<Vec<Loaded>, Vec<PolicyError>> {
    let io_err = |file: &Path, e: std::io::Error| {
        vec![PolicyError {
            file: file.to_path_buf(),
            document: 0,
            field: "(file)".into(),
            message: e.to_string(),
        }]
    };
    let files = if path.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| io_err(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && p.extension().is_some_and(|x| x == "yaml" || x == "yml")
                    && !p
                        .file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with('.'))
            })
            .collect();
        v.sort();
        v
    } else {
        vec![path.to_path_buf()]
    };
    let mut errors = Vec::new();
    let mut out: Vec<Loaded> = Vec::new();
    let mut seen: BTreeMap<(&'static str, String, String), (PathBuf, usize)> = BTreeMap::new();
    for file in files {
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) => {
                errors.extend(io_err(&file, e));
                continue;
            }
        };
        match parse_str(&file, &text) {
            Ok(resources) => {
                for (index, resource) in resources.into_iter().enumerate() {
                    let m = resource.metadata();
                    // An HTTPRoute and a GRPCRoute of one name would share their route label.
                    let kind = match resource {
                        Resource::Route(_) => "HTTPRoute or GRPCRoute",
                        _ => resource.kind(),
                    };
                    let key = (kind, m.namespace().to_string(), m.name.clone());
                    if let Some((f, i)) = seen.get(&key) {
                        errors.push(PolicyError {
                            file: file.clone(),
                            document: index,
                            field: "metadata.name".into(),
                            message: format!(
                                "{} {}/{} is already defined in {} document {i}",
                                key.0,
                                key.1,
                                key.2,
                                f.display()
                            ),
                        });
                        continue;
                    }
                    seen.insert(key, (file.clone(), index));
                    out.push(Loaded {
                        file: file.clone(),
                        index,
                        resource,
                    });
                }
            }
            Err(e) => errors.extend(e),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<Resource>, Vec<PolicyError>> {
        parse_str(Path::new("p.yaml"), text)
    }

    fn first_err(text: &str) -> PolicyError {
        parse(text).expect_err("should fail").remove(0)
    }

    const GOOD: &str = r#"
apiVersion: palisade.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: a, namespace: demo }
spec:
  selector: { matchLabels: { app: db } }
  action: DENY
  rules:
    - from: [ { source: { principals: ["cluster.local/ns/demo/sa/web"], ipBlocks: ["10.0.0.0/8"] } } ]
      to: [ { operation: { methods: ["GET"], paths: ["/api/*"], ports: [8080, "9090"] } } ]
      when: [ { key: "request.headers[x-user]", values: ["alice"] } ]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: { name: default, namespace: palisade-system }
spec: { mtls: { mode: PERMISSIVE } }
"#;

    #[test]
    fn parses_both_kinds_and_round_trips_through_json() {
        let r = parse(GOOD).expect("valid");
        assert_eq!(r.len(), 2);
        let Resource::AuthorizationPolicy(p) = &r[0] else {
            panic!("first is an AuthorizationPolicy")
        };
        assert_eq!(p.spec.action, Action::Deny);
        let rule = &p.spec.rules.as_ref().expect("rules")[0];
        assert_eq!(rule.to[0].operation.ports, vec!["8080", "9090"]);
        let json = serde_json::to_string(p).expect("json");
        let back: AuthorizationPolicy = serde_json::from_str(&json).expect("back");
        assert_eq!(&back, p);
    }

    #[test]
    fn errors_name_document_and_field() {
        let e = first_err(&GOOD.replace("principals:", "principal:"));
        assert_eq!(e.document, 0);
        assert_eq!(e.field, "spec.rules[0].from[0].source.principal");
        assert!(
            e.to_string()
                .starts_with("p.yaml: document 0: spec.rules[0]")
        );

        let e = first_err(&GOOD.replace("mode: PERMISSIVE", "mode: LAX"));
        assert_eq!((e.document, e.field.as_str()), (1, "spec.mtls.mode"));

        let e = first_err(&GOOD.replace("10.0.0.0/8", "10.0.0/33"));
        assert_eq!(e.field, "spec.rules[0].from[0].source.ipBlocks[0]");

        let e = first_err(&GOOD.replace(
            "key: \"request.headers[x-user]\", values: [\"alice\"]",
            "key: source.ip, values: [\"10.0.0.0/8\", \"10.*\"]",
        ));
        assert_eq!(e.field, "spec.rules[0].when[0].values[1]");

        let e = first_err(&GOOD.replace("8080", "80800"));
        assert_eq!(e.field, "spec.rules[0].to[0].operation.ports[0]");

        let e = first_err(&GOOD.replace("/api/*", "/a*pi"));
        assert_eq!(e.field, "spec.rules[0].to[0].operation.paths[0]");

        let e = first_err(&GOOD.replace("request.headers[x-user]", "request.auth.claims[iss]"));
        assert_eq!(e.field, "spec.rules[0].when[0].key");

        let e = first_err(&GOOD.replace("action: DENY", "action: REJECT"));
        assert_eq!(e.field, "spec.action");

        let e = first_err(&GOOD.replace("kind: AuthorizationPolicy", "kind: Policy"));
        assert_eq!(e.field, "kind");

        let e = first_err(&GOOD.replace("palisade.dev/v1alpha1", "palisade.dev/v2"));
        assert_eq!(e.field, "apiVersion");

        let e = first_err(&GOOD.replace("{ name: a, namespace: demo }", "{ namespace: demo }"));
        assert_eq!(e.field, "metadata.name");

        let e = first_err("a: [");
        assert_eq!(e.field, "(yaml)");
    }

    #[test]
    fn non_ascii_patterns_are_checked_without_panicking() {
        // The wildcard check once sliced bytes, so "/é" panicked the validator (and with it
        // a control plane's reload task).
        for (value, ok) in [
            ("/é", true),
            ("é", true),
            ("*é", true),
            ("/é*", true),
            ("*é*", false),
            ("/é*x", false),
            ("**", false),
        ] {
            let yaml = GOOD.replace("/api/*", value);
            assert_eq!(parse(&yaml).is_ok(), ok, "{value}");
        }
    }

    fn source_doc(field: &str, value: &str) -> String {
        let v = serde_json::to_string(value).expect("json");
        format!(
            "apiVersion: palisade.dev/v1alpha1\nkind: AuthorizationPolicy\n\
             metadata: {{ name: a, namespace: demo }}\nspec:\n  action: DENY\n  rules:\n\
             \x20   - from: [ {{ source: {{ {field}: [{v}] }} }} ]\n"
        )
    }

    fn when_doc(key: &str, field: &str, value: &str) -> String {
        let v = serde_json::to_string(value).expect("json");
        format!(
            "apiVersion: palisade.dev/v1alpha1\nkind: AuthorizationPolicy\n\
             metadata: {{ name: a, namespace: demo }}\nspec:\n  action: DENY\n  rules:\n\
             \x20   - when: [ {{ key: {key}, {field}: [{v}] }} ]\n"
        )
    }

    #[test]
    fn principals_that_can_match_are_accepted() {
        for p in [
            "cluster.local/ns/demo/sa/api",
            "spiffe://cluster.local/ns/demo/sa/api",
            "cluster.local/ns/Demo/sa/API.v2_x-y",
            "other.example/ns/demo/sa/api",
            "*",
            "spiffe://*",
            "cluster.local/ns/demo/*",
            "cluster.local/ns/demo/sa/api/*",
            "cluster.local/ns/demo/sa/ap*",
            "spiffe://cluster.local/*",
            "cluster.local*",
            "clu*",
            "*/ns/demo/sa/api",
            "*/sa/api",
            "*api",
            "*.local/ns/demo/sa/api",
            "spiffe://*/sa/api",
        ] {
            assert_eq!(principal_problem(p), None, "{p}");
            parse(&source_doc("principals", p)).expect(p);
        }
    }

    #[test]
    fn principals_that_can_never_match_are_rejected_saying_why() {
        for (p, why) in [
            ("cluster.local/ns/demo/sa/api/", "ends with '/'"),
            ("spiffe://Cluster.Local/ns/demo/sa/api", "lowercase"),
            ("Cluster.Local/ns/demo/sa/api", "lowercase"),
            ("cluster.local:8080/ns/demo/sa/api", "lowercase"),
            ("spiffe://spiffe://cluster.local/ns/demo", "lowercase"),
            ("SPIFFE://cluster.local/ns/demo/sa/api", "write the scheme"),
            ("spiffe:/cluster.local/ns/demo/sa/api", "write the scheme"),
            ("spiffe://", "no SPIFFE ID after the scheme"),
            ("cluster.local", "a trust domain alone"),
            ("spiffe://cluster.local", "a trust domain alone"),
            ("/ns/demo/sa/api", "no trust domain"),
            ("cluster.local//ns/demo/sa/api", "empty segment"),
            ("cluster.local/ns/../sa/api", "'..' segment"),
            ("cluster.local/ns/demo/sa/my api", "may contain only"),
            ("cluster.local/ns/demo/sa/apí", "may contain only"),
            ("cluster.local/ns/demo/sa/api?x=1", "query or fragment"),
            ("Cluster*", "does not begin"),
            ("cluster.local/ns//*", "does not begin"),
            ("cluster.local/ns/./*", "does not begin"),
            ("*/sa/api/", "does not end"),
            ("*//sa/api", "does not end"),
            ("*/../sa/api", "does not end"),
            ("*:8080/ns/demo/sa/api", "does not end"),
            ("cluster.local/ns/*/sa/api", "only at the start or the end"),
            (
                "spiffe://cluster.local/*/sa/api",
                "only at the start or the end",
            ),
            ("*cluster.local/ns/demo/*", "not both"),
            ("", "empty string"),
        ] {
            let m = principal_problem(p).unwrap_or_else(|| panic!("{p:?} accepted"));
            assert!(m.contains(why), "{p:?}: {m}");
            let e = first_err(&source_doc("principals", p));
            assert_eq!(e.field, "spec.rules[0].from[0].source.principals[0]");
            assert_eq!(e.message, m);
        }
        let m = principal_problem("cluster.local/ns/demo/sa/api/").unwrap_or_default();
        assert!(m.contains("can never match"), "{m}");
    }

    #[test]
    fn namespaces_must_be_one_valid_path_segment() {
        for n in [
            "demo",
            "kube-system",
            "Demo",
            "a.b_c",
            "*",
            "de*",
            "*mo",
            "de.*",
            "*.x",
        ] {
            assert_eq!(namespace_problem(n), None, "{n}");
            parse(&source_doc("namespaces", n)).expect(n);
        }
        for (n, why) in [
            ("de/mo", "cannot contain '/'"),
            ("demo/", "cannot contain '/'"),
            ("de/*", "cannot contain '/'"),
            ("*/mo", "cannot contain '/'"),
            (".", "'.' or '..' segment"),
            ("..", "'.' or '..' segment"),
            ("de mo", "may contain only"),
            ("démo", "may contain only"),
            ("de:*", "may contain only"),
            ("d*o", "only at the start or the end"),
            ("", "empty string"),
        ] {
            let m = namespace_problem(n).unwrap_or_else(|| panic!("{n:?} accepted"));
            assert!(m.contains(why), "{n:?}: {m}");
            let e = first_err(&source_doc("namespaces", n));
            assert_eq!(e.field, "spec.rules[0].from[0].source.namespaces[0]");
            assert_eq!(e.message, m);
        }
    }

    #[test]
    fn every_principal_and_namespace_field_is_checked() {
        let bad_p = "cluster.local/ns/demo/sa/api/";
        let bad_n = "de/mo";
        for (doc, field) in [
            (
                source_doc("principals", bad_p),
                "spec.rules[0].from[0].source.principals[0]",
            ),
            (
                source_doc("notPrincipals", bad_p),
                "spec.rules[0].from[0].source.notPrincipals[0]",
            ),
            (
                when_doc("source.principal", "values", bad_p),
                "spec.rules[0].when[0].values[0]",
            ),
            (
                when_doc("source.principal", "notValues", bad_p),
                "spec.rules[0].when[0].notValues[0]",
            ),
            (
                source_doc("namespaces", bad_n),
                "spec.rules[0].from[0].source.namespaces[0]",
            ),
            (
                source_doc("notNamespaces", bad_n),
                "spec.rules[0].from[0].source.notNamespaces[0]",
            ),
            (
                when_doc("source.namespace", "values", bad_n),
                "spec.rules[0].when[0].values[0]",
            ),
            (
                when_doc("source.namespace", "notValues", bad_n),
                "spec.rules[0].when[0].notValues[0]",
            ),
        ] {
            let e = first_err(&doc);
            assert_eq!(e.field, field, "{doc}");
            assert!(e.message.contains("can never match"), "{e}");
        }
        // Other keys keep the plain wildcard rules: a header value may end with '/'.
        parse(&when_doc("\"request.headers[x-path]\"", "values", bad_p)).expect("header value");
    }

    #[test]
    fn principals_outside_the_mesh_trust_domain_are_found() {
        for (p, inside) in [
            ("cluster.local/ns/a/sa/b", true),
            ("spiffe://cluster.local/ns/a/sa/b", true),
            ("*", true),
            ("clu*", true),
            ("cluster.local*", true),
            ("cluster.local/*", true),
            ("*/sa/b", true),
            ("other.example/ns/a/sa/b", false),
            ("spiffe://other.example/*", false),
            ("cluster.localx/ns/a/sa/b", false),
            ("cluster.local.evil/*", false),
            ("other*", false),
        ] {
            assert_eq!(principal_in_trust_domain(p, "cluster.local"), inside, "{p}");
        }
        let yaml = r#"
apiVersion: palisade.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: a, namespace: demo }
spec:
  rules:
    - from:
        - source: { principals: ["cluster.local/ns/a/sa/b", "other.example/ns/a/sa/b"] }
        - source: { notPrincipals: ["spiffe://partner.example/*"] }
    - when:
        - { key: source.principal, values: ["*/sa/b"], notValues: ["other.example/ns/x/sa/y"] }
        - { key: "request.headers[x-id]", values: ["other.example/ns/a/sa/b"] }
"#;
        let Resource::AuthorizationPolicy(p) = parse(yaml).expect("valid").remove(0) else {
            panic!("an AuthorizationPolicy")
        };
        assert_eq!(p.principal_patterns().len(), 5);
        assert_eq!(
            p.foreign_principals("cluster.local"),
            vec![
                (
                    "spec.rules[0].from[0].source.principals[1]".to_string(),
                    "other.example/ns/a/sa/b"
                ),
                (
                    "spec.rules[0].from[1].source.notPrincipals[0]".to_string(),
                    "spiffe://partner.example/*"
                ),
                (
                    "spec.rules[1].when[0].notValues[0]".to_string(),
                    "other.example/ns/x/sa/y"
                ),
            ]
        );
    }

    #[test]
    fn a_file_without_documents_is_an_error() {
        for text in [
            "",
            "\n  \n\t\n",
            "# all policies commented out\n# apiVersion: palisade.dev/v1alpha1\n",
            "---\n",
            "---\n# nothing\n---\n...\n",
            "~\n",
            "null\n---\n~\n",
        ] {
            let errs = parse(text).expect_err(text);
            assert_eq!(errs.len(), 1, "{text:?}: {errs:?}");
            assert_eq!(
                errs[0].to_string(),
                "p.yaml: document 0: (file): the file has no policy documents \
                 (delete the file to remove its policies)",
                "{text:?}"
            );
        }
        // A null document beside a real one is still skipped.
        assert_eq!(
            parse(&format!("---\n~\n---\n{GOOD}")).expect("valid").len(),
            2
        );

        // In a directory, an emptied file rejects the whole set, naming the file.
        let dir = tempdir();
        std::fs::write(dir.join("a.yaml"), GOOD).expect("write");
        std::fs::write(dir.join("b.yaml"), "# emptied\n").expect("write");
        let errs = load_path(&dir).expect_err("empty file");
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].file.ends_with("b.yaml"), "{errs:?}");
        assert_eq!(errs[0].message, NO_DOCUMENTS);
        // Deleting it is how its policies are removed.
        std::fs::remove_file(dir.join("b.yaml")).expect("rm");
        assert_eq!(load_path(&dir).expect("ok").len(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn duplicates_across_files_are_errors() {
        let dir = tempdir();
        std::fs::write(dir.join("a.yaml"), GOOD).expect("write");
        std::fs::write(dir.join("b.yml"), GOOD).expect("write");
        let errs = load_path(&dir).expect_err("duplicates");
        assert!(errs.iter().all(|e| e.field == "metadata.name"), "{errs:?}");
        assert!(errs[0].file.ends_with("b.yml"));
        std::fs::remove_file(dir.join("b.yml")).expect("rm");
        assert_eq!(load_path(&dir).expect("ok").len(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn tempdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "palisade-policy-test-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&d).expect("mkdir");
        d
    }

    fn rand_suffix() -> u128 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    }

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn pa(ns: &str, name: &str, selector: Option<&str>, mode: MtlsMode) -> PeerAuthentication {
        PeerAuthentication {
            api_version: API_VERSION.into(),
            kind: "PeerAuthentication".into(),
            metadata: ObjectMeta {
                name: name.into(),
                namespace: Some(ns.into()),
                ..Default::default()
            },
            spec: PeerAuthenticationSpec {
                selector: selector.map(|s| WorkloadSelector {
                    match_labels: labels(&[("app", s)]),
                }),
                mtls: Some(Mtls { mode }),
                port_level_mtls: BTreeMap::new(),
            },
        }
    }

    #[test]
    fn mtls_precedence() {
        let l = labels(&[("app", "db")]);
        assert_eq!(effective_mtls(&[], "demo", &l).mode, MtlsMode::Strict);
        let mesh = pa(ROOT_NAMESPACE, "default", None, MtlsMode::Permissive);
        let ns = pa("demo", "ns", None, MtlsMode::Disable);
        let wl = pa("demo", "db", Some("db"), MtlsMode::Strict);
        let unset = pa("demo", "db", Some("db"), MtlsMode::Unset);
        assert_eq!(
            effective_mtls(std::slice::from_ref(&mesh), "demo", &l).mode,
            MtlsMode::Permissive
        );
        assert_eq!(
            effective_mtls(&[mesh.clone(), ns.clone()], "demo", &l).mode,
            MtlsMode::Disable
        );
        assert_eq!(
            effective_mtls(&[mesh.clone(), ns.clone(), wl], "demo", &l).mode,
            MtlsMode::Strict
        );
        assert_eq!(
            effective_mtls(&[mesh.clone(), ns, unset], "demo", &l).mode,
            MtlsMode::Disable
        );
        // Other namespaces' policies do not apply.
        assert_eq!(
            effective_mtls(&[pa("other", "x", None, MtlsMode::Disable)], "demo", &l).mode,
            MtlsMode::Strict
        );
        let mut ported = pa("demo", "db", Some("db"), MtlsMode::Unset);
        ported.spec.port_level_mtls.insert(
            9090,
            Mtls {
                mode: MtlsMode::Permissive,
            },
        );
        let s = effective_mtls(&[mesh, ported], "demo", &l);
        assert_eq!(s.mode, MtlsMode::Permissive);
        assert_eq!(s.port_modes.get(&9090), Some(&MtlsMode::Permissive));
    }

    #[test]
    fn mtls_names_where_each_mode_came_from() {
        let l = labels(&[("app", "db")]);
        let none = effective_mtls(&[], "demo", &l);
        assert_eq!(
            (none.mode_for(8080), none.source_for(8080).as_str()),
            (MtlsMode::Strict, "mesh default")
        );
        let mesh = pa(ROOT_NAMESPACE, "default", None, MtlsMode::Permissive);
        let ns = pa("demo", "ns", None, MtlsMode::Disable);
        // UNSET at the workload level: the namespace's mode, and its name, stand.
        let mut ported = pa("demo", "db", Some("db"), MtlsMode::Unset);
        ported.spec.port_level_mtls.insert(
            9090,
            Mtls {
                mode: MtlsMode::Strict,
            },
        );
        let s = effective_mtls(&[mesh.clone(), ns, ported], "demo", &l);
        assert_eq!(s.mode_for(8080), MtlsMode::Disable);
        assert_eq!(s.source_for(8080), "PeerAuthentication demo/ns");
        assert_eq!(s.mode_for(9090), MtlsMode::Strict);
        assert_eq!(s.source_for(9090), "PeerAuthentication demo/db");
        let s = effective_mtls(std::slice::from_ref(&mesh), "demo", &l);
        assert_eq!(
            s.source_for(9090),
            "PeerAuthentication palisade-system/default"
        );
    }

    #[test]
    fn selection_by_namespace_and_labels() {
        let Resource::AuthorizationPolicy(p) = parse(GOOD).expect("ok").remove(0) else {
            panic!()
        };
        assert!(p.selects(
            "demo",
            &labels(&[("app", "db"), ("v", "1")]),
            ROOT_NAMESPACE
        ));
        assert!(!p.selects("demo", &labels(&[("app", "web")]), ROOT_NAMESPACE));
        assert!(!p.selects("other", &labels(&[("app", "db")]), ROOT_NAMESPACE));
        let mut mesh_wide = p.clone();
        mesh_wide.metadata.namespace = Some(ROOT_NAMESPACE.into());
        mesh_wide.spec.selector = None;
        assert!(mesh_wide.selects("any", &labels(&[]), ROOT_NAMESPACE));
    }

    /// An object as the API server returns it: server-set metadata, `status` and the
    /// `kubectl apply` annotation are dropped, the rest is validated as a file is.
    #[test]
    fn an_api_server_object_parses_alone_with_the_file_validator() {
        let object = serde_json::json!({
            "apiVersion": "palisade.dev/v1alpha1",
            "kind": "AuthorizationPolicy",
            "metadata": {
                "name": "db", "namespace": "demo", "uid": "1234", "resourceVersion": "42",
                "generation": 3, "creationTimestamp": "2026-01-01T00:00:00Z",
                "managedFields": [ { "manager": "kubectl" } ],
                "annotations": { "kubectl.kubernetes.io/last-applied-configuration": "{}" },
                "labels": { "team": "a" }
            },
            "spec": { "action": "DENY", "rules": [ { "to": [ { "operation": { "ports": [5432] } } ] } ] },
            "status": { "anything": true }
        });
        let Ok(Resource::AuthorizationPolicy(p)) = parse_object("kubernetes:demo/db", &object)
        else {
            panic!("valid object refused");
        };
        assert_eq!(p.qualified_name(), "demo/db");
        assert_eq!(p.spec.action, Action::Deny);
        assert!(p.metadata.annotations.is_empty(), "{:?}", p.metadata);
        assert_eq!(p.metadata.labels.get("team").map(String::as_str), Some("a"));

        let mut bad = object.clone();
        bad["spec"]["rules"][0]["to"][0]["operation"]["methodz"] = serde_json::json!(["GET"]);
        let errors = parse_object("kubernetes:demo/db", &bad).expect_err("unknown field");
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].field, "spec.rules[0].to[0].operation.methodz");
        assert_eq!(errors[0].file, Path::new("kubernetes:demo/db"));

        let mut other = object;
        other["kind"] = serde_json::json!("Secret");
        assert!(parse_object("kubernetes:demo/db", &other).is_err());
    }
}
