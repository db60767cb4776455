//! The JSON schema side of the policy types (feature `schema`): the string patterns and
//! cross-field rules that let a Kubernetes API server refuse, at `kubectl apply`, what
//! [`parse_str`](super::parse_str) refuses. They live next to the parser so that a change to a
//! rule there has its schema counterpart here; the control plane's CRD tests check the two
//! agree, case by case.
//!
//! Patterns are RE2-compatible (what the API server runs) and ECMA-compatible (what JSON-schema
//! validators run): no look-around, no backreferences, no backslash classes. What a structural
//! schema cannot say (that an IPv6 block is well formed, the exact SPIFFE ID length limit) is
//! still refused by the control plane's parser when it reads the object.

use schemars::Schema;
use serde_json::json;

/// A SPIFFE ID path segment: letters, digits, `.`, `-`, `_`, but not `.` or `..`.
macro_rules! seg {
    () => {
        r"(?:[A-Za-z0-9_-][A-Za-z0-9._-]*|\.[A-Za-z0-9_-][A-Za-z0-9._-]*|\.\.[A-Za-z0-9._-]+)"
    };
}

/// Exact, `prefix*`, `*suffix` or `*`: one `*`, at the start or the end, never both.
pub const WILDCARD: &str = r"^(?:\*|\*?[^*]+|[^*]+\*)$";

/// A port number 1-65535 as Rust's `u32` parser reads it (a leading `+` and zeros allowed).
pub const PORT: &str = "^[+]?0*(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])$";

/// A principal pattern that can match a caller (see [`principal_problem`](super::principal_problem)):
/// an optional `spiffe://`, then `*`, a SPIFFE ID with a path (lower-case trust domain, path
/// segments of letters, digits, `.`, `-`, `_`, no `.`/`..`/empty segment), a valid beginning
/// of one followed by `*`, or `*` followed by a valid end of one.
pub const PRINCIPAL: &str = concat!(
    "^(?:spiffe://)?(?:",
    r"\*",
    "|[a-z0-9._-]{1,255}(?:/",
    seg!(),
    ")+",
    "|[a-z0-9._-]{1,255}(?:(?:/",
    seg!(),
    r")*/[A-Za-z0-9._-]*)?\*",
    r"|\*(?:(?:/",
    seg!(),
    ")+|[A-Za-z0-9._-]+(?:/",
    seg!(),
    ")*)",
    ")$"
);

/// A namespace pattern that can match a caller's namespace (one SPIFFE ID path segment; see
/// [`namespace_problem`](super::namespace_problem)).
pub const NAMESPACE: &str = concat!(
    r"^(?:\*|",
    seg!(),
    r"|[A-Za-z0-9._-]+\*|\*[A-Za-z0-9._-]+)$"
);

/// An IPv4 address or CIDR block exactly, or something shaped like an IPv6 one (hex digits,
/// `:` and `.` with at least one `:`, prefix length up to 128); the parser checks IPv6 fully.
pub const IP_BLOCK: &str = concat!(
    "^(?:",
    "(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])[.]){3}",
    "(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(?:/(?:3[0-2]|[12]?[0-9]))?",
    "|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*(?:/(?:12[0-8]|1[01][0-9]|[1-9]?[0-9]))?",
    ")$"
);

/// The supported `when` keys ([`CONDITION_KEYS`](super::CONDITION_KEYS)); a header name is an
/// HTTP token.
pub const CONDITION_KEY: &str = r"^(?:request\.headers\[[-!#$%&'*+.^_`|~0-9A-Za-z]+\]|source\.ip|source\.namespace|source\.principal|destination\.port)$";

/// The `when` keys whose values are plain wildcard patterns.
const PLAIN_CONDITION_KEY: &str =
    r"^(?:request\.headers\[[-!#$%&'*+.^_`|~0-9A-Za-z]+\]|destination\.port)$";

/// Longest principal or namespace pattern worth storing: a SPIFFE ID is at most 2048 bytes.
pub const MAX_ID_PATTERN_LEN: u32 = 2048;

/// One `x-kubernetes-validations` rule (CEL, run by the API server).
fn cel(rule: &str, message: &str) -> serde_json::Value {
    json!({ "rule": rule, "message": message })
}

/// `rules[].when[]`: `values` or `notValues` must be there (CEL).
pub fn condition(schema: &mut Schema) {
    schema.insert(
        "x-kubernetes-validations".into(),
        json!([cel(
            "has(self.values) || has(self.notValues)",
            "a condition needs `values` or `notValues`",
        )]),
    );
}

/// The `anyOf` of a `rules[].when[]` schema: `source.principal` takes principal patterns,
/// `source.namespace` namespace patterns, `source.ip` IP blocks (the proxy compares
/// addresses, not strings), the other keys plain wildcard patterns (the core
/// schema of `values` says nothing: `spiffe://*/sa/api` is a principal, not a wildcard).
///
/// Not added by [`condition`]: kube's CRD generator reads every `anyOf` as an untagged enum
/// and merges its branches into one object schema, which would lose what they say. The
/// control plane's CRD code adds it to the generated CRD instead.
pub fn condition_values_any_of() -> serde_json::Value {
    let branch = |key: serde_json::Value, pattern: &str| {
        json!({ "properties": {
            "key": key,
            "values": { "items": { "pattern": pattern } },
            "notValues": { "items": { "pattern": pattern } },
        } })
    };
    json!([
        branch(json!({ "enum": ["source.principal"] }), PRINCIPAL),
        branch(json!({ "enum": ["source.namespace"] }), NAMESPACE),
        branch(json!({ "enum": ["source.ip"] }), IP_BLOCK),
        branch(json!({ "pattern": PLAIN_CONDITION_KEY }), WILDCARD),
    ])
}

/// `from[].source` and `to[].operation` name at least one field. The local parser accepts an
/// empty one (it matches everything), but on Kubernetes an empty one is what the API server
/// leaves of a misspelt field after pruning it, and "match every caller" is the wrong thing
/// to do with a typo.
pub fn not_empty(schema: &mut Schema) {
    schema.insert("minProperties".into(), json!(1));
}

/// PeerAuthentication's spec: port-level mTLS needs a selector (Istio's rule and the parser's).
pub fn peer_authentication_spec(schema: &mut Schema) {
    schema.insert(
        "x-kubernetes-validations".into(),
        json!([cel(
            "!has(self.portLevelMtls) || size(self.portLevelMtls) == 0 || has(self.selector)",
            "port-level mTLS needs a workload selector (as in Istio)",
        )]),
    );
}

/// `portLevelMtls`: a map from port number (a string key, as in Istio) to a mode.
pub fn port_level_mtls(schema: &mut Schema) {
    // schemars says "integer keys" with `patternProperties` and `additionalProperties: false`,
    // neither of which a structural schema may use: the value schema becomes
    // `additionalProperties`, and CEL checks the keys. The parser reads a key as a JSON
    // number: no `+`, no leading zero, and an `int()` error (not a number) refuses the
    // object too. Only constant-cost functions on the keys (Istio's rule is
    // `0 < int(key) <= 65535`): map keys have no length bound for the API server's CEL cost
    // estimate, so nothing that walks the key (`matches`, `==` on strings) fits its budget.
    let value = schema.remove("patternProperties").and_then(|p| match p {
        serde_json::Value::Object(m) => m.into_iter().next().map(|(_, v)| v),
        _ => None,
    });
    schema.remove("propertyNames");
    match value {
        Some(v) => {
            schema.insert("additionalProperties".into(), v);
        }
        None => {
            schema.remove("additionalProperties");
        }
    }
    schema.insert(
        "x-kubernetes-validations".into(),
        json!([cel(
            "self.all(port, !port.startsWith('+') && !port.startsWith('0') && int(port) >= 1 && int(port) <= 65535)",
            "portLevelMtls keys are port numbers (1-65535)",
        )]),
    );
}
