//! Authorization holes closed at the inbound port, attacked the way a peer with a valid mesh
//! certificate can: HTTP/2 straight to the inbound listener, bypassing its own sidecar.

mod support;

use http::{Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use palisade_api::policy::{Resource, parse_str};
use palisade_api::{PathNormalization, v1};
use palisade_proxy::{Proxy, Snapshot};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Applies `policies` (YAML) to the server proxy, as the control plane would push them.
fn apply_policies(server: &Proxy, yaml: &str, level: PathNormalization, version: u64) {
    // An empty file is an error for the parser; here it means "no policy".
    let parsed = if yaml.is_empty() {
        Vec::new()
    } else {
        parse_str(std::path::Path::new("test.yaml"), yaml).expect("valid policies")
    };
    let policies = parsed
        .iter()
        .map(|r| match r {
            Resource::AuthorizationPolicy(p) => v1::Authorization::try_from(p).expect("converts"),
            _ => panic!("authorization policies only"),
        })
        .collect();
    let cfg = v1::ProxyConfig {
        version,
        inbound: Some(v1::Inbound {
            mode: v1::MtlsMode::Strict as i32,
            authorization_policies: policies,
            path_normalization: level.to_proto() as i32,
            ..Default::default()
        }),
        ..Default::default()
    };
    server.apply(Snapshot::from_proto(&cfg).expect("snapshot"));
}

/// An HTTP/2 client speaking mTLS with `web`'s certificate straight to `api`'s inbound port.
async fn direct_h2(m: &Mesh) -> H2 {
    let svid = m.pki.issue(WEB);
    let tls = within(tls_connect(
        m.server.inbound_addr,
        tls_client_config(&m.pki, Some(&svid), b"h2"),
    ))
    .await
    .expect("mTLS to the inbound port");
    let (send, conn) = within(hyper::client::conn::http2::handshake(
        TokioExecutor::new(),
        TokioIo::new(tls),
    ))
    .await
    .expect("HTTP/2 handshake");
    tokio::spawn(conn);
    send
}

fn get(uri: &str) -> Request<Body> {
    Request::get(format!("http://api.demo{uri}"))
        .body(empty())
        .expect("request")
}

const DENY_ADMIN: &str = "apiVersion: palisade.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: no-admin, namespace: demo }
spec:
  action: DENY
  rules: [ { to: [ { operation: { paths: [\"/admin*\"] } } ] } ]
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encoded_and_dotted_paths_cannot_bypass_a_deny() {
    let app = echo_app().await;
    let m = mesh(app.addr, MeshOpts::default()).await;
    apply_policies(&m.server, DENY_ADMIN, PathNormalization::Base, 2);
    let mut c = direct_h2(&m).await;
    for path in [
        "/admin",
        "/%61dmin",
        "/x/../admin",
        "/./admin",
        "/%2e%2e/admin",
        "/public/%2E%2E/admin/users",
        "/%61%64%6d%69%6e?x=1",
    ] {
        let r = h2_send(&mut c, get(path)).await.expect("response");
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{path}");
        assert_eq!(&r.body[..], b"RBAC: access denied", "{path}");
    }
    // Allowed requests reach the app with the path that was authorized.
    for (sent, seen) in [
        ("/public/../index.html", "/index.html"),
        ("/%7Euser/./a", "/~user/a"),
        ("/a%2fb", "/a%2Fb"),
    ] {
        let r = h2_send(&mut c, get(sent)).await.expect("response");
        assert_eq!(r.status, StatusCode::OK, "{sent}");
        assert_eq!(r.header("x-echo-path"), Some(seen), "{sent}");
    }
    // What cannot be normalized safely is refused, and counted.
    for path in ["/a%00b", "/a%zz", "/admin%0"] {
        let r = h2_send(&mut c, get(path)).await.expect("response");
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}");
    }
    assert_eq!(
        metric(
            &m.server,
            "palisade_requests_refused_total",
            &[("direction", "inbound"), ("reason", "bad_path")]
        ),
        3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backslash_paths_over_http1_are_normalized_too() {
    let app = echo_app().await;
    let m = mesh(app.addr, MeshOpts::default()).await;
    apply_policies(&m.server, DENY_ADMIN, PathNormalization::Base, 2);
    // Through the caller's own sidecar, HTTP/1.1 with a raw request target.
    for target in ["/x/..\\admin", "/%5c/../admin"] {
        let mut tcp = within(TcpStream::connect(m.upstream))
            .await
            .expect("connect");
        tcp.write_all(
            format!("GET {target} HTTP/1.1\r\nHost: api.demo\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .expect("write");
        let mut out = Vec::new();
        within(tcp.read_to_end(&mut out)).await.expect("read");
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 403"), "{target}: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_slashes_levels_are_a_mesh_setting() {
    let app = echo_app().await;
    let m = mesh(app.addr, MeshOpts::default()).await;
    let mut c = direct_h2(&m).await;
    // BASE keeps `//`, as Istio's BASE does: `//admin` is not `/admin*`.
    apply_policies(&m.server, DENY_ADMIN, PathNormalization::Base, 2);
    let r = h2_send(&mut c, get("//admin")).await.expect("response");
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-echo-path"), Some("//admin"));
    apply_policies(&m.server, DENY_ADMIN, PathNormalization::MergeSlashes, 3);
    let r = h2_send(&mut c, get("//admin")).await.expect("response");
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = h2_send(&mut c, get("/x%2f..%2fadmin"))
        .await
        .expect("response");
    assert_eq!(r.status, StatusCode::OK, "MERGE_SLASHES keeps %2F encoded");
    apply_policies(
        &m.server,
        DENY_ADMIN,
        PathNormalization::DecodeAndMergeSlashes,
        4,
    );
    let r = h2_send(&mut c, get("/x%2f..%2fadmin"))
        .await
        .expect("response");
    assert_eq!(r.status, StatusCode::FORBIDDEN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ports_mean_the_workload_port_not_the_sidecars() {
    let app = echo_app().await;
    let m = mesh(app.addr, MeshOpts::default()).await;
    let app_port = app.addr.port();
    let inbound_port = m.server.inbound_addr.port();
    // An Istio policy imported unchanged: DENY to the app's port.
    let deny = |port: u16| {
        format!(
            "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{ name: no-port, namespace: demo }}
spec:
  action: DENY
  rules: [ {{ to: [ {{ operation: {{ ports: [\"{port}\"] }} }} ] }} ]
"
        )
    };
    apply_policies(&m.server, &deny(app_port), PathNormalization::Base, 2);
    let r = get_through(&m, "/").await;
    assert_eq!(
        r.status,
        StatusCode::FORBIDDEN,
        "a DENY on the app's port fires"
    );
    apply_policies(&m.server, &deny(inbound_port), PathNormalization::Base, 3);
    let r = get_through(&m, "/").await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "the sidecar's port is not the workload's"
    );
}

async fn get_through(m: &Mesh, path: &str) -> Reply {
    support::get(m.upstream, path).await.expect("response")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denies_are_labelled_by_what_decided_them() {
    let app = echo_app().await;
    let m = mesh(app.addr, MeshOpts::default()).await;
    // An ALLOW policy that does not match `web`: the deny is `no_allow_match`.
    let allow_db = "apiVersion: palisade.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: only-db, namespace: demo }
spec:
  rules: [ { from: [ { source: { principals: [\"cluster.local/ns/demo/sa/db\"] } } ] } ]
";
    apply_policies(&m.server, allow_db, PathNormalization::Base, 2);
    assert_eq!(get_through(&m, "/").await.status, StatusCode::FORBIDDEN);
    let labels = |d, p| [("decision", d), ("policy", p)];
    assert_eq!(
        metric(
            &m.server,
            "palisade_authz_decisions_total",
            &labels("deny", "no_allow_match")
        ),
        1.0
    );
    // No policy: the mesh default (allow here) decided.
    apply_policies(&m.server, "", PathNormalization::Base, 3);
    assert_eq!(get_through(&m, "/").await.status, StatusCode::OK);
    assert_eq!(
        metric(
            &m.server,
            "palisade_authz_decisions_total",
            &labels("allow", "default_policy")
        ),
        1.0
    );
    // A DENY policy: named.
    apply_policies(&m.server, DENY_ADMIN, PathNormalization::Base, 4);
    assert_eq!(
        get_through(&m, "/admin").await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        metric(
            &m.server,
            "palisade_authz_decisions_total",
            &labels("deny", "demo/no-admin")
        ),
        1.0
    );
    let text = m.server.metrics().encode();
    assert!(
        !text.contains("policy=\"default\""),
        "no decision is labelled `default`: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_host_headers_are_a_400_on_both_sides() {
    let app = echo_app().await;
    let m = mesh(app.addr, MeshOpts::default()).await;
    let raw = "GET / HTTP/1.1\r\nHost: api.demo\r\nHost: admin.demo\r\nConnection: close\r\n\r\n";
    let mut tcp = within(TcpStream::connect(m.upstream))
        .await
        .expect("connect");
    tcp.write_all(raw.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    within(tcp.read_to_end(&mut out)).await.expect("read");
    assert!(
        String::from_utf8_lossy(&out).starts_with("HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    // A peer with a mesh certificate sending two `host` headers over HTTP/2.
    let mut c = direct_h2(&m).await;
    let req = Request::get("http://api.demo/")
        .header("host", "api.demo")
        .header("host", "admin.demo")
        .body(empty())
        .expect("request");
    let r = h2_send(&mut c, req).await.expect("response");
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        metric(
            &m.server,
            "palisade_requests_refused_total",
            &[("direction", "inbound"), ("reason", "duplicate_host")]
        ),
        1.0
    );
}
