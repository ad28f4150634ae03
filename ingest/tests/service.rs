//! The ingest as a service (DESIGN.md §4, §2 "No loss"): history reads, health, readiness and
//! metrics, refusing an unmigrated Redis, and surviving a Redis crash without losing a write
//! it acknowledged.

mod common;

use gapless_shared::on_both;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{DEADLINE, TestIngest, error_code};
use gapless_shared::config::{RedisConfig, Secret};
use gapless_shared::testing::TestRedis;
use gapless_shared::testing::eventually;
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

/// The history answer, with payloads kept as the exact JSON text.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct History {
    user: String,
    epoch: Option<String>,
    last_seq: u64,
    notifications: Vec<HistoryEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryEntry {
    seq: u64,
    ts: u64,
    payload: Box<RawValue>,
}

/// Appends one notification through the single-append endpoint; returns its answer.
async fn append_one(ingest: &TestIngest, body: String) -> serde_json::Value {
    let (status, answer) = common::json_of(
        ingest
            .post("/v1/notifications", "application/json", body)
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    answer
}

async fn history(ingest: &TestIngest, user: &str, query: &str) -> History {
    let response = ingest
        .http
        .get(ingest.url(&format!("/v1/users/{user}/notifications{query}")))
        .bearer_auth(common::API_KEY)
        .send()
        .await
        .expect("the ingest answers");
    assert_eq!(response.status(), StatusCode::OK);
    let text = response.text().await.expect("body arrives");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("history shape ({e}): {text}"))
}

/// Schema 1 wrote entries as `<seq>-0` with the ingest time in a field `t`; schema 2 writes
/// `<seq>-<ms>`. A log holding both reads as one, in order, each with its time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_reads_entries_of_both_schema_versions() {
    let ingest = TestIngest::start().await;
    let mut conn = ingest.redis_conn().await;
    let _: () = redis::cmd("HSET")
        .arg("gl:{olduser}:m")
        .arg("epoch")
        .arg("e1")
        .arg("seq")
        .arg(1)
        .query_async(&mut conn)
        .await
        .expect("HSET");
    let _: String = redis::cmd("XADD")
        .arg("gl:{olduser}:s")
        .arg("1-0")
        .arg("p")
        .arg("\"old\"")
        .arg("t")
        .arg(1_700_000_000_000u64)
        .query_async(&mut conn)
        .await
        .expect("XADD");
    let before = gapless_shared::now_ms();
    let answer = append_one(&ingest, r#"{"user":"olduser","payload":"new"}"#.to_owned()).await;
    assert_eq!(
        (answer["epoch"].as_str(), answer["seq"].as_u64()),
        (Some("e1"), Some(2))
    );

    let all = history(&ingest, "olduser", "").await;
    let seen: Vec<(u64, &str)> = all
        .notifications
        .iter()
        .map(|e| (e.seq, e.payload.get()))
        .collect();
    assert_eq!(seen, [(1, "\"old\""), (2, "\"new\"")]);
    assert_eq!(all.notifications[0].ts, 1_700_000_000_000);
    assert!(all.notifications[1].ts >= before.saturating_sub(1_000));
}

on_both! {
async fn history_returns_retained_entries_after_a_seq(kind: Kind) {
    let ingest = TestIngest::start_on(kind).await;
    let user = "historian";
    let payloads = [
        r#"{"title": "héllo",  "n": [1, 2.50, null]}"#,
        r#""plain""#,
        "42",
        r#"{"nested":{"deep":[{"x":true}]}}"#,
        "[ ]",
    ];
    let started = gapless_shared::now_ms();
    let mut epoch = String::new();
    for (i, payload) in payloads.iter().enumerate() {
        let answer = append_one(
            &ingest,
            format!(r#"{{"user":"{user}","payload":{payload}}}"#),
        )
        .await;
        assert_eq!(answer["seq"], i as u64 + 1);
        epoch = answer["epoch"].as_str().expect("epoch").to_owned();
    }

    let all = history(&ingest, user, "").await;
    assert_eq!(all.user, user);
    assert_eq!(all.epoch.as_deref(), Some(epoch.as_str()));
    assert_eq!(all.last_seq, 5);
    assert_eq!(
        all.notifications
            .iter()
            .map(|e| (e.seq, e.payload.get()))
            .collect::<Vec<_>>(),
        payloads
            .iter()
            .enumerate()
            .map(|(i, p)| (i as u64 + 1, *p))
            .collect::<Vec<_>>(),
        "payloads come back byte for byte"
    );
    let now = gapless_shared::now_ms();
    for entry in &all.notifications {
        assert!(
            (started.saturating_sub(1_000)..=now + 1_000).contains(&entry.ts),
            "ingest time {} is not around now",
            entry.ts
        );
    }

    let page = history(&ingest, user, "?after=2&limit=2").await;
    assert_eq!(
        page.notifications.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [3, 4]
    );
    assert_eq!(page.last_seq, 5);
    assert_eq!(page.epoch.as_deref(), Some(epoch.as_str()));
    let tail = history(&ingest, user, "?after=4").await;
    assert_eq!(
        tail.notifications.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [5]
    );
    let past_end = history(&ingest, user, "?after=5&limit=10").await;
    assert!(past_end.notifications.is_empty());
    assert_eq!(past_end.last_seq, 5);
}
}

on_both! {
async fn history_of_an_unknown_user_is_empty_with_no_epoch(kind: Kind) {
    let ingest = TestIngest::start_on(kind).await;
    let answer = history(&ingest, "stranger", "?after=3").await;
    assert_eq!(answer.user, "stranger");
    assert_eq!(answer.epoch, None);
    assert_eq!(answer.last_seq, 0);
    assert!(answer.notifications.is_empty());
    let (_, body) = ingest.get_json("/v1/users/stranger/notifications").await;
    assert_eq!(body["epoch"], serde_json::Value::Null, "{body}");
    assert_eq!(body["notifications"], json!([]), "{body}");
}
}

on_both! {
async fn health_readiness_and_metrics_answer(kind: Kind) {
    let ingest = TestIngest::start_on(kind).await;
    let get = |path: &str| ingest.http.get(ingest.url(path)).send();

    let healthz = get("/healthz").await.expect("healthz answers");
    assert_eq!(healthz.status(), StatusCode::OK);
    let readyz = get("/readyz").await.expect("readyz answers");
    assert_eq!(readyz.status(), StatusCode::OK);

    ingest.append("metered", json!({ "m": 1 })).await;
    let (status, _) = ingest
        .post_json(
            "/v1/notifications/batch",
            &json!([{ "user": "metered", "payload": 2 }, { "user": "a b", "payload": 3 }]),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = ingest.get_json("/v1/nowhere").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&body), "not_found");

    let metrics = get("/metrics").await.expect("metrics answer");
    assert_eq!(metrics.status(), StatusCode::OK);
    let text = metrics.text().await.expect("metrics body");
    for needle in [
        "gapless_ingest_requests_total",
        r#"route="/v1/notifications""#,
        r#"route="/v1/notifications/batch""#,
        "gapless_ingest_items_total",
        r#"result="appended""#,
        r#"result="rejected""#,
    ] {
        assert!(text.contains(needle), "/metrics lacks {needle}:\n{text}");
    }
}
}

/// A cluster primary without the Function library (restarted empty, or added later) makes
/// the ingest unready, and the answer names it; `gapless migrate` again makes it ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_names_a_cluster_primary_without_the_library() {
    let ingest = TestIngest::start_on(common::Kind::Cluster).await;
    let common::Backend::Cluster(cluster) = &ingest.redis else {
        unreachable!("started on a cluster")
    };
    let readyz = || ingest.http.get(ingest.url("/readyz")).send();
    assert_eq!(readyz().await.expect("answers").status(), StatusCode::OK);
    let emptied = cluster.primaries()[0];
    cluster
        .on_node::<()>(emptied, redis::cmd("FUNCTION").arg("FLUSH"))
        .expect("flushes one primary");
    let answer = readyz().await.expect("answers");
    assert_eq!(answer.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = answer.text().await.expect("a body");
    let addr = format!("127.0.0.1:{}", cluster.node(emptied).port());
    assert!(body.contains(&addr), "names the primary: {body}");
    gapless_shared::schema::migrate(&mut ingest.redis_conn().await)
        .await
        .expect("migrates again");
    assert_eq!(readyz().await.expect("answers").status(), StatusCode::OK);
}

/// A cluster that is down (a shard lost its primary and its replica: every node answers
/// `CLUSTERDOWN`) gets no append reported written: each is answered 503 `unavailable` with
/// `Retry-After`, for users of the lost shard and of the healthy ones alike. Once the shard
/// is back, the producer's retries with the same idempotency keys are each stored exactly
/// once, at contiguous seqs, whatever the failed attempts did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_that_is_down_gets_503_and_each_retried_item_is_stored_once() {
    let mut ingest = TestIngest::start_on_with(common::Kind::Cluster, &[], |c| {
        c.redis.command_timeout = Duration::from_millis(1500);
    })
    .await;
    let common::Backend::Cluster(cluster) = &mut ingest.redis else {
        unreachable!("started on a cluster")
    };
    let lost_user = "down-a";
    let owner = cluster.owner_of(cluster.slot_of_user(lost_user));
    // A user on another shard: its primary is fine, the cluster as a whole is not.
    let other_user = (0..)
        .map(|i| format!("down-b{i}"))
        .find(|u| cluster.owner_of(cluster.slot_of_user(u)) != owner)
        .expect("a user on another shard");
    let replica = cluster.wait_replica_of(owner);
    let down_nodes = [owner, replica];
    tokio::task::block_in_place(|| {
        for node in down_nodes {
            cluster.node_mut(node).kill();
        }
    });
    let survivor = cluster.other_primary(owner);
    eventually(
        "the survivors to declare the cluster down",
        DEADLINE,
        || async {
            cluster
                .on_node::<String>(survivor, redis::cmd("CLUSTER").arg("INFO"))
                .is_ok_and(|info| info.contains("cluster_state:fail"))
        },
    )
    .await;

    let body = |user: &str, key: &str| {
        json!({"user": user, "payload": {"key": key}, "idempotency_key": key}).to_string()
    };
    let mut keys = Vec::new();
    for i in 0..4 {
        for user in [lost_user, other_user.as_str()] {
            let key = format!("{user}-{i}");
            let response = ingest
                .post("/v1/notifications", "application/json", body(user, &key))
                .await;
            assert!(response.headers().contains_key("retry-after"), "{key}");
            let (status, answer) = common::json_of(response).await;
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{key}: {answer}");
            assert_eq!(error_code(&answer), "unavailable", "{key}: {answer}");
            keys.push((user.to_owned(), key));
        }
    }

    let common::Backend::Cluster(cluster) = &mut ingest.redis else {
        unreachable!("started on a cluster")
    };
    tokio::task::block_in_place(|| {
        for node in down_nodes {
            cluster
                .node_mut(node)
                .restart()
                .expect("restarts from its AOF");
        }
        cluster.wait_stable();
    });
    // The producer retries every item (twice: the second must change nothing).
    for round in 0..2 {
        for (user, key) in &keys {
            let mut answer = None;
            for _ in 0..100 {
                let response = ingest
                    .post("/v1/notifications", "application/json", body(user, key))
                    .await;
                let (status, body) = common::json_of(response).await;
                if status == StatusCode::OK {
                    answer = Some(body);
                    break;
                }
                assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{key}: {body}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let answer = answer.unwrap_or_else(|| panic!("{key} never accepted"));
            assert_eq!(
                answer["duplicate"],
                json!(round == 1),
                "{key} in round {round}"
            );
        }
    }
    for user in [lost_user, other_user.as_str()] {
        let log = history(&ingest, user, "").await;
        let stored: Vec<String> = log
            .notifications
            .iter()
            .map(|n| {
                let payload: serde_json::Value =
                    serde_json::from_str(n.payload.get()).expect("JSON payload");
                payload["key"].as_str().expect("a key").to_owned()
            })
            .collect();
        let wanted: Vec<String> = (0..4).map(|i| format!("{user}-{i}")).collect();
        assert_eq!(
            stored, wanted,
            "{user}: each item once, in the producer's order"
        );
        let seqs: Vec<u64> = log.notifications.iter().map(|n| n.seq).collect();
        assert_eq!(seqs, vec![1, 2, 3, 4], "{user}: contiguous seqs");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_fails_when_redis_is_down() {
    let mut ingest = TestIngest::start_with(&[], |c| {
        c.redis.command_timeout = Duration::from_millis(500);
    })
    .await;
    ingest.redis.kill();
    let response = ingest
        .http
        .get(ingest.url("/readyz"))
        .send()
        .await
        .expect("readyz answers");
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        response
            .headers()
            .contains_key(reqwest::header::RETRY_AFTER)
    );
    let (_, body) = common::json_of(response).await;
    assert_eq!(error_code(&body), "unavailable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_refuses_to_start_without_current_schema() {
    let redis = TestRedis::start();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let config = gapless_ingest::Config::new(
        RedisConfig::new(&redis.url()).expect("harness URL is valid"),
        vec![Secret::new(common::API_KEY)],
    );
    let result = tokio::time::timeout(
        common::DEADLINE,
        gapless_ingest::run(listener, config, CancellationToken::new()),
    )
    .await
    .expect("run returns promptly");
    let err = result.expect_err("no schema, no service");
    assert!(err.to_string().contains("gapless migrate"), "{err}");

    // An older schema is refused the same way.
    let mut conn = common::connect(&redis).await;
    let _: () = redis::cmd("SET")
        .arg(gapless_shared::keys::SCHEMA)
        .arg(0)
        .query_async(&mut conn)
        .await
        .expect("SET works");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let config = gapless_ingest::Config::new(
        RedisConfig::new(&redis.url()).expect("harness URL is valid"),
        vec![Secret::new(common::API_KEY)],
    );
    let err = gapless_ingest::run(listener, config, CancellationToken::new())
        .await
        .expect_err("old schema, no service");
    assert!(err.to_string().contains("gapless migrate"), "{err}");
}

/// What the producer of the crash drill saw.
#[derive(Default)]
struct ProducerLog {
    /// (idempotency key, seq, epoch) of every append answered 200.
    acknowledged: Vec<(String, u64, String)>,
    /// 503 answers, each checked for `Retry-After` and the `unavailable` code.
    unavailable: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_run_gives_503_and_loses_no_acknowledged_write() {
    let mut ingest = TestIngest::start_with(&[], |c| {
        c.redis.command_timeout = Duration::from_millis(500);
    })
    .await;
    let user = "crash-drill";
    let url = ingest.url("/v1/notifications");
    let http = ingest.http.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));

    // A producer that retries each notification under its idempotency key until answered 200.
    let producer = tokio::spawn({
        let (stop, acked, refused) = (stop.clone(), acked.clone(), refused.clone());
        async move {
            let mut log = ProducerLog::default();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("drill-{n}");
                let body = json!({ "user": user, "payload": { "n": n }, "idempotency_key": key });
                let response = http
                    .post(&url)
                    .bearer_auth(common::API_KEY)
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body.to_string())
                    .send()
                    .await
                    .expect("the ingest itself stays up");
                let status = response.status();
                let retry_after = response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .cloned();
                let (_, answer) = common::json_of(response).await;
                match status {
                    StatusCode::OK => {
                        let seq = answer["seq"].as_u64().expect("seq");
                        let epoch = answer["epoch"].as_str().expect("epoch").to_owned();
                        log.acknowledged.push((key, seq, epoch));
                        acked.fetch_add(1, Ordering::Relaxed);
                        n += 1;
                    }
                    StatusCode::SERVICE_UNAVAILABLE => {
                        assert!(retry_after.is_some(), "503 without Retry-After: {answer}");
                        assert_eq!(error_code(&answer), "unavailable", "{answer}");
                        log.unavailable += 1;
                        refused.fetch_add(1, Ordering::Relaxed);
                        // A producer backs off before retrying the same key.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    other => panic!("unexpected answer {other}: {answer}"),
                }
            }
            log
        }
    });

    eventually("the producer gets going", DEADLINE, || {
        let acked = acked.clone();
        async move { acked.load(Ordering::Relaxed) >= 50 }
    })
    .await;
    ingest.redis.kill();
    eventually("appends are refused with 503", DEADLINE, || {
        let refused = refused.clone();
        async move { refused.load(Ordering::Relaxed) >= 3 }
    })
    .await;
    // Restarting blocks this thread until Redis answers PING again (it polls, no guessing).
    tokio::task::block_in_place(|| ingest.redis.restart()).expect("Redis restarts from its AOF");
    let at_restart = acked.load(Ordering::Relaxed);
    eventually("the same ingest recovers by itself", DEADLINE, || {
        let acked = acked.clone();
        async move { acked.load(Ordering::Relaxed) >= at_restart + 50 }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let log = producer.await.expect("the producer does not panic");
    assert!(log.unavailable >= 3);

    let stored = ingest.stored(user).await;
    let seqs: Vec<u64> = stored.iter().map(|e| e.seq).collect();
    let last = seqs.last().copied().expect("the stream survived the crash");
    assert_eq!(
        seqs,
        (1..=last).collect::<Vec<_>>(),
        "seqs in the stream are contiguous from 1"
    );
    let epochs: std::collections::BTreeSet<&str> = log
        .acknowledged
        .iter()
        .map(|(_, _, e)| e.as_str())
        .collect();
    assert_eq!(epochs.len(), 1, "the log kept its epoch: {epochs:?}");
    for (key, seq, _) in &log.acknowledged {
        let entry = stored
            .get(*seq as usize - 1)
            .unwrap_or_else(|| panic!("acknowledged seq {seq} ({key}) was lost"));
        assert_eq!(
            entry.idempotency_key.as_deref(),
            Some(key.as_str()),
            "seq {seq} holds the notification it was acknowledged for"
        );
    }
    assert!(
        log.acknowledged.windows(2).all(|w| w[0].1 < w[1].1),
        "every notification got its own, increasing seq"
    );
    let keys: std::collections::BTreeSet<_> = stored
        .iter()
        .map(|e| e.idempotency_key.as_deref())
        .collect();
    assert_eq!(
        keys.len(),
        stored.len(),
        "no retried notification was stored twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_under_native_transactions_loses_no_acknowledged_write() {
    let mut ingest = TestIngest::start_with(&[], |c| {
        c.redis.command_timeout = Duration::from_millis(500);
    })
    .await;
    let user = "crash-native";
    // The log exists, and batches of 5 items without idempotency keys take transactions.
    let _ = append_one(
        &ingest,
        json!({ "user": user, "payload": { "n": 0 } }).to_string(),
    )
    .await;
    let http = ingest.http.clone();
    let url = ingest.url("/v1/notifications/batch");
    let stop = Arc::new(AtomicBool::new(false));
    let (acked, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));

    // Acknowledged (seq, n) pairs; a refused batch is sent again (duplicates are allowed
    // without idempotency keys, losses never).
    let producer = tokio::spawn({
        let (stop, acked, refused) = (stop.clone(), acked.clone(), refused.clone());
        async move {
            let mut acknowledged: Vec<(u64, u64)> = Vec::new();
            let mut n = 1u64;
            while !stop.load(Ordering::Relaxed) {
                let items: Vec<_> = (n..n + 5)
                    .map(|n| json!({ "user": user, "payload": { "n": n } }))
                    .collect();
                let response = http
                    .post(&url)
                    .bearer_auth(common::API_KEY)
                    .json(&items)
                    .send()
                    .await
                    .expect("the ingest itself stays up");
                let status = response.status();
                let (_, answer) = common::json_of(response).await;
                match status {
                    StatusCode::OK => {
                        let results = answer["results"].as_array().expect("results");
                        for (i, r) in results.iter().enumerate() {
                            if let Some(seq) = r["seq"].as_u64() {
                                acknowledged.push((seq, n + i as u64));
                            }
                        }
                        if results.iter().all(|r| r["seq"].is_u64()) {
                            acked.fetch_add(1, Ordering::Relaxed);
                            n += 5;
                        } else {
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    StatusCode::SERVICE_UNAVAILABLE => {
                        refused.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    other => panic!("unexpected answer {other}: {answer}"),
                }
            }
            acknowledged
        }
    });

    let at_least =
        |counter: Arc<AtomicU64>, n: u64| async move { counter.load(Ordering::Relaxed) >= n };
    eventually("the producer gets going", DEADLINE, || {
        at_least(acked.clone(), 30)
    })
    .await;
    ingest.redis.kill();
    eventually("batches are refused", DEADLINE, || {
        at_least(refused.clone(), 3)
    })
    .await;
    tokio::task::block_in_place(|| ingest.redis.restart()).expect("Redis restarts from its AOF");
    let at_restart = acked.load(Ordering::Relaxed);
    eventually("the ingest recovers by itself", DEADLINE, || {
        at_least(acked.clone(), at_restart + 30)
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let acknowledged = producer.await.expect("the producer does not panic");

    let stored = ingest.stored(user).await;
    let seqs: Vec<u64> = stored.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "seqs in the stream are contiguous from 1"
    );
    for (seq, n) in &acknowledged {
        let entry = stored
            .get(*seq as usize - 1)
            .unwrap_or_else(|| panic!("acknowledged seq {seq} was lost"));
        let payload: serde_json::Value = serde_json::from_str(&entry.payload).expect("JSON");
        assert_eq!(
            payload["n"], *n,
            "seq {seq} holds the notification it was acknowledged for"
        );
    }
    assert_eq!(
        ingest.recorded_seq(user).await,
        seqs.len() as u64,
        "the recorded seq is the stream's last"
    );
}
