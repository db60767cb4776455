//! Security negatives (issue 24) against a running proxy, over real sockets and real rustls.
//!
//! - Peers presenting certificates the mesh must refuse — a chain to another trust domain's
//!   root, two URI SANs, a CA certificate as leaf, a NUL byte in the URI SAN, the trust
//!   domain's own ID — on the inbound port (a client) and at an endpoint (a server): each
//!   handshake is refused, counted once under its own reason in
//!   `palisade_tls_handshake_errors_total`, logged once (inbound), the app is never reached,
//!   and the proxy goes on serving mesh traffic.
//! - The admin endpoints that act or show what the proxy sees (`/shutdown`, `/tap`, `/config`,
//!   `/traffic`) refuse a caller whose address is not loopback. The proxy's check is on the
//!   peer address of the TCP connection, so the test runs in a network namespace it creates
//!   (loopback and a veth with 10.201.0.1) and connects from 10.201.0.1 to an admin
//!   port bound to all addresses, as a pod's is; without root (no namespace) it says so and
//!   skips. The same requests from 127.0.0.1 are answered, so the refusal is the address and
//!   nothing else.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use palisade_certs::ca::sign_with_issuer_for_tests;
use palisade_certs::{Ca, Svid, TrustDomain};
use palisade_proxy::Proxy;
use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose, SanType,
};
use rustls_pki_types::PrivatePkcs8KeyDer;
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

// ---------------------------------------------------------------------------------------------
// The proxy's log lines, captured

#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> LogWriter {
        LogWriter(self.0.clone())
    }
}

/// The log of every proxy in this test binary (palisade_proxy at debug), from the first call on.
fn logs() -> &'static Logs {
    static LOGS: OnceLock<Logs> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Logs::default();
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("palisade_proxy=debug"))
            .with_ansi(false)
            .with_writer(logs.clone())
            .try_init();
        logs
    })
}

/// The captured lines that contain every one of `needles`.
fn log_lines(needles: &[&str]) -> Vec<String> {
    let buf = logs().0.lock().unwrap_or_else(|e| e.into_inner()).clone();
    String::from_utf8_lossy(&buf)
        .lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .map(str::to_string)
        .collect()
}

/// Waits (bounded) until exactly one line has all of `needles`, and checks no second one
/// follows within a short grace period: logged once, not per retry or per layer.
async fn logged_once(needles: &[&str]) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while log_lines(needles).is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no log line with {needles:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let lines = log_lines(needles);
    assert_eq!(lines.len(), 1, "logged more than once: {lines:#?}");
}

// ---------------------------------------------------------------------------------------------
// Certificates the CA would never issue

/// A conforming leaf for `uri_sans` (critical digitalSignature, both EKUs, not a CA); each bad
/// case changes one thing.
fn leaf_params(uri_sans: &[&str]) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = uri_sans
        .iter()
        .map(|u| SanType::URI((*u).try_into().expect("IA5 string")))
        .collect();
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.use_authority_key_identifier_extension = true;
    p
}

/// A leaf signed by `ca`'s issuer, sent with that issuer: what a peer would present.
fn crafted(ca: &Ca, params: &CertificateParams) -> Svid {
    let (leaf, key) = sign_with_issuer_for_tests(ca, params).expect("sign");
    Svid {
        // Only the chain and the key go on the wire.
        id: id(WEB),
        chain: vec![leaf, ca.issuer_der().clone()],
        key: Some(PrivatePkcs8KeyDer::from(key)),
        not_before: 0,
        not_after: 0,
    }
}

struct Bad {
    what: &'static str,
    svid: Svid,
    /// `palisade_tls_handshake_errors_total{reason}` when a client presents it inbound.
    inbound: &'static str,
    /// ... and when an endpoint presents it to an outbound connection.
    outbound: &'static str,
}

/// One bad certificate per negative of issue 24. `mesh` is the proxies' CA.
fn bad_certificates(mesh: &Ca) -> Vec<Bad> {
    let other = Ca::generate(&TrustDomain::new("other.org").expect("td"), None).expect("CA");
    let mut ca_leaf = leaf_params(&[WEB]);
    ca_leaf.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    vec![
        Bad {
            what: "an SVID of another trust domain, chained to that domain's root",
            svid: crafted(&other, &leaf_params(&["spiffe://other.org/ns/demo/sa/web"])),
            // Inbound accepts the proxy's own trust domain only; outbound has no bundle
            // for other.org at all.
            inbound: "foreign_trust_domain",
            outbound: "no_bundle",
        },
        Bad {
            what: "a mesh ID chained to another trust domain's root",
            svid: crafted(&other, &leaf_params(&[WEB])),
            inbound: "untrusted_chain",
            outbound: "untrusted_chain",
        },
        Bad {
            what: "two URI SANs",
            svid: crafted(mesh, &leaf_params(&[WEB, DB])),
            inbound: "multiple_uri_sans",
            outbound: "multiple_uri_sans",
        },
        Bad {
            what: "a CA certificate as leaf",
            svid: crafted(mesh, &ca_leaf),
            inbound: "ca_leaf",
            outbound: "ca_leaf",
        },
        Bad {
            what: "a NUL byte in the URI SAN",
            svid: crafted(
                mesh,
                &leaf_params(&["spiffe://cluster.local/ns/demo/sa/web\0.evil"]),
            ),
            inbound: "invalid_spiffe_id",
            outbound: "invalid_spiffe_id",
        },
        Bad {
            what: "the trust domain's own ID",
            svid: crafted(mesh, &leaf_params(&["spiffe://cluster.local"])),
            inbound: "root_path_id",
            outbound: "root_path_id",
        },
    ]
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame.
const H2_SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];

fn handshake_errors(p: &Proxy, direction: &str, reason: &str) -> f64 {
    metric(
        p,
        "palisade_tls_handshake_errors_total",
        &[("direction", direction), ("reason", reason)],
    )
}

/// Waits (bounded) until the counter is exactly `want`: reached, and not overshot.
async fn counted_exactly(p: &Proxy, direction: &str, reason: &str, want: f64) {
    wait_metric(
        p,
        "palisade_tls_handshake_errors_total",
        &[("direction", direction), ("reason", reason)],
        want,
    )
    .await;
    assert_eq!(handshake_errors(p, direction, reason), want, "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_with_certificates_the_mesh_refuses_are_refused_counted_and_logged_once() {
    logs();
    let mut app = echo_app().await;
    let m = mesh(app.addr, MeshOpts::default()).await;
    let inbound = m.server.inbound_addr;
    // Control: the mesh serves before.
    let r = get(m.upstream, "/before").await.expect("request");
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        within(app.arrivals.recv()).await.as_deref(),
        Some("/before")
    );
    let accepted = metric(
        &m.server,
        "palisade_tls_connections_total",
        &[("direction", "inbound")],
    );

    for bad in bad_certificates(&m.pki.ca) {
        let before = handshake_errors(&m.server, "inbound", bad.inbound);
        let tcp = within(TcpStream::connect(inbound)).await.expect("connect");
        let local = tcp.local_addr().expect("local addr");
        let cfg = tls_client_config(&m.pki, Some(&bad.svid), b"h2");
        // TLS 1.3: the client may finish before the server judged its certificate; the
        // refusal then shows as an alert and a close instead of an answer.
        let hs = within(
            tokio_rustls::TlsConnector::from(cfg).connect(palisade_proxy::tls::server_name(), tcp),
        )
        .await;
        if let Ok(mut s) = hs {
            let _ = within(s.write_all(&[H2_PREFACE, H2_SETTINGS].concat())).await;
            expect_closed(&mut s, bad.what).await;
        }
        counted_exactly(&m.server, "inbound", bad.inbound, before + 1.0).await;
        let reason = format!("reason=\"{}\"", bad.inbound);
        logged_once(&[
            "inbound mTLS handshake refused",
            &format!("remote={local}"),
            &reason,
        ])
        .await;
    }
    assert_eq!(
        metric(
            &m.server,
            "palisade_tls_connections_total",
            &[("direction", "inbound")]
        ),
        accepted,
        "a refused peer's connection was counted as accepted"
    );
    assert!(
        app.arrivals.try_recv().is_err(),
        "a refused peer reached the app"
    );

    // And the proxy goes on serving mesh traffic.
    let r = get(m.upstream, "/after").await.expect("request after");
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(within(app.arrivals.recv()).await.as_deref(), Some("/after"));
}

/// A TLS server at an endpoint address that presents `svid` to whoever connects.
async fn endpoint_presenting(svid: &Svid) -> SocketAddr {
    let key = svid.key.as_ref().expect("key").clone_key();
    let mut cfg =
        rustls::ServerConfig::builder_with_provider(palisade_certs::tls::provider().clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_no_client_auth()
            .with_single_cert(svid.chain.clone(), key.into())
            .expect("server cert");
    cfg.alpn_protocols = vec![
        palisade_proxy::tls::ALPN_H2.to_vec(),
        palisade_proxy::tls::ALPN_HTTP1.to_vec(),
        palisade_proxy::tls::ALPN_OPAQUE.to_vec(),
    ];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // The client refuses the certificate; nothing to serve.
                let _ = acceptor.accept(tcp).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_presenting_certificates_the_mesh_refuses_are_a_502_and_counted() {
    logs();
    init();
    let pki = Pki::new();
    let bad = bad_certificates(&pki.ca);
    let mut yaml = String::from("mode: STRICT\nservices:\n");
    let mut services = Vec::new();
    for (i, b) in bad.iter().enumerate() {
        let ep = endpoint_presenting(&b.svid).await;
        // The control plane would expect `api` there: the ID the test's certificates are not.
        yaml.push_str(&format!(
            "- name: bad{i}.demo\n  port: 8080\n  protocol: http\n  endpoints:\n    - address: \"{ep}\"\n      identity: \"{API}\"\n"
        ));
        services.push(format!("bad{i}.demo:8080"));
    }
    // A good endpoint alongside: the proxy keeps serving it.
    let app = echo_app().await;
    let server = start_server_proxy(&pki, app.addr, "STRICT", "http", test_timeouts()).await;
    yaml.push_str(&format!(
        "- name: api.demo\n  port: 8080\n  protocol: http\n  endpoints:\n    - address: \"{}\"\n      identity: \"{API}\"\n",
        server.inbound_addr
    ));
    services.push(SERVICE.to_string());
    let refs: Vec<&str> = services.iter().map(String::as_str).collect();
    let cfg = proxy_config(&pki, "web", WEB, None, &refs, &yaml);
    let client = within(Proxy::start(cfg)).await.expect("client proxy");

    for (i, b) in bad.iter().enumerate() {
        let before = handshake_errors(&client, "outbound", b.outbound);
        let r = get(upstream_addr(&client, &services[i]), "/")
            .await
            .expect("a response");
        assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", b.what);
        // Counted once per handshake (the proxy may retry another connection; each try is a
        // refused handshake, never a request).
        let after = wait_metric(
            &client,
            "palisade_tls_handshake_errors_total",
            &[("direction", "outbound"), ("reason", b.outbound)],
            before + 1.0,
        )
        .await;
        assert!(after >= before + 1.0, "{}", b.what);
    }
    let r = get(upstream_addr(&client, SERVICE), "/good")
        .await
        .expect("request");
    assert_eq!(
        r.status,
        StatusCode::OK,
        "the good endpoint is still served"
    );
}

// ---------------------------------------------------------------------------------------------
// The admin port from a non-loopback address

/// Where the test runs when it re-executes itself inside its network namespace.
const IN_NETNS: &str = "PALISADE_TEST_ADMIN_NETNS_ADDR";

async fn connect_from(ip: IpAddr, port: u16) -> (H1, SocketAddr) {
    let sock = match ip {
        IpAddr::V4(_) => TcpSocket::new_v4(),
        IpAddr::V6(_) => TcpSocket::new_v6(),
    }
    .expect("socket");
    sock.bind(SocketAddr::new(ip, 0)).expect("bind the source");
    let tcp = within(sock.connect(SocketAddr::new(ip, port)))
        .await
        .expect("connect");
    let local = tcp.local_addr().expect("local addr");
    let (send, conn) = within(hyper::client::conn::http1::handshake(TokioIo::new(tcp)))
        .await
        .expect("HTTP/1 handshake");
    tokio::spawn(conn);
    (send, local)
}

fn admin_request(method: Method, path: &str) -> Request<Body> {
    let mut b = Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, "localhost");
    if path == "/shutdown" {
        b = b.header(palisade_proxy::admin::SHUTDOWN_HEADER, "1");
    }
    b.body(empty()).expect("request")
}

/// Sends `req` and returns the status and (for a finite body) the body; `/tap` streams, so
/// only its status is read.
async fn status_of(c: &mut H1, req: Request<Body>) -> (StatusCode, Bytes) {
    let streaming = req.uri().path() == "/tap";
    within(c.ready()).await.expect("ready");
    let rsp = within(c.send_request(req)).await.expect("response");
    let status = rsp.status();
    if streaming && status == StatusCode::OK {
        return (status, Bytes::new());
    }
    let body = within(rsp.into_body().collect())
        .await
        .expect("body")
        .to_bytes();
    (status, body)
}

const ADMIN_ONLY_LOCAL: [(&str, &str); 4] = [
    ("/shutdown", "admin /shutdown refused"),
    ("/tap", "admin /tap refused"),
    ("/config", "admin /config refused"),
    ("/traffic", "admin /traffic refused"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_shutdown_tap_config_and_traffic_refuse_a_non_loopback_peer() {
    // The test proper runs inside a network namespace of its own (it binds all addresses).
    let Some(ip) = std::env::var(IN_NETNS)
        .ok()
        .and_then(|a| a.parse::<IpAddr>().ok())
    else {
        let test = "admin_shutdown_tap_config_and_traffic_refuse_a_non_loopback_peer";
        // Loopback and one non-loopback address, on a veth (dummy interfaces need a module
        // containers may lack).
        let setup: &[&[&str]] = &[
            &["link", "add", "v0", "type", "veth", "peer", "name", "v1"],
            &["addr", "add", "10.201.0.1/24", "dev", "v0"],
            &["link", "set", "v0", "up"],
            &["link", "set", "v1", "up"],
        ];
        match tokio::task::spawn_blocking(move || {
            support::netns::rerun_in_netns(test, IN_NETNS, "10.201.0.1", setup)
        })
        .await
        .expect("netns runner")
        {
            Ok(status) => assert!(status.success(), "the test failed in its namespace"),
            Err(why) => eprintln!(
                "skipped: {why} (the admin refusal is then covered by the unit tests of \
                 admin::not_local only)"
            ),
        }
        return;
    };
    logs();
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
    // All addresses, as in a pod (the kubelet probes the pod IP): inside this test's own
    // network namespace.
    cfg.admin_addr = match ip {
        IpAddr::V4(_) => "0.0.0.0:0",
        IpAddr::V6(_) => "[::]:0",
    }
    .parse()
    .expect("addr");
    cfg.admin_shutdown = true;
    let p = within(Proxy::start(cfg)).await.expect("proxy");
    let port = p.admin_addr.port();

    for (path, log) in ADMIN_ONLY_LOCAL {
        let method = if path == "/shutdown" {
            Method::POST
        } else {
            Method::GET
        };
        let (mut c, local) = connect_from(ip, port).await;
        assert!(!local.ip().is_loopback(), "{local}");
        let (status, body) = status_of(&mut c, admin_request(method, path)).await;
        assert_eq!(
            status,
            StatusCode::FORBIDDEN,
            "{path} from {local}: {body:?}"
        );
        let body = String::from_utf8_lossy(&body);
        assert!(body.contains("loopback"), "{path}: {body}");
        logged_once(&[log, &format!("remote={local}")]).await;
        let endpoint = path.trim_start_matches('/');
        assert_eq!(
            metric(
                &p,
                "palisade_admin_refused_total",
                &[("endpoint", endpoint), ("reason", "remote")]
            ),
            1.0,
            "{path}: counted once"
        );
        // The same connection still gets what is not restricted: it is the address that is
        // refused, not the connection.
        let (status, _) = status_of(&mut c, admin_request(Method::GET, "/ready")).await;
        assert_eq!(status, StatusCode::OK, "/ready from {local}");
    }
    use futures_util::FutureExt;
    assert!(
        p.shutdown_requested().now_or_never().is_none(),
        "a refused /shutdown shut the proxy down"
    );

    // From loopback, the same requests are answered (the shutdown last).
    let lo = SocketAddr::from(([127, 0, 0, 1], port));
    for (path, _) in ADMIN_ONLY_LOCAL {
        let method = if path == "/shutdown" {
            Method::POST
        } else {
            Method::GET
        };
        let mut c = h1_client(lo).await;
        let (status, body) = status_of(&mut c, admin_request(method, path)).await;
        assert_eq!(status, StatusCode::OK, "{path} from loopback: {body:?}");
    }
    within(p.shutdown_requested()).await;
}
