//! What every handler of the ingest shares.

use std::sync::Arc;

use crate::append::Appender;
use crate::auth::Guard;
use crate::body::BodyBudget;
use crate::config::Limits;
use crate::status;

/// State shared by all handlers.
pub struct AppState {
    /// Appends and wakes.
    pub appender: Appender,
    /// Limits of requests.
    pub limits: Limits,
    /// Request body bytes all requests may hold at once.
    pub body_budget: BodyBudget,
    /// API keys and rate limits.
    pub guard: Arc<Guard>,
    /// Bound of one Redis call (for history and readiness).
    pub redis_timeout: std::time::Duration,
    /// What the periodic Redis probe found last.
    pub health: Arc<gapless_shared::health::RedisHealth>,
    /// Notifications appended, for the status page.
    pub appends: Arc<status::AppendRate>,
}
