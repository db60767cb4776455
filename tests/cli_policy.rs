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

#[test]
fn explain_prints_the_decision_first() {
    let run = |args: &[&str]| {
        let out = palisade()
            .args(["authz", "explain", "--mesh"])
            .arg(repo("deploy/local/mesh.yaml"))
            .args(args)
            .output()
            .expect("run");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let out = run(&[
        "--workload",
        "db",
        "--from",
        "spiffe://cluster.local/ns/demo/sa/web",
    ]);
    assert!(out.starts_with("DENY "), "{out}");
    let out = run(&["--workload", "db", "--from", "cluster.local/ns/demo/sa/api"]);
    assert!(
        out.starts_with("ALLOW policy demo/db-from-api rule 0"),
        "{out}"
    );
    let out = run(&[
        "--workload",
        "db",
        "--from",
        "cluster.local/ns/demo/sa/api",
        "--method",
        "DELETE",
    ]);
    assert!(out.starts_with("DENY "), "{out}");
    let out = run(&[
        "--workload",
        "web",
        "--from",
        "cluster.local/ns/demo/sa/api",
    ]);
    assert!(
        out.starts_with("ALLOW by the mesh defaultPolicy allow"),
        "{out}"
    );
    let out = palisade()
        .args(["authz", "explain", "--mesh"])
        .arg(repo("deploy/local/mesh.yaml"))
        .args(["--workload", "nope", "--from", "x"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: "));
}
