//! The control plane over real TLS on 127.0.0.1: Certify's authentication rules, Watch's
//! authorization, and live config changes pushed only where they matter.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use palisade_api::delta::View;
use palisade_api::v1::discovery_client::DiscoveryClient;
use palisade_api::v1::identity_client::IdentityClient;
use palisade_api::v1::{
    CertifyRequest, ConfigDelta, DeltaRequest, LookupResult, ProxyConfig, ServiceKey, WatchRequest,
};
use palisade_certs::{CredentialStore, KeyAndCsr, SpiffeId, Svid, TrustBundle, TrustDomain};
use palisade_control_plane::{ControlPlaneConfig, RunningControlPlane, control_plane_id};
use rustls_pki_types::{CertificateDer, UnixTime};
use tonic::Code;
use tonic::transport::Channel;

const T: Duration = Duration::from_secs(10);

/// Every await in these tests is bounded.
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
    upstreams:
      - { service: api.demo, port: 8080, localPort: 29001 }
  - name: api
    namespace: demo
    labels: { app: api }
    appPort: 28081
    inboundPort: 24144
    adminPort: 24192
services:
  - { name: api, namespace: demo, port: 8080, selector: { app: api }, protocol: http }
"#;

/// A second `api` replica, appended to `workloads` to add an endpoint.
const API2: &str = r#"  - name: api-2
    namespace: demo
    serviceAccount: api
    labels: { app: api }
    inboundPort: 24145
    adminPort: 24193
"#;

const POLICY_API: &str = r#"apiVersion: palisade.dev/v1alpha1
kind: AuthorizationPolicy
metadata:
  name: api-from-web
  namespace: demo
spec:
  selector:
    matchLabels: { app: api }
  action: ALLOW
  rules:
    - from:
        - source:
            principals: ["cluster.local/ns/demo/sa/web"]
"#;

const POLICY_WEB: &str = r#"apiVersion: palisade.dev/v1alpha1
kind: AuthorizationPolicy
metadata:
  name: web-deny-nothing
  namespace: demo
spec:
  selector:
    matchLabels: { app: web }
  action: DENY
  rules:
    - from:
        - source:
            principals: ["cluster.local/ns/demo/sa/nobody"]
"#;

struct Mesh {
    _dir: tempfile::TempDir,
    mesh_path: PathBuf,
    policies: PathBuf,
    /// The tokens file (`palisade up`'s `tokens.json`), empty (`{}`) at start.
    tokens_file: PathBuf,
    cfg: ControlPlaneConfig,
    cp: Option<RunningControlPlane>,
    tokens: HashMap<String, String>,
}

/// Replaces a file atomically, as editors and `kubectl`-style tools do.
fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

impl Mesh {
    async fn start() -> Self {
        Self::start_with(MESH).await
    }

    async fn start_with(mesh: &str) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "palisade_control_plane=debug".into()),
            )
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().unwrap();
        let mesh_path = dir.path().join("mesh.yaml");
        let policies = dir.path().join("policies");
        std::fs::create_dir_all(&policies).unwrap();
        std::fs::write(policies.join("api.yaml"), POLICY_API).unwrap();
        std::fs::write(&mesh_path, mesh).unwrap();
        let tokens: HashMap<String, String> = [
            ("web".to_string(), "token-web-0123456789".to_string()),
            ("api".to_string(), "token-api-0123456789".to_string()),
            ("api-2".to_string(), "token-api2-0123456789".to_string()),
        ]
        .into();
        let tokens_file = dir.path().join("tokens.json");
        std::fs::write(&tokens_file, "{}").unwrap();
        let cfg = ControlPlaneConfig {
            mesh_path: mesh_path.clone(),
            state_dir: dir.path().join("state"),
            listen: Some("127.0.0.1:0".parse().unwrap()),
            tokens: tokens.clone(),
            tokens_file: Some(tokens_file.clone()),
            metrics_listen: None,
        };
        let cp = within("start", palisade_control_plane::start(cfg.clone()))
            .await
            .expect("control plane starts");
        Self {
            _dir: dir,
            mesh_path,
            policies,
            tokens_file,
            cfg,
            cp: Some(cp),
            tokens,
        }
    }

    /// Stops the control plane and starts a new one on the same state directory and tokens,
    /// as `palisade up` does when its control plane dies.
    async fn restart(&mut self) {
        if let Some(cp) = self.cp.take() {
            within("shutdown", cp.shutdown()).await;
        }
        let cp = within("restart", palisade_control_plane::start(self.cfg.clone()))
            .await
            .expect("control plane restarts");
        self.cp = Some(cp);
    }

    fn cp(&self) -> &RunningControlPlane {
        self.cp.as_ref().unwrap()
    }

    fn td(&self) -> TrustDomain {
        self.cp().trust_domain().clone()
    }

    fn id(&self, sa: &str) -> SpiffeId {
        SpiffeId::for_workload(&self.td(), "demo", sa).unwrap()
    }

    fn bundle(&self) -> TrustBundle {
        TrustBundle::load_pem(&self.td(), &self.cp().trust_bundle_path().unwrap()).unwrap()
    }

    /// A store for `sa` holding no certificate yet (a bootstrapping proxy).
    fn empty_store(&self, sa: &str) -> Arc<CredentialStore> {
        CredentialStore::new(self.id(sa), self.bundle())
    }

    async fn channel(&self, store: &Arc<CredentialStore>) -> Channel {
        let tls = palisade_certs::tls::client_config(
            store,
            control_plane_id(&self.td()).unwrap(),
            &[b"h2"],
        )
        .unwrap();
        within(
            "connect",
            palisade_api::client::connect(self.cp().addr(), Arc::new(tls)),
        )
        .await
        .expect("connects to the control plane")
    }

    async fn certify(
        &self,
        store: &Arc<CredentialStore>,
        csr: &[u8],
        token: &str,
    ) -> Result<palisade_api::v1::CertifyResponse, tonic::Status> {
        let ch = self.channel(store).await;
        within(
            "certify",
            IdentityClient::new(ch).certify(CertifyRequest {
                csr_der: csr.to_vec(),
                token: token.to_string(),
            }),
        )
        .await
        .map(|r| r.into_inner())
    }

    /// Bootstraps `workload` (service account `sa`) with its token: a store holding its SVID.
    async fn bootstrap(&self, workload: &str, sa: &str) -> Arc<CredentialStore> {
        let store = self.empty_store(sa);
        let kc = KeyAndCsr::generate(store.id()).unwrap();
        let rsp = self
            .certify(&store, kc.csr_der(), &self.tokens[workload])
            .await
            .expect("certify with the right token");
        let svid = Svid {
            id: SpiffeId::parse(&rsp.spiffe_id).unwrap(),
            chain: rsp
                .chain_der
                .into_iter()
                .map(CertificateDer::from)
                .collect(),
            key: None,
            not_before: 0,
            not_after: rsp.valid_until_unix,
        };
        store.install(kc.into_svid(svid).unwrap()).unwrap();
        store
    }

    async fn watch(
        &self,
        store: &Arc<CredentialStore>,
        workload: &str,
    ) -> Result<tonic::Streaming<ProxyConfig>, tonic::Status> {
        let ch = self.channel(store).await;
        within(
            "watch",
            DiscoveryClient::new(ch).watch(WatchRequest {
                workload: workload.to_string(),
                known_version: 0,
            }),
        )
        .await
        .map(|r| r.into_inner())
    }

    /// Opens `Discovery.Deltas` for `workload`; the sender carries the proxy's replies.
    async fn deltas(
        &self,
        store: &Arc<CredentialStore>,
        workload: &str,
    ) -> Result<
        (
            tokio::sync::mpsc::Sender<DeltaRequest>,
            tonic::Streaming<ConfigDelta>,
        ),
        tonic::Status,
    > {
        let hello = DeltaRequest {
            workload: workload.into(),
            ..Default::default()
        };
        self.deltas_with(store, hello).await
    }

    /// A Deltas stream opened with `hello`, and the sender of the messages after it.
    async fn deltas_with(
        &self,
        store: &Arc<CredentialStore>,
        hello: DeltaRequest,
    ) -> Result<
        (
            tokio::sync::mpsc::Sender<DeltaRequest>,
            tonic::Streaming<ConfigDelta>,
        ),
        tonic::Status,
    > {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(hello).await.expect("queue the hello");
        let ch = self.channel(store).await;
        let rsp = within(
            "deltas",
            DiscoveryClient::new(ch).deltas(tokio_stream::wrappers::ReceiverStream::new(rx)),
        )
        .await?;
        Ok((tx, rsp.into_inner()))
    }

    fn metrics(&self) -> String {
        self.cp().metrics().encode()
    }

    async fn stop(mut self) {
        if let Some(cp) = self.cp.take() {
            within("shutdown", cp.shutdown()).await;
        }
    }
}

async fn next(stream: &mut tonic::Streaming<ProxyConfig>) -> ProxyConfig {
    within("next config", stream.message())
        .await
        .expect("stream ok")
        .expect("stream open")
}

/// Asserts that nothing arrives on `stream` for `d`.
async fn quiet(stream: &mut tonic::Streaming<ProxyConfig>, d: Duration, what: &str) {
    if let Ok(msg) = tokio::time::timeout(d, stream.message()).await {
        panic!("{what}: unexpected message {msg:?}");
    }
}

fn endpoints(cfg: &ProxyConfig, service: &str) -> Vec<String> {
    let mut v: Vec<String> = cfg
        .services
        .iter()
        .find(|s| s.name == service)
        .map(|s| s.endpoints.iter().map(|e| e.workload.clone()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

#[tokio::test]
async fn invalid_mesh_file_fails_start_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let mesh_path = dir.path().join("mesh.yaml");
    std::fs::create_dir_all(dir.path().join("policies")).unwrap();
    std::fs::write(
        &mesh_path,
        MESH.replace("inboundPort: 24144", "inboundPort: [1]"),
    )
    .unwrap();
    let err = within(
        "start",
        palisade_control_plane::start(ControlPlaneConfig {
            mesh_path: mesh_path.clone(),
            state_dir: dir.path().join("state"),
            listen: Some("127.0.0.1:0".parse().unwrap()),
            tokens: HashMap::new(),
            tokens_file: None,
            metrics_listen: None,
        }),
    )
    .await
    .expect_err("an invalid mesh file is refused");
    let msg = err.to_string();
    assert!(msg.contains("mesh.yaml"), "{msg}");
    assert!(msg.contains("workloads[1].inboundPort"), "{msg}");

    std::fs::write(
        &mesh_path,
        MESH.replace("localPort: 29001", "localPort: 24191"),
    )
    .unwrap();
    let err = palisade_control_plane::mesh::load(&mesh_path).unwrap_err();
    assert_eq!(
        err.field(),
        Some("workloads[0].upstreams[0].localPort"),
        "{err}"
    );
}

#[tokio::test]
async fn certify_with_the_right_token_issues_the_workloads_svid() {
    let m = Mesh::start().await;
    let store = m.empty_store("web");
    let kc = KeyAndCsr::generate(store.id()).unwrap();
    let rsp = m
        .certify(&store, kc.csr_der(), "token-web-0123456789")
        .await
        .expect("issued");
    assert_eq!(rsp.spiffe_id, "spiffe://cluster.local/ns/demo/sa/web");
    assert_eq!(rsp.trust_domain, "cluster.local");
    assert_eq!(rsp.trust_bundle_der.len(), 1);
    let chain: Vec<CertificateDer<'static>> = rsp
        .chain_der
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    assert_eq!(chain.len(), 2, "leaf then issuer");
    let bundle = TrustBundle::with_roots(
        &m.td(),
        rsp.trust_bundle_der.into_iter().map(CertificateDer::from),
    )
    .unwrap();
    let id = palisade_certs::verify_svid(&chain, &bundle, Some(&m.td()), UnixTime::now())
        .expect("a valid X509-SVID");
    assert_eq!(id, m.id("web"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (rsp.valid_until_unix - now - 3600).abs() < 120,
        "lifetime from the mesh file"
    );
    assert!(
        m.metrics()
            .contains("palisade_identity_certificates_total{result=\"issued\"} 1"),
        "{}",
        m.metrics()
    );
    m.stop().await;
}

#[tokio::test]
async fn renewal_with_the_current_svid_needs_no_token() {
    let m = Mesh::start().await;
    let store = m.bootstrap("api", "api").await;
    let kc = KeyAndCsr::generate(store.id()).unwrap();
    let rsp = m.certify(&store, kc.csr_der(), "").await.expect("renewed");
    assert_eq!(rsp.spiffe_id, m.id("api").as_str());
    // The SVID decides, not the CSR: asking for another ID over mTLS is refused too.
    let other = KeyAndCsr::generate(&m.id("web")).unwrap();
    let err = m.certify(&store, other.csr_der(), "").await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    m.stop().await;
}

#[tokio::test]
async fn token_for_a_with_csr_for_b_is_permission_denied() {
    let m = Mesh::start().await;
    let store = m.empty_store("web");
    let kc = KeyAndCsr::generate(&m.id("api")).unwrap();
    let err = m
        .certify(&store, kc.csr_der(), "token-web-0123456789")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message()
            .contains("spiffe://cluster.local/ns/demo/sa/api"),
        "{err:?}"
    );
    assert!(
        err.message()
            .contains("spiffe://cluster.local/ns/demo/sa/web"),
        "{err:?}"
    );
    assert!(
        m.metrics()
            .contains("palisade_identity_certificates_total{result=\"permission_denied\"} 1"),
        "{}",
        m.metrics()
    );
    m.stop().await;
}

#[tokio::test]
async fn random_or_missing_token_is_unauthenticated() {
    let m = Mesh::start().await;
    let store = m.empty_store("web");
    let kc = KeyAndCsr::generate(store.id()).unwrap();
    let err = m
        .certify(&store, kc.csr_der(), "token-web-0123456788")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let err = m.certify(&store, kc.csr_der(), "").await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(
        m.metrics()
            .contains("palisade_identity_certificates_total{result=\"unauthenticated\"} 2"),
        "{}",
        m.metrics()
    );
    m.stop().await;
}

/// Counts of `palisade_identity_certificates_total` with `result`.
fn certificates(m: &Mesh, result: &str) -> String {
    let needle = format!("palisade_identity_certificates_total{{result=\"{result}\"}} ");
    m.metrics()
        .lines()
        .find_map(|l| l.strip_prefix(&needle).map(str::to_string))
        .unwrap_or_else(|| "0".into())
}

#[tokio::test]
async fn a_bootstrap_token_certifies_one_proxy_start() {
    let mut m = Mesh::start().await;
    let store = m.bootstrap("web", "web").await;
    let token = m.tokens["web"].clone();

    // Replayed from anywhere without the SVID (a leaked token): refused and counted.
    let thief = m.empty_store("web");
    let kc = KeyAndCsr::generate(thief.id()).unwrap();
    let err = m.certify(&thief, kc.csr_der(), &token).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("already used"), "{err:?}");
    assert_eq!(certificates(&m, "token_replayed"), "1");
    assert_eq!(certificates(&m, "issued"), "1");

    // Renewal is unchanged: the proxy authenticates with its SVID (and still sends its
    // consumed token along, as real proxies do).
    let kc = KeyAndCsr::generate(store.id()).unwrap();
    let rsp = m
        .certify(&store, kc.csr_der(), &token)
        .await
        .expect("renewed");
    assert_eq!(rsp.spiffe_id, m.id("web").as_str());

    // A restarted control plane (same state directory and tokens) still refuses it, and
    // still accepts a token that was never used.
    m.restart().await;
    let err = m.certify(&thief, kc.csr_der(), &token).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert_eq!(certificates(&m, "token_replayed"), "1");
    m.bootstrap("api", "api").await;
    assert_eq!(certificates(&m, "issued"), "1");
    m.stop().await;
}

#[tokio::test]
async fn a_token_added_to_the_tokens_file_later_is_accepted() {
    let m = Mesh::start().await;
    let store = m.empty_store("web");
    let kc = KeyAndCsr::generate(store.id()).unwrap();
    let late = "late-token-web-0123456789";
    let err = m.certify(&store, kc.csr_der(), late).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "not known yet: {err:?}");

    // As `palisade up` does right before it starts a proxy.
    write_atomic(&m.tokens_file, &format!("{{\"web\": \"{late}\"}}"));
    let rsp = m
        .certify(&store, kc.csr_der(), late)
        .await
        .expect("a token added to the file is accepted");
    assert_eq!(rsp.spiffe_id, m.id("web").as_str());
    let err = m.certify(&store, kc.csr_der(), late).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert_eq!(certificates(&m, "token_replayed"), "1");
    m.stop().await;
}

#[tokio::test]
async fn garbage_csr_is_invalid_argument() {
    let m = Mesh::start().await;
    let store = m.empty_store("web");
    let err = m
        .certify(&store, b"\x30\x03not a csr", "token-web-0123456789")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    // A well-formed CSR whose signature was tampered with is refused as well.
    let kc = KeyAndCsr::generate(store.id()).unwrap();
    let mut bad = kc.csr_der().to_vec();
    let last = bad.len() - 1;
    bad[last] ^= 0x55;
    let err = m
        .certify(&store, &bad, "token-web-0123456789")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        m.metrics()
            .contains("palisade_identity_certificates_total{result=\"invalid_csr\"} 2"),
        "{}",
        m.metrics()
    );
    m.stop().await;
}

#[tokio::test]
async fn watch_without_a_client_certificate_is_refused() {
    let m = Mesh::start().await;
    let store = m.empty_store("web");
    let err = m.watch(&store, "web").await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    m.stop().await;
}

#[tokio::test]
async fn watch_for_another_workload_is_permission_denied() {
    let m = Mesh::start().await;
    let web = m.bootstrap("web", "web").await;
    let err = m.watch(&web, "api").await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = m.watch(&web, "nope").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    m.stop().await;
}

/// The sample of `name{label}` in the control plane's metrics ("0" when absent).
fn sample(m: &Mesh, name: &str, label: &str) -> String {
    let needle = format!("{name}{{{label}}} ");
    m.metrics()
        .lines()
        .find_map(|l| l.strip_prefix(&needle).map(str::to_string))
        .unwrap_or_else(|| "0".into())
}

#[tokio::test]
async fn refused_watch_calls_are_counted_by_reason() {
    let m = Mesh::start().await;
    let refused = |reason: &str| {
        sample(
            &m,
            "palisade_discovery_watch_refused_total",
            &format!("reason=\"{reason}\""),
        )
    };
    let anon = m.empty_store("web");
    assert!(m.watch(&anon, "web").await.is_err());
    let web = m.bootstrap("web", "web").await;
    assert!(m.watch(&web, "api").await.is_err());
    assert!(m.watch(&web, "api").await.is_err());
    assert!(m.watch(&web, "nope").await.is_err());
    assert_eq!(refused("no_client_certificate"), "1");
    assert_eq!(refused("permission_denied"), "2");
    assert_eq!(refused("unknown_workload"), "1");
    // An accepted Watch is not a refusal.
    let _s = m.watch(&web, "web").await.expect("watch");
    assert_eq!(refused("permission_denied"), "2");
    m.stop().await;
}

#[tokio::test]
async fn oversize_requests_are_resource_exhausted_and_counted() {
    let m = Mesh::start().await;
    let big = "x".repeat(palisade_control_plane::limits::MAX_REQUEST_MESSAGE + 1);

    // Over mTLS, as a proxy would call.
    let web = m.bootstrap("web", "web").await;
    let err = m.watch(&web, &big).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(
        sample(
            &m,
            "palisade_api_oversize_requests_total",
            "service=\"discovery\""
        ),
        "1"
    );
    assert_eq!(
        sample(
            &m,
            "palisade_discovery_watch_refused_total",
            "reason=\"message_too_large\""
        ),
        "1"
    );

    // The same for the hello of a Deltas stream.
    let err = m.deltas(&web, &big).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(
        sample(
            &m,
            "palisade_discovery_watch_refused_total",
            "reason=\"message_too_large\""
        ),
        "2"
    );

    // And before authenticating: a bootstrapping caller with a huge CSR.
    let anon = m.empty_store("api");
    let err = m
        .certify(&anon, big.as_bytes(), "token-api-0123456789")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(
        sample(
            &m,
            "palisade_api_oversize_requests_total",
            "service=\"identity\""
        ),
        "1"
    );
    // The token was never looked at, so it still works.
    m.bootstrap("api", "api").await;

    // A request just under the limit is served as usual (here: refused for its content).
    let near = "x".repeat(palisade_control_plane::limits::MAX_REQUEST_MESSAGE - 64);
    let err = m.watch(&web, &near).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    m.stop().await;
}

#[tokio::test]
async fn watch_streams_the_workloads_own_config() {
    let m = Mesh::start().await;
    let web = m.bootstrap("web", "web").await;
    let mut s = m.watch(&web, "web").await.expect("watch");
    let cfg = next(&mut s).await;
    assert_eq!(cfg.version, 1);
    assert_eq!(endpoints(&cfg, "api"), vec!["api"]);
    let api = &cfg.services[0];
    assert_eq!(api.port, 8080);
    assert_eq!(api.protocol, palisade_api::v1::Protocol::Http as i32);
    assert_eq!(api.endpoints[0].address, "127.0.0.1:24144");
    assert_eq!(
        api.endpoints[0].identity,
        "spiffe://cluster.local/ns/demo/sa/api"
    );
    assert_eq!(api.endpoints[0].weight, 1);
    assert_eq!(cfg.trust_bundle_der.len(), 1);
    let inbound = cfg.inbound.as_ref().unwrap();
    assert_eq!(inbound.mode, palisade_api::v1::MtlsMode::Strict as i32);
    assert!(
        inbound.authorization_policies.is_empty(),
        "no policy selects web"
    );
    assert_eq!(
        inbound.app_protocol,
        palisade_api::v1::Protocol::Detect as i32,
        "no service selects web"
    );
    assert_eq!(
        inbound.default_policy,
        palisade_api::v1::DefaultPolicy::Allow as i32
    );

    let api = m.bootstrap("api", "api").await;
    let mut s = m.watch(&api, "api").await.expect("watch");
    let cfg = next(&mut s).await;
    let inbound = cfg.inbound.as_ref().unwrap();
    assert_eq!(
        inbound.app_protocol,
        palisade_api::v1::Protocol::Http as i32
    );
    assert_eq!(inbound.authorization_policies.len(), 1);
    let policy = &inbound.authorization_policies[0];
    assert_eq!(
        (policy.namespace.as_str(), policy.name.as_str()),
        ("demo", "api-from-web"),
        "{policy:?}"
    );
    assert_eq!(policy.action, palisade_api::v1::Action::Allow as i32);
    let source = policy.rules[0].from[0].source.as_ref().unwrap();
    assert_eq!(
        source.principals,
        vec![palisade_api::authorization::string_match(
            "cluster.local/ns/demo/sa/web"
        )],
        "typed on the wire"
    );
    m.stop().await;
}

#[tokio::test]
async fn adding_an_endpoint_pushes_within_a_second() {
    let m = Mesh::start().await;
    let web = m.bootstrap("web", "web").await;
    let mut s = m.watch(&web, "web").await.expect("watch");
    let first = next(&mut s).await;
    assert_eq!(endpoints(&first, "api"), vec!["api"]);

    let edited = MESH.replace("services:\n", &format!("{API2}services:\n"));
    let t0 = Instant::now();
    write_atomic(&m.mesh_path, &edited);
    let cfg = next(&mut s).await;
    let took = t0.elapsed();
    assert!(cfg.version > first.version);
    assert_eq!(endpoints(&cfg, "api"), vec!["api", "api-2"]);
    assert!(took < Duration::from_secs(1), "push took {took:?}");

    // And removing it again, with a plain in-place write this time.
    std::fs::write(&m.mesh_path, MESH).unwrap();
    let cfg2 = next(&mut s).await;
    assert!(cfg2.version > cfg.version);
    assert_eq!(endpoints(&cfg2, "api"), vec!["api"]);
    m.stop().await;
}

/// One message of a `Deltas` stream.
async fn next_delta(stream: &mut tonic::Streaming<ConfigDelta>) -> ConfigDelta {
    within("next delta", stream.message())
        .await
        .expect("stream ok")
        .expect("stream open")
}

fn reply(version: u64, error: &str, resync: bool) -> DeltaRequest {
    DeltaRequest {
        version,
        error: error.into(),
        resync,
        ..Default::default()
    }
}

/// Waits until `name{label}` reads `want` in the control plane's metrics.
async fn metric_reaches(m: &Mesh, name: &str, label: &str, want: &str) {
    let deadline = Instant::now() + T;
    while sample(m, name, label) != want {
        assert!(
            Instant::now() < deadline,
            "{name}{{{label}}} is {}, never {want}",
            sample(m, name, label)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn deltas_carry_what_changed_and_a_refused_one_is_answered_with_a_snapshot() {
    let m = Mesh::start().await;
    let web = m.bootstrap("web", "web").await;
    let (tx, mut s) = m.deltas(&web, "web").await.expect("deltas");
    let first = next_delta(&mut s).await;
    assert_eq!(first.base_version, 0, "a full snapshot first");
    assert!(first.inbound.is_some() && first.trust_bundle.is_some());
    let mut view = View::default();
    view.apply(first.clone()).expect("snapshot applies");
    assert_eq!(endpoints(view.config(), "api"), ["api"]);
    tx.send(reply(first.version, "", false)).await.unwrap();

    // An endpoint joins api: only api travels, on top of the snapshot.
    write_atomic(
        &m.mesh_path,
        &MESH.replace("services:\n", &format!("{API2}services:\n")),
    );
    let d = next_delta(&mut s).await;
    assert_eq!(d.base_version, first.version);
    assert!(d.inbound.is_none() && d.trust_bundle.is_none() && d.removed_services.is_empty());
    let names: Vec<&str> = d.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["api"]);
    view.apply(d.clone()).expect("delta applies");
    assert_eq!(endpoints(view.config(), "api"), ["api", "api-2"]);
    tx.send(reply(d.version, "", false)).await.unwrap();

    // A policy now selects web: only the inbound config travels.
    std::fs::write(m.policies.join("web.yaml"), POLICY_WEB).unwrap();
    let p = next_delta(&mut s).await;
    assert_eq!(p.base_version, d.version);
    assert!(p.services.is_empty() && p.removed_services.is_empty());
    let inbound = p.inbound.clone().expect("the inbound config changed");
    assert_eq!(inbound.authorization_policies.len(), 1);
    view.apply(p.clone()).expect("delta applies");
    tx.send(reply(p.version, "", false)).await.unwrap();
    metric_reaches(&m, "palisade_discovery_acks_total", "result=\"ack\"", "3").await;

    // The proxy asks for a resync: a full snapshot of what is served now follows.
    tx.send(reply(p.version, "version gap", true))
        .await
        .unwrap();
    let again = next_delta(&mut s).await;
    assert_eq!((again.base_version, again.version), (0, p.version));
    let mut fresh = View::default();
    fresh.apply(again.clone()).expect("snapshot applies");
    assert_eq!(
        fresh.config(),
        view.config(),
        "the snapshot is what the deltas built"
    );
    // A config refused without a resync (it did not compile) is not sent again.
    tx.send(reply(again.version, "does not compile", false))
        .await
        .unwrap();
    metric_reaches(&m, "palisade_discovery_acks_total", "result=\"nack\"", "2").await;
    // The next message is the next change, as a delta on top of that snapshot.
    write_atomic(&m.mesh_path, MESH);
    let after = next_delta(&mut s).await;
    assert_eq!(
        after.base_version, again.version,
        "a delta, not another snapshot"
    );
    fresh.apply(after).expect("delta applies");
    assert_eq!(endpoints(fresh.config(), "api"), ["api"]);
    m.stop().await;
}

/// The names of the services `cfg` holds.
fn service_names(cfg: &ProxyConfig) -> Vec<&str> {
    cfg.services.iter().map(|s| s.name.as_str()).collect()
}

#[tokio::test]
async fn a_proxy_on_demand_gets_only_the_services_it_looked_up() {
    let m = Mesh::start().await;
    // api declares no upstreams: without on-demand it gets the whole mesh.
    let api = m.bootstrap("api", "api").await;
    let (_tx, mut whole) = m.deltas(&api, "api").await.expect("deltas");
    let snapshot = next_delta(&mut whole).await;
    assert!(!snapshot.on_demand, "not asked for");
    let mut v = View::default();
    v.apply(snapshot).unwrap();
    assert_eq!(service_names(v.config()), ["api"]);

    let hello = DeltaRequest {
        workload: "api".into(),
        on_demand: true,
        ..Default::default()
    };
    let (tx, mut s) = m.deltas_with(&api, hello.clone()).await.expect("deltas");
    let first = next_delta(&mut s).await;
    assert!(
        first.on_demand,
        "the snapshot says lookups are resolved on this stream"
    );
    let mut view = View::default();
    view.apply(first.clone()).expect("snapshot");
    assert!(view.config().services.is_empty(), "nothing looked up yet");

    // api's own endpoint address (its inbound listener) and an address no service has.
    let lookup = |dsts: &[&str], releases: Vec<ServiceKey>| DeltaRequest {
        lookups: dsts.iter().map(|d| d.to_string()).collect(),
        releases,
        ..Default::default()
    };
    tx.send(lookup(
        &["127.0.0.1:24144", "127.0.0.1:9", "not an address"],
        vec![],
    ))
    .await
    .unwrap();
    let answer = next_delta(&mut s).await;
    assert_eq!(
        (answer.base_version, answer.version),
        (first.version, first.version),
        "the same generation: the version stays"
    );
    let results: Vec<(&str, LookupResult)> = answer
        .lookups
        .iter()
        .map(|l| (l.destination.as_str(), l.result()))
        .collect();
    assert_eq!(
        results,
        [
            ("127.0.0.1:24144", LookupResult::LookupFound),
            ("127.0.0.1:9", LookupResult::LookupNotFound),
            ("not an address", LookupResult::LookupNotFound),
        ]
    );
    view.apply(answer).expect("the answer applies");
    assert_eq!(service_names(view.config()), ["api"]);
    assert_eq!(endpoints(view.config(), "api"), ["api"]);
    metric_reaches(
        &m,
        "palisade_discovery_lookups_total",
        "result=\"found\"",
        "1",
    )
    .await;
    metric_reaches(
        &m,
        "palisade_discovery_lookups_total",
        "result=\"not_found\"",
        "2",
    )
    .await;

    // A change to a service it looked up reaches it as a delta.
    write_atomic(
        &m.mesh_path,
        &MESH.replace("services:\n", &format!("{API2}services:\n")),
    );
    let d = next_delta(&mut s).await;
    view.apply(d).expect("delta applies");
    assert_eq!(endpoints(view.config(), "api"), ["api", "api-2"]);

    // Looking up a held service again changes nothing but is answered.
    tx.send(lookup(&["127.0.0.1:24145"], vec![])).await.unwrap();
    let again = next_delta(&mut s).await;
    assert!(again.services.is_empty() && again.removed_services.is_empty());
    assert_eq!(again.lookups[0].result(), LookupResult::LookupFound);
    view.apply(again).expect("applies");

    // Released: the service leaves the config.
    let key = ServiceKey {
        name: "api".into(),
        namespace: "demo".into(),
        port: 8080,
    };
    tx.send(lookup(&[], vec![key.clone()])).await.unwrap();
    let gone = next_delta(&mut s).await;
    assert_eq!(gone.removed_services, std::slice::from_ref(&key));
    view.apply(gone).expect("applies");
    assert!(view.config().services.is_empty());

    // A reconnecting proxy names what it resolved before; its first snapshot keeps it.
    let (_tx2, mut s2) = m
        .deltas_with(
            &api,
            DeltaRequest {
                services: vec![key],
                ..hello
            },
        )
        .await
        .expect("deltas");
    let mut fresh = View::default();
    fresh.apply(next_delta(&mut s2).await).expect("snapshot");
    assert_eq!(service_names(fresh.config()), ["api"]);
    m.stop().await;
}

#[tokio::test]
async fn broken_policy_keeps_the_last_config_and_pushes_nothing() {
    let m = Mesh::start().await;
    let api = m.bootstrap("api", "api").await;
    let mut s = m.watch(&api, "api").await.expect("watch");
    let first = next(&mut s).await;
    let generation = m.cp().model().generation;

    // An unknown field inside a policy: the whole change is rejected.
    std::fs::write(
        m.policies.join("api.yaml"),
        POLICY_API.replace("action: ALLOW", "action: ALLOW\n  bogusField: 1"),
    )
    .unwrap();
    // Plus a valid-looking mesh edit in the same change: it must not apply either.
    let edited = MESH.replace("services:\n", &format!("{API2}services:\n"));
    write_atomic(&m.mesh_path, &edited);

    let deadline = Instant::now() + T;
    while !m.metrics().contains("palisade_config_rejections_total 1") {
        assert!(Instant::now() < deadline, "{}", m.metrics());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    quiet(
        &mut s,
        Duration::from_millis(1200),
        "after a rejected change",
    )
    .await;
    assert_eq!(
        m.cp().model().generation,
        generation,
        "last good model kept"
    );
    assert_eq!(m.cp().model().mesh.workloads.len(), 2);

    // A new Watch still gets the last good config.
    let mut s2 = m.watch(&api, "api").await.expect("watch");
    let again = next(&mut s2).await;
    assert_eq!(again, first);

    // Fixing the policy applies the whole pending change.
    write_atomic(&m.policies.join("api.yaml"), POLICY_API);
    let cfg = next(&mut s).await;
    assert!(cfg.version > first.version);
    assert_eq!(m.cp().model().mesh.workloads.len(), 3);
    m.stop().await;
}

#[tokio::test]
async fn a_change_that_does_not_concern_a_proxy_is_not_pushed_to_it() {
    let m = Mesh::start().await;
    let web = m.bootstrap("web", "web").await;
    let api = m.bootstrap("api", "api").await;
    let mut ws = m.watch(&web, "web").await.expect("watch web");
    let mut as_ = m.watch(&api, "api").await.expect("watch api");
    let web0 = next(&mut ws).await;
    let api0 = next(&mut as_).await;

    // A policy selecting web only: web's config changes, api's does not.
    write_atomic(&m.policies.join("web.yaml"), POLICY_WEB);
    let web1 = next(&mut ws).await;
    assert!(web1.version > web0.version);
    assert_eq!(
        web1.inbound.as_ref().unwrap().authorization_policies.len(),
        1
    );
    quiet(
        &mut as_,
        Duration::from_millis(1000),
        "api after a web-only change",
    )
    .await;

    // A mesh change no config carries (an admin port): pushed to nobody.
    write_atomic(
        &m.mesh_path,
        &MESH.replace("adminPort: 24192", "adminPort: 24199"),
    );
    let deadline = Instant::now() + T;
    while m.cp().model().generation == web1.version {
        assert!(Instant::now() < deadline, "the edit was not picked up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    quiet(
        &mut ws,
        Duration::from_millis(500),
        "web after an admin-port change",
    )
    .await;
    quiet(
        &mut as_,
        Duration::from_millis(100),
        "api after an admin-port change",
    )
    .await;
    assert_eq!(api0.version, 1);

    // A service web does not call: web, which declares its upstreams, gets only those and
    // hears nothing; api, which declares none (as a transparent proxy), gets every service.
    assert_eq!(
        web0.services
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>(),
        ["api"]
    );
    let with_other = MESH.replace("adminPort: 24192", "adminPort: 24199").replace(
        "services:\n",
        "services:\n  - { name: other, namespace: demo, port: 9090, selector: { app: other } }\n",
    );
    write_atomic(&m.mesh_path, &with_other);
    let api1 = next(&mut as_).await;
    let mut names: Vec<&str> = api1.services.iter().map(|s| s.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["api", "other"]);
    quiet(
        &mut ws,
        Duration::from_millis(300),
        "web after a service it does not call was added",
    )
    .await;
    m.stop().await;
}

#[tokio::test]
async fn shutdown_ends_watch_streams() {
    let m = Mesh::start().await;
    let web = m.bootstrap("web", "web").await;
    let mut s = m.watch(&web, "web").await.expect("watch");
    next(&mut s).await;
    let t0 = Instant::now();
    m.stop().await;
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "graceful shutdown was not prompt"
    );
    let end = within("stream end", s.message()).await;
    assert!(matches!(end, Ok(None) | Err(_)), "{end:?}");
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = within("metrics connect", tokio::net::TcpStream::connect(addr))
        .await
        .unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: cp\r\nConnection: close\r\n\r\n");
    within("metrics write", tcp.write_all(req.as_bytes()))
        .await
        .unwrap();
    let mut out = String::new();
    within("metrics read", tcp.read_to_string(&mut out))
        .await
        .unwrap();
    out
}

#[tokio::test]
async fn metrics_endpoint_and_handshake_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mesh_path = dir.path().join("mesh.yaml");
    std::fs::create_dir_all(dir.path().join("policies")).unwrap();
    // A service listed before one whose key sorts first: /status pairs each with its own
    // endpoints whatever the order.
    let mesh = MESH.replace(
        "services:\n",
        "services:\n  - { name: zz, namespace: demo, port: 9090, selector: { app: web } }\n",
    );
    std::fs::write(&mesh_path, mesh).unwrap();
    let cp = within(
        "start",
        palisade_control_plane::start(ControlPlaneConfig {
            mesh_path,
            state_dir: dir.path().join("state"),
            listen: Some("127.0.0.1:0".parse().unwrap()),
            tokens: HashMap::new(),
            tokens_file: None,
            metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        }),
    )
    .await
    .unwrap();
    let maddr = cp.metrics_addr().expect("metrics bound");
    let ready = http_get(maddr, "/ready").await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    let status = http_get(maddr, "/status").await;
    let body = status.split("\r\n\r\n").nth(1).expect("a body");
    let doc: serde_json::Value = serde_json::from_str(body).expect("status JSON");
    let services: Vec<(String, serde_json::Value)> = doc["services"]
        .as_array()
        .expect("services")
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap_or("").to_string(),
                s["endpointWorkloads"].clone(),
            )
        })
        .collect();
    assert_eq!(
        services,
        [
            ("zz".to_string(), serde_json::json!(["web"])),
            ("api".to_string(), serde_json::json!(["api"]))
        ]
    );

    // A client whose SVID comes from another trust domain: refused in the handshake.
    let td = cp.trust_domain().clone();
    let other_td = TrustDomain::new("other.example").unwrap();
    let other_ca = palisade_certs::Ca::generate(&other_td, None).unwrap();
    let other_id = SpiffeId::for_workload(&other_td, "demo", "web").unwrap();
    let mut bundle = TrustBundle::load_pem(&td, &cp.trust_bundle_path().unwrap()).unwrap();
    bundle
        .add_root(&other_td, other_ca.root_der().clone())
        .unwrap();
    let store = CredentialStore::new(other_id.clone(), bundle);
    store
        .install(other_ca.issue(&other_id, Duration::from_secs(600)).unwrap())
        .unwrap();
    let tls = palisade_certs::tls::client_config(&store, control_plane_id(&td).unwrap(), &[b"h2"])
        .unwrap();
    // TLS 1.3: the client finishes before the server has judged its certificate, so the
    // refusal shows on the first call, or on connect.
    if let Ok(ch) = within(
        "connect",
        palisade_api::client::connect(cp.addr(), Arc::new(tls)),
    )
    .await
    {
        let r = within(
            "certify",
            IdentityClient::new(ch).certify(CertifyRequest {
                csr_der: vec![],
                token: String::new(),
            }),
        )
        .await;
        assert!(r.is_err(), "{r:?}");
    }
    let deadline = Instant::now() + T;
    loop {
        let metrics = http_get(maddr, "/metrics").await;
        if metrics
            .contains("palisade_tls_handshake_errors_total{reason=\"foreign_trust_domain\"} 1")
        {
            assert!(
                metrics.contains("palisade_config_rejections_total 0"),
                "{metrics}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = http_get(maddr, "/status").await;
    assert!(status.contains("\"generation\":1"), "{status}");
    within("shutdown", cp.shutdown()).await;
}

#[tokio::test]
async fn short_lifetimes_renew_the_control_planes_own_certificate() {
    let m =
        Mesh::start_with(&MESH.replace("certificateLifetime: 1h", "certificateLifetime: 2s")).await;
    let first_expiry = m.cp().metrics().cert_expiry.get();
    let store = m.empty_store("web");
    let kc = KeyAndCsr::generate(store.id()).unwrap();
    let rsp = m
        .certify(&store, kc.csr_der(), "token-web-0123456789")
        .await
        .expect("issued");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        rsp.valid_until_unix <= now + 3,
        "2s lifetime from the mesh file"
    );

    let deadline = Instant::now() + T;
    while m.cp().metrics().cert_expiry.get() == first_expiry {
        assert!(
            Instant::now() < deadline,
            "the control plane never renewed its SVID"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Past the first certificate's expiry, new connections get the renewed one.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let store = m.empty_store("api");
    let kc = KeyAndCsr::generate(store.id()).unwrap();
    m.certify(&store, kc.csr_der(), "token-api-0123456789")
        .await
        .expect("issued after the renewal");
    m.stop().await;
}

/// The control plane started on its own (`palisade control-plane --state-dir`) makes the same
/// checks as `up`: a fresh state dir and `ca/` end up 0700, and a state dir anyone can write
/// to, or a CA key that is not 0600, is refused rather than trusted.
#[tokio::test]
async fn the_state_dir_is_private_and_a_planted_ca_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let chmod = |p: &Path, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    };
    let dir = tempfile::tempdir().unwrap();
    let mesh_path = dir.path().join("mesh.yaml");
    std::fs::create_dir_all(dir.path().join("policies")).unwrap();
    std::fs::write(&mesh_path, MESH).unwrap();
    let start = |state: PathBuf| {
        palisade_control_plane::start(ControlPlaneConfig {
            mesh_path: mesh_path.clone(),
            state_dir: state,
            listen: Some("127.0.0.1:0".parse().unwrap()),
            tokens: HashMap::new(),
            tokens_file: None,
            metrics_listen: None,
        })
    };

    let fresh = dir.path().join("fresh");
    let cp = within("start", start(fresh.clone())).await.expect("starts");
    assert_eq!(mode(&fresh), 0o700);
    assert_eq!(mode(&fresh.join("ca")), 0o700);
    within("shutdown", cp.shutdown()).await;

    chmod(&fresh, 0o777);
    let err = within("start", start(fresh.clone())).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(fresh.to_str().unwrap()) && msg.contains("writable by group or others"),
        "{msg}"
    );
    chmod(&fresh, 0o700);

    chmod(&fresh.join("ca/issuer-key.pem"), 0o644);
    let msg = within("start", start(fresh.clone()))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("issuer-key.pem") && msg.contains("0600"),
        "{msg}"
    );
}
