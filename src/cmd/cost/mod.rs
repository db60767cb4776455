//! `palisade cost`: what each caller (or route) costs, from the proxies' own cost counters.
//!
//! The figures come from every proxy's admin `/metrics` of a running local mesh (the
//! workloads of `STATE_DIR/mesh.json`), or from a Prometheus server that scrapes the proxies
//! (`--prometheus`), both read by [`crate::observe`] as `stat` and `edges` read them. Without
//! `--window`, scraped counters cover the time since the proxies started (the window is then
//! the age of the oldest one); with it, the proxies are scraped twice, the window apart, and
//! the increase is reported; from Prometheus, the last `--window` (default 1h). Money is
//! `cpuSeconds / 3600 * price-vcpu-hour + bytes / 1e9 * price-gb`. docs/cost.md has the
//! metrics, the request-counting rule and the JSON.

mod model;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;

pub use model::{By, Counters, Prices, Report, Row};

use crate::observe::{Families, LocalMesh, MeshView, Snapshot, Window};

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
        default_value_t = DEFAULT_PRICE_VCPU_HOUR,
        allow_negative_numbers = true
    )]
    pub price_vcpu_hour: f64,
    /// The price of one GB (1e9 bytes) through the proxies. The default is a list-price
    /// placeholder: set your own.
    #[arg(
        long,
        value_name = "Y",
        default_value_t = DEFAULT_PRICE_GB,
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

/// List-price placeholders (docs/cost.md): one vCPU-hour, one GB through the proxies.
const DEFAULT_PRICE_VCPU_HOUR: f64 = 0.04;
const DEFAULT_PRICE_GB: f64 = 0.01;

/// The default window of a Prometheus read.
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
    let (measured, view) = rt.block_on(measure(
        a.prometheus.as_deref(),
        a.state_dir.as_ref(),
        a.window.map(Into::into),
    ))?;
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
        Output::Table => print!(
            "{}",
            table(&report, &workloads(&view), a.top, a.window.is_some())
        ),
    }
    Ok(ExitCode::SUCCESS)
}

/// The counters from Prometheus (over `window`, default 1h) or from the proxies of the local
/// mesh (over `window`, or since they started), and the workloads' names.
async fn measure(
    prometheus: Option<&str>,
    state_dir: Option<&PathBuf>,
    window: Option<Duration>,
) -> anyhow::Result<(Measured, MeshView)> {
    match prometheus {
        Some(url) => {
            let source = super::stat::prometheus_source(url, state_dir)?;
            let window = window.unwrap_or(PROMETHEUS_WINDOW);
            let (view, w) = source.window(window, Families::Cost).await?;
            Ok((
                Measured {
                    counters: added_up(&w),
                    window: Some(window.as_secs_f64()),
                    source: "prometheus",
                },
                view,
            ))
        }
        None => {
            let dir = state_dir
                .cloned()
                .unwrap_or_else(|| PathBuf::from(".palisade"));
            let mesh = read_mesh(&dir)?;
            let measured = scrape(&mesh, window).await?;
            Ok((measured, mesh.view))
        }
    }
}

/// What `palisade cost -o json` prints with its defaults (per caller, list prices, since the
/// proxies started or Prometheus's last hour): the dashboard's cost view.
pub async fn default_json(
    prometheus: Option<&str>,
    state_dir: &Path,
) -> anyhow::Result<serde_json::Value> {
    // With Prometheus, the local mesh only names workloads, when there is one.
    let state_dir = (prometheus.is_none() || state_dir.join("mesh.json").exists())
        .then(|| state_dir.to_path_buf());
    let (measured, _) = measure(prometheus, state_dir.as_ref(), None).await?;
    let prices = Prices {
        vcpu_hour: DEFAULT_PRICE_VCPU_HOUR,
        gb: DEFAULT_PRICE_GB,
    };
    let report = Report {
        by: By::Identity,
        rows: model::rows(&measured.counters, By::Identity, prices),
        currency: "USD".to_string(),
        prices,
        window: measured.window,
        unattributed_cpu_seconds: measured.counters.unattributed_cpu(),
        source: measured.source,
    };
    Ok(report.json())
}

/// Workload names by SPIFFE ID (for the table).
type Workloads = BTreeMap<String, Vec<String>>;

/// The names of the table's WORKLOADS column, from whichever source named the workloads
/// (mesh.json, or the labels Prometheus gives the proxies).
fn workloads(view: &MeshView) -> Workloads {
    let mut out = Workloads::new();
    for w in &view.workloads {
        if let Some(id) = &w.spiffe_id {
            out.entry(id.clone()).or_default().push(w.name.clone());
        }
    }
    out
}

/// The mesh `palisade up` runs with this state dir.
fn read_mesh(dir: &Path) -> anyhow::Result<LocalMesh> {
    let path = dir.join("mesh.json");
    if !path.exists() {
        bail!(
            "no running mesh: there is no {} (`palisade up` is not running with the state dir {}; start it, or give --state-dir or --prometheus)",
            path.display(),
            dir.display()
        );
    }
    let mesh = LocalMesh::read(dir)?;
    if mesh.workloads.iter().all(|w| w.admin.is_none()) {
        bail!("{} lists no proxy to read", path.display());
    }
    Ok(mesh)
}

/// The counters (added up over the proxies) and the seconds they cover.
struct Measured {
    counters: Counters,
    window: Option<f64>,
    source: &'static str,
}

/// The cost counters of every proxy of a window, added up.
fn added_up(w: &Window) -> Counters {
    let mut counters = Counters::default();
    for p in w.proxies.values() {
        counters.add(&p.counters.cost);
    }
    counters
}

/// Names on stderr the proxies that cannot be read (once each).
fn warn_unread(failed: &BTreeMap<String, String>, warned: &mut BTreeMap<String, String>) {
    for (name, why) in failed {
        if warned.get(name) != Some(why) {
            eprintln!(
                "warning: cannot read the metrics of {name}'s proxy ({why}); its share is missing from the figures"
            );
            warned.insert(name.clone(), why.clone());
        }
    }
}

/// The proxies of `mesh` since they started, or over `window` (two scrapes).
async fn scrape(mesh: &LocalMesh, window: Option<Duration>) -> anyhow::Result<Measured> {
    let first = Snapshot::scrape_some(mesh).await?;
    // From the end of the first read, as `stat` does: the second read then starts at least a
    // window after every proxy's first answer, so the window covered is never shorter than
    // asked.
    let first_at = tokio::time::Instant::now();
    let mut warned = BTreeMap::new();
    warn_unread(&first.failed, &mut warned);
    if first.proxies.values().all(|p| p.counters.cost.0.is_empty()) {
        eprintln!(
            "warning: the proxies export no palisade_cost_* metrics (proxies older than this command?); every figure is 0"
        );
    }
    let Some(window) = window else {
        let w = Window::since_start(&first);
        if w.seconds.is_none() {
            eprintln!(
                "warning: no proxy says when it started ({}); the window is unknown",
                crate::observe::snapshot::START_TIME
            );
        }
        return Ok(Measured {
            counters: added_up(&w),
            window: w.seconds,
            source: "proxies",
        });
    };
    eprintln!(
        "measuring for {} ({} proxies)...",
        humantime::format_duration(window),
        first.proxies.len()
    );
    tokio::time::sleep_until(first_at + window).await;
    let second = Snapshot::scrape(mesh).await;
    let w = Window::between(&first, &second);
    if w.proxies.is_empty() {
        bail!("no proxy answered both at the start and at the end of the window");
    }
    warn_unread(&w.missing, &mut warned);
    Ok(Measured {
        counters: added_up(&w),
        window: w.seconds,
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
