//! The outbound HTTP stack: Telemetry -> Sanitize -> Rescue -> Route -> Timeout -> Retry ->
//! Balance + Endpoint. Below Rescue every stage fails with a typed [`ProxyError`], which Rescue
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

use futures_util::future;
use futures_util::future::BoxFuture;
use http::{Method, Request, Response, StatusCode, Version};
use http_body::Body as _;
use http_body_util::Either;
use hyper::body::Incoming;
use palisade_api::call::RetryPolicy;
use tokio::net::TcpStream;
use tower::retry::budget::Budget as _;
use tower::{ServiceBuilder, ServiceExt};

use super::endpoint::{self, Attempt};
use super::{Endpoint, OutService};
use crate::Ctx;
use crate::balance::Failure;
use crate::errors::{ProxyError, RescueLayer};
use crate::http::{self as phttp, DstIdentity, OutBody, PeerBody, RspBody, TelemetryLayer};
use crate::io::PrefixedIo;
use crate::sanitize::SanitizeLayer;
use crate::telemetry::{Direction, Label, Metrics};

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
        .layer(RescueLayer::new(metrics.clone(), Direction::outbound))
        .layer(RouteLayer::new(ctx.clone(), service))
        .layer(TimeoutLayer)
        .layer(RetryLayer::new(metrics))
        .service(Balance { ctx: ctx.clone() });
    phttp::serve_connection(&ctx, io, svc, h2).await;
}

/// A request on its way to one service: what the layers below the route need, and nothing of
/// the proxy's.
pub(crate) struct Call {
    pub svc: Arc<OutService>,
    pub req: Request<OutBody>,
}

/// Finds the connection's service for each request (the table may have changed since the
/// connection was accepted) and readies the request for the HTTP/2 hop. Upgrades (WebSocket)
/// leave the stack here for their own connection: nothing below applies to them.
#[derive(Clone)]
pub(crate) struct RouteLayer {
    ctx: Arc<Ctx>,
    service: Arc<str>,
}

impl RouteLayer {
    fn new(ctx: Arc<Ctx>, service: Arc<str>) -> Self {
        Self { ctx, service }
    }
}

impl<S> tower::Layer<S> for RouteLayer {
    type Service = Route<S>;
    fn layer(&self, inner: S) -> Route<S> {
        Route {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct Route<S> {
    inner: S,
    layer: RouteLayer,
}

/// What a layer below the route returns: the inner call's own future on the common path, a
/// boxed one only for what is rare or configured (an upgrade, an early error, a retry policy),
/// so a request allocates no future per layer.
pub(crate) type Answer = BoxFuture<'static, Result<Response<RspBody>, ProxyError>>;

impl<S> tower::Service<Request<Incoming>> for Route<S>
where
    S: tower::Service<Call, Response = Response<RspBody>, Error = ProxyError>,
    S::Future: Send + 'static,
{
    type Response = Response<RspBody>;
    type Error = ProxyError;
    type Future = future::Either<S::Future, Answer>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let RouteLayer { ctx, service } = &self.layer;
        let Some(svc) = ctx.outbound.load().get(service).cloned() else {
            return future::Either::Right(Box::pin(async { Err(ProxyError::UnknownService) }));
        };
        if phttp::is_upgrade(&req) {
            let (ctx, service) = (ctx.clone(), service.clone());
            return future::Either::Right(Box::pin(async move {
                upgrade(&ctx, &service, &svc, req).await
            }));
        }
        let Ok(req) = for_h2(req, service) else {
            return future::Either::Right(Box::pin(async { Err(ProxyError::BadRequestTarget) }));
        };
        let (parts, body) = req.into_parts();
        let (body, _) = OutBody::watched(body);
        let req = Request::from_parts(parts, body);
        future::Either::Left(self.inner.call(Call { svc, req }))
    }
}

/// The service's request timeout, over everything below (retries included), until the
/// response headers: past it the caller gets 504 / `DEADLINE_EXCEEDED`.
#[derive(Clone, Copy)]
pub(crate) struct TimeoutLayer;

impl<S> tower::Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;
    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout { inner }
    }
}

#[derive(Clone)]
pub(crate) struct Timeout<S> {
    inner: S,
}

impl<S> tower::Service<Call> for Timeout<S>
where
    S: tower::Service<Call, Response = Response<RspBody>, Error = ProxyError>,
{
    type Response = Response<RspBody>;
    type Error = ProxyError;
    type Future = TimeoutFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let limit = call.svc.cfg.timeout;
        TimeoutFuture {
            inner: self.inner.call(call),
            sleep: limit.map(tokio::time::sleep),
            limit,
        }
    }
}

pin_project_lite::pin_project! {
    /// The inner call, failed with [`ProxyError::RequestTimeout`] at the limit; no timer
    /// without one.
    pub(crate) struct TimeoutFuture<F> {
        #[pin]
        inner: F,
        #[pin]
        sleep: Option<tokio::time::Sleep>,
        limit: Option<std::time::Duration>,
    }
}

impl<F> std::future::Future for TimeoutFuture<F>
where
    F: std::future::Future<Output = Result<Response<RspBody>, ProxyError>>,
{
    type Output = F::Output;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(out) = this.inner.poll(cx) {
            return Poll::Ready(out);
        }
        match (this.sleep.as_pin_mut(), *this.limit) {
            (Some(sleep), Some(limit)) => match sleep.poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(ProxyError::RequestTimeout(limit))),
                Poll::Pending => Poll::Pending,
            },
            _ => Poll::Pending,
        }
    }
}

/// The largest request body kept for a retry: a longer one (or one of unknown length) is sent
/// once. Linkerd's replay body has the same bound.
pub const MAX_REPLAY_BODY: u64 = 64 * 1024;

/// Retries per the service's policy: responses with one of its status codes and failures to
/// reach an endpoint, for idempotent methods only (a request that never left the proxy goes to
/// another endpoint in [`Balance`] whatever its method), within the service's retry budget
/// (20% of its requests, and at least 10 a second), with exponential backoff and jitter.
#[derive(Clone)]
pub(crate) struct RetryLayer {
    metrics: Arc<Metrics>,
}

impl RetryLayer {
    fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl<S> tower::Layer<S> for RetryLayer {
    type Service = Retry<S>;
    fn layer(&self, inner: S) -> Retry<S> {
        Retry {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct Retry<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S> tower::Service<Call> for Retry<S>
where
    S: tower::Service<Call, Response = Response<RspBody>, Error = ProxyError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = Response<RspBody>;
    type Error = ProxyError;
    type Future = future::Either<S::Future, Answer>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: Call) -> Self::Future {
        if call.svc.cfg.retry.is_none() {
            return future::Either::Left(self.inner.call(call));
        }
        let inner = self.inner.clone();
        let metrics = self.metrics.clone();
        future::Either::Right(Box::pin(retrying(inner, call, metrics)))
    }
}

/// Whether a failed attempt may be tried again (the policy allowing).
fn retryable(result: &Result<Response<RspBody>, ProxyError>, policy: &RetryPolicy) -> bool {
    match result {
        Ok(rsp) => policy.retries_status(rsp.status().as_u16()),
        Err(ProxyError::Endpoint(_) | ProxyError::NoEndpoints) => true,
        Err(_) => false,
    }
}

async fn retrying<S>(
    inner: S,
    call: Call,
    metrics: Arc<Metrics>,
) -> Result<Response<RspBody>, ProxyError>
where
    S: tower::Service<Call, Response = Response<RspBody>, Error = ProxyError> + Clone,
{
    let Some(policy) = call.svc.cfg.retry.clone() else {
        return inner.oneshot(call).await;
    };
    // (Retry::call sends calls without a policy straight to the inner service.)
    call.svc.budget.deposit();
    let replayable = idempotent(call.req.method())
        && call
            .req
            .body()
            .size_hint()
            .exact()
            .is_some_and(|n| n <= MAX_REPLAY_BODY);
    if !replayable {
        return inner.oneshot(call).await;
    }
    let Call { svc, req } = call;
    let (parts, body) = req.into_parts();
    let body = http_body_util::BodyExt::collect(body)
        .await
        .map_err(|_| ProxyError::BadRequestBody)?
        .to_bytes();
    let head = Request::from_parts(parts, ());
    let copy = |head: &Request<()>| {
        let mut r = Request::new(OutBody::buffered(body.clone()));
        *r.method_mut() = head.method().clone();
        *r.uri_mut() = head.uri().clone();
        *r.version_mut() = head.version();
        *r.headers_mut() = head.headers().clone();
        r
    };
    let mut backoff = policy.backoff;
    for attempt in 1..=policy.attempts {
        let result = inner
            .clone()
            .oneshot(Call {
                svc: svc.clone(),
                req: copy(&head),
            })
            .await;
        if !retryable(&result, &policy) {
            return result;
        }
        if attempt == policy.attempts {
            metrics.retry("gave_up");
            return result;
        }
        if !svc.budget.withdraw() {
            metrics.retry("budget_exhausted");
            return result;
        }
        metrics.retry("retried");
        tracing::debug!(service = %svc.cfg.key, attempt, "retrying");
        drop(result);
        // ±25% so clients that failed together do not retry together.
        let jitter = 0.75 + f64::from(rand::random::<u16>()) / f64::from(u16::MAX) / 2.0;
        tokio::time::sleep(backoff.mul_f64(jitter)).await;
        backoff = backoff.saturating_mul(2);
    }
    Err(ProxyError::NoEndpoints)
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

/// Picks an endpoint and sends; a request that never left goes to another endpoint, and a
/// bodiless one to a suspect endpoint may too (see the module docs).
async fn forward(ctx: &Ctx, call: Call) -> Result<Response<RspBody>, ProxyError> {
    let Call { svc, mut req } = call;
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
async fn upgrade(
    ctx: &Arc<Ctx>,
    service: &str,
    svc: &OutService,
    req: Request<Incoming>,
) -> Result<Response<RspBody>, ProxyError> {
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::balance::{Balancer, Strategy};
    use crate::config::{Protocol, ServiceConfig};

    fn call(timeout: Option<Duration>, retry: Option<RetryPolicy>) -> Call {
        let cfg = Arc::new(ServiceConfig {
            key: "api.demo:8080".into(),
            protocol: Protocol::Http,
            endpoints: Vec::new(),
            virtual_addrs: Vec::new(),
            timeout,
            idle_timeout: None,
            retry,
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
        }
    }

    fn status(s: StatusCode) -> Response<RspBody> {
        phttp::local_response(s, "")
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_without_an_answer_times_out_at_the_services_timeout() {
        let never = tower::service_fn(|_c: Call| {
            futures_util::future::pending::<Result<Response<RspBody>, ProxyError>>()
        });
        let start = tokio::time::Instant::now();
        let r = Timeout { inner: never }
            .oneshot(call(Some(Duration::from_secs(2)), None))
            .await;
        assert!(matches!(r, Err(ProxyError::RequestTimeout(d)) if d == Duration::from_secs(2)));
        assert_eq!(start.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn retries_back_off_exponentially_and_stop_at_a_success() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let flaky = tower::service_fn(move |_c: Call| {
            let n = counted.fetch_add(1, Ordering::Relaxed);
            async move {
                Ok::<_, ProxyError>(status(if n < 2 {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::OK
                }))
            }
        });
        let policy = RetryPolicy {
            codes: vec![503],
            attempts: 3,
            backoff: Duration::from_millis(100),
        };
        let start = tokio::time::Instant::now();
        let r = Retry {
            inner: flaky,
            metrics: Metrics::new(),
        }
        .oneshot(call(None, Some(policy)))
        .await
        .expect("a response");
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(calls.load(Ordering::Relaxed), 3);
        // 100 ms then 200 ms, each ±25%.
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(225) && waited <= Duration::from_millis(375),
            "{waited:?}"
        );
    }
}
