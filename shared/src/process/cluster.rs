//! A local Redis Cluster of `redis-server` processes: three primaries with a replica each,
//! created with `redis-cli --cluster create … --cluster-replicas 1`, for `gapless dev
//! --cluster`, the bench's fleet and the test harness; and the operations that fault tests
//! and the drill inflict on it (moving a slot, failing a primary over, killing one).
//!
//! Every wait polls what the nodes say with a deadline; nothing is guessed with sleeps.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::{ProcessError, RedisOptions, RedisProcess};

/// How long the cluster may take to agree after a change.
const CLUSTER_DEADLINE: Duration = Duration::from_secs(30);

/// What a local cluster is started with.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// `(port, cluster bus port)` of each node; six for three primaries with a replica each.
    pub ports: Vec<(u16, u16)>,
    /// Each node keeps its AOF, `nodes.conf` and log in `dir/node-<i>`; a cluster started
    /// again on the same directory and ports comes back as it was.
    pub dir: PathBuf,
    /// `appendfsync` policy of every node.
    pub appendfsync: String,
    /// `cluster-node-timeout`, ms: a primary silent this long is failed over.
    pub node_timeout_ms: u64,
}

/// A running local Redis Cluster; its nodes are killed when it is dropped.
#[derive(Debug)]
pub struct RedisCluster {
    /// The nodes, in creation order (the first half start as primaries).
    nodes: Vec<RedisProcess>,
    /// Nodes stopped by [`pause_primary`](Self::pause_primary): running, but not answering.
    paused: std::collections::BTreeSet<usize>,
}

impl RedisCluster {
    /// Starts every node; creates the cluster when the nodes are new (else they rejoin from
    /// their `nodes.conf`); waits until every node reports `cluster_state:ok`, all agree on
    /// the slots and every replica is in sync.
    pub fn start(options: ClusterOptions) -> Result<Self, ProcessError> {
        if options.ports.len() < 6 || !options.ports.len().is_multiple_of(2) {
            return Err(ProcessError::Cluster(format!(
                "a cluster of primaries with a replica each needs an even number of nodes, at least 6 (got {})",
                options.ports.len()
            )));
        }
        let mut nodes = Vec::with_capacity(options.ports.len());
        for (i, &(port, bus)) in options.ports.iter().enumerate() {
            nodes.push(RedisProcess::start(RedisOptions {
                port,
                dir: options.dir.join(format!("node-{i}")),
                appendfsync: options.appendfsync.clone(),
                extra: [
                    ("cluster-enabled", "yes".to_owned()),
                    ("cluster-config-file", "nodes.conf".to_owned()),
                    ("cluster-node-timeout", options.node_timeout_ms.to_string()),
                    ("cluster-port", bus.to_string()),
                    // A replica may be promoted however long its primary was gone.
                    ("cluster-replica-validity-factor", "0".to_owned()),
                    ("cluster-require-full-coverage", "yes".to_owned()),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
            })?);
        }
        let cluster = Self {
            nodes,
            paused: Default::default(),
        };
        let fresh = (0..cluster.nodes.len()).all(|i| {
            cluster
                .on_node::<String>(i, redis::cmd("CLUSTER").arg("INFO"))
                .is_ok_and(|info| info.contains("cluster_known_nodes:1\r"))
        });
        if fresh {
            let mut create = std::process::Command::new("redis-cli");
            create.arg("--cluster").arg("create");
            for node in &cluster.nodes {
                create.arg(format!("127.0.0.1:{}", node.port()));
            }
            let out = create
                .args(["--cluster-replicas", "1", "--cluster-yes"])
                .output()
                .map_err(|e| {
                    ProcessError::Cluster(format!(
                        "cannot run redis-cli (Debian: apt-get install redis-tools): {e}"
                    ))
                })?;
            if !out.status.success() {
                return Err(ProcessError::Cluster(format!(
                    "redis-cli --cluster create failed: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                )));
            }
        }
        cluster.wait_stable()?;
        cluster.wait_until(
            |c| {
                (0..c.nodes.len())
                    .all(|i| c.role(i).as_deref() == Some("master") || c.replicating(i))
            },
            "every replica to be in sync with its primary",
        )?;
        Ok(cluster)
    }

    /// Seed URLs of every node, comma-separated (what `--redis` takes with `--cluster`).
    pub fn urls(&self) -> String {
        self.seeds().join(",")
    }

    /// Seed URLs of every node.
    pub fn seeds(&self) -> Vec<String> {
        self.nodes.iter().map(RedisProcess::url).collect()
    }

    /// How many nodes it has.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Never: a cluster has at least six nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The node at `index` (creation order).
    pub fn node(&self, index: usize) -> &RedisProcess {
        &self.nodes[index]
    }

    /// The node at `index`, to kill or restart it.
    pub fn node_mut(&mut self, index: usize) -> &mut RedisProcess {
        &mut self.nodes[index]
    }

    /// Process ids of the running nodes.
    pub fn pids(&self) -> Vec<u32> {
        self.nodes.iter().filter_map(RedisProcess::pid).collect()
    }

    /// Runs a command on one node (a plain connection with a 2 s timeout, no redirects).
    pub fn on_node<T: redis::FromRedisValue>(
        &self,
        index: usize,
        cmd: &redis::Cmd,
    ) -> redis::RedisResult<T> {
        let client = redis::Client::open(self.nodes[index].url())?;
        let mut conn = client.get_connection_with_timeout(Duration::from_secs(2))?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        cmd.query(&mut conn)
    }

    /// The node is a replica whose link to its primary is up (its first sync is done).
    pub fn replicating(&self, index: usize) -> bool {
        self.on_node::<String>(index, redis::cmd("INFO").arg("replication"))
            .is_ok_and(|info| info.contains("role:slave") && info.contains("master_link_status:up"))
    }

    /// Indexes of the nodes that are primaries now.
    pub fn primaries(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.role(i).as_deref() == Some("master"))
            .collect()
    }

    /// `master` or `slave`, as the node says; `None` when it does not answer.
    pub fn role(&self, index: usize) -> Option<String> {
        let info: String = self
            .on_node(index, redis::cmd("INFO").arg("replication"))
            .ok()?;
        info.lines()
            .find_map(|l| l.strip_prefix("role:"))
            .map(|r| r.trim().to_owned())
    }

    /// The hash slot of `key`.
    pub fn slot_of(&self, key: &str) -> Result<u16, ProcessError> {
        let live = self.live_node()?;
        Ok(self.on_node(live, redis::cmd("CLUSTER").arg("KEYSLOT").arg(key))?)
    }

    /// The hash slot of `user`'s keys (they share the `{user}` tag).
    pub fn slot_of_user(&self, user: &crate::ids::UserId) -> Result<u16, ProcessError> {
        self.slot_of(&crate::keys::meta(user))
    }

    /// A primary other than `node`, where a slot of `node` can move.
    pub fn other_primary(&self, node: usize) -> Option<usize> {
        self.primaries().into_iter().find(|&p| p != node)
    }

    /// The node serving `slot` now, as a live primary sees it.
    pub fn owner_of(&self, slot: u16) -> Result<usize, ProcessError> {
        let live = self
            .primaries()
            .into_iter()
            .next()
            .ok_or_else(|| ProcessError::Cluster("no primary answers".into()))?;
        let slots: Vec<redis::Value> = self.on_node(live, redis::cmd("CLUSTER").arg("SLOTS"))?;
        let id = owner_id_of(&slots, slot)
            .ok_or_else(|| ProcessError::Cluster(format!("slot {slot} has no owner")))?;
        self.index_of(&id).ok_or_else(|| {
            ProcessError::Cluster(format!("the owner of slot {slot} ({id}) is not ours"))
        })
    }

    /// Moves `slot` to the primary `to`, keys and all, the way `redis-cli --cluster reshard`
    /// does: `SETSLOT IMPORTING` on the target, `MIGRATING` on the source, `MIGRATE … KEYS`
    /// in batches, then `SETSLOT … NODE` on both and on every other primary. Clients see
    /// `ASK` during the move and `MOVED` after it.
    pub fn move_slot(&self, slot: u16, to: usize) -> Result<(), ProcessError> {
        let from = self.owner_of(slot)?;
        if from == to {
            return Ok(());
        }
        let (from_id, to_id) = (self.node_id(from)?, self.node_id(to)?);
        let setslot = |node: usize, args: &[&str]| -> Result<(), ProcessError> {
            let mut cmd = redis::cmd("CLUSTER");
            cmd.arg("SETSLOT").arg(slot);
            for a in args {
                cmd.arg(*a);
            }
            self.on_node::<()>(node, &cmd).map_err(|e| {
                ProcessError::Cluster(format!(
                    "CLUSTER SETSLOT {slot} {args:?} on node {node}: {e}"
                ))
            })
        };
        setslot(to, &["IMPORTING", &from_id])?;
        setslot(from, &["MIGRATING", &to_id])?;
        loop {
            let keys: Vec<String> = self.on_node(
                from,
                redis::cmd("CLUSTER")
                    .arg("GETKEYSINSLOT")
                    .arg(slot)
                    .arg(100),
            )?;
            if keys.is_empty() {
                break;
            }
            let mut migrate = redis::cmd("MIGRATE");
            migrate
                .arg("127.0.0.1")
                .arg(self.nodes[to].port())
                .arg("")
                .arg(0)
                .arg(5000)
                .arg("REPLACE")
                .arg("KEYS")
                .arg(&keys);
            self.on_node::<()>(from, &migrate)
                .map_err(|e| ProcessError::Cluster(format!("MIGRATE of slot {slot}: {e}")))?;
        }
        setslot(to, &["NODE", &to_id])?;
        setslot(from, &["NODE", &to_id])?;
        for other in self.primaries() {
            if other != to && other != from {
                setslot(other, &["NODE", &to_id])?;
            }
        }
        self.wait_until(
            |c| c.owner_of(slot).is_ok_and(|o| o == to),
            "every node to see the slot's new owner",
        )
    }

    /// A manual failover: the replica of `primary` takes over (`CLUSTER FAILOVER` on it);
    /// returns the replica's index once it is a primary and the cluster is stable.
    pub fn failover(&self, primary: usize) -> Result<usize, ProcessError> {
        let replica = self.wait_replica_of(primary)?;
        self.on_node::<()>(replica, redis::cmd("CLUSTER").arg("FAILOVER"))?;
        self.wait_until(
            |c| c.role(replica).as_deref() == Some("master"),
            "the replica to become primary",
        )?;
        self.wait_stable()?;
        Ok(replica)
    }

    /// SIGKILLs the primary `primary` and waits until its replica took over (after
    /// `cluster-node-timeout`); returns the new primary. Restart the old one with
    /// `node_mut(i).restart()`: it rejoins as a replica.
    pub fn kill_primary(&mut self, primary: usize) -> Result<usize, ProcessError> {
        let replica = self.wait_replica_of(primary)?;
        self.nodes[primary].kill();
        self.wait_promoted(replica)?;
        self.wait_stable()?;
        Ok(replica)
    }

    /// SIGSTOPs the primary `primary` (its sockets stay open, nothing answers: a hung or
    /// partitioned node, not a dead one) and waits until its replica took over; returns the
    /// new primary. [`resume`](Self::resume) lets it run again, as a replica.
    pub fn pause_primary(&mut self, primary: usize) -> Result<usize, ProcessError> {
        let replica = self.wait_replica_of(primary)?;
        self.signal(primary, "STOP")?;
        self.paused.insert(primary);
        self.wait_promoted(replica)?;
        Ok(replica)
    }

    /// Waits until `replica` is a primary and the cluster, seen from it, is ok.
    fn wait_promoted(&self, replica: usize) -> Result<(), ProcessError> {
        self.wait_until(
            |c| c.role(replica).as_deref() == Some("master"),
            "the replica to be promoted",
        )?;
        self.wait_until(
            |c| c.cluster_ok(replica),
            "the cluster to be ok after the promotion",
        )
    }

    /// SIGCONTs a node [`pause_primary`](Self::pause_primary) stopped and waits until the
    /// cluster is stable again.
    pub fn resume(&mut self, index: usize) -> Result<(), ProcessError> {
        self.signal(index, "CONT")?;
        self.paused.remove(&index);
        self.wait_stable()
    }

    fn signal(&self, index: usize, signal: &str) -> Result<(), ProcessError> {
        let pid = self.nodes[index]
            .pid()
            .ok_or_else(|| ProcessError::Cluster(format!("node {index} is not running")))?;
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .map_err(ProcessError::Spawn)?;
        if !status.success() {
            return Err(ProcessError::Cluster(format!(
                "kill -{signal} {pid} failed: {status}"
            )));
        }
        Ok(())
    }

    /// The replica of `primary`, waiting until the primary knows one (right after a
    /// failover the old primary takes a moment to be listed as the new one's replica).
    pub fn wait_replica_of(&self, primary: usize) -> Result<usize, ProcessError> {
        self.wait_until(
            |c| c.replica_of(primary).is_some(),
            "the primary to list a replica",
        )?;
        self.replica_of(primary)
            .ok_or_else(|| ProcessError::Cluster(format!("node {primary} lost its replica")))
    }

    /// The replica of `primary` (by `CLUSTER REPLICAS`).
    pub fn replica_of(&self, primary: usize) -> Option<usize> {
        let id = self.node_id(primary).ok()?;
        let lines: Vec<String> = self
            .on_node(primary, redis::cmd("CLUSTER").arg("REPLICAS").arg(&id))
            .ok()?;
        lines
            .iter()
            .filter(|l| !l.contains("fail"))
            .find_map(|l| l.split_whitespace().next().and_then(|id| self.index_of(id)))
    }

    /// The node id of the node at `index`.
    pub fn node_id(&self, index: usize) -> Result<String, ProcessError> {
        Ok(self.on_node(index, redis::cmd("CLUSTER").arg("MYID"))?)
    }

    /// Waits until every live node says `cluster_state:ok` and all agree on slot owners.
    pub fn wait_stable(&self) -> Result<(), ProcessError> {
        self.wait_until(
            |c| {
                let live: Vec<usize> = (0..c.nodes.len()).filter(|&i| c.answers(i)).collect();
                live.iter().all(|&i| c.cluster_ok(i)) && {
                    let views: Vec<Option<Vec<redis::Value>>> = live
                        .iter()
                        .map(|&i| c.on_node(i, redis::cmd("CLUSTER").arg("SLOTS")).ok())
                        .collect();
                    views.iter().all(Option::is_some)
                        && (0..=16383u16).step_by(997).all(|slot| {
                            let owners: Vec<Option<String>> = views
                                .iter()
                                .map(|v| v.as_ref().and_then(|v| owner_id_of(v, slot)))
                                .collect();
                            owners.iter().all(|o| o.is_some() && *o == owners[0])
                        })
                }
            },
            "the cluster to be stable",
        )
    }

    /// The node runs and is not paused.
    fn answers(&self, index: usize) -> bool {
        self.nodes[index].pid().is_some() && !self.paused.contains(&index)
    }

    fn cluster_ok(&self, index: usize) -> bool {
        self.on_node::<String>(index, redis::cmd("CLUSTER").arg("INFO"))
            .is_ok_and(|info| info.contains("cluster_state:ok"))
    }

    fn live_node(&self) -> Result<usize, ProcessError> {
        (0..self.nodes.len())
            .find(|&i| self.answers(i))
            .ok_or_else(|| ProcessError::Cluster("no node is running".into()))
    }

    fn index_of(&self, id: &str) -> Option<usize> {
        (0..self.nodes.len()).find(|&i| {
            self.answers(i)
                && self
                    .on_node::<String>(i, redis::cmd("CLUSTER").arg("MYID"))
                    .is_ok_and(|mine| mine == id)
        })
    }

    fn wait_until(&self, check: impl Fn(&Self) -> bool, what: &str) -> Result<(), ProcessError> {
        let deadline = Instant::now() + CLUSTER_DEADLINE;
        while !check(self) {
            if Instant::now() > deadline {
                return Err(ProcessError::Cluster(format!(
                    "timed out waiting for {what}"
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

/// The node id owning `slot` in a `CLUSTER SLOTS` answer.
fn owner_id_of(slots: &[redis::Value], slot: u16) -> Option<String> {
    slots.iter().find_map(|range| {
        let redis::Value::Array(fields) = range else {
            return None;
        };
        let start: i64 = redis::from_redis_value_ref(fields.first()?).ok()?;
        let end: i64 = redis::from_redis_value_ref(fields.get(1)?).ok()?;
        if !(start..=end).contains(&i64::from(slot)) {
            return None;
        }
        let redis::Value::Array(primary) = fields.get(2)? else {
            return None;
        };
        redis::from_redis_value_ref(primary.get(2)?).ok()
    })
}
