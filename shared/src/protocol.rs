//! The edge WebSocket protocol (DESIGN.md §5): the messages and their two codecs.
//!
//! `gapless.v1.json` carries one JSON object per text frame, tagged by `type`.
//! `gapless.v1.postcard` carries the same messages in binary frames, postcard-encoded inside a
//! version envelope ([`ServerWire`], [`ClientWire`]) so a later version can be told apart.
//! Payloads are JSON text in both: the producer's JSON travels untouched.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// WebSocket subprotocol of the JSON encoding (the default).
pub const SUBPROTOCOL_JSON: &str = "gapless.v1.json";
/// WebSocket subprotocol of the postcard encoding.
pub const SUBPROTOCOL_POSTCARD: &str = "gapless.v1.postcard";

/// The encoding a WebSocket connection speaks, chosen by its subprotocol (the HTTP
/// transports speak JSON only). The edge and the Rust client both frame messages with it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Codec {
    /// `gapless.v1.json`: one JSON object per text frame (the default).
    #[default]
    Json,
    /// `gapless.v1.postcard`: binary frames, postcard inside a version envelope.
    Postcard,
}

impl Codec {
    /// The codec of a negotiated subprotocol (JSON when none was).
    pub fn from_subprotocol(protocol: Option<&str>) -> Self {
        match protocol {
            Some(SUBPROTOCOL_POSTCARD) => Codec::Postcard,
            _ => Codec::Json,
        }
    }

    /// Its subprotocol name.
    pub fn subprotocol(self) -> &'static str {
        match self {
            Codec::Json => SUBPROTOCOL_JSON,
            Codec::Postcard => SUBPROTOCOL_POSTCARD,
        }
    }

    /// A server message as this codec's frame.
    pub fn encode_server(self, msg: &ServerMessage) -> Frame {
        match self {
            Codec::Json => Frame::Text(to_json(msg)),
            Codec::Postcard => Frame::Binary(msg.to_postcard()),
        }
    }

    /// A client message as this codec's frame.
    pub fn encode_client(self, msg: &ClientMessage) -> Frame {
        match self {
            Codec::Json => Frame::Text(to_json(msg)),
            Codec::Postcard => Frame::Binary(msg.to_postcard()),
        }
    }
}

/// A WebSocket data frame's content, whichever WebSocket library carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A text frame.
    Text(String),
    /// A binary frame.
    Binary(Vec<u8>),
}

/// WebSocket close codes of the protocol (RFC 6455 §7.4, and one of the application range).
/// The SSE and long-poll transports carry the same codes in their `close` event or answer.
pub mod close {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// Protocol error: a frame that breaks the protocol's rules.
    pub const PROTOCOL: u16 = 1002;
    /// A frame of a type the subprotocol does not use.
    pub const UNSUPPORTED: u16 = 1003;
    /// A frame that cannot be decoded.
    pub const INVALID: u16 = 1007;
    /// Policy violation: unexpected message, no resume in time, silence.
    pub const POLICY: u16 = 1008;
    /// A frame larger than the edge accepts.
    pub const TOO_BIG: u16 = 1009;
    /// Server error.
    pub const INTERNAL: u16 = 1011;
    /// The edge is restarting or draining: reconnect after the delay of its reason
    /// ([`super::DrainHint`]).
    pub const RESTART: u16 = 1012;
    /// Try again later (slow consumer).
    pub const TRY_AGAIN: u16 = 1013;
    /// A newer connection of the same device replaced this one. A client closed with it
    /// should not reconnect on its own: the device is live elsewhere.
    pub const REPLACED: u16 = 4001;
}

/// How long a drained client should wait before it reconnects: the number a draining edge
/// sends with close [`close::RESTART`]. On the WebSocket it is the close reason,
/// `edge draining; reconnect in <ms> ms` (a person reads it in a browser's console; the
/// clients read the number back with [`DrainHint::parse`]); on SSE it is the `delay_ms` of
/// the `reconnect` event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainHint {
    /// Milliseconds to wait.
    pub reconnect_in_ms: u64,
}

impl DrainHint {
    const PREFIX: &'static str = "edge draining; reconnect in ";
    const SUFFIX: &'static str = " ms";

    /// The close reason that carries it.
    pub fn reason(self) -> String {
        format!("{}{}{}", Self::PREFIX, self.reconnect_in_ms, Self::SUFFIX)
    }

    /// The hint of a close reason, when it is one.
    pub fn parse(reason: &str) -> Option<Self> {
        let ms = reason
            .strip_prefix(Self::PREFIX)?
            .strip_suffix(Self::SUFFIX)?
            .parse()
            .ok()?;
        Some(Self {
            reconnect_in_ms: ms,
        })
    }
}

/// A message from a client to its edge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientMessage {
    /// Where to resume: the last processed position, both parts optional (DESIGN.md §1.5).
    Resume {
        /// Epoch of the log the client last read.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        epoch: Option<String>,
        /// Last seq the client processed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<u64>,
    },
    /// Cumulative acknowledgement: everything up to and including `seq` is done.
    Ack {
        /// Highest processed seq.
        seq: u64,
    },
    /// Answer to a server `ping`.
    Pong,
}

/// Why the edge cannot serve the exact gap a client asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResetReason {
    /// Entries after the client's position were trimmed by retention.
    GapTrimmed,
    /// The log was lost or expired and started again under a new epoch.
    EpochChanged,
}

/// A notification as delivered to a device.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Notification {
    /// Per-user sequence number, contiguous within an epoch.
    pub seq: u64,
    /// Epoch of the user's log.
    pub epoch: String,
    /// Ingest time, milliseconds since the Unix epoch.
    pub ts: u64,
    /// The producer's JSON, untouched.
    pub payload: Box<RawValue>,
}

impl PartialEq for Notification {
    fn eq(&self, other: &Self) -> bool {
        self.seq == other.seq
            && self.epoch == other.epoch
            && self.ts == other.ts
            && self.payload.get() == other.payload.get()
    }
}

/// A message from an edge to a client.
///
/// Decoding goes through [`FlatServerMessage`]: serde buffers internally tagged enums, and a
/// buffered [`RawValue`] cannot be recovered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    tag = "type",
    rename_all = "snake_case",
    try_from = "FlatServerMessage"
)]
pub enum ServerMessage {
    /// First frame of every connection.
    Welcome {
        /// The authenticated user.
        user: String,
        /// The device id (from the token, the query, or freshly made).
        device: String,
        /// The edge serving this connection.
        edge: String,
        /// Interval of server pings.
        heartbeat_ms: u64,
    },
    /// One notification.
    Notification(Notification),
    /// The requested gap cannot be served exactly; delivery goes on from `first_seq`.
    Reset {
        /// The current epoch.
        epoch: String,
        /// The first seq the edge can serve.
        first_seq: u64,
        /// Why.
        reason: ResetReason,
    },
    /// Heartbeat; answer with `pong`.
    Ping,
}

/// The JSON shape of every server message at once, as decoded before it is checked.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[doc(hidden)]
pub struct FlatServerMessage {
    #[serde(rename = "type")]
    kind: String,
    user: Option<String>,
    device: Option<String>,
    edge: Option<String>,
    heartbeat_ms: Option<u64>,
    seq: Option<u64>,
    epoch: Option<String>,
    ts: Option<u64>,
    payload: Option<Box<RawValue>>,
    first_seq: Option<u64>,
    reason: Option<ResetReason>,
}

impl TryFrom<FlatServerMessage> for ServerMessage {
    type Error = String;

    fn try_from(m: FlatServerMessage) -> Result<Self, String> {
        fn need<T>(field: Option<T>, name: &str) -> Result<T, String> {
            field.ok_or_else(|| format!("missing field `{name}`"))
        }
        Ok(match m.kind.as_str() {
            "welcome" => ServerMessage::Welcome {
                user: need(m.user, "user")?,
                device: need(m.device, "device")?,
                edge: need(m.edge, "edge")?,
                heartbeat_ms: need(m.heartbeat_ms, "heartbeat_ms")?,
            },
            "notification" => ServerMessage::Notification(Notification {
                seq: need(m.seq, "seq")?,
                epoch: need(m.epoch, "epoch")?,
                ts: need(m.ts, "ts")?,
                payload: need(m.payload, "payload")?,
            }),
            "reset" => ServerMessage::Reset {
                epoch: need(m.epoch, "epoch")?,
                first_seq: need(m.first_seq, "first_seq")?,
                reason: need(m.reason, "reason")?,
            },
            "ping" => ServerMessage::Ping,
            other => return Err(format!("unknown message type `{other}`")),
        })
    }
}

/// Why a frame could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Not valid JSON, or not one of the messages.
    #[error("invalid JSON message: {0}")]
    Json(#[from] serde_json::Error),
    /// Not a valid postcard frame.
    #[error("invalid postcard message: {0}")]
    Postcard(#[from] PostcardError),
    /// A postcard notification whose payload is not JSON text.
    #[error("notification payload is not JSON: {0}")]
    Payload(serde_json::Error),
}

/// A postcard message that does not decode.
#[derive(Debug, thiserror::Error)]
pub enum PostcardError {
    /// The bytes are not the message.
    #[error(transparent)]
    Decode(#[from] postcard::Error),
    /// The message decoded but bytes follow it: a frame is exactly one message.
    #[error("{0} bytes after the end of the message")]
    Trailing(usize),
}

/// Decodes exactly one postcard message from `bytes`: unlike `postcard::from_bytes`, bytes
/// left after the message are an error, so a frame cannot smuggle a second message or
/// padding. (postcard still reads a varint written in more bytes than needed: a message has
/// one canonical encoding, `to_postcard`, but not only one accepted one.)
pub fn postcard_whole<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, PostcardError> {
    let (value, rest) = postcard::take_from_bytes(bytes)?;
    if rest.is_empty() {
        Ok(value)
    } else {
        Err(PostcardError::Trailing(rest.len()))
    }
}

/// Encodes a message as a JSON text frame.
pub fn to_json<T: Serialize>(msg: &T) -> String {
    serde_json::to_string(msg).expect("protocol messages always serialize to JSON")
}

/// Decodes a JSON text frame.
pub fn from_json<'a, T: Deserialize<'a>>(text: &'a str) -> Result<T, DecodeError> {
    Ok(serde_json::from_str(text)?)
}

/// Postcard envelope of client messages; variants are appended, never reordered.
#[derive(Debug, Serialize, Deserialize)]
pub enum ClientWire {
    /// Version 1.
    V1(ClientV1),
}

/// Version 1 of the client messages on the postcard wire.
#[derive(Debug, Serialize, Deserialize)]
pub enum ClientV1 {
    /// See [`ClientMessage::Resume`].
    Resume {
        /// Epoch.
        epoch: Option<String>,
        /// Last processed seq.
        after: Option<u64>,
    },
    /// See [`ClientMessage::Ack`].
    Ack {
        /// Highest processed seq.
        seq: u64,
    },
    /// See [`ClientMessage::Pong`].
    Pong,
}

/// Postcard envelope of server messages; variants are appended, never reordered.
#[derive(Debug, Serialize, Deserialize)]
pub enum ServerWire {
    /// Version 1.
    V1(ServerV1),
}

/// Version 1 of the server messages on the postcard wire.
#[derive(Debug, Serialize, Deserialize)]
pub enum ServerV1 {
    /// See [`ServerMessage::Welcome`].
    Welcome {
        /// User.
        user: String,
        /// Device.
        device: String,
        /// Edge.
        edge: String,
        /// Heartbeat interval.
        heartbeat_ms: u64,
    },
    /// See [`ServerMessage::Notification`]; `payload` is JSON text.
    Notification {
        /// Seq.
        seq: u64,
        /// Epoch.
        epoch: String,
        /// Ingest time (ms).
        ts: u64,
        /// JSON text.
        payload: String,
    },
    /// See [`ServerMessage::Reset`].
    Reset {
        /// Epoch.
        epoch: String,
        /// First servable seq.
        first_seq: u64,
        /// Reason.
        reason: ResetReason,
    },
    /// See [`ServerMessage::Ping`].
    Ping,
}

impl ClientMessage {
    /// Encodes as a postcard binary frame.
    pub fn to_postcard(&self) -> Vec<u8> {
        let v1 = match self.clone() {
            ClientMessage::Resume { epoch, after } => ClientV1::Resume { epoch, after },
            ClientMessage::Ack { seq } => ClientV1::Ack { seq },
            ClientMessage::Pong => ClientV1::Pong,
        };
        postcard::to_stdvec(&ClientWire::V1(v1)).expect("postcard encoding into a Vec cannot fail")
    }

    /// Decodes a postcard binary frame.
    pub fn from_postcard(bytes: &[u8]) -> Result<Self, DecodeError> {
        let ClientWire::V1(v1) = postcard_whole(bytes)?;
        Ok(match v1 {
            ClientV1::Resume { epoch, after } => ClientMessage::Resume { epoch, after },
            ClientV1::Ack { seq } => ClientMessage::Ack { seq },
            ClientV1::Pong => ClientMessage::Pong,
        })
    }
}

impl ServerMessage {
    /// Encodes as a postcard binary frame.
    pub fn to_postcard(&self) -> Vec<u8> {
        let v1 = match self {
            ServerMessage::Welcome {
                user,
                device,
                edge,
                heartbeat_ms,
            } => ServerV1::Welcome {
                user: user.clone(),
                device: device.clone(),
                edge: edge.clone(),
                heartbeat_ms: *heartbeat_ms,
            },
            ServerMessage::Notification(n) => ServerV1::Notification {
                seq: n.seq,
                epoch: n.epoch.clone(),
                ts: n.ts,
                payload: n.payload.get().to_owned(),
            },
            ServerMessage::Reset {
                epoch,
                first_seq,
                reason,
            } => ServerV1::Reset {
                epoch: epoch.clone(),
                first_seq: *first_seq,
                reason: *reason,
            },
            ServerMessage::Ping => ServerV1::Ping,
        };
        postcard::to_stdvec(&ServerWire::V1(v1)).expect("postcard encoding into a Vec cannot fail")
    }

    /// Decodes a postcard binary frame.
    pub fn from_postcard(bytes: &[u8]) -> Result<Self, DecodeError> {
        let ServerWire::V1(v1) = postcard_whole(bytes)?;
        Ok(match v1 {
            ServerV1::Welcome {
                user,
                device,
                edge,
                heartbeat_ms,
            } => ServerMessage::Welcome {
                user,
                device,
                edge,
                heartbeat_ms,
            },
            ServerV1::Notification {
                seq,
                epoch,
                ts,
                payload,
            } => ServerMessage::Notification(Notification {
                seq,
                epoch,
                ts,
                payload: RawValue::from_string(payload).map_err(DecodeError::Payload)?,
            }),
            ServerV1::Reset {
                epoch,
                first_seq,
                reason,
            } => ServerMessage::Reset {
                epoch,
                first_seq,
                reason,
            },
            ServerV1::Ping => ServerMessage::Ping,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_messages() -> Vec<ServerMessage> {
        vec![
            ServerMessage::Welcome {
                user: "alice".into(),
                device: "phone".into(),
                edge: "edge-1".into(),
                heartbeat_ms: 30_000,
            },
            ServerMessage::Notification(Notification {
                seq: 17,
                epoch: "9f2c".into(),
                ts: 1_764_250_000_000,
                payload: RawValue::from_string(r#"{"title":"hi","n":[1,2]}"#.into())
                    .expect("valid JSON"),
            }),
            ServerMessage::Reset {
                epoch: "9f2c".into(),
                first_seq: 120,
                reason: ResetReason::GapTrimmed,
            },
            ServerMessage::Reset {
                epoch: "9f2d".into(),
                first_seq: 1,
                reason: ResetReason::EpochChanged,
            },
            ServerMessage::Ping,
        ]
    }

    fn client_messages() -> Vec<ClientMessage> {
        vec![
            ClientMessage::Resume {
                epoch: Some("9f2c".into()),
                after: Some(16),
            },
            ClientMessage::Resume {
                epoch: None,
                after: None,
            },
            ClientMessage::Ack { seq: 17 },
            ClientMessage::Pong,
        ]
    }

    #[test]
    fn server_messages_round_trip_in_both_codecs() {
        for msg in server_messages() {
            let json = to_json(&msg);
            assert_eq!(from_json::<ServerMessage>(&json).expect("json"), msg);
            let bytes = msg.to_postcard();
            assert_eq!(ServerMessage::from_postcard(&bytes).expect("postcard"), msg);
        }
    }

    #[test]
    fn client_messages_round_trip_in_both_codecs() {
        for msg in client_messages() {
            let json = to_json(&msg);
            assert_eq!(from_json::<ClientMessage>(&json).expect("json"), msg);
            let bytes = msg.to_postcard();
            assert_eq!(ClientMessage::from_postcard(&bytes).expect("postcard"), msg);
        }
    }

    #[test]
    fn json_matches_the_documented_shapes() {
        assert_eq!(
            to_json(&ClientMessage::Resume {
                epoch: Some("e".into()),
                after: Some(16)
            }),
            r#"{"type":"resume","epoch":"e","after":16}"#
        );
        assert_eq!(
            to_json(&ServerMessage::Notification(Notification {
                seq: 17,
                epoch: "e".into(),
                ts: 5,
                payload: RawValue::from_string("[1, 2]".into()).expect("valid JSON"),
            })),
            r#"{"type":"notification","seq":17,"epoch":"e","ts":5,"payload":[1, 2]}"#
        );
        assert_eq!(to_json(&ServerMessage::Ping), r#"{"type":"ping"}"#);
        assert_eq!(
            from_json::<ClientMessage>(r#"{"type":"resume"}"#).expect("json"),
            ClientMessage::Resume {
                epoch: None,
                after: None
            }
        );
    }

    #[test]
    fn postcard_frames_with_trailing_bytes_are_refused() {
        for msg in client_messages() {
            let mut bytes = msg.to_postcard();
            bytes.push(0);
            assert!(matches!(
                ClientMessage::from_postcard(&bytes),
                Err(DecodeError::Postcard(PostcardError::Trailing(1)))
            ));
        }
        for msg in server_messages() {
            let mut bytes = msg.to_postcard();
            bytes.extend_from_slice(&[1, 2]);
            assert!(ServerMessage::from_postcard(&bytes).is_err());
        }
    }

    #[test]
    fn malformed_frames_are_errors_not_panics() {
        for bad in [
            "",
            "{",
            r#"{"type":"ack"}"#,
            r#"{"type":"ack","seq":-1}"#,
            r#"{"type":"nope"}"#,
            r#"{"type":"ack","seq":1,"extra":true}"#,
        ] {
            assert!(from_json::<ClientMessage>(bad).is_err(), "{bad}");
        }
        for bad in [&[][..], &[0x01][..], &[0x00, 0x09][..], &[0x00, 0x01][..]] {
            assert!(ClientMessage::from_postcard(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn postcard_frames_start_with_their_version() {
        assert_eq!(ServerMessage::Ping.to_postcard(), vec![0x00, 0x03]);
        assert_eq!(ClientMessage::Pong.to_postcard(), vec![0x00, 0x02]);
    }

    #[test]
    fn a_drain_hint_reads_back_from_its_close_reason_and_nothing_else() {
        let hint = DrainHint {
            reconnect_in_ms: 1234,
        };
        assert_eq!(hint.reason(), "edge draining; reconnect in 1234 ms");
        assert_eq!(DrainHint::parse(&hint.reason()), Some(hint));
        for other in [
            "bye",
            "edge draining; reconnect in x ms",
            "reconnect in 5 ms",
            "",
        ] {
            assert_eq!(DrainHint::parse(other), None, "{other:?}");
        }
    }

    #[test]
    fn codecs_follow_their_subprotocol() {
        for codec in [Codec::Json, Codec::Postcard] {
            assert_eq!(Codec::from_subprotocol(Some(codec.subprotocol())), codec);
        }
        assert_eq!(Codec::from_subprotocol(None), Codec::Json);
        assert_eq!(
            Codec::Json.encode_client(&ClientMessage::Pong),
            Frame::Text(r#"{"type":"pong"}"#.into())
        );
        assert!(matches!(
            Codec::Postcard.encode_server(&ServerMessage::Ping),
            Frame::Binary(_)
        ));
    }
}
