//! Renders a load [`Report`] as one self-contained HTML page (`--html`): the headline
//! figures as tables, and the timeline as inline SVG line charts (connections and memory,
//! CPU, latency percentiles over time, the latency distribution as a cumulative curve).
//! Inline CSS only: no scripts, no external resources.

use std::collections::HashMap;
use std::fmt::Write as _;

use super::report::{Report, Storm, Tick};
use crate::stats::Percentiles;

/// Colours of successive series (Tableau 10).
const PALETTE: [&str; 10] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

/// Dash pattern of a series by how many times the palette has been gone round before it.
const DASHES: [&str; 3] = ["", "6 3", "2 2"];

/// Width of a chart's viewBox.
const W: f64 = 900.0;
/// Height of a chart's viewBox without its legend.
const H: f64 = 300.0;
/// Room left of the plot area (y tick labels and axis label).
const LEFT: f64 = 64.0;
/// Room right of the plot area.
const RIGHT: f64 = 16.0;
/// Room above the plot area.
const TOP: f64 = 12.0;
/// Room below the plot area (x tick labels and axis label).
const BOTTOM: f64 = 44.0;
/// Height of one legend row.
const LEGEND_ROW: f64 = 16.0;

/// The page's style sheet.
const CSS: &str = "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1000px;\
margin:1.5em auto;padding:0 1em;color:#222}\
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}\
table{border-collapse:collapse;margin:.5em 0}td,th{padding:2px 10px;text-align:left;\
vertical-align:top;border-bottom:1px solid #eee}th{background:#f6f6f6}\
td.n{text-align:right}td.n,td.v{font-variant-numeric:tabular-nums}td.k{font-family:monospace}\
td.d{color:#777;font-size:.9em}.bad{color:#c00;font-weight:700}\
pre,code{background:#f6f6f6;padding:2px 4px;white-space:pre-wrap;overflow-wrap:anywhere}\
figure{margin:0 0 1em}figcaption{font-weight:600;font-size:.95em}\
.nodata{color:#999;font-style:italic}\
svg text{font-size:11px;fill:#333}.g{stroke:#e8e8e8}.ax{stroke:#555}\
.yt{text-anchor:end}.xt,.al{text-anchor:middle}\
.s{fill:none;stroke-width:1.5;stroke-linejoin:round}\
.mk{stroke:#777;stroke-dasharray:4 3}\
.mkl{font-size:10px;fill:#555;paint-order:stroke;stroke:#fff;stroke-width:3px}";

/// Renders `report` as one self-contained HTML page (inline CSS and SVG, no scripts, no
/// external resources).
pub fn render(report: &Report) -> String {
    let mut out = String::with_capacity(128 * 1024);
    let title = esc(&format!("gapless load: {}", report.scenario));
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>{title}</title><style>{CSS}</style></head><body>\n<h1>{title}</h1>\n"
    );

    summary(&mut out, report);

    let timeline = &report.timeline;
    let markers = markers(timeline);
    let x_range = time_range(timeline);
    let procs = process_series(timeline);

    out.push_str("<h2>Connections and memory over time</h2>\n");
    let connections = Series {
        name: "connections".to_owned(),
        color: 0,
        points: timeline
            .iter()
            .map(|t| (t.t, t.connections as f64))
            .collect(),
    };
    out.push_str(&line_chart(
        &Chart {
            x_range,
            ..Chart::new("Connections", "time (s)", "connections")
        },
        &[connections],
        &markers,
    ));
    let memory: Vec<Series> = procs
        .iter()
        .enumerate()
        .filter(|(_, p)| {
            ["edge", "redis", "ingest"]
                .iter()
                .any(|prefix| p.name.starts_with(prefix))
        })
        .map(|(i, p)| Series {
            name: p.name.clone(),
            color: i,
            points: p
                .points
                .iter()
                .map(|&(t, rss_kib, _)| (t, rss_kib / 1024.0))
                .collect(),
        })
        .collect();
    out.push_str(&line_chart(
        &Chart {
            x_range,
            ..Chart::new(
                "Resident memory (edge, redis, ingest)",
                "time (s)",
                "RSS (MiB)",
            )
        },
        &memory,
        &markers,
    ));

    out.push_str("<h2>CPU over time</h2>\n");
    let cpu: Vec<Series> = procs
        .iter()
        .enumerate()
        .map(|(i, p)| Series {
            name: p.name.clone(),
            color: i,
            points: p.points.iter().map(|&(t, _, cpu)| (t, cpu)).collect(),
        })
        .collect();
    out.push_str(&line_chart(
        &Chart {
            x_range,
            ..Chart::new("CPU per process", "time (s)", "% of one core")
        },
        &cpu,
        &markers,
    ));

    out.push_str("<h2>Latency percentiles over time</h2>\n");
    let latency = latency_series(timeline);
    let y_log = wide_range(latency.iter().flat_map(|s| s.points.iter().map(|p| p.1)));
    out.push_str(&line_chart(
        &Chart {
            x_range,
            y_log,
            ..Chart::new(
                "Ingest-to-client latency per interval, and Redis PING p99",
                "time (s)",
                if y_log { "ms (log scale)" } else { "ms" },
            )
        },
        &latency,
        &markers,
    ));

    out.push_str("<h2>Latency distribution</h2>\n");
    let cdf = cdf(&report.latency_distribution);
    let x_log = wide_range(cdf.iter().map(|p| p.0));
    out.push_str(&line_chart(
        &Chart {
            x_log,
            y_range: Some((0.0, 100.0)),
            ..Chart::new(
                "Share of notifications delivered within a latency (measured phase)",
                if x_log {
                    "latency (ms, log scale)"
                } else {
                    "latency (ms)"
                },
                "% at or below",
            )
        },
        &[Series {
            name: "notifications at or below".to_owned(),
            color: 0,
            points: cdf,
        }],
        &[],
    ));

    out.push_str("<h2>Processes</h2>\n");
    processes_table(&mut out, report);

    out.push_str("<h2>Where the time goes</h2>\n");
    stages_table(&mut out, report);

    out.push_str("</body></html>\n");
    out
}

/// One line of a chart.
struct Series {
    /// Legend text.
    name: String,
    /// Index into the palette (and, past its end, the dash patterns).
    color: usize,
    /// (x, y) in data units; a non-finite (or, on a log axis, non-positive) value breaks the
    /// line there.
    points: Vec<(f64, f64)>,
}

/// What a chart shows and how its axes are scaled.
struct Chart<'a> {
    /// Caption above the chart.
    title: &'a str,
    /// Label under the x axis.
    x_label: &'a str,
    /// Label along the y axis.
    y_label: &'a str,
    /// Fixed x domain (so stacked charts line up); else from the data.
    x_range: Option<(f64, f64)>,
    /// Fixed y domain; else from 0 (or the smallest value on a log axis) to the largest.
    y_range: Option<(f64, f64)>,
    /// Logarithmic x axis.
    x_log: bool,
    /// Logarithmic y axis.
    y_log: bool,
}

impl<'a> Chart<'a> {
    /// A chart with linear axes fitted to its data.
    fn new(title: &'a str, x_label: &'a str, y_label: &'a str) -> Self {
        Chart {
            title,
            x_label,
            y_label,
            x_range: None,
            y_range: None,
            x_log: false,
            y_log: false,
        }
    }
}

/// One axis: its domain, where it is drawn, and its ticks.
struct Axis {
    /// Smallest value of the domain.
    lo: f64,
    /// Largest value of the domain.
    hi: f64,
    /// Logarithmic scale.
    log: bool,
    /// Pixel the domain's `lo` maps to.
    px0: f64,
    /// Pixel the domain's `hi` maps to.
    px1: f64,
    /// (value, label) of each tick.
    ticks: Vec<(f64, String)>,
}

impl Axis {
    /// An axis covering `lo..=hi` (widened to round ticks), drawn from pixel `px0` to `px1`.
    fn new(lo: f64, hi: f64, log: bool, px0: f64, px1: f64) -> Self {
        if log && lo > 0.0 && lo.is_finite() && hi.is_finite() {
            let (dlo, dhi, ticks) = log_ticks(lo, hi.max(lo));
            return Axis {
                lo: dlo,
                hi: dhi,
                log: true,
                px0,
                px1,
                ticks,
            };
        }
        let (values, k) = nice_ticks(lo, hi, 5);
        let mag = values.iter().fold(0.0_f64, |m, v| m.max(v.abs()));
        let ticks: Vec<(f64, String)> = values.iter().map(|&v| (v, fmt_tick(v, k, mag))).collect();
        let dlo = values.first().copied().unwrap_or(0.0);
        let dhi = values.last().copied().unwrap_or(1.0);
        Axis {
            lo: dlo,
            hi: if dhi > dlo { dhi } else { dlo + 1.0 },
            log: false,
            px0,
            px1,
            ticks,
        }
    }

    /// The pixel of `v`, or `None` when it cannot be drawn (non-finite, or not positive on a
    /// log scale).
    fn map(&self, v: f64) -> Option<f64> {
        if !v.is_finite() {
            return None;
        }
        let (a, b, v) = if self.log {
            if v <= 0.0 {
                return None;
            }
            (self.lo.log10(), self.hi.log10(), v.log10())
        } else {
            (self.lo, self.hi, v)
        };
        let span = b - a;
        if !span.is_finite() || span <= 0.0 {
            return None;
        }
        let px = self.px0 + (v - a) / span * (self.px1 - self.px0);
        px.is_finite().then_some(px)
    }
}

/// Renders a chart as a `<figure>` holding an inline SVG: gridlines, ticks, axis labels, one
/// line per series, dashed vertical `markers` (x, label), and a legend; "no data" when no
/// series has a drawable point.
fn line_chart(chart: &Chart, series: &[Series], markers: &[(f64, String)]) -> String {
    let mut out = String::new();
    let _ = write!(out, "<figure><figcaption>{}</figcaption>", esc(chart.title));

    let drawable = |x: f64, y: f64| {
        x.is_finite() && y.is_finite() && (!chart.x_log || x > 0.0) && (!chart.y_log || y > 0.0)
    };
    let mut extent: Option<(f64, f64, f64, f64)> = None;
    for &(x, y) in series.iter().flat_map(|s| s.points.iter()) {
        if drawable(x, y) {
            extent = Some(match extent {
                None => (x, x, y, y),
                Some((x0, x1, y0, y1)) => (x0.min(x), x1.max(x), y0.min(y), y1.max(y)),
            });
        }
    }
    let Some((data_x0, data_x1, data_y0, data_y1)) = extent else {
        out.push_str("<p class=\"nodata\">no data</p></figure>\n");
        return out;
    };
    let (x0, x1) = chart
        .x_range
        .filter(|&(a, b)| a.is_finite() && b.is_finite() && (!chart.x_log || a > 0.0))
        .unwrap_or((data_x0, data_x1));
    let (y0, y1) = chart
        .y_range
        .filter(|&(a, b)| a.is_finite() && b.is_finite() && (!chart.y_log || a > 0.0))
        .unwrap_or(if chart.y_log {
            (data_y0, data_y1)
        } else {
            (data_y0.min(0.0), data_y1)
        });
    let (left, right, top, bottom) = (LEFT, W - RIGHT, TOP, H - BOTTOM);
    let xa = Axis::new(x0, x1, chart.x_log, left, right);
    let ya = Axis::new(y0, y1, chart.y_log, bottom, top);

    // Legend layout: items left to right, wrapping into rows under the x-axis label.
    let mut legend: Vec<(usize, f64, f64)> = Vec::with_capacity(series.len());
    let (mut lx, mut row) = (0.0, 0.0);
    for (i, s) in series.iter().enumerate() {
        let w = 30.0 + 6.5 * s.name.chars().count() as f64;
        if lx > 0.0 && lx + w > right - left {
            lx = 0.0;
            row += 1.0;
        }
        legend.push((i, left + lx, H + 8.0 + row * LEGEND_ROW));
        lx += w;
    }
    let height = if series.is_empty() {
        H
    } else {
        H + (row + 1.0) * LEGEND_ROW + 4.0
    };

    let _ = write!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {W} {height}\" width=\"100%\" \
         role=\"img\" aria-label=\"{}\">",
        esc(chart.title)
    );

    // Gridlines and tick labels.
    for (v, label) in &ya.ticks {
        if let Some(py) = ya.map(*v) {
            let py = r1(py);
            let _ = write!(
                out,
                "<line class=\"g\" x1=\"{left}\" x2=\"{right}\" y1=\"{py}\" y2=\"{py}\"/>\
                 <text class=\"yt\" x=\"{}\" y=\"{py}\" dy=\".32em\">{}</text>",
                left - 6.0,
                esc(label)
            );
        }
    }
    for (v, label) in &xa.ticks {
        if let Some(px) = xa.map(*v) {
            let px = r1(px);
            let _ = write!(
                out,
                "<line class=\"g\" x1=\"{px}\" x2=\"{px}\" y1=\"{top}\" y2=\"{bottom}\"/>\
                 <text class=\"xt\" x=\"{px}\" y=\"{}\">{}</text>",
                bottom + 15.0,
                esc(label)
            );
        }
    }
    let _ = write!(
        out,
        "<line class=\"ax\" x1=\"{left}\" x2=\"{right}\" y1=\"{bottom}\" y2=\"{bottom}\"/>\
         <line class=\"ax\" x1=\"{left}\" x2=\"{left}\" y1=\"{top}\" y2=\"{bottom}\"/>\
         <text class=\"al\" x=\"{}\" y=\"{}\">{}</text>\
         <text class=\"al\" transform=\"translate(14,{}) rotate(-90)\">{}</text>",
        r1((left + right) / 2.0),
        H - 8.0,
        esc(chart.x_label),
        r1((top + bottom) / 2.0),
        esc(chart.y_label)
    );

    // Event markers: the lines under the series, their labels over them.
    let placed: Vec<(f64, &str)> = markers
        .iter()
        .filter_map(|(x, label)| xa.map(*x).map(|px| (px, label.as_str())))
        .filter(|&(px, _)| px >= left - 0.5 && px <= right + 0.5)
        .collect();
    for &(px, _) in &placed {
        let px = r1(px);
        let _ = write!(
            out,
            "<line class=\"mk\" x1=\"{px}\" x2=\"{px}\" y1=\"{top}\" y2=\"{bottom}\"/>"
        );
    }

    for s in series {
        draw_series(&mut out, s, &xa, &ya);
    }

    for (i, &(px, label)) in placed.iter().enumerate() {
        let y = top + 10.0 + (i % 3) as f64 * 11.0;
        let (x, anchor) = if px > (left + right) / 2.0 {
            (px - 3.0, "end")
        } else {
            (px + 3.0, "start")
        };
        let _ = write!(
            out,
            "<text class=\"mkl\" x=\"{}\" y=\"{y}\" text-anchor=\"{anchor}\">{}</text>",
            r1(x),
            esc(label)
        );
    }

    for &(i, x, y) in &legend {
        let Some(s) = series.get(i) else { continue };
        let _ = write!(
            out,
            "<line x1=\"{x}\" x2=\"{}\" y1=\"{y}\" y2=\"{y}\" stroke=\"{}\" \
             stroke-width=\"2.5\"{}/><text x=\"{}\" y=\"{y}\" dy=\".32em\">{}</text>",
            r1(x + 20.0),
            colour(s.color),
            dash_attr(s.color),
            r1(x + 25.0),
            esc(&s.name)
        );
    }

    out.push_str("</svg></figure>\n");
    out
}

/// Appends one series as polylines (a circle for a lone point), broken wherever a point
/// cannot be drawn.
fn draw_series(out: &mut String, s: &Series, xa: &Axis, ya: &Axis) {
    let mut segment: Vec<(f64, f64)> = Vec::new();
    for &(x, y) in &s.points {
        match (xa.map(x), ya.map(y)) {
            (Some(px), Some(py)) => segment.push((px, py)),
            _ => {
                draw_segment(out, s, &segment);
                segment.clear();
            }
        }
    }
    draw_segment(out, s, &segment);
}

/// Appends one unbroken run of pixel points of `s`, thinned to at most two points (the
/// lowest and highest) per pixel column.
fn draw_segment(out: &mut String, s: &Series, segment: &[(f64, f64)]) {
    let points = thin(segment);
    let name = esc(&s.name);
    match points.as_slice() {
        [] => {}
        [(x, y)] => {
            let _ = write!(
                out,
                "<circle cx=\"{}\" cy=\"{}\" r=\"2\" fill=\"{}\"><title>{name}</title></circle>",
                r1(*x),
                r1(*y),
                colour(s.color)
            );
        }
        _ => {
            let _ = write!(
                out,
                "<polyline class=\"s\" stroke=\"{}\"{} points=\"",
                colour(s.color),
                dash_attr(s.color)
            );
            for (i, (x, y)) in points.iter().enumerate() {
                if i > 0 {
                    out.push(' ');
                }
                let _ = write!(out, "{},{}", r1(*x), r1(*y));
            }
            let _ = write!(out, "\"><title>{name}</title></polyline>");
        }
    }
}

/// Keeps, of each run of points in the same pixel column, only the lowest and highest (in
/// their order), which draws the same at this resolution.
fn thin(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(points.len());
    let mut i = 0;
    while i < points.len() {
        let column = points[i].0.floor();
        let mut j = i;
        let (mut lo, mut hi) = (i, i);
        while j < points.len() && points[j].0.floor() == column {
            if points[j].1 < points[lo].1 {
                lo = j;
            }
            if points[j].1 > points[hi].1 {
                hi = j;
            }
            j += 1;
        }
        out.push(points[lo.min(hi)]);
        if lo != hi {
            out.push(points[lo.max(hi)]);
        }
        i = j.max(i + 1);
    }
    out
}

/// Round ticks covering `lo..=hi`, about `target` steps of 1, 2 or 5 × 10^k apart, and k.
fn nice_ticks(lo: f64, hi: f64, target: usize) -> (Vec<f64>, i32) {
    let (mut lo, mut hi) = if lo.is_finite() && hi.is_finite() {
        (lo.min(hi), lo.max(hi))
    } else {
        (0.0, 1.0)
    };
    if hi - lo <= f64::EPSILON * hi.abs().max(1.0) {
        let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        lo -= if lo == 0.0 { 0.0 } else { pad };
        hi += pad;
    }
    let (step, k) = nice_step((hi - lo) / target.max(1) as f64);
    let first = (lo / step).floor();
    let last = (hi / step).ceil();
    if !(first.is_finite() && last.is_finite()) {
        return (vec![0.0, 1.0], 0);
    }
    let n = (last - first).clamp(1.0, 100.0) as usize;
    let ticks = (0..=n).map(|i| (first + i as f64) * step + 0.0).collect();
    (ticks, k)
}

/// The 1, 2 or 5 × 10^k nearest `raw` (which must be positive), and k.
fn nice_step(raw: f64) -> (f64, i32) {
    if !(raw.is_finite() && raw > 0.0) {
        return (1.0, 0);
    }
    let k = raw.log10().floor();
    let f = raw / 10f64.powf(k);
    let (m, k) = if f >= 50f64.sqrt() {
        (1.0, k + 1.0)
    } else if f >= 10f64.sqrt() {
        (5.0, k)
    } else if f >= 2f64.sqrt() {
        (2.0, k)
    } else {
        (1.0, k)
    };
    (m * 10f64.powf(k), k as i32)
}

/// Decade ticks (with 2 and 5 between them when few) covering `lo..=hi` (both positive):
/// the domain's ends and the (value, label) of each tick.
fn log_ticks(lo: f64, hi: f64) -> (f64, f64, Vec<(f64, String)>) {
    let e1 = (hi.log10().ceil() as i32).clamp(-300, 300);
    let e0 = (lo.log10().floor() as i32).clamp(e1 - 30, e1 - 1);
    let multiples: &[f64] = if e1 - e0 <= 2 {
        &[1.0, 2.0, 5.0]
    } else {
        &[1.0]
    };
    let mut ticks = Vec::new();
    for e in e0..=e1 {
        for &m in multiples {
            if e == e1 && m > 1.0 {
                break;
            }
            let v = m * 10f64.powi(e);
            ticks.push((v, fmt_tick(v, e, v)));
        }
    }
    (10f64.powi(e0), 10f64.powi(e1), ticks)
}

/// A tick label for `v` on an axis whose step is 10^`k` or more, in k or M when the axis
/// reaches `magnitude` of 10 000 or 10 000 000.
fn fmt_tick(v: f64, k: i32, magnitude: f64) -> String {
    if v == 0.0 {
        return "0".to_owned();
    }
    let (div, suffix, k) = if magnitude >= 1e7 {
        (1e6, "M", k - 6)
    } else if magnitude >= 1e4 {
        (1e3, "k", k - 3)
    } else {
        (1.0, "", k)
    };
    let decimals = usize::try_from(-k).unwrap_or(0).min(12);
    format!("{:.*}{suffix}", decimals, v / div + 0.0)
}

/// A coordinate rounded to one decimal, printed without a trailing `.0`.
fn r1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0 + 0.0
}

/// The colour of palette index `i`.
fn colour(i: usize) -> &'static str {
    PALETTE[i % PALETTE.len()]
}

/// The `stroke-dasharray` attribute (with a leading space) for palette index `i`, if any.
fn dash_attr(i: usize) -> String {
    match DASHES[(i / PALETTE.len()) % DASHES.len()] {
        "" => String::new(),
        d => format!(" stroke-dasharray=\"{d}\""),
    }
}

/// Whether the positive finite values span more than two decades (worth a log scale).
fn wide_range(values: impl Iterator<Item = f64>) -> bool {
    let (lo, hi) = values
        .filter(|v| v.is_finite() && *v > 0.0)
        .fold((f64::INFINITY, 0.0_f64), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    hi > 0.0 && hi / lo > 100.0
}

/// The time axis shared by the time charts: from 0 (or earlier) to the last tick.
fn time_range(timeline: &[Tick]) -> Option<(f64, f64)> {
    let times = timeline.iter().map(|t| t.t).filter(|t| t.is_finite());
    let (lo, hi) = times.fold((0.0_f64, f64::NEG_INFINITY), |(lo, hi), t| {
        (lo.min(t), hi.max(t))
    });
    (hi.is_finite() && hi > lo).then_some((lo, hi))
}

/// The ticks' event labels as chart markers (time, label).
fn markers(timeline: &[Tick]) -> Vec<(f64, String)> {
    timeline
        .iter()
        .filter_map(|t| t.event.as_ref().map(|e| (t.t, e.clone())))
        .collect()
}

/// One process's samples along the timeline.
struct ProcessLine {
    /// Its name.
    name: String,
    /// (t, RSS KiB, CPU %); NaN values where it was missing from ticks, to break the line.
    points: Vec<(f64, f64, f64)>,
}

/// Every process named in the timeline, in order of first appearance.
fn process_series(timeline: &[Tick]) -> Vec<ProcessLine> {
    let mut lines: Vec<ProcessLine> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    let mut last_seen: Vec<usize> = Vec::new();
    for (j, tick) in timeline.iter().enumerate() {
        for (name, rss_kib, cpu) in &tick.processes {
            let i = *index.entry(name.as_str()).or_insert_with(|| {
                lines.push(ProcessLine {
                    name: name.clone(),
                    points: Vec::new(),
                });
                last_seen.push(j);
                lines.len() - 1
            });
            let (Some(line), Some(seen)) = (lines.get_mut(i), last_seen.get_mut(i)) else {
                continue;
            };
            if *seen + 1 < j {
                line.points.push((tick.t, f64::NAN, f64::NAN));
            }
            *seen = j;
            line.points.push((tick.t, *rss_kib as f64, *cpu));
        }
    }
    lines
}

/// The latency chart's lines: p50, p99, p99.9 (broken at intervals without deliveries) and
/// the Redis PING p99.
fn latency_series(timeline: &[Tick]) -> Vec<Series> {
    let delivered = |t: &Tick, v: f64| {
        if t.p50_ms == 0.0 && t.p99_ms == 0.0 {
            f64::NAN
        } else {
            v
        }
    };
    let series = |name: &str, color: usize, f: &dyn Fn(&Tick) -> f64| Series {
        name: name.to_owned(),
        color,
        points: timeline.iter().map(|t| (t.t, f(t))).collect(),
    };
    vec![
        series("p50", 0, &|t| delivered(t, t.p50_ms)),
        series("p99", 1, &|t| delivered(t, t.p99_ms)),
        series("p99.9", 3, &|t| delivered(t, t.p999_ms)),
        series("Redis PING p99", 7, &|t| t.redis_rtt_p99_ms),
    ]
}

/// The cumulative distribution: (bucket upper bound ms, % of notifications at or below).
fn cdf(distribution: &[(f64, u64)]) -> Vec<(f64, f64)> {
    let mut buckets: Vec<(f64, u64)> = distribution
        .iter()
        .filter(|(bound, _)| !bound.is_nan())
        .copied()
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.iter().fold(0u64, |s, b| s.saturating_add(b.1));
    if total == 0 {
        return Vec::new();
    }
    let mut below = 0u64;
    let mut points = Vec::with_capacity(buckets.len());
    for (bound, count) in buckets {
        below = below.saturating_add(count);
        if bound.is_finite() {
            points.push((bound, below as f64 * 100.0 / total as f64));
        }
    }
    points
}

/// Appends the summary table (and the storm rows and ingest JSON when present).
fn summary(out: &mut String, r: &Report) {
    out.push_str("<h2>Summary</h2>\n<table><tbody>\n");
    let code = format!("<code>{}</code>", esc(&r.command));
    row(
        out,
        "command",
        &code,
        "the command line that produced this run",
    );
    row(
        out,
        "connections_peak",
        &int(r.connections_peak),
        "most connections open at once",
    );
    row(out, "edges", &int(r.edges as u64), "edge processes");
    row(
        out,
        "load_procs",
        &int(r.load_procs as u64),
        "load-generator processes",
    );
    row(
        out,
        "rate_per_s",
        &int(r.rate_per_s),
        "producer rate asked for, notifications/s",
    );
    row(
        out,
        "duration_s",
        &num(r.duration_s, 2),
        "seconds of the measured phase (after the ramp)",
    );
    row(
        out,
        "sent",
        &int(r.sent),
        "notifications the ingest acknowledged",
    );
    row(
        out,
        "delivered",
        &int(r.delivered),
        "delivered to their device (duplicates not counted)",
    );
    row(
        out,
        "lost",
        &must_be_zero(r.lost),
        "acknowledged but never delivered",
    );
    row(
        out,
        "duplicates",
        &int(r.duplicates),
        "repeats the clients dropped (redelivery after reconnects)",
    );
    row(
        out,
        "gaps",
        &must_be_zero(r.gaps),
        "seq skips the clients detected (must be 0)",
    );
    row(
        out,
        "resets",
        &must_be_zero(r.resets),
        "history-lost resets the clients received (must be 0)",
    );
    row(
        out,
        "latency_ms",
        &percentiles(&r.latency_ms),
        "ingest-to-client, measured phase",
    );
    row(
        out,
        "latency_ms_all",
        &percentiles(&r.latency_ms_all),
        "ingest-to-client, whole run including the ramp",
    );
    if r.pid1.measured_s > 0 {
        row(
            out,
            "pid1.latency_ms_quiet",
            &percentiles(&r.pid1.latency_ms_quiet),
            &format!(
                "ingest-to-client over the {} of {} measured seconds in which PID 1 (here the VM's agent) used at most {}% of a core, nor in the second before; it was busy in {} seconds of the run",
                r.pid1.quiet_s,
                r.pid1.measured_s,
                super::samplers::PID1_BUSY_PCT,
                r.pid1.busy_s
            ),
        );
    }
    row(
        out,
        "edge_rss_kib_per_idle_conn",
        &num(r.edge_rss_kib_per_idle_conn, 2),
        "edge memory per connection after the ramp, KiB",
    );
    row(out, "ramp_s", &num(r.ramp_s, 2), "seconds the ramp took");
    row(
        out,
        "redis_rtt_ms p99",
        &num(r.redis_rtt_ms_p99, 3),
        "Redis PING round trip over the run",
    );
    if let Some(storm) = &r.storm {
        storm_rows(out, storm);
    }
    out.push_str("</tbody></table>\n");
    if let Some(ingest) = &r.ingest {
        let pretty = serde_json::to_string_pretty(ingest).unwrap_or_else(|_| ingest.to_string());
        let _ = writeln!(out, "<h3>ingest</h3>\n<pre>{}</pre>", esc(&pretty));
    }
}

/// Appends the storm's rows to the summary table.
fn storm_rows(out: &mut String, s: &Storm) {
    out.push_str("<tr><th colspan=\"3\">storm</th></tr>\n");
    row(
        out,
        "storm.connections",
        &int(s.connections),
        "connections open when every edge was killed",
    );
    row(
        out,
        "storm.edges_back_s",
        &num(s.edges_back_s, 2),
        "kill until every edge was restarted and ready",
    );
    row(
        out,
        "storm.all_resumed_s",
        &num(s.all_resumed_s, 2),
        "kill until every connection was open and resumed",
    );
    row(
        out,
        "storm.caught_up_s",
        &num(s.caught_up_s, 2),
        "kill until everything acknowledged by then was delivered",
    );
    row(
        out,
        "storm.reconnects",
        &int(s.reconnects),
        "reconnects made",
    );
}

/// Appends one summary row: key, value (already HTML), description.
fn row(out: &mut String, key: &str, value_html: &str, description: &str) {
    let _ = writeln!(
        out,
        "<tr><td class=\"k\">{}</td><td class=\"v\">{value_html}</td><td class=\"d\">{}</td></tr>",
        esc(key),
        esc(description)
    );
}

/// Appends the per-process table.
fn processes_table(out: &mut String, r: &Report) {
    if r.processes.is_empty() {
        out.push_str("<p class=\"nodata\">no data</p>\n");
        return;
    }
    out.push_str(
        "<table><thead><tr><th>name</th><th>peak RSS MiB</th><th>mean CPU %</th>\
         <th>peak CPU %</th></tr></thead><tbody>\n",
    );
    for p in &r.processes {
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
             <td class=\"n\">{}</td></tr>",
            esc(&p.name),
            num(p.peak_rss_kib as f64 / 1024.0, 1),
            num(p.cpu_mean_pct, 1),
            num(p.cpu_peak_pct, 1)
        );
    }
    out.push_str("</tbody></table>\n");
}

/// The services' own stage histograms and Redis's busiest commands.
fn stages_table(out: &mut String, r: &Report) {
    if r.stages.is_empty() && r.redis_commands.is_empty() {
        out.push_str("<p class=\"nodata\">no data</p>\n");
        return;
    }
    out.push_str(
        "<table><thead><tr><th>stage (service histogram, bucket upper bounds)</th>\
         <th>observations</th><th>p50 ms</th><th>p99 ms</th></tr></thead><tbody>\n",
    );
    for st in &r.stages {
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
             <td class=\"n\">{}</td></tr>",
            esc(&st.stage),
            int(st.count),
            num(st.p50_ms, 2),
            num(st.p99_ms, 2)
        );
    }
    out.push_str("</tbody></table>\n");
    out.push_str(
        "<table><thead><tr><th>Redis command</th><th>calls</th><th>µs per call</th>\
         <th>total s</th></tr></thead><tbody>\n",
    );
    for (name, calls, per_call, total) in r.redis_commands.iter().take(12) {
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
             <td class=\"n\">{}</td></tr>",
            esc(name),
            int(*calls),
            num(*per_call, 1),
            num(*total, 2)
        );
    }
    out.push_str("</tbody></table>\n");
}

/// A latency summary as HTML: p50, p90, p99, p99.9 and max in ms.
fn percentiles(p: &Percentiles) -> String {
    format!(
        "p50 {} · p90 {} · p99 {} · p99.9 {} · max {} ms",
        num(p.p50, 2),
        num(p.p90, 2),
        num(p.p99, 2),
        num(p.p999, 2),
        num(p.max, 2)
    )
}

/// A count that should be zero, highlighted when it is not.
fn must_be_zero(v: u64) -> String {
    if v == 0 {
        int(v)
    } else {
        format!("<span class=\"bad\">{}</span>", int(v))
    }
}

/// `v` with `decimals` decimals, or "n/a" when it is not finite.
fn num(v: f64, decimals: usize) -> String {
    if v.is_finite() {
        format!("{:.*}", decimals, v + 0.0)
    } else {
        "n/a".to_owned()
    }
}

/// `v` with its thousands separated by commas.
fn int(v: u64) -> String {
    let digits = v.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `s` escaped for HTML text and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::report::{Pid1, ProcessSummary, Report, Storm, Tick};
    use super::*;

    /// Percentiles with every field `v`.
    fn flat(v: f64) -> Percentiles {
        Percentiles {
            p50: v,
            p90: v,
            p99: v,
            p999: v,
            max: v,
        }
    }

    /// A report with `ticks` ticks of `procs` processes each.
    fn report(ticks: usize, procs: usize) -> Report {
        let mut names = vec!["redis".to_owned(), "ingest".to_owned()];
        for i in 0..procs.saturating_sub(2) {
            names.push(if i % 2 == 0 {
                format!("edge-{}", i / 2)
            } else {
                format!("load-{}", i / 2)
            });
        }
        names.truncate(procs);
        let timeline = (0..ticks)
            .map(|i| {
                let t = (i + 1) as f64;
                let idle = i % 7 == 3;
                Tick {
                    t,
                    connections: (i as u64 * 1000).min(10_000),
                    sent: i as u64 * 500,
                    delivered: i as u64 * 499,
                    p50_ms: if idle { 0.0 } else { 1.0 + i as f64 % 5.0 },
                    p99_ms: if idle { 0.0 } else { 8.0 + i as f64 % 3.0 },
                    p999_ms: if idle { 0.0 } else { 20.0 },
                    max_ms: if idle { 0.0 } else { 30.0 },
                    redis_rtt_p99_ms: 0.2,
                    producer_lag_ms: 0.0,
                    processes: names
                        .iter()
                        .enumerate()
                        .map(|(k, n)| {
                            let cpu = if i == 2 && k == 0 {
                                f64::NAN
                            } else {
                                (k * i) as f64 % 90.0
                            };
                            (n.clone(), 50_000 + (k * i) as u64 * 100, cpu)
                        })
                        .collect(),
                    event: match i {
                        1 => Some("ramp 10000".to_owned()),
                        4 => Some("edges killed <all>".to_owned()),
                        _ => None,
                    },
                }
            })
            .collect();
        Report {
            scenario: "storm".to_owned(),
            transport: "ws".to_owned(),
            command: "gapless-bench load --scenario storm --connections 10000".to_owned(),
            connections_peak: 10_000,
            edges: 2,
            load_procs: 2,
            rate_per_s: 1000,
            duration_s: 60.0,
            sent: 60_000,
            delivered: 60_000,
            lost: 0,
            duplicates: 12,
            gaps: 0,
            resets: 1,
            latency_ms: flat(2.5),
            latency_ms_all: flat(f64::NAN),
            latency_distribution: vec![(0.5, 10), (1.0, 100), (2.0, 500), (5.0, 300), (100.0, 5)],
            pid1: Pid1 {
                measured_s: 60,
                busy_s: 19,
                quiet_s: 22,
                latency_ms_quiet: flat(3.0),
            },
            edge_rss_kib_per_idle_conn: 3.14659,
            edge_rss_kib_before: vec![10_000, 10_000],
            edge_rss_kib_after: vec![25_000, 25_000],
            ramp_s: 4.2,
            redis_rtt_ms: flat(0.2),
            redis_rtt_ms_p99: 0.2,
            storm: Some(Storm {
                connections: 10_000,
                edges_back_s: 1.5,
                all_resumed_s: 3.25,
                caught_up_s: 4.75,
                reconnects: 10_042,
            }),
            ingest: Some(serde_json::json!({"direct": {"per_s": 12345}, "note": "a<b"})),
            processes: names
                .iter()
                .map(|n| ProcessSummary {
                    name: n.clone(),
                    peak_rss_kib: 80_000,
                    cpu_mean_pct: 12.5,
                    cpu_peak_pct: f64::INFINITY,
                })
                .collect(),
            stages: Vec::new(),
            redis_commands: vec![("fcall".to_owned(), 10, 4.5, 0.1)],
            timeline,
        }
    }

    #[test]
    fn renders_a_full_report() {
        let r = report(12, 6);
        let html = render(&r);
        assert!(html.starts_with("<!DOCTYPE html>"));
        assert!(html.ends_with("</html>\n"));
        assert!(html.contains("<svg"));
        assert!(html.contains("gapless load: storm"));
        for p in &r.processes {
            assert!(html.contains(&p.name), "missing process {}", p.name);
        }
        assert!(html.contains("ramp 10000"));
        assert!(html.contains("edges killed &lt;all&gt;"));
        assert!(html.contains("storm.caught_up_s"));
        assert!(html.contains("10,042"));
        assert!(html.contains("3.15"));
        assert!(html.contains("&quot;note&quot;: &quot;a&lt;b&quot;"));
        assert!(html.contains("<span class=\"bad\">1</span>"));
        assert!(!html.contains("NaN"));
        assert!(!html.contains("inf"));
        assert!(!html.contains("<script"));
        assert!(!html.contains("src=") && !html.contains("href="));
        assert_eq!(html.matches("<svg").count(), 5);
    }

    #[test]
    fn escapes_the_scenario() {
        let mut r = report(3, 2);
        r.scenario = "<script>alert('x')</script>".to_owned();
        let html = render(&r);
        assert!(!html.contains("<script>"));
        assert!(html.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;"));
    }

    #[test]
    fn empty_report_renders() {
        let mut r = report(0, 0);
        r.latency_distribution.clear();
        r.storm = None;
        r.ingest = None;
        let html = render(&r);
        assert!(html.contains("no data"));
        assert!(!html.contains("NaN"));
        assert!(!html.contains("<svg"));

        r.latency_distribution = vec![(f64::NAN, 3), (f64::INFINITY, 0), (0.0, 0)];
        r.timeline = report(1, 1).timeline;
        let html = render(&r);
        assert!(!html.contains("NaN"));
    }

    #[test]
    fn large_report_stays_small() {
        let html = render(&report(600, 15));
        assert!(html.len() < 1_000_000, "{} bytes", html.len());
        assert!(!html.contains("NaN"));
    }

    #[test]
    fn nice_ticks_are_round() {
        assert_eq!(
            nice_ticks(0.0, 97.0, 5).0,
            vec![0.0, 20.0, 40.0, 60.0, 80.0, 100.0]
        );
        assert_eq!(
            nice_ticks(0.0, 1.0, 5).0,
            vec![0.0, 0.2, 0.4, 0.6000000000000001, 0.8, 1.0]
        );
        let (ticks, k) = nice_ticks(0.0, 0.0, 5);
        assert!(ticks.len() >= 2 && k <= 0);
        let (ticks, _) = nice_ticks(f64::NAN, f64::INFINITY, 5);
        assert!(ticks.iter().all(|t| t.is_finite()));
        assert_eq!(nice_step(19.4), (20.0, 1));
        assert_eq!(nice_step(0.7), (0.5, -1));
    }

    #[test]
    fn tick_labels() {
        assert_eq!(fmt_tick(0.6000000000000001, -1, 1.0), "0.6");
        assert_eq!(fmt_tick(40_000.0, 4, 100_000.0), "40k");
        assert_eq!(fmt_tick(2_500_000.0, 5, 1e7), "2.5M");
        assert_eq!(fmt_tick(0.0, 0, 10.0), "0");
        assert_eq!(fmt_tick(0.0, 3, 10_000.0), "0");
        let (lo, hi, ticks) = log_ticks(0.3, 4000.0);
        assert_eq!((lo, hi), (0.1, 10_000.0));
        let labels: Vec<&str> = ticks.iter().map(|t| t.1.as_str()).collect();
        assert_eq!(labels, ["0.1", "1", "10", "100", "1000", "10k"]);
    }

    #[test]
    fn cdf_accumulates() {
        let c = cdf(&[(2.0, 50), (1.0, 25), (f64::INFINITY, 25)]);
        assert_eq!(c, vec![(1.0, 25.0), (2.0, 75.0)]);
        assert!(cdf(&[]).is_empty());
    }

    #[test]
    fn helpers() {
        assert_eq!(int(0), "0");
        assert_eq!(int(1_234_567), "1,234,567");
        assert_eq!(num(f64::NAN, 2), "n/a");
        assert_eq!(r1(-0.01), 0.0);
        assert_eq!(
            thin(&[(1.1, 5.0), (1.5, 2.0), (1.9, 9.0), (2.2, 1.0)]).len(),
            3
        );
    }
}
