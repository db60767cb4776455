//! The running mesh: its children, restarted with backoff when they die, and config edits
//! answered in the terminal (and, for workloads, applied for real).

use std::collections::{BTreeMap, BTreeSet};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::bail;
use palisade_api::policy::Resource;
use palisade_control_plane::Model;
use palisade_control_plane::mesh::Workload;

use super::children::{self, Paths, Proc, loopback};
use super::preflight;
use crate::cmd::http_util;

/// First restart delay of a child that died; doubles per death in a row, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A child that ran this long before dying starts its backoff over (Kubernetes resets
/// CrashLoopBackOff the same way).
const STABLE_AFTER: Duration = Duration::from_secs(60);
/// How long a sidecar gets to drain on SIGTERM before it is killed.
const DRAIN_GRACE: Duration = Duration::from_secs(12);

/// A child process and its restart schedule.
#[derive(Default)]
pub(super) struct Slot {
    pub proc: Option<Proc>,
    deaths: u32,
    restart_at: Option<Instant>,
}

impl Slot {
    fn new(proc: Option<Proc>) -> Self {
        Slot {
            proc,
            ..Slot::default()
        }
    }

    /// Notes a death and says when to start again.
    fn died(&mut self, proc: &Proc) -> Duration {
        if proc.started.elapsed() >= STABLE_AFTER {
            self.deaths = 0;
        }
        let backoff = FIRST_BACKOFF
            .saturating_mul(1 << self.deaths.min(5))
            .min(MAX_BACKOFF);
        self.deaths = self.deaths.saturating_add(1);
        self.restart_at = Some(Instant::now() + backoff);
        backoff
    }

    fn due(&self) -> bool {
        self.proc.is_none() && self.restart_at.is_some_and(|t| Instant::now() >= t)
    }
}

/// One workload of the mesh as `up` runs it.
pub(super) struct Running {
    pub w: Workload,
    pub app: Slot,
    pub proxy: Slot,
}

/// The whole mesh as `up` runs it.
pub(super) struct Up {
    pub paths: Paths,
    pub model: Model,
    pub cp: Proc,
    pub workloads: Vec<Running>,
    tokens: BTreeMap<String, String>,
    exit_on_app_failure: bool,
    /// The control plane's generation last reported in the terminal.
    seen_generation: u64,
    /// The rejection last reported, so each is said once.
    seen_rejection: Option<String>,
}

impl Up {
    pub fn new(
        paths: Paths,
        model: Model,
        cp: Proc,
        tokens: BTreeMap<String, String>,
        exit_on_app_failure: bool,
    ) -> Self {
        Up {
            paths,
            seen_generation: model.generation,
            model,
            cp,
            workloads: Vec::new(),
            tokens,
            exit_on_app_failure,
            seen_rejection: None,
        }
    }

    /// Gives `w`'s proxy a fresh bootstrap token, right before it starts: its own token file,
    /// and the tokens file the control plane re-reads when a proxy presents a token. A token
    /// certifies one proxy start, so every start needs a new one.
    fn issue_token(&mut self, w: &Workload) -> anyhow::Result<()> {
        let t = super::random_token();
        super::write_private(&self.paths.state.join("tokens").join(&w.name), &t)?;
        self.tokens.insert(w.name.clone(), t);
        super::write_private(
            &self.paths.tokens,
            &serde_json::to_string_pretty(&self.tokens)?,
        )
    }

    fn start_proxy(&mut self, w: &Workload) -> anyhow::Result<Proc> {
        self.issue_token(w)?;
        children::spawn_proxy(w, &self.model.mesh, &self.paths)
    }

    pub fn start_workload(&mut self, w: &Workload) -> anyhow::Result<Running> {
        let app = children::spawn_app(w, &self.paths)?;
        let proxy = self.start_proxy(w)?;
        Ok(Running {
            w: w.clone(),
            app: Slot::new(app),
            proxy: Slot::new(Some(proxy)),
        })
    }

    /// Waits until every proxy is ready. Before that, any child exiting is fatal, the control
    /// plane included, and reported with the last error line of its log.
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let mut pending: Vec<usize> = (0..self.workloads.len()).collect();
        while !pending.is_empty() {
            if let Some(status) = self.cp.exited() {
                bail!(
                    "{}",
                    self.cp.death_note_when(status, "before the mesh was ready")
                );
            }
            let mut still = Vec::new();
            for i in pending {
                let r = &mut self.workloads[i];
                for slot in [&mut r.proxy, &mut r.app] {
                    if let Some(p) = slot.proc.as_mut()
                        && let Some(status) = p.exited()
                    {
                        bail!("{}", p.death_note_when(status, "before the mesh was ready"));
                    }
                }
                match http_util::get(loopback(r.w.admin_port), "/ready").await {
                    Ok((s, _)) if s.is_success() => {}
                    _ => still.push(i),
                }
            }
            pending = still;
            if pending.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                let names: Vec<_> = pending
                    .iter()
                    .map(|&i| self.workloads[i].name().to_string())
                    .collect();
                bail!("not ready within {timeout:?}: {}", names.join(", "));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    pub fn write_mesh_json(&self) -> anyhow::Result<()> {
        let mesh = &self.model.mesh;
        let mut workloads = Vec::new();
        for r in &self.workloads {
            let w = &r.w;
            workloads.push(serde_json::json!({
                "name": w.name,
                "spiffeId": w.spiffe_id(mesh)?.as_str(),
                "appAddr": w.app_port.map(|port| loopback(port).to_string()),
                "inboundAddr": loopback(w.inbound_port).to_string(),
                "adminAddr": loopback(w.admin_port).to_string(),
                "upstreams": w.upstreams.iter().map(|u| serde_json::json!({
                    "service": format!("{}:{}", u.service, u.port),
                    "localAddr": loopback(u.local_port).to_string(),
                })).collect::<Vec<_>>(),
                "proxyPid": r.proxy.proc.as_ref().and_then(Proc::pid),
                "appPid": r.app.proc.as_ref().and_then(Proc::pid),
            }));
        }
        let doc = serde_json::json!({
            "controlPlane": loopback(mesh.control_plane.port).to_string(),
            "controlPlanePid": self.cp.pid(),
            "controlPlaneStatus": self.paths.cp_metrics.to_string(),
            "upPid": std::process::id(),
            "meshFile": self.paths.mesh,
            "trustDomain": mesh.trust_domain.as_str(),
            "workloads": workloads,
        });
        let path = self.paths.state.join("mesh.json");
        let tmp = self.paths.state.join("mesh.json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(&doc)?)?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }

    /// Runs until a signal (exit 0), or until an app dies under `--exit-on-app-failure`
    /// (exit 1).
    pub async fn supervise(&mut self) -> ExitCode {
        let signal = crate::cmd::shutdown_signal();
        tokio::pin!(signal);
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                _ = &mut signal => return ExitCode::SUCCESS,
                _ = tick.tick() => {}
            }
            if let Err(code) = self.tend_children().await {
                return code;
            }
            self.follow_config().await;
        }
    }

    /// Restarts what died (after its backoff) and says so, once per death.
    async fn tend_children(&mut self) -> Result<(), ExitCode> {
        if let Some(status) = self.cp.exited() {
            eprintln!(
                "{}; restarting it (proxies keep serving meanwhile)",
                self.cp.death_note(status)
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
            match children::spawn_control_plane(&self.paths) {
                Ok(new) => {
                    self.cp = new;
                    let _ = self.write_mesh_json();
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    return Err(ExitCode::from(1));
                }
            }
        }
        let mut changed = false;
        for i in 0..self.workloads.len() {
            let r = &mut self.workloads[i];
            if let Some(p) = r.app.proc.as_mut()
                && let Some(status) = p.exited()
            {
                let note = p.death_note(status);
                if self.exit_on_app_failure {
                    eprintln!("{note}; stopping the mesh (--exit-on-app-failure)");
                    return Err(ExitCode::from(1));
                }
                let dead = r.app.proc.take();
                let backoff = dead.as_ref().map(|d| r.app.died(d)).unwrap_or_default();
                eprintln!("{note}; restarting it in {}", human(backoff));
            }
            if let Some(p) = r.proxy.proc.as_mut()
                && let Some(status) = p.exited()
            {
                let note = p.death_note(status);
                let dead = r.proxy.proc.take();
                let backoff = dead.as_ref().map(|d| r.proxy.died(d)).unwrap_or_default();
                eprintln!("{note}; restarting it in {}", human(backoff));
            }
            if r.app.due() {
                let w = r.w.clone();
                match children::spawn_app(&w, &self.paths) {
                    Ok(p) => {
                        println!("{}'s app restarted", w.name);
                        self.workloads[i].app.proc = p;
                        changed = true;
                    }
                    Err(e) => eprintln!("error: {e:#}"),
                }
            }
            if self.workloads[i].proxy.due() {
                let w = self.workloads[i].w.clone();
                match self.start_proxy(&w) {
                    Ok(p) => {
                        println!("{}'s proxy restarted", w.name);
                        self.workloads[i].proxy.proc = Some(p);
                        changed = true;
                    }
                    Err(e) => eprintln!("error: {e:#}"),
                }
            }
        }
        if changed {
            let _ = self.write_mesh_json();
        }
        Ok(())
    }

    /// Answers config edits in the terminal: what the control plane applied or rejected, and
    /// workloads added, removed or changed are started, stopped or restarted.
    async fn follow_config(&mut self) {
        let Ok((status, body)) = http_util::get(self.paths.cp_metrics, "/status").await else {
            return;
        };
        if !status.is_success() {
            return;
        }
        let Ok(doc) = serde_json::from_str::<serde_json::Value>(&body) else {
            return;
        };
        if let Some(err) = doc.pointer("/lastRejection/error").and_then(|e| e.as_str())
            && self.seen_rejection.as_deref() != Some(err)
        {
            eprintln!("config change rejected: {err}; the last good config keeps serving");
            self.seen_rejection = Some(err.to_string());
        }
        let Some(generation) = doc.get("generation").and_then(|g| g.as_u64()) else {
            return;
        };
        if generation <= self.seen_generation {
            return;
        }
        self.seen_generation = generation;
        self.seen_rejection = None;
        // What the control plane now serves, read from the same files.
        let new = palisade_control_plane::mesh::load(&self.paths.mesh)
            .map_err(anyhow::Error::from)
            .and_then(|m| Model::load(m, generation).map_err(anyhow::Error::from));
        let new = match new {
            Ok(m) => m,
            Err(_) => {
                // Edited again since; the next generation will say what changed.
                println!("applied generation {generation}");
                return;
            }
        };
        println!(
            "applied generation {generation} ({})",
            summarize(&self.model, &new)
        );
        self.reconcile(new).await;
    }

    /// Brings the running workloads in line with `new`.
    async fn reconcile(&mut self, new: Model) {
        let old_mesh = &self.model.mesh;
        if old_mesh.control_plane != new.mesh.control_plane {
            eprintln!(
                "controlPlane.port changed to {}: restart `palisade up` to apply it",
                new.mesh.control_plane.port
            );
        }
        let identity_changed = |w: &Workload| {
            old_mesh
                .workload(&w.name)
                .is_some_and(|o| o.spiffe_id(old_mesh).ok() != w.spiffe_id(&new.mesh).ok())
        };
        let mut gone: Vec<Running> = Vec::new();
        let mut keep: Vec<Running> = Vec::new();
        for r in self.workloads.drain(..) {
            match new.mesh.workload(&r.w.name) {
                Some(w) if *w == r.w && !identity_changed(w) => keep.push(r),
                _ => gone.push(r),
            }
        }
        for mut r in gone {
            let what = if new.mesh.workload(&r.w.name).is_some() {
                "changed; restarting it"
            } else {
                "removed; stopping it"
            };
            println!("workload {} {what}", r.w.name);
            stop_workload(&mut r).await;
        }
        self.workloads = keep;
        self.model = new;
        let running: BTreeSet<String> = self.workloads.iter().map(|r| r.w.name.clone()).collect();
        let to_start: Vec<(usize, Workload)> = self
            .model
            .mesh
            .workloads
            .iter()
            .enumerate()
            .filter(|(_, w)| !running.contains(&w.name))
            .map(|(i, w)| (i, w.clone()))
            .collect();
        for (i, w) in to_start {
            if let Err(e) = preflight::check_ports(&preflight::workload_ports(i, &w)) {
                eprintln!("workload {} not started: {e}", w.name);
                continue;
            }
            match self.start_workload(&w) {
                Ok(r) => {
                    println!("workload {} started", w.name);
                    self.workloads.push(r);
                }
                Err(e) => eprintln!("workload {} not started: {e:#}", w.name),
            }
        }
        // Keep the mesh file's order, which mesh.json and `check` follow.
        let order: Vec<String> = self
            .model
            .mesh
            .workloads
            .iter()
            .map(|w| w.name.clone())
            .collect();
        self.workloads
            .sort_by_key(|r| order.iter().position(|n| *n == r.w.name));
        let _ = self.write_mesh_json();
    }

    /// Sidecars drain first (SIGTERM, then a kill after the grace period), then apps and the
    /// control plane stop. Only processes this `up` started are signalled.
    pub async fn stop_all(&mut self) {
        let proxies = self
            .workloads
            .iter_mut()
            .filter_map(|r| r.proxy.proc.as_mut())
            .map(|p| p.terminate(DRAIN_GRACE));
        futures_util::future::join_all(proxies).await;
        let apps = self
            .workloads
            .iter_mut()
            .filter_map(|r| r.app.proc.as_mut())
            .map(|p| p.terminate(Duration::from_secs(2)));
        futures_util::future::join_all(apps).await;
        self.cp.terminate(Duration::from_secs(2)).await;
    }
}

async fn stop_workload(r: &mut Running) {
    if let Some(p) = r.proxy.proc.as_mut() {
        p.terminate(DRAIN_GRACE).await;
    }
    if let Some(p) = r.app.proc.as_mut() {
        p.terminate(Duration::from_secs(2)).await;
    }
}

/// "2 policies changed; workload cache added".
fn summarize(old: &Model, new: &Model) -> String {
    fn keyed(m: &Model) -> BTreeMap<(String, String, String), String> {
        let mut out = BTreeMap::new();
        let rs = m
            .authorization_policies
            .iter()
            .cloned()
            .map(Resource::AuthorizationPolicy)
            .chain(
                m.peer_authentications
                    .iter()
                    .cloned()
                    .map(Resource::PeerAuthentication),
            );
        for r in rs {
            let meta = r.metadata();
            let key = (
                r.kind().to_string(),
                meta.namespace().to_string(),
                meta.name.clone(),
            );
            out.insert(key, format!("{r:?}"));
        }
        out
    }
    let (a, b) = (keyed(old), keyed(new));
    let policies = a.iter().filter(|(k, v)| b.get(*k) != Some(*v)).count()
        + b.keys().filter(|k| !a.contains_key(*k)).count();
    let mut parts = Vec::new();
    if policies > 0 {
        parts.push(format!(
            "{policies} {} changed",
            if policies == 1 { "policy" } else { "policies" }
        ));
    }
    for w in &new.mesh.workloads {
        match old.mesh.workload(&w.name) {
            None => parts.push(format!("workload {} added", w.name)),
            Some(o) if o != w => parts.push(format!("workload {} changed", w.name)),
            Some(_) => {}
        }
    }
    for w in &old.mesh.workloads {
        if new.mesh.workload(&w.name).is_none() {
            parts.push(format!("workload {} removed", w.name));
        }
    }
    let services = new
        .mesh
        .services
        .iter()
        .filter(|s| !old.mesh.services.contains(s))
        .count()
        + old
            .mesh
            .services
            .iter()
            .filter(|s| new.mesh.service(&s.name, &s.namespace).is_none())
            .count();
    if services > 0 {
        parts.push(format!(
            "{services} {} changed",
            if services == 1 { "service" } else { "services" }
        ));
    }
    if parts.is_empty() {
        parts.push("mesh settings changed".into());
    }
    parts.join("; ")
}

/// "1s", "30s".
fn human(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs().max(1))).to_string()
}
