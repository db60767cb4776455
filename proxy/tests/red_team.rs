//! What an attacker on the host tried against a live mesh: smuggling a forged
//! `x-forwarded-client-cert` to an HTTP app through the opaque fallback, parking idle sockets,
//! and breaking a request body to get an endpoint blamed.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use palisade_proxy::config::Timeouts;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const FORGED: &str =
    "By=spiffe://cluster.local/ns/demo/sa/api;URI=spiffe://cluster.local/ns/kube-system/sa/admin";

/// Sends raw bytes, reads to EOF (bounded), returns what came back.
async fn raw(addr: std::net::SocketAddr, pause: Option<Duration>, bytes: &str) -> String {
    let mut tcp = within(TcpStream::connect(addr)).await.expect("connect");
    if let Some(p) = pause {
        // The attack itself: stay silent past the detection timeout.
        tokio::time::sleep(p).await;
    }
    let _ = tcp.write_all(bytes.as_bytes()).await;
    let mut out = Vec::new();
    let _ = within(tcp.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn forged_request(prefix: &str, method: &str) -> String {
    format!(
        "{prefix}{method} /whoami HTTP/1.1\r\nHost: api.demo\r\nx-forwarded-client-cert: {FORGED}\r\nConnection: close\r\n\r\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_xfcc_never_reaches_an_http_app_through_a_tunnel() {
    let app = echo_app().await;
    let timeouts = test_timeouts();
    let detect = timeouts.detect;
    let m = mesh(
        app.addr,
        MeshOpts {
            protocol: "http",
            app_protocol: "http",
            ..MeshOpts::default()
        },
    )
    .await;
    for (what, pause, bytes) in [
        ("leading CRLF", None, forged_request("\r\n", "GET")),
        ("lower-case method", None, forged_request("", "get")),
        (
            "idle past the detect timeout",
            Some(detect + Duration::from_millis(300)),
            forged_request("", "GET"),
        ),
    ] {
        let out = raw(m.upstream, pause, &bytes).await;
        assert!(
            !out.contains("kube-system"),
            "{what}: the app saw the forged header:\n{out}"
        );
        assert!(
            out.starts_with("HTTP/1.1 400")
                || out.contains(&format!("x-echo-xfcc: By={API};URI={WEB}")),
            "{what}: neither refused nor served as HTTP:\n{out}"
        );
    }
    // No tunnel was ever opened to the server proxy for these.
    assert_eq!(
        metric(
            &m.server,
            "palisade_tcp_connections_total",
            &[("direction", "inbound")]
        ),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbound_port_refuses_opaque_peers_for_an_http_app() {
    let mut app = echo_app().await;
    let m = mesh(
        app.addr,
        MeshOpts {
            app_protocol: "http",
            ..MeshOpts::default()
        },
    )
    .await;
    let svid = m.pki.issue(WEB);
    let opaque = tls_client_config(&m.pki, Some(&svid), palisade_proxy::tls::ALPN_OPAQUE);
    let mut no_alpn = (*opaque).clone();
    no_alpn.alpn_protocols.clear();
    for cfg in [opaque, std::sync::Arc::new(no_alpn)] {
        let mut tls = within(tls_connect(m.server.inbound_addr, cfg))
            .await
            .expect("mTLS handshake");
        let _ = tls.write_all(forged_request("", "GET").as_bytes()).await;
        expect_closed(&mut tls, "opaque to an HTTP app").await;
    }
    wait_metric(
        &m.server,
        "palisade_connections_refused_total",
        &[("direction", "inbound"), ("reason", "opaque_to_http_app")],
        2.0,
    )
    .await;
    assert!(app.arrivals.try_recv().is_err(), "the app saw a request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_on_an_http_upstream_open_nothing_upstream() {
    let app = echo_app().await;
    let m = mesh(
        app.addr,
        MeshOpts {
            protocol: "http",
            ..MeshOpts::default()
        },
    )
    .await;
    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(
            within(TcpStream::connect(m.upstream))
                .await
                .expect("connect"),
        );
    }
    wait_metric(
        &m.client,
        "palisade_tcp_open_connections",
        &[("direction", "outbound")],
        200.0,
    )
    .await;
    // Past the detection timeout, a tunnel would have been dialled for each.
    tokio::time::sleep(test_timeouts().detect * 2).await;
    let upstream = metric(
        &m.server,
        "palisade_tcp_open_connections",
        &[("direction", "inbound")],
    );
    assert!(
        upstream <= 1.0,
        "{upstream} connections upstream for 200 idle sockets"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_opaque_tunnel_is_closed() {
    let echo = tcp_echo_app().await;
    let m = mesh(
        echo,
        MeshOpts {
            timeouts: Timeouts {
                tcp_idle: Duration::from_millis(400),
                ..test_timeouts()
            },
            ..MeshOpts::default()
        },
    )
    .await;
    let mut tcp = within(TcpStream::connect(m.raw_upstream))
        .await
        .expect("connect");
    tcp.write_all(b"ping").await.expect("write");
    let mut buf = [0u8; 4];
    within(tcp.read_exact(&mut buf)).await.expect("echo");
    assert_eq!(&buf, b"ping");
    // Then silence: the tunnel is closed, and counted by whichever proxy timed out first
    // (both sides have the same idle timeout).
    expect_closed(&mut tcp, "idle tunnel").await;
    let timed_out = |p: &palisade_proxy::Proxy| {
        metric(
            p,
            "palisade_connections_refused_total",
            &[("reason", "tcp_idle_timeout")],
        )
    };
    within(async {
        while timed_out(&m.client) + timed_out(&m.server) < 1.0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// An app that reads the whole body before answering, as most do.
async fn body_reading_app() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                        let n = req.into_body().collect().await.map(|b| b.to_bytes().len());
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(
                            format!("{n:?}"),
                        ))))
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_chunked_body_is_a_400_and_not_the_endpoints_fault() {
    let app = body_reading_app().await;
    let m = mesh(app, MeshOpts::default()).await;
    let bad = "POST /upload HTTP/1.1\r\nHost: api.demo\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz-not-a-size\r\n\r\n";
    let out = raw(m.upstream, None, bad).await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert_eq!(
        metric(
            &m.client,
            "palisade_endpoint_ejections_total",
            &[("dst_identity", API)]
        ),
        0.0
    );
    assert_eq!(
        metric(
            &m.client,
            "palisade_requests_total",
            &[("direction", "outbound"), ("status_code", "502")]
        ),
        0.0
    );
    // The endpoint still serves.
    let r = get(m.upstream, "/").await.expect("response");
    assert_eq!(r.status, StatusCode::OK);
}
