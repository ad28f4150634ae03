//! One connection to an edge, over whichever transport the client is configured for
//! (DESIGN.md §5 and §5.1). The state machine in the crate root drives a [`Connection`]
//! through five calls (`open`, `next`, `ack`, `close`, `abort`) and never sees the wire:
//!
//! - [`ws`]: the WebSocket (`/v1/ws`), JSON or postcard frames, pings answered;
//! - [`sse`]: Server-Sent Events (`/v1/sse`) read with [`event_stream`], acks posted to
//!   `/v1/ack`;
//! - [`poll`]: long-polling (`/v1/poll`), a loop of requests whose position acknowledges;
//! - [`http`]: what the two HTTP transports share: endpoint URLs, one HTTP client per local
//!   address, refusals.

mod event_stream;
mod http;
mod poll;
mod sse;
mod ws;

use std::time::Duration;

use gapless_shared::protocol::{Notification, ResetReason};

use crate::config::{ClientConfig, Transport};
use crate::disconnect::Disconnect;

/// What the application-facing client needs from the edge's messages.
pub(crate) enum Incoming {
    /// A notification, as the edge sent it (the state machine drops duplicates).
    Notification(Notification),
    /// The edge cannot serve the exact gap.
    Reset {
        epoch: String,
        first_seq: u64,
        reason: ResetReason,
    },
    /// The edge ended the connection: a WebSocket close frame, or the SSE stream's
    /// `reconnect` (as 1012) or `close` event.
    Closed {
        code: u16,
        reason: String,
        /// The delay the edge asked for before the next attempt (a drain hint, already
        /// jittered by the edge): used once, as is.
        retry_in: Option<Duration>,
    },
}

/// Why a connection could not be opened or went on no longer.
#[derive(Debug)]
pub(crate) struct Failure {
    /// What happened, for [`crate::Event::Disconnected`].
    pub(crate) reason: Disconnect,
    /// The edge's `Retry-After` on a refusal (429, 503): the next attempt waits at least
    /// this long.
    pub(crate) retry_after: Option<Duration>,
}

impl Failure {
    /// The edge broke the protocol.
    pub(crate) fn protocol(what: impl Into<String>) -> Self {
        Disconnect::Protocol(what.into()).into()
    }

    /// The configuration cannot work.
    pub(crate) fn config(what: impl Into<String>) -> Self {
        Disconnect::Config(what.into()).into()
    }
}

impl From<Disconnect> for Failure {
    fn from(reason: Disconnect) -> Self {
        Self {
            reason,
            retry_after: None,
        }
    }
}

/// A lost connection, in words (connect, I/O or timeout failures).
impl From<String> for Failure {
    fn from(reason: String) -> Self {
        Disconnect::Lost(reason).into()
    }
}

impl From<&str> for Failure {
    fn from(reason: &str) -> Self {
        reason.to_owned().into()
    }
}

/// Where the client asks delivery to start (DESIGN.md §1.5), as the WebSocket `resume`
/// carries it; both parts optional.
#[derive(Debug, Clone, Default)]
pub(crate) struct Resume {
    /// Epoch of the last processed notification.
    pub(crate) epoch: Option<String>,
    /// Last processed seq (`Some(0)` without an epoch: the device started before).
    pub(crate) after: Option<u64>,
}

/// One connection, of one transport.
pub(crate) enum Connection {
    /// A WebSocket.
    Ws(Box<ws::WsConnection>),
    /// An SSE stream and its acks.
    Sse(Box<sse::SseConnection>),
    /// A loop of long polls.
    Poll(Box<poll::PollConnection>),
}

impl Connection {
    /// Connects to `url` (a WebSocket URL; the HTTP transports derive their endpoint from it)
    /// and starts delivery at `resume`. Returns the connection and the edge and device the
    /// edge named.
    pub(crate) async fn open(
        config: &ClientConfig,
        url: &str,
        resume: Resume,
    ) -> Result<(Self, String, String), Failure> {
        Ok(match config.transport {
            Transport::WebSocket => {
                let (c, edge, device) = ws::WsConnection::open(config, url, resume).await?;
                (Self::Ws(Box::new(c)), edge, device)
            }
            Transport::Sse => {
                let (c, edge, device) = sse::SseConnection::open(config, url, resume).await?;
                (Self::Sse(Box::new(c)), edge, device)
            }
            Transport::Poll => {
                let (c, edge, device) = poll::PollConnection::open(config, url, resume).await?;
                (Self::Poll(Box::new(c)), edge, device)
            }
        })
    }

    /// The next notification, reset or close, within the heartbeat deadline. Cancel-safe:
    /// a WebSocket reads whole frames, SSE keeps the bytes not yet decoded and the ack in
    /// flight, and a poll dropped mid-way is made again at the same position.
    pub(crate) async fn next(&mut self) -> Result<Incoming, Failure> {
        match self {
            Self::Ws(c) => c.next().await,
            Self::Sse(c) => c.next().await,
            Self::Poll(c) => c.next().await,
        }
    }

    /// Acknowledges everything up to `seq` (cumulative).
    pub(crate) async fn ack(&mut self, seq: u64) -> Result<(), Failure> {
        match self {
            Self::Ws(c) => c.ack(seq).await,
            Self::Sse(c) => {
                c.ack(seq);
                Ok(())
            }
            Self::Poll(c) => {
                c.ack(seq);
                Ok(())
            }
        }
    }

    /// Ends the connection cleanly (WebSocket: a close frame; SSE: the ack in flight is let
    /// land, then the stream is dropped; poll: the held request is dropped).
    pub(crate) async fn close(self) {
        match self {
            Self::Ws(c) => c.close().await,
            Self::Sse(c) => c.close().await,
            Self::Poll(c) => drop(c),
        }
    }

    /// Ends the connection as a crash would: a WebSocket resets its TCP connection (RST);
    /// the HTTP transports drop their request, which closes its TCP connection (reqwest
    /// gives no hold of the socket to reset it).
    pub(crate) fn abort(self) {
        match self {
            Self::Ws(c) => c.abort(),
            Self::Sse(c) => drop(c),
            Self::Poll(c) => drop(c),
        }
    }
}
