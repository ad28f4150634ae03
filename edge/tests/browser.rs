//! A browser's own `EventSource` against the edge's SSE endpoint (DESIGN.md §5.1), in headless
//! Chromium (Debian's `/usr/bin/chromium`, driven by `playwright-core` from
//! `edge/tests/browser/`): it receives live notifications and, after its connection is
//! killed, reconnects by itself with `Last-Event-ID` and gets exactly the gap. Between the
//! browser and the edge sits a TCP proxy the test can take down and whose connections it
//! can kill, and which keeps each connection's request head.
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
        let mut child = Command::new("node")
            .arg("eventsource.mjs")
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
