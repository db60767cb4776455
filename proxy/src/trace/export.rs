//! The span pipeline of a proxy: the tail decision for each finished request, a bounded queue,
//! and a task that sends batches to the OTLP exporter (opentelemetry-otlp over gRPC, which
//! reads the standard `OTEL_EXPORTER_OTLP_*` variables). Spans travel as [`FinishedSpan`] (ids,
//! shared label handles and the request's URI: nothing copied) and become OpenTelemetry
//! `SpanData` in the export task, so a request pays only for a queue slot.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use http::{Method, Uri, Version};
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks};
use tokio::sync::mpsc;

use super::sampler::{Budgets, Decision, decide};
use super::{Sampler, TraceConfig, TraceIds, TracePolicy};
use crate::telemetry::{Direction, Label, Metrics};
use http::uri::Authority;

/// Longest path, authority or `tracestate` a span keeps (OpenTelemetry's attribute value
/// length limit in spirit): a caller cannot make queued spans large.
const MAX_VALUE: usize = 2048;

/// gRPC codes a server reports as its own failure (OpenTelemetry's RPC conventions): UNKNOWN,
/// DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS. Other codes are the
/// caller's problem (like HTTP 4xx).
const GRPC_SERVER_ERRORS: [u16; 6] = [2, 4, 12, 13, 14, 15];

/// One request as this proxy saw it, waiting for export: owned, bounded copies of what the
/// span exports (a span must not keep a connection's read buffer alive while it waits).
#[derive(Debug)]
pub struct FinishedSpan {
    pub ids: TraceIds,
    pub direction: Direction,
    pub start: SystemTime,
    pub duration: Duration,
    pub method: Method,
    pub path: String,
    /// The request's authority, or its Host header (HTTP/1 origin form).
    pub authority: Option<Authority>,
    pub tracestate: Option<String>,
    pub version: Version,
    /// The response status; 0 when the caller went away before one.
    pub status: u16,
    /// The gRPC status from the headers or trailers, for a gRPC call.
    pub grpc_status: Option<u16>,
    pub src: Label,
    pub dst: Label,
    pub route: Label,
    /// The authorization decision (`allow`/`deny`) and the policy that made it (inbound).
    pub authz: Option<(bool, Label)>,
    /// The endpoint that answered (outbound).
    pub endpoint: Option<SocketAddr>,
    /// Why a proxy answered a 5xx itself (`palisade-proxy-error`), if one did.
    pub proxy_error: Option<String>,
    pub cancelled: bool,
    pub decision: Decision,
}

fn bounded(b: &[u8]) -> String {
    String::from_utf8_lossy(&b[..b.len().min(MAX_VALUE)]).into_owned()
}

impl FinishedSpan {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        ids: TraceIds,
        direction: Direction,
        start: SystemTime,
        duration: Duration,
        method: &Method,
        uri: &Uri,
        host: Option<&http::HeaderValue>,
        tracestate: Option<&http::HeaderValue>,
        version: Version,
        status: u16,
        grpc_status: Option<u16>,
        labels: &crate::telemetry::RequestLabels,
        authz: Option<(bool, Label)>,
        endpoint: Option<SocketAddr>,
        proxy_error: Option<&http::HeaderValue>,
        cancelled: bool,
        decision: Decision,
    ) -> Self {
        let authority = uri.authority().cloned().or_else(|| {
            host.filter(|h| h.len() <= MAX_VALUE)
                .and_then(|h| Authority::try_from(h.as_bytes()).ok())
        });
        FinishedSpan {
            ids,
            direction,
            start,
            duration,
            method: method.clone(),
            path: bounded(uri.path().as_bytes()),
            authority,
            tracestate: tracestate.map(|t| bounded(t.as_bytes())),
            version,
            status,
            grpc_status,
            src: labels.src_identity.clone(),
            dst: labels.dst_identity.clone(),
            route: labels.route.clone(),
            authz,
            endpoint,
            proxy_error: proxy_error.map(|e| bounded(&e.as_bytes()[..e.len().min(64)])),
            cancelled,
            decision,
        }
    }

    /// Whether a request failed, and so is always kept: 5xx; for a client span any gRPC error
    /// status, for a server span the server's own ([`GRPC_SERVER_ERRORS`]); an authorization
    /// deny.
    pub fn failed(status: u16, grpc_status: Option<u16>, denied: bool, client: bool) -> bool {
        let grpc_failed = grpc_status.is_some_and(|c| {
            if client {
                c != 0
            } else {
                GRPC_SERVER_ERRORS.contains(&c)
            }
        });
        status >= 500 || grpc_failed || denied
    }
}

/// The span side of a proxy's telemetry: sampling settings, budgets, and the export queue.
pub struct Tracer {
    pub(crate) sampler: Sampler,
    slow: Duration,
    span_budget: Option<u32>,
    budgets: Budgets,
    /// None: no export; no span is built.
    tx: Option<mpsc::Sender<FinishedSpan>>,
    metrics: Arc<Metrics>,
}

impl Tracer {
    /// Propagation only: no span is built or exported.
    pub fn disabled(cfg: &TraceConfig, metrics: Arc<Metrics>) -> Tracer {
        Tracer {
            sampler: cfg.sampler.clone(),
            slow: cfg.slow,
            span_budget: cfg.span_budget,
            budgets: Budgets::default(),
            tx: None,
            metrics,
        }
    }

    /// Starts the export task when `cfg` names an endpoint (inside a Tokio runtime). An
    /// exporter that cannot be built is logged and tracing stays off: telemetry never stops
    /// the data plane.
    pub fn start(cfg: &TraceConfig, identity: &str, metrics: Arc<Metrics>) -> Tracer {
        let Some(endpoint) = cfg.otlp_endpoint.clone() else {
            return Tracer::disabled(cfg, metrics);
        };
        use opentelemetry_otlp::WithExportConfig as _;
        let mut exporter = match opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .build()
        {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(%endpoint, error = %e, "cannot export spans to this collector; tracing is off (trace context is still propagated)");
                return Tracer::disabled(cfg, metrics);
            }
        };
        // `Resource::builder` adds OTEL_RESOURCE_ATTRIBUTES; the name is the CLI's (the
        // workload's, or OTEL_SERVICE_NAME read there).
        let resource = Resource::builder()
            .with_service_name(cfg.service_name.clone())
            .with_attribute(KeyValue::new("palisade.identity", identity.to_string()))
            .build();
        exporter.set_resource(&resource);
        let (tx, rx) = mpsc::channel(cfg.queue.max(1));
        tokio::spawn(export_loop(
            exporter,
            rx,
            cfg.batch_size.max(1),
            cfg.batch_delay,
            metrics.clone(),
            endpoint,
        ));
        Tracer {
            tx: Some(tx),
            ..Tracer::disabled(cfg, metrics)
        }
    }

    /// Whether spans are built at all.
    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Whether a head-sampled request fits its route's span budget now (taking its place).
    pub fn admit(&self, policy: TracePolicy, route: &Label) -> bool {
        match policy.span_budget.or(self.span_budget) {
            Some(n) => self.budgets.take(route, n),
            None => true,
        }
    }

    /// The tail decision for a finished request, counted; `admitted` is what [`Tracer::admit`]
    /// said when its response began.
    pub fn decide(
        &self,
        ids: &TraceIds,
        admitted: bool,
        failed: bool,
        elapsed: Duration,
        policy: TracePolicy,
    ) -> Decision {
        let d = decide(
            ids.sampled,
            admitted,
            failed,
            elapsed,
            policy.slow.unwrap_or(self.slow),
        );
        self.metrics.trace_span(d);
        d
    }

    /// Queues a kept span; a full queue drops it (counted), never waits.
    pub fn export(&self, span: FinishedSpan) {
        let Some(tx) = &self.tx else { return };
        if tx.try_send(span).is_err() {
            self.metrics.trace_export("queue_full", 1);
        }
    }
}

async fn export_loop(
    exporter: opentelemetry_otlp::SpanExporter,
    mut rx: mpsc::Receiver<FinishedSpan>,
    batch_size: usize,
    delay: Duration,
    metrics: Arc<Metrics>,
    endpoint: String,
) {
    let scope = InstrumentationScope::builder("palisade-proxy")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build();
    // Logged once per outage: the first failure after a success (or at start) is a warning.
    let failing = AtomicBool::new(false);
    let mut batch = Vec::with_capacity(batch_size);
    while let Some(first) = rx.recv().await {
        batch.push(span_data(first, &scope));
        let deadline = tokio::time::sleep(delay);
        tokio::pin!(deadline);
        while batch.len() < batch_size {
            tokio::select! {
                next = rx.recv() => match next {
                    Some(s) => batch.push(span_data(s, &scope)),
                    None => break,
                },
                _ = &mut deadline => break,
            }
        }
        let n = batch.len() as u64;
        match exporter.export(std::mem::take(&mut batch)).await {
            Ok(()) => {
                metrics.trace_export("exported", n);
                if failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(%endpoint, "span export works again");
                }
            }
            Err(e) => {
                metrics.trace_export("export_failed", n);
                if !failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(%endpoint, error = %e, "span export failed; spans are dropped (counted in palisade_trace_export_spans_total) until it works again");
                }
            }
        }
        batch = Vec::with_capacity(batch_size);
    }
}

fn kv(key: &'static str, value: impl Into<opentelemetry::Value>) -> KeyValue {
    KeyValue::new(key, value)
}

/// The span as OpenTelemetry's HTTP semantic conventions (v1.26+) describe it, plus the
/// mesh's identities, authorization decision, route and endpoint.
fn span_data(s: FinishedSpan, scope: &InstrumentationScope) -> SpanData {
    let client = s.direction == Direction::outbound;
    let grpc = s.grpc_status.is_some();
    // Low-cardinality names: the method (`HTTP` for one outside RFC 9110), or for gRPC
    // `service/method` from the bounded path.
    let known = matches!(
        s.method,
        Method::GET
            | Method::HEAD
            | Method::POST
            | Method::PUT
            | Method::DELETE
            | Method::CONNECT
            | Method::OPTIONS
            | Method::TRACE
            | Method::PATCH
    );
    let name: Cow<'static, str> = if grpc {
        Cow::Owned(s.path.trim_start_matches('/').to_string())
    } else if known {
        Cow::Owned(s.method.to_string())
    } else {
        Cow::Borrowed("HTTP")
    };
    let mut attributes = Vec::with_capacity(24);
    if known {
        attributes.push(kv("http.request.method", s.method.to_string()));
    } else {
        attributes.push(kv("http.request.method", "_OTHER"));
        attributes.push(kv(
            "http.request.method_original",
            bounded(s.method.as_str().as_bytes()),
        ));
    }
    attributes.push(kv("url.scheme", "http"));
    if let Some(a) = &s.authority {
        attributes.push(kv("server.address", a.host().to_string()));
        attributes.push(kv("server.port", i64::from(a.port_u16().unwrap_or(80))));
        if client {
            attributes.push(kv("url.full", format!("http://{a}{}", s.path)));
        }
    }
    attributes.push(kv("url.path", s.path));
    if s.status != 0 {
        attributes.push(kv("http.response.status_code", i64::from(s.status)));
    }
    attributes.push(kv("network.protocol.name", "http"));
    attributes.push(kv(
        "network.protocol.version",
        match s.version {
            Version::HTTP_2 => "2",
            Version::HTTP_10 => "1.0",
            Version::HTTP_3 => "3",
            _ => "1.1",
        },
    ));
    if let Some(code) = s.grpc_status {
        attributes.push(kv("rpc.system", "grpc"));
        attributes.push(kv("rpc.grpc.status_code", i64::from(code)));
    }
    // Status: error for 5xx (client spans: 4xx too), the gRPC codes `failed` counts, a broken
    // stream; the description only where the code does not say it (a proxy's own reason).
    let http_error = s.status >= 500 || (client && s.status >= 400);
    let grpc_error = s.grpc_status.filter(|c| {
        if client {
            *c != 0
        } else {
            GRPC_SERVER_ERRORS.contains(c)
        }
    });
    let error_type = if s.cancelled {
        Some("cancelled".to_string())
    } else if let Some(reason) = &s.proxy_error {
        Some(reason.clone())
    } else if http_error {
        Some(s.status.to_string())
    } else {
        grpc_error.map(|c| c.to_string())
    };
    if let Some(e) = &error_type {
        attributes.push(kv("error.type", e.clone()));
    }
    attributes.push(kv("palisade.source.identity", s.src.0.to_string()));
    attributes.push(kv("palisade.destination.identity", s.dst.0.to_string()));
    if let Some((allowed, policy)) = &s.authz {
        attributes.push(kv(
            "palisade.authz.decision",
            if *allowed { "allow" } else { "deny" },
        ));
        attributes.push(kv("palisade.authz.policy", policy.0.to_string()));
    }
    if !s.route.0.is_empty() {
        attributes.push(kv("palisade.route", s.route.0.to_string()));
    }
    if let Some(ep) = s.endpoint {
        attributes.push(kv("palisade.endpoint", ep.to_string()));
        attributes.push(kv("network.peer.address", ep.ip().to_string()));
        attributes.push(kv("network.peer.port", i64::from(ep.port())));
    }
    attributes.push(kv("palisade.sampling.reason", s.decision.reason()));
    let status = if http_error || grpc_error.is_some() || s.proxy_error.is_some() {
        Status::Error {
            description: s.proxy_error.map_or(Cow::Borrowed(""), Cow::Owned),
        }
    } else {
        Status::Unset
    };
    let trace_state = s
        .tracestate
        .as_deref()
        .and_then(|t| t.parse::<TraceState>().ok())
        .unwrap_or(TraceState::NONE);
    SpanData {
        span_context: SpanContext::new(
            TraceId::from_bytes(s.ids.trace_id),
            SpanId::from_bytes(s.ids.span_id),
            TraceFlags::SAMPLED,
            false,
            trace_state,
        ),
        parent_span_id: s
            .ids
            .parent_span_id
            .map_or(SpanId::INVALID, SpanId::from_bytes),
        parent_span_is_remote: s.ids.parent_span_id.is_some(),
        span_kind: if client {
            SpanKind::Client
        } else {
            SpanKind::Server
        },
        name,
        start_time: s.start,
        end_time: s.start + s.duration,
        attributes,
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status,
        instrumentation_scope: scope.clone(),
    }
}
