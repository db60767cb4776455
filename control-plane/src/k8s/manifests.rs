//! What `palisade install` prints: everything a cluster needs to run Palisade, as YAML that
//! `kubectl apply -f -` takes.
//!
//! Two parts. The static documents ([`static_documents`]) are the same for every install of a
//! version (namespace, CRDs, RBAC, the control plane's Service, Deployment and
//! PodDisruptionBudget): `deploy/kubernetes/palisade.yaml` is exactly [`render_static`] with
//! the default image (`palisade install --no-identity`). The identity documents
//! ([`identity_documents`]) carry the mesh CA, which differs per install: the Secret
//! `palisade-identity`, the ConfigMap `palisade-trust-bundle` and the
//! MutatingWebhookConfiguration, whose `caBundle` is the trust anchor. For a given CA they are
//! the same every time, so `palisade install --ca DIR` is reproducible:
//! `deploy/kubernetes/example/identity.yaml` is [`render_identity`] for an example CA whose
//! keys are public, and the root crate's `tests/install.rs` keeps both files byte-identical
//! to `palisade install`'s output.
//!
//! The names and keys other parts of Palisade rely on are the constants below.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MatchCondition, MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations,
    ServiceReference, WebhookClientConfig,
};
use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMap, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    HTTPGetAction, Namespace, PodAffinityTerm, PodAntiAffinity, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, Secret, SecurityContext, Service,
    ServiceAccount, ServicePort, ServiceSpec, Volume, VolumeMount, WeightedPodAffinityTerm,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use palisade_certs::Ca;
use serde_json::Value;

/// The control plane's namespace.
pub const NAMESPACE: &str = crate::CONTROL_PLANE_NAMESPACE;
/// The control plane's ServiceAccount: with [`NAMESPACE`], the SPIFFE ID
/// `spiffe://<td>/ns/palisade-system/sa/control-plane` its proxies expect ([`crate::control_plane_id`]).
pub const SERVICE_ACCOUNT: &str = crate::CONTROL_PLANE_SERVICE_ACCOUNT;
/// The Deployment, Service, PodDisruptionBudget, ClusterRole(Binding) and Role(Binding).
pub const NAME: &str = "palisade-control-plane";

/// The Secret with the mesh CA (type `kubernetes.io/tls`, cert-manager's layout).
pub const IDENTITY_SECRET: &str = "palisade-identity";
/// Key of [`IDENTITY_SECRET`]: the trust anchor (root) certificate, PEM.
pub const TRUST_ANCHOR_KEY: &str = "ca.crt";
/// Key of [`IDENTITY_SECRET`]: the issuer (intermediate) certificate, PEM.
pub const ISSUER_CERT_KEY: &str = "tls.crt";
/// Key of [`IDENTITY_SECRET`]: the issuer's private key, PKCS#8 PEM.
pub const ISSUER_KEY_KEY: &str = "tls.key";
/// The ConfigMap with the trust anchor alone (no key): what an injected proxy trusts
/// (`PALISADE_TRUST_BUNDLE`, a volume of this ConfigMap).
///
/// A pod's ConfigMap volume can only name a ConfigMap of its own namespace, so this one must
/// exist in every namespace that has injected pods. `palisade install` writes it in
/// [`NAMESPACE`]; the control plane keeps a copy of it (same name, same data) in every other
/// namespace except `kube-system`, `kube-public` and `kube-node-lease` (which are never
/// injected): created when the namespace appears, patched back when it differs. That is what
/// [`cluster_role`] grants on ConfigMaps, and docs/kubernetes.md ("Install") says so.
pub const TRUST_BUNDLE_CONFIG_MAP: &str = "palisade-trust-bundle";
/// Key of [`TRUST_BUNDLE_CONFIG_MAP`]: the trust anchor, PEM.
pub const TRUST_BUNDLE_KEY: &str = "ca.crt";

/// The MutatingWebhookConfiguration of the sidecar injector.
pub const WEBHOOK_CONFIGURATION: &str = "palisade-injector";
/// The webhook for pods of namespaces labelled `palisade.dev/inject=enabled`.
pub const NAMESPACE_WEBHOOK: &str = "namespace.inject.palisade.dev";
/// The webhook for pods annotated `palisade.dev/inject` (`enabled`, or a typo to refuse) in
/// other namespaces.
pub const POD_WEBHOOK: &str = "pod.inject.palisade.dev";
/// The injector's HTTPS path on the control plane.
pub const WEBHOOK_PATH: &str = "/inject";
/// The name the API server checks the webhook's serving certificate for (the Service's): the
/// control plane issues itself a short-lived certificate for it from the issuer in
/// [`IDENTITY_SECRET`] and renews it, and the API server verifies it with the `caBundle`, the
/// trust anchor. No serving certificate is installed: none could outlive the 90 days the CA
/// allows a leaf, and with `failurePolicy: Fail` an expired one would refuse every pod.
pub const WEBHOOK_DNS_NAME: &str = "palisade-control-plane.palisade-system.svc";
/// The namespace label and pod annotation (and, as an opt-out, pod label) of injection.
pub const INJECT_KEY: &str = "palisade.dev/inject";

/// gRPC (identity + discovery): container port and Service port.
pub const GRPC_PORT: u16 = 8086;
/// The injector webhook's container port (Service port 443).
pub const WEBHOOK_PORT: u16 = 8443;
/// `/metrics`, `/ready`, `/live` of the control plane (the probes).
pub const METRICS_PORT: u16 = 9990;

/// The image `palisade install` uses without `--image`: `palisade:<this version>`, a local
/// name (no registry publishes Palisade's image yet): build it and load it into the cluster's
/// nodes, or push your own and pass `--image` (docs/kubernetes.md).
pub const DEFAULT_IMAGE: &str = concat!("palisade:", env!("CARGO_PKG_VERSION"));

/// The command line the Deployment runs: the injector adds containers of the control plane's
/// own image (it holds both binaries).
pub fn control_plane_args(image: &str) -> Vec<String> {
    let mut args: Vec<String> = [
        "control-plane",
        "--source",
        "kubernetes",
        "--namespace",
        NAMESPACE,
        "--listen",
        &format!("0.0.0.0:{GRPC_PORT}"),
        "--webhook-listen",
        &format!("0.0.0.0:{WEBHOOK_PORT}"),
        "--metrics",
        &format!("0.0.0.0:{METRICS_PORT}"),
    ]
    .map(String::from)
    .to_vec();
    args.extend(["--proxy-image".to_string(), image.to_string()]);
    args
}

/// What varies between installs of one version.
#[derive(Clone, Debug)]
pub struct InstallOptions {
    /// The control plane's image.
    pub image: String,
}

impl Default for InstallOptions {
    fn default() -> Self {
        Self {
            image: DEFAULT_IMAGE.to_string(),
        }
    }
}

/// Why the manifests could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot encode a Kubernetes document: {0}")]
    Json(#[from] serde_json::Error),
    #[error("cannot write YAML: {0}")]
    Yaml(#[from] serde_saphyr::ser::Error),
}

fn labels(component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), NAME.to_string()),
        (
            "app.kubernetes.io/part-of".to_string(),
            "palisade".to_string(),
        ),
        (
            "app.kubernetes.io/component".to_string(),
            component.to_string(),
        ),
    ])
}

fn selector_labels() -> BTreeMap<String, String> {
    BTreeMap::from([("app.kubernetes.io/name".to_string(), NAME.to_string())])
}

fn meta(name: &str, namespace: Option<&str>, component: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: namespace.map(str::to_string),
        labels: Some(labels(component)),
        ..Default::default()
    }
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn rule(group: &str, resources: &[&str], verbs: &[&str]) -> PolicyRule {
    PolicyRule {
        api_groups: Some(strings(&[group])),
        resources: Some(strings(resources)),
        verbs: strings(verbs),
        ..Default::default()
    }
}

const READ: &[&str] = &["get", "list", "watch"];

/// The cluster-wide rights of the control plane, each for something it does; nothing else:
///
/// - read what the model is built from: pods, services, EndpointSlices, the `palisade.dev`
///   kinds (policies, HTTPFaults, RateLimitPolicies, EgressPolicies), Istio's policies when
///   their CRDs are installed, Gateway API routes;
/// - read namespaces: the injector decides on a namespace's `palisade.dev/inject` label, from a
///   watch of all namespaces (and the trust bundle copies below follow namespaces);
/// - `create` TokenReviews: a proxy's ServiceAccount token is its proof of identity;
/// - `create` and `patch` events.k8s.io Events: a refused policy gets a `Warning` Event (kube's
///   event recorder creates an Event, then patches its series count);
/// - `patch` the `status` of the `palisade.dev` kinds (condition `Accepted`);
/// - keep the ConfigMap `palisade-trust-bundle` in every namespace (see
///   [`TRUST_BUNDLE_CONFIG_MAP`]): `create` (which no `resourceNames` can narrow), and list, watch and
///   `patch` only ConfigMaps of that name. A list or watch must then name it with the field
///   selector `metadata.name=palisade-trust-bundle`, the only way the API server lets
///   `resourceNames` apply to them.
///
/// Secrets are not in it: the Role [`identity_role`] gives one, in the control plane's own
/// namespace.
pub fn cluster_role() -> ClusterRole {
    let mut trust_bundle = rule("", &["configmaps"], &["list", "watch", "patch"]);
    trust_bundle.resource_names = Some(strings(&[TRUST_BUNDLE_CONFIG_MAP]));
    ClusterRole {
        metadata: meta(NAME, None, "control-plane"),
        rules: Some(vec![
            rule("", &["pods", "services", "namespaces"], READ),
            rule("discovery.k8s.io", &["endpointslices"], READ),
            rule(
                crate::k8s::crd::GROUP,
                &[
                    "authorizationpolicies",
                    "peerauthentications",
                    "httpfaults",
                    "ratelimitpolicies",
                    "egresspolicies",
                ],
                READ,
            ),
            rule(
                crate::k8s::crd::GROUP,
                &[
                    "authorizationpolicies/status",
                    "peerauthentications/status",
                    "httpfaults/status",
                    "ratelimitpolicies/status",
                    "egresspolicies/status",
                ],
                &["patch"],
            ),
            rule(
                "security.istio.io",
                &["authorizationpolicies", "peerauthentications"],
                READ,
            ),
            rule(
                "gateway.networking.k8s.io",
                &["httproutes", "grpcroutes"],
                READ,
            ),
            rule("authentication.k8s.io", &["tokenreviews"], &["create"]),
            rule("events.k8s.io", &["events"], &["create", "patch"]),
            rule("", &["configmaps"], &["create"]),
            trust_bundle,
        ]),
        ..Default::default()
    }
}

/// In its own namespace, the control plane reads one Secret, once at start: the mesh CA.
pub fn identity_role() -> Role {
    Role {
        metadata: meta(NAME, Some(NAMESPACE), "control-plane"),
        rules: Some(vec![PolicyRule {
            api_groups: Some(strings(&[""])),
            resources: Some(strings(&["secrets"])),
            resource_names: Some(strings(&[IDENTITY_SECRET])),
            verbs: strings(&["get"]),
            ..Default::default()
        }]),
    }
}

fn subjects() -> Option<Vec<Subject>> {
    Some(vec![Subject {
        kind: "ServiceAccount".into(),
        name: SERVICE_ACCOUNT.into(),
        namespace: Some(NAMESPACE.into()),
        ..Default::default()
    }])
}

fn quantity(q: &str) -> Quantity {
    Quantity(q.to_string())
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::String("metrics".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Default::default()
    }
}

fn container_port(name: &str, port: u16) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_string()),
        container_port: i32::from(port),
        protocol: Some("TCP".into()),
        ..Default::default()
    }
}

/// The control plane: two replicas, both serving (gRPC and the webhook), spread over nodes.
pub fn deployment(opts: &InstallOptions) -> Deployment {
    let uid = 65532;
    let container = Container {
        name: "control-plane".into(),
        image: Some(opts.image.clone()),
        image_pull_policy: Some("IfNotPresent".into()),
        command: Some(strings(&["palisade"])),
        args: Some(control_plane_args(&opts.image)),
        env: Some(vec![EnvVar {
            name: "PALISADE_LOG_FORMAT".into(),
            value: Some("json".into()),
            ..Default::default()
        }]),
        ports: Some(vec![
            container_port("grpc", GRPC_PORT),
            container_port("webhook", WEBHOOK_PORT),
            container_port("metrics", METRICS_PORT),
        ]),
        // The control plane serves its probes once it has listed the cluster, which may take
        // up to `--sync-timeout` (60 s): the startup probe gives it two minutes before the
        // liveness probe starts counting.
        startup_probe: Some(http_probe("/live", 5, 24)),
        readiness_probe: Some(http_probe("/ready", 5, 3)),
        liveness_probe: Some(http_probe("/live", 10, 3)),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_string(), quantity("100m")),
                ("memory".to_string(), quantity("128Mi")),
            ])),
            limits: Some(BTreeMap::from([("memory".to_string(), quantity("512Mi"))])),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            run_as_user: Some(uid),
            run_as_group: Some(uid),
            capabilities: Some(Capabilities {
                drop: Some(strings(&["ALL"])),
                ..Default::default()
            }),
            ..Default::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: "tmp".into(),
            mount_path: "/tmp".into(),
            ..Default::default()
        }]),
        ..Default::default()
    };
    let pod = PodSpec {
        service_account_name: Some(SERVICE_ACCOUNT.into()),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(uid),
            run_as_group: Some(uid),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        containers: vec![container],
        volumes: Some(vec![Volume {
            name: "tmp".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        }]),
        affinity: Some(Affinity {
            pod_anti_affinity: Some(PodAntiAffinity {
                preferred_during_scheduling_ignored_during_execution: Some(vec![
                    WeightedPodAffinityTerm {
                        weight: 100,
                        pod_affinity_term: PodAffinityTerm {
                            label_selector: Some(LabelSelector {
                                match_labels: Some(selector_labels()),
                                ..Default::default()
                            }),
                            topology_key: "kubernetes.io/hostname".into(),
                            ..Default::default()
                        },
                    },
                ]),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut template_meta = ObjectMeta {
        labels: Some(labels("control-plane")),
        ..Default::default()
    };
    template_meta.annotations = Some(BTreeMap::from([
        ("prometheus.io/scrape".to_string(), "true".to_string()),
        ("prometheus.io/port".to_string(), METRICS_PORT.to_string()),
        ("prometheus.io/path".to_string(), "/metrics".to_string()),
    ]));
    Deployment {
        metadata: meta(NAME, Some(NAMESPACE), "control-plane"),
        spec: DeploymentSpec {
            replicas: Some(2),
            selector: LabelSelector {
                match_labels: Some(selector_labels()),
                ..Default::default()
            },
            // Never fewer than two serving during a rollout.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(template_meta),
                spec: Some(pod),
            },
            ..Default::default()
        },
        ..Default::default()
    }
}

/// Every document of an install that is the same for every install of this version.
pub fn static_documents(opts: &InstallOptions) -> Result<Vec<Value>, ManifestError> {
    let mut ns_meta = meta(NAMESPACE, None, "control-plane");
    let ns_labels = ns_meta.labels.get_or_insert_with(BTreeMap::new);
    // The control plane's own pods are never injected (the webhook skips this namespace
    // anyway); the label says so to whoever reads the namespace.
    ns_labels.insert(INJECT_KEY.into(), "disabled".into());
    // Nothing here needs more than the `restricted` Pod Security level: the API server
    // refuses any pod in this namespace that would.
    ns_labels.insert(
        "pod-security.kubernetes.io/enforce".into(),
        "restricted".into(),
    );
    let mut docs = vec![serde_json::to_value(Namespace {
        metadata: ns_meta,
        ..Default::default()
    })?];
    for crd in crate::k8s::crd::crds() {
        docs.push(serde_json::to_value(crd)?);
    }
    docs.push(serde_json::to_value(ServiceAccount {
        metadata: meta(SERVICE_ACCOUNT, Some(NAMESPACE), "control-plane"),
        ..Default::default()
    })?);
    docs.push(serde_json::to_value(cluster_role())?);
    let role_ref = |kind: &str| RoleRef {
        api_group: Some("rbac.authorization.k8s.io".into()),
        kind: kind.into(),
        name: NAME.into(),
    };
    docs.push(serde_json::to_value(ClusterRoleBinding {
        metadata: meta(NAME, None, "control-plane"),
        role_ref: role_ref("ClusterRole"),
        subjects: subjects(),
    })?);
    docs.push(serde_json::to_value(identity_role())?);
    docs.push(serde_json::to_value(RoleBinding {
        metadata: meta(NAME, Some(NAMESPACE), "control-plane"),
        role_ref: role_ref("Role"),
        subjects: subjects(),
    })?);
    docs.push(serde_json::to_value(Service {
        metadata: meta(NAME, Some(NAMESPACE), "control-plane"),
        spec: Some(ServiceSpec {
            selector: Some(selector_labels()),
            ports: Some(vec![
                ServicePort {
                    name: Some("grpc".into()),
                    port: i32::from(GRPC_PORT),
                    target_port: Some(IntOrString::String("grpc".into())),
                    app_protocol: Some("grpc".into()),
                    protocol: Some("TCP".into()),
                    ..Default::default()
                },
                ServicePort {
                    name: Some("webhook".into()),
                    port: 443,
                    target_port: Some(IntOrString::String("webhook".into())),
                    app_protocol: Some("https".into()),
                    protocol: Some("TCP".into()),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        }),
        ..Default::default()
    })?);
    docs.push(serde_json::to_value(deployment(opts))?);
    docs.push(serde_json::to_value(PodDisruptionBudget {
        metadata: meta(NAME, Some(NAMESPACE), "control-plane"),
        spec: Some(PodDisruptionBudgetSpec {
            min_available: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    })?);
    Ok(docs)
}

fn requirement(key: &str, operator: &str, values: &[&str]) -> LabelSelectorRequirement {
    LabelSelectorRequirement {
        key: key.into(),
        operator: operator.into(),
        values: Some(strings(values)),
    }
}

fn match_condition(name: &str, expression: &str) -> MatchCondition {
    MatchCondition {
        name: name.into(),
        expression: expression.into(),
    }
}

/// The namespaces whose pods the API server never sends to the injector (which would leave
/// them alone anyway): the cluster's own, and the control plane's, so that the control plane
/// can always start, whatever state the webhook is in.
pub const NEVER_INJECTED: [&str; 4] = ["kube-system", "kube-public", "kube-node-lease", NAMESPACE];

/// CEL, on the pod being created: not on the host's network (never injected).
pub const NOT_HOST_NETWORK: &str = "!(has(object.spec.hostNetwork) && object.spec.hostNetwork)";
/// CEL: the pod has a `palisade.dev/inject` annotation, and it is not `disabled`: `enabled`,
/// or a value the injector refuses the pod for (a typo must not leave a pod out of the mesh
/// unnoticed).
pub const ANNOTATED_NOT_DISABLED: &str = "has(object.metadata.annotations) && 'palisade.dev/inject' in object.metadata.annotations && object.metadata.annotations['palisade.dev/inject'] != 'disabled'";
/// CEL: the pod's `palisade.dev/inject` annotation is not `disabled`.
pub const NOT_ANNOTATED_DISABLED: &str = "!has(object.metadata.annotations) || !('palisade.dev/inject' in object.metadata.annotations) || object.metadata.annotations['palisade.dev/inject'] != 'disabled'";

/// The injector's webhooks. Both send pod CREATEs to the control plane's `/inject`, which
/// applies the injection rules itself; the selectors and match conditions only keep away
/// the pods it would leave alone, so that a control plane outage cannot block them:
///
/// - namespace webhook: pods in namespaces labelled `palisade.dev/inject=enabled`, except
///   those annotated `disabled` (the pod wins) or on the host network;
/// - pod webhook: pods in the other namespaces that have the annotation `palisade.dev/inject`
///   with a value other than `disabled` (the injector injects `enabled`, refuses the rest).
///
/// Never the namespaces of [`NEVER_INJECTED`]; never a pod labelled
/// `palisade.dev/inject: disabled`. `failurePolicy: Fail`: a pod that asked for the mesh is
/// refused, not started without its sidecar, while the injector cannot be reached (zero
/// trust), and the control plane runs two replicas behind a PodDisruptionBudget.
/// `sideEffects: None`: the webhook only answers with a patch.
pub fn webhook_configuration(trust_anchor_pem: &str) -> MutatingWebhookConfiguration {
    let webhook =
        |name: &str, ns_operator: &str, conditions: Vec<MatchCondition>| MutatingWebhook {
            name: name.into(),
            admission_review_versions: strings(&["v1"]),
            client_config: WebhookClientConfig {
                service: Some(ServiceReference {
                    name: NAME.into(),
                    namespace: NAMESPACE.into(),
                    path: Some(WEBHOOK_PATH.into()),
                    port: Some(443),
                }),
                ca_bundle: Some(ByteString(trust_anchor_pem.as_bytes().to_vec())),
                ..Default::default()
            },
            rules: Some(vec![RuleWithOperations {
                operations: Some(strings(&["CREATE"])),
                api_groups: Some(strings(&[""])),
                api_versions: Some(strings(&["v1"])),
                resources: Some(strings(&["pods"])),
                scope: Some("Namespaced".into()),
            }]),
            namespace_selector: Some(LabelSelector {
                match_expressions: Some(vec![
                    requirement("kubernetes.io/metadata.name", "NotIn", &NEVER_INJECTED),
                    requirement(INJECT_KEY, ns_operator, &["enabled"]),
                ]),
                ..Default::default()
            }),
            object_selector: Some(LabelSelector {
                match_expressions: Some(vec![requirement(INJECT_KEY, "NotIn", &["disabled"])]),
                ..Default::default()
            }),
            match_conditions: Some(conditions),
            failure_policy: Some("Fail".into()),
            side_effects: "None".into(),
            match_policy: Some("Equivalent".into()),
            reinvocation_policy: Some("Never".into()),
            timeout_seconds: Some(10),
        };
    MutatingWebhookConfiguration {
        metadata: meta(WEBHOOK_CONFIGURATION, None, "injector"),
        webhooks: Some(vec![
            webhook(
                NAMESPACE_WEBHOOK,
                "In",
                vec![
                    match_condition("not-host-network", NOT_HOST_NETWORK),
                    match_condition("not-annotated-disabled", NOT_ANNOTATED_DISABLED),
                ],
            ),
            webhook(
                POD_WEBHOOK,
                "NotIn",
                vec![
                    match_condition("not-host-network", NOT_HOST_NETWORK),
                    match_condition("annotated-not-disabled", ANNOTATED_NOT_DISABLED),
                ],
            ),
        ]),
    }
}

/// The documents that carry the mesh CA: the Secret the control plane signs with, the
/// trust bundle, and the webhook configuration whose `caBundle` is the trust anchor.
pub fn identity_documents(ca: &Ca) -> Result<Vec<Value>, ManifestError> {
    let anchor = palisade_certs::pem::cert_pem(ca.root_der());
    let issuer = palisade_certs::pem::cert_pem(ca.issuer_der());
    let secret = Secret {
        metadata: meta(IDENTITY_SECRET, Some(NAMESPACE), "identity"),
        type_: Some("kubernetes.io/tls".into()),
        data: Some(BTreeMap::from([
            (
                TRUST_ANCHOR_KEY.to_string(),
                ByteString(anchor.clone().into_bytes()),
            ),
            (ISSUER_CERT_KEY.to_string(), ByteString(issuer.into_bytes())),
            (
                ISSUER_KEY_KEY.to_string(),
                ByteString(ca.issuer_key_pem().as_bytes().to_vec()),
            ),
        ])),
        ..Default::default()
    };
    let bundle = ConfigMap {
        metadata: meta(TRUST_BUNDLE_CONFIG_MAP, Some(NAMESPACE), "identity"),
        data: Some(BTreeMap::from([(
            TRUST_BUNDLE_KEY.to_string(),
            anchor.clone(),
        )])),
        ..Default::default()
    };
    Ok(vec![
        serde_json::to_value(secret)?,
        serde_json::to_value(bundle)?,
        serde_json::to_value(webhook_configuration(&anchor))?,
    ])
}

/// The first lines of `palisade install`'s output, and of `deploy/kubernetes/palisade.yaml`.
pub const HEADER: &str = "\
# Palisade on Kubernetes, as `palisade install` prints it (docs/kubernetes.md); do not edit.
# First what every install of this version shares: the namespace, the CRDs, RBAC and the
# control plane. `palisade install --no-identity` stops there.
";

/// The line between the two parts: what follows holds the issuer's private key.
pub const IDENTITY_HEADER: &str = "\
# Then this install's mesh CA: the Secret palisade-identity (the issuer's private key: keep
# this output secret), the ConfigMap palisade-trust-bundle and the injector's webhook, whose
# caBundle is the trust anchor. The same CA (`palisade install --ca DIR`) keeps identities.
";

/// YAML documents, `---` between them.
pub fn to_yaml(docs: &[Value]) -> Result<String, ManifestError> {
    let mut out = String::new();
    for doc in docs {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(doc)?);
    }
    Ok(out)
}

/// The static part, exactly as `deploy/kubernetes/palisade.yaml` holds it for the default image.
pub fn render_static(opts: &InstallOptions) -> Result<String, ManifestError> {
    Ok(format!("{HEADER}{}", to_yaml(&static_documents(opts)?)?))
}

/// The identity part, to print after [`render_static`]: the same for the same CA.
pub fn render_identity(ca: &Ca) -> Result<String, ManifestError> {
    Ok(format!(
        "{IDENTITY_HEADER}{}",
        to_yaml(&identity_documents(ca)?)?
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn by_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
        docs.iter().filter(|d| d["kind"] == kind).collect()
    }

    fn one<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
        let found = by_kind(docs, kind);
        assert_eq!(found.len(), 1, "{kind}: {found:?}");
        found[0]
    }

    fn static_docs() -> Vec<Value> {
        static_documents(&InstallOptions::default()).expect("static documents")
    }

    #[test]
    fn the_documents_refer_to_each_other_consistently() {
        let docs = static_docs();
        assert_eq!(docs[0]["kind"], "Namespace", "kubectl applies in order");
        assert_eq!(docs[0]["metadata"]["name"], NAMESPACE);
        let ns_labels = &docs[0]["metadata"]["labels"];
        assert_eq!(ns_labels[INJECT_KEY], "disabled");
        assert_eq!(
            ns_labels["pod-security.kubernetes.io/enforce"],
            "restricted"
        );
        for d in &docs[1..] {
            let namespaced = !matches!(
                d["kind"].as_str(),
                Some("CustomResourceDefinition" | "ClusterRole" | "ClusterRoleBinding")
            );
            let ns = d["metadata"]["namespace"].as_str();
            assert_eq!(ns, namespaced.then_some(NAMESPACE), "{}", d["kind"]);
        }
        let deploy = one(&docs, "Deployment");
        let selector = &deploy["spec"]["selector"]["matchLabels"];
        let template_labels = &deploy["spec"]["template"]["metadata"]["labels"];
        for (k, v) in selector.as_object().expect("selector") {
            assert_eq!(&template_labels[k], v, "template labels lack {k}");
        }
        assert_eq!(&one(&docs, "Service")["spec"]["selector"], selector);
        assert_eq!(
            &one(&docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
            selector
        );
        assert_eq!(deploy["spec"]["replicas"], 2);
        assert_eq!(one(&docs, "PodDisruptionBudget")["spec"]["minAvailable"], 1);

        let pod = &deploy["spec"]["template"]["spec"];
        assert_eq!(pod["serviceAccountName"], SERVICE_ACCOUNT);
        assert_eq!(
            one(&docs, "ServiceAccount")["metadata"]["name"],
            SERVICE_ACCOUNT
        );
        for binding in ["ClusterRoleBinding", "RoleBinding"] {
            let b = one(&docs, binding);
            assert_eq!(b["subjects"][0]["name"], SERVICE_ACCOUNT);
            assert_eq!(b["subjects"][0]["namespace"], NAMESPACE);
            let role = one(&docs, b["roleRef"]["kind"].as_str().expect("roleRef kind"));
            assert_eq!(b["roleRef"]["name"], role["metadata"]["name"]);
        }

        // Every port the Service and the probes name is a container port.
        let container = &pod["containers"][0];
        let port_named = |name: &Value| {
            container["ports"]
                .as_array()
                .expect("ports")
                .iter()
                .find(|p| &p["name"] == name)
                .map(|p| p["containerPort"].clone())
        };
        let service_ports = one(&docs, "Service")["spec"]["ports"].clone();
        for p in service_ports.as_array().expect("service ports") {
            assert!(port_named(&p["targetPort"]).is_some(), "{p}");
        }
        let webhook_port = service_ports
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["port"] == 443))
            .expect("a Service port 443");
        assert_eq!(
            port_named(&webhook_port["targetPort"]),
            Some(json!(WEBHOOK_PORT))
        );
        for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
            assert_eq!(
                port_named(&container[probe]["httpGet"]["port"]),
                Some(json!(METRICS_PORT)),
                "{probe}"
            );
        }
        let args: Vec<&str> = container["args"]
            .as_array()
            .expect("args")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(&args[..3], ["control-plane", "--source", "kubernetes"]);
        assert!(args.contains(&format!("0.0.0.0:{METRICS_PORT}").as_str()));

        // Hardened: non-root, read-only root, no escalation, no capabilities.
        let sc = &container["securityContext"];
        assert_eq!(sc["runAsNonRoot"], true);
        assert_eq!(sc["readOnlyRootFilesystem"], true);
        assert_eq!(sc["allowPrivilegeEscalation"], false);
        assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        assert!(container["resources"]["requests"]["memory"].is_string());
        assert!(container["resources"]["limits"]["memory"].is_string());
        assert_eq!(container["image"], DEFAULT_IMAGE);
    }

    #[test]
    fn the_image_is_the_one_asked_for() {
        let docs = static_documents(&InstallOptions {
            image: "registry.example/palisade:dev".into(),
        })
        .expect("docs");
        assert_eq!(
            one(&docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"],
            "registry.example/palisade:dev"
        );
    }

    fn strs(v: &Value) -> Vec<&str> {
        v.as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default()
    }

    /// Each (group, resource) a rule grants, with its verbs and resource names, one a line.
    fn grants(role: &Value) -> Vec<String> {
        let mut grants = Vec::new();
        for r in role["rules"].as_array().expect("rules") {
            for g in strs(&r["apiGroups"]) {
                for res in strs(&r["resources"]) {
                    let mut line = format!("{g}/{res}: {}", strs(&r["verbs"]).join(","));
                    if r.get("resourceNames").is_some() {
                        line.push_str(&format!(" {:?}", strs(&r["resourceNames"])));
                    }
                    grants.push(line);
                }
            }
        }
        grants.sort();
        grants
    }

    /// The control plane may read, and do, exactly this; nothing cluster-wide on Secrets, no
    /// wildcard, no write but to the status of its own policies, Events and the trust bundle.
    #[test]
    fn the_roles_grant_only_what_the_control_plane_uses() {
        let role = serde_json::to_value(cluster_role()).expect("json");
        let read = "get,list,watch";
        let mut expected = vec![
            format!("/pods: {read}"),
            format!("/services: {read}"),
            format!("/namespaces: {read}"),
            format!("discovery.k8s.io/endpointslices: {read}"),
            format!("palisade.dev/authorizationpolicies: {read}"),
            format!("palisade.dev/peerauthentications: {read}"),
            format!("palisade.dev/httpfaults: {read}"),
            format!("palisade.dev/ratelimitpolicies: {read}"),
            format!("palisade.dev/egresspolicies: {read}"),
            "palisade.dev/authorizationpolicies/status: patch".to_string(),
            "palisade.dev/peerauthentications/status: patch".to_string(),
            "palisade.dev/httpfaults/status: patch".to_string(),
            "palisade.dev/ratelimitpolicies/status: patch".to_string(),
            "palisade.dev/egresspolicies/status: patch".to_string(),
            format!("security.istio.io/authorizationpolicies: {read}"),
            format!("security.istio.io/peerauthentications: {read}"),
            format!("gateway.networking.k8s.io/httproutes: {read}"),
            format!("gateway.networking.k8s.io/grpcroutes: {read}"),
            "authentication.k8s.io/tokenreviews: create".to_string(),
            "events.k8s.io/events: create,patch".to_string(),
            "/configmaps: create".to_string(),
            format!("/configmaps: list,watch,patch [{TRUST_BUNDLE_CONFIG_MAP:?}]"),
        ];
        expected.sort();
        assert_eq!(grants(&role), expected);
        assert!(!role.to_string().contains('*'), "no wildcard: {role}");

        let role = serde_json::to_value(identity_role()).expect("json");
        assert_eq!(
            grants(&role),
            [format!("/secrets: get [{IDENTITY_SECRET:?}]")]
        );
    }

    /// Every `palisade.dev` kind the source waits for at start has its CRD in the install and
    /// the grants to read it and to write its `Accepted` condition: a kind missing from any
    /// of the three would keep the control plane from ever starting.
    #[test]
    fn every_kind_the_source_watches_is_installed_and_granted() {
        let crds: Vec<(String, String, String)> = crate::k8s::crd::crds()
            .into_iter()
            .map(|c| (c.spec.group, c.spec.names.kind, c.spec.names.plural))
            .collect();
        let role = serde_json::to_value(cluster_role()).expect("json");
        let granted = grants(&role);
        let kinds = crate::k8s::source::PolicyKind::palisade();
        for k in &kinds {
            let api = &k.api;
            assert!(
                crds.contains(&(api.group.clone(), api.kind.clone(), api.plural.clone())),
                "no CRD for {} ({}): {crds:?}",
                api.kind,
                api.plural
            );
            for want in [
                format!("{}/{}: get,list,watch", api.group, api.plural),
                format!("{}/{}/status: patch", api.group, api.plural),
            ] {
                assert!(granted.contains(&want), "{want} not in {granted:?}");
            }
        }
        assert_eq!(crds.len(), kinds.len(), "a CRD the source does not read");
    }

    /// The policies' status is a subresource: a user's apply cannot set it, the control
    /// plane's status patch cannot change the spec.
    #[test]
    fn the_crds_have_a_status_subresource() {
        for crd in crate::k8s::crd::crds() {
            let crd = serde_json::to_value(crd).expect("json");
            let version = &crd["spec"]["versions"][0];
            assert_eq!(
                version["subresources"],
                json!({ "status": {} }),
                "{}",
                crd["metadata"]["name"]
            );
            let status = &version["schema"]["openAPIV3Schema"]["properties"]["status"];
            let conditions = &status["properties"]["conditions"];
            assert_eq!(conditions["x-kubernetes-list-type"], "map");
            assert_eq!(conditions["x-kubernetes-list-map-keys"], json!(["type"]));
            assert_eq!(
                conditions["items"]["properties"]["status"]["enum"],
                json!(["True", "False", "Unknown"])
            );
            let columns: Vec<&str> = version["additionalPrinterColumns"]
                .as_array()
                .expect("columns")
                .iter()
                .filter_map(|c| c["name"].as_str())
                .collect();
            assert!(columns.contains(&"Accepted"), "{columns:?}");
        }
    }

    fn decode(v: &Value) -> String {
        use base64::Engine;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().expect("base64 string"))
            .expect("base64");
        String::from_utf8(bytes).expect("PEM is text")
    }

    #[test]
    fn the_identity_documents_carry_the_ca() {
        let td = palisade_certs::TrustDomain::new("example.org").expect("td");
        let ca = Ca::generate(&td, None).expect("CA");
        let docs = identity_documents(&ca).expect("identity documents");
        let secret = one(&docs, "Secret");
        assert_eq!(secret["metadata"]["name"], IDENTITY_SECRET);
        assert_eq!(secret["metadata"]["namespace"], NAMESPACE);
        assert_eq!(secret["type"], "kubernetes.io/tls");
        let anchor = palisade_certs::pem::cert_pem(ca.root_der());
        assert_eq!(decode(&secret["data"][TRUST_ANCHOR_KEY]), anchor);
        assert_eq!(
            decode(&secret["data"][ISSUER_CERT_KEY]),
            palisade_certs::pem::cert_pem(ca.issuer_der())
        );
        assert_eq!(decode(&secret["data"][ISSUER_KEY_KEY]), ca.issuer_key_pem());
        let bundle = one(&docs, "ConfigMap");
        assert_eq!(bundle["metadata"]["name"], TRUST_BUNDLE_CONFIG_MAP);
        assert_eq!(bundle["data"][TRUST_BUNDLE_KEY], anchor.as_str());
        assert!(!bundle.to_string().contains("PRIVATE KEY"));

        let webhooks = one(&docs, "MutatingWebhookConfiguration");
        assert_eq!(webhooks["metadata"]["name"], WEBHOOK_CONFIGURATION);
        let hooks = webhooks["webhooks"].as_array().expect("webhooks");
        assert_eq!(hooks.len(), 2);
        for h in hooks {
            assert_eq!(decode(&h["clientConfig"]["caBundle"]), anchor);
            assert_eq!(
                h["clientConfig"]["service"],
                json!({ "name": NAME, "namespace": NAMESPACE, "path": WEBHOOK_PATH, "port": 443 })
            );
            assert_eq!(h["sideEffects"], "None");
            assert_eq!(h["failurePolicy"], "Fail");
            assert_eq!(h["rules"][0]["operations"], json!(["CREATE"]));
            assert_eq!(h["rules"][0]["resources"], json!(["pods"]));
        }
        // The name the serving certificate is checked for is the Service's.
        assert_eq!(WEBHOOK_DNS_NAME, format!("{NAME}.{NAMESPACE}.svc"));
    }

    #[test]
    fn the_yaml_reads_back_as_the_documents() {
        let td = palisade_certs::TrustDomain::new("cluster.local").expect("td");
        let ca = Ca::generate(&td, None).expect("CA");
        let mut docs = static_docs();
        docs.extend(identity_documents(&ca).expect("identity"));
        let text = format!(
            "{}{}",
            render_static(&InstallOptions::default()).expect("static"),
            render_identity(&ca).expect("identity")
        );
        assert!(text.starts_with(HEADER));
        assert!(text.contains(&format!("\n{IDENTITY_HEADER}---\n")));
        let back: Vec<Value> = serde_saphyr::from_multiple(&text).expect("YAML");
        let back: Vec<Value> = back.into_iter().filter(|d| !d.is_null()).collect();
        assert_eq!(back, docs);
    }

    /// `palisade install --ca DIR` prints the same bytes every time (what keeps identities
    /// on an upgrade, and what lets a test compare it with deploy/kubernetes/).
    #[test]
    fn the_same_ca_gives_the_same_documents() {
        let td = palisade_certs::TrustDomain::new("cluster.local").expect("td");
        let dir = tempfile::tempdir().expect("tempdir");
        Ca::generate(&td, None)
            .expect("CA")
            .save(&dir.path().join("ca"))
            .expect("save");
        let load = || Ca::load(&dir.path().join("ca")).expect("load");
        let (a, b) = (load(), load());
        assert_eq!(
            render_identity(&a).expect("identity"),
            render_identity(&b).expect("identity")
        );
        assert_eq!(
            render_static(&InstallOptions::default()).expect("static"),
            render_static(&InstallOptions::default()).expect("static")
        );
    }

    /// `matchLabels`/`matchExpressions` as the API server reads them.
    fn selects(selector: &Value, labels: &BTreeMap<&str, &str>) -> bool {
        let exprs = selector["matchExpressions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        exprs.iter().all(|e| {
            let key = e["key"].as_str().expect("key");
            let values: Vec<&str> = e["values"]
                .as_array()
                .map(|v| v.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let value = labels.get(key);
            match e["operator"].as_str() {
                Some("In") => value.is_some_and(|v| values.contains(v)),
                Some("NotIn") => value.is_none_or(|v| !values.contains(v)),
                other => panic!("operator {other:?}"),
            }
        }) && selector.get("matchLabels").is_none()
    }

    fn condition(expr: &str, pod: &Value) -> bool {
        use kube_cel::cel::{Context, Program, Value as Cel};
        let program = Program::compile(expr).unwrap_or_else(|e| panic!("{expr}: {e:?}"));
        let mut ctx = Context::default();
        ctx.add_variable("object", pod.clone()).expect("object");
        match program.execute(&ctx) {
            Ok(Cel::Bool(b)) => b,
            other => panic!("{expr}: {other:?}"),
        }
    }

    /// Which webhooks the API server calls for a pod created in a namespace: the selectors
    /// and CEL match conditions, evaluated on the pod.
    fn called(ns: &str, ns_label: Option<&str>, pod: &Value) -> Vec<String> {
        let config = serde_json::to_value(webhook_configuration("x")).expect("json");
        let mut ns_labels = BTreeMap::from([("kubernetes.io/metadata.name", ns)]);
        if let Some(l) = ns_label {
            ns_labels.insert(INJECT_KEY, l);
        }
        let pod_labels: BTreeMap<&str, &str> = pod["metadata"]["labels"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.as_str(), v.as_str().unwrap_or("")))
                    .collect()
            })
            .unwrap_or_default();
        config["webhooks"]
            .as_array()
            .expect("webhooks")
            .iter()
            .filter(|w| {
                selects(&w["namespaceSelector"], &ns_labels)
                    && selects(&w["objectSelector"], &pod_labels)
                    && w["matchConditions"]
                        .as_array()
                        .expect("conditions")
                        .iter()
                        .all(|c| condition(c["expression"].as_str().expect("CEL"), pod))
            })
            .map(|w| w["name"].as_str().unwrap_or("").to_string())
            .collect()
    }

    fn pod(annotation: Option<&str>, label: Option<&str>, host_network: bool) -> Value {
        let mut pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": "p" },
            "spec": { "containers": [ { "name": "app", "image": "app" } ] },
        });
        if let Some(a) = annotation {
            pod["metadata"]["annotations"] = json!({ INJECT_KEY: a, "other": "x" });
        }
        if let Some(l) = label {
            pod["metadata"]["labels"] = json!({ INJECT_KEY: l });
        }
        if host_network {
            pod["spec"]["hostNetwork"] = json!(true);
        }
        pod
    }

    /// The spec's rules: namespace label or pod annotation, the pod wins; never host-network
    /// pods or kube-system; and never the control plane's own namespace.
    #[test]
    fn the_webhooks_are_called_for_the_pods_the_injection_rules_name() {
        let ns_hook = || vec![NAMESPACE_WEBHOOK.to_string()];
        let pod_hook = || vec![POD_WEBHOOK.to_string()];
        let none = Vec::<String>::new;
        let cases = [
            ("demo", Some("enabled"), pod(None, None, false), ns_hook()),
            (
                "demo",
                Some("enabled"),
                pod(Some("enabled"), None, false),
                ns_hook(),
            ),
            (
                "demo",
                Some("enabled"),
                pod(Some("disabled"), None, false),
                none(),
            ),
            (
                "demo",
                Some("enabled"),
                pod(None, Some("disabled"), false),
                none(),
            ),
            ("demo", Some("enabled"), pod(None, None, true), none()),
            ("demo", None, pod(None, None, false), none()),
            ("demo", None, pod(Some("enabled"), None, false), pod_hook()),
            ("demo", None, pod(Some("disabled"), None, false), none()),
            ("demo", None, pod(Some("yes"), None, false), pod_hook()),
            (
                "demo",
                Some("enabled"),
                pod(Some("yes"), None, false),
                ns_hook(),
            ),
            ("demo", Some("true"), pod(None, None, false), none()),
            ("demo", None, pod(Some("enabled"), None, true), none()),
            (
                "demo",
                Some("disabled"),
                pod(Some("enabled"), None, false),
                pod_hook(),
            ),
            ("demo", Some("disabled"), pod(None, None, false), none()),
            (
                "kube-system",
                Some("enabled"),
                pod(Some("enabled"), None, false),
                none(),
            ),
            (
                "kube-system",
                None,
                pod(Some("enabled"), None, false),
                none(),
            ),
            (
                "kube-public",
                None,
                pod(Some("enabled"), None, false),
                none(),
            ),
            (
                "kube-node-lease",
                Some("enabled"),
                pod(None, None, false),
                none(),
            ),
            (NAMESPACE, None, pod(Some("enabled"), None, false), none()),
            (NAMESPACE, Some("enabled"), pod(None, None, false), none()),
        ];
        for (ns, label, pod, expected) in cases {
            assert_eq!(
                called(ns, label, &pod),
                expected,
                "namespace {ns} labelled {label:?}, pod {}",
                pod["metadata"]
            );
        }
    }
}
