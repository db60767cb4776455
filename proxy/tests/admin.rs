//! The admin port under abuse: slow clients, too many clients, and a `/shutdown` nobody
//! asked for.

mod support;

use http::{Request, StatusCode};
use palisade_proxy::Proxy;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_off_unless_enabled() {
    init();
    let pki = Pki::new();
    let app = echo_app().await;
    let mut cfg = proxy_config(
        &pki,
        "api",
        API,
        Some(app.addr),
        &[],
        "mode: STRICT\nservices: []\n",
    );
    cfg.admin_shutdown = false;
    let p = within(Proxy::start(cfg)).await.expect("proxy");
    let mut c = h1_client(p.admin_addr).await;
    let req = Request::post("/shutdown")
        .header("host", "localhost")
        .header(palisade_proxy::admin::SHUTDOWN_HEADER, "1")
        .body(empty())
        .expect("request");
    let r = h1_send(&mut c, req).await.expect("response");
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    use futures_util::FutureExt;
    assert!(p.shutdown_requested().now_or_never().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_capped_and_timed_out() {
    let app = echo_app().await;
    let m = mesh(app.addr, MeshOpts::default()).await;
    let admin = m.server.admin_addr;
    let cap = palisade_proxy::admin::MAX_CONNECTIONS;
    // Every slot taken by a client that never finishes its headers, and more knocking.
    let mut slow = Vec::new();
    for _ in 0..cap + 20 {
        let mut tcp = within(TcpStream::connect(admin)).await.expect("connect");
        let _ = tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").await;
        slow.push(tcp);
    }
    wait_metric(
        &m.server,
        "palisade_connections_refused_total",
        &[
            ("direction", "inbound"),
            ("reason", "admin_connection_limit"),
        ],
        20.0,
    )
    .await;
    // The header deadline frees the slots: the first slow client is closed by the server.
    expect_closed(&mut slow[0], "slow admin client").await;
    // And a real probe is answered again.
    within(async {
        loop {
            if let Ok(r) = get(admin, "/ready").await
                && r.status == StatusCode::OK
            {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_transparent_listener_counts_against_the_connection_limit() {
    // One connection allowed; an app connection on the upstream listener holds it. A
    // redirected connection must be refused for the limit, before anything else is tried
    // (and so, like every other connection, it holds a permit that shutdown drains).
    init();
    let pki = Pki::new();
    let yaml = "mode: STRICT\nservices:\n- name: api.demo\n  port: 8080\n  protocol: http\n  endpoints: []\n";
    let mut cfg = proxy_config(&pki, "web", WEB, None, &[SERVICE], yaml);
    cfg.limits.max_connections = 1;
    cfg.transparent_addr = Some("127.0.0.1:0".parse().expect("addr"));
    let p = within(Proxy::start(cfg)).await.expect("proxy");
    let mut held = within(TcpStream::connect(upstream_addr(&p, SERVICE)))
        .await
        .expect("connect");
    // An established connection: it has said what it speaks (a silent one would give its
    // slot to the newcomer, proxy/src/admission.rs). No endpoint: 503, and it stays open.
    within(held.write_all(b"GET / HTTP/1.1\r\nhost: api.demo\r\n\r\n"))
        .await
        .expect("write");
    let mut head = [0u8; 12];
    within(held.read_exact(&mut head)).await.expect("response");
    assert_eq!(&head[9..12], b"503");
    wait_metric(
        &p,
        "palisade_tcp_open_connections",
        &[("direction", "outbound")],
        1.0,
    )
    .await;
    let transparent = p.transparent_addr.expect("transparent listener");
    let mut t = within(TcpStream::connect(transparent))
        .await
        .expect("connect");
    expect_closed(&mut t, "over the limit").await;
    wait_metric(
        &p,
        "palisade_connections_refused_total",
        &[("direction", "outbound"), ("reason", "connection_limit")],
        1.0,
    )
    .await;
    assert_eq!(
        metric(
            &p,
            "palisade_connections_refused_total",
            &[
                ("direction", "outbound"),
                ("reason", "no_original_destination")
            ]
        ),
        0.0,
        "the limit is checked first"
    );
}

/// The kubelet's probes, rewritten by the injector to the admin port, reach the app on
/// loopback while the inbound port refuses plaintext (STRICT).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewritten_kubelet_probes_are_run_against_the_app() {
    init();
    let pki = Pki::new();
    let app = echo_app().await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let json = format!(
        r#"{{"/app-health/api/readyz":{{"httpGet":{{"port":{app},"path":"/healthz"}}}},
            "/app-health/api/livez":{{"tcpSocket":{{"port":{app}}}}},
            "/app-health/api/startupz":{{"tcpSocket":{{"port":{closed}}}}}}}"#,
        app = app.addr.port()
    );
    let mut cfg = proxy_config(
        &pki,
        "api",
        API,
        Some(app.addr),
        &[],
        "mode: STRICT\nservices: []\n",
    );
    cfg.app_probes = std::sync::Arc::new(palisade_api::app_probe::parse(&json).expect("probes"));
    let p = within(Proxy::start(cfg)).await.expect("proxy");
    let r = within(get(p.admin_addr, "/app-health/api/readyz"))
        .await
        .expect("readiness");
    assert_eq!(r.status, StatusCode::OK);
    let r = within(get(p.admin_addr, "/app-health/api/livez"))
        .await
        .expect("liveness");
    assert_eq!(r.status, StatusCode::OK);
    let r = within(get(p.admin_addr, "/app-health/api/startupz"))
        .await
        .expect("startup");
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(String::from_utf8_lossy(&r.body).contains("probe failed"));
    // A path the injector did not write is not a way to reach the app.
    let r = within(get(p.admin_addr, "/app-health/api/other"))
        .await
        .expect("unknown");
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    // The same app through the inbound port in plaintext: refused under STRICT.
    let refused = within(get(p.inbound_addr, "/healthz")).await;
    assert!(
        refused
            .as_ref()
            .map_or(true, |r| r.status != StatusCode::OK),
        "plaintext reached the app: {:?}",
        refused.map(|r| r.status)
    );
}
