//! A Prometheus server that scrapes the proxies, as a source of the same [`Window`] a local
//! scrape gives: what `stat`, `edges`, `cost` and the dashboard report on a cluster (or on a
//! local mesh that a Prometheus scrapes), through its HTTP API (`GET /api/v1/query`).
//!
//! **Raw counters at two instants, not `increase()`.** For a window of `D` ending now, the
//! counters the reports read are asked for as they are (`{__name__=~"palisade_requests_total|
//! ..."}`, one series per proxy and label set) at the server's present `T` and at `T - D`, with
//! the time of each proxy's last scrape before those instants (`timestamp(...)`); the increase
//! of every series between the two is computed here, per proxy, by the code that computes it
//! between two scrapes of a local mesh ([`Counters::increase_since`]). So the counts are
//! whole numbers and exact — those of the proxies' own scrapes at both ends — where
//! `increase()` would extrapolate to the ends of the range and answer fractions; and the
//! histograms, the authorization decisions and the cost counters all come from the same two
//! reads. The figures cover the span between the two scrapes, and the rates use that span.
//!
//! A proxy is a target: the labels of a series that are not the proxies' own (`instance`,
//! `job`, `pod`, `namespace`, `workload`, whatever relabeling set). A proxy that has no sample
//! at the start of the window (it started in it, or Prometheus did not scrape it yet) counts
//! from its start, as one that restarted in between does (its
//! `palisade_proxy_start_time_seconds` changed). Rows are named by [`name_of`].
//! docs/observe.md ("From Prometheus") shows the scrape configs and the labels needed.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

use super::cost;
use super::mesh::{LocalMesh, MeshView, Workload};
use super::snapshot::{
    AUTHZ, Counters, DURATION_BUCKET, ProxySnapshot, ProxyWindow, REQUESTS, START_TIME, Window,
};
use crate::cmd::prom::Sample;

/// How long one query may take, the connection included.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(30);

/// What went wrong asking Prometheus, in one sentence each.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The URL given for the server.
    #[error("{0}")]
    Url(String),
    #[error("cannot reach Prometheus at {authority}: {source}")]
    Unreachable {
        authority: String,
        source: std::io::Error,
    },
    #[error("Prometheus at {authority} broke off: {source}")]
    Http {
        authority: String,
        source: hyper::Error,
    },
    #[error("Prometheus at {authority} did not answer within {timeout:?}")]
    Timeout {
        authority: String,
        timeout: Duration,
    },
    /// An error answer (`"status": "error"`), with Prometheus's own words.
    #[error("Prometheus answered {status}: {error} ({error_type})")]
    Api {
        status: StatusCode,
        error_type: String,
        error: String,
    },
    #[error("the answer ({status}) is not Prometheus API JSON: {start:?}")]
    NotJson { status: StatusCode, start: String },
    #[error("an unexpected answer from Prometheus: {0}")]
    Unexpected(String),
}

/// A PromQL range for `d`: whole seconds when it is, else milliseconds (`90s`, `1500ms`).
pub fn range(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// `application/x-www-form-urlencoded` for a query string value: everything but the
/// unreserved characters percent-encoded.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Where to send queries: host, port, and the path prefix Prometheus is served under
/// (`--web.route-prefix`, or a reverse proxy's), without a trailing slash. Plain HTTP only:
/// a Prometheus in a cluster is reached through `kubectl port-forward`.
#[derive(Clone, Debug, PartialEq)]
pub struct Server {
    pub host: String,
    pub port: u16,
    pub prefix: String,
}

impl Server {
    pub fn parse(url: &str) -> Result<Server, Error> {
        let uri: Uri = url
            .parse()
            .map_err(|_| Error::Url(format!("--prometheus {url:?} is not a URL")))?;
        match uri.scheme_str() {
            None | Some("http") => {}
            Some("https") => {
                return Err(Error::Url(format!(
                    "--prometheus {url:?}: https is not supported; reach Prometheus over plain HTTP (e.g. through `kubectl port-forward`)"
                )));
            }
            Some(other) => {
                return Err(Error::Url(format!(
                    "--prometheus {url:?}: the scheme {other:?} is not http"
                )));
            }
        }
        let host = uri
            .host()
            .ok_or_else(|| Error::Url(format!("--prometheus {url:?} names no host")))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        Ok(Server {
            host,
            port: uri.port_u16().unwrap_or(80),
            prefix: uri.path().trim_end_matches('/').to_string(),
        })
    }

    /// The path of an instant query, at `time` (unix seconds) or at the server's present.
    pub fn query_path(&self, query: &str, time: Option<f64>) -> String {
        let mut p = format!("{}/api/v1/query?query={}", self.prefix, encode(query));
        if let Some(t) = time {
            p.push_str(&format!("&time={t:.3}"));
        }
        p
    }

    /// `host:port`, as a Host header and in messages.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// GET `path`: the status and the body, within [`QUERY_TIMEOUT`].
    async fn get(&self, path: &str) -> Result<(StatusCode, String), Error> {
        let authority = self.authority();
        let http = |source| Error::Http {
            authority: authority.clone(),
            source,
        };
        let fut = async {
            let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|source| Error::Unreachable {
                    authority: authority.clone(),
                    source,
                })?;
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .map_err(http)?;
            tokio::spawn(conn);
            let req = Request::get(path)
                .header(http::header::HOST, &authority)
                .header(http::header::ACCEPT, "application/json")
                .header(http::header::USER_AGENT, "palisade")
                .body(Empty::<Bytes>::new())
                .map_err(|e| Error::Url(format!("cannot ask Prometheus for {path}: {e}")))?;
            let rsp = send.send_request(req).await.map_err(http)?;
            let status = rsp.status();
            let body = rsp.into_body().collect().await.map_err(http)?.to_bytes();
            Ok((status, String::from_utf8_lossy(&body).into_owned()))
        };
        tokio::time::timeout(QUERY_TIMEOUT, fut)
            .await
            .map_err(|_| Error::Timeout {
                authority: authority.clone(),
                timeout: QUERY_TIMEOUT,
            })?
    }

    /// An instant query, at `time` (unix seconds) or at the server's present.
    pub async fn query(&self, query: &str, time: Option<f64>) -> Result<Answer, Error> {
        let (status, body) = self.get(&self.query_path(query, time)).await?;
        decode(status, &body)
    }
}

/// One answer of `/api/v1/query`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Answer {
    /// An instant vector's samples, each named by its `__name__` (empty when the expression
    /// drops it, as `timestamp(...)` or `sum(...)` do); a scalar is one sample without labels.
    pub samples: Vec<Sample>,
    /// When it was evaluated (unix seconds), from the samples; None for an empty vector.
    pub time: Option<f64>,
    /// What Prometheus warned about (a partial answer, ...).
    pub warnings: Vec<String>,
}

/// A sample value as the API writes it: a string, `"NaN"` and `"+Inf"`/`"-Inf"` included.
fn value(v: &serde_json::Value) -> Option<f64> {
    match v.as_str()? {
        "NaN" => Some(f64::NAN),
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        s => s.parse().ok(),
    }
}

/// Decodes an answer of `/api/v1/query` (prometheus.io/docs/prometheus/latest/querying/api/):
/// the envelope, a `vector` or `scalar` result, values as `[unix time, "string"]`. An error
/// answer is [`Error::Api`] with Prometheus's `errorType` and `error`; anything else that is
/// not an instant answer is an error too.
pub fn decode(status: StatusCode, body: &str) -> Result<Answer, Error> {
    let doc: serde_json::Value = serde_json::from_str(body).map_err(|_| Error::NotJson {
        status,
        start: body
            .chars()
            .take(120)
            .collect::<String>()
            .trim()
            .to_string(),
    })?;
    if doc["status"] != "success" {
        return Err(Error::Api {
            status,
            error_type: doc["errorType"]
                .as_str()
                .unwrap_or("no error type")
                .to_string(),
            error: doc["error"].as_str().unwrap_or("no error text").to_string(),
        });
    }
    let warnings = doc["warnings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|w| w.as_str().map(String::from))
        .collect();
    let data = &doc["data"];
    let mut answer = Answer {
        warnings,
        ..Answer::default()
    };
    match data["resultType"].as_str().unwrap_or("none") {
        "vector" => {
            let result = data["result"]
                .as_array()
                .ok_or_else(|| Error::Unexpected("a vector answer without a result list".into()))?;
            for r in result {
                let mut labels: BTreeMap<String, String> = r["metric"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect();
                let name = labels.remove("__name__").unwrap_or_default();
                let v = value(&r["value"][1]).ok_or_else(|| {
                    Error::Unexpected(format!("a sample without a value: {}", r["value"]))
                })?;
                answer.time = answer.time.or(r["value"][0].as_f64());
                answer.samples.push(Sample {
                    name,
                    labels,
                    value: v,
                });
            }
        }
        "scalar" => {
            let v = value(&data["result"][1])
                .ok_or_else(|| Error::Unexpected("a scalar answer without a value".into()))?;
            answer.time = data["result"][0].as_f64();
            answer.samples.push(Sample {
                name: String::new(),
                labels: BTreeMap::new(),
                value: v,
            });
        }
        other => {
            return Err(Error::Unexpected(format!(
                "a {other}, not an instant vector"
            )));
        }
    }
    Ok(answer)
}

/// Which metrics a read asks Prometheus for (a local scrape reads them all anyway, in one
/// answer; here the latency buckets are most of the series, and `cost` needs none of them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Families {
    /// Requests, latency buckets, authorization decisions: `stat` and `edges`.
    Traffic,
    /// The `palisade_cost_*` counters: `cost`.
    Cost,
    /// Both (the dashboard).
    All,
}

impl Families {
    fn names(self) -> Vec<&'static str> {
        let traffic = [REQUESTS, DURATION_BUCKET, AUTHZ];
        let cost = [cost::CPU, cost::BYTES, cost::REQUESTS, cost::UNATTRIBUTED];
        let mut names = vec![START_TIME];
        match self {
            Families::Traffic => names.extend(traffic),
            Families::Cost => names.extend(cost),
            Families::All => names.extend(traffic.into_iter().chain(cost)),
        }
        names
    }

    /// The selector of the raw series: `{__name__=~"a|b|..."}`.
    pub fn selector(self) -> String {
        format!("{{__name__=~\"{}\"}}", self.names().join("|"))
    }
}

/// The labels of the proxies' own series; every other label of a series is Prometheus's (the
/// target's: `instance`, `job`, `pod`, relabeled ones) and says which proxy it came from.
const METRIC_LABELS: &[&str] = &[
    "direction",
    "src_identity",
    "dst_identity",
    "status_code",
    "route",
    "le",
    "decision",
    "policy",
    "flow",
];

/// A proxy as Prometheus knows it: its target labels, sorted.
pub type Target = Vec<(String, String)>;

fn target_of(s: &Sample) -> Target {
    s.labels
        .iter()
        .filter(|(k, _)| !METRIC_LABELS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn label<'a>(t: &'a Target, name: &str) -> Option<&'a str> {
    t.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.is_empty())
}

/// The workload a proxy's series belong to, from its target labels, the first that applies:
///
/// 1. a `workload` label (the proxies' own, or set by relabeling: docs/observe.md);
/// 2. the workload of `local` (a local mesh's `mesh.json`) whose admin address is the
///    `instance` (a Prometheus scraping a local mesh's proxies by their admin addresses);
/// 3. `namespace/pod` (or `pod`) of Kubernetes pod discovery: a row per pod;
/// 4. the `instance` itself.
pub fn name_of(t: &Target, local: Option<&LocalMesh>) -> String {
    if let Some(w) = label(t, "workload") {
        return w.to_string();
    }
    if let (Some(mesh), Some(instance)) = (local, label(t, "instance"))
        && let Some(w) = mesh
            .workloads
            .iter()
            .find(|w| w.admin.is_some_and(|a| a.to_string() == instance))
    {
        return w.name.clone();
    }
    match (label(t, "namespace"), label(t, "pod"), label(t, "instance")) {
        (Some(ns), Some(pod), _) => format!("{ns}/{pod}"),
        (None, Some(pod), _) => pod.to_string(),
        (_, None, Some(instance)) => instance.to_string(),
        _ => t
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(","),
    }
}

/// What Prometheus holds at one instant: every proxy's counters, as of its last scrape.
#[derive(Clone, Debug, Default)]
pub struct Read {
    pub proxies: BTreeMap<Target, ProxySnapshot>,
}

impl Read {
    /// The proxies of the raw series `counters` (from [`Families::selector`]) and of
    /// `scraped` (`timestamp(palisade_proxy_start_time_seconds)`: when each was last
    /// scraped), evaluated at `time`.
    pub fn from_answers(counters: &[Sample], scraped: &[Sample], time: f64) -> Read {
        let mut samples: BTreeMap<Target, Vec<Sample>> = BTreeMap::new();
        for s in counters {
            samples.entry(target_of(s)).or_default().push(s.clone());
        }
        let scraped: BTreeMap<Target, f64> = scraped
            .iter()
            .filter(|s| s.value.is_finite())
            .map(|s| (target_of(s), s.value))
            .collect();
        let proxies = samples
            .into_iter()
            .map(|(t, samples)| {
                let start_time = samples
                    .iter()
                    .find(|s| s.name == START_TIME)
                    .map(|s| s.value)
                    .filter(|v| v.is_finite() && *v > 0.0);
                let p = ProxySnapshot {
                    counters: Counters::from_samples(&samples),
                    start_time,
                    at: Instant::now(),
                    unix_time: scraped.get(&t).copied().unwrap_or(time),
                };
                (t, p)
            })
            .collect();
        Read { proxies }
    }
}

/// The SPIFFE ID of a proxy, from its series: the callee of its inbound requests, or the
/// caller of its outbound ones.
fn identity_of(c: &Counters) -> Option<String> {
    let known = |id: &str| id != super::UNKNOWN && !id.is_empty();
    c.requests
        .keys()
        .find(|s| s.inbound() && known(&s.dst))
        .map(|s| s.dst.clone())
        .or_else(|| {
            c.requests
                .keys()
                .find(|s| s.outbound() && known(&s.src))
                .map(|s| s.src.clone())
        })
}

/// The window between two reads, per workload (the pods of one workload added up), and the
/// workloads it names. With `local`, when some of its proxies are Prometheus's targets, the
/// rows follow the mesh file (its workloads without series are `missing`), then any other
/// workload; else they are sorted by name.
pub fn window_between(
    first: &Read,
    second: &Read,
    local: Option<&LocalMesh>,
) -> (MeshView, Window) {
    let mut window = Window::default();
    let mut identities: BTreeMap<String, Option<String>> = BTreeMap::new();
    for (target, b) in &second.proxies {
        let name = name_of(target, local);
        let restarted = |a: &ProxySnapshot| matches!((a.start_time, b.start_time), (Some(x), Some(y)) if x != y);
        let pw = match first.proxies.get(target) {
            Some(a) if !restarted(a) => ProxyWindow {
                counters: b.counters.increase_since(&a.counters),
                seconds: Some((b.unix_time - a.unix_time).max(0.0)),
            },
            _ => ProxyWindow {
                counters: b.counters.clone(),
                seconds: b.start_time.map(|s| (b.unix_time - s).max(0.0)),
            },
        };
        let id = identity_of(&b.counters);
        let known = identities.entry(name.clone()).or_default();
        if known.is_none() {
            *known = id;
        }
        match window.proxies.get_mut(&name) {
            Some(w) => {
                w.counters.add(&pw.counters);
                w.seconds = match (w.seconds, pw.seconds) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (a, b) => a.or(b),
                };
            }
            None => {
                window.proxies.insert(name, pw);
            }
        }
    }
    for target in first.proxies.keys() {
        let name = name_of(target, local);
        if !second.proxies.contains_key(target) && !window.proxies.contains_key(&name) {
            window.missing.insert(
                name,
                "Prometheus has no sample of its proxy at the end of the window (its last scrape failed, or it is gone)".into(),
            );
        }
    }
    let mut view = MeshView::default();
    let local = local.filter(|m| {
        m.workloads
            .iter()
            .any(|w| window.proxies.contains_key(&w.name))
    });
    if let Some(mesh) = local {
        for w in &mesh.workloads {
            if !window.proxies.contains_key(&w.name) && !window.missing.contains_key(&w.name) {
                let why = match w.admin {
                    Some(a) => format!(
                        "Prometheus has no series with instance=\"{a}\", its proxy's admin address"
                    ),
                    None => format!("{} gives it no admin address", mesh.path.display()),
                };
                window.missing.insert(w.name.clone(), why);
            }
            view.workloads.push(w.clone());
        }
    }
    for (name, id) in identities {
        if view.workload(&name).is_none() {
            view.workloads.push(Workload {
                name,
                spiffe_id: id,
                admin: None,
            });
        }
    }
    window.seconds = window
        .proxies
        .values()
        .filter_map(|p| p.seconds)
        .max_by(f64::total_cmp);
    (view, window)
}

/// A Prometheus server that scrapes the proxies, and the local mesh (if any) whose admin
/// addresses are its targets' `instance`s.
#[derive(Clone, Debug)]
pub struct Prometheus {
    pub server: Server,
    pub local: Option<LocalMesh>,
}

/// The query for when each proxy was last scraped (the start-time gauge has one series per
/// proxy and nothing else).
fn scraped_query() -> String {
    format!("timestamp({START_TIME})")
}

impl Prometheus {
    /// Asks `query` at `time` (or now); warnings go to stderr, errors name the query.
    async fn ask(&self, query: &str, time: Option<f64>) -> anyhow::Result<Answer> {
        let answer = self
            .server
            .query(query, time)
            .await
            .map_err(|e| anyhow::anyhow!("{e} (query {query})"))?;
        for w in &answer.warnings {
            eprintln!("warning: Prometheus, on {query}: {w}");
        }
        Ok(answer)
    }

    /// The window of the last `d` before the server's present, and the workloads it names.
    /// Fails (in one sentence) when Prometheus has no proxy's series at all.
    pub async fn window(
        &self,
        d: Duration,
        families: Families,
    ) -> anyhow::Result<(MeshView, Window)> {
        let scraped = scraped_query();
        let selector = families.selector();
        let now = self.ask(&scraped, None).await?;
        let Some(t1) = now.time else {
            anyhow::bail!(
                "Prometheus at {} has no series of {START_TIME}: it scrapes no Palisade proxy (docs/observe.md, \"From Prometheus\", has a scrape config)",
                self.server.authority()
            );
        };
        let t0 = t1 - d.as_secs_f64();
        let second = self.ask(&selector, Some(t1)).await?;
        let before = self.ask(&scraped, Some(t0)).await?;
        let first = self.ask(&selector, Some(t0)).await?;
        let second = Read::from_answers(&second.samples, &now.samples, t1);
        let first = Read::from_answers(&first.samples, &before.samples, t0);
        Ok(window_between(&first, &second, self.local.as_ref()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WEB: &str = "spiffe://cluster.local/ns/demo/sa/web";
    const API: &str = "spiffe://cluster.local/ns/demo/sa/api";

    #[test]
    fn urls_and_query_encoding() {
        let s = Server::parse("http://prom.monitoring:9090/").unwrap();
        assert_eq!(
            s,
            Server {
                host: "prom.monitoring".into(),
                port: 9090,
                prefix: String::new()
            }
        );
        assert_eq!(
            s.query_path("sum by (a) (x[5m])", None),
            "/api/v1/query?query=sum%20by%20%28a%29%20%28x%5B5m%5D%29"
        );
        assert_eq!(
            s.query_path("up", Some(1764003600.1234)),
            "/api/v1/query?query=up&time=1764003600.123"
        );
        let s = Server::parse("localhost:9090").unwrap();
        assert_eq!((s.host.as_str(), s.port), ("localhost", 9090));
        let s = Server::parse("http://[::1]:9090/prometheus").unwrap();
        assert_eq!((s.host.as_str(), s.prefix.as_str()), ("::1", "/prometheus"));
        assert_eq!(s.authority(), "[::1]:9090");
        assert_eq!(
            s.query_path("up", None),
            "/prometheus/api/v1/query?query=up"
        );
        assert_eq!(Server::parse("http://p").unwrap().port, 80);
        let e = Server::parse("https://p:9090").unwrap_err().to_string();
        assert!(e.contains("https is not supported"), "{e}");
        assert!(Server::parse("ftp://p").is_err());
        assert_eq!(range(Duration::from_secs(3600)), "3600s");
        assert_eq!(range(Duration::from_millis(1500)), "1500ms");
        assert_eq!(
            Families::Cost.selector(),
            "{__name__=~\"palisade_proxy_start_time_seconds|palisade_cost_cpu_seconds_total|palisade_cost_bytes_total|palisade_cost_requests_total|palisade_cost_unattributed_cpu_seconds_total\"}"
        );
    }

    /// Answers as Prometheus 2.42's HTTP API sends them.
    const VECTOR: &str = r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{"__name__":"palisade_requests_total","direction":"inbound","dst_identity":"spiffe://cluster.local/ns/demo/sa/api","instance":"127.0.0.1:14192","job":"palisade","route":"","src_identity":"spiffe://cluster.local/ns/demo/sa/web","status_code":"200"},"value":[1764003600.123,"20"]},{"metric":{"__name__":"palisade_request_duration_seconds_bucket","direction":"inbound","dst_identity":"spiffe://cluster.local/ns/demo/sa/api","instance":"127.0.0.1:14192","job":"palisade","le":"+Inf","route":"","src_identity":"spiffe://cluster.local/ns/demo/sa/web","status_code":"200"},"value":[1764003600.123,"+Inf"]},{"metric":{"__name__":"x"},"value":[1764003600.123,"NaN"]},{"metric":{"__name__":"y"},"value":[1764003600.123,"-Inf"]}]},"warnings":["PromQL info: metric might not be a counter"]}"#;
    const TIMESTAMPS: &str = r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{"instance":"127.0.0.1:14192","job":"palisade"},"value":[1764003600.123,"1764003599.5"]}]}}"#;
    const EMPTY: &str = r#"{"status":"success","data":{"resultType":"vector","result":[]}}"#;
    const SCALAR: &str =
        r#"{"status":"success","data":{"resultType":"scalar","result":[1764003600.5,"12.5"]}}"#;
    const ERROR: &str = r#"{"status":"error","errorType":"bad_data","error":"invalid parameter \"query\": 1:32: parse error: unexpected \"]\" in subquery selector, expected \":\""}"#;
    const TIMEOUT: &str = r#"{"status":"error","errorType":"timeout","error":"query timed out in expression evaluation"}"#;

    #[test]
    fn vectors_scalars_and_special_values() {
        let a = decode(StatusCode::OK, VECTOR).unwrap();
        assert_eq!(a.samples.len(), 4);
        assert_eq!(a.time, Some(1764003600.123));
        assert_eq!(a.warnings, ["PromQL info: metric might not be a counter"]);
        let s = &a.samples[0];
        assert_eq!(s.name, "palisade_requests_total");
        assert!(!s.labels.contains_key("__name__"));
        assert_eq!(s.label("src_identity"), WEB);
        assert_eq!(s.label("instance"), "127.0.0.1:14192");
        assert_eq!(s.value, 20.0);
        assert_eq!(a.samples[1].value, f64::INFINITY);
        assert!(a.samples[2].value.is_nan());
        assert_eq!(a.samples[3].value, f64::NEG_INFINITY);

        let t = decode(StatusCode::OK, TIMESTAMPS).unwrap();
        assert_eq!(t.samples[0].name, "", "timestamp() drops the name");
        assert_eq!(t.samples[0].value, 1764003599.5);

        let e = decode(StatusCode::OK, EMPTY).unwrap();
        assert!(e.samples.is_empty());
        assert_eq!(e.time, None);

        let s = decode(StatusCode::OK, SCALAR).unwrap();
        assert_eq!(s.samples.len(), 1);
        assert_eq!((s.samples[0].value, s.time), (12.5, Some(1764003600.5)));
    }

    #[test]
    fn errors_say_what_prometheus_said() {
        let e = decode(StatusCode::BAD_REQUEST, ERROR)
            .unwrap_err()
            .to_string();
        assert!(e.contains("400 Bad Request"), "{e}");
        assert!(e.contains("parse error"), "{e}");
        assert!(e.contains("bad_data"), "{e}");
        let e = decode(StatusCode::SERVICE_UNAVAILABLE, TIMEOUT)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("query timed out") && e.contains("(timeout)"),
            "{e}"
        );
        let e = decode(StatusCode::NOT_FOUND, "404 page not found")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not Prometheus API JSON"), "{e}");
        let matrix = r#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#;
        let e = decode(StatusCode::OK, matrix).unwrap_err().to_string();
        assert!(e.contains("matrix"), "{e}");
        let bad = r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1,"abc"]}]}}"#;
        assert!(decode(StatusCode::OK, bad).is_err());
        let no_value =
            r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{}}]}}"#;
        assert!(decode(StatusCode::OK, no_value).is_err());
    }

    #[tokio::test]
    async fn an_unreachable_server_is_one_sentence() {
        let port = crate::cmd::free_port().unwrap();
        let s = Server::parse(&format!("http://127.0.0.1:{port}")).unwrap();
        let e = s.query("up", None).await.unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("cannot reach Prometheus at 127.0.0.1:{port}")),
            "{e}"
        );
    }

    /// A raw sample of one proxy (target labels `tl`) as Prometheus answers it.
    fn sample(name: &str, labels: &[(&str, &str)], tl: &[(&str, &str)], value: f64) -> Sample {
        Sample {
            name: name.into(),
            labels: labels
                .iter()
                .chain(tl)
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            value,
        }
    }

    /// One proxy's raw series: `ok` inbound requests from web to `me`, `denied` denials,
    /// and its start time.
    fn proxy(tl: &[(&str, &str)], me: &str, ok: f64, denied: f64, start: f64) -> Vec<Sample> {
        let req = [
            ("direction", "inbound"),
            ("src_identity", WEB),
            ("dst_identity", me),
            ("status_code", "200"),
            ("route", ""),
        ];
        let mut bucket = req.to_vec();
        bucket.push(("le", "+Inf"));
        vec![
            sample(REQUESTS, &req, tl, ok),
            sample(DURATION_BUCKET, &bucket, tl, ok),
            sample(
                AUTHZ,
                &[("decision", "deny"), ("policy", "no_allow_match")],
                tl,
                denied,
            ),
            sample(START_TIME, &[], tl, start),
            sample(
                cost::CPU,
                &[("src_identity", WEB), ("dst_identity", me), ("route", "")],
                tl,
                ok / 100.0,
            ),
        ]
    }

    fn scraped(tl: &[(&str, &str)], at: f64) -> Sample {
        sample("", &[], tl, at)
    }

    #[test]
    fn a_window_between_two_reads_per_workload() {
        let a1: &[(&str, &str)] = &[("workload", "api"), ("pod", "api-1"), ("namespace", "demo")];
        let a2: &[(&str, &str)] = &[("workload", "api"), ("pod", "api-2"), ("namespace", "demo")];
        let db: &[(&str, &str)] = &[("pod", "db-0"), ("namespace", "demo")];
        let gone: &[(&str, &str)] = &[("instance", "10.0.0.9:4191")];
        let first = Read::from_answers(
            &[
                proxy(a1, API, 10.0, 1.0, 100.0),
                proxy(a2, API, 5.0, 0.0, 100.0),
                proxy(gone, API, 1.0, 0.0, 100.0),
            ]
            .concat(),
            &[scraped(a1, 1000.0), scraped(a2, 1001.0)],
            1000.0,
        );
        let second = Read::from_answers(
            &[
                // 15 more on api-1; api-2 restarted (another start time) and counted 3 since.
                proxy(a1, API, 25.0, 4.0, 100.0),
                proxy(a2, API, 3.0, 0.0, 1050.0),
                // db-0 is new in the window: all of it.
                proxy(db, "spiffe://cluster.local/ns/demo/sa/db", 7.0, 2.0, 900.0),
            ]
            .concat(),
            &[
                scraped(a1, 1060.0),
                scraped(a2, 1061.0),
                scraped(db, 1059.0),
            ],
            1060.0,
        );
        let (view, w) = window_between(&first, &second, None);
        let names: Vec<&str> = view.workloads.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(names, ["api", "demo/db-0"]);
        assert_eq!(
            view.workload("api").unwrap().spiffe_id.as_deref(),
            Some(API)
        );
        let api = &w.proxies["api"];
        assert_eq!(api.counters.requests.values().sum::<f64>(), 18.0);
        assert_eq!(api.counters.decisions("deny"), 3.0);
        assert_eq!(api.counters.latency.values().next().unwrap().count(), 18.0);
        assert!((api.counters.cost.0.values().sum::<f64>() - 0.18).abs() < 1e-9);
        // api-1's window is 60 s between its scrapes; api-2's is its age (11 s).
        assert_eq!(api.seconds, Some(60.0));
        let db_w = &w.proxies["demo/db-0"];
        assert_eq!(db_w.counters.requests.values().sum::<f64>(), 7.0);
        assert_eq!(db_w.seconds, Some(159.0));
        assert_eq!(w.seconds, Some(159.0));
        assert!(!w.since_start);
        assert!(
            w.missing["10.0.0.9:4191"].contains("end of the window"),
            "{w:?}"
        );
        let rows = crate::observe::report::stat(&view, &w, crate::observe::By::Workload, None);
        assert_eq!(rows[0].traffic.requests, 18.0);
        assert_eq!(rows[0].traffic.rps, Some(18.0 / 60.0));
    }

    #[test]
    fn a_local_mesh_names_its_proxies_by_admin_address() {
        let mesh = LocalMesh::from_json(
            &serde_json::json!({"workloads": [
                {"name": "web", "spiffeId": WEB, "adminAddr": "127.0.0.1:14191"},
                {"name": "api", "spiffeId": API, "adminAddr": "127.0.0.1:14192"},
                {"name": "db", "spiffeId": "spiffe://cluster.local/ns/demo/sa/db", "adminAddr": "127.0.0.1:14193"},
            ]}),
            "mesh.json".into(),
        )
        .unwrap();
        let api: &[(&str, &str)] = &[("instance", "127.0.0.1:14192"), ("job", "palisade")];
        let web: &[(&str, &str)] = &[("instance", "127.0.0.1:14191"), ("job", "palisade")];
        let other: &[(&str, &str)] = &[("instance", "10.1.2.3:4191"), ("job", "palisade")];
        assert_eq!(
            name_of(
                &api.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                Some(&mesh)
            ),
            "api"
        );
        let second = Read::from_answers(
            &[
                proxy(api, API, 4.0, 0.0, 100.0),
                proxy(web, WEB, 0.0, 0.0, 100.0),
                proxy(other, "spiffe://x/ns/y/sa/z", 1.0, 0.0, 100.0),
            ]
            .concat(),
            &[],
            200.0,
        );
        let (view, w) = window_between(&Read::default(), &second, Some(&mesh));
        let names: Vec<&str> = view.workloads.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(names, ["web", "api", "db", "10.1.2.3:4191"]);
        assert!(
            w.missing["db"].contains("instance=\"127.0.0.1:14193\""),
            "{w:?}"
        );
        // Everything since the proxies started (no sample at the start of the window).
        assert_eq!(
            w.proxies["api"].counters.requests.values().sum::<f64>(),
            4.0
        );
        assert_eq!(w.proxies["api"].seconds, Some(100.0));
        // Without the mesh, by instance.
        let (view, _) = window_between(&Read::default(), &second, None);
        assert_eq!(view.workloads[0].name, "10.1.2.3:4191");
        assert_eq!(
            view.workload("127.0.0.1:14192")
                .unwrap()
                .spiffe_id
                .as_deref(),
            Some(API)
        );
    }
}
