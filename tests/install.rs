//! `palisade install`, run as the built binary, and `deploy/kubernetes/`, which is its output:
//!
//! - `deploy/kubernetes/palisade.yaml` is `palisade install --no-identity`, byte for byte;
//! - `deploy/kubernetes/example/identity.yaml` is the rest of `palisade install --ca <CA>`, byte
//!   for byte, for an example CA whose keys are public: the CA is the one in that file's
//!   Secret, so the whole output of `palisade install` is checked, Secrets included.
//!
//! `PALISADE_BLESS=1 cargo test --test install` rewrites both files from the current code
//! (keeping the example CA; a new one if identity.yaml is gone).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use base64::Engine;
use palisade_control_plane::k8s::manifests;
use serde_json::Value;

/// The first lines of `deploy/kubernetes/example/identity.yaml`, before what `palisade install`
/// prints.
const EXAMPLE_HEADER: &str = "\
# EXAMPLE ONLY. The mesh CA part of `palisade install --ca <CA>` for an example CA whose private
# keys are public (they are in this file): whoever has this file can mint any identity of a
# mesh that trusts it. For a throwaway cluster only, after deploy/kubernetes/palisade.yaml:
#   kubectl apply -f deploy/kubernetes/palisade.yaml
#   kubectl apply -f deploy/kubernetes/example/identity.yaml
# Any other cluster: palisade install [--ca DIR] | kubectl apply -f -   (docs/kubernetes.md)
# tests/install.rs keeps this file equal to that output; PALISADE_BLESS=1 rewrites it.
";

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes")
}

fn bless() -> bool {
    std::env::var_os("PALISADE_BLESS").is_some()
}

fn palisade(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("PALISADE_LOG")
        .env_remove("PALISADE_LOG_FORMAT")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run palisade {args:?}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).expect("UTF-8 output")
}

/// `palisade install ARGS`' standard output; it must succeed.
fn install(args: &[&str]) -> (String, String) {
    let mut all = vec!["install"];
    all.extend_from_slice(args);
    let o = palisade(&all);
    assert!(
        o.status.success(),
        "palisade {all:?} failed: {}",
        text(&o.stderr)
    );
    (text(&o.stdout), text(&o.stderr))
}

/// Compares `actual` with the committed file, or (PALISADE_BLESS) writes it there.
fn golden(path: &Path, actual: &str) {
    if bless() {
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, actual).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        return;
    }
    let expected = std::fs::read_to_string(path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (PALISADE_BLESS=1 cargo test --test install writes it)",
            path.display()
        )
    });
    if expected != actual {
        let line = expected
            .lines()
            .zip(actual.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(expected.lines().count().min(actual.lines().count()));
        panic!(
            "{} differs from `palisade install`'s output from line {} on:\n  file:   {:?}\n  output: {:?}\n\
             If the change is intended: PALISADE_BLESS=1 cargo test --test install",
            path.display(),
            line + 1,
            expected.lines().nth(line),
            actual.lines().nth(line),
        );
    }
}

fn documents(yaml: &str) -> Vec<Value> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(yaml).expect("install prints YAML");
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn decode(v: &Value) -> String {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(v.as_str().expect("base64 string"))
        .expect("base64");
    String::from_utf8(bytes).expect("PEM")
}

/// Writes the CA of a `palisade-identity` Secret into `dir` as `palisade ca init` lays it out
/// (key 0600, as `palisade install --ca` requires).
fn write_ca(secret: &Value, dir: &Path) {
    std::fs::create_dir_all(dir).expect("mkdir");
    let data = &secret["data"];
    let file = |name: &str, key: &str, mode: u32| {
        let mut o = std::fs::OpenOptions::new();
        o.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            o.mode(mode);
        }
        let _ = mode;
        o.open(dir.join(name))
            .and_then(|mut f| f.write_all(decode(&data[key]).as_bytes()))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    };
    file("root-cert.pem", manifests::TRUST_ANCHOR_KEY, 0o644);
    file("issuer-cert.pem", manifests::ISSUER_CERT_KEY, 0o644);
    file("issuer-key.pem", manifests::ISSUER_KEY_KEY, 0o600);
}

/// The example CA: from the committed identity.yaml, or (PALISADE_BLESS, when there is none)
/// a new one whose issuer lives as long as its root, so that the file stays usable.
fn example_ca(dir: &Path) -> PathBuf {
    let ca_dir = dir.join("example-ca");
    let path = deploy_dir().join("example/identity.yaml");
    match std::fs::read_to_string(&path) {
        Ok(yaml) => write_ca(
            find(&documents(&yaml), "Secret", manifests::IDENTITY_SECRET),
            &ca_dir,
        ),
        Err(_) if bless() => {
            let td = palisade_certs::TrustDomain::new("cluster.local").expect("td");
            palisade_certs::Ca::generate(&td, Some(palisade_certs::ca::ROOT_TTL))
                .expect("CA")
                .save(&ca_dir)
                .expect("save");
        }
        Err(e) => panic!(
            "{}: {e} (PALISADE_BLESS=1 cargo test --test install writes it)",
            path.display()
        ),
    }
    ca_dir
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

#[test]
fn deploy_kubernetes_is_what_install_prints() {
    let (static_part, _) = install(&["--no-identity"]);
    assert!(static_part.starts_with(manifests::HEADER));
    golden(&deploy_dir().join("palisade.yaml"), &static_part);

    let tmp = tempfile::tempdir().expect("tempdir");
    let ca = example_ca(tmp.path());
    let (full, stderr) = install(&["--ca", s(&ca)]);
    assert_eq!(stderr, "", "nothing to say with --ca");
    let identity = full.strip_prefix(&static_part).unwrap_or_else(|| {
        panic!("`palisade install --ca` does not start with `palisade install --no-identity`")
    });
    assert!(identity.starts_with(manifests::IDENTITY_HEADER));
    golden(
        &deploy_dir().join("example/identity.yaml"),
        &format!("{EXAMPLE_HEADER}{identity}"),
    );

    // Re-running with the same CA prints the same bytes: an upgrade keeps the identities.
    assert_eq!(install(&["--ca", s(&ca)]).0, full);
}

/// Without `--ca`, every run is a new CA (and says so); the three places the trust anchor
/// goes agree, and the trust domain is the one asked for.
#[test]
fn install_generates_a_ca_when_given_none() {
    let (a, warning) = install(&["--trust-domain", "example.org"]);
    assert!(
        warning.contains("generated a new mesh CA for trust domain example.org"),
        "{warning}"
    );
    assert!(warning.contains("--ca DIR"), "{warning}");
    let (b, _) = install(&[]);
    let docs_a = documents(&a);
    let docs_b = documents(&b);
    let anchor = |docs: &[Value]| {
        let secret = find(docs, "Secret", manifests::IDENTITY_SECRET);
        let bundle = find(docs, "ConfigMap", manifests::TRUST_BUNDLE_CONFIG_MAP);
        let hooks = find(
            docs,
            "MutatingWebhookConfiguration",
            manifests::WEBHOOK_CONFIGURATION,
        );
        let root = decode(&secret["data"][manifests::TRUST_ANCHOR_KEY]);
        assert!(root.starts_with("-----BEGIN CERTIFICATE-----"), "{root}");
        assert_eq!(bundle["data"][manifests::TRUST_BUNDLE_KEY], root.as_str());
        for hook in hooks["webhooks"].as_array().expect("webhooks") {
            assert_eq!(decode(&hook["clientConfig"]["caBundle"]), root);
        }
        let key = decode(&secret["data"][manifests::ISSUER_KEY_KEY]);
        assert!(key.contains("PRIVATE KEY"), "the issuer key");
        root
    };
    assert_ne!(anchor(&docs_a), anchor(&docs_b), "a new CA each time");

    let dir = tempfile::tempdir().expect("tempdir");
    write_ca(
        find(&docs_a, "Secret", manifests::IDENTITY_SECRET),
        &dir.path().join("ca"),
    );
    let ca = palisade_certs::Ca::load(&dir.path().join("ca")).expect("the Secret holds a CA");
    assert_eq!(ca.trust_domain().as_str(), "example.org");
}

#[test]
fn install_uses_the_image_asked_for() {
    let (out, _) = install(&["--no-identity", "--image", "registry.example/palisade:dev"]);
    let docs = documents(&out);
    let deploy = find(&docs, "Deployment", manifests::NAME);
    assert_eq!(
        deploy["spec"]["template"]["spec"]["containers"][0]["image"],
        "registry.example/palisade:dev"
    );
}

#[test]
fn install_refuses_what_it_cannot_do() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let missing = tmp.path().join("no-such-ca");
    let cases: [(Vec<&str>, &str); 5] = [
        (vec!["--ca", s(&missing)], "cannot load the CA from"),
        (
            vec!["--ca", s(&missing), "--trust-domain", "x.org"],
            "cannot be used with",
        ),
        (
            vec!["--ca", s(&missing), "--no-identity"],
            "cannot be used with",
        ),
        (
            vec!["--trust-domain", "Not A Domain"],
            "invalid trust domain",
        ),
        (vec!["--image", " "], "--image is empty"),
    ];
    for (args, needle) in cases {
        let mut all = vec!["install"];
        all.extend(args.iter().copied());
        let o = palisade(&all);
        assert!(!o.status.success(), "{all:?} succeeded");
        assert!(o.stdout.is_empty(), "{all:?} printed manifests");
        let err = text(&o.stderr);
        assert!(err.contains(needle), "{all:?}: {err:?} lacks {needle:?}");
    }
}
