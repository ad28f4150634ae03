//! The producers of a load run: batches through the ingest at the run's rate, addressed to
//! the devices that have settled, every payload carrying its send time (µs) for the
//! workers' latency histograms.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::worker;
use crate::producer::{Format, Ingest, notification, payload};

/// What the producers count, read by the sampler and the report.
#[derive(Default)]
pub(super) struct ProducerMeters {
    /// Notifications the ingest acknowledged.
    pub(super) sent: AtomicU64,
    /// Notifications it refused, or whose request failed.
    pub(super) refused: AtomicU64,
    /// Most the producers' batch timer fired late since the sampler last looked, µs.
    pub(super) lag_us: AtomicU64,
}

/// Where and how fast the producers append.
pub(super) struct Producer {
    pub(super) ingest_url: String,
    pub(super) api_key: String,
    /// Notifications per second.
    pub(super) rate: u64,
    /// One batch per this interval.
    pub(super) every: Duration,
}

/// Appends at `rate` per second through the batch API, addressed across the settled users,
/// until `stop`. One batch every `every`, up to 16 in flight.
pub(super) async fn produce(
    Producer {
        ingest_url,
        api_key,
        rate,
        every,
    }: Producer,
    addressable: Arc<Mutex<Vec<std::ops::Range<usize>>>>,
    meters: Arc<ProducerMeters>,
    stop: CancellationToken,
) {
    // No timeout of its own: a slow answer is the latency being measured, and at most 16
    // requests are in flight.
    let ingest = Ingest::with_client(reqwest::Client::new(), &ingest_url, &api_key);
    let in_flight = Arc::new(tokio::sync::Semaphore::new(16));
    let mut tick = tokio::time::interval(every);
    // A producer that was held up sends what it owes in its next batch, as a batching
    // producer does, not a burst of back-to-back requests (tokio's Burst), which would only
    // queue in the ingest.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut owed = 0.0f64;
    let mut accrued_until = Instant::now();
    loop {
        tokio::select! {
            due = tick.tick() => {
                let late = due.elapsed().as_micros() as u64;
                meters.lag_us.fetch_max(late, Ordering::Relaxed);
            }
            () = stop.cancelled() => break,
        }
        let ranges = addressable
            .lock()
            .expect("addressable lock is never poisoned")
            .clone();
        let users: usize = ranges.iter().map(std::ops::Range::len).sum();
        let now = Instant::now();
        owed += rate as f64 * (now - accrued_until).as_secs_f64();
        accrued_until = now;
        if users == 0 {
            // Nobody to address yet: nothing is owed for this time.
            owed = 0.0;
            continue;
        }
        let count = owed.floor() as usize;
        if count == 0 {
            continue;
        }
        owed -= count as f64;
        let mut picked = Vec::with_capacity(count);
        for _ in 0..count {
            let mut pick = rand::thread_rng().gen_range(0..users);
            let mut device = 0;
            for r in &ranges {
                if pick < r.len() {
                    device = r.start + pick;
                    break;
                }
                pick -= r.len();
            }
            let sent = payload(&serde_json::json!({"s": worker::now_us()}));
            picked.push((worker::user(device), sent));
        }
        let items: Vec<_> = picked
            .iter()
            .map(|(user, sent)| notification(user, sent, None))
            .collect();
        let body = serde_json::to_vec(&items).expect("notifications always serialise");
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        let (ingest, meters) = (ingest.clone(), meters.clone());
        tokio::spawn(async move {
            match ingest.send_batch(Format::Json, body.into()).await {
                Ok(results) => {
                    let ok = results.iter().filter(|r| r.is_ok()).count() as u64;
                    meters.sent.fetch_add(ok, Ordering::Relaxed);
                    meters
                        .refused
                        .fetch_add(count as u64 - ok, Ordering::Relaxed);
                }
                Err(_) => {
                    meters.refused.fetch_add(count as u64, Ordering::Relaxed);
                }
            }
            drop(permit);
        });
    }
    // Wait for the requests in flight.
    let _ = in_flight.acquire_many(16).await;
}
