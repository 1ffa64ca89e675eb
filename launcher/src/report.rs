//! `bd3 report runs/a [runs/b …]`: PNG charts of a run's metrics (several runs overlaid) against
//! step and against tokens seen, and a `report.md` beside them with each run's provenance
//! (`run.json`), final metrics and the config keys in which the runs differ.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use plotters::prelude::*;

/// The charts, one per metric that any run recorded: (key in `metrics.jsonl`, title).
const CHARTS: [(&str, &str); 7] = [
    ("loss", "training loss"),
    ("valid_nelbo", "validation NELBO (nats/token)"),
    ("lr", "learning rate"),
    ("grad_norm", "gradient norm (before clipping)"),
    ("tokens_per_s", "tokens/s"),
    ("mfu", "MFU"),
    ("model_flops_per_s", "model FLOP/s per rank"),
];
pub const CHART_SIZE: (u32, u32) = (900, 540);
/// Distinct line colours; a chart with more series than these repeats them.
const COLORS: [RGBColor; 10] = [
    BLUE,
    RED,
    GREEN,
    MAGENTA,
    CYAN,
    BLACK,
    RGBColor(255, 140, 0),
    RGBColor(128, 0, 128),
    RGBColor(139, 69, 19),
    RGBColor(128, 128, 128),
];

/// One run directory's metrics, config and stamp.
pub struct Run {
    pub name: String,
    pub dir: PathBuf,
    /// Every `metrics.jsonl` value by key: (step, value) in file order.
    pub series: BTreeMap<String, Vec<(f64, f64)>>,
    /// Tokens of one optimizer step (from the log's `tokens_seen`), to put steps on a token axis.
    pub tokens_per_step: Option<f64>,
    /// The config, flattened to `section.key = value`.
    pub config: BTreeMap<String, String>,
    pub stamp: Option<serde_json::Value>,
}

impl Run {
    pub fn load(dir: &Path) -> Result<Self> {
        let metrics_path = dir.join("metrics.jsonl");
        let text = std::fs::read_to_string(&metrics_path)
            .with_context(|| format!("{}: not a run directory (no readable metrics.jsonl)", dir.display()))?;
        let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        let mut tokens_per_step = None;
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let Ok(serde_json::Value::Object(fields)) = serde_json::from_str(line) else {
                // A line cut short by a crash is the only line that may not parse.
                tracing::warn!(file = %metrics_path.display(), line = i + 1, "skipping a line that is not a JSON object");
                continue;
            };
            let Some(step) = fields.get("step").and_then(|s| s.as_f64()) else { continue };
            for (key, value) in &fields {
                if let Some(v) = value.as_f64().filter(|v| v.is_finite()) {
                    series.entry(key.clone()).or_default().push((step, v));
                }
            }
            if let Some(tokens) = fields.get("tokens_seen").and_then(|t| t.as_f64()) {
                if step > 0.0 {
                    tokens_per_step = Some(tokens / step);
                }
            }
        }
        let config_path = dir.join("config.toml");
        let config = match std::fs::read_to_string(&config_path) {
            Ok(text) => {
                let table: toml::Table =
                    toml::from_str(&text).with_context(|| format!("parsing {}", config_path.display()))?;
                let mut flat = BTreeMap::new();
                flatten("", &toml::Value::Table(table), &mut flat);
                flat
            }
            Err(_) => BTreeMap::new(),
        };
        let stamp = std::fs::read(dir.join("run.json")).ok().and_then(|b| serde_json::from_slice(&b).ok());
        let name = dir.file_name().map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into_owned());
        Ok(Self { name, dir: dir.to_path_buf(), series, tokens_per_step, config, stamp })
    }

    fn last(&self, key: &str) -> Option<f64> {
        self.series.get(key).and_then(|s| s.last()).map(|&(_, v)| v)
    }

    fn mean(&self, key: &str) -> Option<f64> {
        let s = self.series.get(key)?;
        (!s.is_empty()).then(|| s.iter().map(|&(_, v)| v).sum::<f64>() / s.len() as f64)
    }
}

fn flatten(prefix: &str, value: &toml::Value, out: &mut BTreeMap<String, String>) {
    match value {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(&key, v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

/// Writes the charts and `report.md` for `runs` into `out`; returns the files written.
pub fn write_report(runs: &[Run], out: &Path) -> Result<Vec<PathBuf>> {
    ensure!(!runs.is_empty(), "bd3 report needs at least one run directory");
    register_font()?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut written = Vec::new();
    let mut charts = Vec::new();
    for (key, title) in CHARTS {
        if !runs.iter().any(|r| r.series.get(key).is_some_and(|s| !s.is_empty())) {
            continue;
        }
        for axis in [Axis::Step, Axis::Tokens] {
            let file = out.join(format!("{key}-by-{}.png", axis.name()));
            draw_chart(runs, key, title, axis, &file)?;
            charts.push((format!("{title} by {}", axis.name()), file.clone()));
            written.push(file);
        }
    }
    let md = out.join("report.md");
    std::fs::write(&md, markdown(runs, &charts, out)).with_context(|| format!("writing {}", md.display()))?;
    written.push(md);
    Ok(written)
}

#[derive(Clone, Copy)]
enum Axis {
    Step,
    Tokens,
}

impl Axis {
    fn name(self) -> &'static str {
        match self {
            Axis::Step => "step",
            Axis::Tokens => "tokens",
        }
    }
}

fn register_font() -> Result<()> {
    static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular()).is_ok()
    });
    ensure!(ok, "the embedded DejaVu Sans font did not load");
    Ok(())
}

fn draw_chart(runs: &[Run], key: &str, title: &str, axis: Axis, file: &Path) -> Result<()> {
    let lines: Vec<(String, Vec<(f64, f64)>)> = runs
        .iter()
        .map(|run| {
            let scale = match axis {
                Axis::Step => 1.0,
                Axis::Tokens => run.tokens_per_step.unwrap_or(0.0),
            };
            let points =
                run.series.get(key).map_or_else(Vec::new, |s| s.iter().map(|&(x, y)| (x * scale, y)).collect());
            (run.name.clone(), points)
        })
        .collect();
    ensure!(lines.iter().any(|(_, p)| !p.is_empty()), "no data for {key}");
    let x_desc = match axis {
        Axis::Step => "step",
        Axis::Tokens => "tokens seen",
    };
    let labels = ChartLabels { title: &format!("{title} by {}", axis.name()), x: x_desc, y: title, markers: false };
    draw_lines(lines, &labels, file)
}

/// Titles of a chart, and whether every point gets a marker (for series of a few points).
pub struct ChartLabels<'a> {
    pub title: &'a str,
    pub x: &'a str,
    pub y: &'a str,
    pub markers: bool,
}

/// One line per named series on shared axes, with a legend.
fn draw_lines(lines: Vec<(String, Vec<(f64, f64)>)>, labels: &ChartLabels, file: &Path) -> Result<()> {
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in lines.iter().flat_map(|(_, p)| p.iter()) {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    ensure!(x0 <= x1, "no points to draw into {}", file.display());
    // A flat or single-point series still gets a visible range.
    let pad = |lo: f64, hi: f64| {
        if hi - lo > 0.0 {
            (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
        } else {
            (lo - 1.0, hi + 1.0)
        }
    };
    let ((x0, x1), (y0, y1)) = (pad(x0, x1), pad(y0, y1));
    let root = BitMapBackend::new(file, CHART_SIZE).into_drawing_area();
    let draw_err = |e: &dyn std::fmt::Display| anyhow::anyhow!("drawing {}: {e}", file.display());
    root.fill(&WHITE).map_err(|e| draw_err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(labels.title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| draw_err(&e))?;
    chart
        .configure_mesh()
        .x_desc(labels.x)
        .y_desc(labels.y)
        .x_label_formatter(&|x| short_number(*x))
        .y_label_formatter(&|y| short_number(*y))
        .draw()
        .map_err(|e| draw_err(&e))?;
    for (i, (name, points)) in lines.into_iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let style = ShapeStyle::from(&color).stroke_width(2);
        if labels.markers {
            chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, style.filled()))).map_err(|e| draw_err(&e))?;
        }
        chart
            .draw_series(LineSeries::new(points, style))
            .map_err(|e| draw_err(&e))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| draw_err(&e))?;
    root.present().map_err(|e| draw_err(&e))?;
    Ok(())
}

/// `bd3 report --points`: one chart of the points in a JSONL file, each line an object with
/// `series` (the legend's name), `x` and `y`; series keep the order they first appear in, and
/// each series' points are joined in x order.
pub fn draw_points(points_file: &Path, labels: &ChartLabels, png: &Path) -> Result<()> {
    register_font()?;
    let text = std::fs::read_to_string(points_file).with_context(|| format!("reading {}", points_file.display()))?;
    let mut lines: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let at = || format!("{} line {}", points_file.display(), i + 1);
        let value: serde_json::Value = serde_json::from_str(line).with_context(|| format!("{}: not JSON", at()))?;
        let field = |name: &str| {
            value
                .get(name)
                .and_then(|v| v.as_f64())
                .with_context(|| format!("{}: field `{name}` must be a number", at()))
        };
        let (x, y) = (field("x")?, field("y")?);
        let series = value
            .get("series")
            .and_then(|s| s.as_str())
            .with_context(|| format!("{}: field `series` must be a string", at()))?;
        match lines.iter_mut().find(|(name, _)| name == series) {
            Some((_, points)) => points.push((x, y)),
            None => lines.push((series.to_string(), vec![(x, y)])),
        }
    }
    for (_, points) in &mut lines {
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    if let Some(dir) = png.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    draw_lines(lines, labels, png)
}

/// 1234567 → "1.23M", 7500 → "7.5k", 0.5 → "0.5", 0.000123 → "1.23e-4": axis labels that
/// stay short.
fn short_number(x: f64) -> String {
    let trimmed =
        |s: String| if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.').to_string() } else { s };
    let a = x.abs();
    match a {
        _ if a == 0.0 => "0".into(),
        _ if a >= 1e9 => trimmed(format!("{:.2}", x / 1e9)) + "G",
        _ if a >= 1e6 => trimmed(format!("{:.2}", x / 1e6)) + "M",
        _ if a >= 1e3 => trimmed(format!("{:.2}", x / 1e3)) + "k",
        _ if a >= 0.01 => trimmed(format!("{x:.3}")),
        _ => format!("{x:.2e}"),
    }
}

fn markdown(runs: &[Run], charts: &[(String, PathBuf)], out: &Path) -> String {
    let mut md = String::from("# bd3 run report\n\n");
    let names: Vec<&str> = runs.iter().map(|r| r.name.as_str()).collect();
    let _ = writeln!(md, "Runs: {}\n", names.join(", "));
    md.push_str("## Final metrics\n\n");
    md.push_str(
        "| run | steps | tokens seen | final loss | final valid NELBO | valid PPL | mean tokens/s | final MFU |\n",
    );
    md.push_str("|---|---|---|---|---|---|---|---|\n");
    let fmt = |v: Option<f64>, digits: usize| v.map_or("–".to_string(), |v| format!("{v:.digits$}"));
    for r in runs {
        let steps = r.series.get("loss").and_then(|s| s.last()).map(|&(s, _)| s);
        let tokens = r.last("tokens_seen");
        let nelbo = r.last("valid_nelbo");
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            r.name,
            fmt(steps, 0),
            fmt(tokens, 0),
            fmt(r.last("loss"), 4),
            fmt(nelbo, 4),
            fmt(nelbo.map(f64::exp), 2),
            fmt(r.mean("tokens_per_s"), 0),
            r.last("mfu").map_or("–".to_string(), |u| format!("{:.1} %", 100.0 * u)),
        );
    }
    md.push_str("\n## Provenance\n\n| run | directory | git commit | config hash | bd3 | device | world size | hosts |\n|---|---|---|---|---|---|---|---|\n");
    for r in runs {
        let s = |key: &str| r.stamp.as_ref().and_then(|v| v.get(key)).map_or("–".to_string(), json_text);
        let device = match r.stamp.as_ref().and_then(|v| v.get("device_name")).filter(|v| !v.is_null()) {
            Some(name) => format!("{} ({})", s("device"), json_text(name)),
            None => s("device"),
        };
        let _ = writeln!(
            md,
            "| {} | `{}` | {} | {} | {} | {} | {} | {} |",
            r.name,
            r.dir.display(),
            s("git_commit"),
            s("config_hash"),
            s("bd3_version"),
            device,
            s("world_size"),
            s("hostnames")
        );
    }
    md.push_str("\n## Config differences\n\n");
    let keys: BTreeSet<&String> = runs.iter().flat_map(|r| r.config.keys()).collect();
    let differing: Vec<&String> = keys
        .into_iter()
        .filter(|k| {
            let values: BTreeSet<Option<&String>> = runs.iter().map(|r| r.config.get(*k)).collect();
            values.len() > 1
        })
        .collect();
    if runs.len() < 2 {
        md.push_str("One run: nothing to compare.\n");
    } else if differing.is_empty() {
        md.push_str("The runs' configs are identical.\n");
    } else {
        let _ = writeln!(md, "| key | {} |", names.join(" | "));
        let _ = writeln!(md, "|---|{}", "---|".repeat(runs.len()));
        for key in differing {
            let values: Vec<String> =
                runs.iter().map(|r| r.config.get(key).map_or("(unset)".to_string(), |v| format!("`{v}`"))).collect();
            let _ = writeln!(md, "| `{key}` | {} |", values.join(" | "));
        }
    }
    md.push_str("\n## Charts\n\n");
    for (title, file) in charts {
        let rel = file.strip_prefix(out).unwrap_or(file);
        let _ = writeln!(md, "![{title}]({})\n", rel.display());
    }
    md
}

fn json_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(items) => items.iter().map(json_text).collect::<Vec<_>>().join(", "),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::short_number;

    #[test]
    fn axis_labels_stay_short() {
        let labels: Vec<String> = [0.0, 1234567.0, 7500.0, 1000.0, 12.5, 0.5, 0.000123].map(short_number).into();
        assert_eq!(labels, ["0", "1.23M", "7.5k", "1k", "12.5", "0.5", "1.23e-4"]);
    }
}
