//! The release link layout (build.rs): `link/symbol-order.txt` must stay a list lld can use.
//! A regeneration that went wrong (an empty profile, callgrind's decorations left in, the
//! wrong binary profiled) would not fail the link (stale names are skipped on purpose) but
//! would quietly give back the ~4 MiB per proxy the layout saves; this catches it.

use std::collections::HashSet;

#[test]
fn the_symbol_order_is_a_plain_list_of_the_sidecars_request_path() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/link/symbol-order.txt");
    let text = std::fs::read_to_string(path).expect("link/symbol-order.txt");
    let names: Vec<&str> = text.lines().collect();
    // A proxy runs ~2,000 functions of its own binary; a few hundred means the profile missed
    // the request path (or recorded some other binary).
    assert!(names.len() > 1000, "only {} names in {path}", names.len());
    let mut seen = HashSet::new();
    for name in &names {
        assert!(!name.is_empty(), "an empty line in {path}");
        assert!(
            !name.contains(char::is_whitespace) && !name.contains('\''),
            "not a bare symbol name (callgrind's decorations or a demangled name?): {name:?}"
        );
        assert!(
            !name.starts_with("0x"),
            "an address, not a symbol: {name:?}"
        );
        assert!(seen.insert(*name), "listed twice: {name:?}");
    }
    // The request path of both sides: h2 framing, hyper's HTTP/1 and the proxy's own stack,
    // in the mangled forms rustc uses (legacy `_ZN` and v0 `_R`).
    for part in ["h2", "hyper", "palisade_proxy", "rustls"] {
        assert!(
            names.iter().any(|n| n.contains(part)),
            "nothing of {part} in {path}: was the profile of palisade-proxy under load?"
        );
    }
}
