//! Server-Sent Events (DESIGN.md §5.1): `GET /v1/sse` streams the device's delivery as
//! `text/event-stream`, and `POST /v1/ack` carries its acks, since an event stream has no
//! way back. Where delivery starts: the `Last-Event-ID` header (a browser's EventSource
//! reconnecting by itself), else `?last_event_id=`, else `?epoch=&after=`, else the stored
//! ack, else the live end; a named position acknowledges everything up to it.
//!
//! The stream is the response body, fed by the [`delivery`] core's channel and written by
//! hyper as each event comes (no buffering: an event is flushed as soon as it is queued).
//! The body's end (the client went away) ends the session; a client that reads nothing is
//! closed by the core's slow-consumer deadline, and a socket that accepts no byte of a write
//! by the listener's write timeout.

use std::convert::Infallible;
use std::sync::Arc;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Extension, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use gapless_shared::listener::Admission;
use gapless_shared::protocol::{self, ServerMessage};
use rand::Rng;
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};

use super::{Admit, Credentials, Refused, authenticate, event_id, parse_event_id, refuse};
use crate::delivery::{self, End, Inbound, Resume};
use crate::hub::{Closing, Conn, Kind, Out};
use crate::state::AppState;

/// Query of `GET /v1/sse`.
#[derive(Debug, Deserialize)]
pub struct SseQuery {
    /// The JWT, for clients that cannot set headers.
    token: Option<String>,
    /// The device, when the token names none.
    device: Option<String>,
    /// `<epoch>:<seq>`: the last event processed (a first connect cannot set the header).
    last_event_id: Option<String>,
    /// The epoch of the client's position.
    epoch: Option<String>,
    /// The last seq processed.
    after: Option<u64>,
}

/// `GET /v1/sse`.
pub async fn stream(
    State((state, sessions)): State<AppState>,
    admission: Option<Extension<Admission>>,
    headers: HeaderMap,
    query: Result<Query<SseQuery>, QueryRejection>,
) -> Response {
    let query = query.ok().map(|Query(q)| q);
    let credentials = query.as_ref().map(|q| Credentials {
        token: q.token.clone(),
        device: q.device.clone(),
    });
    let authed = match authenticate(&state, admission, &headers, credentials, Admit::CONNECTION) {
        Ok(a) => a,
        Err(refused) => return refused.into_response(),
    };
    let Some(query) = query else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "malformed query string",
        );
    };
    let resume = match where_to_start(&headers, &query) {
        Ok(r) => r,
        Err(refused) => return refused.into_response(),
    };
    let position = match super::start_position(&state, &authed, &resume, Kind::Sse).await {
        Ok(p) => p,
        Err(answer) => return answer,
    };

    let config = &state.config;
    let retry = config.sse_retry.as_millis() as u64;
    let retry = rand::thread_rng().gen_range(retry..=retry.saturating_mul(2));
    let welcome = ServerMessage::Welcome {
        user: authed.user.as_str().to_owned(),
        device: authed.device.clone(),
        edge: config.edge_id.clone(),
        heartbeat_ms: config.heartbeat.as_millis() as u64,
    };
    let first = format!("retry: {retry}\n\n{}", render(&Out::message(welcome)));
    let (conn, tx, rx) = delivery::open(&state, authed.user, authed.device, Kind::Sse);
    let (hangup_tx, hangup_rx) = oneshot::channel();
    let session_state = state.clone();
    let session_conn = conn.clone();
    let assigned = authed.assigned;
    let places = authed.places;
    sessions.spawn(async move {
        let _places = places;
        let (state, conn) = (session_state, session_conn);
        let mut inbound = Hangup(hangup_rx);
        let end =
            delivery::deliver(&state, &conn, &tx, &mut inbound, position, resume, assigned).await;
        delivery::finish(&state, &conn, tx, &end).await;
    });
    let body = Body::from_stream(events(Bytes::from(first), rx, conn, hangup_tx));
    let mut response = Response::new(body);
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // nginx buffers proxied answers unless told not to; others honour no-cache / no-transform.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// Where the request asks delivery to start, in the order of DESIGN.md §5.1.
fn where_to_start(headers: &HeaderMap, query: &SseQuery) -> Result<Resume, Refused> {
    let bad =
        |code: &'static str, message: &str| Refused::new(StatusCode::BAD_REQUEST, code, message);
    let header_id = headers
        .get("last-event-id")
        .map(|v| v.to_str().unwrap_or("\u{0}").trim().to_owned())
        .filter(|v| !v.is_empty());
    let query_id = query.last_event_id.clone().filter(|v| !v.trim().is_empty());
    if let Some(id) = header_id.or(query_id) {
        let Some((epoch, after)) = parse_event_id(&id) else {
            return Err(bad(
                "invalid_last_event_id",
                "a last event id is <epoch>:<seq>, as sent in the stream's id: fields",
            ));
        };
        return Ok(Resume {
            epoch: Some(epoch),
            after: Some(after),
        });
    }
    super::named_resume(query.epoch.clone(), query.after)
}

/// The client's side of an event stream: it only ever ends, when the response body is
/// dropped (the client went away, or the listener closed the connection).
struct Hangup(oneshot::Receiver<()>);

impl Inbound for Hangup {
    /// Cancel-safe: polling a oneshot receiver takes nothing.
    async fn next(&mut self) -> Result<gapless_shared::protocol::ClientMessage, End> {
        let _ = (&mut self.0).await;
        Err(End::ClientGone)
    }
}

/// The response body: the first chunk, then one chunk per item of the channel, each
/// written out as it comes (marking the connection as written to, for the heartbeat), until
/// the session's last item or its end. Dropping the body drops `hangup`, which ends the
/// session.
fn events(
    first: Bytes,
    rx: mpsc::Receiver<Out>,
    conn: Arc<Conn>,
    hangup: oneshot::Sender<()>,
) -> impl futures_util::Stream<Item = Result<Bytes, Infallible>> + Send {
    struct Feed {
        first: Option<Bytes>,
        rx: mpsc::Receiver<Out>,
        conn: Arc<Conn>,
        done: bool,
        _hangup: oneshot::Sender<()>,
    }
    let feed = Feed {
        first: Some(first),
        rx,
        conn,
        done: false,
        _hangup: hangup,
    };
    futures_util::stream::unfold(feed, |mut feed| async move {
        if let Some(first) = feed.first.take() {
            feed.conn.mark_sent();
            return Some((Ok(first), feed));
        }
        if feed.done {
            return None;
        }
        let item = feed.rx.recv().await?;
        feed.done = matches!(item, Out::Close(_));
        feed.conn.mark_sent();
        Some((Ok(Bytes::from(render(&item))), feed))
    })
}

/// One item as `text/event-stream` text.
fn render(item: &Out) -> String {
    match item {
        Out::Message(msg) if **msg == ServerMessage::Ping => ": ping\n\n".to_owned(),
        Out::Message(msg) => {
            let msg = &**msg;
            let (event, id) = match msg {
                ServerMessage::Welcome { .. } => ("welcome", None),
                ServerMessage::Notification(n) => ("notification", Some(event_id(&n.epoch, n.seq))),
                ServerMessage::Reset {
                    epoch, first_seq, ..
                } => ("reset", Some(event_id(epoch, first_seq.saturating_sub(1)))),
                ServerMessage::Ping => unreachable!("rendered above"),
            };
            let mut out = format!("event: {event}\n");
            if let Some(id) = id {
                out.push_str("id: ");
                out.push_str(&id);
                out.push('\n');
            }
            data_line(&mut out, &protocol::to_json(msg));
            out
        }
        Out::Close(closing) => match &**closing {
            Closing {
                reconnect_ms: Some(ms),
                ..
            } => {
                let mut out = format!("retry: {ms}\nevent: reconnect\n");
                data_line(
                    &mut out,
                    &serde_json::json!({"type": "reconnect", "delay_ms": ms}).to_string(),
                );
                out
            }
            Closing { code, reason, .. } => {
                let mut out = "event: close\n".to_owned();
                data_line(
                    &mut out,
                    &serde_json::json!({"type": "close", "code": code, "reason": reason})
                        .to_string(),
                );
                out
            }
        },
    }
}

/// Appends `data: <json>` and the event's end. JSON has line breaks only as whitespace
/// between tokens (a payload stored as sent may keep them), so they become spaces: one
/// `data:` line per event, the same JSON value.
fn data_line(out: &mut String, json: &str) {
    out.push_str("data: ");
    out.extend(
        json.chars()
            .map(|c| if c == '\n' || c == '\r' { ' ' } else { c }),
    );
    out.push_str("\n\n");
}

/// Body of `POST /v1/ack`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AckBody {
    /// The epoch the seq belongs to.
    epoch: String,
    /// The last seq processed.
    seq: u64,
}

/// `POST /v1/ack`: a cumulative ack of an SSE (or any) device, `204` when taken. Beyond what
/// this edge sent the device's connection in that epoch, or (no such connection here: the
/// ack reached another edge than the stream) beyond the log's last seq: `409`. An ack of an
/// epoch the log no longer has is stale (a reset overtook it) and is ignored.
pub async fn ack(
    State((state, _)): State<AppState>,
    admission: Option<Extension<Admission>>,
    headers: HeaderMap,
    query: Result<Query<Credentials>, QueryRejection>,
    body: Result<Json<AckBody>, JsonRejection>,
) -> Response {
    let credentials = query.ok().map(|Query(q)| q);
    let authed = match authenticate(&state, admission, &headers, credentials, Admit::ACK) {
        Ok(a) => a,
        Err(refused) => return refused.into_response(),
    };
    let AckBody { epoch, seq } = match body {
        Ok(Json(b)) => b,
        Err(rejection) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "invalid_ack",
                &format!(
                    "the body must be {{\"epoch\":\"…\",\"seq\":N}}: {}",
                    rejection.body_text()
                ),
            );
        }
    };
    let beyond = |last: u64| {
        refuse(
            StatusCode::CONFLICT,
            "ack_beyond_sent",
            &format!("ack {seq} is beyond the last seq sent in epoch {epoch} ({last})"),
        )
    };
    let local = state
        .hub
        .device_conns(&authed.user, &authed.device)
        .iter()
        .map(|c| c.position())
        .filter(|(e, _)| e.as_deref() == Some(epoch.as_str()))
        .map(|(_, sent)| sent)
        .max();
    let sent = match local {
        Some(sent) => sent,
        None => match delivery::read_position_once(&state, &authed.user, &authed.device).await {
            Ok(p) if p.epoch.as_deref() == Some(epoch.as_str()) => p.last_seq,
            Ok(_) => return StatusCode::NO_CONTENT.into_response(),
            Err(e) => return super::unavailable(&e),
        },
    };
    if seq > sent {
        return beyond(sent);
    }
    state.acks.record(&authed.user, &authed.device, &epoch, seq);
    state.hot.of(Kind::Sse).acks.increment(1);
    StatusCode::NO_CONTENT.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use gapless_shared::protocol::{Notification, ResetReason};
    use serde_json::value::RawValue;

    #[test]
    fn events_are_framed_with_their_ids_on_one_data_line() {
        let note = Out::message(ServerMessage::Notification(Notification {
            seq: 17,
            epoch: "e1".into(),
            ts: 5,
            payload: RawValue::from_string("{\"a\":\n 1}".into()).expect("json"),
        }));
        assert_eq!(
            render(&note),
            "event: notification\nid: e1:17\ndata: {\"type\":\"notification\",\"seq\":17,\"epoch\":\"e1\",\"ts\":5,\"payload\":{\"a\":  1}}\n\n"
        );
        let reset = Out::message(ServerMessage::Reset {
            epoch: "e2".into(),
            first_seq: 1,
            reason: ResetReason::EpochChanged,
        });
        assert!(render(&reset).starts_with("event: reset\nid: e2:0\ndata: {"));
        assert_eq!(render(&Out::message(ServerMessage::Ping)), ": ping\n\n");
        let drain = Out::close(Closing {
            code: 1012,
            reason: "draining".into(),
            reconnect_ms: Some(1500),
        });
        assert_eq!(
            render(&drain),
            "retry: 1500\nevent: reconnect\ndata: {\"delay_ms\":1500,\"type\":\"reconnect\"}\n\n"
        );
    }
}
