//! The in-memory model the discovery service serves from: the mesh (workloads, services) and
//! the policies, under one generation number.
//!
//! A model is immutable once built; a config change builds a whole new one and swaps it in
//! (see `source`). That makes "apply the change whole or not at all" trivial, and lets every
//! watcher compute its proxy's config from a consistent snapshot.

use std::path::PathBuf;

use palisade_api::policy::{self, AuthorizationPolicy, PeerAuthentication, PolicyError, Resource};
use palisade_api::v1;

use std::sync::{Arc, OnceLock};

use crate::mesh::{Mesh, MeshError, Workload};
use crate::parts::ProxyParts;
use crate::pieces::Pieces;
use crate::traffic::Traffic;

/// The mesh and its policies at one generation.
#[derive(Debug, Clone)]
pub struct Model {
    /// Increases by one with every accepted change; proxies see it as the config version.
    pub generation: u64,
    pub mesh: Mesh,
    pub authorization_policies: Vec<AuthorizationPolicy>,
    pub peer_authentications: Vec<PeerAuthentication>,
    /// Routes (HTTPRoute, GRPCRoute), HTTPFaults, RateLimitPolicies and EgressPolicies.
    pub traffic: Traffic,
    /// The pieces proxies' configs are assembled from, built once for this generation on
    /// first use ([`Model::pieces`]).
    pieces: OnceLock<Arc<Pieces>>,
}

/// Why a model could not be built. Policy errors are all reported at once, so one edit-reload
/// cycle shows every mistake.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Mesh(#[from] MeshError),
    #[error("{}", join_policy_errors(.0))]
    Policies(Vec<PolicyError>),
    #[error("the policies directory {} does not exist (mesh file field `policies`)", .0.display())]
    MissingPolicies(PathBuf),
    /// The CA and every issued SVID belong to one trust domain; changing it needs a restart.
    #[error("{}: trustDomain: cannot change from {from} to {to} while the control plane runs; restart it", file.display())]
    TrustDomainChanged {
        file: PathBuf,
        from: palisade_certs::TrustDomain,
        to: palisade_certs::TrustDomain,
    },
}

fn join_policy_errors(errors: &[PolicyError]) -> String {
    errors
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

impl Model {
    /// Builds a model from a validated mesh, loading the policies directory it names.
    pub fn load(mesh: Mesh, generation: u64) -> Result<Self, ModelError> {
        let mut model = Model {
            generation,
            mesh,
            authorization_policies: Vec::new(),
            peer_authentications: Vec::new(),
            traffic: Traffic::default(),
            pieces: OnceLock::new(),
        };
        if let Some(dir) = model.mesh.policies_dir.clone() {
            if !dir.exists() {
                return Err(ModelError::MissingPolicies(dir));
            }
            let loaded = policy::load_path(&dir).map_err(ModelError::Policies)?;
            let errors = crate::traffic::check_local(&model.mesh, &loaded);
            if !errors.is_empty() {
                return Err(ModelError::Policies(errors));
            }
            for loaded in loaded {
                model.warn_foreign_principals(&loaded);
                model.add(loaded.resource);
            }
        }
        Ok(model)
    }

    /// A model over a mesh and already-parsed resources (tests, and a future Kubernetes
    /// source that gets resources from the API server instead of files).
    pub fn from_parts(
        mesh: Mesh,
        resources: impl IntoIterator<Item = Resource>,
        generation: u64,
    ) -> Self {
        let mut model = Model {
            generation,
            mesh,
            authorization_policies: Vec::new(),
            peer_authentications: Vec::new(),
            traffic: Traffic::default(),
            pieces: OnceLock::new(),
        };
        for r in resources {
            model.add(r);
        }
        model
    }

    /// A principal of another trust domain is legal (Istio allows it, for federation) but
    /// never matches a workload of this mesh, which is more often a typo than a wish: say so
    /// once per load, naming the policy and the value.
    fn warn_foreign_principals(&self, loaded: &policy::Loaded) {
        let Resource::AuthorizationPolicy(p) = &loaded.resource else {
            return;
        };
        let td = self.mesh.trust_domain.as_str();
        for (field, principal) in p.foreign_principals(td) {
            tracing::warn!(
                policy = %p.qualified_name(),
                file = %loaded.file.display(),
                field = %field,
                principal,
                trust_domain = td,
                "principal is not in the mesh's trust domain: it matches no workload of this mesh, only callers from that other trust domain"
            );
        }
    }

    fn add(&mut self, resource: Resource) {
        match self.traffic.add(resource) {
            Some(Resource::AuthorizationPolicy(p)) => self.authorization_policies.push(p),
            Some(Resource::PeerAuthentication(p)) => self.peer_authentications.push(p),
            _ => {}
        }
    }

    /// Same mesh and policies, another generation: the source uses this to skip publishing a
    /// change that changes nothing (a file touched, a comment edited).
    pub fn same_content(&self, other: &Model) -> bool {
        self.mesh == other.mesh
            && self.authorization_policies == other.authorization_policies
            && self.peer_authentications == other.peer_authentications
            && self.traffic == other.traffic
    }

    /// The config of one workload's proxy at this generation, or None if the mesh has no such
    /// workload. The trust bundle is left empty: it belongs to the CA, and the discovery
    /// service adds it.
    pub fn proxy_config(&self, workload: &str) -> Option<v1::ProxyConfig> {
        let i = *self.pieces().workloads_named(workload).first()?;
        Some(self.config_of(&self.mesh.workloads[i]))
    }

    /// The pieces of this generation, built on first use. Changing the model's fields after
    /// that is a bug: a model is immutable once published.
    pub fn pieces(&self) -> &Pieces {
        self.pieces
            .get_or_init(|| Arc::new(Pieces::build_with(&self.mesh, &self.traffic)))
    }

    /// The config of the proxy of `w` (one of this model's workloads).
    pub fn config_of(&self, w: &Workload) -> v1::ProxyConfig {
        self.parts_of(w).config(Vec::new())
    }

    /// The config of `w`'s proxy as shared pieces: what a Watch stream compares (by digest)
    /// to know whether a change concerns its proxy, and sends when it does.
    pub fn parts_of(&self, w: &Workload) -> ProxyParts {
        let pieces = self.pieces();
        ProxyParts {
            version: self.generation,
            inbound: self.inbound(w, pieces),
            services: pieces.services_for(w),
        }
    }

    /// The config of `w`'s proxy when it resolves services on demand: its declared upstreams
    /// and the services of `wanted`.
    pub fn parts_on_demand(&self, w: &Workload, wanted: &crate::pieces::Wanted) -> ProxyParts {
        let pieces = self.pieces();
        ProxyParts {
            version: self.generation,
            inbound: self.inbound(w, pieces),
            services: pieces.services_on_demand(w, wanted),
        }
    }

    fn inbound(&self, w: &Workload, pieces: &Pieces) -> v1::Inbound {
        let mtls = policy::effective_mtls(&self.peer_authentications, &w.namespace, &w.labels);
        let authorization_policies = self
            .authorization_policies
            .iter()
            .filter(|p| p.selects(&w.namespace, &w.labels, policy::ROOT_NAMESPACE))
            .map(wire_policy)
            .collect();
        // A workload is its name in its namespace (pod names repeat across namespaces).
        let index = pieces
            .workloads_named(&w.name)
            .iter()
            .find(|&&i| self.mesh.workloads[i].namespace == w.namespace)
            .copied();
        let app_protocol = index.map_or(crate::mesh::Protocol::Detect, |i| pieces.app_protocol(i));
        // `effective_mtls` resolves UNSET by inheritance, ending at STRICT; a proxy is never sent
        // an unset mode it would have to guess about.
        let mode = |m: policy::MtlsMode| m.effective().to_proto() as i32;
        v1::Inbound {
            mode: mode(mtls.mode),
            port_modes: mtls
                .port_modes
                .iter()
                .map(|(port, m)| (*port, mode(*m)))
                .collect(),
            default_policy: self.mesh.default_policy.to_proto() as i32,
            authorization_policies,
            app_protocol: app_protocol.to_proto() as i32,
            path_normalization: self.mesh.path_normalization.to_proto() as i32,
            rate_limit: self.traffic.rate_limit_of(&w.namespace, &w.labels),
            egress: self.traffic.egress_of(&w.namespace, &w.labels),
            routes: index.map_or_else(Vec::new, |i| pieces.routes_backed_by(i)),
        }
    }

    /// The workload named `name` whose identity is `id`. Locally names are unique; on
    /// Kubernetes a workload is a pod, whose name is unique only in its namespace, and the
    /// namespace is part of the identity.
    pub fn workload_with_id(&self, name: &str, id: &palisade_certs::SpiffeId) -> Option<&Workload> {
        self.pieces()
            .workloads_named(name)
            .iter()
            .map(|&i| &self.mesh.workloads[i])
            .find(|w| w.spiffe_id(&self.mesh).is_ok_and(|wid| &wid == id))
    }
}

/// A selected policy in its wire form. Validation guarantees the conversion (policies reach the
/// model only through the validating parser); should one still fail, the workload gets a policy
/// of the same name that denies everything, never a config silently missing a policy — a
/// missing DENY, or a missing ALLOW that leaves none, would fail open.
fn wire_policy(p: &AuthorizationPolicy) -> v1::Authorization {
    v1::Authorization::try_from(p).unwrap_or_else(|e| {
        tracing::error!(policy = %p.qualified_name(), error = %e, "cannot convert an AuthorizationPolicy to its wire form; its workloads deny every request until it is fixed");
        v1::Authorization {
            name: p.metadata.name.clone(),
            namespace: p.metadata.namespace().to_string(),
            action: v1::Action::Deny as i32,
            rules: vec![v1::Rule::default()],
        }
    })
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::path::Path;
    use std::sync::{Arc, Mutex};

    use super::*;

    const MESH: &str = "policies: policies/\nworkloads:
  - { name: a, namespace: demo, labels: { app: a }, inboundPort: 1001, adminPort: 1002 }
  - { name: b, namespace: demo, labels: { app: b }, inboundPort: 1003, adminPort: 1004 }
";

    fn policy(principals: &[&str]) -> String {
        format!(
            "apiVersion: palisade.dev/v1alpha1\nkind: AuthorizationPolicy\n\
             metadata: {{ name: p, namespace: demo }}\nspec:\n  rules:\n\
             \x20   - from: [ {{ source: {{ principals: {} }} }} ]\n",
            serde_json::to_string(principals).expect("json")
        )
    }

    /// A mesh file whose policies directory holds `policy`.
    fn mesh_with(dir: &Path, policy: &str) -> Mesh {
        std::fs::create_dir_all(dir.join("policies")).expect("mkdir");
        std::fs::write(dir.join("policies/p.yaml"), policy).expect("write");
        crate::mesh::parse(MESH, &dir.join("mesh.yaml")).expect("mesh")
    }

    /// Log output, collected in memory.
    #[derive(Clone, Default)]
    struct Logs(Arc<Mutex<Vec<u8>>>);

    impl Write for Logs {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Logs {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().expect("lock")).into_owned()
        }
    }

    fn logged<T>(f: impl FnOnce() -> T) -> (T, String) {
        let logs = Logs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let out = tracing::subscriber::with_default(subscriber, f);
        (out, logs.text())
    }

    const WARNING: &str = "principal is not in the mesh's trust domain";

    #[test]
    fn a_principal_of_another_trust_domain_is_a_warning_once_per_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let foreign = "other.example/ns/demo/sa/web";
        let text = policy(&[foreign, "cluster.local/ns/demo/sa/web", "*/sa/web"]);
        for generation in [1, 2] {
            let mesh = mesh_with(dir.path(), &text);
            let (model, logs) = logged(|| {
                let model = Model::load(mesh, generation).expect("a warning, not a rejection");
                // Computing every proxy's config does not repeat the warning.
                for w in ["a", "b"] {
                    assert!(model.proxy_config(w).is_some(), "{w}");
                }
                model
            });
            assert_eq!(model.authorization_policies.len(), 1);
            assert_eq!(logs.matches(WARNING).count(), 1, "{logs}");
            let line = logs
                .lines()
                .find(|l| l.contains(WARNING))
                .unwrap_or_default();
            assert!(line.contains("WARN"), "{line}");
            assert!(line.contains("policy=demo/p"), "{line}");
            assert!(line.contains(&format!("principal=\"{foreign}\"")), "{line}");
            assert!(
                line.contains("field=spec.rules[0].from[0].source.principals[0]"),
                "{line}"
            );
            assert!(line.contains("p.yaml"), "{line}");
        }

        // Principals of the mesh's own trust domain are not worth a word.
        let mesh = mesh_with(dir.path(), &policy(&["cluster.local/ns/demo/*"]));
        let (model, logs) = logged(|| Model::load(mesh, 3));
        assert!(model.is_ok());
        assert!(!logs.contains(WARNING), "{logs}");
    }

    #[test]
    fn a_policy_without_a_wire_form_denies_rather_than_vanishes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mesh = mesh_with(dir.path(), &policy(&["cluster.local/ns/demo/sa/web"]));
        let good = Model::load(mesh.clone(), 1).expect("loads");
        let served = good.proxy_config("a").expect("a").inbound.expect("inbound");
        assert_eq!(
            served.authorization_policies[0].action,
            v1::Action::Allow as i32
        );
        // Only a resource that skipped validation can get here (from_parts takes anything).
        let mut broken = good.authorization_policies[0].clone();
        if let Some(rules) = broken.spec.rules.as_mut() {
            rules[0].from[0].source.ip_blocks = vec!["10.*".into()];
        }
        let model = Model::from_parts(mesh, [Resource::AuthorizationPolicy(broken)], 2);
        let (cfg, logs) = logged(|| model.proxy_config("a").expect("a"));
        let p = &cfg.inbound.expect("inbound").authorization_policies[0];
        assert_eq!((p.namespace.as_str(), p.name.as_str()), ("demo", "p"));
        assert_eq!(p.action, v1::Action::Deny as i32);
        assert_eq!(
            p.rules,
            vec![v1::Rule::default()],
            "one rule that matches anything"
        );
        assert!(
            logs.contains("ERROR") && logs.contains("ipBlocks[0]"),
            "{logs}"
        );
    }

    #[test]
    fn a_workload_gets_the_egress_policy_of_its_namespace_before_the_root_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let doc = |ns: &str, name: &str, selector: &str, default: &str| {
            format!(
                "---\napiVersion: palisade.dev/v1alpha1\nkind: EgressPolicy\n\
                 metadata: {{ name: {name}, namespace: {ns} }}\nspec:\n{selector}\
                 \x20 defaultAction: {default}\n\
                 \x20 rules: [ {{ action: ALLOW, hosts: [\"api.github.com\"] }} ]\n"
            )
        };
        let text = [
            doc("palisade-system", "mesh-wide", "", "DENY"),
            doc(
                "demo",
                "z-for-a",
                "  selector: { matchLabels: { app: a } }\n",
                "ALLOW",
            ),
            doc(
                "demo",
                "b-other",
                "  selector: { matchLabels: { app: c } }\n",
                "DENY",
            ),
        ]
        .concat();
        let model = Model::load(mesh_with(dir.path(), &text), 1).expect("loads");
        let egress = |w: &str| {
            model
                .proxy_config(w)
                .and_then(|c| c.inbound)
                .and_then(|i| i.egress)
                .expect("an egress policy")
        };
        let a = egress("a");
        assert_eq!(a.name, "demo/z-for-a", "the namespace's own policy first");
        assert!(a.default_allow);
        let b = egress("b");
        assert_eq!(
            b.name, "palisade-system/mesh-wide",
            "else the root namespace's"
        );
        assert!(!b.default_allow);
        assert_eq!(b.rules[0].hosts, ["api.github.com"]);
        assert!(b.rules[0].allow);
        // No EgressPolicy at all: none sent, everything allowed.
        let bare = Model::from_parts(model.mesh.clone(), [], 2);
        let inbound = bare
            .proxy_config("a")
            .and_then(|c| c.inbound)
            .expect("inbound");
        assert_eq!(inbound.egress, None);
    }

    #[test]
    fn a_principal_that_can_never_match_rejects_the_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mesh = mesh_with(
            dir.path(),
            &policy(&["spiffe://Cluster.Local/ns/demo/sa/api"]),
        );
        match Model::load(mesh, 1) {
            Err(ModelError::Policies(errors)) => {
                assert_eq!(errors.len(), 1, "{errors:?}");
                assert!(errors[0].file.ends_with("p.yaml"));
                assert_eq!(
                    errors[0].field,
                    "spec.rules[0].from[0].source.principals[0]"
                );
                assert!(errors[0].message.contains("can never match"), "{errors:?}");
            }
            other => panic!("expected a policy error, got {other:?}"),
        }
    }
}
