//! `palisade chaos`: a bounded fault-injection experiment on a running local mesh.
//!
//! It writes an HTTPRoute for the service with one rule whose `ExtensionRef` filter is an
//! `HTTPFault` (the documented YAML, nothing special) into the mesh's policies directory,
//! waits until every caller's proxy has the new config, runs for the duration (optionally
//! sending load itself through a caller's upstream port), removes the file, and reports what
//! the callers saw: requests, success rate (non-5xx), statuses, faults injected. Interrupted
//! (Ctrl-C), it still removes the experiment.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use palisade_api::policy::{self, Resource};

use super::{http_util, prom};

/// The route and fault the experiment writes, by these names, in this file.
const NAME: &str = "palisade-chaos";
const FILE: &str = "palisade-chaos.yaml";

#[derive(Args, Debug)]
pub struct ChaosArgs {
    /// The service to fail, `name.namespace:port` (as upstreams name it).
    #[arg(long)]
    pub service: String,
    /// HTTP status the aborted requests get.
    #[arg(long, default_value_t = 503)]
    pub abort: u16,
    /// Share of requests aborted, 0-100.
    #[arg(long, default_value_t = 0.0)]
    pub abort_percent: f64,
    /// gRPC status aborted gRPC requests get (default: the HTTP status's gRPC equivalent).
    #[arg(long)]
    pub grpc_status: Option<u8>,
    /// Delay added to a share of requests (`100ms`, `1s`).
    #[arg(long)]
    pub delay: Option<humantime::Duration>,
    /// Share of requests delayed, 0-100.
    #[arg(long, default_value_t = 100.0)]
    pub delay_percent: f64,
    /// How long the experiment runs.
    #[arg(long, default_value = "30s")]
    pub duration: humantime::Duration,
    /// Also send this many requests a second through a caller (`GET /`), so the experiment
    /// does not depend on traffic already flowing (1-10000).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub load: Option<u32>,
    /// The caller the load goes through (default: the first workload with the service as an
    /// upstream).
    #[arg(long)]
    pub from: Option<String>,
    #[arg(long, default_value = ".palisade")]
    pub state_dir: PathBuf,
    /// `json` for the report as JSON.
    #[arg(short = 'o', long)]
    pub output: Option<String>,
}

struct Caller {
    name: String,
    admin: SocketAddr,
    local: SocketAddr,
}

/// The fault's YAML: an HTTPRoute on the service and its HTTPFault.
fn experiment_yaml(a: &ChaosArgs, name: &str, ns: &str, port: u16) -> String {
    let mut fault = Vec::new();
    if let Some(d) = a.delay {
        fault.push(format!(
            "delay: {{ fixedDelay: {}ms, percentage: {} }}",
            d.as_millis(),
            a.delay_percent
        ));
    }
    if a.abort_percent > 0.0 {
        let grpc = a
            .grpc_status
            .map(|g| format!(", grpcStatus: {g}"))
            .unwrap_or_default();
        fault.push(format!(
            "abort: {{ httpStatus: {}{grpc}, percentage: {} }}",
            a.abort, a.abort_percent
        ));
    }
    format!(
        "# Written by `palisade chaos`; removed when the experiment ends.\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
         metadata: {{ name: {NAME}, namespace: {ns} }}\n\
         spec:\n  parentRefs: [ {{ group: \"\", kind: Service, name: {name}, port: {port} }} ]\n  \
         rules:\n    - name: chaos\n      filters:\n        - type: ExtensionRef\n          \
         extensionRef: {{ group: palisade.dev, kind: HTTPFault, name: {NAME} }}\n\
         ---\napiVersion: palisade.dev/v1alpha1\nkind: HTTPFault\n\
         metadata: {{ name: {NAME}, namespace: {ns} }}\nspec: {{ {} }}\n",
        fault.join(", ")
    )
}

fn parse_service(s: &str) -> anyhow::Result<(String, String, u16)> {
    let (name_ns, port) = s
        .rsplit_once(':')
        .with_context(|| format!("--service {s:?} is not name.namespace:port"))?;
    let (name, ns) = name_ns
        .split_once('.')
        .with_context(|| format!("--service {s:?} is not name.namespace:port"))?;
    let port: u16 = port
        .parse()
        .with_context(|| format!("--service {s:?}: {port:?} is not a port"))?;
    Ok((name.to_string(), ns.to_string(), port))
}

/// The callers of `service` from mesh.json, and the mesh file.
fn read_state(state_dir: &Path, service: &str) -> anyhow::Result<(PathBuf, Vec<Caller>)> {
    let path = state_dir.join("mesh.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "no running mesh: cannot read {} (is `palisade up` running?)",
            path.display()
        )
    })?;
    let doc: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let mesh_file = doc["meshFile"]
        .as_str()
        .with_context(|| format!("{} names no meshFile", path.display()))?;
    let mut callers = Vec::new();
    for w in doc["workloads"].as_array().into_iter().flatten() {
        let Some(admin) = w["adminAddr"].as_str().and_then(|a| a.parse().ok()) else {
            continue;
        };
        for u in w["upstreams"].as_array().into_iter().flatten() {
            if u["service"].as_str() == Some(service)
                && let Some(local) = u["localAddr"].as_str().and_then(|a| a.parse().ok())
            {
                callers.push(Caller {
                    name: w["name"].as_str().unwrap_or_default().to_string(),
                    admin,
                    local,
                });
            }
        }
    }
    Ok((PathBuf::from(mesh_file), callers))
}

/// Statuses of the experiment's route counted by a caller's proxy, and faults injected.
#[derive(Default, Clone)]
struct Seen {
    by_status: BTreeMap<String, f64>,
    aborts: f64,
    delays: f64,
    version: f64,
}

async fn seen(admin: SocketAddr, route: &str, fault: &str) -> anyhow::Result<Seen> {
    let (_, text) = http_util::get(admin, "/metrics").await?;
    Ok(seen_in(&prom::parse(&text), route, fault))
}

fn seen_in(samples: &[prom::Sample], route: &str, fault: &str) -> Seen {
    let mut s = Seen::default();
    for m in samples {
        match m.name.as_str() {
            "palisade_requests_total"
                if m.label("direction") == "outbound"
                    && m.labels.get("route").map(String::as_str) == Some(route)
                    && m.labels.contains_key("status_code") =>
            {
                *s.by_status
                    .entry(m.label("status_code").to_string())
                    .or_default() += m.value;
            }
            "palisade_faults_injected_total"
                if m.labels.get("fault").map(String::as_str) == Some(fault) =>
            {
                match m.label("kind") {
                    "abort" => s.aborts += m.value,
                    "delay" => s.delays += m.value,
                    _ => {}
                }
            }
            "palisade_config_version" if m.labels.is_empty() => s.version = m.value,
            _ => {}
        }
    }
    s
}

/// Waits until every caller's proxy applied a config newer than `before` (bounded).
async fn wait_applied(callers: &[Caller], before: &[f64], what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    for (c, v) in callers.iter().zip(before) {
        loop {
            if seen(c.admin, "", "").await.is_ok_and(|s| s.version > *v) {
                break;
            }
            if Instant::now() > deadline {
                bail!("{}'s proxy did not get the {what} within 15 s", c.name);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

/// Requests of the load in flight at once: past it the load waits (a delayed or stuck service
/// must not pile up sockets without bound).
const MAX_IN_FLIGHT: usize = 1024;

/// Open-loop load: `rps` requests a second to `addr` until `until` (at most [`MAX_IN_FLIGHT`]
/// at once); each request's status and latency.
async fn load(addr: SocketAddr, rps: u32, until: Instant) -> Vec<(u16, Duration)> {
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rps.clamp(1, 10_000));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut tasks = tokio::task::JoinSet::new();
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    while Instant::now() < until {
        tick.tick().await;
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        tasks.spawn(async move {
            let _permit = permit;
            let start = Instant::now();
            let status = http_util::get(addr, "/")
                .await
                .map_or(0, |(s, _)| s.as_u16());
            (status, start.elapsed())
        });
    }
    let mut out = Vec::new();
    while let Some(r) = tasks.join_next().await {
        if let Ok(r) = r {
            out.push(r);
        }
    }
    out
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)].as_secs_f64() * 1000.0
}

pub fn run(a: ChaosArgs) -> anyhow::Result<ExitCode> {
    let (name, ns, port) = parse_service(&a.service)?;
    if a.delay.is_none() && a.abort_percent <= 0.0 {
        bail!("nothing to inject: give --abort-percent, --delay, or both");
    }
    for (flag, p) in [
        ("--abort-percent", a.abort_percent),
        ("--delay-percent", a.delay_percent),
    ] {
        if !(0.0..=100.0).contains(&p) {
            bail!("{flag} {p} is not a percentage (0-100)");
        }
    }
    let (mesh_file, callers) = read_state(&a.state_dir, &a.service)?;
    if callers.is_empty() {
        bail!(
            "no workload of the running mesh calls {} (no upstream names it)",
            a.service
        );
    }
    let mesh = palisade_control_plane::mesh::load(&mesh_file)?;
    let dir = mesh
        .policies_dir
        .clone()
        .with_context(|| format!("{} has no policies directory", mesh_file.display()))?;
    let file = dir.join(FILE);
    if file.exists() {
        bail!(
            "{} exists: another experiment is running, or one was interrupted (remove the file)",
            file.display()
        );
    }
    // An experiment must not reroute the service: with routes of its own, the fault belongs
    // in their rules.
    if let Ok(loaded) = policy::load_path(&dir) {
        let theirs: Vec<String> = loaded
            .iter()
            .filter_map(|l| match &l.resource {
                Resource::Route(r) if r.attaches_to(&name, &ns, port) => Some(r.qualified_name()),
                _ => None,
            })
            .collect();
        if !theirs.is_empty() {
            bail!(
                "{} has routes ({}): add an ExtensionRef filter to an HTTPFault in the rule to fail instead (docs/routing.md)",
                a.service,
                theirs.join(", ")
            );
        }
    }
    let yaml = experiment_yaml(&a, &name, &ns, port);
    // Checked as the control plane will check it, before it is written.
    policy::parse_str(&file, &yaml).map_err(|errors| {
        anyhow::anyhow!(
            "{}",
            errors
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("; ")
        )
    })?;
    let load_via =
        match &a.from {
            Some(w) => Some(callers.iter().find(|c| &c.name == w).with_context(|| {
                format!("--from {w}: that workload does not call {}", a.service)
            })?),
            None => callers.first(),
        };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let route = format!("{ns}/{NAME}/chaos");
    let fault = format!("{ns}/{NAME}");
    rt.block_on(async {
        // Ctrl-C and SIGTERM are caught from here on (the handlers are installed on the first
        // poll), so an interrupted experiment is still removed.
        let stop = crate::cmd::shutdown_signal();
        tokio::pin!(stop);
        if futures_util::poll!(&mut stop).is_ready() {
            bail!("interrupted before the experiment started");
        }
        let mut before = Vec::new();
        for c in &callers {
            before.push(seen(c.admin, &route, &fault).await?);
        }
        let guard = Experiment::write(&dir, &file, &yaml)?;
        let versions: Vec<f64> = before.iter().map(|s| s.version).collect();
        let result = async {
            tokio::select! {
                r = wait_applied(&callers, &versions, "experiment") => r?,
                _ = &mut stop => bail!("interrupted while the experiment was being applied"),
            }
            eprintln!(
                "experiment running on {} for {} (Ctrl-C ends it early)",
                a.service, a.duration
            );
            let start = Instant::now();
            let until = start + *a.duration;
            let timings = match (a.load, load_via) {
                (Some(rps), Some(c)) => {
                    tokio::select! {
                        t = load(c.local, rps, until) => t,
                        _ = &mut stop => Vec::new(),
                    }
                }
                _ => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(until.into()) => {}
                        _ = &mut stop => {}
                    }
                    Vec::new()
                }
            };
            anyhow::Ok((start.elapsed(), timings))
        }
        .await;
        // Whatever happened, the experiment ends.
        let mut after = Vec::new();
        for c in &callers {
            after.push(seen(c.admin, &route, &fault).await.unwrap_or_default());
        }
        let removed = guard.remove();
        let versions: Vec<f64> = after.iter().map(|s| s.version).collect();
        let (elapsed, timings) = result?;
        removed.with_context(|| format!("remove {}", file.display()))?;
        wait_applied(&callers, &versions, "end of the experiment").await?;
        report(&a, &callers, &before, &after, elapsed, timings)
    })
}

/// The experiment's file: created only if absent (two runs cannot both own it), and removed
/// when dropped, on every path out (an error, a panic).
struct Experiment {
    file: Option<PathBuf>,
}

impl Experiment {
    fn write(dir: &Path, file: &Path, yaml: &str) -> anyhow::Result<Self> {
        let tmp = dir.join(format!(".{FILE}.{}.tmp", std::process::id()));
        std::fs::write(&tmp, yaml).with_context(|| format!("write {}", tmp.display()))?;
        // A hard link appears whole and fails if the name exists: the check and the write are
        // one step.
        let linked = std::fs::hard_link(&tmp, file);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(Experiment {
                file: Some(file.to_path_buf()),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => bail!(
                "{} exists: another experiment is running, or one was interrupted (remove the file)",
                file.display()
            ),
            Err(e) => Err(e).with_context(|| format!("write {}", file.display())),
        }
    }

    fn remove(mut self) -> std::io::Result<()> {
        match self.file.take() {
            Some(f) => std::fs::remove_file(f),
            None => Ok(()),
        }
    }
}

impl Drop for Experiment {
    fn drop(&mut self) {
        if let Some(f) = self.file.take() {
            let _ = std::fs::remove_file(f);
        }
    }
}

fn report(
    a: &ChaosArgs,
    callers: &[Caller],
    before: &[Seen],
    after: &[Seen],
    elapsed: Duration,
    timings: Vec<(u16, Duration)>,
) -> anyhow::Result<ExitCode> {
    let mut by_status: BTreeMap<String, f64> = BTreeMap::new();
    let (mut aborts, mut delays) = (0.0, 0.0);
    for (b, x) in before.iter().zip(after) {
        for (code, n) in &x.by_status {
            *by_status.entry(code.clone()).or_default() +=
                n - b.by_status.get(code).copied().unwrap_or(0.0);
        }
        aborts += x.aborts - b.aborts;
        delays += x.delays - b.delays;
    }
    let requests: f64 = by_status.values().sum();
    let ok: f64 = by_status
        .iter()
        .filter(|(c, _)| !c.starts_with('5'))
        .map(|(_, n)| n)
        .sum();
    let success = if requests > 0.0 { ok / requests } else { 1.0 };
    let mut lat: Vec<Duration> = timings.iter().map(|(_, d)| *d).collect();
    lat.sort();
    if a.output.as_deref() == Some("json") {
        let doc = serde_json::json!({
            "service": a.service,
            "fault": {
                "abortStatus": a.abort,
                "abortPercent": a.abort_percent,
                "delayMs": a.delay.map(|d| d.as_millis() as u64),
                "delayPercent": a.delay.map(|_| a.delay_percent),
            },
            "durationSeconds": elapsed.as_secs_f64(),
            "callers": callers.iter().map(|c| c.name.clone()).collect::<Vec<_>>(),
            "requests": requests,
            "successRate": success,
            "byStatus": by_status,
            "faultsInjected": { "abort": aborts, "delay": delays },
            "load": a.load.map(|rps| serde_json::json!({
                "rps": rps,
                "sent": timings.len(),
                "latencyMs": { "p50": percentile(&lat, 0.5), "p99": percentile(&lat, 0.99) },
            })),
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        println!(
            "experiment on {} for {:.1}s, seen by {}",
            a.service,
            elapsed.as_secs_f64(),
            callers
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!(
            "  requests {requests}, success rate {:.1}% (non-5xx)",
            success * 100.0
        );
        for (code, n) in &by_status {
            println!("  status {code}: {n}");
        }
        println!("  faults injected: {aborts} aborted, {delays} delayed");
        if a.load.is_some() {
            println!(
                "  load sent: {} requests, latency p50 {:.1} ms, p99 {:.1} ms",
                timings.len(),
                percentile(&lat, 0.5),
                percentile(&lat, 0.99)
            );
        }
        println!("  the experiment's route and fault are removed");
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_callers_saw_of_the_experiment() {
        let text = r#"# TYPE palisade_requests counter
palisade_requests_total{direction="outbound",src_identity="a",dst_identity="b",status_code="503",route="demo/palisade-chaos/chaos"} 3
palisade_requests_total{direction="outbound",src_identity="a",dst_identity="b",status_code="200",route="demo/palisade-chaos/chaos"} 7 # {trace_id="x"} 1
palisade_requests_total{direction="outbound",src_identity="a",dst_identity="b",status_code="200",route=""} 100
palisade_requests_total{direction="inbound",src_identity="a",dst_identity="b",status_code="200",route="demo/palisade-chaos/chaos"} 50
palisade_faults_injected_total{fault="demo/palisade-chaos",kind="abort"} 3
palisade_faults_injected_total{fault="demo/other",kind="abort"} 9
palisade_config_version 4
# EOF
"#;
        let s = seen_in(
            &prom::parse(text),
            "demo/palisade-chaos/chaos",
            "demo/palisade-chaos",
        );
        assert_eq!(s.by_status.get("503"), Some(&3.0));
        assert_eq!(s.by_status.get("200"), Some(&7.0));
        assert_eq!((s.aborts, s.delays, s.version), (3.0, 0.0, 4.0));
    }
}
