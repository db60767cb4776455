//! The compiled EgressPolicy: which hostnames outside the mesh the app may reach.
//!
//! Rules are tried in order and the first with a matching host decides; a hostname no rule
//! matches, and a connection whose hostname the proxy cannot tell, get the default. Names are
//! compared lower-case without a trailing dot ([`super::normalize_host`] makes them so once per
//! connection), so matching allocates nothing.

use palisade_api::policy::egress::host_pattern_problem;
use palisade_api::v1;

#[derive(Clone, Debug, PartialEq, Eq)]
enum HostPattern {
    Any,
    Exact(Box<str>),
    /// `*.example.com`, kept as `.example.com`: a name that ends with it is under it, and
    /// `example.com` itself is not.
    Under(Box<str>),
}

impl HostPattern {
    fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Any => true,
            HostPattern::Exact(h) => **h == *host,
            HostPattern::Under(suffix) => host.len() > suffix.len() && host.ends_with(&**suffix),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Rule {
    allow: bool,
    hosts: Vec<HostPattern>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EgressPolicy {
    name: Box<str>,
    default_allow: bool,
    rules: Vec<Rule>,
}

/// What the policy says of one destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allow: bool,
    /// The index of the rule that decided; None: the default did.
    pub rule: Option<usize>,
}

impl EgressPolicy {
    /// Compiles the wire form. A host pattern the api's parser would refuse is an error here
    /// too (a config from another control plane is checked, not trusted to be well-formed).
    pub fn compile(p: &v1::EgressPolicy) -> Result<Self, String> {
        let mut rules = Vec::with_capacity(p.rules.len());
        for (i, r) in p.rules.iter().enumerate() {
            let mut hosts = Vec::with_capacity(r.hosts.len());
            for (j, h) in r.hosts.iter().enumerate() {
                if let Some(why) = host_pattern_problem(h) {
                    return Err(format!("rules[{i}].hosts[{j}]: {why}"));
                }
                hosts.push(match h.strip_prefix('*') {
                    None => HostPattern::Exact(h.as_str().into()),
                    Some("") => HostPattern::Any,
                    Some(suffix) => HostPattern::Under(suffix.into()),
                });
            }
            rules.push(Rule {
                allow: r.allow,
                hosts,
            });
        }
        Ok(EgressPolicy {
            name: p.name.as_str().into(),
            default_allow: p.default_allow,
            rules,
        })
    }

    /// `namespace/name`.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn default_allows(&self) -> bool {
        self.default_allow
    }

    /// The decision for `host` (lower case, no trailing dot), or for a connection without a
    /// hostname.
    pub fn decide(&self, host: Option<&str>) -> Decision {
        if let Some(host) = host {
            for (i, r) in self.rules.iter().enumerate() {
                if r.hosts.iter().any(|p| p.matches(host)) {
                    return Decision {
                        allow: r.allow,
                        rule: Some(i),
                    };
                }
            }
        }
        Decision {
            allow: self.default_allow,
            rule: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(default_allow: bool, rules: &[(bool, &[&str])]) -> EgressPolicy {
        EgressPolicy::compile(&v1::EgressPolicy {
            name: "demo/out".into(),
            default_allow,
            rules: rules
                .iter()
                .map(|(allow, hosts)| v1::EgressRule {
                    allow: *allow,
                    hosts: hosts.iter().map(|h| h.to_string()).collect(),
                })
                .collect(),
        })
        .expect("compiles")
    }

    #[test]
    fn the_first_matching_rule_decides_else_the_default() {
        let p = policy(
            true,
            &[(true, &["ok.example.test"]), (false, &["*.example.test"])],
        );
        let allowed = |h: Option<&str>| p.decide(h).allow;
        assert!(allowed(Some("ok.example.test")));
        assert_eq!(p.decide(Some("ok.example.test")).rule, Some(0));
        assert!(!allowed(Some("bad.example.test")));
        assert!(!allowed(Some("a.b.example.test")));
        assert_eq!(p.decide(Some("a.b.example.test")).rule, Some(1));
        // `*.example.test` is not `example.test` itself, nor a name that only ends alike.
        assert!(allowed(Some("example.test")));
        assert!(allowed(Some("badexample.test")));
        assert!(allowed(None));
        assert_eq!(p.decide(None).rule, None);

        let deny_all = policy(false, &[(true, &["api.github.com"])]);
        assert!(deny_all.decide(Some("api.github.com")).allow);
        assert!(!deny_all.decide(Some("github.com")).allow);
        assert!(!deny_all.decide(None).allow);
        let any = policy(false, &[(true, &["*"])]);
        assert!(any.decide(Some("anything.test")).allow);
        assert!(
            !any.decide(None).allow,
            "`*` matches names, not their absence"
        );
    }

    #[test]
    fn a_bad_pattern_on_the_wire_is_refused_naming_it() {
        let e = EgressPolicy::compile(&v1::EgressPolicy {
            name: "demo/out".into(),
            default_allow: true,
            rules: vec![v1::EgressRule {
                allow: false,
                hosts: vec!["ok.test".into(), "Bad.test".into()],
            }],
        })
        .expect_err("refused");
        assert!(e.starts_with("rules[0].hosts[1]: \"Bad.test\""), "{e}");
    }
}
