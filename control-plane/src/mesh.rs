//! The local mesh file (`deploy/local/mesh.yaml`): its serde model, its defaults and its
//! validation.
//!
//! The file is what a user edits by hand while the mesh runs, so every rejection names the
//! file, the field path (`workloads[1].inboundPort`) and the problem: the control plane keeps
//! the last good config and the user has to be able to find the mistake from one log line.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use palisade_api::PathNormalization;
use palisade_api::policy::DefaultPolicy;
use palisade_certs::ca::{MAX_LEAF_TTL, MIN_LEAF_TTL};
use palisade_certs::{SpiffeId, SpiffeIdError, TrustDomain};
use serde::{Deserialize, Serialize};

/// The default trust domain, as in Kubernetes meshes.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// The default leaf SVID lifetime.
pub const DEFAULT_CERTIFICATE_LIFETIME: &str = "24h";
/// The default gRPC port of the control plane.
pub const DEFAULT_CONTROL_PLANE_PORT: u16 = 8086;
/// The namespace of a workload or service that names none (Kubernetes' `default`).
pub const DEFAULT_NAMESPACE: &str = "default";
/// Lifetimes below this are accepted, but only make sense in tests (renewal every few seconds).
pub const MIN_PRODUCTION_LIFETIME: Duration = Duration::from_secs(60);

/// The mesh file as written. Unknown fields are errors: a misspelt `inboundport` silently
/// ignored would leave a workload on a port nobody expects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshFile {
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// Leaf SVID lifetime (`24h`, `90m`, `30s`). At least 1m outside tests; down to 1s is
    /// accepted so that tests can watch several renewals.
    #[serde(default = "default_lifetime")]
    pub certificate_lifetime: String,
    #[serde(default)]
    pub control_plane: ControlPlaneSection,
    /// What applies to a workload no AuthorizationPolicy selects.
    #[serde(default)]
    pub default_policy: DefaultPolicy,
    /// How request paths are normalized before authorization (Istio's `pathNormalization`).
    #[serde(default)]
    pub path_normalization: PathNormalization,
    /// Directory of policy YAML, relative to the mesh file.
    #[serde(default)]
    pub policies: Option<PathBuf>,
    #[serde(default)]
    pub workloads: Vec<Workload>,
    #[serde(default)]
    pub services: Vec<Service>,
}

fn default_trust_domain() -> String {
    DEFAULT_TRUST_DOMAIN.to_string()
}

fn default_lifetime() -> String {
    DEFAULT_CERTIFICATE_LIFETIME.to_string()
}

fn default_namespace() -> String {
    DEFAULT_NAMESPACE.to_string()
}

/// `controlPlane:` in the mesh file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ControlPlaneSection {
    /// gRPC port (identity + discovery) on 127.0.0.1.
    #[serde(default = "default_cp_port")]
    pub port: u16,
}

fn default_cp_port() -> u16 {
    DEFAULT_CONTROL_PLANE_PORT
}

impl Default for ControlPlaneSection {
    fn default() -> Self {
        Self {
            port: DEFAULT_CONTROL_PLANE_PORT,
        }
    }
}

/// One workload: an app (optional) and its sidecar, on loopback ports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Workload {
    /// Unique in the mesh; the bootstrap token is issued per name.
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Defaults to `name`; use [`Workload::service_account`] to read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The app to start (`palisade up`); absent: nothing is started for this workload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Extra environment for the app (an extension of the spec's schema).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Where the app listens (plaintext, loopback); absent: the workload only calls out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_port: Option<u16>,
    /// mTLS from other proxies arrives here.
    pub inbound_port: u16,
    /// `/metrics`, `/ready`, `/live`.
    pub admin_port: u16,
    #[serde(default)]
    pub upstreams: Vec<Upstream>,
    /// Where the workload's proxy listens: its pod IP on Kubernetes; None locally, where every
    /// port is on 127.0.0.1. Not part of the mesh file.
    #[serde(skip)]
    pub pod_ip: Option<IpAddr>,
}

impl Workload {
    /// The address other proxies dial: `<pod IP or 127.0.0.1>:<inboundPort>`.
    pub fn inbound_addr(&self) -> SocketAddr {
        SocketAddr::new(
            self.pod_ip.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            self.inbound_port,
        )
    }

    /// The service account, which defaults to the workload's name.
    pub fn service_account(&self) -> &str {
        self.service_account.as_deref().unwrap_or(&self.name)
    }

    /// `spiffe://<trustDomain>/ns/<namespace>/sa/<serviceAccount>`.
    pub fn spiffe_id(&self, mesh: &Mesh) -> Result<SpiffeId, SpiffeIdError> {
        SpiffeId::for_workload(&mesh.trust_domain, &self.namespace, self.service_account())
    }

    /// Whether every `key: value` of `selector` is among this workload's labels.
    pub fn matches(&self, selector: &BTreeMap<String, String>) -> bool {
        selector
            .iter()
            .all(|(k, v)| self.labels.get(k).is_some_and(|l| l == v))
    }
}

/// An explicit outbound of a workload: the app connects to `localPort`, the mesh routes to
/// `service` (`name.namespace`) on `port`; or, when `service` is a DNS name that no mesh
/// service matches (see `upstream_target`), the proxy resolves it and connects to it without
/// mTLS (egress).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Upstream {
    pub service: String,
    pub port: u16,
    pub local_port: u16,
}

impl Upstream {
    /// `(name, namespace)` of `service`; a bare name means the `default` namespace.
    pub fn service_ref(&self) -> (&str, &str) {
        match self.service.split_once('.') {
            Some((name, ns)) => (name, ns),
            None => (&self.service, DEFAULT_NAMESPACE),
        }
    }
}

/// What an upstream's `service` names.
enum UpstreamTarget {
    /// The service at this index of `services`.
    Service(usize),
    /// A host outside the mesh, resolved with DNS by the proxy and reached without mTLS.
    Egress,
}

/// The rule that tells a mesh upstream from an egress one (docs/routing.md, "Egress"):
///
/// 1. `name.namespace` of a service of `services` is that service (mesh services first);
/// 2. a bare name (no dot) is `name.default`, which must be a service, as before egress;
/// 3. `name.ns` whose `ns` is a namespace of the mesh (of a workload or a service) and that is
///    no service is a typo, refused: a mesh name must never leave the mesh as plaintext;
/// 4. any other valid lower-case DNS name (`example.com`, `api.github.com`; a trailing dot
///    makes any name absolute, and so egress, even `example.demo.`) is egress.
fn upstream_target(
    u: &Upstream,
    services: &HashMap<(String, String), usize>,
    namespaces: &std::collections::HashSet<&str>,
) -> Result<UpstreamTarget, String> {
    let absolute = u.service.strip_suffix('.');
    let (name, ns) = u.service_ref();
    if absolute.is_none() {
        if let Some(&k) = services.get(&(name.to_string(), ns.to_string())) {
            return Ok(UpstreamTarget::Service(k));
        }
        if !u.service.contains('.') || (!ns.contains('.') && namespaces.contains(ns)) {
            return Err(format!(
                "no service {name}.{ns} in `services` (write upstream services as \
                 name.namespace; a host outside the mesh is a DNS name that does not end in a \
                 mesh namespace, or ends with a dot)"
            ));
        }
    }
    let host = absolute.unwrap_or(&u.service);
    match palisade_api::policy::egress::hostname_problem(host) {
        None => Ok(UpstreamTarget::Egress),
        Some(why) => Err(format!(
            "{:?} is no service of `services` (name.namespace) and no DNS name for egress: {why}",
            u.service
        )),
    }
}

pub use palisade_api::Protocol;

/// A service: a name the mesh routes to, backed by the workloads its selector matches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    pub port: u16,
    /// Endpoints are the workloads of the same namespace whose labels include all of these.
    pub selector: BTreeMap<String, String>,
    #[serde(default)]
    pub protocol: Protocol,
    /// Request timeout (`2s`): the caller's proxy answers 504 past it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// How long a response may stream without a byte (`30s`) before the caller's proxy
    /// cancels it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<String>,
    /// Retries of failed calls (`{codes: [502, 503], attempts: 3, backoff: 25ms}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<palisade_api::call::RetrySpec>,
    /// Which of its spans the proxies keep (`{spanBudget: 50, slowRequest: 500ms}`): ordinary
    /// sampled spans per second, and the latency past which a span is always kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<palisade_api::trace::TraceSpec>,
    /// The endpoints, when a source knows them rather than the selector (Kubernetes: the
    /// ready addresses of the Service's EndpointSlices). None: the workloads the selector
    /// matches. Not part of the mesh file.
    #[serde(skip)]
    pub endpoints: Option<Vec<ServiceEndpoint>>,
    /// Virtual IPs (Kubernetes ClusterIPs). Not part of the mesh file.
    #[serde(skip)]
    pub virtual_ips: Vec<IpAddr>,
}

/// One endpoint a source listed for a service explicitly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceEndpoint {
    /// The workload (in the service's namespace) behind the address.
    pub workload: String,
    /// Its address (a pod IP); the port dialled is the workload's inbound port.
    pub address: IpAddr,
    /// The port its app serves the service on (the resolved targetPort).
    pub target_port: u16,
}

impl Service {
    /// Whether `w` backs this service: same namespace (as a Kubernetes Service selects only
    /// pods of its own namespace) and, for explicit endpoints, one of them, else every
    /// selector label present.
    pub fn selects(&self, w: &Workload) -> bool {
        w.namespace == self.namespace
            && match &self.endpoints {
                Some(endpoints) => endpoints.iter().any(|e| e.workload == w.name),
                None => w.matches(&self.selector),
            }
    }

    /// `name.namespace`, as upstreams spell it.
    pub fn qualified_name(&self) -> String {
        format!("{}.{}", self.name, self.namespace)
    }
}

/// A validated mesh file, with its defaults applied and its paths resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Mesh {
    /// The mesh file this came from.
    pub path: PathBuf,
    pub trust_domain: TrustDomain,
    pub certificate_lifetime: Duration,
    pub control_plane: ControlPlaneSection,
    pub default_policy: DefaultPolicy,
    pub path_normalization: PathNormalization,
    /// The policies directory, resolved against the mesh file's directory.
    pub policies_dir: Option<PathBuf>,
    pub workloads: Vec<Workload>,
    pub services: Vec<Service>,
}

impl Mesh {
    pub fn workload(&self, name: &str) -> Option<&Workload> {
        self.workloads.iter().find(|w| w.name == name)
    }

    pub fn service(&self, name: &str, namespace: &str) -> Option<&Service> {
        self.services
            .iter()
            .find(|s| s.name == name && s.namespace == namespace)
    }

    /// The workloads whose SPIFFE ID is `id` (several replicas may share a service account).
    pub fn workloads_with_id<'a>(&'a self, id: &'a SpiffeId) -> impl Iterator<Item = &'a Workload> {
        self.workloads
            .iter()
            .filter(move |w| w.spiffe_id(self).is_ok_and(|wid| &wid == id))
    }
}

/// A mesh file that cannot be used, with what to fix and where.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("cannot read the mesh file {}: {source}", file.display())]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    /// `field` is a path like `workloads[1].inboundPort`, or `(document)` when the YAML itself
    /// is broken and no field can be named.
    #[error("{}: {field}: {message}", file.display())]
    Invalid {
        file: PathBuf,
        field: String,
        message: String,
    },
}

impl MeshError {
    fn invalid(file: &Path, field: impl Into<String>, message: impl Into<String>) -> Self {
        MeshError::Invalid {
            file: file.to_path_buf(),
            field: field.into(),
            message: message.into(),
        }
    }

    /// The field path, when the error is about one.
    pub fn field(&self) -> Option<&str> {
        match self {
            MeshError::Invalid { field, .. } => Some(field),
            MeshError::Read { .. } => None,
        }
    }
}

/// Reads, parses and validates the mesh file at `path`.
pub fn load(path: &Path) -> Result<Mesh, MeshError> {
    let text = std::fs::read_to_string(path).map_err(|source| MeshError::Read {
        file: path.to_path_buf(),
        source,
    })?;
    parse(&text, path)
}

/// Parses and validates mesh YAML; `path` names the file in errors and anchors `policies`.
pub fn parse(text: &str, path: &Path) -> Result<Mesh, MeshError> {
    // An empty file is far more likely a half-written save than a wish to empty the mesh;
    // accepting it would withdraw every endpoint at once.
    if text
        .lines()
        .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
    {
        return Err(MeshError::invalid(
            path,
            "(document)",
            "the mesh file is empty (write `workloads: []` for an empty mesh)",
        ));
    }
    let file: MeshFile = match serde_saphyr::from_str(text) {
        Ok(f) => f,
        Err(e) => return Err(locate_parse_error(text, path, &e)),
    };
    validate(file, path)
}

/// serde reports the first problem without the path to it; re-walk the document as a generic
/// value with the schema below to name the field. If the walk finds nothing (the two parsers
/// disagree on some corner), the YAML parser's own message, with its line and column, is used.
fn locate_parse_error(text: &str, path: &Path, e: &serde_saphyr::Error) -> MeshError {
    let located = serde_saphyr::from_str::<serde_json::Value>(text)
        .ok()
        .and_then(|v| schema::mesh_file(&v, ""));
    let at = e
        .location()
        .map(|l| format!(" (line {}, column {})", l.line(), l.column()))
        .unwrap_or_default();
    match located {
        Some((field, message)) => MeshError::invalid(path, field, format!("{message}{at}")),
        None => MeshError::invalid(path, "(document)", e.without_snippet().to_string()),
    }
}

/// The mesh file's schema as a walker over a generic value, to name the field of a type error.
mod schema {
    use serde::de::DeserializeOwned;
    use serde_json::Value;

    type Found = Option<(String, String)>;
    type Check = fn(&Value, &str) -> Found;

    fn join(path: &str, key: &str) -> String {
        if path.is_empty() {
            key.to_string()
        } else {
            format!("{path}.{key}")
        }
    }

    fn leaf<T: DeserializeOwned>(v: &Value, path: &str) -> Found {
        serde_json::from_value::<T>(v.clone())
            .err()
            .map(|e| (display_path(path), e.to_string()))
    }

    /// A TCP port: what serde would call "expected u16", said as a person would.
    fn port(v: &Value, path: &str) -> Found {
        match v.as_u64() {
            Some(p) if (1..=65535).contains(&p) => None,
            _ => Some((display_path(path), super::port_message(&describe(v)))),
        }
    }

    fn optional_port(v: &Value, path: &str) -> Found {
        if v.is_null() { None } else { port(v, path) }
    }

    /// A value as the message names it: numbers as written, the rest by kind.
    fn describe(v: &Value) -> String {
        match v {
            Value::Number(n) => n.to_string(),
            Value::String(s) => format!("the string {s:?}"),
            Value::Bool(b) => format!("the boolean {b}"),
            Value::Null => "empty".into(),
            Value::Array(_) => "a list".into(),
            Value::Object(_) => "a mapping".into(),
        }
    }

    fn display_path(path: &str) -> String {
        if path.is_empty() {
            "(document)".into()
        } else {
            path.to_string()
        }
    }

    /// An object with the given fields; `whole` reports what the fields alone cannot (a
    /// missing required field).
    fn object(v: &Value, path: &str, fields: &[(&str, Check)], whole: Check) -> Found {
        let Some(map) = v.as_object() else {
            return whole(v, path);
        };
        for key in map.keys() {
            if !fields.iter().any(|(name, _)| name == key) {
                let known: Vec<&str> = fields.iter().map(|(n, _)| *n).collect();
                return Some((
                    join(path, key),
                    format!(
                        "unknown field `{key}`, expected one of {}",
                        known.join(", ")
                    ),
                ));
            }
        }
        for (name, check) in fields {
            if let Some(value) = map.get(*name)
                && let Some(found) = check(value, &join(path, name))
            {
                return Some(found);
            }
        }
        whole(v, path)
    }

    fn list(v: &Value, path: &str, item: Check) -> Found {
        match v.as_array() {
            Some(items) => items
                .iter()
                .enumerate()
                .find_map(|(i, x)| item(x, &format!("{path}[{i}]"))),
            None => leaf::<Vec<Value>>(v, path),
        }
    }

    fn upstream(v: &Value, path: &str) -> Found {
        object(
            v,
            path,
            &[
                ("service", leaf::<String>),
                ("port", port),
                ("localPort", port),
            ],
            leaf::<super::Upstream>,
        )
    }

    fn workload(v: &Value, path: &str) -> Found {
        object(
            v,
            path,
            &[
                ("name", leaf::<String>),
                ("namespace", leaf::<String>),
                ("serviceAccount", leaf::<Option<String>>),
                ("labels", leaf::<std::collections::BTreeMap<String, String>>),
                ("command", leaf::<Option<Vec<String>>>),
                ("env", leaf::<std::collections::BTreeMap<String, String>>),
                ("appPort", optional_port),
                ("inboundPort", port),
                ("adminPort", port),
                ("upstreams", |v, p| list(v, p, upstream)),
            ],
            leaf::<super::Workload>,
        )
    }

    fn service(v: &Value, path: &str) -> Found {
        object(
            v,
            path,
            &[
                ("name", leaf::<String>),
                ("namespace", leaf::<String>),
                ("port", port),
                (
                    "selector",
                    leaf::<std::collections::BTreeMap<String, String>>,
                ),
                ("protocol", leaf::<super::Protocol>),
                ("timeout", leaf::<Option<String>>),
                ("idleTimeout", leaf::<Option<String>>),
                ("retry", retry),
                ("tracing", tracing),
            ],
            leaf::<super::Service>,
        )
    }

    fn retry(v: &Value, path: &str) -> Found {
        if v.is_null() {
            return None;
        }
        object(
            v,
            path,
            &[
                ("codes", leaf::<Vec<u16>>),
                ("attempts", leaf::<Option<u32>>),
                ("backoff", leaf::<Option<String>>),
            ],
            leaf::<palisade_api::call::RetrySpec>,
        )
    }

    fn tracing(v: &Value, path: &str) -> Found {
        if v.is_null() {
            return None;
        }
        object(
            v,
            path,
            &[
                ("spanBudget", leaf::<Option<u32>>),
                ("slowRequest", leaf::<Option<String>>),
            ],
            leaf::<palisade_api::trace::TraceSpec>,
        )
    }

    fn control_plane(v: &Value, path: &str) -> Found {
        object(
            v,
            path,
            &[("port", port)],
            leaf::<super::ControlPlaneSection>,
        )
    }

    pub(super) fn mesh_file(v: &Value, path: &str) -> Found {
        object(
            v,
            path,
            &[
                ("trustDomain", leaf::<String>),
                ("certificateLifetime", leaf::<String>),
                ("controlPlane", control_plane),
                ("defaultPolicy", leaf::<super::DefaultPolicy>),
                ("pathNormalization", leaf::<super::PathNormalization>),
                ("policies", leaf::<Option<std::path::PathBuf>>),
                ("workloads", |v, p| list(v, p, workload)),
                ("services", |v, p| list(v, p, service)),
            ],
            leaf::<super::MeshFile>,
        )
    }
}

/// What every port field of the mesh file says when its value is not a port.
fn port_message(found: &str) -> String {
    format!("must be a port number 1–65535, not {found}")
}

/// A name used in a SPIFFE ID path segment or as a Kubernetes-style name.
fn check_segment(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s == "." || s == ".." {
        return Err(format!("{s:?} is not a valid name"));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_'))
    {
        return Err(format!(
            "{s:?} may contain only letters, digits, '.', '-' and '_' (found {c:?})"
        ));
    }
    Ok(())
}

/// Applies defaults and checks everything that serde cannot: ports, uniqueness, references.
fn validate(file: MeshFile, path: &Path) -> Result<Mesh, MeshError> {
    let err = |field: String, message: String| MeshError::invalid(path, field, message);

    let trust_domain = TrustDomain::new(&file.trust_domain)
        .map_err(|e| err("trustDomain".into(), e.to_string()))?;

    let lifetime = palisade_certs::parse_duration(&file.certificate_lifetime)
        .map_err(|e| err("certificateLifetime".into(), e.to_string()))?;
    if !(MIN_LEAF_TTL..=MAX_LEAF_TTL).contains(&lifetime) {
        return Err(err(
            "certificateLifetime".into(),
            format!("{lifetime:?} is outside {MIN_LEAF_TTL:?}..={MAX_LEAF_TTL:?}"),
        ));
    }
    if lifetime < MIN_PRODUCTION_LIFETIME {
        tracing::warn!(
            file = %path.display(),
            lifetime = ?lifetime,
            "certificateLifetime is under 1m: only meant for tests"
        );
    }

    // Every port here is a listener on 127.0.0.1, so two uses of one port cannot both work.
    let mut ports: HashMap<u16, String> = HashMap::new();
    let mut claim = |port: u16, field: String| -> Result<(), MeshError> {
        if port == 0 {
            return Err(err(field, port_message("0")));
        }
        if let Some(first) = ports.get(&port) {
            return Err(err(
                field,
                format!("port {port} is already used by {first}"),
            ));
        }
        ports.insert(port, field);
        Ok(())
    };
    claim(file.control_plane.port, "controlPlane.port".into())?;

    let mut service_names: HashMap<(String, String), usize> = HashMap::new();
    for (i, s) in file.services.iter().enumerate() {
        let at = |f: &str| format!("services[{i}].{f}");
        check_segment(&s.name).map_err(|m| err(at("name"), m))?;
        check_segment(&s.namespace).map_err(|m| err(at("namespace"), m))?;
        if s.port == 0 {
            return Err(err(at("port"), port_message("0")));
        }
        if let Some(t) = &s.timeout {
            palisade_api::call::parse_timeout(t).map_err(|e| err(at("timeout"), e.to_string()))?;
        }
        if let Some(t) = &s.idle_timeout {
            palisade_api::call::parse_timeout(t)
                .map_err(|e| err(at("idleTimeout"), e.to_string()))?;
        }
        if let Some(r) = &s.retry {
            r.validate().map_err(|e| err(at("retry"), e.to_string()))?;
        }
        if let Some(t) = &s.tracing {
            t.validate()
                .map_err(|e| err(at(&format!("tracing.{}", e.field)), e.message))?;
        }
        if s.selector.is_empty() {
            return Err(err(
                at("selector"),
                "must name at least one label (an empty selector would match every workload)"
                    .into(),
            ));
        }
        if let Some(first) = service_names.insert((s.name.clone(), s.namespace.clone()), i) {
            return Err(err(
                at("name"),
                format!(
                    "service {}.{} is already defined at services[{first}]",
                    s.name, s.namespace
                ),
            ));
        }
    }

    // The namespaces of the mesh: an upstream `name.<one of these>` that is no service is a
    // typo, never a hostname outside the mesh.
    let namespaces: std::collections::HashSet<&str> = file
        .workloads
        .iter()
        .map(|w| w.namespace.as_str())
        .chain(file.services.iter().map(|s| s.namespace.as_str()))
        .collect();
    let mut workload_names: HashMap<String, usize> = HashMap::new();
    for (i, w) in file.workloads.iter().enumerate() {
        let at = |f: &str| format!("workloads[{i}].{f}");
        check_segment(&w.name).map_err(|m| err(at("name"), m))?;
        if let Some(first) = workload_names.insert(w.name.clone(), i) {
            return Err(err(
                at("name"),
                format!(
                    "workload {:?} is already defined at workloads[{first}]",
                    w.name
                ),
            ));
        }
        check_segment(&w.namespace).map_err(|m| err(at("namespace"), m))?;
        check_segment(w.service_account()).map_err(|m| err(at("serviceAccount"), m))?;
        let id = SpiffeId::for_workload(&trust_domain, &w.namespace, w.service_account()).map_err(
            |e| {
                err(
                    at("serviceAccount"),
                    format!("does not make a valid SPIFFE ID: {e}"),
                )
            },
        )?;
        // A workload holding the control plane's identity could impersonate it to every proxy
        // (they trust that ID for config) and receive other workloads' Certify tokens.
        if crate::control_plane_id(&trust_domain).is_ok_and(|cp| cp == id) {
            return Err(err(
                at("serviceAccount"),
                format!(
                    "{id} is reserved for the control plane; give the workload another namespace or service account"
                ),
            ));
        }
        if let Some(cmd) = &w.command
            && cmd.first().is_none_or(|c| c.is_empty())
        {
            return Err(err(
                at("command"),
                "must name a program (omit `command` to start no app)".into(),
            ));
        }
        if let Some(p) = w.app_port {
            claim(p, at("appPort"))?;
        }
        claim(w.inbound_port, at("inboundPort"))?;
        claim(w.admin_port, at("adminPort"))?;
        for (j, u) in w.upstreams.iter().enumerate() {
            let at = |f: &str| format!("workloads[{i}].upstreams[{j}].{f}");
            match upstream_target(u, &service_names, &namespaces) {
                Ok(UpstreamTarget::Service(k)) => {
                    let svc = &file.services[k];
                    if u.port != svc.port {
                        return Err(err(
                            at("port"),
                            format!(
                                "service {}.{} has port {}, not {}",
                                svc.name, svc.namespace, svc.port, u.port
                            ),
                        ));
                    }
                }
                Ok(UpstreamTarget::Egress) => {
                    if u.port == 0 {
                        return Err(err(at("port"), port_message("0")));
                    }
                }
                Err(m) => return Err(err(at("service"), m)),
            }
            claim(u.local_port, at("localPort"))?;
        }
    }

    let policies_dir = file.policies.as_ref().map(|p| {
        if p.is_absolute() {
            p.clone()
        } else {
            path.parent().unwrap_or(Path::new(".")).join(p)
        }
    });
    let workloads = file
        .workloads
        .into_iter()
        .map(|mut w| {
            // Make the default explicit so every consumer sees the same account.
            if w.service_account.is_none() {
                w.service_account = Some(w.name.clone());
            }
            w
        })
        .collect();
    Ok(Mesh {
        path: path.to_path_buf(),
        trust_domain,
        certificate_lifetime: lifetime,
        control_plane: file.control_plane,
        default_policy: file.default_policy,
        path_normalization: file.path_normalization,
        policies_dir,
        workloads,
        services: file.services,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(s: &str) -> Result<Mesh, MeshError> {
        parse(s, Path::new("/m/mesh.yaml"))
    }

    const GOOD: &str = r#"
trustDomain: example.org
certificateLifetime: 1h
policies: policies/
workloads:
  - name: web
    namespace: demo
    labels: { app: web }
    appPort: 18080
    inboundPort: 14143
    adminPort: 14191
    upstreams:
      - { service: api.demo, port: 8080, localPort: 19001 }
  - name: api
    namespace: demo
    labels: { app: api }
    appPort: 18081
    inboundPort: 14144
    adminPort: 14192
services:
  - { name: api, namespace: demo, port: 8080, selector: { app: api }, protocol: http }
"#;

    #[test]
    fn good_file_with_defaults() {
        let m = parse_str(GOOD).unwrap();
        assert_eq!(m.trust_domain.as_str(), "example.org");
        assert_eq!(m.certificate_lifetime, Duration::from_secs(3600));
        assert_eq!(m.control_plane.port, 8086);
        assert_eq!(m.policies_dir.as_deref(), Some(Path::new("/m/policies/")));
        let web = m.workload("web").unwrap();
        assert_eq!(web.service_account(), "web");
        assert_eq!(
            web.spiffe_id(&m).unwrap().as_str(),
            "spiffe://example.org/ns/demo/sa/web"
        );
        assert_eq!(m.services[0].protocol, Protocol::Http);
        assert!(m.services[0].selects(m.workload("api").unwrap()));
        assert!(!m.services[0].selects(web));
    }

    #[test]
    fn a_services_timeout_and_retry_are_checked_and_reach_its_wire_form() {
        let with =
            |extra: &str| GOOD.replace("protocol: http }", &format!("protocol: http, {extra} }}"));
        let m = parse_str(&with(
            "timeout: 2s, idleTimeout: 30s, retry: { codes: [503, 502], attempts: 3, backoff: 50ms }",
        ))
        .unwrap();
        let pieces = crate::pieces::Pieces::build(&m);
        let wire = &pieces.service("api", "demo", 8080).unwrap().msg;
        assert_eq!(wire.request_timeout_ms, 2000);
        assert_eq!(wire.idle_timeout_ms, 30_000);
        let retry = wire.retry.as_ref().expect("a retry policy");
        assert_eq!(
            (retry.codes.as_slice(), retry.attempts, retry.backoff_ms),
            (&[502, 503][..], 3, 50)
        );
        let e = field_of(&with("idleTimeout: never"));
        assert!(e.starts_with("services[0].idleTimeout:"), "{e}");
        let e = field_of(&with("timeout: 0s"));
        assert!(e.starts_with("services[0].timeout:"), "{e}");
        let e = field_of(&with("retry: { codes: [503], attempts: 40 }"));
        assert!(e.starts_with("services[0].retry: attempts"), "{e}");
        let e = field_of(&with("retry: { codes: [503], tries: 2 }"));
        assert!(
            e.starts_with("services[0].retry.tries: unknown field"),
            "{e}"
        );
    }

    #[test]
    fn a_services_tracing_is_checked_and_reaches_its_wire_form() {
        let with =
            |extra: &str| GOOD.replace("protocol: http }", &format!("protocol: http, {extra} }}"));
        let m = parse_str(&with("tracing: { spanBudget: 50, slowRequest: 500ms }")).unwrap();
        let pieces = crate::pieces::Pieces::build(&m);
        let wire = &pieces.service("api", "demo", 8080).unwrap().msg;
        let t = wire.trace.as_ref().expect("a trace policy");
        assert_eq!((t.span_budget_per_second, t.slow_ms), (50, 500));
        // One field alone; none at all sends nothing.
        let m = parse_str(&with("tracing: { slowRequest: 2s }")).unwrap();
        let pieces = crate::pieces::Pieces::build(&m);
        let t = pieces.service("api", "demo", 8080).unwrap().msg.trace;
        assert_eq!(
            t.map(|t| (t.span_budget_per_second, t.slow_ms)),
            Some((0, 2000))
        );
        let m = parse_str(&with("tracing: {}")).unwrap();
        let pieces = crate::pieces::Pieces::build(&m);
        assert_eq!(pieces.service("api", "demo", 8080).unwrap().msg.trace, None);
        let m = parse_str(GOOD).unwrap();
        let pieces = crate::pieces::Pieces::build(&m);
        assert_eq!(pieces.service("api", "demo", 8080).unwrap().msg.trace, None);

        for (extra, field) in [
            (
                "tracing: { spanBudget: 0 }",
                "services[0].tracing.spanBudget: must be 1–1000000",
            ),
            (
                "tracing: { spanBudget: 1000001 }",
                "services[0].tracing.spanBudget: must be 1–1000000",
            ),
            (
                "tracing: { spanBudget: -1 }",
                "services[0].tracing.spanBudget:",
            ),
            (
                "tracing: { spanBudget: lots }",
                "services[0].tracing.spanBudget:",
            ),
            (
                "tracing: { slowRequest: soon }",
                "services[0].tracing.slowRequest:",
            ),
            (
                "tracing: { slowRequest: 0ms }",
                "services[0].tracing.slowRequest:",
            ),
            (
                "tracing: { slowRequest: 2d }",
                "services[0].tracing.slowRequest:",
            ),
            (
                "tracing: { sampleRate: 1 }",
                "services[0].tracing.sampleRate: unknown field",
            ),
            ("tracing: 50", "services[0].tracing:"),
        ] {
            let e = field_of(&with(extra));
            assert!(e.starts_with(field), "{extra}: {e}");
        }
    }

    #[test]
    fn minimal_file() {
        assert!(parse_str("# nothing\n\n").is_err());
        let m = parse_str("workloads: []\n").unwrap();
        assert_eq!(m.trust_domain.as_str(), "cluster.local");
        assert_eq!(m.certificate_lifetime, Duration::from_secs(86400));
        assert_eq!(m.default_policy, DefaultPolicy::default());
        assert_eq!(m.path_normalization, PathNormalization::Base);
        let m = parse_str("pathNormalization: DECODE_AND_MERGE_SLASHES\n").unwrap();
        assert_eq!(
            m.path_normalization,
            PathNormalization::DecodeAndMergeSlashes
        );
        let e = field_of("pathNormalization: NONE\n");
        assert!(e.starts_with("pathNormalization:"), "{e}");
        assert!(m.policies_dir.is_none());
    }

    fn field_of(yaml: &str) -> String {
        match parse_str(yaml) {
            Err(MeshError::Invalid { field, message, .. }) => format!("{field}: {message}"),
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn errors_name_the_field() {
        let e = field_of(&GOOD.replace("inboundPort: 14144", "inboundPort: nope"));
        assert!(e.starts_with("workloads[1].inboundPort:"), "{e}");
        let e = field_of(&GOOD.replace("adminPort: 14192", "adminPort: 14192\n    bogus: 1"));
        assert!(e.starts_with("workloads[1].bogus: unknown field"), "{e}");
        let e = field_of(&GOOD.replace("localPort: 19001", "localPort: 14191"));
        assert!(
            e.starts_with("workloads[0].upstreams[0].localPort: port 14191 is already used by workloads[0].adminPort"),
            "{e}"
        );
        let e = field_of(&GOOD.replace("service: api.demo", "service: nope.demo"));
        assert!(e.starts_with("workloads[0].upstreams[0].service:"), "{e}");
        let e = field_of(&GOOD.replace("port: 8080, localPort", "port: 8081, localPort"));
        assert!(e.starts_with("workloads[0].upstreams[0].port:"), "{e}");
        let e = field_of(&GOOD.replace("name: api\n", "name: web\n"));
        assert!(e.starts_with("workloads[1].name:"), "{e}");
        let e = field_of(&GOOD.replace("selector: { app: api }", "selector: {}"));
        assert!(e.starts_with("services[0].selector:"), "{e}");
        let e = field_of(&GOOD.replace("protocol: http", "protocol: smtp"));
        assert!(e.starts_with("services[0].protocol:"), "{e}");
        let e = field_of(&GOOD.replace("appPort: 18081", "appPort: 0"));
        assert!(e.starts_with("workloads[1].appPort:"), "{e}");
        // Ports are said to be ports, whatever serde's type for them.
        for (from, to, field, found) in [
            (
                "appPort: 18081",
                "appPort: 70000",
                "workloads[1].appPort",
                "70000",
            ),
            (
                "inboundPort: 14144",
                "inboundPort: -1",
                "workloads[1].inboundPort",
                "-1",
            ),
            (
                "adminPort: 14192",
                "adminPort: \"x\"",
                "workloads[1].adminPort",
                "the string \"x\"",
            ),
            (
                "localPort: 19001",
                "localPort: 1.5",
                "workloads[0].upstreams[0].localPort",
                "1.5",
            ),
            (
                "port: 8080, selector",
                "port: 65536, selector",
                "services[0].port",
                "65536",
            ),
            (
                "policies: policies/",
                "controlPlane: { port: 0 }",
                "controlPlane.port",
                "0",
            ),
        ] {
            let e = field_of(&GOOD.replace(from, to));
            assert!(
                e.starts_with(&format!(
                    "{field}: must be a port number 1–65535, not {found}"
                )),
                "{e}"
            );
            assert!(!e.contains("u16"), "{e}");
        }
        let e = field_of(&GOOD.replace("certificateLifetime: 1h", "certificateLifetime: 1y"));
        assert!(e.starts_with("certificateLifetime:"), "{e}");
        let e = field_of(&GOOD.replace("trustDomain: example.org", "trustDomain: Example"));
        assert!(e.starts_with("trustDomain:"), "{e}");
        let e = field_of(&GOOD.replace(
            "    namespace: demo\n    labels: { app: web }",
            "    namespace: de/mo\n    labels: { app: web }",
        ));
        assert!(e.starts_with("workloads[0].namespace:"), "{e}");
        let e = field_of(&GOOD.replace("    inboundPort: 14143\n", ""));
        assert!(e.starts_with("workloads[0]:"), "{e}");
        assert!(e.contains("inboundPort"), "{e}");
        let e = field_of("workloads: [\n");
        assert!(e.starts_with("(document):"), "{e}");
    }

    #[test]
    fn an_upstream_outside_the_mesh_is_egress_and_a_mesh_namespace_typo_is_refused() {
        let with = |service: &str| {
            GOOD.replace(
                "      - { service: api.demo, port: 8080, localPort: 19001 }",
                &format!(
                    "      - {{ service: api.demo, port: 8080, localPort: 19001 }}\n      - {{ service: {service}, port: 443, localPort: 19005 }}"
                ),
            )
        };
        for egress in ["example.com", "api.github.com", "example.demo.", "a.b.demo"] {
            let m = parse_str(&with(egress)).unwrap_or_else(|e| panic!("{egress}: {e}"));
            assert_eq!(m.workloads[0].upstreams[1].service, egress);
            // Egress upstreams bring no service into the workload's config.
            let pieces = crate::pieces::Pieces::build(&m);
            assert_eq!(pieces.services_for(&m.workloads[0]).len(), 1, "{egress}");
        }
        for (typo, says) in [
            ("nope.demo", "no service nope.demo in `services`"),
            ("nope", "no service nope.default in `services`"),
            ("Example.com", "lower case"),
            ("exa mple.com", "no DNS name for egress"),
            ("10.0.0.1", "an IP address is not a hostname"),
        ] {
            let e = field_of(&with(typo));
            assert!(
                e.starts_with("workloads[0].upstreams[1].service:") && e.contains(says),
                "{typo}: {e}"
            );
        }
        // A mesh service keeps its port check; an egress name has any port.
        let e = field_of(&with("api.demo"));
        assert!(
            e.starts_with(
                "workloads[0].upstreams[1].port: service api.demo has port 8080, not 443"
            ),
            "{e}"
        );
    }

    #[test]
    fn the_control_planes_identity_is_reserved() {
        let explicit = GOOD.replace(
            "    namespace: demo\n    labels: { app: api }",
            "    namespace: palisade-system\n    serviceAccount: control-plane\n    labels: { app: api }",
        );
        let e = field_of(&explicit);
        assert!(e.starts_with("workloads[1].serviceAccount:"), "{e}");
        assert!(e.contains("reserved for the control plane"), "{e}");
        // The service account defaults to the workload's name.
        let implicit = GOOD
            .replace("name: api\n", "name: control-plane\n")
            .replace(
                "    namespace: demo\n    labels: { app: api }",
                "    namespace: palisade-system\n    labels: { app: api }",
            );
        let e = field_of(&implicit);
        assert!(e.starts_with("workloads[1].serviceAccount:"), "{e}");
        // The same account in another namespace is an ordinary workload.
        assert!(parse_str(&GOOD.replace("name: api\n", "name: control-plane\n")).is_ok());
    }

    /// The overflowing lifetime used to panic the parser, and with it the control plane (at
    /// start) or its config watcher (on a live reload).
    #[test]
    fn an_overflowing_lifetime_is_an_error_naming_the_field() {
        for bad in [
            "18446744073709551615s1s",
            "18446744073709551615s 500ms 500ms",
        ] {
            let e = field_of(&GOOD.replace(
                "certificateLifetime: 1h",
                &format!("certificateLifetime: \"{bad}\""),
            ));
            assert!(e.starts_with("certificateLifetime:"), "{e}");
            assert!(e.contains("too large"), "{e}");
        }
    }

    #[test]
    fn short_lifetimes_are_for_tests_but_accepted() {
        let m = parse_str("certificateLifetime: 2s\n").unwrap();
        assert_eq!(m.certificate_lifetime, Duration::from_secs(2));
        assert!(parse_str("certificateLifetime: 500ms\n").is_err());
    }
}
