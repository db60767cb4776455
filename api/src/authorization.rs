//! AuthorizationPolicy resources on the wire: a policy as written and validated becomes the
//! typed `v1::Authorization` its workload's proxy compiles, and goes back for the control
//! plane's `/config`, which shows what it serves in the resources' own shape.
//!
//! Patterns become `StringMatch`es by the policy language's one rule (`*`, `prefix*`,
//! `*suffix`, else exact), principals lose their `spiffe://`, CIDRs and ports become numbers,
//! `when` keys become typed conditions. So nothing on the proxy's config path parses the
//! policy language, and what the proxy matches is what `palisade policy check` validated.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::policy::{
    API_VERSION, Action, AuthorizationPolicy, AuthorizationPolicySpec, Condition, DefaultPolicy,
    ObjectMeta, Operation, Rule, RuleFrom, RuleTo, Source,
};
use crate::v1;
use crate::v1::condition::Key;
use crate::v1::string_match::MatchType;

/// A value with no wire form (spec → proto) or no policy-language form (proto → spec), named
/// by its field path in the side it was read from.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct WireError {
    pub field: String,
    pub message: String,
}

fn err(field: impl Into<String>, message: impl Into<String>) -> WireError {
    WireError {
        field: field.into(),
        message: message.into(),
    }
}

const SCHEME: &str = "spiffe://";

/// A pattern of the policy language as a `StringMatch`. The order of the checks is the
/// language's (and was the proxy's): `*` alone is presence, a trailing `*` makes a prefix
/// before a leading one makes a suffix.
pub fn string_match(pattern: &str) -> v1::StringMatch {
    let t = if pattern == "*" {
        MatchType::Presence(())
    } else if let Some(p) = pattern.strip_suffix('*') {
        MatchType::Prefix(p.into())
    } else if let Some(s) = pattern.strip_prefix('*') {
        MatchType::Suffix(s.into())
    } else {
        MatchType::Exact(pattern.into())
    };
    v1::StringMatch {
        match_type: Some(t),
    }
}

/// A principal pattern: the proxy matches principals without the scheme, so a pattern written
/// with it loses it here, once, instead of on every proxy.
pub fn principal_match(pattern: &str) -> v1::StringMatch {
    string_match(pattern.strip_prefix(SCHEME).unwrap_or(pattern))
}

/// The policy-language spelling of a `StringMatch`. A match that the language cannot spell
/// (an exact value ending in `*`, say) is an error rather than a string that would read back
/// as another match.
pub fn pattern(m: &v1::StringMatch) -> Result<String, String> {
    let s = match &m.match_type {
        None => return Err("no match type (exact, prefix, suffix or presence)".into()),
        Some(MatchType::Presence(())) => "*".to_string(),
        Some(MatchType::Prefix(p)) => format!("{p}*"),
        Some(MatchType::Suffix(s)) => format!("*{s}"),
        Some(MatchType::Exact(e)) => e.clone(),
    };
    if string_match(&s) != *m {
        return Err(format!("{m:?} has no spelling in the policy language"));
    }
    Ok(s)
}

pub fn cidr(net: IpNet) -> v1::Cidr {
    let address = match net.addr() {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    v1::Cidr {
        address,
        prefix_len: u32::from(net.prefix_len()),
    }
}

/// A `Cidr` as a network: 4 or 16 address bytes and a prefix no longer than the address.
pub fn ip_net(c: &v1::Cidr) -> Result<IpNet, String> {
    let addr = if let Ok(a) = <[u8; 4]>::try_from(c.address.as_slice()) {
        IpAddr::from(a)
    } else if let Ok(a) = <[u8; 16]>::try_from(c.address.as_slice()) {
        IpAddr::from(a)
    } else {
        return Err(format!(
            "an address has 4 or 16 bytes, not {}",
            c.address.len()
        ));
    };
    u8::try_from(c.prefix_len)
        .ok()
        .and_then(|len| IpNet::new(addr, len).ok())
        .ok_or_else(|| {
            format!(
                "prefix length {} is longer than the address {addr}",
                c.prefix_len
            )
        })
}

impl DefaultPolicy {
    pub fn to_proto(self) -> v1::DefaultPolicy {
        match self {
            DefaultPolicy::Allow => v1::DefaultPolicy::Allow,
            DefaultPolicy::Deny => v1::DefaultPolicy::Deny,
            DefaultPolicy::Authenticated => v1::DefaultPolicy::Authenticated,
        }
    }

    /// None for a value this build does not know: guessing `allow` would fail open.
    pub fn from_proto(v: i32) -> Option<Self> {
        Some(match v1::DefaultPolicy::try_from(v).ok()? {
            v1::DefaultPolicy::Allow => DefaultPolicy::Allow,
            v1::DefaultPolicy::Deny => DefaultPolicy::Deny,
            v1::DefaultPolicy::Authenticated => DefaultPolicy::Authenticated,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DefaultPolicy::Allow => "allow",
            DefaultPolicy::Deny => "deny",
            DefaultPolicy::Authenticated => "authenticated",
        }
    }
}

impl Action {
    pub fn to_proto(self) -> v1::Action {
        match self {
            Action::Allow => v1::Action::Allow,
            Action::Deny => v1::Action::Deny,
            Action::Audit => v1::Action::Audit,
        }
    }

    /// None for a value this build does not know: an unknown action is neither ALLOW nor DENY.
    pub fn from_proto(v: i32) -> Option<Self> {
        Some(match v1::Action::try_from(v).ok()? {
            v1::Action::Allow => Action::Allow,
            v1::Action::Deny => Action::Deny,
            v1::Action::Audit => Action::Audit,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Resource → wire. Field paths are the resource's (`spec.rules[0].to[1].operation.ports[0]`).
// ---------------------------------------------------------------------------------------------

impl TryFrom<&AuthorizationPolicy> for v1::Authorization {
    type Error = WireError;

    /// Fails only for what validation refuses (a port or CIDR that does not parse, an unknown
    /// `when` key): a policy `policy::parse_str` accepted always converts.
    fn try_from(p: &AuthorizationPolicy) -> Result<Self, WireError> {
        let rules = p
            .spec
            .rules
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, r)| rule_to_proto(&format!("spec.rules[{i}]"), r))
            .collect::<Result<_, _>>()?;
        Ok(v1::Authorization {
            name: p.metadata.name.clone(),
            namespace: p.metadata.namespace().to_string(),
            action: p.spec.action.to_proto() as i32,
            rules,
        })
    }
}

fn rule_to_proto(path: &str, r: &Rule) -> Result<v1::Rule, WireError> {
    let from = r
        .from
        .iter()
        .enumerate()
        .map(|(j, f)| {
            let source = source_to_proto(&format!("{path}.from[{j}].source"), &f.source)?;
            Ok(v1::rule::From {
                source: Some(source),
            })
        })
        .collect::<Result<_, WireError>>()?;
    let to = r
        .to
        .iter()
        .enumerate()
        .map(|(j, t)| {
            let operation = operation_to_proto(&format!("{path}.to[{j}].operation"), &t.operation)?;
            Ok(v1::rule::To {
                operation: Some(operation),
            })
        })
        .collect::<Result<_, WireError>>()?;
    let when = r
        .when
        .iter()
        .enumerate()
        .map(|(j, c)| condition_to_proto(&format!("{path}.when[{j}]"), c))
        .collect::<Result<_, _>>()?;
    Ok(v1::Rule { from, to, when })
}

fn matches(v: &[String]) -> Vec<v1::StringMatch> {
    v.iter().map(|s| string_match(s)).collect()
}

fn principal_matches(v: &[String]) -> Vec<v1::StringMatch> {
    v.iter().map(|s| principal_match(s)).collect()
}

fn cidrs(path: &str, v: &[String]) -> Result<Vec<v1::Cidr>, WireError> {
    v.iter()
        .enumerate()
        .map(|(i, s)| {
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                .map(cidr)
                .map_err(|_| {
                    err(
                        format!("{path}[{i}]"),
                        format!("{s:?} is not an IP address or CIDR block"),
                    )
                })
        })
        .collect()
}

fn ports(path: &str, v: &[String]) -> Result<Vec<u32>, WireError> {
    v.iter()
        .enumerate()
        .map(|(i, s)| {
            s.parse::<u16>().map(u32::from).map_err(|_| {
                err(
                    format!("{path}[{i}]"),
                    format!("{s:?} is not a port number"),
                )
            })
        })
        .collect()
}

fn source_to_proto(path: &str, s: &Source) -> Result<v1::Source, WireError> {
    Ok(v1::Source {
        principals: principal_matches(&s.principals),
        not_principals: principal_matches(&s.not_principals),
        namespaces: matches(&s.namespaces),
        not_namespaces: matches(&s.not_namespaces),
        ip_blocks: cidrs(&format!("{path}.ipBlocks"), &s.ip_blocks)?,
        not_ip_blocks: cidrs(&format!("{path}.notIpBlocks"), &s.not_ip_blocks)?,
    })
}

fn operation_to_proto(path: &str, o: &Operation) -> Result<v1::Operation, WireError> {
    Ok(v1::Operation {
        hosts: matches(&o.hosts),
        not_hosts: matches(&o.not_hosts),
        ports: ports(&format!("{path}.ports"), &o.ports)?,
        not_ports: ports(&format!("{path}.notPorts"), &o.not_ports)?,
        methods: matches(&o.methods),
        not_methods: matches(&o.not_methods),
        paths: matches(&o.paths),
        not_paths: matches(&o.not_paths),
        routes: matches(&o.routes),
        not_routes: matches(&o.not_routes),
    })
}

fn condition_to_proto(path: &str, c: &Condition) -> Result<v1::Condition, WireError> {
    let strings = |f: fn(&[String]) -> Vec<v1::StringMatch>| v1::StringCondition {
        values: f(&c.values),
        not_values: f(&c.not_values),
    };
    let key = if let Some(h) = c.header_name() {
        let name = http::HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes())
            .map_err(|_| err(format!("{path}.key"), format!("bad header name {h:?}")))?;
        Key::RequestHeader(v1::HeaderCondition {
            name: name.as_str().to_string(),
            values: matches(&c.values),
            not_values: matches(&c.not_values),
        })
    } else {
        match c.key.as_str() {
            "source.ip" => Key::SourceIp(v1::CidrCondition {
                values: cidrs(&format!("{path}.values"), &c.values)?,
                not_values: cidrs(&format!("{path}.notValues"), &c.not_values)?,
            }),
            "source.namespace" => Key::SourceNamespace(strings(matches)),
            "source.principal" => Key::SourcePrincipal(strings(principal_matches)),
            "destination.port" => Key::DestinationPort(strings(matches)),
            other => {
                return Err(err(
                    format!("{path}.key"),
                    format!("unsupported key {other:?}"),
                ));
            }
        }
    };
    Ok(v1::Condition { key: Some(key) })
}

// ---------------------------------------------------------------------------------------------
// Wire → resource. Field paths are the proto's (`rules[0].from[1].source.principals[0]`).
// ---------------------------------------------------------------------------------------------

impl TryFrom<&v1::Authorization> for AuthorizationPolicy {
    type Error = WireError;

    /// The policy as the proxy holds it, in the resource's shape: no selector (it was
    /// selected already), principals without `spiffe://`, single addresses as `/32` or
    /// `/128`. Converting it back gives the same `v1::Authorization`.
    fn try_from(a: &v1::Authorization) -> Result<Self, WireError> {
        let action = Action::from_proto(a.action)
            .ok_or_else(|| err("action", format!("unknown value {}", a.action)))?;
        let rules = a
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| rule_from_proto(&format!("rules[{i}]"), r))
            .collect::<Result<_, _>>()?;
        Ok(AuthorizationPolicy {
            api_version: API_VERSION.to_string(),
            kind: "AuthorizationPolicy".to_string(),
            metadata: ObjectMeta {
                name: a.name.clone(),
                namespace: Some(a.namespace.clone()),
                ..Default::default()
            },
            spec: AuthorizationPolicySpec {
                selector: None,
                action,
                rules: Some(rules),
            },
        })
    }
}

fn rule_from_proto(path: &str, r: &v1::Rule) -> Result<Rule, WireError> {
    let from = r
        .from
        .iter()
        .enumerate()
        .map(|(j, f)| {
            let p = format!("{path}.from[{j}].source");
            let s = f.source.as_ref().ok_or_else(|| err(&p, "missing"))?;
            Ok(RuleFrom {
                source: source_from_proto(&p, s)?,
            })
        })
        .collect::<Result<_, WireError>>()?;
    let to =
        r.to.iter()
            .enumerate()
            .map(|(j, t)| {
                let p = format!("{path}.to[{j}].operation");
                let o = t.operation.as_ref().ok_or_else(|| err(&p, "missing"))?;
                Ok(RuleTo {
                    operation: operation_from_proto(&p, o)?,
                })
            })
            .collect::<Result<_, WireError>>()?;
    let when = r
        .when
        .iter()
        .enumerate()
        .map(|(j, c)| condition_from_proto(&format!("{path}.when[{j}]"), c))
        .collect::<Result<_, _>>()?;
    Ok(Rule { from, to, when })
}

fn patterns(path: &str, v: &[v1::StringMatch]) -> Result<Vec<String>, WireError> {
    v.iter()
        .enumerate()
        .map(|(i, m)| pattern(m).map_err(|e| err(format!("{path}[{i}]"), e)))
        .collect()
}

fn nets(path: &str, v: &[v1::Cidr]) -> Result<Vec<String>, WireError> {
    v.iter()
        .enumerate()
        .map(|(i, c)| {
            ip_net(c)
                .map(|n| n.to_string())
                .map_err(|e| err(format!("{path}[{i}]"), e))
        })
        .collect()
}

fn source_from_proto(path: &str, s: &v1::Source) -> Result<Source, WireError> {
    let p = |f: &str| format!("{path}.{f}");
    Ok(Source {
        principals: patterns(&p("principals"), &s.principals)?,
        not_principals: patterns(&p("not_principals"), &s.not_principals)?,
        namespaces: patterns(&p("namespaces"), &s.namespaces)?,
        not_namespaces: patterns(&p("not_namespaces"), &s.not_namespaces)?,
        ip_blocks: nets(&p("ip_blocks"), &s.ip_blocks)?,
        not_ip_blocks: nets(&p("not_ip_blocks"), &s.not_ip_blocks)?,
    })
}

fn operation_from_proto(path: &str, o: &v1::Operation) -> Result<Operation, WireError> {
    let p = |f: &str| format!("{path}.{f}");
    let ports = |f: &str, v: &[u32]| {
        v.iter()
            .enumerate()
            .map(|(i, n)| match u16::try_from(*n) {
                Ok(port) => Ok(port.to_string()),
                Err(_) => Err(err(
                    format!("{path}.{f}[{i}]"),
                    format!("{n} is not a port"),
                )),
            })
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(Operation {
        hosts: patterns(&p("hosts"), &o.hosts)?,
        not_hosts: patterns(&p("not_hosts"), &o.not_hosts)?,
        ports: ports("ports", &o.ports)?,
        not_ports: ports("not_ports", &o.not_ports)?,
        methods: patterns(&p("methods"), &o.methods)?,
        not_methods: patterns(&p("not_methods"), &o.not_methods)?,
        paths: patterns(&p("paths"), &o.paths)?,
        not_paths: patterns(&p("not_paths"), &o.not_paths)?,
        routes: patterns(&p("routes"), &o.routes)?,
        not_routes: patterns(&p("not_routes"), &o.not_routes)?,
    })
}

fn condition_from_proto(path: &str, c: &v1::Condition) -> Result<Condition, WireError> {
    let strings = |key: &str, field: &str, s: &v1::StringCondition| {
        Ok(Condition {
            key: key.to_string(),
            values: patterns(&format!("{path}.{field}.values"), &s.values)?,
            not_values: patterns(&format!("{path}.{field}.not_values"), &s.not_values)?,
        })
    };
    match &c.key {
        None => Err(err(path, "no key")),
        Some(Key::RequestHeader(h)) => {
            if http::HeaderName::from_bytes(h.name.as_bytes()).is_err() {
                return Err(err(
                    format!("{path}.request_header.name"),
                    format!("bad header name {:?}", h.name),
                ));
            }
            Ok(Condition {
                key: format!("request.headers[{}]", h.name),
                values: patterns(&format!("{path}.request_header.values"), &h.values)?,
                not_values: patterns(&format!("{path}.request_header.not_values"), &h.not_values)?,
            })
        }
        Some(Key::SourceIp(ips)) => Ok(Condition {
            key: "source.ip".to_string(),
            values: nets(&format!("{path}.source_ip.values"), &ips.values)?,
            not_values: nets(&format!("{path}.source_ip.not_values"), &ips.not_values)?,
        }),
        Some(Key::SourceNamespace(s)) => strings("source.namespace", "source_namespace", s),
        Some(Key::SourcePrincipal(s)) => strings("source.principal", "source_principal", s),
        Some(Key::DestinationPort(s)) => strings("destination.port", "destination_port", s),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::policy::{Resource, parse_str};

    const POLICIES: &str = r#"
apiVersion: palisade.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: a, namespace: demo }
spec:
  selector: { matchLabels: { app: db } }
  action: DENY
  rules:
    - from:
        - source: { principals: ["spiffe://cluster.local/ns/demo/sa/web", "cluster.local/ns/x/*", "*"], notPrincipals: ["*/sa/evil"] }
        - source: { namespaces: ["demo", "pr*"], notNamespaces: ["*-test"], ipBlocks: ["10.0.0.0/8", "192.168.1.1", "fd00::/8"], notIpBlocks: ["10.1.0.0/16"] }
      to: [ { operation: { methods: ["GET"], notMethods: ["DELETE"], paths: ["/api/*", "*.png"], notPaths: ["/admin"], ports: [8080, "9090"], notPorts: ["1"], hosts: ["*.demo"], notHosts: ["evil*"] } } ]
      when:
        - { key: "request.headers[X-User]", values: ["alice", "bob*"], notValues: ["*"] }
        - { key: source.ip, values: ["10.0.0.0/8"], notValues: ["10.0.0.1"] }
        - { key: source.namespace, values: ["demo"] }
        - { key: source.principal, notValues: ["spiffe://cluster.local/ns/demo/sa/evil"] }
        - { key: destination.port, values: ["80*"] }
    - {}
---
apiVersion: palisade.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: nothing }
spec: { action: AUDIT }
"#;

    fn policies() -> Vec<AuthorizationPolicy> {
        parse_str(Path::new("p.yaml"), POLICIES)
            .expect("valid")
            .into_iter()
            .filter_map(|r| match r {
                Resource::AuthorizationPolicy(p) => Some(p),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_policy_converts_to_typed_matches() {
        let ps = policies();
        let a = v1::Authorization::try_from(&ps[0]).expect("converts");
        assert_eq!((a.name.as_str(), a.namespace.as_str()), ("a", "demo"));
        assert_eq!(a.action, v1::Action::Deny as i32);
        assert_eq!(a.rules.len(), 2);
        let r = &a.rules[0];
        let s = r.from[0].source.as_ref().expect("source");
        let m = |t: MatchType| v1::StringMatch {
            match_type: Some(t),
        };
        assert_eq!(
            s.principals,
            vec![
                m(MatchType::Exact("cluster.local/ns/demo/sa/web".into())),
                m(MatchType::Prefix("cluster.local/ns/x/".into())),
                m(MatchType::Presence(())),
            ]
        );
        assert_eq!(
            s.not_principals,
            vec![m(MatchType::Suffix("/sa/evil".into()))]
        );
        let s = r.from[1].source.as_ref().expect("source");
        assert_eq!(
            s.ip_blocks,
            vec![
                v1::Cidr {
                    address: vec![10, 0, 0, 0],
                    prefix_len: 8
                },
                v1::Cidr {
                    address: vec![192, 168, 1, 1],
                    prefix_len: 32
                },
                cidr("fd00::/8".parse().expect("net")),
            ]
        );
        let o = r.to[0].operation.as_ref().expect("operation");
        assert_eq!(
            (o.ports.as_slice(), o.not_ports.as_slice()),
            (&[8080, 9090][..], &[1][..])
        );
        let Some(Key::RequestHeader(h)) = &r.when[0].key else {
            panic!("a header condition: {:?}", r.when[0])
        };
        assert_eq!(h.name, "x-user", "header names are lower case on the wire");
        let Some(Key::SourcePrincipal(p)) = &r.when[3].key else {
            panic!("a principal condition")
        };
        assert_eq!(
            p.not_values,
            vec![m(MatchType::Exact("cluster.local/ns/demo/sa/evil".into()))]
        );
        assert_eq!(
            a.rules[1],
            v1::Rule::default(),
            "an empty rule matches anything"
        );
        // A policy without rules, in the default namespace.
        let b = v1::Authorization::try_from(&ps[1]).expect("converts");
        assert_eq!(
            (b.namespace.as_str(), b.action, b.rules.len()),
            ("default", v1::Action::Audit as i32, 0)
        );
    }

    #[test]
    fn the_wire_form_reads_back_as_the_same_policy() {
        for p in policies() {
            let a = v1::Authorization::try_from(&p).expect("converts");
            let back = AuthorizationPolicy::try_from(&a).expect("reads back");
            assert_eq!(back.metadata.name, p.metadata.name);
            assert_eq!(back.spec.action, p.spec.action);
            assert_eq!(v1::Authorization::try_from(&back), Ok(a));
        }
    }

    #[test]
    fn unconvertible_values_name_their_field() {
        let mut p = policies().remove(0);
        let rules = p.spec.rules.as_mut().expect("rules");
        rules[0].to[0].operation.ports[1] = "http".into();
        let e = v1::Authorization::try_from(&p).expect_err("a bad port");
        assert_eq!(e.field, "spec.rules[0].to[0].operation.ports[1]");

        let mut p = policies().remove(0);
        let rules = p.spec.rules.as_mut().expect("rules");
        rules[0].from[1].source.not_ip_blocks[0] = "10.*".into();
        let e = v1::Authorization::try_from(&p).expect_err("a bad CIDR");
        assert_eq!(e.field, "spec.rules[0].from[1].source.notIpBlocks[0]");

        let mut p = policies().remove(0);
        let rules = p.spec.rules.as_mut().expect("rules");
        rules[0].when[2].key = "request.auth.claims[iss]".into();
        let e = v1::Authorization::try_from(&p).expect_err("a bad key");
        assert_eq!(e.field, "spec.rules[0].when[2].key");

        // The other way: the proto's paths.
        let mut a = v1::Authorization::try_from(&policies()[0]).expect("converts");
        a.rules[0].from[0]
            .source
            .as_mut()
            .expect("source")
            .principals[1]
            .match_type = None;
        let e = AuthorizationPolicy::try_from(&a).expect_err("an unset match");
        assert_eq!(e.field, "rules[0].from[0].source.principals[1]");
        let mut a = v1::Authorization::try_from(&policies()[0]).expect("converts");
        a.rules[0].from[1]
            .source
            .as_mut()
            .expect("source")
            .ip_blocks[0]
            .prefix_len = 33;
        let e = AuthorizationPolicy::try_from(&a).expect_err("a bad prefix");
        assert_eq!(e.field, "rules[0].from[1].source.ip_blocks[0]");
        a.action = 9;
        assert_eq!(
            AuthorizationPolicy::try_from(&a).expect_err("action").field,
            "action"
        );
    }

    #[test]
    fn patterns_are_spelt_as_the_language_spells_them() {
        for p in ["*", "a*", "*a", "a", "", "**", "*a*", "a*b"] {
            assert_eq!(pattern(&string_match(p)).as_deref(), Ok(p), "{p:?}");
        }
        assert_eq!(
            string_match("**").match_type,
            Some(MatchType::Prefix("*".into())),
            "a trailing `*` is read first, as the proxy always read it"
        );
        for unspellable in [
            MatchType::Exact("a*".into()),
            MatchType::Exact("*".into()),
            MatchType::Prefix("".into()),
            MatchType::Suffix("a*".into()),
        ] {
            let m = v1::StringMatch {
                match_type: Some(unspellable),
            };
            assert!(pattern(&m).is_err(), "{m:?}");
        }
    }

    #[test]
    fn cidrs_are_checked() {
        for s in [
            "10.0.0.0/8",
            "10.1.2.3/32",
            "::/0",
            "fd00::1/128",
            "10.1.2.3/8",
        ] {
            let n: IpNet = s.parse().expect("net");
            assert_eq!(ip_net(&cidr(n)), Ok(n), "{s}");
        }
        for (c, why) in [
            (
                v1::Cidr {
                    address: vec![10, 0, 0],
                    prefix_len: 8,
                },
                "4 or 16 bytes",
            ),
            (
                v1::Cidr {
                    address: vec![10, 0, 0, 0],
                    prefix_len: 33,
                },
                "longer than the address",
            ),
            (
                v1::Cidr {
                    address: vec![0; 16],
                    prefix_len: 300,
                },
                "longer than the address",
            ),
        ] {
            let e = ip_net(&c).expect_err("invalid");
            assert!(e.contains(why), "{e}");
        }
    }

    #[test]
    fn enums_round_trip() {
        for d in [
            DefaultPolicy::Allow,
            DefaultPolicy::Deny,
            DefaultPolicy::Authenticated,
        ] {
            assert_eq!(DefaultPolicy::from_proto(d.to_proto() as i32), Some(d));
        }
        for a in [Action::Allow, Action::Deny, Action::Audit] {
            assert_eq!(Action::from_proto(a.to_proto() as i32), Some(a));
        }
        assert_eq!(DefaultPolicy::from_proto(7), None);
        assert_eq!(Action::from_proto(7), None);
    }
}
