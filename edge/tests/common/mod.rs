//! Test harness for the edge: a real Redis, the ingest and edges on 127.0.0.1:0, and a
//! tokio-tungstenite client speaking the protocol.
#![allow(dead_code)]

pub mod http;
pub mod process;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use gapless_edge::auth::JwtKey;
use gapless_shared::api::{Appended, BatchAnswer, ErrorBody, ItemResult};
use gapless_shared::config::Secret;
use gapless_shared::protocol::{self, ClientMessage, Notification, ServerMessage};
pub use gapless_shared::testing::{Backend, Kind};
use gapless_shared::token::mint_hs256;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

/// HS256 secret of the test edges (32 bytes, the shortest an edge accepts).
pub const SECRET: &str = "test-secret-of-thirty-two-bytes!";
pub const API_KEY: &str = "test-key";

/// A whole system: Redis (a node or a local cluster), one ingest, edges added on demand.
pub struct System {
    pub redis: Backend,
    pub ingest_url: String,
    ingest_stop: CancellationToken,
    pub http: reqwest::Client,
}

impl System {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// A system on the given kind of Redis.
    pub async fn start_on(kind: Kind) -> Self {
        Self::start_on_with(kind, |_| {}).await
    }

    /// Like [`System::start`], with the ingest's configuration adjusted by `adjust` (a
    /// longer retention, larger batches…).
    pub async fn start_with(adjust: impl FnOnce(&mut gapless_ingest::Config)) -> Self {
        Self::start_on_with(Kind::Single, adjust).await
    }

    /// [`start_with`](Self::start_with) on the given kind of Redis.
    pub async fn start_on_with(
        kind: Kind,
        adjust: impl FnOnce(&mut gapless_ingest::Config),
    ) -> Self {
        let redis = tokio::task::spawn_blocking(move || Backend::start(kind, &[]))
            .await
            .expect("the test Redis starts");
        let mut conn = gapless_shared::store::connect(&redis.config())
            .await
            .expect("redis connection");
        gapless_shared::schema::migrate(&mut conn)
            .await
            .expect("migrate");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut config = gapless_ingest::Config::new(redis.config(), vec![Secret::new(API_KEY)]);
        adjust(&mut config);
        let ingest_stop = CancellationToken::new();
        tokio::spawn(gapless_ingest::run(listener, config, ingest_stop.clone()));
        let system = Self {
            redis,
            ingest_url: format!("http://{addr}"),
            ingest_stop,
            http: reqwest::Client::new(),
        };
        system
            .wait_http(&format!("{}/readyz", system.ingest_url))
            .await;
        system
    }

    /// An edge config for this system.
    pub fn edge_config(&self, edge_id: &str) -> gapless_edge::Config {
        let mut config = gapless_edge::Config::new(
            self.redis.config(),
            edge_id.to_owned(),
            JwtKey::Hs256(Secret::new(SECRET)),
        );
        config.redis.command_timeout = Duration::from_millis(1000);
        config
    }

    /// Starts an in-process edge.
    pub async fn edge(&self, config: gapless_edge::Config) -> Edge {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stop = CancellationToken::new();
        let task = tokio::spawn(gapless_edge::run(listener, config, stop.clone()));
        let edge = Edge { addr, stop, task };
        self.wait_http(&format!("http://{addr}/readyz")).await;
        edge
    }

    pub async fn wait_http(&self, url: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = self.http.get(url).send().await
                && r.status().is_success()
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{url} never became ready"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Appends one notification; returns its seq.
    pub async fn send(&self, user: &str, payload: serde_json::Value) -> (String, u64) {
        let answer: Appended = self
            .http
            .post(format!("{}/v1/notifications", self.ingest_url))
            .bearer_auth(API_KEY)
            .json(&serde_json::json!({"user": user, "payload": payload}))
            .send()
            .await
            .expect("ingest answers")
            .error_for_status()
            .expect("200")
            .json()
            .await
            .expect("an append's answer");
        (answer.epoch, answer.seq)
    }

    /// Appends `n` notifications in one batch; returns the last seq.
    pub async fn send_batch(&self, user: &str, n: usize) -> u64 {
        self.send_padded_batch(user, n, 0).await
    }

    /// Posts `items` as one batch and expects 200; returns each item's result, in order
    /// (one per item, or it panics).
    pub async fn post_batch(
        &self,
        items: &[serde_json::Value],
    ) -> Vec<Result<Appended, ErrorBody>> {
        let answer: BatchAnswer = self
            .http
            .post(format!("{}/v1/notifications/batch", self.ingest_url))
            .bearer_auth(API_KEY)
            .json(items)
            .send()
            .await
            .expect("ingest answers")
            .error_for_status()
            .expect("200")
            .json()
            .await
            .expect("a batch answer");
        assert_eq!(answer.results.len(), items.len(), "one result per item");
        answer
            .results
            .into_iter()
            .map(ItemResult::into_result)
            .collect()
    }

    /// Appends `n` notifications with `pad` bytes of padding each (none when 0), in one batch;
    /// returns the last seq.
    pub async fn send_padded_batch(&self, user: &str, n: usize, pad: usize) -> u64 {
        let padding = "x".repeat(pad);
        let items: Vec<serde_json::Value> = (0..n)
            .map(|i| match pad {
                0 => serde_json::json!({"user": user, "payload": {"i": i}}),
                _ => serde_json::json!({"user": user, "payload": {"i": i, "pad": padding}}),
            })
            .collect();
        let results = self.post_batch(&items).await;
        match results.last() {
            Some(Ok(appended)) => appended.seq,
            other => panic!("the last item appended: {other:?}"),
        }
    }

    /// A new connection to the system's Redis (the node, or the cluster).
    pub async fn redis_conn(&self) -> gapless_shared::store::Store {
        gapless_shared::store::connect(&self.redis.config())
            .await
            .expect("redis connection")
    }
}

impl Drop for System {
    fn drop(&mut self) {
        self.ingest_stop.cancel();
    }
}

/// An in-process edge.
pub struct Edge {
    pub addr: SocketAddr,
    pub stop: CancellationToken,
    pub task: JoinHandle<Result<(), gapless_edge::RunError>>,
}

impl Edge {
    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/ws", self.addr)
    }

    /// Stops the edge abruptly: every socket dropped, nothing flushed or unregistered.
    pub fn crash(&self) {
        self.task.abort();
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn token(user: &str, device: Option<&str>) -> String {
    mint_hs256(SECRET, user, device, Duration::from_secs(3600))
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A test client.
pub struct Client {
    pub ws: Ws,
    pub welcome: ServerMessage,
    pub postcard: bool,
}

impl Client {
    /// Connects with a token in the header and sends `resume`.
    pub async fn connect(
        url: &str,
        user: &str,
        device: &str,
        resume: (Option<&str>, Option<u64>),
    ) -> Self {
        let mut c = Self::open(url, &token(user, Some(device)), false)
            .await
            .expect("connects");
        c.send(&ClientMessage::Resume {
            epoch: resume.0.map(str::to_owned),
            after: resume.1,
        })
        .await;
        c
    }

    /// Opens a connection and reads `welcome`; the upgrade's HTTP status on refusal.
    pub async fn open(url: &str, token: &str, postcard: bool) -> Result<Self, u16> {
        let mut request = url.into_client_request().expect("valid url");
        request.headers_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("header"),
        );
        if postcard {
            request.headers_mut().insert(
                "sec-websocket-protocol",
                protocol::SUBPROTOCOL_POSTCARD.parse().expect("header"),
            );
        }
        Self::open_request(request, postcard).await
    }

    /// Opens a connection with a request built by the caller (credentials in the query, no
    /// credentials at all…) and reads `welcome`; the upgrade's HTTP status on refusal.
    pub async fn open_request(
        request: tokio_tungstenite::tungstenite::handshake::client::Request,
        postcard: bool,
    ) -> Result<Self, u16> {
        let (ws, _) = match tokio_tungstenite::connect_async(request).await {
            Ok(x) => x,
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => return Err(r.status().as_u16()),
            Err(e) => panic!("connect failed: {e}"),
        };
        let mut c = Self {
            ws,
            welcome: ServerMessage::Ping,
            postcard,
        };
        c.welcome = c.next().await.expect("welcome");
        assert!(
            matches!(c.welcome, ServerMessage::Welcome { .. }),
            "{:?}",
            c.welcome
        );
        Ok(c)
    }

    pub async fn send(&mut self, msg: &ClientMessage) {
        let frame = if self.postcard {
            Message::Binary(msg.to_postcard().into())
        } else {
            Message::Text(protocol::to_json(msg).into())
        };
        self.ws.send(frame).await.expect("send");
    }

    pub async fn ack(&mut self, seq: u64) {
        self.send(&ClientMessage::Ack { seq }).await;
    }

    /// The next protocol message, skipping pings (answered); `None` when the connection
    /// closed; panics after 10 s of silence.
    pub async fn next(&mut self) -> Option<ServerMessage> {
        self.next_within(Duration::from_secs(10))
            .await
            .expect("a message within 10 s")
    }

    /// Like [`next`], but `Err(())` on timeout.
    pub async fn next_within(&mut self, wait: Duration) -> Result<Option<ServerMessage>, ()> {
        loop {
            let frame = tokio::time::timeout(wait, self.ws.next())
                .await
                .map_err(|_| ())?;
            let msg = match frame {
                None | Some(Err(_)) => return Ok(None),
                Some(Ok(Message::Text(t))) => {
                    protocol::from_json::<ServerMessage>(t.as_str()).expect("server JSON")
                }
                Some(Ok(Message::Binary(b))) => {
                    ServerMessage::from_postcard(&b).expect("server postcard")
                }
                Some(Ok(Message::Close(_))) => return Ok(None),
                Some(Ok(_)) => continue,
            };
            if msg == ServerMessage::Ping {
                self.send(&ClientMessage::Pong).await;
                continue;
            }
            return Ok(Some(msg));
        }
    }

    /// The next notification (panics on anything else).
    pub async fn notification(&mut self) -> Notification {
        match self.next().await {
            Some(ServerMessage::Notification(n)) => n,
            other => panic!("expected a notification, got {other:?}"),
        }
    }

    /// Reads `n` notifications, acking each, and returns their seqs.
    pub async fn take(&mut self, n: usize) -> Vec<u64> {
        let mut seqs = Vec::with_capacity(n);
        for _ in 0..n {
            let note = self.notification().await;
            seqs.push(note.seq);
            self.ack(note.seq).await;
        }
        seqs
    }

    /// Asserts nothing arrives for `wait`.
    pub async fn assert_quiet(&mut self, wait: Duration) {
        if let Ok(msg) = self.next_within(wait).await {
            panic!("expected silence, got {msg:?}");
        }
    }

    /// Waits for the close frame; returns its code.
    pub async fn close_code(&mut self) -> Option<u16> {
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(20), self.ws.next())
                .await
                .expect("closed within 20 s");
            match frame {
                Some(Ok(Message::Close(Some(CloseFrame { code, .. })))) => {
                    return Some(code.into());
                }
                Some(Ok(Message::Close(None))) | None | Some(Err(_)) => return None,
                Some(Ok(_)) => {}
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

impl System {
    /// Appends `payloads` for `user` in one batch request; returns the epoch and each item's
    /// seq, in order. Panics if any item was refused.
    pub async fn send_payloads(
        &self,
        user: &str,
        payloads: Vec<serde_json::Value>,
    ) -> (String, Vec<u64>) {
        let items: Vec<serde_json::Value> = payloads
            .into_iter()
            .map(|payload| serde_json::json!({"user": user, "payload": payload}))
            .collect();
        let appended: Vec<Appended> = self
            .post_batch(&items)
            .await
            .into_iter()
            .map(|r| r.unwrap_or_else(|e| panic!("an item refused: {e:?}")))
            .collect();
        let epoch = appended[0].epoch.clone();
        (epoch, appended.iter().map(|a| a.seq).collect())
    }
}

pub use gapless_shared::testing::eventually;

impl System {
    /// True when `edge` holds a registry lease for `user`: from then on every append wakes it.
    pub async fn registered(&self, user: &str, edge: &str) -> bool {
        let score: Option<f64> = redis::cmd("ZSCORE")
            .arg(format!("gl:{{{user}}}:r"))
            .arg(edge)
            .query_async(&mut self.redis_conn().await)
            .await
            .expect("ZSCORE");
        score.is_some()
    }

    /// Waits until `edge` has registered `user` in Redis (10 s at most).
    pub async fn wait_registered(&self, user: &str, edge: &str) {
        eventually(
            &format!("{edge} registers {user}"),
            Duration::from_secs(10),
            || self.registered(user, edge),
        )
        .await;
    }
}
