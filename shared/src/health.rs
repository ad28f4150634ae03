//! Whether Redis answers, as one server sees it: a probe every [`PROBE_EVERY`] reads the
//! schema (on every primary of a cluster, [`schema::check`]), sets the `gapless_redis_up`
//! gauge, and writes one `warn` line when an outage starts and one `info` line when it ends,
//! however many requests fail in between (those log at `debug`).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::schema;
use crate::store::Store;

/// Time between two probes.
pub const PROBE_EVERY: Duration = Duration::from_secs(2);

/// The probe's latest finding, shared with whoever reports it (readiness, status page).
#[derive(Debug)]
pub struct RedisHealth {
    /// The last probe succeeded (starts true: the server checked Redis before it started).
    up: AtomicBool,
    /// When the current state began, ms since the Unix epoch.
    since_ms: AtomicU64,
    /// How long the last successful probe took, µs.
    latency_us: AtomicU64,
    /// Why the last probe failed, while down.
    error: Mutex<Option<String>>,
}

/// A copy of [`RedisHealth`] at one moment.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HealthSnapshot {
    /// The last probe succeeded.
    pub up: bool,
    /// When the current state began, ms since the Unix epoch.
    pub since_ms: u64,
    /// How long the last successful probe took, µs.
    pub latency_us: u64,
    /// Why the last probe failed, while down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Default for RedisHealth {
    fn default() -> Self {
        Self {
            up: AtomicBool::new(true),
            since_ms: AtomicU64::new(crate::now_ms()),
            latency_us: AtomicU64::new(0),
            error: Mutex::new(None),
        }
    }
}

impl RedisHealth {
    /// The latest finding.
    pub fn snapshot(&self) -> HealthSnapshot {
        HealthSnapshot {
            up: self.up.load(Ordering::Acquire),
            since_ms: self.since_ms.load(Ordering::Acquire),
            latency_us: self.latency_us.load(Ordering::Relaxed),
            error: self.error.lock().map_or(None, |e| e.clone()),
        }
    }

    /// Records one probe's outcome; logs when the state changes, and only then.
    fn record(&self, outcome: Result<Duration, String>) {
        let now = crate::now_ms();
        match outcome {
            Ok(took) => {
                self.latency_us
                    .store(took.as_micros() as u64, Ordering::Relaxed);
                if let Ok(mut e) = self.error.lock() {
                    *e = None;
                }
                if !self.up.swap(true, Ordering::AcqRel) {
                    let began = self.since_ms.swap(now, Ordering::AcqRel);
                    tracing::info!(
                        down_for_ms = now.saturating_sub(began),
                        "Redis serves requests again; the outage is over"
                    );
                }
                metrics::gauge!("gapless_redis_up").set(1.0);
            }
            Err(error) => {
                if self.up.swap(false, Ordering::AcqRel) {
                    self.since_ms.store(now, Ordering::Release);
                    tracing::warn!(
                        error = %error,
                        "Redis cannot serve requests; those that need it fail until it can \
                         (logged once per outage; a line says when it ends)"
                    );
                }
                if let Ok(mut e) = self.error.lock() {
                    *e = Some(error);
                }
                metrics::gauge!("gapless_redis_up").set(0.0);
            }
        }
    }
}

/// Logs a failed Redis call of a background task (registry, acks, sweep, subscription):
/// at `debug` when Redis is out (`outage`), since the probe's one `warn` line tells of the
/// outage and a retry every period would repeat it; at `warn` otherwise.
pub fn log_failure(outage: bool, error: &dyn std::fmt::Display, what: &str) {
    if outage {
        tracing::debug!(error = %error, "{what}");
    } else {
        tracing::warn!(error = %error, "{what}");
    }
}

/// Probes `store` every [`PROBE_EVERY`], each bounded by `timeout`, until `shutdown`.
pub async fn probe(
    mut store: Store,
    timeout: Duration,
    health: std::sync::Arc<RedisHealth>,
    shutdown: CancellationToken,
) {
    metrics::gauge!("gapless_redis_up").set(1.0);
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let started = Instant::now();
        let outcome = match tokio::time::timeout(timeout, schema::check(&mut store, timeout)).await
        {
            Ok(Ok(_)) => Ok(started.elapsed()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
        };
        metrics::histogram!("gapless_redis_duration_seconds", "op" => "probe")
            .record(started.elapsed().as_secs_f64());
        health.record(outcome);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_is_one_state_change_each_way_and_keeps_its_reason() {
        let h = RedisHealth::default();
        assert!(h.snapshot().up);
        h.record(Err("connection refused".into()));
        let down = h.snapshot();
        assert!(!down.up);
        assert_eq!(down.error.as_deref(), Some("connection refused"));
        h.record(Err("connection refused".into()));
        assert_eq!(
            h.snapshot().since_ms,
            down.since_ms,
            "still the same outage"
        );
        h.record(Ok(Duration::from_micros(250)));
        let up = h.snapshot();
        assert!(up.up);
        assert_eq!(up.latency_us, 250);
        assert_eq!(up.error, None);
    }
}
