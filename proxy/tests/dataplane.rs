//! The data plane end to end over real sockets on 127.0.0.1 and real TLS:
//! client -> client proxy (`web`) -> mTLS -> server proxy (`api`) -> app, for every protocol,
//! and the ways a connection to the inbound port can go wrong.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::FutureExt;
use http::header::HOST;
use http::{HeaderMap, HeaderValue, Request, StatusCode};
use palisade_api::v1;
use palisade_proxy::Snapshot;
use palisade_proxy::config::{MtlsMode, Timeouts};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What the app must see on a request that came over mTLS from `web` to `api`.
const XFCC: &str =
    "By=spiffe://cluster.local/ns/demo/sa/api;URI=spiffe://cluster.local/ns/demo/sa/web";
/// What a client may try to send to impersonate someone.
const FORGED_XFCC: &str =
    "By=spiffe://cluster.local/ns/demo/sa/api;URI=spiffe://cluster.local/ns/kube-system/sa/admin";
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame.
const H2_SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];

fn labels_req<'a>(direction: &'a str, status: &'a str) -> [(&'a str, &'a str); 4] {
    [
        ("direction", direction),
        ("src_identity", WEB),
        ("dst_identity", API),
        ("status_code", status),
    ]
}

// ---------------------------------------------------------------------------------------------
// Protocols

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_keepalive_chunked_megabyte_echoed_byte_for_byte() {
    let app = echo_app().await;
    let m = mesh(app.addr, MeshOpts::default()).await;
    let payload = pattern(1 << 20);
    // Several requests on one keep-alive connection: if the proxy closed it, `ready` would fail.
    let mut c = h1_client(m.upstream).await;
    for round in 0..3usize {
        let path = format!("/upload/{round}");
        let req = Request::post(path.as_str())
            .header(HOST, "api.demo")
            .header("x-forwarded-client-cert", FORGED_XFCC)
            // No content-length: hyper sends the body chunked.
            .body(chunked(&payload, 16 * 1024 + round * 1000, None))
            .expect("request");
        let r = h1_send(&mut c, req).await.expect("response");
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.header("x-echo-method"), Some("POST"));
        assert_eq!(r.header("x-echo-path"), Some(path.as_str()));
        assert_eq!(r.header("x-echo-version"), Some("HTTP/1.1"));
        // The client-supplied header is replaced, not appended to.
        assert_eq!(r.header_all("x-echo-xfcc"), vec![XFCC.to_string()]);
        assert_eq!(r.body.len(), payload.len(), "round {round}: body length");
        assert!(r.body == payload, "round {round}: body differs");
    }
    // The peer identity travels to the metrics of both sides.
    wait_metric(
        &m.server,
        "palisade_requests_total",
        &labels_req("inbound", "200"),
        3.0,
    )
    .await;
    wait_metric(
        &m.client,
        "palisade_requests_total",
        &labels_req("outbound", "200"),
        3.0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_prior_knowledge_streams_and_trailers() {
    let app = echo_app().await;
    let m = mesh(app.addr, MeshOpts::default()).await;
    let c = h2_client(m.upstream).await;
    // Concurrent streams on one HTTP/2 connection, each with a body and trailers.
    let mut tasks = Vec::new();
    for i in 0..8usize {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut trailers = HeaderMap::new();
            trailers.insert("x-checksum", HeaderValue::from(i));
            let body = pattern(200 * 1024 + i * 777);
            let req = Request::post(format!("http://api.demo/h2/{i}"))
                .header("x-forwarded-client-cert", FORGED_XFCC)
                .body(chunked(&body, 10_000, Some(trailers)))
                .expect("request");
            let r = h2_send(&mut c, req).await.expect("response");
            (i, body, r)
        }));
    }
    for t in tasks {
        let (i, body, r) = within(t).await.expect("task");
        assert_eq!(r.status, StatusCode::OK);
        // The app got HTTP/2, as the client spoke it.
        assert_eq!(r.header("x-echo-version"), Some("HTTP/2.0"));
        assert_eq!(r.header("x-echo-path"), Some(format!("/h2/{i}").as_str()));
        assert_eq!(r.header_all("x-echo-xfcc"), vec![XFCC.to_string()]);
        assert!(r.body == body, "stream {i}: body differs");
        let trailers = r.trailers.expect("trailers echoed");
        assert_eq!(
            trailers.get("x-checksum"),
            Some(&HeaderValue::from(i)),
            "stream {i}: trailers"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_and_server_streaming() {
    let app = grpc_app().await;
    let m = mesh(app, MeshOpts::default()).await;
    let channel = within(
        tonic::transport::Endpoint::from_shared(format!("http://{}", m.upstream))
            .expect("endpoint")
            .connect(),
    )
    .await
    .expect("channel");

    let mut identity = v1::identity_client::IdentityClient::new(channel.clone());
    let r = within(identity.certify(v1::CertifyRequest {
        csr_der: vec![1, 2, 3],
        token: "token-1".into(),
    }))
    .await
    .expect("certify")
    .into_inner();
    assert_eq!(r.trust_domain, "token-1");
    assert_eq!(r.chain_der, vec![vec![1, 2, 3]]);
    assert_eq!(r.spiffe_id, XFCC, "the gRPC app sees the caller's identity");

    let err = within(identity.certify(v1::CertifyRequest {
        csr_der: vec![],
        token: "fail".into(),
    }))
    .await
    .expect_err("status from the app");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert_eq!(err.message(), "refused by the test app");

    let mut discovery = v1::discovery_client::DiscoveryClient::new(channel);
    let mut stream = within(discovery.watch(v1::WatchRequest {
        workload: "web".into(),
        known_version: 20,
    }))
    .await
    .expect("watch")
    .into_inner();
    let mut versions = Vec::new();
    while let Some(cfg) = within(stream.message()).await.expect("stream message") {
        assert_eq!(cfg.trust_bundle_der.len(), 1);
        assert_eq!(cfg.trust_bundle_der[0].len(), 64 * 1024);
        assert!(
            cfg.trust_bundle_der[0]
                .iter()
                .all(|&b| b == (cfg.version % 251) as u8)
        );
        versions.push(cfg.version);
    }
    assert_eq!(versions, (1..=20).collect::<Vec<u64>>());

    // A status after messages travels in the HTTP/2 trailers, through both proxies.
    let mut stream = within(discovery.watch(v1::WatchRequest {
        workload: "end-with-error".into(),
        known_version: 3,
    }))
    .await
    .expect("watch")
    .into_inner();
    let mut n = 0;
    let status = loop {
        match within(stream.message()).await {
            Ok(Some(_)) => n += 1,
            Ok(None) => panic!("stream ended without the app's status"),
            Err(s) => break s,
        }
    };
    assert_eq!(n, 3);
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert_eq!(status.message(), "end of the test stream");
}

/// Reads an HTTP/1.1 response head; returns it and any bytes read past it.
async fn read_head(tcp: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    loop {
        let mut chunk = [0u8; 1024];
        let n = within(tcp.read(&mut chunk)).await.expect("read head");
        assert!(n > 0, "closed before the response head: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i + 4]).into_owned();
            return (head, buf[i + 4..].to_vec());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_echo() {
    let app = upgrade_app().await;
    let m = mesh(app, MeshOpts::default()).await;
    let mut tcp = within(TcpStream::connect(m.upstream))
        .await
        .expect("connect");
    let req = format!(
        "GET /chat HTTP/1.1\r\nHost: api.demo\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         x-forwarded-client-cert: {FORGED_XFCC}\r\n\r\n"
    );
    within(tcp.write_all(req.as_bytes())).await.expect("write");
    let (head, rest) = read_head(&mut tcp).await;
    assert!(head.starts_with("HTTP/1.1 101"), "response: {head}");
    let xfcc: Vec<&str> = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(n, _)| n.eq_ignore_ascii_case("x-echo-xfcc"))
        .map(|(_, v)| v.trim())
        .collect();
    assert_eq!(xfcc, vec![XFCC]);
    assert!(rest.is_empty(), "unexpected bytes after 101: {rest:?}");

    // Frames both ways on the upgraded stream, of growing size.
    for i in 0..8usize {
        let msg = pattern(100 + i * 9000);
        within(tcp.write_all(&msg)).await.expect("write frame");
        let mut got = vec![0u8; msg.len()];
        within(tcp.read_exact(&mut got)).await.expect("read echo");
        assert!(got == msg, "frame {i} differs");
    }
    // Half-close: a last frame and the client's FIN; the echo of that frame still comes
    // back, then the app's own FIN.
    let last = pattern(64 * 1024);
    within(tcp.write_all(&last))
        .await
        .expect("write last frame");
    within(tcp.shutdown()).await.expect("shutdown");
    let mut tail = Vec::new();
    within(tcp.read_to_end(&mut tail))
        .await
        .expect("read to EOF");
    assert!(tail == last, "echo after the client's FIN differs");
}

/// Writes `data` and half-closes while reading the echo concurrently, then checks the whole
/// echo and the EOF; then a second connection that only reads after its FIN.
async fn tcp_echo_round_trips(addr: std::net::SocketAddr, first: &[u8]) {
    let mut data = first.to_vec();
    data.extend_from_slice(&pattern(512 * 1024));
    let tcp = within(TcpStream::connect(addr)).await.expect("connect");
    let (mut r, mut w) = tcp.into_split();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await?;
        w.shutdown().await?;
        Ok::<_, std::io::Error>(w)
    });
    let mut got = Vec::new();
    within(r.read_to_end(&mut got)).await.expect("read to EOF");
    let _w = within(writer).await.expect("writer").expect("write");
    assert_eq!(got.len(), data.len());
    assert!(got == data, "echo differs");

    // The return path stays open after the client's FIN.
    let mut tcp = within(TcpStream::connect(addr)).await.expect("connect");
    let mut msg = first.to_vec();
    msg.extend_from_slice(b" and then a FIN");
    within(tcp.write_all(&msg)).await.expect("write");
    within(tcp.shutdown()).await.expect("shutdown");
    let mut got = Vec::new();
    within(tcp.read_to_end(&mut got))
        .await
        .expect("read to EOF");
    assert_eq!(got, msg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_echo_half_close_opaque_service() {
    let app = tcp_echo_app().await;
    let m = mesh(
        app,
        MeshOpts {
            protocol: "opaque",
            ..MeshOpts::default()
        },
    )
    .await;
    // A client that starts with an HTTP-looking line: an opaque service never parses it.
    tcp_echo_round_trips(m.upstream, b"GET / HTTP/1.1\r\n").await;
    wait_metric(
        &m.client,
        "palisade_tcp_connections_total",
        &[
            ("direction", "outbound"),
            ("src_identity", WEB),
            ("dst_identity", API),
        ],
        2.0,
    )
    .await;
    wait_metric(
        &m.server,
        "palisade_tcp_connections_total",
        &[
            ("direction", "inbound"),
            ("src_identity", WEB),
            ("dst_identity", API),
        ],
        2.0,
    )
    .await;
    assert_eq!(
        metric(&m.client, "palisade_requests_total", &[]),
        0.0,
        "opaque bytes were parsed as HTTP"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_echo_half_close_detected_non_http() {
    let app = tcp_echo_app().await;
    let m = mesh(app, MeshOpts::default()).await;
    tcp_echo_round_trips(m.upstream, b"\x00\x01\x02 binary protocol hello").await;
    wait_metric(
        &m.server,
        "palisade_tcp_connections_total",
        &[("direction", "inbound"), ("src_identity", WEB)],
        2.0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_speaks_first_over_opaque_without_detection_delay() {
    let app = banner_app().await;
    // A long detect timeout, so that waiting for it cannot pass for "no delay".
    let detect = Duration::from_secs(3);
    let m = mesh(
        app,
        MeshOpts {
            timeouts: Timeouts {
                detect,
                ..test_timeouts()
            },
            ..MeshOpts::default()
        },
    )
    .await;

    // Opaque service: the app's banner arrives before the client sends anything.
    let mut tcp = within(TcpStream::connect(m.raw_upstream))
        .await
        .expect("connect");
    let mut banner = vec![0u8; BANNER.len()];
    within_for(detect / 2, tcp.read_exact(&mut banner))
        .await
        .expect("banner without detection delay");
    assert_eq!(banner, BANNER);
    within(tcp.write_all(b"ping")).await.expect("write");
    within(tcp.shutdown()).await.expect("shutdown");
    let mut rest = Vec::new();
    within(tcp.read_to_end(&mut rest))
        .await
        .expect("read to EOF");
    assert_eq!(rest, b"ping");

    // A `detect` service still gets there: after the detect timeout, the silent client's
    // connection is proxied as TCP.
    let mut tcp = within(TcpStream::connect(m.upstream))
        .await
        .expect("connect");
    let mut banner = vec![0u8; BANNER.len()];
    within(tcp.read_exact(&mut banner))
        .await
        .expect("banner after detection");
    assert_eq!(banner, BANNER);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_protocol_decides_the_version_the_app_sees() {
    // `http`: HTTP/1.1 to the app, even for an HTTP/2 client.
    let app = echo_app().await;
    let m = mesh(
        app.addr,
        MeshOpts {
            app_protocol: "http",
            ..MeshOpts::default()
        },
    )
    .await;
    let body = pattern(300 * 1024);
    let mut c = h2_client(m.upstream).await;
    let req = Request::post("http://api.demo/to-h1")
        .body(chunked(&body, 8192, None))
        .expect("request");
    let r = h2_send(&mut c, req).await.expect("response");
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-echo-version"), Some("HTTP/1.1"));
    assert_eq!(r.header_all("x-echo-xfcc"), vec![XFCC.to_string()]);
    assert!(r.body == body, "body differs");

    // `http2`: HTTP/2 prior knowledge to the app, even for an HTTP/1.1 client.
    let app = echo_app().await;
    let m = mesh(
        app.addr,
        MeshOpts {
            app_protocol: "http2",
            ..MeshOpts::default()
        },
    )
    .await;
    let mut c = h1_client(m.upstream).await;
    for i in 0..2 {
        let req = Request::post(format!("/to-h2/{i}"))
            .header(HOST, "api.demo")
            .body(chunked(&body, 8192, None))
            .expect("request");
        let r = h1_send(&mut c, req).await.expect("response");
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.header("x-echo-version"), Some("HTTP/2.0"));
        assert_eq!(r.header_all("x-echo-xfcc"), vec![XFCC.to_string()]);
        assert!(r.body == body, "body differs");
    }
}

// ---------------------------------------------------------------------------------------------
// mTLS modes and identities

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_refused_under_strict_served_under_permissive() {
    let mut app = echo_app().await;
    let m = mesh(app.addr, MeshOpts::default()).await;
    let inbound = m.server.inbound_addr;

    // STRICT (the static config's mode): the connection is closed, nothing reaches the app.
    let mut tcp = within(TcpStream::connect(inbound)).await.expect("connect");
    within(tcp.write_all(b"GET /plain HTTP/1.1\r\nHost: api.demo\r\n\r\n"))
        .await
        .expect("write");
    expect_closed(&mut tcp, "plaintext under STRICT").await;
    wait_metric(
        &m.server,
        "palisade_connections_refused_total",
        &[("direction", "inbound"), ("reason", "plaintext_strict")],
        1.0,
    )
    .await;
    assert!(app.arrivals.try_recv().is_err(), "the app saw a request");

    // PERMISSIVE: plaintext HTTP/1.1 and HTTP/2 are served; a client-supplied XFCC is dropped
    // and none is set, since nobody proved an identity.
    let mut snap = Snapshot::empty();
    snap.version = 2;
    snap.inbound.mode = MtlsMode::Permissive;
    m.server.apply(snap);

    let mut c = h1_client(inbound).await;
    let req = Request::get("/plain")
        .header(HOST, "api.demo")
        .header("x-forwarded-client-cert", FORGED_XFCC)
        .body(empty())
        .expect("request");
    let r = h1_send(&mut c, req).await.expect("plaintext HTTP/1.1");
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-echo-version"), Some("HTTP/1.1"));
    assert!(r.header_all("x-echo-xfcc").is_empty(), "{:?}", r.headers);

    let mut c2 = h2_client(inbound).await;
    let req = Request::get("http://api.demo/plain2")
        .header("x-forwarded-client-cert", FORGED_XFCC)
        .body(empty())
        .expect("request");
    let r = h2_send(&mut c2, req).await.expect("plaintext HTTP/2");
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-echo-version"), Some("HTTP/2.0"));
    assert!(r.header_all("x-echo-xfcc").is_empty());

    // mTLS keeps working, with the identity header.
    let r = get(m.upstream, "/mtls").await.expect("mTLS request");
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header_all("x-echo-xfcc"), vec![XFCC.to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_server_identity_is_a_502_and_counted() {
    let mut app = echo_app().await;
    let m = mesh(
        app.addr,
        MeshOpts {
            expected: DB,
            ..MeshOpts::default()
        },
    )
    .await;
    let r = get(m.upstream, "/").await.expect("response");
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    wait_metric(
        &m.client,
        "palisade_tls_handshake_errors_total",
        &[("direction", "outbound"), ("reason", "unexpected_identity")],
        1.0,
    )
    .await;
    // Opaque TCP to the same endpoint fails too: closed without a byte.
    let out = within(raw_http_get(m.raw_upstream, "/raw")).await;
    assert!(
        matches!(&out, Ok(b) if b.is_empty()) || out.is_err(),
        "{out:?}"
    );
    wait_metric(
        &m.client,
        "palisade_tls_handshake_errors_total",
        &[("direction", "outbound"), ("reason", "unexpected_identity")],
        2.0,
    )
    .await;
    assert!(app.arrivals.try_recv().is_err(), "the app was reached");
}

/// Connects with `cfg`, speaks HTTP/2 if the handshake seems to pass, and expects the proxy to
/// close the connection without answering.
async fn expect_tls_refused(
    addr: std::net::SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
    what: &str,
) {
    // In TLS 1.3 the client finishes first; the server's verdict on its certificate comes
    // after, as an alert.
    if let Ok(mut s) = within(tls_connect(addr, cfg)).await {
        let _ = within(s.write_all(&[H2_PREFACE, H2_SETTINGS].concat())).await;
        expect_closed(&mut s, what).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_a_mesh_certificate_are_refused() {
    let app = echo_app().await;
    let m = mesh(app.addr, MeshOpts::default()).await;
    let inbound = m.server.inbound_addr;

    // No certificate at all.
    expect_tls_refused(inbound, tls_client_config(&m.pki, None, b"h2"), "no cert").await;
    wait_metric(
        &m.server,
        "palisade_tls_handshake_errors_total",
        &[
            ("direction", "inbound"),
            ("reason", "no_client_certificate"),
        ],
        1.0,
    )
    .await;

    // A valid-looking SVID for `web`, from another CA of the same trust domain.
    let other = Pki::new();
    let foreign = other.issue(WEB);
    expect_tls_refused(
        inbound,
        tls_client_config(&m.pki, Some(&foreign), b"h2"),
        "foreign CA",
    )
    .await;
    wait_metric(
        &m.server,
        "palisade_tls_handshake_errors_total",
        &[("direction", "inbound"), ("reason", "untrusted_chain")],
        1.0,
    )
    .await;
    assert_eq!(
        metric(
            &m.server,
            "palisade_tls_connections_total",
            &[("direction", "inbound")]
        ),
        0.0
    );

    // Control: the same client with a certificate from the mesh CA is served (the proxy's
    // HTTP/2 server answers with its SETTINGS).
    let good = m.pki.issue(WEB);
    let mut s = within(tls_connect(
        inbound,
        tls_client_config(&m.pki, Some(&good), b"h2"),
    ))
    .await
    .expect("mTLS with a mesh certificate");
    within(s.write_all(&[H2_PREFACE, H2_SETTINGS].concat()))
        .await
        .expect("write");
    let mut buf = [0u8; 9];
    within(s.read_exact(&mut buf)).await.expect("SETTINGS");
    assert_eq!(buf[3], 4, "first frame is SETTINGS");
}

// ---------------------------------------------------------------------------------------------
// Pooling, credentials, hostile peers

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_http1_connections_share_a_few_tls_connections() {
    let app = echo_app().await;
    let m = mesh(app.addr, MeshOpts::default()).await;
    // Open the 50 app connections first, then send all requests at once.
    let mut clients = Vec::new();
    for _ in 0..50 {
        clients.push(h1_client(m.upstream).await);
    }
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            tokio::spawn(async move { h1_send(&mut c, get_req(&format!("/mux/{i}"))).await })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        let r = within(t).await.expect("task").expect("response");
        assert_eq!(r.status, StatusCode::OK, "request {i}");
        assert_eq!(r.header("x-echo-path"), Some(format!("/mux/{i}").as_str()));
    }
    let outbound = metric(
        &m.client,
        "palisade_tls_connections_total",
        &[("direction", "outbound")],
    );
    assert!(
        (1.0..=3.0).contains(&outbound),
        "{outbound} outbound TLS connections for 50 app connections"
    );
    let inbound = metric(
        &m.server,
        "palisade_tls_connections_total",
        &[("direction", "inbound")],
    );
    assert!(inbound <= 3.0, "{inbound} inbound TLS connections");
    wait_metric(
        &m.server,
        "palisade_requests_total",
        &labels_req("inbound", "200"),
        50.0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_swap_during_traffic_fails_no_request() {
    let app = echo_app().await;
    let m = Arc::new(mesh(app.addr, MeshOpts::default()).await);
    const PER_LOOP: usize = 60;
    let progress = Arc::new(AtomicUsize::new(0));
    let swapped = Arc::new(AtomicBool::new(false));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);

    // Three kinds of traffic: a keep-alive connection (pooled HTTP/2 between the proxies), a
    // new app connection per request, and opaque TCP (a new mTLS handshake per connection).
    let mut loops = Vec::new();
    for kind in 0..3 {
        let m = m.clone();
        let progress = progress.clone();
        loops.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            let mut done = 0;
            let mut keepalive = h1_client(m.upstream).await;
            for i in 0..PER_LOOP {
                if tokio::time::Instant::now() > deadline {
                    break;
                }
                let path = format!("/swap/{kind}/{i}");
                let ok = match kind {
                    0 => match h1_send(&mut keepalive, get_req(&path)).await {
                        Ok(r) if r.status == StatusCode::OK => true,
                        other => {
                            failures.push(format!("{path}: {other:?}"));
                            false
                        }
                    },
                    1 => match get(m.upstream, &path).await {
                        Ok(r) if r.status == StatusCode::OK => true,
                        other => {
                            failures.push(format!("{path}: {other:?}"));
                            false
                        }
                    },
                    _ => match within(raw_http_get(m.raw_upstream, &path)).await {
                        Ok(b) if b.starts_with(b"HTTP/1.1 200") => true,
                        other => {
                            failures.push(format!("{path}: {other:?}"));
                            false
                        }
                    },
                };
                if ok {
                    done += 1;
                }
                progress.fetch_add(1, Ordering::Relaxed);
            }
            (done, failures)
        }));
    }

    // Mid-way, both proxies get new certificates.
    within(async {
        while progress.load(Ordering::Relaxed) < PER_LOOP {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let new_api = m.pki.issue(API);
    let new_api_leaf = new_api.leaf().clone();
    m.server.store().install(new_api).expect("install api");
    m.client
        .store()
        .install(m.pki.issue(WEB))
        .expect("install web");
    swapped.store(true, Ordering::Relaxed);

    let mut total = 0;
    for l in loops {
        let (done, failures) = within_for(Duration::from_secs(60), l).await.expect("loop");
        assert!(failures.is_empty(), "failed requests: {failures:#?}");
        total += done;
    }
    assert!(swapped.load(Ordering::Relaxed));
    assert!(
        total > PER_LOOP,
        "only {total} requests ran; the swap was not mid-traffic"
    );

    // New handshakes present the new certificate.
    let s = within(tls_connect(
        m.server.inbound_addr,
        tls_client_config(&m.pki, Some(&m.pki.issue(WEB)), b"h2"),
    ))
    .await
    .expect("mTLS");
    let presented = s.get_ref().1.peer_certificates().expect("server cert")[0].clone();
    assert!(
        presented == new_api_leaf,
        "the server still presents the old cert"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_truncated_hello_and_slow_sender_are_closed_and_counted() {
    let app = echo_app().await;
    let m = mesh(app.addr, MeshOpts::default()).await;
    let inbound = m.server.inbound_addr;
    let connect = || async { within(TcpStream::connect(inbound)).await.expect("connect") };

    // Garbage: not TLS, so plaintext, refused under STRICT.
    let mut garbage = connect().await;
    within(garbage.write_all(b"\x00\x01\x02\xff\xfe garbage, not a protocol\r\n\r\n"))
        .await
        .expect("write");
    // Closed before sending anything.
    drop(connect().await);
    // Silent: nothing at all within the detect timeout.
    let mut silent = connect().await;
    // A ClientHello record header announcing 255 bytes, a few of them, then nothing.
    let mut truncated = connect().await;
    within(truncated.write_all(b"\x16\x03\x01\x00\xff\x01\x00\x00\xfb\x03\x03"))
        .await
        .expect("write");
    // A real ClientHello, one byte every 50 ms: slower than the handshake timeout allows.
    let hello = client_hello_bytes(&m.pki);
    let (mut slow_r, mut slow_w) = connect().await.into_split();
    let dribbler = tokio::spawn(async move {
        for b in hello {
            if slow_w.write_all(&[b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        slow_w
    });

    // Meanwhile, normal traffic is served.
    for i in 0..5 {
        let r = get(m.upstream, &format!("/normal/{i}"))
            .await
            .expect("normal request");
        assert_eq!(r.status, StatusCode::OK);
    }

    expect_closed(&mut garbage, "garbage").await;
    expect_closed(&mut silent, "silent").await;
    expect_closed(&mut truncated, "truncated ClientHello").await;
    expect_closed(&mut slow_r, "slow sender").await;
    dribbler.abort();

    wait_metric(
        &m.server,
        "palisade_connections_refused_total",
        &[("direction", "inbound"), ("reason", "plaintext_strict")],
        2.0,
    )
    .await;
    wait_metric(
        &m.server,
        "palisade_tls_handshake_errors_total",
        &[("direction", "inbound"), ("reason", "timeout")],
        2.0,
    )
    .await;
    wait_metric(
        &m.server,
        "palisade_connections_refused_total",
        &[("direction", "inbound"), ("reason", "closed_before_data")],
        1.0,
    )
    .await;
    // And after all that, still served.
    let r = get(m.upstream, "/after").await.expect("request after");
    assert_eq!(r.status, StatusCode::OK);
}

// ---------------------------------------------------------------------------------------------
// Admin and lifecycle

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints() {
    let app = echo_app().await;
    let m = mesh(app.addr, MeshOpts::default()).await;
    // Some traffic so the metrics have samples.
    assert_eq!(
        get(m.upstream, "/").await.expect("request").status,
        StatusCode::OK
    );
    for p in [&m.server, &m.client] {
        let admin = p.admin_addr;
        let r = get(admin, "/ready").await.expect("/ready");
        assert_eq!(r.status, StatusCode::OK);
        let r = get(admin, "/live").await.expect("/live");
        assert_eq!(r.status, StatusCode::OK);
        let r = get(admin, "/metrics").await.expect("/metrics");
        assert_eq!(r.status, StatusCode::OK);
        let text = String::from_utf8_lossy(&r.body).into_owned();
        assert!(
            metric_in(&text, "palisade_requests_total", &[("status_code", "200")]) >= 1.0,
            "{text}"
        );
        assert!(text.contains("palisade_identity_cert_expiry_timestamp_seconds"));
    }

    let admin = m.server.admin_addr;
    let r = get(admin, "/shutdown").await.expect("GET /shutdown");
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(
        m.server.shutdown_requested().now_or_never().is_none(),
        "GET /shutdown requested a shutdown"
    );

    // A browser's blind POST (a CORS "simple request"): no custom header, an Origin.
    let mut c = h1_client(admin).await;
    for (origin, header) in [(None, None), (Some("http://evil.example"), Some("1"))] {
        let mut req = Request::post("/shutdown")
            .header(HOST, "localhost")
            .header(http::header::CONTENT_TYPE, "text/plain");
        if let Some(o) = origin {
            req = req.header(http::header::ORIGIN, o);
        }
        if let Some(h) = header {
            req = req.header(palisade_proxy::admin::SHUTDOWN_HEADER, h);
        }
        let r = h1_send(&mut c, req.body(empty()).expect("request"))
            .await
            .expect("POST /shutdown");
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{origin:?} {header:?}");
    }
    assert!(m.server.shutdown_requested().now_or_never().is_none());

    let req = Request::post("/shutdown")
        .header(HOST, "localhost")
        .header(palisade_proxy::admin::SHUTDOWN_HEADER, "1")
        .body(empty())
        .expect("request");
    let r = h1_send(&mut c, req).await.expect("POST /shutdown");
    assert_eq!(r.status, StatusCode::OK);
    within(m.server.shutdown_requested()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_in_flight_requests() {
    let mut app = echo_app().await;
    let Mesh {
        pki: _pki,
        server,
        client,
        upstream,
        ..
    } = mesh(app.addr, MeshOpts::default()).await;
    let (client_inbound, server_inbound) = (client.inbound_addr, server.inbound_addr);
    let (client_metrics, server_metrics) = (client.metrics().clone(), server.metrics().clone());

    // Two slow requests (the app answers after 300 ms) in flight.
    let slow: Vec<_> = (0..2)
        .map(|_| tokio::spawn(async move { get(upstream, "/slow").await }))
        .collect();
    for _ in 0..2 {
        assert_eq!(within(app.arrivals.recv()).await.as_deref(), Some("/slow"));
    }

    // Both proxies drain while the requests are at the app.
    let started = tokio::time::Instant::now();
    let shutdown = tokio::spawn(async move { tokio::join!(client.shutdown(), server.shutdown()) });
    for t in slow {
        let r = within(t).await.expect("task").expect("in-flight request");
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.header("x-echo-path"), Some("/slow"));
    }
    within(shutdown).await.expect("shutdown");
    // `shutdown` returned only after both proxies had answered the in-flight requests.
    for (side, m, dir) in [
        ("client", &client_metrics, "outbound"),
        ("server", &server_metrics, "inbound"),
    ] {
        let done = metric_in(
            &m.encode(),
            "palisade_requests_total",
            &labels_req(dir, "200"),
        );
        assert_eq!(
            done, 2.0,
            "{side} proxy: shutdown returned before its requests finished"
        );
    }
    assert!(
        started.elapsed() < test_timeouts().drain,
        "shutdown waited for the drain deadline ({:?})",
        started.elapsed()
    );

    // Nothing accepts any more.
    for addr in [upstream, server_inbound, client_inbound] {
        within(async {
            while TcpStream::connect(addr).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connection_to_a_restarted_peer_is_redialed() {
    let app = echo_app().await;
    let Mesh {
        pki,
        server,
        client,
        upstream,
        ..
    } = mesh(app.addr, MeshOpts::default()).await;
    let inbound = server.inbound_addr;
    // Each round: requests on the pooled HTTP/2 connection, then the peer proxy restarts on
    // the same address (a rolling update). Keep-alive app connections span the restarts.
    let mut c = h1_client(upstream).await;
    let mut server = Some(server);
    for round in 0..5 {
        for i in 0..3 {
            let r = within(h1_send(&mut c, get_req(&format!("/r{round}/{i}"))))
                .await
                .expect("request");
            assert_eq!(r.status, StatusCode::OK, "round {round} request {i}");
            assert_eq!(r.header("x-echo-path"), Some(&*format!("/r{round}/{i}")));
        }
        if let Some(old) = server.take() {
            within(old.shutdown()).await;
        }
        server = Some(
            start_server_proxy_on(&pki, app.addr, "STRICT", "detect", test_timeouts(), inbound)
                .await,
        );
    }
    // Every request went through one of the server proxies; none failed at the client.
    let failed = metric(
        &client,
        "palisade_requests_total",
        &labels_req("outbound", "502"),
    );
    assert_eq!(failed, 0.0, "requests failed across restarts");
}
