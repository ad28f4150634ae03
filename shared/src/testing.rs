//! Test harness: real `redis-server` processes on free ports in temporary directories,
//! removed when dropped. Enabled by the `testing` feature, for tests only.

use std::ops::{Deref, DerefMut};
use std::path::PathBuf;

use crate::process::{ProcessError, RedisOptions, RedisProcess};

/// A throwaway Redis with AOF `appendfsync always`; its directory is removed on drop.
#[derive(Debug)]
pub struct TestRedis {
    /// The process (declared first so it is killed before the directory goes).
    process: RedisProcess,
    /// The temporary directory.
    dir: PathBuf,
}

impl TestRedis {
    /// Starts Redis on a free port. Panics with a clear message when it cannot, which is
    /// what a test wants.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts Redis with extra `--name value` settings.
    pub fn start_with(extra: &[(&str, &str)]) -> Self {
        let mut last = None;
        // A free port found by binding :0 can be taken by someone else before Redis binds
        // it; a few attempts make that race harmless.
        for _ in 0..5 {
            let dir = temp_dir();
            let options = RedisOptions {
                port: free_port(),
                dir: dir.clone(),
                appendfsync: "always".into(),
                extra: extra
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            };
            match RedisProcess::start(options) {
                Ok(process) => return Self { process, dir },
                Err(e @ ProcessError::NotInstalled) => panic!("{e}"),
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    last = Some(e);
                }
            }
        }
        panic!("cannot start a test redis-server: {last:?}");
    }

    /// A redis-rs client for it.
    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).expect("a harness URL is valid")
    }
}

impl Deref for TestRedis {
    type Target = RedisProcess;
    fn deref(&self) -> &RedisProcess {
        &self.process
    }
}

impl DerefMut for TestRedis {
    fn deref_mut(&mut self) -> &mut RedisProcess {
        &mut self.process
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        self.process.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0 works")
}

fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "gapless-test-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::create_dir_all(&dir).expect("the temp directory is writable");
    dir
}

/// A throwaway local Redis Cluster: three primaries and three replicas (`redis-cli --cluster
/// create … --cluster-replicas 1`), each a `redis-server` on free ports (its own bus port)
/// with AOF `appendfsync always` and a short `cluster-node-timeout`, so a failover takes
/// about a second. Its directories are removed on drop.
#[derive(Debug)]
pub struct TestCluster {
    /// The nodes, in creation order (the first three start as primaries).
    nodes: Vec<TestRedis>,
}

/// `cluster-node-timeout` of a test cluster, ms: a primary silent this long is failed over.
pub const CLUSTER_NODE_TIMEOUT_MS: u64 = 1000;

/// How long the cluster may take to agree after a change.
const CLUSTER_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

impl TestCluster {
    /// Starts six nodes, creates the cluster and waits until every node reports
    /// `cluster_state:ok` and agrees on the slots. Panics with the reason when it cannot.
    pub fn start() -> Self {
        let mut nodes = Vec::with_capacity(6);
        for _ in 0..6 {
            let bus = free_port().to_string();
            let timeout = CLUSTER_NODE_TIMEOUT_MS.to_string();
            nodes.push(TestRedis::start_with(&[
                ("cluster-enabled", "yes"),
                ("cluster-config-file", "nodes.conf"),
                ("cluster-node-timeout", &timeout),
                ("cluster-port", &bus),
                // A replica may be promoted however long its primary was gone.
                ("cluster-replica-validity-factor", "0"),
                ("cluster-require-full-coverage", "yes"),
            ]));
        }
        let mut create = std::process::Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for node in &nodes {
            create.arg(format!("127.0.0.1:{}", node.port()));
        }
        let out = create
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli runs (Debian: apt-get install redis-tools)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = Self { nodes };
        cluster.wait_stable();
        cluster.wait_until(
            |c| {
                (0..c.nodes.len())
                    .all(|i| c.role(i).as_deref() == Some("master") || c.replicating(i))
            },
            "every replica to be in sync with its primary",
        );
        cluster
    }

    /// The node is a replica whose link to its primary is up (its first sync is done).
    pub fn replicating(&self, index: usize) -> bool {
        self.on_node::<String>(index, redis::cmd("INFO").arg("replication"))
            .is_ok_and(|info| info.contains("role:slave") && info.contains("master_link_status:up"))
    }

    /// Seed URLs of every node, comma-separated (what `--redis` takes with `--cluster`).
    pub fn urls(&self) -> String {
        self.seeds().join(",")
    }

    /// Seed URLs of every node.
    pub fn seeds(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url()).collect()
    }

    /// The node at `index` (creation order).
    pub fn node(&self, index: usize) -> &TestRedis {
        &self.nodes[index]
    }

    /// The node at `index`, to kill or restart it.
    pub fn node_mut(&mut self, index: usize) -> &mut TestRedis {
        &mut self.nodes[index]
    }

    /// Runs a command on one node (a plain connection, no redirects).
    pub fn on_node<T: redis::FromRedisValue>(
        &self,
        index: usize,
        cmd: &redis::Cmd,
    ) -> redis::RedisResult<T> {
        let client = self.nodes[index].client();
        let mut conn = client.get_connection_with_timeout(std::time::Duration::from_secs(2))?;
        cmd.query(&mut conn)
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
    pub fn slot_of(&self, key: &str) -> u16 {
        let live = self.live_node();
        self.on_node(live, redis::cmd("CLUSTER").arg("KEYSLOT").arg(key))
            .expect("CLUSTER KEYSLOT answers")
    }

    /// The node serving `slot` now, as a live primary sees it.
    pub fn owner_of(&self, slot: u16) -> usize {
        let live = self.primaries().into_iter().next().expect("a live primary");
        let id: String = self
            .on_node(live, redis::cmd("CLUSTER").arg("SLOTS"))
            .ok()
            .and_then(|slots: Vec<redis::Value>| owner_id_of(&slots, slot))
            .expect("the slot has an owner");
        self.index_of(&id).expect("the owner is one of our nodes")
    }

    /// Moves `slot` to the primary `to`, keys and all, the way `redis-cli --cluster reshard`
    /// does: `SETSLOT IMPORTING` on the target, `MIGRATING` on the source, `MIGRATE … KEYS`
    /// in batches, then `SETSLOT … NODE` on both and on every other primary. Clients see
    /// `ASK` during the move and `MOVED` after it.
    pub fn move_slot(&self, slot: u16, to: usize) {
        let from = self.owner_of(slot);
        if from == to {
            return;
        }
        let (from_id, to_id) = (self.node_id(from), self.node_id(to));
        let setslot = |node: usize, args: &[&str]| {
            let mut cmd = redis::cmd("CLUSTER");
            cmd.arg("SETSLOT").arg(slot);
            for a in args {
                cmd.arg(*a);
            }
            self.on_node::<()>(node, &cmd)
                .unwrap_or_else(|e| panic!("CLUSTER SETSLOT {slot} {args:?} on {node}: {e}"));
        };
        setslot(to, &["IMPORTING", &from_id]);
        setslot(from, &["MIGRATING", &to_id]);
        loop {
            let keys: Vec<String> = self
                .on_node(
                    from,
                    redis::cmd("CLUSTER")
                        .arg("GETKEYSINSLOT")
                        .arg(slot)
                        .arg(100),
                )
                .expect("GETKEYSINSLOT answers");
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
                .unwrap_or_else(|e| panic!("MIGRATE of slot {slot}: {e}"));
        }
        setslot(to, &["NODE", &to_id]);
        setslot(from, &["NODE", &to_id]);
        for other in self.primaries() {
            if other != to && other != from {
                setslot(other, &["NODE", &to_id]);
            }
        }
        self.wait_until(
            |c| c.owner_of(slot) == to,
            "every node to see the slot's new owner",
        );
    }

    /// A manual failover: the replica of `primary` takes over (`CLUSTER FAILOVER` on it);
    /// returns the replica's index once it is a primary and the cluster is stable.
    pub fn failover(&self, primary: usize) -> usize {
        let replica = self.wait_replica_of(primary);
        self.on_node::<()>(replica, redis::cmd("CLUSTER").arg("FAILOVER"))
            .expect("CLUSTER FAILOVER answers");
        self.wait_until(
            |c| c.role(replica).as_deref() == Some("master"),
            "the replica to become primary",
        );
        self.wait_stable();
        replica
    }

    /// SIGKILLs the primary `primary` and waits until its replica took over (after
    /// `cluster-node-timeout`); returns the new primary. Restart the old one with
    /// `node_mut(i).restart()`: it rejoins as a replica.
    pub fn kill_primary(&mut self, primary: usize) -> usize {
        let replica = self.wait_replica_of(primary);
        self.nodes[primary].kill();
        self.wait_until(
            |c| c.role(replica).as_deref() == Some("master"),
            "the replica to be promoted",
        );
        self.wait_until(
            |c| c.cluster_ok(replica),
            "the cluster to be ok after the promotion",
        );
        self.wait_stable();
        replica
    }

    /// The replica of `primary`, waiting until the primary knows one (right after a
    /// failover the old primary takes a moment to be listed as the new one's replica).
    pub fn wait_replica_of(&self, primary: usize) -> usize {
        self.wait_until(
            |c| c.replica_of(primary).is_some(),
            "the primary to list a replica",
        );
        self.replica_of(primary).expect("listed a moment ago")
    }

    /// The replica of `primary` (by `CLUSTER REPLICAS`).
    pub fn replica_of(&self, primary: usize) -> Option<usize> {
        let id = self.node_id(primary);
        let lines: Vec<String> = self
            .on_node(primary, redis::cmd("CLUSTER").arg("REPLICAS").arg(&id))
            .ok()?;
        lines
            .iter()
            .filter(|l| !l.contains("fail"))
            .find_map(|l| l.split_whitespace().next().and_then(|id| self.index_of(id)))
    }

    /// The node id of the node at `index`.
    pub fn node_id(&self, index: usize) -> String {
        self.on_node(index, redis::cmd("CLUSTER").arg("MYID"))
            .expect("CLUSTER MYID answers")
    }

    /// Waits until every live node says `cluster_state:ok` and all agree on slot owners.
    pub fn wait_stable(&self) {
        self.wait_until(
            |c| {
                let live: Vec<usize> = (0..c.nodes.len())
                    .filter(|&i| c.nodes[i].pid().is_some())
                    .collect();
                live.iter().all(|&i| c.cluster_ok(i)) && {
                    let views: Vec<Option<Vec<redis::Value>>> = live
                        .iter()
                        .map(|&i| c.on_node(i, redis::cmd("CLUSTER").arg("SLOTS")).ok())
                        .collect();
                    views.iter().all(|v| v.is_some())
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
        );
    }

    fn cluster_ok(&self, index: usize) -> bool {
        self.on_node::<String>(index, redis::cmd("CLUSTER").arg("INFO"))
            .map(|info| info.contains("cluster_state:ok"))
            .unwrap_or(false)
    }

    fn live_node(&self) -> usize {
        (0..self.nodes.len())
            .find(|&i| self.nodes[i].pid().is_some())
            .expect("a live node")
    }

    fn index_of(&self, id: &str) -> Option<usize> {
        (0..self.nodes.len()).find(|&i| {
            self.nodes[i].pid().is_some()
                && self
                    .on_node::<String>(i, redis::cmd("CLUSTER").arg("MYID"))
                    .is_ok_and(|mine| mine == id)
        })
    }

    fn wait_until(&self, check: impl Fn(&Self) -> bool, what: &str) {
        let deadline = std::time::Instant::now() + CLUSTER_DEADLINE;
        while !check(self) {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
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

/// Which kind of Redis a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// One `redis-server`.
    Single,
    /// A local Redis Cluster: three primaries, three replicas.
    Cluster,
}

/// The Redis of a test system. It derefs to the single node, for the tests that kill and
/// restart it (they run on a single node only).
pub enum Backend {
    /// One node.
    Single(TestRedis),
    /// A cluster.
    Cluster(TestCluster),
}

impl Backend {
    /// Starts one of `kind`; a single node gets `settings` (`--name value`).
    pub fn start(kind: Kind, settings: &[(&str, &str)]) -> Self {
        match kind {
            Kind::Single => Backend::Single(TestRedis::start_with(settings)),
            Kind::Cluster => {
                assert!(settings.is_empty(), "cluster tests take no Redis settings");
                Backend::Cluster(TestCluster::start())
            }
        }
    }

    /// The services' Redis settings for it.
    pub fn config(&self) -> crate::config::RedisConfig {
        match self {
            Backend::Single(r) => crate::config::RedisConfig::new(&r.url()),
            Backend::Cluster(c) => crate::config::RedisConfig::from_args(&c.urls(), true),
        }
        .expect("harness URLs are valid")
    }
}

impl Deref for Backend {
    type Target = TestRedis;
    fn deref(&self) -> &TestRedis {
        match self {
            Backend::Single(r) => r,
            Backend::Cluster(_) => {
                panic!("this helper needs a single node; the test runs on a cluster")
            }
        }
    }
}

impl DerefMut for Backend {
    fn deref_mut(&mut self) -> &mut TestRedis {
        match self {
            Backend::Single(r) => r,
            Backend::Cluster(_) => {
                panic!("this helper needs a single node; the test runs on a cluster")
            }
        }
    }
}

/// Runs a test body once against a single node and once against a local cluster, as the
/// tests `<name>::single` and `<name>::cluster`; the body gets the [`testing::Kind`](crate::testing::Kind) to start with.
#[macro_export]
macro_rules! on_both {
    ($(#[$meta:meta])* async fn $name:ident($kind:ident: Kind) $body:block) => {
        $(#[$meta])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn single() {
                let $kind = $crate::testing::Kind::Single;
                $body
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn cluster() {
                let $kind = $crate::testing::Kind::Cluster;
                $body
            }
        }
    };
}
