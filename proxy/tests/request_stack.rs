//! The outbound request stack's failure handling, end to end over real proxies: each error
//! the proxy makes has its status (or gRPC status) and its `palisade_proxy_errors_total`
//! reason; a service's request timeout answers 504 / `DEADLINE_EXCEEDED`; its retry policy
//! turns a flaky endpoint's 503s into successes for idempotent requests only, and its budget
//! caps retries when everything fails.

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

/// Requests the app saw, by path.
type Seen = Arc<Mutex<HashMap<String, usize>>>;

/// An app whose answer depends on the path: `/slow` answers after 5 s; `/flaky` answers 503
/// to its first request and 200 afterwards; `/down` always 503; anything else 200 with the
/// request's body echoed.
async fn scripted_app() -> (SocketAddr, Seen) {
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
                        let body = req.into_body().collect().await.map(|b| b.to_bytes());
                        let body = body.unwrap_or_default();
                        let status = match path.as_str() {
                            "/slow" => {
                                tokio::time::sleep(Duration::from_secs(5)).await;
                                StatusCode::OK
                            }
                            "/flaky" if n == 1 => StatusCode::SERVICE_UNAVAILABLE,
                            "/down" => StatusCode::SERVICE_UNAVAILABLE,
                            _ => StatusCode::OK,
                        };
                        let mut rsp = Response::new(Full::new(body));
                        *rsp.status_mut() = status;
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

fn seen(s: &Seen, path: &str) -> usize {
    s.lock().expect("seen").get(path).copied().unwrap_or(0)
}

/// A client proxy whose `api.demo:8080` has `extra` (YAML lines at the service's level) and
/// one endpoint, `endpoint`, expected to be `identity`.
async fn client(pki: &Pki, endpoint: &str, identity: &str, extra: &str) -> Proxy {
    let endpoints = if endpoint.is_empty() {
        "  endpoints: []\n".to_string()
    } else {
        format!("  endpoints:\n    - {{ address: \"{endpoint}\", identity: \"{identity}\" }}\n")
    };
    let yaml = format!(
        "mode: STRICT\nservices:\n- name: api.demo\n  port: 8080\n  protocol: http\n{extra}{endpoints}"
    );
    let cfg = proxy_config(pki, "web", WEB, None, &[SERVICE], &yaml);
    within(Proxy::start(cfg)).await.expect("client proxy")
}

fn errors(p: &Proxy, reason: &str) -> f64 {
    metric(
        p,
        "palisade_proxy_errors_total",
        &[("direction", "outbound"), ("reason", reason)],
    )
}

/// A gRPC call as a gRPC client makes it (HTTP/2, an absolute URI).
fn grpc_get(path: &str) -> Request<Body> {
    Request::post(format!("http://api.demo{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(full(Bytes::from_static(b"\0\0\0\0\0")))
        .expect("request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_failure_has_its_status_grpc_status_and_reason() {
    init();
    let pki = Pki::new();
    let (app, _) = scripted_app().await;
    let server = start_server_proxy(&pki, app, "STRICT", "http", test_timeouts()).await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").to_string()
    };
    let inbound = server.inbound_addr.to_string();
    let cases: [(&str, &str, &str, StatusCode, &str); 3] = [
        ("", API, "", StatusCode::SERVICE_UNAVAILABLE, "no_endpoints"),
        (&dead, API, "", StatusCode::BAD_GATEWAY, "connect_refused"),
        // The endpoint proves `api`, the config expects `db`: never trusted.
        (
            &inbound,
            DB,
            "",
            StatusCode::BAD_GATEWAY,
            "tls_handshake_failed",
        ),
    ];
    for (endpoint, identity, extra, status, reason) in cases {
        let p = client(&pki, endpoint, identity, extra).await;
        let up = upstream_addr(&p, SERVICE);
        let r = get(up, "/").await.expect("response");
        assert_eq!(r.status, status, "{reason}");
        assert_eq!(r.body, format!("{reason}\n"), "{reason}");
        assert_eq!(errors(&p, reason), 1.0, "{}", p.metrics().encode());
        // A gRPC caller gets a gRPC status instead: UNAVAILABLE.
        let mut c = h2_client(up).await;
        let g = h2_send(&mut c, grpc_get("/pkg.Svc/Method"))
            .await
            .expect("grpc");
        assert_eq!(g.status, StatusCode::OK, "{reason}");
        assert_eq!(g.header("grpc-status"), Some("14"), "{reason}");
        assert_eq!(g.header("grpc-message"), Some(reason));
        assert_eq!(errors(&p, reason), 2.0);
    }

    // A request timeout: 504, and DEADLINE_EXCEEDED over gRPC.
    let p = client(&pki, &inbound, API, "  timeout: 200ms\n").await;
    let up = upstream_addr(&p, SERVICE);
    assert_eq!(get(up, "/").await.expect("fast").status, StatusCode::OK);
    let r = get(up, "/slow").await.expect("response");
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(r.body, "request_timeout\n");
    let mut c = h2_client(up).await;
    let g = h2_send(&mut c, grpc_get("/slow")).await.expect("grpc");
    assert_eq!(g.header("grpc-status"), Some("4"), "{g:?}");
    assert_eq!(errors(&p, "request_timeout"), 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_turn_a_503_into_a_success_for_idempotent_requests_only() {
    init();
    let pki = Pki::new();
    let (app, seen_by_app) = scripted_app().await;
    let server = start_server_proxy(&pki, app, "STRICT", "http", test_timeouts()).await;
    let inbound = server.inbound_addr.to_string();
    let policy = "  retry: { codes: [503], attempts: 3, backoff: 1ms }\n";
    let p = client(&pki, &inbound, API, policy).await;
    let up = upstream_addr(&p, SERVICE);

    // A GET: the 503 is retried, the caller sees the 200.
    let r = get(up, "/flaky").await.expect("response");
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(seen(&seen_by_app, "/flaky"), 2);
    assert_eq!(
        metric(&p, "palisade_retries_total", &[("result", "retried")]),
        1.0
    );
    // A PUT with a body is idempotent: retried, with its body both times.
    let mut c = h1_client(up).await;
    let put = Request::put("/flaky-put")
        .header("host", "api.demo")
        .body(full("payload"))
        .expect("request");
    let r = h1_send(&mut c, put).await.expect("response");
    assert_eq!(
        (r.status, r.body.as_ref()),
        (StatusCode::OK, &b"payload"[..])
    );
    // A POST is never retried once sent: the caller gets the 503.
    let post = Request::post("/flaky-post")
        .header("host", "api.demo")
        .body(full("once"))
        .expect("request");
    // (/flaky-post is not scripted to fail; /down is.)
    let _ = h1_send(&mut c, post).await.expect("response");
    let post = Request::post("/down")
        .header("host", "api.demo")
        .body(full("once"))
        .expect("request");
    let r = h1_send(&mut c, post).await.expect("response");
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(seen(&seen_by_app, "/down"), 1, "a POST went out once");
    // A GET to /down: three attempts, then the 503, counted as given up.
    let r = h1_send(&mut c, get_req("/down")).await.expect("response");
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(seen(&seen_by_app, "/down"), 4);
    assert_eq!(
        metric(&p, "palisade_retries_total", &[("result", "gave_up")]),
        1.0
    );
    // Without a policy nothing is retried.
    let plain = client(&pki, &inbound, API, "").await;
    let before = seen(&seen_by_app, "/down");
    let r = get(upstream_addr(&plain, SERVICE), "/down")
        .await
        .expect("response");
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(seen(&seen_by_app, "/down"), before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_caps_retries_when_every_request_fails() {
    init();
    let pki = Pki::new();
    let (app, seen_by_app) = scripted_app().await;
    let server = start_server_proxy(&pki, app, "STRICT", "http", test_timeouts()).await;
    let policy = "  retry: { codes: [503], attempts: 3, backoff: 1ms }\n";
    let p = client(&pki, &server.inbound_addr.to_string(), API, policy).await;
    let mut c = h1_client(upstream_addr(&p, SERVICE)).await;
    const N: usize = 300;
    for _ in 0..N {
        let r = h1_send(&mut c, get_req("/down")).await.expect("response");
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    }
    let retried = metric(&p, "palisade_retries_total", &[("result", "retried")]);
    let refused = metric(
        &p,
        "palisade_retries_total",
        &[("result", "budget_exhausted")],
    );
    let sent = seen(&seen_by_app, "/down");
    println!(
        "{N} requests: {retried} retries sent, {refused} refused by the budget, {sent} reached the app"
    );
    // Unbounded, 300 requests × 2 retries = 600. The budget: a reserve of 100 (10/s over
    // 10 s) and 20% of the requests.
    assert!(retried <= 100.0 + 0.2 * N as f64 + 1.0, "{retried} retries");
    assert!(refused >= 100.0, "{refused} refused");
    assert_eq!(sent, N + retried as usize);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_is_down_is_answered_by_the_inbound_rescue_layer() {
    init();
    let pki = Pki::new();
    let dead_app = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let server = start_server_proxy(&pki, dead_app, "STRICT", "http", test_timeouts()).await;
    let p = client(&pki, &server.inbound_addr.to_string(), API, "").await;
    let r = get(upstream_addr(&p, SERVICE), "/")
        .await
        .expect("response");
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.body, "app_unavailable\n");
    // Made by the server's proxy: the request never reached an app, so it says so.
    assert_eq!(r.header("palisade-proxy-error"), Some("app_unavailable"));
    assert_eq!(
        metric(
            &server,
            "palisade_proxy_errors_total",
            &[("direction", "inbound"), ("reason", "app_unavailable")]
        ),
        1.0
    );
}

/// An app answering every request with `status` (and `Retry-After: 5` when it is 429) and
/// counting them.
async fn fixed_app(status: StatusCode) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |_req: Request<hyper::body::Incoming>| {
                        seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        async move {
                            let mut rsp = Response::new(Full::new(Bytes::from_static(b"x")));
                            *rsp.status_mut() = status;
                            if status == StatusCode::TOO_MANY_REQUESTS {
                                rsp.headers_mut()
                                    .insert("retry-after", http::HeaderValue::from_static("5"));
                            }
                            Ok::<_, std::convert::Infallible>(rsp)
                        }
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (addr, count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_answering_429_gets_no_traffic_for_its_retry_after() {
    init();
    let pki = Pki::new();
    let (busy_app, busy) = fixed_app(StatusCode::TOO_MANY_REQUESTS).await;
    let (ok_app, ok) = fixed_app(StatusCode::OK).await;
    let busy_proxy = start_server_proxy(&pki, busy_app, "STRICT", "http", test_timeouts()).await;
    let ok_proxy = start_server_proxy(&pki, ok_app, "STRICT", "http", test_timeouts()).await;
    let yaml = format!(
        "mode: STRICT\nservices:\n- name: api.demo\n  port: 8080\n  protocol: http\n  endpoints:\n    - {{ address: \"{}\", identity: \"{API}\" }}\n    - {{ address: \"{}\", identity: \"{API}\" }}\n",
        busy_proxy.inbound_addr, ok_proxy.inbound_addr
    );
    let cfg = proxy_config(&pki, "web", WEB, None, &[SERVICE], &yaml);
    let client = within(Proxy::start(cfg)).await.expect("client proxy");
    let mut c = h1_client(upstream_addr(&client, SERVICE)).await;
    let mut statuses = Vec::new();
    for _ in 0..100 {
        statuses.push(
            h1_send(&mut c, get_req("/"))
                .await
                .expect("response")
                .status,
        );
    }
    let throttled = statuses
        .iter()
        .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
        .count();
    let (b, o) = (
        busy.load(std::sync::atomic::Ordering::Relaxed),
        ok.load(std::sync::atomic::Ordering::Relaxed),
    );
    println!("100 requests: {b} reached the overloaded endpoint, {o} the other");
    // The first 429 takes it out for its Retry-After (5 s, longer than this loop).
    assert!(
        b <= 1,
        "{b} requests went to the endpoint that answered 429"
    );
    assert_eq!(throttled, b);
    assert_eq!(o, 100 - b);
    // Busy is not broken: it was not ejected.
    assert_eq!(
        metric(
            &client,
            "palisade_endpoint_ejections_total",
            &[("dst_identity", API)]
        ),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_between_proxies_closes_when_idle() {
    init();
    let pki = Pki::new();
    let (app, _) = scripted_app().await;
    let server = start_server_proxy(&pki, app, "STRICT", "http", test_timeouts()).await;
    let yaml = format!(
        "mode: STRICT\nservices:\n- name: api.demo\n  port: 8080\n  protocol: http\n  endpoints:\n    - {{ address: \"{}\", identity: \"{API}\" }}\n",
        server.inbound_addr
    );
    let mut cfg = proxy_config(&pki, "web", WEB, None, &[SERVICE], &yaml);
    cfg.timeouts.idle = Duration::from_millis(300);
    let client = within(Proxy::start(cfg)).await.expect("client proxy");
    let up = upstream_addr(&client, SERVICE);
    assert_eq!(get(up, "/").await.expect("response").status, StatusCode::OK);
    let open = || {
        metric(
            &server,
            "palisade_tcp_open_connections",
            &[("direction", "inbound")],
        )
    };
    assert_eq!(open(), 1.0, "the pooled connection is open");
    // Nothing more is sent: the client's proxy closes it within two idle periods.
    within(async {
        while open() > 0.0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // The next request dials again.
    assert_eq!(get(up, "/").await.expect("response").status, StatusCode::OK);
    assert_eq!(open(), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_opaque_connection_that_cannot_be_carried_is_reset_and_counted() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    init();
    let pki = Pki::new();
    let dead: SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let p = start_client_proxy(&pki, dead, API, "http", test_timeouts()).await;
    // The proxy resets as soon as it knows: the reset may meet the client in its connect, its
    // write or its read, but it is a reset wherever, never an orderly close.
    let up = upstream_addr(&p, RAW_SERVICE);
    let outcome: std::io::Result<usize> = async {
        let mut tcp = within(tokio::net::TcpStream::connect(up)).await?;
        tcp.write_all(b"hello").await?;
        let mut buf = [0u8; 16];
        within(tcp.read(&mut buf)).await
    }
    .await;
    assert_eq!(
        outcome.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset),
        "a reset, not an orderly close"
    );
    assert_eq!(
        errors(&p, "connect_refused"),
        1.0,
        "{}",
        p.metrics().encode()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_stream_that_idles_is_cancelled_at_the_services_idle_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    init();
    let pki = Pki::new();
    // An app that sends the headers and one chunk, then nothing for 10 s.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let app = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = tcp.read(&mut buf).await;
                let _ = tcp
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
                    )
                    .await;
                tokio::time::sleep(Duration::from_secs(10)).await;
            });
        }
    });
    let server = start_server_proxy(&pki, app, "STRICT", "http", test_timeouts()).await;
    let p = client(
        &pki,
        &server.inbound_addr.to_string(),
        API,
        "  idleTimeout: 300ms\n",
    )
    .await;
    let r = within(get(upstream_addr(&p, SERVICE), "/")).await;
    assert!(
        r.is_err(),
        "the body must end in an error, not complete: {r:?}"
    );
    assert_eq!(
        errors(&p, "stream_idle_timeout"),
        1.0,
        "{}",
        p.metrics().encode()
    );
    // A gRPC call gets a status instead: trailers with DEADLINE_EXCEEDED after the data.
    let mut c = h2_client(upstream_addr(&p, SERVICE)).await;
    let g = h2_send(&mut c, grpc_get("/pkg.Svc/Stream"))
        .await
        .expect("a whole response");
    assert_eq!(g.status, StatusCode::OK);
    assert_eq!(g.body.as_ref(), b"hello");
    let trailers = g.trailers.expect("trailers");
    assert_eq!(
        trailers.get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"4"[..])
    );
    assert_eq!(
        trailers.get("grpc-message").map(|v| v.as_bytes()),
        Some(&b"stream_idle_timeout"[..])
    );
    assert_eq!(errors(&p, "stream_idle_timeout"), 2.0);
}
