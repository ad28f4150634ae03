//! Renders a load [`Report`] as one self-contained HTML page (`--html`, or
//! `gapless-bench report` from a run's JSON): the template `report.html` filled with the
//! targets and their verdicts, the run's date, commit, machine and command, a summary in
//! words, and the charts of [`super::charts`]. Inline CSS and SVG only: no scripts, no
//! external resources; it reads on a phone (tables scroll, charts scale).
//!
//! Some 600 lines, over the bench's ~500: one short function per section of the page, in
//! page order; split, one page's markup would be read across files.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::charts::{self, Band, Line, TimeChart};
use super::report::{Outcome, Report, Storm, Tick};
use crate::stats::Percentiles;

/// The page's template; every `{{slot}}` is filled by [`render`].
const TEMPLATE: &str = include_str!("report.html");

/// Renders `report` as one page.
pub fn render(report: &Report) -> String {
    let markers = markers(&report.timeline);
    let x_range = time_range(&report.timeline);
    let slots: [(&str, String); 12] = [
        ("title", esc(&title(report))),
        ("meta", meta(report)),
        ("command", esc(&report.command)),
        ("verdicts", verdicts(report)),
        ("summary", summary(report)),
        ("time_charts", time_charts(report, &markers, x_range)),
        ("distribution", distribution(report)),
        ("cpu_charts", cpu_charts(report, &markers, x_range)),
        ("processes", processes_table(report)),
        ("stages", stages_table(report)),
        ("extra", extra(report)),
        ("", String::new()),
    ];
    let mut page = TEMPLATE.to_owned();
    for (slot, html) in slots.iter().filter(|(s, _)| !s.is_empty()) {
        page = page.replace(&format!("{{{{{slot}}}}}"), html);
    }
    page
}

/// "gapless load: steady, 100,000 connections, 10,000 notifications/s".
fn title(r: &Report) -> String {
    let mut t = format!("gapless load: {}", r.scenario);
    if r.scenario != "ingest" {
        let _ = write!(t, ", {} connections", int(r.connections_peak));
        if r.rate_per_s > 0 {
            let _ = write!(t, ", {} notifications/s", int(r.rate_per_s));
        }
        if !r.transport.is_empty() && r.transport != "ws" {
            let _ = write!(t, " over {}", r.transport);
        }
    }
    t
}

/// Date, commit and machine, each kept on one line.
fn meta(r: &Report) -> String {
    let or_unknown = |s: &str| {
        if s.is_empty() {
            "unknown".to_owned()
        } else {
            esc(s)
        }
    };
    format!(
        "<span>run {}</span> · <span>commit <code>{}</code></span> · <span>{}</span>",
        or_unknown(&r.meta.date),
        or_unknown(&r.meta.commit),
        or_unknown(&r.meta.machine)
    )
}

/// The targets of DESIGN.md §6 this run measures: the figure beside each, and its verdict.
fn verdicts(r: &Report) -> String {
    let mut out = String::from(
        "<div class=\"scroll\"><table><thead><tr><th>what</th><th>target</th><th>this run</th>\
         <th>verdict</th></tr></thead><tbody>\n",
    );
    for v in r.verdicts() {
        let (class, word) = match v.outcome {
            Outcome::Met => ("met", "met"),
            Outcome::NotMet => ("not", "not met"),
            Outcome::NotJudged => ("nj", "not judged"),
        };
        let note = v
            .note
            .as_deref()
            .map(|n| format!("<br><span class=\"note\">{}</span>", esc(n)))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"{class}\">{word}{note}</td></tr>",
            esc(v.what),
            esc(v.target),
            esc(&v.figure)
        );
    }
    out.push_str("</tbody></table></div>\n");
    out
}

/// The headline figures in words, each with what it means.
fn summary(r: &Report) -> String {
    let mut cards: Vec<(&str, String, String)> = vec![
        (
            "connections at the peak",
            int(r.connections_peak),
            format!(
                "{} edge processes, {} load processes",
                r.edges, r.load_procs
            ),
        ),
        (
            "notifications sent",
            int(r.sent),
            format!(
                "at {}/s for {:.0} s measured",
                int(r.rate_per_s),
                r.duration_s
            ),
        ),
        (
            "delivered",
            int(r.delivered),
            "to their device, duplicates not counted".to_owned(),
        ),
        (
            "lost / gaps / resets",
            format!(
                "{} / {} / {}",
                must_be_zero(r.lost),
                must_be_zero(r.gaps),
                must_be_zero(r.resets)
            ),
            "each must be 0".to_owned(),
        ),
        (
            "duplicates dropped by clients",
            int(r.duplicates),
            "redelivered after reconnects, never shown twice".to_owned(),
        ),
        (
            "latency, measured phase",
            percentiles(&r.latency_ms),
            "ingest to client".to_owned(),
        ),
        (
            "latency, whole run",
            percentiles(&r.latency_ms_all),
            "the ramp included".to_owned(),
        ),
        (
            "Redis round trip p99",
            format!("{} ms", num(r.redis_rtt_ms_p99, 3)),
            "PING, every 50 ms".to_owned(),
        ),
        (
            "edge memory per idle connection",
            format!("{} KiB", num(r.edge_rss_kib_per_idle_conn, 2)),
            "resident, after the ramp".to_owned(),
        ),
        (
            "ramp",
            format!("{} s", num(r.ramp_s, 1)),
            "to every connection open".to_owned(),
        ),
    ];
    if r.pid1.measured_s > 0 {
        cards.push((
            "latency while PID 1 was quiet",
            percentiles(&r.pid1.latency_ms_quiet),
            format!(
                "{} of {} measured seconds; the VM's agent used over {}% of a core in {} seconds of the run",
                r.pid1.quiet_s,
                r.pid1.measured_s,
                super::samplers::PID1_BUSY_PCT,
                r.pid1.busy_s
            ),
        ));
    }
    let mut out = String::from("<dl>\n");
    for (label, value, note) in cards {
        let _ = writeln!(
            out,
            "<div><dt>{}</dt><dd>{value}<small>{}</small></dd></div>",
            esc(label),
            esc(&note)
        );
    }
    out.push_str("</dl>\n");
    out
}

/// Connections, latency and memory over time, with the numbered events.
fn time_charts(r: &Report, markers: &[(f64, usize, String)], x_range: (f64, f64)) -> String {
    let timeline = &r.timeline;
    if timeline.is_empty() {
        return "<p class=\"nodata\">no data</p>\n".to_owned();
    }
    let numbered: Vec<(f64, usize)> = markers.iter().map(|m| (m.0, m.1)).collect();
    let mut out = String::new();
    let delivered = |t: &Tick, v: f64| {
        if t.p50_ms == 0.0 && t.p99_ms == 0.0 {
            f64::NAN
        } else {
            v
        }
    };
    let line = |name: &str, f: &dyn Fn(&Tick) -> f64| Line {
        name: name.to_owned(),
        points: timeline.iter().map(|t| (t.t, f(t))).collect(),
    };
    figure(
        &mut out,
        "Connections open",
        charts::time_chart(&TimeChart {
            y_desc: "connections",
            lines: vec![line("connections", &|t| t.connections as f64)],
            band: None,
            markers: &numbered,
            y_log: false,
            x_range,
        }),
    );
    figure(
        &mut out,
        "Ingest-to-client latency per second, and Redis's round trip",
        charts::time_chart(&TimeChart {
            y_desc: "ms (log)",
            lines: vec![
                line("p50", &|t| delivered(t, t.p50_ms)),
                line("p99", &|t| delivered(t, t.p99_ms)),
                line("p99.9", &|t| delivered(t, t.p999_ms)),
                line("Redis PING p99", &|t| t.redis_rtt_p99_ms),
            ],
            band: None,
            markers: &numbered,
            y_log: true,
            x_range,
        }),
    );
    let kinds = kinds(timeline);
    figure(
        &mut out,
        "Resident memory per process kind, summed over its processes",
        charts::time_chart(&TimeChart {
            y_desc: "MiB",
            lines: kinds
                .iter()
                .map(|k| Line {
                    name: k.label(),
                    points: k
                        .ticks
                        .iter()
                        .map(|s| (s.t, s.rss_kib_sum / 1024.0))
                        .collect(),
                })
                .collect(),
            band: None,
            markers: &numbered,
            y_log: false,
            x_range,
        }),
    );
    if !markers.is_empty() {
        out.push_str("<ol class=\"events\">\n");
        for (t, n, label) in markers {
            let _ = writeln!(
                out,
                "<li value=\"{n}\">{} <span class=\"note\">at {:.0} s</span></li>",
                esc(label),
                t
            );
        }
        out.push_str("</ol>\n");
    }
    out
}

/// The percentile plot of the measured phase.
fn distribution(r: &Report) -> String {
    let mut out = String::new();
    figure(
        &mut out,
        "Latency at each percentile of the measured phase (both axes logarithmic: the tail reads as well as the median)",
        charts::percentile_chart(&r.latency_distribution),
    );
    out
}

/// One CPU chart per process kind: the mean per process, and the band from the least to
/// the most busy when the kind has several.
fn cpu_charts(r: &Report, markers: &[(f64, usize, String)], x_range: (f64, f64)) -> String {
    let numbered: Vec<(f64, usize)> = markers.iter().map(|m| (m.0, m.1)).collect();
    let mut out = String::new();
    for kind in kinds(&r.timeline) {
        let several = kind.processes > 1;
        let chart = charts::time_chart(&TimeChart {
            y_desc: "% of one core",
            lines: vec![Line {
                name: if several {
                    "mean per process".into()
                } else {
                    kind.name.clone()
                },
                points: kind.ticks.iter().map(|s| (s.t, s.cpu_mean)).collect(),
            }],
            band: several.then(|| Band {
                name: "least to most busy".into(),
                points: kind
                    .ticks
                    .iter()
                    .map(|s| (s.t, s.cpu_min, s.cpu_max))
                    .collect(),
            }),
            markers: &numbered,
            y_log: false,
            x_range,
        });
        let caption = format!(
            "{} (summed: {:.0}% of a core on average)",
            kind.label(),
            kind.ticks.iter().map(|s| s.cpu_sum).sum::<f64>() / kind.ticks.len().max(1) as f64
        );
        figure(&mut out, &caption, chart);
    }
    if out.is_empty() {
        out.push_str("<p class=\"nodata\">no data</p>\n");
    }
    out
}

/// A figure with its caption, or "no data".
fn figure(out: &mut String, caption: &str, svg: Option<String>) {
    let _ = write!(out, "<figure><figcaption>{}</figcaption>", esc(caption));
    match svg {
        Some(svg) => out.push_str(&svg),
        None => out.push_str("<p class=\"nodata\">no data</p>"),
    }
    out.push_str("</figure>\n");
}

/// The processes of one kind (`edge-0`, `edge-1`, … are kind `edge`) over the timeline.
struct Kind {
    name: String,
    /// How many processes of the kind the run had.
    processes: usize,
    /// One per tick the kind was sampled in.
    ticks: Vec<KindTick>,
}

impl Kind {
    /// "edge (6 processes)" or "redis".
    fn label(&self) -> String {
        if self.processes > 1 {
            format!("{} ({} processes)", self.name, self.processes)
        } else {
            self.name.clone()
        }
    }
}

/// One kind at one tick.
struct KindTick {
    t: f64,
    rss_kib_sum: f64,
    cpu_sum: f64,
    cpu_mean: f64,
    cpu_min: f64,
    cpu_max: f64,
}

/// `edge-12` -> `edge`; `pid 1` and `redis` are their own kind.
fn kind_of(name: &str) -> &str {
    match name.rsplit_once('-') {
        Some((kind, n)) if !kind.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => kind,
        _ => name,
    }
}

/// Every process kind of the timeline, the servers first.
fn kinds(timeline: &[Tick]) -> Vec<Kind> {
    let mut kinds: BTreeMap<String, (std::collections::BTreeSet<String>, Vec<KindTick>)> =
        BTreeMap::new();
    for tick in timeline {
        let mut at: BTreeMap<&str, Vec<(u64, f64)>> = BTreeMap::new();
        for (name, rss, cpu) in &tick.processes {
            at.entry(kind_of(name)).or_default().push((*rss, *cpu));
            kinds
                .entry(kind_of(name).to_owned())
                .or_default()
                .0
                .insert(name.clone());
        }
        for (kind, samples) in at {
            let cpus: Vec<f64> = samples
                .iter()
                .map(|s| s.1)
                .filter(|c| c.is_finite())
                .collect();
            let sum: f64 = cpus.iter().sum();
            let entry = kinds.entry(kind.to_owned()).or_default();
            entry.1.push(KindTick {
                t: tick.t,
                rss_kib_sum: samples.iter().map(|s| s.0 as f64).sum(),
                cpu_sum: sum,
                cpu_mean: if cpus.is_empty() {
                    f64::NAN
                } else {
                    sum / cpus.len() as f64
                },
                cpu_min: cpus.iter().copied().fold(f64::INFINITY, f64::min),
                cpu_max: cpus.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            });
        }
    }
    let order = |name: &str| {
        ["edge", "ingest", "redis", "load", "bench", "pid 1"]
            .iter()
            .position(|k| *k == name)
            .unwrap_or(9)
    };
    let mut out: Vec<Kind> = kinds
        .into_iter()
        .map(|(name, (names, ticks))| Kind {
            processes: names.len(),
            name,
            ticks,
        })
        .collect();
    out.sort_by_key(|k| order(&k.name));
    out
}

/// The time axis of the time charts: from 0 to the last tick.
fn time_range(timeline: &[Tick]) -> (f64, f64) {
    let hi = timeline
        .iter()
        .map(|t| t.t)
        .filter(|t| t.is_finite())
        .fold(1.0_f64, f64::max);
    (0.0, hi)
}

/// The ticks' events, numbered: (time, number, label).
fn markers(timeline: &[Tick]) -> Vec<(f64, usize, String)> {
    timeline
        .iter()
        .filter_map(|t| t.event.as_ref().map(|e| (t.t, e.clone())))
        .enumerate()
        .map(|(i, (t, e))| (t, i + 1, e))
        .collect()
}

/// Peak memory and CPU per process.
fn processes_table(r: &Report) -> String {
    if r.processes.is_empty() {
        return "<p class=\"nodata\">no data</p>\n".to_owned();
    }
    let mut out = String::from(
        "<div class=\"scroll\"><table><thead><tr><th>process</th><th>peak RSS, MiB</th>\
         <th>mean CPU, % of a core</th><th>peak CPU</th></tr></thead><tbody>\n",
    );
    for p in &r.processes {
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
            esc(&p.name),
            num(p.peak_rss_kib as f64 / 1024.0, 1),
            num(p.cpu_mean_pct, 1),
            num(p.cpu_peak_pct, 1)
        );
    }
    out.push_str("</tbody></table></div>\n");
    out
}

/// The services' own stage histograms and Redis's busiest commands.
fn stages_table(r: &Report) -> String {
    if r.stages.is_empty() && r.redis_commands.is_empty() {
        return "<p class=\"nodata\">no data</p>\n".to_owned();
    }
    let mut out = String::from(
        "<div class=\"scroll\"><table><thead><tr><th>stage (the services' histograms; bucket \
         bounds)</th><th>observations</th><th>p50, ms</th><th>p99, ms</th></tr></thead><tbody>\n",
    );
    for st in &r.stages {
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
            esc(&st.stage),
            int(st.count),
            num(st.p50_ms, 2),
            num(st.p99_ms, 2)
        );
    }
    out.push_str(
        "</tbody></table></div>\n<div class=\"scroll\"><table><thead><tr><th>Redis command</th>\
         <th>calls</th><th>µs per call</th><th>total, s</th></tr></thead><tbody>\n",
    );
    for (name, calls, per_call, total) in r.redis_commands.iter().take(12) {
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
            esc(name),
            int(*calls),
            num(*per_call, 1),
            num(*total, 2)
        );
    }
    out.push_str("</tbody></table></div>\n");
    out
}

/// The storm's figures and the ingest scenario's result, when the run had them.
fn extra(r: &Report) -> String {
    let mut out = String::new();
    if let Some(s) = &r.storm {
        out.push_str("<h2>Storm</h2>\n");
        out.push_str(&storm(s));
    }
    if let Some(ingest) = &r.ingest {
        let pretty = serde_json::to_string_pretty(ingest).unwrap_or_else(|_| ingest.to_string());
        let _ = writeln!(out, "<h2>Ingest</h2>\n<pre>{}</pre>", esc(&pretty));
    }
    out
}

fn storm(s: &Storm) -> String {
    let rows = [
        ("connections when every edge was killed", int(s.connections)),
        (
            "kill to every edge restarted and ready",
            format!("{} s", num(s.edges_back_s, 2)),
        ),
        (
            "kill to every connection open and resumed",
            format!("{} s", num(s.all_resumed_s, 2)),
        ),
        (
            "kill to everything acknowledged by then delivered",
            format!("{} s", num(s.caught_up_s, 2)),
        ),
        ("reconnects", int(s.reconnects)),
    ];
    let mut out = String::from("<dl>\n");
    for (label, value) in rows {
        let _ = writeln!(out, "<div><dt>{}</dt><dd>{value}</dd></div>", esc(label));
    }
    out.push_str("</dl>\n");
    out
}

/// p50, p90, p99, p99.9 and max in ms.
fn percentiles(p: &Percentiles) -> String {
    format!(
        "p50 {} · p99 {} · p99.9 {} · max {} ms",
        num(p.p50, 2),
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
    super::report::thousands(v)
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
#[path = "html_tests.rs"]
mod tests;
