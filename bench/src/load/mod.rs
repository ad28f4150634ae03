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

mod html;
mod report;
pub mod worker;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use rand::Rng;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::fleet::{Fleet, FleetOptions, JWT_SECRET};
use crate::stats::{Percentiles, cpu_seconds, percentiles, rss_kib};
use crate::transports::TransportMix;
use report::{Pid1, ProcessSummary, Report, Stage, Storm, Tick};
use worker::TickReport;

/// Connections one edge or load process holds at most by default (20,000 open files here).
const PER_PROCESS: usize = 18_000;

/// The scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// Hold N connections; edge memory per idle connection.
    Idle,
    /// N connections and R notifications/s: latency percentiles, delivered vs sent.
    Steady,
    /// Kill every edge, restart them: time until every client resumed with exact gaps.
    Storm,
    /// Batch ingest throughput beside redis-benchmark's pipelined XADD.
    Ingest,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Idle => "idle",
            Scenario::Steady => "steady",
            Scenario::Storm => "storm",
            Scenario::Ingest => "ingest",
        }
    }
}

/// Settings of a load run.
#[derive(Debug, Args)]
pub struct LoadArgs {
    /// What to measure.
    #[arg(long, value_enum, default_value_t = Scenario::Steady)]
    scenario: Scenario,
    /// Connections (one device per user).
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Transport of the devices: every one over the WebSocket, SSE or long-polling, or
    /// `mixed` (connection i over ws, sse, poll by i % 3).
    #[arg(long, value_enum, default_value_t = TransportMix::Ws)]
    transport: TransportMix,
    /// Edge processes [default: one per 18,000 connections].
    #[arg(long)]
    edges: Option<usize>,
    /// Load-generator processes [default: one per 18,000 connections]; process k connects
    /// from 127.0.k+1.1, 127.0.k+1.2, … (10,000 connections per address).
    #[arg(long)]
    procs: Option<usize>,
    /// Notifications per second over all producers (steady and storm).
    #[arg(long, default_value_t = 1_000)]
    rate: u64,
    /// The producers send one batch every this many ms (the batch holds what the rate
    /// owes by then: 100 items at 10,000/s and 10 ms).
    #[arg(long, default_value_t = 10)]
    batch_every_ms: u64,
    /// Seconds of the measured phase after the ramp (idle: hold; steady: load; storm: load
    /// before and after the kill).
    #[arg(long, default_value_t = 30)]
    duration: u64,
    /// Connections opened per second during the ramp, over all load processes.
    #[arg(long, default_value_t = 5_000)]
    ramp_rate: usize,
    /// Connection counts the ramp holds at [default: 1K, 2K, 5K, 10K, 20K, 50K, 100K… up
    /// to --connections].
    #[arg(long, value_delimiter = ',')]
    ramp_steps: Option<Vec<usize>>,
    /// Seconds each ramp step is held (at least 1: producers address a step's users only
    /// after their devices settled).
    #[arg(long, default_value_t = 2)]
    step_hold: u64,
    /// Seconds the producers run after the ramp before the measured phase starts (steady
    /// and storm). A user's first notification creates its log, which costs Redis several
    /// times an append to an existing one; at 100,000 users and 10,000/s a third of the
    /// users still have no log 10 s in. 30 s leaves about 5% (e^-3) of them: what follows is
    /// the steady state of existing users.
    #[arg(long, default_value_t = 0)]
    warmup: u64,
    /// AOF fsync policy of the Redis the bench starts.
    #[arg(long, default_value = "everysec")]
    appendfsync: String,
    /// Start a local Redis Cluster (three primaries, three replicas) instead of one node.
    #[arg(long)]
    cluster: bool,
    /// Nice value of the redis-server the bench starts. Every process of the run shares two
    /// cores here; Redis is the one every notification waits on, and in production it has
    /// cores of its own. 0 leaves it level with the rest.
    #[arg(long, default_value_t = -10, allow_hyphen_values = true)]
    redis_nice: i32,
    /// `auto-aof-rewrite-min-size` of the redis-server the bench starts. Redis's default
    /// (64mb, then at every 100% growth) rewrites the AOF every ~15 s at 100,000 users and
    /// 10,000 notifications/s: a fork of the whole dataset and a second process on the two
    /// shared cores. Production sizes this to its disk; "64mb" measures the default.
    #[arg(long, default_value = "4gb")]
    aof_rewrite_min_size: String,
    /// Further redis-server settings of the Redis the bench starts, `name=value`,
    /// comma-separated (e.g. `stream-node-max-bytes=1024`).
    #[arg(long, value_delimiter = ',')]
    redis_config: Vec<String>,
    /// Runtime worker threads of each edge the bench starts (TOKIO_WORKER_THREADS)
    /// [default: one per core].
    #[arg(long)]
    edge_threads: Option<usize>,
    /// Runtime worker threads of each load process [default: one per core].
    #[arg(long)]
    load_threads: Option<usize>,
    /// Edge heartbeat interval, ms, of the edges the bench starts.
    #[arg(long, default_value_t = 30_000)]
    heartbeat_ms: u64,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Write a self-contained HTML report with charts here.
    #[arg(long)]
    html: Option<std::path::PathBuf>,
    /// An existing deployment to load instead of starting one (not for `storm`, which kills
    /// and restarts the edges).
    #[command(flatten)]
    target: crate::fleet::DeploymentArgs,
    /// Settings of `--scenario ingest`.
    #[command(flatten)]
    ingest: crate::ingest::IngestArgs,
}

/// The system under test.
struct Target {
    fleet: Option<Fleet>,
    ingest_url: String,
    api_key: String,
    edge_urls: Vec<String>,
    jwt_secret: String,
    redis_url: String,
}

/// What the workers and the producers report, merged.
struct Live {
    /// Latest counters of each worker.
    workers: Vec<TickReport>,
    /// Latencies since the last timeline tick.
    interval: Histogram<u64>,
    /// Latencies of the measured phase.
    phase: Histogram<u64>,
    /// Latencies of the whole run.
    all: Histogram<u64>,
    /// Latencies of the measured phase's seconds in which PID 1 stayed quiet (and in the
    /// second before): see [`PID1`].
    quiet: Histogram<u64>,
    /// Seconds of the measured phase, and how many of them went into `quiet`.
    measured_ticks: u64,
    quiet_ticks: u64,
    /// Recording into `phase`.
    measuring: bool,
    /// Redis round trips since the last tick, ms.
    rtt_interval: Vec<f64>,
    /// Redis round trips of the run, ms.
    rtt_all: Vec<f64>,
    /// An event to label the next tick with.
    event: Option<String>,
}

impl Live {
    fn sum(&self, f: impl Fn(&TickReport) -> u64) -> u64 {
        self.workers.iter().map(f).sum()
    }

    fn mark(&mut self, event: String) {
        self.event = Some(match self.event.take() {
            Some(e) => format!("{e}; {event}"),
            None => event,
        });
    }
}

type Shared = Arc<Mutex<Live>>;

fn lock(live: &Shared) -> std::sync::MutexGuard<'_, Live> {
    live.lock().expect("live lock is never poisoned")
}

/// Runs a load scenario.
pub async fn run(args: LoadArgs) -> anyhow::Result<()> {
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    if args.scenario == Scenario::Ingest {
        let result = crate::ingest::run(args.ingest, &args.appendfsync, args.cluster).await?;
        let report = ingest_report(command, result);
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
    let live: Shared = Arc::new(Mutex::new(Live {
        workers: (0..procs).map(|_| TickReport::default()).collect(),
        interval: worker::histogram(),
        phase: worker::histogram(),
        all: worker::histogram(),
        quiet: worker::histogram(),
        measured_ticks: 0,
        quiet_ticks: 0,
        measuring: false,
        rtt_interval: Vec::new(),
        rtt_all: Vec::new(),
        event: None,
    }));
    let stop = CancellationToken::new();
    let _stop_guard = stop.clone().drop_guard();
    tokio::spawn(sample_rtt(
        target.redis_url.clone(),
        live.clone(),
        stop.clone(),
    ));

    // The load processes.
    let device = format!("bench-{}", std::process::id());
    let mut workers = Vec::new();
    for k in 0..procs {
        let (from, to) = (n * k / procs, n * (k + 1) / procs);
        workers.push(Worker::start(
            k,
            &target,
            from,
            to - from,
            &args,
            procs,
            &device,
            &live,
        )?);
    }

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

    let edge_pids = edge_pids(&target);
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

    // The ramp.
    let ramp_started = Instant::now();
    for step in ramp_steps(&args, n) {
        for w in &mut workers {
            w.open(step).await?;
        }
        let deadline =
            Instant::now() + Duration::from_secs(60 + (step / args.ramp_rate.max(1)) as u64);
        loop {
            let open = lock(&live).sum(|w| w.open);
            if open >= step as u64 {
                break;
            }
            if Instant::now() > deadline {
                bail!("only {open} of {step} connections open after the ramp deadline");
            }
            for w in &mut workers {
                w.check()?;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        lock(&live).mark(format!("{step} open"));
        tokio::time::sleep(Duration::from_secs(args.step_hold.max(1))).await;
        let mut a = addressable
            .lock()
            .expect("addressable lock is never poisoned");
        a.clear();
        for k in 0..procs {
            let (from, to) = (n * k / procs, n * (k + 1) / procs);
            a.push(from..from + share(step, n, from, to));
        }
    }
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

    // The measured phase.
    lock(&live).measuring = true;
    lock(&live).mark("measuring".into());
    let phase_started = Instant::now();
    let mut storm = None;
    match args.scenario {
        Scenario::Idle | Scenario::Steady => {
            sleep_checking(Duration::from_secs(args.duration), &mut workers).await?;
        }
        Scenario::Storm => {
            sleep_checking(Duration::from_secs(args.duration / 2), &mut workers).await?;
            storm = Some(run_storm(&mut target, &live, &meters.sent, &fleet_pids, n as u64).await?);
            sleep_checking(Duration::from_secs(args.duration / 2), &mut workers).await?;
        }
        Scenario::Ingest => unreachable!("handled above"),
    }
    let duration_s = phase_started.elapsed().as_secs_f64();
    lock(&live).measuring = false;

    // Stop producing and let what is in flight arrive.
    producing.cancel();
    if let Some(p) = producer {
        p.await?;
    }
    lock(&live).mark("producers stopped".into());
    let total = meters.sent.load(Ordering::Relaxed);
    let drain = Instant::now() + Duration::from_secs(30);
    while lock(&live).sum(|w| w.delivered) < total && Instant::now() < drain {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // One more tick so the last counters and latencies are in.
    tokio::time::sleep(Duration::from_millis(600)).await;
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

/// Starts the fleet, or describes the targeted deployment.
async fn start_target(args: &LoadArgs, edges: usize) -> anyhow::Result<Target> {
    let t = &args.target;
    if let Some(ingest_url) = &t.ingest_url {
        return Ok(Target {
            fleet: None,
            ingest_url: ingest_url.trim_end_matches('/').to_owned(),
            api_key: t.api_key.clone().unwrap_or_default(),
            edge_urls: t.edge_urls.clone().unwrap_or_default(),
            jwt_secret: t.jwt_secret.clone().unwrap_or_default(),
            redis_url: t.redis.clone().unwrap_or_default(),
        });
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
    Ok(Target {
        ingest_url: fleet.ingest_url.clone(),
        api_key: fleet.api_key.clone(),
        edge_urls: fleet.edges.iter().map(|e| e.ws_url.clone()).collect(),
        jwt_secret: JWT_SECRET.to_owned(),
        redis_url: fleet.redis.url(),
        fleet: Some(fleet),
    })
}

/// The ramp's steps: 1K, 2K, 5K, 10K, … below `n`, then `n`.
fn ramp_steps(args: &LoadArgs, n: usize) -> Vec<usize> {
    let mut steps: Vec<usize> = match &args.ramp_steps {
        Some(s) => s.iter().copied().filter(|s| *s > 0 && *s < n).collect(),
        None => {
            let mut s = Vec::new();
            let mut base = 1_000;
            while base < n {
                for m in [1, 2, 5] {
                    if base * m < n {
                        s.push(base * m);
                    }
                }
                base *= 10;
            }
            s
        }
    };
    steps.sort_unstable();
    steps.dedup();
    steps.push(n);
    steps
}

/// How many of the devices `from..to` (of `n`) a step of `step` connections opens.
fn share(step: usize, n: usize, from: usize, to: usize) -> usize {
    // Each worker opens the same fraction of its range.
    let count = to - from;
    (count * step).div_ceil(n).min(count)
}

/// A load-generator process.
struct Worker {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    from: usize,
    to: usize,
    n: usize,
    name: String,
}

impl Worker {
    #[allow(clippy::too_many_arguments)]
    fn start(
        k: usize,
        target: &Target,
        from: usize,
        count: usize,
        args: &LoadArgs,
        procs: usize,
        device: &str,
        live: &Shared,
    ) -> anyhow::Result<Self> {
        let mut child = tokio::process::Command::new(std::env::current_exe()?)
            .arg("load-worker")
            .arg("--urls")
            .arg(target.edge_urls.join(","))
            .arg("--from")
            .arg(from.to_string())
            .arg("--count")
            .arg(count.to_string())
            .arg("--rate")
            .arg((args.ramp_rate / procs).max(1).to_string())
            .arg("--sources")
            .arg(
                (1..=count.div_ceil(worker::PER_SOURCE).max(1))
                    .map(|m| format!("127.0.{}.{m}", k + 1))
                    .collect::<Vec<_>>()
                    .join(","),
            )
            .arg("--jwt-secret")
            .arg(&target.jwt_secret)
            .arg("--device")
            .arg(device)
            .arg("--transport")
            .arg(args.transport.arg())
            .envs(
                args.load_threads
                    .map(|t| ("TOKIO_WORKER_THREADS", t.to_string())),
            )
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start a load-worker process")?;
        let stdin = child.stdin.take().context("worker stdin")?;
        let stdout = child.stdout.take().context("worker stdout")?;
        let live = live.clone();
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let Some(json) = line.strip_prefix("tick ") else {
                    continue;
                };
                let Ok(mut tick) = serde_json::from_str::<TickReport>(json) else {
                    continue;
                };
                let hist = std::mem::take(&mut tick.hist);
                let mut live = lock(&live);
                for (us, count) in hist {
                    let us = us.clamp(1, 600_000_000);
                    let _ = live.interval.record_n(us, count);
                    let _ = live.all.record_n(us, count);
                    if live.measuring {
                        let _ = live.phase.record_n(us, count);
                    }
                }
                live.workers[k] = tick;
            }
        });
        Ok(Self {
            child,
            stdin,
            from,
            to: from + count,
            n: args.connections,
            name: format!("load-{k}"),
        })
    }

    /// Asks the worker to hold its share of `step` connections.
    async fn open(&mut self, step: usize) -> anyhow::Result<()> {
        let share = share(step, self.n, self.from, self.to);
        self.stdin
            .write_all(format!("open {share}\n").as_bytes())
            .await
            .context("a load worker is gone")?;
        self.stdin.flush().await?;
        Ok(())
    }

    /// Fails if the worker exited.
    fn check(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("load worker {} exited: {status}", self.name);
        }
        Ok(())
    }
}

/// Sleeps `d`, failing early if a worker dies.
async fn sleep_checking(d: Duration, workers: &mut [Worker]) -> anyhow::Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        for w in workers.iter_mut() {
            w.check()?;
        }
        tokio::time::sleep(Duration::from_millis(250).min(end - Instant::now())).await;
    }
    Ok(())
}

/// Pids of the edges the bench started.
fn edge_pids(target: &Target) -> Vec<u32> {
    target
        .fleet
        .iter()
        .flat_map(|f| f.edges.iter())
        .filter_map(|e| e.child.as_ref().map(std::process::Child::id))
        .collect()
}

/// What the sampler watches: fleet processes (re-read each tick: edges restart), the
/// workers and this process.
struct ProcessList {
    /// The fleet's processes; the storm refreshes them after restarting the edges.
    fleet: Arc<Mutex<Vec<(String, u32)>>>,
    /// The workers and this process.
    fixed: Vec<(String, u32)>,
}

fn process_list(target: &Target, workers: &[Worker]) -> ProcessList {
    let mut fixed: Vec<(String, u32)> = workers
        .iter()
        .filter_map(|w| w.child.id().map(|p| (w.name.clone(), p)))
        .collect();
    fixed.push(("bench".into(), std::process::id()));
    fixed.push((PID1.into(), 1));
    ProcessList {
        fleet: Arc::new(Mutex::new(
            target.fleet.as_ref().map(Fleet::pids).unwrap_or_default(),
        )),
        fixed,
    }
}

/// Samples every second until `stop`; returns each process's summary.
async fn sample_timeline(
    started: Instant,
    live: Shared,
    timeline: Arc<Mutex<Vec<Tick>>>,
    processes: ProcessList,
    meters: Arc<ProducerMeters>,
    stop: CancellationToken,
    n: usize,
) -> Vec<ProcessSummary> {
    use std::collections::BTreeMap;
    let mut cpu_last: BTreeMap<(String, u32), f64> = BTreeMap::new();
    let mut summary: BTreeMap<String, (u64, f64, f64, u32)> = BTreeMap::new();
    let mut last = Instant::now();
    let mut pid1_was_busy = false;
    let mut interval = tokio::time::interval(Duration::from_secs(1));
    interval.tick().await;
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    loop {
        let stopping = tokio::select! {
            _ = interval.tick() => false,
            () = stop.cancelled() => true,
        };
        let dt = last.elapsed().as_secs_f64().max(1e-3);
        last = Instant::now();
        let mut pids = processes.fixed.clone();
        pids.extend(
            processes
                .fleet
                .lock()
                .expect("pids lock is never poisoned")
                .iter()
                .cloned(),
        );
        let mut procs = Vec::new();
        for (name, pid) in pids {
            let rss = rss_kib(pid).unwrap_or(0);
            let cpu_now = cpu_seconds(pid);
            let pct = match (cpu_now, cpu_last.get(&(name.clone(), pid))) {
                (Some(now), Some(before)) => 100.0 * (now - before) / dt,
                _ => 0.0,
            };
            if let Some(now) = cpu_now {
                cpu_last.insert((name.clone(), pid), now);
            }
            let s = summary.entry(name.clone()).or_insert((0, 0.0, 0.0, 0));
            s.0 = s.0.max(rss);
            s.1 += pct;
            s.2 = s.2.max(pct);
            s.3 += 1;
            procs.push((name, rss, (pct * 10.0).round() / 10.0));
        }
        let pid1_busy = pid1_busy(&procs);
        let tick = {
            let mut l = lock(&live);
            let p = hist_percentiles(&l.interval);
            if l.measuring {
                l.measured_ticks += 1;
                if !pid1_busy && !pid1_was_busy {
                    l.quiet_ticks += 1;
                    let Live {
                        quiet, interval, ..
                    } = &mut *l;
                    // Same bounds: adding cannot fail.
                    let _ = quiet.add(&*interval);
                }
            }
            pid1_was_busy = pid1_busy;
            l.interval.reset();
            let rtt = percentiles(std::mem::take(&mut l.rtt_interval));
            Tick {
                t: (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
                connections: l.sum(|w| w.open),
                sent: meters.sent.load(Ordering::Relaxed),
                delivered: l.sum(|w| w.delivered),
                p50_ms: p.p50,
                p99_ms: p.p99,
                p999_ms: p.p999,
                max_ms: p.max,
                redis_rtt_p99_ms: rtt.p99,
                producer_lag_ms: meters.lag_us.swap(0, Ordering::Relaxed) as f64 / 1000.0,
                processes: procs,
                event: l.event.take(),
            }
        };
        let edges_mib: u64 = tick
            .processes
            .iter()
            .filter(|p| p.0.starts_with("edge"))
            .map(|p| p.1)
            .sum::<u64>()
            >> 10;
        let line = format!(
            "[{:>5.0} s] connections {:>6}/{n}  sent {:>8}  delivered {:>8}  p99 {:>7.2} ms  p99.9 {:>7.2} ms  edges RSS {edges_mib} MiB{}",
            tick.t,
            tick.connections,
            tick.sent,
            tick.delivered,
            tick.p99_ms,
            tick.p999_ms,
            tick.event
                .as_deref()
                .map(|e| format!("  [{e}]"))
                .unwrap_or_default()
        );
        if terminal {
            eprint!("\r{line}\x1b[K");
        } else if tick.event.is_some() || (tick.t as u64).is_multiple_of(5) {
            eprintln!("{line}");
        }
        timeline
            .lock()
            .expect("timeline lock is never poisoned")
            .push(tick);
        if stopping {
            if terminal {
                eprintln!();
            }
            return summary
                .into_iter()
                .map(|(name, (rss, sum, peak, count))| ProcessSummary {
                    name,
                    peak_rss_kib: rss,
                    cpu_mean_pct: (10.0 * sum / f64::from(count.max(1))).round() / 10.0,
                    cpu_peak_pct: (peak * 10.0).round() / 10.0,
                })
                .collect();
        }
    }
}

/// What the producers count, read by the sampler and the report.
#[derive(Default)]
struct ProducerMeters {
    /// Notifications the ingest acknowledged.
    sent: AtomicU64,
    /// Notifications it refused, or whose request failed.
    refused: AtomicU64,
    /// Most the producers' batch timer fired late since the sampler last looked, µs.
    lag_us: AtomicU64,
}

/// PID 1's name among the sampled processes. On this project's VM, PID 1 is the sandbox's
/// agent (`/process_api`, nice -10), which walks every open file descriptor of every process
/// about every 3.1 s: at 200,000 sockets that is ~170 ms of a core in the kernel, during
/// which the system under test has one core instead of two (BENCHMARKS.md). On an ordinary
/// host PID 1 is init and stays quiet.
const PID1: &str = "pid 1";

/// CPU (% of a core over a second) above which PID 1 counts as busy in that second.
const PID1_BUSY_PCT: f64 = 5.0;

/// Whether PID 1 was busy in a tick whose per-process samples are `processes`.
fn pid1_busy(processes: &[(String, u64, f64)]) -> bool {
    processes
        .iter()
        .any(|(name, _, pct)| name == PID1 && *pct > PID1_BUSY_PCT)
}

/// Where and how fast the producers append.
struct Producer {
    ingest_url: String,
    api_key: String,
    /// Notifications per second.
    rate: u64,
    /// One batch per this interval.
    every: Duration,
}

/// Appends at `rate` per second through the batch API, addressed across the settled users,
/// until `stop`. One batch every `every`, up to 16 in flight.
async fn produce(
    Producer {
        ingest_url,
        api_key,
        rate,
        every,
    }: Producer,
    addressable: Arc<Mutex<Vec<std::ops::Range<usize>>>>,
    meters: Arc<ProducerMeters>,
    stop: CancellationToken,
) {
    let http = reqwest::Client::new();
    let url = format!("{ingest_url}/v1/notifications/batch");
    let in_flight = Arc::new(tokio::sync::Semaphore::new(16));
    let mut tick = tokio::time::interval(every);
    // A producer that was held up sends what it owes in its next batch, as a batching
    // producer does, not a burst of back-to-back requests (tokio's Burst), which would only
    // queue in the ingest.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut owed = 0.0f64;
    let mut accrued_until = Instant::now();
    loop {
        tokio::select! {
            due = tick.tick() => {
                let late = due.elapsed().as_micros() as u64;
                meters.lag_us.fetch_max(late, Ordering::Relaxed);
            }
            () = stop.cancelled() => break,
        }
        let ranges = addressable
            .lock()
            .expect("addressable lock is never poisoned")
            .clone();
        let users: usize = ranges.iter().map(std::ops::Range::len).sum();
        let now = Instant::now();
        owed += rate as f64 * (now - accrued_until).as_secs_f64();
        accrued_until = now;
        if users == 0 {
            // Nobody to address yet: nothing is owed for this time.
            owed = 0.0;
            continue;
        }
        let count = owed.floor() as usize;
        if count == 0 {
            continue;
        }
        owed -= count as f64;
        let mut body = String::with_capacity(count * 48 + 2);
        body.push('[');
        for j in 0..count {
            let mut pick = rand::thread_rng().gen_range(0..users);
            let mut device = 0;
            for r in &ranges {
                if pick < r.len() {
                    device = r.start + pick;
                    break;
                }
                pick -= r.len();
            }
            if j > 0 {
                body.push(',');
            }
            body.push_str(&format!(
                "{{\"user\":\"{}\",\"payload\":{{\"s\":{}}}}}",
                worker::user(device),
                worker::now_us()
            ));
        }
        body.push(']');
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        let (http, url, key) = (http.clone(), url.clone(), api_key.clone());
        let meters = meters.clone();
        tokio::spawn(async move {
            let answer = async {
                let r = http
                    .post(&url)
                    .bearer_auth(&key)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await?;
                r.json::<serde_json::Value>().await
            };
            match answer.await {
                Ok(v) => {
                    let results = v["results"].as_array().cloned().unwrap_or_default();
                    let ok = results.iter().filter(|r| r["seq"].is_u64()).count() as u64;
                    meters.sent.fetch_add(ok, Ordering::Relaxed);
                    meters
                        .refused
                        .fetch_add(count as u64 - ok, Ordering::Relaxed);
                }
                Err(_) => {
                    meters.refused.fetch_add(count as u64, Ordering::Relaxed);
                }
            }
            drop(permit);
        });
    }
    // Wait for the requests in flight.
    let _ = in_flight.acquire_many(16).await;
}

/// Redis PING every 50 ms until `stop`.
async fn sample_rtt(url: String, live: Shared, stop: CancellationToken) {
    // On a cluster: the round trip to its first seed node.
    let first = url.split(',').next().unwrap_or_default();
    let Ok(client) = redis::Client::open(first) else {
        return;
    };
    let mut conn = None;
    while !stop.is_cancelled() {
        if conn.is_none() {
            conn = client.get_multiplexed_async_connection().await.ok();
        }
        if let Some(c) = conn.as_mut() {
            let started = std::time::Instant::now();
            let ok = tokio::time::timeout(
                Duration::from_secs(1),
                redis::cmd("PING").query_async::<String>(c),
            )
            .await
            .is_ok_and(|r| r.is_ok());
            if ok {
                let ms = started.elapsed().as_secs_f64() * 1000.0;
                let mut l = lock(&live);
                l.rtt_interval.push(ms);
                l.rtt_all.push(ms);
            } else {
                conn = None;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The delivery path's stages from the services' /metrics histograms (summed over edges).
async fn stages(target: &Target) -> Vec<Stage> {
    let http = reqwest::Client::new();
    let edge_bases: Vec<String> = target
        .edge_urls
        .iter()
        .map(|u| {
            u.replacen("ws://", "http://", 1)
                .replacen("wss://", "https://", 1)
                .trim_end_matches("/v1/ws")
                .to_owned()
        })
        .collect();
    let fetch = |base: String| {
        let http = http.clone();
        async move {
            let r = http.get(format!("{base}/metrics")).send().await.ok()?;
            r.text().await.ok()
        }
    };
    let ingest = fetch(target.ingest_url.clone()).await.unwrap_or_default();
    let mut edges = String::new();
    for base in edge_bases {
        edges.push_str(&fetch(base).await.unwrap_or_default());
        edges.push('\n');
    }
    [
        (
            "ingest: batch request (parse, append, publish)",
            &ingest,
            "gapless_ingest_request_duration_seconds_bucket",
            "batch",
        ),
        (
            "ingest: Redis append pipeline (Function calls)",
            &ingest,
            "gapless_redis_duration_seconds_bucket",
            "op=\"append\"",
        ),
        (
            "ingest: Redis append transactions (native)",
            &ingest,
            "gapless_redis_duration_seconds_bucket",
            "op=\"append_native\"",
        ),
        (
            "edge: entry's ingest time to handed to the socket writer",
            &edges,
            "gapless_edge_delivery_latency_seconds_bucket",
            "",
        ),
        (
            "edge: Redis stream reads",
            &edges,
            "gapless_redis_duration_seconds_bucket",
            "op=\"read\"",
        ),
        (
            "edge: Redis ack flushes",
            &edges,
            "gapless_redis_duration_seconds_bucket",
            "op=\"ack\"",
        ),
    ]
    .into_iter()
    .filter_map(|(stage, text, name, label)| {
        let (count, p50, p99) = bucket_quantiles(text, name, label)?;
        Some(Stage {
            stage: stage.to_owned(),
            count,
            p50_ms: p50 * 1000.0,
            p99_ms: p99 * 1000.0,
        })
    })
    .collect()
}

/// (count, p50, p99) of a Prometheus histogram's buckets in `text` (summed over every
/// series of `name` whose labels contain `label`), as bucket upper bounds.
fn bucket_quantiles(text: &str, name: &str, label: &str) -> Option<(u64, f64, f64)> {
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once(' ') else {
            continue;
        };
        if !labels.contains(label) {
            continue;
        }
        let Some(le) = labels
            .split("le=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
        else {
            continue;
        };
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().ok()?
        };
        let count: f64 = value.trim().parse().ok()?;
        match buckets.iter_mut().find(|b| b.0 == le) {
            Some(b) => b.1 += count,
            None => buckets.push((le, count)),
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let at = |q: f64| {
        buckets
            .iter()
            .find(|b| b.1 >= q * total)
            .map_or(f64::INFINITY, |b| b.0)
    };
    Some((total as u64, at(0.5), at(0.99)))
}

/// Redis's `INFO commandstats`: (command, calls, µs per call, total s), busiest first;
/// summed over every node of a cluster (`urls` comma-separated; replicas count the
/// commands they replay).
async fn command_stats(urls: &str) -> Vec<(String, u64, f64, f64)> {
    let mut totals: std::collections::BTreeMap<String, (u64, f64)> = Default::default();
    for url in urls.split(',') {
        let info = async {
            let client = redis::Client::open(url).ok()?;
            let mut conn = client.get_multiplexed_async_connection().await.ok()?;
            redis::cmd("INFO")
                .arg("commandstats")
                .query_async::<String>(&mut conn)
                .await
                .ok()
        };
        let Ok(Some(info)) = tokio::time::timeout(Duration::from_secs(2), info).await else {
            continue;
        };
        for line in info.lines() {
            let Some((name, fields)) = line
                .strip_prefix("cmdstat_")
                .and_then(|l| l.split_once(':'))
            else {
                continue;
            };
            let field = |key: &str| {
                fields
                    .split(',')
                    .find_map(|f| f.strip_prefix(key)?.strip_prefix('='))
                    .and_then(|v| v.parse::<f64>().ok())
            };
            if let (Some(calls), Some(usec)) = (field("calls"), field("usec")) {
                let total = totals.entry(name.to_owned()).or_default();
                total.0 += calls as u64;
                total.1 += usec;
            }
        }
    }
    let mut stats: Vec<(String, u64, f64, f64)> = totals
        .into_iter()
        .map(|(name, (calls, usec))| (name, calls, usec / calls.max(1) as f64, usec / 1e6))
        .collect();
    stats.sort_by(|a, b| b.3.total_cmp(&a.3));
    stats
}

/// Kills every edge with SIGKILL, restarts them, and times the recovery.
async fn run_storm(
    target: &mut Target,
    live: &Shared,
    sent: &AtomicU64,
    fleet_pids: &Mutex<Vec<(String, u32)>>,
    n: u64,
) -> anyhow::Result<Storm> {
    let fleet = target.fleet.as_mut().context("the storm needs the fleet")?;
    let connects_before = lock(live).sum(|w| w.connects);
    let killed = Instant::now();
    for i in 0..fleet.edges.len() {
        fleet.kill_edge(i);
    }
    lock(live).mark("every edge SIGKILLed".into());
    for i in 0..fleet.edges.len() {
        fleet.spawn_edge(i)?;
    }
    for i in 0..fleet.edges.len() {
        let url = fleet.edges[i].http_url.clone();
        fleet.wait_ready(&url).await?;
    }
    let edges_back_s = killed.elapsed().as_secs_f64();
    *fleet_pids.lock().expect("pids lock is never poisoned") = fleet.pids();
    lock(live).mark("edges restarted".into());
    let deadline = killed + Duration::from_secs(180);
    // Every device reconnected: each has a new connection, and all are open.
    let all_resumed_s = loop {
        let (open, connects) = {
            let l = lock(live);
            (l.sum(|w| w.open), l.sum(|w| w.connects))
        };
        if open >= n && connects >= connects_before + n {
            break killed.elapsed().as_secs_f64();
        }
        if Instant::now() > deadline {
            bail!("storm: only {open} of {n} connections back after 180 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    lock(live).mark("all resumed".into());
    // Everything acknowledged up to that moment delivered.
    let due = sent.load(Ordering::Relaxed);
    let caught_up_s = loop {
        if lock(live).sum(|w| w.delivered) >= due {
            break killed.elapsed().as_secs_f64();
        }
        if Instant::now() > deadline {
            bail!("storm: the backlog was not delivered within 180 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    lock(live).mark("caught up".into());
    Ok(Storm {
        connections: n,
        edges_back_s,
        all_resumed_s,
        caught_up_s,
        reconnects: lock(live).sum(|w| w.connects) - connects_before,
    })
}

/// Percentiles of a µs histogram, in ms.
fn hist_percentiles(h: &Histogram<u64>) -> Percentiles {
    if h.is_empty() {
        return percentiles(Vec::new());
    }
    let ms = |us: u64| us as f64 / 1000.0;
    Percentiles {
        p50: ms(h.value_at_quantile(0.50)),
        p90: ms(h.value_at_quantile(0.90)),
        p99: ms(h.value_at_quantile(0.99)),
        p999: ms(h.value_at_quantile(0.999)),
        max: ms(h.max()),
    }
}

/// The latency distribution in log-spaced buckets: (upper bound ms, count).
fn distribution(h: &Histogram<u64>) -> Vec<(f64, u64)> {
    if h.is_empty() {
        return Vec::new();
    }
    h.iter_log(100, 1.25)
        .filter(|v| v.count_since_last_iteration() > 0 || v.percentile() < 100.0)
        .map(|v| {
            (
                v.value_iterated_to() as f64 / 1000.0,
                v.count_since_last_iteration(),
            )
        })
        .collect()
}

/// The ingest scenario's result in the common report shape.
fn ingest_report(command: String, ingest: serde_json::Value) -> Report {
    Report {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up_to_the_step() {
        let n = 100_000;
        let procs = 6;
        for step in [1_000, 2_000, 50_000, 100_000] {
            let total: usize = (0..procs)
                .map(|k| share(step, n, n * k / procs, n * (k + 1) / procs))
                .sum();
            assert!(total >= step && total <= step + procs, "{step}: {total}");
        }
    }

    #[test]
    fn prometheus_buckets_give_quantiles() {
        let text = "x_bucket{op=\"a\",le=\"0.001\"} 50\nx_bucket{op=\"a\",le=\"0.002\"} 99\n\
                    x_bucket{op=\"a\",le=\"+Inf\"} 100\nx_bucket{op=\"b\",le=\"0.001\"} 7\n";
        assert_eq!(
            bucket_quantiles(text, "x_bucket", "op=\"a\""),
            Some((100, 0.001, 0.002))
        );
        assert_eq!(bucket_quantiles(text, "y_bucket", ""), None);
    }

    #[test]
    fn hdr_percentiles_are_in_ms() {
        let mut h = worker::histogram();
        for us in 1..=1000u64 {
            h.record(us * 10).expect("in range");
        }
        let p = hist_percentiles(&h);
        assert!((p.p50 - 5.0).abs() < 0.05, "{p:?}");
        assert!((p.max - 10.0).abs() < 0.05, "{p:?}");
        assert!(!distribution(&h).is_empty());
    }
}
