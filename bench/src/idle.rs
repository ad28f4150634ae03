//! The `idle` scenario: open N authenticated, resumed WebSocket connections spread over the
//! fleet's edges, hold them (answering pings), and report each edge's resident memory per
//! idle connection: (RSS after the ramp - RSS before) / connections on that edge.

use std::process::Child;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use serde::Serialize;

use crate::fleet::Fleet;
use crate::stats::rss_kib;
use crate::swarm;

/// Settings of the idle scenario.
#[derive(Debug, Args)]
pub struct IdleArgs {
    /// Connections to open.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Edge processes (each may hold at most ~19,000 connections here: 20,000 open files).
    #[arg(long, default_value_t = 1)]
    edges: usize,
    /// Connections opened per second.
    #[arg(long, default_value_t = 2_000)]
    rate: usize,
    /// Seconds to hold the connections after the ramp, before measuring.
    #[arg(long, default_value_t = 3)]
    settle: u64,
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
    edge_rss_kib_before: Vec<u64>,
    edge_rss_kib_after: Vec<u64>,
    edge_rss_kib_per_idle_conn: f64,
    ramp_seconds: f64,
}

/// Runs the scenario against a fleet it starts.
pub async fn run(args: IdleArgs) -> anyhow::Result<()> {
    if args.connections == 0 || args.edges == 0 || args.rate == 0 {
        bail!("--connections, --edges and --rate must be positive");
    }
    let fleet = Fleet::start("everysec", args.edges).await?;
    let edge_pids: Vec<u32> = fleet
        .edges
        .iter()
        .filter_map(|e| e.child.as_ref().map(Child::id))
        .collect();
    let before: Vec<u64> = edge_pids.iter().map(|p| rss_kib(*p).unwrap_or(0)).collect();

    let started = Instant::now();
    let urls: Vec<String> = fleet.edges.iter().map(|e| e.ws_url.clone()).collect();
    let swarm = swarm::ramp(&urls, args.connections, args.rate).await?;
    let ramp = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(args.settle)).await;
    let after: Vec<u64> = edge_pids.iter().map(|p| rss_kib(*p).unwrap_or(0)).collect();
    let per_edge = args.connections as f64 / args.edges as f64;
    let per_conn: f64 = before
        .iter()
        .zip(&after)
        .map(|(b, a)| (*a as f64 - *b as f64) / per_edge)
        .sum::<f64>()
        / args.edges as f64;
    let report = Report {
        scenario: "idle",
        connections_peak: swarm.tally.open.load(Ordering::Relaxed),
        edges: args.edges,
        edge_rss_kib_before: before,
        edge_rss_kib_after: after,
        edge_rss_kib_per_idle_conn: per_conn,
        ramp_seconds: ramp,
    };
    println!();
    println!(
        "scenario idle: {} connections over {} edge(s), ramp {:.1} s",
        report.connections_peak, report.edges, report.ramp_seconds
    );
    for (i, (b, a)) in report
        .edge_rss_kib_before
        .iter()
        .zip(&report.edge_rss_kib_after)
        .enumerate()
    {
        println!("  edge-{i}: RSS {b} KiB before, {a} KiB after");
    }
    println!(
        "  edge resident memory per idle connection: {:.2} KiB",
        report.edge_rss_kib_per_idle_conn
    );
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}
