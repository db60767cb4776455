//! An in-process fake of the Kubernetes API server that speaks its real list/watch JSON wire
//! format over plain HTTP/1.1, for kube's own `Client` to talk to:
//!
//! - `GET <collection>`: a `<Kind>List` with `metadata.resourceVersion` and `items`;
//! - `GET <collection>?watch=true&resourceVersion=N[&allowWatchBookmarks=true]`: a chunked
//!   stream of `{"type":"ADDED|MODIFIED|DELETED|BOOKMARK|ERROR","object":...}` lines, first
//!   the changes after N, then live ones; from a compacted N, one `ERROR` event with a
//!   `410 Expired` Status and the end of the stream, as the real server does;
//! - `GET /apis/<group>/<version>`: discovery (404 for a group it does not serve: Istio's
//!   and the Gateway API's CRDs are absent until a test installs them);
//! - `GET /api/v1/namespaces/<ns>/secrets/<name>`;
//! - `POST /apis/authentication.k8s.io/v1/tokenreviews`, answered like the API server's
//!   ServiceAccount token authenticator (audiences intersected, unauthenticated when empty),
//!   or like an authenticator that ignores audiences;
//! - `POST`/`PATCH` of `events.k8s.io/v1` Events (recorded).
//!
//! Every request is logged, so tests can tell a relist from a resumed watch.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// A collection the fake serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Res {
    Pods,
    Services,
    EndpointSlices,
    AuthorizationPolicies,
    PeerAuthentications,
    HttpFaults,
    RateLimitPolicies,
    EgressPolicies,
    IstioAuthorizationPolicies,
    IstioPeerAuthentications,
    HttpRoutes,
    GrpcRoutes,
    Namespaces,
    ConfigMaps,
}

pub const ALL: [Res; 14] = [
    Res::Pods,
    Res::Services,
    Res::EndpointSlices,
    Res::AuthorizationPolicies,
    Res::PeerAuthentications,
    Res::HttpFaults,
    Res::RateLimitPolicies,
    Res::EgressPolicies,
    Res::IstioAuthorizationPolicies,
    Res::IstioPeerAuthentications,
    Res::HttpRoutes,
    Res::GrpcRoutes,
    Res::Namespaces,
    Res::ConfigMaps,
];

impl Res {
    /// (collection path, apiVersion, kind)
    fn info(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Res::Pods => ("/api/v1/pods", "v1", "Pod"),
            Res::Services => ("/api/v1/services", "v1", "Service"),
            Res::EndpointSlices => (
                "/apis/discovery.k8s.io/v1/endpointslices",
                "discovery.k8s.io/v1",
                "EndpointSlice",
            ),
            Res::AuthorizationPolicies => (
                "/apis/palisade.dev/v1alpha1/authorizationpolicies",
                "palisade.dev/v1alpha1",
                "AuthorizationPolicy",
            ),
            Res::PeerAuthentications => (
                "/apis/palisade.dev/v1alpha1/peerauthentications",
                "palisade.dev/v1alpha1",
                "PeerAuthentication",
            ),
            Res::HttpFaults => (
                "/apis/palisade.dev/v1alpha1/httpfaults",
                "palisade.dev/v1alpha1",
                "HTTPFault",
            ),
            Res::RateLimitPolicies => (
                "/apis/palisade.dev/v1alpha1/ratelimitpolicies",
                "palisade.dev/v1alpha1",
                "RateLimitPolicy",
            ),
            Res::EgressPolicies => (
                "/apis/palisade.dev/v1alpha1/egresspolicies",
                "palisade.dev/v1alpha1",
                "EgressPolicy",
            ),
            Res::IstioAuthorizationPolicies => (
                "/apis/security.istio.io/v1/authorizationpolicies",
                "security.istio.io/v1",
                "AuthorizationPolicy",
            ),
            Res::IstioPeerAuthentications => (
                "/apis/security.istio.io/v1/peerauthentications",
                "security.istio.io/v1",
                "PeerAuthentication",
            ),
            Res::HttpRoutes => (
                "/apis/gateway.networking.k8s.io/v1/httproutes",
                "gateway.networking.k8s.io/v1",
                "HTTPRoute",
            ),
            Res::GrpcRoutes => (
                "/apis/gateway.networking.k8s.io/v1/grpcroutes",
                "gateway.networking.k8s.io/v1",
                "GRPCRoute",
            ),
            Res::Namespaces => ("/api/v1/namespaces", "v1", "Namespace"),
            Res::ConfigMaps => ("/api/v1/configmaps", "v1", "ConfigMap"),
        }
    }

    pub fn path(self) -> &'static str {
        self.info().0
    }

    pub fn api_version(self) -> &'static str {
        self.info().1
    }

    pub fn kind(self) -> &'static str {
        self.info().2
    }

    fn plural(self) -> &'static str {
        self.path().rsplit('/').next().unwrap_or_default()
    }

    fn cluster_scoped(self) -> bool {
        self == Res::Namespaces
    }

    fn is_istio(self) -> bool {
        matches!(
            self,
            Res::IstioAuthorizationPolicies | Res::IstioPeerAuthentications
        )
    }
}

/// How the fake's TokenReview answers for one token.
#[derive(Clone, Debug)]
pub struct TokenEntry {
    pub username: String,
    /// The audiences the token was minted for.
    pub audiences: Vec<String>,
    pub pod: Option<String>,
    /// Like an authenticator that ignores audiences: authenticated, no `status.audiences`.
    pub audience_unaware: bool,
}

struct Watcher {
    res: Res,
    tx: mpsc::UnboundedSender<Bytes>,
}

#[derive(Default)]
struct State {
    rv: u64,
    uid: u64,
    objects: HashMap<Res, BTreeMap<(String, String), Value>>,
    /// Every change event (for watches resuming from a version), oldest first.
    history: Vec<(u64, Res, &'static str, Value)>,
    /// A watch from a version below this one is `410 Gone`.
    compacted: u64,
    watchers: Vec<Watcher>,
    /// Collections answered with 404 (a CRD not installed).
    absent: HashSet<Res>,
    secrets: HashMap<(String, String), Value>,
    tokens: HashMap<String, TokenEntry>,
    reviews: Vec<Value>,
    events: Vec<Value>,
    requests: Vec<String>,
    /// Server-side applies of ConfigMaps, `ns/name`, oldest first.
    applies: Vec<String>,
    /// Status subresource patches, oldest first.
    status_patches: Vec<Value>,
    /// When set, writes of ConfigMaps are refused with this status code.
    refuse_writes: Option<u16>,
}

/// The running fake. Dropping it stops the server.
pub struct FakeKube {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: JoinHandle<()>,
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "details": {}, "code": code
    })
}

fn line(v: &Value) -> Bytes {
    let mut s = v.to_string();
    s.push('\n');
    Bytes::from(s)
}

type Body = BoxBody<Bytes, Infallible>;

fn json_response(code: StatusCode, v: &Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())).boxed());
    *r.status_mut() = code;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn query(q: Option<&str>) -> HashMap<String, String> {
    q.unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64, as Secret data is encoded on the wire.
pub fn base64(data: &[u8]) -> String {
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

impl State {
    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    /// Records a change and sends it to the live watches of `res`.
    fn emit(&mut self, res: Res, kind: &'static str, obj: Value) {
        let ev = json!({ "type": kind, "object": obj });
        self.history.push((self.rv, res, kind, obj));
        let bytes = line(&ev);
        self.watchers
            .retain(|w| w.res != res || w.tx.send(bytes.clone()).is_ok());
    }

    fn put(&mut self, res: Res, mut obj: Value, notify: bool) {
        let rv = self.next_rv();
        obj["apiVersion"] = json!(res.api_version());
        obj["kind"] = json!(res.kind());
        let ns = if res.cluster_scoped() {
            String::new()
        } else {
            obj["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string()
        };
        let name = obj["metadata"]["name"]
            .as_str()
            .expect("objects have a name")
            .to_string();
        if !res.cluster_scoped() {
            obj["metadata"]["namespace"] = json!(ns);
        }
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let objects = self.objects.entry(res).or_default();
        let existed = objects.get(&(ns.clone(), name.clone())).cloned();
        let uid = match existed.as_ref().and_then(|o| o["metadata"]["uid"].as_str()) {
            Some(u) => u.to_string(),
            None => {
                self.uid += 1;
                format!("00000000-0000-0000-0000-{:012}", self.uid)
            }
        };
        obj["metadata"]["uid"] = json!(uid);
        // As with a status subresource: writing the object keeps the status.
        if obj.get("status").is_none()
            && let Some(st) = existed.as_ref().and_then(|o| o.get("status"))
        {
            obj["status"] = st.clone();
        }
        // Every write through put() changes the spec (status writes keep the generation).
        let generation = existed
            .as_ref()
            .and_then(|o| o["metadata"]["generation"].as_i64())
            .unwrap_or(0);
        obj["metadata"]["generation"] = json!(generation + 1);
        obj["metadata"]["creationTimestamp"] = json!("2026-12-01T00:00:00Z");
        obj["metadata"]["managedFields"] = json!([{ "manager": "kubectl", "operation": "Apply" }]);
        self.objects
            .entry(res)
            .or_default()
            .insert((ns, name), obj.clone());
        if notify {
            let kind = if existed.is_some() {
                "MODIFIED"
            } else {
                "ADDED"
            };
            self.emit(res, kind, obj);
        }
    }

    fn remove(&mut self, res: Res, ns: &str, name: &str, notify: bool) {
        let Some(mut obj) = self
            .objects
            .entry(res)
            .or_default()
            .remove(&(ns.to_string(), name.to_string()))
        else {
            panic!("no {res:?} {ns}/{name} to delete");
        };
        let rv = self.next_rv();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        if notify {
            self.emit(res, "DELETED", obj);
        }
    }
}

impl FakeKube {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(State {
            rv: 100,
            ..Default::default()
        }));
        // Istio's and the Gateway API's CRDs are not installed unless a test says so.
        {
            let mut s = state.lock().unwrap();
            s.absent.insert(Res::IstioAuthorizationPolicies);
            s.absent.insert(Res::IstioPeerAuthentications);
            s.absent.insert(Res::HttpRoutes);
            s.absent.insert(Res::GrpcRoutes);
        }
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let st = st.clone();
                        async move { Ok::<_, Infallible>(handle(st, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Self { addr, state, task }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A kube client for this server (plain HTTP, no credentials).
    pub fn client(&self) -> kube::Client {
        palisade_certs::tls::install_default_provider();
        let config = kube::Config::new(format!("http://{}", self.addr).parse().expect("uri"));
        kube::Client::try_from(config).expect("client")
    }

    /// A kubeconfig file pointing at this server.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\ncurrent-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
            self.addr
        )
    }

    /// Creates or replaces an object (ADDED or MODIFIED to watchers).
    pub fn apply(&self, res: Res, obj: Value) {
        self.state().put(res, obj, true);
    }

    pub fn delete(&self, res: Res, ns: &str, name: &str) {
        self.state().remove(res, ns, name, true);
    }

    /// A change no watch hears of: only a list shows it (what a watch misses while it is
    /// disconnected past the server's history).
    pub fn apply_unseen(&self, res: Res, obj: Value) {
        self.state().put(res, obj, false);
    }

    pub fn delete_unseen(&self, res: Res, ns: &str, name: &str) {
        self.state().remove(res, ns, name, false);
    }

    /// Compacts the history: every open watch gets a `410 Expired` ERROR event and ends, and
    /// a watch from any version up to now is refused the same way, so clients must relist.
    pub fn expire_watches(&self) {
        let mut s = self.state();
        s.compacted = s.rv + 1;
        s.history.clear();
        let gone = line(&json!({
            "type": "ERROR",
            "object": status(410, "Expired", "too old resource version"),
        }));
        for w in s.watchers.drain(..) {
            let _ = w.tx.send(gone.clone());
        }
    }

    /// Ends every open watch stream cleanly (as the server's timeout does): clients resume
    /// from the last version they saw.
    pub fn end_watches(&self) {
        self.state().watchers.clear();
    }

    /// Sends a BOOKMARK at the current version to every watch that asked for bookmarks (all
    /// of kube's do) and returns that version.
    pub fn bookmark(&self) -> u64 {
        let mut s = self.state();
        let rv = s.next_rv();
        let watchers = std::mem::take(&mut s.watchers);
        for w in watchers {
            let ev = json!({
                "type": "BOOKMARK",
                "object": {
                    "apiVersion": w.res.api_version(), "kind": w.res.kind(),
                    "metadata": { "resourceVersion": rv.to_string() }
                }
            });
            if w.tx.send(line(&ev)).is_ok() {
                s.watchers.push(w);
            }
        }
        rv
    }

    /// Serves (or stops serving, 404) a collection, as installing or removing a CRD does.
    pub fn set_served(&self, res: Res, served: bool) {
        let mut s = self.state();
        if served {
            s.absent.remove(&res);
        } else {
            s.absent.insert(res);
        }
    }

    pub fn add_secret(&self, ns: &str, name: &str, data: &[(&str, &[u8])]) {
        let data: serde_json::Map<String, Value> = data
            .iter()
            .map(|(k, v)| (k.to_string(), json!(base64(v))))
            .collect();
        let secret = json!({
            "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": { "name": name, "namespace": ns, "resourceVersion": "1", "uid": "secret-uid" },
            "data": data,
        });
        self.state()
            .secrets
            .insert((ns.to_string(), name.to_string()), secret);
    }

    pub fn add_token(&self, token: &str, entry: TokenEntry) {
        self.state().tokens.insert(token.to_string(), entry);
    }

    /// The TokenReview requests received, as sent.
    pub fn reviews(&self) -> Vec<Value> {
        self.state().reviews.clone()
    }

    /// The Events created or patched, as sent.
    /// The ConfigMap server-side applies so far, `ns/name`, oldest first.
    pub fn applies(&self) -> Vec<String> {
        self.state().applies.clone()
    }

    /// The status patches so far, oldest first.
    pub fn status_patches(&self) -> Vec<Value> {
        self.state().status_patches.clone()
    }

    /// Refuse ConfigMap writes with `code` (e.g. 403), or accept them again with `None`.
    pub fn refuse_writes(&self, code: Option<u16>) {
        self.state().refuse_writes = code;
    }

    /// The stored object, if any (`ns` is "" for a cluster-scoped one).
    pub fn get(&self, res: Res, ns: &str, name: &str) -> Option<Value> {
        self.state()
            .objects
            .get(&res)
            .and_then(|m| m.get(&(ns.to_string(), name.to_string())))
            .cloned()
    }

    pub fn events(&self) -> Vec<Value> {
        self.state().events.clone()
    }

    /// Every request so far, as `METHOD path?query`.
    pub fn requests(&self) -> Vec<String> {
        self.state().requests.clone()
    }

    /// How many lists (not watches) of `res` were served.
    pub fn lists(&self, res: Res) -> usize {
        let prefix = format!("GET {}", res.path());
        self.requests()
            .iter()
            .filter(|r| {
                r.starts_with(&prefix)
                    && r[prefix.len()..].chars().next().is_none_or(|c| c == '?')
                    && !r.contains("watch=")
            })
            .count()
    }

    /// The resourceVersions watches of `res` were started from, in order.
    pub fn watch_versions(&self, res: Res) -> Vec<String> {
        let prefix = format!("GET {}?", res.path());
        self.requests()
            .iter()
            .filter(|r| r.starts_with(&prefix) && r.contains("watch=true"))
            .filter_map(|r| {
                let q = query(r.split_once('?').map(|(_, q)| q));
                q.get("resourceVersion").cloned()
            })
            .collect()
    }
}

async fn handle(st: Arc<Mutex<State>>, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let applied = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes() == b"application/apply-patch+yaml");
    let path = req.uri().path().to_string();
    let q = req.uri().query().map(str::to_string);
    fn lock(st: &Arc<Mutex<State>>) -> MutexGuard<'_, State> {
        st.lock().unwrap_or_else(|e| e.into_inner())
    }
    lock(&st).requests.push(match &q {
        Some(q) => format!("{method} {path}?{q}"),
        None => format!("{method} {path}"),
    });
    let body: Value = match req.into_body().collect().await {
        Ok(b) => serde_json::from_slice(&b.to_bytes()).unwrap_or(Value::Null),
        Err(_) => Value::Null,
    };
    let params = query(q.as_deref());
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();

    if method == Method::GET
        && let Some(res) = ALL.iter().copied().find(|r| r.path() == path)
    {
        let mut s = lock(&st);
        if s.absent.contains(&res) {
            return json_response(
                StatusCode::NOT_FOUND,
                &status(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                ),
            );
        }
        if params.get("watch").is_some_and(|w| w == "true" || w == "1") {
            let from: u64 = params
                .get("resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(s.rv);
            let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
            if from < s.compacted {
                let _ = tx.send(line(&json!({
                    "type": "ERROR",
                    "object": status(410, "Expired", &format!("too old resource version: {from} ({})", s.compacted)),
                })));
                drop(tx);
            } else {
                for (rv, r, kind, obj) in &s.history {
                    if *r == res && *rv > from {
                        let _ = tx.send(line(&json!({ "type": kind, "object": obj })));
                    }
                }
                s.watchers.push(Watcher { res, tx });
            }
            let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv()
                    .await
                    .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
            });
            let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            return r;
        }
        let items: Vec<Value> = s
            .objects
            .get(&res)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        let list = json!({
            "apiVersion": res.api_version(),
            "kind": format!("{}List", res.kind()),
            "metadata": { "resourceVersion": s.rv.to_string() },
            "items": items,
        });
        return json_response(StatusCode::OK, &list);
    }

    match (method.clone(), segments.as_slice()) {
        // Discovery of an API group version.
        (Method::GET, ["apis", group, version]) => {
            let s = lock(&st);
            let resources: Vec<Value> = ALL
                .iter()
                .filter(|r| {
                    r.api_version() == format!("{group}/{version}") && !s.absent.contains(r)
                })
                .map(|r| {
                    json!({
                        "name": r.plural(), "singularName": r.kind().to_lowercase(),
                        "namespaced": true, "kind": r.kind(),
                        "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]
                    })
                })
                .collect();
            if resources.is_empty() {
                return json_response(
                    StatusCode::NOT_FOUND,
                    &status(
                        404,
                        "NotFound",
                        "the server could not find the requested resource",
                    ),
                );
            }
            json_response(
                StatusCode::OK,
                &json!({
                    "kind": "APIResourceList", "apiVersion": "v1",
                    "groupVersion": format!("{group}/{version}"), "resources": resources
                }),
            )
        }
        (Method::GET, ["api", "v1", "namespaces", ns, "secrets", name]) => {
            let s = lock(&st);
            match s.secrets.get(&(ns.to_string(), name.to_string())) {
                Some(secret) => json_response(StatusCode::OK, secret),
                None => json_response(
                    StatusCode::NOT_FOUND,
                    &status(404, "NotFound", &format!("secrets \"{name}\" not found")),
                ),
            }
        }
        (Method::POST, ["apis", "authentication.k8s.io", "v1", "tokenreviews"]) => {
            let mut s = lock(&st);
            s.reviews.push(body.clone());
            let token = body["spec"]["token"].as_str().unwrap_or_default();
            let wanted: Vec<String> = body["spec"]["audiences"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_else(|| vec!["https://kubernetes.default.svc".to_string()]);
            let status = match s.tokens.get(token) {
                None => json!({ "authenticated": false, "error": "invalid bearer token" }),
                Some(t) => {
                    let mut user = json!({ "username": t.username, "uid": "user-uid",
                        "groups": ["system:serviceaccounts", "system:authenticated"] });
                    if let Some(pod) = &t.pod {
                        user["extra"] = json!({ "authentication.kubernetes.io/pod-name": [pod] });
                    }
                    if t.audience_unaware {
                        json!({ "authenticated": true, "user": user })
                    } else {
                        let both: Vec<&String> =
                            wanted.iter().filter(|a| t.audiences.contains(a)).collect();
                        if both.is_empty() {
                            json!({
                                "authenticated": false,
                                "error": format!("[invalid bearer token, token audiences {:?} is invalid for the target audiences {:?}]", t.audiences, wanted),
                            })
                        } else {
                            json!({ "authenticated": true, "user": user, "audiences": both })
                        }
                    }
                }
            };
            let mut review = body.clone();
            review["apiVersion"] = json!("authentication.k8s.io/v1");
            review["kind"] = json!("TokenReview");
            review["metadata"] = json!({ "creationTimestamp": null });
            review["status"] = status;
            json_response(StatusCode::CREATED, &review)
        }
        // Server-side apply of a ConfigMap (kube sends the object as JSON with the content type
        // application/apply-patch+yaml): created or replaced, and the change watched.
        (Method::PATCH, ["api", "v1", "namespaces", ns, "configmaps", name]) => {
            let mut s = lock(&st);
            if let Some(code) = s.refuse_writes {
                return json_response(
                    StatusCode::from_u16(code).unwrap_or(StatusCode::FORBIDDEN),
                    &status(code, "Forbidden", "configmaps is forbidden"),
                );
            }
            if !params.contains_key("fieldManager") || !applied {
                return json_response(
                    StatusCode::BAD_REQUEST,
                    &status(
                        400,
                        "BadRequest",
                        "expected a server-side apply with a fieldManager",
                    ),
                );
            }
            let mut obj = body.clone();
            obj["metadata"]["namespace"] = json!(ns);
            obj["metadata"]["name"] = json!(name);
            s.put(Res::ConfigMaps, obj, true);
            s.applies.push(format!("{ns}/{name}"));
            let stored = s.objects[&Res::ConfigMaps][&(ns.to_string(), name.to_string())].clone();
            json_response(StatusCode::OK, &stored)
        }
        // A merge patch of the status subresource: the status replaced, the generation kept.
        (
            Method::PATCH,
            [
                "apis",
                group,
                version,
                "namespaces",
                ns,
                plural,
                name,
                "status",
            ],
        ) => {
            let mut s = lock(&st);
            let api_version = format!("{group}/{version}");
            let Some(res) = ALL
                .iter()
                .copied()
                .find(|r| r.api_version() == api_version && r.plural() == *plural)
            else {
                return json_response(
                    StatusCode::NOT_FOUND,
                    &status(404, "NotFound", "no such resource"),
                );
            };
            let key = (ns.to_string(), name.to_string());
            let Some(mut obj) = s.objects.get(&res).and_then(|m| m.get(&key)).cloned() else {
                return json_response(
                    StatusCode::NOT_FOUND,
                    &status(404, "NotFound", &format!("{plural} \"{name}\" not found")),
                );
            };
            obj["status"] = body["status"].clone();
            let rv = s.next_rv();
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            s.objects.entry(res).or_default().insert(key, obj.clone());
            s.status_patches.push(body.clone());
            s.emit(res, "MODIFIED", obj.clone());
            json_response(StatusCode::OK, &obj)
        }
        (Method::POST, ["apis", "events.k8s.io", "v1", "namespaces", _ns, "events"]) => {
            lock(&st).events.push(body.clone());
            json_response(StatusCode::CREATED, &body)
        }
        (
            Method::PATCH,
            [
                "apis",
                "events.k8s.io",
                "v1",
                "namespaces",
                _ns,
                "events",
                _name,
            ],
        ) => {
            lock(&st).events.push(body.clone());
            json_response(StatusCode::OK, &body)
        }
        _ => json_response(
            StatusCode::NOT_FOUND,
            &status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ),
        ),
    }
}
