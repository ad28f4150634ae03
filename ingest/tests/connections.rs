//! The ingest's accept side against clients that hold connections open (DESIGN.md §4, the
//! hardening of the listener): slow heads, silent and idle connections are closed on their
//! deadlines, one address cannot take every unauthenticated slot, a full established budget
//! answers 503 with `Retry-After`, and health answers throughout.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{API_KEY, TestIngest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

/// An ingest whose listener has short deadlines and small budgets.
async fn ingest(adjust: impl FnOnce(&mut gapless_shared::listener::ListenerConfig)) -> TestIngest {
    TestIngest::start_with(&[], |c| {
        c.listener.header_timeout = Duration::from_millis(400);
        c.listener.idle_timeout = Duration::from_millis(600);
        c.listener.unauth_timeout = Duration::from_millis(800);
        c.listener.request_timeout = Duration::from_millis(800);
        adjust(&mut c.listener);
    })
    .await
}

fn addr(ingest: &TestIngest) -> SocketAddr {
    ingest
        .base
        .trim_start_matches("http://")
        .parse()
        .expect("host:port")
}

/// A TCP connection to `to` from the loopback address `127.0.0.<source>`.
async fn connect_from(source: u8, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(([127, 0, 0, source], 0).into())
        .expect("bind a loopback source");
    socket.connect(to).await.expect("connects")
}

/// Waits until the server closes `stream` (EOF or reset), returning how long it took, or
/// panics after `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(started + within, stream.read(&mut buf)).await {
            Err(_) => panic!("the connection was still open after {within:?}"),
            Ok(Ok(0) | Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => {}
        }
    }
}

/// Sends a request and reads one response head and body (Content-Length framed).
async fn request(stream: &mut TcpStream, head: &str) -> (u16, String) {
    stream.write_all(head.as_bytes()).await.expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("answered")
            .expect("read");
        assert!(
            n > 0,
            "closed before an answer: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                })
                .unwrap_or(0);
            if body.len() >= length {
                let status = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .expect("a status line");
                return (status, text);
            }
        }
    }
}

fn get(path: &str, authorized: bool) -> String {
    let auth = if authorized {
        format!("Authorization: Bearer {API_KEY}\r\n")
    } else {
        String::new()
    };
    format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}\r\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_head_and_a_silent_connection_are_closed_on_their_deadlines() {
    let ingest = ingest(|l| l.unauth_timeout = Duration::from_secs(30)).await;
    let to = addr(&ingest);
    // One byte of a head, then nothing: the header timeout (400 ms).
    let mut slow = connect_from(1, to).await;
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHo")
        .await
        .expect("write");
    let took = closed_within(&mut slow, Duration::from_secs(5)).await;
    assert!(took >= Duration::from_millis(350), "{took:?}");
    // Nothing at all: idle from the start (600 ms).
    let mut silent = connect_from(1, to).await;
    closed_within(&mut silent, Duration::from_secs(5)).await;
    // A keep-alive connection after an authenticated request: idle too.
    let mut kept = connect_from(1, to).await;
    let (status, _) = request(&mut kept, &get("/v1/users/u/notifications", true)).await;
    assert_eq!(status, 200);
    let took = closed_within(&mut kept, Duration::from_secs(5)).await;
    assert!(took >= Duration::from_millis(500), "{took:?}");
    let metrics = ingest
        .http
        .get(ingest.url("/metrics"))
        .send()
        .await
        .expect("metrics");
    let metrics = metrics.text().await.expect("text");
    for reason in ["header_timeout", "idle_timeout"] {
        assert!(
            metrics.contains(&format!(
                "gapless_listener_refused_total{{reason=\"{reason}\"}}"
            )),
            "{reason} is counted"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_connections_end_at_their_deadline_and_a_slow_body_gets_408() {
    let ingest = ingest(|l| l.idle_timeout = Duration::from_secs(30)).await;
    let to = addr(&ingest);
    // Health checks keep a connection only until the authentication deadline.
    let mut health = connect_from(1, to).await;
    assert_eq!(request(&mut health, &get("/healthz", false)).await.0, 200);
    let took = closed_within(&mut health, Duration::from_secs(5)).await;
    assert!(took >= Duration::from_millis(600), "{took:?}");
    // One that never sent a request is closed at the same deadline, counted apart: only it
    // is worth a warning (a scraper's connection is not).
    let mut silent = connect_from(1, to).await;
    closed_within(&mut silent, Duration::from_secs(5)).await;
    let metrics = ingest
        .http
        .get(ingest.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let count = |reason: &str| {
        metrics
            .lines()
            .find_map(|l| {
                l.strip_prefix(&format!(
                    "gapless_listener_refused_total{{reason=\"{reason}\"}} "
                ))
            })
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    assert!(count("unauthenticated_idle") >= 1.0, "{metrics}");
    assert!(count("unauthenticated_timeout") >= 1.0, "{metrics}");
    // An authenticated request whose body never arrives: 408 with a JSON error.
    let mut slow = connect_from(1, to).await;
    let head = format!(
        "POST /v1/notifications HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"user\""
    );
    let (status, answer) = request(&mut slow, &head).await;
    assert_eq!(status, 408, "{answer}");
    assert!(answer.contains("\"request_timeout\""), "{answer}");
    closed_within(&mut slow, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_take_the_unauthenticated_budget_from_the_others() {
    let ingest = ingest(|l| {
        l.unauth_timeout = Duration::from_secs(30);
        l.idle_timeout = Duration::from_secs(30);
        l.header_timeout = Duration::from_secs(30);
        l.max_pending_per_source = 5;
        l.max_pending = 8;
    })
    .await;
    let to = addr(&ingest);
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(connect_from(1, to).await);
    }
    // The sixth from the same address is closed at once.
    let mut sixth = connect_from(1, to).await;
    let took = closed_within(&mut sixth, Duration::from_secs(2)).await;
    assert!(took < Duration::from_secs(1), "{took:?}");
    // Other addresses fill the rest; past the global cap the oldest is evicted, so a new
    // client is always served.
    for source in 2..=4 {
        held.push(connect_from(source, to).await);
    }
    for source in 5..=7 {
        let mut client = connect_from(source, to).await;
        assert_eq!(request(&mut client, &get("/healthz", false)).await.0, 200);
        held.push(client);
    }
    let mut oldest = held.remove(0);
    closed_within(&mut oldest, Duration::from_secs(2)).await;
    let metrics = ingest
        .http
        .get(ingest.url("/metrics"))
        .send()
        .await
        .expect("metrics");
    let metrics = metrics.text().await.expect("text");
    for reason in ["source_cap", "evicted"] {
        assert!(
            metrics.contains(&format!(
                "gapless_listener_refused_total{{reason=\"{reason}\"}}"
            )),
            "{reason} is counted"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_established_cap_producers_get_503_and_health_still_answers() {
    let ingest = ingest(|l| {
        l.idle_timeout = Duration::from_secs(30);
        l.max_established = 2;
    })
    .await;
    let to = addr(&ingest);
    let mut producers = Vec::new();
    for _ in 0..2 {
        let mut p = connect_from(1, to).await;
        assert_eq!(
            request(&mut p, &get("/v1/users/u/notifications", true))
                .await
                .0,
            200
        );
        producers.push(p);
    }
    let mut third = connect_from(1, to).await;
    let (status, answer) = request(&mut third, &get("/v1/users/u/notifications", true)).await;
    assert_eq!(status, 503, "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("retry-after: 1"),
        "{answer}"
    );
    assert!(answer.contains("too_many_connections"), "{answer}");
    closed_within(&mut third, Duration::from_secs(2)).await;
    // Health, unauthenticated answers and the established producers keep working.
    let mut other = connect_from(2, to).await;
    assert_eq!(request(&mut other, &get("/healthz", false)).await.0, 200);
    assert_eq!(
        request(&mut other, &get("/v1/users/u/notifications", false))
            .await
            .0,
        401
    );
    for p in &mut producers {
        assert_eq!(
            request(p, &get("/v1/users/u/notifications", true)).await.0,
            200
        );
    }
    // A producer leaving frees its place.
    drop(producers.pop());
    gapless_shared::testing::eventually("a place is free again", common::DEADLINE, || async {
        let mut c = connect_from(3, to).await;
        request(&mut c, &get("/v1/users/u/notifications", true))
            .await
            .0
            == 200
    })
    .await;
}
