//! The typed wire form of AuthorizationPolicies, as a property: for random policy sets and
//! requests, a policy converted by the control plane's conversion, encoded, decoded and compiled
//! by the proxy decides — and explains — exactly as the same policy compiled as written. And
//! the wire form reads back as a policy that converts to the same wire form (what `/config`
//! shows is what the proxy holds).

use http::{HeaderMap, HeaderName, HeaderValue};
use palisade_api::policy::{
    Action, AuthorizationPolicy, AuthorizationPolicySpec, Condition, DefaultPolicy, ObjectMeta,
    Operation, Rule, RuleFrom, RuleTo, Source,
};
use palisade_api::v1;
use palisade_proxy::authz::{Authorizer, ConnContext, HttpContext};
use proptest::prelude::*;
use prost::Message;

const PRINCIPALS: &[&str] = &[
    "cluster.local/ns/demo/sa/web",
    "spiffe://cluster.local/ns/demo/sa/api",
    "cluster.local/ns/demo/*",
    "spiffe://cluster.local/*",
    "*/sa/web",
    "*",
    "spiffe://*",
    "other.example/ns/demo/sa/web",
    "cluster.local/ns/prod/sa/web",
];
const NAMESPACES: &[&str] = &["demo", "prod", "de*", "*od", "*"];
const IP_BLOCKS: &[&str] = &[
    "10.0.0.0/8",
    "10.1.2.3",
    "10.1.2.3/8",
    "192.168.0.0/16",
    "0.0.0.0/0",
    "::1",
    "fd00::/8",
];
const HOSTS: &[&str] = &["api.demo", "*.demo", "API.demo", "api*", "*"];
const METHODS: &[&str] = &["GET", "POST", "DELETE", "G*", "*"];
const PATHS: &[&str] = &["/", "/api/*", "*.png", "/admin", "*"];
const PORTS: &[&str] = &["8080", "9090", "443"];
const ROUTES: &[&str] = &["demo/api", "demo/api/canary", "demo/*", "*/0", "*"];
const HEADER_VALUES: &[&str] = &["alice", "bob*", "*", "tenant-a", "tenant-a,tenant-b", "*-b"];
const PORT_PATTERNS: &[&str] = &["8080", "80*", "*443", "*"];

fn some_of(pool: &'static [&'static str]) -> impl Strategy<Value = Vec<String>> {
    // Mostly empty, so that sources and operations match often enough to matter.
    prop_oneof![
        3 => Just(Vec::new()),
        1 => prop::collection::vec(prop::sample::select(pool).prop_map(String::from), 1..=2),
    ]
}

fn source() -> impl Strategy<Value = Source> {
    (
        some_of(PRINCIPALS),
        some_of(PRINCIPALS),
        some_of(NAMESPACES),
        some_of(NAMESPACES),
        some_of(IP_BLOCKS),
        some_of(IP_BLOCKS),
    )
        .prop_map(|(p, np, n, nn, ip, nip)| Source {
            principals: p,
            not_principals: np,
            namespaces: n,
            not_namespaces: nn,
            ip_blocks: ip,
            not_ip_blocks: nip,
        })
}

fn operation() -> impl Strategy<Value = Operation> {
    (
        (some_of(HOSTS), some_of(HOSTS)),
        (some_of(PORTS), some_of(PORTS)),
        (some_of(METHODS), some_of(METHODS)),
        (some_of(PATHS), some_of(PATHS)),
        (some_of(ROUTES), some_of(ROUTES)),
    )
        .prop_map(
            |((h, nh), (po, npo), (m, nm), (pa, npa), (ro, nro))| Operation {
                routes: ro,
                not_routes: nro,
                hosts: h,
                not_hosts: nh,
                ports: po,
                not_ports: npo,
                methods: m,
                not_methods: nm,
                paths: pa,
                not_paths: npa,
            },
        )
}

fn condition() -> impl Strategy<Value = Condition> {
    let key = prop::sample::select(
        &[
            "request.headers[x-user]",
            "request.headers[X-Tenant]",
            "source.ip",
            "source.namespace",
            "source.principal",
            "destination.port",
        ][..],
    );
    (key, any::<bool>()).prop_flat_map(|(key, not)| {
        let pool: &'static [&'static str] = match key {
            "source.ip" => IP_BLOCKS,
            "source.namespace" => NAMESPACES,
            "source.principal" => PRINCIPALS,
            "destination.port" => PORT_PATTERNS,
            _ => HEADER_VALUES,
        };
        let values =
            prop::collection::vec(prop::sample::select(pool).prop_map(String::from), 1..=2);
        (values, some_of(pool)).prop_map(move |(a, b)| {
            let (values, not_values) = if not { (b, a) } else { (a, b) };
            Condition {
                key: key.to_string(),
                values,
                not_values,
            }
        })
    })
}

fn rule() -> impl Strategy<Value = Rule> {
    (
        prop::collection::vec(source(), 0..=2),
        prop::collection::vec(operation(), 0..=2),
        prop::collection::vec(condition(), 0..=2),
    )
        .prop_map(|(from, to, when)| Rule {
            from: from.into_iter().map(|source| RuleFrom { source }).collect(),
            to: to
                .into_iter()
                .map(|operation| RuleTo { operation })
                .collect(),
            when,
        })
}

fn policy() -> impl Strategy<Value = AuthorizationPolicy> {
    (
        prop::sample::select(&[Action::Allow, Action::Deny, Action::Audit][..]),
        prop::option::of(prop::collection::vec(rule(), 0..=3)),
        prop::option::of(prop::sample::select(&["demo", "palisade-system"][..])),
    )
        .prop_map(|(action, rules, namespace)| AuthorizationPolicy {
            api_version: palisade_api::policy::API_VERSION.into(),
            kind: "AuthorizationPolicy".into(),
            metadata: ObjectMeta {
                name: "p".into(),
                namespace: namespace.map(String::from),
                ..Default::default()
            },
            spec: AuthorizationPolicySpec {
                selector: None,
                action,
                rules,
            },
        })
}

fn policies() -> impl Strategy<Value = Vec<AuthorizationPolicy>> {
    prop::collection::vec(policy(), 0..=4).prop_map(|mut ps| {
        // Distinct names, so a decision names which policy decided.
        for (i, p) in ps.iter_mut().enumerate() {
            p.metadata.name = format!("p{i}");
        }
        ps
    })
}

type Headers = &'static [(&'static str, &'static str)];

const HEADER_SETS: &[Headers] = &[
    &[],
    &[("x-user", "alice")],
    &[("x-user", "bobby"), ("x-tenant", "tenant-a")],
    &[("x-tenant", "tenant-a"), ("x-tenant", "tenant-b")],
];

#[derive(Debug, Clone)]
struct Req {
    peer: Option<&'static str>,
    ip: &'static str,
    port: u16,
    method: &'static str,
    path: &'static str,
    host: &'static str,
    headers: Headers,
    route: Option<&'static str>,
}

fn request() -> impl Strategy<Value = Req> {
    (
        prop::sample::select(
            &[
                Some("spiffe://cluster.local/ns/demo/sa/web"),
                Some("spiffe://cluster.local/ns/demo/sa/api"),
                Some("spiffe://cluster.local/ns/prod/sa/web"),
                Some("spiffe://other.example/ns/demo/sa/web"),
                None,
            ][..],
        ),
        prop::sample::select(&["10.1.2.3", "192.168.1.1", "172.16.0.1", "::1", "fd00::5"][..]),
        prop::sample::select(&[8080u16, 9090, 443, 80][..]),
        prop::sample::select(&["GET", "POST", "DELETE", "HEAD"][..]),
        prop::sample::select(&["/", "/api/x?q=1", "/img/a.png", "/admin", "/API/x"][..]),
        prop::sample::select(&["api.demo", "API.demo:8080", "db.internal", ""][..]),
        prop::sample::select(HEADER_SETS),
        prop::sample::select(
            &[
                None,
                Some("demo/api/0"),
                Some("demo/api/canary"),
                Some("prod/x/0"),
            ][..],
        ),
    )
        .prop_map(|(peer, ip, port, method, path, host, headers, route)| Req {
            route,
            peer,
            ip,
            port,
            method,
            path,
            host,
            headers,
        })
}

/// Through the wire: converted, encoded as the Watch stream carries it, decoded.
fn sent(policies: &[AuthorizationPolicy]) -> Vec<v1::Authorization> {
    let inbound = v1::Inbound {
        authorization_policies: policies
            .iter()
            .map(|p| v1::Authorization::try_from(p).expect("a policy of the pools converts"))
            .collect(),
        ..Default::default()
    };
    v1::Inbound::decode(inbound.encode_to_vec().as_slice())
        .expect("decodes")
        .authorization_policies
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn the_wire_form_decides_as_the_policies_as_written(
        default in prop::sample::select(
            &[DefaultPolicy::Allow, DefaultPolicy::Deny, DefaultPolicy::Authenticated][..],
        ),
        ps in policies(),
        requests in prop::collection::vec(request(), 1..=8),
    ) {
        let wire = sent(&ps);
        let written = Authorizer::compile_spec(default, &ps).expect("compiles as written");
        let compiled = Authorizer::compile(default, &wire).expect("compiles from the wire");
        prop_assert_eq!(
            written.policies().collect::<Vec<_>>(),
            compiled.policies().collect::<Vec<_>>()
        );
        for r in &requests {
            let mut headers = HeaderMap::new();
            for (k, v) in r.headers {
                headers.append(HeaderName::from_static(k), HeaderValue::from_static(v));
            }
            let c = ConnContext {
                peer: r.peer,
                source_ip: r.ip.parse().expect("ip"),
                dest_port: r.port,
            };
            let h = HttpContext {
                method: r.method,
                path: r.path,
                host: r.host,
                headers: &headers,
                route: r.route,
            };
            prop_assert_eq!(written.authorize_http(&c, &h), compiled.authorize_http(&c, &h), "{:?}", r);
            prop_assert_eq!(written.authorize_tcp(&c), compiled.authorize_tcp(&c), "{:?}", r);
            // The explanations too: they print the patterns, which the wire must not change.
            prop_assert_eq!(written.explain_http(&c, &h), compiled.explain_http(&c, &h), "{:?}", r);
            prop_assert_eq!(written.explain_tcp(&c), compiled.explain_tcp(&c), "{:?}", r);
        }
    }

    #[test]
    fn the_wire_form_reads_back_as_a_policy_with_the_same_wire_form(ps in policies()) {
        for a in sent(&ps) {
            let back = AuthorizationPolicy::try_from(&a).expect("reads back");
            prop_assert_eq!(v1::Authorization::try_from(&back), Ok(a));
        }
    }
}
