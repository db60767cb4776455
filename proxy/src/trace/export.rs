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

/// Why the span pipeline could not start.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("OTLP exporter for {endpoint}: {source}")]
    Exporter {
        endpoint: String,
        source: opentelemetry_otlp::ExporterBuildError,
    },
}

/// One request as this proxy saw it, waiting for export.
#[derive(Debug)]
pub struct FinishedSpan {
    pub ids: TraceIds,
    pub direction: Direction,
    pub start: SystemTime,
    pub duration: Duration,
    pub method: Method,
    pub uri: Uri,
    /// The Host header when the URI has no authority (HTTP/1 origin form).
    pub host: Option<http::HeaderValue>,
    pub version: Version,
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
    /// Why this proxy answered itself (`palisade-proxy-error`), if it did.
    pub proxy_error: Option<http::HeaderValue>,
    pub decision: Decision,
}

impl FinishedSpan {
    /// 5xx, a gRPC error status, or an authorization deny: always kept.
    pub fn failed(status: u16, grpc_status: Option<u16>, denied: bool) -> bool {
        status >= 500 || grpc_status.is_some_and(|c| c != 0) || denied
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

    /// Starts the export task when `cfg` names an endpoint (inside a Tokio runtime).
    pub fn start(
        cfg: &TraceConfig,
        identity: &str,
        metrics: Arc<Metrics>,
    ) -> Result<Tracer, TraceError> {
        let Some(endpoint) = cfg.otlp_endpoint.clone() else {
            return Ok(Tracer::disabled(cfg, metrics));
        };
        use opentelemetry_otlp::WithExportConfig as _;
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .build()
            .map_err(|source| TraceError::Exporter {
                endpoint: endpoint.clone(),
                source,
            })?;
        // `Resource::builder` reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; the
        // workload's name stands in for a service name nobody set.
        let mut resource = Resource::builder();
        if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name(cfg.service_name.clone());
        }
        let resource = resource
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
        Ok(Tracer {
            tx: Some(tx),
            ..Tracer::disabled(cfg, metrics)
        })
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
    let path = s.uri.path();
    let route = (!s.route.0.is_empty()).then(|| s.route.0.to_string());
    let name: Cow<'static, str> = if grpc {
        Cow::Owned(path.trim_start_matches('/').to_string())
    } else {
        match &route {
            Some(r) => Cow::Owned(format!("{} {r}", s.method)),
            None => Cow::Owned(s.method.to_string()),
        }
    };
    let mut attributes = Vec::with_capacity(20);
    attributes.push(kv("http.request.method", s.method.to_string()));
    attributes.push(kv("url.path", path.to_string()));
    attributes.push(kv("url.scheme", "http"));
    let authority = s.uri.authority().cloned().or_else(|| {
        s.host
            .as_ref()
            .and_then(|h| Authority::try_from(h.as_bytes()).ok())
    });
    if let Some(a) = &authority {
        attributes.push(kv("server.address", a.host().to_string()));
        if let Some(p) = a.port_u16() {
            attributes.push(kv("server.port", i64::from(p)));
        }
        if client {
            attributes.push(kv("url.full", format!("http://{a}{path}")));
        }
    }
    attributes.push(kv("http.response.status_code", i64::from(s.status)));
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
    if let Some(r) = &route {
        attributes.push(kv("http.route", r.clone()));
    }
    if let Some(code) = s.grpc_status {
        attributes.push(kv("rpc.system", "grpc"));
        attributes.push(kv("rpc.grpc.status_code", i64::from(code)));
    }
    let server_error = s.status >= 500 || (client && s.status >= 400);
    let error = match (&s.proxy_error, server_error, s.grpc_status) {
        (Some(reason), _, _) => Some(String::from_utf8_lossy(reason.as_bytes()).into_owned()),
        (None, true, _) => Some(s.status.to_string()),
        (None, false, Some(c)) if c != 0 => Some(c.to_string()),
        _ => None,
    };
    if let Some(e) = &error {
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
    if let Some(r) = route {
        attributes.push(kv("palisade.route", r));
    }
    if let Some(ep) = s.endpoint {
        attributes.push(kv("palisade.endpoint", ep.to_string()));
        attributes.push(kv("network.peer.address", ep.ip().to_string()));
        attributes.push(kv("network.peer.port", i64::from(ep.port())));
    }
    attributes.push(kv("palisade.sampling.reason", s.decision.reason()));
    let status = match error {
        Some(description) => Status::Error {
            description: Cow::Owned(description),
        },
        None => Status::Unset,
    };
    SpanData {
        span_context: SpanContext::new(
            TraceId::from_bytes(s.ids.trace_id),
            SpanId::from_bytes(s.ids.span_id),
            TraceFlags::SAMPLED,
            false,
            TraceState::NONE,
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
