//! `palisade policy check` and `palisade authz explain`: policies validated and decisions
//! explained offline, with the same parser and the same compiled authorizer the mesh uses.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use http::{HeaderMap, HeaderName, HeaderValue};
use palisade_api::policy::{self, AuthorizationPolicy, DefaultPolicy, Resource};
use palisade_proxy::authz::{Authorizer, ConnContext, HttpContext};

#[derive(clap::Subcommand)]
pub enum PolicyCommand {
    /// Validate policy YAML (a file or a directory); every error names file, document and field.
    Check {
        /// A policy file, or a directory of *.yaml / *.yml files.
        path: PathBuf,
    },
}

#[derive(clap::Subcommand)]
pub enum AuthzCommand {
    /// Print the decision (ALLOW or DENY, first word) and the policy and rule that decided it.
    Explain(ExplainArgs),
}

#[derive(clap::Args)]
pub struct ExplainArgs {
    /// The mesh file (its workloads, defaultPolicy and policies directory).
    #[arg(long, env = "PALISADE_MESH", default_value = "deploy/local/mesh.yaml")]
    pub mesh: PathBuf,
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
    /// Destination port; default: the workload's inbound port.
    #[arg(long)]
    pub port: Option<u16>,
    /// Host / :authority of the request.
    #[arg(long, default_value = "")]
    pub host: String,
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

pub fn check(path: PathBuf) -> anyhow::Result<ExitCode> {
    match policy::load_path(&path) {
        Ok(loaded) => {
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
            Ok(ExitCode::SUCCESS)
        }
        Err(errors) => {
            for e in &errors {
                eprintln!("error: {e}");
            }
            eprintln!("{} error(s); nothing was applied", errors.len());
            Ok(ExitCode::from(1))
        }
    }
}

pub fn explain(a: ExplainArgs) -> anyhow::Result<ExitCode> {
    let mesh = palisade_control_plane::mesh::load(&a.mesh)?;
    let Some(w) = mesh.workload(&a.workload) else {
        bail!("the mesh file has no workload named {:?}", a.workload);
    };
    let mut selected: Vec<AuthorizationPolicy> = Vec::new();
    if let Some(dir) = &mesh.policies_dir {
        let loaded = policy::load_path(dir).map_err(|errs| {
            anyhow::anyhow!(
                "{}",
                errs.iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        })?;
        for l in loaded {
            if let Resource::AuthorizationPolicy(p) = l.resource
                && p.selects(&w.namespace, &w.labels, policy::ROOT_NAMESPACE)
            {
                selected.push(p);
            }
        }
    }
    let authz = Authorizer::compile(mesh.default_policy, &selected)?;
    let from = a.from.as_ref().map(|f| {
        if f.starts_with("spiffe://") {
            f.clone()
        } else {
            format!("spiffe://{f}")
        }
    });
    let conn = ConnContext {
        peer: from.as_deref(),
        source_ip: a.source_ip,
        // The workload's own port, as the proxy matches `ports`.
        dest_port: a.port.or(w.app_port).unwrap_or(w.inbound_port),
    };
    let decision = if a.tcp {
        authz.authorize_tcp(&conn)
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
        let path = palisade_proxy::normalize::normalize(&a.path, mesh.path_normalization)
            .map_err(|e| anyhow::anyhow!("--path {:?}: the proxy answers 400: {e}", a.path))?;
        authz.authorize_http(
            &conn,
            &HttpContext {
                method: &a.method,
                path: &path,
                host: &a.host,
                headers: &headers,
            },
        )
    };
    let verdict = if decision.allowed { "ALLOW" } else { "DENY" };
    let names: Vec<String> = selected.iter().map(|p| p.qualified_name()).collect();
    let why = match (&decision.policy, decision.rule) {
        (Some(p), Some(r)) => format!("policy {p} rule {r}"),
        (Some(p), None) => format!("policy {p}"),
        (None, _) if decision.by_default => format!(
            "by the mesh defaultPolicy {} (no ALLOW policy selects {})",
            match mesh.default_policy {
                DefaultPolicy::Allow => "allow",
                DefaultPolicy::Deny => "deny",
                DefaultPolicy::Authenticated => "authenticated",
            },
            a.workload
        ),
        (None, _) => "no ALLOW policy matched".to_string(),
    };
    println!("{verdict} {why}");
    println!(
        "  workload {} ({}), caller {}, {}",
        a.workload,
        w.spiffe_id(&mesh)?,
        from.as_deref().unwrap_or("plaintext (no identity)"),
        if a.tcp {
            format!("TCP port {}", conn.dest_port)
        } else {
            format!("{} {} port {}", a.method, a.path, conn.dest_port)
        }
    );
    if names.is_empty() {
        println!("  no policy selects this workload");
    } else {
        println!("  policies selecting it: {}", names.join(", "));
    }
    if let Some(audit) = &decision.audit {
        println!("  audited by {audit}");
    }
    Ok(ExitCode::SUCCESS)
}
