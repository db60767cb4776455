//! The admin server: `/metrics`, `/ready`, `/live`, `/status`, `/shutdown`, and for this
//! machine's tools only `/tap` ([`crate::tap`]), `/config` ([`crate::admin_config`]) and
//! `/traffic` ([`crate::summary`]); and the app's rewritten kubelet probes (`/app-health/…`,
//! [`crate::app_probe`]).
//!
//! Plain HTTP/1.1 on its own port, never through the data-plane stacks, so probes and scrapes
//! work whatever the mTLS mode and authorization policy say.
//!
//! The port is reachable by every container of the pod (and, locally, by every process of the
//! host), so it is built to be poked at: a bounded number of connections, a deadline for
//! request headers, and a `/shutdown` that is off unless asked for (as Linkerd made it) and
//! then only answers a loopback POST carrying [`SHUTDOWN_HEADER`] and no `Origin`. A web page
//! cannot send that header without a CORS preflight this server never approves, and a
//! browser always sends `Origin` on a cross-site POST.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::Ctx;
use crate::telemetry::Direction;

/// The header `/shutdown` requires (any value).
pub const SHUTDOWN_HEADER: &str = "palisade-admin-shutdown";
/// Concurrent admin connections; scrapers and probes need a handful.
pub const MAX_CONNECTIONS: usize = 64;
/// A client must send its request headers within this long.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) async fn serve(listener: TcpListener, ctx: Arc<Ctx>, mut stop: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    while let Some((tcp, remote)) = crate::tcp::accept(&listener, &mut stop, "admin").await {
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            ctx.metrics
                .refuse(Direction::inbound, "admin_connection_limit");
            continue;
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let ctx = ctx.clone();
                async move {
                    count_refusal(&ctx, &req, remote);
                    let probe = (req.method() == Method::GET)
                        .then(|| ctx.cfg.app_probes.get(req.uri().path()))
                        .flatten();
                    let rsp = match probe {
                        Some(p) => crate::app_probe::run(p).await.map(BodyExt::boxed_unsync),
                        // A stream of the requests flowing now (loopback only): crate::tap.
                        None if req.uri().path() == "/tap" => {
                            crate::tap::serve(&ctx.metrics.tap, &req, remote, ctx.stop_rx.clone())
                        }
                        None => handle(&ctx, req, remote).map(BodyExt::boxed_unsync),
                    };
                    Ok::<_, Infallible>(rsp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Some(HEADER_READ_TIMEOUT))
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

pub(crate) fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(body.into()));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    rsp
}

fn handle(ctx: &Ctx, req: Request<Incoming>, remote: SocketAddr) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            // Exemplars only for a scraper that asks for OpenMetrics (Prometheus does when
            // exemplar storage is on); a plain-text parser would read them as garbage.
            let openmetrics = req.headers().get_all(http::header::ACCEPT).iter().any(|v| {
                const OM: &[u8] = b"application/openmetrics-text";
                v.as_bytes().windows(OM.len()).any(|w| w == OM)
            });
            let mut rsp = text(StatusCode::OK, ctx.metrics.encode_with(openmetrics));
            rsp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            rsp
        }
        (&Method::GET, "/live") => text(StatusCode::OK, "live\n"),
        (&Method::GET, "/ready") => {
            let cert = ctx.store.is_ready();
            let config = ctx.config_ready();
            if cert && config {
                text(StatusCode::OK, "ready\n")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: certificate={cert} config={config}\n"),
                )
            }
        }
        (&Method::GET, "/status") => {
            let snap = ctx.snapshot.load();
            let body = serde_json::json!({
                "workload": ctx.cfg.workload,
                "identity": ctx.store.id().as_str(),
                "ready": ctx.store.is_ready() && ctx.config_ready(),
                "certExpiry": ctx.store.expiry(),
                "configVersion": snap.version,
                "configDigest": ctx.config_digest.load(std::sync::atomic::Ordering::Relaxed),
            });
            let mut rsp = text(StatusCode::OK, body.to_string());
            rsp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            rsp
        }
        (&Method::GET, "/config") => crate::admin_config::handle(ctx, &req, remote),
        (&Method::GET, "/traffic") => traffic(ctx, &req, remote),
        (&Method::POST, "/shutdown") => shutdown(ctx, &req, remote),
        (_, "/shutdown") => text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// `GET /traffic`: the traffic summary ([`crate::summary`]) for `palisade policy what-if`.
/// It names callers and paths, so it answers what `/config` answers: this machine's tools.
fn traffic<B>(ctx: &Ctx, req: &Request<B>, remote: SocketAddr) -> Response<Full<Bytes>> {
    if let Some(why) = not_local(req, remote) {
        tracing::debug!(%remote, ?why, "admin /traffic refused");
        return text(
            StatusCode::FORBIDDEN,
            "/traffic is answered to loopback callers only, without Origin, for localhost\n",
        );
    }
    let mut body = ctx.metrics.summary.json();
    if let Some(o) = body.as_object_mut() {
        o.insert("workload".into(), ctx.cfg.workload.clone().into());
        o.insert("identity".into(), ctx.store.id().as_str().into());
    }
    let mut rsp = text(StatusCode::OK, body.to_string());
    rsp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    rsp.headers_mut().insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    rsp
}

/// Counts a request to an endpoint for this machine's tools that its caller may not make
/// (each endpoint also refuses it, and logs why).
fn count_refusal<B>(ctx: &Ctx, req: &Request<B>, remote: SocketAddr) {
    let get = req.method() == Method::GET;
    let endpoint = match req.uri().path() {
        "/tap" if get => "tap",
        "/config" if get => "config",
        "/traffic" if get => "traffic",
        "/shutdown" if req.method() == Method::POST => {
            let reason = match shutdown_refusal(ctx.cfg.admin_shutdown, req, remote) {
                None => return,
                Some(_) if !ctx.cfg.admin_shutdown => "disabled",
                Some(_) if !remote.ip().to_canonical().is_loopback() => "remote",
                Some(_) if req.headers().contains_key(http::header::ORIGIN) => "web_page",
                Some(_) => "missing_header",
            };
            ctx.metrics.admin_refused("shutdown", reason);
            return;
        }
        _ => return,
    };
    if let Some(why) = not_local(req, remote) {
        let reason = match why {
            NotLocal::Remote => "remote",
            NotLocal::WebPage => "web_page",
            NotLocal::ForeignHost => "foreign_host",
        };
        ctx.metrics.admin_refused(endpoint, reason);
    }
}

/// Why an admin endpoint that shows what the proxy sees (`/config`, `/tap`) refuses a caller:
/// they answer this machine's own tools only, never a remote peer nor a web page (one that
/// sends an `Origin`, or one whose name was rebound to 127.0.0.1, which sends its own `Host`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NotLocal {
    Remote,
    WebPage,
    ForeignHost,
}

pub(crate) fn not_local<B>(req: &Request<B>, remote: SocketAddr) -> Option<NotLocal> {
    // `::ffff:127.0.0.1` on a dual-stack port is loopback too.
    if !remote.ip().to_canonical().is_loopback() {
        return Some(NotLocal::Remote);
    }
    if req.headers().contains_key(http::header::ORIGIN) {
        return Some(NotLocal::WebPage);
    }
    match req.headers().get(http::header::HOST) {
        Some(host) if !local_host(host.as_bytes()) => Some(NotLocal::ForeignHost),
        _ => None,
    }
}

/// Whether a `Host` header names this machine without DNS: an IP address or `localhost`,
/// with or without a port.
pub(crate) fn local_host(host: &[u8]) -> bool {
    let Ok(host) = std::str::from_utf8(host) else {
        return false;
    };
    let host = host.trim();
    if host.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    let port_ok = |p: &str| p.parse::<u16>().is_ok();
    // `[::1]:4191`, `[::1]`
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split_once(']').is_some_and(|(ip, port)| {
            ip.parse::<std::net::IpAddr>().is_ok()
                && (port.is_empty() || port.strip_prefix(':').is_some_and(port_ok))
        });
    }
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port_ok(port) => name,
        Some(_) => return false,
        None => host,
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::Ipv4Addr>().is_ok()
}

/// Why a `/shutdown` is refused, or None to shut down.
fn shutdown_refusal<B>(
    enabled: bool,
    req: &Request<B>,
    remote: SocketAddr,
) -> Option<(StatusCode, &'static str)> {
    if !enabled {
        return Some((
            StatusCode::NOT_FOUND,
            "shutdown is disabled (PALISADE_ADMIN_SHUTDOWN=true enables it)\n",
        ));
    }
    // `::ffff:127.0.0.1` on a dual-stack port is loopback too.
    if !remote.ip().to_canonical().is_loopback() {
        return Some((
            StatusCode::FORBIDDEN,
            "shutdown is allowed from loopback only\n",
        ));
    }
    if req.headers().contains_key(http::header::ORIGIN) {
        return Some((
            StatusCode::FORBIDDEN,
            "shutdown is not allowed from a web page\n",
        ));
    }
    if !req.headers().contains_key(SHUTDOWN_HEADER) {
        return Some((
            StatusCode::FORBIDDEN,
            "shutdown needs the palisade-admin-shutdown header\n",
        ));
    }
    None
}

fn shutdown(ctx: &Ctx, req: &Request<Incoming>, remote: SocketAddr) -> Response<Full<Bytes>> {
    match shutdown_refusal(ctx.cfg.admin_shutdown, req, remote) {
        None => {
            ctx.begin_shutdown();
            text(StatusCode::OK, "shutting down\n")
        }
        Some((status, why)) => {
            tracing::info!(%remote, reason = why.trim_end(), "admin /shutdown refused");
            text(status, why)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn post(headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::post("/shutdown");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("request")
    }

    #[test]
    fn shutdown_needs_opt_in_loopback_the_header_and_no_origin() {
        let lo: SocketAddr = "127.0.0.1:40000".parse().expect("addr");
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:40000".parse().expect("addr");
        let remote: SocketAddr = "10.0.0.7:40000".parse().expect("addr");
        let ok = post(&[(SHUTDOWN_HEADER, "1")]);
        assert_eq!(shutdown_refusal(true, &ok, lo), None);
        assert_eq!(
            shutdown_refusal(true, &ok, mapped),
            None,
            "dual-stack loopback"
        );
        assert_eq!(
            shutdown_refusal(false, &ok, lo).map(|r| r.0),
            Some(StatusCode::NOT_FOUND)
        );
        assert_eq!(
            shutdown_refusal(true, &ok, remote).map(|r| r.0),
            Some(StatusCode::FORBIDDEN)
        );
        let blind = post(&[("content-type", "text/plain")]);
        assert_eq!(
            shutdown_refusal(true, &blind, lo).map(|r| r.0),
            Some(StatusCode::FORBIDDEN)
        );
        let page = post(&[(SHUTDOWN_HEADER, "1"), ("origin", "http://evil.example")]);
        assert_eq!(
            shutdown_refusal(true, &page, lo).map(|r| r.0),
            Some(StatusCode::FORBIDDEN)
        );
    }
}
