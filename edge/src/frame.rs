//! WebSocket frames of the protocol (DESIGN.md §5): encoding server messages for a
//! connection's subprotocol, decoding client frames, and the close codes for bad ones.

use axum::extract::ws::{CloseFrame, Message};
use gapless_shared::protocol::{self, ClientMessage, ServerMessage};

/// Close code: normal closure.
pub const CLOSE_NORMAL: u16 = 1000;
/// Close code: protocol error (a frame that breaks the protocol's rules).
pub const CLOSE_PROTOCOL: u16 = 1002;
/// Close code: a frame of a type the subprotocol does not use.
pub const CLOSE_UNSUPPORTED: u16 = 1003;
/// Close code: a frame that cannot be decoded.
pub const CLOSE_INVALID: u16 = 1007;
/// Close code: policy violation (unexpected message, no resume in time, silence).
pub const CLOSE_POLICY: u16 = 1008;
/// Close code: a frame larger than the edge accepts.
pub const CLOSE_TOO_BIG: u16 = 1009;
/// Close code: server error.
pub const CLOSE_INTERNAL: u16 = 1011;
/// Close code: the edge is restarting or draining; reconnect.
pub const CLOSE_RESTART: u16 = 1012;
/// Close code: try again later (slow consumer).
pub const CLOSE_TRY_AGAIN: u16 = 1013;
/// Close code (application range): a newer connection of the same device replaced this one.
/// A client closed with it should not reconnect on its own: the device is live elsewhere.
pub const CLOSE_REPLACED: u16 = 4001;

/// The encoding a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// `gapless.v1.json`: text frames.
    Json,
    /// `gapless.v1.postcard`: binary frames.
    Postcard,
}

/// A client frame that ends the connection, with its close code and reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Close code.
    pub code: u16,
    /// Reason sent in the close frame.
    pub reason: String,
}

impl Violation {
    /// A violation with `code` and `reason`.
    pub fn new(code: u16, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
        }
    }
}

impl Codec {
    /// The codec of a negotiated subprotocol (JSON when none was).
    pub fn from_protocol(protocol: Option<&str>) -> Self {
        match protocol {
            Some(protocol::SUBPROTOCOL_POSTCARD) => Codec::Postcard,
            _ => Codec::Json,
        }
    }

    /// Encodes a server message as a frame.
    pub fn encode(self, msg: &ServerMessage) -> Message {
        match self {
            Codec::Json => Message::Text(protocol::to_json(msg).into()),
            Codec::Postcard => Message::Binary(msg.to_postcard().into()),
        }
    }

    /// Decodes a data frame; `Ok(None)` for control frames (ping/pong/close are handled by
    /// the WebSocket layer).
    pub fn decode(self, msg: &Message) -> Result<Option<ClientMessage>, Violation> {
        match (self, msg) {
            (Codec::Json, Message::Text(text)) => protocol::from_json(text.as_str())
                .map(Some)
                .map_err(|e| Violation::new(CLOSE_INVALID, truncate(&e.to_string()))),
            (Codec::Postcard, Message::Binary(bytes)) => ClientMessage::from_postcard(bytes)
                .map(Some)
                .map_err(|e| Violation::new(CLOSE_INVALID, truncate(&e.to_string()))),
            (Codec::Json, Message::Binary(_)) => Err(Violation::new(
                CLOSE_UNSUPPORTED,
                "binary frames are not part of gapless.v1.json",
            )),
            (Codec::Postcard, Message::Text(_)) => Err(Violation::new(
                CLOSE_UNSUPPORTED,
                "text frames are not part of gapless.v1.postcard",
            )),
            (_, Message::Ping(_) | Message::Pong(_) | Message::Close(_)) => Ok(None),
        }
    }
}

/// A close frame.
pub fn close(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: truncate(reason).into(),
    }))
}

/// Close reasons must fit a control frame (125 bytes, 2 of them the code).
fn truncate(s: &str) -> String {
    let mut end = s.len().min(120);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_of_the_wrong_kind_or_shape_are_violations() {
        let json = Codec::Json;
        assert_eq!(
            json.decode(&Message::Text(r#"{"type":"ack","seq":3}"#.into())),
            Ok(Some(ClientMessage::Ack { seq: 3 }))
        );
        assert_eq!(
            json.decode(&Message::Text("{".into()))
                .expect_err("malformed")
                .code,
            CLOSE_INVALID
        );
        assert_eq!(
            json.decode(&Message::Binary(vec![0, 2].into()))
                .expect_err("binary")
                .code,
            CLOSE_UNSUPPORTED
        );
        let pc = Codec::Postcard;
        assert_eq!(
            pc.decode(&Message::Binary(ClientMessage::Pong.to_postcard().into())),
            Ok(Some(ClientMessage::Pong))
        );
        assert_eq!(
            pc.decode(&Message::Text("x".into()))
                .expect_err("text")
                .code,
            CLOSE_UNSUPPORTED
        );
        assert_eq!(
            pc.decode(&Message::Binary(vec![9].into()))
                .expect_err("bad")
                .code,
            CLOSE_INVALID
        );
    }

    #[test]
    fn close_reasons_fit_a_control_frame() {
        let long = "é".repeat(200);
        let Message::Close(Some(frame)) = close(CLOSE_POLICY, &long) else {
            panic!("a close frame");
        };
        assert!(frame.reason.len() <= 120);
    }
}
