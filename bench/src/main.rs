//! `gapless-bench`: measures a real gapless system started as separate processes.
//!
//! `load` runs the load scenarios (`idle`, `steady`, `storm`, `ingest`) with up to 100,000+
//! connections held by load-generator processes, and `report` draws a recorded run again;
//! `drill` checks the delivery guarantees under faults; `flood` checks that idle connections
//! by the tens of thousands lock nobody out. What they share: [`target`] (the deployment
//! under test, started by [`fleet`] or given by URL), [`producer`] (the one typed client of
//! the ingest), [`stats`] (summaries of samples), [`transports`] (which transport each
//! simulated device speaks).
#![forbid(unsafe_code)]

mod drill;
mod fleet;
mod flood;
mod ingest;
mod load;
mod producer;
mod stats;
mod target;
mod transports;

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
    /// Load scenarios: idle (memory per connection), steady (latency and loss at a rate),
    /// storm (every edge killed: time to resume everyone exactly), ingest (batch throughput
    /// beside redis-benchmark's pipelined XADD).
    Load(Box<load::LoadArgs>),
    /// Renders a load run's JSON (`load --json`) as its HTML report again, without
    /// re-running it.
    Report(load::RenderArgs),
    /// A load-generator process (started by `load`).
    #[command(hide = true)]
    LoadWorker(load::worker::WorkerArgs),
    /// Run devices and producers against a real system under a fault schedule and check
    /// the delivery guarantees; exits non-zero on any violation.
    Drill(drill::DrillArgs),
    /// Tens of thousands of idle TCP connections against the ingest and the edge, while a
    /// client from another address connects, appends and receives within a bound, and
    /// sessions opened before keep receiving; exits non-zero if any check fails.
    Flood(flood::FloodArgs),
    /// A flood process (started by `flood`).
    #[command(hide = true)]
    FloodWorker(flood::FloodWorkerArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let scenario = async {
        match Cli::parse().command {
            Scenario::Load(args) => load::run(*args).await,
            Scenario::Report(args) => load::render(&args),
            Scenario::LoadWorker(args) => load::worker::run(args).await,
            Scenario::Drill(args) => drill::run(args).await,
            Scenario::Flood(args) => flood::run(args).await,
            Scenario::FloodWorker(args) => flood::worker(args).await,
        }
    };
    // On SIGINT or SIGTERM the scenario is dropped, and with it the fleet, which kills the
    // processes it started: none is left behind.
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(gapless_shared::shutdown::cancel_on_signal(stop.clone()));
    tokio::select! {
        result = scenario => result,
        () = stop.cancelled() => anyhow::bail!("interrupted"),
    }
}
