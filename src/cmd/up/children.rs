//! The processes `up` starts: the control plane, each workload's app and sidecar. Each writes
//! to its own log, appended (never truncated, so the reason of a crash survives a restart), and
//! each is stopped by signalling it, never by calling an address that another mesh might own.

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use palisade_control_plane::mesh::{Mesh, Workload};
use tokio::process::{Child, Command};

/// A log past this size is moved to `NAME.log.1` when its process starts again.
const ROTATE_BYTES: u64 = 16 << 20;

/// Where `up` keeps things.
pub(super) struct Paths {
    pub mesh: PathBuf,
    /// The control plane's metrics and status port.
    pub cp_metrics: SocketAddr,
    pub state: PathBuf,
    pub logs: PathBuf,
    pub tokens: PathBuf,
    pub bundle: PathBuf,
    pub proxy_bin: Option<PathBuf>,
    /// `--otlp`: the collector every proxy and app exports spans to.
    pub otlp: Option<String>,
}

/// The OpenTelemetry variables of a workload's processes: its own `service.name`, and the
/// collector of `--otlp` (apps instrumented with an OpenTelemetry SDK join the same traces).
fn otel_env(c: &mut Command, w: &Workload, p: &Paths) {
    c.env("OTEL_SERVICE_NAME", &w.name);
    if let Some(e) = &p.otlp {
        c.env("OTEL_EXPORTER_OTLP_ENDPOINT", e);
    }
}

/// One child process and its log.
pub(super) struct Proc {
    pub label: String,
    pub child: Child,
    pub log: PathBuf,
    pub started: Instant,
}

impl Proc {
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGTERM (the sidecar drains in-flight requests), then SIGKILL after `grace`.
    pub async fn terminate(&mut self, grace: Duration) {
        if let Some(pid) = self
            .pid()
            .and_then(|p| i32::try_from(p).ok())
            .and_then(rustix::process::Pid::from_raw)
        {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }

    /// The line of its log that most likely says why it died: the last one that mentions an
    /// error, else the last one.
    pub fn last_error_line(&self) -> Option<String> {
        last_error_line(&self.log)
    }

    /// "web's app exited (exit status: 1): error: cannot bind 127.0.0.1:18080 ..."
    pub fn death_note(&self, status: ExitStatus) -> String {
        self.death_note_when(status, "")
    }

    /// [`Proc::death_note`] with when it happened: "… exited before the mesh was ready (…)".
    pub fn death_note_when(&self, status: ExitStatus, when: &str) -> String {
        let when = if when.is_empty() {
            String::new()
        } else {
            format!(" {when}")
        };
        match self.last_error_line() {
            Some(line) => format!("{} exited{when} ({status}): {line}", self.label),
            None => format!("{} exited{when} ({status})", self.label),
        }
    }
}

pub(super) fn last_error_line(log: &Path) -> Option<String> {
    let mut f = std::fs::File::open(log).ok()?;
    let len = f.metadata().ok()?.len();
    // The tail is enough: the reason is at the end.
    f.seek(SeekFrom::Start(len.saturating_sub(16 << 10))).ok()?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf);
    // Only what this start wrote: after the last header line.
    let run = text.rsplit("=== palisade up: ").next().unwrap_or(&text);
    let lines: Vec<&str> = run
        .lines()
        .skip(1)
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let pick = lines
        .iter()
        .rev()
        .find(|l| l.contains("error") || l.contains("ERROR") || l.contains("panicked"))
        .or(lines.last())?;
    Some(strip_ansi(pick))
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Opens `NAME.log` for appending (rotated once it is large), with a header line that marks
/// where this start begins.
fn log_file(dir: &Path, name: &str) -> anyhow::Result<(Stdio, Stdio, PathBuf)> {
    let path = dir.join(format!("{name}.log"));
    if std::fs::metadata(&path).is_ok_and(|m| m.len() > ROTATE_BYTES) {
        let _ = std::fs::rename(&path, dir.join(format!("{name}.log.1")));
    }
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    writeln!(
        f,
        "=== palisade up: {name} started at unix time {now} (up pid {}) ===",
        std::process::id()
    )
    .with_context(|| format!("cannot write {}", path.display()))?;
    Ok((Stdio::from(f.try_clone()?), Stdio::from(f), path))
}

pub(super) fn exe() -> anyhow::Result<PathBuf> {
    std::env::current_exe().context("cannot find the palisade binary")
}

pub(super) fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

pub(super) fn spawn_control_plane(p: &Paths) -> anyhow::Result<Proc> {
    let (out, err, log) = log_file(&p.logs, "control-plane")?;
    let child = Command::new(exe()?)
        .arg("control-plane")
        .arg("--config")
        .arg(&p.mesh)
        .arg("--state-dir")
        .arg(&p.state)
        .arg("--tokens")
        .arg(&p.tokens)
        .arg("--metrics")
        .arg(p.cp_metrics.to_string())
        .env("PALISADE_WATCH_PARENT", "1")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .context("cannot start the control plane")?;
    Ok(Proc {
        label: "the control plane".into(),
        child,
        log,
        started: Instant::now(),
    })
}

/// The demo app learns its upstreams as `NAME=ADDR` (service name without the namespace).
fn demo_upstreams(w: &Workload) -> String {
    w.upstreams
        .iter()
        .map(|u| {
            let short = u.service.split('.').next().unwrap_or(&u.service);
            format!("{short}={}", loopback(u.local_port))
        })
        .collect::<Vec<_>>()
        .join(",")
}

pub(super) fn spawn_app(w: &Workload, p: &Paths) -> anyhow::Result<Option<Proc>> {
    let Some(cmd) = w.command.as_ref().filter(|c| !c.is_empty()) else {
        return Ok(None);
    };
    let program = if cmd[0] == "palisade" {
        exe()?
    } else {
        PathBuf::from(&cmd[0])
    };
    let (out, err, log) = log_file(&p.logs, &format!("{}-app", w.name))?;
    let mut c = Command::new(&program);
    c.args(&cmd[1..])
        .env("PALISADE_WORKLOAD", &w.name)
        .env("PALISADE_DEMO_UPSTREAMS", demo_upstreams(w))
        .env("PALISADE_WATCH_PARENT", "1")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true);
    otel_env(&mut c, w, p);
    for (k, v) in &w.env {
        c.env(k, v);
    }
    let child = c
        .spawn()
        .with_context(|| format!("cannot start the app of {}: {}", w.name, program.display()))?;
    Ok(Some(Proc {
        label: format!("{}'s app", w.name),
        child,
        log,
        started: Instant::now(),
    }))
}

/// Starts `w`'s sidecar. The caller has just written its bootstrap token.
pub(super) fn spawn_proxy(w: &Workload, mesh: &Mesh, p: &Paths) -> anyhow::Result<Proc> {
    let token_file = p.state.join("tokens").join(&w.name);
    let (out, err, log) = log_file(&p.logs, &format!("{}-proxy", w.name))?;
    let upstreams = w
        .upstreams
        .iter()
        .map(|u| format!("{}:{}={}", u.service, u.port, loopback(u.local_port)))
        .collect::<Vec<_>>()
        .join(",");
    let mut c = match &p.proxy_bin {
        Some(bin) => Command::new(bin),
        None => {
            let mut c = Command::new(exe()?);
            c.arg("proxy");
            c
        }
    };
    // The workload on the command line too, so `ps` says which sidecar is which.
    c.arg("--workload")
        .arg(&w.name)
        .env("PALISADE_WORKLOAD", &w.name)
        .env("PALISADE_IDENTITY", w.spiffe_id(mesh)?.as_str())
        .env(
            "PALISADE_INBOUND_ADDR",
            loopback(w.inbound_port).to_string(),
        )
        .env("PALISADE_ADMIN_ADDR", loopback(w.admin_port).to_string())
        .env("PALISADE_UPSTREAMS", upstreams)
        .env(
            "PALISADE_CONTROL_PLANE",
            loopback(mesh.control_plane.port).to_string(),
        )
        .env("PALISADE_TOKEN_FILE", &token_file)
        .env("PALISADE_TRUST_BUNDLE", &p.bundle)
        .env("PALISADE_WATCH_PARENT", "1")
        // `up` stops its sidecars with SIGTERM: the admin /shutdown stays off.
        .env_remove("PALISADE_ADMIN_SHUTDOWN")
        .env_remove("PALISADE_TOKEN")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true);
    match w.app_port {
        Some(port) => c.env("PALISADE_APP_ADDR", loopback(port).to_string()),
        None => c.env_remove("PALISADE_APP_ADDR"),
    };
    otel_env(&mut c, w, p);
    let program = PathBuf::from(c.as_std().get_program());
    let child = c.spawn().with_context(|| {
        format!(
            "cannot start the proxy of {} ({})",
            w.name,
            program.display()
        )
    })?;
    Ok(Proc {
        label: format!("{}'s proxy", w.name),
        child,
        log,
        started: Instant::now(),
    })
}
