//! Wakeups, as an edge reads them from its Redis channel (published by the ingest).
//!
//! Property: a message that decodes re-encodes (`encode`) to bytes that decode to the same
//! message, whose encoding is the same bytes again.
#![no_main]

use gapless_shared::wakeup::Wakeup;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(first) = Wakeup::decode(data) else {
        return;
    };
    let bytes = first.encode();
    let second = Wakeup::decode(&bytes)
        .unwrap_or_else(|e| panic!("re-encoding of {first:?} ({bytes:02x?}) does not decode: {e}"));
    assert_eq!(first, second, "round trip changed the wakeup");
    assert_eq!(bytes, second.encode(), "re-encoding is not stable");
    assert_eq!(first.items(), second.clone().into_items().as_slice());
});
