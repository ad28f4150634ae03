//! gapless-edge: holds client WebSockets and delivers each user's stream to its devices
//! (DESIGN.md §1.3–1.5, §5).
//!
//! In the order a notification flows: [`wakeup`] receives the ingest's wakeups (and sweeps
//! for lost ones) and hints the [`hub`]'s connections; each [`session`] turns hints into
//! frames, reading gaps through the coalescing [`reader`]; [`frame`] encodes them per
//! subprotocol; [`acks`] persists what devices acknowledged. Around them: [`auth`] checks
//! tokens at the upgrade, [`registry`] keeps this edge's leases in Redis, [`heartbeat`] pings
//! and drops silent clients, and [`run`] serves, then drains on shutdown. [`config`] holds
//! the settings.
#![forbid(unsafe_code)]

pub mod acks;
pub mod auth;
pub mod config;
pub mod frame;
pub mod heartbeat;
pub mod hub;
pub mod reader;
pub mod registry;
pub mod session;
pub mod wakeup;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{Extension, Query, State, WebSocketUpgrade};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use gapless_shared::ids::UserId;
use gapless_shared::listener::Admission;
use gapless_shared::protocol::{SUBPROTOCOL_JSON, SUBPROTOCOL_POSTCARD};
use gapless_shared::rate::{AuthFailures, KeyedLimit, retry_after_secs};
use gapless_shared::schema::{self, SchemaError};
use gapless_shared::store::{self, StoreError};
use gapless_shared::telemetry::LogThrottle;
use redis::aio::ConnectionManager;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_http::timeout::TimeoutLayer;

pub use config::Config;

use crate::acks::AckBook;
use crate::auth::Verifier;
use crate::frame::Codec;
use crate::hub::{CloseReason, Hub};
use crate::reader::Reader;
use crate::registry::{Registry, RegistryTask};

/// Largest frame a client may send: clients send acks, pongs and one resume.
pub(crate) const MAX_CLIENT_FRAME: usize = 4 << 10;
/// Read buffer of a connection, allocated up front: small, since client frames are (acks,
/// pongs, one resume). tungstenite grows it for a larger frame, up to [`MAX_CLIENT_FRAME`].
/// Measured with `gapless-bench idle --connections 10000`: an idle connection costs 10.4 KiB
/// of edge RSS with a 4 KiB buffer, 7.4 KiB with 1 KiB.
const READ_BUFFER: usize = 1 << 10;
/// Bytes a connection's WebSocket layer may hold unsent before writes wait.
const MAX_WRITE_BUFFER: usize = 256 << 10;

/// Everything the edge's tasks share.
pub struct EdgeState {
    /// Settings.
    pub config: Config,
    /// Local connections.
    pub hub: Arc<Hub>,
    /// Coalescing stream reader.
    pub reader: Reader,
    /// Registry leases.
    pub registry: Registry,
    /// Ack positions.
    pub acks: AckBook,
    /// Token checks.
    verifier: Verifier,
    /// Failed authentications per source address.
    auth_failures: AuthFailures<IpAddr>,
    /// Connection attempts per user.
    user_connects: KeyedLimit<UserId>,
    /// Set when draining: new connections are refused.
    draining: AtomicBool,
    /// Shared Redis connection (readiness, drain).
    conn: ConnectionManager,
    /// The metrics counted on every delivery and ack.
    pub(crate) hot: HotMetrics,
}

/// Handles of the metrics counted on every delivery and ack, registered once: `counter!`
/// and `histogram!` build their key and look it up in the registry on every call.
pub(crate) struct HotMetrics {
    /// `gapless_edge_delivered_total{path="live"}`.
    pub delivered_live: metrics::Counter,
    /// `gapless_edge_delivered_total{path="replay"}`.
    pub delivered_replay: metrics::Counter,
    /// `gapless_edge_delivery_latency_seconds`: the entry's ingest time to its hand-over to
    /// the socket writer.
    pub delivery_latency: metrics::Histogram,
    /// `gapless_edge_acks_total`.
    pub acks: metrics::Counter,
}

impl HotMetrics {
    /// Registers the handles with the installed recorder.
    fn register() -> Self {
        Self {
            delivered_live: metrics::counter!("gapless_edge_delivered_total", "path" => "live"),
            delivered_replay: metrics::counter!("gapless_edge_delivered_total", "path" => "replay"),
            delivery_latency: metrics::histogram!("gapless_edge_delivery_latency_seconds"),
            acks: metrics::counter!("gapless_edge_acks_total"),
        }
    }
}

/// Why the edge could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Redis could not be reached at start-up.
    #[error("cannot connect to Redis: {0}")]
    Store(#[from] StoreError),
    /// Redis holds no schema or an older one.
    #[error(transparent)]
    Schema(#[from] SchemaError),
    /// The token key is unusable.
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    /// Serving failed.
    #[error("server error: {0}")]
    Io(#[from] std::io::Error),
    /// Bad Redis URL.
    #[error("invalid Redis URL: {0}")]
    Redis(#[from] redis::RedisError),
}

/// Serves WebSockets on `listener` until `shutdown` is cancelled, then drains: stops
/// accepting, closes clients with 1012 spread over the drain window, flushes ack positions,
/// leaves the registry; all within the shutdown grace period.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let mut conn = store::connect(&config.redis).await?;
    schema::check(&mut conn).await?;
    let verifier = Verifier::with_rules(&config.jwt, &config.jwt_rules)?;
    let pubsub_client = redis::Client::open(config.redis.url.as_str())?;

    // Background tasks stop on `tasks`, which is cancelled after the drain, not before.
    let tasks = CancellationToken::new();
    let hub = Arc::new(Hub::with_device_cap(config.max_connections_per_device));
    let reader = Reader::spawn(conn.clone(), config.redis.command_timeout, tasks.clone());
    let registry = Registry::spawn(
        RegistryTask {
            conn: conn.clone(),
            edge_id: config.edge_id.clone(),
            lease: config.lease,
            timeout: config.redis.command_timeout,
            hub: hub.clone(),
        },
        tasks.clone(),
    );
    let acks = AckBook::with_device_ttl(config.device_ttl);
    tokio::spawn(acks.clone().run(
        conn.clone(),
        config.ack_flush,
        config.redis.command_timeout,
        tasks.clone(),
    ));
    let sweep_now = Arc::new(Notify::new());
    tokio::spawn(wakeup::subscribe(
        pubsub_client,
        config.edge_id.clone(),
        hub.clone(),
        sweep_now.clone(),
        tasks.clone(),
    ));
    tokio::spawn(wakeup::sweep_loop(
        conn.clone(),
        hub.clone(),
        config.sweep,
        config.redis.command_timeout,
        sweep_now,
        tasks.clone(),
    ));
    tokio::spawn(heartbeat::run(hub.clone(), config.heartbeat, tasks.clone()));
    tokio::spawn(gapless_shared::telemetry::upkeep(tasks.clone()));

    // Install the recorder before the first connection, so none goes uncounted, and before
    // the hot metrics' handles are registered with it.
    gapless_shared::telemetry::prometheus();
    let state = Arc::new(EdgeState {
        config: config.clone(),
        hub: hub.clone(),
        reader,
        registry,
        acks: acks.clone(),
        verifier,
        auth_failures: AuthFailures::new(config.auth_failures),
        user_connects: KeyedLimit::new(config.user_connects),
        draining: AtomicBool::new(false),
        conn: conn.clone(),
        hot: HotMetrics::register(),
    });
    tokio::spawn(forget_idle_loop(state.clone(), tasks.clone()));
    let sessions = TaskTracker::new();
    let router = Router::new()
        .route("/v1/ws", get(upgrade))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(render_metrics))
        .fallback(|| async { refuse(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            config.listener.request_timeout,
        ))
        .layer(axum::middleware::map_response(explain_timeout))
        .with_state((state.clone(), sessions.clone()));
    tracing::info!(addr = %listener.local_addr()?, edge = %config.edge_id, "edge listening");

    let served = gapless_shared::listener::serve(
        listener,
        router,
        config.listener.clone(),
        shutdown.clone(),
    )
    .await;
    state.draining.store(true, Ordering::SeqCst);
    let drained = tokio::time::timeout(config.shutdown_grace, drain(&state, &sessions)).await;
    if drained.is_err() {
        tracing::warn!("drain did not finish within the grace period");
    }
    tasks.cancel();
    served?;
    Ok(())
}

/// Closes every client with 1012 spread over the drain window, waits for the sessions,
/// writes the last ack positions and leaves the registry.
async fn drain(state: &Arc<EdgeState>, sessions: &TaskTracker) {
    let config = &state.config;
    let conns = state.hub.conns();
    let users = state.hub.users();
    tracing::info!(connections = conns.len(), "draining");
    let window = config.drain_window.as_millis() as u64;
    let n = conns.len().max(1) as u64;
    for (i, conn) in conns.iter().enumerate() {
        let at = window * i as u64 / n;
        let hint = window.saturating_sub(at)
            + rand::Rng::gen_range(&mut rand::thread_rng(), 0..=window / 4 + 1);
        let conn = conn.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(at)).await;
            conn.request_close(CloseReason::Draining(hint));
        });
    }
    sessions.close();
    let grace_left = config
        .shutdown_grace
        .saturating_sub(config.drain_window)
        .max(Duration::from_millis(500));
    let _ = tokio::time::timeout(config.drain_window + grace_left / 2, sessions.wait()).await;
    state
        .acks
        .flush(&state.conn, config.redis.command_timeout)
        .await;
    registry::leave(
        &state.conn,
        &config.edge_id,
        config.redis.command_timeout,
        &users,
    )
    .await;
    tracing::info!("drained");
}

type AppState = (Arc<EdgeState>, TaskTracker);

/// Query of the upgrade request.
#[derive(Deserialize)]
struct WsQuery {
    /// The JWT, for clients that cannot set headers (browsers).
    token: Option<String>,
    /// The device, when the token names none.
    device: Option<String>,
}

fn refuse(status: StatusCode, code: &str, message: &str) -> Response {
    let mut response = (
        status,
        Json(serde_json::json!({"error": {"code": code, "message": message}})),
    )
        .into_response();
    if matches!(
        status,
        StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS
    ) {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

/// Gives the timeout layer's bare 408 a JSON error body.
async fn explain_timeout(response: Response) -> Response {
    if response.status() == StatusCode::REQUEST_TIMEOUT {
        return refuse(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            "the request took longer than the edge allows",
        );
    }
    response
}

/// `GET /v1/ws`: authenticates, then upgrades. Nothing of any stream is sent to a client
/// that is not authenticated.
async fn upgrade(
    State((state, sessions)): State<AppState>,
    admission: Option<Extension<Admission>>,
    headers: HeaderMap,
    query: Result<Query<WsQuery>, QueryRejection>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    if state.draining.load(Ordering::SeqCst) {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "this edge is draining; connect to another",
        );
    }
    let admission = admission.map(|Extension(a)| a);
    let source = admission.as_ref().map(Admission::source);
    // An address over its failure rate is refused before its token is looked at.
    if let Some(ip) = source
        && let Err(wait) = state.auth_failures.admit(&ip)
    {
        metrics::counter!("gapless_edge_auth_failures_total", "reason" => "too_many_auth_failures")
            .increment(1);
        return locked_out(wait);
    }
    // Refusals of credentials count against the address.
    let failed = |status, code, message: &str| {
        metrics::counter!("gapless_edge_auth_failures_total", "reason" => code).increment(1);
        match source.map(|ip| state.auth_failures.failed(&ip)) {
            Some(Err(wait)) => locked_out(wait),
            _ => refuse(status, code, message),
        }
    };
    let Ok(Query(query)) = query else {
        return failed(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "malformed query string",
        );
    };
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim().to_owned())
        .or(query.token);
    let Some(token) = token else {
        return failed(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            &auth::AuthError::Missing.to_string(),
        );
    };
    let (user, claimed_device) = match state.verifier.verify(&token) {
        Ok(v) => v,
        Err(e) => return failed(StatusCode::UNAUTHORIZED, "unauthorized", &e.to_string()),
    };
    // The token's device claim wins over the query: a device bound into a token cannot be
    // swapped by whoever holds the URL.
    let named = claimed_device.or(query.device);
    let assigned = named.is_none();
    let device = match named {
        Some(d) => match UserId::parse(&d) {
            Ok(_) => d,
            Err(e) => {
                return failed(
                    StatusCode::BAD_REQUEST,
                    "invalid_device",
                    &auth::AuthError::BadDevice(e).to_string(),
                );
            }
        },
        None => format!("d-{:016x}", rand::random::<u64>()),
    };
    if let Err(wait) = state.user_connects.check(&user) {
        metrics::counter!("gapless_edge_refused_total", "reason" => "user_connect_rate")
            .increment(1);
        return too_many(
            "too_many_connects",
            "this user connects too often; retry after the Retry-After seconds",
            wait,
        );
    }
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => {
            return refuse(
                rejection.status(),
                "not_a_websocket_upgrade",
                &rejection.body_text(),
            );
        }
    };
    let Some(place) = state
        .hub
        .reserve(&user, state.config.max_connections_per_user)
    else {
        metrics::counter!("gapless_edge_refused_total", "reason" => "user_cap").increment(1);
        return too_many(
            "too_many_connections",
            &format!(
                "this user already has {} connections at this edge",
                state.config.max_connections_per_user
            ),
            Duration::from_secs(5),
        );
    };
    // A verified client: its connection leaves the unauthenticated budget for the
    // established one, and the session holds its place there until it ends.
    if let Some(a) = &admission
        && a.establish().is_err()
    {
        let mut answer = refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_connections",
            "this edge holds as many connections as it may; retry shortly or connect to another",
        );
        answer
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return answer;
    }
    let ws = ws
        .protocols([SUBPROTOCOL_JSON, SUBPROTOCOL_POSTCARD])
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_write_buffer_size(MAX_WRITE_BUFFER)
        .max_message_size(MAX_CLIENT_FRAME)
        .max_frame_size(MAX_CLIENT_FRAME);
    let codec = Codec::from_protocol(ws.selected_protocol().and_then(|p| p.to_str().ok()));
    ws.on_upgrade(move |socket| {
        sessions.track_future(async move {
            let _places = (admission, place);
            session::run(state, socket, user, device, assigned, codec).await;
        })
    })
}

/// The 429 of an address over its failed-authentication rate.
fn locked_out(wait: Duration) -> Response {
    too_many(
        "too_many_auth_failures",
        "too many failed authentications from this address",
        wait,
    )
}

/// Forgets the rate limits' state of quiet addresses and users, every minute.
async fn forget_idle_loop(state: Arc<EdgeState>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                state.auth_failures.forget_idle();
                state.user_connects.forget_idle();
            }
            () = stop.cancelled() => return,
        }
    }
}

/// 429 with `Retry-After` rounded up from `wait`, logged at most once per 10 s.
fn too_many(code: &str, message: &str, wait: Duration) -> Response {
    static LOG: LogThrottle = LogThrottle::new();
    LOG.warn(|suppressed| tracing::warn!(code, suppressed, "upgrade refused with 429"));
    let mut answer = refuse(StatusCode::TOO_MANY_REQUESTS, code, message);
    answer.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from(retry_after_secs(wait)),
    );
    answer
}

/// `GET /readyz`: Redis answers with the current schema, and the edge is not draining.
async fn ready(State((state, _)): State<AppState>) -> Response {
    if state.draining.load(Ordering::SeqCst) {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "this edge is draining",
        );
    }
    let mut conn = state.conn.clone();
    match tokio::time::timeout(state.config.redis.command_timeout, schema::check(&mut conn)).await {
        Ok(Ok(_)) => "ready\n".into_response(),
        Ok(Err(e)) => refuse(StatusCode::SERVICE_UNAVAILABLE, "not_ready", &e.to_string()),
        Err(_) => refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "Redis did not answer in time",
        ),
    }
}

/// `GET /metrics`.
async fn render_metrics() -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            gapless_shared::telemetry::PROMETHEUS_CONTENT_TYPE,
        )],
        gapless_shared::telemetry::prometheus().render(),
    )
}
