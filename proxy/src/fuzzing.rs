//! Entry points of the fuzz targets (`fuzz/fuzz_targets/`) and of the corpus replay test
//! (`tests/fuzz_corpus.rs`), shared so that they cannot drift apart. Each takes raw bytes,
//! runs the real parser, asserts what must hold of whatever it returns, and says whether the
//! input was accepted. A panic is a bug. Not an API: hidden from the docs.

use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use crate::config::{MtlsMode, Snapshot};
use crate::detect::{Detected, classify, detect};
use crate::egress::normalize_host;
use crate::egress::peek::{MAX_PEEK, Peeked, client_hello_sni, http1_host};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a current-thread runtime")
    })
}

/// A few places to cut `data` at, to check that a decision taken on fewer bytes is the one
/// taken on all of them (the sniffers stop reading at their first decision).
fn cuts(len: usize) -> impl Iterator<Item = usize> {
    [1, len / 4, len / 2, 3 * len / 4, len.saturating_sub(1)]
        .into_iter()
        .filter(move |&n| n < len)
}

/// The first bytes of a connection, as the inbound and outbound listeners and the egress
/// sniffer see them: protocol detection, then the ClientHello's SNI or the HTTP/1 Host.
pub fn detect_and_peek(data: &[u8]) -> bool {
    // classify: with every prefix, a decision is final, and `complete` always decides.
    let mut decided: Option<(usize, Detected)> = None;
    for n in 0..=data.len().min(64) {
        let p = &data[..n];
        let open = classify(p, false);
        let closed = classify(p, true);
        assert!(closed.is_some(), "{p:?}");
        if let Some(d) = open {
            assert_eq!(closed, Some(d), "{p:?}");
        }
        match (decided, open) {
            (Some((at, d)), got) => assert_eq!(got, Some(d), "decided {d:?} at {at}, {p:?}"),
            (None, Some(d)) => decided = Some((n, d)),
            (None, None) => {}
        }
    }
    // detect over a reader that hands out the bytes and then EOF: it reads at most what it
    // needs, returns exactly what it read, and agrees with classify.
    let mut reader = data;
    let (d, prefix) = runtime()
        .block_on(detect(&mut reader, Duration::from_secs(5)))
        .expect("reading a slice cannot fail");
    assert!(data.starts_with(&prefix));
    assert!(prefix.len() <= 24);
    if let Some(want) = classify(&prefix, prefix.len() == data.len()) {
        assert_eq!(d, want, "{prefix:?}");
    }
    // The egress sniffers: a decision on a prefix is the decision on the whole.
    let sni = client_hello_sni(data);
    let host = http1_host(data);
    for n in cuts(data.len()) {
        match client_hello_sni(&data[..n]) {
            Peeked::NeedMore => {}
            early => assert_eq!(early, sni, "SNI at {n}"),
        }
        match http1_host(&data[..n]) {
            Peeked::NeedMore => {}
            early => assert_eq!(early, host, "Host at {n}"),
        }
    }
    if data.len() >= MAX_PEEK + 5 {
        assert_ne!(
            sni,
            Peeked::NeedMore,
            "a ClientHello may not ask past MAX_PEEK"
        );
    }
    let mut found = false;
    for h in [&sni, &host] {
        if let Peeked::Host(h) = h {
            assert!(h.len() <= data.len());
            if let Some(norm) = normalize_host(h) {
                assert!(!norm.ends_with('.') && !norm.is_empty());
                assert_eq!(norm, norm.to_ascii_lowercase());
                assert_eq!(normalize_host(&norm).as_deref(), Some(norm.as_str()));
                found = true;
            }
        }
    }
    found || matches!(d, Detected::Http1 | Detected::Http2 | Detected::Tls)
}

/// The static proxy config file (`palisade proxy --config FILE`, no control plane).
pub fn static_config(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    match Snapshot::parse_static(text, Path::new("fuzz.yaml")) {
        Ok(s) => {
            for port in [1, 80, 4143, 65535] {
                assert_ne!(s.inbound.mode_for(port), MtlsMode::Unset);
            }
            for (key, svc) in &s.services {
                assert_eq!(key, &svc.key);
                assert!(
                    key.rsplit_once(':')
                        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
                );
            }
            true
        }
        Err(e) => {
            assert!(e.to_string().contains("fuzz.yaml"), "{e}");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seeds_of_the_tests_pass() {
        assert!(detect_and_peek(
            b"GET / HTTP/1.1\r\nHost: a.example.test\r\n\r\n"
        ));
        assert!(detect_and_peek(crate::detect::H2_PREFACE));
        assert!(!detect_and_peek(b"\x00\x01garbage"));
        assert!(static_config(b"services: []\n"));
        assert!(!static_config(b"services: 7\n"));
    }
}
