//! `gapless-edge`: parses configuration, binds, serves until SIGINT or SIGTERM, then drains.
#![forbid(unsafe_code)]

use anyhow::Context;
use clap::Parser;
use gapless_edge::config::{Args, Config};
use tokio_util::sync::CancellationToken;

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
    gapless_edge::run(listener, config, shutdown).await?;
    Ok(())
}
