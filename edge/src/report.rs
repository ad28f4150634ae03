//! One `info` line per interval that says how many devices are connected and how many came
//! and went, by transport; each connect and disconnect is a `debug` line of its own
//! ([`crate::delivery`]). Nothing is written for an interval in which nothing changed.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

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
