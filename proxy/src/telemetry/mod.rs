//! Telemetry of the proxy: Prometheus metrics with the names and labels of the spec (here),
//! the per-request layer that records metrics, spans, cost and the access log
//! ([`request`]), and cost attribution ([`cost`]).
//!
//! Label values are `Arc<str>` handles created once per connection (identities) or static
//! strings, so recording a request clones reference counts and never allocates.

pub mod cost;
pub mod request;

pub use request::{Observed, TelemetryLayer};

use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::exemplar::HistogramWithExemplars;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// A cheaply clonable label value.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Label(pub Arc<str>);

impl Label {
    pub fn new(s: &str) -> Self {
        Label(Arc::from(s))
    }

    /// Equal, by pointer first: the labels of one connection's requests are the same `Arc`s.
    pub fn same(&self, other: &Label) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0 == other.0
    }
}

impl From<&str> for Label {
    fn from(s: &str) -> Self {
        Label::new(s)
    }
}

impl EncodeLabelValue for Label {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(&self.0)
    }
}

/// `inbound` (traffic to this workload) or `outbound` (traffic from its app).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Direction {
    inbound,
    outbound,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub direction: Direction,
    pub src_identity: Label,
    pub dst_identity: Label,
    pub status_code: u16,
    /// The matched route rule, `namespace/name/rule`; empty when no route applies.
    pub route: Label,
}

/// An injected fault, by its HTTPFault (`namespace/name`) and what it did.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FaultLabels {
    pub fault: Label,
    /// `delay` or `abort`.
    pub kind: &'static str,
}

/// A request answered 429 by a local rate limit.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RateLimitLabels {
    /// The RateLimitPolicy, `namespace/name`.
    pub policy: Label,
    /// The caller's identity (`unknown` for plaintext).
    pub src_identity: Label,
    /// `total`, `identity` or `override`.
    pub limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    pub direction: Direction,
    pub src_identity: Label,
    pub dst_identity: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirLabels {
    pub direction: Direction,
}

/// An mTLS connection between proxies, by the key exchange it negotiated.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsLabels {
    pub direction: Direction,
    /// `X25519MLKEM768` (post-quantum hybrid), `X25519`, … (TLS group names).
    pub group: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub direction: Direction,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DstLabels {
    pub dst_identity: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthzLabels {
    pub decision: &'static str,
    pub policy: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

/// A refused admin request: which endpoint, and why (`remote`, `web_page`, `foreign_host`,
/// `disabled`, `missing_header`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdminRefusedLabels {
    pub endpoint: &'static str,
    pub reason: &'static str,
}

/// A connection to a destination outside the mesh (egress), by the egress policy's decision
/// and what the proxy saw of it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EgressLabels {
    /// `allow` or `deny`.
    pub decision: &'static str,
    /// `tls`, `http` or `tcp` (anything else, or not inspected).
    pub protocol: &'static str,
}

/// A trace id as an exemplar label value: 32 hex digits written straight to the encoder.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct TraceIdHex(pub [u8; 16]);

impl EncodeLabelValue for TraceIdHex {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        for b in self.0 {
            write!(encoder, "{b:02x}")?;
        }
        Ok(())
    }
}

/// The exemplar of a latency observation: the sampled trace it belongs to.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TraceExemplar {
    pub trace_id: TraceIdHex,
}

/// A span kept or dropped by the tail decision.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SpanLabels {
    /// `kept` or `dropped`.
    pub decision: &'static str,
    /// kept: `sampled`, `error`, `slow`; dropped: `not_sampled`, `budget`.
    pub reason: &'static str,
}

pub type LatencyHistogram = HistogramWithExemplars<TraceExemplar>;

fn latency_histogram() -> LatencyHistogram {
    HistogramWithExemplars::new(
        [
            0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]
        .into_iter(),
    )
}

/// Every metric the proxy exports. One instance per proxy, shared by `Arc`.
pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    /// With the trace id of a sampled request as exemplar (OpenMetrics scrapes only).
    pub request_duration: Family<RequestLabels, LatencyHistogram, fn() -> LatencyHistogram>,
    pub tcp_connections: Family<ConnLabels, Counter>,
    pub tcp_open: Family<DirLabels, Gauge>,
    pub tcp_bytes: Family<DirLabels, Counter>,
    pub tls_connections: Family<TlsLabels, Counter>,
    pub tls_handshake_errors: Family<ReasonLabels, Counter>,
    pub refused: Family<ReasonLabels, Counter>,
    pub requests_refused: Family<ReasonLabels, Counter>,
    /// Client HTTP connections the proxy ended on an error of the client's, by reason.
    pub http_connection_errors: Family<ReasonLabels, Counter>,
    /// Admin requests refused for who asked (`/shutdown`, `/tap`, `/config`, `/traffic`).
    pub admin_refused: Family<AdminRefusedLabels, Counter>,
    pub endpoint_ejections: Family<DstLabels, Counter>,
    pub authz_decisions: Family<AuthzLabels, Counter>,
    pub cert_expiry: Gauge,
    pub renewals: Family<ResultLabels, Counter>,
    pub config_updates: Family<ResultLabels, Counter>,
    pub config_version: Gauge,
    /// Requests the proxy answered itself because something failed, by reason.
    pub proxy_errors: Family<ReasonLabels, Counter>,
    /// Retries by result (`retried`, `budget_exhausted`, `gave_up`).
    pub retries: Family<ResultLabels, Counter>,
    /// Original destinations resolved on demand, by result.
    pub lookups: Family<ResultLabels, Counter>,
    pub on_demand_services: Gauge,
    pub on_demand_evictions: Counter,
    pub faults: Family<FaultLabels, Counter>,
    /// Mirrored requests by result (`sent`, `skipped`: a body too large or of unknown length).
    pub mirrors: Family<ResultLabels, Counter>,
    pub rate_limited: Family<RateLimitLabels, Counter>,
    /// Egress connections by decision and protocol.
    pub egress_connections: Family<EgressLabels, Counter>,
    /// DNS lookups of egress names by result (`ok`, `nxdomain`, `error`), cache hits included.
    pub dns_lookups: Family<ResultLabels, Counter>,
    /// Finished requests' spans by the tail decision.
    pub trace_spans: Family<SpanLabels, Counter>,
    /// Kept spans by what became of them (`exported`, `queue_full`, `export_failed`).
    pub trace_export: Family<ResultLabels, Counter>,
    /// When this proxy started (unix seconds): the window of its cumulative counters.
    pub start_time: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Requests, bytes and CPU by caller, callee and route.
    pub cost: Arc<cost::Cost>,
    /// The requests flowing now, for whoever taps the admin port (`/tap`).
    pub tap: Arc<crate::tap::Tap>,
    /// What inbound authorization has seen recently, for `palisade policy what-if`.
    pub summary: Arc<crate::summary::TrafficSummary>,
    registry: Registry,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::default();
        let m = Metrics {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(latency_histogram),
            tcp_connections: Family::default(),
            tcp_open: Family::default(),
            tcp_bytes: Family::default(),
            tls_connections: Family::default(),
            tls_handshake_errors: Family::default(),
            refused: Family::default(),
            requests_refused: Family::default(),
            http_connection_errors: Family::default(),
            admin_refused: Family::default(),
            endpoint_ejections: Family::default(),
            authz_decisions: Family::default(),
            cert_expiry: Gauge::default(),
            renewals: Family::default(),
            config_updates: Family::default(),
            config_version: Gauge::default(),
            proxy_errors: Family::default(),
            retries: Family::default(),
            lookups: Family::default(),
            on_demand_services: Gauge::default(),
            on_demand_evictions: Counter::default(),
            faults: Family::default(),
            mirrors: Family::default(),
            rate_limited: Family::default(),
            egress_connections: Family::default(),
            dns_lookups: Family::default(),
            trace_spans: Family::default(),
            trace_export: Family::default(),
            start_time: Gauge::default(),
            cost: Arc::new(cost::Cost::default()),
            tap: Arc::default(),
            summary: Arc::default(),
            registry: Registry::default(),
        };
        m.start_time.set(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        );
        registry.register(
            "palisade_trace_spans",
            "Spans of finished requests by the tail sampling decision: kept (sampled, error, slow) or dropped (not_sampled, budget)",
            m.trace_spans.clone(),
        );
        registry.register(
            "palisade_trace_export_spans",
            "Kept spans by what became of them: exported, queue_full (dropped: the export queue was full), export_failed (dropped: the collector refused or was unreachable)",
            m.trace_export.clone(),
        );
        registry.register(
            "palisade_proxy_start_time_seconds",
            "When this proxy started, in unix seconds",
            m.start_time.clone(),
        );
        registry.register_collector(Box::new(m.cost.clone()));
        m.tap.register(&mut registry);
        m.summary.register(&mut registry);
        registry.register(
            "palisade_egress_connections",
            "Connections from the app to destinations outside the mesh (egress, no mTLS), by the egress policy's decision and protocol (tls, http, tcp)",
            m.egress_connections.clone(),
        );
        registry.register(
            "palisade_dns_lookups",
            "DNS lookups of egress hostnames the proxy asked for, answered from the cache or a name server, by result (ok, nxdomain: no such name or no address, error)",
            m.dns_lookups.clone(),
        );
        registry.register(
            "palisade_faults_injected",
            "Requests an HTTPFault delayed or aborted, by fault and kind",
            m.faults.clone(),
        );
        registry.register(
            "palisade_route_mirrors",
            "Requests copied to a RequestMirror backend, by result",
            m.mirrors.clone(),
        );
        registry.register(
            "palisade_rate_limited",
            "Requests answered 429 by a RateLimitPolicy, by policy, caller and limit",
            m.rate_limited.clone(),
        );
        registry.register(
            "palisade_requests",
            "HTTP requests handled",
            m.requests.clone(),
        );
        registry.register(
            "palisade_request_duration_seconds",
            "HTTP request latency, until response headers",
            m.request_duration.clone(),
        );
        registry.register(
            "palisade_tcp_connections",
            "TCP connections accepted (inbound) or opened for the app (outbound)",
            m.tcp_connections.clone(),
        );
        registry.register(
            "palisade_tcp_open_connections",
            "TCP connections currently open",
            m.tcp_open.clone(),
        );
        registry.register(
            "palisade_tcp_bytes",
            "Bytes proxied on opaque TCP connections",
            m.tcp_bytes.clone(),
        );
        registry.register(
            "palisade_tls_connections",
            "mTLS connections established between proxies, by negotiated key exchange group",
            m.tls_connections.clone(),
        );
        registry.register(
            "palisade_tls_handshake_errors",
            "Failed mTLS handshakes, by reason",
            m.tls_handshake_errors.clone(),
        );
        registry.register(
            "palisade_connections_refused",
            "Connections closed before proxying, by reason",
            m.refused.clone(),
        );
        registry.register(
            "palisade_admin_refused",
            "Admin requests refused for who asked, by endpoint (shutdown, tap, config, traffic) and reason (remote: not loopback; web_page: an Origin header; foreign_host: a rebound Host; disabled; missing_header)",
            m.admin_refused.clone(),
        );
        registry.register(
            "palisade_http_connection_errors",
            "Client HTTP connections the proxy closed on the client's error, by reason (h2_enhance_your_calm: rapid reset or too many provoked resets; h2_compression, h2_frame_size, h2_protocol: a bad or oversized header block; header_too_large; header_timeout; bad_http1)",
            m.http_connection_errors.clone(),
        );
        registry.register(
            "palisade_requests_refused",
            "HTTP requests answered 400 before the stack read them, by reason",
            m.requests_refused.clone(),
        );
        registry.register(
            "palisade_endpoint_ejections",
            "Endpoints taken out of rotation after failures, by the identity they serve",
            m.endpoint_ejections.clone(),
        );
        registry.register(
            "palisade_authz_decisions",
            "Authorization decisions, by decision and deciding policy",
            m.authz_decisions.clone(),
        );
        registry.register(
            "palisade_identity_cert_expiry_timestamp_seconds",
            "NotAfter of the certificate in use",
            m.cert_expiry.clone(),
        );
        registry.register(
            "palisade_identity_renewals",
            "Certificate renewals, by result",
            m.renewals.clone(),
        );
        registry.register(
            "palisade_config_updates",
            "Config snapshots received, by result",
            m.config_updates.clone(),
        );
        registry.register(
            "palisade_proxy_errors",
            "Requests the proxy answered itself because something failed (502, 503, 504, or gRPC UNAVAILABLE / DEADLINE_EXCEEDED), by reason",
            m.proxy_errors.clone(),
        );
        registry.register(
            "palisade_retries",
            "Retries of failed requests by result: retried (sent again), budget_exhausted (not sent: the retry budget is spent), gave_up (attempts used up)",
            m.retries.clone(),
        );
        registry.register(
            "palisade_outbound_lookups",
            "Original destinations resolved on demand through the control plane, by result",
            m.lookups.clone(),
        );
        registry.register(
            "palisade_outbound_on_demand_services",
            "Services held because the app dialled them (transparent mode)",
            m.on_demand_services.clone(),
        );
        registry.register(
            "palisade_outbound_on_demand_evictions",
            "Services released past the on-demand cap, least recently dialled first",
            m.on_demand_evictions.clone(),
        );
        registry.register(
            "palisade_config_version",
            "Version of the config snapshot in force",
            m.config_version.clone(),
        );
        Arc::new(Metrics { registry, ..m })
    }

    /// Every metric, without exemplars: for scrapers that did not ask for OpenMetrics (the
    /// Prometheus 0.0.4 text format has none) and for tests.
    pub fn encode(&self) -> String {
        self.encode_with(false)
    }

    /// OpenMetrics text of every metric; `exemplars: false` leaves exemplars out.
    pub fn encode_with(&self, exemplars: bool) -> String {
        self.cost.tick();
        let mut out = String::with_capacity(8192);
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        if !exemplars {
            out = without_exemplars(&out);
        }
        out
    }

    pub fn trace_span(&self, d: crate::trace::sampler::Decision) {
        self.trace_spans
            .get_or_create(&SpanLabels {
                decision: if d.kept() { "kept" } else { "dropped" },
                reason: d.reason(),
            })
            .inc();
    }

    pub fn trace_export(&self, result: &'static str, n: u64) {
        self.trace_export
            .get_or_create(&ResultLabels { result })
            .inc_by(n);
    }

    pub fn refuse(&self, direction: Direction, reason: &'static str) {
        self.refused
            .get_or_create(&ReasonLabels { direction, reason })
            .inc();
    }

    pub fn proxy_error(&self, direction: Direction, reason: &'static str) {
        self.proxy_errors
            .get_or_create(&ReasonLabels { direction, reason })
            .inc();
    }

    pub fn egress(&self, decision: &'static str, protocol: &'static str) {
        self.egress_connections
            .get_or_create(&EgressLabels { decision, protocol })
            .inc();
    }

    pub fn dns_lookup(&self, result: &'static str) {
        self.dns_lookups
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    pub fn retry(&self, result: &'static str) {
        self.retries.get_or_create(&ResultLabels { result }).inc();
    }

    pub fn admin_refused(&self, endpoint: &'static str, reason: &'static str) {
        self.admin_refused
            .get_or_create(&AdminRefusedLabels { endpoint, reason })
            .inc();
    }

    pub fn http_connection_error(&self, direction: Direction, reason: &'static str) {
        self.http_connection_errors
            .get_or_create(&ReasonLabels { direction, reason })
            .inc();
    }

    pub fn refuse_request(&self, direction: Direction, reason: &'static str) {
        self.requests_refused
            .get_or_create(&ReasonLabels { direction, reason })
            .inc();
    }

    pub fn endpoint_ejected(&self, dst: &Label) {
        self.endpoint_ejections
            .get_or_create(&DstLabels {
                dst_identity: dst.clone(),
            })
            .inc();
    }

    pub fn tls_connection(&self, direction: Direction, conn: &rustls::CommonState) {
        self.tls_connections
            .get_or_create(&TlsLabels {
                direction,
                group: kx_group_name(conn),
            })
            .inc();
    }

    pub fn handshake_error(&self, direction: Direction, reason: &'static str) {
        self.tls_handshake_errors
            .get_or_create(&ReasonLabels { direction, reason })
            .inc();
    }
}

/// The exposition with each sample's exemplar (` # {labels} value [timestamp]` after the
/// value) removed. The exemplar is looked for only after the sample's label set, read with its
/// quoting, so a label value that contains ` # {` (a route's name) is left whole.
fn without_exemplars(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let sample = if line.starts_with('#') {
            line
        } else {
            let after_labels = labels_end(line);
            line[after_labels..]
                .find(" # {")
                .map_or(line, |i| &line[..after_labels + i])
        };
        out.push_str(sample);
        out.push('\n');
    }
    out
}

/// Where a sample line's label set ends (0 when it has none), skipping quoted values.
fn labels_end(line: &str) -> usize {
    let b = line.as_bytes();
    let Some(open) = b.iter().position(|&c| c == b'{' || c == b' ') else {
        return 0;
    };
    if b[open] != b'{' {
        return 0;
    }
    let (mut i, mut quoted) = (open + 1, false);
    while i < b.len() {
        match b[i] {
            b'\\' if quoted => i += 1,
            b'"' => quoted = !quoted,
            b'}' if !quoted => return i + 1,
            _ => {}
        }
        i += 1;
    }
    b.len()
}

/// Keeps `palisade_tcp_open_connections` right even when a connection task is cancelled.
pub struct OpenConnGuard {
    gauge: Gauge,
}

impl OpenConnGuard {
    pub fn new(metrics: &Metrics, direction: Direction) -> Self {
        let gauge = metrics
            .tcp_open
            .get_or_create(&DirLabels { direction })
            .clone();
        gauge.inc();
        OpenConnGuard { gauge }
    }
}

impl Drop for OpenConnGuard {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// The TLS name of the key exchange group a connection negotiated.
pub fn kx_group_name(conn: &rustls::CommonState) -> &'static str {
    use rustls::NamedGroup;
    match conn.negotiated_key_exchange_group().map(|g| g.name()) {
        Some(NamedGroup::X25519MLKEM768) => "X25519MLKEM768",
        Some(NamedGroup::X25519) => "X25519",
        Some(NamedGroup::secp256r1) => "secp256r1",
        Some(NamedGroup::secp384r1) => "secp384r1",
        Some(_) => "other",
        None => "none",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exemplars_are_cut_after_the_labels_only() {
        let text = "# TYPE x histogram\n\
            x_bucket{route=\"a # {b\",le=\"0.5\"} 3 # {trace_id=\"ab\"} 0.2\n\
            x_bucket{route=\"q\\\" # {\",le=\"+Inf\"} 4\n\
            x_count 4 # {trace_id=\"cd\"} 0.1 1700000000.0\n";
        assert_eq!(
            without_exemplars(text),
            "# TYPE x histogram\n\
            x_bucket{route=\"a # {b\",le=\"0.5\"} 3\n\
            x_bucket{route=\"q\\\" # {\",le=\"+Inf\"} 4\n\
            x_count 4\n"
        );
    }
}
