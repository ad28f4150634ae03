//! Appending a request's notifications (DESIGN.md §1.1-1.2), the steps in order: the items
//! are planned per user ([`crate::plan`]); users with runs of plain items go through native
//! transactions ([`crate::transaction`]), the rest through one `gapless_append` Function call
//! per planned call, every call of a request in one pipeline ([`crate::function`]); then
//! one wakeup per live edge ([`crate::wake`]). No network round trip per item.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
pub use gapless_shared::api::Appended;
use gapless_shared::store::{ReplyThen, Store, StoreError};
use redis::{RedisResult, Value};

use crate::config::Retention;
use crate::function::{self, CallReply, UserReply};
pub use crate::plan::NewNotification;
use crate::plan::{Call, group_by_user, pack, pack_whole};
use crate::transaction;
use crate::wake::{self, Wakeups};

/// A user's items settled by Redis: their indexes in the request, the reply for them, and
/// their ingest time (ms).
type Settled = (Vec<usize>, UserReply, u64);

/// One result per item of a request, in its order.
type Results = Vec<Result<Appended, StoreError>>;

/// Appends notifications and wakes edges. Cheap to clone: one shared Redis connection and
/// a shared pool of connections for transactions.
#[derive(Clone)]
pub struct Appender {
    /// The process's multiplexed Redis connection.
    conn: Store,
    /// Dedicated connections for the native path's transactions.
    pool: Arc<transaction::Pool>,
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
        pool: transaction::Pool,
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
    /// exists, goes through native commands in a transaction ([`transaction`]): cheaper per entry,
    /// dearer per user (a `WATCH`, reads and a second round trip). The others, and any the
    /// transaction hands back, go through the `gapless_append` Function. Each user's items
    /// take one path, in request order.
    ///
    /// `Err` means Redis could not be used at all: nothing is reported as written (some
    /// items may have been, which an idempotency key makes safe to retry). A per-item `Err`
    /// is a write that Redis refused; items of other users are unaffected.
    pub async fn append(&self, items: &[NewNotification<'_>]) -> Result<Results, StoreError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let (fast, slow): (Vec<_>, Vec<_>) = group_by_user(items).into_iter().partition(|group| {
            group.len() >= self.native_min_items
                && group.iter().all(|&i| items[i].idempotency_key.is_none())
        });
        let mut results: Vec<Option<Result<Appended, StoreError>>> =
            (0..items.len()).map(|_| None).collect();
        let (mut settled, handed_back) = self.through_transactions(items, fast).await?;
        let calls = pack(slow.into_iter().chain(handed_back).collect(), |group| {
            self.conn.shard_of(&items[group[0]].user)
        });
        // A one-item request going through the Function has its wakeup published by that
        // call. Not a larger one: the wakeup costs the call several Lua strings per item
        // (10-14 µs per item on this machine's Redis, BENCHMARKS.md), against one `PUBLISH`
        // per request from here.
        let woken = self.wakes_in_call() && items.len() == 1 && !calls.is_empty();
        settled.extend(
            self.through_function(items, calls, woken, &mut results)
                .await?,
        );

        let mut wakeups = Wakeups::new(self.wakeup_payload_max);
        for (segment, user, ts) in settled {
            for (&i, result) in segment.iter().zip(user.seqs(segment.len())) {
                let item = &items[i];
                let Some((seq, duplicate)) = result else {
                    metrics::counter!("gapless_redis_errors_total", "op" => "append_user")
                        .increment(1);
                    results[i] = Some(Err(StoreError::reply(user.failure.clone())));
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
        wake::publish(&self.conn, self.timeout, wakeups).await;
        Ok(results
            .into_iter()
            .map(|r| r.expect("every item belongs to exactly one user's settlement"))
            .collect())
    }

    /// Appends the `fast` users through native transactions, concurrently; returns what they
    /// settled and the users a transaction handed back to the Function.
    async fn through_transactions(
        &self,
        items: &[NewNotification<'_>],
        fast: Vec<Vec<usize>>,
    ) -> Result<(Vec<Settled>, Vec<Vec<usize>>), StoreError> {
        let (mut settled, mut handed_back) = (Vec::new(), Vec::new());
        let chunks = pack_whole(fast);
        if chunks.is_empty() {
            return Ok((settled, handed_back));
        }
        let started = Instant::now();
        let outcomes = join_all(chunks.iter().map(|chunk| {
            let users: Vec<transaction::UserItems<'_>> = chunk
                .iter()
                .map(|group| transaction::UserItems {
                    user: &items[group[0]].user,
                    payloads: group.iter().map(|&i| items[i].payload).collect(),
                })
                .collect();
            async move { transaction::append(&self.pool, &self.retention, &users).await }
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
                    transaction::Outcome::Function => handed_back.push(group),
                    transaction::Outcome::Written(w) => {
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
        Ok((settled, handed_back))
    }

    /// Runs the planned Function `calls` in one pipeline per shard (each followed by `WAIT`
    /// when replicas are asked for); returns what they settled. The items of a call Redis
    /// refused as a whole get its error in `results`.
    async fn through_function(
        &self,
        items: &[NewNotification<'_>],
        calls: Vec<(gapless_shared::store::Shard, Call)>,
        woken: bool,
        results: &mut [Option<Result<Appended, StoreError>>],
    ) -> Result<Vec<Settled>, StoreError> {
        let mut settled = Vec::new();
        if calls.is_empty() {
            return Ok(settled);
        }
        let wake = woken.then_some(self.wakeup_payload_max);
        let cmds = calls
            .iter()
            .map(|(shard, call)| (*shard, function::fcall(items, call, &self.retention, wake)))
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
                        metrics::counter!("gapless_ingest_wakeups_total").increment(edges as u64);
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
        Ok(settled)
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
}
