//! `palisade describe` on a running local mesh, as a user runs it: the demo mesh (web -> api ->
//! db with the demo's policies) plus an HTTPRoute on api. db's identity, its live certificate
//! (issued by the mesh's CA, expiring in the future), STRICT mTLS and the PeerAuthentication
//! that set it, its policy, in sync; web's upstreams with their endpoints; the routes; a new
//! policy shown within a second of its file being written, in sync again; and the proxy's admin
//! `/config` refusing what a web page would send.

mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

const WEB: &str = "spiffe://cluster.local/ns/demo/sa/web";
const API: &str = "spiffe://cluster.local/ns/demo/sa/api";
const DB: &str = "spiffe://cluster.local/ns/demo/sa/db";

const API_ROUTES: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: api-routes, namespace: demo }
spec:
  parentRefs: [ { group: "", kind: Service, name: api, port: 8080 } ]
  rules:
    - name: hello
      matches: [ { path: { type: PathPrefix, value: /hello } } ]
    - name: rest
"#;

/// The policy the test adds while the mesh runs: db refuses `/admin` to everyone.
const NEW_POLICY: &str = r#"apiVersion: palisade.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: db-no-admin, namespace: demo }
spec:
  selector: { matchLabels: { app: db } }
  action: DENY
  rules:
    - to: [ { operation: { paths: ["/admin"] } } ]
"#;

/// The demo mesh with the route above.
fn demo_mesh() -> Mesh {
    demo_mesh_with(&[("api-routes.yaml", API_ROUTES)])
}

fn run(state: &Path, args: &[&str]) -> Output {
    Command::new(palisade())
        .args(args)
        .arg("--state-dir")
        .arg(state)
        .env_remove("PALISADE_STATE_DIR")
        .output()
        .expect("run palisade")
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed ({}): {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn describe_json(state: &Path, workload: &str) -> Value {
    let out = run(state, &["describe", workload, "-o", "json"]);
    let text = stdout(&out);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn policy<'a>(d: &'a Value, name: &str) -> Option<&'a Value> {
    d["policies"].as_array()?.iter().find(|p| p["name"] == name)
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

/// The subject of the mesh CA's issuing certificate, as x509-parser prints a DN.
fn mesh_issuer(state: &Path) -> String {
    let pem = std::fs::read(state.join("ca/issuer-cert.pem")).expect("the mesh's issuer cert");
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).expect("PEM");
    let cert = pem.parse_x509().expect("a certificate");
    cert.subject().to_string()
}

#[test]
fn describe_shows_identity_certificate_mtls_policies_routes_endpoints_and_sync() {
    let mesh = demo_mesh();
    let state = mesh.state.clone();

    // db, as JSON. Right after `mesh ready` every proxy holds the served config; allow a
    // moment all the same.
    let mut d = Value::Null;
    assert!(
        eventually(Duration::from_secs(5), || {
            d = describe_json(&state, "db");
            d["config"]["state"] == "in sync"
        }),
        "db never in sync: {d:#}"
    );
    println!("{d:#}");
    assert_eq!(d["workload"], "db");
    assert_eq!(d["namespace"], "demo");
    assert_eq!(d["identity"], DB);
    assert_eq!(d["ready"], true);
    let cert = &d["certificate"];
    assert_eq!(cert["spiffeId"], DB, "{cert:#}");
    assert_eq!(cert["issuer"], mesh_issuer(&state).as_str(), "{cert:#}");
    assert_eq!(cert["verified"], true, "{cert:#}");
    let now = unix_now();
    let not_after = cert["notAfter"].as_i64().expect("notAfter");
    assert!(
        not_after > now && not_after <= now + 3600 + 60,
        "a 1h certificate: {cert:#}"
    );
    let left = cert["expiresInSeconds"].as_i64().expect("expiresInSeconds");
    assert!(left > 0 && left <= 3600 + 60, "{cert:#}");
    assert!(cert["notBefore"].as_i64().expect("notBefore") <= now);
    assert!(!cert["serial"].as_str().unwrap_or("").is_empty());
    assert_eq!(d["mtls"]["mode"], "STRICT");
    assert_eq!(d["mtls"]["port"], mesh.ports("db").app);
    assert_eq!(
        d["mtls"]["source"],
        "PeerAuthentication palisade-system/default"
    );
    assert_eq!(d["defaultPolicy"], "allow");
    let p = policy(&d, "demo/db-from-api").unwrap_or_else(|| panic!("no db-from-api: {d:#}"));
    assert_eq!(p["action"], "ALLOW");
    assert_eq!((&p["enforced"], &p["served"]), (&true.into(), &true.into()));
    assert_eq!(d["policies"].as_array().map(Vec::len), Some(1), "{d:#}");
    assert_eq!(d["config"]["inSync"], true);
    assert_eq!(d["config"]["proxyDigest"], d["config"]["servedDigest"]);
    assert!(d["config"]["proxyVersion"].as_u64() >= Some(1), "{d:#}");
    assert_eq!(d["errors"]["proxy"], Value::Null);
    assert_eq!(d["errors"]["controlPlane"], Value::Null);
    // db's app dials nothing through its proxy (no upstream listener), whatever services the
    // proxy holds.
    assert!(
        d["upstreams"]
            .as_array()
            .is_some_and(|u| u.iter().all(|u| u["listen"].is_null())),
        "{d:#}"
    );

    // The same, as text.
    let text = stdout(&run(&state, &["describe", "db"]));
    println!("{text}");
    for want in [
        &format!("identity:      {DB}"),
        &format!("issuer:      {} (chain verified", mesh_issuer(&state)),
        "validity:    expires ",
        "mTLS:          STRICT on port",
        "(PeerAuthentication palisade-system/default)",
        "ALLOW  demo/db-from-api",
        "(in sync)",
    ] {
        assert!(text.contains(want), "no {want:?} in:\n{text}");
    }

    // web: its upstreams, each endpoint with its identity and balancer state; the route on
    // api applies to its calls to api.
    let w = describe_json(&state, "web");
    println!("{w:#}");
    let ups = w["upstreams"].as_array().expect("upstreams");
    let api = ups
        .iter()
        .find(|u| u["service"] == "api.demo:8080")
        .unwrap_or_else(|| panic!("no api upstream: {w:#}"));
    assert_eq!(api["protocol"], "http");
    assert_eq!(
        api["listen"],
        mesh.upstream("web", "api.demo").to_string().as_str()
    );
    let eps = api["endpoints"].as_array().expect("endpoints");
    assert_eq!(eps.len(), 1, "{api:#}");
    assert_eq!(
        eps[0]["addr"],
        format!("127.0.0.1:{}", mesh.ports("api").inbound).as_str()
    );
    assert_eq!(eps[0]["identity"], API);
    assert_eq!(eps[0]["workload"], "api");
    assert_eq!(eps[0]["ejected"], false);
    assert!(ups.iter().any(|u| u["service"] == "db.demo:5432"), "{w:#}");
    assert_eq!(w["identity"], WEB);
    let route = w["routes"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["name"] == "demo/api-routes"))
        .unwrap_or_else(|| panic!("no route: {w:#}"));
    assert_eq!(route["direction"], "outbound");
    assert_eq!(route["service"], "api.demo:8080");
    assert_eq!(
        route["rules"],
        serde_json::json!(["demo/api-routes/hello", "demo/api-routes/rest"])
    );
    // api: the same route labels its inbound requests.
    let a = describe_json(&state, "api");
    assert!(
        a["routes"].as_array().is_some_and(|r| r
            .iter()
            .any(|r| r["name"] == "demo/api-routes" && r["direction"] == "inbound")),
        "{a:#}"
    );
    let text = stdout(&run(&state, &["describe", "web"]));
    println!("{text}");
    assert!(
        text.contains("api.demo:8080 (http, the app calls"),
        "{text}"
    );
    assert!(
        text.contains("HTTPRoute demo/api-routes (calls to api.demo:8080; rules: hello, rest)"),
        "{text}"
    );

    // A policy change shows within a second: the proxy enforces it, the control plane serves
    // it, and the two are in sync again.
    let before = d["config"]["servedGeneration"]
        .as_u64()
        .expect("generation");
    mesh.write_policy("db-no-admin.yaml", NEW_POLICY);
    let written = Instant::now();
    let mut shown_after = None;
    let mut last = Value::Null;
    while written.elapsed() < Duration::from_secs(10) {
        last = describe_json(&state, "db");
        if let Some(p) = policy(&last, "demo/db-no-admin")
            && p["enforced"] == true
            && p["served"] == true
            && last["config"]["state"] == "in sync"
        {
            shown_after = Some(written.elapsed());
            break;
        }
    }
    println!("{last:#}");
    let shown_after =
        shown_after.unwrap_or_else(|| panic!("the new policy never showed: {last:#}"));
    println!("shown {shown_after:?} after the file was written");
    assert!(
        shown_after <= Duration::from_secs(1),
        "the new policy took {shown_after:?} to show"
    );
    assert_eq!(
        policy(&last, "demo/db-no-admin").expect("shown")["action"],
        "DENY"
    );
    assert!(policy(&last, "demo/db-from-api").is_some(), "{last:#}");
    assert!(
        last["config"]["servedGeneration"].as_u64() > Some(before),
        "{last:#}"
    );
    assert_eq!(
        last["config"]["proxyVersion"],
        last["config"]["servedGeneration"]
    );

    // The proxy's /config: loopback only (this test is), never for a web page.
    let admin = mesh.admin("db");
    let (status, body) = http_get(admin, "/config").expect("/config");
    assert_eq!(status, 200, "{body}");
    assert!(
        !body.contains("PRIVATE KEY") && !body.contains("\"key\""),
        "{body}"
    );
    let (status, body) = http_request(
        admin,
        "GET",
        "/config",
        &[("Origin", "http://evil.example")],
    )
    .expect("/config with Origin");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("Origin"), "{body}");
    let (status, body) = http_request(admin, "GET", "/config", &[("Origin", "null")])
        .expect("/config with a null Origin");
    assert_eq!(status, 403, "{body}");

    // Unknown workloads are named as such.
    let out = run(&state, &["describe", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no workload named \"nope\"") && err.contains("web, api, db"),
        "{err}"
    );
}

#[test]
fn without_a_running_mesh_it_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run(dir.path(), &["describe", "db"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no running mesh"), "{err}");
}
