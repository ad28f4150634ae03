//! Fault drills for the edge (DESIGN.md §2): lost wakeups, a killed pub/sub connection, edge
//! processes killed with SIGKILL or drained with SIGTERM, a client that stops reading, a
//! silent client, and a Redis restart. Each test states the guarantee it checks; edges that
//! must die for real run as `gapless-edge` processes.

mod common;

use std::time::Duration;

use common::process::EdgeProcess;
use common::{Client, System};
use futures_util::{SinkExt, StreamExt};
use gapless_shared::protocol::{Notification, ServerMessage};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// Sum of the samples of `name` (with exactly these labels, e.g. `x{reason="y"}`) in a
/// Prometheus text; 0 when absent.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter_map(|l| l.strip_prefix(name))
        .filter_map(|rest| rest.strip_prefix(' '))
        .filter_map(|v| v.trim().parse::<f64>().ok())
        .sum()
}

/// Reads `n` notifications without acking any.
async fn notes(c: &mut Client, n: usize) -> Vec<Notification> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(c.notification().await);
    }
    out
}

fn seqs(notes: &[Notification]) -> Vec<u64> {
    notes.iter().map(|n| n.seq).collect()
}

/// Creates `user`'s log with one notification, then connects `device` resuming from before
/// it and reads it (acked): from here on the device has an explicit position and is
/// registered on `edge_id`. Returns the client and the log's epoch.
///
/// Tests whose subject is another fault start this way rather than with `(None, None)`, so
/// that where the device starts never depends on timing.
async fn connect_with_log(
    sys: &System,
    url: &str,
    user: &str,
    device: &str,
    edge_id: &str,
) -> (Client, String) {
    let (epoch, seq) = sys.send(user, serde_json::json!("hello")).await;
    assert_eq!(seq, 1, "{user}'s log is new");
    let mut c = Client::connect(url, user, device, (Some(&epoch), Some(0))).await;
    assert_eq!(c.take(1).await, vec![1]);
    sys.wait_registered(user, edge_id).await;
    (c, epoch)
}

/// The stored ack position of a device, `(epoch, seq)`.
async fn stored_ack(sys: &System, user: &str, device: &str) -> Option<(String, u64)> {
    let mut conn = sys.redis_conn().await;
    let raw: Option<String> = redis::cmd("HGET")
        .arg(format!("gl:{{{user}}}:a"))
        .arg(device)
        .query_async(&mut conn)
        .await
        .expect("HGET");
    raw.map(|s| {
        gapless_edge::reader::parse_position(&s)
            .unwrap_or_else(|| panic!("{s:?} is not <epoch>:<seq>[:<unix s>]"))
    })
}

/// Polls until the stored ack of a device is at least `seq`.
async fn wait_stored_ack(sys: &System, user: &str, device: &str, seq: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if stored_ack(sys, user, device)
            .await
            .is_some_and(|(_, s)| s >= seq)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the ack {seq} of {user}/{device} was never stored"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Appends with FCALL straight into Redis, as the ingest would but publishing no wakeup:
/// for the edge, every wakeup of these entries is lost. Returns the user's last seq and the
/// live edges the append saw (those an ingest would have woken).
async fn append_without_wakeup(
    sys: &System,
    user: &str,
    payloads: &[String],
) -> (u64, Vec<String>) {
    let mut conn = sys.redis_conn().await;
    let mut cmd = redis::cmd("FCALL");
    cmd.arg(gapless_shared::schema::FN_APPEND)
        .arg(4)
        .arg(format!("gl:{{{user}}}:m"))
        .arg(format!("gl:{{{user}}}:s"))
        .arg(format!("gl:{{{user}}}:r"))
        .arg(format!("gl:{{{user}}}:a"))
        .arg(10_000)
        .arg(7 * 24 * 3600 * 1000_u64)
        .arg(24 * 3600 * 1000_u64)
        .arg("unused-epoch-candidate")
        .arg(payloads.len())
        .arg(0);
    for p in payloads {
        cmd.arg(p);
    }
    type UserReply = (String, u64, Vec<u64>, Vec<String>, u64, String);
    let (_now, (_epoch, last, _dups, edges, failed_at, failure)): (u64, UserReply) = cmd
        .query_async(&mut conn)
        .await
        .expect("gapless_append answers");
    assert_eq!(failed_at, 0, "append failed: {failure}");
    (last, edges)
}

/// Appends one notification through the ingest, retrying (same idempotency key) until the
/// ingest answers 200; returns its seq.
async fn send_retrying(sys: &System, user: &str, key: &str, within: Duration) -> u64 {
    let deadline = Instant::now() + within;
    loop {
        let answer = sys
            .http
            .post(format!("{}/v1/notifications", sys.ingest_url))
            .bearer_auth(common::API_KEY)
            .json(&serde_json::json!({"user": user, "payload": key, "idempotency_key": key}))
            .timeout(Duration::from_secs(2))
            .send()
            .await;
        if let Ok(r) = answer
            && r.status().is_success()
        {
            let body: serde_json::Value = r.json().await.expect("json");
            return body["seq"].as_u64().expect("seq");
        }
        assert!(
            Instant::now() < deadline,
            "the ingest never accepted {key} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_lost_wakeup_still_reaches_a_connected_device_within_one_heartbeat() {
    let sys = System::start().await;
    let heartbeat = Duration::from_millis(1000);
    let edge = sys
        .edge(sys.edge_config("edge-lw").with_heartbeat(heartbeat))
        .await;
    let (mut c, _) = connect_with_log(&sys, &edge.ws_url(), "lw", "phone", "edge-lw").await;

    let payloads: Vec<String> = (2..=4).map(|i| format!("{{\"direct\":{i}}}")).collect();
    let (last, edges) = append_without_wakeup(&sys, "lw", &payloads).await;
    let appended = Instant::now();
    assert_eq!(last, 4);
    assert_eq!(
        edges,
        vec!["edge-lw".to_owned()],
        "the edge is registered, so a wakeup was due and is the one lost"
    );

    let got = notes(&mut c, 3).await;
    let took = appended.elapsed();
    assert_eq!(seqs(&got), vec![2, 3, 4]);
    assert_eq!(got[0].payload.get(), r#"{"direct":2}"#);
    assert!(
        took <= heartbeat + heartbeat / 2,
        "the lost wakeup was covered only after {took:?} (heartbeat {heartbeat:?})"
    );
    c.assert_quiet(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn killing_the_edges_pubsub_connection_loses_nothing() {
    let sys = System::start().await;
    // The default heartbeat leaves the periodic sweep 15 s away: only the resubscription
    // (and the sweep it triggers) can recover what was published while unsubscribed.
    let edge = sys.edge(sys.edge_config("edge-ps")).await;
    let (mut c, _) = connect_with_log(&sys, &edge.ws_url(), "ps", "phone", "edge-ps").await;
    let mut admin = sys.redis_conn().await;

    let mut last = 0;
    for i in 2..=201 {
        if i == 60 || i == 140 {
            let killed: u64 = redis::cmd("CLIENT")
                .arg("KILL")
                .arg("TYPE")
                .arg("pubsub")
                .query_async(&mut admin)
                .await
                .expect("CLIENT KILL");
            assert!(killed >= 1, "the edge's subscription was not found");
        }
        last = sys.send("ps", serde_json::json!(i)).await.1;
        tokio::time::sleep(Duration::from_millis(4)).await;
    }
    assert_eq!(last, 201);

    let got = c.take(200).await;
    assert_eq!(got, (2..=201).collect::<Vec<_>>());
    c.assert_quiet(Duration::from_millis(300)).await;

    // And the edge is subscribed again, so later wakeups are heard.
    let channel = gapless_shared::keys::wake_channel("edge-ps");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, n): (String, u64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(&channel)
            .query_async(&mut admin)
            .await
            .expect("PUBSUB NUMSUB");
        if n == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the edge never resubscribed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sys.send("ps", serde_json::json!(202)).await;
    assert_eq!(c.take(1).await, vec![202]);
}

#[tokio::test]
async fn an_edge_killed_with_sigkill_loses_nothing() {
    let sys = System::start().await;
    let mut edge1 = EdgeProcess::start(&sys, "edge-k1", &[]).await;
    let edge2 = EdgeProcess::start(&sys, "edge-k2", &[]).await;
    let (mut c, epoch) = connect_with_log(&sys, &edge1.ws_url(), "kim", "phone", "edge-k1").await;

    for i in 2..=5 {
        sys.send("kim", serde_json::json!(i)).await;
    }
    let first = notes(&mut c, 4).await;
    assert_eq!(seqs(&first), vec![2, 3, 4, 5]);
    for n in &first {
        c.ack(n.seq).await;
    }
    wait_stored_ack(&sys, "kim", "phone", 5).await;
    // More, acked, but maybe never flushed before the kill.
    for i in 6..=8 {
        sys.send("kim", serde_json::json!(i)).await;
    }
    assert_eq!(c.take(3).await, vec![6, 7, 8]);

    edge1.sigkill();
    assert_eq!(
        c.close_code().await,
        None,
        "a killed edge sends no close frame"
    );
    for i in 9..=15 {
        sys.send("kim", serde_json::json!(i)).await;
    }

    // The device resumes on the other edge from what it received: exactly the rest.
    let mut c = Client::connect(&edge2.ws_url(), "kim", "phone", (Some(&epoch), Some(8))).await;
    assert_eq!(seqs(&notes(&mut c, 7).await), (9..=15).collect::<Vec<_>>());
    c.assert_quiet(Duration::from_millis(300)).await;
    // Nothing was acked on edge 2, so the stored position is still edge 1's last flush.
    c.close().await;

    let (stored_epoch, stored) = stored_ack(&sys, "kim", "phone")
        .await
        .expect("a stored ack");
    assert_eq!(stored_epoch, epoch);
    assert!((5..=8).contains(&stored), "stored ack {stored}");

    // A client naming no position resumes from the stored ack: it may repeat what was
    // acked after the last flush, but skips nothing.
    let mut c = Client::connect(&edge2.ws_url(), "kim", "phone", (None, None)).await;
    let got = seqs(&notes(&mut c, (15 - stored) as usize).await);
    assert!(
        got[0] <= stored + 1,
        "resumed at {} after ack {stored}",
        got[0]
    );
    assert_eq!(got, (got[0]..=15).collect::<Vec<_>>());
    assert_eq!(got[0], stored + 1, "resumes exactly after the stored ack");
    c.assert_quiet(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_and_later_resumes_with_everything() {
    const N: usize = 2000;
    const PAD: usize = 16 << 10;
    let sys = System::start().await;
    let edge = EdgeProcess::start(
        &sys,
        "edge-slow",
        &[
            ("GAPLESS_SLOW_CONSUMER_MS", "1000"),
            ("GAPLESS_OUTBOUND_QUEUE", "16"),
        ],
    )
    .await;
    let rss_before = edge.rss_kib();
    let (mut stalled, epoch) =
        connect_with_log(&sys, &edge.ws_url(), "slow", "phone", "edge-slow").await;

    // From here on the client reads nothing; 32 MiB more than any socket buffer holds.
    let mut last = 0;
    for _ in 0..4 {
        last = sys.send_padded_batch("slow", N / 4, PAD).await;
    }
    assert_eq!(last, N as u64 + 1);

    let deadline = Instant::now() + Duration::from_secs(15);
    let mut peak_rss = 0;
    loop {
        peak_rss = peak_rss.max(edge.rss_kib());
        let text = edge.metrics(&sys.http).await;
        let slow = metric(
            &text,
            "gapless_edge_disconnects_total{reason=\"slow_consumer\",transport=\"ws\"}",
        );
        if slow >= 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the stalled client was never closed; disconnects:\n{}",
            text.lines()
                .filter(|l| l.starts_with("gapless_edge_disconnects"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        peak_rss < rss_before + 128 * 1024,
        "the edge grew from {rss_before} KiB to {peak_rss} KiB for one stalled client"
    );

    // What reached the stalled socket before the close is an in-order prefix, then the end.
    let mut prefix = Vec::new();
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), stalled.ws.next())
            .await
            .expect("the stalled socket ends");
        match frame {
            Some(Ok(Message::Text(t))) => {
                match gapless_shared::protocol::from_json::<ServerMessage>(t.as_str())
                    .expect("server JSON")
                {
                    ServerMessage::Notification(n) => prefix.push(n.seq),
                    ServerMessage::Ping => {}
                    other => panic!("unexpected {other:?}"),
                }
            }
            Some(Ok(Message::Close(frame))) => {
                if let Some(frame) = frame {
                    let code = u16::from(frame.code);
                    assert!(code == 1008 || code == 1013, "close code {code}");
                }
                break;
            }
            Some(Ok(_)) => {}
            None | Some(Err(_)) => break,
        }
    }
    drop(stalled);
    assert!((prefix.len()) < N, "the whole backlog fit the socket");
    assert_eq!(
        prefix,
        (2..2 + prefix.len() as u64).collect::<Vec<_>>(),
        "the stalled socket got a gap or a reorder"
    );

    // Resumed from its last ack, the device gets every notification, in order.
    let mut c = Client::connect(&edge.ws_url(), "slow", "phone", (Some(&epoch), Some(1))).await;
    let got = c.take(N).await;
    assert_eq!(got, (2..=last).collect::<Vec<_>>());
    c.assert_quiet(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn a_silent_client_is_dropped_after_two_heartbeat_intervals() {
    let sys = System::start().await;
    let edge = sys
        .edge(
            sys.edge_config("edge-hb")
                .with_heartbeat(Duration::from_millis(300)),
        )
        .await;
    let mut request = edge.ws_url().into_client_request().expect("valid url");
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", common::token("quiet", Some("phone")))
            .parse()
            .expect("header"),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("connects");
    let welcome = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("welcome in time");
    assert!(
        matches!(&welcome, Some(Ok(Message::Text(t))) if t.as_str().contains("\"welcome\"")),
        "{welcome:?}"
    );
    ws.send(Message::Text(r#"{"type":"resume"}"#.into()))
        .await
        .expect("send resume");
    let silent_since = Instant::now();

    // Application pings arrive as text and go unanswered; the client never writes again.
    let mut pings = 0;
    let code = loop {
        let frame = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("the silent client is dropped within 5 s");
        match frame {
            Some(Ok(Message::Text(t))) => {
                assert!(t.as_str().contains("\"ping\""), "unexpected {t}");
                pings += 1;
            }
            Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => {}
            None | Some(Err(_)) => break None,
        }
    };
    let after = silent_since.elapsed();
    assert!(
        code.is_none() || code == Some(1008),
        "closed with {code:?}, expected 1008 or EOF"
    );
    assert!(
        after >= Duration::from_millis(500) && after <= Duration::from_secs(3),
        "dropped after {after:?} of silence (heartbeat 300 ms, {pings} pings)"
    );
    assert!(pings >= 1, "the edge pinged before dropping");
}

#[tokio::test]
async fn drain_on_sigterm_closes_every_client_with_1012_and_loses_nothing() {
    let sys = System::start().await;
    let mut draining =
        EdgeProcess::start(&sys, "edge-drain", &[("GAPLESS_DRAIN_WINDOW_MS", "500")]).await;
    let users: Vec<String> = (0..5).map(|i| format!("drain-{i}")).collect();
    let mut clients = Vec::new();
    let mut epochs = Vec::new();
    for user in &users {
        let (c, epoch) =
            connect_with_log(&sys, &draining.ws_url(), user, "phone", "edge-drain").await;
        clients.push(c);
        epochs.push(epoch);
    }

    draining.sigterm();
    let signalled = Instant::now();
    // Appends while the edge drains: they must wait in the log.
    for user in &users {
        for i in 0..2 {
            sys.send(user, serde_json::json!(format!("during-{i}")))
                .await;
        }
    }
    for (user, c) in users.iter().zip(clients.iter_mut()) {
        assert_eq!(c.close_code().await, Some(1012), "close code of {user}");
    }
    let closed = signalled.elapsed();
    assert!(
        closed < Duration::from_secs(3),
        "closing every client took {closed:?} with a 500 ms drain window"
    );
    drop(clients);
    let status = draining.wait_exit(Duration::from_secs(5)).await;
    assert!(status.success(), "the drained edge exited with {status}");

    let mut conn = sys.redis_conn().await;
    for (user, epoch) in users.iter().zip(&epochs) {
        let score: Option<f64> = redis::cmd("ZSCORE")
            .arg(format!("gl:{{{user}}}:r"))
            .arg("edge-drain")
            .query_async(&mut conn)
            .await
            .expect("ZSCORE");
        assert_eq!(
            score, None,
            "the drained edge is still registered for {user}"
        );
        assert_eq!(
            stored_ack(&sys, user, "phone").await,
            Some((epoch.clone(), 1)),
            "the drain flushed the ack of {user}"
        );
    }
    for user in &users {
        for i in 0..2 {
            sys.send(user, serde_json::json!(format!("after-{i}")))
                .await;
        }
    }

    let other = sys.edge(sys.edge_config("edge-other")).await;
    for (user, epoch) in users.iter().zip(&epochs) {
        let mut c = Client::connect(&other.ws_url(), user, "phone", (Some(epoch), Some(1))).await;
        assert_eq!(c.take(4).await, vec![2, 3, 4, 5], "resume of {user}");
        c.assert_quiet(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_keeps_clients_and_delivery_resumes() {
    let mut sys = System::start().await;
    let edge = sys.edge(sys.edge_config("edge-rr")).await;
    let (mut c, epoch) = connect_with_log(&sys, &edge.ws_url(), "rr", "phone", "edge-rr").await;

    tokio::task::block_in_place(|| sys.redis.kill());
    tokio::time::sleep(Duration::from_millis(300)).await;
    tokio::task::block_in_place(|| sys.redis.restart()).expect("Redis restarts from its AOF");

    let mut appended = Vec::new();
    for i in 0..5 {
        let key = format!("after-restart-{i}");
        appended.push(send_retrying(&sys, "rr", &key, Duration::from_secs(15)).await);
    }
    assert_eq!(
        appended,
        vec![2, 3, 4, 5, 6],
        "the log survived the restart"
    );

    let got = notes(&mut c, 5).await;
    assert_eq!(seqs(&got), appended);
    assert!(
        got.iter().all(|n| n.epoch == epoch),
        "same epoch after the restart"
    );
    c.assert_quiet(Duration::from_millis(300)).await;
}

/// A client that gives up while its session waits on an unavailable Redis (it resumed, the
/// edge cannot read its position) must free its place: with a cap of one connection per user,
/// its next connection is admitted, not refused for the abandoned one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_while_redis_is_down_frees_its_place() {
    let mut sys = System::start().await;
    let mut config = sys.edge_config("edge-gone");
    config.max_connections_per_user = 1;
    let edge = sys.edge(config).await;
    tokio::task::block_in_place(|| sys.redis.kill());

    for attempt in 0..3 {
        let c = Client::connect(&edge.ws_url(), "gone", "phone", (None, None)).await;
        // The position read now waits on Redis; the client vanishes (no close frame).
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(c);
        // The edge sees the socket end and releases the place.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            match Client::open(&edge.ws_url(), &common::token("gone", Some("probe")), false).await {
                Ok(probe) => {
                    drop(probe);
                    break;
                }
                Err(status) => {
                    assert_eq!(status, 429, "attempt {attempt}: refused for the cap only");
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "attempt {attempt}: the abandoned session still holds the user's place after 5 s"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        // The probe, too, left while waiting: its place must be free before the next round.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Redis back: the device connects and is delivered to.
    tokio::task::block_in_place(|| sys.redis.restart()).expect("Redis restarts from its AOF");
    let seq = send_retrying(&sys, "gone", "after-restart", Duration::from_secs(15)).await;
    let mut c = Client::connect(&edge.ws_url(), "gone", "phone", (None, Some(0))).await;
    assert_eq!(c.take(1).await, vec![seq]);
}

/// A device that names no position and has no stored ack starts at the live end; a slow
/// position read (Redis failing it for a while) must not make it miss anything appended
/// once it is registered.
#[tokio::test]
async fn a_device_without_a_position_gets_everything_appended_after_it_registered() {
    let sys = System::start().await;
    let edge = sys.edge(sys.edge_config("edge-nd")).await;
    let mut admin = sys.redis_conn().await;
    // Fault: the device's position cannot be read for a while (here a foreign key of the
    // wrong type; a Redis timeout does the same), so the session retries the read.
    let acks = "gl:{nd}:a";
    let () = redis::cmd("SET")
        .arg(acks)
        .arg("not-a-hash")
        .query_async(&mut admin)
        .await
        .expect("SET");
    let mut c = Client::connect(&edge.ws_url(), "nd", "phone", (None, None)).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let _: u64 = redis::cmd("DEL")
        .arg(acks)
        .query_async(&mut admin)
        .await
        .expect("DEL");
    // The next read (every 250 ms) succeeds, then the device registers.
    sys.wait_registered("nd", "edge-nd").await;
    let (_, first) = sys.send("nd", serde_json::json!(1)).await;
    let (_, second) = sys.send("nd", serde_json::json!(2)).await;
    assert_eq!(c.take(2).await, vec![first, second]);
    c.assert_quiet(Duration::from_millis(300)).await;
}

/// The edge's per-delivery metrics are pre-registered handles (not a `counter!` per event):
/// they must be the recorder's, counting, not no-ops registered before it was installed.
#[tokio::test]
async fn the_edge_counts_deliveries_acks_and_their_latency() {
    let sys = System::start().await;
    let edge = EdgeProcess::start(&sys, "edge-count", &[]).await;
    let (mut c, _) = connect_with_log(&sys, &edge.ws_url(), "counted", "phone", "edge-count").await;
    for i in 0..3 {
        sys.send("counted", serde_json::json!(i)).await;
    }
    assert_eq!(c.take(3).await, vec![2, 3, 4]);
    // The ack is counted when the edge reads it, a moment after the client sent it.
    common::eventually("4 acks counted", Duration::from_secs(5), || async {
        metric(
            &edge.metrics(&sys.http).await,
            "gapless_edge_acks_total{transport=\"ws\"}",
        ) >= 4.0
    })
    .await;
    // Counters only grow: this later scrape holds at least as much.
    let text = edge.metrics(&sys.http).await;
    // Seq 1 was replayed at the connect (resume after 0); 2..=4 went out live.
    let live = metric(
        &text,
        "gapless_edge_delivered_total{path=\"live\",transport=\"ws\"}",
    );
    let replayed = metric(
        &text,
        "gapless_edge_delivered_total{path=\"replay\",transport=\"ws\"}",
    );
    assert_eq!((live, replayed), (3.0, 1.0), "delivered_total:\n{text}");
    // Only live deliveries are timed: a replayed entry's age is the device's absence.
    let timed = metric(&text, "gapless_edge_delivery_latency_seconds_count");
    assert_eq!(timed, 3.0, "delivery_latency_seconds_count");
}

// ---------------------------------------------------------------------------------------
// The HTTP fallbacks under faults
// ---------------------------------------------------------------------------------------

/// An edge killed under an SSE stream and a held poll: both devices resume on another edge
/// from what they received and get exactly the rest.
#[tokio::test]
async fn an_edge_killed_under_sse_and_poll_devices_loses_nothing() {
    use common::http::{Poll, Sse};
    let sys = System::start().await;
    let mut edge1 = EdgeProcess::start(&sys, "edge-h1", &[]).await;
    let edge2 = EdgeProcess::start(&sys, "edge-h2", &[]).await;
    let (epoch, _) = sys.send("sse-user", serde_json::json!(1)).await;
    let (poll_epoch, _) = sys.send("poll-user", serde_json::json!(1)).await;
    let mut s = Sse::open(
        edge1.addr,
        "sse-user",
        "phone",
        &format!("epoch={epoch}&after=0"),
        None,
    )
    .await;
    let mut p = Poll::new("poll-user", "phone", &format!("epoch={poll_epoch}&after=0"));
    assert_eq!(s.seqs(1).await, [1]);
    assert_eq!(p.seqs(edge1.addr, 1).await, [1]);
    for i in 2..=5 {
        sys.send("sse-user", serde_json::json!(i)).await;
        sys.send("poll-user", serde_json::json!(i)).await;
    }
    assert_eq!(s.seqs(4).await, [2, 3, 4, 5]);
    assert_eq!(p.seqs(edge1.addr, 4).await, [2, 3, 4, 5]);
    // A poll held on edge 1 when it dies.
    let held = tokio::spawn({
        let addr = edge1.addr;
        async move {
            reqwest::Client::new()
                .get(format!(
                    "http://{addr}/v1/poll?epoch={poll_epoch}&after=5&wait_ms=20000"
                ))
                .bearer_auth(common::token("poll-user", Some("phone")))
                .send()
                .await
        }
    });
    sys.wait_registered("poll-user", "edge-h1").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    edge1.sigkill();
    assert_eq!(s.event().await, None, "the stream ends with the edge");
    let answer = held.await.expect("the poll task");
    assert!(
        answer.is_err() || answer.is_ok_and(|r| !r.status().is_success()),
        "a killed edge answers no poll"
    );
    for i in 6..=10 {
        sys.send("sse-user", serde_json::json!(i)).await;
        sys.send("poll-user", serde_json::json!(i)).await;
    }
    // The browser's reconnect: Last-Event-ID of the last event it dispatched.
    let mut s = Sse::open(
        edge2.addr,
        "sse-user",
        "phone",
        "",
        Some(&format!("{epoch}:5")),
    )
    .await;
    assert_eq!(s.seqs(5).await, [6, 7, 8, 9, 10]);
    s.assert_quiet(Duration::from_millis(300)).await;
    assert_eq!(p.seqs(edge2.addr, 5).await, [6, 7, 8, 9, 10]);
    p.assert_quiet(edge2.addr, 300).await;
}

/// An SSE reader that stops reading is closed on the WebSocket's slow-consumer bound (the
/// socket itself by the listener's write timeout), with the edge's memory bounded, and later
/// resumes with everything.
#[tokio::test]
async fn an_sse_reader_that_stops_reading_is_closed_and_later_resumes_with_everything() {
    use common::http::Sse;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const N: usize = 2000;
    const PAD: usize = 16 << 10;
    let sys = System::start().await;
    let edge = EdgeProcess::start(
        &sys,
        "edge-sse-slow",
        &[
            // The session's bound fires first (the channel is full a second after the
            // socket is); the listener's, later, closes the socket hyper still writes to.
            // Equal bounds raced (found by a clean-clone run): either closed the reader.
            ("GAPLESS_SLOW_CONSUMER_MS", "1000"),
            ("GAPLESS_WRITE_TIMEOUT_MS", "3000"),
            ("GAPLESS_OUTBOUND_QUEUE", "16"),
        ],
    )
    .await;
    let (epoch, _) = sys.send("slow", serde_json::json!(1)).await;
    let rss_before = edge.rss_kib();
    // A raw reader that sends its request and then reads nothing.
    let mut stalled = tokio::net::TcpStream::connect(edge.addr)
        .await
        .expect("connects");
    let head = format!(
        "GET /v1/sse?epoch={epoch}&after=1 HTTP/1.1\r\nHost: edge\r\nAuthorization: Bearer {}\r\n\r\n",
        common::token("slow", Some("phone"))
    );
    stalled
        .write_all(head.as_bytes())
        .await
        .expect("request sent");
    sys.wait_registered("slow", "edge-sse-slow").await;
    let mut last = 0;
    for _ in 0..4 {
        last = sys.send_padded_batch("slow", N / 4, PAD).await;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut peak_rss = 0;
    loop {
        peak_rss = peak_rss.max(edge.rss_kib());
        let text = edge.metrics(&sys.http).await;
        let slow = metric(
            &text,
            "gapless_edge_disconnects_total{reason=\"slow_consumer\",transport=\"sse\"}",
        );
        let stalled_writes = metric(
            &text,
            "gapless_listener_refused_total{reason=\"write_timeout\"}",
        );
        if slow >= 1.0 && stalled_writes >= 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the stalled reader was never closed (slow {slow}, write timeouts {stalled_writes})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        peak_rss < rss_before + 128 * 1024,
        "the edge grew from {rss_before} KiB to {peak_rss} KiB for one stalled reader"
    );
    // The socket is closed: reading what the kernel buffered ends in EOF or a reset.
    let mut sink = vec![0u8; 1 << 20];
    let drained = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stalled.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(drained.is_ok(), "the stalled connection stays open");
    // Resumed from its position, the device gets every notification, in order.
    let mut s = Sse::open(
        edge.addr,
        "slow",
        "phone",
        &format!("epoch={epoch}&after=1"),
        None,
    )
    .await;
    let got = s.seqs(N).await;
    assert_eq!(got, (2..=last).collect::<Vec<_>>());
}

/// A wakeup lost for an SSE stream and a held poll: the sweep finds the entries within one
/// heartbeat, as for a WebSocket.
#[tokio::test]
async fn a_lost_wakeup_still_reaches_sse_and_poll_devices_within_one_heartbeat() {
    use common::http::Sse;
    let sys = System::start().await;
    let heartbeat = Duration::from_millis(1000);
    let edge = sys
        .edge(sys.edge_config("edge-lwh").with_heartbeat(heartbeat))
        .await;
    let (epoch, _) = sys.send("lw-sse", serde_json::json!(1)).await;
    let (poll_epoch, _) = sys.send("lw-poll", serde_json::json!(1)).await;
    let mut s = Sse::open(
        edge.addr,
        "lw-sse",
        "phone",
        &format!("epoch={epoch}&after=1"),
        None,
    )
    .await;
    let held = tokio::spawn({
        let addr = edge.addr;
        async move {
            let body: serde_json::Value = reqwest::Client::new()
                .get(format!(
                    "http://{addr}/v1/poll?epoch={poll_epoch}&after=1&wait_ms=20000"
                ))
                .bearer_auth(common::token("lw-poll", Some("phone")))
                .send()
                .await
                .expect("answers")
                .json()
                .await
                .expect("JSON");
            body
        }
    });
    sys.wait_registered("lw-sse", "edge-lwh").await;
    sys.wait_registered("lw-poll", "edge-lwh").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let payloads: Vec<String> = (2..=3).map(|i| format!("{{\"direct\":{i}}}")).collect();
    let appended = Instant::now();
    let (last, edges) = append_without_wakeup(&sys, "lw-sse", &payloads).await;
    assert_eq!((last, edges), (3, vec!["edge-lwh".to_owned()]));
    let (last, edges) = append_without_wakeup(&sys, "lw-poll", &payloads).await;
    assert_eq!((last, edges), (3, vec!["edge-lwh".to_owned()]));
    assert_eq!(s.seqs(2).await, [2, 3]);
    let body = held.await.expect("the poll");
    let took = appended.elapsed();
    let polled: Vec<u64> = body
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|m| m["seq"].as_u64())
        .collect();
    assert_eq!(polled[0], 2, "{body}");
    assert!(
        took <= heartbeat + heartbeat / 2,
        "the lost wakeups were covered only after {took:?} (heartbeat {heartbeat:?})"
    );
}

/// Redis restarts under an SSE stream and between polls: the stream stays open, and both
/// receive what is appended after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_keeps_sse_streams_and_polls_deliver_after_it() {
    use common::http::{Poll, Sse};
    let mut sys = System::start().await;
    let edge = sys.edge(sys.edge_config("edge-rrh")).await;
    let (epoch, _) = sys.send("rr-sse", serde_json::json!(1)).await;
    let (poll_epoch, _) = sys.send("rr-poll", serde_json::json!(1)).await;
    let mut s = Sse::open(
        edge.addr,
        "rr-sse",
        "phone",
        &format!("epoch={epoch}&after=1"),
        None,
    )
    .await;
    let mut p = Poll::new("rr-poll", "phone", &format!("epoch={poll_epoch}&after=1"));
    sys.wait_registered("rr-sse", "edge-rrh").await;

    tokio::task::block_in_place(|| sys.redis.kill());
    tokio::time::sleep(Duration::from_millis(300)).await;
    tokio::task::block_in_place(|| sys.redis.restart()).expect("Redis restarts from its AOF");

    let mut appended = Vec::new();
    for i in 0..3 {
        appended.push(
            send_retrying(&sys, "rr-sse", &format!("sse-{i}"), Duration::from_secs(15)).await,
        );
        send_retrying(
            &sys,
            "rr-poll",
            &format!("poll-{i}"),
            Duration::from_secs(15),
        )
        .await;
    }
    assert_eq!(appended, [2, 3, 4], "the log survived the restart");
    assert_eq!(s.seqs(3).await, appended);
    let deadline = Instant::now() + Duration::from_secs(15);
    let got = loop {
        // Polls refused with 503 while the edge's Redis connection comes back are retried.
        let q = p.query(1000);
        let (status, _, body) = common::http::poll_once(edge.addr, "rr-poll", "phone", &q).await;
        if status == 200 && body.as_array().is_some_and(|a| !a.is_empty()) {
            break body;
        }
        p.first_query = Some(q.replace("&wait_ms=1000", ""));
        assert!(
            Instant::now() < deadline,
            "no poll answered after the restart: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let seqs: Vec<u64> = got
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|m| m["seq"].as_u64())
        .collect();
    assert_eq!(seqs, [2, 3, 4]);
}
