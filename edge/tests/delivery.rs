//! Delivery and resume against real Redis, ingest and edges.

mod common;

use gapless_shared::on_both;

use std::time::Duration;

use common::{Client, System};

on_both! {
async fn live_delivery_in_order(kind: Kind) {
    let sys = System::start_on(kind).await;
    let edge = sys.edge(sys.edge_config("edge-a")).await;
    let mut c = Client::connect(&edge.ws_url(), "alice", "phone", (None, None)).await;
    // Give the registration a moment to be visible, then append.
    tokio::time::sleep(Duration::from_millis(100)).await;
    for i in 0..5 {
        sys.send("alice", serde_json::json!({"i": i})).await;
    }
    assert_eq!(c.take(5).await, vec![1, 2, 3, 4, 5]);
}
}

on_both! {
async fn reconnect_replays_exactly_the_gap(kind: Kind) {
    let sys = System::start_on(kind).await;
    let edge_a = sys.edge(sys.edge_config("edge-a")).await;
    let edge_b = sys.edge(sys.edge_config("edge-b")).await;
    let mut c = Client::connect(&edge_a.ws_url(), "alice", "phone", (None, None)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (epoch, _) = sys.send("alice", serde_json::json!(1)).await;
    sys.send("alice", serde_json::json!(2)).await;
    assert_eq!(c.take(2).await, vec![1, 2]);
    c.close().await;

    // The gap: 3..=7 appended while the device is away.
    for i in 3..=7 {
        sys.send("alice", serde_json::json!(i)).await;
    }
    // Same edge.
    let mut c = Client::connect(&edge_a.ws_url(), "alice", "phone", (Some(&epoch), Some(2))).await;
    assert_eq!(c.take(5).await, vec![3, 4, 5, 6, 7]);
    c.assert_quiet(Duration::from_millis(300)).await;
    c.close().await;

    // Another edge, from an older position: exactly the gap again.
    for i in 8..=9 {
        sys.send("alice", serde_json::json!(i)).await;
    }
    let mut c = Client::connect(&edge_b.ws_url(), "alice", "phone", (Some(&epoch), Some(5))).await;
    assert_eq!(c.take(4).await, vec![6, 7, 8, 9]);
    c.assert_quiet(Duration::from_millis(300)).await;
    // And live after the replay.
    sys.send("alice", serde_json::json!(10)).await;
    assert_eq!(c.take(1).await, vec![10]);
}
}
