//! What both benchmarks need around them: the binaries they start, free ports, an HTTP GET to
//! an admin port, and a process's CPU time and memory from /proc.

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
/// the start depends on the pid, so concurrent processes start apart.
pub fn free_port() -> anyhow::Result<u16> {
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
        std::process::id() % span * 7 + 1,
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

/// The value of an unlabelled gauge or counter in Prometheus text: the first sample line
/// named `name` (the bench reads only `palisade_config_generation`).
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.trim().strip_prefix(name)?;
        let value = rest.strip_prefix([' ', '\t'])?.split_whitespace().next()?;
        value.parse().ok()
    })
}

/// Anonymous (private) resident memory of a process, in bytes: what the proxy itself uses,
/// without the pages of the shared binary that VmHWM also counts.
pub fn rss_anon(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())?;
    Some(kb * 1024)
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
