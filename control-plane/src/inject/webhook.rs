//! The injector webhook: HTTPS, `POST /inject`, an AdmissionReview in and out
//! ([`review`](super::review::review)), for the API server's MutatingWebhookConfiguration.
//!
//! The server is built to face a client that misbehaves or a peer that is not the API server:
//! a bounded number of connections, deadlines for the TLS handshake, the request headers and
//! the body, and a body size limit. HTTP/1.1 and HTTP/2 (the API server speaks HTTP/2 when the
//! TLS config offers it through ALPN, as [`tls_config`] does).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use palisade_certs::tls::ServingCertStore;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use super::review::{Reviewed, review};
use super::{InjectConfig, NamespaceLabels};

/// The path the MutatingWebhookConfiguration calls.
pub const PATH: &str = "/inject";
/// The DNS name the API server reaches the webhook at (the control plane's Service), and so
/// the serving certificate's name.
pub const SERVICE_DNS_NAME: &str = "palisade-control-plane.palisade-system.svc";

/// The webhook's bounds. The defaults suit the API server: its webhook timeout is at most 30 s
/// (10 s by default), and an AdmissionReview of a pod is at most a few MiB (etcd refuses objects
/// over 1.5 MiB).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body; larger ones get 413.
    pub max_body: usize,
    /// A TLS handshake must finish within this long.
    pub handshake_timeout: Duration,
    /// Request headers (HTTP/1.1) must arrive within this long, idle connections included.
    pub header_read_timeout: Duration,
    /// The body must arrive within this long after the headers; else 408.
    pub body_timeout: Duration,
    /// Concurrent connections; more are closed at once.
    pub max_connections: usize,
    /// On stop, open connections get this long to finish their requests.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body: 4 << 20,
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            max_connections: 256,
            shutdown_grace: crate::SHUTDOWN_GRACE,
        }
    }
}

/// Why the webhook stopped.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("the webhook listener failed: {0}")]
    Accept(std::io::Error),
}

/// The TLS config the webhook should be served with: the serving certificate (issued by the mesh
/// CA for [`SERVICE_DNS_NAME`], see [`palisade_certs::Ca::issue_serving_cert`]), HTTP/2 and
/// HTTP/1.1 offered.
pub fn tls_config(store: Arc<ServingCertStore>) -> Result<rustls::ServerConfig, rustls::Error> {
    palisade_certs::tls::serving_config(store, &[b"h2", b"http/1.1"])
}

struct State {
    cfg: Arc<InjectConfig>,
    namespaces: Arc<dyn NamespaceLabels>,
    limits: Limits,
}

/// Serves the webhook on `listener` until `stop` turns true, with the default [`Limits`].
/// Returns once it has stopped accepting and open connections have finished (or the grace
/// period has passed).
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    cfg: Arc<InjectConfig>,
    namespaces: Arc<dyn NamespaceLabels>,
    stop: watch::Receiver<bool>,
) -> Result<(), WebhookError> {
    serve_with(listener, tls, cfg, namespaces, Limits::default(), stop).await
}

/// [`serve`] with explicit limits.
pub async fn serve_with(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    cfg: Arc<InjectConfig>,
    namespaces: Arc<dyn NamespaceLabels>,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) -> Result<(), WebhookError> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let grace = limits.shutdown_grace;
    let state = Arc::new(State {
        cfg,
        namespaces,
        limits,
    });
    let mut consecutive_errors = 0u32;
    loop {
        if *stop.borrow() {
            break;
        }
        let (tcp, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => {
                    consecutive_errors = 0;
                    c
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off, and give up if it lasts.
                    consecutive_errors += 1;
                    tracing::warn!(error = %e, "webhook accept failed");
                    if consecutive_errors > 100 {
                        return Err(WebhookError::Accept(e));
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            // A dropped sender stops the server too.
            r = stop.changed() => {
                if r.is_err() {
                    break;
                }
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%remote, "webhook connection limit reached; closing a new connection");
            continue;
        };
        let acceptor = acceptor.clone();
        let state = state.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _permit = permit;
            let tls =
                match tokio::time::timeout(state.limits.handshake_timeout, acceptor.accept(tcp))
                    .await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!(%remote, error = %e, "webhook TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%remote, "webhook TLS handshake timed out");
                        return;
                    }
                };
            let svc_state = state.clone();
            let svc = hyper::service::service_fn(move |req| {
                let state = svc_state.clone();
                async move { Ok::<_, Infallible>(handle(&state, req).await) }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(state.limits.header_read_timeout);
            builder
                .http2()
                .timer(TokioTimer::new())
                .max_concurrent_streams(64)
                .keep_alive_interval(Duration::from_secs(30))
                .keep_alive_timeout(Duration::from_secs(10));
            let conn = builder.serve_connection(TokioIo::new(tls), svc);
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(%remote, error = %e, "webhook connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("webhook connections still open after the grace period; leaving them");
    }
    Ok(())
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

async fn handle(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.uri().path() != PATH {
        return text(StatusCode::NOT_FOUND, "not found\n");
    }
    if req.method() != Method::POST {
        let mut rsp = text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n");
        rsp.headers_mut()
            .insert(http::header::ALLOW, http::HeaderValue::from_static("POST"));
        return rsp;
    }
    let declared = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > state.limits.max_body as u64) {
        return text(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n");
    }
    let body = Limited::new(req.into_body(), state.limits.max_body);
    let bytes = match tokio::time::timeout(state.limits.body_timeout, body.collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                return text(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n");
            }
            return text(
                StatusCode::BAD_REQUEST,
                format!("cannot read the body: {e}\n"),
            );
        }
        Err(_) => {
            return text(
                StatusCode::REQUEST_TIMEOUT,
                "the body did not arrive in time\n",
            );
        }
    };
    match review(&bytes, &state.cfg, state.namespaces.as_ref()) {
        Reviewed::Answer { review, summary } => {
            if review.response.allowed {
                tracing::info!(uid = %review.response.uid, "{summary}");
            } else {
                tracing::warn!(uid = %review.response.uid, "{summary}");
            }
            let mut rsp = Response::new(Full::new(Bytes::from(review.to_json())));
            rsp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            rsp
        }
        Reviewed::NamespaceUnknown(message) => {
            tracing::warn!("{message}; failing the call (the API server's failurePolicy decides)");
            text(StatusCode::SERVICE_UNAVAILABLE, format!("{message}\n"))
        }
    }
}
