//! `palisade cost`: what each caller (or route) costs, from the proxies' own cost counters.
//!
//! The figures come from every proxy's admin `/metrics` of a running local mesh (the
//! workloads of `STATE_DIR/mesh.json`), or from a Prometheus server that scrapes the proxies
//! (`--prometheus`). Without `--window`, scraped counters cover the time since the proxies
//! started (the window is then the age of the oldest one); with it, the proxies are scraped
//! twice, the window apart, and the increase is reported. Money is
//! `cpuSeconds / 3600 * price-vcpu-hour + bytes / 1e9 * price-gb`. docs/cost.md has the
//! metrics, the request-counting rule and the JSON.

mod model;
mod prometheus;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};

pub use model::{By, Counters, Prices, Report, Row};

use super::{http_util, prom};

/// What `-o` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// A table of the top consumers, a total and how CPU is apportioned.
    Table,
    /// `{"rows": [...], "currency", "window", ...}` with every row (docs/cost.md).
    Json,
}

#[derive(clap::Args, Debug)]
pub struct CostArgs {
    /// The state directory of the `palisade up` whose proxies are scraped [default: .palisade]
    /// (not read with --prometheus).
    #[arg(long, env = "PALISADE_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Read the counters from this Prometheus server (`http://HOST:PORT[/PREFIX]`, plain HTTP)
    /// instead of scraping the proxies of a local mesh; the figures cover --window (default 1h).
    #[arg(long, value_name = "URL")]
    pub prometheus: Option<String>,
    /// One row per caller or per route.
    #[arg(long, value_enum, default_value_t = By::Identity)]
    pub by: By,
    /// The price of one vCPU for one hour. The default is a list-price placeholder: set your
    /// own.
    #[arg(
        long,
        value_name = "X",
        default_value_t = 0.04,
        allow_negative_numbers = true
    )]
    pub price_vcpu_hour: f64,
    /// The price of one GB (1e9 bytes) through the proxies. The default is a list-price
    /// placeholder: set your own.
    #[arg(
        long,
        value_name = "Y",
        default_value_t = 0.01,
        allow_negative_numbers = true
    )]
    pub price_gb: f64,
    /// The currency the prices are in (a label only: nothing is converted).
    #[arg(long, default_value = "USD")]
    pub currency: String,
    /// Measure over this window (`30s`, `5m`): scrape the proxies, wait, scrape again, and
    /// report the difference. Without it, everything since the proxies started. With
    /// --prometheus, the range of `increase()` (default 1h).
    #[arg(long, value_name = "D")]
    pub window: Option<humantime::Duration>,
    /// How many rows the table shows (the most expensive); -o json has them all.
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub top: usize,
    /// `table` or `json`.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// The default range of the Prometheus queries.
const PROMETHEUS_WINDOW: Duration = Duration::from_secs(3600);

pub fn run(a: CostArgs) -> anyhow::Result<ExitCode> {
    for (flag, p) in [
        ("--price-vcpu-hour", a.price_vcpu_hour),
        ("--price-gb", a.price_gb),
    ] {
        if !p.is_finite() || p < 0.0 {
            bail!("{flag} {p} is not a price (a number, 0 or more)");
        }
    }
    if let Some(w) = a.window
        && w.is_zero()
    {
        bail!("--window 0s covers nothing: give a duration such as 30s");
    }
    let prices = Prices {
        vcpu_hour: a.price_vcpu_hour,
        gb: a.price_gb,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (measured, workloads) = match &a.prometheus {
        Some(url) => {
            let server = prometheus::Server::parse(url)?;
            let window = a.window.map(Into::into).unwrap_or(PROMETHEUS_WINDOW);
            let counters = rt.block_on(prometheus::counters(&server, window))?;
            (
                Measured {
                    counters,
                    window: Some(window.as_secs_f64()),
                    source: "prometheus",
                },
                BTreeMap::new(),
            )
        }
        None => {
            let dir = a
                .state_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(".palisade"));
            let (proxies, workloads) = read_mesh(&dir)?;
            let measured = rt.block_on(scrape(&proxies, &dir, a.window.map(Into::into)))?;
            (measured, workloads)
        }
    };
    let report = Report {
        by: a.by,
        rows: model::rows(&measured.counters, a.by, prices),
        currency: a.currency.clone(),
        prices,
        window: measured.window,
        unattributed_cpu_seconds: measured.counters.unattributed_cpu(),
        source: measured.source,
    };
    match a.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report.json())?),
        Output::Table => print!("{}", table(&report, &workloads, a.top, a.window.is_some())),
    }
    Ok(ExitCode::SUCCESS)
}

/// A proxy to scrape: its workload's name and admin address.
struct Proxy {
    name: String,
    admin: SocketAddr,
}

/// Workload names by SPIFFE ID (for the table).
type Workloads = BTreeMap<String, Vec<String>>;

/// The proxies of the mesh `palisade up` runs with this state dir, and its workloads.
fn read_mesh(dir: &Path) -> anyhow::Result<(Vec<Proxy>, Workloads)> {
    let path = dir.join("mesh.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "no running mesh: there is no {} (`palisade up` is not running with the state dir {}; start it, or give --state-dir or --prometheus)",
            path.display(),
            dir.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let doc: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let mut proxies = Vec::new();
    let mut workloads = Workloads::new();
    for w in doc["workloads"].as_array().into_iter().flatten() {
        let name = w["name"].as_str().unwrap_or("?").to_string();
        if let Some(id) = w["spiffeId"].as_str() {
            workloads
                .entry(id.to_string())
                .or_default()
                .push(name.clone());
        }
        match w["adminAddr"].as_str().and_then(|a| a.parse().ok()) {
            Some(admin) => proxies.push(Proxy { name, admin }),
            None => eprintln!(
                "warning: {} gives workload {name} no admin address; its proxy is not counted",
                path.display()
            ),
        }
    }
    if proxies.is_empty() {
        bail!("{} lists no proxy to read", path.display());
    }
    Ok((proxies, workloads))
}

/// The counters (added up over the proxies) and the seconds they cover.
struct Measured {
    counters: Counters,
    window: Option<f64>,
    source: &'static str,
}

/// One proxy's cost counters and when it started (unix seconds), if it says.
struct Scraped {
    counters: Counters,
    start_time: Option<f64>,
    has_cost_metrics: bool,
}

async fn scrape_one(p: &Proxy) -> anyhow::Result<Scraped> {
    let (status, text) = http_util::get(p.admin, "/metrics").await?;
    if !status.is_success() {
        bail!("/metrics answered {status}");
    }
    let samples = prom::parse(&text);
    Ok(Scraped {
        counters: Counters::from_samples(&samples),
        start_time: prom::value(&samples, model::START_TIME),
        has_cost_metrics: samples.iter().any(|s| s.name.starts_with("palisade_cost_")),
    })
}

/// Every proxy at once; one that cannot be scraped is named on stderr and left out (None).
async fn scrape_all(proxies: &[Proxy]) -> Vec<Option<Scraped>> {
    let results = futures_util::future::join_all(proxies.iter().map(scrape_one)).await;
    proxies
        .iter()
        .zip(results)
        .map(|(p, r)| match r {
            Ok(s) => Some(s),
            Err(e) => {
                eprintln!(
                    "warning: cannot read the metrics of {}'s proxy at {} ({}); its share is missing from the figures",
                    p.name,
                    p.admin,
                    super::one_sentence(&e)
                );
                None
            }
        })
        .collect()
}

async fn scrape(
    proxies: &[Proxy],
    dir: &Path,
    window: Option<Duration>,
) -> anyhow::Result<Measured> {
    let first_at = Instant::now();
    let first = scrape_all(proxies).await;
    let answered: Vec<&Scraped> = first.iter().flatten().collect();
    if answered.is_empty() {
        bail!(
            "none of the {} proxies of {} answers on its admin port: is `palisade up` still running with that state dir?",
            proxies.len(),
            dir.join("mesh.json").display()
        );
    }
    if answered.iter().all(|s| !s.has_cost_metrics) {
        eprintln!(
            "warning: the proxies export no palisade_cost_* metrics (proxies older than this command?); every figure is 0"
        );
    }
    let Some(window) = window else {
        let mut counters = Counters::default();
        for s in &answered {
            counters.add(&s.counters);
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let oldest = answered
            .iter()
            .filter_map(|s| s.start_time)
            .filter(|t| *t > 0.0)
            .min_by(f64::total_cmp);
        if oldest.is_none() {
            eprintln!(
                "warning: no proxy says when it started ({}); the window is unknown",
                model::START_TIME
            );
        }
        return Ok(Measured {
            counters,
            window: oldest.map(|t| (now - t).max(0.0)),
            source: "proxies",
        });
    };
    eprintln!(
        "measuring for {} ({} proxies)...",
        humantime::format_duration(window),
        answered.len()
    );
    tokio::time::sleep_until((first_at + window).into()).await;
    let second_at = Instant::now();
    let second = scrape_all(proxies).await;
    let mut counters = Counters::default();
    let mut both = 0;
    for (a, b) in first.iter().zip(&second) {
        if let (Some(a), Some(b)) = (a, b) {
            counters.add(&Counters::increase(&a.counters, &b.counters));
            both += 1;
        }
    }
    if both == 0 {
        bail!("no proxy answered both at the start and at the end of the window");
    }
    Ok(Measured {
        counters,
        window: Some((second_at - first_at).as_secs_f64()),
        source: "proxies",
    })
}

/// `x` with three significant digits (more for large numbers, never an exponent).
fn sig3(x: f64) -> String {
    if x == 0.0 || !x.is_finite() {
        return format!("{x}");
    }
    let magnitude = x.abs().log10().floor() as i32;
    let decimals = (2 - magnitude).clamp(0, 12) as usize;
    format!("{x:.decimals$}")
}

fn money(x: f64) -> String {
    if x.abs() >= 1.0 {
        format!("{x:.2}")
    } else {
        sig3(x)
    }
}

fn bytes(b: f64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = b;
    let mut unit = 0;
    while v >= 1000.0 && unit < UNITS.len() - 1 {
        v /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn window_text(w: Option<f64>, windowed: bool, source: &str) -> String {
    match w {
        None => "since the proxies started".to_string(),
        Some(s) if source == "prometheus" => format!(
            "over the last {}",
            humantime::format_duration(Duration::from_secs_f64(s))
        ),
        Some(s) if windowed => format!("over {s:.1}s"),
        Some(s) if s < 60.0 => format!("over {s:.1}s, since the oldest proxy started"),
        Some(s) => format!(
            "over {}, since the oldest proxy started",
            super::human_duration(s as u64)
        ),
    }
}

/// The table of the `top` most expensive rows, a total, and how the figures are made.
fn table(r: &Report, workloads: &Workloads, top: usize, windowed: bool) -> String {
    use comfy_table::{CellAlignment, Table, presets};
    let cur = &r.currency;
    let with_workloads = r.by == By::Identity && !workloads.is_empty();
    let mut t = Table::new();
    t.load_style(presets::NOTHING);
    let mut header = vec![r.by.field().to_uppercase()];
    if with_workloads {
        header.push("WORKLOADS".into());
    }
    header.extend([
        "REQUESTS".to_string(),
        "BYTES".into(),
        "CPU-SECONDS".into(),
        format!("COST ({cur})"),
        "PER 1000 REQ".into(),
    ]);
    let numeric_from = header.len() - 5;
    t.set_header(header);
    for row in r.rows.iter().take(top) {
        let mut cells = vec![row.key.clone()];
        if with_workloads {
            cells.push(
                workloads
                    .get(&row.key)
                    .map(|w| w.join(","))
                    .unwrap_or_else(|| "-".into()),
            );
        }
        cells.extend([
            format!("{:.0}", row.requests),
            bytes(row.bytes),
            sig3(row.cpu_seconds),
            money(row.cost),
            row.cost_per_1000_requests()
                .map(money)
                .unwrap_or_else(|| "-".into()),
        ]);
        t.add_row(cells);
    }
    for i in numeric_from..numeric_from + 5 {
        if let Some(c) = t.column_mut(i) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
    let mut out = String::new();
    let when = window_text(r.window, windowed, r.source);
    if r.rows.is_empty() {
        out.push_str(&format!("no traffic {when}\n"));
    } else {
        out.push_str(&t.trim_fmt());
        out.push('\n');
        if r.rows.len() > top {
            let more = r.rows.len() - top;
            let s = if more == 1 { "" } else { "s" };
            out.push_str(&format!("({more} more row{s}; -o json lists them all)\n"));
        }
    }
    let requests: f64 = r.rows.iter().map(|x| x.requests).sum();
    let total_bytes: f64 = r.rows.iter().map(|x| x.bytes).sum();
    let cpu: f64 = r.rows.iter().map(|x| x.cpu_seconds).sum();
    let cost: f64 = r.rows.iter().map(|x| x.cost).sum();
    let per_k = if requests.round() > 0.0 {
        format!(
            ", {} {cur} per 1000 requests",
            money(cost / requests * 1000.0)
        )
    } else {
        String::new()
    };
    out.push_str(&format!(
        "total: {requests:.0} requests, {}, {} CPU-seconds: {} {cur}{per_k}, {when}\n",
        bytes(total_bytes),
        sig3(cpu),
        money(cost),
    ));
    if r.unattributed_cpu_seconds > 0.0 {
        out.push_str(&format!(
            "not in any row: {} CPU-seconds the proxies spent with no request to charge ({} {cur})\n",
            sig3(r.unattributed_cpu_seconds),
            money(r.prices.cost(r.unattributed_cpu_seconds, 0.0)),
        ));
    }
    out.push_str(&format!(
        "CPU is each proxy's own CPU time, apportioned to the requests it worked on; a request \
         between two meshed workloads is charged the CPU of both its proxies, its requests \
         and bytes counted once. Prices: {} {cur} per vCPU-hour, {} {cur} per GB (docs/cost.md).\n",
        r.prices.vcpu_hour, r.prices.gb
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn number_formats() {
        assert_eq!(sig3(0.0000356789), "0.0000357");
        assert_eq!(sig3(2.7), "2.70");
        assert_eq!(sig3(123.4), "123");
        assert_eq!(sig3(0.0), "0");
        assert_eq!(money(12.345), "12.35");
        assert_eq!(money(0.0123), "0.0123");
        assert_eq!(bytes(999.0), "999 B");
        assert_eq!(bytes(18_000.0), "18.0 kB");
        assert_eq!(bytes(2.5e9), "2.5 GB");
    }

    fn report(rows: Vec<Row>) -> Report {
        Report {
            by: By::Identity,
            rows,
            currency: "USD".into(),
            prices: Prices {
                vcpu_hour: 0.04,
                gb: 0.01,
            },
            window: Some(42.0),
            unattributed_cpu_seconds: 0.5,
            source: "proxies",
        }
    }

    fn row(key: &str, requests: f64, cost: f64) -> Row {
        Row {
            key: key.into(),
            requests,
            bytes: 1000.0,
            cpu_seconds: 0.1,
            cost,
        }
    }

    #[test]
    fn the_table_names_rows_workloads_and_totals_and_keeps_to_top() {
        let web = "spiffe://cluster.local/ns/demo/sa/web";
        let mut workloads = BTreeMap::new();
        workloads.insert(web.to_string(), vec!["web".to_string()]);
        let r = report(vec![
            row(web, 900.0, 0.002),
            row("spiffe://cluster.local/ns/demo/sa/batch", 100.0, 0.001),
            row("unknown", 0.0, 0.0005),
        ]);
        let out = table(&r, &workloads, 2, false);
        assert!(out.contains("IDENTITY"), "{out}");
        assert!(out.contains("WORKLOADS"), "{out}");
        assert!(out.contains(web) && out.contains(" web "), "{out}");
        assert!(out.contains("sa/batch"), "{out}");
        assert!(!out.contains("unknown"), "past --top: {out}");
        assert!(out.contains("(1 more row; -o json"), "{out}");
        assert!(
            out.contains("total: 1000 requests, 3.0 kB, 0.300 CPU-seconds: 0.00350 USD, 0.00350 USD per 1000 requests, over 42.0s, since the oldest proxy started"),
            "{out}"
        );
        assert!(out.contains("not in any row: 0.500 CPU-seconds"), "{out}");
        assert!(out.contains("apportioned"), "{out}");
        let empty = table(&report(vec![]), &workloads, 20, true);
        assert!(empty.starts_with("no traffic over 42.0s"), "{empty}");
    }
}
