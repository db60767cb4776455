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
use http_body::Body as _;

use prometheus_client::metrics::counter::Counter;

use super::cost::CostCell;
use super::{
    Direction, Label, LatencyHistogram, Metrics, RequestLabels, TraceExemplar, TraceIdHex,
};
use crate::http::{DstIdentity, PROXY_ERROR, RouteLabel, RspBody};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
use crate::trace::{FinishedSpan, TraceIds, TracePolicy, Tracer};

/// The request body's byte count, shared with the body the proxy sends on
/// ([`crate::http::OutBody`]). Only requests with a body carry one.
#[derive(Clone, Debug)]
pub struct RequestBytes(pub Arc<AtomicU64>);

/// Made once per connection and shared by its requests: cloning it for a request (its future,
/// then its response body) is one reference count, not one per handle inside.
#[derive(Clone)]
pub struct TelemetryLayer(Arc<Shared>);

pub struct Shared {
    metrics: Arc<Metrics>,
    tracer: Arc<Tracer>,
    direction: Direction,
    src: Label,
    dst: Label,
    access_log: bool,
    /// The empty `route` label, made once.
    no_route: Label,
    /// The metric handles of the last few request shapes of this connection: a request of a
    /// shape seen before counts without a family lookup (a read lock and a hash of every
    /// label).
    handles: std::sync::Mutex<Vec<Handles>>,
}

/// The request counter and latency histogram of one shape of request on a connection (its
/// direction and source are the connection's).
struct Handles {
    status: u16,
    dst: Label,
    route: Label,
    requests: Counter,
    duration: LatencyHistogram,
    cost: CostCell,
}

/// Shapes kept per connection: a connection to a service with a few endpoints and routes.
const HANDLES_KEPT: usize = 8;

impl Shared {
    fn handles(&self, labels: &RequestLabels) -> (Counter, LatencyHistogram, CostCell) {
        let mut kept = self
            .handles
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(h) = kept.iter().find(|h| {
            h.status == labels.status_code
                && h.dst.same(&labels.dst_identity)
                && h.route.same(&labels.route)
        }) {
            return (h.requests.clone(), h.duration.clone(), h.cost.clone());
        }
        let requests = self.metrics.requests.get_or_create(labels).clone();
        let duration = self.metrics.request_duration.get_or_create(labels).clone();
        let cost =
            self.metrics
                .cost
                .cell_for(&labels.src_identity, &labels.dst_identity, &labels.route);
        if kept.len() >= HANDLES_KEPT {
            kept.remove(0);
        }
        kept.push(Handles {
            status: labels.status_code,
            dst: labels.dst_identity.clone(),
            route: labels.route.clone(),
            requests: requests.clone(),
            duration: duration.clone(),
            cost: cost.clone(),
        });
        (requests, duration, cost)
    }
}

impl std::ops::Deref for TelemetryLayer {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
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
        TelemetryLayer(Arc::new(Shared {
            metrics,
            tracer,
            direction,
            src,
            dst,
            access_log,
            no_route: Label::new(""),
            handles: std::sync::Mutex::new(Vec::new()),
        }))
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

/// What a span needs from the request, kept only when spans are exported. The method, URI and
/// headers are clones of shared buffers, not copies; a kept span copies what it exports, bounded
/// ([`FinishedSpan`]), so a queued span never pins a connection's read buffer.
struct SpanStart {
    start: SystemTime,
    method: Method,
    uri: Uri,
    /// The Host header, for an HTTP/1 request whose URI is only a path.
    host: Option<HeaderValue>,
    /// The `tracestate` the request leaves with.
    tracestate: Option<HeaderValue>,
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
            tracestate: req.headers().get("tracestate").cloned(),
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
        // Only while someone taps the admin port: one relaxed load otherwise.
        let tap = self
            .layer
            .metrics
            .tap
            .active()
            .then(|| crate::tap::Start::new(&req));
        TelemetryFuture {
            inner: self.inner.call(req),
            layer: self.layer.clone(),
            start: Instant::now(),
            ids,
            span,
            tally,
            log,
            tap,
            answered: false,
        }
    }
}

pin_project_lite::pin_project! {
    /// Dropped before the response head (the caller went away, or a timeout above cancelled
    /// it), it still records the request: cost, and a span if it was slow.
    pub struct TelemetryFuture<F> {
        #[pin]
        inner: F,
        layer: TelemetryLayer,
        start: Instant,
        ids: TraceIds,
        span: Option<SpanStart>,
        tally: Option<Arc<AtomicU64>>,
        log: Option<(Method, String, Version)>,
        tap: Option<Box<crate::tap::Start>>,
        answered: bool,
    }

    impl<F> PinnedDrop for TelemetryFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if *this.answered {
                return;
            }
            let layer = &*this.layer;
            let labels = RequestLabels {
                direction: layer.direction,
                src_identity: layer.src.clone(),
                dst_identity: layer.dst.clone(),
                status_code: 0,
                route: layer.no_route.clone(),
            };
            let span = this.span.take().map(|s| SpanParts {
                ids: *this.ids,
                start: s,
                authz: None,
                endpoint: None,
                proxy_error: None,
                policy: TracePolicy::default(),
                admitted: false,
            });
            let pending = Pending {
                layer: layer.clone(),
                labels,
                cost: None,
                grpc: None,
                tally: this.tally.take(),
                start: *this.start,
                head: this.start.elapsed(),
                span,
                tap: this.tap.take(),
            };
            pending.finish(0, End::Cancelled);
        }
    }
}

/// The gRPC status of a header block (trailers-only responses carry it in the headers).
fn grpc_status(h: &HeaderMap) -> Option<u16> {
    h.get("grpc-status")
        .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
        .and_then(|v| v.parse().ok())
}

/// `application/grpc` or `application/grpc+proto` (…`;charset`), not gRPC-web, whose status
/// travels in the body.
fn is_grpc(h: &HeaderMap) -> bool {
    h.get(http::header::CONTENT_TYPE).is_some_and(|v| {
        let v = v.as_bytes();
        v.strip_prefix(b"application/grpc")
            .is_some_and(|rest| rest.is_empty() || rest[0] == b'+' || rest[0] == b';')
    })
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
        *this.answered = true;
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
        let (requests, duration, cost) = layer.handles(&labels);
        requests.inc();
        let policy = || {
            rsp.extensions()
                .get::<TracePolicy>()
                .copied()
                .unwrap_or_default()
        };
        // A sampled request takes its place in its route's (or, without one, its
        // destination's) span budget now, so that the exemplar names only a trace whose span
        // will be exported.
        let admitted = (this.span.is_some() && this.ids.sampled).then(|| {
            let key = if labels.route.0.is_empty() {
                &labels.dst_identity
            } else {
                &labels.route
            };
            layer.tracer.admit(policy(), key)
        });
        let exemplar = (admitted == Some(true)).then_some(TraceExemplar {
            trace_id: TraceIdHex(this.ids.trace_id),
        });
        duration.observe(elapsed.as_secs_f64(), exemplar, None);
        let authz = (this.span.is_some() || this.log.is_some() || this.tap.is_some())
            .then(|| rsp.extensions().get::<crate::authz_layer::AuthzNote>())
            .flatten()
            .map(|n| (n.allowed, n.policy.clone()));
        let mut tap = this.tap.take();
        if let Some(t) = tap.as_mut() {
            t.authz.clone_from(&authz);
        }
        if let Some((method, path, version)) = this.log.take() {
            log_request(&labels, &method, &path, version, elapsed, &authz, this.ids);
        }
        let span = this.span.take().map(|s| SpanParts {
            ids: *this.ids,
            start: s,
            authz,
            endpoint,
            // The reason of a response this proxy (or the peer proxy) made itself; only for a
            // failure, as only then is the header the proxy's own.
            proxy_error: rsp
                .status()
                .is_server_error()
                .then(|| rsp.headers().get(PROXY_ERROR).cloned())
                .flatten(),
            policy: policy(),
            admitted: admitted.unwrap_or(false),
        });
        let grpc = span
            .as_ref()
            .and_then(|_| is_grpc(rsp.headers()).then(|| grpc_status(rsp.headers())));
        let pending = Pending {
            layer: layer.clone(),
            labels,
            cost: Some(cost),
            grpc,
            tally: this.tally.take(),
            start: *this.start,
            head: elapsed,
            span,
            tap,
        };
        Poll::Ready(Ok(rsp.map(|inner| Observed {
            inner,
            bytes: 0,
            pending: Some(pending),
        })))
    }
}

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
        trace_id = %crate::trace::context::hex(&ids.trace_id),
        span_id = %crate::trace::context::hex(&ids.span_id),
        "request"
    );
}

struct SpanParts {
    ids: TraceIds,
    start: SpanStart,
    authz: Option<(bool, Label)>,
    endpoint: Option<SocketAddr>,
    proxy_error: Option<HeaderValue>,
    policy: TracePolicy,
    /// Head-sampled and within its span budget.
    admitted: bool,
}

/// How a response ended.
#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    /// Its last frame was sent.
    Complete,
    /// The stream failed (the peer reset it, or it idled out).
    Broken,
    /// The caller went away (or a timeout above this stage cancelled it) first.
    Cancelled,
}

/// What is recorded once the response has ended.
struct Pending {
    layer: TelemetryLayer,
    labels: RequestLabels,
    /// The connection's kept cost cell for this shape (None: a cancelled request, looked up
    /// when it ends).
    cost: Option<CostCell>,
    /// For a gRPC response of a request with a span, its status so far (trailers may still
    /// bring it).
    grpc: Option<Option<u16>>,
    tally: Option<Arc<AtomicU64>>,
    start: Instant,
    /// Until the response head: what "slow" means, as for the latency histogram (a long
    /// stream is not slow for it).
    head: std::time::Duration,
    span: Option<SpanParts>,
    /// Set while a tap is connected: what the tap is sent when the response ends.
    tap: Option<Box<crate::tap::Start>>,
}

impl Pending {
    fn finish(self, response_bytes: u64, end: End) {
        let layer = &self.layer;
        let request_bytes = self.tally.map_or(0, |t| t.load(Ordering::Relaxed));
        match &self.cost {
            Some(cell) => cell.record(layer.direction, request_bytes, response_bytes),
            None => layer.metrics.cost.record(
                layer.direction,
                &self.labels.src_identity,
                &self.labels.dst_identity,
                &self.labels.route,
                request_bytes,
                response_bytes,
            ),
        }
        if let Some(t) = self.tap {
            let event = crate::tap::Start::finish(
                *t,
                layer.direction,
                &self.labels,
                self.head,
                self.start.elapsed(),
            );
            layer.metrics.tap.publish(event);
        }
        let Some(span) = self.span else { return };
        let client = layer.direction == Direction::outbound;
        // A gRPC stream that ended without a status: UNAVAILABLE when it broke, CANCELLED when
        // the caller left, else UNKNOWN (as gRPC clients see it).
        let grpc_status = self.grpc.map(|s| {
            s.unwrap_or(match end {
                End::Broken => 14,
                End::Cancelled => 1,
                End::Complete => 2,
            })
        });
        let status = self.labels.status_code;
        let denied = span.authz.as_ref().is_some_and(|(allowed, _)| !allowed);
        let failed =
            end == End::Broken || FinishedSpan::failed(status, grpc_status, denied, client);
        let decision =
            layer
                .tracer
                .decide(&span.ids, span.admitted, failed, self.head, span.policy);
        if !decision.kept() {
            return;
        }
        let s = span.start;
        layer.tracer.export(FinishedSpan::new(
            span.ids,
            layer.direction,
            s.start,
            self.start.elapsed(),
            &s.method,
            &s.uri,
            s.host.as_ref(),
            s.tracestate.as_ref(),
            s.version,
            status,
            grpc_status,
            &self.labels,
            span.authz,
            span.endpoint,
            span.proxy_error.as_ref(),
            end == End::Cancelled,
            decision,
        ));
    }
}

/// A response body on its way to the caller, counted; the request is recorded when it ends
/// (or is dropped: the caller went away).
pub struct Observed {
    inner: RspBody,
    bytes: u64,
    /// Inline, not boxed: no allocation per request (hyper keeps the body in the stream's
    /// task or connection state, which exists anyway).
    pending: Option<Pending>,
}

impl Observed {
    fn finish(&mut self, end: End) {
        if let Some(p) = self.pending.take() {
            p.finish(self.bytes, end);
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
                this.finish(End::Broken);
            }
            Poll::Ready(None) => this.finish(End::Complete),
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
        // hyper stops polling a body that says it has ended: that is a complete response.
        let end = if self.inner.is_end_stream() {
            End::Complete
        } else {
            End::Cancelled
        };
        self.finish(end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::TraceConfig;

    #[test]
    fn a_connection_counts_each_shape_of_request_under_its_own_labels() {
        let metrics = Metrics::new();
        let tracer = Arc::new(Tracer::start(
            &TraceConfig::default(),
            "spiffe://cluster.local/ns/demo/sa/api",
            metrics.clone(),
        ));
        let (src, dst, other) = (Label::new("web"), Label::new("api"), Label::new("api2"));
        let layer = TelemetryLayer::new(
            metrics.clone(),
            tracer,
            Direction::inbound,
            src.clone(),
            dst.clone(),
            false,
        );
        let labels = |dst: &Label, status: u16, route: &str| RequestLabels {
            direction: Direction::inbound,
            src_identity: src.clone(),
            dst_identity: dst.clone(),
            status_code: status,
            // A new `Arc` each time: equal labels match by value too.
            route: Label::new(route),
        };
        let shapes = [
            (&dst, 200, ""),
            (&dst, 200, ""),
            (&dst, 503, ""),
            (&other, 200, ""),
            (&dst, 200, "r"),
            (&dst, 200, ""),
        ];
        // More shapes than a connection keeps: the oldest are looked up again, still counted.
        let many: Vec<(&Label, u16, &str)> = (0..20).map(|i| (&dst, 400 + i, "")).collect();
        for (d, status, route) in shapes.iter().copied().chain(many.iter().copied()) {
            let (requests, duration, cost) = layer.handles(&labels(d, status, route));
            requests.inc();
            duration.observe(0.001, None, None);
            cost.record(Direction::inbound, 0, 0);
        }
        let count = |d: &Label, status: u16, route: &str| {
            metrics
                .requests
                .get_or_create(&labels(d, status, route))
                .get()
        };
        assert_eq!(count(&dst, 200, ""), 3);
        assert_eq!(count(&dst, 503, ""), 1);
        assert_eq!(count(&other, 200, ""), 1);
        assert_eq!(count(&dst, 200, "r"), 1);
        assert!((400..420).all(|s| count(&dst, s, "") == 1));
        let text = metrics.encode();
        assert!(
            text.contains("palisade_request_duration_seconds_count{direction=\"inbound\",src_identity=\"web\",dst_identity=\"api\",status_code=\"200\",route=\"\"} 3"),
            "{text}"
        );
        // The kept cost cells count into the same keys as a lookup would: every status of
        // web -> api without a route is one key.
        for (key, n) in [
            (r#"src_identity="web",dst_identity="api",route="""#, 24),
            (r#"src_identity="web",dst_identity="api",route="r""#, 1),
        ] {
            assert!(
                text.contains(&format!(
                    "palisade_cost_requests_total{{{key},direction=\"inbound\"}} {n}"
                )),
                "{key}: {text}"
            );
        }
    }
}
