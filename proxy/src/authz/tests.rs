//! Semantics tables: every example of Istio's AuthorizationPolicy reference, parsed from YAML
//! with the same parser `palisade policy check` uses.

use std::path::Path;

use http::HeaderMap;
use palisade_api::policy::{AuthorizationPolicy, DefaultPolicy, Resource, parse_str};
use palisade_api::v1;

use super::*;

const WEB: &str = "spiffe://cluster.local/ns/demo/sa/web";
const API: &str = "spiffe://cluster.local/ns/demo/sa/api";
const OTHER_NS: &str = "spiffe://cluster.local/ns/prod/sa/web";

fn policies(yaml: &str) -> Vec<AuthorizationPolicy> {
    // "" stands for no policy file at all (a file without documents is a parse error).
    if yaml.is_empty() {
        return Vec::new();
    }
    parse_str(Path::new("t.yaml"), yaml)
        .expect("valid policy")
        .into_iter()
        .filter_map(|r| match r {
            Resource::AuthorizationPolicy(p) => Some(p),
            _ => None,
        })
        .collect()
}

/// The policies as the proxy gets them: converted to the wire form by the control plane's
/// conversion, compiled from it.
fn wire(policies: &[AuthorizationPolicy]) -> Vec<v1::Authorization> {
    policies
        .iter()
        .map(|p| v1::Authorization::try_from(p).expect("converts"))
        .collect()
}

fn authz(default: DefaultPolicy, yaml: &str) -> Authorizer {
    Authorizer::compile(default, &wire(&policies(yaml))).expect("compiles")
}

struct Req<'a> {
    peer: Option<&'a str>,
    ip: &'a str,
    port: u16,
    method: &'a str,
    path: &'a str,
    host: &'a str,
    headers: &'a [(&'a str, &'a str)],
}

const GET: Req<'static> = Req {
    peer: Some(WEB),
    ip: "10.1.2.3",
    port: 8080,
    method: "GET",
    path: "/",
    host: "api.demo",
    headers: &[],
};

fn http(a: &Authorizer, r: &Req<'_>) -> Decision {
    let mut h = HeaderMap::new();
    for (k, v) in r.headers {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).expect("name"),
            v.parse().expect("value"),
        );
    }
    let c = ConnContext {
        peer: r.peer,
        source_ip: r.ip.parse().expect("ip"),
        dest_port: r.port,
    };
    a.authorize_http(
        &c,
        &HttpContext {
            method: r.method,
            path: r.path,
            host: r.host,
            headers: &h,
            route: None,
        },
    )
}

fn tcp(a: &Authorizer, peer: Option<&str>, port: u16) -> Decision {
    a.authorize_tcp(&ConnContext {
        peer,
        source_ip: "10.1.2.3".parse().expect("ip"),
        dest_port: port,
    })
}

fn pol(action: &str, rules: &str) -> String {
    format!(
        "apiVersion: palisade.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{ name: p, namespace: demo }}\nspec:\n  action: {action}\n{rules}"
    )
}

#[test]
fn no_policies_use_the_default() {
    let allow = authz(DefaultPolicy::Allow, "");
    let d = http(&allow, &GET);
    assert!(d.allowed && d.by_default);
    assert!(!http(&authz(DefaultPolicy::Deny, ""), &GET).allowed);
    let auth = authz(DefaultPolicy::Authenticated, "");
    assert!(http(&auth, &GET).allowed);
    assert!(!http(&auth, &Req { peer: None, ..GET }).allowed);
    assert!(!tcp(&auth, None, 8080).allowed);
}

#[test]
fn allow_nothing_deny_all_allow_all() {
    // ALLOW without rules: allow nothing.
    let a = authz(DefaultPolicy::Allow, &pol("ALLOW", ""));
    let d = http(&a, &GET);
    assert!(!d.allowed && !d.by_default && d.policy.is_none());
    // DENY with an empty rule: deny all.
    let a = authz(DefaultPolicy::Allow, &pol("DENY", "  rules: [ {} ]\n"));
    let d = http(&a, &GET);
    assert!(!d.allowed);
    assert_eq!(d.policy.as_deref(), Some("demo/p"));
    assert_eq!(d.rule, Some(0));
    // ALLOW with an empty rule: allow all, even with a deny default.
    let a = authz(DefaultPolicy::Deny, &pol("ALLOW", "  rules: [ {} ]\n"));
    assert!(http(&a, &GET).allowed);
    assert!(tcp(&a, None, 1).allowed);
}

#[test]
fn principals_with_and_without_scheme_and_namespaces() {
    for p in [
        "cluster.local/ns/demo/sa/web",
        "spiffe://cluster.local/ns/demo/sa/web",
    ] {
        let a = authz(
            DefaultPolicy::Deny,
            &pol(
                "ALLOW",
                &format!(
                    "  rules: [ {{ from: [ {{ source: {{ principals: [\"{p}\"] }} }} ] }} ]\n"
                ),
            ),
        );
        assert!(http(&a, &GET).allowed, "{p}");
        assert!(
            !http(
                &a,
                &Req {
                    peer: Some(API),
                    ..GET
                }
            )
            .allowed
        );
        assert!(
            !http(&a, &Req { peer: None, ..GET }).allowed,
            "plaintext has no principal"
        );
    }
    let a = authz(
        DefaultPolicy::Deny,
        &pol(
            "ALLOW",
            "  rules: [ { from: [ { source: { principals: [\"*\"] } } ] } ]\n",
        ),
    );
    assert!(http(&a, &GET).allowed);
    assert!(
        !http(&a, &Req { peer: None, ..GET }).allowed,
        "* needs an identity"
    );
    let a = authz(
        DefaultPolicy::Deny,
        &pol(
            "ALLOW",
            "  rules: [ { from: [ { source: { principals: [\"cluster.local/ns/demo/*\"] } } ] } ]\n",
        ),
    );
    assert!(
        http(
            &a,
            &Req {
                peer: Some(API),
                ..GET
            }
        )
        .allowed
    );
    assert!(
        !http(
            &a,
            &Req {
                peer: Some(OTHER_NS),
                ..GET
            }
        )
        .allowed
    );

    let a = authz(
        DefaultPolicy::Deny,
        &pol(
            "ALLOW",
            "  rules: [ { from: [ { source: { namespaces: [\"demo\"] } } ] } ]\n",
        ),
    );
    assert!(http(&a, &GET).allowed);
    assert!(
        !http(
            &a,
            &Req {
                peer: Some(OTHER_NS),
                ..GET
            }
        )
        .allowed
    );
    let a = authz(
        DefaultPolicy::Allow,
        &pol(
            "DENY",
            "  rules: [ { from: [ { source: { notNamespaces: [\"demo\"] } } ] } ]\n",
        ),
    );
    assert!(http(&a, &GET).allowed);
    assert!(
        !http(
            &a,
            &Req {
                peer: Some(OTHER_NS),
                ..GET
            }
        )
        .allowed
    );
    let a = authz(
        DefaultPolicy::Allow,
        &pol(
            "DENY",
            "  rules: [ { from: [ { source: { notPrincipals: [\"cluster.local/ns/demo/sa/web\"] } } ] } ]\n",
        ),
    );
    assert!(http(&a, &GET).allowed);
    assert!(
        !http(
            &a,
            &Req {
                peer: Some(API),
                ..GET
            }
        )
        .allowed
    );
}

#[test]
fn ip_blocks() {
    let a = authz(
        DefaultPolicy::Deny,
        &pol(
            "ALLOW",
            "  rules: [ { from: [ { source: { ipBlocks: [\"10.1.0.0/16\", \"192.168.1.1\"] } } ] } ]\n",
        ),
    );
    assert!(http(&a, &GET).allowed);
    assert!(
        http(
            &a,
            &Req {
                ip: "192.168.1.1",
                ..GET
            }
        )
        .allowed
    );
    assert!(
        !http(
            &a,
            &Req {
                ip: "10.2.0.1",
                ..GET
            }
        )
        .allowed
    );
    let a = authz(
        DefaultPolicy::Allow,
        &pol(
            "DENY",
            "  rules: [ { from: [ { source: { notIpBlocks: [\"10.0.0.0/8\"] } } ] } ]\n",
        ),
    );
    assert!(http(&a, &GET).allowed);
    assert!(
        !http(
            &a,
            &Req {
                ip: "172.16.0.1",
                ..GET
            }
        )
        .allowed
    );
}

#[test]
fn methods_paths_hosts_ports_and_not_forms() {
    let a = authz(
        DefaultPolicy::Allow,
        &pol(
            "ALLOW",
            "  rules:\n    - to: [ { operation: { methods: [\"GET\", \"HEAD\"], paths: [\"/info*\", \"*.png\", \"/exact\"], ports: [\"8080\"], hosts: [\"*.demo\"] } } ]\n",
        ),
    );
    let ok = |r: Req<'_>| http(&a, &r).allowed;
    assert!(ok(Req {
        path: "/info/x?q=1",
        ..GET
    }));
    assert!(ok(Req {
        path: "/img/a.png",
        ..GET
    }));
    assert!(ok(Req {
        path: "/exact",
        method: "HEAD",
        ..GET
    }));
    assert!(!ok(Req {
        path: "/exact/no",
        ..GET
    }));
    assert!(!ok(Req {
        path: "/info",
        method: "POST",
        ..GET
    }));
    assert!(!ok(Req {
        path: "/info",
        port: 9090,
        ..GET
    }));
    assert!(!ok(Req {
        path: "/info",
        host: "api.prod",
        ..GET
    }));
    assert!(
        ok(Req {
            path: "/info",
            host: "API.DEMO",
            ..GET
        }),
        "hosts are case-insensitive"
    );

    let a = authz(
        DefaultPolicy::Allow,
        &pol(
            "ALLOW",
            "  rules: [ { to: [ { operation: { notMethods: [\"DELETE\"], notPaths: [\"/admin*\"], notPorts: [\"9090\"] } } ] } ]\n",
        ),
    );
    assert!(http(&a, &GET).allowed);
    assert!(
        !http(
            &a,
            &Req {
                method: "DELETE",
                ..GET
            }
        )
        .allowed
    );
    assert!(
        !http(
            &a,
            &Req {
                path: "/admin/x",
                ..GET
            }
        )
        .allowed
    );
    assert!(!http(&a, &Req { port: 9090, ..GET }).allowed);
}

#[test]
fn when_conditions() {
    let a = authz(
        DefaultPolicy::Allow,
        &pol(
            "ALLOW",
            "  rules: [ { when: [ { key: \"request.headers[X-User]\", values: [\"alice\", \"bob*\"] } ] } ]\n",
        ),
    );
    assert!(
        http(
            &a,
            &Req {
                headers: &[("x-user", "alice")],
                ..GET
            }
        )
        .allowed
    );
    assert!(
        http(
            &a,
            &Req {
                headers: &[("x-user", "bobby")],
                ..GET
            }
        )
        .allowed
    );
    assert!(
        !http(
            &a,
            &Req {
                headers: &[("x-user", "eve")],
                ..GET
            }
        )
        .allowed
    );
    assert!(
        !http(&a, &GET).allowed,
        "a missing header does not match values"
    );

    let a = authz(
        DefaultPolicy::Allow,
        &pol(
            "DENY",
            "  rules: [ { when: [ { key: source.namespace, notValues: [\"demo\"] } ] } ]\n",
        ),
    );
    assert!(http(&a, &GET).allowed);
    assert!(
        !http(
            &a,
            &Req {
                peer: Some(OTHER_NS),
                ..GET
            }
        )
        .allowed
    );
    let a = authz(
        DefaultPolicy::Deny,
        &pol(
            "ALLOW",
            "  rules: [ { when: [ { key: destination.port, values: [\"8080\"] }, { key: source.ip, values: [\"10.0.0.0/8\"] } ] } ]\n",
        ),
    );
    assert!(http(&a, &GET).allowed);
    assert!(!http(&a, &Req { port: 80, ..GET }).allowed);
    assert!(
        !http(
            &a,
            &Req {
                ip: "11.0.0.1",
                ..GET
            }
        )
        .allowed
    );
}

#[test]
fn deny_takes_precedence_and_audit_only_records() {
    let yaml = format!(
        "{}\n---\n{}\n---\n{}",
        pol("ALLOW", "  rules: [ {} ]\n").replace("name: p", "name: allow-all"),
        pol(
            "DENY",
            "  rules: [ { to: [ { operation: { paths: [\"/secret\"] } } ] } ]\n"
        )
        .replace("name: p", "name: no-secret"),
        pol(
            "AUDIT",
            "  rules: [ { to: [ { operation: { methods: [\"POST\"] } } ] } ]\n"
        )
        .replace("name: p", "name: audit-posts"),
    );
    let a = authz(DefaultPolicy::Deny, &yaml);
    let d = http(
        &a,
        &Req {
            path: "/secret",
            ..GET
        },
    );
    assert!(!d.allowed);
    assert_eq!(d.policy.as_deref(), Some("demo/no-secret"));
    let d = http(
        &a,
        &Req {
            method: "POST",
            ..GET
        },
    );
    assert!(d.allowed);
    assert_eq!(d.policy.as_deref(), Some("demo/allow-all"));
    assert_eq!(d.audit.as_deref(), Some("demo/audit-posts"));
    assert!(http(&a, &GET).audit.is_none());
}

#[test]
fn tcp_handling_of_http_fields() {
    // ALLOW with HTTP fields: does not allow TCP.
    let a = authz(
        DefaultPolicy::Allow,
        &pol(
            "ALLOW",
            "  rules: [ { from: [ { source: { principals: [\"*\"] } } ], to: [ { operation: { methods: [\"GET\"] } } ] } ]\n",
        ),
    );
    assert!(http(&a, &GET).allowed);
    assert!(!tcp(&a, Some(WEB), 8080).allowed);
    // DENY with HTTP fields: denies the TCP connection (the HTTP fields are ignored).
    let a = authz(
        DefaultPolicy::Allow,
        &pol(
            "DENY",
            "  rules: [ { from: [ { source: { principals: [\"cluster.local/ns/demo/sa/web\"] } } ], to: [ { operation: { methods: [\"DELETE\"] } } ] } ]\n",
        ),
    );
    assert!(http(&a, &GET).allowed);
    assert!(!tcp(&a, Some(WEB), 8080).allowed);
    assert!(tcp(&a, Some(API), 8080).allowed);
    // Ports apply to TCP.
    let a = authz(
        DefaultPolicy::Deny,
        &pol(
            "ALLOW",
            "  rules: [ { to: [ { operation: { ports: [\"7000\"] } } ] } ]\n",
        ),
    );
    assert!(tcp(&a, Some(WEB), 7000).allowed);
    assert!(!tcp(&a, Some(WEB), 7001).allowed);
}

#[test]
fn port_formatting_does_not_allocate_and_is_right() {
    let mut b = itoa_buf();
    assert_eq!(fmt_port(&mut b, 0), "0");
    let mut b = itoa_buf();
    assert_eq!(fmt_port(&mut b, 65535), "65535");
    let mut b = itoa_buf();
    assert_eq!(fmt_port(&mut b, 8080), "8080");
}

#[test]
fn repeated_headers_are_joined_before_matching() {
    // DENY every tenant but tenant-a: a second header must not hide behind the first.
    let a = authz(
        DefaultPolicy::Allow,
        &pol(
            "DENY",
            "  rules: [ { when: [ { key: \"request.headers[x-tenant]\", notValues: [\"tenant-a\"] } ] } ]\n",
        ),
    );
    let one = [("x-tenant", "tenant-a")];
    assert!(
        http(
            &a,
            &Req {
                headers: &one,
                ..GET
            }
        )
        .allowed
    );
    let two = [("x-tenant", "tenant-a"), ("x-tenant", "tenant-b")];
    assert!(
        !http(
            &a,
            &Req {
                headers: &two,
                ..GET
            }
        )
        .allowed,
        "tenant-a,tenant-b is not tenant-a"
    );
    // ALLOW tenant-a only: the joined value is what must match.
    let a = authz(
        DefaultPolicy::Allow,
        &pol(
            "ALLOW",
            "  rules: [ { when: [ { key: \"request.headers[x-tenant]\", values: [\"tenant-a\"] } ] } ]\n",
        ),
    );
    assert!(
        http(
            &a,
            &Req {
                headers: &one,
                ..GET
            }
        )
        .allowed
    );
    assert!(
        !http(
            &a,
            &Req {
                headers: &two,
                ..GET
            }
        )
        .allowed
    );
    // A prefix sees the joined string, as Envoy does.
    let a = authz(
        DefaultPolicy::Allow,
        &pol(
            "ALLOW",
            "  rules: [ { when: [ { key: \"request.headers[x-tenant]\", values: [\"tenant-a,*\"] } ] } ]\n",
        ),
    );
    assert!(
        http(
            &a,
            &Req {
                headers: &two,
                ..GET
            }
        )
        .allowed
    );
}

#[test]
fn hosts_ignore_case_and_port() {
    let a = authz(
        DefaultPolicy::Allow,
        &pol(
            "DENY",
            "  rules: [ { to: [ { operation: { hosts: [\"admin.demo\", \"*.internal\"] } } ] } ]\n",
        ),
    );
    for host in [
        "admin.demo",
        "ADMIN.demo",
        "admin.demo:8080",
        "Admin.Demo:80",
        "db.internal:5432",
    ] {
        assert!(!http(&a, &Req { host, ..GET }).allowed, "{host}");
    }
    for host in ["api.demo", "api.demo:8080", "admin.demo.evil"] {
        assert!(http(&a, &Req { host, ..GET }).allowed, "{host}");
    }
    // A pattern with a port still matches the full host.
    let a = authz(
        DefaultPolicy::Deny,
        &pol(
            "ALLOW",
            "  rules: [ { to: [ { operation: { hosts: [\"api.demo:8080\"] } } ] } ]\n",
        ),
    );
    assert!(
        http(
            &a,
            &Req {
                host: "api.demo:8080",
                ..GET
            }
        )
        .allowed
    );
    assert!(
        !http(
            &a,
            &Req {
                host: "api.demo:9090",
                ..GET
            }
        )
        .allowed
    );
    assert_eq!(strip_port("[::1]:80"), "[::1]");
    assert_eq!(strip_port("[::1]"), "[::1]");
    assert_eq!(strip_port("h:x"), "h:x");
}

#[test]
fn principals_and_namespaces_match_literally() {
    let a = authz(
        DefaultPolicy::Deny,
        &pol(
            "ALLOW",
            "  rules: [ { from: [ { source: { principals: [\"cluster.local/ns/demo/sa/a.b\"], namespaces: [\"demo\"] } } ] } ]\n",
        ),
    );
    let ok = "spiffe://cluster.local/ns/demo/sa/a.b";
    assert!(
        http(
            &a,
            &Req {
                peer: Some(ok),
                ..GET
            }
        )
        .allowed
    );
    for peer in [
        "spiffe://cluster.local/ns/demo/sa/aXb",
        "spiffe://cluster.local/ns/demo/sa/a.bc",
        "spiffe://cluster.local/ns/demoX/sa/a.b",
    ] {
        assert!(
            !http(
                &a,
                &Req {
                    peer: Some(peer),
                    ..GET
                }
            )
            .allowed,
            "{peer}"
        );
    }
    let a = authz(
        DefaultPolicy::Deny,
        &pol(
            "ALLOW",
            "  rules: [ { from: [ { source: { namespaces: [\"de.mo\"] } } ] } ]\n",
        ),
    );
    assert!(
        !http(
            &a,
            &Req {
                peer: Some("spiffe://cluster.local/ns/deXmo/sa/w"),
                ..GET
            }
        )
        .allowed
    );
    assert!(
        http(
            &a,
            &Req {
                peer: Some("spiffe://cluster.local/ns/de.mo/sa/w"),
                ..GET
            }
        )
        .allowed
    );
}

// ---------------------------------------------------------------------------------------------
// Explanations: the same evaluation as the decision, so they must agree with it everywhere.
// ---------------------------------------------------------------------------------------------

/// Every policy set of the tables above (and a few multi-policy ones), with its default.
fn policy_tables() -> Vec<(DefaultPolicy, String)> {
    let named = |action: &str, name: &str, rules: &str| {
        pol(action, rules).replace("name: p", &format!("name: {name}"))
    };
    let mut t: Vec<(DefaultPolicy, String)> = Vec::new();
    for d in [
        DefaultPolicy::Allow,
        DefaultPolicy::Deny,
        DefaultPolicy::Authenticated,
    ] {
        t.push((d, String::new()));
        t.push((d, pol("ALLOW", "")));
        t.push((d, pol("DENY", "  rules: [ {} ]\n")));
        t.push((d, pol("ALLOW", "  rules: [ {} ]\n")));
    }
    for rules in [
        "  rules: [ { from: [ { source: { principals: [\"cluster.local/ns/demo/sa/web\"] } } ] } ]\n",
        "  rules: [ { from: [ { source: { principals: [\"*\"] } } ] } ]\n",
        "  rules: [ { from: [ { source: { principals: [\"cluster.local/ns/demo/*\"] } } ] } ]\n",
        "  rules: [ { from: [ { source: { namespaces: [\"demo\"] } } ] } ]\n",
        "  rules: [ { from: [ { source: { ipBlocks: [\"10.1.0.0/16\", \"192.168.1.1\"] } } ] } ]\n",
        "  rules:\n    - to: [ { operation: { methods: [\"GET\", \"HEAD\"], paths: [\"/info*\", \"*.png\", \"/exact\"], ports: [\"8080\"], hosts: [\"*.demo\"] } } ]\n",
        "  rules: [ { to: [ { operation: { notMethods: [\"DELETE\"], notPaths: [\"/admin*\"], notPorts: [\"9090\"] } } ] } ]\n",
        "  rules: [ { when: [ { key: \"request.headers[X-User]\", values: [\"alice\", \"bob*\"] } ] } ]\n",
        "  rules: [ { when: [ { key: destination.port, values: [\"8080\"] }, { key: source.ip, values: [\"10.0.0.0/8\"] } ] } ]\n",
        "  rules: [ { from: [ { source: { principals: [\"*\"] } } ], to: [ { operation: { methods: [\"GET\"] } } ] } ]\n",
        "  rules: [ { to: [ { operation: { ports: [\"7000\"] } } ] } ]\n",
        "  rules: [ { when: [ { key: \"request.headers[x-tenant]\", values: [\"tenant-a\"] } ] } ]\n",
        "  rules: [ { from: [ { source: { principals: [\"cluster.local/ns/demo/sa/a.b\"], namespaces: [\"demo\"] } } ] } ]\n",
        // Several sources and several rules: the first rules fail in different parts.
        "  rules:\n    - from: [ { source: { principals: [\"cluster.local/ns/demo/sa/api\"] } }, { source: { namespaces: [\"prod\"] } } ]\n    - from: [ { source: { namespaces: [\"demo\"] } } ]\n      to: [ { operation: { methods: [\"POST\"] } }, { operation: { paths: [\"/info*\"] } } ]\n    - when: [ { key: source.principal, notValues: [\"cluster.local/ns/demo/sa/web\"] } ]\n",
    ] {
        t.push((DefaultPolicy::Deny, pol("ALLOW", rules)));
        t.push((DefaultPolicy::Allow, pol("DENY", rules)));
    }
    for rules in [
        "  rules: [ { from: [ { source: { notNamespaces: [\"demo\"] } } ] } ]\n",
        "  rules: [ { from: [ { source: { notPrincipals: [\"cluster.local/ns/demo/sa/web\"] } } ] } ]\n",
        "  rules: [ { from: [ { source: { notIpBlocks: [\"10.0.0.0/8\"] } } ] } ]\n",
        "  rules: [ { when: [ { key: source.namespace, notValues: [\"demo\"] } ] } ]\n",
        "  rules: [ { from: [ { source: { principals: [\"cluster.local/ns/demo/sa/web\"] } } ], to: [ { operation: { methods: [\"DELETE\"] } } ] } ]\n",
        "  rules: [ { when: [ { key: \"request.headers[x-tenant]\", notValues: [\"tenant-a\"] } ] } ]\n",
        "  rules: [ { to: [ { operation: { hosts: [\"admin.demo\", \"*.internal\"] } } ] } ]\n",
    ] {
        t.push((DefaultPolicy::Allow, pol("DENY", rules)));
        t.push((DefaultPolicy::Deny, pol("ALLOW", rules)));
    }
    // DENY before ALLOW, AUDIT on the side, two ALLOW policies.
    t.push((
        DefaultPolicy::Deny,
        format!(
            "{}\n---\n{}\n---\n{}\n---\n{}",
            named(
                "ALLOW",
                "from-api",
                "  rules: [ { from: [ { source: { principals: [\"cluster.local/ns/demo/sa/api\"] } } ] } ]\n"
            ),
            named(
                "DENY",
                "no-secret",
                "  rules: [ { to: [ { operation: { paths: [\"/secret\"] } } ] } ]\n"
            ),
            named(
                "AUDIT",
                "audit-posts",
                "  rules: [ { to: [ { operation: { methods: [\"POST\"] } } ] } ]\n"
            ),
            named(
                "ALLOW",
                "gets",
                "  rules: [ { to: [ { operation: { methods: [\"GET\"], paths: [\"/info*\"] } } ] } ]\n"
            ),
        ),
    ));
    t
}

/// The requests the tables are asked about.
fn table_requests() -> Vec<Req<'static>> {
    const TWO_TENANTS: &[(&str, &str)] = &[("x-tenant", "tenant-a"), ("x-tenant", "tenant-b")];
    let mut v = Vec::new();
    for peer in [
        Some(WEB),
        Some(API),
        Some(OTHER_NS),
        Some("spiffe://cluster.local/ns/demo/sa/a.b"),
        None,
    ] {
        for (method, path) in [
            ("GET", "/"),
            ("GET", "/info/x?q=1"),
            ("POST", "/info"),
            ("DELETE", "/admin/x"),
            ("HEAD", "/exact"),
            ("GET", "/secret"),
            ("GET", "/img/a.png"),
        ] {
            v.push(Req {
                peer,
                method,
                path,
                ..GET
            });
        }
        v.push(Req {
            peer,
            port: 9090,
            ..GET
        });
        v.push(Req {
            peer,
            port: 7000,
            ip: "192.168.1.1",
            ..GET
        });
        v.push(Req {
            peer,
            ip: "172.16.0.1",
            host: "db.internal:5432",
            ..GET
        });
        v.push(Req {
            peer,
            host: "ADMIN.demo",
            headers: &[("x-user", "alice")],
            ..GET
        });
        v.push(Req {
            peer,
            headers: &[("x-user", "eve"), ("x-tenant", "tenant-a")],
            ..GET
        });
        v.push(Req {
            peer,
            headers: TWO_TENANTS,
            ..GET
        });
    }
    v
}

fn explain_http(a: &Authorizer, r: &Req<'_>) -> Explanation {
    let mut h = HeaderMap::new();
    for (k, v) in r.headers {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).expect("name"),
            v.parse().expect("value"),
        );
    }
    let c = ConnContext {
        peer: r.peer,
        source_ip: r.ip.parse().expect("ip"),
        dest_port: r.port,
    };
    a.explain_http(
        &c,
        &HttpContext {
            method: r.method,
            path: r.path,
            host: r.host,
            headers: &h,
            route: None,
        },
    )
}

fn explain_tcp(a: &Authorizer, r: &Req<'_>) -> Explanation {
    a.explain_tcp(&ConnContext {
        peer: r.peer,
        source_ip: r.ip.parse().expect("ip"),
        dest_port: r.port,
    })
}

/// What an explanation must say given its decision: the policies evaluated and, for each,
/// exactly the rules that were evaluated and did not match, each with a reason.
fn assert_consistent(a: &Authorizer, e: &Explanation, what: &str) {
    let d = &e.decision;
    let count = |action| a.policies().filter(|(_, x)| *x == action).count();
    let traced = |action| e.policies.iter().filter(move |p| p.action == action);
    for p in &e.policies {
        // The rules evaluated and missed are 0, 1, 2, … (evaluation is in order).
        let idx: Vec<usize> = p.misses.iter().map(|m| m.rule).collect();
        assert_eq!(idx, (0..idx.len()).collect::<Vec<_>>(), "{what}: {e:?}");
        for m in &p.misses {
            assert!(
                !m.reason.is_empty(),
                "{what}: a miss without a reason: {e:?}"
            );
        }
    }
    // Every rule of an unmatched policy says why; a matched policy lists the rules before the
    // one that matched.
    let full = |p: &PolicyTrace| p.misses.len() == p.rules;
    // AUDIT: all evaluated, up to the first that matched.
    let audits: Vec<_> = traced(Action::Audit).collect();
    match &d.audit {
        Some(name) => {
            let last = audits.last().expect("the audit policy is traced");
            assert_eq!(&last.name, name, "{what}");
            assert!(!full(last), "{what}: {e:?}");
            assert!(audits[..audits.len() - 1].iter().all(|p| full(p)), "{what}");
        }
        None => {
            assert_eq!(audits.len(), count(Action::Audit), "{what}");
            assert!(audits.iter().all(|p| full(p)), "{what}: {e:?}");
        }
    }
    let denies: Vec<_> = traced(Action::Deny).collect();
    let allows: Vec<_> = traced(Action::Allow).collect();
    match (&d.policy, d.rule) {
        (Some(name), Some(rule)) if !d.allowed => {
            let last = denies.last().expect("the deciding DENY policy is traced");
            assert_eq!(&last.name, name, "{what}");
            assert_eq!(last.misses.len(), rule, "{what}: {e:?}");
            assert!(denies[..denies.len() - 1].iter().all(|p| full(p)), "{what}");
            assert!(allows.is_empty(), "{what}: evaluation stops at a DENY");
        }
        (Some(name), Some(rule)) => {
            assert_eq!(denies.len(), count(Action::Deny), "{what}");
            assert!(denies.iter().all(|p| full(p)), "{what}: {e:?}");
            let last = allows.last().expect("the deciding ALLOW policy is traced");
            assert_eq!(&last.name, name, "{what}");
            assert_eq!(last.misses.len(), rule, "{what}: {e:?}");
            assert!(allows[..allows.len() - 1].iter().all(|p| full(p)), "{what}");
        }
        (None, _) => {
            assert_eq!(denies.len(), count(Action::Deny), "{what}");
            assert!(denies.iter().all(|p| full(p)), "{what}: {e:?}");
            if d.by_default {
                assert!(allows.is_empty() && count(Action::Allow) == 0, "{what}");
            } else {
                // No ALLOW policy matched: every rule of every ALLOW policy says why.
                assert!(!d.allowed, "{what}");
                assert_eq!(allows.len(), count(Action::Allow), "{what}");
                assert!(allows.iter().all(|p| full(p)), "{what}: {e:?}");
            }
        }
        (Some(_), None) => panic!("{what}: a deciding policy without a rule: {d:?}"),
    }
}

#[test]
fn explanations_agree_with_decisions_over_the_tables() {
    let mut cases = 0;
    for (default, yaml) in policy_tables() {
        let a = authz(default, &yaml);
        for r in table_requests() {
            let what = format!(
                "{default:?} {yaml}\n{:?} {} {} port {} host {} ip {} {:?}",
                r.peer, r.method, r.path, r.port, r.host, r.ip, r.headers
            );
            let e = explain_http(&a, &r);
            assert_eq!(e.decision, http(&a, &r), "{what}");
            assert_consistent(&a, &e, &what);
            let e = explain_tcp(&a, &r);
            assert_eq!(e.decision, tcp_ip(&a, &r), "TCP {what}");
            assert_consistent(&a, &e, &format!("TCP {what}"));
            cases += 2;
        }
    }
    assert!(cases > 1000, "{cases}");
}

#[test]
fn the_wire_form_decides_and_explains_as_the_policies_as_written() {
    let mut cases = 0;
    for (default, yaml) in policy_tables() {
        let ps = policies(&yaml);
        let written = Authorizer::compile_spec(default, &ps).expect("compiles");
        let sent = Authorizer::compile(default, &wire(&ps)).expect("compiles");
        assert_eq!(
            written.policies().collect::<Vec<_>>(),
            sent.policies().collect::<Vec<_>>()
        );
        for r in table_requests() {
            let what = format!("{default:?} {yaml}\n{:?} {} {}", r.peer, r.method, r.path);
            assert_eq!(
                explain_http(&written, &r),
                explain_http(&sent, &r),
                "{what}"
            );
            assert_eq!(
                explain_tcp(&written, &r),
                explain_tcp(&sent, &r),
                "TCP {what}"
            );
            cases += 2;
        }
    }
    assert!(cases > 1000, "{cases}");
}

#[test]
fn wire_values_a_policy_cannot_hold_are_refused_naming_the_field() {
    let ps = policies(&pol(
        "DENY",
        "  rules:\n    - from: [ { source: { namespaces: [\"demo\"] } }, { source: { principals: [\"cluster.local/ns/demo/sa/web\"], ipBlocks: [\"10.0.0.0/8\"] } } ]\n      to: [ { operation: { ports: [\"8080\"] } } ]\n      when: [ { key: source.principal, values: [\"*\"] }, { key: \"request.headers[x-a]\", values: [\"b\"] } ]\n",
    ));
    let base = wire(&ps);
    let with = |edit: &dyn Fn(&mut v1::Rule)| {
        let mut w = vec![base[0].clone(), base[0].clone()];
        edit(&mut w[1].rules[0]);
        Authorizer::compile(DefaultPolicy::Allow, &w)
            .map(|_| ())
            .expect_err("refused")
            .to_string()
    };
    let source = |r: &mut v1::Rule| r.from[1].source.clone().expect("source");
    use v1::string_match::MatchType;
    for (edit, field, why) in [
        (
            Box::new(|r: &mut v1::Rule| {
                let mut s = source(r);
                s.principals[0].match_type = None;
                r.from[1].source = Some(s);
            }) as Box<dyn Fn(&mut v1::Rule)>,
            "authorization_policies[1].rules[0].from[1].source.principals[0]",
            "no match type",
        ),
        (
            Box::new(|r: &mut v1::Rule| {
                let mut s = source(r);
                s.principals[0].match_type = Some(MatchType::Exact(
                    "spiffe://cluster.local/ns/demo/sa/web".into(),
                ));
                r.from[1].source = Some(s);
            }),
            "authorization_policies[1].rules[0].from[1].source.principals[0]",
            "without the `spiffe://` scheme",
        ),
        (
            Box::new(|r: &mut v1::Rule| {
                let mut s = source(r);
                s.ip_blocks[0].address.push(0);
                r.from[1].source = Some(s);
            }),
            "authorization_policies[1].rules[0].from[1].source.ip_blocks[0]",
            "4 or 16 bytes",
        ),
        (
            Box::new(|r: &mut v1::Rule| r.from[0].source = None),
            "authorization_policies[1].rules[0].from[0].source",
            "missing",
        ),
        (
            Box::new(|r: &mut v1::Rule| {
                let mut o = r.to[0].operation.clone().expect("operation");
                o.ports.push(70000);
                r.to[0].operation = Some(o);
            }),
            "authorization_policies[1].rules[0].to[0].operation.ports[1]",
            "70000 is not a port",
        ),
        (
            Box::new(|r: &mut v1::Rule| r.when[1].key = None),
            "authorization_policies[1].rules[0].when[1]",
            "no key",
        ),
        (
            Box::new(|r: &mut v1::Rule| {
                if let Some(v1::condition::Key::RequestHeader(h)) = &mut r.when[1].key {
                    h.name = "bad header".into();
                }
            }),
            "authorization_policies[1].rules[0].when[1].request_header.name",
            "bad header name",
        ),
    ] {
        let e = with(&*edit);
        assert!(
            e.starts_with(&format!("policy demo/p: {field}: ")) && e.contains(why),
            "{e}"
        );
    }
    let mut w = base.clone();
    w[0].action = 7;
    let e = Authorizer::compile(DefaultPolicy::Allow, &w).expect_err("unknown action");
    assert_eq!(
        e.to_string(),
        "policy demo/p: authorization_policies[0].action: unknown value 7"
    );
}

fn tcp_ip(a: &Authorizer, r: &Req<'_>) -> Decision {
    a.authorize_tcp(&ConnContext {
        peer: r.peer,
        source_ip: r.ip.parse().expect("ip"),
        dest_port: r.port,
    })
}

/// The reasons of the ALLOW policy `demo/p` for a request it did not allow.
fn reasons(a: &Authorizer, r: &Req<'_>) -> Vec<String> {
    let e = explain_http(a, r);
    assert!(!e.decision.allowed, "{e:?}");
    e.allow_policies()
        .flat_map(|p| p.misses.iter().map(|m| m.reason.clone()))
        .collect()
}

#[test]
fn explanations_name_the_first_condition_that_failed() {
    let db = authz(
        DefaultPolicy::Allow,
        &pol(
            "ALLOW",
            "  rules:\n    - from: [ { source: { principals: [\"cluster.local/ns/demo/sa/api\"] } } ]\n      to: [ { operation: { methods: [\"GET\", \"HEAD\"] } } ]\n",
        ),
    );
    assert_eq!(
        reasons(&db, &GET),
        ["principals [cluster.local/ns/demo/sa/api] does not contain cluster.local/ns/demo/sa/web"]
    );
    assert_eq!(
        reasons(
            &db,
            &Req {
                peer: Some(API),
                method: "POST",
                ..GET
            }
        ),
        ["methods [GET, HEAD] does not contain POST"]
    );
    assert_eq!(
        reasons(&db, &Req { peer: None, ..GET }),
        ["principals [cluster.local/ns/demo/sa/api]: the caller has no mTLS identity (plaintext)"]
    );

    // Several sources: each says why; a source that matched silences the earlier ones.
    let a = authz(
        DefaultPolicy::Deny,
        &pol(
            "ALLOW",
            "  rules:\n    - from: [ { source: { principals: [\"cluster.local/ns/demo/sa/api\"] } }, { source: { namespaces: [\"prod\"] } } ]\n      to: [ { operation: { notPaths: [\"/admin*\"], ports: [\"8080\"] } } ]\n      when: [ { key: \"request.headers[x-user]\", values: [\"alice\"] } ]\n",
        ),
    );
    assert_eq!(
        reasons(&a, &GET),
        [
            "from[0]: principals [cluster.local/ns/demo/sa/api] does not contain cluster.local/ns/demo/sa/web; from[1]: namespaces [prod] does not contain demo"
        ]
    );
    let prod = Req {
        peer: Some(OTHER_NS),
        ..GET
    };
    assert_eq!(
        reasons(
            &a,
            &Req {
                path: "/admin/x",
                ..prod
            }
        ),
        ["notPaths [/admin*] contains /admin/x"]
    );
    assert_eq!(
        reasons(&a, &Req { port: 9090, ..prod }),
        ["ports [8080] does not contain 9090"]
    );
    assert_eq!(
        reasons(&a, &prod),
        ["when request.headers[x-user] values [alice]: the request has no such header"]
    );
    assert_eq!(
        reasons(
            &a,
            &Req {
                headers: &[("x-user", "eve"), ("x-user", "alice")],
                ..prod
            }
        ),
        ["when request.headers[x-user] values [alice] does not contain eve,alice"]
    );

    // Two rules, each with its reason; TCP and HTTP-only fields; IPs; hosts.
    let a = authz(
        DefaultPolicy::Deny,
        &pol(
            "ALLOW",
            "  rules:\n    - to: [ { operation: { hosts: [\"*.demo\"] } } ]\n    - from: [ { source: { ipBlocks: [\"10.0.0.0/8\"], notIpBlocks: [\"10.1.0.0/16\"] } } ]\n",
        ),
    );
    assert_eq!(
        reasons(
            &a,
            &Req {
                host: "api.prod",
                ..GET
            }
        ),
        [
            "hosts [*.demo] does not contain api.prod",
            "notIpBlocks [10.1.0.0/16] contains 10.1.2.3"
        ]
    );
    let e = a.explain_tcp(&ConnContext {
        peer: Some(WEB),
        source_ip: "192.168.0.1".parse().expect("ip"),
        dest_port: 8080,
    });
    let got: Vec<_> = e.policies[0].misses.iter().map(|m| &*m.reason).collect();
    assert_eq!(
        got,
        [
            "it uses HTTP-only fields (methods, paths, hosts or request headers), so as an ALLOW rule it cannot match a TCP connection",
            "ipBlocks [10.0.0.0/8] does not contain 192.168.0.1"
        ]
    );
}

#[test]
fn an_allow_policy_without_rules_is_traced_with_none() {
    let a = authz(DefaultPolicy::Allow, &pol("ALLOW", ""));
    let e = explain_http(&a, &GET);
    assert!(!e.decision.allowed);
    let p: Vec<_> = e.allow_policies().collect();
    assert_eq!(p.len(), 1);
    assert_eq!(
        (&*p[0].name, p[0].rules, p[0].misses.len()),
        ("demo/p", 0, 0)
    );
}
