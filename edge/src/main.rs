//! `gapless-edge`: parses configuration, binds, serves until SIGINT or SIGTERM, then drains.
#![forbid(unsafe_code)]

use clap::Parser;
use gapless_edge::config::{Args, Config};

fn main() -> anyhow::Result<()> {
    let args = Args::parse().with_file()?;
    let runtime = args.runtime.clone();
    gapless_shared::telemetry::init_tracing(runtime.log_format.unwrap_or_default());
    let config = Config::from_args(args)?;
    gapless_shared::runtime::serve(&runtime, config.listen, |listener, shutdown| async move {
        gapless_edge::run(listener, config, shutdown).await?;
        Ok(())
    })
}
