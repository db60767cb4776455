//! `palisade policy check` and `palisade authz explain`: policies validated, cross-checked
//! against a mesh, and decisions explained, with the same parser, the same served config and
//! the same compiled authorizer the mesh uses.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use http::{HeaderMap, HeaderName, HeaderValue};
use palisade_api::MtlsMode;
use palisade_api::policy::{self, DefaultPolicy};
use palisade_certs::SpiffeId;
use palisade_control_plane::Model;
use palisade_control_plane::served::ServedConfig;
use palisade_proxy::Snapshot;
use palisade_proxy::authz::{ConnContext, Explanation, HttpContext};

use super::http_util;

#[derive(clap::Subcommand)]
pub enum PolicyCommand {
    /// Validate policy YAML (a file or a directory); every error names file, document and field.
    Check(CheckArgs),
    /// Replay the traffic the running proxies have authorized recently against proposed
    /// policies (a directory: the whole set; a file: on top of the current ones) and list
    /// what would flip between allow and deny, with counts.
    #[command(name = "what-if")]
    WhatIf(super::what_if::WhatIfArgs),
}

#[derive(clap::Args)]
pub struct CheckArgs {
    /// A policy file, or a directory of *.yaml / *.yml files.
    pub path: PathBuf,
    /// Also cross-check the policies against this mesh file's workloads (as `istioctl
    /// analyze` does): selectors, principals, namespaces and ports that fit no workload are
    /// warnings.
    #[arg(long)]
    pub mesh: Option<PathBuf>,
    /// Exit 2 when there are warnings (errors still exit 1).
    #[arg(long)]
    pub strict: bool,
}

#[derive(clap::Subcommand)]
pub enum AuthzCommand {
    /// Print the decision (ALLOW or DENY, first word) and what decided it, as the workload's
    /// proxy would; exit 1 on DENY.
    Explain(ExplainArgs),
}

#[derive(clap::Args)]
pub struct ExplainArgs {
    /// The mesh file (its workloads, defaultPolicy and policies directory).
    #[arg(long, env = "PALISADE_MESH", default_value = "deploy/local/mesh.yaml")]
    pub mesh: PathBuf,
    /// Ask the running local control plane what it serves the workload, instead of reading
    /// the files (which it may have rejected).
    #[arg(long)]
    pub live: bool,
    /// The state directory of `palisade up` (with --live).
    #[arg(long, env = "PALISADE_STATE_DIR", default_value = ".palisade")]
    pub state_dir: PathBuf,
    /// The workload receiving the request.
    #[arg(long)]
    pub workload: String,
    /// The caller's SPIFFE ID (with or without spiffe://); omit for a plaintext caller.
    #[arg(long)]
    pub from: Option<String>,
    #[arg(long, default_value = "GET")]
    pub method: String,
    #[arg(long, default_value = "/")]
    pub path: String,
    /// The workload's port (policies' `ports`, `portLevelMtls`); default: its appPort, else
    /// its inbound port.
    #[arg(long)]
    pub port: Option<u16>,
    /// Host / :authority of the request.
    #[arg(long, default_value = "")]
    pub host: String,
    /// The route rule the workload's proxy matched the request to (`namespace/name/rule`),
    /// for policies with `to.operation.routes`.
    #[arg(long)]
    pub route: Option<String>,
    /// Caller IP.
    #[arg(long, default_value = "127.0.0.1")]
    pub source_ip: IpAddr,
    /// Request header, `NAME: VALUE` (repeat).
    #[arg(long = "header")]
    pub headers: Vec<String>,
    /// Decide for an opaque TCP connection instead of an HTTP request.
    #[arg(long)]
    pub tcp: bool,
}

pub fn check(a: CheckArgs) -> anyhow::Result<ExitCode> {
    let mesh = match &a.mesh {
        Some(file) => Some(palisade_control_plane::mesh::load(file)?),
        None => None,
    };
    let loaded = policy::load_path(&a.path).and_then(|loaded| {
        // What the control plane checks across documents: a route's HTTPFault exists, and
        // with a mesh file, its parents and backends are services of that mesh.
        let mut errors = palisade_control_plane::traffic::check_references(&loaded);
        if let Some(mesh) = &mesh {
            errors.extend(palisade_control_plane::traffic::check_services(
                mesh, &loaded,
            ));
        }
        if errors.is_empty() {
            Ok(loaded)
        } else {
            Err(errors)
        }
    });
    let loaded = match loaded {
        Ok(loaded) => loaded,
        Err(errors) => {
            for e in &errors {
                eprintln!("error: {e}");
            }
            eprintln!("{} error(s); nothing was applied", errors.len());
            return Ok(ExitCode::from(1));
        }
    };
    let files: std::collections::BTreeSet<_> = loaded.iter().map(|l| &l.file).collect();
    println!("ok: {} resources in {} file(s)", loaded.len(), files.len());
    for l in &loaded {
        let m = l.resource.metadata();
        println!(
            "  {} {}/{} ({} document {})",
            l.resource.kind(),
            m.namespace(),
            m.name,
            l.file.display(),
            l.index
        );
    }
    let (Some(mesh), Some(file)) = (mesh, &a.mesh) else {
        return Ok(ExitCode::SUCCESS);
    };
    let findings = palisade_control_plane::analyze::analyze(&mesh, &loaded);
    for f in &findings {
        eprintln!("warning: {f}");
    }
    if findings.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!(
        "{} warning(s): valid, but not a fit for the workloads of {}{}",
        findings.len(),
        file.display(),
        if a.strict { " (--strict: exit 2)" } else { "" }
    );
    Ok(if a.strict {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

/// Where the config explained came from.
enum Origin {
    Files(PathBuf),
    Live(SocketAddr),
}

pub fn explain(a: ExplainArgs) -> anyhow::Result<ExitCode> {
    let (served, origin) = if a.live {
        let (served, addr) = served_live(&a.state_dir, &a.workload)?;
        (served, Origin::Live(addr))
    } else {
        (
            served_from_files(&a.mesh, &a.workload)?,
            Origin::Files(a.mesh.clone()),
        )
    };
    // What the workload's proxy holds: the served config, read back and compiled by the
    // proxy's own code.
    let proxy_config = served.proxy_config()?;
    let snapshot = Snapshot::from_proto(&proxy_config)
        .context("the served config does not compile as the proxy would compile it")?;
    let inbound = &snapshot.inbound;
    let w = &served.workload;
    let port = a.port.unwrap_or(w.port());

    let from = match &a.from {
        Some(f) => Some(caller_id(f)?),
        None => None,
    };
    if let Some(id) = &from {
        warn_about_caller(id, &served);
    }
    let caller = from
        .as_ref()
        .map_or("plaintext (no identity)", |id| id.as_str());
    let request = if a.tcp {
        format!("TCP port {port}")
    } else {
        format!("{} {} port {port}", a.method, a.path)
    };
    let mode = inbound.mode_for(port);
    let mode_line = format!("{mode} ({})", served.mtls_source_for(port));
    let context = |out: &mut Vec<String>| {
        out.push(format!(
            "  workload {} ({}), caller {caller}, {request}",
            w.name, w.spiffe_id
        ));
        match (&from, mode) {
            // Already the first line.
            (None, MtlsMode::Strict) => {}
            (Some(_), _) => out.push(format!("  mTLS {mode_line}")),
            (None, _) => out.push(format!(
                "  mTLS {mode_line}: plaintext accepted, the caller has no identity"
            )),
        }
        let names: Vec<&str> = inbound.authz.policies().map(|(n, _)| n).collect();
        if names.is_empty() {
            out.push("  no policy selects this workload".into());
        } else {
            out.push(format!("  policies selecting it: {}", names.join(", ")));
        }
        out.push(match &origin {
            Origin::Files(f) => format!("  config: the files ({})", f.display()),
            Origin::Live(addr) => format!(
                "  config: generation {}, served by the control plane ({addr})",
                served.generation
            ),
        });
    };

    // The inbound proxy refuses plaintext under STRICT before authorization.
    if from.is_none() && mode == MtlsMode::Strict {
        let mut out = vec![format!("DENY plaintext refused, {mode_line}")];
        context(&mut out);
        println!("{}", out.join("\n"));
        return Ok(ExitCode::from(1));
    }

    // What reaches authorization follows the app's protocol, as on the proxy: an HTTP app
    // is only ever reached over HTTP, and to an opaque app even HTTP bytes are a TCP stream.
    let protocol = inbound.app_protocol;
    if a.tcp && protocol.is_http() {
        let mut out = vec![format!(
            "DENY opaque TCP refused: the workload's protocol is {}, so only HTTP reaches its app",
            protocol.as_str()
        )];
        context(&mut out);
        println!("{}", out.join("\n"));
        return Ok(ExitCode::from(1));
    }
    let tcp = a.tcp || protocol == palisade_api::Protocol::Opaque;
    let conn = ConnContext {
        peer: from.as_ref().map(SpiffeId::as_str),
        source_ip: a.source_ip,
        dest_port: port,
    };
    let e = if tcp {
        inbound.authz.explain_tcp(&conn)
    } else {
        let mut headers = HeaderMap::new();
        for h in &a.headers {
            let (k, v) = h
                .split_once(':')
                .with_context(|| format!("--header {h:?} is not `NAME: VALUE`"))?;
            headers.append(
                HeaderName::from_bytes(k.trim().as_bytes())
                    .with_context(|| format!("bad header name {k:?}"))?,
                HeaderValue::from_str(v.trim())
                    .with_context(|| format!("bad header value {v:?}"))?,
            );
        }
        // The path the proxy would authorize: normalized at the mesh's level.
        let path = palisade_proxy::normalize::normalize(&a.path, inbound.path_normalization)
            .map_err(|e| anyhow::anyhow!("--path {:?}: the proxy answers 400: {e}", a.path))?;
        inbound.authz.explain_http(
            &conn,
            &HttpContext {
                method: &a.method,
                path: &path,
                host: &a.host,
                headers: &headers,
                route: a.route.as_deref(),
            },
        )
    };
    let mut out = vec![verdict(
        &e,
        inbound.authz.default_policy(),
        &a.workload,
        &from,
    )];
    if !e.decision.allowed && e.decision.policy.is_none() && !e.decision.by_default {
        // No ALLOW policy matched: why not, rule by rule.
        for p in e.allow_policies() {
            if p.rules == 0 {
                out.push(format!("  {}: has no rules, so it allows nothing", p.name));
            }
            for m in &p.misses {
                out.push(format!("  {} rule {}: {}", p.name, m.rule, m.reason));
            }
        }
    }
    context(&mut out);
    if tcp && !a.tcp {
        out.push(
            "  the workload's protocol is opaque: the proxy authorizes the connection as TCP, without method, path or headers"
                .into(),
        );
    }
    if let Some(audit) = &e.decision.audit {
        out.push(format!("  audited by {audit}"));
    }
    println!("{}", out.join("\n"));
    Ok(if e.decision.allowed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The first line: the decision, then what decided it.
fn verdict(
    e: &Explanation,
    default: DefaultPolicy,
    workload: &str,
    from: &Option<SpiffeId>,
) -> String {
    let d = &e.decision;
    let word = if d.allowed { "ALLOW" } else { "DENY" };
    let why = match (&d.policy, d.rule) {
        (Some(p), Some(r)) => format!("policy {p} rule {r}"),
        (Some(p), None) => format!("policy {p}"),
        (None, _) if d.by_default => format!(
            "by the mesh defaultPolicy {} (no ALLOW policy selects {workload}){}",
            default.as_str(),
            if default == DefaultPolicy::Authenticated && from.is_none() {
                ": the caller has no mTLS identity"
            } else {
                ""
            }
        ),
        (None, _) => "no ALLOW policy matched".to_string(),
    };
    format!("{word} {why}")
}

/// `--from`, with or without `spiffe://`: a caller the proxy could have verified, so a valid
/// SPIFFE ID.
fn caller_id(from: &str) -> anyhow::Result<SpiffeId> {
    let full = if from
        .get(..9)
        .is_some_and(|s| s.eq_ignore_ascii_case("spiffe://"))
    {
        from.to_string()
    } else {
        format!("spiffe://{from}")
    };
    SpiffeId::parse(&full).with_context(|| {
        format!("--from {from:?} is not a SPIFFE ID, so no verified caller can have it")
    })
}

/// A caller that no workload of the mesh is: likely a typo, so say so (one line each).
fn warn_about_caller(id: &SpiffeId, served: &ServedConfig) {
    if id.trust_domain_str() != served.trust_domain {
        eprintln!(
            "warning: --from {id} is not in the mesh's trust domain {}: no workload of this mesh has it",
            served.trust_domain
        );
    } else if !served.identities.iter().any(|i| i == id.as_str()) {
        eprintln!("warning: --from {id}: no workload of the mesh has this identity");
    }
}

/// What the control plane would serve `workload`, computed from the files as it computes it
/// (a broken policy file is an error here, as the control plane rejects it).
fn served_from_files(mesh_file: &Path, workload: &str) -> anyhow::Result<ServedConfig> {
    let mesh = palisade_control_plane::mesh::load(mesh_file)?;
    if mesh.workload(workload).is_none() {
        bail!("the mesh file has no workload named {workload:?}");
    }
    let model = Model::load(mesh, 0)?;
    model
        .served_config(workload)
        .with_context(|| format!("the mesh file has no workload named {workload:?}"))
}

/// What the running control plane serves `workload` now, from its status endpoint.
pub(crate) fn served_live(
    state_dir: &Path,
    workload: &str,
) -> anyhow::Result<(ServedConfig, SocketAddr)> {
    let path = state_dir.join("mesh.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "no running mesh: cannot read {} (is `palisade up` running?)",
            path.display()
        )
    })?;
    let doc: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let addr: SocketAddr = doc["controlPlaneStatus"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{} has no controlPlaneStatus address", path.display()))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let uri = format!("/config?workload={}", percent_encode(workload));
    let (status, body) = rt
        .block_on(http_util::get(addr, &uri))
        .with_context(|| format!("the control plane at {addr} did not answer"))?;
    if !status.is_success() {
        let msg = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| body.trim().to_string());
        bail!("the control plane at {addr} answered {status}: {msg}");
    }
    let served = serde_json::from_str(&body).with_context(|| {
        format!("the control plane at {addr} sent a config this CLI cannot read")
    })?;
    Ok((served, addr))
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
