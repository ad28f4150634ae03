//! The `idle` scenario: open N authenticated, resumed WebSocket connections spread over the
//! fleet's edges, hold them (answering pings), and report each edge's resident memory per
//! idle connection: (RSS after the ramp - RSS before) / connections on that edge.

use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use gapless_shared::protocol::{self, ClientMessage, ServerMessage};
use serde::Serialize;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::fleet::{Fleet, JWT_SECRET};
use crate::stats::rss_kib;

/// Settings of the idle scenario.
#[derive(Debug, Args)]
pub struct IdleArgs {
    /// Connections to open.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Edge processes (each may hold at most ~19,000 connections here: 20,000 open files).
    #[arg(long, default_value_t = 1)]
    edges: usize,
    /// Connections opened per second.
    #[arg(long, default_value_t = 2_000)]
    rate: usize,
    /// Seconds to hold the connections after the ramp, before measuring.
    #[arg(long, default_value_t = 3)]
    settle: u64,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

/// What the scenario measured.
#[derive(Debug, Serialize)]
struct Report {
    scenario: &'static str,
    connections_peak: usize,
    edges: usize,
    edge_rss_kib_before: Vec<u64>,
    edge_rss_kib_after: Vec<u64>,
    edge_rss_kib_per_idle_conn: f64,
    ramp_seconds: f64,
}

/// Runs the scenario against a fleet it starts.
pub async fn run(args: IdleArgs) -> anyhow::Result<()> {
    if args.connections == 0 || args.edges == 0 || args.rate == 0 {
        bail!("--connections, --edges and --rate must be positive");
    }
    let fleet = Fleet::start("everysec", args.edges).await?;
    let edge_pids: Vec<u32> = fleet
        .edges
        .iter()
        .filter_map(|e| e.child.as_ref().map(Child::id))
        .collect();
    let before: Vec<u64> = edge_pids.iter().map(|p| rss_kib(*p).unwrap_or(0)).collect();

    let open = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut holders = Vec::with_capacity(args.connections);
    let pause = Duration::from_secs_f64(1.0 / args.rate as f64);
    let mut next = Instant::now();
    for i in 0..args.connections {
        let url = fleet.edges[i % args.edges].ws_url.clone();
        let counter = open.clone();
        holders.push(tokio::spawn(async move { hold(url, i, counter).await }));
        next += pause;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        if i % 1000 == 999 {
            eprintln!(
                "opening: {} / {}",
                open.load(Ordering::Relaxed),
                args.connections
            );
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while open.load(Ordering::Relaxed) < args.connections {
        if Instant::now() > deadline {
            bail!(
                "only {} of {} connections opened within 60 s",
                open.load(Ordering::Relaxed),
                args.connections
            );
        }
        if let Some(i) = holders.iter().position(|h| h.is_finished()) {
            let failed = holders.swap_remove(i).await;
            bail!("connection {i} ended during the ramp: {failed:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ramp = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(args.settle)).await;
    let after: Vec<u64> = edge_pids.iter().map(|p| rss_kib(*p).unwrap_or(0)).collect();
    let per_edge = args.connections as f64 / args.edges as f64;
    let per_conn: f64 = before
        .iter()
        .zip(&after)
        .map(|(b, a)| (*a as f64 - *b as f64) / per_edge)
        .sum::<f64>()
        / args.edges as f64;
    let report = Report {
        scenario: "idle",
        connections_peak: open.load(Ordering::Relaxed),
        edges: args.edges,
        edge_rss_kib_before: before,
        edge_rss_kib_after: after,
        edge_rss_kib_per_idle_conn: per_conn,
        ramp_seconds: ramp,
    };
    println!();
    println!(
        "scenario idle: {} connections over {} edge(s), ramp {:.1} s",
        report.connections_peak, report.edges, report.ramp_seconds
    );
    for (i, (b, a)) in report
        .edge_rss_kib_before
        .iter()
        .zip(&report.edge_rss_kib_after)
        .enumerate()
    {
        println!("  edge-{i}: RSS {b} KiB before, {a} KiB after");
    }
    println!(
        "  edge resident memory per idle connection: {:.2} KiB",
        report.edge_rss_kib_per_idle_conn
    );
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    for h in holders {
        h.abort();
    }
    Ok(())
}

/// One idle device: connects, resumes, answers pings until aborted.
async fn hold(url: String, i: usize, open: Arc<AtomicUsize>) -> anyhow::Result<()> {
    let token = gapless_edge::auth::mint_hs256(
        JWT_SECRET,
        &format!("idle-{i}"),
        Some("d"),
        Duration::from_secs(3600),
    );
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
                open.fetch_add(1, Ordering::Relaxed);
            }
            ServerMessage::Ping => {
                ws.send(Message::Text(
                    protocol::to_json(&ClientMessage::Pong).into(),
                ))
                .await?;
            }
            _ => {}
        }
    }
    bail!("connection {i} closed")
}
