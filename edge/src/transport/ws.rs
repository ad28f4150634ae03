//! The WebSocket transport (DESIGN.md §5): `GET /v1/ws` upgrades, the edge sends `welcome`,
//! the client answers `resume`, then the [`delivery`] core runs with the socket's frames as
//! its inbound side (acks, pongs) and a writer task rendering its [`Out`] items as frames of
//! the negotiated subprotocol.
//!
//! Each connection runs two tasks: the session (reads client frames, drives delivery) and a
//! writer that owns the socket's sink behind the bounded channel. A socket that accepts
//! nothing for the slow-consumer timeout closes the connection with 1013.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket};
use axum::extract::{Extension, Query, State, WebSocketUpgrade};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use gapless_shared::listener::Admission;
use gapless_shared::protocol::{
    ClientMessage, SUBPROTOCOL_JSON, SUBPROTOCOL_POSTCARD, ServerMessage, close,
};
use tokio::sync::mpsc;

use super::{Admit, Credentials, authenticate, refuse};
use crate::delivery::{self, End, Inbound, Resume};
use crate::frame::{self, Codec, FrameCodec, Violation};
use crate::hub::{CloseReason, Conn, Kind, Out};
use crate::state::{AppState, EdgeState};

/// Largest frame a client may send: clients send acks, pongs and one resume.
pub(crate) const MAX_CLIENT_FRAME: usize = 4 << 10;
/// Read buffer of a connection, allocated up front: small, since client frames are small
/// (an ack is ~30 bytes, a pong less, one resume ~100). tungstenite grows it for a larger
/// frame, up to [`MAX_CLIENT_FRAME`]. Measured with `gapless-bench idle --connections
/// 10000`: an idle connection costs 10.4 KiB of edge RSS with a 4 KiB buffer, 7.4 KiB with
/// 1 KiB; see BENCHMARKS.md for 256 bytes.
const READ_BUFFER: usize = 256;
/// Bytes a connection's WebSocket layer may hold unsent before writes wait.
const MAX_WRITE_BUFFER: usize = 256 << 10;

/// `GET /v1/ws`: authenticates, then upgrades. Nothing of any stream is sent to a client
/// that is not authenticated.
pub async fn upgrade(
    State((state, sessions)): State<AppState>,
    admission: Option<Extension<Admission>>,
    headers: HeaderMap,
    query: Result<Query<Credentials>, QueryRejection>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let credentials = query.ok().map(|Query(q)| q);
    let authed = match authenticate(&state, admission, &headers, credentials, Admit::CONNECTION) {
        Ok(a) => a,
        Err(refused) => return refused.into_response(),
    };
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
    let ws = ws
        .protocols([SUBPROTOCOL_JSON, SUBPROTOCOL_POSTCARD])
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_write_buffer_size(MAX_WRITE_BUFFER)
        .max_message_size(MAX_CLIENT_FRAME)
        .max_frame_size(MAX_CLIENT_FRAME);
    let codec = Codec::from_subprotocol(ws.selected_protocol().and_then(|p| p.to_str().ok()));
    ws.on_upgrade(move |socket| {
        // The socket is split and the writer started here, not inside the session's future:
        // a value an async fn takes stays in its future for as long as the future lives, so
        // the session would carry the 368-byte socket (and the sink) through its whole life,
        // per idle connection.
        let (sink, stream) = socket.split();
        let (conn, tx, rx) = delivery::open(&state, authed.user, authed.device, Kind::WebSocket);
        tokio::spawn(write_loop(
            sink,
            rx,
            conn.clone(),
            codec,
            state.config.slow_consumer,
        ));
        let places = authed.places;
        let assigned = authed.assigned;
        sessions.track_future(async move {
            let _places = places;
            run(state, stream, conn, tx, assigned, codec).await;
        })
    })
}

/// Runs one upgraded connection's session to its end.
async fn run(
    state: Arc<EdgeState>,
    stream: SplitStream<WebSocket>,
    conn: Arc<Conn>,
    tx: mpsc::Sender<Out>,
    assigned: bool,
    codec: Codec,
) {
    let mut inbound = Frames {
        conn: conn.clone(),
        stream,
        codec,
    };
    let end = match handshake(&state, &conn, &tx, &mut inbound).await {
        Ok((position, resume)) => {
            delivery::deliver(&state, &conn, &tx, &mut inbound, position, resume, assigned).await
        }
        Err(end) => end,
    };
    delivery::finish(&state, &conn, tx, &end).await;
}

/// Sends `welcome`, waits for `resume` (nothing is delivered before the client says where it
/// stands), then reads the position delivery starts from.
async fn handshake(
    state: &EdgeState,
    conn: &Arc<Conn>,
    tx: &mpsc::Sender<Out>,
    inbound: &mut Frames,
) -> Result<(crate::reader::Page, Resume), End> {
    let config = &state.config;
    let welcome = ServerMessage::Welcome {
        user: conn.user.as_str().to_owned(),
        device: conn.device.clone(),
        edge: config.edge_id.clone(),
        heartbeat_ms: config.heartbeat.as_millis() as u64,
    };
    if tx.send(Out::message(welcome)).await.is_err() {
        return Err(End::WriterGone);
    }
    let resume = match tokio::time::timeout(config.resume_timeout, inbound.next()).await {
        Err(_) => {
            return Err(End::Violation(Violation::new(
                close::POLICY,
                "no resume within the resume timeout",
            )));
        }
        Ok(Err(end)) => return Err(end),
        Ok(Ok(ClientMessage::Resume { epoch, after })) => Resume { epoch, after },
        Ok(Ok(_)) => {
            return Err(End::Violation(Violation::new(
                close::POLICY,
                "the first message must be resume",
            )));
        }
    };
    // While Redis is unavailable the position read waits; a client that leaves meanwhile
    // ends the session (it would otherwise hold its connection slot until Redis answers).
    let position = tokio::select! {
        position = delivery::read_position(state, conn) => position?,
        end = until_gone(inbound) => return Err(end),
    };
    Ok((position, resume))
}

/// Reads the client's frames until it leaves or breaks the protocol. Before delivery starts
/// nothing new can be acked: an ack now can only repeat what the resume already said (a
/// client flushing the previous connection's last ack), so it changes nothing.
async fn until_gone(inbound: &mut Frames) -> End {
    loop {
        match inbound.next().await {
            Ok(ClientMessage::Pong | ClientMessage::Ack { .. }) => {}
            Ok(ClientMessage::Resume { .. }) => {
                return End::Violation(Violation::new(
                    close::POLICY,
                    "resume may be sent once, right after welcome",
                ));
            }
            Err(end) => return end,
        }
    }
}

/// The client's frames: acks, pongs and the one resume.
struct Frames {
    /// Touched on every frame, for the heartbeat.
    conn: Arc<Conn>,
    /// The socket's read half.
    stream: SplitStream<WebSocket>,
    /// The subprotocol's codec.
    codec: Codec,
}

impl Inbound for Frames {
    /// The next protocol message, skipping control frames. Cancel-safe: a frame is taken from
    /// the stream only when it is returned.
    async fn next(&mut self) -> Result<ClientMessage, End> {
        loop {
            let msg = match self.stream.next().await {
                Some(Ok(msg)) => msg,
                Some(Err(e)) => return Err(read_failed(e)),
                None => return Err(End::ClientGone),
            };
            self.conn.touch();
            match self.codec.decode(&msg) {
                Ok(Some(m)) => return Ok(m),
                Ok(None) if matches!(msg, Message::Close(_)) => return Err(End::ClientGone),
                Ok(None) => {}
                Err(v) => return Err(End::Violation(v)),
            }
        }
    }
}

/// Why reading the socket failed: a frame over the size limit is the client's fault and
/// closes with 1009 and a reason; anything else is a socket that is gone.
fn read_failed(error: axum::Error) -> End {
    match error.into_inner().downcast_ref::<tungstenite::Error>() {
        Some(tungstenite::Error::Capacity(_)) => End::Violation(Violation::new(
            close::TOO_BIG,
            format!("frame larger than {MAX_CLIENT_FRAME} bytes; clients send acks and pongs"),
        )),
        _ => End::ClientGone,
    }
}

/// Owns the socket's sink: writes queued items as frames, batching what is queued into one
/// flush. Every write must make progress within `slow`; a socket that accepts nothing for
/// that long belongs to a client that does not read, and the connection is closed (1013).
async fn write_loop(
    mut sink: SplitSink<WebSocket, Message>,
    mut rx: mpsc::Receiver<Out>,
    conn: Arc<Conn>,
    codec: Codec,
    slow: Duration,
) {
    'outer: while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(item) = next.take() {
            let (msg, closing) = match item {
                Out::Message(m) => (codec.encode(&m), false),
                Out::Close(c) => (frame::close_frame(c.code, &c.reason), true),
            };
            match tokio::time::timeout(slow, sink.feed(msg)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    conn.request_close(CloseReason::WriteFailed);
                    break 'outer;
                }
                Err(_) => {
                    conn.request_close(CloseReason::SlowConsumer);
                    break 'outer;
                }
            }
            if closing {
                let _ = tokio::time::timeout(slow, sink.flush()).await;
                break 'outer;
            }
            next = rx.try_recv().ok();
        }
        match tokio::time::timeout(slow, sink.flush()).await {
            Ok(Ok(())) => conn.mark_sent(),
            Ok(Err(_)) => {
                conn.request_close(CloseReason::WriteFailed);
                break;
            }
            Err(_) => {
                conn.request_close(CloseReason::SlowConsumer);
                break;
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_millis(100), sink.close()).await;
}
