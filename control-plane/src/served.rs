//! What the control plane serves one workload's proxy, as JSON: the body of the status
//! endpoint's `GET /config?workload=NAME`, and what `palisade authz explain` decides from,
//! whether it asks a running control plane (`--live`) or builds the same thing from the files.
//!
//! `inbound` is the served `v1::Inbound` itself, taken from [`Model::proxy_config`]: in
//! proto3's JSON mapping (enum values by name), its authorization policies in the resources'
//! shape. A reader that turns it back into a `v1::ProxyConfig` gets the very config served, and
//! compiling that the way the proxy does decides as the proxy does. The
//! rest is what a person needs around it: the generation, the workload, where each mTLS mode
//! came from, and the identities of the mesh.

use std::collections::BTreeMap;

use palisade_api::policy::{self, AuthorizationPolicy, MtlsMode};
use palisade_api::v1;
use serde::{Deserialize, Serialize};

use crate::model::Model;

/// One workload's served config and its context.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServedConfig {
    /// The model generation the config belongs to (the proxies' config version).
    pub generation: u64,
    /// `palisade_api::config_digest` of the config, as `/status` reports it.
    pub config_digest: u64,
    pub trust_domain: String,
    pub workload: ServedWorkload,
    /// The SPIFFE ID of every workload of the mesh.
    pub identities: Vec<String>,
    pub inbound: InboundJson,
    /// Where `inbound.mode` came from: `PeerAuthentication ns/name`, or `mesh default`.
    pub mtls_source: String,
    /// Where each of `inbound.portModes` came from.
    #[serde(default)]
    pub port_mtls_sources: BTreeMap<u32, String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServedWorkload {
    pub name: String,
    pub namespace: String,
    pub spiffe_id: String,
    #[serde(default)]
    pub app_port: Option<u16>,
    pub inbound_port: u16,
}

impl ServedWorkload {
    /// The workload's port as policies mean it: the app's port, else the inbound port.
    pub fn port(&self) -> u16 {
        self.app_port.unwrap_or(self.inbound_port)
    }
}

/// `v1::Inbound` in proto3's JSON mapping (enum values by name), except its authorization
/// policies: those are shown in the resources' own shape (`palisade_api::authorization`), which
/// a person can read and which converts back to the very `v1::Authorization` served.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InboundJson {
    pub mode: String,
    #[serde(default)]
    pub port_modes: BTreeMap<u32, String>,
    pub default_policy: String,
    #[serde(default)]
    pub authorization_policies: Vec<AuthorizationPolicy>,
    pub app_protocol: String,
    pub path_normalization: String,
}

/// A served config that does not convert, naming the field.
#[derive(Debug, thiserror::Error)]
#[error("served config: {field}: {message}")]
pub struct ServedError {
    pub field: String,
    pub message: String,
}

/// A proto enum value by its name, or its number when this build does not know it.
fn enum_name<E: TryFrom<i32>>(v: i32, name: fn(&E) -> &'static str) -> String {
    E::try_from(v)
        .map(|e| name(&e).to_string())
        .unwrap_or_else(|_| v.to_string())
}

impl InboundJson {
    /// Fails only for a policy with no resource form, which the control plane's own
    /// conversion never produces.
    pub fn from_proto(i: &v1::Inbound) -> Result<Self, ServedError> {
        let mode = |m: i32| enum_name(m, v1::MtlsMode::as_str_name);
        let authorization_policies = i
            .authorization_policies
            .iter()
            .enumerate()
            .map(|(n, a)| {
                AuthorizationPolicy::try_from(a).map_err(|e| ServedError {
                    field: format!("inbound.authorization_policies[{n}].{}", e.field),
                    message: e.message,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(InboundJson {
            mode: mode(i.mode),
            port_modes: i.port_modes.iter().map(|(p, m)| (*p, mode(*m))).collect(),
            default_policy: enum_name(i.default_policy, v1::DefaultPolicy::as_str_name),
            authorization_policies,
            app_protocol: enum_name(i.app_protocol, v1::Protocol::as_str_name),
            path_normalization: enum_name(i.path_normalization, v1::PathNormalization::as_str_name),
        })
    }

    pub fn to_proto(&self) -> Result<v1::Inbound, ServedError> {
        let bad = |field: &str, value: &str| ServedError {
            field: field.to_string(),
            message: format!("unknown value {value:?}"),
        };
        let mode = |field: &str, s: &str| {
            v1::MtlsMode::from_str_name(s)
                .map(|m| m as i32)
                .ok_or_else(|| bad(field, s))
        };
        let mut port_modes = BTreeMap::new();
        for (p, m) in &self.port_modes {
            port_modes.insert(*p, mode(&format!("inbound.portModes.{p}"), m)?);
        }
        let authorization_policies = self
            .authorization_policies
            .iter()
            .enumerate()
            .map(|(n, p)| {
                v1::Authorization::try_from(p).map_err(|e| ServedError {
                    field: format!("inbound.authorizationPolicies[{n}].{}", e.field),
                    message: e.message,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(v1::Inbound {
            mode: mode("inbound.mode", &self.mode)?,
            port_modes,
            default_policy: v1::DefaultPolicy::from_str_name(&self.default_policy)
                .ok_or_else(|| bad("inbound.defaultPolicy", &self.default_policy))?
                as i32,
            authorization_policies,
            app_protocol: v1::Protocol::from_str_name(&self.app_protocol)
                .ok_or_else(|| bad("inbound.appProtocol", &self.app_protocol))?
                as i32,
            path_normalization: v1::PathNormalization::from_str_name(&self.path_normalization)
                .ok_or_else(|| bad("inbound.pathNormalization", &self.path_normalization))?
                as i32,
            // What `authz explain` decides with: rate limits and route labels are not decisions.
            rate_limit: None,
            routes: Vec::new(),
            egress: None,
        })
    }
}

impl ServedConfig {
    /// The `v1::ProxyConfig` this describes, as far as the inbound side goes (no services, no
    /// trust bundle): what the workload's proxy decides with.
    pub fn proxy_config(&self) -> Result<v1::ProxyConfig, ServedError> {
        Ok(v1::ProxyConfig {
            version: self.generation,
            inbound: Some(self.inbound.to_proto()?),
            services: Vec::new(),
            trust_bundle_der: Vec::new(),
        })
    }

    /// Where the mTLS mode for the workload's `port` came from.
    pub fn mtls_source_for(&self, port: u16) -> &str {
        let port = u32::from(port);
        match self.port_mtls_sources.get(&port) {
            Some(s) if self.inbound.port_modes.contains_key(&port) => s,
            _ => &self.mtls_source,
        }
    }
}

impl Model {
    /// What this model serves `workload`'s proxy, or None if the mesh has no such workload (or,
    /// logged, if the config has no JSON form, which the model's own conversion rules out).
    pub fn served_config(&self, workload: &str) -> Option<ServedConfig> {
        let w = self.mesh.workload(workload)?;
        let cfg = self.proxy_config(workload)?;
        let inbound = match InboundJson::from_proto(&cfg.inbound.clone().unwrap_or_default()) {
            Ok(i) => i,
            Err(e) => {
                tracing::error!(workload, error = %e, "cannot show the served config");
                return None;
            }
        };
        let mtls = policy::effective_mtls(&self.peer_authentications, &w.namespace, &w.labels);
        let port_mtls_sources = mtls
            .port_modes
            .iter()
            .filter(|(_, m)| **m != MtlsMode::Unset)
            .map(|(p, _)| (*p, mtls.source_for(*p)))
            .collect();
        Some(ServedConfig {
            generation: self.generation,
            config_digest: palisade_api::config_digest(&cfg),
            trust_domain: self.mesh.trust_domain.as_str().to_string(),
            workload: ServedWorkload {
                name: w.name.clone(),
                namespace: w.namespace.clone(),
                spiffe_id: w
                    .spiffe_id(&self.mesh)
                    .map(|id| id.as_str().to_string())
                    .unwrap_or_default(),
                app_port: w.app_port,
                inbound_port: w.inbound_port,
            },
            identities: self
                .mesh
                .workloads
                .iter()
                .filter_map(|w| Some(w.spiffe_id(&self.mesh).ok()?.as_str().to_string()))
                .collect(),
            inbound,
            mtls_source: match &mtls.source {
                Some(name) => format!("PeerAuthentication {name}"),
                None => "mesh default".to_string(),
            },
            port_mtls_sources,
        })
    }
}

#[cfg(test)]
mod tests {
    use palisade_api::policy::{Resource, parse_str};

    use super::*;

    const MESH: &str = "trustDomain: cluster.local\ndefaultPolicy: deny\npathNormalization: MERGE_SLASHES\nworkloads:
  - { name: db, namespace: demo, labels: { app: db }, appPort: 8080, inboundPort: 1001, adminPort: 1002 }
  - { name: web, namespace: demo, labels: { app: web }, inboundPort: 1003, adminPort: 1004 }
";

    const POLICIES: &str = "apiVersion: palisade.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: db-from-api, namespace: demo }
spec:
  selector: { matchLabels: { app: db } }
  rules: [ { from: [ { source: { principals: [\"cluster.local/ns/demo/sa/api\"] } } ] } ]
---
apiVersion: palisade.dev/v1alpha1
kind: PeerAuthentication
metadata: { name: default, namespace: palisade-system }
spec: { mtls: { mode: STRICT } }
---
apiVersion: palisade.dev/v1alpha1
kind: PeerAuthentication
metadata: { name: db-probes, namespace: demo }
spec:
  selector: { matchLabels: { app: db } }
  portLevelMtls: { \"9090\": { mode: PERMISSIVE } }
";

    fn model() -> Model {
        let dir = std::path::Path::new("/nonexistent");
        let mesh = crate::mesh::parse(MESH, &dir.join("mesh.yaml")).expect("mesh");
        let resources: Vec<Resource> = parse_str(&dir.join("p.yaml"), POLICIES).expect("policies");
        Model::from_parts(mesh, resources, 7)
    }

    #[test]
    fn the_served_config_reads_back_as_the_proxy_config_served() {
        let m = model();
        let s = m.served_config("db").expect("db");
        let served = m.proxy_config("db").expect("db");
        // Through JSON and back: the very config the proxy gets.
        let json = serde_json::to_string(&s).expect("json");
        let back: ServedConfig = serde_json::from_str(&json).expect("reads back");
        assert_eq!(back, s);
        assert_eq!(back.proxy_config().expect("proto"), served);
        assert_eq!(s.config_digest, palisade_api::config_digest(&served));
        assert_eq!(s.generation, 7);
        assert_eq!(s.workload.port(), 8080);
        assert_eq!(s.workload.spiffe_id, "spiffe://cluster.local/ns/demo/sa/db");
        assert_eq!(s.identities.len(), 2);
        assert_eq!(s.inbound.mode, "STRICT");
        assert_eq!(s.inbound.default_policy, "DEFAULT_POLICY_DENY");
        assert_eq!(s.inbound.path_normalization, "MERGE_SLASHES");
        assert_eq!(s.inbound.authorization_policies.len(), 1);
        assert_eq!(s.inbound.app_protocol, "PROTOCOL_DETECT");
        let p = &s.inbound.authorization_policies[0];
        assert_eq!(p.qualified_name(), "demo/db-from-api");
        assert_eq!(
            p.spec.rules.as_ref().expect("rules")[0].from[0]
                .source
                .principals,
            vec!["cluster.local/ns/demo/sa/api"]
        );
        assert_eq!(
            s.mtls_source_for(8080),
            "PeerAuthentication palisade-system/default"
        );
        assert_eq!(s.mtls_source_for(9090), "PeerAuthentication demo/db-probes");
        // web: no policy selects it; the same mesh-wide mode.
        let w = m.served_config("web").expect("web");
        assert!(w.inbound.authorization_policies.is_empty());
        assert_eq!(w.workload.port(), 1003);
        assert!(m.served_config("nope").is_none());
    }

    #[test]
    fn unknown_enum_names_are_errors_naming_the_field() {
        let mut s = model().served_config("db").expect("db");
        s.inbound.mode = "SOMETIMES".into();
        let e = s.proxy_config().expect_err("unknown mode");
        assert_eq!(
            e.to_string(),
            "served config: inbound.mode: unknown value \"SOMETIMES\""
        );
        let mut s = model().served_config("db").expect("db");
        s.inbound.app_protocol = "http".into();
        let e = s.proxy_config().expect_err("a protocol by its file name");
        assert_eq!(e.field, "inbound.appProtocol");
        let mut s = model().served_config("db").expect("db");
        if let Some(rules) = s.inbound.authorization_policies[0].spec.rules.as_mut() {
            rules[0].from[0].source.ip_blocks = vec!["10.*".into()];
        }
        let e = s.proxy_config().expect_err("a bad CIDR");
        assert_eq!(
            e.field,
            "inbound.authorizationPolicies[0].spec.rules[0].from[0].source.ipBlocks[0]"
        );
    }
}
