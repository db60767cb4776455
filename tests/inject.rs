//! `palisade inject` through the binary: the golden files of `tests/golden/inject/`, idempotence,
//! validity against the Kubernetes schemas (`kubernetes-validate`, when installed), the reports
//! on stderr, and `--admission-review` on stdin.
//!
//! `PALISADE_BLESS=1 cargo test --test inject` rewrites the `*.out.yaml` files from the current
//! output; review the diff before committing it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};

const LIMIT: Duration = Duration::from_secs(60);

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/inject")
}

/// Runs `palisade` with `args` and `stdin`, killing it after `LIMIT`.
fn palisade(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run palisade");
    let mut input = child.stdin.take().expect("stdin");
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let deadline = Instant::now() + LIMIT;
    loop {
        match child.try_wait().expect("wait") {
            Some(_) => break,
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                panic!("palisade {args:?} did not finish within {LIMIT:?}");
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    let _ = writer.join();
    child.wait_with_output().expect("output")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).expect("UTF-8 output")
}

/// The golden cases: (name, input path, expected output path).
fn goldens() -> Vec<(String, PathBuf, PathBuf)> {
    let mut cases: Vec<_> = std::fs::read_dir(golden_dir())
        .expect("tests/golden/inject")
        .filter_map(|e| {
            let path = e.ok()?.path();
            let name = path
                .file_name()?
                .to_str()?
                .strip_suffix(".in.yaml")?
                .to_string();
            let out = path.with_file_name(format!("{name}.out.yaml"));
            Some((name, path, out))
        })
        .collect();
    cases.sort();
    assert!(cases.len() >= 11, "golden cases missing: {cases:?}");
    cases
}

#[test]
fn every_golden_input_injects_to_its_golden_output() {
    let bless = std::env::var_os("PALISADE_BLESS").is_some();
    let mut failures = Vec::new();
    for (name, input, expected) in goldens() {
        let got = ok(&palisade(&["inject", "-f", input.to_str().unwrap()], b""));
        if bless {
            std::fs::write(&expected, &got).expect("bless");
            continue;
        }
        let want = std::fs::read_to_string(&expected)
            .unwrap_or_else(|e| panic!("{}: {e} (PALISADE_BLESS=1 writes it)", expected.display()));
        if got != want {
            failures.push(format!("--- {name}: expected\n{want}\n--- got\n{got}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn injecting_an_injected_output_changes_nothing() {
    for (name, _, expected) in goldens() {
        let text = std::fs::read_to_string(&expected).expect("golden output");
        // Through stdin this time.
        let again = ok(&palisade(&["inject"], text.as_bytes()));
        assert_eq!(again, text, "{name}: a second injection changed the output");
    }
}

#[test]
fn golden_outputs_are_valid_kubernetes_objects() {
    // kubernetes-validate has no schema for `List`: its items are checked one by one, so every
    // object of every output goes into one multi-document file.
    let mut objects = Vec::new();
    for (_, _, out) in goldens() {
        for doc in yaml_docs(&std::fs::read_to_string(out).expect("golden output")) {
            match doc.get("items") {
                Some(Value::Array(items)) if doc["kind"] == "List" => objects.extend(items.clone()),
                _ => objects.push(doc),
            }
        }
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let all = dir.path().join("all.yaml");
    let text: Vec<String> = objects.iter().map(|o| o.to_string()).collect();
    std::fs::write(&all, text.join("\n---\n")).expect("write");
    let run = Command::new("kubernetes-validate")
        .arg("--strict")
        .arg(&all)
        .output();
    let out = match run {
        Ok(out) => out,
        Err(e) => {
            eprintln!(
                "skipping: kubernetes-validate is not installed ({e}); `pip install kubernetes-validate` to check the golden outputs against the Kubernetes schemas"
            );
            return;
        }
    };
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{report}");
    // Every object was checked, none skipped for want of a schema.
    assert!(!report.contains("WARN"), "{report}");
    assert_eq!(
        report.matches(" passed for resource ").count(),
        objects.len(),
        "{report}"
    );
    assert!(
        report.contains("passed for resource statefulset/db"),
        "{report}"
    );
}

#[test]
fn the_report_on_stderr_says_what_was_injected_and_why_not() {
    let cases = [
        ("deployment", "deployment/web injected"),
        ("job", "job/migrate injected"),
        ("cronjob", "cronjob/report injected"),
        ("list", "statefulset/db injected\ndaemonset/agent injected"),
        (
            "host-network",
            "pod/node-exporter skipped: it uses hostNetwork (its iptables rules would capture the node's traffic)\n  warning: palisade.dev/inject: enabled is ignored: hostNetwork pods are never injected",
        ),
        (
            "kube-system",
            "deployment/coredns skipped: namespace kube-system is never injected",
        ),
        (
            "disabled",
            "deployment/legacy skipped: the pod annotation palisade.dev/inject is disabled",
        ),
        (
            "already-injected",
            "deployment/web skipped: it already has the palisade-proxy sidecar",
        ),
        (
            "probes-and-skip-ports",
            "pod/api injected\n  warning: the pod declares ports 8080, 8081",
        ),
    ];
    for (name, want) in cases {
        let input = golden_dir().join(format!("{name}.in.yaml"));
        let out = palisade(&["inject", "-f", input.to_str().unwrap()], b"");
        ok(&out);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(want), "{name}: {stderr}");
    }
}

#[test]
fn with_namespace_labels_given_the_cli_follows_the_webhook_rules() {
    let input = std::fs::read_to_string(golden_dir().join("deployment.in.yaml")).unwrap();
    // The namespace is not enabled and the pod does not ask: unchanged.
    let out = palisade(&["inject", "--namespace-label", "team=a"], input.as_bytes());
    let text = ok(&out);
    assert!(!text.contains("palisade-proxy"), "{text}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("deployment/web skipped: neither"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The pod asks: injected.
    let asking = input.replace(
        "    metadata:\n      labels: { app: web }",
        "    metadata:\n      labels: { app: web }\n      annotations: { palisade.dev/inject: enabled }",
    );
    let text = ok(&palisade(
        &["inject", "--namespace-label", "team=a"],
        asking.as_bytes(),
    ));
    assert!(text.contains("name: palisade-proxy"), "{text}");
    // The namespace label: injected.
    let text = ok(&palisade(
        &["inject", "--namespace-label", "palisade.dev/inject=enabled"],
        input.as_bytes(),
    ));
    assert!(text.contains("name: palisade-proxy"), "{text}");
}

#[test]
fn the_config_flags_reach_the_injected_containers() {
    let input = std::fs::read_to_string(golden_dir().join("pod.in.yaml")).unwrap();
    let text = ok(&palisade(
        &[
            "inject",
            "--proxy-image",
            "registry.example/palisade:dev",
            "--inject-control-plane",
            "10.96.0.20:8086",
            "--inject-trust-domain",
            "example.org",
        ],
        input.as_bytes(),
    ));
    assert_eq!(
        text.matches("image: registry.example/palisade:dev").count(),
        2,
        "{text}"
    );
    assert!(text.contains("value: 10.96.0.20:8086"), "{text}");
    assert!(
        text.contains("value: spiffe://example.org/ns/$(POD_NAMESPACE)/sa/$(POD_SERVICE_ACCOUNT)"),
        "{text}"
    );
}

#[test]
fn errors_name_the_document_and_the_problem() {
    let bad_annotation = "apiVersion: v1\nkind: ConfigMap\nmetadata: { name: a }\n---\napiVersion: v1\nkind: Pod\nmetadata: { name: p, annotations: { palisade.dev/skip-inbound-ports: http } }\nspec: { containers: [ { name: a, image: b } ] }\n";
    let out = palisade(&["inject"], bad_annotation.as_bytes());
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.trim(),
        "error: cannot inject stdin: document 1: pod/p: annotation palisade.dev/skip-inbound-ports: \"http\" is not a port list: \"http\" is not a port (1-65535)"
    );
    assert!(out.stdout.is_empty(), "nothing is printed on error");

    let out = palisade(&["inject"], b"kind: [unclosed\n");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .starts_with("error: cannot inject stdin: the input is not YAML"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = palisade(&["inject", "-f", "/nonexistent/app.yaml"], b"");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot read /nonexistent/app.yaml"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An AdmissionReview for a pod, as the API server sends it.
fn review_for(pod: Value, namespace: &str) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": { "group": "", "version": "v1", "kind": "Pod" },
            "resource": { "group": "", "version": "v1", "resource": "pods" },
            "requestKind": { "group": "", "version": "v1", "kind": "Pod" },
            "requestResource": { "group": "", "version": "v1", "resource": "pods" },
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": { "username": "system:serviceaccount:kube-system:replicaset-controller", "groups": ["system:serviceaccounts"] },
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": { "kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1" }
        }
    })
}

fn yaml_docs(text: &str) -> Vec<Value> {
    serde_saphyr::from_multiple(text).expect("YAML")
}

#[test]
fn an_admission_review_on_stdin_gets_the_cli_s_pod_as_a_base64_json_patch() {
    let input = std::fs::read_to_string(golden_dir().join("pod.in.yaml")).unwrap();
    let mut pod = yaml_docs(&input).remove(0);
    let review = review_for(pod.clone(), "default");
    let out = palisade(
        &["inject", "--admission-review"],
        serde_json::to_string(&review).unwrap().as_bytes(),
    );
    let answer: Value = serde_json::from_str(&ok(&out)).expect("JSON on stdout");
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    let response = &answer["response"];
    assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
    assert_eq!(response["allowed"], true);
    assert_eq!(response["patchType"], "JSONPatch");
    let patch = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().expect("a base64 string"))
        .expect("base64");
    let patch: json_patch::Patch = serde_json::from_slice(&patch).expect("a JSONPatch");
    json_patch::patch(&mut pod, &patch).expect("the patch applies to the request's pod");
    let cli =
        yaml_docs(&std::fs::read_to_string(golden_dir().join("pod.out.yaml")).unwrap()).remove(0);
    assert_eq!(pod, cli, "the webhook's pod differs from the CLI's");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("injected pod default/client"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_malformed_admission_review_gets_an_error_response_not_a_crash() {
    for (body, uid, message) in [
        ("{not json", "", "the body is not JSON"),
        (
            r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"u-1","kind":{"group":"","version":"v1","kind":"Pod"}}}"#,
            "u-1",
            "malformed AdmissionReview",
        ),
        (
            r#"{"apiVersion":"v1","kind":"Pod"}"#,
            "",
            "not an admission.k8s.io/v1 AdmissionReview",
        ),
    ] {
        let out = palisade(&["inject", "--admission-review"], body.as_bytes());
        let answer: Value = serde_json::from_str(&ok(&out)).expect("JSON on stdout");
        let response = &answer["response"];
        assert_eq!(response["allowed"], false, "{body}");
        assert_eq!(response["uid"], uid, "{body}");
        assert_eq!(response["status"]["code"], 400, "{body}");
        assert!(
            response["status"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains(message),
            "{body}: {answer}"
        );
    }
}
