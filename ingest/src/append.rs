//! Appending notifications (DESIGN.md §1.1–1.2): one `gapless_append` Function call per user
//! (large groups split into chunks), every call of a request in one pipeline, then one wakeup
//! per live edge, also pipelined. No network round trip per item.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use gapless_shared::ids::UserId;
use gapless_shared::keys::{self, UserKeys};
use gapless_shared::schema::{FN_APPEND, FN_APPEND_WAKE};
use gapless_shared::store::{ReplyThen, Shard, Store, StoreError};
use gapless_shared::wakeup::{WakeItem, Wakeup};
use redis::{RedisResult, Value};
use serde::Serialize;

use crate::config::Retention;
use crate::native;

/// Most items of one user in one Function call: bounds how long one call holds Redis.
const MAX_ITEMS_PER_CALL: usize = 1000;

/// Most users of one transaction: `WATCH` costs Redis time quadratic in the keys one
/// connection watches (each new key is compared with every one already watched): 0.54 ms
/// for 300 keys, 0.26 ms for 192, on redis-server 7.0.
const MAX_USERS_PER_TRANSACTION: usize = 32;

/// Payload bytes one wakeup message may carry in all; past it, entries travel as (user, seq)
/// only and the edge reads them from the stream.
const WAKEUP_PAYLOAD_BUDGET: usize = 1 << 20;

/// One notification to append, borrowed from the request body.
#[derive(Debug, Clone)]
pub struct NewNotification<'a> {
    /// Recipient.
    pub user: UserId,
    /// The payload's JSON text, already validated.
    pub payload: &'a str,
    /// Idempotency key, already validated.
    pub idempotency_key: Option<Cow<'a, str>>,
}

/// The answer for one appended (or recognised duplicate) notification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Appended {
    /// Recipient.
    pub user: String,
    /// Epoch of the user's log.
    pub epoch: String,
    /// Sequence number given to the notification (the original one for a duplicate).
    pub seq: u64,
    /// True when the idempotency key had been seen: nothing was appended.
    pub duplicate: bool,
}

/// Appends notifications and wakes edges. Cheap to clone: one shared Redis connection and
/// a shared pool of connections for transactions.
#[derive(Clone)]
pub struct Appender {
    /// The process's multiplexed Redis connection.
    conn: Store,
    /// Dedicated connections for the native path's transactions.
    pool: Arc<native::Pool>,
    /// Bound of one pipeline.
    timeout: Duration,
    /// Retention handed to the Function.
    retention: Retention,
    /// Largest payload riding along in a wakeup.
    wakeup_payload_max: usize,
    /// Fewest items of one user for the native path.
    native_min_items: usize,
    /// Replicas that must hold a call's writes before its items are answered (0: none).
    min_replicas: u32,
}

impl Appender {
    /// An appender over `conn`.
    pub fn new(
        conn: Store,
        pool: native::Pool,
        timeout: Duration,
        retention: Retention,
        wakeup_payload_max: usize,
        native_min_items: usize,
    ) -> Self {
        Self {
            conn,
            pool: Arc::new(pool),
            timeout,
            retention,
            wakeup_payload_max,
            native_min_items,
            min_replicas: 0,
        }
    }

    /// Answers appends only once `n` replicas hold them (`WAIT n` after each shard's calls,
    /// bounded by half the Redis timeout); items of a call fewer replicas hold are answered
    /// [`StoreError::NotReplicated`]: written, but not safe from a failover yet.
    /// The native path's transactions do not `WAIT`: with replicas asked for, every user
    /// goes through the Function.
    pub fn with_min_replicas(mut self, n: u32) -> Self {
        self.min_replicas = n;
        if n > 0 {
            self.native_min_items = usize::MAX;
        }
        self
    }

    /// The shared connection, for other handlers.
    pub fn connection(&self) -> Store {
        self.conn.clone()
    }

    /// Appends `items`, answering one result per item in order.
    ///
    /// A user with at least `native_min_items` items and no idempotency key, whose log
    /// exists, goes through native commands in a transaction ([`native`]): cheaper per entry,
    /// dearer per user (a `WATCH`, reads and a second round trip). The others, and any the
    /// transaction hands back, go through the `gapless_append` Function. Each user's items
    /// take one path, in request order.
    ///
    /// `Err` means Redis could not be used at all: nothing is reported as written (some
    /// items may have been, which an idempotency key makes safe to retry). A per-item `Err`
    /// is a write that Redis refused; items of other users are unaffected.
    pub async fn append(
        &self,
        items: &[NewNotification<'_>],
    ) -> Result<Vec<Result<Appended, StoreError>>, StoreError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let (fast, mut slow): (Vec<_>, Vec<_>) =
            group_by_user(items).into_iter().partition(|group| {
                group.len() >= self.native_min_items
                    && group.iter().all(|&i| items[i].idempotency_key.is_none())
            });
        let mut settled: Vec<(Vec<usize>, UserReply, u64)> = Vec::new();

        let chunks = pack_whole(fast);
        if !chunks.is_empty() {
            let started = Instant::now();
            let outcomes = join_all(chunks.iter().map(|chunk| {
                let users: Vec<native::UserItems<'_>> = chunk
                    .iter()
                    .map(|group| native::UserItems {
                        user: &items[group[0]].user,
                        payloads: group.iter().map(|&i| items[i].payload).collect(),
                    })
                    .collect();
                async move { native::append(&self.pool, &self.retention, &users).await }
            }))
            .await;
            metrics::histogram!("gapless_redis_duration_seconds", "op" => "append_native")
                .record(started.elapsed().as_secs_f64());
            for (chunk, outcome) in chunks.into_iter().zip(outcomes) {
                let outcome = outcome.inspect_err(|_| {
                    metrics::counter!("gapless_redis_errors_total", "op" => "append").increment(1)
                })?;
                for (group, outcome) in chunk.into_iter().zip(outcome) {
                    match outcome {
                        native::Outcome::Function => slow.push(group),
                        native::Outcome::Written(w) => {
                            let mut reply = UserReply::appended(w.epoch, w.last_seq, w.edges);
                            if let Some((at, error)) = w.failure {
                                reply.failed_at = at as u64 + 1;
                                reply.failure = error;
                            }
                            settled.push((group, reply, w.ts));
                        }
                    }
                }
            }
        }

        let mut results: Vec<Option<Result<Appended, StoreError>>> =
            (0..items.len()).map(|_| None).collect();
        let calls = pack(slow, |group| self.conn.shard_of(&items[group[0]].user));
        // A one-item request going through the Function has its wakeup published by that
        // call. Not a larger one: the wakeup costs the call several Lua strings per item
        // (10-14 µs per item on this machine's Redis, BENCHMARKS.md), against one `PUBLISH`
        // per request from here.
        let woken = self.wakes_in_call() && items.len() == 1 && !calls.is_empty();
        if !calls.is_empty() {
            let cmds = calls
                .iter()
                .map(|(shard, call)| (*shard, self.fcall(items, call, woken)))
                .collect();
            // `WAIT` after each shard's calls, on the same connection: it counts the replicas
            // that hold every write sent before it.
            let wait = (self.min_replicas > 0).then(|| {
                let mut wait = redis::cmd("WAIT");
                wait.arg(self.min_replicas)
                    .arg((self.timeout / 2).as_millis() as u64);
                wait
            });
            let started = Instant::now();
            let replies: Vec<ReplyThen> = self
                .conn
                .run_per_shard_then(cmds, wait.as_ref(), self.timeout)
                .await
                .inspect_err(|_| {
                    metrics::counter!("gapless_redis_errors_total", "op" => "append").increment(1)
                })?;
            metrics::histogram!("gapless_redis_duration_seconds", "op" => "append")
                .record(started.elapsed().as_secs_f64());
            for ((_, call), (reply, waited)) in calls.into_iter().zip(replies) {
                let reply = reply
                    .and_then(|v| Ok(redis::from_redis_value::<CallReply>(v)?))
                    .map_err(StoreError::from_redis)
                    .and_then(|r| r.check(&call))
                    .and_then(|r| self.replicated(waited).map(|()| r));
                match reply {
                    Ok(reply) => {
                        let ts = reply.ts;
                        if woken {
                            // One user: one message per live edge of its reply.
                            let edges: usize = reply.users.iter().map(|u| u.edges.len()).sum();
                            metrics::counter!("gapless_ingest_wakeups_total")
                                .increment(edges as u64);
                        }
                        settled.extend(call.into_iter().zip(reply.users).map(|(s, u)| (s, u, ts)));
                    }
                    Err(e) => {
                        metrics::counter!("gapless_redis_errors_total", "op" => "append_call")
                            .increment(1);
                        for &i in call.iter().flatten() {
                            results[i] = Some(Err(e.clone()));
                        }
                    }
                }
            }
        }

        let mut wakeups = Wakeups::new(self.wakeup_payload_max);
        for (segment, user, ts) in settled {
            for (&i, result) in segment.iter().zip(user.seqs(segment.len())) {
                let item = &items[i];
                let Some((seq, duplicate)) = result else {
                    metrics::counter!("gapless_redis_errors_total", "op" => "append_user")
                        .increment(1);
                    results[i] = Some(Err(StoreError::Redis(user.failure.clone())));
                    continue;
                };
                if !duplicate && !woken {
                    wakeups.add(&user.edges, &user.epoch, ts, item, seq);
                }
                results[i] = Some(Ok(Appended {
                    user: item.user.as_str().to_owned(),
                    epoch: user.epoch.clone(),
                    seq,
                    duplicate,
                }));
            }
        }
        self.publish(wakeups).await;
        Ok(results
            .into_iter()
            .map(|r| r.expect("every item belongs to exactly one user's settlement"))
            .collect())
    }

    /// Whether the `WAIT` after a call saw enough replicas (always, when none are asked for).
    fn replicated(&self, waited: Option<RedisResult<Value>>) -> Result<(), StoreError> {
        let Some(waited) = waited else {
            return Ok(());
        };
        let acked: i64 = waited
            .and_then(|v| Ok(redis::from_redis_value(v)?))
            .map_err(StoreError::from_redis)?;
        let acked = u32::try_from(acked.max(0)).unwrap_or(u32::MAX);
        if acked < self.min_replicas {
            metrics::counter!("gapless_ingest_not_replicated_total").increment(1);
            return Err(StoreError::NotReplicated {
                wanted: self.min_replicas,
                acked,
            });
        }
        Ok(())
    }

    /// Whether a Function call may publish the wakeups of what it appends
    /// (`gapless_append_wake`): on one Redis, where the channels live beside the keys, and
    /// unless appends wait for replicas, whose edges must hear of an entry only once `WAIT`
    /// counted it.
    fn wakes_in_call(&self) -> bool {
        !self.conn.is_cluster() && self.min_replicas == 0
    }

    /// The Function call for one planned call: segments of items, each of one user; `wake`:
    /// the call publishes their wakeups. The argument layout is documented in `migrations/`.
    fn fcall(&self, items: &[NewNotification<'_>], call: &Call, wake: bool) -> redis::Cmd {
        let mut keys: Vec<String> = Vec::new();
        for segment in call {
            let user = &items[segment[0]].user;
            let k = UserKeys::new(user);
            keys.extend([k.meta, k.stream, k.registry, k.acks]);
            keys.extend(
                segment
                    .iter()
                    .filter_map(|&i| items[i].idempotency_key.as_deref())
                    .map(|key| UserKeys::idempotency(user, key)),
            );
        }
        let mut cmd = redis::cmd("FCALL");
        cmd.arg(if wake { FN_APPEND_WAKE } else { FN_APPEND })
            .arg(keys.len())
            .arg(keys)
            .arg(self.retention.max_len)
            .arg(self.retention.ttl.as_millis() as u64)
            .arg(self.retention.idempotency_ttl.as_millis() as u64);
        if wake {
            cmd.arg(self.wakeup_payload_max).arg(WAKEUP_PAYLOAD_BUDGET);
        }
        for segment in call {
            let idempotent: Vec<(usize, &str)> = segment
                .iter()
                .enumerate()
                .filter_map(|(pos, &i)| {
                    items[i]
                        .idempotency_key
                        .as_deref()
                        .map(|key| (pos + 1, key))
                })
                .collect();
            cmd.arg(new_epoch())
                .arg(segment.len())
                .arg(idempotent.len());
            for (pos, key) in idempotent {
                cmd.arg(pos).arg(key);
            }
            for &i in segment {
                cmd.arg(items[i].payload);
            }
        }
        cmd
    }

    /// Publishes one wakeup per edge. A failure is logged, not returned: the entries are
    /// written, and edges find them without the hint (DESIGN.md §1.3).
    async fn publish(&self, wakeups: Wakeups) {
        if wakeups.by_edge.is_empty() {
            return;
        }
        // A channel has a slot of its own on a cluster (its `{edge}` tag): one pipeline per
        // shard, as for any keyed command.
        let cmds: Vec<_> = wakeups
            .by_edge
            .into_iter()
            .map(|(edge, items)| {
                let channel = keys::wake_channel(&edge);
                let mut publish = redis::cmd(self.conn.publish_command());
                publish.arg(&channel).arg(Wakeup::V1(items).encode());
                (self.conn.shard_of_key(&channel), publish)
            })
            .collect();
        let n = cmds.len() as u64;
        let published = self
            .conn
            .run_per_shard(cmds, self.timeout)
            .await
            .and_then(|replies| {
                replies
                    .into_iter()
                    .try_for_each(|r| r.map(drop).map_err(StoreError::from_redis))
            });
        match published {
            Ok(()) => metrics::counter!("gapless_ingest_wakeups_total").increment(n),
            Err(e) => {
                metrics::counter!("gapless_redis_errors_total", "op" => "publish").increment(1);
                gapless_shared::health::log_failure(
                    e.is_unavailable(),
                    &e,
                    "wakeups not published; edges will find the entries by sweeping",
                );
            }
        }
    }
}

/// One Function call (or transaction): segments of item indexes, each segment all of one
/// user, in request order within the user.
type Call = Vec<Vec<usize>>;

/// Groups item indexes per user (request order kept within a user) and packs the groups
/// into Function calls ([`pack`]).
#[cfg(test)]
fn plan_calls(items: &[NewNotification<'_>]) -> Vec<Call> {
    plan_calls_by(items, |_| Shard::default())
}

/// [`plan_calls`] with the users' shards given.
#[cfg(test)]
fn plan_calls_by(items: &[NewNotification<'_>], shard_of: impl Fn(&UserId) -> Shard) -> Vec<Call> {
    pack(group_by_user(items), |group| {
        shard_of(&items[group[0]].user)
    })
    .into_iter()
    .map(|(_, call)| call)
    .collect()
}

/// Item indexes per user, users in order of first appearance, items in request order.
fn group_by_user(items: &[NewNotification<'_>]) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut by_user: HashMap<&str, usize> = HashMap::new();
    for (i, item) in items.iter().enumerate() {
        let g = *by_user.entry(item.user.as_str()).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[g].push(i);
    }
    groups
}

/// Packs user groups into Function calls of about [`MAX_ITEMS_PER_CALL`] items, each call
/// of users of one shard (one slot on a cluster; anything on a single node); a larger group
/// is split over consecutive calls of its shard, which that shard's pipeline runs in order.
///
/// Several users share a call because a call's fixed cost dominates when each user has few
/// items.
fn pack(groups: Vec<Vec<usize>>, shard_of: impl Fn(&Vec<usize>) -> Shard) -> Vec<(Shard, Call)> {
    let mut by_shard: Vec<(Shard, Vec<Vec<usize>>)> = Vec::new();
    for group in groups {
        let shard = shard_of(&group);
        match by_shard.iter_mut().find(|(s, _)| *s == shard) {
            Some((_, groups)) => groups.push(group),
            None => by_shard.push((shard, vec![group])),
        }
    }
    let mut calls: Vec<(Shard, Call)> = Vec::new();
    for (shard, groups) in by_shard {
        let mut current: Call = Vec::new();
        let mut current_items = 0;
        for group in groups {
            for segment in group.chunks(MAX_ITEMS_PER_CALL) {
                if current_items > 0 && current_items + segment.len() > MAX_ITEMS_PER_CALL {
                    calls.push((shard, std::mem::take(&mut current)));
                    current_items = 0;
                }
                current_items += segment.len();
                current.push(segment.to_vec());
            }
        }
        if !current.is_empty() {
            calls.push((shard, current));
        }
    }
    calls
}

/// Packs user groups into transactions of about [`MAX_ITEMS_PER_CALL`] items and at most
/// [`MAX_USERS_PER_TRANSACTION`] users, without ever splitting a user: the transactions run
/// concurrently, so a user's items must share one to stay in order.
fn pack_whole(groups: Vec<Vec<usize>>) -> Vec<Call> {
    let mut chunks: Vec<Call> = Vec::new();
    let mut current_items = 0;
    for group in groups {
        let full = chunks.last().is_none_or(|c| {
            c.len() == MAX_USERS_PER_TRANSACTION
                || (current_items > 0 && current_items + group.len() > MAX_ITEMS_PER_CALL)
        });
        if full {
            chunks.push(Vec::new());
            current_items = 0;
        }
        current_items += group.len();
        if let Some(chunk) = chunks.last_mut() {
            chunk.push(group);
        }
    }
    chunks
}

/// What the Function answers for one call.
struct CallReply {
    /// Ingest time of every entry of the call, ms.
    ts: u64,
    /// One reply per segment, in call order.
    users: Vec<UserReply>,
}

/// The Function's answer for one segment.
struct UserReply {
    /// Epoch of the user's log.
    epoch: String,
    /// Seq of the segment's last appended item (the log's last seq).
    last_seq: u64,
    /// (item index from 1, original seq) of each recognised duplicate, in item order.
    duplicates: Vec<u64>,
    /// The user's live edges.
    edges: Vec<String>,
    /// 0, or the index (from 1) of the first item Redis refused; it and the later items of
    /// the segment were not written.
    failed_at: u64,
    /// Redis's error for `failed_at`.
    failure: String,
}

impl UserReply {
    /// A user's items all appended, with consecutive seqs ending at `last_seq`.
    fn appended(epoch: String, last_seq: u64, edges: Vec<String>) -> Self {
        Self {
            epoch,
            last_seq,
            duplicates: Vec::new(),
            edges,
            failed_at: 0,
            failure: String::new(),
        }
    }

    /// Items of an `n`-item segment that were handled (appended or recognised).
    fn handled(&self, n: usize) -> usize {
        match self.failed_at {
            0 => n,
            f => (f as usize - 1).min(n),
        }
    }

    /// For each of the segment's `n` items: `Some((seq, duplicate))`, or `None` for an item
    /// Redis refused. Appended items got consecutive seqs ending at `last_seq`, in order.
    fn seqs(&self, n: usize) -> impl Iterator<Item = Option<(u64, bool)>> + '_ {
        let handled = self.handled(n);
        let appended = (handled - self.duplicates.len() / 2) as u64;
        let mut next = self.last_seq + 1 - appended;
        let mut duplicates = self.duplicates.chunks_exact(2).peekable();
        (1..=n as u64).map(move |pos| {
            if pos as usize > handled {
                return None;
            }
            Some(match duplicates.next_if(|d| d[0] == pos) {
                Some(d) => (d[1], true),
                None => {
                    next += 1;
                    (next - 1, false)
                }
            })
        })
    }
}

impl redis::FromRedisValue for CallReply {
    fn from_redis_value(v: Value) -> Result<Self, redis::ParsingError> {
        let mut parts: Vec<Value> = redis::from_redis_value(v)?;
        if parts.is_empty() {
            return Err("empty gapless_append reply".into());
        }
        let users = parts.split_off(1);
        let ts = redis::from_redis_value(parts.remove(0))?;
        let users = users
            .into_iter()
            .map(|u| {
                let (epoch, last_seq, duplicates, edges, failed_at, failure) =
                    redis::from_redis_value(u)?;
                Ok(UserReply {
                    epoch,
                    last_seq,
                    duplicates,
                    edges,
                    failed_at,
                    failure,
                })
            })
            .collect::<Result<_, redis::ParsingError>>()?;
        Ok(CallReply { ts, users })
    }
}

impl CallReply {
    /// Checks that the reply accounts for every item of `call`.
    fn check(self, call: &Call) -> Result<Self, StoreError> {
        let fits = self.users.len() == call.len()
            && self.users.iter().zip(call).all(|(u, segment)| {
                let handled = u.handled(segment.len());
                let duplicates = u.duplicates.len() / 2;
                u.duplicates.len() % 2 == 0
                    && duplicates <= handled
                    && u.last_seq >= (handled - duplicates) as u64
                    && u.duplicates
                        .chunks_exact(2)
                        .all(|d| d[0] >= 1 && d[0] <= handled as u64)
                    && u.duplicates
                        .chunks_exact(2)
                        .map(|d| d[0])
                        .is_sorted_by(|a, b| a < b)
            });
        if fits {
            Ok(self)
        } else {
            Err(StoreError::Redis(format!(
                "{FN_APPEND} answered a reply that does not match its items"
            )))
        }
    }
}

/// A fresh random epoch, used only if this call creates the user's log.
fn new_epoch() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Wakeups of one request, grouped per edge.
struct Wakeups {
    /// The entries each edge will be told about.
    by_edge: HashMap<String, Vec<WakeItem>>,
    /// Largest payload that rides along.
    payload_max: usize,
    /// Payload bytes already in each edge's message.
    budget_used: HashMap<String, usize>,
}

impl Wakeups {
    fn new(payload_max: usize) -> Self {
        Self {
            by_edge: HashMap::new(),
            payload_max,
            budget_used: HashMap::new(),
        }
    }

    fn add(
        &mut self,
        edges: &[String],
        epoch: &str,
        ts: u64,
        item: &NewNotification<'_>,
        seq: u64,
    ) {
        for edge in edges {
            let used = self.budget_used.entry(edge.clone()).or_default();
            let rides = item.payload.len() <= self.payload_max
                && *used + item.payload.len() <= WAKEUP_PAYLOAD_BUDGET;
            if rides {
                *used += item.payload.len();
            }
            self.by_edge
                .entry(edge.clone())
                .or_default()
                .push(WakeItem {
                    user: item.user.as_str().to_owned(),
                    epoch: epoch.to_owned(),
                    seq,
                    ts,
                    payload: rides.then(|| item.payload.to_owned()),
                });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_a_cluster_a_call_holds_users_of_one_slot_and_each_user_keeps_its_order() {
        let users: Vec<UserId> = (0..40)
            .map(|i| UserId::parse(&format!("user-{i}")).expect("valid"))
            .collect();
        let mut items = Vec::new();
        for round in 0..30 {
            for (u, user) in users.iter().enumerate() {
                if (round + u) % 3 != 0 {
                    items.push(NewNotification {
                        user: user.clone(),
                        payload: "1",
                        idempotency_key: None,
                    });
                }
            }
        }
        let slot = |user: &UserId| Shard::of_key(&keys::meta(user));
        let calls = plan_calls_by(&items, slot);
        for call in &calls {
            let first = slot(&items[call[0][0]].user);
            assert!(
                call.iter()
                    .all(|segment| slot(&items[segment[0]].user) == first),
                "a call spans slots"
            );
        }
        let flat: Vec<usize> = calls.iter().flatten().flatten().copied().collect();
        assert_eq!(flat.len(), items.len(), "each item once");
        for user in &users {
            let order: Vec<usize> = flat
                .iter()
                .copied()
                .filter(|&i| items[i].user == *user)
                .collect();
            assert!(
                order.windows(2).all(|w| w[0] < w[1]),
                "{user:?} in request order"
            );
        }
    }

    #[test]
    fn calls_group_per_user_in_order_and_split_large_groups() {
        let user = |s: &str| UserId::parse(s).expect("valid");
        let mut items = Vec::new();
        for i in 0..(2 * MAX_ITEMS_PER_CALL + 3) {
            items.push(NewNotification {
                user: user(if i % 2 == 0 { "a" } else { "b" }),
                payload: "1",
                idempotency_key: None,
            });
        }
        for name in ["a", "c", "d"] {
            items.push(NewNotification {
                user: user(name),
                payload: "1",
                idempotency_key: None,
            });
        }
        let calls = plan_calls(&items);
        let flat: Vec<usize> = calls.iter().flatten().flatten().copied().collect();
        let mut sorted = flat.clone();
        sorted.sort_unstable();
        assert_eq!(
            sorted,
            (0..items.len()).collect::<Vec<_>>(),
            "each item once"
        );
        for call in &calls {
            assert!(call.iter().map(Vec::len).sum::<usize>() <= MAX_ITEMS_PER_CALL);
            for segment in call {
                assert!(
                    segment
                        .iter()
                        .all(|&i| items[i].user == items[segment[0]].user)
                );
            }
        }
        for name in ["a", "b"] {
            let order: Vec<usize> = flat
                .iter()
                .copied()
                .filter(|&i| items[i].user.as_str() == name)
                .collect();
            assert!(
                order.windows(2).all(|w| w[0] < w[1]),
                "{name} keeps request order"
            );
        }
        // a: 1003 items, b: 1001, c and d one each. Segments a1000 | a3 | b1000 | b1 c1 d1:
        // a segment that would overflow the current call starts the next one.
        assert_eq!(calls.len(), 4);
    }

    #[test]
    fn transactions_never_split_a_user_and_bound_users_and_items() {
        // 100 users of 1 item, one user of 2,500, then 40 users of 30.
        let mut groups: Vec<Vec<usize>> = (0..100).map(|i| vec![i]).collect();
        groups.push((100..2600).collect());
        groups.extend((0..40).map(|u| (2600 + 30 * u..2630 + 30 * u).collect()));
        let chunks = pack_whole(groups.clone());
        let flattened: Vec<Vec<usize>> = chunks.iter().flatten().cloned().collect();
        assert_eq!(flattened, groups, "every user whole, in order");
        for chunk in &chunks {
            let items: usize = chunk.iter().map(Vec::len).sum();
            assert!(
                chunk.len() <= MAX_USERS_PER_TRANSACTION,
                "{} users",
                chunk.len()
            );
            assert!(
                items <= MAX_ITEMS_PER_CALL || chunk.len() == 1,
                "{items} items over {} users",
                chunk.len()
            );
        }
        let sizes: Vec<usize> = chunks.iter().map(Vec::len).collect();
        assert_eq!(sizes, [32, 32, 32, 4, 1, 32, 8]);
    }

    #[test]
    fn seqs_are_rebuilt_from_last_seq_and_duplicates() {
        let reply = |last_seq, duplicates: Vec<u64>, failed_at| UserReply {
            epoch: "e".into(),
            last_seq,
            duplicates,
            edges: Vec::new(),
            failed_at,
            failure: String::new(),
        };
        let seqs: Vec<_> = reply(12, vec![2, 4, 5, 7], 0).seqs(5).collect();
        let expect = [(10, false), (4, true), (11, false), (12, false), (7, true)];
        assert_eq!(seqs, expect.map(Some));
        assert_eq!(
            reply(3, vec![], 0).seqs(3).collect::<Vec<_>>(),
            [Some((1, false)), Some((2, false)), Some((3, false))]
        );
        // Items 3.. were refused: 1 and 2 were appended as 6 and 7.
        assert_eq!(
            reply(7, vec![], 3).seqs(4).collect::<Vec<_>>(),
            [Some((6, false)), Some((7, false)), None, None]
        );
    }
}
