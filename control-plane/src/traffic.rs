//! Routes, faults and rate limits in their wire form, and the checks that need the whole mesh
//! (a backend is a service of the mesh, an `HTTPFault` a route names exists).

use std::collections::{BTreeMap, BTreeSet};

use palisade_api::policy::route::{Filter, Route, wire_route};
use palisade_api::policy::{
    EgressPolicy, HttpFault, Loaded, PolicyError, RateLimitPolicy, Resource,
};
use palisade_api::v1;

use crate::mesh::Mesh;

/// The routing resources of one model generation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Traffic {
    /// By `namespace/name` order, the order routes of one service are tried in after
    /// precedence (Gateway API: the older route wins a tie, then the alphabetical; files have
    /// no creation time).
    pub routes: Vec<Route>,
    pub faults: BTreeMap<(String, String), HttpFault>,
    pub rate_limits: Vec<RateLimitPolicy>,
    /// EgressPolicies, by `namespace/name`.
    pub egress: Vec<EgressPolicy>,
}

impl Traffic {
    /// Takes the resource if it is a traffic one; gives it back otherwise.
    pub fn add(&mut self, r: Resource) -> Option<Resource> {
        match r {
            Resource::Route(r) => {
                let at = self.routes.partition_point(|x| {
                    (x.metadata.namespace(), &x.metadata.name)
                        < (r.metadata.namespace(), &r.metadata.name)
                });
                self.routes.insert(at, r);
            }
            Resource::HttpFault(f) => {
                self.faults.insert(
                    (f.metadata.namespace().to_string(), f.metadata.name.clone()),
                    f,
                );
            }
            Resource::RateLimitPolicy(p) => {
                let at = self.rate_limits.partition_point(|x| {
                    (x.metadata.namespace(), &x.metadata.name)
                        < (p.metadata.namespace(), &p.metadata.name)
                });
                self.rate_limits.insert(at, p);
            }
            Resource::EgressPolicy(p) => {
                let at = self.egress.partition_point(|x| {
                    (x.metadata.namespace(), &x.metadata.name)
                        < (p.metadata.namespace(), &p.metadata.name)
                });
                self.egress.insert(at, p);
            }
            other => return Some(other),
        }
        None
    }

    /// The wire routes of the service `name.namespace:port`.
    pub fn routes_of(&self, name: &str, namespace: &str, port: u16) -> Vec<v1::Route> {
        self.routes
            .iter()
            .filter(|r| r.attaches_to(name, namespace, port))
            .map(|r| wire_route(r, &self.faults))
            .collect()
    }

    /// The rate limit of a workload: the first policy (by namespace/name) that selects it.
    pub fn rate_limit_of(
        &self,
        ns: &str,
        labels: &BTreeMap<String, String>,
    ) -> Option<v1::RateLimit> {
        let p = self.rate_limits.iter().find(|p| p.selects(ns, labels))?;
        Some(palisade_api::policy::traffic::wire_rate_limit(p))
    }

    /// The egress policy of a workload: the first (by namespace/name) of its own namespace
    /// that selects it, else the first of the root namespace that does (a mesh-wide default a
    /// namespace can override). None: every egress destination is allowed.
    pub fn egress_of(
        &self,
        ns: &str,
        labels: &BTreeMap<String, String>,
    ) -> Option<v1::EgressPolicy> {
        let root = palisade_api::policy::ROOT_NAMESPACE;
        let in_ns = |want: &str| {
            self.egress
                .iter()
                .find(|p| p.metadata.namespace() == want && p.selects(ns, labels, root))
        };
        in_ns(ns).or_else(|| in_ns(root)).map(EgressPolicy::to_wire)
    }
}

/// What only the whole local mesh can tell about the routes of a policies directory: each
/// parent and backend is a service of the mesh file, each `HTTPFault` a rule names exists.
/// (On Kubernetes Services come and go, and a missing backend answers 500 as Gateway API says.)
pub fn check_local(mesh: &Mesh, loaded: &[Loaded]) -> Vec<PolicyError> {
    let mut errors = check_references(loaded);
    errors.extend(check_services(mesh, loaded));
    errors
}

/// Every `HTTPFault` a route's ExtensionRef names is in the set (the set alone tells).
pub fn check_references(loaded: &[Loaded]) -> Vec<PolicyError> {
    let faults: BTreeSet<(&str, &str)> = loaded
        .iter()
        .filter_map(|l| match &l.resource {
            Resource::HttpFault(f) => Some((f.metadata.namespace(), f.metadata.name.as_str())),
            _ => None,
        })
        .collect();
    let mut errors = Vec::new();
    for l in loaded {
        let Resource::Route(r) = &l.resource else {
            continue;
        };
        let ns = r.metadata.namespace();
        for (i, rule) in r.rules.iter().enumerate() {
            for (j, f) in rule.filters.iter().enumerate() {
                if let Filter::Fault(name) = f
                    && !faults.contains(&(ns, name.as_str()))
                {
                    errors.push(PolicyError {
                        file: l.file.clone(),
                        document: l.index,
                        field: format!("spec.rules[{i}].filters[{j}].extensionRef.name"),
                        message: format!("no HTTPFault {ns}/{name} in the policies"),
                    });
                }
            }
        }
    }
    errors
}

/// Every parent, backend and mirror of a route is a service of the mesh file.
pub fn check_services(mesh: &Mesh, loaded: &[Loaded]) -> Vec<PolicyError> {
    let services: BTreeSet<(&str, &str, u16)> = mesh
        .services
        .iter()
        .map(|s| (s.name.as_str(), s.namespace.as_str(), s.port))
        .collect();
    let mut errors = Vec::new();
    for l in loaded {
        let Resource::Route(r) = &l.resource else {
            continue;
        };
        let mut err = |field: String, message: String| {
            errors.push(PolicyError {
                file: l.file.clone(),
                document: l.index,
                field,
                message,
            })
        };
        for (i, p) in r.parents.iter().enumerate() {
            let known = services.iter().any(|(n, sns, port)| {
                *n == p.name && *sns == p.namespace && p.port.is_none_or(|x| x == *port)
            });
            if !known {
                err(
                    format!("spec.parentRefs[{i}]"),
                    format!(
                        "no service {}.{}{} in the mesh file",
                        p.name,
                        p.namespace,
                        p.port.map(|p| format!(":{p}")).unwrap_or_default()
                    ),
                );
            }
        }
        for (i, rule) in r.rules.iter().enumerate() {
            let mirrors = rule.filters.iter().filter_map(|f| match f {
                Filter::Mirror(m) => Some(&m.backend),
                _ => None,
            });
            for (j, b) in rule.backends.iter().enumerate() {
                if !services.contains(&(b.name.as_str(), b.namespace.as_str(), b.port)) {
                    err(
                        format!("spec.rules[{i}].backendRefs[{j}]"),
                        format!(
                            "no service {}.{}:{} in the mesh file",
                            b.name, b.namespace, b.port
                        ),
                    );
                }
            }
            for b in mirrors {
                if !services.contains(&(b.name.as_str(), b.namespace.as_str(), b.port)) {
                    err(
                        format!("spec.rules[{i}].filters"),
                        format!(
                            "RequestMirror: no service {}.{}:{} in the mesh file",
                            b.name, b.namespace, b.port
                        ),
                    );
                }
            }
        }
    }
    errors
}
