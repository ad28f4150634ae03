//! WebSocket frames of the protocol (DESIGN.md §5): encoding server messages for a
//! connection's subprotocol, decoding client frames, and the close codes for bad ones.

use axum::extract::ws::{CloseFrame, Message};
pub use gapless_shared::protocol::Codec;
#[cfg(test)]
use gapless_shared::protocol::close;
use gapless_shared::protocol::close::{INVALID, UNSUPPORTED};
use gapless_shared::protocol::{self, ClientMessage, Frame, ServerMessage};

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

/// [`Codec`] over axum's WebSocket frames.
pub trait FrameCodec {
    /// Encodes a server message as a frame.
    fn encode(self, msg: &ServerMessage) -> Message;

    /// Decodes a data frame; `Ok(None)` for control frames (ping/pong/close are handled by
    /// the WebSocket layer).
    fn decode(self, msg: &Message) -> Result<Option<ClientMessage>, Violation>;
}

impl FrameCodec for Codec {
    fn encode(self, msg: &ServerMessage) -> Message {
        match self.encode_server(msg) {
            Frame::Text(text) => Message::Text(text.into()),
            Frame::Binary(bytes) => Message::Binary(bytes.into()),
        }
    }

    fn decode(self, msg: &Message) -> Result<Option<ClientMessage>, Violation> {
        match (self, msg) {
            (Codec::Json, Message::Text(text)) => protocol::from_json(text.as_str())
                .map(Some)
                .map_err(|e| Violation::new(INVALID, truncate(&e.to_string()))),
            (Codec::Postcard, Message::Binary(bytes)) => ClientMessage::from_postcard(bytes)
                .map(Some)
                .map_err(|e| Violation::new(INVALID, truncate(&e.to_string()))),
            (Codec::Json, Message::Binary(_)) => Err(Violation::new(
                UNSUPPORTED,
                "binary frames are not part of gapless.v1.json",
            )),
            (Codec::Postcard, Message::Text(_)) => Err(Violation::new(
                UNSUPPORTED,
                "text frames are not part of gapless.v1.postcard",
            )),
            (_, Message::Ping(_) | Message::Pong(_) | Message::Close(_)) => Ok(None),
        }
    }
}

/// A close frame.
pub fn close_frame(code: u16, reason: &str) -> Message {
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
            INVALID
        );
        assert_eq!(
            json.decode(&Message::Binary(vec![0, 2].into()))
                .expect_err("binary")
                .code,
            UNSUPPORTED
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
            UNSUPPORTED
        );
        assert_eq!(
            pc.decode(&Message::Binary(vec![9].into()))
                .expect_err("bad")
                .code,
            INVALID
        );
    }

    #[test]
    fn close_reasons_fit_a_control_frame() {
        let long = "é".repeat(200);
        let Message::Close(Some(frame)) = close_frame(close::POLICY, &long) else {
            panic!("a close frame");
        };
        assert!(frame.reason.len() <= 120);
    }
}
