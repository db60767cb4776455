//! Message size limits of the control-plane API, and the answer to a request over them.
//!
//! The API is reachable by any local process (locally) or any pod (in a cluster) before it
//! has authenticated: a Certify with a token comes without a client certificate. tonic's
//! default would let each caller make the control plane buffer a 4 MiB request per call, while
//! a real request is a CSR, a token or a workload name: a few hundred bytes.
//!
//! tonic refuses a request over the decoding limit with `OUT_OF_RANGE`; gRPC's own servers
//! answer `RESOURCE_EXHAUSTED` for that, which is what clients and operators look for.
//! [`OversizeGuard`] rewrites the status and counts the refusal
//! (`palisade_api_oversize_requests_total{service}`, and for Watch and Deltas also
//! `palisade_discovery_watch_refused_total{reason="message_too_large"}`).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::server::NamedService;

use crate::metrics::Metrics;

/// Largest request message accepted: a CSR is under 1 KiB, a token 64 bytes, a Watch request
/// a workload name; 64 KiB leaves room for any sane one and no more.
pub const MAX_REQUEST_MESSAGE: usize = 64 * 1024;
/// Largest Certify response sent: a leaf, its issuer and the roots.
pub const MAX_CERTIFY_RESPONSE: usize = 1024 * 1024;
/// Largest config pushed to a proxy: what a proxy's client accepts by default (tonic's 4 MiB
/// receive limit), so a config the proxy would refuse fails here, visibly, instead.
pub const MAX_CONFIG_MESSAGE: usize = 4 * 1024 * 1024;

/// Caller input as quoted in a refusal or a log line: at most 64 characters. Echoed whole, a
/// 64 KiB workload name would make a `grpc-message` header larger than HTTP/2 peers accept
/// (the client sees a connection error instead of the refusal) and flood the logs.
pub(crate) fn shown(s: &str) -> String {
    const SHOWN: usize = 64;
    match s.char_indices().nth(SHOWN) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// Wraps one gRPC service: rewrites tonic's "decoded message length too large" refusal to
/// `RESOURCE_EXHAUSTED`, counts it and logs it once.
#[derive(Clone)]
pub struct OversizeGuard<S> {
    inner: S,
    metrics: Arc<Metrics>,
    /// The `service` label: `identity` or `discovery`.
    label: &'static str,
}

impl<S> OversizeGuard<S> {
    pub fn new(inner: S, metrics: Arc<Metrics>, label: &'static str) -> Self {
        Self {
            inner,
            metrics,
            label,
        }
    }
}

impl<S: NamedService> NamedService for OversizeGuard<S> {
    const NAME: &'static str = S::NAME;
}

/// Whether `rsp` is tonic's refusal of a request message over the decoding limit. Our handlers
/// never answer `OUT_OF_RANGE`, and the message makes sure it is the codec's.
fn is_oversize(rsp: &http::Response<Body>) -> bool {
    tonic::Status::from_header_map(rsp.headers()).is_some_and(|s| {
        s.code() == tonic::Code::OutOfRange
            && s.message().contains("decoded message length too large")
    })
}

impl<S> tonic::codegen::Service<http::Request<Body>> for OversizeGuard<S>
where
    S: tonic::codegen::Service<
            http::Request<Body>,
            Response = http::Response<Body>,
            Error = Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let method = req.uri().path().to_string();
        let remote = req
            .extensions()
            .get::<crate::conn::PeerInfo>()
            .map(|p| p.remote);
        let fut = self.inner.call(req);
        let metrics = self.metrics.clone();
        let label = self.label;
        Box::pin(async move {
            let mut rsp = fut.await?;
            if is_oversize(&rsp) {
                rsp.headers_mut().insert(
                    tonic::Status::GRPC_STATUS,
                    (tonic::Code::ResourceExhausted as i32).into(),
                );
                metrics.oversize_request(label);
                if method.ends_with("/Watch") || method.ends_with("/Deltas") {
                    metrics.watch_refused("message_too_large");
                }
                tracing::warn!(
                    ?remote,
                    %method,
                    limit = MAX_REQUEST_MESSAGE,
                    "request refused: message too large"
                );
            }
            Ok(rsp)
        })
    }
}
