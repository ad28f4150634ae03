//! The Rust client (`gapless-client`) over the HTTP fallbacks (DESIGN.md §5.1) against real
//! edges: over SSE and long-polling it resumes with exactly the gap after any disconnect,
//! hands the application no duplicate, surfaces resets, follows a drain to another edge,
//! and a device that switches transport between connections resumes exactly.

mod common;

use std::time::Duration;

use common::{SECRET, System};
use gapless_client::{Client, ClientConfig, Disconnect, Event, Position, Transport};
use gapless_shared::protocol::ResetReason;

/// The HTTP transports (the WebSocket's own tests are in `client.rs`).
const HTTP: [Transport; 2] = [Transport::Sse, Transport::Poll];

fn config(urls: Vec<String>, user: &str, transport: Transport) -> ClientConfig {
    let token =
        gapless_shared::token::mint_hs256(SECRET, user, Some("sdk"), Duration::from_secs(600));
    let mut config = ClientConfig::new(urls, token);
    config.transport = transport;
    config.backoff_min = Duration::from_millis(20);
    config.backoff_max = Duration::from_millis(200);
    config
}

/// A user of its own per test and transport.
fn user(name: &str, transport: Transport) -> String {
    format!("{name}-{}", transport.name())
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

/// A client of `user` from the start of the log of `epoch`.
fn from_start(config: ClientConfig, epoch: &str) -> Client {
    Client::new(
        config,
        Some(Position {
            epoch: Some(epoch.to_owned()),
            seq: 0,
        }),
    )
}

#[tokio::test]
async fn over_sse_and_poll_a_disconnect_resumes_with_exactly_the_gap() {
    let sys = System::start().await;
    let edge = sys.edge(sys.edge_config("edge-a")).await;
    for transport in HTTP {
        let user = user("ivy", transport);
        let (epoch, _) = sys.send(&user, serde_json::json!(1)).await;
        let mut client = from_start(config(vec![edge.ws_url()], &user, transport), &epoch);
        for i in 2..=5 {
            sys.send(&user, serde_json::json!(i)).await;
        }
        assert_eq!(collect(&mut client, 5).await, vec![1, 2, 3, 4, 5]);
        // Vanished (no goodbye), then a clean close, then an abort: each time exactly the
        // gap, and nothing the application already had.
        let mut next = 6;
        for cut in 0..3 {
            match cut {
                0 => client.disconnect(),
                1 => client.close().await,
                _ => client.abort(),
            }
            for i in next..next + 5 {
                sys.send(&user, serde_json::json!(i)).await;
            }
            assert_eq!(
                collect(&mut client, next + 4).await,
                (next..next + 5).collect::<Vec<_>>(),
                "{transport:?}, cut {cut}"
            );
            next += 5;
        }
        assert_eq!(client.stats().delivered, 20, "{transport:?}");
        assert_eq!(client.stats().gaps, 0, "{transport:?}");
        assert_eq!(client.position().seq, 20);
    }
}

#[tokio::test]
async fn over_sse_and_poll_the_client_resumes_across_an_edge_crash() {
    let sys = System::start().await;
    for transport in HTTP {
        let edge_a = sys.edge(sys.edge_config("edge-a")).await;
        let edge_b = sys.edge(sys.edge_config("edge-b")).await;
        let user = user("jay", transport);
        let (epoch, _) = sys.send(&user, serde_json::json!(1)).await;
        let mut client = from_start(config(vec![edge_a.ws_url()], &user, transport), &epoch);
        for i in 2..=10 {
            sys.send(&user, serde_json::json!(i)).await;
        }
        assert_eq!(collect(&mut client, 10).await, (1..=10).collect::<Vec<_>>());
        edge_a.crash();
        for i in 11..=20 {
            sys.send(&user, serde_json::json!(i)).await;
        }
        let mut client = Client::new(
            config(vec![edge_a.ws_url(), edge_b.ws_url()], &user, transport),
            Some(client.position().clone()),
        );
        assert_eq!(
            collect(&mut client, 20).await,
            (11..=20).collect::<Vec<_>>(),
            "{transport:?}"
        );
    }
}

#[tokio::test]
async fn over_sse_and_poll_a_reset_is_surfaced_and_delivery_continues_from_it() {
    let sys = System::start().await;
    let edge = sys.edge(sys.edge_config("edge-a")).await;
    for transport in HTTP {
        let user = user("kim", transport);
        sys.send(&user, serde_json::json!(1)).await;
        let mut client = Client::new(
            config(vec![edge.ws_url()], &user, transport),
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
                "{transport:?}: no reset then notification"
            );
            match client.next_event().await {
                Event::Reset {
                    first_seq, reason, ..
                } => {
                    assert_eq!((first_seq, reason), (1, ResetReason::EpochChanged));
                    saw_reset = true;
                }
                Event::Notification(n) => {
                    assert!(saw_reset, "{transport:?}: the reset comes first");
                    assert_eq!(n.seq, 1);
                    break;
                }
                Event::Disconnected { retry_in, .. } => Client::wait(retry_in).await,
                Event::Connected { .. } => {}
            }
        }
    }
}

#[tokio::test]
async fn over_sse_and_poll_a_drain_sends_the_client_to_another_edge_without_loss() {
    let sys = System::start().await;
    for transport in HTTP {
        let mut config_a = sys.edge_config("edge-a");
        config_a.drain_window = Duration::from_millis(200);
        let edge_a = sys.edge(config_a).await;
        let edge_b = sys.edge(sys.edge_config("edge-b")).await;
        let user = user("lee", transport);
        let (epoch, _) = sys.send(&user, serde_json::json!(1)).await;
        let urls = vec![edge_a.ws_url(), edge_b.ws_url()];
        // The client picks an edge at random: start again until it is on the one drained.
        let mut client = loop {
            let mut client = from_start(config(urls.clone(), &user, transport), &epoch);
            match tokio::time::timeout(Duration::from_secs(10), client.next_event()).await {
                Ok(Event::Connected { edge, .. }) if edge == "edge-a" => break client,
                Ok(Event::Connected { .. }) => continue,
                other => panic!("{transport:?}: expected to connect, got {other:?}"),
            }
        };
        assert_eq!(collect(&mut client, 1).await, vec![1]);
        edge_a.stop.cancel();
        let reason = match tokio::time::timeout(Duration::from_secs(10), client.next_event()).await
        {
            Ok(Event::Disconnected { reason, retry_in }) => {
                Client::wait(retry_in).await;
                reason
            }
            other => {
                panic!("{transport:?}: expected the drain to end the connection, got {other:?}")
            }
        };
        // SSE hears the drain as `event: reconnect`; a poll gets `[]`, then a refusal.
        match transport {
            Transport::Sse => assert!(
                matches!(reason, Disconnect::Closed { code: 1012, .. }),
                "{reason}"
            ),
            _ => assert!(
                matches!(&reason, Disconnect::Refused { code: Some(code), .. } if code == "draining")
                    || matches!(reason, Disconnect::Lost(_)),
                "{reason}"
            ),
        }
        for i in 2..=10 {
            sys.send(&user, serde_json::json!(i)).await;
        }
        let mut seqs = Vec::new();
        let mut on = String::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while seqs.last() != Some(&10) {
            assert!(tokio::time::Instant::now() < deadline, "stuck at {seqs:?}");
            match tokio::time::timeout(Duration::from_secs(10), client.next_event())
                .await
                .expect("an event within 10 s")
            {
                Event::Notification(n) => {
                    seqs.push(n.seq);
                    client.ack(n.seq);
                }
                Event::Disconnected { retry_in, .. } => Client::wait(retry_in).await,
                Event::Connected { edge, .. } => on = edge,
                Event::Reset { .. } => panic!("no reset expected"),
            }
        }
        assert_eq!(seqs, (2..=10).collect::<Vec<_>>(), "{transport:?}");
        assert_eq!(on, "edge-b", "{transport:?}");
        drop(edge_b);
    }
}

#[tokio::test]
async fn a_device_that_switches_transport_between_connections_resumes_exactly() {
    let sys = System::start().await;
    let edge = sys.edge(sys.edge_config("edge-a")).await;
    let user = "max";
    let (epoch, _) = sys.send(user, serde_json::json!(1)).await;
    for i in 2..=3 {
        sys.send(user, serde_json::json!(i)).await;
    }
    let mut position = Position {
        epoch: Some(epoch),
        seq: 0,
    };
    let mut upto = 3;
    for transport in [
        Transport::WebSocket,
        Transport::Sse,
        Transport::Poll,
        Transport::WebSocket,
        Transport::Poll,
        Transport::Sse,
    ] {
        let from = position.seq + 1;
        let mut client = Client::new(
            config(vec![edge.ws_url()], user, transport),
            Some(position.clone()),
        );
        assert_eq!(
            collect(&mut client, upto).await,
            (from..=upto).collect::<Vec<_>>(),
            "{transport:?}"
        );
        client.close().await;
        position = client.position().clone();
        for i in upto + 1..=upto + 3 {
            sys.send(user, serde_json::json!(i)).await;
        }
        upto += 3;
    }
}

/// Without a position of its own (an app restarted), a device resumes from the ack the edge
/// stored from the other transport.
#[tokio::test]
async fn acks_over_sse_and_poll_are_stored_and_a_restarted_app_resumes_from_them() {
    let sys = System::start().await;
    let edge = sys.edge(sys.edge_config("edge-a")).await;
    for transport in HTTP {
        let user = user("ned", transport);
        let (epoch, _) = sys.send(&user, serde_json::json!(1)).await;
        let mut client = from_start(config(vec![edge.ws_url()], &user, transport), &epoch);
        for i in 2..=4 {
            sys.send(&user, serde_json::json!(i)).await;
        }
        assert_eq!(collect(&mut client, 4).await, vec![1, 2, 3, 4]);
        // Poll: the next poll names 4 (asked for the next event); SSE: the ack of 4 is
        // posted when the app asks for the next event.
        let _ = tokio::time::timeout(Duration::from_millis(500), client.next_event()).await;
        client.close().await;
        let conn = sys.redis_conn().await;
        common::eventually("the ack of 4 stored", Duration::from_secs(10), || {
            let mut conn = conn.clone();
            let user = user.clone();
            async move {
                let stored: Option<String> = redis::cmd("HGET")
                    .arg(format!("gl:{{{user}}}:a"))
                    .arg("sdk")
                    .query_async(&mut conn)
                    .await
                    .expect("HGET");
                stored
                    .as_deref()
                    .and_then(gapless_edge::reader::parse_position)
                    .map(|(_, seq)| seq)
                    == Some(4)
            }
        })
        .await;
        for i in 5..=6 {
            sys.send(&user, serde_json::json!(i)).await;
        }
        // The restarted app, over the WebSocket this time.
        let mut client = Client::new(
            config(vec![edge.ws_url()], &user, Transport::WebSocket),
            None,
        );
        assert_eq!(collect(&mut client, 6).await, vec![5, 6], "{transport:?}");
    }
}
