//! Palisade's control plane: the CA behind the Identity service, the Discovery service that
//! streams each proxy its own config, and the config sources that feed them (the local mesh
//! file and policies directory, [`start`]; or the Kubernetes API, [`k8s::control_plane::start`])
//! through the same model.
//!
//! The API is gRPC over TLS with the control plane's own SVID
//! (`spiffe://<td>/ns/palisade-system/sa/control-plane`). A client certificate is optional at
//! the TLS layer because a bootstrapping proxy has only a token; each RPC then decides what
//! the caller's identity (or token) entitles it to.
#![forbid(unsafe_code)]

pub mod analyze;
pub mod conn;
pub mod discovery;
#[doc(hidden)]
pub mod fuzzing;
pub mod identity;
pub mod inject;
pub mod k8s;
pub mod limits;
pub mod mesh;
pub mod metrics;
pub mod model;
pub mod parts;
pub mod pieces;
pub mod served;
pub mod source;
pub mod tokens;
pub mod traffic;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use palisade_api::v1::discovery_server::DiscoveryServer;
use palisade_api::v1::identity_server::IdentityServer;
use palisade_certs::{Ca, CaError, CredentialStore, SpiffeId, TrustBundle, TrustDomain};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

pub use conn::PeerInfo;
pub use identity::{BootstrapTokens, TokenAuthenticator};
pub use mesh::{Mesh, MeshError};
pub use metrics::Metrics;
pub use model::{Model, ModelError};
pub use source::{ConfigSource, LocalSource, Rejection};
pub use tokens::{TokenError, TokenStore};

/// Namespace and service account of the control plane's own identity.
pub const CONTROL_PLANE_NAMESPACE: &str = "palisade-system";
pub const CONTROL_PLANE_SERVICE_ACCOUNT: &str = "control-plane";
/// Where the CA lives under the state directory.
pub const CA_DIR: &str = "ca";
/// How long a graceful shutdown waits for open connections before cutting them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// `spiffe://<td>/ns/palisade-system/sa/control-plane`: what proxies expect the control plane
/// to present.
pub fn control_plane_id(td: &TrustDomain) -> Result<SpiffeId, palisade_certs::SpiffeIdError> {
    SpiffeId::for_workload(td, CONTROL_PLANE_NAMESPACE, CONTROL_PLANE_SERVICE_ACCOUNT)
}

/// How to run a control plane.
#[derive(Clone)]
pub struct ControlPlaneConfig {
    /// The mesh file (local config source); its policies directory is watched too.
    pub mesh_path: PathBuf,
    /// Holds the CA in `ca/` (created on first start).
    pub state_dir: PathBuf,
    /// gRPC listen address; default `127.0.0.1:<controlPlane.port>` of the mesh file.
    pub listen: Option<SocketAddr>,
    /// Workload name -> bootstrap token, given in memory.
    pub tokens: HashMap<String, String>,
    /// A JSON file of workload name -> bootstrap token (`palisade up`'s `tokens.json`), read
    /// at start and again whenever a proxy presents a token, so tokens added to it later are
    /// accepted. Each token certifies one proxy start; see [`tokens`].
    pub tokens_file: Option<PathBuf>,
    /// Serve `/metrics`, `/ready`, `/live`, `/status` and `/config?workload=NAME` over plain
    /// HTTP here.
    pub metrics_listen: Option<SocketAddr>,
}

impl std::fmt::Debug for ControlPlaneConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The tokens are secrets: show whose they are, never what they are.
        let mut workloads: Vec<&String> = self.tokens.keys().collect();
        workloads.sort();
        f.debug_struct("ControlPlaneConfig")
            .field("mesh_path", &self.mesh_path)
            .field("state_dir", &self.state_dir)
            .field("listen", &self.listen)
            .field("tokens_for", &workloads)
            .field("tokens_file", &self.tokens_file)
            .field("metrics_listen", &self.metrics_listen)
            .finish()
    }
}

/// Why the control plane cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    #[error(transparent)]
    Config(#[from] ModelError),
    #[error("CA in {}: {source}", dir.display())]
    Ca { dir: PathBuf, source: CaError },
    #[error(
        "the CA in {} is for trust domain {ca}, but the mesh file says {mesh}; use another state directory or fix trustDomain",
        dir.display()
    )]
    TrustDomainMismatch {
        dir: PathBuf,
        ca: TrustDomain,
        mesh: TrustDomain,
    },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tokens(#[from] TokenError),
    #[error(transparent)]
    UnsafeStateDir(#[from] palisade_certs::secure_fs::UnsafePath),
    #[error("cannot set up TLS: {0}")]
    Tls(String),
    #[error("the gRPC server failed: {0}")]
    Serve(String),
    #[error(transparent)]
    Kubernetes(#[from] k8s::control_plane::K8sError),
}

/// A running control plane. Dropping it without [`RunningControlPlane::shutdown`] aborts its
/// tasks.
#[derive(Debug)]
pub struct RunningControlPlane {
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    webhook_addr: Option<SocketAddr>,
    /// The local control plane's state directory; None on Kubernetes.
    state_dir: Option<PathBuf>,
    trust_domain: TrustDomain,
    stop: watch::Sender<bool>,
    server: Option<JoinHandle<Result<(), String>>>,
    tasks: Vec<JoinHandle<()>>,
    source: Box<dyn ConfigSource>,
    metrics: Arc<Metrics>,
    store: Arc<CredentialStore>,
}

impl RunningControlPlane {
    /// Turns true when [`Self::shutdown`] begins: for servers that run beside the gRPC one
    /// (the injector webhook) and stop with it.
    pub fn stop_signal(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }

    /// A task that lives as long as the control plane: aborted by [`Self::shutdown`] (after
    /// the gRPC server's grace period) or when the control plane is dropped.
    pub fn add_task(&mut self, task: JoinHandle<()>) {
        self.tasks.push(task);
    }

    /// The gRPC address actually bound (useful with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The injector webhook's address actually bound, when this control plane serves it.
    pub fn webhook_addr(&self) -> Option<SocketAddr> {
        self.webhook_addr
    }

    pub(crate) fn set_webhook_addr(&mut self, addr: SocketAddr) {
        self.webhook_addr = Some(addr);
    }

    /// The metrics endpoint actually bound, if one was asked for.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The trust anchor (PEM) proxies need to verify the control plane:
    /// `<state_dir>/ca/root-cert.pem`. None on Kubernetes, where it is the Secret's `ca.crt`.
    pub fn trust_bundle_path(&self) -> Option<PathBuf> {
        self.state_dir
            .as_ref()
            .map(|d| d.join(CA_DIR).join(palisade_certs::ca::ROOT_CERT_FILE))
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The SPIFFE ID the control plane presents.
    pub fn identity(&self) -> &SpiffeId {
        self.store.id()
    }

    /// The model being served now.
    pub fn model(&self) -> Arc<Model> {
        self.source.current()
    }

    /// Model snapshots as they are published.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Model>> {
        self.source.subscribe()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Resolves when the gRPC server stops on its own (an error); never if all is well.
    pub async fn stopped(&mut self) -> Result<(), ControlPlaneError> {
        let Some(server) = self.server.as_mut() else {
            return Ok(());
        };
        let res = server.await;
        self.server = None;
        match res {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(ControlPlaneError::Serve(e)),
            Err(e) => Err(ControlPlaneError::Serve(e.to_string())),
        }
    }

    /// Stops accepting, ends the Watch streams (proxies keep their last config and reconnect
    /// with backoff), lets calls in flight finish for up to [`SHUTDOWN_GRACE`], then stops.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(server) = self.server.take() {
            let abort = server.abort_handle();
            if tokio::time::timeout(SHUTDOWN_GRACE, server).await.is_err() {
                tracing::warn!("connections still open after the grace period; closing them");
                abort.abort();
            }
        }
        for t in self.tasks.drain(..) {
            t.abort();
        }
        tracing::info!("control plane stopped");
    }
}

impl Drop for RunningControlPlane {
    fn drop(&mut self) {
        if let Some(s) = &self.server {
            s.abort();
        }
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Loads the CA from `dir`, or creates and saves one for `td` if there is none.
///
/// The state directory and `dir` are created 0700, and refused if another user owns them or
/// can write to them: a CA planted there would become the mesh's trust anchor, and the
/// consumed-token list would be theirs to edit. `Ca::load` refuses a key that is not ours and
/// 0600.
fn load_or_create_ca(
    state_dir: &Path,
    dir: &Path,
    td: &TrustDomain,
) -> Result<Ca, ControlPlaneError> {
    palisade_certs::secure_fs::ensure_private_dir(state_dir)?;
    palisade_certs::secure_fs::ensure_private_dir(dir)?;
    let ca_err = |source| ControlPlaneError::Ca {
        dir: dir.to_path_buf(),
        source,
    };
    if dir.join(palisade_certs::ca::ROOT_CERT_FILE).exists() {
        let ca = Ca::load(dir).map_err(ca_err)?;
        if ca.trust_domain() != td {
            return Err(ControlPlaneError::TrustDomainMismatch {
                dir: dir.to_path_buf(),
                ca: ca.trust_domain().clone(),
                mesh: td.clone(),
            });
        }
        tracing::info!(dir = %dir.display(), trust_domain = %td, "CA loaded");
        Ok(ca)
    } else {
        let ca = Ca::generate(td, None).map_err(ca_err)?;
        ca.save(dir).map_err(ca_err)?;
        tracing::info!(dir = %dir.display(), trust_domain = %td, "CA created");
        Ok(ca)
    }
}

/// Issues the control plane's own SVID and installs it.
fn issue_own(ca: &Ca, store: &CredentialStore, lifetime: Duration) -> Result<i64, String> {
    let svid = ca.issue(store.id(), lifetime).map_err(|e| e.to_string())?;
    let not_after = svid.not_after;
    store.install(svid).map_err(|e| e.to_string())?;
    Ok(not_after)
}

/// Renews the control plane's SVID at half its lifetime (with ±10% jitter, so control planes
/// sharing a CA do not renew in lockstep), retrying every second on failure. The old
/// certificate serves until the new one is installed.
///
/// The delay is half of the *remaining* time, measured right after an issue: NotBefore is
/// backdated for clock skew, so "NotBefore + lifetime/2" would come too early (immediately,
/// for the second-long lifetimes of tests).
async fn renew_loop(
    ca: Arc<Ca>,
    store: Arc<CredentialStore>,
    model: watch::Receiver<Arc<Model>>,
    metrics: Arc<Metrics>,
) {
    loop {
        let wait = match store.current() {
            Some(c) => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0);
                let remaining = c.svid.not_after as f64 - now;
                let jitter = 0.9 + rand::random::<f64>() * 0.2;
                Duration::from_secs_f64((remaining * 0.5 * jitter).max(0.05))
            }
            None => Duration::ZERO,
        };
        tokio::time::sleep(wait).await;
        let lifetime = model.borrow().mesh.certificate_lifetime;
        match issue_own(&ca, &store, lifetime) {
            Ok(not_after) => {
                metrics.cert_expiry.set(not_after);
                tracing::debug!(valid_until = not_after, "control-plane certificate renewed");
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot renew the control-plane certificate; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Starts the control plane: loads the config (an invalid one is an error here), loads or
/// creates the CA, issues its own SVID, and serves the API. Returns once it is listening.
pub async fn start(cfg: ControlPlaneConfig) -> Result<RunningControlPlane, ControlPlaneError> {
    // tonic and hyper may build rustls configs of their own; make ring the process default.
    palisade_certs::tls::install_default_provider();
    let metrics = Metrics::new();
    let source = LocalSource::start(&cfg.mesh_path, metrics.clone())?;
    let model = source.current();
    let td = model.mesh.trust_domain.clone();

    let ca_dir = cfg.state_dir.join(CA_DIR);
    let ca = Arc::new(load_or_create_ca(&cfg.state_dir, &ca_dir, &td)?);
    let token_store = TokenStore::open(
        cfg.tokens.clone(),
        cfg.tokens_file.as_deref(),
        &cfg.state_dir,
    )?;
    let listen = cfg
        .listen
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], model.mesh.control_plane.port)));
    serve(Serving {
        source: Box::new(source),
        ca,
        tokens: Arc::new(BootstrapTokens(token_store)),
        metrics,
        listen,
        metrics_listen: cfg.metrics_listen,
        state_dir: Some(cfg.state_dir),
    })
    .await
}

/// What [`serve`] needs, whatever the config source.
pub(crate) struct Serving {
    pub source: Box<dyn ConfigSource>,
    pub ca: Arc<Ca>,
    pub tokens: Arc<dyn TokenAuthenticator>,
    pub metrics: Arc<Metrics>,
    pub listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
    pub state_dir: Option<PathBuf>,
}

/// Issues the control plane's own SVID and serves the API (and the metrics endpoint, if
/// asked) from `s.source`'s models. Returns once it is listening.
pub(crate) async fn serve(s: Serving) -> Result<RunningControlPlane, ControlPlaneError> {
    let Serving {
        source,
        ca,
        tokens,
        metrics,
        listen,
        metrics_listen,
        state_dir,
    } = s;
    let model = source.current();
    let td = ca.trust_domain().clone();
    let lifetime = model.mesh.certificate_lifetime;
    let bundle = TrustBundle::with_roots(&td, [ca.root_der().clone()])
        .map_err(|e| ControlPlaneError::Tls(format!("the CA root is not a trust anchor: {e}")))?;
    let own_id = control_plane_id(&td)
        .map_err(|e| ControlPlaneError::Tls(format!("control-plane identity: {e}")))?;
    let store = CredentialStore::new(own_id.clone(), bundle);
    let not_after = issue_own(&ca, &store, lifetime).map_err(ControlPlaneError::Tls)?;
    metrics.cert_expiry.set(not_after);

    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| ControlPlaneError::Listen {
            addr: listen,
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|source| ControlPlaneError::Listen {
            addr: listen,
            source,
        })?;
    let tls =
        palisade_certs::tls::server_config_optional_client(&store, Some(td.clone()), &[b"h2"])
            .map_err(|e| ControlPlaneError::Tls(e.to_string()))?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();

    let metrics_addr = match metrics_listen {
        Some(maddr) => {
            let l = metrics::bind(maddr)
                .await
                .map_err(|source| ControlPlaneError::Listen {
                    addr: maddr,
                    source,
                })?;
            let bound = l.local_addr().map_err(|source| ControlPlaneError::Listen {
                addr: maddr,
                source,
            })?;
            let model_rx = source.subscribe();
            let rejection_rx = source.rejections();
            let status_store = store.clone();
            let status: metrics::StatusFn = Arc::new(move || {
                let m = model_rx.borrow().clone();
                let loopback = |port: u16| SocketAddr::from(([127, 0, 0, 1], port)).to_string();
                let mut doc = serde_json::json!({
                    "generation": m.generation,
                    "trustDomain": m.mesh.trust_domain.as_str(),
                    "identity": status_store.id().as_str(),
                    "certExpiry": status_store.expiry(),
                    "meshFile": m.mesh.path.display().to_string(),
                    "workloads": m.mesh.workloads.iter().map(|w| w.name.clone()).collect::<Vec<_>>(),
                    // Where each workload of the served mesh should be found (local mode).
                    "workloadAddrs": m.mesh.workloads.iter().map(|w| (w.name.clone(), serde_json::json!({
                        "adminAddr": loopback(w.admin_port),
                        "appAddr": w.app_port.map(loopback),
                        "inboundAddr": loopback(w.inbound_port),
                    }))).collect::<serde_json::Map<_, _>>(),
                    // The mesh's services in its order, each with its piece (the pieces are in
                    // key order).
                    "services": m.mesh.services.iter().map(|s| {
                        let endpoints: Vec<&str> = m.pieces().service(&s.name, &s.namespace, s.port)
                            .map(|shared| shared.msg.endpoints.iter().map(|e| e.workload.as_str()).collect())
                            .unwrap_or_default();
                        serde_json::json!({
                            "name": s.name,
                            "namespace": s.namespace,
                            "port": s.port,
                            "protocol": s.protocol.as_str(),
                            "selector": s.selector,
                            "endpoints": endpoints.len(),
                            "endpointWorkloads": endpoints,
                        })
                    }).collect::<Vec<_>>(),
                    "configDigests": m.mesh.workloads.iter().map(|w| {
                        let cfg = m.config_of(w);
                        (w.name.clone(), serde_json::json!(palisade_api::config_digest(&cfg)))
                    }).collect::<serde_json::Map<_, _>>(),
                });
                // Present only while the rejection is the latest event.
                if let Some(r) = rejection_rx.borrow().as_ref() {
                    doc["lastRejection"] = serde_json::json!({
                        "error": r.error,
                        "at": r.at,
                        "servingGeneration": r.serving_generation,
                    });
                }
                doc
            });
            // What the workload's proxy is served now (`palisade authz explain --live`).
            let config_rx = source.subscribe();
            let config: metrics::ConfigFn = Arc::new(move |workload| {
                let m = config_rx.borrow().clone();
                let served = m.served_config(workload)?;
                serde_json::to_value(served).ok()
            });
            tasks.push(tokio::spawn(metrics::serve(
                l,
                metrics.clone(),
                metrics::Routes { status, config },
                stop_rx.clone(),
            )));
            Some(bound)
        }
        None => None,
    };

    tasks.push(tokio::spawn(renew_loop(
        ca.clone(),
        store.clone(),
        source.subscribe(),
        metrics.clone(),
    )));

    let (conn_tx, conn_rx) = mpsc::channel(64);
    tasks.push(tokio::spawn(conn::accept_loop(
        listener,
        acceptor,
        metrics.clone(),
        conn_tx,
        stop_rx.clone(),
    )));

    let identity =
        identity::IdentityService::new(ca.clone(), source.subscribe(), tokens, metrics.clone());
    let discovery = discovery::DiscoveryService::new(
        source.subscribe(),
        vec![ca.root_der().to_vec()],
        metrics.clone(),
        stop_rx.clone(),
    );
    let incoming = ReceiverStream::new(conn_rx).map(Ok::<_, std::io::Error>);
    let mut stop_signal = stop_rx.clone();
    let api_metrics = metrics.clone();
    let server = tokio::spawn(async move {
        tonic::transport::Server::builder()
            // Watch streams are long-lived and mostly idle: pings find proxies that vanished
            // without closing their connection, so their streams and tasks are freed.
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_service(limits::OversizeGuard::new(
                IdentityServer::new(identity)
                    .max_decoding_message_size(limits::MAX_REQUEST_MESSAGE)
                    .max_encoding_message_size(limits::MAX_CERTIFY_RESPONSE),
                api_metrics.clone(),
                "identity",
            ))
            .add_service(limits::OversizeGuard::new(
                DiscoveryServer::new(discovery)
                    .max_decoding_message_size(limits::MAX_REQUEST_MESSAGE)
                    .max_encoding_message_size(limits::MAX_CONFIG_MESSAGE),
                api_metrics,
                "discovery",
            ))
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = stop_signal.wait_for(|s| *s).await;
            })
            .await
            .map_err(|e| {
                let mut msg = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    msg.push_str(": ");
                    msg.push_str(&s.to_string());
                    src = s.source();
                }
                msg
            })
    });

    tracing::info!(
        %addr,
        identity = %own_id,
        trust_domain = %td,
        workloads = model.mesh.workloads.len(),
        services = model.mesh.services.len(),
        "control plane listening"
    );
    Ok(RunningControlPlane {
        addr,
        metrics_addr,
        webhook_addr: None,
        state_dir,
        trust_domain: td,
        stop: stop_tx,
        server: Some(server),
        tasks,
        source,
        metrics,
        store,
    })
}

/// Runs the control plane until `shutdown` resolves (or the server fails), then stops it
/// gracefully.
pub async fn run(
    cfg: ControlPlaneConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ControlPlaneError> {
    serve_until(start(cfg).await?, shutdown).await
}

/// Serves until `shutdown` resolves (or the server fails), then stops gracefully.
pub async fn serve_until(
    mut cp: RunningControlPlane,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ControlPlaneError> {
    let failed = tokio::select! {
        _ = shutdown => None,
        r = cp.stopped() => Some(r),
    };
    match failed {
        Some(r) => r,
        None => {
            tracing::info!("shutting down");
            cp.shutdown().await;
            Ok(())
        }
    }
}
