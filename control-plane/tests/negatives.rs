//! Security negatives (issue 24) at the control plane, over real gRPC + mTLS on 127.0.0.1:
//!
//! - a bootstrap token that was superseded (expired) before it was ever used is refused,
//!   counted, logged once, and the CA goes on signing with the current token;
//! - a CSR asking for anything but the caller's own ID — two URI SANs, a NUL byte in the SAN,
//!   the bare trust domain — is refused, counted and logged once, and does not use up the
//!   token;
//! - no private key (the proxy's, at issuance and at every rotation, nor the CA's) and no
//!   bootstrap token ever appears in the log, captured at TRACE for every crate;
//! - a state directory pre-created by another user, or group-writable, is refused with one
//!   sentence naming it, and nothing is written into it.
//!
//! The tests share one captured log, so they run one at a time ([`serial`]) and each reads the
//! lines written since it started.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use palisade_api::v1::CertifyRequest;
use palisade_api::v1::identity_client::IdentityClient;
use palisade_certs::{CredentialStore, KeyAndCsr, SpiffeId, TrustBundle, TrustDomain};
use palisade_control_plane::{ControlPlaneConfig, RunningControlPlane, control_plane_id};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use tonic::Code;

#[path = "support/proxy.rs"]
mod proxy;

const T: Duration = Duration::from_secs(15);

async fn within<F: Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(T, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out: {what}"),
    }
}

const MESH: &str = r#"
trustDomain: cluster.local
certificateLifetime: 1h
controlPlane: { port: 18086 }
defaultPolicy: allow
policies: policies/
workloads:
  - name: web
    namespace: demo
    labels: { app: web }
    appPort: 28080
    inboundPort: 24143
    adminPort: 24191
  - name: api
    namespace: demo
    labels: { app: api }
    appPort: 28081
    inboundPort: 24144
    adminPort: 24192
services:
  - { name: api, namespace: demo, port: 8080, selector: { app: api }, protocol: http }
"#;

// ---------------------------------------------------------------------------------------------
// The log, captured at TRACE for every crate (rustls' `log` records included)

#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> LogWriter {
        LogWriter(self.0.clone())
    }
}

fn logs() -> &'static Logs {
    static LOGS: OnceLock<Logs> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Logs::default();
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("trace"))
            .with_ansi(false)
            .with_writer(logs.clone())
            .try_init()
            .expect("the only subscriber of this test binary");
        logs
    })
}

/// The log bytes written since `from`.
fn log_since(from: usize) -> Vec<u8> {
    let buf = logs().0.lock().unwrap_or_else(|e| e.into_inner());
    buf.get(from..).unwrap_or_default().to_vec()
}

fn log_len() -> usize {
    logs().0.lock().unwrap_or_else(|e| e.into_inner()).len()
}

fn lines_with(log: &[u8], needles: &[&str]) -> Vec<String> {
    String::from_utf8_lossy(log)
        .lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .map(str::to_string)
        .collect()
}

/// One test at a time: they read one shared log.
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}

// ---------------------------------------------------------------------------------------------
// A control plane on a temporary state directory

struct Cp {
    dir: tempfile::TempDir,
    tokens_file: PathBuf,
    cp: RunningControlPlane,
}

impl Cp {
    async fn start(mesh: &str, tokens: &[(&str, &str)]) -> Cp {
        palisade_certs::tls::install_default_provider();
        let dir = tempfile::tempdir().expect("tempdir");
        let mesh_path = dir.path().join("mesh.yaml");
        std::fs::create_dir_all(dir.path().join("policies")).expect("policies dir");
        std::fs::write(&mesh_path, mesh).expect("mesh file");
        let tokens_file = dir.path().join("tokens.json");
        write_tokens(&tokens_file, tokens);
        let cp = within(
            "start",
            palisade_control_plane::start(ControlPlaneConfig {
                mesh_path,
                state_dir: dir.path().join("state"),
                listen: Some("127.0.0.1:0".parse().expect("addr")),
                tokens: HashMap::new(),
                tokens_file: Some(tokens_file.clone()),
                metrics_listen: None,
            }),
        )
        .await
        .expect("the control plane starts");
        Cp {
            dir,
            tokens_file,
            cp,
        }
    }

    fn td(&self) -> TrustDomain {
        self.cp.trust_domain().clone()
    }

    fn id(&self, sa: &str) -> SpiffeId {
        SpiffeId::for_workload(&self.td(), "demo", sa).expect("id")
    }

    /// A bootstrapping proxy's view: no certificate yet, the control plane checked by its ID.
    async fn certify(&self, sa: &str, csr: &[u8], token: &str) -> Result<SpiffeId, tonic::Status> {
        let bundle = TrustBundle::load_pem(
            &self.td(),
            &self.cp.trust_bundle_path().expect("bundle path"),
        )
        .expect("bundle");
        let store = CredentialStore::new(self.id(sa), bundle);
        let tls = palisade_certs::tls::client_config(
            &store,
            control_plane_id(&self.td()).expect("cp id"),
            &[b"h2"],
        )
        .expect("tls");
        let ch = within(
            "connect",
            palisade_api::client::connect(self.cp.addr(), Arc::new(tls)),
        )
        .await
        .expect("connects");
        within(
            "certify",
            IdentityClient::new(ch).certify(CertifyRequest {
                csr_der: csr.to_vec(),
                token: token.to_string(),
            }),
        )
        .await
        .map(|r| SpiffeId::parse(&r.into_inner().spiffe_id).expect("an ID"))
    }

    fn certificates(&self, result: &str) -> String {
        let needle = format!("palisade_identity_certificates_total{{result=\"{result}\"}} ");
        self.cp
            .metrics()
            .encode()
            .lines()
            .find_map(|l| l.strip_prefix(&needle).map(str::to_string))
            .unwrap_or_else(|| "0".into())
    }
}

/// Rewrites the tokens file whole, as `palisade up` does before it starts a proxy.
fn write_tokens(path: &Path, tokens: &[(&str, &str)]) {
    let map: HashMap<&str, &str> = tokens.iter().copied().collect();
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, serde_json::to_string(&map).expect("json")).expect("write tokens");
    std::fs::rename(&tmp, path).expect("rename tokens");
}

/// Waits (bounded) for exactly one `certificate refused` line with `result` since `from`.
async fn refusal_logged_once(from: usize, result: &str) {
    let needles = ["certificate refused", &format!("result=\"{result}\"")];
    let deadline = Instant::now() + T;
    while lines_with(&log_since(from), &needles).is_empty() {
        assert!(Instant::now() < deadline, "no log line with {needles:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let lines = lines_with(&log_since(from), &needles);
    assert_eq!(lines.len(), 1, "logged more than once: {lines:#?}");
}

// ---------------------------------------------------------------------------------------------
// Bootstrap tokens and CSRs

#[tokio::test]
async fn a_superseded_bootstrap_token_is_refused_and_the_ca_keeps_serving() {
    let _one = serial().await;
    let from = log_len();
    let old = "old-token-web-0123456789abcdef";
    let new = "new-token-web-0123456789abcdef";
    let m = Cp::start(MESH, &[("web", old)]).await;
    // `up` restarts web's proxy before the old token was used: a new token replaces it.
    write_tokens(&m.tokens_file, &[("web", new)]);

    let kc = KeyAndCsr::generate(&m.id("web")).expect("csr");
    let err = m
        .certify("web", kc.csr_der(), old)
        .await
        .expect_err("the superseded token is refused");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert_eq!(m.certificates("unauthenticated"), "1");
    assert_eq!(m.certificates("issued"), "0");
    refusal_logged_once(from, "unauthenticated").await;

    // The CA goes on serving: the current token is certified, once.
    let got = m
        .certify("web", kc.csr_der(), new)
        .await
        .expect("the current token is certified");
    assert_eq!(got, m.id("web"));
    let err = m
        .certify("web", kc.csr_der(), new)
        .await
        .expect_err("a replayed token is refused");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert_eq!(m.certificates("token_replayed"), "1");
    assert_eq!(m.certificates("issued"), "1");
    // And the old one stays refused: it is in no tokens file any more.
    let err = m
        .certify("web", kc.csr_der(), old)
        .await
        .expect_err("still refused");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    within("shutdown", m.cp.shutdown()).await;
}

/// A CSR (PKCS#10, P-256) asking for `sans`.
fn csr_asking_for(sans: Vec<SanType>) -> Vec<u8> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = sans;
    p.serialize_request(&key).expect("csr").der().to_vec()
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().expect("IA5 string"))
}

#[tokio::test]
async fn a_csr_for_another_identity_is_refused_and_the_token_stays_usable() {
    let _one = serial().await;
    let token = "token-web-0123456789abcdef";
    let m = Cp::start(MESH, &[("web", token)]).await;
    let web = "spiffe://cluster.local/ns/demo/sa/web";
    let cases: Vec<(&str, Vec<SanType>)> = vec![
        (
            "another workload's ID",
            vec![uri("spiffe://cluster.local/ns/demo/sa/api")],
        ),
        (
            "two URI SANs, its own and another",
            vec![uri(web), uri("spiffe://cluster.local/ns/demo/sa/api")],
        ),
        (
            "its own ID with a NUL byte and more after it",
            vec![uri("spiffe://cluster.local/ns/demo/sa/web\0.api")],
        ),
        ("the bare trust domain", vec![uri("spiffe://cluster.local")]),
        (
            "the control plane's ID",
            vec![uri(control_plane_id(&m.td()).expect("cp id").as_str())],
        ),
    ];
    for (n, (what, sans)) in cases.into_iter().enumerate() {
        let from = log_len();
        let err = m
            .certify("web", &csr_asking_for(sans), token)
            .await
            .expect_err(what);
        assert_eq!(err.code(), Code::PermissionDenied, "{what}: {err:?}");
        assert!(err.message().contains(web), "{what}: {err:?}");
        assert_eq!(
            m.certificates("permission_denied"),
            (n + 1).to_string(),
            "{what}"
        );
        refusal_logged_once(from, "permission_denied").await;
        // A NUL byte from a CSR is never written raw into the log.
        assert!(
            !log_since(from).contains(&0),
            "{what}: a raw NUL byte in the log"
        );
    }
    assert_eq!(m.certificates("issued"), "0");
    // None of those used the token up: the proxy's own CSR is certified with it.
    let kc = KeyAndCsr::generate(&m.id("web")).expect("csr");
    let got = m
        .certify("web", kc.csr_der(), token)
        .await
        .expect("the token still certifies its own workload");
    assert_eq!(got, m.id("web"));
    within("shutdown", m.cp.shutdown()).await;
}

// ---------------------------------------------------------------------------------------------
// Private keys are never logged

/// Every form a key could take in a log line: the PEM body lines, its whole DER in base64 and
/// in hex, and the private scalar in hex, base64 and as a Rust byte list.
fn key_forms(pkcs8_der: &[u8]) -> Vec<String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let mut forms = vec![b64.encode(pkcs8_der), hex(pkcs8_der)];
    // PEM wraps the base64 at 64 characters; any one line is enough to give a key away.
    let whole = b64.encode(pkcs8_der);
    forms.extend(
        whole
            .as_bytes()
            .chunks(64)
            .filter(|c| c.len() >= 32)
            .map(|c| String::from_utf8_lossy(c).into_owned()),
    );
    // ECPrivateKey: version 1 (02 01 01), then the scalar as OCTET STRING (04 20 ...).
    let scalar = pkcs8_der
        .windows(5)
        .position(|w| w == [0x02, 0x01, 0x01, 0x04, 0x20])
        .and_then(|i| pkcs8_der.get(i + 5..i + 37))
        .expect("a P-256 PKCS#8 key");
    forms.push(hex(scalar));
    forms.push(b64.encode(scalar));
    forms.push(
        format!("{:?}", &scalar[..12])
            .trim_end_matches(']')
            .to_string(),
    );
    forms
}

fn pem_der(pem: &str) -> Vec<u8> {
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .expect("PEM base64")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_keys_and_tokens_never_appear_in_the_log_through_issuance_and_rotation() {
    let _one = serial().await;
    let from = log_len();
    let token = "token-web-never-logged-0123456789";
    // A 4 s lifetime: the proxy renews (a new key each time) about every 2 s, with 2 s for a
    // renewal to finish before the certificate runs out on a loaded machine.
    let m = Cp::start(
        &MESH.replace("certificateLifetime: 1h", "certificateLifetime: 4s"),
        &[("web", token)],
    )
    .await;
    let addrs = palisade_proxy::control_plane::ControlPlaneAddrs::parse(&m.cp.addr().to_string())
        .expect("addrs");
    let cfg = proxy::on_control_plane(
        "web",
        m.id("web"),
        addrs,
        token,
        None,
        m.cp.trust_bundle_path().expect("bundle"),
    );
    let p = within("proxy start", palisade_proxy::Proxy::start(cfg))
        .await
        .expect("the proxy starts");

    // Every key the proxy holds, from its first certificate through three rotations.
    let mut keys: Vec<Vec<u8>> = Vec::new();
    let mut first_pem = None;
    let deadline = Instant::now() + T;
    while keys.len() < 4 {
        assert!(
            Instant::now() < deadline,
            "the proxy held {} keys within {T:?}",
            keys.len()
        );
        if let Some(c) = p.store().current()
            && let Some(k) = c.svid.key.as_ref()
        {
            let der = k.secret_pkcs8_der().to_vec();
            if !keys.contains(&der) {
                keys.push(der);
                first_pem = first_pem.or_else(|| c.svid.key_pem());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    within("proxy shutdown", p.shutdown()).await;
    // The CA's keys, as the control plane saved them.
    let ca_dir = m
        .dir
        .path()
        .join("state")
        .join(palisade_control_plane::CA_DIR);
    for f in [
        palisade_certs::ca::ISSUER_KEY_FILE,
        palisade_certs::ca::ROOT_KEY_FILE,
    ] {
        let pem = std::fs::read_to_string(ca_dir.join(f)).expect("CA key");
        keys.push(pem_der(&pem));
    }
    within("shutdown", m.cp.shutdown()).await;

    let log = String::from_utf8_lossy(&log_since(from)).into_owned();
    // The detector finds a key that is there: the proxy's first key, as a PEM file holds it.
    let pem = first_pem.expect("the first key as PEM");
    assert!(
        key_forms(&keys[0]).iter().all(|f| f.len() >= 16)
            && key_forms(&keys[0]).iter().any(|f| pem.contains(f)),
        "the key forms do not match the key's own PEM"
    );
    // The capture worked: issuance and rotations are in it, with TRACE detail of the TLS
    // and HTTP/2 layers.
    assert!(
        lines_with(log.as_bytes(), &["certificate issued"]).len() >= 4,
        "issuance not captured"
    );
    assert!(
        lines_with(log.as_bytes(), &["certificate renewed"]).len() >= 3,
        "rotations not captured"
    );
    assert!(
        lines_with(log.as_bytes(), &["TRACE"]).len() > 10,
        "no TRACE lines"
    );

    assert!(!log.contains("PRIVATE KEY"), "a PEM private key in the log");
    assert!(!log.contains(token), "the bootstrap token in the log");
    for (i, key) in keys.iter().enumerate() {
        for form in key_forms(key) {
            assert!(
                !log.contains(&form),
                "key {i} appears in the log as {form:?}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The state directory

fn chmod(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

async fn start_on(state: &Path) -> Result<RunningControlPlane, String> {
    palisade_certs::tls::install_default_provider();
    let dir = tempfile::tempdir().expect("tempdir");
    let mesh_path = dir.path().join("mesh.yaml");
    std::fs::create_dir_all(dir.path().join("policies")).expect("policies");
    std::fs::write(&mesh_path, MESH).expect("mesh");
    within(
        "start",
        palisade_control_plane::start(ControlPlaneConfig {
            mesh_path,
            state_dir: state.to_path_buf(),
            listen: Some("127.0.0.1:0".parse().expect("addr")),
            tokens: HashMap::from([("web".to_string(), "token-web-0123456789".to_string())]),
            tokens_file: None,
            metrics_listen: None,
        }),
    )
    .await
    .map_err(|e| e.to_string())
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn a_state_dir_pre_created_by_another_user_is_refused_and_left_untouched() {
    let _one = serial().await;
    let tmp = tempfile::tempdir().expect("tempdir");

    // Ours, but group-writable: a group member could have planted a CA or a symlink.
    let shared = tmp.path().join("shared");
    std::fs::create_dir(&shared).expect("mkdir");
    chmod(&shared, 0o770);
    let err = start_on(&shared).await.expect_err("group-writable");
    assert!(
        err.contains(shared.to_str().expect("utf-8")) && err.contains("0770"),
        "{err}"
    );
    assert!(
        entries(&shared).is_empty(),
        "wrote into it: {:?}",
        entries(&shared)
    );

    if palisade_certs::secure_fs::current_uid() != 0 {
        eprintln!("skipped the other-owner cases: only root can hand a directory to another uid");
        return;
    }
    // Another user's (nobody, 65534), mode 0700 and all.
    let theirs = tmp.path().join("theirs");
    std::fs::create_dir(&theirs).expect("mkdir");
    chmod(&theirs, 0o700);
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).expect("chown");
    let err = start_on(&theirs)
        .await
        .expect_err("another user's state dir");
    assert!(
        err.contains(theirs.to_str().expect("utf-8")) && err.contains("owned by uid 65534"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "one sentence: {err}");
    assert!(
        entries(&theirs).is_empty(),
        "wrote into it: {:?}",
        entries(&theirs)
    );

    // Our state dir, but a `ca/` in it someone else made (to plant a CA of theirs).
    let planted = tmp.path().join("planted");
    std::fs::create_dir_all(planted.join("ca")).expect("mkdir");
    chmod(&planted, 0o700);
    chmod(&planted.join("ca"), 0o700);
    std::os::unix::fs::chown(planted.join("ca"), Some(65534), Some(65534)).expect("chown");
    let err = start_on(&planted).await.expect_err("another user's ca/");
    assert!(
        err.contains(planted.join("ca").to_str().expect("utf-8"))
            && err.contains("owned by uid 65534"),
        "{err}"
    );
    assert!(entries(&planted.join("ca")).is_empty());

    // Control: a fresh directory of ours is used, and made 0700.
    let fresh = tmp.path().join("fresh");
    let cp = start_on(&fresh).await.expect("a fresh state dir");
    within("shutdown", cp.shutdown()).await;
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&fresh)
        .expect("stat")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o700);
}
