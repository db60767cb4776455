//! Local rate limits and route-aware authorization at the inbound proxy, end to end: callers
//! with their own mesh certificates speak HTTP/2 over mTLS to a server proxy whose config
//! carries a RateLimitPolicy (per identity, an override for one caller) and the routes of its
//! service, and an AuthorizationPolicy that allows one route only.

mod support;

use std::net::SocketAddr;

use hyper_util::rt::{TokioExecutor, TokioIo};
use palisade_api::v1;
use palisade_proxy::Proxy;
use palisade_proxy::config::Snapshot;
use support::*;

/// An HTTP/2 client over mTLS straight to the server proxy's inbound port, as `caller`.
async fn caller(pki: &Pki, server: &Proxy, caller: &str) -> H2 {
    let svid = pki.issue(caller);
    let cfg = tls_client_config(pki, Some(&svid), palisade_proxy::tls::ALPN_H2);
    let tls = within(tls_connect(server.inbound_addr, cfg))
        .await
        .expect("mTLS");
    let (send, conn) = within(hyper::client::conn::http2::handshake(
        TokioExecutor::new(),
        TokioIo::new(tls),
    ))
    .await
    .expect("HTTP/2");
    tokio::spawn(conn);
    send
}

fn get(path: &str) -> http::Request<Body> {
    http::Request::get(format!("http://api.demo{path}"))
        .body(empty())
        .expect("request")
}

fn config(rate_limit: Option<v1::RateLimit>, authz: Vec<v1::Authorization>) -> Snapshot {
    let routes = vec![v1::Route {
        namespace: "demo".into(),
        name: "api".into(),
        rules: vec![
            v1::RouteRule {
                name: "public".into(),
                matches: vec![v1::RouteMatch {
                    path: Some(v1::PathMatch {
                        kind: v1::path_match::Kind::Prefix as i32,
                        value: "/public".into(),
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            },
            v1::RouteRule {
                name: "admin".into(),
                matches: vec![v1::RouteMatch {
                    path: Some(v1::PathMatch {
                        kind: v1::path_match::Kind::Prefix as i32,
                        value: "/admin".into(),
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            },
        ],
        ..Default::default()
    }];
    Snapshot::from_proto(&v1::ProxyConfig {
        version: 2,
        inbound: Some(v1::Inbound {
            mode: v1::MtlsMode::Strict as i32,
            app_protocol: v1::Protocol::Http as i32,
            rate_limit,
            routes,
            authorization_policies: authz,
            ..Default::default()
        }),
        ..Default::default()
    })
    .expect("config")
}

/// The most a bucket of `rps` a second may admit to requests sent over `elapsed` after it was
/// last full: the burst and what refilled meanwhile (a slow machine takes longer to send).
fn at_most(rps: f64, burst: f64, elapsed: std::time::Duration) -> usize {
    (burst + (elapsed.as_secs_f64() * rps).ceil() + 1.0) as usize
}

async fn statuses(c: &mut H2, path: &str, n: usize) -> (usize, usize, Vec<Reply>) {
    let (mut ok, mut limited, mut refusals) = (0, 0, Vec::new());
    for _ in 0..n {
        let r = h2_send(c, get(path)).await.expect("response");
        match r.status.as_u16() {
            200 => ok += 1,
            429 => {
                limited += 1;
                refusals.push(r);
            }
            other => panic!("unexpected {other}"),
        }
    }
    (ok, limited, refusals)
}

/// 5 a second per caller identity, 100 for db.
fn api_limits() -> v1::RateLimit {
    v1::RateLimit {
        name: "demo/api-limits".into(),
        total_rps: 0,
        identity_rps: 5,
        overrides: vec![v1::RateLimitOverride {
            requests_per_second: 100,
            principals: vec![palisade_api::authorization::principal_match(DB)],
        }],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_identity_is_limited_alone_and_an_override_gets_its_own_rate() {
    init();
    let pki = Pki::new();
    let app: SocketAddr = echo_app().await.addr;
    let server = start_server_proxy(&pki, app, "STRICT", "http", test_timeouts()).await;
    server.apply(config(Some(api_limits()), Vec::new()));
    let mut web = caller(&pki, &server, WEB).await;
    let web_burst = std::time::Instant::now();
    let (ok, limited, refusals) = statuses(&mut web, "/public/x", 40).await;
    let web_max = at_most(5.0, 5.0, web_burst.elapsed());
    // A burst of one second's worth; a request or two more if the burst took long enough for
    // the bucket to refill (5 a second).
    assert!(
        (5..=web_max).contains(&ok),
        "web got {ok} through (at most {web_max})"
    );
    assert_eq!(ok + limited, 40);
    for r in &refusals {
        assert_eq!(r.body, "rate limited\n");
        let after: u64 = r
            .header("retry-after")
            .and_then(|v| v.parse().ok())
            .expect("Retry-After in seconds");
        assert!((1..=2).contains(&after), "Retry-After {after}");
    }
    let counted = metric(
        &server,
        "palisade_rate_limited_total",
        &[
            ("policy", "demo/api-limits"),
            ("src_identity", WEB),
            ("limit", "identity"),
        ],
    );
    assert_eq!(counted, limited as f64);

    // Another identity has its own bucket, and the override's rate is its own too.
    let mut db = caller(&pki, &server, DB).await;
    let (ok, limited, _) = statuses(&mut db, "/public/x", 40).await;
    assert_eq!((ok, limited), (40, 0), "db's override allows 100 a second");
    let mut api = caller(&pki, &server, API).await;
    let start = std::time::Instant::now();
    let (ok, _, _) = statuses(&mut api, "/public/x", 20).await;
    let api_max = at_most(5.0, 5.0, start.elapsed());
    assert!(
        (5..=api_max).contains(&ok),
        "api got {ok} through (at most {api_max})"
    );

    // A config change that keeps the policy keeps the buckets: web gets no fresh burst.
    server.apply(config(Some(api_limits()), Vec::new()));
    let (ok, _, _) = statuses(&mut web, "/public/x", 10).await;
    // What refilled since web's burst (and what it used of it), never a fresh burst of 5.
    let refilled = at_most(5.0, 0.0, web_burst.elapsed());
    assert!(
        ok <= refilled,
        "web got {ok} through right after a config change (refilled {refilled})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_can_name_the_route_and_the_route_labels_the_metrics() {
    init();
    let pki = Pki::new();
    let app: SocketAddr = echo_app().await.addr;
    let server = start_server_proxy(&pki, app, "STRICT", "http", test_timeouts()).await;
    let policy = palisade_api::policy::parse_str(
        std::path::Path::new("p.yaml"),
        "apiVersion: palisade.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: { name: public-only, namespace: demo }\nspec:\n  rules: [ { to: [ { operation: { routes: [\"demo/api/public\"] } } ] } ]\n",
    )
    .expect("policy");
    let palisade_api::policy::Resource::AuthorizationPolicy(p) = &policy[0] else {
        panic!("an AuthorizationPolicy");
    };
    let wire = v1::Authorization::try_from(p).expect("wire form");
    server.apply(config(None, vec![wire]));
    let mut web = caller(&pki, &server, WEB).await;
    let r = h2_send(&mut web, get("/public/page")).await.expect("rsp");
    assert_eq!(r.status, 200);
    let r = h2_send(&mut web, get("/admin/page")).await.expect("rsp");
    assert_eq!(r.status, 403, "the admin rule is not allowed");
    let r = h2_send(&mut web, get("/elsewhere")).await.expect("rsp");
    assert_eq!(r.status, 403, "no route matched: nothing to allow");
    for (route, status) in [("demo/api/public", "200"), ("demo/api/admin", "403")] {
        assert_eq!(
            metric(
                &server,
                "palisade_requests_total",
                &[
                    ("direction", "inbound"),
                    ("route", route),
                    ("status_code", status)
                ]
            ),
            1.0,
            "{route}"
        );
    }
}
