//! The `Accepted` condition on `palisade.dev` policy objects: what `kubectl get` shows in its
//! `Accepted` column and `kubectl describe` under Status, next to the `InvalidPolicy` Event.
//!
//! The condition is written when an object version is judged (accepted, or refused with the
//! validator's errors) and only when it says something the object's status does not say yet:
//! the write bumps the object's resourceVersion, the new version is judged again, and the
//! condition it would write is the one there, so nothing loops. Both replicas judge the same
//! object the same way; the second finds the condition already written.
//!
//! Istio's kinds and Gateway API routes are left alone: their status belongs to their own
//! controllers and formats.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::crd::{CONDITION_ACCEPTED, ConditionStatus, GROUP, PolicyCondition};

/// What the validator made of one object version.
#[derive(Debug, Clone, Copy)]
pub enum Verdict<'a> {
    Accepted,
    Refused {
        /// The validator's errors, `field: message; …`.
        problems: &'a str,
        keeps_last_good: bool,
    },
}

/// One status write to make.
#[derive(Debug, Clone)]
pub struct StatusUpdate {
    pub api: ApiResource,
    pub namespace: String,
    pub name: String,
    pub condition: PolicyCondition,
}

/// Longest `message` written (the schema allows 32768).
const MAX_MESSAGE: usize = 4096;

/// The condition `verdict` calls for, if `obj` does not hold it already; None for kinds whose
/// status is not ours.
pub fn update_for(
    api: &ApiResource,
    obj: &DynamicObject,
    verdict: Verdict,
) -> Option<StatusUpdate> {
    if api.group != GROUP {
        return None;
    }
    let (status, reason, message) = match verdict {
        Verdict::Accepted => (
            ConditionStatus::True,
            "Accepted",
            "in force on the workloads it selects".to_string(),
        ),
        Verdict::Refused {
            problems,
            keeps_last_good,
        } => {
            let outcome = if keeps_last_good {
                "refused; its last accepted version keeps serving"
            } else {
                "refused; it is not served"
            };
            (
                ConditionStatus::False,
                "Invalid",
                format!("{outcome}: {problems}")
                    .chars()
                    .take(MAX_MESSAGE)
                    .collect(),
            )
        }
    };
    let generation = obj.metadata.generation;
    let current: Option<PolicyCondition> = obj
        .data
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .and_then(|cs| cs.iter().find(|c| c["type"] == CONDITION_ACCEPTED))
        .and_then(|c| serde_json::from_value(c.clone()).ok());
    if let Some(c) = &current
        && c.status == status
        && c.reason.as_deref() == Some(reason)
        && c.message.as_deref() == Some(message.as_str())
        && c.observed_generation == generation
    {
        return None;
    }
    // The transition time moves only when the status does.
    let last_transition_time = current
        .filter(|c| c.status == status)
        .and_then(|c| c.last_transition_time)
        .or_else(|| {
            serde_json::to_value(Time(k8s_openapi::jiff::Timestamp::now()))
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
        });
    Some(StatusUpdate {
        api: api.clone(),
        namespace: obj.metadata.namespace.clone()?,
        name: obj.metadata.name.clone()?,
        condition: PolicyCondition {
            type_: CONDITION_ACCEPTED.into(),
            status,
            reason: Some(reason.into()),
            message: Some(message),
            observed_generation: generation,
            last_transition_time,
        },
    })
}

/// Writes the status updates it receives (a merge patch of the `status` subresource); a failed
/// write is logged (the Event and the log still say it) and not retried: the next version of
/// the object is judged again.
pub async fn publish_status(client: kube::Client, mut rx: mpsc::UnboundedReceiver<StatusUpdate>) {
    while let Some(u) = rx.recv().await {
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &u.namespace, &u.api);
        let patch = json!({ "status": { "conditions": [u.condition] } });
        if let Err(e) = api
            .patch_status(&u.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            tracing::warn!(
                object = %format!("{}/{}", u.namespace, u.name),
                kind = %u.api.kind,
                error = %e,
                "cannot write the Accepted condition (the log, the metric and the Event have it)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(group: &str) -> ApiResource {
        ApiResource {
            group: group.into(),
            version: "v1alpha1".into(),
            api_version: format!("{group}/v1alpha1"),
            kind: "AuthorizationPolicy".into(),
            plural: "authorizationpolicies".into(),
        }
    }

    fn obj(status: Value) -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "palisade.dev/v1alpha1", "kind": "AuthorizationPolicy",
            "metadata": { "name": "p", "namespace": "demo", "generation": 3 },
            "spec": {}, "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn writes_only_what_the_status_does_not_say() {
        let fresh = update_for(&api(GROUP), &obj(json!({})), Verdict::Accepted).unwrap();
        assert_eq!(fresh.condition.status, ConditionStatus::True);
        assert_eq!(fresh.condition.observed_generation, Some(3));
        let written = obj(json!({ "conditions": [fresh.condition.clone()] }));
        assert!(update_for(&api(GROUP), &written, Verdict::Accepted).is_none());

        let refused = Verdict::Refused {
            problems: "spec.rules[0].to[0].operation.ports[0]: not a port",
            keeps_last_good: true,
        };
        let flip = update_for(&api(GROUP), &written, refused).unwrap();
        assert_eq!(flip.condition.status, ConditionStatus::False);
        assert_eq!(flip.condition.reason.as_deref(), Some("Invalid"));
        assert!(
            flip.condition
                .message
                .unwrap()
                .contains("ports[0]: not a port")
        );
    }

    #[test]
    fn other_groups_are_left_alone() {
        assert!(
            update_for(
                &api("security.istio.io"),
                &obj(json!({})),
                Verdict::Accepted
            )
            .is_none()
        );
    }
}
