//! `palisade edges`: who talks to whom in a running local mesh, over a window: caller →
//! callee with both SPIFFE IDs, whether the requests came over mTLS (SECURED), requests,
//! success rate and denials. Counted at the callee's proxy (its inbound side); a callee whose
//! proxy is not read (outside the mesh) from the caller's outbound side. The window flags are
//! `stat`'s ([`super::stat::WindowArgs`], `--prometheus` included); docs/observe.md defines
//! the figures.

use std::process::ExitCode;

use serde_json::{Value, json};

use super::stat::{self, Rendered, WindowArgs, millis, percent, rate};
use crate::observe::report::{self, CountedAt, EdgeRow};
use crate::observe::{MeshView, Window};

#[derive(clap::Args, Debug)]
pub struct EdgesArgs {
    #[command(flatten)]
    pub common: WindowArgs,
}

pub fn run(a: EdgesArgs) -> anyhow::Result<ExitCode> {
    stat::run_windows(&a.common, None, render)
}

/// `edges`' report of one window.
pub fn render(mesh: &MeshView, window: &Window) -> anyhow::Result<Rendered> {
    let rows = report::edges(mesh, window);
    let mut doc = json!({ "edges": rows.iter().map(EdgeRow::json).collect::<Vec<Value>>() });
    stat::add_window_fields(&mut doc, window);
    Ok(Rendered {
        json: doc,
        table: table(&rows, window),
    })
}

fn table(rows: &[EdgeRow], window: &Window) -> String {
    use comfy_table::{CellAlignment, Table, presets};
    let mut t = Table::new();
    t.load_style(presets::NOTHING);
    t.set_header([
        "SRC",
        "DST",
        "SECURED",
        "REQUESTS",
        "RPS",
        "SUCCESS",
        "P99",
        "DENIED",
        "SRC IDENTITY",
        "DST IDENTITY",
    ]);
    for r in rows {
        let tr = &r.traffic;
        let mut dst = r.dst.clone();
        if r.counted_at == CountedAt::Outbound {
            dst.push('*');
        }
        t.add_row([
            r.src.clone(),
            dst,
            if r.secured { "yes" } else { "no" }.to_string(),
            format!("{:.0}", tr.requests),
            rate(tr.rps),
            percent(tr.success_rate()),
            millis(tr.latency_ms(0.99)),
            format!("{:.0}", r.denied),
            r.src_identity.clone(),
            r.dst_identity.clone(),
        ]);
    }
    for i in 3..8 {
        if let Some(c) = t.column_mut(i) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
    let mut out = String::new();
    if rows.is_empty() {
        out.push_str("no traffic between workloads yet\n");
    } else {
        out.push_str(&t.trim_fmt());
        out.push('\n');
    }
    if rows.iter().any(|r| r.counted_at == CountedAt::Outbound) {
        out.push_str(
            "*: the callee's proxy was not read (outside the mesh, or not answering): counted at the caller's proxy\n",
        );
    }
    out.push_str(&format!(
        "{}; requests counted at the callee's inbound side; SECURED: mTLS, the caller's identity known (docs/observe.md)\n",
        stat::covers(window)
    ));
    out
}
