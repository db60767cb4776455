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

/// Lifetime of the webhook's serving certificate: renewed when a third of it is left
/// ([`renew_serving_cert`]), so a renewal that fails has hours of retries before the API server
/// sees an expired certificate.
pub const SERVING_CERT_TTL: Duration = Duration::from_secs(24 * 3600);

/// Why the webhook stopped, or could not start.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("the webhook listener failed: {0}")]
    Accept(std::io::Error),
    #[error("the webhook's TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// The TLS config the webhook should be served with: the serving certificate (issued by the mesh
/// CA for [`SERVICE_DNS_NAME`], see [`palisade_certs::Ca::issue_serving_cert`]), HTTP/2 and
/// HTTP/1.1 offered.
pub fn tls_config(store: Arc<ServingCertStore>) -> Result<rustls::ServerConfig, rustls::Error> {
    palisade_certs::tls::serving_config(store, &[b"h2", b"http/1.1"])
}

/// The webhook as `palisade control-plane --source kubernetes` runs it: HTTPS on `listener`
/// (the control plane's webhook port, behind the Service [`SERVICE_DNS_NAME`] port 443) with the
/// certificate in `serving_cert`, until `stop` turns true (or its sender is dropped).
///
/// `serving_cert` is read at every TLS handshake: [`ServingCertStore::install`] (or
/// [`renew_serving_cert`], which calls it) swaps the certificate without a restart, and open
/// connections keep theirs. `namespaces` gives the labels of the namespaces pods are created in
/// (a reflector's `Store<Namespace>`, see [`watch_namespaces`]); while it does not know a
/// namespace, calls for it fail with 503 and the webhook's `failurePolicy` decides.
pub async fn serve_webhook(
    listener: TcpListener,
    serving_cert: Arc<ServingCertStore>,
    cfg: Arc<InjectConfig>,
    namespaces: Arc<dyn NamespaceLabels>,
    stop: watch::Receiver<bool>,
) -> Result<(), WebhookError> {
    let tls = Arc::new(tls_config(serving_cert)?);
    serve(listener, tls, cfg, namespaces, stop).await
}

/// How long before trying again after a failed renewal: a tenth of the lifetime, between 1 s
/// and a minute.
fn retry_after(ttl: Duration) -> Duration {
    (ttl / 10).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// How long until the served certificate has `margin` seconds left (zero if it already has).
fn until_renewal(store: &ServingCertStore, margin: i64) -> Duration {
    let at = store.not_after().saturating_sub(margin);
    Duration::from_secs(u64::try_from(at.saturating_sub(unix_now())).unwrap_or(0))
}

/// Keeps `store` serving a valid certificate until `stop` turns true (or its sender is
/// dropped): when a third of `ttl` is left of the certificate being served, `issue` is called
/// (e.g. `|| ca.issue_serving_cert(&[SERVICE_DNS_NAME], ttl)`) and its certificate installed;
/// after a failure, again every [`retry_after`] (a tenth of `ttl`, 1 s to 1 min), logged each
/// time. Returns how many certificates it installed.
pub async fn renew_serving_cert<F, E>(
    store: Arc<ServingCertStore>,
    ttl: Duration,
    mut issue: F,
    mut stop: watch::Receiver<bool>,
) -> u64
where
    F: FnMut() -> Result<palisade_certs::ServingCert, E> + Send,
    E: std::fmt::Display,
{
    let margin = i64::try_from((ttl / 3).as_secs())
        .unwrap_or(i64::MAX)
        .max(1);
    let mut installed = 0;
    let mut wait = until_renewal(&store, margin);
    loop {
        if *stop.borrow() {
            return installed;
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            r = stop.changed() => {
                if r.is_err() {
                    return installed;
                }
                continue;
            }
        }
        let renewed = issue()
            .map_err(|e| e.to_string())
            .and_then(|cert| store.install(&cert).map_err(|e| e.to_string()));
        wait = match renewed {
            Ok(()) => {
                installed += 1;
                let not_after = store.not_after();
                tracing::info!(not_after, "webhook serving certificate renewed");
                until_renewal(&store, margin).max(Duration::from_secs(1))
            }
            Err(e) => {
                let retry = retry_after(ttl);
                tracing::warn!(
                    error = %e,
                    expires = store.not_after(),
                    "cannot renew the webhook serving certificate; retrying in {retry:?}"
                );
                retry
            }
        };
    }
}

/// A reflector of the cluster's Namespaces, for [`serve_webhook`]'s `namespaces`: the store,
/// and the future that fills it (spawn it; it runs until dropped, relisting after errors).
/// Needs `list` and `watch` on namespaces.
pub fn watch_namespaces(
    client: kube::Client,
) -> (
    kube::runtime::reflector::Store<k8s_openapi::api::core::v1::Namespace>,
    impl std::future::Future<Output = ()> + Send + 'static,
) {
    use futures_util::StreamExt;
    use kube::runtime::WatchStreamExt;
    let (reader, writer) = kube::runtime::reflector::store();
    let api: kube::Api<k8s_openapi::api::core::v1::Namespace> = kube::Api::all(client);
    let stream = kube::runtime::watcher(api, kube::runtime::watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects();
    let run = async move {
        futures_util::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            if let Err(e) = event {
                tracing::warn!(error = %e, "watching namespaces for the injector");
            }
        }
    };
    (reader, run)
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
            // Set once the first request's headers are in: until then the connection has
            // `header_read_timeout` to send one (below), whatever the protocol.
            let requested = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let svc_state = state.clone();
            let svc_requested = requested.clone();
            let svc = hyper::service::service_fn(move |req| {
                svc_requested.store(true, std::sync::atomic::Ordering::Relaxed);
                let state = svc_state.clone();
                async move { Ok::<_, Infallible>(handle(&state, req).await) }
            });
            // The protocol ALPN agreed on, so that no bytes are awaited to guess it; without
            // ALPN, the first bytes tell.
            let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder = match alpn.as_deref() {
                Some(b"h2") => builder.http2_only(),
                Some(_) => builder.http1_only(),
                None => builder,
            };
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
            let conn = watcher.watch(builder.serve_connection(TokioIo::new(tls), svc));
            tokio::pin!(conn);
            // HTTP/1.1's header deadline does not cover an HTTP/2 client that never sends its
            // preface, nor the wait for the first bytes without ALPN: a connection that has
            // not made a request within the deadline is closed.
            let ended = tokio::select! {
                r = &mut conn => Some(r),
                () = tokio::time::sleep(state.limits.header_read_timeout) => None,
            };
            let result = match ended {
                Some(r) => r,
                None if requested.load(std::sync::atomic::Ordering::Relaxed) => conn.await,
                None => {
                    tracing::debug!(%remote, "webhook connection made no request in time; closing it");
                    return;
                }
            };
            if let Err(e) = result {
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
