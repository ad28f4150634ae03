//! gapless-ingest: the producer-facing HTTP API (DESIGN.md §4).
//!
//! The modules in the order a notification flows (DESIGN.md §1.1-1.2):
//! - [`api`]: the routes, and [`auth`] before them (API keys, rate limits);
//! - [`body`]: the request body read and decoded with the limits, into items;
//! - [`append`]: a request's items appended, step by step:
//!   - [`plan`]: grouped per user, packed into calls and transactions;
//!   - [`transaction`]: native `XADD`s in `WATCH`/`MULTI`/`EXEC`, for plain runs of items;
//!   - [`function`]: the `gapless_append` Function call and its reply, for the rest;
//!   - [`wake`]: one wakeup per live edge;
//! - [`error`]: the JSON error answers (the request and answer types are
//!   `gapless_shared::api`'s).
//!
//! Reading back: [`history`] (a user's log), [`devices`] (who is connected and how far each
//! device acknowledged), [`status`] (the live status page), [`openapi`] (the API's document).
//! [`state`] is what every handler shares, [`config`] the settings, [`page`] serves the HTML pages; [`demo`] is the browser demo page `gapless dev` turns on.
//! [`run`] serves it all until the shutdown token fires.
#![forbid(unsafe_code)]

pub mod api;
pub mod append;
pub mod auth;
pub mod body;
pub mod config;
pub mod demo;
pub mod devices;
pub mod error;
pub mod function;
pub mod history;
pub mod openapi;
pub mod page;
pub mod plan;
pub mod state;
pub mod status;
pub mod transaction;
pub mod wake;

use std::sync::Arc;

use gapless_shared::schema::{self, SchemaError};
use gapless_shared::store::{self, StoreError};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// Why the ingest could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Redis could not be reached at start-up.
    #[error("cannot connect to Redis: {0}")]
    Store(#[from] StoreError),
    /// Redis holds no schema or an older one.
    #[error(transparent)]
    Schema(#[from] SchemaError),
    /// Serving failed.
    #[error("server error: {0}")]
    Io(#[from] std::io::Error),
}

/// Dedicated Redis connections for the append's transactions (requests beyond wait).
const TRANSACTION_CONNECTIONS: usize = 16;

/// Serves the ingest API on `listener` until `shutdown` is cancelled, then lets in-flight
/// requests finish for at most the configured grace period.
///
/// Refuses to start when Redis is unreachable or holds an older schema.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let mut conn = store::connect(&config.redis).await?;
    let version = schema::check(&mut conn, config.redis.command_timeout).await?;
    let health = Arc::new(gapless_shared::health::RedisHealth::default());
    let probe = tokio::spawn(gapless_shared::health::probe(
        conn.clone(),
        config.redis.command_timeout,
        health.clone(),
        shutdown.clone(),
    ));
    let pool = transaction::Pool::new(
        config.redis.url(),
        config.redis.connect_timeout,
        config.redis.command_timeout,
        TRANSACTION_CONNECTIONS,
    )?;
    // The native path's transactions WATCH on dedicated connections to one node; on a
    // cluster every user goes through the Function, which a cluster routes by its keys.
    let native_min_items = match conn {
        store::Store::Cluster(_) => usize::MAX,
        store::Store::Single(_) => config.native_min_items,
    };
    let appender = append::Appender::new(
        conn,
        pool,
        config.redis.command_timeout,
        config.retention,
        config.wakeup_payload_max,
        native_min_items,
    )
    .with_min_replicas(config.min_replicas_ack);
    let state = Arc::new(state::AppState {
        appender,
        limits: config.limits,
        body_budget: body::BodyBudget::new(config.limits.inflight_body_bytes),
        guard: Arc::new(auth::Guard::new(config.api_keys.clone(), config.rates)),
        redis_timeout: config.redis.command_timeout,
        health,
        appends: Arc::default(),
    });
    // Install the recorder before the first request, so none goes uncounted.
    gapless_shared::telemetry::prometheus();
    zero_counters();
    let router = api::router(state.clone(), &config);
    let upkeep = tokio::spawn(gapless_shared::telemetry::upkeep(shutdown.clone()));
    let forget = tokio::spawn(auth::forget_idle_loop(
        state.guard.clone(),
        shutdown.clone(),
    ));
    let sampler = tokio::spawn(status::sample_loop(state.appends.clone(), shutdown.clone()));
    tracing::info!(addr = %listener.local_addr()?, schema = version, "ingest listening");

    let serve = gapless_shared::listener::serve(
        listener,
        router,
        config.listener.clone(),
        shutdown.clone(),
    );
    let grace = config.shutdown_grace;
    let result = tokio::select! {
        result = serve => result.map_err(RunError::Io),
        () = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(grace_ms = grace.as_millis() as u64, "requests still running after the grace period; stopping");
            Ok(())
        }
    };
    upkeep.abort();
    forget.abort();
    probe.abort();
    sampler.abort();
    result
}

/// Registers every counter of the ingest at zero under each label it can carry, so alerts
/// and dashboards see 0 before the first event (see
/// [`gapless_shared::telemetry::zero_counter`]).
fn zero_counters() {
    use gapless_shared::telemetry::zero_counter;
    for result in ["appended", "duplicate", "rejected"] {
        zero_counter("gapless_ingest_items_total", &[("result", result)]);
    }
    for op in ["append", "append_call", "append_user", "publish"] {
        zero_counter("gapless_redis_errors_total", &[("op", op)]);
    }
    for reason in ["unauthorized", "forbidden", "too_many_auth_failures"] {
        zero_counter("gapless_ingest_auth_failures_total", &[("reason", reason)]);
    }
    for limit in ["request", "items"] {
        zero_counter("gapless_ingest_rate_limited_total", &[("limit", limit)]);
    }
    // A first 5xx of a route is then a rise from 0, which `rate()` sees.
    for route in [
        "/v1/notifications",
        "/v1/notifications/batch",
        "/v1/users/{user}/notifications",
        "/v1/users/{user}/presence",
        "/v1/users/{user}/devices",
        "/v1/status",
    ] {
        for status in ["500", "503"] {
            zero_counter(
                "gapless_ingest_requests_total",
                &[("route", route), ("status", status)],
            );
        }
    }
    for name in [
        "gapless_ingest_body_budget_refusals_total",
        "gapless_ingest_append_conflicts_total",
        "gapless_ingest_not_replicated_total",
        "gapless_ingest_wakeups_total",
    ] {
        zero_counter(name, &[]);
    }
}
