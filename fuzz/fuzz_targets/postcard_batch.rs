//! `application/x-postcard` batch bodies, as the ingest reads them from producers.
//!
//! Property: a body that decodes re-encodes (`encode`) to bytes that decode to the same batch,
//! whose encoding is the same bytes again.
#![no_main]

use gapless_shared::batch::PostcardBatch;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(first) = PostcardBatch::decode(data) else {
        return;
    };
    let bytes = first.encode();
    let second = PostcardBatch::decode(&bytes)
        .unwrap_or_else(|e| panic!("re-encoding of {first:?} ({bytes:02x?}) does not decode: {e}"));
    assert_eq!(first, second, "round trip changed the batch");
    assert_eq!(bytes, second.encode(), "re-encoding is not stable");
});
