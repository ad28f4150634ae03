//! What a load run measured: the summary written as JSON (`--json`) and rendered as HTML
//! (`--html`), and the timeline both are built from.

use serde::{Deserialize, Serialize};

use crate::stats::Percentiles;

/// The whole result of one `gapless-bench load` run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// When, at which commit and on what machine it ran.
    #[serde(default)]
    pub meta: Meta,
    /// `idle`, `steady`, `storm` or `ingest`.
    pub scenario: String,
    /// The devices' `--transport`: `ws`, `sse`, `poll` or `mixed` (empty for `ingest`).
    #[serde(default)]
    pub transport: String,
    /// The command line that produced it.
    pub command: String,
    /// Most connections open at once.
    pub connections_peak: u64,
    /// Edge processes.
    pub edges: usize,
    /// Load-generator processes.
    pub load_procs: usize,
    /// Producer rate asked for, notifications/s.
    pub rate_per_s: u64,
    /// Seconds of the measured phase (after the ramp).
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub duration_s: f64,
    /// Notifications the ingest acknowledged.
    pub sent: u64,
    /// Notifications delivered to their device (duplicates not counted).
    pub delivered: u64,
    /// Acknowledged but never delivered.
    pub lost: u64,
    /// Repeats the clients dropped (at-least-once redelivery after reconnects).
    pub duplicates: u64,
    /// Gaps the clients detected (a seq skipped: must be 0).
    pub gaps: u64,
    /// Resets the clients received (history lost: must be 0 here).
    pub resets: u64,
    /// Ingest-to-client latency of the measured phase (after the ramp).
    pub latency_ms: Percentiles,
    /// Ingest-to-client latency over the whole run, ramp included.
    pub latency_ms_all: Percentiles,
    /// Latency distribution of the measured phase: (upper bound ms, count) buckets.
    pub latency_distribution: Vec<(f64, u64)>,
    /// PID 1's activity and the latency of the seconds it left alone (see `PID1` in the
    /// load module): a figure beside `latency_ms`, never instead of it.
    pub pid1: Pid1,
    /// Edge resident memory per connection after the ramp: (after - before) / connections.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub edge_rss_kib_per_idle_conn: f64,
    /// Each edge's RSS before the ramp, KiB.
    pub edge_rss_kib_before: Vec<u64>,
    /// Each edge's RSS after the ramp (before any notification), KiB.
    pub edge_rss_kib_after: Vec<u64>,
    /// Seconds the ramp took.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub ramp_s: f64,
    /// Redis PING round trip over the run.
    pub redis_rtt_ms: Percentiles,
    /// Its p99 (the figure DESIGN.md §6 compares against).
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub redis_rtt_ms_p99: f64,
    /// The storm, for `--scenario storm`.
    pub storm: Option<Storm>,
    /// The ingest throughput comparison, for `--scenario ingest`.
    pub ingest: Option<serde_json::Value>,
    /// Every process's peak memory and CPU.
    pub processes: Vec<ProcessSummary>,
    /// Where the latency goes, from the services' own histograms (/metrics) at the end:
    /// stage, observations, p50 and p99 as bucket upper bounds in ms.
    pub stages: Vec<Stage>,
    /// Redis's `INFO commandstats` at the end: (command, calls, µs per call, total s),
    /// busiest first. What Redis spent its time on.
    pub redis_commands: Vec<(String, u64, f64, f64)>,
    /// One point per sampling interval.
    pub timeline: Vec<Tick>,
}

/// The storm scenario's result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Storm {
    /// Connections open when every edge was killed.
    pub connections: u64,
    /// Seconds from the SIGKILL of every edge until they were all restarted and ready.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub edges_back_s: f64,
    /// Seconds from the kill until every connection was open and resumed again.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub all_resumed_s: f64,
    /// Seconds from the kill until, in addition, everything acknowledged up to that moment
    /// was delivered.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub caught_up_s: f64,
    /// Reconnects made (should be about `connections`, plus retries).
    pub reconnects: u64,
}

/// Peak memory and CPU of one process over the run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessSummary {
    /// `redis`, `ingest`, `edge-0`…, `load-0`…, `bench`.
    pub name: String,
    /// Peak resident memory, KiB.
    pub peak_rss_kib: u64,
    /// Mean CPU over the run, % of one core.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub cpu_mean_pct: f64,
    /// Highest CPU of one sampling interval, % of one core.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub cpu_peak_pct: f64,
}

/// One sampling interval of the run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tick {
    /// Seconds since the start of the run (end of the interval).
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub t: f64,
    /// Connections open.
    pub connections: u64,
    /// Sent so far.
    pub sent: u64,
    /// Delivered so far.
    pub delivered: u64,
    /// Latency percentiles of what was delivered in this interval (ms; 0 when nothing).
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub p50_ms: f64,
    /// 99th percentile, ms.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub p99_ms: f64,
    /// 99.9th percentile, ms.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub p999_ms: f64,
    /// Largest, ms.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub max_ms: f64,
    /// Redis PING p99 in this interval, ms.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub redis_rtt_p99_ms: f64,
    /// Most the producers' batch timer fired late in this interval, ms (a stalled producer
    /// then sends a burst, which queues in the ingest).
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub producer_lag_ms: f64,
    /// Per process: (name, RSS KiB, CPU % of a core over the interval).
    pub processes: Vec<(String, u64, f64)>,
    /// What happened at this point (`ramp 10000`, `edges killed`…), if anything.
    pub event: Option<String>,
}

/// PID 1 (on this project's VM, the sandbox's agent) during the run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pid1 {
    /// Seconds of the measured phase.
    pub measured_s: u64,
    /// Seconds of the whole run in which PID 1 used more than 5% of a core.
    pub busy_s: u64,
    /// Measured seconds in which it did not, nor in the second before.
    pub quiet_s: u64,
    /// Ingest-to-client latency over those quiet seconds.
    pub latency_ms_quiet: Percentiles,
}

/// One stage of the delivery path, from a service's Prometheus histogram.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stage {
    /// What it measures.
    pub stage: String,
    /// Observations.
    pub count: u64,
    /// Median, ms (upper bound of its bucket).
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub p50_ms: f64,
    /// 99th percentile, ms (upper bound of its bucket).
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub p99_ms: f64,
}

/// When, at which commit and on what machine a run was made.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Meta {
    /// Start of the run, UTC (`2026-12-04 21:05 UTC`).
    pub date: String,
    /// `git describe --always --dirty` of the checkout the bench ran from.
    pub commit: String,
    /// Cores, memory, CPU model and kernel.
    pub machine: String,
}

impl Meta {
    /// This machine and checkout, now.
    pub fn now() -> Self {
        let run = |cmd: &str, args: &[&str]| {
            std::process::Command::new(cmd)
                .args(args)
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                .unwrap_or_else(|| "unknown".to_owned())
        };
        Self {
            date: run("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            commit: run("git", &["describe", "--always", "--dirty"]),
            machine: machine(),
        }
    }
}

/// "2 cores (AMD EPYC 7B13), 24 GiB, Linux 6.18.0": from /proc.
fn machine() -> String {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|(_, m)| m.trim())
        })
        .unwrap_or("unknown CPU");
    let mem_kib: u64 = read("/proc/meminfo")
        .lines()
        .find_map(|l| {
            l.strip_prefix("MemTotal:")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0);
    let kernel = read("/proc/sys/kernel/osrelease");
    format!(
        "{cores} cores ({model}), {:.0} GiB, Linux {}",
        mem_kib as f64 / (1024.0 * 1024.0),
        kernel.trim()
    )
}

/// How a figure compares with its target (DESIGN.md §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// At or better than the target.
    Met,
    /// Worse than the target.
    NotMet,
    /// The run is not of the target's shape (fewer connections, another rate): the figure
    /// is shown, the target not judged.
    NotJudged,
}

/// One target, the figure this run measured for it, and the outcome.
#[derive(Debug, Clone)]
pub struct Verdict {
    /// The target, in words (`p99 <= 10 ms`).
    pub target: &'static str,
    /// What it is about.
    pub what: &'static str,
    /// The figure, in words.
    pub figure: String,
    /// Met, not met, or not this run's shape (with why).
    pub outcome: Outcome,
    /// Why it is not judged, when it is not.
    pub note: Option<String>,
}

impl Report {
    /// Every target of DESIGN.md §6 this kind of run measures, with its verdict.
    pub fn verdicts(&self) -> Vec<Verdict> {
        let judge = |ok: bool| if ok { Outcome::Met } else { Outcome::NotMet };
        let mut out = vec![Verdict {
            target: "0 lost, 0 gaps, 0 resets",
            what: "delivery: every acknowledged notification reached its device once, in order",
            figure: format!(
                "{} lost, {} gaps, {} resets of {} sent",
                self.lost,
                self.gaps,
                self.resets,
                thousands(self.sent)
            ),
            outcome: judge(self.lost == 0 && self.gaps == 0 && self.resets == 0),
            note: None,
        }];
        if self.scenario == "ingest" {
            return out;
        }
        let full = self.connections_peak >= 100_000;
        out.push(Verdict {
            target: ">= 100,000 connections",
            what: "concurrent WebSocket connections on this one machine",
            figure: format!("{} at the peak", thousands(self.connections_peak)),
            outcome: judge(full),
            note: None,
        });
        let shape = |ok: bool, why: String| {
            if ok { (None, true) } else { (Some(why), false) }
        };
        out.push(Verdict {
            target: "<= 8 KiB",
            what: "edge resident memory per idle connection",
            figure: format!("{:.2} KiB", self.edge_rss_kib_per_idle_conn),
            outcome: judge(self.edge_rss_kib_per_idle_conn <= 8.0),
            note: None,
        });
        if self.scenario == "steady" || self.scenario == "storm" {
            let (note, judged) = shape(
                full && self.rate_per_s >= 10_000,
                format!(
                    "the target is for 10,000/s across 100,000 connections; this run: {}/s across {}",
                    thousands(self.rate_per_s),
                    thousands(self.connections_peak)
                ),
            );
            let latency = |target, what, value: f64, bound: f64| Verdict {
                target,
                what,
                figure: format!(
                    "{value:.2} ms ({:.0}x Redis's own round trip p99, {:.2} ms)",
                    value / self.redis_rtt_ms_p99.max(1e-3),
                    self.redis_rtt_ms_p99
                ),
                outcome: if judged {
                    judge(value <= bound)
                } else {
                    Outcome::NotJudged
                },
                note: note.clone(),
            };
            out.push(latency(
                "p99 <= 10 ms",
                "ingest-to-client latency, measured phase",
                self.latency_ms.p99,
                10.0,
            ));
            out.push(latency(
                "p99.9 <= 50 ms",
                "ingest-to-client latency, measured phase",
                self.latency_ms.p999,
                50.0,
            ));
        }
        if let Some(storm) = &self.storm {
            let (note, judged) = shape(
                storm.connections >= 100_000,
                format!(
                    "the target is for 100,000 clients; this run: {}",
                    thousands(storm.connections)
                ),
            );
            out.push(Verdict {
                target: "<= 30 s",
                what: "reconnect storm: every client of a killed fleet resumed with exact gaps",
                figure: format!("{:.1} s", storm.all_resumed_s),
                outcome: if judged {
                    judge(storm.all_resumed_s <= 30.0)
                } else {
                    Outcome::NotJudged
                },
                note,
            });
        }
        out
    }
}

/// `v` with its thousands separated by commas.
pub fn thousands(v: u64) -> String {
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
