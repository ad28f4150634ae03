//! Long-polling (DESIGN.md §5.1): `GET /v1/poll?epoch=&after=&wait_ms=&limit=` is held until
//! the device has something to receive, then answered with a JSON array of the same message
//! objects a WebSocket carries (`notification`, `reset`), or `[]` after `wait_ms`. Each
//! poll is a short session of the [`delivery`] core: `epoch`/`after` name (and acknowledge)
//! the last seq processed, else the stored position is used, else the live end, stored at
//! once. A held poll is in the hub like any connection, so a wakeup reaches it as fast as a
//! WebSocket; a device holds one poll at a time (a newer one answers the older with `[]`),
//! and its user's registry lease outlives the poll (see [`delivery::finish`]), so the next
//! poll is woken here at once too.

use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Extension, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use gapless_shared::listener::Admission;
use gapless_shared::protocol::{self, ServerMessage};
use serde::Deserialize;
use tokio::sync::mpsc;

use super::{Admit, Credentials, authenticate, refuse};
use crate::delivery::{self, End, Inbound};
use crate::hub::{Kind, Out};
use crate::state::AppState;

/// `wait_ms` when the request names none.
pub const DEFAULT_WAIT: Duration = Duration::from_millis(25_000);
/// Longest `wait_ms`.
pub const MAX_WAIT: Duration = Duration::from_millis(60_000);
/// `limit` when the request names none.
pub const DEFAULT_LIMIT: usize = 100;
/// Largest `limit`.
pub const MAX_LIMIT: usize = 1_000;

/// Query of `GET /v1/poll`.
#[derive(Debug, Deserialize)]
pub struct PollQuery {
    /// The JWT, for clients that cannot set headers.
    token: Option<String>,
    /// The device, when the token names none.
    device: Option<String>,
    /// The epoch of the client's position.
    epoch: Option<String>,
    /// The last seq processed.
    after: Option<u64>,
    /// Longest hold, ms.
    wait_ms: Option<u64>,
    /// Most messages in the answer.
    limit: Option<usize>,
}

/// `GET /v1/poll`.
pub async fn poll(
    State((state, sessions)): State<AppState>,
    admission: Option<Extension<Admission>>,
    headers: HeaderMap,
    query: Result<Query<PollQuery>, QueryRejection>,
) -> Response {
    let Ok(Query(query)) = query else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "malformed query: after, wait_ms and limit must be whole numbers",
        );
    };
    let wait = match query.wait_ms.map(Duration::from_millis) {
        None => DEFAULT_WAIT,
        Some(w) if w <= MAX_WAIT => w,
        Some(_) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "invalid_wait_ms",
                &format!("wait_ms is at most {}", MAX_WAIT.as_millis()),
            );
        }
    };
    let limit = match query.limit {
        None => DEFAULT_LIMIT,
        Some(n) if (1..=MAX_LIMIT).contains(&n) => n,
        Some(_) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "invalid_limit",
                &format!("limit is 1..={MAX_LIMIT}"),
            );
        }
    };
    let resume = match super::named_resume(query.epoch, query.after) {
        Ok(r) => r,
        Err(refused) => return refused.into_response(),
    };
    let credentials = Credentials {
        token: query.token,
        device: query.device,
    };
    let authed = match authenticate(&state, admission, &headers, Some(credentials), Admit::POLL) {
        Ok(a) => a,
        Err(refused) => return refused.into_response(),
    };
    let position = match super::start_position(&state, &authed, &resume, Kind::Poll).await {
        Ok(p) => p,
        Err(answer) => return answer,
    };

    let config = &state.config;
    let device = authed.device.clone();
    let (conn, tx, mut rx) = delivery::open(&state, authed.user, authed.device, Kind::Poll);
    let held = metrics::gauge!("gapless_edge_polls_held");
    held.increment(1.0);
    let answer = sessions
        .track_future(async {
            let _places = authed.places;
            let mut held_side = Held;
            let core =
                delivery::deliver(&state, &conn, &tx, &mut held_side, position, resume, false);
            let (messages, end) = tokio::select! {
                end = core => (drain(&mut rx, limit), end),
                messages = collect(&mut rx, limit, wait) => (messages, End::ClientGone),
            };
            delivery::finish(&state, &conn, tx, &end).await;
            messages
        })
        .await;
    held.decrement(1.0);
    let outcome = if answer.is_empty() {
        "empty"
    } else {
        "messages"
    };
    metrics::counter!("gapless_edge_polls_total", "outcome" => outcome).increment(1);
    let body = format!(
        "[{}]",
        answer
            .iter()
            .map(protocol::to_json)
            .collect::<Vec<_>>()
            .join(",")
    );
    let mut response = (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        body,
    )
        .into_response();
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&device) {
        h.insert("gapless-device", v);
    }
    if let Ok(v) = HeaderValue::from_str(&config.edge_id) {
        h.insert("gapless-edge", v);
    }
    h.insert(
        "gapless-heartbeat-ms",
        HeaderValue::from(config.heartbeat.as_millis() as u64),
    );
    response
}

/// A held poll's client side: nothing comes from it; the hold ends from the handler.
struct Held;

impl Inbound for Held {
    /// Never ready (cancel-safe).
    async fn next(&mut self) -> Result<gapless_shared::protocol::ClientMessage, End> {
        std::future::pending().await
    }
}

/// Waits up to `wait` for a first message, then takes what the core queues right behind
/// it, up to `limit`: the rest of the page it came with (the core moves queued messages into
/// the channel each time it runs, and both run in this task, so yielding lets it). Pings are
/// not answers. A close (drain, a newer poll of the device) answers with what there is.
async fn collect(rx: &mut mpsc::Receiver<Out>, limit: usize, wait: Duration) -> Vec<ServerMessage> {
    let mut out = Vec::new();
    let deadline = tokio::time::sleep(wait);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            item = rx.recv() => match item {
                Some(Out::Close(_)) | None => return out,
                Some(item) => if let Some(m) = item.into_answer() {
                    out.push(m);
                    break;
                },
            },
            () = &mut deadline => return out,
        }
    }
    loop {
        tokio::task::yield_now().await;
        let before = out.len();
        out.extend(drain(rx, limit - out.len()));
        if out.len() >= limit || out.len() == before {
            return out;
        }
    }
}

/// What the channel holds now, up to `limit`, without pings and closes.
fn drain(rx: &mut mpsc::Receiver<Out>, limit: usize) -> Vec<ServerMessage> {
    let mut out = Vec::new();
    while out.len() < limit {
        match rx.try_recv() {
            Ok(Out::Close(_)) | Err(_) => break,
            Ok(item) => out.extend(item.into_answer()),
        }
    }
    out
}
