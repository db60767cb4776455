//! Gateway API `HTTPRoute` and `GRPCRoute` (`gateway.networking.k8s.io/v1`) as the Kubernetes
//! source reads them: a mesh route is one with a Service among its `parentRefs` (GAMMA);
//! routes attached only to Gateways belong to a gateway controller and are left alone (never
//! parsed, never refused, no Event).
//!
//! Each mesh route is parsed alone by the policy files' parser
//! ([`palisade_api::policy::parse_object`]), so a route means the same on a cluster as in a
//! policies directory and a bad one is refused with the same errors, naming the field. A
//! refused route is handled like a refused policy (log line, metric, Warning Event; see
//! [`super::source`]); an accepted one goes into the model, which attaches it to its parent
//! Service's config. The shared parser refuses what Palisade does not implement, among them
//! consumer routes (a route in another namespace than its parent Service).
//!
//! A route may name Gateways next to its Service parents (Istio and GAMMA allow it): the
//! Gateway parents are a gateway controller's business, so they are taken out before the
//! route is parsed ([`keep_service_parents`]), and the errors of the parents that remain are
//! put back on the indices the user wrote ([`original_field`]).

use serde_json::{Map, Value};

pub const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
pub const GATEWAY_VERSION: &str = "v1";

/// A parent that is a Service: group `""` (or `core`) and kind `Service`. Gateway API's
/// default parent kind is Gateway, so a parent without a kind is not one.
fn is_service_parent(p: &Map<String, Value>) -> bool {
    let group = p.get("group").and_then(Value::as_str).unwrap_or("");
    let kind = p.get("kind").and_then(Value::as_str).unwrap_or("Gateway");
    (group.is_empty() || group == "core") && kind == "Service"
}

/// Whether `obj` is a mesh route (a Service among its parents): only those are parsed and
/// served. Anything not shaped like a route at all is not ours either: judging it would put
/// Warning Events on objects that belong to a gateway controller.
pub fn is_mesh_route(obj: &Value) -> bool {
    obj.pointer("/spec/parentRefs")
        .and_then(Value::as_array)
        .is_some_and(|refs| {
            refs.iter()
                .filter_map(Value::as_object)
                .any(is_service_parent)
        })
}

/// Takes the parents that are not Services out of the route object `obj` (as the API server
/// serves it) and returns, for each parent kept, its index in the object as written.
pub fn keep_service_parents(obj: &mut Value) -> Vec<usize> {
    let Some(refs) = obj
        .pointer_mut("/spec/parentRefs")
        .and_then(Value::as_array_mut)
    else {
        return Vec::new();
    };
    let kept: Vec<usize> = refs
        .iter()
        .enumerate()
        .filter(|(_, p)| p.as_object().is_some_and(is_service_parent))
        .map(|(i, _)| i)
        .collect();
    let mut i = 0;
    refs.retain(|_| {
        let keep = kept.contains(&i);
        i += 1;
        keep
    });
    kept
}

/// An error's field in the route as the user wrote it: `spec.parentRefs[k]…` of the parsed
/// route is `spec.parentRefs[kept[k]]…` of the object ([`keep_service_parents`]).
pub fn original_field(field: &str, kept: &[usize]) -> String {
    const PREFIX: &str = "spec.parentRefs[";
    let Some(rest) = field.strip_prefix(PREFIX) else {
        return field.to_string();
    };
    let Some((index, tail)) = rest.split_once(']') else {
        return field.to_string();
    };
    match index.parse::<usize>().ok().and_then(|k| kept.get(k)) {
        Some(original) => format!("{PREFIX}{original}]{tail}"),
        None => field.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn route(spec: Value) -> Value {
        json!({ "metadata": { "name": "r", "namespace": "demo" }, "spec": spec })
    }

    #[test]
    fn only_routes_with_a_service_parent_are_the_mesh_s() {
        let gw = route(json!({ "parentRefs": [ { "name": "public-gateway" } ], "rules": [] }));
        assert!(!is_mesh_route(&gw));
        let gw_group = route(json!({ "parentRefs": [
            { "group": "gateway.networking.k8s.io", "kind": "Service", "name": "api" } ] }));
        assert!(!is_mesh_route(&gw_group));
        let mesh =
            route(json!({ "parentRefs": [ { "kind": "Service", "group": "", "name": "api" } ] }));
        assert!(is_mesh_route(&mesh));
        let core = route(json!({ "parentRefs": [ { "name": "public-gateway" },
            { "kind": "Service", "group": "core", "name": "api" } ] }));
        assert!(is_mesh_route(&core));
        assert!(!is_mesh_route(&json!({ "spec": "not a route" })));
    }

    #[test]
    fn gateway_parents_are_taken_out_and_errors_keep_the_written_index() {
        let mut r = route(json!({ "parentRefs": [
            { "name": "public-gateway" },
            { "group": "", "kind": "Service", "name": "api", "sectionName": "http" },
            { "group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "internal" },
            { "group": "", "kind": "Service", "name": "api-v2" } ] }));
        let kept = keep_service_parents(&mut r);
        assert_eq!(kept, [1, 3]);
        let names: Vec<&str> = r["spec"]["parentRefs"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p["name"].as_str())
            .collect();
        assert_eq!(names, ["api", "api-v2"]);
        assert_eq!(
            original_field("spec.parentRefs[0].sectionName", &kept),
            "spec.parentRefs[1].sectionName"
        );
        assert_eq!(
            original_field("spec.parentRefs[1]", &kept),
            "spec.parentRefs[3]"
        );
        assert_eq!(
            original_field("spec.rules[0].matches", &kept),
            "spec.rules[0].matches"
        );
        assert_eq!(original_field("spec.parentRefs", &kept), "spec.parentRefs");
    }
}
