//! `palisade check`: is the local mesh healthy? Reads `STATE_DIR/mesh.json` and asks every
//! proxy's admin port. Prints one pass/fail line per check; exit 1 if any fails.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use super::http_util;

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
}

pub fn run(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let path = args.state_dir.join("mesh.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "no running mesh: cannot read {} (is `palisade up` running?)",
            path.display()
        )
    })?;
    let doc: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let report = rt.block_on(check(&doc))?;
    if report.failed == 0 {
        println!("all checks passed");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("{} check(s) failed", report.failed);
        Ok(ExitCode::from(1))
    }
}

async fn check(doc: &serde_json::Value) -> anyhow::Result<Report> {
    let mut r = Report { failed: 0 };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let cp: Option<SocketAddr> = doc["controlPlane"].as_str().and_then(|s| s.parse().ok());
    match cp {
        Some(addr) => {
            let ok = tokio::net::TcpStream::connect(addr).await.is_ok();
            r.line(
                ok,
                "control plane",
                &format!("{addr} {}", if ok { "reachable" } else { "unreachable" }),
            );
        }
        None => r.line(false, "control plane", "missing from mesh.json"),
    }
    let empty = Vec::new();
    let workloads = doc["workloads"].as_array().unwrap_or(&empty);
    let mut versions = Vec::new();
    for w in workloads {
        let name = w["name"].as_str().unwrap_or("?");
        let Some(admin) = w["adminAddr"]
            .as_str()
            .and_then(|s| s.parse::<SocketAddr>().ok())
        else {
            r.line(false, name, "no admin address in mesh.json");
            continue;
        };
        match http_util::get(admin, "/ready").await {
            Ok((s, _)) if s.is_success() => r.line(true, &format!("{name} proxy"), "ready"),
            Ok((s, body)) => r.line(
                false,
                &format!("{name} proxy"),
                &format!("{s}: {}", body.trim()),
            ),
            Err(e) => {
                r.line(
                    false,
                    &format!("{name} proxy"),
                    &format!("unreachable: {e}"),
                );
                continue;
            }
        }
        match http_util::get(admin, "/status").await {
            Ok((s, body)) if s.is_success() => {
                let st: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                let expiry = st["certExpiry"].as_i64().unwrap_or(0);
                let left = expiry - now;
                r.line(
                    left > 0,
                    &format!("{name} certificate"),
                    &format!(
                        "{} expires in {}s",
                        st["identity"].as_str().unwrap_or("?"),
                        left
                    ),
                );
                let v = st["configVersion"].as_u64().unwrap_or(0);
                versions.push((name.to_string(), st["configDigest"].as_u64().unwrap_or(0)));
                r.line(v > 0, &format!("{name} config"), &format!("version {v}"));
            }
            _ => r.line(false, &format!("{name} status"), "unavailable"),
        }
    }
    match doc["controlPlaneStatus"]
        .as_str()
        .and_then(|s| s.parse::<SocketAddr>().ok())
    {
        Some(addr) => match http_util::get(addr, "/status").await {
            Ok((_, body)) => {
                let st: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                for (name, digest) in &versions {
                    let want = st["configDigests"][name].as_u64();
                    let ok = want == Some(*digest);
                    r.line(
                        ok,
                        &format!("{name} config in sync"),
                        if ok {
                            "the proxy has the control plane's current config"
                        } else {
                            "the proxy's config differs from the control plane's"
                        },
                    );
                }
            }
            Err(e) => r.line(false, "control plane status", &e.to_string()),
        },
        None => r.line(
            false,
            "control plane status",
            "no status address in mesh.json",
        ),
    }
    Ok(r)
}
