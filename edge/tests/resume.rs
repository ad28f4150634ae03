//! Resume, replay, resets, isolation, authentication and protocol errors of the edge
//! (DESIGN.md §1.3–1.5, §2, §5), against a real Redis, the ingest and edges in-process.

mod common;

use gapless_shared::on_both;

use std::ops::RangeInclusive;
use std::time::Duration;

use common::{Client, SECRET, System, eventually, token};
use futures_util::{SinkExt, StreamExt};
use gapless_shared::protocol::{ClientMessage, Notification, ResetReason, ServerMessage};
use gapless_shared::token::{Claims, mint_hs256};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use tokio::sync::{RwLock, RwLockReadGuard, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

/// VmRSS belongs to the whole test process and libtest runs tests on parallel threads: the
/// memory test holds this for writing, every other test for reading, so nothing else runs
/// while memory is measured.
static PROCESS_MEMORY: RwLock<()> = RwLock::const_new(());

/// Lets this test run beside the others, but never beside the memory test.
async fn share_the_process() -> RwLockReadGuard<'static, ()> {
    PROCESS_MEMORY.read().await
}

/// Acks are sent every this many notifications in long replays.
const ACK_EVERY: u64 = 1000;

/// A position no log ever had (epochs are random).
const MADE_UP_EPOCH: &str = "0000000000000000";

/// Reads exactly the notifications `seqs`, in order, acking every [`ACK_EVERY`] and the last,
/// and hands each to `inspect`.
async fn read_exactly(
    c: &mut Client,
    seqs: RangeInclusive<u64>,
    mut inspect: impl FnMut(&Notification),
) {
    let last = *seqs.end();
    for expected in seqs {
        let n = c.notification().await;
        assert_eq!(n.seq, expected, "notifications out of order or missing");
        inspect(&n);
        if expected % ACK_EVERY == 0 || expected == last {
            c.ack(expected).await;
        }
    }
}

/// Resident memory of this process, bytes.
fn vm_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("Linux has /proc/self/status");
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("a VmRSS line in kB");
    kib * 1024
}

async fn hget(sys: &System, key: &str, field: &str) -> Option<String> {
    redis::cmd("HGET")
        .arg(key)
        .arg(field)
        .query_async(&mut sys.redis_conn().await)
        .await
        .expect("HGET")
}

/// True when `edge` holds a registry entry of `user`.
/// A device's stored ack position, `(epoch, seq)`, whatever the stored form.
async fn stored_position(sys: &System, key: &str, device: &str) -> Option<(String, u64)> {
    hget(sys, key, device)
        .await
        .as_deref()
        .and_then(gapless_edge::reader::parse_position)
}

/// The close frame's code and reason (`None` if the socket just ended); panics on a data
/// frame before it.
async fn close_frame(c: &mut Client) -> Option<(u16, String)> {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(20), c.ws.next())
            .await
            .expect("closed within 20 s");
        match frame {
            Some(Ok(Message::Close(Some(CloseFrame { code, reason })))) => {
                return Some((code.into(), reason.as_str().to_owned()));
            }
            Some(Ok(Message::Close(None))) | None | Some(Err(_)) => return None,
            Some(Ok(data @ (Message::Text(_) | Message::Binary(_)))) => {
                panic!("expected the close frame, got {data:?}")
            }
            Some(Ok(_)) => {}
        }
    }
}

/// Asserts that the next frame is the close frame of `code`, with a reason.
async fn assert_closed_with(c: &mut Client, code: u16, case: &str) {
    let (got, reason) = close_frame(c)
        .await
        .unwrap_or_else(|| panic!("{case}: the socket ended without a close frame"));
    assert_eq!(got, code, "{case}: close code (reason: {reason:?})");
    assert!(!reason.is_empty(), "{case}: the close frame names a reason");
}

// ---------------------------------------------------------------------------------------
// Long replays
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_50000_entry_gap_is_replayed_completely_in_order_with_bounded_memory() {
    const TOTAL: u64 = 50_000;
    // ~1 KiB a payload: the gap is ~50 MiB of payload alone.
    const PAD: usize = 1000;
    // The ingest runs in this process too. Its request buffers, once freed, stay with the
    // allocator and would be reused by an edge that buffered the gap, hiding the growth: with
    // 10,000-item (10 MiB) batches, a client holding all 50,000 notifications grew the
    // resident size by only 46 MiB. Batches of 1,000 keep that pool small; holding the whole
    // gap then grows it by ~50 MiB.
    const PER_BATCH: u64 = 1_000;
    // What an edge legitimately holds for one replaying connection is one page (200 entries,
    // ~200 KiB, read and queued), the writer's queue (64 frames) and the socket's write
    // buffer (256 KiB): about 1 MiB, and ~0.8 MiB was measured. 16 MiB leaves room for
    // allocator slack and the test's own client, and fails if even a third of the gap were
    // held anywhere. It counts bytes, not time, so it holds in debug and release builds.
    const BOUND: u64 = 16 << 20;

    let _alone = PROCESS_MEMORY.write().await;
    // Retention above the gap (the default 10,000 would trim it).
    let sys = System::start_with(|c| c.retention.max_len = 2 * TOTAL).await;
    let edge = sys.edge(sys.edge_config("edge-a")).await;
    let pad = "x".repeat(PAD);
    let mut epoch = String::new();
    for batch in 0..TOTAL / PER_BATCH {
        let first = batch * PER_BATCH + 1;
        let payloads = (first..first + PER_BATCH)
            .map(|i| json!({"i": i, "pad": pad}))
            .collect();
        let (e, seqs) = sys.send_payloads("alice", payloads).await;
        assert_eq!(seqs.first(), Some(&first));
        epoch = e;
    }

    // Measured after the appends: the ingest runs in this process too, and its request
    // buffers are not the edge's business.
    let before = vm_rss();
    let mut peak = before;
    let mut c = Client::connect(&edge.ws_url(), "alice", "phone", (Some(&epoch), Some(0))).await;
    read_exactly(&mut c, 1..=TOTAL, |n| {
        // The payload is the one appended under this seq.
        let prefix = format!("{{\"i\":{},", n.seq);
        assert!(n.payload.get().starts_with(&prefix), "seq {}", n.seq);
        assert_eq!(n.epoch, epoch);
        if n.seq % 500 == 0 {
            peak = peak.max(vm_rss());
        }
    })
    .await;
    c.assert_quiet(Duration::from_millis(300)).await;
    let growth = peak.saturating_sub(before);
    eprintln!(
        "replay of {TOTAL}: resident {} MiB before, peak {} MiB (+{} KiB)",
        before >> 20,
        peak >> 20,
        growth >> 10
    );
    assert!(
        growth < BOUND,
        "resident memory grew by {} MiB during the replay (bound {} MiB)",
        growth >> 20,
        BOUND >> 20
    );
}

#[tokio::test]
async fn notifications_appended_during_a_replay_arrive_after_it_in_order_without_duplicates() {
    const GAP: u64 = 20_000;
    const LIVE: u64 = 500;
    let _shared = share_the_process().await;
    // Retention above the gap (the default 10,000 would trim it).
    let sys = System::start_with(|c| c.retention.max_len = 2 * GAP).await;
    let edge = sys.edge(sys.edge_config("edge-a")).await;
    let mut epoch = String::new();
    for batch in 0..GAP / 10_000 {
        let payloads = (0..10_000)
            .map(|i| json!({"i": batch * 10_000 + i}))
            .collect();
        epoch = sys.send_payloads("alice", payloads).await.0;
    }

    let mut c = Client::connect(&edge.ws_url(), "alice", "phone", (Some(&epoch), Some(0))).await;
    // Appends start once the replay has begun, and the reader keeps pace with them: at each
    // tenth of the replay it waits until as large a share of the appends is answered, so they
    // interleave with the whole replay whatever the relative speeds.
    let (started_tx, mut started_rx) = watch::channel(false);
    let (appended_tx, mut appended_rx) = watch::channel(0u64);
    let append = async {
        started_rx
            .wait_for(|started| *started)
            .await
            .expect("the reader signals");
        for k in 0..LIVE {
            let (e, seq) = sys.send("alice", json!({"live": k})).await;
            assert_eq!((e.as_str(), seq), (epoch.as_str(), GAP + 1 + k));
            appended_tx.send_replace(k + 1);
        }
    };
    let read = async {
        let mut appended_during_replay = 0;
        for expected in 1..=GAP + LIVE {
            let n = c.notification().await;
            assert_eq!(
                n.seq, expected,
                "notifications out of order, missing or repeated"
            );
            if expected > GAP {
                assert_eq!(
                    n.payload.get(),
                    format!("{{\"live\":{}}}", expected - GAP - 1)
                );
            }
            if expected == 1 {
                started_tx.send_replace(true);
            }
            if expected % (GAP / 10) == 0 && expected < GAP {
                let share = expected / (GAP / 10) * (LIVE / 10);
                appended_rx
                    .wait_for(|n| *n >= share)
                    .await
                    .expect("the appender runs");
            }
            if expected == GAP {
                appended_during_replay = *appended_rx.borrow();
            }
            if expected % ACK_EVERY == 0 {
                c.ack(expected).await;
            }
        }
        appended_during_replay
    };
    let ((), during) = tokio::join!(append, read);
    assert!(during >= LIVE * 9 / 10, "the appends overlapped the replay");
    eprintln!("{during} of the {LIVE} appends were answered during the replay");
    c.assert_quiet(Duration::from_millis(500)).await;
}

// ---------------------------------------------------------------------------------------
// Where a resume starts
// ---------------------------------------------------------------------------------------

on_both! {
async fn resume_without_position_uses_the_stored_ack(kind: Kind) {
    let _shared = share_the_process().await;
    let sys = System::start_on(kind).await;
    // Acks are written at the latest on disconnect: with a flush interval of an hour, only
    // the disconnect can write this one.
    let mut config = sys.edge_config("edge-a");
    config.ack_flush = Duration::from_secs(3600);
    let edge = sys.edge(config).await;
    let mut epoch = String::new();
    for i in 1..=5 {
        epoch = sys.send("alice", json!(i)).await.0;
    }
    let mut c = Client::connect(&edge.ws_url(), "alice", "phone", (Some(&epoch), Some(0))).await;
    for expected in 1..=5 {
        assert_eq!(c.notification().await.seq, expected);
    }
    c.ack(3).await;
    c.close().await;
    let position = Some((epoch.clone(), 3));
    eventually(
        "the ack position is stored on disconnect",
        Duration::from_secs(5),
        || async { stored_position(&sys, "gl:{alice}:a", "phone").await == position },
    )
    .await;

    sys.send("alice", json!(6)).await;
    sys.send("alice", json!(7)).await;
    let mut c = Client::connect(&edge.ws_url(), "alice", "phone", (None, None)).await;
    assert_eq!(c.take(4).await, vec![4, 5, 6, 7]);
    c.assert_quiet(Duration::from_millis(300)).await;
}
}

on_both! {
async fn a_new_device_starts_at_the_live_end(kind: Kind) {
    let _shared = share_the_process().await;
    let sys = System::start_on(kind).await;
    let edge = sys.edge(sys.edge_config("edge-a")).await;
    let mut epoch = String::new();
    for i in 1..=5 {
        epoch = sys.send("alice", json!(i)).await.0;
    }
    let mut c = Client::connect(&edge.ws_url(), "alice", "new-tablet", (None, None)).await;
    // The live end is read right after the registration. The quiet period proves that no
    // history comes, and is also far longer than that one Redis read: an append before it
    // would move the live end past itself.
    sys.wait_registered("alice", "edge-a").await;
    c.assert_quiet(Duration::from_millis(300)).await;
    sys.send("alice", json!(6)).await;
    let n = c.notification().await;
    assert_eq!((n.seq, n.epoch.as_str()), (6, epoch.as_str()));
    assert_eq!(n.payload.get(), "6");

    // A user with no log yet: the live end is the log's first entry, under the epoch that
    // the first append creates.
    let mut c = Client::connect(&edge.ws_url(), "bob", "new-tablet", (None, None)).await;
    sys.wait_registered("bob", "edge-a").await;
    c.assert_quiet(Duration::from_millis(300)).await;
    let (bob_epoch, _) = sys.send("bob", json!("first")).await;
    let n = c.notification().await;
    assert_eq!((n.seq, n.epoch.as_str()), (1, bob_epoch.as_str()));
    c.ack(1).await;
    c.assert_quiet(Duration::from_millis(200)).await;
}
}

on_both! {
/// Found by the drill: a device that connected before its user had a log, was sent the
/// log's first notification and restarted before acking it (so it resumes with no position)
/// started over at the live end and never got it.
async fn a_device_that_started_before_the_log_existed_resumes_from_its_first_entry(kind: Kind) {
    let _shared = share_the_process().await;
    let sys = System::start_on(kind).await;
    let edge = sys.edge(sys.edge_config("edge-a")).await;
    let mut c = Client::connect(&edge.ws_url(), "carol", "watch", (None, None)).await;
    sys.wait_registered("carol", "edge-a").await;
    let (epoch, _) = sys.send("carol", json!(1)).await;
    assert_eq!(c.notification().await.seq, 1);
    // Not acked: the app dies. Its start, seq 0 of the new log, is what the edge stored.
    c.close().await;
    let start = Some((epoch.clone(), 0));
    eventually(
        "the start position is stored on disconnect",
        Duration::from_secs(5),
        || async { stored_position(&sys, "gl:{carol}:a", "watch").await == start },
    )
    .await;
    sys.send("carol", json!(2)).await;
    let mut c = Client::connect(&edge.ws_url(), "carol", "watch", (None, None)).await;
    assert_eq!(c.take(2).await, vec![1, 2]);
    c.assert_quiet(Duration::from_millis(300)).await;
}
}

/// Found by the drill: a device that connected before its user had any log and was offline
/// when the log began, then restarted without a position, started at that log's live end and
/// never got what was appended while it was away.
#[tokio::test]
async fn a_device_known_before_the_log_existed_resumes_from_its_first_entry_after_a_restart() {
    let _shared = share_the_process().await;
    let sys = System::start().await;
    let edge = sys.edge(sys.edge_config("edge-a")).await;
    let c = Client::connect(&edge.ws_url(), "dora", "tv", (None, None)).await;
    sys.wait_registered("dora", "edge-a").await;
    c.close().await;
    eventually(
        "the start marker is stored on disconnect",
        Duration::from_secs(5),
        || async { hget(&sys, "gl:{dora}:a", "tv").await.as_deref() == Some(":0") },
    )
    .await;
    for i in 1..=3 {
        sys.send("dora", json!(i)).await;
    }
    let mut c = Client::connect(&edge.ws_url(), "dora", "tv", (None, None)).await;
    assert_eq!(c.take(3).await, vec![1, 2, 3]);
    c.assert_quiet(Duration::from_millis(300)).await;
}

// ---------------------------------------------------------------------------------------
// Resets
// ---------------------------------------------------------------------------------------

on_both! {
async fn reset_when_the_gap_was_trimmed(kind: Kind) {
    const TOTAL: u64 = 12_000;
    let _shared = share_the_process().await;
    // Default retention: about 10,000 entries, trimmed in whole stream nodes.
    let sys = System::start_on(kind).await;
    let edge = sys.edge(sys.edge_config("edge-a")).await;
    sys.send_batch("alice", 10_000).await;
    assert_eq!(sys.send_batch("alice", 2_000).await, TOTAL);
    let epoch = hget(&sys, "gl:{alice}:m", "epoch").await.expect("an epoch");
    let first: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg("gl:{alice}:s")
        .arg("-")
        .arg("+")
        .arg("COUNT")
        .arg(1)
        .query_async(&mut sys.redis_conn().await)
        .await
        .expect("XRANGE");
    let first_seq =
        gapless_shared::keys::parse_entry_id(&first.ids[0].id).expect("entry ids are <seq>-<ms>");
    assert!(
        first_seq > 6,
        "retention trimmed the start (first entry {first_seq})"
    );

    let mut c = Client::connect(&edge.ws_url(), "alice", "phone", (Some(&epoch), Some(5))).await;
    assert_eq!(
        c.next().await,
        Some(ServerMessage::Reset {
            epoch: epoch.clone(),
            first_seq,
            reason: ResetReason::GapTrimmed,
        })
    );
    read_exactly(&mut c, first_seq..=TOTAL, |n| assert_eq!(n.epoch, epoch)).await;
    c.assert_quiet(Duration::from_millis(300)).await;
}
}

on_both! {
async fn reset_when_the_epoch_changed(kind: Kind) {
    let _shared = share_the_process().await;
    let sys = System::start_on(kind).await;
    let edge = sys.edge(sys.edge_config("edge-a")).await;
    let mut epoch = String::new();
    for i in 1..=5 {
        epoch = sys.send("alice", json!(i)).await.0;
    }

    // A position from a log this user never had.
    let mut c = Client::connect(
        &edge.ws_url(),
        "alice",
        "phone",
        (Some(MADE_UP_EPOCH), Some(3)),
    )
    .await;
    assert_eq!(
        c.next().await,
        Some(ServerMessage::Reset {
            epoch: epoch.clone(),
            first_seq: 1,
            reason: ResetReason::EpochChanged,
        })
    );
    assert_eq!(c.take(5).await, vec![1, 2, 3, 4, 5]);
    c.assert_quiet(Duration::from_millis(200)).await;
    c.close().await;

    // The log is lost; the next append starts a new one under a new epoch.
    let _: () = redis::cmd("DEL")
        .arg("gl:{alice}:m")
        .arg("gl:{alice}:s")
        .query_async(&mut sys.redis_conn().await)
        .await
        .expect("DEL");
    let mut new_epoch = String::new();
    for i in 1..=3 {
        let (e, seq) = sys.send("alice", json!({"new": i})).await;
        assert_eq!(seq, i);
        new_epoch = e;
    }
    assert_ne!(new_epoch, epoch);
    let mut c = Client::connect(&edge.ws_url(), "alice", "phone", (Some(&epoch), Some(5))).await;
    assert_eq!(
        c.next().await,
        Some(ServerMessage::Reset {
            epoch: new_epoch.clone(),
            first_seq: 1,
            reason: ResetReason::EpochChanged,
        })
    );
    for i in 1..=3 {
        let n = c.notification().await;
        assert_eq!((n.seq, n.epoch.as_str()), (i, new_epoch.as_str()));
        assert_eq!(n.payload.get(), format!("{{\"new\":{i}}}"));
    }
    c.assert_quiet(Duration::from_millis(300)).await;
}
}

// ---------------------------------------------------------------------------------------
// Isolation and authentication
// ---------------------------------------------------------------------------------------

on_both! {
async fn a_user_never_receives_another_users_stream(kind: Kind) {
    let _shared = share_the_process().await;
    let sys = System::start_on(kind).await;
    let edge = sys.edge(sys.edge_config("edge-a")).await;
    let users = ["alice", "bob"];
    let mut clients = Vec::new();
    let mut epochs = Vec::new();
    for user in users {
        let (epoch, _) = sys.send(user, json!({"for": user, "i": 0})).await;
        let mut c = Client::connect(&edge.ws_url(), user, "phone", (Some(&epoch), Some(0))).await;
        // Delivered, so connected and registered.
        assert_eq!(c.take(1).await, vec![1]);
        clients.push(c);
        epochs.push(epoch);
    }
    assert_ne!(epochs[0], epochs[1]);
    for i in 1..=10 {
        for user in users {
            sys.send(user, json!({"for": user, "i": i})).await;
        }
    }
    for ((user, epoch), c) in users.iter().zip(&epochs).zip(&mut clients) {
        for i in 1..=10u64 {
            let n = c.notification().await;
            assert_eq!(n.seq, i + 1);
            assert_eq!(&n.epoch, epoch);
            assert_eq!(
                n.payload.get(),
                format!("{{\"for\":\"{user}\",\"i\":{i}}}"),
                "{user} received someone else's notification"
            );
            c.ack(n.seq).await;
        }
        c.assert_quiet(Duration::from_millis(200)).await;
    }
}
}

/// Base64url without padding, for hand-made tokens.
fn base64url(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

fn signed(alg: Algorithm, secret: &str, exp: u64) -> String {
    let claims = Claims {
        sub: "alice".into(),
        exp,
        device: Some("phone".into()),
        nbf: None,
        iat: None,
    };
    jsonwebtoken::encode(
        &Header::new(alg),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("signing plain claims")
}

#[tokio::test]
async fn forged_expired_and_unsigned_tokens_are_refused() {
    let _shared = share_the_process().await;
    let sys = System::start().await;
    let edge = sys.edge(sys.edge_config("edge-a")).await;
    let (epoch, _) = sys.send("alice", json!("secret")).await;
    let url = edge.ws_url();
    let now = gapless_shared::now_ms() / 1000;
    let refused = [
        (
            "forged",
            mint_hs256(
                "another-secret",
                "alice",
                Some("phone"),
                Duration::from_secs(3600),
            ),
        ),
        ("expired", signed(Algorithm::HS256, SECRET, now - 10)),
        (
            "another algorithm",
            signed(Algorithm::HS384, SECRET, now + 3600),
        ),
        (
            "alg none",
            format!(
                "{}.{}.",
                base64url(br#"{"alg":"none","typ":"JWT"}"#),
                base64url(format!(r#"{{"sub":"alice","exp":{}}}"#, now + 3600).as_bytes())
            ),
        ),
        ("not a JWT", "not-a-token".to_owned()),
    ];
    // A person reading the refusal (the JSON body of the same URL over plain HTTP, which is
    // what the browser client reads after a failed upgrade) learns what to fix.
    let told = [
        "bad signature",
        "token expired",
        "token signed with another algorithm",
        "malformed token",
        "malformed token",
    ];
    let http = reqwest::Client::new();
    for ((case, bad), told) in refused.iter().zip(told) {
        let answer = http
            .get(format!("http://{}/v1/ws?token={bad}", edge.addr))
            .send()
            .await
            .expect("the edge answers");
        assert_eq!(answer.status(), 401, "{case}");
        let body: serde_json::Value = answer.json().await.expect("a JSON refusal");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.starts_with(told), "{case}: {body}");
    }
    for (case, bad) in &refused {
        // In the header…
        let header = Client::open(&url, bad, false).await;
        assert_eq!(header.err(), Some(401), "{case} token in the header");
        // …and in the query.
        let request = format!("{url}?token={bad}")
            .into_client_request()
            .expect("a valid URL");
        let query = Client::open_request(request, false).await;
        assert_eq!(query.err(), Some(401), "{case} token in the query");
    }
    let missing = Client::open_request(url.as_str().into_client_request().expect("url"), false);
    assert_eq!(missing.await.err(), Some(401), "no token");
    // None of them got as far as a session.
    let exists: u64 = redis::cmd("EXISTS")
        .arg("gl:{alice}:r")
        .query_async(&mut sys.redis_conn().await)
        .await
        .expect("EXISTS");
    assert_eq!(exists, 0, "a refused client was registered");

    // A valid token in the query works (browsers cannot set headers).
    let request = format!("{url}?token={}", token("alice", Some("browser")))
        .into_client_request()
        .expect("a valid URL");
    let mut c = Client::open_request(request, false)
        .await
        .expect("a valid token in the query is accepted");
    assert!(
        matches!(&c.welcome, ServerMessage::Welcome { user, device, .. } if user == "alice" && device == "browser"),
        "{:?}",
        c.welcome
    );
    c.send(&ClientMessage::Resume {
        epoch: Some(epoch),
        after: Some(0),
    })
    .await;
    assert_eq!(c.notification().await.payload.get(), r#""secret""#);
}

on_both! {
async fn two_devices_of_one_user_on_two_edges_both_receive(kind: Kind) {
    let _shared = share_the_process().await;
    let sys = System::start_on(kind).await;
    let edge_a = sys.edge(sys.edge_config("edge-a")).await;
    let edge_b = sys.edge(sys.edge_config("edge-b")).await;
    let (epoch, _) = sys.send("alice", json!(1)).await;
    let mut phone =
        Client::connect(&edge_a.ws_url(), "alice", "phone", (Some(&epoch), Some(0))).await;
    let mut laptop =
        Client::connect(&edge_b.ws_url(), "alice", "laptop", (Some(&epoch), Some(0))).await;
    // Delivered, so each is connected and registered.
    assert_eq!(phone.take(1).await, vec![1]);
    assert_eq!(laptop.take(1).await, vec![1]);
    assert!(sys.registered("alice", "edge-a").await);
    assert!(sys.registered("alice", "edge-b").await);
    for i in 2..=6 {
        sys.send("alice", json!(i)).await;
    }
    for c in [&mut phone, &mut laptop] {
        for i in 2..=6u64 {
            let n = c.notification().await;
            assert_eq!((n.seq, n.payload.get()), (i, i.to_string().as_str()));
            c.ack(i).await;
        }
        c.assert_quiet(Duration::from_millis(200)).await;
    }
}
}

// ---------------------------------------------------------------------------------------
// Protocol
// ---------------------------------------------------------------------------------------

/// The next server message, which must come in a binary frame (pings skipped).
async fn next_binary(c: &mut Client) -> ServerMessage {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), c.ws.next())
            .await
            .expect("a frame within 10 s")
            .expect("the connection is open")
            .expect("a valid frame");
        match frame {
            Message::Binary(b) => {
                let msg = ServerMessage::from_postcard(&b).expect("a postcard message");
                if msg != ServerMessage::Ping {
                    return msg;
                }
            }
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("expected a binary frame, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn postcard_subprotocol_delivers_the_same_messages() {
    let _shared = share_the_process().await;
    let sys = System::start().await;
    let edge = sys.edge(sys.edge_config("edge-a")).await;
    let payloads = vec![
        json!({"text": "héllo ✓ \"quoted\"", "n": [1, 2.5, null, true], "nested": {"a": {}}}),
        json!("a plain string"),
        json!(42),
    ];
    let (epoch, _) = sys.send_payloads("alice", payloads).await;

    let mut text = Client::connect(&edge.ws_url(), "alice", "web", (Some(&epoch), Some(0))).await;
    let mut binary = Client::open(&edge.ws_url(), &token("alice", Some("app")), true)
        .await
        .expect("connects");
    assert!(
        matches!(&binary.welcome, ServerMessage::Welcome { user, device, edge, .. }
            if user == "alice" && device == "app" && edge == "edge-a"),
        "{:?}",
        binary.welcome
    );
    binary
        .send(&ClientMessage::Resume {
            epoch: Some(MADE_UP_EPOCH.into()),
            after: Some(2),
        })
        .await;
    assert_eq!(
        next_binary(&mut binary).await,
        ServerMessage::Reset {
            epoch: epoch.clone(),
            first_seq: 1,
            reason: ResetReason::EpochChanged,
        }
    );
    for _ in 1..=3 {
        let json_msg = text.next().await.expect("a notification");
        let postcard_msg = next_binary(&mut binary).await;
        assert!(matches!(json_msg, ServerMessage::Notification(_)));
        assert_eq!(postcard_msg, json_msg);
    }
    // Acks in postcard are understood: acking what was sent keeps the connection, and the
    // live path delivers the same message on both.
    binary.ack(3).await;
    text.ack(3).await;
    sys.send("alice", json!({"live": true})).await;
    let json_msg = text.next().await.expect("a notification");
    assert_eq!(next_binary(&mut binary).await, json_msg);
    let ServerMessage::Notification(n) = json_msg else {
        panic!("expected a notification, got {json_msg:?}");
    };
    assert_eq!((n.seq, n.payload.get()), (4, r#"{"live":true}"#));
}

#[tokio::test]
async fn malformed_or_unexpected_frames_close_with_their_code() {
    let _shared = share_the_process().await;
    let sys = System::start().await;
    let edge = sys.edge(sys.edge_config("edge-a")).await;
    let mut quick = sys.edge_config("edge-quick");
    quick.resume_timeout = Duration::from_millis(300);
    let quick = sys.edge(quick).await;
    let (epoch, _) = sys
        .send_payloads("alice", vec![json!(1), json!(2), json!(3)])
        .await;
    let url = edge.ws_url();
    let resumed = || Client::connect(&url, "alice", "phone", (Some(&epoch), Some(3)));

    let mut c = resumed().await;
    c.ws.send(Message::Text(r#"{"type":"ack","#.into()))
        .await
        .expect("send");
    assert_closed_with(&mut c, 1007, "malformed JSON").await;

    let mut c = resumed().await;
    c.ws.send(Message::Binary(vec![0, 1, 2].into()))
        .await
        .expect("send");
    assert_closed_with(&mut c, 1003, "binary frame on gapless.v1.json").await;

    let mut c = Client::open(&url, &token("alice", Some("app")), true)
        .await
        .expect("connects");
    c.ws.send(Message::Text(r#"{"type":"pong"}"#.into()))
        .await
        .expect("send");
    assert_closed_with(&mut c, 1003, "text frame on gapless.v1.postcard").await;

    // A frame over the edge's 4 KiB bound, before and after the resume: 1009 with a reason,
    // not an empty close.
    for size in [5_000, 1 << 20] {
        let mut c = resumed().await;
        let _ = c.ws.send(Message::Text("x".repeat(size).into())).await;
        assert_closed_with(&mut c, 1009, "an oversized frame after resume").await;
    }
    let mut c = Client::open(&url, &token("alice", Some("phone")), false)
        .await
        .expect("connects");
    let _ = c.ws.send(Message::Binary(vec![0; 1 << 20].into())).await;
    assert_closed_with(&mut c, 1009, "an oversized frame before resume").await;

    let mut c = resumed().await;
    c.send(&ClientMessage::Resume {
        epoch: None,
        after: None,
    })
    .await;
    assert_closed_with(&mut c, 1008, "second resume").await;

    let mut c = Client::connect(&url, "alice", "phone", (Some(&epoch), Some(0))).await;
    assert_eq!(c.take(3).await, vec![1, 2, 3]);
    c.ack(4).await;
    assert_closed_with(&mut c, 1008, "ack beyond the last seq sent").await;

    let mut c = Client::open(&url, &token("alice", Some("phone")), false)
        .await
        .expect("connects");
    c.ack(1).await;
    assert_closed_with(&mut c, 1008, "ack before resume").await;

    let mut c = Client::open(&quick.ws_url(), &token("alice", Some("phone")), false)
        .await
        .expect("connects");
    let started = tokio::time::Instant::now();
    assert_closed_with(&mut c, 1008, "no resume within the resume timeout").await;
    // The configured 300 ms, not the default 10 s.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}
