//! What the edge says about itself: one `info` line per interval of how many devices are
//! connected and how many came and went, by transport ([`run`]; each connect and disconnect
//! is a `debug` line of its own, in [`crate::delivery`]; nothing is written for an interval
//! in which nothing changed), and a status in Redis every second for the ingest's status
//! page ([`publish`], see [`gapless_shared::status`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use gapless_shared::keys;
use gapless_shared::status::{self, Connections, EdgeStatus};
use tokio_util::sync::CancellationToken;

use crate::hub::Kind;
use crate::state::EdgeState;

/// Time between two lines.
pub const EVERY: Duration = Duration::from_secs(60);

/// Writes the line every `every` until `shutdown`.
pub async fn run(state: Arc<EdgeState>, every: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut last = ([0u64; 3], [0u64; 3]);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let read = |counters: &[std::sync::atomic::AtomicU64; 3]| {
            [0, 1, 2].map(|i| counters[i].load(Ordering::Relaxed))
        };
        let now = (read(&state.tally.opened), read(&state.tally.ended));
        if now == last {
            continue;
        }
        let counts = state.hub.len_by_kind();
        let per = |kind: Kind| {
            let i = kind.index();
            format!(
                "{} {} (+{} -{})",
                kind.label(),
                counts[i],
                now.0[i] - last.0[i],
                now.1[i] - last.1[i]
            )
        };
        tracing::info!(
            connections = counts.iter().sum::<usize>(),
            interval_s = every.as_secs(),
            "devices connected: {}, {}, {} (sessions opened and ended in the interval)",
            per(Kind::WebSocket),
            per(Kind::Sse),
            per(Kind::Poll),
        );
        last = now;
    }
}

/// Open sessions by transport: opened minus ended.
fn open_sessions(state: &EdgeState) -> Connections {
    let open = |kind: Kind| {
        let i = kind.index();
        state.tally.opened[i]
            .load(Ordering::Relaxed)
            .saturating_sub(state.tally.ended[i].load(Ordering::Relaxed))
    };
    Connections {
        websocket: open(Kind::WebSocket),
        sse: open(Kind::Sse),
        poll: open(Kind::Poll),
    }
}

/// Writes this edge's [`EdgeStatus`] every [`status::REPORT_EVERY`] until `shutdown`
/// (which comes after the drain, so the drain is reported). A failed write is skipped: the
/// next one replaces it, and the page shows the report's age.
pub async fn publish(state: Arc<EdgeState>, shutdown: CancellationToken) {
    let started = gapless_shared::now_ms();
    let mut tick = tokio::time::interval(status::REPORT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = (
        std::time::Instant::now(),
        state.tally.delivered.load(Ordering::Relaxed),
        state.tally.latency.snapshot(),
    );
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let now = (
            std::time::Instant::now(),
            state.tally.delivered.load(Ordering::Relaxed),
            state.tally.latency.snapshot(),
        );
        let secs = now.0.duration_since(last.0).as_secs_f64().max(0.001);
        let report = EdgeStatus {
            edge: state.config.edge_id.clone(),
            at: gapless_shared::now_ms(),
            started,
            draining: state.draining.load(Ordering::Relaxed),
            connections: open_sessions(&state),
            delivered_per_s: now.1.saturating_sub(last.1) as f64 / secs,
            p99_ms: status::p99_ms(&last.2, &now.2),
            lease_ms: state.config.lease.as_millis() as u64,
        };
        last = now;
        let Ok(json) = serde_json::to_string(&report) else {
            continue;
        };
        let key = keys::edge_status(&state.config.edge_id);
        let mut set = redis::cmd("SET");
        set.arg(&key).arg(json).arg("PX").arg(status::REPORT_TTL_MS);
        let mut add = redis::cmd("ZADD");
        add.arg(keys::EDGES)
            .arg(report.at)
            .arg(&state.config.edge_id);
        let cmds = vec![
            (state.conn.shard_of_key(&key), set),
            (state.conn.shard_of_key(keys::EDGES), add),
        ];
        if let Err(e) = state
            .conn
            .run_per_shard(cmds, state.config.redis.command_timeout)
            .await
        {
            gapless_shared::health::log_failure(
                e.is_unavailable(),
                &e,
                "status report not written",
            );
        }
    }
}
