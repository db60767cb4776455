//! On-demand discovery with a real transparent proxy and two control-plane replicas: the proxy
//! starts with no services, resolves a destination the first time it is dialled (one lookup
//! however many connections wait for it), passes through what is no mesh service, releases the
//! least recently dialled service past its cap, keeps what it resolved when it moves to the
//! other replica, and refuses what it cannot resolve while no control plane answers.
//!
//! A redirected connection needs iptables in a network namespace; `Proxy::route_for` drives
//! the same resolution a redirected connection's original destination goes through
//! (`tests/init_netns.rs` covers the redirect itself).

use std::collections::HashMap;
use std::net::SocketAddr;

use palisade_certs::SpiffeId;
use palisade_control_plane::RunningControlPlane;
use palisade_proxy::outbound::Routed;

#[path = "support/bounded.rs"]
mod bounded;
#[path = "support/proxy.rs"]
mod proxy;

use bounded::{free_port, two_replicas, wait_until, within};

/// The value of the sample `name` (with its labels) in `text`; 0 when absent.
fn sample(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn cp_sample(cp: &RunningControlPlane, name: &str) -> u64 {
    sample(&cp.metrics().encode(), name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transparent_proxy_resolves_what_it_dials_and_only_that() {
    palisade_certs::tls::install_default_provider();
    let dir = tempfile::tempdir().expect("tempdir");
    let (api_inbound, db_inbound) = (free_port(), free_port());
    std::fs::create_dir_all(dir.path().join("policies")).expect("mkdir");
    let mesh_path = dir.path().join("mesh.yaml");
    let mesh = format!(
        "trustDomain: cluster.local\ncertificateLifetime: 1h\ncontrolPlane: {{ port: {} }}\n\
         policies: policies/\nworkloads:\n\
         \x20 - {{ name: web, namespace: demo, labels: {{ app: web }}, inboundPort: {}, adminPort: {} }}\n\
         \x20 - {{ name: api, namespace: demo, labels: {{ app: api }}, appPort: {}, inboundPort: {api_inbound}, adminPort: {} }}\n\
         \x20 - {{ name: db, namespace: demo, labels: {{ app: db }}, appPort: {}, inboundPort: {db_inbound}, adminPort: {} }}\n\
         services:\n\
         \x20 - {{ name: api, namespace: demo, port: 8080, selector: {{ app: api }}, protocol: http }}\n\
         \x20 - {{ name: db, namespace: demo, port: 5432, selector: {{ app: db }}, protocol: opaque }}\n",
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    );
    std::fs::write(&mesh_path, mesh).expect("write mesh");
    let tokens: HashMap<String, String> =
        [("web".to_string(), "token-web-0123456789".to_string())].into();
    let (cp1, cp2, cps, bundle) =
        two_replicas(mesh_path, dir.path().join("state"), tokens.clone()).await;

    let td = palisade_certs::TrustDomain::new("cluster.local").expect("trust domain");
    let mut web_cfg = proxy::on_control_plane(
        "web",
        SpiffeId::for_workload(&td, "demo", "web").expect("identity"),
        cps,
        &tokens["web"],
        None,
        bundle,
    );
    web_cfg.transparent_addr = Some("127.0.0.1:0".parse().expect("addr"));
    web_cfg.limits.max_on_demand_services = 1;
    let web = within("web proxy", palisade_proxy::Proxy::start(web_cfg))
        .await
        .expect("web proxy starts");
    wait_until("web holds a certificate and its config", || web.is_ready()).await;
    assert!(
        web.snapshot().services.is_empty(),
        "a transparent proxy starts with no services, not the whole mesh"
    );

    // api's address: resolved on first use, and the table holds api from then on.
    let api_addr = SocketAddr::from(([127, 0, 0, 1], api_inbound));
    let routed = within("resolve api", web.route_for(api_addr)).await;
    assert!(matches!(routed, Routed::Service(_)), "{routed:?}");
    assert!(web.snapshot().services.contains_key("api.demo:8080"));
    assert_eq!(
        cp_sample(&cp1, "palisade_discovery_lookups_total{result=\"found\"}"),
        1
    );
    // Dialled again: the table answers, no lookup.
    assert_eq!(within("api again", web.route_for(api_addr)).await, routed);
    assert_eq!(
        cp_sample(&cp1, "palisade_discovery_lookups_total{result=\"found\"}"),
        1
    );

    // No service has this address: passed through, and remembered for a while.
    let elsewhere = SocketAddr::from(([127, 0, 0, 1], free_port()));
    for _ in 0..3 {
        assert_eq!(
            within("elsewhere", web.route_for(elsewhere)).await,
            Routed::Passthrough
        );
    }
    assert_eq!(
        cp_sample(
            &cp1,
            "palisade_discovery_lookups_total{result=\"not_found\"}"
        ),
        1
    );

    // Twenty connections to db at once share one lookup; past the cap (1), api is released.
    let db_addr = SocketAddr::from(([127, 0, 0, 1], db_inbound));
    let routes = within(
        "twenty connections to db",
        futures_util::future::join_all((0..20).map(|_| web.route_for(db_addr))),
    )
    .await;
    assert!(
        routes.iter().all(|r| matches!(r, Routed::Service(_))),
        "{routes:?}"
    );
    assert_eq!(
        cp_sample(&cp1, "palisade_discovery_lookups_total{result=\"found\"}"),
        2
    );
    wait_until("api is released and db kept", || {
        let snap = web.snapshot();
        !snap.services.contains_key("api.demo:8080") && snap.services.contains_key("db.demo:5432")
    })
    .await;
    let metrics = web.metrics().encode();
    assert_eq!(
        sample(&metrics, "palisade_outbound_on_demand_evictions_total"),
        1
    );
    assert_eq!(sample(&metrics, "palisade_outbound_on_demand_services"), 1);

    // Replica 1 goes: web resyncs from replica 2 and, having named db in its hello, keeps it
    // without looking it up again.
    within("replica 1 stops", cp1.shutdown()).await;
    wait_until("web acknowledges replica 2's snapshot", || {
        cp_sample(&cp2, "palisade_discovery_acks_total{result=\"ack\"}") >= 1
    })
    .await;
    assert!(web.snapshot().services.contains_key("db.demo:5432"));
    assert_eq!(
        cp_sample(&cp2, "palisade_discovery_lookups_total{result=\"found\"}"),
        0
    );
    assert!(matches!(
        within("db on replica 2", web.route_for(db_addr)).await,
        Routed::Service(_)
    ));

    // No control plane at all: what is held keeps routing, a new destination is refused (not
    // passed through in plaintext), and counted.
    within("replica 2 stops", cp2.shutdown()).await;
    wait_until("web refuses a destination it cannot resolve", || {
        futures_util::FutureExt::now_or_never(web.route_for(api_addr))
            == Some(Routed::Refused("discovery_unavailable"))
    })
    .await;
    assert!(matches!(
        within("db without a control plane", web.route_for(db_addr)).await,
        Routed::Service(_)
    ));
    assert!(
        sample(
            &web.metrics().encode(),
            "palisade_outbound_lookups_total{result=\"unavailable\"}"
        ) >= 1
    );
    web.shutdown().await;
}
