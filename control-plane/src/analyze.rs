//! Cross-checks valid policies against a mesh, as `istioctl analyze` does: what parses and
//! validates can still fit no workload of the mesh, which is nearly always a typo. Each
//! finding is a warning, not an error: the control plane applies such policies (a workload may
//! join the mesh later), but `palisade policy check --mesh` says so first.
//!
//! Checked: a policy that selects no workload (its selector, or its namespace); an exact
//! principal that no workload has (a principal pattern of another trust domain too); a
//! namespace that no workload is in; a port (`ports`, `notPorts`, `destination.port`,
//! `portLevelMtls`) that no workload the policy selects serves (the workload's port: its
//! `appPort`, else its inbound port, as the proxies match it).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use palisade_api::policy::{self, AuthorizationPolicy, Loaded, Resource};

use crate::mesh::{Mesh, Workload};

/// A policy field that fits no workload of the mesh.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}: document {document}: {field}: {message}", file.display())]
pub struct Finding {
    pub file: PathBuf,
    pub document: usize,
    pub field: String,
    pub message: String,
}

/// Every finding for `loaded` (as `policy::load_path` returns it) against `mesh`, in file and
/// document order.
pub fn analyze(mesh: &Mesh, loaded: &[Loaded]) -> Vec<Finding> {
    let ctx = Ctx::new(mesh);
    let mut out = Vec::new();
    for l in loaded {
        let mut say = |field: String, message: String| {
            out.push(Finding {
                file: l.file.clone(),
                document: l.index,
                field,
                message,
            })
        };
        match &l.resource {
            Resource::AuthorizationPolicy(p) => {
                let selected =
                    ctx.selected(|w| p.selects(&w.namespace, &w.labels, policy::ROOT_NAMESPACE));
                ctx.selection(&p.metadata, p.spec.selector.as_ref(), &selected, &mut say);
                ctx.principals(p, &mut say);
                ctx.namespaces(p, &mut say);
                if !selected.is_empty() {
                    ctx.ports(p, &selected, &mut say);
                }
            }
            Resource::PeerAuthentication(p) => {
                let selected =
                    ctx.selected(|w| p.selects(&w.namespace, &w.labels, policy::ROOT_NAMESPACE));
                ctx.selection(&p.metadata, p.spec.selector.as_ref(), &selected, &mut say);
                if !selected.is_empty() {
                    let served = ports_of(&selected);
                    for port in p.spec.port_level_mtls.keys() {
                        if !u16::try_from(*port).is_ok_and(|p| served.contains(&p)) {
                            say(
                                format!("spec.portLevelMtls.{port}"),
                                no_port(*port, &served),
                            );
                        }
                    }
                }
            }
            Resource::RateLimitPolicy(p) => {
                let selected = ctx.selected(|w| p.selects(&w.namespace, &w.labels));
                ctx.selection(&p.metadata, p.selector.as_ref(), &selected, &mut say);
            }
            Resource::EgressPolicy(p) => {
                let selected =
                    ctx.selected(|w| p.selects(&w.namespace, &w.labels, policy::ROOT_NAMESPACE));
                ctx.selection(&p.metadata, p.selector.as_ref(), &selected, &mut say);
            }
            // Checked against the mesh when loaded (`traffic::check_local`).
            Resource::Route(_) | Resource::HttpFault(_) => {}
        }
    }
    out
}

struct Ctx<'a> {
    mesh: &'a Mesh,
    /// Every workload identity, without `spiffe://`.
    identities: BTreeSet<String>,
    namespaces: BTreeSet<&'a str>,
}

fn ports_of(ws: &[&Workload]) -> BTreeSet<u16> {
    ws.iter()
        .map(|w| w.app_port.unwrap_or(w.inbound_port))
        .collect()
}

fn no_port(port: impl std::fmt::Display, served: &BTreeSet<u16>) -> String {
    let list: Vec<String> = served.iter().map(u16::to_string).collect();
    format!(
        "no workload this policy selects serves port {port} (their ports: {}; a policy port is the workload's appPort, else its inbound port)",
        list.join(", ")
    )
}

fn labels(l: &BTreeMap<String, String>) -> String {
    let v: Vec<String> = l.iter().map(|(k, v)| format!("{k}={v}")).collect();
    v.join(",")
}

impl<'a> Ctx<'a> {
    fn new(mesh: &'a Mesh) -> Self {
        Ctx {
            mesh,
            identities: mesh
                .workloads
                .iter()
                .filter_map(|w| {
                    let id = w.spiffe_id(mesh).ok()?;
                    Some(id.as_str().trim_start_matches("spiffe://").to_string())
                })
                .collect(),
            namespaces: mesh
                .workloads
                .iter()
                .map(|w| w.namespace.as_str())
                .collect(),
        }
    }

    fn selected(&self, f: impl Fn(&Workload) -> bool) -> Vec<&'a Workload> {
        self.mesh.workloads.iter().filter(|w| f(w)).collect()
    }

    fn selection(
        &self,
        meta: &policy::ObjectMeta,
        selector: Option<&policy::WorkloadSelector>,
        selected: &[&Workload],
        say: &mut impl FnMut(String, String),
    ) {
        if !selected.is_empty() {
            return;
        }
        let ns = meta.namespace();
        match selector {
            Some(s) if ns == policy::ROOT_NAMESPACE => say(
                "spec.selector.matchLabels".into(),
                format!(
                    "no workload of the mesh has the labels {}",
                    labels(&s.match_labels)
                ),
            ),
            Some(s) if self.namespaces.contains(ns) => say(
                "spec.selector.matchLabels".into(),
                format!(
                    "no workload in namespace {ns} has the labels {}",
                    labels(&s.match_labels)
                ),
            ),
            _ => say(
                "metadata.namespace".into(),
                format!(
                    "no workload of the mesh is in namespace {ns}, so the policy applies to nothing"
                ),
            ),
        }
    }

    fn principals(&self, p: &AuthorizationPolicy, say: &mut impl FnMut(String, String)) {
        let td = self.mesh.trust_domain.as_str();
        for (field, pattern) in p.principal_patterns() {
            let bare = pattern.strip_prefix("spiffe://").unwrap_or(pattern);
            if !policy::principal_in_trust_domain(pattern, td) {
                say(
                    field,
                    format!(
                        "{pattern:?} is not in the mesh's trust domain {td}: it matches no workload of this mesh, only callers from that other trust domain"
                    ),
                );
            } else if !bare.contains('*') && !self.identities.contains(bare) {
                say(
                    field,
                    format!("no workload of the mesh has the identity {pattern:?}"),
                );
            }
        }
    }

    fn namespaces(&self, p: &AuthorizationPolicy, say: &mut impl FnMut(String, String)) {
        let mut check = |field: String, ns: &str| {
            if !ns.contains('*') && !self.namespaces.contains(ns) {
                say(
                    field,
                    format!("no workload of the mesh is in namespace {ns:?}"),
                );
            }
        };
        for (i, rule) in p.spec.rules.iter().flatten().enumerate() {
            for (j, from) in rule.from.iter().enumerate() {
                let s = &from.source;
                for (name, values) in [
                    ("namespaces", &s.namespaces),
                    ("notNamespaces", &s.not_namespaces),
                ] {
                    for (k, v) in values.iter().enumerate() {
                        check(format!("spec.rules[{i}].from[{j}].source.{name}[{k}]"), v);
                    }
                }
            }
            for (j, w) in rule.when.iter().enumerate() {
                if w.key != "source.namespace" {
                    continue;
                }
                for (name, values) in [("values", &w.values), ("notValues", &w.not_values)] {
                    for (k, v) in values.iter().enumerate() {
                        check(format!("spec.rules[{i}].when[{j}].{name}[{k}]"), v);
                    }
                }
            }
        }
    }

    fn ports(
        &self,
        p: &AuthorizationPolicy,
        selected: &[&Workload],
        say: &mut impl FnMut(String, String),
    ) {
        let served = ports_of(selected);
        let mut check = |field: String, port: &str| {
            // Validation has already rejected what is not a port; `*` patterns in
            // `destination.port` values are left alone.
            if let Ok(n) = port.parse::<u16>()
                && !served.contains(&n)
            {
                say(field, no_port(n, &served));
            }
        };
        for (i, rule) in p.spec.rules.iter().flatten().enumerate() {
            for (j, to) in rule.to.iter().enumerate() {
                let o = &to.operation;
                for (name, values) in [("ports", &o.ports), ("notPorts", &o.not_ports)] {
                    for (k, v) in values.iter().enumerate() {
                        check(format!("spec.rules[{i}].to[{j}].operation.{name}[{k}]"), v);
                    }
                }
            }
            for (j, w) in rule.when.iter().enumerate() {
                if w.key != "destination.port" {
                    continue;
                }
                for (name, values) in [("values", &w.values), ("notValues", &w.not_values)] {
                    for (k, v) in values.iter().enumerate() {
                        check(format!("spec.rules[{i}].when[{j}].{name}[{k}]"), v);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    const MESH: &str = "trustDomain: cluster.local\nworkloads:
  - { name: db, namespace: demo, labels: { app: db }, appPort: 5432, inboundPort: 1001, adminPort: 1002 }
  - { name: api, namespace: demo, labels: { app: api }, inboundPort: 1003, adminPort: 1004 }
";

    fn findings(policies: &str) -> Vec<String> {
        let mesh = crate::mesh::parse(MESH, Path::new("/m/mesh.yaml")).expect("mesh");
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("p.yaml");
        std::fs::write(&file, policies).expect("write");
        let loaded = policy::load_path(&file).expect("valid policies");
        analyze(&mesh, &loaded)
            .into_iter()
            .map(|f| {
                assert_eq!(f.file, file);
                format!("{}: {}: {}", f.document, f.field, f.message)
            })
            .collect()
    }

    const HEAD: &str = "apiVersion: palisade.dev/v1alpha1\nkind: AuthorizationPolicy\n";

    #[test]
    fn a_policy_that_fits_the_mesh_has_no_findings() {
        let p = format!(
            "{HEAD}metadata: {{ name: db, namespace: demo }}\nspec:\n  selector: {{ matchLabels: {{ app: db }} }}\n  rules:\n    - from: [ {{ source: {{ principals: [\"cluster.local/ns/demo/sa/api\", \"cluster.local/ns/prod/*\"], namespaces: [\"demo\", \"prod-*\"] }} }} ]\n      to: [ {{ operation: {{ ports: [\"5432\"] }} }} ]\n      when: [ {{ key: destination.port, values: [\"5432\"] }} ]\n"
        );
        assert_eq!(findings(&p), Vec::<String>::new());
    }

    #[test]
    fn what_fits_no_workload_is_named_by_document_and_field() {
        let p = format!(
            "{HEAD}metadata: {{ name: ok, namespace: demo }}\nspec: {{ rules: [ {{}} ] }}\n---\n\
             {HEAD}metadata: {{ name: typo, namespace: demo }}\nspec:\n  selector: {{ matchLabels: {{ app: dbx }} }}\n  rules: [ {{}} ]\n---\n\
             {HEAD}metadata: {{ name: nowhere, namespace: prod }}\nspec: {{ rules: [ {{}} ] }}\n---\n\
             {HEAD}metadata: {{ name: db, namespace: demo }}\nspec:\n  selector: {{ matchLabels: {{ app: db }} }}\n  rules:\n    - from: [ {{ source: {{ principals: [\"cluster.local/ns/demo/sa/apii\", \"other.example/ns/demo/sa/api\"], notNamespaces: [\"staging\"] }} }} ]\n      to: [ {{ operation: {{ ports: [\"5432\", \"8080\"], notPorts: [\"1001\"] }} }} ]\n      when: [ {{ key: destination.port, values: [\"9090\"] }}, {{ key: source.namespace, values: [\"qa\"] }} ]\n"
        );
        let got = findings(&p);
        let want = [
            "1: spec.selector.matchLabels: no workload in namespace demo has the labels app=dbx",
            "2: metadata.namespace: no workload of the mesh is in namespace prod, so the policy applies to nothing",
            "3: spec.rules[0].from[0].source.principals[0]: no workload of the mesh has the identity \"cluster.local/ns/demo/sa/apii\"",
            "3: spec.rules[0].from[0].source.principals[1]: \"other.example/ns/demo/sa/api\" is not in the mesh's trust domain cluster.local: it matches no workload of this mesh, only callers from that other trust domain",
            "3: spec.rules[0].from[0].source.notNamespaces[0]: no workload of the mesh is in namespace \"staging\"",
            "3: spec.rules[0].when[1].values[0]: no workload of the mesh is in namespace \"qa\"",
            "3: spec.rules[0].to[0].operation.ports[1]: no workload this policy selects serves port 8080 (their ports: 5432; a policy port is the workload's appPort, else its inbound port)",
            "3: spec.rules[0].to[0].operation.notPorts[0]: no workload this policy selects serves port 1001 (their ports: 5432; a policy port is the workload's appPort, else its inbound port)",
            "3: spec.rules[0].when[0].values[0]: no workload this policy selects serves port 9090 (their ports: 5432; a policy port is the workload's appPort, else its inbound port)",
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn peer_authentications_are_checked_for_selection_and_ports() {
        let p = "apiVersion: palisade.dev/v1alpha1\nkind: PeerAuthentication\nmetadata: { name: api, namespace: demo }\nspec:\n  selector: { matchLabels: { app: api } }\n  portLevelMtls: { \"1003\": { mode: PERMISSIVE }, \"5432\": { mode: DISABLE } }\n---\napiVersion: palisade.dev/v1alpha1\nkind: PeerAuthentication\nmetadata: { name: gone, namespace: palisade-system }\nspec:\n  selector: { matchLabels: { app: gone } }\n";
        assert_eq!(
            findings(p),
            [
                "0: spec.portLevelMtls.5432: no workload this policy selects serves port 5432 (their ports: 1003; a policy port is the workload's appPort, else its inbound port)",
                "1: spec.selector.matchLabels: no workload of the mesh has the labels app=gone",
            ]
        );
    }
}
