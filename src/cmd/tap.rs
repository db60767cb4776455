//! `palisade tap WORKLOAD`: the requests flowing through a workload's proxy now, streamed from
//! its admin port (`GET /tap`, a chunked stream of JSON lines: `palisade_proxy::tap`), one
//! line per finished request, until `--duration` passes or Ctrl-C.
//!
//! The filters (`--path`, `--method`, `--to`) travel to the proxy as query parameters, so
//! that only matching requests cross the admin connection and count against the tap's
//! buffer. docs/observe.md ("Tap") describes the fields and who may tap.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::Value;

use crate::observe::{LocalMesh, Workload};

/// What `-o` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// One line of columns per request.
    Table,
    /// The proxy's JSON object per request, one per line.
    Json,
}

#[derive(clap::Args, Debug)]
pub struct TapArgs {
    /// The workload whose proxy to tap (a name of the mesh file).
    #[arg(value_name = "WORKLOAD")]
    pub workload: String,
    /// Stop after this long (`10s`, `1m`, `500ms`) and exit 0 [default: until Ctrl-C].
    #[arg(long, value_name = "D", value_parser = super::proxy::duration)]
    pub duration: Option<Duration>,
    /// Only requests whose path starts with P (`/api`).
    #[arg(long, value_name = "P")]
    pub path: Option<String>,
    /// Only requests with this method (`GET`, `post`: any case).
    #[arg(long, value_name = "M")]
    pub method: Option<String>,
    /// Only requests to W: a workload of the mesh (its SPIFFE ID) or a SPIFFE ID. Inbound
    /// requests go to the tapped workload itself; outbound ones to whom its app calls.
    #[arg(long, value_name = "W")]
    pub to: Option<String>,
    /// `table` or `json` (one JSON object per line).
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// The state directory of the `palisade up` whose proxy is tapped [default: .palisade].
    #[arg(long, env = "PALISADE_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

/// How long the proxy has to accept the tap and answer with the stream's head.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub fn run(a: TapArgs) -> anyhow::Result<ExitCode> {
    if a.duration.is_some_and(|d| d.is_zero()) {
        bail!(
            "--duration 0s taps nothing: give a duration such as 10s, or none to tap until Ctrl-C"
        );
    }
    let dir = a
        .state_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(".palisade"));
    let mesh = LocalMesh::read(&dir)?;
    let Some(workload) = mesh.workload(&a.workload).cloned() else {
        bail!(
            "no workload named {:?} in {} (the mesh has: {})",
            a.workload,
            mesh.path.display(),
            mesh.names()
        );
    };
    let query = query(&a, &mesh)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let until = async {
            match a.duration {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = tap(&mesh, &workload, &query, &a) => r.map(|()| ExitCode::SUCCESS),
            _ = until => Ok(ExitCode::SUCCESS),
            _ = super::shutdown_signal() => Ok(ExitCode::SUCCESS),
        }
    })
}

/// The `/tap` query of the filters.
fn query(a: &TapArgs, mesh: &LocalMesh) -> anyhow::Result<String> {
    let mut params = Vec::new();
    if let Some(p) = &a.path {
        if !p.starts_with('/') {
            bail!("--path {p:?} is not a path: it starts with `/` (a prefix such as /api)");
        }
        params.push(("path", p.clone()));
    }
    if let Some(m) = &a.method {
        if m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphabetic() || b == b'-') {
            bail!("--method {m:?} is not an HTTP method (GET, POST, ...)");
        }
        params.push(("method", m.to_ascii_uppercase()));
    }
    if let Some(to) = &a.to {
        params.push(("to", identity_of(to, mesh)?));
    }
    Ok(params
        .iter()
        .map(|(k, v)| format!("{k}={}", encode(v)))
        .collect::<Vec<_>>()
        .join("&"))
}

/// `--to W`: a workload's SPIFFE ID, or a SPIFFE ID as given.
fn identity_of(to: &str, mesh: &LocalMesh) -> anyhow::Result<String> {
    if to.starts_with("spiffe://") {
        return Ok(to.to_string());
    }
    match mesh.workload(to) {
        Some(Workload {
            spiffe_id: Some(id),
            ..
        }) => Ok(id.clone()),
        Some(_) => bail!(
            "--to {to:?}: {} gives that workload no spiffeId",
            mesh.path.display()
        ),
        None => bail!(
            "--to {to:?} is neither a workload of {} ({}) nor a SPIFFE ID (spiffe://...)",
            mesh.path.display(),
            mesh.names()
        ),
    }
}

/// Percent-encoding of a query value: everything but RFC 3986's unreserved characters.
fn encode(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Opens a tap on `w`'s proxy: its admin `GET /tap?QUERY` (`query` already encoded, or
/// empty), once the proxy has accepted it (200; any other answer is an error with the
/// proxy's reason). The body is the stream of JSON lines. Also what the dashboard relays.
pub async fn connect(
    mesh: &LocalMesh,
    w: &Workload,
    query: &str,
) -> anyhow::Result<http::Response<hyper::body::Incoming>> {
    let Some(admin) = w.admin else {
        bail!(
            "{} gives {} no adminAddr: its proxy cannot be tapped",
            mesh.path.display(),
            w.name
        );
    };
    let path = if query.is_empty() {
        "/tap".to_string()
    } else {
        format!("/tap?{query}")
    };
    let rsp = tokio::time::timeout(CONNECT_TIMEOUT, async {
        let tcp = tokio::net::TcpStream::connect(admin)
            .await
            .with_context(|| format!("cannot connect to {}'s proxy at {admin}", w.name))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        let req = Request::get(&path)
            .header(http::header::HOST, admin.to_string())
            .body(Empty::<Bytes>::new())?;
        anyhow::Ok(send.send_request(req).await?)
    })
    .await
    .map_err(|_| {
        anyhow::anyhow!(
            "{}'s proxy at {admin} did not answer within {CONNECT_TIMEOUT:?}",
            w.name
        )
    })??;
    let status = rsp.status();
    if status != StatusCode::OK {
        let body = tokio::time::timeout(CONNECT_TIMEOUT, rsp.into_body().collect())
            .await
            .ok()
            .and_then(Result::ok)
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_string())
            .unwrap_or_default();
        bail!(
            "{}'s proxy at {admin} refused the tap ({status}): {body}",
            w.name
        );
    }
    Ok(rsp)
}

/// Connects, says so on stderr, and prints the stream until it ends (an error: the proxy
/// stopped or the connection broke).
async fn tap(mesh: &LocalMesh, w: &Workload, query: &str, a: &TapArgs) -> anyhow::Result<()> {
    let rsp = connect(mesh, w, query).await?;
    let admin = w.admin.map_or_else(|| "-".to_string(), |a| a.to_string());
    let what = match a.duration {
        Some(d) => format!("for {}", humantime::format_duration(d)),
        None => "until Ctrl-C".to_string(),
    };
    let id = w.spiffe_id.as_deref().unwrap_or("no identity");
    eprintln!("tapping {} ({id}) at {admin} {what}", w.name);

    let printer = Printer {
        mesh,
        output: a.output,
    };
    let mut body = rsp.into_body();
    let mut buf: Vec<u8> = Vec::new();
    let mut stdout = std::io::stdout().lock();
    loop {
        let frame = match body.frame().await {
            Some(Ok(f)) => f,
            Some(Err(e)) => {
                return Err(e).with_context(|| format!("the tap of {}'s proxy broke", w.name));
            }
            None => bail!(
                "{}'s proxy ended the tap (it stopped, or its connection closed)",
                w.name
            ),
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        let Some(end) = buf.iter().rposition(|&b| b == b'\n') else {
            continue;
        };
        let complete: Vec<u8> = buf.drain(..=end).collect();
        let mut out = String::new();
        for line in complete.split(|&b| b == b'\n') {
            if let Some(text) = printer.line(String::from_utf8_lossy(line).trim()) {
                out.push_str(&text);
                out.push('\n');
            }
        }
        match stdout
            .write_all(out.as_bytes())
            .and_then(|()| stdout.flush())
        {
            Ok(()) => {}
            // The reader went away (`palisade tap api | head`): done.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(e).context("cannot write to stdout"),
        }
    }
}

struct Printer<'a> {
    mesh: &'a LocalMesh,
    output: Output,
}

impl Printer<'_> {
    /// What to print for one line of the stream; None for a keep-alive (an empty line).
    fn line(&self, line: &str) -> Option<String> {
        if line.is_empty() {
            return None;
        }
        if self.output == Output::Json {
            return Some(line.to_string());
        }
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            return Some(line.to_string());
        };
        if let Some(n) = v["dropped"].as_u64() {
            return Some(format!(
                "({n} requests not shown: this tap read too slowly and the proxy dropped them)"
            ));
        }
        Some(self.table_line(&v))
    }

    /// `TIME  DIRECTION  SRC -> DST  METHOD PATH  STATUS  LATENCY  AUTHZ  [route=R]`, with
    /// workload names for identities of the mesh.
    fn table_line(&self, v: &Value) -> String {
        let s = |k: &str| v[k].as_str().unwrap_or("-").to_string();
        let name = |k: &str| {
            v[k].as_str()
                .map_or_else(|| "-".to_string(), |id| self.mesh.display_name(id))
        };
        let status = v["status"]
            .as_u64()
            .map_or_else(|| "-".to_string(), |c| c.to_string());
        let latency = super::stat::millis(v["latencyMs"].as_f64());
        let mut out = format!(
            "{}  {:<8}  {} -> {}  {} {}  {status}  {latency}  {}",
            s("time"),
            s("direction"),
            name("srcIdentity"),
            name("dstIdentity"),
            s("method"),
            s("path"),
            v["authz"].as_str().unwrap_or("-"),
        );
        if let Some(r) = v["route"].as_str() {
            out.push_str(&format!("  route={r}"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mesh() -> LocalMesh {
        let doc = serde_json::json!({"workloads": [
            {"name": "web", "spiffeId": "spiffe://cluster.local/ns/demo/sa/web", "adminAddr": "127.0.0.1:14191"},
            {"name": "api", "spiffeId": "spiffe://cluster.local/ns/demo/sa/api", "adminAddr": "127.0.0.1:14192"},
            {"name": "bare"},
        ]});
        LocalMesh::from_json(&doc, "mesh.json".into()).expect("mesh")
    }

    fn args(path: Option<&str>, method: Option<&str>, to: Option<&str>) -> TapArgs {
        TapArgs {
            workload: "api".into(),
            duration: None,
            path: path.map(Into::into),
            method: method.map(Into::into),
            to: to.map(Into::into),
            output: Output::Json,
            state_dir: None,
        }
    }

    #[test]
    fn filters_become_the_query() {
        let m = mesh();
        assert_eq!(query(&args(None, None, None), &m).expect("q"), "");
        assert_eq!(
            query(&args(Some("/a b&c"), Some("get"), Some("web")), &m).expect("q"),
            "path=/a%20b%26c&method=GET&to=spiffe%3A//cluster.local/ns/demo/sa/web"
        );
        assert_eq!(
            query(&args(None, None, Some("spiffe://other/ns/x/sa/y")), &m).expect("q"),
            "to=spiffe%3A//other/ns/x/sa/y"
        );
        assert!(query(&args(Some("api"), None, None), &m).is_err());
        assert!(query(&args(None, Some("G ET"), None), &m).is_err());
        let e = query(&args(None, None, Some("nope")), &m)
            .unwrap_err()
            .to_string();
        assert!(e.contains("web, api, bare"), "{e}");
        assert!(query(&args(None, None, Some("bare")), &m).is_err());
    }

    #[test]
    fn lines_print_as_json_or_columns() {
        let m = mesh();
        let event = r#"{"time":"2026-01-02T03:04:05.678Z","direction":"inbound","srcIdentity":"spiffe://cluster.local/ns/demo/sa/web","dstIdentity":"spiffe://cluster.local/ns/demo/sa/api","method":"GET","path":"/hello","status":200,"latencyMs":0.812,"durationMs":0.9,"authz":"allow","policy":"demo/p","route":"demo/r/hello"}"#;
        let json = Printer {
            mesh: &m,
            output: Output::Json,
        };
        assert_eq!(json.line(event).as_deref(), Some(event));
        assert_eq!(json.line(""), None, "keep-alives are not printed");
        let table = Printer {
            mesh: &m,
            output: Output::Table,
        };
        assert_eq!(
            table.line(event).as_deref(),
            Some(
                "2026-01-02T03:04:05.678Z  inbound   web -> api  GET /hello  200  0.81ms  allow  route=demo/r/hello"
            )
        );
        let denied = r#"{"time":"t","direction":"outbound","srcIdentity":"spiffe://cluster.local/ns/demo/sa/web","dstIdentity":"unknown","method":"POST","path":"/","status":null,"latencyMs":12.0,"authz":null,"route":null}"#;
        assert_eq!(
            table.line(denied).as_deref(),
            Some("t  outbound  web -> unknown  POST /  -  12.0ms  -")
        );
        assert!(
            table
                .line(r#"{"dropped":7}"#)
                .is_some_and(|l| l.starts_with("(7 requests not shown"))
        );
    }
}
