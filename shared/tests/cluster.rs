//! The local Redis Cluster harness itself: six real `redis-server` processes, slots that
//! move with their keys, a manual failover and a SIGKILLed primary.

use gapless_shared::testing::TestCluster;

#[test]
fn a_test_cluster_moves_slots_with_their_keys_and_fails_over() {
    let mut cluster = TestCluster::start();
    assert_eq!(cluster.primaries().len(), 3, "three primaries");
    let key = "gl:{alice}:m";
    let slot = cluster.slot_of(key);
    let owner = cluster.owner_of(slot);
    cluster
        .on_node::<()>(owner, redis::cmd("SET").arg(key).arg("v1"))
        .expect("the owner takes the write");

    // Moved with its key: the new owner serves it, the old one redirects.
    let target = cluster
        .primaries()
        .into_iter()
        .find(|&p| p != owner)
        .expect("another primary");
    cluster.move_slot(slot, target);
    assert_eq!(cluster.owner_of(slot), target);
    let value: String = cluster
        .on_node(target, redis::cmd("GET").arg(key))
        .expect("the new owner has the key");
    assert_eq!(value, "v1");
    let moved = cluster
        .on_node::<String>(owner, redis::cmd("GET").arg(key))
        .expect_err("the old owner redirects");
    assert!(moved.redirect_node().is_some(), "a MOVED redirect: {moved}");

    // A manual failover keeps the data.
    let promoted = cluster.failover(target);
    assert_eq!(cluster.owner_of(slot), promoted);
    let value: String = cluster
        .on_node(promoted, redis::cmd("GET").arg(key))
        .expect("the promoted replica has the key");
    assert_eq!(value, "v1");

    // A SIGKILLed primary is replaced by its replica after the node timeout.
    let survivor = cluster.kill_primary(promoted);
    assert_eq!(cluster.owner_of(slot), survivor);
    let value: String = cluster
        .on_node(survivor, redis::cmd("GET").arg(key))
        .expect("the new primary has the key");
    assert_eq!(value, "v1");
    cluster.node_mut(promoted).restart().expect("restarts");
    cluster.wait_stable();
    assert_eq!(cluster.primaries().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_loads_the_library_on_every_primary_and_check_names_a_primary_without_it() {
    use gapless_shared::config::RedisConfig;
    use gapless_shared::schema::{self, SchemaError};
    use gapless_shared::store;
    use std::time::Duration;

    let cluster = tokio::task::spawn_blocking(TestCluster::start)
        .await
        .expect("the harness starts");
    let config = RedisConfig::from_args(&cluster.urls(), true).expect("seeds");
    let timeout = Duration::from_secs(2);
    let mut store = store::connect(&config)
        .await
        .expect("connects to the cluster");
    let primaries = store.primaries(timeout).await.expect("lists primaries");
    assert_eq!(primaries.len(), 3, "{primaries:?}");

    assert!(matches!(
        schema::check(&mut store, timeout).await,
        Err(SchemaError::Missing)
    ));
    schema::migrate(&mut store).await.expect("migrates");
    assert_eq!(
        schema::check(&mut store, timeout).await.expect("current"),
        schema::VERSION
    );

    // A primary that lost its functions (restarted empty, or added later) is named.
    let emptied = cluster.primaries()[1];
    cluster
        .on_node::<()>(emptied, redis::cmd("FUNCTION").arg("FLUSH"))
        .expect("flushes one primary's functions");
    let addr = format!("127.0.0.1:{}", cluster.node(emptied).port());
    match schema::check(&mut store, timeout).await {
        Err(SchemaError::Primary { node, found, .. }) => {
            assert_eq!(node, addr);
            assert_eq!(found, None);
        }
        other => panic!("expected the emptied primary to be named, got {other:?}"),
    }
    let message = schema::check(&mut store, timeout)
        .await
        .expect_err("still missing")
        .to_string();
    assert!(
        message.contains(&addr) && message.contains("gapless migrate"),
        "{message}"
    );

    // Migrating again fixes it.
    schema::migrate(&mut store).await.expect("migrates again");
    schema::check(&mut store, timeout)
        .await
        .expect("every primary current");
    tokio::task::spawn_blocking(move || drop(cluster))
        .await
        .expect("stops");
}

/// A primary that hangs (SIGSTOP: its sockets stay open, nothing answers) is failed over by
/// the cluster; the store's calls to its slots must be answered by the promoted replica
/// soon after, not time out for good on the connection to the hung node (redis-rs keeps
/// retrying that node; the store replaces its connection after repeated timeouts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_is_answered_again_after_its_primary_hangs_and_is_failed_over() {
    use gapless_shared::config::RedisConfig;
    use gapless_shared::store::{self, with_timeout};
    use std::time::{Duration, Instant};

    let mut cluster = tokio::task::spawn_blocking(TestCluster::start)
        .await
        .expect("the harness starts");
    let mut config = RedisConfig::from_args(&cluster.urls(), true).expect("seeds");
    config.command_timeout = Duration::from_millis(500);
    let timeout = config.command_timeout;
    let mut store = store::connect(&config)
        .await
        .expect("connects to the cluster");
    let key = "gl:{hung}:m";
    with_timeout(
        timeout,
        redis::cmd("HSET")
            .arg(key)
            .arg("f")
            .arg("v")
            .query_async::<()>(&mut store),
    )
    .await
    .expect("the owner takes the write");
    // Replicated before the owner hangs, so the promoted replica holds it.
    let owner = cluster.owner_of(cluster.slot_of(key));
    cluster
        .on_node::<i64>(owner, redis::cmd("WAIT").arg(1).arg(2000))
        .expect("the replica acknowledges");

    let promoted = tokio::task::block_in_place(|| cluster.pause_primary(owner));
    let started = Instant::now();
    let mut failures = 0;
    let value = loop {
        let read = with_timeout(
            timeout,
            redis::cmd("HGET")
                .arg(key)
                .arg("f")
                .query_async::<Option<String>>(&mut store),
        )
        .await;
        match read {
            Ok(value) => break value,
            Err(e) => {
                failures += 1;
                assert!(
                    started.elapsed() < Duration::from_secs(30),
                    "still failing 30 s after the failover ({failures} calls): {e}"
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(value.as_deref(), Some("v"), "the promoted replica's copy");
    eprintln!(
        "answered by node {promoted} {} ms after the failover, {failures} failed calls",
        started.elapsed().as_millis()
    );
    with_timeout(
        timeout,
        redis::cmd("HSET")
            .arg(key)
            .arg("f")
            .arg("w")
            .query_async::<()>(&mut store),
    )
    .await
    .expect("writes go to the new primary");

    tokio::task::block_in_place(|| cluster.resume(owner));
    tokio::task::spawn_blocking(move || drop(cluster))
        .await
        .expect("stops");
}
