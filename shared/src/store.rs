//! Redis connection setup, single node or Redis Cluster, and the timeout every Redis call
//! goes through.
//!
//! [`Store`] is the one connection type the services use: on a single node a multiplexed
//! [`ConnectionManager`] (it pipelines concurrent commands over one socket and reconnects in
//! the background), on a cluster a [`ClusterConnection`] (one multiplexed connection per
//! primary; it follows `MOVED` and `ASK` and retries `TRYAGAIN` and `CLUSTERDOWN`). Both run
//! any command or single-slot pipeline through [`ConnectionLike`], so callers do not know
//! which they hold. What only a cluster has (several primaries) is asked through
//! [`Store::primaries`] and [`Store::on_node`].
//!
//! Every call is bounded by the configured command timeout, so a dead Redis turns into a
//! prompt [`StoreError::Unavailable`] rather than a hung request.
//!
//! A cluster connection can wedge after primaries die and come back (seen in the cluster
//! drill with redis-rs 1.8: it held no socket to two of three primaries and every call to
//! their slots timed out, minutes after the cluster was healthy again). [`ClusterStore`]
//! therefore watches its calls, and after repeated timeouts replaces the connection with a
//! fresh one from the seeds; see [`ClusterStore::timed_out`].

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, Pipeline, RedisFuture, Value};

use crate::config::RedisConfig;

/// A connection to Redis: one node, or a cluster. Cheap to clone (clones share sockets).
#[derive(Clone)]
pub enum Store {
    /// One Redis node.
    Single(ConnectionManager),
    /// A Redis Cluster.
    Cluster(ClusterStore),
}

impl ConnectionLike for Store {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Store::Single(c) => c.req_packed_command(cmd),
            Store::Cluster(c) => {
                let c = c.clone();
                Box::pin(async move {
                    c.watched(|mut conn| async move { conn.req_packed_command(cmd).await })
                        .await
                })
            }
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Store::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Store::Cluster(c) => {
                let c = c.clone();
                Box::pin(async move {
                    c.watched(|mut conn| async move {
                        conn.req_packed_commands(pipeline, offset, count).await
                    })
                    .await
                })
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Store::Single(c) => c.get_db(),
            Store::Cluster(c) => c.current().get_db(),
        }
    }
}

/// What one atomic call or one pipeline may span: a hash slot on a cluster, everything on a
/// single node. Callers group per-user work by the shard of each user, and so never ask
/// which kind of store they hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Shard(Option<redis::cluster_routing::Slot>);

impl Shard {
    /// The shard of `key` on a cluster (its hash slot), for tests of per-shard planning.
    pub fn of_key(key: &str) -> Self {
        Shard(Some(redis::cluster_routing::Slot::for_key(key)))
    }
}

/// A command's reply, with the reply of the command run after its pipeline (if any).
pub type ReplyThen = (redis::RedisResult<Value>, Option<redis::RedisResult<Value>>);

/// A primary of the store: its address (`host:port`), as Redis names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Primary {
    /// `host:port`.
    pub addr: String,
}

impl Store {
    /// The shard of `user`'s keys (they share the `{user}` hash tag, DESIGN.md §3).
    pub fn shard_of(&self, user: &crate::ids::UserId) -> Shard {
        self.shard_of_key(&crate::keys::meta(user))
    }

    /// The command that publishes a wakeup: `SPUBLISH` on a cluster (sharded pub/sub: the
    /// message travels to the shard owning the channel's slot, not to every node), `PUBLISH`
    /// on one node.
    pub fn publish_command(&self) -> &'static str {
        match self {
            Store::Single(_) => "PUBLISH",
            Store::Cluster(_) => "SPUBLISH",
        }
    }

    /// Whether this is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Store::Cluster(_))
    }

    /// The shard of `key`.
    pub fn shard_of_key(&self, key: &str) -> Shard {
        match self {
            Store::Single(_) => Shard(None),
            Store::Cluster(_) => Shard::of_key(key),
        }
    }

    /// Runs commands that each touch the keys of one shard: one pipeline per shard, the
    /// pipelines concurrently, each bounded by `timeout`. Answers one reply per command, in
    /// the order given; a command Redis refused is an `Err` in its place. `Err` as a whole
    /// when a pipeline could not run: its commands may or may not have been applied.
    pub async fn run_per_shard(
        &self,
        cmds: Vec<(Shard, Cmd)>,
        timeout: Duration,
    ) -> Result<Vec<redis::RedisResult<Value>>, StoreError> {
        Ok(self
            .run_per_shard_then(cmds, None, timeout)
            .await?
            .into_iter()
            .map(|(reply, _)| reply)
            .collect())
    }

    /// [`run_per_shard`](Self::run_per_shard), with `then` appended to every shard's
    /// pipeline (it runs on the same connection right after that shard's commands, e.g.
    /// `WAIT`); each reply comes with the reply of `then` in its pipeline.
    pub async fn run_per_shard_then(
        &self,
        cmds: Vec<(Shard, Cmd)>,
        then: Option<&Cmd>,
        timeout: Duration,
    ) -> Result<Vec<ReplyThen>, StoreError> {
        let mut by_shard: Vec<(Shard, Vec<usize>, Pipeline)> = Vec::new();
        for (i, (shard, cmd)) in cmds.into_iter().enumerate() {
            let at = match by_shard.iter().position(|(s, _, _)| *s == shard) {
                Some(at) => at,
                None => {
                    let mut pipe = redis::pipe();
                    pipe.ignore_errors();
                    by_shard.push((shard, Vec::new(), pipe));
                    by_shard.len() - 1
                }
            };
            by_shard[at].1.push(i);
            by_shard[at].2.add_command(cmd);
        }
        if let Some(then) = then {
            for (_, _, pipe) in &mut by_shard {
                pipe.add_command(then.clone());
            }
        }
        let trailer = usize::from(then.is_some());
        let total = by_shard.iter().map(|(_, idx, _)| idx.len()).sum();
        let answers = futures_util::future::join_all(by_shard.iter().map(|(_, _, pipe)| {
            let mut conn = self.clone();
            async move {
                with_timeout(
                    timeout,
                    pipe.query_async::<Vec<redis::RedisResult<Value>>>(&mut conn),
                )
                .await
            }
        }))
        .await;
        let mut replies: Vec<Option<ReplyThen>> = (0..total).map(|_| None).collect();
        for ((_, indexes, _), answer) in by_shard.iter().zip(answers) {
            let mut answer = answer?;
            if answer.len() != indexes.len() + trailer {
                return Err(StoreError::reply(format!(
                    "a pipeline answered {} replies for {} commands",
                    answer.len(),
                    indexes.len() + trailer
                )));
            }
            let then_reply = if trailer == 1 { answer.pop() } else { None };
            for (&i, reply) in indexes.iter().zip(answer) {
                replies[i] = Some((reply, then_reply.clone()));
            }
        }
        Ok(replies
            .into_iter()
            .map(|r| r.expect("every command is in exactly one pipeline"))
            .collect())
    }

    /// The primaries now: the node itself, or every primary of the cluster (from `CLUSTER
    /// SLOTS` of one of them).
    pub async fn primaries(&mut self, timeout: Duration) -> Result<Vec<Primary>, StoreError> {
        if let Store::Single(_) = self {
            return Ok(vec![Primary {
                addr: String::new(),
            }]);
        }
        let slots: Vec<Value> = with_timeout(
            timeout,
            redis::cmd("CLUSTER")
                .arg("SLOTS")
                .query_async::<Vec<Value>>(self),
        )
        .await?;
        let mut primaries: Vec<Primary> = Vec::new();
        for range in &slots {
            let addr = primary_of_range(range)
                .ok_or_else(|| StoreError::reply(format!("CLUSTER SLOTS answered {range:?}")))?;
            if !primaries.iter().any(|p| p.addr == addr) {
                primaries.push(Primary { addr });
            }
        }
        primaries.sort_by(|a, b| a.addr.cmp(&b.addr));
        Ok(primaries)
    }

    /// Runs `cmd` on one primary (the node itself on a single node).
    pub async fn on_node<T: redis::FromRedisValue>(
        &mut self,
        primary: &Primary,
        cmd: &Cmd,
        timeout: Duration,
    ) -> Result<T, StoreError> {
        match self {
            Store::Single(conn) => with_timeout(timeout, cmd.query_async::<T>(conn)).await,
            Store::Cluster(conn) => {
                let (host, port) = primary
                    .addr
                    .rsplit_once(':')
                    .and_then(|(h, p)| Some((h.to_owned(), p.parse::<u16>().ok()?)))
                    .ok_or_else(|| {
                        StoreError::reply(format!("bad node address {}", primary.addr))
                    })?;
                let routing =
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port });
                let value = with_timeout(
                    timeout,
                    conn.watched(
                        |mut c| async move { c.route_command(cmd.clone(), routing).await },
                    ),
                )
                .await?;
                redis::from_redis_value(value).map_err(|e| StoreError::reply(e.to_string()))
            }
        }
    }
}

/// `host:port` of the primary of one `CLUSTER SLOTS` range.
fn primary_of_range(range: &Value) -> Option<String> {
    let Value::Array(fields) = range else {
        return None;
    };
    let Value::Array(primary) = fields.get(2)? else {
        return None;
    };
    let host: String = redis::from_redis_value_ref(primary.first()?).ok()?;
    let port: i64 = redis::from_redis_value_ref(primary.get(1)?).ok()?;
    Some(format!("{host}:{port}"))
}

/// A Redis operation that failed: whether retrying may help, and why, with the cause kept.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// Redis could not be reached or did not answer in time; retrying later may work.
    #[error("redis unavailable: {0}")]
    Unavailable(#[source] Cause),
    /// Redis answered with an error, or with something we cannot read.
    #[error("redis error: {0}")]
    Redis(#[source] Cause),
    /// The write is on its primary, but `WAIT` saw fewer replicas hold it than asked for
    /// within its timeout: it is not yet safe from a failover of that primary.
    #[error("written, but on {acked} of the {wanted} replicas asked for")]
    NotReplicated {
        /// Replicas asked for (`--min-replicas-ack`).
        wanted: u32,
        /// Replicas `WAIT` counted.
        acked: u32,
    },
}

/// What went wrong under a [`StoreError`].
#[derive(Debug, Clone, thiserror::Error)]
pub enum Cause {
    /// redis-rs's own error, whole (its kind, code and detail).
    #[error(transparent)]
    Client(#[from] redis::RedisError),
    /// No answer within the bound.
    #[error("no answer within {ms} ms")]
    Timeout {
        /// The bound, ms.
        ms: u64,
    },
    /// An answer gapless cannot use: an error Redis reported inside a Function's reply, or
    /// a reply of another shape than the command's.
    #[error("{0}")]
    Reply(String),
    /// The task of this process that talks to Redis for the caller has stopped (the
    /// process is shutting down).
    #[error("{0} stopped")]
    Stopped(&'static str),
}

impl StoreError {
    /// Classifies a redis-rs error.
    pub fn from_redis(e: redis::RedisError) -> Self {
        if Self::is_outage(&e) {
            StoreError::Unavailable(Cause::Client(e))
        } else {
            StoreError::Redis(Cause::Client(e))
        }
    }

    /// Redis answered something other than what the command answers.
    pub fn reply(what: impl Into<String>) -> Self {
        StoreError::Redis(Cause::Reply(what.into()))
    }

    /// No answer within `timeout`.
    pub fn timeout(timeout: Duration) -> Self {
        StoreError::Unavailable(Cause::Timeout {
            ms: timeout.as_millis() as u64,
        })
    }

    /// The task `what` that talks to Redis for the caller has stopped.
    pub fn stopped(what: &'static str) -> Self {
        StoreError::Unavailable(Cause::Stopped(what))
    }

    /// True when `e` says Redis cannot be reached or cannot take writes now (retrying later
    /// may succeed), rather than refusing this request.
    pub fn is_outage(e: &redis::RedisError) -> bool {
        e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_unrecoverable_error()
        || matches!(
            e.kind(),
            redis::ErrorKind::Server(
                redis::ServerErrorKind::BusyLoading
                    | redis::ServerErrorKind::TryAgain
                    | redis::ServerErrorKind::MasterDown
                    | redis::ServerErrorKind::ClusterDown
                    | redis::ServerErrorKind::ReadOnly
                    // A redirect still left after the client's retries: the slot's
                    // owner is moving or failing over (the survivors name the dead
                    // primary until its replica is promoted). Not written; retry later.
                    | redis::ServerErrorKind::Moved
                    | redis::ServerErrorKind::Ask
            )
        )
        // Out of memory: writes fail until memory is freed; retrying later can work.
        || e.code() == Some("OOM")
    }

    /// True when retrying later may succeed.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// Opens the process's Redis connection: to the node, or to the cluster its seeds belong to.
/// Fails if Redis cannot be reached now.
pub async fn connect(config: &RedisConfig) -> Result<Store, StoreError> {
    if config.cluster {
        return connect_cluster(config).await.map(Store::Cluster);
    }
    connect_single(config).await.map(Store::Single)
}

/// A cluster connection from the seeds. Redirects (`MOVED`, `ASK`) are followed, and
/// `TRYAGAIN`/`CLUSTERDOWN` retried with short waits, within the command timeout the
/// caller bounds every call with.
async fn connect_cluster(config: &RedisConfig) -> Result<ClusterStore, StoreError> {
    let client = ClusterClientBuilder::new(config.urls.iter().map(String::as_str))
        .connection_timeout(config.connect_timeout)
        .response_timeout(config.command_timeout)
        .retries(8)
        .min_retry_wait(10)
        .max_retry_wait(250)
        .build()
        .map_err(StoreError::from_redis)?;
    let open_within = config.connect_timeout + config.command_timeout;
    let conn = with_timeout(open_within, client.get_async_connection()).await?;
    Ok(ClusterStore(Arc::new(ClusterInner {
        client,
        open_within,
        command_timeout: config.command_timeout,
        conn: Mutex::new(conn),
        health: Mutex::new(Health::default()),
    })))
}

/// Timed-out calls within [`TIMEOUT_WINDOW`] of each other that make a cluster connection
/// suspect: one or two are a failover in progress, more than that in a row while the
/// connection is replaced anyway cost nothing but a reconnect.
const TIMEOUTS_TO_REPLACE: u32 = 3;
/// A timeout older than this no longer counts towards [`TIMEOUTS_TO_REPLACE`].
const TIMEOUT_WINDOW: Duration = Duration::from_secs(10);
/// Least time between two replacements, so a cluster that is down (every call times out)
/// is reconnected to every few seconds rather than in a loop.
const REPLACE_EVERY: Duration = Duration::from_secs(5);

/// A Redis Cluster connection that replaces itself when it stops answering (module docs).
/// Cheap to clone: clones share the connection and its replacement.
#[derive(Clone)]
pub struct ClusterStore(Arc<ClusterInner>);

struct ClusterInner {
    /// Where replacements come from (the seeds and the connection settings).
    client: ClusterClient,
    /// Bound on opening a replacement.
    open_within: Duration,
    /// A call that took this long without an answer counts as timed out.
    command_timeout: Duration,
    /// The connection in use; calls clone it (clones share sockets).
    conn: Mutex<ClusterConnection>,
    health: Mutex<Health>,
}

#[derive(Default)]
struct Health {
    /// Timed-out calls in the current window.
    timeouts: u32,
    /// The last timed-out call.
    last_timeout: Option<Instant>,
    /// The last replacement started.
    last_replace: Option<Instant>,
    /// A replacement is being opened.
    replacing: bool,
}

impl ClusterStore {
    /// The connection in use.
    fn current(&self) -> ClusterConnection {
        self.0
            .conn
            .lock()
            .expect("connection lock is never poisoned")
            .clone()
    }

    /// Runs `call` on the connection in use and notes whether it timed out: Redis said so
    /// (a node's response timeout), or the caller gave up on it (dropped it) after the
    /// command timeout.
    async fn watched<'a, T, F, Fut>(&self, call: F) -> redis::RedisResult<T>
    where
        F: FnOnce(ClusterConnection) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>> + 'a,
    {
        let mut watch = Watch {
            store: self,
            started: Instant::now(),
            answered: false,
        };
        let result = call(self.current()).await;
        watch.answered = true;
        if let Err(e) = &result
            && e.is_timeout()
        {
            self.timed_out();
        }
        result
    }

    /// Counts a timed-out call; past [`TIMEOUTS_TO_REPLACE`] in a window, opens a fresh
    /// connection in the background and swaps it in once it is up (calls in flight finish
    /// on the old one, which closes when the last of them drops it). While the new one
    /// cannot be opened the old one stays, and the next timeouts try again.
    fn timed_out(&self) {
        let now = Instant::now();
        {
            let mut health = self.0.health.lock().expect("health lock is never poisoned");
            if health
                .last_timeout
                .is_none_or(|t| now.duration_since(t) > TIMEOUT_WINDOW)
            {
                health.timeouts = 0;
            }
            health.timeouts += 1;
            health.last_timeout = Some(now);
            let due = health
                .last_replace
                .is_none_or(|t| now.duration_since(t) >= REPLACE_EVERY);
            if health.timeouts < TIMEOUTS_TO_REPLACE || health.replacing || !due {
                return;
            }
            health.replacing = true;
            health.last_replace = Some(now);
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.0
                .health
                .lock()
                .expect("health lock is never poisoned")
                .replacing = false;
            return;
        };
        let store = self.clone();
        runtime.spawn(async move {
            let opened = with_timeout(store.0.open_within, store.0.client.get_async_connection()).await;
            let mut health = store.0.health.lock().expect("health lock is never poisoned");
            health.replacing = false;
            match opened {
                Ok(conn) => {
                    *store.0.conn.lock().expect("connection lock is never poisoned") = conn;
                    tracing::warn!(
                        timeouts = health.timeouts,
                        "the cluster connection stopped answering; replaced it with a new one"
                    );
                    health.timeouts = 0;
                    metrics::counter!("gapless_redis_reconnects_total").increment(1);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the cluster connection stopped answering and a new one cannot be opened yet");
                }
            }
        });
    }
}

/// Notes a call dropped unanswered after the command timeout (its caller's bound fired).
struct Watch<'a> {
    store: &'a ClusterStore,
    started: Instant,
    answered: bool,
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        if !self.answered && self.started.elapsed() >= self.store.0.command_timeout * 9 / 10 {
            self.store.timed_out();
        }
    }
}

async fn connect_single(config: &RedisConfig) -> Result<ConnectionManager, StoreError> {
    let client = redis::Client::open(config.url()).map_err(StoreError::from_redis)?;
    let manager_config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(config.connect_timeout))
        .set_response_timeout(Some(config.command_timeout))
        // Few, quick reconnect attempts per failure: a caller waiting on a reconnect is a
        // request waiting, and the next call starts a new attempt anyway.
        .set_number_of_retries(2)
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_millis(500));
    with_timeout(
        config.connect_timeout + config.command_timeout,
        ConnectionManager::new_with_config(client, manager_config),
    )
    .await
}

/// Runs one Redis call, bounded by `timeout`.
pub async fn with_timeout<T>(
    timeout: Duration,
    fut: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(result) => result.map_err(StoreError::from_redis),
        Err(_) => Err(StoreError::timeout(timeout)),
    }
}
