//! Real mTLS handshakes over loopback TCP between SVIDs, with the configs the proxy uses
//! (`tls::server_config` / `tls::client_config`) and credentials served from a
//! `CredentialStore`. Each failure is asserted on its specific reason, on the side that
//! detected it, and on the alert the other side received.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use palisade_certs::ca::sign_with_issuer_for_tests;
use palisade_certs::tls::{
    ALPN_H2, ExpectedServerVerifier, client_config, handshake_error_reason, peer_identity,
    server_config, server_config_optional_client,
};
use palisade_certs::{Ca, CredentialStore, SpiffeId, Svid, TrustBundle, TrustDomain};
use rcgen::{CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose};
use rustls::{AlertDescription, ClientConfig, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::{TlsAcceptor, TlsConnector, client::TlsStream};

const TD: &str = "example.org";
const WEB: &str = "spiffe://example.org/ns/demo/sa/web";
const API: &str = "spiffe://example.org/ns/demo/sa/api";
const LIMIT: Duration = Duration::from_secs(10);

/// Every await in these tests goes through here.
async fn within<F: Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(LIMIT, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what} did not finish within {LIMIT:?}"),
    }
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

fn td(s: &str) -> TrustDomain {
    TrustDomain::new(s).unwrap()
}

fn new_ca(name: &str) -> Ca {
    Ca::generate(&td(name), None).unwrap()
}

fn bundle(cas: &[&Ca]) -> TrustBundle {
    let mut b = TrustBundle::new();
    for ca in cas {
        b.add_root(ca.trust_domain(), ca.root_der().clone())
            .unwrap();
    }
    b
}

/// A store holding a fresh SVID for `who` from `ca`, trusting the roots of `trust`.
fn workload(ca: &Ca, who: &str, trust: &[&Ca]) -> Arc<CredentialStore> {
    let store = CredentialStore::new(id(who), bundle(trust));
    store
        .install(ca.issue(&id(who), Duration::from_secs(3600)).unwrap())
        .unwrap();
    store
}

/// An SVID for `who` that expired an hour ago, signed by the real issuer.
fn expired_svid(ca: &Ca, who: &str) -> Svid {
    let now = time::OffsetDateTime::now_utc();
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = vec![rcgen::SanType::URI(who.try_into().unwrap())];
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.not_before = now - time::Duration::hours(2);
    p.not_after = now - time::Duration::hours(1);
    let (leaf, key) = sign_with_issuer_for_tests(ca, &p).unwrap();
    Svid {
        id: id(who),
        chain: vec![leaf, ca.issuer_der().clone()],
        key: Some(PrivatePkcs8KeyDer::from(key)),
        not_before: p.not_before.unix_timestamp(),
        not_after: p.not_after.unix_timestamp(),
    }
}

/// What the server saw for one connection.
struct Accepted {
    peer: Option<SpiffeId>,
    alpn: Option<Vec<u8>>,
}

/// An echo server on 127.0.0.1:0: each connection's handshake outcome is reported on the
/// channel; established connections echo until EOF.
async fn spawn_server(
    cfg: ServerConfig,
) -> (SocketAddr, mpsc::UnboundedReceiver<io::Result<Accepted>>) {
    let listener = within("bind", TcpListener::bind("127.0.0.1:0"))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(cfg));
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        // The server lives as long as the test, and at most LIMIT without a new connection.
        while let Ok(Ok((tcp, _))) = tokio::time::timeout(LIMIT, listener.accept()).await {
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut tls = match tokio::time::timeout(LIMIT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                    Err(_) => {
                        let _ = tx.send(Err(io::Error::new(io::ErrorKind::TimedOut, "accept")));
                        return;
                    }
                };
                let conn = tls.get_ref().1;
                let accepted = Accepted {
                    peer: peer_identity(conn),
                    alpn: conn.alpn_protocol().map(|p| p.to_vec()),
                };
                let _ = tx.send(Ok(accepted));
                let mut buf = [0u8; 1024];
                loop {
                    match tokio::time::timeout(LIMIT, tls.read(&mut buf)).await {
                        Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                        Ok(Ok(n)) => {
                            let sent = tokio::time::timeout(LIMIT, async {
                                tls.write_all(&buf[..n]).await?;
                                tls.flush().await
                            })
                            .await;
                            if !matches!(sent, Ok(Ok(()))) {
                                break;
                            }
                        }
                    }
                }
            });
        }
    });
    (addr, rx)
}

async fn next_accept(
    rx: &mut mpsc::UnboundedReceiver<io::Result<Accepted>>,
) -> io::Result<Accepted> {
    within("server handshake report", rx.recv())
        .await
        .expect("server task alive")
}

async fn connect(addr: SocketAddr, cfg: ClientConfig) -> io::Result<TlsStream<TcpStream>> {
    let tcp = within("tcp connect", TcpStream::connect(addr)).await?;
    let name = ServerName::try_from("workload.mesh.invalid").unwrap();
    within(
        "client handshake",
        TlsConnector::from(Arc::new(cfg)).connect(name, tcp),
    )
    .await
}

/// Sends a message and reads the echo: proves the connection carries data both ways.
async fn echo(tls: &mut TlsStream<TcpStream>, msg: &[u8]) -> io::Result<()> {
    within("client write", async {
        tls.write_all(msg).await?;
        tls.flush().await
    })
    .await?;
    let mut back = vec![0u8; msg.len()];
    within("client read", tls.read_exact(&mut back)).await?;
    assert_eq!(back, msg);
    Ok(())
}

/// Connects, then exchanges one message: the client's view of a whole mTLS session. In TLS 1.3
/// the client finishes its handshake before the server has checked the client certificate, so a
/// client-cert rejection shows up on the client's first read.
async fn session(addr: SocketAddr, cfg: ClientConfig) -> io::Result<TlsStream<TcpStream>> {
    let mut tls = connect(addr, cfg).await?;
    echo(&mut tls, b"ping").await?;
    Ok(tls)
}

fn rustls_error(e: &io::Error) -> &rustls::Error {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .unwrap_or_else(|| panic!("not a rustls error: {e:?}"))
}

fn reason(e: &io::Error) -> &'static str {
    handshake_error_reason(rustls_error(e))
}

fn alert(e: &io::Error) -> AlertDescription {
    match rustls_error(e) {
        rustls::Error::AlertReceived(a) => *a,
        other => panic!("expected an alert, got {other:?}"),
    }
}

fn server_leaf(tls: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    tls.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn mutual_tls_succeeds_and_each_side_sees_the_other() {
    let ca = new_ca(TD);
    let server = workload(&ca, API, &[&ca]);
    let client = workload(&ca, WEB, &[&ca]);
    let (addr, mut rx) =
        spawn_server(server_config(&server, Some(td(TD)), &[ALPN_H2]).unwrap()).await;

    let tls = session(addr, client_config(&client, id(API), &[ALPN_H2]).unwrap())
        .await
        .expect("mTLS session");
    let conn = tls.get_ref().1;
    assert_eq!(
        peer_identity(conn),
        Some(id(API)),
        "client sees the server's ID"
    );
    assert_eq!(conn.alpn_protocol(), Some(ALPN_H2));
    assert_eq!(
        conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    assert_eq!(server_leaf(&tls), server.current().unwrap().svid.chain[0]);
    // The whole chain (leaf + issuer) was sent.
    assert_eq!(conn.peer_certificates().unwrap().len(), 2);

    let accepted = next_accept(&mut rx).await.expect("server accepted");
    assert_eq!(
        accepted.peer,
        Some(id(WEB)),
        "server sees the client's SPIFFE ID"
    );
    assert_eq!(accepted.alpn.as_deref(), Some(ALPN_H2));
}

#[tokio::test]
async fn wrong_expected_identity_is_refused_by_the_client() {
    let ca = new_ca(TD);
    let server = workload(&ca, API, &[&ca]);
    let client = workload(&ca, WEB, &[&ca]);
    let (addr, mut rx) = spawn_server(server_config(&server, Some(td(TD)), &[]).unwrap()).await;

    let expected = id("spiffe://example.org/ns/demo/sa/db");
    let err = session(addr, client_config(&client, expected, &[]).unwrap())
        .await
        .expect_err("client must refuse an unexpected server");
    assert_eq!(reason(&err), "unexpected_identity");
    let server_err = next_accept(&mut rx)
        .await
        .err()
        .expect("server sees the abort");
    assert_eq!(alert(&server_err), AlertDescription::CertificateUnknown);
    assert_eq!(reason(&server_err), "alert_received");
}

#[tokio::test]
async fn server_from_a_foreign_trust_domain_is_refused() {
    let ours = new_ca(TD);
    let theirs = new_ca("other.org");
    let foreign_api = "spiffe://other.org/ns/demo/sa/api";
    let server = workload(&theirs, foreign_api, &[&theirs, &ours]);

    // 1. No bundle for other.org: refused even when the client expects exactly that ID.
    let client = workload(&ours, WEB, &[&ours]);
    let (addr, mut rx) = spawn_server(server_config(&server, None, &[]).unwrap()).await;
    let err = session(addr, client_config(&client, id(foreign_api), &[]).unwrap())
        .await
        .expect_err("no bundle for other.org");
    assert_eq!(reason(&err), "no_bundle");
    assert_eq!(
        alert(&next_accept(&mut rx).await.err().unwrap()),
        AlertDescription::CertificateUnknown
    );

    // 2. Federated bundle, but the client expects its own domain's API: wrong identity.
    let federated = workload(&ours, WEB, &[&ours, &theirs]);
    let err = session(addr, client_config(&federated, id(API), &[]).unwrap())
        .await
        .expect_err("other.org is not example.org");
    assert_eq!(reason(&err), "unexpected_identity");
    assert!(next_accept(&mut rx).await.is_err());

    // 3. Control: federated and expecting that exact ID, the handshake works.
    let tls = session(
        addr,
        client_config(&federated, id(foreign_api), &[]).unwrap(),
    )
    .await
    .expect("federated peer");
    assert_eq!(peer_identity(tls.get_ref().1), Some(id(foreign_api)));
    assert_eq!(next_accept(&mut rx).await.unwrap().peer, Some(id(WEB)));
}

#[tokio::test]
async fn client_from_a_foreign_trust_domain_is_refused_by_the_server() {
    let ours = new_ca(TD);
    let theirs = new_ca("other.org");
    let server = workload(&ours, API, &[&ours, &theirs]);
    let client = workload(
        &theirs,
        "spiffe://other.org/ns/demo/sa/web",
        &[&theirs, &ours],
    );
    // The server trusts other.org's root but accepts only example.org clients.
    let (addr, mut rx) = spawn_server(server_config(&server, Some(td(TD)), &[]).unwrap()).await;
    let client_err = session(addr, client_config(&client, id(API), &[]).unwrap())
        .await
        .expect_err("server refuses a foreign client");
    let server_err = next_accept(&mut rx).await.err().unwrap();
    assert_eq!(reason(&server_err), "foreign_trust_domain");
    assert_eq!(alert(&client_err), AlertDescription::CertificateUnknown);
}

#[tokio::test]
async fn expired_server_certificate_is_refused() {
    let ca = new_ca(TD);
    let server = CredentialStore::new(id(API), bundle(&[&ca]));
    server.install(expired_svid(&ca, API)).unwrap();
    let client = workload(&ca, WEB, &[&ca]);
    let (addr, mut rx) = spawn_server(server_config(&server, None, &[]).unwrap()).await;

    let err = session(addr, client_config(&client, id(API), &[]).unwrap())
        .await
        .expect_err("expired server");
    assert_eq!(reason(&err), "expired");
    assert!(matches!(
        rustls_error(&err),
        rustls::Error::InvalidCertificate(rustls::CertificateError::Expired)
    ));
    let server_err = next_accept(&mut rx).await.err().unwrap();
    assert_eq!(alert(&server_err), AlertDescription::CertificateExpired);
}

#[tokio::test]
async fn expired_client_certificate_is_refused() {
    let ca = new_ca(TD);
    let server = workload(&ca, API, &[&ca]);
    let client = CredentialStore::new(id(WEB), bundle(&[&ca]));
    client.install(expired_svid(&ca, WEB)).unwrap();
    let (addr, mut rx) = spawn_server(server_config(&server, None, &[]).unwrap()).await;

    let client_err = session(addr, client_config(&client, id(API), &[]).unwrap())
        .await
        .expect_err("expired client");
    let server_err = next_accept(&mut rx).await.err().unwrap();
    assert_eq!(reason(&server_err), "expired");
    assert_eq!(alert(&client_err), AlertDescription::CertificateExpired);
}

/// A client with the root as trust anchor that sends no certificate at all.
fn certless_client(ca: &Ca, expected: &str) -> ClientConfig {
    let shared = Arc::new(arc_swap::ArcSwap::from_pointee(bundle(&[ca])));
    ClientConfig::builder_with_provider(palisade_certs::tls::provider().clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ExpectedServerVerifier::new(
            shared,
            id(expected),
        )))
        .with_no_client_auth()
}

#[tokio::test]
async fn client_without_a_certificate_is_refused() {
    let ca = new_ca(TD);
    let server = workload(&ca, API, &[&ca]);
    let (addr, mut rx) = spawn_server(server_config(&server, None, &[]).unwrap()).await;

    let client_err = session(addr, certless_client(&ca, API))
        .await
        .expect_err("mTLS requires a client certificate");
    let server_err = next_accept(&mut rx).await.err().unwrap();
    assert!(matches!(
        rustls_error(&server_err),
        rustls::Error::NoCertificatesPresented
    ));
    assert_eq!(reason(&server_err), "no_client_certificate");
    assert_eq!(alert(&client_err), AlertDescription::CertificateRequired);

    // A plain WebPKI client that trusts the root cannot even accept the server: an X509-SVID has
    // no DNS name to match (it identifies a workload, not a host).
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.root_der().clone()).unwrap();
    let plain = ClientConfig::builder_with_provider(palisade_certs::tls::provider().clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let err = session(addr, plain).await.expect_err("no DNS SAN");
    assert!(
        matches!(
            rustls_error(&err),
            rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                    | rustls::CertificateError::NotValidForNameContext { .. }
            )
        ),
        "{err:?}"
    );
    assert!(next_accept(&mut rx).await.is_err());
}

#[tokio::test]
async fn optional_client_auth_admits_a_certless_client_but_still_checks_a_sent_cert() {
    let ca = new_ca(TD);
    let other = new_ca(TD);
    let server = workload(&ca, API, &[&ca]);
    let (addr, mut rx) =
        spawn_server(server_config_optional_client(&server, None, &[]).unwrap()).await;

    session(addr, certless_client(&ca, API))
        .await
        .expect("no client certificate is fine here");
    assert_eq!(next_accept(&mut rx).await.unwrap().peer, None);

    let untrusted = workload(&other, WEB, &[&ca]);
    assert!(
        session(addr, client_config(&untrusted, id(API), &[]).unwrap())
            .await
            .is_err()
    );
    assert_eq!(
        reason(&next_accept(&mut rx).await.err().unwrap()),
        "untrusted_chain"
    );
}

#[tokio::test]
async fn client_certificate_from_another_ca_is_refused() {
    let ca = new_ca(TD);
    let rogue = new_ca(TD); // same trust domain name, different root
    let server = workload(&ca, API, &[&ca]);
    // The rogue client trusts our root, so it accepts the server; the server must not accept it.
    let client = workload(&rogue, WEB, &[&ca]);
    let (addr, mut rx) = spawn_server(server_config(&server, Some(td(TD)), &[]).unwrap()).await;

    let client_err = session(addr, client_config(&client, id(API), &[]).unwrap())
        .await
        .expect_err("client signed by another CA");
    let server_err = next_accept(&mut rx).await.err().unwrap();
    assert_eq!(reason(&server_err), "untrusted_chain");
    assert_eq!(alert(&client_err), AlertDescription::CertificateUnknown);

    // And symmetrically a rogue server is refused by a client that trusts only our root.
    let rogue_server = workload(&rogue, API, &[&ca]);
    let honest = workload(&ca, WEB, &[&ca]);
    let (addr2, mut rx2) =
        spawn_server(server_config(&rogue_server, Some(td(TD)), &[]).unwrap()).await;
    let err = session(addr2, client_config(&honest, id(API), &[]).unwrap())
        .await
        .expect_err("server signed by another CA");
    assert_eq!(reason(&err), "untrusted_chain");
    assert!(next_accept(&mut rx2).await.is_err());
}

#[tokio::test]
async fn tls12_only_client_is_refused() {
    let ca = new_ca(TD);
    let server = workload(&ca, API, &[&ca]);
    let (addr, mut rx) = spawn_server(server_config(&server, None, &[]).unwrap()).await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.root_der().clone()).unwrap();
    let tls12 = ClientConfig::builder_with_provider(palisade_certs::tls::provider().clone())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    assert!(session(addr, tls12).await.is_err());
    let server_err = next_accept(&mut rx).await.err().unwrap();
    assert_eq!(reason(&server_err), "incompatible");
}

#[tokio::test]
async fn credentials_swap_applies_to_new_handshakes_only() {
    let ca = new_ca(TD);
    let server = workload(&ca, API, &[&ca]);
    let client = workload(&ca, WEB, &[&ca]);
    let (addr, mut rx) = spawn_server(server_config(&server, None, &[]).unwrap()).await;
    // The configs are built once, like the proxy does; the store is read per handshake.
    let ccfg = client_config(&client, id(API), &[]).unwrap();

    let old_server = server.current().unwrap().svid.chain[0].clone();
    let mut first = session(addr, ccfg.clone()).await.expect("first session");
    assert_eq!(server_leaf(&first), old_server);
    assert!(next_accept(&mut rx).await.is_ok());

    // Renewal on the server side.
    let renewed = ca.issue(&id(API), Duration::from_secs(7200)).unwrap();
    let new_server = renewed.chain[0].clone();
    server.install(renewed).unwrap();
    let serial = |der: &CertificateDer<'_>| {
        x509_parser::parse_x509_certificate(der)
            .unwrap()
            .1
            .raw_serial()
            .to_vec()
    };
    assert_ne!(serial(&old_server), serial(&new_server));

    let mut second = session(addr, ccfg.clone()).await.expect("second session");
    assert_eq!(serial(&server_leaf(&second)), serial(&new_server));
    assert!(next_accept(&mut rx).await.is_ok());

    // The connection opened before the swap keeps working, with its original certificate.
    echo(&mut first, b"still alive after the swap")
        .await
        .unwrap();
    assert_eq!(serial(&server_leaf(&first)), serial(&old_server));

    // Renewal on the client side: the server sees the new client cert on the next handshake.
    let old_client = client.current().unwrap().svid.chain[0].clone();
    let renewed = ca.issue(&id(WEB), Duration::from_secs(7200)).unwrap();
    let new_client = renewed.chain[0].clone();
    client.install(renewed).unwrap();
    assert_ne!(old_client, new_client);
    let _third = session(addr, ccfg).await.expect("third session");
    assert_eq!(next_accept(&mut rx).await.unwrap().peer, Some(id(WEB)));

    // Both earlier connections still carry data.
    echo(&mut first, b"first").await.unwrap();
    echo(&mut second, b"second").await.unwrap();
}

#[tokio::test]
async fn server_sees_which_client_certificate_was_used() {
    // The server can tell the renewed client cert from the old one: the peer chain is the one
    // the client's store held at handshake time.
    let ca = new_ca(TD);
    let server = workload(&ca, API, &[&ca]);
    let client = workload(&ca, WEB, &[&ca]);
    let listener = within("bind", TcpListener::bind("127.0.0.1:0"))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(server_config(&server, None, &[]).unwrap()));
    let ccfg = client_config(&client, id(API), &[]).unwrap();

    for round in 0..2 {
        if round == 1 {
            client
                .install(ca.issue(&id(WEB), Duration::from_secs(600)).unwrap())
                .unwrap();
        }
        let want = client.current().unwrap().svid.chain[0].clone();
        let (server_side, client_side) = tokio::join!(
            async {
                let (tcp, _) = within("accept", listener.accept()).await.unwrap();
                within("server handshake", acceptor.accept(tcp)).await
            },
            connect(addr, ccfg.clone())
        );
        let server_tls = server_side.expect("server handshake");
        client_side.expect("client handshake");
        let seen = server_tls.get_ref().1.peer_certificates().unwrap()[0].clone();
        assert_eq!(seen, want, "round {round}");
    }
}

// --- TLS serving certificates (the injector webhook's) -----------------------------------------

const WEBHOOK_DNS: &str = "palisade-control-plane.palisade-system.svc";

/// A plain web PKI client (rustls' own WebPKI verifier, no SPIFFE rules) trusting only `ca`'s
/// root: what the Kubernetes API server does with the webhook's `caBundle`.
fn web_client(ca: &Ca, versions: &[&'static rustls::SupportedProtocolVersion]) -> ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.root_der().clone()).unwrap();
    ClientConfig::builder_with_provider(palisade_certs::tls::provider().clone())
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

async fn web_connect(
    addr: SocketAddr,
    cfg: ClientConfig,
    name: &str,
) -> io::Result<TlsStream<TcpStream>> {
    let tcp = within("tcp connect", TcpStream::connect(addr)).await?;
    let name = ServerName::try_from(name.to_string()).unwrap();
    within(
        "client handshake",
        TlsConnector::from(Arc::new(cfg)).connect(name, tcp),
    )
    .await
}

#[tokio::test]
async fn a_serving_certificate_verifies_for_its_dns_name_only_under_the_mesh_root() {
    let ca = new_ca(TD);
    let cert = ca
        .issue_serving_cert(&[WEBHOOK_DNS], Duration::from_secs(3600))
        .expect("serving cert");
    assert_eq!(cert.chain.len(), 2, "leaf and issuer");
    let store = palisade_certs::tls::ServingCertStore::new(&cert).unwrap();
    let (addr, _rx) =
        spawn_server(palisade_certs::tls::serving_config(store, &[b"http/1.1"]).unwrap()).await;

    for versions in [
        &[&rustls::version::TLS13][..],
        &[&rustls::version::TLS12][..],
    ] {
        let mut tls = web_connect(addr, web_client(&ca, versions), WEBHOOK_DNS)
            .await
            .expect("a web PKI client trusting the mesh root accepts the webhook's name");
        echo(&mut tls, b"ping").await.unwrap();
    }

    // Another name, or another CA's root: refused.
    let e = web_connect(
        addr,
        web_client(&ca, &[&rustls::version::TLS13]),
        "other.palisade-system.svc",
    )
    .await
    .expect_err("wrong name");
    assert!(
        matches!(
            rustls_error(&e),
            rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. }
            )
        ),
        "{e:?}"
    );
    let other = new_ca(TD);
    let e = web_connect(
        addr,
        web_client(&other, &[&rustls::version::TLS13]),
        WEBHOOK_DNS,
    )
    .await
    .expect_err("foreign root");
    // Same trust domain, so the same issuer name: the chain is found and its signature fails.
    assert!(
        matches!(rustls_error(&e), rustls::Error::InvalidCertificate(_)),
        "{e:?}"
    );
}

#[tokio::test]
async fn a_renewed_serving_certificate_is_presented_from_the_next_handshake() {
    let ca = new_ca(TD);
    let first = ca
        .issue_serving_cert(&[WEBHOOK_DNS], Duration::from_secs(3600))
        .unwrap();
    let store = palisade_certs::tls::ServingCertStore::new(&first).unwrap();
    let (addr, _rx) =
        spawn_server(palisade_certs::tls::serving_config(store.clone(), &[]).unwrap()).await;
    let before = web_connect(
        addr,
        web_client(&ca, &[&rustls::version::TLS13]),
        WEBHOOK_DNS,
    )
    .await
    .unwrap();
    assert_eq!(server_leaf(&before), first.chain[0]);

    let second = ca
        .issue_serving_cert(&[WEBHOOK_DNS], Duration::from_secs(7200))
        .unwrap();
    store.install(&second).unwrap();
    assert_eq!(store.not_after(), second.not_after);
    let after = web_connect(
        addr,
        web_client(&ca, &[&rustls::version::TLS13]),
        WEBHOOK_DNS,
    )
    .await
    .unwrap();
    assert_eq!(server_leaf(&after), second.chain[0]);
    assert_ne!(first.chain[0], second.chain[0]);
}

#[test]
fn a_serving_certificate_is_a_server_only_leaf_with_dns_sans() {
    let ca = new_ca(TD);
    let cert = ca
        .issue_serving_cert(
            &[WEBHOOK_DNS, "palisade-control-plane"],
            Duration::from_secs(60),
        )
        .unwrap();
    let (_, leaf) = x509_parser::parse_x509_certificate(&cert.chain[0]).unwrap();
    let sans: Vec<String> = leaf
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|n| format!("{n:?}"))
        .collect();
    assert_eq!(
        sans,
        [
            format!("DNSName({WEBHOOK_DNS:?})"),
            "DNSName(\"palisade-control-plane\")".to_string()
        ]
    );
    assert!(!leaf.is_ca());
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && !eku.client_auth);
    let ku = leaf.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && !ku.key_cert_sign());
    assert!(cert.key_pem().starts_with("-----BEGIN PRIVATE KEY-----"));
    assert_eq!(cert.chain_pem().matches("BEGIN CERTIFICATE").count(), 2);

    for bad in [
        "",
        "bad name",
        "trailing.dot.",
        "ünïcode.svc",
        "-leading.svc",
    ] {
        assert!(
            matches!(
                ca.issue_serving_cert(&[bad], Duration::from_secs(60)),
                Err(palisade_certs::CaError::BadDnsName(_))
            ),
            "{bad:?} accepted"
        );
    }
    assert!(matches!(
        ca.issue_serving_cert(&[], Duration::from_secs(60)),
        Err(palisade_certs::CaError::NoDnsNames)
    ));
    assert!(matches!(
        ca.issue_serving_cert(&[WEBHOOK_DNS], Duration::from_secs(365 * 24 * 3600)),
        Err(palisade_certs::CaError::Lifetime(_))
    ));
}

/// openssl, an independent verifier, agrees: a TLS server certificate for the webhook's name
/// under the mesh root.
#[test]
fn openssl_verifies_a_serving_certificate_for_its_name() {
    let ca = new_ca(TD);
    let cert = ca
        .issue_serving_cert(&[WEBHOOK_DNS], Duration::from_secs(600))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root.pem");
    let issuer = dir.path().join("issuer.pem");
    let leaf = dir.path().join("leaf.pem");
    std::fs::write(
        &root,
        palisade_certs::pem::certs_pem(&[ca.root_der().clone()]),
    )
    .unwrap();
    std::fs::write(&issuer, palisade_certs::pem::certs_pem(&cert.chain[1..])).unwrap();
    std::fs::write(&leaf, palisade_certs::pem::certs_pem(&cert.chain[..1])).unwrap();
    let verify = |name: &str| {
        std::process::Command::new("openssl")
            .args([
                "verify",
                "-purpose",
                "sslserver",
                "-verify_hostname",
                name,
                "-CAfile",
            ])
            .arg(&root)
            .arg("-untrusted")
            .arg(&issuer)
            .arg(&leaf)
            .output()
    };
    let ok = match verify(WEBHOOK_DNS) {
        Ok(out) => out,
        Err(e) => {
            eprintln!("skipping: openssl is not available ({e})");
            return;
        }
    };
    assert!(
        ok.status.success(),
        "{}{}",
        String::from_utf8_lossy(&ok.stdout),
        String::from_utf8_lossy(&ok.stderr)
    );
    let wrong = verify("other.palisade-system.svc").unwrap();
    assert!(
        !wrong.status.success(),
        "a certificate for another name passed"
    );
}
