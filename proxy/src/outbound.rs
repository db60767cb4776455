//! Outbound: traffic from the local app to mesh services.
//!
//! The stack, per app connection:
//!
//! ```text
//! accept (upstream port, or transparent + SO_ORIGINAL_DST)
//!   -> detect (HTTP/1 | HTTP/2 | opaque; skipped for opaque services)
//!   HTTP:   hyper server -> Telemetry -> [seam: timeouts, retries] -> Balance -> Endpoint
//!              Endpoint = pooled HTTP/2 over mTLS (one connection per peer endpoint,
//!              shared by every app connection), or for upgrades a dedicated HTTP/1.1 mTLS
//!              connection
//!   opaque: Balance -> mTLS (ALPN palisade.dev/opaque) -> bidirectional copy
//! ```
//!
//! The peer proxy must prove the SPIFFE ID the config expects for the endpoint; otherwise
//! the handshake fails, the request gets a 502, and the failure is counted.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::{ArcSwap, ArcSwapOption};
use futures_util::future::BoxFuture;
use http::{Request, Response, StatusCode, Version};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use palisade_certs::SpiffeId;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use tower::ServiceBuilder;

use crate::balance::{Balancer, HasLoad, Load};
use crate::config::{EndpointConfig, Protocol, ServiceConfig, Snapshot};
use crate::detect::{self, Detected};
use crate::http::{self as phttp, DstIdentity, RspBody, TelemetryLayer};
use crate::io::PrefixedIo;
use crate::sanitize::SanitizeLayer;
use crate::telemetry::{ConnLabels, DirLabels, Direction, Label, OpenConnGuard};
use crate::{Ctx, tls};

/// One peer endpoint with its load estimate and its pooled HTTP/2 connection.
pub struct Endpoint {
    pub cfg: EndpointConfig,
    pub identity: Label,
    load: Load,
    tls: tls::ClientConfigs,
    h2: ArcSwapOption<SendRequest<Incoming>>,
    connecting: tokio::sync::Mutex<()>,
}

impl HasLoad for Endpoint {
    fn load(&self) -> &Load {
        &self.load
    }
}

pub struct OutService {
    pub cfg: Arc<ServiceConfig>,
    pub balancer: Balancer<Endpoint>,
}

/// Services by `name.namespace:port`, rebuilt when a snapshot arrives.
pub type Table = ArcSwap<HashMap<String, Arc<OutService>>>;

#[derive(Debug, thiserror::Error)]
enum EndpointError {
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("mTLS handshake with {addr} failed ({reason}): {source}")]
    Tls {
        addr: SocketAddr,
        reason: &'static str,
        source: std::io::Error,
    },
    #[error("HTTP/2 with {addr}: {source}")]
    Http {
        addr: SocketAddr,
        source: hyper::Error,
    },
}

/// Builds the outbound table for a new snapshot, keeping the state (and open connections) of
/// endpoints that are still there with the same identity.
pub(crate) fn rebuild(ctx: &Ctx, snap: &Snapshot) {
    let old = ctx.outbound.load();
    let mut existing: HashMap<(SocketAddr, &SpiffeId), Arc<Endpoint>> = HashMap::new();
    for svc in old.values() {
        for e in svc.balancer.endpoints() {
            existing.insert((e.cfg.addr, &e.cfg.identity), e.clone());
        }
    }
    let mut table = HashMap::with_capacity(snap.services.len());
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
        table.insert(
            key.clone(),
            Arc::new(OutService {
                cfg: cfg.clone(),
                balancer: Balancer::new(eps, ctx.cfg.balancer),
            }),
        );
    }
    drop(existing);
    ctx.outbound.store(Arc::new(table));
}

/// Accepts app connections for one declared upstream.
pub(crate) async fn serve_upstream(
    listener: TcpListener,
    service: Arc<str>,
    ctx: Arc<Ctx>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    while let Some((tcp, _remote)) = crate::tcp::accept(&listener, &mut stop, "outbound").await {
        let Ok(permit) = ctx.conn_limit.clone().try_acquire_owned() else {
            ctx.metrics.refuse(Direction::outbound, "connection_limit");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let ctx = ctx.clone();
        let service = service.clone();
        tokio::spawn(async move {
            let _permit = permit;
            handle_app_conn(ctx, tcp, Target::Service(service)).await;
        });
    }
}

/// Accepts redirected connections (iptables REDIRECT) and recovers their destination.
pub(crate) async fn serve_transparent(
    listener: TcpListener,
    ctx: Arc<Ctx>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    while let Some((tcp, _remote)) = crate::tcp::accept(&listener, &mut stop, "transparent").await {
        let dst = match original_dst(&tcp) {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(error = %e, "no SO_ORIGINAL_DST");
                ctx.metrics
                    .refuse(Direction::outbound, "no_original_destination");
                continue;
            }
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            // Services are matched by virtual IP once a source provides them (Kubernetes);
            // until then a redirected connection passes through without mTLS.
            handle_app_conn(ctx, tcp, Target::Passthrough(dst)).await;
        });
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
    Passthrough(SocketAddr),
}

async fn handle_app_conn(ctx: Arc<Ctx>, mut tcp: TcpStream, target: Target) {
    let _open = OpenConnGuard::new(&ctx.metrics, Direction::outbound);
    let service = match target {
        Target::Service(s) => s,
        Target::Passthrough(dst) => {
            if let Ok(mut up) = crate::tcp::connect(dst, ctx.cfg.timeouts.connect).await {
                let _ =
                    crate::tcp::splice(&ctx.metrics, Direction::outbound, &mut tcp, &mut up).await;
            }
            return;
        }
    };
    let protocol = ctx
        .outbound
        .load()
        .get(&*service)
        .map(|s| s.cfg.protocol)
        .unwrap_or_default();
    let (detected, prefix) = if protocol == Protocol::Opaque {
        (Detected::Opaque, bytes::Bytes::new())
    } else {
        match detect::detect(&mut tcp, ctx.cfg.timeouts.detect).await {
            Ok(x) => x,
            Err(_) => return,
        }
    };
    let io = PrefixedIo::new(prefix, tcp);
    match detected {
        Detected::Empty => {}
        Detected::Http1 | Detected::Http2 => serve_http(ctx, io, service, detected).await,
        Detected::Opaque | Detected::Tls => opaque(ctx, io, &service).await,
    }
}

async fn serve_http(
    ctx: Arc<Ctx>,
    io: PrefixedIo<TcpStream>,
    service: Arc<str>,
    detected: Detected,
) {
    let svc = ServiceBuilder::new()
        .layer(TelemetryLayer::new(
            ctx.metrics.clone(),
            Direction::outbound,
            ctx.own_label.clone(),
            Label::new("unknown"),
            ctx.cfg.access_log,
        ))
        .layer(SanitizeLayer::new(
            ctx.metrics.clone(),
            Direction::outbound,
            None,
        ))
        // Seam: per-route timeouts and retries slot in here, between telemetry and the
        // balancer, once HTTPRoute lands.
        .service(Forward {
            ctx: ctx.clone(),
            service,
        });
    phttp::serve_connection(&ctx, io, svc, detected == Detected::Http2).await;
}

/// The balancer and endpoint stage of the outbound HTTP stack.
#[derive(Clone)]
struct Forward {
    ctx: Arc<Ctx>,
    service: Arc<str>,
}

impl tower::Service<Request<Incoming>> for Forward {
    type Response = Response<RspBody>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<RspBody>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let ctx = self.ctx.clone();
        let service = self.service.clone();
        Box::pin(async move { Ok(forward(ctx, &service, req).await) })
    }
}

async fn forward(ctx: Arc<Ctx>, service: &str, mut req: Request<Incoming>) -> Response<RspBody> {
    let table = ctx.outbound.load();
    let Some(svc) = table.get(service) else {
        return phttp::local_response(StatusCode::SERVICE_UNAVAILABLE, "unknown service\n");
    };
    let Some(ep) = svc.balancer.pick().cloned() else {
        return phttp::local_response(StatusCode::SERVICE_UNAVAILABLE, "no endpoints\n");
    };
    drop(table);
    let _inflight = ep.load.start();
    let upgrade = phttp::is_upgrade(&req);
    let result = if upgrade {
        forward_upgrade(&ctx, &ep, req).await
    } else {
        let orig = req.version();
        phttp::strip_hop_by_hop(req.headers_mut(), false);
        if orig != Version::HTTP_2 {
            let v = if orig == Version::HTTP_10 {
                "HTTP/1.0"
            } else {
                "HTTP/1.1"
            };
            req.headers_mut()
                .insert(phttp::ORIG_PROTO, http::HeaderValue::from_static(v));
            if let Err(status) = phttp::set_absolute_uri(&mut req, service) {
                return phttp::local_response(status, "bad request target\n");
            }
        }
        *req.version_mut() = Version::HTTP_2;
        send_h2(&ctx, &ep, req).await
    };
    let mut rsp = match result {
        Ok(rsp) => rsp.map(Either::Left),
        Err(e) => {
            tracing::warn!(service, endpoint = %ep.cfg.addr, error = %e, "outbound request failed");
            let status = match e {
                EndpointError::Connect { ref source, .. }
                    if source.kind() == std::io::ErrorKind::TimedOut =>
                {
                    StatusCode::GATEWAY_TIMEOUT
                }
                _ => StatusCode::BAD_GATEWAY,
            };
            phttp::local_response(status, "upstream unavailable\n")
        }
    };
    rsp.extensions_mut()
        .insert(DstIdentity(ep.identity.clone()));
    rsp
}

async fn send_h2(
    ctx: &Ctx,
    ep: &Endpoint,
    req: Request<Incoming>,
) -> Result<Response<Incoming>, EndpointError> {
    let mut sender = h2_sender(ctx, ep).await?;
    let req = match sender.try_send_request(req).await {
        Ok(rsp) => return Ok(rsp),
        Err(mut e) => match e.take_message() {
            // The pooled connection went away before the request was sent (the peer closed
            // it, or it idled out): the request is untouched, so send it on a fresh one.
            Some(req) => {
                tracing::debug!(endpoint = %ep.cfg.addr, error = %e.error(), "pooled connection closed; redialing");
                ep.h2.store(None);
                req
            }
            None => {
                return Err(EndpointError::Http {
                    addr: ep.cfg.addr,
                    source: e.into_error(),
                });
            }
        },
    };
    let mut sender = h2_sender(ctx, ep).await?;
    sender
        .send_request(req)
        .await
        .map_err(|source| EndpointError::Http {
            addr: ep.cfg.addr,
            source,
        })
}

/// The endpoint's pooled HTTP/2 connection, dialed once and shared by every request.
async fn h2_sender(ctx: &Ctx, ep: &Endpoint) -> Result<SendRequest<Incoming>, EndpointError> {
    if let Some(s) = ep.h2.load().as_ref()
        && !s.is_closed()
    {
        return Ok((**s).clone());
    }
    let _one_dialer = ep.connecting.lock().await;
    if let Some(s) = ep.h2.load().as_ref()
        && !s.is_closed()
    {
        return Ok((**s).clone());
    }
    let tls = dial(ctx, ep, tls::Alpn::H2).await?;
    let mut b = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .keep_alive_interval(std::time::Duration::from_secs(30))
        .keep_alive_while_idle(false)
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(4 << 20)
        .max_header_list_size(ctx.cfg.limits.max_header_bytes as u32);
    let (sender, conn) =
        b.handshake(TokioIo::new(tls))
            .await
            .map_err(|source| EndpointError::Http {
                addr: ep.cfg.addr,
                source,
            })?;
    let addr = ep.cfg.addr;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(endpoint = %addr, error = %e, "h2 connection closed");
        }
    });
    ep.h2.store(Some(Arc::new(sender.clone())));
    Ok(sender)
}

/// TCP + mTLS to the endpoint's inbound port, checking its SPIFFE ID.
async fn dial(
    ctx: &Ctx,
    ep: &Endpoint,
    alpn: tls::Alpn,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, EndpointError> {
    let addr = ep.cfg.addr;
    let tcp = crate::tcp::connect(addr, ctx.cfg.timeouts.connect)
        .await
        .map_err(|source| EndpointError::Connect { addr, source })?;
    let connector = TlsConnector::from(ep.tls.get(alpn));
    let hs = tokio::time::timeout(
        ctx.cfg.timeouts.handshake,
        connector.connect(tls::server_name(), tcp),
    )
    .await;
    let stream = match hs {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => {
            let reason = tls::io_error_reason(&source);
            ctx.metrics.handshake_error(Direction::outbound, reason);
            return Err(EndpointError::Tls {
                addr,
                reason,
                source,
            });
        }
        Err(_) => {
            ctx.metrics.handshake_error(Direction::outbound, "timeout");
            return Err(EndpointError::Tls {
                addr,
                reason: "timeout",
                source: std::io::Error::new(std::io::ErrorKind::TimedOut, "handshake timed out"),
            });
        }
    };
    ctx.metrics
        .tls_connections
        .get_or_create(&DirLabels {
            direction: Direction::outbound,
        })
        .inc();
    Ok(stream)
}

/// An HTTP/1.1 upgrade (WebSocket): a dedicated mTLS connection speaking HTTP/1.1, then the
/// two upgraded streams are spliced.
async fn forward_upgrade(
    ctx: &Arc<Ctx>,
    ep: &Endpoint,
    mut req: Request<Incoming>,
) -> Result<Response<Incoming>, EndpointError> {
    let tls = dial(ctx, ep, tls::Alpn::Http1).await?;
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(tls))
        .await
        .map_err(|source| EndpointError::Http {
            addr: ep.cfg.addr,
            source,
        })?;
    tokio::spawn(conn.with_upgrades());
    let client_upgrade = hyper::upgrade::on(&mut req);
    let (parts, body) = req.into_parts();
    let mut fwd = Request::from_parts(parts, body);
    fwd.headers_mut().remove(phttp::ORIG_PROTO);
    let mut rsp = sender
        .send_request(fwd)
        .await
        .map_err(|source| EndpointError::Http {
            addr: ep.cfg.addr,
            source,
        })?;
    if rsp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let server_upgrade = hyper::upgrade::on(&mut rsp);
        let metrics = ctx.metrics.clone();
        tokio::spawn(async move {
            if let (Ok(c), Ok(s)) = (client_upgrade.await, server_upgrade.await) {
                let mut c = TokioIo::new(c);
                let mut s = TokioIo::new(s);
                let _ = crate::tcp::splice(&metrics, Direction::outbound, &mut c, &mut s).await;
            }
        });
    }
    Ok(rsp)
}

/// Opaque TCP to a mesh service: pick an endpoint, mTLS with the opaque ALPN, copy.
async fn opaque(ctx: Arc<Ctx>, mut io: PrefixedIo<TcpStream>, service: &str) {
    let ep = {
        let table = ctx.outbound.load();
        table.get(service).and_then(|s| s.balancer.pick().cloned())
    };
    let Some(ep) = ep else {
        ctx.metrics.refuse(Direction::outbound, "no_endpoints");
        return;
    };
    let _inflight = ep.load.start();
    ctx.metrics
        .tcp_connections
        .get_or_create(&ConnLabels {
            direction: Direction::outbound,
            src_identity: ctx.own_label.clone(),
            dst_identity: ep.identity.clone(),
        })
        .inc();
    match dial(&ctx, &ep, tls::Alpn::Opaque).await {
        Ok(mut tls) => {
            let _ = crate::tcp::splice(&ctx.metrics, Direction::outbound, &mut io, &mut tls).await;
        }
        Err(e) => {
            tracing::warn!(service, endpoint = %ep.cfg.addr, error = %e, "opaque connection failed");
        }
    }
}
