//! What the ingest writes to its log, read from the real binary's stderr: JSON lines under
//! `--log-format json`, no ANSI escapes when stderr is not a terminal, the request id on the
//! lines of a request, and one line each way for a Redis outage however many requests fail
//! during it.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use gapless_shared::testing::{TestRedis, free_port};

const KEY: &str = "logs-test-key";

/// A running `gapless-ingest` whose stderr lines arrive on `lines`.
struct Ingest {
    child: Child,
    base: String,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Ingest {
    fn start(redis: &TestRedis, args: &[&str], log: &str) -> Self {
        let port = free_port().expect("a free port");
        let mut child = Command::new(env!("CARGO_BIN_EXE_gapless-ingest"))
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--redis", &redis.url(), "--api-keys", KEY])
            .args(args)
            .env("GAPLESS_LOG", log)
            .env_remove("GAPLESS_LOG_FORMAT")
            .stderr(Stdio::piped())
            .spawn()
            .expect("gapless-ingest starts");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut ingest = Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
            lines,
            seen: Vec::new(),
        };
        ingest.wait_for("ingest listening", Duration::from_secs(20));
        ingest
    }

    /// Reads lines until one contains `text`; panics with everything read after `within`.
    fn wait_for(&mut self, text: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(text) {
                        return line;
                    }
                }
                Err(_) => panic!("no line with {text:?} in:\n{}", self.seen.join("\n")),
            }
        }
    }

    /// Every line read so far, and those that come within `for_`.
    fn drain(&mut self, for_: Duration) -> &[String] {
        let deadline = Instant::now() + for_;
        while let Ok(line) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.seen.push(line);
        }
        &self.seen
    }
}

impl Drop for Ingest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn migrated() -> TestRedis {
    let redis = TestRedis::start();
    let mut conn = redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .expect("connects to the test redis");
    gapless_shared::schema::migrate(&mut conn)
        .await
        .expect("migrations apply");
    redis
}

async fn append(http: &reqwest::Client, base: &str, request_id: &str) -> reqwest::Response {
    http.post(format!("{base}/v1/notifications"))
        .bearer_auth(KEY)
        .header("x-request-id", request_id)
        .json(&serde_json::json!({"user": "alice", "payload": {"n": 1}}))
        .send()
        .await
        .expect("the ingest answers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_carry_the_request_id_and_text_lines_have_no_colour() {
    let redis = migrated().await;
    let http = reqwest::Client::new();

    let mut json = Ingest::start(&redis, &["--log-format", "json"], "info,tower_http=debug");
    let answer = append(&http, &json.base, "req-json-1").await;
    assert_eq!(answer.status(), 200);
    assert_eq!(
        answer.headers()["x-request-id"],
        "req-json-1",
        "the id is answered"
    );
    // A request without an id gets a fresh one, answered too.
    let fresh = http
        .get(format!("{}/healthz", json.base))
        .send()
        .await
        .expect("healthz answers");
    let id = fresh.headers()["x-request-id"].to_str().expect("ascii");
    assert_eq!(id.len(), 36, "a UUID: {id}");
    json.wait_for("req-json-1", Duration::from_secs(10));
    for line in json.drain(Duration::from_millis(300)) {
        let object: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {line}"));
        assert!(
            object["level"].is_string() && object["timestamp"].is_string(),
            "{line}"
        );
    }
    let traced = json
        .seen
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|o| o["span"]["id"] == "req-json-1")
        .expect("a line inside the request's span names its id");
    assert_eq!(traced["span"]["path"], "/v1/notifications", "{traced}");
    drop(json);

    let mut text = Ingest::start(&redis, &[], "info,tower_http=debug");
    append(&http, &text.base, "req-text-1").await;
    text.wait_for("req-text-1", Duration::from_secs(10));
    for line in text.drain(Duration::from_millis(300)) {
        assert!(
            !line.contains('\u{1b}'),
            "an ANSI escape in a piped log: {line:?}"
        );
        assert!(!line.starts_with('{'), "text, not JSON: {line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_is_one_warning_and_one_line_when_it_ends() {
    let mut redis = migrated().await;
    let http = reqwest::Client::new();
    let mut ingest = Ingest::start(&redis, &["--redis-timeout-ms", "300"], "info");
    assert_eq!(append(&http, &ingest.base, "before").await.status(), 200);

    redis.kill();
    ingest.wait_for("Redis cannot serve requests", Duration::from_secs(10));
    // Requests fail during the outage, and probes keep failing: none of it is a new line.
    for i in 0..20 {
        let answer = append(&http, &ingest.base, &format!("during-{i}")).await;
        assert_eq!(answer.status(), 503);
    }
    ingest.drain(Duration::from_secs(5));
    redis
        .restart()
        .expect("redis restarts on its port with its AOF");
    ingest.wait_for("Redis serves requests again", Duration::from_secs(20));
    assert_eq!(append(&http, &ingest.base, "after").await.status(), 200);

    let warnings: Vec<&String> = ingest.seen.iter().filter(|l| l.contains("WARN")).collect();
    assert_eq!(
        warnings.len(),
        1,
        "one warning for the outage, none per request or probe: {warnings:#?}"
    );
    assert!(
        warnings[0].contains("Redis cannot serve requests"),
        "{}",
        warnings[0]
    );
}
