//! Identity costs: how long the CA takes to sign a leaf from a CSR, how long verifying an
//! X509-SVID takes, and how long a full mTLS handshake between two SVIDs takes over loopback
//! TCP (TCP connect + TLS 1.3 + both certificate verifications).
//!
//! Run with `cargo bench --bench certs`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use palisade_certs::tls::{client_config, server_config};
use palisade_certs::{Ca, CredentialStore, KeyAndCsr, SpiffeId, TrustBundle, TrustDomain};
use rustls::pki_types::{ServerName, UnixTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const LIMIT: Duration = Duration::from_secs(10);

fn setup() -> (Ca, TrustDomain) {
    let td = TrustDomain::new("cluster.local").expect("trust domain");
    let ca = Ca::generate(&td, None).expect("CA");
    (ca, td)
}

fn signing(c: &mut Criterion) {
    let (ca, td) = setup();
    let id = SpiffeId::for_workload(&td, "demo", "web").expect("ID");
    let csr = KeyAndCsr::generate(&id).expect("CSR").csr_der().to_vec();
    let ttl = Duration::from_secs(24 * 3600);
    let bundle =
        TrustBundle::with_roots(&td, [ca.root_der().clone()]).expect("bundle with the root");
    let svid = ca.issue(&id, ttl).expect("SVID");

    let mut g = c.benchmark_group("certs");
    g.bench_function("sign_csr", |b| {
        b.iter(|| ca.sign_csr(black_box(&csr), &id, ttl).expect("signed"))
    });
    g.bench_function("key_and_csr_generate", |b| {
        b.iter(|| KeyAndCsr::generate(black_box(&id)).expect("CSR"))
    });
    g.bench_function("verify_svid", |b| {
        b.iter(|| {
            palisade_certs::verify_svid(black_box(&svid.chain), &bundle, Some(&td), UnixTime::now())
                .expect("valid")
        })
    });
    g.finish();
}

fn handshake(c: &mut Criterion) {
    let (ca, td) = setup();
    let store = |ns: &str, sa: &str| {
        let id = SpiffeId::for_workload(&td, ns, sa).expect("ID");
        let bundle =
            TrustBundle::with_roots(&td, [ca.root_der().clone()]).expect("bundle with the root");
        let store = CredentialStore::new(id.clone(), bundle);
        store
            .install(ca.issue(&id, Duration::from_secs(3600)).expect("SVID"))
            .expect("install");
        store
    };
    let server = store("demo", "api");
    let client = store("demo", "web");
    let acceptor = TlsAcceptor::from(Arc::new(
        server_config(&server, Some(td.clone()), &[]).expect("server config"),
    ));
    let connector = TlsConnector::from(Arc::new(
        client_config(&client, server.id().clone(), &[]).expect("client config"),
    ));
    let name = ServerName::try_from("workload.mesh.invalid").expect("name");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).expect("bind");
    let addr = listener.local_addr().expect("addr");

    // One connection per iteration: TCP connect, the TLS 1.3 handshake with both SVIDs verified,
    // and one byte each way so both sides are done with the handshake.
    let one = || {
        rt.block_on(async {
            let server_side = async {
                let (tcp, _) = listener.accept().await?;
                tcp.set_nodelay(true)?;
                let mut tls = acceptor.accept(tcp).await?;
                let mut b = [0u8; 1];
                tls.read_exact(&mut b).await?;
                tls.write_all(&b).await?;
                tls.flush().await?;
                Ok::<_, std::io::Error>(tls)
            };
            let client_side = async {
                let tcp = TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                let mut tls = connector.connect(name.clone(), tcp).await?;
                tls.write_all(b"x").await?;
                tls.flush().await?;
                let mut b = [0u8; 1];
                tls.read_exact(&mut b).await?;
                Ok::<_, std::io::Error>(tls)
            };
            let (s, c) =
                tokio::time::timeout(LIMIT, async { tokio::join!(server_side, client_side) })
                    .await
                    .expect("handshake within the time limit");
            // Server closes first, so TIME_WAIT stays on the listener's side and the client's
            // ephemeral ports are not exhausted over a long run.
            drop(s.expect("server handshake"));
            drop(c.expect("client handshake"));
        })
    };

    let mut g = c.benchmark_group("certs");
    g.sample_size(50);
    g.measurement_time(Duration::from_secs(5));
    g.bench_function("mtls_handshake_loopback", |b| b.iter(&one));
    g.finish();
}

criterion_group!(benches, signing, handshake);
criterion_main!(benches);
