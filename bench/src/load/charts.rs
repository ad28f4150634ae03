//! The load report's charts, drawn by plotters' SVG backend into inline SVG: lines over the
//! run's time (broken where a value is missing), an optional band (the spread between the
//! least and the most of several processes), numbered event markers, and the latency
//! distribution as a percentile plot whose axes are logarithmic, so the tail is as legible
//! as the median. The text is left to the browser (no fonts are embedded).

use plotters::coord::Shift;
use plotters::coord::ranged1d::{AsRangedCoord, Ranged};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

/// The drawing's size in SVG units; the page scales it to its width.
const WIDTH: u32 = 800;
/// Height of a time chart.
const HEIGHT: u32 = 260;

/// Line colours, distinguishable and colour-blind friendly (Okabe-Ito).
const COLOURS: [RGBColor; 7] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
    RGBColor(90, 90, 90),
];

/// One line: (x, y) points; a non-finite y breaks it.
pub struct Line {
    /// Its name in the legend.
    pub name: String,
    /// The points, in x order.
    pub points: Vec<(f64, f64)>,
}

/// A band: (x, low, high) points, drawn under the lines.
pub struct Band {
    /// Its name in the legend.
    pub name: String,
    /// The points, in x order.
    pub points: Vec<(f64, f64, f64)>,
}

/// A chart over the run's time.
pub struct TimeChart<'a> {
    /// The y axis's description.
    pub y_desc: &'a str,
    /// The lines.
    pub lines: Vec<Line>,
    /// A band under them.
    pub band: Option<Band>,
    /// Event markers: (time, number); the page lists what each number means.
    pub markers: &'a [(f64, usize)],
    /// A logarithmic y axis (latencies: the tail and the median on one chart).
    pub y_log: bool,
    /// The time axis, s.
    pub x_range: (f64, f64),
}

/// The chart as an SVG element, or `None` when it has nothing to draw.
pub fn time_chart(chart: &TimeChart<'_>) -> Option<String> {
    let ys = chart
        .lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.1))
        .chain(chart.band.iter().flat_map(|b| b.points.iter().map(|p| p.2)))
        .filter(|y| y.is_finite() && (!chart.y_log || *y > 0.0));
    let (lo, hi) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), y| {
        (lo.min(y), hi.max(y))
    });
    if !hi.is_finite() {
        return None;
    }
    let x = chart.x_range.0..chart.x_range.1.max(chart.x_range.0 + 1.0);
    let svg = if chart.y_log {
        let (lo, hi) = (decade_below(lo), decade_above(hi));
        draw(HEIGHT, x, (lo..hi).log_scale(), |area| {
            time_series(area, chart, lo, hi)
        })
    } else {
        let hi = if hi > 0.0 { hi * 1.05 } else { 1.0 };
        let lo = lo.min(0.0);
        draw(HEIGHT, x, lo..hi, |area| time_series(area, chart, lo, hi))
    };
    svg.ok()
}

/// The latency distribution as a percentile plot: x is the percentile, spaced by its
/// "nines" (50%, 90%, 99%, 99.9%, … equally apart), y the latency on a log scale; from
/// `(latency bucket bound ms, count)`.
pub fn percentile_chart(distribution: &[(f64, u64)]) -> Option<String> {
    let points = percentile_points(distribution);
    let last = points.last()?;
    let max_nines = last.0.ceil().max(1.0);
    let lo = decade_below(points.iter().map(|p| p.1).fold(f64::INFINITY, f64::min));
    let hi = decade_above(last.1);
    draw(
        HEIGHT,
        0.0..max_nines,
        (lo..hi).log_scale(),
        |c: &mut Area<'_, LogCoord>| {
            c.configure_mesh()
                .x_desc("percentile (log of 1 / (1 - q))")
                .y_desc("latency, ms (log)")
                .x_labels(max_nines as usize + 1)
                .x_label_formatter(&|v| nines_label(*v))
                .y_label_formatter(&|v| short(*v))
                .light_line_style(RGBColor(238, 238, 238))
                .draw()
                .map_err(|e| e.to_string())?;
            c.draw_series(LineSeries::new(
                points.iter().copied(),
                COLOURS[0].stroke_width(2),
            ))
            .map_err(|e| e.to_string())?;
            Ok(())
        },
    )
    .ok()
}

/// (nines, bucket bound ms) of the cumulative distribution: nines = -log10(1 - q), q the
/// share of notifications at or below the bound; the last bucket at 1 - 1/total.
pub fn percentile_points(distribution: &[(f64, u64)]) -> Vec<(f64, f64)> {
    let mut buckets: Vec<(f64, u64)> = distribution
        .iter()
        .filter(|(bound, count)| bound.is_finite() && *bound > 0.0 && *count > 0)
        .copied()
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total: u64 = buckets.iter().map(|b| b.1).sum();
    if total == 0 {
        return Vec::new();
    }
    let floor = 1.0 / total as f64;
    let mut below = 0u64;
    buckets
        .into_iter()
        .map(|(bound, count)| {
            below += count;
            let left = (1.0 - below as f64 / total as f64).max(floor);
            (-left.log10(), bound)
        })
        .collect()
}

type LogCoord = plotters::coord::combinators::LogCoord<f64>;
type Area<'a, Y> = ChartContext<'a, SVGBackend<'a>, Cartesian2d<RangedCoordf64, Y>>;

/// Draws a chart of `height` on a new SVG with `body`; returns the SVG, scaled to its
/// container's width.
fn draw<Y, YR>(
    height: u32,
    x: std::ops::Range<f64>,
    y: YR,
    body: impl FnOnce(&mut Area<'_, Y>) -> Result<(), String>,
) -> Result<String, String>
where
    Y: Ranged<ValueType = f64>,
    YR: AsRangedCoord<CoordDescType = Y, Value = f64>,
{
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let mut chart = frame(&root)
            .build_cartesian_2d(x, y)
            .map_err(|e| e.to_string())?;
        body(&mut chart)?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(responsive(&svg, height))
}

/// The margins and label areas every chart shares.
fn frame<'a, 'b>(
    root: &'a DrawingArea<SVGBackend<'b>, Shift>,
) -> ChartBuilder<'a, 'b, SVGBackend<'b>> {
    let mut builder = ChartBuilder::on(root);
    builder
        .margin(10)
        .margin_right(24)
        .x_label_area_size(36)
        .y_label_area_size(56);
    builder
}

/// The time chart's mesh, band, lines, legend and markers.
fn time_series<Y>(
    area: &mut Area<'_, Y>,
    chart: &TimeChart<'_>,
    lo: f64,
    hi: f64,
) -> Result<(), String>
where
    Y: Ranged<ValueType = f64> + plotters::coord::ranged1d::ValueFormatter<f64>,
{
    area.configure_mesh()
        .x_desc("time, s")
        .y_desc(chart.y_desc)
        .y_label_formatter(&|v| short(*v))
        .light_line_style(RGBColor(238, 238, 238))
        .draw()
        .map_err(|e| e.to_string())?;
    if let Some(band) = &chart.band {
        let colour = RGBColor(180, 180, 180).mix(0.35);
        for run in runs(&band.points, |p| p.1.is_finite() && p.2.is_finite()) {
            let upper = run.iter().map(|p| (p.0, p.2.max(lo).min(hi)));
            let lower = run.iter().rev().map(|p| (p.0, p.1.max(lo).min(hi)));
            area.draw_series(std::iter::once(Polygon::new(
                upper.chain(lower).collect::<Vec<_>>(),
                colour.filled(),
            )))
            .map_err(|e| e.to_string())?;
        }
        area.draw_series(std::iter::empty::<Rectangle<(f64, f64)>>())
            .map_err(|e| e.to_string())?
            .label(&band.name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 16, y + 5)], colour.filled()));
    }
    for (i, line) in chart.lines.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let valid = |p: &(f64, f64)| p.1.is_finite() && (p.1 > 0.0 || !chart.y_log);
        let mut legend = None;
        for run in runs(&line.points, valid) {
            legend = Some(
                area.draw_series(LineSeries::new(run.iter().copied(), colour.stroke_width(2)))
                    .map_err(|e| e.to_string())?,
            );
        }
        if let Some(series) = legend {
            series.label(&line.name).legend(move |(x, y)| {
                PathElement::new([(x, y), (x + 16, y)], colour.stroke_width(2))
            });
        }
    }
    for &(t, n) in chart.markers {
        let style = RGBColor(120, 120, 120).stroke_width(1);
        area.draw_series(std::iter::once(PathElement::new([(t, lo), (t, hi)], style)))
            .map_err(|e| e.to_string())?;
        // Numbers of close events on three staggered rows, so they do not cover each other.
        let row = (n % 3) as f64 * 0.06;
        let at = if chart.y_log {
            hi / (hi / lo).powf(row)
        } else {
            hi - (hi - lo) * row
        };
        area.draw_series(std::iter::once(Text::new(
            n.to_string(),
            (t, at),
            ("sans-serif", 12).into_font().color(&RGBColor(60, 60, 60)),
        )))
        .map_err(|e| e.to_string())?;
    }
    area.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(200, 200, 200))
        .draw()
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// The maximal runs of consecutive points that satisfy `keep`.
fn runs<T: Copy>(points: &[T], keep: impl Fn(&T) -> bool) -> Vec<Vec<T>> {
    let mut runs: Vec<Vec<T>> = Vec::new();
    let mut current = Vec::new();
    for p in points {
        if keep(p) {
            current.push(*p);
        } else if !current.is_empty() {
            runs.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        runs.push(current);
    }
    runs
}

/// The SVG scaled to its container's width, its aspect kept.
fn responsive(svg: &str, height: u32) -> String {
    svg.replacen(
        &format!("width=\"{WIDTH}\" height=\"{height}\""),
        "width=\"100%\" preserveAspectRatio=\"xMidYMid meet\" role=\"img\"",
        1,
    )
}

/// The power of ten at or below `v` (0.01 for anything not positive).
fn decade_below(v: f64) -> f64 {
    if v.is_finite() && v > 0.0 {
        10f64.powf(v.log10().floor())
    } else {
        0.01
    }
}

/// The power of ten above `v`.
fn decade_above(v: f64) -> f64 {
    if v.is_finite() && v > 0.0 {
        10f64
            .powf((v.log10() + 1e-9).ceil())
            .max(decade_below(v) * 10.0)
    } else {
        1.0
    }
}

/// 0 -> "0%", 1 -> "90%", 2 -> "99%", 3 -> "99.9%"; blank between whole nines.
fn nines_label(v: f64) -> String {
    if (v - v.round()).abs() > 1e-6 || v < 0.0 {
        return String::new();
    }
    match v.round() as i32 {
        0 => "0%".into(),
        1 => "90%".into(),
        n => format!("99.{}%", "9".repeat(n as usize - 2)).replace("99.%", "99%"),
    }
}

/// A tick label without needless digits: 0.5, 2, 40k, 2.5M.
fn short(v: f64) -> String {
    let a = v.abs();
    let (scaled, unit) = if a >= 1e6 {
        (v / 1e6, "M")
    } else if a >= 1e4 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    let text = format!("{scaled:.3}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    format!("{}{unit}", if text == "-0" { "0" } else { text })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_spaced_by_their_nines() {
        let p = percentile_points(&[(2.0, 9), (1.0, 90), (f64::INFINITY, 5), (50.0, 1)]);
        let nines: Vec<f64> = p.iter().map(|x| (x.0 * 1000.0).round() / 1000.0).collect();
        assert_eq!(nines, [1.0, 2.0, 2.0]);
        assert_eq!(p.iter().map(|x| x.1).collect::<Vec<_>>(), [1.0, 2.0, 50.0]);
        assert!(percentile_points(&[]).is_empty());
    }

    #[test]
    fn labels_read_as_people_write_them() {
        assert_eq!(nines_label(0.0), "0%");
        assert_eq!(nines_label(1.0), "90%");
        assert_eq!(nines_label(2.0), "99%");
        assert_eq!(nines_label(4.0), "99.99%");
        assert_eq!(nines_label(1.5), "");
        assert_eq!(short(40_000.0), "40k");
        assert_eq!(short(2_500_000.0), "2.5M");
        assert_eq!(short(0.25), "0.25");
        assert_eq!(short(3.0), "3");
        assert_eq!((decade_below(0.3), decade_above(4000.0)), (0.1, 10_000.0));
        assert_eq!(decade_above(100.0), 1000.0);
    }

    #[test]
    fn charts_are_svg_that_scales_and_break_at_gaps() {
        let chart = TimeChart {
            y_desc: "ms",
            lines: vec![Line {
                name: "p99".into(),
                points: vec![(0.0, 1.0), (1.0, f64::NAN), (2.0, 3.0), (3.0, 4.0)],
            }],
            band: Some(Band {
                name: "spread".into(),
                points: vec![(0.0, 1.0, 2.0), (1.0, 1.5, 3.0)],
            }),
            markers: &[(1.5, 1)],
            y_log: true,
            x_range: (0.0, 3.0),
        };
        let svg = time_chart(&chart).expect("something to draw");
        assert!(
            svg.starts_with("<svg") && svg.contains("width=\"100%\""),
            "{}",
            &svg[..200]
        );
        assert!(svg.contains("p99") && svg.contains("spread"));
        assert!(!svg.contains("NaN"));
        let empty = TimeChart {
            lines: vec![Line {
                name: "x".into(),
                points: vec![(0.0, f64::NAN)],
            }],
            band: None,
            ..chart
        };
        assert!(time_chart(&empty).is_none());
        assert!(percentile_chart(&[(1.0, 10), (5.0, 1)]).is_some());
        assert!(percentile_chart(&[]).is_none());
    }
}
