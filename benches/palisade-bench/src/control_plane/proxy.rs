//! One simulated proxy: it starts as a real proxy does (a key and CSR, `Identity.Certify` with
//! its bootstrap token over TLS, then `Discovery.Deltas`, or `Watch`, over mTLS with the
//! certificate it got) and records every config it receives, for the figures.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use palisade_api::delta::{Hello, Subscription};
use palisade_api::v1::discovery_client::DiscoveryClient;
use palisade_api::v1::identity_client::IdentityClient;
use palisade_api::v1::{CertifyRequest, WatchRequest};
use palisade_certs::{CredentialStore, KeyAndCsr, SpiffeId, Svid, TrustBundle, TrustDomain};
use prost::Message;
use rustls_pki_types::CertificateDer;

use super::{NAMESPACE, workload};

/// How a simulated proxy gets its config.
#[derive(Clone, Copy, Debug)]
pub(super) enum Mode {
    /// `Watch`, the whole config every time.
    FullSnapshots,
    /// `Deltas`, receiving its declared upstream or (`--transparent`) every service.
    Deltas,
    /// `Deltas` on demand, looking up the one address it dials.
    OnDemand { dials: SocketAddr },
}

/// What one simulated proxy received: (config version, when, encoded bytes, services).
pub(super) type Received = Mutex<Vec<(u64, Instant, usize, usize)>>;

/// Certifies one simulated proxy and starts its Watch; returns once the stream is open.
pub(super) async fn start_proxy(
    i: usize,
    cp: SocketAddr,
    td: &TrustDomain,
    bundle: &TrustBundle,
    token: &str,
    received: Arc<Received>,
    mode: Mode,
) -> anyhow::Result<()> {
    let name = workload(i);
    let id = SpiffeId::for_workload(td, NAMESPACE, &name)?;
    let store = CredentialStore::new(id.clone(), bundle.clone());
    let cp_id = palisade_control_plane::control_plane_id(td)?;
    let tls = Arc::new(palisade_certs::tls::client_config(
        &store,
        cp_id.clone(),
        &[b"h2"],
    )?);
    let kc = KeyAndCsr::generate(&id)?;
    let ch = palisade_api::client::connect(cp, tls.clone()).await?;
    let rsp = IdentityClient::new(ch)
        .certify(CertifyRequest {
            csr_der: kc.csr_der().to_vec(),
            token: token.to_string(),
        })
        .await
        .with_context(|| format!("{name}: Certify"))?
        .into_inner();
    let svid = Svid {
        id: SpiffeId::parse(&rsp.spiffe_id)?,
        chain: rsp
            .chain_der
            .into_iter()
            .map(CertificateDer::from)
            .collect(),
        key: None,
        not_before: 0,
        not_after: rsp.valid_until_unix,
    };
    store.install(kc.into_svid(svid)?)?;
    // A new connection, presenting the certificate.
    let ch = palisade_api::client::connect(cp, tls).await?;
    // As a proxy does: Deltas, each applied to the config held and acknowledged; full
    // snapshots over Watch from a control plane without Deltas (an A/B against an earlier
    // build with `--control-plane-bin`) or with `--full-snapshots`.
    let deltas = match mode {
        Mode::FullSnapshots => Err(tonic::Status::unimplemented("--full-snapshots")),
        Mode::Deltas => Subscription::open(ch.clone(), name.clone(), 0).await,
        Mode::OnDemand { .. } => {
            let hello = Hello {
                workload: name.clone(),
                on_demand: true,
                ..Default::default()
            };
            Subscription::open_with(ch.clone(), hello).await
        }
    };
    match deltas {
        Ok(mut sub) => {
            tokio::spawn(async move {
                let _store = store;
                // On demand: the snapshot (no services) is not the config the proxy works
                // with; the answer to its lookup is, and is recorded as its first.
                let mut lookup = match mode {
                    Mode::OnDemand { dials } => Some(dials),
                    _ => None,
                };
                while let Ok(Some(arrived)) = sub.next().await {
                    let at = Instant::now();
                    if let Some(dst) = lookup.take() {
                        if arrived.applied.is_err()
                            || !sub.ack(arrived.version).await
                            || !sub.lookups().send(vec![dst.to_string()], Vec::new()).await
                        {
                            break;
                        }
                        continue;
                    }
                    if let Ok(mut r) = received.lock() {
                        r.push((
                            arrived.version,
                            at,
                            arrived.encoded_len,
                            sub.config().services.len(),
                        ));
                    }
                    // A delta that did not apply has already asked for a resync.
                    if arrived.applied.is_ok() && !sub.ack(arrived.version).await {
                        break;
                    }
                }
            });
        }
        Err(s) if s.code() == tonic::Code::Unimplemented => {
            let mut stream = DiscoveryClient::new(ch)
                .watch(WatchRequest {
                    workload: name.clone(),
                    known_version: 0,
                })
                .await
                .with_context(|| format!("{name}: Watch"))?
                .into_inner();
            tokio::spawn(async move {
                // Keep the store alive with the stream: the TLS config reads the certificate
                // from it.
                let _store = store;
                while let Ok(Some(cfg)) = stream.message().await {
                    let at = Instant::now();
                    let bytes = cfg.encoded_len();
                    if let Ok(mut r) = received.lock() {
                        r.push((cfg.version, at, bytes, cfg.services.len()));
                    }
                }
            });
        }
        Err(s) => return Err(s).with_context(|| format!("{name}: Deltas")),
    }
    Ok(())
}
