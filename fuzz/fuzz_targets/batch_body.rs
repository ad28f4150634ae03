//! The ingest's request bodies (`gapless_ingest::body`): batch bodies as a JSON array, NDJSON
//! or postcard, and the single append's JSON object, as producers send them.
//!
//! Input: the first byte picks the decoder (0: JSON array, 1: NDJSON, 2: postcard, 3: the
//! single append), the rest is the body; small limits so the fuzzer reaches them.
//! Property: a decoded batch holds at most `batch_items` results; every accepted item has a
//! valid user and idempotency key and a payload of at most `payload_bytes` that parses as
//! JSON and nests at most `payload_depth`; every refusal (of the body or of one item) is a
//! 4xx, never a 5xx. Differentially: the JSON array and the postcard decoders accept exactly
//! the bodies that `serde_json` (`Vec<&RawValue>`) and `PostcardBatch::decode` accept (up to
//! the item limit), with as many results as items; NDJSON gives one result per non-blank
//! line; an accepted single append decodes the same inside a one-item JSON array.
#![no_main]

use gapless_ingest::append::NewNotification;
use gapless_ingest::body::{Format, decode_batch, decode_one};
use gapless_ingest::config::Limits;
use gapless_ingest::error::ApiError;
use gapless_shared::batch::PostcardBatch;
use gapless_shared::ids::validate_idempotency_key;
use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;

fn limits() -> Limits {
    Limits {
        batch_items: 64,
        payload_bytes: 256,
        payload_depth: 8,
        ..Limits::default()
    }
}

/// Nesting of arrays and objects in valid JSON text: a scalar is 0, `[]` is 1. (Not through
/// `serde_json::Value`, which refuses numbers beyond f64 that the payload check accepts.)
fn depth(json: &str) -> usize {
    let (mut depth, mut max) = (0usize, 0usize);
    let mut chars = json.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => {
                            chars.next();
                        }
                        '"' => break,
                        _ => {}
                    }
                }
            }
            '[' | '{' => {
                depth += 1;
                max = max.max(depth);
            }
            ']' | '}' => depth -= 1,
            _ => {}
        }
    }
    assert_eq!(depth, 0, "unbalanced JSON {json:?}");
    max
}

fn check_refusal(e: &ApiError) {
    assert!(
        e.status.is_client_error(),
        "a body was refused with {} ({:?})",
        e.status,
        e.body
    );
}

fn check_item(item: &NewNotification<'_>, l: &Limits) {
    let p = item.payload;
    assert!(
        p.len() <= l.payload_bytes,
        "accepted a {} byte payload",
        p.len()
    );
    assert!(
        serde_json::from_str::<&RawValue>(p).is_ok(),
        "accepted a payload that is not JSON: {p:?}"
    );
    assert!(
        depth(p) <= l.payload_depth,
        "accepted a payload nested too deep: {p:?}"
    );
    if let Some(key) = &item.idempotency_key {
        assert!(
            validate_idempotency_key(key).is_ok(),
            "accepted idempotency key {key:?}"
        );
    }
    assert!(!item.user.as_str().is_empty());
}

fn check_results(results: &[Result<NewNotification<'_>, ApiError>], l: &Limits) {
    assert!(results.len() <= l.batch_items, "{} results", results.len());
    for r in results {
        match r {
            Ok(item) => check_item(item, l),
            Err(e) => check_refusal(e),
        }
    }
}

fn same(a: &NewNotification<'_>, b: &NewNotification<'_>) -> bool {
    a.user == b.user && a.payload == b.payload && a.idempotency_key == b.idempotency_key
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let l = limits();
    let format = match selector % 4 {
        0 => Format::Json,
        1 => Format::Ndjson,
        2 => Format::Postcard,
        _ => {
            let Ok(one) = decode_one(body, &l).inspect_err(check_refusal) else {
                return;
            };
            check_item(&one, &l);
            let text = std::str::from_utf8(body).expect("an accepted body is UTF-8");
            let wrapped = format!("[{text}]");
            let batch = decode_batch(Format::Json, wrapped.as_bytes(), &l)
                .unwrap_or_else(|e| panic!("{wrapped:?} is refused as a batch: {e:?}"));
            assert_eq!(batch.len(), 1);
            let item = batch[0].as_ref().unwrap_or_else(|e| {
                panic!("the single append is accepted, the same item in a batch is not: {e:?}")
            });
            assert!(same(&one, item), "{one:?} vs {item:?}");
            return;
        }
    };
    let decoded = decode_batch(format, body, &l);
    match &decoded {
        Ok(results) => check_results(results, &l),
        Err(e) => check_refusal(e),
    }
    let too_many = |r: &Result<_, ApiError>| matches!(r, Err(e) if e.body.code == "too_many_items");
    match format {
        Format::Json => {
            let reference = std::str::from_utf8(body)
                .ok()
                .and_then(|t| serde_json::from_str::<Vec<&RawValue>>(t).ok());
            match (&reference, &decoded) {
                (Some(items), Ok(results)) => assert_eq!(items.len(), results.len()),
                (Some(items), Err(_)) => assert!(
                    items.len() > l.batch_items && too_many(&decoded),
                    "serde_json reads {} items, decode_batch refuses: {decoded:?}",
                    items.len()
                ),
                (None, Ok(results)) => {
                    panic!(
                        "decode_batch accepts {} items serde_json refuses",
                        results.len()
                    )
                }
                (None, Err(_)) => {}
            }
        }
        Format::Postcard => match (PostcardBatch::decode(body), &decoded) {
            (Ok(PostcardBatch::V1(items)), Ok(results)) => assert_eq!(items.len(), results.len()),
            (Ok(PostcardBatch::V1(items)), Err(_)) => assert!(
                items.len() > l.batch_items && too_many(&decoded),
                "PostcardBatch::decode reads {} items, decode_batch refuses: {decoded:?}",
                items.len()
            ),
            (Err(e), Ok(results)) => panic!(
                "decode_batch accepts {} items PostcardBatch::decode refuses ({e})",
                results.len()
            ),
            (Err(_), Err(_)) => {}
        },
        Format::Ndjson => {
            if let Ok(results) = &decoded {
                let text = std::str::from_utf8(body).expect("an accepted body is UTF-8");
                let lines = text.lines().filter(|l| !l.trim().is_empty()).count();
                assert_eq!(lines, results.len());
            }
        }
    }
});
