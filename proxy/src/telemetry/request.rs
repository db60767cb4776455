//! The first stage of both HTTP stacks: everything recorded about one request.
//!
//! When the request arrives it gets this proxy's trace context (the head sampling decision).
//! When the response head returns, `palisade_requests_total` and the latency histogram are
//! recorded (with the trace id as exemplar for a sampled trace), and the access-log line
//! written. The response body is then watched ([`Observed`]) until it ends or is dropped:
//! only then are the bytes known for cost attribution, a gRPC status in the trailers read, and
//! the span kept or dropped — so a failure at the end of a stream still keeps its span.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri, Version};

use super::{Direction, Label, Metrics, RequestLabels, TraceExemplar, TraceIdHex};
use crate::http::{DstIdentity, PROXY_ERROR, RouteLabel, RspBody};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
use crate::trace::{FinishedSpan, TraceIds, TracePolicy, Tracer};

/// The request body's byte count, shared with the body the proxy sends on
/// ([`crate::http::OutBody`]). Only requests with a body carry one.
#[derive(Clone, Debug)]
pub struct RequestBytes(pub Arc<AtomicU64>);

#[derive(Clone)]
pub struct TelemetryLayer {
    metrics: Arc<Metrics>,
    tracer: Arc<Tracer>,
    direction: Direction,
    src: Label,
    dst: Label,
    access_log: bool,
    /// The empty `route` label, made once.
    no_route: Label,
}

impl TelemetryLayer {
    pub fn new(
        metrics: Arc<Metrics>,
        tracer: Arc<Tracer>,
        direction: Direction,
        src: Label,
        dst: Label,
        access_log: bool,
    ) -> Self {
        TelemetryLayer {
            metrics,
            tracer,
            direction,
            src,
            dst,
            access_log,
            no_route: Label::new(""),
        }
    }
}

impl<S> tower::Layer<S> for TelemetryLayer {
    type Service = Telemetry<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Telemetry {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Telemetry<S> {
    inner: S,
    layer: TelemetryLayer,
}

/// What a span needs from the request, kept only when spans are exported. The method and URI
/// are clones of shared buffers, not copies.
struct SpanStart {
    start: SystemTime,
    method: Method,
    uri: Uri,
    /// The Host header, for an HTTP/1 request whose URI is only a path.
    host: Option<HeaderValue>,
    version: Version,
}

impl<S, B> tower::Service<Request<B>> for Telemetry<S>
where
    S: tower::Service<Request<B>, Response = Response<RspBody>, Error = Infallible>,
    B: http_body::Body,
{
    type Response = Response<Observed>;
    type Error = Infallible;
    type Future = TelemetryFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let tracer = &self.layer.tracer;
        let ids = crate::trace::context::propagate(req.headers_mut(), &tracer.sampler);
        let span = tracer.enabled().then(|| SpanStart {
            start: SystemTime::now(),
            method: req.method().clone(),
            uri: req.uri().clone(),
            host: req
                .uri()
                .authority()
                .is_none()
                .then(|| req.headers().get(http::header::HOST).cloned())
                .flatten(),
            version: req.version(),
        });
        let tally = (!req.body().is_end_stream()).then(|| {
            let t = Arc::new(AtomicU64::new(0));
            req.extensions_mut().insert(RequestBytes(t.clone()));
            t
        });
        let log = self.layer.access_log.then(|| {
            (
                req.method().clone(),
                req.uri().path().to_owned(),
                req.version(),
            )
        });
        TelemetryFuture {
            inner: self.inner.call(req),
            layer: self.layer.clone(),
            start: Instant::now(),
            ids,
            span,
            tally,
            log,
        }
    }
}

pin_project_lite::pin_project! {
    pub struct TelemetryFuture<F> {
        #[pin]
        inner: F,
        layer: TelemetryLayer,
        start: Instant,
        ids: TraceIds,
        span: Option<SpanStart>,
        tally: Option<Arc<AtomicU64>>,
        log: Option<(Method, String, Version)>,
    }
}

/// The gRPC status of a header block (trailers-only responses carry it in the headers).
fn grpc_status(h: &HeaderMap) -> Option<u16> {
    h.get("grpc-status")
        .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
        .and_then(|v| v.parse().ok())
}

fn is_grpc(h: &HeaderMap) -> bool {
    h.get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

impl<F> Future for TelemetryFuture<F>
where
    F: Future<Output = Result<Response<RspBody>, Infallible>>,
{
    type Output = Result<Response<Observed>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let rsp = match this.inner.poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(rsp)) => rsp,
            Poll::Ready(Err(e)) => match e {},
        };
        let elapsed = this.start.elapsed();
        let layer = &*this.layer;
        let found = rsp.extensions().get::<DstIdentity>();
        let dst = found.map_or_else(|| layer.dst.clone(), |d| d.identity.clone());
        let endpoint = found.and_then(|d| d.endpoint);
        let route = rsp
            .extensions()
            .get::<RouteLabel>()
            .map_or_else(|| layer.no_route.clone(), |r| r.0.clone());
        let labels = RequestLabels {
            direction: layer.direction,
            src_identity: layer.src.clone(),
            dst_identity: dst,
            status_code: rsp.status().as_u16(),
            route,
        };
        let m = &layer.metrics;
        m.requests.get_or_create(&labels).inc();
        // A sampled request takes its place in the route's span budget now, so that the
        // exemplar names only a trace whose span will be exported.
        let admitted = (this.span.is_some() && this.ids.sampled).then(|| {
            let policy = rsp.extensions().get::<TracePolicy>().copied();
            layer
                .tracer
                .admit(policy.unwrap_or_default(), &labels.route)
        });
        let exemplar = (admitted == Some(true)).then_some(TraceExemplar {
            trace_id: TraceIdHex(this.ids.trace_id),
        });
        m.request_duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64(), exemplar, None);
        let authz = rsp
            .extensions()
            .get::<crate::authz_layer::AuthzNote>()
            .map(|n| (n.allowed, n.policy.clone()));
        if let Some((method, path, version)) = this.log.take() {
            log_request(&labels, &method, &path, version, elapsed, &authz, this.ids);
        }
        let grpc = is_grpc(rsp.headers()).then(|| grpc_status(rsp.headers()));
        let span = this.span.take().map(|s| {
            let policy = rsp
                .extensions()
                .get::<TracePolicy>()
                .copied()
                .unwrap_or_default();
            SpanParts {
                ids: *this.ids,
                start: s.start,
                method: s.method,
                uri: s.uri,
                host: s.host,
                version: s.version,
                authz,
                endpoint,
                proxy_error: rsp.headers().get(PROXY_ERROR).cloned(),
                policy,
                admitted: admitted.unwrap_or(false),
            }
        });
        let pending = Pending {
            layer: layer.clone(),
            labels,
            grpc,
            tally: this.tally.take(),
            start: *this.start,
            span,
        };
        Poll::Ready(Ok(rsp.map(|inner| Observed {
            inner,
            bytes: 0,
            broken: false,
            pending: Some(pending),
        })))
    }
}

#[allow(clippy::too_many_arguments)]
fn log_request(
    labels: &RequestLabels,
    method: &Method,
    path: &str,
    version: Version,
    elapsed: std::time::Duration,
    authz: &Option<(bool, Label)>,
    ids: &TraceIds,
) {
    let decision = authz.as_ref().map(|(allowed, policy)| {
        format!(
            "{} policy={}",
            if *allowed { "allow" } else { "deny" },
            policy.0
        )
    });
    tracing::info!(
        target: "palisade::access",
        direction = ?labels.direction,
        src = %labels.src_identity.0,
        dst = %labels.dst_identity.0,
        %method,
        path = %path,
        version = ?version,
        status = labels.status_code,
        route = %labels.route.0,
        duration_ms = elapsed.as_secs_f64() * 1000.0,
        authz = decision.as_deref().unwrap_or("-"),
        trace_id = %TraceIdHex(ids.trace_id).hex(),
        span_id = %hex8(ids.span_id),
        "request"
    );
}

impl TraceIdHex {
    /// The 32 hex digits of the trace id.
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

fn hex8(id: [u8; 8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

struct SpanParts {
    ids: TraceIds,
    start: SystemTime,
    method: Method,
    uri: Uri,
    host: Option<HeaderValue>,
    version: Version,
    authz: Option<(bool, Label)>,
    endpoint: Option<SocketAddr>,
    proxy_error: Option<HeaderValue>,
    policy: TracePolicy,
    /// Head-sampled and within its route's span budget.
    admitted: bool,
}

/// What is recorded once the response has ended.
struct Pending {
    layer: TelemetryLayer,
    labels: RequestLabels,
    /// For a gRPC response, its status so far (trailers may still bring it).
    grpc: Option<Option<u16>>,
    tally: Option<Arc<AtomicU64>>,
    start: Instant,
    span: Option<SpanParts>,
}

impl Pending {
    fn finish(self, response_bytes: u64, broken: bool) {
        let layer = &self.layer;
        let request_bytes = self.tally.map_or(0, |t| t.load(Ordering::Relaxed));
        layer.metrics.cost.record(
            layer.direction,
            &self.labels.src_identity,
            &self.labels.dst_identity,
            &self.labels.route,
            request_bytes,
            response_bytes,
        );
        let Some(span) = self.span else { return };
        let elapsed = self.start.elapsed();
        // A gRPC response that ended without a status is an error, as gRPC clients see it.
        let grpc_status = self.grpc.map(|s| s.unwrap_or(if broken { 14 } else { 2 }));
        let status = self.labels.status_code;
        let denied = span.authz.as_ref().is_some_and(|(allowed, _)| !allowed);
        let failed = broken || FinishedSpan::failed(status, grpc_status, denied);
        let decision = layer
            .tracer
            .decide(&span.ids, span.admitted, failed, elapsed, span.policy);
        if !decision.kept() {
            return;
        }
        layer.tracer.export(FinishedSpan {
            ids: span.ids,
            direction: layer.direction,
            start: span.start,
            duration: elapsed,
            method: span.method,
            uri: span.uri,
            host: span.host,
            version: span.version,
            status,
            grpc_status,
            src: self.labels.src_identity,
            dst: self.labels.dst_identity,
            route: self.labels.route,
            authz: span.authz,
            endpoint: span.endpoint,
            proxy_error: span.proxy_error,
            decision,
        });
    }
}

/// A response body on its way to the caller, counted; the request is recorded when it ends
/// (or is dropped: the caller went away).
pub struct Observed {
    inner: RspBody,
    bytes: u64,
    broken: bool,
    /// Inline, not boxed: no allocation per request (hyper keeps the body in the stream's
    /// task or connection state, which exists anyway).
    pending: Option<Pending>,
}

impl Observed {
    fn finish(&mut self) {
        if let Some(p) = self.pending.take() {
            p.finish(self.bytes, self.broken);
        }
    }
}

impl http_body::Body for Observed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes = this.bytes.saturating_add(data.len() as u64);
                } else if let (Some(t), Some(p)) = (frame.trailers_ref(), this.pending.as_mut())
                    && let Some(grpc) = p.grpc.as_mut()
                    && let Some(code) = grpc_status(t)
                {
                    *grpc = Some(code);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                this.broken = true;
                this.finish();
            }
            Poll::Ready(None) => this.finish(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        self.finish();
    }
}
