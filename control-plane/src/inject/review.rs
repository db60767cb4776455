//! `admission.k8s.io/v1` AdmissionReview in, AdmissionReview out: what the webhook answers the
//! API server and `palisade inject --admission-review` prints.
//!
//! The request is read with kube's admission types (the real wire format); the response is
//! written here because kube 5's `AdmissionResponse` encodes its patch as an array of numbers
//! (kube-rs/kube#1781), while the API's `patch` is `[]byte`, which Kubernetes' JSON encoding
//! writes as a base64 string.

use std::collections::BTreeMap;

use base64::Engine;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Status;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionReview, Operation};
use serde::{Deserialize, Serialize};

use super::{InjectConfig, Outcome, PodNamespace, inject};

pub const API_VERSION: &str = "admission.k8s.io/v1";
pub const KIND: &str = "AdmissionReview";

/// The labels of the namespaces pods are created in. The webhook needs them for the rule
/// "namespace label `palisade.dev/inject=enabled`", and an AdmissionReview does not carry them.
pub trait NamespaceLabels: Send + Sync {
    /// The labels of namespace `name`, or `None` when it is not known (yet): the webhook then
    /// fails the call, and the API server's `failurePolicy` decides.
    fn labels(&self, name: &str) -> Option<BTreeMap<String, String>>;
}

/// Every namespace has the same labels: `palisade inject`'s view, where running the command
/// is the opt-in (or `--namespace-label` says what the namespace has).
#[derive(Debug, Clone, Default)]
pub struct AllNamespaces(pub BTreeMap<String, String>);

impl AllNamespaces {
    /// Every namespace labelled `palisade.dev/inject=enabled`.
    pub fn enabled() -> Self {
        Self(BTreeMap::from([(
            super::INJECT.to_string(),
            super::ENABLED.to_string(),
        )]))
    }
}

impl NamespaceLabels for AllNamespaces {
    fn labels(&self, _name: &str) -> Option<BTreeMap<String, String>> {
        Some(self.0.clone())
    }
}

/// A kube reflector's store of Namespaces: what the control plane on a cluster watches.
impl NamespaceLabels for kube::runtime::reflector::Store<Namespace> {
    fn labels(&self, name: &str) -> Option<BTreeMap<String, String>> {
        let ns = self.get(&kube::runtime::reflector::ObjectRef::new(name))?;
        Some(ns.metadata.labels.clone().unwrap_or_default())
    }
}

/// The AdmissionReview the webhook answers with.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReviewResponse {
    pub api_version: String,
    pub kind: String,
    pub response: AdmissionResponse,
}

/// `admission.k8s.io/v1` AdmissionResponse.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionResponse {
    pub uid: String,
    pub allowed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    /// The JSONPatch, base64 (standard alphabet, padded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch_type: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

impl ReviewResponse {
    fn new(api_version: &str, response: AdmissionResponse) -> Box<Self> {
        Box::new(Self {
            api_version: api_version.to_string(),
            kind: KIND.to_string(),
            response,
        })
    }

    /// The decoded JSONPatch, if the response carries one.
    pub fn patch(&self) -> Option<Result<json_patch::Patch, String>> {
        let b64 = self.response.patch.as_ref()?;
        Some(
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| format!("patch is not base64: {e}"))
                .and_then(|bytes| {
                    serde_json::from_slice(&bytes)
                        .map_err(|e| format!("patch is not a JSONPatch: {e}"))
                }),
        )
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Plain strings, bools and maps of them: serializing cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// How a review went, for the webhook's HTTP status and logs.
#[derive(Debug)]
pub enum Reviewed {
    /// An AdmissionReview to send back (the pod is allowed, patched or not, or refused).
    Answer {
        review: Box<ReviewResponse>,
        /// One line for the log: what was decided and why.
        summary: String,
    },
    /// The namespace's labels are not known yet: the call fails (HTTP 503) and the API server's
    /// failurePolicy decides, rather than a pod in an enabled namespace going unmeshed.
    NamespaceUnknown(String),
}

fn failure(api_version: &str, uid: String, code: i32, reason: &str, message: String) -> Reviewed {
    Reviewed::Answer {
        summary: format!("refused: {message}"),
        review: ReviewResponse::new(
            api_version,
            AdmissionResponse {
                uid,
                allowed: false,
                status: Some(Status {
                    code: Some(code),
                    message: Some(message),
                    reason: Some(reason.to_string()),
                    status: Some("Failure".to_string()),
                    ..Default::default()
                }),
                patch: None,
                patch_type: None,
                warnings: Vec::new(),
            },
        ),
    }
}

fn allowed(api_version: &str, uid: String, summary: String, warnings: Vec<String>) -> Reviewed {
    Reviewed::Answer {
        summary,
        review: ReviewResponse::new(
            api_version,
            AdmissionResponse {
                uid,
                allowed: true,
                status: None,
                patch: None,
                patch_type: None,
                warnings,
            },
        ),
    }
}

/// Answers one AdmissionReview (the request body, JSON). A body that is not an AdmissionReview
/// gets an AdmissionReview refusing it (HTTP 400 in its status), with the request's uid when it
/// could be read: never a panic, never an empty answer.
pub fn review(body: &[u8], cfg: &InjectConfig, namespaces: &dyn NamespaceLabels) -> Reviewed {
    let value: serde_json::Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            return failure(
                API_VERSION,
                String::new(),
                400,
                "BadRequest",
                format!("the body is not JSON: {e}"),
            );
        }
    };
    // The uid, to echo even when the rest is malformed.
    let uid = value
        .pointer("/request/uid")
        .and_then(|u| u.as_str())
        .unwrap_or_default()
        .to_string();
    let api_version = match value.get("apiVersion").and_then(|v| v.as_str()) {
        Some(v @ (API_VERSION | "admission.k8s.io/v1beta1")) => v.to_string(),
        other => {
            return failure(
                API_VERSION,
                uid,
                400,
                "BadRequest",
                format!(
                    "not an {API_VERSION} AdmissionReview (apiVersion {})",
                    other.map_or_else(|| "missing".to_string(), |v| format!("{v:?}"))
                ),
            );
        }
    };
    let bad = |message: String| failure(&api_version, uid.clone(), 400, "BadRequest", message);
    if value.get("kind").and_then(|v| v.as_str()) != Some(KIND) {
        return bad(format!("the body's kind is not {KIND}"));
    }
    let parsed: AdmissionReview<DynamicObject> = match serde_json::from_value(value) {
        Ok(r) => r,
        Err(e) => return bad(format!("malformed AdmissionReview: {e}")),
    };
    let request: AdmissionRequest<DynamicObject> = match parsed.try_into() {
        Ok(r) => r,
        Err(_) => return bad("the AdmissionReview has no request".to_string()),
    };
    if request.uid.is_empty() {
        return bad("the AdmissionReview's request has no uid".to_string());
    }
    let uid = request.uid.clone();
    let is_pod = request.kind.group.is_empty()
        && request.kind.version == "v1"
        && request.kind.kind == "Pod"
        && request.sub_resource.as_deref().is_none_or(str::is_empty);
    if !is_pod || request.operation != Operation::Create {
        return allowed(
            &api_version,
            uid,
            format!(
                "allowed unchanged: {:?} of {}/{}{} (only pod creations are injected)",
                request.operation,
                request.kind.version,
                request.kind.kind,
                request
                    .sub_resource
                    .as_deref()
                    .map(|s| format!("/{s}"))
                    .unwrap_or_default()
            ),
            Vec::new(),
        );
    }
    let Some(object) = request.object else {
        return bad("the pod creation carries no object".to_string());
    };
    let pod: Pod = match serde_json::to_value(&object).and_then(serde_json::from_value) {
        Ok(p) => p,
        Err(e) => return bad(format!("the object is not a valid Pod: {e}")),
    };
    // The request's namespace is authoritative: a pod's own metadata may leave it out.
    let ns_name = request
        .namespace
        .clone()
        .filter(|n| !n.is_empty())
        .or_else(|| pod.metadata.namespace.clone())
        .unwrap_or_else(|| "default".to_string());
    let pod_name = pod
        .metadata
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .or_else(|| pod.metadata.generate_name.clone().map(|g| format!("{g}*")))
        .unwrap_or_else(|| "(unnamed)".to_string());
    let Some(labels) = namespaces.labels(&ns_name) else {
        return Reviewed::NamespaceUnknown(format!(
            "the labels of namespace {ns_name} are not known yet"
        ));
    };
    let ns = PodNamespace {
        name: &ns_name,
        labels: &labels,
    };
    match inject(&pod, &ns, cfg) {
        Ok(Outcome::Inject { patch, warnings }) => {
            let bytes = match serde_json::to_vec(&patch) {
                Ok(b) => b,
                Err(e) => {
                    return failure(
                        &api_version,
                        uid,
                        500,
                        "InternalError",
                        format!("cannot encode the patch: {e}"),
                    );
                }
            };
            Reviewed::Answer {
                summary: format!("injected pod {ns_name}/{pod_name}"),
                review: ReviewResponse::new(
                    &api_version,
                    AdmissionResponse {
                        uid,
                        allowed: true,
                        status: None,
                        patch: Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
                        patch_type: Some("JSONPatch".to_string()),
                        warnings,
                    },
                ),
            }
        }
        Ok(Outcome::Skip { reason, warnings }) => allowed(
            &api_version,
            uid,
            format!("pod {ns_name}/{pod_name} not injected: {reason}"),
            warnings,
        ),
        Err(e) => failure(
            &api_version,
            uid,
            400,
            "BadRequest",
            format!("palisade cannot inject pod {ns_name}/{pod_name}: {e}"),
        ),
    }
}
