//! What no client may take from the others at the edge: past the connection budget new
//! upgrades get 503 with a JSON error and `Retry-After` while open sessions keep receiving
//! and health answers; slow upgrade heads are closed on their deadline.

mod common;

use std::time::Duration;

use common::{Client, System, token};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends a raw upgrade request and reads the answer's head and body.
async fn raw_upgrade(addr: std::net::SocketAddr, token: &str) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connects");
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
