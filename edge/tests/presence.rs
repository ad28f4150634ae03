//! Presence and delivery status (DESIGN.md §4): `GET /v1/users/{user}/presence` and
//! `GET /v1/users/{user}/devices[?seq=N]` on the ingest, answered from what real edges record
//! in Redis while devices connect (WebSocket, SSE, long-poll) to two edges, ack different
//! seqs and leave; an edge that dies leaves entries no answer counts.

mod common;

use std::time::Duration;

use common::http::{Sse, poll_once};
use common::process::EdgeProcess;
use common::{API_KEY, Client, System, eventually};
use reqwest::StatusCode;
use serde_json::{Value, json};

async fn get(sys: &System, path: &str) -> (StatusCode, Value) {
    let response = reqwest::Client::new()
        .get(format!("{}{path}", sys.ingest_url))
        .bearer_auth(API_KEY)
        .send()
        .await
        .expect("the ingest answers");
    let status = response.status();
    (status, response.json().await.expect("JSON"))
}

/// (device, edge, transport) of each connection presence lists, sorted.
async fn connected(sys: &System, user: &str) -> Vec<(String, String, String)> {
    let (status, body) = get(sys, &format!("/v1/users/{user}/presence")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["user"], user);
    let mut out: Vec<_> = body["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .map(|d| {
            assert!(
                d["since"].as_u64().is_some_and(|s| s > 1_700_000_000_000),
                "{d}"
            );
            let s = |k: &str| d[k].as_str().expect("string").to_owned();
            (s("device"), s("edge"), s("transport"))
        })
        .collect();
    out.sort();
    out
}

fn entry(device: &str, edge: &str, transport: &str) -> (String, String, String) {
    (device.into(), edge.into(), transport.into())
}

/// device -> its object in the devices answer (with `query`).
async fn devices(sys: &System, user: &str, query: &str) -> (Value, Vec<(String, Value)>) {
    let (status, body) = get(sys, &format!("/v1/users/{user}/devices{query}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let list = body["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .map(|d| (d["device"].as_str().expect("device").to_owned(), d.clone()))
        .collect();
    (body, list)
}

fn device<'a>(list: &'a [(String, Value)], name: &str) -> &'a Value {
    &list
        .iter()
        .find(|(d, _)| d == name)
        .unwrap_or_else(|| panic!("no device {name} in {list:?}"))
        .1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_devices_on_two_edges_connect_ack_different_seqs_and_leave() {
    let sys = System::start().await;
    let fast = |id: &str| {
        let mut config = sys.edge_config(id);
        config.ack_flush = Duration::from_millis(50);
        config
    };
    let a = sys.edge(fast("edge-a")).await;
    // edge-b is a process, to die for real below; a 3 s lease so its entries stop counting
    // soon after.
    let mut b = EdgeProcess::start(
        &sys,
        "edge-b",
        &[("GAPLESS_ACK_FLUSH_MS", "50"), ("GAPLESS_LEASE_MS", "3000")],
    )
    .await;
    assert!(connected(&sys, "alice").await.is_empty(), "nobody yet");

    // phone: WebSocket on edge-a; laptop: SSE on edge-b; tablet: long-poll on edge-b.
    let mut phone = Client::connect(&a.ws_url(), "alice", "phone", (None, None)).await;
    let mut laptop = Sse::open(b.addr, "alice", "laptop", "", None).await;
    let (status, _, _) = poll_once(b.addr, "alice", "tablet", "wait_ms=0").await;
    assert_eq!(status, StatusCode::OK);
    // Another user's device is never listed.
    let _bob = Client::connect(&b.ws_url(), "bob", "phone", (None, None)).await;
    let all = vec![
        entry("laptop", "edge-b", "sse"),
        entry("phone", "edge-a", "websocket"),
        entry("tablet", "edge-b", "poll"),
    ];
    eventually("all three are present", Duration::from_secs(5), || async {
        connected(&sys, "alice").await == all
    })
    .await;

    // Five notifications; each device acks a different seq.
    let mut epoch = String::new();
    for i in 1..=5 {
        epoch = sys.send("alice", json!({ "n": i })).await.0;
    }
    assert_eq!(phone.take(5).await, [1, 2, 3, 4, 5]);
    phone.ack(5).await;
    assert_eq!(laptop.seqs(5).await, [1, 2, 3, 4, 5]);
    laptop.epoch = Some(epoch.clone());
    assert_eq!(laptop.ack(3).await, StatusCode::NO_CONTENT);
    let (status, _, body) = poll_once(
        b.addr,
        "alice",
        "tablet",
        &format!("epoch={epoch}&after=1&wait_ms=0"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let acked = |list: &[(String, Value)], d: &str| device(list, d)["acked"].as_u64();
    eventually(
        "the three positions are stored",
        Duration::from_secs(5),
        || async {
            let (_, list) = devices(&sys, "alice", "").await;
            list.len() == 3
                && acked(&list, "phone") == Some(5)
                && acked(&list, "laptop") == Some(3)
                && acked(&list, "tablet") == Some(1)
        },
    )
    .await;
    let (body, list) = devices(&sys, "alice", "?seq=3").await;
    assert_eq!(body["epoch"], epoch.as_str());
    assert_eq!(body["last_seq"], 5);
    for (name, behind, acknowledged) in [
        ("phone", 0, true),
        ("laptop", 2, true),
        ("tablet", 4, false),
    ] {
        let d = device(&list, name);
        assert_eq!(d["epoch"], epoch.as_str(), "{d}");
        assert_eq!(d["behind"], behind, "{name}: {d}");
        assert_eq!(d["acknowledged"], acknowledged, "{name} has seq 3: {d}");
        assert_eq!(d["connected"], true, "{d}");
        assert!(d["last_seen"].as_u64().is_some(), "{d}");
    }
    let (_, list) = devices(&sys, "alice", "?seq=5").await;
    assert_eq!(device(&list, "phone")["acknowledged"], true);
    assert_eq!(device(&list, "laptop")["acknowledged"], false);
    let (_, list) = devices(&sys, "alice", "").await;
    assert!(
        device(&list, "phone").get("acknowledged").is_none(),
        "only with ?seq="
    );

    // The phone leaves: it is no longer present, and its status stays.
    phone.close().await;
    eventually("the phone left", Duration::from_secs(5), || async {
        !connected(&sys, "alice")
            .await
            .iter()
            .any(|(d, _, _)| d == "phone")
    })
    .await;
    let (_, list) = devices(&sys, "alice", "?seq=5").await;
    let gone = device(&list, "phone");
    assert_eq!(
        (gone["connected"].clone(), gone["acked"].clone()),
        (json!(false), json!(5))
    );
    assert_eq!(gone["acknowledged"], true);

    // edge-b is killed (SIGKILL: no drain, no leave): its entries stay in Redis, but its
    // devices stop counting once its lease for the user runs out, and the read deletes them.
    b.sigkill();
    drop(laptop);
    let stale: u64 = redis::cmd("HLEN")
        .arg("gl:{alice}:p")
        .query_async(&mut sys.redis_conn().await)
        .await
        .expect("HLEN");
    assert_eq!(stale, 2, "the killed edge left its two entries behind");
    eventually(
        "edge-b's devices stop counting",
        Duration::from_secs(30),
        || async { connected(&sys, "alice").await.is_empty() },
    )
    .await;
    let left: u64 = redis::cmd("HLEN")
        .arg("gl:{alice}:p")
        .query_async(&mut sys.redis_conn().await)
        .await
        .expect("HLEN");
    assert_eq!(left, 0, "the dead entries were deleted by the read");
    // The status of every device is still there.
    let (_, list) = devices(&sys, "alice", "").await;
    assert_eq!(list.len(), 3);
    assert!(
        list.iter().all(|(_, d)| d["connected"] == false),
        "{list:?}"
    );
}

#[tokio::test]
async fn bad_requests_get_clear_errors_and_an_unknown_user_is_empty() {
    let sys = System::start().await;
    let (status, body) = get(&sys, "/v1/users/no%20body/presence").await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (StatusCode::BAD_REQUEST, json!("invalid_user"))
    );
    for query in ["?seq=0", "?seq=x", "?after=1"] {
        let (status, body) = get(&sys, &format!("/v1/users/alice/devices{query}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
        assert_eq!(body["error"]["code"], "invalid_query", "{query}");
    }
    let (_, body) = get(&sys, "/v1/users/nobody/devices?seq=1").await;
    assert_eq!(
        body,
        json!({"user": "nobody", "epoch": null, "last_seq": 0, "devices": []})
    );
    assert!(connected(&sys, "nobody").await.is_empty());
    let anonymous = reqwest::Client::new()
        .get(format!("{}/v1/users/alice/presence", sys.ingest_url))
        .send()
        .await
        .expect("answers");
    assert_eq!(
        anonymous.status(),
        StatusCode::UNAUTHORIZED,
        "behind the API key"
    );
}
