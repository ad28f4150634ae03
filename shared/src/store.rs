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

use std::future::Future;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
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
    Cluster(ClusterConnection),
}

impl ConnectionLike for Store {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Store::Single(c) => c.req_packed_command(cmd),
            Store::Cluster(c) => c.req_packed_command(cmd),
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
            Store::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Store::Single(c) => c.get_db(),
            Store::Cluster(c) => c.get_db(),
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
                return Err(StoreError::Redis(format!(
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
        let Store::Cluster(conn) = self else {
            return Ok(vec![Primary {
                addr: String::new(),
            }]);
        };
        let slots: Vec<Value> = with_timeout(
            timeout,
            redis::cmd("CLUSTER")
                .arg("SLOTS")
                .query_async::<Vec<Value>>(conn),
        )
        .await?;
        let mut primaries: Vec<Primary> = Vec::new();
        for range in &slots {
            let addr = primary_of_range(range)
                .ok_or_else(|| StoreError::Redis(format!("CLUSTER SLOTS answered {range:?}")))?;
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
                        StoreError::Redis(format!("bad node address {}", primary.addr))
                    })?;
                let routing =
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port });
                let value = with_timeout(timeout, conn.route_command(cmd.clone(), routing)).await?;
                redis::from_redis_value(value).map_err(|e| StoreError::Redis(e.to_string()))
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

/// A Redis operation that failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// Redis could not be reached or did not answer in time; retrying later may work.
    #[error("redis unavailable: {0}")]
    Unavailable(String),
    /// Redis answered with an error, or with something we cannot read.
    #[error("redis error: {0}")]
    Redis(String),
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

impl StoreError {
    /// Classifies a redis-rs error.
    pub fn from_redis(e: redis::RedisError) -> Self {
        if e.is_io_error()
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
        {
            StoreError::Unavailable(e.to_string())
        } else {
            StoreError::Redis(e.to_string())
        }
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
async fn connect_cluster(config: &RedisConfig) -> Result<ClusterConnection, StoreError> {
    let client = ClusterClientBuilder::new(config.urls.iter().map(String::as_str))
        .connection_timeout(config.connect_timeout)
        .response_timeout(config.command_timeout)
        .retries(8)
        .min_retry_wait(10)
        .max_retry_wait(250)
        .build()
        .map_err(StoreError::from_redis)?;
    with_timeout(
        config.connect_timeout + config.command_timeout,
        client.get_async_connection(),
    )
    .await
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
        Err(_) => Err(StoreError::Unavailable(format!(
            "no answer within {} ms",
            timeout.as_millis()
        ))),
    }
}
