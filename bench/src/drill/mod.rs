//! The fault drill (`gapless-bench drill`): starts a real system as processes (Redis with AOF
//! `appendfsync always`, the migrations, one ingest, several edges), runs simulated devices
//! and producers against it while a fault schedule attacks it, and checks the guarantees of
//! DESIGN.md §2 from what every device received.
//!
//! [`device`] simulates devices on the `gapless-client` crate (over the WebSocket, SSE and
//! long-polling: `--transport`, a third of the devices on each by default), [`producer`]
//! appends with
//! idempotency keys and retries, [`proxy`] blackholes connections, and the checker here turns
//! the logs into a table per fault kind.

mod device;
mod producer;
mod proxy;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use gapless_client::ClientConfig;
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::fleet::{Fleet, FleetOptions, FleetRedis};
use crate::producer::{notification, payload};
use crate::stats::{median, rss_kib};
use crate::target::Target;
use crate::transports::TransportMix;
use device::{DeviceLog, DeviceShared, DeviceSpec};
use gapless_shared::config::RedisConfig;
use gapless_shared::ids::UserId;
use gapless_shared::process::RedisCluster;
use gapless_shared::store::{self, Store};
use producer::{Ledger, Mode, Producer};
use proxy::Proxy;

/// Settings of the drill.
#[derive(Debug, Args)]
pub struct DrillArgs {
    /// How long faults are injected (the drill then lets everything catch up).
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    duration: Duration,
    /// Simulated devices.
    #[arg(long, default_value_t = 200)]
    devices: usize,
    /// Users the devices belong to (several devices per user).
    #[arg(long, default_value_t = 80)]
    users: usize,
    /// Notifications per second, over all producers.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Edge processes.
    #[arg(long, default_value_t = 3)]
    edges: usize,
    /// Interval between faults [default: the duration over 7, at most 30 s], so a short run
    /// injects every kind once and a long one repeats them.
    #[arg(long, value_parser = parse_duration)]
    fault_every: Option<Duration>,
    /// Edge heartbeat, ms (frozen sockets are noticed after two).
    #[arg(long, default_value_t = 1000)]
    heartbeat_ms: u64,
    /// Transport of the devices: every one over the WebSocket, SSE or long-polling, or
    /// `mixed` (device i over ws, sse, poll by i % 3).
    #[arg(long, value_enum, default_value_t = TransportMix::Mixed)]
    transport: TransportMix,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Run on a local Redis Cluster (three primaries, three replicas; the ingest at
    /// `--min-replicas-ack 1`), or, with --ingest-url, on the cluster --redis names (seed
    /// URLs, comma-separated). Adds two fault kinds: a user's slot migrated to another
    /// primary, and a manual failover of the primary holding it; Redis kill SIGKILLs a
    /// primary.
    #[arg(long)]
    cluster: bool,
    /// Only these fault kinds, in this order (comma-separated, e.g.
    /// `redis-kill,primary-failover`) [default: every kind the target can suffer]
    #[arg(long, value_enum, value_delimiter = ',')]
    faults: Vec<Fault>,
    /// An existing deployment to drill instead of starting one (faults that need the
    /// processes, edge kill and drain, Redis kill, edge memory, are then skipped).
    #[command(flatten)]
    target: crate::fleet::DeploymentArgs,
}

/// The fleet's cluster, or an error saying the fault needs one.
fn cluster(target: &mut Target, kind: Fault) -> anyhow::Result<&mut RedisCluster> {
    match &mut target.fleet(kind)?.redis {
        FleetRedis::Cluster(cluster) => Ok(cluster),
        FleetRedis::Single(_) => bail!("{kind:?} needs a Redis Cluster (--cluster)"),
    }
}

/// "90s", "2m", "30m", "1h" or plain seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let (n, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| (&s[..i], &s[i..]));
    let n: u64 = n.parse().map_err(|_| format!("bad duration {s:?}"))?;
    match unit {
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(60 * n)),
        "h" => Ok(Duration::from_secs(3600 * n)),
        "ms" => Ok(Duration::from_millis(n)),
        _ => Err(format!("bad duration unit in {s:?}")),
    }
}

/// The kinds of fault, in schedule order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
enum Fault {
    EdgeKill,
    EdgeDrain,
    RedisKill,
    PubsubKill,
    SlowConsumer,
    Blackhole,
    SlotMigration,
    PrimaryFailover,
}

impl Fault {
    /// It needs the processes the drill started (to kill, restart or reconfigure them).
    fn needs_fleet(self) -> bool {
        matches!(
            self,
            Fault::EdgeKill
                | Fault::EdgeDrain
                | Fault::RedisKill
                | Fault::SlotMigration
                | Fault::PrimaryFailover
        )
    }
}

/// The fault kinds in schedule order: on a cluster, with a slot migration and a failover.
fn schedule(cluster: bool) -> Vec<Fault> {
    let mut faults = vec![
        Fault::EdgeKill,
        Fault::PubsubKill,
        Fault::EdgeDrain,
        Fault::Blackhole,
        Fault::RedisKill,
        Fault::SlowConsumer,
    ];
    if cluster {
        faults.insert(2, Fault::SlotMigration);
        faults.insert(5, Fault::PrimaryFailover);
    }
    faults
}

/// One injected fault.
#[derive(Debug, Clone, Serialize)]
struct Injection {
    kind: Fault,
    at_ms: u64,
    /// Until every device held everything acknowledged before the injection; `None` if that
    /// never happened before the next fault.
    recovered_ms: Option<u64>,
    note: String,
}

/// A table row.
#[derive(Debug, Serialize)]
struct Row {
    fault: Fault,
    injected: usize,
    survived: usize,
    lost: usize,
    out_of_order: usize,
    bad_duplicates: usize,
    recover_ms_median: f64,
    recover_ms_max: u64,
}

/// What the devices of one transport saw.
#[derive(Debug, Default, Serialize)]
struct TransportRow {
    /// `websocket`, `sse` or `poll`.
    transport: &'static str,
    devices: usize,
    connects: u64,
    delivered: u64,
    lost: usize,
    out_of_order: usize,
    bad_duplicates: usize,
    wire_duplicates: u64,
    client_gaps: u64,
    resets: usize,
}

/// The drill's result.
#[derive(Debug, Serialize)]
struct Report {
    duration_s: u64,
    devices: usize,
    users: usize,
    edges: usize,
    rate_per_s: f64,
    acknowledged: u64,
    delivered: u64,
    producer_retries: u64,
    producer_deduplicated: u64,
    lost: usize,
    out_of_order: usize,
    non_contiguous: usize,
    bad_duplicates: usize,
    allowed_duplicates: usize,
    wire_duplicates: u64,
    client_gaps: u64,
    resets: usize,
    slow_consumer_edge_rss_growth_kib: u64,
    memory_bound_kib: u64,
    /// Lost, out of order and disallowed duplicates before any fault was injected.
    before_first_fault: [usize; 3],
    rows: Vec<Row>,
    /// The same counts per transport of the devices.
    transports: Vec<TransportRow>,
    injections: Vec<Injection>,
}

/// Edge RSS growth during the slow-consumer fault above which the drill fails.
const MEMORY_BOUND_KIB: u64 = 256 << 10;

/// Runs the drill; fails (non-zero exit) on any lost, out-of-order or unexplained duplicate
/// notification, or an edge memory growth past the bound.
pub async fn run(args: DrillArgs) -> anyhow::Result<()> {
    if args.devices == 0 || args.users == 0 || args.edges < 2 || args.rate <= 0.0 {
        bail!("--devices, --users and --rate must be positive and --edges at least 2");
    }
    let hb = args.heartbeat_ms;
    let faults = if args.faults.is_empty() {
        schedule(args.cluster)
    } else {
        args.faults.clone()
    };
    if !args.cluster
        && let Some(kind) = faults
            .iter()
            .find(|k| matches!(k, Fault::SlotMigration | Fault::PrimaryFailover))
    {
        bail!("{kind:?} needs --cluster");
    }
    let mut target = match Target::given(&args.target) {
        Some(target) => target,
        None => {
            // On a cluster, an append is answered only once a replica holds it: what a
            // SIGKILLed primary's replica takes over is then everything acknowledged.
            let ingest_env = if args.cluster {
                vec![("GAPLESS_MIN_REPLICAS_ACK".into(), "1".into())]
            } else {
                Vec::new()
            };
            let fleet = Fleet::start_full(FleetOptions {
                appendfsync: "always".into(),
                edges: args.edges,
                cluster: args.cluster,
                edge_env: vec![
                    ("GAPLESS_HEARTBEAT_MS".into(), hb.to_string()),
                    ("GAPLESS_SLOW_CONSUMER_MS".into(), (2 * hb).to_string()),
                    ("GAPLESS_DRAIN_WINDOW_MS".into(), "1000".into()),
                    ("GAPLESS_ACK_FLUSH_MS".into(), "500".into()),
                    ("GAPLESS_OUTBOUND_QUEUE".into(), "32".into()),
                ],
                ingest_env,
                ..FleetOptions::default()
            })
            .await?;
            Target::started(fleet)
        }
    };
    // The deployment's Redis, to read stored acks and kill pub/sub connections.
    let store = match &target.fleet {
        Some(fleet) => store::connect(&fleet.redis.config()?).await?,
        None => store::connect(&RedisConfig::from_args(&target.redis_url, args.cluster)?).await?,
    };
    // `host:port` and `ws://` URL of each edge.
    let edges: Vec<(String, String)> = target
        .edge_addrs()?
        .into_iter()
        .zip(target.edge_urls.clone())
        .collect();
    if edges.len() < 2 {
        bail!("the drill needs at least two edges");
    }
    let mut proxies = Vec::new();
    for (upstream, _) in &edges {
        proxies.push(Proxy::start(upstream.clone()).await?);
    }
    let direct: Vec<String> = edges.iter().map(|e| e.1.clone()).collect();
    let proxied: Vec<String> = proxies.iter().map(|p| p.ws_url.clone()).collect();
    let start = Instant::now();
    let stop_devices = CancellationToken::new();

    // Devices: spread over users; every fifth behind the blackhole proxies; most flappy.
    // The last user is the slow consumer's, with one device the slow-consumer fault freezes.
    let users: Vec<String> = (0..args.users).map(|u| format!("drill-{u}")).collect();
    let slow_user = users[args.users - 1].clone();
    let mut shared = Vec::new();
    let mut devices = Vec::new();
    for i in 0..args.devices {
        let user = users[i % args.users].clone();
        let device = format!("dev-{i}");
        let token = gapless_shared::token::mint_hs256(
            &target.jwt_secret,
            &user,
            Some(&device),
            Duration::from_secs(24 * 3600),
        );
        let urls = if i % 5 == 4 {
            proxied.clone()
        } else {
            direct.clone()
        };
        let mut config = ClientConfig::new(urls, token);
        config.transport = args.transport.of_device(i);
        config.backoff_min = Duration::from_millis(100);
        config.backoff_max = Duration::from_secs(3);
        config.heartbeat_grace = Duration::from_millis(hb);
        config.connect_timeout = Duration::from_secs(3);
        let spec = DeviceSpec {
            user,
            device,
            config,
            flappy: i % 4 != 0,
            freeze_for: Duration::from_millis(3 * hb),
            store: store.clone(),
        };
        let s = Arc::new(DeviceShared::default());
        shared.push(s.clone());
        devices.push(tokio::spawn(device::run(
            spec,
            s,
            start,
            stop_devices.clone(),
        )));
    }
    // Devices connect before anything is appended, so each must receive every notification.
    let deadline = Instant::now() + Duration::from_secs(60);
    while shared.iter().any(|s| !s.connected.load(Ordering::Relaxed)) {
        if Instant::now() > deadline {
            bail!("devices did not all connect within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Connected is reported after resume is sent; give the edges a moment to register.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let ledger: Ledger = Arc::default();
    let stop_producers = CancellationToken::new();
    let producer_users: Vec<String> = users[..args.users - 1].to_vec();
    let mut producers = Vec::new();
    for (name, mode, share) in [
        ("batch", Mode::Batch, 0.6),
        ("bulk", Mode::Bulk, 0.2),
        ("single", Mode::Single, 0.2),
    ] {
        let p = Producer {
            name: format!("{name}-{}", std::process::id()),
            ingest_url: target.ingest_url.clone(),
            api_key: target.api_key.clone(),
            users: producer_users.clone(),
            rate: args.rate * share,
            mode,
        };
        producers.push(tokio::spawn(p.run(
            ledger.clone(),
            start,
            stop_producers.clone(),
        )));
    }

    // The fault schedule: one fault every `every`, cycling through the kinds.
    let every = args.fault_every.unwrap_or_else(|| {
        (args.duration / (faults.len() as u32 + 1)).min(Duration::from_secs(30))
    });
    let mut injections: Vec<Injection> = Vec::new();
    let mut slow_growth = 0u64;
    let mut k = 0usize;
    let faults_end = start + args.duration;
    let mut next_fault = start + every / 2;
    while Instant::now() + every / 2 < faults_end {
        progress(&start, &shared, &ledger, injections.len());
        if Instant::now() < next_fault {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        next_fault += every;
        let kind = faults[k % faults.len()];
        let edge = (k / faults.len()) % edges.len();
        k += 1;
        if target.fleet.is_none() && kind.needs_fleet() {
            continue;
        }
        let at_ms = start.elapsed().as_millis() as u64;
        let note = inject(
            kind,
            edge,
            &mut target,
            &store,
            &proxies,
            &shared,
            &users,
            &slow_user,
            hb,
            &mut slow_growth,
            &start,
            &ledger,
        )
        .await
        .with_context(|| format!("injecting {kind:?}"))?;
        // Recovered: every device holds everything acknowledged up to the end of the fault
        // (time from the end of the injection: a kill and restart takes its own time first).
        let snapshot = snapshot(&ledger);
        let recovered = wait_recovered(&snapshot, &shared, &users, args.devices, every).await;
        injections.push(Injection {
            kind,
            at_ms,
            recovered_ms: recovered.map(|d| d.as_millis() as u64),
            note,
        });
    }
    stop_producers.cancel();
    let mut producer_stats = Vec::new();
    for p in producers {
        producer_stats.push(p.await?);
    }
    // Catch up: every device must hold everything acknowledged.
    let final_snapshot = snapshot(&ledger);
    let caught_up = wait_recovered(
        &final_snapshot,
        &shared,
        &users,
        args.devices,
        Duration::from_secs(60),
    )
    .await;
    eprintln!();
    if caught_up.is_none() {
        eprintln!("devices did not all catch up within 60 s; behind:");
        for (i, s) in shared.iter().enumerate() {
            let want = final_snapshot
                .get(&users[i % users.len()])
                .copied()
                .unwrap_or(0);
            let have = s.max_seq.load(Ordering::Relaxed);
            if have < want {
                eprintln!(
                    "  dev-{i} of {}: has {have} of {want}, connected {}",
                    users[i % users.len()],
                    s.connected.load(Ordering::Relaxed)
                );
            }
        }
    }
    stop_devices.cancel();
    let mut logs = Vec::new();
    for d in devices {
        logs.push(d.await?);
    }
    drop(proxies);

    let ledger = ledger
        .lock()
        .expect("ledger lock is never poisoned")
        .clone();
    let applicable: Vec<Fault> = faults
        .into_iter()
        .filter(|k| target.fleet.is_some() || !k.needs_fleet())
        .collect();
    let report = check(
        &args,
        edges.len(),
        &applicable,
        &ledger,
        &logs,
        injections,
        slow_growth,
        &producer_stats,
    );
    print(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let failed = report.lost + report.out_of_order + report.non_contiguous + report.bad_duplicates;
    if failed > 0 || report.slow_consumer_edge_rss_growth_kib > MEMORY_BOUND_KIB {
        if let Some(fleet) = target.fleet.as_mut() {
            fleet.keep();
        }
        bail!("the drill found violations: see the table");
    }
    Ok(())
}

/// Per user, the highest acknowledged seq so far.
fn snapshot(ledger: &Ledger) -> HashMap<String, u64> {
    ledger
        .lock()
        .expect("ledger lock is never poisoned")
        .iter()
        .map(|(u, v)| (u.clone(), v.iter().map(|x| x.0).max().unwrap_or(0)))
        .collect()
}

/// Waits until every device holds its user's snapshot seq; returns how long that took.
async fn wait_recovered(
    snapshot: &HashMap<String, u64>,
    shared: &[Arc<DeviceShared>],
    users: &[String],
    devices: usize,
    within: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    loop {
        let done = (0..devices).all(|i| {
            let want = snapshot.get(&users[i % users.len()]).copied().unwrap_or(0);
            shared[i].max_seq.load(Ordering::Relaxed) >= want
        });
        if done {
            return Some(started.elapsed());
        }
        if started.elapsed() > within {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[allow(clippy::too_many_arguments)]
async fn inject(
    kind: Fault,
    edge: usize,
    target: &mut Target,
    store: &Store,
    proxies: &[Proxy],
    shared: &[Arc<DeviceShared>],
    users: &[String],
    slow_user: &str,
    hb: u64,
    slow_growth: &mut u64,
    start: &Instant,
    ledger: &Ledger,
) -> anyhow::Result<String> {
    match kind {
        Fault::EdgeKill => {
            let fleet = target.fleet(kind)?;
            fleet.kill_edge(edge);
            tokio::time::sleep(Duration::from_millis(500)).await;
            fleet.restart_edge(edge).await?;
            Ok(format!("SIGKILL edge-{edge}, restarted after 500 ms"))
        }
        Fault::EdgeDrain => {
            let fleet = target.fleet(kind)?;
            let (took, ok) = fleet.term_edge(edge).await?;
            fleet.restart_edge(edge).await?;
            if !ok {
                bail!("edge-{edge} did not exit cleanly on SIGTERM");
            }
            Ok(format!(
                "SIGTERM edge-{edge}: exited in {} ms, restarted",
                took.as_millis()
            ))
        }
        Fault::RedisKill => {
            let user = &users[edge % users.len()];
            match &mut target.fleet(kind)?.redis {
                FleetRedis::Single(redis) => {
                    redis.kill();
                    tokio::time::sleep(Duration::from_millis(1000)).await;
                    redis.restart()?;
                    Ok("SIGKILL redis, restarted after 1 s (AOF, fsync always)".into())
                }
                FleetRedis::Cluster(cluster) => tokio::task::block_in_place(|| {
                    let owner = cluster.owner_of(cluster.slot_of_user(&UserId::parse(user)?)?)?;
                    let promoted = cluster.kill_primary(owner)?;
                    cluster.node_mut(owner).restart()?;
                    cluster.wait_stable()?;
                    Ok(format!(
                        "SIGKILL of node {owner}, the primary of {user}'s slot; node {promoted} promoted, node {owner} restarted as its replica"
                    ))
                }),
            }
        }
        Fault::SlotMigration => {
            let user = &users[edge % users.len()];
            let cluster = cluster(target, kind)?;
            tokio::task::block_in_place(|| {
                let slot = cluster.slot_of_user(&UserId::parse(user)?)?;
                let from = cluster.owner_of(slot)?;
                let to = cluster.other_primary(from).context("another primary")?;
                cluster.move_slot(slot, to)?;
                Ok(format!(
                    "moved slot {slot} ({user}) from node {from} to node {to}"
                ))
            })
        }
        Fault::PrimaryFailover => {
            let user = &users[edge % users.len()];
            let cluster = cluster(target, kind)?;
            tokio::task::block_in_place(|| {
                let owner = cluster.owner_of(cluster.slot_of_user(&UserId::parse(user)?)?)?;
                let promoted = cluster.failover(owner)?;
                Ok(format!(
                    "CLUSTER FAILOVER: node {promoted} took over {user}'s slot from node {owner}"
                ))
            })
        }
        Fault::PubsubKill => {
            // Every primary: on a cluster each edge's subscription is at its channel's shard.
            let timeout = Duration::from_secs(2);
            let mut killed = 0u64;
            for primary in store.clone().primaries(timeout).await? {
                killed += store
                    .clone()
                    .on_node::<u64>(
                        &primary,
                        redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub"),
                        timeout,
                    )
                    .await?;
            }
            Ok(format!("CLIENT KILL TYPE pubsub: {killed} connections"))
        }
        Fault::Blackhole => {
            let n = proxies[edge % proxies.len()]
                .blackhole(Duration::from_millis(3 * hb))
                .await;
            Ok(format!(
                "blackholed {n} connections behind proxy {edge} for {} ms",
                3 * hb
            ))
        }
        Fault::SlowConsumer => {
            // Freeze the slow user's devices and flood the user with large notifications.
            let freeze_ms = 6 * hb;
            let until = start.elapsed().as_millis() as u64 + freeze_ms;
            for (i, s) in shared.iter().enumerate() {
                if users[i % users.len()] == slow_user {
                    s.freeze_until_ms.store(until, Ordering::Relaxed);
                }
            }
            // Edge memory can only be sampled for edges this drill started.
            let edge_pids = target.edge_pids();
            let before: Vec<u64> = edge_pids.iter().map(|p| rss_kib(*p).unwrap_or(0)).collect();
            let ingest = target.ingest(Duration::from_secs(10))?;
            let pad = payload(&serde_json::json!({"pad": "x".repeat(16 << 10)}));
            let items: Vec<_> = (0..300)
                .map(|_| notification(slow_user, &pad, None))
                .collect();
            // What the ingest acknowledges goes to the ledger: the frozen devices must get
            // all of it once they resume.
            let mut flooded = 0;
            for _ in 0..4 {
                let Ok(results) = ingest.append_batch(&items).await else {
                    continue;
                };
                let at = start.elapsed().as_millis() as u64;
                let mut ledger = ledger.lock().expect("ledger lock is never poisoned");
                for appended in results.into_iter().flatten() {
                    flooded += 1;
                    ledger.entry(slow_user.to_owned()).or_default().push((
                        appended.seq,
                        appended.epoch,
                        at,
                    ));
                }
            }
            let sample_until = Instant::now() + Duration::from_millis(freeze_ms);
            let mut peak = before.clone();
            while Instant::now() < sample_until {
                for (p, pid) in peak.iter_mut().zip(&edge_pids) {
                    *p = (*p).max(rss_kib(*pid).unwrap_or(0));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let growth = peak
                .iter()
                .zip(&before)
                .map(|(p, b)| p.saturating_sub(*b))
                .max()
                .unwrap_or(0);
            *slow_growth = (*slow_growth).max(growth);
            Ok(format!(
                "froze {slow_user}'s devices {freeze_ms} ms, flooded {flooded} x 16 KiB; edge RSS +{growth} KiB"
            ))
        }
    }
}

/// A progress line: rewritten in place on a terminal, one line every 10 s in a log.
fn progress(start: &Instant, shared: &[Arc<DeviceShared>], ledger: &Ledger, faults: usize) {
    use std::io::IsTerminal;
    let terminal = std::io::stderr().is_terminal();
    let secs = start.elapsed().as_secs();
    if !terminal && !secs.is_multiple_of(10) {
        return;
    }
    let connected = shared
        .iter()
        .filter(|s| s.connected.load(Ordering::Relaxed))
        .count();
    let acked: usize = ledger
        .lock()
        .expect("ledger lock is never poisoned")
        .values()
        .map(Vec::len)
        .sum();
    let line = format!(
        "[{secs:>5} s] devices connected {connected}/{}  acknowledged {acked}  faults {faults}",
        shared.len()
    );
    if terminal {
        eprint!("\r{line}   ");
    } else {
        eprintln!("{line}");
    }
}

/// Checks every device's log against the ledger.
#[allow(clippy::too_many_arguments)]
fn check(
    args: &DrillArgs,
    edges: usize,
    applicable: &[Fault],
    ledger: &HashMap<String, Vec<(u64, String, u64)>>,
    logs: &[DeviceLog],
    injections: Vec<Injection>,
    slow_growth: u64,
    producers: &[producer::ProducerStats],
) -> Report {
    // Violations, each with the time it is attributed to.
    let mut lost_at: Vec<u64> = Vec::new();
    let mut disorder_at: Vec<u64> = Vec::new();
    let mut bad_dup_at: Vec<u64> = Vec::new();
    let mut non_contiguous = 0usize;
    let mut allowed_duplicates = 0usize;
    let mut delivered = 0u64;
    let mut transports: Vec<TransportRow> = Vec::new();
    for log in logs {
        let before = (lost_at.len(), disorder_at.len(), bad_dup_at.len());
        delivered += log.received.len() as u64;
        // Per connection: strictly increasing within an epoch, and contiguous.
        let mut last: Option<(u32, Arc<str>, u64)> = None;
        for r in &log.received {
            if let Some((conn, epoch, seq)) = &last
                && *conn == r.conn
                && **epoch == *r.epoch
            {
                if r.seq <= *seq {
                    disorder_at.push(r.at_ms);
                } else if r.seq != seq + 1 {
                    non_contiguous += 1;
                    disorder_at.push(r.at_ms);
                }
            }
            last = Some((r.conn, r.epoch.clone(), r.seq));
        }
        // Duplicates: only after an app restart, and only of what was not stored as acked.
        let floors: BTreeMap<u32, u64> = log.forgets.iter().copied().collect();
        let mut seen: HashSet<(Arc<str>, u64)> = HashSet::new();
        for r in &log.received {
            if !seen.insert((r.epoch.clone(), r.seq)) {
                let floor = floors.range(..=r.conn).next_back().map(|(_, f)| *f);
                match floor {
                    Some(f) if r.seq > f => allowed_duplicates += 1,
                    _ => bad_dup_at.push(r.at_ms),
                }
            }
        }
        // No loss: every acknowledged seq of the user, in the epoch the device is in.
        if let Some(acked) = ledger.get(&log.user) {
            let got: HashSet<(&str, u64)> =
                log.received.iter().map(|r| (&*r.epoch, r.seq)).collect();
            for (seq, epoch, at) in acked {
                if !got.contains(&(epoch.as_str(), *seq)) {
                    lost_at.push(*at);
                }
            }
        }
        let name = log.transport.name();
        let row = match transports.iter().position(|t| t.transport == name) {
            Some(k) => &mut transports[k],
            None => {
                transports.push(TransportRow {
                    transport: name,
                    ..TransportRow::default()
                });
                transports.last_mut().expect("just pushed")
            }
        };
        row.devices += 1;
        row.connects += u64::from(log.connects);
        row.delivered += log.received.len() as u64;
        row.lost += lost_at.len() - before.0;
        row.out_of_order += disorder_at.len() - before.1;
        row.bad_duplicates += bad_dup_at.len() - before.2;
        row.wire_duplicates += log.wire_duplicates;
        row.client_gaps += log.client_gaps;
        row.resets += log.resets.len();
    }
    transports.sort_by_key(|t| t.transport);
    // Attribute each violation to the last fault injected before it.
    // Violations before the first fault count under `None`.
    let attribute = |times: &[u64]| -> HashMap<Option<Fault>, usize> {
        let mut by = HashMap::new();
        for t in times {
            let kind = injections
                .iter()
                .rev()
                .find(|i| i.at_ms <= *t)
                .map(|i| i.kind);
            *by.entry(kind).or_insert(0) += 1;
        }
        by
    };
    let (lost_by, disorder_by, dup_by) = (
        attribute(&lost_at),
        attribute(&disorder_at),
        attribute(&bad_dup_at),
    );
    let rows = applicable
        .iter()
        .map(|kind| {
            let of_kind: Vec<&Injection> = injections.iter().filter(|i| i.kind == *kind).collect();
            let times: Vec<f64> = of_kind
                .iter()
                .filter_map(|i| i.recovered_ms.map(|m| m as f64))
                .collect();
            let lost = lost_by.get(&Some(*kind)).copied().unwrap_or(0);
            let out_of_order = disorder_by.get(&Some(*kind)).copied().unwrap_or(0);
            let bad_duplicates = dup_by.get(&Some(*kind)).copied().unwrap_or(0);
            Row {
                fault: *kind,
                injected: of_kind.len(),
                survived: if lost + out_of_order + bad_duplicates == 0 {
                    times.len()
                } else {
                    0
                },
                lost,
                out_of_order,
                bad_duplicates,
                recover_ms_median: median(&times),
                recover_ms_max: of_kind
                    .iter()
                    .filter_map(|i| i.recovered_ms)
                    .max()
                    .unwrap_or(0),
            }
        })
        .collect();
    let before_first_fault = [
        lost_by.get(&None).copied().unwrap_or(0),
        disorder_by.get(&None).copied().unwrap_or(0),
        dup_by.get(&None).copied().unwrap_or(0),
    ];
    Report {
        before_first_fault,
        duration_s: args.duration.as_secs(),
        devices: args.devices,
        users: args.users,
        edges,
        rate_per_s: args.rate,
        acknowledged: producers.iter().map(|p| p.acknowledged).sum(),
        delivered,
        producer_retries: producers.iter().map(|p| p.retries).sum(),
        producer_deduplicated: producers.iter().map(|p| p.deduplicated).sum(),
        lost: lost_at.len(),
        out_of_order: disorder_at.len(),
        non_contiguous,
        bad_duplicates: bad_dup_at.len(),
        allowed_duplicates,
        wire_duplicates: logs.iter().map(|l| l.wire_duplicates).sum(),
        client_gaps: logs.iter().map(|l| l.client_gaps).sum(),
        resets: logs.iter().map(|l| l.resets.len()).sum(),
        slow_consumer_edge_rss_growth_kib: slow_growth,
        memory_bound_kib: MEMORY_BOUND_KIB,
        rows,
        transports,
        injections,
    }
}

fn print(r: &Report) {
    println!(
        "drill: {} s of faults, {} devices of {} users on {} edges, {} notifications/s",
        r.duration_s, r.devices, r.users, r.edges, r.rate_per_s
    );
    println!(
        "acknowledged {} notifications, delivered {} (to all devices), producer retries {}, retried writes recognised by idempotency key {}",
        r.acknowledged, r.delivered, r.producer_retries, r.producer_deduplicated
    );
    println!();
    println!(
        "| fault | injected | survived | lost | out of order | duplicates (not allowed) | recovery p50 ms | recovery max ms |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for row in &r.rows {
        println!(
            "| {:?} | {} | {} | {} | {} | {} | {:.0} | {} |",
            row.fault,
            row.injected,
            row.survived,
            row.lost,
            row.out_of_order,
            row.bad_duplicates,
            row.recover_ms_median,
            row.recover_ms_max
        );
    }
    let [lost, disorder, dups] = r.before_first_fault;
    println!("| (before the first fault) | - | - | {lost} | {disorder} | {dups} | - | - |");
    println!();
    println!(
        "lost {}, out of order {} (of which gaps within a connection {}), duplicates not allowed {}, duplicates allowed (unacked, after an app restart) {}, wire duplicates dropped by the client {}, gaps the client caught {}, resets {}",
        r.lost,
        r.out_of_order,
        r.non_contiguous,
        r.bad_duplicates,
        r.allowed_duplicates,
        r.wire_duplicates,
        r.client_gaps,
        r.resets
    );
    println!();
    println!(
        "| transport | devices | connects | delivered | lost | out of order | duplicates (not allowed) | wire duplicates | client gaps | resets |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for t in &r.transports {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            t.transport,
            t.devices,
            t.connects,
            t.delivered,
            t.lost,
            t.out_of_order,
            t.bad_duplicates,
            t.wire_duplicates,
            t.client_gaps,
            t.resets
        );
    }
    println!();
    println!(
        "edge memory during the slow-consumer fault: +{} KiB (bound {} KiB)",
        r.slow_consumer_edge_rss_growth_kib, r.memory_bound_kib
    );
    let failed = r
        .rows
        .iter()
        .filter(|row| row.lost + row.out_of_order + row.bad_duplicates > 0 || row.injected == 0)
        .count()
        + usize::from(r.before_first_fault.iter().sum::<usize>() > 0);
    for i in &r.injections {
        println!(
            "  {:>7} ms {:?}: {} (recovered in {})",
            i.at_ms,
            i.kind,
            i.note,
            i.recovered_ms
                .map_or_else(|| "never".to_owned(), |m| format!("{m} ms"))
        );
    }
    // Over the fault kinds and the time before the first fault: passed when nothing was
    // lost, reordered or duplicated (and, for a kind, when it was injected).
    println!(
        "drill: {} passed, {} failed",
        (r.rows.len() + 1).saturating_sub(failed),
        failed
    );
}
