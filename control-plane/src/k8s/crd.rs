//! The `palisade.dev/v1alpha1` custom resources and their CustomResourceDefinitions, generated
//! from Rust types: `AuthorizationPolicy` and `PeerAuthentication` (authorization and mTLS),
//! `HTTPFault` (fault injection, named by a route rule's `ExtensionRef` filter),
//! `RateLimitPolicy` (local rate limits of the selected workloads' inbound side) and
//! `EgressPolicy` (which hostnames outside the mesh the selected workloads may reach).
//!
//! For the two policy kinds, the spec is the api crate's policy spec type
//! ([`palisade_api::policy::AuthorizationPolicySpec`], [`palisade_api::policy::PeerAuthenticationSpec`]),
//! wrapped here in a serde- and schema-transparent newtype only because kube's
//! `CustomResource` derive has to sit on a type of this crate. The JSON form of a wrapper is
//! exactly the inner type's, and so is its schema: the patterns and rules of
//! `palisade_api::policy::schema`, next to the parser they mirror.
//!
//! `HTTPFault`, `RateLimitPolicy` and `EgressPolicy` are parsed by hand in the api crate
//! (`palisade_api::policy::traffic`, `palisade_api::policy::egress`), with no serde type to
//! derive a schema from: their spec types are written here, field for field what that parser
//! reads, with the same bounds (percentages 0–100, HTTP statuses 200–599, gRPC codes 1–16,
//! 1–1000000 requests per second, principals that can match a caller, egress host patterns)
//! and CEL rules for what needs two fields (a fault needs a delay or an abort, an abort an
//! HTTP or gRPC status, a rate limit some limit). The unit tests below check the documented
//! examples pass and the parser's refusals are the schema's.
//!
//! What the schema cannot say is still refused when the control plane parses the object with
//! the file parser (`palisade_api::policy`); docs/kubernetes.md lists which checks live where.
//!
//! Every kind has a `status` subresource ([`PolicyStatus`]): the condition `Accepted`, for the
//! control plane to say whether it took the object, shown by `kubectl get` as a column.

use std::ops::{Deref, DerefMut};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResource;
use kube::core::crd::v1::CustomResourceExt;
use palisade_api::policy;
use palisade_api::policy::egress;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The API group of Palisade's own resources.
pub const GROUP: &str = "palisade.dev";
/// The one version served (and stored).
pub const VERSION: &str = "v1alpha1";

// The spec of a `palisade.dev/v1alpha1` AuthorizationPolicy: the api crate's type, as is.
/// Who may call the selected workloads: Istio's AuthorizationPolicy, in `palisade.dev`.
#[derive(
    CustomResource, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema,
)]
#[kube(
    group = "palisade.dev",
    version = "v1alpha1",
    kind = "AuthorizationPolicy",
    namespaced,
    status = "PolicyStatus",
    derive = "PartialEq",
    category = "palisade",
    printcolumn(name = "Action", type_ = "string", json_path = ".spec.action"),
    // In JSON: a second `type_ = "string"` is a clippy `duplicated_attributes` false positive.
    printcolumn = r#"{"name": "Accepted", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    doc = "Who may call the selected workloads (Istio's AuthorizationPolicy semantics)."
)]
#[serde(transparent)]
pub struct AuthorizationPolicySpec(pub policy::AuthorizationPolicySpec);

// The spec of a `palisade.dev/v1alpha1` PeerAuthentication: the api crate's type, as is.
/// The mTLS mode of the selected workloads' inbound side: Istio's PeerAuthentication, in
/// `palisade.dev`.
#[derive(
    CustomResource, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema,
)]
#[kube(
    group = "palisade.dev",
    version = "v1alpha1",
    kind = "PeerAuthentication",
    namespaced,
    status = "PolicyStatus",
    derive = "PartialEq",
    category = "palisade",
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.mtls.mode"),
    // In JSON: a second `type_ = "string"` is a clippy `duplicated_attributes` false positive.
    printcolumn = r#"{"name": "Accepted", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    doc = "The mTLS mode of the selected workloads' inbound traffic (Istio's PeerAuthentication)."
)]
#[serde(transparent)]
pub struct PeerAuthenticationSpec(pub policy::PeerAuthenticationSpec);

// The spec of a `palisade.dev/v1alpha1` HTTPFault, field for field what
// `palisade_api::policy::traffic::parse_fault` reads.
/// Delays and/or aborts a share of the requests of the route rules that name it (an
/// `ExtensionRef` filter: group `palisade.dev`, kind `HTTPFault`, the name; same namespace).
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "palisade.dev",
    version = "v1alpha1",
    kind = "HTTPFault",
    root = "HttpFault",
    plural = "httpfaults",
    namespaced,
    status = "PolicyStatus",
    derive = "PartialEq",
    category = "palisade",
    // In JSON: several `type_ = "string"` are a clippy `duplicated_attributes` false positive.
    printcolumn = r#"{"name": "Delay", "type": "string", "jsonPath": ".spec.delay.fixedDelay"}"#,
    printcolumn = r#"{"name": "Abort", "type": "integer", "jsonPath": ".spec.abort.httpStatus"}"#,
    printcolumn = r#"{"name": "Accepted", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#,
    doc = "Fault injection (delay, abort) for the route rules whose ExtensionRef filter names it."
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(transform = fault_spec)]
pub struct HttpFaultSpec {
    /// Wait before the request goes on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    /// Answer instead of calling the backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

/// Delays a share of the requests.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultDelay {
    /// How long, as a Gateway API duration (`100ms`, `2s`, `1m30s`); at most 60s.
    #[schemars(regex(pattern = GATEWAY_DURATION))]
    pub fixed_delay: String,
    /// Of the rule's requests, 0–100 (fractions allowed); absent: 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub percentage: Option<f64>,
}

/// Aborts a share of the requests with a status.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(transform = fault_abort)]
pub struct FaultAbort {
    /// The HTTP status answered, 200–599 (a gRPC request gets it mapped to a gRPC code unless
    /// `grpcStatus` is set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 200, max = 599))]
    pub http_status: Option<u16>,
    /// The gRPC status code answered to gRPC requests, 1–16.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 16))]
    pub grpc_status: Option<u8>,
    /// Of the rule's requests, 0–100 (fractions allowed); absent: 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub percentage: Option<f64>,
}

// The spec of a `palisade.dev/v1alpha1` RateLimitPolicy, field for field what
// `palisade_api::policy::traffic::parse_rate_limit` reads.
/// Local rate limits enforced by the inbound proxy of the selected workloads (Linkerd's
/// HTTPLocalRateLimitPolicy, with a selector): over a limit it answers 429 with `Retry-After`.
#[derive(
    CustomResource, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema,
)]
#[kube(
    group = "palisade.dev",
    version = "v1alpha1",
    kind = "RateLimitPolicy",
    plural = "ratelimitpolicies",
    namespaced,
    status = "PolicyStatus",
    derive = "PartialEq",
    category = "palisade",
    printcolumn = r#"{"name": "Total", "type": "integer", "jsonPath": ".spec.total.requestsPerSecond"}"#,
    printcolumn = r#"{"name": "Identity", "type": "integer", "jsonPath": ".spec.identity.requestsPerSecond"}"#,
    printcolumn = r#"{"name": "Accepted", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#,
    doc = "Local rate limits of the selected workloads' inbound side (429 with Retry-After over a limit)."
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(transform = rate_limit_spec)]
pub struct RateLimitPolicySpec {
    /// Absent: every workload of the namespace. The first policy (by name) that selects a
    /// workload is its limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<policy::WorkloadSelector>,
    /// All callers together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<RateLimit>,
    /// Each caller identity on its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<RateLimit>,
    /// Per-identity limits for the named callers, instead of `identity`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<RateLimitOverride>,
}

/// A number of requests per second.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimit {
    /// 1–1000000.
    #[schemars(range(min = 1, max = 1_000_000))]
    pub requests_per_second: u32,
}

/// A per-identity limit for some callers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitOverride {
    /// 1–1000000, for each of the callers named.
    #[schemars(range(min = 1, max = 1_000_000))]
    pub requests_per_second: u32,
    /// The callers: SPIFFE IDs (`spiffe://` optional), or `prefix*`, `*suffix`, `*` patterns.
    #[schemars(length(min = 1), inner(pattern(policy::schema::PRINCIPAL), length(max = policy::schema::MAX_ID_PATTERN_LEN)))]
    pub principals: Vec<String>,
}

/// A Gateway API duration (GEP-2257), as `palisade_api::policy::route::parse_gateway_duration`
/// reads it: 1–4 groups of 1–5 digits and a unit.
pub const GATEWAY_DURATION: &str = "^([0-9]{1,5}(h|m|s|ms)){1,4}$";

/// One `x-kubernetes-validations` rule (CEL, run by the API server).
fn cel(rule: &str, message: &str) -> Value {
    serde_json::json!({ "rule": rule, "message": message })
}

/// An HTTPFault does something: a delay, an abort or both (the parser's rule).
fn fault_spec(schema: &mut schemars::Schema) {
    schema.insert(
        "x-kubernetes-validations".into(),
        serde_json::json!([cel(
            "has(self.delay) || has(self.abort)",
            "an HTTPFault needs a delay, an abort or both"
        )]),
    );
}

/// An abort answers something: an HTTP status, a gRPC status or both.
fn fault_abort(schema: &mut schemars::Schema) {
    schema.insert(
        "x-kubernetes-validations".into(),
        serde_json::json!([cel(
            "has(self.httpStatus) || has(self.grpcStatus)",
            "an abort needs httpStatus, grpcStatus or both"
        )]),
    );
}

/// A RateLimitPolicy limits something: total, identity or overrides.
fn rate_limit_spec(schema: &mut schemars::Schema) {
    schema.insert(
        "x-kubernetes-validations".into(),
        serde_json::json!([cel(
            "has(self.total) || has(self.identity) || (has(self.overrides) && size(self.overrides) > 0)",
            "a RateLimitPolicy needs total, identity or overrides"
        )]),
    );
}

// The spec of a `palisade.dev/v1alpha1` EgressPolicy, field for field what
// `palisade_api::policy::egress::parse` reads.
/// Which destinations outside the mesh (names no mesh service matches, resolved with DNS) the
/// selected workloads' apps may reach, by hostname: the first rule with a matching host
/// decides, else `defaultAction`.
#[derive(
    CustomResource, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema,
)]
#[kube(
    group = "palisade.dev",
    version = "v1alpha1",
    kind = "EgressPolicy",
    plural = "egresspolicies",
    namespaced,
    status = "PolicyStatus",
    derive = "PartialEq",
    category = "palisade",
    printcolumn = r#"{"name": "Default", "type": "string", "jsonPath": ".spec.defaultAction"}"#,
    printcolumn = r#"{"name": "Accepted", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#,
    doc = "Which hostnames outside the mesh the selected workloads may reach (egress, by DNS name)."
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressPolicySpec {
    /// Absent: every workload of the namespace (in `palisade-system`: of the mesh). A
    /// workload gets the first policy (by name) of its own namespace that selects it, else the
    /// first of `palisade-system`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<policy::WorkloadSelector>,
    /// What a hostname no rule matches gets, and a connection that names no hostname: ALLOW
    /// (the default) or DENY.
    #[serde(default)]
    pub default_action: EgressAction,
    /// In order: the first rule with a matching host decides.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<EgressRule>,
}

/// Allow or deny the connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum EgressAction {
    #[default]
    Allow,
    Deny,
}

/// What connections to some hostnames get.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressRule {
    /// Required: a rule that forgot it must not silently allow (or deny).
    pub action: EgressAction,
    /// Exact lower-case DNS names without the trailing dot (`api.github.com`), `*.suffix`
    /// (any name under `suffix`, not `suffix` itself) or `*` (any name); no IP addresses.
    #[schemars(
        length(min = 1),
        inner(regex(pattern = EGRESS_HOST), length(max = MAX_EGRESS_HOST_PATTERN_LEN)),
        transform = egress_hosts
    )]
    pub hosts: Vec<String>,
}

/// An egress host pattern's shape, as `palisade_api::policy::egress::host_pattern_problem`
/// reads it: `*`, or a name of labels of 1–63 of `a-z 0-9 - _` (no `-` first or last), joined
/// by dots, optionally after `*.`. The rest of that function's rules are in `egress_hosts`.
pub const EGRESS_HOST: &str = r"^(?:\*|(?:\*\.)?[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)*)$";

/// `*.` and the longest name.
const MAX_EGRESS_HOST_PATTERN_LEN: usize = egress::MAX_HOST_LEN + 2;

/// What [`EGRESS_HOST`] cannot say alone (a schema has one `pattern`): the last label is not
/// all digits (which also keeps IPv4 addresses out; IPv6 ones have a `:`), and a name without
/// `*.` is at most [`egress::MAX_HOST_LEN`] long.
fn egress_hosts(schema: &mut schemars::Schema) {
    if let Some(Value::Object(item)) = schema.get_mut("items") {
        item.insert(
            "allOf".into(),
            serde_json::json!([{ "pattern": r"[^.0-9][^.]*$" }]),
        );
        item.insert(
            "anyOf".into(),
            serde_json::json!([
                { "pattern": r"^\*\." },
                { "maxLength": egress::MAX_HOST_LEN },
            ]),
        );
    }
}

// The status subresource of every kind. Only the control plane writes it (`patch` on
// `<plural>/status`, in its ClusterRole); a user's `kubectl apply` of the object cannot set it.
// The doc comments below are what `kubectl explain` shows.
/// What the control plane made of the object; written by the control plane only.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    /// `Accepted` (`True`: in force; `False`: refused, `reason` and `message` say why), as
    /// Kubernetes conditions: one per `type`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<PolicyCondition>,
}

/// The condition type the control plane reports.
pub const CONDITION_ACCEPTED: &str = "Accepted";

// The fields `metav1.Condition` requires besides `type` and `status` are optional here, so
// that a partial status patch stays valid.
/// One condition, as Kubernetes conditions are.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyCondition {
    /// `Accepted`.
    #[serde(rename = "type")]
    #[schemars(length(min = 1, max = 316))]
    pub type_: String,
    pub status: ConditionStatus,
    /// Why, in one CamelCase word, for programs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub reason: Option<String>,
    /// For people: what is wrong with the object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32768))]
    pub message: Option<String>,
    /// The `metadata.generation` the condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub observed_generation: Option<i64>,
    /// RFC 3339: when `status` last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"))]
    pub last_transition_time: Option<String>,
}

/// A condition's status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ConditionStatus {
    True,
    False,
    #[default]
    Unknown,
}

macro_rules! wrapper {
    ($outer:ty, $inner:ty) => {
        impl Deref for $outer {
            type Target = $inner;
            fn deref(&self) -> &$inner {
                &self.0
            }
        }
        impl DerefMut for $outer {
            fn deref_mut(&mut self) -> &mut $inner {
                &mut self.0
            }
        }
        impl From<$inner> for $outer {
            fn from(inner: $inner) -> Self {
                Self(inner)
            }
        }
    };
}
wrapper!(AuthorizationPolicySpec, policy::AuthorizationPolicySpec);
wrapper!(PeerAuthenticationSpec, policy::PeerAuthenticationSpec);

/// Every CRD, in the order `palisade install` prints them.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        finish(AuthorizationPolicy::crd()),
        finish(PeerAuthentication::crd()),
        finish(HttpFault::crd()),
        finish(RateLimitPolicy::crd()),
        finish(EgressPolicy::crd()),
    ]
}

/// Where a `rules[].when[]` item's schema is in the AuthorizationPolicy schema.
const WHEN_ITEM: &str = "/properties/spec/properties/rules/items/properties/when/items";

/// What the derive leaves to do.
fn finish(mut crd: CustomResourceDefinition) -> CustomResourceDefinition {
    let kind = crd.spec.names.kind.clone();
    for version in &mut crd.spec.versions {
        if let Some(schema) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        {
            // `nullable` (which kube adds to every Option) makes the API server store an
            // explicit null, which the parser refuses (`selector: null` is "not a mapping").
            // Without it, the API server drops nulls, as if the field were absent.
            let mut value = serde_json::to_value(&*schema).unwrap_or(Value::Null);
            strip_nullable(&mut value);
            // The derive titles the schema with the Rust type's name (`HttpFault`): what
            // `kubectl explain` shows is the kind.
            if let Some(map) = value.as_object_mut() {
                map.insert("title".into(), Value::String(kind.clone()));
            }
            if let Some(when) = value.pointer_mut(WHEN_ITEM)
                && let Some(when) = when.as_object_mut()
            {
                when.insert("anyOf".into(), policy::schema::condition_values_any_of());
            }
            if let Ok(s) = serde_json::from_value(value) {
                *schema = s;
            }
        }
    }
    crd
}

fn strip_nullable(v: &mut Value) {
    match v {
        Value::Object(map) => {
            map.remove("nullable");
            map.values_mut().for_each(strip_nullable);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_nullable),
        _ => {}
    }
}

/// The schemas of the hand-parsed kinds (traffic, egress) against the parser that reads them,
/// with the same independent validators as `tests/crd_schema.rs` (the `jsonschema` crate for
/// the OpenAPI part with the API server's strict field validation, kube's CEL evaluator for
/// the rules).
#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema_of(kind: &str) -> Value {
        let crd = crds()
            .into_iter()
            .find(|c| c.spec.names.kind == kind)
            .unwrap_or_else(|| panic!("no CRD for {kind}"));
        let crd = serde_json::to_value(crd).expect("CRD as JSON");
        crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
    }

    /// Unknown fields are errors at every level below the root, as with `kubectl apply`'s
    /// strict field validation (a structural schema cannot say it itself).
    fn strict(schema: &mut Value, root: bool) {
        let Some(map) = schema.as_object_mut() else {
            return;
        };
        if map.contains_key("properties") && !root {
            map.insert("additionalProperties".into(), json!(false));
        }
        if let Some(Value::Object(props)) = map.get_mut("properties") {
            props.values_mut().for_each(|p| strict(p, false));
        }
        if let Some(items) = map.get_mut("items") {
            strict(items, false);
        }
    }

    /// What the API server would answer for this spec (OpenAPI, then CEL).
    fn schema_errors(kind: &str, spec: &Value) -> Vec<String> {
        let raw = schema_of(kind);
        let mut strict_schema = raw.clone();
        strict(&mut strict_schema, true);
        let validator = jsonschema::draft4::new(&strict_schema).expect("a valid JSON schema");
        let object = json!({ "spec": spec });
        let mut errors: Vec<String> = validator
            .iter_errors(&object)
            .map(|e| format!("{}: {e}", e.instance_path()))
            .collect();
        if errors.is_empty()
            && let Err(cel) = kube_cel::validate(&raw, &object, None)
        {
            errors.extend(cel.into_vec().into_iter().map(|e| format!("{e:?}")));
        }
        errors
    }

    fn parser_errors(kind: &str, spec: &Value) -> Vec<String> {
        let doc = json!({
            "apiVersion": "palisade.dev/v1alpha1", "kind": kind,
            "metadata": { "name": "x", "namespace": "demo" }, "spec": spec,
        });
        match policy::parse_object("test", &doc) {
            Ok(_) => Vec::new(),
            Err(errors) => errors.iter().map(ToString::to_string).collect(),
        }
    }

    fn yaml(text: &str) -> Value {
        serde_saphyr::from_str(text).unwrap_or_else(|e| panic!("bad test YAML {text}: {e}"))
    }

    #[test]
    fn the_documented_traffic_resources_are_accepted_by_both() {
        let cases: &[(&str, &str)] = &[
            // SPEC.md's examples.
            (
                "HTTPFault",
                "{delay: {fixedDelay: 100ms, percentage: 50}, abort: {httpStatus: 503, percentage: 10}}",
            ),
            ("HTTPFault", "{abort: {httpStatus: 503, grpcStatus: 14}}"),
            ("HTTPFault", "{abort: {grpcStatus: 16}}"),
            ("HTTPFault", "{delay: {fixedDelay: 1m, percentage: 0.5}}"),
            (
                "RateLimitPolicy",
                "{selector: {matchLabels: {app: api}}, total: {requestsPerSecond: 100}, \
                 identity: {requestsPerSecond: 10}, overrides: [{requestsPerSecond: 50, \
                 principals: [cluster.local/ns/demo/sa/web, 'spiffe://cluster.local/ns/ops/*']}]}",
            ),
            ("RateLimitPolicy", "{identity: {requestsPerSecond: 1}}"),
            (
                "RateLimitPolicy",
                "{overrides: [{requestsPerSecond: 1000000, principals: ['*']}]}",
            ),
            // docs/routing.md's example.
            (
                "EgressPolicy",
                "{selector: {matchLabels: {app: web}}, defaultAction: DENY, rules: [\
                 {action: ALLOW, hosts: [ok.example.com]}, \
                 {action: DENY, hosts: ['*.example.com']}, \
                 {action: ALLOW, hosts: [api.github.com, '*.googleapis.com']}]}",
            ),
            ("EgressPolicy", "{}"),
            ("EgressPolicy", "{defaultAction: ALLOW, rules: []}"),
            (
                "EgressPolicy",
                "{rules: [{action: DENY, hosts: ['*']}, {action: ALLOW, hosts: [localhost]}]}",
            ),
        ];
        for (kind, spec) in cases {
            let spec = yaml(spec);
            let by_parser = parser_errors(kind, &spec);
            assert!(
                by_parser.is_empty(),
                "{kind}: the parser refuses {spec}: {by_parser:?}"
            );
            let by_schema = schema_errors(kind, &spec);
            assert!(
                by_schema.is_empty(),
                "{kind}: the schema refuses {spec}: {by_schema:?}"
            );
        }
    }

    /// What the parser refuses, the API server refuses at `kubectl apply`, except what the
    /// schema cannot say (listed in docs/kubernetes.md).
    #[test]
    fn bad_traffic_resources_are_refused_by_the_schema_as_by_the_parser() {
        let cases: &[(&str, &str, &str)] = &[
            ("HTTPFault", "no delay nor abort", "{}"),
            (
                "HTTPFault",
                "delay without fixedDelay",
                "{delay: {percentage: 50}}",
            ),
            (
                "HTTPFault",
                "not a duration",
                "{delay: {fixedDelay: '100 ms'}}",
            ),
            ("HTTPFault", "a Go duration", "{delay: {fixedDelay: 0.5s}}"),
            (
                "HTTPFault",
                "percentage over 100",
                "{delay: {fixedDelay: 1s, percentage: 101}}",
            ),
            (
                "HTTPFault",
                "negative percentage",
                "{abort: {httpStatus: 503, percentage: -1}}",
            ),
            (
                "HTTPFault",
                "HTTP status too high",
                "{abort: {httpStatus: 600}}",
            ),
            (
                "HTTPFault",
                "HTTP status too low",
                "{abort: {httpStatus: 199}}",
            ),
            (
                "HTTPFault",
                "HTTP status as a string",
                "{abort: {httpStatus: '503'}}",
            ),
            (
                "HTTPFault",
                "gRPC OK is no abort",
                "{abort: {grpcStatus: 0}}",
            ),
            (
                "HTTPFault",
                "gRPC status too high",
                "{abort: {grpcStatus: 17}}",
            ),
            (
                "HTTPFault",
                "abort without a status",
                "{abort: {percentage: 10}}",
            ),
            (
                "HTTPFault",
                "unknown spec field",
                "{abort: {httpStatus: 503}, retry: {}}",
            ),
            (
                "HTTPFault",
                "unknown delay field",
                "{delay: {fixedDelay: 1s, jitter: 1s}}",
            ),
            ("RateLimitPolicy", "no limit", "{}"),
            (
                "RateLimitPolicy",
                "a selector alone",
                "{selector: {matchLabels: {app: api}}}",
            ),
            ("RateLimitPolicy", "no overrides", "{overrides: []}"),
            (
                "RateLimitPolicy",
                "zero per second",
                "{total: {requestsPerSecond: 0}}",
            ),
            (
                "RateLimitPolicy",
                "too many per second",
                "{identity: {requestsPerSecond: 1000001}}",
            ),
            ("RateLimitPolicy", "a limit without its rate", "{total: {}}"),
            (
                "RateLimitPolicy",
                "unknown limit field",
                "{total: {requestsPerSecond: 10, burst: 5}}",
            ),
            (
                "RateLimitPolicy",
                "unknown selector field",
                "{total: {requestsPerSecond: 1}, selector: {labels: {}}}",
            ),
            (
                "RateLimitPolicy",
                "an override for nobody",
                "{overrides: [{requestsPerSecond: 5}]}",
            ),
            (
                "RateLimitPolicy",
                "an override for no one",
                "{overrides: [{requestsPerSecond: 5, principals: []}]}",
            ),
            (
                "RateLimitPolicy",
                "a principal that matches no caller",
                "{overrides: [{requestsPerSecond: 5, principals: ['not a principal']}]}",
            ),
            ("EgressPolicy", "lower-case action", "{defaultAction: deny}"),
            ("EgressPolicy", "unknown action", "{defaultAction: AUDIT}"),
            (
                "EgressPolicy",
                "a rule without its action",
                "{rules: [{hosts: [a.example.com]}]}",
            ),
            (
                "EgressPolicy",
                "a rule without hosts",
                "{rules: [{action: ALLOW}]}",
            ),
            (
                "EgressPolicy",
                "a rule for no host",
                "{rules: [{action: ALLOW, hosts: []}]}",
            ),
            (
                "EgressPolicy",
                "hosts not a list",
                "{rules: [{action: ALLOW, hosts: a.example.com}]}",
            ),
            (
                "EgressPolicy",
                "a host as a number",
                "{rules: [{action: ALLOW, hosts: [7]}]}",
            ),
            (
                "EgressPolicy",
                "an upper-case host",
                "{rules: [{action: ALLOW, hosts: [API.github.com]}]}",
            ),
            (
                "EgressPolicy",
                "unknown rule field",
                "{rules: [{action: ALLOW, hosts: [a.test], ports: [443]}]}",
            ),
            ("EgressPolicy", "unknown spec field", "{egress: []}"),
            (
                "EgressPolicy",
                "unknown selector field",
                "{selector: {labels: {app: web}}}",
            ),
        ];
        for (kind, what, spec) in cases {
            let spec = yaml(spec);
            let by_parser = parser_errors(kind, &spec);
            assert!(
                !by_parser.is_empty(),
                "{kind}: {what}: the parser accepts {spec}"
            );
            let by_schema = schema_errors(kind, &spec);
            assert!(
                !by_schema.is_empty(),
                "{kind}: {what}: the schema accepts {spec}, the parser says {by_parser:?}"
            );
        }
        // What only the parser can tell: a delay longer than a minute.
        let long = yaml("{delay: {fixedDelay: 61s}}");
        assert!(!parser_errors("HTTPFault", &long).is_empty());
        assert!(schema_errors("HTTPFault", &long).is_empty());
    }

    /// Each host pattern, good or bad, is refused by the schema exactly when the parser
    /// refuses it: nothing the parser takes is kept out of the cluster, nothing it refuses
    /// gets in.
    #[test]
    fn every_egress_host_agrees_with_the_parser() {
        let long_label = "a".repeat(63);
        let too_long_label = "a".repeat(64);
        // 253 and 254 characters: the longest name, and one more.
        let longest = format!(
            "{}.{}.{}.{}",
            long_label,
            long_label,
            long_label,
            "a".repeat(61)
        );
        let too_long = format!("{longest}a");
        assert_eq!((longest.len(), too_long.len()), (253, 254));
        let hosts: Vec<String> = [
            "*",
            "api.github.com",
            "*.example.com",
            "*.com",
            "localhost",
            "a",
            "_",
            "_dmarc.example.com",
            "a-b.c_d.example",
            "xn--bcher-kva.example",
            "1a.2b",
            "0x1.com",
            "a.1b",
            "123.example.com",
            "",
            "API.github.com",
            "Example",
            "example.com.",
            "*.example.com.",
            ".",
            "10.0.0.1",
            "01.02.03.04",
            "1.2.3.4.5",
            "host.123",
            "*.123",
            "123",
            "::1",
            "2001:db8::1",
            "[::1]",
            "*example.com",
            "api.*.com",
            "*.*.com",
            "*.*",
            "**",
            "*.",
            "a..b",
            ".a.b",
            "-a.b",
            "a-.b",
            "a.b-",
            "a b.c",
            "a/b",
            "a:443",
            "é.example",
            "bücher.example",
        ]
        .into_iter()
        .map(String::from)
        .chain([
            format!("{long_label}.test"),
            format!("{too_long_label}.test"),
            format!("*.{long_label}"),
            format!("*.{too_long_label}"),
            longest.clone(),
            too_long.clone(),
            format!("*.{longest}"),
            format!("*.{too_long}"),
        ])
        .collect();
        let mut refused = 0;
        for host in &hosts {
            let spec = json!({ "rules": [ { "action": "ALLOW", "hosts": ["ok.test", host] } ] });
            let by_parser = parser_errors("EgressPolicy", &spec);
            let by_schema = schema_errors("EgressPolicy", &spec);
            assert_eq!(
                by_parser.is_empty(),
                by_schema.is_empty(),
                "{host:?} ({} chars): parser {by_parser:?}, schema {by_schema:?}",
                host.len()
            );
            assert_eq!(
                by_parser.is_empty(),
                egress::host_pattern_problem(host).is_none(),
                "{host:?}"
            );
            refused += usize::from(!by_parser.is_empty());
        }
        assert!(
            refused > 25 && hosts.len() - refused > 15,
            "{refused} of {} refused",
            hosts.len()
        );
    }
}
