//! Micro-benchmarks of the data plane: protocol detection, a balancer pick, and one HTTP/1.1
//! request through an in-process proxy pair (client -> proxy -> mTLS/h2 -> proxy -> app).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use palisade_certs::{Ca, SpiffeId, TrustDomain};
use palisade_proxy::balance::{Balancer, HasLoad, Load, Strategy};
use palisade_proxy::config::{CredentialSource, Limits, ProxyConfig, Timeouts, UpstreamListener};

fn detection(c: &mut Criterion) {
    let get = b"GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n";
    c.bench_function("detect/http1", |b| {
        b.iter(|| palisade_proxy::detect::classify(std::hint::black_box(get), false))
    });
    c.bench_function("detect/h2_preface", |b| {
        b.iter(|| {
            palisade_proxy::detect::classify(
                std::hint::black_box(palisade_proxy::detect::H2_PREFACE),
                false,
            )
        })
    });
}

struct E(Load);
impl HasLoad for E {
    fn load(&self) -> &Load {
        &self.0
    }
}

fn balancer(c: &mut Criterion) {
    for n in [2usize, 10, 100] {
        let b = Balancer::new(
            (0..n).map(|_| Arc::new(E(Load::default()))).collect(),
            Strategy::PeakEwma,
        );
        c.bench_function(&format!("balance/p2c_peak_ewma/{n}"), |bch| {
            bch.iter(|| {
                let e = b.pick().map(|e| e.0.start());
                std::hint::black_box(e);
            })
        });
    }
}

struct Pair {
    client_addr: SocketAddr,
    _proxies: Vec<palisade_proxy::Proxy>,
    _dir: tempfile::TempDir,
}

async fn app() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                        Bytes::from_static(b"ok"),
                    )))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

async fn pair() -> Pair {
    let dir = tempfile::tempdir().unwrap();
    let td = TrustDomain::new("cluster.local").unwrap();
    let ca = Ca::generate(&td, None).unwrap();
    ca.save(&dir.path().join("ca")).unwrap();
    let bundle = dir.path().join("ca").join("root-cert.pem");
    let mk = |name: &str| {
        let id = SpiffeId::for_workload(&td, "bench", name).unwrap();
        let d = dir.path().join(name);
        ca.issue(&id, Duration::from_secs(3600))
            .unwrap()
            .write(&d)
            .unwrap();
        (id, d)
    };
    let (server_id, sd) = mk("server");
    let (client_id, cd) = mk("client");
    let app = app().await;
    let base = |id: SpiffeId, d: &std::path::Path, cfg: std::path::PathBuf| ProxyConfig {
        workload: "bench".into(),
        identity: id,
        credentials: CredentialSource::Files {
            cert: d.join("cert.pem"),
            key: d.join("key.pem"),
            bundle: bundle.clone(),
        },
        inbound_addr: "127.0.0.1:0".parse().unwrap(),
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        app_addr: None,
        upstreams: vec![],
        transparent_addr: None,
        static_config: Some(cfg),
        timeouts: Timeouts::default(),
        limits: Limits::default(),
        access_log: false,
        tracing: Default::default(),
        admin_shutdown: false,
        app_probes: Default::default(),
        dns_server: None,
        balancer: Default::default(),
    };
    let scfg = dir.path().join("server.yaml");
    std::fs::write(&scfg, "appProtocol: http\n").unwrap();
    let mut s = base(server_id.clone(), &sd, scfg);
    s.app_addr = Some(app);
    let server = palisade_proxy::Proxy::start(s).await.unwrap();
    let ccfg = dir.path().join("client.yaml");
    std::fs::write(
        &ccfg,
        format!(
            "services:\n  - name: server.bench\n    port: 8080\n    protocol: http\n    endpoints:\n      - {{ address: \"{}\", identity: \"{}\" }}\n",
            server.inbound_addr, server_id
        ),
    )
    .unwrap();
    let mut c = base(client_id, &cd, ccfg);
    c.upstreams = vec![UpstreamListener {
        service: "server.bench:8080".into(),
        listen: "127.0.0.1:0".parse().unwrap(),
    }];
    let client = palisade_proxy::Proxy::start(c).await.unwrap();
    Pair {
        client_addr: client.upstream_addrs[0].1,
        _proxies: vec![client, server],
        _dir: dir,
    }
}

fn request_through_pair(c: &mut Criterion) {
    palisade_certs::tls::install_default_provider();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (pair, mut send) = rt.block_on(async {
        let pair = pair().await;
        let tcp = tokio::net::TcpStream::connect(pair.client_addr)
            .await
            .unwrap();
        tcp.set_nodelay(true).unwrap();
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        (pair, send)
    });
    c.bench_function("proxy_pair/http1_request", |b| {
        b.iter(|| {
            rt.block_on(async {
                let req = hyper::Request::builder()
                    .uri("/")
                    .header("host", "server.bench")
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                send.ready().await.unwrap();
                let rsp = send.send_request(req).await.unwrap();
                assert!(rsp.status().is_success());
                rsp.into_body().collect().await.unwrap();
            })
        })
    });
    drop(pair);
}

criterion_group!(benches, detection, balancer, request_through_pair);
criterion_main!(benches);
