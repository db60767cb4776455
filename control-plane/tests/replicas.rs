//! Two control-plane replicas and two real proxies carrying HTTP traffic: the replica the
//! proxies watch goes away under load, they resync from the other (a full snapshot on a new
//! Deltas stream), keep following config changes through it, and no request fails. And a
//! proxy on a control plane of an earlier release (no Deltas) watches full snapshots instead.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use palisade_certs::SpiffeId;
use palisade_control_plane::RunningControlPlane;
use palisade_proxy::config::UpstreamListener;
use palisade_proxy::control_plane::ControlPlaneAddrs;

#[path = "support/bounded.rs"]
mod bounded;
#[path = "support/proxy.rs"]
mod proxy;

use bounded::{free_port, two_replicas, wait_until, within};

/// An app answering every request with 200 `ok`.
async fn app() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind app");
    let addr = listener.local_addr().expect("app addr");
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                        Bytes::from_static(b"ok"),
                    )))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(sock), svc)
                    .await;
            });
        }
    });
    addr
}

fn proxy_config(
    workload: &str,
    sa: &str,
    cps: &ControlPlaneAddrs,
    token: &str,
    bundle: &std::path::Path,
) -> palisade_proxy::ProxyConfig {
    let td = palisade_certs::TrustDomain::new("cluster.local").expect("trust domain");
    let identity = SpiffeId::for_workload(&td, "demo", sa).expect("identity");
    proxy::on_control_plane(
        workload,
        identity,
        cps.clone(),
        token,
        None,
        bundle.to_path_buf(),
    )
}

/// Requests over one keep-alive connection to `addr` until `stop`; counts each outcome.
async fn load(addr: SocketAddr, stop: Arc<AtomicBool>, ok: Arc<AtomicU64>, failed: Arc<AtomicU64>) {
    let sock = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect upstream");
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(sock))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    // Bounded in count as well as by `stop`.
    for _ in 0..200_000 {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let req = hyper::Request::get("/")
            .header("host", "api.demo")
            .body(Full::new(Bytes::new()))
            .expect("request");
        let outcome = tokio::time::timeout(Duration::from_secs(5), async {
            let rsp = send.send_request(req).await.ok()?;
            let status = rsp.status();
            let body = rsp.into_body().collect().await.ok()?.to_bytes();
            (status == 200 && body.as_ref() == b"ok").then_some(())
        })
        .await;
        match outcome {
            Ok(Some(())) => ok.fetch_add(1, Ordering::Relaxed),
            _ => {
                failed.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
    }
}

fn sample(cp: &RunningControlPlane, name: &str) -> String {
    cp.metrics()
        .encode()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")).map(str::to_string))
        .unwrap_or_else(|| "0".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_move_to_the_other_replica_under_load_and_no_request_fails() {
    palisade_certs::tls::install_default_provider();
    let dir = tempfile::tempdir().expect("tempdir");
    let api_inbound = free_port();
    let app_addr = app().await;
    let mesh_path = dir.path().join("mesh.yaml");
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).expect("mkdir");
    let mesh = format!(
        "trustDomain: cluster.local\ncertificateLifetime: 1h\ncontrolPlane: {{ port: {} }}\n\
         policies: policies/\nworkloads:\n\
         \x20 - {{ name: web, namespace: demo, labels: {{ app: web }}, inboundPort: {}, adminPort: {}, upstreams: [ {{ service: api.demo, port: 8080, localPort: {} }} ] }}\n\
         \x20 - {{ name: api, namespace: demo, labels: {{ app: api }}, appPort: {}, inboundPort: {api_inbound}, adminPort: {} }}\n\
         services:\n  - {{ name: api, namespace: demo, port: 8080, selector: {{ app: api }}, protocol: http }}\n",
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        app_addr.port(),
        free_port(),
    );
    std::fs::write(&mesh_path, mesh).expect("write mesh");
    let tokens: HashMap<String, String> = [
        ("web".to_string(), "token-web-0123456789".to_string()),
        ("api".to_string(), "token-api-0123456789".to_string()),
    ]
    .into();
    // Two replicas of one mesh and one CA.
    let (cp1, cp2, cps, bundle) =
        two_replicas(mesh_path, dir.path().join("state"), tokens.clone()).await;

    let mut web_cfg = proxy_config("web", "web", &cps, &tokens["web"], &bundle);
    web_cfg.upstreams = vec![UpstreamListener {
        service: "api.demo:8080".into(),
        listen: "127.0.0.1:0".parse().expect("addr"),
    }];
    let mut api_cfg = proxy_config("api", "api", &cps, &tokens["api"], &bundle);
    api_cfg.inbound_addr = SocketAddr::from(([127, 0, 0, 1], api_inbound));
    api_cfg.app_addr = Some(app_addr);
    let web = within("web proxy", palisade_proxy::Proxy::start(web_cfg))
        .await
        .expect("web proxy starts");
    let api = within("api proxy", palisade_proxy::Proxy::start(api_cfg))
        .await
        .expect("api proxy starts");
    wait_until("both proxies hold a certificate and their config", || {
        web.is_ready() && api.is_ready()
    })
    .await;
    wait_until("both proxies watch replica 1", || {
        sample(&cp1, "palisade_discovery_watchers") == "2"
    })
    .await;
    let upstream = web.upstream_addrs[0].1;

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..4)
        .map(|_| tokio::spawn(load(upstream, stop.clone(), ok.clone(), failed.clone())))
        .collect();
    wait_until("traffic flows", || ok.load(Ordering::Relaxed) >= 100).await;

    // Replica 1 goes away under load.
    let before = api.snapshot().version;
    let at_failover = ok.load(Ordering::Relaxed);
    within("replica 1 stops", cp1.shutdown()).await;
    // On Deltas (not a fallback to Watch): both acknowledge replica 2's snapshots.
    wait_until(
        "both proxies watch replica 2 and acknowledge its config",
        || {
            sample(&cp2, "palisade_discovery_watchers") == "2"
                && sample(&cp2, "palisade_discovery_acks_total{result=\"ack\"}")
                    .parse::<u64>()
                    .is_ok_and(|n| n >= 2)
        },
    )
    .await;

    // A policy change now reaches api through replica 2 (web stays allowed).
    std::fs::write(
        policies.join("api.yaml"),
        "apiVersion: palisade.dev/v1alpha1\nkind: AuthorizationPolicy\n\
         metadata: { name: api-from-web, namespace: demo }\n\
         spec:\n  selector: { matchLabels: { app: api } }\n  rules:\n\
         \x20   - from: [ { source: { principals: [\"cluster.local/ns/demo/sa/web\"] } } ]\n",
    )
    .expect("write policy");
    wait_until("api applies the policy from replica 2", || {
        api.snapshot().version > before && api.snapshot().inbound.authz.has_allow_policies()
    })
    .await;
    wait_until("traffic keeps flowing after the failover", || {
        ok.load(Ordering::Relaxed) >= at_failover + 200 || failed.load(Ordering::Relaxed) > 0
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        within("load worker", w).await.expect("worker");
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(failed, 0, "{failed} failed of {}", ok + failed);
    assert!(ok >= at_failover + 200, "{ok} requests");
    web.shutdown().await;
    api.shutdown().await;
    within("replica 2 stops", cp2.shutdown()).await;
}

/// A control plane of an earlier release: Certify signs the caller's CSR for the identity its
/// token names, Discovery serves `Watch` only (`Deltas` is `UNIMPLEMENTED`, as a server
/// without the method answers).
mod legacy {
    use std::pin::Pin;
    use std::sync::Arc;
    use std::time::Duration;

    use palisade_api::v1;
    use palisade_certs::{Ca, SpiffeId};
    use tonic::{Request, Response, Status, Streaming};

    pub struct Identity {
        pub ca: Arc<Ca>,
        pub id: SpiffeId,
    }

    #[tonic::async_trait]
    impl v1::identity_server::Identity for Identity {
        async fn certify(
            &self,
            req: Request<v1::CertifyRequest>,
        ) -> Result<Response<v1::CertifyResponse>, Status> {
            let r = req.into_inner();
            let svid = self
                .ca
                .sign_csr(&r.csr_der, &self.id, Duration::from_secs(3600))
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            Ok(Response::new(v1::CertifyResponse {
                chain_der: svid.chain.iter().map(|c| c.to_vec()).collect(),
                trust_bundle_der: vec![self.ca.root_der().to_vec()],
                trust_domain: self.id.trust_domain().to_string(),
                spiffe_id: self.id.as_str().to_string(),
                valid_until_unix: svid.not_after,
            }))
        }
    }

    pub struct Discovery {
        /// What `Watch` streams (then it stays open).
        pub config: v1::ProxyConfig,
    }

    type Stream<T> = Pin<Box<dyn futures_util::Stream<Item = Result<T, Status>> + Send>>;

    #[tonic::async_trait]
    impl v1::discovery_server::Discovery for Discovery {
        type WatchStream = Stream<v1::ProxyConfig>;
        type DeltasStream = Stream<v1::ConfigDelta>;

        async fn watch(
            &self,
            _req: Request<v1::WatchRequest>,
        ) -> Result<Response<Self::WatchStream>, Status> {
            let first = futures_util::stream::iter([Ok(self.config.clone())]);
            let open = futures_util::stream::pending();
            Ok(Response::new(Box::pin(futures_util::StreamExt::chain(
                first, open,
            ))))
        }

        async fn deltas(
            &self,
            _req: Request<Streaming<v1::DeltaRequest>>,
        ) -> Result<Response<Self::DeltasStream>, Status> {
            Err(Status::unimplemented("an earlier release"))
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_on_a_control_plane_without_deltas_watches_full_snapshots() {
    use palisade_api::v1;
    palisade_certs::tls::install_default_provider();
    let dir = tempfile::tempdir().expect("tempdir");
    let td = palisade_certs::TrustDomain::new("cluster.local").expect("trust domain");
    let ca = Arc::new(palisade_certs::Ca::generate(&td, None).expect("CA"));
    let bundle_path = dir.path().join("root.pem");
    std::fs::write(&bundle_path, palisade_certs::pem::cert_pem(ca.root_der()))
        .expect("write the bundle");

    // The control plane's own SVID, and its TLS server (client certificates optional).
    let cp_id = palisade_control_plane::control_plane_id(&td).expect("cp id");
    let cp_store = palisade_certs::CredentialStore::new(
        cp_id.clone(),
        palisade_certs::TrustBundle::with_roots(&td, [ca.root_der().clone()]).expect("bundle"),
    );
    cp_store
        .install(
            ca.issue(&cp_id, Duration::from_secs(3600))
                .expect("cp svid"),
        )
        .expect("install");
    let tls = palisade_certs::tls::server_config_optional_client(&cp_store, None, &[b"h2"])
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let cp_addr = listener.local_addr().expect("addr");
    let incoming = futures_util::stream::unfold((listener, acceptor), |(l, a)| async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                return None;
            };
            if let Ok(tls) = a.accept(tcp).await {
                return Some((Ok::<_, std::io::Error>(tls), (l, a)));
            }
        }
    });
    let web = SpiffeId::for_workload(&td, "demo", "web").expect("web id");
    let config = v1::ProxyConfig {
        version: 7,
        inbound: Some(v1::Inbound::default()),
        services: vec![v1::Service {
            name: "api".into(),
            namespace: "demo".into(),
            port: 8080,
            endpoints: vec![v1::Endpoint {
                address: "127.0.0.1:1".into(),
                identity: "spiffe://cluster.local/ns/demo/sa/api".into(),
                weight: 1,
                workload: "api".into(),
                target_port: 0,
            }],
            ..Default::default()
        }],
        trust_bundle_der: vec![ca.root_der().to_vec()],
    };
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(v1::identity_server::IdentityServer::new(legacy::Identity {
                ca: ca.clone(),
                id: web.clone(),
            }))
            .add_service(v1::discovery_server::DiscoveryServer::new(
                legacy::Discovery {
                    config: config.clone(),
                },
            ))
            .serve_with_incoming(incoming),
    );

    let cps = ControlPlaneAddrs::one(cp_addr);
    let mut cfg = proxy_config("web", "web", &cps, "any-token", &bundle_path);
    cfg.upstreams = vec![UpstreamListener {
        service: "api.demo:8080".into(),
        listen: "127.0.0.1:0".parse().expect("addr"),
    }];
    let proxy = within("proxy", palisade_proxy::Proxy::start(cfg))
        .await
        .expect("the proxy starts");
    wait_until("the proxy holds the full snapshot from Watch", || {
        proxy.is_ready() && proxy.snapshot().version == 7
    })
    .await;
    let snap = proxy.snapshot();
    let api = snap.services.get("api.demo:8080").expect("api.demo:8080");
    assert_eq!(api.endpoints.len(), 1);
    proxy.shutdown().await;

    // A transparent proxy gets the whole mesh from Watch: it has nothing to look up, and what
    // its table does not know passes through.
    let mut cfg = proxy_config("web", "web", &cps, "any-token", &bundle_path);
    cfg.transparent_addr = Some("127.0.0.1:0".parse().expect("addr"));
    let proxy = within("transparent proxy", palisade_proxy::Proxy::start(cfg))
        .await
        .expect("the proxy starts");
    wait_until("the transparent proxy holds the full snapshot", || {
        proxy.is_ready() && proxy.snapshot().version == 7
    })
    .await;
    use palisade_proxy::outbound::Routed;
    let endpoint: SocketAddr = "127.0.0.1:1".parse().expect("addr");
    assert!(matches!(
        within("route", proxy.route_for(endpoint)).await,
        Routed::Service(_)
    ));
    let elsewhere: SocketAddr = "127.0.0.1:2".parse().expect("addr");
    assert_eq!(
        within("route", proxy.route_for(elsewhere)).await,
        Routed::Passthrough
    );
    proxy.shutdown().await;
    server.abort();
}
