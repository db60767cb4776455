//! `palisade up` end to end, through the binary, as a user runs it.

mod support;

use std::time::{Duration, Instant};

use support::*;

fn web_api(lifetime: &'static str) -> MeshSpec {
    MeshSpec {
        lifetime,
        default_policy: "allow",
        workloads: vec![
            WorkloadSpec::demo("web", "app: web", vec![("api.demo", 8080)]),
            WorkloadSpec::demo("api", "app: api", vec![]),
            WorkloadSpec::demo("api2", "app: api-canary", vec![]),
        ],
        services: vec![("api", 8080, "app: api", "http")],
    }
}

#[test]
fn up_serves_web_to_api_over_mtls_and_writes_mesh_json() {
    let mut mesh = web_api("1h").start(&[]);
    // web's app calls api through web's sidecar; api's app reports the caller's identity.
    let (status, body) = http_get(mesh.app("web"), "/call/api").expect("call");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("caller: spiffe://cluster.local/ns/demo/sa/web"),
        "api should see web's SPIFFE ID: {body}"
    );
    // Straight to the upstream port too.
    let (status, body) = http_get(mesh.upstream("web", "api.demo"), "/").expect("upstream");
    assert_eq!(status, 200);
    assert!(body.contains("hello from api"), "{body}");

    let doc = mesh.mesh_json();
    assert_eq!(
        doc["controlPlane"],
        format!("127.0.0.1:{}", mesh.cp_port).as_str()
    );
    let ws = doc["workloads"].as_array().expect("workloads");
    assert_eq!(ws.len(), 3);
    let web = ws.iter().find(|w| w["name"] == "web").expect("web");
    assert_eq!(web["spiffeId"], "spiffe://cluster.local/ns/demo/sa/web");
    let p = mesh.ports("web");
    assert_eq!(web["appAddr"], format!("127.0.0.1:{}", p.app).as_str());
    assert_eq!(
        web["inboundAddr"],
        format!("127.0.0.1:{}", p.inbound).as_str()
    );
    assert_eq!(web["adminAddr"], format!("127.0.0.1:{}", p.admin).as_str());
    assert_eq!(web["upstreams"][0]["service"], "api.demo:8080");
    assert_eq!(
        web["upstreams"][0]["localAddr"],
        format!("127.0.0.1:{}", p.upstreams[0].1).as_str()
    );

    // The connection between the proxies is mTLS: web's proxy counted an outbound handshake.
    assert!(mesh.metric_sum("web", "palisade_tls_connections_total", &["outbound"]) >= 1.0);

    // Secrets live in a fresh 0700 state dir, each in a 0600 file.
    for dir in ["", "tokens", "ca"] {
        assert_eq!(mode(&mesh.state.join(dir)), 0o700, "{dir:?}");
    }
    for file in [
        "tokens.json",
        "tokens/web",
        "ca/issuer-key.pem",
        "ca/root-key.pem",
    ] {
        assert_eq!(mode(&mesh.state.join(file)), 0o600, "{file}");
    }

    // `palisade check` passes on a running mesh.
    let out = std::process::Command::new(palisade())
        .arg("check")
        .arg("--state-dir")
        .arg(&mesh.state)
        .output()
        .expect("check");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "check failed: {report}");
    assert!(report.contains("[pass] web config in sync"), "{report}");

    // SIGTERM stops everything and exits 0; mesh.json is removed.
    let st = mesh.stop().expect("exit status");
    assert!(st.success(), "up exited with {st}");
    assert!(!mesh.state.join("mesh.json").exists());
    assert!(
        std::net::TcpStream::connect(mesh.admin("web")).is_err(),
        "web's proxy should be gone"
    );
}

fn mode(p: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

fn chmod(p: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// Runs `palisade up` on an empty mesh with `state` as its state dir, expecting it to refuse
/// before starting anything; returns its stderr. Killed (and the test failed) if it runs on.
fn up_refusing(state: &std::path::Path) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let mesh = dir.path().join("mesh.yaml");
    std::fs::write(
        &mesh,
        format!("controlPlane: {{ port: {} }}\nworkloads: []\n", free_port()),
    )
    .expect("write mesh");
    let mut child = std::process::Command::new(palisade())
        .arg("up")
        .arg("--mesh")
        .arg(&mesh)
        .arg("--state-dir")
        .arg(state)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn palisade up");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("palisade up did not refuse {}", state.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one sentence: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    err
}

#[test]
fn up_refuses_a_state_dir_another_user_could_have_planted() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = || running_as_root();

    // World-writable: anyone could have put files there (works without root).
    let open = tmp.path().join("open");
    std::fs::create_dir(&open).unwrap();
    chmod(&open, 0o777);
    let err = up_refusing(&open);
    assert!(err.contains(open.to_str().unwrap()), "{err}");
    assert!(err.contains("writable by group or others"), "{err}");
    assert!(!open.join("tokens").exists(), "no token written there");

    // Ours, but its tokens/ is group-writable.
    let loose = tmp.path().join("loose");
    std::fs::create_dir_all(loose.join("tokens")).unwrap();
    chmod(&loose, 0o700);
    chmod(&loose.join("tokens"), 0o770);
    let err = up_refusing(&loose);
    assert!(err.contains("tokens") && err.contains("writable"), "{err}");

    // A CA key that is not 0600 is not loaded as the mesh CA.
    let planted = tmp.path().join("planted");
    std::fs::create_dir_all(planted.join("ca")).unwrap();
    chmod(&planted, 0o700);
    chmod(&planted.join("ca"), 0o700);
    std::fs::write(planted.join("ca/issuer-key.pem"), "not ours").unwrap();
    chmod(&planted.join("ca/issuer-key.pem"), 0o644);
    let err = up_refusing(&planted);
    assert!(
        err.contains("issuer-key.pem") && err.contains("0600"),
        "{err}"
    );

    if root() {
        // Owned by another user (uid 65534), mode 0700 and all.
        let theirs = tmp.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        chmod(&theirs, 0o700);
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
        let err = up_refusing(&theirs);
        assert!(err.contains("owned by uid 65534"), "{err}");
        assert!(!theirs.join("tokens").exists());

        // Our state dir, but a ca/ someone else made, or a key someone else wrote.
        let ca_theirs = tmp.path().join("ca-theirs");
        std::fs::create_dir_all(ca_theirs.join("ca")).unwrap();
        chmod(&ca_theirs, 0o700);
        std::os::unix::fs::chown(ca_theirs.join("ca"), Some(65534), Some(65534)).unwrap();
        let err = up_refusing(&ca_theirs);
        assert!(
            err.contains("ca") && err.contains("owned by uid 65534"),
            "{err}"
        );

        chmod(&planted.join("ca/issuer-key.pem"), 0o600);
        std::os::unix::fs::chown(planted.join("ca/issuer-key.pem"), Some(65534), None).unwrap();
        let err = up_refusing(&planted);
        assert!(
            err.contains("issuer-key.pem") && err.contains("owned by uid 65534"),
            "{err}"
        );
    } else {
        eprintln!("not root: skipping the other-owner cases");
    }
}

/// Whether this test runs as root (CI does): only root can hand a directory to another uid.
fn running_as_root() -> bool {
    palisade_certs::secure_fs::current_uid() == 0
}

#[test]
fn renewals_under_load_fail_no_request() {
    let mesh = web_api("4s").start(&[]);
    let load = Load::start(
        mesh.upstream("web", "api.demo"),
        "/",
        Duration::from_secs(120),
    );
    // Several renewal periods (a 4 s lifetime renews about every 2 s).
    let renewed = eventually(Duration::from_secs(30), || {
        mesh.metric_sum(
            "web",
            "palisade_identity_renewals_total",
            &["result=\"ok\""],
        ) >= 3.0
            && mesh.metric_sum(
                "api",
                "palisade_identity_renewals_total",
                &["result=\"ok\""],
            ) >= 3.0
    });
    let (ok, failed, errors) = load.finish();
    assert!(renewed, "renewals not observed:\n{}", mesh.logs());
    assert!(ok > 50, "too few requests: {ok}");
    assert_eq!(failed, 0, "failed requests during renewals: {errors:?}");
}

#[test]
fn control_plane_loss_keeps_traffic_flowing_and_resyncs() {
    let mesh = web_api("1h").start(&[]);
    let cp_pid = mesh.mesh_json()["controlPlanePid"]
        .as_u64()
        .expect("controlPlanePid");
    let load = Load::start(
        mesh.upstream("web", "api.demo"),
        "/",
        Duration::from_secs(120),
    );
    assert!(
        eventually(Duration::from_secs(10), || load.ok() >= 20),
        "no traffic before the kill: {} ok, {} failed",
        load.ok(),
        load.failed()
    );
    let before = mesh.metric_sum("web", "palisade_config_updates_total", &["applied"]);
    let st = std::process::Command::new("kill")
        .arg("-KILL")
        .arg(cp_pid.to_string())
        .status()
        .expect("kill");
    assert!(st.success());
    // Traffic keeps flowing while the control plane is down and while it comes back.
    let at_kill = load.ok();
    assert!(
        eventually(Duration::from_secs(20), || load.ok() >= at_kill + 100),
        "traffic stopped with the control plane: {} ok since the kill, {} failed",
        load.ok() - at_kill,
        load.failed()
    );
    // up restarts it; the proxies reconnect and resync: a new config stream is applied.
    let resynced = eventually(Duration::from_secs(20), || {
        mesh.metric_sum("web", "palisade_config_updates_total", &["applied"]) > before
    });
    let (ok, failed, errors) = load.finish();
    assert!(resynced, "proxies did not resync:\n{}", mesh.logs());
    assert!(ok > 50);
    assert_eq!(failed, 0, "{errors:?}");
}

#[test]
fn mesh_file_edits_move_traffic_within_a_second() {
    let mesh = web_api("1h").start(&[]);
    let up = mesh.upstream("web", "api.demo");
    let reached = |name: &str| {
        (0..20).any(|_| {
            http_get(up, "/")
                .is_ok_and(|(s, b)| s == 200 && b.contains(&format!("hello from {name};")))
        })
    };
    assert!(reached("api"));
    assert!(!reached("api2"), "api2 is not an endpoint yet");

    // api2 joins the service: its labels now match the selector.
    let text = std::fs::read_to_string(&mesh.mesh_file).expect("read mesh");
    let added = text.replace("app: api-canary", "app: api");
    std::fs::write(&mesh.mesh_file, &added).expect("write mesh");
    let t0 = Instant::now();
    assert!(
        eventually(Duration::from_secs(5), || reached("api2")),
        "traffic never reached the new endpoint"
    );
    let took = t0.elapsed();
    assert!(took < Duration::from_millis(1500), "took {took:?}");

    // api leaves the service: traffic stops reaching it.
    let removed = added.replacen("labels: { app: api }", "labels: { app: retired }", 1);
    std::fs::write(&mesh.mesh_file, removed).expect("write mesh");
    assert!(
        eventually(Duration::from_secs(5), || !reached("api")),
        "traffic still reaches the removed endpoint"
    );
}

#[test]
fn up_fails_fast_and_says_why_when_the_control_plane_port_is_taken() {
    // Something else already listens on the control plane's port, and accepts connections:
    // the control plane cannot bind it and exits; `up` must say so instead of waiting for
    // proxies that will never get a certificate.
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let cp_port = squatter.local_addr().expect("addr").port();
    let spec = web_api("1h");
    let ports = spec.allocate();
    let mut mesh = spec.launch(cp_port, ports, &[]);
    let (status, lines) = mesh.wait_exit(Duration::from_secs(30));
    let text = lines.join("\n");
    assert_eq!(status.code(), Some(1), "{text}");
    // Named before anything starts, by the mesh file's field.
    assert!(
        text.contains("controlPlane.port") && text.contains("is in use by another process"),
        "{text}"
    );
    assert!(!text.contains("mesh ready"), "{text}");
    drop(squatter);
}
