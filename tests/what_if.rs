//! `palisade policy what-if` on a running local mesh: known traffic through the demo mesh
//! (web -> api, web -> db denied, api -> db), then proposed policies replayed against what
//! the proxies saw, with exact counts of what would flip; a proposal that changes nothing,
//! a broken one (refused whole, file and field named), and the admin `/traffic` it reads.

mod support;

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;
use support::*;

const WEB: &str = "spiffe://cluster.local/ns/demo/sa/web";
const API: &str = "spiffe://cluster.local/ns/demo/sa/api";

/// db's policy, proposed to also let web in (GET only, as today for api).
const DB_ALSO_FROM_WEB: &str = r#"apiVersion: palisade.dev/v1alpha1
kind: AuthorizationPolicy
metadata:
  name: db-from-api
  namespace: demo
spec:
  selector:
    matchLabels: { app: db }
  action: ALLOW
  rules:
    - from:
        - source:
            principals: ["cluster.local/ns/demo/sa/api", "cluster.local/ns/demo/sa/web"]
      to:
        - operation:
            methods: ["GET", "HEAD"]
"#;

/// api's policy, proposed to let web call /hello only.
const API_HELLO_ONLY: &str = r#"apiVersion: palisade.dev/v1alpha1
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
      to:
        - operation:
            paths: ["/hello"]
"#;

fn run(state: &Path, args: &[&str]) -> Output {
    Command::new(palisade())
        .args(args)
        .arg("--state-dir")
        .arg(state)
        .env_remove("PALISADE_STATE_DIR")
        .output()
        .expect("run palisade")
}

fn json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

fn calls(mesh: &Mesh, from: &str, path: &str, n: usize, want: u16) {
    for i in 0..n {
        let (status, body) = http_get(mesh.app(from), path).expect("the demo app answers");
        assert_eq!(status, want, "{from} {path} #{i}: {body}");
    }
}

fn flips(doc: &Value) -> Vec<Value> {
    doc["flips"].as_array().cloned().unwrap_or_default()
}

#[test]
fn what_if_lists_exactly_the_traffic_a_proposal_flips() {
    let mesh = demo_mesh_with(&[]);
    let state = mesh.state.clone();

    // Known traffic: web -> api 6 times on /hello and 4 on /, web -> db 5 times (denied by
    // the demo's policy), api -> db 3 times (allowed).
    calls(&mesh, "web", "/call/api/hello", 6, 200);
    calls(&mesh, "web", "/call/api", 4, 200);
    calls(&mesh, "web", "/call/db", 5, 403);
    calls(&mesh, "api", "/call/db", 3, 200);

    // The current policies, proposed again: nothing flips, and all 18 requests were replayed.
    let same = json(&run(
        &state,
        &["policy", "what-if", path_str(&mesh.policies), "-o", "json"],
    ));
    println!("{same:#}");
    assert_eq!(flips(&same), Vec::<Value>::new());
    assert_eq!(same["replayedRequests"], 18);
    assert_eq!(same["notSummarizedRequests"], 0);

    // A file on top of the current policies: db also lets web in. Exactly web's 5 denied
    // requests flip; api's stay allowed, nothing else changes.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("db.yaml");
    std::fs::write(&file, DB_ALSO_FROM_WEB).expect("write proposal");
    let doc = json(&run(
        &state,
        &["policy", "what-if", path_str(&file), "-o", "json"],
    ));
    println!("{doc:#}");
    assert_eq!(
        flips(&doc),
        vec![serde_json::json!({
            "src": "web", "dst": "db", "srcIdentity": WEB, "method": "GET", "path": "/",
            "from": "deny", "to": "allow", "requests": 5
        })]
    );

    // A directory is the whole proposed set: the demo's files with api narrowed to /hello.
    // web's 4 calls to / would be denied; its 6 to /hello stay allowed. The directory
    // lacks db's policy, so db falls back to the mesh's defaultPolicy (allow): web's 5
    // denied calls would flip too, and api's 3 stay allowed.
    let proposed = tempfile::tempdir().expect("tempdir");
    std::fs::write(proposed.path().join("api.yaml"), API_HELLO_ONLY).expect("write");
    std::fs::copy(
        mesh.policies.join("mesh.yaml"),
        proposed.path().join("mesh.yaml"),
    )
    .expect("copy");
    let doc = json(&run(
        &state,
        &["policy", "what-if", path_str(proposed.path()), "-o", "json"],
    ));
    println!("{doc:#}");
    let got = flips(&doc);
    assert_eq!(got.len(), 2, "{got:#?}");
    let api = got.iter().find(|f| f["dst"] == "api").expect("api flip");
    assert_eq!(
        (
            &api["src"],
            &api["path"],
            &api["from"],
            &api["to"],
            &api["requests"]
        ),
        (
            &Value::from("web"),
            &Value::from("/"),
            &Value::from("allow"),
            &Value::from("deny"),
            &Value::from(4)
        )
    );
    let db = got.iter().find(|f| f["dst"] == "db").expect("db flip");
    assert_eq!(
        (&db["from"], &db["requests"]),
        (&Value::from("deny"), &Value::from(5))
    );
    assert!(
        !got.iter().any(|f| f["srcIdentity"] == API),
        "api's calls stay allowed"
    );

    // The table says the same.
    let out = run(&state, &["policy", "what-if", path_str(&file)]);
    let table = String::from_utf8_lossy(&out.stdout);
    println!("{table}");
    assert!(out.status.success());
    assert!(table.contains("deny -> allow") && table.contains("5 of 18 requests"));

    // A broken proposal is refused whole, naming file and field; nothing is evaluated.
    let broken = dir.path().join("broken.yaml");
    std::fs::write(
        &broken,
        DB_ALSO_FROM_WEB.replace("action: ALLOW", "action: PERMIT"),
    )
    .expect("write");
    let out = run(
        &state,
        &["policy", "what-if", path_str(&broken), "-o", "json"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    println!("{err}");
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert!(
        err.contains("broken.yaml") && err.contains("action"),
        "{err}"
    );

    // What it reads: the proxy's admin /traffic, for this machine's tools only.
    let admin = mesh.admin("db");
    let (status, body) = http_get(admin, "/traffic").expect("admin answers");
    assert_eq!(status, 200);
    let t: Value = serde_json::from_str(&body).expect("JSON");
    let from_web = t["entries"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["srcIdentity"] == WEB).cloned())
        .expect("web's calls summarized");
    assert_eq!(
        (&from_web["denied"], &from_web["allowed"]),
        (&Value::from(5), &Value::from(0))
    );
    let (status, _) = http_request(
        admin,
        "GET",
        "/traffic",
        &[("origin", "http://evil.example")],
    )
    .expect("admin answers");
    assert_eq!(status, 403, "a web page may not read /traffic");
}

#[test]
fn what_if_without_a_running_mesh_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run(dir.path(), &["policy", "what-if", path_str(dir.path())]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains("no running mesh"), "{err}");
}
