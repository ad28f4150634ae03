//! Requests the ingest refuses (DESIGN.md §4): each answers the documented status and JSON
//! error code, and stores nothing.

mod common;

use common::{API_KEY, TestIngest, error_code, json_of};
use gapless_shared::batch::{PostcardBatch, PostcardItem};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// An ingest with small limits, so that oversized requests are cheap to build.
async fn small_ingest() -> TestIngest {
    TestIngest::start_with(&[], |c| {
        c.limits.body_bytes = 1024;
        c.limits.batch_bytes = 4096;
        c.limits.batch_items = 3;
        c.limits.payload_bytes = 512;
    })
    .await
}

/// Asserts the answer and that `user` has no stream.
async fn assert_refused(
    ingest: &TestIngest,
    (status, body): (StatusCode, Value),
    want_status: StatusCode,
    want_code: &str,
    user: &str,
) {
    assert_eq!(status, want_status, "{body}");
    assert_eq!(error_code(&body), want_code, "{body}");
    assert!(
        !ingest.stream_exists(user).await,
        "{want_code}: nothing may be stored for {user}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_or_mistyped_bodies_are_refused_and_store_nothing() {
    let ingest = small_ingest().await;
    let post = |path: &'static str, ct: &'static str, body: String| {
        let ingest = &ingest;
        async move { json_of(ingest.post(path, ct, body).await).await }
    };

    let user = "bad-json";
    let answer = post(
        "/v1/notifications",
        "application/json",
        format!(r#"{{"user":"{user}","payload":"#),
    )
    .await;
    assert_refused(
        &ingest,
        answer,
        StatusCode::BAD_REQUEST,
        "invalid_json",
        user,
    )
    .await;
    let answer = post(
        "/v1/notifications/batch",
        "application/json",
        format!(r#"[{{"user":"{user}","payload":1}}"#),
    )
    .await;
    assert_refused(
        &ingest,
        answer,
        StatusCode::BAD_REQUEST,
        "invalid_json",
        user,
    )
    .await;
    let answer = post(
        "/v1/notifications/batch",
        "application/json",
        format!(r#"{{"user":"{user}","payload":1}}"#),
    )
    .await;
    assert_refused(
        &ingest,
        answer,
        StatusCode::BAD_REQUEST,
        "invalid_json",
        user,
    )
    .await;
    let answer = post(
        "/v1/notifications/batch",
        "application/x-postcard",
        "not postcard".into(),
    )
    .await;
    assert_eq!(answer.0, StatusCode::BAD_REQUEST, "{}", answer.1);
    assert_eq!(error_code(&answer.1), "invalid_postcard");

    let user = "bad-shape";
    let answer = post(
        "/v1/notifications",
        "application/json",
        format!(r#"{{"user":"{user}","payload":1,"ttl":5}}"#),
    )
    .await;
    assert_refused(
        &ingest,
        answer,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_notification",
        user,
    )
    .await;

    let user = "bad-type";
    let valid = format!(r#"{{"user":"{user}","payload":1}}"#);
    for (path, ct) in [
        ("/v1/notifications", "text/plain"),
        ("/v1/notifications", "application/x-ndjson"),
        ("/v1/notifications/batch", "text/plain"),
        ("/v1/notifications/batch", "application/xml"),
    ] {
        let answer = post(path, ct, valid.clone()).await;
        assert_refused(
            &ingest,
            answer,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            user,
        )
        .await;
    }
    let response = ingest
        .http
        .post(ingest.url("/v1/notifications"))
        .bearer_auth(API_KEY)
        .body(valid)
        .send()
        .await
        .expect("the ingest answers");
    let answer = json_of(response).await;
    assert_refused(
        &ingest,
        answer,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        user,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_requests_are_refused_and_store_nothing() {
    let ingest = small_ingest().await;

    let user = "big-body";
    let body = json!({ "user": user, "payload": "x".repeat(2_000) });
    let answer = ingest.post_json("/v1/notifications", &body).await;
    assert_refused(
        &ingest,
        answer,
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        user,
    )
    .await;
    let batch = json!([{ "user": user, "payload": "x".repeat(5_000) }]);
    let answer = ingest.post_json("/v1/notifications/batch", &batch).await;
    assert_refused(
        &ingest,
        answer,
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        user,
    )
    .await;

    let user = "big-payload";
    let body = json!({ "user": user, "payload": "x".repeat(600) });
    let answer = ingest.post_json("/v1/notifications", &body).await;
    assert_refused(
        &ingest,
        answer,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        user,
    )
    .await;

    // Too many items sinks the whole batch, valid items included.
    let user = "many-items";
    let items: Vec<Value> = (0..4)
        .map(|n| json!({ "user": user, "payload": n }))
        .collect();
    let answer = ingest
        .post_json("/v1/notifications/batch", &Value::Array(items.clone()))
        .await;
    assert_refused(
        &ingest,
        answer,
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_many_items",
        user,
    )
    .await;
    let ndjson: String = items.iter().map(|i| format!("{i}\n")).collect();
    let answer = json_of(
        ingest
            .post("/v1/notifications/batch", "application/x-ndjson", ndjson)
            .await,
    )
    .await;
    assert_refused(
        &ingest,
        answer,
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_many_items",
        user,
    )
    .await;
    let postcard = PostcardBatch::V1(
        (0..4)
            .map(|n| PostcardItem {
                user: user.into(),
                payload: n.to_string(),
                idempotency_key: None,
            })
            .collect(),
    );
    let answer = json_of(
        ingest
            .post(
                "/v1/notifications/batch",
                "application/x-postcard",
                postcard.encode(),
            )
            .await,
    )
    .await;
    assert_refused(
        &ingest,
        answer,
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_many_items",
        user,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_identifiers_are_refused_and_store_nothing() {
    let ingest = small_ingest().await;
    for bad in ["a b", "", "é", "a{b}", &"x".repeat(129)] {
        let body = json!({ "user": bad, "payload": 1 });
        let (status, body) = ingest.post_json("/v1/notifications", &body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad:?}: {body}");
        assert_eq!(error_code(&body), "invalid_user", "{bad:?}: {body}");
    }
    let mut conn = ingest.redis_conn().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("gl:{*")
        .query_async(&mut conn)
        .await
        .expect("KEYS works");
    assert!(keys.is_empty(), "nothing stored for bad users: {keys:?}");

    let user = "bad-key";
    let body = json!({ "user": user, "payload": 1, "idempotency_key": "has space" });
    let answer = ingest.post_json("/v1/notifications", &body).await;
    assert_refused(
        &ingest,
        answer,
        StatusCode::BAD_REQUEST,
        "invalid_idempotency_key",
        user,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_a_valid_api_key_are_refused_and_store_nothing() {
    let ingest = small_ingest().await;
    let user = "no-auth";
    let body = json!({ "user": user, "payload": 1 }).to_string();
    let send = |auth: Option<&'static str>, path: &'static str| {
        let mut request = ingest
            .http
            .post(ingest.url(path))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.clone());
        if let Some(auth) = auth {
            request = request.header(reqwest::header::AUTHORIZATION, auth);
        }
        async move { json_of(request.send().await.expect("the ingest answers")).await }
    };
    for path in ["/v1/notifications", "/v1/notifications/batch"] {
        let answer = send(None, path).await;
        assert_refused(
            &ingest,
            answer,
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            user,
        )
        .await;
        let answer = send(Some("Basic dGVzdC1rZXk="), path).await;
        assert_refused(
            &ingest,
            answer,
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            user,
        )
        .await;
        let answer = send(Some("Bearer wrong-key"), path).await;
        assert_refused(&ingest, answer, StatusCode::FORBIDDEN, "forbidden", user).await;
        let answer = send(Some("Bearer test-key-and-more"), path).await;
        assert_refused(&ingest, answer, StatusCode::FORBIDDEN, "forbidden", user).await;
    }

    let response = ingest
        .http
        .get(ingest.url(&format!("/v1/users/{user}/notifications")))
        .send()
        .await
        .expect("the ingest answers");
    let (status, body) = json_of(response).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(error_code(&body), "unauthorized");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_with_a_bad_query_is_refused() {
    let ingest = small_ingest().await;
    ingest.append("hist-bad", json!(1)).await;
    for query in [
        "after=abc",
        "after=-1",
        "limit=0",
        "limit=100000",
        "limit=x",
        "befor=3",
    ] {
        let (status, body) = ingest
            .get_json(&format!("/v1/users/hist-bad/notifications?{query}"))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
        assert_eq!(error_code(&body), "invalid_query", "{query}: {body}");
    }
    let (status, body) = ingest.get_json("/v1/users/a%20b/notifications").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(error_code(&body), "invalid_user", "{body}");
}
