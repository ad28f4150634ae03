//! Appending notifications (DESIGN.md §1.1–1.2): one `gapless_append` Function call per user
//! (large groups split into chunks), every call of a request in one pipeline, then one wakeup
//! per live edge, also pipelined. No network round trip per item.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use gapless_shared::ids::UserId;
use gapless_shared::keys::{self, UserKeys};
use gapless_shared::schema::FN_APPEND;
use gapless_shared::store::{StoreError, with_timeout};
use gapless_shared::wakeup::{WakeItem, Wakeup};
use redis::aio::ConnectionManager;
use redis::{RedisResult, Value};
use serde::Serialize;

use crate::config::Retention;

/// Most items of one user in one Function call: bounds how long one call holds Redis.
const MAX_ITEMS_PER_CALL: usize = 1000;

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
    pub idempotency_key: Option<&'a str>,
}

/// The answer for one appended (or recognised duplicate) notification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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

/// Appends notifications and wakes edges. Cheap to clone: one shared Redis connection.
#[derive(Clone)]
pub struct Appender {
    /// The process's multiplexed Redis connection.
    conn: ConnectionManager,
    /// Bound of one pipeline.
    timeout: Duration,
    /// Retention handed to the Function.
    retention: Retention,
    /// Largest payload riding along in a wakeup.
    wakeup_payload_max: usize,
}

/// What the Function answers for one call.
struct CallReply {
    epoch: String,
    ts: u64,
    /// seq_1, dup_1, seq_2, dup_2, …
    seqs: Vec<u64>,
    edges: Vec<String>,
}

impl Appender {
    /// An appender over `conn`.
    pub fn new(
        conn: ConnectionManager,
        timeout: Duration,
        retention: Retention,
        wakeup_payload_max: usize,
    ) -> Self {
        Self {
            conn,
            timeout,
            retention,
            wakeup_payload_max,
        }
    }

    /// The shared connection, for other handlers.
    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// Appends `items`, answering one result per item in order.
    ///
    /// `Err` means Redis could not be used at all: nothing is reported as written (some
    /// items may have been, which an idempotency key makes safe to retry). A per-item `Err`
    /// is a Function call that Redis refused; its neighbours are unaffected.
    pub async fn append(
        &self,
        items: &[NewNotification<'_>],
    ) -> Result<Vec<Result<Appended, StoreError>>, StoreError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let calls = plan_calls(items);
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for call in &calls {
            pipe.add_command(self.fcall(items, call));
        }
        let started = Instant::now();
        let replies: Vec<RedisResult<Value>> =
            with_timeout(self.timeout, pipe.query_async(&mut self.conn.clone()))
                .await
                .inspect_err(|_| {
                    metrics::counter!("gapless_redis_errors_total", "op" => "append").increment(1)
                })?;
        metrics::histogram!("gapless_redis_duration_seconds", "op" => "append")
            .record(started.elapsed().as_secs_f64());
        if replies.len() != calls.len() {
            return Err(StoreError::Redis(format!(
                "pipeline answered {} replies for {} calls",
                replies.len(),
                calls.len()
            )));
        }

        let mut results: Vec<Option<Result<Appended, StoreError>>> =
            (0..items.len()).map(|_| None).collect();
        let mut wakeups = Wakeups::new(self.wakeup_payload_max);
        for (call, reply) in calls.iter().zip(replies) {
            match reply.and_then(parse_reply) {
                Ok(reply) if reply.seqs.len() == 2 * call.len() => {
                    for (k, &i) in call.iter().enumerate() {
                        let (seq, duplicate) = (reply.seqs[2 * k], reply.seqs[2 * k + 1] == 1);
                        let item = &items[i];
                        if !duplicate {
                            wakeups.add(&reply, item, seq);
                        }
                        results[i] = Some(Ok(Appended {
                            user: item.user.as_str().to_owned(),
                            epoch: reply.epoch.clone(),
                            seq,
                            duplicate,
                        }));
                    }
                }
                Ok(reply) => {
                    let e = StoreError::Redis(format!(
                        "{FN_APPEND} answered {} values for {} items",
                        reply.seqs.len(),
                        call.len()
                    ));
                    for &i in call {
                        results[i] = Some(Err(e.clone()));
                    }
                }
                Err(e) => {
                    metrics::counter!("gapless_redis_errors_total", "op" => "append_call")
                        .increment(1);
                    let e = StoreError::from_redis(e);
                    for &i in call {
                        results[i] = Some(Err(e.clone()));
                    }
                }
            }
        }
        self.publish(wakeups).await;
        Ok(results
            .into_iter()
            .map(|r| r.expect("every item belongs to exactly one call"))
            .collect())
    }

    /// The Function call for the items `call` (all of one user).
    fn fcall(&self, items: &[NewNotification<'_>], call: &[usize]) -> redis::Cmd {
        let user = &items[call[0]].user;
        let keys = UserKeys::new(user);
        let idempotent: Vec<&str> = call
            .iter()
            .filter_map(|&i| items[i].idempotency_key)
            .collect();
        let mut cmd = redis::cmd("FCALL");
        cmd.arg(FN_APPEND)
            .arg(4 + idempotent.len())
            .arg(&keys.meta)
            .arg(&keys.stream)
            .arg(&keys.registry)
            .arg(&keys.acks);
        for key in &idempotent {
            cmd.arg(UserKeys::idempotency(user, key));
        }
        cmd.arg(new_epoch())
            .arg(self.retention.max_len)
            .arg(self.retention.ttl.as_millis() as u64)
            .arg(self.retention.idempotency_ttl.as_millis() as u64);
        for &i in call {
            cmd.arg(items[i].idempotency_key.unwrap_or(""))
                .arg(items[i].payload);
        }
        cmd
    }

    /// Publishes one wakeup per edge. A failure is logged, not returned: the entries are
    /// written, and edges find them without the hint (DESIGN.md §1.3).
    async fn publish(&self, wakeups: Wakeups) {
        if wakeups.by_edge.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        for (edge, items) in wakeups.by_edge {
            pipe.cmd("PUBLISH")
                .arg(keys::wake_channel(&edge))
                .arg(Wakeup::V1(items).encode())
                .ignore();
        }
        let n = pipe.len() as u64;
        match with_timeout(self.timeout, pipe.query_async::<()>(&mut self.conn.clone())).await {
            Ok(()) => metrics::counter!("gapless_ingest_wakeups_total").increment(n),
            Err(e) => {
                metrics::counter!("gapless_redis_errors_total", "op" => "publish").increment(1);
                tracing::warn!(error = %e, "wakeups not published; edges will find the entries by sweeping");
            }
        }
    }
}

/// Groups item indexes per user, keeping request order within a user, and splits large
/// groups into calls of at most [`MAX_ITEMS_PER_CALL`].
fn plan_calls(items: &[NewNotification<'_>]) -> Vec<Vec<usize>> {
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
        .into_iter()
        .flat_map(|g| {
            g.chunks(MAX_ITEMS_PER_CALL)
                .map(<[usize]>::to_vec)
                .collect::<Vec<_>>()
        })
        .collect()
}

fn parse_reply(value: Value) -> RedisResult<CallReply> {
    let (epoch, ts, seqs, edges) = redis::from_redis_value(value)?;
    Ok(CallReply {
        epoch,
        ts,
        seqs,
        edges,
    })
}

/// A fresh random epoch, used only if this call creates the user's log.
fn new_epoch() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Wakeups of one request, grouped per edge.
struct Wakeups {
    by_edge: HashMap<String, Vec<WakeItem>>,
    payload_max: usize,
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

    fn add(&mut self, reply: &CallReply, item: &NewNotification<'_>, seq: u64) {
        for edge in &reply.edges {
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
                    epoch: reply.epoch.clone(),
                    seq,
                    ts: reply.ts,
                    payload: rides.then(|| item.payload.to_owned()),
                });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        items.push(NewNotification {
            user: user("a"),
            payload: "1",
            idempotency_key: None,
        });
        let calls = plan_calls(&items);
        let flat: Vec<usize> = calls.iter().flatten().copied().collect();
        let mut sorted = flat.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..items.len()).collect::<Vec<_>>());
        for call in &calls {
            assert!(call.len() <= MAX_ITEMS_PER_CALL);
            assert!(call.windows(2).all(|w| w[0] < w[1]), "order kept in a call");
            assert!(call.iter().all(|&i| items[i].user == items[call[0]].user));
        }
        assert_eq!(calls.len(), 4, "1003 items of a and 1001 of b");
    }
}
