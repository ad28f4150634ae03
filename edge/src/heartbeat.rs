//! Heartbeats (DESIGN.md §5, §5.1): one task for all connections makes sure each client hears
//! something at least every interval, and drops those silent for two intervals (WebSocket
//! clients only: SSE and poll clients never send on their connection, so only a failed write
//! shows them gone). A connection
//! that was written to and heard from recently needs no ping: its notifications and acks
//! already show both sides alive. No timer per connection, and no burst either: the task
//! turns a wheel of the hub's shards, one shard per tick, so 100,000 connections are visited
//! as a steady trickle rather than all in the same millisecond.
//!
//! Each connection is visited [`VISITS`] times per interval and pinged when nothing was
//! written to it, or nothing heard from it, for [`VISITS`]` - 1` of those slices: so the
//! client never waits more than one interval for a frame, and a client that only listens
//! is still asked to answer. At 100,000 connections and 10,000 notifications/s (one per
//! connection every 10 s) pinging every connection every interval was a fifth of a core
//! of edge and client work (BENCHMARKS.md); now only the quiet ones are pinged.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use gapless_shared::protocol::ServerMessage;
use tokio_util::sync::CancellationToken;

use crate::hub::{CloseReason, Hub, Kind, Out};

/// Visits of each connection per interval.
pub const VISITS: u32 = 8;

/// What to do with a connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Beat {
    /// Nothing: frames went both ways recently.
    Quiet,
    /// Send a ping.
    Ping,
    /// Silent for two intervals: drop it.
    Drop,
}

/// The decision at `now_ms` for a connection last heard from at `last_seen_ms` and last
/// written to at `last_sent_ms`; `listens_back` says the client answers on the connection
/// (see [`Kind::listens_back`]).
pub fn beat(
    now_ms: u64,
    last_seen_ms: u64,
    last_sent_ms: u64,
    interval: Duration,
    listens_back: bool,
) -> Beat {
    let interval = interval.as_millis() as u64;
    let heard = now_ms.saturating_sub(last_seen_ms);
    let told = now_ms.saturating_sub(last_sent_ms);
    // The next visit comes one slice later: pinging once a gap reaches all slices but one
    // keeps every gap the client sees within one interval.
    let due = interval - interval / u64::from(VISITS);
    if !listens_back {
        return if told >= due { Beat::Ping } else { Beat::Quiet };
    }
    if heard >= 2 * interval {
        Beat::Drop
    } else if heard >= due || told >= due {
        Beat::Ping
    } else {
        Beat::Quiet
    }
}

/// Visits every connection [`VISITS`] times per `interval` until `shutdown`, one shard of
/// the hub per tick: pings the quiet ones, drops the silent ones.
pub async fn run(hub: Arc<Hub>, interval: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(interval / (Hub::SHARDS as u32 * VISITS));
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
            let counts = hub.len_by_kind();
            metrics::gauge!("gapless_edge_connections").set(counts.iter().sum::<usize>() as f64);
            for kind in Kind::ALL {
                metrics::gauge!("gapless_edge_transport_connections", "transport" => kind.label())
                    .set(counts[kind.index()] as f64);
            }
        }
        let now = crate::hub::monotonic_ms();
        for conn in hub.shard_conns(slot) {
            let last_seen = conn.last_seen.load(Ordering::Relaxed);
            let last_sent = conn.last_sent.load(Ordering::Relaxed);
            // A held poll answers within its wait, below the interval: nothing to do.
            if conn.kind == Kind::Poll {
                continue;
            }
            match beat(
                now,
                last_seen,
                last_sent,
                interval,
                conn.kind.listens_back(),
            ) {
                Beat::Quiet => {}
                Beat::Drop => conn.request_close(CloseReason::HeartbeatTimeout),
                // A full queue means frames are already flowing to the client; skip the ping.
                Beat::Ping => {
                    if let Some(outbound) = conn.outbound.upgrade()
                        && outbound.try_send(Out::message(ServerMessage::Ping)).is_ok()
                    {
                        // Counts as sent now: the writer sends it within the slow-consumer
                        // bound or the connection is closed, and marks the time again then.
                        conn.mark_sent();
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::Conn;
    use gapless_shared::ids::UserId;

    #[test]
    fn quiet_connections_are_pinged_and_silent_ones_dropped() {
        let interval = Duration::from_secs(30);
        // Due after 7/8 of the interval (26.25 s) without a frame either way.
        assert_eq!(beat(1_000, 1_000, 1_000, interval, true), Beat::Quiet);
        assert_eq!(beat(27_249, 1_000, 1_000, interval, true), Beat::Quiet);
        assert_eq!(
            beat(27_250, 20_000, 1_000, interval, true),
            Beat::Ping,
            "nothing sent"
        );
        assert_eq!(
            beat(27_250, 1_000, 20_000, interval, true),
            Beat::Ping,
            "nothing heard"
        );
        assert_eq!(beat(60_999, 1_000, 60_000, interval, true), Beat::Ping);
        assert_eq!(beat(61_000, 1_000, 60_000, interval, true), Beat::Drop);
    }

    #[test]
    fn listen_only_clients_are_pinged_when_quiet_and_never_dropped_for_silence() {
        let interval = Duration::from_secs(30);
        // An SSE client never sends on its stream: only what was written to it counts.
        assert_eq!(beat(27_250, 1_000, 20_000, interval, false), Beat::Quiet);
        assert_eq!(beat(27_250, 1_000, 1_000, interval, false), Beat::Ping);
        assert_eq!(beat(600_000, 1_000, 599_000, interval, false), Beat::Quiet);
    }

    fn conn(
        hub: &Hub,
        name: &str,
    ) -> (
        Arc<Conn>,
        tokio::sync::mpsc::Receiver<Out>,
        tokio::sync::mpsc::Sender<Out>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let user = UserId::parse(name).expect("valid");
        let conn = Arc::new(Conn::new(
            hub.next_id(),
            user,
            "d".into(),
            Kind::WebSocket,
            tx.downgrade(),
        ));
        hub.add(conn.clone());
        (conn, rx, tx)
    }

    fn pings(rx: &mut tokio::sync::mpsc::Receiver<Out>) -> usize {
        let mut pings = 0;
        while let Ok(msg) = rx.try_recv() {
            assert_eq!(msg, Out::message(ServerMessage::Ping));
            pings += 1;
        }
        pings
    }

    #[tokio::test(start_paused = true)]
    async fn only_quiet_connections_are_pinged_and_silent_ones_are_dropped() {
        let interval = Duration::from_secs(30);
        let hub = Arc::new(Hub::new());
        let (silent, _silent_rx, _silent_tx) = conn(&hub, "silent");
        let (listening, mut listening_rx, _listening_tx) = conn(&hub, "listening");
        let (talking, mut talking_rx, _talking_tx) = conn(&hub, "talking");
        let (busy, mut busy_rx, _busy_tx) = conn(&hub, "busy");
        let shutdown = CancellationToken::new();
        tokio::spawn(run(hub.clone(), interval, shutdown.clone()));

        for _ in 0..7 {
            tokio::time::sleep(Duration::from_secs(13)).await;
            // Frames to the client and acks back, as with a notification every 13 s.
            busy.mark_sent();
            busy.touch();
            // Only answers; is sent nothing but pings.
            talking.touch();
            // Is sent frames but says nothing.
            listening.mark_sent();
        }
        // 91 s of virtual time: the silent client and the listening one (pinged, but nothing
        // answers here) passed two intervals unheard and their shards' turns came after
        // that; the others were heard from.
        assert_eq!(
            silent.close_requested(),
            Some(CloseReason::HeartbeatTimeout)
        );
        assert_eq!(
            listening.close_requested(),
            Some(CloseReason::HeartbeatTimeout)
        );
        assert_eq!(busy.close_requested(), None);
        assert_eq!(talking.close_requested(), None);
        assert_eq!(pings(&mut busy_rx), 0, "frames both ways: no ping needed");
        // Sent nothing for 26.25 s, then again 26.25 s after each ping: three in 91 s.
        let talking_pings = pings(&mut talking_rx);
        assert!((3..=4).contains(&talking_pings), "{talking_pings}");
        // Heard nothing: pinged, so that an answer could have kept it.
        assert!(pings(&mut listening_rx) >= 1);
        shutdown.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_never_waits_more_than_one_interval_for_a_frame() {
        let interval = Duration::from_secs(30);
        let step = Duration::from_millis(250);
        let hub = Arc::new(Hub::new());
        let (conn, mut rx, _tx) = conn(&hub, "u");
        let shutdown = CancellationToken::new();
        tokio::spawn(run(hub.clone(), interval, shutdown.clone()));

        // The last frame lands at every phase of the connection's visits; the next (a ping)
        // must follow within the interval.
        for phase in 0..(interval / VISITS).as_millis() as u64 / 250 {
            tokio::time::sleep(Duration::from_millis(250 * phase)).await;
            pings(&mut rx);
            conn.mark_sent();
            conn.touch();
            let sent = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(step).await;
                if pings(&mut rx) > 0 {
                    break;
                }
                assert!(
                    sent.elapsed() <= interval,
                    "no frame for {:?}",
                    sent.elapsed()
                );
            }
            assert!(sent.elapsed() <= interval + step);
        }
        shutdown.cancel();
    }
}
