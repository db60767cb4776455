//! `palisade demo-app`: a tiny HTTP app for the local demo. It says who called it (from the
//! `x-forwarded-client-cert` header its sidecar sets) and can call another service through
//! its own sidecar, so a `web -> api -> db` chain and its identities are visible with curl.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};

#[derive(clap::Args)]
pub struct DemoAppArgs {
    /// Where to listen (plaintext; the sidecar in front of it does mTLS).
    #[arg(long, env = "PALISADE_DEMO_LISTEN", default_value = "127.0.0.1:18080")]
    pub listen: SocketAddr,
    /// The name it answers with.
    #[arg(long, env = "PALISADE_WORKLOAD", default_value = "demo")]
    pub name: String,
    /// Services it can call, `NAME=ADDR` where ADDR is the sidecar's local upstream port.
    #[arg(
        long = "upstream",
        env = "PALISADE_DEMO_UPSTREAMS",
        value_delimiter = ','
    )]
    pub upstreams: Vec<String>,
}

struct App {
    name: String,
    upstreams: HashMap<String, SocketAddr>,
}

pub fn run(args: DemoAppArgs) -> anyhow::Result<ExitCode> {
    let mut upstreams = HashMap::new();
    for u in &args.upstreams {
        if u.trim().is_empty() {
            continue;
        }
        let (name, addr) = u
            .split_once('=')
            .with_context(|| format!("upstream {u:?} is not NAME=ADDR"))?;
        let addr: SocketAddr = addr
            .parse()
            .with_context(|| format!("upstream {u:?}: {addr:?} is not ip:port"))?;
        upstreams.insert(name.to_string(), addr);
    }
    let app = Arc::new(App {
        name: args.name,
        upstreams,
    });
    super::serve_until_shutdown(args.listen, |listener| async move {
        loop {
            let (tcp, _) = listener.accept().await?;
            let app = app.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let app = app.clone();
                    async move { Ok::<_, Infallible>(handle(&app, req).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    })
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

/// The caller's SPIFFE ID from `x-forwarded-client-cert: By=...;URI=...`.
fn caller(req: &Request<Incoming>) -> String {
    req.headers()
        .get("x-forwarded-client-cert")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.split(';')
                .find_map(|kv| kv.strip_prefix("URI=").map(str::to_string))
        })
        .unwrap_or_else(|| "unknown (no mTLS identity)".to_string())
}

async fn handle(app: &App, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    if let Some(rest) = path.strip_prefix("/call/") {
        let (target, sub) = rest.split_once('/').unwrap_or((rest, ""));
        let Some(addr) = app.upstreams.get(target).copied() else {
            return text(
                StatusCode::NOT_FOUND,
                format!("{} has no upstream named {target:?}\n", app.name),
            );
        };
        return match call(addr, target, &format!("/{sub}")).await {
            Ok((status, body)) => text(
                status,
                format!("{} -> {target}: {}\n{body}", app.name, status.as_u16()),
            ),
            Err(e) => text(
                StatusCode::BAD_GATEWAY,
                format!("{} -> {target}: failed: {e}\n", app.name),
            ),
        };
    }
    text(
        StatusCode::OK,
        format!("hello from {}; caller: {}\n", app.name, caller(&req)),
    )
}

async fn call(addr: SocketAddr, host: &str, path: &str) -> anyhow::Result<(StatusCode, String)> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let req = Request::builder()
        .uri(path)
        .header(http::header::HOST, host)
        .body(Full::new(Bytes::new()))?;
    let rsp = send.send_request(req).await?;
    let status = rsp.status();
    let body = rsp.into_body().collect().await?.to_bytes();
    let mut text = String::from_utf8_lossy(&body).into_owned();
    if !text.ends_with('\n') {
        text.push('\n');
    }
    Ok((status, text))
}
