//! The command line on the unhappy path, through the binary: boolean variables, help texts,
//! error messages a person can act on, where the README's commands write, and `check` on a
//! mesh that is not running.

mod support;

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::*;

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(palisade());
    c.args(args).env("PALISADE_LOG", "warn");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run palisade")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

const BOOL_WORDS: &str = "[possible values: 1, 0, true, false, yes, no, on, off]";

#[test]
fn proxy_help_lists_what_every_variable_accepts() {
    for bin in [
        palisade().to_string(),
        env!("CARGO_BIN_EXE_palisade-proxy").to_string(),
    ] {
        let mut c = Command::new(&bin);
        if bin == palisade() {
            c.arg("proxy");
        }
        let out = c.arg("--help").output().expect("--help");
        assert!(out.status.success());
        let help = text(&out.stdout);
        for var in ["PALISADE_ACCESS_LOG", "PALISADE_ADMIN_SHUTDOWN"] {
            let line = help
                .lines()
                .find(|l| l.contains(&format!("[env: {var}=")))
                .unwrap_or_else(|| panic!("{var} not in {bin} --help:\n{help}"));
            assert!(line.contains(BOOL_WORDS), "{line}");
        }
        assert!(
            help.contains("[possible values: peak-ewma, round-robin]"),
            "{help}"
        );
        for grammar in [
            "IP:PORT is",
            "DURATION is",
            "BOOL is 1, 0, true, false, yes,",
            "PALISADE_LOG ",
            "PALISADE_LOG_FORMAT",
        ] {
            assert!(help.contains(grammar), "{grammar:?} missing:\n{help}");
        }
    }
    // And the operations guide says the same.
    let ops = std::fs::read_to_string(repo("docs/operations.md")).expect("operations.md");
    for var in ["PALISADE_ACCESS_LOG", "PALISADE_ADMIN_SHUTDOWN"] {
        let row = ops
            .lines()
            .find(|l| l.starts_with(&format!("| `{var}`")))
            .unwrap_or_else(|| panic!("{var} has no row in docs/operations.md"));
        assert!(
            row.contains("`1`/`0`, `true`/`false`, `yes`/`no`, `on`/`off`"),
            "{row}"
        );
    }
}

/// A static-mode sidecar (files instead of a control plane) on free ports.
struct StaticProxy {
    dir: tempfile::TempDir,
    admin: SocketAddr,
}

impl StaticProxy {
    fn files() -> StaticProxy {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = |s: &str| dir.path().join(s).to_str().expect("utf-8").to_string();
        let o = run(&["ca", "init", "--out", &p("ca")], &[]);
        assert!(o.status.success(), "{}", text(&o.stderr));
        let o = run(
            &[
                "ca",
                "issue",
                "--ca",
                &p("ca"),
                "--spiffe-id",
                "spiffe://cluster.local/ns/demo/sa/web",
                "--out",
                &p("web"),
            ],
            &[],
        );
        assert!(o.status.success(), "{}", text(&o.stderr));
        std::fs::write(dir.path().join("cfg.yaml"), "mode: STRICT\nservices: []\n").expect("cfg");
        StaticProxy {
            dir,
            admin: SocketAddr::from(([127, 0, 0, 1], free_port())),
        }
    }

    fn command(&self, env: &[(&str, &str)]) -> Command {
        let p = |s: &str| self.dir.path().join(s);
        let mut c = Command::new(palisade());
        c.arg("proxy")
            .args(["--workload", "web"])
            .args(["--identity", "spiffe://cluster.local/ns/demo/sa/web"])
            .arg("--trust-bundle")
            .arg(p("ca/root-cert.pem"))
            .arg("--cert")
            .arg(p("web/cert.pem"))
            .arg("--key")
            .arg(p("web/key.pem"))
            .arg("--config")
            .arg(p("cfg.yaml"))
            .args(["--inbound", &format!("127.0.0.1:{}", free_port())])
            .args(["--admin", &self.admin.to_string()])
            .env("PALISADE_LOG", "warn")
            .env_remove("PALISADE_ACCESS_LOG")
            .env_remove("PALISADE_ADMIN_SHUTDOWN")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            c.env(k, v);
        }
        c
    }

    /// Starts the proxy with `env`, waits for /ready, POSTs /shutdown as `up` does; returns
    /// whether the proxy drained and exited (the shutdown was enabled).
    fn shutdown_enabled(&self, env: &[(&str, &str)]) -> bool {
        let mut child = self.command(env).spawn().expect("start palisade proxy");
        let ready = eventually(Duration::from_secs(20), || {
            http_get(self.admin, "/ready").is_ok_and(|(s, _)| s == 200)
        });
        if !ready {
            let _ = child.kill();
            let mut err = String::new();
            let _ = child.wait();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            panic!("the static proxy never got ready: {err}");
        }
        let (status, body) = http_request(
            self.admin,
            "POST",
            "/shutdown",
            &[("palisade-admin-shutdown", "1")],
        )
        .expect("POST /shutdown");
        let deadline = Instant::now() + Duration::from_secs(20);
        let exited = loop {
            match child.try_wait().expect("wait") {
                Some(st) => break Some(st),
                None if Instant::now() > deadline || status != 200 => break None,
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        match exited {
            Some(st) => {
                assert_eq!(status, 200, "{body}");
                assert!(st.success(), "{st}");
                true
            }
            None => {
                let _ = child.kill();
                let _ = child.wait();
                assert_ne!(status, 200, "shutdown accepted but the proxy kept running");
                false
            }
        }
    }
}

#[test]
fn boolean_variables_take_every_common_spelling_and_refuse_the_rest() {
    let proxy = StaticProxy::files();
    for yes in ["yes", "ON", "1", "True"] {
        assert!(
            proxy.shutdown_enabled(&[
                ("PALISADE_ADMIN_SHUTDOWN", yes),
                ("PALISADE_ACCESS_LOG", "yes")
            ]),
            "PALISADE_ADMIN_SHUTDOWN={yes} should enable /shutdown"
        );
    }
    for no in ["off", "No", "0", "FALSE"] {
        assert!(
            !proxy.shutdown_enabled(&[
                ("PALISADE_ADMIN_SHUTDOWN", no),
                ("PALISADE_ACCESS_LOG", "off")
            ]),
            "PALISADE_ADMIN_SHUTDOWN={no} should leave /shutdown disabled"
        );
    }

    // Refused before anything starts, with one line naming the variable and the words.
    for (var, value) in [
        ("PALISADE_ACCESS_LOG", "maybe"),
        ("PALISADE_ADMIN_SHUTDOWN", "enabled"),
    ] {
        let out = proxy
            .command(&[(var, value)])
            .output()
            .expect("run palisade proxy");
        assert_eq!(out.status.code(), Some(2), "{var}={value}");
        let err = text(&out.stderr);
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "one line: {err}");
        assert!(
            lines[0].starts_with(&format!("error: {var}=\"{value}\"")),
            "{err}"
        );
        assert!(
            lines[0].contains("is not a boolean: use one of 1, 0, true, false, yes, no, on, off"),
            "{err}"
        );
    }
    // The flag alone still means true, and `--flag=value` takes the same words.
    let out = proxy
        .command(&[])
        .arg("--access-log=perhaps")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).starts_with("error: --access-log \"perhaps\" is not a boolean"),
        "{}",
        text(&out.stderr)
    );
    let mut child = proxy
        .command(&[])
        .args(["--access-log", "--admin-shutdown"])
        .spawn()
        .expect("start");
    let ready = eventually(Duration::from_secs(20), || {
        http_get(proxy.admin, "/ready").is_ok_and(|(s, _)| s == 200)
    });
    let (status, _) = http_request(
        proxy.admin,
        "POST",
        "/shutdown",
        &[("palisade-admin-shutdown", "1")],
    )
    .unwrap_or((0, String::new()));
    let exited = eventually(Duration::from_secs(20), || {
        child.try_wait().ok().flatten().is_some()
    });
    if !exited {
        let _ = child.kill();
        let _ = child.wait();
    }
    assert!(ready && status == 200 && exited, "bare --admin-shutdown");
}

/// The descriptions of `--help`: every option line (`  -x, --flag <V>` or `      --flag`) or
/// positional (`  <FILE>`), with the text that follows it up to the next entry.
fn help_entries(help: &str) -> Vec<(String, String)> {
    let mut entries: Vec<(String, String)> = Vec::new();
    let mut in_section = false;
    for line in help.lines() {
        if line.ends_with(':') && !line.starts_with(' ') {
            in_section = line == "Options:" || line == "Arguments:";
            continue;
        }
        if !in_section || line.trim().is_empty() {
            continue;
        }
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        let starts_entry = indent <= 6 && (trimmed.starts_with('-') || trimmed.starts_with('<'));
        if starts_entry {
            // The spec ends at the first run of two spaces.
            let (spec, rest) = trimmed.split_once("  ").unwrap_or((trimmed, ""));
            entries.push((spec.to_string(), rest.trim().to_string()));
        } else if let Some(last) = entries.last_mut() {
            last.1.push(' ');
            last.1.push_str(trimmed);
        }
    }
    entries
}

#[test]
fn every_flag_of_ca_init_ca_issue_and_cert_inspect_is_described() {
    for cmd in [
        &["ca", "init"][..],
        &["ca", "issue"][..],
        &["cert", "inspect"][..],
    ] {
        for help_flag in ["-h", "--help"] {
            let mut args = cmd.to_vec();
            args.push(help_flag);
            let out = run(&args, &[]);
            assert!(out.status.success());
            let help = text(&out.stdout);
            let entries = help_entries(&help);
            assert!(entries.len() >= 2, "no entries parsed from:\n{help}");
            for (spec, description) in &entries {
                // What is left without the bracketed notes clap adds ([default: …]).
                let words = description
                    .split('[')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_string();
                assert!(
                    words.split_whitespace().count() >= 2,
                    "`palisade {}` {spec} has no description:\n{help}",
                    cmd.join(" ")
                );
            }
        }
    }
}

#[test]
fn cert_inspect_prints_the_remaining_validity_in_hours_and_minutes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = |s: &str| dir.path().join(s).to_str().expect("utf-8").to_string();
    assert!(
        run(&["ca", "init", "--out", &p("ca")], &[])
            .status
            .success()
    );
    let o = run(
        &[
            "ca",
            "issue",
            "--ca",
            &p("ca"),
            "--spiffe-id",
            "spiffe://cluster.local/ns/demo/sa/web",
            "--ttl",
            "24h",
            "--out",
            &p("web"),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let o = run(&["cert", "inspect", &p("web/cert.pem")], &[]);
    let out = text(&o.stdout);
    let validity = out
        .lines()
        .find_map(|l| l.strip_prefix("Validity:   "))
        .unwrap_or_else(|| panic!("no Validity line:\n{out}"));
    assert!(
        validity == "valid, expires in 23h 59m" || validity == "valid, expires in 1d 0h",
        "{validity:?}"
    );
}

#[test]
fn mesh_file_ports_are_described_as_ports() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (field, value, said) in [
        ("inboundPort", "70000", "70000"),
        ("adminPort", "\"http\"", "the string \"http\""),
        ("inboundPort", "0", "0"),
    ] {
        let mesh = dir.path().join("mesh.yaml");
        let ports = [("inboundPort", free_port()), ("adminPort", free_port())];
        let fields: Vec<String> = ports
            .iter()
            .map(|(f, p)| {
                if *f == field {
                    format!("{f}: {value}")
                } else {
                    format!("{f}: {p}")
                }
            })
            .collect();
        std::fs::write(
            &mesh,
            format!(
                "controlPlane: {{ port: {} }}\nworkloads:\n  - {{ name: web, {} }}\n",
                free_port(),
                fields.join(", ")
            ),
        )
        .expect("write mesh");
        let out = run(
            &[
                "up",
                "--mesh",
                mesh.to_str().expect("utf-8"),
                "--state-dir",
                dir.path().join("state").to_str().expect("utf-8"),
            ],
            &[],
        );
        assert_eq!(out.status.code(), Some(1));
        let err = text(&out.stderr);
        assert!(
            err.contains(&format!(
                "workloads[0].{field}: must be a port number 1–65535, not {said}"
            )),
            "{err}"
        );
        assert!(!err.contains("u16"), "{err}");
    }
}

#[test]
fn static_config_ports_are_described_as_ports() {
    let proxy = StaticProxy::files();
    for (value, said) in [("70000", "70000"), ("\"http\"", "the string \"http\"")] {
        std::fs::write(
            proxy.dir.path().join("cfg.yaml"),
            format!("services:\n  - {{ name: api.demo, port: {value} }}\n"),
        )
        .expect("cfg");
        let out = proxy.command(&[]).output().expect("run palisade proxy");
        assert_eq!(out.status.code(), Some(1));
        let err = text(&out.stderr);
        assert!(
            err.contains(&format!("must be a port number 1–65535, not {said}")),
            "{err}"
        );
        assert!(!err.contains("u16"), "{err}");
    }
}

#[test]
fn a_policy_name_yaml_reads_as_a_boolean_is_said_to_be_no_string() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("p.yaml");
    std::fs::write(
        &file,
        "apiVersion: palisade.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: { name: no, namespace: 42 }\nspec:\n  rules: [ {} ]\n",
    )
    .expect("write policy");
    let out = run(&["policy", "check", file.to_str().expect("utf-8")], &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("metadata.name: must be a string, found a boolean")
            && err.contains("quote it"),
        "{err}"
    );
    assert!(
        err.contains("metadata.namespace: must be a string, found a number"),
        "{err}"
    );
}

#[test]
fn check_says_mesh_not_running_without_mesh_json_or_with_a_stale_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run(
        &["check", "--state-dir", dir.path().to_str().expect("utf-8")],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    let report = text(&out.stdout);
    assert!(
        report.starts_with("[FAIL] mesh: mesh not running: there is no "),
        "{report}"
    );

    // mesh.json as `up` writes it, naming an `up` that has exited.
    let mut gone = Command::new("true").spawn().expect("spawn true");
    let pid = gone.id();
    gone.wait().expect("reap");
    let admin = free_port();
    std::fs::write(
        dir.path().join("mesh.json"),
        serde_json::json!({
            "controlPlane": format!("127.0.0.1:{}", free_port()),
            "controlPlaneStatus": format!("127.0.0.1:{}", free_port()),
            "controlPlanePid": std::process::id(),
            "upPid": pid,
            "workloads": [{"name": "web", "adminAddr": format!("127.0.0.1:{admin}")}],
        })
        .to_string(),
    )
    .expect("write mesh.json");
    let out = run(
        &["check", "--state-dir", dir.path().to_str().expect("utf-8")],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    let report = text(&out.stdout);
    let fails: Vec<&str> = report.lines().filter(|l| l.starts_with("[FAIL]")).collect();
    assert_eq!(fails.len(), 1, "{report}");
    assert!(
        fails[0].starts_with("[FAIL] mesh: mesh not running:")
            && fails[0].contains(&format!("`palisade up`, pid {pid}, is gone")),
        "{report}"
    );
}

/// The directories `.gitignore` ignores by name (`target/`, `/.palisade/`).
fn ignored_dirs() -> Vec<String> {
    std::fs::read_to_string(repo(".gitignore"))
        .expect(".gitignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('!'))
        .filter_map(|l| l.trim_start_matches('/').strip_suffix('/'))
        .map(str::to_string)
        .collect()
}

/// Every `--out` and `--plot` value in the shell blocks of a Markdown file.
fn outputs_in(markdown: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    let mut in_shell = false;
    for line in markdown.lines() {
        let t = line.trim_start();
        if let Some(lang) = t.strip_prefix("```") {
            in_shell = !in_shell && matches!(lang.trim(), "sh" | "bash" | "shell" | "console");
            continue;
        }
        if !in_shell {
            continue;
        }
        let words: Vec<&str> = t.split_whitespace().collect();
        for (i, w) in words.iter().enumerate() {
            for flag in ["--out", "--plot"] {
                if *w == flag
                    && let Some(v) = words.get(i + 1)
                {
                    found.push((flag.to_string(), v.to_string()));
                } else if let Some(v) = w.strip_prefix(&format!("{flag}=")) {
                    found.push((flag.to_string(), v.to_string()));
                }
            }
        }
    }
    found
}

#[test]
fn the_docs_write_keys_and_results_only_under_git_ignored_directories() {
    let ignored = ignored_dirs();
    assert!(
        ignored.iter().any(|d| d == ".palisade"),
        ".palisade/ must stay in .gitignore: {ignored:?}"
    );
    let mut files = vec![repo("README.md")];
    for e in std::fs::read_dir(repo("docs")).expect("docs/").flatten() {
        if e.path().extension().is_some_and(|x| x == "md") {
            files.push(e.path());
        }
    }
    let mut seen = 0;
    for f in files {
        let md = std::fs::read_to_string(&f).expect("read markdown");
        for (flag, value) in outputs_in(&md) {
            seen += 1;
            let first = Path::new(&value)
                .components()
                .next()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .unwrap_or_default();
            let nested = Path::new(&value).components().count() > 1;
            assert!(
                nested && ignored.contains(&first),
                "{}: `{flag} {value}` writes outside a git-ignored directory ({ignored:?}): `git add -A` would pick it up",
                f.display()
            );
        }
    }
    let readme = std::fs::read_to_string(repo("README.md")).expect("README");
    assert!(
        outputs_in(&readme).len() >= 2,
        "the README's certificate commands were not found"
    );
    assert!(seen >= 4, "too few --out/--plot found: {seen}");
}
