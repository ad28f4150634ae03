//! Ack positions (DESIGN.md §1.4): sessions record each device's cumulative ack here; one task
//! writes them to `gl:{user}:a` in pipelined batches every flush interval, at once when a
//! device disconnects, and a last time at shutdown. The write goes through the
//! `gapless_ack_devices` Function, which never moves a position back, stamps it with the
//! time, and removes positions unused for the device TTL as new devices are added.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gapless_shared::ids::UserId;
use gapless_shared::keys;
use gapless_shared::schema::FN_ACK_DEVICES;
use gapless_shared::store::{Shard, Store, StoreError};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Users per Function call: a call's fixed cost is shared, and one call holds Redis for
/// about 0.2 ms, so the appends and reads of other clients interleave.
const USERS_PER_CALL: usize = 50;
/// Calls per pipeline. One: a flush of 1,000 users sent as one pipeline of ten 100-user
/// calls held Redis in runs of several milliseconds, and the delivery p99 of a 20K steady
/// run went from about 11 ms without ack flushes to 13-19 ms with them (BENCHMARKS.md).
const CALLS_PER_PIPELINE: usize = 1;

/// How long a start marker lives if its user's log never appears; the first append's expiry
/// refresh takes the key over once it does.
const MARKER_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// Positions waiting to be written: (user, device) -> (epoch, seq); an empty epoch is a
/// start marker (see [`AckBook::record_start`]).
type Pending = HashMap<(UserId, String), (String, u64)>;

/// The shared ack book. Cheap to clone.
#[derive(Clone, Default)]
pub struct AckBook {
    /// Shared by every session and the flusher task.
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// A device whose position was not written for this long is removed (0: never).
    device_ttl_s: u64,
    /// Positions not yet written; the flusher takes them all at once.
    pending: Mutex<Pending>,
    /// Wakes the flusher before its interval (a device disconnected).
    flush_now: Notify,
}

impl AckBook {
    /// A book whose flushes expire positions not written for `device_ttl` (zero: never),
    /// as new devices are added (see `gapless_ack_devices` in `migrations/gapless.lua`).
    pub fn with_device_ttl(device_ttl: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                device_ttl_s: device_ttl.as_secs(),
                ..Inner::default()
            }),
        }
    }

    /// Records that a device started before its user had any log: stored as `:0` unless the
    /// device already has a position, it makes a later resume without a position start at the
    /// first entry of the log that appears, not at that log's live end (the device was there
    /// before any of it).
    pub fn record_start(&self, user: &UserId, device: &str) {
        self.inner
            .pending
            .lock()
            .expect("ack lock is never poisoned")
            .entry((user.clone(), device.to_owned()))
            .or_insert_with(|| (String::new(), 0));
    }

    /// Records a device's cumulative ack.
    pub fn record(&self, user: &UserId, device: &str, epoch: &str, seq: u64) {
        let mut pending = self
            .inner
            .pending
            .lock()
            .expect("ack lock is never poisoned");
        let slot = pending
            .entry((user.clone(), device.to_owned()))
            .or_insert_with(|| (epoch.to_owned(), 0));
        if slot.0 != epoch || slot.1 < seq {
            *slot = (epoch.to_owned(), seq);
        }
    }

    /// Asks for a write now (a device disconnected).
    pub fn flush_soon(&self) {
        self.inner.flush_now.notify_one();
    }

    fn take(&self) -> Pending {
        std::mem::take(
            &mut *self
                .inner
                .pending
                .lock()
                .expect("ack lock is never poisoned"),
        )
    }

    /// Puts back positions a failed write did not store, unless newer ones arrived since.
    fn restore(&self, failed: Pending) {
        let mut pending = self
            .inner
            .pending
            .lock()
            .expect("ack lock is never poisoned");
        for (key, value) in failed {
            pending.entry(key).or_insert(value);
        }
    }

    /// Writes everything pending; returns false if Redis failed (the positions stay pending).
    pub async fn flush(&self, conn: &Store, timeout: Duration) -> bool {
        let pending = self.take();
        if pending.is_empty() {
            return true;
        }
        let mut by_user: HashMap<&UserId, Positions<'_>> = HashMap::new();
        let mut markers = Vec::new();
        for ((user, device), (epoch, seq)) in &pending {
            if epoch.is_empty() {
                // Only where the device has no position yet; a real one always wins.
                let acks = keys::acks(user);
                let mut set = redis::cmd("HSETNX");
                set.arg(&acks).arg(device).arg(":0");
                let mut expire = redis::cmd("PEXPIRE");
                expire
                    .arg(&acks)
                    .arg(MARKER_TTL.as_millis() as u64)
                    .arg("NX");
                markers.push((conn.shard_of(user), set));
                markers.push((conn.shard_of(user), expire));
                continue;
            }
            by_user
                .entry(user)
                .or_default()
                .push((device.as_str(), epoch.as_str(), *seq));
        }
        let mut ok = true;
        if !markers.is_empty()
            && let Err(e) = all_ok(conn.run_per_shard(markers, timeout).await)
        {
            metrics::counter!("gapless_redis_errors_total", "op" => "ack").increment(1);
            gapless_shared::health::log_failure(
                e.is_unavailable(),
                &e,
                "start markers not written; retrying",
            );
            ok = false;
        }
        // One call holds users of one shard (a slot on a cluster): group them first.
        let mut by_shard: Vec<(Shard, Vec<(&UserId, Positions<'_>)>)> = Vec::new();
        for (user, positions) in by_user {
            let shard = conn.shard_of(user);
            match by_shard.iter_mut().find(|(s, _)| *s == shard) {
                Some((_, users)) => users.push((user, positions)),
                None => by_shard.push((shard, vec![(user, positions)])),
            }
        }
        let mut calls = Vec::new();
        for (shard, users) in &by_shard {
            for call in users.chunks(USERS_PER_CALL) {
                let mut names = Vec::with_capacity(2 * call.len());
                for (user, _) in call {
                    names.push(keys::meta(user));
                    names.push(keys::acks(user));
                }
                let mut cmd = redis::cmd("FCALL");
                cmd.arg(FN_ACK_DEVICES)
                    .arg(names.len())
                    .arg(names)
                    .arg(self.inner.device_ttl_s);
                for (_, positions) in call {
                    cmd.arg(positions.len());
                    for (device, epoch, seq) in positions {
                        cmd.arg(*device).arg(*epoch).arg(*seq);
                    }
                }
                calls.push((*shard, cmd));
            }
        }
        let mut calls = calls.into_iter().peekable();
        while calls.peek().is_some() {
            let round: Vec<_> = calls.by_ref().take(CALLS_PER_PIPELINE).collect();
            let started = std::time::Instant::now();
            let result = all_ok(conn.run_per_shard(round, timeout).await);
            metrics::histogram!("gapless_redis_duration_seconds", "op" => "ack")
                .record(started.elapsed().as_secs_f64());
            if let Err(e) = result {
                metrics::counter!("gapless_redis_errors_total", "op" => "ack").increment(1);
                gapless_shared::health::log_failure(
                    e.is_unavailable(),
                    &e,
                    "ack positions not written; retrying",
                );
                ok = false;
                break;
            }
        }
        if !ok {
            self.restore(pending);
        }
        ok
    }

    /// Flushes every `interval` and on [`flush_soon`](Self::flush_soon) until `shutdown`.
    pub async fn run(
        self,
        conn: Store,
        interval: Duration,
        timeout: Duration,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.inner.flush_now.notified() => {}
                () = shutdown.cancelled() => return,
            }
            self.flush(&conn, timeout).await;
        }
    }
}

/// One user's positions to write: `(device, epoch, seq)`.
type Positions<'a> = Vec<(&'a str, &'a str, u64)>;

/// `Err` when the pipelines failed or Redis refused any of their commands.
fn all_ok(
    replies: Result<Vec<redis::RedisResult<redis::Value>>, StoreError>,
) -> Result<(), StoreError> {
    for reply in replies? {
        reply.map_err(StoreError::from_redis)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_book_keeps_the_highest_ack_per_device_and_epoch() {
        let book = AckBook::default();
        let user = UserId::parse("u").expect("valid");
        book.record(&user, "d", "e1", 5);
        book.record(&user, "d", "e1", 3);
        book.record(&user, "d2", "e1", 1);
        let pending = book.take();
        assert_eq!(pending[&(user.clone(), "d".into())], ("e1".into(), 5));
        book.record(&user, "d", "e2", 1);
        assert_eq!(book.take()[&(user.clone(), "d".into())], ("e2".into(), 1));
        book.restore(pending);
        book.record(&user, "d", "e1", 9);
        assert_eq!(book.take()[&(user, "d".into())], ("e1".into(), 9));
    }
}
