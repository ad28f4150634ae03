//! Waking edges (DESIGN.md §1.2): after an append, one `Wakeup` message per live edge of
//! the users appended to, on that edge's channel, pipelined per shard. The registry read that
//! names the live edges happens inside the append (the Function or the transaction), so an
//! edge that registered before the append is always woken. A lost wakeup delays, never loses:
//! edges sweep (DESIGN.md §1.3).
//!
//! A one-item request through the Function on one Redis is woken by the Function itself
//! (`gapless_append_wake`, see [`crate::function`]); everything else is published here.

use std::collections::HashMap;
use std::time::Duration;

use gapless_shared::keys;
use gapless_shared::store::{Store, StoreError};
use gapless_shared::wakeup::{WakeItem, Wakeup};

use crate::plan::NewNotification;

/// Payload bytes one wakeup message may carry in all; past it, entries travel as (user, seq)
/// only and the edge reads them from the stream.
pub const WAKEUP_PAYLOAD_BUDGET: usize = 1 << 20;

/// Wakeups of one request, grouped per edge.
pub struct Wakeups {
    /// The entries each edge will be told about.
    by_edge: HashMap<String, Vec<WakeItem>>,
    /// Largest payload that rides along.
    payload_max: usize,
    /// Payload bytes already in each edge's message.
    budget_used: HashMap<String, usize>,
}

impl Wakeups {
    /// No wakeups yet; payloads up to `payload_max` bytes ride along.
    pub fn new(payload_max: usize) -> Self {
        Self {
            by_edge: HashMap::new(),
            payload_max,
            budget_used: HashMap::new(),
        }
    }

    /// Adds an appended item to the message of each of `edges`; its payload rides along
    /// while it fits the per-item and per-message bounds.
    pub fn add(
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

/// Publishes one wakeup per edge. A failure is logged, not returned: the entries are
/// written, and edges find them without the hint (DESIGN.md §1.3).
pub async fn publish(conn: &Store, timeout: Duration, wakeups: Wakeups) {
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
            let mut publish = redis::cmd(conn.publish_command());
            publish.arg(&channel).arg(Wakeup::V1(items).encode());
            (conn.shard_of_key(&channel), publish)
        })
        .collect();
    let n = cmds.len() as u64;
    let published = conn.run_per_shard(cmds, timeout).await.and_then(|replies| {
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
