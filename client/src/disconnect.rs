//! Why a connection ended or could not be opened: what [`crate::Event::Disconnected`]
//! carries.

/// Why a connection ended or could not be opened ([`Event::Disconnected`]). The client
/// reconnects by itself after each, except that an application seeing
/// [`Disconnect::Closed`] with code 4001 (replaced by a newer connection of the same
/// device) or a [`Disconnect::Refused`] 401/403 should stop it or mint a new token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Disconnect {
    /// The edge ended the connection with a close code (`gapless_shared::protocol::close`):
    /// a WebSocket close frame, an SSE `close` or `reconnect` (as 1012) event.
    #[error("closed by the edge: {code} {reason}")]
    Closed {
        /// The close code.
        code: u16,
        /// Its reason.
        reason: String,
    },
    /// The edge refused to open it: the HTTP status of the handshake or request, with the
    /// JSON error body's `code` and `message` when it sent one (`token expired`, `draining`).
    #[error("refused: {status}{}", refusal_detail(.code.as_deref(), .message))]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The error body's `code`.
        code: Option<String>,
        /// The error body's `message`, or the first line of a body that is not JSON.
        message: String,
    },
    /// The connection could not be made, failed, or the edge went silent past the
    /// heartbeat deadline.
    #[error("connection lost: {0}")]
    Lost(String),
    /// The edge sent something the protocol does not allow.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The edge skipped a seq; the client resumes from the last one it delivered.
    #[error("gap: expected seq {expected}, got {got}")]
    Gap {
        /// The seq that should have come.
        expected: u64,
        /// The seq that came.
        got: u64,
    },
    /// A notification of a new epoch came without a reset first; the client resumes.
    #[error("epoch changed to {epoch} without a reset")]
    EpochWithoutReset {
        /// The new epoch.
        epoch: String,
    },
    /// The configuration cannot work: no URL, a bad URL, a token that is not a header value.
    #[error("configuration: {0}")]
    Config(String),
}

/// `: <code>: <message>`, `: <message>` or nothing.
fn refusal_detail(code: Option<&str>, message: &str) -> String {
    match (code, message) {
        (Some(code), message) => format!(": {code}: {message}"),
        (None, "") => String::new(),
        (None, message) => format!(": {message}"),
    }
}
