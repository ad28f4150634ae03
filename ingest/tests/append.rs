//! Appending (DESIGN.md §1.1–1.2, §4): contiguous seqs under concurrency, per-item batch
//! results in all three batch formats, idempotency, retention and epochs, and the wakeups
//! published to live edges.

mod common;

use gapless_shared::on_both;

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use common::{DEADLINE, TestIngest, error_code, user_keys};
use gapless_shared::batch::{PostcardBatch, PostcardItem};
use gapless_shared::keys::wake_channel;
use gapless_shared::testing::eventually;
use gapless_shared::wakeup::{WakeItem, Wakeup};
use redis::{PushInfo, PushKind, Value as RedisValue};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::sync::mpsc::UnboundedReceiver;

/// The `seq` of a successful item result.
fn seq_of(result: &Value) -> u64 {
    result["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("not a successful result: {result}"))
}

/// Asserts a successful, non-duplicate result for `user` with `seq`.
fn assert_appended(result: &Value, user: &str, seq: u64) {
    assert_eq!(result["user"], user, "{result}");
    assert_eq!(seq_of(result), seq, "{result}");
    assert_eq!(result["duplicate"], false, "{result}");
    assert!(
        result["epoch"].as_str().is_some_and(|e| !e.is_empty()),
        "{result}"
    );
}

/// Asserts a per-item error result with `code`.
fn assert_rejected(result: &Value, code: &str) {
    assert_eq!(error_code(result), code, "{result}");
    assert!(result.get("seq").is_none(), "{result}");
}

/// `results` of a 200 batch answer.
fn results_of(status: StatusCode, body: &Value) -> Vec<Value> {
    assert_eq!(status, StatusCode::OK, "batch answered {body}");
    body["results"]
        .as_array()
        .unwrap_or_else(|| panic!("no results array: {body}"))
        .clone()
}

on_both! {
async fn concurrent_producers_get_exactly_contiguous_seqs(kind: Kind) {
    // Single appends go through the Function.
    contiguous_under_concurrency(TestIngest::start_on(kind).await).await;
}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_native_transactions_get_exactly_contiguous_seqs() {
    // Every append of the existing log through a transaction: producers keep invalidating
    // each other's WATCH, and retries must neither lose nor repeat a seq.
    contiguous_under_concurrency(TestIngest::start_with(&[], |c| c.native_min_items = 1).await)
        .await;
}

/// 8 producers x 1,000 appends to one user get exactly seqs 1..=8000.
async fn contiguous_under_concurrency(ingest: TestIngest) {
    const PRODUCERS: u64 = 8;
    const EACH: u64 = 1_000;
    let ingest = std::sync::Arc::new(ingest);
    let user = "contended";

    let mut tasks = Vec::new();
    for p in 0..PRODUCERS {
        let ingest = ingest.clone();
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::with_capacity(EACH as usize);
            let mut epochs = BTreeSet::new();
            for i in 0..EACH {
                let answer = ingest.append(user, json!({ "p": p, "i": i })).await;
                seqs.push(seq_of(&answer));
                epochs.insert(answer["epoch"].as_str().expect("epoch").to_owned());
            }
            (seqs, epochs)
        }));
    }
    let mut all = Vec::new();
    let mut epochs = BTreeSet::new();
    for task in tasks {
        let (seqs, e) = task.await.expect("producer task does not panic");
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "one producer's sequential appends got increasing seqs"
        );
        all.extend(seqs);
        epochs.extend(e);
    }
    all.sort_unstable();
    let expected: Vec<u64> = (1..=PRODUCERS * EACH).collect();
    assert_eq!(all, expected, "the answered seqs are exactly 1..=8000");
    assert_eq!(epochs.len(), 1, "one epoch: {epochs:?}");
    assert_eq!(
        ingest.xrange_seqs(user).await,
        expected,
        "the stream holds seqs 1..=8000"
    );
}

on_both! {
async fn batch_stores_valid_items_and_rejects_bad_ones_alone(kind: Kind) {
    let ingest = TestIngest::start_on_with(kind, &[], |c| c.limits.payload_bytes = 64).await;
    let oversized = "x".repeat(100);

    // JSON array.
    let user = "batch-json";
    let (status, body) = ingest
        .post_json(
            "/v1/notifications/batch",
            &json!([
                { "user": user, "payload": { "n": 0 } },
                { "user": "a b", "payload": { "n": 1 } },
                { "user": user, "payload": "x" },
                { "user": user, "payload": oversized },
                { "user": user },
                { "user": user, "payload": 1, "priority": "high" },
                { "user": user, "payload": [1, 2, 3] },
            ]),
        )
        .await;
    let results = results_of(status, &body);
    assert_eq!(results.len(), 7, "{body}");
    assert_appended(&results[0], user, 1);
    assert_rejected(&results[1], "invalid_user");
    assert_appended(&results[2], user, 2);
    assert_rejected(&results[3], "payload_too_large");
    assert_rejected(&results[4], "invalid_notification");
    assert_rejected(&results[5], "invalid_notification");
    assert_appended(&results[6], user, 3);
    assert_eq!(
        ingest.stored_payloads(user).await,
        [r#"{"n":0}"#, r#""x""#, "[1,2,3]"]
    );

    // NDJSON: a malformed line sinks only itself; blank lines are not items.
    let user = "batch-ndjson";
    let ndjson = format!(
        "{{\"user\":\"{user}\",\"payload\":{{\"a\": 1}}}}\n\
         {{\"user\":\"{user}\",\"payload\":\n\
         \n\
         {{\"user\":\"{user}\",\"payload\":\"{oversized}\"}}\n\
         {{\"user\":\"a b\",\"payload\":2}}\n\
         {{\"user\":\"{user}\",\"payload\":true}}\n"
    );
    let response = ingest
        .post("/v1/notifications/batch", "application/x-ndjson", ndjson)
        .await;
    let (status, body) = common::json_of(response).await;
    let results = results_of(status, &body);
    assert_eq!(results.len(), 5, "{body}");
    assert_appended(&results[0], user, 1);
    assert_rejected(&results[1], "invalid_json");
    assert_rejected(&results[2], "payload_too_large");
    assert_rejected(&results[3], "invalid_user");
    assert_appended(&results[4], user, 2);
    assert_eq!(ingest.stored_payloads(user).await, [r#"{"a": 1}"#, "true"]);

    // Postcard.
    let user = "batch-postcard";
    let item = |user: &str, payload: &str, key: Option<&str>| PostcardItem {
        user: user.into(),
        payload: payload.into(),
        idempotency_key: key.map(Into::into),
    };
    let batch = PostcardBatch::V1(vec![
        item(user, r#"{"v":1}"#, None),
        item("a b", "1", None),
        item(user, "{oops", None),
        item(user, &format!("\"{oversized}\""), None),
        item(user, "[]", Some("pc-1")),
    ]);
    let response = ingest
        .post(
            "/v1/notifications/batch",
            "application/x-postcard",
            batch.encode(),
        )
        .await;
    let (status, body) = common::json_of(response).await;
    let results = results_of(status, &body);
    assert_eq!(results.len(), 5, "{body}");
    assert_appended(&results[0], user, 1);
    assert_rejected(&results[1], "invalid_user");
    assert_rejected(&results[2], "invalid_json");
    assert_rejected(&results[3], "payload_too_large");
    assert_appended(&results[4], user, 2);
    let stored = ingest.stored(user).await;
    assert_eq!(
        stored
            .iter()
            .map(|e| e.payload.as_str())
            .collect::<Vec<_>>(),
        [r#"{"v":1}"#, "[]"]
    );
    assert_eq!(stored[1].idempotency_key.as_deref(), Some("pc-1"));

    assert!(
        !ingest.exists("gl:{a b}:s").await,
        "nothing is stored for rejected items"
    );
}
}

on_both! {
async fn repeated_idempotency_key_appends_nothing_and_returns_the_original_seq(kind: Kind) {
    let ingest = TestIngest::start_on(kind).await;
    let user = "idem";
    let single =
        |key: &str, n: u64| json!({ "user": user, "payload": { "n": n }, "idempotency_key": key });

    // Single endpoint.
    let (status, first) = ingest
        .post_json("/v1/notifications", &single("order-1", 1))
        .await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_appended(&first, user, 1);
    let (status, again) = ingest
        .post_json("/v1/notifications", &single("order-1", 99))
        .await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(seq_of(&again), 1, "{again}");
    assert_eq!(again["duplicate"], true, "{again}");
    assert_eq!(again["epoch"], first["epoch"], "{again}");
    assert_eq!(ingest.xlen(user).await, 1);

    // Within one batch, and against an earlier request.
    let batch = json!([
        single("b-1", 2),
        single("b-1", 3),
        { "user": user, "payload": { "n": 4 } },
        single("order-1", 5),
        { "user": "idem-other", "payload": 6, "idempotency_key": "b-1" },
    ]);
    let (status, body) = ingest.post_json("/v1/notifications/batch", &batch).await;
    let results = results_of(status, &body);
    assert_appended(&results[0], user, 2);
    assert_eq!(
        (seq_of(&results[1]), &results[1]["duplicate"]),
        (2, &json!(true))
    );
    assert_appended(&results[2], user, 3);
    assert_eq!(
        (seq_of(&results[3]), &results[3]["duplicate"]),
        (1, &json!(true))
    );
    // Keys are per user: another user's identical key is a new notification.
    assert_appended(&results[4], "idem-other", 1);
    assert_eq!(ingest.xlen(user).await, 3);

    // Between batches: the same batch again appends only its unkeyed item.
    let (status, body) = ingest.post_json("/v1/notifications/batch", &batch).await;
    let results = results_of(status, &body);
    let got: Vec<(u64, bool)> = results
        .iter()
        .map(|r| (seq_of(r), r["duplicate"].as_bool().expect("duplicate flag")))
        .collect();
    assert_eq!(
        got,
        [(2, true), (2, true), (4, false), (1, true), (1, true)]
    );
    assert_eq!(ingest.xlen(user).await, 4);
    let stored = ingest.stored(user).await;
    assert_eq!(
        stored
            .iter()
            .map(|e| (e.seq, e.payload.as_str(), e.idempotency_key.as_deref()))
            .collect::<Vec<_>>(),
        [
            (1, r#"{"n":1}"#, Some("order-1")),
            (2, r#"{"n":2}"#, Some("b-1")),
            (3, r#"{"n":4}"#, None),
            (4, r#"{"n":4}"#, None),
        ],
        "duplicates stored nothing, not even their new payloads"
    );
    assert_eq!(ingest.xlen("idem-other").await, 1);
}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_stays_within_its_retention_bound() {
    let ingest = TestIngest::start_with(&[("stream-node-max-entries", "10")], |c| {
        c.retention.max_len = 100;
    })
    .await;
    let user = "retained";
    for chunk in 0..20u64 {
        let items: Vec<Value> = (0..50u64)
            .map(|i| json!({ "user": user, "payload": chunk * 50 + i + 1 }))
            .collect();
        let (status, body) = ingest
            .post_json("/v1/notifications/batch", &Value::Array(items))
            .await;
        let results = results_of(status, &body);
        assert_eq!(seq_of(&results[49]), chunk * 50 + 50);
    }
    let seqs = ingest.xrange_seqs(user).await;
    let len = ingest.xlen(user).await;
    assert!(
        (100..=110).contains(&len),
        "XLEN {len} is outside 100..=110"
    );
    assert_eq!(seqs.last().copied(), Some(1000), "the newest entry is kept");
    let first = seqs[0];
    assert_eq!(
        seqs,
        (first..=1000).collect::<Vec<_>>(),
        "trimming keeps a contiguous tail"
    );
    let payloads = ingest.stored_payloads(user).await;
    assert_eq!(payloads.last().map(String::as_str), Some("1000"));
}

on_both! {
async fn expired_log_starts_a_new_epoch(kind: Kind) {
    let ingest = TestIngest::start_on_with(kind, &[], |c| {
        c.retention.ttl = Duration::from_millis(300);
    })
    .await;
    let user = "expiring";
    let keyed = |n: u64| json!({ "user": user, "payload": n, "idempotency_key": "k-1" });
    let (status, first) = ingest.post_json("/v1/notifications", &keyed(1)).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_appended(&first, user, 1);
    ingest.append(user, json!(2)).await;

    let meta = user_keys(user).meta;
    eventually("the user's log expires", DEADLINE, || ingest_lacks(&ingest, &meta)).await;

    // The idempotency key outlives the log, but it names an entry of the old epoch.
    let (status, second) = ingest.post_json("/v1/notifications", &keyed(3)).await;
    assert_eq!(status, StatusCode::OK, "{second}");
    assert_appended(&second, user, 1);
    assert_ne!(second["epoch"], first["epoch"], "a new log has a new epoch");
    let stored = ingest.stored(user).await;
    assert_eq!(
        stored.len(),
        1,
        "nothing of the old log survives: {stored:?}"
    );
    assert_eq!(stored[0].payload, "3");
}
}

async fn ingest_lacks(ingest: &TestIngest, key: &str) -> bool {
    !ingest.exists(key).await
}

/// Writes registry leases (user, expiry ms, edge) and subscribes to each named edge's wakeup
/// channel; answers the messages' receiver and the connection that must stay open.
async fn lease_and_listen(
    ingest: &TestIngest,
    leases: &[(&str, u64, &str)],
) -> (
    UnboundedReceiver<PushInfo>,
    redis::aio::MultiplexedConnection,
) {
    let mut conn = ingest.redis_conn().await;
    for (user, score, edge) in leases {
        let _: u64 = redis::cmd("ZADD")
            .arg(user_keys(user).registry)
            .arg(score)
            .arg(edge)
            .query_async(&mut conn)
            .await
            .expect("ZADD works");
    }
    // A RESP3 connection delivers pub/sub messages through a tokio channel.
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let client =
        redis::Client::open(format!("{}?protocol=resp3", ingest.redis.url())).expect("valid URL");
    let mut subscriber = client
        .get_multiplexed_async_connection_with_config(
            &redis::AsyncConnectionConfig::new().set_push_sender(tx),
        )
        .await
        .expect("subscriber connects");
    let mut channels: Vec<String> = leases.iter().map(|(_, _, e)| wake_channel(e)).collect();
    channels.sort();
    channels.dedup();
    subscriber
        .subscribe(&channels)
        .await
        .expect("SUBSCRIBE works");
    (rx, subscriber)
}

/// One published message: (channel, decoded wakeup).
async fn next_wakeup(rx: &mut UnboundedReceiver<PushInfo>) -> (String, Wakeup) {
    loop {
        let push = tokio::time::timeout(common::DEADLINE, rx.recv())
            .await
            .expect("a wakeup arrives in time")
            .expect("the subscriber connection stays open");
        if push.kind != PushKind::Message {
            continue;
        }
        let [channel, message] = push.data.as_slice() else {
            panic!("unexpected message shape: {:?}", push.data);
        };
        let channel: String = redis::from_redis_value_ref(channel).expect("channel name");
        let RedisValue::BulkString(bytes) = message else {
            panic!("wakeup is not a bulk string: {message:?}");
        };
        return (channel, Wakeup::decode(bytes).expect("a wakeup decodes"));
    }
}

/// (user, seq, payload) of each wakeup item.
fn triples(items: &[WakeItem]) -> Vec<(String, u64, Option<String>)> {
    items
        .iter()
        .map(|i| (i.user.clone(), i.seq, i.payload.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wakeup_carries_every_appended_seq_once_per_request_per_edge() {
    wakeups_carry_every_appended_seq_once_per_request_per_edge(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wakeup_of_a_request_with_a_transaction_carries_the_same() {
    wakeups_carry_every_appended_seq_once_per_request_per_edge(true).await;
}

/// On one Redis a one-item request's wakeup is published by its Function call
/// (`gapless_append_wake`, in Lua): the same message the ingest would publish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_item_request_is_woken_by_its_function_call() {
    let ingest = TestIngest::start_with(&[], |c| c.wakeup_payload_max = 32).await;
    let now = gapless_shared::now_ms();
    let leases = [
        ("u1", now + 60_000, "edge-a"),
        ("u1", now - 1_000, "edge-dead"),
    ];
    let (mut rx, _subscriber) = lease_and_listen(&ingest, &leases).await;

    let keyed = json!({ "user": "u1", "payload": { "m": 1 }, "idempotency_key": "k" });
    let (status, first) = ingest.post_json("/v1/notifications", &keyed).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    // A duplicate appends nothing and wakes nobody; the next item marks where it would be.
    let (status, _) = ingest.post_json("/v1/notifications", &keyed).await;
    assert_eq!(status, StatusCode::OK);
    let big = "b".repeat(40);
    let (status, _) = ingest
        .post_json(
            "/v1/notifications",
            &json!({ "user": "u1", "payload": big }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);

    let s = |v: &str| Some(v.to_owned());
    let mut seen = Vec::new();
    for _ in 0..2 {
        let (channel, wakeup) = next_wakeup(&mut rx).await;
        assert_eq!(
            channel,
            wake_channel("edge-a"),
            "only the live edge is woken"
        );
        for item in wakeup.items() {
            assert_eq!(
                item.epoch,
                first["epoch"].as_str().expect("epoch"),
                "{item:?}"
            );
            assert!(item.ts > 0, "{item:?}");
        }
        seen.extend(triples(wakeup.items()));
    }
    assert_eq!(
        seen,
        [
            ("u1".to_owned(), 1, s(r#"{"m":1}"#)),
            // Larger than the wakeup payload limit: the edge reads it from the stream.
            ("u1".to_owned(), 2, None),
        ]
    );
}

/// A batch's wakeups are published by the ingest, one message per edge per request. With
/// `transaction`, u1's log exists before the batch and its items go through a transaction.
async fn wakeups_carry_every_appended_seq_once_per_request_per_edge(transaction: bool) {
    let ingest = TestIngest::start_with(&[], |c| {
        c.wakeup_payload_max = 32;
        c.native_min_items = if transaction { 1 } else { 4 };
    })
    .await;
    // u1's seqs in the batch start after the seed's.
    let u1 = u64::from(transaction);
    if transaction {
        ingest.append("u1", json!(0)).await;
    }
    let mut conn = ingest.redis_conn().await;
    let now = gapless_shared::now_ms();
    let live = now + 60_000;
    let leases: [(&str, u64, &str); 4] = [
        ("u1", live, "edge-a"),
        ("u2", live, "edge-a"),
        ("u2", live, "edge-b"),
        ("u1", now - 1_000, "edge-dead"),
    ];
    let (mut rx, _subscriber) = lease_and_listen(&ingest, &leases).await;

    let big = format!("\"{}\"", "b".repeat(40));
    let (status, body) = ingest
        .post_json(
            "/v1/notifications/batch",
            &json!([
                { "user": "u1", "payload": { "m": 1 } },
                { "user": "u2", "payload": { "m": 2 }, "idempotency_key": "w-1" },
                { "user": "nobody-home", "payload": { "m": 3 } },
                { "user": "u1", "payload": "b".repeat(40) },
                { "user": "u2", "payload": { "m": 5 } },
            ]),
        )
        .await;
    let results = results_of(status, &body);
    assert_eq!(results.len(), 5, "{body}");
    let epoch = |i: usize| results[i]["epoch"].as_str().expect("epoch").to_owned();
    let (epoch_u1, epoch_u2) = (epoch(0), epoch(1));

    // A second request: its wakeups, published after the first request answered, mark the
    // end of everything the first request published. Its duplicate item wakes nobody.
    let (status, body) = ingest
        .post_json(
            "/v1/notifications/batch",
            &json!([
                { "user": "u2", "payload": { "m": 2 }, "idempotency_key": "w-1" },
                { "user": "u2", "payload": { "m": 6 } },
            ]),
        )
        .await;
    let second = results_of(status, &body);
    assert_eq!(second[0]["duplicate"], true, "{body}");

    let (a, b) = (wake_channel("edge-a"), wake_channel("edge-b"));
    let mut first_request: HashMap<String, Vec<Wakeup>> = HashMap::new();
    let mut second_request: HashMap<String, Vec<Wakeup>> = HashMap::new();
    while second_request.values().map(Vec::len).sum::<usize>() < 2 {
        let (channel, wakeup) = next_wakeup(&mut rx).await;
        let from_second = wakeup.items().iter().any(|i| i.user == "u2" && i.seq == 3);
        let bucket = if from_second {
            &mut second_request
        } else {
            &mut first_request
        };
        bucket.entry(channel).or_default().push(wakeup);
    }

    let mut channels_hit: Vec<&String> = first_request.keys().collect();
    channels_hit.sort();
    assert_eq!(channels_hit, [&a, &b], "only live edges are woken");
    assert_eq!(
        first_request[&a].len(),
        1,
        "one message per edge per request"
    );
    assert_eq!(
        first_request[&b].len(),
        1,
        "one message per edge per request"
    );
    let s = |v: &str| Some(v.to_owned());
    let mut on_a = triples(first_request[&a][0].items());
    on_a.sort();
    assert_eq!(
        on_a,
        [
            ("u1".to_owned(), u1 + 1, s(r#"{"m":1}"#)),
            // Larger than the wakeup payload limit: the edge reads it from the stream.
            ("u1".to_owned(), u1 + 2, None),
            ("u2".to_owned(), 1, s(r#"{"m":2}"#)),
            ("u2".to_owned(), 2, s(r#"{"m":5}"#)),
        ]
    );
    assert_eq!(
        triples(first_request[&b][0].items()),
        [
            ("u2".to_owned(), 1, s(r#"{"m":2}"#)),
            ("u2".to_owned(), 2, s(r#"{"m":5}"#)),
        ]
    );
    for item in first_request.values().flatten().flat_map(Wakeup::items) {
        let expected = if item.user == "u1" {
            &epoch_u1
        } else {
            &epoch_u2
        };
        assert_eq!(&item.epoch, expected, "{item:?}");
        assert!(item.ts > 0, "{item:?}");
    }
    assert_eq!(ingest.stored_payloads("u1").await[u1 as usize + 1], big);

    for channel in [&a, &b] {
        let wakeups = &second_request[channel];
        assert_eq!(wakeups.len(), 1, "{channel}");
        assert_eq!(
            triples(wakeups[0].items()),
            [("u2".to_owned(), 3, s(r#"{"m":6}"#))],
            "the duplicate is not in the wakeup"
        );
    }

    let dead: Option<f64> = redis::cmd("ZSCORE")
        .arg(user_keys("u1").registry)
        .arg("edge-dead")
        .query_async(&mut conn)
        .await
        .expect("ZSCORE works");
    assert_eq!(dead, None, "an expired lease is dropped from the registry");
}

on_both! {
/// JSON escapes are legal in any string (`\/` is what PHP's `json_encode` writes for `/`, and
/// a `"` in an idempotency key can only travel escaped): a valid user or key is accepted
/// however the producer's encoder spelled it.
async fn json_escaped_users_and_idempotency_keys_are_accepted(kind: Kind) {
    let ingest = TestIngest::start_on(kind).await;
    let items = [
        r#"{"user":"al\u0069ce","payload":1}"#,
        r#"{"user":"alice","payload":2,"idempotency_key":"order\/17"}"#,
        r#"{"user":"alice","payload":3,"idempotency_key":"say\"hi\""}"#,
    ];
    for (i, item) in items.iter().enumerate() {
        let response = ingest
            .post("/v1/notifications", "application/json", item.to_string())
            .await;
        let (status, body) = common::json_of(response).await;
        assert_eq!(status, StatusCode::OK, "{item}: {body}");
        assert_appended(&body, "alice", i as u64 + 1);
    }
    let response = ingest
        .post(
            "/v1/notifications/batch",
            "application/json",
            format!("[{}]", items.join(",")),
        )
        .await;
    let (status, body) = common::json_of(response).await;
    let results = results_of(status, &body);
    assert_appended(&results[0], "alice", 4);
    assert_eq!(
        (seq_of(&results[1]), &results[1]["duplicate"]),
        (2, &json!(true))
    );
    assert_eq!(
        (seq_of(&results[2]), &results[2]["duplicate"]),
        (3, &json!(true))
    );
    let keys: Vec<Option<String>> = ingest
        .stored("alice")
        .await
        .into_iter()
        .map(|e| e.idempotency_key)
        .collect();
    assert_eq!(
        keys,
        [
            None,
            Some("order/17".into()),
            Some("say\"hi\"".into()),
            None
        ]
    );
}
}

on_both! {
/// Redis refusing one user's part of a batch (here: a corrupted stream key) must not turn
/// other users' items into errors, least of all items that were in fact appended.
async fn one_users_refused_write_does_not_sink_other_users(kind: Kind) {
    let ingest = TestIngest::start_on(kind).await;
    let mut conn = ingest.redis_conn().await;
    let victim = user_keys("victim");
    let _: () = redis::cmd("HSET")
        .arg(&victim.meta)
        .arg("epoch")
        .arg("e0")
        .arg("seq")
        .arg(0)
        .query_async(&mut conn)
        .await
        .expect("HSET works");
    replace_stream_with_a_string(&ingest, "victim").await;

    let (status, body) = ingest
        .post_json(
            "/v1/notifications/batch",
            &json!([
                { "user": "before", "payload": 1 },
                { "user": "victim", "payload": 2 },
                { "user": "after", "payload": 3 },
            ]),
        )
        .await;
    let results = results_of(status, &body);
    assert_eq!(results.len(), 3, "{body}");
    assert_eq!(error_code(&results[1]), "store_error", "{body}");
    for (i, user) in [(0, "before"), (2, "after")] {
        let stored = ingest.xrange_seqs(user).await;
        assert_eq!(
            results[i]["seq"]
                .as_u64()
                .map(|s| vec![s])
                .unwrap_or_default(),
            stored,
            "{user}: what the answer says was appended is what was stored: {body}"
        );
        assert_appended(&results[i], user, 1);
    }
}
}

/// Replaces `user`'s stream with a string, as a foreign writer could: every write to it fails.
async fn replace_stream_with_a_string(ingest: &TestIngest, user: &str) {
    let mut conn = ingest.redis_conn().await;
    let stream = user_keys(user).stream;
    let _: () = redis::pipe()
        .cmd("DEL")
        .arg(&stream)
        .ignore()
        .cmd("SET")
        .arg(&stream)
        .arg("not a stream")
        .ignore()
        .query_async(&mut conn)
        .await
        .expect("corrupting works");
}

/// `calls` of `command` in Redis's INFO commandstats (0 when never called).
async fn command_calls(ingest: &TestIngest, command: &str) -> u64 {
    let mut conn = ingest.redis_conn().await;
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .expect("INFO works");
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|line| line.strip_prefix(prefix.as_str()))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().expect("a call count"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_logs_take_native_transactions_and_new_ones_the_function() {
    let ingest = TestIngest::start().await; // native from 4 items of a user
    let users = ["n1", "n2", "n3"];
    let batch = |from: u64| {
        json!(
            (0..30)
                .map(|i| json!({ "user": users[i % 3], "payload": { "i": from + i as u64 } }))
                .collect::<Vec<_>>()
        )
    };

    let (fcalls, execs) = (
        command_calls(&ingest, "fcall").await,
        command_calls(&ingest, "exec").await,
    );
    let (status, body) = ingest.post_json("/v1/notifications/batch", &batch(0)).await;
    let first = results_of(status, &body);
    assert!(
        command_calls(&ingest, "fcall").await > fcalls,
        "new logs are created by the Function"
    );
    assert_eq!(
        command_calls(&ingest, "exec").await,
        execs,
        "no transaction committed"
    );

    let fcalls = command_calls(&ingest, "fcall").await;
    let unwatches = command_calls(&ingest, "unwatch").await;
    let (status, body) = ingest
        .post_json("/v1/notifications/batch", &batch(30))
        .await;
    let second = results_of(status, &body);
    assert_eq!(
        command_calls(&ingest, "fcall").await,
        fcalls,
        "existing logs without idempotency keys do not call the Function"
    );
    assert!(
        command_calls(&ingest, "exec").await > execs,
        "they commit a transaction"
    );
    assert_eq!(
        command_calls(&ingest, "unwatch").await,
        unwatches,
        "every read led to a transaction"
    );

    // A user with fewer items than the threshold goes through the Function.
    let (fcalls, execs) = (
        command_calls(&ingest, "fcall").await,
        command_calls(&ingest, "exec").await,
    );
    assert_appended(&ingest.append("n1", json!({ "i": 60 })).await, "n1", 21);
    assert!(
        command_calls(&ingest, "fcall").await > fcalls,
        "one item: the Function"
    );
    assert_eq!(
        command_calls(&ingest, "exec").await,
        execs,
        "one item: no transaction"
    );

    for (i, result) in first.iter().chain(&second).enumerate() {
        assert_appended(result, users[i % 3], (i / 3) as u64 + 1);
        assert_eq!(result["epoch"], first[i % 3]["epoch"], "one epoch per user");
    }
    for (u, user) in users.iter().enumerate() {
        let stored = ingest.stored(user).await;
        assert_eq!(
            stored.iter().map(|e| e.seq).collect::<Vec<_>>(),
            (1..=if u == 0 { 21 } else { 20 }).collect::<Vec<_>>(),
            "{user}: seqs 1..=20 (n1: 21) in the stream"
        );
        let payloads: Vec<u64> = stored
            .iter()
            .map(|e| {
                serde_json::from_str::<Value>(&e.payload).expect("JSON")["i"]
                    .as_u64()
                    .expect("i")
            })
            .collect();
        let sent: Vec<u64> = (0..=60).filter(|i| i % 3 == u as u64).collect();
        assert_eq!(payloads, sent, "{user}: the payloads in request order");
        assert_eq!(
            ingest.recorded_seq(user).await,
            stored.len() as u64,
            "{user}: the recorded seq is the stream's last"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_existing_log_fails_alone_beside_native_appends() {
    let ingest = TestIngest::start_with(&[], |c| c.native_min_items = 1).await;
    for user in ["before", "victim", "after"] {
        assert_appended(&ingest.append(user, json!(0)).await, user, 1);
    }
    replace_stream_with_a_string(&ingest, "victim").await;

    let (status, body) = ingest
        .post_json(
            "/v1/notifications/batch",
            &json!([
                { "user": "before", "payload": 1 },
                { "user": "victim", "payload": 2 },
                { "user": "after", "payload": 3 },
                { "user": "victim", "payload": 4 },
            ]),
        )
        .await;
    let results = results_of(status, &body);
    assert_eq!(error_code(&results[1]), "store_error", "{body}");
    assert_eq!(error_code(&results[3]), "store_error", "{body}");
    assert_appended(&results[0], "before", 2);
    assert_appended(&results[2], "after", 2);
    for user in ["before", "after"] {
        assert_eq!(ingest.xrange_seqs(user).await, [1, 2], "{user}: {body}");
    }
    assert_eq!(
        ingest.recorded_seq("victim").await,
        1,
        "the victim's recorded seq did not move"
    );
}

/// `--min-replicas-ack 1` on a cluster whose primaries each have a replica: answered 200
/// after `WAIT`. With the replica of the user's primary gone: 503 `not_replicated`, and the
/// body says the item is written (it is: it is in the stream).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_replicas_ack_answers_only_what_a_replica_holds() {
    let mut ingest = TestIngest::start_on_with(common::Kind::Cluster, &[], |c| {
        c.min_replicas_ack = 1;
    })
    .await;
    let answer = ingest.append("replicated", json!(1)).await;
    assert_eq!(answer["seq"], 1);
    let (status, body) = ingest
        .post_json(
            "/v1/notifications/batch",
            &json!([{ "user": "replicated", "payload": 2 }, { "user": "other", "payload": 3 }]),
        )
        .await;
    let results = results_of(status, &body);
    assert_appended(&results[0], "replicated", 2);
    assert_appended(&results[1], "other", 1);

    let common::Backend::Cluster(cluster) = &mut ingest.redis else {
        unreachable!("started on a cluster")
    };
    let slot = cluster.slot_of(&user_keys("replicated").meta);
    let primary = cluster.owner_of(slot);
    let replica = cluster.wait_replica_of(primary);
    cluster.node_mut(replica).kill();
    let (status, body) = ingest
        .post_json(
            "/v1/notifications",
            &json!({ "user": "replicated", "payload": 4, "idempotency_key": "four" }),
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(error_code(&body), "not_replicated");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("written"), "{message}");
    assert_eq!(
        ingest.xrange_seqs("replicated").await,
        [1, 2, 3],
        "it is written"
    );
}

/// With no replica at all, `--min-replicas-ack 1` refuses to call anything safe: the native
/// path is off too (its transactions do not `WAIT`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_replicas_ack_without_replicas_answers_503_for_every_path() {
    let ingest = TestIngest::start_with(&[], |c| {
        c.min_replicas_ack = 1;
        c.native_min_items = 2;
    })
    .await;
    let items: Vec<Value> = (0..5)
        .map(|i| json!({ "user": "lonely", "payload": i }))
        .collect();
    let (status, body) = ingest
        .post_json("/v1/notifications/batch", &Value::Array(items))
        .await;
    let results = results_of(status, &body);
    for result in &results {
        assert_rejected(result, "not_replicated");
    }
    assert_eq!(
        ingest.xlen("lonely").await,
        5,
        "written, though not replicated"
    );
}
