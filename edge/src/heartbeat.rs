//! Heartbeats (DESIGN.md §5): one task for all connections pings each every interval and drops
//! those silent for two intervals. No timer per connection, and no burst either: the task
//! turns a wheel of the hub's shards, one shard per 1/64 of the interval, so 100,000
//! connections are pinged as a steady trickle rather than all in the same millisecond.

use std::sync::Arc;
use std::time::Duration;

use gapless_shared::protocol::ServerMessage;
use tokio_util::sync::CancellationToken;

use crate::hub::{CloseReason, Hub};

/// What to do with a connection last heard from at `last_seen_ms`.
#[derive(Debug, PartialEq, Eq)]
pub enum Beat {
    /// Send a ping.
    Ping,
    /// Silent for two intervals: drop it.
    Drop,
}

/// The decision for one connection at `now_ms`.
pub fn beat(now_ms: u64, last_seen_ms: u64, interval: Duration) -> Beat {
    if now_ms.saturating_sub(last_seen_ms) >= 2 * interval.as_millis() as u64 {
        Beat::Drop
    } else {
        Beat::Ping
    }
}

/// Pings and checks every connection each `interval` until `shutdown`, one shard of the hub
/// per tick.
pub async fn run(hub: Arc<Hub>, interval: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(interval / Hub::SHARDS as u32);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut slot = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        slot = (slot + 1) % Hub::SHARDS;
        if slot == 0 {
            metrics::gauge!("gapless_edge_connections").set(hub.len() as f64);
        }
        let now = crate::hub::monotonic_ms();
        for conn in hub.shard_conns(slot) {
            let last_seen = conn.last_seen.load(std::sync::atomic::Ordering::Relaxed);
            match beat(now, last_seen, interval) {
                Beat::Drop => conn.request_close(CloseReason::HeartbeatTimeout),
                // A full queue means frames are already flowing to the client; skip the ping.
                Beat::Ping => {
                    if let Some(outbound) = conn.outbound.upgrade() {
                        let _ = outbound.try_send(conn.codec.encode(&ServerMessage::Ping));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::Codec;
    use crate::hub::Conn;
    use gapless_shared::ids::UserId;

    #[test]
    fn silence_of_two_intervals_drops() {
        let interval = Duration::from_secs(30);
        assert_eq!(beat(1_000, 1_000, interval), Beat::Ping);
        assert_eq!(beat(60_999, 1_000, interval), Beat::Ping);
        assert_eq!(beat(61_000, 1_000, interval), Beat::Drop);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_silent_for_two_intervals_is_dropped_and_a_talking_one_is_pinged() {
        let interval = Duration::from_secs(30);
        let hub = Arc::new(Hub::new());
        let conn = |name: &str| {
            let (tx, rx) = tokio::sync::mpsc::channel(8);
            let user = UserId::parse(name).expect("valid");
            let conn = Conn::new(hub.next_id(), user, "d".into(), Codec::Json, tx.downgrade());
            (Arc::new(conn), rx, tx)
        };
        let (silent, _silent_rx, _silent_tx) = conn("silent");
        let (talking, mut talking_rx, _talking_tx) = conn("talking");
        hub.add(silent.clone());
        hub.add(talking.clone());
        let shutdown = CancellationToken::new();
        tokio::spawn(run(hub.clone(), interval, shutdown.clone()));

        for _ in 0..7 {
            tokio::time::sleep(Duration::from_secs(13)).await;
            talking.touch();
        }
        // 91 s of virtual time: the silent client passed two intervals and its shard's turn
        // came after that (each shard is visited once per interval); the other talked.
        assert_eq!(
            silent.close_requested(),
            Some(CloseReason::HeartbeatTimeout)
        );
        assert_eq!(talking.close_requested(), None);
        let mut pings = 0;
        while let Ok(msg) = talking_rx.try_recv() {
            assert_eq!(msg, Codec::Json.encode(&ServerMessage::Ping));
            pings += 1;
        }
        // Three intervals and a bit: three pings, or four if the talking connection's shard
        // comes early in the wheel.
        assert!((3..=4).contains(&pings), "one ping per interval: {pings}");
        shutdown.cancel();
    }
}
