//! Proxies negotiate the post-quantum hybrid X25519MLKEM768 with each other, and still talk to
//! a peer that only knows X25519 (a rolling upgrade).

mod support;

use std::sync::Arc;

use http::StatusCode;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_negotiate_x25519mlkem768() {
    let app = echo_app().await;
    let m = mesh(app.addr, MeshOpts::default()).await;
    let r = get(m.upstream, "/").await.expect("request");
    assert_eq!(r.status, StatusCode::OK);
    let pq = [("group", "X25519MLKEM768")];
    assert!(
        metric(
            &m.client,
            "palisade_tls_connections_total",
            &[("direction", "outbound"), pq[0]]
        ) >= 1.0
    );
    assert!(
        metric(
            &m.server,
            "palisade_tls_connections_total",
            &[("direction", "inbound"), pq[0]]
        ) >= 1.0
    );
    assert_eq!(
        metric(
            &m.client,
            "palisade_tls_connections_total",
            &[("group", "X25519")]
        ),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_classical_peer_still_connects_with_x25519() {
    let app = tcp_echo_app().await;
    let m = mesh(app, MeshOpts::default()).await;
    // A client whose provider has no post-quantum group: ring's stock provider.
    let svid = m.pki.issue(WEB);
    let classical = rustls::crypto::ring::default_provider();
    assert!(
        classical
            .kx_groups
            .iter()
            .all(|g| g.name() != rustls::NamedGroup::X25519MLKEM768)
    );
    let bundle = Arc::new(arc_swap::ArcSwap::from_pointee(m.pki.trust_bundle()));
    let verifier = palisade_certs::tls::ExpectedServerVerifier::new(bundle, id(API));
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(classical))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(
            svid.chain.clone(),
            rustls_pki_types::PrivateKeyDer::Pkcs8(svid.key.as_ref().expect("key").clone_key()),
        )
        .expect("client cert");
    cfg.alpn_protocols = vec![palisade_proxy::tls::ALPN_OPAQUE.to_vec()];
    let mut tls = within(tls_connect(m.server.inbound_addr, Arc::new(cfg)))
        .await
        .expect("handshake");
    tls.write_all(b"ping").await.expect("write");
    let mut buf = [0u8; 4];
    within(tls.read_exact(&mut buf)).await.expect("echo");
    assert_eq!(&buf, b"ping");
    wait_metric(
        &m.server,
        "palisade_tls_connections_total",
        &[("direction", "inbound"), ("group", "X25519")],
        1.0,
    )
    .await;
}
