//! Outbound: traffic from the local app to mesh services.
//!
//! The stack, per app connection:
//!
//! ```text
//! accept (upstream port, or transparent + SO_ORIGINAL_DST), one connection-limit permit each
//!   -> by the service's protocol:
//!      opaque               -> no detection
//!      http | http2 | grpc  -> HTTP only: the HTTP/2 preface, or else the HTTP/1 parser (which
//!                              answers 400 to what is not HTTP); never a tunnel
//!      detect               -> HTTP/1 | HTTP/2 | opaque, by peeking
//!   HTTP:   http.rs: Telemetry -> Sanitize -> Classify (route.rs) -> Rescue -> Dispatch
//!           (route.rs: filters, faults, weighted backends) -> Timeout -> Retry -> Timeout
//!           (per attempt) -> Balance + Endpoint
//!   opaque: opaque.rs: Balance -> mTLS (ALPN palisade.dev/opaque) -> copy, with an idle timeout
//! ```
//!
//! A destination the mesh does not know is egress (`crate::egress`): an upstream listener
//! whose key is a DNS name no mesh service matches, or a redirected connection to an address
//! that is no service's or pod's. It leaves without mTLS, under the workload's EgressPolicy.
//!
//! `endpoint.rs` holds the peer connections: pooled HTTP/2 over mTLS (one connection per peer
//! endpoint, shared by every app connection), dedicated HTTP/1.1 mTLS connections for upgrades.
//! The peer proxy must prove the SPIFFE ID the config expects for the endpoint; otherwise the
//! handshake fails, the endpoint is ejected, and the failure is counted.

mod call;
mod endpoint;
mod http;
mod opaque;
mod resolve;
mod retry;
mod route;
mod timeout;

pub use resolve::{LOOKUP_TIMEOUT, NOT_FOUND_TTL, OnDemand, Resolved};
pub use route::{MAX_MIRRORS_IN_FLIGHT, MIRROR_TIMEOUT};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use tracing::Instrument as _;

use arc_swap::{ArcSwap, ArcSwapOption};
use hyper::client::conn::http2::SendRequest;
use palisade_certs::SpiffeId;
use tokio::net::{TcpListener, TcpStream};

use crate::admission::Unidentified;
use crate::balance::{Balancer, HasLoad, Load};
use crate::config::{EndpointConfig, Protocol, ServiceConfig, Snapshot};
use crate::detect::{self, Detected};
use crate::http::OutBody;
use crate::io::PrefixedIo;
use crate::telemetry::{Direction, Label, OpenConnGuard};
use crate::{Ctx, tls};

/// One peer endpoint with its load estimate and its pooled HTTP/2 connection.
pub struct Endpoint {
    pub cfg: EndpointConfig,
    pub identity: Label,
    load: Load,
    tls: tls::ClientConfigs,
    h2: ArcSwapOption<SendRequest<OutBody>>,
    connecting: tokio::sync::Mutex<()>,
}

impl HasLoad for Endpoint {
    fn load(&self) -> &Load {
        &self.load
    }
    fn weight(&self) -> u32 {
        self.cfg.weight
    }
}

pub struct OutService {
    pub cfg: Arc<ServiceConfig>,
    pub balancer: Balancer<Endpoint>,
    /// What retries of calls to this service may spend (see `http::Retry`).
    /// Carried over config changes (a fresh budget holds a full reserve), and shared with the
    /// service's pinned per-endpoint entries.
    pub budget: Arc<tower::retry::budget::TpsBudget>,
}

impl OutService {
    /// How long none of its endpoints has had a request (none in flight, no response since).
    pub(crate) fn idle_for(&self, now: std::time::Instant) -> std::time::Duration {
        self.balancer
            .endpoints()
            .iter()
            .map(|e| e.load.idle_for(now))
            .min()
            .unwrap_or(std::time::Duration::MAX)
    }
}

/// Retries may add 20% to a service's requests, and at least 10 a second, counted over 10 s
/// (Linkerd's and Finagle's default budget).
fn retry_budget() -> Arc<tower::retry::budget::TpsBudget> {
    Arc::new(tower::retry::budget::TpsBudget::new(
        std::time::Duration::from_secs(10),
        10,
        0.2,
    ))
}

/// The outbound routing table, rebuilt when a snapshot arrives.
pub type Table = ArcSwap<Routes>;

/// Services by name, and what a redirected connection's original destination means.
#[derive(Default)]
pub struct Routes {
    /// By `name.namespace:port`; also one single-endpoint entry per endpoint address
    /// (`endpoint:<ip:port>`), for connections made to one pod directly.
    services: HashMap<String, Arc<OutService>>,
    /// Original destination → the key in `services`: a service's virtual IPs, and endpoint
    /// addresses (pinned to that endpoint).
    by_addr: HashMap<SocketAddr, Arc<str>>,
}

impl Routes {
    pub fn get(&self, key: &str) -> Option<&Arc<OutService>> {
        self.services.get(key)
    }

    /// The service a redirected connection to `dst` is for, if the mesh knows `dst`.
    pub fn for_destination(&self, dst: SocketAddr) -> Option<Arc<str>> {
        self.by_addr.get(&dst).cloned()
    }
}

/// Builds the outbound table for a new snapshot, keeping the state (and open connections) of
/// endpoints that are still there with the same identity.
pub(crate) fn rebuild(ctx: &Ctx, snap: &Snapshot) {
    let old = ctx.outbound.load();
    let mut existing: HashMap<(SocketAddr, &SpiffeId), Arc<Endpoint>> = HashMap::new();
    for svc in old.services.values() {
        for e in svc.balancer.endpoints() {
            existing.insert((e.cfg.addr, &e.cfg.identity), e.clone());
        }
    }
    let mut table = HashMap::with_capacity(snap.services.len());
    let mut by_addr = HashMap::new();
    for (key, cfg) in &snap.services {
        let mut eps = Vec::with_capacity(cfg.endpoints.len());
        for e in &cfg.endpoints {
            if let Some(prev) = existing.get(&(e.addr, &e.identity)) {
                eps.push(prev.clone());
                continue;
            }
            match tls::ClientConfigs::new(&ctx.store, e.identity.clone()) {
                Ok(tls) => eps.push(Arc::new(Endpoint {
                    identity: Label::new(e.identity.as_str()),
                    cfg: e.clone(),
                    load: Load::default(),
                    tls,
                    h2: ArcSwapOption::empty(),
                    connecting: tokio::sync::Mutex::new(()),
                })),
                Err(err) => tracing::error!(endpoint = %e.addr, error = %err, "TLS config"),
            }
        }
        let budget = old
            .services
            .get(key)
            .map_or_else(retry_budget, |s| s.budget.clone());
        for vip in &cfg.virtual_addrs {
            by_addr.insert(*vip, Arc::from(key.as_str()));
        }
        for ep in &eps {
            // A connection to one pod's address goes to that pod, over the same pooled
            // connection as the service's traffic to it.
            let pinned = format!("endpoint:{}", ep.cfg.addr);
            by_addr
                .entry(ep.cfg.addr)
                .or_insert_with(|| Arc::from(pinned.as_str()));
            table.entry(pinned).or_insert_with(|| {
                Arc::new(OutService {
                    cfg: cfg.clone(),
                    balancer: Balancer::new(vec![ep.clone()], ctx.cfg.balancer),
                    budget: budget.clone(),
                })
            });
        }
        table.insert(
            key.clone(),
            Arc::new(OutService {
                cfg: cfg.clone(),
                balancer: Balancer::new(eps, ctx.cfg.balancer),
                budget,
            }),
        );
    }
    drop(existing);
    ctx.outbound.store(Arc::new(Routes {
        services: table,
        by_addr,
    }));
}

/// Accepts app connections for one declared upstream.
pub(crate) async fn serve_upstream(
    listener: TcpListener,
    service: Arc<str>,
    ctx: Arc<Ctx>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    // What the key means should it name no mesh service (read once per listener).
    let egress = crate::egress::Dest::from_key(&service).map(Arc::new);
    while let Some((tcp, _remote)) = crate::tcp::accept(&listener, &mut stop, "outbound").await {
        let evicted = || {
            ctx.metrics
                .refuse(Direction::outbound, "evicted_unidentified")
        };
        let Ok((permit, unidentified)) = ctx.admission.admit(evicted).await else {
            ctx.metrics.refuse(Direction::outbound, "connection_limit");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let ctx = ctx.clone();
        let service = service.clone();
        let egress = egress.clone();
        // Every log line about this connection names the upstream it was for.
        let span = tracing::info_span!("outbound", upstream = %service);
        tokio::spawn(
            async move {
                let _permit = permit;
                let target = match egress {
                    Some(dest) if crate::egress::is_egress_key(&ctx, &service, &dest) => {
                        Target::Egress(dest)
                    }
                    _ => Target::Service(service),
                };
                handle_app_conn(ctx, tcp, target, Some(unidentified)).await;
            }
            .instrument(span),
        );
    }
}

/// Accepts redirected connections (iptables REDIRECT) and recovers their destination.
pub(crate) async fn serve_transparent(
    listener: TcpListener,
    ctx: Arc<Ctx>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    while let Some((tcp, _remote)) = crate::tcp::accept(&listener, &mut stop, "transparent").await {
        // The same connection limit as every listener, and the permit is what a graceful
        // shutdown waits for: redirected connections drain like the others.
        let evicted = || {
            ctx.metrics
                .refuse(Direction::outbound, "evicted_unidentified")
        };
        let Ok((permit, unidentified)) = ctx.admission.admit(evicted).await else {
            ctx.metrics.refuse(Direction::outbound, "connection_limit");
            continue;
        };
        let dst = match original_dst(&tcp) {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(error = %e, "no SO_ORIGINAL_DST");
                ctx.metrics
                    .refuse(Direction::outbound, "no_original_destination");
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let ctx = ctx.clone();
        let span = tracing::info_span!("outbound", original_dst = %dst);
        tokio::spawn(
            async move {
                let _permit = permit;
                redirected(ctx, tcp, dst, Some(unidentified)).await;
            }
            .instrument(span),
        );
    }
}

/// Serves one redirected connection whose original destination was `dst`.
pub(crate) async fn redirected(
    ctx: Arc<Ctx>,
    tcp: TcpStream,
    dst: SocketAddr,
    unidentified: Option<Unidentified>,
) {
    let target = match transparent_target(&ctx, dst).await {
        Routed::Service(s) => Target::Service(s),
        Routed::Passthrough => Target::Passthrough(dst),
        Routed::Refused(reason) => {
            tracing::debug!(%dst, reason, "refusing a redirected connection: its destination is not resolved");
            ctx.metrics.refuse(Direction::outbound, reason);
            return;
        }
    };
    handle_app_conn(ctx, tcp, target, unidentified).await;
}

/// Where a redirected connection goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Routed {
    /// Through the mesh, to this entry of the outbound table (`name.namespace:port`, or
    /// `endpoint:<ip:port>` for a connection to one pod's address).
    Service(Arc<str>),
    /// Not a mesh destination: passed through as it is.
    Passthrough,
    /// Refused: the control plane could not resolve it (the reason, as counted).
    Refused(&'static str),
}

/// Where a redirected connection to `dst` goes: a service's virtual IP or an endpoint's address
/// goes through the mesh (mTLS to the endpoint); anything else is not a mesh destination and
/// passes through. A proxy that resolves on demand asks the control plane about a destination
/// its table does not know, and refuses the connection when that cannot be answered.
pub(crate) async fn transparent_target(ctx: &Ctx, dst: SocketAddr) -> Routed {
    let table = ctx.outbound.load();
    if let Some(service) = table.for_destination(dst) {
        if let Some(od) = &ctx.on_demand
            && let Some(s) = table.get(&service)
        {
            od.touch(&s.cfg.key);
        }
        return Routed::Service(service);
    }
    let Some(od) = &ctx.on_demand else {
        return Routed::Passthrough;
    };
    drop(table);
    match od.resolve(dst, &ctx.metrics).await {
        Resolved::NotFound => Routed::Passthrough,
        Resolved::Found => match ctx.outbound.load().for_destination(dst) {
            Some(service) => Routed::Service(service),
            // Found, but the config that carried it did not compile.
            None => Routed::Refused("discovery_unavailable"),
        },
        Resolved::Unavailable(reason) => Routed::Refused(reason),
    }
}

/// The destination a connection had before iptables redirected it to us.
pub fn original_dst(tcp: &TcpStream) -> std::io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(tcp);
    let addr = match tcp.local_addr()? {
        SocketAddr::V4(_) => sock.original_dst_v4()?,
        SocketAddr::V6(_) => sock.original_dst_v6()?,
    };
    addr.as_socket().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, "not an IP destination")
    })
}

enum Target {
    Service(Arc<str>),
    /// A redirected connection to no mesh destination: egress, by its original destination.
    Passthrough(SocketAddr),
    /// An upstream listener whose key names no mesh service: egress, by DNS name.
    Egress(Arc<crate::egress::Dest>),
}

async fn handle_app_conn(
    ctx: Arc<Ctx>,
    mut tcp: TcpStream,
    target: Target,
    unidentified: Option<Unidentified>,
) {
    let _open = OpenConnGuard::new(&ctx.metrics, Direction::outbound);
    let service = match target {
        Target::Service(s) => s,
        Target::Passthrough(dst) => {
            crate::egress::transparent(ctx, tcp, dst).await;
            return;
        }
        Target::Egress(dest) => {
            crate::egress::upstream(ctx, tcp, &dest).await;
            return;
        }
    };
    let protocol = ctx
        .outbound
        .load()
        .get(&service)
        .map(|s| s.cfg.protocol)
        .unwrap_or_default();
    let (detected, prefix) = if protocol == Protocol::Opaque {
        (Detected::Opaque, bytes::Bytes::new())
    } else {
        // Until the app's client has said what it speaks, a newer connection may take this
        // one's slot when the proxy is full (crate::admission).
        let evicted = async {
            match &unidentified {
                Some(u) => u.evicted().await,
                None => std::future::pending().await,
            }
        };
        let detected = tokio::select! {
            d = detect::detect(&mut tcp, ctx.cfg.timeouts.detect) => d,
            _ = evicted => return,
        };
        match detected {
            Ok(x) => x,
            Err(_) => return,
        }
    };
    drop(unidentified);
    let io = PrefixedIo::new(prefix, tcp);
    match (detected, protocol) {
        (Detected::Empty, _) => {}
        (Detected::Http2, _) => http::serve_http(ctx, io, service, true).await,
        (Detected::Http1, _) => http::serve_http(ctx, io, service, false).await,
        // An HTTP service gets HTTP or nothing: bytes the peek could not classify (a leading
        // CRLF, a lower-case method, an idle socket) go to the HTTP/1 parser, which serves them
        // if they are HTTP and answers 400 if not. A tunnel here would let the app's client
        // write any header, a forged x-forwarded-client-cert included, straight to the app.
        (_, Protocol::Http | Protocol::Http2 | Protocol::Grpc) => {
            http::serve_http(ctx, io, service, false).await
        }
        (Detected::Opaque | Detected::Tls, _) => opaque::opaque(ctx, io, &service).await,
    }
}
