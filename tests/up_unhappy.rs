//! `palisade up` on the unhappy path, through the binary: a second `up`, broken input at
//! start, children that die, and config edits while the mesh runs.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

fn web_api() -> MeshSpec {
    MeshSpec {
        lifetime: "1h",
        default_policy: "allow",
        workloads: vec![
            WorkloadSpec::demo("web", "app: web", vec![("api.demo", 8080)]),
            WorkloadSpec::demo("api", "app: api", vec![]),
        ],
        services: vec![("api", 8080, "app: api", "http")],
    }
}

/// Runs `palisade up ARGS` to its exit (bounded), returning the exit code and all it printed.
fn up_once(args: &[&std::ffi::OsStr]) -> (Option<i32>, String) {
    let mut child = Command::new(palisade())
        .arg("up")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn up");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the second `up` did not exit within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

fn log_sizes(state: &std::path::Path) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = std::fs::read_dir(state.join("logs"))
        .expect("logs")
        .flatten()
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().map(|m| m.len()).unwrap_or(0),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn a_second_up_never_touches_a_running_mesh() {
    let mesh = web_api().start(&[]);
    let web = mesh.upstream("web", "api.demo");
    assert_eq!(http_get(web, "/").expect("request").0, 200);
    let json_before = mesh.mesh_json();
    let logs_before = log_sizes(&mesh.state);

    // Same state directory: the lock names the running `up`.
    let (code, text) = up_once(&[
        "--mesh".as_ref(),
        mesh.mesh_file.as_os_str(),
        "--state-dir".as_ref(),
        mesh.state.as_os_str(),
    ]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("a mesh is already running from"), "{text}");
    let pid = json_before["upPid"].as_u64().expect("upPid");
    assert!(text.contains(&format!("(pid {pid})")), "{text}");

    // Another state directory: the ports are in use, and the first one is named.
    let other = tempfile::tempdir().expect("tempdir");
    let (code, text) = up_once(&[
        "--mesh".as_ref(),
        mesh.mesh_file.as_os_str(),
        "--state-dir".as_ref(),
        other.path().as_os_str(),
    ]);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("controlPlane.port") && text.contains("is in use by another process"),
        "{text}"
    );

    // The first mesh is untouched: it serves, its mesh.json and its logs are as they were.
    assert_eq!(http_get(web, "/").expect("request").0, 200);
    assert_eq!(mesh.mesh_json(), json_before);
    for (name, before) in logs_before {
        let now = std::fs::metadata(mesh.state.join("logs").join(&name))
            .map(|m| m.len())
            .unwrap_or(0);
        assert!(now >= before, "{name} shrank from {before} to {now}");
    }
}

#[test]
fn a_port_in_use_is_named_before_anything_starts() {
    let spec = web_api();
    let ports = spec.allocate();
    let squatter = std::net::TcpListener::bind(("127.0.0.1", ports[1].1.admin)).expect("bind");
    let mut mesh = spec.launch(free_port(), ports, &[]);
    let (status, lines) = mesh.wait_exit(Duration::from_secs(30));
    let text = lines.join("\n");
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(
        text.contains("workloads[1].adminPort") && text.contains("is in use by another process"),
        "{text}"
    );
    assert!(
        !mesh.state.join("logs").exists(),
        "nothing may start (or log) before the ports are checked"
    );
    drop(squatter);
}

#[test]
fn a_broken_policy_at_start_is_printed_and_nothing_starts() {
    let spec = web_api();
    let ports = spec.allocate();
    let bad = "apiVersion: palisade.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: { name: p, namespace: demo }\nspec:\n  rules: [ { from: [ { source: { principal: [\"x\"] } } ] } ]\n";
    let mut mesh = spec.launch(free_port(), ports, &[("broken.yaml", bad)]);
    let (status, lines) = mesh.wait_exit(Duration::from_secs(30));
    let text = lines.join("\n");
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(
        text.contains("broken.yaml") && text.contains("spec.rules[0].from[0].source.principal"),
        "{text}"
    );
    assert!(!mesh.state.join("logs").exists(), "{text}");
}

#[test]
fn a_child_that_dies_at_start_is_reported_with_its_error() {
    let mut spec = web_api();
    // The app gets an argument it does not know: it prints clap's error and exits 2.
    spec.workloads[1].extra_command = vec!["--no-such-flag".into()];
    let ports = spec.allocate();
    let mut mesh = spec.launch(free_port(), ports, &[]);
    let (status, lines) = mesh.wait_exit(Duration::from_secs(60));
    let text = lines.join("\n");
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(text.contains("api's app exited"), "{text}");
    assert!(
        text.contains("--no-such-flag"),
        "the app's own error line: {text}"
    );
}

#[test]
fn an_app_that_dies_is_restarted_and_the_mesh_keeps_running() {
    let mut mesh = web_api().start(&[]);
    let web = mesh.upstream("web", "api.demo");
    assert_eq!(http_get(web, "/").expect("request").0, 200);
    let pid = mesh.mesh_json()["workloads"][1]["appPid"]
        .as_u64()
        .expect("api's appPid");
    let killed = Command::new("kill")
        .arg("-KILL")
        .arg(pid.to_string())
        .status()
        .expect("kill");
    assert!(killed.success());
    mesh.wait_line("api's app exited", Duration::from_secs(10));
    mesh.wait_line("api's app restarted", Duration::from_secs(10));
    assert!(
        eventually(Duration::from_secs(10), || http_get(web, "/")
            .is_ok_and(|(s, _)| s == 200)),
        "web -> api does not recover"
    );
    let new_pid = mesh.mesh_json()["workloads"][1]["appPid"].as_u64();
    assert!(new_pid.is_some() && new_pid != Some(pid));
    assert!(
        mesh.child
            .as_mut()
            .expect("up")
            .try_wait()
            .expect("wait")
            .is_none()
    );
}

#[test]
fn exit_on_app_failure_keeps_the_old_behaviour() {
    let spec = web_api();
    let ports = spec.allocate();
    let mut mesh = spec.launch_with(free_port(), ports, &[], &["--exit-on-app-failure"]);
    mesh.wait_line("mesh ready", Duration::from_secs(60));
    let pid = mesh.mesh_json()["workloads"][1]["appPid"]
        .as_u64()
        .expect("api's appPid");
    let _ = Command::new("kill")
        .arg("-KILL")
        .arg(pid.to_string())
        .status();
    let (status, lines) = mesh.wait_exit(Duration::from_secs(30));
    let text = lines.join("\n");
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(text.contains("--exit-on-app-failure"), "{text}");
}

#[test]
fn live_edits_are_answered_in_the_terminal_and_workloads_follow_the_mesh_file() {
    let mut mesh = web_api().start(&[]);
    let deny = "apiVersion: palisade.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: { name: no-web, namespace: demo }\nspec:\n  selector: { matchLabels: { app: api } }\n  action: DENY\n  rules: [ { from: [ { source: { principals: [\"cluster.local/ns/demo/sa/web\"] } } ] } ]\n";
    mesh.write_policy("deny.yaml", deny);
    let line = mesh.wait_line("applied generation 2", Duration::from_secs(10));
    assert!(line.contains("1 policy changed"), "{line}");
    // A broken edit is answered with the reason, and the last good config keeps serving.
    mesh.write_policy("deny.yaml", &deny.replace("principals:", "principal:"));
    let line = mesh.wait_line("config change rejected", Duration::from_secs(10));
    assert!(
        line.contains("deny.yaml")
            && line.contains("source.principal")
            && line.contains("the last good config keeps serving"),
        "{line}"
    );
    mesh.write_policy("deny.yaml", deny);

    // A workload added to the mesh file is started for real.
    let text = std::fs::read_to_string(&mesh.mesh_file).expect("mesh file");
    let (inbound, admin) = (free_port(), free_port());
    let added = text.replace(
        "services:\n",
        &format!(
            "  - name: extra\n    namespace: demo\n    labels: {{ app: extra }}\n    inboundPort: {inbound}\n    adminPort: {admin}\nservices:\n"
        ),
    );
    let tmp = mesh.mesh_file.with_extension("tmp");
    std::fs::write(&tmp, added).expect("write");
    std::fs::rename(&tmp, &mesh.mesh_file).expect("rename");
    let line = mesh.wait_line("workload extra added", Duration::from_secs(10));
    assert!(line.contains("applied generation"), "{line}");
    mesh.wait_line("workload extra started", Duration::from_secs(10));
    let admin_addr = std::net::SocketAddr::from(([127, 0, 0, 1], admin));
    assert!(
        eventually(Duration::from_secs(20), || http_get(admin_addr, "/ready")
            .is_ok_and(|(s, _)| s == 200)),
        "the added workload's proxy never became ready"
    );
    // And removed again: stopped.
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, &mesh.mesh_file).expect("rename");
    mesh.wait_line(
        "workload extra removed; stopping it",
        Duration::from_secs(10),
    );
    assert!(
        eventually(Duration::from_secs(20), || http_get(admin_addr, "/ready")
            .is_err()),
        "the removed workload's proxy still answers"
    );
}

#[test]
fn a_missing_policies_directory_is_named_before_anything_starts() {
    // The policies directory the mesh file names does not exist: said before anything starts.
    let mut mesh = web_api().start(&[]);
    let stopped = mesh.stop().expect("exit status");
    assert!(stopped.success(), "{stopped}");
    std::fs::remove_dir_all(&mesh.policies).expect("remove policies dir");
    let (code, text) = up_once(&[
        "--mesh".as_ref(),
        mesh.mesh_file.as_os_str(),
        "--state-dir".as_ref(),
        mesh.state.as_os_str(),
    ]);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("policies directory") && text.contains("does not exist"),
        "{text}"
    );
}

#[test]
fn ps_shows_which_workload_a_sidecar_serves() {
    let mesh = web_api().start(&[]);
    let pid = mesh.proxy_pid("web").expect("web's proxyPid");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    assert!(
        args.windows(2)
            .any(|w| w[0] == "--workload" && w[1] == "web"),
        "{args:?}"
    );
}
