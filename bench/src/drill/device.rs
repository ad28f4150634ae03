//! A simulated device: a [`gapless_client::Client`] that records everything it receives and,
//! if flappy, misbehaves the way phones do: clean closes, aborted connections, frozen sockets
//! (stops reading and answering, so only heartbeats notice), and app restarts that forget the
//! position and resume from the stored ack.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use gapless_client::{Client, ClientConfig, Event, Transport};
use gapless_shared::protocol::ResetReason;
use gapless_shared::store::Store;
use rand::Rng;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// One notification as a device received it.
#[derive(Debug, Clone)]
pub struct Received {
    /// Which connection of the device (1, 2, …).
    pub conn: u32,
    /// Epoch.
    pub epoch: Arc<str>,
    /// Seq.
    pub seq: u64,
    /// When, ms since the drill started.
    pub at_ms: u64,
}

/// Everything a device saw.
#[derive(Debug, Default)]
pub struct DeviceLog {
    /// The user.
    pub user: String,
    /// The transport the device spoke.
    pub transport: Transport,
    /// Notifications in arrival order.
    pub received: Vec<Received>,
    /// Resets: (connection, first_seq, reason).
    pub resets: Vec<(u32, u64, ResetReason)>,
    /// App restarts: (first connection after it, the stored ack seq it resumed from).
    pub forgets: Vec<(u32, u64)>,
    /// Duplicates the client library dropped (wire-level repeats).
    pub wire_duplicates: u64,
    /// Gaps the client library detected itself.
    pub client_gaps: u64,
    /// Connections made.
    pub connects: u32,
}

/// State the drill reads while the device runs.
#[derive(Debug, Default)]
pub struct DeviceShared {
    /// Connected right now.
    pub connected: AtomicBool,
    /// Highest seq received.
    pub max_seq: AtomicU64,
    /// Freeze (stop reading) until this many ms since the drill started; 0 = not frozen.
    pub freeze_until_ms: AtomicU64,
}

/// How a device behaves.
#[derive(Clone)]
pub struct DeviceSpec {
    /// The user.
    pub user: String,
    /// The device id.
    pub device: String,
    /// Client configuration (edge URLs, token, timings).
    pub config: ClientConfig,
    /// Misbehaves on its own every few seconds.
    pub flappy: bool,
    /// Frozen sockets last this long (beyond two heartbeat intervals).
    pub freeze_for: Duration,
    /// The deployment's Redis, to read the stored ack when the app "restarts".
    pub store: Store,
}

/// Runs a device until `stop`; returns its log.
pub async fn run(
    spec: DeviceSpec,
    shared: Arc<DeviceShared>,
    epoch_start: Instant,
    stop: CancellationToken,
) -> DeviceLog {
    let mut log = DeviceLog {
        user: spec.user.clone(),
        transport: spec.config.transport,
        ..DeviceLog::default()
    };
    let mut client = Client::new(spec.config.clone(), None);
    let mut epoch: Arc<str> = Arc::from("");
    let now_ms = || epoch_start.elapsed().as_millis() as u64;
    let mut next_flap = Instant::now() + flap_delay();
    loop {
        let frozen_until = shared.freeze_until_ms.load(Ordering::Relaxed);
        if frozen_until > now_ms() {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(frozen_until - now_ms())) => {}
                () = stop.cancelled() => break,
            }
            continue;
        }
        let event = tokio::select! {
            e = client.next_event() => e,
            () = tokio::time::sleep_until(next_flap), if spec.flappy => {
                next_flap = Instant::now() + flap_delay();
                let roll = rand::thread_rng().gen_range(0..10);
                match roll {
                    0..=3 => client.close().await,
                    4..=6 => client.abort(),
                    7..=8 => {
                        let until = now_ms() + spec.freeze_for.as_millis() as u64;
                        shared.freeze_until_ms.store(until, Ordering::Relaxed);
                    }
                    _ => {
                        // The app restarts: the position in memory is gone; it resumes from
                        // the ack the edge stored (after the old connection's last flush).
                        client.close().await;
                        tokio::time::sleep(Duration::from_millis(1500)).await;
                        let stored = stored_ack(spec.store.clone(), &spec.user, &spec.device)
                            .await
                            .unwrap_or(0);
                        absorb_stats(&mut log, &client);
                        client = Client::new(spec.config.clone(), None);
                        log.forgets.push((log.connects + 1, stored));
                    }
                }
                continue;
            }
            () = stop.cancelled() => break,
        };
        match event {
            Event::Connected { .. } => {
                log.connects += 1;
                shared.connected.store(true, Ordering::Relaxed);
            }
            Event::Notification(n) => {
                if *epoch != *n.epoch {
                    epoch = Arc::from(n.epoch.as_str());
                }
                log.received.push(Received {
                    conn: log.connects,
                    epoch: epoch.clone(),
                    seq: n.seq,
                    at_ms: now_ms(),
                });
                shared.max_seq.fetch_max(n.seq, Ordering::Relaxed);
                client.ack(n.seq);
            }
            Event::Reset {
                first_seq, reason, ..
            } => log.resets.push((log.connects, first_seq, reason)),
            Event::Disconnected { retry_in, .. } => {
                shared.connected.store(false, Ordering::Relaxed);
                tokio::select! {
                    () = tokio::time::sleep(retry_in) => {}
                    () = stop.cancelled() => break,
                }
            }
        }
    }
    absorb_stats(&mut log, &client);
    log
}

fn absorb_stats(log: &mut DeviceLog, client: &Client) {
    let stats = client.stats();
    log.wire_duplicates += stats.duplicates;
    log.client_gaps += stats.gaps;
}

fn flap_delay() -> Duration {
    Duration::from_millis(rand::thread_rng().gen_range(4_000..15_000))
}

/// The device's stored ack seq (`<epoch>:<seq>[:<unix s>]` at `gl:{user}:a`).
async fn stored_ack(mut store: Store, user: &str, device: &str) -> Option<u64> {
    let value: Option<String> = redis::cmd("HGET")
        .arg(format!("gl:{{{user}}}:a"))
        .arg(device)
        .query_async(&mut store)
        .await
        .ok()?;
    gapless_shared::presence::Position::parse(&value?).map(|p| p.seq)
}
