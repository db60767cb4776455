//! `palisade.dev/v1alpha1` `EgressPolicy`: which destinations outside the mesh (names that no
//! mesh service matches, resolved with DNS) the selected workloads' apps may reach, by
//! hostname.
//!
//! ```yaml
//! spec:
//!   selector: { matchLabels: { app: web } }   # absent: every workload in scope
//!   defaultAction: DENY                       # ALLOW (default) | DENY
//!   rules:                                    # the first rule with a matching host decides
//!     - { action: ALLOW, hosts: ["api.github.com", "*.example.com"] }
//! ```
//!
//! A rule's `action` is required: a rule that forgot it must not silently allow (or deny)
//! what its author meant the other way. Host patterns are exact lower-case DNS names,
//! `*.suffix` (any name under `suffix`, not `suffix` itself, as Envoy and Istio read it), or
//! `*`; an upper-case letter, an IP address, a trailing dot or a `*` elsewhere is an error,
//! because the proxy compares lower-case names without a trailing dot and such a pattern
//! would match nothing.

use serde_json::{Map, Value};

use super::{Ctx, ObjectMeta, WorkloadSelector, join, kind_of, list, object};
use crate::v1;

/// The longest DNS name (RFC 1035 §2.3.4), without the trailing dot.
pub const MAX_HOST_LEN: usize = 253;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EgressAction {
    #[default]
    Allow,
    Deny,
}

impl EgressAction {
    pub fn is_allow(self) -> bool {
        self == EgressAction::Allow
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EgressPolicy {
    pub metadata: ObjectMeta,
    pub selector: Option<WorkloadSelector>,
    /// What a hostname no rule matches gets, and a connection whose hostname the proxy cannot
    /// tell (plain TCP in transparent mode).
    pub default_action: EgressAction,
    pub rules: Vec<EgressRule>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EgressRule {
    pub action: EgressAction,
    pub hosts: Vec<String>,
}

impl EgressPolicy {
    /// `namespace/name`, how logs name the policy.
    pub fn qualified_name(&self) -> String {
        format!("{}/{}", self.metadata.namespace(), self.metadata.name)
    }

    /// Whether the policy is in `ns` (or the mesh-wide root namespace, `root_ns`) and its
    /// selector, if any, matches `labels`.
    pub fn selects(
        &self,
        ns: &str,
        labels: &std::collections::BTreeMap<String, String>,
        root_ns: &str,
    ) -> bool {
        super::selects(&self.metadata, self.selector.as_ref(), ns, labels, root_ns)
    }

    /// The wire form (the selector stays with the control plane).
    pub fn to_wire(&self) -> v1::EgressPolicy {
        v1::EgressPolicy {
            default_allow: self.default_action.is_allow(),
            rules: self
                .rules
                .iter()
                .map(|r| v1::EgressRule {
                    allow: r.action.is_allow(),
                    hosts: r.hosts.clone(),
                })
                .collect(),
            name: self.qualified_name(),
        }
    }
}

/// Why `s` is not a valid egress host pattern, if it is not: the one check the parser, the
/// proxy (a wire config from anywhere) and the docs share.
pub fn host_pattern_problem(s: &str) -> Option<String> {
    if s == "*" {
        return None;
    }
    let name = match s.strip_prefix("*.") {
        Some(rest) => rest,
        None if s.starts_with('*') => {
            return Some(format!(
                "{s:?}: a wildcard is `*` alone or `*.` before a domain (`*.example.com`)"
            ));
        }
        None => s,
    };
    hostname_problem(name).map(|m| format!("{s:?}: {m}"))
}

/// Why `s` is not a lower-case DNS hostname without a trailing dot, if it is not.
pub fn hostname_problem(s: &str) -> Option<String> {
    if s.is_empty() {
        return Some("empty name".into());
    }
    if s.ends_with('.') {
        return Some("write the name without the trailing dot".into());
    }
    if s.len() > MAX_HOST_LEN {
        return Some(format!("longer than {MAX_HOST_LEN} characters"));
    }
    if s.parse::<std::net::IpAddr>().is_ok() {
        return Some("an IP address is not a hostname".into());
    }
    for label in s.split('.') {
        if label.is_empty() {
            return Some("empty label (two dots in a row, or a leading dot)".into());
        }
        if label.len() > 63 {
            return Some(format!("label {label:?} is longer than 63 characters"));
        }
        if label.contains('*') {
            return Some("`*` is allowed only as the whole first label (`*.example.com`)".into());
        }
        if label.bytes().any(|b| b.is_ascii_uppercase()) {
            return Some(format!(
                "write it in lower case ({:?}): names are compared in lower case",
                s.to_ascii_lowercase()
            ));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            return Some(format!(
                "label {label:?} has a character other than a-z, 0-9, '-' or '_'"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Some(format!("label {label:?} starts or ends with '-'"));
        }
    }
    if s.rsplit('.')
        .next()
        .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
    {
        return Some("the last label is all digits: not a hostname".into());
    }
    None
}

fn action(c: &mut Ctx<'_>, v: Option<&Value>, path: &str) -> Option<EgressAction> {
    match v.and_then(Value::as_str) {
        Some("ALLOW") => Some(EgressAction::Allow),
        Some("DENY") => Some(EgressAction::Deny),
        _ => {
            let found = v.map_or_else(|| "nothing".to_string(), |v| v.to_string());
            c.err(path, format!("expected ALLOW or DENY, found {found}"));
            None
        }
    }
}

fn spec<'v>(c: &mut Ctx<'_>, doc: &'v Value) -> Option<&'v Map<String, Value>> {
    let map = object(c, doc, "", &["apiVersion", "kind", "metadata", "spec"])?;
    let Some(spec) = map.get("spec") else {
        c.err("spec", "missing field `spec`");
        return None;
    };
    object(c, spec, "spec", &["selector", "defaultAction", "rules"])
}

pub(super) fn parse(c: &mut Ctx<'_>, meta: &ObjectMeta, doc: &Value) -> Option<EgressPolicy> {
    let before = c.errors.len();
    let spec = spec(c, doc)?;
    let selector = match spec.get("selector") {
        None | Some(Value::Null) => None,
        Some(s) => {
            object(c, s, "spec.selector", &["matchLabels"]);
            match serde_json::from_value::<WorkloadSelector>(s.clone()) {
                Ok(sel) => Some(sel),
                Err(e) => {
                    c.err("spec.selector", e.to_string());
                    None
                }
            }
        }
    };
    let default_action = match spec.get("defaultAction") {
        None | Some(Value::Null) => Some(EgressAction::Allow),
        v => action(c, v, "spec.defaultAction"),
    };
    let mut rules = Vec::new();
    for (i, r) in list(c, spec.get("rules").unwrap_or(&Value::Null), "spec.rules")
        .iter()
        .enumerate()
    {
        let rp = format!("spec.rules[{i}]");
        let Some(m) = object(c, r, &rp, &["action", "hosts"]) else {
            continue;
        };
        let act = action(c, m.get("action"), &join(&rp, "action"));
        let hp = join(&rp, "hosts");
        let items = list(c, m.get("hosts").unwrap_or(&Value::Null), &hp);
        if items.is_empty() && m.get("hosts").is_none_or(|h| h.is_array() || h.is_null()) {
            c.err(&hp, "missing: name the hosts this rule is for");
        }
        let mut hosts = Vec::with_capacity(items.len());
        for (k, h) in items.iter().enumerate() {
            let f = format!("{hp}[{k}]");
            match h.as_str() {
                Some(h) => match host_pattern_problem(h) {
                    Some(why) => c.err(&f, why),
                    None => hosts.push(h.to_string()),
                },
                None => c.err(&f, format!("expected a string, found {}", kind_of(h))),
            }
        }
        if let Some(action) = act {
            rules.push(EgressRule { action, hosts });
        }
    }
    let default_action = default_action?;
    (c.errors.len() == before).then(|| EgressPolicy {
        metadata: meta.clone(),
        selector,
        default_action,
        rules,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::{PolicyError, Resource, parse_str};
    use super::*;

    fn parse(spec: &str) -> Result<EgressPolicy, Vec<PolicyError>> {
        let text = format!(
            "apiVersion: palisade.dev/v1alpha1\nkind: EgressPolicy\nmetadata: {{ name: out, namespace: demo }}\nspec:\n{spec}"
        );
        match parse_str(Path::new("egress.yaml"), &text)?.remove(0) {
            Resource::EgressPolicy(p) => Ok(p),
            other => panic!("not an EgressPolicy: {other:?}"),
        }
    }

    fn errors(spec: &str) -> Vec<String> {
        parse(spec)
            .expect_err("should be refused")
            .iter()
            .map(|e| e.to_string())
            .collect()
    }

    #[test]
    fn parses_rules_in_order_with_defaults() {
        let p = parse(
            "  selector: { matchLabels: { app: web } }\n  rules:\n    - { action: DENY, hosts: [\"*.example.test\"] }\n    - { action: ALLOW, hosts: [ok.example.test, \"*\"] }\n",
        )
        .expect("parses");
        assert_eq!(p.qualified_name(), "demo/out");
        assert_eq!(p.default_action, EgressAction::Allow, "ALLOW by default");
        assert_eq!(p.rules.len(), 2);
        assert_eq!(p.rules[0].action, EgressAction::Deny);
        assert_eq!(p.rules[1].hosts, ["ok.example.test", "*"]);
        let wire = p.to_wire();
        assert!(wire.default_allow);
        assert!(!wire.rules[0].allow && wire.rules[1].allow);
        assert_eq!(wire.name, "demo/out");

        let p = parse("  defaultAction: DENY\n").expect("parses");
        assert_eq!(p.default_action, EgressAction::Deny);
        assert!(p.rules.is_empty());
        assert!(!p.to_wire().default_allow);
    }

    #[test]
    fn errors_name_file_document_and_field() {
        let e = errors("  defaultAction: deny\n");
        assert_eq!(
            e,
            ["egress.yaml: document 0: spec.defaultAction: expected ALLOW or DENY, found \"deny\""]
        );
        let e = errors("  rules:\n    - { hosts: [a.example.test] }\n");
        assert_eq!(
            e,
            [
                "egress.yaml: document 0: spec.rules[0].action: expected ALLOW or DENY, found nothing"
            ]
        );
        let e = errors("  rules:\n    - { action: ALLOW }\n");
        assert_eq!(
            e,
            [
                "egress.yaml: document 0: spec.rules[0].hosts: missing: name the hosts this rule is for"
            ]
        );
        let e = errors("  rules:\n    - { action: ALLOW, hosts: a.example.test }\n");
        assert!(
            e[0].ends_with("spec.rules[0].hosts: expected a list, found a string"),
            "{e:?}"
        );
        let e = errors("  rules:\n    - { action: ALLOW, hosts: [a.test], ports: [443] }\n");
        assert!(e[0].contains("spec.rules[0].ports: unknown field"), "{e:?}");
        let e = errors("  egress: []\n");
        assert!(e[0].contains("spec.egress: unknown field"), "{e:?}");
        let e = errors("  selector: { labels: { app: web } }\n");
        assert!(
            e[0].contains("spec.selector.labels: unknown field"),
            "{e:?}"
        );
        let e = errors("  rules:\n    - { action: DENY, hosts: [ok.test, 7] }\n");
        assert!(
            e[0].ends_with("spec.rules[0].hosts[1]: expected a string, found a number"),
            "{e:?}"
        );
    }

    #[test]
    fn host_patterns_are_lower_case_names_suffixes_or_any() {
        for good in [
            "*",
            "api.github.com",
            "*.example.com",
            "*.com",
            "localhost",
            "a-b.c_d.example",
            "xn--bcher-kva.example",
        ] {
            assert_eq!(host_pattern_problem(good), None, "{good}");
        }
        for (bad, why) in [
            ("", "empty name"),
            ("API.github.com", "lower case"),
            ("example.com.", "trailing dot"),
            ("10.0.0.1", "IP address"),
            ("::1", "IP address"),
            ("*example.com", "wildcard"),
            ("api.*.com", "only as the whole first label"),
            ("*.*.com", "only as the whole first label"),
            ("a..b", "empty label"),
            (".a.b", "empty label"),
            ("-a.b", "starts or ends with '-'"),
            ("a b.c", "character other than"),
            ("host.123", "all digits"),
        ] {
            let m = host_pattern_problem(bad).unwrap_or_else(|| panic!("{bad:?} accepted"));
            assert!(m.contains(why), "{bad:?}: {m}");
        }
        let long = format!("{}.test", "a".repeat(64));
        assert!(host_pattern_problem(&long).is_some_and(|m| m.contains("63")));
        let long = ["abcdefgh"; 30].join(".");
        assert!(host_pattern_problem(&long).is_some_and(|m| m.contains("253")));
    }

    #[test]
    fn every_bad_host_is_reported_with_its_index() {
        let e = errors(
            "  rules:\n    - { action: ALLOW, hosts: [ok.test, Bad.test] }\n    - { action: DENY, hosts: [\"*x.test\"] }\n",
        );
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(
            e[0].contains("spec.rules[0].hosts[1]: \"Bad.test\""),
            "{e:?}"
        );
        assert!(
            e[1].contains("spec.rules[1].hosts[0]: \"*x.test\""),
            "{e:?}"
        );
    }

    #[test]
    fn scope_is_the_namespace_or_the_root_namespace() {
        let p = parse("  selector: { matchLabels: { app: web } }\n").expect("parses");
        let web: std::collections::BTreeMap<String, String> =
            [("app".to_string(), "web".to_string())].into();
        assert!(p.selects("demo", &web, super::super::ROOT_NAMESPACE));
        assert!(!p.selects("other", &web, super::super::ROOT_NAMESPACE));
        assert!(!p.selects("demo", &Default::default(), super::super::ROOT_NAMESPACE));
    }
}
