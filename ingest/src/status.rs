//! The live status page (`GET /status`) and the JSON it polls every second
//! (`GET /v1/status`), behind the API key like every `/v1` route: connected devices per edge
//! and transport, this ingest's appends/s, deliveries/s and p99 delivery latency, Redis
//! health, and each edge's registry lease and drain state.
//!
//! A browser presents the key by HTTP Basic authentication: `/status` answers a request
//! without credentials with 401 and `WWW-Authenticate: Basic`, the browser asks for a user
//! name (any) and a password (the API key), and sends them again with the page's own
//! `fetch` of `/v1/status` (same origin). Scripts use `Authorization: Bearer <key>`.
//!
//! Edges report themselves every second ([`gapless_shared::status`]); this reads the
//! reports, the edges' leases and this process's own counters: no edge is asked anything.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::response::Response;
pub use gapless_shared::api::{EdgeRow, IngestFigures, Status, Totals};
use gapless_shared::health::HealthSnapshot;
use gapless_shared::keys;
use gapless_shared::status::{Connections, EdgeStatus, REPORT_TTL_MS};
use gapless_shared::store::{Store, StoreError, with_timeout};
use tokio_util::sync::CancellationToken;

/// The page: one HTML file with its CSS and script inline.
const PAGE: &str = include_str!("status.html");

/// Notifications this ingest appended, and their rate over the last second.
#[derive(Debug, Default)]
pub struct AppendRate {
    /// Appended so far (duplicates and rejected items not counted).
    appended: AtomicU64,
    /// Appends per second over the last sampling interval, as `f64` bits.
    per_s: AtomicU64,
    /// The previous sample: (when, count).
    last: Mutex<Option<(std::time::Instant, u64)>>,
}

impl AppendRate {
    /// Counts `n` appended items.
    pub fn add(&self, n: u64) {
        if n > 0 {
            self.appended.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// The rate over the last sampling interval.
    pub fn per_s(&self) -> f64 {
        f64::from_bits(self.per_s.load(Ordering::Relaxed))
    }

    /// Takes a sample: the rate since the previous one.
    fn sample(&self) {
        let now = (
            std::time::Instant::now(),
            self.appended.load(Ordering::Relaxed),
        );
        let Ok(mut last) = self.last.lock() else {
            return;
        };
        if let Some((at, count)) = *last {
            let secs = now.0.duration_since(at).as_secs_f64().max(0.001);
            let rate = now.1.saturating_sub(count) as f64 / secs;
            self.per_s.store(rate.to_bits(), Ordering::Relaxed);
        }
        *last = Some(now);
    }
}

/// Samples `rate` every second until `stop`.
pub async fn sample_loop(rate: Arc<AppendRate>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => rate.sample(),
            () = stop.cancelled() => return,
        }
    }
}

/// A report older than this does not count in the totals (the edge is silent).
const FRESH_MS: u64 = 5_000;

/// Reads the fleet's reports.
pub async fn read(
    conn: &mut Store,
    timeout: Duration,
    appends: &AppendRate,
    redis: HealthSnapshot,
) -> Result<Status, StoreError> {
    let now = gapless_shared::now_ms();
    // Reports older than their expiry are gone: their ids leave the set too.
    let _: Result<u64, _> = with_timeout(
        timeout,
        redis::cmd("ZREMRANGEBYSCORE")
            .arg(keys::EDGES)
            .arg("-inf")
            .arg(now.saturating_sub(REPORT_TTL_MS))
            .query_async(&mut *conn),
    )
    .await;
    let ids: Vec<String> = with_timeout(
        timeout,
        redis::cmd("ZRANGE")
            .arg(keys::EDGES)
            .arg(0)
            .arg(-1)
            .query_async(&mut *conn),
    )
    .await?;
    let mut cmds = Vec::with_capacity(2 * ids.len());
    for id in &ids {
        let status = keys::edge_status(id);
        let lease = keys::edge_lease(id);
        let mut get = redis::cmd("GET");
        get.arg(&status);
        let mut ttl = redis::cmd("PTTL");
        ttl.arg(&lease);
        cmds.push((conn.shard_of_key(&status), get));
        cmds.push((conn.shard_of_key(&lease), ttl));
    }
    let replies = conn.run_per_shard(cmds, timeout).await?;
    let mut edges = Vec::with_capacity(ids.len());
    for pair in replies.chunks(2) {
        let [report, ttl] = pair else { continue };
        let report: Option<String> = report
            .as_ref()
            .ok()
            .and_then(|v| redis::from_redis_value(v.clone()).ok());
        let Some(report) = report.and_then(|r| serde_json::from_str::<EdgeStatus>(&r).ok()) else {
            continue;
        };
        let ttl: i64 = ttl
            .as_ref()
            .ok()
            .and_then(|v| redis::from_redis_value(v.clone()).ok())
            .unwrap_or(-2);
        edges.push(EdgeRow {
            edge: report.edge,
            connections: report.connections,
            delivered_per_s: report.delivered_per_s,
            p99_ms: report.p99_ms,
            draining: report.draining,
            silent_ms: now.saturating_sub(report.at),
            lease_ttl_ms: u64::try_from(ttl).ok(),
            started: report.started,
        });
    }
    edges.sort_by(|a, b| a.edge.cmp(&b.edge));
    let fresh: Vec<&EdgeRow> = edges.iter().filter(|e| e.silent_ms <= FRESH_MS).collect();
    let by_transport = Connections {
        websocket: fresh.iter().map(|e| e.connections.websocket).sum(),
        sse: fresh.iter().map(|e| e.connections.sse).sum(),
        poll: fresh.iter().map(|e| e.connections.poll).sum(),
    };
    let totals = Totals {
        connections: by_transport.total(),
        by_transport,
        delivered_per_s: fresh.iter().map(|e| e.delivered_per_s).sum(),
        p99_ms: fresh.iter().filter_map(|e| e.p99_ms).reduce(f64::max),
    };
    Ok(Status {
        at: now,
        ingest: IngestFigures {
            appends_per_s: appends.per_s(),
        },
        redis,
        totals,
        edges,
    })
}

/// `GET /status`: the page. Its policy lets in only its own inline style and script (by a
/// fresh nonce) and fetches of this origin.
pub fn page() -> Response {
    crate::page::with_nonce(PAGE, |nonce| {
        format!(
            "default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; \
             connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        )
    })
}
