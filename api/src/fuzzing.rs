//! Entry point of the policy fuzz target (`fuzz/fuzz_targets/policy_yaml.rs`) and of its
//! corpus replay (`tests/fuzz_corpus.rs`), shared so that they cannot drift apart. Not an
//! API: hidden from the docs.

use std::collections::BTreeMap;
use std::path::Path;

use crate::policy::{self, Resource};

/// A file of the policies directory (`palisade policy check`, the control plane's watcher):
/// parsed, and what was accepted turned into what the control plane sends to proxies.
pub fn policy_yaml(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    let file = Path::new("fuzz.yaml");
    let resources = match policy::parse_str(file, text) {
        Ok(r) => r,
        Err(errors) => {
            assert!(!errors.is_empty(), "refused without a reason");
            for e in &errors {
                assert!(e.to_string().starts_with("fuzz.yaml: document "), "{e}");
            }
            return false;
        }
    };
    assert!(!resources.is_empty(), "{}", policy::NO_DOCUMENTS);
    let faults: BTreeMap<(String, String), policy::HttpFault> = resources
        .iter()
        .filter_map(|r| match r {
            Resource::HttpFault(f) => Some((
                (f.metadata.namespace().to_string(), f.metadata.name.clone()),
                f.clone(),
            )),
            _ => None,
        })
        .collect();
    for r in &resources {
        assert!(!r.metadata().name.is_empty(), "{r:?}");
        // The typed resources the Kubernetes source reads back (as JSON, from the API server)
        // are the ones the file gave: a policy means the same whichever way it arrives.
        let typed = match r {
            Resource::AuthorizationPolicy(p) => {
                let _ = p.principal_patterns();
                let _ = p.foreign_principals("cluster.local");
                Some(serde_json::to_value(p))
            }
            Resource::PeerAuthentication(p) => Some(serde_json::to_value(p)),
            Resource::Route(route) => {
                let _ = policy::route::wire_route(route, &faults);
                None
            }
            Resource::HttpFault(f) => {
                let _ = policy::route::wire_fault(f);
                None
            }
            Resource::RateLimitPolicy(p) => {
                let _ = policy::traffic::wire_rate_limit(p);
                None
            }
            Resource::EgressPolicy(_) => None,
        };
        if let Some(value) = typed {
            let value = value.expect("a parsed policy serializes");
            assert_eq!(
                policy::parse_object("fuzz", &value).as_ref(),
                Ok(r),
                "{value}"
            );
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_round_trips_and_garbage_is_refused() {
        let allow = b"apiVersion: palisade.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: { name: a, namespace: demo }\nspec:\n  rules: [ { from: [ { source: { principals: [cluster.local/ns/demo/sa/web] } } ], to: [ { operation: { ports: [8080] } } ] } ]\n";
        assert!(policy_yaml(allow));
        assert!(!policy_yaml(b"kind: [\n"));
        assert!(!policy_yaml(b"# nothing\n"));
    }
}
