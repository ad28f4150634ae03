//! The edge on a real local Redis Cluster, beyond what the suites run on both kinds of Redis
//! (`on_both!` in delivery.rs and resume.rs): wakeups keep arriving when the node the
//! edge's subscription goes through dies.

mod common;

use std::time::Duration;

use common::{Backend, Client, Kind, System};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wakeups_arrive_through_another_node_after_the_subscribed_node_dies() {
    let mut sys = System::start_on(Kind::Cluster).await;
    let edge = sys.edge(sys.edge_config("edge-c")).await;
    let (epoch, _) = sys.send("carol", json!(1)).await;
    let mut phone =
        Client::connect(&edge.ws_url(), "carol", "phone", (Some(&epoch), Some(0))).await;
    assert_eq!(phone.take(1).await, vec![1]);

    // The edge subscribes through the first seed, node 0: kill it (a primary: its replica
    // takes over its slots).
    let Backend::Cluster(cluster) = &mut sys.redis else {
        unreachable!("started on a cluster")
    };
    let node0 = 0;
    if cluster.role(node0).as_deref() == Some("master") {
        tokio::task::block_in_place(|| cluster.kill_primary(node0));
    } else {
        cluster.node_mut(node0).kill();
    }
    // Live, not swept: the sweep runs every 15 s (heartbeat 30 s), the wait is 5 s each.
    for i in 2..=4u64 {
        let (_, seq) = sys.send("carol", json!(i)).await;
        assert_eq!(seq, i);
        let n = phone
            .next_within(Duration::from_secs(5))
            .await
            .expect("a wakeup within 5 s, through another node")
            .expect("the connection stays open");
        match n {
            gapless_shared::protocol::ServerMessage::Notification(n) => assert_eq!(n.seq, i),
            other => panic!("expected notification {i}, got {other:?}"),
        }
        phone.ack(i).await;
    }
}
