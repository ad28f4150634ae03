//! Starts the system under test as separate processes: a `redis-server` or a local Redis
//! Cluster (three primaries, three replicas), the migrations (in-process, the same code as
//! `gapless migrate`), one `gapless-ingest` and any number of `gapless-edge`s from the same
//! build as this binary. Everything is killed on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use gapless_shared::config::RedisConfig;
use gapless_shared::process::{
    ClusterOptions, RedisCluster, RedisOptions, RedisProcess, free_port,
};
use gapless_shared::{schema, store};

/// An existing deployment to aim at instead of starting a fleet (`drill` and `load`).
#[derive(Debug, Clone, clap::Args)]
pub struct DeploymentArgs {
    /// Target an existing deployment instead of starting one: its ingest URL. Needs
    /// --api-key, --edge-urls, --jwt-secret and --redis; what needs process control (killing
    /// and restarting processes, their memory) is then skipped or refused.
    #[arg(long, requires_all = ["api_key", "edge_urls", "jwt_secret", "redis"])]
    pub ingest_url: Option<String>,
    /// API key of the targeted ingest.
    #[arg(long)]
    pub api_key: Option<String>,
    /// `ws://host:port/v1/ws` of each targeted edge, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub edge_urls: Option<Vec<String>>,
    /// HS256 secret of the targeted edges' tokens.
    #[arg(long)]
    pub jwt_secret: Option<String>,
    /// Redis URL of the targeted deployment (CLIENT KILL, stored acks, round-trip samples).
    #[arg(long)]
    pub redis: Option<String>,
}

/// The HS256 secret the fleet's edges accept.
pub const JWT_SECRET: &str = "bench-secret-of-thirty-two-bytes";

/// One edge process.
pub struct EdgeProcess {
    /// The process; `None` while it is down.
    pub child: Option<Child>,
    /// Its id in the registry.
    pub id: String,
    /// Its port (kept across restarts).
    pub port: u16,
    /// `ws://127.0.0.1:<port>/v1/ws`.
    pub ws_url: String,
    /// `http://127.0.0.1:<port>`.
    pub http_url: String,
}

/// The fleet's Redis: one node or a local cluster.
pub enum FleetRedis {
    /// One `redis-server`.
    Single(RedisProcess),
    /// Three primaries with a replica each.
    Cluster(RedisCluster),
}

/// `cluster-node-timeout` of the fleet's cluster, ms: a killed primary is failed over after
/// about this long.
pub const CLUSTER_NODE_TIMEOUT_MS: u64 = 1000;

impl FleetRedis {
    /// What `--redis` takes: the URL, or the cluster's seed URLs comma-separated.
    pub fn url(&self) -> String {
        match self {
            FleetRedis::Single(r) => r.url(),
            FleetRedis::Cluster(c) => c.urls(),
        }
    }

    /// A cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self, FleetRedis::Cluster(_))
    }

    /// The services' Redis settings for it.
    pub fn config(&self) -> anyhow::Result<RedisConfig> {
        Ok(RedisConfig::from_args(&self.url(), self.is_cluster())?)
    }

    /// Process ids of the running Redis processes.
    pub fn pids(&self) -> Vec<u32> {
        match self {
            FleetRedis::Single(r) => r.pid().into_iter().collect(),
            FleetRedis::Cluster(c) => c.pids(),
        }
    }

    fn kill(&mut self) {
        match self {
            FleetRedis::Single(r) => r.kill(),
            FleetRedis::Cluster(c) => (0..c.len()).for_each(|i| c.node_mut(i).kill()),
        }
    }
}

/// What a fleet is started with.
#[derive(Debug, Clone, Default)]
pub struct FleetOptions {
    /// `appendfsync` of every Redis process (`always`, `everysec`, `no`).
    pub appendfsync: String,
    /// How many edges.
    pub edges: usize,
    /// A local Redis Cluster instead of one node.
    pub cluster: bool,
    /// Extra `GAPLESS_*` settings of every edge.
    pub edge_env: Vec<(String, String)>,
    /// Extra `GAPLESS_*` settings of the ingest.
    pub ingest_env: Vec<(String, String)>,
    /// Extra `redis-server` settings (`name`, `value`); one node only.
    pub redis_extra: Vec<(String, String)>,
}

/// A running system: Redis, one ingest, edges.
pub struct Fleet {
    /// Redis: one node or a cluster.
    pub redis: FleetRedis,
    /// The ingest process.
    ingest: Child,
    /// `http://127.0.0.1:<port>` of the ingest.
    pub ingest_url: String,
    /// The API key the ingest accepts.
    pub api_key: String,
    /// The edges.
    pub edges: Vec<EdgeProcess>,
    /// Extra environment of every edge.
    edge_env: Vec<(String, String)>,
    /// Scratch directory, removed on drop unless [`keep`](Self::keep) was called.
    dir: PathBuf,
    /// Keep `dir` (the logs, the Redis data) when dropped.
    keep: bool,
}

impl Fleet {
    /// Starts Redis with `appendfsync`, migrates, starts the ingest and `edges` edges (with
    /// extra `GAPLESS_*` settings `edge_env`), and waits until all are ready.
    pub async fn start_with(
        appendfsync: &str,
        edges: usize,
        edge_env: Vec<(String, String)>,
    ) -> anyhow::Result<Self> {
        Self::start_full(FleetOptions {
            appendfsync: appendfsync.to_owned(),
            edges,
            edge_env,
            ..FleetOptions::default()
        })
        .await
    }

    /// Starts a fleet as `options` say.
    pub async fn start_full(options: FleetOptions) -> anyhow::Result<Self> {
        let FleetOptions {
            appendfsync,
            edges,
            cluster,
            edge_env,
            ingest_env,
            redis_extra,
        } = options;
        let dir = std::env::temp_dir().join(format!("gapless-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let redis = if cluster {
            let ports = (0..6)
                .map(|_| Ok((free_port()?, free_port()?)))
                .collect::<anyhow::Result<_>>()?;
            let dir = dir.join("cluster");
            FleetRedis::Cluster(
                tokio::task::spawn_blocking(move || {
                    RedisCluster::start(ClusterOptions {
                        ports,
                        dir,
                        appendfsync,
                        node_timeout_ms: CLUSTER_NODE_TIMEOUT_MS,
                    })
                })
                .await??,
            )
        } else {
            FleetRedis::Single(RedisProcess::start(RedisOptions {
                port: free_port()?,
                dir: dir.join("redis"),
                appendfsync,
                extra: redis_extra,
            })?)
        };
        let redis_config = redis.config()?;
        let mut conn = store::connect(&redis_config).await?;
        schema::migrate(&mut conn).await?;

        let port = free_port()?;
        let api_key = "bench-key".to_owned();
        let ingest = Command::new(sibling_binary("gapless-ingest")?)
            .env("GAPLESS_LISTEN", format!("127.0.0.1:{port}"))
            .env("GAPLESS_REDIS_URL", redis.url())
            .env("GAPLESS_REDIS_CLUSTER", redis.is_cluster().to_string())
            .env("GAPLESS_API_KEYS", &api_key)
            .env("GAPLESS_LOG", "warn")
            .envs(ingest_env)
            .stdin(Stdio::null())
            .stderr(log_file(&dir, "ingest")?)
            .spawn()
            .context("cannot start gapless-ingest")?;
        let mut fleet = Self {
            redis,
            ingest,
            ingest_url: format!("http://127.0.0.1:{port}"),
            api_key,
            edges: Vec::new(),
            edge_env,
            dir,
            keep: false,
        };
        for i in 0..edges {
            let port = free_port()?;
            fleet.edges.push(EdgeProcess {
                child: None,
                id: format!("bench-edge-{i}"),
                port,
                ws_url: format!("ws://127.0.0.1:{port}/v1/ws"),
                http_url: format!("http://127.0.0.1:{port}"),
            });
            fleet.spawn_edge(i)?;
        }
        let ready: Vec<String> = std::iter::once(fleet.ingest_url.clone())
            .chain(fleet.edges.iter().map(|e| e.http_url.clone()))
            .collect();
        for url in ready {
            fleet.wait_ready(&url).await?;
        }
        Ok(fleet)
    }

    /// Starts edge `i` (again), on its port and with its id.
    pub fn spawn_edge(&mut self, i: usize) -> anyhow::Result<()> {
        let edge = &mut self.edges[i];
        let child = Command::new(sibling_binary("gapless-edge")?)
            .env("GAPLESS_LISTEN", format!("127.0.0.1:{}", edge.port))
            .env("GAPLESS_REDIS_URL", self.redis.url())
            .env("GAPLESS_REDIS_CLUSTER", self.redis.is_cluster().to_string())
            .env("GAPLESS_JWT_SECRET", JWT_SECRET)
            .env("GAPLESS_EDGE_ID", &edge.id)
            .env("GAPLESS_LOG", "warn")
            // A load process opens up to 10,000 connections from one address at once: the
            // burst an edge behind a load balancer sees, so the per-address share of the
            // unauthenticated budget is the whole budget here.
            .env("GAPLESS_MAX_PENDING_PER_SOURCE", "1024")
            .envs(self.edge_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stderr(log_file(&self.dir, &edge.id)?)
            .spawn()
            .context("cannot start gapless-edge")?;
        edge.child = Some(child);
        Ok(())
    }

    /// Restarts edge `i` and waits until it is ready.
    pub async fn restart_edge(&mut self, i: usize) -> anyhow::Result<()> {
        self.spawn_edge(i)?;
        let url = self.edges[i].http_url.clone();
        self.wait_ready(&url).await
    }

    /// Kills edge `i` with SIGKILL.
    pub fn kill_edge(&mut self, i: usize) {
        if let Some(mut child) = self.edges[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops edge `i` with SIGTERM (it drains) and waits for it to exit; returns how long
    /// the exit took and whether it succeeded.
    pub async fn term_edge(&mut self, i: usize) -> anyhow::Result<(Duration, bool)> {
        let Some(mut child) = self.edges[i].child.take() else {
            bail!("edge {i} is not running");
        };
        let started = Instant::now();
        Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .context("cannot run kill")?;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok((started.elapsed(), status.success()));
            }
            if started.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                let _ = child.wait();
                return Ok((started.elapsed(), false));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sets the Redis processes' nice value (negative: ahead of the other processes).
    /// Returns whether the system allowed it (a negative value needs root or CAP_SYS_NICE).
    pub fn renice_redis(&self, nice: i32) -> bool {
        let pids = self.redis.pids();
        !pids.is_empty()
            && pids.iter().all(|pid| {
                Command::new("renice")
                    .args(["-n", &nice.to_string(), "-p", &pid.to_string()])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            })
    }

    /// Pids of the running processes, by role.
    pub fn pids(&self) -> Vec<(String, u32)> {
        let mut pids = vec![("ingest".to_owned(), self.ingest.id())];
        let redis = self.redis.pids();
        if let [pid] = redis[..] {
            pids.push(("redis".to_owned(), pid));
        } else {
            pids.extend(
                redis
                    .iter()
                    .enumerate()
                    .map(|(i, &p)| (format!("redis-{i}"), p)),
            );
        }
        for (i, edge) in self.edges.iter().enumerate() {
            if let Some(child) = &edge.child {
                pids.push((format!("edge-{i}"), child.id()));
            }
        }
        pids
    }

    /// Polls `<base>/readyz` until it answers 200.
    pub async fn wait_ready(&mut self, base: &str) -> anyhow::Result<()> {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.ingest.try_wait()? {
                bail!("gapless-ingest exited during start-up: {status}");
            }
            for edge in &mut self.edges {
                if let Some(child) = edge.child.as_mut()
                    && let Some(status) = child.try_wait()?
                {
                    bail!("gapless-edge exited during start-up: {status}");
                }
            }
            let ready = client
                .get(format!("{base}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{base} did not become ready within 20 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for edge in &mut self.edges {
            if let Some(mut child) = edge.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = self.ingest.kill();
        let _ = self.ingest.wait();
        self.redis.kill();
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A binary built beside this one (same profile), e.g. `target/release/gapless-ingest`.
fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("the executable has a directory")?;
    // Test binaries live one level down, in deps/.
    for candidate in [dir.join(name), dir.join("..").join(name)] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "{name} not found beside {}: build the workspace first (cargo build --release --workspace)",
        exe.display()
    )
}

impl Fleet {
    /// Keeps the scratch directory (every process's log, the Redis data) past the drop, for
    /// a failed run to be looked into, and prints where it is with the last warnings and
    /// errors of each log.
    pub fn keep(&mut self) {
        self.keep = true;
        eprintln!(
            "the fleet's logs and data are kept in {}",
            self.dir.display()
        );
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut logs: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        logs.sort();
        for log in logs {
            let Ok(text) = std::fs::read_to_string(&log) else {
                continue;
            };
            let notable: Vec<&str> = text
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                .collect();
            eprintln!(
                "--- {}: {} warnings and errors, the last 15:",
                log.display(),
                notable.len()
            );
            for line in &notable[notable.len().saturating_sub(15)..] {
                eprintln!("{line}");
            }
        }
    }
}

/// The log file of a process of the fleet (appended across restarts).
fn log_file(dir: &std::path::Path, name: &str) -> anyhow::Result<std::fs::File> {
    Ok(std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{name}.log")))?)
}
