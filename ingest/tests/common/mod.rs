//! Shared harness of the ingest integration tests: a real `redis-server` (AOF, fsync always)
//! started by [`TestRedis`], or a real local Redis Cluster ([`TestCluster`], six nodes), the
//! migrated schema, and the ingest served in-process on `127.0.0.1:0`, plus helpers to call
//! its HTTP API and to read back what Redis holds. `gapless_shared::on_both!` runs one test
//! body against each kind of Redis.
//!
//! Each test binary uses a different subset of the helpers.
#![allow(dead_code)]

use std::time::Duration;

use gapless_ingest::Config;
use gapless_ingest::RunError;
use gapless_shared::config::Secret;
use gapless_shared::ids::UserId;
use gapless_shared::keys::{self, UserKeys};
use gapless_shared::store::{self, Store};
use gapless_shared::testing::TestRedis;
pub use gapless_shared::testing::{Backend, Kind};
use redis::aio::MultiplexedConnection;
use redis::streams::StreamRangeReply;
use reqwest::StatusCode;
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The API key every test ingest accepts.
pub const API_KEY: &str = "test-key";

/// How long a test waits for a condition before it fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// One stream entry as Redis holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEntry {
    /// Seq, from the entry id `<seq>-0`.
    pub seq: u64,
    /// The payload's JSON text.
    pub payload: String,
    /// The idempotency key, when the producer gave one.
    pub idempotency_key: Option<String>,
}

/// An ingest served in-process against its own Redis.
pub struct TestIngest {
    /// The Redis the ingest writes to; tests may kill and restart a single node.
    pub redis: Backend,
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    /// Cancels the ingest; cancelled on drop.
    pub token: CancellationToken,
    /// HTTP client for the API.
    pub http: reqwest::Client,
    /// The ingest's `run` task; aborted on drop.
    server: JoinHandle<Result<(), RunError>>,
}

impl TestIngest {
    /// An ingest with default settings.
    pub async fn start() -> Self {
        Self::start_with(&[], |_| {}).await
    }

    /// An ingest with default settings on the given kind of Redis.
    pub async fn start_on(kind: Kind) -> Self {
        Self::start_on_with(kind, &[], |_| {}).await
    }

    /// An ingest whose Redis gets `redis_settings` and whose config `tweak` adjusts.
    pub async fn start_with(
        redis_settings: &[(&str, &str)],
        tweak: impl FnOnce(&mut Config),
    ) -> Self {
        Self::start_on_with(Kind::Single, redis_settings, tweak).await
    }

    /// [`start_with`](Self::start_with) on the given kind of Redis.
    pub async fn start_on_with(
        kind: Kind,
        redis_settings: &[(&str, &str)],
        tweak: impl FnOnce(&mut Config),
    ) -> Self {
        let settings: Vec<(String, String)> = redis_settings
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let redis = tokio::task::spawn_blocking(move || {
            let settings: Vec<(&str, &str)> = settings
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            Backend::start(kind, &settings)
        })
        .await
        .expect("the test Redis starts");
        let mut conn = store::connect(&redis.config()).await.expect("connects");
        gapless_shared::schema::migrate(&mut conn)
            .await
            .expect("migrations apply to a fresh Redis");
        let mut config = Config::new(redis.config(), vec![Secret::new(API_KEY)]);
        tweak(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let base = format!(
            "http://{}",
            listener
                .local_addr()
                .expect("bound listener has an address")
        );
        let token = CancellationToken::new();
        let server = tokio::spawn(gapless_ingest::run(listener, config, token.clone()));
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("reqwest client builds");
        let ingest = Self {
            redis,
            base,
            token,
            http,
            server,
        };
        ingest.wait_healthy().await;
        ingest
    }

    /// Polls `/healthz` until it answers; fails early if `run` returned.
    async fn wait_healthy(&self) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            assert!(
                !self.server.is_finished(),
                "the ingest stopped during start-up"
            );
            if let Ok(r) = self.http.get(self.url("/healthz")).send().await
                && r.status() == StatusCode::OK
            {
                return;
            }
            assert!(Instant::now() < deadline, "the ingest never became healthy");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The absolute URL of `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A new connection to the ingest's Redis, for assertions (a new one survives restarts):
    /// to the node, or to the cluster.
    pub async fn redis_conn(&self) -> Store {
        store::connect(&self.redis.config())
            .await
            .expect("the test Redis accepts connections")
    }

    /// POSTs `body` with `content_type` and the API key.
    pub async fn post(
        &self,
        path: &str,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .bearer_auth(API_KEY)
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(body)
            .send()
            .await
            .expect("the ingest answers")
    }

    /// POSTs JSON text to `path`; answers status and JSON body.
    pub async fn post_json(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        let response = self.post(path, "application/json", body.to_string()).await;
        json_of(response).await
    }

    /// Appends one notification through `/v1/notifications`, which must succeed.
    pub async fn append(&self, user: &str, payload: Value) -> Value {
        let (status, body) = self
            .post_json(
                "/v1/notifications",
                &serde_json::json!({ "user": user, "payload": payload }),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "append answered {body}");
        body
    }

    /// GETs `path` with the API key; answers status and JSON body.
    pub async fn get_json(&self, path: &str) -> (StatusCode, Value) {
        let response = self
            .http
            .get(self.url(path))
            .bearer_auth(API_KEY)
            .send()
            .await
            .expect("the ingest answers");
        json_of(response).await
    }

    /// Every entry of `user`'s stream, oldest first.
    pub async fn stored(&self, user: &str) -> Vec<StoredEntry> {
        let mut conn = self.redis_conn().await;
        let range: StreamRangeReply = redis::cmd("XRANGE")
            .arg(user_keys(user).stream)
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .expect("XRANGE works");
        range
            .ids
            .iter()
            .map(|e| StoredEntry {
                seq: keys::parse_entry_id(&e.id)
                    .unwrap_or_else(|| panic!("entry id {} is not <seq>-<ms>", e.id)),
                payload: e
                    .get(keys::FIELD_PAYLOAD)
                    .expect("every entry has a payload"),
                idempotency_key: e.get(keys::FIELD_IDEMPOTENCY_KEY),
            })
            .collect()
    }

    /// The seqs of `user`'s stream, oldest first.
    pub async fn xrange_seqs(&self, user: &str) -> Vec<u64> {
        self.stored(user).await.into_iter().map(|e| e.seq).collect()
    }

    /// The payloads of `user`'s stream, oldest first.
    pub async fn stored_payloads(&self, user: &str) -> Vec<String> {
        self.stored(user)
            .await
            .into_iter()
            .map(|e| e.payload)
            .collect()
    }

    /// XLEN of `user`'s stream.
    pub async fn xlen(&self, user: &str) -> u64 {
        let mut conn = self.redis_conn().await;
        redis::cmd("XLEN")
            .arg(user_keys(user).stream)
            .query_async(&mut conn)
            .await
            .expect("XLEN works")
    }

    /// Whether `key` exists.
    pub async fn exists(&self, key: &str) -> bool {
        let mut conn = self.redis_conn().await;
        let n: u64 = redis::cmd("EXISTS")
            .arg(key)
            .query_async(&mut conn)
            .await
            .expect("EXISTS works");
        n == 1
    }

    /// The seq recorded in `user`'s log state (`seq` of `gl:{u}:m`).
    pub async fn recorded_seq(&self, user: &str) -> u64 {
        let mut conn = self.redis_conn().await;
        redis::cmd("HGET")
            .arg(user_keys(user).meta)
            .arg("seq")
            .query_async(&mut conn)
            .await
            .expect("HGET works")
    }

    /// Whether `user` has a stream at all.
    pub async fn stream_exists(&self, user: &str) -> bool {
        self.exists(&user_keys(user).stream).await
    }
}

impl Drop for TestIngest {
    fn drop(&mut self) {
        self.token.cancel();
        self.server.abort();
    }
}

/// A multiplexed connection to `redis`.
pub async fn connect(redis: &TestRedis) -> MultiplexedConnection {
    redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .expect("the test Redis accepts connections")
}

/// The Redis keys of `user` (which must be a valid id).
pub fn user_keys(user: &str) -> UserKeys {
    UserKeys::new(&UserId::parse(user).expect("tests name valid users"))
}

/// Status and JSON body of a response.
pub async fn json_of(response: reqwest::Response) -> (StatusCode, Value) {
    let status = response.status();
    let text = response.text().await.expect("the body arrives");
    let body = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("status {status}: body is not JSON ({e}): {text:?}"));
    (status, body)
}

/// The `error.code` of an error body, asserting the documented shape.
pub fn error_code(body: &Value) -> &str {
    let message = body["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("error body without a message: {body}"));
    assert!(!message.is_empty(), "empty error message: {body}");
    body["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("error body without a code: {body}"))
}
