//! Producers: append at a steady rate, retrying on 503, timeouts and refused connections
//! until acknowledged. Batch and single producers put an idempotency key on every
//! notification, so a retry never duplicates; the bulk producer sends runs of items per user
//! without keys, which the ingest appends through native transactions (README, "Redis
//! layout"), and its retries may store a notification twice, at different seqs (allowed:
//! each seq is delivered once). Every acknowledged (user, epoch, seq) goes to the ledger the
//! checker reads.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use serde_json::value::RawValue;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::producer::{Ingest, ItemResults, SendError, notification, payload};

/// What the ingest acknowledged: user -> (seq, epoch, ms since the drill started).
pub type Ledger = Arc<Mutex<HashMap<String, Vec<(u64, String, u64)>>>>;

/// Counters of a producer.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProducerStats {
    /// Notifications acknowledged.
    pub acknowledged: u64,
    /// Requests retried (503, timeout, refused).
    pub retries: u64,
    /// Acknowledged as duplicates of an earlier attempt (a retry of a write that had landed).
    pub deduplicated: u64,
}

/// How a producer sends.
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    /// Batches every 100 ms.
    Batch,
    /// One request per notification.
    Single,
    /// Batches every 100 ms of runs of [`BULK_RUN`] items per user, without idempotency keys.
    Bulk,
}

/// Items per user in a bulk batch: at least the ingest's default `--native-min-items`.
pub const BULK_RUN: usize = 4;

/// A producer's settings.
pub struct Producer {
    /// Name, part of every idempotency key.
    pub name: String,
    /// Ingest base URL.
    pub ingest_url: String,
    /// API key.
    pub api_key: String,
    /// Users to address.
    pub users: Vec<String>,
    /// Notifications per second.
    pub rate: f64,
    /// Batch or single.
    pub mode: Mode,
}

impl Producer {
    /// Produces until `stop`; returns its counters.
    pub async fn run(
        self,
        ledger: Ledger,
        start: Instant,
        stop: CancellationToken,
    ) -> ProducerStats {
        let ingest = Ingest::new(&self.ingest_url, &self.api_key, Duration::from_secs(3))
            .expect("a plain HTTP client builds");
        let mut stats = ProducerStats::default();
        let mut counter = 0u64;
        // Bulk: whole runs per batch, every 100 ms or, at low rates, less often.
        let runs = ((self.rate / 10.0 / BULK_RUN as f64).round() as usize).max(1);
        let tick = match self.mode {
            Mode::Batch => Duration::from_millis(100),
            Mode::Bulk => Duration::from_secs_f64((runs * BULK_RUN) as f64 / self.rate.max(0.1)),
            Mode::Single => Duration::from_secs_f64(1.0 / self.rate.max(0.1)),
        };
        let per_tick = match self.mode {
            Mode::Batch => (self.rate / 10.0).max(1.0) as usize,
            Mode::Bulk => runs * BULK_RUN,
            Mode::Single => 1,
        };
        let mut next = Instant::now();
        while !stop.is_cancelled() {
            next += tick;
            let mut items = Vec::with_capacity(per_tick);
            let mut user = &self.users[0];
            for i in 0..per_tick {
                counter += 1;
                if !matches!(self.mode, Mode::Bulk) || i % BULK_RUN == 0 {
                    user = &self.users[rand::thread_rng().gen_range(0..self.users.len())];
                }
                let key = format!("{}-{counter}", self.name);
                let sent_ms = start.elapsed().as_millis() as u64;
                items.push(Pending {
                    user: user.clone(),
                    payload: payload(&serde_json::json!({"k": key, "sent_ms": sent_ms})),
                    // Bulk runs go without keys: the ingest appends them natively.
                    key: (!matches!(self.mode, Mode::Bulk)).then_some(key),
                });
            }
            // Retry what is not acknowledged, with the same keys, until it is (or the drill
            // ends: then the items were never acknowledged and the checker expects nothing).
            let mut backoff = Duration::from_millis(50);
            while !items.is_empty() && !stop.is_cancelled() {
                let pending = self.send(&ingest, &items).await;
                let mut retry = Vec::new();
                match pending {
                    Ok(results) => {
                        for (item, result) in items.into_iter().zip(results) {
                            match result {
                                Ok(appended) => {
                                    stats.acknowledged += 1;
                                    stats.deduplicated += u64::from(appended.duplicate);
                                    let at = start.elapsed().as_millis() as u64;
                                    ledger
                                        .lock()
                                        .expect("ledger lock is never poisoned")
                                        .entry(item.user)
                                        .or_default()
                                        .push((appended.seq, appended.epoch, at));
                                }
                                // Refused alone (a per-item error): sent again.
                                Err(_) => retry.push(item),
                            }
                        }
                    }
                    Err(_) => retry = items,
                }
                items = retry;
                if !items.is_empty() {
                    stats.retries += 1;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
            tokio::select! {
                () = tokio::time::sleep_until(next) => {}
                () = stop.cancelled() => {}
            }
            if next < Instant::now() {
                next = Instant::now();
            }
        }
        stats
    }

    /// Sends items, in one batch or one request each; one result per item.
    async fn send(&self, ingest: &Ingest, items: &[Pending]) -> Result<ItemResults, SendError> {
        let items: Vec<_> = items.iter().map(Pending::notification).collect();
        match self.mode {
            Mode::Batch | Mode::Bulk => ingest.append_batch(&items).await,
            Mode::Single => {
                let mut out = Vec::with_capacity(items.len());
                for item in &items {
                    out.push(Ok(ingest.append(item).await?));
                }
                Ok(out)
            }
        }
    }
}

/// A notification not yet acknowledged.
struct Pending {
    user: String,
    payload: Box<RawValue>,
    key: Option<String>,
}

impl Pending {
    fn notification(&self) -> gapless_shared::api::Notification<'_> {
        notification(&self.user, &self.payload, self.key.as_deref())
    }
}
