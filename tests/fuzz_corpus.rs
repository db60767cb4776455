//! The committed fuzz corpus (`fuzz/corpus/<target>/`), replayed on stable as regression
//! tests: every file through the same entry function its cargo-fuzz target calls
//! (`fuzz/fuzz_targets/<target>.rs`), which asserts the parser's properties itself.
//!
//! File names say what is expected: `valid-*` must be accepted, `invalid-*` refused, and
//! anything else (documentation examples, minimized crash inputs `crash-*`, `oom-*`,
//! `timeout-*`) must only not panic. See docs/reliability.md, "Fuzzing".

use std::path::PathBuf;
use std::time::{Duration, Instant};

type Entry = fn(&[u8]) -> bool;

/// Far above what any corpus file takes (milliseconds), far below a hang.
const SLOW: Duration = Duration::from_secs(10);

fn replay(target: &str, entry: Entry) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let (mut valid, mut invalid) = (0, 0);
    for file in &files {
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .expect("a UTF-8 file name");
        let data = std::fs::read(file).expect("readable");
        let started = Instant::now();
        let accepted = std::panic::catch_unwind(|| entry(&data))
            .unwrap_or_else(|_| panic!("{target}: {name} panicked (see above)"));
        let took = started.elapsed();
        assert!(took < SLOW, "{target}: {name} took {took:?}");
        if name.starts_with("valid-") {
            assert!(accepted, "{target}: {name} was refused");
            valid += 1;
        } else if name.starts_with("invalid-") {
            assert!(!accepted, "{target}: {name} was accepted");
            invalid += 1;
        }
    }
    assert!(
        valid > 0 && invalid > 0,
        "{target}: the corpus needs inputs to accept and to refuse ({} files, {valid} valid, {invalid} invalid)",
        files.len()
    );
}

#[test]
fn detect() {
    replay("detect", palisade_proxy::fuzzing::detect_and_peek);
}

#[test]
fn static_config() {
    replay("static_config", palisade_proxy::fuzzing::static_config);
}

#[test]
fn spiffe_id() {
    replay("spiffe_id", palisade_certs::fuzzing::spiffe_id);
}

#[test]
fn duration() {
    replay("duration", palisade_certs::fuzzing::duration);
}

#[test]
fn svid_der() {
    replay("svid_der", palisade_certs::fuzzing::svid_der);
}

#[test]
fn csr_der() {
    replay("csr_der", palisade_control_plane::fuzzing::csr_der);
}

#[test]
fn policy_yaml() {
    replay("policy_yaml", palisade_api::fuzzing::policy_yaml);
}

#[test]
fn mesh_yaml() {
    replay("mesh_yaml", palisade_control_plane::fuzzing::mesh_yaml);
}

#[test]
fn admission_review() {
    replay(
        "admission_review",
        palisade_control_plane::fuzzing::admission_review,
    );
}

/// Every fuzz target has its corpus replayed here, and every corpus has a target.
#[test]
fn every_target_is_replayed() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let names = |dir: &str, strip: &str| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(root.join(dir))
            .expect("fuzz/ is in the repository")
            .map(|e| {
                let name = e.expect("an entry").file_name();
                name.to_string_lossy().trim_end_matches(strip).to_string()
            })
            .collect();
        v.sort();
        v
    };
    let replayed = [
        "admission_review",
        "csr_der",
        "detect",
        "duration",
        "mesh_yaml",
        "policy_yaml",
        "spiffe_id",
        "static_config",
        "svid_der",
    ];
    assert_eq!(names("fuzz_targets", ".rs"), replayed);
    assert_eq!(names("corpus", ""), replayed);
}
