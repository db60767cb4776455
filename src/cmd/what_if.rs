//! `palisade policy what-if PATH`: a proposed policy set replayed against the traffic the
//! running proxies have authorized recently, before it is applied. Istio's dry-run tells
//! after the fact; this tells before.
//!
//! Each proxy keeps a bounded summary of what its inbound side authorized (admin `/traffic`,
//! `palisade_proxy::summary`). Every shape in it is decided twice by the proxy's own
//! authorizer: under the config the control plane serves that workload now, and under the
//! config it would serve with the proposed policies. Those that change are the flips.
//! docs/observe.md ("policy what-if") says what is and is not replayed.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use http::HeaderMap;
use palisade_api::MtlsMode;
use palisade_api::policy::{self, Loaded, Resource};
use palisade_control_plane::Model;
use palisade_proxy::Snapshot;
use palisade_proxy::authz::{ConnContext, HttpContext};
use serde::Deserialize;
use serde_json::{Value, json};

use super::http_util;
use crate::observe::{LocalMesh, UNKNOWN};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
}

#[derive(clap::Args)]
pub struct WhatIfArgs {
    /// The proposed policies: a directory is the whole proposed set (it replaces the mesh's
    /// policies directory); a file is applied on top of the mesh's current policies (a
    /// document with the same kind, namespace and name replaces the current one).
    pub path: PathBuf,
    /// The state directory of the running `palisade up`.
    #[arg(long, env = "PALISADE_STATE_DIR", default_value = ".palisade")]
    pub state_dir: PathBuf,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: Output,
}

/// One shape of a proxy's `/traffic` summary.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Shape {
    src_identity: Option<String>,
    source_ip: IpAddr,
    port: u16,
    protocol: String,
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    route: Option<String>,
    allowed: u64,
    denied: u64,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Summary {
    entries: Vec<Shape>,
    #[serde(default)]
    overflow_requests: u64,
    #[serde(default)]
    window_seconds: f64,
}

/// A flip, as reported: shapes that differ only in what the spec's row does not show (caller
/// address, host, port, route) are added together.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct FlipKey {
    dst: String,
    src: String,
    src_identity: String,
    method: Option<String>,
    path: Option<String>,
    from: bool,
}

pub fn run(a: WhatIfArgs) -> anyhow::Result<ExitCode> {
    let mesh = LocalMesh::read(&a.state_dir)?;
    let mesh_file = mesh_file(&a.state_dir)?;
    let (proposed, header_policies) = proposed_model(&mesh_file, &a.path)?;
    for p in &header_policies {
        eprintln!(
            "note: {p} has `when` conditions on request headers; the traffic summary keeps no header values, so they are evaluated as absent"
        );
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;

    let mut flips: BTreeMap<FlipKey, u64> = BTreeMap::new();
    let mut replayed = 0u64;
    let mut overflow = 0u64;
    let mut missing = Vec::new();
    let mut window = 0f64;
    for w in &mesh.workloads {
        let Some(admin) = w.admin else {
            missing.push(w.name.clone());
            continue;
        };
        let summary = match rt.block_on(traffic(admin)) {
            Ok(s) => s,
            Err(e) => {
                eprintln!(
                    "warning: cannot read what {}'s proxy has seen ({e:#})",
                    w.name
                );
                missing.push(w.name.clone());
                continue;
            }
        };
        overflow += summary.overflow_requests;
        window = window.max(summary.window_seconds);
        if summary.entries.is_empty() {
            continue;
        }
        let (served, _) = super::policy::served_live(&a.state_dir, &w.name)?;
        let now = Snapshot::from_proto(&served.proxy_config()?)
            .with_context(|| format!("the config served to {} does not compile", w.name))?;
        let cfg = proposed.proxy_config(&w.name).with_context(|| {
            format!(
                "the mesh file {} has no workload {} (the running mesh has it: was the file changed?)",
                mesh_file.display(),
                w.name
            )
        })?;
        let then = Snapshot::from_proto(&cfg)
            .with_context(|| format!("the proposed config of {} does not compile", w.name))?;
        for s in &summary.entries {
            let requests = s.allowed.saturating_add(s.denied);
            replayed = replayed.saturating_add(requests);
            let (before, after) = (decide(&now, s), decide(&then, s));
            if before == after {
                continue;
            }
            let src_identity = s.src_identity.clone().unwrap_or_else(|| UNKNOWN.into());
            let key = FlipKey {
                dst: w.name.clone(),
                src: mesh.display_name(&src_identity),
                src_identity,
                method: s.method.clone(),
                path: s.path.clone(),
                from: before,
            };
            let n = flips.entry(key).or_default();
            *n = n.saturating_add(requests);
        }
    }
    if missing.len() == mesh.workloads.len() && !mesh.workloads.is_empty() {
        bail!("no proxy of the mesh answered: nothing to replay");
    }

    let word = |allowed: bool| if allowed { "allow" } else { "deny" };
    let rows: Vec<Value> = flips
        .iter()
        .map(|(k, n)| {
            json!({
                "src": k.src,
                "dst": k.dst,
                "srcIdentity": k.src_identity,
                "method": k.method,
                "path": k.path,
                "from": word(k.from),
                "to": word(!k.from),
                "requests": n,
            })
        })
        .collect();
    match a.output {
        Output::Json => {
            let doc = json!({
                "flips": rows,
                "replayedRequests": replayed,
                "notSummarizedRequests": overflow,
                "windowSeconds": window,
                "missing": missing,
            });
            println!("{doc}");
        }
        Output::Table => print_table(&rows, replayed, overflow, window),
    }
    Ok(ExitCode::SUCCESS)
}

/// The mesh file the running `palisade up` was started with.
fn mesh_file(state_dir: &Path) -> anyhow::Result<PathBuf> {
    let path = state_dir.join("mesh.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let doc: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    doc["meshFile"]
        .as_str()
        .map(PathBuf::from)
        .with_context(|| format!("{} does not name its mesh file", path.display()))
}

/// The model the control plane would build with the proposed policies, and the
/// AuthorizationPolicies of it that read request headers (which the summary cannot replay).
fn proposed_model(mesh_file: &Path, path: &Path) -> anyhow::Result<(Model, Vec<String>)> {
    let mut mesh = palisade_control_plane::mesh::load(mesh_file)?;
    let proposed = load(path)?;
    let loaded = if path.is_dir() {
        proposed
    } else {
        let mut current = match &mesh.policies_dir {
            Some(dir) if dir.exists() => load(dir).with_context(|| {
                format!(
                    "the mesh's current policies ({}) do not load, so {} cannot be applied on top of them",
                    dir.display(),
                    path.display()
                )
            })?,
            _ => Vec::new(),
        };
        for p in proposed {
            let same = |c: &Loaded| {
                c.resource.kind() == p.resource.kind()
                    && c.resource.metadata().namespace() == p.resource.metadata().namespace()
                    && c.resource.metadata().name == p.resource.metadata().name
            };
            current.retain(|c| !same(c));
            current.push(p);
        }
        current
    };
    let errors = palisade_control_plane::traffic::check_local(&mesh, &loaded);
    if !errors.is_empty() {
        let lines: Vec<String> = errors.iter().map(|e| format!("  {e}")).collect();
        bail!(
            "the proposed policies would be rejected by the control plane:\n{}",
            lines.join("\n")
        );
    }
    let header_policies = loaded
        .iter()
        .filter_map(|l| match &l.resource {
            Resource::AuthorizationPolicy(p)
                if p.spec
                    .rules
                    .iter()
                    .flatten()
                    .any(|r| r.when.iter().any(|c| c.key.starts_with("request.headers"))) =>
            {
                Some(p.qualified_name())
            }
            _ => None,
        })
        .collect();
    mesh.policies_dir = None;
    let model = Model::from_parts(mesh, loaded.into_iter().map(|l| l.resource), 0);
    Ok((model, header_policies))
}

fn load(path: &Path) -> anyhow::Result<Vec<Loaded>> {
    policy::load_path(path).map_err(|errors| {
        let lines: Vec<String> = errors.iter().map(|e| format!("  {e}")).collect();
        anyhow::anyhow!(
            "{} has errors (nothing was evaluated):\n{}",
            path.display(),
            lines.join("\n")
        )
    })
}

/// The decision the workload's proxy would make under `snap`: plaintext refused under
/// STRICT before authorization, then its compiled authorizer.
fn decide(snap: &Snapshot, s: &Shape) -> bool {
    let inbound = &snap.inbound;
    if s.src_identity.is_none() && inbound.mode_for(s.port) == MtlsMode::Strict {
        return false;
    }
    let conn = ConnContext {
        peer: s.src_identity.as_deref(),
        source_ip: s.source_ip,
        dest_port: s.port,
    };
    match (&s.method, s.protocol.as_str()) {
        (Some(method), "http") => {
            inbound
                .authz
                .authorize_http(
                    &conn,
                    &HttpContext {
                        method,
                        path: s.path.as_deref().unwrap_or("/"),
                        host: s.host.as_deref().unwrap_or(""),
                        headers: &HeaderMap::new(),
                        route: s.route.as_deref(),
                    },
                )
                .allowed
        }
        _ => inbound.authz.authorize_tcp(&conn).allowed,
    }
}

async fn traffic(admin: SocketAddr) -> anyhow::Result<Summary> {
    let (status, body) = http_util::get(admin, "/traffic").await?;
    if !status.is_success() {
        bail!("{admin}/traffic answered {status}: {}", body.trim());
    }
    serde_json::from_str(&body).with_context(|| format!("{admin}/traffic sent unreadable JSON"))
}

fn print_table(rows: &[Value], replayed: u64, overflow: u64, window: f64) {
    let over = humantime::format_duration(std::time::Duration::from_secs(window as u64));
    if rows.is_empty() {
        println!(
            "no flips: the {replayed} requests the proxies saw (the last {over} or so) are decided the same under the proposed policies"
        );
    } else {
        let mut table = comfy_table::Table::new();
        table.load_style(comfy_table::presets::NOTHING);
        table.set_header([
            "FLIP",
            "SRC",
            "DST",
            "METHOD",
            "PATH",
            "REQUESTS",
            "SRC IDENTITY",
        ]);
        for r in rows {
            let s = |k: &str| r[k].as_str().unwrap_or("-").to_string();
            table.add_row([
                format!("{} -> {}", s("from"), s("to")),
                s("src"),
                s("dst"),
                r["method"].as_str().unwrap_or("TCP").to_string(),
                s("path"),
                r["requests"].to_string(),
                s("srcIdentity"),
            ]);
        }
        println!("{table}");
        println!(
            "{} of {replayed} requests the proxies saw (the last {over} or so) would be decided differently",
            rows.iter()
                .filter_map(|r| r["requests"].as_u64())
                .sum::<u64>()
        );
    }
    if overflow > 0 {
        println!(
            "{overflow} requests were not summarized (a proxy's summary was full): they are not replayed"
        );
    }
}
