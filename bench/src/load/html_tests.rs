//! Tests of the load report's page.

use super::super::report::{Meta, Pid1, ProcessSummary, Report, Storm, Tick};
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
        meta: Meta {
            date: "2026-12-04 21:05 UTC".to_owned(),
            commit: "abc1234".to_owned(),
            machine: "2 cores (a CPU), 24 GiB, Linux 6.18".to_owned(),
        },
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
    assert!(html.trim_end().ends_with("</html>"));
    assert!(!html.contains("{{"), "an unfilled slot");
    assert!(html.contains("gapless load: storm, 10,000 connections, 1,000 notifications/s"));
    for p in &r.processes {
        assert!(html.contains(&p.name), "missing process {}", p.name);
    }
    // The run's date, commit, machine and command.
    for part in [
        "2026-12-04 21:05 UTC",
        "abc1234",
        "24 GiB",
        "--scenario storm",
    ] {
        assert!(html.contains(part), "missing {part}");
    }
    // Events are numbered in a list, not written over the charts.
    assert!(html.contains("<li value=\"1\">ramp 10000"));
    assert!(html.contains("<li value=\"2\">edges killed &lt;all&gt;"));
    assert!(html.contains("10,042"));
    assert!(html.contains("3.15 KiB"));
    assert!(html.contains("&quot;note&quot;: &quot;a&lt;b&quot;"));
    assert!(html.contains("<span class=\"bad\">1</span>"));
    // A verdict per target: the delivery one failed (a reset), the 100K ones not judged.
    assert!(html.contains("class=\"not\">not met"));
    assert!(html.contains("class=\"nj\">not judged"));
    assert!(html.contains("class=\"met\">met"));
    assert!(!html.contains("NaN"));
    assert!(!html.contains("inf"));
    assert!(!html.contains("<script"));
    assert!(!html.contains("src=") && !html.contains("href="));
    // Connections, latency, memory, the distribution, and one CPU chart per kind:
    // edge, ingest, redis, load.
    assert_eq!(html.matches("<svg").count(), 8);
    assert!(html.contains("edge (2 processes)"));
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
fn processes_group_by_kind() {
    assert_eq!(kind_of("edge-12"), "edge");
    assert_eq!(kind_of("pid 1"), "pid 1");
    assert_eq!(kind_of("redis"), "redis");
    assert_eq!(kind_of("a-b"), "a-b");
    let r = report(4, 6);
    let kinds = kinds(&r.timeline);
    let names: Vec<&str> = kinds.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(names, ["edge", "ingest", "redis", "load"]);
    let edge = &kinds[0];
    assert_eq!((edge.processes, edge.ticks.len()), (2, 4));
    let t = &edge.ticks[3];
    assert!(t.cpu_min <= t.cpu_mean && t.cpu_mean <= t.cpu_max);
    assert!((t.cpu_sum - 2.0 * t.cpu_mean).abs() < 1e-9);
}

#[test]
fn a_full_size_run_is_judged_against_each_target() {
    let mut r = report(3, 2);
    r.scenario = "steady".to_owned();
    r.storm = None;
    r.resets = 0;
    r.connections_peak = 100_000;
    r.rate_per_s = 10_000;
    r.latency_ms.p99 = 12.0;
    r.latency_ms.p999 = 20.0;
    let verdicts = r.verdicts();
    let of = |target: &str| {
        verdicts
            .iter()
            .find(|v| v.target == target)
            .map(|v| v.outcome)
            .expect("judged")
    };
    assert_eq!(of("0 lost, 0 gaps, 0 resets"), Outcome::Met);
    assert_eq!(of(">= 100,000 connections"), Outcome::Met);
    assert_eq!(of("<= 8 KiB"), Outcome::Met);
    assert_eq!(of("p99 <= 10 ms"), Outcome::NotMet);
    assert_eq!(of("p99.9 <= 50 ms"), Outcome::Met);
}

#[test]
fn helpers() {
    assert_eq!(int(0), "0");
    assert_eq!(int(1_234_567), "1,234,567");
    assert_eq!(num(f64::NAN, 2), "n/a");
}
