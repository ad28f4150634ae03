//! Reading a user's retained notifications (`GET /v1/users/{user}/notifications`), for
//! producers and support tooling.

use std::time::Duration;

pub use gapless_shared::api::{History, HistoryEntry as Entry};
use gapless_shared::ids::UserId;
use gapless_shared::keys::{self, UserKeys};
use gapless_shared::store::Store;
use gapless_shared::store::{StoreError, with_timeout};
use redis::streams::StreamRangeReply;
use serde_json::value::RawValue;

/// Entries answered when the request names no limit.
pub const DEFAULT_LIMIT: usize = 100;
/// Most entries one request may ask for.
pub const MAX_LIMIT: usize = 1000;

/// Reads up to `limit` entries after `after`.
pub async fn read(
    conn: &mut Store,
    timeout: Duration,
    user: &UserId,
    after: u64,
    limit: usize,
) -> Result<History, StoreError> {
    let keys = UserKeys::new(user);
    let start = keys::entry_id(after.saturating_add(1));
    let mut pipe = redis::pipe();
    pipe.cmd("HMGET")
        .arg(&keys.meta)
        .arg("epoch")
        .arg("seq")
        .cmd("XRANGE")
        .arg(&keys.stream)
        .arg(start)
        .arg("+")
        .arg("COUNT")
        .arg(limit);
    let ((epoch, last_seq), range): ((Option<String>, Option<u64>), StreamRangeReply) =
        with_timeout(timeout, pipe.query_async(conn)).await?;
    let mut notifications = Vec::with_capacity(range.ids.len());
    for entry in range.ids {
        let corrupt = |what: &str| StoreError::reply(format!("stream entry {}: {what}", entry.id));
        let seq = keys::parse_entry_id(&entry.id).ok_or_else(|| corrupt("id is not <seq>-<ms>"))?;
        let ts: u64 = keys::entry_ts(&entry.id)
            .or_else(|| entry.get(keys::FIELD_TS))
            .ok_or_else(|| corrupt("no ingest time"))?;
        let payload: String = entry
            .get(keys::FIELD_PAYLOAD)
            .ok_or_else(|| corrupt("no payload"))?;
        let payload = RawValue::from_string(payload).map_err(|_| corrupt("payload is not JSON"))?;
        notifications.push(Entry { seq, ts, payload });
    }
    Ok(History {
        user: user.as_str().to_owned(),
        epoch,
        last_seq: last_seq.unwrap_or(0),
        notifications,
    })
}
