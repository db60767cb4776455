//! HTTP/2 abuse against every HTTP/2 listener of a proxy pair — the inbound port (over mTLS,
//! with a valid mesh certificate: an insider) and the outbound listener the app talks to —
//! while legitimate requests flow through the same listeners. Each attack is written frame by
//! frame, as an attacker would; the defences are hyper's and h2's, the proxy's job is to
//! configure them, count them (`palisade_http_connection_errors_total{reason}`) and keep
//! serving. Every test prints its figures (legitimate success and p99 during the attack, the
//! attack's progress, the process's RSS) for docs/reliability.md.
//!
//! - rapid reset (CVE-2023-44487): HEADERS then RST_STREAM, thousands of times;
//! - provoked resets: malformed requests the proxy must reset, one after another;
//! - CONTINUATION flood: one header block that never ends;
//! - HPACK bomb: a 4 KB header put in the dynamic table, then referenced one byte at a time;
//! - oversized HTTP/1.1 request heads (100 KiB of headers).

mod support;

use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const CANCEL: u32 = 0x8;
const ENHANCE_YOUR_CALM: u32 = 0xb;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    assert!(len < 1 << 24);
    let mut f = Vec::with_capacity(9 + len);
    f.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HPACK for `GET /` to api.demo: static-table indices and one literal (no Huffman).
fn get_block() -> Vec<u8> {
    let authority = b"api.demo";
    let mut b = vec![0x82, 0x86, 0x84, 0x01, authority.len() as u8];
    b.extend_from_slice(authority);
    b
}

/// An HPACK string literal's length prefix (7-bit prefix, no Huffman).
fn hpack_len(out: &mut Vec<u8>, mut n: usize) {
    if n < 127 {
        out.push(n as u8);
        return;
    }
    out.push(127);
    n -= 127;
    while n >= 128 {
        out.push((n % 128) as u8 | 0x80);
        n /= 128;
    }
    out.push(n as u8);
}

/// What the server sent back: whether it said GOAWAY, and with which code.
#[derive(Debug, Default)]
struct Heard {
    goaway: Option<u32>,
    /// The GOAWAY's last stream id: the highest stream the proxy says it processed.
    last_stream: u32,
    closed: bool,
    bytes: usize,
}

/// Reads the server's frames until it closes (or `limit` passes), noting a GOAWAY.
async fn listen<R: AsyncRead + Unpin>(mut r: R, limit: Duration) -> Heard {
    let mut heard = Heard::default();
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, r.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                heard.closed = true;
                break;
            }
            Ok(Ok(n)) => {
                heard.bytes += n;
                buf.extend_from_slice(&chunk[..n]);
                // Frames: 3 bytes length, type, flags, stream id.
                while buf.len() >= 9 {
                    let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
                    if buf.len() < 9 + len {
                        break;
                    }
                    if buf[3] == GOAWAY && len >= 8 {
                        heard.last_stream =
                            u32::from_be_bytes([buf[9], buf[10], buf[11], buf[12]]) & 0x7fff_ffff;
                        heard.goaway =
                            Some(u32::from_be_bytes([buf[13], buf[14], buf[15], buf[16]]));
                    }
                    buf.drain(..9 + len);
                }
            }
            Err(_) => break,
        }
    }
    heard
}

#[derive(Clone, Copy, Debug)]
enum Target {
    /// The server proxy's inbound port, over mTLS with web's valid certificate, HTTP/1.1
    /// (ALPN `http/1.1`).
    InboundH1,
    /// The server proxy's inbound port, over mTLS with web's valid certificate.
    Inbound,
    /// The client proxy's outbound listener (the app's side), plain TCP: detection takes the
    /// protocol from the attacker's first bytes (HTTP/2 prior knowledge or HTTP/1.1).
    Outbound,
}

type Io = Box<dyn AsyncReadWrite>;
trait AsyncReadWrite: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> AsyncReadWrite for T {}

async fn attacker(m: &Mesh, target: Target) -> Io {
    match target {
        Target::Inbound | Target::InboundH1 => {
            let cert = m.pki.issue(WEB);
            let alpn: &[u8] = if matches!(target, Target::Inbound) {
                b"h2"
            } else {
                b"http/1.1"
            };
            let cfg = tls_client_config(&m.pki, Some(&cert), alpn);
            Box::new(
                within(tls_connect(m.server.inbound_addr, cfg))
                    .await
                    .expect("mTLS"),
            )
        }
        Target::Outbound => Box::new(
            within(tokio::net::TcpStream::connect(m.upstream))
                .await
                .expect("connect"),
        ),
    }
}

/// Which proxy a target belongs to, and the direction it counts under.
fn victim(m: &Mesh, target: Target) -> (&palisade_proxy::Proxy, &'static str) {
    match target {
        Target::Inbound | Target::InboundH1 => (&m.server, "inbound"),
        Target::Outbound => (&m.client, "outbound"),
    }
}

/// Runs `attack` against `target` over and over on new connections (an attacker reconnects
/// when cut off) for `ATTACK_FOR`, with legitimate traffic alongside; returns what the
/// attacker heard on each connection and how much it sent, after checking that legitimate
/// traffic kept ≥ 99% success and the proxy still serves.
async fn under_attack<F, Fut>(name: &str, target: Target, attack: F) -> (Mesh, Vec<(Heard, u64)>)
where
    F: Fn(Io) -> Fut,
    Fut: std::future::Future<Output = (Heard, u64)>,
{
    const ATTACK_FOR: Duration = Duration::from_secs(2);
    let app = echo_app().await;
    let m = mesh(app.addr, MeshOpts::default()).await;
    // Warm: the pair's connection exists before the attack.
    let warm = get(m.upstream, "/").await.expect("warm request");
    assert_eq!(warm.status, 200);
    let rss_before = rss_mib();
    let legit = Legit::start(m.upstream, 4);
    let started = Instant::now();
    let mut rounds = Vec::new();
    while started.elapsed() < ATTACK_FOR && rounds.len() < 2_000 {
        let io = attacker(&m, target).await;
        rounds.push(within_for(Duration::from_secs(40), attack(io)).await);
    }
    let took = started.elapsed();
    let rss_after = rss_mib();
    let (requests, ok, p99) = legit.finish().await;
    println!(
        "{name} against {target:?}: {} connections in {took:.2?}; \
         legitimate {ok}/{requests} ok ({:.2}%), p99 {p99:.2?}; RSS {rss_before:.1} -> {rss_after:.1} MiB",
        rounds.len(),
        100.0 * ok as f64 / requests.max(1) as f64
    );
    assert!(
        requests >= 20,
        "too little legitimate traffic to judge: {requests}"
    );
    assert!(
        ok * 100 >= requests * 99,
        "legitimate traffic fell below 99% success: {ok}/{requests}"
    );
    assert!(
        rss_after - rss_before < 64.0,
        "the attack grew the process by {:.1} MiB",
        rss_after - rss_before
    );
    // Still serving afterwards, on a new connection.
    let after = get(m.upstream, "/")
        .await
        .expect("request after the attack");
    assert_eq!(after.status, 200);
    (m, rounds)
}

/// Every connection of the attack was closed by the proxy with GOAWAY `code`, having
/// processed at most `max_streams` of the attacker's streams (by the GOAWAY's last stream id;
/// what the attacker could write is no measure, socket buffers took it).
fn all_cut_off(target: Target, rounds: &[(Heard, u64)], code: u32, max_streams: u32) {
    for (i, (heard, _)) in rounds.iter().enumerate() {
        assert!(
            heard.closed && heard.goaway == Some(code),
            "{target:?} connection {i}: not cut off with GOAWAY {code:#x}: {heard:?}"
        );
        let streams = heard.last_stream.div_ceil(2);
        assert!(
            streams <= max_streams,
            "{target:?} connection {i}: {streams} streams processed before the cut-off"
        );
    }
    let most = rounds.iter().map(|(h, _)| h.last_stream.div_ceil(2)).max();
    println!("{target:?}: at most {most:?} streams processed on one connection");
}

/// HEADERS + RST_STREAM pairs, in batches, until the server hangs up or `pairs` are sent.
async fn rapid_reset(io: Io, pairs: u32) -> (Heard, u64) {
    let (r, mut w) = tokio::io::split(io);
    let listener = tokio::spawn(listen(r, Duration::from_secs(30)));
    let mut sent = 0u64;
    let mut out = PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    let block = get_block();
    'outer: for batch in 0..pairs / 100 {
        for i in 0..100 {
            let stream = 2 * (batch * 100 + i) + 1;
            out.extend(frame(HEADERS, END_HEADERS | END_STREAM, stream, &block));
            out.extend(frame(RST_STREAM, 0, stream, &CANCEL.to_be_bytes()));
        }
        if w.write_all(&out).await.is_err() {
            break 'outer;
        }
        out.clear();
        sent += 100;
        if listener.is_finished() {
            break;
        }
    }
    let _ = w.shutdown().await;
    (within(listener).await.expect("listener"), sent)
}

/// Requests the proxy must refuse and reset (no `:path`), one after another.
async fn provoked_resets(io: Io, n: u32) -> (Heard, u64) {
    let (r, mut w) = tokio::io::split(io);
    let listener = tokio::spawn(listen(r, Duration::from_secs(30)));
    let mut sent = 0u64;
    let mut out = PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    // :method GET, :scheme http, :authority api.demo — and no :path: malformed.
    let block = [
        0x82, 0x86, 0x01, 8, b'a', b'p', b'i', b'.', b'd', b'e', b'm', b'o',
    ];
    for batch in 0..n / 100 {
        for i in 0..100 {
            let stream = 2 * (batch * 100 + i) + 1;
            out.extend(frame(HEADERS, END_HEADERS | END_STREAM, stream, &block));
        }
        if w.write_all(&out).await.is_err() {
            break;
        }
        out.clear();
        sent += 100;
        if listener.is_finished() {
            break;
        }
    }
    let _ = w.shutdown().await;
    (within(listener).await.expect("listener"), sent)
}

/// A header block that never ends: HEADERS without END_HEADERS, then CONTINUATION frames of
/// fresh literal headers, up to `max_bytes`.
async fn continuation_flood(io: Io, max_bytes: usize) -> (Heard, u64) {
    let (r, mut w) = tokio::io::split(io);
    let listener = tokio::spawn(listen(r, Duration::from_secs(30)));
    let mut out = PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    out.extend(frame(HEADERS, 0, 1, &get_block()));
    let mut sent = 0usize;
    let mut n = 0u32;
    while sent < max_bytes {
        // ~16 KB of `x-NNNN: vvvv…` literals without indexing, new names each time.
        let mut block = Vec::with_capacity(16 * 1024);
        while block.len() < 16 * 1024 - 200 {
            let name = format!("x-{n}");
            block.push(0x00);
            hpack_len(&mut block, name.len());
            block.extend_from_slice(name.as_bytes());
            hpack_len(&mut block, 100);
            block.extend_from_slice(&[b'v'; 100]);
            n += 1;
        }
        out.extend(frame(CONTINUATION, 0, 1, &block));
        if w.write_all(&out).await.is_err() {
            break;
        }
        sent += out.len();
        out.clear();
        if listener.is_finished() {
            break;
        }
    }
    let _ = w.shutdown().await;
    (within(listener).await.expect("listener"), sent as u64)
}

/// A 4 KB header inserted into the HPACK dynamic table, then referenced by its one-byte index
/// over and over: 16 KB on the wire decode to 64 MB.
async fn hpack_bomb(io: Io, frames: usize) -> (Heard, u64) {
    let (r, mut w) = tokio::io::split(io);
    let listener = tokio::spawn(listen(r, Duration::from_secs(30)));
    let mut out = PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    let mut block = get_block();
    // Literal with incremental indexing, new name `x-bomb`, a 4,000-byte value.
    block.push(0x40);
    hpack_len(&mut block, 6);
    block.extend_from_slice(b"x-bomb");
    hpack_len(&mut block, 4000);
    block.extend_from_slice(&[b'b'; 4000]);
    out.extend(frame(HEADERS, END_STREAM, 1, &block));
    let mut sent = 0u64;
    for i in 0..frames {
        // 0xbe: indexed header field 62, the first dynamic entry.
        let flags = if i + 1 == frames { END_HEADERS } else { 0 };
        out.extend(frame(CONTINUATION, flags, 1, &[0xbe; 16 * 1024]));
        if w.write_all(&out).await.is_err() {
            break;
        }
        sent += out.len() as u64;
        out.clear();
        if listener.is_finished() {
            break;
        }
    }
    let _ = w.shutdown().await;
    (within(listener).await.expect("listener"), sent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_is_cut_off_and_legitimate_traffic_flows() {
    for target in [Target::Inbound, Target::Outbound] {
        let (m, rounds) = under_attack("rapid reset", target, |io| rapid_reset(io, 20_000)).await;
        all_cut_off(target, &rounds, ENHANCE_YOUR_CALM, 1_000);
        let (p, dir) = victim(&m, target);
        let n = rounds.len() as f64;
        let counted = wait_metric(
            p,
            "palisade_http_connection_errors_total",
            &[("direction", dir), ("reason", "h2_enhance_your_calm")],
            n,
        )
        .await;
        assert_eq!(counted, n, "{target:?}: one count per connection cut off");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provoked_resets_are_cut_off() {
    for target in [Target::Inbound, Target::Outbound] {
        let (m, rounds) =
            under_attack("provoked resets", target, |io| provoked_resets(io, 20_000)).await;
        all_cut_off(target, &rounds, ENHANCE_YOUR_CALM, 1_100);
        let (p, dir) = victim(&m, target);
        wait_metric(
            p,
            "palisade_http_connection_errors_total",
            &[("direction", dir), ("reason", "h2_enhance_your_calm")],
            rounds.len() as f64,
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continuation_flood_is_cut_off_early() {
    for target in [Target::Inbound, Target::Outbound] {
        let (m, rounds) = under_attack("CONTINUATION flood", target, |io| {
            continuation_flood(io, 64 << 20)
        })
        .await;
        all_cut_off(target, &rounds, ENHANCE_YOUR_CALM, 1);
        let (p, dir) = victim(&m, target);
        wait_metric(
            p,
            "palisade_http_connection_errors_total",
            &[("direction", dir), ("reason", "h2_enhance_your_calm")],
            rounds.len() as f64,
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hpack_bomb_is_refused_without_decoding_it() {
    for target in [Target::Inbound, Target::Outbound] {
        let (m, rounds) = under_attack("HPACK bomb", target, |io| hpack_bomb(io, 256)).await;
        all_cut_off(target, &rounds, ENHANCE_YOUR_CALM, 1);
        let (p, dir) = victim(&m, target);
        wait_metric(
            p,
            "palisade_http_connection_errors_total",
            &[("direction", dir), ("reason", "h2_enhance_your_calm")],
            rounds.len() as f64,
        )
        .await;
    }
}

/// Keeps the frame helpers honest: a HEADERS frame's header is its length, type, flags and
/// stream id.
#[test]
fn frames_are_encoded_as_rfc_9113_says() {
    let f = frame(HEADERS, END_HEADERS, 3, &[1, 2, 3]);
    assert_eq!(f, vec![0, 0, 3, 1, 4, 0, 0, 0, 3, 1, 2, 3]);
    let mut l = Vec::new();
    hpack_len(&mut l, 4000);
    // 127 + (3873 = 0x21 + 30*128): 0x7f, 0xa1, 0x1e
    assert_eq!(l, vec![0x7f, 0xa1, 0x1e]);
}

/// Oversized HTTP/1.1 request heads (100 KiB of headers, over the 64 KiB limit), one
/// connection after another on the outbound listener and (plaintext refused under STRICT, so
/// over mTLS) the inbound port: each is answered 431 and closed without reaching the app,
/// counted as `header_too_large`, while legitimate traffic flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_heads_are_refused_and_counted() {
    for target in [Target::InboundH1, Target::Outbound] {
        let (m, rounds) = under_attack("oversized headers", target, oversized_head).await;
        let statuses: Vec<u64> = rounds.iter().map(|(_, status)| *status).collect();
        assert!(
            statuses.iter().all(|s| *s == 431),
            "{target:?}: not all answered 431: {statuses:?}"
        );
        let (p, dir) = victim(&m, target);
        wait_metric(
            p,
            "palisade_http_connection_errors_total",
            &[("direction", dir), ("reason", "header_too_large")],
            rounds.len() as f64,
        )
        .await;
    }
}

/// One HTTP/1.1 request whose head is 100 KiB of headers; returns (what was heard, the status
/// code answered, 0 if none).
async fn oversized_head(io: Io) -> (Heard, u64) {
    let (mut r, mut w) = tokio::io::split(io);
    let mut head = String::from("GET / HTTP/1.1\r\nhost: api.demo\r\n");
    for i in 0..1024 {
        head.push_str(&format!("x-filler-{i}: {}\r\n", "f".repeat(90)));
    }
    head.push_str("\r\n");
    let reader = tokio::spawn(async move {
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), r.read_to_end(&mut buf)).await;
        buf
    });
    let _ = w.write_all(head.as_bytes()).await;
    let answer = within(reader).await.expect("reader");
    let text = String::from_utf8_lossy(&answer);
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|t| t.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let heard = Heard {
        closed: true,
        bytes: answer.len(),
        ..Heard::default()
    };
    (heard, status)
}
