//! Configuration pieces every gapless binary shares: masked secrets, the Redis settings and
//! the TOML file layer.
//!
//! Each binary layers its settings as: command-line flag, then `GAPLESS_*` environment
//! variable (both read by clap in the binary), then the `--config` TOML file, then the
//! default. Libraries receive the validated result and never read the environment.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;

/// A value that must not show up in logs: its `Debug` prints `"***"`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The configuration file is not valid TOML for this binary. The message names the line
    /// and the key but never shows a value: the file holds API keys and token secrets.
    #[error("invalid config file {}: {reason}", place(path, *line, key.as_deref()))]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line of the error, when the parser knows it.
        line: Option<usize>,
        /// The key on that line, when it has one.
        key: Option<String>,
        /// The parser's message with every quoted value masked.
        reason: String,
    },
    /// A setting has a value that cannot work.
    #[error("invalid setting `{setting}`: {reason}")]
    Invalid {
        /// The setting, as spelled on the command line.
        setting: &'static str,
        /// Why.
        reason: String,
    },
}

/// Reads a TOML configuration file into `T` (which should deny unknown fields).
pub fn read_file<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| {
        let line = e
            .span()
            .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
        let key = line
            .and_then(|n| text.lines().nth(n - 1))
            .and_then(|l| l.split_once('='))
            .map(|(k, _)| k.trim())
            .filter(|k| {
                !k.is_empty()
                    && k.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            })
            .map(str::to_owned);
        ConfigError::Parse {
            path: path.to_owned(),
            line,
            key,
            reason: mask_quoted(e.message()),
        }
    })
}

/// `path`, `path line 3`, or `path line 3 (key `jwt_secret`)`.
fn place(path: &Path, line: Option<usize>, key: Option<&str>) -> String {
    match (line, key) {
        (Some(n), Some(k)) => format!("{}, line {n} (key `{k}`)", path.display()),
        (Some(n), None) => format!("{}, line {n}", path.display()),
        _ => path.display().to_string(),
    }
}

/// Replaces what a message quotes with `"..."` or `'...'` by `***`: TOML parse messages quote
/// the value they refused, which may be a secret. Key names (quoted with backticks) stay.
fn mask_quoted(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut open: Option<char> = None;
    for c in message.chars() {
        match open {
            Some(q) if c == q => {
                out.push_str("***");
                out.push(c);
                open = None;
            }
            Some(_) => {}
            None => {
                out.push(c);
                if c == '"' || c == '\'' {
                    open = Some(c);
                }
            }
        }
    }
    if open.is_some() {
        out.push_str("***");
    }
    // One line: the parser's multi-line rendering is gone with the source line it quoted.
    out.replace('\n', "; ")
}

/// How to reach Redis.
#[derive(Clone)]
pub struct RedisConfig {
    /// `redis://` URLs: the node, or the seed nodes of a cluster (may hold a password,
    /// hence the masked `Debug`).
    pub urls: Vec<String>,
    /// The URLs are seeds of a Redis Cluster (`--cluster`).
    pub cluster: bool,
    /// Timeout of one command or pipeline; past it the operation fails as unavailable.
    pub command_timeout: Duration,
    /// Timeout of establishing a connection.
    pub connect_timeout: Duration,
}

impl RedisConfig {
    /// Default command timeout.
    pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
    /// Default connect timeout.
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

    /// A single node at `url`, with default timeouts, after checking the URL.
    pub fn new(url: &str) -> Result<Self, ConfigError> {
        Self::from_args(url, false)
    }

    /// What `--redis` and `--cluster` say: one URL, or with `cluster` one or more seed URLs,
    /// comma-separated.
    pub fn from_args(redis: &str, cluster: bool) -> Result<Self, ConfigError> {
        let invalid = |reason: String| ConfigError::Invalid {
            setting: "--redis",
            reason,
        };
        let urls = split_list(redis);
        if urls.is_empty() {
            return Err(invalid("no Redis URL given".into()));
        }
        if urls.len() > 1 && !cluster {
            return Err(invalid(
                "several nodes are the seeds of a Redis Cluster: add --cluster (GAPLESS_REDIS_CLUSTER=1)"
                    .into(),
            ));
        }
        for url in &urls {
            redis::Client::open(url.as_str())
                .map_err(|e| invalid(format!("{}: {e}", mask_url_password(url))))?;
        }
        Ok(Self {
            urls,
            cluster,
            command_timeout: Self::DEFAULT_COMMAND_TIMEOUT,
            connect_timeout: Self::DEFAULT_CONNECT_TIMEOUT,
        })
    }

    /// The first URL: the node of a single-node configuration.
    pub fn url(&self) -> &str {
        self.urls.first().map_or("", String::as_str)
    }
}

/// `n` where it is above 0 (a count, a size, a duration in ms); 0 is refused naming
/// `setting`. Every server setting that 0 would break goes through here.
pub fn positive<T: PartialEq + Default>(setting: &'static str, n: T) -> Result<T, ConfigError> {
    if n == T::default() {
        return Err(ConfigError::Invalid {
            setting,
            reason: "must be greater than 0".into(),
        });
    }
    Ok(n)
}

/// The Redis settings as flags, `GAPLESS_*` variables and config file keys; flattened into
/// each server's arguments.
#[derive(Debug, Default, Clone, clap::Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisArgs {
    /// Redis URL, `redis://[user:password@]host:port[/db]` [default: redis://127.0.0.1:6379].
    #[arg(long = "redis", env = "GAPLESS_REDIS_URL")]
    #[serde(rename = "redis")]
    pub redis_url: Option<String>,
    /// `--redis` names seed nodes of a Redis Cluster (comma-separated).
    #[arg(long, env = "GAPLESS_REDIS_CLUSTER", num_args = 0..=1, default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new())]
    pub cluster: Option<bool>,
    /// Timeout of one Redis call, ms [default: 2000].
    #[arg(long, env = "GAPLESS_REDIS_TIMEOUT_MS")]
    pub redis_timeout_ms: Option<u64>,
}

impl RedisArgs {
    /// Each setting from `self`, else from `other` (the config file).
    pub fn or(self, other: RedisArgs) -> RedisArgs {
        RedisArgs {
            redis_url: self.redis_url.or(other.redis_url),
            cluster: self.cluster.or(other.cluster),
            redis_timeout_ms: self.redis_timeout_ms.or(other.redis_timeout_ms),
        }
    }

    /// Validates the settings; a timeout of 0 is refused (it would fail every call).
    pub fn into_config(self) -> Result<RedisConfig, ConfigError> {
        let url = self
            .redis_url
            .as_deref()
            .unwrap_or("redis://127.0.0.1:6379");
        let mut config = RedisConfig::from_args(url, self.cluster.unwrap_or(false))?;
        if let Some(ms) = self.redis_timeout_ms {
            config.command_timeout = Duration::from_millis(positive("--redis-timeout-ms", ms)?);
        }
        Ok(config)
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let urls: Vec<String> = self.urls.iter().map(|u| mask_url_password(u)).collect();
        f.debug_struct("RedisConfig")
            .field("urls", &urls)
            .field("cluster", &self.cluster)
            .field("command_timeout", &self.command_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

/// `redis://user:pass@host` -> `redis://user:***@host`, for logs and messages.
pub fn mask_url_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((auth, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    let user = auth.split_once(':').map_or(auth, |(u, _)| u);
    format!("{scheme}://{user}:***@{host}")
}

/// Splits a comma-separated list, dropping blanks.
pub fn split_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_masked_in_debug() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "\"***\"");
        assert_eq!(s.expose(), "hunter2");
        let r = RedisConfig::new("redis://app:hunter2@localhost:6379/0").expect("valid");
        let shown = format!("{r:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains("redis://app:***@localhost:6379/0"),
            "{shown}"
        );
    }

    #[test]
    fn bad_redis_urls_are_refused() {
        assert!(RedisConfig::new("http://x").is_err());
        let several = RedisConfig::new("redis://a:1,redis://b:2").expect_err("needs --cluster");
        assert!(several.to_string().contains("--cluster"), "{several}");
        let seeds = RedisConfig::from_args("redis://a:1, redis://b:2", true).expect("seeds");
        assert_eq!(seeds.urls, ["redis://a:1", "redis://b:2"]);
        assert!(seeds.cluster);
        assert!(RedisConfig::from_args("redis://a:1,http://b", true).is_err());
        assert!(RedisConfig::from_args(" , ", true).is_err());
    }

    #[test]
    fn redis_settings_take_the_flag_over_the_file_and_refuse_a_zero_timeout() {
        let flags = RedisArgs {
            redis_url: Some("redis://flag:1".into()),
            ..RedisArgs::default()
        };
        let file = RedisArgs {
            redis_url: Some("redis://file:2".into()),
            cluster: Some(false),
            redis_timeout_ms: Some(750),
        };
        let config = flags.or(file).into_config().expect("valid");
        assert_eq!(config.urls, ["redis://flag:1"]);
        assert_eq!(config.command_timeout, Duration::from_millis(750));
        let defaults = RedisArgs::default().into_config().expect("defaults");
        assert_eq!(defaults.urls, ["redis://127.0.0.1:6379"]);
        let zero = RedisArgs {
            redis_timeout_ms: Some(0),
            ..RedisArgs::default()
        };
        let refused = zero.into_config().expect_err("0 ms fails every call");
        assert!(
            refused.to_string().contains("--redis-timeout-ms"),
            "{refused}"
        );
    }

    #[test]
    fn config_file_errors_name_line_and_key_but_never_a_value() {
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct File {
            jwt_secret: Option<String>,
            heartbeat_ms: Option<u64>,
        }
        let dir = std::env::temp_dir().join(format!("gapless-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let cases = [
            (
                "heartbeat_ms = 1\njwt_secret = \"hunter2-secret\nx = 1\n",
                2,
                "jwt_secret",
            ),
            ("\n\nheartbeat_ms = \"hunter2-secret\"\n", 3, "heartbeat_ms"),
            ("jwt_secret = hunter2-secret\n", 1, "jwt_secret"),
            (
                "jwt_secret = 'hunter2-secret'\nheartbeat_ms = 'hunter2-secret'\n",
                2,
                "heartbeat_ms",
            ),
        ];
        for (i, (text, line, key)) in cases.into_iter().enumerate() {
            let path = dir.join(format!("{i}.toml"));
            std::fs::write(&path, text).expect("write");
            let shown = read_file::<File>(&path).expect_err("invalid").to_string();
            assert!(
                !shown.contains("hunter2"),
                "case {i} shows the secret: {shown}"
            );
            assert!(shown.contains(&format!("line {line}")), "case {i}: {shown}");
            assert!(shown.contains(&format!("`{key}`")), "case {i}: {shown}");
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn lists_split_on_commas() {
        assert_eq!(split_list(" a, b,,c "), vec!["a", "b", "c"]);
        assert!(split_list("").is_empty());
    }
}
