//! What injection adds to a pod, and the JSONPatch that adds it.

use std::collections::BTreeMap;

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation, ReplaceOperation};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, HTTPGetAction, KeyToPath, ObjectFieldSelector, PodSpec, Probe,
    ProjectedVolumeSource, ResourceRequirements, SeccompProfile, SecurityContext,
    ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use palisade_api::app_probe::{self, AppProbe, AppProbes};

use super::*;

/// A pod already has the mesh when it has either injected container (as an init container, or
/// as a regular container from a hand-written manifest).
pub(super) fn already_injected(pod: &Pod) -> bool {
    let Some(spec) = pod.spec.as_ref() else {
        return false;
    };
    let ours = |c: &Container| c.name == PROXY_CONTAINER || c.name == INIT_CONTAINER;
    spec.containers.iter().any(ours) || spec.init_containers.iter().flatten().any(ours)
}

/// An inclusive port range; a single port is `lo == hi`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

impl PortRange {
    fn single(p: u16) -> Self {
        Self { lo: p, hi: p }
    }

    fn contains(&self, p: u16) -> bool {
        (self.lo..=self.hi).contains(&p)
    }
}

/// Parses a skip-ports annotation: ports and ranges, comma-separated (`25,443,9000-9010`),
/// spaces allowed. An empty value is an empty list.
pub fn parse_ports(value: &str) -> Result<Vec<PortRange>, String> {
    let port = |s: &str| -> Result<u16, String> {
        match s.trim().parse::<u16>() {
            Ok(p) if p > 0 => Ok(p),
            _ => Err(format!("{:?} is not a port (1-65535)", s.trim())),
        }
    };
    let mut out = Vec::new();
    for part in value.split(',') {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        let range = match part.split_once('-') {
            Some((lo, hi)) => {
                let (lo, hi) = (port(lo)?, port(hi)?);
                if lo > hi {
                    return Err(format!("range {part:?} ends before it starts"));
                }
                PortRange { lo, hi }
            }
            None => PortRange::single(port(part)?),
        };
        out.push(range);
    }
    Ok(out)
}

/// Whether `s` is a Kubernetes resource quantity the API server accepts for a request or
/// limit: a non-negative decimal with an optional binary (`Ki`..`Ei`), decimal (`n u m k M G T
/// P E`) or exponent (`e3`) suffix. Checked here so that a typo in an annotation is refused with
/// the annotation's name, not by the API server with a path into the injected container.
pub fn valid_quantity(s: &str) -> bool {
    let digits_end = s
        .char_indices()
        .find(|(_, c)| !(c.is_ascii_digit() || *c == '.'))
        .map_or(s.len(), |(i, _)| i);
    let (number, suffix) = s.split_at(digits_end);
    let number_ok = number.bytes().filter(|b| *b == b'.').count() <= 1
        && number.bytes().any(|b| b.is_ascii_digit());
    let suffix_ok = match suffix {
        "" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" | "n" | "u" | "m" | "k" | "M" | "G" | "T"
        | "P" | "E" => true,
        exp => {
            let rest = exp.strip_prefix(['e', 'E']);
            let rest = rest.map(|r| r.strip_prefix(['+', '-']).unwrap_or(r));
            rest.is_some_and(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_digit()))
        }
    };
    number_ok && suffix_ok
}

fn annotation<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

fn bad(key: &'static str, value: &str, problem: impl Into<String>) -> InjectError {
    InjectError::Annotation {
        key,
        value: value.to_string(),
        problem: problem.into(),
    }
}

fn ports_annotation(meta: &ObjectMeta, key: &'static str) -> Result<Vec<PortRange>, InjectError> {
    match annotation(meta, key) {
        Some(v) => parse_ports(v).map_err(|e| bad(key, v, format!("is not a port list: {e}"))),
        None => Ok(Vec::new()),
    }
}

/// The pod's settings that injection reads from its annotations.
struct PodSettings {
    skip_inbound: Vec<PortRange>,
    skip_outbound: Vec<PortRange>,
    app_port: Option<u16>,
    resources: ProxyResources,
    log_level: Option<String>,
}

fn settings(meta: &ObjectMeta, cfg: &InjectConfig) -> Result<PodSettings, InjectError> {
    let app_port = match annotation(meta, APP_PORT) {
        Some(v) => match v.trim().parse::<u16>() {
            Ok(p) if p > 0 => Some(p),
            _ => return Err(bad(APP_PORT, v, "is not a port (1-65535)")),
        },
        None => None,
    };
    let mut resources = cfg.proxy_resources.clone();
    for (key, slot) in [
        (PROXY_CPU_REQUEST, &mut resources.cpu_request),
        (PROXY_CPU_LIMIT, &mut resources.cpu_limit),
        (PROXY_MEMORY_REQUEST, &mut resources.memory_request),
        (PROXY_MEMORY_LIMIT, &mut resources.memory_limit),
    ] {
        if let Some(v) = annotation(meta, key) {
            if !valid_quantity(v) {
                return Err(bad(
                    key,
                    v,
                    "is not a Kubernetes quantity (e.g. 100m, 0.5, 64Mi, 1G)",
                ));
            }
            *slot = Some(v.to_string());
        }
    }
    let log_level = match annotation(meta, PROXY_LOG_LEVEL) {
        Some(v) if v.trim().is_empty() || v.contains(['\n', '\r']) => {
            return Err(bad(PROXY_LOG_LEVEL, v, "is not a log filter"));
        }
        Some(v) => Some(v.trim().to_string()),
        None => None,
    };
    Ok(PodSettings {
        skip_inbound: ports_annotation(meta, SKIP_INBOUND_PORTS)?,
        skip_outbound: ports_annotation(meta, SKIP_OUTBOUND_PORTS)?,
        app_port,
        resources,
        log_level,
    })
}

/// The app containers: regular containers and the pod's own native sidecars.
fn app_containers(spec: &PodSpec) -> impl Iterator<Item = &Container> {
    spec.containers.iter().chain(
        spec.init_containers
            .iter()
            .flatten()
            .filter(|c| c.restart_policy.as_deref() == Some("Always")),
    )
}

fn tcp_ports(c: &Container) -> impl Iterator<Item = &ContainerPort> {
    c.ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().is_none_or(|proto| proto == "TCP"))
}

/// The port a probe's `port` names, resolved against its container's ports.
fn probe_port(c: &Container, port: &IntOrString) -> Option<u16> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).ok().filter(|p| *p > 0),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

/// What becomes of the app's kubelet probes. Kubelet probes come from the node in plaintext:
/// redirected to the proxy they would be refused under STRICT mTLS. HTTP and TCP probes are
/// pointed at the proxy's admin port, which runs them against the app on loopback
/// ([`palisade_api::app_probe`], as Istio rewrites them); the rest (gRPC, HTTPS) keep their
/// port, which is then left out of inbound redirection (docs/kubernetes.md says what that
/// costs).
#[derive(Default)]
struct ProbePlan {
    /// Every port the app is probed on (not a serving-port candidate when it serves nothing
    /// else).
    ports: Vec<u16>,
    /// The ports of probes left as they are, exempted from redirection.
    exempt: Vec<u16>,
    /// JSONPatch replacements of the rewritten probes.
    rewrites: Vec<PatchOperation>,
    /// `PALISADE_APP_PROBES`: admin path → the original probe.
    app_probes: AppProbes,
}

fn plan_probes(spec: &PodSpec, warnings: &mut Vec<String>) -> ProbePlan {
    let mut plan = ProbePlan::default();
    let regular = spec
        .containers
        .iter()
        .enumerate()
        .map(|(i, c)| ("containers", i, c));
    let sidecars = spec
        .init_containers
        .iter()
        .flatten()
        .enumerate()
        .filter(|(_, c)| c.restart_policy.as_deref() == Some("Always"))
        .map(|(i, c)| ("initContainers", i, c));
    for (list, index, c) in regular.chain(sidecars) {
        let probes = [
            ("liveness", "livenessProbe", &c.liveness_probe),
            ("readiness", "readinessProbe", &c.readiness_probe),
            ("startup", "startupProbe", &c.startup_probe),
        ];
        for (kind, field, probe) in probes {
            let Some(probe) = probe else { continue };
            let local = |h: &Option<String>| h.as_deref().is_none_or(str::is_empty);
            // (port, the original probe if it can be rewritten)
            let (port, original) = match probe {
                Probe {
                    http_get: Some(get),
                    ..
                } if !local(&get.host) => continue, // probes another host, not this pod
                Probe {
                    http_get: Some(get),
                    ..
                } => {
                    let http = get
                        .scheme
                        .as_deref()
                        .is_none_or(|s| s.eq_ignore_ascii_case("HTTP"));
                    (get.port.clone(), http.then_some(ProbeKind::Http(get)))
                }
                Probe {
                    tcp_socket: Some(tcp),
                    ..
                } if local(&tcp.host) => (tcp.port.clone(), Some(ProbeKind::Tcp)),
                Probe {
                    grpc: Some(grpc), ..
                } => (IntOrString::Int(grpc.port), None),
                _ => continue,
            };
            let Some(p) = probe_port(c, &port) else {
                warnings.push(format!(
                    "the {kind} probe of container {} names port {port:?}, which the container does not declare; it is left as it is",
                    c.name,
                    port = match port {
                        IntOrString::Int(n) => n.to_string(),
                        IntOrString::String(s) => s.clone(),
                    }
                ));
                continue;
            };
            if !plan.ports.contains(&p) {
                plan.ports.push(p);
            }
            let Some(original) = original else {
                if !plan.exempt.contains(&p) {
                    plan.exempt.push(p);
                }
                continue;
            };
            let path = app_probe::path(&c.name, kind);
            let timeout = probe
                .timeout_seconds
                .and_then(|t| u32::try_from(t).ok())
                .unwrap_or(1)
                .clamp(1, app_probe::MAX_TIMEOUT_SECONDS);
            let entry = match original {
                ProbeKind::Http(get) => AppProbe {
                    http_get: Some(app_probe::HttpGet {
                        port: p,
                        path: get
                            .path
                            .clone()
                            .filter(|p| p.starts_with('/'))
                            .unwrap_or_else(|| "/".into()),
                        http_headers: get
                            .http_headers
                            .iter()
                            .flatten()
                            .map(|h| app_probe::Header {
                                name: h.name.clone(),
                                value: h.value.clone(),
                            })
                            .collect(),
                    }),
                    tcp_socket: None,
                    timeout_seconds: timeout,
                },
                ProbeKind::Tcp => AppProbe {
                    http_get: None,
                    tcp_socket: Some(app_probe::TcpSocket { port: p }),
                    timeout_seconds: timeout,
                },
            };
            let rewritten = Probe {
                http_get: Some(HTTPGetAction {
                    path: Some(path.clone()),
                    port: IntOrString::Int(i32::from(ADMIN_PORT)),
                    scheme: Some("HTTP".into()),
                    ..Default::default()
                }),
                tcp_socket: None,
                grpc: None,
                exec: None,
                ..probe.clone()
            };
            if let Ok(value) = serde_json::to_value(&rewritten) {
                plan.rewrites
                    .push(PatchOperation::Replace(ReplaceOperation {
                        path: PointerBuf::from_tokens(["spec", list, &index.to_string(), field]),
                        value,
                    }));
                plan.app_probes.insert(path, entry);
            }
        }
    }
    plan
}

enum ProbeKind<'a> {
    Http(&'a HTTPGetAction),
    Tcp,
}

/// Where the proxy sends inbound mTLS traffic: the annotation's port, else the one TCP port the
/// app containers declare (probe-only ports and skipped ports aside), else the first of several
/// with a warning, else none (a workload that only calls out).
fn app_port(
    spec: &PodSpec,
    s: &PodSettings,
    probes: &[u16],
    warnings: &mut Vec<String>,
) -> Option<u16> {
    if s.app_port.is_some() {
        return s.app_port;
    }
    let mut declared: Vec<u16> = Vec::new();
    for c in app_containers(spec) {
        for p in tcp_ports(c) {
            let Ok(port) = u16::try_from(p.container_port) else {
                continue;
            };
            if port > 0
                && !declared.contains(&port)
                && !s.skip_inbound.iter().any(|r| r.contains(port))
            {
                declared.push(port);
            }
        }
    }
    let serving: Vec<u16> = declared
        .iter()
        .copied()
        .filter(|p| !probes.contains(p))
        .collect();
    let candidates = if serving.is_empty() {
        declared
    } else {
        serving
    };
    if candidates.len() > 1 {
        warnings.push(format!(
            "the pod declares ports {}; the proxy forwards inbound mTLS traffic to {} only (set the annotation {APP_PORT} to choose)",
            candidates
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            candidates[0]
        ));
    }
    candidates.first().copied()
}

fn join(ranges: &[PortRange]) -> String {
    ranges
        .iter()
        .map(PortRange::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn env_field(name: &str, field: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                api_version: None,
                field_path: field.to_string(),
            }),
            ..Default::default()
        }),
    }
}

fn admin_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::Int(i32::from(ADMIN_PORT)),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(1),
        ..Default::default()
    }
}

fn resources(r: &ProxyResources) -> Option<ResourceRequirements> {
    let map = |cpu: &Option<String>, mem: &Option<String>| {
        let m: BTreeMap<String, Quantity> = [("cpu", cpu), ("memory", mem)]
            .into_iter()
            .filter_map(|(k, v)| Some((k.to_string(), Quantity(v.clone()?))))
            .collect();
        (!m.is_empty()).then_some(m)
    };
    let requests = map(&r.cpu_request, &r.memory_request);
    let limits = map(&r.cpu_limit, &r.memory_limit);
    (requests.is_some() || limits.is_some()).then(|| ResourceRequirements {
        requests,
        limits,
        ..Default::default()
    })
}

/// The arguments of `palisade init`, in the order and with the flags it takes: the proxy's UID
/// (never redirected), where inbound and outbound TCP go, the admin port (never redirected),
/// and the skipped ports when there are any.
fn init_args(
    cfg: &InjectConfig,
    skip_inbound: &[PortRange],
    skip_outbound: &[PortRange],
) -> Vec<String> {
    let mut args = vec![
        "--proxy-uid".to_string(),
        cfg.proxy_uid.to_string(),
        "--inbound-port".to_string(),
        INBOUND_PORT.to_string(),
        "--outbound-port".to_string(),
        OUTBOUND_PORT.to_string(),
        "--admin-port".to_string(),
        ADMIN_PORT.to_string(),
    ];
    if !skip_inbound.is_empty() {
        args.push("--skip-inbound-ports".to_string());
        args.push(join(skip_inbound));
    }
    if !skip_outbound.is_empty() {
        args.push("--skip-outbound-ports".to_string());
        args.push(join(skip_outbound));
    }
    args
}

fn init_container(cfg: &InjectConfig, skip_inbound: &[PortRange], s: &PodSettings) -> Container {
    let args = init_args(cfg, skip_inbound, &s.skip_outbound);
    Container {
        name: INIT_CONTAINER.to_string(),
        image: Some(cfg.image.clone()),
        image_pull_policy: Some(cfg.image_pull_policy.clone()),
        command: Some(cfg.init_command.clone()),
        args: Some(args),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_string(), Quantity("10m".to_string())),
                ("memory".to_string(), Quantity("10Mi".to_string())),
            ])),
            limits: Some(BTreeMap::from([(
                "memory".to_string(),
                Quantity("64Mi".to_string()),
            )])),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            // iptables needs root and these two capabilities, nothing more.
            run_as_user: Some(0),
            run_as_group: Some(0),
            run_as_non_root: Some(false),
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".to_string(), "NET_RAW".to_string()]),
                drop: Some(vec!["ALL".to_string()]),
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_string(),
                localhost_profile: None,
            }),
            ..Default::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: XTABLES_VOLUME.to_string(),
            mount_path: "/run".to_string(),
            ..Default::default()
        }]),
        termination_message_policy: Some("FallbackToLogsOnError".to_string()),
        ..Default::default()
    }
}

fn proxy_container(
    cfg: &InjectConfig,
    s: &PodSettings,
    app_port: Option<u16>,
    app_probes: &AppProbes,
) -> Container {
    let mut envs = vec![
        env_field("POD_NAMESPACE", "metadata.namespace"),
        env_field("POD_SERVICE_ACCOUNT", "spec.serviceAccountName"),
        env_field("PALISADE_WORKLOAD", "metadata.name"),
        // Kubernetes expands $(VAR) from the variables defined above it.
        env(
            "PALISADE_IDENTITY",
            format!(
                "spiffe://{}/ns/$(POD_NAMESPACE)/sa/$(POD_SERVICE_ACCOUNT)",
                cfg.trust_domain
            ),
        ),
        env("PALISADE_CONTROL_PLANE", cfg.control_plane.clone()),
        env("PALISADE_TOKEN_FILE", TOKEN_FILE),
        env("PALISADE_TRUST_BUNDLE", TRUST_BUNDLE_FILE),
        env("PALISADE_INBOUND_ADDR", format!("0.0.0.0:{INBOUND_PORT}")),
        env("PALISADE_ADMIN_ADDR", format!("0.0.0.0:{ADMIN_PORT}")),
        env(
            "PALISADE_OUTBOUND_ADDR",
            format!("127.0.0.1:{OUTBOUND_PORT}"),
        ),
    ];
    if let Some(p) = app_port {
        envs.push(env("PALISADE_APP_ADDR", format!("127.0.0.1:{p}")));
    }
    if !app_probes.is_empty()
        && let Ok(json) = serde_json::to_string(app_probes)
    {
        envs.push(env("PALISADE_APP_PROBES", json));
    }
    if let Some(level) = &s.log_level {
        envs.push(env("PALISADE_LOG", level.clone()));
    }
    let port = |name: &str, p: u16| ContainerPort {
        name: Some(name.to_string()),
        container_port: i32::from(p),
        protocol: Some("TCP".to_string()),
        ..Default::default()
    };
    Container {
        name: PROXY_CONTAINER.to_string(),
        image: Some(cfg.image.clone()),
        image_pull_policy: Some(cfg.image_pull_policy.clone()),
        command: Some(cfg.proxy_command.clone()),
        // A native sidecar: started before the app's containers, stopped after them, and not
        // waited for by a Job.
        restart_policy: Some("Always".to_string()),
        env: Some(envs),
        ports: Some(vec![
            port("palisade-proxy", INBOUND_PORT),
            port("palisade-admin", ADMIN_PORT),
        ]),
        // The kubelet starts the app's containers only once this succeeds: the proxy holds
        // its certificate and its config. Up to two minutes, polled every second.
        startup_probe: Some(admin_probe("/ready", 1, 120)),
        readiness_probe: Some(admin_probe("/ready", 10, 3)),
        liveness_probe: Some(admin_probe("/live", 10, 3)),
        resources: resources(&s.resources),
        security_context: Some(SecurityContext {
            run_as_user: Some(cfg.proxy_uid),
            run_as_group: Some(cfg.proxy_uid),
            run_as_non_root: Some(true),
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                add: None,
                drop: Some(vec!["ALL".to_string()]),
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_string(),
                localhost_profile: None,
            }),
            ..Default::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: TOKEN_VOLUME.to_string(),
                mount_path: TOKEN_DIR.to_string(),
                read_only: Some(true),
                ..Default::default()
            },
            VolumeMount {
                name: TRUST_BUNDLE_VOLUME.to_string(),
                mount_path: TRUST_BUNDLE_DIR.to_string(),
                read_only: Some(true),
                ..Default::default()
            },
        ]),
        termination_message_policy: Some("FallbackToLogsOnError".to_string()),
        ..Default::default()
    }
}

fn volumes(cfg: &InjectConfig) -> Vec<Volume> {
    vec![
        Volume {
            name: TOKEN_VOLUME.to_string(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(TOKEN_AUDIENCE.to_string()),
                        expiration_seconds: Some(cfg.token_expiration_seconds),
                        path: "token".to_string(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        },
        Volume {
            name: TRUST_BUNDLE_VOLUME.to_string(),
            config_map: Some(ConfigMapVolumeSource {
                name: TRUST_BUNDLE_CONFIGMAP.to_string(),
                items: Some(vec![KeyToPath {
                    key: TRUST_BUNDLE_KEY.to_string(),
                    path: TRUST_BUNDLE_KEY.to_string(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        },
        Volume {
            name: XTABLES_VOLUME.to_string(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("Memory".to_string()),
                ..Default::default()
            }),
            ..Default::default()
        },
    ]
}

fn to_value<T: serde::Serialize>(v: &T) -> Result<serde_json::Value, InjectError> {
    serde_json::to_value(v).map_err(|e| InjectError::Encode(e.to_string()))
}

fn add(tokens: &[&str], value: serde_json::Value) -> PatchOperation {
    PatchOperation::Add(AddOperation {
        path: PointerBuf::from_tokens(tokens.iter().copied()),
        value,
    })
}

/// Builds the patch for a pod that is to be injected.
pub(super) fn build(
    meta: &ObjectMeta,
    spec: &PodSpec,
    cfg: &InjectConfig,
    warnings: &mut Vec<String>,
) -> Result<Patch, InjectError> {
    let s = settings(meta, cfg)?;
    let plan = plan_probes(spec, warnings);
    let probes = plan.ports.clone();
    // The admin port needs no entry: `palisade init --admin-port` never redirects it (the
    // kubelet probes the proxy there).
    let mut skip_inbound: Vec<PortRange> = Vec::new();
    for r in &s.skip_inbound {
        if !skip_inbound.contains(r) {
            skip_inbound.push(*r);
        }
    }
    let mut exempted = Vec::new();
    for p in &plan.exempt {
        if !skip_inbound.iter().any(|r| r.contains(*p)) {
            skip_inbound.push(PortRange::single(*p));
            exempted.push(p.to_string());
        }
    }
    if !exempted.is_empty() {
        let (ports, bypass, them) = if exempted.len() == 1 {
            ("port", "bypasses", "it")
        } else {
            ("ports", "bypass", "them")
        };
        warnings.push(format!(
            "gRPC or HTTPS kubelet probe {ports} {} {bypass} the proxy so that probes keep working under STRICT mTLS: plaintext to {them} reaches the app unauthenticated (probe a separate health port, or use an HTTP or TCP probe, which the proxy runs for the kubelet)",
            exempted.join(", ")
        ));
    }
    let app_port = app_port(spec, &s, &probes, warnings);

    let ours = volumes(cfg);
    for v in spec.volumes.iter().flatten() {
        if ours.iter().any(|o| o.name == v.name) {
            return Err(InjectError::VolumeConflict(v.name.clone()));
        }
    }

    let init = to_value(&init_container(cfg, &skip_inbound, &s))?;
    let proxy = to_value(&proxy_container(cfg, &s, app_port, &plan.app_probes))?;
    // The probes first: their paths index the pod's own lists, before ours are added.
    let mut ops = plan.rewrites;
    // First the iptables rules, then the proxy, then whatever init containers the pod has:
    // those run meshed, after the proxy is ready.
    match &spec.init_containers {
        None => ops.push(add(
            &["spec", "initContainers"],
            serde_json::Value::Array(vec![init, proxy]),
        )),
        Some(_) => {
            ops.push(add(&["spec", "initContainers", "0"], init));
            ops.push(add(&["spec", "initContainers", "1"], proxy));
        }
    }
    match &spec.volumes {
        None => ops.push(add(&["spec", "volumes"], to_value(&ours)?)),
        Some(_) => {
            for v in &ours {
                ops.push(add(&["spec", "volumes", "-"], to_value(v)?));
            }
        }
    }
    Ok(Patch(ops))
}
