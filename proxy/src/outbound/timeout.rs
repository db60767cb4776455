//! The service's request timeout, as a layer of the outbound HTTP stack.

use std::task::{Context, Poll};

use http::Response;

use super::call::Call;
use crate::errors::ProxyError;
use crate::http::RspBody;

/// A timeout until the response headers: past it the caller gets 504 / `DEADLINE_EXCEEDED`.
/// Above the retry layer it is the request's (the route rule's `timeouts.request`, else the
/// service's), over every attempt; below it, each attempt's (`timeouts.backendRequest`).
#[derive(Clone, Copy)]
pub(crate) enum TimeoutLayer {
    Request,
    Attempt,
}

impl<S> tower::Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;
    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout {
            inner,
            scope: *self,
        }
    }
}

#[derive(Clone)]
pub(crate) struct Timeout<S> {
    inner: S,
    scope: TimeoutLayer,
}

impl<S> tower::Service<Call> for Timeout<S>
where
    S: tower::Service<Call, Response = Response<RspBody>, Error = ProxyError>,
{
    type Response = Response<RspBody>;
    type Error = ProxyError;
    type Future = TimeoutFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let limit = match self.scope {
            TimeoutLayer::Request => call.request_timeout(),
            TimeoutLayer::Attempt => call.attempt_timeout(),
        };
        TimeoutFuture {
            inner: self.inner.call(call),
            sleep: limit.map(tokio::time::sleep),
            limit,
        }
    }
}

pin_project_lite::pin_project! {
    /// The inner call, failed with [`ProxyError::RequestTimeout`] at the limit; no timer
    /// without one.
    pub(crate) struct TimeoutFuture<F> {
        #[pin]
        inner: F,
        #[pin]
        sleep: Option<tokio::time::Sleep>,
        limit: Option<std::time::Duration>,
    }
}

impl<F> std::future::Future for TimeoutFuture<F>
where
    F: std::future::Future<Output = Result<Response<RspBody>, ProxyError>>,
{
    type Output = F::Output;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(out) = this.inner.poll(cx) {
            return Poll::Ready(out);
        }
        match (this.sleep.as_pin_mut(), *this.limit) {
            (Some(sleep), Some(limit)) => match sleep.poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(ProxyError::RequestTimeout(limit))),
                Poll::Pending => Poll::Pending,
            },
            _ => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tower::ServiceExt;

    use super::*;
    use crate::outbound::http::tests::call;

    #[tokio::test(start_paused = true)]
    async fn a_request_without_an_answer_times_out_at_the_services_timeout() {
        let never = tower::service_fn(|_c: Call| {
            futures_util::future::pending::<Result<Response<RspBody>, ProxyError>>()
        });
        let start = tokio::time::Instant::now();
        let r = Timeout {
            inner: never,
            scope: TimeoutLayer::Request,
        }
        .oneshot(call(Some(Duration::from_secs(2)), None))
        .await;
        assert!(matches!(r, Err(ProxyError::RequestTimeout(d)) if d == Duration::from_secs(2)));
        assert_eq!(start.elapsed(), Duration::from_secs(2));
    }
}
