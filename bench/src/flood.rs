//! `gapless-bench flood`: idle TCP connections by the tens of thousands against the ingest
//! and the edge, while a client with valid credentials from another address connects,
//! appends and receives, and sessions opened before the flood keep receiving.
//!
//! The flood comes from `flood-worker` processes (a process may hold 20,000 descriptors),
//! all from 127.0.0.1 (the kernel's source on loopback); each holds what it opened and reopens at once what the servers close.
//! The checks come from 127.0.0.2 (health and the new client) and 127.0.0.3 (the sessions
//! opened before). Every check is timed; the scenario fails if one takes longer than
//! `--within` or a notification does not arrive.
//!
//! Some 590 lines, over the bench's ~500: the scenario and its `flood-worker` process side by
//! side, as the two ends of one line protocol are best read together.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use gapless_client::{Client, ClientConfig, Event};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};

use crate::fleet::{Fleet, JWT_SECRET};
use crate::producer::{Ingest, notification, payload};

/// Arguments of `gapless-bench flood`.
#[derive(Debug, clap::Args)]
pub struct FloodArgs {
    /// Idle TCP connections held open against each server.
    #[arg(long, default_value_t = 25_000)]
    connections: usize,
    /// Flood processes (each holds its share against both servers).
    #[arg(long, default_value_t = 4)]
    procs: usize,
    /// Seconds of flood before the checks start.
    #[arg(long, default_value_t = 10)]
    ramp: u64,
    /// Rounds of checks, one a second.
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// Sessions opened before the flood (from 127.0.0.3).
    #[arg(long, default_value_t = 20)]
    sessions: usize,
    /// The longest a check may take, ms.
    #[arg(long, default_value_t = 2000)]
    within: u64,
    /// Write the figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Arguments of a flood process (started by `flood`).
#[derive(Debug, clap::Args)]
pub struct FloodWorkerArgs {
    /// Servers to hold connections against.
    #[arg(long, value_delimiter = ',')]
    targets: Vec<SocketAddr>,
    /// Connections held against each target.
    #[arg(long)]
    per_target: usize,
    /// Source address of every connection [default: the kernel's choice, 127.0.0.1 on
    /// loopback]. A bound address takes its port at bind time, for any destination, so
    /// binding caps a process at the ephemeral range (28,232 ports) for all targets; the
    /// kernel's own choice shares ports across destinations.
    #[arg(long)]
    source: Option<IpAddr>,
}

/// What a flood process reports, one line a second: `open <n> opened <n> closed <n>`.
#[derive(Debug, Default)]
struct FloodCounters {
    open: AtomicU64,
    opened: AtomicU64,
    closed: AtomicU64,
}

/// A flood process: holds `per_target` connections to each target, reopening at once each
/// one the server closes.
pub async fn worker(args: FloodWorkerArgs) -> anyhow::Result<()> {
    let counters = Arc::new(FloodCounters::default());
    for target in &args.targets {
        for _ in 0..args.per_target {
            let counters = counters.clone();
            let (target, source) = (*target, args.source);
            tokio::spawn(async move {
                loop {
                    let Ok(mut stream) = open(target, source).await else {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    };
                    counters.opened.fetch_add(1, Ordering::Relaxed);
                    counters.open.fetch_add(1, Ordering::Relaxed);
                    // Silent: send nothing, read until the server closes.
                    let mut buf = [0u8; 64];
                    while let Ok(n) = stream.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                    }
                    counters.open.fetch_sub(1, Ordering::Relaxed);
                    counters.closed.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    }
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        println!(
            "open {} opened {} closed {}",
            counters.open.load(Ordering::Relaxed),
            counters.opened.load(Ordering::Relaxed),
            counters.closed.load(Ordering::Relaxed)
        );
    }
}

/// A TCP connection to `target`, from `source` when one is given.
async fn open(target: SocketAddr, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    match source {
        None => TcpStream::connect(target).await,
        Some(source) => {
            let socket = TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(source, 0))?;
            socket.connect(target).await
        }
    }
}

/// One round of checks, times in ms.
#[derive(Debug, Serialize)]
struct Round {
    ingest_health_ms: f64,
    edge_health_ms: f64,
    connect_ms: f64,
    append_ms: f64,
    receive_ms: f64,
    total_ms: f64,
    preflood_received: usize,
}

/// What the run shows.
#[derive(Debug, Serialize)]
struct FloodReport {
    connections_per_server: usize,
    procs: usize,
    flood_open: u64,
    flood_opened: u64,
    flood_closed: u64,
    rounds: Vec<Round>,
    /// The flood's sockets to the ingest, by state, at the end of the ramp.
    sockets_to_ingest: std::collections::BTreeMap<&'static str, usize>,
    /// The flood's sockets to the edge, by state, at the end of the ramp.
    sockets_to_edge: std::collections::BTreeMap<&'static str, usize>,
    ingest_fds: usize,
    edge_fds: usize,
    ingest_refused: String,
    edge_refused: String,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn http_from(source: IpAddr) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .local_address(source)
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(0)
        .build()?)
}

/// A client of `user` from `source`.
fn client(ws_url: &str, user: &str, source: IpAddr) -> Client {
    let token = gapless_shared::token::mint_hs256(
        JWT_SECRET,
        user,
        Some("phone"),
        Duration::from_secs(3600),
    );
    let mut config = ClientConfig::new(vec![ws_url.to_owned()], token);
    config.local_addr = Some(SocketAddr::new(source, 0));
    config.backoff_min = Duration::from_millis(50);
    config.backoff_max = Duration::from_millis(500);
    Client::new(config, None)
}

/// Drives `client` until it is connected, or fails after `within`.
async fn connected(client: &mut Client, within: Duration) -> anyhow::Result<()> {
    tokio::time::timeout(within, async {
        loop {
            if let Event::Connected { .. } = client.next_event().await {
                return;
            }
        }
    })
    .await
    .context("no connection in time")
}

/// Waits until `edge` holds a registry lease for `user`, or fails after `within`.
async fn registered(
    redis: &mut redis::aio::MultiplexedConnection,
    user: &str,
    edge: &str,
    within: Duration,
) -> anyhow::Result<()> {
    let key = gapless_shared::keys::registry(&gapless_shared::ids::UserId::parse(user)?);
    tokio::time::timeout(within, async {
        loop {
            let lease: Option<f64> = redis::cmd("ZSCORE")
                .arg(&key)
                .arg(edge)
                .query_async(redis)
                .await
                .unwrap_or(None);
            if lease.is_some() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .context("not registered in time")
}

/// Drives `client` until it receives a notification (acked), or fails after `within`.
async fn received(client: &mut Client, within: Duration) -> anyhow::Result<u64> {
    tokio::time::timeout(within, async {
        loop {
            if let Event::Notification(n) = client.next_event().await {
                client.ack(n.seq);
                return n.seq;
            }
        }
    })
    .await
    .context("no notification in time")
}

/// Sockets on this machine connected, or connecting, *to* `port` (the client side, so the
/// flood's own), by TCP state, from `/proc/net/tcp`.
fn sockets_to(port: u16) -> std::collections::BTreeMap<&'static str, usize> {
    let mut states = std::collections::BTreeMap::new();
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return states;
    };
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(remote), Some(state)) = (fields.get(2), fields.get(3)) else {
            continue;
        };
        let remote_port = remote
            .rsplit_once(':')
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
        if remote_port != Some(port) {
            continue;
        }
        let name = match *state {
            "01" => "established",
            "02" => "syn_sent",
            "08" => "close_wait",
            "09" => "last_ack",
            _ => "other",
        };
        *states.entry(name).or_default() += 1;
    }
    states
}

/// Descriptors a process holds.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// The `gapless_listener_refused_total` lines of a server's metrics.
async fn refused(http: &reqwest::Client, base: &str) -> String {
    let Ok(r) = http.get(format!("{base}/metrics")).send().await else {
        return "unreachable".into();
    };
    let text = r.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("gapless_listener_refused_total"))
        .map(|l| l.trim_start_matches("gapless_listener_refused_total"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A flood worker process and the counters it last reported.
type FloodWorker = (tokio::process::Child, Arc<FloodCounters>);

/// Starts `procs` flood-worker processes, each holding `per_target` connections to every
/// target, with a task per worker reading its `open opened closed` lines into its counters.
fn start_workers(
    procs: usize,
    targets: &[SocketAddr],
    per_target: usize,
) -> anyhow::Result<Vec<FloodWorker>> {
    let exe = std::env::current_exe()?;
    let targets: Vec<String> = targets.iter().map(SocketAddr::to_string).collect();
    let mut workers = Vec::new();
    for _ in 0..procs {
        let mut child = tokio::process::Command::new(&exe)
            .arg("flood-worker")
            .arg("--targets")
            .arg(targets.join(","))
            .arg("--per-target")
            .arg(per_target.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start a flood worker")?;
        let stdout = child.stdout.take().context("worker stdout")?;
        let slot = Arc::new(FloodCounters::default());
        let seen = slot.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let n: Vec<u64> = line
                    .split_whitespace()
                    .filter_map(|w| w.parse().ok())
                    .collect();
                if let [open, opened, closed] = n[..] {
                    seen.open.store(open, Ordering::Relaxed);
                    seen.opened.store(opened, Ordering::Relaxed);
                    seen.closed.store(closed, Ordering::Relaxed);
                }
            }
        });
        workers.push((child, slot));
    }
    Ok(workers)
}

/// The workers' connections: open now, opened and closed by the servers in all.
fn totals(workers: &[FloodWorker]) -> (u64, u64, u64) {
    workers.iter().fold((0, 0, 0), |(a, b, c), (_, s)| {
        (
            a + s.open.load(Ordering::Relaxed),
            b + s.opened.load(Ordering::Relaxed),
            c + s.closed.load(Ordering::Relaxed),
        )
    })
}

/// The client with valid credentials that checks the servers during the flood, from its own
/// source address.
struct Probe<'a> {
    http: &'a reqwest::Client,
    ingest: &'a Ingest,
    ingest_url: &'a str,
    edge_http: &'a str,
    ws_url: &'a str,
    edge_id: &'a str,
    checker: IpAddr,
    within: Duration,
}

impl Probe<'_> {
    async fn append(&self, user: &str, round: usize) -> anyhow::Result<()> {
        let body = payload(&serde_json::json!({ "round": round }));
        self.ingest.append(&notification(user, &body, None)).await?;
        Ok(())
    }

    /// One round of checks: both health endpoints, a fresh device that connects, registers
    /// and receives an append, and one notification to every session opened before the
    /// flood. What failed is pushed to `failures`.
    async fn round(
        &self,
        round: usize,
        redis: &mut redis::aio::MultiplexedConnection,
        before: &mut [Client],
        failures: &mut Vec<String>,
    ) -> anyhow::Result<Round> {
        let (http, within) = (self.http, self.within);
        let started = Instant::now();
        let t = Instant::now();
        let ingest_health = http
            .get(format!("{}/healthz", self.ingest_url))
            .send()
            .await;
        let ingest_health_ms = ms(t.elapsed());
        let t = Instant::now();
        let edge_health = http.get(format!("{}/healthz", self.edge_http)).send().await;
        let edge_health_ms = ms(t.elapsed());
        if !ingest_health.is_ok_and(|r| r.status().is_success())
            || !edge_health.is_ok_and(|r| r.status().is_success())
        {
            failures.push(format!("round {round}: a health check failed"));
        }
        let user = format!("during-{round}");
        let mut fresh = client(self.ws_url, &user, self.checker);
        let t = Instant::now();
        if let Err(e) = connected(&mut fresh, within).await {
            failures.push(format!("round {round}: connect: {e}"));
        }
        // Connected, and registered: a new device starts at the live end as of its resume,
        // so what is appended before the edge registered it is not part of its stream.
        if let Err(e) = registered(redis, &user, self.edge_id, within).await {
            failures.push(format!("round {round}: registration: {e}"));
        }
        let connect_ms = ms(t.elapsed());
        let t = Instant::now();
        if let Err(e) = self.append(&user, round).await {
            failures.push(format!("round {round}: append: {e}"));
        }
        let append_ms = ms(t.elapsed());
        if let Err(e) = received(&mut fresh, within).await {
            failures.push(format!("round {round}: receive: {e}"));
        }
        let receive_ms = ms(t.elapsed());
        let total_ms = ms(started.elapsed());
        // Every session opened before the flood gets one too.
        for i in 0..before.len() {
            self.append(&format!("before-{i}"), round).await?;
        }
        let mut preflood_received = 0;
        for c in before.iter_mut() {
            if received(c, within).await.is_ok() {
                preflood_received += 1;
            }
        }
        if preflood_received < before.len() {
            failures.push(format!(
                "round {round}: {} of {} sessions opened before the flood received",
                preflood_received,
                before.len()
            ));
        }
        if total_ms > ms(within) {
            failures.push(format!("round {round}: the checks took {total_ms:.0} ms"));
        }
        println!(
            "round {round}: health ingest {ingest_health_ms:.1} ms, edge {edge_health_ms:.1} ms; \
             connect {connect_ms:.1} ms, append {append_ms:.1} ms, received {receive_ms:.1} ms \
             after the append; total {total_ms:.1} ms; before-flood sessions {preflood_received}/{}",
            before.len()
        );
        fresh.close().await;
        Ok(Round {
            ingest_health_ms,
            edge_health_ms,
            connect_ms,
            append_ms,
            receive_ms,
            total_ms,
            preflood_received,
        })
    }
}

impl FloodReport {
    /// The summary lines; `within` is the bound of one round's checks, ms.
    fn print(&self, within: u64) {
        let worst = |f: fn(&Round) -> f64| self.rounds.iter().map(f).fold(0.0, f64::max);
        println!(
            "flood of {} idle connections per server from 127.0.0.1 ({} processes): {} open at the \
             end, {} opened and {} closed by the servers in all",
            self.connections_per_server,
            self.procs,
            self.flood_open,
            self.flood_opened,
            self.flood_closed
        );
        println!(
            "  the flood's sockets after the ramp: to the ingest {:?}, to the edge {:?}",
            self.sockets_to_ingest, self.sockets_to_edge
        );
        println!(
            "  servers hold {} (ingest) and {} (edge) descriptors",
            self.ingest_fds, self.edge_fds
        );
        println!("  ingest refusals: {}", self.ingest_refused);
        println!("  edge refusals:   {}", self.edge_refused);
        println!(
            "  worst of {} rounds: health {:.1} / {:.1} ms, connect {:.1} ms, append {:.1} ms, \
             receive {:.1} ms, total {:.1} ms (bound {} ms)",
            self.rounds.len(),
            worst(|r| r.ingest_health_ms),
            worst(|r| r.edge_health_ms),
            worst(|r| r.connect_ms),
            worst(|r| r.append_ms),
            worst(|r| r.receive_ms),
            worst(|r| r.total_ms),
            within
        );
    }
}

/// Runs the scenario.
pub async fn run(args: FloodArgs) -> anyhow::Result<()> {
    let within = Duration::from_millis(args.within);
    // The servers' own defaults: the fleet otherwise widens the per-address budget for load
    // processes, which is what the flood must not get.
    let fleet = Fleet::start_with(
        "everysec",
        1,
        vec![("GAPLESS_MAX_PENDING_PER_SOURCE".into(), "256".into())],
    )
    .await?;
    let ws_url = fleet.edges[0].ws_url.clone();
    let edge_http = fleet.edges[0].http_url.clone();
    let ingest_addr: SocketAddr = fleet.ingest_url.trim_start_matches("http://").parse()?;
    let edge_addr: SocketAddr = edge_http.trim_start_matches("http://").parse()?;
    let checker: IpAddr = [127, 0, 0, 2].into();
    let edge_id = fleet.edges[0].id.clone();
    let mut redis = redis::Client::open(fleet.redis.url())?
        .get_multiplexed_async_connection()
        .await?;
    let http = http_from(checker)?;
    let ingest = Ingest::with_client(http.clone(), &fleet.ingest_url, &fleet.api_key);

    // Sessions opened before the flood.
    let mut before = Vec::new();
    for i in 0..args.sessions {
        let mut c = client(&ws_url, &format!("before-{i}"), [127, 0, 0, 3].into());
        connected(&mut c, Duration::from_secs(10)).await?;
        before.push(c);
    }
    println!("{} sessions open; starting the flood", before.len());

    let procs = args.procs.max(1);
    let workers = start_workers(
        procs,
        &[ingest_addr, edge_addr],
        args.connections.div_ceil(procs),
    )?;
    for s in 0..args.ramp {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (open, opened, closed) = totals(&workers);
        println!(
            "[{:>3} s] flood: open {open}, opened {opened}, closed by the servers {closed}",
            s + 1
        );
    }

    let sockets_to_ingest = sockets_to(ingest_addr.port());
    let sockets_to_edge = sockets_to(edge_addr.port());
    println!(
        "flood sockets to the ingest: {sockets_to_ingest:?}; to the edge: {sockets_to_edge:?}"
    );
    let mut rounds = Vec::new();
    let mut failures = Vec::new();
    let probe = Probe {
        http: &http,
        ingest: &ingest,
        ingest_url: &fleet.ingest_url,
        edge_http: &edge_http,
        ws_url: &ws_url,
        edge_id: &edge_id,
        checker,
        within,
    };
    for round in 0..args.rounds {
        rounds.push(
            probe
                .round(round, &mut redis, &mut before, &mut failures)
                .await?,
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let (flood_open, flood_opened, flood_closed) = totals(&workers);
    let pids = fleet.pids();
    let pid = |role: &str| pids.iter().find(|(r, _)| r == role).map_or(0, |(_, p)| *p);
    drop(redis);
    let report = FloodReport {
        connections_per_server: args.connections,
        procs: args.procs,
        flood_open,
        flood_opened,
        flood_closed,
        ingest_fds: fds(pid("ingest")),
        edge_fds: fds(pid("edge-0")),
        ingest_refused: refused(&http, &fleet.ingest_url).await,
        edge_refused: refused(&http, &edge_http).await,
        rounds,
        sockets_to_ingest,
        sockets_to_edge,
    };
    drop(workers);
    report.print(args.within);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    if !failures.is_empty() {
        bail!("the flood got through:\n  {}", failures.join("\n  "));
    }
    println!("  every check passed");
    Ok(())
}
