//! The outbound HTTP stack: Telemetry -> Sanitize -> [seam: route, timeout, retry] ->
//! Balance + Endpoint.
//!
//! The balance stage picks an endpoint, sends, and tells the balancer how it went. A request
//! that never left (the endpoint refused the connection, or failed the identity check) goes
//! to another endpoint. A bodiless request to an endpoint that failed recently carries a copy
//! of its head, so that it can also go elsewhere when that endpoint answers that the request
//! never reached its app (`palisade-proxy-error`), or, for an idempotent method, when the
//! connection dies under it. Requests to healthy endpoints carry no copy.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use http::{Method, Request, Response, StatusCode, Version};
use http_body::Body as _;
use http_body_util::Either;
use hyper::body::Incoming;
use tokio::net::TcpStream;
use tower::ServiceBuilder;

use super::endpoint::{self, Attempt};
use super::{Endpoint, OutService};
use crate::Ctx;
use crate::balance::Failure;
use crate::http::{self as phttp, DstIdentity, OutBody, RspBody, TelemetryLayer};
use crate::io::PrefixedIo;
use crate::sanitize::SanitizeLayer;
use crate::telemetry::{Direction, Label};

/// One try, and one more on another endpoint.
const MAX_ATTEMPTS: usize = 2;

pub(super) async fn serve_http(
    ctx: Arc<Ctx>,
    io: PrefixedIo<TcpStream>,
    service: Arc<str>,
    h2: bool,
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
    phttp::serve_connection(&ctx, io, svc, h2).await;
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

/// How the endpoint did, judged from its response: 5xx is a failure (Linkerd's HTTP failure
/// accrual); one the peer proxy made because its app was unreachable is a hard one.
fn judge(rsp: &Response<Incoming>) -> Option<Failure> {
    if !rsp.status().is_server_error() {
        return None;
    }
    Some(if never_reached_app(rsp) {
        Failure::Hard
    } else {
        Failure::Soft
    })
}

fn never_reached_app<B>(rsp: &Response<B>) -> bool {
    rsp.headers().contains_key(phttp::PROXY_ERROR)
}

/// Safe to send twice (RFC 9110 §9.2.2).
fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// A bodiless copy of a request's head.
fn head_copy(req: &Request<OutBody>) -> Request<OutBody> {
    let mut copy = Request::new(OutBody::empty());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    copy
}

fn tag(mut rsp: Response<RspBody>, ep: &Endpoint) -> Response<RspBody> {
    rsp.extensions_mut()
        .insert(DstIdentity(ep.identity.clone()));
    rsp
}

/// Tells the operator, once per ejection, that an endpoint left the rotation.
fn ejected(ctx: &Ctx, service: &str, ep: &Endpoint, backoff: Option<std::time::Duration>) {
    if let Some(backoff) = backoff {
        ctx.metrics.endpoint_ejected(&ep.identity);
        tracing::warn!(
            service,
            endpoint = %ep.cfg.addr,
            backoff_ms = backoff.as_millis() as u64,
            "endpoint ejected after failures; probing it again after the backoff"
        );
    }
}

/// Rewrites a request for the HTTP/2 hop between proxies.
fn for_h2(mut req: Request<Incoming>, service: &str) -> Result<Request<Incoming>, StatusCode> {
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
        phttp::set_absolute_uri(&mut req, service)?;
    }
    *req.version_mut() = Version::HTTP_2;
    Ok(req)
}

async fn forward(ctx: Arc<Ctx>, service: &str, req: Request<Incoming>) -> Response<RspBody> {
    let Some(svc) = ctx.outbound.load().get(service).cloned() else {
        return phttp::local_response(StatusCode::SERVICE_UNAVAILABLE, "unknown service\n");
    };
    if phttp::is_upgrade(&req) {
        return upgrade(&ctx, service, &svc, req).await;
    }
    let req = match for_h2(req, service) {
        Ok(r) => r,
        Err(status) => return phttp::local_response(status, "bad request target\n"),
    };
    let (parts, body) = req.into_parts();
    let (body, watch) = OutBody::watched(body);
    let bodiless = body.is_end_stream();
    let mut req = Request::from_parts(parts, body);
    let mut tried: Option<Arc<Endpoint>> = None;
    for attempt in 1..=MAX_ATTEMPTS {
        let picked = match &tried {
            None => svc.balancer.pick(),
            Some(t) => svc.balancer.pick_other(t),
        };
        let Some(ep) = picked.cloned() else {
            return phttp::local_response(StatusCode::SERVICE_UNAVAILABLE, "no endpoints\n");
        };
        let last = attempt == MAX_ATTEMPTS || svc.balancer.endpoints().len() < 2;
        let replay = (!last && bodiless && ep.load.is_suspect()).then(|| head_copy(&req));
        let method = req.method().clone();
        let mut guard = ep.load.start();
        match endpoint::send_h2(&ctx, &ep, req, &mut guard).await {
            Attempt::Response(rsp) => {
                let failure = judge(&rsp);
                match failure {
                    None => guard.success(),
                    Some(kind) => ejected(&ctx, service, &ep, guard.failure(kind)),
                }
                if let Some(again) = replay
                    && never_reached_app(&rsp)
                {
                    tracing::debug!(service, endpoint = %ep.cfg.addr, "its app is unreachable; trying another endpoint");
                    req = again;
                    tried = Some(ep);
                    continue;
                }
                return tag(rsp.map(Either::Left), &ep);
            }
            Attempt::NotSent(e, back) => {
                tracing::warn!(service, endpoint = %ep.cfg.addr, error = %e, "outbound request failed before it was sent");
                ejected(&ctx, service, &ep, guard.failure(e.failure()));
                if !last {
                    req = back;
                    tried = Some(ep);
                    continue;
                }
                return tag(e.response(), &ep);
            }
            Attempt::Failed(e) => {
                if watch.client_failed() {
                    // The app's own body broke (a malformed chunk): not the endpoint's fault.
                    drop(guard);
                    ctx.metrics
                        .refuse_request(Direction::outbound, "bad_request_body");
                    return phttp::local_response(
                        StatusCode::BAD_REQUEST,
                        "bad request: the request body is malformed\n",
                    );
                }
                tracing::warn!(service, endpoint = %ep.cfg.addr, error = %e, "outbound request failed");
                ejected(&ctx, service, &ep, guard.failure(e.failure()));
                if let Some(again) = replay
                    && idempotent(&method)
                {
                    req = again;
                    tried = Some(ep);
                    continue;
                }
                return tag(e.response(), &ep);
            }
        }
    }
    phttp::local_response(StatusCode::SERVICE_UNAVAILABLE, "no endpoints\n")
}

/// WebSocket and other upgrades: one endpoint, its own HTTP/1.1 connection, no retry (the
/// request carries the client's connection with it).
async fn upgrade(
    ctx: &Arc<Ctx>,
    service: &str,
    svc: &OutService,
    req: Request<Incoming>,
) -> Response<RspBody> {
    let Some(ep) = svc.balancer.pick().cloned() else {
        return phttp::local_response(StatusCode::SERVICE_UNAVAILABLE, "no endpoints\n");
    };
    let mut guard = ep.load.start();
    guard.sent();
    match endpoint::forward_upgrade(ctx, &ep, req).await {
        Ok(rsp) => {
            match judge(&rsp) {
                None => guard.success(),
                Some(kind) => ejected(ctx, service, &ep, guard.failure(kind)),
            }
            tag(rsp.map(Either::Left), &ep)
        }
        Err(e) => {
            tracing::warn!(service, endpoint = %ep.cfg.addr, error = %e, "upgrade failed");
            ejected(ctx, service, &ep, guard.failure(e.failure()));
            tag(e.response(), &ep)
        }
    }
}
