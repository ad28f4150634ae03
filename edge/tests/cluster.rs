//! The edge on a real local Redis Cluster, beyond what the suites run on both kinds of Redis
//! (`on_both!` in delivery.rs and resume.rs): its sharded wakeup subscription follows the
//! channel when its slot moves to another primary, and when its primary dies.

mod common;

use std::time::Duration;

use common::{Backend, Client, Kind, System};
use gapless_shared::keys;
use gapless_shared::protocol::ServerMessage;
use serde_json::json;

/// Sends `seqs` one at a time and expects each live within 5 s: a wakeup, not the sweep
/// (every 15 s with the default 30 s heartbeat).
async fn each_arrives_live(
    sys: &System,
    phone: &mut Client,
    user: &str,
    seqs: std::ops::RangeInclusive<u64>,
) {
    for i in seqs {
        let (_, seq) = sys.send(user, json!(i)).await;
        assert_eq!(seq, i);
        let message = phone
            .next_within(Duration::from_secs(5))
            .await
            .unwrap_or_else(|()| panic!("notification {i} within 5 s: a wakeup reached the edge"))
            .expect("the connection stays open");
        match message {
            ServerMessage::Notification(n) => assert_eq!(n.seq, i),
            other => panic!("expected notification {i}, got {other:?}"),
        }
        phone.ack(i).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wakeup_published_after_its_channel_slot_moved_reaches_the_edge() {
    let sys = System::start_on(Kind::Cluster).await;
    let edge = sys.edge(sys.edge_config("edge-m")).await;
    let (epoch, _) = sys.send("mona", json!(1)).await;
    let mut phone = Client::connect(&edge.ws_url(), "mona", "phone", (Some(&epoch), Some(0))).await;
    assert_eq!(phone.take(1).await, vec![1]);
    each_arrives_live(&sys, &mut phone, "mona", 2..=3).await;

    let Backend::Cluster(cluster) = &sys.redis else {
        unreachable!("started on a cluster")
    };
    let slot = cluster.slot_of(&keys::wake_channel("edge-m"));
    let owner = cluster.owner_of(slot);
    let target = cluster.other_primary(owner);
    // Redis pushes sunsubscribe to the edge when the slot is handed over; redis-rs would
    // drop the subscription for good there.
    tokio::task::block_in_place(|| cluster.move_slot(slot, target));
    each_arrives_live(&sys, &mut phone, "mona", 4..=6).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wakeups_arrive_after_the_primary_of_the_channel_dies() {
    let mut sys = System::start_on(Kind::Cluster).await;
    let edge = sys.edge(sys.edge_config("edge-c")).await;
    let (epoch, _) = sys.send("carol", json!(1)).await;
    let mut phone =
        Client::connect(&edge.ws_url(), "carol", "phone", (Some(&epoch), Some(0))).await;
    assert_eq!(phone.take(1).await, vec![1]);

    let Backend::Cluster(cluster) = &mut sys.redis else {
        unreachable!("started on a cluster")
    };
    let owner = cluster.owner_of(cluster.slot_of(&keys::wake_channel("edge-c")));
    tokio::task::block_in_place(|| cluster.kill_primary(owner));
    each_arrives_live(&sys, &mut phone, "carol", 2..=4).await;
}
