//! `gapless.v1.json` server frames, as a client (gapless-client, the CLI, the bench) reads
//! them from the edge.
//!
//! Property: a frame that decodes re-encodes (`to_json`) to a frame that decodes to an equal
//! message whose encoding is the same text (encode ∘ decode is stable after one step).
#![no_main]

use gapless_shared::protocol::{ServerMessage, from_json, to_json};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(first) = from_json::<ServerMessage>(text) else {
        return;
    };
    let json = to_json(&first);
    let second = from_json::<ServerMessage>(&json)
        .unwrap_or_else(|e| panic!("re-encoded {first:?} as {json} which does not decode: {e}"));
    assert_eq!(
        first, second,
        "JSON round trip changed the message ({json})"
    );
    assert_eq!(json, to_json(&second), "re-encoding is not stable");
});
