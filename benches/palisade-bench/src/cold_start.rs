//! `palisade bench cold-start` (`palisade-bench cold-start`): how long a sidecar takes from
//! exec to answering `/ready` with 200, the figure a pod waits on before its app may take
//! traffic.
//!
//! Two ways a sidecar starts, each timed `--runs` times after one unmeasured start (which pays
//! for paging the binary in, and is reported apart as `first_ms`):
//!
//! - static: certificate, key, trust bundle and services from files (`--cert --key
//!   --config`), made once per bench run with `palisade ca init` / `palisade ca issue`;
//! - control plane: a real `palisade control-plane` on loopback, started once; each start
//!   gets a fresh bootstrap token (a token certifies one proxy start), sends its CSR, and is
//!   ready once it holds its certificate and its first config.
//!
//! Every start runs the sidecar binary the latency benchmark measures, on the same ports each
//! time (the proxy binds with SO_REUSEADDR, and the previous one has been killed and reaped).
//! The poller is a plain thread: a connect attempt every [`POLL`] until the admin port
//! accepts, then `GET /ready` on that connection every [`POLL`] until 200, so the proxy pays
//! for one small request per poll and the figure is late by at most one poll.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Between two connect attempts, and between two `/ready` requests.
const POLL: Duration = Duration::from_micros(200);
/// A start that is not ready by then has failed.
const READY_DEADLINE: Duration = Duration::from_secs(10);
const TRUST_DOMAIN: &str = "cluster.local";
const WORKLOAD: &str = "coldstart";
const NAMESPACE: &str = "bench";

#[derive(clap::Args)]
pub struct ColdStartArgs {
    /// Starts timed in each mode (after one unmeasured start).
    #[arg(long, default_value_t = 20)]
    pub runs: usize,
    /// Write the figures as JSON.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The sidecar binary to start. Default: as for the latency benchmark, `palisade-proxy`
    /// next to the `palisade` binary (or next to this one), else `palisade proxy`.
    #[arg(long, env = "PALISADE_PROXY_BIN")]
    pub proxy_bin: Option<PathBuf>,
    /// Keep the CA, the configs and the logs here instead of a temporary directory.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
}

/// A child process killed and reaped when dropped: no sidecar or control plane outlives the
/// start it was for, whatever error ends the benchmark.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The timed starts of one mode, in milliseconds.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Figures {
    first_ms: f64,
    samples_ms: Vec<f64>,
}

impl Figures {
    fn sorted(&self) -> Vec<f64> {
        let mut s = self.samples_ms.clone();
        s.sort_by(f64::total_cmp);
        s
    }

    /// Nearest rank on the sorted samples: with 20 runs p90 is the 18th fastest.
    fn quantile(&self, q: f64) -> f64 {
        let s = self.sorted();
        if s.is_empty() {
            return 0.0;
        }
        let rank = (q * s.len() as f64).ceil() as usize;
        s[rank.clamp(1, s.len()) - 1]
    }

    fn json(&self) -> serde_json::Value {
        let s = self.sorted();
        serde_json::json!({
            "p50_ms": self.quantile(0.5),
            "p90_ms": self.quantile(0.9),
            "min_ms": s.first().copied().unwrap_or(0.0),
            "max_ms": s.last().copied().unwrap_or(0.0),
            "first_ms": self.first_ms,
            "samples_ms": self.samples_ms,
        })
    }
}

pub fn run(args: ColdStartArgs, palisade_bin: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    if let Some(out) = &args.out {
        crate::latency::create_parent(out)?;
    }
    let palisade = crate::support::palisade_bin(palisade_bin.as_deref())?;
    let sidecar = crate::latency::mesh::proxy_bin(args.proxy_bin.as_deref(), &palisade);
    println!("palisade: {}", palisade.display());
    match &sidecar {
        Some(bin) => println!("sidecar: {}", bin.display()),
        None => println!("sidecar: palisade proxy"),
    }
    let tmp;
    let dir = match &args.state_dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
            d.clone()
        }
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let sidecar = Sidecar {
        palisade: &palisade,
        bin: sidecar.as_deref(),
    };
    let static_mode = static_starts(&sidecar, &dir, args.runs)?;
    let cp_mode = control_plane_starts(&sidecar, &dir, args.runs)?;

    print_table(args.runs, &static_mode, &cp_mode);
    if let Some(path) = &args.out {
        let doc = serde_json::json!({
            "runs": args.runs,
            "static": static_mode.json(),
            "control_plane": cp_mode.json(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

fn print_table(runs: usize, static_mode: &Figures, cp_mode: &Figures) {
    println!("cold start, exec to /ready 200, {runs} runs each (after one unmeasured start):");
    println!(
        "{:<14} {:>9} {:>9} {:>9} {:>9} {:>10}",
        "mode", "min ms", "p50 ms", "p90 ms", "max ms", "first ms"
    );
    for (name, f) in [("static", static_mode), ("control-plane", cp_mode)] {
        let s = f.sorted();
        println!(
            "{:<14} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>10.2}",
            name,
            s.first().copied().unwrap_or(0.0),
            f.quantile(0.5),
            f.quantile(0.9),
            s.last().copied().unwrap_or(0.0),
            f.first_ms,
        );
    }
}

/// The sidecar binary, as the latency benchmark picks it: `bin`, else `palisade proxy`.
struct Sidecar<'a> {
    palisade: &'a Path,
    bin: Option<&'a Path>,
}

/// The ports one sidecar listens on, the same for every start of a mode.
struct Ports {
    inbound: SocketAddr,
    admin: SocketAddr,
    upstream: SocketAddr,
}

impl Ports {
    fn free() -> anyhow::Result<Ports> {
        let port = || -> anyhow::Result<SocketAddr> {
            Ok(SocketAddr::from((
                [127, 0, 0, 1],
                crate::support::free_port()?,
            )))
        };
        Ok(Ports {
            inbound: port()?,
            admin: port()?,
            upstream: port()?,
        })
    }
}

impl Sidecar<'_> {
    /// The sidecar with its listeners and nothing from this process's environment: a
    /// `PALISADE_CERT` or `OTEL_EXPORTER_OTLP_ENDPOINT` left in the shell would change what
    /// is measured.
    fn command(&self, ports: &Ports, log: &Path) -> anyhow::Result<Command> {
        let mut c = match self.bin {
            Some(bin) => Command::new(bin),
            None => {
                let mut c = Command::new(self.palisade);
                c.arg("proxy");
                c
            }
        };
        for (name, _) in std::env::vars_os() {
            if name
                .to_str()
                .is_some_and(|n| n.starts_with("PALISADE_") || n.starts_with("OTEL_"))
            {
                c.env_remove(name);
            }
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        c.arg("--workload")
            .arg(WORKLOAD)
            .arg("--identity")
            .arg(spiffe_id(WORKLOAD))
            .arg("--inbound")
            .arg(ports.inbound.to_string())
            .arg("--admin")
            .arg(ports.admin.to_string())
            .arg("--upstream")
            .arg(format!("server.{NAMESPACE}:8080={}", ports.upstream))
            .env(
                "PALISADE_LOG",
                std::env::var("PALISADE_LOG").unwrap_or_else(|_| "warn".into()),
            )
            // Gone with this process, should it die before killing the sidecar.
            .env("PALISADE_WATCH_PARENT", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log));
        Ok(c)
    }
}

fn spiffe_id(sa: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{sa}")
}

/// A start that lost one of its ports to another process: not a measurement. `free_port`
/// cannot keep a port between two starts, when no one holds it, so another benchmark may take
/// it then (or listen on it first, and answer `/ready` in the sidecar's place).
#[derive(Debug)]
struct PortTaken(String);

impl std::fmt::Display for PortTaken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PortTaken {}

/// How many times a mode moves to new ports before a taken port is an error.
const NEW_PORTS: usize = 3;

/// One unmeasured start, then `runs` timed ones, each made by `prepare` on `ports` (which
/// may write what the start needs, such as a bootstrap token) and timed from its spawn. A
/// start that finds a port taken is made again on new ports.
fn starts(
    mode: &str,
    runs: usize,
    log: &Path,
    mut ports: Ports,
    mut prepare: impl FnMut(&Ports) -> anyhow::Result<Command>,
) -> anyhow::Result<Figures> {
    let mut moved = 0;
    let mut first_ms = 0.0;
    let mut samples_ms = Vec::with_capacity(runs);
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut i = 0;
    while i <= runs {
        let mut cmd = prepare(&ports)?;
        let took = match time_to_ready(&mut cmd, ports.admin, log) {
            Ok(took) => took,
            Err(e) if e.is::<PortTaken>() && moved < NEW_PORTS => {
                eprintln!("{mode}: {e}; starting again on new ports");
                ports = Ports::free()?;
                moved += 1;
                continue;
            }
            Err(e) => {
                return Err(e.context(match i {
                    0 => format!("the unmeasured {mode} start"),
                    i => format!("{mode} start {i} of {runs}"),
                }));
            }
        };
        i += 1;
        let ms = took.as_secs_f64() * 1000.0;
        if i == 1 {
            first_ms = ms;
        } else {
            samples_ms.push(ms);
        }
        if progress {
            eprint!("\r{mode}: {}/{runs} starts   ", i - 1);
        }
    }
    if progress {
        eprint!("\r{:40}\r", "");
    }
    Ok(Figures {
        first_ms,
        samples_ms,
    })
}

/// Spawns `cmd` and returns how long after the spawn its admin port answered `/ready` with
/// 200, once `/status` has shown that the answer was the sidecar's; the process is killed and
/// reaped before this returns.
fn time_to_ready(cmd: &mut Command, admin: SocketAddr, log: &Path) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut child = Reaped(
        cmd.spawn()
            .with_context(|| format!("cannot start {}", cmd.get_program().to_string_lossy()))?,
    );
    let mut conn: Option<TcpStream> = None;
    loop {
        if let Some(status) = child.0.try_wait()? {
            let why = format!(
                "the sidecar exited before it was ready ({status}){}",
                last_line(log)
            );
            if why.contains("Address already in use") {
                return Err(PortTaken(why).into());
            }
            bail!(why);
        }
        if start.elapsed() > READY_DEADLINE {
            bail!(
                "the sidecar did not answer /ready with 200 within {}s{}",
                READY_DEADLINE.as_secs(),
                last_line(log)
            );
        }
        if conn.is_none() {
            conn = TcpStream::connect_timeout(&admin, Duration::from_millis(100))
                .ok()
                .and_then(|tcp| {
                    // Bounded: a proxy that accepted but never answers fails at the deadline.
                    tcp.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
                    tcp.set_nodelay(true).ok()?;
                    Some(tcp)
                });
        }
        if let Some(tcp) = &mut conn {
            match crate::support::get_blocking(tcp, admin, "/ready") {
                Ok((r, _)) if r.status == 200 => {
                    let took = start.elapsed();
                    let ours = format!("\"workload\":\"{WORKLOAD}\"");
                    let status = crate::support::get_blocking(tcp, admin, "/status")
                        .context("/status after /ready")?;
                    if !String::from_utf8_lossy(&status.1).contains(&ours) {
                        return Err(PortTaken(format!(
                            "another process answered on the admin port {admin}"
                        ))
                        .into());
                    }
                    return Ok(took);
                }
                Ok((r, _)) if !r.close => {}
                _ => conn = None,
            }
        }
        std::thread::sleep(POLL);
    }
}

/// "; its log's last line: …" for an error about a sidecar, or nothing when the log is empty.
fn last_line(log: &Path) -> String {
    std::fs::read_to_string(log)
        .ok()
        .and_then(|t| {
            t.lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(|l| format!("; its log {}: {}", log.display(), l.trim()))
        })
        .unwrap_or_default()
}

/// Runs `palisade ARGS` to completion; its stderr is the error if it fails.
fn palisade(palisade: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(palisade)
        .args(args)
        .env("PALISADE_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", palisade.display()))?;
    if !out.status.success() {
        bail!(
            "palisade {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

/// Static mode: a CA and a leaf made once, a services file with one service, the same files
/// for every start.
fn static_starts(sidecar: &Sidecar, dir: &Path, runs: usize) -> anyhow::Result<Figures> {
    let ca = dir.join("static-ca");
    let leaf = dir.join("static-leaf");
    palisade(
        sidecar.palisade,
        &[
            "ca",
            "init",
            "--trust-domain",
            TRUST_DOMAIN,
            "--out",
            path_str(&ca)?,
        ],
    )?;
    palisade(
        sidecar.palisade,
        &[
            "ca",
            "issue",
            "--ca",
            path_str(&ca)?,
            "--spiffe-id",
            &spiffe_id(WORKLOAD),
            "--ttl",
            "1h",
            "--out",
            path_str(&leaf)?,
        ],
    )?;
    // One service with one endpoint (a server proxy that is never started: readiness does not
    // dial it).
    let config = dir.join("static.yaml");
    std::fs::write(
        &config,
        format!(
            "mode: STRICT\n\
             services:\n\
             \x20 - name: server.{NAMESPACE}\n\
             \x20   port: 8080\n\
             \x20   protocol: http\n\
             \x20   endpoints:\n\
             \x20     - {{ address: \"127.0.0.1:{port}\", identity: \"{id}\" }}\n",
            port = crate::support::free_port()?,
            id = spiffe_id("server"),
        ),
    )
    .with_context(|| format!("cannot write {}", config.display()))?;
    let log = dir.join("static-proxy.log");
    starts("static", runs, &log, Ports::free()?, |ports| {
        let mut c = sidecar.command(ports, &log)?;
        c.arg("--trust-bundle")
            .arg(ca.join(palisade_certs::ca::ROOT_CERT_FILE))
            .arg("--cert")
            .arg(leaf.join("cert.pem"))
            .arg("--key")
            .arg(leaf.join("key.pem"))
            .arg("--config")
            .arg(&config);
        Ok(c)
    })
}

/// Control-plane mode: `palisade control-plane` on a mesh file of the sidecar's workload and
/// the server it calls, started once; each start gets its own bootstrap token.
fn control_plane_starts(sidecar: &Sidecar, dir: &Path, runs: usize) -> anyhow::Result<Figures> {
    let ports = Ports::free()?;
    let state = dir.join("cp-state");
    let tokens = dir.join("tokens.json");
    write_private(&tokens, "{}")?;
    let (cp, control_plane) = start_control_plane(sidecar.palisade, dir, &ports, &tokens)?;
    let bundle = state.join("ca").join(palisade_certs::ca::ROOT_CERT_FILE);

    let token_file = dir.join("coldstart.token");
    let log = dir.join("control-plane-proxy.log");
    // Should a port be taken and the sidecar move to new ones, the mesh file keeps the first:
    // the proxy listens where its flags say, and the control plane gives those ports to no
    // one (only the server's callers would dial the inbound port).
    let figures = starts("control-plane", runs, &log, ports, |ports| {
        // As `palisade up` does before each start: a token the control plane has not seen
        // used, in the tokens file it re-reads on every Certify and in the proxy's own file.
        let token = random_token();
        write_private(&token_file, &token)?;
        write_private(&tokens, &serde_json::json!({ WORKLOAD: token }).to_string())?;
        let mut c = sidecar.command(ports, &log)?;
        c.arg("--control-plane")
            .arg(cp.to_string())
            .arg("--token-file")
            .arg(&token_file)
            .arg("--trust-bundle")
            .arg(&bundle);
        Ok(c)
    });
    drop(control_plane);
    figures
}

/// `palisade control-plane` on a generated mesh file (`DIR/mesh.yaml`, its state in
/// `DIR/cp-state`), ready and its trust anchor written: its gRPC address and the process. On
/// new ports if another process took one of its first.
fn start_control_plane(
    palisade: &Path,
    dir: &Path,
    ports: &Ports,
    tokens: &Path,
) -> anyhow::Result<(SocketAddr, Reaped)> {
    let state = dir.join("cp-state");
    let mesh = dir.join("mesh.yaml");
    let cp_log = dir.join("control-plane.log");
    let mut attempt = 0;
    loop {
        let cp = SocketAddr::from(([127, 0, 0, 1], crate::support::free_port()?));
        let metrics = SocketAddr::from(([127, 0, 0, 1], crate::support::free_port()?));
        std::fs::write(&mesh, mesh_yaml(cp.port(), ports)?)
            .with_context(|| format!("cannot write {}", mesh.display()))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&cp_log)
            .with_context(|| format!("cannot open {}", cp_log.display()))?;
        let mut control_plane = Reaped(
            Command::new(palisade)
                .arg("control-plane")
                .arg("--config")
                .arg(&mesh)
                .arg("--state-dir")
                .arg(&state)
                .arg("--tokens")
                .arg(tokens)
                .arg("--listen")
                .arg(cp.to_string())
                .arg("--metrics")
                .arg(metrics.to_string())
                .env("PALISADE_LOG", "warn")
                .env("PALISADE_WATCH_PARENT", "1")
                .stdin(Stdio::null())
                .stdout(Stdio::from(log.try_clone()?))
                .stderr(Stdio::from(log))
                .spawn()
                .context("cannot start the control plane")?,
        );
        let bundle = state.join("ca").join(palisade_certs::ca::ROOT_CERT_FILE);
        match wait_for_control_plane(&mut control_plane, metrics, &bundle, &cp_log) {
            Ok(()) => return Ok((cp, control_plane)),
            Err(e) if e.is::<PortTaken>() && attempt < NEW_PORTS => {
                eprintln!("control plane: {e}; starting again on new ports");
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The mesh the control plane serves: the sidecar's workload, which calls `server`, and the
/// server (never started: its endpoint only has to exist in the config).
fn mesh_yaml(cp_port: u16, ports: &Ports) -> anyhow::Result<String> {
    Ok(format!(
        "trustDomain: {TRUST_DOMAIN}\n\
         certificateLifetime: 1h\n\
         controlPlane: {{ port: {cp_port} }}\n\
         defaultPolicy: allow\n\
         workloads:\n\
         \x20 - {{ name: {WORKLOAD}, namespace: {NAMESPACE}, serviceAccount: {WORKLOAD}, labels: {{ app: {WORKLOAD} }}, inboundPort: {ci}, adminPort: {ca},\n\
         \x20     upstreams: [ {{ service: server.{NAMESPACE}, port: 8080, localPort: {local} }} ] }}\n\
         \x20 - {{ name: server, namespace: {NAMESPACE}, serviceAccount: server, labels: {{ app: server }}, appPort: {app}, inboundPort: {si}, adminPort: {sa} }}\n\
         services:\n\
         \x20 - {{ name: server, namespace: {NAMESPACE}, port: 8080, selector: {{ app: server }}, protocol: http }}\n",
        ci = ports.inbound.port(),
        ca = ports.admin.port(),
        local = ports.upstream.port(),
        app = crate::support::free_port()?,
        si = crate::support::free_port()?,
        sa = crate::support::free_port()?,
    ))
}

/// Until the control plane answers `/ready` on its metrics port and has written its trust
/// anchor; at most 60 s.
fn wait_for_control_plane(
    cp: &mut Reaped,
    metrics: SocketAddr,
    bundle: &Path,
    log: &Path,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if bundle.is_file()
            && let Ok(mut tcp) = TcpStream::connect_timeout(&metrics, Duration::from_secs(1))
            && tcp.set_read_timeout(Some(Duration::from_secs(2))).is_ok()
            && crate::support::get_blocking(&mut tcp, metrics, "/ready")
                .is_ok_and(|(r, _)| r.status == 200)
        {
            return Ok(());
        }
        if let Some(status) = cp.0.try_wait()? {
            let why = format!(
                "the control plane exited before it was ready ({status}){}",
                last_line(log)
            );
            if why.contains("Address already in use") {
                return Err(PortTaken(why).into());
            }
            bail!(why);
        }
        if Instant::now() > deadline {
            bail!(
                "the control plane was not ready within 60s{}",
                last_line(log)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A bootstrap token, as `palisade up` makes them: 32 random bytes in hex.
fn random_token() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Tokens are replaced whole (temp file + rename, 0600): the control plane may read the tokens
/// file at any moment.
fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    palisade_certs::secure_fs::write_private_atomic(path, contents.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::process::{Command, Stdio};

    use super::{Figures, PortTaken};

    /// `sh -c SCRIPT` with its output appended to `log`, as a sidecar's is.
    fn sh(script: &str, log: &std::path::Path) -> Command {
        let out = std::fs::File::create(log).expect("log");
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone().expect("log")))
            .stderr(Stdio::from(out));
        c
    }

    #[test]
    fn a_sidecar_that_cannot_bind_lost_its_port_and_one_that_fails_otherwise_did_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("proxy.log");
        let admin = std::net::SocketAddr::from(([127, 0, 0, 1], 9));
        let mut taken = sh(
            "echo 'error: cannot bind 127.0.0.1:9: Address already in use (os error 98)' >&2; exit 1",
            &log,
        );
        let e = super::time_to_ready(&mut taken, admin, &log).expect_err("exits");
        assert!(e.is::<PortTaken>(), "{e:#}");
        let mut broken = sh("echo 'error: bad config' >&2; exit 1", &log);
        let e = super::time_to_ready(&mut broken, admin, &log).expect_err("exits");
        assert!(!e.is::<PortTaken>(), "{e:#}");
        assert!(e.to_string().contains("bad config"), "{e:#}");
    }

    /// Another process listening on the admin port first would answer `/ready` in the
    /// sidecar's place: its `/status` gives it away.
    #[test]
    fn a_ready_answer_from_another_workload_is_not_a_measurement() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let admin = listener.local_addr().expect("addr");
        let server = std::thread::spawn(move || {
            let (mut tcp, _) = listener.accept().expect("accept");
            for body in ["ready\n", "{\"workload\":\"client\"}"] {
                let mut buf = [0u8; 1024];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = tcp.read(&mut buf).expect("read");
                    assert!(n > 0, "the poller closed early");
                    got.extend_from_slice(&buf[..n]);
                }
                let rsp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                tcp.write_all(rsp.as_bytes()).expect("write");
            }
        });
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("proxy.log");
        let mut sidecar = sh("sleep 30", &log);
        let e = super::time_to_ready(&mut sidecar, admin, &log).expect_err("not ours");
        assert!(e.is::<PortTaken>(), "{e:#}");
        server.join().expect("server");
    }

    #[test]
    fn quantiles_are_nearest_rank_and_ordered() {
        let f = Figures {
            first_ms: 9.0,
            samples_ms: (1..=20).rev().map(f64::from).collect(),
        };
        let j = f.json();
        assert_eq!(j["min_ms"], 1.0);
        assert_eq!(j["p50_ms"], 10.0);
        assert_eq!(j["p90_ms"], 18.0);
        assert_eq!(j["max_ms"], 20.0);
        assert_eq!(j["first_ms"], 9.0);
        let three = Figures {
            first_ms: 1.0,
            samples_ms: vec![3.0, 1.0, 2.0],
        };
        let j = three.json();
        assert_eq!(
            [&j["min_ms"], &j["p50_ms"], &j["p90_ms"], &j["max_ms"]].map(|v| v.as_f64()),
            [Some(1.0), Some(2.0), Some(3.0), Some(3.0)]
        );
    }
}
