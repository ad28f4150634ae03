//! Starting and stopping a local `redis-server` process, and a local Redis Cluster of them
//! ([`RedisCluster`]): used by `gapless dev`, the bench's fleet and the test harness.
//!
//! Readiness is polled with a deadline (a `PING` answered `+PONG`), never guessed with sleeps.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod cluster;
pub use cluster::{ClusterOptions, RedisCluster};

/// How long a starting Redis may take to answer `PING`.
const READY_DEADLINE: Duration = Duration::from_secs(20);

/// Why a Redis process could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The binary is not installed.
    #[error(
        "`redis-server` was not found on PATH: install it (Debian/Ubuntu: `apt-get install redis-server`)"
    )]
    NotInstalled,
    /// Spawning failed for another reason.
    #[error("cannot start redis-server: {0}")]
    Spawn(std::io::Error),
    /// The process exited before it was ready.
    #[error("redis-server exited during start-up ({status}); its log ends with:\n{log}")]
    Exited {
        /// Exit status.
        status: std::process::ExitStatus,
        /// Tail of its log file.
        log: String,
    },
    /// The process did not answer `PING` in time.
    #[error("redis-server on port {0} did not become ready in time")]
    NotReady(u16),
    /// A local cluster could not be created or did not reach the state asked for.
    #[error("local Redis Cluster: {0}")]
    Cluster(String),
    /// A node of a local cluster refused a command.
    #[error("local Redis Cluster: {0}")]
    Redis(#[from] redis::RedisError),
}

/// What a Redis process is started with.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// Port to listen on (127.0.0.1 only).
    pub port: u16,
    /// Working directory: AOF files and the log live here.
    pub dir: PathBuf,
    /// `appendfsync` policy (`always`, `everysec`, `no`).
    pub appendfsync: String,
    /// Further `--name value` settings.
    pub extra: Vec<(String, String)>,
}

/// A running `redis-server`, killed when dropped.
#[derive(Debug)]
pub struct RedisProcess {
    /// The process; `None` while killed.
    child: Option<Child>,
    /// What it was started with, to start it again.
    options: RedisOptions,
}

impl RedisProcess {
    /// Starts Redis with AOF on and waits until it answers.
    pub fn start(options: RedisOptions) -> Result<Self, ProcessError> {
        let mut process = Self {
            child: None,
            options,
        };
        process.restart()?;
        Ok(process)
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.options.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.options.port
    }

    /// Process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The working directory.
    pub fn dir(&self) -> &Path {
        &self.options.dir
    }

    /// Kills the process with SIGKILL (no chance to flush anything) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the process again (after [`kill`](Self::kill)) on the same port and directory,
    /// so it reloads its AOF; waits until it answers.
    pub fn restart(&mut self) -> Result<(), ProcessError> {
        self.kill();
        let o = &self.options;
        std::fs::create_dir_all(&o.dir).map_err(ProcessError::Spawn)?;
        let mut cmd = Command::new("redis-server");
        cmd.arg("--port")
            .arg(o.port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--dir")
            .arg(&o.dir)
            .arg("--logfile")
            .arg("redis.log")
            .arg("--appendonly")
            .arg("yes")
            .arg("--appendfsync")
            .arg(&o.appendfsync)
            .arg("--save")
            .arg("")
            .arg("--daemonize")
            .arg("no");
        for (name, value) in &o.extra {
            cmd.arg(format!("--{name}")).arg(value);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd.spawn().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ProcessError::NotInstalled,
            _ => ProcessError::Spawn(e),
        })?;
        self.child = Some(child);
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<(), ProcessError> {
        let deadline = Instant::now() + READY_DEADLINE;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(ProcessError::Exited {
                    status,
                    log: log_tail(&self.options.dir.join("redis.log")),
                });
            }
            if ping(self.options.port) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(ProcessError::NotReady(self.options.port));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// True when Redis on `port` answers `PING` with `PONG` (not `-LOADING`).
fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

/// A port of 127.0.0.1 that was free a moment ago (another process may take it before the
/// caller binds it: callers that start a server on it retry on a bind failure).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
