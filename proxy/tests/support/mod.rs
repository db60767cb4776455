//! Shared harness of the data-plane tests: a CA in a temporary directory, SVIDs for `web` (the
//! caller) and `api` (the callee), a "server proxy" in front of a test app, a "client proxy"
//! whose upstream listeners route to the server proxy's inbound port, the test apps themselves,
//! and helpers to talk HTTP, read metrics and bound every wait.
#![allow(dead_code)]

pub mod netns;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use palisade_api::v1;
use palisade_certs::{Ca, SpiffeId, Svid, TrustBundle, TrustDomain};
use palisade_proxy::Proxy;
use palisade_proxy::config::{CredentialSource, Limits, ProxyConfig, Timeouts, UpstreamListener};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

pub const TD: &str = "cluster.local";
pub const WEB: &str = "spiffe://cluster.local/ns/demo/sa/web";
pub const API: &str = "spiffe://cluster.local/ns/demo/sa/api";
pub const DB: &str = "spiffe://cluster.local/ns/demo/sa/db";
/// The upstream the client proxy declares, with the service's configured protocol.
pub const SERVICE: &str = "api.demo:8080";
/// A second upstream to the same endpoint, always `opaque`: every app connection is a new
/// mTLS handshake between the proxies.
pub const RAW_SERVICE: &str = "raw.demo:8080";

/// The bound on every single wait in the tests.
pub const WAIT: Duration = Duration::from_secs(15);

/// Awaits `fut`, failing the test if it takes longer than [`WAIT`].
pub async fn within<F: Future>(fut: F) -> F::Output {
    within_for(WAIT, fut).await
}

pub async fn within_for<F: Future>(limit: Duration, fut: F) -> F::Output {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?}"),
    }
}

pub fn init() {
    palisade_certs::tls::install_default_provider();
}

pub fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).expect("SPIFFE ID")
}

// ---------------------------------------------------------------------------------------------
// PKI

/// A CA saved in a temporary directory, and the SVIDs issued from it.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: Ca,
    pub td: TrustDomain,
    /// `root-cert.pem`, the trust bundle the proxies load.
    pub bundle: PathBuf,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let td = TrustDomain::new(TD).expect("trust domain");
        let ca = Ca::generate(&td, None).expect("CA");
        let ca_dir = dir.path().join("ca");
        ca.save(&ca_dir).expect("save CA");
        let bundle = ca_dir.join(palisade_certs::ca::ROOT_CERT_FILE);
        Pki {
            dir,
            ca,
            td,
            bundle,
        }
    }

    pub fn issue(&self, spiffe_id: &str) -> Svid {
        self.ca
            .issue(&id(spiffe_id), Duration::from_secs(3600))
            .expect("issue SVID")
    }

    /// Writes a fresh SVID for `spiffe_id` into `<dir>/<name>/` and returns (cert, key).
    pub fn write_svid(&self, name: &str, spiffe_id: &str) -> (PathBuf, PathBuf) {
        let d = self.dir.path().join(name);
        self.issue(spiffe_id).write(&d).expect("write SVID");
        (
            d.join(palisade_certs::svid::CERT_FILE),
            d.join(palisade_certs::svid::KEY_FILE),
        )
    }

    pub fn trust_bundle(&self) -> TrustBundle {
        TrustBundle::load_pem(&self.td, &self.bundle).expect("bundle")
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).expect("write file");
        p
    }
}

impl Default for Pki {
    fn default() -> Self {
        Pki::new()
    }
}

// ---------------------------------------------------------------------------------------------
// Proxies

/// Short detect and handshake timeouts, so the tests of stalled peers finish quickly.
pub fn test_timeouts() -> Timeouts {
    Timeouts {
        connect: Duration::from_secs(2),
        detect: Duration::from_millis(500),
        handshake: Duration::from_millis(1500),
        idle: Duration::from_secs(30),
        drain: Duration::from_secs(5),
        tcp_idle: Duration::from_secs(3600),
        header_read: Duration::from_secs(30),
    }
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

pub fn proxy_config(
    pki: &Pki,
    name: &str,
    spiffe_id: &str,
    app: Option<SocketAddr>,
    upstreams: &[&str],
    static_yaml: &str,
) -> ProxyConfig {
    let (cert, key) = pki.write_svid(name, spiffe_id);
    let static_config = pki.write(&format!("{name}.yaml"), static_yaml);
    ProxyConfig {
        workload: name.to_string(),
        identity: id(spiffe_id),
        credentials: CredentialSource::Files {
            cert,
            key,
            bundle: pki.bundle.clone(),
        },
        inbound_addr: loopback(),
        admin_addr: loopback(),
        app_addr: app,
        upstreams: upstreams
            .iter()
            .map(|s| UpstreamListener {
                service: s.to_string(),
                listen: loopback(),
            })
            .collect(),
        transparent_addr: None,
        static_config: Some(static_config),
        timeouts: test_timeouts(),
        limits: Limits::default(),
        access_log: false,
        tracing: Default::default(),
        admin_shutdown: true,
        app_probes: Default::default(),
        dns_server: None,
        balancer: Default::default(),
    }
}

/// The proxy in front of the app: identity `api`, inbound + app, no upstreams.
pub async fn start_server_proxy(
    pki: &Pki,
    app: SocketAddr,
    mode: &str,
    app_protocol: &str,
    timeouts: Timeouts,
) -> Proxy {
    start_server_proxy_on(pki, app, mode, app_protocol, timeouts, loopback()).await
}

/// [`start_server_proxy`] with its inbound listener on `inbound` (a restarted proxy taking
/// over its predecessor's address).
pub async fn start_server_proxy_on(
    pki: &Pki,
    app: SocketAddr,
    mode: &str,
    app_protocol: &str,
    timeouts: Timeouts,
    inbound: SocketAddr,
) -> Proxy {
    let yaml = format!("mode: {mode}\nappProtocol: {app_protocol}\nservices: []\n");
    let mut cfg = proxy_config(pki, "api", API, Some(app), &[], &yaml);
    cfg.timeouts = timeouts;
    cfg.inbound_addr = inbound;
    within(Proxy::start(cfg)).await.expect("server proxy")
}

/// The caller's proxy: identity `web`, upstream listeners for [`SERVICE`] (with `protocol`)
/// and [`RAW_SERVICE`] (opaque), both routed to `endpoint`, which must prove `expected`.
pub async fn start_client_proxy(
    pki: &Pki,
    endpoint: SocketAddr,
    expected: &str,
    protocol: &str,
    timeouts: Timeouts,
) -> Proxy {
    let yaml = format!(
        "mode: STRICT\n\
         services:\n\
         - name: api.demo\n  port: 8080\n  protocol: {protocol}\n  endpoints:\n\
         \x20   - address: \"{endpoint}\"\n      identity: \"{expected}\"\n\
         - name: raw.demo\n  port: 8080\n  protocol: opaque\n  endpoints:\n\
         \x20   - address: \"{endpoint}\"\n      identity: \"{expected}\"\n"
    );
    let mut cfg = proxy_config(pki, "web", WEB, None, &[SERVICE, RAW_SERVICE], &yaml);
    cfg.timeouts = timeouts;
    within(Proxy::start(cfg)).await.expect("client proxy")
}

pub fn upstream_addr(p: &Proxy, service: &str) -> SocketAddr {
    p.upstream_addrs
        .iter()
        .find(|(s, _)| s == service)
        .map(|(_, a)| *a)
        .expect("upstream listener")
}

pub struct MeshOpts {
    /// `protocol` of [`SERVICE`] in the client proxy's config.
    pub protocol: &'static str,
    /// The server proxy's mTLS mode.
    pub server_mode: &'static str,
    /// The server proxy's `appProtocol`.
    pub app_protocol: &'static str,
    /// The identity the client proxy expects from the endpoint.
    pub expected: &'static str,
    /// Both proxies' timeouts.
    pub timeouts: Timeouts,
}

impl Default for MeshOpts {
    fn default() -> Self {
        MeshOpts {
            protocol: "detect",
            server_mode: "STRICT",
            app_protocol: "detect",
            expected: API,
            timeouts: test_timeouts(),
        }
    }
}

/// client -> client proxy (`web`) -> mTLS -> server proxy (`api`) -> app.
pub struct Mesh {
    pub pki: Pki,
    pub server: Proxy,
    pub client: Proxy,
    /// Where the client connects for [`SERVICE`].
    pub upstream: SocketAddr,
    /// Where the client connects for [`RAW_SERVICE`].
    pub raw_upstream: SocketAddr,
    pub app: SocketAddr,
}

pub async fn mesh(app: SocketAddr, opts: MeshOpts) -> Mesh {
    init();
    let pki = Pki::new();
    let server = start_server_proxy(
        &pki,
        app,
        opts.server_mode,
        opts.app_protocol,
        opts.timeouts.clone(),
    )
    .await;
    let client = start_client_proxy(
        &pki,
        server.inbound_addr,
        opts.expected,
        opts.protocol,
        opts.timeouts,
    )
    .await;
    assert!(server.is_ready() && client.is_ready(), "proxies not ready");
    Mesh {
        upstream: upstream_addr(&client, SERVICE),
        raw_upstream: upstream_addr(&client, RAW_SERVICE),
        pki,
        server,
        client,
        app,
    }
}

// ---------------------------------------------------------------------------------------------
// Metrics

/// The sum of the samples of `name` whose labels include every pair of `labels`.
pub fn metric_in(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut sum = 0.0;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (n, lbls) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if n != name {
            continue;
        }
        let pairs: Vec<(&str, &str)> = lbls
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.trim(), v.trim_matches('"')))
            .collect();
        if labels.iter().all(|l| pairs.contains(l)) {
            sum += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    sum
}

pub fn metric(p: &Proxy, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_in(&p.metrics().encode(), name, labels)
}

/// Polls the metric until it reaches `at_least` (counters move right after the event a test
/// observed, sometimes a scheduling slice later); fails after [`WAIT`].
pub async fn wait_metric(p: &Proxy, name: &str, labels: &[(&str, &str)], at_least: f64) -> f64 {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = p.metrics().encode();
        let v = metric_in(&text, name, labels);
        if v >= at_least {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("{name}{labels:?} = {v}, expected >= {at_least}; metrics:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP clients

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

pub fn empty() -> Body {
    full(Bytes::new())
}

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

/// A body without a length: HTTP/1.1 sends it chunked.
pub fn chunked(data: &[u8], chunk: usize, trailers: Option<HeaderMap>) -> Body {
    let mut frames: Vec<Result<Frame<Bytes>, BoxError>> = data
        .chunks(chunk)
        .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    if let Some(t) = trailers {
        frames.push(Ok(Frame::trailers(t)));
    }
    StreamBody::new(futures_util::stream::iter(frames)).boxed()
}

/// Deterministic, non-repeating-looking test bytes.
pub fn pattern(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

/// A whole response.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn header_all(&self, name: &str) -> Vec<String> {
        self.headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect()
    }
}

pub async fn collect(rsp: Response<Incoming>) -> Result<Reply, hyper::Error> {
    let (parts, body) = rsp.into_parts();
    let collected = within(body.collect()).await?;
    let trailers = collected.trailers().cloned();
    Ok(Reply {
        status: parts.status,
        headers: parts.headers,
        body: collected.to_bytes(),
        trailers,
    })
}

pub type H1 = hyper::client::conn::http1::SendRequest<Body>;
pub type H2 = hyper::client::conn::http2::SendRequest<Body>;

pub async fn h1_client(addr: SocketAddr) -> H1 {
    let tcp = within(TcpStream::connect(addr)).await.expect("connect");
    let (send, conn) = within(hyper::client::conn::http1::handshake(TokioIo::new(tcp)))
        .await
        .expect("HTTP/1 handshake");
    tokio::spawn(conn);
    send
}

pub async fn h2_client(addr: SocketAddr) -> H2 {
    let tcp = within(TcpStream::connect(addr)).await.expect("connect");
    let (send, conn) = within(hyper::client::conn::http2::handshake(
        TokioExecutor::new(),
        TokioIo::new(tcp),
    ))
    .await
    .expect("HTTP/2 handshake");
    tokio::spawn(conn);
    send
}

pub async fn h1_send(c: &mut H1, req: Request<Body>) -> Result<Reply, hyper::Error> {
    within(c.ready()).await?;
    let rsp = within(c.send_request(req)).await?;
    collect(rsp).await
}

pub async fn h2_send(c: &mut H2, req: Request<Body>) -> Result<Reply, hyper::Error> {
    within(c.ready()).await?;
    let rsp = within(c.send_request(req)).await?;
    collect(rsp).await
}

pub fn get_req(path: &str) -> Request<Body> {
    Request::get(path)
        .header(http::header::HOST, "api.demo")
        .body(empty())
        .expect("request")
}

/// One GET on a new HTTP/1.1 connection.
pub async fn get(addr: SocketAddr, path: &str) -> Result<Reply, hyper::Error> {
    let mut c = h1_client(addr).await;
    h1_send(&mut c, get_req(path)).await
}

/// A raw HTTP/1.1 request with `Connection: close`, read to EOF (for opaque TCP paths).
pub async fn raw_http_get(addr: SocketAddr, path: &str) -> std::io::Result<Vec<u8>> {
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: api.demo\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut out = Vec::new();
    tcp.read_to_end(&mut out).await?;
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Raw TLS clients

/// A rustls client that checks the server's SVID against the mesh root (expecting `api`) and
/// presents `client_cert` if given.
pub fn tls_client_config(
    pki: &Pki,
    client_cert: Option<&Svid>,
    alpn: &[u8],
) -> Arc<rustls::ClientConfig> {
    let bundle = Arc::new(arc_swap::ArcSwap::from_pointee(pki.trust_bundle()));
    let verifier = palisade_certs::tls::ExpectedServerVerifier::new(bundle, id(API));
    let builder =
        rustls::ClientConfig::builder_with_provider(palisade_certs::tls::provider().clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier));
    let mut cfg = match client_cert {
        Some(svid) => builder
            .with_client_auth_cert(
                svid.chain.clone(),
                rustls_pki_types::PrivateKeyDer::Pkcs8(svid.key.as_ref().expect("key").clone_key()),
            )
            .expect("client cert"),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(cfg)
}

pub async fn tls_connect(
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(cfg)
        .connect(palisade_proxy::tls::server_name(), tcp)
        .await
}

/// Reads until the peer closes; fails the test if it sends application data instead.
pub async fn expect_closed<S: tokio::io::AsyncRead + Unpin>(s: &mut S, what: &str) {
    let mut buf = [0u8; 256];
    match within(s.read(&mut buf)).await {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!(
            "{what}: expected the connection to be closed, got {n} bytes: {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// Test apps

/// Accepts connections on a loopback port and hands each to `f`.
async fn serve<F, Fut>(f: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind(loopback()).await.expect("bind app");
    let addr = listener.local_addr().expect("app addr");
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((tcp, _)) => {
                    tokio::spawn(f(tcp));
                }
                // Out of descriptors in a flood test: the app keeps accepting once some are
                // back, as a real server does, instead of going deaf for the rest of the test.
                Err(e) => {
                    eprintln!("test app: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    });
    addr
}

/// The HTTP echo app: HTTP/1.1 and HTTP/2 (prior knowledge) on one port. It answers with the
/// request's body streamed back (HTTP/2 trailers included) and reports what it received in
/// `x-echo-method`, `x-echo-path`, `x-echo-version` and `x-echo-xfcc` (one per received
/// `x-forwarded-client-cert` value). `/slow` answers after 300 ms.
pub struct EchoApp {
    pub addr: SocketAddr,
    /// The path of every request, sent when it arrives (before any delay).
    pub arrivals: mpsc::UnboundedReceiver<String>,
}

pub async fn echo_app() -> EchoApp {
    let (tx, arrivals) = mpsc::unbounded_channel();
    let addr = serve(move |tcp| {
        let tx = tx.clone();
        async move {
            let svc = hyper::service::service_fn(move |req| echo(req, tx.clone()));
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        }
    })
    .await;
    EchoApp { addr, arrivals }
}

async fn echo(
    req: Request<Incoming>,
    arrivals: mpsc::UnboundedSender<String>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let _ = arrivals.send(path.clone());
    let mut rsp = Response::builder()
        .header("x-echo-method", req.method().as_str())
        .header("x-echo-path", path.as_str())
        .header("x-echo-version", format!("{:?}", req.version()));
    for v in req.headers().get_all("x-forwarded-client-cert") {
        rsp = rsp.header("x-echo-xfcc", v.clone());
    }
    if let Some(v) = req.headers().get("traceparent") {
        rsp = rsp.header("x-echo-traceparent", v.clone());
    }
    if path == "/slow" {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let body = req.into_body().map_err(|e| Box::new(e) as BoxError).boxed();
    Ok(rsp.body(body).expect("echo response"))
}

/// A raw HTTP/1.1 app for upgrades: answers `101 Switching Protocols` to a request with
/// `Upgrade: websocket` (reporting the XFCC it got in `x-echo-xfcc`), then echoes bytes until
/// EOF. Anything else gets a 400.
pub async fn upgrade_app() -> SocketAddr {
    serve(|mut tcp| async move {
        let mut buf = Vec::with_capacity(4096);
        let head_end = loop {
            let mut chunk = [0u8; 1024];
            let n = match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            buf.extend_from_slice(&chunk[..n]);
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > 16 * 1024 {
                return;
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let header = |l: &str, name: &str| -> Option<String> {
            let (n, v) = l.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        };
        let xfcc: Vec<String> = head
            .lines()
            .filter_map(|l| header(l, "x-forwarded-client-cert"))
            .collect();
        let websocket = head
            .lines()
            .filter_map(|l| header(l, "upgrade"))
            .any(|v| v.eq_ignore_ascii_case("websocket"));
        if !websocket {
            let _ = tcp
                .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                .await;
            return;
        }
        let mut rsp = String::from(
            "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n",
        );
        for x in xfcc {
            rsp.push_str(&format!("x-echo-xfcc: {x}\r\n"));
        }
        rsp.push_str("\r\n");
        if tcp.write_all(rsp.as_bytes()).await.is_err() {
            return;
        }
        // Bytes that came with the head belong to the upgraded stream.
        if tcp.write_all(&buf[head_end..]).await.is_err() {
            return;
        }
        let (mut r, mut w) = tcp.into_split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    })
    .await
}

/// Echoes bytes until EOF, then closes its write side.
pub async fn tcp_echo_app() -> SocketAddr {
    serve(|tcp| async move {
        let (mut r, mut w) = tcp.into_split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    })
    .await
}

/// A server-speaks-first app: sends `220 banner\r\n` on accept, then echoes until EOF.
pub const BANNER: &[u8] = b"220 banner\r\n";

pub async fn banner_app() -> SocketAddr {
    serve(|mut tcp| async move {
        if tcp.write_all(BANNER).await.is_err() {
            return;
        }
        let (mut r, mut w) = tcp.into_split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    })
    .await
}

/// The gRPC app: `palisade.v1.Identity` (unary) and `palisade.v1.Discovery` (server
/// streaming), with test behaviour:
/// - `Certify` answers `trust_domain` = the request's token, `spiffe_id` = the
///   `x-forwarded-client-cert` it received, `chain_der` = `[csr_der]`; the token `fail` gets
///   `FAILED_PRECONDITION`.
/// - `Watch` streams `known_version` configs (versions 1..=n, each carrying 64 KiB), then ends
///   with OK, or with `RESOURCE_EXHAUSTED` (in trailers) when `workload` is `end-with-error`.
pub async fn grpc_app() -> SocketAddr {
    let listener = TcpListener::bind(loopback()).await.expect("bind gRPC app");
    let addr = listener.local_addr().expect("gRPC addr");
    let incoming = futures_util::stream::unfold(listener, |l| async move {
        let r = l.accept().await.map(|(s, _)| s);
        Some((r, l))
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(v1::identity_server::IdentityServer::new(TestIdentity))
            .add_service(v1::discovery_server::DiscoveryServer::new(TestDiscovery))
            .serve_with_incoming(incoming),
    );
    addr
}

struct TestIdentity;

#[tonic::async_trait]
impl v1::identity_server::Identity for TestIdentity {
    async fn certify(
        &self,
        req: tonic::Request<v1::CertifyRequest>,
    ) -> Result<tonic::Response<v1::CertifyResponse>, tonic::Status> {
        let xfcc = req
            .metadata()
            .get("x-forwarded-client-cert")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let r = req.into_inner();
        if r.token == "fail" {
            return Err(tonic::Status::failed_precondition(
                "refused by the test app",
            ));
        }
        Ok(tonic::Response::new(v1::CertifyResponse {
            chain_der: vec![r.csr_der],
            trust_domain: r.token,
            spiffe_id: xfcc,
            ..Default::default()
        }))
    }
}

struct TestDiscovery;

type WatchStream =
    Pin<Box<dyn futures_util::Stream<Item = Result<v1::ProxyConfig, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl v1::discovery_server::Discovery for TestDiscovery {
    type WatchStream = WatchStream;
    type DeltasStream =
        Pin<Box<dyn futures_util::Stream<Item = Result<v1::ConfigDelta, tonic::Status>> + Send>>;

    /// Answers as a server of an earlier release would.
    async fn deltas(
        &self,
        _req: tonic::Request<tonic::Streaming<v1::DeltaRequest>>,
    ) -> Result<tonic::Response<Self::DeltasStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("not served by the test app"))
    }

    async fn watch(
        &self,
        req: tonic::Request<v1::WatchRequest>,
    ) -> Result<tonic::Response<WatchStream>, tonic::Status> {
        let r = req.into_inner();
        let mut items: Vec<Result<v1::ProxyConfig, tonic::Status>> = (1..=r.known_version)
            .map(|v| {
                Ok(v1::ProxyConfig {
                    version: v,
                    trust_bundle_der: vec![vec![(v % 251) as u8; 64 * 1024]],
                    ..Default::default()
                })
            })
            .collect();
        if r.workload == "end-with-error" {
            items.push(Err(tonic::Status::resource_exhausted(
                "end of the test stream",
            )));
        }
        Ok(tonic::Response::new(Box::pin(futures_util::stream::iter(
            items,
        ))))
    }
}

/// Bytes a real rustls client sends first (a whole ClientHello record), for tests that send
/// it slowly or cut it short.
pub fn client_hello_bytes(pki: &Pki) -> Vec<u8> {
    let cfg = tls_client_config(pki, None, b"h2");
    let mut conn = rustls::ClientConnection::new(cfg, palisade_proxy::tls::server_name())
        .expect("client connection");
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).expect("write ClientHello");
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Floods: legitimate traffic measured during an attack

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Legitimate requests through the pair while an attack runs: a few keep-alive HTTP/1.1
/// connections to the client proxy's upstream, one request after another, each bounded.
pub struct Legit {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Vec<Option<Duration>>>>,
}

impl Legit {
    /// Requests until [`Legit::finish`].
    pub fn start(upstream: SocketAddr, connections: usize) -> Legit {
        Self::start_counted(upstream, connections, 100_000)
    }

    /// `per_connection` requests on each connection, then stops by itself.
    pub fn start_counted(upstream: SocketAddr, connections: usize, per_connection: usize) -> Legit {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..connections)
            .map(|_| {
                let stop = stop.clone();
                tokio::spawn(async move {
                    let mut results = Vec::new();
                    let mut client: Option<H1> = None;
                    // Bounded in count as well as by the stop flag.
                    for _ in 0..per_connection {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let t = Instant::now();
                        let c = match client.as_mut() {
                            Some(c) => c,
                            None => client.insert(h1_client(upstream).await),
                        };
                        let ok = tokio::time::timeout(Duration::from_secs(5), async {
                            c.ready().await.ok()?;
                            let rsp = c.send_request(get_req("/")).await.ok()?;
                            let reply = collect(rsp).await.ok()?;
                            (reply.status == 200).then_some(())
                        })
                        .await;
                        match ok {
                            Ok(Some(())) => results.push(Some(t.elapsed())),
                            _ => {
                                results.push(None);
                                client = None;
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    results
                })
            })
            .collect();
        Legit { stop, tasks }
    }

    /// Stops and reports (requests, succeeded, p99).
    pub async fn finish(self) -> (usize, usize, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        self.wait().await
    }

    /// Waits for counted requests to end and reports (requests, succeeded, p99).
    pub async fn wait(self) -> (usize, usize, Duration) {
        let (requests, ok) = self.wait_latencies().await;
        (requests, ok.len(), quantile(&ok, 0.99))
    }

    /// Stops and reports the number of requests and the latencies of those that succeeded,
    /// sorted.
    pub async fn finish_latencies(self) -> (usize, Vec<Duration>) {
        self.stop.store(true, Ordering::Relaxed);
        self.wait_latencies().await
    }

    async fn wait_latencies(self) -> (usize, Vec<Duration>) {
        let mut all = Vec::new();
        for t in self.tasks {
            all.extend(within(t).await.expect("legit task"));
        }
        let mut ok: Vec<Duration> = all.iter().flatten().copied().collect();
        ok.sort();
        (all.len(), ok)
    }
}

/// The `q` quantile of sorted latencies (zero when there are none).
pub fn quantile(sorted: &[Duration], q: f64) -> Duration {
    let i = ((sorted.len() as f64 * q) as usize).min(sorted.len().saturating_sub(1));
    sorted.get(i).copied().unwrap_or_default()
}

/// This process's resident memory (the proxies of these tests run in it).
pub fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// File descriptors this process has open.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// Raises this process's soft descriptor limit to its hard limit, as a server's init does: a
/// flood test holds both ends of thousands of connections in one process, and a soft limit of
/// 1,024 (common on CI machines) would make it a test of the limit instead. Returns the limit
/// now in force.
pub fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed by pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                lim = want;
            }
        }
    }
    lim.rlim_cur
}
