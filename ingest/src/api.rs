//! The HTTP API of DESIGN.md §4: routes, authentication, body parsing and limits.
//!
//! Every error is a status with the JSON body of [`ApiError`]; axum's own plain-text
//! rejections are mapped before they reach a client.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use gapless_shared::batch::PostcardBatch;
use gapless_shared::config::Secret;
use gapless_shared::ids::{UserId, validate_idempotency_key};
use gapless_shared::schema;
use gapless_shared::store::StoreError;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::append::{Appended, Appender, NewNotification};
use crate::config::{Config, Limits};
use crate::error::{ApiError, ErrorBody};
use crate::history;

/// State shared by all handlers.
pub struct AppState {
    /// Appends and wakes.
    pub appender: Appender,
    /// Limits of requests.
    pub limits: Limits,
    /// Accepted API keys.
    pub api_keys: Vec<Secret>,
    /// Bound of one Redis call (for history and readiness).
    pub redis_timeout: std::time::Duration,
}

/// The ingest's router.
pub fn router(state: Arc<AppState>, config: &Config) -> Router {
    let limits = config.limits;
    let v1 = Router::new()
        .route(
            "/v1/notifications",
            post(append_one).layer(DefaultBodyLimit::max(limits.body_bytes)),
        )
        .route(
            "/v1/notifications/batch",
            post(append_batch).layer(DefaultBodyLimit::max(limits.batch_bytes)),
        )
        .route("/v1/users/{user}/notifications", get(read_history))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .merge(v1)
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(render_metrics))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this endpoint",
            )
        })
        .layer(middleware::from_fn(observe))
        .with_state(state)
}

/// Counts and times every request by route and status.
async fn observe(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("gapless_ingest_requests_total", "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("gapless_ingest_request_duration_seconds", "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

/// `Authorization: Bearer <api key>`: missing -> 401, unknown -> 403.
async fn authenticate(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(value) = request.headers().get(header::AUTHORIZATION) else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing `Authorization: Bearer <api key>` header",
        )
        .into_response();
    };
    // The scheme is case-insensitive (RFC 9110 §11.1).
    let key = value
        .to_str()
        .ok()
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, key)| key.trim());
    let Some(key) = key else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the Authorization header must be `Bearer <api key>`",
        )
        .into_response();
    };
    if !state
        .api_keys
        .iter()
        .any(|k| constant_time_eq(k.expose().as_bytes(), key.as_bytes()))
    {
        return ApiError::new(StatusCode::FORBIDDEN, "forbidden", "unknown API key")
            .into_response();
    }
    next.run(request).await
}

/// Compares without an early exit on the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The media type of a request, lowercased, without parameters.
fn media_type(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    Some(value.split(';').next()?.trim().to_ascii_lowercase())
}

/// The body, or 413 / 400 as JSON.
fn body_or_error(body: Result<Bytes, BytesRejection>, limit: usize) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(
                "body_too_large",
                format!("the request body is larger than {limit} bytes"),
            )
        } else {
            ApiError::bad_request("unreadable_body", rejection.body_text())
        }
    })
}

/// One notification as a producer writes it in JSON.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ItemIn<'a> {
    /// Borrowed unless the JSON string holds escapes.
    #[serde(borrow)]
    user: Cow<'a, str>,
    #[serde(borrow)]
    payload: &'a RawValue,
    #[serde(default, borrow)]
    idempotency_key: Option<Cow<'a, str>>,
}

/// Checks the parts of one item; the error carries the status a single append answers.
fn validate<'a>(
    user: &str,
    payload: &'a str,
    idempotency_key: Option<Cow<'a, str>>,
    limits: &Limits,
) -> Result<NewNotification<'a>, ApiError> {
    let user =
        UserId::parse(user).map_err(|e| ApiError::bad_request("invalid_user", e.to_string()))?;
    if payload.len() > limits.payload_bytes {
        return Err(ApiError::too_large(
            "payload_too_large",
            format!(
                "the payload is {} bytes, the limit is {}",
                payload.len(),
                limits.payload_bytes
            ),
        ));
    }
    if let Some(key) = &idempotency_key {
        validate_idempotency_key(key)
            .map_err(|e| ApiError::bad_request("invalid_idempotency_key", e.to_string()))?;
    }
    Ok(NewNotification {
        user,
        payload,
        idempotency_key,
    })
}

/// Parses one JSON item: malformed JSON is 400, the wrong shape 422.
fn parse_json_item<'a>(text: &'a str, limits: &Limits) -> Result<NewNotification<'a>, ApiError> {
    let item: ItemIn<'a> = serde_json::from_str(text).map_err(|e| {
        if e.is_syntax() || e.is_eof() {
            ApiError::bad_request("invalid_json", e.to_string())
        } else {
            ApiError::unprocessable(
                "invalid_notification",
                format!("expected {{\"user\", \"payload\", \"idempotency_key\"?}}: {e}"),
            )
        }
    })?;
    validate(&item.user, item.payload.get(), item.idempotency_key, limits)
}

fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    match media_type(headers).as_deref() {
        Some("application/json") => Ok(()),
        other => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "expected Content-Type application/json, got {}",
                other.unwrap_or("none")
            ),
        )),
    }
}

/// `POST /v1/notifications`.
async fn append_one(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Appended>, ApiError> {
    require_json(&headers)?;
    let body = body_or_error(body, state.limits.body_bytes)?;
    let text = std::str::from_utf8(&body)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("body is not UTF-8: {e}")))?;
    let item = parse_json_item(text, &state.limits)?;
    let mut results = state.appender.append(std::slice::from_ref(&item)).await?;
    let result = results
        .pop()
        .ok_or_else(|| ApiError::from(StoreError::Redis("no result for the item".into())))?;
    let appended = result?;
    count_items::<ApiError>(std::slice::from_ref(&Ok(appended.clone())));
    Ok(Json(appended))
}

/// One entry of a batch answer.
#[derive(Serialize)]
#[serde(untagged)]
enum ItemResult {
    Ok(Appended),
    Err { error: ErrorBody },
}

/// `POST /v1/notifications/batch`: JSON array, NDJSON or postcard; one result per item.
async fn append_batch(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let limits = state.limits;
    let kind = media_type(&headers);
    let kind = match kind.as_deref() {
        Some(k @ ("application/json" | "application/x-ndjson" | "application/x-postcard")) => {
            k.to_owned()
        }
        other => {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!(
                    "expected Content-Type application/json, application/x-ndjson or \
                     application/x-postcard, got {}",
                    other.unwrap_or("none")
                ),
            ));
        }
    };
    let body = body_or_error(body, limits.batch_bytes)?;
    let postcard;
    let mut parsed: Vec<Result<NewNotification<'_>, ApiError>> = Vec::new();
    let too_many = |n: usize| {
        ApiError::too_large(
            "too_many_items",
            format!(
                "the batch holds {n} items, the limit is {}",
                limits.batch_items
            ),
        )
    };
    match kind.as_str() {
        "application/x-postcard" => {
            postcard = PostcardBatch::decode(&body).map_err(|e| {
                ApiError::bad_request("invalid_postcard", format!("not a postcard batch: {e}"))
            })?;
            let PostcardBatch::V1(items) = &postcard;
            if items.len() > limits.batch_items {
                return Err(too_many(items.len()));
            }
            for item in items {
                parsed.push(
                    serde_json::from_str::<&RawValue>(&item.payload)
                        .map_err(|e| {
                            ApiError::bad_request(
                                "invalid_json",
                                format!("payload is not JSON: {e}"),
                            )
                        })
                        .and_then(|_| {
                            validate(
                                &item.user,
                                &item.payload,
                                item.idempotency_key.as_deref().map(Cow::Borrowed),
                                &limits,
                            )
                        }),
                );
            }
        }
        _ => {
            let text = std::str::from_utf8(&body).map_err(|e| {
                ApiError::bad_request("invalid_json", format!("body is not UTF-8: {e}"))
            })?;
            if kind == "application/json" {
                let items: Vec<&RawValue> = serde_json::from_str(text).map_err(|e| {
                    ApiError::bad_request(
                        "invalid_json",
                        format!("expected a JSON array of notifications: {e}"),
                    )
                })?;
                if items.len() > limits.batch_items {
                    return Err(too_many(items.len()));
                }
                parsed.extend(items.iter().map(|raw| parse_json_item(raw.get(), &limits)));
            } else {
                let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
                if lines.len() > limits.batch_items {
                    return Err(too_many(lines.len()));
                }
                parsed.extend(lines.iter().map(|line| parse_json_item(line, &limits)));
            }
        }
    }
    metrics::histogram!("gapless_ingest_batch_items").record(parsed.len() as f64);

    let valid: Vec<NewNotification<'_>> = parsed
        .iter()
        .filter_map(|r| r.as_ref().ok().cloned())
        .collect();
    let mut appended = state.appender.append(&valid).await?.into_iter();
    let results: Vec<Result<Appended, ErrorBody>> = parsed
        .into_iter()
        .map(|r| match r {
            Ok(_) => match appended.next() {
                Some(Ok(a)) => Ok(a),
                Some(Err(e)) => Err(ApiError::from(e).body),
                None => {
                    Err(ApiError::from(StoreError::Redis("no result for the item".into())).body)
                }
            },
            Err(e) => Err(e.body),
        })
        .collect();
    count_items(&results);
    let results: Vec<ItemResult> = results
        .into_iter()
        .map(|r| match r {
            Ok(a) => ItemResult::Ok(a),
            Err(error) => ItemResult::Err { error },
        })
        .collect();
    #[derive(Serialize)]
    struct BatchAnswer {
        results: Vec<ItemResult>,
    }
    Ok(Json(BatchAnswer { results }).into_response())
}

fn count_items<E>(results: &[Result<Appended, E>]) {
    let (mut appended, mut duplicate, mut rejected) = (0u64, 0u64, 0u64);
    for r in results {
        match r {
            Ok(a) if a.duplicate => duplicate += 1,
            Ok(_) => appended += 1,
            Err(_) => rejected += 1,
        }
    }
    metrics::counter!("gapless_ingest_items_total", "result" => "appended").increment(appended);
    metrics::counter!("gapless_ingest_items_total", "result" => "duplicate").increment(duplicate);
    metrics::counter!("gapless_ingest_items_total", "result" => "rejected").increment(rejected);
}

/// Query of the history endpoint.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryQuery {
    /// Entries after this seq.
    #[serde(default)]
    after: u64,
    /// Most entries.
    limit: Option<usize>,
}

/// `GET /v1/users/{user}/notifications?after=&limit=`.
async fn read_history(
    State(state): State<Arc<AppState>>,
    user: Result<Path<String>, PathRejection>,
    query: Result<Query<HistoryQuery>, QueryRejection>,
) -> Result<Json<history::History>, ApiError> {
    let Path(user) = user.map_err(|e| ApiError::bad_request("invalid_user", e.body_text()))?;
    let user =
        UserId::parse(&user).map_err(|e| ApiError::bad_request("invalid_user", e.to_string()))?;
    let Query(query) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let limit = query.limit.unwrap_or(history::DEFAULT_LIMIT);
    if limit == 0 || limit > history::MAX_LIMIT {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("limit must be between 1 and {}", history::MAX_LIMIT),
        ));
    }
    let mut conn = state.appender.connection();
    let history = history::read(&mut conn, state.redis_timeout, &user, query.after, limit).await?;
    Ok(Json(history))
}

/// `GET /readyz`: Redis answers and holds the schema this build needs.
async fn ready(State(state): State<Arc<AppState>>) -> Result<&'static str, ApiError> {
    let mut conn = state.appender.connection();
    let checked = tokio::time::timeout(state.redis_timeout, schema::check(&mut conn)).await;
    match checked {
        Ok(Ok(_)) => Ok("ready\n"),
        Ok(Err(schema::SchemaError::Store(e))) => Err(e.into()),
        Ok(Err(e)) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "schema_outdated",
            e.to_string(),
        )),
        Err(_) => Err(StoreError::Unavailable(format!(
            "no answer within {} ms",
            state.redis_timeout.as_millis()
        ))
        .into()),
    }
}

/// `GET /metrics`: Prometheus text format.
async fn render_metrics() -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            gapless_shared::telemetry::PROMETHEUS_CONTENT_TYPE,
        )],
        gapless_shared::telemetry::prometheus().render(),
    )
}
