//! `palisade stat [WORKLOAD] [--by route]`: live traffic per workload (or per route) of a
//! running local mesh: requests, rate, success rate, latency percentiles, mTLS share, denials.
//!
//! The proxies' admin `/metrics` are read twice, `--window` apart (10 s by default), and the
//! increase is reported ([`crate::observe`] does the arithmetic; docs/observe.md defines
//! every figure); `--since-start` reads them once and reports everything since each proxy
//! started; `--watch` reports window after window until Ctrl-C. With `--prometheus URL` the
//! same window (the last `--window`) comes from a Prometheus server that scrapes the proxies,
//! at once. This module also holds what `palisade edges` shares with it: the window flags,
//! the measuring loop and the number formats.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use serde_json::{Value, json};

use crate::observe::report::{self, By, StatRow};
use crate::observe::{Families, LocalMesh, MeshView, Prometheus, Server, Snapshot, Window};

/// What `-o` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// A table, and a line saying what it covers.
    Table,
    /// One JSON document (one per line with --watch).
    Json,
}

/// The flags `stat` and `edges` share: where the mesh is, the window, the output.
#[derive(clap::Args, Debug, Clone)]
pub struct WindowArgs {
    /// Measure over this window (`10s`, `1m`, `500ms`): read every proxy's metrics, wait, read
    /// them again, and report the difference. With --prometheus, the last D before now.
    #[arg(long, value_name = "D", default_value = "10s", value_parser = super::proxy::duration)]
    pub window: Duration,
    /// Read the proxies' counters from this Prometheus server (`http://HOST:PORT[/PREFIX]`,
    /// plain HTTP) instead of their admin ports: a cluster, or a local mesh it scrapes
    /// (docs/observe.md, "From Prometheus").
    #[arg(long, value_name = "URL")]
    pub prometheus: Option<String>,
    /// Read the proxies once and report everything they counted since each of them started
    /// (exact totals; rates over each proxy's age) instead of a window.
    #[arg(long, conflicts_with_all = ["window", "watch"])]
    pub since_start: bool,
    /// Report again after every window, until Ctrl-C.
    #[arg(long)]
    pub watch: bool,
    /// `table` or `json`.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// The state directory of the `palisade up` whose proxies are read [default: .palisade];
    /// with --prometheus, its mesh.json (if any) names the proxies by their admin addresses.
    #[arg(long, env = "PALISADE_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

/// What `--by` groups rows by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ByArg {
    /// One row per workload.
    Workload,
    /// One row per route rule (`namespace/name/rule`) the receiving proxies matched.
    Route,
}

#[derive(clap::Args, Debug)]
pub struct StatArgs {
    /// Only this workload (a name of the mesh file).
    #[arg(value_name = "WORKLOAD")]
    pub workload: Option<String>,
    /// One row per workload (default), or per route rule.
    #[arg(long, value_enum, default_value_t = ByArg::Workload)]
    pub by: ByArg,
    #[command(flatten)]
    pub common: WindowArgs,
}

/// One report: its JSON document and its table (with the line that says what it covers).
pub struct Rendered {
    pub json: Value,
    pub table: String,
}

pub fn run(a: StatArgs) -> anyhow::Result<ExitCode> {
    let by = match a.by {
        ByArg::Workload => By::Workload,
        ByArg::Route => By::Route,
    };
    let only = a.workload.as_deref();
    run_windows(&a.common, only, |mesh, window| {
        render_stat(mesh, window, by, only)
    })
}

/// The mesh of `--state-dir`, checked for the workload asked for.
fn read_mesh(common: &WindowArgs, only: Option<&str>) -> anyhow::Result<LocalMesh> {
    let dir = common
        .state_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(".palisade"));
    let mesh = LocalMesh::read(&dir)?;
    if mesh.workloads.is_empty() {
        bail!("{} lists no workload", mesh.path.display());
    }
    if let Some(name) = only
        && mesh.workload(name).is_none()
    {
        bail!(
            "no workload named {name:?} in {} (the mesh has: {})",
            mesh.path.display(),
            mesh.names()
        );
    }
    Ok(mesh)
}

/// The Prometheus server of `--prometheus URL`, with the local mesh whose admin addresses name
/// its targets: the mesh.json of `--state-dir` (which must then exist), or of `.palisade` if
/// there is one (a Prometheus scraping a local mesh; on a cluster there is none).
pub fn prometheus_source(url: &str, state_dir: Option<&PathBuf>) -> anyhow::Result<Prometheus> {
    let server = Server::parse(url)?;
    let local = match state_dir {
        Some(dir) => Some(LocalMesh::read(dir)?),
        None => {
            let dir = PathBuf::from(".palisade");
            if dir.join("mesh.json").exists() {
                Some(LocalMesh::read(&dir)?)
            } else {
                None
            }
        }
    };
    Ok(Prometheus { server, local })
}

/// `stat`/`edges` with `--prometheus`: the last `--window` at once, and with `--watch` again
/// every `--window`.
fn run_prometheus(
    common: &WindowArgs,
    url: &str,
    only: Option<&str>,
    render: impl Fn(&MeshView, &Window) -> anyhow::Result<Rendered>,
) -> anyhow::Result<ExitCode> {
    if common.since_start {
        bail!(
            "--since-start reads the proxies themselves, and --prometheus reads a Prometheus server: give --window D with --prometheus (the last D before now)"
        );
    }
    let source = prometheus_source(url, common.state_dir.as_ref())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut warned = Default::default();
        let ctrl_c = async {
            if common.watch {
                let _ = tokio::signal::ctrl_c().await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::pin!(ctrl_c);
        let mut next = tokio::time::Instant::now();
        loop {
            let (view, window) = source.window(common.window, Families::Traffic).await?;
            if let Some(name) = only
                && view.workload(name).is_none()
            {
                bail!(
                    "no workload named {name:?} in what Prometheus at {} scrapes (it has: {})",
                    source.server.authority(),
                    view.names()
                );
            }
            warn_missing(&window, &mut warned);
            print(&render(&view, &window)?, common.output, common.watch)?;
            if !common.watch {
                return Ok(ExitCode::SUCCESS);
            }
            next += common.window;
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = &mut ctrl_c => return Ok(ExitCode::SUCCESS),
            }
        }
    })
}

/// Names on stderr the proxies a report leaves out (once per workload and reason).
fn warn_missing(window: &Window, warned: &mut std::collections::BTreeMap<String, String>) {
    for (name, why) in &window.missing {
        if warned.get(name) != Some(why) {
            eprintln!("warning: cannot read the metrics of {name}'s proxy ({why}); it is left out");
            warned.insert(name.clone(), why.clone());
        }
    }
}

/// Measures (since start, one window, or window after window with `--watch`) and prints what
/// `render` makes of each window.
pub fn run_windows(
    common: &WindowArgs,
    only: Option<&str>,
    render: impl Fn(&MeshView, &Window) -> anyhow::Result<Rendered>,
) -> anyhow::Result<ExitCode> {
    if !common.since_start && common.window.is_zero() {
        bail!("--window 0s covers nothing: give a duration such as 10s");
    }
    if let Some(url) = &common.prometheus {
        return run_prometheus(common, url, only, render);
    }
    let mesh = read_mesh(common, only)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut warned = Default::default();
        let mut first = Snapshot::scrape_some(&mesh).await?;
        if let Some(name) = only
            && let Some(why) = first.failed.get(name)
        {
            bail!("cannot read the metrics of {name}'s proxy: {why}");
        }
        if common.since_start {
            let window = Window::since_start(&first);
            warn_missing(&window, &mut warned);
            print(&render(&mesh.view, &window)?, common.output, false)?;
            return Ok(ExitCode::SUCCESS);
        }
        let what = if common.watch { "every" } else { "for" };
        eprintln!(
            "measuring {what} {} ({} proxies)...",
            humantime::format_duration(common.window),
            first.proxies.len()
        );
        // With --watch, Ctrl-C ends the command (exit 0) whenever it comes; the listener is
        // made once so that a Ctrl-C during a scrape is not lost.
        let ctrl_c = async {
            if common.watch {
                let _ = tokio::signal::ctrl_c().await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::pin!(ctrl_c);
        let mut start = tokio::time::Instant::now();
        loop {
            let end = start + common.window;
            tokio::select! {
                _ = tokio::time::sleep_until(end) => {}
                _ = &mut ctrl_c => return Ok(ExitCode::SUCCESS),
            }
            start = end;
            let second = Snapshot::scrape(&mesh).await;
            let window = Window::between(&first, &second);
            if window.proxies.is_empty() {
                bail!(
                    "no proxy of {} answered both at the start and at the end of the window: is `palisade up` still running?",
                    mesh.path.display()
                );
            }
            warn_missing(&window, &mut warned);
            print(&render(&mesh.view, &window)?, common.output, common.watch)?;
            if !common.watch {
                return Ok(ExitCode::SUCCESS);
            }
            first = second;
        }
    })
}

fn print(r: &Rendered, output: Output, watch: bool) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match (output, watch) {
        (Output::Json, false) => writeln!(out, "{}", serde_json::to_string_pretty(&r.json)?)?,
        (Output::Json, true) => writeln!(out, "{}", serde_json::to_string(&r.json)?)?,
        (Output::Table, false) => write!(out, "{}", r.table)?,
        (Output::Table, true) => {
            if std::io::IsTerminal::is_terminal(&out) {
                // Home and clear: the new table replaces the last.
                write!(out, "\x1b[H\x1b[2J")?;
            }
            writeln!(out, "{}", r.table)?;
        }
    }
    out.flush()?;
    Ok(())
}

/// `stat`'s report of one window.
pub fn render_stat(
    mesh: &MeshView,
    window: &Window,
    by: By,
    only: Option<&str>,
) -> anyhow::Result<Rendered> {
    let rows = report::stat(mesh, window, by, only);
    let list: Vec<Value> = rows.iter().map(|r| r.json(by)).collect();
    let mut doc = match by {
        By::Workload => json!({ "workloads": list }),
        By::Route => json!({ "routes": list }),
    };
    add_window_fields(&mut doc, window);
    Ok(Rendered {
        json: doc,
        table: stat_table(&rows, by, window),
    })
}

/// `window`, `sinceStart` and `missing`, beside the rows.
pub fn add_window_fields(doc: &mut Value, window: &Window) {
    doc["window"] = json!(window.seconds);
    doc["sinceStart"] = json!(window.since_start);
    doc["missing"] = json!(window.missing.keys().collect::<Vec<_>>());
}

fn stat_table(rows: &[StatRow], by: By, window: &Window) -> String {
    use comfy_table::{CellAlignment, Table, presets};
    let mut t = Table::new();
    t.load_style(presets::NOTHING);
    let mut header = match by {
        By::Workload => vec!["NAME"],
        By::Route => vec!["ROUTE", "WORKLOADS"],
    };
    let first_number = header.len();
    header.extend([
        "REQUESTS", "RPS", "SUCCESS", "P50", "P95", "P99", "MTLS", "DENIED",
    ]);
    let columns = header.len();
    t.set_header(header);
    for r in rows {
        let tr = &r.traffic;
        let mut cells = vec![r.name.clone()];
        if by == By::Route {
            cells.push(r.workloads.join(","));
        }
        cells.extend([
            format!("{:.0}", tr.requests),
            rate(tr.rps),
            percent(tr.success_rate()),
            millis(tr.latency_ms(0.5)),
            millis(tr.latency_ms(0.95)),
            millis(tr.latency_ms(0.99)),
            percent(tr.mtls_share()),
            format!("{:.0}", r.denied),
        ]);
        t.add_row(cells);
    }
    for i in first_number..columns {
        if let Some(c) = t.column_mut(i) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
    let mut out = String::new();
    if rows.is_empty() {
        out.push_str(match by {
            By::Workload => "no workload to show\n",
            By::Route => "no route matched by the receiving proxies\n",
        });
    } else {
        out.push_str(&t.trim_fmt());
        out.push('\n');
    }
    out.push_str(&format!(
        "{}; requests counted at each workload's inbound side (docs/observe.md)\n",
        covers(window)
    ));
    out
}

/// What a window covers, in words: `over 10.0s`, `since the proxies started (up to 5m 3s)`.
pub fn covers(window: &Window) -> String {
    match (window.since_start, window.seconds) {
        (true, Some(s)) => format!(
            "since the proxies started (up to {} ago)",
            super::human_duration(s as u64)
        ),
        (true, None) => "since the proxies started".to_string(),
        (false, Some(s)) => format!("over {s:.1}s"),
        (false, None) => "over the window".to_string(),
    }
}

/// Requests per second, with the digits that matter; `-` when unknown.
pub fn rate(r: Option<f64>) -> String {
    let Some(r) = r else {
        return "-".into();
    };
    if r == 0.0 {
        "0".into()
    } else if r >= 100.0 {
        format!("{r:.0}")
    } else if r >= 1.0 {
        format!("{r:.1}")
    } else {
        format!("{r:.2}")
    }
}

/// A share as a percentage (`100%`, `99.50%`); `-` without requests.
pub fn percent(s: Option<f64>) -> String {
    let Some(s) = s else {
        return "-".into();
    };
    if s == 1.0 {
        "100%".into()
    } else if s == 0.0 {
        "0%".into()
    } else {
        format!("{:.2}%", s * 100.0)
    }
}

/// Milliseconds (`0.42ms`, `3.1ms`, `250ms`); `-` without observations.
pub fn millis(ms: Option<f64>) -> String {
    match ms {
        None => "-".into(),
        Some(m) if m < 1.0 => format!("{m:.2}ms"),
        Some(m) if m < 100.0 => format!("{m:.1}ms"),
        Some(m) => format!("{m:.0}ms"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn number_formats() {
        assert_eq!(rate(None), "-");
        assert_eq!(rate(Some(0.0)), "0");
        assert_eq!(rate(Some(0.123)), "0.12");
        assert_eq!(rate(Some(2.04)), "2.0");
        assert_eq!(rate(Some(1234.5)), "1234");
        assert_eq!(percent(Some(1.0)), "100%");
        assert_eq!(percent(Some(0.995)), "99.50%");
        assert_eq!(percent(None), "-");
        assert_eq!(millis(Some(0.4242)), "0.42ms");
        assert_eq!(millis(Some(3.125)), "3.1ms");
        assert_eq!(millis(Some(250.2)), "250ms");
        assert_eq!(millis(None), "-");
    }

    #[test]
    fn what_a_window_covers() {
        let mut w = Window {
            seconds: Some(10.04),
            ..Window::default()
        };
        assert_eq!(covers(&w), "over 10.0s");
        w.since_start = true;
        w.seconds = Some(303.0);
        assert_eq!(covers(&w), "since the proxies started (up to 5m 3s ago)");
    }

    #[test]
    fn the_table_has_a_row_per_workload_and_says_what_it_covers() {
        let mesh = LocalMesh::from_json(
            &json!({"workloads": [{"name": "api", "spiffeId": "spiffe://cluster.local/ns/demo/sa/api"}]}),
            "mesh.json".into(),
        )
        .unwrap();
        let text = "palisade_requests_total{direction=\"inbound\",src_identity=\"spiffe://cluster.local/ns/demo/sa/web\",dst_identity=\"spiffe://cluster.local/ns/demo/sa/api\",status_code=\"200\",route=\"\"} 20\n";
        let mut window = Window {
            seconds: Some(10.0),
            ..Window::default()
        };
        window.proxies.insert(
            "api".into(),
            crate::observe::snapshot::ProxyWindow {
                counters: Snapshot::proxy_from_text(text).counters,
                seconds: Some(10.0),
            },
        );
        let r = render_stat(&mesh.view, &window, By::Workload, None).unwrap();
        assert!(r.table.contains("NAME"), "{}", r.table);
        assert!(r.table.contains("api"), "{}", r.table);
        assert!(r.table.contains("100%"), "{}", r.table);
        assert!(r.table.contains("over 10.0s"), "{}", r.table);
        assert_eq!(r.json["workloads"][0]["requests"], 20);
        assert_eq!(r.json["workloads"][0]["rps"], 2.0);
        assert_eq!(r.json["window"], 10.0);
        assert_eq!(r.json["sinceStart"], false);
    }
}
