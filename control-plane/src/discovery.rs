//! The Discovery service: one config stream per proxy, and only that proxy's config.
//!
//! The caller's SVID decides what it receives: a proxy can watch only the workload whose
//! SPIFFE ID it holds, so a compromised workload cannot read another's policies. On every
//! model change each stream recomputes its own workload's config and sends it only if it
//! differs (ignoring the version): a change pushes only to the proxies it concerns.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;
use palisade_api::v1::discovery_server::Discovery;
use palisade_api::v1::{ProxyConfig, WatchRequest};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::conn::PeerInfo;
use crate::limits::shown;
use crate::metrics::Metrics;
use crate::model::Model;

/// The Discovery gRPC service.
#[derive(Debug, Clone)]
pub struct DiscoveryService {
    model: watch::Receiver<Arc<Model>>,
    /// The CA's roots, sent in every config so a root rotation reaches proxies.
    trust_bundle_der: Arc<Vec<Vec<u8>>>,
    metrics: Arc<Metrics>,
    /// Flips at shutdown: streams never end by themselves, and a graceful server shutdown
    /// waits for open streams.
    stop: watch::Receiver<bool>,
}

/// Whether two configs say the same thing, whatever their versions.
pub fn same_config(a: &ProxyConfig, b: &ProxyConfig) -> bool {
    a.inbound == b.inbound && a.services == b.services && a.trust_bundle_der == b.trust_bundle_der
}

impl DiscoveryService {
    pub fn new(
        model: watch::Receiver<Arc<Model>>,
        trust_bundle_der: Vec<Vec<u8>>,
        metrics: Arc<Metrics>,
        stop: watch::Receiver<bool>,
    ) -> Self {
        Self {
            model,
            trust_bundle_der: Arc::new(trust_bundle_der),
            metrics,
            stop,
        }
    }

    /// The config of `workload` in `model` for a caller with `peer`'s identity, or why it may
    /// not have it.
    fn config_for(
        &self,
        model: &Model,
        workload: &str,
        peer: &palisade_certs::SpiffeId,
    ) -> Result<ProxyConfig, Status> {
        // On Kubernetes a workload is a pod, and two namespaces may hold pods of one name: the
        // caller's identity (which carries its namespace) picks the right one.
        if let Some(w) = model.mesh.workload_with_id(workload, peer) {
            let mut cfg = model.config_of(w);
            cfg.trust_bundle_der = self.trust_bundle_der.as_ref().clone();
            return Ok(cfg);
        }
        let w = model.mesh.workload(workload).ok_or_else(|| {
            Status::not_found(format!("workload {:?} is not in the mesh", shown(workload)))
        })?;
        let want = w.spiffe_id(&model.mesh).map_err(|e| {
            Status::internal(format!("workload {workload} has no valid SPIFFE ID: {e}"))
        })?;
        if &want != peer {
            return Err(Status::permission_denied(format!(
                "caller is {peer}; the config of workload {workload} is only for {want}"
            )));
        }
        let mut cfg = model.config_of(w);
        cfg.trust_bundle_der = self.trust_bundle_der.as_ref().clone();
        Ok(cfg)
    }
}

/// The `reason` label of a refused Watch, from the status [`DiscoveryService::config_for`]
/// refused it with.
fn refusal_reason(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::NotFound => "unknown_workload",
        tonic::Code::PermissionDenied => "permission_denied",
        _ => "internal",
    }
}

/// Decrements the watcher gauge however the stream task ends.
struct WatcherGuard(Arc<Metrics>);

impl Drop for WatcherGuard {
    fn drop(&mut self) {
        self.0.watchers.dec();
    }
}

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    type WatchStream = Pin<Box<dyn Stream<Item = Result<ProxyConfig, Status>> + Send + 'static>>;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let peer = PeerInfo::of(&request).cloned();
        let req = request.into_inner();
        let remote = peer.as_ref().map(|p| p.remote);
        let Some(id) = peer.and_then(|p| p.identity) else {
            self.metrics.watch_refused("no_client_certificate");
            tracing::warn!(?remote, workload = %shown(&req.workload), "Watch refused: no client certificate");
            return Err(Status::unauthenticated(
                "Watch needs the proxy's SVID as a client certificate",
            ));
        };
        let mut model_rx = self.model.clone();
        let model = model_rx.borrow_and_update().clone();
        let first = self.config_for(&model, &req.workload, &id).inspect_err(|s| {
            self.metrics.watch_refused(refusal_reason(s.code()));
            tracing::warn!(?remote, peer = %id, workload = %shown(&req.workload), reason = s.message(), "Watch refused");
        })?;
        if req.known_version != 0 {
            tracing::info!(
                workload = %req.workload,
                known_version = req.known_version,
                version = first.version,
                "proxy resyncing"
            );
        } else {
            tracing::info!(workload = %req.workload, version = first.version, "proxy watching");
        }

        let (tx, rx) = mpsc::channel::<Result<ProxyConfig, Status>>(4);
        let this = self.clone();
        let workload = req.workload;
        self.metrics.watchers.inc();
        let guard = WatcherGuard(self.metrics.clone());
        tokio::spawn(async move {
            let _guard = guard;
            let mut stop = this.stop.clone();
            let mut last = first.clone();
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            this.metrics.pushes.inc();
            loop {
                tokio::select! {
                    changed = model_rx.changed() => {
                        if changed.is_err() {
                            return; // the source is gone: the server is stopping
                        }
                    }
                    _ = tx.closed() => return,
                    _ = stop.changed() => return,
                }
                let model = model_rx.borrow_and_update().clone();
                match this.config_for(&model, &workload, &id) {
                    Ok(cfg) if same_config(&cfg, &last) => {
                        tracing::trace!(%workload, generation = model.generation, "change does not concern this proxy");
                    }
                    Ok(cfg) => {
                        tracing::debug!(%workload, version = cfg.version, "pushing config");
                        last = cfg.clone();
                        if tx.send(Ok(cfg)).await.is_err() {
                            return;
                        }
                        this.metrics.pushes.inc();
                    }
                    Err(status) => {
                        // The workload left the mesh or changed identity: this stream's
                        // caller is no longer entitled to it. The proxy keeps its last config.
                        tracing::warn!(%workload, peer = %id, reason = status.message(), "ending Watch");
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
