//! The Rust client (`gapless-client`) against real edges: it resumes from its own position
//! on any edge, drops duplicates, and surfaces resets.

mod common;

use std::time::Duration;

use common::{SECRET, System};
use gapless_client::{Client, ClientConfig, Event, Position};
use gapless_shared::protocol::ResetReason;

fn config(urls: Vec<String>, user: &str) -> ClientConfig {
    let token =
        gapless_shared::token::mint_hs256(SECRET, user, Some("sdk"), Duration::from_secs(600));
    let mut config = ClientConfig::new(urls, token);
    config.backoff_min = Duration::from_millis(20);
    config.backoff_max = Duration::from_millis(200);
    config
}

/// Runs the client until it has delivered `upto`, acking everything; returns the seqs.
async fn collect(client: &mut Client, upto: u64) -> Vec<u64> {
    let mut seqs = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while seqs.last().copied() != Some(upto) {
        assert!(tokio::time::Instant::now() < deadline, "stuck at {seqs:?}");
        let event = tokio::time::timeout(Duration::from_secs(10), client.next_event())
            .await
            .expect("an event within 10 s");
        match event {
            Event::Notification(n) => {
                seqs.push(n.seq);
                client.ack(n.seq);
            }
            Event::Disconnected { retry_in, .. } => Client::wait(retry_in).await,
            Event::Connected { .. } => {}
            Event::Reset { .. } => panic!("no reset expected"),
        }
    }
    seqs
}

#[tokio::test]
async fn the_client_resumes_across_an_edge_crash_without_loss_or_repeats() {
    let sys = System::start().await;
    let edge_a = sys.edge(sys.edge_config("edge-a")).await;
    let edge_b = sys.edge(sys.edge_config("edge-b")).await;
    let (epoch, _) = sys.send("carol", serde_json::json!(0)).await;
    let mut client = Client::new(
        config(vec![edge_a.ws_url()], "carol"),
        Some(Position {
            epoch: Some(epoch.clone()),
            seq: 0,
        }),
    );
    for i in 2..=20 {
        sys.send("carol", serde_json::json!(i)).await;
    }
    assert_eq!(collect(&mut client, 20).await, (1..=20).collect::<Vec<_>>());

    // Edge A dies; the client is pointed at both edges and finds B.
    edge_a.crash();
    for i in 21..=40 {
        sys.send("carol", serde_json::json!(i)).await;
    }
    let mut client = {
        let position = client.position().clone();
        Client::new(
            config(vec![edge_a.ws_url(), edge_b.ws_url()], "carol"),
            Some(position),
        )
    };
    assert_eq!(
        collect(&mut client, 40).await,
        (21..=40).collect::<Vec<_>>()
    );
    assert_eq!(client.position().epoch.as_deref(), Some(epoch.as_str()));
    assert_eq!(client.stats().gaps, 0);
}

#[tokio::test]
async fn the_client_drops_duplicates_after_a_reconnect() {
    let sys = System::start().await;
    let edge = sys.edge(sys.edge_config("edge-a")).await;
    let (epoch, _) = sys.send("dave", serde_json::json!(1)).await;
    let mut client = Client::new(
        config(vec![edge.ws_url()], "dave"),
        Some(Position {
            epoch: Some(epoch),
            seq: 0,
        }),
    );
    for i in 2..=5 {
        sys.send("dave", serde_json::json!(i)).await;
    }
    assert_eq!(collect(&mut client, 5).await, vec![1, 2, 3, 4, 5]);
    // Reconnect: the resume names seq 5, so the edge sends nothing old, and whatever an edge
    // might repeat is dropped by seq.
    client.disconnect();
    sys.send("dave", serde_json::json!(6)).await;
    assert_eq!(collect(&mut client, 6).await, vec![6]);
    assert_eq!(client.stats().delivered, 6);
}

#[tokio::test]
async fn the_client_surfaces_a_reset_and_continues_from_it() {
    let sys = System::start().await;
    let edge = sys.edge(sys.edge_config("edge-a")).await;
    sys.send("erin", serde_json::json!(1)).await;
    let mut client = Client::new(
        config(vec![edge.ws_url()], "erin"),
        Some(Position {
            epoch: Some("0000000000000000".into()),
            seq: 7,
        }),
    );
    let mut saw_reset = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no reset then notification"
        );
        match client.next_event().await {
            Event::Reset {
                first_seq, reason, ..
            } => {
                assert_eq!((first_seq, reason), (1, ResetReason::EpochChanged));
                saw_reset = true;
            }
            Event::Notification(n) => {
                assert!(saw_reset, "the reset comes first");
                assert_eq!(n.seq, 1);
                break;
            }
            Event::Disconnected { retry_in, .. } => Client::wait(retry_in).await,
            Event::Connected { .. } => {}
        }
    }
}

/// A device that freezes (reads nothing, answers nothing) while a flood arrives: the edge
/// drops it by heartbeat while its socket is full; once it thaws, the client must find the
/// connection closed and resume with everything.
#[tokio::test]
async fn a_frozen_client_dropped_by_heartbeat_resumes_with_everything() {
    let sys = System::start().await;
    let mut config = sys
        .edge_config("edge-f")
        .with_heartbeat(Duration::from_millis(500));
    config.slow_consumer = Duration::from_secs(10);
    let edge = sys.edge(config).await;
    let (epoch, _) = sys.send("frank", serde_json::json!(0)).await;
    let mut c = config_for(&edge.ws_url(), "frank");
    c.heartbeat_grace = Duration::from_millis(500);
    let mut client = Client::new(
        c,
        Some(Position {
            epoch: Some(epoch),
            seq: 0,
        }),
    );
    assert_eq!(collect(&mut client, 1).await, vec![1]);
    // Frozen: the flood fills the socket; the edge stops hearing pongs.
    for _ in 0..4 {
        sys.send_padded_batch("frank", 300, 16 << 10).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Thawed.
    let seqs = collect(&mut client, 1201).await;
    assert_eq!(seqs, (2..=1201).collect::<Vec<_>>());
}

fn config_for(url: &str, user: &str) -> ClientConfig {
    config(vec![url.to_owned()], user)
}

/// Connects a fresh client (no position) and returns once it is connected.
async fn fresh_client(url: &str, user: &str) -> Client {
    let mut client = Client::new(config_for(url, user), None);
    match tokio::time::timeout(Duration::from_secs(10), client.next_event()).await {
        Ok(Event::Connected { .. }) => client,
        other => panic!("expected to connect, got {other:?}"),
    }
}

/// Polls until Redis holds an ack position for the device `sdk` of `user`.
async fn wait_stored_ack(sys: &System, user: &str) -> String {
    let mut conn = sys.redis_conn().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let stored: Option<String> = redis::cmd("HGET")
            .arg(format!("gl:{{{user}}}:a"))
            .arg("sdk")
            .query_async(&mut conn)
            .await
            .expect("HGET");
        if let Some(stored) = stored {
            return stored;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no ack position stored"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Found by the drill: a device that connected, got nothing, and reconnected later resumed
/// from the live end of that later moment, skipping what was appended in between.
#[tokio::test]
async fn a_client_that_never_got_a_notification_resumes_from_where_it_started() {
    let sys = System::start().await;
    let edge = sys.edge(sys.edge_config("edge-s")).await;

    // No log yet when it first connects.
    let mut client = fresh_client(&edge.ws_url(), "gina").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    client.disconnect();
    for i in 1..=3 {
        sys.send("gina", serde_json::json!(i)).await;
    }
    assert_eq!(collect(&mut client, 3).await, vec![1, 2, 3]);

    // A log at 3 when it first connects: it starts there, and resumes from there.
    for i in 1..=3 {
        sys.send("hank", serde_json::json!(i)).await;
    }
    let mut client = fresh_client(&edge.ws_url(), "hank").await;
    let stored = wait_stored_ack(&sys, "hank").await;
    assert_eq!(
        gapless_edge::reader::parse_position(&stored).map(|(_, seq)| seq),
        Some(3),
        "the start is stored: {stored}"
    );
    client.disconnect();
    for i in 4..=5 {
        sys.send("hank", serde_json::json!(i)).await;
    }
    assert_eq!(collect(&mut client, 5).await, vec![4, 5]);
}
