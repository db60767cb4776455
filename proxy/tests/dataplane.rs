//! client -> proxy -> mTLS -> proxy -> app, over real sockets and real TLS, for every protocol
//! the data plane handles, and the ways a connection can go wrong.

mod support;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use palisade_api::v1;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn http1_chunked_megabyte_and_identity_header() {
    let app = echo_app().await;
    let m = mesh(app, "detect", "detect").await;
    // A 1 MiB body sent chunked (no content-length), on a keep-alive connection.
    let mut s = h1(m.upstream).await;
    let payload: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
    for round in 0..2 {
        let chunks: Vec<Result<Frame<Bytes>, std::io::Error>> = payload
            .chunks(64 * 1024)
            .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
            .collect();
        let body = StreamBody::new(futures_util::stream::iter(chunks));
        let req = Request::builder()
            .method("POST")
            .uri("/upload")
            .header("host", "api.demo")
            // A client may not tell the app who it is: the inbound proxy replaces this.
            .header(
                "x-forwarded-client-cert",
                "By=evil;URI=spiffe://cluster.local/ns/x/sa/admin",
            )
            .body(body.boxed())
            .expect("request");
        let mut sender = {
            let tcp = TcpStream::connect(m.upstream).await.expect("connect");
            let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .expect("handshake");
            tokio::spawn(conn);
            send
        };
        let rsp = within(sender.send_request(req)).await.expect("response");
        assert_eq!(rsp.status(), 200, "round {round}");
        let body = within(rsp.into_body().collect())
            .await
            .expect("body")
            .to_bytes();
        let (head, echoed) = body
            .iter()
            .position(|&b| b == b'\n')
            .map(|i| (&body[..i], &body[i + 1..]))
            .expect("head line");
        let head = String::from_utf8_lossy(head);
        assert!(
            head.contains("method=POST path=/upload version=HTTP/1.1"),
            "{head}"
        );
        assert!(
            head.contains(&format!("xfcc=By={API};URI={WEB}")),
            "the app must see the verified caller only: {head}"
        );
        assert_eq!(echoed.len(), payload.len());
        assert!(echoed == payload.as_slice(), "body changed in transit");
    }
    // Keep-alive: the same app connection serves several requests.
    for _ in 0..3 {
        let req = Request::builder()
            .uri("/again")
            .header("host", "api.demo")
            .body(Full::new(Bytes::new()))
            .expect("request");
        within(s.ready()).await.expect("ready");
        let rsp = within(s.send_request(req)).await.expect("response");
        assert_eq!(rsp.status(), 200);
        within(rsp.into_body().collect()).await.expect("body");
    }
    assert!(
        metric(
            &m.client,
            "palisade_requests_total",
            &["outbound", "status_code=\"200\""]
        ) >= 5.0
    );
    assert!(
        metric(
            &m.server,
            "palisade_requests_total",
            &["inbound", &format!("src_identity=\"{WEB}\"")]
        ) >= 5.0
    );
}

#[tokio::test]
async fn http2_prior_knowledge_reaches_the_app_as_http2() {
    let app = echo_app().await;
    let m = mesh(app, "detect", "detect").await;
    let tcp = TcpStream::connect(m.upstream).await.expect("connect");
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let req = Request::builder()
        .uri("http://api.demo/h2")
        .body(Full::new(Bytes::from_static(b"hi")))
        .expect("request");
    let rsp = within(send.send_request(req)).await.expect("response");
    assert_eq!(rsp.status(), 200);
    let body = within(rsp.into_body().collect())
        .await
        .expect("body")
        .to_bytes();
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("path=/h2 version=HTTP/2.0"), "{text}");
    assert!(text.ends_with("hi"), "{text}");
}

#[tokio::test]
async fn http_app_protocol_gets_http1_whatever_the_client_spoke() {
    let app = echo_app().await;
    let m = mesh(app, "http", "http").await;
    let tcp = TcpStream::connect(m.upstream).await.expect("connect");
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let req = Request::builder()
        .uri("http://api.demo/x")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let rsp = within(send.send_request(req)).await.expect("response");
    let body = within(rsp.into_body().collect())
        .await
        .expect("body")
        .to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("version=HTTP/1.1"));
}

struct GrpcApp;

#[tonic::async_trait]
impl v1::identity_server::Identity for GrpcApp {
    async fn certify(
        &self,
        req: tonic::Request<v1::CertifyRequest>,
    ) -> Result<tonic::Response<v1::CertifyResponse>, tonic::Status> {
        Ok(tonic::Response::new(v1::CertifyResponse {
            spiffe_id: format!("echo:{}", req.into_inner().token),
            ..Default::default()
        }))
    }
}

type WatchStream =
    Pin<Box<dyn futures_util::Stream<Item = Result<v1::ProxyConfig, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl v1::discovery_server::Discovery for GrpcApp {
    type WatchStream = WatchStream;
    async fn watch(
        &self,
        req: tonic::Request<v1::WatchRequest>,
    ) -> Result<tonic::Response<WatchStream>, tonic::Status> {
        let n = req.into_inner().known_version;
        let items = (1..=n).map(|v| {
            Ok(v1::ProxyConfig {
                version: v,
                ..Default::default()
            })
        });
        Ok(tonic::Response::new(Box::pin(futures_util::stream::iter(
            items,
        ))))
    }
}

#[tokio::test]
async fn grpc_unary_and_streaming() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let app = l.local_addr().expect("addr");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(v1::identity_server::IdentityServer::new(GrpcApp))
            .add_service(v1::discovery_server::DiscoveryServer::new(GrpcApp))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(l)),
    );
    let m = mesh(app, "grpc", "grpc").await;
    let ch = within(
        tonic::transport::Endpoint::from_shared(format!("http://{}", m.upstream))
            .expect("endpoint")
            .connect(),
    )
    .await
    .expect("connect");
    let rsp = within(
        v1::identity_client::IdentityClient::new(ch.clone()).certify(v1::CertifyRequest {
            token: "ping".into(),
            ..Default::default()
        }),
    )
    .await
    .expect("unary");
    assert_eq!(rsp.into_inner().spiffe_id, "echo:ping");
    let mut stream = within(v1::discovery_client::DiscoveryClient::new(ch).watch(
        v1::WatchRequest {
            workload: "x".into(),
            known_version: 50,
        },
    ))
    .await
    .expect("stream")
    .into_inner();
    let mut versions = Vec::new();
    while let Some(msg) = within(stream.message()).await.expect("message") {
        versions.push(msg.version);
    }
    // Trailers made it through: the stream ended with an OK status, every message in order.
    assert_eq!(versions, (1..=50).collect::<Vec<_>>());
}

#[tokio::test]
async fn websocket_style_upgrade_echo() {
    let app = echo_upgrade_app().await;
    let m = mesh(app, "detect", "detect").await;
    let mut tcp = TcpStream::connect(m.upstream).await.expect("connect");
    tcp.write_all(
        b"GET /ws HTTP/1.1\r\nHost: api.demo\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .expect("write");
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        within(tcp.read_exact(&mut b)).await.expect("read head");
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    for msg in [&b"hello"[..], b"world, over the upgraded stream"] {
        tcp.write_all(msg).await.expect("write");
        let mut got = vec![0u8; msg.len()];
        within(tcp.read_exact(&mut got)).await.expect("echo");
        assert_eq!(got, msg);
    }
}

/// Answers an Upgrade with 101, then echoes raw bytes.
async fn echo_upgrade_app() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |mut req: Request<hyper::body::Incoming>| async move {
                        let up = hyper::upgrade::on(&mut req);
                        tokio::spawn(async move {
                            if let Ok(io) = up.await {
                                let mut io = TokioIo::new(io);
                                let mut buf = [0u8; 1024];
                                loop {
                                    match io.read(&mut buf).await {
                                        Ok(0) | Err(_) => return,
                                        Ok(n) => {
                                            if io.write_all(&buf[..n]).await.is_err() {
                                                return;
                                            }
                                        }
                                    }
                                }
                            }
                        });
                        let rsp = http::Response::builder()
                            .status(101)
                            .header("connection", "upgrade")
                            .header("upgrade", "websocket")
                            .body(Full::new(Bytes::new()))
                            .expect("101");
                        Ok::<_, std::convert::Infallible>(rsp)
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

async fn tcp_echo_roundtrip(upstream: std::net::SocketAddr, first: &[u8]) {
    let mut tcp = TcpStream::connect(upstream).await.expect("connect");
    tcp.write_all(first).await.expect("write");
    tcp.write_all(b" and more").await.expect("write");
    // Half-close: we are done sending; the echo must still come back, then EOF.
    tcp.shutdown().await.expect("shutdown write");
    let mut got = Vec::new();
    within(tcp.read_to_end(&mut got))
        .await
        .expect("read to EOF");
    let mut want = first.to_vec();
    want.extend_from_slice(b" and more");
    assert_eq!(got, want);
}

#[tokio::test]
async fn opaque_tcp_echo_with_half_close() {
    let app = tcp_echo_app().await;
    let m = mesh(app, "opaque", "opaque").await;
    tcp_echo_roundtrip(m.upstream, b"\x00\x01binary hello").await;
    assert!(
        metric(
            &m.server,
            "palisade_tcp_connections_total",
            &["inbound", WEB]
        ) >= 1.0
    );
    assert!(metric(&m.client, "palisade_tcp_bytes_total", &["outbound"]) > 0.0);
}

#[tokio::test]
async fn detected_non_http_bytes_go_as_tcp() {
    let app = tcp_echo_app().await;
    let m = mesh(app, "detect", "detect").await;
    tcp_echo_roundtrip(m.upstream, b"\x16\x00not http, not tls").await;
}

#[tokio::test]
async fn plaintext_refused_under_strict_served_under_permissive() {
    let app = echo_app().await;
    let m = mesh(app, "detect", "detect").await;
    let mut tcp = TcpStream::connect(m.server.inbound_addr)
        .await
        .expect("connect");
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut buf = Vec::new();
    let r = within(tcp.read_to_end(&mut buf)).await;
    assert!(
        r.is_err() || buf.is_empty(),
        "STRICT answered plaintext: {buf:?}"
    );
    assert_eq!(
        metric(
            &m.server,
            "palisade_connections_refused_total",
            &["plaintext_strict"]
        ),
        1.0
    );
    // PERMISSIVE: plaintext reaches the app, with no identity header.
    m.server
        .apply(snapshot_yaml(&m.pki, "permissive", "mode: PERMISSIVE\n"));
    let (status, body) = within(get(m.server.inbound_addr, "/plain")).await;
    assert_eq!(status, 200);
    assert!(
        body.contains("path=/plain") && body.contains("xfcc=-"),
        "{body}"
    );
}

#[tokio::test]
async fn wrong_server_identity_fails_the_request() {
    let app = echo_app().await;
    let m = mesh_with(
        app,
        "detect",
        "detect",
        "STRICT",
        "spiffe://cluster.local/ns/demo/sa/db",
    )
    .await;
    let (status, _) = within(get(m.upstream, "/")).await;
    assert_eq!(status, 502);
    assert!(
        metric(
            &m.client,
            "palisade_tls_handshake_errors_total",
            &["outbound"]
        ) >= 1.0,
        "{}",
        m.client.metrics().encode()
    );
    assert!(
        metric(
            &m.client,
            "palisade_tls_handshake_errors_total",
            &["unexpected_identity"]
        ) >= 1.0
    );
}

async fn tls_connect(
    inbound: std::net::SocketAddr,
    cfg: rustls::ClientConfig,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(inbound).await?;
    let c = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let mut s = c.connect(palisade_proxy::tls::server_name(), tcp).await?;
    // TLS 1.3: the server checks the client certificate after the client's Finished; a
    // refusal shows up on the first read.
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    let mut b = [0u8; 1];
    match s.read(&mut b).await? {
        0 => Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed",
        )),
        _ => Ok(s),
    }
}

#[tokio::test]
async fn clients_without_a_mesh_certificate_are_refused() {
    let app = echo_app().await;
    let m = mesh(app, "detect", "detect").await;
    let api = palisade_certs::SpiffeId::parse(API).expect("id");
    // No client certificate at all.
    let empty = palisade_certs::CredentialStore::new(
        palisade_certs::SpiffeId::parse(WEB).expect("id"),
        palisade_certs::TrustBundle::load_pem(&m.pki.td, &m.pki.bundle()).expect("bundle"),
    );
    let cfg = palisade_certs::tls::client_config(&empty, api.clone(), &[b"http/1.1"]).expect("cfg");
    assert!(
        within(tls_connect(m.server.inbound_addr, cfg))
            .await
            .is_err()
    );
    // A certificate from another CA with the right-looking identity.
    let other = Pki::new();
    let store = palisade_certs::CredentialStore::new(
        palisade_certs::SpiffeId::parse(WEB).expect("id"),
        palisade_certs::TrustBundle::load_pem(&m.pki.td, &m.pki.bundle()).expect("bundle"),
    );
    store.install(other.svid(WEB)).expect("install");
    let cfg = palisade_certs::tls::client_config(&store, api, &[b"http/1.1"]).expect("cfg");
    assert!(
        within(tls_connect(m.server.inbound_addr, cfg))
            .await
            .is_err()
    );
    assert!(
        tokio::time::timeout(T, async {
            loop {
                let n = metric(
                    &m.server,
                    "palisade_tls_handshake_errors_total",
                    &["inbound"],
                );
                if n >= 2.0 {
                    return n;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .is_ok(),
        "{}",
        m.server.metrics().encode()
    );
    // A real mesh client still works.
    assert_eq!(within(get(m.upstream, "/")).await.0, 200);
}

#[tokio::test]
async fn fifty_app_connections_share_few_mtls_connections() {
    let app = echo_app().await;
    let m = mesh(app, "detect", "detect").await;
    // Warm the pool so concurrent first requests do not each race to dial.
    assert_eq!(within(get(m.upstream, "/warm")).await.0, 200);
    let mut tasks = Vec::new();
    for i in 0..50 {
        let up = m.upstream;
        tasks.push(tokio::spawn(
            async move { get(up, &format!("/c{i}")).await },
        ));
    }
    for t in tasks {
        assert_eq!(within(t).await.expect("task").0, 200);
    }
    let tls = metric(&m.client, "palisade_tls_connections_total", &["outbound"]);
    assert!(
        (1.0..=3.0).contains(&tls),
        "{tls} mTLS connections for 51 requests"
    );
    assert!(metric(&m.client, "palisade_tcp_open_connections", &["outbound"]) <= 50.0);
}

#[tokio::test]
async fn credential_swap_under_traffic_fails_nothing() {
    let app = echo_app().await;
    let m = Arc::new(mesh(app, "detect", "detect").await);
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (m, ok, failed) = (m.clone(), ok.clone(), failed.clone());
        workers.push(tokio::spawn(async move {
            for i in 0..150 {
                // Alternate between a kept-alive connection and fresh ones.
                let (s, _) = get(m.upstream, &format!("/r{i}")).await;
                if s == 200 {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let before_serial = m
        .server
        .store()
        .current()
        .expect("creds")
        .svid
        .leaf()
        .clone();
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        m.server
            .store()
            .install(m.pki.svid(API))
            .expect("server swap");
        m.client
            .store()
            .install(m.pki.svid(WEB))
            .expect("client swap");
    }
    for w in workers {
        within(w).await.expect("worker");
    }
    assert_ne!(
        m.server.store().current().expect("creds").svid.leaf(),
        &before_serial
    );
    assert_eq!(failed.load(Ordering::Relaxed), 0);
    assert_eq!(ok.load(Ordering::Relaxed), 600);
}

#[tokio::test]
async fn garbage_truncated_hello_and_slow_senders_are_closed_and_counted() {
    let app = echo_app().await;
    let m = mesh(app, "detect", "detect").await;
    let inbound = m.server.inbound_addr;
    // Garbage bytes (not TLS; STRICT refuses them).
    let mut g = TcpStream::connect(inbound).await.expect("connect");
    g.write_all(&[0xde, 0xad, 0xbe, 0xef, 0, 1, 2, 3])
        .await
        .expect("write");
    // A truncated ClientHello that then stalls.
    let mut t = TcpStream::connect(inbound).await.expect("connect");
    t.write_all(&[0x16, 0x03, 0x01, 0x00, 0xff, 0x01, 0x00])
        .await
        .expect("write");
    // A slow sender: connects and says nothing.
    let mut s = TcpStream::connect(inbound).await.expect("connect");
    // Meanwhile normal traffic works.
    assert_eq!(within(get(m.upstream, "/ok")).await.0, 200);
    for (name, c) in [("garbage", &mut g), ("truncated", &mut t), ("slow", &mut s)] {
        let mut buf = Vec::new();
        let r = within(c.read_to_end(&mut buf)).await;
        assert!(r.is_err() || buf.is_empty(), "{name}: got {buf:?}");
    }
    let refused = metric(
        &m.server,
        "palisade_connections_refused_total",
        &["inbound"],
    );
    let hs = metric(
        &m.server,
        "palisade_tls_handshake_errors_total",
        &["inbound", "timeout"],
    );
    assert!(
        refused >= 2.0,
        "garbage and slow sender: {}",
        m.server.metrics().encode()
    );
    assert!(
        hs >= 1.0,
        "truncated ClientHello: {}",
        m.server.metrics().encode()
    );
    assert_eq!(within(get(m.upstream, "/still-ok")).await.0, 200);
}

#[tokio::test]
async fn admin_endpoints_and_graceful_shutdown() {
    let app = echo_app().await;
    let m = mesh(app, "detect", "detect").await;
    let admin = m.server.admin_addr;
    assert_eq!(within(get(admin, "/ready")).await.0, 200);
    assert_eq!(within(get(admin, "/live")).await.0, 200);
    let (s, body) = within(get(admin, "/metrics")).await;
    assert_eq!(s, 200);
    assert!(body.contains("palisade_identity_cert_expiry_timestamp_seconds"));
    assert_eq!(within(get(admin, "/shutdown")).await.0, 405);

    // POST /shutdown from loopback resolves shutdown_requested().
    let waiter = async { m.server.shutdown_requested().await };
    let poster = async {
        let mut s = h1(admin).await;
        let req = Request::builder()
            .method("POST")
            .uri("/shutdown")
            .header("host", "x")
            .body(Full::new(Bytes::new()))
            .expect("req");
        s.send_request(req).await.expect("post").status().as_u16()
    };
    let ((), status) = within(async { tokio::join!(waiter, poster) }).await;
    assert_eq!(status, 200);

    // A slow request in flight finishes while the client proxy shuts down.
    let up = m.upstream;
    let slow = tokio::spawn(async move { get(up, "/slow").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let Mesh { client, .. } = m;
    within(client.shutdown()).await;
    let (status, body) = within(slow).await.expect("slow request");
    assert_eq!(status, 200, "{body}");
    assert!(
        TcpStream::connect(up).await.is_err(),
        "listener still open after shutdown"
    );
}
