//! `gapless-bench`: measures a real gapless system started as separate processes.
//!
//! `load` runs the load scenarios (`idle`, `steady`, `storm`, `ingest`) with up to 100,000+
//! connections held by load-generator processes; `drill` checks the delivery guarantees
//! under faults. Modules: [`fleet`] starts and stops the processes, [`stats`] summarises
//! samples.
#![forbid(unsafe_code)]

mod drill;
mod fleet;
mod ingest;
mod load;
mod stats;

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
    /// A load-generator process (started by `load`).
    #[command(hide = true)]
    LoadWorker(load::worker::WorkerArgs),
    /// Run devices and producers against a real system under a fault schedule and check
    /// the delivery guarantees; exits non-zero on any violation.
    Drill(drill::DrillArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let scenario = async {
        match Cli::parse().command {
            Scenario::Load(args) => load::run(*args).await,
            Scenario::LoadWorker(args) => load::worker::run(args).await,
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
