//! What goes wrong on a proxy's request path, and the one place that turns it into a response.
//!
//! Every stage of an HTTP stack below [`Rescue`] returns a [`ProxyError`] instead of making up
//! a response, and the rescue layer at the top of the stack answers it: HTTP 400/502/503/504
//! with a short body naming the reason, or, to a gRPC caller, trailers-only `grpc-status`
//! `UNAVAILABLE` / `DEADLINE_EXCEEDED` / `INTERNAL` with a message, as linkerd2-proxy's
//! `errors::respond` does. Each is counted in `palisade_proxy_errors_total{direction,reason}`.
//! An error that means the request never reached an app carries `palisade-proxy-error`, so the
//! caller's proxy may send it elsewhere. An opaque TCP connection that cannot be carried is
//! reset ([`rescue_tcp`]).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderValue, Request, Response, StatusCode};

use crate::balance::Failure;
use crate::http::{self as phttp, RspBody};
use crate::telemetry::{Direction, Metrics};

/// What went wrong with one peer endpoint: dialling it, its identity, or the exchange.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("mTLS handshake with {addr} failed ({reason}): {source}")]
    Tls {
        addr: SocketAddr,
        reason: &'static str,
        source: std::io::Error,
    },
    #[error("HTTP/2 with {addr}: {source}")]
    Http {
        addr: SocketAddr,
        source: hyper::Error,
    },
}

impl EndpointError {
    /// A refused connection or a peer that is not who the config says cannot serve anything:
    /// out of rotation at once. The rest may be one bad request.
    pub(crate) fn failure(&self) -> Failure {
        match self {
            EndpointError::Connect { source, .. }
                if source.kind() == std::io::ErrorKind::ConnectionRefused =>
            {
                Failure::Hard
            }
            EndpointError::Tls { .. } => Failure::Hard,
            _ => Failure::Soft,
        }
    }

    /// The `reason` label and response body (see [`crate::errors`]).
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            EndpointError::Connect { source, .. }
                if source.kind() == std::io::ErrorKind::TimedOut =>
            {
                "connect_timeout"
            }
            EndpointError::Connect { .. } => "connect_refused",
            EndpointError::Tls { .. } => "tls_handshake_failed",
            EndpointError::Http { .. } => "peer_reset",
        }
    }

    pub(crate) fn is_timeout(&self) -> bool {
        matches!(self, EndpointError::Connect { source, .. } if source.kind() == std::io::ErrorKind::TimedOut)
    }

    /// Failed before a byte of the request left (connecting or the handshake).
    pub(crate) fn not_sent(&self) -> bool {
        matches!(
            self,
            EndpointError::Connect { .. } | EndpointError::Tls { .. }
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The outbound table has no such service (it left the config).
    #[error("unknown service")]
    UnknownService,
    /// The service has no endpoints.
    #[error("no endpoints")]
    NoEndpoints,
    /// The request's target cannot be made into an HTTP/2 request.
    #[error("bad request target")]
    BadRequestTarget,
    /// The client's own body broke (a malformed chunk).
    #[error("the request body is malformed")]
    BadRequestBody,
    /// No response headers within the service's request timeout.
    #[error("request timed out after {0:?}")]
    RequestTimeout(Duration),
    /// The endpoint could not be reached or failed the exchange.
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// The local app refused the connection (the request never reached it).
    #[error("app unavailable: {0}")]
    AppUnavailable(hyper_util::client::legacy::Error),
    /// The exchange with the local app failed after the request was sent.
    #[error("app reset: {0}")]
    AppReset(hyper_util::client::legacy::Error),
    /// Routes are attached to the service and none matches the request (Gateway API: 404).
    #[error("no route matches the request")]
    NoRoute,
    /// The matched rule's backend is not in the config, or every backend weighs 0
    /// (Gateway API: 500).
    #[error("the route's backend is unavailable")]
    RouteBackend,
    /// An EgressPolicy refuses the destination outside the mesh.
    #[error("egress denied by policy")]
    EgressDenied,
    /// The egress name does not exist, or has no address (NXDOMAIN or no A/AAAA record).
    #[error("egress name not found in DNS")]
    EgressNotFound,
    /// The egress name could not be resolved (no name server answered, or an error).
    #[error("DNS lookup failed: {0}")]
    EgressDns(String),
    /// A redirected connection names (SNI or Host) a host whose addresses do not include the
    /// address it was sent to: the name is not where the connection goes.
    #[error("the connection's hostname does not resolve to its destination")]
    EgressAddressMismatch,
}

impl ProxyError {
    /// The `reason` label, also the body of the response.
    pub fn reason(&self) -> &'static str {
        match self {
            ProxyError::UnknownService => "unknown_service",
            ProxyError::NoEndpoints => "no_endpoints",
            ProxyError::BadRequestTarget => "bad_request_target",
            ProxyError::BadRequestBody => "bad_request_body",
            ProxyError::RequestTimeout(_) => "request_timeout",
            ProxyError::Endpoint(e) => e.reason(),
            ProxyError::AppUnavailable(_) => "app_unavailable",
            ProxyError::AppReset(_) => "app_reset",
            ProxyError::NoRoute => "no_route",
            ProxyError::RouteBackend => "route_backend_unavailable",
            ProxyError::EgressDenied => "egress_denied",
            ProxyError::EgressNotFound => "dns_nxdomain",
            ProxyError::EgressDns(_) => "dns_error",
            ProxyError::EgressAddressMismatch => "egress_address_mismatch",
        }
    }

    pub fn http_status(&self) -> StatusCode {
        match self {
            ProxyError::UnknownService | ProxyError::NoEndpoints => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::BadRequestTarget | ProxyError::BadRequestBody => StatusCode::BAD_REQUEST,
            ProxyError::RequestTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Endpoint(e) if e.is_timeout() => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Endpoint(_) | ProxyError::AppUnavailable(_) | ProxyError::AppReset(_) => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::RouteBackend => StatusCode::INTERNAL_SERVER_ERROR,
            ProxyError::EgressDenied | ProxyError::EgressAddressMismatch => StatusCode::FORBIDDEN,
            ProxyError::EgressNotFound | ProxyError::EgressDns(_) => StatusCode::BAD_GATEWAY,
        }
    }

    /// The gRPC status code (`DEADLINE_EXCEEDED` 4, `PERMISSION_DENIED` 7, `UNIMPLEMENTED` 12,
    /// `INTERNAL` 13, `UNAVAILABLE` 14).
    pub fn grpc_code(&self) -> u8 {
        if matches!(self, ProxyError::NoRoute) {
            return 12;
        }
        if self.http_status() == StatusCode::FORBIDDEN {
            return 7;
        }
        match self.http_status() {
            StatusCode::GATEWAY_TIMEOUT => 4,
            StatusCode::BAD_REQUEST | StatusCode::INTERNAL_SERVER_ERROR => 13,
            _ => 14,
        }
    }

    /// The request never reached an app: another endpoint may take it.
    pub fn never_reached_app(&self) -> bool {
        match self {
            ProxyError::AppUnavailable(_) => true,
            ProxyError::Endpoint(e) => e.not_sent(),
            _ => false,
        }
    }

    /// The answer to a caller; `grpc` when it asked in gRPC.
    pub fn response(&self, grpc: bool) -> Response<RspBody> {
        let reason = self.reason();
        let mut rsp = if grpc {
            phttp::grpc_response(self.grpc_code(), reason)
        } else {
            phttp::local_response(self.http_status(), format!("{reason}\n"))
        };
        if self.never_reached_app() || matches!(self, ProxyError::Endpoint(_)) {
            rsp.headers_mut()
                .insert(phttp::PROXY_ERROR, HeaderValue::from_static(reason));
        }
        rsp
    }
}

/// The TCP form of the rescue layer: a connection the proxy could not carry is reset (not
/// closed: a FIN would look like an answer to a server-speaks-first client) and the reason
/// counted, as for HTTP.
pub fn rescue_tcp(
    metrics: &Metrics,
    direction: Direction,
    tcp: &tokio::net::TcpStream,
    e: &ProxyError,
) {
    let reason = e.reason();
    metrics.proxy_error(direction, reason);
    // Kept for dashboards built on it: a refused opaque connection.
    metrics.refuse(direction, reason);
    tracing::debug!(?direction, reason, error = %e, "resetting a TCP connection the proxy could not carry");
    if let Err(err) = socket2::SockRef::from(tcp).set_linger(Some(Duration::ZERO)) {
        tracing::debug!(error = %err, "cannot set SO_LINGER; the connection closes instead");
    }
}

/// The top of an HTTP stack: answers and counts what the stack below failed with.
#[derive(Clone)]
pub struct RescueLayer {
    metrics: Arc<Metrics>,
    direction: Direction,
}

impl RescueLayer {
    pub fn new(metrics: Arc<Metrics>, direction: Direction) -> Self {
        Self { metrics, direction }
    }
}

impl<S> tower::Layer<S> for RescueLayer {
    type Service = Rescue<S>;
    fn layer(&self, inner: S) -> Rescue<S> {
        Rescue {
            inner,
            layer: self.clone(),
            not_ready: None,
        }
    }
}

pub struct Rescue<S> {
    inner: S,
    layer: RescueLayer,
    /// The inner service failed to become ready: the next call is answered with this instead
    /// of calling it.
    not_ready: Option<ProxyError>,
}

impl<S: Clone> Clone for Rescue<S> {
    fn clone(&self) -> Self {
        Rescue {
            inner: self.inner.clone(),
            layer: self.layer.clone(),
            not_ready: None,
        }
    }
}

impl<S, B> tower::Service<Request<B>> for Rescue<S>
where
    S: tower::Service<Request<B>, Response = Response<RspBody>, Error = ProxyError>,
{
    type Response = Response<RspBody>;
    type Error = Infallible;
    type Future = RescueFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        if self.not_ready.is_some() {
            return Poll::Ready(Ok(()));
        }
        match self.inner.poll_ready(cx) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
            Poll::Ready(Err(e)) => {
                self.not_ready = Some(e);
                Poll::Ready(Ok(()))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let grpc = phttp::is_grpc(&req);
        let (inner, error) = match self.not_ready.take() {
            Some(e) => (None, Some(e)),
            None => (Some(self.inner.call(req)), None),
        };
        RescueFuture {
            inner,
            error,
            grpc,
            layer: self.layer.clone(),
        }
    }
}

pin_project_lite::pin_project! {
    /// The inner call's response, or the answer to its error.
    pub struct RescueFuture<F> {
        #[pin]
        inner: Option<F>,
        // An error known before the call (the inner service was not ready).
        error: Option<ProxyError>,
        grpc: bool,
        layer: RescueLayer,
    }
}

impl<F> Future for RescueFuture<F>
where
    F: Future<Output = Result<Response<RspBody>, ProxyError>>,
{
    type Output = Result<Response<RspBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let e = match (this.error.take(), this.inner.as_pin_mut()) {
            (Some(e), _) => e,
            (None, Some(inner)) => match inner.poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(rsp)) => return Poll::Ready(Ok(rsp)),
                Poll::Ready(Err(e)) => e,
            },
            (None, None) => return Poll::Ready(Ok(ProxyError::NoEndpoints.response(*this.grpc))),
        };
        let (layer, reason) = (&*this.layer, e.reason());
        layer.metrics.proxy_error(layer.direction, reason);
        if matches!(e, ProxyError::BadRequestBody) {
            layer
                .metrics
                .refuse_request(layer.direction, "bad_request_body");
        } else {
            tracing::debug!(direction = ?layer.direction, reason, error = %e, "request failed in the proxy");
        }
        Poll::Ready(Ok(e.response(*this.grpc)))
    }
}
