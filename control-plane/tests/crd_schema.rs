//! The CRDs' OpenAPI schemas against the policy parser, with independent validators: the
//! `jsonschema` crate for the OpenAPI part, and kube's CEL evaluator (`kube-cel`) for the
//! `x-kubernetes-validations` rules, as the API server runs them.
//!
//! Unknown fields: a structural schema cannot say `additionalProperties: false` next to
//! `properties`; the API server instead prunes unknown fields, and with strict field
//! validation (what `kubectl apply` asks for by default) refuses them. [`strict`] adds
//! `additionalProperties: false` to every object of the schema's core to run that check here.

use std::path::Path;

use palisade_api::policy;
use palisade_control_plane::k8s::crd;
use serde_json::{Value, json};

fn crd_schema(kind: &str) -> Value {
    let crd = crd::crds()
        .into_iter()
        .find(|c| c.spec.names.kind == kind)
        .unwrap_or_else(|| panic!("no CRD for {kind}"));
    let crd = serde_json::to_value(crd).expect("CRD as JSON");
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

/// The API server's strict field validation: unknown fields are errors, at every level of the
/// core schema (not inside `anyOf` branches, which only add constraints to core fields).
fn strict(schema: &mut Value, root: bool) {
    let Some(map) = schema.as_object_mut() else {
        return;
    };
    if map.contains_key("properties") && !root {
        map.insert("additionalProperties".into(), json!(false));
    }
    if let Some(Value::Object(props)) = map.get_mut("properties") {
        props.values_mut().for_each(|p| strict(p, false));
    }
    if let Some(items) = map.get_mut("items") {
        strict(items, false);
    }
    if let Some(ap) = map.get_mut("additionalProperties")
        && ap.is_object()
    {
        strict(ap, false);
    }
}

struct Schema {
    raw: Value,
    validator: jsonschema::Validator,
}

impl Schema {
    fn new(kind: &'static str) -> Self {
        let raw = crd_schema(kind);
        let mut strict_schema = raw.clone();
        strict(&mut strict_schema, true);
        let validator = jsonschema::draft4::new(&strict_schema).expect("a valid JSON schema");
        Self { raw, validator }
    }

    /// The errors the API server would answer for this spec (OpenAPI, then CEL).
    fn errors(&self, spec: &Value) -> Vec<String> {
        let object = json!({ "spec": spec });
        let mut errors: Vec<String> = self
            .validator
            .iter_errors(&object)
            .map(|e| format!("{}: {e}", e.instance_path()))
            .collect();
        if errors.is_empty()
            && let Err(cel) = kube_cel::validate(&self.raw, &object, None)
        {
            errors.extend(cel.into_vec().into_iter().map(|e| format!("{e:?}")));
        }
        errors
    }
}

fn parser_errors(kind: &str, spec: &Value) -> Vec<policy::PolicyError> {
    let doc = json!({
        "apiVersion": "palisade.dev/v1alpha1",
        "kind": kind,
        "metadata": { "name": "p", "namespace": "demo" },
        "spec": spec,
    });
    let text = serde_json::to_string(&doc).expect("json");
    policy::parse_str(Path::new("p.yaml"), &text)
        .err()
        .unwrap_or_default()
}

fn yaml(text: &str) -> Value {
    serde_saphyr::from_str(text).unwrap_or_else(|e| panic!("bad test YAML {text}: {e}"))
}

#[test]
fn demo_policies_are_accepted() {
    let authz = Schema::new("AuthorizationPolicy");
    let peer = Schema::new("PeerAuthentication");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/local/policies");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("deploy/local/policies") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("read");
        let docs: Vec<Value> = serde_saphyr::from_multiple(&text).expect("YAML");
        for doc in docs.into_iter().filter(|d| !d.is_null()) {
            let schema = match doc["kind"].as_str() {
                Some("AuthorizationPolicy") => &authz,
                Some("PeerAuthentication") => &peer,
                other => panic!("{}: unexpected kind {other:?}", path.display()),
            };
            let errors = schema.errors(&doc["spec"]);
            assert!(errors.is_empty(), "{}: {errors:?}", path.display());
            seen += 1;
        }
    }
    assert!(
        seen >= 3,
        "only {seen} demo policies found in {}",
        dir.display()
    );
}

/// Policies the parser refuses, and that the API server must refuse too.
#[test]
fn invalid_policies_are_refused_by_the_schema_as_by_the_parser() {
    let authz_cases: &[(&str, &str)] = &[
        ("action is an enum", "action: REJECT"),
        ("CUSTOM is not supported", "action: CUSTOM"),
        (
            "provider is not supported",
            "action: DENY\nprovider: { name: x }",
        ),
        ("unknown spec field", "action: DENY\nrule: []"),
        (
            "unknown selector field",
            "selector: { labels: { app: db } }",
        ),
        (
            "label values are strings",
            "selector: { matchLabels: { app: 1 } }",
        ),
        ("rules is a list", "rules: x"),
        ("unknown rule field", "rules: [ { form: [] } ]"),
        ("from needs source", "rules: [ { from: [ {} ] } ]"),
        ("to needs operation", "rules: [ { to: [ {} ] } ]"),
        (
            "unknown source field",
            "rules: [ { from: [ { source: { principal: [a/b] } } ] } ]",
        ),
        (
            "unknown operation field",
            "rules: [ { to: [ { operation: { method: [GET] } } ] } ]",
        ),
        (
            "port out of range",
            "rules: [ { to: [ { operation: { ports: ['80800'] } } ] } ]",
        ),
        (
            "port zero",
            "rules: [ { to: [ { operation: { notPorts: ['0'] } } ] } ]",
        ),
        (
            "port not a number",
            "rules: [ { to: [ { operation: { ports: [http] } } ] } ]",
        ),
        (
            "wildcard inside",
            "rules: [ { to: [ { operation: { paths: ['/a*pi'] } } ] } ]",
        ),
        (
            "wildcard at both ends",
            "rules: [ { to: [ { operation: { hosts: ['*a*'] } } ] } ]",
        ),
        (
            "empty pattern",
            "rules: [ { to: [ { operation: { methods: [''] } } ] } ]",
        ),
        (
            "principal that can never match",
            "rules: [ { from: [ { source: { principals: ['cluster.local/ns/demo/sa/api/'] } } ] } ]",
        ),
        (
            "principal with upper-case trust domain",
            "rules: [ { from: [ { source: { notPrincipals: ['Cluster.Local/ns/demo/sa/api'] } } ] } ]",
        ),
        (
            "namespace with a slash",
            "rules: [ { from: [ { source: { namespaces: ['de/mo'] } } ] } ]",
        ),
        (
            "bad CIDR",
            "rules: [ { from: [ { source: { ipBlocks: ['10.0.0/33'] } } ] } ]",
        ),
        (
            "not an IP",
            "rules: [ { from: [ { source: { notIpBlocks: ['not-an-ip'] } } ] } ]",
        ),
        (
            "condition needs a key",
            "rules: [ { when: [ { values: [a] } ] } ]",
        ),
        (
            "unsupported condition key",
            "rules: [ { when: [ { key: 'request.auth.claims[iss]', values: [a] } ] } ]",
        ),
        (
            "empty header name",
            "rules: [ { when: [ { key: 'request.headers[]', values: [a] } ] } ]",
        ),
        (
            "condition needs values or notValues",
            "rules: [ { when: [ { key: source.ip } ] } ]",
        ),
        (
            "misspelt values (pruned, then no values)",
            "rules: [ { when: [ { key: source.ip, valeus: [a] } ] } ]",
        ),
        (
            "source.principal values are principals",
            "rules: [ { when: [ { key: source.principal, values: ['cluster.local//ns'] } ] } ]",
        ),
        (
            "source.namespace notValues are namespaces",
            "rules: [ { when: [ { key: source.namespace, notValues: ['d*o'] } ] } ]",
        ),
        (
            "header values are wildcard patterns",
            "rules: [ { when: [ { key: 'request.headers[x-a]', values: ['**'] } ] } ]",
        ),
    ];
    let peer_cases: &[(&str, &str)] = &[
        ("mode is an enum", "mtls: { mode: LAX }"),
        ("unknown mtls field", "mtls: { mod: STRICT }"),
        ("unknown spec field", "mtl: { mode: STRICT }"),
        (
            "port-level mTLS needs a selector",
            "portLevelMtls: { '8080': { mode: DISABLE } }",
        ),
        (
            "port-level keys are ports",
            "selector: { matchLabels: { app: db } }\nportLevelMtls: { http: { mode: DISABLE } }",
        ),
        (
            "port-level key zero",
            "selector: { matchLabels: { app: db } }\nportLevelMtls: { '0': { mode: DISABLE } }",
        ),
        (
            "port-level key out of range",
            "selector: { matchLabels: { app: db } }\nportLevelMtls: { '70000': { mode: DISABLE } }",
        ),
        (
            "port-level key with a sign",
            "selector: { matchLabels: { app: db } }\nportLevelMtls: { '+8080': { mode: DISABLE } }",
        ),
        (
            "port-level key with a leading zero",
            "selector: { matchLabels: { app: db } }\nportLevelMtls: { '08080': { mode: DISABLE } }",
        ),
        (
            "port-level mode is an enum",
            "selector: { matchLabels: { app: db } }\nportLevelMtls: { '8080': { mode: OFF } }",
        ),
    ];
    for (kind, cases) in [
        ("AuthorizationPolicy", authz_cases),
        ("PeerAuthentication", peer_cases),
    ] {
        let schema = Schema::new(kind);
        for (what, spec) in cases {
            let spec = yaml(spec);
            let by_parser = parser_errors(kind, &spec);
            assert!(
                !by_parser.is_empty(),
                "{kind}: {what}: the parser accepts {spec}"
            );
            let by_schema = schema.errors(&spec);
            assert!(
                !by_schema.is_empty(),
                "{kind}: {what}: the CRD schema accepts {spec}, the parser says {by_parser:?}"
            );
        }
    }
}

/// Valid policies in the corners of the rules, accepted by both.
#[test]
fn valid_policies_are_accepted_by_both() {
    let cases: &[(&str, &str)] = &[
        ("AuthorizationPolicy", "{}"),
        ("AuthorizationPolicy", "action: AUDIT\nrules: [ {} ]"),
        (
            "AuthorizationPolicy",
            r#"
selector: { matchLabels: { app: db } }
action: DENY
rules:
  - from:
      - source:
          principals: ["cluster.local/ns/demo/sa/web", "spiffe://cluster.local/ns/a/*", "*/sa/api"]
          notNamespaces: ["kube-*", "*-system", "*"]
          ipBlocks: ["10.0.0.0/8", "192.168.1.1", "2001:db8::/32", "::1"]
    to:
      - operation: { methods: ["GET", "HEAD"], paths: ["/api/*", "*.css"], ports: ["8080", "+443", "065535"] }
    when:
      - { key: "request.headers[X-User]", values: ["alice", "bob*"] }
      - { key: source.principal, notValues: ["other.example/*"] }
      - { key: source.namespace, values: ["demo"] }
      - { key: destination.port, values: ["8080"] }
      - { key: source.ip, notValues: [] }
"#,
        ),
        ("PeerAuthentication", "{}"),
        ("PeerAuthentication", "mtls: {}"),
        (
            "PeerAuthentication",
            "selector: { matchLabels: { app: db } }\nmtls: { mode: PERMISSIVE }\nportLevelMtls: { '8080': { mode: DISABLE }, '65535': { mode: STRICT } }",
        ),
        ("PeerAuthentication", "portLevelMtls: {}"),
    ];
    for (kind, spec) in cases {
        let spec = yaml(spec);
        let by_parser = parser_errors(kind, &spec);
        assert!(
            by_parser.is_empty(),
            "{kind}: the parser refuses {spec}: {by_parser:?}"
        );
        let errors = Schema::new(kind).errors(&spec);
        assert!(
            errors.is_empty(),
            "{kind}: the schema refuses {spec}: {errors:?}"
        );
    }
}

/// Where the schema and the parser are allowed to disagree: the list docs/kubernetes.md gives.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Known {
    /// Both agree.
    Agree,
    /// Only the control plane's parser refuses it (the schema cannot say it).
    ParserOnly,
    /// Only the schema refuses it (on Kubernetes, an empty `source` or `operation`).
    SchemaOnly,
}

/// One string value in each string field, against a long list of values: whenever the parser
/// refuses a value, the schema refuses it too, except the documented `ParserOnly` cases.
#[test]
fn every_string_field_agrees_with_the_parser() {
    let principals = [
        "cluster.local/ns/demo/sa/api",
        "spiffe://cluster.local/ns/demo/sa/api",
        "cluster.local/ns/Demo/sa/API.v2_x-y",
        "*",
        "spiffe://*",
        "cluster.local/ns/demo/*",
        "cluster.local/ns/demo/sa/ap*",
        "cluster.local*",
        "clu*",
        "*/sa/api",
        "*api",
        "*.local/ns/demo/sa/api",
        "spiffe://*/sa/api",
        "spiffex/ns/a",
        "a/..x",
        "a/.x/..y/...",
        "cluster.local/ns/demo/sa/api/",
        "spiffe://Cluster.Local/ns/demo/sa/api",
        "cluster.local:8080/ns/demo/sa/api",
        "spiffe://spiffe://cluster.local/ns/demo",
        "SPIFFE://cluster.local/ns/demo/sa/api",
        "spiffe:/cluster.local/ns/demo/sa/api",
        "spiffe://",
        "cluster.local",
        "spiffe://cluster.local",
        "/ns/demo/sa/api",
        "cluster.local//ns/demo/sa/api",
        "cluster.local/ns/../sa/api",
        "cluster.local/ns/./sa",
        "cluster.local/ns/demo/sa/my api",
        "cluster.local/ns/demo/sa/apí",
        "cluster.local/ns/demo/sa/api?x=1",
        "Cluster*",
        "cluster.local/ns//*",
        "cluster.local/ns/./*",
        "*/sa/api/",
        "*//sa/api",
        "*/../sa/api",
        "*:8080/ns/demo/sa/api",
        "cluster.local/ns/*/sa/api",
        "*cluster.local/ns/demo/*",
        "**",
        "",
        "/",
        "*/",
        "*.",
        "*/.",
    ];
    let namespaces = [
        "demo",
        "kube-system",
        "Demo",
        "a.b_c",
        "*",
        "de*",
        "*mo",
        "de.*",
        "*.x",
        "...",
        "de/mo",
        "demo/",
        "de/*",
        "*/mo",
        ".",
        "..",
        "de mo",
        "démo",
        "de:*",
        "d*o",
        "",
        "**",
    ];
    let wildcards = [
        "/api", "/api/*", "*.css", "*", "GET", "/é", "é", "*é", "/é*", "*é*", "/é*x", "**",
        "/a*pi", "*a*", "", "a b", "\t",
    ];
    let ports = [
        "1",
        "80",
        "8080",
        "65535",
        "+80",
        "0080",
        "0",
        "00",
        "65536",
        "99999999999",
        "-1",
        " 80",
        "80 ",
        "http",
        "",
        "8o",
        "+",
    ];
    let ip_blocks = [
        "10.0.0.0/8",
        "10.0.0.1",
        "0.0.0.0/0",
        "255.255.255.255/32",
        "10.0.0.1/8",
        "::1",
        "::",
        "2001:db8::/32",
        "::ffff:1.2.3.4",
        "fe80::1/64",
        "10.0.0/33",
        "10.0.0.0/33",
        "256.0.0.1",
        "01.0.0.0",
        "10.0.0.0/",
        "not-an-ip",
        "",
        "10.0.0.0/8/8",
        "fe80::1%eth0",
        "2001:db8::/129",
    ];
    // What the schema cannot say; the control plane's parser still refuses these.
    let parser_only_ips = [":::", "1::2::3", "12345::", "1:2:3:4:5:6:7:8:9", "::1.2.3"];
    let condition_keys = [
        "request.headers[x-user]",
        "request.headers[X-User]",
        "request.headers[a!#$%&'*+.^_`|~-]",
        "source.ip",
        "source.namespace",
        "source.principal",
        "destination.port",
        "request.headers[]",
        "request.headers[a b]",
        "request.headers[a]]",
        "request.headers[x",
        "request.auth.claims[iss]",
        "source.principals",
        "",
    ];

    let authz = Schema::new("AuthorizationPolicy");
    let mut checked = 0;
    let mut check = |what: String, spec: Value, expected: Known| {
        let parser = parser_errors("AuthorizationPolicy", &spec);
        let schema = authz.errors(&spec);
        let got = match (parser.is_empty(), schema.is_empty()) {
            (true, true) | (false, false) => Known::Agree,
            (false, true) => Known::ParserOnly,
            (true, false) => Known::SchemaOnly,
        };
        assert_eq!(
            got, expected,
            "{what}: parser {parser:?}, schema {schema:?}"
        );
        checked += 1;
    };
    let source =
        |field: &str, v: &str| json!({ "rules": [ { "from": [ { "source": { field: [v] } } ] } ] });
    let operation = |field: &str, v: &str| json!({ "rules": [ { "to": [ { "operation": { field: [v] } } ] } ] });
    let when = |key: &str, field: &str, v: &str| json!({ "rules": [ { "when": [ { "key": key, field: [v] } ] } ] });
    for v in principals {
        for f in ["principals", "notPrincipals"] {
            check(format!("{f} {v:?}"), source(f, v), Known::Agree);
        }
        for f in ["values", "notValues"] {
            check(
                format!("source.principal {f} {v:?}"),
                when("source.principal", f, v),
                Known::Agree,
            );
        }
    }
    for v in namespaces {
        for f in ["namespaces", "notNamespaces"] {
            check(format!("{f} {v:?}"), source(f, v), Known::Agree);
        }
        check(
            format!("source.namespace {v:?}"),
            when("source.namespace", "values", v),
            Known::Agree,
        );
    }
    for v in wildcards {
        for f in [
            "hosts",
            "notHosts",
            "methods",
            "notMethods",
            "paths",
            "notPaths",
        ] {
            check(format!("{f} {v:?}"), operation(f, v), Known::Agree);
        }
        for key in ["request.headers[x-a]", "destination.port"] {
            check(
                format!("{key} {v:?}"),
                when(key, "notValues", v),
                Known::Agree,
            );
        }
    }
    for v in ports {
        for f in ["ports", "notPorts"] {
            check(format!("{f} {v:?}"), operation(f, v), Known::Agree);
        }
    }
    for v in ip_blocks {
        for f in ["ipBlocks", "notIpBlocks"] {
            check(format!("{f} {v:?}"), source(f, v), Known::Agree);
        }
        for f in ["values", "notValues"] {
            check(
                format!("source.ip {f} {v:?}"),
                when("source.ip", f, v),
                Known::Agree,
            );
        }
    }
    for v in ["*", "/api", "10.*"] {
        check(
            format!("source.ip {v:?}"),
            when("source.ip", "values", v),
            Known::Agree,
        );
    }
    for v in parser_only_ips {
        check(
            format!("ipBlocks {v:?}"),
            source("ipBlocks", v),
            Known::ParserOnly,
        );
    }
    for k in condition_keys {
        check(format!("key {k:?}"), when(k, "values", "a"), Known::Agree);
    }
    // An empty source or operation: what pruning leaves of a misspelt field.
    check(
        "empty source".into(),
        json!({ "rules": [ { "from": [ { "source": {} } ] } ] }),
        Known::SchemaOnly,
    );
    check(
        "empty operation".into(),
        json!({ "rules": [ { "to": [ { "operation": {} } ] } ] }),
        Known::SchemaOnly,
    );
    // Istio's CRD types ports as strings; the parser also takes YAML numbers.
    check(
        "a port as a number".into(),
        json!({ "rules": [ { "to": [ { "operation": { "ports": [8080] } } ] } ] }),
        Known::SchemaOnly,
    );
    assert!(checked > 400, "only {checked} cases");
}

/// The rules of a structural schema (apiextensions.k8s.io/v1), which the API server
/// enforces on a CRD and `kubernetes-validate` does not check.
#[test]
fn the_schemas_are_structural() {
    for kind in [
        "AuthorizationPolicy",
        "PeerAuthentication",
        "HTTPFault",
        "RateLimitPolicy",
        "EgressPolicy",
    ] {
        let schema = crd_schema(kind);
        let mut problems = Vec::new();
        structural(&schema, "", &mut problems);
        assert!(problems.is_empty(), "{kind}: {problems:#?}");
        // What the API server would prune is refused by kubectl's strict field validation;
        // nothing may keep unknown fields.
        let text = schema.to_string();
        assert!(
            !text.contains("x-kubernetes-preserve-unknown-fields"),
            "{kind}"
        );
        assert!(!text.contains("x-kubernetes-embedded-resource"), "{kind}");
        // The CEL rules compile.
        let compiled = kube_cel::compile_schema(&schema);
        assert!(
            !compiled.has_errors(),
            "{kind}: {:?}",
            compiled.compilation_errors()
        );
    }
}

const JUNCTORS: &[&str] = &["allOf", "anyOf", "oneOf", "not"];
const FORBIDDEN: &[&str] = &[
    "$ref",
    "$schema",
    "definitions",
    "$defs",
    "patternProperties",
    "propertyNames",
    "dependencies",
    "additionalItems",
    "const",
    "if",
    "then",
    "else",
    "nullable",
    "uniqueItems",
];

fn structural(node: &Value, path: &str, problems: &mut Vec<String>) {
    let Some(map) = node.as_object() else {
        problems.push(format!("{path}: not an object schema"));
        return;
    };
    for k in FORBIDDEN {
        if map.contains_key(*k) {
            problems.push(format!("{path}: {k} is not allowed"));
        }
    }
    match map.get("type").and_then(Value::as_str) {
        None => problems.push(format!("{path}: no type")),
        Some("object") => {
            let shapes = ["properties", "additionalProperties"]
                .iter()
                .filter(|k| map.contains_key(**k))
                .count();
            if shapes > 1 {
                problems.push(format!("{path}: properties and additionalProperties"));
            }
            if let Some(ap) = map.get("additionalProperties") {
                match ap {
                    Value::Object(_) => structural(ap, &format!("{path}.*"), problems),
                    _ => problems.push(format!("{path}: additionalProperties must be a schema")),
                }
            }
            if let Some(Value::Object(props)) = map.get("properties") {
                for (name, p) in props {
                    structural(p, &format!("{path}.{name}"), problems);
                }
            }
        }
        Some("array") => match map.get("items") {
            Some(items) => structural(items, &format!("{path}[]"), problems),
            None => problems.push(format!("{path}: an array without items")),
        },
        Some("string" | "integer" | "number" | "boolean") => {}
        Some(other) => problems.push(format!("{path}: type {other}")),
    }
    // Without `nullable` (which `finish` strips), a null is no value of the field: an enum
    // listing one (what schemars makes of an `Option` of an enum) says something false.
    if let (Some(ty), Some(Value::Array(values))) =
        (map.get("type").and_then(Value::as_str), map.get("enum"))
    {
        for v in values {
            let fits = match ty {
                "string" => v.is_string(),
                "integer" => v.is_i64() || v.is_u64(),
                "number" => v.is_number(),
                "boolean" => v.is_boolean(),
                "object" => v.is_object(),
                "array" => v.is_array(),
                _ => true,
            };
            if !fits {
                problems.push(format!("{path}: enum value {v} is not a {ty}"));
            }
        }
    }
    for j in JUNCTORS {
        let branches: Vec<&Value> = match map.get(*j) {
            None => continue,
            Some(Value::Array(a)) => a.iter().collect(),
            Some(v) => vec![v],
        };
        for b in branches {
            junctor(b, node, &format!("{path}.{j}"), problems);
        }
    }
}

/// Inside `anyOf` and friends: value validations only, on fields the core schema has.
fn junctor(branch: &Value, core: &Value, path: &str, problems: &mut Vec<String>) {
    let Some(map) = branch.as_object() else {
        problems.push(format!("{path}: not an object schema"));
        return;
    };
    for k in [
        "type",
        "description",
        "title",
        "default",
        "nullable",
        "additionalProperties",
        "x-kubernetes-preserve-unknown-fields",
    ] {
        if map.contains_key(k) {
            problems.push(format!("{path}: {k} inside a junctor"));
        }
    }
    if let Some(Value::Object(props)) = map.get("properties") {
        for (name, p) in props {
            match core.pointer(&format!("/properties/{name}")) {
                Some(c) => junctor(p, c, &format!("{path}.{name}"), problems),
                None => problems.push(format!("{path}.{name}: not in the core schema")),
            }
        }
    }
    if let Some(items) = map.get("items") {
        match core.get("items") {
            Some(c) => junctor(items, c, &format!("{path}[]"), problems),
            None => problems.push(format!("{path}[]: items not in the core schema")),
        }
    }
}

/// The structural check itself catches what it should.
#[test]
fn the_structural_check_finds_non_structural_schemas() {
    let bad = json!({
        "type": "object",
        "properties": {
            "a": { "properties": {} },
            "b": { "type": "object", "properties": {}, "additionalProperties": false },
            "c": { "type": "array" },
            "d": { "type": "string", "anyOf": [ { "type": "string" } ] },
            "e": { "type": "object", "properties": {}, "anyOf": [ { "properties": { "z": {} } } ] },
            "f": { "type": "string", "nullable": true },
            "g": { "type": "string", "enum": ["A", null] },
        }
    });
    let mut problems = Vec::new();
    structural(&bad, "", &mut problems);
    for needle in [
        ".a: no type",
        ".b: properties and additionalProperties",
        ".c: an array without items",
        ".d.anyOf: type inside a junctor",
        ".e.anyOf.z: not in the core schema",
        ".f: nullable is not allowed",
        ".g: enum value null is not a string",
    ] {
        assert!(
            problems.iter().any(|p| p == needle),
            "{needle} not found in {problems:#?}"
        );
    }
}
