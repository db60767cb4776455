//! The report: each run's figures, the table on stdout and the JSON of `--out`.

use std::time::Duration;

use hdrhistogram::Histogram;

use super::BenchProtocol;

pub(super) struct RunResult {
    pub(super) mode: &'static str,
    pub(super) rate: Option<u64>,
    pub(super) requests: u64,
    pub(super) errors: u64,
    pub(super) elapsed: Duration,
    pub(super) hist: Histogram<u64>,
    /// Mesh and relay runs: CPU seconds per 1000 requests of each hop's process.
    pub(super) proxy_cpu: Vec<HopCpu>,
    /// The resolution of those figures: one clock tick of /proc's CPU times per 1000 requests.
    pub(super) cpu_resolution: f64,
}

/// One hop's CPU seconds per 1000 requests in one run, split as /proc splits it: a relay's
/// cost is mostly the kernel's (system calls, copies through socket buffers), so the split
/// shows how much of a proxy's excess is its own instructions and how much more kernel work.
pub(super) struct HopCpu {
    pub(super) name: String,
    pub(super) user: f64,
    pub(super) system: f64,
}

impl HopCpu {
    fn total(&self) -> f64 {
        self.user + self.system
    }
}

impl RunResult {
    pub(super) fn ms(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }
    pub(super) fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "mode": self.mode,
            "rate": self.rate,
            "requests": self.requests,
            "errors": self.errors,
            "rps": self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9),
            "latency_ms": {
                "p50": self.ms(0.5), "p90": self.ms(0.9), "p99": self.ms(0.99),
                "p999": self.ms(0.999), "max": self.hist.max() as f64 / 1000.0,
            },
            "proxy_cpu_seconds_per_1000_requests": self.proxy_cpu.iter()
                .map(|h| (h.name.clone(), serde_json::json!(h.total())))
                .collect::<serde_json::Map<_, _>>(),
            "proxy_cpu_user_seconds_per_1000_requests": self.proxy_cpu.iter()
                .map(|h| (h.name.clone(), serde_json::json!(h.user)))
                .collect::<serde_json::Map<_, _>>(),
        })
    }
}

/// The figures of the spec for each process of a mode (the proxies of the mesh, the relays):
/// CPU at the first fixed rate (else max throughput), peak RSS over the whole benchmark.
pub(super) fn hop_figures(
    results: &[RunResult],
    mode: &str,
    procs: &[(String, u32)],
) -> Vec<serde_json::Value> {
    let reference = results
        .iter()
        .find(|r| r.mode == mode && r.rate.is_some())
        .or_else(|| results.iter().find(|r| r.mode == mode));
    let mut out = Vec::new();
    for (name, pid) in procs {
        let cpu = reference.and_then(|r| r.proxy_cpu.iter().find(|h| &h.name == name));
        let resolution = reference.map(|r| r.cpu_resolution).unwrap_or(0.0);
        if let (Some(cpu), Some(usage)) = (cpu, crate::support::proc_usage(*pid)) {
            out.push(serde_json::json!({
                "name": name,
                "cpu_seconds_per_1000_requests": cpu.total(),
                "cpu_user_seconds_per_1000_requests": cpu.user,
                "cpu_system_seconds_per_1000_requests": cpu.system,
                "cpu_resolution_seconds_per_1000_requests": resolution,
                "peak_rss_bytes": usage.peak_rss,
                "rss_anon_bytes": crate::support::rss_anon(*pid),
            }));
        }
    }
    out
}

/// A mode's latency minus direct's at the first fixed rate.
pub(super) fn added_latency(results: &[RunResult], mode: &str) -> (f64, f64) {
    let rate = results.iter().find_map(|r| r.rate);
    let find = |mode| results.iter().find(|r| r.mode == mode && r.rate == rate);
    match (find("direct"), find(mode)) {
        (Some(d), Some(m)) => (m.ms(0.5) - d.ms(0.5), m.ms(0.99) - d.ms(0.99)),
        _ => (0.0, 0.0),
    }
}

pub(super) fn print_table(
    results: &[RunResult],
    proxies: &[serde_json::Value],
    relays: Option<&[serde_json::Value]>,
    p: BenchProtocol,
) {
    println!("protocol: {p:?}");
    println!(
        "{:<7} {:>9} {:>9} {:>7} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "mode",
        "rate",
        "requests",
        "errors",
        "rps",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "p999 ms",
        "max ms"
    );
    for r in results {
        println!(
            "{:<7} {:>9} {:>9} {:>7} {:>10.0} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3}",
            r.mode,
            r.rate
                .map(|x| x.to_string())
                .unwrap_or_else(|| "max".into()),
            r.requests,
            r.errors,
            r.requests as f64 / r.elapsed.as_secs_f64().max(1e-9),
            r.ms(0.5),
            r.ms(0.9),
            r.ms(0.99),
            r.ms(0.999),
            r.hist.max() as f64 / 1000.0
        );
    }
    let (a50, a99) = added_latency(results, "mesh");
    println!("added latency (mesh - direct): p50 {a50:.3} ms, p99 {a99:.3} ms");
    if let Some(relays) = relays {
        let (r50, r99) = added_latency(results, "relays");
        println!("added latency (relays - direct): p50 {r50:.3} ms, p99 {r99:.3} ms");
        for r in relays {
            println!(
                "relay {:<8} cpu {} s/1000 req (two plain TCP relays: the floor of two hops)",
                r["name"].as_str().unwrap_or("?"),
                cpu_figure(r),
            );
        }
        let cpu = |hops: &[serde_json::Value]| -> f64 {
            hops.iter()
                .filter_map(|h| h["cpu_seconds_per_1000_requests"].as_f64())
                .sum()
        };
        let (mesh_cpu, relay_cpu) = (cpu(proxies), cpu(relays));
        let ratio = if relay_cpu > 0.0 {
            format!("{:.1}x the CPU", mesh_cpu / relay_cpu)
        } else {
            "CPU of the relays below the clock's resolution".to_string()
        };
        println!(
            "mesh vs relays: {ratio}, p50 {:+.3} ms, p99 {:+.3} ms",
            a50 - r50,
            a99 - r99
        );
    }
    for px in proxies {
        println!(
            "proxy {:<8} cpu {} s/1000 req, peak RSS {:.1} MB (private {:.1} MB; the rest is the shared binary)",
            px["name"].as_str().unwrap_or("?"),
            cpu_figure(px),
            px["peak_rss_bytes"].as_f64().unwrap_or(0.0) / 1_048_576.0,
            px["rss_anon_bytes"].as_f64().unwrap_or(0.0) / 1_048_576.0
        );
    }
}

/// A hop's CPU figure with its resolution: `0.0452 ±0.0050`. /proc counts CPU time in clock
/// ticks (10 ms), so over N requests a figure per 1000 requests is only good to 10 s / N.
fn cpu_figure(hop: &serde_json::Value) -> String {
    let cpu = hop["cpu_seconds_per_1000_requests"].as_f64().unwrap_or(0.0);
    let res = hop["cpu_resolution_seconds_per_1000_requests"]
        .as_f64()
        .unwrap_or(0.0);
    // Down to the resolution's first significant digit, no further: more would be noise.
    let decimals = if res > 0.0 {
        (-res.log10()).ceil().clamp(1.0, 9.0) as usize
    } else {
        4
    };
    let part = |key: &str| hop[key].as_f64().unwrap_or(0.0);
    format!(
        "{cpu:.decimals$} ±{res:.decimals$} (user {:.decimals$}, kernel {:.decimals$})",
        part("cpu_user_seconds_per_1000_requests"),
        part("cpu_system_seconds_per_1000_requests"),
    )
}
