use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{Value, json};

use super::*;

fn labels(enabled: bool) -> BTreeMap<String, String> {
    if enabled {
        BTreeMap::from([(INJECT.to_string(), ENABLED.to_string())])
    } else {
        BTreeMap::new()
    }
}

fn pod_value(yaml: &str) -> Value {
    serde_saphyr::from_str(yaml).expect("test YAML")
}

/// Runs the injector on a pod (YAML) in namespace `ns`; returns the outcome and, when injected,
/// the pod with the patch applied (as JSON and as a typed Pod).
fn run(yaml: &str, ns: &str, ns_enabled: bool) -> (Outcome, Option<(Value, Pod)>) {
    run_with(yaml, ns, ns_enabled, &InjectConfig::default())
}

fn run_with(
    yaml: &str,
    ns: &str,
    ns_enabled: bool,
    cfg: &InjectConfig,
) -> (Outcome, Option<(Value, Pod)>) {
    let mut value = pod_value(yaml);
    let pod: Pod = serde_json::from_value(value.clone()).expect("a pod");
    let labels = labels(ns_enabled);
    let outcome = inject(
        &pod,
        &PodNamespace {
            name: ns,
            labels: &labels,
        },
        cfg,
    )
    .expect("no error");
    let patched = match &outcome {
        Outcome::Inject { patch, .. } => {
            json_patch::patch(&mut value, patch).expect("the patch applies");
            let typed: Pod = serde_json::from_value(value.clone()).expect("still a Pod");
            Some((value, typed))
        }
        Outcome::Skip { .. } => None,
    };
    (outcome, patched)
}

fn inject_err(yaml: &str) -> InjectError {
    let pod: Pod = serde_json::from_value(pod_value(yaml)).expect("a pod");
    let labels = labels(true);
    inject(
        &pod,
        &PodNamespace {
            name: "demo",
            labels: &labels,
        },
        &InjectConfig::default(),
    )
    .expect_err("an error")
}

fn skipped(outcome: &Outcome) -> Option<&SkipReason> {
    match outcome {
        Outcome::Skip { reason, .. } => Some(reason),
        Outcome::Inject { .. } => None,
    }
}

const POD: &str = "
apiVersion: v1
kind: Pod
metadata: { name: web, namespace: demo }
spec:
  containers:
    - name: web
      image: nginx
      ports: [ { containerPort: 8080 } ]
";

fn with_annotation(key: &str, value: &str) -> String {
    POD.replace(
        "metadata: { name: web, namespace: demo }",
        &format!("metadata: {{ name: web, namespace: demo, annotations: {{ {key}: {value:?} }} }}"),
    )
}

fn init_containers(pod: &Pod) -> &[Container] {
    pod.spec
        .as_ref()
        .and_then(|s| s.init_containers.as_deref())
        .unwrap_or_default()
}

fn proxy(pod: &Pod) -> &Container {
    init_containers(pod)
        .iter()
        .find(|c| c.name == PROXY_CONTAINER)
        .expect("the proxy")
}

fn init(pod: &Pod) -> &Container {
    init_containers(pod)
        .iter()
        .find(|c| c.name == INIT_CONTAINER)
        .expect("the init container")
}

fn env<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
    c.env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .and_then(|e| e.value.as_deref())
}

fn arg_after<'a>(c: &'a Container, flag: &str) -> Option<&'a str> {
    let args = c.args.as_deref().unwrap_or_default();
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

// --- who gets injected -------------------------------------------------------------------------

#[test]
fn the_namespace_label_or_the_pod_annotation_turns_injection_on() {
    let (o, patched) = run(POD, "demo", true);
    assert!(patched.is_some(), "namespace enabled: {o:?}");
    let (o, _) = run(POD, "demo", false);
    assert_eq!(skipped(&o), Some(&SkipReason::NotEnabled));
    let (o, patched) = run(&with_annotation(INJECT, ENABLED), "demo", false);
    assert!(patched.is_some(), "annotation enabled: {o:?}");
}

#[test]
fn the_pod_annotation_disabled_wins_over_the_namespace() {
    let (o, _) = run(&with_annotation(INJECT, DISABLED), "demo", true);
    assert_eq!(skipped(&o), Some(&SkipReason::Disabled));
}

#[test]
fn host_network_pods_and_system_namespaces_are_never_injected() {
    let host = POD.replace("spec:\n", "spec:\n  hostNetwork: true\n");
    let (o, _) = run(&host, "demo", true);
    assert_eq!(skipped(&o), Some(&SkipReason::HostNetwork));
    // Even when the pod asks: it is told why not.
    let asked = with_annotation(INJECT, ENABLED).replace("spec:\n", "spec:\n  hostNetwork: true\n");
    let (o, _) = run(&asked, "demo", true);
    assert_eq!(skipped(&o), Some(&SkipReason::HostNetwork));
    assert!(o.warnings()[0].contains("hostNetwork"), "{o:?}");

    for ns in [
        "kube-system",
        "palisade-system",
        "kube-public",
        "kube-node-lease",
    ] {
        let (o, _) = run(&with_annotation(INJECT, ENABLED), ns, true);
        assert_eq!(
            skipped(&o),
            Some(&SkipReason::IgnoredNamespace(ns.to_string())),
            "{ns}"
        );
        assert_eq!(o.warnings().len(), 1, "{o:?}");
    }
}

#[test]
fn injecting_an_injected_pod_changes_nothing() {
    let (_, patched) = run(POD, "demo", true);
    let (once, _) = patched.expect("injected");
    let again: Pod = serde_json::from_value(once.clone()).unwrap();
    let labels = labels(true);
    let o = inject(
        &again,
        &PodNamespace {
            name: "demo",
            labels: &labels,
        },
        &InjectConfig::default(),
    )
    .unwrap();
    assert_eq!(skipped(&o), Some(&SkipReason::AlreadyInjected));
    // Whatever the annotation says now.
    let mut disabled = once.clone();
    disabled["metadata"]["annotations"] = json!({ INJECT: "bogus" });
    let disabled: Pod = serde_json::from_value(disabled).unwrap();
    let o = inject(
        &disabled,
        &PodNamespace {
            name: "demo",
            labels: &labels,
        },
        &InjectConfig::default(),
    )
    .unwrap();
    assert_eq!(skipped(&o), Some(&SkipReason::AlreadyInjected));
}

#[test]
fn bad_annotations_are_errors_that_name_the_annotation() {
    let cases = [
        (INJECT, "true", "is neither enabled nor disabled"),
        (SKIP_INBOUND_PORTS, "80,http", "\"http\" is not a port"),
        (SKIP_OUTBOUND_PORTS, "9000-80", "ends before it starts"),
        (SKIP_OUTBOUND_PORTS, "70000", "not a port"),
        (APP_PORT, "0", "is not a port"),
        (PROXY_CPU_REQUEST, "lots", "is not a Kubernetes quantity"),
        (PROXY_MEMORY_LIMIT, "64MB", "is not a Kubernetes quantity"),
        (PROXY_LOG_LEVEL, " ", "is not a log filter"),
    ];
    for (key, value, problem) in cases {
        let e = inject_err(&with_annotation(key, value));
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!("annotation {key}: {value:?}")) && msg.contains(problem),
            "{key}={value}: {msg}"
        );
    }
    let no_spec = "apiVersion: v1\nkind: Pod\nmetadata: { name: x }\n";
    assert_eq!(inject_err(no_spec), InjectError::NoSpec);
    let conflict = POD.replace(
        "spec:\n",
        "spec:\n  volumes: [ { name: palisade-token, emptyDir: {} } ]\n",
    );
    assert_eq!(
        inject_err(&conflict),
        InjectError::VolumeConflict("palisade-token".to_string())
    );
}

#[test]
fn ports_and_quantities_parse_as_kubernetes_and_linkerd_write_them() {
    let r = |lo, hi| patch::PortRange { lo, hi };
    assert_eq!(
        parse_ports(" 25, 443,9000-9010 ,").unwrap(),
        vec![r(25, 25), r(443, 443), r(9000, 9010)]
    );
    assert_eq!(parse_ports("").unwrap(), vec![]);
    for bad in ["0", "-1", "a", "1-", "65536", "10-5", "1-2-3"] {
        assert!(parse_ports(bad).is_err(), "{bad:?} accepted");
    }
    for good in [
        "100m",
        "0.5",
        "1",
        "64Mi",
        "1Gi",
        "2G",
        "1e3",
        "1.5E-2",
        ".5",
        "128974848",
    ] {
        assert!(valid_quantity(good), "{good:?} refused");
    }
    for bad in ["", "m", "1.2.3", "-1", "64MB", "1 Gi", "1e", "10x", "Mi"] {
        assert!(!valid_quantity(bad), "{bad:?} accepted");
    }
}

// --- what an injected pod gets ------------------------------------------------------------------

#[test]
fn the_init_container_runs_first_then_the_proxy_as_a_native_sidecar() {
    let with_init = POD.replace(
        "spec:\n",
        "spec:\n  initContainers: [ { name: migrate, image: flyway } ]\n",
    );
    let (_, patched) = run(&with_init, "demo", true);
    let (_, pod) = patched.unwrap();
    let names: Vec<&str> = init_containers(&pod)
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(names, [INIT_CONTAINER, PROXY_CONTAINER, "migrate"]);

    // Without init containers the list is created.
    let (_, patched) = run(POD, "demo", true);
    let (_, pod) = patched.unwrap();
    let names: Vec<&str> = init_containers(&pod)
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(names, [INIT_CONTAINER, PROXY_CONTAINER]);

    let p = proxy(&pod);
    assert_eq!(p.restart_policy.as_deref(), Some("Always"));
    let startup = p.startup_probe.as_ref().expect("startup probe");
    let get = startup.http_get.as_ref().unwrap();
    assert_eq!(get.path.as_deref(), Some("/ready"));
    assert_eq!(get.port, IntOrString::Int(i32::from(ADMIN_PORT)));

    let i = init(&pod);
    let sc = i.security_context.as_ref().unwrap();
    assert_eq!(sc.run_as_user, Some(0));
    let caps = sc.capabilities.as_ref().unwrap();
    assert_eq!(
        caps.add.as_deref(),
        Some(&["NET_ADMIN".to_string(), "NET_RAW".to_string()][..])
    );
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    // The UID the init container excludes is the one the proxy runs as.
    let psc = p.security_context.as_ref().unwrap();
    assert_eq!(psc.run_as_user, Some(PROXY_UID));
    assert_eq!(psc.run_as_non_root, Some(true));
    // `palisade init`'s flags, exactly; no skip lists when nothing is skipped.
    assert_eq!(
        i.command.as_deref(),
        Some(&["palisade".to_string(), "init".to_string()][..])
    );
    assert_eq!(
        i.args.as_deref().unwrap_or_default(),
        [
            "--proxy-uid",
            "2102",
            "--inbound-port",
            "4143",
            "--outbound-port",
            "4140",
            "--admin-port",
            "4191",
        ]
    );
}

#[test]
fn the_proxy_gets_its_identity_token_and_trust_bundle_per_the_spec() {
    let cfg = InjectConfig {
        trust_domain: TrustDomain::new("example.org").unwrap(),
        control_plane: "10.96.0.10:8086".to_string(),
        ..InjectConfig::default()
    };
    let (_, patched) = run_with(POD, "demo", true, &cfg);
    let (_, pod) = patched.unwrap();
    let p = proxy(&pod);
    assert_eq!(
        env(p, "PALISADE_IDENTITY"),
        Some("spiffe://example.org/ns/$(POD_NAMESPACE)/sa/$(POD_SERVICE_ACCOUNT)")
    );
    // $(VAR) expands only from variables defined earlier in the list.
    let order: Vec<&str> = p.env.iter().flatten().map(|e| e.name.as_str()).collect();
    let at = |n: &str| order.iter().position(|x| *x == n).unwrap();
    assert!(at("POD_NAMESPACE") < at("PALISADE_IDENTITY"));
    assert!(at("POD_SERVICE_ACCOUNT") < at("PALISADE_IDENTITY"));
    let field = |n: &str| {
        p.env
            .iter()
            .flatten()
            .find(|e| e.name == n)
            .and_then(|e| e.value_from.as_ref())
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.clone())
    };
    assert_eq!(
        field("POD_NAMESPACE").as_deref(),
        Some("metadata.namespace")
    );
    assert_eq!(
        field("POD_SERVICE_ACCOUNT").as_deref(),
        Some("spec.serviceAccountName")
    );
    assert_eq!(field("PALISADE_WORKLOAD").as_deref(), Some("metadata.name"));
    assert_eq!(env(p, "PALISADE_CONTROL_PLANE"), Some("10.96.0.10:8086"));
    assert_eq!(env(p, "PALISADE_INBOUND_ADDR"), Some("0.0.0.0:4143"));
    assert_eq!(env(p, "PALISADE_ADMIN_ADDR"), Some("0.0.0.0:4191"));
    assert_eq!(env(p, "PALISADE_OUTBOUND_ADDR"), Some("127.0.0.1:4140"));
    assert_eq!(env(p, "PALISADE_APP_ADDR"), Some("127.0.0.1:8080"));

    // The files the env names are where the volumes are mounted.
    let spec = pod.spec.as_ref().unwrap();
    let mount = |vol: &str| {
        p.volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == vol)
            .map(|m| m.mount_path.clone())
            .unwrap()
    };
    let volume = |name: &str| {
        spec.volumes
            .iter()
            .flatten()
            .find(|v| v.name == name)
            .unwrap()
            .clone()
    };
    let token = volume(TOKEN_VOLUME);
    let projection = token.projected.unwrap().sources.unwrap()[0]
        .service_account_token
        .clone()
        .unwrap();
    assert_eq!(projection.audience.as_deref(), Some("palisade"));
    assert_eq!(projection.expiration_seconds, Some(3600));
    assert_eq!(
        env(p, "PALISADE_TOKEN_FILE").unwrap(),
        format!("{}/{}", mount(TOKEN_VOLUME), projection.path)
    );
    let bundle = volume(TRUST_BUNDLE_VOLUME).config_map.unwrap();
    assert_eq!(bundle.name, "palisade-trust-bundle");
    let item = &bundle.items.unwrap()[0];
    assert_eq!(item.key, "ca.crt");
    assert_eq!(
        env(p, "PALISADE_TRUST_BUNDLE").unwrap(),
        format!("{}/{}", mount(TRUST_BUNDLE_VOLUME), item.path)
    );
    // The app containers are untouched.
    assert_eq!(spec.containers.len(), 1);
    assert!(spec.containers[0].env.is_none());
}

#[test]
fn the_patch_only_adds_so_fields_unknown_to_the_types_survive() {
    let mut raw = pod_value(POD);
    raw["spec"]["futureField"] = json!({ "x": 1 });
    raw["spec"]["containers"][0]["futureContainerField"] = json!(true);
    raw["spec"]["volumes"] = json!([{ "name": "data", "emptyDir": {}, "futureVolumeField": 2 }]);
    let pod: Pod = serde_json::from_value(raw.clone()).unwrap();
    let labels = labels(true);
    let Outcome::Inject { patch, .. } = inject(
        &pod,
        &PodNamespace {
            name: "demo",
            labels: &labels,
        },
        &InjectConfig::default(),
    )
    .unwrap() else {
        panic!("not injected")
    };
    assert!(
        patch
            .0
            .iter()
            .all(|op| matches!(op, json_patch::PatchOperation::Add(_)))
    );
    json_patch::patch(&mut raw, &patch).unwrap();
    assert_eq!(raw["spec"]["futureField"], json!({ "x": 1 }));
    assert_eq!(
        raw["spec"]["containers"][0]["futureContainerField"],
        json!(true)
    );
    assert_eq!(raw["spec"]["volumes"][0]["futureVolumeField"], json!(2));
    let names: Vec<&str> = raw["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(
        names,
        ["data", TOKEN_VOLUME, TRUST_BUNDLE_VOLUME, XTABLES_VOLUME]
    );
}

#[test]
fn resource_and_log_annotations_configure_the_proxy() {
    let yaml = POD.replace(
        "metadata: { name: web, namespace: demo }",
        "metadata:\n  name: web\n  annotations:\n    palisade.dev/proxy-cpu-request: 50m\n    palisade.dev/proxy-cpu-limit: '1'\n    palisade.dev/proxy-memory-limit: 128Mi\n    palisade.dev/proxy-log-level: debug",
    );
    let (_, patched) = run(&yaml, "demo", true);
    let (_, pod) = patched.unwrap();
    let p = proxy(&pod);
    let res = p.resources.as_ref().unwrap();
    let q =
        |m: &Option<BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>>,
         k: &str| m.as_ref().and_then(|m| m.get(k)).map(|q| q.0.clone());
    assert_eq!(q(&res.requests, "cpu").as_deref(), Some("50m"));
    assert_eq!(
        q(&res.requests, "memory").as_deref(),
        Some("20Mi"),
        "the default stays"
    );
    assert_eq!(q(&res.limits, "cpu").as_deref(), Some("1"));
    assert_eq!(q(&res.limits, "memory").as_deref(), Some("128Mi"));
    assert_eq!(env(p, "PALISADE_LOG"), Some("debug"));
    // Without annotations: the defaults, no limits, no log variable.
    let (_, patched) = run(POD, "demo", true);
    let (_, pod) = patched.unwrap();
    let p = proxy(&pod);
    assert!(p.resources.as_ref().unwrap().limits.is_none());
    assert_eq!(env(p, "PALISADE_LOG"), None);
}

// --- ports: skipped, probed, served ---------------------------------------------------------------

const PROBED: &str = "
apiVersion: v1
kind: Pod
metadata:
  name: api
  annotations:
    palisade.dev/skip-inbound-ports: '9000-9010, 7000'
    palisade.dev/skip-outbound-ports: '5432,6379'
spec:
  containers:
    - name: api
      image: api
      ports:
        - { name: http, containerPort: 8080 }
        - { name: health, containerPort: 8081 }
        - { name: metrics, containerPort: 9001 }
      livenessProbe: { httpGet: { path: /live, port: health } }
      readinessProbe: { tcpSocket: { port: 8081 } }
    - name: grpc
      image: grpc
      startupProbe: { grpc: { port: 50051 } }
      livenessProbe: { httpGet: { port: 8090, host: example.com } }
      readinessProbe: { httpGet: { port: nope } }
";

#[test]
fn probe_ports_and_skip_annotations_reach_the_init_container() {
    let (o, patched) = run(PROBED, "demo", true);
    let (_, pod) = patched.unwrap();
    let i = init(&pod);
    // The annotation's, then the ports of probes the proxy cannot run (gRPC) not already
    // skipped (the admin port is `--admin-port`'s); HTTP and TCP probes go through the admin
    // port; the probe on another host is not this pod's, the unknown named port only warns.
    assert_eq!(arg_after(i, "--admin-port"), Some("4191"));
    assert_eq!(
        arg_after(i, "--skip-inbound-ports"),
        Some("9000-9010,7000,50051")
    );
    assert_eq!(arg_after(i, "--skip-outbound-ports"), Some("5432,6379"));
    let w = o.warnings().join("\n");
    assert!(w.contains("names port \"nope\""), "{w}");
    assert!(w.contains("probe port 50051 bypasses the proxy"), "{w}");
    // The one serving port left: 8080 (8081 is probes only, 9001 is skipped).
    assert_eq!(
        env(proxy(&pod), "PALISADE_APP_ADDR"),
        Some("127.0.0.1:8080")
    );
    assert!(!w.contains("forwards inbound"), "{w}");
}

#[test]
fn the_app_port_is_the_declared_one_or_the_annotations() {
    let two = POD.replace(
        "ports: [ { containerPort: 8080 } ]",
        "ports: [ { containerPort: 8080 }, { containerPort: 9090 }, { containerPort: 53, protocol: UDP } ]",
    );
    let (o, patched) = run(&two, "demo", true);
    let (_, pod) = patched.unwrap();
    assert_eq!(
        env(proxy(&pod), "PALISADE_APP_ADDR"),
        Some("127.0.0.1:8080")
    );
    assert!(
        o.warnings()[0].contains("declares ports 8080, 9090"),
        "{o:?}"
    );
    let chosen = two.replace(
        "metadata: { name: web, namespace: demo }",
        "metadata: { name: web, annotations: { palisade.dev/app-port: '9090' } }",
    );
    let (o, patched) = run(&chosen, "demo", true);
    let (_, pod) = patched.unwrap();
    assert_eq!(
        env(proxy(&pod), "PALISADE_APP_ADDR"),
        Some("127.0.0.1:9090")
    );
    assert!(o.warnings().is_empty(), "{o:?}");
    // No port: the workload only calls out.
    let none = POD.replace("      ports: [ { containerPort: 8080 } ]\n", "");
    let (_, patched) = run(&none, "demo", true);
    let (_, pod) = patched.unwrap();
    assert_eq!(env(proxy(&pod), "PALISADE_APP_ADDR"), None);
}

/// Whether `palisade init`, given the injected container's arguments, leaves inbound TCP to
/// `port` alone (its rules: the admin port and `--skip-inbound-ports` RETURN, all other TCP is
/// redirected to the inbound port).
fn inbound_redirected(init: &Container, port: u16) -> bool {
    let admin: u16 = arg_after(init, "--admin-port")
        .expect("--admin-port")
        .parse()
        .unwrap();
    let skipped = arg_after(init, "--skip-inbound-ports")
        .map(|v| parse_ports(v).expect("palisade init parses it"))
        .unwrap_or_default();
    port != admin && !skipped.iter().any(|r| (r.lo..=r.hi).contains(&port))
}

/// The app's probes as the proxy receives them.
fn app_probes(pod: &Pod) -> palisade_api::app_probe::AppProbes {
    palisade_api::app_probe::parse(env(proxy(pod), "PALISADE_APP_PROBES").unwrap_or_default())
        .expect("the proxy parses what the injector writes")
}

fn probe_target(probe: &Option<k8s_openapi::api::core::v1::Probe>) -> (IntOrString, String) {
    let get = probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .expect("an HTTP probe");
    (get.port.clone(), get.path.clone().unwrap_or_default())
}

#[test]
fn kubelet_probes_work_under_strict_mtls_through_the_admin_port_or_by_exemption() {
    // Every kind of kubelet probe, by port number and by name, on a health port and on the
    // serving port; and the proxy's own probes.
    let pod = "
apiVersion: v1
kind: Pod
metadata: { name: api }
spec:
  initContainers:
    - name: log-shipper
      image: shipper
      restartPolicy: Always
      livenessProbe: { tcpSocket: { port: 7070 } }
  containers:
    - name: api
      image: api
      ports:
        - { name: http, containerPort: 8080 }
        - { name: health, containerPort: 8081 }
        - { name: grpc, containerPort: 9090 }
      livenessProbe: { httpGet: { path: /live, port: health, httpHeaders: [ { name: X-Probe, value: k } ] }, periodSeconds: 7, timeoutSeconds: 3 }
      readinessProbe: { httpGet: { path: /ready?deep=1, port: 8082, scheme: HTTP } }
      startupProbe: { tcpSocket: { port: 8083 }, failureThreshold: 30 }
    - name: side
      image: side
      livenessProbe: { grpc: { port: 50051 } }
      readinessProbe: { httpGet: { path: /ready, port: 8443, scheme: HTTPS } }
      startupProbe: { exec: { command: [ 'true' ] } }
";
    let (o, patched) = run(pod, "demo", true);
    let (_, pod) = patched.unwrap();
    let i = init(&pod);
    let spec = pod.spec.as_ref().unwrap();
    let api = &spec.containers[0];
    let admin = IntOrString::Int(i32::from(ADMIN_PORT));
    // HTTP and TCP probes now ask the proxy's admin port, which is never redirected, and keep
    // their timing.
    assert_eq!(
        probe_target(&api.liveness_probe),
        (admin.clone(), "/app-health/api/livez".into())
    );
    assert_eq!(api.liveness_probe.as_ref().unwrap().period_seconds, Some(7));
    assert_eq!(
        probe_target(&api.readiness_probe),
        (admin.clone(), "/app-health/api/readyz".into())
    );
    assert_eq!(
        probe_target(&api.startup_probe),
        (admin.clone(), "/app-health/api/startupz".into())
    );
    assert_eq!(
        api.startup_probe.as_ref().unwrap().failure_threshold,
        Some(30)
    );
    assert!(api.startup_probe.as_ref().unwrap().tcp_socket.is_none());
    let shipper = init_containers(&pod)
        .iter()
        .find(|c| c.name == "log-shipper")
        .unwrap();
    assert_eq!(
        probe_target(&shipper.liveness_probe),
        (admin.clone(), "/app-health/log-shipper/livez".into())
    );
    assert!(!inbound_redirected(i, ADMIN_PORT));
    // The proxy gets the originals.
    let probes = app_probes(&pod);
    let live = &probes["/app-health/api/livez"];
    let get = live.http_get.as_ref().unwrap();
    assert_eq!((get.port, get.path.as_str()), (8081, "/live"));
    assert_eq!(get.http_headers[0].name, "X-Probe");
    assert_eq!(live.timeout_seconds, 3);
    let ready = probes["/app-health/api/readyz"].http_get.as_ref().unwrap();
    assert_eq!((ready.port, ready.path.as_str()), (8082, "/ready?deep=1"));
    assert_eq!(
        probes["/app-health/api/startupz"]
            .tcp_socket
            .as_ref()
            .unwrap()
            .port,
        8083
    );
    assert_eq!(
        probes["/app-health/log-shipper/livez"]
            .tcp_socket
            .as_ref()
            .unwrap()
            .port,
        7070
    );
    assert_eq!(probes.len(), 4);
    // So those ports stay in the mesh, the serving port with them.
    for meshed in [8080, 8081, 8082, 8083, 7070, 9090, 443] {
        assert!(inbound_redirected(i, meshed), "port {meshed}");
    }
    // gRPC and HTTPS probes are left as they are, and their ports exempted, with a warning
    // saying what that costs.
    let side = &spec.containers[1];
    assert!(side.liveness_probe.as_ref().unwrap().grpc.is_some());
    assert_eq!(
        probe_target(&side.readiness_probe),
        (IntOrString::Int(8443), "/ready".into())
    );
    assert!(side.startup_probe.as_ref().unwrap().exec.is_some());
    for exempt in [50051, 8443] {
        assert!(!inbound_redirected(i, exempt), "port {exempt}");
    }
    let w = o.warnings().join("\n");
    assert!(
        w.contains("probe ports 50051, 8443 bypass the proxy"),
        "{w}"
    );
    assert!(w.contains("unauthenticated"), "{w}");

    // The proxy's own probes are on the admin port.
    let p = proxy(&pod);
    for probe in [&p.startup_probe, &p.readiness_probe, &p.liveness_probe] {
        assert_eq!(probe_target(probe).0, admin);
    }
    // The proxy's inbound mTLS goes to the one port that is served and not only probed.
    assert_eq!(
        env(proxy(&pod), "PALISADE_APP_ADDR"),
        Some("127.0.0.1:8080")
    );

    // A probe on the serving port keeps that port in the mesh.
    let on_serving = "
apiVersion: v1
kind: Pod
metadata: { name: web }
spec:
  containers:
    - name: web
      image: web
      ports: [ { name: http, containerPort: 8080 } ]
      readinessProbe: { httpGet: { path: /healthz, port: http } }
";
    let (o, patched) = run(on_serving, "demo", true);
    let (_, pod) = patched.unwrap();
    assert!(inbound_redirected(init(&pod), 8080));
    assert!(o.warnings().is_empty(), "{:?}", o.warnings());
    assert_eq!(
        env(proxy(&pod), "PALISADE_APP_ADDR"),
        Some("127.0.0.1:8080")
    );
}
