//! The Identity service: the CA's front door.
//!
//! Zero trust starts here: the CA signs only for an authenticated workload, and only that
//! workload's own SPIFFE ID, whatever the CSR asks for. A caller authenticates with its
//! current SVID over mTLS (renewal) or with a token, which a [`TokenAuthenticator`] turns into
//! an identity: locally the bootstrap token `palisade up` gave its proxy, which then is used
//! up ([`BootstrapTokens`], see [`crate::tokens`]); on Kubernetes the pod's projected
//! ServiceAccount token, checked with a TokenReview (`crate::k8s::tokenreview`). Every
//! refusal is counted (`palisade_identity_certificates_total{result}`) and logged once.

use std::sync::Arc;

use palisade_api::v1::identity_server::Identity;
use palisade_api::v1::{CertifyRequest, CertifyResponse};
use palisade_certs::{Ca, CaError, SpiffeId};
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

use crate::conn::PeerInfo;
use crate::metrics::Metrics;
use crate::model::Model;
use crate::tokens::{Claim, Reservation, TokenStore};

/// Who a Certify token says the caller is.
#[derive(Debug)]
pub struct TokenIdentity {
    /// The workload, for logs (a mesh workload name locally, a pod name on Kubernetes).
    pub workload: String,
    /// The only identity the CA will sign for this caller.
    pub id: SpiffeId,
    /// How it was established, for logs (`token`, `tokenreview`).
    pub how: &'static str,
    /// A bootstrap token to consume once the certificate is signed.
    pub reservation: Option<Reservation>,
}

/// Why a token was refused: the `result` label it is counted under
/// (`palisade_identity_certificates_total{result}`) and the status the caller gets.
#[derive(Debug)]
pub struct TokenRefusal {
    pub result: &'static str,
    pub status: Status,
}

impl TokenRefusal {
    pub fn new(result: &'static str, status: Status) -> Self {
        Self { result, status }
    }
}

/// Turns the token of a Certify call into the identity the CA signs. The CSR never has a say.
#[tonic::async_trait]
pub trait TokenAuthenticator: Send + Sync + std::fmt::Debug {
    /// `token` is never empty (a call without one is refused before).
    async fn authenticate(&self, token: &str, model: &Model)
    -> Result<TokenIdentity, TokenRefusal>;
}

/// Local bootstrap tokens: each names a workload of the mesh file, and certifies one proxy
/// start.
#[derive(Debug, Clone)]
pub struct BootstrapTokens(pub Arc<TokenStore>);

#[tonic::async_trait]
impl TokenAuthenticator for BootstrapTokens {
    async fn authenticate(
        &self,
        token: &str,
        model: &Model,
    ) -> Result<TokenIdentity, TokenRefusal> {
        let reservation = match self.0.claim(token) {
            Claim::Owner(r) => r,
            Claim::Replayed => {
                return Err(TokenRefusal::new(
                    "token_replayed",
                    Status::unauthenticated(
                        "this bootstrap token was already used: a token certifies one proxy start (`palisade up` gives each proxy it starts a new one)",
                    ),
                ));
            }
            Claim::Unknown => {
                return Err(TokenRefusal::new(
                    "unauthenticated",
                    Status::unauthenticated("unknown bootstrap token"),
                ));
            }
        };
        let name = reservation.workload().to_string();
        let Some(w) = model.mesh.workload(&name) else {
            return Err(TokenRefusal::new(
                "permission_denied",
                Status::permission_denied(format!(
                    "the token is for workload {name:?}, which is not in the mesh (any more)"
                )),
            ));
        };
        match w.spiffe_id(&model.mesh) {
            Ok(id) => Ok(TokenIdentity {
                workload: name,
                id,
                how: "token",
                reservation: Some(reservation),
            }),
            Err(e) => Err(TokenRefusal::new(
                "internal",
                Status::internal(format!("workload {name} has no valid SPIFFE ID: {e}")),
            )),
        }
    }
}

/// The Identity gRPC service.
#[derive(Clone)]
pub struct IdentityService {
    ca: Arc<Ca>,
    model: watch::Receiver<Arc<Model>>,
    tokens: Arc<dyn TokenAuthenticator>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for IdentityService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the tokens.
        f.debug_struct("IdentityService")
            .field("ca", &self.ca)
            .field("tokens", &self.tokens)
            .finish_non_exhaustive()
    }
}

/// Who the caller turned out to be.
struct Caller {
    workload: String,
    id: SpiffeId,
    how: &'static str,
    /// The bootstrap token it came with, consumed once the certificate is signed.
    token: Option<Reservation>,
}

impl IdentityService {
    pub fn new(
        ca: Arc<Ca>,
        model: watch::Receiver<Arc<Model>>,
        tokens: Arc<dyn TokenAuthenticator>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            ca,
            model,
            tokens,
            metrics,
        }
    }

    fn refuse(&self, result: &'static str, status: Status, peer: Option<&PeerInfo>) -> Status {
        self.metrics.certificate(result);
        tracing::warn!(
            result,
            remote = ?peer.map(|p| p.remote),
            peer = ?peer.and_then(|p| p.identity.as_ref()).map(|i| i.as_str()),
            reason = status.message(),
            "certificate refused"
        );
        status
    }

    async fn authenticate(
        &self,
        model: &Model,
        peer: Option<&PeerInfo>,
        token: &str,
    ) -> Result<Caller, Status> {
        if let Some(id) = peer.and_then(|p| p.identity.as_ref()) {
            // Renewal: the handshake verified the SVID against our bundle and trust domain.
            return match model.mesh.workloads_with_id(id).next() {
                Some(w) => Ok(Caller {
                    workload: w.name.clone(),
                    id: id.clone(),
                    how: "svid",
                    token: None,
                }),
                None => Err(self.refuse(
                    "permission_denied",
                    Status::permission_denied(format!(
                        "no workload in the mesh has the identity {id}; cannot renew it"
                    )),
                    peer,
                )),
            };
        }
        if token.is_empty() {
            return Err(self.refuse(
                "unauthenticated",
                Status::unauthenticated(
                    "no client certificate and no token: nothing to authenticate the caller with",
                ),
                peer,
            ));
        }
        match self.tokens.authenticate(token, model).await {
            Ok(t) => Ok(Caller {
                workload: t.workload,
                id: t.id,
                how: t.how,
                token: t.reservation,
            }),
            Err(r) => Err(self.refuse(r.result, r.status, peer)),
        }
    }

    /// The URI SANs a CSR asks for. Only used to refuse a CSR that asks for someone else: the
    /// CA sets the SAN itself anyway.
    pub(crate) fn requested_uris(csr: &[u8]) -> Result<Vec<String>, String> {
        let (_, req) = x509_parser::certification_request::X509CertificationRequest::from_der(csr)
            .map_err(|e| format!("the CSR is not DER PKCS#10: {e}"))?;
        let mut uris = Vec::new();
        if let Some(exts) = req.requested_extensions() {
            for ext in exts {
                if let ParsedExtension::SubjectAlternativeName(san) = ext {
                    for name in &san.general_names {
                        if let GeneralName::URI(u) = name {
                            uris.push((*u).to_string());
                        }
                    }
                }
            }
        }
        Ok(uris)
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let peer = PeerInfo::of(&request).cloned();
        let peer = peer.as_ref();
        let req = request.into_inner();
        let model = self.model.borrow().clone();
        let mut caller = self.authenticate(&model, peer, &req.token).await?;
        // Whatever let this caller in (a model built without mesh validation, a future
        // Kubernetes source, a stolen control-plane certificate renewing itself), the control
        // plane's own identity is never handed out: proxies trust it for their config.
        if crate::control_plane_id(self.ca.trust_domain()).is_ok_and(|cp| cp == caller.id) {
            return Err(self.refuse(
                "permission_denied",
                Status::permission_denied(format!(
                    "{} is reserved for the control plane and is never issued to a workload",
                    caller.id
                )),
                peer,
            ));
        }

        let uris = Self::requested_uris(&req.csr_der)
            .map_err(|m| self.refuse("invalid_csr", Status::invalid_argument(m), peer))?;
        if let Some(other) = uris
            .iter()
            .find(|u| SpiffeId::parse(u).map_or(true, |asked| asked != caller.id))
        {
            return Err(self.refuse(
                "permission_denied",
                Status::permission_denied(format!(
                    "CSR asks for {}; this {} may only obtain {}",
                    crate::limits::shown(other),
                    if caller.how == "svid" {
                        "certificate"
                    } else {
                        "token"
                    },
                    caller.id
                )),
                peer,
            ));
        }

        let lifetime = model.mesh.certificate_lifetime;
        let svid = match self.ca.sign_csr(&req.csr_der, &caller.id, lifetime) {
            Ok(svid) => svid,
            Err(e @ (CaError::BadCsr | CaError::UnsupportedKey)) => {
                return Err(self.refuse(
                    "invalid_csr",
                    Status::invalid_argument(e.to_string()),
                    peer,
                ));
            }
            Err(e) => {
                return Err(self.refuse(
                    "internal",
                    Status::internal(format!("cannot sign: {e}")),
                    peer,
                ));
            }
        };
        if let Some(token) = caller.token.take()
            && let Err(e) = token.commit()
        {
            return Err(self.refuse(
                "internal",
                Status::internal(format!("{e}; no certificate was issued")),
                peer,
            ));
        }
        self.metrics.certificate("issued");
        tracing::info!(
            workload = %caller.workload,
            spiffe_id = %caller.id,
            authenticated_by = caller.how,
            valid_until = svid.not_after,
            "certificate issued"
        );
        Ok(Response::new(CertifyResponse {
            chain_der: svid.chain.iter().map(|c| c.to_vec()).collect(),
            trust_bundle_der: vec![self.ca.root_der().to_vec()],
            trust_domain: self.ca.trust_domain().as_str().to_string(),
            spiffe_id: caller.id.as_str().to_string(),
            valid_until_unix: svid.not_after,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model that holds a workload with the control plane's identity, as only a source that
    /// skips mesh validation could build: the Identity service still refuses to sign it.
    #[tokio::test]
    async fn the_control_planes_identity_is_never_signed() {
        let text =
            "workloads:\n  - { name: evil, namespace: demo, inboundPort: 1001, adminPort: 1002 }\n";
        let mut mesh = crate::mesh::parse(text, std::path::Path::new("/m/mesh.yaml")).unwrap();
        mesh.workloads[0].namespace = crate::CONTROL_PLANE_NAMESPACE.into();
        mesh.workloads[0].service_account = Some(crate::CONTROL_PLANE_SERVICE_ACCOUNT.into());
        let td = mesh.trust_domain.clone();
        let model = Model::from_parts(mesh, [], 1);
        let (_tx, rx) = watch::channel(Arc::new(model));
        let ca = Arc::new(Ca::generate(&td, None).unwrap());
        let metrics = Metrics::new();
        let tokens =
            std::collections::HashMap::from([("evil".to_string(), "token-evil-0123".to_string())]);
        let state = tempfile::tempdir().unwrap();
        let tokens = TokenStore::open(tokens, None, state.path()).unwrap();
        let svc = IdentityService::new(ca, rx, Arc::new(BootstrapTokens(tokens)), metrics.clone());
        let cp_id = crate::control_plane_id(&td).unwrap();
        let kc = palisade_certs::KeyAndCsr::generate(&cp_id).unwrap();
        let err = svc
            .certify(Request::new(CertifyRequest {
                csr_der: kc.csr_der().to_vec(),
                token: "token-evil-0123".into(),
            }))
            .await
            .expect_err("the control plane's identity is refused");
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
        assert!(err.message().contains("reserved"), "{err:?}");
        assert!(
            metrics
                .encode()
                .contains("palisade_identity_certificates_total{result=\"permission_denied\"} 1"),
            "{}",
            metrics.encode()
        );
    }
}
