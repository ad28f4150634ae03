//! The HTTP API of DESIGN.md §4: routes, authentication, and the handlers; bodies are
//! read and decoded by [`crate::body`].
//!
//! Every error is a status with the JSON body of [`ApiError`]; axum's own plain-text
//! rejections are mapped before they reach a client.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{MatchedPath, Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use gapless_shared::ids::UserId;
use gapless_shared::schema;
use gapless_shared::store::StoreError;
use serde::Deserialize;
use tower_http::timeout::TimeoutLayer;

use crate::append::NewNotification;
use crate::auth::{self, KeyId};
use crate::body;
use crate::config::Config;
use crate::error::{ApiError, ErrorBody};
pub use crate::state::AppState;
use crate::{devices, history, openapi, status};
use gapless_shared::api::{Appended, BatchAnswer, ItemResult, Notification};

/// The ingest's router; with [`Config::demo`] on, also the demo page of [`crate::demo`].
pub fn router(state: Arc<AppState>, config: &Config) -> Router {
    let v1 = Router::new()
        .route("/v1/notifications", post(append_one))
        .route("/v1/notifications/batch", post(append_batch))
        .route("/v1/users/{user}/notifications", get(read_history))
        .route("/v1/users/{user}/presence", get(read_presence))
        .route("/v1/users/{user}/devices", get(read_devices))
        .route("/v1/status", get(read_status))
        .route("/status", get(status_page))
        .route_layer(middleware::from_fn_with_state(
            state.guard.clone(),
            auth::authenticate,
        ));
    // The demo page is public: it carries no secrets (see `crate::demo`).
    let demo = if config.demo {
        crate::demo::routes()
    } else {
        Router::new()
    };
    let router = Router::new()
        .merge(v1)
        .merge(demo)
        .route("/healthz", get(healthz))
        .route("/openapi.json", get(openapi::serve))
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
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            config.listener.request_timeout,
        ))
        .layer(middleware::map_response(explain_timeout))
        .layer(middleware::from_fn(observe))
        .with_state(state);
    gapless_shared::telemetry::trace_requests(router)
}

/// Gives the timeout layer's bare 408 the JSON error body every other answer has.
async fn explain_timeout(response: Response) -> Response {
    if response.status() == StatusCode::REQUEST_TIMEOUT {
        return ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            "the request, body included, took longer than the ingest allows",
        )
        .closing();
    }
    response
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

/// `POST /v1/notifications`.
#[utoipa::path(
    post,
    path = "/v1/notifications",
    tag = "notifications",
    summary = "Append one notification",
    description = "Answered only after Redis accepted the write.",
    request_body(content = Notification, content_type = "application/json"),
    responses(
        (status = 200, description = "Appended, or a duplicate of an earlier idempotency key", body = Appended),
        openapi::AppendRefusals,
    ),
    security(("api_key" = []))
)]
async fn append_one(
    State(state): State<Arc<AppState>>,
    request: Request,
) -> Result<Json<Appended>, ApiError> {
    let (parts, body) = request.into_parts();
    body::require_json(&parts.headers)?;
    let body = body::read(
        &parts.headers,
        body,
        state.limits.body_bytes,
        &state.body_budget,
    )
    .await?;
    let item = body::decode_one(&body.bytes, &state.limits)?;
    state
        .guard
        .spend_items(parts.extensions.get::<KeyId>().copied(), 1)?;
    let mut results = state.appender.append(std::slice::from_ref(&item)).await?;
    let result = results
        .pop()
        .ok_or_else(|| ApiError::from(StoreError::reply("no result for the item")))?;
    let appended = result?;
    count_items::<ApiError>(&state, std::slice::from_ref(&Ok(appended.clone())));
    Ok(Json(appended))
}

/// `POST /v1/notifications/batch`: JSON array, NDJSON or postcard; one result per item.
#[utoipa::path(
    post,
    path = "/v1/notifications/batch",
    tag = "notifications",
    summary = "Append many notifications",
    description = "One result per item, in order; a bad item never sinks its neighbours (it gets an error result of its own). Items of one user are appended in order, in one atomic step per user. The same items travel as a JSON array, as NDJSON (one item object per line) or as postcard (`gapless_shared::batch::PostcardBatch::V1`, the payload as JSON text).",
    request_body(content(
        (Vec<Notification> = "application/json"),
        (Vec<Notification> = "application/x-ndjson"),
        (Vec<Notification> = "application/x-postcard"),
    )),
    responses(
        (status = 200, description = "One result per item", body = BatchAnswer),
        openapi::AppendRefusals,
    ),
    security(("api_key" = []))
)]
async fn append_batch(
    State(state): State<Arc<AppState>>,
    request: Request,
) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let format = body::Format::of(&parts.headers)?;
    let body = body::read(
        &parts.headers,
        body,
        state.limits.batch_bytes,
        &state.body_budget,
    )
    .await?;
    let parsed = body::decode_batch(format, &body.bytes, &state.limits)?;
    // Refused items cost nothing: only what would be appended is spent.
    let valid = parsed.iter().filter(|r| r.is_ok()).count();
    state
        .guard
        .spend_items(parts.extensions.get::<KeyId>().copied(), valid)?;
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
                None => Err(ApiError::from(StoreError::reply("no result for the item")).body),
            },
            Err(e) => Err(e.body),
        })
        .collect();
    count_items(&state, &results);
    let results: Vec<ItemResult> = results
        .into_iter()
        .map(|r| match r {
            Ok(a) => ItemResult::Ok(a),
            Err(error) => ItemResult::Err { error },
        })
        .collect();
    Ok(Json(BatchAnswer { results }).into_response())
}

fn count_items<E>(state: &AppState, results: &[Result<Appended, E>]) {
    let (mut appended, mut duplicate, mut rejected) = (0u64, 0u64, 0u64);
    for r in results {
        match r {
            Ok(a) if a.duplicate => duplicate += 1,
            Ok(_) => appended += 1,
            Err(_) => rejected += 1,
        }
    }
    state.appends.add(appended);
    metrics::counter!("gapless_ingest_items_total", "result" => "appended").increment(appended);
    metrics::counter!("gapless_ingest_items_total", "result" => "duplicate").increment(duplicate);
    metrics::counter!("gapless_ingest_items_total", "result" => "rejected").increment(rejected);
}

/// The `{user}` of a path, checked.
fn path_user(user: Result<Path<String>, PathRejection>) -> Result<UserId, ApiError> {
    let Path(user) = user.map_err(|e| ApiError::bad_request("invalid_user", e.body_text()))?;
    UserId::parse(&user).map_err(|e| ApiError::bad_request("invalid_user", e.to_string()))
}

/// `GET /v1/users/{user}/presence`.
#[utoipa::path(
    get,
    path = "/v1/users/{user}/presence",
    tag = "users",
    summary = "Who of a user is connected now",
    description = "From the registry and the edges' leases in Redis, O(devices); an edge that died stops counting within its lease.",
    params(("user" = gapless_shared::ids::UserId, Path, description = "The user id")),
    responses(
        (status = 200, description = "The user's connections", body = devices::Presence),
        openapi::ReadRefusals,
    ),
    security(("api_key" = []))
)]
async fn read_presence(
    State(state): State<Arc<AppState>>,
    user: Result<Path<String>, PathRejection>,
) -> Result<Json<devices::Presence>, ApiError> {
    let user = path_user(user)?;
    let mut conn = state.appender.connection();
    Ok(Json(
        devices::presence(&mut conn, state.redis_timeout, &user).await?,
    ))
}

/// `GET /healthz`: the process is up.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    summary = "The process is up",
    responses((status = 200, description = "Up", body = String, content_type = "text/plain"))
)]
async fn healthz() -> &'static str {
    "ok\n"
}

/// `GET /status`: the live status page (HTML).
#[utoipa::path(
    get,
    path = "/status",
    tag = "operations",
    summary = "The live status page",
    description = "A browser presents the API key by HTTP Basic authentication (any user name, the key as the password): without credentials the answer is 401 with `WWW-Authenticate: Basic`.",
    responses(
        (status = 200, description = "The page", body = String, content_type = "text/html"),
        (status = 401, description = "No API key: the browser is asked for one", body = openapi::Error),
        (status = 403, description = "Unknown API key", body = openapi::Error),
        (status = 429, description = "Over the key's rate, or too many failed authentications (Retry-After)", body = openapi::Error),
    ),
    security(("browser" = []), ("api_key" = []))
)]
async fn status_page() -> Response {
    status::page()
}

/// `GET /v1/status`: what the status page shows.
#[utoipa::path(
    get,
    path = "/v1/status",
    tag = "operations",
    summary = "The fleet's live figures",
    responses(
        (status = 200, description = "Edges, rates, p99, Redis", body = status::Status),
        openapi::ReadRefusals,
    ),
    security(("api_key" = []), ("browser" = []))
)]
async fn read_status(State(state): State<Arc<AppState>>) -> Result<Json<status::Status>, ApiError> {
    let mut conn = state.appender.connection();
    Ok(Json(
        status::read(
            &mut conn,
            state.redis_timeout,
            &state.appends,
            state.health.snapshot(),
        )
        .await?,
    ))
}

/// Query of the devices endpoint.
#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct DevicesQuery {
    /// Ask, per device, whether this seq of the current epoch is acknowledged (from 1).
    #[param(minimum = 1, maximum = 9_007_199_254_740_991_u64)]
    seq: Option<u64>,
}

/// `GET /v1/users/{user}/devices?seq=`.
#[utoipa::path(
    get,
    path = "/v1/users/{user}/devices",
    tag = "users",
    summary = "Every known device of a user and how far it acknowledged",
    description = "From the stored ack positions and presence in Redis, O(devices).",
    params(("user" = gapless_shared::ids::UserId, Path, description = "The user id"), DevicesQuery),
    responses(
        (status = 200, description = "Each device's delivery status", body = devices::Devices),
        openapi::ReadRefusals,
    ),
    security(("api_key" = []))
)]
async fn read_devices(
    State(state): State<Arc<AppState>>,
    user: Result<Path<String>, PathRejection>,
    query: Result<Query<DevicesQuery>, QueryRejection>,
) -> Result<Json<devices::Devices>, ApiError> {
    let user = path_user(user)?;
    let Query(query) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    if query.seq == Some(0) {
        return Err(ApiError::bad_request(
            "invalid_query",
            "seq counts from 1 in each epoch",
        ));
    }
    if query.seq.is_some_and(|n| n > MAX_SEQ) {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("seq is at most {MAX_SEQ}"),
        ));
    }
    let mut conn = state.appender.connection();
    Ok(Json(
        devices::devices(&mut conn, state.redis_timeout, &user, query.seq).await?,
    ))
}

/// The largest seq a query may name: 2^53 - 1, the largest integer every JSON reader holds
/// exactly (a log never gets near it).
const MAX_SEQ: u64 = (1 << 53) - 1;

/// Query of the history endpoint.
#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct HistoryQuery {
    /// Entries after this seq [default: 0].
    #[serde(default)]
    #[param(minimum = 0, maximum = 9_007_199_254_740_991_u64)]
    after: u64,
    /// Most entries [default: 100].
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
}

/// `GET /v1/users/{user}/notifications?after=&limit=`.
#[utoipa::path(
    get,
    path = "/v1/users/{user}/notifications",
    tag = "users",
    summary = "A user's retained notifications after a seq",
    params(("user" = gapless_shared::ids::UserId, Path, description = "The user id"), HistoryQuery),
    responses(
        (status = 200, description = "A page of the user's log", body = history::History),
        openapi::ReadRefusals,
    ),
    security(("api_key" = []))
)]
async fn read_history(
    State(state): State<Arc<AppState>>,
    user: Result<Path<String>, PathRejection>,
    query: Result<Query<HistoryQuery>, QueryRejection>,
) -> Result<Json<history::History>, ApiError> {
    let user = path_user(user)?;
    let Query(query) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let limit = query.limit.unwrap_or(history::DEFAULT_LIMIT);
    if limit == 0 || limit > history::MAX_LIMIT {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("limit must be between 1 and {}", history::MAX_LIMIT),
        ));
    }
    if query.after > MAX_SEQ {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("after is at most {MAX_SEQ}"),
        ));
    }
    let mut conn = state.appender.connection();
    let history = history::read(&mut conn, state.redis_timeout, &user, query.after, limit).await?;
    Ok(Json(history))
}

/// `GET /readyz`: Redis answers and holds the schema this build needs.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    summary = "Redis answers and holds the current schema",
    responses(
        (status = 200, description = "Ready", body = String, content_type = "text/plain"),
        (status = 503, description = "Redis unavailable or its schema outdated (Retry-After)", body = openapi::Error),
    )
)]
async fn ready(State(state): State<Arc<AppState>>) -> Result<&'static str, ApiError> {
    let mut conn = state.appender.connection();
    let checked = tokio::time::timeout(
        state.redis_timeout,
        schema::check(&mut conn, state.redis_timeout),
    )
    .await;
    match checked {
        Ok(Ok(_)) => Ok("ready\n"),
        Ok(Err(schema::SchemaError::Store(e))) => Err(e.into()),
        Ok(Err(e)) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "schema_outdated",
            e.to_string(),
        )),
        Err(_) => Err(StoreError::timeout(state.redis_timeout).into()),
    }
}

/// `GET /metrics`: Prometheus text format.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    summary = "Prometheus metrics",
    responses((status = 200, description = "Prometheus text format 0.0.4", body = String, content_type = "text/plain"))
)]
async fn render_metrics() -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            gapless_shared::telemetry::PROMETHEUS_CONTENT_TYPE,
        )],
        gapless_shared::telemetry::prometheus().render(),
    )
}
