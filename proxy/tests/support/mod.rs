//! Harness for data-plane tests: a CA in a temp dir, SVIDs for `web` (client side) and `api`
//! (server side), a server proxy in front of a test app and a client proxy with an upstream
//! port for `api.demo:8080`, all on 127.0.0.1 with port 0, real TLS.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use palisade_certs::{Ca, SpiffeId, Svid, TrustDomain};
use palisade_proxy::config::{CredentialSource, Limits, ProxyConfig, Timeouts, UpstreamListener};
use palisade_proxy::{Proxy, Snapshot};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const WEB: &str = "spiffe://cluster.local/ns/demo/sa/web";
pub const API: &str = "spiffe://cluster.local/ns/demo/sa/api";

pub const T: Duration = Duration::from_secs(10);

/// Awaits with the test timeout.
pub async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(T, f).await.expect("timed out")
}

pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: Ca,
    pub td: TrustDomain,
}

impl Pki {
    pub fn new() -> Pki {
        palisade_certs::tls::install_default_provider();
        let dir = tempfile::tempdir().expect("tempdir");
        let td = TrustDomain::new("cluster.local").expect("td");
        let ca = Ca::generate(&td, None).expect("ca");
        ca.save(&dir.path().join("ca")).expect("save ca");
        Pki { dir, ca, td }
    }

    pub fn bundle(&self) -> PathBuf {
        self.dir.path().join("ca").join("root-cert.pem")
    }

    pub fn svid(&self, id: &str) -> Svid {
        self.ca
            .issue(&SpiffeId::parse(id).expect("id"), Duration::from_secs(3600))
            .expect("issue")
    }

    /// Writes an SVID to `<dir>/<name>/` and returns that directory.
    pub fn write(&self, name: &str, id: &str) -> PathBuf {
        let d = self.dir.path().join(name);
        self.svid(id).write(&d).expect("write svid");
        d
    }

    pub fn config(&self, name: &str, id: &str, static_yaml: &str) -> ProxyConfig {
        let d = self.write(name, id);
        let cfg = self.dir.path().join(format!("{name}.yaml"));
        std::fs::write(&cfg, static_yaml).expect("write static config");
        ProxyConfig {
            workload: name.into(),
            identity: SpiffeId::parse(id).expect("id"),
            credentials: CredentialSource::Files {
                cert: d.join("cert.pem"),
                key: d.join("key.pem"),
                bundle: self.bundle(),
            },
            inbound_addr: "127.0.0.1:0".parse().expect("addr"),
            admin_addr: "127.0.0.1:0".parse().expect("addr"),
            app_addr: None,
            upstreams: vec![],
            transparent_addr: None,
            static_config: Some(cfg),
            timeouts: Timeouts {
                detect: Duration::from_millis(300),
                handshake: Duration::from_millis(500),
                drain: Duration::from_secs(5),
                ..Timeouts::default()
            },
            limits: Limits::default(),
            access_log: false,
            balancer: Default::default(),
        }
    }
}

pub struct Mesh {
    pub pki: Pki,
    pub server: Proxy,
    pub client: Proxy,
    pub upstream: SocketAddr,
    pub app: SocketAddr,
}

/// A client proxy whose `api.demo:8080` upstream routes to `server_inbound`, expecting
/// `expected_id`.
pub fn client_yaml(protocol: &str, server_inbound: SocketAddr, expected_id: &str) -> String {
    format!(
        "services:\n  - name: api.demo\n    port: 8080\n    protocol: {protocol}\n    endpoints:\n      - {{ address: \"{server_inbound}\", identity: \"{expected_id}\" }}\n"
    )
}

/// Server proxy (`api`) in front of `app`, client proxy (`web`) with one upstream.
pub async fn mesh(app: SocketAddr, app_protocol: &str, service_protocol: &str) -> Mesh {
    mesh_with(app, app_protocol, service_protocol, "STRICT", API).await
}

pub async fn mesh_with(
    app: SocketAddr,
    app_protocol: &str,
    service_protocol: &str,
    mode: &str,
    expected_id: &str,
) -> Mesh {
    let pki = Pki::new();
    let mut s = pki.config(
        "api",
        API,
        &format!("mode: {mode}\nappProtocol: {app_protocol}\n"),
    );
    s.app_addr = Some(app);
    let server = Proxy::start(s).await.expect("server proxy");
    let mut c = pki.config(
        "web",
        WEB,
        &client_yaml(service_protocol, server.inbound_addr, expected_id),
    );
    c.upstreams = vec![UpstreamListener {
        service: "api.demo:8080".into(),
        listen: "127.0.0.1:0".parse().expect("addr"),
    }];
    let client = Proxy::start(c).await.expect("client proxy");
    let upstream = client.upstream_addrs[0].1;
    Mesh {
        pki,
        server,
        client,
        upstream,
        app,
    }
}

/// Sum of a metric's samples whose line contains every needle.
pub fn metric(p: &Proxy, name: &str, needles: &[&str]) -> f64 {
    p.metrics()
        .encode()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.starts_with(name)
                && l[name.len()..].starts_with(['{', ' '])
                && needles.iter().all(|n| l.contains(n))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// An HTTP app (HTTP/1.1 and HTTP/2) that answers with what it saw: method, path, version and
/// the x-forwarded-client-cert header; POST bodies are echoed after a blank line. Paths
/// starting with `/slow` answer after 300 ms.
pub async fn echo_app() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let head = format!(
                        "method={} path={} version={:?} xfcc={}\n",
                        req.method(),
                        req.uri().path(),
                        req.version(),
                        req.headers()
                            .get("x-forwarded-client-cert")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("-")
                    );
                    if req.uri().path().starts_with("/slow") {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    let body = req.into_body().collect().await.map(|b| b.to_bytes());
                    let mut out = head.into_bytes();
                    if let Ok(b) = body {
                        out.extend_from_slice(&b);
                    }
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(out))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

/// A TCP echo app: echoes until EOF, then shuts its write side.
pub async fn tcp_echo_app() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 8192];
                loop {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if tcp.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = tcp.shutdown().await;
            });
        }
    });
    addr
}

pub async fn h1(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    send
}

pub async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = h1(addr).await;
    let req = Request::builder()
        .uri(path)
        .header("host", "api.demo")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let rsp = s.send_request(req).await.expect("response");
    let status = rsp.status().as_u16();
    let body = rsp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Restarts nothing; used by tests that need a proxy's static config path.
pub fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8")
}

pub fn snapshot_yaml(pki: &Pki, name: &str, yaml: &str) -> Snapshot {
    let f = pki.dir.path().join(format!("{name}.yaml"));
    std::fs::write(&f, yaml).expect("write");
    Snapshot::load_static(&f).expect("snapshot")
}
