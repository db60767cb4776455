//! Authorization end to end through `palisade up`: HTTP, gRPC and TCP denials, live policy
//! edits, and revocation of an open TCP connection.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use support::*;

const DB_FROM_API: &str = r#"
apiVersion: palisade.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: db-from-api, namespace: demo }
spec:
  selector: { matchLabels: { app: db } }
  action: ALLOW
  rules:
    - from: [ { source: { principals: ["cluster.local/ns/demo/sa/api"] } } ]
"#;

fn spec() -> MeshSpec {
    MeshSpec {
        lifetime: "1h",
        default_policy: "allow",
        workloads: vec![
            WorkloadSpec::demo(
                "web",
                "app: web",
                vec![
                    ("api.demo", 8080),
                    ("db.demo", 5432),
                    ("grpc.demo", 9090),
                    ("echo.demo", 7000),
                ],
            ),
            WorkloadSpec::demo("api", "app: api", vec![("db.demo", 5432)]),
            WorkloadSpec::demo("db", "app: db", vec![]),
            WorkloadSpec::external("grpc", "app: grpc"),
            WorkloadSpec::external("echo", "app: echo"),
        ],
        services: vec![
            ("api", 8080, "app: api", "http"),
            ("db", 5432, "app: db", "http"),
            ("grpc", 9090, "app: grpc", "grpc"),
            ("echo", 7000, "app: echo", "opaque"),
        ],
    }
}

/// A gRPC app: the Identity service answering every call.
struct GrpcApp;

#[tonic::async_trait]
impl palisade_api::v1::identity_server::Identity for GrpcApp {
    async fn certify(
        &self,
        _req: tonic::Request<palisade_api::v1::CertifyRequest>,
    ) -> Result<tonic::Response<palisade_api::v1::CertifyResponse>, tonic::Status> {
        Ok(tonic::Response::new(palisade_api::v1::CertifyResponse {
            spiffe_id: "grpc-app".into(),
            ..Default::default()
        }))
    }
}

/// A TCP echo app that counts the bytes it received.
fn echo_app(addr: SocketAddr, received: Arc<AtomicU64>) {
    let l = std::net::TcpListener::bind(addr).expect("bind echo app");
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let received = received.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            received.fetch_add(n as u64, Ordering::Relaxed);
                            if s.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
}

struct Apps {
    _rt: tokio::runtime::Runtime,
    echo_received: Arc<AtomicU64>,
}

fn start() -> (Mesh, Apps) {
    let spec = spec();
    let ports = spec.allocate();
    let port_of = |n: &str| {
        SocketAddr::from((
            [127, 0, 0, 1],
            ports.iter().find(|(w, _)| w == n).expect("workload").1.app,
        ))
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let grpc_addr = port_of("grpc");
    rt.spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(palisade_api::v1::identity_server::IdentityServer::new(
                GrpcApp,
            ))
            .serve(grpc_addr)
            .await;
    });
    let echo_received = Arc::new(AtomicU64::new(0));
    echo_app(port_of("echo"), echo_received.clone());
    let mesh = spec.start_with_ports(ports, &[("db.yaml", DB_FROM_API)]);
    (
        mesh,
        Apps {
            _rt: rt,
            echo_received,
        },
    )
}

fn deny_web(name: &str, selector: &str) -> String {
    format!(
        r#"
apiVersion: palisade.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {{ name: {name}, namespace: demo }}
spec:
  selector: {{ matchLabels: {{ {selector} }} }}
  action: DENY
  rules:
    - from: [ {{ source: {{ principals: ["cluster.local/ns/demo/sa/web"] }} }} ]
"#
    )
}

#[test]
fn authorization_end_to_end() {
    let (mesh, apps) = start();

    // HTTP: api -> db allowed, web -> db denied with Istio's body.
    let (s, body) = http_get(mesh.app("api"), "/call/db").expect("api -> db");
    assert_eq!(s, 200, "{body}");
    assert!(
        body.contains("caller: spiffe://cluster.local/ns/demo/sa/api"),
        "{body}"
    );
    let (s, body) = http_get(mesh.upstream("web", "db.demo"), "/").expect("web -> db");
    assert_eq!(s, 403);
    assert!(body.contains("RBAC: access denied"), "{body}");
    assert!(
        mesh.metric_sum(
            "db",
            "palisade_authz_decisions_total",
            &["decision=\"deny\""]
        ) >= 1.0
    );
    assert!(
        mesh.metric_sum(
            "db",
            "palisade_authz_decisions_total",
            &["decision=\"allow\"", "policy=\"demo/db-from-api\""]
        ) >= 1.0
    );

    // gRPC: allowed, then denied with PERMISSION_DENIED once a DENY policy selects the app.
    let grpc_up = mesh.upstream("web", "grpc.demo");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let call = || {
        rt.block_on(async {
            let ch = tonic::transport::Endpoint::from_shared(format!("http://{grpc_up}"))
                .expect("endpoint")
                .connect()
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            palisade_api::v1::identity_client::IdentityClient::new(ch)
                .certify(palisade_api::v1::CertifyRequest::default())
                .await
                .map(|r| r.into_inner().spiffe_id)
        })
    };
    assert_eq!(call().expect("grpc allowed"), "grpc-app");
    mesh.write_policy("grpc.yaml", &deny_web("grpc-deny-web", "app: grpc"));
    let t0 = Instant::now();
    assert!(
        eventually(Duration::from_secs(5), || {
            matches!(call(), Err(s) if s.code() == tonic::Code::PermissionDenied)
        }),
        "gRPC never denied:\n{}",
        mesh.logs()
    );
    assert!(
        t0.elapsed() < Duration::from_millis(1500),
        "policy took {:?}",
        t0.elapsed()
    );

    // A policy edit flips an HTTP decision within a second, and back.
    let api_up = mesh.upstream("web", "api.demo");
    assert_eq!(http_get(api_up, "/").expect("api").0, 200);
    mesh.write_policy("api.yaml", &deny_web("api-deny-web", "app: api"));
    let t0 = Instant::now();
    assert!(eventually(Duration::from_secs(5), || http_get(api_up, "/")
        .is_ok_and(|(s, _)| s == 403)));
    assert!(
        t0.elapsed() < Duration::from_millis(1500),
        "took {:?}",
        t0.elapsed()
    );
    mesh.remove_policy("api.yaml");
    assert!(eventually(Duration::from_secs(5), || http_get(api_up, "/")
        .is_ok_and(|(s, _)| s == 200)));

    // A broken policy file is rejected whole; the last good policies stay in force.
    mesh.write_policy("broken.yaml", "apiVersion: palisade.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: { name: b, namespace: demo }\nspec: { actionn: DENY }\n");
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(
        http_get(mesh.upstream("web", "db.demo"), "/")
            .expect("db")
            .0,
        403
    );
    assert_eq!(
        http_get(mesh.app("api"), "/call/db").expect("api->db").0,
        200
    );
    mesh.remove_policy("broken.yaml");

    // PeerAuthentication: STRICT by default refuses plaintext at db's inbound port; a
    // workload-level PERMISSIVE policy lets it through (with no identity, so db's ALLOW policy
    // for api's principal still denies it: 403, not a refused connection).
    let db_inbound = std::net::SocketAddr::from(([127, 0, 0, 1], mesh.ports("db").inbound));
    assert!(
        http_get(db_inbound, "/").is_err(),
        "STRICT must refuse plaintext"
    );
    mesh.write_policy(
        "db-permissive.yaml",
        "apiVersion: palisade.dev/v1alpha1\nkind: PeerAuthentication\nmetadata: { name: db, namespace: demo }\nspec:\n  selector: { matchLabels: { app: db } }\n  mtls: { mode: PERMISSIVE }\n",
    );
    assert!(
        eventually(Duration::from_secs(5), || http_get(db_inbound, "/")
            .is_ok_and(|(s, b)| s == 403 && b.contains("RBAC: access denied"))),
        "PERMISSIVE did not let plaintext reach db's authorization"
    );
    mesh.remove_policy("db-permissive.yaml");
    assert!(
        eventually(Duration::from_secs(5), || http_get(db_inbound, "/")
            .is_err()),
        "back to STRICT"
    );

    // TCP: an open, allowed connection is closed when its permission is revoked.
    let echo_up = mesh.upstream("web", "echo.demo");
    let mut conn = TcpStream::connect(echo_up).expect("connect echo");
    conn.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    conn.write_all(b"ping").expect("write");
    let mut buf = [0u8; 4];
    conn.read_exact(&mut buf).expect("echo");
    assert_eq!(&buf, b"ping");
    mesh.write_policy("echo.yaml", &deny_web("echo-deny-web", "app: echo"));
    let closed = eventually(Duration::from_secs(5), || {
        let _ = conn.write_all(b"x");
        let mut b = [0u8; 16];
        conn.set_read_timeout(Some(Duration::from_millis(100))).ok();
        matches!(conn.read(&mut b), Ok(0) | Err(_))
            && {
                // A timeout is not a close; tell them apart.
                !matches!(conn.read(&mut b), Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut)
            }
    });
    assert!(closed, "revoked TCP connection stayed open");

    // TCP: a denied connection is closed before any byte reaches the app. The probes written
    // to the revoked connection above may still be on their way to the app (a byte that left
    // before the revocation took effect): count from once the app's total stops moving.
    let mut before = apps.echo_received.load(Ordering::Relaxed);
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(100));
        let now = apps.echo_received.load(Ordering::Relaxed);
        if now == before {
            break;
        }
        before = now;
    }
    let mut c = TcpStream::connect(echo_up).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let _ = c.write_all(b"secret");
    let mut b = [0u8; 8];
    let r = c.read(&mut b);
    assert!(matches!(r, Ok(0) | Err(_)), "denied TCP got data: {r:?}");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        apps.echo_received.load(Ordering::Relaxed),
        before,
        "bytes reached the app"
    );
}
