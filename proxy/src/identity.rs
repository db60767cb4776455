//! The workload's certificate: loaded from files (static mode) or obtained from the control
//! plane's Identity service with a key that never leaves this process, then renewed at half
//! its lifetime (with jitter) for as long as the proxy runs.
//!
//! The credentials store swaps certificates atomically: the old one serves every handshake
//! until the new one is installed, so a renewal never fails a connection.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use palisade_api::v1::CertifyRequest;
use palisade_api::v1::identity_client::IdentityClient;
use palisade_certs::{KeyAndCsr, SpiffeId, Svid, TrustBundle, TrustDomain};
use rustls_pki_types::{CertificateDer, UnixTime};

use crate::Ctx;
use crate::config::CredentialSource;
use crate::control_plane::Dialer;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read credentials: {0}")]
    Files(String),
    #[error("trust bundle {path}: {message}")]
    Bundle { path: PathBuf, message: String },
    #[error("cannot reach the control plane at {addr}: {message}")]
    Connect { addr: String, message: String },
    #[error("control plane refused the certificate request: {0}")]
    Refused(String),
    /// The control plane does not accept the credentials presented (a spent bootstrap token,
    /// an unknown workload): trying again with the same ones cannot succeed.
    #[error("control plane refused the credentials: {0}")]
    Unauthenticated(String),
    #[error("the control plane returned an unusable certificate: {0}")]
    BadCertificate(String),
}

/// The SPIFFE ID the control plane serves its API with.
pub fn control_plane_id(td: &TrustDomain) -> Option<SpiffeId> {
    SpiffeId::for_workload(td, "palisade-system", "control-plane").ok()
}

pub fn load_bundle(td: &TrustDomain, path: &Path) -> Result<TrustBundle, IdentityError> {
    TrustBundle::load_pem(td, path).map_err(|e| IdentityError::Bundle {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Loads `cert.pem`/`key.pem`, checking they carry the expected identity.
pub fn load_files(id: &SpiffeId, cert: &Path, key: &Path) -> Result<Svid, IdentityError> {
    let svid = Svid::load(cert, key).map_err(|e| IdentityError::Files(e.to_string()))?;
    if &svid.id != id {
        return Err(IdentityError::Files(format!(
            "{} is for {}, not {id}",
            cert.display(),
            svid.id
        )));
    }
    Ok(svid)
}

/// The token to present now: the token file's current content when there is one (the
/// kubelet rotates a projected token in place), else the token the proxy started with.
pub(crate) fn current_token(ctx: &Ctx) -> String {
    let CredentialSource::ControlPlane {
        token, token_file, ..
    } = &ctx.cfg.credentials
    else {
        return String::new();
    };
    let Some(path) = token_file else {
        return token.clone();
    };
    match std::fs::read_to_string(path) {
        Ok(t) if !t.trim().is_empty() => t.trim().to_string(),
        Ok(_) => token.clone(),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the token file again; presenting the token read at start");
            token.clone()
        }
    }
}

/// One Certify call: new key, CSR, token; returns the SVID (with its key) and the bundle.
pub(crate) async fn certify(
    ctx: &Ctx,
    dialer: &Dialer,
    token: &str,
) -> Result<(Svid, TrustBundle), IdentityError> {
    let id = ctx.store.id().clone();
    let td = id.trust_domain();
    let cp = control_plane_id(&td)
        .ok_or_else(|| IdentityError::Refused("no control-plane identity".into()))?;
    // An expired certificate is not presented: the control plane's handshake would refuse it
    // before reading the token, which is then the only credential left.
    let tls = if ctx.store.is_ready() {
        palisade_certs::tls::client_config(&ctx.store, cp, &[b"h2"])
    } else {
        palisade_certs::tls::client_config_without_cert(&ctx.store, cp, &[b"h2"])
    }
    .map_err(|e| IdentityError::Connect {
        addr: dialer.addrs().to_string(),
        message: e.to_string(),
    })?;
    let (channel, _) =
        dialer
            .connect(Arc::new(tls))
            .await
            .map_err(|message| IdentityError::Connect {
                addr: dialer.addrs().to_string(),
                message,
            })?;
    let kc = KeyAndCsr::generate(&id).map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    let rsp = IdentityClient::new(channel)
        .certify(CertifyRequest {
            csr_der: kc.csr_der().to_vec(),
            token: token.to_string(),
        })
        .await
        .map_err(|s| {
            let why = format!("{:?}: {}", s.code(), s.message());
            if s.code() == tonic::Code::Unauthenticated {
                IdentityError::Unauthenticated(why)
            } else {
                IdentityError::Refused(why)
            }
        })?
        .into_inner();
    let chain: Vec<CertificateDer<'static>> = rsp
        .chain_der
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let roots: Vec<CertificateDer<'static>> = rsp
        .trust_bundle_der
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let bundle = TrustBundle::with_roots(&td, roots)
        .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    let got = palisade_certs::verify_svid(&chain, &bundle, Some(&td), UnixTime::now())
        .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    if got != id {
        return Err(IdentityError::BadCertificate(format!(
            "issued for {got}, expected {id}"
        )));
    }
    let leaf = chain
        .first()
        .ok_or_else(|| IdentityError::BadCertificate("empty chain".into()))?;
    let info = palisade_certs::verify::inspect(leaf)
        .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    let svid = kc
        .into_svid(Svid {
            id,
            chain,
            key: None,
            not_before: info.not_before,
            not_after: info.not_after,
        })
        .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    Ok((svid, bundle))
}

/// Installs a certificate and updates the expiry gauge.
pub fn install(ctx: &Ctx, svid: Svid) -> Result<(), IdentityError> {
    let not_after = svid.not_after;
    ctx.store
        .install(svid)
        .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    ctx.metrics.cert_expiry.set(not_after);
    Ok(())
}

/// When to renew: half of the time the certificate has left (measured when it was installed,
/// not from NotBefore, which the CA backdates for clock skew), ±10% jitter so a fleet does not
/// renew at once.
fn renew_delay(not_after: i64) -> Duration {
    let now = UnixTime::now().as_secs() as f64;
    let remaining = (not_after as f64 - now).max(1.0);
    let jitter = remaining * 0.1 * (rand::random::<f64>() - 0.5);
    Duration::from_secs_f64((remaining / 2.0 + jitter).max(0.5))
}

/// The instant the earliest of these certificate expiries (Unix seconds) is reached, on the
/// runtime's clock; None when there is none (or it is beyond the clock's range).
pub(crate) fn deadline<const N: usize>(
    not_after: [Option<i64>; N],
) -> Option<tokio::time::Instant> {
    let earliest = not_after.into_iter().flatten().min()?;
    // To the sub-second: rounding "now" down to whole seconds would let a connection live up
    // to a second past the expiry.
    let left = match u64::try_from(earliest) {
        // Before 1970: long past.
        Err(_) => Duration::ZERO,
        Ok(secs) => match std::time::UNIX_EPOCH.checked_add(Duration::from_secs(secs)) {
            Some(at) => at
                .duration_since(std::time::SystemTime::now())
                .unwrap_or(Duration::ZERO),
            None => return None,
        },
    };
    // A peer's notAfter comes off the network: out of the clock's range is "never" (the
    // verifier has already checked it is in the future).
    tokio::time::Instant::now().checked_add(left)
}

/// Completes at `at`, never when there is none.
pub(crate) async fn until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Says once, loudly, when the proxy's certificate expires without having been renewed (the
/// control plane unreachable for half its lifetime and more), and once when a valid one is
/// back. Meanwhile peers refuse the expired certificate (fail closed) and `/ready` is 503.
/// Any credential source: a file-based certificate can run out too.
pub(crate) async fn expiry_watch(ctx: Arc<Ctx>) {
    let mut stop = ctx.stop_rx.clone();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        // A proxy that bootstraps from the control plane has no certificate yet.
        let Some(not_after) = ctx.store.expiry() else {
            tokio::select! {
                _ = tick.tick() => continue,
                _ = stop.changed() => return,
            }
        };
        let now = i64::try_from(UnixTime::now().as_secs()).unwrap_or(i64::MAX);
        let left = Duration::from_secs(u64::try_from(not_after.saturating_sub(now)).unwrap_or(0));
        tokio::select! {
            _ = tokio::time::sleep(left) => {}
            _ = stop.changed() => return,
        }
        if ctx.store.is_ready() {
            // Renewed meanwhile: wait for the new one's expiry.
            continue;
        }
        tracing::error!(
            expiry = not_after,
            "the proxy's certificate expired and was not renewed: every mTLS connection to and from this proxy fails (closed) and /ready is 503 until the control plane renews it"
        );
        // Wait for a valid certificate (a renewal installs one), checking once a second.
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            if ctx.store.is_ready() {
                tracing::info!(
                    expiry = ctx.store.expiry().unwrap_or(0),
                    "a valid certificate is back: mTLS works again"
                );
                break;
            }
        }
    }
}

/// Renews for as long as the proxy runs. On failure, backs off (200 ms doubling to 30 s, or
/// to 2 s once the certificate has expired, so that a returning control plane is found at
/// once) and keeps the current certificate in use meanwhile.
///
/// A proxy whose certificate has expired and whose token the control plane refuses (locally a
/// one-time bootstrap token, spent at start) cannot get another certificate by itself: it
/// stops with an error, and its supervisor (`palisade up`, the kubelet) starts it again with
/// fresh credentials.
pub(crate) async fn renew_loop(ctx: Arc<Ctx>, dialer: Arc<Dialer>) {
    if !matches!(ctx.cfg.credentials, CredentialSource::ControlPlane { .. }) {
        return;
    }
    let mut stop = ctx.stop_rx.clone();
    loop {
        let Some(cur) = ctx.store.current() else {
            return;
        };
        let delay = renew_delay(cur.svid.not_after);
        drop(cur);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.changed() => return,
        }
        let mut backoff = Duration::from_millis(200);
        let mut failures = 0u32;
        loop {
            match certify(&ctx, &dialer, &current_token(&ctx)).await {
                Ok((svid, bundle)) => {
                    ctx.store.set_bundle(merge_bundle(&ctx, bundle));
                    match install(&ctx, svid) {
                        Ok(()) => {
                            ctx.metrics
                                .renewals
                                .get_or_create(&crate::telemetry::ResultLabels { result: "ok" })
                                .inc();
                            tracing::info!(
                                expiry = ctx.store.expiry().unwrap_or(0),
                                failed_attempts = failures,
                                "certificate renewed"
                            );
                            break;
                        }
                        Err(e) => tracing::warn!(error = %e, "renewed certificate not installed"),
                    }
                }
                Err(IdentityError::Unauthenticated(why)) if !ctx.store.is_ready() => {
                    tracing::error!(
                        reason = %why,
                        "the certificate expired and the control plane refuses this proxy's token (a bootstrap token is spent at start): stopping, to be restarted with fresh credentials"
                    );
                    ctx.credentials_lost.notify_one();
                    return;
                }
                // Once per streak of failures; the count is in palisade_identity_renewals_total.
                Err(e) if failures == 0 => tracing::warn!(
                    error = %e,
                    "certificate renewal failed; retrying with backoff, the current certificate stays in use"
                ),
                Err(e) => tracing::debug!(error = %e, failures, "certificate renewal failed again"),
            }
            failures = failures.saturating_add(1);
            ctx.metrics
                .renewals
                .get_or_create(&crate::telemetry::ResultLabels { result: "error" })
                .inc();
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.changed() => return,
            }
            let cap = if ctx.store.is_ready() { 30 } else { 2 };
            backoff = (backoff * 2).min(Duration::from_secs(cap));
        }
    }
}

/// Keeps the roots we had and adds the ones the control plane sent, so a root rotation
/// (old and new anchors side by side) never drops a root peers still use.
pub(crate) fn merge_bundle(ctx: &Ctx, new: TrustBundle) -> TrustBundle {
    let mut merged = (**ctx.store.bundle().load()).clone();
    for td in new.trust_domains() {
        for root in new.roots(td) {
            let _ = merged.add_root(td, root.clone());
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unix_now() -> i64 {
        i64::try_from(UnixTime::now().as_secs()).unwrap_or(i64::MAX)
    }

    #[test]
    fn a_connection_deadline_is_the_earliest_expiry_and_never_fails_open() {
        let now = tokio::time::Instant::now();
        assert_eq!(deadline::<2>([None, None]), None);
        // The earlier of the two, to within the second the Unix time was rounded to.
        let d = deadline([Some(unix_now() + 100), Some(unix_now() + 10)]).expect("a deadline");
        let left = d.duration_since(now);
        assert!(
            left > Duration::from_secs(8) && left <= Duration::from_secs(11),
            "{left:?}"
        );
        // Expired, even before 1970: now.
        for past in [unix_now() - 5, -5, i64::MIN] {
            let d = deadline([Some(past)]).expect("a deadline");
            assert!(
                d.duration_since(now) < Duration::from_secs(1),
                "{past}: {d:?}"
            );
        }
        // At the end of time: far away or never, without an overflow.
        assert!(
            deadline([Some(i64::MAX)])
                .is_none_or(|d| d.duration_since(now) > Duration::from_secs(100 * 365 * 86_400))
        );
    }
}
