//! `gapless-ingest`: parses configuration, binds, and serves until SIGINT or SIGTERM.
#![forbid(unsafe_code)]

use anyhow::Context;
use clap::Parser;
use gapless_ingest::config::{Args, Config};
use tokio_util::sync::CancellationToken;

/// mimalloc instead of glibc's malloc: the append builds and parses a Redis command and a
/// reply per notification, and glibc's malloc and free were a fifth of the ingest's CPU
/// (BENCHMARKS.md, tuning log). The edge keeps glibc: mimalloc costs it idle memory.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    gapless_shared::telemetry::init_tracing();
    let args = Args::parse().with_file()?;
    let runtime = args
        .runtime
        .build()
        .context("cannot start the async runtime")?;
    let config = Config::from_args(args)?;
    runtime.block_on(serve(config))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let listener = gapless_shared::listener::bind(config.listen)
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let shutdown = CancellationToken::new();
    tokio::spawn(gapless_shared::telemetry::cancel_on_signal(
        shutdown.clone(),
    ));
    gapless_ingest::run(listener, config, shutdown).await?;
    Ok(())
}
