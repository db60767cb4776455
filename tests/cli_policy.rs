//! `palisade policy check` and `palisade authz explain` through the binary.

use std::process::Command;

fn palisade() -> Command {
    Command::new(env!("CARGO_BIN_EXE_palisade"))
}

fn repo(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

#[test]
fn the_demo_policies_check_clean() {
    let out = palisade()
        .args(["policy", "check"])
        .arg(repo("deploy/local/policies"))
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("demo/db-from-api"), "{stdout}");
}

#[test]
fn broken_policies_name_file_document_and_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = std::fs::read_to_string(repo("deploy/local/policies/db.yaml")).expect("read");
    std::fs::write(dir.path().join("a.yaml"), &good).expect("write");
    // b.yaml repeats a.yaml's policy; c.yaml misspells a field in its second document.
    std::fs::write(dir.path().join("b.yaml"), &good).expect("write");
    let bad = format!(
        "{good}\n---\n{}",
        good.replace("db-from-api", "second")
            .replace("principals:", "principalz:")
    )
    .replace("name: db-from-api", "name: third");
    std::fs::write(dir.path().join("c.yaml"), bad).expect("write");
    let out = palisade()
        .args(["policy", "check"])
        .arg(dir.path())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("b.yaml: document 0: metadata.name"),
        "{stderr}"
    );
    assert!(
        stderr.contains("c.yaml: document 1: spec.rules[0].from[0].source.principalz"),
        "{stderr}"
    );
}

#[test]
fn principals_that_can_never_match_are_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = std::fs::read_to_string(repo("deploy/local/policies/db.yaml")).expect("read");
    let file = dir.path().join("db.yaml");
    for (bad, why) in [
        ("cluster.local/ns/demo/sa/api/", "path ends with '/'"),
        ("spiffe://Cluster.Local/ns/demo/sa/api", "lowercase"),
    ] {
        std::fs::write(&file, good.replace("cluster.local/ns/demo/sa/api", bad)).expect("write");
        let out = palisade()
            .args(["policy", "check"])
            .arg(&file)
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(1), "{bad}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("db.yaml: document 0: spec.rules[0].from[0].source.principals[0]"),
            "{stderr}"
        );
        assert!(stderr.contains("can never match"), "{stderr}");
        assert!(stderr.contains(why), "{stderr}");
    }
}

#[test]
fn a_file_without_policy_documents_is_an_error_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = std::fs::read_to_string(repo("deploy/local/policies/db.yaml")).expect("read");
    std::fs::write(dir.path().join("api.yaml"), &good).expect("write");
    let file = dir.path().join("db.yaml");
    for text in ["", "# emptied\n", "---\n"] {
        std::fs::write(&file, text).expect("write");
        // The file alone, and the directory holding it.
        for arg in [&file, &dir.path().to_path_buf()] {
            let out = palisade()
                .args(["policy", "check"])
                .arg(arg)
                .output()
                .expect("run");
            assert_eq!(out.status.code(), Some(1), "{text:?} {}", arg.display());
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                stderr.contains(&format!(
                    "{}: document 0: (file): the file has no policy documents \
                     (delete the file to remove its policies)",
                    file.display()
                )),
                "{stderr}"
            );
        }
    }
}

/// `palisade ARGS…`: (exit code, stdout, stderr).
fn run(args: &[&std::ffi::OsStr]) -> (i32, String, String) {
    let out = palisade().args(args).output().expect("run");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `palisade authz explain --mesh MESH ARGS…`.
fn explain(mesh: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let mut all: Vec<&std::ffi::OsStr> = vec!["authz".as_ref(), "explain".as_ref()];
    all.push("--mesh".as_ref());
    all.push(mesh.as_os_str());
    all.extend(args.iter().map(|a| std::ffi::OsStr::new(*a)));
    run(&all)
}

#[test]
fn explain_prints_the_decision_first_and_exits_1_on_deny() {
    let mesh = repo("deploy/local/mesh.yaml");
    let (code, out, _) = explain(
        &mesh,
        &[
            "--workload",
            "db",
            "--from",
            "spiffe://cluster.local/ns/demo/sa/web",
        ],
    );
    assert!(out.starts_with("DENY "), "{out}");
    assert_eq!(code, 1, "{out}");
    let (code, out, err) = explain(
        &mesh,
        &["--workload", "db", "--from", "cluster.local/ns/demo/sa/api"],
    );
    assert!(
        out.starts_with("ALLOW policy demo/db-from-api rule 0"),
        "{out}"
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(err, "", "a caller the mesh has is not warned about");
    let (code, out, _) = explain(
        &mesh,
        &[
            "--workload",
            "db",
            "--from",
            "cluster.local/ns/demo/sa/api",
            "--method",
            "DELETE",
        ],
    );
    assert!(out.starts_with("DENY "), "{out}");
    assert_eq!(code, 1);
    let (code, out, _) = explain(
        &mesh,
        &[
            "--workload",
            "web",
            "--from",
            "cluster.local/ns/demo/sa/api",
        ],
    );
    assert!(
        out.starts_with("ALLOW by the mesh defaultPolicy allow"),
        "{out}"
    );
    assert_eq!(code, 0);
    let (code, out, err) = explain(&mesh, &["--workload", "nope", "--from", "x"]);
    assert_eq!(code, 1);
    assert_eq!(out, "");
    assert!(err.starts_with("error: "), "{err}");
}

#[test]
fn explain_says_which_condition_of_each_allow_rule_failed() {
    let mesh = repo("deploy/local/mesh.yaml");
    let (_, out, _) = explain(
        &mesh,
        &["--workload", "db", "--from", "cluster.local/ns/demo/sa/web"],
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "DENY no ALLOW policy matched", "{out}");
    assert_eq!(
        lines[1],
        "  demo/db-from-api rule 0: principals [cluster.local/ns/demo/sa/api] does not contain cluster.local/ns/demo/sa/web",
        "{out}"
    );
    let (_, out, _) = explain(
        &mesh,
        &[
            "--workload",
            "db",
            "--from",
            "cluster.local/ns/demo/sa/api",
            "--method",
            "POST",
        ],
    );
    assert_eq!(
        out.lines().nth(1),
        Some("  demo/db-from-api rule 0: methods [GET, HEAD] does not contain POST"),
        "{out}"
    );
}

/// A mesh of three workloads in a temp dir: `db` (HTTP, appPort 15432), `cache` (opaque,
/// appPort 16379) and `api` (no app port), with `policies` written to its policies directory.
fn temp_mesh(policies: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("mesh.yaml"),
        "trustDomain: cluster.local\ndefaultPolicy: allow\npolicies: policies/\nworkloads:
  - { name: db, namespace: demo, labels: { app: db }, appPort: 15432, inboundPort: 14145, adminPort: 14193 }
  - { name: cache, namespace: demo, labels: { app: cache }, appPort: 16379, inboundPort: 14146, adminPort: 14194 }
  - { name: api, namespace: demo, labels: { app: api }, inboundPort: 14144, adminPort: 14192 }
services:
  - { name: db, namespace: demo, port: 5432, selector: { app: db }, protocol: http }
  - { name: cache, namespace: demo, port: 6379, selector: { app: cache }, protocol: opaque }
",
    )
    .expect("write mesh");
    std::fs::create_dir_all(dir.path().join("policies")).expect("mkdir");
    for (name, text) in policies {
        std::fs::write(dir.path().join("policies").join(name), text).expect("write policy");
    }
    dir
}

const PA: &str = "apiVersion: palisade.dev/v1alpha1\nkind: PeerAuthentication\n";
const AP: &str = "apiVersion: palisade.dev/v1alpha1\nkind: AuthorizationPolicy\n";

#[test]
fn explain_refuses_plaintext_where_peer_authentication_is_strict() {
    // No PeerAuthentication: STRICT, the mesh default.
    let dir = temp_mesh(&[]);
    let mesh = dir.path().join("mesh.yaml");
    let (code, out, _) = explain(&mesh, &["--workload", "db"]);
    assert_eq!(code, 1);
    assert_eq!(
        out.lines().next(),
        Some("DENY plaintext refused, STRICT (mesh default)"),
        "{out}"
    );
    // An mTLS caller is not refused: authorization decides.
    let (code, out, _) = explain(
        &mesh,
        &["--workload", "db", "--from", "cluster.local/ns/demo/sa/api"],
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("  mTLS STRICT (mesh default)\n"), "{out}");

    // A namespace PERMISSIVE, a workload's port STRICT again, a DENY for plaintext callers.
    let dir = temp_mesh(&[
        (
            "pa.yaml",
            &format!(
                "{PA}metadata: {{ name: default, namespace: palisade-system }}\nspec: {{ mtls: {{ mode: STRICT }} }}\n---\n\
                 {PA}metadata: {{ name: relaxed, namespace: demo }}\nspec: {{ mtls: {{ mode: PERMISSIVE }} }}\n---\n\
                 {PA}metadata: {{ name: db-admin, namespace: demo }}\nspec:\n  selector: {{ matchLabels: {{ app: db }} }}\n  portLevelMtls: {{ \"9090\": {{ mode: STRICT }} }}\n"
            ),
        ),
        (
            "deny.yaml",
            &format!(
                "{AP}metadata: {{ name: no-plaintext-writes, namespace: demo }}\nspec:\n  action: DENY\n  rules:\n    - from: [ {{ source: {{ notPrincipals: [\"*\"] }} }} ]\n      to: [ {{ operation: {{ methods: [\"POST\"] }} }} ]\n"
            ),
        ),
    ]);
    let mesh = dir.path().join("mesh.yaml");
    let (code, out, _) = explain(&mesh, &["--workload", "db"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.starts_with("ALLOW by the mesh defaultPolicy allow"),
        "{out}"
    );
    assert!(
        out.contains(
            "  mTLS PERMISSIVE (PeerAuthentication demo/relaxed): plaintext accepted, the caller has no identity\n"
        ),
        "{out}"
    );
    let (code, out, _) = explain(&mesh, &["--workload", "db", "--method", "POST"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.starts_with("DENY policy demo/no-plaintext-writes rule 0\n"),
        "{out}"
    );
    // portLevelMtls is keyed by the workload's port.
    let (code, out, _) = explain(&mesh, &["--workload", "db", "--port", "9090"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.starts_with("DENY plaintext refused, STRICT (PeerAuthentication demo/db-admin)\n"),
        "{out}"
    );
    assert!(out.contains("GET / port 9090"), "{out}");
    // DISABLE lets plaintext through too.
    let dir = temp_mesh(&[(
        "pa.yaml",
        &format!(
            "{PA}metadata: {{ name: plain, namespace: demo }}\nspec: {{ selector: {{ matchLabels: {{ app: db }} }}, mtls: {{ mode: DISABLE }} }}\n"
        ),
    )]);
    let (code, out, _) = explain(&dir.path().join("mesh.yaml"), &["--workload", "db"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("  mTLS DISABLE (PeerAuthentication demo/plain): plaintext accepted"));
}

#[test]
fn explain_follows_the_app_protocol_as_the_proxy_does() {
    let dir = temp_mesh(&[(
        "db.yaml",
        &format!(
            "{AP}metadata: {{ name: gets, namespace: demo }}\nspec:\n  rules: [ {{ to: [ {{ operation: {{ methods: [\"GET\"] }} }} ] }} ]\n"
        ),
    )]);
    let mesh = dir.path().join("mesh.yaml");
    let api = ["--from", "cluster.local/ns/demo/sa/api"];
    // A TCP stream never reaches an HTTP app.
    let (code, out, _) = explain(&mesh, &[&["--workload", "db", "--tcp"][..], &api].concat());
    assert_eq!(code, 1, "{out}");
    assert!(
        out.starts_with("DENY opaque TCP refused: the workload's protocol is http"),
        "{out}"
    );
    // To an opaque app even HTTP is a TCP stream: a methods rule cannot allow it.
    let (code, out, _) = explain(&mesh, &[&["--workload", "cache"][..], &api].concat());
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("demo/gets rule 0: it uses HTTP-only fields"),
        "{out}"
    );
    assert!(
        out.contains("the proxy authorizes the connection as TCP"),
        "{out}"
    );
}

#[test]
fn explain_warns_about_callers_the_mesh_does_not_have() {
    let mesh = repo("deploy/local/mesh.yaml");
    let (code, out, err) = explain(
        &mesh,
        &[
            "--workload",
            "web",
            "--from",
            "other.example/ns/demo/sa/api",
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        err,
        "warning: --from spiffe://other.example/ns/demo/sa/api is not in the mesh's trust domain cluster.local: no workload of this mesh has it\n"
    );
    let (_, _, err) = explain(
        &mesh,
        &[
            "--workload",
            "web",
            "--from",
            "cluster.local/ns/demo/sa/apii",
        ],
    );
    assert_eq!(
        err,
        "warning: --from spiffe://cluster.local/ns/demo/sa/apii: no workload of the mesh has this identity\n"
    );
    // Not an identity at all: no verified caller can have it.
    let (code, out, err) = explain(
        &mesh,
        &[
            "--workload",
            "web",
            "--from",
            "cluster.local/ns/demo/sa/api/",
        ],
    );
    assert_eq!((code, out.as_str()), (1, ""));
    assert!(
        err.starts_with("error: --from \"cluster.local/ns/demo/sa/api/\" is not a SPIFFE ID"),
        "{err}"
    );
}

#[test]
fn explain_live_needs_a_running_mesh() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (code, out, err) = run(&[
        "authz".as_ref(),
        "explain".as_ref(),
        "--live".as_ref(),
        "--state-dir".as_ref(),
        dir.path().as_os_str(),
        "--workload".as_ref(),
        "db".as_ref(),
    ]);
    assert_eq!((code, out.as_str()), (1, ""));
    assert!(err.contains("no running mesh"), "{err}");
}

/// `palisade policy check ARGS…`.
fn check(args: &[&std::ffi::OsStr]) -> (i32, String, String) {
    let mut all: Vec<&std::ffi::OsStr> = vec!["policy".as_ref(), "check".as_ref()];
    all.extend_from_slice(args);
    run(&all)
}

#[test]
fn policy_check_with_a_mesh_warns_about_what_fits_no_workload() {
    let demo = repo("deploy/local/mesh.yaml");
    // The demo's policies fit the demo's mesh.
    let (code, _, err) = check(&[
        repo("deploy/local/policies").as_os_str(),
        "--mesh".as_ref(),
        demo.as_os_str(),
        "--strict".as_ref(),
    ]);
    assert_eq!((code, err.as_str()), (0, ""));

    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("db.yaml");
    let good = std::fs::read_to_string(repo("deploy/local/policies/db.yaml")).expect("read");
    let typos = good
        .replace("{ app: db }", "{ app: dbx }")
        .replace("sa/api", "sa/apii")
        .replace(
            "methods: [\"GET\", \"HEAD\"]",
            "methods: [\"GET\"]\n            ports: [\"18082\", \"5432\"]",
        );
    let text = format!(
        "{good}---\n{}",
        typos.replace("name: db-from-api", "name: typos")
    );
    std::fs::write(&file, &text).expect("write");
    let f = file.display();
    let (code, out, err) = check(&[file.as_os_str(), "--mesh".as_ref(), demo.as_os_str()]);
    assert_eq!(code, 0, "warnings alone do not fail: {err}");
    assert!(out.starts_with("ok: 2 resources"), "{out}");
    let warnings: Vec<&str> = err.lines().filter(|l| l.starts_with("warning: ")).collect();
    assert_eq!(
        warnings,
        [
            format!(
                "warning: {f}: document 1: spec.selector.matchLabels: no workload in namespace demo has the labels app=dbx"
            ),
            format!(
                "warning: {f}: document 1: spec.rules[0].from[0].source.principals[0]: no workload of the mesh has the identity \"cluster.local/ns/demo/sa/apii\""
            ),
        ],
        "{err}"
    );
    // With the selector right, the ports are checked against db's appPort.
    std::fs::write(&file, text.replace("{ app: dbx }", "{ app: db }")).expect("write");
    let (_, _, err) = check(&[file.as_os_str(), "--mesh".as_ref(), demo.as_os_str()]);
    assert!(
        err.contains(&format!(
            "warning: {f}: document 1: spec.rules[0].to[0].operation.ports[1]: no workload this policy selects serves port 5432 (their ports: 18082;"
        )),
        "{err}"
    );
    assert!(!err.contains("ports[0]"), "18082 is db's appPort: {err}");
    // --strict: warnings fail with 2.
    let (code, _, err) = check(&[
        file.as_os_str(),
        "--mesh".as_ref(),
        demo.as_os_str(),
        "--strict".as_ref(),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("(--strict: exit 2)"), "{err}");
    // Without --mesh, nothing is cross-checked.
    let (code, _, err) = check(&[file.as_os_str(), "--strict".as_ref()]);
    assert_eq!((code, err.as_str()), (0, ""));
    // Errors still exit 1, warnings or not.
    std::fs::write(&file, text.replace("principals:", "principalz:")).expect("write");
    let (code, _, err) = check(&[
        file.as_os_str(),
        "--mesh".as_ref(),
        demo.as_os_str(),
        "--strict".as_ref(),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("principalz"), "{err}");
    assert!(!err.contains("warning: "), "{err}");
}

#[test]
fn the_readme_shows_what_explain_prints() {
    let readme = std::fs::read_to_string(repo("README.md")).expect("README");
    let cmd = "$ cargo run --release -- authz explain --workload db --from cluster.local/ns/demo/sa/web\n";
    let shown = readme
        .split_once(cmd)
        .and_then(|(_, rest)| rest.split_once("```"))
        .map(|(block, _)| block)
        .expect("the README shows authz explain");
    // Run as the README runs it: from the repository, with the default mesh file.
    let out = palisade()
        .current_dir(repo(""))
        .args([
            "authz",
            "explain",
            "--workload",
            "db",
            "--from",
            "cluster.local/ns/demo/sa/web",
        ])
        .env_remove("PALISADE_MESH")
        .output()
        .expect("run");
    assert_eq!(String::from_utf8_lossy(&out.stdout), shown);
}

const ROUTE: &str = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n";

#[test]
fn policy_check_validates_routes_faults_and_rate_limits_like_policies() {
    // Good: a split of db's traffic with a fault, a rate limit; checked alone and against the
    // mesh.
    let good = format!(
        "{ROUTE}metadata: {{ name: db-split, namespace: demo }}\nspec:\n  parentRefs: [ {{ kind: Service, name: db, port: 5432 }} ]\n  rules:\n    - matches: [ {{ path: {{ type: PathPrefix, value: /v2 }} }} ]\n      filters: [ {{ type: ExtensionRef, extensionRef: {{ group: palisade.dev, kind: HTTPFault, name: slow }} }} ]\n      backendRefs: [ {{ name: db, port: 5432, weight: 90 }}, {{ name: cache, port: 6379, weight: 10 }} ]\n      timeouts: {{ request: 2s }}\n---\napiVersion: palisade.dev/v1alpha1\nkind: HTTPFault\nmetadata: {{ name: slow, namespace: demo }}\nspec: {{ delay: {{ fixedDelay: 100ms, percentage: 50 }} }}\n---\napiVersion: palisade.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {{ name: db-limits, namespace: demo }}\nspec: {{ selector: {{ matchLabels: {{ app: db }} }}, identity: {{ requestsPerSecond: 10 }} }}\n"
    );
    let dir = temp_mesh(&[("routes.yaml", &good)]);
    let mesh = dir.path().join("mesh.yaml");
    let policies = dir.path().join("policies");
    let (code, out, err) = check(&[policies.as_os_str(), "--mesh".as_ref(), mesh.as_os_str()]);
    assert_eq!(code, 0, "{out}{err}");
    for line in [
        "HTTPRoute demo/db-split",
        "HTTPFault demo/slow",
        "RateLimitPolicy demo/db-limits",
    ] {
        assert!(out.contains(line), "{line} in {out}");
    }

    // Bad, each named by file, document and field: an unknown match type, a broken regex, a
    // zero percentage, a missing fault, a backend the mesh does not have.
    let bad = good
        .replace("type: PathPrefix, value: /v2", "type: Prefix, value: /v2")
        .replace("name: slow }", "name: missing }")
        .replace("name: cache, port: 6379", "name: ghost, port: 6379")
        .replace("requestsPerSecond: 10", "requestsPerSecond: 0");
    std::fs::write(policies.join("routes.yaml"), &bad).expect("write");
    let (code, _, err) = check(&[policies.as_os_str()]);
    assert_eq!(code, 1, "{err}");
    let file = policies.join("routes.yaml");
    let at = |doc: usize, field: &str| format!("{}: document {doc}: {field}", file.display());
    assert!(
        err.contains(&at(0, "spec.rules[0].matches[0].path.type")),
        "{err}"
    );
    assert!(
        err.contains(&at(2, "spec.identity.requestsPerSecond")),
        "{err}"
    );
    // The fault reference and the mesh's services are checked once the documents parse.
    let bad = good
        .replace("name: slow }", "name: missing }")
        .replace("name: cache, port: 6379", "name: ghost, port: 6379");
    std::fs::write(policies.join("routes.yaml"), &bad).expect("write");
    let (code, _, err) = check(&[policies.as_os_str()]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&at(
            0,
            "spec.rules[0].filters[0].extensionRef.name: no HTTPFault demo/missing"
        )),
        "{err}"
    );
    assert!(
        !err.contains("ghost"),
        "without --mesh the services are not known: {err}"
    );
    let (code, _, err) = check(&[policies.as_os_str(), "--mesh".as_ref(), mesh.as_os_str()]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&at(
            0,
            "spec.rules[0].backendRefs[1]: no service ghost.demo:6379"
        )),
        "{err}"
    );
    // A Gateway's route, a consumer route and an unsupported field are refused, not ignored.
    for (from, to, field) in [
        (
            "kind: Service, name: db, port: 5432",
            "name: public-gateway",
            "spec.parentRefs[0]",
        ),
        (
            "kind: Service, name: db, port: 5432",
            "kind: Service, name: db, namespace: prod, port: 5432",
            "spec.parentRefs[0].namespace",
        ),
        (
            "timeouts: { request: 2s }",
            "sessionPersistence: { sessionName: x }",
            "spec.rules[0].sessionPersistence",
        ),
    ] {
        std::fs::write(policies.join("routes.yaml"), good.replace(from, to)).expect("write");
        let (code, _, err) = check(&[policies.as_os_str()]);
        assert_eq!(code, 1, "{to}: {err}");
        assert!(err.contains(&at(0, field)), "{field}: {err}");
    }
}
