//! The Discovery client: a stream of config snapshots from the control plane, each applied
//! atomically. When the control plane is gone the proxy keeps its last config and reconnects
//! with backoff.

use std::sync::Arc;
use std::time::Duration;

use palisade_api::v1::WatchRequest;
use palisade_api::v1::discovery_client::DiscoveryClient;

use crate::Ctx;
use crate::config::Snapshot;
use crate::control_plane::Dialer;
use crate::telemetry::ResultLabels;

pub(crate) async fn watch_loop(ctx: Arc<Ctx>, dialer: Arc<Dialer>) {
    let mut stop = ctx.stop_rx.clone();
    let mut backoff = Duration::from_millis(100);
    loop {
        let outcome = tokio::select! {
            r = watch_once(&ctx, &dialer) => r,
            _ = stop.changed() => return,
        };
        match outcome {
            Ok(()) => {
                tracing::info!("config stream ended; reconnecting");
                backoff = Duration::from_millis(100);
            }
            Err(e) => tracing::warn!(error = %e, "config stream failed; keeping the last config"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn watch_once(ctx: &Arc<Ctx>, dialer: &Dialer) -> Result<(), String> {
    let td = ctx.store.id().trust_domain();
    let cp = crate::identity::control_plane_id(&td).ok_or("no control-plane identity")?;
    let tls =
        palisade_certs::tls::client_config(&ctx.store, cp, &[b"h2"]).map_err(|e| e.to_string())?;
    let (channel, addr) = dialer.connect(Arc::new(tls)).await?;
    let r = stream_from(ctx, channel).await;
    // A broken stream: start the next attempt from the first replica, not this one.
    dialer.failed(addr);
    r
}

async fn stream_from(ctx: &Arc<Ctx>, channel: tonic::transport::Channel) -> Result<(), String> {
    let known = ctx.snapshot.load().version;
    let mut stream = DiscoveryClient::new(channel)
        .watch(WatchRequest {
            workload: ctx.cfg.workload.clone(),
            known_version: known,
        })
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    loop {
        let msg = stream
            .message()
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
        let Some(cfg) = msg else {
            return Ok(());
        };
        match Snapshot::from_proto(&cfg) {
            Ok(snap) => {
                ctx.metrics
                    .config_updates
                    .get_or_create(&ResultLabels { result: "applied" })
                    .inc();
                ctx.apply(snap);
                ctx.config_digest.store(
                    palisade_api::config_digest(&cfg),
                    std::sync::atomic::Ordering::Relaxed,
                );
            }
            Err(e) => {
                ctx.metrics
                    .config_updates
                    .get_or_create(&ResultLabels { result: "rejected" })
                    .inc();
                tracing::error!(version = cfg.version, error = %e, "config rejected; keeping the last good one");
            }
        }
    }
}
