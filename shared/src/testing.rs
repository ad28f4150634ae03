//! Test harness: real `redis-server` processes on free ports in temporary directories,
//! removed when dropped. Enabled by the `testing` feature, for tests only.

use std::ops::{Deref, DerefMut};
use std::path::PathBuf;

use crate::process::{ClusterOptions, ProcessError, RedisCluster, RedisOptions, RedisProcess};

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
                port: free_port().expect("binding 127.0.0.1:0 works"),
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

pub use crate::process::free_port;

/// Polls `check` every 10 ms until it holds; panics with `what` after `within`.
pub async fn eventually<F, Fut>(what: &str, within: std::time::Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {within:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
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

/// A throwaway local Redis Cluster ([`RedisCluster`]): three primaries and three replicas on
/// free ports (their own bus ports) with AOF `appendfsync always` and a short
/// `cluster-node-timeout`, so a failover takes about a second. It derefs to the
/// [`RedisCluster`]; the operations a test inflicts panic with the reason when they fail,
/// which is what a test wants. Its directory is removed on drop.
#[derive(Debug)]
pub struct TestCluster {
    /// The nodes (declared first so they are killed before the directory goes).
    cluster: RedisCluster,
    /// The temporary directory holding every node's.
    dir: PathBuf,
}

/// `cluster-node-timeout` of a test cluster, ms: a primary silent this long is failed over.
pub const CLUSTER_NODE_TIMEOUT_MS: u64 = 1000;

impl TestCluster {
    /// Starts six nodes, creates the cluster and waits until every node reports
    /// `cluster_state:ok`, all agree on the slots and every replica is in sync.
    pub fn start() -> Self {
        let mut last = None;
        // Free ports can be taken before the nodes bind them; a few attempts make that
        // race harmless.
        for _ in 0..3 {
            let dir = temp_dir();
            let options = ClusterOptions {
                ports: (0..6)
                    .map(|_| {
                        let port = || free_port().expect("binding 127.0.0.1:0 works");
                        (port(), port())
                    })
                    .collect(),
                dir: dir.clone(),
                appendfsync: "always".into(),
                node_timeout_ms: CLUSTER_NODE_TIMEOUT_MS,
            };
            match RedisCluster::start(options) {
                Ok(cluster) => return Self { cluster, dir },
                Err(e @ ProcessError::NotInstalled) => panic!("{e}"),
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    last = Some(e);
                }
            }
        }
        panic!("cannot start a test cluster: {last:?}");
    }

    /// The hash slot of `key`.
    pub fn slot_of(&self, key: &str) -> u16 {
        self.cluster.slot_of(key).expect("CLUSTER KEYSLOT answers")
    }

    /// The hash slot of `user`'s keys.
    pub fn slot_of_user(&self, user: &str) -> u16 {
        let user = crate::ids::UserId::parse(user).expect("a valid user id");
        self.cluster
            .slot_of_user(&user)
            .expect("CLUSTER KEYSLOT answers")
    }

    /// A primary other than `node`.
    pub fn other_primary(&self, node: usize) -> usize {
        self.cluster.other_primary(node).expect("another primary")
    }

    /// The node serving `slot` now, as a live primary sees it.
    pub fn owner_of(&self, slot: u16) -> usize {
        self.cluster.owner_of(slot).expect("the slot has an owner")
    }

    /// Moves `slot` to the primary `to` ([`RedisCluster::move_slot`]).
    pub fn move_slot(&self, slot: u16, to: usize) {
        self.cluster
            .move_slot(slot, to)
            .unwrap_or_else(|e| panic!("moving slot {slot} to node {to}: {e}"));
    }

    /// A manual failover of `primary` ([`RedisCluster::failover`]); returns the new primary.
    pub fn failover(&self, primary: usize) -> usize {
        self.cluster
            .failover(primary)
            .unwrap_or_else(|e| panic!("failing node {primary} over: {e}"))
    }

    /// SIGKILLs `primary` and waits for its replica to take over
    /// ([`RedisCluster::kill_primary`]); returns the new primary.
    pub fn kill_primary(&mut self, primary: usize) -> usize {
        self.cluster
            .kill_primary(primary)
            .unwrap_or_else(|e| panic!("killing primary {primary}: {e}"))
    }

    /// SIGSTOPs `primary` and waits for its replica to take over
    /// ([`RedisCluster::pause_primary`]); returns the new primary.
    pub fn pause_primary(&mut self, primary: usize) -> usize {
        self.cluster
            .pause_primary(primary)
            .unwrap_or_else(|e| panic!("pausing primary {primary}: {e}"))
    }

    /// SIGCONTs a paused node and waits until the cluster is stable.
    pub fn resume(&mut self, index: usize) {
        self.cluster
            .resume(index)
            .unwrap_or_else(|e| panic!("resuming node {index}: {e}"));
    }

    /// The replica of `primary`, waiting until the primary lists one.
    pub fn wait_replica_of(&self, primary: usize) -> usize {
        self.cluster
            .wait_replica_of(primary)
            .unwrap_or_else(|e| panic!("the replica of node {primary}: {e}"))
    }

    /// The node id of the node at `index`.
    pub fn node_id(&self, index: usize) -> String {
        self.cluster.node_id(index).expect("CLUSTER MYID answers")
    }

    /// Waits until every live node says `cluster_state:ok` and all agree on slot owners.
    pub fn wait_stable(&self) {
        self.cluster.wait_stable().unwrap_or_else(|e| panic!("{e}"));
    }
}

impl Deref for TestCluster {
    type Target = RedisCluster;
    fn deref(&self) -> &RedisCluster {
        &self.cluster
    }
}

impl DerefMut for TestCluster {
    fn deref_mut(&mut self) -> &mut RedisCluster {
        &mut self.cluster
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for i in 0..self.cluster.len() {
            self.cluster.node_mut(i).kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
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
