use super::*;

fn path(kind: v1::path_match::Kind, value: &str) -> Option<v1::PathMatch> {
    Some(v1::PathMatch {
        kind: kind as i32,
        value: value.into(),
    })
}

fn rule(name: &str, matches: Vec<v1::RouteMatch>) -> v1::RouteRule {
    v1::RouteRule {
        name: name.into(),
        matches,
        backends: vec![v1::Backend {
            service: Some(v1::ServiceKey {
                name: format!("api-{name}"),
                namespace: "demo".into(),
                port: 8080,
            }),
            weight: 1,
        }],
        ..Default::default()
    }
}

fn route(rules: Vec<v1::RouteRule>) -> v1::Route {
    v1::Route {
        namespace: "demo".into(),
        name: "r".into(),
        rules,
        ..Default::default()
    }
}

fn picked(routes: &Routes, req: &Request<()>) -> Option<String> {
    match routes.select(&request_host(req), req) {
        Matched::Rule(r, _) => Some(r.label.0.to_string()),
        _ => None,
    }
}

#[test]
fn the_most_specific_match_wins_whatever_the_rule_order() {
    use v1::path_match::Kind;
    let routes = Routes::compile(&[route(vec![
        rule(
            "prefix",
            vec![v1::RouteMatch {
                path: path(Kind::Prefix, "/api"),
                ..Default::default()
            }],
        ),
        rule(
            "longer",
            vec![v1::RouteMatch {
                path: path(Kind::Prefix, "/api/v2/"),
                ..Default::default()
            }],
        ),
        rule(
            "exact",
            vec![v1::RouteMatch {
                path: path(Kind::Exact, "/api/v2/health"),
                ..Default::default()
            }],
        ),
        rule(
            "header",
            vec![v1::RouteMatch {
                path: path(Kind::Prefix, "/api"),
                headers: vec![v1::ValueMatch {
                    name: "x-canary".into(),
                    value: "1".into(),
                    regex: false,
                }],
                ..Default::default()
            }],
        ),
        rule(
            "regex",
            vec![v1::RouteMatch {
                path: path(Kind::Regex, "/users/[0-9]+"),
                method: "GET".into(),
                query_params: vec![v1::ValueMatch {
                    name: "v".into(),
                    value: "2|3".into(),
                    regex: true,
                }],
                ..Default::default()
            }],
        ),
    ])])
    .unwrap();
    let get = |uri: &str| Request::get(uri).body(()).unwrap();
    assert_eq!(
        picked(&routes, &get("http://a/api/x")).as_deref(),
        Some("demo/r/prefix")
    );
    // Whole segments only: `/apix` is not under `/api`.
    assert_eq!(picked(&routes, &get("http://a/apix")), None);
    assert_eq!(
        picked(&routes, &get("http://a/api/v2/x")).as_deref(),
        Some("demo/r/longer")
    );
    assert_eq!(
        picked(&routes, &get("http://a/api/v2")).as_deref(),
        Some("demo/r/longer")
    );
    assert_eq!(
        picked(&routes, &get("http://a/api/v2/health")).as_deref(),
        Some("demo/r/exact")
    );
    let canary = Request::get("http://a/api/x")
        .header("x-canary", "1")
        .body(())
        .unwrap();
    assert_eq!(picked(&routes, &canary).as_deref(), Some("demo/r/header"));
    assert_eq!(
        picked(&routes, &get("http://a/users/12?v=3")).as_deref(),
        Some("demo/r/regex")
    );
    // The regex is anchored, the query must match, the method too.
    assert_eq!(picked(&routes, &get("http://a/users/12x?v=3")), None);
    assert_eq!(picked(&routes, &get("http://a/users/12?v=4")), None);
    let post = Request::post("http://a/users/12?v=2").body(()).unwrap();
    assert_eq!(picked(&routes, &post), None);
    assert!(matches!(
        routes.select("a", &get("http://a/other")),
        Matched::NoRoute
    ));
}

#[test]
fn hostnames_and_grpc_methods_select_routes() {
    let mut web = route(vec![rule("all", vec![])]);
    web.hostnames = vec!["*.example.com".into()];
    let mut grpc = route(vec![rule(
        "get",
        vec![v1::RouteMatch {
            grpc_service: "demo.Users".into(),
            grpc_method: "Get".into(),
            ..Default::default()
        }],
    )]);
    grpc.name = "g".into();
    grpc.grpc = true;
    let routes = Routes::compile(&[web, grpc]).unwrap();
    let req = |uri: &str| Request::post(uri).body(()).unwrap();
    assert_eq!(
        picked(&routes, &req("http://shop.example.com/x")).as_deref(),
        Some("demo/r/all")
    );
    assert_eq!(
        picked(&routes, &req("http://api.demo/demo.Users/Get")).as_deref(),
        Some("demo/g/get")
    );
    assert_eq!(
        picked(&routes, &req("http://api.demo/demo.Users/List")),
        None
    );
    // `*.example.com` is not `example.com` itself.
    assert_eq!(picked(&routes, &req("http://example.com/x")), None);
}

#[test]
fn weights_split_by_draw_and_zero_weights_take_nothing() {
    let mut r = rule("split", vec![]);
    r.backends = vec![
        v1::Backend {
            service: Some(v1::ServiceKey {
                name: "v1".into(),
                namespace: "demo".into(),
                port: 80,
            }),
            weight: 90,
        },
        v1::Backend {
            service: Some(v1::ServiceKey {
                name: "off".into(),
                namespace: "demo".into(),
                port: 80,
            }),
            weight: 0,
        },
        v1::Backend {
            service: Some(v1::ServiceKey {
                name: "v2".into(),
                namespace: "demo".into(),
                port: 80,
            }),
            weight: 10,
        },
    ];
    let routes = Routes::compile(&[route(vec![r])]).unwrap();
    let req = Request::get("http://a/").body(()).unwrap();
    let Matched::Rule(rule, _) = routes.select("a", &req) else {
        panic!("no rule");
    };
    assert_eq!(rule.total_weight, 100);
    let counts = (0..rule.total_weight).fold([0u32; 2], |mut c, d| {
        match rule.backend(d).map(|s| &**s) {
            Some("v1.demo:80") => c[0] += 1,
            Some("v2.demo:80") => c[1] += 1,
            other => panic!("unexpected {other:?}"),
        }
        c
    });
    assert_eq!(counts, [90, 10]);
    assert!(rule.backend(100).is_none());
}

#[test]
fn a_regex_past_the_size_bound_is_refused() {
    let r = route(vec![rule(
        "big",
        vec![v1::RouteMatch {
            path: path(v1::path_match::Kind::Regex, "(?:a{1000}){100}"),
            ..Default::default()
        }],
    )]);
    let err = Routes::compile(&[r]).unwrap_err();
    assert!(err.to_string().contains("demo/r"), "{err}");
}

#[test]
fn a_header_match_outranks_a_catch_all_rule_written_before_it() {
    let routes = Routes::compile(&[route(vec![
        rule("all", vec![]),
        rule(
            "beta",
            vec![v1::RouteMatch {
                headers: vec![v1::ValueMatch {
                    name: "x-beta".into(),
                    value: "1".into(),
                    regex: false,
                }],
                ..Default::default()
            }],
        ),
    ])])
    .unwrap();
    let beta = Request::get("http://a/x")
        .header("x-beta", "1")
        .body(())
        .unwrap();
    assert_eq!(picked(&routes, &beta).as_deref(), Some("demo/r/beta"));
    let plain = Request::get("http://a/x").body(()).unwrap();
    assert_eq!(picked(&routes, &plain).as_deref(), Some("demo/r/all"));
}

/// What the outbound Classify stage and the inbound authorization stage attach to a response
/// as its `TracePolicy` extension: the matched rule's policy (its route's over the service's,
/// field by field), else the service's own.
#[test]
fn a_rule_carries_its_routes_trace_policy_over_its_services() {
    use crate::config::Snapshot;

    let trace = |budget: u32, slow_ms: u64| {
        Some(v1::TracePolicy {
            span_budget_per_second: budget,
            slow_ms,
        })
    };
    let mut slow = route(vec![rule(
        "slow",
        vec![v1::RouteMatch {
            path: path(v1::path_match::Kind::Prefix, "/reports"),
            ..Default::default()
        }],
    )]);
    slow.name = "slow".into();
    slow.trace = trace(0, 200);
    let mut busy = route(vec![rule(
        "busy",
        vec![v1::RouteMatch {
            path: path(v1::path_match::Kind::Prefix, "/feed"),
            ..Default::default()
        }],
    )]);
    busy.name = "busy".into();
    busy.trace = trace(500, 0);
    let mut plain = route(vec![rule("all", vec![])]);
    plain.name = "plain".into();
    let service = |name: &str, routes: Vec<v1::Route>, trace| v1::Service {
        name: name.into(),
        namespace: "demo".into(),
        port: 8080,
        protocol: v1::Protocol::Http as i32,
        routes,
        trace,
        ..Default::default()
    };
    let cfg = v1::ProxyConfig {
        version: 1,
        inbound: Some(v1::Inbound {
            // The control plane sends a backer's routes with their effective policy.
            routes: vec![{
                let mut r = slow.clone();
                r.trace = trace(10, 200);
                r
            }],
            ..Default::default()
        }),
        services: vec![
            service(
                "api",
                vec![slow.clone(), busy.clone(), plain.clone()],
                trace(10, 1000),
            ),
            service("db", Vec::new(), trace(5, 0)),
            service("cache", vec![plain.clone()], None),
        ],
        ..Default::default()
    };
    let snap = Snapshot::from_proto(&cfg).expect("compiles");
    let policy = |budget: Option<u32>, slow_ms: Option<u64>| TracePolicy {
        span_budget: budget,
        slow: slow_ms.map(Duration::from_millis),
    };
    let rule_trace = |svc: &str, uri: &str| {
        let req = Request::get(uri).body(()).unwrap();
        match snap.services[svc].routes.select("api.demo", &req) {
            Matched::Rule(rule, _) => rule.trace,
            _ => panic!("{svc} {uri}: no rule"),
        }
    };
    let api = &snap.services["api.demo:8080"];
    assert_eq!(api.trace, policy(Some(10), Some(1000)));
    // The route's slow threshold, the service's budget.
    assert_eq!(
        rule_trace("api.demo:8080", "http://api.demo/reports/q3"),
        policy(Some(10), Some(200))
    );
    // The route's budget, the service's slow threshold.
    assert_eq!(
        rule_trace("api.demo:8080", "http://api.demo/feed"),
        policy(Some(500), Some(1000))
    );
    // A route without a policy: the service's.
    assert_eq!(
        rule_trace("api.demo:8080", "http://api.demo/other"),
        api.trace
    );
    // A service without routes keeps its own; one without a policy has the proxy's defaults.
    assert_eq!(snap.services["db.demo:8080"].trace, policy(Some(5), None));
    assert_eq!(
        rule_trace("cache.demo:8080", "http://cache.demo/"),
        TracePolicy::default()
    );
    // Inbound: the rule's effective policy, as the control plane computed it.
    let req = Request::get("http://api.demo/reports").body(()).unwrap();
    match snap.inbound.routes.select("api.demo", &req) {
        Matched::Rule(rule, _) => assert_eq!(rule.trace, policy(Some(10), Some(200))),
        _ => panic!("no inbound rule"),
    }

    // A policy out of bounds is refused, naming the field.
    let mut bad = cfg.clone();
    bad.services[0].trace = trace(2_000_000, 0);
    let e = Snapshot::from_proto(&bad).expect_err("refused").to_string();
    assert!(
        e.starts_with("services[api.demo:8080].trace.span_budget_per_second:"),
        "{e}"
    );
    let mut bad = cfg.clone();
    bad.services[0].routes[0].trace = trace(0, u64::MAX);
    let e = Snapshot::from_proto(&bad).expect_err("refused").to_string();
    assert!(
        e.starts_with("services[api.demo:8080].routes: route demo/slow: trace.slow_ms:"),
        "{e}"
    );
}
