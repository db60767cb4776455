//! The hostname a redirected connection names, read from its first bytes without consuming
//! them: a TLS ClientHello's SNI, or an HTTP/1 request's Host header.
//!
//! Bounded in bytes ([`MAX_PEEK`]) and time (the detect timeout); what was read is replayed in
//! front of the stream. A malformed or truncated hello, an HTTP/2 prior-knowledge connection
//! (its `:authority` is HPACK-encoded) and anything else have no hostname.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::detect::{self, Detected};

/// The most bytes read looking for a hostname: a ClientHello fits in one 16 KiB record, and
/// request headers past 16 KiB are not worth waiting for.
pub const MAX_PEEK: usize = 16 * 1024 + 5;
/// Largest TLS record payload a peer may send (2^14, RFC 8446 §5.1).
const MAX_RECORD: usize = 16 * 1024;

/// What a parser made of the bytes so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Peeked {
    /// Not enough bytes to tell.
    NeedMore,
    /// The hostname, as sent (not yet normalized).
    Host(String),
    /// There is no hostname to find.
    NoHost,
}

/// What the first bytes of a connection said.
pub struct Sniffed {
    /// `tls`, `http` or `tcp`, the `protocol` label.
    pub protocol: &'static str,
    /// Lower case, without a trailing dot; None when the connection names no valid hostname.
    pub host: Option<String>,
    /// The bytes read, to replay.
    pub prefix: Bytes,
}

pub fn protocol_label(d: Detected) -> &'static str {
    match d {
        Detected::Tls => "tls",
        Detected::Http1 | Detected::Http2 => "http",
        Detected::Opaque | Detected::Empty => "tcp",
    }
}

/// Reads until the protocol and the hostname are known, at most [`MAX_PEEK`] bytes and
/// `timeout` in all.
pub async fn sniff<T: AsyncRead + Unpin>(
    io: &mut T,
    timeout: Duration,
) -> std::io::Result<Sniffed> {
    let deadline = tokio::time::Instant::now() + timeout;
    let (detected, first) = detect::detect(io, timeout).await?;
    let protocol = protocol_label(detected);
    let parse: fn(&[u8]) -> Peeked = match detected {
        Detected::Tls => client_hello_sni,
        Detected::Http1 => http1_host,
        _ => {
            return Ok(Sniffed {
                protocol,
                host: None,
                prefix: first,
            });
        }
    };
    let mut buf = BytesMut::with_capacity(first.len().max(1024));
    buf.extend_from_slice(&first);
    let host = loop {
        match parse(&buf) {
            Peeked::Host(h) => break super::normalize_host(&h),
            Peeked::NoHost => break None,
            Peeked::NeedMore if buf.len() >= MAX_PEEK => break None,
            Peeked::NeedMore => {
                let mut chunk = [0u8; 4096];
                let want = chunk.len().min(MAX_PEEK - buf.len());
                match tokio::time::timeout_at(deadline, io.read(&mut chunk[..want])).await {
                    Ok(Ok(0)) | Err(_) => break None,
                    Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
                    Ok(Err(e)) => return Err(e),
                }
            }
        }
    };
    Ok(Sniffed {
        protocol,
        host,
        prefix: buf.freeze(),
    })
}

/// The handshake message at the start of `buf`, reassembled from consecutive handshake
/// records when a client split it (borrowed when it fits in the first record, as it nearly
/// always does).
fn handshake(buf: &[u8]) -> Result<std::borrow::Cow<'_, [u8]>, Peeked> {
    let mut msg: Vec<u8> = Vec::new();
    let mut pos = 0;
    loop {
        let Some(header) = buf.get(pos..pos + 5) else {
            return Err(Peeked::NeedMore);
        };
        if header[0] != 0x16 || header[1] != 0x03 {
            return Err(Peeked::NoHost);
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 || len > MAX_RECORD {
            return Err(Peeked::NoHost);
        }
        let Some(payload) = buf.get(pos + 5..pos + 5 + len) else {
            return Err(Peeked::NeedMore);
        };
        pos += 5 + len;
        if msg.is_empty() {
            // A ClientHello, or nothing worth reading on.
            if payload[0] != 1 {
                return Err(Peeked::NoHost);
            }
            if let Some(n) = needed(payload)
                && n <= payload.len()
            {
                return Ok(std::borrow::Cow::Borrowed(&payload[..n]));
            }
        }
        msg.extend_from_slice(payload);
        match needed(&msg) {
            Some(n) if n > MAX_PEEK => return Err(Peeked::NoHost),
            Some(n) if n <= msg.len() => {
                msg.truncate(n);
                return Ok(std::borrow::Cow::Owned(msg));
            }
            _ => {}
        }
    }
}

/// The length of the handshake message (its 4-byte header included) once the header is in.
fn needed(msg: &[u8]) -> Option<usize> {
    let h = msg.get(..4)?;
    Some(4 + (usize::from(h[1]) << 16 | usize::from(h[2]) << 8 | usize::from(h[3])))
}

/// A cursor that fails (None) past the end instead of panicking.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| usize::from(b[0]))
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(n)
    }
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(n)
    }
}

/// The SNI host name of a TLS ClientHello (RFC 8446 §4.1.2, RFC 6066 §3).
pub fn client_hello_sni(buf: &[u8]) -> Peeked {
    let msg = match handshake(buf) {
        Ok(m) => m,
        Err(p) => return p,
    };
    parse_client_hello(&msg).map_or(Peeked::NoHost, Peeked::Host)
}

fn parse_client_hello(msg: &[u8]) -> Option<String> {
    // The handshake header (type 1, length) is checked by `handshake`; the body follows.
    let mut r = Reader(msg.get(4..)?);
    r.take(2 + 32)?; // legacy_version, random
    r.vec8()?; // legacy_session_id
    r.vec16()?; // cipher_suites
    r.vec8()?; // legacy_compression_methods
    let mut exts = Reader(r.vec16()?);
    while !exts.0.is_empty() {
        let kind = exts.u16()?;
        let data = exts.vec16()?;
        if kind != 0 {
            continue;
        }
        let mut list = Reader(Reader(data).vec16()?);
        while !list.0.is_empty() {
            let name_type = list.u8()?;
            let name = list.vec16()?;
            if name_type == 0 {
                return std::str::from_utf8(name).ok().map(str::to_string);
            }
        }
        return None;
    }
    None
}

/// The Host of an HTTP/1 request: the Host header, else the authority of an absolute-form
/// target (`GET http://host/ HTTP/1.1`); the port is dropped.
pub fn http1_host(buf: &[u8]) -> Peeked {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) => Peeked::NeedMore,
        Err(_) => Peeked::NoHost,
        Ok(httparse::Status::Complete(_)) => {
            let authority = req
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("host"))
                .and_then(|h| std::str::from_utf8(h.value).ok())
                .or_else(|| {
                    let target = req.path?;
                    let rest = target
                        .strip_prefix("http://")
                        .or_else(|| target.strip_prefix("https://"))?;
                    Some(rest.split(['/', '?', '#']).next().unwrap_or(rest))
                });
            match authority.map(str::trim).and_then(without_port) {
                Some(h) => Peeked::Host(h.to_string()),
                None => Peeked::NoHost,
            }
        }
    }
}

/// `host[:port]` without the port; None for an IPv6 literal (`[::1]:80`), which names no host.
fn without_port(authority: &str) -> Option<&str> {
    if authority.starts_with('[') || authority.is_empty() {
        return None;
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => Some(host),
        Some(_) => None,
        None => Some(authority),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello as a client writes it, with the extensions given (type, data).
    fn client_hello(exts: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend([7u8; 32]);
        body.push(32);
        body.extend([9u8; 32]);
        body.extend([0, 4, 0x13, 0x01, 0x13, 0x02]);
        body.extend([1, 0]);
        let mut ext_bytes = Vec::new();
        for (t, d) in exts {
            ext_bytes.extend(t.to_be_bytes());
            ext_bytes.extend((d.len() as u16).to_be_bytes());
            ext_bytes.extend(d);
        }
        body.extend((ext_bytes.len() as u16).to_be_bytes());
        body.extend(ext_bytes);
        let mut msg = vec![1];
        msg.extend(&(body.len() as u32).to_be_bytes()[1..]);
        msg.extend(body);
        msg
    }

    fn sni_ext(name: &str) -> (u16, Vec<u8>) {
        let mut entry = vec![0];
        entry.extend((name.len() as u16).to_be_bytes());
        entry.extend(name.as_bytes());
        let mut d = (entry.len() as u16).to_be_bytes().to_vec();
        d.extend(entry);
        (0, d)
    }

    /// `msg` in TLS records of at most `max` bytes of payload each.
    fn records(msg: &[u8], max: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in msg.chunks(max) {
            out.extend([0x16, 0x03, 0x01]);
            out.extend((chunk.len() as u16).to_be_bytes());
            out.extend(chunk);
        }
        out
    }

    #[test]
    fn finds_the_sni_among_other_extensions() {
        let hello = client_hello(&[
            (10, vec![0, 2, 0, 29]),
            sni_ext("Api.Example.test"),
            (16, vec![0, 3, 2, b'h', b'2']),
        ]);
        let wire = records(&hello, MAX_RECORD);
        assert_eq!(
            client_hello_sni(&wire),
            Peeked::Host("Api.Example.test".into())
        );
        // Every shorter prefix asks for more, never panics, never guesses.
        for n in 0..wire.len() {
            assert_eq!(client_hello_sni(&wire[..n]), Peeked::NeedMore, "{n}");
        }
    }

    #[test]
    fn a_hello_split_over_records_is_reassembled() {
        let hello = client_hello(&[(21, vec![0; 600]), sni_ext("split.example.test")]);
        let wire = records(&hello, 100);
        assert!(wire.len() > 700);
        assert_eq!(
            client_hello_sni(&wire),
            Peeked::Host("split.example.test".into())
        );
        assert_eq!(client_hello_sni(&wire[..wire.len() - 1]), Peeked::NeedMore);
    }

    #[test]
    fn no_sni_or_garbage_has_no_host() {
        let hello = client_hello(&[(10, vec![0, 2, 0, 29])]);
        assert_eq!(
            client_hello_sni(&records(&hello, MAX_RECORD)),
            Peeked::NoHost
        );
        // Not a handshake record, an alert, a ServerHello, a zero-length record.
        assert_eq!(client_hello_sni(b"GET / HTTP/1.1\r\n"), Peeked::NoHost);
        assert_eq!(
            client_hello_sni(&[0x15, 0x03, 0x03, 0, 2, 2, 40]),
            Peeked::NoHost
        );
        let mut server_hello = client_hello(&[sni_ext("x.test")]);
        server_hello[0] = 2;
        assert_eq!(
            client_hello_sni(&records(&server_hello, MAX_RECORD)),
            Peeked::NoHost
        );
        assert_eq!(client_hello_sni(&[0x16, 0x03, 0x01, 0, 0]), Peeked::NoHost);
        // Lengths that point past the message: malformed, not a panic.
        let mut bad = client_hello(&[sni_ext("x.test")]);
        let n = bad.len();
        bad[n - 8] = 0xff;
        assert_eq!(client_hello_sni(&records(&bad, MAX_RECORD)), Peeked::NoHost);
        // A handshake claiming more than the peek bound is not waited for.
        assert_eq!(
            client_hello_sni(&[0x16, 0x03, 0x01, 0, 4, 1, 0xff, 0xff, 0xff]),
            Peeked::NoHost
        );
    }

    #[test]
    fn finds_the_host_of_an_http1_request() {
        let host = |s: &str| http1_host(s.as_bytes());
        assert_eq!(
            host("GET / HTTP/1.1\r\nAccept: */*\r\nhOsT: app.example.test:8080\r\n\r\n"),
            Peeked::Host("app.example.test".into())
        );
        assert_eq!(
            host("GET http://abs.example.test/x?y HTTP/1.1\r\n\r\n"),
            Peeked::Host("abs.example.test".into())
        );
        assert_eq!(host("GET / HTTP/1.1\r\nHost: a.test\r\n"), Peeked::NeedMore);
        assert_eq!(host("GET / HTTP/1.0\r\n\r\n"), Peeked::NoHost);
        assert_eq!(
            host("GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n"),
            Peeked::NoHost
        );
        assert_eq!(
            host("GET / HTTP/1.1\r\nHost: a.test:x\r\n\r\n"),
            Peeked::NoHost
        );
        assert_eq!(host("\x00\x01 not http\r\n\r\n"), Peeked::NoHost);
    }

    #[tokio::test]
    async fn sniff_reads_what_it_needs_and_replays_it() {
        use tokio::io::AsyncWriteExt;
        let hello = records(&client_hello(&[sni_ext("Slow.Example.test.")]), MAX_RECORD);
        let (mut a, mut b) = tokio::io::duplex(64 * 1024);
        let sent = hello.clone();
        let w = tokio::spawn(async move {
            // In three writes, as a slow client would.
            for part in sent.chunks(40) {
                b.write_all(part).await.expect("write");
                tokio::task::yield_now().await;
            }
            b
        });
        let s = sniff(&mut a, Duration::from_secs(5)).await.expect("sniff");
        assert_eq!(s.protocol, "tls");
        assert_eq!(s.host.as_deref(), Some("slow.example.test"));
        assert_eq!(&s.prefix[..], &hello[..]);
        drop(w.await.expect("writer"));

        let (mut a, mut b) = tokio::io::duplex(1024);
        b.write_all(b"SSH-2.0-x\r\n").await.expect("write");
        let s = sniff(&mut a, Duration::from_millis(200))
            .await
            .expect("sniff");
        assert_eq!((s.protocol, s.host), ("tcp", None));
        assert_eq!(&s.prefix[..], b"SSH-2.0-x\r\n");
    }
}
