//! Request-path normalization before authorization, as Istio's `pathNormalization` does.
//!
//! A policy that denies `/admin*` must deny every spelling of `/admin` that the app will read
//! as `/admin`: `/%61dmin`, `/x/../admin`, `/./admin`, `/%2e%2e/admin`, `\admin`. Most app
//! frameworks normalize, so the proxy normalizes first, authorizes the normalized path, and
//! forwards that same path to the app: policy and app see one path.
//!
//! Levels (Istio's names):
//! - `BASE` (default): RFC 3986 §6 — percent-encoded unreserved characters decoded, other
//!   escapes upper-cased, `\` read as `/`, `.` and `..` segments resolved.
//! - `MERGE_SLASHES`: `BASE`, then runs of `/` merged.
//! - `DECODE_AND_MERGE_SLASHES`: `%2F` and `%5C` decoded to `/` too, then `MERGE_SLASHES`.
//!
//! Istio's `NONE` is not offered: skipping normalization would reopen the bypasses above.
//! `%00`, malformed escapes and bytes outside visible ASCII are refused (400), never
//! forwarded. The query string is left as it is; a `#fragment` never reaches us (the `http`
//! crate drops it while parsing the request target).

use std::borrow::Cow;

pub use palisade_api::PathNormalization;

/// Why a path is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path contains an encoded NUL (%00)")]
    Nul,
    #[error("the path contains a malformed percent-escape")]
    BadEscape,
    #[error("the path contains a byte that is not visible ASCII")]
    BadByte,
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Whether `path` may need rewriting at `level`; lets the common case skip all work.
fn needs_work(path: &str, level: PathNormalization) -> bool {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') {
        return true;
    }
    b.iter()
        .any(|&c| matches!(c, b'%' | b'\\') || !(0x21..0x7f).contains(&c))
        || path.contains("/.")
        || (level != PathNormalization::Base && path.contains("//"))
}

/// Normalizes the path part of `path_and_query` (an origin-form request target). Borrows when
/// nothing changes, which is the case for nearly every request.
pub fn normalize(
    path_and_query: &str,
    level: PathNormalization,
) -> Result<Cow<'_, str>, PathError> {
    if path_and_query == "*" {
        return Ok(Cow::Borrowed(path_and_query));
    }
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    if !needs_work(path, level) {
        return Ok(Cow::Borrowed(path_and_query));
    }
    let decode_slashes = level == PathNormalization::DecodeAndMergeSlashes;
    // Pass 1: escapes and backslashes.
    let bytes = path.as_bytes();
    let mut decoded = String::with_capacity(path.len() + 1);
    if !matches!(bytes.first(), Some(b'/' | b'\\')) {
        decoded.push('/');
    }
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        match c {
            b'%' => {
                let (Some(&h), Some(&l)) = (bytes.get(i + 1), bytes.get(i + 2)) else {
                    return Err(PathError::BadEscape);
                };
                let (Some(h), Some(l)) = (hex(h), hex(l)) else {
                    return Err(PathError::BadEscape);
                };
                let v = h * 16 + l;
                if v == 0 {
                    return Err(PathError::Nul);
                }
                if is_unreserved(v) {
                    decoded.push(char::from(v));
                } else if decode_slashes && (v == b'/' || v == b'\\') {
                    decoded.push('/');
                } else {
                    decoded.push('%');
                    decoded.push(char::from(b"0123456789ABCDEF"[usize::from(h)]));
                    decoded.push(char::from(b"0123456789ABCDEF"[usize::from(l)]));
                }
                i += 3;
                continue;
            }
            b'\\' => decoded.push('/'),
            0x21..=0x7e => decoded.push(char::from(c)),
            _ => return Err(PathError::BadByte),
        }
        i += 1;
    }
    // Pass 2: dot segments (RFC 3986 §5.2.4), and merged slashes when asked.
    let merge = level != PathNormalization::Base;
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = decoded[1..].split('/').collect();
    let last = segments.len() - 1;
    for (n, seg) in segments.iter().enumerate() {
        match *seg {
            "." | ".." => {
                if *seg == ".." {
                    out.pop();
                }
                // A trailing dot segment leaves a directory path: `/a/b/..` is `/a/`.
                if n == last {
                    out.push("");
                }
            }
            "" if merge && n != last => {}
            s => out.push(s),
        }
    }
    let mut result = String::with_capacity(decoded.len() + query.map_or(0, |q| q.len() + 1));
    result.push('/');
    result.push_str(&out.join("/"));
    if merge {
        while result.contains("//") {
            result = result.replace("//", "/");
        }
    }
    if let Some(q) = query {
        result.push('?');
        result.push_str(q);
    }
    Ok(Cow::Owned(result))
}

#[cfg(test)]
mod tests {
    use super::PathNormalization::*;
    use super::*;

    fn base(p: &str) -> String {
        normalize(p, Base).expect("valid").into_owned()
    }

    #[test]
    fn istio_bypasses_all_become_admin() {
        for p in [
            "/admin",
            "/%61dmin",
            "/%61%64%6D%69%6E",
            "/x/../admin",
            "/./admin",
            "/%2e%2e/admin",
            "/%2E/admin",
            "\\admin",
            "/x/%2e%2e/admin",
            "/a/b/../../admin",
            "/../../admin",
        ] {
            assert_eq!(base(p), "/admin", "{p}");
        }
    }

    #[test]
    fn base_keeps_what_rfc3986_keeps() {
        assert!(matches!(normalize("/a/b?x=1", Base), Ok(Cow::Borrowed(_))));
        assert_eq!(base("/a/b/"), "/a/b/");
        assert_eq!(base("/a/b/."), "/a/b/");
        assert_eq!(base("/a/b/.."), "/a/");
        assert_eq!(base("/.."), "/");
        assert_eq!(base("/a//b"), "/a//b", "BASE does not merge slashes");
        assert_eq!(
            base("/a%2fb"),
            "/a%2Fb",
            "reserved escapes stay, upper-cased"
        );
        assert_eq!(base("/a%20b"), "/a%20b");
        assert_eq!(base("/..%2f..%2fadmin"), "/..%2F..%2Fadmin");
        assert_eq!(
            base("/p/..?q=/../x"),
            "/?q=/../x",
            "the query is not touched"
        );
        assert_eq!(base("/.well-known/x"), "/.well-known/x");
        assert_eq!(base("/a/.../b"), "/a/.../b");
    }

    #[test]
    fn refused() {
        assert_eq!(normalize("/a%00b", Base), Err(PathError::Nul));
        assert_eq!(normalize("/a%0", Base), Err(PathError::BadEscape));
        assert_eq!(normalize("/a%zz", Base), Err(PathError::BadEscape));
        assert_eq!(normalize("/a\u{e9}", Base), Err(PathError::BadByte));
        assert_eq!(normalize("/a\tb", Base), Err(PathError::BadByte));
    }

    #[test]
    fn merge_levels() {
        assert_eq!(
            normalize("//admin//x", MergeSlashes).expect("valid"),
            "/admin/x"
        );
        assert_eq!(normalize("/a//b/", MergeSlashes).expect("valid"), "/a/b/");
        assert_eq!(
            normalize("/a%2fb", MergeSlashes).expect("valid"),
            "/a%2Fb",
            "MERGE_SLASHES does not decode %2F"
        );
        assert_eq!(
            normalize("/x%2f..%2fadmin", DecodeAndMergeSlashes).expect("valid"),
            "/admin"
        );
        assert_eq!(
            normalize("/%5cadmin%2F%2Fx", DecodeAndMergeSlashes).expect("valid"),
            "/admin/x"
        );
    }
}
