//! `gapless-bench load`: the load generator and its scenarios (DESIGN.md §6).
//!
//! It starts the system as processes (or targets a running one), then holds `--connections`
//! devices (WebSocket, SSE, long-poll or a mix: `--transport`) in load-generator processes
//! ([`worker`]), each connecting from its own
//! 127.0.k.x addresses, ramping 1K -> N in steps; producers drive the batch ingest API at `--rate`,
//! every payload carrying its send time. Every tick it merges the workers' HDR latency
//! histograms, samples Redis's round trip and every process's memory and CPU from /proc,
//! and prints a progress line; at the end it writes `--json` and an HTML report (`--html`).
//!
//! Scenarios: `idle` (hold N; edge memory per idle connection), `steady` (N connections, R
//! notifications/s; latency and loss), `storm` (SIGKILL every edge, restart them, time until
//! every client resumed and caught up with exact gaps), `ingest` (batch ingest throughput
//! beside `redis-benchmark`'s pipelined XADD, in the same run).

mod args;
mod charts;
mod html;
mod live;
mod report;
mod samplers;
mod scrape;
mod storm;
mod traffic;
pub mod worker;
mod workers;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use args::LoadArgs;
use args::{PER_PROCESS, Scenario};
use live::{Live, Shared, distribution, hist_percentiles, lock};
use report::{Meta, Pid1, Report, Storm, Tick};
use samplers::{PID1_BUSY_PCT, pid1_busy, process_list, sample_rtt, sample_timeline};
use scrape::{command_stats, stages};
use storm::run_storm;
use traffic::{Producer, ProducerMeters, produce};
use workers::{Worker, ramp, sleep_checking};

use crate::fleet::{Fleet, FleetOptions};
use crate::stats::{percentiles, rss_kib};
use crate::target::Target;

/// Settings of `gapless-bench report`.
#[derive(Debug, clap::Args)]
pub struct RenderArgs {
    /// The run's JSON, as `load --json` wrote it.
    #[arg(long)]
    json: std::path::PathBuf,
    /// Where to write the HTML report.
    #[arg(long)]
    html: std::path::PathBuf,
}

/// Renders a run's JSON as its HTML report.
pub fn render(args: &RenderArgs) -> anyhow::Result<()> {
    let text = std::fs::read(&args.json)
        .with_context(|| format!("cannot read {}", args.json.display()))?;
    let report: Report = serde_json::from_slice(&text)
        .with_context(|| format!("{} is not a load run's JSON", args.json.display()))?;
    write_outputs(&None, &Some(args.html.clone()), &report)
}

/// Runs a load scenario.
pub async fn run(args: LoadArgs) -> anyhow::Result<()> {
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let meta = Meta::now();
    if args.scenario == Scenario::Ingest {
        let result = crate::ingest::run(args.ingest, &args.appendfsync, args.cluster).await?;
        let report = ingest_report(meta, command, result);
        return write_outputs(&args.json, &args.html, &report);
    }
    if args.connections == 0 {
        bail!("--connections must be positive");
    }
    let n = args.connections;
    let edges = args.edges.unwrap_or(n.div_ceil(PER_PROCESS)).max(1);
    let procs = args.procs.unwrap_or(n.div_ceil(PER_PROCESS)).max(1);
    if procs > 250 || n / procs > 250 * worker::PER_SOURCE {
        bail!("--procs must be at most 250, and each must hold at most 2,500,000 connections");
    }
    let mut target = start_target(&args, edges).await?;
    if args.scenario == Scenario::Storm && target.fleet.is_none() {
        bail!("the storm kills and restarts edges: it needs the fleet this bench starts");
    }
    let started = Instant::now();
    let live: Shared = Arc::new(Mutex::new(Live::new(procs)));
    let stop = CancellationToken::new();
    let _stop_guard = stop.clone().drop_guard();
    tokio::spawn(sample_rtt(
        target.redis_url.clone(),
        live.clone(),
        stop.clone(),
    ));

    let mut workers = Worker::start_all(&target, &args, procs, &live)?;

    let timeline = Arc::new(Mutex::new(Vec::<Tick>::new()));
    let processes = process_list(&target, &workers);
    let fleet_pids = processes.fleet.clone();
    let meters = Arc::new(ProducerMeters::default());
    let sampler = tokio::spawn(sample_timeline(
        started,
        live.clone(),
        timeline.clone(),
        processes,
        meters.clone(),
        stop.clone(),
        n,
    ));

    let edge_pids = target.edge_pids();
    let edge_before: Vec<u64> = edge_pids.iter().map(|p| rss_kib(*p).unwrap_or(0)).collect();

    // Producers address only devices that have settled after connecting.
    let addressable = Arc::new(Mutex::new(Vec::<std::ops::Range<usize>>::new()));
    let producing = CancellationToken::new();
    let producer = if args.rate > 0 && args.scenario != Scenario::Idle {
        Some(tokio::spawn(produce(
            Producer {
                ingest_url: target.ingest_url.clone(),
                api_key: target.api_key.clone(),
                rate: args.rate,
                every: Duration::from_millis(args.batch_every_ms.max(1)),
            },
            addressable.clone(),
            meters.clone(),
            producing.clone(),
        )))
    } else {
        None
    };

    let ramp_started = Instant::now();
    ramp(&args, procs, &mut workers, &live, &addressable).await?;
    let ramp_s = ramp_started.elapsed().as_secs_f64();
    if args.scenario == Scenario::Idle {
        // Let allocations settle before measuring.
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let edge_after: Vec<u64> = edge_pids.iter().map(|p| rss_kib(*p).unwrap_or(0)).collect();
    let growth: u64 = edge_before
        .iter()
        .zip(&edge_after)
        .map(|(b, a)| a.saturating_sub(*b))
        .sum();
    let per_idle_conn = growth as f64 / n as f64;

    if args.warmup > 0 && producer.is_some() {
        lock(&live).mark("warm-up".into());
        sleep_checking(Duration::from_secs(args.warmup), &mut workers).await?;
    }

    let (duration_s, storm) = measure(
        &args,
        &mut target,
        &mut workers,
        &live,
        &meters,
        &fleet_pids,
    )
    .await?;

    // Stop producing and let what is in flight arrive.
    producing.cancel();
    if let Some(p) = producer {
        p.await?;
    }
    lock(&live).mark("producers stopped".into());
    let total = meters.sent.load(Ordering::Relaxed);
    settle(&live, total).await;
    stop.cancel();
    let processes = sampler.await?;
    drop(workers);

    let redis_commands = command_stats(&target.redis_url).await;
    let stages = stages(&target).await;
    let live = lock(&live);
    let delivered = live.sum(|w| w.delivered);
    let timeline = timeline
        .lock()
        .expect("timeline lock is never poisoned")
        .clone();
    let report = Report {
        meta,
        scenario: args.scenario.name().into(),
        transport: args.transport.arg().into(),
        command,
        connections_peak: timeline.iter().map(|t| t.connections).max().unwrap_or(0),
        edges,
        load_procs: procs,
        rate_per_s: if args.scenario == Scenario::Idle {
            0
        } else {
            args.rate
        },
        duration_s,
        sent: total,
        delivered,
        lost: total.saturating_sub(delivered),
        duplicates: live.sum(|w| w.duplicates),
        gaps: live.sum(|w| w.gaps),
        resets: live.sum(|w| w.resets),
        latency_ms: hist_percentiles(&live.phase),
        latency_ms_all: hist_percentiles(&live.all),
        latency_distribution: distribution(&live.phase),
        pid1: Pid1 {
            measured_s: live.measured_ticks,
            busy_s: timeline.iter().filter(|t| pid1_busy(&t.processes)).count() as u64,
            quiet_s: live.quiet_ticks,
            latency_ms_quiet: hist_percentiles(&live.quiet),
        },
        edge_rss_kib_per_idle_conn: per_idle_conn,
        edge_rss_kib_before: edge_before,
        edge_rss_kib_after: edge_after,
        ramp_s,
        redis_rtt_ms: percentiles(live.rtt_all.clone()),
        redis_rtt_ms_p99: percentiles(live.rtt_all.clone()).p99,
        storm,
        ingest: None,
        processes,
        stages,
        redis_commands,
        timeline,
    };
    drop(live);
    print_summary(&report, meters.refused.load(Ordering::Relaxed));
    write_outputs(&args.json, &args.html, &report)?;
    if report.lost > 0 || report.gaps > 0 || report.resets > 0 {
        bail!(
            "{} lost, {} gaps, {} resets: delivery was not exact",
            report.lost,
            report.gaps,
            report.resets
        );
    }
    Ok(())
}

/// The measured phase: the scenario's load held for `--duration` (the storm in its middle);
/// returns its length, s, and the storm's figures.
async fn measure(
    args: &LoadArgs,
    target: &mut Target,
    workers: &mut [Worker],
    live: &Shared,
    meters: &ProducerMeters,
    fleet_pids: &Mutex<Vec<(String, u32)>>,
) -> anyhow::Result<(f64, Option<Storm>)> {
    lock(live).measuring = true;
    lock(live).mark("measuring".into());
    let phase_started = Instant::now();
    let mut storm = None;
    match args.scenario {
        Scenario::Idle | Scenario::Steady => {
            sleep_checking(Duration::from_secs(args.duration), workers).await?;
        }
        Scenario::Storm => {
            let n = args.connections as u64;
            sleep_checking(Duration::from_secs(args.duration / 2), workers).await?;
            storm = Some(run_storm(target, live, &meters.sent, fleet_pids, n).await?);
            sleep_checking(Duration::from_secs(args.duration / 2), workers).await?;
        }
        Scenario::Ingest => bail!("the ingest scenario has no measured phase of its own"),
    }
    lock(live).measuring = false;
    Ok((phase_started.elapsed().as_secs_f64(), storm))
}

/// Waits (up to 30 s) until the devices hold all `sent` notifications, then one more tick
/// so the last counters and latencies are in.
async fn settle(live: &Shared, sent: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while lock(live).sum(|w| w.delivered) < sent && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
}

/// Starts the fleet, or describes the targeted deployment.
async fn start_target(args: &LoadArgs, edges: usize) -> anyhow::Result<Target> {
    if let Some(target) = Target::given(&args.target) {
        return Ok(target);
    }
    let mut env = vec![(
        "GAPLESS_HEARTBEAT_MS".to_owned(),
        args.heartbeat_ms.to_string(),
    )];
    if let Some(threads) = args.edge_threads {
        env.push(("TOKIO_WORKER_THREADS".to_owned(), threads.to_string()));
    }
    let mut redis = vec![(
        "auto-aof-rewrite-min-size".to_owned(),
        args.aof_rewrite_min_size.clone(),
    )];
    for setting in &args.redis_config {
        let (name, value) = setting
            .split_once('=')
            .with_context(|| format!("--redis-config {setting:?} is not name=value"))?;
        redis.push((name.trim().to_owned(), value.trim().to_owned()));
    }
    let fleet = Fleet::start_full(FleetOptions {
        appendfsync: args.appendfsync.clone(),
        edges,
        cluster: args.cluster,
        edge_env: env,
        redis_extra: redis,
        ..FleetOptions::default()
    })
    .await?;
    if args.redis_nice != 0 && !fleet.renice_redis(args.redis_nice) {
        eprintln!(
            "note: could not set redis-server's nice value to {} (needs root); it runs level with the rest",
            args.redis_nice
        );
    }
    Ok(Target::started(fleet))
}

/// The ingest scenario's result in the common report shape.
fn ingest_report(meta: Meta, command: String, ingest: serde_json::Value) -> Report {
    Report {
        meta,
        scenario: "ingest".into(),
        transport: String::new(),
        command,
        connections_peak: 0,
        edges: 0,
        load_procs: 0,
        rate_per_s: ingest["ingest_per_s_median"].as_f64().unwrap_or(0.0) as u64,
        duration_s: 0.0,
        sent: 0,
        delivered: 0,
        lost: 0,
        duplicates: 0,
        gaps: 0,
        resets: 0,
        latency_ms: percentiles(Vec::new()),
        latency_ms_all: percentiles(Vec::new()),
        latency_distribution: Vec::new(),
        pid1: Pid1 {
            measured_s: 0,
            busy_s: 0,
            quiet_s: 0,
            latency_ms_quiet: percentiles(Vec::new()),
        },
        edge_rss_kib_per_idle_conn: 0.0,
        edge_rss_kib_before: Vec::new(),
        edge_rss_kib_after: Vec::new(),
        ramp_s: 0.0,
        redis_rtt_ms: percentiles(Vec::new()),
        redis_rtt_ms_p99: 0.0,
        storm: None,
        ingest: Some(ingest),
        processes: Vec::new(),
        stages: Vec::new(),
        redis_commands: Vec::new(),
        timeline: Vec::new(),
    }
}

fn write_outputs(
    json: &Option<std::path::PathBuf>,
    html_path: &Option<std::path::PathBuf>,
    report: &Report,
) -> anyhow::Result<()> {
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_vec_pretty(report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = html_path {
        std::fs::write(path, html::render(report))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

fn print_summary(r: &Report, refused: u64) {
    let l = &r.latency_ms;
    println!();
    println!(
        "scenario {}: {} connections over {} edge(s) from {} load process(es), ramp {:.1} s",
        r.scenario, r.connections_peak, r.edges, r.load_procs, r.ramp_s
    );
    println!(
        "  edge resident memory per idle connection: {:.2} KiB (edges {:?} KiB before, {:?} after)",
        r.edge_rss_kib_per_idle_conn, r.edge_rss_kib_before, r.edge_rss_kib_after
    );
    if r.rate_per_s > 0 {
        println!(
            "  {} notifications/s for {:.0} s: sent {}, delivered {}, lost {}, gaps {}, resets {}, duplicates dropped {}, refused by the ingest {refused}",
            r.rate_per_s, r.duration_s, r.sent, r.delivered, r.lost, r.gaps, r.resets, r.duplicates
        );
        println!(
            "  latency ms (ingest to client, measured phase): p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
            l.p50, l.p90, l.p99, l.p999, l.max
        );
        let (q, quiet) = (&r.pid1, &r.pid1.latency_ms_quiet);
        println!(
            "  PID 1 busy (> {PID1_BUSY_PCT}% of a core) in {} of the run's seconds; over the {} of {} measured seconds it was quiet in (and the second before): p50 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
            q.busy_s, q.quiet_s, q.measured_s, quiet.p50, quiet.p99, quiet.p999, quiet.max
        );
    }
    let rtt = &r.redis_rtt_ms;
    println!(
        "  Redis round trip ms: p50 {:.2}  p99 {:.2}  max {:.2}",
        rtt.p50, rtt.p99, rtt.max
    );
    if let Some(s) = &r.storm {
        println!(
            "  storm: {} connections; edges back in {:.1} s; every client resumed in {:.1} s, caught up in {:.1} s ({} reconnects)",
            s.connections, s.edges_back_s, s.all_resumed_s, s.caught_up_s, s.reconnects
        );
    }
    let busiest: Vec<String> = r
        .redis_commands
        .iter()
        .take(6)
        .map(|(name, calls, per_call, total)| {
            format!("{name} {calls} calls {per_call:.1} µs each ({total:.1} s)")
        })
        .collect();
    for s in &r.stages {
        println!(
            "  {:<58} p50 <= {:>6.2} ms  p99 <= {:>6.2} ms  ({} observations)",
            s.stage, s.p50_ms, s.p99_ms, s.count
        );
    }
    if !busiest.is_empty() {
        println!("  Redis time: {}", busiest.join("; "));
    }
    for p in &r.processes {
        println!(
            "  {:<8} peak RSS {:>8} KiB  CPU mean {:>5.1} %  peak {:>5.1} %",
            p.name, p.peak_rss_kib, p.cpu_mean_pct, p.cpu_peak_pct
        );
    }
}
