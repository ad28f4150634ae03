//! `gapless migrate` against a real single node and a real local Redis Cluster.

use std::process::Command;

use gapless_shared::testing::{TestCluster, TestRedis};

fn gapless() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gapless"))
}

#[test]
fn migrate_applies_the_library_to_a_single_node() {
    let redis = TestRedis::start();
    let out = gapless()
        .args(["migrate", "--redis", &redis.url()])
        .output()
        .expect("runs");
    assert!(out.status.success(), "{out:?}");
    let version: String = redis::cmd("GET")
        .arg("gl:schema")
        .query(&mut redis.client().get_connection().expect("connects"))
        .expect("recorded");
    assert_eq!(version, gapless_shared::schema::VERSION.to_string());
}

#[test]
fn migrate_with_cluster_loads_every_primary_and_reloads_one_restarted_empty() {
    let cluster = TestCluster::start();
    let run = |env_cluster: bool| {
        let mut cmd = gapless();
        cmd.args(["migrate", "--redis", &cluster.urls()]);
        if env_cluster {
            cmd.env("GAPLESS_REDIS_CLUSTER", "1");
        } else {
            cmd.arg("--cluster");
        }
        let out = cmd.output().expect("runs");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let printed = run(false);
    assert!(printed.contains("applied to 3 primaries"), "{printed}");
    let has_library = |node: usize| {
        let listed: Vec<redis::Value> = cluster
            .on_node(
                node,
                redis::cmd("FUNCTION")
                    .arg("LIST")
                    .arg("LIBRARYNAME")
                    .arg("gapless"),
            )
            .expect("FUNCTION LIST answers");
        !listed.is_empty()
    };
    for primary in cluster.primaries() {
        assert!(has_library(primary), "primary {primary} holds the library");
    }
    // A primary that lost its functions gets them again from a second migrate.
    let emptied = cluster.primaries()[2];
    cluster
        .on_node::<()>(emptied, redis::cmd("FUNCTION").arg("FLUSH"))
        .expect("flushes");
    assert!(!has_library(emptied));
    run(true);
    assert!(has_library(emptied));
}
