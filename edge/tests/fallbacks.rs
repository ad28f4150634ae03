//! The HTTP fallbacks (DESIGN.md §5.1): Server-Sent Events with `POST /v1/ack`, and
//! long-polling, with the WebSocket's guarantees: exact replay of a gap, the same start rules,
//! resets, isolation, stored acks shared across transports, and clear errors. Against a real
//! Redis, the ingest and edges in-process, with raw HTTP clients (reqwest) that see exactly
//! what the edge sends.

mod common;

use std::time::{Duration, Instant};

use common::http::{Poll, Sse, poll_once};
use common::{Client, Edge, System, eventually, token};
use gapless_shared::protocol::{ResetReason, ServerMessage};
use reqwest::StatusCode;
use serde_json::json;

/// A position no log ever had (epochs are random).
const MADE_UP_EPOCH: &str = "0000000000000000";

/// The transports a device can use.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Transport {
    Ws,
    Sse,
    Poll,
}

const ALL: [Transport; 3] = [Transport::Ws, Transport::Sse, Transport::Poll];

/// A device on one of the transports, started from an explicit position or none.
enum Device {
    Ws(Client),
    Sse(Sse),
    Poll(Poll),
}

impl Device {
    async fn connect(
        edge: &Edge,
        transport: Transport,
        user: &str,
        device: &str,
        start: Option<(&str, u64)>,
    ) -> Self {
        let query = start
            .map(|(e, s)| format!("epoch={e}&after={s}"))
            .unwrap_or_default();
        match transport {
            Transport::Ws => Device::Ws(
                Client::connect(
                    &edge.ws_url(),
                    user,
                    device,
                    (start.map(|s| s.0), start.map(|s| s.1)),
                )
                .await,
            ),
            Transport::Sse => Device::Sse(Sse::open(edge.addr, user, device, &query, None).await),
            Transport::Poll => Device::Poll(Poll::new(user, device, &query)),
        }
    }

    async fn seqs(&mut self, edge: &Edge, n: usize) -> Vec<u64> {
        match self {
            Device::Ws(c) => {
                let mut out = Vec::new();
                for _ in 0..n {
                    out.push(c.notification().await.seq);
                }
                out
            }
            Device::Sse(s) => s.seqs(n).await,
            Device::Poll(p) => p.seqs(edge.addr, n).await,
        }
    }

    /// Acks `seq` the transport's way (poll: the next poll's position).
    async fn ack(&mut self, edge: &Edge, epoch: &str, seq: u64) {
        match self {
            Device::Ws(c) => c.ack(seq).await,
            Device::Sse(s) => {
                s.epoch = Some(epoch.to_owned());
                assert_eq!(s.ack(seq).await, StatusCode::NO_CONTENT);
            }
            Device::Poll(p) => {
                // A poll naming the position acknowledges it; what it answers (the seqs
                // after it, received already) does not matter here.
                p.position = Some((epoch.to_owned(), seq));
                let q = p.query(0);
                let (status, _, _) = poll_once(edge.addr, &p.user, &p.device, &q).await;
                assert_eq!(status, StatusCode::OK);
            }
        }
    }

    async fn close(self) {
        match self {
            Device::Ws(c) => c.close().await,
            Device::Sse(s) => drop(s),
            Device::Poll(_) => {}
        }
    }
}

async fn stored_position(sys: &System, user: &str, device: &str) -> Option<(String, u64)> {
    let value: Option<String> = redis::cmd("HGET")
        .arg(format!("gl:{{{user}}}:a"))
        .arg(device)
        .query_async(&mut sys.redis_conn().await)
        .await
        .expect("HGET");
    let (epoch, seq) = gapless_edge::reader::parse_position(&value?)?;
    Some((epoch, seq))
}

async fn send_n(sys: &System, user: &str, range: std::ops::RangeInclusive<u64>) -> String {
    let mut epoch = String::new();
    for i in range {
        let (e, seq) = sys.send(user, json!(i)).await;
        assert_eq!(seq, i);
        epoch = e;
    }
    epoch
}

// ---------------------------------------------------------------------------------------
// SSE
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn sse_replays_exactly_the_gap_from_each_way_of_naming_a_position() {
    let sys = System::start().await;
    let edge = sys.edge(sys.edge_config("edge-sse")).await;
    let epoch = send_n(&sys, "alice", 1..=3).await;
    let mut s = Sse::open(
        edge.addr,
        "alice",
        "phone",
        &format!("epoch={epoch}&after=0"),
        None,
    )
    .await;
    assert_eq!(s.seqs(3).await, [1, 2, 3]);
    // Live, then the connection drops.
    sys.send("alice", json!(4)).await;
    assert_eq!(s.seqs(1).await, [4]);
    drop(s);
    send_n(&sys, "alice", 5..=7).await;
    // The header a browser's EventSource sends when it reconnects by itself.
    let id = format!("{epoch}:4");
    let mut s = Sse::open(edge.addr, "alice", "phone", "", Some(&id)).await;
    assert_eq!(s.seqs(3).await, [5, 6, 7]);
    s.assert_quiet(Duration::from_millis(300)).await;
    drop(s);
    // The query form, for a first connect (a browser cannot set the header).
    let mut s = Sse::open(
        edge.addr,
        "alice",
        "phone",
        &format!("last_event_id={epoch}:5"),
        None,
    )
    .await;
    assert_eq!(s.seqs(2).await, [6, 7]);
    drop(s);
    // The header wins over the query.
    let mut s = Sse::open(
        edge.addr,
        "alice",
        "phone",
        &format!("last_event_id={epoch}:1"),
        Some(&format!("{epoch}:6")),
    )
    .await;
    assert_eq!(s.seqs(1).await, [7]);
    s.assert_quiet(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn sse_acks_by_post_are_stored_and_a_named_position_acknowledges() {
    let sys = System::start().await;
    let mut config = sys.edge_config("edge-sse");
    config.ack_flush = Duration::from_millis(50);
    let edge = sys.edge(config).await;
    let epoch = send_n(&sys, "alice", 1..=5).await;
    let mut s = Sse::open(
        edge.addr,
        "alice",
        "phone",
        &format!("epoch={epoch}&after=0"),
        None,
    )
    .await;
    assert_eq!(s.seqs(5).await, [1, 2, 3, 4, 5]);
    assert_eq!(s.ack(3).await, StatusCode::NO_CONTENT);
    let at = |seq| Some((epoch.clone(), seq));
    eventually("the ack is stored", Duration::from_secs(5), || async {
        stored_position(&sys, "alice", "phone").await == at(3)
    })
    .await;
    // Beyond what was sent: 409 with a JSON error, nothing stored.
    assert_eq!(s.ack(6).await, StatusCode::CONFLICT);
    // An older ack never moves the position back.
    assert_eq!(s.ack(2).await, StatusCode::NO_CONTENT);
    drop(s);
    // No position: the stored ack.
    let mut s = Sse::open(edge.addr, "alice", "phone", "", None).await;
    assert_eq!(s.seqs(2).await, [4, 5]);
    drop(s);
    // Reconnecting with a position acknowledges it.
    let _s = Sse::open(edge.addr, "alice", "phone", "", Some(&format!("{epoch}:5"))).await;
    eventually(
        "the named position is stored",
        Duration::from_secs(5),
        || async { stored_position(&sys, "alice", "phone").await == at(5) },
    )
    .await;
}

#[tokio::test]
async fn sse_new_device_starts_at_the_live_end_and_users_are_isolated() {
    let sys = System::start().await;
    let edge = sys.edge(sys.edge_config("edge-sse")).await;
    send_n(&sys, "alice", 1..=3).await;
    let mut alice = Sse::open(edge.addr, "alice", "new-tab", "", None).await;
    let mut bob = Sse::open(edge.addr, "bob", "new-tab", "", None).await;
    sys.wait_registered("alice", "edge-sse").await;
    sys.wait_registered("bob", "edge-sse").await;
    alice.assert_quiet(Duration::from_millis(300)).await;
    sys.send("alice", json!({"for": "alice"})).await;
    sys.send("bob", json!({"for": "bob"})).await;
    match alice.next().await {
        Some(ServerMessage::Notification(n)) => {
            assert_eq!((n.seq, n.payload.get()), (4, r#"{"for":"alice"}"#))
        }
        other => panic!("{other:?}"),
    }
    match bob.next().await {
        Some(ServerMessage::Notification(n)) => {
            assert_eq!((n.seq, n.payload.get()), (1, r#"{"for":"bob"}"#))
        }
        other => panic!("{other:?}"),
    }
    alice.assert_quiet(Duration::from_millis(200)).await;
    bob.assert_quiet(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn sse_resets_when_the_gap_was_trimmed_or_the_epoch_changed() {
    let sys = System::start_with(|c| c.retention.max_len = 100).await;
    let edge = sys.edge(sys.edge_config("edge-sse")).await;
    sys.send_batch("alice", 1_000).await;
    let epoch: String = redis::cmd("HGET")
        .arg("gl:{alice}:m")
        .arg("epoch")
        .query_async(&mut sys.redis_conn().await)
        .await
        .expect("HGET");
    let mut s = Sse::open(
        edge.addr,
        "alice",
        "phone",
        &format!("epoch={epoch}&after=5"),
        None,
    )
    .await;
    let first = match s.next().await {
        Some(ServerMessage::Reset {
            epoch: e,
            first_seq,
            reason: ResetReason::GapTrimmed,
        }) => {
            assert_eq!(e, epoch);
            first_seq
        }
        other => panic!("expected a gap_trimmed reset, got {other:?}"),
    };
    assert!(first > 6);
    let n = (1_000 - first + 1) as usize;
    assert_eq!(s.seqs(n).await, (first..=1_000).collect::<Vec<_>>());
    drop(s);
    let mut s = Sse::open(
        edge.addr,
        "alice",
        "phone",
        "",
        Some(&format!("{MADE_UP_EPOCH}:3")),
    )
    .await;
    assert_eq!(
        s.next().await,
        Some(ServerMessage::Reset {
            epoch: epoch.clone(),
            first_seq: first,
            reason: ResetReason::EpochChanged,
        })
    );
}

#[tokio::test]
async fn sse_streams_ping_when_quiet_and_drain_ends_them_with_a_reconnect_event() {
    let sys = System::start().await;
    let mut config = sys
        .edge_config("edge-sse")
        .with_heartbeat(Duration::from_millis(400));
    config.drain_window = Duration::from_millis(200);
    config.sse_retry = Duration::from_millis(700);
    let edge = sys.edge(config).await;
    let mut s = Sse::open(edge.addr, "alice", "phone", "", None).await;
    let retry = s.retry.expect("retry");
    assert!((700..=1400).contains(&retry), "retry {retry}");
    // A quiet stream is pinged by comments, and silence from an SSE client (which never
    // sends) does not drop it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    edge.stop.cancel();
    let last = s
        .event()
        .await
        .expect("the stream ends with a reconnect event");
    assert!(s.pings >= 2, "pings: {}", s.pings);
    assert_eq!(last.event, "reconnect");
    let data: serde_json::Value = serde_json::from_str(&last.data).expect("JSON");
    let delay = data["delay_ms"].as_u64().expect("a delay");
    assert_eq!(s.retry, Some(delay), "retry: carries the same delay");
    assert_eq!(s.event().await, None, "and the stream ends");
}

#[tokio::test]
async fn drain_ends_held_polls_with_an_empty_answer_at_once() {
    let sys = System::start().await;
    let mut config = sys.edge_config("edge-poll-drain");
    config.drain_window = Duration::from_millis(200);
    let edge = sys.edge(config).await;
    let epoch = send_n(&sys, "alice", 1..=1).await;
    let addr = edge.addr;
    let held = tokio::spawn(async move {
        let started = Instant::now();
        let answer = poll_once(
            addr,
            "alice",
            "phone",
            &format!("epoch={epoch}&after=1&wait_ms=20000"),
        )
        .await;
        (answer, started.elapsed())
    });
    sys.wait_registered("alice", "edge-poll-drain").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    edge.stop.cancel();
    let ((status, _, body), took) = held.await.expect("the poll");
    assert_eq!((status, body), (StatusCode::OK, json!([])));
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[tokio::test]
async fn sse_bad_requests_get_clear_errors_before_any_stream() {
    let sys = System::start().await;
    let edge = sys.edge(sys.edge_config("edge-sse")).await;
    let epoch = send_n(&sys, "alice", 1..=2).await;
    let base = format!("http://{}", edge.addr);
    let http = reqwest::Client::new();
    let ahead = format!("{epoch}:9");
    let error = |body: &serde_json::Value| body["error"]["code"].as_str().unwrap_or("").to_owned();
    let cases: Vec<(String, Option<&str>, bool, StatusCode, &str)> = vec![
        (
            "".into(),
            None,
            false,
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
        (
            "".into(),
            Some("nonsense"),
            true,
            StatusCode::BAD_REQUEST,
            "invalid_last_event_id",
        ),
        (
            "last_event_id=17".into(),
            None,
            true,
            StatusCode::BAD_REQUEST,
            "invalid_last_event_id",
        ),
        (
            "after=x".into(),
            None,
            true,
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        (
            format!("epoch={epoch}"),
            None,
            true,
            StatusCode::BAD_REQUEST,
            "invalid_position",
        ),
        (
            format!("epoch={epoch}&after=3"),
            None,
            true,
            StatusCode::CONFLICT,
            "position_ahead",
        ),
        (
            "".into(),
            Some(&*ahead),
            true,
            StatusCode::CONFLICT,
            "position_ahead",
        ),
    ];
    for (query, header, authed, status, code) in cases {
        let mut request = http.get(format!("{base}/v1/sse?{query}"));
        if authed {
            request = request.bearer_auth(token("alice", Some("phone")));
        }
        if let Some(h) = header {
            request = request.header("last-event-id", h);
        }
        let response = request.send().await.expect("answers");
        assert_eq!(response.status(), status, "{query} {header:?}");
        let body: serde_json::Value = response.json().await.expect("a JSON error");
        assert_eq!(error(&body), code, "{query} {header:?}: {body}");
    }
    // Acks: malformed, beyond the log, without a device.
    let post = |body: serde_json::Value, device: Option<&'static str>| {
        http.post(format!("{base}/v1/ack"))
            .bearer_auth(token("alice", device))
            .json(&body)
            .send()
    };
    let r = post(json!({"seq": 1}), Some("phone"))
        .await
        .expect("answers");
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = post(json!({"epoch": epoch, "seq": 3}), Some("phone"))
        .await
        .expect("answers");
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let r = post(json!({"epoch": epoch, "seq": 1}), None)
        .await
        .expect("answers");
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = post(json!({"epoch": epoch, "seq": 2}), Some("phone"))
        .await
        .expect("answers");
    assert_eq!(
        r.status(),
        StatusCode::NO_CONTENT,
        "an ack of what the log holds"
    );
}

// ---------------------------------------------------------------------------------------
// Long-polling
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn poll_replays_exactly_the_gap_and_acknowledges_what_it_names() {
    let sys = System::start().await;
    let mut config = sys.edge_config("edge-poll");
    config.ack_flush = Duration::from_millis(50);
    let edge = sys.edge(config).await;
    let epoch = send_n(&sys, "alice", 1..=5).await;
    let (status, headers, body) = poll_once(
        edge.addr,
        "alice",
        "phone",
        &format!("epoch={epoch}&after=2"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["gapless-device"], "phone");
    assert_eq!(headers["gapless-edge"], "edge-poll");
    let seqs: Vec<u64> = body
        .as_array()
        .expect("array")
        .iter()
        .map(|m| {
            assert_eq!(m["type"], "notification");
            m["seq"].as_u64().expect("seq")
        })
        .collect();
    assert_eq!(seqs, [3, 4, 5]);
    let at = |seq| Some((epoch.clone(), seq));
    eventually(
        "the named position is stored",
        Duration::from_secs(5),
        || async { stored_position(&sys, "alice", "phone").await == at(2) },
    )
    .await;
    // `limit` bounds an answer; the next poll goes on from what was received.
    let (_, _, body) = poll_once(
        edge.addr,
        "alice",
        "phone",
        &format!("epoch={epoch}&after=3&limit=1"),
    )
    .await;
    assert_eq!(body.as_array().map(Vec::len), Some(1));
    assert_eq!(body[0]["seq"], 4);
    // No position: the stored one (3, named by the last poll).
    let mut p = Poll::new("alice", "phone", "");
    assert_eq!(p.seqs(edge.addr, 2).await, [4, 5]);
    p.assert_quiet(edge.addr, 200).await;
    eventually(
        "the last poll's position is stored",
        Duration::from_secs(5),
        || async { stored_position(&sys, "alice", "phone").await == at(5) },
    )
    .await;
}

#[tokio::test]
async fn a_held_poll_returns_as_soon_as_something_is_appended() {
    let sys = System::start().await;
    let edge = sys.edge(sys.edge_config("edge-poll")).await;
    let epoch = send_n(&sys, "alice", 1..=1).await;
    let query = format!("epoch={epoch}&after=1&wait_ms=20000");
    let edge_addr = edge.addr;
    let held = tokio::spawn(async move {
        let started = Instant::now();
        let response = reqwest::Client::new()
            .get(format!("http://{edge_addr}/v1/poll?{query}"))
            .bearer_auth(token("alice", Some("phone")))
            .send()
            .await
            .expect("answers");
        let body: serde_json::Value = response.json().await.expect("JSON");
        (body, started.elapsed())
    });
    sys.wait_registered("alice", "edge-poll").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let appended = Instant::now();
    sys.send("alice", json!("now")).await;
    let (body, _) = held.await.expect("the poll task");
    let after_append = appended.elapsed();
    assert_eq!(body[0]["seq"], 2, "{body}");
    assert_eq!(body[0]["payload"], "now");
    // Woken by the wakeup, not by a timer or the sweep (15 s here).
    assert!(after_append < Duration::from_secs(2), "{after_append:?}");
}

#[tokio::test]
async fn a_second_poll_of_a_device_ends_the_first_with_an_empty_answer() {
    let sys = System::start().await;
    let edge = sys.edge(sys.edge_config("edge-poll")).await;
    let epoch = send_n(&sys, "alice", 1..=1).await;
    let query = format!("epoch={epoch}&after=1&wait_ms=20000");
    let edge_addr = edge.addr;
    let q = query.clone();
    let first = tokio::spawn(async move {
        let started = Instant::now();
        let body: serde_json::Value = reqwest::Client::new()
            .get(format!("http://{edge_addr}/v1/poll?{q}"))
            .bearer_auth(token("alice", Some("phone")))
            .send()
            .await
            .expect("answers")
            .json()
            .await
            .expect("JSON");
        (body, started.elapsed())
    });
    sys.wait_registered("alice", "edge-poll").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = tokio::spawn({
        let edge_addr = edge.addr;
        async move {
            reqwest::Client::new()
                .get(format!("http://{edge_addr}/v1/poll?{query}"))
                .bearer_auth(token("alice", Some("phone")))
                .send()
                .await
                .expect("answers")
                .json::<serde_json::Value>()
                .await
                .expect("JSON")
        }
    });
    let (body, took) = first.await.expect("first poll");
    assert_eq!(body, json!([]));
    assert!(took < Duration::from_secs(5), "{took:?}");
    // The second is the one held now, and gets the next append.
    tokio::time::sleep(Duration::from_millis(100)).await;
    sys.send("alice", json!(2)).await;
    let body = second.await.expect("second poll");
    assert_eq!(body[0]["seq"], 2);
    // An empty wait answers [] after it.
    let started = Instant::now();
    let (status, _, body) = poll_once(
        edge.addr,
        "alice",
        "phone",
        &format!("epoch={epoch}&after=2&wait_ms=300"),
    )
    .await;
    assert_eq!((status, body), (StatusCode::OK, json!([])));
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn poll_new_device_starts_at_the_live_end_stored_at_once_and_users_are_isolated() {
    let sys = System::start().await;
    let mut config = sys.edge_config("edge-poll");
    config.ack_flush = Duration::from_millis(50);
    let edge = sys.edge(config).await;
    let epoch = send_n(&sys, "alice", 1..=3).await;
    let (_, _, body) = poll_once(edge.addr, "alice", "new", "wait_ms=100").await;
    assert_eq!(body, json!([]));
    let at_three = Some((epoch.clone(), 3));
    eventually(
        "the live end is stored at once",
        Duration::from_secs(5),
        || async { stored_position(&sys, "alice", "new").await == at_three },
    )
    .await;
    sys.send("alice", json!({"for": "alice"})).await;
    sys.send("bob", json!({"for": "bob"})).await;
    // The next poll without a position continues from the stored live end.
    let mut alice = Poll::new("alice", "new", "");
    let mut bob = Poll::new("bob", "tab", "after=0");
    match alice.next(edge.addr).await {
        ServerMessage::Notification(n) => {
            assert_eq!((n.seq, n.payload.get()), (4, r#"{"for":"alice"}"#))
        }
        other => panic!("{other:?}"),
    }
    match bob.next(edge.addr).await {
        ServerMessage::Notification(n) => {
            assert_eq!((n.seq, n.payload.get()), (1, r#"{"for":"bob"}"#))
        }
        other => panic!("{other:?}"),
    }
    alice.assert_quiet(edge.addr, 200).await;
    bob.assert_quiet(edge.addr, 200).await;
}

#[tokio::test]
async fn poll_resets_when_the_gap_was_trimmed_or_the_epoch_changed() {
    let sys = System::start_with(|c| c.retention.max_len = 100).await;
    let edge = sys.edge(sys.edge_config("edge-poll")).await;
    sys.send_batch("alice", 1_000).await;
    let epoch: String = redis::cmd("HGET")
        .arg("gl:{alice}:m")
        .arg("epoch")
        .query_async(&mut sys.redis_conn().await)
        .await
        .expect("HGET");
    let mut p = Poll::new(
        "alice",
        "phone",
        &format!("epoch={epoch}&after=5&limit=1000"),
    );
    let first = match p.next(edge.addr).await {
        ServerMessage::Reset {
            epoch: e,
            first_seq,
            reason: ResetReason::GapTrimmed,
        } => {
            assert_eq!(e, epoch);
            first_seq
        }
        other => panic!("expected a gap_trimmed reset, got {other:?}"),
    };
    let n = (1_000 - first + 1) as usize;
    assert_eq!(
        p.seqs(edge.addr, n).await,
        (first..=1_000).collect::<Vec<_>>()
    );
    let mut p = Poll::new("alice", "phone", &format!("epoch={MADE_UP_EPOCH}&after=3"));
    assert_eq!(
        p.next(edge.addr).await,
        ServerMessage::Reset {
            epoch: epoch.clone(),
            first_seq: first,
            reason: ResetReason::EpochChanged,
        }
    );
}

#[tokio::test]
async fn poll_bad_requests_get_clear_errors() {
    let sys = System::start().await;
    let edge = sys.edge(sys.edge_config("edge-poll")).await;
    let epoch = send_n(&sys, "alice", 1..=2).await;
    let base = format!("http://{}", edge.addr);
    let http = reqwest::Client::new();
    let cases: Vec<(String, Option<Option<&str>>, StatusCode, &str)> = vec![
        ("".into(), None, StatusCode::UNAUTHORIZED, "unauthorized"),
        (
            "".into(),
            Some(None),
            StatusCode::BAD_REQUEST,
            "device_required",
        ),
        (
            "wait_ms=60001".into(),
            Some(Some("phone")),
            StatusCode::BAD_REQUEST,
            "invalid_wait_ms",
        ),
        (
            "limit=0".into(),
            Some(Some("phone")),
            StatusCode::BAD_REQUEST,
            "invalid_limit",
        ),
        (
            "limit=1001".into(),
            Some(Some("phone")),
            StatusCode::BAD_REQUEST,
            "invalid_limit",
        ),
        (
            "after=-1".into(),
            Some(Some("phone")),
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        (
            format!("epoch={epoch}"),
            Some(Some("phone")),
            StatusCode::BAD_REQUEST,
            "invalid_position",
        ),
        (
            format!("epoch={epoch}&after=3"),
            Some(Some("phone")),
            StatusCode::CONFLICT,
            "position_ahead",
        ),
    ];
    for (query, auth, status, code) in cases {
        let mut request = http.get(format!("{base}/v1/poll?{query}&wait_ms=0"));
        if query.contains("wait_ms") {
            request = http.get(format!("{base}/v1/poll?{query}"));
        }
        if let Some(device) = auth {
            request = request.bearer_auth(token("alice", device));
        }
        let response = request.send().await.expect("answers");
        assert_eq!(response.status(), status, "{query}");
        let body: serde_json::Value = response.json().await.expect("a JSON error");
        assert_eq!(body["error"]["code"], code, "{query}: {body}");
    }
}

// ---------------------------------------------------------------------------------------
// Across transports
// ---------------------------------------------------------------------------------------

/// A device acks up to N on one transport and resumes on another without a position:
/// delivery starts at N+1, for every ordered pair.
#[tokio::test]
async fn a_device_switching_transport_resumes_after_its_last_ack_for_every_pair() {
    let sys = System::start().await;
    let mut config = sys.edge_config("edge-mixed");
    config.ack_flush = Duration::from_millis(20);
    let edge = sys.edge(config).await;
    for from in ALL {
        for to in ALL {
            if from == to {
                continue;
            }
            let user = format!("switch-{from:?}-{to:?}").to_lowercase();
            let epoch = send_n(&sys, &user, 1..=4).await;
            let mut d = Device::connect(&edge, from, &user, "phone", Some((&epoch, 0))).await;
            assert_eq!(d.seqs(&edge, 4).await, [1, 2, 3, 4], "{from:?}");
            d.ack(&edge, &epoch, 3).await;
            let three = Some((epoch.clone(), 3));
            eventually("the ack is stored", Duration::from_secs(5), || async {
                stored_position(&sys, &user, "phone").await == three
            })
            .await;
            d.close().await;
            send_n(&sys, &user, 5..=6).await;
            let mut d = Device::connect(&edge, to, &user, "phone", None).await;
            assert_eq!(d.seqs(&edge, 3).await, [4, 5, 6], "{from:?} -> {to:?}");
            d.close().await;
        }
    }
}

#[tokio::test]
async fn cors_answers_listed_origins_only() {
    let sys = System::start().await;
    let mut config = sys.edge_config("edge-cors");
    config.cors_origins = vec!["https://app.example.com".into()];
    let edge = sys.edge(config).await;
    let http = reqwest::Client::new();
    for path in ["/v1/sse", "/v1/poll", "/v1/ack", "/v1/ws"] {
        let preflight = |origin: &str| {
            http.request(
                reqwest::Method::OPTIONS,
                format!("http://{}{path}", edge.addr),
            )
            .header("origin", origin)
            .header("access-control-request-method", "GET")
            .header("access-control-request-headers", "authorization")
            .send()
        };
        let ok = preflight("https://app.example.com").await.expect("answers");
        assert_eq!(
            ok.headers()
                .get("access-control-allow-origin")
                .map(|v| v.to_str().unwrap_or("")),
            Some("https://app.example.com"),
            "{path}"
        );
        let other = preflight("https://evil.example.com")
            .await
            .expect("answers");
        assert!(
            other.headers().get("access-control-allow-origin").is_none(),
            "{path}: {:?}",
            other.headers()
        );
    }
    // The answers themselves carry it too, so the page can read the stream.
    let response = http
        .get(format!("http://{}/v1/poll?wait_ms=0", edge.addr))
        .header("origin", "https://app.example.com")
        .bearer_auth(token("alice", Some("phone")))
        .send()
        .await
        .expect("answers");
    assert_eq!(
        response.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    // A page whose WebSocket failed fetches the same URL to read why (browsers show 1006).
    let refused = http
        .get(format!("http://{}/v1/ws?token=forged", edge.addr))
        .header("origin", "https://app.example.com")
        .send()
        .await
        .expect("answers");
    assert_eq!(refused.status(), 401);
    assert_eq!(
        refused.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    let body: serde_json::Value = refused.json().await.expect("a JSON error");
    assert_eq!(body["error"]["code"], "unauthorized", "{body}");
    let response = http
        .get(format!("http://{}/v1/poll?wait_ms=0", edge.addr))
        .header("origin", "https://evil.example.com")
        .bearer_auth(token("alice", Some("phone")))
        .send()
        .await
        .expect("answers");
    assert!(
        response
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
}
