//! The decision path allocates nothing, the explanation reporter notwithstanding: the
//! matchers are generic over a reporter, and the one decisions pass must compile away.
//! (A repeated request header is the one documented exception: its values are joined.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::Path;

use http::{HeaderMap, HeaderValue};
use palisade_api::policy::{DefaultPolicy, Resource, parse_str};
use palisade_api::v1;
use palisade_proxy::authz::{Authorizer, ConnContext, HttpContext};

/// Counts the allocations of the current thread, so tests running beside it do not count.
struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: every call is forwarded to the system allocator unchanged; the counter is a
// const-initialized thread-local Cell, which neither allocates nor needs a destructor.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations_in(f: impl FnOnce()) -> usize {
    let before = ALLOCATIONS.with(Cell::get);
    f();
    ALLOCATIONS.with(Cell::get) - before
}

const POLICIES: &str = r#"
apiVersion: palisade.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: audit, namespace: demo }
spec:
  action: AUDIT
  rules: [ { to: [ { operation: { methods: ["POST"] } } ] } ]
---
apiVersion: palisade.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: no-admin, namespace: demo }
spec:
  action: DENY
  rules:
    - to: [ { operation: { paths: ["/admin*"], notHosts: ["*.internal"] } } ]
    - from: [ { source: { notNamespaces: ["demo", "prod"], notIpBlocks: ["10.0.0.0/8"] } } ]
---
apiVersion: palisade.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: from-api, namespace: demo }
spec:
  rules:
    - from: [ { source: { principals: ["cluster.local/ns/demo/sa/api"] } }, { source: { namespaces: ["prod"] } } ]
      to: [ { operation: { methods: ["GET", "HEAD"], ports: ["8080"], hosts: ["*.demo"] } } ]
      when:
        - { key: "request.headers[x-user]", values: ["alice", "bob*"] }
        - { key: destination.port, values: ["8080"] }
        - { key: source.ip, values: ["10.0.0.0/8"] }
        - { key: source.principal, notValues: ["cluster.local/ns/demo/sa/evil"] }
"#;

#[test]
fn decisions_do_not_allocate() {
    let policies: Vec<_> = parse_str(Path::new("t.yaml"), POLICIES)
        .expect("valid policies")
        .into_iter()
        .filter_map(|r| match r {
            Resource::AuthorizationPolicy(p) => Some(p),
            _ => None,
        })
        .collect();
    // As the proxy gets them: in the wire form.
    let policies: Vec<v1::Authorization> = policies
        .iter()
        .map(|p| v1::Authorization::try_from(p).expect("converts"))
        .collect();
    let authz = Authorizer::compile(DefaultPolicy::Deny, &policies).expect("compiles");
    let mut headers = HeaderMap::new();
    headers.insert("x-user", HeaderValue::from_static("alice"));
    let mut outcomes = Vec::with_capacity(64);
    let n = allocations_in(|| {
        for peer in [
            Some("spiffe://cluster.local/ns/demo/sa/api"),
            Some("spiffe://cluster.local/ns/demo/sa/web"),
            Some("spiffe://cluster.local/ns/prod/sa/x"),
            None,
        ] {
            for (method, path, port) in [
                ("GET", "/", 8080),
                ("POST", "/x", 8080),
                ("GET", "/admin", 8080),
                ("GET", "/", 9090),
            ] {
                let c = ConnContext {
                    peer,
                    source_ip: [10, 1, 2, 3].into(),
                    dest_port: port,
                };
                let h = HttpContext {
                    method,
                    path,
                    host: "api.demo:8080",
                    headers: &headers,
                    route: None,
                };
                outcomes.push(authz.authorize_http(&c, &h).allowed);
                outcomes.push(authz.authorize_tcp(&c).allowed);
            }
        }
    });
    assert_eq!(n, 0, "a decision allocated");
    // The requests reached every outcome, so the measured path was the real one.
    assert!(outcomes.contains(&true) && outcomes.contains(&false));
    // The counter counts: an explanation allocates (it builds strings).
    let c = ConnContext {
        peer: None,
        source_ip: [10, 1, 2, 3].into(),
        dest_port: 8080,
    };
    assert!(allocations_in(|| drop(authz.explain_tcp(&c))) > 0);
}
