//! Gateway API routes end to end over real proxies: a caller's proxy with `api.demo:8080`
//! (two versions behind it: `api.demo` itself and `api-v2.demo`, each a server proxy in front
//! of an app that names itself) and the routes of its static config. Each match type, each
//! filter, the weighted split, a rule's timeout and retry, fault injection, and the route
//! label on the request metrics.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use palisade_proxy::Proxy;
use support::*;
use tokio::net::TcpListener;

/// Requests each app saw, by path.
type Seen = Arc<Mutex<HashMap<String, usize>>>;

/// An app that answers `NAME PATH?QUERY` with the request's `x-*` headers echoed back as
/// response headers `echo-x-*`: `/slow` after 5 s, `/flaky` 503 on its first request.
async fn named_app(name: &'static str) -> (SocketAddr, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen: Seen = Arc::default();
    let counts = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let counts = counts.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let counts = counts.clone();
                    async move {
                        let path = req.uri().path().to_string();
                        let n = {
                            let mut c = counts.lock().expect("counts");
                            let n = c.entry(path.clone()).or_insert(0);
                            *n += 1;
                            *n
                        };
                        let target = req
                            .uri()
                            .path_and_query()
                            .map_or_else(|| path.clone(), |p| p.to_string());
                        let mut rsp =
                            Response::new(Full::new(Bytes::from(format!("{name} {target}"))));
                        for (k, v) in req.headers() {
                            if (k.as_str().starts_with("x-") || k == http::header::HOST)
                                && let Ok(h) =
                                    http::HeaderName::from_bytes(format!("echo-{k}").as_bytes())
                            {
                                rsp.headers_mut().append(h, v.clone());
                            }
                        }
                        *rsp.status_mut() = match path.as_str() {
                            "/slow" => {
                                tokio::time::sleep(Duration::from_secs(5)).await;
                                StatusCode::OK
                            }
                            "/flaky" if n == 1 => StatusCode::SERVICE_UNAVAILABLE,
                            _ => StatusCode::OK,
                        };
                        let _ = req.into_body().collect().await;
                        Ok::<_, std::convert::Infallible>(rsp)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

struct Split {
    client: Proxy,
    up: SocketAddr,
    v1_seen: Seen,
    v2_seen: Seen,
    mirror_seen: Seen,
    _servers: Vec<Proxy>,
}

/// The caller's proxy with `routes` (YAML list items, indented two spaces) over api (v1),
/// api-v2 (v2) and api-mirror (a third app, for mirrors).
async fn split(routes: &str) -> Split {
    let pki = Pki::new();
    let (v1, v1_seen) = named_app("v1").await;
    let (v2, v2_seen) = named_app("v2").await;
    let (m, mirror_seen) = named_app("mirror").await;
    let mut servers = Vec::new();
    for app in [v1, v2, m] {
        servers.push(start_server_proxy(&pki, app, "STRICT", "http", test_timeouts()).await);
    }
    let svc = |name: &str, server: &Proxy| {
        format!(
            "- name: {name}.demo\n  port: 8080\n  protocol: http\n  endpoints:\n    - {{ address: \"{}\", identity: \"{API}\" }}\n",
            server.inbound_addr
        )
    };
    let yaml = format!(
        "mode: STRICT\nservices:\n{}{}{}routes:\n{routes}",
        svc("api", &servers[0]),
        svc("api-v2", &servers[1]),
        svc("api-mirror", &servers[2]),
    );
    let cfg = proxy_config(&pki, "web", WEB, None, &[SERVICE], &yaml);
    let client = within(Proxy::start(cfg)).await.expect("client proxy");
    let up = upstream_addr(&client, SERVICE);
    Split {
        client,
        up,
        v1_seen,
        v2_seen,
        mirror_seen,
        _servers: servers,
    }
}

fn count(s: &Seen, path: &str) -> usize {
    s.lock().expect("seen").get(path).copied().unwrap_or(0)
}

/// An HTTPRoute document as a YAML list item of the static config's `routes`.
fn route_doc(name: &str, rules_yaml: &str) -> String {
    let mut s = format!(
        "- apiVersion: gateway.networking.k8s.io/v1\n  kind: HTTPRoute\n  metadata: {{ name: {name}, namespace: demo }}\n  spec:\n    parentRefs: [ {{ group: \"\", kind: Service, name: api, port: 8080 }} ]\n    rules:\n"
    );
    for line in rules_yaml.lines() {
        s.push_str("      ");
        s.push_str(line);
        s.push('\n');
    }
    s
}

async fn send(c: &mut H1, req: Request<Body>) -> Reply {
    h1_send(c, req).await.expect("response")
}

fn req(method: &str, path: &str) -> http::request::Builder {
    Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, "api.demo")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_split_traffic_within_five_percent() {
    init();
    let s = split(&route_doc(
        "canary",
        "- backendRefs:\n    - { name: api, port: 8080, weight: 80 }\n    - { name: api-v2, port: 8080, weight: 20 }",
    ))
    .await;
    let mut c = h1_client(s.up).await;
    let n = 2000;
    let mut v2 = 0;
    for _ in 0..n {
        let r = send(&mut c, req("GET", "/").body(empty()).expect("req")).await;
        assert_eq!(r.status, StatusCode::OK);
        if r.body.starts_with(b"v2") {
            v2 += 1;
        }
    }
    let share = f64::from(v2) / f64::from(n);
    assert!((share - 0.2).abs() <= 0.05, "v2 share {share}");
    assert_eq!(count(&s.v1_seen, "/") + count(&s.v2_seen, "/"), n as usize);
    // Every request is labelled with the rule that took it.
    let labelled = metric(
        &s.client,
        "palisade_requests_total",
        &[("direction", "outbound"), ("route", "demo/canary/0")],
    );
    assert_eq!(labelled, f64::from(n));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_match_type_picks_its_rule_and_nothing_else_is_routed() {
    init();
    let rules = "\
- name: header
  matches: [ { headers: [ { name: x-canary, value: \"yes\" } ] } ]
  backendRefs: [ { name: api-v2, port: 8080 } ]
- name: exact
  matches: [ { path: { type: Exact, value: /v2-only } } ]
  backendRefs: [ { name: api-v2, port: 8080 } ]
- name: regex
  matches: [ { path: { type: RegularExpression, value: \"/users/[0-9]+\" } } ]
  backendRefs: [ { name: api-v2, port: 8080 } ]
- name: query
  matches: [ { path: { type: PathPrefix, value: /q }, queryParams: [ { name: v, value: \"2\" } ] } ]
  backendRefs: [ { name: api-v2, port: 8080 } ]
- name: method
  matches: [ { path: { type: PathPrefix, value: /m }, method: DELETE } ]
  backendRefs: [ { name: api-v2, port: 8080 } ]
- name: rest
  matches: [ { path: { type: PathPrefix, value: /app } } ]
  backendRefs: [ { name: api, port: 8080 } ]";
    let s = split(&route_doc("matches", rules)).await;
    let mut c = h1_client(s.up).await;
    let cases: [(http::request::Builder, &str); 10] = [
        (req("GET", "/other").header("x-canary", "yes"), "v2"),
        // Gateway API precedence: a longer path prefix outranks header matches.
        (req("GET", "/app/x").header("x-canary", "yes"), "v1"),
        (req("GET", "/other").header("x-canary", "no"), "404"),
        (req("GET", "/v2-only"), "v2"),
        (req("GET", "/users/42"), "v2"),
        (req("GET", "/q?a=1&v=2"), "v2"),
        (req("DELETE", "/m/1"), "v2"),
        (req("GET", "/app"), "v1"),
        (req("GET", "/users/42x"), "404"),
        (req("GET", "/m/1"), "404"),
    ];
    for (i, (b, want)) in cases.into_iter().enumerate() {
        let r = send(&mut c, b.body(empty()).expect("req")).await;
        if want == "404" {
            assert_eq!(r.status, StatusCode::NOT_FOUND, "case {i}");
            assert_eq!(r.body, "no_route\n", "case {i}");
        } else {
            assert_eq!(r.status, StatusCode::OK, "case {i}");
            assert!(
                r.body.starts_with(want.as_bytes()),
                "case {i}: {:?}",
                r.body
            );
        }
    }
    assert_eq!(
        metric(
            &s.client,
            "palisade_proxy_errors_total",
            &[("reason", "no_route")]
        ),
        3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_modify_redirect_rewrite_and_mirror() {
    init();
    let rules = "\
- name: headers
  matches: [ { path: { value: /h } } ]
  filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: { set: [ { name: x-set, value: one } ], add: [ { name: x-add, value: two } ], remove: [ x-drop ] }
    - type: ResponseHeaderModifier
      responseHeaderModifier: { set: [ { name: x-served-by, value: palisade } ], remove: [ echo-x-add ] }
- name: redirect
  matches: [ { path: { value: /old } } ]
  filters:
    - type: RequestRedirect
      requestRedirect: { path: { type: ReplacePrefixMatch, replacePrefixMatch: /new }, statusCode: 301 }
- name: rewrite
  matches: [ { path: { value: /v1 } } ]
  filters:
    - type: URLRewrite
      urlRewrite: { hostname: users.internal, path: { type: ReplacePrefixMatch, replacePrefixMatch: /v2 } }
- name: mirror
  matches: [ { path: { value: /mirrored } } ]
  filters:
    - type: RequestMirror
      requestMirror: { backendRef: { name: api-mirror, port: 8080 } }";
    let s = split(&route_doc("filters", rules)).await;
    let mut c = h1_client(s.up).await;

    let r = send(
        &mut c,
        req("GET", "/h")
            .header("x-add", "zero")
            .header("x-drop", "gone")
            .body(empty())
            .expect("req"),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("echo-x-set"), Some("one"));
    assert!(
        r.header_all("echo-x-add").is_empty(),
        "removed on the way back"
    );
    assert_eq!(r.header("echo-x-drop"), None);
    assert_eq!(r.header("x-served-by"), Some("palisade"));

    let r = send(
        &mut c,
        req("GET", "/old/page?k=1").body(empty()).expect("req"),
    )
    .await;
    assert_eq!(r.status, StatusCode::MOVED_PERMANENTLY);
    assert_eq!(r.header("location"), Some("http://api.demo/new/page?k=1"));
    assert_eq!(
        count(&s.v1_seen, "/old/page"),
        0,
        "a redirect never reaches the app"
    );

    let r = send(
        &mut c,
        req("GET", "/v1/users?id=7").body(empty()).expect("req"),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, "v1 /v2/users?id=7");
    assert_eq!(r.header("echo-host"), Some("users.internal"));

    let r = send(&mut c, req("GET", "/mirrored").body(empty()).expect("req")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body.starts_with(b"v1"));
    // Fire and forget: the copy arrives on its own time.
    within(async {
        while count(&s.mirror_seen, "/mirrored") == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(count(&s.v1_seen, "/mirrored"), 1);
    assert_eq!(
        metric(
            &s.client,
            "palisade_route_mirrors_total",
            &[("result", "sent")]
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_timeout_answers_504_on_time_and_its_retry_recovers() {
    init();
    let rules = "\
- name: slow
  matches: [ { path: { type: Exact, value: /slow } } ]
  timeouts: { request: 300ms }
- name: flaky
  matches: [ { path: { type: Exact, value: /flaky } } ]
  retry: { codes: [503], attempts: 2, backoff: 10ms }
- name: per-attempt
  matches: [ { path: { type: Exact, value: /slow-twice } } ]
  timeouts: { request: 3s, backendRequest: 200ms }
  filters:
    - type: URLRewrite
      urlRewrite: { path: { type: ReplaceFullPath, replaceFullPath: /slow } }
  retry: { codes: [503], attempts: 1, backoff: 10ms }";
    let s = split(&route_doc("calls", rules)).await;
    let mut c = h1_client(s.up).await;
    let start = std::time::Instant::now();
    let r = send(&mut c, req("GET", "/slow").body(empty()).expect("req")).await;
    let took = start.elapsed();
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "504 after {took:?}"
    );
    assert_eq!(
        metric(
            &s.client,
            "palisade_requests_total",
            &[("route", "demo/calls/slow"), ("status_code", "504")]
        ),
        1.0,
        "the error response carries the route label"
    );
    let r = send(&mut c, req("GET", "/flaky").body(empty()).expect("req")).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "the rule's retry turned the 503 into a 200"
    );
    assert_eq!(count(&s.v1_seen, "/flaky"), 2);
    assert_eq!(
        metric(
            &s.client,
            "palisade_retries_total",
            &[("result", "retried")]
        ),
        1.0
    );
    // Each attempt has 200 ms: two attempts, then 504, before the request's own 3 s.
    let start = std::time::Instant::now();
    let r = send(
        &mut c,
        req("GET", "/slow-twice").body(empty()).expect("req"),
    )
    .await;
    let took = start.elapsed();
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_millis(2900),
        "{took:?}"
    );
    within(async {
        while count(&s.v1_seen, "/slow") < 3 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(
        metric(
            &s.client,
            "palisade_retries_total",
            &[("result", "retried")]
        ),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_hits_its_configured_fraction_and_is_counted() {
    init();
    let routes = format!(
        "{}- apiVersion: palisade.dev/v1alpha1\n  kind: HTTPFault\n  metadata: {{ name: chaos, namespace: demo }}\n  spec: {{ abort: {{ httpStatus: 503, percentage: 25 }}, delay: {{ fixedDelay: 1ms, percentage: 10 }} }}\n",
        route_doc(
            "faulty",
            "- filters:\n    - type: ExtensionRef\n      extensionRef: { group: palisade.dev, kind: HTTPFault, name: chaos }"
        )
    );
    let s = split(&routes).await;
    let mut c = h1_client(s.up).await;
    let n = 2000u32;
    let mut aborted = 0u32;
    for _ in 0..n {
        let r = send(&mut c, req("GET", "/").body(empty()).expect("req")).await;
        match r.status {
            StatusCode::OK => {}
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(r.body, "fault injected\n");
                aborted += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    let share = f64::from(aborted) / f64::from(n);
    assert!((share - 0.25).abs() <= 0.05, "aborted share {share}");
    let counted = metric(
        &s.client,
        "palisade_faults_injected_total",
        &[("fault", "demo/chaos"), ("kind", "abort")],
    );
    assert_eq!(counted, f64::from(aborted));
    let delayed = metric(
        &s.client,
        "palisade_faults_injected_total",
        &[("fault", "demo/chaos"), ("kind", "delay")],
    );
    assert!(
        (delayed / f64::from(n) - 0.10).abs() <= 0.04,
        "delayed {delayed}"
    );
    // An aborted request never reached the app.
    assert_eq!(count(&s.v1_seen, "/") as u32, n - aborted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_route_matches_methods_and_answers_unimplemented_otherwise() {
    init();
    let routes = "- apiVersion: gateway.networking.k8s.io/v1\n  kind: GRPCRoute\n  metadata: { name: rpc, namespace: demo }\n  spec:\n    parentRefs: [ { kind: Service, name: api, port: 8080 } ]\n    rules:\n      - matches: [ { method: { service: demo.Users, method: Get } } ]\n        backendRefs: [ { name: api-v2, port: 8080 } ]\n";
    let s = split(routes).await;
    let mut c = h2_client(s.up).await;
    let call = |path: &str| {
        Request::post(format!("http://api.demo{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(full(Bytes::from_static(b"\0\0\0\0\0")))
            .expect("request")
    };
    let r = h2_send(&mut c, call("/demo.Users/Get")).await.expect("rsp");
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body.starts_with(b"v2"));
    let r = h2_send(&mut c, call("/demo.Users/Delete"))
        .await
        .expect("rsp");
    assert_eq!(r.header("grpc-status"), Some("12"), "{r:?}");
}

#[test]
fn a_bad_route_in_a_static_config_is_refused_naming_the_field() {
    let pki = Pki::new();
    let yaml = format!(
        "mode: STRICT\nservices: []\nroutes:\n{}",
        route_doc(
            "bad",
            "- matches: [ { path: { type: RegularExpression, value: \"(\" } } ]"
        )
    );
    let cfg = proxy_config(&pki, "web", WEB, None, &[], &yaml);
    let path = cfg.static_config.clone().expect("static");
    let err = palisade_proxy::config::Snapshot::load_static(&path)
        .expect_err("a broken regex must be refused")
        .to_string();
    assert!(err.contains("spec.rules[0].matches[0].path.value"), "{err}");
}
