//! The admin server: `/metrics`, `/ready`, `/live`, `/shutdown`.
//!
//! Plain HTTP/1.1 on its own port, never through the data-plane stacks, so probes and scrapes
//! work whatever the mTLS mode and authorization policy say.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::Ctx;

pub(crate) async fn serve(listener: TcpListener, ctx: Arc<Ctx>, mut stop: watch::Receiver<bool>) {
    while let Some((tcp, remote)) = crate::tcp::accept(&listener, &mut stop, "admin").await {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let ctx = ctx.clone();
                async move { Ok::<_, Infallible>(handle(&ctx, req, remote)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
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
            let mut rsp = text(StatusCode::OK, ctx.metrics.encode());
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
        (&Method::POST, "/shutdown") => {
            if remote.ip().is_loopback() {
                ctx.begin_shutdown();
                text(StatusCode::OK, "shutting down\n")
            } else {
                text(
                    StatusCode::FORBIDDEN,
                    "shutdown is allowed from loopback only\n",
                )
            }
        }
        (_, "/shutdown") => text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}
