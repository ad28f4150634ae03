//! The WebSocket transport (DESIGN.md §5): the handshake (`welcome`, `resume`), frames in
//! and out, pings answered, and the heartbeat deadline.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use gapless_shared::protocol::{ClientMessage, Codec, DrainHint, Frame, ServerMessage, close};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::{Failure, Incoming, Resume, http};
use crate::config::ClientConfig;
use crate::disconnect::Disconnect;

/// One WebSocket connection.
pub(crate) struct WsConnection {
    /// The socket.
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Wire encoding.
    codec: Codec,
    /// Silence after which the edge is presumed gone: heartbeat + grace.
    deadline: Duration,
}

impl WsConnection {
    /// Connects, reads `welcome`, sends `resume`. Returns the edge and device of `welcome`.
    pub(crate) async fn open(
        config: &ClientConfig,
        url: &str,
        resume: Resume,
    ) -> Result<(Self, String, String), Failure> {
        let mut request = url
            .into_client_request()
            .map_err(|e| Failure::config(format!("bad URL: {e}")))?;
        let headers = request.headers_mut();
        headers.insert(
            "authorization",
            format!("Bearer {}", config.token)
                .parse()
                .map_err(|_| Failure::config("the token is not a valid header value"))?,
        );
        let protocol = config.codec.subprotocol();
        headers.insert(
            "sec-websocket-protocol",
            protocol
                .parse()
                .expect("a subprotocol name is a valid header"),
        );
        // Small buffers: a device receives small frames, and a load generator holds many.
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(8 << 10)
            .write_buffer_size(0)
            .max_write_buffer_size(64 << 10);
        let connect = async {
            match config.local_addr {
                None => {
                    tokio_tungstenite::connect_async_with_config(request, Some(ws_config), false)
                        .await
                        .map_err(refused)
                }
                Some(local) => {
                    let stream = connect_from(local, &request).await?;
                    tokio_tungstenite::client_async_with_config(request, stream, Some(ws_config))
                        .await
                        .map_err(refused)
                }
            }
        };
        let (ws, _) = tokio::time::timeout(config.connect_timeout, connect)
            .await
            .map_err(|_| Failure::from("connect timed out"))??;
        let mut conn = Self {
            ws,
            codec: config.codec,
            deadline: config.connect_timeout,
        };
        let (edge, device, heartbeat_ms) = match conn.read().await? {
            Read::Message(ServerMessage::Welcome {
                edge,
                device,
                heartbeat_ms,
                ..
            }) => (edge, device, heartbeat_ms),
            Read::Message(other) => {
                return Err(Failure::protocol(format!(
                    "expected welcome, got {other:?}"
                )));
            }
            Read::Closed { code, reason } => {
                return Err(Disconnect::Closed { code, reason }.into());
            }
        };
        conn.deadline = Duration::from_millis(heartbeat_ms) + config.heartbeat_grace;
        conn.send(&ClientMessage::Resume {
            epoch: resume.epoch,
            after: resume.after,
        })
        .await?;
        Ok((conn, edge, device))
    }

    /// Sends a close frame and waits briefly for the edge's.
    pub(crate) async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.ws.close(None)).await;
    }

    /// Drops the socket with SO_LINGER 0, so the kernel sends RST instead of FIN.
    pub(crate) fn abort(self) {
        if let MaybeTlsStream::Plain(tcp) = self.ws.get_ref() {
            // Linger 0 never blocks: the socket is reset at once on drop.
            #[allow(deprecated)]
            let _ = tcp.set_linger(Some(Duration::ZERO));
        }
    }

    /// Sends a cumulative ack.
    pub(crate) async fn ack(&mut self, seq: u64) -> Result<(), Failure> {
        self.send(&ClientMessage::Ack { seq }).await
    }

    async fn send(&mut self, msg: &ClientMessage) -> Result<(), Failure> {
        let frame = match self.codec.encode_client(msg) {
            Frame::Text(text) => Message::Text(text.into()),
            Frame::Binary(bytes) => Message::Binary(bytes.into()),
        };
        self.ws
            .send(frame)
            .await
            .map_err(|e| format!("send failed: {e}").into())
    }

    /// The next server message or the close, within the heartbeat deadline; pings are
    /// answered here.
    async fn read(&mut self) -> Result<Read, Failure> {
        loop {
            let frame = tokio::time::timeout(self.deadline, self.ws.next())
                .await
                .map_err(|_| format!("no frame from the edge for {:?}", self.deadline))?;
            let msg = match frame {
                None => return Err("connection ended".into()),
                Some(Err(e)) => return Err(format!("connection failed: {e}").into()),
                Some(Ok(Message::Text(t))) => {
                    gapless_shared::protocol::from_json::<ServerMessage>(t.as_str())
                        .map_err(|e| Failure::protocol(format!("bad frame: {e}")))?
                }
                Some(Ok(Message::Binary(b))) => ServerMessage::from_postcard(&b)
                    .map_err(|e| Failure::protocol(format!("bad frame: {e}")))?,
                Some(Ok(Message::Close(frame))) => {
                    let (code, reason) = frame
                        .map(|f| (u16::from(f.code), f.reason.to_string()))
                        .unwrap_or((1005, String::new()));
                    return Ok(Read::Closed { code, reason });
                }
                Some(Ok(_)) => continue,
            };
            if msg == ServerMessage::Ping {
                self.send(&ClientMessage::Pong).await?;
                continue;
            }
            return Ok(Read::Message(msg));
        }
    }

    /// The next notification, reset or close.
    pub(crate) async fn next(&mut self) -> Result<Incoming, Failure> {
        match self.read().await? {
            Read::Message(ServerMessage::Notification(n)) => Ok(Incoming::Notification(n)),
            Read::Message(ServerMessage::Reset {
                epoch,
                first_seq,
                reason,
            }) => Ok(Incoming::Reset {
                epoch,
                first_seq,
                reason,
            }),
            Read::Message(other) => Err(Failure::protocol(format!("unexpected {other:?}"))),
            Read::Closed { code, reason } => Ok(Incoming::Closed {
                retry_in: if code == close::RESTART {
                    DrainHint::parse(&reason).map(|h| Duration::from_millis(h.reconnect_in_ms))
                } else {
                    None
                },
                code,
                reason,
            }),
        }
    }
}

/// A plain TCP connection to the request's host, from `local` (port 0: any free port).
async fn connect_from(
    local: std::net::SocketAddr,
    request: &tokio_tungstenite::tungstenite::handshake::client::Request,
) -> Result<MaybeTlsStream<TcpStream>, Failure> {
    let uri = request.uri();
    if uri.scheme_str() == Some("wss") {
        return Err("a local address needs a ws:// URL".into());
    }
    let host = uri.host().ok_or(Failure::config("no host in the URL"))?;
    let port = uri.port_u16().unwrap_or(80);
    let target = tokio::net::lookup_host((host.trim_matches(['[', ']']), port))
        .await
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .find(|a| a.is_ipv4() == local.is_ipv4())
        .ok_or_else(|| format!("no address of {host} in the family of {local}"))?;
    let socket = if local.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(|e| format!("socket: {e}"))?;
    if local.port() != 0 {
        socket
            .set_reuseaddr(true)
            .map_err(|e| format!("SO_REUSEADDR: {e}"))?;
    }
    socket
        .bind(local)
        .map_err(|e| format!("cannot bind {local}: {e}"))?;
    let stream = socket
        .connect(target)
        .await
        .map_err(|e| format!("connect failed: {e}"))?;
    Ok(MaybeTlsStream::Plain(stream))
}

/// A server message, or the close frame.
enum Read {
    Message(ServerMessage),
    Closed { code: u16, reason: String },
}

/// A failed handshake, readable: a refusal's status, the edge's JSON error and its
/// `Retry-After`.
fn refused(e: tokio_tungstenite::tungstenite::Error) -> Failure {
    match e {
        tokio_tungstenite::tungstenite::Error::Http(response) => {
            let body = response.body().as_deref().unwrap_or_default();
            Failure {
                reason: http::refusal_reason(response.status(), body),
                retry_after: http::retry_after(response.headers()),
            }
        }
        other => format!("connect failed: {other}").into(),
    }
}
