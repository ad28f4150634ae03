//! `gapless.v1.postcard` server frames, as a client reads them from the edge.
//!
//! Property: a frame that decodes re-encodes (`to_postcard`) to bytes that decode to an equal
//! message, whose encoding is the same bytes again; a decoded notification's payload is JSON.
#![no_main]

use gapless_shared::protocol::ServerMessage;
use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;

fuzz_target!(|data: &[u8]| {
    let Ok(first) = ServerMessage::from_postcard(data) else {
        return;
    };
    if let ServerMessage::Notification(n) = &first {
        assert!(
            serde_json::from_str::<&RawValue>(n.payload.get()).is_ok(),
            "decoded a notification whose payload is not JSON: {:?}",
            n.payload.get()
        );
    }
    let bytes = first.to_postcard();
    let second = ServerMessage::from_postcard(&bytes)
        .unwrap_or_else(|e| panic!("re-encoding of {first:?} ({bytes:02x?}) does not decode: {e}"));
    assert_eq!(first, second, "postcard round trip changed the message");
    assert_eq!(bytes, second.to_postcard(), "re-encoding is not stable");
});
