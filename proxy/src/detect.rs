//! Protocol detection on the first bytes of a connection, bounded in bytes and time.
//!
//! The client speaks first in HTTP and TLS; a server-speaks-first protocol sends nothing, so
//! detection gives up after a short timeout and treats the stream as opaque. Ports and services
//! declared `opaque` skip detection entirely so they never wait.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// HTTP/2 connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Enough to hold the H2 preface, a TLS record header, or an HTTP/1 request line's method.
const DETECT_BYTES: usize = 24;
/// The longest HTTP/1 method recognized (WebDAV's `UPDATEREDIRECTREF` has 17 letters and is
/// treated as opaque).
const MAX_METHOD: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detected {
    Tls,
    Http1,
    Http2,
    Opaque,
    /// The peer closed before sending anything.
    Empty,
}

/// Classifies a prefix. `complete` says no more bytes will come (EOF or timeout).
pub fn classify(buf: &[u8], complete: bool) -> Option<Detected> {
    if buf.is_empty() {
        return complete.then_some(Detected::Empty);
    }
    // TLS handshake record: content type 22, legacy version 3.x.
    if buf[0] == 0x16 {
        if buf.len() < 2 {
            return if complete {
                Some(Detected::Opaque)
            } else {
                None
            };
        }
        return Some(if buf[1] == 0x03 {
            Detected::Tls
        } else {
            Detected::Opaque
        });
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        if n == H2_PREFACE.len() {
            return Some(Detected::Http2);
        }
        if !complete {
            return None;
        }
    }
    // HTTP/1: a method token (at most 16 uppercase letters) followed by a space. Sixteen
    // letters are not yet a verdict: the next byte decides, whichever read it comes in
    // (found by fuzzing: 16 letters then a space was HTTP/1 when read at once, opaque when
    // the space came in a later read).
    for (i, &b) in buf.iter().enumerate() {
        match b {
            b'A'..=b'Z' if i < MAX_METHOD => continue,
            b' ' if i > 0 => return Some(Detected::Http1),
            _ => return Some(Detected::Opaque),
        }
    }
    complete.then_some(Detected::Opaque)
}

/// Reads until the protocol is known, at most [`DETECT_BYTES`] and `timeout`. Returns the
/// bytes read, which must be replayed in front of the stream.
pub async fn detect<T: AsyncRead + Unpin>(
    io: &mut T,
    timeout: Duration,
) -> std::io::Result<(Detected, Bytes)> {
    let mut buf = BytesMut::with_capacity(DETECT_BYTES);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(d) = classify(&buf, false) {
            return Ok((d, buf.freeze()));
        }
        if buf.len() >= DETECT_BYTES {
            let d = classify(&buf, true).unwrap_or(Detected::Opaque);
            return Ok((d, buf.freeze()));
        }
        let mut chunk = [0u8; DETECT_BYTES];
        let want = DETECT_BYTES - buf.len();
        match tokio::time::timeout_at(deadline, io.read(&mut chunk[..want])).await {
            Ok(Ok(0)) => {
                let d = classify(&buf, true).unwrap_or(Detected::Opaque);
                return Ok((d, buf.freeze()));
            }
            // Nothing more within the timeout: a server-speaks-first protocol, or a client
            // that stalls mid-line; either way, not something to parse.
            Err(_) => {
                let d = match classify(&buf, true) {
                    Some(Detected::Empty) | None => Detected::Opaque,
                    Some(d) => d,
                };
                return Ok((d, buf.freeze()));
            }
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies() {
        assert_eq!(
            classify(b"GET / HTTP/1.1\r\n", false),
            Some(Detected::Http1)
        );
        assert_eq!(classify(b"POST", false), None);
        assert_eq!(classify(b"POST", true), Some(Detected::Opaque));
        assert_eq!(classify(H2_PREFACE, false), Some(Detected::Http2));
        assert_eq!(classify(b"PRI * HT", false), None);
        assert_eq!(classify(&[0x16, 0x03, 0x01], false), Some(Detected::Tls));
        assert_eq!(classify(&[0x16, 0x00], false), Some(Detected::Opaque));
        assert_eq!(classify(b"\x00\x01garbage", false), Some(Detected::Opaque));
        assert_eq!(classify(b"get / ", false), Some(Detected::Opaque));
        assert_eq!(classify(b"", true), Some(Detected::Empty));
        assert_eq!(classify(b"", false), None);
    }

    /// The verdict on a prefix is the verdict on more bytes, however the reads split them.
    #[test]
    fn sixteen_letters_wait_for_the_next_byte() {
        let method = b"ABCDEFGHIJKLMNOP";
        assert_eq!(classify(method, false), None);
        assert_eq!(classify(method, true), Some(Detected::Opaque));
        assert_eq!(
            classify(b"ABCDEFGHIJKLMNOP / HTTP/1.1", false),
            Some(Detected::Http1)
        );
        assert_eq!(
            classify(b"ABCDEFGHIJKLMNOPQ / HTTP/1.1", false),
            Some(Detected::Opaque)
        );
        assert_eq!(
            classify(b"ABCDEFGHIJKLMNOPQ", false),
            Some(Detected::Opaque)
        );
    }

    #[tokio::test]
    async fn server_speaks_first_times_out_to_opaque() {
        let (mut a, _b) = tokio::io::duplex(64);
        let (d, buf) = detect(&mut a, Duration::from_millis(50)).await.unwrap();
        assert_eq!(d, Detected::Opaque);
        assert!(buf.is_empty());
    }

    #[tokio::test]
    async fn split_preface_is_reassembled() {
        let (mut a, mut b) = tokio::io::duplex(64);
        use tokio::io::AsyncWriteExt;
        b.write_all(&H2_PREFACE[..5]).await.unwrap();
        let w = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            b.write_all(&H2_PREFACE[5..]).await.unwrap();
            b
        });
        let (d, buf) = detect(&mut a, Duration::from_secs(2)).await.unwrap();
        assert_eq!(d, Detected::Http2);
        assert_eq!(&buf[..], H2_PREFACE);
        drop(w.await.unwrap());
    }
}
