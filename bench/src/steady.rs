//! The `steady` scenario: N connections over the edges, producers appending through the batch
//! API at a steady rate addressed across the connected users, every payload carrying its
//! send time; reports delivery latency percentiles (send to receipt, so ingest, Redis, wakeup,
//! edge and socket), delivered against sent, and Redis's own round trip beside it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use rand::Rng;
use serde::Serialize;
use tokio::time::Instant;

use crate::fleet::Fleet;
use crate::stats::{Percentiles, percentiles};
use crate::swarm::{self, now_us};

/// Settings of the steady scenario.
#[derive(Debug, Args)]
pub struct SteadyArgs {
    /// Connections (one device per user).
    #[arg(long, default_value_t = 2_000)]
    connections: usize,
    /// Edge processes.
    #[arg(long, default_value_t = 1)]
    edges: usize,
    /// Notifications per second.
    #[arg(long, default_value_t = 1_000)]
    rate: usize,
    /// Seconds of steady load.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Connections opened per second during the ramp.
    #[arg(long, default_value_t = 2_000)]
    ramp_rate: usize,
    /// Load-generator processes holding the connections (each may hold ~19,000 here, and
    /// connects from its own 127.0.0.x); 1 holds them in this process.
    #[arg(long, default_value_t = 1)]
    procs: usize,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

/// What the scenario measured.
#[derive(Debug, Serialize)]
struct Report {
    scenario: &'static str,
    connections_peak: usize,
    edges: usize,
    rate_per_s: usize,
    sent: u64,
    delivered: u64,
    lost: u64,
    latency_ms: Percentiles,
    redis_rtt_ms: Percentiles,
}

/// Runs the scenario against a fleet it starts.
pub async fn run(args: SteadyArgs) -> anyhow::Result<()> {
    if args.connections == 0 || args.edges == 0 || args.rate == 0 {
        bail!("--connections, --edges and --rate must be positive");
    }
    let fleet = Fleet::start("everysec", args.edges).await?;
    let urls: Vec<String> = fleet.edges.iter().map(|e| e.ws_url.clone()).collect();
    let devices = if args.procs > 1 {
        let dir = std::env::temp_dir().join(format!("gapless-steady-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Devices::Workers(
            swarm::Workers::start(&urls, args.connections, args.procs, args.ramp_rate, &dir)
                .await?,
        )
    } else {
        Devices::Local(swarm::ramp(&urls, args.connections, args.ramp_rate).await?)
    };
    // Registration follows the resume; let it settle before anything is sent.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let rtt = Arc::new(std::sync::Mutex::new(Vec::new()));
    let rtt_task = tokio::spawn(sample_rtt(fleet.redis.url(), rtt.clone()));
    let http = reqwest::Client::new();
    let url = format!("{}/v1/notifications/batch", fleet.ingest_url);
    // One batch every 10 ms.
    let per_batch = (args.rate / 100).max(1);
    let mut sent = 0u64;
    let end = Instant::now() + Duration::from_secs(args.duration);
    let mut next = Instant::now();
    let mut last_report = Instant::now();
    while Instant::now() < end {
        next += Duration::from_millis(10);
        let items: Vec<serde_json::Value> = (0..per_batch)
            .map(|_| {
                let i = rand::thread_rng().gen_range(0..args.connections);
                serde_json::json!({"user": swarm::user(i), "payload": {"s": now_us()}})
            })
            .collect();
        let response = http
            .post(&url)
            .bearer_auth(&fleet.api_key)
            .json(&items)
            .send()
            .await?;
        if !response.status().is_success() {
            bail!("ingest answered {}", response.status());
        }
        sent += items.len() as u64;
        if last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            match &devices {
                Devices::Local(swarm) => eprintln!(
                    "sent {sent}, delivered {}, p99 {:.2} ms",
                    swarm.tally.delivered.load(Ordering::Relaxed),
                    current_p99(&swarm.tally)
                ),
                Devices::Workers(_) => eprintln!("sent {sent}"),
            }
        }
        tokio::time::sleep_until(next).await;
    }
    // Let what is in flight arrive.
    let (connections, delivered, samples) = match devices {
        Devices::Local(swarm) => {
            let deadline = Instant::now() + Duration::from_secs(5);
            while swarm.tally.delivered.load(Ordering::Relaxed) < sent && Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let samples = swarm
                .tally
                .latencies_us
                .lock()
                .expect("latency lock is never poisoned")
                .clone();
            (
                swarm.tally.open.load(Ordering::Relaxed),
                swarm.tally.delivered.load(Ordering::Relaxed),
                samples,
            )
        }
        Devices::Workers(workers) => {
            tokio::time::sleep(Duration::from_secs(3)).await;
            let (delivered, samples) = workers.finish().await?;
            (args.connections, delivered, samples)
        }
    };
    rtt_task.abort();
    let latencies: Vec<f64> = samples.iter().map(|us| f64::from(*us) / 1000.0).collect();
    let rtts = rtt.lock().expect("rtt lock is never poisoned").clone();
    let report = Report {
        scenario: "steady",
        connections_peak: connections,
        edges: args.edges,
        rate_per_s: args.rate,
        sent,
        delivered,
        lost: sent.saturating_sub(delivered),
        latency_ms: percentiles(latencies),
        redis_rtt_ms: percentiles(rtts),
    };
    let l = &report.latency_ms;
    let r = &report.redis_rtt_ms;
    println!();
    println!(
        "scenario steady: {} connections over {} edge(s), {} notifications/s for {} s",
        report.connections_peak, report.edges, report.rate_per_s, args.duration
    );
    println!(
        "  sent {}, delivered {}, lost {}",
        report.sent, report.delivered, report.lost
    );
    println!(
        "  latency ms (send to receipt): p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
        l.p50, l.p90, l.p99, l.p999, l.max
    );
    println!(
        "  Redis round trip ms:          p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
        r.p50, r.p90, r.p99, r.p999, r.max
    );
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if report.lost > 0 {
        bail!("{} notifications were not delivered", report.lost);
    }
    Ok(())
}

/// Who holds the connections.
enum Devices {
    /// This process.
    Local(swarm::Swarm),
    /// Worker processes.
    Workers(swarm::Workers),
}

/// p99 of the latencies so far, ms.
fn current_p99(tally: &swarm::Tally) -> f64 {
    let samples: Vec<f64> = tally
        .latencies_us
        .lock()
        .expect("latency lock is never poisoned")
        .iter()
        .rev()
        .take(10_000)
        .map(|us| f64::from(*us) / 1000.0)
        .collect();
    percentiles(samples).p99
}

/// Measures Redis's round trip (PING) every 50 ms, ms.
async fn sample_rtt(url: String, out: Arc<std::sync::Mutex<Vec<f64>>>) {
    let Ok(client) = redis::Client::open(url) else {
        return;
    };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return;
    };
    loop {
        let started = std::time::Instant::now();
        if redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .is_ok()
        {
            out.lock()
                .expect("rtt lock is never poisoned")
                .push(started.elapsed().as_secs_f64() * 1000.0);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
