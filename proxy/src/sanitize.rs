//! Request hygiene at the top of an HTTP stack: what a request must look like before anything
//! (authorization, routing, the app) reads it.
//!
//! - Two `Host` headers are refused (RFC 9112 §3.2): the proxy and the app could each pick a
//!   different one, and a `hosts` rule would check the wrong name.
//! - On the inbound side the path is normalized ([`crate::normalize`]) at the level the
//!   control plane sets, and the request continues with the normalized path, so authorization
//!   and the app read the same path. A path that cannot be normalized safely is refused.
//!
//! Refusals are 400s answered here and counted as `palisade_requests_refused_total{reason}`.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::{Either, Ready, ready};
use http::{Request, Response, StatusCode, Uri};

use crate::http::{self as phttp, RspBody};
use crate::normalize::{PathNormalization, normalize};
use crate::telemetry::{Direction, Metrics};

/// Where the layer reads the normalization level; None turns normalization off (the outbound
/// side, where the receiving proxy normalizes).
pub type LevelFn = Arc<dyn Fn() -> PathNormalization + Send + Sync>;

#[derive(Clone)]
pub struct SanitizeLayer {
    metrics: Arc<Metrics>,
    direction: Direction,
    level: Option<LevelFn>,
}

impl SanitizeLayer {
    pub fn new(metrics: Arc<Metrics>, direction: Direction, level: Option<LevelFn>) -> Self {
        SanitizeLayer {
            metrics,
            direction,
            level,
        }
    }
}

impl<S> tower::Layer<S> for SanitizeLayer {
    type Service = Sanitize<S>;
    fn layer(&self, inner: S) -> Sanitize<S> {
        Sanitize {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Sanitize<S> {
    inner: S,
    layer: SanitizeLayer,
}

/// Why a request was refused before the stack saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    DuplicateHost,
    BadPath(crate::normalize::PathError),
}

impl Refusal {
    fn reason(self) -> &'static str {
        match self {
            Refusal::DuplicateHost => "duplicate_host",
            Refusal::BadPath(_) => "bad_path",
        }
    }

    fn body(self) -> &'static str {
        match self {
            Refusal::DuplicateHost => "bad request: more than one Host header\n",
            Refusal::BadPath(crate::normalize::PathError::Nul) => {
                "bad request: the path contains %00\n"
            }
            Refusal::BadPath(crate::normalize::PathError::BadEscape) => {
                "bad request: malformed percent-escape in the path\n"
            }
            Refusal::BadPath(crate::normalize::PathError::BadByte) => {
                "bad request: invalid byte in the path\n"
            }
        }
    }
}

/// Checks a request and rewrites its path in place; Err says why it must be refused.
pub fn check<B>(req: &mut Request<B>, level: Option<PathNormalization>) -> Result<(), Refusal> {
    let mut hosts = req.headers().get_all(http::header::HOST).iter();
    if hosts.next().is_some() && hosts.next().is_some() {
        return Err(Refusal::DuplicateHost);
    }
    let Some(level) = level else {
        return Ok(());
    };
    let Some(pq) = req.uri().path_and_query() else {
        return Ok(());
    };
    // `OPTIONS *` has no path to normalize.
    if pq.as_str() == "*" {
        return Ok(());
    }
    let normalized = match normalize(pq.as_str(), level).map_err(Refusal::BadPath)? {
        std::borrow::Cow::Borrowed(_) => return Ok(()),
        std::borrow::Cow::Owned(n) => n,
    };
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query = Some(
        normalized
            .parse()
            .map_err(|_| Refusal::BadPath(crate::normalize::PathError::BadByte))?,
    );
    *req.uri_mut() = Uri::from_parts(parts)
        .map_err(|_| Refusal::BadPath(crate::normalize::PathError::BadByte))?;
    Ok(())
}

impl<S, B> tower::Service<Request<B>> for Sanitize<S>
where
    S: tower::Service<Request<B>, Response = Response<RspBody>, Error = Infallible>,
{
    type Response = Response<RspBody>;
    type Error = Infallible;
    type Future = Either<Ready<Result<Response<RspBody>, Infallible>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let level = self.layer.level.as_ref().map(|f| f());
        match check(&mut req, level) {
            Ok(()) => Either::Right(self.inner.call(req)),
            Err(r) => {
                self.layer
                    .metrics
                    .refuse_request(self.layer.direction, r.reason());
                tracing::debug!(reason = r.reason(), uri = %req.uri(), "request refused");
                Either::Left(ready(Ok(phttp::local_response(
                    StatusCode::BAD_REQUEST,
                    r.body(),
                ))))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uri: &str) -> Request<()> {
        Request::builder().uri(uri).body(()).expect("request")
    }

    #[test]
    fn rewrites_origin_and_absolute_forms() {
        let mut r = req("/x/../%61dmin?a=1");
        check(&mut r, Some(PathNormalization::Base)).expect("ok");
        assert_eq!(r.uri(), "/admin?a=1");
        let mut r = req("http://api.demo:8080/./admin");
        check(&mut r, Some(PathNormalization::Base)).expect("ok");
        assert_eq!(r.uri(), "http://api.demo:8080/admin");
        let mut r = req("*");
        check(&mut r, Some(PathNormalization::Base)).expect("ok");
        let mut r = req("/a%00");
        assert!(matches!(
            check(&mut r, Some(PathNormalization::Base)),
            Err(Refusal::BadPath(_))
        ));
        let mut r = req("/a%00");
        assert!(check(&mut r, None).is_ok(), "outbound leaves paths alone");
    }

    #[test]
    fn two_host_headers_are_refused() {
        let mut r = Request::builder()
            .uri("/")
            .header("host", "a")
            .header("host", "b")
            .body(())
            .expect("request");
        assert_eq!(check(&mut r, None), Err(Refusal::DuplicateHost));
        let mut r = Request::builder()
            .uri("/")
            .header("host", "a")
            .body(())
            .expect("request");
        assert_eq!(check(&mut r, None), Ok(()));
    }
}
