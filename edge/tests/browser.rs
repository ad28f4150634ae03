//! A browser's own `EventSource` against the edge's SSE endpoint (DESIGN.md §5.1), in headless
//! Chromium (Debian's `/usr/bin/chromium`, driven by `playwright-core` from
//! `edge/tests/browser/`): it receives live notifications and, after its connection is
//! killed, reconnects by itself with `Last-Event-ID` and gets exactly the gap. Between the
//! browser and the edge sits a TCP proxy the test can take down and whose connections it
//! can kill, and which keeps each connection's request head.
//!
//! The ingest's live status page in the same browser: it authenticates by HTTP Basic with
//! the API key, and renders the devices connected to two edges, the rates, the p99, Redis
//! and each edge's lease and drain state, refreshed as they change.
//!
//! Needs `node`, `/usr/bin/chromium` and `npm ci` in `edge/tests/browser` (the README's test
//! command, `scripts/test.sh`, installs all three).

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{System, eventually, token};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio_util::sync::CancellationToken;

/// A TCP proxy in front of the edge.
struct Proxy {
    addr: std::net::SocketAddr,
    state: Arc<Mutex<ProxyState>>,
}

#[derive(Default)]
struct ProxyState {
    /// Refuse new connections (accept and drop them at once).
    down: bool,
    /// Cancelled to kill every current connection; replaced after each kill.
    kill: CancellationToken,
    /// The first bytes the client sent on each accepted connection.
    heads: Vec<String>,
}

impl Proxy {
    async fn start(target: std::net::SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(ProxyState::default()));
        let shared = state.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (down, kill) = {
                    let s = shared.lock().expect("proxy lock");
                    (s.down, s.kill.clone())
                };
                if down {
                    drop(client);
                    continue;
                }
                tokio::spawn(pump(client, target, kill, shared.clone()));
            }
        });
        Self { addr, state }
    }

    /// Refuses new connections and kills the current ones.
    fn cut(&self) {
        let mut s = self.state.lock().expect("proxy lock");
        s.down = true;
        s.kill.cancel();
        s.kill = CancellationToken::new();
    }

    fn restore(&self) {
        self.state.lock().expect("proxy lock").down = false;
    }

    fn heads(&self) -> Vec<String> {
        self.state.lock().expect("proxy lock").heads.clone()
    }
}

/// Forwards one connection both ways until either side ends or `kill` fires.
async fn pump(
    mut client: TcpStream,
    target: std::net::SocketAddr,
    kill: CancellationToken,
    state: Arc<Mutex<ProxyState>>,
) {
    let Ok(mut server) = TcpStream::connect(target).await else {
        return;
    };
    let mut first = vec![0u8; 8192];
    let n = tokio::select! {
        n = client.read(&mut first) => n.unwrap_or(0),
        () = kill.cancelled() => return,
    };
    if n == 0 {
        return;
    }
    state
        .lock()
        .expect("proxy lock")
        .heads
        .push(String::from_utf8_lossy(&first[..n]).into_owned());
    if server.write_all(&first[..n]).await.is_err() {
        return;
    }
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        () = kill.cancelled() => {}
    }
}

/// The Node driver of the browser.
struct Browser {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Browser {
    fn start(dir: &std::path::Path) -> Self {
        Self::start_script(dir, "eventsource.mjs")
    }

    /// Runs the driver `script` of `dir`.
    fn start_script(dir: &std::path::Path, script: &str) -> Self {
        let mut child = Command::new("node")
            .arg(script)
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("node starts");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        Self {
            child,
            stdin,
            stdout,
        }
    }

    async fn call(&mut self, command: Value) -> Value {
        self.stdin
            .write_all(format!("{command}\n").as_bytes())
            .await
            .expect("the driver reads commands");
        let mut line = String::new();
        tokio::time::timeout(Duration::from_secs(60), self.stdout.read_line(&mut line))
            .await
            .expect("the driver answers within 60 s")
            .expect("the driver's stdout");
        let answer: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("the driver printed {line:?}: {e}"));
        assert!(answer.get("error").is_none(), "{command}: {answer}");
        answer
    }
}

impl Browser {
    /// Asks the status driver for what the page shows until `done` holds, at most 20 s.
    async fn until(&mut self, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let shown = self.call(json!({"cmd": "figures", "after": 1})).await;
            if done(&shown) {
                return shown;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: not within 20 s; last: {shown}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Where the driver lives, with its `node_modules`; `None` when `node` is missing (the test
/// is skipped, saying so); panics when the rest of what it needs is missing.
fn driver_dir() -> Option<PathBuf> {
    if std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: node is not installed; the README's test command installs it");
        return None;
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    assert!(
        dir.join("node_modules/playwright-core").is_dir(),
        "{}/node_modules is missing: run the README's test command (scripts/test.sh runs npm ci there)",
        dir.display()
    );
    assert!(
        std::path::Path::new("/usr/bin/chromium").exists(),
        "/usr/bin/chromium is missing: run the README's test command (scripts/test.sh installs Debian's chromium)"
    );
    Some(dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browsers_eventsource_reconnects_by_itself_with_last_event_id_and_gets_exactly_the_gap() {
    let Some(dir) = driver_dir() else { return };
    let sys = System::start().await;
    let mut config = sys.edge_config("edge-browser");
    config.sse_retry = Duration::from_millis(300);
    let edge = sys.edge(config).await;
    let proxy = Proxy::start(edge.addr).await;
    let mut browser = Browser::start(&dir);
    let origin = format!("http://{}", proxy.addr);
    browser
        .call(json!({
            "cmd": "open",
            "origin": origin,
            "path": format!("/v1/sse?token={}", token("eve", Some("browser"))),
        }))
        .await;
    eventually(
        "the browser's stream is registered",
        Duration::from_secs(20),
        || sys.registered("eve", "edge-browser"),
    )
    .await;

    // Live.
    let mut epoch = String::new();
    for i in 1..=3 {
        epoch = sys.send("eve", json!({"i": i})).await.0;
    }
    let seen = browser.call(json!({"cmd": "wait", "count": 3})).await;
    assert_eq!(seen["seqs"], json!([1, 2, 3]));
    let ids: Vec<String> = (1..=3).map(|i| format!("{epoch}:{i}")).collect();
    assert_eq!(seen["ids"], json!(ids));

    // The network drops; what is appended meanwhile must come after the reconnect.
    proxy.cut();
    for i in 4..=6 {
        sys.send("eve", json!({"i": i})).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let heads_while_down = proxy.heads().len();
    proxy.restore();

    let seen = browser
        .call(json!({"cmd": "wait", "count": 6, "timeout_ms": 20000}))
        .await;
    assert_eq!(
        seen["seqs"],
        json!([1, 2, 3, 4, 5, 6]),
        "exactly the gap, once each"
    );
    assert!(seen["opens"].as_u64() >= Some(2), "{seen}");
    assert_eq!(seen["resets"], json!([]));
    let heads = proxy.heads();
    assert!(heads.len() > heads_while_down, "the browser reconnected");
    let reconnect = heads.last().expect("a reconnect").to_ascii_lowercase();
    assert!(
        reconnect.contains(&format!("last-event-id: {epoch}:3")),
        "the browser's reconnect names its last event: {reconnect}"
    );
    // Nothing more comes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = browser.call(json!({"cmd": "wait", "count": 6})).await;
    assert_eq!(seen["seqs"].as_array().map(Vec::len), Some(6));
    browser.call(json!({"cmd": "stop"})).await;
    let _ = browser.child.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_the_fleet_live_in_a_browser() {
    let Some(dir) = driver_dir() else { return };
    let sys = System::start().await;
    let a = sys.edge(sys.edge_config("edge-a")).await;
    let mut config_b = sys.edge_config("edge-b");
    config_b.drain_window = Duration::from_secs(20);
    config_b.shutdown_grace = Duration::from_secs(30);
    let b = sys.edge(config_b).await;
    // Two WebSocket devices on edge-a, two SSE devices on edge-b (a drain closes them spread
    // over its window: the second one keeps edge-b draining for half of it).
    let mut phone = common::Client::connect(&a.ws_url(), "sam", "phone", (None, None)).await;
    let _tablet = common::Client::connect(&a.ws_url(), "sam", "tablet", (None, None)).await;
    let mut streams = Vec::new();
    for device in ["laptop", "desktop"] {
        let sse = reqwest::Client::new()
            .get(format!(
                "http://{}/v1/sse?token={}",
                b.addr,
                token("sam", Some(device))
            ))
            .send()
            .await
            .expect("the edge answers");
        assert_eq!(sse.status(), 200);
        streams.push(sse);
    }
    let (epoch, _) = sys.send("sam", json!("first")).await;
    assert_eq!(phone.notification().await.epoch, epoch);

    let mut browser = Browser::start_script(&dir, "status.mjs");
    let url = format!("{}/status", sys.ingest_url);
    let opened = browser
        .call(json!({"cmd": "open", "url": url, "key": common::API_KEY}))
        .await;
    assert_eq!(
        opened["status"], 200,
        "the key as the Basic password opens the page"
    );
    let shots = std::env::temp_dir().join(format!("gapless-status-{}", std::process::id()));
    std::fs::create_dir_all(&shots).expect("a directory for the screenshots");
    let before = browser
        .call(json!({"cmd": "figures", "after": 0, "shot": shots.join("before.png")}))
        .await;
    browser.call(json!({"cmd": "release"})).await;

    // Appends while the page watches: the rates and the p99 have something to show.
    let feed = {
        let ingest = sys.ingest_url.clone();
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            for i in 0..40 {
                let _ = http
                    .post(format!("{ingest}/v1/notifications"))
                    .bearer_auth(common::API_KEY)
                    .json(&json!({"user": "sam", "payload": i}))
                    .send()
                    .await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    browser
        .until("the page shows all four devices", |shown| {
            shown["figures"]["connections"] == "4"
        })
        .await;
    feed.await.expect("the feed ran");
    let after = browser
        .call(json!({"cmd": "figures", "after": 2, "shot": shots.join("after.png")}))
        .await;
    let figures = &after["figures"];
    assert!(
        figures["redis"]
            .as_str()
            .is_some_and(|r| r.starts_with("up")),
        "{after}"
    );
    assert!(
        figures["appends"].as_str().is_some_and(|r| r != "–"),
        "{after}"
    );
    let row = |shown: &Value, edge: &str| -> Vec<String> {
        shown["edges"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["edge"] == edge)
            .and_then(|r| r["cells"].as_array())
            .into_iter()
            .flatten()
            .map(|c| c.as_str().unwrap_or_default().to_owned())
            .collect()
    };
    let row_a = row(&after, "edge-a");
    assert_eq!(
        row_a.get(1..4),
        Some(&["2", "0", "0"].map(String::from)[..]),
        "edge-a: two WebSockets: {row_a:?}"
    );
    assert!(
        row_a.len() == 8 && row_a[6].ends_with("s left") && row_a[7] == "serving",
        "{row_a:?}"
    );
    let row_b = row(&after, "edge-b");
    assert_eq!(
        row_b.get(1..4),
        Some(&["0", "2", "0"].map(String::from)[..]),
        "edge-b: two SSE streams: {row_b:?}"
    );
    // The pixels of the figures changed once figures arrived.
    assert_ne!(
        before["shot"]["figures_sha256"], after["shot"]["figures_sha256"],
        "the screenshot shows figures, not the placeholders"
    );
    assert!(
        after["shot"]["bytes"].as_u64().is_some_and(|b| b > 10_000),
        "{after}"
    );

    // edge-b starts draining: the page says so within a refresh or two.
    b.stop.cancel();
    browser
        .until("the page shows edge-b draining", |shown| {
            row(shown, "edge-b").get(7).is_some_and(|s| s == "draining")
        })
        .await;
    drop(streams);
    browser.call(json!({"cmd": "stop"})).await;
    let _ = std::fs::remove_dir_all(&shots);
}
