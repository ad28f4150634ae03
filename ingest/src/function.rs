//! The `gapless_append` Redis Function call (DESIGN.md §1.1): its keys and arguments for one
//! planned call, and its reply read back per user. The layout is documented beside the
//! library in `migrations/gapless.lua`.

use gapless_shared::keys::UserKeys;
use gapless_shared::schema::{FN_APPEND, FN_APPEND_WAKE};
use gapless_shared::store::StoreError;
use redis::Value;

use crate::config::Retention;
use crate::plan::{Call, NewNotification};
use crate::wake::WAKEUP_PAYLOAD_BUDGET;

/// The Function call for one planned call: segments of items, each of one user. With
/// `wake` (the largest payload that rides along) the call publishes their wakeups itself
/// (`gapless_append_wake`). The argument layout is documented in `migrations/`.
pub fn fcall(
    items: &[NewNotification<'_>],
    call: &Call,
    retention: &Retention,
    wake: Option<usize>,
) -> redis::Cmd {
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
    cmd.arg(if wake.is_some() {
        FN_APPEND_WAKE
    } else {
        FN_APPEND
    })
    .arg(keys.len())
    .arg(keys)
    .arg(retention.max_len)
    .arg(retention.ttl.as_millis() as u64)
    .arg(retention.idempotency_ttl.as_millis() as u64);
    if let Some(payload_max) = wake {
        cmd.arg(payload_max).arg(WAKEUP_PAYLOAD_BUDGET);
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

/// What the Function answers for one call.
pub struct CallReply {
    /// Ingest time of every entry of the call, ms.
    pub ts: u64,
    /// One reply per segment, in call order.
    pub users: Vec<UserReply>,
}

/// The Function's answer for one segment.
pub struct UserReply {
    /// Epoch of the user's log.
    pub epoch: String,
    /// Seq of the segment's last appended item (the log's last seq).
    pub last_seq: u64,
    /// (item index from 1, original seq) of each recognised duplicate, in item order.
    pub duplicates: Vec<u64>,
    /// The user's live edges.
    pub edges: Vec<String>,
    /// 0, or the index (from 1) of the first item Redis refused; it and the later items of
    /// the segment were not written.
    pub failed_at: u64,
    /// Redis's error for `failed_at`.
    pub failure: String,
}

impl UserReply {
    /// A user's items all appended, with consecutive seqs ending at `last_seq`.
    pub fn appended(epoch: String, last_seq: u64, edges: Vec<String>) -> Self {
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
    pub fn seqs(&self, n: usize) -> impl Iterator<Item = Option<(u64, bool)>> + '_ {
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
    pub fn check(self, call: &Call) -> Result<Self, StoreError> {
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
            Err(StoreError::reply(format!(
                "{FN_APPEND} answered a reply that does not match its items"
            )))
        }
    }
}

/// A fresh random epoch, used only if this call creates the user's log.
pub fn new_epoch() -> String {
    format!("{:016x}", rand::random::<u64>())
}

#[cfg(test)]
mod tests {
    use super::*;

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
