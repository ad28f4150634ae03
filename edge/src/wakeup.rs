//! Wakeups in (DESIGN.md §1.2–1.3): the edge subscribes to its own channel, turns each wakeup
//! into hints for the sessions of the named users, and sweeps for entries whose wakeup was
//! lost: right after every (re)subscription and every sweep interval.
//!
//! Wakeups are hints; the sweep is what makes a lost one harmless.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use gapless_shared::ids::UserId;
use gapless_shared::keys;
use gapless_shared::store::{Store, StoreError};
use gapless_shared::wakeup::{WakeItem, Wakeup};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::hub::Hub;

/// Users per sweep pipeline.
const SWEEP_CHUNK: usize = 500;

/// Delivers one wakeup message's items to the local sessions as hints.
pub fn dispatch(hub: &Hub, bytes: &[u8]) {
    let wakeup = match Wakeup::decode(bytes) {
        Ok(w) => w,
        Err(e) => {
            metrics::counter!("gapless_edge_wakeups_total", "result" => "undecodable").increment(1);
            tracing::warn!(error = %e, "undecodable wakeup ignored; the sweep covers it");
            return;
        }
    };
    metrics::counter!("gapless_edge_wakeups_total", "result" => "ok").increment(1);
    for item in wakeup.into_items() {
        let Ok(user) = UserId::parse(&item.user) else {
            continue;
        };
        // Usually one connection per user: it gets the item itself, not a copy.
        let conns = hub.conns_of(&user);
        if let Some((last, others)) = conns.split_last() {
            for conn in others {
                conn.hint(item.clone());
            }
            last.hint(item);
        }
    }
}

/// How one subscription attempt ended.
enum Ended {
    /// It was up, then lost.
    Lost,
    /// It never came up.
    Failed,
    /// The edge is stopping.
    Stop,
}

/// The wait before the next attempt after a subscription was up.
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// The longest wait between attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// The wait between subscription attempts: [`FIRST_BACKOFF`] after a subscription that was
/// up, doubled after each attempt that failed.
struct Backoff(Duration);

impl Backoff {
    /// Waits after an attempt that `ended` so; false when the edge is stopping.
    async fn wait(&mut self, ended: Ended, channel: &str, shutdown: &CancellationToken) -> bool {
        match ended {
            Ended::Stop => return false,
            Ended::Lost => {
                tracing::warn!(%channel, "wakeup subscription lost; resubscribing");
                self.0 = FIRST_BACKOFF;
            }
            Ended::Failed => {}
        }
        tokio::select! {
            () = tokio::time::sleep(self.0) => {}
            () = shutdown.cancelled() => return false,
        }
        self.0 = (self.0 * 2).min(MAX_BACKOFF);
        true
    }
}

/// A subscription is up: counted, and a sweep finds what was appended while none was.
fn subscribed(channel: &str, sweep_now: &Notify, how: &str) {
    tracing::info!(%channel, how, "subscribed to wakeups");
    metrics::counter!("gapless_edge_subscriptions_total").increment(1);
    sweep_now.notify_one();
}

/// Subscribes to this edge's wakeup channel and dispatches, resubscribing after any loss of
/// the subscription, each time through the next of `clients` (the seed nodes); every
/// (re)subscription triggers a sweep.
pub async fn subscribe(
    clients: Vec<redis::Client>,
    edge_id: String,
    hub: Arc<Hub>,
    sweep_now: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let channel = keys::wake_channel(&edge_id);
    let mut backoff = Backoff(FIRST_BACKOFF);
    for client in clients.iter().cycle() {
        let ended = subscribe_classic_once(client, &channel, &hub, &sweep_now, &shutdown).await;
        if !backoff.wait(ended, &channel, &shutdown).await {
            return;
        }
    }
}

/// One classic subscription through `client`, dispatching until it is lost.
async fn subscribe_classic_once(
    client: &redis::Client,
    channel: &str,
    hub: &Hub,
    sweep_now: &Notify,
    shutdown: &CancellationToken,
) -> Ended {
    let mut pubsub = match client.get_async_pubsub().await {
        Ok(pubsub) => pubsub,
        Err(e) => {
            return failed(&e, "cannot open the wakeup connection");
        }
    };
    if let Err(e) = pubsub.subscribe(channel).await {
        return failed(&e, "cannot subscribe to wakeups");
    }
    subscribed(channel, sweep_now, "classic");
    let mut messages = pubsub.on_message();
    loop {
        tokio::select! {
            msg = messages.next() => match msg {
                Some(msg) => dispatch(hub, msg.get_payload_bytes()),
                None => return Ended::Lost,
            },
            () = shutdown.cancelled() => return Ended::Stop,
        }
    }
}

/// A subscription that could not be made: logged (once per outage when Redis is away).
fn failed(e: &redis::RedisError, what: &str) -> Ended {
    gapless_shared::health::log_failure(StoreError::is_outage(e), e, what);
    Ended::Failed
}

/// Pushes a sharded subscription may hold before it drops them (and sweeps instead).
const PUSH_QUEUE: usize = 4096;

/// On a Redis Cluster: subscribes to this edge's channel with sharded pub/sub (`SSUBSCRIBE`,
/// so a wakeup travels to the one shard that owns the channel's slot) on a dedicated
/// connection, and dispatches. Redis pushes an unsolicited `sunsubscribe` when the slot
/// moves or its primary fails over, which redis-rs passes on and does not act on: this
/// resubscribes at the channel's new owner. When the node holding the subscription goes
/// away, it starts over from the seeds. Every (re)subscription, and every dropped push,
/// triggers a sweep, which covers the moments in between.
pub async fn subscribe_sharded(
    urls: Vec<String>,
    edge_id: String,
    hub: Arc<Hub>,
    sweep_now: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let channel = keys::wake_channel(&edge_id);
    let mut backoff = Backoff(FIRST_BACKOFF);
    loop {
        let ended = subscribe_sharded_once(&urls, &channel, &hub, &sweep_now, &shutdown).await;
        if !backoff.wait(ended, &channel, &shutdown).await {
            return;
        }
    }
}

/// One sharded subscription from the seeds `urls`, dispatching until it is lost.
async fn subscribe_sharded_once(
    urls: &[String],
    channel: &str,
    hub: &Hub,
    sweep_now: &Arc<Notify>,
    shutdown: &CancellationToken,
) -> Ended {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<redis::PushInfo>(PUSH_QUEUE);
    let overflow = sweep_now.clone();
    // Past the queue's bound a push is dropped and a sweep finds what it announced.
    let sender = move |push: redis::PushInfo| -> Result<(), ()> {
        if tx.try_send(push).is_err() {
            overflow.notify_one();
        }
        Ok(())
    };
    let client = redis::cluster::ClusterClientBuilder::new(urls.iter().map(String::as_str))
        .use_protocol(redis::ProtocolVersion::RESP3)
        .push_sender(sender)
        .build();
    let conn = match client {
        Ok(client) => client.get_async_connection().await,
        Err(e) => Err(e),
    };
    let mut conn = match conn {
        Ok(conn) => conn,
        Err(e) => {
            return failed(&e, "cannot open the wakeup connection");
        }
    };
    if let Err(e) = conn.ssubscribe(channel).await {
        return failed(&e, "cannot subscribe to wakeups");
    }
    subscribed(channel, sweep_now, "sharded");
    loop {
        let push = tokio::select! {
            push = rx.recv() => push,
            () = shutdown.cancelled() => return Ended::Stop,
        };
        let Some(push) = push else {
            return Ended::Lost;
        };
        match push.kind {
            redis::PushKind::SMessage => {
                if let Some(redis::Value::BulkString(payload)) = push.data.get(1) {
                    dispatch(hub, payload);
                }
            }
            redis::PushKind::SUnsubscribe => {
                tracing::info!(%channel, "the channel's slot moved; resubscribing at its new owner");
                metrics::counter!("gapless_edge_resubscriptions_total").increment(1);
                if let Err(e) = conn.ssubscribe(channel).await {
                    gapless_shared::health::log_failure(
                        StoreError::is_outage(&e),
                        &e,
                        "cannot resubscribe; reconnecting",
                    );
                    return Ended::Lost;
                }
                sweep_now.notify_one();
            }
            // The node holding the subscription went away (a failover, a restart):
            // redis-rs does not resubscribe elsewhere, so start over from the seeds; a
            // sweep finds what was published meanwhile.
            redis::PushKind::Disconnection => {
                sweep_now.notify_one();
                return Ended::Lost;
            }
            _ => {}
        }
    }
}

/// Sweeps every user once per `interval`, one shard of the hub per 1/64 of it (a steady
/// trickle of reads rather than one burst), and every user at once whenever `sweep_now` is
/// notified (after a (re)subscription), until `shutdown`.
pub async fn sweep_loop(
    conn: Store,
    hub: Arc<Hub>,
    interval: Duration,
    timeout: Duration,
    sweep_now: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval / Hub::SHARDS as u32);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut slot = 0;
    loop {
        let users = tokio::select! {
            _ = tick.tick() => {
                slot = (slot + 1) % Hub::SHARDS;
                hub.shard_users(slot)
            }
            () = sweep_now.notified() => hub.users(),
            () = shutdown.cancelled() => return,
        };
        sweep(&conn, &hub, &users, timeout).await;
    }
}

/// Reads the epoch and last seq of each of `users`' logs and hints each local session that
/// is behind it. One `HMGET` per user, pipelined.
pub async fn sweep(conn: &Store, hub: &Hub, users: &[UserId], timeout: Duration) {
    for chunk in users.chunks(SWEEP_CHUNK) {
        let cmds = chunk
            .iter()
            .map(|user| {
                let mut cmd = redis::cmd("HMGET");
                cmd.arg(keys::meta(user)).arg("epoch").arg("seq");
                (conn.shard_of(user), cmd)
            })
            .collect();
        let states = match conn.run_per_shard(cmds, timeout).await {
            Ok(s) => s,
            Err(e) => {
                metrics::counter!("gapless_redis_errors_total", "op" => "sweep").increment(1);
                gapless_shared::health::log_failure(
                    e.is_unavailable(),
                    &e,
                    "sweep failed; retrying next period",
                );
                return;
            }
        };
        for (user, state) in chunk.iter().zip(states) {
            let state: Option<(Option<String>, Option<u64>)> =
                state.ok().and_then(|v| redis::from_redis_value(v).ok());
            let Some((Some(epoch), Some(seq))) = state else {
                continue;
            };
            for conn in hub.conns_of(user) {
                if conn.is_behind(&epoch, seq) {
                    metrics::counter!("gapless_edge_sweep_catches_total").increment(1);
                    conn.hint(WakeItem {
                        user: user.as_str().to_owned(),
                        epoch: epoch.clone(),
                        seq,
                        ts: 0,
                        payload: None,
                    });
                }
            }
        }
    }
}
