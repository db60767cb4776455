//! The Kubernetes config source and TokenReview identities against an in-process fake API
//! server that speaks the real list/watch wire format, with kube's own client pointed at it.

#[path = "support/fake_kube.rs"]
mod fake_kube;
#[path = "support/proxy.rs"]
mod proxy;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fake_kube::{FakeKube, Res, TokenEntry};
use palisade_api::v1::discovery_client::DiscoveryClient;
use palisade_api::v1::identity_client::IdentityClient;
use palisade_api::v1::{self, CertifyRequest, ProxyConfig, WatchRequest};
use palisade_certs::{Ca, CredentialStore, KeyAndCsr, SpiffeId, Svid, TrustBundle, TrustDomain};
use palisade_control_plane::k8s::control_plane::{KubernetesConfig, start_with_client};
use palisade_control_plane::k8s::source::{KubernetesSource, SourceConfig};
use palisade_control_plane::{ConfigSource, Metrics, Model, RunningControlPlane};
use rustls_pki_types::CertificateDer;
use serde_json::{Value, json};
use tokio::sync::watch;

const T: Duration = Duration::from_secs(10);
/// The contract: a change reaches the model (and the proxies) within a second.
const PROPAGATION: Duration = Duration::from_secs(1);

async fn within<F: Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(T, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out: {what}"),
    }
}

fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "palisade_control_plane=debug".into()),
        )
        .with_test_writer()
        .try_init();
}

fn td() -> TrustDomain {
    TrustDomain::new("cluster.local").unwrap()
}

/// A pod; `meshed` pods run the proxy (an init container with `PALISADE_WORKLOAD`).
fn pod(ns: &str, name: &str, sa: &str, labels: Value, ip: Option<&str>, meshed: bool) -> Value {
    let proxy = json!({
        "name": "palisade-proxy", "image": "palisade", "restartPolicy": "Always",
        "env": [
            { "name": "PALISADE_WORKLOAD", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } },
            { "name": "PALISADE_TOKEN_FILE", "value": "/var/run/secrets/palisade/token" }
        ]
    });
    let mut p = json!({
        "metadata": { "name": name, "namespace": ns, "labels": labels },
        "spec": {
            "serviceAccountName": sa,
            "containers": [ { "name": "app", "image": "app", "ports": [ { "containerPort": 9090 } ] } ],
            "initContainers": if meshed { json!([proxy]) } else { json!([]) },
        },
        "status": { "phase": "Running" }
    });
    if let Some(ip) = ip {
        p["status"]["podIP"] = json!(ip);
        p["status"]["podIPs"] = json!([{ "ip": ip }]);
    }
    p
}

/// A ClusterIP Service with one port `http` 8080 -> targetPort `web` (a named port).
fn service(ns: &str, name: &str, selector: Value, cluster_ip: &str) -> Value {
    json!({
        "metadata": { "name": name, "namespace": ns },
        "spec": {
            "type": "ClusterIP", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
            "selector": selector,
            "ports": [
                { "name": "http", "port": 8080, "targetPort": "web", "protocol": "TCP", "appProtocol": "http" },
                { "name": "dns", "port": 53, "targetPort": 53, "protocol": "UDP" }
            ]
        }
    })
}

/// The EndpointSlice of `service`: (ip, pod, ready) endpoints, port `http` resolved to 9090.
fn slice(ns: &str, service: &str, endpoints: &[(&str, &str, Option<bool>)]) -> Value {
    let eps: Vec<Value> = endpoints
        .iter()
        .map(|(ip, pod, ready)| {
            let mut e = json!({
                "addresses": [ip],
                "targetRef": { "kind": "Pod", "name": pod, "namespace": ns, "uid": "x" },
                "conditions": {}
            });
            if let Some(r) = ready {
                e["conditions"]["ready"] = json!(r);
            }
            e
        })
        .collect();
    json!({
        "metadata": {
            "name": format!("{service}-abcde"), "namespace": ns,
            "labels": { "kubernetes.io/service-name": service }
        },
        "addressType": "IPv4",
        "endpoints": eps,
        "ports": [ { "name": "http", "port": 9090, "protocol": "TCP" } ]
    })
}

fn policy(ns: &str, name: &str, spec: Value) -> Value {
    json!({ "metadata": { "name": name, "namespace": ns }, "spec": spec })
}

fn allow_from(principal: &str, app: &str) -> Value {
    json!({
        "selector": { "matchLabels": { "app": app } },
        "action": "ALLOW",
        "rules": [ { "from": [ { "source": { "principals": [principal] } } ] } ]
    })
}

/// The demo cluster: web and api pods (meshed), a db pod (not), the api Service and its slice,
/// and a policy letting web call api.
fn seed(fake: &FakeKube) {
    fake.apply(
        Res::Pods,
        pod(
            "demo",
            "web-1",
            "web",
            json!({ "app": "web" }),
            Some("10.0.0.1"),
            true,
        ),
    );
    fake.apply(
        Res::Pods,
        pod(
            "demo",
            "api-1",
            "api",
            json!({ "app": "api" }),
            Some("10.0.0.2"),
            true,
        ),
    );
    fake.apply(
        Res::Pods,
        pod(
            "demo",
            "db-1",
            "db",
            json!({ "app": "api" }),
            Some("10.0.0.9"),
            false,
        ),
    );
    fake.apply(
        Res::Services,
        service("demo", "api", json!({ "app": "api" }), "10.96.0.10"),
    );
    fake.apply(
        Res::EndpointSlices,
        slice(
            "demo",
            "api",
            &[
                ("10.0.0.2", "api-1", Some(true)),
                ("10.0.0.9", "db-1", None),
            ],
        ),
    );
    fake.apply(
        Res::AuthorizationPolicies,
        policy(
            "demo",
            "api-from-web",
            allow_from("cluster.local/ns/demo/sa/web", "api"),
        ),
    );
}

async fn start_source(fake: &FakeKube) -> (KubernetesSource, Arc<Metrics>) {
    logs();
    let metrics = Metrics::new();
    let mut cfg = SourceConfig::new(td());
    cfg.sync_timeout = Duration::from_secs(5);
    let src = within(
        "source start",
        KubernetesSource::start(fake.client(), cfg, metrics.clone()),
    )
    .await
    .expect("the source syncs");
    (src, metrics)
}

/// Waits (at most `limit`) until the published model satisfies `cond`; returns how long it
/// took.
async fn wait_model(
    rx: &mut watch::Receiver<Arc<Model>>,
    limit: Duration,
    what: &str,
    cond: impl Fn(&Model) -> bool,
) -> Duration {
    let start = Instant::now();
    let res = tokio::time::timeout(limit, rx.wait_for(|m| cond(m)))
        .await
        .map(|r| r.is_ok());
    match res {
        Ok(true) => start.elapsed(),
        Ok(false) => panic!("{what}: the source stopped"),
        Err(_) => panic!(
            "{what}: not within {limit:?}; model: {:#?}",
            rx.borrow().mesh
        ),
    }
}

fn workloads(m: &Model) -> Vec<String> {
    m.mesh
        .workloads
        .iter()
        .map(|w| format!("{}/{}", w.namespace, w.name))
        .collect()
}

/// `address identity target_port` of each endpoint of `demo/api:8080`.
fn api_endpoints(m: &Model) -> Vec<String> {
    let cfg = m.proxy_config("web-1").expect("web-1 is a workload");
    service_endpoints(&cfg, "api", 8080)
}

fn service_endpoints(cfg: &ProxyConfig, name: &str, port: u32) -> Vec<String> {
    cfg.services
        .iter()
        .find(|s| s.name == name && s.port == port)
        .map(|s| {
            s.endpoints
                .iter()
                .map(|e| format!("{} {} {}", e.address, e.identity, e.target_port))
                .collect()
        })
        .unwrap_or_default()
}

fn policies(m: &Model) -> Vec<String> {
    let mut v: Vec<String> = m
        .authorization_policies
        .iter()
        .map(|p| format!("{} {:?}", p.qualified_name(), p.spec.action))
        .collect();
    v.extend(
        m.peer_authentications
            .iter()
            .map(|p| format!("pa {}/{}", p.metadata.namespace(), p.metadata.name)),
    );
    v
}

const API_1: &str = "10.0.0.2:4143 spiffe://cluster.local/ns/demo/sa/api 9090";
const API_2: &str = "10.0.0.3:4143 spiffe://cluster.local/ns/demo/sa/api 9090";

#[tokio::test]
async fn the_model_is_built_from_pods_services_slices_and_policies() {
    let fake = FakeKube::start().await;
    seed(&fake);
    let (src, _) = start_source(&fake).await;
    let m = src.current();
    // Meshed pods only; the db pod has no proxy.
    assert_eq!(workloads(&m), ["demo/api-1", "demo/web-1"]);
    let web = m.mesh.workload("web-1").unwrap();
    assert_eq!(
        web.spiffe_id(&m.mesh).unwrap().as_str(),
        "spiffe://cluster.local/ns/demo/sa/web"
    );
    assert_eq!(web.inbound_addr().to_string(), "10.0.0.1:4143");
    // The TCP port of the Service only; the ready mesh endpoint on <podIP>:4143 with the
    // targetPort its slice resolved; not the unmeshed db pod.
    let cfg = m.proxy_config("web-1").unwrap();
    let api: Vec<_> = cfg.services.iter().filter(|s| s.name == "api").collect();
    assert_eq!(api.len(), 1, "{:?}", cfg.services);
    assert_eq!(api[0].port, 8080);
    assert_eq!(api[0].protocol, palisade_api::v1::Protocol::Http as i32);
    assert_eq!(api[0].virtual_ips, ["10.96.0.10"]);
    assert_eq!(api_endpoints(&m), [API_1]);
    // The policy selects api, not web.
    assert_eq!(policies(&m), ["demo/api-from-web Allow"]);
    let api_cfg = m.proxy_config("api-1").unwrap();
    assert_eq!(api_cfg.inbound.unwrap().authorization_policies.len(), 1);
    assert!(cfg.inbound.unwrap().authorization_policies.is_empty());
}

#[tokio::test]
async fn the_model_follows_adds_changes_and_deletes_within_a_second() {
    let fake = FakeKube::start().await;
    seed(&fake);
    let (src, _) = start_source(&fake).await;
    let mut rx = src.subscribe();
    rx.borrow_and_update();

    // Adds: a second api pod becomes a workload, then an endpoint once ready in the slice.
    fake.apply(
        Res::Pods,
        pod(
            "demo",
            "api-2",
            "api",
            json!({ "app": "api" }),
            Some("10.0.0.3"),
            true,
        ),
    );
    wait_model(&mut rx, PROPAGATION, "pod added", |m| {
        m.mesh.workload("api-2").is_some()
    })
    .await;
    fake.apply(
        Res::EndpointSlices,
        slice(
            "demo",
            "api",
            &[
                ("10.0.0.2", "api-1", Some(true)),
                ("10.0.0.3", "api-2", Some(true)),
            ],
        ),
    );
    wait_model(&mut rx, PROPAGATION, "endpoint added", |m| {
        api_endpoints(m) == [API_1, API_2]
    })
    .await;
    fake.apply(
        Res::PeerAuthentications,
        policy(
            "demo",
            "permissive",
            json!({ "mtls": { "mode": "PERMISSIVE" } }),
        ),
    );
    wait_model(&mut rx, PROPAGATION, "policy added", |m| {
        policies(m).contains(&"pa demo/permissive".to_string())
    })
    .await;

    // Changes: labels, a policy's action, a Service's ClusterIP, readiness.
    fake.apply(
        Res::Pods,
        pod(
            "demo",
            "web-1",
            "web",
            json!({ "app": "web", "v": "2" }),
            Some("10.0.0.1"),
            true,
        ),
    );
    wait_model(&mut rx, PROPAGATION, "labels changed", |m| {
        m.mesh
            .workload("web-1")
            .is_some_and(|w| w.labels.get("v").is_some_and(|v| v == "2"))
    })
    .await;
    let mut deny = allow_from("cluster.local/ns/demo/sa/web", "api");
    deny["action"] = json!("DENY");
    fake.apply(
        Res::AuthorizationPolicies,
        policy("demo", "api-from-web", deny),
    );
    wait_model(&mut rx, PROPAGATION, "policy changed", |m| {
        policies(m).contains(&"demo/api-from-web Deny".to_string())
    })
    .await;
    fake.apply(
        Res::Services,
        service("demo", "api", json!({ "app": "api" }), "10.96.0.11"),
    );
    wait_model(&mut rx, PROPAGATION, "service changed", |m| {
        m.proxy_config("web-1").is_some_and(|c| {
            c.services
                .iter()
                .any(|s| s.name == "api" && s.virtual_ips == ["10.96.0.11"])
        })
    })
    .await;
    fake.apply(
        Res::EndpointSlices,
        slice(
            "demo",
            "api",
            &[
                ("10.0.0.2", "api-1", Some(false)),
                ("10.0.0.3", "api-2", Some(true)),
            ],
        ),
    );
    wait_model(&mut rx, PROPAGATION, "endpoint not ready", |m| {
        api_endpoints(m) == [API_2]
    })
    .await;

    // Deletes.
    fake.delete(Res::Pods, "demo", "api-2");
    wait_model(&mut rx, PROPAGATION, "pod deleted", |m| {
        m.mesh.workload("api-2").is_none() && api_endpoints(m).is_empty()
    })
    .await;
    fake.delete(Res::AuthorizationPolicies, "demo", "api-from-web");
    fake.delete(Res::PeerAuthentications, "demo", "permissive");
    wait_model(&mut rx, PROPAGATION, "policies deleted", |m| {
        policies(m).is_empty()
    })
    .await;
    fake.delete(Res::Services, "demo", "api");
    wait_model(&mut rx, PROPAGATION, "service deleted", |m| {
        m.mesh.services.is_empty()
    })
    .await;

    // A change that changes nothing the mesh uses (an unmeshed pod) is no new generation.
    let generation = rx.borrow().generation;
    fake.apply(
        Res::Pods,
        pod("demo", "db-2", "db", json!({}), Some("10.0.0.8"), false),
    );
    fake.apply(
        Res::Pods,
        pod(
            "demo",
            "web-2",
            "web",
            json!({ "app": "web" }),
            Some("10.0.0.5"),
            true,
        ),
    );
    wait_model(&mut rx, PROPAGATION, "a later change", |m| {
        m.mesh.workload("web-2").is_some()
    })
    .await;
    assert_eq!(
        rx.borrow().generation,
        generation + 1,
        "the unmeshed pod made no generation of its own"
    );
}

fn metric(metrics: &Metrics, line_start: &str) -> Option<f64> {
    metrics
        .encode()
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Events recorded about `name`, by reason.
fn events_about(fake: &FakeKube, name: &str) -> Vec<Value> {
    fake.events()
        .into_iter()
        .filter(|e| e["regarding"]["name"] == json!(name))
        .collect()
}

async fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + T;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const REJECTED: &str =
    "palisade_kubernetes_object_rejections_total{kind=\"AuthorizationPolicy.palisade.dev\"}";
const REJECTED_NOW: &str =
    "palisade_kubernetes_rejected_objects{kind=\"AuthorizationPolicy.palisade.dev\"}";

#[tokio::test]
async fn a_bad_policy_object_is_rejected_alone_and_a_broken_edit_keeps_the_last_good_one() {
    let fake = FakeKube::start().await;
    seed(&fake);
    // A typo from the start: never served; the rest is.
    let mut typo = allow_from("cluster.local/ns/demo/sa/web", "web");
    typo["rules"][0]["form"] = typo["rules"][0]["from"].take();
    fake.apply(Res::AuthorizationPolicies, policy("demo", "typo", typo));
    fake.apply(
        Res::PeerAuthentications,
        policy("demo", "strict", json!({ "mtls": { "mode": "STRICT" } })),
    );
    let (src, metrics) = start_source(&fake).await;
    let mut rx = src.subscribe();
    assert_eq!(
        policies(&src.current()),
        ["demo/api-from-web Allow", "pa demo/strict"]
    );
    assert_eq!(metric(&metrics, REJECTED), Some(1.0));
    assert_eq!(metric(&metrics, REJECTED_NOW), Some(1.0));
    // Reported on the object, as `kubectl describe` shows it.
    wait_until("the Event about the typo", || {
        !events_about(&fake, "typo").is_empty()
    })
    .await;
    let ev = &events_about(&fake, "typo")[0];
    assert_eq!(ev["type"], "Warning");
    assert_eq!(ev["reason"], "InvalidPolicy");
    assert_eq!(ev["regarding"]["kind"], "AuthorizationPolicy");
    assert_eq!(ev["regarding"]["apiVersion"], "palisade.dev/v1alpha1");
    let note = ev["note"].as_str().unwrap_or_default();
    assert!(note.contains("spec.rules[0].form"), "{note}");
    assert!(note.contains("it is not served"), "{note}");
    // And in the object's status (`kubectl get` shows the Accepted column).
    wait_until("Accepted conditions written", || {
        accepted(&fake, "typo").is_some_and(|c| c["status"] == "False")
            && accepted(&fake, "api-from-web").is_some_and(|c| c["status"] == "True")
    })
    .await;
    let c = accepted(&fake, "typo").unwrap();
    assert_eq!(c["reason"], "Invalid");
    assert!(
        c["message"]
            .as_str()
            .is_some_and(|m| m.contains("spec.rules[0].form") && m.contains("not served")),
        "{c}"
    );
    assert_eq!(c["observedGeneration"], 1);

    // Unrelated changes rebuild the model; the same bad version is not reported again.
    fake.apply(
        Res::Pods,
        pod(
            "demo",
            "api-2",
            "api",
            json!({ "app": "api" }),
            Some("10.0.0.3"),
            true,
        ),
    );
    wait_model(&mut rx, PROPAGATION, "pod added", |m| {
        m.mesh.workload("api-2").is_some()
    })
    .await;
    assert_eq!(metric(&metrics, REJECTED), Some(1.0));

    // A broken edit of a served policy: refused alone, its last good version keeps serving
    // (a DENY with a typo must not become an allow).
    let mut deny = allow_from("cluster.local/ns/demo/sa/web", "api");
    deny["action"] = json!("DENY");
    fake.apply(
        Res::AuthorizationPolicies,
        policy("demo", "api-from-web", deny.clone()),
    );
    wait_model(&mut rx, PROPAGATION, "deny applied", |m| {
        policies(m).contains(&"demo/api-from-web Deny".to_string())
    })
    .await;
    let mut broken = deny.clone();
    broken["action"] = json!("DENNY");
    fake.apply(
        Res::AuthorizationPolicies,
        policy("demo", "api-from-web", broken),
    );
    wait_until("the broken edit counted", || {
        metric(&metrics, REJECTED) == Some(2.0)
    })
    .await;
    assert_eq!(metric(&metrics, REJECTED_NOW), Some(2.0));
    assert!(
        policies(&src.current()).contains(&"demo/api-from-web Deny".to_string()),
        "{:?}",
        policies(&src.current())
    );
    wait_until("the broken edit's condition", || {
        accepted(&fake, "api-from-web").is_some_and(|c| {
            c["status"] == "False"
                && c["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("last accepted version keeps serving"))
        })
    })
    .await;
    wait_until("the Event about the broken edit", || {
        events_about(&fake, "api-from-web").iter().any(|e| {
            e["note"]
                .as_str()
                .is_some_and(|n| n.contains("last accepted version keeps serving"))
        })
    })
    .await;
    // Other objects keep following the cluster meanwhile.
    fake.delete(Res::PeerAuthentications, "demo", "strict");
    wait_model(
        &mut rx,
        PROPAGATION,
        "the PeerAuthentication deleted",
        |m| m.peer_authentications.is_empty(),
    )
    .await;
    assert!(policies(&src.current()).contains(&"demo/api-from-web Deny".to_string()));

    // Fixing both: served, and nothing is refused any more.
    let mut fixed = deny;
    fixed["action"] = json!("AUDIT");
    fake.apply(
        Res::AuthorizationPolicies,
        policy("demo", "api-from-web", fixed),
    );
    fake.apply(
        Res::AuthorizationPolicies,
        policy(
            "demo",
            "typo",
            allow_from("cluster.local/ns/demo/sa/web", "web"),
        ),
    );
    wait_model(&mut rx, PROPAGATION, "fixed", |m| {
        policies(m) == ["demo/api-from-web Audit", "demo/typo Allow"]
    })
    .await;
    assert_eq!(metric(&metrics, REJECTED_NOW), Some(0.0));
    assert_eq!(metric(&metrics, REJECTED), Some(2.0));
    wait_until("both accepted again", || {
        ["typo", "api-from-web"].iter().all(|n| {
            let obj = fake.get(Res::AuthorizationPolicies, "demo", n).unwrap();
            accepted(&fake, n).is_some_and(|c| {
                c["status"] == "True" && c["observedGeneration"] == obj["metadata"]["generation"]
            })
        })
    })
    .await;
    // A written condition is judged again and found there: no write loop. Seven verdicts
    // changed a condition in this test; a loop would write hundreds.
    let writes = fake.status_patches().len();
    assert!((7..=10).contains(&writes), "{writes} status writes");
}

/// The `Accepted` condition of an AuthorizationPolicy in `demo`.
fn accepted(fake: &FakeKube, name: &str) -> Option<Value> {
    let obj = fake.get(Res::AuthorizationPolicies, "demo", name)?;
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Accepted")
        .cloned()
}

#[tokio::test]
async fn a_410_gone_relists_and_recovers_what_the_watch_missed() {
    let fake = FakeKube::start().await;
    seed(&fake);
    let (src, metrics) = start_source(&fake).await;
    let mut rx = src.subscribe();
    assert_eq!(fake.lists(Res::Pods), 1);

    // A bookmark moves the watch on; a watch that simply ends resumes from it, no relist.
    let bookmark = fake.bookmark();
    fake.end_watches();
    wait_until("the pod watch resumed from the bookmark", || {
        fake.watch_versions(Res::Pods)
            .contains(&bookmark.to_string())
    })
    .await;
    assert_eq!(fake.lists(Res::Pods), 1, "resumed, not relisted");

    // Changes the watch never hears of, then the history is compacted: 410 Gone.
    fake.delete_unseen(Res::Pods, "demo", "api-1");
    fake.apply_unseen(
        Res::Pods,
        pod(
            "demo",
            "api-3",
            "api",
            json!({ "app": "api" }),
            Some("10.0.0.4"),
            true,
        ),
    );
    fake.apply_unseen(
        Res::EndpointSlices,
        slice("demo", "api", &[("10.0.0.4", "api-3", Some(true))]),
    );
    fake.expire_watches();
    wait_model(&mut rx, T, "the relist recovered", |m| {
        workloads(m) == ["demo/api-3", "demo/web-1"]
            && api_endpoints(m) == ["10.0.0.4:4143 spiffe://cluster.local/ns/demo/sa/api 9090"]
    })
    .await;
    assert!(fake.lists(Res::Pods) >= 2, "relisted");
    assert!(
        metric(
            &metrics,
            "palisade_kubernetes_watch_errors_total{resource=\"pods\"}"
        )
        .is_some_and(|n| n >= 1.0),
        "{}",
        metrics.encode()
    );
    // And it keeps watching after the relist.
    fake.delete(Res::Pods, "demo", "web-1");
    wait_model(&mut rx, PROPAGATION, "watching again", |m| {
        m.mesh.workload("web-1").is_none()
    })
    .await;
}

#[tokio::test]
async fn istio_policies_are_read_when_their_crds_exist() {
    let fake = FakeKube::start().await;
    seed(&fake);
    fake.set_served(Res::IstioAuthorizationPolicies, true);
    fake.set_served(Res::IstioPeerAuthentications, true);
    fake.apply(
        Res::IstioAuthorizationPolicies,
        policy(
            "demo",
            "istio-deny",
            json!({
                "selector": { "matchLabels": { "app": "api" } },
                "action": "DENY",
                "rules": [ { "to": [ { "operation": { "paths": ["/admin*"] } } ] } ]
            }),
        ),
    );
    // An Istio feature Palisade does not have: that object alone is refused.
    fake.apply(
        Res::IstioAuthorizationPolicies,
        policy(
            "demo",
            "istio-custom",
            json!({ "action": "CUSTOM", "provider": { "name": "ext-authz" }, "rules": [{}] }),
        ),
    );
    fake.apply(
        Res::IstioPeerAuthentications,
        policy("demo", "istio-pa", json!({ "mtls": { "mode": "STRICT" } })),
    );
    let (src, metrics) = start_source(&fake).await;
    assert_eq!(
        policies(&src.current()),
        [
            "demo/api-from-web Allow",
            "demo/istio-deny Deny",
            "pa demo/istio-pa"
        ]
    );
    assert_eq!(
        metric(
            &metrics,
            "palisade_kubernetes_object_rejections_total{kind=\"AuthorizationPolicy.security.istio.io\"}"
        ),
        Some(1.0)
    );
    let mut rx = src.subscribe();
    fake.delete(Res::IstioAuthorizationPolicies, "demo", "istio-deny");
    wait_model(&mut rx, PROPAGATION, "Istio policy deleted", |m| {
        !policies(m).contains(&"demo/istio-deny Deny".to_string())
    })
    .await;
}

#[tokio::test]
async fn istio_crds_installed_later_are_found_and_read() {
    logs();
    let fake = FakeKube::start().await;
    seed(&fake);
    let mut cfg = SourceConfig::new(td());
    cfg.sync_timeout = Duration::from_secs(5);
    cfg.istio_recheck = Duration::from_millis(200);
    let src = within(
        "source start",
        KubernetesSource::start(fake.client(), cfg, Metrics::new()),
    )
    .await
    .expect("starts without the Istio CRDs");
    assert_eq!(policies(&src.current()), ["demo/api-from-web Allow"]);
    fake.set_served(Res::IstioAuthorizationPolicies, true);
    fake.apply(
        Res::IstioAuthorizationPolicies,
        policy(
            "demo",
            "istio-deny",
            json!({ "action": "DENY", "rules": [ { "to": [ { "operation": { "methods": ["DELETE"] } } ] } ] }),
        ),
    );
    let mut rx = src.subscribe();
    wait_model(&mut rx, T, "the Istio policy read", |m| {
        policies(m).contains(&"demo/istio-deny Deny".to_string())
    })
    .await;
}

#[tokio::test]
async fn without_the_crds_the_start_fails_naming_them() {
    logs();
    let fake = FakeKube::start().await;
    fake.set_served(Res::AuthorizationPolicies, false);
    let mut cfg = SourceConfig::new(td());
    // Long enough for the served resources to sync on a loaded machine (the whole suite runs
    // beside this), so that only the missing CRD is named.
    cfg.sync_timeout = Duration::from_secs(5);
    let err = within(
        "failing start",
        KubernetesSource::start(fake.client(), cfg, Metrics::new()),
    )
    .await
    .expect_err("no palisade.dev AuthorizationPolicy CRD");
    let text = err.to_string();
    assert!(
        text.contains("authorizationpolicies.palisade.dev"),
        "{text}"
    );
    assert!(!text.contains("pods"), "{text}");
    assert!(text.contains("404") || text.contains("not find"), "{text}");
}

// --- The control plane on the fake cluster: TokenReview identities and config over mTLS ---

struct Cluster {
    fake: FakeKube,
    cp: RunningControlPlane,
    ca: Ca,
    _dir: tempfile::TempDir,
}

/// What Certify returned.
#[derive(Debug)]
struct Issued {
    id: SpiffeId,
    chain: Vec<CertificateDer<'static>>,
}

const TOKEN_WEB: &str = "eyJ-web-projected-token";

/// The seeded fake cluster with the Secret `palisade-identity` (a fresh CA, also saved under
/// the temp dir's `ca/`) and the tokens the tests present.
async fn fake_cluster() -> (FakeKube, Ca, tempfile::TempDir) {
    logs();
    let fake = FakeKube::start().await;
    seed(&fake);
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate(&td(), None).unwrap();
    ca.save(&dir.path().join("ca")).unwrap();
    let read = |f: &str| std::fs::read(dir.path().join("ca").join(f)).unwrap();
    fake.add_secret(
        "palisade-system",
        "palisade-identity",
        &[
            ("ca.crt", &read(palisade_certs::ca::ROOT_CERT_FILE)),
            ("tls.crt", &read(palisade_certs::ca::ISSUER_CERT_FILE)),
            ("tls.key", &read(palisade_certs::ca::ISSUER_KEY_FILE)),
        ],
    );
    let sa_token = |user: &str, audiences: &[&str], pod: Option<&str>| TokenEntry {
        username: user.into(),
        audiences: audiences.iter().map(|a| a.to_string()).collect(),
        pod: pod.map(str::to_string),
        audience_unaware: false,
    };
    fake.add_token(
        TOKEN_WEB,
        sa_token(
            "system:serviceaccount:demo:web",
            &["palisade"],
            Some("web-1"),
        ),
    );
    fake.add_token(
        "token-for-the-api-server",
        sa_token(
            "system:serviceaccount:demo:web",
            &["https://kubernetes.default.svc"],
            Some("web-1"),
        ),
    );
    let mut unaware = sa_token("system:serviceaccount:demo:web", &[], None);
    unaware.audience_unaware = true;
    fake.add_token("token-from-an-audience-blind-authenticator", unaware);
    fake.add_token(
        "token-of-a-user",
        sa_token("kubernetes-admin", &["palisade"], None),
    );
    (fake, ca, dir)
}

/// A control plane (one replica) on the fake cluster.
async fn replica(fake: &FakeKube) -> RunningControlPlane {
    let cfg = KubernetesConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        webhook_listen: Some("127.0.0.1:0".parse().unwrap()),
        sync_timeout: Duration::from_secs(5),
        ..KubernetesConfig::default()
    };
    within("control plane start", start_with_client(fake.client(), cfg))
        .await
        .expect("the control plane starts on the fake cluster")
}

impl Cluster {
    async fn start() -> Self {
        let (fake, ca, dir) = fake_cluster().await;
        let cp = replica(&fake).await;
        Self {
            fake,
            cp,
            ca,
            _dir: dir,
        }
    }

    fn id(&self, ns: &str, sa: &str) -> SpiffeId {
        SpiffeId::for_workload(&td(), ns, sa).unwrap()
    }

    /// The trust bundle proxies get from the ConfigMap: the Secret's `ca.crt`.
    fn bundle(&self) -> TrustBundle {
        TrustBundle::with_roots(&td(), [self.ca.root_der().clone()]).unwrap()
    }

    async fn channel(&self, store: &Arc<CredentialStore>) -> tonic::transport::Channel {
        let tls = palisade_certs::tls::client_config(
            store,
            palisade_control_plane::control_plane_id(&td()).unwrap(),
            &[b"h2"],
        )
        .unwrap();
        within(
            "connect",
            palisade_api::client::connect(self.cp.addr(), Arc::new(tls)),
        )
        .await
        .expect("connects over TLS, the control plane verified by its SPIFFE ID")
    }

    /// Certify as a bootstrapping proxy of `claimed` (what its CSR asks for) with `token`.
    async fn certify(
        &self,
        claimed: &SpiffeId,
        token: &str,
    ) -> (Arc<CredentialStore>, Result<Issued, tonic::Status>) {
        let store = CredentialStore::new(claimed.clone(), self.bundle());
        let kc = KeyAndCsr::generate(claimed).unwrap();
        let ch = self.channel(&store).await;
        let rsp = within(
            "certify",
            IdentityClient::new(ch).certify(CertifyRequest {
                csr_der: kc.csr_der().to_vec(),
                token: token.to_string(),
            }),
        )
        .await;
        let svid = rsp.map(|r| {
            let r = r.into_inner();
            Svid {
                id: SpiffeId::parse(&r.spiffe_id).unwrap(),
                chain: r.chain_der.into_iter().map(CertificateDer::from).collect(),
                key: None,
                not_before: 0,
                not_after: r.valid_until_unix,
            }
        });
        match svid {
            Ok(svid) => {
                let issued = Issued {
                    id: svid.id.clone(),
                    chain: svid.chain.clone(),
                };
                store.install(kc.into_svid(svid).unwrap()).unwrap();
                (store, Ok(issued))
            }
            Err(e) => (store, Err(e)),
        }
    }

    fn certificates(&self, result: &str) -> Option<f64> {
        let m = self.cp.metrics();
        metric(
            m,
            &format!("palisade_identity_certificates_total{{result=\"{result}\"}}"),
        )
    }
}

#[tokio::test]
async fn tokenreview_signs_the_reviewed_identity_and_refuses_the_rest() {
    let c = Cluster::start().await;
    let web = c.id("demo", "web");

    // The projected token of web's pod: signed for what the review says.
    let (_, svid) = c.certify(&web, TOKEN_WEB).await;
    let svid = svid.expect("the reviewed token is certified");
    assert_eq!(svid.id, web);
    let verified = palisade_certs::verify_svid(
        &svid.chain,
        &c.bundle(),
        Some(&td()),
        rustls_pki_types::UnixTime::now(),
    )
    .expect("chains to the Secret's trust anchor");
    assert_eq!(verified, web);
    // The review asked the API server for our audience.
    let reviews = c.fake.reviews();
    assert_eq!(reviews.len(), 1);
    assert_eq!(reviews[0]["spec"]["audiences"], json!(["palisade"]));
    assert_eq!(reviews[0]["spec"]["token"], json!(TOKEN_WEB));

    // The same valid token, with a CSR for another identity: never signed.
    let (_, other) = c.certify(&c.id("demo", "admin"), TOKEN_WEB).await;
    let e = other.expect_err("the CSR does not decide the identity");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(
        e.message()
            .contains("spiffe://cluster.local/ns/demo/sa/web"),
        "{e:?}"
    );

    // A token for another audience: the API server does not authenticate it.
    let (_, r) = c.certify(&web, "token-for-the-api-server").await;
    assert_eq!(
        r.expect_err("wrong audience").code(),
        tonic::Code::Unauthenticated
    );
    // Authenticated, but without `palisade` among the reviewed audiences.
    let (_, r) = c
        .certify(&web, "token-from-an-audience-blind-authenticator")
        .await;
    let e = r.expect_err("no palisade audience");
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert!(e.message().contains("palisade"), "{e:?}");
    // Not a service account.
    let (_, r) = c.certify(&web, "token-of-a-user").await;
    assert_eq!(r.expect_err("a user").code(), tonic::Code::PermissionDenied);
    // Unknown.
    let (_, r) = c.certify(&web, "garbage").await;
    assert_eq!(r.expect_err("garbage").code(), tonic::Code::Unauthenticated);

    assert_eq!(c.certificates("issued"), Some(1.0));
    assert_eq!(c.certificates("unauthenticated"), Some(2.0));
    assert_eq!(c.certificates("wrong_audience"), Some(1.0));
    assert_eq!(c.certificates("permission_denied"), Some(2.0));
    c.cp.shutdown().await;
}

/// Pods are named uniquely only within their namespace: two `db-0`s, each proxy gets its own
/// pod's config (the namespace is in the identity).
#[tokio::test]
async fn pods_of_one_name_in_two_namespaces_each_get_their_own_config() {
    let c = Cluster::start().await;
    for (ns, ip) in [("a", "10.0.1.1"), ("b", "10.0.2.1")] {
        c.fake.apply(
            Res::Pods,
            pod(ns, "db-0", "db", json!({ "app": "db" }), Some(ip), true),
        );
        c.fake.add_token(
            &format!("token-{ns}-db"),
            TokenEntry {
                username: format!("system:serviceaccount:{ns}:db"),
                audiences: vec!["palisade".into()],
                pod: Some("db-0".into()),
                audience_unaware: false,
            },
        );
    }
    c.fake.apply(
        Res::AuthorizationPolicies,
        policy("b", "b-only", allow_from("cluster.local/ns/b/sa/web", "db")),
    );
    let mut rx = c.cp.subscribe();
    wait_model(&mut rx, T, "both pods and the policy", |m| {
        m.mesh.workloads.iter().filter(|w| w.name == "db-0").count() == 2
            && !m.authorization_policies.is_empty()
    })
    .await;
    for (ns, policies) in [("a", 0), ("b", 1)] {
        let (store, svid) = c.certify(&c.id(ns, "db"), &format!("token-{ns}-db")).await;
        svid.expect("certified");
        let mut stream = within(
            "watch",
            DiscoveryClient::new(c.channel(&store).await).watch(WatchRequest {
                workload: "db-0".into(),
                known_version: 0,
            }),
        )
        .await
        .unwrap_or_else(|e| panic!("{ns}/db-0 may watch db-0: {e:?}"))
        .into_inner();
        let cfg = within("config", stream.message()).await.unwrap().unwrap();
        let json = cfg.inbound.unwrap().authorization_policies;
        assert_eq!(json.len(), policies, "{ns}: {json:?}");
    }
    c.cp.shutdown().await;
}

#[tokio::test]
async fn a_certified_pod_watches_its_config_over_mtls_and_follows_the_cluster() {
    let c = Cluster::start().await;
    let web = c.id("demo", "web");
    let (store, svid) = c.certify(&web, TOKEN_WEB).await;
    svid.expect("certified");

    let ch = c.channel(&store).await;
    let mut stream = within(
        "watch",
        DiscoveryClient::new(ch.clone()).watch(WatchRequest {
            workload: "web-1".into(),
            known_version: 0,
        }),
    )
    .await
    .expect("web-1's proxy may watch web-1")
    .into_inner();
    let first = within("first config", stream.message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(service_endpoints(&first, "api", 8080), [API_1]);
    assert!(!first.trust_bundle_der.is_empty());

    // Another pod's config is not for web's identity.
    let e = within(
        "watch api-1",
        DiscoveryClient::new(ch).watch(WatchRequest {
            workload: "api-1".into(),
            known_version: 0,
        }),
    )
    .await
    .expect_err("not web's");
    assert_eq!(e.code(), tonic::Code::PermissionDenied);

    // A policy selecting web, added to the cluster, is pushed within a second.
    let added = Instant::now();
    c.fake.apply(
        Res::AuthorizationPolicies,
        policy(
            "demo",
            "web-from-api",
            allow_from("cluster.local/ns/demo/sa/api", "web"),
        ),
    );
    let next = within("pushed config", stream.message())
        .await
        .unwrap()
        .unwrap();
    assert!(added.elapsed() < PROPAGATION, "took {:?}", added.elapsed());
    let inbound = next.inbound.unwrap();
    assert_eq!(inbound.authorization_policies.len(), 1);
    assert!(
        inbound.authorization_policies[0]
            .name
            .contains("web-from-api")
    );
    assert!(next.version > first.version);

    // Renewal with the SVID alone works while the pod is in the cluster.
    let kc = KeyAndCsr::generate(&web).unwrap();
    let renewed = within(
        "renew",
        IdentityClient::new(c.channel(&store).await).certify(CertifyRequest {
            csr_der: kc.csr_der().to_vec(),
            token: String::new(),
        }),
    )
    .await
    .expect("renewal with the current SVID");
    assert_eq!(renewed.into_inner().spiffe_id, web.as_str());
    c.cp.shutdown().await;
}

// --- Gateway API routes, HTTPFault, RateLimitPolicy ---

const ROUTE_REJECTED: &str =
    "palisade_kubernetes_object_rejections_total{kind=\"HTTPRoute.gateway.networking.k8s.io\"}";
const FAULT_REJECTED: &str =
    "palisade_kubernetes_object_rejections_total{kind=\"HTTPFault.palisade.dev\"}";
const RATE_LIMIT_REJECTED: &str =
    "palisade_kubernetes_object_rejections_total{kind=\"RateLimitPolicy.palisade.dev\"}";

/// The Service parent `demo/api:8080`, as a GAMMA route names it.
fn api_parent() -> Value {
    json!({ "group": "", "kind": "Service", "name": "api", "port": 8080 })
}

/// An HTTPRoute splitting `/v2` 90/10 between `api` and `api-v2`, with a request timeout.
fn http_route(ns: &str, name: &str, parent: Value, path_type: &str) -> Value {
    json!({
        "metadata": { "name": name, "namespace": ns },
        "spec": {
            "parentRefs": [parent],
            "rules": [ {
                "matches": [ { "path": { "type": path_type, "value": "/v2" } } ],
                "backendRefs": [ { "name": "api", "port": 8080, "weight": 90 },
                                 { "name": "api-v2", "port": 8080, "weight": 10 } ],
                "timeouts": { "request": "10s" }
            } ]
        }
    })
}

/// An HTTPRoute of `demo/api:8080` whose one rule names the HTTPFault `fault`.
fn faulty_route(name: &str, fault: &str) -> Value {
    json!({
        "metadata": { "name": name, "namespace": "demo" },
        "spec": {
            "parentRefs": [api_parent()],
            "rules": [ {
                "matches": [ { "path": { "type": "PathPrefix", "value": "/" } } ],
                "filters": [ { "type": "ExtensionRef",
                               "extensionRef": { "group": "palisade.dev", "kind": "HTTPFault", "name": fault } } ]
            } ]
        }
    })
}

/// `kind namespace/name` of the model's routes.
fn routes(m: &Model) -> Vec<String> {
    m.traffic
        .routes
        .iter()
        .map(|r| format!("{} {}", r.kind.kind(), r.qualified_name()))
        .collect()
}

/// The routes a proxy's config carries on the service `name.demo:port`.
fn service_routes(cfg: &ProxyConfig, name: &str, port: u32) -> Vec<v1::Route> {
    cfg.services
        .iter()
        .find(|s| s.name == name && s.namespace == "demo" && s.port == port)
        .map(|s| s.routes.clone())
        .unwrap_or_default()
}

/// `name.namespace:port weight` of each backend of a rule.
fn backends(rule: &v1::RouteRule) -> Vec<String> {
    rule.backends
        .iter()
        .map(|b| {
            let s = b.service.clone().unwrap_or_default();
            format!("{}.{}:{} {}", s.name, s.namespace, s.port, b.weight)
        })
        .collect()
}

/// The fault of the first rule of the first route of `demo/api:8080`, as web-1's proxy gets it.
fn api_fault(m: &Model) -> Option<v1::Fault> {
    let cfg = m.proxy_config("web-1")?;
    service_routes(&cfg, "api", 8080)
        .first()?
        .rules
        .first()?
        .fault
        .clone()
}

/// What a rule naming a missing HTTPFault does: answer every request 500.
fn missing_fault(name: &str) -> v1::Fault {
    v1::Fault {
        name: name.into(),
        abort_http_status: 500,
        abort_ppm: 1_000_000,
        ..Default::default()
    }
}

/// A valid route with a Service parent and two weighted backends reaches, over Discovery, the
/// proxy of a pod calling that Service: on the parent's config, with both backends, and the
/// backend Service it did not hold before comes along.
#[tokio::test]
async fn an_http_route_reaches_the_proxies_calling_its_parent_service() {
    let (fake, ca, dir) = fake_cluster().await;
    fake.set_served(Res::HttpRoutes, true);
    fake.set_served(Res::GrpcRoutes, true);
    fake.apply(
        Res::Services,
        service(
            "demo",
            "api-v2",
            json!({ "app": "api", "v": "2" }),
            "10.96.0.12",
        ),
    );
    let c = Cluster {
        cp: replica(&fake).await,
        fake,
        ca,
        _dir: dir,
    };
    let web = c.id("demo", "web");
    let (store, svid) = c.certify(&web, TOKEN_WEB).await;
    svid.expect("certified");
    let mut stream = within(
        "watch",
        DiscoveryClient::new(c.channel(&store).await).watch(WatchRequest {
            workload: "web-1".into(),
            known_version: 0,
        }),
    )
    .await
    .expect("web-1's proxy may watch web-1")
    .into_inner();
    let first = within("first config", stream.message())
        .await
        .unwrap()
        .unwrap();
    assert!(service_routes(&first, "api", 8080).is_empty());

    let added = Instant::now();
    c.fake.apply(
        Res::HttpRoutes,
        http_route("demo", "api-split", api_parent(), "PathPrefix"),
    );
    let cfg = loop {
        let next = within("the route pushed", stream.message())
            .await
            .unwrap()
            .expect("the stream goes on");
        if !service_routes(&next, "api", 8080).is_empty() {
            break next;
        }
    };
    assert!(added.elapsed() < PROPAGATION, "took {:?}", added.elapsed());
    let routes = service_routes(&cfg, "api", 8080);
    assert_eq!(routes.len(), 1, "{routes:?}");
    let route = &routes[0];
    assert_eq!(
        (route.namespace.as_str(), route.name.as_str()),
        ("demo", "api-split")
    );
    assert!(!route.grpc);
    assert_eq!(route.rules.len(), 1);
    let rule = &route.rules[0];
    assert_eq!(backends(rule), ["api.demo:8080 90", "api-v2.demo:8080 10"]);
    let path = rule.matches[0].path.clone().expect("a path match");
    assert_eq!(path.kind, v1::path_match::Kind::Prefix as i32);
    assert_eq!(path.value, "/v2");
    assert_eq!(rule.request_timeout_ms, 10_000);
    assert!(rule.fault.is_none());
    // The backend's own service is in the config too: the proxy can send the 10% there.
    assert!(
        cfg.services
            .iter()
            .any(|s| s.name == "api-v2" && s.port == 8080),
        "{:?}",
        cfg.services.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    // The route is not api-v2's: a backend is not a parent.
    assert!(service_routes(&cfg, "api-v2", 8080).is_empty());
    c.cp.shutdown().await;
}

/// The trace annotations of a Service and of its HTTPRoute reach the proxies: the Service's
/// policy on its wire form for its callers, the route's own on the route (the caller's proxy
/// merges them), the merged one on the inbound routes of the Service's pods. A bad value on the
/// Service is left out alone; on a route it refuses that route alone, naming the annotation.
#[tokio::test]
async fn trace_annotations_of_a_service_and_its_routes_reach_the_proxies() {
    let fake = FakeKube::start().await;
    seed(&fake);
    fake.set_served(Res::HttpRoutes, true);
    let mut api = service("demo", "api", json!({ "app": "api" }), "10.96.0.10");
    api["metadata"]["annotations"] = json!({
        "trace.palisade.dev/span-budget": "50",
        "trace.palisade.dev/slow": "1s",
        "timeout.palisade.dev/request": "soon"
    });
    fake.apply(Res::Services, api);
    let mut slow = http_route("demo", "api-split", api_parent(), "PathPrefix");
    slow["metadata"]["annotations"] = json!({ "trace.palisade.dev/slow": "200ms" });
    fake.apply(Res::HttpRoutes, slow);
    let mut typo = http_route("demo", "api-typo", api_parent(), "PathPrefix");
    typo["metadata"]["annotations"] = json!({ "trace.palisade.dev/span-budget": "0" });
    fake.apply(Res::HttpRoutes, typo);
    let (src, metrics) = start_source(&fake).await;
    let m = src.current();
    let t = |t: Option<&v1::TracePolicy>| t.map(|t| (t.span_budget_per_second, t.slow_ms));

    let cfg = m.proxy_config("web-1").expect("web-1's config");
    let api = cfg
        .services
        .iter()
        .find(|s| s.name == "api" && s.port == 8080)
        .expect("api in web-1's config");
    assert_eq!(t(api.trace.as_ref()), Some((50, 1000)));
    // The bad timeout annotation is left out; the trace policy is not.
    assert_eq!(api.request_timeout_ms, 0);
    let on_api = service_routes(&cfg, "api", 8080);
    let names: Vec<&str> = on_api.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["api-split"]);
    assert_eq!(t(on_api[0].trace.as_ref()), Some((0, 200)));

    let backer = m.proxy_config("api-1").expect("api-1's config");
    let inbound = backer.inbound.expect("inbound").routes;
    assert_eq!(inbound.len(), 1);
    assert_eq!(t(inbound[0].trace.as_ref()), Some((50, 200)));

    assert_eq!(metric(&metrics, ROUTE_REJECTED), Some(1.0));
    wait_until("the Event about the refused route", || {
        events_about(&fake, "api-typo").iter().any(|e| {
            e["note"]
                .as_str()
                .is_some_and(|n| n.contains("metadata.annotations.trace.palisade.dev/span-budget"))
        })
    })
    .await;
}

/// Each mesh route is parsed alone by the policy files' parser: a bad one (or a consumer
/// route) is refused alone, with the parser's field path in its Event, and everything else is
/// served; routes of a gateway controller are not judged at all.
#[tokio::test]
async fn gateway_routes_are_parsed_alone_and_gateway_owned_ones_left_alone() {
    let fake = FakeKube::start().await;
    seed(&fake);
    fake.set_served(Res::HttpRoutes, true);
    fake.set_served(Res::GrpcRoutes, true);
    fake.apply(
        Res::HttpRoutes,
        http_route("demo", "api-split", api_parent(), "PathPrefix"),
    );
    // `Prefix` is not a path match type: refused alone.
    fake.apply(
        Res::HttpRoutes,
        http_route("demo", "api-typo", api_parent(), "Prefix"),
    );
    // A route in another namespace for demo's Service: a consumer route, not supported.
    let mut demo_api = api_parent();
    demo_api["namespace"] = json!("demo");
    fake.apply(
        Res::HttpRoutes,
        http_route("shop", "shop-to-api", demo_api, "PathPrefix"),
    );
    // A route of some gateway controller, even a broken one, is not the mesh's to judge.
    fake.apply(
        Res::HttpRoutes,
        http_route(
            "demo",
            "public",
            json!({ "name": "public-gateway" }),
            "Bogus",
        ),
    );
    // A route of a Gateway and of the Service: the mesh's for the Service, the Gateway parent
    // left to its controller; the errors of its Service parent name the index as written.
    let mut both = http_route("demo", "api-and-gateway", api_parent(), "PathPrefix");
    both["spec"]["parentRefs"] = json!([ { "name": "public-gateway" }, api_parent() ]);
    fake.apply(Res::HttpRoutes, both.clone());
    let mut section = api_parent();
    section["sectionName"] = json!("http");
    both["metadata"]["name"] = json!("api-section");
    both["spec"]["parentRefs"] = json!([ { "name": "public-gateway" }, section ]);
    fake.apply(Res::HttpRoutes, both);
    fake.apply(
        Res::GrpcRoutes,
        json!({
            "metadata": { "name": "api-grpc", "namespace": "demo" },
            "spec": {
                "parentRefs": [ { "group": "", "kind": "Service", "name": "api" } ],
                "rules": [ { "matches": [ { "method": { "service": "demo.Api" } } ],
                             "backendRefs": [ { "name": "api", "port": 8080 } ] } ]
            }
        }),
    );
    let (src, metrics) = start_source(&fake).await;
    let m = src.current();
    assert_eq!(
        routes(&m),
        [
            "HTTPRoute demo/api-and-gateway",
            "GRPCRoute demo/api-grpc",
            "HTTPRoute demo/api-split"
        ]
    );
    // The accepted ones are on the parent's config (a GRPCRoute is matched like one).
    let cfg = m.proxy_config("web-1").unwrap();
    let on_api: Vec<(String, bool)> = service_routes(&cfg, "api", 8080)
        .into_iter()
        .map(|r| (r.name, r.grpc))
        .collect();
    assert_eq!(
        on_api,
        [
            ("api-and-gateway".to_string(), false),
            ("api-grpc".to_string(), true),
            ("api-split".to_string(), false)
        ]
    );
    // Everything else keeps serving.
    assert_eq!(policies(&m), ["demo/api-from-web Allow"]);
    assert_eq!(api_endpoints(&m), [API_1]);
    assert_eq!(metric(&metrics, ROUTE_REJECTED), Some(3.0));
    wait_until("the Events about the refused routes", || {
        ["api-typo", "shop-to-api", "api-section"]
            .iter()
            .all(|n| !events_about(&fake, n).is_empty())
    })
    .await;
    let note = events_about(&fake, "api-section")[0]["note"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(note.contains("spec.parentRefs[1].sectionName"), "{note}");
    let ev = &events_about(&fake, "api-typo")[0];
    assert_eq!(ev["type"], "Warning");
    assert_eq!(ev["regarding"]["kind"], "HTTPRoute");
    assert_eq!(
        ev["regarding"]["apiVersion"],
        "gateway.networking.k8s.io/v1"
    );
    let note = ev["note"].as_str().unwrap_or_default();
    assert!(
        note.contains("spec.rules[0].matches[0].path.type")
            && note.contains("\"Prefix\" is not one of Exact, PathPrefix, RegularExpression"),
        "{note}"
    );
    let note = events_about(&fake, "shop-to-api")[0]["note"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        note.contains("spec.parentRefs[0].namespace") && note.contains("consumer route"),
        "{note}"
    );
    assert!(events_about(&fake, "public").is_empty());
    // A route's status is its gateway controller's business: not written.
    assert!(
        fake.get(Res::HttpRoutes, "demo", "api-split").unwrap()["status"].is_null(),
        "{:?}",
        fake.status_patches()
    );

    // Fixed, it is served; deleted, it goes; neither is refused again.
    let mut rx = src.subscribe();
    fake.apply(
        Res::HttpRoutes,
        http_route("demo", "api-typo", api_parent(), "Exact"),
    );
    wait_model(&mut rx, PROPAGATION, "the fixed route", |m| {
        routes(m).contains(&"HTTPRoute demo/api-typo".to_string())
    })
    .await;
    fake.delete(Res::HttpRoutes, "demo", "api-split");
    fake.delete(Res::HttpRoutes, "demo", "api-and-gateway");
    wait_model(&mut rx, PROPAGATION, "the deleted routes", |m| {
        routes(m) == ["GRPCRoute demo/api-grpc", "HTTPRoute demo/api-typo"]
            && m.proxy_config("web-1").is_some_and(|c| {
                service_routes(&c, "api", 8080)
                    .iter()
                    .all(|r| r.name != "api-split")
            })
    })
    .await;
    assert_eq!(metric(&metrics, ROUTE_REJECTED), Some(3.0));
    // A route moved to a gateway is no longer the mesh's: it leaves the model, unjudged.
    fake.apply(
        Res::HttpRoutes,
        http_route(
            "demo",
            "api-typo",
            json!({ "name": "public-gateway" }),
            "Bogus",
        ),
    );
    wait_model(&mut rx, PROPAGATION, "the route handed to a gateway", |m| {
        routes(m) == ["GRPCRoute demo/api-grpc"]
    })
    .await;
    assert_eq!(metric(&metrics, ROUTE_REJECTED), Some(3.0));
}

#[tokio::test]
async fn without_the_gateway_api_crds_the_source_serves_and_finds_them_later() {
    logs();
    let fake = FakeKube::start().await;
    seed(&fake);
    let mut cfg = SourceConfig::new(td());
    cfg.sync_timeout = Duration::from_secs(5);
    cfg.istio_recheck = Duration::from_millis(200);
    let src = within(
        "source start",
        KubernetesSource::start(fake.client(), cfg, Metrics::new()),
    )
    .await
    .expect("starts without the Gateway API CRDs");
    assert!(routes(&src.current()).is_empty());
    assert_eq!(policies(&src.current()), ["demo/api-from-web Allow"]);
    fake.set_served(Res::HttpRoutes, true);
    fake.apply(
        Res::HttpRoutes,
        http_route("demo", "api-split", api_parent(), "PathPrefix"),
    );
    let mut rx = src.subscribe();
    wait_model(&mut rx, T, "the route read", |m| {
        routes(m) == ["HTTPRoute demo/api-split"]
    })
    .await;
}

/// A route's ExtensionRef filter is resolved to the HTTPFault of its namespace into the rule's
/// `fault` (delay and abort shares in parts per million); while the HTTPFault is missing the
/// rule answers 500; a broken edit of the HTTPFault is refused alone and its last good version
/// keeps serving.
#[tokio::test]
async fn an_http_fault_named_by_a_route_is_resolved_into_its_rule() {
    let fake = FakeKube::start().await;
    seed(&fake);
    fake.set_served(Res::HttpRoutes, true);
    fake.apply(Res::HttpRoutes, faulty_route("api-chaos", "slow-and-flaky"));
    let (src, metrics) = start_source(&fake).await;
    let mut rx = src.subscribe();
    // Not there (yet): the rule answers every request 500, it does not route around the fault.
    assert_eq!(
        api_fault(&src.current()),
        Some(missing_fault("demo/slow-and-flaky"))
    );

    let spec = json!({
        "delay": { "fixedDelay": "100ms", "percentage": 50 },
        "abort": { "httpStatus": 503, "percentage": 10 }
    });
    fake.apply(
        Res::HttpFaults,
        policy("demo", "slow-and-flaky", spec.clone()),
    );
    let resolved = v1::Fault {
        name: "demo/slow-and-flaky".into(),
        delay_ms: 100,
        delay_ppm: 500_000,
        abort_http_status: 503,
        abort_grpc_status: 0,
        abort_ppm: 100_000,
    };
    wait_model(&mut rx, PROPAGATION, "the fault resolved", |m| {
        api_fault(m).as_ref() == Some(&resolved)
    })
    .await;
    // Ours: the Accepted condition is written on it.
    wait_until("the HTTPFault accepted", || {
        fake.get(Res::HttpFaults, "demo", "slow-and-flaky")
            .and_then(|o| o["status"]["conditions"].as_array().cloned())
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Accepted" && c["status"] == "True")
            })
    })
    .await;

    // A broken edit: refused alone, the last good version keeps serving.
    let mut broken = spec;
    broken["abort"]["percentage"] = json!(150);
    fake.apply(Res::HttpFaults, policy("demo", "slow-and-flaky", broken));
    wait_until("the broken HTTPFault counted", || {
        metric(&metrics, FAULT_REJECTED) == Some(1.0)
    })
    .await;
    assert_eq!(api_fault(&src.current()), Some(resolved.clone()));
    wait_until("the Event about the broken HTTPFault", || {
        events_about(&fake, "slow-and-flaky").iter().any(|e| {
            e["regarding"]["kind"] == "HTTPFault"
                && e["note"].as_str().is_some_and(|n| {
                    n.contains("spec.abort.percentage")
                        && n.contains("last accepted version keeps serving")
                })
        })
    })
    .await;

    // Changed to a gRPC abort alone: the rule follows it.
    let grpc_too = json!({ "abort": { "grpcStatus": 14, "percentage": 0.5 } });
    fake.apply(Res::HttpFaults, policy("demo", "slow-and-flaky", grpc_too));
    wait_model(&mut rx, PROPAGATION, "the fault changed", |m| {
        api_fault(m).is_some_and(|f| {
            f.delay_ppm == 0
                && f.abort_grpc_status == 14
                && f.abort_http_status == 0
                && f.abort_ppm == 5_000
        })
    })
    .await;

    // Deleted: the rule answers 500 again.
    fake.delete(Res::HttpFaults, "demo", "slow-and-flaky");
    wait_model(&mut rx, PROPAGATION, "the fault deleted", |m| {
        api_fault(m) == Some(missing_fault("demo/slow-and-flaky"))
    })
    .await;
}

/// A RateLimitPolicy reaches the inbound config of the pods its selector matches, and only
/// theirs; a bad one is refused alone.
#[tokio::test]
async fn a_rate_limit_policy_reaches_the_pods_it_selects() {
    let fake = FakeKube::start().await;
    seed(&fake);
    fake.apply(
        Res::RateLimitPolicies,
        policy(
            "demo",
            "api-limits",
            json!({
                "selector": { "matchLabels": { "app": "api" } },
                "total": { "requestsPerSecond": 100 },
                "identity": { "requestsPerSecond": 10 },
                "overrides": [ { "requestsPerSecond": 50,
                                 "principals": ["cluster.local/ns/demo/sa/web", "spiffe://cluster.local/ns/ops/*"] } ]
            }),
        ),
    );
    // Zero per second is not a limit: refused alone.
    fake.apply(
        Res::RateLimitPolicies,
        policy(
            "demo",
            "web-limits",
            json!({ "selector": { "matchLabels": { "app": "web" } }, "total": { "requestsPerSecond": 0 } }),
        ),
    );
    let (src, metrics) = start_source(&fake).await;
    let m = src.current();
    let limit = m
        .proxy_config("api-1")
        .and_then(|c| c.inbound)
        .and_then(|i| i.rate_limit)
        .expect("api-1 is limited");
    assert_eq!(limit.name, "demo/api-limits");
    assert_eq!((limit.total_rps, limit.identity_rps), (100, 10));
    assert_eq!(limit.overrides.len(), 1);
    assert_eq!(limit.overrides[0].requests_per_second, 50);
    let principals: Vec<String> = limit.overrides[0]
        .principals
        .iter()
        .map(|p| palisade_api::authorization::pattern(p).unwrap())
        .collect();
    assert_eq!(
        principals,
        ["cluster.local/ns/demo/sa/web", "cluster.local/ns/ops/*"]
    );
    let web_limit = m
        .proxy_config("web-1")
        .and_then(|c| c.inbound)
        .and_then(|i| i.rate_limit);
    assert_eq!(web_limit, None, "the refused policy limits nothing");
    assert_eq!(metric(&metrics, RATE_LIMIT_REJECTED), Some(1.0));
    // Everything else keeps serving.
    assert_eq!(policies(&m), ["demo/api-from-web Allow"]);
    wait_until("the Event about the refused RateLimitPolicy", || {
        events_about(&fake, "web-limits").iter().any(|e| {
            e["note"].as_str().is_some_and(|n| {
                n.contains("spec.total.requestsPerSecond") && n.contains("not served")
            })
        })
    })
    .await;

    // Changed, fixed: followed within a second.
    let mut rx = src.subscribe();
    fake.apply(
        Res::RateLimitPolicies,
        policy(
            "demo",
            "web-limits",
            json!({ "selector": { "matchLabels": { "app": "web" } }, "total": { "requestsPerSecond": 5 } }),
        ),
    );
    wait_model(&mut rx, PROPAGATION, "web limited", |m| {
        m.proxy_config("web-1")
            .and_then(|c| c.inbound)
            .and_then(|i| i.rate_limit)
            .is_some_and(|l| l.name == "demo/web-limits" && l.total_rps == 5 && l.identity_rps == 0)
    })
    .await;
    fake.delete(Res::RateLimitPolicies, "demo", "api-limits");
    wait_model(&mut rx, PROPAGATION, "api no longer limited", |m| {
        m.proxy_config("api-1")
            .and_then(|c| c.inbound)
            .is_some_and(|i| i.rate_limit.is_none())
    })
    .await;
}

// --- EgressPolicy ---

const EGRESS_REJECTED: &str =
    "palisade_kubernetes_object_rejections_total{kind=\"EgressPolicy.palisade.dev\"}";

/// The EgressPolicy a pod's proxy gets (`Inbound.egress`), if any.
fn egress_of(m: &Model, pod: &str) -> Option<v1::EgressPolicy> {
    m.proxy_config(pod)
        .and_then(|c| c.inbound)
        .and_then(|i| i.egress)
}

fn egress_rule(allow: bool, hosts: &[&str]) -> v1::EgressRule {
    v1::EgressRule {
        allow,
        hosts: hosts.iter().map(|h| h.to_string()).collect(),
    }
}

/// The `Accepted` condition of an EgressPolicy in `demo`.
fn egress_accepted(fake: &FakeKube, name: &str) -> Option<Value> {
    let obj = fake.get(Res::EgressPolicies, "demo", name)?;
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Accepted")
        .cloned()
}

/// An EgressPolicy reaches the inbound config (`Inbound.egress`) of the pods its selector
/// matches, and only theirs; a bad one is refused alone, naming the field, and its fix is
/// followed; a broken edit keeps the last good version (a DENY default must not become
/// allow-all); the root namespace's is the default of the pods without one of their own.
#[tokio::test]
async fn an_egress_policy_reaches_the_pods_it_selects() {
    let fake = FakeKube::start().await;
    seed(&fake);
    // docs/routing.md's example.
    let web_spec = json!({
        "selector": { "matchLabels": { "app": "web" } },
        "defaultAction": "DENY",
        "rules": [
            { "action": "ALLOW", "hosts": ["ok.example.com"] },
            { "action": "DENY", "hosts": ["*.example.com"] },
            { "action": "ALLOW", "hosts": ["api.github.com", "*.googleapis.com"] }
        ]
    });
    fake.apply(
        Res::EgressPolicies,
        policy("demo", "web-egress", web_spec.clone()),
    );
    // A rule without its action: refused alone (it must neither allow nor deny by accident).
    fake.apply(
        Res::EgressPolicies,
        policy(
            "demo",
            "api-egress",
            json!({
                "selector": { "matchLabels": { "app": "api" } },
                "defaultAction": "DENY",
                "rules": [ { "hosts": ["api.github.com"] } ]
            }),
        ),
    );
    let (src, metrics) = start_source(&fake).await;
    let m = src.current();
    let web_egress = v1::EgressPolicy {
        default_allow: false,
        rules: vec![
            egress_rule(true, &["ok.example.com"]),
            egress_rule(false, &["*.example.com"]),
            egress_rule(true, &["api.github.com", "*.googleapis.com"]),
        ],
        name: "demo/web-egress".into(),
    };
    assert_eq!(egress_of(&m, "web-1"), Some(web_egress.clone()));
    assert_eq!(
        egress_of(&m, "api-1"),
        None,
        "web's policy is not api's, and api's own is refused"
    );
    assert_eq!(metric(&metrics, EGRESS_REJECTED), Some(1.0));
    // Everything else keeps serving.
    assert_eq!(policies(&m), ["demo/api-from-web Allow"]);
    wait_until("the Event about the refused EgressPolicy", || {
        events_about(&fake, "api-egress").iter().any(|e| {
            e["regarding"]["kind"] == "EgressPolicy"
                && e["note"]
                    .as_str()
                    .is_some_and(|n| n.contains("spec.rules[0].action") && n.contains("not served"))
        })
    })
    .await;
    wait_until("Accepted conditions written", || {
        egress_accepted(&fake, "api-egress").is_some_and(|c| c["status"] == "False")
            && egress_accepted(&fake, "web-egress").is_some_and(|c| c["status"] == "True")
    })
    .await;
    let c = egress_accepted(&fake, "api-egress").unwrap();
    assert!(
        c["message"]
            .as_str()
            .is_some_and(|m| m.contains("spec.rules[0].action: expected ALLOW or DENY")),
        "{c}"
    );

    // Fixed: followed within a second, on api's pod only.
    let mut rx = src.subscribe();
    fake.apply(
        Res::EgressPolicies,
        policy(
            "demo",
            "api-egress",
            json!({
                "selector": { "matchLabels": { "app": "api" } },
                "defaultAction": "DENY",
                "rules": [ { "action": "ALLOW", "hosts": ["api.github.com"] } ]
            }),
        ),
    );
    let api_egress = v1::EgressPolicy {
        default_allow: false,
        rules: vec![egress_rule(true, &["api.github.com"])],
        name: "demo/api-egress".into(),
    };
    wait_model(&mut rx, PROPAGATION, "api's policy fixed", |m| {
        egress_of(m, "api-1").as_ref() == Some(&api_egress)
    })
    .await;
    assert_eq!(egress_of(&src.current(), "web-1"), Some(web_egress.clone()));

    // A broken edit (an upper-case host): refused, the last good version keeps serving.
    let mut broken = web_spec.clone();
    broken["rules"][2]["hosts"][0] = json!("API.github.com");
    broken["defaultAction"] = json!("ALLOW");
    fake.apply(Res::EgressPolicies, policy("demo", "web-egress", broken));
    wait_until("the broken edit counted", || {
        metric(&metrics, EGRESS_REJECTED) == Some(2.0)
    })
    .await;
    assert_eq!(egress_of(&src.current(), "web-1"), Some(web_egress.clone()));
    wait_until("the Event about the broken edit", || {
        events_about(&fake, "web-egress").iter().any(|e| {
            e["note"].as_str().is_some_and(|n| {
                n.contains("spec.rules[2].hosts[0]")
                    && n.contains("lower case")
                    && n.contains("last accepted version keeps serving")
            })
        })
    })
    .await;

    // Deleted: web's pod has no policy; then a mesh-wide one in the root namespace is its
    // default, while api keeps its own.
    fake.delete(Res::EgressPolicies, "demo", "web-egress");
    wait_model(&mut rx, PROPAGATION, "web's policy deleted", |m| {
        egress_of(m, "web-1").is_none()
    })
    .await;
    fake.apply(
        Res::EgressPolicies,
        policy(
            "palisade-system",
            "mesh-default",
            json!({ "defaultAction": "DENY" }),
        ),
    );
    wait_model(&mut rx, PROPAGATION, "the mesh-wide policy", |m| {
        egress_of(m, "web-1").is_some_and(|p| p.name == "palisade-system/mesh-default")
    })
    .await;
    let m = src.current();
    let web = egress_of(&m, "web-1").unwrap();
    assert!(!web.default_allow && web.rules.is_empty(), "{web:?}");
    assert_eq!(egress_of(&m, "api-1"), Some(api_egress));
}

// --- A real proxy against two control-plane replicas ---

/// `address workload` of each endpoint of `key` (`name.namespace:port`) in the proxy's config.
fn proxy_endpoints(proxy: &palisade_proxy::Proxy, key: &str) -> Vec<String> {
    let snap = proxy.snapshot();
    let mut v: Vec<String> = snap
        .services
        .get(key)
        .map(|s| {
            s.endpoints
                .iter()
                .map(|e| format!("{} {}", e.addr, e.identity))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_follows_endpoint_slices_within_a_second_and_moves_to_the_other_replica() {
    let (fake, ca, dir) = fake_cluster().await;
    // Two replicas, both signing with the issuer of the one Secret.
    let cp1 = replica(&fake).await;
    let cp2 = replica(&fake).await;
    let web = SpiffeId::for_workload(&td(), "demo", "web").unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN_WEB}\n")).unwrap();
    let cfg = proxy::on_control_plane(
        "web-1",
        web.clone(),
        // What PALISADE_CONTROL_PLANE would say: both replicas; the proxy tries them in turn.
        palisade_proxy::control_plane::ControlPlaneAddrs::parse(&format!(
            "{},{}",
            cp1.addr(),
            cp2.addr()
        ))
        .unwrap(),
        // The kubelet rotates the projected token in place: the proxy presents what the file
        // says now, not what it read at start.
        "expired-token-read-at-start",
        Some(token_file),
        dir.path()
            .join("ca")
            .join(palisade_certs::ca::ROOT_CERT_FILE),
    );
    let proxy = within("proxy start", palisade_proxy::Proxy::start(cfg))
        .await
        .expect("the proxy starts");
    wait_until("the proxy has a certificate and its config", || {
        proxy.is_ready()
    })
    .await;
    const KEY: &str = "api.demo:8080";
    let api = |ip: &str| format!("{ip}:4143 spiffe://cluster.local/ns/demo/sa/api");
    assert_eq!(proxy_endpoints(&proxy, KEY), [api("10.0.0.2")]);
    let snap = proxy.snapshot();
    let first_version = snap.version;

    // A second api pod, then the EndpointSlice change that makes it an endpoint: in the
    // proxy's config within a second.
    fake.apply(
        Res::Pods,
        pod(
            "demo",
            "api-2",
            "api",
            json!({ "app": "api" }),
            Some("10.0.0.3"),
            true,
        ),
    );
    let mut rx = cp1.subscribe();
    wait_model(&mut rx, PROPAGATION, "api-2 a workload", |m| {
        m.mesh.workload("api-2").is_some()
    })
    .await;
    let changed = Instant::now();
    fake.apply(
        Res::EndpointSlices,
        slice(
            "demo",
            "api",
            &[
                ("10.0.0.2", "api-1", Some(true)),
                ("10.0.0.3", "api-2", Some(true)),
            ],
        ),
    );
    wait_until("the proxy sees the new endpoint", || {
        proxy_endpoints(&proxy, KEY) == [api("10.0.0.2"), api("10.0.0.3")]
    })
    .await;
    let took = changed.elapsed();
    assert!(took < PROPAGATION, "the EndpointSlice change took {took:?}");
    assert!(proxy.snapshot().version > first_version);

    // The replica the proxy is on (the first address) goes away. The proxy reconnects to the
    // other, which accepts its certificate (same issuer) and keeps it up to date.
    cp1.shutdown().await;
    fake.apply(
        Res::EndpointSlices,
        slice(
            "demo",
            "api",
            &[
                ("10.0.0.2", "api-1", Some(false)),
                ("10.0.0.3", "api-2", Some(true)),
            ],
        ),
    );
    wait_until(
        "the proxy follows the cluster through the other replica",
        || proxy_endpoints(&proxy, KEY) == [api("10.0.0.3")],
    )
    .await;
    // A proxy starting now, with the dead replica first in its list, gets its certificate
    // from the live one.
    let store = CredentialStore::new(
        web.clone(),
        TrustBundle::with_roots(&td(), [ca.root_der().clone()]).unwrap(),
    );
    let kc = KeyAndCsr::generate(&web).unwrap();
    let tls = palisade_certs::tls::client_config(
        &store,
        palisade_control_plane::control_plane_id(&td()).unwrap(),
        &[b"h2"],
    )
    .unwrap();
    let ch = within(
        "connect to the live replica",
        palisade_api::client::connect(cp2.addr(), Arc::new(tls)),
    )
    .await
    .expect("the live replica serves");
    let rsp = within(
        "certify at the live replica",
        IdentityClient::new(ch).certify(CertifyRequest {
            csr_der: kc.csr_der().to_vec(),
            token: TOKEN_WEB.into(),
        }),
    )
    .await
    .expect("certified")
    .into_inner();
    // Same issuer as the certificate the proxy got from the first replica.
    let proxy_chain = proxy
        .store()
        .current()
        .expect("a certificate")
        .svid
        .chain
        .clone();
    assert_eq!(
        rsp.chain_der.get(1),
        proxy_chain.get(1).map(|c| c.to_vec()).as_ref()
    );
    proxy.shutdown().await;
    cp2.shutdown().await;
}

fn namespace(name: &str, labels: Value) -> Value {
    json!({ "metadata": { "name": name, "labels": labels } })
}

/// POSTs `review` to the control plane's webhook over HTTPS as the API server does: trusting
/// only the mesh root (the webhook's `caBundle`) and checking the Service's DNS name.
async fn call_webhook(c: &Cluster, review: &Value) -> (http::StatusCode, Value) {
    use http_body_util::BodyExt;
    let addr = c.cp.webhook_addr().expect("the webhook is served");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(c.ca.root_der().clone()).unwrap();
    let tls = rustls::ClientConfig::builder_with_provider(palisade_certs::tls::provider().clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from(
        palisade_control_plane::inject::webhook::SERVICE_DNS_NAME,
    )
    .unwrap();
    let stream = within(
        "TLS to the webhook",
        tokio_rustls::TlsConnector::from(Arc::new(tls)).connect(name, tcp),
    )
    .await
    .expect("the webhook's certificate verifies against the mesh root for the Service name");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post("/inject")
        .header(
            http::header::HOST,
            "palisade-control-plane.palisade-system.svc",
        )
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            review.to_string(),
        )))
        .unwrap();
    let rsp = within("webhook call", sender.send_request(req))
        .await
        .unwrap();
    let status = rsp.status();
    let body = rsp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

fn pod_review(ns: &str) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": { "group": "", "version": "v1", "kind": "Pod" },
            "resource": { "group": "", "version": "v1", "resource": "pods" },
            "namespace": ns,
            "operation": "CREATE",
            "userInfo": { "username": "system:serviceaccount:kube-system:replicaset-controller" },
            "object": {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": { "generateName": "web-", "namespace": ns, "labels": { "app": "web" } },
                "spec": { "serviceAccountName": "web", "containers": [ { "name": "web", "image": "nginx" } ] }
            },
            "oldObject": null
        }
    })
}

#[tokio::test]
async fn the_control_plane_serves_the_injector_webhook_with_namespace_labels_from_the_cluster() {
    let (fake, ca, dir) = fake_cluster().await;
    fake.apply(
        Res::Namespaces,
        namespace("demo", json!({ "palisade.dev/inject": "enabled" })),
    );
    fake.apply(Res::Namespaces, namespace("plain", json!({})));
    let cfg = KubernetesConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        webhook_listen: Some("127.0.0.1:0".parse().unwrap()),
        sync_timeout: Duration::from_secs(5),
        inject: palisade_control_plane::inject::InjectConfig {
            image: "registry.example/palisade:test".into(),
            ..Default::default()
        },
        ..KubernetesConfig::default()
    };
    let cp = within("start", start_with_client(fake.client(), cfg))
        .await
        .unwrap();
    let c = Cluster {
        fake,
        cp,
        ca,
        _dir: dir,
    };

    // The namespace watch fills in shortly after the start; until then the call fails (503)
    // and the webhook's failurePolicy decides.
    let deadline = Instant::now() + T;
    let response = loop {
        let (status, body) = call_webhook(&c, &pod_review("demo")).await;
        if status == http::StatusCode::OK {
            break body;
        }
        assert_eq!(status, http::StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(
            Instant::now() < deadline,
            "the namespace never became known"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let rsp = &response["response"];
    assert_eq!(rsp["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
    assert_eq!(rsp["allowed"], true);
    assert_eq!(rsp["patchType"], "JSONPatch");
    let patch = base64_decode(rsp["patch"].as_str().expect("a patch"));
    let patch: Value = serde_json::from_slice(&patch).unwrap();
    let mut pod = pod_review("demo")["request"]["object"].clone();
    let patch: json_patch::Patch = serde_json::from_value(patch).unwrap();
    json_patch::patch(&mut pod, &patch).unwrap();
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(pod).unwrap();
    let inits = pod.spec.unwrap().init_containers.unwrap();
    let proxy = inits
        .iter()
        .find(|c| c.restart_policy.as_deref() == Some("Always"))
        .expect("the proxy as a native sidecar");
    assert_eq!(
        proxy.image.as_deref(),
        Some("registry.example/palisade:test")
    );
    let env = |name: &str| {
        proxy
            .env
            .iter()
            .flatten()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
    };
    assert_eq!(
        env("PALISADE_CONTROL_PLANE").as_deref(),
        Some("palisade-control-plane.palisade-system.svc:8086")
    );

    // A namespace without the label: allowed, nothing added.
    let (status, body) = call_webhook(&c, &pod_review("plain")).await;
    assert_eq!(status, http::StatusCode::OK);
    assert_eq!(body["response"]["allowed"], true);
    assert!(body["response"]["patch"].is_null(), "{body}");

    // It stops with the control plane.
    let addr = c.cp.webhook_addr().unwrap();
    within("shutdown", c.cp.shutdown()).await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

fn copy_of(fake: &FakeKube, ns: &str) -> Option<String> {
    fake.get(Res::ConfigMaps, ns, "palisade-trust-bundle")
        .and_then(|cm| cm["data"]["ca.crt"].as_str().map(str::to_string))
}

#[tokio::test]
async fn the_trust_bundle_configmap_is_kept_in_every_namespace() {
    let (fake, ca, dir) = fake_cluster().await;
    for ns in [
        "demo",
        "other",
        "palisade-system",
        "kube-system",
        "kube-public",
    ] {
        fake.apply(Res::Namespaces, namespace(ns, json!({})));
    }
    let anchor = String::from_utf8(
        std::fs::read(
            dir.path()
                .join("ca")
                .join(palisade_certs::ca::ROOT_CERT_FILE),
        )
        .unwrap(),
    )
    .unwrap();
    // The copy install wrote is already right: left alone.
    fake.apply(
        Res::ConfigMaps,
        json!({ "metadata": { "name": "palisade-trust-bundle", "namespace": "palisade-system" },
                "data": { "ca.crt": anchor } }),
    );
    let c = Cluster {
        cp: replica(&fake).await,
        fake,
        ca,
        _dir: dir,
    };
    let has = |ns: &str| copy_of(&c.fake, ns).as_deref() == Some(anchor.as_str());
    wait_until("copies in demo and other", || has("demo") && has("other")).await;
    assert!(copy_of(&c.fake, "kube-system").is_none());
    assert!(copy_of(&c.fake, "kube-public").is_none());
    let written = |n: &str| {
        metric(
            c.cp.metrics(),
            &format!("palisade_kubernetes_trust_bundle_writes_total{{result=\"{n}\"}}"),
        )
    };
    assert_eq!(written("ok"), Some(2.0));
    assert!(
        !c.fake
            .applies()
            .contains(&"palisade-system/palisade-trust-bundle".to_string()),
        "a right copy is not rewritten: {:?}",
        c.fake.applies()
    );

    // A new namespace gets one within a second; an edited copy is put back; a deleted one too.
    let started = Instant::now();
    c.fake.apply(Res::Namespaces, namespace("later", json!({})));
    wait_until("a copy in the new namespace", || has("later")).await;
    assert!(
        started.elapsed() < PROPAGATION * 2,
        "{:?}",
        started.elapsed()
    );
    c.fake.apply(
        Res::ConfigMaps,
        json!({ "metadata": { "name": "palisade-trust-bundle", "namespace": "demo" },
                "data": { "ca.crt": "not the anchor" } }),
    );
    wait_until("the edited copy put back", || has("demo")).await;
    c.fake
        .delete(Res::ConfigMaps, "other", "palisade-trust-bundle");
    wait_until("the deleted copy put back", || has("other")).await;

    // Refused writes are counted, and the copy arrives once the API server accepts again.
    c.fake.refuse_writes(Some(403));
    c.fake
        .apply(Res::Namespaces, namespace("locked", json!({})));
    wait_until("a refused write counted", || written("error") >= Some(1.0)).await;
    assert!(copy_of(&c.fake, "locked").is_none());
    c.fake.refuse_writes(None);
    c.fake
        .apply(Res::Namespaces, namespace("unlocked", json!({})));
    wait_until("both copies written", || has("locked") && has("unlocked")).await;
}
