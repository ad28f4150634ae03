//! `gapless-bench`: measures a real gapless system started as separate processes.
//!
//! Scenarios: `ingest` (batch ingest throughput beside `redis-benchmark`'s pipelined XADD),
//! `idle` (edge memory per idle connection), `steady` (latency under load), `drill` (the delivery guarantees under faults).
//! Modules: [`fleet`] starts and stops the processes, [`stats`] summarises samples.
#![forbid(unsafe_code)]

mod drill;
mod fleet;
mod idle;
mod ingest;
mod stats;
mod steady;
mod swarm;

use clap::{Parser, Subcommand};

/// gapless benchmarks.
#[derive(Parser)]
#[command(
    name = "gapless-bench",
    version,
    about = "gapless benchmarks and drills"
)]
struct Cli {
    #[command(subcommand)]
    command: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Batch ingest throughput, with redis-benchmark's pipelined XADD on the same Redis in the
    /// same run as the denominator.
    Ingest(ingest::IngestArgs),
    /// Hold N idle connections over the edges and report edge memory per connection.
    Idle(idle::IdleArgs),
    /// N connections, producers at a steady rate: delivery latency percentiles and loss.
    Steady(steady::SteadyArgs),
    /// A load-generator process of a scenario (started by `steady --procs`).
    #[command(hide = true)]
    SwarmWorker(swarm::WorkerArgs),
    /// Run devices and producers against a real system under a fault schedule and check
    /// the delivery guarantees; exits non-zero on any violation.
    Drill(drill::DrillArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let scenario = async {
        match Cli::parse().command {
            Scenario::Ingest(args) => ingest::run(args).await,
            Scenario::Idle(args) => idle::run(args).await,
            Scenario::Steady(args) => steady::run(args).await,
            Scenario::SwarmWorker(args) => swarm::worker(args).await,
            Scenario::Drill(args) => drill::run(args).await,
        }
    };
    // On SIGINT or SIGTERM the scenario is dropped, and with it the fleet, which kills the
    // processes it started: none is left behind.
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(gapless_shared::telemetry::cancel_on_signal(stop.clone()));
    tokio::select! {
        result = scenario => result,
        () = stop.cancelled() => anyhow::bail!("interrupted"),
    }
}
