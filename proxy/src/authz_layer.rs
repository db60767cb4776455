//! Enforcement of the compiled [`crate::authz::Authorizer`] in the inbound path: per request
//! for HTTP (403 `RBAC: access denied`, or gRPC `PERMISSION_DENIED`), per connection for TCP.
//!
//! The authorizer comes from the config snapshot in force when the request arrives, so a
//! policy change applies to the next request without restarting anything.

use std::net::IpAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use std::future::Future;
use std::pin::Pin;

use futures_util::future::{Either, Ready, ready};
use http::{Request, Response, StatusCode};
use palisade_certs::SpiffeId;

use crate::Ctx;
use crate::authz::{ConnContext, Decision, HttpContext};
use crate::http::{self as phttp, RspBody};
use crate::summary::{HttpSeen, Seen};
use crate::telemetry::{AuthzLabels, Label};
use prometheus_client::metrics::counter::Counter;

/// What the inbound side knows about a connection, shared by its requests.
pub struct ConnInfo {
    pub peer: Option<SpiffeId>,
    pub peer_label: Label,
    pub source_ip: IpAddr,
    /// The workload's port the connection is for (what policies call the destination port).
    pub dest_port: u16,
    /// Where its requests go: the app's address.
    pub app: Option<std::net::SocketAddr>,
    /// The decision counters this connection's requests used, by (allowed, policy): a
    /// request decided like an earlier one counts without a family lookup.
    pub decisions: std::sync::Mutex<Vec<(bool, Label, Counter)>>,
}

impl ConnInfo {
    fn conn_context(&self) -> ConnContext<'_> {
        ConnContext {
            peer: self.peer.as_ref().map(|p| p.as_str()),
            source_ip: self.source_ip,
            dest_port: self.dest_port,
        }
    }

    /// This connection's request (or the connection itself) for the traffic summary.
    fn seen<'a>(&'a self, http: Option<HttpSeen<'a>>) -> Seen<'a> {
        Seen {
            peer: self.peer.as_ref().map(|p| p.as_str()),
            source_ip: self.source_ip,
            port: self.dest_port,
            http,
        }
    }
}

/// The decision, attached to the response for the access log.
#[derive(Clone, Debug)]
pub struct AuthzNote {
    pub allowed: bool,
    pub policy: Label,
}

impl std::fmt::Display for AuthzNote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let d = if self.allowed { "allow" } else { "deny" };
        write!(f, "{d} policy={}", self.policy.0)
    }
}

/// What decided: the policy (`namespace/name`), the mesh's `defaultPolicy` (no ALLOW policy
/// selects the workload), or `no_allow_match` (ALLOW policies exist and none matched). A deny
/// is never labelled with a word that reads like the mesh default allowed it.
fn policy_label(d: &Decision) -> Label {
    thread_local! {
        static DEFAULT_POLICY: Label = Label::new("default_policy");
        static NO_ALLOW_MATCH: Label = Label::new("no_allow_match");
    }
    match &d.policy {
        Some(p) => Label(p.clone()),
        None if d.by_default => DEFAULT_POLICY.with(Label::clone),
        None => NO_ALLOW_MATCH.with(Label::clone),
    }
}

/// Decision counters kept per connection: the few policies that decide its requests.
const DECISIONS_KEPT: usize = 8;

fn record(ctx: &Ctx, info: &ConnInfo, d: &Decision) -> Label {
    let policy = policy_label(d);
    {
        let mut kept = info
            .decisions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match kept
            .iter()
            .find(|(allowed, p, _)| *allowed == d.allowed && p.same(&policy))
        {
            Some((_, _, counter)) => {
                counter.inc();
            }
            None => {
                let decision = if d.allowed { "allow" } else { "deny" };
                let counter = ctx
                    .metrics
                    .authz_decisions
                    .get_or_create(&AuthzLabels {
                        decision,
                        policy: policy.clone(),
                    })
                    .clone();
                counter.inc();
                if kept.len() >= DECISIONS_KEPT {
                    kept.remove(0);
                }
                kept.push((d.allowed, policy.clone(), counter));
            }
        }
    }
    if let Some(audit) = &d.audit {
        ctx.metrics
            .authz_decisions
            .get_or_create(&AuthzLabels {
                decision: "audit",
                policy: Label(audit.clone()),
            })
            .inc();
        tracing::info!(target: "palisade::audit", policy = %audit, allowed = d.allowed, "audited");
    }
    policy
}

/// Authorizes an opaque TCP connection; false means close it now.
pub fn check_tcp(ctx: &Ctx, info: &ConnInfo) -> bool {
    let snap = ctx.snapshot.load();
    let d = snap.inbound.authz.authorize_tcp(&info.conn_context());
    ctx.metrics.summary.record(&info.seen(None), d.allowed);
    let policy = record(ctx, info, &d);
    if !d.allowed {
        tracing::info!(peer = %info.peer_label.0, policy = %policy.0, port = info.dest_port, "TCP connection denied");
    }
    d.allowed
}

#[derive(Clone)]
pub struct AuthzLayer {
    ctx: Arc<Ctx>,
    info: Arc<ConnInfo>,
    /// Attach the decision to allowed responses too, for the access log and spans (and, per
    /// request, while a tap is connected).
    note_allowed: bool,
}

impl AuthzLayer {
    pub fn new(ctx: Arc<Ctx>, info: Arc<ConnInfo>) -> Self {
        let note_allowed = ctx.cfg.access_log || ctx.tracer.enabled();
        AuthzLayer {
            ctx,
            info,
            note_allowed,
        }
    }
}

pin_project_lite::pin_project! {
    /// The inner call, with the decision attached to its response when the access log is on.
    pub struct Noted<F> {
        #[pin]
        inner: F,
        note: Option<AuthzNote>,
        route: Option<Label>,
        trace: Option<crate::trace::TracePolicy>,
    }
}

impl<F, E> Future for Noted<F>
where
    F: Future<Output = Result<Response<RspBody>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.inner.poll(cx) {
            Poll::Ready(Ok(mut rsp)) => {
                if let Some(n) = this.note.take() {
                    rsp.extensions_mut().insert(n);
                }
                if let Some(r) = this.route.take() {
                    rsp.extensions_mut().insert(phttp::RouteLabel(r));
                }
                if let Some(t) = this.trace.take() {
                    rsp.extensions_mut().insert(t);
                }
                Poll::Ready(Ok(rsp))
            }
            other => other,
        }
    }
}

impl<S> tower::Layer<S> for AuthzLayer {
    type Service = Authz<S>;
    fn layer(&self, inner: S) -> Authz<S> {
        Authz {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Authz<S> {
    inner: S,
    layer: AuthzLayer,
}

impl<S, B> tower::Service<Request<B>> for Authz<S>
where
    S: tower::Service<Request<B>, Response = Response<RspBody>>,
{
    type Response = Response<RspBody>;
    type Error = S::Error;
    type Future = Either<Ready<Result<Response<RspBody>, S::Error>>, Noted<S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let ctx = &self.layer.ctx;
        let snap = ctx.snapshot.load();
        let host = req
            .uri()
            .authority()
            .map(|a| a.as_str())
            .or_else(|| {
                req.headers()
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
            })
            .unwrap_or("");
        // The rule of the routes of this workload's services that the request matches: a
        // label for metrics, and what `to.operation.routes` compares.
        // Its trace policy too (the route's over its service's, as the control plane sent
        // it), copied; an empty one is not attached.
        let (route, trace) = if snap.inbound.routes.is_empty() {
            (None, None)
        } else {
            match snap
                .inbound
                .routes
                .select(&crate::routing::request_host(&req), &req)
            {
                crate::routing::Matched::Rule(r, _) => (
                    Some(r.label.clone()),
                    (self.layer.ctx.tracer.enabled()
                        && r.trace != crate::trace::TracePolicy::default())
                    .then_some(r.trace),
                ),
                _ => (None, None),
            }
        };
        let http_ctx = HttpContext {
            route: route.as_ref().map(|r| &*r.0),
            method: req.method().as_str(),
            path: req
                .uri()
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/"),
            host,
            headers: req.headers(),
        };
        let d = snap
            .inbound
            .authz
            .authorize_http(&self.layer.info.conn_context(), &http_ctx);
        let path = http_ctx.path;
        ctx.metrics.summary.record(
            &self.layer.info.seen(Some(HttpSeen {
                method: http_ctx.method,
                path: path.split_once('?').map_or(path, |(p, _)| p),
                host,
                route: http_ctx.route,
            })),
            d.allowed,
        );
        let policy = record(ctx, &self.layer.info, &d);
        if d.allowed {
            let note = (self.layer.note_allowed || ctx.metrics.tap.active()).then_some(AuthzNote {
                allowed: true,
                policy,
            });
            return Either::Right(Noted {
                inner: self.inner.call(req),
                note,
                route,
                trace,
            });
        }
        tracing::debug!(peer = %self.layer.info.peer_label.0, policy = %policy.0, "request denied");
        let mut rsp = if phttp::is_grpc(&req) {
            phttp::grpc_response(7, "RBAC: access denied")
        } else {
            phttp::local_response(StatusCode::FORBIDDEN, "RBAC: access denied")
        };
        rsp.extensions_mut().insert(AuthzNote {
            allowed: false,
            policy,
        });
        if let Some(r) = route {
            rsp.extensions_mut().insert(phttp::RouteLabel(r));
        }
        if let Some(t) = trace {
            rsp.extensions_mut().insert(t);
        }
        Either::Left(ready(Ok(rsp)))
    }
}
