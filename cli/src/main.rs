//! `gapless`: the operator tool. `migrate` applies the Redis Function library of
//! `migrations/`; `dev` runs the whole system on this machine.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use gapless_shared::config::{RedisConfig, Secret, mask_url_password as mask};
use gapless_shared::process::{RedisOptions, RedisProcess};
use gapless_shared::{schema, store};
use tokio_util::sync::CancellationToken;

/// gapless operator tool.
#[derive(Parser)]
#[command(
    name = "gapless",
    version,
    about = "gapless operator tool",
    after_help = "Each flag also reads the GAPLESS_* environment variable shown; the flag wins."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply the newest Redis Function library (FUNCTION LOAD REPLACE) and record its
    /// version at gl:schema. Safe to repeat.
    Migrate {
        /// Redis URL.
        #[arg(
            long,
            env = "GAPLESS_REDIS_URL",
            default_value = "redis://127.0.0.1:6379"
        )]
        redis: String,
    },
    /// Run the whole system locally: Redis (AOF under --dir, unless --redis is given),
    /// migrations and the ingest; prints the URLs and a generated API key.
    Dev {
        /// Use this Redis instead of starting one.
        #[arg(long, env = "GAPLESS_REDIS_URL")]
        redis: Option<String>,
        /// Port of the Redis that `dev` starts.
        #[arg(long, default_value_t = 6390)]
        redis_port: u16,
        /// Directory for the started Redis's data and log.
        #[arg(long, default_value = ".gapless")]
        dir: PathBuf,
        /// Address of the ingest API.
        #[arg(long, default_value = "127.0.0.1:8081")]
        ingest_listen: SocketAddr,
        /// API key to accept (default: a fresh random one, printed).
        #[arg(long, env = "GAPLESS_API_KEYS")]
        api_key: Option<String>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    gapless_shared::telemetry::init_tracing();
    match Cli::parse().command {
        Command::Migrate { redis } => {
            let version = migrate(&redis).await?;
            println!(
                "gapless schema version {version} applied to {}",
                mask(&redis)
            );
            Ok(())
        }
        Command::Dev {
            redis,
            redis_port,
            dir,
            ingest_listen,
            api_key,
        } => dev(redis, redis_port, dir, ingest_listen, api_key).await,
    }
}

async fn migrate(url: &str) -> anyhow::Result<u32> {
    let config = RedisConfig::new(url)?;
    let mut conn = store::connect(&config)
        .await
        .with_context(|| format!("cannot reach Redis at {}", mask(url)))?;
    Ok(schema::migrate(&mut conn).await?)
}

async fn dev(
    redis: Option<String>,
    redis_port: u16,
    dir: PathBuf,
    ingest_listen: SocketAddr,
    api_key: Option<String>,
) -> anyhow::Result<()> {
    let mut local = None;
    let redis_url = match redis {
        Some(url) => url,
        None => {
            let dir = std::path::absolute(dir.join("redis"))?;
            let process = RedisProcess::start(RedisOptions {
                port: redis_port,
                dir: dir.clone(),
                appendfsync: "everysec".into(),
                extra: Vec::new(),
            })
            .with_context(|| format!("cannot start redis-server on port {redis_port}"))?;
            println!("redis:   {} (AOF in {})", process.url(), dir.display());
            let url = process.url();
            local = Some(process);
            url
        }
    };
    let version = migrate(&redis_url).await?;
    println!("schema:  version {version}");

    let api_key = api_key.unwrap_or_else(|| format!("dev-{:032x}", rand::random::<u128>()));
    let mut config = gapless_ingest::Config::new(
        RedisConfig::new(&redis_url)?,
        vec![Secret::new(api_key.clone())],
    );
    config.listen = ingest_listen;
    let listener = tokio::net::TcpListener::bind(ingest_listen)
        .await
        .with_context(|| format!("cannot listen on {ingest_listen}"))?;
    let shutdown = CancellationToken::new();
    tokio::spawn(gapless_shared::telemetry::cancel_on_signal(
        shutdown.clone(),
    ));
    let ingest = tokio::spawn(gapless_ingest::run(listener, config, shutdown.clone()));

    let base = format!("http://{ingest_listen}");
    println!("ingest:  {base}");
    println!("api key: {api_key}");
    println!();
    println!("send one:");
    println!(
        "  curl -s {base}/v1/notifications -H 'Authorization: Bearer {api_key}' \\\n    \
         -H 'Content-Type: application/json' -d '{{\"user\":\"alice\",\"payload\":{{\"text\":\"hello\"}}}}'"
    );
    println!("read them back:");
    println!("  curl -s {base}/v1/users/alice/notifications -H 'Authorization: Bearer {api_key}'");
    println!();
    println!("Ctrl-C stops everything.");

    let result = ingest.await.context("ingest task failed")?;
    shutdown.cancel();
    if let Some(mut process) = local {
        // A clean SHUTDOWN flushes the AOF; the drop that follows only reaps the process.
        if let Ok(client) = redis::Client::open(process.url())
            && let Ok(mut conn) = client.get_multiplexed_async_connection().await
        {
            let _ = redis::cmd("SHUTDOWN").query_async::<()>(&mut conn).await;
        }
        process.kill();
    }
    result?;
    Ok(())
}
