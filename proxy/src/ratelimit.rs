//! Local rate limiting (`RateLimitPolicy`, the shape of Linkerd's HTTPLocalRateLimitPolicy):
//! the inbound proxy answers 429 with `Retry-After` (gRPC `RESOURCE_EXHAUSTED`) past a limit
//! for all callers together (`total`), for each caller identity (`identity`), or for named
//! callers (`overrides`, instead of `identity`).
//!
//! Each limit is a GCRA bucket (the generic cell rate algorithm, a token bucket kept as one
//! "theoretical arrival time"): lock-free, one atomic per bucket, a burst of one second's
//! worth of requests. A connection has one peer identity, so its bucket is found once per
//! connection and again only when the config's limiter changes. Buckets live with the limiter,
//! which a config change keeps when the policy is the same (see [`Limiter::same_policy`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::{Either, Ready, ready};
use http::{HeaderValue, Request, Response, StatusCode};
use palisade_api::v1;

use crate::authz::StringMatcher;
use crate::http::{self as phttp, RspBody};
use crate::telemetry::{Label, Metrics, RateLimitLabels};

/// The most per-identity buckets kept; past it, buckets that are full again (idle callers) are
/// dropped, and a caller past that bound shares the overflow bucket.
const MAX_IDENTITIES: usize = 10_000;

/// One GCRA bucket. Times are nanoseconds since the limiter's epoch.
#[derive(Debug)]
pub struct Bucket {
    /// Nanoseconds between two requests at the limit.
    interval: u64,
    /// How far ahead of now the theoretical arrival time may run: the burst.
    tolerance: u64,
    tat: AtomicU64,
}

impl Bucket {
    pub(crate) fn new(rps: u32) -> Self {
        let interval = 1_000_000_000 / u64::from(rps.max(1));
        Bucket {
            interval,
            tolerance: interval.saturating_mul(u64::from(rps.max(1)).saturating_sub(1)),
            tat: AtomicU64::new(0),
        }
    }

    /// Takes one request at `now`; past the limit, how long until one would be admitted.
    pub(crate) fn take(&self, now: u64) -> Result<(), Duration> {
        let mut current = self.tat.load(Ordering::Acquire);
        loop {
            let tat = current.max(now);
            let ahead = tat - now;
            if ahead > self.tolerance {
                return Err(Duration::from_nanos(ahead - self.tolerance));
            }
            match self.tat.compare_exchange_weak(
                current,
                tat + self.interval,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(()),
                Err(seen) => current = seen,
            }
        }
    }

    /// Gives back what [`Bucket::take`] took, for a request another limit refused.
    fn refund(&self) {
        let _ = self
            .tat
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |tat| {
                Some(tat.saturating_sub(self.interval))
            });
    }

    /// Whether a request now would find the bucket full (an idle caller).
    fn idle(&self, now: u64) -> bool {
        self.tat.load(Ordering::Acquire) <= now
    }
}

struct Override {
    rps: u32,
    principals: Vec<StringMatcher>,
}

/// The limits of one RateLimitPolicy, with their buckets.
pub struct Limiter {
    source: v1::RateLimit,
    pub name: Label,
    epoch: tokio::time::Instant,
    total: Option<Bucket>,
    identity_rps: u32,
    overrides: Vec<Override>,
    /// Per caller identity (`None` for a caller without one): its rate and bucket.
    buckets: Mutex<HashMap<Option<Arc<str>>, Arc<Bucket>>>,
    overflow: Arc<Bucket>,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("policy", &self.source)
            .finish()
    }
}

/// Which limit refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    Total,
    Identity,
    Override,
}

impl Limit {
    fn label(self) -> &'static str {
        match self {
            Limit::Total => "total",
            Limit::Identity => "identity",
            Limit::Override => "override",
        }
    }
}

/// A caller's limits, found once per connection.
#[derive(Clone)]
pub struct CallerLimit {
    limiter: Arc<Limiter>,
    /// The caller's own bucket and whether it is an override's.
    own: Option<(Arc<Bucket>, Limit)>,
}

impl Limiter {
    pub fn compile(p: &v1::RateLimit) -> Result<Self, String> {
        let mut overrides = Vec::with_capacity(p.overrides.len());
        for (i, o) in p.overrides.iter().enumerate() {
            if o.requests_per_second == 0 {
                return Err(format!(
                    "overrides[{i}]: requestsPerSecond must be more than 0"
                ));
            }
            let principals = o
                .principals
                .iter()
                .map(StringMatcher::from_proto)
                .collect::<Result<_, _>>()
                .map_err(|e| format!("overrides[{i}].principals: {e}"))?;
            overrides.push(Override {
                rps: o.requests_per_second,
                principals,
            });
        }
        Ok(Limiter {
            source: p.clone(),
            name: Label::new(&p.name),
            epoch: tokio::time::Instant::now(),
            total: (p.total_rps > 0).then(|| Bucket::new(p.total_rps)),
            identity_rps: p.identity_rps,
            overrides,
            buckets: Mutex::new(HashMap::new()),
            overflow: Arc::new(Bucket::new(p.identity_rps.max(1))),
        })
    }

    /// Same policy: a new config keeps this limiter, and its callers their buckets.
    pub fn same_policy(&self, other: &Limiter) -> bool {
        self.source == other.source
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// The limits that apply to a caller (`peer` without `spiffe://`).
    pub fn for_caller(self: &Arc<Self>, peer: Option<&str>) -> CallerLimit {
        let bare = peer.map(|p| p.strip_prefix("spiffe://").unwrap_or(p));
        let (rps, kind) = match bare.and_then(|id| {
            self.overrides
                .iter()
                .find(|o| o.principals.iter().any(|m| m.matches(id)))
        }) {
            Some(o) => (o.rps, Limit::Override),
            None => (self.identity_rps, Limit::Identity),
        };
        if rps == 0 {
            return CallerLimit {
                limiter: self.clone(),
                own: None,
            };
        }
        let key: Option<Arc<str>> = bare.map(Arc::from);
        let bucket = match self.buckets.lock() {
            Ok(mut map) => {
                if !map.contains_key(&key) && map.len() >= MAX_IDENTITIES {
                    let now = self.now();
                    map.retain(|_, b| !b.idle(now));
                }
                if !map.contains_key(&key) && map.len() >= MAX_IDENTITIES {
                    self.overflow.clone()
                } else {
                    map.entry(key)
                        .or_insert_with(|| Arc::new(Bucket::new(rps)))
                        .clone()
                }
            }
            // A panic elsewhere poisoned the map: limit this caller with the shared bucket
            // rather than not at all.
            Err(_) => self.overflow.clone(),
        };
        CallerLimit {
            limiter: self.clone(),
            own: Some((bucket, kind)),
        }
    }
}

impl CallerLimit {
    /// Admits one request, or says which limit refused it and when to come back. The
    /// caller's own limit is checked first, so a caller over its share does not spend the
    /// total that others share.
    pub fn admit(&self) -> Result<(), (Limit, Duration)> {
        let now = self.limiter.now();
        if let Some((b, kind)) = &self.own {
            b.take(now).map_err(|d| (*kind, d))?;
        }
        if let Some(total) = &self.limiter.total
            && let Err(d) = total.take(now)
        {
            // Refused by the total: the caller's own share is not spent on it.
            if let Some((b, _)) = &self.own {
                b.refund();
            }
            return Err((Limit::Total, d));
        }
        Ok(())
    }

    pub fn limiter(&self) -> &Arc<Limiter> {
        &self.limiter
    }
}

/// The inbound stage that enforces the workload's RateLimitPolicy (after authorization: a
/// denied request spends nothing).
#[derive(Clone)]
pub struct RateLimitLayer {
    ctx: Arc<crate::Ctx>,
    peer: Option<Arc<str>>,
    peer_label: Label,
    /// The caller's limits under the limiter in force when they were found, shared by the
    /// connection's service clones (hyper clones the service per request).
    cached: Arc<arc_swap::ArcSwapOption<CallerLimit>>,
}

impl RateLimitLayer {
    pub fn new(ctx: Arc<crate::Ctx>, peer: Option<&str>, peer_label: Label) -> Self {
        RateLimitLayer {
            ctx,
            peer: peer.map(Arc::from),
            peer_label,
            cached: Arc::default(),
        }
    }
}

impl<S> tower::Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;
    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RateLimit<S> {
    inner: S,
    layer: RateLimitLayer,
}

/// The 429 (or gRPC `RESOURCE_EXHAUSTED`) answer, with `Retry-After` in whole seconds.
fn refusal<B>(req: &Request<B>, wait: Duration) -> Response<RspBody> {
    let mut rsp = if phttp::is_grpc(req) {
        phttp::grpc_response(8, "rate limited")
    } else {
        phttp::local_response(StatusCode::TOO_MANY_REQUESTS, "rate limited\n")
    };
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    if let Ok(v) = HeaderValue::from_str(&secs.max(1).to_string()) {
        rsp.headers_mut().insert(http::header::RETRY_AFTER, v);
    }
    rsp
}

fn record(metrics: &Metrics, policy: &Label, src: &Label, limit: Limit) {
    metrics
        .rate_limited
        .get_or_create(&RateLimitLabels {
            policy: policy.clone(),
            src_identity: src.clone(),
            limit: limit.label(),
        })
        .inc();
}

impl<S, B> tower::Service<Request<B>> for RateLimit<S>
where
    S: tower::Service<Request<B>, Response = Response<RspBody>>,
{
    type Response = Response<RspBody>;
    type Error = S::Error;
    type Future = Either<Ready<Result<Response<RspBody>, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let snap = self.layer.ctx.snapshot.load();
        let Some(limiter) = &snap.inbound.rate_limit else {
            return Either::Right(self.inner.call(req));
        };
        let cached = self.layer.cached.load();
        let caller = match cached.as_deref() {
            Some(c) if Arc::ptr_eq(c.limiter(), limiter) => c.clone(),
            _ => {
                let c = limiter.for_caller(self.layer.peer.as_deref());
                self.layer.cached.store(Some(Arc::new(c.clone())));
                c
            }
        };
        match caller.admit() {
            Ok(()) => Either::Right(self.inner.call(req)),
            Err((limit, wait)) => {
                record(
                    &self.layer.ctx.metrics,
                    &limiter.name,
                    &self.layer.peer_label,
                    limit,
                );
                tracing::debug!(peer = %self.layer.peer_label.0, policy = %limiter.name.0, limit = limit.label(), "rate limited");
                Either::Left(ready(Ok(refusal(&req, wait))))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(total: u32, identity: u32, overrides: &[(u32, &str)]) -> Arc<Limiter> {
        Arc::new(
            Limiter::compile(&v1::RateLimit {
                name: "demo/rl".into(),
                total_rps: total,
                identity_rps: identity,
                overrides: overrides
                    .iter()
                    .map(|(rps, p)| v1::RateLimitOverride {
                        requests_per_second: *rps,
                        principals: vec![palisade_api::authorization::principal_match(p)],
                    })
                    .collect(),
            })
            .unwrap(),
        )
    }

    fn admitted(c: &CallerLimit, n: usize) -> usize {
        (0..n).filter(|_| c.admit().is_ok()).count()
    }

    #[tokio::test(start_paused = true)]
    async fn each_identity_gets_its_own_rate_and_overrides_replace_it() {
        let l = limiter(0, 5, &[(20, "cluster.local/ns/demo/sa/batch")]);
        let web = l.for_caller(Some("spiffe://cluster.local/ns/demo/sa/web"));
        let api = l.for_caller(Some("spiffe://cluster.local/ns/demo/sa/api"));
        let batch = l.for_caller(Some("spiffe://cluster.local/ns/demo/sa/batch"));
        assert_eq!(admitted(&web, 50), 5, "a burst of one second's worth");
        assert_eq!(admitted(&api, 50), 5, "another identity has its own bucket");
        assert_eq!(admitted(&batch, 50), 20, "the override's rate");
        let Err((limit, wait)) = web.admit() else {
            panic!("web is over its limit");
        };
        assert_eq!(limit, Limit::Identity);
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(200),
            "{wait:?}"
        );
        // A second later the bucket has refilled at 5/s.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(admitted(&web, 50), 5);
        // The same caller found again (a new connection) shares its bucket.
        let web_again = l.for_caller(Some("spiffe://cluster.local/ns/demo/sa/web"));
        assert_eq!(admitted(&web_again, 50), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_total_is_shared_by_every_caller() {
        let l = limiter(10, 0, &[]);
        let a = l.for_caller(Some("cluster.local/ns/demo/sa/a"));
        let b = l.for_caller(None);
        assert_eq!(admitted(&a, 7), 7);
        assert_eq!(admitted(&b, 10), 3);
        assert_eq!(b.admit().unwrap_err().0, Limit::Total);
        // Sustained: 10 a second over 5 seconds, whoever sends.
        let mut ok = 0;
        for _ in 0..50 {
            tokio::time::advance(Duration::from_millis(100)).await;
            ok += admitted(&a, 1) + admitted(&b, 1);
        }
        assert_eq!(ok, 50);
        // Refused by the total, a caller keeps its own share for later.
        let own = limiter(2, 3, &[]);
        let c = own.for_caller(Some("cluster.local/ns/demo/sa/c"));
        let d = own.for_caller(Some("cluster.local/ns/demo/sa/d"));
        assert_eq!(admitted(&d, 2), 2, "d spends the total");
        for _ in 0..6 {
            assert_eq!(c.admit().unwrap_err().0, Limit::Total);
        }
        // Half a second later the total has one more; c's own bucket, had it been charged for
        // six refusals at 3 a second, would still be two seconds in debt.
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(
            c.admit(),
            Ok(()),
            "c's own bucket was not charged for the refusals"
        );
    }
}
