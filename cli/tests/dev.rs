//! `gapless dev`: the whole system on a Redis it starts itself (one node, or with `--cluster`
//! a local six-node Redis Cluster), reached over HTTP as a user would, stopped with Ctrl-C
//! (SIGINT) and started again on the same directory with its data and its credentials.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const API_KEY: &str = "dev-test-key";
const SECRET: &str = "dev-test-secret-of-at-least-32-bytes";

/// A first port with the five after it and their bus ports (10,000 above) free now.
fn free_cluster_base() -> u16 {
    for _ in 0..200 {
        // Below the ephemeral range (32768 on), bus ports included: no outgoing
        // connection can hold one of them.
        let base = 10_000 + rand_u16() % 12_000;
        let all_free = (0..6)
            .flat_map(|i| [base + i, base + i + 10_000])
            .all(|port| TcpListener::bind(("127.0.0.1", port)).is_ok());
        if all_free {
            return base;
        }
    }
    panic!("no run of free ports for a cluster");
}

fn rand_u16() -> u16 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is past 1970")
        .subsec_nanos();
    (nanos ^ std::process::id()) as u16
}

/// A running `gapless dev` and what it printed.
struct Dev {
    child: Child,
    ingest: String,
    edge: String,
    /// Everything printed up to its "Ctrl-C stops everything" line.
    printed: String,
    /// The rest of its stdout, line by line, read by a thread.
    rest: std::sync::mpsc::Receiver<String>,
}

impl Dev {
    /// `gapless dev --cluster` on the six ports from `base`, with the test's credentials.
    fn start(base: u16, dir: &std::path::Path) -> Self {
        let dev = Self::launch(
            &[
                "--cluster",
                "--redis-port",
                &base.to_string(),
                "--api-key",
                API_KEY,
                "--jwt-secret",
                SECRET,
            ],
            dir,
        );
        assert!(
            dev.printed.contains("3 primaries and 3 replicas"),
            "{}",
            dev.printed
        );
        assert!(dev.printed.contains("on 3 primaries"), "{}", dev.printed);
        dev
    }

    /// `gapless dev` with `args`, its data under `dir`, on any free HTTP ports.
    fn launch(args: &[&str], dir: &std::path::Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_gapless"))
            .arg("dev")
            .args(args)
            .arg("--dir")
            .arg(dir)
            .args([
                "--ingest-listen",
                "127.0.0.1:0",
                "--edge-listen",
                "127.0.0.1:0",
            ])
            .env_remove("GAPLESS_REDIS_URL")
            .env_remove("GAPLESS_API_KEYS")
            .env_remove("GAPLESS_JWT_SECRET")
            .stdout(Stdio::piped())
            .spawn()
            .expect("gapless dev starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let (mut ingest, mut edge) = (None, None);
        let mut printed = String::new();
        for line in lines.by_ref() {
            let line = line.expect("readable stdout");
            printed.push_str(&line);
            printed.push('\n');
            if let Some(url) = line.strip_prefix("ingest:  ") {
                ingest = Some(url.trim().to_owned());
            }
            if let Some(rest) = line.strip_prefix("edge:    ") {
                edge = rest.split_whitespace().next().map(str::to_owned);
            }
            if line.starts_with("Ctrl-C stops everything") {
                break;
            }
        }
        // Keep draining stdout so the process never blocks on a full pipe.
        let (tx, rest) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Self {
            child,
            ingest: ingest.unwrap_or_else(|| panic!("no ingest URL in:\n{printed}")),
            edge: edge.unwrap_or_else(|| panic!("no edge URL in:\n{printed}")),
            printed,
            rest,
        }
    }

    /// The value printed after `label` (`api key: …`).
    fn printed_value(&self, label: &str) -> String {
        self.printed
            .lines()
            .find_map(|l| l.strip_prefix(label))
            .unwrap_or_else(|| panic!("no {label:?} line in:\n{}", self.printed))
            .trim()
            .to_owned()
    }

    /// Ctrl-C: everything stops, the command exits 0; returns what it printed after its
    /// instructions.
    fn interrupt(mut self) -> Vec<String> {
        let status = Command::new("kill")
            .arg("-INT")
            .arg(self.child.id().to_string())
            .status()
            .expect("kill(1) runs");
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().expect("waits") {
                assert!(status.success(), "gapless dev exited with {status}");
                let mut rest = Vec::new();
                while let Ok(line) = self.rest.recv_timeout(Duration::from_secs(2)) {
                    rest.push(line);
                }
                return rest;
            }
            assert!(
                Instant::now() < deadline,
                "gapless dev still running 60 s after SIGINT"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn send(http: &reqwest::Client, dev: &Dev, text: &str) -> (String, u64) {
    send_with(http, dev, API_KEY, text).await
}

async fn send_with(http: &reqwest::Client, dev: &Dev, key: &str, text: &str) -> (String, u64) {
    let answer: serde_json::Value = http
        .post(format!("{}/v1/notifications", dev.ingest))
        .bearer_auth(key)
        .json(&serde_json::json!({"user": "demo", "payload": {"text": text}}))
        .send()
        .await
        .expect("the ingest answers")
        .error_for_status()
        .expect("200")
        .json()
        .await
        .expect("JSON");
    (
        answer["epoch"].as_str().expect("epoch").to_owned(),
        answer["seq"].as_u64().expect("seq"),
    )
}

/// One long-poll of device `poller` from `after`: the texts it answers.
async fn poll(http: &reqwest::Client, dev: &Dev, epoch: &str, after: u64) -> Vec<String> {
    let token = Command::new(env!("CARGO_BIN_EXE_gapless"))
        .args([
            "token",
            "--user",
            "demo",
            "--device",
            "poller",
            "--jwt-secret",
            SECRET,
        ])
        .output()
        .expect("gapless token runs");
    let token = String::from_utf8(token.stdout)
        .expect("utf-8")
        .trim()
        .to_owned();
    let messages: Vec<serde_json::Value> = http
        .get(format!(
            "{}/v1/poll?epoch={epoch}&after={after}&wait_ms=5000",
            dev.edge
        ))
        .bearer_auth(token)
        .send()
        .await
        .expect("the edge answers")
        .error_for_status()
        .expect("200")
        .json()
        .await
        .expect("JSON");
    messages
        .iter()
        .filter(|m| m["type"] == "notification")
        .map(|m| m["payload"]["text"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_with_cluster_runs_the_system_on_its_own_cluster_and_keeps_the_data_across_restarts() {
    let base = free_cluster_base();
    let dir = std::env::temp_dir().join(format!("gapless-dev-test-{}-{base}", std::process::id()));
    let http = reqwest::Client::new();

    let dev = tokio::task::block_in_place(|| Dev::start(base, &dir));
    let ready = http
        .get(format!("{}/readyz", dev.edge))
        .send()
        .await
        .expect("the edge answers");
    assert_eq!(ready.status(), 200, "every primary holds the schema");
    let info: String = redis::cmd("CLUSTER")
        .arg("INFO")
        .query(
            &mut redis::Client::open(format!("redis://127.0.0.1:{base}"))
                .expect("url")
                .get_connection()
                .expect("the first node answers"),
        )
        .expect("CLUSTER INFO");
    assert!(
        info.contains("cluster_state:ok") && info.contains("cluster_known_nodes:6"),
        "{info}"
    );
    let (epoch, seq) = send(&http, &dev, "first").await;
    assert_eq!(seq, 1);
    assert_eq!(poll(&http, &dev, &epoch, 0).await, vec!["first"]);
    let _ = tokio::task::block_in_place(|| dev.interrupt());

    // Started again on the same directory: the nodes rejoin as they were, the log goes on.
    let dev = tokio::task::block_in_place(|| Dev::start(base, &dir));
    let (again, seq) = send(&http, &dev, "second").await;
    assert_eq!(
        (again.as_str(), seq),
        (epoch.as_str(), 2),
        "the same log, continued"
    );
    assert_eq!(poll(&http, &dev, &epoch, 0).await, vec!["first", "second"]);
    let _ = tokio::task::block_in_place(|| dev.interrupt());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_keeps_its_credentials_across_restarts_and_rotates_them_when_asked() {
    let port = gapless_shared::testing::free_port()
        .expect("a free port")
        .to_string();
    let dir = std::env::temp_dir().join(format!("gapless-dev-cred-{}-{port}", std::process::id()));
    let http = reqwest::Client::new();
    let args = ["--redis-port", port.as_str()];

    let dev = tokio::task::block_in_place(|| Dev::launch(&args, &dir));
    let key = dev.printed_value("api key:");
    let secret = dev.printed_value("jwt secret (HS256):");
    let token = dev.printed_value("token for user `demo`, device `laptop` (valid 30 days):");
    let (epoch, seq) = send_with(&http, &dev, &key, "first").await;
    assert_eq!(seq, 1);
    let after = tokio::task::block_in_place(|| dev.interrupt());
    assert!(
        after
            .last()
            .is_some_and(|l| l.starts_with("gapless dev stopped")),
        "a last line says it has stopped: {after:?}"
    );

    // Started again in the same folder: the same key, secret and token, which still work.
    let dev = tokio::task::block_in_place(|| Dev::launch(&args, &dir));
    assert_eq!(dev.printed_value("api key:"), key);
    assert_eq!(dev.printed_value("jwt secret (HS256):"), secret);
    assert_eq!(
        dev.printed_value("token for user `demo`, device `laptop` (valid 30 days):"),
        token
    );
    let (again, seq) = send_with(&http, &dev, &key, "second").await;
    assert_eq!(
        (again.as_str(), seq),
        (epoch.as_str(), 2),
        "the same log, continued"
    );
    let polled = http
        .get(format!(
            "{}/v1/poll?epoch={epoch}&after=0&wait_ms=1000",
            dev.edge
        ))
        .bearer_auth(&token)
        .send()
        .await
        .expect("the edge answers");
    assert_eq!(polled.status(), 200, "the kept token is accepted");
    let _ = tokio::task::block_in_place(|| dev.interrupt());

    // --fresh-credentials: new ones, and the old key is refused.
    let fresh = ["--redis-port", port.as_str(), "--fresh-credentials"];
    let dev = tokio::task::block_in_place(|| Dev::launch(&fresh, &dir));
    let new_key = dev.printed_value("api key:");
    assert_ne!(new_key, key);
    let refused = http
        .post(format!("{}/v1/notifications", dev.ingest))
        .bearer_auth(&key)
        .json(&serde_json::json!({"user": "demo", "payload": 1}))
        .send()
        .await
        .expect("the ingest answers");
    assert_eq!(refused.status(), 403, "the rotated key no longer works");
    send_with(&http, &dev, &new_key, "third").await;
    let _ = tokio::task::block_in_place(|| dev.interrupt());
    let _ = std::fs::remove_dir_all(&dir);
}
