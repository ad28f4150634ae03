//! What a load run measured: the summary written as JSON (`--json`) and rendered as HTML
//! (`--html`), and the timeline both are built from.

use serde::Serialize;

use crate::stats::Percentiles;

/// The whole result of one `gapless-bench load` run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `idle`, `steady`, `storm` or `ingest`.
    pub scenario: String,
    /// The devices' `--transport`: `ws`, `sse`, `poll` or `mixed` (empty for `ingest`).
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
    pub edge_rss_kib_per_idle_conn: f64,
    /// Each edge's RSS before the ramp, KiB.
    pub edge_rss_kib_before: Vec<u64>,
    /// Each edge's RSS after the ramp (before any notification), KiB.
    pub edge_rss_kib_after: Vec<u64>,
    /// Seconds the ramp took.
    pub ramp_s: f64,
    /// Redis PING round trip over the run.
    pub redis_rtt_ms: Percentiles,
    /// Its p99 (the figure DESIGN.md §6 compares against).
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
#[derive(Debug, Clone, Serialize)]
pub struct Storm {
    /// Connections open when every edge was killed.
    pub connections: u64,
    /// Seconds from the SIGKILL of every edge until they were all restarted and ready.
    pub edges_back_s: f64,
    /// Seconds from the kill until every connection was open and resumed again.
    pub all_resumed_s: f64,
    /// Seconds from the kill until, in addition, everything acknowledged up to that moment
    /// was delivered.
    pub caught_up_s: f64,
    /// Reconnects made (should be about `connections`, plus retries).
    pub reconnects: u64,
}

/// Peak memory and CPU of one process over the run.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessSummary {
    /// `redis`, `ingest`, `edge-0`…, `load-0`…, `bench`.
    pub name: String,
    /// Peak resident memory, KiB.
    pub peak_rss_kib: u64,
    /// Mean CPU over the run, % of one core.
    pub cpu_mean_pct: f64,
    /// Highest CPU of one sampling interval, % of one core.
    pub cpu_peak_pct: f64,
}

/// One sampling interval of the run.
#[derive(Debug, Clone, Serialize)]
pub struct Tick {
    /// Seconds since the start of the run (end of the interval).
    pub t: f64,
    /// Connections open.
    pub connections: u64,
    /// Sent so far.
    pub sent: u64,
    /// Delivered so far.
    pub delivered: u64,
    /// Latency percentiles of what was delivered in this interval (ms; 0 when nothing).
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// 99.9th percentile, ms.
    pub p999_ms: f64,
    /// Largest, ms.
    pub max_ms: f64,
    /// Redis PING p99 in this interval, ms.
    pub redis_rtt_p99_ms: f64,
    /// Most the producers' batch timer fired late in this interval, ms (a stalled producer
    /// then sends a burst, which queues in the ingest).
    pub producer_lag_ms: f64,
    /// Per process: (name, RSS KiB, CPU % of a core over the interval).
    pub processes: Vec<(String, u64, f64)>,
    /// What happened at this point (`ramp 10000`, `edges killed`…), if anything.
    pub event: Option<String>,
}

/// PID 1 (on this project's VM, the sandbox's agent) during the run.
#[derive(Debug, Clone, Serialize)]
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
#[derive(Debug, Clone, Serialize)]
pub struct Stage {
    /// What it measures.
    pub stage: String,
    /// Observations.
    pub count: u64,
    /// Median, ms (upper bound of its bucket).
    pub p50_ms: f64,
    /// 99th percentile, ms (upper bound of its bucket).
    pub p99_ms: f64,
}
