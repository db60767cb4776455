//! What the benchmarks need around them: the binaries they start, free ports, an HTTP GET to
//! an admin port, a process's CPU time and memory from /proc, and its open-files limit.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

/// clap's parser for `--duration`: the same syntax as every `palisade` flag (`30s`, `1m 30s`),
/// and the same "too large" refusal.
pub fn duration(s: &str) -> Result<Duration, String> {
    palisade_certs::parse_duration(s).map_err(|e| e.to_string())
}

/// `name` in the directory of this binary, if it is there: `cargo build` and a release archive
/// put `palisade`, `palisade-proxy` and `palisade-bench` side by side.
pub fn sibling(name: &str) -> Option<PathBuf> {
    let p = std::env::current_exe().ok()?.with_file_name(name);
    p.is_file().then_some(p)
}

/// The first `name` on PATH that is a file.
pub fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// The `palisade` binary whose mesh or control plane the bench runs: the one asked for, else
/// the one next to this binary, else the first on PATH. The bench measures that binary, so
/// not finding it is an error that says how to get one.
pub fn palisade_bin(asked: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = asked {
        anyhow::ensure!(p.is_file(), "--palisade-bin {} is not a file", p.display());
        return Ok(p.to_path_buf());
    }
    sibling("palisade").or_else(|| on_path("palisade")).context(
        "cannot find the palisade binary next to palisade-bench or on PATH: build it \
         (cargo build --release) or pass --palisade-bin PATH",
    )
}

/// A port that was free a moment ago, for a mesh file written before the mesh starts. Picked
/// below the kernel's ephemeral range: a port from `bind(0)` would be back in that range once
/// released, where the source port of any outgoing connection (or another process's
/// `bind(0)`) can take it before the mesh binds it. Consecutive calls return different ports;
/// the start depends on the pid, so concurrent processes start apart: 211 ports per pid, more
/// than a benchmark takes, so that benchmarks started together (tests run in parallel, with
/// pids a few apart) do not walk into each other's ports.
pub fn free_port() -> anyhow::Result<u16> {
    // Prime, so that pids up to the range's size over it apart start at least that far apart.
    const PID_STRIDE: u32 = 211;
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    static RANGE: OnceLock<(u32, u32)> = OnceLock::new();
    let &(low, ephemeral_low) = RANGE.get_or_init(|| {
        let ephemeral_low: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|r| r.split_whitespace().next()?.parse().ok())
            .unwrap_or(32768);
        (
            10_000u32.min(ephemeral_low.saturating_sub(1000)),
            ephemeral_low,
        )
    });
    let span = ephemeral_low.saturating_sub(low).max(1);
    let _ = NEXT.compare_exchange(
        0,
        std::process::id() % span * PID_STRIDE + 1,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..span.min(5000) {
        let port = low + NEXT.fetch_add(1, Ordering::Relaxed) % span;
        let Ok(port) = u16::try_from(port) else {
            continue;
        };
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    anyhow::bail!("no free port on 127.0.0.1 below the ephemeral range ({low}..{ephemeral_low})")
}

/// GET `path` from an admin or metrics port over HTTP/1.1, within 2 s: its status and body.
pub async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(http::StatusCode, String)> {
    let fut = async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        let req = Request::get(path)
            .header(http::header::HOST, addr.to_string())
            .body(Empty::<Bytes>::new())?;
        let rsp = send.send_request(req).await?;
        let status = rsp.status();
        let body = rsp.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(2), fut)
        .await
        .map_err(|_| anyhow::anyhow!("{addr}{path} did not answer within 2s"))?
}

/// An HTTP/1.1 response read whole from the front of a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Http1Response {
    pub status: u16,
    /// Head and body, in bytes: where the next response on the connection would start.
    pub len: usize,
    /// The server said `Connection: close`: the next request needs a new connection.
    pub close: bool,
}

/// The longest response head accepted: the bench reads `/ready` and its own app's "ok".
const MAX_HEAD: usize = 64 << 10;

/// Parses the HTTP/1.1 response at the start of `buf`: None until all of it is there (the
/// head, then a body of `Content-Length` bytes or a chunked one). The benchmarks measure
/// connections they hold open themselves, byte for byte, so they speak this much HTTP
/// without a client library in between.
pub fn http1_response(buf: &[u8]) -> anyhow::Result<Option<Http1Response>> {
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        anyhow::ensure!(
            buf.len() <= MAX_HEAD,
            "a response head over {MAX_HEAD} bytes"
        );
        return Ok(None);
    };
    let head =
        std::str::from_utf8(&buf[..head_end]).context("a response head that is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut words = status_line.split_whitespace();
    let status: u16 = match (words.next(), words.next()) {
        (Some(v), Some(code)) if v.starts_with("HTTP/1.") => code
            .parse()
            .with_context(|| format!("status line {status_line:?}"))?,
        _ => anyhow::bail!("not an HTTP/1 status line: {status_line:?}"),
    };
    let (mut length, mut chunked, mut close) = (None, false, false);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(
                value
                    .parse::<usize>()
                    .with_context(|| format!("Content-Length {value:?}"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        } else if name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case("close");
        }
    }
    let body = head_end + 4;
    let no_body = (100..200).contains(&status) || status == 204 || status == 304;
    let end = if no_body {
        Some(body)
    } else if chunked {
        chunked_end(buf, body)?
    } else if let Some(n) = length {
        let end = body.checked_add(n).context("Content-Length too large")?;
        (buf.len() >= end).then_some(end)
    } else {
        anyhow::bail!("a response with neither Content-Length nor a chunked body")
    };
    Ok(end.map(|len| Http1Response { status, len, close }))
}

/// Where the chunked body that starts at `at` ends (after its last chunk and trailers), or
/// None if it is not all in `buf` yet.
fn chunked_end(buf: &[u8], mut at: usize) -> anyhow::Result<Option<usize>> {
    loop {
        let Some(line) = buf.get(at..).and_then(|b| find(b, b"\r\n")) else {
            return Ok(None);
        };
        let size_text = std::str::from_utf8(&buf[at..at + line])
            .ok()
            .and_then(|l| l.split(';').next())
            .map(str::trim)
            .unwrap_or_default();
        let size = usize::from_str_radix(size_text, 16)
            .with_context(|| format!("chunk size {size_text:?}"))?;
        at += line + 2;
        if size == 0 {
            // Trailers, if any, up to an empty line.
            loop {
                let Some(line) = buf.get(at..).and_then(|b| find(b, b"\r\n")) else {
                    return Ok(None);
                };
                at += line + 2;
                if line == 0 {
                    return Ok(Some(at));
                }
            }
        }
        let data_end = at.checked_add(size).context("chunk size too large")?;
        let Some(crlf) = buf.get(data_end..data_end + 2) else {
            return Ok(None);
        };
        anyhow::ensure!(crlf == b"\r\n", "a chunk not followed by CRLF");
        at = data_end + 2;
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// GET `path` on a connection the caller holds (blocking, within the socket's read timeout):
/// the response's status, whether the connection can take another request, and the response
/// as it came (head and body). For pollers that must not wait on a timer wheel: `cold-start`
/// asks `/ready` every few hundred microseconds.
pub fn get_blocking(
    tcp: &mut std::net::TcpStream,
    host: SocketAddr,
    path: &str,
) -> anyhow::Result<(Http1Response, Vec<u8>)> {
    use std::io::{Read, Write};
    tcp.write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(r) = http1_response(&buf)? {
            buf.truncate(r.len);
            return Ok((r, buf));
        }
        let n = tcp.read(&mut chunk)?;
        anyhow::ensure!(
            n > 0,
            "{host} closed the connection before a whole response"
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The value of an unlabelled gauge or counter in Prometheus text: the first sample line
/// named `name` (the bench reads only `palisade_config_generation`).
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.trim().strip_prefix(name)?;
        let value = rest.strip_prefix([' ', '\t'])?.split_whitespace().next()?;
        value.parse().ok()
    })
}

/// The sum of every sample of `name` in Prometheus text, whatever its labels:
/// `palisade_tcp_open_connections` is one gauge per direction, and a proxy's open connections
/// are all of them. None when there is no sample of that name.
pub fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let mut sum = None;
    for l in text.lines() {
        let Some(rest) = l.trim().strip_prefix(name) else {
            continue;
        };
        let value = match rest.strip_prefix('{') {
            Some(labelled) => labelled.split_once('}').map(|(_, v)| v),
            None => rest.strip_prefix([' ', '\t']),
        };
        if let Some(v) = value.and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok()) {
            *sum.get_or_insert(0.0) += v;
        }
    }
    sum
}

/// A field of /proc/PID/status in kB (`VmRSS`, `RssAnon`, `VmHWM`), in bytes.
fn status_kb(status: &str, field: &str) -> Option<u64> {
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())?;
    Some(kb * 1024)
}

/// Anonymous (private) resident memory of a process, in bytes: what the proxy itself uses,
/// without the pages of the shared binary that VmHWM also counts.
pub fn rss_anon(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status_kb(&status, "RssAnon")
}

/// What a process holds in memory now (not its peak): the idle benchmark's readings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resident {
    /// VmRSS: every resident page, the binary's shared ones included.
    pub rss: u64,
    /// RssAnon: the private pages (heap, stacks), where per-connection state lives.
    pub anon: u64,
}

/// VmRSS and RssAnon of a process, in bytes, read together from one /proc/PID/status.
pub fn resident(pid: u32) -> Option<Resident> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(Resident {
        rss: status_kb(&status, "VmRSS")?,
        anon: status_kb(&status, "RssAnon")?,
    })
}

/// RLIMIT_NOFILE of this process, (soft, hard), from /proc/self/limits; None for unlimited.
pub fn nofile_limit() -> anyhow::Result<(Option<u64>, Option<u64>)> {
    let limits =
        std::fs::read_to_string("/proc/self/limits").context("cannot read /proc/self/limits")?;
    parse_nofile_limit(&limits).context("/proc/self/limits has no readable \"Max open files\" line")
}

fn parse_nofile_limit(limits: &str) -> Option<(Option<u64>, Option<u64>)> {
    let line = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))?;
    let mut fields = line.split_whitespace();
    let value = |f: Option<&str>| -> Option<Option<u64>> {
        match f? {
            "unlimited" => Some(None),
            n => n.parse().ok().map(Some),
        }
    };
    Some((value(fields.next())?, value(fields.next())?))
}

/// Raises this process's RLIMIT_NOFILE soft limit to its hard limit, so that it and the
/// children it starts next (which inherit it) can hold as many sockets as they are allowed.
/// Returns the soft limit in force afterwards (None: unlimited); when it could not be raised,
/// the one there was, which the caller judges against what it needs.
pub fn raise_nofile_limit() -> anyhow::Result<Option<u64>> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        // A refusal leaves the limit as it was; the reading below says what is in force.
        let _ = setrlimit(Resource::Nofile, raised);
    }
    Ok(nofile_limit()?.0)
}

/// The kernel's clock ticks per second (`USER_HZ`), the unit of /proc's CPU times: from the
/// auxiliary vector (`AT_CLKTCK`), else 100, what every Linux this runs on uses.
pub fn clock_ticks_per_second() -> u64 {
    const AT_CLKTCK: u64 = 17;
    let from_auxv = std::fs::read("/proc/self/auxv").ok().and_then(|auxv| {
        let words: Vec<u64> = auxv
            .chunks_exact(8)
            .map(|c| u64::from_ne_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        words
            .chunks_exact(2)
            .find(|kv| kv[0] == AT_CLKTCK)
            .map(|kv| kv[1])
    });
    from_auxv.filter(|&hz| hz > 0).unwrap_or(100)
}

/// A process's CPU time so far (user and kernel, in seconds) and its peak RSS.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Usage {
    /// utime: the process's own instructions.
    pub user: f64,
    /// stime: the kernel working for it (system calls, socket buffers, page faults). A plain
    /// relay's CPU is mostly this; what a proxy adds beyond it is mostly `user`.
    pub system: f64,
    pub peak_rss: u64,
}

impl Usage {
    pub fn cpu(&self) -> f64 {
        self.user + self.system
    }
}

/// utime and stime in seconds, and peak RSS in bytes, of a process. The CPU times count whole
/// clock ticks ([`clock_ticks_per_second`]).
pub fn proc_usage(pid: u32) -> Option<Usage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields after the command: state is index 0, utime 11, stime 12 (man 5 proc).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hwm_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())?;
    let hz = clock_ticks_per_second() as f64;
    Some(Usage {
        user: utime as f64 / hz,
        system: stime as f64 / hz,
        peak_rss: hwm_kb * 1024,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_gauge_is_read_from_prometheus_text_by_its_exact_name() {
        let text = "# HELP palisade_config_generation x\n\
                    # TYPE palisade_config_generation gauge\n\
                    palisade_config_generation_total 9\n\
                    palisade_config_generation 42\n";
        assert_eq!(
            super::metric(text, "palisade_config_generation"),
            Some(42.0)
        );
        assert_eq!(super::metric(text, "palisade_missing"), None);
    }

    #[test]
    fn a_labelled_gauge_is_summed_over_its_labels_and_no_other_name() {
        let text = "# TYPE palisade_tcp_open_connections gauge\n\
                    palisade_tcp_open_connections{direction=\"outbound\"} 7\n\
                    palisade_tcp_open_connections{direction=\"inbound\"} 2\n\
                    palisade_tcp_open_connections_max 100\n";
        assert_eq!(
            super::metric_sum(text, "palisade_tcp_open_connections"),
            Some(9.0)
        );
        assert_eq!(super::metric_sum("x 1\n", "x"), Some(1.0));
        assert_eq!(super::metric_sum(text, "palisade_missing"), None);
    }

    #[test]
    fn the_open_files_limit_is_read_with_unlimited_as_none() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max processes             unlimited            unlimited            processes\n\
                      Max open files            1024                 524288               files\n";
        assert_eq!(
            super::parse_nofile_limit(limits),
            Some((Some(1024), Some(524288)))
        );
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(super::parse_nofile_limit(unlimited), Some((None, None)));
        assert_eq!(super::parse_nofile_limit("Max processes 1 1\n"), None);
        let (soft, hard) = super::nofile_limit().expect("this process's limits");
        assert!(soft.unwrap_or(u64::MAX) <= hard.unwrap_or(u64::MAX));
    }

    #[test]
    fn a_response_is_whole_with_its_content_length_or_last_chunk() {
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n";
        for cut in 0..ok.len() {
            assert_eq!(super::http1_response(&ok[..cut]).expect("parses"), None);
        }
        let r = super::http1_response(ok).expect("parses").expect("whole");
        assert_eq!((r.status, r.len, r.close), (200, ok.len(), false));

        let chunked = b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\
                        Connection: close\r\n\r\n3\r\nnot\r\n6;x=y\r\n ready\r\n0\r\n\r\nHTTP";
        let whole = chunked.len() - 4;
        for cut in 0..whole {
            assert_eq!(
                super::http1_response(&chunked[..cut]).expect("parses"),
                None
            );
        }
        let r = super::http1_response(chunked)
            .expect("parses")
            .expect("whole");
        assert_eq!((r.status, r.len, r.close), (503, whole, true));

        let empty = b"HTTP/1.1 204 No Content\r\n\r\n";
        let r = super::http1_response(empty)
            .expect("parses")
            .expect("whole");
        assert_eq!(r.len, empty.len());
        assert!(super::http1_response(b"SSH-2.0-x\r\n\r\n").is_err());
        assert!(super::http1_response(b"HTTP/1.1 200 OK\r\n\r\nbody").is_err());
        assert!(
            super::http1_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
                .is_err()
        );
    }

    #[test]
    fn this_process_has_a_resident_set_with_private_pages() {
        let r = super::resident(std::process::id()).expect("/proc of this process");
        assert!(r.anon > 0 && r.anon <= r.rss, "{r:?}");
    }

    #[test]
    fn this_process_has_cpu_time_and_a_peak_rss() {
        let usage = super::proc_usage(std::process::id()).expect("/proc of this process");
        assert!(usage.peak_rss > 0);
        assert!(super::clock_ticks_per_second() > 0);
    }

    #[test]
    fn consecutive_free_ports_differ() {
        let a = super::free_port().expect("a port");
        let b = super::free_port().expect("another");
        assert_ne!(a, b);
    }
}
