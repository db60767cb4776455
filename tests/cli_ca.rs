//! `palisade ca init`, `palisade ca issue` and `palisade cert inspect`, run as the built binary.
//! The issued files are checked with openssl when it is installed, as an independent verifier.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

const WEB: &str = "spiffe://example.org/ns/demo/sa/web";
const LIMIT: Duration = Duration::from_secs(60);

/// Runs a command to completion, killing it if it takes longer than `LIMIT`. Err only when
/// the program cannot be started (not installed).
fn try_run(mut cmd: Command) -> std::io::Result<Output> {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + LIMIT;
    loop {
        match child.try_wait()? {
            Some(_) => return child.wait_with_output(),
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{what} did not finish within {LIMIT:?}");
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn run_cmd(cmd: Command) -> Output {
    let what = format!("{cmd:?}");
    try_run(cmd).unwrap_or_else(|e| panic!("cannot run {what}: {e}"))
}

fn palisade(args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_palisade"));
    cmd.args(args)
        .env_remove("RUST_LOG")
        .env_remove("PALISADE_LOG")
        .env_remove("PALISADE_LOG_FORMAT");
    run_cmd(cmd)
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_ok(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what} failed ({:?})\nstdout: {}\nstderr: {}",
        o.status,
        stdout(o),
        stderr(o)
    );
}

/// Non-zero exit with exactly one line on stderr, `error: <one sentence>`, containing `needle`.
fn assert_one_sentence_error(o: &Output, needle: &str) {
    assert!(
        !o.status.success(),
        "expected failure, stdout: {}",
        stdout(o)
    );
    assert_ne!(o.status.code(), Some(0));
    let err = stderr(o);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line on stderr, got: {err:?}");
    assert!(lines[0].starts_with("error: "), "{err:?}");
    assert!(
        !err.contains("Caused by") && !err.contains("panicked") && !err.contains("Backtrace"),
        "{err:?}"
    );
    assert!(
        err.contains(needle),
        "stderr {err:?} should mention {needle:?}"
    );
}

#[cfg(unix)]
fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

fn ls(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn init_ca(dir: &Path) {
    let o = palisade(&[
        "ca",
        "init",
        "--trust-domain",
        "example.org",
        "--out",
        s(dir),
    ]);
    assert_ok(&o, "ca init");
    assert!(stdout(&o).contains("example.org"), "{}", stdout(&o));
}

/// `openssl` with args; None (and a note on stderr) when openssl is not installed.
fn openssl(args: &[&str]) -> Option<Output> {
    let mut cmd = Command::new("openssl");
    cmd.args(args);
    match try_run(cmd) {
        Ok(o) => Some(o),
        Err(e) => {
            eprintln!("openssl cannot be run ({e}): skipping the openssl cross-checks");
            None
        }
    }
}

#[test]
fn init_issue_inspect_and_cross_check_with_openssl() {
    let tmp = tempfile::tempdir().unwrap();
    let ca_dir = tmp.path().join("ca");
    let out = tmp.path().join("web");
    init_ca(&ca_dir);
    assert_eq!(
        ls(&ca_dir),
        [
            "issuer-cert.pem",
            "issuer-key.pem",
            "root-cert.pem",
            "root-key.pem"
        ]
    );
    #[cfg(unix)]
    {
        assert_eq!(mode(&ca_dir.join("root-key.pem")), 0o600);
        assert_eq!(mode(&ca_dir.join("issuer-key.pem")), 0o600);
        assert_eq!(mode(&ca_dir.join("root-cert.pem")) & 0o077, 0o044);
    }

    let o = palisade(&[
        "ca",
        "issue",
        "--ca",
        s(&ca_dir),
        "--spiffe-id",
        WEB,
        "--ttl",
        "1h",
        "--out",
        s(&out),
    ]);
    assert_ok(&o, "ca issue");
    assert!(stdout(&o).contains(WEB), "{}", stdout(&o));
    assert_eq!(ls(&out), ["cert.pem", "key.pem"]);
    #[cfg(unix)]
    assert_eq!(
        mode(&out.join("key.pem")),
        0o600,
        "private key is owner-only"
    );
    let cert_pem = std::fs::read_to_string(out.join("cert.pem")).unwrap();
    assert_eq!(
        cert_pem.matches("-----BEGIN CERTIFICATE-----").count(),
        2,
        "leaf then issuer"
    );
    let key_pem = std::fs::read_to_string(out.join("key.pem")).unwrap();
    assert!(key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));

    // --ttl 1h: NotAfter - NotBefore = 1h + the 60 s backdating (read with x509-parser).
    let leaf_der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).expect("PEM leaf");
    let (_, leaf) = x509_parser::parse_x509_certificate(&leaf_der).expect("DER leaf");
    let v = leaf.validity();
    assert_eq!(
        v.not_after.timestamp() - v.not_before.timestamp(),
        3600 + 60,
        "1h TTL plus 60 s of clock-skew backdating"
    );

    // inspect: the ID, conformance.
    let o = palisade(&["cert", "inspect", s(&out.join("cert.pem"))]);
    assert_ok(&o, "cert inspect");
    let text = stdout(&o);
    assert!(text.contains(&format!("SPIFFE ID:  {WEB}")), "{text}");
    assert!(text.contains("X509-SVID:  conforms (leaf)"), "{text}");
    assert!(text.contains("Validity:   valid"), "{text}");
    assert!(text.contains("CA:         no"), "{text}");
    assert!(text.contains("Subject:    (empty)"), "{text}");
    let o = palisade(&["cert", "inspect", s(&ca_dir.join("root-cert.pem"))]);
    assert_ok(&o, "cert inspect root");
    assert!(
        stdout(&o).contains("SPIFFE ID:  spiffe://example.org\n"),
        "{}",
        stdout(&o)
    );
    assert!(
        stdout(&o).contains("conforms (signing certificate)"),
        "{}",
        stdout(&o)
    );

    // openssl, independently.
    let cert = out.join("cert.pem");
    let Some(v) = openssl(&[
        "verify",
        "-CAfile",
        s(&ca_dir.join("root-cert.pem")),
        "-untrusted",
        s(&cert),
        s(&cert),
    ]) else {
        return;
    };
    assert_ok(&v, "openssl verify");
    assert!(stdout(&v).contains(": OK"), "{}", stdout(&v));
    for purpose in ["sslclient", "sslserver"] {
        let v = openssl(&[
            "verify",
            "-purpose",
            purpose,
            "-CAfile",
            s(&ca_dir.join("root-cert.pem")),
            "-untrusted",
            s(&cert),
            s(&cert),
        ])
        .unwrap();
        assert_ok(&v, &format!("openssl verify -purpose {purpose}"));
    }
    // Without the issuer in the untrusted set, the leaf alone does not chain to the root.
    let leaf_only = tmp.path().join("leaf.pem");
    let first_end = cert_pem.find("-----END CERTIFICATE-----").unwrap();
    std::fs::write(
        &leaf_only,
        &cert_pem[..first_end + "-----END CERTIFICATE-----\n".len()],
    )
    .unwrap();
    let v = openssl(&[
        "verify",
        "-CAfile",
        s(&ca_dir.join("root-cert.pem")),
        s(&leaf_only),
    ])
    .unwrap();
    assert!(
        !v.status.success(),
        "a leaf without its issuer must not verify"
    );

    let x = openssl(&["x509", "-in", s(&cert), "-noout", "-text"]).unwrap();
    assert_ok(&x, "openssl x509 -text");
    let text = stdout(&x);
    for needle in [
        &format!("URI:{WEB}") as &str,
        "CA:FALSE",
        "Digital Signature",
        "TLS Web Server Authentication, TLS Web Client Authentication",
        "X509v3 Subject Alternative Name: critical",
        "X509v3 Key Usage: critical",
        "X509v3 Basic Constraints: critical",
        "prime256v1",
        "ecdsa-with-SHA256",
    ] {
        assert!(
            text.contains(needle),
            "openssl x509 -text lacks {needle:?}:\n{text}"
        );
    }
    // Key usage is digitalSignature only; one URI and nothing else in the SAN.
    let after = |header: &str| {
        let mut it = text.lines().skip_while(|l| !l.contains(header));
        it.next();
        it.next().unwrap_or_default().trim().to_string()
    };
    assert_eq!(after("X509v3 Key Usage"), "Digital Signature");
    assert_eq!(
        after("X509v3 Subject Alternative Name"),
        format!("URI:{WEB}")
    );

    // The key is the certificate's key.
    let from_key = openssl(&["pkey", "-in", s(&out.join("key.pem")), "-pubout"]).unwrap();
    assert_ok(&from_key, "openssl pkey");
    let from_cert = openssl(&["x509", "-in", s(&cert), "-noout", "-pubkey"]).unwrap();
    assert_ok(&from_cert, "openssl x509 -pubkey");
    assert_eq!(stdout(&from_key), stdout(&from_cert));
}

#[test]
fn bad_requests_fail_with_one_sentence_and_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let ca_dir = tmp.path().join("ca");
    init_ca(&ca_dir);
    let issue = |ca: &Path, id: &str, ttl: &str, out: &Path| {
        palisade(&[
            "ca",
            "issue",
            "--ca",
            s(ca),
            "--spiffe-id",
            id,
            "--ttl",
            ttl,
            "--out",
            s(out),
        ])
    };
    let cases: &[(&str, &str, &str, &str)] = &[
        // (case, SPIFFE ID, TTL, what stderr must mention)
        (
            "uppercase trust domain",
            "spiffe://Example.org/ns/demo/sa/web",
            "1h",
            "invalid SPIFFE ID",
        ),
        (
            "trailing slash",
            "spiffe://example.org/ns/demo/",
            "1h",
            "invalid SPIFFE ID",
        ),
        ("not a URI", "web", "1h", "invalid SPIFFE ID"),
        (
            "foreign trust domain",
            "spiffe://other.org/ns/demo/sa/web",
            "1h",
            "other.org",
        ),
        ("trust domain ID", "spiffe://example.org", "1h", "path"),
        ("bad duration", WEB, "forever", "--ttl"),
        ("zero TTL", WEB, "0s", "lifetime"),
    ];
    for (i, (case, id, ttl, needle)) in cases.iter().enumerate() {
        // Half the cases with OUT absent, half with an existing empty OUT.
        let out = tmp.path().join(format!("out{i}"));
        if i % 2 == 1 {
            std::fs::create_dir(&out).unwrap();
        }
        let o = issue(&ca_dir, id, ttl, &out);
        assert_one_sentence_error(&o, needle);
        assert!(stdout(&o).is_empty(), "{case}: {}", stdout(&o));
        if i % 2 == 1 {
            assert!(ls(&out).is_empty(), "{case}: wrote {:?}", ls(&out));
        } else {
            assert!(!out.exists(), "{case}: created {}", out.display());
        }
    }

    // Missing CA directory.
    let out = tmp.path().join("out-missing-ca");
    let o = issue(&tmp.path().join("no-such-ca"), WEB, "1h", &out);
    assert_one_sentence_error(&o, "no-such-ca");
    assert!(!out.exists());

    // A CA directory missing its issuer key.
    let broken = tmp.path().join("broken-ca");
    std::fs::create_dir(&broken).unwrap();
    for f in ["root-cert.pem", "issuer-cert.pem"] {
        std::fs::copy(ca_dir.join(f), broken.join(f)).unwrap();
    }
    let o = issue(&broken, WEB, "1h", &out);
    assert_one_sentence_error(&o, "issuer-key.pem");
    assert!(!out.exists());

    // The valid request still works against the same CA.
    let good = tmp.path().join("good");
    assert_ok(&issue(&ca_dir, WEB, "1h", &good), "ca issue");
    assert_eq!(ls(&good), ["cert.pem", "key.pem"]);
}

#[test]
fn ca_init_refuses_to_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    init_ca(&dir);
    let before: Vec<Vec<u8>> = ls(&dir)
        .iter()
        .map(|f| std::fs::read(dir.join(f)).unwrap())
        .collect();
    let o = palisade(&[
        "ca",
        "init",
        "--trust-domain",
        "example.org",
        "--out",
        s(&dir),
    ]);
    assert_one_sentence_error(&o, "already exists");
    let after: Vec<Vec<u8>> = ls(&dir)
        .iter()
        .map(|f| std::fs::read(dir.join(f)).unwrap())
        .collect();
    assert_eq!(before, after, "the existing CA is untouched");

    // Even a single leftover key file blocks a new CA there.
    let partial = tmp.path().join("partial");
    std::fs::create_dir(&partial).unwrap();
    std::fs::write(partial.join("issuer-key.pem"), "keep me").unwrap();
    let o = palisade(&["ca", "init", "--out", s(&partial)]);
    assert_one_sentence_error(&o, "issuer-key.pem");
    assert_eq!(ls(&partial), ["issuer-key.pem"]);
    assert_eq!(
        std::fs::read_to_string(partial.join("issuer-key.pem")).unwrap(),
        "keep me"
    );

    // An invalid trust domain creates nothing.
    let bad = tmp.path().join("bad-td");
    let o = palisade(&[
        "ca",
        "init",
        "--trust-domain",
        "Example.org",
        "--out",
        s(&bad),
    ]);
    assert_one_sentence_error(&o, "trust domain");
    assert!(!bad.exists());
}

#[test]
fn default_trust_domain_is_cluster_local() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    let o = palisade(&["ca", "init", "--out", s(&dir)]);
    assert_ok(&o, "ca init");
    let o = palisade(&["cert", "inspect", s(&dir.join("issuer-cert.pem"))]);
    assert_ok(&o, "cert inspect issuer");
    assert!(
        stdout(&o).contains("SPIFFE ID:  spiffe://cluster.local\n"),
        "{}",
        stdout(&o)
    );
    // An example.org ID is foreign to it.
    let out = tmp.path().join("out");
    let o = palisade(&[
        "ca",
        "issue",
        "--ca",
        s(&dir),
        "--spiffe-id",
        WEB,
        "--out",
        s(&out),
    ]);
    assert_one_sentence_error(&o, "cluster.local");
    assert!(!out.exists());
}

#[test]
fn inspect_reports_non_conforming_and_unreadable_files() {
    let tmp = tempfile::tempdir().unwrap();
    let o = palisade(&["cert", "inspect", s(&tmp.path().join("missing.pem"))]);
    assert_one_sentence_error(&o, "missing.pem");
    let junk = tmp.path().join("junk.pem");
    std::fs::write(
        &junk,
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let o = palisade(&["cert", "inspect", s(&junk)]);
    assert_one_sentence_error(&o, "junk.pem");
}

/// A duration too large for a `Duration` (or for a certificate date) is a one-sentence error on
/// every flag that takes one; these inputs used to panic the parser or the date arithmetic.
#[test]
fn overflowing_durations_are_errors_not_panics() {
    let tmp = tempfile::tempdir().unwrap();
    let ca_dir = tmp.path().join("ca");
    init_ca(&ca_dir);
    let out = tmp.path().join("out");
    for ttl in [
        "18446744073709551615s1s",
        "18446744073709551615s 500ms 500ms",
    ] {
        let o = palisade(&[
            "ca",
            "issue",
            "--ca",
            s(&ca_dir),
            "--spiffe-id",
            WEB,
            "--ttl",
            ttl,
            "--out",
            s(&out),
        ]);
        assert_one_sentence_error(&o, "--ttl");
        assert!(stderr(&o).contains("too large"), "{}", stderr(&o));
        assert!(!out.exists());
    }

    // Parses, but no certificate date can be that far away.
    let big = tmp.path().join("big-ca");
    let o = palisade(&[
        "ca",
        "init",
        "--issuer-ttl",
        "9999999999d",
        "--out",
        s(&big),
    ]);
    assert_one_sentence_error(&o, "issuer lifetime");
    assert!(!big.exists());

    // clap flags: its own usage error (exit 2), but never a panic.
    for args in [
        &["up", "--ready-timeout", "18446744073709551615s1s"][..],
        &["proxy", "--drain-timeout", "18446744073709551615s1s"][..],
        &["bench", "--duration", "18446744073709551615s 500ms 500ms"][..],
    ] {
        let o = palisade(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        let err = stderr(&o);
        assert!(err.contains("too large"), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}
