//! What no client may take from the others at the edge: past the connection budget new
//! upgrades get 503 with a JSON error and `Retry-After` while open sessions keep receiving
//! and health answers; slow upgrade heads are closed on their deadline.

mod common;

use std::time::Duration;

use common::{Client, System, token};
use gapless_shared::protocol::ServerMessage;
use gapless_shared::rate::Rate;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends a raw upgrade request from `127.0.0.1` and reads the answer's head and body.
async fn raw_upgrade(addr: std::net::SocketAddr, token: &str) -> String {
    raw_upgrade_from(1, addr, token).await
}

/// Sends a raw upgrade request from `127.0.0.<source>` and reads the answer's head and body.
async fn raw_upgrade_from(source: u8, addr: std::net::SocketAddr, token: &str) -> String {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(([127, 0, 0, source], 0).into())
        .expect("bind a loopback source");
    let mut s = socket.connect(addr).await.expect("connects");
    let head = format!(
        "GET /v1/ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Authorization: Bearer {token}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        if String::from_utf8_lossy(&got).contains("}}") {
            break;
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_connection_budget_upgrades_get_503_while_sessions_and_health_go_on() {
    let sys = System::start().await;
    let mut config = sys.edge_config("edge-cap");
    config.listener.max_established = 2;
    let edge = sys.edge(config).await;
    let url = edge.ws_url();
    let mut alice = Client::connect(&url, "alice", "phone", (None, None)).await;
    let mut bob = Client::connect(&url, "bob", "phone", (None, None)).await;
    assert_eq!(
        Client::open(&url, &token("carol", Some("phone")), false)
            .await
            .err(),
        Some(503)
    );
    let answer = raw_upgrade(edge.addr, &token("carol", Some("phone"))).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("retry-after: 1"),
        "{answer}"
    );
    assert!(answer.contains("\"too_many_connections\""), "{answer}");
    let health = reqwest::get(format!("http://{}/healthz", edge.addr))
        .await
        .expect("health answers");
    assert!(health.status().is_success());
    // Open sessions are untouched.
    sys.send("alice", json!("a")).await;
    sys.send("bob", json!("b")).await;
    assert_eq!(alice.notification().await.payload.get(), r#""a""#);
    assert_eq!(bob.notification().await.payload.get(), r#""b""#);
    // A session that ends frees its place.
    bob.close().await;
    common::eventually("a place is free again", Duration::from_secs(10), || {
        let url = url.clone();
        async move {
            Client::open(&url, &token("carol", Some("phone")), false)
                .await
                .is_ok()
        }
    })
    .await;
    let metrics = reqwest::get(format!("http://{}/metrics", edge.addr))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("gapless_listener_refused_total{reason=\"established_cap\"}"),
        "refusals are counted"
    );
    assert!(metrics.contains("gapless_listener_limit{budget=\"established\"}"));
}

/// SSE streams and held polls hold their connection like a WebSocket: past the edge's
/// budget, the next one is answered 503 with `Retry-After` at once rather than hung.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_connection_budget_streams_and_polls_get_503() {
    let sys = System::start().await;
    let mut config = sys.edge_config("edge-cap-http");
    config.listener.max_established = 2;
    let edge = sys.edge(config).await;
    let _stream = common::http::Sse::open(edge.addr, "alice", "laptop", "", None).await;
    let held = tokio::spawn({
        let addr = edge.addr;
        async move {
            reqwest::Client::new()
                .get(format!("http://{addr}/v1/poll?wait_ms=5000"))
                .bearer_auth(token("bob", Some("phone")))
                .send()
                .await
        }
    });
    common::eventually("the poll is held", Duration::from_secs(5), || async {
        let text = reqwest::get(format!("http://{}/metrics", edge.addr))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        text.lines().any(|l| l == "gapless_edge_polls_held 1")
    })
    .await;
    for path in ["/v1/sse", "/v1/poll?wait_ms=1000"] {
        let started = std::time::Instant::now();
        let answer = reqwest::Client::new()
            .get(format!("http://{}{path}", edge.addr))
            .bearer_auth(token("carol", Some("phone")))
            .send()
            .await
            .expect("answers");
        assert_eq!(answer.status(), 503, "{path}");
        assert!(answer.headers().contains_key("retry-after"), "{path}");
        let body: serde_json::Value = answer.json().await.expect("JSON");
        assert_eq!(body["error"]["code"], "too_many_connections", "{path}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{path} was held"
        );
    }
    held.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upgrade_head_is_closed_and_counted() {
    let sys = System::start().await;
    let mut config = sys.edge_config("edge-slow");
    config.listener.header_timeout = Duration::from_millis(300);
    let edge = sys.edge(config).await;
    let mut s = TcpStream::connect(edge.addr).await.expect("connects");
    s.write_all(b"GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgr")
        .await
        .expect("write");
    let started = tokio::time::Instant::now();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("closed within 5 s")
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without an answer");
    assert!(started.elapsed() >= Duration::from_millis(250));
    let metrics = reqwest::get(format!("http://{}/metrics", edge.addr))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(metrics.contains("gapless_listener_refused_total{reason=\"header_timeout\"}"));
}

/// The HTTP status of a raw answer.
fn status(answer: &str) -> u16 {
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {answer:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_tokens_lock_out_their_address_only() {
    let sys = System::start().await;
    let mut config = sys.edge_config("edge-guess");
    config.auth_failures = Rate {
        per_second: 1,
        burst: 5,
    };
    let edge = sys.edge(config).await;
    let mut statuses = Vec::new();
    for i in 0..10 {
        statuses.push(status(
            &raw_upgrade_from(2, edge.addr, &format!("forged.{i}.x")).await,
        ));
    }
    assert_eq!(&statuses[..5], &[401; 5], "{statuses:?}");
    assert!(statuses[5..].iter().all(|s| *s == 429), "{statuses:?}");
    // Locked out before the token is looked at: a valid one does not get through either.
    let answer = raw_upgrade_from(2, edge.addr, &token("alice", Some("phone"))).await;
    assert_eq!(status(&answer), 429, "{answer}");
    assert!(answer.contains("too_many_auth_failures"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("retry-after:"),
        "{answer}"
    );
    // Another address is unaffected.
    let answer = raw_upgrade_from(3, edge.addr, &token("alice", Some("phone"))).await;
    assert_eq!(status(&answer), 101, "{answer}");
    // Every refusal is counted by reason, those before the token is looked at too.
    let metrics = reqwest::get(format!("http://{}/metrics", edge.addr))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    for reason in ["unauthorized", "too_many_auth_failures"] {
        assert!(
            metrics.contains(&format!(
                "gapless_edge_auth_failures_total{{reason=\"{reason}\"}}"
            )),
            "{reason} is counted"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_connecting_too_often_gets_429() {
    let sys = System::start().await;
    let mut config = sys.edge_config("edge-flap");
    config.user_connects = Rate {
        per_second: 1,
        burst: 3,
    };
    let edge = sys.edge(config).await;
    for _ in 0..3 {
        Client::connect(&edge.ws_url(), "flappy", "phone", (None, None))
            .await
            .close()
            .await;
    }
    let answer = raw_upgrade(edge.addr, &token("flappy", Some("phone"))).await;
    assert_eq!(status(&answer), 429, "{answer}");
    assert!(answer.contains("too_many_connects"), "{answer}");
    // Other users are not slowed down.
    Client::connect(&edge.ws_url(), "calm", "phone", (None, None)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_past_its_connection_cap_is_refused_and_its_devices_keep_theirs() {
    let sys = System::start().await;
    let mut config = sys.edge_config("edge-user-cap");
    config.max_connections_per_user = 2;
    let edge = sys.edge(config).await;
    let url = edge.ws_url();
    // `after: 0` before any log: each starts at the log's first entry, whenever its resume
    // is read relative to the append below.
    let mut phone = Client::connect(&url, "alice", "phone", (None, Some(0))).await;
    let mut laptop = Client::connect(&url, "alice", "laptop", (None, Some(0))).await;
    let answer = raw_upgrade(edge.addr, &token("alice", Some("tablet"))).await;
    assert_eq!(status(&answer), 429, "{answer}");
    assert!(answer.contains("\"too_many_connections\""), "{answer}");
    sys.send("alice", json!("hi")).await;
    assert_eq!(phone.notification().await.seq, 1);
    assert_eq!(laptop.notification().await.seq, 1);
    Client::connect(&url, "bob", "tablet", (None, None)).await;
    laptop.close().await;
    common::eventually(
        "the user's place is free again",
        Duration::from_secs(10),
        || {
            let url = url.clone();
            async move {
                Client::open(&url, &token("alice", Some("tablet")), false)
                    .await
                    .is_ok()
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_past_its_cap_replaces_its_oldest_connection_with_4001() {
    let sys = System::start().await;
    let mut config = sys.edge_config("edge-device-cap");
    config.max_connections_per_device = 1;
    let edge = sys.edge(config).await;
    let url = edge.ws_url();
    // Positions are named explicitly: a device starting at the live end could start after
    // an append that raced its connect.
    let mut old = Client::connect(&url, "alice", "phone", (None, Some(0))).await;
    let (epoch, _) = sys.send("alice", json!(1)).await;
    assert_eq!(old.notification().await.seq, 1);
    old.ack(1).await;
    let mut new = Client::connect(&url, "alice", "phone", (Some(&epoch), Some(1))).await;
    assert_eq!(old.close_code().await, Some(4001));
    sys.send("alice", json!(2)).await;
    assert_eq!(new.notification().await.seq, 2);
    // Another device of the user is not touched.
    let mut laptop = Client::connect(&url, "alice", "laptop", (Some(&epoch), Some(2))).await;
    sys.send("alice", json!(3)).await;
    assert_eq!(laptop.notification().await.seq, 3);
    assert_eq!(new.notification().await.seq, 3);
}

async fn ack_fields(sys: &System, user: &str) -> Vec<String> {
    redis::cmd("HKEYS")
        .arg(gapless_shared::keys::acks(
            &gapless_shared::ids::UserId::parse(user).expect("user"),
        ))
        .query_async(&mut sys.redis_conn().await)
        .await
        .expect("HKEYS")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_id_the_edge_assigns_is_stored_only_once_it_acks() {
    let sys = System::start().await;
    let edge = sys.edge(sys.edge_config("edge-assign")).await;
    let url = edge.ws_url();
    sys.send("alice", json!(0)).await;
    let mut anonymous = Client::open(&url, &token("alice", None), false)
        .await
        .expect("connects");
    let ServerMessage::Welcome { device, .. } = anonymous.welcome.clone() else {
        panic!("welcome first");
    };
    anonymous
        .send(&gapless_shared::protocol::ClientMessage::Resume {
            epoch: None,
            after: None,
        })
        .await;
    // A named device's start is stored; once it is, the anonymous one's would have been too.
    let _named = Client::connect(&url, "alice", "phone", (None, None)).await;
    common::eventually(
        "the named device's start is stored",
        Duration::from_secs(10),
        || async {
            ack_fields(&sys, "alice")
                .await
                .contains(&"phone".to_owned())
        },
    )
    .await;
    assert!(
        !ack_fields(&sys, "alice").await.contains(&device),
        "nothing stored for {device}"
    );
    sys.send("alice", json!(1)).await;
    let n = anonymous.notification().await;
    anonymous.ack(n.seq).await;
    common::eventually(
        "the acked position is stored",
        Duration::from_secs(10),
        || async { ack_fields(&sys, "alice").await.contains(&device) },
    )
    .await;
}
