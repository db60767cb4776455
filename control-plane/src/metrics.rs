//! The control plane's Prometheus metrics and its small HTTP endpoint (`/metrics`, `/ready`,
//! `/live`, `/status`, and `/config?workload=NAME`: what it serves that workload's proxy, see
//! [`crate::served`]).
//!
//! Every refusal the control plane makes (a config change, a certificate, a handshake) is
//! counted, because those are the events an operator has to notice without reading logs.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// `result` of a Certify call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

/// `reason` of a failed TLS handshake or a refused Watch.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// `service` of the API: `identity` or `discovery`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabel {
    pub service: &'static str,
}

/// `kind` of a Kubernetes policy object (`AuthorizationPolicy.palisade.dev`), or `resource`
/// of a watch (`pods`, `authorizationpolicies.security.istio.io`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabel {
    pub resource: String,
}

/// All metrics of one control plane. Cloning the handles shares the values.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// `palisade_config_rejections_total`: config changes rejected whole.
    pub config_rejections: Counter,
    /// `palisade_config_generation`: generation of the model being served.
    pub config_generation: Gauge,
    /// `palisade_identity_certificates_total{result}`.
    pub certificates: Family<ResultLabel, Counter>,
    /// `palisade_tls_handshake_errors_total{reason}`.
    pub handshake_errors: Family<ReasonLabel, Counter>,
    /// `palisade_discovery_watchers`: open Watch streams.
    pub watchers: Gauge,
    /// `palisade_discovery_pushes_total`: config messages sent to proxies.
    pub pushes: Counter,
    /// `palisade_discovery_watch_refused_total{reason}`: Watch calls refused.
    pub watch_refused: Family<ReasonLabel, Counter>,
    /// `palisade_discovery_acks_total{result}`: deltas proxies acknowledged (`ack`) or refused
    /// (`nack`, answered with a full snapshot when it was a delta).
    pub acks: Family<ResultLabel, Counter>,
    /// `palisade_discovery_lookups_total{result}`: destinations proxies resolved on demand
    /// (`found`, `not_found`, `refused` over the per-proxy cap).
    pub lookups: Family<ResultLabel, Counter>,
    /// `palisade_api_oversize_requests_total{service}`: requests over the message size limit.
    pub oversize_requests: Family<ServiceLabel, Counter>,
    /// `palisade_identity_cert_expiry_timestamp_seconds`: the control plane's own SVID.
    pub cert_expiry: Gauge,
    /// `palisade_kubernetes_object_rejections_total{kind}`: object versions the Kubernetes
    /// source refused (each refused version counted once).
    pub kubernetes_object_rejections: Family<KindLabel, Counter>,
    /// `palisade_kubernetes_rejected_objects{kind}`: objects whose current version is refused
    /// now (their last accepted version, if any, keeps serving).
    pub kubernetes_rejected_objects: Family<KindLabel, Gauge>,
    /// `palisade_kubernetes_watch_errors_total{resource}`: list/watch errors (a `410 Gone`
    /// included), each followed by a retry or a relist.
    pub kubernetes_watch_errors: Family<ResourceLabel, Counter>,
    /// `palisade_kubernetes_trust_bundle_writes_total{result}`: copies of the ConfigMap
    /// `palisade-trust-bundle` written (`ok`) or refused (`error`, retried).
    pub trust_bundle_writes: Family<ResultLabel, Counter>,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::default();
        let config_rejections = Counter::default();
        let config_generation = Gauge::default();
        let certificates = Family::<ResultLabel, Counter>::default();
        let handshake_errors = Family::<ReasonLabel, Counter>::default();
        let watchers = Gauge::default();
        let pushes = Counter::default();
        let watch_refused = Family::<ReasonLabel, Counter>::default();
        let acks = Family::<ResultLabel, Counter>::default();
        let lookups = Family::<ResultLabel, Counter>::default();
        let oversize_requests = Family::<ServiceLabel, Counter>::default();
        let cert_expiry = Gauge::default();
        let kubernetes_object_rejections = Family::<KindLabel, Counter>::default();
        let kubernetes_rejected_objects = Family::<KindLabel, Gauge>::default();
        let kubernetes_watch_errors = Family::<ResourceLabel, Counter>::default();
        let trust_bundle_writes = Family::<ResultLabel, Counter>::default();
        registry.register(
            "palisade_config_rejections",
            "Config changes rejected whole (the last good config keeps serving)",
            config_rejections.clone(),
        );
        registry.register(
            "palisade_config_generation",
            "Generation of the config model being served",
            config_generation.clone(),
        );
        registry.register(
            "palisade_identity_certificates",
            "Certify calls by result",
            certificates.clone(),
        );
        registry.register(
            "palisade_tls_handshake_errors",
            "Failed TLS handshakes on the control-plane API by reason",
            handshake_errors.clone(),
        );
        registry.register(
            "palisade_discovery_watchers",
            "Open Discovery.Watch streams",
            watchers.clone(),
        );
        registry.register(
            "palisade_discovery_pushes",
            "Config messages sent to proxies",
            pushes.clone(),
        );
        registry.register(
            "palisade_discovery_watch_refused",
            "Discovery.Watch calls refused, by reason",
            watch_refused.clone(),
        );
        registry.register(
            "palisade_discovery_acks",
            "Config deltas acknowledged (ack) or refused (nack) by proxies",
            acks.clone(),
        );
        registry.register(
            "palisade_discovery_lookups",
            "Original destinations proxies resolved on demand, by result",
            lookups.clone(),
        );
        registry.register(
            "palisade_api_oversize_requests",
            "API requests refused with RESOURCE_EXHAUSTED for a message over the size limit",
            oversize_requests.clone(),
        );
        registry.register(
            "palisade_identity_cert_expiry_timestamp_seconds",
            "Expiry of the control plane's own SVID (unix seconds)",
            cert_expiry.clone(),
        );
        registry.register(
            "palisade_kubernetes_object_rejections",
            "Kubernetes policy object versions refused by the validator (the rest keeps serving)",
            kubernetes_object_rejections.clone(),
        );
        registry.register(
            "palisade_kubernetes_rejected_objects",
            "Kubernetes policy objects whose current version is refused",
            kubernetes_rejected_objects.clone(),
        );
        registry.register(
            "palisade_kubernetes_watch_errors",
            "Kubernetes list/watch errors by resource (each is retried or relisted)",
            kubernetes_watch_errors.clone(),
        );
        registry.register(
            "palisade_kubernetes_trust_bundle_writes",
            "Writes of the trust bundle ConfigMap copies by result (a failed one is retried)",
            trust_bundle_writes.clone(),
        );
        // prometheus-client appends `_total` to counters itself.
        Arc::new(Self {
            registry,
            config_rejections,
            config_generation,
            certificates,
            handshake_errors,
            watchers,
            pushes,
            watch_refused,
            acks,
            lookups,
            oversize_requests,
            cert_expiry,
            kubernetes_object_rejections,
            kubernetes_rejected_objects,
            kubernetes_watch_errors,
            trust_bundle_writes,
        })
    }

    /// Counts one Certify outcome.
    pub fn certificate(&self, result: &'static str) {
        self.certificates
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// Counts one write of a trust bundle copy.
    pub fn trust_bundle_write(&self, result: &'static str) {
        self.trust_bundle_writes
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// Counts one refused Watch.
    pub fn watch_refused(&self, reason: &'static str) {
        self.watch_refused
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Counts one request refused for its size.
    pub fn oversize_request(&self, service: &'static str) {
        self.oversize_requests
            .get_or_create(&ServiceLabel { service })
            .inc();
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            tracing::error!("cannot encode metrics");
        }
        out
    }
}

/// What `/status` reports, refreshed by the caller.
pub type StatusFn = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// What `/config?workload=NAME` reports for a workload name; None: no such workload.
pub type ConfigFn = Arc<dyn Fn(&str) -> Option<serde_json::Value> + Send + Sync>;

/// The JSON routes of the endpoint.
#[derive(Clone)]
pub struct Routes {
    pub status: StatusFn,
    pub config: ConfigFn,
}

/// The value of `name` in a query string (`a=1&b=2`), percent-decoded; None if absent or
/// not UTF-8 once decoded.
fn query_param(query: &str, name: &str) -> Option<String> {
    let raw = query
        .split('&')
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))?;
    let mut out = Vec::with_capacity(raw.len());
    let mut bytes = raw.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = [bytes.next()?, bytes.next()?];
                let hex = std::str::from_utf8(&hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
            }
            b => out.push(b),
        }
    }
    String::from_utf8(out).ok()
}

fn json_error(status: StatusCode, message: String) -> Response<Full<Bytes>> {
    text(
        status,
        serde_json::json!({ "error": message }).to_string(),
        "application/json",
    )
}

fn config(routes: &Routes, query: Option<&str>) -> Response<Full<Bytes>> {
    let Some(name) = query.and_then(|q| query_param(q, "workload")) else {
        return json_error(
            StatusCode::BAD_REQUEST,
            "say which workload: /config?workload=NAME".into(),
        );
    };
    match (routes.config)(&name) {
        Some(v) => text(StatusCode::OK, v.to_string(), "application/json"),
        None => json_error(
            StatusCode::NOT_FOUND,
            format!("the mesh has no workload named {name:?}"),
        ),
    }
}

fn text(
    status: StatusCode,
    body: impl Into<Bytes>,
    content_type: &'static str,
) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(body.into()));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    rsp
}

fn handle(metrics: &Metrics, routes: &Routes, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => text(
            StatusCode::OK,
            metrics.encode(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        // The API is served as soon as `start` returns, so ready and live coincide.
        (&Method::GET, "/ready") | (&Method::GET, "/live") => {
            text(StatusCode::OK, "ready\n", PLAIN)
        }
        (&Method::GET, "/status") => text(
            StatusCode::OK,
            (routes.status)().to_string(),
            "application/json",
        ),
        (&Method::GET, "/config") => config(routes, req.uri().query()),
        _ => text(StatusCode::NOT_FOUND, "not found\n", PLAIN),
    }
}

/// Serves the metrics endpoint on `listener` until `stop` flips.
pub(crate) async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    routes: Routes,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let tcp = tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let metrics = metrics.clone();
        let routes = routes.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let rsp = handle(&metrics, &routes, &req);
                async move { Ok::<_, Infallible>(rsp) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

/// Binds the metrics endpoint.
pub(crate) async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::query_param;

    #[test]
    fn query_parameters_are_found_and_decoded() {
        assert_eq!(
            query_param("workload=db", "workload").as_deref(),
            Some("db")
        );
        assert_eq!(
            query_param("x=1&workload=my%2Dapp+2", "workload").as_deref(),
            Some("my-app 2")
        );
        assert_eq!(query_param("workloads=db", "workload"), None);
        assert_eq!(query_param("workload=%zz", "workload"), None);
        assert_eq!(query_param("workload=%4", "workload"), None);
    }
}
