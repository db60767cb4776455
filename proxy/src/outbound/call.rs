//! What travels below the route of the outbound HTTP stack, shared by its layers.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use http::{Method, Request, Response};

use super::OutService;
use crate::errors::ProxyError;
use crate::http::{OutBody, RspBody};

/// A request on its way to one service: what the layers below the route need, and nothing of
/// the proxy's.
pub(crate) struct Call {
    /// The service the request goes to: the route rule's backend, or the one the app dialled.
    pub svc: Arc<OutService>,
    pub req: Request<OutBody>,
    /// The route rule that took it, whose timeouts and retry policy replace the service's.
    pub rule: Option<Arc<crate::routing::Rule>>,
}

impl Call {
    /// The whole call's timeout: the rule's (which holds its parent service's when it sets
    /// none), else the service's.
    pub fn request_timeout(&self) -> Option<std::time::Duration> {
        match &self.rule {
            Some(r) => r.request_timeout,
            None => self.svc.cfg.timeout,
        }
    }

    /// Each attempt's timeout (a rule's `backendRequest`).
    pub fn attempt_timeout(&self) -> Option<std::time::Duration> {
        self.rule.as_ref().and_then(|r| r.backend_timeout)
    }

    /// The retry policy: the rule's (or its parent service's), else the service's.
    pub fn retry_policy(&self) -> Option<&palisade_api::call::RetryPolicy> {
        match &self.rule {
            Some(r) => r.retry.as_ref(),
            None => self.svc.cfg.retry.as_ref(),
        }
    }
}

/// What a layer below the route returns: the inner call's own future on the common path, a
/// boxed one only for what is rare or configured (an upgrade, an early error, a retry policy),
/// so a request allocates no future per layer.
pub(crate) type Answer = BoxFuture<'static, Result<Response<RspBody>, ProxyError>>;

/// Safe to send twice (RFC 9110 §9.2.2).
pub(crate) fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}
