//! `gapless-ingest`: parses configuration, binds, and serves until SIGINT or SIGTERM.
#![forbid(unsafe_code)]

use clap::Parser;
use gapless_ingest::config::{Args, Config};

/// mimalloc instead of glibc's malloc: the append builds and parses a Redis command and a
/// reply per notification, and glibc's malloc and free were a fifth of the ingest's CPU
/// (BENCHMARKS.md, tuning log). The edge keeps glibc: there the gain was within the noise,
/// for more idle memory per connection.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let args = Args::parse().with_file()?;
    let runtime = args.runtime.clone();
    gapless_shared::telemetry::init_tracing(runtime.log_format.unwrap_or_default());
    let config = Config::from_args(args)?;
    gapless_shared::runtime::serve(&runtime, config.listen, |listener, shutdown| async move {
        gapless_ingest::run(listener, config, shutdown).await?;
        Ok(())
    })
}
