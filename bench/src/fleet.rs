//! Starts the system under test as separate processes: a `redis-server`, `gapless migrate`
//! (in-process, the same code), and `gapless-ingest` from the same build as this binary.
//! Everything is killed when the [`Fleet`] is dropped.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use gapless_shared::config::RedisConfig;
use gapless_shared::process::{RedisOptions, RedisProcess};
use gapless_shared::{schema, store};

/// A running system: Redis and one ingest.
pub struct Fleet {
    /// The Redis process.
    pub redis: RedisProcess,
    /// The ingest process.
    ingest: Child,
    /// `http://127.0.0.1:<port>` of the ingest.
    pub ingest_url: String,
    /// The API key the ingest accepts.
    pub api_key: String,
    /// Scratch directory, removed on drop.
    dir: PathBuf,
}

impl Fleet {
    /// Starts Redis with `appendfsync`, migrates, starts the ingest and waits until it is ready.
    pub async fn start(appendfsync: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("gapless-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let redis = RedisProcess::start(RedisOptions {
            port: free_port()?,
            dir: dir.join("redis"),
            appendfsync: appendfsync.to_owned(),
            extra: Vec::new(),
        })?;
        let mut conn = store::connect(&RedisConfig::new(&redis.url())?).await?;
        schema::migrate(&mut conn).await?;

        let port = free_port()?;
        let api_key = "bench-key".to_owned();
        let ingest = Command::new(sibling_binary("gapless-ingest")?)
            .env("GAPLESS_LISTEN", format!("127.0.0.1:{port}"))
            .env("GAPLESS_REDIS_URL", redis.url())
            .env("GAPLESS_API_KEYS", &api_key)
            .env("GAPLESS_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .context("cannot start gapless-ingest")?;
        let mut fleet = Self {
            redis,
            ingest,
            ingest_url: format!("http://127.0.0.1:{port}"),
            api_key,
            dir,
        };
        fleet.wait_ready().await?;
        Ok(fleet)
    }

    /// Pids of the processes, by role.
    pub fn pids(&self) -> Vec<(&'static str, u32)> {
        let mut pids = vec![("ingest", self.ingest.id())];
        pids.extend(self.redis.pid().map(|p| ("redis", p)));
        pids
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.ingest.try_wait()? {
                bail!("gapless-ingest exited during start-up: {status}");
            }
            let ready = client
                .get(format!("{}/readyz", self.ingest_url))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("gapless-ingest did not become ready within 20 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let _ = self.ingest.kill();
        let _ = self.ingest.wait();
        self.redis.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
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

/// A port that was free a moment ago.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
