//! `palisade inject`: Kubernetes YAML in, the same YAML with the sidecar injected out.
//!
//! Each document's pod (a bare Pod, or the pod template of a Deployment, StatefulSet,
//! DaemonSet, ReplicaSet, ReplicationController, Job or CronJob; `List`s are walked) goes
//! through [`inject`](super::inject), the webhook's function, and the patch it returns is
//! applied to that pod. Other documents pass through. The output is YAML again, keys in
//! alphabetical order as `kubectl get -o yaml` prints them; comments do not survive.

use k8s_openapi::api::core::v1::Pod;
use serde_json::Value;

use super::{InjectConfig, InjectError, NamespaceLabels, Outcome, PodNamespace, inject};

/// Why a YAML text cannot be injected.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("the input is not YAML: {0}")]
    Yaml(String),
    #[error("document {document}: {resource}: {source}")]
    Inject {
        document: usize,
        resource: String,
        source: InjectError,
    },
    #[error("document {document}: {resource}: {message}")]
    Invalid {
        document: usize,
        resource: String,
        message: String,
    },
    #[error("document {document}: the labels of namespace {namespace} are not known")]
    NamespaceUnknown { document: usize, namespace: String },
    #[error("cannot write YAML: {0}")]
    Write(String),
}

/// What happened to one resource with a pod.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// `deployment/web`, `pod/db`, `cronjob/nightly`.
    pub resource: String,
    /// `None` when injected, else why not.
    pub skipped: Option<super::SkipReason>,
    pub warnings: Vec<String>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.skipped {
            None => write!(f, "{} injected", self.resource),
            Some(reason) => write!(f, "{} skipped: {reason}", self.resource),
        }
    }
}

/// Where a kind keeps its pod, as a JSON pointer from the document.
fn pod_pointer(api_version: &str, kind: &str) -> Option<&'static str> {
    let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
    match (group, kind) {
        ("", "Pod") => Some(""),
        ("", "ReplicationController") => Some("/spec/template"),
        ("apps", "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet") => {
            Some("/spec/template")
        }
        ("batch", "Job") => Some("/spec/template"),
        ("batch", "CronJob") => Some("/spec/jobTemplate/spec/template"),
        _ => None,
    }
}

fn str_at<'a>(v: &'a Value, ptr: &str) -> Option<&'a str> {
    v.pointer(ptr).and_then(Value::as_str)
}

struct Ctx<'a> {
    cfg: &'a InjectConfig,
    namespaces: &'a dyn NamespaceLabels,
    document: usize,
    reports: Vec<Report>,
}

fn invalid(ctx: &Ctx<'_>, resource: &str, message: impl Into<String>) -> ManifestError {
    ManifestError::Invalid {
        document: ctx.document,
        resource: resource.to_string(),
        message: message.into(),
    }
}

/// Injects one object (recursing into `List`s); `namespace` is inherited from a List item's
/// parent only through the item's own metadata, as kubectl does.
fn inject_object(ctx: &mut Ctx<'_>, doc: &mut Value) -> Result<(), ManifestError> {
    let api_version = str_at(doc, "/apiVersion").unwrap_or_default().to_string();
    let kind = str_at(doc, "/kind").unwrap_or_default().to_string();
    if kind == "List" || (kind.ends_with("List") && doc.get("items").is_some()) {
        if let Some(Value::Array(items)) = doc.get_mut("items") {
            for item in items {
                inject_object(ctx, item)?;
            }
        }
        return Ok(());
    }
    let Some(ptr) = pod_pointer(&api_version, &kind) else {
        return Ok(());
    };
    let name = str_at(doc, "/metadata/name")
        .or_else(|| str_at(doc, "/metadata/generateName"))
        .unwrap_or("(unnamed)");
    let resource = format!("{}/{name}", kind.to_lowercase());
    let namespace = str_at(doc, "/metadata/namespace")
        .unwrap_or("default")
        .to_string();
    let Some(target) = doc.pointer_mut(ptr) else {
        return Err(invalid(
            ctx,
            &resource,
            format!("has no pod template at {ptr}"),
        ));
    };
    if !target.is_object() {
        return Err(invalid(ctx, &resource, format!("{ptr} is not an object")));
    }
    let mut pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": target.get("metadata"),
        "spec": target.get("spec"),
    }))
    .map_err(|e| invalid(ctx, &resource, format!("the pod is not valid: {e}")))?;
    pod.metadata.namespace = Some(namespace.clone());
    let Some(labels) = ctx.namespaces.labels(&namespace) else {
        return Err(ManifestError::NamespaceUnknown {
            document: ctx.document,
            namespace,
        });
    };
    let ns = PodNamespace {
        name: &namespace,
        labels: &labels,
    };
    let outcome = inject(&pod, &ns, ctx.cfg).map_err(|source| ManifestError::Inject {
        document: ctx.document,
        resource: resource.clone(),
        source,
    })?;
    let report = match outcome {
        Outcome::Inject { patch, warnings } => {
            json_patch::patch(target, &patch)
                .map_err(|e| invalid(ctx, &resource, format!("the patch does not apply: {e}")))?;
            Report {
                resource,
                skipped: None,
                warnings,
            }
        }
        Outcome::Skip { reason, warnings } => Report {
            resource,
            skipped: Some(reason),
            warnings,
        },
    };
    ctx.reports.push(report);
    Ok(())
}

/// Injects every pod of a YAML text (one or more documents). Returns the YAML to print and a
/// report per resource that has a pod.
pub fn inject_yaml(
    text: &str,
    cfg: &InjectConfig,
    namespaces: &dyn NamespaceLabels,
) -> Result<(String, Vec<Report>), ManifestError> {
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(text).map_err(|e| ManifestError::Yaml(e.to_string()))?;
    let mut ctx = Ctx {
        cfg,
        namespaces,
        document: 0,
        reports: Vec::new(),
    };
    let mut out = String::new();
    let mut written = 0;
    for (i, mut doc) in docs.into_iter().enumerate() {
        if doc.is_null() {
            continue;
        }
        ctx.document = i;
        if !doc.is_object() {
            return Err(ManifestError::Invalid {
                document: i,
                resource: "(document)".to_string(),
                message: "is not a Kubernetes object".to_string(),
            });
        }
        inject_object(&mut ctx, &mut doc)?;
        if written > 0 {
            out.push_str("---\n");
        }
        let yaml =
            serde_saphyr::to_string(&doc).map_err(|e| ManifestError::Write(e.to_string()))?;
        out.push_str(&yaml);
        if !yaml.ends_with('\n') {
            out.push('\n');
        }
        written += 1;
    }
    Ok((out, ctx.reports))
}
