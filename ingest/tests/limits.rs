//! Rate limits of the ingest (DESIGN.md §4, 429): per API key on requests and on items, and
//! failed authentications per source address, which lock that address out (and only it)
//! before its credentials are looked at. Every refusal is a JSON error with `Retry-After`,
//! and stores nothing.

mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::{API_KEY, TestIngest, error_code, json_of};
use gapless_shared::rate::Rate;
use reqwest::StatusCode;
use serde_json::json;

/// A client whose connections come from `127.0.0.<source>`.
fn client_from(source: u8) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(IpAddr::from([127, 0, 0, source]))
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

/// Asserts a 429 with the given code and a `Retry-After` of at least a second.
async fn assert_429(response: reqwest::Response, code: &str) {
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let (status, body) = json_of(response).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(error_code(&body), code, "{body}");
    assert!(
        retry_after.is_some_and(|s| s >= 1),
        "Retry-After: {retry_after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_key_over_its_request_rate_gets_429_and_nothing_is_stored() {
    let ingest = TestIngest::start_with(&[], |c| {
        c.rates.key_requests = Rate {
            per_second: 1,
            burst: 3,
        };
    })
    .await;
    for i in 0..3 {
        ingest.append("r", json!(i)).await;
    }
    let response = ingest
        .post(
            "/v1/notifications",
            "application/json",
            json!({"user": "r", "payload": 9}).to_string(),
        )
        .await;
    assert_429(response, "rate_limited").await;
    assert_eq!(ingest.xrange_seqs("r").await, vec![1, 2, 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_key_over_its_item_rate_gets_429_for_the_whole_batch() {
    let ingest = TestIngest::start_with(&[], |c| {
        c.limits.batch_items = 10;
        c.rates.key_items = Rate {
            per_second: 1,
            burst: 10,
        };
    })
    .await;
    let batch = |n: usize| {
        json!(
            (0..n)
                .map(|i| json!({"user": "i", "payload": i}))
                .collect::<Vec<_>>()
        )
    };
    let (status, body) = ingest.post_json("/v1/notifications/batch", &batch(8)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let response = ingest
        .post(
            "/v1/notifications/batch",
            "application/json",
            batch(5).to_string(),
        )
        .await;
    assert_429(response, "rate_limited").await;
    assert_eq!(
        ingest.xlen("i").await,
        8,
        "nothing of the refused batch is stored"
    );
    // Refused items cost nothing: a batch of invalid items passes the item rate.
    let invalid = json!([{"user": "a b", "payload": 1}, {"user": "c d", "payload": 2}]);
    let (status, body) = ingest.post_json("/v1/notifications/batch", &invalid).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_authentications_lock_out_their_address_only() {
    let ingest = TestIngest::start_with(&[], |c| {
        c.rates.auth_failures = Rate {
            per_second: 1,
            burst: 5,
        };
    })
    .await;
    let url = ingest.url("/v1/users/u/notifications");
    let guesser = client_from(2);
    let mut statuses = Vec::new();
    for i in 0..20 {
        let r = guesser
            .get(&url)
            .bearer_auth(format!("guess-{i}"))
            .send()
            .await
            .expect("answers");
        statuses.push(r.status().as_u16());
    }
    assert_eq!(&statuses[..5], &[403; 5], "{statuses:?}");
    assert!(statuses[5..].iter().all(|s| *s == 429), "{statuses:?}");
    // Locked out before the key is checked: the right key does not get through either.
    let right = guesser
        .get(&url)
        .bearer_auth(API_KEY)
        .send()
        .await
        .expect("answers");
    assert_429(right, "too_many_auth_failures").await;
    // Another address is unaffected.
    let other = client_from(3)
        .get(&url)
        .bearer_auth(API_KEY)
        .send()
        .await
        .expect("answers");
    assert_eq!(other.status(), StatusCode::OK);
    // Missing headers count as failures too.
    let bare = client_from(4);
    let mut last = StatusCode::OK;
    for _ in 0..7 {
        last = bare.get(&url).send().await.expect("answers").status();
    }
    assert_eq!(last, StatusCode::TOO_MANY_REQUESTS);
}
