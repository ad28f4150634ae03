//! The graceful stop (DESIGN.md §2, "Graceful drain"): every client is closed with 1012 and a
//! reconnect delay, the closes spread over the drain window so the fleet is not hit by every
//! client at once; then the last ack positions are written and the edge leaves the registry.
//!
//! One task walks the schedule ([`schedule`]): the closes are due in order, so it sleeps to
//! the next one and closes it, whatever the number of connections.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::hub::CloseReason;
use crate::registry;
use crate::state::EdgeState;

/// When to close the `i`th of `n` connections (ms after the drain starts) and the delay it is
/// told to wait before it reconnects: closes evenly spaced over `window_ms`, each hint the
/// rest of the window plus up to a quarter of it of jitter, so that the reconnects land
/// after this edge is gone and spread as widely as the closes.
pub fn schedule(n: usize, window_ms: u64, rng: &mut impl Rng) -> Vec<(u64, u64)> {
    let spread = n.max(1) as u64;
    (0..n as u64)
        .map(|i| {
            let at = window_ms * i / spread;
            let hint = window_ms.saturating_sub(at) + rng.gen_range(0..=window_ms / 4 + 1);
            (at, hint)
        })
        .collect()
}

/// Closes every client with 1012 on the schedule, waits for the sessions, writes the last
/// ack positions and leaves the registry.
pub async fn run(state: &Arc<EdgeState>, sessions: &TaskTracker) {
    let config = &state.config;
    let conns = state.hub.conns();
    let users = state.hub.users();
    tracing::info!(connections = conns.len(), "draining");
    let window = config.drain_window.as_millis() as u64;
    let plan = schedule(conns.len(), window, &mut rand::thread_rng());
    let started = Instant::now();
    let closes = async move {
        for (conn, (at, hint)) in conns.iter().zip(plan) {
            tokio::time::sleep_until(started + Duration::from_millis(at)).await;
            conn.request_close(CloseReason::Draining(hint));
        }
    };
    sessions.close();
    let grace_left = config
        .shutdown_grace
        .saturating_sub(config.drain_window)
        .max(Duration::from_millis(500));
    // The closes go on while the sessions end; the wait ends when all have, or at its bound.
    let _ = tokio::time::timeout(config.drain_window + grace_left / 2, async {
        tokio::join!(closes, sessions.wait())
    })
    .await;
    state
        .acks
        .flush(&state.conn, config.redis.command_timeout)
        .await;
    registry::leave(
        &state.conn,
        &config.edge_id,
        config.redis.command_timeout,
        &users,
    )
    .await;
    tracing::info!("drained");
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn closes_spread_over_the_window_in_order_and_hints_outlast_it() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let plan = schedule(1000, 5000, &mut rng);
        assert_eq!(plan.len(), 1000);
        assert_eq!(plan[0].0, 0);
        assert!(plan.windows(2).all(|w| w[0].0 <= w[1].0), "in order");
        assert!(plan.iter().all(|&(at, _)| at < 5000), "within the window");
        for &(at, hint) in &plan {
            assert!(
                at + hint >= 5000,
                "reconnects after the window: {at} + {hint}"
            );
            assert!(
                at + hint <= 5000 + 5000 / 4 + 1,
                "jitter bounded: {at} + {hint}"
            );
        }
        assert!(schedule(0, 5000, &mut rng).is_empty());
        // A window of 0 closes everyone at once, still with a hint.
        assert!(
            schedule(3, 0, &mut rng)
                .iter()
                .all(|&(at, h)| at == 0 && h <= 1)
        );
    }
}
