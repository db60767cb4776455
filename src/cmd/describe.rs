//! `palisade describe WORKLOAD`: one workload of a running local mesh as its proxy holds it and
//! as the control plane serves it — its identity and live certificate (issuer, expiry), the
//! mTLS mode it enforces and the PeerAuthentication that set it, the authorization policies and
//! routes that apply (by `namespace/name`), its upstream services' endpoints with the
//! balancer's state of each, and the config version its proxy holds against what the control
//! plane serves.
//!
//! Two reads, made together: the proxy's admin `GET /config` (what it holds, redacted: no key)
//! and the control plane's `GET /config?workload=NAME` and `/status` (its status address,
//! `controlPlaneStatus` in `mesh.json`). [`describe`] puts them into one JSON document (the
//! shape is in docs/observe.md, "describe"), which `-o json` prints and the text view (and the
//! dashboard) render.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use palisade_control_plane::served::ServedConfig;
use serde_json::{Value, json};

use super::{http_util, human_duration, one_sentence};
use crate::observe::LocalMesh;

/// What `-o` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Lines for a person.
    #[value(alias = "table")]
    Text,
    /// One JSON document.
    Json,
}

#[derive(clap::Args, Debug)]
pub struct DescribeArgs {
    /// The workload (a name of the mesh file).
    #[arg(value_name = "WORKLOAD")]
    pub workload: String,
    /// `text` or `json`.
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Text)]
    pub output: Format,
    /// The state directory of the `palisade up` whose mesh to read [default: .palisade].
    #[arg(long, env = "PALISADE_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

/// How long the proxy and the control plane have to answer.
const TIMEOUT: Duration = Duration::from_secs(2);

pub fn run(a: DescribeArgs) -> anyhow::Result<ExitCode> {
    let dir = a
        .state_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(".palisade"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let doc = rt.block_on(describe(&dir, &a.workload))?;
    for (what, err) in doc["errors"].as_object().into_iter().flatten() {
        if let Some(e) = err.as_str() {
            let what = if what == "proxy" {
                "its proxy"
            } else {
                "the control plane"
            };
            eprintln!("warning: cannot read {what}: {e}; what it would say is missing");
        }
    }
    match a.output {
        Format::Json => println!("{}", serde_json::to_string_pretty(&doc)?),
        Format::Text => print!("{}", render(&doc)),
    }
    let complete = doc["errors"]
        .as_object()
        .is_none_or(|e| e.values().all(Value::is_null));
    Ok(if complete {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Describes `workload` of the mesh whose state directory is `state_dir`. Fails when there is
/// no running mesh or no such workload; a proxy or control plane that cannot be read leaves its
/// part out and says why in `errors`.
pub async fn describe(state_dir: &Path, workload: &str) -> anyhow::Result<Value> {
    let mesh = LocalMesh::read(state_dir)?;
    let Some(w) = mesh.workload(workload) else {
        bail!(
            "no workload named {workload:?} in {} (the mesh has: {})",
            mesh.path.display(),
            mesh.names()
        );
    };
    let doc: Value = std::fs::read_to_string(&mesh.path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let cp: Option<SocketAddr> = doc["controlPlaneStatus"]
        .as_str()
        .and_then(|s| s.parse().ok());
    let proxy = async {
        let addr = w.admin.with_context(|| {
            format!("{} gives no adminAddr for {workload}", mesh.path.display())
        })?;
        get_json(addr, "/config", "its proxy").await
    };
    let control_plane = async {
        let addr = cp.with_context(|| {
            format!("{} has no controlPlaneStatus address", mesh.path.display())
        })?;
        let uri = format!("/config?workload={}", percent_encode(workload));
        let (served, status) = tokio::join!(
            get_json(addr, &uri, "the control plane"),
            get_json(addr, "/status", "the control plane"),
        );
        let served: ServedConfig = serde_json::from_value(served?).with_context(|| {
            format!("the control plane at {addr} sent a config this CLI cannot read")
        })?;
        anyhow::Ok((served, status.ok(), addr))
    };
    let (proxy, control_plane) = tokio::join!(proxy, control_plane);
    Ok(build(
        w,
        proxy.map_err(|e| one_sentence(&e)),
        control_plane.map_err(|e| one_sentence(&e)),
        unix_now(),
    ))
}

/// GET `path` from `addr` and read the answer as JSON; a non-2xx answer is an error with its
/// message.
async fn get_json(addr: SocketAddr, path: &str, who: &str) -> anyhow::Result<Value> {
    let (status, body) = http_util::request(http::Method::GET, addr, path, TIMEOUT)
        .await
        .with_context(|| format!("{who} at {addr} did not answer"))?;
    if !status.is_success() {
        let msg = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| body.trim().to_string());
        bail!("{who} at {addr} answered {path} with {status}: {msg}");
    }
    serde_json::from_str(&body).with_context(|| format!("{who} at {addr}{path} sent no JSON"))
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// A query value: every byte but RFC 3986's unreserved ones escaped.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A digest as `describe` shows it: 16 hex digits (a JavaScript number cannot hold a u64).
fn hex(d: u64) -> String {
    format!("{d:016x}")
}

type Served = (ServedConfig, Option<Value>, SocketAddr);

/// The document, from what the proxy holds (its `/config`) and what the control plane serves
/// (its `/config?workload=` and `/status`), either of which may have failed. `now`: Unix
/// seconds.
pub fn build(
    w: &crate::observe::Workload,
    proxy: Result<Value, String>,
    served: Result<Served, String>,
    now: i64,
) -> Value {
    let p = proxy.as_ref().ok();
    let s = served.as_ref().ok().map(|(s, _, _)| s);
    let status = served.as_ref().ok().and_then(|(_, st, _)| st.as_ref());

    let identity = p
        .and_then(|p| p["identity"].as_str().map(str::to_string))
        .or_else(|| s.map(|s| s.workload.spiffe_id.clone()))
        .or_else(|| w.spiffe_id.clone());

    let certificate = p
        .map(|p| &p["certificate"])
        .filter(|c| c.is_object())
        .map(|c| {
            let mut c = c.clone();
            if let Some(na) = c["notAfter"].as_i64() {
                c["expiresInSeconds"] = json!(na - now);
            }
            c
        });

    json!({
        "workload": w.name,
        "namespace": s.map(|s| s.workload.namespace.clone()),
        "identity": identity,
        "adminAddr": w.admin.map(|a| a.to_string()),
        "ready": p.and_then(|p| p["ready"].as_bool()),
        "certificate": certificate,
        "mtls": mtls(p, s),
        "defaultPolicy": p
            .and_then(|p| p["inbound"]["defaultPolicy"].as_str().map(str::to_string))
            .or_else(|| s.map(|s| default_policy_name(&s.inbound.default_policy))),
        "policies": policies(p, s),
        "routes": routes(p),
        "upstreams": upstreams(p),
        "config": config_state(p, s),
        "controlPlane": served.as_ref().ok().map(|(_, _, addr)| json!({
            "statusAddr": addr.to_string(),
            "lastRejection": status.map_or(Value::Null, |st| st["lastRejection"].clone()),
        })),
        "errors": {
            "proxy": proxy.as_ref().err(),
            "controlPlane": served.as_ref().err(),
        },
    })
}

/// `DEFAULT_POLICY_DENY` (the proto name the control plane shows) as the mesh file says it.
fn default_policy_name(proto: &str) -> String {
    proto
        .strip_prefix("DEFAULT_POLICY_")
        .unwrap_or(proto)
        .to_ascii_lowercase()
}

/// A served mode as enforced: UNSET (nothing set it) is STRICT.
fn enforced_mode(served: &str) -> String {
    let m = served.strip_prefix("MTLS_MODE_").unwrap_or(served);
    if m == "UNSET" {
        "STRICT".into()
    } else {
        m.to_string()
    }
}

/// The mode on the workload's port and where it came from, and the other ports' modes.
fn mtls(p: Option<&Value>, s: Option<&ServedConfig>) -> Value {
    let port = p
        .and_then(|p| p["inbound"]["workloadPort"].as_u64())
        .and_then(|v| u16::try_from(v).ok())
        .or_else(|| s.map(|s| s.workload.port()));
    let source = |port: u16| s.map(|s| s.mtls_source_for(port).to_string());
    // Held by the proxy, else served.
    let mut modes: BTreeMap<u16, String> = BTreeMap::new();
    let default_mode = match p {
        Some(p) => {
            for (k, v) in p["inbound"]["portModes"].as_object().into_iter().flatten() {
                if let (Ok(port), Some(m)) = (k.parse::<u16>(), v.as_str()) {
                    modes.insert(port, m.to_string());
                }
            }
            p["inbound"]["mode"].as_str().map(str::to_string)
        }
        None => s.map(|s| {
            for (port, m) in &s.inbound.port_modes {
                if let Ok(port) = u16::try_from(*port) {
                    modes.insert(port, enforced_mode(m));
                }
            }
            enforced_mode(&s.inbound.mode)
        }),
    };
    let mode = match port {
        Some(port) => modes.get(&port).cloned().or(default_mode.clone()),
        None => default_mode.clone(),
    };
    json!({
        "port": port,
        "mode": mode,
        "source": port.and_then(source).or_else(|| s.map(|s| s.mtls_source.clone())),
        "portModes": modes
            .iter()
            .map(|(port, m)| json!({ "port": port, "mode": m, "source": source(*port) }))
            .collect::<Vec<_>>(),
    })
}

/// The authorization policies the proxy enforces and the control plane serves, by
/// `namespace/name`: the proxy's order (AUDIT, DENY, then ALLOW), then any it does not hold.
fn policies(p: Option<&Value>, s: Option<&ServedConfig>) -> Vec<Value> {
    let mut out: Vec<(String, String, bool, bool)> = Vec::new();
    for pol in p
        .and_then(|p| p["inbound"]["authorizationPolicies"].as_array())
        .into_iter()
        .flatten()
    {
        let name = pol["name"].as_str().unwrap_or("?").to_string();
        let action = pol["action"].as_str().unwrap_or("?").to_string();
        out.push((name, action, true, false));
    }
    for pol in s
        .map(|s| &s.inbound.authorization_policies[..])
        .unwrap_or(&[])
    {
        let name = pol.qualified_name();
        let action = serde_json::to_value(pol.spec.action)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_else(|| "?".into());
        match out.iter_mut().find(|(n, _, _, _)| *n == name) {
            Some(row) => row.3 = true,
            None => out.push((name, action, false, true)),
        }
    }
    out.into_iter()
        .map(|(name, action, enforced, served)| {
            json!({
                "name": name,
                "action": action,
                // Known only when that side was read.
                "enforced": p.map(|_| enforced),
                "served": s.map(|_| served),
            })
        })
        .collect()
}

/// The routes the proxy holds: the inbound ones (the routes of the services the workload backs,
/// which label its requests and which policies can name) and each upstream service's.
fn routes(p: Option<&Value>) -> Vec<Value> {
    let Some(p) = p else {
        return Vec::new();
    };
    let one = |r: &Value, direction: &str, service: Option<&str>| {
        json!({
            "name": r["name"],
            "kind": r["kind"],
            "direction": direction,
            "service": service,
            "rules": r["rules"],
        })
    };
    let mut out: Vec<Value> = p["inbound"]["routes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| one(r, "inbound", None))
        .collect();
    for svc in p["outbound"].as_array().into_iter().flatten() {
        for r in svc["routes"].as_array().into_iter().flatten() {
            out.push(one(r, "outbound", svc["service"].as_str()));
        }
    }
    out
}

/// The services the proxy calls, with their endpoints and the balancer's state of each.
fn upstreams(p: Option<&Value>) -> Vec<Value> {
    let Some(p) = p else {
        return Vec::new();
    };
    let listeners: BTreeMap<&str, &str> = p["upstreamListeners"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|u| Some((u["service"].as_str()?, u["listen"].as_str()?)))
        .collect();
    p["outbound"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|svc| {
            let key = svc["service"].as_str().unwrap_or("?");
            json!({
                "service": key,
                "protocol": svc["protocol"],
                "listen": listeners.get(key),
                "endpoints": svc["endpoints"],
            })
        })
        .collect()
}

/// The version the proxy holds against the generation the control plane serves; in sync when
/// the configs' digests agree (a change that did not concern this workload moves the
/// generation on without a new config for it).
fn config_state(p: Option<&Value>, s: Option<&ServedConfig>) -> Value {
    let proxy_version = p.and_then(|p| p["configVersion"].as_u64());
    let received = p.and_then(|p| p["configReceived"].as_bool());
    let proxy_digest = p.and_then(|p| p["configDigest"].as_u64());
    let in_sync = match (received, proxy_digest, s) {
        (Some(false), _, Some(_)) => Some(false),
        (Some(true), Some(d), Some(s)) => Some(d == s.config_digest),
        _ => None,
    };
    json!({
        "proxyVersion": proxy_version,
        "proxyDigest": received.filter(|r| *r).and(proxy_digest).map(hex),
        "servedGeneration": s.map(|s| s.generation),
        "servedDigest": s.map(|s| hex(s.config_digest)),
        "inSync": in_sync,
        "state": match in_sync {
            Some(true) => "in sync",
            Some(false) => "behind",
            None => "unknown",
        },
    })
}

/// The text view of a [`describe`] document.
pub fn render(d: &Value) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let s = |v: &Value| v.as_str().unwrap_or("-").to_string();
    let num = |v: &Value| v.as_u64().map_or("?".to_string(), |n| n.to_string());
    let _ = writeln!(
        o,
        "workload:      {}{}",
        s(&d["workload"]),
        d["namespace"]
            .as_str()
            .map(|n| format!(" (namespace {n})"))
            .unwrap_or_default()
    );
    let _ = writeln!(o, "identity:      {}", s(&d["identity"]));
    if let Some(ready) = d["ready"].as_bool() {
        let _ = writeln!(
            o,
            "proxy:         {} at {}",
            if ready { "ready" } else { "not ready" },
            s(&d["adminAddr"])
        );
    }
    let c = &d["certificate"];
    if c.is_object() {
        let left = c["expiresInSeconds"].as_i64().unwrap_or(0);
        let when = c["notAfter"]
            .as_i64()
            .and_then(|t| u64::try_from(t).ok())
            .map(|t| {
                humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(t)).to_string()
            })
            .unwrap_or_else(|| "?".into());
        let expiry = if left > 0 {
            format!(
                "expires {when} (in {})",
                human_duration(left.unsigned_abs())
            )
        } else {
            format!(
                "EXPIRED {when} ({} ago)",
                human_duration(left.unsigned_abs())
            )
        };
        let trust = if c["verified"].as_bool() == Some(true) {
            "chain verified against the proxy's trust bundle".to_string()
        } else {
            format!("NOT verified: {}", s(&c["verifyError"]))
        };
        let _ = writeln!(o, "certificate:   {}", s(&c["spiffeId"]));
        let _ = writeln!(o, "  issuer:      {} ({trust})", s(&c["issuer"]));
        let _ = writeln!(o, "  validity:    {expiry}");
        let _ = writeln!(o, "  serial:      {}", s(&c["serial"]));
    } else if d["errors"]["proxy"].is_null() {
        let _ = writeln!(o, "certificate:   none yet");
    } else {
        let _ = writeln!(o, "certificate:   unknown (its proxy cannot be read)");
    }
    let m = &d["mtls"];
    let _ = writeln!(
        o,
        "mTLS:          {}{} ({})",
        s(&m["mode"]),
        m["port"]
            .as_u64()
            .map(|p| format!(" on port {p}"))
            .unwrap_or_default(),
        m["source"].as_str().unwrap_or("source unknown")
    );
    for pm in m["portModes"].as_array().into_iter().flatten() {
        if pm["port"] != m["port"] {
            let _ = writeln!(
                o,
                "  port {}:   {} ({})",
                pm["port"],
                s(&pm["mode"]),
                pm["source"].as_str().unwrap_or("source unknown")
            );
        }
    }
    let _ = writeln!(
        o,
        "default:       {} (when no ALLOW policy selects it)",
        s(&d["defaultPolicy"])
    );
    let policies = d["policies"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    if policies.is_empty() {
        let _ = writeln!(o, "policies:      none");
    } else {
        let _ = writeln!(o, "policies:");
        for pol in policies {
            let note = match (pol["enforced"].as_bool(), pol["served"].as_bool()) {
                (Some(true), Some(false)) => "  (the proxy still enforces it; no longer served)",
                (Some(false), Some(true)) => "  (served; the proxy does not hold it yet)",
                _ => "",
            };
            let _ = writeln!(o, "  {:<6} {}{note}", s(&pol["action"]), s(&pol["name"]));
        }
    }
    let routes = d["routes"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    if routes.is_empty() {
        let _ = writeln!(o, "routes:        none");
    } else {
        let _ = writeln!(o, "routes:");
        for r in routes {
            let at = match r["service"].as_str() {
                Some(svc) => format!("calls to {svc}"),
                None => "inbound".to_string(),
            };
            let rules: Vec<String> = r["rules"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|x| x.as_str()?.rsplit('/').next().map(str::to_string))
                .collect();
            let _ = writeln!(
                o,
                "  {} {} ({at}; rules: {})",
                s(&r["kind"]),
                s(&r["name"]),
                rules.join(", ")
            );
        }
    }
    let upstreams = d["upstreams"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    if upstreams.is_empty() {
        let _ = writeln!(o, "upstreams:     none");
    } else {
        let _ = writeln!(o, "upstreams:");
        for u in upstreams {
            let _ = writeln!(
                o,
                "  {} ({}{})",
                s(&u["service"]),
                s(&u["protocol"]),
                u["listen"]
                    .as_str()
                    .map(|l| format!(", the app calls {l}"))
                    .unwrap_or_default()
            );
            let eps = u["endpoints"].as_array().map(Vec::as_slice).unwrap_or(&[]);
            if eps.is_empty() {
                let _ = writeln!(o, "    no endpoints");
            }
            for e in eps {
                let state = match (e["ejected"].as_bool(), e["failing"].as_bool()) {
                    (Some(true), _) => "ejected",
                    (Some(false), Some(true)) => "failing",
                    (Some(false), _) => "ok",
                    _ => "not balanced",
                };
                let _ = writeln!(
                    o,
                    "    {:<21} {:<10} weight {:<3} {:<8} {}",
                    s(&e["addr"]),
                    s(&e["workload"]),
                    num(&e["weight"]),
                    state,
                    s(&e["identity"])
                );
            }
        }
    }
    let cfg = &d["config"];
    let mut state = s(&cfg["state"]);
    if cfg["inSync"].as_bool() == Some(true) && cfg["proxyVersion"] != cfg["servedGeneration"] {
        state.push_str("; the generations since changed nothing for this workload");
    }
    let _ = writeln!(
        o,
        "config version: proxy holds {}, control plane serves {} ({state})",
        num(&cfg["proxyVersion"]),
        num(&cfg["servedGeneration"]),
    );
    if let Some(rej) = d["controlPlane"]["lastRejection"].as_object() {
        let _ = writeln!(
            o,
            "  the control plane's last config change was rejected: {}",
            rej.get("error").and_then(Value::as_str).unwrap_or("?")
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    const MESH: &str = "trustDomain: cluster.local\ndefaultPolicy: allow\nworkloads:
  - { name: db, namespace: demo, labels: { app: db }, appPort: 8080, inboundPort: 1001, adminPort: 1002 }
";
    const POLICIES: &str = "apiVersion: palisade.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: db-from-api, namespace: demo }
spec:
  selector: { matchLabels: { app: db } }
  rules: [ { from: [ { source: { principals: [\"cluster.local/ns/demo/sa/api\"] } } ] } ]
---
apiVersion: palisade.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: new-one, namespace: demo }
spec:
  selector: { matchLabels: { app: db } }
  action: DENY
  rules: [ { to: [ { operation: { paths: [\"/admin\"] } } ] } ]
---
apiVersion: palisade.dev/v1alpha1
kind: PeerAuthentication
metadata: { name: default, namespace: palisade-system }
spec: { mtls: { mode: STRICT } }
---
apiVersion: palisade.dev/v1alpha1
kind: PeerAuthentication
metadata: { name: db-probes, namespace: demo }
spec:
  selector: { matchLabels: { app: db } }
  portLevelMtls: { \"9090\": { mode: PERMISSIVE } }
";

    fn served() -> ServedConfig {
        use palisade_api::policy::{Resource, parse_str};
        let dir = Path::new("/nonexistent");
        let mesh = palisade_control_plane::mesh::parse(MESH, &dir.join("mesh.yaml")).expect("mesh");
        let resources: Vec<Resource> = parse_str(&dir.join("p.yaml"), POLICIES).expect("policies");
        palisade_control_plane::model::Model::from_parts(mesh, resources, 5)
            .served_config("db")
            .expect("db")
    }

    fn workload() -> crate::observe::Workload {
        crate::observe::Workload {
            name: "db".into(),
            spiffe_id: Some("spiffe://cluster.local/ns/demo/sa/db".into()),
            admin: Some("127.0.0.1:1002".parse().expect("addr")),
        }
    }

    /// What a proxy's `/config` says, holding `digest` at `version`, enforcing only
    /// db-from-api.
    fn held(version: u64, digest: u64) -> Value {
        json!({
            "workload": "db",
            "identity": "spiffe://cluster.local/ns/demo/sa/db",
            "ready": true,
            "certificate": {
                "spiffeId": "spiffe://cluster.local/ns/demo/sa/db",
                "issuer": "O=cluster.local, CN=Palisade issuer",
                "serial": "01:02",
                "notBefore": 1_000,
                "notAfter": 4_600,
                "verified": true,
                "verifyError": null,
            },
            "configVersion": version,
            "configDigest": digest,
            "configReceived": true,
            "inbound": {
                "workloadPort": 8080,
                "mode": "STRICT",
                "effectiveMode": "STRICT",
                "portModes": { "9090": "PERMISSIVE" },
                "defaultPolicy": "allow",
                "authorizationPolicies": [ { "name": "demo/db-from-api", "action": "ALLOW" } ],
                "routes": [ { "name": "demo/db-routes", "kind": "HTTPRoute", "hostnames": [], "rules": ["demo/db-routes/0"] } ],
            },
            "outbound": [ {
                "service": "api.demo:8080",
                "protocol": "http",
                "routes": [],
                "endpoints": [ { "addr": "127.0.0.1:1003", "workload": "api", "identity": "spiffe://cluster.local/ns/demo/sa/api", "weight": 1, "ejected": false, "failing": true, "idleMs": 5 } ],
            } ],
            "upstreamListeners": [ { "service": "api.demo:8080", "listen": "127.0.0.1:1004" } ],
        })
    }

    #[test]
    fn a_proxy_behind_the_control_plane_and_the_policy_it_does_not_hold_yet() {
        let s = served();
        let addr: SocketAddr = "127.0.0.1:9000".parse().expect("addr");
        let d = build(
            &workload(),
            Ok(held(4, s.config_digest ^ 1)),
            Ok((s.clone(), None, addr)),
            1_600,
        );
        assert_eq!(d["namespace"], "demo");
        assert_eq!(d["certificate"]["expiresInSeconds"], 3_000);
        assert_eq!(d["mtls"]["mode"], "STRICT");
        assert_eq!(d["mtls"]["port"], 8080);
        assert_eq!(
            d["mtls"]["source"],
            "PeerAuthentication palisade-system/default"
        );
        assert_eq!(d["mtls"]["portModes"][0]["port"], 9090);
        assert_eq!(
            d["mtls"]["portModes"][0]["source"],
            "PeerAuthentication demo/db-probes"
        );
        let pols = d["policies"].as_array().expect("policies");
        assert_eq!(pols.len(), 2, "{pols:?}");
        assert_eq!(pols[0]["name"], "demo/db-from-api");
        assert_eq!(
            (&pols[0]["enforced"], &pols[0]["served"]),
            (&json!(true), &json!(true))
        );
        assert_eq!(pols[1]["name"], "demo/new-one");
        assert_eq!(pols[1]["action"], "DENY");
        assert_eq!(
            (&pols[1]["enforced"], &pols[1]["served"]),
            (&json!(false), &json!(true))
        );
        assert_eq!(d["config"]["state"], "behind");
        assert_eq!(d["config"]["inSync"], false);
        assert_eq!(d["config"]["servedGeneration"], 5);
        assert_eq!(d["routes"][0]["direction"], "inbound");
        assert_eq!(d["upstreams"][0]["listen"], "127.0.0.1:1004");
        assert_eq!(d["upstreams"][0]["endpoints"][0]["failing"], true);
        let text = render(&d);
        assert!(
            text.contains("identity:      spiffe://cluster.local/ns/demo/sa/db"),
            "{text}"
        );
        assert!(
            text.contains("O=cluster.local, CN=Palisade issuer (chain verified"),
            "{text}"
        );
        assert!(text.contains("(in 50m 0s)"), "{text}");
        assert!(
            text.contains(
                "mTLS:          STRICT on port 8080 (PeerAuthentication palisade-system/default)"
            ),
            "{text}"
        );
        assert!(
            text.contains("port 9090:   PERMISSIVE (PeerAuthentication demo/db-probes)"),
            "{text}"
        );
        assert!(text.contains("ALLOW  demo/db-from-api\n"), "{text}");
        assert!(
            text.contains("DENY   demo/new-one  (served; the proxy does not hold it yet)"),
            "{text}"
        );
        assert!(
            text.contains("HTTPRoute demo/db-routes (inbound; rules: 0)"),
            "{text}"
        );
        assert!(
            text.contains("127.0.0.1:1003        api        weight 1   failing"),
            "{text}"
        );
        assert!(
            text.contains("config version: proxy holds 4, control plane serves 5 (behind)"),
            "{text}"
        );
    }

    #[test]
    fn same_digest_is_in_sync_whatever_the_versions() {
        let s = served();
        let addr: SocketAddr = "127.0.0.1:9000".parse().expect("addr");
        let d = build(
            &workload(),
            Ok(held(3, s.config_digest)),
            Ok((s.clone(), None, addr)),
            5_000,
        );
        assert_eq!(d["config"]["state"], "in sync");
        assert_eq!(d["config"]["proxyDigest"], d["config"]["servedDigest"]);
        let text = render(&d);
        assert!(text.contains("EXPIRED"), "{text}");
        assert!(
            text.contains("proxy holds 3, control plane serves 5 (in sync; the generations since changed nothing for this workload)"),
            "{text}"
        );
    }

    #[test]
    fn one_side_missing_leaves_its_part_unknown() {
        let s = served();
        let addr: SocketAddr = "127.0.0.1:9000".parse().expect("addr");
        let d = build(
            &workload(),
            Err("its proxy at 127.0.0.1:1002 did not answer".into()),
            Ok((s, None, addr)),
            0,
        );
        assert_eq!(d["config"]["state"], "unknown");
        assert_eq!(d["mtls"]["mode"], "STRICT");
        assert_eq!(
            d["mtls"]["source"],
            "PeerAuthentication palisade-system/default"
        );
        assert_eq!(d["defaultPolicy"], "allow");
        assert_eq!(d["policies"][0]["enforced"], Value::Null);
        assert_eq!(
            d["errors"]["proxy"],
            "its proxy at 127.0.0.1:1002 did not answer"
        );
        assert!(render(&d).contains("unknown (its proxy cannot be read)"));

        let d = build(&workload(), Ok(held(3, 7)), Err("down".into()), 0);
        assert_eq!(d["config"]["state"], "unknown");
        assert_eq!(d["mtls"]["source"], Value::Null);
        assert_eq!(d["policies"][0]["served"], Value::Null);
        assert_eq!(d["controlPlane"], Value::Null);
        assert!(
            render(&d).contains("mTLS:          STRICT on port 8080 (source unknown)"),
            "{}",
            render(&d)
        );
    }

    #[test]
    fn names_are_percent_encoded() {
        assert_eq!(percent_encode("db"), "db");
        assert_eq!(percent_encode("a b&c"), "a%20b%26c");
    }
}
