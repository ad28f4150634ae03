//! The ingest's configuration: flags, `GAPLESS_*` environment, `--config` TOML file, defaults,
//! validated into a [`Config`] with no leftover options.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use gapless_shared::config::{ConfigError, RedisArgs, RedisConfig, Secret, positive, read_file};
use gapless_shared::listener::{ListenerArgs, ListenerConfig};
use gapless_shared::rate::Rate;
use gapless_shared::runtime::RuntimeArgs;
use serde::Deserialize;

use crate::auth::RateLimits;

/// Command-line flags and environment of `gapless-ingest`; the same names (snake_case) are
/// the keys of the TOML file.
#[derive(Debug, Default, Parser, Deserialize)]
#[command(
    name = "gapless-ingest",
    version,
    about = "gapless HTTP ingest: producers append notifications here",
    after_help = "Each setting is taken from, in order: its flag, its GAPLESS_* environment \
                  variable, the --config TOML file (same names, snake_case), the default."
)]
#[serde(deny_unknown_fields)]
pub struct Args {
    /// TOML configuration file.
    #[arg(long, env = "GAPLESS_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 0.0.0.0:8081].
    #[arg(long, env = "GAPLESS_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// How to reach Redis.
    #[command(flatten)]
    #[serde(flatten)]
    pub redis: RedisArgs,
    /// Answer an append only once this many replicas hold it (`WAIT`), else 503 [default: 0].
    #[arg(long, env = "GAPLESS_MIN_REPLICAS_ACK")]
    pub min_replicas_ack: Option<u32>,
    /// API keys producers authenticate with (comma-separated). Required.
    #[arg(long, env = "GAPLESS_API_KEYS", value_delimiter = ',')]
    pub api_keys: Option<Vec<Secret>>,
    /// Largest body of a single append, bytes [default: 1 MiB].
    #[arg(long, env = "GAPLESS_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Largest body of a batch append, bytes [default: 16 MiB].
    #[arg(long, env = "GAPLESS_MAX_BATCH_BYTES")]
    pub max_batch_bytes: Option<usize>,
    /// Most items in one batch [default: 10000].
    #[arg(long, env = "GAPLESS_MAX_BATCH_ITEMS")]
    pub max_batch_items: Option<usize>,
    /// Largest payload of one notification (its JSON text), bytes [default: 64 KiB].
    #[arg(long, env = "GAPLESS_MAX_PAYLOAD_BYTES")]
    pub max_payload_bytes: Option<usize>,
    /// Deepest nesting of arrays and objects in a payload; deeper is a 422 `payload_too_deep`
    /// [default: 64].
    #[arg(long, env = "GAPLESS_MAX_PAYLOAD_DEPTH")]
    pub max_payload_depth: Option<usize>,
    /// Request body bytes the ingest holds at once across all requests; a body that does not
    /// fit is answered 503 with Retry-After [default: 128 MiB].
    #[arg(long, env = "GAPLESS_MAX_INFLIGHT_BODY_BYTES")]
    pub max_inflight_body_bytes: Option<usize>,
    /// Entries kept per user (approximate, `MAXLEN ~`) [default: 10000].
    #[arg(long, env = "GAPLESS_RETENTION_MAX_LEN")]
    pub retention_max_len: Option<u64>,
    /// Inactivity expiry of a user's log, ms; expiry starts a new epoch [default: 7 days].
    #[arg(long, env = "GAPLESS_RETENTION_TTL_MS")]
    pub retention_ttl_ms: Option<u64>,
    /// How long an idempotency key is remembered, ms [default: 24 h].
    #[arg(long, env = "GAPLESS_IDEMPOTENCY_TTL_MS")]
    pub idempotency_ttl_ms: Option<u64>,
    /// Largest payload that rides along in a wakeup, bytes [default: 4096].
    #[arg(long, env = "GAPLESS_WAKEUP_PAYLOAD_MAX_BYTES")]
    pub wakeup_payload_max_bytes: Option<usize>,
    /// How long in-flight requests may finish after a shutdown signal, ms [default: 10000].
    #[arg(long, env = "GAPLESS_SHUTDOWN_GRACE_MS")]
    pub shutdown_grace_ms: Option<u64>,
    /// A user with at least this many items in one request, none with an idempotency key,
    /// is appended with native commands in a transaction; fewer go through the Redis
    /// Function, which costs more per entry and less per user [default: 4]. A value above
    /// --max-batch-items sends every append through the Function.
    #[arg(long, env = "GAPLESS_NATIVE_MIN_ITEMS")]
    pub native_min_items: Option<usize>,
    /// Requests per second per API key; 0 turns the limit off [default: 10000, with a burst
    /// of one second's worth].
    #[arg(long, env = "GAPLESS_KEY_REQUESTS_PER_S")]
    pub key_requests_per_s: Option<u32>,
    /// Notifications per second per API key; 0 turns the limit off [default: 1000000, with a
    /// burst of one second's worth, which must hold a whole batch].
    #[arg(long, env = "GAPLESS_KEY_ITEMS_PER_S")]
    pub key_items_per_s: Option<u32>,
    /// Failed authentications per second per source address before it is answered 429; 0
    /// turns the limit off [default: 10, with a burst of five seconds' worth].
    #[arg(long, env = "GAPLESS_AUTH_FAILURES_PER_S")]
    pub auth_failures_per_s: Option<u32>,
    /// Connection budgets and timeouts.
    #[command(flatten)]
    #[serde(flatten)]
    pub listener: ListenerArgs,
    /// The async runtime.
    #[command(flatten)]
    #[serde(flatten)]
    pub runtime: RuntimeArgs,
}

impl Args {
    /// Fills what flags and environment left unset from the `--config` file, if any.
    pub fn with_file(self) -> Result<Self, ConfigError> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let file: Args = read_file(&path)?;
        Ok(self.or(file))
    }

    /// Each setting from `self`, else from `other`.
    fn or(self, other: Args) -> Args {
        Args {
            config: self.config,
            listen: self.listen.or(other.listen),
            redis: self.redis.or(other.redis),
            min_replicas_ack: self.min_replicas_ack.or(other.min_replicas_ack),
            api_keys: self.api_keys.or(other.api_keys),
            max_body_bytes: self.max_body_bytes.or(other.max_body_bytes),
            max_batch_bytes: self.max_batch_bytes.or(other.max_batch_bytes),
            max_batch_items: self.max_batch_items.or(other.max_batch_items),
            max_payload_bytes: self.max_payload_bytes.or(other.max_payload_bytes),
            max_payload_depth: self.max_payload_depth.or(other.max_payload_depth),
            max_inflight_body_bytes: self
                .max_inflight_body_bytes
                .or(other.max_inflight_body_bytes),
            retention_max_len: self.retention_max_len.or(other.retention_max_len),
            retention_ttl_ms: self.retention_ttl_ms.or(other.retention_ttl_ms),
            idempotency_ttl_ms: self.idempotency_ttl_ms.or(other.idempotency_ttl_ms),
            wakeup_payload_max_bytes: self
                .wakeup_payload_max_bytes
                .or(other.wakeup_payload_max_bytes),
            shutdown_grace_ms: self.shutdown_grace_ms.or(other.shutdown_grace_ms),
            native_min_items: self.native_min_items.or(other.native_min_items),
            key_requests_per_s: self.key_requests_per_s.or(other.key_requests_per_s),
            key_items_per_s: self.key_items_per_s.or(other.key_items_per_s),
            auth_failures_per_s: self.auth_failures_per_s.or(other.auth_failures_per_s),
            listener: self.listener.or(other.listener),
            runtime: self.runtime.or(other.runtime),
        }
    }
}

/// Request size limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest single-append body.
    pub body_bytes: usize,
    /// Largest batch body.
    pub batch_bytes: usize,
    /// Most items per batch.
    pub batch_items: usize,
    /// Largest payload (JSON text) of one notification.
    pub payload_bytes: usize,
    /// Deepest nesting of arrays and objects in a payload.
    pub payload_depth: usize,
    /// Body bytes held at once by all requests together.
    pub inflight_body_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            body_bytes: 1 << 20,
            batch_bytes: 16 << 20,
            batch_items: 10_000,
            payload_bytes: 64 << 10,
            payload_depth: 64,
            inflight_body_bytes: 128 << 20,
        }
    }
}

/// How long and how much of a user's log Redis keeps.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Entries kept per user, approximately (`MAXLEN ~`).
    pub max_len: u64,
    /// Inactivity expiry of the user's keys.
    pub ttl: Duration,
    /// How long an idempotency key is remembered.
    pub idempotency_ttl: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            max_len: 10_000,
            ttl: Duration::from_secs(7 * 24 * 3600),
            idempotency_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

/// The validated configuration of the ingest.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listen address (the binary binds it; [`crate::run`] takes the listener).
    pub listen: SocketAddr,
    /// Redis.
    pub redis: RedisConfig,
    /// Accepted API keys; never empty.
    pub api_keys: Vec<Secret>,
    /// Request limits.
    pub limits: Limits,
    /// Retention of users' logs.
    pub retention: Retention,
    /// Largest payload carried inside a wakeup.
    pub wakeup_payload_max: usize,
    /// Grace period for in-flight requests at shutdown.
    pub shutdown_grace: Duration,
    /// Fewest items of one user in a request for the native path (see [`crate::transaction`]).
    pub native_min_items: usize,
    /// Connection budgets and timeouts.
    pub listener: ListenerConfig,
    /// Rate limits per API key and source address.
    pub rates: RateLimits,
    /// Replicas that must hold an append before it is answered (`WAIT`, DESIGN.md §7.1);
    /// fewer within half the Redis timeout is a 503 `not_replicated` (written, not safe).
    pub min_replicas_ack: u32,
    /// Serve the browser demo page at `/demo` (see [`crate::demo`]). Only `gapless dev`
    /// turns it on; `gapless-ingest` has no flag for it.
    pub demo: bool,
}

impl Config {
    /// A configuration with defaults for everything but Redis and the keys.
    pub fn new(redis: RedisConfig, api_keys: Vec<Secret>) -> Self {
        Self {
            listen: ([0, 0, 0, 0], 8081).into(),
            redis,
            api_keys,
            limits: Limits::default(),
            retention: Retention::default(),
            wakeup_payload_max: 4096,
            shutdown_grace: Duration::from_secs(10),
            native_min_items: 4,
            listener: ListenerConfig::new(),
            rates: RateLimits::default(),
            min_replicas_ack: 0,
            demo: false,
        }
    }

    /// Validates merged flags, environment and file.
    pub fn from_args(args: Args) -> Result<Self, ConfigError> {
        let redis = args.redis.into_config()?;
        let api_keys: Vec<Secret> = args
            .api_keys
            .unwrap_or_default()
            .into_iter()
            .filter(|k| !k.expose().trim().is_empty())
            .collect();
        if api_keys.is_empty() {
            return Err(ConfigError::Invalid {
                setting: "--api-keys",
                reason: "no API keys configured: set --api-keys or GAPLESS_API_KEYS \
                         (`gapless dev` generates one for local use)"
                    .into(),
            });
        }
        let mut config = Config::new(redis, api_keys);
        config.listener = args.listener.into_config()?;
        if let Some(listen) = args.listen {
            config.listen = listen;
        }
        config.min_replicas_ack = args.min_replicas_ack.unwrap_or(0);
        let l = &mut config.limits;
        if let Some(n) = args.max_body_bytes {
            l.body_bytes = positive("--max-body-bytes", n)?;
        }
        if let Some(n) = args.max_batch_bytes {
            l.batch_bytes = positive("--max-batch-bytes", n)?;
        }
        if let Some(n) = args.max_batch_items {
            l.batch_items = positive("--max-batch-items", n)?;
        }
        if let Some(n) = args.max_payload_bytes {
            l.payload_bytes = positive("--max-payload-bytes", n)?;
        }
        if let Some(n) = args.max_payload_depth {
            l.payload_depth = positive("--max-payload-depth", n)?;
        }
        if let Some(n) = args.max_inflight_body_bytes {
            l.inflight_body_bytes = positive("--max-inflight-body-bytes", n)?;
        }
        if l.inflight_body_bytes < l.batch_bytes.max(l.body_bytes) {
            return Err(ConfigError::Invalid {
                setting: "--max-inflight-body-bytes",
                reason: "must be at least --max-batch-bytes and --max-body-bytes, or no \
                         request of the largest size could ever be read"
                    .into(),
            });
        }
        let rates = &mut config.rates;
        if let Some(n) = args.key_requests_per_s {
            rates.key_requests = Rate::new(n, 1);
        }
        if let Some(n) = args.key_items_per_s {
            rates.key_items = Rate::new(n, 1);
        }
        if let Some(n) = args.auth_failures_per_s {
            rates.auth_failures = Rate::new(n, 5);
        }
        let items = rates.key_items;
        if items != Rate::OFF && (items.burst as usize) < config.limits.batch_items {
            return Err(ConfigError::Invalid {
                setting: "--key-items-per-s",
                reason: "must be 0 (off) or at least --max-batch-items, or a full batch could \
                         never be accepted"
                    .into(),
            });
        }
        let r = &mut config.retention;
        if let Some(n) = args.retention_max_len {
            r.max_len = positive("--retention-max-len", n)?;
        }
        if let Some(ms) = args.retention_ttl_ms {
            r.ttl = Duration::from_millis(positive("--retention-ttl-ms", ms)?);
        }
        if let Some(ms) = args.idempotency_ttl_ms {
            r.idempotency_ttl = Duration::from_millis(positive("--idempotency-ttl-ms", ms)?);
        }
        if let Some(n) = args.wakeup_payload_max_bytes {
            config.wakeup_payload_max = n;
        }
        if let Some(ms) = args.shutdown_grace_ms {
            config.shutdown_grace = Duration::from_millis(ms);
        }
        if let Some(n) = args.native_min_items {
            config.native_min_items = positive("--native-min-items", n)?;
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("gapless-ingest").chain(args.iter().copied()))
            .expect("valid flags")
    }

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let dir = std::env::temp_dir().join(format!("gapless-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("ingest.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:9000\"\napi_keys = [\"from-file\"]\nmax_batch_items = 5\n",
        )
        .expect("write");
        let args = parse(&[
            "--config",
            file.to_str().expect("utf-8 path"),
            "--api-keys",
            "a,b",
        ])
        .with_file()
        .expect("file parses");
        let config = Config::from_args(args).expect("valid");
        assert_eq!(config.listen, "127.0.0.1:9000".parse().expect("addr"));
        assert_eq!(
            config
                .api_keys
                .iter()
                .map(Secret::expose)
                .collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(config.limits.batch_items, 5);
        assert_eq!(config.limits.batch_bytes, 16 << 20);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn unknown_file_settings_are_refused() {
        let dir = std::env::temp_dir().join(format!("gapless-cfg2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("ingest.toml");
        std::fs::write(&file, "lisen = \"127.0.0.1:9000\"\n").expect("write");
        let err = parse(&["--config", file.to_str().expect("utf-8 path")])
            .with_file()
            .expect_err("typo refused");
        assert!(err.to_string().contains("lisen"), "{err}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn refuses_to_start_without_api_keys() {
        let err = Config::from_args(parse(&[])).expect_err("no keys");
        assert!(err.to_string().contains("GAPLESS_API_KEYS"), "{err}");
        assert!(Config::from_args(parse(&["--api-keys", " , "])).is_err());
    }

    #[test]
    fn api_keys_are_masked_in_debug() {
        let config = Config::from_args(parse(&["--api-keys", "s3cret"])).expect("valid");
        assert!(!format!("{config:?}").contains("s3cret"));
    }

    #[test]
    fn zero_limits_are_refused() {
        assert!(Config::from_args(parse(&["--api-keys", "k", "--max-batch-items", "0"])).is_err());
    }
}
