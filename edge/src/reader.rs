//! Stream reads for every session of the edge, coalesced: requests that arrive together go to
//! Redis in one pipeline on the shared connection (DESIGN.md §1.3, "reads for many users
//! coalesced and pipelined").

use std::sync::Arc;
use std::time::Duration;

use gapless_shared::ids::UserId;
use gapless_shared::keys;
use gapless_shared::store::Store;
use gapless_shared::store::StoreError;
use redis::Value;
use redis::streams::StreamRangeReply;
use serde_json::value::RawValue;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// Most requests in one pipeline.
const MAX_BATCH: usize = 512;
/// Pipelines in flight at once.
const MAX_IN_FLIGHT: usize = 8;

/// One entry of a user's stream.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Its seq.
    pub seq: u64,
    /// Ingest time, ms.
    pub ts: u64,
    /// The payload.
    pub payload: Box<RawValue>,
}

/// The state of a user's log as one read saw it.
#[derive(Debug, Clone, Default)]
pub struct Page {
    /// Current epoch; `None` when the user has no log.
    pub epoch: Option<String>,
    /// Last assigned seq: read before the entries, raised to the last entry's seq.
    pub last_seq: u64,
    /// Entries from the requested seq on.
    pub entries: Vec<Entry>,
    /// The device's stored ack position `(epoch, seq)`, for position reads.
    pub ack: Option<(String, u64)>,
}

/// A read.
#[derive(Debug, Clone)]
pub enum ReadOp {
    /// The log's epoch and last seq, and the device's stored ack.
    Position {
        /// The user.
        user: UserId,
        /// The device.
        device: String,
    },
    /// The log's epoch and last seq, then up to `count` entries from `from` on.
    Range {
        /// The user.
        user: UserId,
        /// First seq wanted.
        from: u64,
        /// Most entries.
        count: usize,
    },
}

struct Request {
    /// What to read.
    op: ReadOp,
    /// Where the answer goes; the session holds the receiver.
    reply: oneshot::Sender<Result<Page, StoreError>>,
}

/// Handle to the reader task. Cheap to clone.
#[derive(Clone)]
pub struct Reader {
    /// Requests to the reader task. Unbounded because each session has at most one read
    /// outstanding, so the queue is bounded by the number of connections.
    tx: mpsc::UnboundedSender<Request>,
}

impl Reader {
    /// Starts the reader task; it ends when `shutdown` is cancelled.
    pub fn spawn(conn: Store, timeout: Duration, shutdown: CancellationToken) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(conn, timeout, rx, shutdown));
        Self { tx }
    }

    /// Queues a read; the answer arrives on the returned channel (an error if the reader is
    /// gone).
    pub fn request(&self, op: ReadOp) -> oneshot::Receiver<Result<Page, StoreError>> {
        let (reply, rx) = oneshot::channel();
        // If the reader has stopped, the dropped sender answers the caller with an error.
        let _ = self.tx.send(Request { op, reply });
        rx
    }
}

async fn run(
    conn: Store,
    timeout: Duration,
    mut rx: mpsc::UnboundedReceiver<Request>,
    shutdown: CancellationToken,
) {
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    loop {
        let first = tokio::select! {
            r = rx.recv() => match r { Some(r) => r, None => return },
            () = shutdown.cancelled() => return,
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let conn = conn.clone();
        tokio::spawn(async move {
            execute(conn, timeout, batch).await;
            drop(permit);
        });
    }
}

async fn execute(conn: Store, timeout: Duration, batch: Vec<Request>) {
    let mut cmds = Vec::with_capacity(2 * batch.len());
    for req in &batch {
        // Both commands of a read go to its user's shard, in this order, in one pipeline.
        let mut state = redis::cmd("HMGET");
        let second = match &req.op {
            ReadOp::Position { user, device } => {
                state.arg(keys::meta(user)).arg("epoch").arg("seq");
                let mut get = redis::cmd("HGET");
                get.arg(keys::acks(user)).arg(device);
                (user, get)
            }
            ReadOp::Range { user, from, count } => {
                // The log's state first, then the entries: appends may run between the two,
                // so only in this order does "last_seq > from but no entry from `from` on"
                // prove that entries were trimmed, rather than appended in between.
                state.arg(keys::meta(user)).arg("epoch").arg("seq");
                let mut range = redis::cmd("XRANGE");
                range
                    .arg(keys::stream(user))
                    .arg(keys::entry_id(*from))
                    .arg("+")
                    .arg("COUNT")
                    .arg(*count);
                (user, range)
            }
        };
        let shard = conn.shard_of(second.0);
        cmds.push((shard, state));
        cmds.push((shard, second.1));
    }
    let started = std::time::Instant::now();
    let result: Result<Vec<redis::RedisResult<Value>>, StoreError> =
        conn.run_per_shard(cmds, timeout).await;
    metrics::histogram!("gapless_redis_duration_seconds", "op" => "read")
        .record(started.elapsed().as_secs_f64());
    let replies = match result {
        Ok(r) if r.len() == 2 * batch.len() => r,
        Ok(r) => {
            let e = StoreError::reply(format!("{} replies for {} reads", r.len(), 2 * batch.len()));
            for req in batch {
                let _ = req.reply.send(Err(e.clone()));
            }
            return;
        }
        Err(e) => {
            metrics::counter!("gapless_redis_errors_total", "op" => "read").increment(1);
            for req in batch {
                let _ = req.reply.send(Err(e.clone()));
            }
            return;
        }
    };
    let mut replies = replies.into_iter();
    for req in batch {
        let (a, b) = (replies.next(), replies.next());
        let page = match (a, b) {
            (Some(Ok(a)), Some(Ok(b))) => parse(&req.op, a, b),
            (Some(Err(e)), _) | (_, Some(Err(e))) => Err(StoreError::from_redis(e)),
            _ => Err(StoreError::reply("missing reply")),
        };
        let _ = req.reply.send(page);
    }
}

fn parse(op: &ReadOp, a: Value, b: Value) -> Result<Page, StoreError> {
    let bad = |e: redis::ParsingError| StoreError::reply(format!("unreadable reply: {e}"));
    match op {
        ReadOp::Position { .. } => {
            let (epoch, last_seq): (Option<String>, Option<u64>) =
                redis::from_redis_value(a).map_err(bad)?;
            let ack: Option<String> = redis::from_redis_value(b).map_err(bad)?;
            Ok(Page {
                epoch,
                last_seq: last_seq.unwrap_or(0),
                entries: Vec::new(),
                ack: ack.as_deref().and_then(parse_position),
            })
        }
        ReadOp::Range { user, .. } => {
            let (epoch, last_seq): (Option<String>, Option<u64>) =
                redis::from_redis_value(a).map_err(bad)?;
            let range: StreamRangeReply = redis::from_redis_value(b).map_err(bad)?;
            let mut entries = Vec::with_capacity(range.ids.len());
            for id in range.ids {
                let Some(seq) = keys::parse_entry_id(&id.id) else {
                    tracing::warn!(user = %user, id = %id.id, "stream entry with a foreign id skipped");
                    continue;
                };
                let ts: u64 = keys::entry_ts(&id.id)
                    .or_else(|| id.get(keys::FIELD_TS))
                    .unwrap_or(0);
                let text: String = id.get(keys::FIELD_PAYLOAD).unwrap_or_default();
                let payload = RawValue::from_string(text).or_else(|e| {
                    // Only a foreign writer can store non-JSON; deliver it as a JSON string
                    // rather than skip the seq.
                    tracing::warn!(user = %user, seq, error = %e, "payload is not JSON; delivered as a string");
                    let raw: String = id.get(keys::FIELD_PAYLOAD).unwrap_or_default();
                    RawValue::from_string(serde_json::Value::String(raw).to_string())
                });
                let payload =
                    payload.map_err(|e| StoreError::reply(format!("payload of seq {seq}: {e}")))?;
                entries.push(Entry { seq, ts, payload });
            }
            let last_seq = last_seq.unwrap_or(0);
            Ok(Page {
                epoch,
                last_seq: entries.last().map_or(last_seq, |e| e.seq.max(last_seq)),
                entries,
                ack: None,
            })
        }
    }
}

/// `<epoch>:<seq>` or `<epoch>:<seq>:<unix s>` -> (epoch, seq); see
/// [`gapless_shared::presence::Position`].
pub fn parse_position(s: &str) -> Option<(String, u64)> {
    gapless_shared::presence::Position::parse(s).map(|p| (p.epoch, p.seq))
}
