//! The sidecar injector: one pure function, [`inject`], that decides whether a pod gets the
//! mesh and, if so, returns the RFC 6902 JSONPatch that adds it. The webhook
//! ([`webhook::serve`], through [`review::review`]) returns that patch to the API server;
//! `palisade inject` ([`manifest::inject_yaml`]) applies the same patch to the pod templates of
//! YAML files. So a pod gets the same sidecar whichever way it was injected.
//!
//! What a pod gets (docs/kubernetes.md, "Inject", says why):
//! - `palisade-init`, the first init container: `palisade init --proxy-uid 2102 --inbound-port
//!   4143 --outbound-port 4140 --admin-port 4191 [--skip-inbound-ports …]
//!   [--skip-outbound-ports …]` installs the iptables rules (inbound TCP to 4143, outbound TCP
//!   to 4140; the proxy's UID [`PROXY_UID`], the admin port and skipped ports excluded). Root,
//!   `NET_ADMIN` + `NET_RAW`, nothing else.
//! - `palisade-proxy`, the second: the proxy as a native sidecar (`restartPolicy: Always`) with
//!   a startup probe on the admin `/ready`, so the app's containers start once it is ready and
//!   a Job's pod ends when its app does. Non-root ([`PROXY_UID`]), read-only root filesystem.
//! - volumes: a projected ServiceAccount token (audience `palisade`), the trust bundle from the
//!   ConfigMap `palisade-trust-bundle`, and an emptyDir for the iptables lock.
//!
//! Nothing else of the pod is touched: the patch only adds, so fields this crate's Kubernetes
//! types do not know survive it.

pub mod manifest;
mod patch;
pub mod review;
pub mod webhook;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use palisade_certs::TrustDomain;

pub use patch::{PortRange, parse_ports, valid_quantity};
pub use review::{AllNamespaces, NamespaceLabels, review};

/// Namespace label and pod annotation that ask for injection (`enabled`); the pod annotation
/// `disabled` wins over the namespace.
pub const INJECT: &str = "palisade.dev/inject";
pub const ENABLED: &str = "enabled";
pub const DISABLED: &str = "disabled";
/// Inbound ports whose traffic bypasses the proxy (`8080,9000-9010`), as Linkerd's
/// `config.linkerd.io/skip-inbound-ports`.
pub const SKIP_INBOUND_PORTS: &str = "palisade.dev/skip-inbound-ports";
/// Outbound destination ports whose traffic bypasses the proxy.
pub const SKIP_OUTBOUND_PORTS: &str = "palisade.dev/skip-outbound-ports";
/// The app port the proxy forwards inbound mTLS traffic to, when the pod declares several.
pub const APP_PORT: &str = "palisade.dev/app-port";
pub const PROXY_CPU_REQUEST: &str = "palisade.dev/proxy-cpu-request";
pub const PROXY_CPU_LIMIT: &str = "palisade.dev/proxy-cpu-limit";
pub const PROXY_MEMORY_REQUEST: &str = "palisade.dev/proxy-memory-request";
pub const PROXY_MEMORY_LIMIT: &str = "palisade.dev/proxy-memory-limit";
/// The proxy's log filter (`PALISADE_LOG`), e.g. `debug` or `info,palisade::access=info`.
pub const PROXY_LOG_LEVEL: &str = "palisade.dev/proxy-log-level";

/// The iptables init container.
pub const INIT_CONTAINER: &str = "palisade-init";
/// The proxy (a native sidecar: an init container with `restartPolicy: Always`).
pub const PROXY_CONTAINER: &str = "palisade-proxy";
/// The proxy's UID and GID: `palisade init` leaves this user's traffic alone, so the proxy's
/// own connections are not sent back to itself. Linkerd's proxy UID.
pub const PROXY_UID: i64 = 2102;
pub const INBOUND_PORT: u16 = 4143;
pub const OUTBOUND_PORT: u16 = 4140;
pub const ADMIN_PORT: u16 = 4191;

/// Audience of the projected ServiceAccount token the proxy presents to the CA.
pub const TOKEN_AUDIENCE: &str = "palisade";
pub const TOKEN_VOLUME: &str = "palisade-token";
pub const TOKEN_DIR: &str = "/var/run/secrets/palisade.dev/serviceaccount";
pub const TOKEN_FILE: &str = "/var/run/secrets/palisade.dev/serviceaccount/token";
/// The ConfigMap (in the pod's namespace) and key holding the mesh's trust anchors (PEM).
pub const TRUST_BUNDLE_CONFIGMAP: &str = "palisade-trust-bundle";
pub const TRUST_BUNDLE_KEY: &str = "ca.crt";
pub const TRUST_BUNDLE_VOLUME: &str = "palisade-trust-bundle";
pub const TRUST_BUNDLE_DIR: &str = "/var/run/palisade.dev/trust";
pub const TRUST_BUNDLE_FILE: &str = "/var/run/palisade.dev/trust/ca.crt";
/// An emptyDir on `/run` for the init container: iptables takes its lock file there, and the
/// root filesystem is read-only.
pub const XTABLES_VOLUME: &str = "palisade-xtables-lock";

/// The image both containers run; it holds `palisade` and `palisade-proxy` on `PATH` (and
/// `iptables`, which `palisade init` runs). The same local name `palisade install` gives the
/// control plane (`palisade:<version>`: no registry publishes Palisade's image yet); a control
/// plane started with another image should inject that one (`--proxy-image`).
pub const DEFAULT_IMAGE: &str = concat!("palisade:", env!("CARGO_PKG_VERSION"));
/// The control plane's Service (identity + discovery gRPC).
pub const DEFAULT_CONTROL_PLANE: &str = "palisade-control-plane.palisade-system.svc:8086";
/// Namespaces never injected, whatever their labels or a pod's annotations say: the cluster's
/// own (as Istio) and the control plane's.
pub const DEFAULT_IGNORED_NAMESPACES: [&str; 4] = [
    "kube-system",
    "kube-public",
    "kube-node-lease",
    crate::CONTROL_PLANE_NAMESPACE,
];

/// What the injector adds, beyond what the pod's annotations decide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectConfig {
    /// The image of both injected containers.
    pub image: String,
    pub image_pull_policy: String,
    /// The proxy container's command (its configuration is all environment).
    pub proxy_command: Vec<String>,
    /// The init container's command; the iptables flags follow as its args.
    pub init_command: Vec<String>,
    /// `PALISADE_CONTROL_PLANE`: the control plane's gRPC address as the proxy dials it.
    pub control_plane: String,
    /// The trust domain of `PALISADE_IDENTITY`.
    pub trust_domain: TrustDomain,
    /// The proxy's UID (and GID), which `palisade init` excludes from redirection.
    pub proxy_uid: i64,
    /// Lifetime of the projected ServiceAccount token (Kubernetes accepts 600 and up; the
    /// kubelet rotates it at 80%).
    pub token_expiration_seconds: i64,
    /// The proxy's resources unless the pod's annotations say otherwise.
    pub proxy_resources: ProxyResources,
    /// Namespaces never injected.
    pub ignored_namespaces: Vec<String>,
}

/// Kubernetes quantities (`100m`, `64Mi`) for the proxy container; `None` leaves it unset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyResources {
    pub cpu_request: Option<String>,
    pub cpu_limit: Option<String>,
    pub memory_request: Option<String>,
    pub memory_limit: Option<String>,
}

impl Default for InjectConfig {
    fn default() -> Self {
        Self {
            image: DEFAULT_IMAGE.to_string(),
            image_pull_policy: "IfNotPresent".to_string(),
            proxy_command: vec!["palisade-proxy".to_string()],
            init_command: vec!["palisade".to_string(), "init".to_string()],
            control_plane: DEFAULT_CONTROL_PLANE.to_string(),
            trust_domain: TrustDomain::cluster_local(),
            proxy_uid: PROXY_UID,
            token_expiration_seconds: 3600,
            // A sidecar at rest needs a few MiB and no CPU to speak of (docs/benchmarks.md):
            // requests that let it be scheduled, no limits that would throttle or kill it
            // under load unless the pod asks for them.
            proxy_resources: ProxyResources {
                cpu_request: Some("10m".to_string()),
                cpu_limit: None,
                memory_request: Some("20Mi".to_string()),
                memory_limit: None,
            },
            ignored_namespaces: DEFAULT_IGNORED_NAMESPACES
                .iter()
                .map(|s| s.to_string())
                .collect(),
        }
    }
}

/// The namespace a pod is created in, as far as injection cares.
#[derive(Debug, Clone, Copy)]
pub struct PodNamespace<'a> {
    pub name: &'a str,
    pub labels: &'a BTreeMap<String, String>,
}

/// Why a pod was left as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    /// Neither the namespace label nor the pod annotation asks for injection.
    NotEnabled,
    /// The pod annotation `palisade.dev/inject: disabled`.
    Disabled,
    /// hostNetwork pods share the node's network: iptables rules there would capture the node.
    HostNetwork,
    /// kube-system and the like.
    IgnoredNamespace(String),
    /// The pod already has the injected containers.
    AlreadyInjected,
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SkipReason::NotEnabled => write!(
                f,
                "neither the namespace label {INJECT}={ENABLED} nor the pod annotation {INJECT}: {ENABLED} is set"
            ),
            SkipReason::Disabled => write!(f, "the pod annotation {INJECT} is {DISABLED}"),
            SkipReason::HostNetwork => write!(
                f,
                "it uses hostNetwork (its iptables rules would capture the node's traffic)"
            ),
            SkipReason::IgnoredNamespace(ns) => {
                write!(f, "namespace {ns} is never injected")
            }
            SkipReason::AlreadyInjected => {
                write!(f, "it already has the {PROXY_CONTAINER} sidecar")
            }
        }
    }
}

/// What [`inject`] decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Apply this patch to the pod (the paths are relative to the pod object).
    Inject {
        patch: json_patch::Patch,
        warnings: Vec<String>,
    },
    /// Leave the pod as it is.
    Skip {
        reason: SkipReason,
        warnings: Vec<String>,
    },
}

impl Outcome {
    pub fn warnings(&self) -> &[String] {
        match self {
            Outcome::Inject { warnings, .. } | Outcome::Skip { warnings, .. } => warnings,
        }
    }
}

/// Why a pod that asks for injection cannot be injected. The pod is at fault: the webhook
/// refuses it with this message, the CLI names the document.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InjectError {
    #[error("annotation {key}: {value:?} {problem}")]
    Annotation {
        key: &'static str,
        value: String,
        problem: String,
    },
    #[error("the pod has no spec")]
    NoSpec,
    #[error("the pod already has a volume named {0}, which the injector adds")]
    VolumeConflict(String),
    #[error("cannot encode the patch: {0}")]
    Encode(String),
}

/// Decides whether `pod` gets the mesh and returns the patch that adds it.
///
/// The rules, in order: a pod that already has the sidecar is left alone (injecting twice
/// changes nothing); pods in [`InjectConfig::ignored_namespaces`] and hostNetwork pods are never
/// injected; the pod annotation [`INJECT`] `enabled`/`disabled` decides, else the namespace
/// label [`INJECT`]`=enabled` does.
pub fn inject(
    pod: &Pod,
    namespace: &PodNamespace<'_>,
    cfg: &InjectConfig,
) -> Result<Outcome, InjectError> {
    let annotations = pod.metadata.annotations.as_ref();
    let asked = annotations.and_then(|a| a.get(INJECT)).map(String::as_str);
    let mut warnings = Vec::new();
    let skip = |reason, warnings| Ok(Outcome::Skip { reason, warnings });

    if patch::already_injected(pod) {
        return skip(SkipReason::AlreadyInjected, warnings);
    }
    if cfg.ignored_namespaces.iter().any(|n| n == namespace.name) {
        if asked == Some(ENABLED) {
            warnings.push(format!(
                "{INJECT}: {ENABLED} is ignored: namespace {} is never injected",
                namespace.name
            ));
        }
        return skip(
            SkipReason::IgnoredNamespace(namespace.name.to_string()),
            warnings,
        );
    }
    let host_network = pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false);
    if host_network {
        if asked == Some(ENABLED) {
            warnings.push(format!(
                "{INJECT}: {ENABLED} is ignored: hostNetwork pods are never injected"
            ));
        }
        return skip(SkipReason::HostNetwork, warnings);
    }
    match asked {
        Some(DISABLED) => return skip(SkipReason::Disabled, warnings),
        Some(ENABLED) => {}
        Some(other) => {
            return Err(InjectError::Annotation {
                key: INJECT,
                value: other.to_string(),
                problem: format!("is neither {ENABLED} nor {DISABLED}"),
            });
        }
        None => {
            if namespace.labels.get(INJECT).map(String::as_str) != Some(ENABLED) {
                return skip(SkipReason::NotEnabled, warnings);
            }
        }
    }
    let spec = pod.spec.as_ref().ok_or(InjectError::NoSpec)?;
    let patch = patch::build(&pod.metadata, spec, cfg, &mut warnings)?;
    Ok(Outcome::Inject { patch, warnings })
}

#[cfg(test)]
mod tests;
