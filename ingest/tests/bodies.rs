//! What a request body may cost the ingest (and, with the same process harness, what an
//! operator hears when Redis goes away): a batch of millions of tiny items is refused at
//! the item limit while it is decoded, so memory grows with the limits and not with the body
//! (measured on a real `gapless-ingest` process); the bytes of all bodies held at once are
//! bounded; payloads nested too deep are refused per item. Nothing refused is stored.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{API_KEY, TestIngest, error_code, json_of};
use gapless_shared::batch::{PostcardBatch, PostcardItem};
use gapless_shared::testing::{TestRedis, free_port};
use reqwest::StatusCode;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// A `gapless-ingest` process, killed when dropped.
struct IngestProcess {
    child: Child,
    base: String,
}

impl IngestProcess {
    async fn start(redis: &TestRedis) -> Self {
        Self::start_logging(redis, Stdio::inherit).await
    }

    /// Starts the process with its stderr (the log) going to `log()`.
    async fn start_logging(redis: &TestRedis, log: impl Fn() -> Stdio) -> Self {
        let mut conn = common::connect(redis).await;
        gapless_shared::schema::migrate(&mut conn)
            .await
            .expect("migrations apply");
        let http = reqwest::Client::new();
        for _ in 0..3 {
            let addr: SocketAddr = ([127, 0, 0, 1], free_port().expect("a free port")).into();
            let mut child = Command::new(env!("CARGO_BIN_EXE_gapless-ingest"))
                .env("GAPLESS_LISTEN", addr.to_string())
                .env("GAPLESS_REDIS_URL", redis.url())
                .env("GAPLESS_API_KEYS", API_KEY)
                .env("GAPLESS_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log())
                .spawn()
                .expect("the gapless-ingest binary starts");
            let base = format!("http://{addr}");
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok(r) = http.get(format!("{base}/readyz")).send().await
                    && r.status().is_success()
                {
                    return Self { child, base };
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break; // the port was taken: another one
                }
                assert!(Instant::now() < deadline, "the ingest never became ready");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        panic!("the ingest process never started");
    }

    /// `VmRSS` and `VmHWM` (peak resident) of the process, bytes.
    fn memory(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("Linux has /proc/<pid>/status");
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
                .expect("a memory line in kB")
                * 1024
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

impl Drop for IngestProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const MIB: u64 = 1 << 20;

/// Batches of about 16 MiB (just under the default batch byte limit) of the smallest items,
/// in each format.
fn huge_batches() -> Vec<(&'static str, Vec<u8>)> {
    let limit = (16 << 20) - 64;
    let item = r#"{"user":"a","payload":1}"#;
    let mut json = String::from("[");
    while json.len() + item.len() + 2 < limit {
        json.push_str(item);
        json.push(',');
    }
    json.push_str(item);
    json.push(']');
    let mut ndjson = String::new();
    while ndjson.len() + item.len() + 1 < limit {
        ndjson.push_str(item);
        ndjson.push('\n');
    }
    let one = PostcardItem {
        user: "a".into(),
        payload: "1".into(),
        idempotency_key: None,
    };
    let postcard = PostcardBatch::V1(vec![one; (limit - 16) / 5]).encode();
    assert!(postcard.len() < limit);
    vec![
        ("application/json", json.into_bytes()),
        ("application/x-ndjson", ndjson.into_bytes()),
        ("application/x-postcard", postcard),
    ]
}

/// Posts `batches` at once to a fresh ingest process, asserts each is refused for its item
/// count, and answers the growth of its peak resident memory over its warmed-up baseline.
async fn peak_growth(redis: &TestRedis, batches: Vec<(&'static str, Vec<u8>)>) -> u64 {
    let ingest = IngestProcess::start(redis).await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client");
    let post = |ct: &'static str, body: Vec<u8>| {
        http.post(format!("{}/v1/notifications/batch", ingest.base))
            .bearer_auth(API_KEY)
            .header(reqwest::header::CONTENT_TYPE, ct)
            .body(body)
            .send()
    };
    // Warm up the allocator and the pools with an ordinary batch.
    let warm = json!([{"user": "warm", "payload": 1}])
        .to_string()
        .into_bytes();
    let (status, _) = json_of(post("application/json", warm).await.expect("answers")).await;
    assert_eq!(status, StatusCode::OK);
    let (baseline, _) = ingest.memory();
    let kinds: Vec<&str> = batches.iter().map(|(ct, _)| *ct).collect();
    let answers =
        futures_util::future::join_all(batches.into_iter().map(|(ct, body)| post(ct, body))).await;
    for answer in answers {
        let (status, body) = json_of(answer.expect("answers")).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
        assert_eq!(error_code(&body), "too_many_items");
    }
    let (rss, peak) = ingest.memory();
    eprintln!(
        "{kinds:?}: baseline {} MiB, peak {} MiB, after {} MiB",
        baseline / MIB,
        peak / MIB,
        rss / MIB
    );
    peak.saturating_sub(baseline)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_16_mib_batch_of_tiny_items_costs_memory_by_the_limits_not_the_body() {
    let redis = TestRedis::start();
    let batches = huge_batches();
    for batch in batches.clone() {
        let kind = batch.0;
        let growth = peak_growth(&redis, vec![batch]).await;
        assert!(
            growth < 64 * MIB,
            "{kind}: the peak grew by {} MiB",
            growth / MIB
        );
    }
    // Three at once, as an attacker would send them: each body is held, none is expanded.
    let growth = peak_growth(&redis, batches).await;
    assert!(
        growth < 3 * 64 * MIB,
        "three at once grew the peak by {} MiB",
        growth / MIB
    );
    let mut conn = common::connect(&redis).await;
    let exists: u64 = redis::cmd("EXISTS")
        .arg(common::user_keys("a").stream)
        .query_async(&mut conn)
        .await
        .expect("EXISTS");
    assert_eq!(exists, 0, "nothing of a refused batch is stored");
}

/// Sends a request head declaring `length` body bytes and `sent` of them, and keeps the
/// connection open.
async fn hold_body(base: &str, length: usize, sent: usize) -> TcpStream {
    let addr = base.trim_start_matches("http://");
    let mut stream = TcpStream::connect(addr).await.expect("connects");
    let head = format!(
        "POST /v1/notifications/batch HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer \
         {API_KEY}\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.expect("write");
    stream
        .write_all(&vec![b' '; sent])
        .await
        .expect("write part of the body");
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bytes_of_bodies_held_at_once_are_bounded() {
    let ingest = with_body_budget(64 << 10, 100 << 10).await;
    // One slow body of 64 KiB holds most of the 100 KiB budget. (Had the budget been short
    // when it arrived it would have been answered 503 at once: then it is sent again.)
    let held = loop {
        let mut held = hold_body(&ingest.base, 64 << 10, 10).await;
        let mut answer = [0u8; 256];
        if tokio::time::timeout(Duration::from_secs(1), held.read(&mut answer))
            .await
            .is_err()
        {
            break held;
        }
    };
    let body = json!([{"user": "b", "payload": "x".repeat(40 << 10)}]).to_string();
    // Every refused producer reads its 503, never a connection reset while it still writes.
    refused_as_busy(&ingest, &body, 20).await;
    // Small requests still fit beside it.
    ingest.append("c", json!(1)).await;
    // Once the slow body goes, its share comes back.
    drop(held);
    gapless_shared::testing::eventually("the budget is returned", common::DEADLINE, || async {
        let response = ingest
            .post("/v1/notifications/batch", "application/json", body.clone())
            .await;
        response.status() == StatusCode::OK
    })
    .await;
    assert_eq!(ingest.xrange_seqs("b").await, vec![1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_refused_while_it_writes_a_large_body_reads_the_refusal() {
    let ingest = with_body_budget(32 << 20, 40 << 20).await;
    let _held = hold_body(&ingest.base, 32 << 20, 10).await;
    // Far more than the kernel buffers between the two: the refusal is decided from the
    // head while the producer still has megabytes to write. Answered then closed at once, the
    // producer would see a broken pipe, not the 503 and its Retry-After.
    let body = json!([{"user": "b", "payload": "x".repeat(24 << 20)}]).to_string();
    refused_as_busy(&ingest, &body, 3).await;
}

/// An ingest whose bodies may hold `limit` bytes each and `budget` bytes in all.
async fn with_body_budget(limit: usize, budget: usize) -> TestIngest {
    TestIngest::start_with(&[], |c| {
        c.limits.batch_bytes = limit;
        c.limits.body_bytes = limit;
        c.limits.inflight_body_bytes = budget;
    })
    .await
}

/// Waits until a held body takes the budget `body` (a batch for user b) needs, then posts it
/// `times` more times: each is answered 503 `busy` with `Retry-After`, and nothing is stored.
async fn refused_as_busy(ingest: &TestIngest, body: &str, times: usize) {
    gapless_shared::testing::eventually(
        "the held body takes its share of the budget",
        common::DEADLINE,
        || async {
            let response = ingest
                .post(
                    "/v1/notifications/batch",
                    "application/json",
                    body.to_owned(),
                )
                .await;
            response.status() == StatusCode::SERVICE_UNAVAILABLE
        },
    )
    .await;
    for _ in 0..times {
        let response = ingest
            .post(
                "/v1/notifications/batch",
                "application/json",
                body.to_owned(),
            )
            .await;
        assert!(response.headers().contains_key("retry-after"));
        let (status, answer) = json_of(response).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(error_code(&answer), "busy");
    }
    assert!(!ingest.stream_exists("b").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_length_over_the_limit_is_refused_before_the_body_is_read() {
    let ingest = TestIngest::start().await;
    let mut stream = hold_body(&ingest.base, 2_000_000_000, 2).await;
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut answer))
        .await
        .expect("answered at once")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("body_too_large"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_nested_too_deep_are_refused_per_item() {
    let ingest = TestIngest::start_with(&[], |c| c.limits.payload_depth = 8).await;
    let deep: serde_json::Value =
        serde_json::from_str(&format!("{}{}", "[".repeat(9), "]".repeat(9))).expect("json");
    let shallow: serde_json::Value =
        serde_json::from_str(&format!("{}{}", "[".repeat(8), "]".repeat(8))).expect("json");
    let (status, answer) = ingest
        .post_json(
            "/v1/notifications",
            &json!({"user": "deep", "payload": deep}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert_eq!(error_code(&answer), "payload_too_deep");
    assert!(!ingest.stream_exists("deep").await);
    let (status, answer) = ingest
        .post_json(
            "/v1/notifications/batch",
            &json!([
                {"user": "deep", "payload": deep},
                {"user": "deep", "payload": shallow},
            ]),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["results"][0]["error"]["code"], "payload_too_deep");
    assert_eq!(answer["results"][1]["seq"], 1);
    assert_eq!(
        ingest.stored_payloads("deep").await,
        vec![shallow.to_string()]
    );
    // 32,000 levels in 64 KB, the case that crashed client parsers: refused, not stored.
    let abyss = format!(
        r#"{{"user":"deep","payload":{}{}}}"#,
        "[".repeat(32_000),
        "]".repeat(32_000)
    );
    let (status, answer) = json_of(
        ingest
            .post("/v1/notifications", "application/json", abyss)
            .await,
    )
    .await;
    assert!(status.is_client_error(), "{status}: {answer}");
    assert_eq!(ingest.xrange_seqs("deep").await, vec![1]);
}
