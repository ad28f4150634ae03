//! gapless-edge: holds device connections and delivers each user's stream to its devices
//! (DESIGN.md §1.3–1.5, §5).
//!
//! In the order a notification flows: [`wakeup`] receives the ingest's wakeups (and sweeps
//! for lost ones) and hints the [`hub`]'s connections; the [`delivery`] core of each session
//! turns hints into messages, reading gaps through the coalescing [`reader`]; a
//! [`transport`] (WebSocket, Server-Sent Events or long-poll) carries them to the device,
//! [`frame`] encoding WebSocket frames per subprotocol; [`acks`] persists what devices
//! acknowledged. Around them: [`auth`] checks tokens, [`registry`] keeps this edge's leases
//! in Redis, [`heartbeat`] pings and drops silent clients, [`report`] logs a line of connection
//! counts per interval, [`state`] is what they all share,
//! and [`run`] serves, then [`drain`]s on shutdown (the closes spread over a window, the
//! last acks written, the registry left). [`config`] holds the settings.
#![forbid(unsafe_code)]

pub mod acks;
pub mod auth;
pub mod config;
pub mod delivery;
pub mod drain;
pub mod frame;
pub mod heartbeat;
pub mod hub;
pub mod reader;
pub mod registry;
pub mod report;
pub mod state;
pub mod transport;
pub mod wakeup;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use gapless_shared::rate::{AuthFailures, KeyedLimit};
use gapless_shared::schema::{self, SchemaError};
use gapless_shared::store::{self, StoreError};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::timeout::TimeoutLayer;

pub use config::Config;

use crate::acks::AckBook;
use crate::auth::Verifier;
use crate::hub::Hub;
use crate::reader::Reader;
use crate::registry::{Registry, RegistryTask};
use crate::state::{AppState, EdgeState, HotMetrics};
use crate::transport::refuse;

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
    schema::check(&mut conn, config.redis.command_timeout).await?;
    let verifier = Verifier::with_rules(&config.jwt, &config.jwt_rules)?;
    // On one node, wakeups arrive over classic pub/sub (through the next seed, were there
    // several, when a subscription fails).
    let pubsub_clients = config
        .redis
        .urls
        .iter()
        .map(|url| redis::Client::open(url.as_str()))
        .collect::<Result<Vec<_>, _>>()?;

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
    // A cluster carries wakeups over sharded pub/sub; one node over classic pub/sub.
    if config.redis.cluster {
        tokio::spawn(wakeup::subscribe_sharded(
            config.redis.urls.clone(),
            config.edge_id.clone(),
            hub.clone(),
            sweep_now.clone(),
            tasks.clone(),
        ));
    } else {
        tokio::spawn(wakeup::subscribe(
            pubsub_clients,
            config.edge_id.clone(),
            hub.clone(),
            sweep_now.clone(),
            tasks.clone(),
        ));
    }
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
    tokio::spawn(gapless_shared::health::probe(
        conn.clone(),
        config.redis.command_timeout,
        Arc::default(),
        tasks.clone(),
    ));

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
        tally: Default::default(),
    });
    tokio::spawn(report::run(state.clone(), report::EVERY, tasks.clone()));
    tokio::spawn(report::publish(state.clone(), tasks.clone()));
    tokio::spawn(forget_idle_loop(state.clone(), tasks.clone()));
    let sessions = TaskTracker::new();
    let router = router(&config, (state.clone(), sessions.clone()));
    tracing::info!(addr = %listener.local_addr()?, edge = %config.edge_id, "edge listening");

    let serving = gapless_shared::listener::serve(
        listener,
        router,
        config.listener.clone(),
        shutdown.clone(),
    );
    tokio::pin!(serving);
    // The drain starts at the shutdown, beside the listener's wind-down rather than after
    // it: the listener waits for answers in flight, and an SSE stream or a held poll is one
    // until the drain closes it.
    let served = tokio::select! {
        served = &mut serving => Some(served),
        () = shutdown.cancelled() => None,
    };
    state.draining.store(true, Ordering::SeqCst);
    let drained = tokio::time::timeout(config.shutdown_grace, async {
        match served {
            Some(served) => (served, drain::run(&state, &sessions).await).0,
            None => tokio::join!(serving, drain::run(&state, &sessions)).0,
        }
    })
    .await;
    let served = match drained {
        Ok(served) => served,
        Err(_) => {
            tracing::warn!("drain did not finish within the grace period");
            Ok(())
        }
    };
    tasks.cancel();
    served?;
    Ok(())
}

/// The edge's routes. Every answer but a held poll is bounded by the request timeout (a
/// poll's own `wait_ms` bounds it); the HTTP fallbacks and `/v1/ws` answer CORS for the
/// listed origins.
fn router(config: &Config, state: AppState) -> Router {
    let fallbacks = Router::new()
        .route("/v1/sse", get(transport::sse::stream))
        .route("/v1/ack", post(transport::sse::ack))
        .layer(axum::extract::DefaultBodyLimit::max(4 << 10))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            config.listener.request_timeout,
        ))
        .route("/v1/poll", get(transport::poll::poll));
    // `/v1/ws` answers CORS too, so a page whose WebSocket failed can fetch the same URL and
    // read why (a refused upgrade's JSON error: 401, 429, 503) instead of a bare close 1006.
    let ws = Router::new().route("/v1/ws", get(transport::ws::upgrade));
    let (fallbacks, ws) = match cors(&config.cors_origins) {
        Some(cors) => (fallbacks.layer(cors.clone()), ws.layer(cors)),
        None => (fallbacks, ws),
    };
    let router = Router::new()
        .merge(ws)
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(render_metrics))
        .fallback(|| async { refuse(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            config.listener.request_timeout,
        ))
        .merge(fallbacks)
        .layer(axum::middleware::map_response(explain_timeout))
        .with_state(state);
    gapless_shared::telemetry::trace_requests(router)
}

/// CORS for the listed origins (`*`: any); `None` when there are none. An origin not listed
/// gets no `Access-Control-Allow-Origin`, so its page cannot read the answers.
fn cors(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                HeaderName::from_static("last-event-id"),
            ])
            .expose_headers([
                HeaderName::from_static("gapless-device"),
                HeaderName::from_static("gapless-edge"),
                HeaderName::from_static("gapless-heartbeat-ms"),
                header::RETRY_AFTER,
            ])
            .max_age(Duration::from_secs(600)),
    )
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
    match tokio::time::timeout(
        state.config.redis.command_timeout,
        schema::check(&mut conn, state.config.redis.command_timeout),
    )
    .await
    {
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
