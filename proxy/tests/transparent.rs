//! Transparent mode without iptables: what a redirected connection's original destination
//! maps to. (The redirect itself is tested in network namespaces, with `palisade init`.)

mod support;

use std::net::SocketAddr;

use palisade_proxy::Proxy;
use palisade_proxy::outbound::Routed;
use support::*;

/// The outbound table's key a redirected connection to `dst` goes to; None: passthrough.
async fn route(p: &Proxy, dst: &str) -> Option<String> {
    let dst: SocketAddr = dst.parse().expect("addr");
    match within(p.route_for(dst)).await {
        Routed::Service(key) => Some(key.to_string()),
        Routed::Passthrough => None,
        refused => panic!("{dst}: {refused:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn original_destinations_map_to_services_and_pods() {
    init();
    let pki = Pki::new();
    let yaml = format!(
        "mode: STRICT\nservices:\n\
         - name: api.demo\n  port: 8080\n  protocol: http\n  virtualIps: [\"10.96.0.10\", \"fd00::a\"]\n  endpoints:\n\
         \x20   - {{ address: \"10.1.0.5:8080\", identity: \"{API}\" }}\n\
         \x20   - {{ address: \"10.1.0.6:8080\", identity: \"{API}\" }}\n"
    );
    let cfg = proxy_config(&pki, "web", WEB, None, &[], &yaml);
    let p = within(Proxy::start(cfg)).await.expect("proxy");
    assert_eq!(
        route(&p, "10.96.0.10:8080").await.as_deref(),
        Some("api.demo:8080")
    );
    assert_eq!(
        route(&p, "[fd00::a]:8080").await.as_deref(),
        Some("api.demo:8080")
    );
    // Another port of the virtual IP is not the service.
    assert_eq!(route(&p, "10.96.0.10:9090").await, None);
    // A pod's own address goes to that pod only.
    assert_eq!(
        route(&p, "10.1.0.6:8080").await.as_deref(),
        Some("endpoint:10.1.0.6:8080")
    );
    // Anything else passes through (egress).
    assert_eq!(route(&p, "93.184.216.34:443").await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_virtual_ip_is_a_config_error() {
    init();
    let pki = Pki::new();
    let yaml = "mode: STRICT\nservices:\n- name: api.demo\n  port: 8080\n  virtualIps: [\"not-an-ip\"]\n  endpoints: []\n";
    let cfg = proxy_config(&pki, "web", WEB, None, &[], yaml);
    let err = Proxy::start(cfg).await.err().expect("refused");
    assert!(err.to_string().contains("virtual_ips"), "{err}");
}
