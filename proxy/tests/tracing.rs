//! OpenTelemetry spans end to end: a caller's proxy (`web`) and a callee's proxy (`api`) in
//! front of a test app, each exporting over OTLP/gRPC to a trace receiver inside the test.
//!
//! - One CLIENT span (web) and one SERVER span (api) per request, in one trace with the
//!   caller's and the app's spans, with the HTTP semantic-convention and mesh attributes.
//! - A dead collector never fails a request; the lost spans are counted.
//! - Head sampling at 1% keeps about that share of ordinary requests, while every failed and
//!   slow request is kept; every finished request is counted as kept or dropped.
//! - The per-route span budget caps ordinary spans, never failed ones.
//! - Latency exemplars carry the trace id, for OpenMetrics scrapes only.
//! - A gRPC error in the trailers keeps the span even when nothing is head-sampled.

mod support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode as SpanStatus;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, Span};
use palisade_proxy::Proxy;
use palisade_proxy::trace::{Sampler, TraceConfig};
use support::*;
use tokio::net::TcpListener;

/// How often a bounded wait looks again, and how many times at most.
const POLL: Duration = Duration::from_millis(20);
const MAX_POLLS: u32 = 2_000;

// ---------------------------------------------------------------------------------------------
// The OTLP/gRPC trace receiver

/// Every `ResourceSpans` the proxies exported, in arrival order.
#[derive(Clone, Default)]
struct Collector {
    got: Arc<Mutex<Vec<ResourceSpans>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans = req.into_inner().resource_spans;
        self.got.lock().expect("collector").extend(spans);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// A trace receiver on a loopback port.
async fn collector() -> (SocketAddr, Collector) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind collector");
    let addr = listener.local_addr().expect("collector addr");
    let c = Collector::default();
    let incoming = futures_util::stream::unfold(listener, |l| async move {
        let r = l.accept().await.map(|(s, _)| s);
        Some((r, l))
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(c.clone()))
            .serve_with_incoming(incoming),
    );
    (addr, c)
}

/// One received span with its resource.
#[derive(Clone, Debug)]
struct Got {
    /// The resource's `service.name`.
    service: String,
    /// The resource's `palisade.identity`.
    identity: String,
    span: Span,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

fn find<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

impl Got {
    fn attr(&self, key: &str) -> Option<&Value> {
        find(&self.span.attributes, key)
    }

    fn str(&self, key: &str) -> Option<&str> {
        match self.attr(key) {
            Some(Value::StringValue(s)) => Some(s),
            _ => None,
        }
    }

    fn int(&self, key: &str) -> Option<i64> {
        match self.attr(key) {
            Some(Value::IntValue(i)) => Some(*i),
            _ => None,
        }
    }

    fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }

    fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }

    /// Empty for a root span.
    fn parent_id(&self) -> String {
        hex(&self.span.parent_span_id)
    }

    fn kind(&self) -> SpanKind {
        SpanKind::try_from(self.span.kind).unwrap_or(SpanKind::Unspecified)
    }

    fn status(&self) -> SpanStatus {
        self.span
            .status
            .as_ref()
            .and_then(|s| SpanStatus::try_from(s.code).ok())
            .unwrap_or(SpanStatus::Unset)
    }

    fn duration(&self) -> Duration {
        Duration::from_nanos(
            self.span
                .end_time_unix_nano
                .saturating_sub(self.span.start_time_unix_nano),
        )
    }

    fn reason(&self) -> &str {
        self.str("palisade.sampling.reason").unwrap_or("")
    }
}

impl Collector {
    fn spans(&self) -> Vec<Got> {
        let got = self.got.lock().expect("collector");
        let mut out = Vec::new();
        for rs in got.iter() {
            let attrs = rs
                .resource
                .as_ref()
                .map_or(&[][..], |r| r.attributes.as_slice());
            let text = |k: &str| match find(attrs, k) {
                Some(Value::StringValue(s)) => s.clone(),
                _ => String::new(),
            };
            for ss in &rs.scope_spans {
                for span in &ss.spans {
                    out.push(Got {
                        service: text("service.name"),
                        identity: text("palisade.identity"),
                        span: span.clone(),
                    });
                }
            }
        }
        out
    }

    /// The spans of one proxy, by its `service.name`.
    fn of(&self, service: &str) -> Vec<Got> {
        self.spans()
            .into_iter()
            .filter(|g| g.service == service)
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Waiting, metrics

/// Polls `check` until it returns Ok, at most [`MAX_POLLS`] times and for [`WAIT`]; fails the
/// test with the last reason it gave.
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + WAIT;
    let mut last = String::new();
    for _ in 0..MAX_POLLS {
        match check().await {
            Ok(v) => return v,
            Err(why) => last = why,
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    panic!("{what}: not reached within {WAIT:?}: {last}")
}

/// `/metrics` from the admin port, as a Prometheus (`openmetrics: false`) or OpenMetrics
/// scraper asks for it.
async fn scrape(p: &Proxy, openmetrics: bool) -> String {
    let mut c = h1_client(p.admin_addr).await;
    let mut b = Request::get("/metrics").header(http::header::HOST, "localhost");
    if openmetrics {
        b = b.header(
            http::header::ACCEPT,
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        );
    }
    let r = h1_send(&mut c, b.body(empty()).expect("scrape request"))
        .await
        .expect("scrape");
    assert_eq!(r.status, StatusCode::OK);
    String::from_utf8(r.body.to_vec()).expect("metrics are text")
}

/// The span counters of a proxy.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct SpanCounts {
    sampled: f64,
    error: f64,
    slow: f64,
    not_sampled: f64,
    budget: f64,
    exported: f64,
    queue_full: f64,
    export_failed: f64,
}

impl SpanCounts {
    fn kept(&self) -> f64 {
        self.sampled + self.error + self.slow
    }

    fn finished(&self) -> f64 {
        self.kept() + self.not_sampled + self.budget
    }
}

async fn span_counts(p: &Proxy) -> SpanCounts {
    let text = scrape(p, false).await;
    let spans = |decision, reason| {
        metric_in(
            &text,
            "palisade_trace_spans_total",
            &[("decision", decision), ("reason", reason)],
        )
    };
    let export = |result| {
        metric_in(
            &text,
            "palisade_trace_export_spans_total",
            &[("result", result)],
        )
    };
    SpanCounts {
        sampled: spans("kept", "sampled"),
        error: spans("kept", "error"),
        slow: spans("kept", "slow"),
        not_sampled: spans("dropped", "not_sampled"),
        budget: spans("dropped", "budget"),
        exported: export("exported"),
        queue_full: export("queue_full"),
        export_failed: export("export_failed"),
    }
}

/// Waits until `p` has decided `requests` spans and exported every kept one, and the collector
/// holds exactly those; returns the counters and the spans.
async fn settled(p: &Proxy, c: &Collector, service: &str, requests: f64) -> (SpanCounts, Vec<Got>) {
    eventually(
        &format!("{service}: every span decided and exported"),
        || async {
            let n = span_counts(p).await;
            let spans = c.of(service);
            if n.finished() == requests
                && n.exported == n.kept()
                && spans.len() as f64 == n.exported
            {
                Ok((n, spans))
            } else {
                Err(format!(
                    "{n:?} ({} spans received, {requests} requests)",
                    spans.len()
                ))
            }
        },
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// The app and the proxies

/// The app behind `api`'s proxy (HTTP/1.1 and HTTP/2): reports the `traceparent` and
/// `tracestate` it received as `x-echo-traceparent` / `x-echo-tracestate`; `/fail` answers
/// 500, `/slow` answers after [`SLOW_APP`], a path under `/test.Echo/` answers as a gRPC
/// server (`Fail`: `grpc-status: 13` in the trailers, else 0), anything else 200.
async fn app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
    let addr = listener.local_addr().expect("app addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), hyper::service::service_fn(answer))
                    .await;
            });
        }
    });
    addr
}

const SLOW_APP: Duration = Duration::from_millis(80);
/// The `slow` threshold of the sampling test: below [`SLOW_APP`].
const SLOW: Duration = Duration::from_millis(50);

async fn answer(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let mut rsp = Response::builder();
    for (name, echo) in [
        ("traceparent", "x-echo-traceparent"),
        ("tracestate", "x-echo-tracestate"),
    ] {
        if let Some(v) = req.headers().get(name) {
            rsp = rsp.header(echo, v.clone());
        }
    }
    let _ = req.into_body().collect().await;
    if let Some(method) = path.strip_prefix("/test.Echo/") {
        let mut trailers = HeaderMap::new();
        let code = if method == "Fail" { "13" } else { "0" };
        trailers.insert("grpc-status", HeaderValue::from_static(code));
        if code != "0" {
            trailers.insert("grpc-message", HeaderValue::from_static("boom"));
        }
        // One empty message, then the status in the trailers.
        let body = chunked(&[0, 0, 0, 0, 0], 5, Some(trailers));
        return Ok(rsp
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .body(body)
            .expect("gRPC response"));
    }
    let status = match path.as_str() {
        "/fail" => StatusCode::INTERNAL_SERVER_ERROR,
        "/slow" => {
            tokio::time::sleep(SLOW_APP).await;
            StatusCode::OK
        }
        _ => StatusCode::OK,
    };
    Ok(rsp.status(status).body(full("ok\n")).expect("response"))
}

/// Tracing settings for a test proxy: export to `endpoint` every 100 ms, no budget, and a
/// `slow` threshold no test request reaches unless the test lowers it.
fn traced(endpoint: SocketAddr, service: &str, sampler: Sampler) -> TraceConfig {
    TraceConfig {
        otlp_endpoint: Some(format!("http://{endpoint}")),
        service_name: service.to_string(),
        sampler,
        slow: Duration::from_secs(10),
        span_budget: None,
        queue: 4096,
        batch_size: 512,
        batch_delay: Duration::from_millis(100),
    }
}

/// web (caller's proxy) -> mTLS -> api (callee's proxy) -> app.
struct Pair {
    _pki: Pki,
    web: Proxy,
    api: Proxy,
    /// Where the caller connects for `api.demo:8080` on web's proxy.
    up: SocketAddr,
}

/// The HTTPRoute of the chain test: `/echo…` is rule 0 of `demo/echo`.
const ECHO_ROUTE: &str = "routes:\n- apiVersion: gateway.networking.k8s.io/v1\n  kind: HTTPRoute\n  metadata: { name: echo, namespace: demo }\n  spec:\n    parentRefs: [ { group: \"\", kind: Service, name: api, port: 8080 } ]\n    rules:\n      - matches: [ { path: { type: PathPrefix, value: /echo } } ]\n";

async fn pair(app: SocketAddr, web: TraceConfig, api: TraceConfig, routes: &str) -> Pair {
    init();
    let pki = Pki::new();
    let yaml = "mode: STRICT\nappProtocol: detect\nservices: []\n";
    let mut cfg = proxy_config(&pki, "api", API, Some(app), &[], yaml);
    cfg.tracing = api;
    let api = within(Proxy::start(cfg)).await.expect("api proxy");
    let yaml = format!(
        "mode: STRICT\nservices:\n\
         - name: api.demo\n  port: 8080\n  protocol: detect\n  endpoints:\n\
         \x20   - {{ address: \"{}\", identity: \"{API}\" }}\n{routes}",
        api.inbound_addr
    );
    let mut cfg = proxy_config(&pki, "web", WEB, None, &[SERVICE], &yaml);
    cfg.tracing = web;
    let web = within(Proxy::start(cfg)).await.expect("web proxy");
    assert!(web.is_ready() && api.is_ready(), "proxies not ready");
    let up = upstream_addr(&web, SERVICE);
    Pair {
        _pki: pki,
        web,
        api,
        up,
    }
}

fn request(path: &str, headers: &[(&str, &str)]) -> Request<Body> {
    let mut b = Request::get(path).header(http::header::HOST, "api.demo:8080");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(empty()).expect("request")
}

/// The `traceparent` the app received: (trace id, parent id, sampled).
fn app_traceparent(r: &Reply) -> (String, String, bool) {
    let tp = r
        .header("x-echo-traceparent")
        .expect("the app got a traceparent");
    let p: Vec<&str> = tp.split('-').collect();
    assert_eq!(p.len(), 4, "{tp}");
    assert_eq!((p[0], p[1].len(), p[2].len()), ("00", 32, 16), "{tp}");
    (p[1].to_string(), p[2].to_string(), p[3] == "01")
}

/// Sends every path of `paths` (with no trace context) over `conns` HTTP/1.1 connections at
/// once; returns each path with its reply, in no particular order.
async fn send_all(up: SocketAddr, paths: Vec<String>, conns: usize) -> Vec<(String, Reply)> {
    let mut lanes: Vec<Vec<String>> = vec![Vec::new(); conns];
    for (i, p) in paths.into_iter().enumerate() {
        lanes[i % conns].push(p);
    }
    let mut tasks = Vec::new();
    for lane in lanes {
        tasks.push(tokio::spawn(async move {
            let mut c = h1_client(up).await;
            let mut out = Vec::with_capacity(lane.len());
            for p in lane {
                let r = h1_send(&mut c, request(&p, &[]))
                    .await
                    .unwrap_or_else(|e| panic!("{p}: {e}"));
                out.push((p, r));
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(within_for(Duration::from_secs(120), t).await.expect("lane"));
    }
    all
}

/// The randomness of a trace: the low 56 bits of its id.
fn randomness(trace_id: &str) -> u64 {
    u64::from_str_radix(&trace_id[18..], 16).expect("hex trace id")
}

/// The consistent-probability head decision for a new trace at `ratio`: its randomness at or
/// above the rejection threshold `(1 - ratio) * 2^56` (give or take the rounding of the last
/// of 56 bits, which no test trace id falls on in practice).
fn head_sampled(trace_id: &str, ratio: f64) -> bool {
    let threshold = (1u64 << 56) - ((1u64 << 56) as f64 * ratio).round() as u64;
    randomness(trace_id) >= threshold
}

/// The rejection threshold of `tracestate: ot=th:<1 to 14 hex digits>` (trailing zeros
/// dropped).
fn threshold_of(tracestate: &str) -> Option<u64> {
    let th = tracestate.strip_prefix("ot=th:")?;
    if th.is_empty() || th.len() > 14 {
        return None;
    }
    let padded = format!("{th:0<14}");
    u64::from_str_radix(&padded, 16).ok()
}

// ---------------------------------------------------------------------------------------------
// Tests

/// The rejection threshold of a ratio, as OpenTelemetry writes it in `tracestate` (the
/// collector's `pkg/sampling` `ProbabilityToThreshold`, whose 1% is the spec's example
/// `th:fd70a3d70a3d71`): `2^56 - round(ratio * 2^56)`, 14 hex digits, trailing zeros dropped.
#[test]
fn the_threshold_is_written_as_opentelemetry_writes_it() {
    for (ratio, th) in [
        (0.5, "8"),
        (0.25, "c"),
        (0.1, "e6666666666666"),
        (0.05, "f3333333333333"),
        (0.01, "fd70a3d70a3d71"),
        (0.001, "ffbe76c8b43958"),
    ] {
        let s = Sampler::new(true, ratio);
        let got = s
            .tracestate()
            .map(|v| v.to_str().expect("ascii").to_string());
        assert_eq!(got, Some(format!("ot=th:{th}")), "ratio {ratio}");
    }
    // And the decision agrees with what is written: randomness just below 1%'s threshold
    // is not sampled.
    let mut id = [0x11u8; 16];
    id[9..].copy_from_slice(&0xfd70a3d70a3d70u64.to_be_bytes()[1..]);
    assert!(
        !Sampler::new(false, 0.01).samples(id),
        "below th:fd70a3d70a3d71"
    );
    id[9..].copy_from_slice(&0xfd70a3d70a3d71u64.to_be_bytes()[1..]);
    assert!(
        Sampler::new(false, 0.01).samples(id),
        "at th:fd70a3d70a3d71"
    );
}

const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_through_two_proxies_is_one_trace_of_a_client_and_a_server_span() {
    let (otlp, c) = collector().await;
    let m = pair(
        app().await,
        traced(otlp, "web", Sampler::default()),
        traced(otlp, "api", Sampler::default()),
        ECHO_ROUTE,
    )
    .await;
    let mut conn = h1_client(m.up).await;

    // The calling app sends its own span as parent, on a route.
    let continued = h1_send(
        &mut conn,
        request(
            "/echo/a",
            &[("traceparent", TP), ("tracestate", "vendor=x")],
        ),
    )
    .await
    .expect("response");
    assert_eq!(continued.status, StatusCode::OK);
    let (seen_trace, seen_parent, seen_sampled) = app_traceparent(&continued);
    assert_eq!(seen_trace, "4bf92f3577b34da6a3ce929d0e0e4736");
    assert!(seen_sampled);
    assert_eq!(continued.header("x-echo-tracestate"), Some("vendor=x"));

    // No trace context: web's proxy starts the trace.
    let started = h1_send(&mut conn, request("/echo/b", &[]))
        .await
        .expect("response");
    assert_eq!(started.status, StatusCode::OK);
    let (new_trace, new_parent, new_sampled) = app_traceparent(&started);
    assert_ne!(new_trace, seen_trace);
    assert!(new_sampled, "ratio 1 samples every new trace");
    assert_eq!(
        started.header("x-echo-tracestate"),
        None,
        "no threshold is written at ratio 1"
    );

    let (web_n, web_spans) = settled(&m.web, &c, "web", 2.0).await;
    let (api_n, api_spans) = settled(&m.api, &c, "api", 2.0).await;
    assert_eq!(
        (web_n.sampled, api_n.sampled),
        (2.0, 2.0),
        "{web_n:?} {api_n:?}"
    );
    assert_eq!(
        c.spans().len(),
        4,
        "no span of anyone else: {:?}",
        c.spans()
    );

    let one = |spans: &[Got], trace: &str| -> Got {
        let found: Vec<&Got> = spans.iter().filter(|g| g.trace_id() == trace).collect();
        assert_eq!(found.len(), 1, "one span in trace {trace}: {found:#?}");
        found[0].clone()
    };
    let api_ep = m.api.inbound_addr.to_string();

    // --- The continued trace, on the `demo/echo` route.
    let client = one(&web_spans, &seen_trace);
    let server = one(&api_spans, &seen_trace);
    assert_eq!(client.kind(), SpanKind::Client);
    assert_eq!(server.kind(), SpanKind::Server);
    assert_eq!(
        client.parent_id(),
        "00f067aa0ba902b7",
        "the calling app's span is the client span's parent"
    );
    assert_eq!(server.parent_id(), client.span_id());
    assert_eq!(
        seen_parent,
        server.span_id(),
        "the app's parent is the server span"
    );
    assert_ne!(client.span_id(), server.span_id());
    for (g, service, identity) in [(&client, "web", WEB), (&server, "api", API)] {
        assert_eq!(g.service, service, "service.name");
        assert_eq!(g.identity, identity, "palisade.identity");
        assert_eq!(g.str("http.request.method"), Some("GET"), "{service}");
        assert_eq!(g.str("url.path"), Some("/echo/a"), "{service}");
        assert_eq!(g.str("url.scheme"), Some("http"), "{service}");
        assert_eq!(g.int("http.response.status_code"), Some(200), "{service}");
        assert_eq!(g.str("palisade.source.identity"), Some(WEB), "{service}");
        assert_eq!(
            g.str("palisade.destination.identity"),
            Some(API),
            "{service}"
        );
        assert_eq!(
            g.str("palisade.sampling.reason"),
            Some("sampled"),
            "{service}"
        );
        assert_eq!(g.attr("error.type"), None, "{service}");
        assert_eq!(g.status(), SpanStatus::Unset, "{service}");
        assert!(g.span.end_time_unix_nano >= g.span.start_time_unix_nano);
        assert!(g.span.start_time_unix_nano > 0);
    }
    // The caller's side: the route it took, the endpoint that answered. (The URL it asked
    // for: `the_client_span_names_the_url_the_app_asked_for`.)
    assert_eq!(client.str("network.protocol.version"), Some("1.1"));
    // `http.route` is a path template in the conventions; the rule id is only `palisade.route`.
    assert_eq!(client.str("http.route"), None);
    assert_eq!(client.str("palisade.route"), Some("demo/echo/0"));
    assert_eq!(client.str("palisade.endpoint"), Some(api_ep.as_str()));
    assert_eq!(client.attr("palisade.authz.decision"), None);
    // The callee's side: what arrived over the mesh hop (HTTP/2) and who allowed it.
    assert_eq!(
        server.str("server.address"),
        Some("api.demo"),
        "{server:#?}"
    );
    assert_eq!(server.int("server.port"), Some(8080), "{server:#?}");
    assert_eq!(server.str("network.protocol.version"), Some("2"));
    assert_eq!(server.str("palisade.authz.decision"), Some("allow"));
    assert_eq!(server.str("palisade.authz.policy"), Some("default_policy"));
    assert_eq!(server.attr("palisade.endpoint"), None);

    // --- The trace web's proxy started: the client span is its root.
    let client = one(&web_spans, &new_trace);
    let server = one(&api_spans, &new_trace);
    assert_eq!(client.kind(), SpanKind::Client);
    assert_eq!(server.kind(), SpanKind::Server);
    assert_eq!(
        client.parent_id(),
        "",
        "a new trace's first span has no parent"
    );
    assert_eq!(server.parent_id(), client.span_id());
    assert_eq!(new_parent, server.span_id());
    assert_eq!(client.str("url.path"), Some("/echo/b"));
    assert_eq!(client.str("palisade.route"), Some("demo/echo/0"));
    assert_eq!(client.str("palisade.endpoint"), Some(api_ep.as_str()));
    assert_eq!(server.str("palisade.authz.decision"), Some("allow"));
}

/// `server.address`, `server.port` and `url.full` of the CLIENT span (required by the HTTP
/// semantic conventions) come from the URL the app asked for: the `Host` header of an
/// HTTP/1.1 request (origin-form target), the `:authority` of an HTTP/2 one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_span_names_the_url_the_app_asked_for() {
    let (otlp, c) = collector().await;
    let m = pair(
        app().await,
        traced(otlp, "web", Sampler::default()),
        traced(otlp, "api", Sampler::default()),
        "",
    )
    .await;
    let mut h1 = h1_client(m.up).await;
    let r = h1_send(&mut h1, request("/v1/items", &[]))
        .await
        .expect("HTTP/1.1");
    assert_eq!(r.status, StatusCode::OK);
    let h1_trace = app_traceparent(&r).0;
    let mut h2 = h2_client(m.up).await;
    let req = Request::get("http://api.demo:8080/v2/items")
        .body(empty())
        .expect("request");
    let r = h2_send(&mut h2, req).await.expect("HTTP/2");
    assert_eq!(r.status, StatusCode::OK);
    let h2_trace = app_traceparent(&r).0;

    let (_, spans) = settled(&m.web, &c, "web", 2.0).await;
    let mut problems = Vec::new();
    for (trace, version, path) in [
        (&h1_trace, "1.1", "/v1/items"),
        (&h2_trace, "2", "/v2/items"),
    ] {
        let g = spans
            .iter()
            .find(|g| &g.trace_id() == trace)
            .unwrap_or_else(|| panic!("HTTP/{version}: no span: {spans:#?}"));
        assert_eq!(g.str("network.protocol.version"), Some(version));
        assert_eq!(g.str("url.path"), Some(path));
        let full = format!("http://api.demo:8080{path}");
        let got = (
            g.str("server.address"),
            g.int("server.port"),
            g.str("url.full"),
        );
        if got != (Some("api.demo"), Some(8080), Some(full.as_str())) {
            problems.push(format!(
                "HTTP/{version}: (server.address, server.port, url.full) = {got:?}, expected \
                 (\"api.demo\", 8080, {full:?})"
            ));
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_collector_fails_no_request_and_the_lost_spans_are_counted() {
    // A port nothing listens on.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let m = pair(
        app().await,
        traced(dead, "web", Sampler::default()),
        traced(dead, "api", Sampler::default()),
        "",
    )
    .await;
    let started = Instant::now();
    let replies = send_all(m.up, (0..200).map(|i| format!("/r/{i}")).collect(), 4).await;
    let took = started.elapsed();
    assert_eq!(replies.len(), 200);
    for (p, r) in &replies {
        assert_eq!(r.status, StatusCode::OK, "{p}");
    }
    for (name, p) in [("web", &m.web), ("api", &m.api)] {
        let n = eventually(&format!("{name}: lost spans counted"), || async {
            let n = span_counts(p).await;
            if n.export_failed + n.queue_full > 0.0 && n.finished() == 200.0 {
                Ok(n)
            } else {
                Err(format!("{n:?}"))
            }
        })
        .await;
        assert_eq!(n.kept(), 200.0, "{name}: {n:?}");
        assert_eq!(
            n.exported, 0.0,
            "{name}: nothing reached a collector: {n:?}"
        );
    }
    eprintln!("200 requests with a dead collector in {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_percent_of_ordinary_traces_and_every_failed_or_slow_one_are_kept() {
    const RATIO: f64 = 0.01;
    const ORDINARY: usize = 1000;
    const FAIL: usize = 20;
    const SLOWS: usize = 10;
    let (otlp, c) = collector().await;
    let cfg = |name: &str| TraceConfig {
        slow: SLOW,
        // A budget far above what 1% of the traffic needs: it must not drop anything.
        span_budget: Some(1000),
        ..traced(otlp, name, Sampler::new(true, RATIO))
    };
    let m = pair(app().await, cfg("web"), cfg("api"), "").await;

    // Failed and slow requests spread through the ordinary ones (never 7 failures in a row:
    // that would eject the only endpoint).
    let mut paths = Vec::new();
    for i in 0..ORDINARY {
        paths.push(format!("/ok/{i}"));
        if i % (ORDINARY / FAIL) == 7 {
            paths.push("/fail".to_string());
        }
        if i % (ORDINARY / SLOWS) == 42 {
            paths.push("/slow".to_string());
        }
    }
    let total = paths.len();
    assert_eq!(total, ORDINARY + FAIL + SLOWS);
    let replies = send_all(m.up, paths, 4).await;
    assert_eq!(replies.len(), total);

    // The head decision, as the app saw it: consistent with the trace id, and the threshold
    // in `tracestate` for the sampled ones.
    let mut by_trace: HashMap<String, (&str, bool)> = HashMap::new();
    let mut head_kept_ordinary = Vec::new();
    for (p, r) in &replies {
        let want = if p == "/fail" {
            StatusCode::INTERNAL_SERVER_ERROR
        } else {
            StatusCode::OK
        };
        assert_eq!(r.status, want, "{p}");
        let (trace, _, sampled) = app_traceparent(r);
        assert_eq!(
            sampled,
            head_sampled(&trace, RATIO),
            "{p}: the sampled flag of trace {trace} follows its randomness"
        );
        // A sampled new trace carries the threshold it was sampled with, and its randomness
        // is at or above it. (Its exact spelling: `the_threshold_is_written_as_...`.)
        match r.header("x-echo-tracestate") {
            Some(ts) if sampled => {
                let th = threshold_of(ts).unwrap_or_else(|| panic!("{p}: {ts}"));
                assert!(randomness(&trace) >= th, "{p}: {trace} below {ts}");
                let want = (1u64 << 56) - ((1u64 << 56) as f64 * RATIO).round() as u64;
                assert!(want.abs_diff(th) <= 1, "{p}: {ts} is no 1% threshold");
            }
            ts => assert_eq!(ts, None, "{p}: sampled {sampled}"),
        }
        let kind = match p.as_str() {
            "/fail" => "fail",
            "/slow" => "slow",
            _ => "ok",
        };
        if kind == "ok" && sampled {
            head_kept_ordinary.push(trace.clone());
        }
        assert!(
            by_trace.insert(trace, (kind, sampled)).is_none(),
            "trace ids are unique"
        );
    }

    // A bound the ordinary sampled spans stay under but with a chance below 1e-9: the mean
    // of Binomial(1000, 1%) plus 6 standard deviations.
    let n = ORDINARY as f64;
    let bound = (n * RATIO + 6.0 * (n * RATIO * (1.0 - RATIO)).sqrt()).ceil();
    assert!(
        head_kept_ordinary.len() as f64 <= bound,
        "{} of {ORDINARY} head-sampled at {RATIO}",
        head_kept_ordinary.len()
    );

    for (name, p) in [("web", &m.web), ("api", &m.api)] {
        let (counts, spans) = settled(p, &c, name, total as f64).await;
        assert_eq!(
            counts.budget, 0.0,
            "{name}: the budget is not reached: {counts:?}"
        );
        assert_eq!(counts.error, FAIL as f64, "{name}: {counts:?}");
        let mut seen: HashMap<&str, usize> = HashMap::new();
        let mut spans_by_trace = HashMap::new();
        for g in &spans {
            let (kind, sampled) = *by_trace
                .get(&g.trace_id())
                .unwrap_or_else(|| panic!("{name}: a span of no request sent: {g:#?}"));
            assert!(
                spans_by_trace.insert(g.trace_id(), g).is_none(),
                "{name}: one span per request"
            );
            *seen.entry(kind).or_default() += 1;
            let reason = g.reason();
            match kind {
                "fail" => {
                    assert_eq!(reason, "error", "{name}: {g:#?}");
                    assert_eq!(g.status(), SpanStatus::Error, "{name}: {g:#?}");
                    assert_eq!(g.int("http.response.status_code"), Some(500));
                    assert_eq!(g.str("error.type"), Some("500"), "{name}: {g:#?}");
                }
                "slow" => {
                    assert_eq!(reason, "slow", "{name}: {g:#?}");
                    assert!(g.duration() >= SLOW_APP, "{name}: {:?}", g.duration());
                    assert_eq!(g.status(), SpanStatus::Unset);
                }
                _ => match reason {
                    "sampled" => {
                        assert!(sampled, "{name}: an unsampled ordinary span was kept");
                        assert!(g.duration() < SLOW, "{name}: {g:#?}");
                    }
                    // A scheduling hiccup on a busy machine: slow is slow.
                    "slow" => assert!(g.duration() >= SLOW, "{name}: {g:#?}"),
                    other => panic!("{name}: ordinary span kept as {other:?}: {g:#?}"),
                },
            }
        }
        assert_eq!(
            seen.get("fail").copied(),
            Some(FAIL),
            "{name}: a span per /fail"
        );
        assert_eq!(
            seen.get("slow").copied(),
            Some(SLOWS),
            "{name}: a span per /slow"
        );
        // Every head-sampled ordinary request kept (as sampled, or slow), none other but slow.
        for t in &head_kept_ordinary {
            assert!(
                spans_by_trace.contains_key(t),
                "{name}: sampled trace {t} was not exported"
            );
        }
        let ordinary = seen.get("ok").copied().unwrap_or(0);
        let ordinary_slow = ordinary as f64 - counts.sampled;
        assert!(
            counts.sampled <= bound,
            "{name}: {} ordinary sampled spans, bound {bound}",
            counts.sampled
        );
        assert_eq!(
            counts.slow,
            SLOWS as f64 + ordinary_slow,
            "{name}: {counts:?}"
        );
        // The rest of the ordinary requests are counted as dropped, not sampled.
        assert_eq!(
            counts.not_sampled,
            ORDINARY as f64 - ordinary as f64,
            "{name}: {counts:?}"
        );
        eprintln!(
            "{name}: {counts:?}; {} ordinary head-sampled (bound {bound})",
            head_kept_ordinary.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_span_budget_caps_ordinary_spans_and_never_failed_ones() {
    const BUDGET: u32 = 5;
    const BURST: usize = 100;
    let (otlp, c) = collector().await;
    let cfg = |name: &str| TraceConfig {
        span_budget: Some(BUDGET),
        ..traced(otlp, name, Sampler::new(true, 1.0))
    };
    let m = pair(app().await, cfg("web"), cfg("api"), "").await;

    // Open the connections (and the mTLS one between the proxies) with requests that are not
    // sampled, so they spend no budget.
    const CONNS: usize = 4;
    let mut conns = Vec::new();
    for _ in 0..CONNS {
        let mut conn = h1_client(m.up).await;
        let unsampled = TP.replace("-01", "-00");
        let r = h1_send(&mut conn, request("/warm", &[("traceparent", &unsampled)]))
            .await
            .expect("warm-up");
        assert_eq!(r.status, StatusCode::OK);
        conns.push(conn);
    }

    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, mut conn) in conns.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for k in 0..BURST / CONNS {
                // One failure, in the middle of the burst.
                let path = if i == 0 && k == BURST / CONNS / 2 {
                    "/fail".to_string()
                } else {
                    format!("/burst/{i}/{k}")
                };
                let r = h1_send(&mut conn, request(&path, &[]))
                    .await
                    .unwrap_or_else(|e| panic!("{path}: {e}"));
                out.push((path, r));
            }
            out
        }));
    }
    let mut replies = Vec::new();
    for t in tasks {
        replies.extend(within(t).await.expect("lane"));
    }
    let elapsed = started.elapsed();
    assert_eq!(replies.len(), BURST);
    let mut fail_trace = None;
    for (p, r) in &replies {
        if p == "/fail" {
            assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
            fail_trace = Some(app_traceparent(r).0);
        } else {
            assert_eq!(r.status, StatusCode::OK, "{p}");
        }
    }
    let fail_trace = fail_trace.expect("the /fail request");

    // GCRA: a burst of BUDGET, then BUDGET a second.
    let bound = f64::from(BUDGET) + elapsed.as_secs_f64() * f64::from(BUDGET) + 1.0;
    let ordinary = (BURST - 1) as f64;
    for (name, p) in [("web", &m.web), ("api", &m.api)] {
        let (counts, spans) = settled(p, &c, name, (BURST + CONNS) as f64).await;
        assert_eq!(
            counts.not_sampled, CONNS as f64,
            "{name}: the warm-ups: {counts:?}"
        );
        assert_eq!(counts.error, 1.0, "{name}: {counts:?}");
        assert_eq!(counts.slow, 0.0, "{name}: {counts:?}");
        assert!(
            counts.sampled >= 1.0 && counts.sampled <= bound,
            "{name}: {} ordinary spans kept in {elapsed:?}, bound {bound}: {counts:?}",
            counts.sampled
        );
        assert_eq!(
            counts.budget,
            ordinary - counts.sampled,
            "{name}: the rest dropped for the budget: {counts:?}"
        );
        let failed: Vec<&Got> = spans.iter().filter(|g| g.reason() == "error").collect();
        assert_eq!(failed.len(), 1, "{name}: {failed:#?}");
        assert_eq!(failed[0].trace_id(), fail_trace);
        assert_eq!(failed[0].str("url.path"), Some("/fail"));
        let kept_ordinary = spans
            .iter()
            .filter(|g| g.reason() == "sampled" && g.str("url.path") != Some("/fail"))
            .count();
        assert_eq!(kept_ordinary as f64, counts.sampled, "{name}");
        eprintln!("{name}: {counts:?} for a burst of {BURST} in {elapsed:?} (bound {bound})");
    }
}

/// `trace_id` exemplars of the latency histogram in an OpenMetrics exposition.
fn exemplar_trace_ids(text: &str) -> Vec<String> {
    let mut ids = Vec::new();
    for line in text.lines() {
        if !line.starts_with("palisade_request_duration_seconds_bucket") {
            continue;
        }
        let Some((_, ex)) = line.split_once(" # {trace_id=\"") else {
            continue;
        };
        let (id, rest) = ex.split_once("\"}").expect("exemplar labels end");
        assert_eq!(id.len(), 32, "{line}");
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
            "{line}"
        );
        let value = rest.split_whitespace().next().expect("exemplar value");
        let v: f64 = value.parse().expect("exemplar value is a number");
        assert!((0.0..10.0).contains(&v), "{line}");
        ids.push(id.to_string());
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_exemplars_name_exported_traces_for_openmetrics_scrapes_only() {
    let (otlp, c) = collector().await;
    let m = pair(
        app().await,
        traced(otlp, "web", Sampler::default()),
        traced(otlp, "api", Sampler::default()),
        "",
    )
    .await;
    let replies = send_all(m.up, (0..10).map(|i| format!("/x/{i}")).collect(), 2).await;
    for (p, r) in &replies {
        assert_eq!(r.status, StatusCode::OK, "{p}");
    }
    for (name, p) in [("web", &m.web), ("api", &m.api)] {
        let (_, spans) = settled(p, &c, name, 10.0).await;
        let exported: Vec<String> = spans.iter().map(Got::trace_id).collect();

        let om = scrape(p, true).await;
        let ids = exemplar_trace_ids(&om);
        assert!(!ids.is_empty(), "{name}: no exemplar:\n{om}");
        for id in &ids {
            assert!(
                exported.contains(id),
                "{name}: exemplar {id} is no exported trace: {exported:?}"
            );
        }

        for g in &spans {
            assert_eq!(g.attr("http.route"), None, "{name}: no route is configured");
            assert_eq!(g.attr("palisade.route"), None, "{name}");
        }

        let plain = scrape(p, false).await;
        assert!(
            metric_in(&plain, "palisade_request_duration_seconds_count", &[]) >= 10.0,
            "{name}: the histogram is there:\n{plain}"
        );
        assert!(
            !plain.contains("trace_id") && !plain.contains(" # {"),
            "{name}: an exemplar in a plain scrape:\n{plain}"
        );
        for id in &ids {
            assert!(
                !plain.contains(id.as_str()),
                "{name}: {id} in a plain scrape"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_error_in_the_trailers_keeps_an_unsampled_span() {
    let (otlp, c) = collector().await;
    // Nothing is head-sampled.
    let m = pair(
        app().await,
        traced(otlp, "web", Sampler::new(true, 0.0)),
        traced(otlp, "api", Sampler::new(true, 0.0)),
        "",
    )
    .await;
    let mut conn = h2_client(m.up).await;
    let call = |method: &str| {
        Request::post(format!("http://api.demo:8080/test.Echo/{method}"))
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header("te", "trailers")
            .body(full(Bytes::from_static(&[0, 0, 0, 0, 0])))
            .expect("gRPC request")
    };
    // A call that succeeds is dropped (not sampled), one that fails in its trailers is kept.
    let ok = h2_send(&mut conn, call("Ok")).await.expect("Ok");
    let failed = h2_send(&mut conn, call("Fail")).await.expect("Fail");
    for (r, code) in [(&ok, "0"), (&failed, "13")] {
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.header("content-type"), Some("application/grpc"));
        assert!(r.header("grpc-status").is_none(), "not trailers-only");
        let t = r.trailers.as_ref().expect("trailers");
        assert_eq!(
            t.get("grpc-status").map(|v| v.as_bytes()),
            Some(code.as_bytes())
        );
    }
    let (trace, _, sampled) = app_traceparent(&failed);
    assert!(!sampled, "ratio 0 samples nothing");

    for (name, p, kind) in [
        ("web", &m.web, SpanKind::Client),
        ("api", &m.api, SpanKind::Server),
    ] {
        let (counts, spans) = settled(p, &c, name, 2.0).await;
        assert_eq!(counts.not_sampled, 1.0, "{name}: the Ok call: {counts:?}");
        assert_eq!(counts.error, 1.0, "{name}: {counts:?}");
        assert_eq!(spans.len(), 1, "{name}: {spans:#?}");
        let g = &spans[0];
        assert_eq!(g.trace_id(), trace, "{name}");
        assert_eq!(g.kind(), kind, "{name}");
        assert_eq!(g.span.name, "test.Echo/Fail", "{name}");
        assert_eq!(g.reason(), "error", "{name}: {g:#?}");
        assert_eq!(g.str("rpc.system"), Some("grpc"), "{name}: {g:#?}");
        assert_eq!(g.int("rpc.grpc.status_code"), Some(13), "{name}: {g:#?}");
        assert_eq!(g.int("http.response.status_code"), Some(200), "{name}");
        assert_eq!(g.str("error.type"), Some("13"), "{name}: {g:#?}");
        assert_eq!(g.status(), SpanStatus::Error, "{name}: {g:#?}");
        assert_eq!(g.str("network.protocol.version"), Some("2"), "{name}");
    }
}
