//! The dashboard's HTTP/1.1 server: the page (assets compiled in), its JSON API, and tap
//! relays. Every request first passes [`refusal`]: the page shows request metadata, so only
//! this machine's browser, asking for this server by an address or `localhost` (not a DNS name
//! an attacker's page could rebind to 127.0.0.1), from this page's own origin, gets an answer.
//! No CORS header is ever sent.
//!
//! | path | answer |
//! |---|---|
//! | `/`, `/app.js`, `/style.css` | the page |
//! | `/api/stat` | `palisade stat -o json` over the recent window, with `totals` since start |
//! | `/api/edges` | `palisade edges -o json` likewise |
//! | `/api/workloads/NAME` | `palisade describe NAME -o json` |
//! | `/api/workloads/NAME/tap` | the proxy's `/tap` stream (JSON lines), relayed |
//! | `/api/cost` | `palisade cost -o json`, with `available` |
//!
//! Errors are `{"error": "..."}` with a status that says whose fault it is.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc, watch};

use super::source::{Figures, Polled};
use crate::cmd::one_sentence;
use crate::observe::report::{self, By, EdgeRow};
use crate::observe::{LocalMesh, MeshView, Window};

type Body = UnsyncBoxBody<Bytes, Infallible>;

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const STYLE_CSS: &str = include_str!("assets/style.css");

/// Taps relayed at once. A proxy serves at most 4; the dashboard leaves the others to
/// `palisade tap` in a terminal.
const MAX_TAPS: usize = 2;
/// A tap relay ends after this long (the page offers to start it again): a tab left open
/// does not hold a proxy's tap forever.
const TAP_LIMIT: Duration = Duration::from_secs(600);
/// Lines a relay holds for a browser that reads slowly; more are dropped and counted, as the
/// proxy does for a slow tap.
const TAP_BUFFER: usize = 256;
/// How long `palisade cost`'s answer is reused: it scrapes every proxy.
const COST_FRESH: Duration = Duration::from_secs(5);
const COST_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a request waits for the first reading of the proxies after the dashboard started.
const FIRST_READING: Duration = Duration::from_secs(5);

/// What every request handler shares.
pub struct Shared {
    /// The address the server listens on: its port is the one `Host` must name.
    addr: SocketAddr,
    allow_remote: bool,
    state_dir: PathBuf,
    prometheus: Option<String>,
    /// The last reading of the figures ([`super::source::poll_forever`] sends).
    pub polled: watch::Sender<Polled>,
    taps: Arc<Semaphore>,
    cost: tokio::sync::Mutex<Option<(Instant, Result<Value, ApiError>)>>,
}

impl Shared {
    pub fn new(
        addr: SocketAddr,
        allow_remote: bool,
        state_dir: PathBuf,
        prometheus: Option<String>,
    ) -> Shared {
        Shared {
            addr,
            allow_remote,
            state_dir,
            prometheus,
            polled: watch::Sender::new(Polled::default()),
            taps: Arc::new(Semaphore::new(MAX_TAPS)),
            cost: tokio::sync::Mutex::new(None),
        }
    }
}

/// An answer of the API that is not the figures: a status and one sentence.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

/// Accepts connections until the listener fails for good; each is served on its own task.
pub async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>) -> anyhow::Result<()> {
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: wait a moment, keep serving.
                tracing::warn!(error = %e, "dashboard: cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(&shared, req, remote).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

async fn handle(shared: &Shared, req: Request<Incoming>, remote: SocketAddr) -> Response<Body> {
    let mut rsp = match refusal(shared, &req, remote) {
        Some(why) => error(&ApiError::new(StatusCode::FORBIDDEN, why)),
        None => route(shared, &req).await,
    };
    let h = rsp.headers_mut();
    // The page loads nothing from elsewhere, is framed by no one, and caches nothing.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    rsp
}

/// Why a request is refused, or None to answer it.
fn refusal<B>(shared: &Shared, req: &Request<B>, remote: SocketAddr) -> Option<String> {
    if !shared.allow_remote && !remote.ip().to_canonical().is_loopback() {
        return Some("the dashboard answers this machine only".into());
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if !host_allowed(host, shared.addr.port(), shared.allow_remote) {
        return Some(format!(
            "this dashboard is opened as http://127.0.0.1:{0}/ or http://localhost:{0}/, not by the name {host:?} (a DNS name could be rebound to this machine by another web site)",
            shared.addr.port()
        ));
    }
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        // The page's own fetches (its origin is the Host it was opened by); another site's
        // script sends its own origin.
        if origin.to_str().ok() != Some(&format!("http://{host}")) {
            return Some("requests from other web pages are refused".into());
        }
    }
    // A link or an <img> on another site sends no Origin on a GET, but a browser says where
    // the request comes from: it must not open taps or read figures.
    if req.uri().path().starts_with("/api/")
        && req
            .headers()
            .get("sec-fetch-site")
            .is_some_and(|s| s != "same-origin" && s != "none")
    {
        return Some("the API answers this dashboard's own page only".into());
    }
    None
}

/// Whether a `Host` header names this server without DNS: `localhost` or a loopback address
/// (any IP address with `--allow-remote`), with the port it listens on (none for 80).
pub fn host_allowed(host: &str, port: u16, allow_remote: bool) -> bool {
    let (name, given_port) = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((ip, "")) => (ip, None),
            Some((ip, p)) => match p.strip_prefix(':') {
                Some(p) => (ip, Some(p)),
                None => return false,
            },
            None => return false,
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, p)) => (name, Some(p)),
            None => (host, None),
        }
    };
    let port_ok = match given_port {
        Some(p) => p.parse::<u16>() == Ok(port),
        None => port == 80,
    };
    let name_ok = name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<IpAddr>()
            .is_ok_and(|ip| allow_remote || ip.to_canonical().is_loopback());
    port_ok && name_ok
}

async fn route(shared: &Shared, req: &Request<Incoming>) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return error(&ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "the dashboard answers GET only",
        ));
    }
    let path = req.uri().path();
    match path {
        "/" | "/index.html" => asset(INDEX_HTML, "text/html; charset=utf-8"),
        "/app.js" => asset(APP_JS, "text/javascript; charset=utf-8"),
        "/style.css" => asset(STYLE_CSS, "text/css; charset=utf-8"),
        "/api/stat" => answer(figures(shared).await.map(|(f, e)| stat_doc(&f, e))),
        "/api/edges" => answer(figures(shared).await.map(|(f, e)| edges_doc(&f, e))),
        "/api/cost" => answer(cost(shared).await),
        _ => match path.strip_prefix("/api/workloads/") {
            Some(rest) => match rest.split_once('/') {
                None => answer(describe(shared, rest).await),
                Some((name, "tap")) => tap(shared, name).await,
                Some(_) => not_found(path),
            },
            None => not_found(path),
        },
    }
}

fn asset(text: &'static str, content_type: &'static str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())).boxed_unsync());
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn json_response(status: StatusCode, doc: &Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(doc.to_string())).boxed_unsync());
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn error(e: &ApiError) -> Response<Body> {
    json_response(e.status, &json!({ "error": e.message }))
}

fn answer(r: Result<Value, ApiError>) -> Response<Body> {
    match r {
        Ok(doc) => json_response(StatusCode::OK, &doc),
        Err(e) => error(&e),
    }
}

fn not_found(path: &str) -> Response<Body> {
    error(&ApiError::new(
        StatusCode::NOT_FOUND,
        format!("nothing at {path}"),
    ))
}

/// The last figures (waiting for the first reading right after the start), with the last
/// read's error when the figures are older than it.
async fn figures(shared: &Shared) -> Result<(Arc<Figures>, Option<String>), ApiError> {
    let mut rx = shared.polled.subscribe();
    let _ = tokio::time::timeout(FIRST_READING, rx.wait_for(|p| p.polls > 0)).await;
    let p = rx.borrow().clone();
    match p.figures {
        Some(f) => Ok((f, p.error)),
        None => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            p.error
                .unwrap_or_else(|| "the proxies have not been read yet".into()),
        )),
    }
}

/// `{"window", "sinceStart", "missing"}` and the reading's time, source and error.
fn window_fields(doc: &mut Value, w: &Window) {
    crate::cmd::stat::add_window_fields(doc, w);
}

fn stat_rows(mesh: &MeshView, w: &Window) -> Value {
    let rows: Vec<Value> = report::stat(mesh, w, By::Workload, None)
        .iter()
        .map(|r| {
            let mut row = r.json(By::Workload);
            row["identity"] = json!(mesh.workload(&r.name).and_then(|w| w.spiffe_id.clone()));
            row
        })
        .collect();
    let mut doc = json!({ "workloads": rows });
    window_fields(&mut doc, w);
    doc
}

/// `/api/stat`: `stat -o json` over the recent window (each row with its `identity`), and
/// the same since the proxies started in `totals`.
fn stat_doc(f: &Figures, err: Option<String>) -> Value {
    let mut doc = stat_rows(&f.mesh, &f.recent);
    doc["totals"] = stat_rows(&f.mesh, &f.total);
    reading_fields(&mut doc, f, err);
    doc
}

fn edge_rows(mesh: &MeshView, w: &Window) -> Value {
    let rows: Vec<Value> = report::edges(mesh, w).iter().map(EdgeRow::json).collect();
    let mut doc = json!({ "edges": rows });
    window_fields(&mut doc, w);
    doc
}

/// `/api/edges`: `edges -o json` over the recent window, and since the start in `totals`.
fn edges_doc(f: &Figures, err: Option<String>) -> Value {
    let mut doc = edge_rows(&f.mesh, &f.recent);
    doc["totals"] = edge_rows(&f.mesh, &f.total);
    reading_fields(&mut doc, f, err);
    doc
}

fn reading_fields(doc: &mut Value, f: &Figures, err: Option<String>) {
    doc["updatedAt"] = json!(f.at);
    doc["source"] = json!(f.source);
    doc["error"] = json!(err);
}

/// A workload of the local mesh, or why not (no running mesh: 503; no such workload: 404).
fn workload(
    shared: &Shared,
    name: &str,
) -> Result<(LocalMesh, crate::observe::Workload), ApiError> {
    let mesh = LocalMesh::read(&shared.state_dir)
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, one_sentence(&e)))?;
    let Some(w) = mesh.workload(name).cloned() else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "no workload named {name:?} in {} (the mesh has: {})",
                mesh.path.display(),
                mesh.names()
            ),
        ));
    };
    Ok((mesh, w))
}

/// `/api/workloads/NAME`: `describe NAME -o json` (a side that could not be read is in its
/// `errors`, as on the command line).
async fn describe(shared: &Shared, name: &str) -> Result<Value, ApiError> {
    workload(shared, name)?;
    crate::cmd::describe::describe(&shared.state_dir, name)
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, one_sentence(&e)))
}

/// `/api/cost`: what `palisade cost -o json` says (since the proxies started), reused for
/// [`COST_FRESH`], with `available`: false when there are no rows (no cost metrics, or no
/// traffic yet), and the page leaves the view out.
async fn cost(shared: &Shared) -> Result<Value, ApiError> {
    let mut cached = shared.cost.lock().await;
    if let Some((at, doc)) = &*cached
        && at.elapsed() < COST_FRESH
    {
        return doc.clone();
    }
    let doc = run_cost(shared).await;
    *cached = Some((Instant::now(), doc.clone()));
    doc
}

/// Runs this binary's `cost -o json`: its rows are made by `palisade::cmd::cost`, whose row
/// arithmetic is not public, and the command's JSON is the documented interface.
async fn run_cost(shared: &Shared) -> Result<Value, ApiError> {
    let fail = |m: String| ApiError::new(StatusCode::BAD_GATEWAY, m);
    let doc = tokio::time::timeout(
        COST_TIMEOUT,
        crate::cmd::cost::default_json(shared.prometheus.as_deref(), &shared.state_dir),
    )
    .await
    .map_err(|_| {
        fail(format!(
            "the cost figures did not come within {COST_TIMEOUT:?}"
        ))
    })?;
    let mut doc = doc.map_err(|e| fail(format!("cost: {e:#}")))?;
    let available = doc["rows"].as_array().is_some_and(|r| !r.is_empty());
    doc["available"] = json!(available);
    Ok(doc)
}

/// `/api/workloads/NAME/tap`: a tap on the workload's proxy, relayed as JSON lines
/// (`application/x-ndjson`): first `{"tapping": NAME, "identity", "admin"}`, then the proxy's
/// lines (events, `{"dropped": N}`, empty keep-alives), and `{"end": WHY}` when the relay
/// ends. It ends when the browser goes (noticed at the next line or keep-alive, within
/// seconds), when the proxy ends it, or after [`TAP_LIMIT`].
async fn tap(shared: &Shared, name: &str) -> Response<Body> {
    let Ok(permit) = shared.taps.clone().try_acquire_owned() else {
        return error(&ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the dashboard relays {MAX_TAPS} taps already: close a workload page in another tab"
            ),
        ));
    };
    let (mesh, w) = match workload(shared, name) {
        Ok(x) => x,
        Err(e) => return error(&e),
    };
    let upstream = match crate::cmd::tap::connect(&mesh, &w, "").await {
        Ok(r) => r,
        Err(e) => {
            return error(&ApiError::new(StatusCode::BAD_GATEWAY, one_sentence(&e)));
        }
    };
    let (tx, rx) = mpsc::channel::<Bytes>(TAP_BUFFER);
    let hello = json!({
        "tapping": w.name,
        "identity": w.spiffe_id,
        "admin": w.admin.map(|a| a.to_string()),
    });
    let _ = tx.try_send(line(&hello));
    tokio::spawn(async move {
        let why = relay(upstream.into_body(), &tx).await;
        let _ = tx.try_send(line(&json!({ "end": why })));
        drop(permit);
    });
    let body = StreamBody::new(futures_util::stream::unfold(rx, |mut rx| async move {
        let data = rx.recv().await?;
        Some((Ok::<_, Infallible>(Frame::data(data)), rx))
    }));
    let mut r = Response::new(BodyExt::boxed_unsync(body));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    r
}

fn line(v: &Value) -> Bytes {
    Bytes::from(format!("{v}\n"))
}

/// Copies the proxy's lines to the browser's channel until one of them ends; returns why.
async fn relay(mut body: Incoming, tx: &mpsc::Sender<Bytes>) -> String {
    let limit = tokio::time::sleep(TAP_LIMIT);
    tokio::pin!(limit);
    let mut buf: Vec<u8> = Vec::new();
    let mut dropped: u64 = 0;
    loop {
        let frame = tokio::select! {
            _ = &mut limit => {
                return format!(
                    "the dashboard ends a tap after {}; start it again to go on",
                    humantime::format_duration(TAP_LIMIT)
                );
            }
            _ = tx.closed() => return "the page went away".into(),
            f = body.frame() => f,
        };
        let data = match frame {
            Some(Ok(f)) => match f.into_data() {
                Ok(d) => d,
                Err(_) => continue,
            },
            Some(Err(e)) => return format!("the tap broke: {e}"),
            None => return "the proxy ended the tap (it stopped?)".into(),
        };
        buf.extend_from_slice(&data);
        while let Some(end) = buf.iter().position(|&b| b == b'\n') {
            let one: Vec<u8> = buf.drain(..=end).collect();
            if dropped > 0 && tx.try_send(line(&json!({ "dropped": dropped }))).is_ok() {
                dropped = 0;
            }
            match tx.try_send(Bytes::from(one)) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => dropped += 1,
                Err(mpsc::error::TrySendError::Closed(_)) => return "the page went away".into(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_loopback_literals_or_localhost_with_our_port() {
        for ok in [
            "127.0.0.1:50750",
            "localhost:50750",
            "LocalHost:50750",
            "[::1]:50750",
            "127.1.2.3:50750",
        ] {
            assert!(host_allowed(ok, 50750, false), "{ok}");
        }
        for bad in [
            "evil.example:50750",
            "127.0.0.1:50751",
            "127.0.0.1",
            "localhost",
            "10.0.0.1:50750",
            "[::1]",
            "[::1]x",
            "",
            "127.0.0.1.nip.io:50750",
        ] {
            assert!(!host_allowed(bad, 50750, false), "{bad}");
        }
        assert!(host_allowed("localhost", 80, false));
        assert!(host_allowed("10.0.0.1:50750", 50750, true));
        assert!(!host_allowed("evil.example:50750", 50750, true));
    }

    fn shared() -> Shared {
        Shared::new(
            "127.0.0.1:50750".parse().unwrap(),
            false,
            "/nonexistent".into(),
            None,
        )
    }

    fn req(headers: &[(&str, &str)], path: &str) -> Request<()> {
        let mut r = Request::get(path);
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.body(()).unwrap()
    }

    #[test]
    fn refuses_other_hosts_origins_and_cross_site_requests() {
        let s = shared();
        let lo: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let host = ("host", "127.0.0.1:50750");
        assert_eq!(refusal(&s, &req(&[host], "/api/stat"), lo), None);
        assert_eq!(
            refusal(
                &s,
                &req(&[host, ("origin", "http://127.0.0.1:50750")], "/api/stat"),
                lo
            ),
            None
        );
        assert!(refusal(&s, &req(&[("host", "evil.example:50750")], "/"), lo).is_some());
        assert!(refusal(&s, &req(&[], "/"), lo).is_some());
        assert!(
            refusal(
                &s,
                &req(&[host, ("origin", "http://evil.example")], "/api/stat"),
                lo
            )
            .is_some()
        );
        assert!(
            refusal(
                &s,
                &req(&[host, ("sec-fetch-site", "cross-site")], "/api/stat"),
                lo
            )
            .is_some()
        );
        // A link from elsewhere may open the page itself.
        assert_eq!(
            refusal(&s, &req(&[host, ("sec-fetch-site", "cross-site")], "/"), lo),
            None
        );
        let remote: SocketAddr = "10.0.0.2:40000".parse().unwrap();
        assert!(refusal(&s, &req(&[host], "/"), remote).is_some());
    }
}
