//! The `--plot` SVG: latency against percentile, a line per mode and fixed rate.

use std::path::Path;

use super::report::RunResult;

/// The percentiles the plot's x axis marks.
const PLOT_TICKS: [(f64, &str); 4] = [(0.5, "p50"), (0.9, "p90"), (0.99, "p99"), (0.999, "p99.9")];

/// The x position of quantile `q`: the number of nines, so p50, p90, p99 and p99.9 spread out.
fn nines(q: f64) -> f64 {
    -(1.0f64 - q).log10()
}

/// The plot's x axis: [`nines`] from p20 to past p99.9, ticks at [`PLOT_TICKS`] only, each
/// labelled with its percentile.
struct PercentileAxis;

impl PercentileAxis {
    const RANGE: std::ops::Range<f64> = 0.2..3.1;
}

impl plotters::coord::ranged1d::Ranged for PercentileAxis {
    type FormatOption = plotters::coord::ranged1d::NoDefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        let span = Self::RANGE.end - Self::RANGE.start;
        let at = (value - Self::RANGE.start) / span;
        limit.0 + (f64::from(limit.1 - limit.0) * at).round() as i32
    }

    fn key_points<H: plotters::coord::ranged1d::KeyPointHint>(&self, hint: H) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            PLOT_TICKS.iter().map(|(q, _)| nines(*q)).collect()
        }
    }

    fn range(&self) -> std::ops::Range<f64> {
        Self::RANGE
    }
}

impl plotters::coord::ranged1d::ValueFormatter<f64> for PercentileAxis {
    fn format(value: &f64) -> String {
        PLOT_TICKS
            .iter()
            .find(|(q, _)| (nines(*q) - value).abs() < 1e-9)
            .map(|(_, name)| name.to_string())
            .unwrap_or_default()
    }
}

pub(super) fn plot(path: &Path, results: &[RunResult]) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let quantiles = [0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999];
    // One line per mode and fixed rate; the closed-loop max-throughput runs measure something
    // else (and would flatten the rest), they are in the table and the JSON.
    /// (legend label, mode, points).
    type Series<'a> = (String, &'a str, Vec<(f64, f64)>);
    let series: Vec<Series> = results
        .iter()
        .filter_map(|r| {
            let rate = r.rate?;
            let pts = quantiles.iter().map(|q| (nines(*q), r.ms(*q))).collect();
            Some((format!("{} {rate} rps", r.mode), r.mode, pts))
        })
        .collect();
    let ymax = series
        .iter()
        .flat_map(|(_, _, p)| p.iter().map(|x| x.1))
        .fold(0.1f64, f64::max)
        * 1.1;
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "latency by percentile, per mode and rate",
            ("sans-serif", 20),
        )
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(PercentileAxis, 0.0f64..ymax)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (ms)")
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    // A colour family per mode, darker for higher rates.
    let mut seen: Vec<&str> = Vec::new();
    for (label, mode, pts) in series {
        let nth = seen.iter().filter(|m| **m == mode).count();
        seen.push(mode);
        let base: RGBColor = match mode {
            "direct" => BLUE,
            "relays" => GREEN,
            _ => RED,
        };
        let fade = 1.0 / (1.0 + nth as f64);
        let color = RGBColor(
            (f64::from(base.0) * fade) as u8,
            (f64::from(base.1) * fade) as u8,
            (f64::from(base.2) * fade) as u8,
        );
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}
