//! A swarm of simulated devices for the load scenarios: N authenticated WebSocket
//! connections opened at a given rate over the edges, each resumed, answering pings, acking
//! and recording the latency of every notification (send time in the payload to receipt).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use futures_util::{SinkExt, StreamExt};
use gapless_shared::protocol::{self, ClientMessage, ServerMessage};
use serde::Deserialize;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::fleet::JWT_SECRET;

/// What the swarm's devices share with the scenario.
#[derive(Default)]
pub struct Tally {
    /// Connections resumed.
    pub open: AtomicUsize,
    /// Notifications received.
    pub delivered: AtomicU64,
    /// Latencies, µs, from the producer's send time to receipt.
    pub latencies_us: Mutex<Vec<u32>>,
}

/// The running swarm; its connections end when it is dropped.
pub struct Swarm {
    /// Shared counters.
    pub tally: Arc<Tally>,
    holders: Vec<JoinHandle<anyhow::Result<()>>>,
}

impl Drop for Swarm {
    fn drop(&mut self) {
        for h in &self.holders {
            h.abort();
        }
    }
}

/// The user of device `i`.
pub fn user(i: usize) -> String {
    format!("load-{i}")
}

/// Microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Opens `n` connections over `urls` at `rate` per second; returns once all are resumed.
pub async fn ramp(urls: &[String], n: usize, rate: usize) -> anyhow::Result<Swarm> {
    let tally = Arc::new(Tally::default());
    let mut swarm = Swarm {
        tally: tally.clone(),
        holders: Vec::with_capacity(n),
    };
    let pause = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let mut next = Instant::now();
    for i in 0..n {
        let url = urls[i % urls.len()].clone();
        let shared = tally.clone();
        swarm
            .holders
            .push(tokio::spawn(async move { hold(url, i, shared).await }));
        next += pause;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        if i % 1000 == 999 {
            eprintln!("opening: {} / {n}", tally.open.load(Ordering::Relaxed));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while tally.open.load(Ordering::Relaxed) < n {
        if Instant::now() > deadline {
            bail!(
                "only {} of {n} connections opened within 60 s",
                tally.open.load(Ordering::Relaxed)
            );
        }
        if let Some(i) = swarm.holders.iter().position(|h| h.is_finished()) {
            let failed = swarm.holders.swap_remove(i).await;
            bail!("a connection ended during the ramp: {failed:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(swarm)
}

/// The send time a load payload carries.
#[derive(Deserialize)]
struct Sent {
    /// µs since the Unix epoch.
    s: u64,
}

/// One device: connects, resumes, answers pings, acks and records until aborted.
async fn hold(url: String, i: usize, tally: Arc<Tally>) -> anyhow::Result<()> {
    let token =
        gapless_edge::auth::mint_hs256(JWT_SECRET, &user(i), Some("d"), Duration::from_secs(3600));
    let mut request = url.into_client_request()?;
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    // The client side of a load test must be small too: tungstenite's default read buffer
    // alone is 128 KiB per connection.
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_write_buffer_size(64 << 10);
    let (mut ws, _) =
        tokio_tungstenite::connect_async_with_config(request, Some(config), false).await?;
    let resume = protocol::to_json(&ClientMessage::Resume {
        epoch: None,
        after: None,
    });
    let mut resumed = false;
    while let Some(frame) = ws.next().await {
        let Message::Text(text) = frame? else {
            continue;
        };
        match protocol::from_json::<ServerMessage>(text.as_str())? {
            ServerMessage::Welcome { .. } if !resumed => {
                ws.send(Message::Text(resume.clone().into())).await?;
                resumed = true;
                tally.open.fetch_add(1, Ordering::Relaxed);
            }
            ServerMessage::Ping => {
                ws.send(Message::Text(
                    protocol::to_json(&ClientMessage::Pong).into(),
                ))
                .await?;
            }
            ServerMessage::Notification(n) => {
                if let Ok(sent) = serde_json::from_str::<Sent>(n.payload.get()) {
                    let us = now_us().saturating_sub(sent.s).min(u64::from(u32::MAX));
                    tally
                        .latencies_us
                        .lock()
                        .expect("latency lock is never poisoned")
                        .push(us as u32);
                }
                tally.delivered.fetch_add(1, Ordering::Relaxed);
                let ack = protocol::to_json(&ClientMessage::Ack { seq: n.seq });
                ws.send(Message::Text(ack.into())).await?;
            }
            _ => {}
        }
    }
    bail!("connection {i} closed")
}
