//! `palisade check`: is the local mesh healthy? Reads `STATE_DIR/mesh.json`, asks the control
//! plane's `/status` and every proxy's admin port, and probes every app. Prints one pass/fail
//! line per check, one FAIL line per problem found; exit 1 if any fails.
//!
//! What fails:
//! - a stale `mesh.json` whose `palisade up` is gone (`mesh not running`, and nothing else),
//! - the control plane unreachable, or its last config change rejected (with the error),
//! - a workload of the mesh with no running proxy (its admin port does not answer), or a
//!   proxy without a valid certificate or config, or one whose config lags the control plane's,
//! - an app that does not answer behind its proxy (its port refuses connections, or it does
//!   not answer an HTTP request),
//! - a service whose selector matches no workload.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::http_util;

/// How long an app or an admin port has to answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(clap::Args)]
pub struct CheckArgs {
    /// The state directory of `palisade up`.
    #[arg(long, env = "PALISADE_STATE_DIR", default_value = ".palisade")]
    pub state_dir: PathBuf,
}

struct Report {
    failed: usize,
}

impl Report {
    fn line(&mut self, ok: bool, what: &str, detail: &str) {
        if !ok {
            self.failed += 1;
        }
        let mark = if ok { "pass" } else { "FAIL" };
        println!("[{mark}] {what}: {detail}");
    }

    fn finish(self) -> ExitCode {
        if self.failed == 0 {
            println!("all checks passed");
            ExitCode::SUCCESS
        } else {
            println!("{} check(s) failed", self.failed);
            ExitCode::from(1)
        }
    }
}

pub fn run(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let mut r = Report { failed: 0 };
    let path = args.state_dir.join("mesh.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            r.line(
                false,
                "mesh",
                &format!(
                    "mesh not running: there is no {} (start the mesh with `palisade up`)",
                    path.display()
                ),
            );
            return Ok(r.finish());
        }
        Err(e) => {
            r.line(
                false,
                "mesh",
                &format!("cannot read {}: {e}", path.display()),
            );
            return Ok(r.finish());
        }
    };
    let doc: serde_json::Value = match serde_json::from_str(&text) {
        Ok(d) => d,
        Err(e) => {
            r.line(
                false,
                "mesh",
                &format!("{} is not JSON ({e})", path.display()),
            );
            return Ok(r.finish());
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(check(&doc, &path, &mut r));
    Ok(r.finish())
}

/// Whether process `pid` runs: `Some(false)` when it is gone (or a zombie), `None` where
/// `/proc` cannot tell.
fn process_alive(pid: u64) -> Option<bool> {
    if !Path::new("/proc/self/stat").exists() {
        return None;
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Some(false);
    };
    // The state follows the command, which is in parentheses and may hold anything.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    Some(!matches!(state, Some("Z" | "X")))
}

fn addr(v: &serde_json::Value) -> Option<SocketAddr> {
    v.as_str().and_then(|s| s.parse().ok())
}

/// `up`'s pid, when mesh.json names it: gone means the mesh is not running. Without it, the
/// control plane's: `up` restarts a dead control plane, so its absence only counts when no
/// proxy answers either (children of a killed `up` exit on their own).
async fn stale(doc: &serde_json::Value, path: &Path) -> Option<String> {
    if let Some(pid) = doc["upPid"].as_u64() {
        return (process_alive(pid) == Some(false)).then(|| {
            format!(
                "mesh not running: {} is stale (`palisade up`, pid {pid}, is gone); start the mesh with `palisade up`",
                path.display()
            )
        });
    }
    let pid = doc["controlPlanePid"].as_u64()?;
    if process_alive(pid) != Some(false) {
        return None;
    }
    for w in doc["workloads"].as_array().into_iter().flatten() {
        if let Some(admin) = addr(&w["adminAddr"])
            && tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(admin))
                .await
                .is_ok_and(|c| c.is_ok())
        {
            return None;
        }
    }
    Some(format!(
        "mesh not running: {} is stale (its control plane, pid {pid}, is gone and no proxy answers); start the mesh with `palisade up`",
        path.display()
    ))
}

/// A workload to check: from mesh.json, or only in the control plane's mesh (added to the mesh
/// file after `up` started, so `up` started nothing for it).
struct Target {
    name: String,
    admin: Option<SocketAddr>,
    app: Option<SocketAddr>,
    started_by_up: bool,
}

fn targets(doc: &serde_json::Value, status: Option<&serde_json::Value>) -> Vec<Target> {
    let mut out: Vec<Target> = doc["workloads"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| Target {
            name: w["name"].as_str().unwrap_or("?").to_string(),
            admin: addr(&w["adminAddr"]),
            app: addr(&w["appAddr"]),
            started_by_up: true,
        })
        .collect();
    let Some(st) = status else {
        return out;
    };
    for name in st["workloads"].as_array().into_iter().flatten() {
        let Some(name) = name.as_str() else { continue };
        if out.iter().any(|t| t.name == name) {
            continue;
        }
        let addrs = &st["workloadAddrs"][name];
        out.push(Target {
            name: name.to_string(),
            admin: addr(&addrs["adminAddr"]),
            app: addr(&addrs["appAddr"]),
            started_by_up: false,
        });
    }
    out
}

async fn check(doc: &serde_json::Value, path: &Path, r: &mut Report) {
    if let Some(why) = stale(doc, path).await {
        r.line(false, "mesh", &why);
        return;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    match addr(&doc["controlPlane"]) {
        Some(cp) => {
            let ok = tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(cp))
                .await
                .is_ok_and(|c| c.is_ok());
            r.line(
                ok,
                "control plane",
                &format!("{cp} {}", if ok { "reachable" } else { "unreachable" }),
            );
        }
        None => r.line(false, "control plane", "missing from mesh.json"),
    }
    let status = control_plane_status(doc, r).await;
    if let Some(st) = &status {
        config_rejection(st, now, r);
    }

    // Which service (and so which protocol) each workload's app serves.
    let mut protocols: BTreeMap<String, String> = BTreeMap::new();
    if let Some(st) = &status {
        for s in st["services"].as_array().into_iter().flatten() {
            let proto = s["protocol"].as_str().unwrap_or("detect");
            for w in s["endpointWorkloads"].as_array().into_iter().flatten() {
                if let Some(w) = w.as_str() {
                    protocols
                        .entry(w.to_string())
                        .or_insert_with(|| proto.to_string());
                }
            }
        }
    }

    let mut digests = Vec::new();
    // Outbound mTLS connections between proxies, by negotiated key exchange group.
    let mut groups: BTreeMap<String, f64> = BTreeMap::new();
    for t in targets(doc, status.as_ref()) {
        let name = &t.name;
        let Some(admin) = t.admin else {
            r.line(false, &format!("{name} proxy"), "no admin address known");
            continue;
        };
        match http_util::get(admin, "/ready").await {
            Ok((s, _)) if s.is_success() => r.line(true, &format!("{name} proxy"), "ready"),
            Ok((s, body)) => r.line(
                false,
                &format!("{name} proxy"),
                &format!("not ready ({s}): {}", body.trim()),
            ),
            Err(e) => {
                let why = if t.started_by_up {
                    String::new()
                } else {
                    "; `palisade up` is not running it (it says why in its terminal, e.g. a \
                     port in use; fix that and save the mesh file again, or restart `palisade up`)"
                        .to_string()
                };
                r.line(
                    false,
                    &format!("{name} proxy"),
                    &format!(
                        "no running proxy: its admin port {admin} does not answer ({}){why}",
                        super::one_sentence(&e)
                    ),
                );
                continue;
            }
        }
        match http_util::get(admin, "/status").await {
            Ok((s, body)) if s.is_success() => {
                let st: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                let identity = st["identity"].as_str().unwrap_or("?");
                match st["certExpiry"].as_i64() {
                    Some(expiry) if expiry > now => r.line(
                        true,
                        &format!("{name} certificate"),
                        &format!(
                            "{identity} expires in {}",
                            super::human_duration((expiry - now).unsigned_abs())
                        ),
                    ),
                    Some(expiry) if expiry > 0 => r.line(
                        false,
                        &format!("{name} certificate"),
                        &format!(
                            "{identity} expired {} ago",
                            super::human_duration((now - expiry).unsigned_abs())
                        ),
                    ),
                    _ => r.line(false, &format!("{name} certificate"), "none yet"),
                }
                let v = st["configVersion"].as_u64().unwrap_or(0);
                digests.push((name.clone(), st["configDigest"].as_u64().unwrap_or(0)));
                r.line(
                    v > 0,
                    &format!("{name} config"),
                    &if v > 0 {
                        format!("version {v}")
                    } else {
                        "none received yet".to_string()
                    },
                );
            }
            _ => r.line(false, &format!("{name} status"), "unavailable"),
        }
        if let Ok((s, text)) = http_util::get(admin, "/metrics").await
            && s.is_success()
        {
            count_key_exchanges(&text, &mut groups);
        }
        if let Some(app) = t.app {
            let proto = protocols.get(name).map(String::as_str).unwrap_or("detect");
            match probe_app(app, proto).await {
                Ok(how) => r.line(true, &format!("{name} app"), &format!("{app} {how}")),
                Err(why) => r.line(
                    false,
                    &format!("{name} app"),
                    &format!("{app} {why}; requests to {name} through its proxy fail"),
                ),
            }
        }
    }

    key_exchange_line(&groups, r);

    let Some(st) = &status else {
        return;
    };
    for s in st["services"].as_array().into_iter().flatten() {
        let svc = format!(
            "{}.{}",
            s["name"].as_str().unwrap_or("?"),
            s["namespace"].as_str().unwrap_or("?")
        );
        let n = s["endpoints"].as_u64().unwrap_or(0);
        if n == 0 {
            let selector = s["selector"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("{k}: {}", v.as_str().unwrap_or("?")))
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default();
            r.line(
                false,
                &format!("service {svc}"),
                &format!(
                    "no endpoints: its selector {{{selector}}} matches no workload in namespace {} (calls to it fail)",
                    s["namespace"].as_str().unwrap_or("?")
                ),
            );
        } else {
            let names: Vec<&str> = s["endpointWorkloads"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|w| w.as_str())
                .collect();
            r.line(
                true,
                &format!("service {svc}"),
                &format!("{n} endpoint(s): {}", names.join(", ")),
            );
        }
    }
    for (name, digest) in &digests {
        let (ok, detail) = match st["configDigests"][name].as_u64() {
            Some(want) if want == *digest => {
                (true, "the proxy has the control plane's current config")
            }
            Some(_) => (false, "the proxy's config differs from the control plane's"),
            None => (
                false,
                "the control plane serves no such workload any more (removed from the mesh file?), yet its proxy still runs",
            ),
        };
        r.line(ok, &format!("{name} config in sync"), detail);
    }
}

/// The control plane's `/status`, or None (and a FAIL line) when it cannot be had.
async fn control_plane_status(
    doc: &serde_json::Value,
    r: &mut Report,
) -> Option<serde_json::Value> {
    let Some(addr) = addr(&doc["controlPlaneStatus"]) else {
        r.line(
            false,
            "control plane status",
            "no status address in mesh.json",
        );
        return None;
    };
    match http_util::get(addr, "/status").await {
        Ok((s, body)) if s.is_success() => match serde_json::from_str(&body) {
            Ok(v) => Some(v),
            Err(e) => {
                r.line(
                    false,
                    "control plane status",
                    &format!("{addr}/status is not JSON ({e})"),
                );
                None
            }
        },
        Ok((s, _)) => {
            r.line(
                false,
                "control plane status",
                &format!("{addr}/status answered {s}"),
            );
            None
        }
        Err(e) => {
            r.line(false, "control plane status", &super::one_sentence(&e));
            None
        }
    }
}

/// The control plane's last config change, if it was rejected and nothing loaded since.
fn config_rejection(st: &serde_json::Value, now: i64, r: &mut Report) {
    let generation = st["generation"].as_u64().unwrap_or(0);
    let rejection = &st["lastRejection"];
    if rejection.is_null() {
        r.line(
            true,
            "config",
            &format!("generation {generation} serving, no rejected change"),
        );
        return;
    }
    let ago = rejection["at"]
        .as_i64()
        .map(|at| {
            format!(
                " {} ago",
                super::human_duration((now - at).max(0).unsigned_abs())
            )
        })
        .unwrap_or_default();
    r.line(
        false,
        "config",
        &format!(
            "the last change was rejected{ago}, generation {} keeps serving: {}",
            rejection["servingGeneration"]
                .as_u64()
                .unwrap_or(generation),
            rejection["error"].as_str().unwrap_or("(no error text)")
        ),
    );
}

/// Whether the app at `addr` answers what its proxy would send it: a connection for an
/// `opaque` service, an HTTP/2 preface for `http2`/`grpc`, an HTTP/1.1 `HEAD /` otherwise.
/// `Ok` says how it answered, `Err` what is wrong.
async fn probe_app(addr: SocketAddr, protocol: &str) -> Result<String, String> {
    let mut tcp =
        match tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
            Err(_) => {
                return Err(format!(
                    "did not accept a connection within {PROBE_TIMEOUT:?}"
                ));
            }
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                return Err("refuses connections (is the app running?)".into());
            }
            Ok(Err(e)) => return Err(format!("cannot be reached ({e})")),
            Ok(Ok(t)) => t,
        };
    let request: Vec<u8> = match protocol {
        "opaque" => return Ok("accepts connections (opaque TCP)".into()),
        "http2" | "grpc" => {
            let mut preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
            // An empty SETTINGS frame.
            preface.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
            preface
        }
        _ => format!(
            "HEAD / HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: palisade-check\r\nConnection: close\r\n\r\n"
        )
        .into_bytes(),
    };
    let exchange = async {
        tcp.write_all(&request).await?;
        let mut buf = [0u8; 64];
        let n = tcp.read(&mut buf).await?;
        std::io::Result::Ok(buf[..n].to_vec())
    };
    match tokio::time::timeout(PROBE_TIMEOUT, exchange).await {
        Err(_) => Err(format!(
            "accepted a connection but did not answer an HTTP request within {PROBE_TIMEOUT:?}"
        )),
        Ok(Err(e)) => Err(format!("broke the connection ({e})")),
        Ok(Ok(bytes)) if bytes.is_empty() => {
            Err("closed the connection without answering an HTTP request".into())
        }
        Ok(Ok(bytes)) => match protocol {
            "http2" | "grpc" => Ok("answers HTTP/2".into()),
            _ => match std::str::from_utf8(&bytes)
                .ok()
                .and_then(|t| t.strip_prefix("HTTP/1."))
                .and_then(|t| t.get(2..5))
            {
                Some(code) => Ok(format!("answers HTTP ({code})")),
                None if protocol == "http" => {
                    Err("answered, but not in HTTP/1.1 (the service's protocol is http)".into())
                }
                None => Ok("answers (not HTTP)".into()),
            },
        },
    }
}

/// Adds the outbound `palisade_tls_connections_total` samples of one proxy, by `group`.
fn count_key_exchanges(metrics: &str, groups: &mut BTreeMap<String, f64>) {
    for s in super::prom::parse(metrics) {
        if s.name != "palisade_tls_connections_total" || s.label("direction") != "outbound" {
            continue;
        }
        let group = match s.label("group") {
            "" => "unknown",
            g => g,
        };
        *groups.entry(group.to_string()).or_default() += s.value;
    }
}

/// Whether the proxies' mTLS uses the post-quantum hybrid. A connection on a classical group
/// is not a failure (a peer of an older version, during an upgrade), but it is said.
fn key_exchange_line(groups: &BTreeMap<String, f64>, r: &mut Report) {
    let total: f64 = groups.values().sum();
    if total == 0.0 {
        r.line(
            true,
            "post-quantum mTLS",
            "no connection between proxies yet (X25519MLKEM768 is preferred)",
        );
        return;
    }
    let pq = groups.get("X25519MLKEM768").copied().unwrap_or(0.0);
    let others: Vec<String> = groups
        .iter()
        .filter(|(g, n)| g.as_str() != "X25519MLKEM768" && **n > 0.0)
        .map(|(g, n)| format!("{n} on {g}"))
        .collect();
    let detail = if others.is_empty() {
        format!("all {total} mTLS connections between proxies negotiated X25519MLKEM768")
    } else {
        format!(
            "{pq} of {total} mTLS connections between proxies negotiated X25519MLKEM768; {} (a peer without post-quantum support)",
            others.join(", ")
        )
    };
    r.line(true, "post-quantum mTLS", &detail);
}
