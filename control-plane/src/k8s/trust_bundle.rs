//! The ConfigMap `palisade-trust-bundle` in every namespace: an injected proxy mounts the trust
//! anchor from it, and a pod can only mount a ConfigMap of its own namespace.
//!
//! Like Istio's `istio-ca-root-cert` and Linkerd's `linkerd-identity-trust-roots`, the control
//! plane keeps the copies itself: one watch of Namespaces and one of ConfigMaps named
//! [`TRUST_BUNDLE_CONFIG_MAP`] (the field selector is what lets RBAC's `resourceNames` narrow a
//! list and watch), and after any change a pass over every namespace that writes the copies
//! that are missing or differ, with server-side apply. Both replicas run it; they write the same
//! bytes under the same field manager, so they never fight.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, ObjectMeta, Patch, PatchParams};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::watch;

use super::manifests::{TRUST_BUNDLE_CONFIG_MAP, TRUST_BUNDLE_KEY};
use crate::metrics::Metrics;

/// Namespaces that never get a copy: nothing in them is injected.
pub const SKIPPED_NAMESPACES: [&str; 3] = ["kube-system", "kube-public", "kube-node-lease"];

/// The field manager of the copies (what `kubectl get -o yaml --show-managed-fields` shows).
pub const FIELD_MANAGER: &str = "palisade-control-plane";

/// After a failed write, the next pass comes this long later even if nothing changes.
const RETRY: Duration = Duration::from_secs(10);

/// How long a written copy may take to come back through the watch before it is written again:
/// until then the store still shows the old copy, and a pass would write it twice.
const ECHO: Duration = Duration::from_secs(5);

/// The copy a namespace should hold.
fn desired(namespace: &str, anchor_pem: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(TRUST_BUNDLE_CONFIG_MAP.into()),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/part-of".to_string(),
                "palisade".to_string(),
            )])),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            TRUST_BUNDLE_KEY.to_string(),
            anchor_pem.to_string(),
        )])),
        ..Default::default()
    }
}

/// Whether `ns` should hold a copy now: not a skipped namespace, and not being deleted (the
/// API server refuses new objects there).
fn wants_copy(ns: &Namespace) -> bool {
    let name = ns.metadata.name.as_deref().unwrap_or_default();
    !name.is_empty()
        && !SKIPPED_NAMESPACES.contains(&name)
        && ns.metadata.deletion_timestamp.is_none()
        && ns.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Terminating")
}

/// The namespaces whose copy is missing or differs from `anchor_pem`.
pub fn stale(
    namespaces: &Store<Namespace>,
    copies: &Store<ConfigMap>,
    anchor_pem: &str,
) -> Vec<String> {
    let mut out: Vec<String> = namespaces
        .state()
        .iter()
        .filter(|ns| wants_copy(ns))
        .filter_map(|ns| ns.metadata.name.clone())
        .filter(|name| {
            let key = ObjectRef::new(TRUST_BUNDLE_CONFIG_MAP).within(name);
            let held = copies.get(&key);
            let held = held
                .as_ref()
                .and_then(|cm| cm.data.as_ref())
                .and_then(|d| d.get(TRUST_BUNDLE_KEY));
            held.map(String::as_str) != Some(anchor_pem)
        })
        .collect();
    out.sort();
    out
}

/// Keeps a copy of `anchor_pem` (the Secret's `ca.crt`, every root it holds) in every
/// namespace until `stop` turns true. Counts writes in
/// `palisade_kubernetes_trust_bundle_writes_total{result}`; a failed write is logged and
/// retried.
pub async fn keep_trust_bundles(
    client: kube::Client,
    anchor_pem: String,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let (ns_reader, ns_writer) = reflector::store::<Namespace>();
    let (cm_reader, cm_writer) = reflector::store::<ConfigMap>();
    let namespaces = watcher(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(ns_writer)
    .map(|e| match e {
        Ok(ev) => Ok((0, matches!(ev, watcher::Event::InitDone))),
        Err(e) => Err(("namespaces", e)),
    });
    let copies = watcher(
        Api::<ConfigMap>::all(client.clone()),
        watcher::Config::default().fields(&format!("metadata.name={TRUST_BUNDLE_CONFIG_MAP}")),
    )
    .default_backoff()
    .reflect(cm_writer)
    .map(|e| match e {
        Ok(ev) => Ok((1, matches!(ev, watcher::Event::InitDone))),
        Err(e) => Err(("configmaps", e)),
    });
    let changes = futures_util::stream::select(namespaces, copies);
    futures_util::pin_mut!(changes);
    let mut retry_at: Option<tokio::time::Instant> = None;
    // Whether each watch (namespaces, copies) has listed once: until both have, a missing
    // copy may only be one not seen yet.
    let mut listed = [false, false];
    // Copies written and not yet seen by the watch: namespace → (resourceVersion, when).
    let mut unseen: HashMap<String, (Option<String>, tokio::time::Instant)> = HashMap::new();
    loop {
        let retry = async {
            match retry_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = stop.changed() => {
                if r.is_err() || *stop.borrow() {
                    return;
                }
                continue;
            }
            ev = changes.next() => match ev {
                None => return,
                Some(Err((resource, e))) => {
                    metrics
                        .kubernetes_watch_errors
                        .get_or_create(&crate::metrics::ResourceLabel { resource: resource.into() })
                        .inc();
                    tracing::warn!(resource, error = %e, "watch for the trust bundle copies");
                    continue;
                }
                Some(Ok((which, init_done))) => listed[which] |= init_done,
            },
            () = retry => {}
        }
        if listed != [true, true] {
            continue;
        }
        retry_at = None;
        let now = tokio::time::Instant::now();
        unseen.retain(|ns, (rv, at)| {
            let key = ObjectRef::new(TRUST_BUNDLE_CONFIG_MAP).within(ns);
            let seen = cm_reader
                .get(&key)
                .and_then(|cm| cm.metadata.resource_version.clone());
            now < *at + ECHO && seen != *rv
        });
        for ns in stale(&ns_reader, &cm_reader, &anchor_pem) {
            if let Some((_, at)) = unseen.get(&ns) {
                let again = *at + ECHO;
                retry_at = Some(retry_at.map_or(again, |r| r.min(again)));
                continue;
            }
            let api = Api::<ConfigMap>::namespaced(client.clone(), &ns);
            let params = PatchParams::apply(FIELD_MANAGER).force();
            match api
                .patch(
                    TRUST_BUNDLE_CONFIG_MAP,
                    &params,
                    &Patch::Apply(desired(&ns, &anchor_pem)),
                )
                .await
            {
                Ok(written) => {
                    unseen.insert(ns.clone(), (written.metadata.resource_version, now));
                    metrics.trust_bundle_write("ok");
                    tracing::info!(namespace = %ns, "trust bundle ConfigMap written");
                }
                Err(e) => {
                    metrics.trust_bundle_write("error");
                    tracing::warn!(namespace = %ns, error = %e, "cannot write the trust bundle ConfigMap; retrying in {RETRY:?}");
                    let again = tokio::time::Instant::now() + RETRY;
                    retry_at = Some(retry_at.map_or(again, |r| r.min(again)));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(name: &str, terminating: bool) -> Namespace {
        Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            status: terminating.then(|| k8s_openapi::api::core::v1::NamespaceStatus {
                phase: Some("Terminating".into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn only_live_namespaces_outside_the_system_ones_get_a_copy() {
        assert!(wants_copy(&ns("demo", false)));
        assert!(wants_copy(&ns("palisade-system", false)));
        assert!(!wants_copy(&ns("demo", true)));
        for s in SKIPPED_NAMESPACES {
            assert!(!wants_copy(&ns(s, false)), "{s}");
        }
    }

    #[test]
    fn stale_lists_missing_and_different_copies() {
        let (nr, mut nw) = reflector::store::<Namespace>();
        let (cr, mut cw) = reflector::store::<ConfigMap>();
        for n in ["a", "b", "c", "kube-system"] {
            nw.apply_watcher_event(&watcher::Event::Apply(ns(n, false)));
        }
        cw.apply_watcher_event(&watcher::Event::Apply(desired("a", "PEM")));
        cw.apply_watcher_event(&watcher::Event::Apply(desired("b", "OLD")));
        assert_eq!(stale(&nr, &cr, "PEM"), ["b", "c"]);
        assert!(stale(&nr, &cr, "PEM").iter().all(|n| n != "kube-system"));
    }
}
