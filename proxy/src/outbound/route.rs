//! The route stages of the outbound HTTP stack.
//!
//! [`Classify`] sits above Rescue: it finds the connection's service in the table in force
//! (it may have changed since the connection was accepted) and the route rule that takes the
//! request, and labels whatever response comes back, an error answered by Rescue included,
//! with that rule. [`Dispatch`] sits below Rescue and does what the rule says: redirect,
//! inject its fault, modify headers, rewrite, mirror, and pick a backend by weight. Upgrades
//! (WebSocket) leave the stack here for their own connection.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future;
use http::{Request, Response};
use http_body::Body as _;
use hyper::body::Incoming;

use super::OutService;
use super::call::{Answer, Call};
use crate::Ctx;
use crate::errors::ProxyError;
use crate::http::{self as phttp, OutBody, RouteLabel, RspBody};
use crate::routing::{self, Matched, Rule};
use crate::telemetry::{Direction, FaultLabels, ResultLabels};

/// What [`Classify`] found for a request with routes, handed to [`Dispatch`] in its
/// extensions (or what Dispatch finds itself for a service without routes).
#[derive(Clone)]
pub(crate) enum Classified {
    /// The service has no routes.
    Service(Arc<OutService>),
    /// A rule of one of its routes took the request (and the PathPrefix that matched).
    Rule(Arc<OutService>, Arc<Rule>, Arc<str>),
    NoRoute,
    Unknown,
}

#[derive(Clone)]
pub(crate) struct ClassifyLayer {
    ctx: Arc<Ctx>,
    service: Arc<str>,
}

impl ClassifyLayer {
    pub(crate) fn new(ctx: Arc<Ctx>, service: Arc<str>) -> Self {
        Self { ctx, service }
    }
}

impl<S> tower::Layer<S> for ClassifyLayer {
    type Service = Classify<S>;
    fn layer(&self, inner: S) -> Classify<S> {
        Classify {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct Classify<S> {
    inner: S,
    layer: ClassifyLayer,
}

impl<S> tower::Service<Request<Incoming>> for Classify<S>
where
    S: tower::Service<
            Request<Incoming>,
            Response = Response<RspBody>,
            Error = std::convert::Infallible,
        >,
{
    type Response = Response<RspBody>;
    type Error = std::convert::Infallible;
    type Future = Labelled<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Incoming>) -> Self::Future {
        let table = self.layer.ctx.outbound.load();
        // A service without routes (the common case) leaves the request as it is: Dispatch
        // looks the service up itself, and nothing is allocated for the classification.
        let svc = table.get(&self.layer.service);
        let classified = match svc {
            Some(svc) if !svc.cfg.routes.is_empty() => {
                let host = routing::request_host(&req);
                Some(match svc.cfg.routes.select(&host, &req) {
                    Matched::Rule(rule, prefix) => {
                        Classified::Rule(svc.clone(), rule.clone(), prefix.clone())
                    }
                    Matched::NoRoute => Classified::NoRoute,
                    Matched::Unrouted => Classified::Service(svc.clone()),
                })
            }
            _ => None,
        };
        // The trace policy: the rule's (its route's over the service's), else the service's,
        // routes or not. Copied, never allocated; an empty one (the proxy's defaults) is not
        // attached at all.
        let (label, trace) = match &classified {
            Some(Classified::Rule(_, rule, _)) => (Some(rule.label.clone()), rule.trace),
            _ => (None, svc.map(|s| s.cfg.trace).unwrap_or_default()),
        };
        if let Some(c) = classified {
            req.extensions_mut().insert(c);
        }
        Labelled {
            inner: self.inner.call(req),
            label,
            // Only read by span sampling: no extension (an allocation) when nothing exports.
            trace: (self.layer.ctx.tracer.enabled()
                && trace != crate::trace::TracePolicy::default())
            .then_some(trace),
        }
    }
}

pin_project_lite::pin_project! {
    /// The inner response, labelled with the route rule and its trace policy.
    pub(crate) struct Labelled<F> {
        #[pin]
        inner: F,
        label: Option<crate::telemetry::Label>,
        trace: Option<crate::trace::TracePolicy>,
    }
}

impl<F, E> Future for Labelled<F>
where
    F: Future<Output = Result<Response<RspBody>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut out = std::task::ready!(this.inner.poll(cx));
        if let (Ok(rsp), Some(label)) = (&mut out, this.label.take()) {
            rsp.extensions_mut().insert(RouteLabel(label));
        }
        if let (Ok(rsp), Some(trace)) = (&mut out, this.trace.take()) {
            rsp.extensions_mut().insert(trace);
        }
        Poll::Ready(out)
    }
}

/// Below Rescue: carries out the rule [`Classify`] found.
#[derive(Clone)]
pub(crate) struct Dispatch<S> {
    pub(super) inner: S,
    pub(super) ctx: Arc<Ctx>,
    pub(super) service: Arc<str>,
}

/// A draw in parts per million.
fn hit(ppm: u32) -> bool {
    ppm > 0
        && (ppm >= palisade_api::policy::traffic::MILLION || rand::random_range(0..1_000_000) < ppm)
}

fn ready(r: Result<Response<RspBody>, ProxyError>) -> Answer {
    Box::pin(async move { r })
}

impl<S> tower::Service<Request<Incoming>> for Dispatch<S>
where
    S: tower::Service<Call, Response = Response<RspBody>, Error = ProxyError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<RspBody>;
    type Error = ProxyError;
    type Future = future::Either<S::Future, Answer>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Incoming>) -> Self::Future {
        let classified = match req.extensions_mut().remove::<Classified>() {
            Some(c) => c,
            // Not classified: the service has no routes (or left the table).
            None => match self.ctx.outbound.load().get(&self.service) {
                Some(svc) => Classified::Service(svc.clone()),
                None => Classified::Unknown,
            },
        };
        let (svc, rule) = match classified {
            Classified::Unknown => {
                return future::Either::Right(ready(Err(ProxyError::UnknownService)));
            }
            Classified::NoRoute => return future::Either::Right(ready(Err(ProxyError::NoRoute))),
            Classified::Service(svc) => (svc, None),
            Classified::Rule(svc, rule, prefix) => (svc, Some((rule, prefix))),
        };
        let Some((rule, prefix)) = rule else {
            // No routes: the common path, without a boxed future.
            if phttp::is_upgrade(&req) {
                let ctx = self.ctx.clone();
                return future::Either::Right(Box::pin(async move {
                    super::http::upgrade(&ctx, &svc, req).await
                }));
            }
            return match prepare(req, &self.service) {
                Ok(req) => future::Either::Left(self.inner.call(Call {
                    svc,
                    req,
                    rule: None,
                })),
                Err(e) => future::Either::Right(ready(Err(e))),
            };
        };
        let ctx = self.ctx.clone();
        let inner = self.inner.clone();
        let service = self.service.clone();
        future::Either::Right(Box::pin(async move {
            routed(ctx, inner, service, svc, rule, &prefix, req).await
        }))
    }
}

/// Readies a request for the HTTP/2 hop, its body watched for the app's own errors.
fn prepare(req: Request<Incoming>, authority: &str) -> Result<Request<OutBody>, ProxyError> {
    let req = super::http::for_h2(req, authority).map_err(|_| ProxyError::BadRequestTarget)?;
    let (parts, body) = req.into_parts();
    let (body, _) = OutBody::watched(body, &parts.extensions);
    Ok(Request::from_parts(parts, body))
}

async fn routed<S>(
    ctx: Arc<Ctx>,
    inner: S,
    service: Arc<str>,
    parent: Arc<OutService>,
    rule: Arc<Rule>,
    prefix: &str,
    mut req: Request<Incoming>,
) -> Result<Response<RspBody>, ProxyError>
where
    S: tower::Service<Call, Response = Response<RspBody>, Error = ProxyError>,
{
    use tower::ServiceExt;
    if let Some(rd) = &rule.redirect {
        let host = routing::request_host(&req);
        let (status, location) =
            routing::redirect(&req, &host, rd, prefix).ok_or(ProxyError::BadRequestTarget)?;
        let mut rsp = phttp::local_response(status, bytes::Bytes::new());
        if let Ok(v) = http::HeaderValue::from_str(&location) {
            rsp.headers_mut().insert(http::header::LOCATION, v);
        }
        return Ok(rsp);
    }
    if let Some(fault) = &rule.fault {
        if hit(fault.delay_ppm) {
            ctx.metrics
                .faults
                .get_or_create(&FaultLabels {
                    fault: fault.name.clone(),
                    kind: "delay",
                })
                .inc();
            tokio::time::sleep(fault.delay).await;
        }
        if hit(fault.abort_ppm) {
            ctx.metrics
                .faults
                .get_or_create(&FaultLabels {
                    fault: fault.name.clone(),
                    kind: "abort",
                })
                .inc();
            let grpc = phttp::is_grpc(&req);
            return Ok(match (grpc, fault.abort_grpc, fault.abort_status) {
                (true, Some(code), _) => phttp::grpc_response(code, "fault injected"),
                (true, None, Some(status)) => {
                    phttp::grpc_response(grpc_code_of(status), "fault injected")
                }
                (_, _, Some(status)) => phttp::local_response(status, "fault injected\n"),
                // A gRPC-only abort on a plain HTTP request: the gRPC answer still says it.
                (false, Some(code), None) => phttp::grpc_response(code, "fault injected"),
                (_, None, None) => phttp::local_response(
                    http::StatusCode::INTERNAL_SERVER_ERROR,
                    "fault injected\n",
                ),
            });
        }
    }
    if let Some(h) = &rule.request_headers {
        routing::apply_headers(req.headers_mut(), h);
    }
    if phttp::is_upgrade(&req) {
        let backend = backend(&ctx, &parent, &rule)?;
        return super::http::upgrade(&ctx, &backend, req).await;
    }
    let mut req = prepare(req, &service)?;
    if let Some(rw) = &rule.rewrite
        && !routing::rewrite(&mut req, rw, prefix)
    {
        return Err(ProxyError::BadRequestTarget);
    }
    for m in &rule.mirrors {
        mirror(&ctx, m, &req);
    }
    let backend = backend(&ctx, &parent, &rule)?;
    let call = Call {
        svc: backend,
        req,
        rule: Some(rule.clone()),
    };
    let mut rsp = inner.oneshot(call).await?;
    if let Some(h) = &rule.response_headers {
        routing::apply_headers(rsp.headers_mut(), h);
    }
    Ok(rsp)
}

/// The gRPC code a fault's HTTP status means (gRPC's HTTP-to-status mapping).
fn grpc_code_of(status: http::StatusCode) -> u8 {
    match status.as_u16() {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502..=504 => 14,
        _ => 2,
    }
}

/// The rule's backend for this request: drawn by weight, or the parent service.
fn backend(
    ctx: &Ctx,
    parent: &Arc<OutService>,
    rule: &Rule,
) -> Result<Arc<OutService>, ProxyError> {
    if rule.backends.is_empty() {
        return Ok(parent.clone());
    }
    if rule.total_weight == 0 {
        return Err(ProxyError::RouteBackend);
    }
    let key = rule
        .backend(rand::random_range(0..rule.total_weight))
        .ok_or(ProxyError::RouteBackend)?;
    ctx.outbound
        .load()
        .get(key)
        .cloned()
        .ok_or(ProxyError::RouteBackend)
}

/// Mirrored requests in flight per proxy; past it a copy is skipped (counted).
pub const MAX_MIRRORS_IN_FLIGHT: usize = 256;
/// How long a mirrored request may take before it is dropped.
pub const MIRROR_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// RequestMirror: a copy to another service, fire and forget. Only a bodiless request is
/// copied (a body would have to be held for the copy), at most [`MAX_MIRRORS_IN_FLIGHT`] at
/// once, each for at most [`MIRROR_TIMEOUT`]; others are counted as skipped.
fn mirror(ctx: &Arc<Ctx>, m: &routing::Mirror, req: &Request<OutBody>) {
    if m.percent < 100 && rand::random_range(0..100) >= m.percent {
        return;
    }
    let skipped = |ctx: &Ctx| {
        ctx.metrics
            .mirrors
            .get_or_create(&ResultLabels { result: "skipped" })
            .inc()
    };
    if !req.body().is_end_stream() {
        skipped(ctx);
        return;
    }
    let Some(svc) = ctx.outbound.load().get(&m.service).cloned() else {
        skipped(ctx);
        return;
    };
    let Ok(permit) = ctx.mirror_permits.clone().try_acquire_owned() else {
        skipped(ctx);
        return;
    };
    let copy = super::http::head_copy(req);
    ctx.metrics
        .mirrors
        .get_or_create(&ResultLabels { result: "sent" })
        .inc();
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let _permit = permit;
        let call = Call {
            svc,
            req: copy,
            rule: None,
        };
        match tokio::time::timeout(MIRROR_TIMEOUT, super::http::forward(&ctx, call)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::debug!(error = %e, direction = ?Direction::outbound, "mirrored request failed")
            }
            Err(_) => tracing::debug!("mirrored request timed out"),
        }
    });
}
