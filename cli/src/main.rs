//! `gapless`: the operator tool, thin subcommands over the library: `migrate` applies the
//! Redis Function library of `migrations/`; `dev` runs the whole system on this machine
//! ([`dev`], keeping its [`credentials`]); `token` mints a dev JWT.
#![forbid(unsafe_code)]

use anyhow::Context;
use clap::{Parser, Subcommand};

mod credentials;
mod dev;
use gapless_shared::config::{RedisConfig, mask_url_password as mask};
use gapless_shared::token::mint_hs256;
use gapless_shared::{schema, store};

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
    /// How log lines are written: `text` (coloured only on a terminal) or `json` (one object
    /// per line).
    #[arg(
        long,
        global = true,
        env = "GAPLESS_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: gapless_shared::telemetry::LogFormat,
}

#[derive(Subcommand)]
enum Command {
    /// Apply the newest Redis Function library (FUNCTION LOAD REPLACE, on every primary of
    /// a cluster) and record its version at gl:schema; then check that every primary holds
    /// it. Safe to repeat, and the way to load a primary added later or restarted empty.
    Migrate {
        /// Redis URL; with --cluster, seed URLs of the cluster, comma-separated.
        #[arg(
            long,
            env = "GAPLESS_REDIS_URL",
            default_value = "redis://127.0.0.1:6379"
        )]
        redis: String,
        /// `--redis` names seed nodes of a Redis Cluster.
        #[arg(long, env = "GAPLESS_REDIS_CLUSTER", num_args = 0..=1, default_missing_value = "true",
            value_parser = clap::builder::BoolishValueParser::new())]
        cluster: Option<bool>,
    },
    /// Mint an HS256 device token (for development and tests).
    Token {
        /// The user (`sub`).
        #[arg(long)]
        user: String,
        /// The device claim.
        #[arg(long)]
        device: Option<String>,
        /// Validity, seconds.
        #[arg(long, default_value_t = 86_400)]
        ttl_secs: u64,
        /// The edge's HS256 secret.
        #[arg(long, env = "GAPLESS_JWT_SECRET")]
        jwt_secret: String,
    },
    /// Run the whole system locally: Redis (AOF under --dir, unless --redis is given),
    /// migrations, the ingest and one edge; prints the URLs, a generated API key, a demo
    /// token, the URL of the browser demo page (served by the ingest at /demo) and snippets
    /// to try it.
    Dev(dev::Dev),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    gapless_shared::telemetry::init_tracing(cli.log_format);
    match cli.command {
        Command::Migrate { redis, cluster } => {
            let config = RedisConfig::from_args(&redis, cluster.unwrap_or(false))?;
            let (version, primaries) = migrate_store(&config).await?;
            if config.cluster {
                println!(
                    "gapless schema version {version} applied to {} primaries: {}",
                    primaries.len(),
                    primaries.join(", ")
                );
            } else {
                println!(
                    "gapless schema version {version} applied to {}",
                    mask(&redis)
                );
            }
            Ok(())
        }
        Command::Token {
            user,
            device,
            ttl_secs,
            jwt_secret,
        } => {
            gapless_shared::ids::UserId::parse(&user)?;
            let ttl = std::time::Duration::from_secs(ttl_secs);
            println!("{}", mint_hs256(&jwt_secret, &user, device.as_deref(), ttl));
            Ok(())
        }
        Command::Dev(dev) => dev.run().await,
    }
}

/// Applies the library, then checks every primary holds it; returns the version and the
/// primaries' addresses (empty for a single node).
pub(crate) async fn migrate_store(config: &RedisConfig) -> anyhow::Result<(u32, Vec<String>)> {
    let shown = config
        .urls
        .iter()
        .map(|u| mask(u))
        .collect::<Vec<_>>()
        .join(",");
    let mut conn = store::connect(config)
        .await
        .with_context(|| format!("cannot reach Redis at {shown}"))?;
    let version = schema::migrate(&mut conn).await?;
    schema::check(&mut conn, config.command_timeout).await?;
    let primaries = match conn {
        store::Store::Cluster(_) => conn
            .primaries(config.command_timeout)
            .await?
            .into_iter()
            .map(|p| p.addr)
            .collect(),
        store::Store::Single(_) => Vec::new(),
    };
    Ok((version, primaries))
}
