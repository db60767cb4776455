//! The proxy's configuration: static settings fixed at start (addresses, credentials source,
//! timeouts, limits) and the dynamic [`Snapshot`] (inbound policy, services and endpoints) that
//! the control plane streams — or a static file provides — and that is swapped atomically.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use palisade_api::policy::DefaultPolicy;
use palisade_api::v1;
use palisade_certs::SpiffeId;
use serde::Deserialize;

use crate::authz::{Authorizer, AuthzError};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: {message}")]
    File { file: PathBuf, message: String },
    #[error("service {service}: endpoint {index}: {message}")]
    Endpoint {
        service: String,
        index: usize,
        message: String,
    },
    #[error("{field}: {message}")]
    Field { field: String, message: String },
}

pub use palisade_api::{MtlsMode, PathNormalization, Protocol};

/// Where the proxy's certificate comes from.
#[derive(Clone, Debug)]
pub enum CredentialSource {
    /// PEM files written by `palisade ca issue` (static mode, tests).
    Files {
        cert: PathBuf,
        key: PathBuf,
        bundle: PathBuf,
    },
    /// The control plane's Identity service, bootstrapped with a token.
    ControlPlane {
        /// Every replica's address (or names for them), tried in turn.
        addrs: crate::control_plane::ControlPlaneAddrs,
        token: String,
        /// Where `token` came from, read again before each Certify: a projected
        /// ServiceAccount token is rotated by the kubelet and expires.
        token_file: Option<PathBuf>,
        bundle: PathBuf,
        identity: SpiffeId,
    },
}

#[derive(Clone, Debug)]
pub struct Timeouts {
    pub connect: Duration,
    pub detect: Duration,
    pub handshake: Duration,
    /// Idle h2 connections between proxies are closed after this long.
    pub idle: Duration,
    /// How long SIGTERM waits for in-flight requests.
    pub drain: Duration,
    /// An opaque TCP tunnel with no byte either way for this long is closed (Istio's TCP
    /// idle timeout, 1h by default).
    pub tcp_idle: Duration,
    /// An HTTP/1.1 client must have sent a whole request head within this long of the
    /// connection becoming ready for one (hyper's one timer, so it also bounds a keep-alive
    /// connection's idle time between requests): slowloris connections cannot outlast it by
    /// trickling bytes.
    pub header_read: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(3),
            detect: Duration::from_secs(1),
            handshake: Duration::from_secs(5),
            idle: Duration::from_secs(90),
            drain: Duration::from_secs(10),
            tcp_idle: Duration::from_secs(3600),
            header_read: Duration::from_secs(90),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub max_concurrent_streams: u32,
    pub max_connections: usize,
    /// Services a transparent proxy holds because the app dialled them; past it the least
    /// recently dialled are released.
    pub max_on_demand_services: usize,
    /// Distinct request shapes the traffic summary keeps per window (0: none kept), and the
    /// window ([`crate::summary`]).
    pub traffic_summary_entries: usize,
    pub traffic_summary_window: std::time::Duration,
    /// HTTP/2 streams a client may open and reset before the proxy has served them, before
    /// it is sent GOAWAY `ENHANCE_YOUR_CALM` (rapid reset, CVE-2023-44487).
    pub h2_max_pending_resets: usize,
    /// HTTP/2 streams the proxy may reset on a client's connection because of the client's
    /// errors before it closes the connection (a flood of streams that each provoke one).
    pub h2_max_local_error_resets: Option<usize>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 64 * 1024,
            max_concurrent_streams: 1000,
            max_connections: 10_000,
            max_on_demand_services: 1000,
            traffic_summary_entries: crate::summary::DEFAULT_ENTRIES,
            traffic_summary_window: crate::summary::DEFAULT_WINDOW,
            h2_max_pending_resets: 20,
            h2_max_local_error_resets: Some(1024),
        }
    }
}

/// A local outbound listener: the app connects here to reach `service`.
#[derive(Clone, Debug)]
pub struct UpstreamListener {
    /// `name.namespace:port`, as the mesh file's `upstreams` name it.
    pub service: String,
    pub listen: SocketAddr,
}

/// Settings fixed for the life of the proxy process.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    pub workload: String,
    pub identity: SpiffeId,
    pub credentials: CredentialSource,
    pub inbound_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The app's plaintext address; absent when the workload only calls out.
    pub app_addr: Option<SocketAddr>,
    pub upstreams: Vec<UpstreamListener>,
    /// Transparent outbound listener (iptables REDIRECT; the target is `SO_ORIGINAL_DST`).
    pub transparent_addr: Option<SocketAddr>,
    /// A static snapshot file, used instead of the control plane's Discovery service.
    pub static_config: Option<PathBuf>,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub access_log: bool,
    /// Span export and sampling (`OTEL_*`); default: no export.
    pub tracing: crate::trace::TraceConfig,
    /// Whether the admin port answers `POST /shutdown` (loopback, with the admin header).
    /// Off by default: every container of a pod shares its loopback.
    pub admin_shutdown: bool,
    /// How endpoints are picked (HTTPRoute weights come with traffic management).
    pub balancer: crate::balance::Strategy,
    /// The app's kubelet probes the injector pointed at the admin port
    /// ([`palisade_api::app_probe`]).
    pub app_probes: std::sync::Arc<palisade_api::app_probe::AppProbes>,
    /// The DNS server that resolves egress names (names no mesh service matches); None: the
    /// name servers of /etc/resolv.conf, as the app's own lookups would use.
    pub dns_server: Option<SocketAddr>,
}

/// One endpoint of a service: the inbound port of a peer proxy and the identity it must prove.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointConfig {
    pub addr: SocketAddr,
    pub identity: SpiffeId,
    pub weight: u32,
    pub workload: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceConfig {
    /// `name.namespace:port`.
    pub key: String,
    pub protocol: Protocol,
    pub endpoints: Vec<EndpointConfig>,
    /// Virtual IP and port pairs (Kubernetes ClusterIPs) that name this service to a
    /// redirected connection.
    pub virtual_addrs: Vec<SocketAddr>,
    /// Past it (response headers not in, retries included) the caller gets 504.
    pub timeout: Option<std::time::Duration>,
    /// A response stream without a frame for this long is cancelled.
    pub idle_timeout: Option<std::time::Duration>,
    pub retry: Option<palisade_api::call::RetryPolicy>,
    /// Its HTTPRoutes and GRPCRoutes, compiled.
    pub routes: Arc<crate::routing::Routes>,
    /// Which of its spans are kept (each rule of `routes` has its own, over this one).
    pub trace: crate::trace::TracePolicy,
}

/// Inbound settings of this workload.
#[derive(Clone, Debug)]
pub struct InboundConfig {
    pub mode: MtlsMode,
    pub port_modes: HashMap<u16, MtlsMode>,
    pub app_protocol: Protocol,
    pub path_normalization: PathNormalization,
    pub authz: Arc<Authorizer>,
    /// The RateLimitPolicy selecting this workload; its buckets survive a config change that
    /// keeps the policy (`Ctx::apply`).
    pub rate_limit: Option<Arc<crate::ratelimit::Limiter>>,
    /// The routes of the services this workload backs: matched for the route label and for
    /// authorization, never followed (the caller's proxy routed already).
    pub routes: Arc<crate::routing::Routes>,
    /// The EgressPolicy selecting this workload (its outbound side, despite the struct: the
    /// workload's own settings travel together); None: every egress destination is allowed.
    pub egress: Option<Arc<crate::egress::EgressPolicy>>,
}

impl InboundConfig {
    /// The mode enforced on `port`: never UNSET, so a mode set by hand (tests, tools) cannot
    /// let plaintext in by being neither STRICT nor anything else.
    pub fn mode_for(&self, port: u16) -> MtlsMode {
        self.port_modes
            .get(&port)
            .copied()
            .unwrap_or(self.mode)
            .effective()
    }
}

/// A complete dynamic configuration; replaced whole, never edited in place.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub version: u64,
    pub inbound: InboundConfig,
    pub services: HashMap<String, Arc<ServiceConfig>>,
    /// Trust anchors that came with the config (DER), empty when unchanged.
    pub trust_bundle: Vec<Vec<u8>>,
}

impl Snapshot {
    /// The config before anything arrived: STRICT, no services, the mesh default `allow`.
    pub fn empty() -> Self {
        Snapshot {
            version: 0,
            inbound: InboundConfig {
                mode: MtlsMode::Strict,
                port_modes: HashMap::new(),
                app_protocol: Protocol::Detect,
                path_normalization: PathNormalization::Base,
                authz: Arc::new(Authorizer::allow_all()),
                rate_limit: None,
                routes: Arc::default(),
                egress: None,
            },
            services: HashMap::new(),
            trust_bundle: Vec::new(),
        }
    }

    pub fn from_proto(cfg: &v1::ProxyConfig) -> Result<Self, ConfigError> {
        let inbound = cfg.inbound.clone().unwrap_or_default();
        // An unknown mode (a newer control plane) is STRICT, the mode that refuses plaintext.
        let mode = |v: i32| {
            MtlsMode::from_proto(v)
                .unwrap_or(MtlsMode::Strict)
                .effective()
        };
        let mut port_modes = HashMap::new();
        for (port, m) in &inbound.port_modes {
            let port = u16::try_from(*port).map_err(|_| ConfigError::Field {
                field: "inbound.port_modes".into(),
                message: format!("port {port} out of range"),
            })?;
            port_modes.insert(port, mode(*m));
        }
        let unknown = |field: &str, value: i32| ConfigError::Field {
            field: field.into(),
            message: format!("unknown value {value}"),
        };
        let app_protocol = Protocol::from_proto(inbound.app_protocol)
            .ok_or_else(|| unknown("inbound.app_protocol", inbound.app_protocol))?;
        let path_normalization = PathNormalization::from_proto(inbound.path_normalization)
            .ok_or_else(|| unknown("inbound.path_normalization", inbound.path_normalization))?;
        let default = DefaultPolicy::from_proto(inbound.default_policy)
            .ok_or_else(|| unknown("inbound.default_policy", inbound.default_policy))?;
        let authz = Authorizer::compile(default, &inbound.authorization_policies).map_err(
            |AuthzError::Invalid {
                 policy,
                 field,
                 message,
             }| ConfigError::Field {
                field: format!("inbound.{field}"),
                message: format!("policy {policy}: {message}"),
            },
        )?;
        let rate_limit = inbound
            .rate_limit
            .as_ref()
            .map(|r| {
                crate::ratelimit::Limiter::compile(r).map_err(|message| ConfigError::Field {
                    field: "inbound.rate_limit".into(),
                    message: format!("{}: {message}", r.name),
                })
            })
            .transpose()?
            .map(Arc::new);
        let inbound_routes =
            crate::routing::Routes::compile(&inbound.routes).map_err(|e| ConfigError::Field {
                field: "inbound.routes".into(),
                message: e.to_string(),
            })?;
        let egress = inbound
            .egress
            .as_ref()
            .map(|e| {
                crate::egress::EgressPolicy::compile(e).map_err(|message| ConfigError::Field {
                    field: "inbound.egress".into(),
                    message: format!("{}: {message}", e.name),
                })
            })
            .transpose()?
            .map(Arc::new);
        let mut services = HashMap::new();
        for s in &cfg.services {
            let key = format!("{}.{}:{}", s.name, s.namespace, s.port);
            let protocol = Protocol::from_proto(s.protocol)
                .ok_or_else(|| unknown(&format!("services[{key}].protocol"), s.protocol))?;
            let mut endpoints = Vec::with_capacity(s.endpoints.len());
            for (index, e) in s.endpoints.iter().enumerate() {
                let err = |message: String| ConfigError::Endpoint {
                    service: key.clone(),
                    index,
                    message,
                };
                let addr = e
                    .address
                    .parse()
                    .map_err(|_| err(format!("bad address {:?}", e.address)))?;
                let identity = SpiffeId::parse(&e.identity)
                    .map_err(|x| err(format!("bad identity {:?}: {x}", e.identity)))?;
                endpoints.push(EndpointConfig {
                    addr,
                    identity,
                    weight: e.weight.max(1),
                    workload: e.workload.clone(),
                });
            }
            let port = u16::try_from(s.port).map_err(|_| ConfigError::Field {
                field: format!("services[{key}].port"),
                message: format!("{} is not a port", s.port),
            })?;
            let mut virtual_addrs = Vec::with_capacity(s.virtual_ips.len());
            for ip in &s.virtual_ips {
                let ip: std::net::IpAddr = ip.parse().map_err(|_| ConfigError::Field {
                    field: format!("services[{key}].virtual_ips"),
                    message: format!("{ip:?} is not an IP address"),
                })?;
                virtual_addrs.push(SocketAddr::new(ip, port));
            }
            let call_err = |field: &str, e: palisade_api::call::CallError| ConfigError::Field {
                field: format!("services[{key}].{field}"),
                message: e.to_string(),
            };
            let timeout = palisade_api::call::timeout_from_proto(s.request_timeout_ms)
                .map_err(|e| call_err("request_timeout_ms", e))?;
            let idle_timeout = palisade_api::call::timeout_from_proto(s.idle_timeout_ms)
                .map_err(|e| call_err("idle_timeout_ms", e))?;
            let retry = s
                .retry
                .as_ref()
                .map(palisade_api::call::RetryPolicy::from_proto)
                .transpose()
                .map_err(|e| call_err("retry", e))?;
            let trace =
                palisade_api::trace::TracePolicy::from_proto(s.trace.as_ref()).map_err(|e| {
                    ConfigError::Field {
                        field: format!("services[{key}].trace.{}", e.field),
                        message: e.message,
                    }
                })?;
            let defaults = crate::routing::Defaults {
                request_timeout: timeout,
                retry: retry.clone(),
                trace,
            };
            let routes =
                crate::routing::Routes::compile_with(&s.routes, &defaults).map_err(|e| {
                    ConfigError::Field {
                        field: format!("services[{key}].routes"),
                        message: e.to_string(),
                    }
                })?;
            services.insert(
                key.clone(),
                Arc::new(ServiceConfig {
                    key,
                    protocol,
                    endpoints,
                    virtual_addrs,
                    timeout,
                    idle_timeout,
                    retry,
                    routes: Arc::new(routes),
                    trace,
                }),
            );
        }
        Ok(Snapshot {
            version: cfg.version,
            inbound: InboundConfig {
                mode: mode(inbound.mode),
                port_modes,
                app_protocol,
                path_normalization,
                authz: Arc::new(authz),
                rate_limit,
                routes: Arc::new(inbound_routes),
                egress,
            },
            services,
            trust_bundle: cfg.trust_bundle_der.clone(),
        })
    }

    /// Loads a static snapshot file (YAML), the no-control-plane mode of `palisade proxy`.
    pub fn load_static(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
            file: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Self::parse_static(&text, path)
    }

    /// Parses the text of a static snapshot file; `path` names the file in errors.
    pub fn parse_static(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let file_err = |message: String| ConfigError::File {
            file: path.to_path_buf(),
            message,
        };
        let file: StaticFile = serde_saphyr::from_str(text).map_err(|e| file_err(e.to_string()))?;
        let protocol = |field: &str, p: Option<String>| {
            Protocol::parse(p.as_deref().unwrap_or_default())
                .map_err(|e| file_err(format!("{field}: {e}")))
        };
        let mut cfg = v1::ProxyConfig {
            version: 1,
            inbound: Some(v1::Inbound {
                mode: file.mode.effective().to_proto() as i32,
                app_protocol: protocol("appProtocol", file.app_protocol)?.to_proto() as i32,
                path_normalization: file.path_normalization.to_proto() as i32,
                ..Default::default()
            }),
            ..Default::default()
        };
        for (i, s) in file.services.into_iter().enumerate() {
            let (name, namespace) = s
                .name
                .split_once('.')
                .ok_or_else(|| file_err(format!("service {:?} must be name.namespace", s.name)))?;
            cfg.services.push(v1::Service {
                name: name.to_string(),
                namespace: namespace.to_string(),
                port: u32::from(s.port),
                protocol: protocol(&format!("services[{i}].protocol"), s.protocol)?.to_proto()
                    as i32,
                virtual_ips: s.virtual_ips,
                request_timeout_ms: palisade_api::call::timeout_to_proto(
                    s.timeout
                        .as_deref()
                        .map(palisade_api::call::parse_timeout)
                        .transpose()
                        .map_err(|e| file_err(format!("services[{i}].timeout: {e}")))?,
                ),
                idle_timeout_ms: palisade_api::call::timeout_to_proto(
                    s.idle_timeout
                        .as_deref()
                        .map(palisade_api::call::parse_timeout)
                        .transpose()
                        .map_err(|e| file_err(format!("services[{i}].idleTimeout: {e}")))?,
                ),
                retry: s
                    .retry
                    .as_ref()
                    .map(|r| r.validate().map(|p| p.to_proto()))
                    .transpose()
                    .map_err(|e| file_err(format!("services[{i}].retry: {e}")))?,
                trace: s
                    .tracing
                    .as_ref()
                    .map(palisade_api::trace::TraceSpec::validate)
                    .transpose()
                    .map_err(|e| file_err(format!("services[{i}].tracing.{e}")))?
                    .and_then(|t| t.to_proto()),
                routes: Vec::new(),
                endpoints: s
                    .endpoints
                    .into_iter()
                    .map(|e| v1::Endpoint {
                        address: e.address,
                        identity: e.identity,
                        weight: e.weight.unwrap_or(1),
                        workload: e.workload.unwrap_or_default(),
                        ..Default::default()
                    })
                    .collect(),
            });
        }
        attach_routes(&mut cfg, &file.routes).map_err(file_err)?;
        if let Some(doc) = &file.rate_limit {
            match palisade_api::policy::parse_object("rateLimit", doc) {
                Ok(palisade_api::policy::Resource::RateLimitPolicy(p)) => {
                    if let Some(i) = cfg.inbound.as_mut() {
                        i.rate_limit = Some(palisade_api::policy::traffic::wire_rate_limit(&p));
                    }
                }
                Ok(other) => {
                    return Err(file_err(format!(
                        "rateLimit: a {} is not a RateLimitPolicy",
                        other.kind()
                    )));
                }
                Err(errors) => {
                    return Err(file_err(
                        errors
                            .iter()
                            .map(|e| e.to_string())
                            .collect::<Vec<_>>()
                            .join("; "),
                    ));
                }
            }
        }
        Snapshot::from_proto(&cfg).map_err(|e| file_err(e.to_string()))
    }
}

/// Parses the static file's route documents and gives each service the routes whose parent it
/// is, faults resolved.
fn attach_routes(cfg: &mut v1::ProxyConfig, docs: &[serde_json::Value]) -> Result<(), String> {
    use palisade_api::policy::{self, Resource};
    let mut routes = Vec::new();
    let mut faults = std::collections::BTreeMap::new();
    for (i, doc) in docs.iter().enumerate() {
        match policy::parse_object(&format!("routes[{i}]"), doc) {
            Ok(Resource::Route(r)) => routes.push(r),
            Ok(Resource::HttpFault(f)) => {
                faults.insert(
                    (f.metadata.namespace().to_string(), f.metadata.name.clone()),
                    f,
                );
            }
            Ok(other) => return Err(format!("routes[{i}]: a {} is not a route", other.kind())),
            Err(errors) => {
                return Err(errors
                    .iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("; "));
            }
        }
    }
    // A static proxy does not know which services it backs: it matches every route inbound,
    // each with its effective trace policy (over that of the first service of the file it
    // attaches to), as the control plane sends them.
    let inbound: Vec<v1::Route> = routes
        .iter()
        .map(|r| {
            let mut wire = policy::route::wire_route(r, &faults);
            let service = cfg
                .services
                .iter()
                .find(|s| {
                    u16::try_from(s.port).is_ok_and(|p| r.attaches_to(&s.name, &s.namespace, p))
                })
                .and_then(|s| palisade_api::trace::TracePolicy::from_proto(s.trace.as_ref()).ok())
                .unwrap_or_default();
            wire.trace = r.trace.or(service).to_proto();
            wire
        })
        .collect();
    if let Some(i) = cfg.inbound.as_mut() {
        i.routes = inbound;
    }
    for s in &mut cfg.services {
        let port = u16::try_from(s.port).unwrap_or(0);
        s.routes = routes
            .iter()
            .filter(|r| r.attaches_to(&s.name, &s.namespace, port))
            .map(|r| policy::route::wire_route(r, &faults))
            .collect();
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct StaticFile {
    #[serde(default)]
    mode: MtlsMode,
    app_protocol: Option<String>,
    #[serde(default)]
    path_normalization: PathNormalization,
    #[serde(default)]
    services: Vec<StaticService>,
    /// HTTPRoute / GRPCRoute / HTTPFault documents, as in a policies directory; each route
    /// attaches to the services of this file its parentRefs name.
    #[serde(default)]
    routes: Vec<serde_json::Value>,
    /// A RateLimitPolicy document for this proxy's inbound side (its selector is not read).
    #[serde(default)]
    rate_limit: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct StaticService {
    name: String,
    #[serde(deserialize_with = "port")]
    port: u16,
    protocol: Option<String>,
    #[serde(default)]
    virtual_ips: Vec<String>,
    #[serde(default)]
    endpoints: Vec<StaticEndpoint>,
    timeout: Option<String>,
    idle_timeout: Option<String>,
    retry: Option<palisade_api::call::RetrySpec>,
    tracing: Option<palisade_api::trace::TraceSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct StaticEndpoint {
    address: String,
    identity: String,
    weight: Option<u32>,
    workload: Option<String>,
}

/// A TCP port, refused as "must be a port number 1–65535, not X" (serde's own message would
/// be "expected u16").
fn port<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    struct Port;
    impl serde::de::Visitor<'_> for Port {
        type Value = u16;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a port number 1–65535")
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<u16, E> {
            u16::try_from(v)
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| E::custom(format!("must be a port number 1–65535, not {v}")))
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<u16, E> {
            match u64::try_from(v) {
                Ok(v) => self.visit_u64(v),
                Err(_) => Err(E::custom(format!("must be a port number 1–65535, not {v}"))),
            }
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<u16, E> {
            Err(E::custom(format!("must be a port number 1–65535, not {v}")))
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<u16, E> {
            Err(E::custom(format!(
                "must be a port number 1–65535, not the string {v:?}"
            )))
        }
    }
    d.deserialize_any(Port)
}

#[cfg(test)]
mod tests {
    use palisade_api::authorization::string_match;

    use super::*;

    fn policy() -> v1::Authorization {
        v1::Authorization {
            name: "p".into(),
            namespace: "demo".into(),
            action: v1::Action::Deny as i32,
            rules: vec![v1::Rule {
                from: vec![v1::rule::From {
                    source: Some(v1::Source {
                        principals: vec![string_match("cluster.local/ns/demo/sa/web")],
                        ..Default::default()
                    }),
                }],
                ..Default::default()
            }],
        }
    }

    fn config(edit: impl FnOnce(&mut v1::Inbound)) -> v1::ProxyConfig {
        let mut inbound = v1::Inbound {
            mode: v1::MtlsMode::Permissive as i32,
            app_protocol: v1::Protocol::Grpc as i32,
            default_policy: v1::DefaultPolicy::Deny as i32,
            authorization_policies: vec![policy(), policy()],
            ..Default::default()
        };
        edit(&mut inbound);
        v1::ProxyConfig {
            version: 3,
            inbound: Some(inbound),
            services: vec![v1::Service {
                name: "api".into(),
                namespace: "demo".into(),
                port: 8080,
                protocol: v1::Protocol::Opaque as i32,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn the_typed_config_compiles() {
        let s = Snapshot::from_proto(&config(|_| {})).expect("compiles");
        assert_eq!(s.inbound.mode_for(1), MtlsMode::Permissive);
        assert_eq!(s.inbound.app_protocol, Protocol::Grpc);
        assert_eq!(s.inbound.authz.default_policy(), DefaultPolicy::Deny);
        assert_eq!(s.inbound.authz.policies().count(), 2);
        assert_eq!(s.services["api.demo:8080"].protocol, Protocol::Opaque);
        // UNSET on the wire (never sent) and an unknown mode are both STRICT.
        for m in [v1::MtlsMode::Unset as i32, 42] {
            let s = Snapshot::from_proto(&config(|i| {
                i.mode = m;
                i.port_modes.insert(9090, m);
            }))
            .expect("compiles");
            assert_eq!(s.inbound.mode_for(1), MtlsMode::Strict, "{m}");
            assert_eq!(s.inbound.mode_for(9090), MtlsMode::Strict, "{m}");
        }
    }

    #[test]
    fn unknown_or_invalid_values_are_refused_naming_the_field() {
        let err = |edit: fn(&mut v1::Inbound)| {
            Snapshot::from_proto(&config(edit))
                .expect_err("refused")
                .to_string()
        };
        assert_eq!(
            err(|i| i.app_protocol = 9),
            "inbound.app_protocol: unknown value 9"
        );
        assert_eq!(
            err(|i| i.default_policy = 9),
            "inbound.default_policy: unknown value 9",
            "an unknown default is not guessed to be allow"
        );
        assert_eq!(
            err(|i| {
                if let Some(s) = i.authorization_policies[1].rules[0].from[0].source.as_mut() {
                    s.principals.push(v1::StringMatch::default());
                }
            }),
            "inbound.authorization_policies[1].rules[0].from[0].source.principals[1]: \
             policy demo/p: no match type (exact, prefix, suffix or presence)"
        );
        let mut cfg = config(|_| {});
        cfg.services[0].protocol = 9;
        assert_eq!(
            Snapshot::from_proto(&cfg).expect_err("refused").to_string(),
            "services[api.demo:8080].protocol: unknown value 9"
        );
    }

    #[test]
    fn the_static_file_names_protocols_as_the_mesh_file_does() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("proxy.yaml");
        let write = |text: &str| std::fs::write(&file, text).expect("write");
        write(
            "mode: PERMISSIVE\nappProtocol: http2\nservices:\n  - { name: db.demo, port: 5432, protocol: tcp }\n",
        );
        let s = Snapshot::load_static(&file).expect("loads");
        assert_eq!(s.inbound.mode_for(1), MtlsMode::Permissive);
        assert_eq!(s.inbound.app_protocol, Protocol::Http2);
        assert_eq!(s.services["db.demo:5432"].protocol, Protocol::Opaque);
        write("services: []\n");
        let s = Snapshot::load_static(&file).expect("loads");
        assert_eq!(s.inbound.mode_for(1), MtlsMode::Strict);
        assert_eq!(s.inbound.app_protocol, Protocol::Detect);
        write("services:\n  - { name: db.demo, port: 5432, protocol: smtp }\n");
        let e = Snapshot::load_static(&file).expect_err("smtp").to_string();
        assert!(
            e.contains("services[0].protocol: unknown protocol \"smtp\""),
            "{e}"
        );
    }

    #[test]
    fn the_static_file_takes_trace_policies_per_service_and_route() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("proxy.yaml");
        let write = |text: &str| std::fs::write(&file, text).expect("write");
        let route = "routes:\n  - apiVersion: gateway.networking.k8s.io/v1\n    kind: HTTPRoute\n    metadata: { name: reports, namespace: demo, annotations: { trace.palisade.dev/slow: 200ms } }\n    spec:\n      parentRefs: [ { kind: Service, name: api, port: 8080 } ]\n      rules: [ { matches: [ { path: { value: /reports } } ] } ]\n";
        write(&format!(
            "services:\n  - {{ name: api.demo, port: 8080, protocol: http, tracing: {{ spanBudget: 50, slowRequest: 1s }} }}\n{route}"
        ));
        let s = Snapshot::load_static(&file).expect("loads");
        let policy = |budget: Option<u32>, slow_ms: Option<u64>| crate::trace::TracePolicy {
            span_budget: budget,
            slow: slow_ms.map(Duration::from_millis),
        };
        let api = &s.services["api.demo:8080"];
        assert_eq!(api.trace, policy(Some(50), Some(1000)));
        let req = http::Request::get("http://api.demo/reports/q3")
            .body(())
            .expect("request");
        for routes in [&api.routes, &s.inbound.routes] {
            match routes.select("api.demo", &req) {
                crate::routing::Matched::Rule(r, _) => {
                    assert_eq!(r.trace, policy(Some(50), Some(200)))
                }
                _ => panic!("no rule"),
            }
        }
        for (tracing, says) in [
            (
                "{ spanBudget: 0 }",
                "services[0].tracing.spanBudget: must be 1–1000000",
            ),
            ("{ slowRequest: soon }", "services[0].tracing.slowRequest:"),
            ("{ slow: 1s }", "unknown field `slow`"),
        ] {
            write(&format!(
                "services:\n  - {{ name: api.demo, port: 8080, tracing: {tracing} }}\n"
            ));
            let e = Snapshot::load_static(&file).expect_err(tracing).to_string();
            assert!(e.contains(says), "{tracing}: {e}");
        }
        write(&format!(
            "services:\n  - {{ name: api.demo, port: 8080 }}\n{}",
            route.replace("200ms", "never")
        ));
        let e = Snapshot::load_static(&file)
            .expect_err("bad route annotation")
            .to_string();
        assert!(
            e.contains("metadata.annotations.trace.palisade.dev/slow"),
            "{e}"
        );
    }
}
