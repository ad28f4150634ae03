//! The process-wide Prometheus recorder that `/metrics` endpoints render.
//!
//! The `metrics` facade has one global recorder per process; `gapless dev` runs the ingest
//! and an edge in one process, and tests run several servers, so the recorder is installed
//! once here and shared.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Histogram buckets for durations, in seconds: 50 µs .. 10 s.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.000_75, 0.001, 0.001_5, 0.002, 0.003, 0.004, 0.005,
    0.007_5, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// Histogram buckets for counts (batch sizes and the like).
const COUNT_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0,
];

/// The installed recorder's handle, installing it on first use.
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_items".into()), COUNT_BUCKETS))
            .expect("bucket lists are non-empty")
            .install_recorder()
            .expect("gapless installs the only metrics recorder of the process")
    })
}

/// How log lines are written.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event; coloured only on a terminal.
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `target`, `fields`, `span`), for log
    /// collectors; never coloured.
    Json,
}

/// Registers a counter at zero under `labels`, so a dashboard or an alert sees 0 from the
/// first scrape instead of no series until the first event (the exporter lists a counter
/// only once something named it).
pub fn zero_counter(name: &'static str, labels: &[(&'static str, &'static str)]) {
    let labels: Vec<metrics::Label> = labels
        .iter()
        .map(|&(key, value)| metrics::Label::new(key, value))
        .collect();
    metrics::counter!(name, labels).increment(0);
}

/// Logs to stderr in `format`, filtered by `GAPLESS_LOG` (`RUST_LOG` syntax; default `info`).
/// Text is coloured only when stderr is a terminal: a log file or a pipe gets no ANSI
/// escapes. For binaries.
pub fn init_tracing(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("GAPLESS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder
            .json()
            .with_ansi(false)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}

/// The header that carries a request's id, taken from the client when it sends one.
pub const REQUEST_ID: &str = "x-request-id";

/// Wraps `router` so every request has an id (the client's `x-request-id`, else a fresh
/// UUID), answered in the same header, and runs in an `info` span `request` naming it, the
/// method and the path, so every line logged while it runs carries its id; tower-http's
/// lines on each request and response are at `debug` (`GAPLESS_LOG=info,tower_http=debug`
/// shows them). The query is never logged: it may hold a token.
pub fn trace_requests<S: Clone + Send + Sync + 'static>(
    router: axum::Router<S>,
) -> axum::Router<S> {
    use tower_http::request_id::{PropagateRequestIdLayer, SetRequestIdLayer};
    use tower_http::trace::{DefaultOnFailure, DefaultOnRequest, DefaultOnResponse, TraceLayer};
    use tracing::Level;
    let name = http::HeaderName::from_static(REQUEST_ID);
    let trace = TraceLayer::new_for_http()
        .make_span_with(|request: &http::Request<axum::body::Body>| {
            let id = request
                .headers()
                .get(REQUEST_ID)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            tracing::info_span!(
                "request",
                id,
                method = %request.method(),
                path = request.uri().path(),
            )
        })
        .on_request(DefaultOnRequest::new().level(Level::DEBUG))
        .on_response(
            DefaultOnResponse::new()
                .level(Level::DEBUG)
                .latency_unit(tower_http::LatencyUnit::Micros),
        )
        .on_failure(DefaultOnFailure::new().level(Level::DEBUG));
    router
        .layer(PropagateRequestIdLayer::new(name.clone()))
        .layer(trace)
        .layer(SetRequestIdLayer::new(name, FreshRequestId))
}

/// Makes a request's id where the client sent none: a random UUID v4 from the thread's
/// generator (ChaCha, seeded once from the OS). tower-http's `MakeRequestUuid` asks the
/// kernel for its 16 bytes on every request: one `getrandom` syscall per request, ~1.5% of
/// the ingest's CPU under one-item POSTs (`perf record`, BENCHMARKS.md).
#[derive(Debug, Clone, Copy, Default)]
pub struct FreshRequestId;

impl tower_http::request_id::MakeRequestId for FreshRequestId {
    fn make_request_id<B>(
        &mut self,
        _request: &http::Request<B>,
    ) -> Option<tower_http::request_id::RequestId> {
        let id = uuid_v4(rand::random());
        http::HeaderValue::from_str(&id)
            .ok()
            .map(tower_http::request_id::RequestId::new)
    }
}

/// The UUID v4 text of 16 random bytes (uuid's builder sets the version and variant bits).
fn uuid_v4(bytes: [u8; 16]) -> String {
    uuid::Builder::from_random_bytes(bytes)
        .into_uuid()
        .hyphenated()
        .to_string()
}

/// Content type of the Prometheus text format, for `/metrics` answers.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// Runs the recorder's upkeep (keeps histograms bounded) every 5 s until `shutdown`.
pub async fn upkeep(shutdown: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = tick.tick() => prometheus().run_upkeep(),
            () = shutdown.cancelled() => return,
        }
    }
}

/// At most one log line per [`LogThrottle::INTERVAL`] for one kind of event (a flood must
/// not flood the log too), each saying how many it stood for.
#[derive(Debug, Default)]
pub struct LogThrottle {
    /// When the last line was written, ms since the Unix epoch (0: never).
    last_ms: AtomicU64,
    /// Events since then that wrote nothing.
    suppressed: AtomicU64,
}

impl LogThrottle {
    /// The shortest time between two lines.
    pub const INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

    /// A throttle that has written nothing yet (usable in a `static`).
    pub const fn new() -> Self {
        Self {
            last_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Calls `log` with the number of events suppressed since the last line, unless a line
    /// was written less than [`Self::INTERVAL`] ago.
    pub fn log(&self, log: impl FnOnce(u64)) {
        let now = crate::now_ms();
        let last = self.last_ms.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= Self::INTERVAL.as_millis() as u64;
        if due
            && self
                .last_ms
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            log(self.suppressed.swap(0, Ordering::AcqRel));
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_uuid_v4_text_and_differ() {
        assert_eq!(uuid_v4([0; 16]), "00000000-0000-4000-8000-000000000000");
        assert_eq!(uuid_v4([0xff; 16]), "ffffffff-ffff-4fff-bfff-ffffffffffff");
        let mut make = FreshRequestId;
        let request = http::Request::new(());
        let ids: std::collections::HashSet<String> = (0..1000)
            .map(|_| {
                let id =
                    tower_http::request_id::MakeRequestId::make_request_id(&mut make, &request)
                        .expect("an id");
                id.header_value().to_str().expect("ASCII").to_owned()
            })
            .collect();
        assert_eq!(ids.len(), 1000);
        assert!(
            ids.iter()
                .all(|id| id.len() == 36 && id.as_bytes()[14] == b'4')
        );
    }

    #[test]
    fn a_throttle_writes_one_line_per_interval_and_counts_the_rest() {
        let t = LogThrottle::default();
        let mut lines = Vec::new();
        for _ in 0..5 {
            t.log(|suppressed| lines.push(suppressed));
        }
        assert_eq!(lines, [0]);
        t.last_ms.store(1, Ordering::Relaxed); // long ago
        t.log(|suppressed| lines.push(suppressed));
        assert_eq!(lines, [0, 4]);
    }
}
