//! A load-generator process: holds a share of the run's devices, each a
//! [`gapless_client::Client`] (authenticated, resumed, acking, answering heartbeats,
//! reconnecting with backoff and resuming exactly after any disconnect), and reports to the
//! coordinator on stdout every tick.
//!
//! Protocol with the coordinator: it writes `open <n>` lines on stdin (hold the first `n`
//! devices of this worker's range, opened at `--rate` per second); every tick this process
//! prints one `tick <json>` line with its counters and the latencies recorded since the last
//! tick. Closing stdin ends the process.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gapless_client::{Client, ClientConfig, Event};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::transports::TransportMix;

/// Settings of a worker process (started by `gapless-bench load`; not for direct use).
#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    /// Edge URLs; device `i` connects to `urls[i % len]`.
    #[arg(long, value_delimiter = ',')]
    urls: Vec<String>,
    /// First device index.
    #[arg(long)]
    from: usize,
    /// Devices in this worker's range.
    #[arg(long)]
    count: usize,
    /// Connections opened per second.
    #[arg(long)]
    rate: usize,
    /// Local addresses to connect from; device `j` of this worker uses the `j / 10,000`th,
    /// from port 10,000 + `j % 10,000`.
    #[arg(long, value_delimiter = ',', required = true)]
    sources: Vec<IpAddr>,
    /// HS256 secret the edges accept.
    #[arg(long)]
    jwt_secret: String,
    /// Device id of every connection (one device per user).
    #[arg(long)]
    device: String,
    /// Transport of the devices (`mixed`: device `i` by `i % 3`).
    #[arg(long, value_enum, default_value_t = TransportMix::Ws)]
    transport: TransportMix,
    /// Reporting interval, ms.
    #[arg(long, default_value_t = 250)]
    tick_ms: u64,
}

/// Connections per source address.
pub const PER_SOURCE: usize = 10_000;
/// Source ports are FIRST_PORT.. FIRST_PORT + PER_SOURCE: below the ephemeral range, so
/// never one the kernel handed to another socket.
const FIRST_PORT: u16 = 10_000;

/// What a worker reports each tick.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct TickReport {
    /// Devices connected and resumed now.
    pub open: u64,
    /// Connections established so far (first connects and reconnects).
    pub connects: u64,
    /// Notifications delivered so far (the client drops duplicates).
    pub delivered: u64,
    /// Duplicates the clients dropped so far.
    pub duplicates: u64,
    /// Gaps the clients detected so far.
    pub gaps: u64,
    /// Resets received so far.
    pub resets: u64,
    /// Latencies recorded since the last tick: (µs, count).
    pub hist: Vec<(u64, u64)>,
}

/// The user of device `i`.
pub fn user(i: usize) -> String {
    format!("load-{i}")
}

/// Microseconds since the Unix epoch (the producers' send time in each payload).
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// A latency histogram: 1 µs to 10 minutes, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// Counters every device of the worker updates.
#[derive(Default)]
struct Counters {
    open: AtomicU64,
    connects: AtomicU64,
    delivered: AtomicU64,
    duplicates: AtomicU64,
    gaps: AtomicU64,
    resets: AtomicU64,
}

/// The send time a load payload carries.
#[derive(Deserialize)]
struct Sent {
    /// µs since the Unix epoch.
    s: u64,
}

/// Runs the worker until its stdin closes.
pub async fn run(args: WorkerArgs) -> anyhow::Result<()> {
    anyhow::ensure!(!args.urls.is_empty(), "--urls must name at least one edge");
    let counters = Arc::new(Counters::default());
    let latencies = Arc::new(Mutex::new(histogram()));
    let (want_tx, mut want_rx) = tokio::sync::watch::channel(0usize);
    // Commands from the coordinator.
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(n) = line
                .strip_prefix("open ")
                .and_then(|n| n.trim().parse().ok())
            {
                let _ = want_tx.send(n);
            }
        }
        // Stdin closed: the coordinator is gone or done.
        std::process::exit(0);
    });
    // Reports to the coordinator.
    let (c, l) = (counters.clone(), latencies.clone());
    let tick = Duration::from_millis(args.tick_ms.max(10));
    tokio::spawn(async move {
        let mut out = tokio::io::stdout();
        let mut interval = tokio::time::interval(tick);
        loop {
            interval.tick().await;
            let hist = {
                let mut h = l.lock().expect("latency lock is never poisoned");
                let pairs = h
                    .iter_recorded()
                    .map(|v| (v.value_iterated_to(), v.count_at_value()))
                    .collect();
                h.reset();
                pairs
            };
            let report = TickReport {
                open: c.open.load(Ordering::Relaxed),
                connects: c.connects.load(Ordering::Relaxed),
                delivered: c.delivered.load(Ordering::Relaxed),
                duplicates: c.duplicates.load(Ordering::Relaxed),
                gaps: c.gaps.load(Ordering::Relaxed),
                resets: c.resets.load(Ordering::Relaxed),
                hist,
            };
            let Ok(json) = serde_json::to_string(&report) else {
                continue;
            };
            if out
                .write_all(format!("tick {json}\n").as_bytes())
                .await
                .is_err()
                || out.flush().await.is_err()
            {
                std::process::exit(0);
            }
        }
    });

    let mut devices: Vec<JoinHandle<()>> = Vec::with_capacity(args.count);
    let pause = Duration::from_secs_f64(1.0 / args.rate.max(1) as f64);
    loop {
        let want = (*want_rx.borrow_and_update()).min(args.count);
        let mut next = Instant::now();
        while devices.len() < want {
            let i = args.from + devices.len();
            let mut config = ClientConfig::new(
                vec![args.urls[i % args.urls.len()].clone()],
                gapless_shared::token::mint_hs256(
                    &args.jwt_secret,
                    &user(i),
                    Some(&args.device),
                    Duration::from_secs(24 * 3600),
                ),
            );
            config.transport = args.transport.of_device(i);
            // Device j binds its own (address, port): no kernel search for a free port
            // (WebSocket; SSE and poll bind the address and let the kernel pick the port).
            let j = devices.len();
            let source = args.sources[(j / PER_SOURCE) % args.sources.len()];
            let port = FIRST_PORT + (j % PER_SOURCE) as u16;
            config.local_addr = Some(std::net::SocketAddr::new(source, port));
            config.backoff_min = Duration::from_millis(200);
            config.backoff_max = Duration::from_secs(5);
            config.connect_timeout = Duration::from_secs(15);
            devices.push(tokio::spawn(device(
                config,
                counters.clone(),
                latencies.clone(),
            )));
            next += pause;
            tokio::time::sleep_until(next).await;
        }
        if want_rx.changed().await.is_err() {
            return Ok(());
        }
    }
}

/// One device: connect, resume, record and ack every notification, reconnect forever.
async fn device(config: ClientConfig, c: Arc<Counters>, latencies: Arc<Mutex<Histogram<u64>>>) {
    let mut client = Client::new(config, None);
    let mut connected = false;
    let mut seen = client.stats();
    loop {
        match client.next_event().await {
            Event::Connected { .. } => {
                connected = true;
                c.open.fetch_add(1, Ordering::Relaxed);
                c.connects.fetch_add(1, Ordering::Relaxed);
            }
            Event::Notification(n) => {
                if let Ok(sent) = serde_json::from_str::<Sent>(n.payload.get()) {
                    let us = now_us().saturating_sub(sent.s).max(1);
                    let _ = latencies
                        .lock()
                        .expect("latency lock is never poisoned")
                        .record(us.min(600_000_000));
                }
                c.delivered.fetch_add(1, Ordering::Relaxed);
                client.ack(n.seq);
            }
            Event::Reset { .. } => {
                c.resets.fetch_add(1, Ordering::Relaxed);
            }
            Event::Disconnected { retry_in, .. } => {
                if connected {
                    connected = false;
                    c.open.fetch_sub(1, Ordering::Relaxed);
                }
                tokio::time::sleep(retry_in).await;
            }
        }
        let stats = client.stats();
        c.duplicates
            .fetch_add(stats.duplicates - seen.duplicates, Ordering::Relaxed);
        c.gaps.fetch_add(stats.gaps - seen.gaps, Ordering::Relaxed);
        seen = stats;
    }
}
