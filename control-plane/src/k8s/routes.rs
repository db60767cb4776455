//! Gateway API `HTTPRoute` and `GRPCRoute` (`gateway.networking.k8s.io/v1`) as the Kubernetes
//! source reads them: a mesh route is one with a Service among its `parentRefs` (GAMMA);
//! routes attached only to Gateways belong to a gateway controller and are left alone.
//!
//! Routing itself comes with traffic management: for now each mesh route is validated alone
//! (what the API server's CRD schema checks, and what Palisade will need: parents, matches,
//! filters, backends, weights, timeouts), kept while valid, and a bad one is refused alone
//! like a bad policy (log line, metric, Warning Event).

use serde_json::{Map, Value};

pub const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
pub const GATEWAY_VERSION: &str = "v1";

/// Which route type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RouteKind {
    Http,
    Grpc,
}

impl RouteKind {
    pub fn from_kind(kind: &str) -> Option<Self> {
        match kind {
            "HTTPRoute" => Some(Self::Http),
            "GRPCRoute" => Some(Self::Grpc),
            _ => None,
        }
    }

    pub fn kind(self) -> &'static str {
        match self {
            Self::Http => "HTTPRoute",
            Self::Grpc => "GRPCRoute",
        }
    }
}

/// A Service a route attaches to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
    /// The Service port it applies to; None for every port.
    pub port: Option<u16>,
}

/// A validated mesh route. `spec` is the object's spec as the API server has it, for the
/// router to come.
#[derive(Clone, Debug, PartialEq)]
pub struct Route {
    pub kind: RouteKind,
    pub namespace: String,
    pub name: String,
    pub parents: Vec<ServiceRef>,
    pub spec: Value,
}

impl Route {
    pub fn qualified_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// `(field, message)` of each problem.
pub type Problems = Vec<(String, String)>;

fn is_service_parent(p: &Map<String, Value>) -> bool {
    let group = p.get("group").and_then(Value::as_str).unwrap_or("");
    let kind = p.get("kind").and_then(Value::as_str).unwrap_or("Gateway");
    (group.is_empty() || group == "core") && kind == "Service"
}

/// Whether `obj` is a mesh route (a Service among its parents): only those are validated
/// and kept. Anything not shaped like a route at all is not ours either.
pub fn is_mesh_route(obj: &Value) -> bool {
    obj.pointer("/spec/parentRefs")
        .and_then(Value::as_array)
        .is_some_and(|refs| {
            refs.iter()
                .filter_map(Value::as_object)
                .any(is_service_parent)
        })
}

struct Check {
    problems: Problems,
}

impl Check {
    fn err(&mut self, field: impl Into<String>, msg: impl Into<String>) {
        self.problems.push((field.into(), msg.into()));
    }

    /// The object at `field`, or an error; unknown keys are errors too.
    fn object<'a>(
        &mut self,
        field: &str,
        v: &'a Value,
        known: &[&str],
    ) -> Option<&'a Map<String, Value>> {
        let Some(m) = v.as_object() else {
            self.err(field, "must be an object");
            return None;
        };
        for k in m.keys() {
            if !known.contains(&k.as_str()) {
                self.err(
                    format!("{field}.{k}"),
                    format!("unknown field (expected one of: {})", known.join(", ")),
                );
            }
        }
        Some(m)
    }

    fn array<'a>(&mut self, field: &str, v: Option<&'a Value>, max: usize) -> &'a [Value] {
        match v {
            None | Some(Value::Null) => &[],
            Some(Value::Array(a)) => {
                if a.len() > max {
                    self.err(field, format!("at most {max} entries (found {})", a.len()));
                }
                a
            }
            Some(_) => {
                self.err(field, "must be a list");
                &[]
            }
        }
    }

    fn string(&mut self, field: &str, v: Option<&Value>, required: bool) -> Option<String> {
        match v {
            None | Some(Value::Null) => {
                if required {
                    self.err(field, "missing");
                }
                None
            }
            Some(Value::String(s)) if s.is_empty() && required => {
                self.err(field, "must not be empty");
                None
            }
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => {
                self.err(field, "must be a string");
                None
            }
        }
    }

    fn one_of(&mut self, field: &str, v: Option<&Value>, allowed: &[&str]) -> Option<String> {
        let s = self.string(field, v, false)?;
        if !allowed.contains(&s.as_str()) {
            self.err(field, format!("{s:?} is not one of {}", allowed.join(", ")));
            return None;
        }
        Some(s)
    }

    fn int(&mut self, field: &str, v: Option<&Value>, min: i64, max: i64) -> Option<i64> {
        let v = v.filter(|v| !v.is_null())?;
        match v.as_i64() {
            Some(n) if (min..=max).contains(&n) => Some(n),
            _ => {
                self.err(field, format!("must be a whole number {min}–{max}"));
                None
            }
        }
    }

    fn port(&mut self, field: &str, v: Option<&Value>) -> Option<u16> {
        self.int(field, v, 1, 65535).map(|p| p as u16)
    }

    fn duration(&mut self, field: &str, v: Option<&Value>) {
        let Some(s) = self.string(field, v, false) else {
            return;
        };
        // Gateway API durations: 1–4 digits and a unit, repeated (`1h`, `10s`, `500ms`, `1m30s`).
        let mut rest = s.as_str();
        let mut ok = !rest.is_empty();
        while ok && !rest.is_empty() {
            let digits = rest.chars().take_while(char::is_ascii_digit).count();
            let unit = ["ms", "h", "m", "s"]
                .into_iter()
                .find(|u| rest[digits..].starts_with(u));
            match unit {
                Some(u) if (1..=5).contains(&digits) => rest = &rest[digits + u.len()..],
                _ => ok = false,
            }
        }
        if !ok {
            self.err(
                field,
                format!("{s:?} is not a Gateway API duration (like 10s, 500ms, 1m30s)"),
            );
        }
    }
}

const HTTP_FILTERS: &[&str] = &[
    "RequestHeaderModifier",
    "ResponseHeaderModifier",
    "RequestMirror",
    "RequestRedirect",
    "URLRewrite",
    "ExtensionRef",
];
const GRPC_FILTERS: &[&str] = &[
    "RequestHeaderModifier",
    "ResponseHeaderModifier",
    "RequestMirror",
    "ExtensionRef",
];
const METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// Validates one route object (as the API server serves it: `metadata`, `spec`, maybe
/// `status`) alone. Errors name the field.
pub fn parse_route(kind: RouteKind, obj: &Value) -> Result<Route, Problems> {
    let mut c = Check {
        problems: Vec::new(),
    };
    let namespace = obj
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("default")
        .to_string();
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if name.is_empty() {
        c.err("metadata.name", "missing");
    }
    let Some(spec_v) = obj.get("spec") else {
        return Err(vec![("spec".into(), "missing".into())]);
    };
    let Some(spec) = c.object("spec", spec_v, &["parentRefs", "hostnames", "rules"]) else {
        return Err(c.problems);
    };

    let mut parents = Vec::new();
    for (i, p) in c
        .array("spec.parentRefs", spec.get("parentRefs"), 32)
        .iter()
        .enumerate()
    {
        let f = format!("spec.parentRefs[{i}]");
        let Some(p) = c.object(
            &f,
            p,
            &["group", "kind", "namespace", "name", "sectionName", "port"],
        ) else {
            continue;
        };
        let pname = c.string(&format!("{f}.name"), p.get("name"), true);
        let pns = c.string(&format!("{f}.namespace"), p.get("namespace"), false);
        c.string(&format!("{f}.sectionName"), p.get("sectionName"), false);
        let port = c.port(&format!("{f}.port"), p.get("port"));
        if is_service_parent(p)
            && let Some(pname) = pname
        {
            parents.push(ServiceRef {
                namespace: pns.unwrap_or_else(|| namespace.clone()),
                name: pname,
                port,
            });
        }
    }
    if parents.is_empty() {
        c.err(
            "spec.parentRefs",
            "no Service among the parents (a mesh route attaches to a Service: group \"\", kind Service)",
        );
    }
    for (i, h) in c
        .array("spec.hostnames", spec.get("hostnames"), 16)
        .iter()
        .enumerate()
    {
        c.string(&format!("spec.hostnames[{i}]"), Some(h), true);
    }

    let rules_known: &[&str] = &[
        "name",
        "matches",
        "filters",
        "backendRefs",
        "timeouts",
        "retry",
        "sessionPersistence",
    ];
    for (i, r) in c
        .array("spec.rules", spec.get("rules"), 16)
        .iter()
        .enumerate()
    {
        let f = format!("spec.rules[{i}]");
        let Some(r) = c.object(&f, r, rules_known) else {
            continue;
        };
        c.string(&format!("{f}.name"), r.get("name"), false);
        for (j, m) in c
            .array(&format!("{f}.matches"), r.get("matches"), 64)
            .iter()
            .enumerate()
        {
            match_(&mut c, kind, &format!("{f}.matches[{j}]"), m);
        }
        filters(&mut c, kind, &format!("{f}.filters"), r.get("filters"));
        for (j, b) in c
            .array(&format!("{f}.backendRefs"), r.get("backendRefs"), 16)
            .iter()
            .enumerate()
        {
            let bf = format!("{f}.backendRefs[{j}]");
            let Some(b) = c.object(
                &bf,
                b,
                &[
                    "group",
                    "kind",
                    "name",
                    "namespace",
                    "port",
                    "weight",
                    "filters",
                ],
            ) else {
                continue;
            };
            c.string(&format!("{bf}.name"), b.get("name"), true);
            c.string(&format!("{bf}.namespace"), b.get("namespace"), false);
            let group = c
                .string(&format!("{bf}.group"), b.get("group"), false)
                .unwrap_or_default();
            let bkind = c
                .string(&format!("{bf}.kind"), b.get("kind"), false)
                .unwrap_or_else(|| "Service".into());
            let port = c.port(&format!("{bf}.port"), b.get("port"));
            if (group.is_empty() || group == "core") && bkind == "Service" && port.is_none() {
                c.err(
                    format!("{bf}.port"),
                    "missing (a Service backend needs its port)",
                );
            }
            c.int(&format!("{bf}.weight"), b.get("weight"), 0, 1_000_000);
            filters(&mut c, kind, &format!("{bf}.filters"), b.get("filters"));
        }
        if let Some(t) = r.get("timeouts") {
            let tf = format!("{f}.timeouts");
            if kind == RouteKind::Grpc {
                c.err(tf, "GRPCRoute rules have no timeouts");
            } else if let Some(t) = c.object(&tf, t, &["request", "backendRequest"]) {
                c.duration(&format!("{tf}.request"), t.get("request"));
                c.duration(&format!("{tf}.backendRequest"), t.get("backendRequest"));
            }
        }
    }

    if !c.problems.is_empty() {
        return Err(c.problems);
    }
    parents.sort();
    parents.dedup();
    Ok(Route {
        kind,
        namespace,
        name,
        parents,
        spec: spec_v.clone(),
    })
}

fn match_(c: &mut Check, kind: RouteKind, f: &str, m: &Value) {
    let known: &[&str] = match kind {
        RouteKind::Http => &["path", "headers", "queryParams", "method"],
        RouteKind::Grpc => &["method", "headers"],
    };
    let Some(m) = c.object(f, m, known) else {
        return;
    };
    let pairs = |c: &mut Check, field: &str, v: Option<&Value>| {
        for (k, h) in c.array(field, v, 16).iter().enumerate() {
            let hf = format!("{field}[{k}]");
            if let Some(h) = c.object(&hf, h, &["type", "name", "value"]) {
                c.one_of(
                    &format!("{hf}.type"),
                    h.get("type"),
                    &["Exact", "RegularExpression"],
                );
                c.string(&format!("{hf}.name"), h.get("name"), true);
                c.string(&format!("{hf}.value"), h.get("value"), true);
            }
        }
    };
    pairs(c, &format!("{f}.headers"), m.get("headers"));
    match kind {
        RouteKind::Http => {
            if let Some(p) = m.get("path") {
                let pf = format!("{f}.path");
                if let Some(p) = c.object(&pf, p, &["type", "value"]) {
                    let t = c
                        .one_of(
                            &format!("{pf}.type"),
                            p.get("type"),
                            &["Exact", "PathPrefix", "RegularExpression"],
                        )
                        .unwrap_or_else(|| "PathPrefix".into());
                    let v = c.string(&format!("{pf}.value"), p.get("value"), false);
                    if t != "RegularExpression"
                        && let Some(v) = v
                        && !v.starts_with('/')
                    {
                        c.err(format!("{pf}.value"), format!("{v:?} must start with /"));
                    }
                }
            }
            pairs(c, &format!("{f}.queryParams"), m.get("queryParams"));
            c.one_of(&format!("{f}.method"), m.get("method"), METHODS);
        }
        RouteKind::Grpc => {
            if let Some(gm) = m.get("method") {
                let mf = format!("{f}.method");
                if let Some(gm) = c.object(&mf, gm, &["type", "service", "method"]) {
                    c.one_of(
                        &format!("{mf}.type"),
                        gm.get("type"),
                        &["Exact", "RegularExpression"],
                    );
                    let s = c.string(&format!("{mf}.service"), gm.get("service"), false);
                    let me = c.string(&format!("{mf}.method"), gm.get("method"), false);
                    if s.is_none() && me.is_none() {
                        c.err(mf, "needs a service, a method or both");
                    }
                }
            }
        }
    }
}

fn filters(c: &mut Check, kind: RouteKind, f: &str, v: Option<&Value>) {
    let allowed = match kind {
        RouteKind::Http => HTTP_FILTERS,
        RouteKind::Grpc => GRPC_FILTERS,
    };
    for (i, flt) in c.array(f, v, 16).iter().enumerate() {
        let ff = format!("{f}[{i}]");
        let Some(flt) = flt.as_object() else {
            c.err(ff, "must be an object");
            continue;
        };
        let Some(t) = c.one_of(&format!("{ff}.type"), flt.get("type"), allowed) else {
            if flt.get("type").is_none() {
                c.err(format!("{ff}.type"), "missing");
            }
            continue;
        };
        // The field named after the type (lower camel case) carries its settings.
        let field = format!("{}{}", t[..1].to_ascii_lowercase(), &t[1..]);
        let field = if t == "URLRewrite" {
            "urlRewrite".to_string()
        } else {
            field
        };
        if !flt.get(&field).is_some_and(Value::is_object) {
            c.err(format!("{ff}.{field}"), format!("missing (type {t})"));
        }
        for k in flt.keys() {
            if k != "type" && *k != field {
                c.err(format!("{ff}.{k}"), format!("does not go with type {t}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn route(spec: Value) -> Value {
        json!({ "metadata": { "name": "r", "namespace": "demo" }, "spec": spec })
    }

    #[test]
    fn a_mesh_route_to_a_service_is_kept() {
        let r = parse_route(
            RouteKind::Http,
            &route(json!({
                "parentRefs": [ { "group": "", "kind": "Service", "name": "api", "port": 8080 } ],
                "rules": [ {
                    "matches": [ { "path": { "type": "PathPrefix", "value": "/v2" }, "method": "GET",
                                   "headers": [ { "name": "x-canary", "value": "1" } ] } ],
                    "filters": [ { "type": "RequestHeaderModifier", "requestHeaderModifier": { "add": [] } } ],
                    "backendRefs": [ { "name": "api-v2", "port": 8080, "weight": 90 },
                                     { "name": "api-v1", "port": 8080, "weight": 10 } ],
                    "timeouts": { "request": "10s", "backendRequest": "1m30s" }
                } ]
            })),
        )
        .unwrap();
        assert_eq!(r.qualified_name(), "demo/r");
        assert_eq!(
            r.parents,
            [ServiceRef {
                namespace: "demo".into(),
                name: "api".into(),
                port: Some(8080)
            }]
        );
        let g = parse_route(
            RouteKind::Grpc,
            &route(json!({
                "parentRefs": [ { "kind": "Service", "name": "api" } ],
                "rules": [ { "matches": [ { "method": { "service": "demo.Api", "method": "Get" } } ],
                             "backendRefs": [ { "name": "api", "port": 9090 } ] } ]
            })),
        )
        .unwrap();
        assert_eq!(g.parents[0].port, None);
    }

    #[test]
    fn gateway_routes_are_not_the_mesh_s() {
        let gw = route(json!({ "parentRefs": [ { "name": "public-gateway" } ], "rules": [] }));
        assert!(!is_mesh_route(&gw));
        let mesh =
            route(json!({ "parentRefs": [ { "kind": "Service", "group": "", "name": "api" } ] }));
        assert!(is_mesh_route(&mesh));
    }

    #[test]
    fn each_problem_is_named_by_its_field() {
        let bad = route(json!({
            "parentRefs": [ { "kind": "Service", "name": "api", "port": 0 } ],
            "rules": [ {
                "matchs": [],
                "matches": [ { "path": { "type": "Prefix", "value": "v2" }, "method": "FETCH" } ],
                "filters": [ { "type": "Teleport" } ],
                "backendRefs": [ { "name": "api-v2", "weight": -1 } ],
                "timeouts": { "request": "ten seconds" }
            } ]
        }));
        let errs = parse_route(RouteKind::Http, &bad).unwrap_err();
        let fields: Vec<&str> = errs.iter().map(|(f, _)| f.as_str()).collect();
        for f in [
            "spec.parentRefs[0].port",
            "spec.rules[0].matchs",
            "spec.rules[0].matches[0].path.type",
            "spec.rules[0].matches[0].path.value",
            "spec.rules[0].matches[0].method",
            "spec.rules[0].filters[0].type",
            "spec.rules[0].backendRefs[0].port",
            "spec.rules[0].backendRefs[0].weight",
            "spec.rules[0].timeouts.request",
        ] {
            assert!(fields.contains(&f), "{f} not in {errs:?}");
        }
        let grpc_timeouts = route(json!({
            "parentRefs": [ { "kind": "Service", "name": "api" } ],
            "rules": [ { "timeouts": { "request": "1s" } } ]
        }));
        assert!(parse_route(RouteKind::Grpc, &grpc_timeouts).is_err());
    }
}
