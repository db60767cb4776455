//! The app's kubelet probes, as the injector rewrites them and the proxy runs them.
//!
//! The kubelet probes from the node in plaintext. Under STRICT mTLS the proxy would refuse a
//! probe redirected to it, and leaving the probed port out of redirection would open that port
//! (often the serving port) to any plaintext caller. So, as Istio does, the injector points
//! each HTTP and TCP probe of the app at the proxy's admin port
//! (`/app-health/<container>/<livez|readyz|startupz>`) and hands the proxy the original probes
//! in `PALISADE_APP_PROBES`, a JSON object of admin path → [`AppProbe`]; the proxy runs the
//! original probe against the app on loopback and answers with its result.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The admin paths of rewritten probes start with this.
pub const PATH_PREFIX: &str = "/app-health/";

/// Longest probe timeout the proxy honours; the kubelet's own deadline is the probe's
/// `timeoutSeconds` anyway.
pub const MAX_TIMEOUT_SECONDS: u32 = 60;

/// One original probe: exactly one of `httpGet` and `tcpSocket`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AppProbe {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_get: Option<HttpGet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_socket: Option<TcpSocket>,
    /// The probe's `timeoutSeconds` (Kubernetes' default is 1).
    #[serde(default = "one")]
    pub timeout_seconds: u32,
}

fn one() -> u32 {
    1
}

/// An HTTP GET to `127.0.0.1:port` + `path`; a status from 200 to 399 is a success, as for
/// the kubelet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpGet {
    pub port: u16,
    /// Path and query, `/` when the probe had none.
    #[serde(default = "root")]
    pub path: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http_headers: Vec<Header>,
}

fn root() -> String {
    "/".into()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    pub name: String,
    pub value: String,
}

/// A TCP connection to `127.0.0.1:port`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpSocket {
    pub port: u16,
}

/// Admin path → probe.
pub type AppProbes = BTreeMap<String, AppProbe>;

/// Why `PALISADE_APP_PROBES` is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AppProbeError {
    #[error("PALISADE_APP_PROBES is not a JSON object of probes: {0}")]
    Json(String),
    #[error("PALISADE_APP_PROBES: {path:?}: {message}")]
    Invalid { path: String, message: String },
}

/// Parses and checks `PALISADE_APP_PROBES`; an empty string is no probes.
pub fn parse(json: &str) -> Result<AppProbes, AppProbeError> {
    if json.trim().is_empty() {
        return Ok(AppProbes::new());
    }
    let probes: AppProbes =
        serde_json::from_str(json).map_err(|e| AppProbeError::Json(e.to_string()))?;
    for (path, p) in &probes {
        let bad = |message: &str| AppProbeError::Invalid {
            path: path.clone(),
            message: message.into(),
        };
        let rest = path
            .strip_prefix(PATH_PREFIX)
            .ok_or_else(|| bad("the path must start with /app-health/"))?;
        if rest.is_empty()
            || !rest
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-./_".contains(&b))
        {
            return Err(bad("the path must be /app-health/<container>/<probe>"));
        }
        match (&p.http_get, &p.tcp_socket) {
            (Some(get), None) => {
                if get.port == 0 {
                    return Err(bad("httpGet.port must be 1-65535"));
                }
                if !get.path.starts_with('/')
                    || http::uri::PathAndQuery::try_from(get.path.as_str()).is_err()
                {
                    return Err(bad("httpGet.path must be an absolute path"));
                }
                for h in &get.http_headers {
                    if http::HeaderName::try_from(h.name.as_str()).is_err()
                        || http::HeaderValue::try_from(h.value.as_str()).is_err()
                    {
                        return Err(bad("httpGet.httpHeaders has an invalid header"));
                    }
                }
            }
            (None, Some(tcp)) => {
                if tcp.port == 0 {
                    return Err(bad("tcpSocket.port must be 1-65535"));
                }
            }
            _ => return Err(bad("a probe has exactly one of httpGet and tcpSocket")),
        }
        if p.timeout_seconds == 0 || p.timeout_seconds > MAX_TIMEOUT_SECONDS {
            return Err(bad("timeoutSeconds must be 1-60"));
        }
    }
    Ok(probes)
}

/// The admin path of a container's probe: `kind` is `liveness`, `readiness` or `startup`.
pub fn path(container: &str, kind: &str) -> String {
    let short = match kind {
        "liveness" => "livez",
        "readiness" => "readyz",
        _ => "startupz",
    };
    format!("{PATH_PREFIX}{container}/{short}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_the_injector_writes_and_refuses_the_rest() {
        let ok = r#"{"/app-health/web/livez":{"httpGet":{"port":8080,"path":"/healthz?full=1","httpHeaders":[{"name":"X-Probe","value":"1"}]},"timeoutSeconds":3},
                     "/app-health/web/readyz":{"tcpSocket":{"port":8081}}}"#;
        let p = parse(ok).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p["/app-health/web/readyz"].timeout_seconds, 1);
        assert_eq!(parse("").unwrap().len(), 0);
        for bad in [
            "[]",
            r#"{"/app-health/web/livez":{}}"#,
            r#"{"/metrics":{"tcpSocket":{"port":1}}}"#,
            r#"{"/app-health/":{"tcpSocket":{"port":1}}}"#,
            r#"{"/app-health/w/livez":{"tcpSocket":{"port":0}}}"#,
            r#"{"/app-health/w/livez":{"tcpSocket":{"port":70000}}}"#,
            r#"{"/app-health/w/livez":{"httpGet":{"port":1,"path":"x"}}}"#,
            r#"{"/app-health/w/livez":{"httpGet":{"port":1},"tcpSocket":{"port":1}}}"#,
            r#"{"/app-health/w/livez":{"httpGet":{"port":1,"httpHeaders":[{"name":"a b","value":"x"}]}}}"#,
            r#"{"/app-health/w/livez":{"tcpSocket":{"port":1},"timeoutSeconds":0}}"#,
            r#"{"/app-health/w/livez":{"tcpSocket":{"port":1},"exec":{}}}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn paths_follow_istio() {
        assert_eq!(path("web", "liveness"), "/app-health/web/livez");
        assert_eq!(path("web", "readiness"), "/app-health/web/readyz");
        assert_eq!(path("web", "startup"), "/app-health/web/startupz");
    }
}
