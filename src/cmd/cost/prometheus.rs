//! `palisade cost --prometheus URL`: the same counters, from a Prometheus server that scrapes
//! the proxies, through its HTTP API (`GET /api/v1/query`, an instant query at the present).
//! Each cost metric is asked for as `sum by (the key's labels) (increase(metric[WINDOW]))`,
//! which adds the proxies up (and drops `instance`, `job`, `pod`...) exactly as scraping
//! them does; the rows are then made by the same code.

use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

use super::model::{BYTES, CPU, Counters, REQUESTS, UNATTRIBUTED};
use crate::cmd::prom::Sample;

/// How long one query may take, the connection included.
const QUERY_TIMEOUT: Duration = Duration::from_secs(30);

/// A PromQL range for `d`: whole seconds when it is, else milliseconds (`90s`, `1500ms`).
pub fn range(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// The four queries, each with the metric its samples are read as.
pub fn queries(window: Duration) -> Vec<(&'static str, String)> {
    let w = range(window);
    let key = "src_identity, dst_identity, route";
    vec![
        (CPU, format!("sum by ({key}) (increase({CPU}[{w}]))")),
        (
            BYTES,
            format!("sum by ({key}, direction) (increase({BYTES}[{w}]))"),
        ),
        (
            REQUESTS,
            format!("sum by ({key}, direction) (increase({REQUESTS}[{w}]))"),
        ),
        (UNATTRIBUTED, format!("sum(increase({UNATTRIBUTED}[{w}]))")),
    ]
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
/// (`--web.route-prefix`, or a reverse proxy's), without a trailing slash.
#[derive(Debug, PartialEq)]
pub struct Server {
    pub host: String,
    pub port: u16,
    pub prefix: String,
}

impl Server {
    pub fn parse(url: &str) -> anyhow::Result<Server> {
        let uri: Uri = url
            .parse()
            .with_context(|| format!("--prometheus {url:?} is not a URL"))?;
        match uri.scheme_str() {
            None | Some("http") => {}
            Some("https") => bail!(
                "--prometheus {url:?}: https is not supported; reach Prometheus over plain HTTP (e.g. through `kubectl port-forward`)"
            ),
            Some(other) => bail!("--prometheus {url:?}: the scheme {other:?} is not http"),
        }
        let host = uri
            .host()
            .with_context(|| format!("--prometheus {url:?} names no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        Ok(Server {
            host,
            port: uri.port_u16().unwrap_or(80),
            prefix: uri.path().trim_end_matches('/').to_string(),
        })
    }

    pub fn query_path(&self, query: &str) -> String {
        format!("{}/api/v1/query?query={}", self.prefix, encode(query))
    }

    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// GET `path`: the status and the body.
    async fn get(&self, path: &str) -> anyhow::Result<(http::StatusCode, String)> {
        let authority = self.authority();
        let fut = async {
            let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
                .await
                .with_context(|| format!("cannot connect to Prometheus at {authority}"))?;
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
            tokio::spawn(conn);
            let req = Request::get(path)
                .header(http::header::HOST, &authority)
                .header(http::header::ACCEPT, "application/json")
                .header(http::header::USER_AGENT, "palisade-cost")
                .body(Empty::<Bytes>::new())?;
            let rsp = send.send_request(req).await?;
            let status = rsp.status();
            let body = rsp.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, String::from_utf8_lossy(&body).into_owned()))
        };
        tokio::time::timeout(QUERY_TIMEOUT, fut)
            .await
            .map_err(|_| {
                anyhow::anyhow!("Prometheus at {authority} did not answer within {QUERY_TIMEOUT:?}")
            })?
    }
}

/// The samples of one `/api/v1/query` answer (an instant vector), named `metric`; and the
/// warnings Prometheus attached. An error answer (`"status": "error"`) is an error naming
/// Prometheus' own `errorType` and `error`.
pub fn parse_response(
    metric: &str,
    status: http::StatusCode,
    body: &str,
) -> anyhow::Result<(Vec<Sample>, Vec<String>)> {
    let doc: serde_json::Value = serde_json::from_str(body).map_err(|_| {
        let start: String = body.chars().take(120).collect();
        anyhow::anyhow!(
            "the answer ({status}) is not Prometheus API JSON: {:?}",
            start.trim()
        )
    })?;
    if doc["status"] != "success" {
        bail!(
            "Prometheus answered {status}: {} ({})",
            doc["error"].as_str().unwrap_or("no error text"),
            doc["errorType"].as_str().unwrap_or("no error type")
        );
    }
    let warnings = doc["warnings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|w| w.as_str().map(String::from))
        .collect();
    let data = &doc["data"];
    let kind = data["resultType"].as_str().unwrap_or("none");
    let samples = match kind {
        "vector" => data["result"]
            .as_array()
            .context("a vector answer without a result list")?
            .iter()
            .map(|r| {
                let labels = r["metric"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .filter(|(k, _)| k.as_str() != "__name__")
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect();
                // `[ <unix time>, "<value>" ]`: the value is a string ("NaN", "+Inf" too).
                let value = r["value"][1]
                    .as_str()
                    .and_then(|v| match v {
                        "NaN" => Some(f64::NAN),
                        "+Inf" => Some(f64::INFINITY),
                        "-Inf" => Some(f64::NEG_INFINITY),
                        v => v.parse().ok(),
                    })
                    .with_context(|| format!("a sample without a value: {}", r["value"]))?;
                anyhow::Ok(Sample {
                    name: metric.to_string(),
                    labels,
                    value,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?,
        // `sum(...)` of nothing is an empty vector; a scalar only if someone wraps it so.
        "scalar" => {
            let value = data["result"][1]
                .as_str()
                .and_then(|v| v.parse().ok())
                .context("a scalar answer without a value")?;
            vec![Sample {
                name: metric.to_string(),
                labels: Default::default(),
                value,
            }]
        }
        other => bail!("Prometheus answered a {other}, not an instant vector"),
    };
    Ok((samples, warnings))
}

/// Every cost counter's increase over `window`, added up over the proxies Prometheus scrapes.
pub async fn counters(server: &Server, window: Duration) -> anyhow::Result<Counters> {
    let mut samples = Vec::new();
    for (metric, query) in queries(window) {
        let (status, body) = server.get(&server.query_path(&query)).await?;
        let (mut s, warnings) =
            parse_response(metric, status, &body).with_context(|| format!("query {query}"))?;
        for w in warnings {
            eprintln!("warning: Prometheus, on {query}: {w}");
        }
        samples.append(&mut s);
    }
    Ok(Counters::from_samples(&samples))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmd::cost::model::{By, Prices, rows};

    #[test]
    fn ranges_and_queries() {
        assert_eq!(range(Duration::from_secs(3600)), "3600s");
        assert_eq!(range(Duration::from_millis(1500)), "1500ms");
        let q = queries(Duration::from_secs(300));
        assert_eq!(
            q[0],
            (
                CPU,
                "sum by (src_identity, dst_identity, route) (increase(palisade_cost_cpu_seconds_total[300s]))".to_string()
            )
        );
        assert_eq!(
            q[2].1,
            "sum by (src_identity, dst_identity, route, direction) (increase(palisade_cost_requests_total[300s]))"
        );
        assert_eq!(
            q[3].1,
            "sum(increase(palisade_cost_unattributed_cpu_seconds_total[300s]))"
        );
    }

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
            s.query_path("sum by (a) (x[5m])"),
            "/api/v1/query?query=sum%20by%20%28a%29%20%28x%5B5m%5D%29"
        );
        let s = Server::parse("localhost:9090").unwrap();
        assert_eq!((s.host.as_str(), s.port), ("localhost", 9090));
        let s = Server::parse("http://[::1]:9090/prometheus").unwrap();
        assert_eq!((s.host.as_str(), s.prefix.as_str()), ("::1", "/prometheus"));
        assert_eq!(s.authority(), "[::1]:9090");
        assert_eq!(s.query_path("up"), "/prometheus/api/v1/query?query=up");
        assert_eq!(Server::parse("http://p").unwrap().port, 80);
        let e = Server::parse("https://p:9090").unwrap_err().to_string();
        assert!(e.contains("https is not supported"), "{e}");
        assert!(Server::parse("ftp://p").is_err());
    }

    /// Answers as Prometheus' HTTP API sends them (prometheus.io/docs/prometheus/latest/querying/api/:
    /// the envelope, `resultType` `vector`, values as `[unix time, "string"]`).
    const CPU_ANSWER: &str = r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{"dst_identity":"spiffe://cluster.local/ns/demo/sa/api","route":"","src_identity":"spiffe://cluster.local/ns/demo/sa/web"},"value":[1764003600.123,"2.7000000000000006"]},{"metric":{"dst_identity":"spiffe://cluster.local/ns/demo/sa/api","route":"","src_identity":"spiffe://cluster.local/ns/demo/sa/batch"},"value":[1764003600.123,"0.3"]}]}}"#;
    const REQUESTS_ANSWER: &str = r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{"direction":"inbound","dst_identity":"spiffe://cluster.local/ns/demo/sa/api","route":"","src_identity":"spiffe://cluster.local/ns/demo/sa/web"},"value":[1764003600.123,"900.5032"]},{"metric":{"direction":"outbound","dst_identity":"spiffe://cluster.local/ns/demo/sa/api","route":"","src_identity":"spiffe://cluster.local/ns/demo/sa/web"},"value":[1764003600.123,"899.9"]},{"metric":{"direction":"outbound","dst_identity":"spiffe://cluster.local/ns/demo/sa/api","route":"","src_identity":"spiffe://cluster.local/ns/demo/sa/batch"},"value":[1764003600.123,"100"]}]},"warnings":["PromQL info: metric might not be a counter"]}"#;
    const UNATTRIBUTED_ANSWER: &str = r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1764003600.123,"12.5"]}]}}"#;
    const EMPTY_ANSWER: &str = r#"{"status":"success","data":{"resultType":"vector","result":[]}}"#;
    const ERROR_ANSWER: &str = r#"{"status":"error","errorType":"bad_data","error":"invalid parameter \"query\": 1:32: parse error: unexpected \"]\" in subquery selector, expected \":\""}"#;

    #[test]
    fn recorded_answers_become_rows() {
        let ok = http::StatusCode::OK;
        let (mut samples, w) = parse_response(CPU, ok, CPU_ANSWER).unwrap();
        assert!(w.is_empty());
        assert_eq!(samples.len(), 2);
        assert_eq!(samples[0].name, CPU);
        assert_eq!(
            samples[0].label("src_identity"),
            "spiffe://cluster.local/ns/demo/sa/web"
        );
        let (mut r, w) = parse_response(REQUESTS, ok, REQUESTS_ANSWER).unwrap();
        assert_eq!(w, ["PromQL info: metric might not be a counter"]);
        samples.append(&mut r);
        let (mut u, _) = parse_response(UNATTRIBUTED, ok, UNATTRIBUTED_ANSWER).unwrap();
        samples.append(&mut u);
        let (e, _) = parse_response(BYTES, ok, EMPTY_ANSWER).unwrap();
        assert!(e.is_empty());
        let c = Counters::from_samples(&samples);
        assert_eq!(c.unattributed_cpu(), 12.5);
        let rows = rows(
            &c,
            By::Identity,
            Prices {
                vcpu_hour: 0.04,
                gb: 0.01,
            },
        );
        assert_eq!(rows[0].key, "spiffe://cluster.local/ns/demo/sa/web");
        // The inbound count, extrapolated by increase(): the JSON rounds it.
        assert_eq!(rows[0].requests, 900.5032);
        assert_eq!(
            rows[1].requests, 100.0,
            "no inbound side: the outbound count"
        );
    }

    #[test]
    fn error_answers_say_what_prometheus_said() {
        let e = parse_response(CPU, http::StatusCode::BAD_REQUEST, ERROR_ANSWER)
            .unwrap_err()
            .to_string();
        assert!(e.contains("400 Bad Request"), "{e}");
        assert!(e.contains("parse error"), "{e}");
        assert!(e.contains("bad_data"), "{e}");
        let e = parse_response(CPU, http::StatusCode::NOT_FOUND, "404 page not found")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not Prometheus API JSON"), "{e}");
        let matrix = r#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#;
        assert!(parse_response(CPU, http::StatusCode::OK, matrix).is_err());
    }
}
