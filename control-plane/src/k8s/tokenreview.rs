//! Identity on Kubernetes: a proxy presents its pod's projected ServiceAccount token
//! (audience `palisade`) as the Certify token, and the API server says whose it is.
//!
//! The CA asks with a TokenReview (`authentication.k8s.io/v1`, `spec.audiences: [palisade]`)
//! and signs `spiffe://<td>/ns/<ns>/sa/<sa>` from the review's
//! `system:serviceaccount:<ns>:<sa>` user, never from the CSR. Refused, each counted
//! (`palisade_identity_certificates_total{result}`) and logged once by the Identity service:
//!
//! | the review says | status | `result` |
//! |---|---|---|
//! | not authenticated (expired, revoked, a deleted pod's, another audience's) | `unauthenticated` | `unauthenticated` |
//! | authenticated, but `palisade` is not among `status.audiences` | `unauthenticated` | `wrong_audience` |
//! | authenticated, but not a service account (a user, a node) | `permission_denied` | `permission_denied` |
//! | nothing: the API server cannot be asked | `unavailable` | `tokenreview_failed` |
//!
//! The token itself is never logged.

use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::Client;
use kube::api::{Api, PostParams};
use palisade_certs::{SpiffeId, TrustDomain};
use tonic::Status;

use crate::identity::{TokenAuthenticator, TokenIdentity, TokenRefusal};
use crate::limits::shown;
use crate::model::Model;

/// The audience proxies' projected tokens are minted for, and the only one accepted.
pub const AUDIENCE: &str = "palisade";
/// The user name prefix of a ServiceAccount token.
pub const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";
/// The `extra` key of a bound token that names its pod.
pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
/// How long a TokenReview may take.
pub const REVIEW_TIMEOUT: Duration = Duration::from_secs(10);

/// Authenticates Certify tokens with TokenReviews.
#[derive(Clone)]
pub struct TokenReviewer {
    client: Client,
    trust_domain: TrustDomain,
}

impl std::fmt::Debug for TokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewer")
            .field("trust_domain", &self.trust_domain)
            .field("audience", &AUDIENCE)
            .finish_non_exhaustive()
    }
}

impl TokenReviewer {
    pub fn new(client: Client, trust_domain: TrustDomain) -> Self {
        Self {
            client,
            trust_domain,
        }
    }
}

#[tonic::async_trait]
impl TokenAuthenticator for TokenReviewer {
    async fn authenticate(
        &self,
        token: &str,
        _model: &Model,
    ) -> Result<TokenIdentity, TokenRefusal> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_string(),
                audiences: Some(vec![AUDIENCE.to_string()]),
            },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let failed = |message: String| {
            TokenRefusal::new(
                "tokenreview_failed",
                Status::unavailable(format!(
                    "cannot review the token with the Kubernetes API: {message}; retry later"
                )),
            )
        };
        let reviewed =
            tokio::time::timeout(REVIEW_TIMEOUT, api.create(&PostParams::default(), &review))
                .await
                .map_err(|_| failed(format!("no answer within {REVIEW_TIMEOUT:?}")))?
                .map_err(|e| failed(e.to_string()))?;
        decide(
            &reviewed.status.unwrap_or_default(),
            &self.trust_domain,
            AUDIENCE,
        )
    }
}

/// What a review's status entitles the caller to: the identity of its service account.
pub fn decide(
    status: &TokenReviewStatus,
    td: &TrustDomain,
    audience: &str,
) -> Result<TokenIdentity, TokenRefusal> {
    if status.authenticated != Some(true) {
        let why = status
            .error
            .as_deref()
            .filter(|e| !e.is_empty())
            .map(|e| format!(": {}", shown(e)))
            .unwrap_or_default();
        return Err(TokenRefusal::new(
            "unauthenticated",
            Status::unauthenticated(format!(
                "the Kubernetes API did not authenticate the token{why}"
            )),
        ));
    }
    let audiences = status.audiences.as_deref().unwrap_or_default();
    if !audiences.iter().any(|a| a == audience) {
        return Err(TokenRefusal::new(
            "wrong_audience",
            Status::unauthenticated(format!(
                "the token is not for audience {audience:?} (its audiences: {audiences:?}); mount a projected ServiceAccount token with audience {audience:?}"
            )),
        ));
    }
    let user = status.user.as_ref();
    let username = user.and_then(|u| u.username.as_deref()).unwrap_or("");
    let Some((ns, sa)) = username
        .strip_prefix(SERVICE_ACCOUNT_PREFIX)
        .and_then(|rest| rest.split_once(':'))
        .filter(|(ns, sa)| !ns.is_empty() && !sa.is_empty() && !sa.contains(':'))
    else {
        return Err(TokenRefusal::new(
            "permission_denied",
            Status::permission_denied(format!(
                "the token belongs to {:?}, not to a ServiceAccount: only workloads get certificates",
                shown(username)
            )),
        ));
    };
    let id = SpiffeId::for_workload(td, ns, sa).map_err(|e| {
        TokenRefusal::new(
            "permission_denied",
            Status::permission_denied(format!(
                "service account {ns}/{sa} does not make a SPIFFE ID: {e}"
            )),
        )
    })?;
    let pod = user
        .and_then(|u| u.extra.as_ref())
        .and_then(|x| x.get(POD_NAME_EXTRA))
        .and_then(|v| v.first())
        .map(|p| format!("{ns}/{p}"))
        .unwrap_or_else(|| format!("{ns}/(no pod bound to the token)"));
    Ok(TokenIdentity {
        workload: pod,
        id,
        how: "tokenreview",
        reservation: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(json: serde_json::Value) -> TokenReviewStatus {
        serde_json::from_value(json).expect("a status")
    }

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    #[test]
    fn the_reviewed_service_account_is_the_identity() {
        let ok = status(serde_json::json!({
            "authenticated": true,
            "audiences": ["palisade"],
            "user": {
                "username": "system:serviceaccount:demo:web",
                "extra": { "authentication.kubernetes.io/pod-name": ["web-7d9"] }
            }
        }));
        let t = decide(&ok, &td(), AUDIENCE).unwrap();
        assert_eq!(t.id.as_str(), "spiffe://cluster.local/ns/demo/sa/web");
        assert_eq!(t.workload, "demo/web-7d9");
        assert!(t.reservation.is_none());
    }

    #[test]
    fn refusals_say_why_and_are_labelled() {
        let cases = [
            (
                serde_json::json!({ "authenticated": false, "error": "token expired" }),
                "unauthenticated",
                tonic::Code::Unauthenticated,
            ),
            (
                serde_json::json!({}),
                "unauthenticated",
                tonic::Code::Unauthenticated,
            ),
            (
                serde_json::json!({ "authenticated": true, "audiences": ["https://kubernetes.default.svc"],
                    "user": { "username": "system:serviceaccount:demo:web" } }),
                "wrong_audience",
                tonic::Code::Unauthenticated,
            ),
            (
                serde_json::json!({ "authenticated": true,
                    "user": { "username": "system:serviceaccount:demo:web" } }),
                "wrong_audience",
                tonic::Code::Unauthenticated,
            ),
            (
                serde_json::json!({ "authenticated": true, "audiences": ["palisade"],
                    "user": { "username": "kubernetes-admin" } }),
                "permission_denied",
                tonic::Code::PermissionDenied,
            ),
            (
                serde_json::json!({ "authenticated": true, "audiences": ["palisade"],
                    "user": { "username": "system:serviceaccount:demo:web:extra" } }),
                "permission_denied",
                tonic::Code::PermissionDenied,
            ),
            (
                serde_json::json!({ "authenticated": true, "audiences": ["palisade"],
                    "user": { "username": "system:serviceaccount::web" } }),
                "permission_denied",
                tonic::Code::PermissionDenied,
            ),
        ];
        for (json, result, code) in cases {
            let r = decide(&status(json.clone()), &td(), AUDIENCE).expect_err("refused");
            assert_eq!(r.result, result, "{json}");
            assert_eq!(r.status.code(), code, "{json}");
        }
    }
}
