//! Traces: one OpenTelemetry span per request on each proxy (a client span for the app's
//! outbound request, a server span for an inbound one), exported over OTLP/gRPC.
//!
//! - [`context`] continues or starts the W3C trace of each request (B3 accepted) and makes the
//!   head decision: the caller's sampled flag, or for a new trace a consistent-probability
//!   decision whose threshold is written to `tracestate` (`ot=th:…`), so every later hop and
//!   collector agree on it.
//! - [`sampler`] makes the tail decision when the response has ended: failed (5xx, gRPC error,
//!   authorization deny) and slow requests are always kept; ordinary sampled ones within the
//!   route's span budget. The proxy copies nothing for a request until then: a dropped span
//!   costs no copy of the request.
//! - [`export`] batches kept spans through a bounded queue to the OTLP exporter; a slow or dead
//!   collector drops spans (counted) and never holds a request.

pub mod context;
pub mod export;
pub mod sampler;

use std::time::Duration;

pub use context::{TraceContextLayer, TraceIds};
pub use export::{FinishedSpan, Tracer};
pub use sampler::Sampler;

/// What a route (or its service) says about its spans (span budget, slow threshold), as the
/// wire carries it. The stage that matched the route attaches it to the response, so the
/// telemetry layer reads it without a lookup.
pub use palisade_api::trace::TracePolicy;

/// Tracing settings of a proxy process (the `OTEL_*` variables, read by the CLI).
#[derive(Clone, Debug)]
pub struct TraceConfig {
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` (or `_TRACES_ENDPOINT`): where spans go. None: no span is
    /// built or exported (trace context is still propagated).
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the spans: `OTEL_SERVICE_NAME`, else the workload's name.
    pub service_name: String,
    /// `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`.
    pub sampler: Sampler,
    /// Requests slower than this are always kept (`PALISADE_TRACE_SLOW`, default 1s).
    pub slow: Duration,
    /// Ordinary sampled spans kept per second per route (`PALISADE_TRACE_SPAN_BUDGET`);
    /// None: no budget.
    pub span_budget: Option<u32>,
    /// Finished spans waiting for export (`OTEL_BSP_MAX_QUEUE_SIZE`); past it, spans are
    /// dropped and counted.
    pub queue: usize,
    /// Most spans per export call (`OTEL_BSP_MAX_EXPORT_BATCH_SIZE`).
    pub batch_size: usize,
    /// Longest wait before a partial batch is sent (`OTEL_BSP_SCHEDULE_DELAY`).
    pub batch_delay: Duration,
}

impl Default for TraceConfig {
    fn default() -> Self {
        TraceConfig {
            otlp_endpoint: None,
            service_name: String::new(),
            sampler: Sampler::default(),
            slow: Duration::from_secs(1),
            span_budget: None,
            queue: 2048,
            batch_size: 512,
            batch_delay: Duration::from_secs(1),
        }
    }
}
