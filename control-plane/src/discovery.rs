//! The Discovery service: one config stream per proxy, and only that proxy's config.
//!
//! The caller's SVID decides what it receives: a proxy can watch only the workload whose
//! SPIFFE ID it holds, so a compromised workload cannot read another's policies. On every
//! model change each stream assembles its own workload's config from the generation's shared
//! pieces ([`crate::pieces`]) and sends something only if its inbound part or the digest of one
//! of its services differs: a change pushes only to the proxies it concerns.
//!
//! `Deltas` (what proxies use) sends a full snapshot first and then only what changed: the
//! services added or changed, the keys of those gone, the inbound config if it differs. The
//! proxy acknowledges each; a refusal that asks for a resync (the proxy's version is not the
//! delta's base) is answered with a full snapshot. `Watch` sends the whole config every time, for proxies of
//! earlier releases.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use palisade_api::v1::discovery_server::Discovery;
use palisade_api::v1::{
    ConfigDelta, DeltaRequest, Lookup, LookupResult, ProxyConfig, ServiceKey, WatchRequest,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::conn::PeerInfo;
use crate::limits::shown;
use crate::mesh::Workload;
use crate::metrics::{Metrics, ResultLabel};
use crate::model::Model;
use crate::parts::ProxyParts;
use crate::pieces::Wanted;

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

    /// The workload `workload` of `model` for a caller with `peer`'s identity, or why it may
    /// not have it.
    fn workload_for<'m>(
        model: &'m Model,
        workload: &str,
        peer: &palisade_certs::SpiffeId,
    ) -> Result<&'m Workload, Status> {
        // On Kubernetes a workload is a pod, and two namespaces may hold pods of one name: the
        // caller's identity (which carries its namespace) picks the right one.
        if let Some(w) = model.workload_with_id(workload, peer) {
            return Ok(w);
        }
        let w = model
            .pieces()
            .workloads_named(workload)
            .first()
            .map(|&i| &model.mesh.workloads[i])
            .ok_or_else(|| {
                Status::not_found(format!("workload {:?} is not in the mesh", shown(workload)))
            })?;
        let want = w.spiffe_id(&model.mesh).map_err(|e| {
            Status::internal(format!("workload {workload} has no valid SPIFFE ID: {e}"))
        })?;
        Err(Status::permission_denied(format!(
            "caller is {peer}; the config of workload {workload} is only for {want}"
        )))
    }

    /// What `workload`'s proxy gets from `model`: the parts to compare, or why it may not.
    fn parts_for(
        model: &Model,
        workload: &str,
        peer: &palisade_certs::SpiffeId,
        scope: &Scope,
    ) -> Result<ProxyParts, Status> {
        let w = Self::workload_for(model, workload, peer)?;
        Ok(match scope {
            Scope::Declared => model.parts_of(w),
            Scope::OnDemand(wanted) => model.parts_on_demand(w, wanted),
        })
    }

    fn message(&self, parts: &ProxyParts) -> ProxyConfig {
        parts.config(self.trust_bundle_der.as_ref().clone())
    }
}

/// The `reason` label of a refused Watch, from the status [`DiscoveryService::workload_for`]
/// refused it with.
fn refusal_reason(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::NotFound => "unknown_workload",
        tonic::Code::PermissionDenied => "permission_denied",
        _ => "internal",
    }
}

/// Which services a stream's proxy gets.
enum Scope {
    /// Its declared upstreams, or the whole mesh if it declares none (`Watch`, and `Deltas`
    /// without `on_demand`).
    Declared,
    /// Its declared upstreams and the services it resolved on demand.
    OnDemand(Wanted),
}

/// The most services one proxy may resolve on demand at once; lookups past it are refused
/// (the proxy evicts before it gets there, 1,000 by default).
pub const MAX_ON_DEMAND: usize = 4096;

impl Scope {
    /// Resolves `lookups` against `model` (services found join the scope) and drops
    /// `releases`; the answers, counted in `palisade_discovery_lookups_total`.
    fn resolve(
        &mut self,
        model: &Model,
        lookups: &[String],
        releases: &[ServiceKey],
        metrics: &Metrics,
    ) -> Vec<Lookup> {
        let Scope::OnDemand(wanted) = self else {
            // Not an on-demand stream: it holds what it declared, nothing joins.
            return lookups
                .iter()
                .map(|d| Self::answer(metrics, d, LookupResult::LookupRefused))
                .collect();
        };
        for r in releases {
            wanted.remove(&(r.name.clone(), r.namespace.clone(), r.port));
        }
        lookups
            .iter()
            .map(|d| {
                let Some(found) = d.parse().ok().and_then(|dst| model.pieces().lookup(dst)) else {
                    return Self::answer(metrics, d, LookupResult::LookupNotFound);
                };
                let (name, ns, port) = found.key();
                let key = (name.to_string(), ns.to_string(), port);
                if !wanted.contains(&key) && wanted.len() >= MAX_ON_DEMAND {
                    // Services deleted from the mesh are never released by the proxy (it no
                    // longer holds them): they must not fill the cap.
                    wanted.retain(|k| model.pieces().contains(k));
                    if wanted.len() >= MAX_ON_DEMAND {
                        return Self::answer(metrics, d, LookupResult::LookupRefused);
                    }
                }
                wanted.insert(key);
                Self::answer(metrics, d, LookupResult::LookupFound)
            })
            .collect()
    }

    fn answer(metrics: &Metrics, destination: &str, result: LookupResult) -> Lookup {
        let label = match result {
            LookupResult::LookupFound => "found",
            LookupResult::LookupNotFound => "not_found",
            LookupResult::LookupRefused => "refused",
        };
        metrics
            .lookups
            .get_or_create(&ResultLabel { result: label })
            .inc();
        Lookup {
            destination: destination.to_string(),
            result: result as i32,
        }
    }
}

/// How long a Deltas caller has to name its workload.
const HELLO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A stream task's end of its response stream: sends config messages and counts them.
///
/// Messages go through the channel boxed: a channel allocates 32 slots at once whatever its
/// bound, and a `Result<ConfigDelta, Status>` is about 170 bytes, so unboxed slots were 5 kB
/// per proxy of the control plane's memory.
struct Outbox<T> {
    tx: mpsc::Sender<Box<Result<T, Status>>>,
    metrics: Arc<Metrics>,
}

impl<T> Outbox<T> {
    /// Sends `msg` and counts it in `palisade_discovery_pushes_total`; false when the proxy is
    /// gone.
    async fn push(&self, msg: T) -> bool {
        if self.tx.send(Box::new(Ok(msg))).await.is_err() {
            return false;
        }
        self.metrics.pushes.inc();
        true
    }

    /// Ends the stream with `status`.
    async fn end(&self, status: Status) {
        let _ = self.tx.send(Box::new(Err(status))).await;
    }

    /// Resolves when the proxy is gone.
    async fn closed(&self) {
        self.tx.closed().await;
    }
}

/// Decrements the watcher gauge however the stream task ends.
struct WatcherGuard(Arc<Metrics>);

impl Drop for WatcherGuard {
    fn drop(&mut self) {
        self.0.watchers.dec();
    }
}

type ConfigStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// A stream the caller may have: who it is, the model it starts from, its first parts.
struct Opened {
    id: palisade_certs::SpiffeId,
    model_rx: watch::Receiver<Arc<Model>>,
    first: ProxyParts,
}

impl DiscoveryService {
    /// Counts, logs and answers a stream opened without a client certificate.
    fn no_certificate(&self, remote: Option<std::net::SocketAddr>, workload: &str) -> Status {
        self.metrics.watch_refused("no_client_certificate");
        tracing::warn!(?remote, workload = %shown(workload), "Watch refused: no client certificate");
        Status::unauthenticated("Watch needs the proxy's SVID as a client certificate")
    }

    /// Checks that the caller may watch `workload` and finds what it gets first; counts and logs
    /// a refusal. `known_version` is what the proxy held before (0: nothing).
    fn open(
        &self,
        peer: Option<PeerInfo>,
        workload: &str,
        known_version: u64,
        scope: &Scope,
    ) -> Result<Opened, Status> {
        let remote = peer.as_ref().map(|p| p.remote);
        let Some(id) = peer.and_then(|p| p.identity) else {
            return Err(self.no_certificate(remote, workload));
        };
        let mut model_rx = self.model.clone();
        let model = model_rx.borrow_and_update().clone();
        let first = Self::parts_for(&model, workload, &id, scope).inspect_err(|s| {
            self.metrics.watch_refused(refusal_reason(s.code()));
            tracing::warn!(?remote, peer = %id, workload = %shown(workload), reason = s.message(), "Watch refused");
        })?;
        if known_version != 0 {
            tracing::info!(%workload, known_version, version = first.version, "proxy resyncing");
        } else {
            tracing::info!(%workload, version = first.version, "proxy watching");
        }
        Ok(Opened {
            id,
            model_rx,
            first,
        })
    }

    /// The model's next generation, once one arrives; `None` when the stream should end
    /// quietly (the server is stopping).
    async fn next_generation(
        model_rx: &mut watch::Receiver<Arc<Model>>,
        stop: &mut watch::Receiver<bool>,
    ) -> Option<Arc<Model>> {
        tokio::select! {
            changed = model_rx.changed() => changed.ok()?,
            _ = stop.changed() => return None,
        }
        Some(model_rx.borrow_and_update().clone())
    }

    /// Runs `task` for one proxy's stream, counted in `palisade_discovery_watchers` while it
    /// runs; what it pushes to its outbox is the response stream.
    fn stream<T, F>(&self, task: impl FnOnce(Outbox<T>) -> F) -> ConfigStream<T>
    where
        T: Send + 'static,
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(4);
        self.metrics.watchers.inc();
        let guard = WatcherGuard(self.metrics.clone());
        let run = task(Outbox {
            tx,
            metrics: self.metrics.clone(),
        });
        tokio::spawn(async move {
            let _guard = guard;
            run.await;
        });
        Box::pin(ReceiverStream::new(rx).map(|m| *m))
    }
}

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    type WatchStream = ConfigStream<ProxyConfig>;
    type DeltasStream = ConfigStream<ConfigDelta>;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let peer = PeerInfo::of(&request).cloned();
        let req = request.into_inner();
        let Opened {
            id,
            mut model_rx,
            first,
        } = self.open(peer, &req.workload, req.known_version, &Scope::Declared)?;
        let this = self.clone();
        let workload = req.workload;
        Ok(Response::new(self.stream(|out| async move {
            let mut stop = this.stop.clone();
            if !out.push(this.message(&first)).await {
                return;
            }
            let mut last = first;
            loop {
                let model = tokio::select! {
                    m = Self::next_generation(&mut model_rx, &mut stop) => match m {
                        Some(m) => m,
                        None => return,
                    },
                    _ = out.closed() => return,
                };
                match Self::parts_for(&model, &workload, &id, &Scope::Declared) {
                    Ok(parts) if parts.same_as(&last) => {
                        tracing::trace!(%workload, generation = model.generation, "change does not concern this proxy");
                    }
                    Ok(parts) => {
                        tracing::debug!(%workload, version = parts.version, "pushing config");
                        if !out.push(this.message(&parts)).await {
                            return;
                        }
                        last = parts;
                    }
                    Err(status) => {
                        // The workload left the mesh or changed identity: this stream's
                        // caller is no longer entitled to it. The proxy keeps its last config.
                        tracing::warn!(%workload, peer = %id, reason = status.message(), "ending Watch");
                        out.end(status).await;
                        return;
                    }
                }
            }
        })))
    }

    async fn deltas(
        &self,
        request: Request<Streaming<DeltaRequest>>,
    ) -> Result<Response<Self::DeltasStream>, Status> {
        let peer = PeerInfo::of(&request).cloned();
        // Before waiting for the hello: a caller without a certificate (allowed on this port
        // for bootstrap) gets nothing to hold open.
        if peer.as_ref().and_then(|p| p.identity.as_ref()).is_none() {
            return Err(self.no_certificate(peer.map(|p| p.remote), ""));
        }
        let mut incoming = request.into_inner();
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, incoming.message()).await {
            Ok(Ok(Some(hello))) => hello,
            Ok(Ok(None)) | Err(_) => {
                return Err(Status::invalid_argument(
                    "Deltas: the first message names the workload",
                ));
            }
            Ok(Err(status)) => return Err(status),
        };
        let mut scope = if hello.on_demand {
            Scope::OnDemand(
                hello
                    .services
                    .iter()
                    .take(MAX_ON_DEMAND)
                    .map(|k| (k.name.clone(), k.namespace.clone(), k.port))
                    .collect(),
            )
        } else {
            Scope::Declared
        };
        let Opened {
            id,
            mut model_rx,
            first,
        } = self.open(peer, &hello.workload, hello.version, &scope)?;
        let this = self.clone();
        let workload = hello.workload;
        Ok(Response::new(self.stream(|out| async move {
            let mut stop = this.stop.clone();
            let bundle = || this.trust_bundle_der.as_ref().clone();
            let on_demand = matches!(scope, Scope::OnDemand(_));
            let mut snapshot = first.snapshot(bundle());
            snapshot.on_demand = on_demand;
            if !out.push(snapshot).await {
                return;
            }
            // The parts the proxy holds, as far as this stream knows.
            let mut last = first;
            loop {
                // A new generation is answered with a delta (if it concerns the proxy), a
                // request for a resync with a full snapshot of the current one, lookups with a
                // delta that carries the answers.
                let (model, resync, answers) = tokio::select! {
                    m = Self::next_generation(&mut model_rx, &mut stop) => match m {
                        Some(m) => (m, false, Vec::new()),
                        None => return,
                    },
                    reply = incoming.message() => {
                        let Ok(Some(reply)) = reply else {
                            return; // the proxy hung up
                        };
                        if !reply.lookups.is_empty() || !reply.releases.is_empty() {
                            let model = model_rx.borrow().clone();
                            let answers = scope.resolve(&model, &reply.lookups, &reply.releases, &this.metrics);
                            (model, false, answers)
                        } else if reply.error.is_empty() {
                            this.metrics.acks.get_or_create(&ResultLabel { result: "ack" }).inc();
                            continue;
                        } else if !reply.resync {
                            this.metrics.acks.get_or_create(&ResultLabel { result: "nack" }).inc();
                            tracing::warn!(%workload, version = reply.version, error = %shown(&reply.error), "proxy refused its config; it keeps its last good one");
                            continue;
                        } else {
                            this.metrics.acks.get_or_create(&ResultLabel { result: "nack" }).inc();
                            tracing::info!(%workload, version = reply.version, error = %shown(&reply.error), "proxy asks for a resync; sending a full snapshot");
                            (model_rx.borrow().clone(), true, Vec::new())
                        }
                    }
                    _ = out.closed() => return,
                };
                let parts = match Self::parts_for(&model, &workload, &id, &scope) {
                    Ok(parts) => parts,
                    Err(status) => {
                        tracing::warn!(%workload, peer = %id, reason = status.message(), "ending Deltas");
                        out.end(status).await;
                        return;
                    }
                };
                let mut msg = if resync {
                    let mut s = parts.snapshot(bundle());
                    s.on_demand = matches!(scope, Scope::OnDemand(_));
                    s
                } else if let Some(delta) = parts.delta_from(&last) {
                    tracing::debug!(%workload, version = parts.version, base = last.version, "pushing a delta");
                    delta
                } else if !answers.is_empty() {
                    // Nothing changed (the services were held already, or none was found):
                    // the answers alone, on the version held.
                    parts.unchanged_from(&last)
                } else {
                    tracing::trace!(%workload, generation = model.generation, "change does not concern this proxy");
                    continue;
                };
                msg.lookups = answers;
                if !out.push(msg).await {
                    return;
                }
                last = parts;
            }
        })))
    }
}
