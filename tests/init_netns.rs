//! `palisade init` for real: two network namespaces joined by a veth pair, each a "pod" with
//! the rules `palisade init` installs and a proxy running as the proxy UID. An app in pod A
//! makes a plain TCP connection to pod B's address (and to a service's virtual IP); iptables
//! sends it through A's transparent listener, A's proxy opens mTLS to B's address, B's rules
//! send that to B's inbound listener, and B's app (listening on loopback only, so nothing
//! reaches it but its proxy) answers with the caller identity its proxy vouched for.
//!
//! Needs root, `ip` (iproute2), `iptables` and `setpriv` (util-linux); skips with the reason
//! otherwise. `.ci/run` installs them.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use support::*;

const PROXY_UID: &str = "2102";
const TD: &str = "cluster.local";
const A_ID: &str = "spiffe://cluster.local/ns/demo/sa/web";
const B_ID: &str = "spiffe://cluster.local/ns/demo/sa/api";

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("run a command")
}

fn ok(cmd: &mut Command) -> Output {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Why this machine cannot run the test, if it cannot.
fn unsupported() -> Option<String> {
    if palisade_certs::secure_fs::current_uid() != 0 {
        return Some("not root (network namespaces and iptables need it)".into());
    }
    for tool in ["ip", "iptables", "setpriv"] {
        let found = Command::new(tool)
            .arg(if tool == "ip" { "-V" } else { "--version" })
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !found {
            return Some(format!("{tool} is not installed"));
        }
    }
    let probe = format!("palisade-probe-{}", std::process::id());
    let made = run(Command::new("ip").args(["netns", "add", &probe]));
    if !made.status.success() {
        return Some(format!(
            "cannot create a network namespace: {}",
            String::from_utf8_lossy(&made.stderr).trim()
        ));
    }
    let nat =
        run(Command::new("ip").args(["netns", "exec", &probe, "iptables", "-t", "nat", "-S"]));
    let _ = run(Command::new("ip").args(["netns", "del", &probe]));
    if !nat.status.success() {
        return Some(format!(
            "iptables' nat table is not usable: {}",
            String::from_utf8_lossy(&nat.stderr).trim()
        ));
    }
    None
}

/// Two namespaces and the veth between them; deleted (with every process's sockets in them)
/// when dropped.
struct Pods {
    a: String,
    b: String,
}

impl Pods {
    fn new(a_ip: &str, b_ip: &str) -> Pods {
        let tag = std::process::id() % 100_000;
        let pods = Pods {
            a: format!("pal-a-{tag}"),
            b: format!("pal-b-{tag}"),
        };
        let (va, vb) = (format!("pva{tag}"), format!("pvb{tag}"));
        for ns in [&pods.a, &pods.b] {
            ok(Command::new("ip").args(["netns", "add", ns]));
            pods.exec(ns, &["ip", "link", "set", "lo", "up"]);
        }
        ok(Command::new("ip").args([
            "link", "add", &va, "netns", &pods.a, "type", "veth", "peer", "name", &vb, "netns",
            &pods.b,
        ]));
        for (ns, dev, ip) in [(&pods.a, &va, a_ip), (&pods.b, &vb, b_ip)] {
            pods.exec(ns, &["ip", "addr", "add", &format!("{ip}/24"), "dev", dev]);
            pods.exec(ns, &["ip", "link", "set", dev, "up"]);
            // Service virtual IPs are routed like any off-pod address (then redirected).
            pods.exec(ns, &["ip", "route", "add", "default", "dev", dev]);
        }
        pods
    }

    fn cmd(&self, ns: &str, argv: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).args(argv);
        c
    }

    fn exec(&self, ns: &str, argv: &[&str]) -> Output {
        ok(&mut self.cmd(ns, argv))
    }

    fn nat_rules(&self, ns: &str) -> String {
        String::from_utf8_lossy(&self.exec(ns, &["iptables", "-t", "nat", "-S"]).stdout)
            .into_owned()
    }

    /// A plain HTTP/1.1 GET from `ns` (as root, so not the proxy's UID) with bash's
    /// `/dev/tcp`: the caller knows nothing of the mesh.
    fn plain_get(&self, ns: &str, ip: &str, port: u16, path: &str) -> String {
        let script = format!(
            "exec 3<>/dev/tcp/{ip}/{port} || exit 1; \
             printf 'GET {path} HTTP/1.1\\r\\nHost: {ip}\\r\\nConnection: close\\r\\n\\r\\n' >&3; \
             timeout 5 cat <&3"
        );
        let out = run(&mut self.cmd(ns, &["timeout", "8", "bash", "-c", &script]));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Pods {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(mut cmd: Command, log: PathBuf) -> Proc {
        let file = std::fs::File::create(&log).expect("log file");
        let err = file.try_clone().expect("log file");
        let child = cmd
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(err))
            .spawn()
            .expect("spawn");
        Proc { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `palisade ca issue` for `id` into `dir`, owned by the proxy's UID (it reads its key as
/// that user, and a key must belong to its reader).
fn issue(ca: &Path, id: &str, dir: &Path) {
    ok(Command::new(palisade()).args([
        "ca",
        "issue",
        "--ca",
        path_str(ca),
        "--spiffe-id",
        id,
        "--out",
        path_str(dir),
    ]));
    ok(Command::new("chown").args(["-R", &format!("{PROXY_UID}:{PROXY_UID}"), path_str(dir)]));
}

/// The proxy runs as its own UID, which cannot reach the build directory (under root's home
/// here): it runs a copy of the binary from the test's directory.
fn proxy(pods: &Pods, ns: &str, name: &str, id: &str, dir: &Path, ca: &Path) -> Proc {
    let bin = dir.join("palisade");
    if !bin.exists() {
        std::fs::copy(palisade(), &bin).expect("copy the binary");
    }
    let mut cmd = pods.cmd(
        ns,
        &[
            "setpriv",
            "--reuid",
            PROXY_UID,
            "--regid",
            PROXY_UID,
            "--clear-groups",
            path_str(&bin),
            "proxy",
        ],
    );
    cmd.env("PALISADE_WORKLOAD", name)
        .env("PALISADE_IDENTITY", id)
        .env("PALISADE_INBOUND_ADDR", "0.0.0.0:4143")
        .env("PALISADE_OUTBOUND_ADDR", "127.0.0.1:4140")
        .env("PALISADE_ADMIN_ADDR", "0.0.0.0:4191")
        .env("PALISADE_CERT", dir.join(name).join("cert.pem"))
        .env("PALISADE_KEY", dir.join(name).join("key.pem"))
        .env("PALISADE_TRUST_BUNDLE", ca.join("root-cert.pem"))
        .env("PALISADE_CONFIG", dir.join(format!("{name}.yaml")))
        .env("PALISADE_ACCESS_LOG", "true");
    Proc::spawn(cmd, dir.join(format!("{name}-proxy.log")))
}

#[test]
fn init_sends_plain_connections_between_pods_through_both_proxies_over_mtls() {
    if let Some(why) = unsupported() {
        eprintln!(
            "SKIPPED init_sends_plain_connections_between_pods_through_both_proxies_over_mtls: {why}"
        );
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    // The proxies run as another user: they must be able to walk to their files.
    ok(Command::new("chmod").args(["0755", path_str(dir)]));
    let ca = dir.join("ca");
    ok(Command::new(palisade()).args(["ca", "init", "--trust-domain", TD, "--out", path_str(&ca)]));
    ok(Command::new("chmod").args(["0755", path_str(&ca)]));
    ok(Command::new("chmod").args(["0644", path_str(&ca.join("root-cert.pem"))]));
    issue(&ca, A_ID, &dir.join("web"));
    issue(&ca, B_ID, &dir.join("api"));

    let oct = 20 + std::process::id() % 200;
    let (a_ip, b_ip) = (format!("10.231.{oct}.1"), format!("10.231.{oct}.2"));
    let vip = "10.96.0.10";
    std::fs::write(
        dir.join("web.yaml"),
        format!(
            "mode: STRICT\nservices:\n\
             - name: api.demo\n  port: 8080\n  protocol: http\n  virtualIps: [\"{vip}\"]\n  endpoints:\n\
             \x20   - {{ address: \"{b_ip}:8080\", identity: \"{B_ID}\" }}\n"
        ),
    )
    .expect("write config");
    std::fs::write(dir.join("api.yaml"), "mode: STRICT\nservices: []\n").expect("write config");

    let pods = Pods::new(&a_ip, &b_ip);
    for ns in [&pods.a, &pods.b] {
        let out = pods.exec(ns, &[palisade(), "init"]);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("iptables rules installed"),
            "{out:?}"
        );
    }
    // Idempotent: a second run leaves exactly the same rules.
    let first = pods.nat_rules(&pods.a);
    pods.exec(&pods.a, &[palisade(), "init"]);
    assert_eq!(
        pods.nat_rules(&pods.a),
        first,
        "a second `palisade init` changed the rules"
    );
    assert!(
        first.contains("-A PALISADE_OUTPUT -m owner --uid-owner 2102 -j RETURN"),
        "{first}"
    );

    // B's app listens on loopback only: only its proxy can reach it.
    let app = Proc::spawn(
        pods.cmd(
            &pods.b,
            &[
                palisade(),
                "demo-app",
                "--listen",
                "127.0.0.1:8080",
                "--name",
                "api",
            ],
        ),
        dir.join("api-app.log"),
    );
    let pa = proxy(&pods, &pods.a, "web", A_ID, dir, &ca);
    let pb = proxy(&pods, &pods.b, "api", B_ID, dir, &ca);

    let expected = format!("hello from api; caller: {A_ID}");
    let mut last = String::new();
    let through_pod_ip = eventually(Duration::from_secs(20), || {
        last = pods.plain_get(&pods.a, &b_ip, 8080, "/hello");
        last.contains(&expected)
    });
    assert!(
        through_pod_ip,
        "pod A -> {b_ip}:8080 did not arrive as {A_ID}: {last:?}\n-- web proxy:\n{}\n-- api proxy:\n{}\n-- app:\n{}",
        pa.log(),
        pb.log(),
        app.log()
    );
    // The service's virtual IP goes the same way (a ClusterIP on Kubernetes).
    let via_vip = pods.plain_get(&pods.a, vip, 8080, "/hello");
    assert!(via_vip.contains(&expected), "via {vip}: {via_vip:?}");

    // And it really was mTLS between the proxies: B's proxy counted inbound TLS from A (read
    // from inside B: its admin port is never redirected).
    let metrics = pods.plain_get(&pods.b, "127.0.0.1", 4191, "/metrics");
    assert!(
        metric_sum(
            &metrics,
            "palisade_tls_connections_total",
            &["direction=\"inbound\""]
        ) >= 1.0,
        "{metrics}"
    );
}
