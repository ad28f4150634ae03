//! Fault drills on a real local Redis Cluster under load (DESIGN.md §2 and §7.1): while a
//! producer appends to one user without pause and three devices of that user receive on two
//! edges, the user's slot moves to another primary, its primary fails over by hand, or its
//! primary is SIGKILLed (the ingest asking `--min-replicas-ack 1`). Each drill checks that
//! every notification the ingest answered with a seq reaches every device, in seq order,
//! with duplicates only at a reconnect, that the user's log holds each idempotency key
//! exactly once, at contiguous seqs, and that the ingest answered every failed attempt
//! during the fault with a retryable 503 and `Retry-After` (DESIGN.md §4), never a 500.
//!
//! The devices are raw WebSocket clients (not the `gapless-client` SDK, which drops
//! duplicates and heals gaps by reconnecting, and so would hide what the edge sent): each
//! acks every notification it reads and, when its connection ends, reconnects and resumes
//! after the highest seq it holds. Set `GAPLESS_LOG` (e.g. `info,gapless_edge=debug`) to see
//! the ingest's and edges' logs.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use common::{API_KEY, Backend, Client, Kind, System};
use futures_util::{SinkExt, StreamExt};
use gapless_shared::ids::UserId;
use gapless_shared::keys;
use gapless_shared::protocol::{self, ClientMessage, ServerMessage};
use gapless_shared::store::Shard;
use gapless_shared::testing::TestCluster;
use serde_json::json;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// One append about every this long: a steady stream through the fault.
const PACE: Duration = Duration::from_millis(10);
/// Pause before retrying a refused or failed append: short, so retries hammer the ingest
/// through the fault window instead of politely waiting out `Retry-After`.
const RETRY_PAUSE: Duration = Duration::from_millis(50);
/// Bound of one append request (the ingest's own Redis timeout is 2 s).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a single idempotency key may go unanswered before the drill gives up.
const KEY_DEADLINE: Duration = Duration::from_secs(30);
/// Load before the fault, so it strikes a steady stream.
const BEFORE_FAULT: Duration = Duration::from_secs(1);
/// Load after the fault.
const AFTER_FAULT: Duration = Duration::from_millis(1500);
/// How long the devices may take, after the producer stopped, to hold everything answered
/// (covers the edges' lost-wakeup sweep, every 15 s by default).
const CATCH_UP: Duration = Duration::from_secs(30);
/// Quiet time after the catch-up, to see any late duplicate or stray delivery.
const SETTLE: Duration = Duration::from_millis(500);

/// The devices of the user and the edge each one connects to (an index into the edges).
const DEVICES: [(&str, usize); 3] = [("phone", 0), ("laptop", 1), ("tablet", 0)];
/// The edges' ids.
const EDGES: [&str; 2] = ["edge-a", "edge-b"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_move_under_load_loses_nothing() {
    let sys = System::start_on(Kind::Cluster).await;
    // A slot of a few keys moves in a couple of milliseconds, between two appends; a
    // neighbour's 5,000 idempotency keys in the same slot stretch the migration over many
    // `MIGRATE` rounds, so appends meet the slot half moved (`ASK`, `TRYAGAIN`).
    let neighbour = neighbour_of("ursula");
    fill(&sys, &neighbour, 5000).await;
    let drill = Drill::start(&sys, "ursula").await;
    let Backend::Cluster(cluster) = &sys.redis else {
        unreachable!("started on a cluster")
    };
    let slot = cluster.slot_of_user("ursula");
    let owner = cluster.owner_of(slot);
    let target = cluster.other_primary(owner);
    let started = Instant::now();
    // ASK redirects while the keys migrate, MOVED after: the ingest and edges follow both.
    tokio::task::block_in_place(|| cluster.move_slot(slot, target));
    let window = started..Instant::now();
    let fault = format!(
        "slot {slot} of ursula (and of {neighbour}'s 5000 keys) moved from node {owner} \
         (:{}) to node {target} (:{}) in {:?}",
        cluster.node(owner).port(),
        cluster.node(target).port(),
        started.elapsed()
    );
    assert_eq!(cluster.owner_of(slot), target, "the slot moved");
    drill.finish(&sys, &fault, window).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_failover_under_load_loses_nothing() {
    let sys = System::start_on(Kind::Cluster).await;
    let drill = Drill::start(&sys, "uma").await;
    let Backend::Cluster(cluster) = &sys.redis else {
        unreachable!("started on a cluster")
    };
    let slot = cluster.slot_of_user("uma");
    let owner = cluster.owner_of(slot);
    let started = Instant::now();
    // `CLUSTER FAILOVER` without FORCE: the primary pauses its clients until the replica has
    // caught up, so even without `WAIT` no answered append may be lost.
    let promoted = tokio::task::block_in_place(|| cluster.failover(owner));
    let window = started..Instant::now();
    let fault = format!(
        "primary {owner} (:{}) of uma's slot {slot} failed over to node {promoted} (:{}) in {:?}",
        cluster.node(owner).port(),
        cluster.node(promoted).port(),
        started.elapsed()
    );
    assert_eq!(
        cluster.owner_of(slot),
        promoted,
        "the replica serves the slot"
    );
    drill.finish(&sys, &fault, window).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_primary_with_min_replicas_ack_loses_no_acknowledged_notification() {
    let mut sys = System::start_on_with(Kind::Cluster, |c| c.min_replicas_ack = 1).await;
    let drill = Drill::start(&sys, "ulrich").await;
    let Backend::Cluster(cluster) = &mut sys.redis else {
        unreachable!("started on a cluster")
    };
    let slot = cluster.slot_of_user("ulrich");
    let owner = cluster.owner_of(slot);
    let started = Instant::now();
    let promoted = tokio::task::block_in_place(|| cluster.kill_primary(owner));
    let promoted_after = started.elapsed();
    // The promoted replica has no replica of its own, so every `WAIT 1` fails (503
    // `not_replicated`, retried with the same key) until the killed node is back as its
    // replica and in sync.
    tokio::task::block_in_place(|| {
        cluster
            .node_mut(owner)
            .restart()
            .expect("the killed primary restarts from its AOF");
        wait_replicating(cluster, owner);
    });
    let window = started..Instant::now();
    let fault = format!(
        "primary {owner} (:{}) of ulrich's slot {slot} SIGKILLed; node {promoted} (:{}) \
         promoted after {promoted_after:?}; the old primary replicating again after {:?}",
        cluster.node(owner).port(),
        cluster.node(promoted).port(),
        started.elapsed()
    );
    assert_eq!(
        cluster.owner_of(slot),
        promoted,
        "the replica serves the slot"
    );
    drill.finish(&sys, &fault, window).await;
}

/// Another user whose keys share `user`'s slot.
fn neighbour_of(user: &str) -> String {
    let slot = Shard::of_key(&keys::meta(&UserId::parse(user).expect("a valid user id")));
    (0..)
        .map(|i| format!("neighbour-{i}"))
        .find(|n| Shard::of_key(&keys::meta(&UserId::parse(n).expect("a valid user id"))) == slot)
        .expect("one of 16384 hash slots is found among enough names")
}

/// Appends `n` notifications to `user`, each with its own idempotency key (one key in Redis
/// each), in batches of 1,000.
async fn fill(sys: &System, user: &str, n: usize) {
    for start in (0..n).step_by(1000) {
        let items: Vec<serde_json::Value> = (start..n.min(start + 1000))
            .map(|i| json!({"user": user, "payload": i, "idempotency_key": format!("fill-{i}")}))
            .collect();
        let results = sys.post_batch(&items).await;
        assert!(
            results.iter().all(Result::is_ok),
            "every filler item is appended: {results:?}"
        );
    }
}

/// Waits (blocking) until the node at `index` is a replica in sync with its primary.
fn wait_replicating(cluster: &TestCluster, index: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !cluster.replicating(index) {
        assert!(
            std::time::Instant::now() < deadline,
            "node {index} never replicated again after its restart"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    cluster.wait_stable();
}

/// Logs of the services to stderr when `GAPLESS_LOG` is set (once per test binary).
fn init_logs() {
    static INIT: Once = Once::new();
    if std::env::var_os("GAPLESS_LOG").is_some() {
        INIT.call_once(|| gapless_shared::telemetry::init_tracing(Default::default()));
    }
}

/// A running drill: edges, devices receiving, a producer appending.
struct Drill {
    /// The user everything is for.
    user: String,
    /// The edges (kept alive for the drill).
    _edges: Vec<common::Edge>,
    /// The devices' tasks and what they received.
    devices: Vec<Device>,
    /// Cancelled to stop the producer; it finishes the key it is on first.
    stop_producer: CancellationToken,
    /// The producer's task.
    producer: JoinHandle<()>,
    /// What the producer was answered.
    produced: Arc<Mutex<ProducerLog>>,
    /// When the producer started.
    started: Instant,
}

impl Drill {
    /// Starts the edges, the first notification, the devices (each holding seq 1 and its
    /// edge registered before the load starts), then the producer.
    async fn start(sys: &System, user: &str) -> Self {
        init_logs();
        let mut edges = Vec::new();
        for id in EDGES {
            edges.push(sys.edge(sys.edge_config(id)).await);
        }
        let produced = Arc::new(Mutex::new(ProducerLog::default()));
        let producer = Producer {
            http: sys.http.clone(),
            url: format!("{}/v1/notifications", sys.ingest_url),
            user: user.to_owned(),
            log: produced.clone(),
        };
        producer.append(1).await;
        let epoch = produced.lock().expect("producer log").answered[0]
            .epoch
            .clone();

        let stop_devices = CancellationToken::new();
        let devices: Vec<Device> = DEVICES
            .iter()
            .map(|&(name, edge)| {
                Device::start(
                    edges[edge].ws_url(),
                    user,
                    name,
                    &epoch,
                    stop_devices.clone(),
                )
            })
            .collect();
        common::eventually(
            "every device receives seq 1",
            Duration::from_secs(10),
            || async { devices.iter().all(|d| d.holds(&[1])) },
        )
        .await;
        for id in EDGES {
            sys.wait_registered(user, id).await;
        }

        let stop_producer = CancellationToken::new();
        let started = Instant::now();
        let producer = tokio::spawn(producer.run(2, stop_producer.clone()));
        tokio::time::sleep(BEFORE_FAULT).await;
        Self {
            user: user.to_owned(),
            _edges: edges,
            devices,
            stop_producer,
            producer,
            produced,
            started,
        }
    }

    /// Keeps the load on a while after the fault, stops it, waits until every device holds
    /// every answered seq, and checks everything.
    async fn finish(mut self, sys: &System, fault: &str, window: Range<Instant>) {
        tokio::time::sleep(AFTER_FAULT).await;
        self.stop_producer.cancel();
        if let Err(e) = (&mut self.producer).await {
            panic!("the producer failed: {e}\n{}", self.report(fault, &window));
        }
        let produced_for = self.started.elapsed();
        let answered: Vec<u64> = self
            .produced
            .lock()
            .expect("producer log")
            .answered
            .iter()
            .map(|a| a.seq)
            .collect();

        let waited = Instant::now();
        let deadline = waited + CATCH_UP;
        loop {
            if self.devices.iter().all(|d| d.holds(&answered)) {
                break;
            }
            if let Some(d) = self.devices.iter().find(|d| d.task.is_finished()) {
                panic!(
                    "device {} stopped receiving early (see its panic above)\n{}",
                    d.name,
                    self.report(fault, &window)
                );
            }
            if Instant::now() >= deadline {
                let produced = self.produced.lock().expect("producer log");
                let problems: Vec<String> = self
                    .devices
                    .iter()
                    .flat_map(|d| d.problems(&produced))
                    .collect();
                drop(produced);
                panic!(
                    "not every device received every answered notification within \
                     {CATCH_UP:?} after the producer stopped:\n  {}\n{}",
                    problems.join("\n  "),
                    self.report(fault, &window)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let caught_up = waited.elapsed();
        tokio::time::sleep(SETTLE).await;

        let log = self.history(sys).await;
        let mut problems = self.produced.lock().expect("producer log").problems();
        if self.overlapping(&window) == 0 {
            problems
                .push("no append was in flight during the fault: the drill proves nothing".into());
        }
        problems.extend(self.log_problems(&log));
        for d in &self.devices {
            problems.extend(d.problems(&self.produced.lock().expect("producer log")));
        }
        let report = self.report(fault, &window);
        eprintln!(
            "{report}\nproduced for {produced_for:?}; every device held everything \
             {caught_up:?} after the producer stopped"
        );
        assert!(
            problems.is_empty(),
            "{} problem(s):\n  {}\n{report}",
            problems.len(),
            problems.join("\n  ")
        );
        for d in self.devices {
            d.stop.cancel();
            d.task.await.expect("the device task ends cleanly");
        }
    }

    /// The user's whole log, `(seq, idempotency key of its payload)`, read through the
    /// ingest's history endpoint.
    async fn history(&self, sys: &System) -> Vec<(u64, String)> {
        let mut entries = Vec::new();
        loop {
            let after = entries.last().map_or(0, |&(seq, _)| seq);
            let page: serde_json::Value = sys
                .http
                .get(format!(
                    "{}/v1/users/{}/notifications?after={after}&limit=1000",
                    sys.ingest_url, self.user
                ))
                .bearer_auth(API_KEY)
                .send()
                .await
                .expect("the history endpoint answers")
                .error_for_status()
                .expect("history is 200")
                .json()
                .await
                .expect("history is JSON");
            let notes = page["notifications"].as_array().expect("notifications");
            if notes.is_empty() {
                return entries;
            }
            for n in notes {
                let seq = n["seq"].as_u64().expect("an entry has a seq");
                let key = n["payload"]["key"]
                    .as_str()
                    .expect("every payload names its key")
                    .to_owned();
                entries.push((seq, key));
            }
        }
    }

    /// The log must be exactly the answered notifications: each key once, at the seq it
    /// was answered, seqs 1..=N.
    fn log_problems(&self, log: &[(u64, String)]) -> Vec<String> {
        let produced = self.produced.lock().expect("producer log");
        let mut problems = Vec::new();
        let answered: HashMap<u64, &str> = produced
            .answered
            .iter()
            .map(|a| (a.seq, a.key.as_str()))
            .collect();
        let mut counts: HashMap<&str, Vec<u64>> = HashMap::new();
        for (seq, key) in log {
            counts.entry(key.as_str()).or_default().push(*seq);
            match answered.get(seq) {
                Some(k) if k == key => {}
                Some(k) => problems.push(format!(
                    "the log holds {key} at seq {seq}, which was answered for {k}"
                )),
                None => problems.push(format!(
                    "the log holds {key} at seq {seq}, a seq no append was answered"
                )),
            }
        }
        for (key, seqs) in &counts {
            if seqs.len() > 1 {
                problems.push(format!(
                    "the log holds {key} {} times: {seqs:?}",
                    seqs.len()
                ));
            }
        }
        let seqs: Vec<u64> = log.iter().map(|&(seq, _)| seq).collect();
        let expected: Vec<u64> = (1..=produced.answered.len() as u64).collect();
        if seqs != expected {
            problems.push(format!(
                "the log's seqs are not 1..={}: {}",
                expected.len(),
                ranges(&seqs)
            ));
        }
        problems
    }

    /// Appends that went out before the fault ended and were answered after it began.
    fn overlapping(&self, window: &Range<Instant>) -> usize {
        self.produced
            .lock()
            .expect("producer log")
            .answered
            .iter()
            .filter(|a| a.sent < window.end && a.sent + a.took > window.start)
            .count()
    }

    /// Everything observed, for a failure message.
    fn report(&self, fault: &str, window: &Range<Instant>) -> String {
        let mut out = format!("fault: {fault}\n");
        let overlapping = self.overlapping(window);
        out.push_str(&format!("appends overlapping the fault: {overlapping}\n"));
        out.push_str(&self.produced.lock().expect("producer log").summary());
        let answered: Vec<u64> = self
            .produced
            .lock()
            .expect("producer log")
            .answered
            .iter()
            .map(|a| a.seq)
            .collect();
        for d in &self.devices {
            out.push('\n');
            out.push_str(&d.summary(&answered));
        }
        out
    }
}

/// One append the ingest answered 200.
#[derive(Debug, Clone)]
struct Answer {
    /// The producer's running number (1, 2, …): the key is `k-<index>`.
    index: u64,
    /// The idempotency key (also in the payload).
    key: String,
    /// Epoch answered.
    epoch: String,
    /// Seq answered.
    seq: u64,
    /// Whether the answer was a duplicate (an earlier attempt had written it).
    duplicate: bool,
    /// Requests it took.
    attempts: u32,
    /// When the first attempt went out.
    sent: Instant,
    /// From the first attempt to the 200.
    took: Duration,
}

/// What the producer saw.
#[derive(Debug, Default)]
struct ProducerLog {
    /// Every 200, in the order sent (one key at a time, so in key order).
    answered: Vec<Answer>,
    /// Failed attempts by what failed (`503 unavailable`, `network: timeout`…).
    failures: BTreeMap<String, u32>,
    /// The first message of each kind of failure.
    examples: BTreeMap<String, String>,
}

impl ProducerLog {
    /// Seqs must follow the keys one for one: key `k-i` answered seq `i`, all in one epoch.
    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for a in &self.answered {
            if a.seq != a.index {
                problems.push(format!(
                    "{} was answered seq {} (attempts {}, duplicate {}): the seqs are not \
                     contiguous in the producer's order",
                    a.key, a.seq, a.attempts, a.duplicate
                ));
            }
        }
        // DESIGN.md §4: Redis unavailable is a 503 with `Retry-After`, the answer a producer
        // knows to retry; a slot in motion or a primary failing over is exactly that
        // (§7.1: "costs retries"). The producer above retried anything 5xx so that the
        // delivery checks still ran; any other answer is a contract breach of its own.
        for (failure, n) in &self.failures {
            let retryable = failure.starts_with("503 ") && !failure.ends_with("Retry-After");
            if !retryable && !failure.starts_with("network: ") {
                problems.push(format!(
                    "{n} append attempt(s) answered {failure} (first: {}); a fault of Redis \
                     must answer 503 with Retry-After",
                    self.examples.get(failure).map_or("?", String::as_str)
                ));
            }
        }
        let epochs: HashSet<&str> = self.answered.iter().map(|a| a.epoch.as_str()).collect();
        if epochs.len() > 1 {
            problems.push(format!(
                "appends were answered in several epochs: {epochs:?}"
            ));
        }
        problems
    }

    fn summary(&self) -> String {
        let retried: Vec<String> = self
            .answered
            .iter()
            .filter(|a| a.attempts > 1)
            .map(|a| {
                format!(
                    "{}->{}{} ({} attempts, {:?})",
                    a.key,
                    a.seq,
                    if a.duplicate { " dup" } else { "" },
                    a.attempts,
                    a.took
                )
            })
            .collect();
        let slowest = self
            .answered
            .iter()
            .map(|a| a.took)
            .max()
            .unwrap_or_default();
        format!(
            "producer: {} answered (last seq {}), slowest {slowest:?}; failed attempts: \
             {:?}; first of each: {:?}; retried keys: [{}]",
            self.answered.len(),
            self.answered.last().map_or(0, |a| a.seq),
            self.failures,
            self.examples,
            retried.join(", ")
        )
    }
}

/// Appends to one user, one key at a time, each retried with its key until answered 200.
struct Producer {
    /// HTTP client.
    http: reqwest::Client,
    /// `…/v1/notifications`.
    url: String,
    /// The user.
    user: String,
    /// Shared with the drill.
    log: Arc<Mutex<ProducerLog>>,
}

impl Producer {
    /// Appends `k-<first>`, `k-<first + 1>`, … about every [`PACE`] until `stop`; the key
    /// in hand is always finished, so every key sent was answered 200.
    async fn run(self, first: u64, stop: CancellationToken) {
        let mut pace = tokio::time::interval(PACE);
        pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for index in first.. {
            pace.tick().await;
            if stop.is_cancelled() {
                return;
            }
            self.append(index).await;
        }
    }

    /// Appends `k-<index>` until 200, as a careful producer does: the same idempotency key
    /// on every retry, after a 5xx or a network error alike. Panics on a 4xx or after
    /// [`KEY_DEADLINE`].
    async fn append(&self, index: u64) {
        let key = format!("k-{index}");
        let body = json!({"user": self.user, "payload": {"key": key}, "idempotency_key": key});
        let first = Instant::now();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let failure = match self
                .http
                .post(&self.url)
                .bearer_auth(API_KEY)
                .json(&body)
                .timeout(REQUEST_TIMEOUT)
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => {
                    let answer: serde_json::Value =
                        r.json().await.expect("a 200 carries a JSON answer");
                    let answer = Answer {
                        index,
                        key,
                        epoch: answer["epoch"].as_str().expect("an epoch").to_owned(),
                        seq: answer["seq"].as_u64().expect("a seq"),
                        duplicate: answer["duplicate"].as_bool().expect("duplicate"),
                        attempts,
                        sent: first,
                        took: first.elapsed(),
                    };
                    self.log.lock().expect("producer log").answered.push(answer);
                    return;
                }
                Ok(r) => {
                    let status = r.status();
                    let retry_after = r.headers().contains_key(reqwest::header::RETRY_AFTER);
                    let body: serde_json::Value = r.json().await.unwrap_or_default();
                    let code = body["error"]["code"].as_str().unwrap_or("?").to_owned();
                    assert!(
                        status.is_server_error(),
                        "{key}: answered {status} {body}: only a 5xx is worth a retry"
                    );
                    let message = body["error"]["message"].as_str().unwrap_or("").to_owned();
                    let bare = if status.as_u16() == 503 && !retry_after {
                        " without Retry-After"
                    } else {
                        ""
                    };
                    (format!("{} {code}{bare}", status.as_u16()), message)
                }
                Err(e) if e.is_timeout() => ("network: timeout".to_owned(), e.to_string()),
                Err(e) if e.is_connect() => ("network: connect".to_owned(), e.to_string()),
                Err(e) => ("network: other".to_owned(), e.to_string()),
            };
            let (failure, message) = failure;
            {
                let mut log = self.log.lock().expect("producer log");
                *log.failures.entry(failure.clone()).or_default() += 1;
                log.examples
                    .entry(failure.clone())
                    .or_insert_with(|| format!("{key} at {:?}: {message}", first.elapsed()));
            }
            assert!(
                first.elapsed() < KEY_DEADLINE,
                "{key} not answered 200 within {KEY_DEADLINE:?} ({attempts} attempts, last: \
                 {failure})"
            );
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }
}

/// A notification a device read.
#[derive(Debug, Clone)]
struct Received {
    /// Its seq.
    seq: u64,
    /// Its epoch.
    epoch: String,
    /// The idempotency key in its payload.
    key: String,
    /// Which of the device's connections brought it (1 = the first).
    connection: u32,
}

/// What one device saw.
#[derive(Debug, Default)]
struct DeviceLog {
    /// Every notification, in arrival order.
    received: Vec<Received>,
    /// Connections opened (1 = no reconnect).
    connections: u32,
    /// Why connections ended, and refused reconnects.
    disconnects: Vec<String>,
    /// Anything else the edge sent that a healthy drill never sees (`reset`, a second
    /// `welcome`).
    unexpected: Vec<String>,
}

/// A device of the user: a raw WebSocket client that acks what it reads and resumes after
/// its highest seq when its connection ends.
struct Device {
    /// Its device id.
    name: String,
    /// What it saw, shared with its task.
    log: Arc<Mutex<DeviceLog>>,
    /// Cancelled to stop its task.
    stop: CancellationToken,
    /// Its task.
    task: JoinHandle<()>,
}

impl Device {
    fn start(url: String, user: &str, name: &str, epoch: &str, stop: CancellationToken) -> Self {
        let log = Arc::new(Mutex::new(DeviceLog::default()));
        let task = tokio::spawn(receive(
            url,
            common::token(user, Some(name)),
            epoch.to_owned(),
            log.clone(),
            stop.clone(),
        ));
        Self {
            name: name.to_owned(),
            log,
            stop,
            task,
        }
    }

    /// True when the device received every one of `seqs`.
    fn holds(&self, seqs: &[u64]) -> bool {
        let log = self.log.lock().expect("device log");
        let have: HashSet<u64> = log.received.iter().map(|r| r.seq).collect();
        seqs.iter().all(|s| have.contains(s))
    }

    /// Everything wrong with what this device received, given what was answered: a missing
    /// seq, a gap or a step back (order), a duplicate on a stable connection (one is allowed
    /// only at the start of a resumed connection, DESIGN.md §2), a seq carrying another
    /// key's payload, a seq never answered, a reset, another epoch.
    fn problems(&self, produced: &ProducerLog) -> Vec<String> {
        let log = self.log.lock().expect("device log");
        let name = &self.name;
        let mut problems = Vec::new();
        let answered: HashMap<u64, &str> = produced
            .answered
            .iter()
            .map(|a| (a.seq, a.key.as_str()))
            .collect();
        let epoch = produced.answered.first().map(|a| a.epoch.as_str());
        let mut high = 0;
        // Connections that already brought a new seq: past their replay boundary.
        let mut past_boundary: HashSet<u32> = HashSet::new();
        for r in &log.received {
            if r.seq == high + 1 {
                high = r.seq;
                past_boundary.insert(r.connection);
            } else if r.seq <= high {
                if r.connection == 1 || past_boundary.contains(&r.connection) {
                    problems.push(format!(
                        "{name}: seq {} again after {high} on a stable connection (#{})",
                        r.seq, r.connection
                    ));
                }
            } else {
                problems.push(format!(
                    "{name}: seq {} right after {high} on connection #{}: a gap",
                    r.seq, r.connection
                ));
                high = r.seq;
                past_boundary.insert(r.connection);
            }
            match answered.get(&r.seq) {
                Some(&k) if k == r.key => {}
                Some(&k) => problems.push(format!(
                    "{name}: seq {} carried {}, but {k} was answered that seq",
                    r.seq, r.key
                )),
                None => problems.push(format!(
                    "{name}: seq {} ({}) was never answered to the producer",
                    r.seq, r.key
                )),
            }
            if Some(r.epoch.as_str()) != epoch {
                problems.push(format!(
                    "{name}: seq {} in epoch {}, appends were answered in {epoch:?}",
                    r.seq, r.epoch
                ));
            }
        }
        let have: HashSet<u64> = log.received.iter().map(|r| r.seq).collect();
        let missing: Vec<u64> = produced
            .answered
            .iter()
            .map(|a| a.seq)
            .filter(|s| !have.contains(s))
            .collect();
        if !missing.is_empty() {
            problems.push(format!(
                "{name}: missing {} answered seq(s): {}",
                missing.len(),
                ranges(&missing)
            ));
        }
        for u in &log.unexpected {
            problems.push(format!("{name}: {u}"));
        }
        problems
    }

    fn summary(&self, answered: &[u64]) -> String {
        let log = self.log.lock().expect("device log");
        let have: HashSet<u64> = log.received.iter().map(|r| r.seq).collect();
        let missing: Vec<u64> = answered
            .iter()
            .copied()
            .filter(|s| !have.contains(s))
            .collect();
        let duplicates = log.received.len() - have.len();
        let tail: Vec<String> = log
            .received
            .iter()
            .rev()
            .take(5)
            .rev()
            .map(|r| format!("{}@#{}", r.seq, r.connection))
            .collect();
        format!(
            "device {}: {} received ({duplicates} duplicate), {} connection(s), missing [{}], \
             last [{}], disconnects {:?}, unexpected {:?}",
            self.name,
            log.received.len(),
            log.connections,
            ranges(&missing),
            tail.join(", "),
            log.disconnects,
            log.unexpected
        )
    }
}

/// A device's life: connect, resume after the highest seq held, read and ack; on any end of
/// the connection, reconnect and resume again. Until `stop`.
async fn receive(
    url: String,
    token: String,
    epoch: String,
    log: Arc<Mutex<DeviceLog>>,
    stop: CancellationToken,
) {
    let mut high = 0;
    loop {
        let Some(mut client) = connect(&url, &token, &log, &stop).await else {
            return;
        };
        let connection = {
            let mut log = log.lock().expect("device log");
            log.connections += 1;
            log.connections
        };
        let resume = ClientMessage::Resume {
            epoch: Some(epoch.clone()),
            after: Some(high),
        };
        if let Err(e) = send(&mut client.ws, &resume).await {
            lost(&log, format!("#{connection}: resume not sent: {e}"));
            continue;
        }
        let ended = loop {
            let frame = tokio::select! {
                frame = client.ws.next() => frame,
                () = stop.cancelled() => {
                    let _ = client.ws.close(None).await;
                    return;
                }
            };
            let msg = match frame {
                Some(Ok(Message::Text(text))) => {
                    match protocol::from_json::<ServerMessage>(text.as_str()) {
                        Ok(msg) => msg,
                        Err(e) => {
                            let what = format!("#{connection}: bad frame {text}: {e}");
                            log.lock().expect("device log").unexpected.push(what);
                            continue;
                        }
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    break format!("#{connection}: closed {frame:?}");
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => break format!("#{connection}: {e}"),
                None => break format!("#{connection}: ended"),
            };
            match msg {
                ServerMessage::Notification(n) => {
                    let key = serde_json::from_str::<serde_json::Value>(n.payload.get())
                        .ok()
                        .and_then(|p| p["key"].as_str().map(str::to_owned))
                        .unwrap_or_else(|| format!("<payload {}>", n.payload.get()));
                    high = high.max(n.seq);
                    log.lock().expect("device log").received.push(Received {
                        seq: n.seq,
                        epoch: n.epoch,
                        key,
                        connection,
                    });
                    if let Err(e) = send(&mut client.ws, &ClientMessage::Ack { seq: n.seq }).await {
                        break format!("#{connection}: ack not sent: {e}");
                    }
                }
                ServerMessage::Ping => {
                    if let Err(e) = send(&mut client.ws, &ClientMessage::Pong).await {
                        break format!("#{connection}: pong not sent: {e}");
                    }
                }
                other => {
                    let what = format!("#{connection}: {other:?}");
                    log.lock().expect("device log").unexpected.push(what);
                }
            }
        };
        lost(&log, ended);
    }
}

/// Opens a connection (reads `welcome`), retrying a refused upgrade every 100 ms; `None`
/// when stopped first.
async fn connect(
    url: &str,
    token: &str,
    log: &Mutex<DeviceLog>,
    stop: &CancellationToken,
) -> Option<Client> {
    loop {
        if stop.is_cancelled() {
            return None;
        }
        match Client::open(url, token, false).await {
            Ok(client) => return Some(client),
            Err(status) => lost(log, format!("reconnect refused: {status}")),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn lost(log: &Mutex<DeviceLog>, why: String) {
    log.lock().expect("device log").disconnects.push(why);
}

async fn send(
    ws: &mut common::Ws,
    msg: &ClientMessage,
) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    ws.send(Message::Text(protocol::to_json(msg).into())).await
}

/// `1..=4, 7, 9..=10`: seqs, compressed.
fn ranges(seqs: &[u64]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < seqs.len() {
        let start = seqs[i];
        let mut end = start;
        while i + 1 < seqs.len() && seqs[i + 1] == end + 1 {
            end += 1;
            i += 1;
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}..={end}")
        });
        i += 1;
    }
    out.join(", ")
}
