//! The Kubernetes config source: the same [`Model`] the local mesh file feeds, built from the
//! API server and published on the same `watch` channel ([`ConfigSource`]).
//!
//! kube-rs reflectors (list, then watch from the list's resourceVersion, with bookmarks;
//! a `410 Gone` or any broken watch relists) keep in-memory stores of:
//!
//! - **Pods** → workloads. A pod is a mesh workload when one of its containers (a native
//!   sidecar is an init container) runs the proxy, recognised by the `PALISADE_WORKLOAD`
//!   variable the injector sets; hostNetwork pods and finished pods (Succeeded, Failed) never
//!   are. Workload name = pod name (the proxy's `PALISADE_WORKLOAD`), identity = the pod's
//!   namespace and service account, labels = the pod's, address = its pod IP, proxy ports =
//!   4143 inbound and 4191 admin unless the proxy container's `PALISADE_INBOUND_ADDR` /
//!   `PALISADE_ADMIN_ADDR` say otherwise.
//! - **Services** and **EndpointSlices** → services, one per TCP Service port: endpoints are
//!   the slices' ready addresses whose `targetRef` is a mesh pod, dialled on that pod's
//!   inbound port (`<podIP>:4143`), with the slice's port (the resolved targetPort) as
//!   `target_port`; the ClusterIPs are the service's virtual IPs; the protocol comes from
//!   `appProtocol` or the port name's prefix (Istio's convention).
//! - **AuthorizationPolicy**, **PeerAuthentication**, **HTTPFault**, **RateLimitPolicy** and
//!   **EgressPolicy**, `palisade.dev/v1alpha1` (Palisade's own CRDs, always installed with it),
//!   and the `security.istio.io/v1` AuthorizationPolicy and PeerAuthentication when their CRDs
//!   exist (asked of the API's discovery at start and every minute until found; absent, they
//!   are skipped quietly).
//! - **HTTPRoute** and **GRPCRoute**, `gateway.networking.k8s.io/v1`, when their CRDs exist
//!   (found like Istio's). Only mesh routes, those with a Service parent
//!   ([`super::routes::is_mesh_route`]), are ours, and only for their Service parents; routes
//!   of gateway controllers are left alone.
//!
//! Every object of those kinds is watched as a `DynamicObject` and parsed alone with the
//! policy files' parser ([`policy::parse_object`]), so it means on a cluster what it means in
//! a policies directory. The accepted ones are the resources the model is built from
//! ([`Model::from_parts`]): policies select workloads, routes attach to their parent Service's
//! config (with the `HTTPFault` an `ExtensionRef` filter names resolved; a missing one makes
//! its rule answer 500, as Gateway API says of a filter that cannot be applied), rate limits
//! and egress policies go to the inbound config of the workloads they select (`rate_limit`,
//! `egress`). A refused object is rejected alone: logged once per version, counted
//! (`palisade_kubernetes_object_rejections_total{kind}`, and
//! `palisade_kubernetes_rejected_objects{kind}` while it stays refused), reported as a
//! Kubernetes `Warning` Event on the object (and the `Accepted` condition on `palisade.dev`
//! kinds, [`super::status`]), and its last accepted version (if this control plane saw one)
//! keeps serving, so a broken edit of a DENY policy never becomes an allow. Everything else
//! keeps serving.
//!
//! Any change wakes one rebuild [`DEBOUNCE`] later (a burst of events makes one model); a
//! model with the same content as the one served is not published, so proxies only hear of
//! real changes, well within a second.
//!
//! Nothing is served before every store has listed once: a model built from half a cluster
//! would withdraw endpoints and policies. [`KubernetesSource::start`] fails after
//! `sync_timeout` instead, naming what could not be listed and why (RBAC, a missing CRD).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Debug;
use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::{FutureExt, Stream, StreamExt};
use k8s_openapi::api::core::v1::{ObjectReference, Pod, Service as KubeService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::WatchStreamExt;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use palisade_api::PathNormalization;
use palisade_api::policy::{self, DefaultPolicy, Resource as Policy, RouteKind};
use palisade_certs::{SpiffeId, TrustDomain};
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;

use super::routes::{
    GATEWAY_GROUP, GATEWAY_VERSION, is_mesh_route, keep_service_parents, original_field,
};
use super::status::{self, StatusUpdate, Verdict};
use crate::mesh::{ControlPlaneSection, Mesh, Protocol, Service, ServiceEndpoint, Workload};
use crate::metrics::{KindLabel, Metrics, ResourceLabel};
use crate::model::Model;
use crate::source::ConfigSource;

/// Changes are collected this long before the model is rebuilt.
pub const DEBOUNCE: Duration = Duration::from_millis(100);
/// How long [`KubernetesSource::start`] waits for every store's first list by default.
pub const DEFAULT_SYNC_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the API's discovery is asked again for the Istio CRDs while they are absent.
pub const ISTIO_RECHECK: Duration = Duration::from_secs(60);
/// The proxy's ports in a pod (the spec's defaults).
pub const INBOUND_PORT: u16 = 4143;
pub const ADMIN_PORT: u16 = 4191;
/// The variable that marks the proxy container of a pod (its value is the pod name).
pub const PROXY_MARKER_ENV: &str = "PALISADE_WORKLOAD";
/// What `Mesh::path` says for a Kubernetes model.
pub const MESH_PATH: &str = "kubernetes";
/// The Events' reporting controller.
pub const EVENT_CONTROLLER: &str = "palisade-control-plane";

pub const PALISADE_GROUP: &str = "palisade.dev";
pub const PALISADE_VERSION: &str = "v1alpha1";
pub const ISTIO_GROUP: &str = "security.istio.io";
pub const ISTIO_VERSION: &str = "v1";

/// The mesh-wide settings a Kubernetes model carries (the local source reads them from the
/// mesh file).
#[derive(Clone, Debug)]
pub struct SourceConfig {
    pub trust_domain: TrustDomain,
    pub certificate_lifetime: Duration,
    pub default_policy: DefaultPolicy,
    pub path_normalization: PathNormalization,
    /// The control plane's gRPC port (`Mesh::control_plane`).
    pub control_plane_port: u16,
    pub debounce: Duration,
    pub sync_timeout: Duration,
    /// Read `security.istio.io` policies when their CRDs exist.
    pub istio: bool,
    /// Read Gateway API `HTTPRoute`s and `GRPCRoute`s when their CRDs exist.
    pub gateway_api: bool,
    /// How often to ask again for the Istio (and Gateway API) CRDs while they are absent.
    pub istio_recheck: Duration,
    /// `reportingInstance` of the Events (the pod name), or the controller name.
    pub event_instance: Option<String>,
}

impl SourceConfig {
    pub fn new(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            certificate_lifetime: Duration::from_secs(24 * 3600),
            default_policy: DefaultPolicy::default(),
            path_normalization: PathNormalization::default(),
            control_plane_port: crate::mesh::DEFAULT_CONTROL_PLANE_PORT,
            debounce: DEBOUNCE,
            sync_timeout: DEFAULT_SYNC_TIMEOUT,
            istio: true,
            gateway_api: true,
            istio_recheck: ISTIO_RECHECK,
            event_instance: None,
        }
    }
}

/// Why the source cannot start.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(
        "the Kubernetes API did not list {} within {timeout:?}{}",
        resources.join(", "),
        last_errors_text(last_errors)
    )]
    Sync {
        resources: Vec<String>,
        timeout: Duration,
        /// The last error of each resource that had one.
        last_errors: Vec<(String, String)>,
    },
}

fn last_errors_text(errors: &[(String, String)]) -> String {
    if errors.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = errors.iter().map(|(r, e)| format!("{r}: {e}")).collect();
    format!(" ({})", parts.join("; "))
}

/// A resource type the source reads (policies, routes, faults, rate limits, egress policies),
/// as a dynamic API resource.
#[derive(Clone, Debug)]
pub struct PolicyKind {
    pub api: ApiResource,
    /// Set for Gateway API routes: only the mesh's (a Service parent) are parsed, the rest
    /// belong to gateway controllers.
    pub route: Option<RouteKind>,
}

impl PolicyKind {
    pub fn new(group: &str, version: &str, kind: &str, plural: &str) -> Self {
        Self {
            api: ApiResource {
                group: group.into(),
                version: version.into(),
                api_version: format!("{group}/{version}"),
                kind: kind.into(),
                plural: plural.into(),
            },
            route: RouteKind::from_kind(kind).filter(|_| group == GATEWAY_GROUP),
        }
    }

    /// `AuthorizationPolicy.palisade.dev`: the `kind` label and how logs name the type.
    pub fn label(&self) -> String {
        format!("{}.{}", self.api.kind, self.api.group)
    }

    /// `authorizationpolicies.palisade.dev`: the `resource` label of watch errors.
    fn resource(&self) -> String {
        format!("{}.{}", self.api.plural, self.api.group)
    }

    /// `HTTPRoute` and `GRPCRoute` of the Gateway API.
    pub fn routes() -> [PolicyKind; 2] {
        [
            PolicyKind::new(GATEWAY_GROUP, GATEWAY_VERSION, "HTTPRoute", "httproutes"),
            PolicyKind::new(GATEWAY_GROUP, GATEWAY_VERSION, "GRPCRoute", "grpcroutes"),
        ]
    }

    /// Palisade's own kinds (`palisade.dev/v1alpha1`), whose CRDs `palisade install` prints:
    /// the source does not start without them.
    pub fn palisade() -> [PolicyKind; 5] {
        let [authz, peer] = Self::pair(PALISADE_GROUP, PALISADE_VERSION);
        [
            authz,
            peer,
            PolicyKind::new(PALISADE_GROUP, PALISADE_VERSION, "HTTPFault", "httpfaults"),
            PolicyKind::new(
                PALISADE_GROUP,
                PALISADE_VERSION,
                "RateLimitPolicy",
                "ratelimitpolicies",
            ),
            PolicyKind::new(
                PALISADE_GROUP,
                PALISADE_VERSION,
                "EgressPolicy",
                "egresspolicies",
            ),
        ]
    }

    /// The AuthorizationPolicy and PeerAuthentication kinds of `group`/`version`.
    pub fn pair(group: &str, version: &str) -> [PolicyKind; 2] {
        [
            PolicyKind::new(
                group,
                version,
                "AuthorizationPolicy",
                "authorizationpolicies",
            ),
            PolicyKind::new(group, version, "PeerAuthentication", "peerauthentications"),
        ]
    }
}

/// What the watch tasks share with the builder.
#[derive(Debug)]
struct Shared {
    changed: Notify,
    metrics: Arc<Metrics>,
    /// The last error of each resource's watch, until it lists or watches again.
    errors: Mutex<BTreeMap<String, String>>,
}

impl Shared {
    fn errors(&self) -> MutexGuard<'_, BTreeMap<String, String>> {
        // Each update is one insert or remove: a poisoned map is still consistent.
        self.errors.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Retries a failed list or watch after 100 ms, doubling up to 30 s (with ±20% jitter), and
/// starts over once it works again: a `410 Gone` relists at once, a missing CRD or RBAC rule
/// is not hammered.
struct WatchBackoff {
    next: Duration,
}

impl WatchBackoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(30);

    fn new() -> Self {
        Self { next: Self::FIRST }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let d = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        Some(d.mul_f64(0.8 + rand::random::<f64>() * 0.4))
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// Runs one reflector until dropped: applies its events to `writer`'s store and wakes the
/// builder on every change (a relist wakes it once, when the new list is complete).
async fn reflect<K>(
    api: Api<K>,
    writer: reflector::store::Writer<K>,
    resource: String,
    shared: Arc<Shared>,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Send + Sync,
{
    let stream = watcher::watcher(api, watcher::Config::default())
        .modify(|o: &mut K| o.managed_fields_mut().clear())
        .backoff(WatchBackoff::new())
        .reflect(writer);
    drive(stream, resource, shared).await;
}

/// A store of a dynamic (CRD) type and its writer.
fn dynamic_store(
    api: &ApiResource,
) -> (
    Store<DynamicObject>,
    reflector::store::Writer<DynamicObject>,
) {
    let writer = reflector::store::Writer::new(api.clone());
    (writer.as_reader(), writer)
}

async fn drive<K>(
    stream: impl Stream<Item = watcher::Result<watcher::Event<K>>>,
    resource: String,
    shared: Arc<Shared>,
) {
    let mut stream = std::pin::pin!(stream);
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(ev) => {
                if shared.errors().remove(&resource).is_some() {
                    tracing::info!(%resource, "watching again");
                }
                match ev {
                    watcher::Event::Apply(_)
                    | watcher::Event::Delete(_)
                    | watcher::Event::InitDone => shared.changed.notify_one(),
                    watcher::Event::Init | watcher::Event::InitApply(_) => {}
                }
            }
            Err(e) => {
                shared
                    .metrics
                    .kubernetes_watch_errors
                    .get_or_create(&ResourceLabel {
                        resource: resource.clone(),
                    })
                    .inc();
                let text = e.to_string();
                let mut errors = shared.errors();
                // Logged when it starts or changes, not on every retry of a lasting failure.
                if errors.get(&resource) != Some(&text) {
                    let gone = matches!(&e, watcher::Error::WatchError(s) if s.code == 410);
                    if gone {
                        tracing::info!(%resource, error = %text, "watch expired; relisting");
                    } else {
                        tracing::warn!(%resource, error = %text, "list/watch failed; retrying with backoff");
                    }
                    errors.insert(resource.clone(), text);
                }
            }
        }
    }
}

/// One policy type's store.
#[derive(Clone)]
struct PolicyStore {
    kind: PolicyKind,
    store: Store<DynamicObject>,
}

/// `(kind label, namespace, name)` of a policy object.
type ObjKey = (String, String, String);

/// A refused object, for the Event task.
struct Rejection {
    reference: ObjectReference,
    note: String,
}

/// Builds models from the stores, remembering per policy object its last accepted version
/// and the version it refused (so each refusal is reported once).
struct Builder {
    cfg: SourceConfig,
    pods: Store<Pod>,
    services: Store<KubeService>,
    slices: Store<EndpointSlice>,
    policies: Arc<Mutex<Vec<PolicyStore>>>,
    metrics: Arc<Metrics>,
    accepted: HashMap<ObjKey, (String, Policy)>,
    rejected: HashMap<ObjKey, String>,
    events: mpsc::UnboundedSender<Rejection>,
    /// `Accepted` conditions to write ([`status`]).
    status: mpsc::UnboundedSender<StatusUpdate>,
    /// Pods already warned about (skipped for a reason worth a warning), by reason.
    warned: HashSet<(String, String)>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Builder {
    fn build(&mut self, generation: u64) -> Model {
        let workloads = self.workloads();
        let services = self.services(&workloads);
        let resources = self.resources();
        let mesh = Mesh {
            path: PathBuf::from(MESH_PATH),
            trust_domain: self.cfg.trust_domain.clone(),
            certificate_lifetime: self.cfg.certificate_lifetime,
            control_plane: ControlPlaneSection {
                port: self.cfg.control_plane_port,
            },
            default_policy: self.cfg.default_policy,
            path_normalization: self.cfg.path_normalization,
            policies_dir: None,
            workloads,
            services,
        };
        Model::from_parts(mesh, resources, generation)
    }

    fn workloads(&mut self) -> Vec<Workload> {
        let cp = crate::control_plane_id(&self.cfg.trust_domain).ok();
        let mut out = Vec::new();
        for pod in self.pods.state() {
            match workload_of(&pod, &self.cfg.trust_domain) {
                Ok(Some((w, id))) => {
                    if cp.as_ref() == Some(&id) {
                        self.warn_once(
                            &w.namespace,
                            &w.name,
                            "reserved",
                            &format!(
                                "{id} is reserved for the control plane: the pod is not a mesh workload"
                            ),
                        );
                        continue;
                    }
                    out.push(w);
                }
                Ok(None) => {}
                Err(reason) => {
                    let ns = pod.namespace().unwrap_or_default();
                    self.warn_once(&ns, &pod.name_any(), "invalid", &reason);
                }
            }
        }
        out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        out
    }

    fn warn_once(&mut self, ns: &str, name: &str, why: &str, message: &str) {
        if self
            .warned
            .insert((format!("{ns}/{name}"), why.to_string()))
        {
            tracing::warn!(pod = %format!("{ns}/{name}"), "{message}");
        }
    }

    fn services(&self, workloads: &[Workload]) -> Vec<Service> {
        let meshed: HashSet<(&str, &str)> = workloads
            .iter()
            .map(|w| (w.namespace.as_str(), w.name.as_str()))
            .collect();
        let mut slices: HashMap<(String, String), Vec<Arc<EndpointSlice>>> = HashMap::new();
        for slice in self.slices.state() {
            let Some(ns) = slice.metadata.namespace.clone() else {
                continue;
            };
            let Some(svc) = slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("kubernetes.io/service-name"))
                .cloned()
            else {
                continue;
            };
            slices.entry((ns, svc)).or_default().push(slice);
        }
        let mut out = Vec::new();
        for svc in self.services.state() {
            let (Some(ns), Some(name)) =
                (svc.metadata.namespace.clone(), svc.metadata.name.clone())
            else {
                continue;
            };
            let Some(spec) = &svc.spec else { continue };
            if spec.type_.as_deref() == Some("ExternalName") {
                continue;
            }
            let mut vips: Vec<IpAddr> = spec
                .cluster_ips
                .iter()
                .flatten()
                .chain(spec.cluster_ip.iter())
                .filter_map(|ip| ip.parse().ok())
                .collect();
            vips.sort();
            vips.dedup();
            let selector = spec.selector.clone().unwrap_or_default();
            let (timeout, retry) = call_annotations(&svc.metadata, &ns, &name);
            let idle_timeout =
                duration_annotation(&svc.metadata, "timeout.palisade.dev/idle", &ns, &name);
            let trace = trace_annotations(&svc.metadata, &ns, &name);
            let no_slices = Vec::new();
            let own_slices = slices
                .get(&(ns.clone(), name.clone()))
                .unwrap_or(&no_slices);
            for port in spec.ports.iter().flatten() {
                if port.protocol.as_deref().unwrap_or("TCP") != "TCP" {
                    continue;
                }
                let Ok(number) = u16::try_from(port.port) else {
                    continue;
                };
                if number == 0 {
                    continue;
                }
                let port_name = port.name.as_deref().unwrap_or("");
                let fallback_target = match &port.target_port {
                    Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(p)) => {
                        u16::try_from(*p).ok()
                    }
                    _ => None,
                }
                .unwrap_or(number);
                let mut endpoints = Vec::new();
                for slice in own_slices {
                    endpoints_of(
                        slice,
                        &ns,
                        port_name,
                        fallback_target,
                        &meshed,
                        &mut endpoints,
                    );
                }
                endpoints.sort_by(|a, b| {
                    (&a.workload, a.address, a.target_port).cmp(&(
                        &b.workload,
                        b.address,
                        b.target_port,
                    ))
                });
                endpoints.dedup();
                out.push(Service {
                    name: name.clone(),
                    namespace: ns.clone(),
                    port: number,
                    selector: selector.clone(),
                    protocol: port_protocol(port.app_protocol.as_deref(), port.name.as_deref()),
                    endpoints: Some(endpoints),
                    virtual_ips: vips.clone(),
                    timeout: timeout.clone(),
                    idle_timeout: idle_timeout.clone(),
                    retry: retry.clone(),
                    tracing: trace.clone(),
                });
            }
        }
        out.sort_by(|a, b| (&a.namespace, &a.name, a.port).cmp(&(&b.namespace, &b.name, b.port)));
        out
    }

    /// The accepted objects of every kind the source reads (policies, mesh routes, faults,
    /// rate limits, egress policies), each parsed alone: a bad one is refused alone and its
    /// last accepted version, if any, stands in for it.
    fn resources(&mut self) -> Vec<Policy> {
        let stores: Vec<PolicyStore> = lock(&self.policies).clone();
        let mut seen: HashSet<ObjKey> = HashSet::new();
        let mut out: Vec<(ObjKey, Policy)> = Vec::new();
        for ps in &stores {
            let label = ps.kind.label();
            for obj in ps.store.state() {
                let (Some(ns), Some(name)) =
                    (obj.metadata.namespace.clone(), obj.metadata.name.clone())
                else {
                    continue;
                };
                // Routes of a gateway controller are not ours to judge (`data` holds the
                // object's fields but metadata: its `spec` is there).
                if ps.kind.route.is_some() && !is_mesh_route(&obj.data) {
                    continue;
                }
                let key = (label.clone(), ns, name);
                seen.insert(key.clone());
                let td = &self.cfg.trust_domain;
                let verdict = judge(
                    &mut self.accepted,
                    &mut self.rejected,
                    &key,
                    &obj,
                    || parse_resource(td, &ps.kind, &obj, &key),
                    |errors, keeps| {
                        reject(
                            &self.metrics,
                            &self.events,
                            &self.status,
                            &ps.kind,
                            &obj,
                            &key,
                            errors,
                            keeps,
                        )
                    },
                    || {
                        if let Some(u) = status::update_for(&ps.kind.api, &obj, Verdict::Accepted) {
                            let _ = self.status.send(u);
                        }
                    },
                );
                if let Some(p) = verdict {
                    out.push((key, p));
                }
            }
        }
        self.accepted.retain(|k, _| seen.contains(k));
        self.forget_rejected(&stores, &seen);
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out.into_iter().map(|(_, p)| p).collect()
    }

    /// Drops the refusals of objects of `stores`' kinds that are gone, and updates the
    /// gauge of those kinds.
    fn forget_rejected(&mut self, stores: &[PolicyStore], seen: &HashSet<ObjKey>) {
        let labels: HashSet<String> = stores.iter().map(|ps| ps.kind.label()).collect();
        self.rejected
            .retain(|k, _| !labels.contains(&k.0) || seen.contains(k));
        for label in labels {
            let n = self.rejected.keys().filter(|k| k.0 == label).count();
            self.metrics
                .kubernetes_rejected_objects
                .get_or_create(&KindLabel { kind: label })
                .set(n as i64);
        }
    }
}

/// The verdict on one object: its parsed form if this version is valid, else its last
/// accepted version (if any). Each refused version is reported once (`on_reject`), however
/// often the model is rebuilt.
fn judge<T: Clone>(
    accepted: &mut HashMap<ObjKey, (String, T)>,
    rejected: &mut HashMap<ObjKey, String>,
    key: &ObjKey,
    obj: &DynamicObject,
    parse: impl FnOnce() -> Result<T, Vec<(String, String)>>,
    on_reject: impl FnOnce(&[(String, String)], bool),
    on_accept: impl FnOnce(),
) -> Option<T> {
    let rv = spec_version(obj);
    let last_good = accepted.get(key).cloned();
    if let Some((good_rv, p)) = &last_good
        && *good_rv == rv
    {
        return Some(p.clone());
    }
    if rejected.get(key) == Some(&rv) {
        return last_good.map(|(_, p)| p);
    }
    match parse() {
        Ok(p) => {
            if rejected.remove(key).is_some() {
                tracing::info!(kind = %key.0, object = %format!("{}/{}", key.1, key.2), resource_version = %rv, "object accepted (its previous version was refused)");
            }
            accepted.insert(key.clone(), (rv, p.clone()));
            on_accept();
            Some(p)
        }
        Err(errors) => {
            on_reject(&errors, last_good.is_some());
            rejected.insert(key.clone(), rv);
            last_good.map(|(_, p)| p)
        }
    }
}

/// What identifies the version of an object's spec: its `metadata.generation`, which a status
/// write (ours: the `Accepted` condition) leaves alone, else its resourceVersion.
fn spec_version(obj: &DynamicObject) -> String {
    match obj.metadata.generation {
        Some(g) => format!("generation {g}"),
        None => obj.metadata.resource_version.clone().unwrap_or_default(),
    }
}

/// Parses one object (a policy, a mesh route, a fault, a rate limit, an egress policy) with
/// the policy files' parser: the same checks and the same errors, naming the field.
fn parse_resource(
    td: &TrustDomain,
    kind: &PolicyKind,
    obj: &DynamicObject,
    key: &ObjKey,
) -> Result<Policy, Vec<(String, String)>> {
    let mut value =
        serde_json::to_value(obj).map_err(|e| vec![("(object)".to_string(), e.to_string())])?;
    if let Some(map) = value.as_object_mut() {
        // List items may come without their type; the watch says what they are.
        map.entry("apiVersion")
            .or_insert_with(|| kind.api.api_version.clone().into());
        map.entry("kind")
            .or_insert_with(|| kind.api.kind.clone().into());
    }
    // A route's Gateway parents are their controller's: the mesh parses it for its Services.
    let kept = kind
        .route
        .is_some()
        .then(|| keep_service_parents(&mut value));
    let origin = format!("{} {}/{}", key.0, key.1, key.2);
    let p = policy::parse_object(&origin, &value).map_err(|errors| {
        errors
            .into_iter()
            .map(|e| match &kept {
                Some(kept) => (original_field(&e.field, kept), e.message),
                None => (e.field, e.message),
            })
            .collect::<Vec<_>>()
    })?;
    if let Policy::AuthorizationPolicy(ap) = &p {
        let td = td.as_str();
        for (field, principal) in ap.foreign_principals(td) {
            tracing::warn!(
                policy = %origin,
                field = %field,
                principal,
                trust_domain = td,
                "principal is not in the mesh's trust domain: it matches no workload of this mesh, only callers from that other trust domain"
            );
        }
    }
    Ok(p)
}

/// Reports a refused object version: one error line, the metric, a Warning Event, and the
/// `Accepted: False` condition on our own kinds.
#[allow(clippy::too_many_arguments)]
fn reject(
    metrics: &Metrics,
    events: &mpsc::UnboundedSender<Rejection>,
    status: &mpsc::UnboundedSender<StatusUpdate>,
    kind: &PolicyKind,
    obj: &DynamicObject,
    key: &ObjKey,
    errors: &[(String, String)],
    keeps_last_good: bool,
) {
    let rv = obj.metadata.resource_version.clone().unwrap_or_default();
    let problems: Vec<String> = errors.iter().map(|(f, m)| format!("{f}: {m}")).collect();
    let problems = problems.join("; ");
    let outcome = if keeps_last_good {
        "its last accepted version keeps serving"
    } else {
        "it is not served"
    };
    tracing::error!(
        kind = %key.0,
        object = %format!("{}/{}", key.1, key.2),
        resource_version = %rv,
        errors = %problems,
        "object refused ({outcome}); everything else keeps serving"
    );
    metrics
        .kubernetes_object_rejections
        .get_or_create(&KindLabel {
            kind: key.0.clone(),
        })
        .inc();
    let verdict = Verdict::Refused {
        problems: &problems,
        keeps_last_good,
    };
    if let Some(u) = status::update_for(&kind.api, obj, verdict) {
        let _ = status.send(u);
    }
    let note: String = format!("refused by the Palisade control plane ({outcome}): {problems}")
        .chars()
        .take(1000)
        .collect();
    let _ = events.send(Rejection {
        reference: ObjectReference {
            api_version: Some(kind.api.api_version.clone()),
            kind: Some(kind.api.kind.clone()),
            name: Some(key.2.clone()),
            namespace: Some(key.1.clone()),
            uid: obj.metadata.uid.clone(),
            resource_version: Some(rv),
            field_path: None,
        },
        note,
    });
}

/// The workload of a pod and its identity; None if the pod is not (or no longer) a mesh
/// workload; an error naming why a would-be workload cannot be one.
fn workload_of(pod: &Pod, td: &TrustDomain) -> Result<Option<(Workload, SpiffeId)>, String> {
    let (Some(name), Some(ns)) = (&pod.metadata.name, &pod.metadata.namespace) else {
        return Ok(None);
    };
    let Some(spec) = &pod.spec else {
        return Ok(None);
    };
    if spec.host_network == Some(true) {
        return Ok(None);
    }
    if matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    ) {
        return Ok(None);
    }
    let Some(proxy) = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| c.env.iter().flatten().any(|e| e.name == PROXY_MARKER_ENV))
    else {
        return Ok(None);
    };
    let env_port = |var: &str| {
        proxy
            .env
            .iter()
            .flatten()
            .find(|e| e.name == var)
            .and_then(|e| e.value.as_deref())
            .and_then(|v| v.parse::<SocketAddr>().ok())
            .map(|a| a.port())
    };
    let sa = spec
        .service_account_name
        .as_deref()
        .filter(|s| !s.is_empty())
        .unwrap_or("default");
    let id = SpiffeId::for_workload(td, ns, sa)
        .map_err(|e| format!("service account {sa:?} does not make a SPIFFE ID: {e}"))?;
    let pod_ip = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .and_then(|ip| ip.parse().ok());
    let w = Workload {
        name: name.clone(),
        namespace: ns.clone(),
        service_account: Some(sa.to_string()),
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        command: None,
        env: BTreeMap::new(),
        app_port: None,
        inbound_port: env_port("PALISADE_INBOUND_ADDR").unwrap_or(INBOUND_PORT),
        admin_port: env_port("PALISADE_ADMIN_ADDR").unwrap_or(ADMIN_PORT),
        upstreams: Vec::new(),
        pod_ip,
    };
    Ok(Some((w, id)))
}

/// Appends the ready endpoints of `slice` for the Service port named `port_name` that are
/// mesh pods.
fn endpoints_of(
    slice: &EndpointSlice,
    ns: &str,
    port_name: &str,
    fallback_target: u16,
    meshed: &HashSet<(&str, &str)>,
    out: &mut Vec<ServiceEndpoint>,
) {
    if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
        return;
    }
    let Some(sp) = slice.ports.iter().flatten().find(|p| {
        p.name.as_deref().unwrap_or("") == port_name
            && p.protocol.as_deref().unwrap_or("TCP") == "TCP"
    }) else {
        return;
    };
    let target = sp
        .port
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)
        .unwrap_or(fallback_target);
    for ep in slice.endpoints.iter().flatten() {
        // An unset `ready` means ready (the API's own convention).
        if ep.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
            continue;
        }
        let Some(pod) = ep
            .target_ref
            .as_ref()
            .filter(|r| r.kind.as_deref() == Some("Pod"))
            .filter(|r| r.namespace.as_deref().is_none_or(|n| n == ns))
            .and_then(|r| r.name.as_deref())
        else {
            continue;
        };
        if !meshed.contains(&(ns, pod)) {
            // Not a mesh pod: a proxy could not verify it. Traffic goes to the mesh pods.
            continue;
        }
        for addr in &ep.addresses {
            if let Ok(address) = addr.parse() {
                out.push(ServiceEndpoint {
                    workload: pod.to_string(),
                    address,
                    target_port: target,
                });
            }
        }
    }
}

/// What a Service port speaks: its `appProtocol`, else the prefix of its name (Istio's
/// `http-web`, `grpc`, `tcp-db` convention), else detected per connection.
pub fn port_protocol(app_protocol: Option<&str>, name: Option<&str>) -> Protocol {
    let by_word = |w: &str| match w.to_ascii_lowercase().as_str() {
        "http" | "http1" | "http/1.1" => Some(Protocol::Http),
        "http2" | "h2c" | "kubernetes.io/h2c" => Some(Protocol::Http2),
        "grpc" | "grpc-web" => Some(Protocol::Grpc),
        "tcp" | "opaque" | "tls" | "mongo" | "mysql" | "redis" => Some(Protocol::Opaque),
        _ => None,
    };
    if let Some(p) = app_protocol.and_then(by_word) {
        return p;
    }
    name.and_then(|n| by_word(n.split('-').next().unwrap_or(n)))
        .unwrap_or(Protocol::Detect)
}

/// Asks the API's discovery which of `candidates` (one group version) the API server serves.
/// A missing group is an empty list, not an error.
async fn served_kinds(
    client: &Client,
    candidates: &[PolicyKind],
) -> Result<Vec<PolicyKind>, kube::Error> {
    let Some(api_version) = candidates.first().map(|k| k.api.api_version.clone()) else {
        return Ok(Vec::new());
    };
    match client.list_api_group_resources(&api_version).await {
        Ok(list) => Ok(candidates
            .iter()
            .filter(|k| list.resources.iter().any(|r| r.name == k.api.plural))
            .cloned()
            .collect()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// Kinds read only where their CRDs are installed: Istio's policies, the Gateway API's
/// routes. What a group is called in logs, and its kinds.
fn optional_groups(cfg: &SourceConfig) -> Vec<(&'static str, Vec<PolicyKind>)> {
    let mut out = Vec::new();
    if cfg.istio {
        out.push((
            "Istio policy",
            PolicyKind::pair(ISTIO_GROUP, ISTIO_VERSION).into(),
        ));
    }
    if cfg.gateway_api {
        out.push(("Gateway API route", PolicyKind::routes().into()));
    }
    out
}

/// The Kubernetes API, watched live.
#[derive(Debug)]
pub struct KubernetesSource {
    rx: watch::Receiver<Arc<Model>>,
    tasks: Vec<JoinHandle<()>>,
}

impl ConfigSource for KubernetesSource {
    fn subscribe(&self) -> watch::Receiver<Arc<Model>> {
        self.rx.clone()
    }
}

impl Drop for KubernetesSource {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A store and the name of what fills it, for the sync wait.
type Readiness = (String, futures_util::future::BoxFuture<'static, bool>);

fn ready<K>(resource: &str, store: &Store<K>) -> Readiness
where
    K: kube::runtime::reflector::Lookup + Clone + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Send + Sync,
{
    let store = store.clone();
    (
        resource.to_string(),
        async move { store.wait_until_ready().await.is_ok() }.boxed(),
    )
}

impl KubernetesSource {
    /// Starts the reflectors, waits until every store has listed once (at most
    /// `cfg.sync_timeout`), publishes the first model, and keeps it up to date.
    pub async fn start(
        client: Client,
        cfg: SourceConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self, SourceError> {
        let shared = Arc::new(Shared {
            changed: Notify::new(),
            metrics: metrics.clone(),
            errors: Mutex::new(BTreeMap::new()),
        });
        let mut tasks = Vec::new();
        let mut waits: Vec<Readiness> = Vec::new();

        let (pods, w) = reflector::store::<Pod>();
        waits.push(ready("pods", &pods));
        tasks.push(tokio::spawn(reflect(
            Api::<Pod>::all(client.clone()),
            w,
            "pods".into(),
            shared.clone(),
        )));
        let (services, w) = reflector::store::<KubeService>();
        waits.push(ready("services", &services));
        tasks.push(tokio::spawn(reflect(
            Api::<KubeService>::all(client.clone()),
            w,
            "services".into(),
            shared.clone(),
        )));
        let (slices, w) = reflector::store::<EndpointSlice>();
        waits.push(ready("endpointslices.discovery.k8s.io", &slices));
        tasks.push(tokio::spawn(reflect(
            Api::<EndpointSlice>::all(client.clone()),
            w,
            "endpointslices.discovery.k8s.io".into(),
            shared.clone(),
        )));

        let policies: Arc<Mutex<Vec<PolicyStore>>> = Arc::new(Mutex::new(Vec::new()));
        let mut kinds: Vec<PolicyKind> = PolicyKind::palisade().into();
        let mut later = Vec::new();
        for (what, candidates) in optional_groups(&cfg) {
            match served_kinds(&client, &candidates).await {
                Ok(found) if !found.is_empty() => {
                    tracing::info!(
                        kinds = ?found.iter().map(PolicyKind::label).collect::<Vec<_>>(),
                        "{what} CRDs found; reading them too"
                    );
                    kinds.extend(found);
                }
                Ok(_) => {
                    tracing::info!("no {what} CRDs; asking again every {:?}", cfg.istio_recheck);
                    later.push((what, candidates));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot ask the API for the {what} CRDs; asking again later");
                    later.push((what, candidates));
                }
            }
        }
        for kind in kinds {
            let (store, w) = dynamic_store(&kind.api);
            waits.push(ready(&kind.resource(), &store));
            tasks.push(tokio::spawn(reflect(
                Api::all_with(client.clone(), &kind.api),
                w,
                kind.resource(),
                shared.clone(),
            )));
            lock(&policies).push(PolicyStore { kind, store });
        }
        for (what, candidates) in later {
            tasks.push(tokio::spawn(optional_later(
                what,
                candidates,
                client.clone(),
                policies.clone(),
                shared.clone(),
                cfg.istio_recheck,
            )));
        }

        let names: Vec<String> = waits.iter().map(|(n, _)| n.clone()).collect();
        let all = futures_util::future::join_all(waits.into_iter().map(|(_, f)| f));
        let synced = tokio::time::timeout(cfg.sync_timeout, all).await;
        if synced.is_err() {
            // Which ones: ask each store again, without waiting.
            let stores: Vec<Readiness> = {
                let mut v = vec![
                    ready("pods", &pods),
                    ready("services", &services),
                    ready("endpointslices.discovery.k8s.io", &slices),
                ];
                for ps in lock(&policies).iter() {
                    v.push(ready(&ps.kind.resource(), &ps.store));
                }
                v
            };
            let mut missing = Vec::new();
            for (name, f) in stores {
                if f.now_or_never() != Some(true) {
                    missing.push(name);
                }
            }
            if missing.is_empty() {
                missing = names;
            }
            let errors = shared.errors();
            let last_errors = missing
                .iter()
                .filter_map(|r| errors.get(r).map(|e| (r.clone(), e.clone())))
                .collect();
            return Err(SourceError::Sync {
                resources: missing,
                timeout: cfg.sync_timeout,
                last_errors,
            });
        }

        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let reporter = Reporter {
            controller: EVENT_CONTROLLER.into(),
            instance: cfg.event_instance.clone(),
        };
        let (status_tx, status_rx) = mpsc::unbounded_channel();
        tasks.push(tokio::spawn(status::publish_status(
            client.clone(),
            status_rx,
        )));
        tasks.push(tokio::spawn(publish_events(
            Recorder::new(client, reporter),
            ev_rx,
        )));
        let debounce = cfg.debounce;
        let mut builder = Builder {
            cfg,
            pods,
            services,
            slices,
            policies,
            metrics: metrics.clone(),
            accepted: HashMap::new(),
            rejected: HashMap::new(),
            events: ev_tx,
            status: status_tx,
            warned: HashSet::new(),
        };
        let model = Arc::new(builder.build(1));
        metrics.config_generation.set(1);
        tracing::info!(
            workloads = model.mesh.workloads.len(),
            services = model.mesh.services.len(),
            authorization_policies = model.authorization_policies.len(),
            peer_authentications = model.peer_authentications.len(),
            routes = model.traffic.routes.len(),
            http_faults = model.traffic.faults.len(),
            rate_limit_policies = model.traffic.rate_limits.len(),
            egress_policies = model.traffic.egress.len(),
            "Kubernetes source synced"
        );
        let (tx, rx) = watch::channel(model);
        tasks.push(tokio::spawn(run(builder, shared, tx, debounce)));
        Ok(Self { rx, tasks })
    }
}

/// Rebuilds the model after every burst of changes and publishes it if it says something new.
async fn run(
    mut builder: Builder,
    shared: Arc<Shared>,
    tx: watch::Sender<Arc<Model>>,
    debounce: Duration,
) {
    let mut current = tx.borrow().clone();
    loop {
        shared.changed.notified().await;
        tokio::time::sleep(debounce).await;
        let model = builder.build(current.generation + 1);
        if model.same_content(&current) {
            continue;
        }
        tracing::info!(
            generation = model.generation,
            workloads = model.mesh.workloads.len(),
            services = model.mesh.services.len(),
            authorization_policies = model.authorization_policies.len(),
            peer_authentications = model.peer_authentications.len(),
            routes = model.traffic.routes.len(),
            http_faults = model.traffic.faults.len(),
            rate_limit_policies = model.traffic.rate_limits.len(),
            egress_policies = model.traffic.egress.len(),
            "config change applied"
        );
        shared
            .metrics
            .config_generation
            .set(model.generation as i64);
        current = Arc::new(model);
        tx.send_replace(current.clone());
    }
}

/// Asks for the CRDs of `candidates` every `every` ([`ISTIO_RECHECK`]) until they appear,
/// then watches them (the watches run inside this task, so they stop with the source).
async fn optional_later(
    what: &'static str,
    candidates: Vec<PolicyKind>,
    client: Client,
    policies: Arc<Mutex<Vec<PolicyStore>>>,
    shared: Arc<Shared>,
    every: Duration,
) {
    let found = loop {
        tokio::time::sleep(every).await;
        match served_kinds(&client, &candidates).await {
            Ok(found) if !found.is_empty() => break found,
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "cannot ask the API for the {what} CRDs"),
        }
    };
    tracing::info!(
        kinds = ?found.iter().map(PolicyKind::label).collect::<Vec<_>>(),
        "{what} CRDs appeared; reading them too"
    );
    let mut watches = Vec::new();
    for kind in found {
        let (store, w) = dynamic_store(&kind.api);
        watches.push(reflect(
            Api::all_with(client.clone(), &kind.api),
            w,
            kind.resource(),
            shared.clone(),
        ));
        lock(&policies).push(PolicyStore { kind, store });
    }
    futures_util::future::join_all(watches).await;
}

/// Reports refused objects as `Warning` Events on them (`kubectl describe` shows them).
async fn publish_events(recorder: Recorder, mut rx: mpsc::UnboundedReceiver<Rejection>) {
    while let Some(r) = rx.recv().await {
        let event = KubeEvent {
            type_: EventType::Warning,
            reason: "InvalidPolicy".into(),
            note: Some(r.note),
            action: "Validate".into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&event, &r.reference).await {
            tracing::warn!(
                object = ?r.reference.name,
                error = %e,
                "cannot record the refusal as a Kubernetes Event (the log and the metric have it)"
            );
        }
    }
}

/// A duration annotation (`timeout.palisade.dev/idle: 30s`); one that does not parse is left
/// out, and said so.
fn duration_annotation(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    key: &str,
    ns: &str,
    name: &str,
) -> Option<String> {
    let v = meta.annotations.as_ref()?.get(key)?;
    match palisade_api::call::parse_timeout(v) {
        Ok(_) => Some(v.clone()),
        Err(e) => {
            tracing::warn!(service = %format!("{ns}/{name}"), error = %e, "ignoring annotation {key}");
            None
        }
    }
}

/// The trace policy a Service's annotations set (`trace.palisade.dev/span-budget`,
/// `trace.palisade.dev/slow`). One that does not parse (or an unknown `trace.palisade.dev/`
/// key) is left out, and said so: the Service keeps the good one and keeps routing.
fn trace_annotations(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    ns: &str,
    name: &str,
) -> Option<palisade_api::trace::TraceSpec> {
    let (spec, errors) =
        palisade_api::trace::TraceSpec::from_annotations(meta.annotations.as_ref()?);
    for e in errors {
        tracing::warn!(service = %format!("{ns}/{name}"), error = %e.message, "ignoring annotation {}", e.field);
    }
    (!spec.is_empty()).then_some(spec)
}

/// The request timeout and retry policy a Service's annotations set
/// (`timeout.palisade.dev/request`, `retry.palisade.dev/{codes,attempts,backoff}`). One that
/// does not parse is left out, and said so: the Service keeps routing without it.
fn call_annotations(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    ns: &str,
    name: &str,
) -> (Option<String>, Option<palisade_api::call::RetrySpec>) {
    let Some(a) = meta.annotations.as_ref() else {
        return (None, None);
    };
    let timeout = a.get("timeout.palisade.dev/request").and_then(|t| {
        match palisade_api::call::parse_timeout(t) {
            Ok(_) => Some(t.clone()),
            Err(e) => {
                tracing::warn!(service = %format!("{ns}/{name}"), error = %e, "ignoring annotation timeout.palisade.dev/request");
                None
            }
        }
    });
    let (codes, attempts, backoff) = (
        a.get("retry.palisade.dev/codes"),
        a.get("retry.palisade.dev/attempts"),
        a.get("retry.palisade.dev/backoff"),
    );
    if codes.is_none() && attempts.is_none() && backoff.is_none() {
        return (timeout, None);
    }
    let parsed = (|| {
        let codes = codes
            .map(|c| {
                c.split(',')
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .map(|c| {
                        c.parse::<u16>()
                            .map_err(|_| format!("{c:?} is not an HTTP status"))
                    })
                    .collect::<Result<Vec<u16>, String>>()
            })
            .transpose()?
            .unwrap_or_default();
        let attempts = attempts
            .map(|n| {
                n.trim()
                    .parse::<u32>()
                    .map_err(|_| format!("attempts {n:?} is not a number"))
            })
            .transpose()?;
        let spec = palisade_api::call::RetrySpec {
            codes,
            attempts,
            backoff: backoff.cloned(),
        };
        spec.validate().map_err(|e| e.to_string())?;
        Ok::<_, String>(spec)
    })();
    match parsed {
        Ok(spec) => (timeout, Some(spec)),
        Err(e) => {
            tracing::warn!(service = %format!("{ns}/{name}"), error = %e, "ignoring the retry.palisade.dev annotations");
            (timeout, None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeout_and_retry_annotations_are_read_and_a_bad_one_is_left_out() {
        let meta =
            |pairs: &[(&str, &str)]| k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                annotations: Some(
                    pairs
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            };
        let (t, r) = call_annotations(
            &meta(&[
                ("timeout.palisade.dev/request", "2s"),
                ("retry.palisade.dev/codes", "502, 503"),
                ("retry.palisade.dev/attempts", "3"),
                ("retry.palisade.dev/backoff", "10ms"),
            ]),
            "demo",
            "api",
        );
        assert_eq!(t.as_deref(), Some("2s"));
        let p = r.expect("a retry policy").validate().expect("valid");
        assert_eq!((p.codes, p.attempts), (vec![502, 503], 3));
        let (t, r) = call_annotations(
            &meta(&[
                ("timeout.palisade.dev/request", "soon"),
                ("retry.palisade.dev/codes", "5xx"),
            ]),
            "demo",
            "api",
        );
        assert_eq!((t, r), (None, None));
        assert_eq!(call_annotations(&meta(&[]), "demo", "api"), (None, None));
        let idle = |v: &str| {
            duration_annotation(
                &meta(&[("timeout.palisade.dev/idle", v)]),
                "timeout.palisade.dev/idle",
                "demo",
                "api",
            )
        };
        assert_eq!(idle("30s").as_deref(), Some("30s"));
        assert_eq!(idle("forever"), None);
    }

    #[test]
    fn trace_annotations_are_read_and_a_bad_one_is_left_out() {
        let meta =
            |pairs: &[(&str, &str)]| k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                annotations: Some(
                    pairs
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            };
        let spec = trace_annotations(
            &meta(&[
                ("trace.palisade.dev/span-budget", "50"),
                ("trace.palisade.dev/slow", "500ms"),
                ("timeout.palisade.dev/request", "2s"),
            ]),
            "demo",
            "api",
        )
        .expect("a trace policy");
        assert_eq!(
            spec.validate().expect("valid"),
            palisade_api::trace::TracePolicy {
                span_budget: Some(50),
                slow: Some(Duration::from_millis(500)),
            }
        );
        // A bad value is left out; the good one stays.
        let spec = trace_annotations(
            &meta(&[
                ("trace.palisade.dev/span-budget", "0"),
                ("trace.palisade.dev/slow", "1s"),
            ]),
            "demo",
            "api",
        )
        .expect("the good one");
        assert_eq!(
            (spec.span_budget, spec.slow_request.as_deref()),
            (None, Some("1s"))
        );
        for bad in [
            ("trace.palisade.dev/span-budget", "lots"),
            ("trace.palisade.dev/span-budget", "1000001"),
            ("trace.palisade.dev/slow", "soon"),
            ("trace.palisade.dev/slow", "0s"),
            ("trace.palisade.dev/budget", "5"),
        ] {
            assert_eq!(
                trace_annotations(&meta(&[bad]), "demo", "api"),
                None,
                "{bad:?}"
            );
        }
        assert_eq!(trace_annotations(&meta(&[]), "demo", "api"), None);
        assert_eq!(
            trace_annotations(
                &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta::default(),
                "demo",
                "api"
            ),
            None
        );
    }

    #[test]
    fn protocols_follow_app_protocol_then_the_port_name() {
        assert_eq!(port_protocol(Some("http"), Some("grpc")), Protocol::Http);
        assert_eq!(
            port_protocol(Some("kubernetes.io/h2c"), None),
            Protocol::Http2
        );
        assert_eq!(port_protocol(None, Some("grpc-api")), Protocol::Grpc);
        assert_eq!(port_protocol(None, Some("tcp-db")), Protocol::Opaque);
        assert_eq!(port_protocol(None, Some("HTTP")), Protocol::Http);
        assert_eq!(port_protocol(None, Some("web")), Protocol::Detect);
        assert_eq!(port_protocol(Some("custom"), None), Protocol::Detect);
    }

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).expect("a pod")
    }

    #[test]
    fn only_pods_running_the_proxy_are_workloads() {
        let td = TrustDomain::new("cluster.local").unwrap();
        let meshed = serde_json::json!({
            "metadata": { "name": "web-1", "namespace": "demo", "labels": { "app": "web" } },
            "spec": {
                "serviceAccountName": "web",
                "containers": [ { "name": "app" } ],
                "initContainers": [ { "name": "palisade-proxy", "restartPolicy": "Always",
                    "env": [ { "name": "PALISADE_WORKLOAD", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } },
                             { "name": "PALISADE_INBOUND_ADDR", "value": "0.0.0.0:5143" } ] } ]
            },
            "status": { "podIP": "10.0.0.7", "phase": "Running" }
        });
        let (w, id) = workload_of(&pod(meshed.clone()), &td).unwrap().unwrap();
        assert_eq!(w.name, "web-1");
        assert_eq!(id.as_str(), "spiffe://cluster.local/ns/demo/sa/web");
        assert_eq!(w.inbound_port, 5143);
        assert_eq!(w.admin_port, ADMIN_PORT);
        assert_eq!(w.inbound_addr().to_string(), "10.0.0.7:5143");
        assert_eq!(w.labels.get("app").map(String::as_str), Some("web"));

        // No service account: `default`, as Kubernetes does.
        let mut default_sa = meshed.clone();
        default_sa["spec"]
            .as_object_mut()
            .unwrap()
            .remove("serviceAccountName");
        let (_, id) = workload_of(&pod(default_sa), &td).unwrap().unwrap();
        assert_eq!(id.as_str(), "spiffe://cluster.local/ns/demo/sa/default");

        let mut plain = meshed.clone();
        plain["spec"]["initContainers"] = serde_json::json!([]);
        assert!(workload_of(&pod(plain), &td).unwrap().is_none());
        let mut host = meshed.clone();
        host["spec"]["hostNetwork"] = serde_json::json!(true);
        assert!(workload_of(&pod(host), &td).unwrap().is_none());
        let mut done = meshed;
        done["status"]["phase"] = serde_json::json!("Succeeded");
        assert!(workload_of(&pod(done), &td).unwrap().is_none());
    }
}
