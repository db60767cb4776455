//! A certificate that runs out without a renewal (the control plane gone for longer than half
//! its lifetime): the mesh fails closed — the peer refuses the expired certificate, no request
//! gets through, not even over a connection made before the expiry — the proxy says it is not ready, and when a valid certificate is installed
//! (what a renewal does) traffic flows again without a restart.

mod support;

use std::time::Duration;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_fails_closed_and_a_renewal_recovers() {
    init();
    let app = echo_app().await;
    let pki = Pki::new();
    // The callee's proxy gets a certificate that expires in 3 seconds.
    let yaml = "mode: STRICT\nappProtocol: detect\nservices: []\n";
    let mut cfg = proxy_config(&pki, "api", API, Some(app.addr), &[], yaml);
    let short = pki
        .ca
        .issue(&id(API), Duration::from_secs(3))
        .expect("short SVID");
    let dir = pki.dir.path().join("api-short");
    short.write(&dir).expect("write");
    cfg.credentials = palisade_proxy::config::CredentialSource::Files {
        cert: dir.join(palisade_certs::svid::CERT_FILE),
        key: dir.join(palisade_certs::svid::KEY_FILE),
        bundle: pki.bundle.clone(),
    };
    let server = within(palisade_proxy::Proxy::start(cfg))
        .await
        .expect("server");
    let client =
        start_client_proxy(&pki, server.inbound_addr, API, "detect", test_timeouts()).await;
    let upstream = upstream_addr(&client, SERVICE);
    assert_eq!(get(upstream, "/").await.expect("before").status, 200);
    assert!(server.is_ready());

    // Expired: not ready, and every new request fails (the client proxy refuses the
    // certificate; its pooled connection was made with the valid one, so wait until a new
    // handshake is needed: the test asks on new connections until refused).
    let not_after = short.not_after;
    let refused = within_for(Duration::from_secs(20), async {
        loop {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            if now > not_after && !server.is_ready() {
                // A fresh handshake from a fresh client proxy is refused.
                let fresh =
                    start_client_proxy(&pki, server.inbound_addr, API, "detect", test_timeouts())
                        .await;
                let r = get(upstream_addr(&fresh, SERVICE), "/").await;
                return (r.map(|r| r.status), fresh);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let (status, fresh) = refused;
    let status = status.expect("the client proxy answers");
    assert!(
        status.is_server_error(),
        "a request reached an app through an expired certificate: {status}"
    );
    // The first client proxy's pooled connection, made while the certificate was valid, was
    // closed at its expiry (GOAWAY): its requests need a new handshake now, and fail too.
    let pooled = get(upstream, "/")
        .await
        .expect("the client proxy answers")
        .status;
    assert!(
        pooled.is_server_error(),
        "a request went through a connection older than the expiry: {pooled}"
    );
    let refused_handshakes = metric(
        &fresh,
        "palisade_tls_handshake_errors_total",
        &[("direction", "outbound")],
    );
    assert!(refused_handshakes >= 1.0, "the refusal is counted");
    let admin = server.admin_addr;
    let (code, body) = {
        let r = get(admin, "/ready").await.expect("admin");
        (r.status, String::from_utf8_lossy(&r.body).into_owned())
    };
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("certificate=false"), "{body}");

    // A renewal installs a valid certificate: ready again, and traffic flows on new
    // connections, nothing restarted.
    server
        .store()
        .install(pki.issue(API))
        .expect("install renewed SVID");
    assert!(server.is_ready());
    for (name, via) in [
        ("fresh", upstream_addr(&fresh, SERVICE)),
        ("first", upstream),
    ] {
        let ok = within_for(Duration::from_secs(10), async {
            loop {
                if let Ok(r) = get(via, "/").await
                    && r.status == 200
                {
                    return r.status;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        assert_eq!(ok, 200, "{name} client proxy");
    }
}
