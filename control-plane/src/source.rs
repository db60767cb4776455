//! Config sources: where the model comes from. The local source reads the mesh file and its
//! policies directory and watches both live.
//!
//! Every source publishes immutable `Arc<Model>` snapshots on a `tokio::sync::watch` channel;
//! the identity and discovery services only ever read that channel. The Kubernetes source
//! (`crate::k8s::source`) builds the same [`Model`] from Pods, Services, EndpointSlices and
//! the policy CRDs and publishes it the same way, behind the same [`ConfigSource`] trait.
//!
//! A change is applied whole or not at all: if the mesh file or any policy document is
//! invalid, the change is rejected with one error log naming file, document and field,
//! `palisade_config_rejections_total` goes up, and the last good model keeps serving. A proxy
//! never sees half of an edit.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use notify::event::{AccessKind, AccessMode, EventKind};
use notify::{RecursiveMode, Watcher};
use palisade_certs::TrustDomain;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::mesh;
use crate::metrics::Metrics;
use crate::model::{Model, ModelError};

/// Events are collected this long before reloading, so an editor's write-rename-chmod burst
/// (or a `cp` of several policy files) becomes one reload.
pub const DEBOUNCE: Duration = Duration::from_millis(100);
/// How often file metadata is polled when notify is unavailable.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// How often it is polled anyway, as a safety net for events notify cannot see (a policies
/// directory created after the start, a watched directory replaced).
pub const SAFETY_POLL_INTERVAL: Duration = Duration::from_secs(2);

/// Something that produces models: the local files, or the Kubernetes API. Dropping it stops
/// it.
pub trait ConfigSource: Send + Sync + std::fmt::Debug {
    /// A receiver whose current value is the model to serve.
    fn subscribe(&self) -> watch::Receiver<Arc<Model>>;

    /// The model being served now.
    fn current(&self) -> Arc<Model> {
        self.subscribe().borrow().clone()
    }

    /// The latest rejected change, for `/status`. A source that rejects objects one by one
    /// (Kubernetes: status conditions and events) has no single rejection to show.
    fn rejections(&self) -> watch::Receiver<Option<Rejection>> {
        watch::channel(None).1
    }
}

/// The mesh file and its policies directory, watched live.
#[derive(Debug)]
pub struct LocalSource {
    rx: watch::Receiver<Arc<Model>>,
    rejection: watch::Receiver<Option<Rejection>>,
    task: JoinHandle<()>,
}

/// The latest change that was rejected, for as long as it is the latest event: a later
/// change that loads (applied, or back to what is being served) clears it. What
/// `palisade check` reports, through the control plane's `/status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The error, naming file, document and field, as it was logged.
    pub error: String,
    /// When the change was rejected, in seconds since the Unix epoch.
    pub at: u64,
    /// The generation that kept serving.
    pub serving_generation: u64,
}

impl ConfigSource for LocalSource {
    fn subscribe(&self) -> watch::Receiver<Arc<Model>> {
        self.rx.clone()
    }

    /// A receiver of [`LocalSource::last_rejection`], for a status page that outlives a borrow.
    fn rejections(&self) -> watch::Receiver<Option<Rejection>> {
        self.rejection.clone()
    }
}

impl Drop for LocalSource {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Builds a model from the files as they are now.
fn load_model(mesh_path: &Path, generation: u64) -> Result<Model, ModelError> {
    let mesh = mesh::load(mesh_path)?;
    Model::load(mesh, generation)
}

/// Size and modification time of every input file: a cheap "did anything change" check.
type Fingerprint = Vec<(PathBuf, Option<(u64, SystemTime)>)>;

fn stat(p: &Path) -> Option<(u64, SystemTime)> {
    let m = std::fs::metadata(p).ok()?;
    Some((m.len(), m.modified().ok()?))
}

fn walk(dir: &Path, out: &mut Fingerprint, depth: usize) {
    // Record the directory itself so that creating or removing it is a change.
    out.push((dir.to_path_buf(), stat(dir)));
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for p in paths {
        if p.is_dir() {
            if depth < 8 {
                walk(&p, out, depth + 1);
            }
        } else {
            let s = stat(&p);
            out.push((p, s));
        }
    }
}

struct State {
    mesh_path: PathBuf,
    trust_domain: TrustDomain,
    current: Arc<Model>,
    /// The policies directory named by the latest mesh file that parsed, which may differ from
    /// the current model's while a change to `policies:` is being rejected.
    attempted_policies: Option<PathBuf>,
    fingerprint: Fingerprint,
    tx: watch::Sender<Arc<Model>>,
    rejection: watch::Sender<Option<Rejection>>,
    metrics: Arc<Metrics>,
    watcher: Option<notify::RecommendedWatcher>,
    watched: Vec<PathBuf>,
}

impl State {
    fn policy_dirs(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = self
            .current
            .mesh
            .policies_dir
            .iter()
            .chain(self.attempted_policies.iter())
            .cloned()
            .collect();
        dirs.dedup();
        dirs
    }

    fn fingerprint(&self) -> Fingerprint {
        let mut fp = vec![(self.mesh_path.clone(), stat(&self.mesh_path))];
        for dir in self.policy_dirs() {
            walk(&dir, &mut fp, 0);
        }
        fp
    }

    /// (Re)establishes notify watches on the mesh file's directory and the policies
    /// directories that exist. The directory rather than the file is watched because editors
    /// replace files by rename, which would orphan a watch on the file itself.
    fn update_watches(&mut self) {
        let dirs = self.policy_dirs();
        let Some(watcher) = self.watcher.as_mut() else {
            return;
        };
        let mut want: Vec<(PathBuf, RecursiveMode)> = Vec::new();
        let mesh_dir = self
            .mesh_path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        want.push((mesh_dir, RecursiveMode::NonRecursive));
        for d in dirs {
            if d.is_dir() && !want.iter().any(|(w, _)| *w == d) {
                want.push((d, RecursiveMode::Recursive));
            }
        }
        let wanted: Vec<PathBuf> = want.iter().map(|(p, _)| p.clone()).collect();
        if wanted == self.watched {
            return;
        }
        for p in &self.watched {
            let _ = watcher.unwatch(p);
        }
        self.watched.clear();
        for (p, mode) in want {
            match watcher.watch(&p, mode) {
                Ok(()) => self.watched.push(p),
                Err(e) => {
                    tracing::warn!(path = %p.display(), error = %e, "cannot watch; relying on polling")
                }
            }
        }
    }

    /// Reloads if any input file changed since the last attempt.
    fn check(&mut self) {
        let fp = self.fingerprint();
        if fp == self.fingerprint {
            return;
        }
        self.fingerprint = fp;
        self.reload();
        // The reload may have named a new policies directory: fingerprint that too, so the
        // next check compares like with like.
        self.fingerprint = self.fingerprint();
        self.update_watches();
    }

    fn reload(&mut self) {
        let generation = self.current.generation + 1;
        let result = mesh::load(&self.mesh_path)
            .map_err(ModelError::from)
            .and_then(|m| {
                self.attempted_policies = m.policies_dir.clone();
                if m.trust_domain != self.trust_domain {
                    return Err(ModelError::TrustDomainChanged {
                        file: self.mesh_path.clone(),
                        from: self.trust_domain.clone(),
                        to: m.trust_domain.clone(),
                    });
                }
                Model::load(m, generation)
            });
        if result.is_ok() {
            // The files load again: whatever was rejected before is no longer the news.
            self.rejection.send_if_modified(|r| r.take().is_some());
        }
        match result {
            Ok(model) if model.same_content(&self.current) => {
                tracing::debug!("config files changed but the config did not");
            }
            Ok(model) => {
                tracing::info!(
                    generation,
                    workloads = model.mesh.workloads.len(),
                    services = model.mesh.services.len(),
                    authorization_policies = model.authorization_policies.len(),
                    peer_authentications = model.peer_authentications.len(),
                    "config change applied"
                );
                self.metrics.config_generation.set(generation as i64);
                let model = Arc::new(model);
                self.current = model.clone();
                self.tx.send_replace(model);
            }
            Err(e) => {
                self.metrics.config_rejections.inc();
                let at = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                self.rejection.send_replace(Some(Rejection {
                    error: e.to_string(),
                    at,
                    serving_generation: self.current.generation,
                }));
                tracing::error!(
                    error = %e,
                    serving_generation = self.current.generation,
                    "config change rejected whole; the last good config keeps serving"
                );
            }
        }
    }
}

/// Whether a notify event can mean new content. Opens and reads are ignored: the reload itself
/// opens the files, and reacting to that would reload forever.
fn relevant(kind: &EventKind) -> bool {
    !matches!(
        kind,
        EventKind::Access(
            AccessKind::Open(_) | AccessKind::Read | AccessKind::Close(AccessMode::Read)
        )
    )
}

impl LocalSource {
    /// Loads the mesh file at `mesh_path` and its policies (an error here is fatal: there is no
    /// last good config yet), then watches both. Must be called inside a tokio runtime.
    pub fn start(mesh_path: &Path, metrics: Arc<Metrics>) -> Result<Self, ModelError> {
        Self::start_with(mesh_path, metrics, true)
    }

    /// `start`, optionally without notify (to exercise the polling fallback in tests).
    fn start_with(
        mesh_path: &Path,
        metrics: Arc<Metrics>,
        use_notify: bool,
    ) -> Result<Self, ModelError> {
        let model = load_model(mesh_path, 1)?;
        metrics.config_generation.set(1);
        let trust_domain = model.mesh.trust_domain.clone();
        let attempted_policies = model.mesh.policies_dir.clone();
        let current = Arc::new(model);
        let (tx, rx) = watch::channel(current.clone());
        let (rejection_tx, rejection_rx) = watch::channel(None);

        let (ev_tx, ev_rx) = mpsc::unbounded_channel::<()>();
        let handler = move |res: notify::Result<notify::Event>| {
            if let Ok(ev) = res
                && relevant(&ev.kind)
            {
                let _ = ev_tx.send(());
            }
        };
        let watcher = if use_notify {
            match notify::recommended_watcher(handler) {
                Ok(w) => Some(w),
                Err(e) => {
                    tracing::warn!(error = %e, "file watching unavailable; polling config files every 500ms");
                    None
                }
            }
        } else {
            None
        };
        let mut state = State {
            mesh_path: mesh_path.to_path_buf(),
            trust_domain,
            current,
            attempted_policies,
            fingerprint: Vec::new(),
            tx,
            rejection: rejection_tx,
            metrics,
            watcher,
            watched: Vec::new(),
        };
        state.fingerprint = state.fingerprint();
        state.update_watches();
        let task = tokio::spawn(run(state, ev_rx));
        Ok(Self {
            rx,
            rejection: rejection_rx,
            task,
        })
    }

    /// The model being served now.
    pub fn current(&self) -> Arc<Model> {
        self.rx.borrow().clone()
    }

    /// The latest rejected change, while no later change has loaded.
    pub fn last_rejection(&self) -> Option<Rejection> {
        self.rejection.borrow().clone()
    }
}

async fn run(mut state: State, events: mpsc::UnboundedReceiver<()>) {
    let notify_ok = state.watcher.is_some() && !state.watched.is_empty();
    let poll = if notify_ok {
        SAFETY_POLL_INTERVAL
    } else {
        POLL_INTERVAL
    };
    let mut events = notify_ok.then_some(events);
    let mut ticker = tokio::time::interval(poll);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            ev = async {
                match events.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                if ev.is_none() {
                    // The watcher went away: fall back to polling.
                    events = None;
                    ticker = tokio::time::interval(POLL_INTERVAL);
                    continue;
                }
                tokio::time::sleep(DEBOUNCE).await;
                if let Some(rx) = events.as_mut() {
                    while rx.try_recv().is_ok() {}
                }
            }
            _ = ticker.tick() => {}
        }
        // Reading a few small files: cheap enough not to need a blocking thread.
        state.check();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MESH: &str = "workloads:\n  - { name: a, inboundPort: 1001, adminPort: 1002 }\n";

    async fn wait_for_generation(src: &LocalSource, generation: u64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while src.current().generation < generation {
            assert!(tokio::time::Instant::now() < deadline, "no reload");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until more than `before` changes have been rejected.
    async fn wait_for_rejection(metrics: &Metrics, before: u64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while metrics.config_rejections.get() <= before {
            assert!(tokio::time::Instant::now() < deadline, "not rejected");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    const DENY: &str = "apiVersion: palisade.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: deny-web, namespace: default }
spec:
  action: DENY
  rules: [ { from: [ { source: { principals: [\"cluster.local/ns/default/sa/web\"] } } ] } ]
";

    fn holds_the_deny(model: &Model) -> bool {
        model.authorization_policies.len() == 1
            && model.authorization_policies[0].metadata.name == "deny-web"
            && model.authorization_policies[0].spec.action == palisade_api::policy::Action::Deny
    }

    #[tokio::test]
    async fn an_emptied_policy_file_is_rejected_and_a_deleted_one_removes_its_policies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.yaml");
        std::fs::write(&path, format!("policies: policies/\n{MESH}")).unwrap();
        std::fs::create_dir(dir.path().join("policies")).unwrap();
        let file = dir.path().join("policies/db.yaml");
        std::fs::write(&file, DENY).unwrap();
        let metrics = Metrics::new();
        let src = LocalSource::start(&path, metrics.clone()).unwrap();
        assert!(holds_the_deny(&src.current()));

        // `> policies/db.yaml` while the mesh runs: refused, the DENY keeps being enforced.
        std::fs::File::create(&file).unwrap();
        wait_for_rejection(&metrics, 0).await;
        assert_eq!(src.current().generation, 1);
        assert!(holds_the_deny(&src.current()));

        // Commented out, or only `---` left: the same.
        for text in [
            format!("# {}", DENY.replace('\n', "\n# ")),
            "---\n---\n".into(),
        ] {
            let before = metrics.config_rejections.get();
            std::fs::write(&file, text).unwrap();
            wait_for_rejection(&metrics, before).await;
            assert_eq!(src.current().generation, 1);
            assert!(holds_the_deny(&src.current()));
        }

        // Deleting the file is how its policies go.
        std::fs::remove_file(&file).unwrap();
        wait_for_generation(&src, 2).await;
        assert!(src.current().authorization_policies.is_empty());
    }

    /// The latest rejection is kept, with its error and the generation still serving, until a
    /// later change loads: a fix back to the served content clears it as an applied change does.
    #[tokio::test]
    async fn the_last_rejection_is_kept_until_a_later_change_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.yaml");
        std::fs::write(&path, MESH).unwrap();
        let metrics = Metrics::new();
        let src = LocalSource::start(&path, metrics.clone()).unwrap();
        assert_eq!(src.last_rejection(), None);

        std::fs::write(&path, MESH.replace("1002", "1001")).unwrap();
        wait_for_rejection(&metrics, 0).await;
        let r = src.last_rejection().expect("a rejection");
        assert_eq!(r.serving_generation, 1);
        assert!(r.error.contains("adminPort"), "{}", r.error);
        assert!(r.at > 0);

        // Back to exactly what is served: no new generation, but nothing is rejected any more.
        std::fs::write(&path, MESH).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while src.last_rejection().is_some() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "rejection never cleared"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(src.current().generation, 1);

        // Rejected again, then a real change applies: cleared as well.
        std::fs::write(&path, "workloads: [ { name: a } ]\n").unwrap();
        wait_for_rejection(&metrics, 1).await;
        assert!(src.last_rejection().is_some());
        std::fs::write(&path, MESH.replace("1002", "1003")).unwrap();
        wait_for_generation(&src, 2).await;
        assert_eq!(src.last_rejection(), None);
    }

    /// An overflowing `certificateLifetime` used to panic inside the reload, killing the watcher
    /// task silently: no rejection was counted and no later edit ever applied.
    #[tokio::test]
    async fn an_overflowing_lifetime_is_rejected_and_the_watcher_survives() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.yaml");
        std::fs::write(&path, MESH).unwrap();
        let metrics = Metrics::new();
        let src = LocalSource::start(&path, metrics.clone()).unwrap();

        std::fs::write(
            &path,
            format!("certificateLifetime: \"18446744073709551615s1s\"\n{MESH}"),
        )
        .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while metrics.config_rejections.get() == 0 {
            assert!(tokio::time::Instant::now() < deadline, "not rejected");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(src.current().generation, 1, "last good model kept");

        std::fs::write(&path, format!("certificateLifetime: 2h\n{MESH}")).unwrap();
        wait_for_generation(&src, 2).await;
        assert_eq!(
            src.current().mesh.certificate_lifetime,
            Duration::from_secs(7200)
        );
    }

    #[tokio::test]
    async fn polling_fallback_picks_up_changes_and_rejects_bad_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.yaml");
        std::fs::write(&path, MESH).unwrap();
        let metrics = Metrics::new();
        let src = LocalSource::start_with(&path, metrics.clone(), false).unwrap();
        assert_eq!(src.current().generation, 1);

        std::fs::write(&path, MESH.replace("1002", "1003")).unwrap();
        wait_for_generation(&src, 2).await;
        assert_eq!(src.current().mesh.workloads[0].admin_port, 1003);

        std::fs::write(&path, MESH.replace("1002", "1001")).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while metrics.config_rejections.get() == 0 {
            assert!(tokio::time::Instant::now() < deadline, "not rejected");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(src.current().generation, 2, "last good model kept");

        // A touch that changes nothing is not a new generation.
        std::fs::write(&path, MESH.replace("1002", "1003")).unwrap();
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(src.current().generation, 2);

        // Changing the trust domain at run time is refused.
        std::fs::write(&path, format!("trustDomain: other.example\n{MESH}")).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while metrics.config_rejections.get() < 2 {
            assert!(tokio::time::Instant::now() < deadline, "not rejected");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(src.current().mesh.trust_domain.as_str(), "cluster.local");
    }
}
