//! How a client reaches its edge and behaves: the transport, the URLs and token, the
//! timings.

use std::time::Duration;

use gapless_shared::protocol::Codec;

/// How a client reaches its edge (DESIGN.md §5, §5.1). The configured URLs are WebSocket
/// URLs (`ws://host:port/v1/ws`) whatever the transport: the HTTP transports swap the scheme
/// (`ws` -> `http`, `wss` -> `https`) and the path (`/v1/ws` -> `/v1/sse` or `/v1/poll`; a
/// bare base URL gets the path appended).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Transport {
    /// `GET /v1/ws`: frames both ways (the default).
    #[default]
    WebSocket,
    /// `GET /v1/sse`: a Server-Sent Events stream; acks are `POST /v1/ack`.
    Sse,
    /// `GET /v1/poll`: a loop of long polls; each poll's position acknowledges.
    Poll,
}

impl Transport {
    /// Every transport.
    pub const ALL: [Transport; 3] = [Transport::WebSocket, Transport::Sse, Transport::Poll];

    /// `websocket`, `sse` or `poll` (as presence names them).
    pub fn name(self) -> &'static str {
        match self {
            Transport::WebSocket => "websocket",
            Transport::Sse => "sse",
            Transport::Poll => "poll",
        }
    }
}

/// How a client connects and behaves.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Edge URLs (`ws://host:port/v1/ws`, whatever the transport); each (re)connect picks
    /// one at random.
    pub urls: Vec<String>,
    /// The device token (JWT), sent as `Authorization: Bearer`.
    pub token: String,
    /// The transport.
    pub transport: Transport,
    /// Wire encoding of the WebSocket (SSE and poll are JSON).
    pub codec: Codec,
    /// First reconnect delay bound; doubles per failed attempt up to `backoff_max`, and the
    /// actual delay is uniform in [0, bound] (full jitter).
    pub backoff_min: Duration,
    /// Largest reconnect delay bound.
    pub backoff_max: Duration,
    /// Silence tolerated past the server's heartbeat interval before reconnecting.
    pub heartbeat_grace: Duration,
    /// Time to establish a connection and get `welcome`.
    pub connect_timeout: Duration,
    /// Local address to connect from (`None`: the system picks). Port 0 lets the system
    /// pick the port; a fixed port is bound with `SO_REUSEADDR`, so reconnects can reuse it.
    /// Load generators spread over many loopback addresses and ports this way: the kernel's
    /// own search for a free port to bind gets slow when thousands are taken.
    ///
    /// SSE and poll use the address only, never the port (their HTTP client binds port 0),
    /// and share one HTTP client, with its connection pool, per address.
    pub local_addr: Option<std::net::SocketAddr>,
}

impl ClientConfig {
    /// A JSON WebSocket client of `urls` with defaults: backoff 100 ms..10 s, heartbeat grace
    /// 10 s.
    pub fn new(urls: Vec<String>, token: String) -> Self {
        Self {
            urls,
            token,
            transport: Transport::WebSocket,
            codec: Codec::Json,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            heartbeat_grace: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            local_addr: None,
        }
    }
}
