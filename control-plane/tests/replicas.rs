//! Two control-plane replicas and two real proxies carrying HTTP traffic: the replica the
//! proxies watch goes away under load, they resync from the other (a full snapshot on a new
//! Deltas stream), keep following config changes through it, and no request fails.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use palisade_certs::SpiffeId;
use palisade_control_plane::{ControlPlaneConfig, RunningControlPlane};
use palisade_proxy::config::{CredentialSource, UpstreamListener};
use palisade_proxy::control_plane::ControlPlaneAddrs;

const T: Duration = Duration::from_secs(15);

async fn within<F: Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(T, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out: {what}"),
    }
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + T;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

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
    palisade_proxy::ProxyConfig {
        workload: workload.into(),
        identity: identity.clone(),
        credentials: CredentialSource::ControlPlane {
            addrs: cps.clone(),
            token: token.into(),
            token_file: None,
            bundle: bundle.to_path_buf(),
            identity,
        },
        inbound_addr: "127.0.0.1:0".parse().expect("addr"),
        admin_addr: "127.0.0.1:0".parse().expect("addr"),
        app_addr: None,
        upstreams: Vec::new(),
        transparent_addr: None,
        static_config: None,
        timeouts: palisade_proxy::config::Timeouts::default(),
        limits: palisade_proxy::config::Limits::default(),
        access_log: false,
        admin_shutdown: false,
        app_probes: Default::default(),
        balancer: Default::default(),
    }
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
    // Two replicas of one mesh and one CA (the second reads the CA the first created).
    let cfg = ControlPlaneConfig {
        mesh_path: mesh_path.clone(),
        state_dir: dir.path().join("state"),
        listen: Some("127.0.0.1:0".parse().expect("addr")),
        tokens: tokens.clone(),
        tokens_file: None,
        metrics_listen: None,
    };
    let cp1 = within("replica 1", palisade_control_plane::start(cfg.clone()))
        .await
        .expect("replica 1 starts");
    let cp2 = within("replica 2", palisade_control_plane::start(cfg))
        .await
        .expect("replica 2 starts");
    let cps = ControlPlaneAddrs::parse(&format!("{},{}", cp1.addr(), cp2.addr())).expect("addrs");
    let bundle = dir
        .path()
        .join("state/ca")
        .join(palisade_certs::ca::ROOT_CERT_FILE);

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
