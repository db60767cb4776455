//! What every proxy's config is assembled from, computed once per model generation and shared.
//!
//! Before this, each Watch stream rebuilt the whole service list of the mesh for its own proxy
//! on every change, finding each endpoint's workload by a linear scan: the work of one change
//! grew with proxies × services × endpoints × workloads. Now a generation's services are built
//! once (on first use, by whichever stream gets there first), each with a digest, and a stream
//! only assembles its proxy's config from them and compares digests to see whether a change
//! concerns it.
//!
//! A proxy that declares upstreams (the local mesh file) gets only those services. One that
//! resolves on demand (a transparent proxy on `Deltas`) gets those and the services it looked
//! up by original destination ([`Pieces::lookup`]). One that declares none and does not resolve
//! on demand (a transparent proxy of an earlier release, on `Watch`) gets them all.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;

use palisade_api::v1;
use prost::Message;

use crate::mesh::{Mesh, Protocol, Workload};

/// One service in its wire form, and a digest of it.
#[derive(Debug)]
pub struct SharedService {
    pub msg: v1::Service,
    /// Of the encoded message: equal digests, same service (for the purpose of skipping a push).
    pub digest: u64,
}

/// The services a proxy resolved on demand, by key (name, namespace, port).
pub type Wanted = std::collections::BTreeSet<(String, String, u32)>;

/// The pieces of one generation.
#[derive(Debug, Default)]
pub struct Pieces {
    /// In key order ([`SharedService::key`]).
    pub services: Vec<Arc<SharedService>>,
    /// `(name, namespace, port)` → index in `services`.
    by_key: HashMap<(String, String, u32), usize>,
    /// Original destination → index in `services`: each virtual IP with the service's port,
    /// and each endpoint address (for an address several services share, the first in key
    /// order).
    by_addr: HashMap<SocketAddr, usize>,
    /// Workload name → indices in the mesh's workloads (names repeat across namespaces on
    /// Kubernetes).
    workloads_by_name: HashMap<String, Vec<usize>>,
    /// Per workload index: what its app speaks (the protocol of the first service selecting it).
    app_protocol: Vec<Protocol>,
    /// Per workload index: the services it backs (indices in `services`).
    backs: Vec<Vec<usize>>,
    /// Per service index: the services its routes send to or mirror to, which a proxy that
    /// gets the service gets too.
    backends: Vec<Vec<usize>>,
}

impl SharedService {
    /// What a proxy's services are ordered and told apart by.
    pub fn key(&self) -> (&str, &str, u32) {
        palisade_api::delta::sort_key(&self.msg)
    }
}

fn digest(msg: &v1::Service) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    msg.encode_to_vec().hash(&mut h);
    h.finish()
}

impl Pieces {
    /// The pieces of a mesh without routes.
    pub fn build(mesh: &Mesh) -> Self {
        Self::build_with(mesh, &crate::traffic::Traffic::default())
    }

    pub fn build_with(mesh: &Mesh, traffic: &crate::traffic::Traffic) -> Self {
        let mut workloads_by_name: HashMap<String, Vec<usize>> = HashMap::new();
        let mut by_ns_name: HashMap<(&str, &str), usize> = HashMap::new();
        // (namespace, label key, label value) → workloads carrying that label.
        let mut by_label: HashMap<(&str, &str, &str), Vec<usize>> = HashMap::new();
        let mut by_ns: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, w) in mesh.workloads.iter().enumerate() {
            workloads_by_name.entry(w.name.clone()).or_default().push(i);
            by_ns_name.insert((w.namespace.as_str(), w.name.as_str()), i);
            by_ns.entry(w.namespace.as_str()).or_default().push(i);
            for (k, v) in &w.labels {
                by_label
                    .entry((w.namespace.as_str(), k.as_str(), v.as_str()))
                    .or_default()
                    .push(i);
            }
        }
        let mut app_protocol: Vec<Option<Protocol>> = vec![None; mesh.workloads.len()];
        let ids: Vec<Option<String>> = mesh
            .workloads
            .iter()
            .map(|w| w.spiffe_id(mesh).ok().map(|id| id.as_str().to_string()))
            .collect();
        let mut services: Vec<Arc<SharedService>> = Vec::with_capacity(mesh.services.len());
        let mut backed: Vec<Vec<usize>> = Vec::with_capacity(mesh.services.len());
        let mut by_key = HashMap::with_capacity(mesh.services.len());
        for s in &mesh.services {
            // The workloads backing the service, with the address their proxy is dialled at
            // and the port their app serves it on.
            let backing: Vec<(usize, SocketAddr, u16)> = match &s.endpoints {
                Some(listed) => listed
                    .iter()
                    .filter_map(|e| {
                        let i = *by_ns_name.get(&(s.namespace.as_str(), e.workload.as_str()))?;
                        // The pod's proxy's inbound port (see docs/kubernetes.md, "How
                        // identities map"); the target port travels in `target_port`.
                        let addr = SocketAddr::new(e.address, mesh.workloads[i].inbound_port);
                        Some((i, addr, e.target_port))
                    })
                    .collect(),
                None => {
                    // Candidates: the workloads with the selector's first label (or the whole
                    // namespace for an empty selector), then every label checked.
                    let candidates: &[usize] = match s.selector.iter().next() {
                        Some((k, v)) => by_label
                            .get(&(s.namespace.as_str(), k.as_str(), v.as_str()))
                            .map_or(&[], Vec::as_slice),
                        None => by_ns.get(s.namespace.as_str()).map_or(&[], Vec::as_slice),
                    };
                    candidates
                        .iter()
                        .filter(|i| s.selects(&mesh.workloads[**i]))
                        .map(|&i| (i, mesh.workloads[i].inbound_addr(), 0))
                        .collect()
                }
            };
            let backing_workloads: Vec<usize> = backing.iter().map(|(i, _, _)| *i).collect();
            let endpoints: Vec<v1::Endpoint> = backing
                .into_iter()
                .filter_map(|(i, addr, target_port)| {
                    if app_protocol[i].is_none() {
                        app_protocol[i] = Some(s.protocol);
                    }
                    Some(v1::Endpoint {
                        address: addr.to_string(),
                        identity: ids[i].clone()?,
                        weight: 1,
                        workload: mesh.workloads[i].name.clone(),
                        target_port: u32::from(target_port),
                    })
                })
                .collect();
            let msg = v1::Service {
                name: s.name.clone(),
                namespace: s.namespace.clone(),
                port: u32::from(s.port),
                protocol: s.protocol.to_proto() as i32,
                endpoints,
                virtual_ips: s.virtual_ips.iter().map(|ip| ip.to_string()).collect(),
                // Validated when the mesh was read (file) or the Service was (annotations).
                request_timeout_ms: palisade_api::call::timeout_to_proto(
                    s.timeout
                        .as_deref()
                        .and_then(|t| palisade_api::call::parse_timeout(t).ok()),
                ),
                idle_timeout_ms: palisade_api::call::timeout_to_proto(
                    s.idle_timeout
                        .as_deref()
                        .and_then(|t| palisade_api::call::parse_timeout(t).ok()),
                ),
                retry: s
                    .retry
                    .as_ref()
                    .and_then(|r| r.validate().ok())
                    .map(|r| r.to_proto()),
                routes: traffic.routes_of(&s.name, &s.namespace, s.port),
                trace: s
                    .tracing
                    .as_ref()
                    .and_then(|t| t.validate().ok())
                    .and_then(|t| t.to_proto()),
            };
            backed.push(backing_workloads);
            services.push(Arc::new(SharedService {
                digest: digest(&msg),
                msg,
            }));
        }
        // Sort the backing lists with their services.
        let mut order: Vec<usize> = (0..services.len()).collect();
        order.sort_by(|&a, &b| services[a].key().cmp(&services[b].key()));
        // Key order, the order of a proxy's config (`palisade_api::delta`): a proxy's services
        // and a delta's are then merged in one walk.
        let services: Vec<Arc<SharedService>> =
            order.iter().map(|&i| services[i].clone()).collect();
        let mut backs: Vec<Vec<usize>> = vec![Vec::new(); mesh.workloads.len()];
        for (sorted, &orig) in order.iter().enumerate() {
            for &w in &backed[orig] {
                backs[w].push(sorted);
            }
        }
        let mut by_addr = HashMap::new();
        for (i, s) in services.iter().enumerate() {
            let (name, ns, port) = s.key();
            by_key
                .entry((name.to_string(), ns.to_string(), port))
                .or_insert(i);
            if let Ok(port) = u16::try_from(port) {
                for vip in &s.msg.virtual_ips {
                    if let Ok(ip) = vip.parse::<std::net::IpAddr>() {
                        by_addr.insert(SocketAddr::new(ip, port), i);
                    }
                }
            }
        }
        // Virtual IPs first: an endpoint address never shadows a service's virtual address.
        for (i, s) in services.iter().enumerate() {
            for e in &s.msg.endpoints {
                if let Ok(addr) = e.address.parse::<SocketAddr>() {
                    by_addr.entry(addr).or_insert(i);
                }
            }
        }
        let backends = services
            .iter()
            .map(|s| {
                let mut v: Vec<usize> = s
                    .msg
                    .routes
                    .iter()
                    .flat_map(|r| &r.rules)
                    .flat_map(|rule| {
                        rule.backends
                            .iter()
                            .filter_map(|b| b.service.as_ref())
                            .chain(rule.filters.iter().filter_map(|f| match &f.filter {
                                Some(v1::route_filter::Filter::RequestMirror(m)) => {
                                    m.backend.as_ref()
                                }
                                _ => None,
                            }))
                    })
                    .filter_map(|k| {
                        by_key
                            .get(&(k.name.clone(), k.namespace.clone(), k.port))
                            .copied()
                    })
                    .collect();
                v.sort_unstable();
                v.dedup();
                v
            })
            .collect();
        Pieces {
            backs,
            backends,
            services,
            by_key,
            by_addr,
            workloads_by_name,
            app_protocol: app_protocol
                .into_iter()
                .map(|p| p.unwrap_or(Protocol::Detect))
                .collect(),
        }
    }

    /// The services `w`'s proxy gets: its upstreams' if it declares any, else all.
    pub fn services_for(&self, w: &Workload) -> Vec<Arc<SharedService>> {
        if w.upstreams.is_empty() {
            return self.services.clone();
        }
        self.declared(w, &Wanted::new())
    }

    /// `w`'s declared upstreams and the services of `wanted` that exist, in key order, once
    /// each.
    fn declared(&self, w: &Workload, wanted: &Wanted) -> Vec<Arc<SharedService>> {
        let mut out: Vec<Arc<SharedService>> = Vec::with_capacity(w.upstreams.len() + wanted.len());
        for u in &w.upstreams {
            let (name, ns) = u.service_ref();
            if let Some(s) = self.service(name, ns, u.port) {
                out.push(s.clone());
            }
        }
        for key in wanted {
            if let Some(&i) = self.by_key.get(key) {
                out.push(self.services[i].clone());
            }
        }
        // What their routes send to comes along (routes do not chain: a backend's own
        // backends are not needed).
        let routed: Vec<usize> = out
            .iter()
            .filter(|s| !s.msg.routes.is_empty())
            .filter_map(|s| {
                let (n, ns, p) = s.key();
                self.by_key
                    .get(&(n.to_string(), ns.to_string(), p))
                    .copied()
            })
            .collect();
        for i in routed {
            for &b in &self.backends[i] {
                out.push(self.services[b].clone());
            }
        }
        out.sort_by(|a, b| a.key().cmp(&b.key()));
        out.dedup_by(|a, b| Arc::ptr_eq(a, b));
        out
    }

    /// The services a proxy that resolves on demand gets: its declared upstreams and the
    /// services of `wanted` that exist, in key order.
    pub fn services_on_demand(&self, w: &Workload, wanted: &Wanted) -> Vec<Arc<SharedService>> {
        self.declared(w, wanted)
    }

    /// Whether the service `key` is in this generation.
    pub fn contains(&self, key: &(String, String, u32)) -> bool {
        self.by_key.contains_key(key)
    }

    /// The service a connection redirected from its original destination `dst` is for.
    pub fn lookup(&self, dst: SocketAddr) -> Option<&Arc<SharedService>> {
        self.services.get(*self.by_addr.get(&dst)?)
    }

    /// The service `(name, namespace, port)`.
    pub fn service(&self, name: &str, namespace: &str, port: u16) -> Option<&Arc<SharedService>> {
        let i = self
            .by_key
            .get(&(name.to_string(), namespace.to_string(), u32::from(port)))?;
        self.services.get(*i)
    }

    /// The routes of the services `w` backs (once each): its inbound proxy matches them for
    /// the route label, authorization and the trace policy. Each carries its effective trace
    /// policy (the route's over its parent service's; for a route attached to several services
    /// the workload backs, the first one's in key order), as the inbound side does not know
    /// the service a request was for.
    pub fn routes_backed_by(&self, index: usize) -> Vec<v1::Route> {
        let mut out: Vec<v1::Route> = Vec::new();
        for &s in self.backs.get(index).map_or(&[][..], Vec::as_slice) {
            let svc = &self.services[s].msg;
            for r in &svc.routes {
                if !out
                    .iter()
                    .any(|o| o.namespace == r.namespace && o.name == r.name && o.grpc == r.grpc)
                {
                    let mut r = r.clone();
                    r.trace = effective_trace(r.trace.as_ref(), svc.trace.as_ref());
                    out.push(r);
                }
            }
        }
        out
    }

    /// Indices of the workloads named `name`.
    pub fn workloads_named(&self, name: &str) -> &[usize] {
        self.workloads_by_name.get(name).map_or(&[], Vec::as_slice)
    }

    /// What the app of workload `index` speaks.
    pub fn app_protocol(&self, index: usize) -> Protocol {
        self.app_protocol
            .get(index)
            .copied()
            .unwrap_or(Protocol::Detect)
    }
}

/// A route's trace policy over its service's, field by field (both were validated when read;
/// one that is not valid counts as unset).
fn effective_trace(
    route: Option<&v1::TracePolicy>,
    service: Option<&v1::TracePolicy>,
) -> Option<v1::TracePolicy> {
    use palisade_api::trace::TracePolicy;
    let read = |p| TracePolicy::from_proto(p).unwrap_or_default();
    read(route).or(read(service)).to_proto()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MESH: &str = "workloads:
  - { name: web, namespace: demo, labels: { app: web }, inboundPort: 1001, adminPort: 1002,
      upstreams: [ { service: api.demo, port: 8080, localPort: 1003 } ] }
  - { name: api-1, namespace: demo, serviceAccount: api, labels: { app: api, tier: x }, inboundPort: 1004, adminPort: 1005 }
  - { name: api-2, namespace: demo, serviceAccount: api, labels: { app: api }, inboundPort: 1006, adminPort: 1007 }
  - { name: api-3, namespace: other, labels: { app: api }, inboundPort: 1008, adminPort: 1009 }
services:
  - { name: api, namespace: demo, port: 8080, selector: { app: api }, protocol: grpc }
  - { name: x, namespace: demo, port: 8081, selector: { app: api, tier: x } }
  - { name: webs, namespace: demo, port: 8082, selector: { app: web } }
";

    fn mesh(text: &str) -> Mesh {
        crate::mesh::parse(text, std::path::Path::new("mesh.yaml")).expect("mesh")
    }

    fn names(p: &Pieces, s: usize) -> Vec<&str> {
        p.services[s]
            .msg
            .endpoints
            .iter()
            .map(|e| e.workload.as_str())
            .collect()
    }

    #[test]
    fn selectors_match_every_label_in_the_services_namespace_only() {
        let m = mesh(MESH);
        let p = Pieces::build(&m);
        // Key order: api, webs, x.
        assert_eq!(names(&p, 0), ["api-1", "api-2"]);
        assert_eq!(names(&p, 1), ["web"]);
        assert_eq!(names(&p, 2), ["api-1"]);
        assert_eq!(p.app_protocol(1), Protocol::Grpc);
        assert_eq!(
            p.app_protocol(0),
            Protocol::Detect,
            "only `all` selects web"
        );
        assert_eq!(p.app_protocol(3), Protocol::Detect, "another namespace");
        assert_eq!(p.workloads_named("api-2"), [2]);
    }

    #[test]
    fn a_routes_backends_come_with_its_service_and_its_backers_match_it() {
        let m = mesh(MESH);
        let mut traffic = crate::traffic::Traffic::default();
        let route = palisade_api::policy::parse_str(
            std::path::Path::new("r.yaml"),
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: { name: split, namespace: demo }\nspec:\n  parentRefs: [ { kind: Service, name: api, port: 8080 } ]\n  rules: [ { backendRefs: [ { name: x, port: 8081, weight: 1 } ] } ]\n",
        )
        .expect("route");
        for r in route {
            assert!(traffic.add(r).is_none());
        }
        let p = Pieces::build_with(&m, &traffic);
        // web declares api only; the route's backend x comes with it, webs does not.
        let web: Vec<String> = p
            .services_for(&m.workloads[0])
            .iter()
            .map(|s| s.msg.name.clone())
            .collect();
        assert_eq!(web, ["api", "x"]);
        let api = &p.services[0].msg;
        assert_eq!(api.routes.len(), 1);
        assert_eq!(api.routes[0].rules[0].backends[0].weight, 1);
        assert!(
            p.services[2].msg.routes.is_empty(),
            "x has no routes of its own"
        );
        // api-1 and api-2 back api: their inbound proxies match its route; web backs none.
        assert_eq!(p.routes_backed_by(1).len(), 1);
        assert_eq!(p.routes_backed_by(2)[0].name, "split");
        assert!(p.routes_backed_by(0).is_empty());
        // The digest of api changes with its route: proxies holding it get the change.
        assert_ne!(p.services[0].digest, Pieces::build(&m).services[0].digest);
    }

    #[test]
    fn a_routes_trace_policy_travels_and_its_backers_get_the_effective_one() {
        let m = mesh(&MESH.replace(
            "selector: { app: api }, protocol: grpc }",
            "selector: { app: api }, protocol: grpc, tracing: { spanBudget: 10, slowRequest: 1s } }",
        ));
        let mut traffic = crate::traffic::Traffic::default();
        for r in palisade_api::policy::parse_str(
            std::path::Path::new("r.yaml"),
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: { name: slow, namespace: demo, annotations: { trace.palisade.dev/slow: 200ms } }\nspec:\n  parentRefs: [ { kind: Service, name: api, port: 8080 } ]\n",
        )
        .expect("route")
        {
            assert!(traffic.add(r).is_none());
        }
        let p = Pieces::build_with(&m, &traffic);
        let api = &p.services[0].msg;
        let t = |t: Option<&v1::TracePolicy>| t.map(|t| (t.span_budget_per_second, t.slow_ms));
        assert_eq!(t(api.trace.as_ref()), Some((10, 1000)));
        // Callers get the route's own policy (their proxy merges it with the service's)...
        assert_eq!(t(api.routes[0].trace.as_ref()), Some((0, 200)));
        // ...the backers' inbound proxies the effective one.
        let inbound = p.routes_backed_by(1);
        assert_eq!(t(inbound[0].trace.as_ref()), Some((10, 200)));
    }

    #[test]
    fn a_proxy_gets_its_upstreams_or_everything() {
        let m = mesh(MESH);
        let p = Pieces::build(&m);
        let web: Vec<String> = p
            .services_for(&m.workloads[0])
            .iter()
            .map(|s| s.msg.name.clone())
            .collect();
        assert_eq!(web, ["api"]);
        assert_eq!(p.services_for(&m.workloads[1]).len(), 3);
    }

    #[test]
    fn digests_change_with_the_service_and_only_then() {
        let a = Pieces::build(&mesh(MESH));
        let b = Pieces::build(&mesh(MESH));
        let moved = Pieces::build(&mesh(&MESH.replace(
            "labels: { app: api, tier: x }",
            "labels: { app: api, tier: y }",
        )));
        assert_eq!(a.services[0].digest, b.services[0].digest);
        assert_eq!(a.services[0].digest, moved.services[0].digest);
        assert_eq!(a.services[1].digest, moved.services[1].digest);
        assert_ne!(a.services[2].digest, moved.services[2].digest, "x");
    }
}
