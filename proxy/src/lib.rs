//! Palisade's sidecar data plane.
//!
//! One entry point, [`run`] (or [`Proxy::start`] when the caller wants the bound addresses),
//! and a module per concern: `inbound` and `outbound` hold the two stacks, `tls` and
//! `identity` the mTLS side, `authz` the compiled policy, `balance` endpoint selection,
//! `telemetry` the metrics, `admin` the admin server. `docs/ARCHITECTURE.md` draws the stacks.
//!
//! Configuration is split the way it changes: [`config::ProxyConfig`] is fixed at start,
//! [`config::Snapshot`] arrives from the control plane (or a file) and is swapped atomically;
//! the request path reads it through `ArcSwap` without locks.
#![forbid(unsafe_code)]

pub mod admin;
mod admin_config;
mod admission;
pub mod app_probe;
pub mod authz;
pub mod authz_layer;
pub mod balance;
pub mod config;
pub mod control_plane;
pub mod detect;
mod discovery;
pub mod egress;
pub mod errors;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod identity;
pub mod inbound;
pub mod io;
pub mod normalize;
pub mod outbound;
pub mod ratelimit;
pub mod routing;
pub mod sanitize;
pub mod summary;
pub mod tap;
pub mod tcp;
pub mod telemetry;
pub mod tls;
pub mod trace;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use palisade_certs::{CredentialStore, TrustBundle};
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore, watch};

pub use config::{ProxyConfig, Snapshot};
pub use identity::IdentityError;

use crate::config::CredentialSource;
use crate::telemetry::{Label, Metrics};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error(
        "the certificate expired and the control plane refuses this proxy's token; start the proxy again with fresh credentials (palisade up does)"
    )]
    CredentialsLost,
}

/// State shared by every task of one proxy.
pub struct Ctx {
    pub(crate) cfg: ProxyConfig,
    pub(crate) store: Arc<CredentialStore>,
    pub(crate) snapshot: ArcSwap<Snapshot>,
    /// Bumped after each applied snapshot; open TCP connections re-check authorization on it.
    pub(crate) version_tx: watch::Sender<u64>,
    pub(crate) metrics: Arc<Metrics>,
    /// Span sampling and export (propagation only when no OTLP endpoint is set).
    pub(crate) tracer: Arc<trace::Tracer>,
    pub(crate) own_label: Label,
    pub(crate) outbound: outbound::Table,
    /// Set when the proxy resolves redirected destinations on demand (a transparent listener
    /// and a control plane).
    pub(crate) on_demand: Option<outbound::OnDemand>,
    pub(crate) app: Option<Arc<inbound::AppClients>>,
    /// Resolves egress names (one resolver, and so one DNS cache, per proxy).
    pub(crate) dns: egress::dns::Dns,
    /// Clients to app ports other than `app`'s, for redirected connections (a Kubernetes pod
    /// whose app listens on several ports). Looked up once per connection.
    pub(crate) other_apps:
        std::sync::Mutex<std::collections::HashMap<SocketAddr, Arc<inbound::AppClients>>>,
    /// Connection slots (`max_connections`), and which unidentified connection gives its
    /// slot up when the proxy is full.
    pub(crate) admission: Arc<admission::Admission>,
    /// Mirrored requests in flight (RequestMirror is fire and forget: a slow mirror backend
    /// must not pile up tasks without bound).
    pub(crate) mirror_permits: Arc<Semaphore>,
    pub(crate) stop_tx: watch::Sender<bool>,
    pub(crate) stop_rx: watch::Receiver<bool>,
    config_ready: AtomicBool,
    /// `palisade_api::config_digest` of the last config from the control plane.
    pub(crate) config_digest: std::sync::atomic::AtomicU64,
    shutdown_requested: Notify,
    /// The certificate expired and cannot be renewed by this process ([`identity::renew_loop`]).
    pub(crate) credentials_lost: Notify,
}

impl Ctx {
    pub(crate) fn config_ready(&self) -> bool {
        self.config_ready.load(Ordering::Acquire)
    }

    /// Applies a snapshot whole: outbound table first, then the snapshot, then the version
    /// notification, so a request never sees half of a config.
    pub(crate) fn apply(&self, snap: Snapshot) {
        if !snap.trust_bundle.is_empty() {
            let td = self.store.id().trust_domain();
            let roots = snap
                .trust_bundle
                .iter()
                .map(|d| rustls_pki_types::CertificateDer::from(d.clone()));
            match TrustBundle::with_roots(&td, roots) {
                Ok(b) => self.store.set_bundle(identity::merge_bundle(self, b)),
                Err(e) => tracing::warn!(error = %e, "ignoring a bad trust bundle in the config"),
            }
        }
        outbound::rebuild(self, &snap);
        let mut snap = snap;
        // The same RateLimitPolicy keeps its limiter, and every caller its bucket: a config
        // change elsewhere must not hand each caller a fresh burst.
        if let (Some(new), Some(old)) = (
            &snap.inbound.rate_limit,
            &self.snapshot.load().inbound.rate_limit,
        ) && new.same_policy(old)
        {
            snap.inbound.rate_limit = Some(old.clone());
        }
        let version = snap.version;
        self.snapshot.store(Arc::new(snap));
        self.metrics.config_version.set(version as i64);
        self.config_ready.store(true, Ordering::Release);
        self.version_tx.send_replace(version);
        tracing::debug!(version, "config applied");
    }

    /// The port that policies call the destination port: the workload's own port (the app's
    /// port, Istio's Service targetPort), not the sidecar's inbound listener, so an imported
    /// Istio `ports: ["8080"]` or `portLevelMtls` keeps its meaning. A workload without an app
    /// port falls back to the listener's.
    pub(crate) fn workload_port(&self, listener_port: u16) -> u16 {
        self.cfg.app_addr.map_or(listener_port, |a| a.port())
    }

    /// Pooled clients to the app at `addr`.
    pub(crate) fn app_clients(&self, addr: SocketAddr) -> Arc<inbound::AppClients> {
        if let Some(app) = &self.app
            && app.addr() == addr
        {
            return app.clone();
        }
        let mut others = self
            .other_apps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        others
            .entry(addr)
            .or_insert_with(|| Arc::new(inbound::AppClients::new(addr, self.cfg.timeouts.connect)))
            .clone()
    }

    pub(crate) fn begin_shutdown(&self) {
        self.shutdown_requested.notify_one();
    }
}

/// A running proxy.
pub struct Proxy {
    ctx: Arc<Ctx>,
    pub inbound_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub upstream_addrs: Vec<(String, SocketAddr)>,
    pub transparent_addr: Option<SocketAddr>,
}

/// The accept queue of each listener. tokio's `TcpListener::bind` (mio, as std) asks for 128:
/// a burst of more new connections than that while the accept loop is busy overflows it, the
/// kernel drops SYNs (or the handshake's last ACK), and those clients wait out the 1 s SYN
/// retransmit and its backoff, seconds on a busy proxy. The kernel caps this at
/// `net.core.somaxconn` (4096 by default since Linux 5.4).
const LISTEN_BACKLOG: u32 = 4096;

async fn bind(addr: SocketAddr) -> Result<TcpListener, ProxyError> {
    let listen = || -> std::io::Result<TcpListener> {
        let socket = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        // As `TcpListener::bind` does: a restarted proxy rebinds its port at once.
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    listen().map_err(|source| ProxyError::Bind { addr, source })
}

impl Proxy {
    /// Binds every listener, obtains credentials (from files at once; from the control plane
    /// in the background, `/ready` says when) and starts serving.
    pub async fn start(cfg: ProxyConfig) -> Result<Proxy, ProxyError> {
        let td = cfg.identity.trust_domain();
        let bundle_path = match &cfg.credentials {
            CredentialSource::Files { bundle, .. } => bundle,
            CredentialSource::ControlPlane { bundle, .. } => bundle,
        };
        let bundle = identity::load_bundle(&td, bundle_path)?;
        let store = CredentialStore::new(cfg.identity.clone(), bundle);
        let static_snapshot = match &cfg.static_config {
            Some(path) => Some(Snapshot::load_static(path)?),
            None => None,
        };

        let admin = bind(cfg.admin_addr).await?;
        let inbound = bind(cfg.inbound_addr).await?;
        let mut upstreams = Vec::with_capacity(cfg.upstreams.len());
        for u in &cfg.upstreams {
            upstreams.push((u.service.clone(), bind(u.listen).await?));
        }
        let transparent = match cfg.transparent_addr {
            Some(a) => Some(bind(a).await?),
            None => None,
        };

        let (stop_tx, stop_rx) = watch::channel(false);
        let (version_tx, _) = watch::channel(0);
        let app = cfg
            .app_addr
            .map(|a| Arc::new(inbound::AppClients::new(a, cfg.timeouts.connect)));
        let metrics = Metrics::new();
        metrics.summary.configure(
            cfg.limits.traffic_summary_entries,
            cfg.limits.traffic_summary_window,
        );
        let tracer = Arc::new(trace::Tracer::start(
            &cfg.tracing,
            cfg.identity.as_str(),
            metrics.clone(),
        ));
        let ctx = Arc::new(Ctx {
            own_label: Label::new(cfg.identity.as_str()),
            tracer,
            admission: admission::Admission::new(cfg.limits.max_connections),
            mirror_permits: Arc::new(Semaphore::new(outbound::MAX_MIRRORS_IN_FLIGHT)),
            store,
            snapshot: ArcSwap::from_pointee(Snapshot::empty()),
            version_tx,
            metrics,
            outbound: ArcSwap::from_pointee(Default::default()),
            on_demand: (transparent.is_some()
                && matches!(cfg.credentials, CredentialSource::ControlPlane { .. }))
            .then(|| {
                outbound::OnDemand::new(
                    cfg.limits.max_on_demand_services,
                    cfg.upstreams.iter().map(|u| u.service.clone()).collect(),
                )
            }),
            app,
            dns: egress::dns::Dns::new(cfg.dns_server),
            other_apps: Default::default(),
            stop_tx,
            stop_rx,
            config_ready: AtomicBool::new(false),
            config_digest: std::sync::atomic::AtomicU64::new(0),
            shutdown_requested: Notify::new(),
            credentials_lost: Notify::new(),
            cfg,
        });

        let proxy = Proxy {
            inbound_addr: local(&inbound)?,
            admin_addr: local(&admin)?,
            upstream_addrs: upstreams
                .iter()
                .map(|(s, l)| Ok((s.clone(), local(l)?)))
                .collect::<Result<_, ProxyError>>()?,
            transparent_addr: transparent.as_ref().map(local).transpose()?,
            ctx: ctx.clone(),
        };

        tokio::spawn(admin::serve(admin, ctx.clone(), ctx.stop_rx.clone()));
        tokio::spawn(cost_ticks(ctx.metrics.clone(), ctx.stop_rx.clone()));
        tokio::spawn(identity::expiry_watch(ctx.clone()));

        match ctx.cfg.credentials.clone() {
            CredentialSource::Files { cert, key, .. } => {
                let svid = identity::load_files(&ctx.cfg.identity, &cert, &key)?;
                identity::install(&ctx, svid)?;
            }
            CredentialSource::ControlPlane { addrs, .. } => {
                let ctx = ctx.clone();
                let dialer = Arc::new(control_plane::Dialer::new(addrs));
                tokio::spawn(async move { bootstrap(ctx, dialer).await });
            }
        }
        if let Some(snap) = static_snapshot {
            ctx.apply(snap);
        }

        tokio::spawn(inbound::serve(inbound, ctx.clone(), ctx.stop_rx.clone()));
        for (service, l) in upstreams {
            tokio::spawn(outbound::serve_upstream(
                l,
                Arc::from(service.as_str()),
                ctx.clone(),
                ctx.stop_rx.clone(),
            ));
        }
        if let Some(l) = transparent {
            tokio::spawn(outbound::serve_transparent(
                l,
                ctx.clone(),
                ctx.stop_rx.clone(),
            ));
        }
        Ok(proxy)
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.ctx.metrics
    }

    /// Where the transparent listener sends a connection whose original destination was
    /// `dst`, resolving it on demand as a redirected connection would. A redirected connection
    /// needs iptables in a network namespace; this lets a test without them drive the same
    /// resolution.
    pub async fn route_for(&self, dst: SocketAddr) -> outbound::Routed {
        outbound::transparent_target(&self.ctx, dst).await
    }

    /// Serves `tcp` as the transparent listener serves a connection redirected from the
    /// original destination `dst` (within the connection limit, like any connection). A test
    /// without iptables drives the redirected path this way, egress policy included.
    pub async fn serve_redirected(&self, tcp: tokio::net::TcpStream, dst: SocketAddr) {
        let Ok(_permit) = self.ctx.admission.slots().clone().try_acquire_owned() else {
            return;
        };
        outbound::redirected(self.ctx.clone(), tcp, dst, None).await;
    }

    pub fn store(&self) -> &Arc<CredentialStore> {
        &self.ctx.store
    }

    /// The config in use (the last one applied).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.ctx.snapshot.load_full()
    }

    pub fn is_ready(&self) -> bool {
        self.ctx.store.is_ready() && self.ctx.config_ready()
    }

    /// Replaces the dynamic config (what the Discovery stream does), for embedders and tests.
    pub fn apply(&self, snapshot: Snapshot) {
        self.ctx.apply(snapshot);
    }

    /// Resolves when someone POSTs `/shutdown` on the admin port.
    pub async fn shutdown_requested(&self) {
        self.ctx.shutdown_requested.notified().await;
    }

    /// Stops accepting, lets in-flight requests finish up to the drain deadline, then returns.
    ///
    /// Every connection of every listener (HTTP and opaque, inbound, outbound and redirected)
    /// holds a permit of the connection limit until it ends, and HTTP connections shut down
    /// gracefully when the proxy stops: the drain is over when every permit is back.
    pub async fn shutdown(self) {
        let _ = self.ctx.stop_tx.send(true);
        let all = u32::try_from(self.ctx.cfg.limits.max_connections).unwrap_or(u32::MAX);
        let deadline = tokio::time::Instant::now() + self.ctx.cfg.timeouts.drain;
        match tokio::time::timeout_at(deadline, self.ctx.admission.slots().acquire_many(all)).await
        {
            Ok(_) => tracing::debug!("every connection finished"),
            Err(_) => tracing::info!(
                open = self.ctx.cfg.limits.max_connections
                    - self.ctx.admission.slots().available_permits(),
                "drain deadline reached; closing the connections left"
            ),
        }
    }
}

fn local(l: &TcpListener) -> Result<SocketAddr, ProxyError> {
    l.local_addr().map_err(|source| ProxyError::Bind {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    })
}

/// First certificate from the control plane, retried with backoff; then the config stream
/// and the renewal loop.
async fn bootstrap(ctx: Arc<Ctx>, dialer: Arc<control_plane::Dialer>) {
    let mut backoff = Duration::from_millis(50);
    let mut stop = ctx.stop_rx.clone();
    loop {
        match identity::certify(&ctx, &dialer, &identity::current_token(&ctx)).await {
            Ok((svid, bundle)) => {
                ctx.store.set_bundle(identity::merge_bundle(&ctx, bundle));
                match identity::install(&ctx, svid) {
                    Ok(()) => break,
                    Err(e) => tracing::error!(error = %e, "certificate not installed"),
                }
            }
            Err(e) => tracing::warn!(error = %e, "waiting for a certificate"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
    tracing::info!(id = %ctx.store.id(), expiry = ctx.store.expiry().unwrap_or(0), "certificate obtained");
    if ctx.cfg.static_config.is_none() {
        tokio::spawn(discovery::watch_loop(ctx.clone(), dialer.clone()));
    }
    identity::renew_loop(ctx, dialer).await;
}

/// Runs a proxy until `shutdown` resolves or `/shutdown` is posted, then drains.
pub async fn run(
    cfg: ProxyConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ProxyError> {
    let proxy = Proxy::start(cfg).await?;
    tracing::info!(
        inbound = %proxy.inbound_addr,
        admin = %proxy.admin_addr,
        "proxy started"
    );
    let lost = tokio::select! {
        _ = shutdown => false,
        _ = proxy.shutdown_requested() => false,
        _ = proxy.ctx.credentials_lost.notified() => true,
    };
    tracing::info!("draining");
    proxy.shutdown().await;
    if lost {
        return Err(ProxyError::CredentialsLost);
    }
    Ok(())
}

/// Once a second: apportions the proxy's CPU time to the requests of that second (cost
/// attribution) and ages the traffic summary.
async fn cost_ticks(metrics: Arc<Metrics>, mut stop: watch::Receiver<bool>) {
    let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {
                metrics.cost.tick();
                metrics.summary.tick();
            }
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    /// A burst of new connections larger than std's accept queue of 128 is queued by the
    /// kernel while the proxy is busy, instead of waiting out SYN retransmits: no accept runs
    /// here at all, and every connect must still complete at once.
    #[tokio::test]
    async fn a_burst_of_connections_waits_in_the_accept_queue() {
        const BURST: usize = 600;
        let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        if somaxconn < BURST + 1 {
            println!("skipped: net.core.somaxconn is {somaxconn}, below a burst of {BURST}");
            return;
        }
        let listener = super::bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut held = Vec::with_capacity(BURST);
        for i in 0..BURST {
            // A dropped SYN is retried after 1 s: 500 ms tells the two apart.
            match tokio::time::timeout(
                Duration::from_millis(500),
                tokio::net::TcpStream::connect(addr),
            )
            .await
            {
                Ok(Ok(s)) => held.push(s),
                Ok(Err(e)) => panic!("connection {i} of the burst failed: {e}"),
                Err(_) => panic!("connection {i} of the burst waited for a SYN retransmit"),
            }
        }
        assert_eq!(held.len(), BURST);
        drop(listener);
    }
}
