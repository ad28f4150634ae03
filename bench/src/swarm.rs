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
    ramp_from(urls, 0..n, rate, None).await
}

/// Opens the connections of devices `range` (device `i` is user `load-<i>`), from the local
/// address `source` when given (so several processes can spread over 127.0.0.x and not run
/// out of ephemeral ports).
pub async fn ramp_from(
    urls: &[String],
    range: std::ops::Range<usize>,
    rate: usize,
    source: Option<std::net::IpAddr>,
) -> anyhow::Result<Swarm> {
    let n = range.len();
    let tally = Arc::new(Tally::default());
    let mut swarm = Swarm {
        tally: tally.clone(),
        holders: Vec::with_capacity(n),
    };
    let pause = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let mut next = Instant::now();
    for (k, i) in range.enumerate() {
        let url = urls[i % urls.len()].clone();
        let shared = tally.clone();
        swarm.holders.push(tokio::spawn(
            async move { hold(url, i, shared, source).await },
        ));
        next += pause;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        if k % 1000 == 999 {
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
async fn hold(
    url: String,
    i: usize,
    tally: Arc<Tally>,
    source: Option<std::net::IpAddr>,
) -> anyhow::Result<()> {
    let token =
        gapless_edge::auth::mint_hs256(JWT_SECRET, &user(i), Some("d"), Duration::from_secs(3600));
    let mut request = url.as_str().into_client_request()?;
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    // The client side of a load test must be small too: tungstenite's default read buffer
    // alone is 128 KiB per connection.
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_write_buffer_size(64 << 10);
    let (mut ws, _) = match source {
        None => tokio_tungstenite::connect_async_with_config(request, Some(config), false).await?,
        Some(source) => {
            let host = request.uri().authority().map(ToString::to_string);
            let host = host.ok_or_else(|| anyhow::anyhow!("no host in {url}"))?;
            let target = tokio::net::lookup_host(host)
                .await?
                .find(std::net::SocketAddr::is_ipv4)
                .ok_or_else(|| anyhow::anyhow!("no IPv4 address for {url}"))?;
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(std::net::SocketAddr::new(source, 0))?;
            let stream = socket.connect(target).await?;
            let stream = tokio_tungstenite::MaybeTlsStream::Plain(stream);
            tokio_tungstenite::client_async_with_config(request, stream, Some(config)).await?
        }
    };
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

/// Settings of a swarm worker process (started by the load scenarios; not for direct use).
#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    /// Edge URLs.
    #[arg(long, value_delimiter = ',')]
    urls: Vec<String>,
    /// First device index.
    #[arg(long)]
    from: usize,
    /// Devices.
    #[arg(long)]
    count: usize,
    /// Connections opened per second.
    #[arg(long)]
    rate: usize,
    /// Local address to connect from.
    #[arg(long)]
    source: std::net::IpAddr,
    /// File to write the latency samples to (little-endian u32 µs).
    #[arg(long)]
    samples: std::path::PathBuf,
}

/// A worker process: opens its devices, says `ready`, holds them until its stdin closes,
/// then writes its latency samples and says `delivered <n>`.
pub async fn worker(args: WorkerArgs) -> anyhow::Result<()> {
    use tokio::io::AsyncReadExt;
    let range = args.from..args.from + args.count;
    let swarm = ramp_from(&args.urls, range, args.rate, Some(args.source)).await?;
    println!("ready");
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 64];
    while stdin.read(&mut buf).await? > 0 {}
    let samples: Vec<u8> = swarm
        .tally
        .latencies_us
        .lock()
        .expect("latency lock is never poisoned")
        .iter()
        .flat_map(|us| us.to_le_bytes())
        .collect();
    std::fs::write(&args.samples, samples)?;
    println!(
        "delivered {}",
        swarm.tally.delivered.load(Ordering::Relaxed)
    );
    Ok(())
}

/// Worker processes holding a swarm together.
pub struct Workers {
    children: Vec<(tokio::process::Child, std::path::PathBuf)>,
}

impl Workers {
    /// Starts `procs` workers for devices `0..n`, worker k connecting from 127.0.0.(2+k);
    /// returns once every worker has all its connections resumed.
    pub async fn start(
        urls: &[String],
        n: usize,
        procs: usize,
        rate: usize,
        dir: &std::path::Path,
    ) -> anyhow::Result<Self> {
        use tokio::io::AsyncBufReadExt;
        let exe = std::env::current_exe()?;
        let mut children = Vec::new();
        for k in 0..procs {
            let from = n * k / procs;
            let to = n * (k + 1) / procs;
            let samples = dir.join(format!("worker-{k}.bin"));
            let child = tokio::process::Command::new(&exe)
                .arg("swarm-worker")
                .arg("--urls")
                .arg(urls.join(","))
                .arg("--from")
                .arg(from.to_string())
                .arg("--count")
                .arg((to - from).to_string())
                .arg("--rate")
                .arg((rate / procs).max(1).to_string())
                .arg("--source")
                .arg(format!("127.0.0.{}", 2 + k))
                .arg("--samples")
                .arg(&samples)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()?;
            children.push((child, samples));
        }
        for (child, _) in &mut children {
            let stdout = child
                .stdout
                .as_mut()
                .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
            let mut line = String::new();
            tokio::io::BufReader::new(stdout)
                .read_line(&mut line)
                .await?;
            if line.trim() != "ready" {
                bail!("a swarm worker failed to open its connections");
            }
        }
        Ok(Self { children })
    }

    /// Stops the workers; returns the notifications delivered and the latency samples (µs).
    pub async fn finish(mut self) -> anyhow::Result<(u64, Vec<u32>)> {
        use tokio::io::AsyncBufReadExt;
        let mut delivered = 0;
        let mut samples = Vec::new();
        for (child, path) in &mut self.children {
            drop(child.stdin.take());
            let stdout = child
                .stdout
                .as_mut()
                .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
            let mut line = String::new();
            tokio::io::BufReader::new(stdout)
                .read_line(&mut line)
                .await?;
            delivered += line
                .trim()
                .strip_prefix("delivered ")
                .and_then(|n| n.parse::<u64>().ok())
                .ok_or_else(|| anyhow::anyhow!("a swarm worker did not report: {line:?}"))?;
            let bytes = std::fs::read(&*path)?;
            samples.extend(
                bytes
                    .chunks_exact(4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
            child.wait().await?;
        }
        Ok((delivered, samples))
    }
}
