//! The Gateway API filters a rule applies to a request or its response.

use http::{HeaderMap, Request, Uri};

use super::{Headers, PathChange, Redirect, Rewrite};

/// RequestHeaderModifier / ResponseHeaderModifier: set, then add, then remove.
pub fn apply_headers(h: &mut HeaderMap, m: &Headers) {
    for (name, value) in &m.set {
        h.insert(name.clone(), value.clone());
    }
    for (name, value) in &m.add {
        h.append(name.clone(), value.clone());
    }
    for name in &m.remove {
        h.remove(name);
    }
}

/// The path after a path change.
fn changed_path(path: &str, change: &PathChange, matched: &str) -> String {
    match change {
        PathChange::Full(p) => p.clone(),
        PathChange::Prefix(with) => {
            let rest = if matched == "/" {
                path
            } else {
                path.strip_prefix(matched).unwrap_or(path)
            };
            // `/v1/x` with prefix `/v1` replaced by `/v2` -> `/v2/x`; replaced by `/` -> `/x`.
            let with = with.trim_end_matches('/');
            let rest = rest.trim_start_matches('/');
            if rest.is_empty() {
                if with.is_empty() {
                    "/".into()
                } else {
                    with.into()
                }
            } else {
                format!("{with}/{rest}")
            }
        }
    }
}

fn path_and_query(path: String, query: Option<&str>) -> String {
    match query {
        Some(q) => format!("{path}?{q}"),
        None => path,
    }
}

/// URLRewrite: the host the upstream sees and the path. Returns false when the result is not
/// a valid URI (left unchanged).
pub fn rewrite<B>(req: &mut Request<B>, rw: &Rewrite, matched: &str) -> bool {
    let mut parts = req.uri().clone().into_parts();
    if let Some(change) = &rw.path {
        let path = changed_path(req.uri().path(), change, matched);
        match path_and_query(path, req.uri().query()).parse() {
            Ok(pq) => parts.path_and_query = Some(pq),
            Err(_) => return false,
        }
    }
    if let Some(host) = &rw.hostname {
        if parts.authority.is_some() {
            let port = req.uri().port_u16();
            let authority = match (host.to_str(), port) {
                (Ok(h), Some(p)) => format!("{h}:{p}"),
                (Ok(h), None) => h.to_string(),
                (Err(_), _) => return false,
            };
            match authority.parse() {
                Ok(a) => parts.authority = Some(a),
                Err(_) => return false,
            }
        }
        req.headers_mut().insert(http::header::HOST, host.clone());
    }
    match Uri::from_parts(parts) {
        Ok(uri) => {
            *req.uri_mut() = uri;
            true
        }
        Err(_) => false,
    }
}

/// RequestRedirect: the `Location` for the request, and the status.
pub fn redirect<B>(
    req: &Request<B>,
    host: &str,
    rd: &Redirect,
    matched: &str,
) -> Option<(http::StatusCode, String)> {
    let scheme = rd
        .scheme
        .clone()
        .or_else(|| req.uri().scheme().cloned())
        .unwrap_or(http::uri::Scheme::HTTP);
    let hostname = rd.hostname.as_deref().unwrap_or(host);
    // Gateway API: the port is the redirect's, else the scheme's default when the scheme
    // changed, else the request's.
    // An HTTP/1 request in origin form has its port in the Host header only.
    let request_port = || {
        req.uri().port_u16().or_else(|| {
            req.headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .and_then(|h| h.parse::<http::uri::Authority>().ok())
                .and_then(|a| a.port_u16())
        })
    };
    let port = rd.port.or_else(|| {
        if rd.scheme.is_some() {
            None
        } else {
            request_port()
        }
    });
    let default_port = if scheme == http::uri::Scheme::HTTPS {
        443
    } else {
        80
    };
    let authority = match port {
        Some(p) if p != default_port => format!("{hostname}:{p}"),
        _ => hostname.to_string(),
    };
    let path = match &rd.path {
        Some(change) => changed_path(req.uri().path(), change, matched),
        None => req.uri().path().to_string(),
    };
    let location = format!(
        "{scheme}://{authority}{}",
        path_and_query(path, req.uri().query())
    );
    location.parse::<Uri>().ok().map(|_| (rd.status, location))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_rewrite_keeps_the_rest_of_the_path_and_the_query() {
        let change = PathChange::Prefix("/v2".into());
        assert_eq!(changed_path("/v1/users/7", &change, "/v1"), "/v2/users/7");
        assert_eq!(changed_path("/v1", &change, "/v1"), "/v2");
        let to_root = PathChange::Prefix("/".into());
        assert_eq!(changed_path("/api/x", &to_root, "/api"), "/x");
        assert_eq!(changed_path("/api", &to_root, "/api"), "/");
        // The prefix that matched is the one replaced, and `/` prefixes everything.
        assert_eq!(changed_path("/b/x", &change, "/b"), "/v2/x");
        assert_eq!(changed_path("/x", &change, "/"), "/v2/x");

        let mut req = Request::get("http://api.demo:8080/v1/users?id=7")
            .body(())
            .unwrap();
        let ok = rewrite(
            &mut req,
            &Rewrite {
                hostname: Some(http::HeaderValue::from_static("users.internal")),
                path: Some(change),
            },
            "/v1",
        );
        assert!(ok);
        assert_eq!(req.uri(), "http://users.internal:8080/v2/users?id=7");
        assert_eq!(req.headers()[http::header::HOST], "users.internal");
    }

    #[test]
    fn a_redirect_names_the_new_location() {
        let req = Request::get("http://api.demo:8080/old/page?x=1")
            .body(())
            .unwrap();
        let rd = Redirect {
            scheme: Some(http::uri::Scheme::HTTPS),
            hostname: Some("example.com".into()),
            path: Some(PathChange::Prefix("/new".into())),
            port: None,
            status: http::StatusCode::MOVED_PERMANENTLY,
        };
        let (status, location) = redirect(&req, "api.demo", &rd, "/old").unwrap();
        assert_eq!(status, 301);
        assert_eq!(location, "https://example.com/new/page?x=1");
        let keep = Redirect {
            scheme: None,
            hostname: None,
            path: None,
            port: None,
            status: http::StatusCode::FOUND,
        };
        let (_, location) = redirect(&req, "api.demo", &keep, "/").unwrap();
        assert_eq!(location, "http://api.demo:8080/old/page?x=1");
        // HTTP/1 in origin form: the port comes from the Host header.
        let h1 = Request::get("/old/page")
            .header(http::header::HOST, "api.demo:8080")
            .body(())
            .unwrap();
        let (_, location) = redirect(&h1, "api.demo", &keep, "/").unwrap();
        assert_eq!(location, "http://api.demo:8080/old/page");
    }
}
