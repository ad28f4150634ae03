//! The `ingest` scenario: batch ingest throughput, with `redis-benchmark`'s pipelined `XADD`
//! on the same Redis, in the same run, as the denominator (DESIGN.md §6).
//!
//! Rounds alternate (ingest, XADD, ingest, XADD, …) so drift on a noisy machine hits both
//! sides; medians are reported.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Args;
use gapless_shared::batch::{PostcardBatch, PostcardItem};
use serde::Serialize;
use serde_json::value::RawValue;

use crate::fleet::{Fleet, FleetOptions, FleetRedis};
use crate::producer::{Format, Ingest, notification};
use crate::stats::{Percentiles, cpu_seconds, median, percentiles};

/// Settings of the ingest scenario.
#[derive(Debug, Args)]
pub struct IngestArgs {
    /// Notifications per round. The default makes a round last about as long as the
    /// redis-benchmark run beside it (~1.5 s), so a hiccup of this shared machine weighs the
    /// same on both sides; rounds of 100,000 (0.3 s) gave ratios from 38% to 68%.
    #[arg(long, default_value_t = 500_000)]
    items: usize,
    /// Distinct users the notifications are spread over.
    #[arg(long, default_value_t = 1_000)]
    users: usize,
    /// Items per batch request.
    #[arg(long, default_value_t = 10_000)]
    batch: usize,
    /// Concurrent producer connections.
    #[arg(long, default_value_t = 2)]
    concurrency: usize,
    /// Size of each payload's JSON text, bytes.
    #[arg(long, default_value_t = 100)]
    payload_bytes: usize,
    /// Batch body encoding.
    #[arg(long, value_enum, default_value_t = Format::Json)]
    format: Format,
    /// Measured rounds of each side (median reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Requests of the redis-benchmark XADD run.
    #[arg(long, default_value_t = 1_000_000)]
    xadd_requests: usize,
}

/// What the scenario measured.
#[derive(Debug, Serialize)]
struct Report {
    scenario: &'static str,
    items_per_round: usize,
    users: usize,
    batch: usize,
    concurrency: usize,
    payload_bytes: usize,
    format: Format,
    appendfsync: String,
    rounds: usize,
    ingest_per_s: Vec<f64>,
    ingest_per_s_median: f64,
    batch_latency_ms: Percentiles,
    xadd_per_s: Vec<f64>,
    xadd_per_s_median: f64,
    ratio: f64,
    xadd_command: String,
}

/// Runs the scenario against a fleet it starts (Redis with `appendfsync`); returns the
/// measurements as JSON.
///
/// Redis keeps its default AOF rewrite threshold here, unlike the load scenarios: without
/// rewrites the AOF grows by ~150 MB per XADD run and the XADD side slows down round after
/// round (634K/s in the first round, 489-563K/s in the next six), which would flatter the
/// ratio. With them it stays at 636-656K/s.
pub async fn run(
    args: IngestArgs,
    appendfsync: &str,
    cluster: bool,
) -> anyhow::Result<serde_json::Value> {
    if args.batch == 0 || args.users == 0 || args.items == 0 || args.concurrency == 0 {
        bail!("--items, --users, --batch and --concurrency must be positive");
    }
    let fleet = Fleet::start_full(FleetOptions {
        appendfsync: appendfsync.to_owned(),
        edges: 0,
        cluster,
        edge_env: Vec::new(),
        ingest_env: Vec::new(),
        redis_extra: Vec::new(),
    })
    .await?;
    let bodies = Arc::new(build_bodies(&args));
    let client = reqwest::Client::new();
    let pad = "x".repeat(args.payload_bytes.saturating_sub(24));
    // On a cluster, redis-benchmark --cluster: every primary takes XADDs of a key it owns.
    let ports = match &fleet.redis {
        FleetRedis::Single(r) => vec![r.port()],
        FleetRedis::Cluster(c) => (0..c.len()).map(|i| c.node(i).port()).collect(),
    };
    let xadd = XaddBench {
        ports,
        cluster,
        requests: args.xadd_requests,
        payload: format!("{{\"n\":1234567,\"pad\":\"{pad}\"}}"),
    };

    // One unmeasured round warms connections, Redis and the allocator.
    ingest_round(&client, &fleet, &bodies, args.concurrency, args.format).await?;
    let (mut ingest_rates, mut xadd_rates, mut latencies) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=args.rounds {
        let started = Instant::now();
        let cpu_before: Vec<Option<f64>> =
            fleet.pids().iter().map(|(_, p)| cpu_seconds(*p)).collect();
        let mut lat = ingest_round(&client, &fleet, &bodies, args.concurrency, args.format).await?;
        let elapsed = started.elapsed().as_secs_f64();
        let rate = args.items as f64 / elapsed;
        for ((role, pid), before) in fleet.pids().iter().zip(cpu_before) {
            if let (Some(b), Some(a)) = (before, cpu_seconds(*pid)) {
                eprintln!(
                    "  {role}: {:.0}% of a core, {:.2} µs CPU per notification",
                    100.0 * (a - b) / elapsed,
                    (a - b) * 1e6 / args.items as f64
                );
            }
        }
        latencies.append(&mut lat);
        let x = xadd.run()?;
        eprintln!(
            "round {round}: ingest {rate:>10.0} notifications/s   redis-benchmark XADD {x:>10.0} /s"
        );
        ingest_rates.push(rate);
        xadd_rates.push(x);
    }
    let report = Report {
        scenario: "ingest",
        items_per_round: args.items,
        users: args.users,
        batch: args.batch,
        concurrency: args.concurrency,
        payload_bytes: args.payload_bytes,
        format: args.format,
        appendfsync: appendfsync.to_owned(),
        rounds: args.rounds,
        ingest_per_s_median: median(&ingest_rates),
        ingest_per_s: ingest_rates,
        batch_latency_ms: percentiles(latencies),
        xadd_per_s_median: median(&xadd_rates),
        xadd_per_s: xadd_rates,
        ratio: 0.0,
        xadd_command: xadd.command_line(),
    };
    let report = Report {
        ratio: report.ingest_per_s_median / report.xadd_per_s_median.max(1.0),
        ..report
    };
    println!();
    println!(
        "scenario ingest: {} notifications x {} rounds, {} users, {}-item {:?} batches, {} producers, {} B payloads, appendfsync {}",
        report.items_per_round,
        report.rounds,
        report.users,
        report.batch,
        report.format,
        report.concurrency,
        report.payload_bytes,
        report.appendfsync
    );
    println!(
        "  batch ingest (median)          {:>12.0} notifications/s",
        report.ingest_per_s_median
    );
    println!(
        "  batch latency ms               p50 {:.1}  p90 {:.1}  p99 {:.1}  max {:.1}",
        report.batch_latency_ms.p50,
        report.batch_latency_ms.p90,
        report.batch_latency_ms.p99,
        report.batch_latency_ms.max
    );
    println!(
        "  redis-benchmark XADD (median)  {:>12.0} /s   ({})",
        report.xadd_per_s_median, report.xadd_command
    );
    println!(
        "  ratio                          {:>12.1} %",
        100.0 * report.ratio
    );
    Ok(serde_json::to_value(&report)?)
}

/// Request bodies of one round, in every encoding (only the chosen one is used).
struct Bodies {
    json: Vec<Bytes>,
    ndjson: Vec<Bytes>,
    postcard: Vec<Bytes>,
}

fn build_bodies(args: &IngestArgs) -> Bodies {
    let pad = "x".repeat(args.payload_bytes.saturating_sub(24));
    let items: Vec<PostcardItem> = (0..args.items)
        .map(|i| PostcardItem {
            user: format!("bench-{}", i % args.users),
            payload: format!("{{\"n\":{i:>7},\"pad\":\"{pad}\"}}"),
            idempotency_key: None,
        })
        .collect();
    let mut bodies = Bodies {
        json: Vec::new(),
        ndjson: Vec::new(),
        postcard: Vec::new(),
    };
    let payloads: Vec<Box<RawValue>> = items
        .iter()
        .map(|it| RawValue::from_string(it.payload.clone()).expect("the payload is JSON"))
        .collect();
    for (chunk, payloads) in items.chunks(args.batch).zip(payloads.chunks(args.batch)) {
        let notifications: Vec<_> = chunk
            .iter()
            .zip(payloads)
            .map(|(it, payload)| notification(&it.user, payload, None))
            .collect();
        let lines: Vec<String> = notifications
            .iter()
            .map(|n| serde_json::to_string(n).expect("a notification serialises"))
            .collect();
        bodies.json.push(Bytes::from(
            serde_json::to_vec(&notifications).expect("notifications serialise"),
        ));
        bodies.ndjson.push(Bytes::from(lines.join("\n")));
        bodies
            .postcard
            .push(Bytes::from(PostcardBatch::V1(chunk.to_vec()).encode()));
    }
    bodies
}

/// Posts every batch once over `concurrency` producers; returns per-batch latencies (ms).
async fn ingest_round(
    client: &reqwest::Client,
    fleet: &Fleet,
    bodies: &Arc<Bodies>,
    concurrency: usize,
    format: Format,
) -> anyhow::Result<Vec<f64>> {
    let next = Arc::new(AtomicUsize::new(0));
    let ingest = Ingest::with_client(client.clone(), &fleet.ingest_url, &fleet.api_key);
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (ingest, bodies, next) = (ingest.clone(), bodies.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let list = match format {
                Format::Json => &bodies.json,
                Format::Ndjson => &bodies.ndjson,
                Format::Postcard => &bodies.postcard,
            };
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(body) = list.get(i) else { break };
                let started = Instant::now();
                let results = ingest
                    .send_batch(format, body.clone())
                    .await
                    .with_context(|| format!("batch {i}"))?;
                latencies.push(started.elapsed().as_secs_f64() * 1000.0);
                if let Some(Err(refused)) = results.iter().find(|r| r.is_err()) {
                    bail!(
                        "batch {i}: an item was refused: {} ({})",
                        refused.code,
                        refused.message
                    );
                }
            }
            Ok(latencies)
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.append(&mut task.await??);
    }
    Ok(all)
}

/// `redis-benchmark`'s pipelined XADD against the fleet's Redis, of entries shaped like the
/// log's (schema 2): one field `p` with the same payload; the time is in gapless's ids.
struct XaddBench {
    /// Every node's port; the first is where redis-benchmark connects.
    ports: Vec<u16>,
    /// redis-benchmark's cluster mode (`{tag}` in the key names a key of each primary).
    cluster: bool,
    requests: usize,
    payload: String,
}

impl XaddBench {
    const KEY: &'static str = "gl:bench:xadd";
    const CLUSTER_KEY: &'static str = "gl:bench:{tag}:xadd";

    fn args(&self) -> Vec<String> {
        let mut args: Vec<String> = ["-h", "127.0.0.1", "-p"].map(str::to_owned).to_vec();
        args.push(self.ports[0].to_string());
        if self.cluster {
            args.push("--cluster".into());
        }
        let key = if self.cluster {
            Self::CLUSTER_KEY
        } else {
            Self::KEY
        };
        args.extend(
            [
                "-P",
                "100",
                "-n",
                &self.requests.to_string(),
                "-q",
                "XADD",
                key,
                "*",
                "p",
                &self.payload,
            ]
            .map(str::to_owned),
        );
        args
    }

    /// Deletes what the run wrote: the one stream, or on a cluster each primary's.
    fn clean_up(&self) {
        for port in &self.ports {
            let port = port.to_string();
            let Ok(found) = Command::new("redis-cli")
                .args(["-p", &port, "--scan", "--pattern", "gl:bench:*"])
                .output()
            else {
                continue;
            };
            for key in String::from_utf8_lossy(&found.stdout).lines() {
                // A replica lists its primary's keys and refuses the DEL: harmless.
                let _ = Command::new("redis-cli")
                    .args(["-p", &port, "DEL", key])
                    .output();
            }
        }
    }

    fn command_line(&self) -> String {
        format!(
            "redis-benchmark {}",
            self.args().join(" ").replace(&self.payload, "'<payload>'")
        )
    }

    /// Runs it once; returns requests per second. Deletes the stream afterwards.
    fn run(&self) -> anyhow::Result<f64> {
        let out = Command::new("redis-benchmark")
            .args(self.args())
            .output()
            .context("cannot run redis-benchmark (Debian: apt-get install redis-tools)")?;
        let text = String::from_utf8_lossy(&out.stdout);
        self.clean_up();
        // "XADD …: 512345.67 requests per second, p50=…"; -q prints progress with \r first.
        let last = text.rsplit('\r').next().unwrap_or(&text);
        let rate = last
            .split(": ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|n| n.parse::<f64>().ok())
            .with_context(|| format!("cannot read redis-benchmark's output: {text:?}"))?;
        Ok(rate)
    }
}
