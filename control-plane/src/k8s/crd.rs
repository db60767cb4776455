//! The `palisade.dev/v1alpha1` custom resources, `AuthorizationPolicy` and
//! `PeerAuthentication`, and their CustomResourceDefinitions, generated from the Rust types.
//!
//! One source of truth: the spec of each resource is the api crate's policy spec type
//! ([`palisade_api::policy::AuthorizationPolicySpec`], [`palisade_api::policy::PeerAuthenticationSpec`]),
//! wrapped here in a serde- and schema-transparent newtype only because kube's
//! `CustomResource` derive has to sit on a type of this crate. The JSON form of a wrapper is
//! exactly the inner type's, and so is its schema: the patterns and rules of
//! `palisade_api::policy::schema`, next to the parser they mirror.
//!
//! What the schema cannot say is still refused when the control plane parses the object with
//! the file parser (`palisade_api::policy`); docs/kubernetes.md lists which checks live where.
//!
//! Both kinds have a `status` subresource ([`PolicyStatus`]): the condition `Accepted`, for the
//! control plane to say whether it took the object, shown by `kubectl get` as a column.

use std::ops::{Deref, DerefMut};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResource;
use kube::core::crd::v1::CustomResourceExt;
use palisade_api::policy;
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

// The status subresource of both kinds. Only the control plane writes it (`patch` on
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

/// Both CRDs, in the order `palisade install` prints them.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        finish(AuthorizationPolicy::crd()),
        finish(PeerAuthentication::crd()),
    ]
}

/// Where a `rules[].when[]` item's schema is in the AuthorizationPolicy schema.
const WHEN_ITEM: &str = "/properties/spec/properties/rules/items/properties/when/items";

/// What the derive leaves to do.
fn finish(mut crd: CustomResourceDefinition) -> CustomResourceDefinition {
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
