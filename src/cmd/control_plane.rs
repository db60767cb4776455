//! `palisade control-plane`: identity (CA) and discovery for the proxies, fed by the local
//! mesh file and its policies directory, or by the Kubernetes API (`--source kubernetes`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use palisade_api::policy::DefaultPolicy;
use palisade_control_plane::k8s::control_plane::{
    DEFAULT_LISTEN, DEFAULT_NAMESPACE, DEFAULT_WEBHOOK_LISTEN, KubernetesConfig,
};

/// Where the model comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Source {
    /// The mesh file (`--config`) and its policies directory.
    Local,
    /// Pods, Services, EndpointSlices and the policy CRDs of the cluster (kubeconfig from
    /// KUBECONFIG or the in-cluster service account); the CA from the Secret
    /// `palisade-identity`; proxies authenticated by TokenReview.
    Kubernetes,
}

#[derive(clap::Args)]
pub struct ControlPlaneArgs {
    /// Config source.
    #[arg(long, env = "PALISADE_SOURCE", value_enum, default_value = "local")]
    pub source: Source,
    /// The mesh file (the local config source).
    #[arg(long, env = "PALISADE_MESH", default_value = "deploy/local/mesh.yaml")]
    pub config: PathBuf,
    /// Where the CA lives (`ca/`), created on first start (local source).
    #[arg(long, env = "PALISADE_STATE_DIR", default_value = ".palisade")]
    pub state_dir: PathBuf,
    /// JSON map of workload name to bootstrap token (written by `palisade up`); re-read when a
    /// proxy presents a token, and each token certifies one proxy start (local source).
    #[arg(long, env = "PALISADE_TOKENS")]
    pub tokens: Option<PathBuf>,
    /// gRPC listen address; default 127.0.0.1 and the mesh file's `controlPlane.port`
    /// (local), 0.0.0.0:8086 (kubernetes).
    #[arg(long, env = "PALISADE_CONTROL_PLANE_ADDR")]
    pub listen: Option<SocketAddr>,
    /// Serve /metrics, /ready, /live, /status and /config here.
    #[arg(long, env = "PALISADE_CONTROL_PLANE_METRICS_ADDR")]
    pub metrics: Option<SocketAddr>,
    /// The injector webhook's HTTPS address, default 0.0.0.0:8443 (kubernetes only).
    #[arg(long, env = "PALISADE_WEBHOOK_ADDR")]
    pub webhook_listen: Option<SocketAddr>,
    /// The image of the containers the injector adds (the proxy and `palisade init`),
    /// default palisade:<version> (kubernetes only; `palisade install --image` sets it to
    /// the control plane's own image).
    #[arg(long, env = "PALISADE_PROXY_IMAGE")]
    pub proxy_image: Option<String>,
    /// The namespace holding the Secret `palisade-identity`, default palisade-system
    /// (kubernetes only).
    #[arg(long, env = "PALISADE_NAMESPACE")]
    pub namespace: Option<String>,
    /// Leaf SVID lifetime, default 24h (kubernetes only; the mesh file sets it locally).
    #[arg(long, env = "PALISADE_CERTIFICATE_LIFETIME", value_parser = super::proxy::duration)]
    pub certificate_lifetime: Option<Duration>,
    /// What applies to a workload no AuthorizationPolicy selects: allow, deny or
    /// authenticated; default allow (kubernetes only; the mesh file sets it locally).
    #[arg(long, env = "PALISADE_DEFAULT_POLICY", value_parser = default_policy)]
    pub default_policy: Option<DefaultPolicy>,
    /// Give up when the cluster's resources are not all listed within this time (kubernetes
    /// only).
    #[arg(long, env = "PALISADE_SYNC_TIMEOUT", default_value = "60s", value_parser = super::proxy::duration)]
    pub sync_timeout: Duration,
}

fn default_policy(s: &str) -> Result<DefaultPolicy, String> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map_err(|_| format!("{s:?} is not one of allow, deny, authenticated"))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

pub fn run(args: ControlPlaneArgs) -> anyhow::Result<ExitCode> {
    if args.source == Source::Kubernetes {
        return run_kubernetes(args);
    }
    let kubernetes_only = [
        ("--webhook-listen", args.webhook_listen.is_some()),
        ("--proxy-image", args.proxy_image.is_some()),
        ("--namespace", args.namespace.is_some()),
        (
            "--certificate-lifetime",
            args.certificate_lifetime.is_some(),
        ),
        ("--default-policy", args.default_policy.is_some()),
    ];
    if let Some((flag, _)) = kubernetes_only.iter().find(|(_, given)| *given) {
        bail!("{flag} is only for --source kubernetes (the mesh file configures a local mesh)");
    }
    let cfg = palisade_control_plane::ControlPlaneConfig {
        mesh_path: args.config,
        state_dir: args.state_dir,
        listen: args.listen,
        tokens: HashMap::new(),
        tokens_file: args.tokens,
        metrics_listen: args.metrics,
    };
    runtime()?.block_on(async move {
        palisade_control_plane::run(cfg, super::shutdown_signal()).await?;
        Ok(ExitCode::SUCCESS)
    })
}

fn run_kubernetes(args: ControlPlaneArgs) -> anyhow::Result<ExitCode> {
    if args.tokens.is_some() {
        bail!(
            "--tokens is only for the local source: on Kubernetes proxies authenticate with their ServiceAccount token"
        );
    }
    let defaults = KubernetesConfig::default();
    let namespace = args
        .namespace
        .unwrap_or_else(|| DEFAULT_NAMESPACE.to_string());
    let listen = args.listen.unwrap_or(DEFAULT_LISTEN);
    let mut inject = defaults.inject.clone();
    if let Some(image) = args.proxy_image {
        if image.trim().is_empty() {
            bail!("--proxy-image is empty");
        }
        inject.image = image;
    }
    // Injected proxies dial the control plane's Service in its namespace.
    inject.control_plane = format!(
        "{}:{}",
        palisade_control_plane::k8s::control_plane::service_dns_name(&namespace),
        listen.port()
    );
    let lifetime = args
        .certificate_lifetime
        .unwrap_or(defaults.certificate_lifetime);
    let (min, max) = (
        palisade_certs::ca::MIN_LEAF_TTL,
        palisade_certs::ca::MAX_LEAF_TTL,
    );
    if !(min..=max).contains(&lifetime) {
        bail!("--certificate-lifetime {lifetime:?} is outside {min:?}..={max:?}");
    }
    let cfg = KubernetesConfig {
        namespace,
        listen,
        webhook_listen: Some(args.webhook_listen.unwrap_or(DEFAULT_WEBHOOK_LISTEN)),
        inject,
        metrics_listen: args.metrics,
        certificate_lifetime: lifetime,
        default_policy: args.default_policy.unwrap_or(defaults.default_policy),
        sync_timeout: args.sync_timeout,
        // The pod name (Kubernetes sets HOSTNAME to it), to tell replicas apart in Events.
        instance: std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()),
        ..defaults
    };
    runtime()?.block_on(async move {
        let cp = palisade_control_plane::k8s::control_plane::start(cfg).await?;
        palisade_control_plane::serve_until(cp, super::shutdown_signal()).await?;
        Ok(ExitCode::SUCCESS)
    })
}
