//! The injector webhook as the API server meets it: HTTPS with a serving certificate from the
//! mesh CA, verified by a client that trusts only the mesh root, over HTTP/1.1 and HTTP/2; and
//! what it does with clients that misbehave.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use palisade_certs::{Ca, TrustDomain};
use palisade_control_plane::inject::webhook::{self, Limits, SERVICE_DNS_NAME};
use palisade_control_plane::inject::{AllNamespaces, InjectConfig, NamespaceLabels};
use rustls_pki_types::ServerName;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;

const LIMIT: Duration = Duration::from_secs(10);

async fn within<F: Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(LIMIT, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what} did not finish within {LIMIT:?}"),
    }
}

struct Webhook {
    addr: SocketAddr,
    ca: Ca,
    stop: watch::Sender<bool>,
    server: JoinHandle<Result<(), webhook::WebhookError>>,
}

async fn start(limits: Limits, namespaces: Arc<dyn NamespaceLabels>) -> Webhook {
    palisade_certs::tls::install_default_provider();
    let ca = Ca::generate(&TrustDomain::cluster_local(), None).unwrap();
    let cert = ca
        .issue_serving_cert(&[SERVICE_DNS_NAME], Duration::from_secs(3600))
        .unwrap();
    let store = palisade_certs::tls::ServingCertStore::new(&cert).unwrap();
    let tls = Arc::new(webhook::tls_config(store).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stop_rx) = watch::channel(false);
    let server = tokio::spawn(webhook::serve_with(
        listener,
        tls,
        Arc::new(InjectConfig::default()),
        namespaces,
        limits,
        stop_rx,
    ));
    Webhook {
        addr,
        ca,
        stop,
        server,
    }
}

async fn start_default() -> Webhook {
    start(Limits::default(), Arc::new(AllNamespaces::enabled())).await
}

/// A TLS connection from a client that trusts only the mesh root and checks the webhook's
/// DNS name, as the API server does with the webhook's caBundle.
async fn connect(w: &Webhook, alpn: &[&[u8]]) -> std::io::Result<TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(w.ca.root_der().clone()).unwrap();
    let mut cfg =
        rustls::ClientConfig::builder_with_provider(palisade_certs::tls::provider().clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(w.addr).await?;
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from(SERVICE_DNS_NAME).unwrap(), tcp)
        .await
}

type BoxBody = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

fn full(body: impl Into<Bytes>) -> BoxBody {
    Full::new(body.into()).boxed()
}

/// Sends one request over a new connection, HTTP/2 if `h2`; returns status, content type and
/// body.
async fn send(w: &Webhook, h2: bool, req: Request<BoxBody>) -> (StatusCode, String, Bytes) {
    let alpn: &[&[u8]] = if h2 { &[b"h2"] } else { &[b"http/1.1"] };
    let tls = within("TLS connect", connect(w, alpn)).await.expect("TLS");
    let negotiated = tls.get_ref().1.alpn_protocol().map(|p| p.to_vec());
    assert_eq!(negotiated.as_deref(), Some(alpn[0]), "ALPN");
    let io = TokioIo::new(tls);
    let rsp = if h2 {
        let (mut sender, conn) = within(
            "h2 handshake",
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        within("h2 request", sender.send_request(req))
            .await
            .unwrap()
    } else {
        let (mut sender, conn) = within("h1 handshake", hyper::client::conn::http1::handshake(io))
            .await
            .unwrap();
        tokio::spawn(conn);
        within("h1 request", sender.send_request(req))
            .await
            .unwrap()
    };
    let status = rsp.status();
    let ctype = rsp
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = within("body", rsp.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    (status, ctype, body)
}

fn post(path: &str, body: BoxBody) -> Request<BoxBody> {
    Request::builder()
        .method(Method::POST)
        .uri(format!("https://{SERVICE_DNS_NAME}{path}"))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(body)
        .unwrap()
}

fn review(namespace: &str) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "e911857d-c318-11e8-bbad-025000000001",
            "kind": { "group": "", "version": "v1", "kind": "Pod" },
            "resource": { "group": "", "version": "v1", "resource": "pods" },
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": { "username": "admin" },
            "object": {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": { "name": "web", "namespace": namespace },
                "spec": { "containers": [ { "name": "web", "image": "nginx" } ] }
            },
            "oldObject": null
        }
    })
}

#[tokio::test]
async fn the_webhook_answers_an_admission_review_over_https_h1_and_h2() {
    let w = start_default().await;
    for h2 in [false, true] {
        let body = serde_json::to_vec(&review("demo")).unwrap();
        let (status, ctype, body) = send(&w, h2, post("/inject", full(body))).await;
        assert_eq!(status, StatusCode::OK, "h2={h2}");
        assert_eq!(ctype, "application/json");
        let answer: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(answer["kind"], "AdmissionReview");
        assert_eq!(
            answer["response"]["uid"],
            "e911857d-c318-11e8-bbad-025000000001"
        );
        assert_eq!(answer["response"]["allowed"], true);
        assert_eq!(answer["response"]["patchType"], "JSONPatch");
        assert!(answer["response"]["patch"].is_string(), "{answer}");
    }
    // A malformed review is an AdmissionReview refusing it, not an HTTP error.
    let (status, _, body) = send(&w, true, post("/inject", full("{\"kind\":"))).await;
    assert_eq!(status, StatusCode::OK);
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["response"]["allowed"], false);
    assert_eq!(answer["response"]["status"]["code"], 400);
}

#[tokio::test]
async fn wrong_paths_methods_and_oversized_bodies_are_refused() {
    let limits = Limits {
        max_body: 1024,
        ..Limits::default()
    };
    let w = start(limits, Arc::new(AllNamespaces::enabled())).await;
    let (status, _, _) = send(&w, false, post("/mutate", full("{}"))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let get = Request::builder()
        .uri(format!("https://{SERVICE_DNS_NAME}/inject"))
        .body(full(""))
        .unwrap();
    let (status, _, _) = send(&w, false, get).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);

    // Declared too large: refused before reading.
    let (status, _, _) = send(&w, false, post("/inject", full(vec![b' '; 2048]))).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    // Streamed with no length (chunked, and over h2): refused once the limit is crossed.
    for h2 in [false, true] {
        let chunks = (0..4)
            .map(|_| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(vec![b' '; 512]))));
        let body = StreamBody::new(futures_util::stream::iter(chunks)).boxed();
        let (status, _, _) = send(&w, h2, post("/inject", body)).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "h2={h2}");
    }
    // Within the limit: answered.
    let (status, _, _) = send(&w, false, post("/inject", full(vec![b' '; 1000]))).await;
    assert_eq!(status, StatusCode::OK);
}

struct Nowhere;

impl NamespaceLabels for Nowhere {
    fn labels(&self, _: &str) -> Option<BTreeMap<String, String>> {
        None
    }
}

#[tokio::test]
async fn an_unknown_namespace_fails_the_call_so_the_failure_policy_decides() {
    let w = start(Limits::default(), Arc::new(Nowhere)).await;
    let body = serde_json::to_vec(&review("new-ns")).unwrap();
    let (status, _, body) = send(&w, false, post("/inject", full(body))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        String::from_utf8_lossy(&body).contains("namespace new-ns"),
        "{body:?}"
    );
}

/// Reads until the server closes the connection; panics if it does not within `LIMIT`.
async fn closed_by_server<S: tokio::io::AsyncRead + Unpin>(s: &mut S) {
    let mut buf = [0u8; 256];
    loop {
        match within("the server closing the connection", s.read(&mut buf)).await {
            Ok(0) | Err(_) => return,
            Ok(_) => continue,
        }
    }
}

#[tokio::test]
async fn clients_that_stall_are_cut_off() {
    let limits = Limits {
        handshake_timeout: Duration::from_millis(200),
        header_read_timeout: Duration::from_millis(200),
        body_timeout: Duration::from_millis(200),
        ..Limits::default()
    };
    let w = start(limits, Arc::new(AllNamespaces::enabled())).await;

    // No TLS handshake at all.
    let mut tcp = TcpStream::connect(w.addr).await.unwrap();
    closed_by_server(&mut tcp).await;

    // A handshake, then no request: over HTTP/1.1, over HTTP/2 (no preface), and without
    // ALPN (nothing to tell the protocol by).
    let alpns: [&[&[u8]]; 3] = [&[b"http/1.1"], &[b"h2"], &[]];
    for alpn in alpns {
        let mut tls = within("connect", connect(&w, alpn)).await.unwrap();
        closed_by_server(&mut tls).await;
    }

    // Headers promising a body that never comes: 408.
    let mut tls = within("connect", connect(&w, &[b"http/1.1"]))
        .await
        .unwrap();
    within(
        "write",
        tls.write_all(
            format!("POST /inject HTTP/1.1\r\nhost: {SERVICE_DNS_NAME}\r\ncontent-length: 100\r\n\r\n{{\"a\":")
                .as_bytes(),
        ),
    )
    .await
    .unwrap();
    let mut head = vec![0u8; 12];
    within("read", tls.read_exact(&mut head)).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 408");
}

#[tokio::test]
async fn connections_beyond_the_limit_are_closed() {
    let limits = Limits {
        max_connections: 1,
        ..Limits::default()
    };
    let w = start(limits, Arc::new(AllNamespaces::enabled())).await;
    let first = within("connect", connect(&w, &[b"http/1.1"]))
        .await
        .unwrap();
    // The second is closed before its handshake completes.
    assert!(
        within("connect", connect(&w, &[b"http/1.1"]))
            .await
            .is_err()
    );
    drop(first);
    // Once the first is gone, its slot is free again (the server notices the close).
    let mut tries = 0;
    loop {
        tries += 1;
        if within("connect", connect(&w, &[b"http/1.1"])).await.is_ok() {
            break;
        }
        assert!(tries < 200, "the slot was never freed");
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn stop_ends_the_server_and_closes_the_listener() {
    let w = start_default().await;
    let body = serde_json::to_vec(&review("demo")).unwrap();
    let (status, _, _) = send(&w, false, post("/inject", full(body))).await;
    assert_eq!(status, StatusCode::OK);
    w.stop.send(true).unwrap();
    within("serve to return", w.server).await.unwrap().unwrap();
    assert!(TcpStream::connect(w.addr).await.is_err(), "still listening");
}

/// The leaf certificate the webhook presents to a new connection.
async fn served_leaf(addr: SocketAddr, ca: &Ca) -> Vec<u8> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.root_der().clone()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(palisade_certs::tls::provider().clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = within(
        "TLS connect",
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(ServerName::try_from(SERVICE_DNS_NAME).unwrap(), tcp),
    )
    .await
    .expect("the served certificate verifies against the mesh root");
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test]
async fn serve_webhook_swaps_its_certificate_on_renewal_without_a_restart() {
    palisade_certs::tls::install_default_provider();
    let ca = Arc::new(Ca::generate(&TrustDomain::cluster_local(), None).unwrap());
    let first = ca
        .issue_serving_cert(&[SERVICE_DNS_NAME], Duration::from_secs(3))
        .unwrap();
    let store = palisade_certs::tls::ServingCertStore::new(&first).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stop_rx) = watch::channel(false);
    let server = tokio::spawn(webhook::serve_webhook(
        listener,
        store.clone(),
        Arc::new(InjectConfig::default()),
        Arc::new(AllNamespaces::enabled()),
        stop_rx.clone(),
    ));
    assert_eq!(served_leaf(addr, &ca).await, first.chain[0].to_vec());

    // A three-second certificate is renewed when one second is left; the next handshake
    // presents the new one, and the server never restarted.
    let renewer = {
        let ca = ca.clone();
        tokio::spawn(webhook::renew_serving_cert(
            store.clone(),
            Duration::from_secs(3),
            move || ca.issue_serving_cert(&[SERVICE_DNS_NAME], Duration::from_secs(3)),
            stop_rx,
        ))
    };
    within("a renewal", async {
        while store.not_after() == first.not_after {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let renewed = served_leaf(addr, &ca).await;
    assert_ne!(
        renewed,
        first.chain[0].to_vec(),
        "still the first certificate"
    );

    stop.send(true).unwrap();
    within("serve_webhook to return", server)
        .await
        .unwrap()
        .unwrap();
    let installed = within("the renewer to return", renewer).await.unwrap();
    assert!(installed >= 1, "{installed}");
}

#[tokio::test]
async fn a_failed_renewal_is_retried_and_the_old_certificate_served_meanwhile() {
    palisade_certs::tls::install_default_provider();
    let ca = Arc::new(Ca::generate(&TrustDomain::cluster_local(), None).unwrap());
    let first = ca
        .issue_serving_cert(&[SERVICE_DNS_NAME], Duration::from_secs(3))
        .unwrap();
    let store = palisade_certs::tls::ServingCertStore::new(&first).unwrap();
    let (stop, stop_rx) = watch::channel(false);
    let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let renewer = {
        let (ca, calls) = (ca.clone(), calls.clone());
        tokio::spawn(webhook::renew_serving_cert(
            store.clone(),
            Duration::from_secs(3),
            move || {
                // The first attempt fails (the CA is unavailable, say), the second succeeds.
                if calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                    Err("the CA is unavailable".to_string())
                } else {
                    ca.issue_serving_cert(&[SERVICE_DNS_NAME], Duration::from_secs(3))
                        .map_err(|e| e.to_string())
                }
            },
            stop_rx,
        ))
    };
    within("a renewal after a failure", async {
        while store.not_after() == first.not_after {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(calls.load(std::sync::atomic::Ordering::SeqCst) >= 2);
    drop(stop);
    let installed = within("the renewer to stop with its sender", renewer)
        .await
        .unwrap();
    assert!(installed >= 1);
}
