//! Redis connection setup (single node) and the timeout every Redis call goes through.
//!
//! One multiplexed [`ConnectionManager`] per process serves every request: it pipelines
//! concurrent commands over one socket and reconnects in the background after a failure.
//! Every call is bounded by the configured command timeout, so a dead Redis turns into a
//! prompt [`StoreError::Unavailable`] rather than a hung request.

use std::future::Future;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::config::RedisConfig;

/// A Redis operation that failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// Redis could not be reached or did not answer in time; retrying later may work.
    #[error("redis unavailable: {0}")]
    Unavailable(String),
    /// Redis answered with an error, or with something we cannot read.
    #[error("redis error: {0}")]
    Redis(String),
}

impl StoreError {
    /// Classifies a redis-rs error.
    pub fn from_redis(e: redis::RedisError) -> Self {
        if e.is_io_error()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_timeout()
            || e.is_unrecoverable_error()
            || matches!(
                e.kind(),
                redis::ErrorKind::Server(
                    redis::ServerErrorKind::BusyLoading
                        | redis::ServerErrorKind::TryAgain
                        | redis::ServerErrorKind::MasterDown
                        | redis::ServerErrorKind::ClusterDown
                        | redis::ServerErrorKind::ReadOnly
                )
            )
            // Out of memory: writes fail until memory is freed; retrying later can work.
            || e.code() == Some("OOM")
        {
            StoreError::Unavailable(e.to_string())
        } else {
            StoreError::Redis(e.to_string())
        }
    }

    /// True when retrying later may succeed.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// Opens the process's Redis connection. Fails if Redis cannot be reached now.
pub async fn connect(config: &RedisConfig) -> Result<ConnectionManager, StoreError> {
    let client = redis::Client::open(config.url.as_str()).map_err(StoreError::from_redis)?;
    let manager_config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(config.connect_timeout))
        .set_response_timeout(Some(config.command_timeout))
        // Few, quick reconnect attempts per failure: a caller waiting on a reconnect is a
        // request waiting, and the next call starts a new attempt anyway.
        .set_number_of_retries(2)
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_millis(500));
    with_timeout(
        config.connect_timeout + config.command_timeout,
        ConnectionManager::new_with_config(client, manager_config),
    )
    .await
}

/// Runs one Redis call, bounded by `timeout`.
pub async fn with_timeout<T>(
    timeout: Duration,
    fut: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(result) => result.map_err(StoreError::from_redis),
        Err(_) => Err(StoreError::Unavailable(format!(
            "no answer within {} ms",
            timeout.as_millis()
        ))),
    }
}
