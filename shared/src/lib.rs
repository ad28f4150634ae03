//! gapless-shared: what every gapless service agrees on.
//!
//! In the order a notification flows (DESIGN.md §1):
//! - [`ids`]: validated user ids and idempotency keys, checked before Redis sees them;
//! - [`api`]: the ingest's HTTP request and answer types, for the ingest and its producers;
//! - [`batch`]: the postcard batch body producers may send to the ingest;
//! - [`keys`]: every Redis key and channel name;
//! - [`schema`]: the Redis Function library of `migrations/` and its version;
//! - [`store`]: the Redis connection and the timeout around every call;
//! - [`health`]: the periodic Redis probe, its gauge and its once-per-outage log lines;
//! - [`wakeup`]: the ingest -> edge wakeup message;
//! - [`presence`]: the connections and ack positions edges record for producers to read;
//! - [`status`]: what each edge reports about itself for the ingest's status page;
//! - [`token`]: the claims of device tokens and HS256 minting (the edge verifies);
//! - [`protocol`]: the edge <-> client WebSocket messages and their codecs;
//! - [`listener`]: the servers' accept side: connection budgets, timeouts, accept back-off;
//! - [`rate`]: rate limits per API key, source address or user, and the failed-auth box;
//! - [`config`]: masked secrets, Redis settings, the TOML file layer;
//! - [`runtime`]: the async runtime and its thread count;
//! - [`telemetry`]: the process's Prometheus recorder, logging, request ids;
//! - [`shutdown`]: SIGINT and SIGTERM cancel the process's shutdown token;
//! - [`process`]: a local `redis-server` (for `gapless dev` and tests);
//! - `testing` (feature `testing`): the Redis test harness.
#![forbid(unsafe_code)]

pub mod api;
pub mod batch;
pub mod config;
pub mod health;
pub mod ids;
pub mod keys;
pub mod listener;
pub mod presence;
pub mod process;
pub mod protocol;
pub mod rate;
pub mod runtime;
pub mod schema;
pub mod shutdown;
pub mod status;
pub mod store;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
pub mod token;
pub mod wakeup;

/// Milliseconds on tokio's monotonic clock since the process first asked: immune to wall
/// clock jumps, and virtual under paused time in tests (heartbeats, listener deadlines).
pub fn monotonic_ms() -> u64 {
    static BASE: std::sync::OnceLock<tokio::time::Instant> = std::sync::OnceLock::new();
    BASE.get_or_init(tokio::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
