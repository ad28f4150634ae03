//! The HTTP fallbacks (DESIGN.md §5.1): Server-Sent Events with `POST /v1/ack`, and
//! long-polling, with the WebSocket's guarantees: exact replay of a gap, the same start rules,
//! resets, isolation, stored acks shared across transports, and clear errors. Against a real
//! Redis, the ingest and edges in-process, with raw HTTP clients (reqwest) that see exactly
//! what the edge sends.

mod common;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use common::{Client, Edge, System, eventually, token};
use gapless_shared::protocol::{self, ResetReason, ServerMessage};
use reqwest::StatusCode;
use serde_json::json;

/// A position no log ever had (epochs are random).
const MADE_UP_EPOCH: &str = "0000000000000000";

/// One event of an SSE stream.
#[derive(Debug, Clone, Default, PartialEq)]
struct Event {
    event: String,
    id: Option<String>,
    data: String,
}

/// A raw SSE client: reads the stream and splits it into events.
struct Sse {
    response: reqwest::Response,
    buffer: String,
    events: VecDeque<Event>,
    retry: Option<u64>,
    pings: usize,
    epoch: Option<String>,
    user: String,
    device: String,
    base: String,
}

impl Sse {
    /// Opens `/v1/sse` with `query` and `last_event_id` (as the header); panics unless 200,
    /// and reads the welcome.
    async fn open(
        edge: &Edge,
        user: &str,
        device: &str,
        query: &str,
        last_event_id: Option<&str>,
    ) -> Self {
        let (status, sse) = Self::try_open(edge, user, device, query, last_event_id).await;
        assert_eq!(status, StatusCode::OK);
        let mut sse = sse.expect("a stream");
        let welcome = sse.event().await.expect("welcome");
        assert_eq!(welcome.event, "welcome");
        assert!(sse.retry.is_some(), "retry: comes first");
        sse
    }

    async fn try_open(
        edge: &Edge,
        user: &str,
        device: &str,
        query: &str,
        last_event_id: Option<&str>,
    ) -> (StatusCode, Option<Self>) {
        let base = format!("http://{}", edge.addr);
        let mut request = reqwest::Client::new()
            .get(format!("{base}/v1/sse?{query}"))
            .bearer_auth(token(user, Some(device)));
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        let response = request.send().await.expect("the edge answers");
        let status = response.status();
        if status != StatusCode::OK {
            return (status, None);
        }
        assert_eq!(
            response.headers()["content-type"],
            "text/event-stream",
            "{:?}",
            response.headers()
        );
        assert_eq!(response.headers()["cache-control"], "no-cache");
        assert_eq!(response.headers()["x-accel-buffering"], "no");
        let sse = Self {
            response,
            buffer: String::new(),
            events: VecDeque::new(),
            retry: None,
            pings: 0,
            epoch: None,
            user: user.to_owned(),
            device: device.to_owned(),
            base,
        };
        (status, Some(sse))
    }

    /// The next event; `None` when the stream ended; panics after 10 s of silence.
    async fn event(&mut self) -> Option<Event> {
        loop {
            if let Some(e) = self.events.pop_front() {
                return Some(e);
            }
            let chunk = tokio::time::timeout(Duration::from_secs(10), self.response.chunk())
                .await
                .expect("an event within 10 s");
            match chunk {
                Ok(Some(bytes)) => {
                    self.buffer
                        .push_str(std::str::from_utf8(&bytes).expect("utf-8"));
                    self.split();
                }
                Ok(None) | Err(_) => return None,
            }
        }
    }

    fn split(&mut self) {
        while let Some(end) = self.buffer.find("\n\n") {
            let block: String = self.buffer.drain(..end + 2).collect();
            let mut event = Event::default();
            let mut any = false;
            for line in block.lines() {
                if let Some(comment) = line.strip_prefix(':') {
                    assert_eq!(comment.trim(), "ping");
                    self.pings += 1;
                } else if let Some(v) = line.strip_prefix("retry: ") {
                    self.retry = Some(v.parse().expect("retry is a number"));
                } else if let Some(v) = line.strip_prefix("event: ") {
                    event.event = v.to_owned();
                    any = true;
                } else if let Some(v) = line.strip_prefix("id: ") {
                    event.id = Some(v.to_owned());
                } else if let Some(v) = line.strip_prefix("data: ") {
                    assert!(event.data.is_empty(), "one data line per event: {block:?}");
                    event.data = v.to_owned();
                } else {
                    assert!(line.is_empty(), "unexpected line {line:?}");
                }
            }
            if any {
                self.events.push_back(event);
            }
        }
    }

    /// The next notification or reset, as the WebSocket message, checking its id.
    async fn next(&mut self) -> Option<ServerMessage> {
        let e = self.event().await?;
        let msg: ServerMessage = protocol::from_json(&e.data).expect("server JSON");
        match &msg {
            ServerMessage::Notification(n) => {
                assert_eq!(e.event, "notification");
                assert_eq!(e.id, Some(format!("{}:{}", n.epoch, n.seq)));
                self.epoch = Some(n.epoch.clone());
            }
            ServerMessage::Reset {
                epoch, first_seq, ..
            } => {
                assert_eq!(e.event, "reset");
                assert_eq!(e.id, Some(format!("{epoch}:{}", first_seq - 1)));
                self.epoch = Some(epoch.clone());
            }
            other => panic!("unexpected {other:?} in {e:?}"),
        }
        Some(msg)
    }

    async fn seqs(&mut self, n: usize) -> Vec<u64> {
        let mut out = Vec::new();
        for _ in 0..n {
            match self.next().await {
                Some(ServerMessage::Notification(note)) => out.push(note.seq),
                other => panic!("expected a notification, got {other:?}"),
            }
        }
        out
    }

    /// `POST /v1/ack`; returns the status.
    async fn ack(&self, seq: u64) -> StatusCode {
        let epoch = self.epoch.clone().expect("an epoch seen");
        post_ack(&self.base, &self.user, &self.device, &epoch, seq).await
    }

    /// Asserts no event comes for `wait`.
    async fn assert_quiet(&mut self, wait: Duration) {
        if let Ok(Ok(Some(bytes))) = tokio::time::timeout(wait, self.response.chunk()).await {
            let text = String::from_utf8_lossy(&bytes);
            assert!(text.trim() == ": ping", "expected silence, got {text:?}");
        }
    }
}

async fn post_ack(base: &str, user: &str, device: &str, epoch: &str, seq: u64) -> StatusCode {
    reqwest::Client::new()
        .post(format!("{base}/v1/ack"))
        .bearer_auth(token(user, Some(device)))
        .json(&json!({"epoch": epoch, "seq": seq}))
        .send()
        .await
        .expect("the edge answers")
        .status()
}

/// One long-poll: status, headers, messages.
async fn poll_once(
    edge: &Edge,
    user: &str,
    device: &str,
    query: &str,
) -> (StatusCode, reqwest::header::HeaderMap, serde_json::Value) {
    let response = reqwest::Client::new()
        .get(format!("http://{}/v1/poll?{query}", edge.addr))
        .bearer_auth(token(user, Some(device)))
        .timeout(Duration::from_secs(70))
        .send()
        .await
        .expect("the edge answers");
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.json().await.expect("JSON");
    (status, headers, body)
}

/// A raw long-poll client: polls with the last position it received.
struct Poll {
    position: Option<(String, u64)>,
    buffer: VecDeque<ServerMessage>,
    first_query: Option<String>,
    user: String,
    device: String,
}

impl Poll {
    fn new(user: &str, device: &str, first_query: &str) -> Self {
        Self {
            position: None,
            buffer: VecDeque::new(),
            first_query: Some(first_query.to_owned()),
            user: user.to_owned(),
            device: device.to_owned(),
        }
    }

    /// The query of the next poll: the first one as given, then the last position received.
    fn query(&mut self, wait_ms: u64) -> String {
        let base = match (self.first_query.take(), &self.position) {
            (Some(q), _) => q,
            (None, Some((epoch, seq))) => format!("epoch={epoch}&after={seq}"),
            (None, None) => String::new(),
        };
        format!("{base}&wait_ms={wait_ms}")
    }

    async fn next(&mut self, edge: &Edge) -> ServerMessage {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.buffer.is_empty() {
            assert!(Instant::now() < deadline, "no message within 10 s");
            let q = self.query(2_000);
            let (status, _, body) = poll_once(edge, &self.user, &self.device, &q).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            for m in body.as_array().expect("an array") {
                let msg: ServerMessage = serde_json::from_value(m.clone()).expect("a message");
                self.buffer.push_back(msg);
            }
        }
        let msg = self.buffer.pop_front().expect("not empty");
        match &msg {
            ServerMessage::Notification(n) => self.position = Some((n.epoch.clone(), n.seq)),
            ServerMessage::Reset {
                epoch, first_seq, ..
            } => self.position = Some((epoch.clone(), first_seq - 1)),
            other => panic!("unexpected {other:?}"),
        }
        msg
    }

    async fn seqs(&mut self, edge: &Edge, n: usize) -> Vec<u64> {
        let mut out = Vec::new();
        for _ in 0..n {
            match self.next(edge).await {
                ServerMessage::Notification(note) => out.push(note.seq),
                other => panic!("expected a notification, got {other:?}"),
            }
        }
        out
    }

    /// One more poll, with the position received so far (which acknowledges it); asserts
    /// it answers `[]` after its wait.
    async fn assert_quiet(&mut self, edge: &Edge, wait_ms: u64) {
        assert!(self.buffer.is_empty(), "{:?}", self.buffer);
        let q = self.query(wait_ms);
        let (status, _, body) = poll_once(edge, &self.user, &self.device, &q).await;
        assert_eq!((status, body), (StatusCode::OK, json!([])));
    }
}

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
            Transport::Sse => Device::Sse(Sse::open(edge, user, device, &query, None).await),
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
            Device::Poll(p) => p.seqs(edge, n).await,
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
                p.position = Some((epoch.to_owned(), seq));
                p.assert_quiet(edge, 0).await;
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

async fn registered(sys: &System, user: &str, edge: &str) -> bool {
    let score: Option<f64> = redis::cmd("ZSCORE")
        .arg(format!("gl:{{{user}}}:r"))
        .arg(edge)
        .query_async(&mut sys.redis_conn().await)
        .await
        .expect("ZSCORE");
    score.is_some()
}

async fn wait_registered(sys: &System, user: &str, edge: &str) {
    eventually("registered", Duration::from_secs(5), || {
        registered(sys, user, edge)
    })
    .await;
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
        &edge,
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
    let mut s = Sse::open(&edge, "alice", "phone", "", Some(&id)).await;
    assert_eq!(s.seqs(3).await, [5, 6, 7]);
    s.assert_quiet(Duration::from_millis(300)).await;
    drop(s);
    // The query form, for a first connect (a browser cannot set the header).
    let mut s = Sse::open(
        &edge,
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
        &edge,
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
        &edge,
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
    let mut s = Sse::open(&edge, "alice", "phone", "", None).await;
    assert_eq!(s.seqs(2).await, [4, 5]);
    drop(s);
    // Reconnecting with a position acknowledges it.
    let _s = Sse::open(&edge, "alice", "phone", "", Some(&format!("{epoch}:5"))).await;
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
    let mut alice = Sse::open(&edge, "alice", "new-tab", "", None).await;
    let mut bob = Sse::open(&edge, "bob", "new-tab", "", None).await;
    wait_registered(&sys, "alice", "edge-sse").await;
    wait_registered(&sys, "bob", "edge-sse").await;
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
        &edge,
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
        &edge,
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
    let mut s = Sse::open(&edge, "alice", "phone", "", None).await;
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
    let (status, headers, body) =
        poll_once(&edge, "alice", "phone", &format!("epoch={epoch}&after=2")).await;
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
        &edge,
        "alice",
        "phone",
        &format!("epoch={epoch}&after=3&limit=1"),
    )
    .await;
    assert_eq!(body.as_array().map(Vec::len), Some(1));
    assert_eq!(body[0]["seq"], 4);
    // No position: the stored one (3, named by the last poll).
    let mut p = Poll::new("alice", "phone", "");
    assert_eq!(p.seqs(&edge, 2).await, [4, 5]);
    p.assert_quiet(&edge, 200).await;
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
    wait_registered(&sys, "alice", "edge-poll").await;
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
    wait_registered(&sys, "alice", "edge-poll").await;
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
        &edge,
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
    let (_, _, body) = poll_once(&edge, "alice", "new", "wait_ms=100").await;
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
    match alice.next(&edge).await {
        ServerMessage::Notification(n) => {
            assert_eq!((n.seq, n.payload.get()), (4, r#"{"for":"alice"}"#))
        }
        other => panic!("{other:?}"),
    }
    match bob.next(&edge).await {
        ServerMessage::Notification(n) => {
            assert_eq!((n.seq, n.payload.get()), (1, r#"{"for":"bob"}"#))
        }
        other => panic!("{other:?}"),
    }
    alice.assert_quiet(&edge, 200).await;
    bob.assert_quiet(&edge, 200).await;
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
    let first = match p.next(&edge).await {
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
    assert_eq!(p.seqs(&edge, n).await, (first..=1_000).collect::<Vec<_>>());
    let mut p = Poll::new("alice", "phone", &format!("epoch={MADE_UP_EPOCH}&after=3"));
    assert_eq!(
        p.next(&edge).await,
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
    for path in ["/v1/sse", "/v1/poll", "/v1/ack"] {
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
