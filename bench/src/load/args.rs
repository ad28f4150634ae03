//! The settings of a load run (`gapless-bench load --help`).

use clap::{Args, ValueEnum};

use crate::transports::TransportMix;

/// Connections one edge or load process holds at most by default (20,000 open files here).
pub(super) const PER_PROCESS: usize = 18_000;

/// The scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// Hold N connections; edge memory per idle connection.
    Idle,
    /// N connections and R notifications/s: latency percentiles, delivered vs sent.
    Steady,
    /// Kill every edge, restart them: time until every client resumed with exact gaps.
    Storm,
    /// Batch ingest throughput beside redis-benchmark's pipelined XADD.
    Ingest,
}

impl Scenario {
    pub(super) fn name(self) -> &'static str {
        match self {
            Scenario::Idle => "idle",
            Scenario::Steady => "steady",
            Scenario::Storm => "storm",
            Scenario::Ingest => "ingest",
        }
    }
}

/// Settings of a load run.
#[derive(Debug, Args)]
pub struct LoadArgs {
    /// What to measure.
    #[arg(long, value_enum, default_value_t = Scenario::Steady)]
    pub(super) scenario: Scenario,
    /// Connections (one device per user).
    #[arg(long, default_value_t = 10_000)]
    pub(super) connections: usize,
    /// Transport of the devices: every one over the WebSocket, SSE or long-polling, or
    /// `mixed` (connection i over ws, sse, poll by i % 3).
    #[arg(long, value_enum, default_value_t = TransportMix::Ws)]
    pub(super) transport: TransportMix,
    /// Edge processes [default: one per 18,000 connections].
    #[arg(long)]
    pub(super) edges: Option<usize>,
    /// Load-generator processes [default: one per 18,000 connections]; process k connects
    /// from 127.0.k+1.1, 127.0.k+1.2, … (10,000 connections per address).
    #[arg(long)]
    pub(super) procs: Option<usize>,
    /// Notifications per second over all producers (steady and storm).
    #[arg(long, default_value_t = 1_000)]
    pub(super) rate: u64,
    /// The producers send one batch every this many ms (the batch holds what the rate
    /// owes by then: 100 items at 10,000/s and 10 ms).
    #[arg(long, default_value_t = 10)]
    pub(super) batch_every_ms: u64,
    /// Seconds of the measured phase after the ramp (idle: hold; steady: load; storm: load
    /// before and after the kill).
    #[arg(long, default_value_t = 30)]
    pub(super) duration: u64,
    /// Connections opened per second during the ramp, over all load processes.
    #[arg(long, default_value_t = 5_000)]
    pub(super) ramp_rate: usize,
    /// Connection counts the ramp holds at [default: 1K, 2K, 5K, 10K, 20K, 50K, 100K… up
    /// to --connections].
    #[arg(long, value_delimiter = ',')]
    pub(super) ramp_steps: Option<Vec<usize>>,
    /// Seconds each ramp step is held (at least 1: producers address a step's users only
    /// after their devices settled).
    #[arg(long, default_value_t = 2)]
    pub(super) step_hold: u64,
    /// Seconds the producers run after the ramp before the measured phase starts (steady
    /// and storm). A user's first notification creates its log, which costs Redis several
    /// times an append to an existing one; at 100,000 users and 10,000/s a third of the
    /// users still have no log 10 s in. 30 s leaves about 5% (e^-3) of them: what follows is
    /// the steady state of existing users.
    #[arg(long, default_value_t = 0)]
    pub(super) warmup: u64,
    /// AOF fsync policy of the Redis the bench starts.
    #[arg(long, default_value = "everysec")]
    pub(super) appendfsync: String,
    /// Start a local Redis Cluster (three primaries, three replicas) instead of one node.
    #[arg(long)]
    pub(super) cluster: bool,
    /// Nice value of the redis-server the bench starts. Every process of the run shares two
    /// cores here; Redis is the one every notification waits on, and in production it has
    /// cores of its own. 0 leaves it level with the rest.
    #[arg(long, default_value_t = -10, allow_hyphen_values = true)]
    pub(super) redis_nice: i32,
    /// `auto-aof-rewrite-min-size` of the redis-server the bench starts. Redis's default
    /// (64mb, then at every 100% growth) rewrites the AOF every ~15 s at 100,000 users and
    /// 10,000 notifications/s: a fork of the whole dataset and a second process on the two
    /// shared cores. Production sizes this to its disk; "64mb" measures the default.
    #[arg(long, default_value = "4gb")]
    pub(super) aof_rewrite_min_size: String,
    /// Further redis-server settings of the Redis the bench starts, `name=value`,
    /// comma-separated (e.g. `stream-node-max-bytes=1024`).
    #[arg(long, value_delimiter = ',')]
    pub(super) redis_config: Vec<String>,
    /// Runtime worker threads of each edge the bench starts (TOKIO_WORKER_THREADS)
    /// [default: one per core].
    #[arg(long)]
    pub(super) edge_threads: Option<usize>,
    /// Runtime worker threads of each load process [default: one per core].
    #[arg(long)]
    pub(super) load_threads: Option<usize>,
    /// Edge heartbeat interval, ms, of the edges the bench starts.
    #[arg(long, default_value_t = 30_000)]
    pub(super) heartbeat_ms: u64,
    /// Write the results as JSON here.
    #[arg(long)]
    pub(super) json: Option<std::path::PathBuf>,
    /// Write a self-contained HTML report with charts here.
    #[arg(long)]
    pub(super) html: Option<std::path::PathBuf>,
    /// An existing deployment to load instead of starting one (not for `storm`, which kills
    /// and restarts the edges).
    #[command(flatten)]
    pub(super) target: crate::fleet::DeploymentArgs,
    /// Settings of `--scenario ingest`.
    #[command(flatten)]
    pub(super) ingest: crate::ingest::IngestArgs,
}
