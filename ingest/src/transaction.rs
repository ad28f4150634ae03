//! The append's fast path: native `XADD`s in a `WATCH`/`MULTI`/`EXEC` transaction.
//!
//! The `gapless_append` Function costs Redis about twice the instructions of a native `XADD`
//! per entry (BENCHMARKS.md: the Lua call machinery and its argument conversions), which
//! caps batch ingest near half of Redis's own append rate. A user whose log already exists
//! and whose items carry no idempotency key needs none of the Function's branching, so
//! this path appends such users with native commands:
//!
//! 1. `WATCH` every fast user's log state and registry, then read in the same pipeline the
//!    state (`HMGET`), the stream's type, the registry and `TIME`;
//! 2. decide each user's seqs from what was read, and send `MULTI`, the `XADD`s with ids
//!    `<seq>-<ingest ms>`, the trim, the state and expiry updates, the removal of expired
//!    leases, `EXEC`.
//!
//! Another writer touching a watched key in between (another ingest, the Function, an edge
//! registering) makes `EXEC` answer nil and nothing is written; the chunk is read and tried
//! again, and after [`ATTEMPTS`] handed to the Function. A user whose state is anything but
//! plain (no log yet, a key of the wrong type) is handed to the Function too, which creates
//! logs and contains failures.
//!
//! The stream itself is not watched: every gapless write to a stream (this path, the
//! Function, a new epoch) also writes the state, and the two expire together, so the watch
//! on the state covers it at half the cost (`WATCH` is quadratic in the keys a connection
//! watches). Hence each `XADD`'s id is above the stream's last one and the recorded seq stays
//! the stream's last entry, as with the Function. Reading the stream's last entry to check
//! this cost Redis 1.7 µs per user, more than appending an entry, and only a client writing
//! into gapless's streams behind its back can make them differ; the type is checked
//! instead, so a key of the wrong type fails in the Function, alone. (Against such a foreign
//! writer, an `XADD` refused inside the transaction is reported as failed and logged.) The registry is watched so that an edge
//! registering in between is woken, as the Function's atomic read of it guarantees.
//!
//! A transaction needs a connection of its own between `WATCH` and `EXEC`: the process's
//! shared multiplexed connection interleaves other requests, so this path takes connections
//! from a small [`Pool`].

use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use gapless_shared::ids::UserId;
use gapless_shared::keys::UserKeys;
use gapless_shared::store::{StoreError, with_timeout};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, RedisResult, Value};
use tokio::sync::Semaphore;

use crate::config::Retention;

/// Reads and tries of one chunk before its users are handed to the Function.
pub const ATTEMPTS: usize = 3;

/// Dedicated connections for transactions, opened on demand and kept for reuse.
pub struct Pool {
    client: redis::Client,
    config: AsyncConnectionConfig,
    timeout: Duration,
    idle: Mutex<Vec<MultiplexedConnection>>,
    permits: Semaphore,
}

impl Pool {
    /// A pool of at most `size` connections to `url`, each call bounded by `timeout`.
    pub fn new(
        url: &str,
        connect_timeout: Duration,
        timeout: Duration,
        size: usize,
    ) -> Result<Self, StoreError> {
        Ok(Self {
            client: redis::Client::open(url).map_err(StoreError::from_redis)?,
            config: AsyncConnectionConfig::new()
                .set_connection_timeout(Some(connect_timeout))
                .set_response_timeout(Some(timeout)),
            timeout,
            idle: Mutex::new(Vec::new()),
            permits: Semaphore::new(size.max(1)),
        })
    }

    /// An idle connection, or a new one.
    async fn take(&self) -> Result<MultiplexedConnection, StoreError> {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        match idle {
            Some(conn) => Ok(conn),
            None => {
                with_timeout(
                    self.timeout,
                    self.client
                        .get_multiplexed_async_connection_with_config(&self.config),
                )
                .await
            }
        }
    }

    /// Returns a connection in a known state (no `WATCH` pending) for reuse.
    fn give_back(&self, conn: MultiplexedConnection) {
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(conn);
    }
}

/// What became of one user's items on this path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The transaction ran for this user.
    Written(Written),
    /// Not handled here: the Function must append this user.
    Function,
}

/// A user's items as the transaction wrote them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// Epoch of the user's log.
    pub epoch: String,
    /// Seq of the last appended item (the log's last seq); appended items got consecutive
    /// seqs ending here.
    pub last_seq: u64,
    /// Ingest time of the entries, ms.
    pub ts: u64,
    /// The user's live edges, to wake.
    pub edges: Vec<String>,
    /// `(index from 0, error)` of the first item Redis refused; it and the later items
    /// count as not appended.
    pub failure: Option<(usize, String)>,
}

/// One user of a chunk: the payloads of its items, in order.
pub struct UserItems<'a> {
    /// Recipient.
    pub user: &'a UserId,
    /// Payload JSON texts, in request order.
    pub payloads: Vec<&'a str>,
}

/// A user's state as read under `WATCH`, when plain enough for this path.
struct Plain {
    epoch: String,
    seq: u64,
    refreshed: u64,
    live: Vec<String>,
    expired: Vec<String>,
}

/// Appends `users` (each at most once) in one transaction; one outcome per user, in order.
/// `Err` means Redis could not be used: nothing of this chunk is reported as written.
pub async fn append(
    pool: &Pool,
    retention: &Retention,
    users: &[UserItems<'_>],
) -> Result<Vec<Outcome>, StoreError> {
    let _permit = pool
        .permits
        .acquire()
        .await
        .map_err(|_| StoreError::stopped("the transaction pool"))?;
    let mut conn = pool.take().await?;
    // Each user's key names, built once for every read and write of every attempt.
    let keys: Vec<UserKeys> = users.iter().map(|u| UserKeys::new(u.user)).collect();
    for _ in 0..ATTEMPTS {
        match attempt(&mut conn, pool.timeout, retention, users, &keys).await {
            Ok(Some(outcomes)) => {
                pool.give_back(conn);
                return Ok(outcomes);
            }
            Ok(None) => {
                metrics::counter!("gapless_ingest_append_conflicts_total").increment(1);
            }
            // The connection's state is unknown (a WATCH may be pending): drop it. The idle
            // ones most likely failed alike (Redis restarted): drop them too, rather than
            // failing one request for each.
            Err(e) => {
                pool.idle.lock().unwrap_or_else(|e| e.into_inner()).clear();
                return Err(e);
            }
        }
    }
    pool.give_back(conn);
    Ok(users.iter().map(|_| Outcome::Function).collect())
}

/// One read and transaction. `Ok(None)`: a watched key changed, nothing was written.
async fn attempt(
    conn: &mut MultiplexedConnection,
    timeout: Duration,
    retention: &Retention,
    users: &[UserItems<'_>],
    keys: &[UserKeys],
) -> Result<Option<Vec<Outcome>>, StoreError> {
    let (plain, now) = read_states(conn, timeout, users, keys).await?;
    if plain.iter().all(Option::is_none) {
        with_timeout(timeout, redis::cmd("UNWATCH").query_async::<()>(&mut *conn)).await?;
        return Ok(Some(users.iter().map(|_| Outcome::Function).collect()));
    }
    let (tx, queued) = queue_writes(retention, users, keys, &plain, now);
    let total: usize = queued.iter().sum();
    let replies: Vec<RedisResult<Value>> =
        with_timeout(timeout, tx.query_async(&mut *conn)).await?;
    if replies.len() != total + 2 {
        return Err(StoreError::reply(format!(
            "transaction answered {} replies for {} commands",
            replies.len(),
            total + 2
        )));
    }
    let exec = match replies.into_iter().last() {
        Some(Ok(Value::Nil)) => return Ok(None),
        Some(Ok(Value::Array(results))) if results.len() == total => results,
        Some(Ok(other)) => {
            return Err(StoreError::reply(format!(
                "EXEC answered {other:?} for {total} commands"
            )));
        }
        None => return Err(StoreError::reply("EXEC answered nothing")),
        // EXECABORT (a command refused while queueing, e.g. out of memory): nothing ran.
        Some(Err(e)) => {
            let error = e.to_string();
            return Ok(Some(
                users
                    .iter()
                    .zip(plain)
                    .map(|(_, state)| match state {
                        Some(state) => Outcome::Written(Written {
                            epoch: state.epoch,
                            last_seq: state.seq,
                            ts: now,
                            edges: state.live,
                            failure: Some((0, error.clone())),
                        }),
                        None => Outcome::Function,
                    })
                    .collect(),
            ));
        }
    };

    Ok(Some(outcomes(users, plain, &queued, exec, now)))
}

/// `WATCH`es every user's state and registry and reads, in the same pipeline, each state,
/// stream type and registry, and Redis's clock: per user its plain state (`None`: it goes
/// through the Function), and now (ms).
async fn read_states(
    conn: &mut MultiplexedConnection,
    timeout: Duration,
    users: &[UserItems<'_>],
    keys: &[UserKeys],
) -> Result<(Vec<Option<Plain>>, u64), StoreError> {
    let mut read = redis::pipe();
    read.ignore_errors();
    let watch = read.cmd("WATCH");
    for k in keys {
        watch.arg(&k.meta).arg(&k.registry);
    }
    for k in keys {
        read.cmd("HMGET")
            .arg(&k.meta)
            .arg("epoch")
            .arg("seq")
            .arg("x");
        read.cmd("TYPE").arg(&k.stream);
        read.cmd("ZRANGE")
            .arg(&k.registry)
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES");
    }
    read.cmd("TIME");
    let replies: Vec<RedisResult<Value>> =
        with_timeout(timeout, read.query_async(&mut *conn)).await?;
    let expected = 2 + 3 * users.len();
    if replies.len() != expected {
        return Err(StoreError::reply(format!(
            "read pipeline answered {} replies for {expected} commands",
            replies.len()
        )));
    }
    // The count was checked; a missing reply would read as nil, which is never plain.
    let mut replies = replies.into_iter();
    let mut next = move || replies.next().unwrap_or(Ok(Value::Nil));
    next().map_err(StoreError::from_redis)?; // WATCH
    let states: Vec<_> = users.iter().map(|_| (next(), next(), next())).collect();
    let now = parse_time(next().map_err(StoreError::from_redis)?)?;
    let plain: Vec<Option<Plain>> = states
        .into_iter()
        .map(|(meta, kind, leases)| plain_state(meta, kind, leases, now))
        .collect();

    Ok((plain, now))
}

/// The transaction for the plain users: their `XADD`s with ids `<seq>-<now>`, the trim, the
/// state and expiry updates and the removal of expired leases, between `MULTI` and `EXEC`;
/// with how many commands each user queued (0 for a user left to the Function).
fn queue_writes(
    retention: &Retention,
    users: &[UserItems<'_>],
    keys: &[UserKeys],
    plain: &[Option<Plain>],
    now: u64,
) -> (redis::Pipeline, Vec<usize>) {
    let ttl = retention.ttl.as_millis() as u64;
    let now_s = now.to_string();
    let items: usize = users.iter().map(|u| u.payloads.len()).sum();
    let mut tx = redis::Pipeline::with_capacity(items + 6 * users.len() + 2);
    tx.ignore_errors();
    tx.cmd("MULTI");
    // Per fast user: how many commands it queued, its XADDs first.
    let mut queued = Vec::with_capacity(users.len());
    let mut id = String::new();
    for ((u, k), state) in users.iter().zip(keys).zip(plain) {
        let Some(state) = state else {
            queued.push(0);
            continue;
        };
        let (meta, stream) = (&k.meta, &k.stream);
        for (seq, payload) in (state.seq + 1..).zip(&u.payloads) {
            id.clear();
            let _ = write!(id, "{seq}-{now}");
            // Sized up front: growing each command's buffer was a tenth of the ingest's CPU.
            let mut xadd =
                redis::Cmd::with_capacity(5, 8 + stream.len() + id.len() + payload.len());
            xadd.arg("XADD")
                .arg(stream)
                .arg(id.as_str())
                .arg("p")
                .arg(*payload);
            tx.add_command(xadd);
        }
        let last_seq = state.seq + u.payloads.len() as u64;
        let mut n = u.payloads.len();
        if last_seq > retention.max_len {
            tx.cmd("XTRIM")
                .arg(stream)
                .arg("MAXLEN")
                .arg("~")
                .arg(retention.max_len);
            n += 1;
        }
        // The Function's expiry rule: refresh when 1% of the inactivity expiry has passed.
        if now.saturating_sub(state.refreshed) >= ttl / 100 {
            tx.cmd("HSET")
                .arg(meta)
                .arg("seq")
                .arg(last_seq)
                .arg("x")
                .arg(&now_s);
            for key in [meta, stream, &k.acks] {
                tx.cmd("PEXPIRE").arg(key).arg(ttl);
            }
            n += 4;
        } else {
            tx.cmd("HSET").arg(meta).arg("seq").arg(last_seq);
            n += 1;
        }
        if !state.expired.is_empty() {
            tx.cmd("ZREM").arg(&k.registry).arg(&state.expired);
            n += 1;
        }
        queued.push(n);
    }
    tx.cmd("EXEC");
    (tx, queued)
}

/// Each user's outcome from `EXEC`'s results, `queued[i]` of them user i's.
fn outcomes(
    users: &[UserItems<'_>],
    plain: Vec<Option<Plain>>,
    queued: &[usize],
    exec: Vec<Value>,
    now: u64,
) -> Vec<Outcome> {
    let mut results = exec.into_iter();
    let mut outcomes = Vec::with_capacity(users.len());
    for ((u, state), &n) in users.iter().zip(plain).zip(queued) {
        let Some(state) = state else {
            outcomes.push(Outcome::Function);
            continue;
        };
        let mine: Vec<Value> = results.by_ref().take(n).collect();
        // With the keys watched and checked, an XADD cannot be refused; if one is anyway,
        // say so and report the user's items from there on as failed.
        let refused = mine
            .iter()
            .take(u.payloads.len())
            .position(|v| matches!(v, Value::ServerError(_)));
        let failure = refused.map(|at| {
            let error = format!("{:?}", mine[at]);
            tracing::error!(user = %u.user.as_str(), at, %error, "native XADD refused inside a transaction");
            (at, error)
        });
        outcomes.push(Outcome::Written(Written {
            epoch: state.epoch,
            last_seq: state.seq + refused.unwrap_or(u.payloads.len()) as u64,
            ts: now,
            edges: state.live,
            failure,
        }));
    }
    outcomes
}

/// `TIME` -> ms.
fn parse_time(v: Value) -> Result<u64, StoreError> {
    let (s, us): (u64, u64) = redis::from_redis_value(v)
        .map_err(|e| StoreError::reply(format!("TIME answered something else: {e}")))?;
    Ok(s * 1000 + us / 1000)
}

/// The user's state when this path may append for it, else `None` (the Function will).
fn plain_state(
    meta: RedisResult<Value>,
    kind: RedisResult<Value>,
    leases: RedisResult<Value>,
    now: u64,
) -> Option<Plain> {
    let (epoch, seq, refreshed): (Option<String>, Option<u64>, Option<u64>) =
        redis::from_redis_value(meta.ok()?).ok()?;
    let epoch = epoch?;
    let seq = seq.unwrap_or(0);
    // The stream: none yet (nothing appended, or it expired a moment before the state), or
    // a stream; a key of another type must fail in the Function, not in the transaction.
    let kind: String = redis::from_redis_value(kind.ok()?).ok()?;
    if kind != "stream" && kind != "none" {
        return None;
    }
    // A registry Redis refuses to read wakes nobody, as in the Function.
    let pairs: Vec<(String, f64)> = leases
        .ok()
        .and_then(|v| redis::from_redis_value(v).ok())
        .unwrap_or_default();
    let (mut live, mut expired) = (Vec::new(), Vec::new());
    for (edge, expiry) in pairs {
        if expiry > now as f64 {
            live.push(edge);
        } else {
            expired.push(edge);
        }
    }
    Some(Plain {
        epoch,
        seq,
        refreshed: refreshed.unwrap_or(0),
        live,
        expired,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn meta(epoch: Option<&str>, seq: Option<&str>) -> RedisResult<Value> {
        Ok(Value::Array(vec![
            epoch.map_or(Value::Nil, bulk),
            seq.map_or(Value::Nil, bulk),
            Value::Nil,
        ]))
    }

    fn kind(k: &str) -> RedisResult<Value> {
        Ok(Value::SimpleString(k.to_owned()))
    }

    fn leases(pairs: &[(&str, &str)]) -> RedisResult<Value> {
        Ok(Value::Array(
            pairs.iter().flat_map(|(e, s)| [bulk(e), bulk(s)]).collect(),
        ))
    }

    #[test]
    fn a_plain_log_is_read_with_its_live_and_expired_leases() {
        let state = plain_state(
            meta(Some("e1"), Some("7")),
            kind("stream"),
            leases(&[("a", "2000"), ("b", "500")]),
            1000,
        )
        .expect("plain");
        assert_eq!((state.epoch.as_str(), state.seq), ("e1", 7));
        assert_eq!(state.live, ["a"]);
        assert_eq!(state.expired, ["b"]);
    }

    #[test]
    fn anything_but_a_plain_log_goes_to_the_function() {
        let none = || leases(&[]);
        // No log yet.
        assert!(plain_state(meta(None, None), kind("none"), none(), 0).is_none());
        // A key of the wrong type.
        let wrong = || {
            Err(redis::RedisError::from((
                redis::ErrorKind::Client,
                "WRONGTYPE",
            )))
        };
        assert!(plain_state(wrong(), kind("stream"), none(), 0).is_none());
        assert!(plain_state(meta(Some("e"), Some("7")), kind("hash"), none(), 0).is_none());
        assert!(plain_state(meta(Some("e"), Some("7")), wrong(), none(), 0).is_none());
        // A log with nothing appended yet, and a registry Redis refuses, are plain.
        let empty = plain_state(meta(Some("e"), None), kind("none"), wrong(), 0).expect("plain");
        assert_eq!(empty.seq, 0);
        assert!(empty.live.is_empty());
    }
}
