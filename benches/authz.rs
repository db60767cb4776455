//! Authorization decisions per second with 1, 100 and 10,000 rules. The matching rule is the
//! last one, so every rule before it is evaluated: the honest worst case.

use std::path::Path;

use criterion::{Criterion, criterion_group, criterion_main};
use http::HeaderMap;
use palisade_api::policy::{DefaultPolicy, Resource, parse_str};
use palisade_api::v1;
use palisade_proxy::authz::{Authorizer, ConnContext, HttpContext};

/// The policy as the proxy gets it, in the wire form.
fn policy_with_rules(n: usize) -> v1::Authorization {
    let mut yaml = String::from(
        "apiVersion: palisade.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: { name: bench, namespace: demo }\nspec:\n  action: ALLOW\n  rules:\n",
    );
    for i in 0..n {
        let last = i + 1 == n;
        let principal = if last {
            "web".to_string()
        } else {
            format!("svc-{i}")
        };
        let path = if last {
            "/api/*".to_string()
        } else {
            format!("/p{i}/*")
        };
        yaml.push_str(&format!(
            "    - from: [ {{ source: {{ principals: [\"cluster.local/ns/demo/sa/{principal}\"] }} }} ]\n      to: [ {{ operation: {{ methods: [\"GET\", \"POST\"], paths: [\"{path}\"] }} }} ]\n"
        ));
    }
    match parse_str(Path::new("bench.yaml"), &yaml).map(|mut v| v.remove(0)) {
        Ok(Resource::AuthorizationPolicy(p)) => {
            v1::Authorization::try_from(&p).expect("bench policy converts")
        }
        other => panic!("bench policy did not parse: {other:?}"),
    }
}

fn decisions(c: &mut Criterion) {
    let headers = HeaderMap::new();
    let conn = ConnContext {
        peer: Some("spiffe://cluster.local/ns/demo/sa/web"),
        source_ip: "10.0.0.1".parse().expect("ip"),
        dest_port: 8080,
    };
    let req = HttpContext {
        method: "GET",
        path: "/api/users?id=7",
        host: "api.demo",
        headers: &headers,
        route: None,
    };
    for n in [1usize, 100, 10_000] {
        let authz =
            Authorizer::compile(DefaultPolicy::Deny, &[policy_with_rules(n)]).expect("compiles");
        assert!(authz.authorize_http(&conn, &req).allowed);
        c.bench_function(&format!("authz/http/{n}_rules"), |b| {
            b.iter(|| std::hint::black_box(authz.authorize_http(&conn, &req)))
        });
    }
    let authz = Authorizer::compile(DefaultPolicy::Deny, &[policy_with_rules(100)]).expect("ok");
    c.bench_function("authz/tcp/100_rules", |b| {
        b.iter(|| std::hint::black_box(authz.authorize_tcp(&conn)))
    });
}

/// What the traffic summary (for `policy what-if`) adds to every inbound decision: a shape
/// already kept (the common case: one hash of the borrowed fields and an uncontended lock),
/// and a full summary refusing a new shape.
fn summary(c: &mut Criterion) {
    use palisade_proxy::summary::{HttpSeen, Seen, TrafficSummary};
    let seen = |path| Seen {
        peer: Some("spiffe://cluster.local/ns/demo/sa/web"),
        source_ip: "10.0.0.1".parse().expect("ip"),
        port: 8080,
        http: Some(HttpSeen {
            method: "GET",
            path,
            host: "api.demo:8080",
            route: Some("demo/api-routes/rest"),
        }),
    };
    let s = TrafficSummary::default();
    let hit = seen("/api/users");
    s.record(&hit, true);
    c.bench_function("summary/record/known_shape", |b| {
        b.iter(|| s.record(std::hint::black_box(&hit), true))
    });
    let full = TrafficSummary::default();
    full.configure(1, std::time::Duration::from_secs(600));
    full.record(&seen("/kept"), true);
    let new = seen("/api/users/7");
    c.bench_function("summary/record/full_new_shape", |b| {
        b.iter(|| full.record(std::hint::black_box(&new), true))
    });
}

criterion_group!(benches, decisions, summary);
criterion_main!(benches);
