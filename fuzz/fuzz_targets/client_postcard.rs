//! `gapless.v1.postcard` client frames (binary WebSocket frames), as the edge reads them.
//!
//! Property: a frame that decodes re-encodes (`to_postcard`) to bytes that decode to the same
//! message, and also survive the JSON codec; the edge's frame decoder (`Codec::Postcard`)
//! agrees with `from_postcard` and keeps its close reason within a control frame.
#![no_main]

use axum::extract::ws::Message;
use gapless_edge::frame::{Codec, FrameCodec};
use gapless_shared::protocol::{ClientMessage, from_json, to_json};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let decoded = ClientMessage::from_postcard(data);
    let framed = Codec::Postcard.decode(&Message::Binary(data.to_vec().into()));
    match (&decoded, &framed) {
        (Ok(m), Ok(Some(f))) => assert_eq!(m, f, "frame decoder disagrees with from_postcard"),
        (Err(_), Err(v)) => assert!(v.reason.len() <= 123, "close reason too long: {v:?}"),
        _ => panic!("from_postcard gave {decoded:?} but the frame decoder {framed:?}"),
    }
    let Ok(first) = decoded else {
        return;
    };
    let bytes = first.to_postcard();
    let second = ClientMessage::from_postcard(&bytes)
        .unwrap_or_else(|e| panic!("re-encoding of {first:?} ({bytes:02x?}) does not decode: {e}"));
    assert_eq!(first, second, "postcard round trip changed the message");
    assert_eq!(bytes, second.to_postcard(), "re-encoding is not stable");
    let json = to_json(&first);
    let third = from_json::<ClientMessage>(&json)
        .unwrap_or_else(|e| panic!("JSON of {first:?} ({json}) does not decode: {e}"));
    assert_eq!(first, third, "JSON round trip changed the message");
});
