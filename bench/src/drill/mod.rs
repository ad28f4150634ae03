//! The fault drill (`gapless-bench drill`): starts a real system as processes (Redis with AOF
//! `appendfsync always`, the migrations, one ingest, several edges), runs simulated devices
//! and producers against it while a fault schedule attacks it, and checks the guarantees of
//! DESIGN.md §2 from what every device received.
//!
//! In the order of a run: [`schedule`] says which faults come when; [`device`] simulates
//! devices on the `gapless-client` crate (over the WebSocket, SSE and long-polling:
//! `--transport`, a third of the devices on each by default); [`ledger`]'s producers append
//! with idempotency keys and retries and record what was acknowledged; [`faults`] injects
//! each fault ([`proxy`] blackholes connections); [`check`] turns the logs and the ledger
//! into a table per fault kind.

mod check;
mod device;
mod faults;
mod ledger;
mod proxy;
mod schedule;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use gapless_client::ClientConfig;
use gapless_shared::config::RedisConfig;
use gapless_shared::store;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use check::{Evidence, MEMORY_BOUND_KIB, Setting, check, print};
use device::{DeviceShared, DeviceSpec};
use faults::inject;
use ledger::{Ledger, Mode, Producer};
use proxy::Proxy;
use schedule::{Fault, Injection, schedule};

use crate::fleet::{Fleet, FleetOptions};
use crate::target::Target;
use crate::transports::TransportMix;

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
        None => Target::started(start_fleet(&args).await?),
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
    let urls = [direct, proxied];
    let (shared, devices) =
        spawn_devices(&args, &target, &store, &users, &urls, start, &stop_devices);
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
    let producers = spawn_producers(
        &args,
        &target,
        &users[..args.users - 1],
        &ledger,
        start,
        &stop_producers,
    );

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
        print_behind(&final_snapshot, &shared, &users);
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
        Setting {
            duration_s: args.duration.as_secs(),
            devices: args.devices,
            users: args.users,
            edges: edges.len(),
            rate_per_s: args.rate,
        },
        Evidence {
            applicable: &applicable,
            ledger: &ledger,
            logs: &logs,
            injections,
            slow_growth,
            producers: &producer_stats,
        },
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

/// Starts the system the drill attacks: Redis with `appendfsync always`, one ingest (on a
/// cluster, answering appends only once a replica holds them), `--edges` edges with short
/// timings so faults are noticed within seconds.
async fn start_fleet(args: &DrillArgs) -> anyhow::Result<Fleet> {
    let hb = args.heartbeat_ms;
    // On a cluster, an append is answered only once a replica holds it: what a SIGKILLed
    // primary's replica takes over is then everything acknowledged.
    let ingest_env = if args.cluster {
        vec![("GAPLESS_MIN_REPLICAS_ACK".into(), "1".into())]
    } else {
        Vec::new()
    };
    Fleet::start_full(FleetOptions {
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
    .await
}

/// Starts the devices, spread over `users`: every fifth through `urls[1]` (the blackhole
/// proxies), the others direct (`urls[0]`); three in four flappy.
fn spawn_devices(
    args: &DrillArgs,
    target: &Target,
    store: &store::Store,
    users: &[String],
    urls: &[Vec<String>; 2],
    start: Instant,
    stop: &CancellationToken,
) -> (
    Vec<Arc<DeviceShared>>,
    Vec<tokio::task::JoinHandle<device::DeviceLog>>,
) {
    let hb = args.heartbeat_ms;
    let mut shared = Vec::new();
    let mut devices = Vec::new();
    for i in 0..args.devices {
        let user = users[i % users.len()].clone();
        let device = format!("dev-{i}");
        let token = gapless_shared::token::mint_hs256(
            &target.jwt_secret,
            &user,
            Some(&device),
            Duration::from_secs(24 * 3600),
        );
        let mut config = ClientConfig::new(urls[usize::from(i % 5 == 4)].clone(), token);
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
        devices.push(tokio::spawn(device::run(spec, s, start, stop.clone())));
    }
    (shared, devices)
}

/// Starts the producers: 60% of the rate in batches, 20% in bulk runs, 20% one at a time.
fn spawn_producers(
    args: &DrillArgs,
    target: &Target,
    users: &[String],
    ledger: &Ledger,
    start: Instant,
    stop: &CancellationToken,
) -> Vec<tokio::task::JoinHandle<ledger::ProducerStats>> {
    [
        ("batch", Mode::Batch, 0.6),
        ("bulk", Mode::Bulk, 0.2),
        ("single", Mode::Single, 0.2),
    ]
    .into_iter()
    .map(|(name, mode, share)| {
        let p = Producer {
            name: format!("{name}-{}", std::process::id()),
            ingest_url: target.ingest_url.clone(),
            api_key: target.api_key.clone(),
            users: users.to_vec(),
            rate: args.rate * share,
            mode,
        };
        tokio::spawn(p.run(ledger.clone(), start, stop.clone()))
    })
    .collect()
}

/// Names each device that holds less than its user's last acknowledged seq.
fn print_behind(snapshot: &HashMap<String, u64>, shared: &[Arc<DeviceShared>], users: &[String]) {
    eprintln!("devices did not all catch up within 60 s; behind:");
    for (i, s) in shared.iter().enumerate() {
        let user = &users[i % users.len()];
        let want = snapshot.get(user).copied().unwrap_or(0);
        let have = s.max_seq.load(Ordering::Relaxed);
        if have < want {
            eprintln!(
                "  dev-{i} of {user}: has {have} of {want}, connected {}",
                s.connected.load(Ordering::Relaxed)
            );
        }
    }
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
