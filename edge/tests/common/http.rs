//! Raw HTTP clients of the edge's fallbacks (DESIGN.md §5.1): an SSE reader that splits the
//! stream into events and checks their framing, and a long-poller, both seeing exactly what
//! the edge sends.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use gapless_shared::protocol::{self, ServerMessage};
use reqwest::StatusCode;
use serde_json::json;

use super::token;

/// One event of an SSE stream.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Event {
    pub event: String,
    pub id: Option<String>,
    pub data: String,
}

/// A raw SSE client: reads the stream and splits it into events.
pub struct Sse {
    pub response: reqwest::Response,
    pub buffer: String,
    pub events: VecDeque<Event>,
    pub retry: Option<u64>,
    pub pings: usize,
    pub epoch: Option<String>,
    pub user: String,
    pub device: String,
    pub base: String,
}

impl Sse {
    /// Opens `/v1/sse` with `query` and `last_event_id` (as the header); panics unless 200,
    /// and reads the welcome.
    pub async fn open(
        addr: SocketAddr,
        user: &str,
        device: &str,
        query: &str,
        last_event_id: Option<&str>,
    ) -> Self {
        let (status, sse) = Self::try_open(addr, user, device, query, last_event_id).await;
        assert_eq!(status, StatusCode::OK);
        let mut sse = sse.expect("a stream");
        let welcome = sse.event().await.expect("welcome");
        assert_eq!(welcome.event, "welcome");
        assert!(sse.retry.is_some(), "retry: comes first");
        sse
    }

    pub async fn try_open(
        addr: SocketAddr,
        user: &str,
        device: &str,
        query: &str,
        last_event_id: Option<&str>,
    ) -> (StatusCode, Option<Self>) {
        let base = format!("http://{}", addr);
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
    pub async fn event(&mut self) -> Option<Event> {
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
    pub async fn next(&mut self) -> Option<ServerMessage> {
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

    pub async fn seqs(&mut self, n: usize) -> Vec<u64> {
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
    pub async fn ack(&self, seq: u64) -> StatusCode {
        let epoch = self.epoch.clone().expect("an epoch seen");
        post_ack(&self.base, &self.user, &self.device, &epoch, seq).await
    }

    /// Asserts no event comes for `wait`.
    pub async fn assert_quiet(&mut self, wait: Duration) {
        if let Ok(Ok(Some(bytes))) = tokio::time::timeout(wait, self.response.chunk()).await {
            let text = String::from_utf8_lossy(&bytes);
            assert!(text.trim() == ": ping", "expected silence, got {text:?}");
        }
    }
}

pub async fn post_ack(base: &str, user: &str, device: &str, epoch: &str, seq: u64) -> StatusCode {
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
pub async fn poll_once(
    addr: SocketAddr,
    user: &str,
    device: &str,
    query: &str,
) -> (StatusCode, reqwest::header::HeaderMap, serde_json::Value) {
    let response = reqwest::Client::new()
        .get(format!("http://{}/v1/poll?{query}", addr))
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
pub struct Poll {
    pub position: Option<(String, u64)>,
    pub buffer: VecDeque<ServerMessage>,
    pub first_query: Option<String>,
    pub user: String,
    pub device: String,
}

impl Poll {
    pub fn new(user: &str, device: &str, first_query: &str) -> Self {
        Self {
            position: None,
            buffer: VecDeque::new(),
            first_query: Some(first_query.to_owned()),
            user: user.to_owned(),
            device: device.to_owned(),
        }
    }

    /// The query of the next poll: the first one as given, then the last position received.
    pub fn query(&mut self, wait_ms: u64) -> String {
        let base = match (self.first_query.take(), &self.position) {
            (Some(q), _) => q,
            (None, Some((epoch, seq))) => format!("epoch={epoch}&after={seq}"),
            (None, None) => String::new(),
        };
        format!("{base}&wait_ms={wait_ms}")
    }

    pub async fn next(&mut self, addr: SocketAddr) -> ServerMessage {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.buffer.is_empty() {
            assert!(Instant::now() < deadline, "no message within 10 s");
            let q = self.query(2_000);
            let (status, _, body) = poll_once(addr, &self.user, &self.device, &q).await;
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

    pub async fn seqs(&mut self, addr: SocketAddr, n: usize) -> Vec<u64> {
        let mut out = Vec::new();
        for _ in 0..n {
            match self.next(addr).await {
                ServerMessage::Notification(note) => out.push(note.seq),
                other => panic!("expected a notification, got {other:?}"),
            }
        }
        out
    }

    /// One more poll, with the position received so far (which acknowledges it); asserts
    /// it answers `[]` after its wait.
    pub async fn assert_quiet(&mut self, addr: SocketAddr, wait_ms: u64) {
        assert!(self.buffer.is_empty(), "{:?}", self.buffer);
        let q = self.query(wait_ms);
        let (status, _, body) = poll_once(addr, &self.user, &self.device, &q).await;
        assert_eq!((status, body), (StatusCode::OK, json!([])));
    }
}
