//! The service's retry policy, within its retry budget, as a layer of the outbound HTTP
//! stack.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future;
use http::{Request, Response};
use http_body::Body as _;
use palisade_api::call::RetryPolicy;
use tower::ServiceExt;
use tower::retry::budget::Budget as _;

use super::call::{Answer, Call, idempotent};
use crate::errors::ProxyError;
use crate::http::{OutBody, RspBody};
use crate::telemetry::Metrics;

/// The largest request body kept for a retry: a longer one (or one of unknown length) is sent
/// once. Linkerd's replay body has the same bound.
pub const MAX_REPLAY_BODY: u64 = 64 * 1024;

/// Retries per the service's policy: responses with one of its status codes and failures to
/// reach an endpoint, for idempotent methods only (a request that never left the proxy goes to
/// another endpoint in [`Balance`] whatever its method), within the service's retry budget
/// (20% of its requests, and at least 10 a second), with exponential backoff and jitter.
#[derive(Clone)]
pub(crate) struct RetryLayer {
    metrics: Arc<Metrics>,
}

impl RetryLayer {
    pub(crate) fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl<S> tower::Layer<S> for RetryLayer {
    type Service = Retry<S>;
    fn layer(&self, inner: S) -> Retry<S> {
        Retry {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct Retry<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S> tower::Service<Call> for Retry<S>
where
    S: tower::Service<Call, Response = Response<RspBody>, Error = ProxyError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = Response<RspBody>;
    type Error = ProxyError;
    type Future = future::Either<S::Future, Answer>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let Some(policy) = call.retry_policy().cloned() else {
            return future::Either::Left(self.inner.call(call));
        };
        let inner = self.inner.clone();
        let metrics = self.metrics.clone();
        future::Either::Right(Box::pin(retrying(inner, call, policy, metrics)))
    }
}

/// Whether a failed attempt may be tried again (the policy allowing).
fn retryable(result: &Result<Response<RspBody>, ProxyError>, policy: &RetryPolicy) -> bool {
    match result {
        Ok(rsp) => policy.retries_status(rsp.status().as_u16()),
        // No endpoints: another attempt would find none either.
        Err(ProxyError::Endpoint(_)) => true,
        // Inside the retry layer a timeout is an attempt's (a rule's `backendRequest`; the
        // request's own timeout is above): another attempt may be faster, as Envoy's
        // per-try timeout.
        Err(ProxyError::RequestTimeout(_)) => true,
        Err(_) => false,
    }
}

async fn retrying<S>(
    inner: S,
    call: Call,
    policy: RetryPolicy,
    metrics: Arc<Metrics>,
) -> Result<Response<RspBody>, ProxyError>
where
    S: tower::Service<Call, Response = Response<RspBody>, Error = ProxyError> + Clone,
{
    call.svc.budget.deposit();
    let replayable = idempotent(call.req.method())
        && call
            .req
            .body()
            .size_hint()
            .exact()
            .is_some_and(|n| n <= MAX_REPLAY_BODY);
    if !replayable {
        return inner.oneshot(call).await;
    }
    let Call { svc, req, rule } = call;
    let (parts, body) = req.into_parts();
    let body = http_body_util::BodyExt::collect(body)
        .await
        .map_err(|_| ProxyError::BadRequestBody)?
        .to_bytes();
    let head = Request::from_parts(parts, ());
    let copy = |head: &Request<()>| {
        let mut r = Request::new(OutBody::buffered(body.clone()));
        *r.method_mut() = head.method().clone();
        *r.uri_mut() = head.uri().clone();
        *r.version_mut() = head.version();
        *r.headers_mut() = head.headers().clone();
        r
    };
    let mut backoff = policy.backoff;
    for attempt in 1..=policy.attempts {
        let result = inner
            .clone()
            .oneshot(Call {
                svc: svc.clone(),
                req: copy(&head),
                rule: rule.clone(),
            })
            .await;
        if !retryable(&result, &policy) {
            return result;
        }
        if attempt == policy.attempts {
            metrics.retry("gave_up");
            return result;
        }
        if !svc.budget.withdraw() {
            metrics.retry("budget_exhausted");
            return result;
        }
        metrics.retry("retried");
        tracing::debug!(service = %svc.cfg.key, attempt, "retrying");
        drop(result);
        // ±25% so clients that failed together do not retry together.
        let jitter = 0.75 + f64::from(rand::random::<u16>()) / f64::from(u16::MAX) / 2.0;
        tokio::time::sleep(backoff.mul_f64(jitter)).await;
        // Doubling, but no single wait longer than a policy may ask for: without a request
        // timeout, 10 attempts must not add up to an hour.
        backoff = backoff
            .saturating_mul(2)
            .min(palisade_api::call::MAX_BACKOFF);
    }
    Err(ProxyError::NoEndpoints)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use http::StatusCode;

    use super::*;
    use crate::http as phttp;
    use crate::outbound::http::tests::call;

    fn status(s: StatusCode) -> Response<RspBody> {
        phttp::local_response(s, "")
    }

    #[tokio::test(start_paused = true)]
    async fn retries_back_off_exponentially_and_stop_at_a_success() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let flaky = tower::service_fn(move |_c: Call| {
            let n = counted.fetch_add(1, Ordering::Relaxed);
            async move {
                Ok::<_, ProxyError>(status(if n < 2 {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::OK
                }))
            }
        });
        let policy = RetryPolicy {
            codes: vec![503],
            attempts: 3,
            backoff: Duration::from_millis(100),
        };
        let start = tokio::time::Instant::now();
        let r = Retry {
            inner: flaky,
            metrics: Metrics::new(),
        }
        .oneshot(call(None, Some(policy)))
        .await
        .expect("a response");
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(calls.load(Ordering::Relaxed), 3);
        // 100 ms then 200 ms, each ±25%.
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(225) && waited <= Duration::from_millis(375),
            "{waited:?}"
        );
    }
}
