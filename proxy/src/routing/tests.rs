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
