//! The edge's configuration: flags, `GAPLESS_*` environment, `--config` TOML file, defaults,
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

use crate::auth::{JwtKey, TokenRules, Verifier};

/// Command-line flags and environment of `gapless-edge`; the same names (snake_case) are
/// the keys of the TOML file.
#[derive(Debug, Default, Parser, Deserialize)]
#[command(
    name = "gapless-edge",
    version,
    about = "gapless WebSocket edge: devices connect here",
    after_help = "Each setting is taken from, in order: its flag, its GAPLESS_* environment \
                  variable, the --config TOML file (same names, snake_case), the default."
)]
#[serde(deny_unknown_fields)]
pub struct Args {
    /// TOML configuration file.
    #[arg(long, env = "GAPLESS_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 0.0.0.0:8080].
    #[arg(long, env = "GAPLESS_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// How to reach Redis.
    #[command(flatten)]
    #[serde(flatten)]
    pub redis: RedisArgs,
    /// This edge's id in the registry [default: host name + random suffix].
    #[arg(long, env = "GAPLESS_EDGE_ID")]
    pub edge_id: Option<String>,
    /// HS256 secret that device tokens are signed with.
    #[arg(long, env = "GAPLESS_JWT_SECRET")]
    pub jwt_secret: Option<Secret>,
    /// PEM file of the RS256 or ES256 public key that device tokens are signed with.
    #[arg(long, env = "GAPLESS_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<PathBuf>,
    /// `aud` a device token must carry [default: not checked].
    #[arg(long, env = "GAPLESS_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// `iss` a device token must carry [default: not checked].
    #[arg(long, env = "GAPLESS_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Clock skew tolerated on a token's `exp`, `nbf` and `iat`, ms [default: 5000].
    #[arg(long, env = "GAPLESS_JWT_LEEWAY_MS")]
    pub jwt_leeway_ms: Option<u64>,
    /// Heartbeat interval, ms: a client hears a frame (a ping if nothing else) at least this
    /// often, and one silent for two intervals is dropped [default: 30000].
    #[arg(long, env = "GAPLESS_HEARTBEAT_MS")]
    pub heartbeat_ms: Option<u64>,
    /// Interval of the sweep that finds entries whose wakeup was lost, ms
    /// [default: half the heartbeat].
    #[arg(long, env = "GAPLESS_SWEEP_MS")]
    pub sweep_ms: Option<u64>,
    /// Lease of this edge's registry entries, ms; refreshed every third of it [default: 90000].
    #[arg(long, env = "GAPLESS_LEASE_MS")]
    pub lease_ms: Option<u64>,
    /// How often ack positions are written to Redis, ms [default: 200].
    #[arg(long, env = "GAPLESS_ACK_FLUSH_MS")]
    pub ack_flush_ms: Option<u64>,
    /// Frames queued per connection before the connection waits for its socket [default: 64].
    #[arg(long, env = "GAPLESS_OUTBOUND_QUEUE")]
    pub outbound_queue: Option<usize>,
    /// A connection whose socket accepts nothing for this long is closed with 1013, ms
    /// [default: 10000].
    #[arg(long, env = "GAPLESS_SLOW_CONSUMER_MS")]
    pub slow_consumer_ms: Option<u64>,
    /// Entries read from the stream per page of a replay [default: 200].
    #[arg(long, env = "GAPLESS_REPLAY_PAGE")]
    pub replay_page: Option<usize>,
    /// Window over which a draining edge spreads the closing of its clients, ms [default: 5000].
    #[arg(long, env = "GAPLESS_DRAIN_WINDOW_MS")]
    pub drain_window_ms: Option<u64>,
    /// Longest a shutdown may take in all, ms [default: 15000].
    #[arg(long, env = "GAPLESS_SHUTDOWN_GRACE_MS")]
    pub shutdown_grace_ms: Option<u64>,
    /// Failed authentications per second per source address before it is answered 429; 0
    /// turns the limit off [default: 10, with a burst of five seconds' worth].
    #[arg(long, env = "GAPLESS_AUTH_FAILURES_PER_S")]
    pub auth_failures_per_s: Option<u32>,
    /// Connection attempts per second per user; past it the upgrade is answered 429; 0
    /// turns the limit off [default: 10, with a burst of three seconds' worth].
    #[arg(long, env = "GAPLESS_USER_CONNECTS_PER_S")]
    pub user_connects_per_s: Option<u32>,
    /// Connections of one user at this edge; past it a new one is refused with 429 (the
    /// user's other devices keep theirs) [default: 32].
    #[arg(long, env = "GAPLESS_MAX_CONNECTIONS_PER_USER")]
    pub max_connections_per_user: Option<usize>,
    /// Connections of one device at this edge; past it the oldest is closed with 4001 (a
    /// device that reconnects must get in while its old connection still looks alive)
    /// [default: 2].
    #[arg(long, env = "GAPLESS_MAX_CONNECTIONS_PER_DEVICE")]
    pub max_connections_per_device: Option<usize>,
    /// A device whose ack position was not written for this long is removed from its user's
    /// positions (checked, a few at a time, when new devices are added); 0 keeps positions
    /// until the user's log expires, ms [default: 30 days].
    #[arg(long, env = "GAPLESS_DEVICE_TTL_MS")]
    pub device_ttl_ms: Option<u64>,
    /// Reconnect delay an SSE stream asks browsers for (`retry:`), ms; each stream asks for
    /// a random delay between this and twice it, so the clients of a failed edge do not all
    /// come back at once [default: 2000].
    #[arg(long, env = "GAPLESS_SSE_RETRY_MS")]
    pub sse_retry_ms: Option<u64>,
    /// Origins allowed to call `/v1/sse`, `/v1/poll`, `/v1/ack` and `/v1/ws` (to read why an
    /// upgrade was refused) from a browser page (CORS), comma-separated, e.g.
    /// `https://app.example.com` [default: none].
    #[arg(long, env = "GAPLESS_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Option<Vec<String>>,
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
        Ok(Args {
            config: self.config,
            listen: self.listen.or(file.listen),
            redis: self.redis.or(file.redis),
            edge_id: self.edge_id.or(file.edge_id),
            jwt_secret: self.jwt_secret.or(file.jwt_secret),
            jwt_public_key: self.jwt_public_key.or(file.jwt_public_key),
            jwt_audience: self.jwt_audience.or(file.jwt_audience),
            jwt_issuer: self.jwt_issuer.or(file.jwt_issuer),
            jwt_leeway_ms: self.jwt_leeway_ms.or(file.jwt_leeway_ms),
            heartbeat_ms: self.heartbeat_ms.or(file.heartbeat_ms),
            sweep_ms: self.sweep_ms.or(file.sweep_ms),
            lease_ms: self.lease_ms.or(file.lease_ms),
            ack_flush_ms: self.ack_flush_ms.or(file.ack_flush_ms),
            outbound_queue: self.outbound_queue.or(file.outbound_queue),
            slow_consumer_ms: self.slow_consumer_ms.or(file.slow_consumer_ms),
            replay_page: self.replay_page.or(file.replay_page),
            drain_window_ms: self.drain_window_ms.or(file.drain_window_ms),
            shutdown_grace_ms: self.shutdown_grace_ms.or(file.shutdown_grace_ms),
            auth_failures_per_s: self.auth_failures_per_s.or(file.auth_failures_per_s),
            user_connects_per_s: self.user_connects_per_s.or(file.user_connects_per_s),
            max_connections_per_user: self
                .max_connections_per_user
                .or(file.max_connections_per_user),
            max_connections_per_device: self
                .max_connections_per_device
                .or(file.max_connections_per_device),
            device_ttl_ms: self.device_ttl_ms.or(file.device_ttl_ms),
            sse_retry_ms: self.sse_retry_ms.or(file.sse_retry_ms),
            cors_origins: self.cors_origins.or(file.cors_origins),
            listener: self.listener.or(file.listener),
            runtime: self.runtime.or(file.runtime),
        })
    }
}

/// The validated configuration of an edge.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listen address (the binary binds it; [`crate::run`] takes the listener).
    pub listen: SocketAddr,
    /// Redis.
    pub redis: RedisConfig,
    /// This edge's id.
    pub edge_id: String,
    /// How device tokens are checked.
    pub jwt: JwtKey,
    /// Claim checks of device tokens beyond the signature.
    pub jwt_rules: TokenRules,
    /// Server ping interval; silence for twice this drops a client.
    pub heartbeat: Duration,
    /// Interval of the lost-wakeup sweep.
    pub sweep: Duration,
    /// Registry lease; refreshed every third.
    pub lease: Duration,
    /// Interval of ack position writes.
    pub ack_flush: Duration,
    /// Frames queued per connection.
    pub outbound_queue: usize,
    /// How long a socket may accept nothing before the client is closed with 1013.
    pub slow_consumer: Duration,
    /// Entries per replay page.
    pub replay_page: usize,
    /// Time a client has to send `resume` after `welcome`.
    pub resume_timeout: Duration,
    /// Window over which draining closes clients.
    pub drain_window: Duration,
    /// Bound of the whole shutdown.
    pub shutdown_grace: Duration,
    /// Connection budgets and timeouts.
    pub listener: ListenerConfig,
    /// Failed authentications per source address.
    pub auth_failures: Rate,
    /// Connection attempts per user.
    pub user_connects: Rate,
    /// Connections of one user here (a new one past it is refused).
    pub max_connections_per_user: usize,
    /// Connections of one device here (the oldest past it is closed).
    pub max_connections_per_device: usize,
    /// Unused ack positions are removed after this long (zero: never).
    pub device_ttl: Duration,
    /// Least reconnect delay an SSE stream asks for (`retry:`); each asks for up to twice it.
    pub sse_retry: Duration,
    /// Origins allowed by CORS on the HTTP fallbacks (empty: none, no CORS headers).
    pub cors_origins: Vec<String>,
}

impl Config {
    /// A configuration with defaults for everything but Redis, the edge id and the key.
    pub fn new(redis: RedisConfig, edge_id: String, jwt: JwtKey) -> Self {
        let heartbeat = Duration::from_secs(30);
        Self {
            listen: ([0, 0, 0, 0], 8080).into(),
            redis,
            edge_id,
            jwt,
            jwt_rules: TokenRules::default(),
            heartbeat,
            sweep: heartbeat / 2,
            lease: Duration::from_secs(90),
            ack_flush: Duration::from_millis(200),
            outbound_queue: 64,
            slow_consumer: Duration::from_secs(10),
            replay_page: 200,
            resume_timeout: Duration::from_secs(10),
            drain_window: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(15),
            listener: ListenerConfig::new(),
            auth_failures: Rate::new(10, 5),
            user_connects: Rate::new(10, 3),
            max_connections_per_user: 32,
            max_connections_per_device: 2,
            device_ttl: Duration::from_secs(30 * 24 * 3600),
            sse_retry: Duration::from_secs(2),
            cors_origins: Vec::new(),
        }
    }

    /// Sets the heartbeat, and the sweep to half of it.
    pub fn with_heartbeat(mut self, heartbeat: Duration) -> Self {
        self.heartbeat = heartbeat;
        self.sweep = heartbeat / 2;
        self
    }

    /// Validates merged flags, environment and file.
    pub fn from_args(args: Args) -> Result<Self, ConfigError> {
        let invalid = |setting: &'static str, reason: &str| ConfigError::Invalid {
            setting,
            reason: reason.to_owned(),
        };
        let redis = args.redis.into_config()?;
        let jwt = match (args.jwt_secret, args.jwt_public_key) {
            (Some(secret), None) => JwtKey::Hs256(secret),
            (None, Some(path)) => {
                let pem = std::fs::read(&path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                JwtKey::PublicPem(pem)
            }
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "--jwt-secret",
                    "give either --jwt-secret or --jwt-public-key, not both",
                ));
            }
            (None, None) => {
                return Err(invalid(
                    "--jwt-secret",
                    "no token key configured: set --jwt-secret / GAPLESS_JWT_SECRET (HS256) or \
                     --jwt-public-key / GAPLESS_JWT_PUBLIC_KEY (RS256/ES256); `gapless dev` \
                     generates one for local use",
                ));
            }
        };
        let key_setting = match jwt {
            JwtKey::Hs256(_) => "--jwt-secret",
            JwtKey::PublicPem(_) => "--jwt-public-key",
        };
        let mut jwt_rules = TokenRules {
            audience: args.jwt_audience,
            issuer: args.jwt_issuer,
            ..TokenRules::default()
        };
        if let Some(ms) = args.jwt_leeway_ms {
            jwt_rules.leeway = Duration::from_millis(ms);
        }
        Verifier::with_rules(&jwt, &jwt_rules).map_err(|e| invalid(key_setting, &e.to_string()))?;
        let edge_id = match args.edge_id {
            Some(id) => id,
            None => default_edge_id(),
        };
        if gapless_shared::ids::UserId::parse(&edge_id).is_err() {
            return Err(invalid(
                "--edge-id",
                "an edge id is 1..=128 characters of A-Z a-z 0-9 . _ : @ -",
            ));
        }
        let mut config = Config::new(redis, edge_id, jwt);
        config.jwt_rules = jwt_rules;
        config.listener = args.listener.into_config()?;
        if let Some(ms) = args.device_ttl_ms {
            config.device_ttl = Duration::from_millis(ms);
        }
        if let Some(n) = args.auth_failures_per_s {
            config.auth_failures = Rate::new(n, 5);
        }
        if let Some(n) = args.user_connects_per_s {
            config.user_connects = Rate::new(n, 3);
        }
        let count = |v: Option<usize>, setting| v.map(|n| positive(setting, n)).transpose();
        if let Some(n) = count(args.max_connections_per_user, "--max-connections-per-user")? {
            config.max_connections_per_user = n;
        }
        if let Some(n) = count(
            args.max_connections_per_device,
            "--max-connections-per-device",
        )? {
            config.max_connections_per_device = n;
        }
        if let Some(listen) = args.listen {
            config.listen = listen;
        }
        let ms = |v: Option<u64>, setting| {
            v.map(|n| positive(setting, n).map(Duration::from_millis))
                .transpose()
        };
        if let Some(d) = ms(args.heartbeat_ms, "--heartbeat-ms")? {
            config = config.with_heartbeat(d);
        }
        if let Some(d) = ms(args.sweep_ms, "--sweep-ms")? {
            config.sweep = d;
        }
        if let Some(d) = ms(args.lease_ms, "--lease-ms")? {
            config.lease = d;
        }
        if let Some(d) = ms(args.ack_flush_ms, "--ack-flush-ms")? {
            config.ack_flush = d;
        }
        if let Some(d) = ms(args.slow_consumer_ms, "--slow-consumer-ms")? {
            config.slow_consumer = d;
        }
        if let Some(d) = ms(args.drain_window_ms, "--drain-window-ms")? {
            config.drain_window = d;
        }
        if let Some(d) = ms(args.shutdown_grace_ms, "--shutdown-grace-ms")? {
            config.shutdown_grace = d;
        }
        if let Some(n) = count(args.outbound_queue, "--outbound-queue")? {
            config.outbound_queue = n;
        }
        if let Some(n) = count(args.replay_page, "--replay-page")? {
            config.replay_page = n;
        }
        if let Some(d) = ms(args.sse_retry_ms, "--sse-retry-ms")? {
            config.sse_retry = d;
        }
        for origin in args.cors_origins.unwrap_or_default() {
            let origin = origin.trim().trim_end_matches('/');
            if origin.is_empty() {
                continue;
            }
            let valid = (origin.starts_with("http://") || origin.starts_with("https://"))
                && axum::http::HeaderValue::from_str(origin).is_ok()
                && !origin["https://".len().min(origin.len())..].contains('/');
            if !valid && origin != "*" {
                return Err(invalid(
                    "--cors-origins",
                    &format!(
                        "{origin:?} is not an origin: scheme://host[:port], e.g. https://app.example.com"
                    ),
                ));
            }
            config.cors_origins.push(origin.to_owned());
        }
        Ok(config)
    }
}

/// Host name plus a random suffix, so two edges on one host never share an id.
fn default_edge_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| {
            h.trim()
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
                .take(64)
                .collect::<String>()
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "edge".into());
    format!("{host}-{:08x}", rand::random::<u32>())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "s3cret-s3cret-s3cret-s3cret-s3cret";

    fn parse(args: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("gapless-edge").chain(args.iter().copied()))
            .expect("valid flags")
    }

    #[test]
    fn refuses_to_start_without_a_token_key() {
        let err = Config::from_args(parse(&[])).expect_err("no key");
        assert!(err.to_string().contains("GAPLESS_JWT_SECRET"), "{err}");
    }

    #[test]
    fn defaults_and_secret_masking() {
        let config = Config::from_args(parse(&["--jwt-secret", SECRET, "--heartbeat-ms", "1000"]))
            .expect("valid");
        assert_eq!(config.heartbeat, Duration::from_secs(1));
        assert_eq!(config.sweep, Duration::from_millis(500));
        assert!(!config.edge_id.is_empty());
        assert!(!format!("{config:?}").contains(SECRET));
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(
            Config::from_args(parse(&["--jwt-secret", SECRET, "--heartbeat-ms", "0"])).is_err()
        );
        assert!(Config::from_args(parse(&["--jwt-secret", SECRET, "--edge-id", "a b"])).is_err());
        let zero_cap = ["--jwt-secret", SECRET, "--max-connections-per-user", "0"];
        let refused = Config::from_args(parse(&zero_cap)).expect_err("a cap of 0 admits no one");
        assert!(
            refused.to_string().contains("--max-connections-per-user"),
            "{refused}"
        );
    }

    #[test]
    fn cors_origins_are_a_comma_separated_list_of_origins() {
        let config = Config::from_args(parse(&[
            "--jwt-secret",
            SECRET,
            "--cors-origins",
            "https://app.example.com, http://127.0.0.1:3000/",
        ]))
        .expect("valid");
        assert_eq!(
            config.cors_origins,
            ["https://app.example.com", "http://127.0.0.1:3000"]
        );
        let err = Config::from_args(parse(&[
            "--jwt-secret",
            SECRET,
            "--cors-origins",
            "app.example.com/path",
        ]))
        .expect_err("not an origin");
        assert!(err.to_string().contains("--cors-origins"), "{err}");
    }

    #[test]
    fn a_short_hs256_secret_is_refused_at_start() {
        let err = Config::from_args(parse(&["--jwt-secret", "k"])).expect_err("too short");
        let shown = err.to_string();
        assert!(
            shown.contains("--jwt-secret") && shown.contains("at least 32"),
            "{shown}"
        );
    }
}
