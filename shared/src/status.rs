//! What each edge reports about itself every second, for the ingest's live status page
//! (`GET /status`, `GET /v1/status`): the edge writes an [`EdgeStatus`] to
//! `gl:edge:<id>:status` and its id to the sorted set `gl:edges`; the ingest reads them back
//! with the edge's registry lease. An edge that died keeps its last report, which then ages:
//! the page shows it as silent, with its lease gone.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// How often an edge reports.
pub const REPORT_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// How long a report is kept after the edge's last one (then the edge leaves the page).
pub const REPORT_TTL_MS: u64 = 3600 * 1000;

/// One edge's report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EdgeStatus {
    /// The edge.
    pub edge: String,
    /// When it was written, ms since the Unix epoch.
    pub at: u64,
    /// When the edge started, ms since the Unix epoch.
    pub started: u64,
    /// The edge is draining (refusing new connections, closing its clients).
    pub draining: bool,
    /// Open sessions by transport.
    pub connections: Connections,
    /// Notifications handed to a transport per second, over the last report interval
    /// (live and replayed).
    pub delivered_per_s: f64,
    /// p99 of live deliveries' ingest-to-send latency over the last interval, ms (an upper
    /// bucket bound); `None` when nothing was delivered live.
    pub p99_ms: Option<f64>,
    /// Length of the edge's registry lease, ms.
    pub lease_ms: u64,
}

/// Open sessions by transport.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Connections {
    /// WebSocket.
    pub websocket: u64,
    /// Server-Sent Events.
    pub sse: u64,
    /// Held long-polls.
    pub poll: u64,
}

impl Connections {
    /// All of them.
    pub fn total(&self) -> u64 {
        self.websocket + self.sse + self.poll
    }
}

/// Upper bounds of the latency buckets, seconds (the Prometheus histogram's).
pub const LATENCY_BOUNDS: &[f64] = crate::telemetry::SECONDS_BUCKETS;

/// Live delivery latencies counted per bucket, lock-free: one atomic add per delivery.
#[derive(Debug)]
pub struct LatencyBuckets {
    /// Counts per bucket of [`LATENCY_BOUNDS`], then one for everything above.
    counts: Vec<AtomicU64>,
}

impl Default for LatencyBuckets {
    fn default() -> Self {
        Self {
            counts: (0..=LATENCY_BOUNDS.len())
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }
}

impl LatencyBuckets {
    /// Counts one latency.
    pub fn record(&self, seconds: f64) {
        let i = LATENCY_BOUNDS.partition_point(|&bound| bound < seconds);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
    }

    /// The counts so far.
    pub fn snapshot(&self) -> Vec<u64> {
        self.counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }
}

/// The p99 (ms, the bucket's upper bound) of what was counted between two snapshots; `None`
/// when nothing was. Above the last bound it answers the last bound.
pub fn p99_ms(before: &[u64], now: &[u64]) -> Option<f64> {
    let deltas: Vec<u64> = now
        .iter()
        .zip(before.iter().chain(std::iter::repeat(&0)))
        .map(|(n, b)| n.saturating_sub(*b))
        .collect();
    let total: u64 = deltas.iter().sum();
    if total == 0 {
        return None;
    }
    // The smallest bucket at or under which 99% of the samples lie.
    let wanted = total - total / 100;
    let mut seen = 0;
    for (i, d) in deltas.iter().enumerate() {
        seen += d;
        if seen >= wanted {
            let bound = LATENCY_BOUNDS.get(i).or(LATENCY_BOUNDS.last())?;
            return Some(bound * 1000.0);
        }
    }
    LATENCY_BOUNDS.last().map(|b| b * 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p99_is_the_bucket_under_which_ninety_nine_percent_lie() {
        let b = LatencyBuckets::default();
        assert_eq!(p99_ms(&b.snapshot(), &b.snapshot()), None);
        let before = b.snapshot();
        for _ in 0..990 {
            b.record(0.0008); // the 1 ms bucket
        }
        for _ in 0..10 {
            b.record(0.2); // the 250 ms bucket
        }
        assert_eq!(p99_ms(&before, &b.snapshot()), Some(1.0));
        let mid = b.snapshot();
        for _ in 0..100 {
            b.record(0.2);
        }
        assert_eq!(
            p99_ms(&mid, &b.snapshot()),
            Some(250.0),
            "only the interval counts"
        );
        b.record(100.0);
        assert_eq!(p99_ms(&b.snapshot(), &b.snapshot()), None);
    }
}
