//! The Discovery client: a full config snapshot from the control plane, then deltas, each
//! assembled into the config held and applied atomically, and acknowledged. When the control
//! plane is gone the proxy keeps its last config and reconnects with backoff; the new stream
//! starts with a full snapshot again, so a proxy that lands on another replica resyncs whole.

use std::sync::Arc;
use std::time::Duration;

use palisade_api::delta::{Hello, Subscription};
use palisade_api::v1::discovery_client::DiscoveryClient;
use palisade_api::v1::{self, WatchRequest};

use crate::Ctx;
use crate::config::{ConfigError, Snapshot};
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
        // Capped at 2 s: a control plane that comes back is used within ~2 s (the chaos test
        // asks every proxy to resync within 5 s of its return); a dead one costs a refused
        // connect per proxy every 2 s.
        backoff = (backoff * 2).min(Duration::from_secs(2));
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

/// Detaches the on-demand resolver from a stream however the stream ends.
struct Attached<'a>(&'a Ctx);

impl Drop for Attached<'_> {
    fn drop(&mut self) {
        if let Some(od) = &self.0.on_demand {
            od.detach(&self.0.metrics);
        }
    }
}

async fn stream_from(ctx: &Arc<Ctx>, channel: tonic::transport::Channel) -> Result<(), String> {
    let known = ctx.snapshot.load().version;
    let status = |s: tonic::Status| format!("{:?}: {}", s.code(), s.message());
    let on_demand = ctx.on_demand.as_ref();
    let hello = Hello {
        workload: ctx.cfg.workload.clone(),
        known_version: known,
        on_demand: on_demand.is_some(),
        // What it resolved over an earlier stream: the first snapshot keeps it.
        services: on_demand.map(|od| od.held()).unwrap_or_default(),
    };
    let _attached = Attached(ctx);
    let mut sub = match Subscription::open_with(channel.clone(), hello).await {
        Ok(sub) => sub,
        Err(s) if s.code() == tonic::Code::Unimplemented => {
            tracing::info!(
                "the control plane has no Deltas (an earlier release); watching full snapshots"
            );
            return watch_from(ctx, channel, known).await;
        }
        Err(s) => return Err(status(s)),
    };
    // What the control plane has sent on this stream; the proxy serves what of it compiled.
    while let Some(arrived) = sub.next().await.map_err(status)? {
        let version = arrived.version;
        if let Err(e) = arrived.applied {
            // The subscription asked for a full snapshot. Its "found" answers wait for that
            // snapshot (the table does not hold their services yet); the others stand.
            count(ctx, "resync");
            tracing::warn!(version, error = %e, "config delta does not apply; asking for a full snapshot");
            if let Some(od) = on_demand {
                od.answered_unless_found(&arrived.lookups, &ctx.metrics);
            }
            continue;
        }
        // A config that does not compile is refused; the last good one keeps serving. A delta
        // that only answers lookups changes nothing to compile.
        let compiled = if arrived.changed {
            apply(ctx, sub.config())
        } else {
            Ok(())
        };
        let sent = match &compiled {
            Ok(()) => sub.ack(version).await,
            Err(e) => sub.refuse(version, e.to_string()).await,
        };
        if let Some(od) = on_demand {
            if arrived.snapshot {
                // Only now is it known whether the control plane resolves lookups; one that
                // does not (an earlier release) sends the whole mesh, which is now applied.
                if arrived.on_demand {
                    od.attach(sub.lookups());
                } else if compiled.is_ok() {
                    od.attach_whole_mesh();
                }
            }
            // After the apply: a connection woken by a found answer finds its service, and one
            // waiting on an answer a refused delta carried finds it in this config.
            od.answered(&arrived.lookups, &ctx.metrics);
            let table = ctx.outbound.load();
            od.wake_held(|dst| table.for_destination(dst).is_some(), &ctx.metrics);
            let now = std::time::Instant::now();
            let released = od.held_now(
                sub.config(),
                now,
                |key| table.get(key).map(|s| s.idle_for(now)),
                &ctx.metrics,
            );
            if !released.is_empty() {
                tracing::debug!(
                    count = released.len(),
                    "releasing services past the on-demand cap"
                );
                if !sub.lookups().send(Vec::new(), released).await {
                    return Ok(());
                }
            }
        }
        if !sent {
            return Ok(());
        }
    }
    Ok(())
}

/// The stream of full snapshots, from a control plane of an earlier release.
async fn watch_from(
    ctx: &Arc<Ctx>,
    channel: tonic::transport::Channel,
    known: u64,
) -> Result<(), String> {
    let status = |s: tonic::Status| format!("{:?}: {}", s.code(), s.message());
    let mut stream = DiscoveryClient::new(channel)
        .watch(WatchRequest {
            workload: ctx.cfg.workload.clone(),
            known_version: known,
        })
        .await
        .map_err(status)?
        .into_inner();
    while let Some(cfg) = stream.message().await.map_err(status)? {
        // A rejected snapshot is logged and counted in `apply`; the next one may do.
        if apply(ctx, &cfg).is_ok()
            && let Some(od) = &ctx.on_demand
        {
            // Watch sends the whole mesh to a proxy that declares no upstreams: once it is
            // applied, what the table does not know is no mesh service. Not before: the table
            // may still be an earlier stream's on-demand subset, and passing a mesh service's
            // traffic through as plaintext would bypass mTLS.
            od.attach_whole_mesh();
        }
    }
    Ok(())
}

fn count(ctx: &Ctx, result: &'static str) {
    ctx.metrics
        .config_updates
        .get_or_create(&ResultLabels { result })
        .inc();
}

/// Compiles `cfg` and serves it, or keeps the last good config and says why.
fn apply(ctx: &Ctx, cfg: &v1::ProxyConfig) -> Result<(), ConfigError> {
    match Snapshot::from_proto(cfg) {
        Ok(snap) => {
            count(ctx, "applied");
            ctx.apply(snap);
            ctx.config_digest.store(
                palisade_api::config_digest(cfg),
                std::sync::atomic::Ordering::Relaxed,
            );
            Ok(())
        }
        Err(e) => {
            count(ctx, "rejected");
            tracing::error!(version = cfg.version, error = %e, "config rejected; keeping the last good one");
            Err(e)
        }
    }
}
