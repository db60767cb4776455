//! Traces from a running local mesh, as a user sees them: `palisade up --otlp ENDPOINT` on the
//! demo mesh (web -> api -> db, the demo apps, the demo policies) sends every proxy's spans to
//! an OTLP/gRPC collector (here a small receiver in the test), one trace across the proxies a
//! request crosses; a bad `--otlp` is refused before anything starts; and a collector that is
//! down fails no request and is counted in `palisade_trace_export_spans_total`.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, Span};
use support::*;

// ---------------------------------------------------------------------------------------------
// The OTLP/gRPC trace receiver

/// Every `ResourceSpans` exported to it, in arrival order.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<ResourceSpans>>>);

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans = req.into_inner().resource_spans;
        self.0.lock().expect("collector").extend(spans);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// A trace receiver on a loopback port, served by its own runtime until dropped.
struct Collector {
    addr: SocketAddr,
    got: Received,
    _rt: tokio::runtime::Runtime,
}

impl Collector {
    fn start() -> Collector {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("collector runtime");
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind collector");
        let addr = listener.local_addr().expect("collector addr");
        let got = Received::default();
        let incoming = futures_util::stream::unfold(listener, |l| async move {
            Some((l.accept().await.map(|(s, _)| s), l))
        });
        rt.spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(got.clone()))
                .serve_with_incoming(incoming),
        );
        Collector { addr, got, _rt: rt }
    }

    fn spans(&self) -> Vec<Got> {
        let got = self.got.0.lock().expect("collector");
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
}

/// One received span with its resource's `service.name` and `palisade.identity`.
#[derive(Clone, Debug)]
struct Got {
    service: String,
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
    fn str(&self, key: &str) -> Option<&str> {
        match find(&self.span.attributes, key) {
            Some(Value::StringValue(s)) => Some(s),
            _ => None,
        }
    }

    fn int(&self, key: &str) -> Option<i64> {
        match find(&self.span.attributes, key) {
            Some(Value::IntValue(i)) => Some(*i),
            _ => None,
        }
    }

    fn kind(&self) -> SpanKind {
        SpanKind::try_from(self.span.kind).unwrap_or(SpanKind::Unspecified)
    }

    fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }

    fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }

    fn parent_id(&self) -> String {
        hex(&self.span.parent_span_id)
    }

    fn brief(&self) -> String {
        format!(
            "{} {:?} trace={} span={} parent={} {:?} {:?} src={:?} dst={:?} authz={:?} status={:?}",
            self.service,
            self.kind(),
            self.trace_id(),
            self.span_id(),
            self.parent_id(),
            self.str("http.request.method"),
            self.str("url.path"),
            self.str("palisade.source.identity"),
            self.str("palisade.destination.identity"),
            self.str("palisade.authz.decision"),
            self.int("http.response.status_code"),
        )
    }
}

fn briefs(spans: &[Got]) -> String {
    spans.iter().map(|g| g.brief() + "\n").collect()
}

// ---------------------------------------------------------------------------------------------
// The demo mesh

/// The shape of deploy/local/mesh.yaml (web -> api -> db) on free ports, with its policies.
fn demo() -> MeshSpec {
    MeshSpec {
        lifetime: "1h",
        default_policy: "allow",
        workloads: vec![
            WorkloadSpec::demo(
                "web",
                "app: web",
                vec![("api.demo", 8080), ("db.demo", 5432)],
            ),
            WorkloadSpec::demo("api", "app: api", vec![("db.demo", 5432)]),
            WorkloadSpec::demo("db", "app: db", vec![]),
        ],
        services: vec![
            ("api", 8080, "app: api", "http"),
            ("db", 5432, "app: db", "http"),
        ],
    }
}

const POLICIES: &[(&str, &str)] = &[
    (
        "api.yaml",
        include_str!("../deploy/local/policies/api.yaml"),
    ),
    ("db.yaml", include_str!("../deploy/local/policies/db.yaml")),
    (
        "mesh.yaml",
        include_str!("../deploy/local/policies/mesh.yaml"),
    ),
];

/// Starts `palisade up --otlp ENDPOINT` on the demo mesh and waits for `mesh ready`.
fn up_with_otlp(endpoint: &str) -> Mesh {
    let spec = demo();
    let ports = spec.allocate();
    let mut mesh = spec.launch_with(free_port(), ports, POLICIES, &["--otlp", endpoint]);
    mesh.wait_line("mesh ready", Duration::from_secs(90));
    mesh
}

/// A workload's entry in mesh.json: (SPIFFE ID, app address, inbound address).
fn entry(mesh: &Mesh, name: &str) -> (String, SocketAddr, String) {
    let json = mesh.mesh_json();
    let w = json["workloads"]
        .as_array()
        .expect("workloads")
        .iter()
        .find(|w| w["name"] == name)
        .unwrap_or_else(|| panic!("{name} in mesh.json: {json}"));
    let id = w["spiffeId"].as_str().expect("spiffeId").to_string();
    let app = w["appAddr"]
        .as_str()
        .expect("appAddr")
        .parse()
        .expect("appAddr is ip:port");
    let inbound = w["inboundAddr"].as_str().expect("inboundAddr").to_string();
    (id, app, inbound)
}

/// Polls `check` every 50 ms until it gives Ok or `timeout` passes; then fails the test with
/// the last reason it gave.
fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(v) => return v,
            Err(why) if Instant::now() >= deadline => {
                panic!("{what}: not within {timeout:?}: {why}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// The first (client span at `from`, server span at `to`) of one trace, the server span a child
/// of the client span.
fn hop(spans: &[Got], from: &str, to: &str) -> Option<(Got, Got)> {
    spans
        .iter()
        .filter(|c| c.service == from && c.kind() == SpanKind::Client)
        .find_map(|c| {
            spans
                .iter()
                .find(|s| {
                    s.service == to
                        && s.kind() == SpanKind::Server
                        && s.trace_id() == c.trace_id()
                        && s.parent_id() == c.span_id()
                })
                .map(|s| (c.clone(), s.clone()))
        })
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn up_with_otlp_exports_one_trace_per_request_across_the_proxies() {
    let collector = Collector::start();
    let started = Instant::now();
    let mesh = up_with_otlp(&format!("http://{}", collector.addr));
    let (web_id, web_app, _) = entry(&mesh, "web");
    let (api_id, _, api_inbound) = entry(&mesh, "api");
    let (db_id, _, _) = entry(&mesh, "db");
    eprintln!("mesh ready in {:?}", started.elapsed());

    // web -> api: allowed.
    let (status, body) = http_get(web_app, "/call/api").expect("web's app");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("hello from api"), "{body}");
    let (client, server) = wait_for("web's client span and api's server span", WAIT, || {
        let spans = collector.spans();
        hop(&spans, "web", "api").ok_or_else(|| briefs(&spans))
    });
    for g in [&client, &server] {
        let span = g.brief();
        assert_eq!(g.trace_id().len(), 32, "{span}");
        assert_ne!(g.trace_id(), "0".repeat(32), "{span}");
        assert_eq!(g.str("palisade.source.identity"), Some(&*web_id), "{span}");
        assert_eq!(
            g.str("palisade.destination.identity"),
            Some(&*api_id),
            "{span}"
        );
        assert_eq!(g.str("http.request.method"), Some("GET"), "{span}");
        assert_eq!(g.int("http.response.status_code"), Some(200), "{span}");
    }
    assert_eq!(
        client.identity,
        web_id,
        "web's resource: {}",
        client.brief()
    );
    assert_eq!(
        server.identity,
        api_id,
        "api's resource: {}",
        server.brief()
    );
    assert_eq!(
        server.str("palisade.authz.decision"),
        Some("allow"),
        "{}",
        server.brief()
    );
    assert_eq!(
        server.str("palisade.authz.policy"),
        Some("demo/api-from-web"),
        "{}",
        server.brief()
    );
    assert_eq!(
        client.str("palisade.endpoint"),
        Some(&*api_inbound),
        "the endpoint that answered: {}",
        client.brief()
    );

    // web -> db: denied at db's proxy (db accepts api only); a denial is always kept.
    let (status, body) = http_get(web_app, "/call/db").expect("web's app");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("RBAC: access denied"), "{body}");
    let (client, server) = wait_for("web's client span and db's server span", WAIT, || {
        let spans = collector.spans();
        hop(&spans, "web", "db").ok_or_else(|| briefs(&spans))
    });
    for g in [&client, &server] {
        let span = g.brief();
        assert_eq!(g.str("palisade.source.identity"), Some(&*web_id), "{span}");
        assert_eq!(
            g.str("palisade.destination.identity"),
            Some(&*db_id),
            "{span}"
        );
        assert_eq!(g.int("http.response.status_code"), Some(403), "{span}");
    }
    assert_eq!(server.identity, db_id, "db's resource: {}", server.brief());
    assert_eq!(
        server.str("palisade.authz.decision"),
        Some("deny"),
        "{}",
        server.brief()
    );
    // Each request was its own trace.
    let spans = collector.spans();
    let (first, _) = hop(&spans, "web", "api").expect("still there");
    assert_ne!(first.trace_id(), client.trace_id(), "{}", briefs(&spans));
    eprintln!(
        "{} spans received, test done in {:?}",
        spans.len(),
        started.elapsed()
    );
}

/// How long a span may take to reach the collector: batches leave every second.
const WAIT: Duration = Duration::from_secs(30);

#[test]
fn a_bad_otlp_endpoint_is_refused_before_anything_starts() {
    for bad in [
        "not a url",
        "http://",
        "",
        "ftp://127.0.0.1:4317",
        "http://127.0.0.1:99999",
    ] {
        let spec = demo();
        let ports = spec.allocate();
        let mut mesh = spec.launch_with(free_port(), ports, POLICIES, &["--otlp", bad]);
        let (status, lines) = mesh.wait_exit(Duration::from_secs(30));
        let text = lines.join("\n");
        // Refused as the flags are parsed (clap's usage error, exit 2).
        assert_eq!(status.code(), Some(2), "--otlp {bad:?}: {text}");
        let said: Vec<&String> = lines.iter().filter(|l| l.contains("--otlp")).collect();
        assert_eq!(
            said.len(),
            1,
            "--otlp {bad:?}: one sentence naming it: {text}"
        );
        assert!(
            said[0].contains("is not a collector address"),
            "--otlp {bad:?}: {text}"
        );
        assert!(
            !mesh.state.join("logs").exists()
                && !mesh.state.join("mesh.json").exists()
                && !mesh.state.join("ca").exists(),
            "--otlp {bad:?}: nothing may start (or log) before the flag is checked: {text}"
        );
    }
}

#[test]
fn a_collector_that_is_down_fails_no_request_and_is_counted() {
    // A port nothing listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a port");
    let started = Instant::now();
    let mesh = up_with_otlp(&format!("http://{dead}"));
    let (_, web_app, _) = entry(&mesh, "web");
    let (status, body) = http_get(web_app, "/call/api").expect("web's app");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("hello from api"), "{body}");
    let failed = wait_for("web's lost spans counted", WAIT, || {
        let text = mesh.metrics("web");
        let n = metric_sum(
            &text,
            "palisade_trace_export_spans_total",
            &["result=\"export_failed\""],
        );
        if n > 0.0 {
            Ok(n)
        } else {
            Err(text
                .lines()
                .filter(|l| l.contains("palisade_trace"))
                .collect::<Vec<_>>()
                .join("\n"))
        }
    });
    // The mesh keeps serving.
    let (status, body) = http_get(web_app, "/call/api").expect("web's app");
    assert_eq!(status, 200, "{body}");
    eprintln!(
        "{failed} spans counted as export_failed; test done in {:?}",
        started.elapsed()
    );
}
