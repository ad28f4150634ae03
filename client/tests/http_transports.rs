//! The client's SSE and long-poll transports against a scripted HTTP/1.1 server on
//! 127.0.0.1:0 that answers exactly as DESIGN.md §5.1 says an edge does: what the client
//! asks for (position, wait), what it makes of the answers (duplicates dropped, drain hints,
//! refusals), and its acks. Tests against a real edge are in `edge/tests`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gapless_client::{Client, ClientConfig, Disconnect, Event, Position, Transport};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// A request as the server saw it.
#[derive(Debug, Clone)]
struct Request {
    method: String,
    /// Path and query.
    target: String,
    headers: HashMap<String, String>,
    body: String,
}

impl Request {
    fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or_default()
    }

    /// The query's pairs (no escapes in these tests).
    fn query(&self) -> HashMap<String, String> {
        self.target
            .split_once('?')
            .map(|(_, q)| q)
            .unwrap_or_default()
            .split('&')
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }
}

/// A scripted answer.
enum Answer {
    /// A whole response.
    Full {
        status: &'static str,
        headers: Vec<(&'static str, String)>,
        body: String,
    },
    /// `200 text/event-stream`, written chunk by chunk `gap` apart (so each arrives on its
    /// own), then held open for `hold` and ended.
    Stream {
        chunks: Vec<String>,
        gap: Duration,
        hold: Duration,
    },
}

/// The scripted server: answers per path in order; `/v1/ack` is `204` unless scripted.
#[derive(Clone, Default)]
struct Server {
    script: Arc<Mutex<HashMap<&'static str, VecDeque<Answer>>>>,
    seen: Arc<Mutex<Vec<Request>>>,
}

impl Server {
    async fn start() -> (Self, String) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = Self::default();
        let s = server.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(s.clone().serve(tcp));
            }
        });
        (server, format!("ws://{addr}/v1/ws"))
    }

    fn script(&self, path: &'static str, answer: Answer) {
        let mut script = self.script.lock().expect("script lock");
        script.entry(path).or_default().push_back(answer);
    }

    fn seen(&self, path: &str) -> Vec<Request> {
        let seen = self.seen.lock().expect("seen lock");
        seen.iter().filter(|r| r.path() == path).cloned().collect()
    }

    /// Requests on one connection, one after the other (reqwest keeps connections alive).
    async fn serve(self, tcp: TcpStream) {
        tcp.set_nodelay(true).expect("nodelay");
        let mut tcp = BufReader::new(tcp);
        loop {
            let mut line = String::new();
            if tcp.read_line(&mut line).await.unwrap_or(0) == 0 {
                return;
            }
            let mut parts = line.split_whitespace();
            let (method, target) = (
                parts.next().unwrap_or_default().to_owned(),
                parts.next().unwrap_or_default().to_owned(),
            );
            let mut headers = HashMap::new();
            loop {
                let mut h = String::new();
                tcp.read_line(&mut h).await.expect("a header line");
                let h = h.trim_end();
                if h.is_empty() {
                    break;
                }
                if let Some((k, v)) = h.split_once(':') {
                    headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
                }
            }
            let length: usize = headers
                .get("content-length")
                .and_then(|l| l.parse().ok())
                .unwrap_or(0);
            let mut body = vec![0; length];
            tcp.read_exact(&mut body).await.expect("the body");
            let request = Request {
                method,
                target,
                headers,
                body: String::from_utf8(body).expect("a UTF-8 body"),
            };
            let path = request.path().to_owned();
            self.seen.lock().expect("seen lock").push(request);
            let answer = self
                .script
                .lock()
                .expect("script lock")
                .get_mut(path.as_str())
                .and_then(VecDeque::pop_front);
            let answer = match (answer, path.as_str()) {
                (Some(a), _) => a,
                (None, "/v1/ack") => Answer::Full {
                    status: "204 No Content",
                    headers: Vec::new(),
                    body: String::new(),
                },
                // Nothing scripted: a held request that never answers.
                (None, _) => {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    return;
                }
            };
            let tcp = tcp.get_mut();
            match answer {
                Answer::Full {
                    status,
                    headers,
                    body,
                } => {
                    let mut head =
                        format!("HTTP/1.1 {status}\r\ncontent-length: {}\r\n", body.len());
                    for (k, v) in headers {
                        head.push_str(&format!("{k}: {v}\r\n"));
                    }
                    head.push_str("\r\n");
                    if tcp.write_all(head.as_bytes()).await.is_err()
                        || tcp.write_all(body.as_bytes()).await.is_err()
                    {
                        return;
                    }
                }
                Answer::Stream { chunks, gap, hold } => {
                    let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                                cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n";
                    if tcp.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    for chunk in chunks {
                        let framed = format!("{:x}\r\n{chunk}\r\n", chunk.len());
                        if tcp.write_all(framed.as_bytes()).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(gap).await;
                    }
                    tokio::time::sleep(hold).await;
                    let _ = tcp.write_all(b"0\r\n\r\n").await;
                    return;
                }
            }
        }
    }
}

fn config(url: String, transport: Transport) -> ClientConfig {
    let mut config = ClientConfig::new(vec![url], "test-token".into());
    config.transport = transport;
    config.backoff_min = Duration::from_millis(10);
    config.backoff_max = Duration::from_millis(50);
    config.heartbeat_grace = Duration::from_millis(500);
    config.connect_timeout = Duration::from_secs(5);
    config
}

fn notification(epoch: &str, seq: u64) -> String {
    format!(
        r#"{{"type":"notification","seq":{seq},"epoch":"{epoch}","ts":1,"payload":{{"n":{seq}}}}}"#
    )
}

const WELCOME: &str =
    r#"{"type":"welcome","user":"u","device":"phone","edge":"edge-1","heartbeat_ms":2000}"#;

/// The next event within 5 s.
async fn next(client: &mut Client) -> Event {
    tokio::time::timeout(Duration::from_secs(5), client.next_event())
        .await
        .expect("an event within 5 s")
}

#[tokio::test]
async fn sse_resumes_at_its_position_drops_duplicates_acks_and_takes_the_drain_hint() {
    let (server, url) = Server::start().await;
    let n2 = notification("e1", 2);
    let n3 = notification("e1", 3);
    let n4 = notification("e1", 4);
    // CRLF line ends, a ping comment, an event split across chunks mid-line and mid-CRLF.
    server.script(
        "/v1/sse",
        Answer::Stream {
            chunks: vec![
                format!("retry: 1000\r\nevent: welcome\r\ndata: {WELCOME}\r\n\r\n"),
                format!("event: notification\r\nid: e1:2\r\ndata: {n2}\r\n\r\n: ping\r\n"),
                format!("event: notification\r\nid: e1:3\r\ndata: {}", &n3[..20]),
                format!("{}\r", &n3[20..]),
                "\n\r\n".into(),
                format!("event: notification\ndata: {n4}\n\n"),
                "retry: 70\nevent: reconnect\ndata: {\"type\":\"reconnect\",\"delay_ms\":70}\n\n"
                    .into(),
            ],
            gap: Duration::from_millis(100),
            hold: Duration::from_millis(200),
        },
    );
    let mut client = Client::new(
        config(url, Transport::Sse),
        Some(Position {
            epoch: Some("e1".into()),
            seq: 2,
        }),
    );
    match next(&mut client).await {
        Event::Connected { edge, device } => {
            assert_eq!((edge, device), ("edge-1".into(), "phone".into()))
        }
        other => panic!("expected connected, got {other:?}"),
    }
    let opened = &server.seen("/v1/sse")[0];
    assert_eq!(opened.method, "GET");
    assert_eq!(opened.headers["authorization"], "Bearer test-token");
    let query = opened.query();
    assert_eq!(
        (query["epoch"].as_str(), query["after"].as_str()),
        ("e1", "2")
    );
    for seq in [3, 4] {
        match next(&mut client).await {
            Event::Notification(n) => {
                assert_eq!(
                    (n.seq, n.payload.get()),
                    (seq, format!("{{\"n\":{seq}}}").as_str())
                );
                client.ack(n.seq);
            }
            other => panic!("expected notification {seq}, got {other:?}"),
        }
    }
    match next(&mut client).await {
        Event::Disconnected { reason, retry_in } => {
            assert!(
                matches!(reason, Disconnect::Closed { code: 1012, .. }),
                "{reason}"
            );
            assert_eq!(retry_in, Duration::from_millis(70), "the drain hint, as is");
        }
        other => panic!("expected the drain, got {other:?}"),
    }
    assert_eq!(client.stats().duplicates, 1);
    // Each ack landed while the next event was awaited (100 ms apart).
    let acks: Vec<Request> = server.seen("/v1/ack");
    let bodies: Vec<&str> = acks.iter().map(|r| r.body.as_str()).collect();
    assert_eq!(
        bodies,
        [r#"{"epoch":"e1","seq":3}"#, r#"{"epoch":"e1","seq":4}"#]
    );
    assert_eq!(acks[0].method, "POST");
    assert_eq!(
        acks[0].target, "/v1/ack?device=phone",
        "the welcome's device"
    );
    assert_eq!(acks[0].headers["authorization"], "Bearer test-token");
    assert_eq!(acks[0].headers["content-type"], "application/json");

    // The reconnect names the position, which acknowledges 4; a close event ends it.
    server.script(
        "/v1/sse",
        Answer::Stream {
            chunks: vec![
                format!("event: welcome\ndata: {WELCOME}\n\n"),
                "event: close\ndata: {\"type\":\"close\",\"code\":4001,\"reason\":\"token expired\"}\n\n"
                    .into(),
            ],
            gap: Duration::from_millis(10),
            hold: Duration::from_millis(200),
        },
    );
    assert!(matches!(next(&mut client).await, Event::Connected { .. }));
    let query = server.seen("/v1/sse")[1].query();
    assert_eq!(
        (query["epoch"].as_str(), query["after"].as_str()),
        ("e1", "4")
    );
    match next(&mut client).await {
        Event::Disconnected { reason, .. } => {
            assert!(
                matches!(&reason, Disconnect::Closed { code: 4001, reason } if reason.contains("token expired")),
                "{reason}"
            )
        }
        other => panic!("expected the close, got {other:?}"),
    }
}

#[tokio::test]
async fn sse_and_poll_refusals_fail_the_open_with_the_edges_reason_and_retry_after() {
    for transport in [Transport::Sse, Transport::Poll] {
        let (server, url) = Server::start().await;
        let path = if transport == Transport::Sse {
            "/v1/sse"
        } else {
            "/v1/poll"
        };
        server.script(
            path,
            Answer::Full {
                status: "401 Unauthorized",
                headers: vec![("content-type", "application/json".into())],
                body: r#"{"error":{"code":"unauthorized","message":"bad token"}}"#.into(),
            },
        );
        server.script(
            path,
            Answer::Full {
                status: "429 Too Many Requests",
                headers: vec![("retry-after", "1".into())],
                body: r#"{"error":{"code":"rate_limited","message":"slow down"}}"#.into(),
            },
        );
        let mut client = Client::new(config(url, transport), None);
        match next(&mut client).await {
            Event::Disconnected { reason, .. } => {
                assert!(
                    matches!(&reason, Disconnect::Refused { status: 401, message, .. } if message.contains("bad token")),
                    "{reason}"
                )
            }
            other => panic!("{transport:?}: expected a refusal, got {other:?}"),
        }
        match next(&mut client).await {
            Event::Disconnected { reason, retry_in } => {
                assert!(
                    matches!(&reason, Disconnect::Refused { code: Some(code), .. } if code == "rate_limited"),
                    "{reason}"
                );
                assert!(retry_in >= Duration::from_secs(1), "{retry_in:?}");
            }
            other => panic!("{transport:?}: expected a refusal, got {other:?}"),
        }
        // A first open names no position.
        let first = &server.seen(path)[0];
        assert!(!first.query().contains_key("epoch") && !first.query().contains_key("after"));
    }
}

#[tokio::test]
async fn poll_loops_at_the_position_it_handed_out_and_resumes_after_an_error() {
    let (server, url) = Server::start().await;
    let headers = || {
        vec![
            ("content-type", "application/json".to_owned()),
            ("gapless-edge", "edge-1".to_owned()),
            ("gapless-device", "phone".to_owned()),
            ("gapless-heartbeat-ms", "2000".to_owned()),
        ]
    };
    let answer = |body: String| Answer::Full {
        status: "200 OK",
        headers: headers(),
        body,
    };
    server.script("/v1/poll", answer("[]".into()));
    server.script(
        "/v1/poll",
        answer(format!(
            "[{},{}]",
            notification("e1", 1),
            notification("e1", 2)
        )),
    );
    server.script(
        "/v1/poll",
        answer(format!(
            r#"[{{"type":"reset","epoch":"e2","first_seq":5,"reason":"epoch_changed"}},{}]"#,
            notification("e2", 5)
        )),
    );
    server.script(
        "/v1/poll",
        Answer::Full {
            status: "503 Service Unavailable",
            headers: vec![("retry-after", "0".into())],
            body: r#"{"error":{"code":"draining","message":"edge draining"}}"#.into(),
        },
    );
    server.script("/v1/poll", answer("[]".into()));
    let mut client = Client::new(config(url, Transport::Poll), None);
    match next(&mut client).await {
        Event::Connected { edge, device } => {
            assert_eq!((edge, device), ("edge-1".into(), "phone".into()))
        }
        other => panic!("expected connected, got {other:?}"),
    }
    for seq in [1, 2] {
        match next(&mut client).await {
            Event::Notification(n) => assert_eq!(n.seq, seq),
            other => panic!("expected notification {seq}, got {other:?}"),
        }
    }
    assert!(matches!(
        next(&mut client).await,
        Event::Reset { first_seq: 5, .. }
    ));
    assert!(matches!(next(&mut client).await, Event::Notification(n) if n.seq == 5));
    match next(&mut client).await {
        Event::Disconnected { reason, .. } => assert!(
            matches!(&reason, Disconnect::Refused { status: 503, code: Some(code), .. } if code == "draining"),
            "{reason}"
        ),
        other => panic!("expected the drain refusal, got {other:?}"),
    }
    // The reopen names the position; answered with `[]`, the open succeeds.
    assert!(matches!(next(&mut client).await, Event::Connected { .. }));
    let polls: Vec<HashMap<String, String>> =
        server.seen("/v1/poll").iter().map(Request::query).collect();
    let at = |q: &HashMap<String, String>| {
        (
            q.get("epoch").cloned().unwrap_or_default(),
            q.get("after").cloned().unwrap_or_default(),
            q["wait_ms"].clone(),
        )
    };
    let expected = [
        ("", "", "0"),       // open: no position, no wait
        ("", "", "2000"),    // the heartbeat bounds the wait
        ("e1", "2", "2000"), // everything handed out
        ("e2", "5", "2000"), // after the reset and 5
        ("e2", "5", "0"),    // the reopen, at the position
    ];
    assert_eq!(polls.len(), expected.len(), "{polls:?}");
    for (q, (epoch, after, wait)) in polls.iter().zip(expected) {
        assert_eq!(at(q), (epoch.into(), after.into(), wait.into()), "{q:?}");
        assert_eq!(q["limit"], "100");
    }
    assert!(server.seen("/v1/ack").is_empty(), "poll never posts acks");
}

#[tokio::test]
async fn sse_pings_keep_the_stream_alive_and_silence_past_the_deadline_ends_it() {
    let (server, url) = Server::start().await;
    // Heartbeat 100 ms + grace 500 ms: a 600 ms deadline, pings every 300 ms for 1.5 s.
    let welcome = WELCOME.replace("2000", "100");
    let mut chunks = vec![format!("event: welcome\ndata: {welcome}\n\n")];
    chunks.extend((0..5).map(|_| ": ping\n".to_owned()));
    chunks.push(format!(
        "event: notification\ndata: {}\n\n",
        notification("e1", 1)
    ));
    server.script(
        "/v1/sse",
        Answer::Stream {
            chunks,
            gap: Duration::from_millis(300),
            hold: Duration::from_secs(30),
        },
    );
    let mut client = Client::new(config(url, Transport::Sse), None);
    assert!(matches!(next(&mut client).await, Event::Connected { .. }));
    assert!(matches!(next(&mut client).await, Event::Notification(n) if n.seq == 1));
    let quiet = tokio::time::Instant::now();
    match next(&mut client).await {
        Event::Disconnected { reason, .. } => {
            assert!(
                matches!(&reason, Disconnect::Lost(why) if why.contains("nothing from the edge")),
                "{reason}"
            );
            let waited = quiet.elapsed();
            assert!(
                waited >= Duration::from_millis(250) && waited < Duration::from_secs(2),
                "{waited:?}"
            );
        }
        other => panic!("expected the silence to end it, got {other:?}"),
    }
}
