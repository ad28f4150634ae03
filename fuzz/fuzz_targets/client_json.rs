//! `gapless.v1.json` client frames, as the edge reads them from a WebSocket.
//!
//! Property: a frame that decodes re-encodes (`to_json`) to a frame that decodes to the same
//! message, also through the postcard codec; the edge's frame decoder (`Codec::Json`) agrees
//! with `from_json` and keeps its close reason within a control frame.
#![no_main]

use axum::extract::ws::Message;
use gapless_edge::frame::{Codec, FrameCodec};
use gapless_shared::protocol::{ClientMessage, from_json, to_json};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let decoded = from_json::<ClientMessage>(text);
    let framed = Codec::Json.decode(&Message::Text(text.into()));
    match (&decoded, &framed) {
        (Ok(m), Ok(Some(f))) => assert_eq!(m, f, "frame decoder disagrees with from_json"),
        (Err(_), Err(v)) => assert!(v.reason.len() <= 123, "close reason too long: {v:?}"),
        _ => panic!("from_json gave {decoded:?} but the frame decoder {framed:?}"),
    }
    let Ok(first) = decoded else {
        return;
    };
    let json = to_json(&first);
    let second = from_json::<ClientMessage>(&json)
        .unwrap_or_else(|e| panic!("re-encoded {first:?} as {json} which does not decode: {e}"));
    assert_eq!(
        first, second,
        "JSON round trip changed the message ({json})"
    );
    let bytes = first.to_postcard();
    let third = ClientMessage::from_postcard(&bytes)
        .unwrap_or_else(|e| panic!("postcard of {first:?} does not decode: {e}"));
    assert_eq!(first, third, "postcard round trip changed the message");
});
