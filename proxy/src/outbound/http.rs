//! The outbound HTTP stack: Telemetry (metrics, trace context and span, cost, access log) ->
//! Sanitize -> Classify -> Rescue -> Dispatch ->
//! Timeout (request) -> Retry -> Timeout (attempt) -> Balance + Endpoint. Balance and the
//! endpoint call live here; the route stages (Classify, Dispatch) in `route.rs`, the timeout
//! and retry layers in `timeout.rs` and `retry.rs`. Below Rescue every stage fails with a typed [`ProxyError`], which Rescue
//! turns into the caller's response ([`crate::errors`]).
//!
//! The balance stage picks an endpoint, sends, and tells the balancer how it went. A request
//! that never left (the endpoint refused the connection, or failed the identity check) goes
//! to another endpoint. A bodiless request to an endpoint that failed recently carries a copy
//! of its head, so that it can also go elsewhere when that endpoint answers that the request
//! never reached its app (`palisade-proxy-error`), or, for an idempotent method, when the
//! connection dies under it. Requests to healthy endpoints carry no copy.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use http::{Request, Response, StatusCode, Version};
use http_body::Body as _;
use http_body_util::Either;
use hyper::body::Incoming;
#[cfg(test)]
use palisade_api::call::RetryPolicy;
use tokio::net::TcpStream;
use tower::ServiceBuilder;

use super::call::{Call, idempotent};
use super::endpoint::{self, Attempt};
use super::retry::RetryLayer;
use super::route::{ClassifyLayer, Dispatch};
use super::timeout::TimeoutLayer;
use super::{Endpoint, OutService};
use crate::Ctx;
use crate::balance::Failure;
use crate::errors::{ProxyError, RescueLayer};
use crate::http::{self as phttp, DstIdentity, OutBody, PeerBody, RspBody};
use crate::io::PrefixedIo;
use crate::sanitize::SanitizeLayer;
use crate::telemetry::{Direction, Label, TelemetryLayer};

/// One try, and one more on another endpoint.
const MAX_ATTEMPTS: usize = 2;

pub(super) async fn serve_http(
    ctx: Arc<Ctx>,
    io: PrefixedIo<TcpStream>,
    service: Arc<str>,
    h2: bool,
) {
    let metrics = ctx.metrics.clone();
    let svc = ServiceBuilder::new()
        .layer(TelemetryLayer::new(
            metrics.clone(),
            ctx.tracer.clone(),
            Direction::outbound,
            ctx.own_label.clone(),
            Label::new("unknown"),
            ctx.cfg.access_log,
        ))
        .layer(SanitizeLayer::new(
            metrics.clone(),
            Direction::outbound,
            None,
        ))
        .layer(ClassifyLayer::new(ctx.clone(), service.clone()))
        .layer(RescueLayer::new(metrics.clone(), Direction::outbound))
        .layer(tower::layer::layer_fn({
            let ctx = ctx.clone();
            move |inner| Dispatch {
                inner,
                ctx: ctx.clone(),
                service: service.clone(),
            }
        }))
        .layer(TimeoutLayer::Request)
        .layer(RetryLayer::new(metrics))
        .layer(TimeoutLayer::Attempt)
        .service(Balance { ctx: ctx.clone() });
    phttp::serve_connection(&ctx, io, svc, h2, Direction::outbound, None).await;
}

/// The balancer and endpoint stage of the outbound HTTP stack.
#[derive(Clone)]
pub(crate) struct Balance {
    ctx: Arc<Ctx>,
}

impl tower::Service<Call> for Balance {
    type Response = Response<RspBody>;
    type Error = ProxyError;
    type Future = BoxFuture<'static, Result<Response<RspBody>, ProxyError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let ctx = self.ctx.clone();
        Box::pin(async move { forward(&ctx, call).await })
    }
}

/// How the endpoint did, judged from its response.
enum Verdict {
    Success,
    /// 5xx is a failure (Linkerd's HTTP failure accrual); one the peer proxy made because its
    /// app was unreachable is a hard one.
    Failure(Failure),
    /// 429 or gRPC `RESOURCE_EXHAUSTED`: overloaded, for `Retry-After` if it says (Linkerd
    /// 2.20 steers traffic away from rate-limited endpoints the same way).
    Throttled(Option<std::time::Duration>),
}

fn judge(rsp: &Response<Incoming>) -> Verdict {
    let status = rsp.status();
    let grpc_exhausted = rsp
        .headers()
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes() == b"8");
    if status == StatusCode::TOO_MANY_REQUESTS || grpc_exhausted {
        return Verdict::Throttled(retry_after(rsp.headers()));
    }
    if !status.is_server_error() {
        return Verdict::Success;
    }
    Verdict::Failure(if never_reached_app(rsp) {
        Failure::Hard
    } else {
        Failure::Soft
    })
}

/// `Retry-After` in seconds (the HTTP-date form is not honoured: clocks differ).
fn retry_after(headers: &http::HeaderMap) -> Option<std::time::Duration> {
    let v = headers.get(http::header::RETRY_AFTER)?.to_str().ok()?;
    v.trim()
        .parse::<u64>()
        .ok()
        .map(std::time::Duration::from_secs)
}

/// Tells the balancer how the endpoint did.
fn report(
    ctx: &Ctx,
    service: &str,
    ep: &Endpoint,
    guard: crate::balance::InFlight<'_>,
    verdict: Verdict,
) {
    match verdict {
        Verdict::Success => guard.success(),
        Verdict::Failure(kind) => ejected(ctx, service, ep, guard.failure(kind)),
        Verdict::Throttled(after) => {
            tracing::debug!(service, endpoint = %ep.cfg.addr, retry_after = ?after, "endpoint overloaded; steering traffic away");
            guard.throttled(after);
        }
    }
}

fn never_reached_app<B>(rsp: &Response<B>) -> bool {
    rsp.headers().contains_key(phttp::PROXY_ERROR)
}

/// A bodiless copy of a request's head.
pub(super) fn head_copy(req: &Request<OutBody>) -> Request<OutBody> {
    let mut copy = Request::new(OutBody::empty());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    copy
}

fn tag(mut rsp: Response<RspBody>, ep: &Endpoint) -> Response<RspBody> {
    rsp.extensions_mut().insert(DstIdentity {
        identity: ep.identity.clone(),
        endpoint: Some(ep.cfg.addr),
    });
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
pub(super) fn for_h2(
    mut req: Request<Incoming>,
    service: &str,
) -> Result<Request<Incoming>, StatusCode> {
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

/// Picks an endpoint and sends; a request that never left goes to another endpoint, and a
/// bodiless one to a suspect endpoint may too (see the module docs).
pub(super) async fn forward(ctx: &Ctx, call: Call) -> Result<Response<RspBody>, ProxyError> {
    let Call { svc, mut req, .. } = call;
    let service = svc.cfg.key.as_str();
    let bodiless = req.body().is_end_stream();
    let grpc = phttp::is_grpc(&req);
    let mut tried: Option<Arc<Endpoint>> = None;
    for attempt in 1..=MAX_ATTEMPTS {
        let picked = match &tried {
            None => svc.balancer.pick(),
            Some(t) => svc.balancer.pick_other(t),
        };
        let Some(ep) = picked.cloned() else {
            return Err(ProxyError::NoEndpoints);
        };
        let last = attempt == MAX_ATTEMPTS || svc.balancer.endpoints().len() < 2;
        let replay = (!last && bodiless && ep.load.is_suspect()).then(|| head_copy(&req));
        let method = req.method().clone();
        let watch = req.body().watch();
        let mut guard = ep.load.start();
        match endpoint::send_h2(ctx, &ep, req, &mut guard).await {
            Attempt::Response(rsp) => {
                report(ctx, service, &ep, guard, judge(&rsp));
                if let Some(again) = replay
                    && never_reached_app(&rsp)
                {
                    tracing::debug!(service, endpoint = %ep.cfg.addr, "its app is unreachable; trying another endpoint");
                    req = again;
                    tried = Some(ep);
                    continue;
                }
                let body = |b| {
                    Either::Left(PeerBody::with_idle_timeout(
                        b,
                        grpc,
                        svc.cfg.idle_timeout,
                        &ctx.metrics,
                        Direction::outbound,
                    ))
                };
                return Ok(tag(rsp.map(body), &ep));
            }
            Attempt::NotSent(e, back) => {
                tracing::warn!(service, endpoint = %ep.cfg.addr, error = %e, "outbound request failed before it was sent");
                ejected(ctx, service, &ep, guard.failure(e.failure()));
                if !last {
                    req = *back;
                    tried = Some(ep);
                    continue;
                }
                return Err(e.into());
            }
            Attempt::Failed(e) => {
                if watch.client_failed() {
                    // The app's own body broke (a malformed chunk): not the endpoint's fault.
                    drop(guard);
                    return Err(ProxyError::BadRequestBody);
                }
                tracing::warn!(service, endpoint = %ep.cfg.addr, error = %e, "outbound request failed");
                ejected(ctx, service, &ep, guard.failure(e.failure()));
                if let Some(again) = replay
                    && idempotent(&method)
                {
                    req = again;
                    tried = Some(ep);
                    continue;
                }
                return Err(e.into());
            }
        }
    }
    Err(ProxyError::NoEndpoints)
}

/// WebSocket and other upgrades: one endpoint, its own HTTP/1.1 connection, no retry (the
/// request carries the client's connection with it).
pub(super) async fn upgrade(
    ctx: &Arc<Ctx>,
    svc: &OutService,
    req: Request<Incoming>,
) -> Result<Response<RspBody>, ProxyError> {
    let service = svc.cfg.key.as_str();
    let ep = svc
        .balancer
        .pick()
        .cloned()
        .ok_or(ProxyError::NoEndpoints)?;
    let mut guard = ep.load.start();
    guard.sent();
    match endpoint::forward_upgrade(ctx, &ep, req).await {
        Ok(rsp) => {
            report(ctx, service, &ep, guard, judge(&rsp));
            Ok(tag(rsp.map(|b| Either::Left(PeerBody::new(b, false))), &ep))
        }
        Err(e) => {
            tracing::warn!(service, endpoint = %ep.cfg.addr, error = %e, "upgrade failed");
            ejected(ctx, service, &ep, guard.failure(e.failure()));
            Err(e.into())
        }
    }
}

/// A call to a service with no endpoints and `timeout` / `retry`, for the layers' tests.
#[cfg(test)]
pub(super) mod tests {
    use std::time::Duration;

    use super::*;
    use crate::balance::{Balancer, Strategy};
    use crate::config::{Protocol, ServiceConfig};

    pub(crate) fn call(timeout: Option<Duration>, retry: Option<RetryPolicy>) -> Call {
        let cfg = Arc::new(ServiceConfig {
            key: "api.demo:8080".into(),
            protocol: Protocol::Http,
            endpoints: Vec::new(),
            virtual_addrs: Vec::new(),
            timeout,
            idle_timeout: None,
            retry,
            routes: Default::default(),
            trace: Default::default(),
        });
        Call {
            svc: Arc::new(OutService {
                cfg,
                balancer: Balancer::new(Vec::new(), Strategy::default()),
                budget: super::super::retry_budget(),
            }),
            req: Request::get("http://api.demo/")
                .body(OutBody::empty())
                .unwrap(),
            rule: None,
        }
    }
}
