//! Inbound: traffic from other proxies (mTLS) and, when PeerAuthentication allows it,
//! plaintext clients, to the local app.
//!
//! The stack, per connection:
//!
//! ```text
//! accept -> peek (bounded bytes and time): TLS ClientHello or plaintext
//!   TLS:       mTLS handshake with the workload's SVID; the client's SPIFFE ID is verified
//!              and travels with the connection; ALPN picks the protocol:
//!                h2        -> HTTP/2 server  -> HTTP stack
//!                http/1.1  -> HTTP/1 server (upgrades) -> HTTP stack
//!                opaque    -> TCP authorization -> app (bidirectional copy, re-checked on
//!                             policy change)
//!   plaintext: STRICT -> refused; PERMISSIVE / DISABLE -> detect -> HTTP stack or TCP
//! HTTP stack: Telemetry -> Sanitize (one Host, normalized path) -> Rescue -> Authorization -> Identity headers (x-forwarded-client-cert,
//!             version restore) -> App client (HTTP/1.1 or HTTP/2 per the app's protocol)
//! ```

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use http::{HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use palisade_certs::SpiffeId;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tower::ServiceBuilder;
use tracing::Instrument as _;

use crate::admission::Unidentified;
use crate::authz_layer::{AuthzLayer, ConnInfo};
use crate::config::{MtlsMode, Protocol};
use crate::detect::{self, Detected};
use crate::errors::{ProxyError, RescueLayer};
use crate::http::{self as phttp, OutBody, RspBody};
use crate::io::PrefixedIo;
use crate::sanitize::SanitizeLayer;
use crate::telemetry::TelemetryLayer;
use crate::telemetry::{ConnLabels, Direction, Label, OpenConnGuard};
use crate::{Ctx, tls};

/// Dials the app whatever the request's URI says: the app is always the one local address.
#[derive(Clone)]
pub(crate) struct AppConnector {
    addr: SocketAddr,
    timeout: std::time::Duration,
}

impl tower::Service<Uri> for AppConnector {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let (addr, timeout) = (self.addr, self.timeout);
        Box::pin(async move { crate::tcp::connect(addr, timeout).await.map(TokioIo::new) })
    }
}

/// Pooled clients to the app, one per HTTP version.
pub(crate) struct AppClients {
    addr: SocketAddr,
    /// `addr` as a URI authority, for requests that name none (formatted once, not per request).
    authority: Box<str>,
    http1: Client<AppConnector, OutBody>,
    http2: Client<AppConnector, OutBody>,
}

impl AppClients {
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub(crate) fn new(addr: SocketAddr, connect_timeout: std::time::Duration) -> Self {
        let connector = AppConnector {
            addr,
            timeout: connect_timeout,
        };
        let http1 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(std::time::Duration::from_secs(90))
            .pool_timer(TokioTimer::new())
            .build(connector.clone());
        let http2 = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        AppClients {
            addr,
            authority: addr.to_string().into(),
            http1,
            http2,
        }
    }
}

pub(crate) async fn serve(
    listener: TcpListener,
    ctx: Arc<Ctx>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let Ok(tls_cfg) = tls::inbound_server_config(&ctx.store) else {
        tracing::error!("cannot build the inbound TLS config");
        return;
    };
    let acceptor = TlsAcceptor::from(tls_cfg);
    while let Some((tcp, remote)) = crate::tcp::accept(&listener, &mut stop, "inbound").await {
        let evicted = || {
            ctx.metrics
                .refuse(Direction::inbound, "evicted_unidentified")
        };
        let Ok((permit, unidentified)) = ctx.admission.admit(evicted).await else {
            ctx.metrics.refuse(Direction::inbound, "connection_limit");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let ctx = ctx.clone();
        let acceptor = acceptor.clone();
        // Every log line about this connection names its peer.
        let span = tracing::info_span!("inbound", peer = %remote);
        tokio::spawn(
            async move {
                let _permit = permit;
                let _open = OpenConnGuard::new(&ctx.metrics, Direction::inbound);
                handle(ctx, acceptor, tcp, remote, unidentified).await;
            }
            .instrument(span),
        );
    }
}

/// What follows the handshake (the HTTP server or the tunnel) is boxed once per connection:
/// inline, its state would size every connection's task from the first byte, and a connection
/// that never finishes its handshake would cost as much as one serving requests.
async fn handle(
    ctx: Arc<Ctx>,
    acceptor: TlsAcceptor,
    mut tcp: TcpStream,
    remote: SocketAddr,
    unidentified: Unidentified,
) {
    let (port, app) = destination(&ctx, &tcp);
    // Until the peer has said what it is, a newer connection may take this one's slot when the
    // proxy is full (crate::admission).
    let detected = tokio::select! {
        d = detect::detect(&mut tcp, ctx.cfg.timeouts.detect) => d,
        _ = unidentified.evicted() => return,
    };
    let (detected, prefix) = match detected {
        Ok(x) => x,
        Err(_) => return,
    };
    let snap = ctx.snapshot.load();
    let mode = snap.inbound.mode_for(port);
    let app_protocol = snap.inbound.app_protocol;
    drop(snap);
    let io = PrefixedIo::new(prefix, tcp);
    match detected {
        Detected::Empty => ctx.metrics.refuse(Direction::inbound, "closed_before_data"),
        Detected::Tls => {
            let accepted = tokio::select! {
                a = tokio::time::timeout(ctx.cfg.timeouts.handshake, acceptor.accept(io)) => a,
                _ = unidentified.evicted() => return,
            };
            unidentified.identified();
            let tls = match accepted {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    let reason = tls::io_error_reason(&e);
                    ctx.metrics.handshake_error(Direction::inbound, reason);
                    tracing::info!(%remote, reason, error = %e, "inbound mTLS handshake refused");
                    return;
                }
                Err(_) => {
                    ctx.metrics.handshake_error(Direction::inbound, "timeout");
                    tracing::info!(%remote, "inbound mTLS handshake timed out");
                    return;
                }
            };
            let (_, conn) = tls.get_ref();
            ctx.metrics.tls_connection(Direction::inbound, conn);
            let (peer, peer_until) = match palisade_certs::tls::peer_identity_until(conn) {
                Some((id, until)) => (Some(id), Some(until)),
                None => (None, None),
            };
            // The connection lives no longer than either certificate it was authenticated
            // with: without a renewal (the control plane gone), the mesh fails closed at
            // expiry instead of carrying on over connections made before it.
            let expires = crate::identity::deadline([peer_until, ctx.store.expiry()]);
            let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
            let info = ConnInfo::new(peer, remote.ip(), port, app);
            match alpn.as_deref() {
                Some(tls::ALPN_H2) => Box::pin(serve_http(ctx, tls, info, true, expires)).await,
                Some(tls::ALPN_HTTP1) => Box::pin(serve_http(ctx, tls, info, false, expires)).await,
                // An HTTP app is reached over HTTP only, whatever ALPN the peer offers: a
                // tunnel would let the peer write any header, x-forwarded-client-cert
                // included, straight to the app.
                _ if app_protocol.is_http() => {
                    ctx.metrics.refuse(Direction::inbound, "opaque_to_http_app");
                    tracing::info!(%remote, peer = %info.peer_label.0, "opaque connection refused: the app speaks HTTP");
                }
                _ => Box::pin(opaque(ctx, tls, info, expires)).await,
            }
        }
        plain => {
            unidentified.identified();
            if mode == MtlsMode::Strict {
                ctx.metrics.refuse(Direction::inbound, "plaintext_strict");
                tracing::info!(%remote, port, "plaintext connection refused: mTLS is STRICT");
                return;
            }
            let info = ConnInfo::new(None, remote.ip(), port, app);
            match plain {
                Detected::Http2 if app_protocol != Protocol::Opaque => {
                    Box::pin(serve_http(ctx, io, info, true, None)).await
                }
                Detected::Http1 if app_protocol != Protocol::Opaque => {
                    Box::pin(serve_http(ctx, io, info, false, None)).await
                }
                // Not recognizably HTTP, to an HTTP app: the HTTP/1 parser serves it if it is
                // HTTP after all and answers 400 if not; never a tunnel.
                _ if app_protocol.is_http() => {
                    Box::pin(serve_http(ctx, io, info, false, None)).await
                }
                _ => Box::pin(opaque(ctx, io, info, None)).await,
            }
        }
    }
}

/// The workload port a connection is for, and the app address its requests go to. A
/// connection redirected by iptables (Kubernetes) keeps its original destination: the pod's
/// port, which is the app's port on loopback. Otherwise (local mode, one app per proxy) the
/// configured app.
fn destination(ctx: &Ctx, tcp: &TcpStream) -> (u16, Option<SocketAddr>) {
    let listener_port = tcp.local_addr().map(|a| a.port()).unwrap_or(0);
    match crate::outbound::original_dst(tcp) {
        Ok(dst) if dst.port() != listener_port => (
            dst.port(),
            Some(SocketAddr::from(([127, 0, 0, 1], dst.port()))),
        ),
        _ => (ctx.workload_port(listener_port), ctx.cfg.app_addr),
    }
}

async fn serve_http<I>(
    ctx: Arc<Ctx>,
    io: I,
    info: Arc<ConnInfo>,
    h2: bool,
    expires: Option<tokio::time::Instant>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Some(app) = info.app.map(|a| ctx.app_clients(a)) else {
        ctx.metrics.refuse(Direction::inbound, "no_app");
        return;
    };
    let src = info.peer_label.clone();
    let svc = ServiceBuilder::new()
        .layer(TelemetryLayer::new(
            ctx.metrics.clone(),
            ctx.tracer.clone(),
            Direction::inbound,
            src,
            ctx.own_label.clone(),
            ctx.cfg.access_log,
        ))
        .layer(SanitizeLayer::new(
            ctx.metrics.clone(),
            Direction::inbound,
            Some(Arc::new({
                let ctx = ctx.clone();
                move || ctx.snapshot.load().inbound.path_normalization
            })),
        ))
        .layer(RescueLayer::new(ctx.metrics.clone(), Direction::inbound))
        .layer(AuthzLayer::new(ctx.clone(), info.clone()))
        .layer(crate::ratelimit::RateLimitLayer::new(
            ctx.clone(),
            info.peer.as_ref().map(|p| p.as_str()),
            info.peer_label.clone(),
        ))
        .service(ToApp {
            ctx: ctx.clone(),
            app,
            xfcc: info.xfcc(&ctx.own_label),
        });
    phttp::serve_connection(&ctx, io, svc, h2, Direction::inbound, expires).await;
}

/// The last stage: identity headers, HTTP version for the app, and the app call.
#[derive(Clone)]
struct ToApp {
    ctx: Arc<Ctx>,
    app: Arc<AppClients>,
    xfcc: Option<HeaderValue>,
}

impl tower::Service<Request<Incoming>> for ToApp {
    type Response = Response<RspBody>;
    type Error = ProxyError;
    type Future = BoxFuture<'static, Result<Response<RspBody>, ProxyError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Incoming>) -> Self::Future {
        // Only this proxy may say who called: a client-supplied header is dropped.
        req.headers_mut().remove(phttp::XFCC);
        if let Some(v) = &self.xfcc {
            req.headers_mut().insert(phttp::XFCC, v.clone());
        }
        let app_protocol = self.ctx.snapshot.load().inbound.app_protocol;
        let orig = req.headers_mut().remove(phttp::ORIG_PROTO);
        let to_h2 = match app_protocol {
            Protocol::Http => false,
            Protocol::Http2 | Protocol::Grpc => true,
            Protocol::Detect | Protocol::Opaque => {
                orig.is_none() && req.version() == Version::HTTP_2
            }
        };
        let app = self.app.clone();
        let ctx = self.ctx.clone();
        Box::pin(async move { call_app(&ctx, &app, req, to_h2, orig).await })
    }
}

async fn call_app(
    ctx: &Ctx,
    app: &AppClients,
    mut req: Request<Incoming>,
    to_h2: bool,
    orig: Option<HeaderValue>,
) -> Result<Response<RspBody>, ProxyError> {
    let upgrade = phttp::is_upgrade(&req);
    let grpc = phttp::is_grpc(&req);
    phttp::set_absolute_uri(&mut req, &app.authority).map_err(|_| ProxyError::BadRequestTarget)?;
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let (body, watch) = OutBody::watched(body, &parts.extensions);
    let mut req = Request::from_parts(parts, body);
    let result = if to_h2 {
        phttp::strip_hop_by_hop(req.headers_mut(), false);
        *req.version_mut() = Version::HTTP_2;
        app.http2.request(req).await
    } else {
        if !upgrade {
            phttp::strip_hop_by_hop(req.headers_mut(), false);
        }
        let v = match orig.as_ref().map(HeaderValue::as_bytes) {
            Some(b"HTTP/1.0") => Version::HTTP_10,
            _ => Version::HTTP_11,
        };
        if req.version() == Version::HTTP_2 {
            // HTTP/2 carries the host in :authority; HTTP/1.1 needs a Host header.
            if let Some(a) = req.uri().authority()
                && !req.headers().contains_key(http::header::HOST)
                && let Ok(h) = HeaderValue::from_str(a.as_str())
            {
                req.headers_mut().insert(http::header::HOST, h);
            }
        }
        *req.version_mut() = v;
        app.http1.request(req).await
    };
    match result {
        Ok(mut rsp) => {
            if let Some(client_upgrade) = client_upgrade
                && rsp.status() == StatusCode::SWITCHING_PROTOCOLS
            {
                let server_upgrade = hyper::upgrade::on(&mut rsp);
                let metrics = ctx.metrics.clone();
                let idle = ctx.cfg.timeouts.tcp_idle;
                tokio::spawn(async move {
                    if let (Ok(c), Ok(s)) = (client_upgrade.await, server_upgrade.await) {
                        let _ = crate::tcp::splice(
                            &metrics,
                            Direction::inbound,
                            &mut TokioIo::new(c),
                            &mut TokioIo::new(s),
                            idle,
                        )
                        .await;
                    }
                });
            }
            Ok(rsp.map(|b| Either::Left(phttp::PeerBody::new(b, grpc))))
        }
        // The caller's body broke (a malformed chunk): its fault, not the app's.
        Err(_) if watch.client_failed() => Err(ProxyError::BadRequestBody),
        Err(e) => {
            tracing::warn!(app = %app.addr, error = %e, "app request failed");
            if e.is_connect() {
                // The request never reached the app: the caller's proxy may send it
                // elsewhere, and takes this endpoint out of rotation (the rescue layer
                // marks the response `palisade-proxy-error`).
                Err(ProxyError::AppUnavailable(e))
            } else {
                Err(ProxyError::AppReset(e))
            }
        }
    }
}

/// Opaque TCP to the app, authorized per connection and re-checked whenever the config
/// changes: a connection whose permission is revoked is closed, and so is one whose
/// certificates expire (`expires`; TCP has no graceful way, so it is closed outright).
async fn opaque<I>(
    ctx: Arc<Ctx>,
    mut io: I,
    info: Arc<ConnInfo>,
    expires: Option<tokio::time::Instant>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Some(app) = info.app else {
        ctx.metrics.refuse(Direction::inbound, "no_app");
        return;
    };
    let mut versions = ctx.version_tx.subscribe();
    if !crate::authz_layer::check_tcp(&ctx, &info) {
        return;
    }
    ctx.metrics
        .tcp_connections
        .get_or_create(&ConnLabels {
            direction: Direction::inbound,
            src_identity: info.peer_label.clone(),
            dst_identity: ctx.own_label.clone(),
        })
        .inc();
    let Ok(mut up) = crate::tcp::connect(app, ctx.cfg.timeouts.connect).await else {
        ctx.metrics.refuse(Direction::inbound, "app_unavailable");
        return;
    };
    let splice = crate::tcp::splice(
        &ctx.metrics,
        Direction::inbound,
        &mut io,
        &mut up,
        ctx.cfg.timeouts.tcp_idle,
    );
    tokio::pin!(splice);
    let expired = crate::identity::until(expires);
    tokio::pin!(expired);
    loop {
        tokio::select! {
            _ = &mut splice => return,
            _ = &mut expired => {
                tracing::info!(peer = %info.peer_label.0, "closing TCP connection: a certificate it was authenticated with expired");
                return;
            }
            changed = versions.changed() => {
                if changed.is_err() {
                    // The proxy is going away; finish the copy.
                    let _ = (&mut splice).await;
                    return;
                }
                if !crate::authz_layer::check_tcp(&ctx, &info) {
                    tracing::info!(peer = %info.peer_label.0, "closing TCP connection: no longer authorized");
                    return;
                }
            }
        }
    }
}

impl ConnInfo {
    pub(crate) fn new(
        peer: Option<SpiffeId>,
        source_ip: IpAddr,
        port: u16,
        app: Option<SocketAddr>,
    ) -> Arc<Self> {
        let peer_label = Label::new(peer.as_ref().map(|p| p.as_str()).unwrap_or("unknown"));
        Arc::new(ConnInfo {
            peer,
            peer_label,
            source_ip,
            dest_port: port,
            app,
            decisions: Default::default(),
        })
    }

    /// `By=<own ID>;URI=<client ID>` (Envoy's format), for connections that arrived over mTLS.
    fn xfcc(&self, own: &Label) -> Option<HeaderValue> {
        let peer = self.peer.as_ref()?;
        HeaderValue::from_str(&format!("By={};URI={}", own.0, peer.as_str())).ok()
    }
}
