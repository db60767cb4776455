//! `palisade authz explain --live` against a running `palisade up`: it answers from what the
//! control plane serves, so it follows a good edit and keeps answering from the last good
//! config when an edit is rejected, where explaining from the files cannot.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use support::*;

fn policy(name: &str, principal: &str) -> String {
    format!(
        "apiVersion: palisade.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{ name: {name}, namespace: demo }}\nspec:\n  selector: {{ matchLabels: {{ app: db }} }}\n  rules:\n    - from: [ {{ source: {{ principals: [\"cluster.local/ns/demo/sa/{principal}\"] }} }} ]\n"
    )
}

fn spec() -> MeshSpec {
    MeshSpec {
        lifetime: "1h",
        default_policy: "allow",
        workloads: vec![
            WorkloadSpec::demo("web", "app: web", vec![("db.demo", 5432)]),
            WorkloadSpec::demo("db", "app: db", vec![]),
        ],
        services: vec![("db", 5432, "app: db", "http")],
    }
}

/// `palisade authz explain ARGS… --workload db --from <web>`: (exit code, stdout, stderr).
fn explain_web_to_db(args: &[&std::ffi::OsStr]) -> (i32, String, String) {
    let out = std::process::Command::new(palisade())
        .args(["authz", "explain"])
        .args(args)
        .args([
            "--workload",
            "db",
            "--from",
            "spiffe://cluster.local/ns/demo/sa/web",
        ])
        .output()
        .expect("run explain");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn live(state: &Path) -> (i32, String, String) {
    explain_web_to_db(&["--live".as_ref(), "--state-dir".as_ref(), state.as_os_str()])
}

fn files(mesh_file: &Path) -> (i32, String, String) {
    explain_web_to_db(&["--mesh".as_ref(), mesh_file.as_os_str()])
}

/// The generation in explain's `config: generation N, served by …` line.
fn generation(out: &str) -> u64 {
    out.lines()
        .find_map(|l| l.trim().strip_prefix("config: generation "))
        .and_then(|rest| rest.split(',').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no served generation in {out}"))
}

#[test]
fn explain_live_answers_from_the_last_config_the_control_plane_accepted() {
    let mesh = spec().start(&[("db.yaml", &policy("db-from-web", "web"))]);
    let status: SocketAddr = mesh.mesh_json()["controlPlaneStatus"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("controlPlaneStatus in mesh.json");
    let to_db = mesh.upstream("web", "db.demo");

    // The files and the running mesh agree, and so does the proxy.
    let (code, out, err) = live(&mesh.state);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.starts_with("ALLOW policy demo/db-from-web rule 0\n"),
        "{out}"
    );
    assert!(
        out.contains(&format!("served by the control plane ({status})")),
        "{out}"
    );
    let first = generation(&out);
    let (code, out, _) = files(&mesh.mesh_file);
    assert!(code == 0 && out.starts_with("ALLOW policy demo/db-from-web rule 0\n"));
    assert_eq!(http_get(to_db, "/").expect("web -> db").0, 200);

    // A good edit: --live follows it (a new generation), as the proxy does.
    mesh.write_policy("db.yaml", &policy("db-from-db", "db"));
    let mut denied = String::new();
    assert!(
        eventually(Duration::from_secs(10), || {
            let (code, out, _) = live(&mesh.state);
            denied = out;
            code == 1
        }),
        "explain --live never saw the edit: {denied}"
    );
    let why = "  demo/db-from-db rule 0: principals [cluster.local/ns/demo/sa/db] does not contain cluster.local/ns/demo/sa/web\n";
    assert!(
        denied.starts_with(&format!("DENY no ALLOW policy matched\n{why}")),
        "{denied}"
    );
    let accepted = generation(&denied);
    assert!(accepted > first, "{first} -> {accepted}");
    assert!(
        eventually(Duration::from_secs(5), || http_get(to_db, "/")
            .is_ok_and(|(s, _)| s == 403)),
        "the proxy did not follow the edit"
    );

    // A broken edit: the control plane rejects it and keeps serving the last good config.
    let rejections = || {
        http_get(status, "/metrics")
            .map(|(_, body)| metric_sum(&body, "palisade_config_rejections_total", &[]))
            .unwrap_or(0.0)
    };
    let before = rejections();
    mesh.write_policy(
        "db.yaml",
        &policy("db-from-web", "web").replace("principals:", "principalz:"),
    );
    assert!(
        eventually(Duration::from_secs(10), || rejections() > before),
        "the control plane did not reject the broken file:\n{}",
        mesh.logs()
    );
    // The files no longer explain anything; the mesh still enforces the last good policy.
    let (code, out, err) = files(&mesh.mesh_file);
    assert_eq!((code, out.as_str()), (1, ""), "{err}");
    assert!(
        err.starts_with("error: ") && err.contains("principalz"),
        "{err}"
    );
    let (code, out, err) = live(&mesh.state);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.starts_with(&format!("DENY no ALLOW policy matched\n{why}")),
        "{out}"
    );
    assert_eq!(generation(&out), accepted, "{out}");
    assert_eq!(http_get(to_db, "/").expect("web -> db").0, 403);

    // A workload the running mesh does not have.
    let out = std::process::Command::new(palisade())
        .args(["authz", "explain", "--live", "--state-dir"])
        .arg(&mesh.state)
        .args(["--workload", "nope"])
        .output()
        .expect("run explain");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("404 Not Found: the mesh has no workload named \"nope\""),
        "{err}"
    );
}
