//! HTTP pieces shared by the inbound and outbound stacks: the body types, header hygiene between
//! HTTP/1 and HTTP/2, local error responses, and serving a connection.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

use crate::telemetry::{Direction, Label, Metrics};

/// Responses are either the peer's body, streamed, or a small local body (errors, denials).
pub type RspBody = Either<PeerBody, Full<Bytes>>;

/// A response body from a peer proxy or the app, streamed, and cancelled when the service's
/// stream idle timeout passes without a frame (Linkerd's `timeout.linkerd.io/idle`). Without
/// a timeout it is the body as it came, at no cost.
///
/// A gRPC call whose stream fails (it idles out, or the peer resets it) ends with trailers
/// carrying the gRPC status (`DEADLINE_EXCEEDED`, `UNAVAILABLE`) instead of a broken stream,
/// as linkerd2-proxy's rescue does for bodies: a gRPC client then sees a status, not a
/// transport error.
pub struct PeerBody {
    inner: Incoming,
    idle: Option<IdleTimer>,
    grpc: bool,
    /// Ended by a rescue trailer: nothing follows it.
    done: bool,
}

struct IdleTimer {
    limit: std::time::Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
    metrics: Arc<Metrics>,
    direction: Direction,
}

/// Why a streamed response body ended early.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error(transparent)]
    Peer(#[from] hyper::Error),
    #[error("no frame for {0:?}: the response stream idled out")]
    Idle(std::time::Duration),
}

impl PeerBody {
    /// The body as it came; `grpc` when it answers a gRPC call.
    pub fn new(inner: Incoming, grpc: bool) -> Self {
        PeerBody {
            inner,
            idle: None,
            grpc,
            done: false,
        }
    }

    /// `inner`, cancelled after `limit` without a frame (counted as `stream_idle_timeout`).
    pub fn with_idle_timeout(
        inner: Incoming,
        grpc: bool,
        limit: Option<std::time::Duration>,
        metrics: &Arc<Metrics>,
        direction: Direction,
    ) -> Self {
        let idle = limit.map(|limit| IdleTimer {
            limit,
            sleep: Box::pin(tokio::time::sleep(limit)),
            metrics: metrics.clone(),
            direction,
        });
        PeerBody {
            inner,
            idle,
            grpc,
            done: false,
        }
    }

    /// The end of a failed stream: for gRPC, trailers with `code` (the caller sees a status);
    /// otherwise the error itself.
    fn fail(
        &mut self,
        error: BodyError,
        code: u8,
        reason: &'static str,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BodyError>>> {
        if !self.grpc {
            return Poll::Ready(Some(Err(error)));
        }
        self.done = true;
        let mut trailers = HeaderMap::new();
        let code = match code {
            4 => HeaderValue::from_static("4"),
            _ => HeaderValue::from_static("14"),
        };
        trailers.insert("grpc-status", code);
        trailers.insert("grpc-message", HeaderValue::from_static(reason));
        Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))))
    }
}

impl http_body::Body for PeerBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Err(e))) => this.fail(BodyError::Peer(e), 14, "peer_reset"),
            Poll::Ready(frame) => {
                if let Some(t) = &mut this.idle {
                    let next = tokio::time::Instant::now() + t.limit;
                    t.sleep.as_mut().reset(next);
                }
                Poll::Ready(frame.map(|f| f.map_err(BodyError::Peer)))
            }
            Poll::Pending => {
                let Some(t) = &mut this.idle else {
                    return Poll::Pending;
                };
                if t.sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                t.metrics.proxy_error(t.direction, "stream_idle_timeout");
                tracing::debug!(limit = ?t.limit, "cancelling a response stream that idled out");
                let limit = t.limit;
                this.fail(BodyError::Idle(limit), 4, "stream_idle_timeout")
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Between proxies, the HTTP version the app spoke when it was HTTP/1.x (requests are
/// multiplexed over HTTP/2, and the receiving proxy restores the version).
pub const ORIG_PROTO: HeaderName = HeaderName::from_static("palisade-orig-proto");
pub const XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

/// The identity and address of the endpoint that answered, set by the outbound endpoint
/// service so the telemetry layer can label the request and its span with them.
#[derive(Clone, Debug)]
pub struct DstIdentity {
    pub identity: Label,
    pub endpoint: Option<std::net::SocketAddr>,
}

/// The route rule that took a request (`namespace/name/rule`), for the `route` label.
#[derive(Clone, Debug)]
pub struct RouteLabel(pub Label);

/// A response the proxy makes itself. A `&'static str` body is not copied.
pub fn local_response(status: StatusCode, body: impl Into<Bytes>) -> Response<RspBody> {
    let mut rsp = Response::new(Either::Right(Full::new(body.into())));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    rsp
}

/// A gRPC error in trailers-only form (HTTP 200, `grpc-status` in the headers).
pub fn grpc_response(code: u8, message: &'static str) -> Response<RspBody> {
    let mut rsp = Response::new(Either::Right(Full::new(Bytes::new())));
    let h = rsp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    // gRPC codes are 0-16; anything else is UNKNOWN. The digits are static: no allocation.
    const CODES: [&str; 17] = [
        "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
    ];
    let code = HeaderValue::from_static(CODES.get(usize::from(code)).copied().unwrap_or("2"));
    h.insert("grpc-status", code);
    h.insert("grpc-message", HeaderValue::from_static(message));
    rsp
}

pub fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// An HTTP/1.1 upgrade (WebSocket) or CONNECT: not multiplexed, proxied on its own connection.
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    if req.method() == http::Method::CONNECT {
        return true;
    }
    req.version() <= Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| has_token(v.as_bytes(), b"upgrade"))
}

fn has_token(list: &[u8], token: &[u8]) -> bool {
    list.split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// Removes connection-specific headers that HTTP/2 forbids (RFC 9113 §8.2.2), including those
/// named by `Connection`. `keep_upgrade` leaves `Connection`/`Upgrade` for an upgrade request.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    if !keep_upgrade {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .filter_map(|t| HeaderName::from_bytes(t.trim_ascii()).ok())
            .collect();
        for n in named {
            headers.remove(n);
        }
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    headers.remove(header::TRANSFER_ENCODING);
    if headers
        .get(header::TE)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        headers.remove(header::TE);
    }
}

/// Gives a request an absolute URI (`http://authority/path`): HTTP/2 and the pooled app clients
/// need one, while HTTP/1 requests arrive in origin form with a Host header. `fallback` is the
/// authority when the request names none.
pub fn set_absolute_uri<B>(req: &mut Request<B>, fallback: &str) -> Result<(), StatusCode> {
    if req.uri().scheme().is_some() && req.uri().authority().is_some() {
        return Ok(());
    }
    // The parts the request already has are reused (shared bytes, not copies): only a Host
    // header is parsed, once.
    let authority = match (req.uri().authority(), req.headers().get(header::HOST)) {
        (Some(a), _) => a.clone(),
        (None, Some(h)) => {
            http::uri::Authority::try_from(h.as_bytes()).map_err(|_| StatusCode::BAD_REQUEST)?
        }
        (None, None) => fallback.parse().map_err(|_| StatusCode::BAD_REQUEST)?,
    };
    let mut parts = std::mem::take(req.uri_mut()).into_parts();
    parts.scheme = Some(http::uri::Scheme::HTTP);
    parts.authority = Some(authority);
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    *req.uri_mut() = http::Uri::from_parts(parts).map_err(|_| StatusCode::BAD_REQUEST)?;
    Ok(())
}

/// Drives a hyper server connection to its end, or, once the proxy stops, asks it to finish
/// in-flight requests and waits for that. A macro because hyper's HTTP/2 and upgradeable
/// HTTP/1.1 connections share `graceful_shutdown` by name only, not by a trait.
/// Its value: the connection's own end (an error counts), or None when the proxy stopped it.
macro_rules! until_stopped {
    ($conn:ident, $stop:ident, $expires:ident) => {{
        tokio::pin!($conn);
        let expired = crate::identity::until($expires);
        tokio::select! {
            r = $conn.as_mut() => Some(r),
            _ = $stop.changed() => {
                $conn.as_mut().graceful_shutdown();
                let _ = $conn.await;
                None
            }
            _ = expired => {
                tracing::debug!("a certificate of this connection expired: closing it gracefully");
                $conn.as_mut().graceful_shutdown();
                let _ = $conn.await;
                None
            }
        }
    }};
}

/// Serves one connection with HTTP/2 or HTTP/1.1 (with upgrades), with the proxy's limits, and
/// shuts it down gracefully when the proxy stops or at `expires` (when a certificate the
/// connection was authenticated with runs out: in-flight requests finish, new ones go to a
/// new connection and a new handshake).
pub(crate) async fn serve_connection<I, S, B>(
    ctx: &crate::Ctx,
    io: I,
    svc: S,
    h2: bool,
    direction: crate::telemetry::Direction,
    expires: Option<tokio::time::Instant>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: tower::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let svc = hyper_util::service::TowerToHyperService::new(svc);
    let io = TokioIo::new(io);
    let mut stop = ctx.stop_rx.clone();
    let limits = &ctx.cfg.limits;
    if h2 {
        let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        b.max_concurrent_streams(limits.max_concurrent_streams)
            .max_header_list_size(limits.max_header_bytes as u32)
            .max_pending_accept_reset_streams(limits.h2_max_pending_resets)
            .max_local_error_reset_streams(limits.h2_max_local_error_resets)
            .initial_stream_window_size(1 << 20)
            .initial_connection_window_size(4 << 20)
            .timer(TokioTimer::new())
            .keep_alive_interval(std::time::Duration::from_secs(30));
        let conn = b.serve_connection(io, svc);
        let result = until_stopped!(conn, stop, expires);
        count_connection_error(ctx, direction, result);
    } else {
        let mut b = hyper::server::conn::http1::Builder::new();
        b.max_buf_size(limits.max_header_bytes.max(8192))
            .timer(TokioTimer::new())
            .header_read_timeout(Some(ctx.cfg.timeouts.header_read));
        let conn = b.serve_connection(io, svc).with_upgrades();
        let result = until_stopped!(conn, stop, expires);
        count_connection_error(ctx, direction, result);
    }
}

/// Why a client's HTTP connection ended in an error the proxy raised, as the label of
/// `palisade_http_connection_errors_total`; None for a client that merely went away.
///
/// The abuse defences live in hyper and h2 (well-fuzzed, shared with most of the Rust
/// ecosystem); this only makes them visible: an HTTP/2 client that resets streams faster than
/// they are served (CVE-2023-44487) or makes the proxy reset too many is sent GOAWAY
/// `ENHANCE_YOUR_CALM`; an oversized or endless header block (CONTINUATION flood, HPACK bomb)
/// ends in a protocol or size error; a slow HTTP/1 header read times out.
pub(crate) fn connection_error_reason(e: &hyper::Error) -> Option<&'static str> {
    if e.is_timeout() {
        return Some("header_timeout");
    }
    if e.is_parse_too_large() {
        return Some("header_too_large");
    }
    if e.is_parse() || e.is_parse_version_h2() {
        return Some("bad_http1");
    }
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        if let Some(h2e) = err.downcast_ref::<h2::Error>() {
            if h2e.is_io() || h2e.is_remote() {
                return None;
            }
            return Some(match h2e.reason() {
                Some(h2::Reason::ENHANCE_YOUR_CALM) => "h2_enhance_your_calm",
                Some(h2::Reason::COMPRESSION_ERROR) => "h2_compression",
                Some(h2::Reason::FRAME_SIZE_ERROR) => "h2_frame_size",
                Some(h2::Reason::PROTOCOL_ERROR) => "h2_protocol",
                _ => "h2_other",
            });
        }
        source = err.source();
    }
    None
}

fn count_connection_error(
    ctx: &crate::Ctx,
    direction: crate::telemetry::Direction,
    result: Option<Result<(), hyper::Error>>,
) {
    let Some(Err(e)) = result else {
        return;
    };
    match connection_error_reason(&e) {
        Some(reason) => {
            tracing::debug!(?direction, reason, error = %e, "HTTP connection closed on an error");
            ctx.metrics.http_connection_error(direction, reason);
        }
        None => tracing::trace!(?direction, error = %e, "HTTP client went away"),
    }
}

/// Set by a proxy on a response it made itself because the request never reached an app
/// (Linkerd's `l5d-proxy-error`): the caller's proxy may send a bodiless request elsewhere.
pub const PROXY_ERROR: HeaderName = HeaderName::from_static("palisade-proxy-error");

/// The body a proxy sends upstream: the client's body, watched so that a failure of the
/// *client's* body (a malformed chunk) is not blamed on the upstream, or nothing (a bodiless
/// request being retried).
pub struct OutBody {
    inner: Option<Incoming>,
    /// A buffered body (a request being retried), sent once.
    buffered: Option<Bytes>,
    /// Set when the client's body failed. Only requests that have a body carry one, so a
    /// bodiless request costs no allocation.
    failed: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// The client's body bytes read so far, for cost attribution (the telemetry layer made
    /// it: [`crate::telemetry::request::RequestBytes`]).
    tally: Option<Arc<std::sync::atomic::AtomicU64>>,
}

/// Tells, after a failed exchange, whether the client's body was at fault.
#[derive(Clone, Default)]
pub struct BodyWatch(Option<Arc<std::sync::atomic::AtomicBool>>);

impl BodyWatch {
    pub fn client_failed(&self) -> bool {
        self.0
            .as_ref()
            .is_some_and(|f| f.load(std::sync::atomic::Ordering::Relaxed))
    }
}

impl OutBody {
    /// Wraps a client's body; the watch reports whether that body failed. The bytes read are
    /// added to the request's [`RequestBytes`](crate::telemetry::request::RequestBytes) when
    /// `extensions` carry one.
    pub fn watched(body: Incoming, extensions: &http::Extensions) -> (OutBody, BodyWatch) {
        use http_body::Body as _;
        if body.is_end_stream() {
            return (
                OutBody {
                    inner: Some(body),
                    buffered: None,
                    failed: None,
                    tally: None,
                },
                BodyWatch(None),
            );
        }
        let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tally = extensions
            .get::<crate::telemetry::request::RequestBytes>()
            .map(|t| t.0.clone());
        (
            OutBody {
                inner: Some(body),
                buffered: None,
                failed: Some(flag.clone()),
                tally,
            },
            BodyWatch(Some(flag)),
        )
    }

    pub fn empty() -> OutBody {
        OutBody {
            inner: None,
            buffered: None,
            failed: None,
            tally: None,
        }
    }

    /// Tells, after a failed exchange, whether this body (the client's) was at fault.
    pub fn watch(&self) -> BodyWatch {
        BodyWatch(self.failed.clone())
    }

    /// A body already read whole (empty bytes: no body).
    pub fn buffered(bytes: Bytes) -> OutBody {
        OutBody {
            inner: None,
            buffered: (!bytes.is_empty()).then_some(bytes),
            failed: None,
            tally: None,
        }
    }
}

impl http_body::Body for OutBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if let Some(bytes) = this.buffered.take() {
            return Poll::Ready(Some(Ok(http_body::Frame::data(bytes))));
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        match (&polled, &this.failed, &this.tally) {
            (Poll::Ready(Some(Err(_))), Some(f), _) => {
                f.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            (Poll::Ready(Some(Ok(frame))), _, Some(t)) => {
                if let Some(d) = frame.data_ref() {
                    t.fetch_add(d.len() as u64, std::sync::atomic::Ordering::Relaxed);
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.buffered.is_none()
            && self
                .inner
                .as_ref()
                .is_none_or(http_body::Body::is_end_stream)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match (&self.buffered, &self.inner) {
            (Some(b), _) => http_body::SizeHint::with_exact(b.len() as u64),
            (None, Some(b)) => http_body::Body::size_hint(b),
            (None, None) => http_body::SizeHint::with_exact(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn absolute(uri: &str, host: Option<&str>) -> Result<String, StatusCode> {
        let mut b = Request::builder().uri(uri);
        if let Some(h) = host {
            b = b.header(header::HOST, h);
        }
        let mut req = b.body(()).map_err(|_| StatusCode::IM_A_TEAPOT)?;
        set_absolute_uri(&mut req, "fallback.demo:8080")?;
        Ok(req.uri().to_string())
    }

    #[test]
    fn an_absolute_uri_keeps_the_request_target_and_takes_the_authority_in_order() {
        // Already absolute: untouched.
        assert_eq!(
            absolute("http://api.demo:8080/a?b=1", Some("other")),
            Ok("http://api.demo:8080/a?b=1".into())
        );
        // Origin form: the Host header, path and query as they were.
        assert_eq!(
            absolute("/x/y?z=%20", Some("api.demo:8080")),
            Ok("http://api.demo:8080/x/y?z=%20".into())
        );
        // No Host (HTTP/1.0): the fallback.
        assert_eq!(
            absolute("/x", None),
            Ok("http://fallback.demo:8080/x".into())
        );
        // Authority form (CONNECT-like): the path becomes `/`.
        assert_eq!(
            absolute("api.demo:443", None),
            Ok("http://api.demo:443/".into())
        );
        // A Host that is no authority is the client's error.
        assert_eq!(
            absolute("/x", Some("bad host")),
            Err(StatusCode::BAD_REQUEST)
        );
    }
}
