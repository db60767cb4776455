//! The proxy's configuration: static settings fixed at start (addresses, credentials source,
//! timeouts, limits) and the dynamic [`Snapshot`] (inbound policy, services and endpoints) that
//! the control plane streams — or a static file provides — and that is swapped atomically.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use palisade_api::v1;
use palisade_certs::SpiffeId;
use serde::Deserialize;

use crate::authz::Authorizer;

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

pub use palisade_api::{PathNormalization, Protocol};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    #[default]
    Strict,
    Permissive,
    Disable,
}

impl MtlsMode {
    fn from_proto(v: i32) -> Self {
        match v1::MtlsMode::try_from(v) {
            Ok(v1::MtlsMode::Permissive) => MtlsMode::Permissive,
            Ok(v1::MtlsMode::Disable) => MtlsMode::Disable,
            _ => MtlsMode::Strict,
        }
    }
}

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
        }
    }
}

#[derive(Clone, Debug)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub max_concurrent_streams: u32,
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 64 * 1024,
            max_concurrent_streams: 1000,
            max_connections: 10_000,
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
    /// Whether the admin port answers `POST /shutdown` (loopback, with the admin header).
    /// Off by default: every container of a pod shares its loopback.
    pub admin_shutdown: bool,
    /// How endpoints are picked (HTTPRoute weights come with traffic management).
    pub balancer: crate::balance::Strategy,
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
}

/// Inbound settings of this workload.
#[derive(Clone, Debug)]
pub struct InboundConfig {
    pub mode: MtlsMode,
    pub port_modes: HashMap<u16, MtlsMode>,
    pub app_protocol: Protocol,
    pub path_normalization: PathNormalization,
    pub authz: Arc<Authorizer>,
}

impl InboundConfig {
    pub fn mode_for(&self, port: u16) -> MtlsMode {
        self.port_modes.get(&port).copied().unwrap_or(self.mode)
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
            },
            services: HashMap::new(),
            trust_bundle: Vec::new(),
        }
    }

    pub fn from_proto(cfg: &v1::ProxyConfig) -> Result<Self, ConfigError> {
        let inbound = cfg.inbound.clone().unwrap_or_default();
        let mut port_modes = HashMap::new();
        for (port, mode) in &inbound.port_modes {
            let port = u16::try_from(*port).map_err(|_| ConfigError::Field {
                field: "inbound.port_modes".into(),
                message: format!("port {port} out of range"),
            })?;
            port_modes.insert(port, MtlsMode::from_proto(*mode));
        }
        let app_protocol =
            Protocol::parse(&inbound.app_protocol).map_err(|message| ConfigError::Field {
                field: "inbound.app_protocol".into(),
                message,
            })?;
        let path_normalization = PathNormalization::from_proto(inbound.path_normalization)
            .ok_or_else(|| ConfigError::Field {
                field: "inbound.path_normalization".into(),
                message: format!("unknown value {}", inbound.path_normalization),
            })?;
        let default = match v1::DefaultPolicy::try_from(inbound.default_policy) {
            Ok(v1::DefaultPolicy::Deny) => palisade_api::policy::DefaultPolicy::Deny,
            Ok(v1::DefaultPolicy::Authenticated) => {
                palisade_api::policy::DefaultPolicy::Authenticated
            }
            _ => palisade_api::policy::DefaultPolicy::Allow,
        };
        let mut policies = Vec::with_capacity(inbound.authorization_policies_json.len());
        for (i, json) in inbound.authorization_policies_json.iter().enumerate() {
            let p = serde_json::from_str(json).map_err(|e| ConfigError::Field {
                field: format!("inbound.authorization_policies_json[{i}]"),
                message: e.to_string(),
            })?;
            policies.push(p);
        }
        let authz = Authorizer::compile(default, &policies).map_err(|e| ConfigError::Field {
            field: "inbound.authorization_policies_json".into(),
            message: e.to_string(),
        })?;
        let mut services = HashMap::new();
        for s in &cfg.services {
            let key = format!("{}.{}:{}", s.name, s.namespace, s.port);
            let protocol = Protocol::parse(&s.protocol).map_err(|message| ConfigError::Field {
                field: format!("services[{key}].protocol"),
                message,
            })?;
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
            services.insert(
                key.clone(),
                Arc::new(ServiceConfig {
                    key,
                    protocol,
                    endpoints,
                    virtual_addrs,
                }),
            );
        }
        Ok(Snapshot {
            version: cfg.version,
            inbound: InboundConfig {
                mode: MtlsMode::from_proto(inbound.mode),
                port_modes,
                app_protocol,
                path_normalization,
                authz: Arc::new(authz),
            },
            services,
            trust_bundle: cfg.trust_bundle_der.clone(),
        })
    }

    /// Loads a static snapshot file (YAML), the no-control-plane mode of `palisade proxy`.
    pub fn load_static(path: &Path) -> Result<Self, ConfigError> {
        let file_err = |message: String| ConfigError::File {
            file: path.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| file_err(e.to_string()))?;
        let file: StaticFile =
            serde_saphyr::from_str(&text).map_err(|e| file_err(e.to_string()))?;
        let mut cfg = v1::ProxyConfig {
            version: 1,
            inbound: Some(v1::Inbound {
                mode: match file.mode {
                    MtlsMode::Strict => v1::MtlsMode::Strict,
                    MtlsMode::Permissive => v1::MtlsMode::Permissive,
                    MtlsMode::Disable => v1::MtlsMode::Disable,
                } as i32,
                app_protocol: file.app_protocol.unwrap_or_default(),
                path_normalization: file.path_normalization.to_proto() as i32,
                ..Default::default()
            }),
            ..Default::default()
        };
        for s in file.services {
            let (name, namespace) = s
                .name
                .split_once('.')
                .ok_or_else(|| file_err(format!("service {:?} must be name.namespace", s.name)))?;
            cfg.services.push(v1::Service {
                name: name.to_string(),
                namespace: namespace.to_string(),
                port: u32::from(s.port),
                protocol: s.protocol.unwrap_or_default(),
                virtual_ips: s.virtual_ips,
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
        Snapshot::from_proto(&cfg).map_err(|e| file_err(e.to_string()))
    }
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
