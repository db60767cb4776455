//! The injector's AdmissionReview path with real wire-format reviews: what the API server sends,
//! what it gets back, and that the webhook's patch gives the pod `palisade inject` prints, for
//! every golden file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Pod;
use palisade_control_plane::inject::review::{Reviewed, review};
use palisade_control_plane::inject::{
    AllNamespaces, InjectConfig, NamespaceLabels, PROXY_CONTAINER, manifest,
};
use serde_json::{Value, json};

/// A pod creation as the API server sends it for a ReplicaSet's pod: generateName, no name,
/// managedFields, the namespace only in the request.
fn api_server_review() -> Value {
    json!({
      "kind": "AdmissionReview",
      "apiVersion": "admission.k8s.io/v1",
      "request": {
        "uid": "0c9a8d74-9cb7-44dd-b98e-09fd62def2f4",
        "kind": { "group": "", "version": "v1", "kind": "Pod" },
        "resource": { "group": "", "version": "v1", "resource": "pods" },
        "requestKind": { "group": "", "version": "v1", "kind": "Pod" },
        "requestResource": { "group": "", "version": "v1", "resource": "pods" },
        "name": "",
        "namespace": "shop",
        "operation": "CREATE",
        "userInfo": {
          "username": "system:serviceaccount:kube-system:replicaset-controller",
          "uid": "8c3e1a0a-3b8e-4f6c-9d2b-5a7a3a1b0c11",
          "groups": ["system:serviceaccounts", "system:serviceaccounts:kube-system", "system:authenticated"]
        },
        "object": {
          "kind": "Pod",
          "apiVersion": "v1",
          "metadata": {
            "generateName": "cart-7d9c8b5f4-",
            "creationTimestamp": null,
            "labels": { "app": "cart", "pod-template-hash": "7d9c8b5f4" },
            "ownerReferences": [{
              "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "cart-7d9c8b5f4",
              "uid": "1f1c0b9e-2a9d-4a55-8c2e-2f4f5b6a7c8d", "controller": true, "blockOwnerDeletion": true
            }],
            "managedFields": [{
              "manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
              "time": "2026-12-01T10:00:00Z", "fieldsType": "FieldsV1",
              "fieldsV1": { "f:metadata": { "f:generateName": {} } }
            }]
          },
          "spec": {
            "volumes": [{
              "name": "kube-api-access-x7k2p",
              "projected": {
                "sources": [
                  { "serviceAccountToken": { "expirationSeconds": 3607, "path": "token" } },
                  { "configMap": { "name": "kube-root-ca.crt", "items": [{ "key": "ca.crt", "path": "ca.crt" }] } },
                  { "downwardAPI": { "items": [{ "path": "namespace", "fieldRef": { "apiVersion": "v1", "fieldPath": "metadata.namespace" } }] } }
                ],
                "defaultMode": 420
              }
            }],
            "containers": [{
              "name": "cart",
              "image": "ghcr.io/example/cart:5",
              "ports": [{ "containerPort": 7000, "protocol": "TCP" }],
              "resources": {},
              "volumeMounts": [{ "name": "kube-api-access-x7k2p", "readOnly": true, "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount" }],
              "terminationMessagePath": "/dev/termination-log",
              "terminationMessagePolicy": "File",
              "imagePullPolicy": "IfNotPresent"
            }],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "cart",
            "serviceAccount": "cart",
            "securityContext": {},
            "schedulerName": "default-scheduler",
            "tolerations": [
              { "key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300 }
            ],
            "priority": 0,
            "enableServiceLinks": true,
            "preemptionPolicy": "PreemptLowerPriority"
          },
          "status": {}
        },
        "oldObject": null,
        "dryRun": false,
        "options": { "kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1" }
      }
    })
}

/// Namespace labels by name; unknown names are unknown.
struct Namespaces(BTreeMap<String, BTreeMap<String, String>>);

impl NamespaceLabels for Namespaces {
    fn labels(&self, name: &str) -> Option<BTreeMap<String, String>> {
        self.0.get(name).cloned()
    }
}

fn namespaces(entries: &[(&str, &[(&str, &str)])]) -> Namespaces {
    Namespaces(
        entries
            .iter()
            .map(|(ns, labels)| {
                (
                    ns.to_string(),
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                )
            })
            .collect(),
    )
}

fn enabled_shop() -> Namespaces {
    namespaces(&[("shop", &[("palisade.dev/inject", "enabled")])])
}

/// Reviews `body` and returns the answer as the API server reads it: JSON.
fn answer(body: &Value, ns: &dyn NamespaceLabels) -> Value {
    match review(
        &serde_json::to_vec(body).unwrap(),
        &InjectConfig::default(),
        ns,
    ) {
        Reviewed::Answer { review, .. } => serde_json::from_slice(&review.to_json()).unwrap(),
        Reviewed::NamespaceUnknown(m) => panic!("namespace unknown: {m}"),
    }
}

fn decode_patch(response: &Value) -> json_patch::Patch {
    use base64::Engine;
    let b64 = response["patch"].as_str().expect("patch is a string");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("base64");
    serde_json::from_slice(&bytes).expect("a JSONPatch")
}

#[test]
fn an_api_server_review_gets_a_base64_json_patch_that_makes_a_valid_injected_pod() {
    let request = api_server_review();
    let out = answer(&request, &enabled_shop());
    assert_eq!(out["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(out["kind"], "AdmissionReview");
    assert!(out.get("request").is_none());
    let response = &out["response"];
    assert_eq!(response["uid"], "0c9a8d74-9cb7-44dd-b98e-09fd62def2f4");
    assert_eq!(response["allowed"], true);
    assert_eq!(response["patchType"], "JSONPatch");
    assert!(response.get("status").is_none(), "{response}");

    // What the API server does: apply the patch to the object it sent.
    let mut object = request["request"]["object"].clone();
    json_patch::patch(&mut object, &decode_patch(response)).expect("applies");
    let pod: Pod = serde_json::from_value(object.clone()).expect("a valid Pod");
    let spec = pod.spec.unwrap();
    let init: Vec<&str> = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(init, ["palisade-init", PROXY_CONTAINER]);
    let volumes: Vec<&str> = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect();
    assert_eq!(
        volumes,
        [
            "kube-api-access-x7k2p",
            "palisade-token",
            "palisade-trust-bundle",
            "palisade-xtables-lock"
        ]
    );
    // Everything the API server sent is still there.
    assert_eq!(
        object["metadata"]["managedFields"],
        request["request"]["object"]["metadata"]["managedFields"]
    );
    assert_eq!(object["spec"]["preemptionPolicy"], "PreemptLowerPriority");
    assert_eq!(object["status"], json!({}));
}

#[test]
fn the_namespace_decides_through_the_lookup_and_unknown_namespaces_fail_the_call() {
    let request = api_server_review();
    // Not enabled: allowed, no patch.
    let out = answer(&request, &namespaces(&[("shop", &[("team", "a")])]));
    assert_eq!(out["response"]["allowed"], true);
    assert!(out["response"].get("patch").is_none(), "{out}");
    assert!(out["response"].get("patchType").is_none(), "{out}");

    // The request's namespace counts, not the (absent) one in the pod's metadata.
    let mut system = request.clone();
    system["request"]["namespace"] = json!("kube-system");
    system["request"]["object"]["metadata"]["annotations"] =
        json!({ "palisade.dev/inject": "enabled" });
    let out = answer(&system, &namespaces(&[("kube-system", &[])]));
    assert_eq!(out["response"]["allowed"], true);
    assert!(out["response"].get("patch").is_none(), "{out}");
    assert_eq!(
        out["response"]["warnings"][0],
        "palisade.dev/inject: enabled is ignored: namespace kube-system is never injected"
    );

    // Unknown: neither allowed unchanged nor refused, the call fails.
    match review(
        &serde_json::to_vec(&request).unwrap(),
        &InjectConfig::default(),
        &namespaces(&[]),
    ) {
        Reviewed::NamespaceUnknown(m) => assert!(m.contains("namespace shop"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn only_pod_creations_are_patched() {
    let mut update = api_server_review();
    update["request"]["operation"] = json!("UPDATE");
    update["request"]["oldObject"] = update["request"]["object"].clone();
    let out = answer(&update, &enabled_shop());
    assert_eq!(out["response"]["allowed"], true);
    assert!(out["response"].get("patch").is_none(), "{out}");

    let mut deployment = api_server_review();
    deployment["request"]["kind"] =
        json!({ "group": "apps", "version": "v1", "kind": "Deployment" });
    deployment["request"]["object"] =
        json!({ "apiVersion": "apps/v1", "kind": "Deployment", "metadata": { "name": "x" } });
    let out = answer(&deployment, &enabled_shop());
    assert_eq!(out["response"]["allowed"], true);
    assert!(out["response"].get("patch").is_none(), "{out}");
}

#[test]
fn malformed_reviews_and_pods_get_error_responses() {
    let base = api_server_review();
    let mut no_request = base.clone();
    no_request.as_object_mut().unwrap().remove("request");
    let mut no_uid = base.clone();
    no_uid["request"]["uid"] = json!("");
    let mut bad_pod = base.clone();
    bad_pod["request"]["object"]["spec"]["containers"] = json!("not a list");
    let mut no_object = base.clone();
    no_object["request"]["object"] = Value::Null;
    let mut wrong_kind = base.clone();
    wrong_kind["kind"] = json!("Pod");
    let mut bad_annotation = base.clone();
    bad_annotation["request"]["object"]["metadata"]["annotations"] =
        json!({ "palisade.dev/proxy-memory-limit": "lots" });
    let mut unknown_field = base.clone();
    unknown_field["request"]["operation"] = json!("PATCH");
    let cases: [(Value, &str, &str); 9] = [
        (json!([1, 2, 3]), "", "(apiVersion missing)"),
        (
            json!({ "apiVersion": "admission.k8s.io/v2", "kind": "AdmissionReview" }),
            "",
            "not an admission.k8s.io/v1 AdmissionReview",
        ),
        (no_request, "", "has no request"),
        (
            unknown_field,
            "0c9a8d74-9cb7-44dd-b98e-09fd62def2f4",
            "malformed AdmissionReview",
        ),
        (no_uid, "", "has no uid"),
        (
            bad_pod,
            "0c9a8d74-9cb7-44dd-b98e-09fd62def2f4",
            "the object is not a valid Pod",
        ),
        (
            no_object,
            "0c9a8d74-9cb7-44dd-b98e-09fd62def2f4",
            "carries no object",
        ),
        (
            wrong_kind,
            "0c9a8d74-9cb7-44dd-b98e-09fd62def2f4",
            "kind is not AdmissionReview",
        ),
        (
            bad_annotation,
            "0c9a8d74-9cb7-44dd-b98e-09fd62def2f4",
            "palisade cannot inject pod shop/cart-7d9c8b5f4-*: annotation palisade.dev/proxy-memory-limit: \"lots\" is not a Kubernetes quantity",
        ),
    ];
    for (body, uid, message) in cases {
        let out = answer(&body, &enabled_shop());
        let response = &out["response"];
        assert_eq!(out["kind"], "AdmissionReview", "{body}");
        assert_eq!(response["allowed"], false, "{body}");
        assert_eq!(response["uid"], uid, "{body}");
        assert_eq!(response["status"]["code"], 400, "{body}");
        assert_eq!(response["status"]["status"], "Failure", "{body}");
        assert!(
            response["status"]["message"]
                .as_str()
                .unwrap()
                .contains(message),
            "{message}: {out}"
        );
        assert!(response.get("patch").is_none(), "{out}");
    }
    // Not even JSON.
    match review(b"\xff\xfe", &InjectConfig::default(), &enabled_shop()) {
        Reviewed::Answer { review, .. } => {
            assert!(!review.response.allowed);
            assert!(
                review
                    .response
                    .status
                    .unwrap()
                    .message
                    .unwrap()
                    .contains("not JSON")
            );
        }
        other => panic!("{other:?}"),
    }
}

// --- the webhook and the CLI give the same pods -----------------------------------------------

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/inject")
}

/// The pods of a YAML text: (namespace, pod) for every Pod and pod template, in order.
fn pods(text: &str) -> Vec<(String, Value)> {
    fn walk(v: &Value, out: &mut Vec<(String, Value)>) {
        let kind = v["kind"].as_str().unwrap_or_default();
        if kind == "List" {
            for item in v["items"].as_array().into_iter().flatten() {
                walk(item, out);
            }
            return;
        }
        let ptr = match kind {
            "Pod" => "",
            "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => "/spec/template",
            "CronJob" => "/spec/jobTemplate/spec/template",
            _ => return,
        };
        let ns = v["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        out.push((ns, v.pointer(ptr).cloned().unwrap()));
    }
    let mut out = Vec::new();
    let docs: Vec<Value> = serde_saphyr::from_multiple(text).unwrap();
    for d in docs.iter().filter(|d| !d.is_null()) {
        walk(d, &mut out);
    }
    out
}

#[test]
fn for_every_golden_file_the_webhook_patch_gives_the_cli_s_pods() {
    let mut checked = 0;
    let mut injected = 0;
    for entry in std::fs::read_dir(golden_dir()).unwrap() {
        let path = entry.unwrap().path();
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".in.yaml"))
        else {
            continue;
        };
        let input = std::fs::read_to_string(&path).unwrap();
        // The CLI's output, computed here with the library (the golden file is checked
        // against the binary in tests/inject.rs) and read back.
        let (cli, _) =
            manifest::inject_yaml(&input, &InjectConfig::default(), &AllNamespaces::enabled())
                .unwrap();
        let want = pods(&cli);
        let golden =
            std::fs::read_to_string(path.with_file_name(format!("{name}.out.yaml"))).unwrap();
        assert_eq!(
            cli, golden,
            "{name}: the library and the golden file differ"
        );
        let sent = pods(&input);
        assert_eq!(sent.len(), want.len(), "{name}");
        for ((ns, mut pod), (_, cli_pod)) in sent.into_iter().zip(want) {
            let mut object = pod.clone();
            object["apiVersion"] = json!("v1");
            object["kind"] = json!("Pod");
            let mut request = api_server_review();
            request["request"]["namespace"] = json!(ns);
            request["request"]["object"] = object;
            let out = answer(&request, &AllNamespaces::enabled());
            assert_eq!(out["response"]["allowed"], true, "{name}: {out}");
            if out["response"].get("patch").is_some() {
                json_patch::patch(&mut pod, &decode_patch(&out["response"]))
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
                let _: Pod = serde_json::from_value(pod.clone())
                    .unwrap_or_else(|e| panic!("{name}: not a Pod: {e}"));
                injected += 1;
            }
            assert_eq!(
                pod, cli_pod,
                "{name}: the webhook's pod differs from the CLI's"
            );
            checked += 1;
        }
    }
    // 12 pods in the golden files, 8 of them injected (at the time of writing).
    assert!(
        checked >= 12 && injected >= 8,
        "checked {checked}, injected {injected}"
    );
}
