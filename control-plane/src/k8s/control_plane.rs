//! `palisade control-plane --source kubernetes`: the same Identity and Discovery services as
//! the local control plane, fed by the Kubernetes source, with TokenReview identities and the
//! CA from the Secret `palisade-identity`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::Api;
use palisade_api::PathNormalization;
use palisade_api::policy::DefaultPolicy;
use palisade_certs::{Ca, CaError, TrustBundle};

use super::source::{KubernetesSource, SourceConfig, SourceError};
use super::tokenreview::TokenReviewer;
use crate::inject::InjectConfig;
use crate::inject::webhook::{self, SERVING_CERT_TTL};
use crate::metrics::Metrics;
use crate::{ControlPlaneError, RunningControlPlane, Serving};

/// The namespace the control plane runs in and reads its Secret from, by default.
pub const DEFAULT_NAMESPACE: &str = "palisade-system";
/// The Secret holding the trust anchor and the issuer.
pub const IDENTITY_SECRET: &str = "palisade-identity";
/// Keys of [`IDENTITY_SECRET`]: trust anchor, issuer certificate, issuer key.
pub const SECRET_CA_CERT: &str = "ca.crt";
pub const SECRET_ISSUER_CERT: &str = "tls.crt";
pub const SECRET_ISSUER_KEY: &str = "tls.key";
/// gRPC (identity + discovery), on every interface of the pod.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 8086);
/// The injector webhook (HTTPS, `/inject`).
pub const DEFAULT_WEBHOOK_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 8443);

/// How to run the control plane on a cluster.
#[derive(Clone, Debug)]
pub struct KubernetesConfig {
    /// Where the Secret [`IDENTITY_SECRET`] is.
    pub namespace: String,
    pub listen: SocketAddr,
    /// The injector webhook's address (HTTPS, `/inject`); `None` serves no webhook.
    pub webhook_listen: Option<SocketAddr>,
    /// What the injector adds: the image, resources and the proxy's control-plane address
    /// (its trust domain is always the CA's).
    pub inject: InjectConfig,
    /// Keep the ConfigMap `palisade-trust-bundle` in every namespace
    /// ([`trust_bundle`](super::trust_bundle)).
    pub trust_bundle_copies: bool,
    /// `/metrics`, `/ready`, `/live`, `/status`, `/config?workload=NAME` over plain HTTP.
    pub metrics_listen: Option<SocketAddr>,
    pub certificate_lifetime: Duration,
    pub default_policy: DefaultPolicy,
    pub path_normalization: PathNormalization,
    /// How long to wait for the first list of every watched resource.
    pub sync_timeout: Duration,
    /// Read `security.istio.io` policies when their CRDs exist.
    pub istio: bool,
    /// This replica's name (the pod name), for the Events it records.
    pub instance: Option<String>,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        Self {
            namespace: DEFAULT_NAMESPACE.into(),
            listen: DEFAULT_LISTEN,
            webhook_listen: Some(DEFAULT_WEBHOOK_LISTEN),
            inject: InjectConfig::default(),
            trust_bundle_copies: true,
            metrics_listen: None,
            certificate_lifetime: Duration::from_secs(24 * 3600),
            default_policy: DefaultPolicy::default(),
            path_normalization: PathNormalization::default(),
            sync_timeout: super::source::DEFAULT_SYNC_TIMEOUT,
            istio: true,
            instance: None,
        }
    }
}

/// Why the control plane cannot start on a cluster.
#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    #[error(
        "no Kubernetes API to talk to (KUBECONFIG, ~/.kube/config or the in-cluster service account): {0}"
    )]
    Client(String),
    #[error("cannot read the Secret {namespace}/{IDENTITY_SECRET}: {message}")]
    Secret { namespace: String, message: String },
    #[error(
        "the Secret {namespace}/{IDENTITY_SECRET} has no key {key} (it needs {SECRET_CA_CERT}, {SECRET_ISSUER_CERT} and {SECRET_ISSUER_KEY}; `palisade install` generates it)"
    )]
    SecretKey {
        namespace: String,
        key: &'static str,
    },
    #[error("the CA in the Secret {namespace}/{IDENTITY_SECRET}: {source}")]
    Ca { namespace: String, source: CaError },
    #[error(
        "the issuer in the Secret {namespace}/{IDENTITY_SECRET} ({SECRET_ISSUER_CERT}) does not chain to its trust anchor ({SECRET_CA_CERT}): {message}"
    )]
    Chain { namespace: String, message: String },
    #[error(transparent)]
    Source(#[from] SourceError),
}

/// A client from `KUBECONFIG` (or `~/.kube/config`), else the in-cluster service account.
pub async fn default_client() -> Result<Client, K8sError> {
    palisade_certs::tls::install_default_provider();
    Client::try_default()
        .await
        .map_err(|e| K8sError::Client(e.to_string()))
}

/// Reads the CA from the Secret [`IDENTITY_SECRET`] in `namespace`, and checks that the
/// issuer's certificates verify against the trust anchor. Also returns the Secret's
/// [`SECRET_CA_CERT`] as it is (every root it holds, during a rotation two), which is what the
/// proxies must trust.
pub async fn load_ca(client: &Client, namespace: &str) -> Result<(Ca, String), K8sError> {
    let secret = Api::<Secret>::namespaced(client.clone(), namespace)
        .get(IDENTITY_SECRET)
        .await
        .map_err(|e| K8sError::Secret {
            namespace: namespace.into(),
            message: e.to_string(),
        })?;
    let data = secret.data.unwrap_or_default();
    let get = |key: &'static str| {
        data.get(key)
            .map(|b| b.0.as_slice())
            .filter(|b| !b.is_empty())
            .ok_or(K8sError::SecretKey {
                namespace: namespace.into(),
                key,
            })
    };
    let anchor_pem = String::from_utf8_lossy(get(SECRET_CA_CERT)?).into_owned();
    let ca = Ca::from_pem(
        &format!("Secret {namespace}/{IDENTITY_SECRET}"),
        get(SECRET_CA_CERT)?,
        get(SECRET_ISSUER_CERT)?,
        get(SECRET_ISSUER_KEY)?,
    )
    .map_err(|source| K8sError::Ca {
        namespace: namespace.into(),
        source,
    })?;
    // A mismatched pair would sign certificates no proxy accepts: say so now, not per proxy.
    let chain_err = |message: String| K8sError::Chain {
        namespace: namespace.into(),
        message,
    };
    let probe = crate::control_plane_id(ca.trust_domain()).map_err(|e| chain_err(e.to_string()))?;
    let svid = ca
        .issue(&probe, Duration::from_secs(60))
        .map_err(|e| chain_err(e.to_string()))?;
    let bundle = TrustBundle::with_roots(ca.trust_domain(), [ca.root_der().clone()])
        .map_err(|e| chain_err(e.to_string()))?;
    palisade_certs::verify::verify_svid(
        &svid.chain,
        &bundle,
        Some(ca.trust_domain()),
        rustls_pki_types::UnixTime::now(),
    )
    .map_err(|e| chain_err(e.to_string()))?;
    Ok((ca, anchor_pem))
}

/// The control plane's Service in its namespace: what injected proxies dial, and the name the
/// API server calls the webhook at (so the serving certificate's).
pub fn service_dns_name(namespace: &str) -> String {
    format!("{}.{namespace}.svc", super::manifests::NAME)
}

/// Starts the control plane with the client [`default_client`] makes.
pub async fn start(cfg: KubernetesConfig) -> Result<RunningControlPlane, ControlPlaneError> {
    let client = default_client().await?;
    start_with_client(client, cfg).await
}

/// Starts the control plane against the API server behind `client`: reads the CA from the
/// Secret, syncs the source (an error if that fails), and serves. Returns once it is
/// listening.
pub async fn start_with_client(
    client: Client,
    cfg: KubernetesConfig,
) -> Result<RunningControlPlane, ControlPlaneError> {
    palisade_certs::tls::install_default_provider();
    let metrics = Metrics::new();
    let (ca, anchor_pem) = load_ca(&client, &cfg.namespace).await?;
    let ca = Arc::new(ca);
    let td = ca.trust_domain().clone();
    tracing::info!(
        secret = %format!("{}/{IDENTITY_SECRET}", cfg.namespace),
        trust_domain = %td,
        "CA loaded"
    );

    let mut source_cfg = SourceConfig::new(td.clone());
    source_cfg.certificate_lifetime = cfg.certificate_lifetime;
    source_cfg.default_policy = cfg.default_policy;
    source_cfg.path_normalization = cfg.path_normalization;
    source_cfg.control_plane_port = cfg.listen.port();
    source_cfg.sync_timeout = cfg.sync_timeout;
    source_cfg.istio = cfg.istio;
    source_cfg.event_instance = cfg.instance.clone();
    let source = KubernetesSource::start(client.clone(), source_cfg, metrics.clone())
        .await
        .map_err(K8sError::from)?;
    let mut cp = crate::serve(Serving {
        source: Box::new(source),
        ca: ca.clone(),
        tokens: Arc::new(TokenReviewer::new(client.clone(), td.clone())),
        metrics: metrics.clone(),
        listen: cfg.listen,
        metrics_listen: cfg.metrics_listen,
        state_dir: None,
    })
    .await?;

    if cfg.trust_bundle_copies {
        let task = super::trust_bundle::keep_trust_bundles(
            client.clone(),
            anchor_pem,
            metrics,
            cp.stop_signal(),
        );
        cp.add_task(tokio::spawn(task));
    }
    if let Some(addr) = cfg.webhook_listen {
        let mut inject = cfg.inject.clone();
        inject.trust_domain = td;
        let bound = serve_injector(&mut cp, client, ca, &cfg.namespace, addr, inject).await?;
        tracing::info!(addr = %bound, path = webhook::PATH, "injector webhook serving");
    }
    Ok(cp)
}

/// Starts the injector webhook beside the gRPC server: its serving certificate from the mesh CA
/// (renewed by [`webhook::renew_serving_cert`]), namespace labels from a watch of Namespaces,
/// stopped with the control plane. Returns the bound address.
async fn serve_injector(
    cp: &mut RunningControlPlane,
    client: Client,
    ca: Arc<Ca>,
    namespace: &str,
    addr: SocketAddr,
    inject: InjectConfig,
) -> Result<SocketAddr, ControlPlaneError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ControlPlaneError::Listen { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| ControlPlaneError::Listen { addr, source })?;
    let dns = service_dns_name(namespace);
    let issue = move || ca.issue_serving_cert(&[dns.as_str()], SERVING_CERT_TTL);
    let cert = issue().map_err(|e| ControlPlaneError::Tls(e.to_string()))?;
    let store = palisade_certs::tls::ServingCertStore::new(&cert)
        .map_err(|e| ControlPlaneError::Tls(e.to_string()))?;
    let (namespaces, watch) = webhook::watch_namespaces(client);
    cp.add_task(tokio::spawn(watch));
    cp.add_task(tokio::spawn({
        let (store, stop) = (store.clone(), cp.stop_signal());
        async move {
            webhook::renew_serving_cert(store, SERVING_CERT_TTL, issue, stop).await;
        }
    }));
    let stop = cp.stop_signal();
    cp.add_task(tokio::spawn(async move {
        let served = webhook::serve_webhook(
            listener,
            store,
            Arc::new(inject),
            Arc::new(namespaces),
            stop,
        );
        if let Err(e) = served.await {
            tracing::error!(error = %e, "the injector webhook stopped");
        }
    }));
    cp.set_webhook_addr(bound);
    Ok(bound)
}
