//! Request bodies of the append endpoints (DESIGN.md §4), from bytes to items, with every
//! limit enforced while decoding.
//!
//! A body is read into one buffer no larger than its endpoint's byte limit, against a
//! process-wide budget of in-flight body bytes ([`BodyBudget`]); a body that does not fit
//! the budget right now is answered 503 with `Retry-After` rather than waited for (its bytes
//! read and dropped first, so the producer reads the answer). A batch
//! is then decoded as a stream of items: the item limit is checked as each item is reached
//! (a postcard length prefix before any item), so a refused batch costs memory in proportion
//! to the limits, never to the number of items it claims. Items borrow from the body.

use std::borrow::Cow;
use std::cell::Cell;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, header};
use bytes::{Bytes, BytesMut};
use gapless_shared::api::Notification;
use gapless_shared::ids::{UserId, validate_idempotency_key};
use http_body_util::BodyExt;
use serde::Deserialize;
use serde::de::{self, DeserializeSeed, SeqAccess, Visitor};
use serde_json::value::RawValue;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::Limits;
use crate::error::ApiError;
use crate::plan::NewNotification;

/// The encodings of a batch body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `application/json`: a JSON array of items.
    Json,
    /// `application/x-ndjson`: one JSON item per line.
    Ndjson,
    /// `application/x-postcard`: `gapless_shared::batch::PostcardBatch`.
    Postcard,
}

impl Format {
    /// The format a batch request's `Content-Type` names, or 415.
    pub fn of(headers: &HeaderMap) -> Result<Self, ApiError> {
        match media_type(headers).as_deref() {
            Some("application/json") => Ok(Format::Json),
            Some("application/x-ndjson") => Ok(Format::Ndjson),
            Some("application/x-postcard") => Ok(Format::Postcard),
            other => Err(unsupported(
                "application/json, application/x-ndjson or application/x-postcard",
                other,
            )),
        }
    }
}

/// Checks that a single append is `application/json`, or 415.
pub fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    match media_type(headers).as_deref() {
        Some("application/json") => Ok(()),
        other => Err(unsupported("application/json", other)),
    }
}

fn unsupported(expected: &str, got: Option<&str>) -> ApiError {
    ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        format!(
            "expected Content-Type {expected}, got {}",
            got.unwrap_or("none")
        ),
    )
}

/// The media type of a request, lowercased, without parameters.
fn media_type(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    Some(value.split(';').next()?.trim().to_ascii_lowercase())
}

/// The process-wide bound of request body bytes held at once. Cheap to clone.
#[derive(Clone)]
pub struct BodyBudget {
    /// One permit per byte; the permits of a body are held until its request is answered.
    bytes: Arc<Semaphore>,
}

impl BodyBudget {
    /// A budget of `bytes` in all.
    pub fn new(bytes: usize) -> Self {
        Self {
            bytes: Arc::new(Semaphore::new(bytes.min(Semaphore::MAX_PERMITS))),
        }
    }

    /// Bytes of the budget not held by any body now.
    pub fn available(&self) -> usize {
        self.bytes.available_permits()
    }

    /// Takes `n` bytes of the budget now, or answers 503: a full budget is a busy ingest,
    /// and a producer is better told to retry than left waiting with its body half sent.
    fn take(&self, n: usize) -> Result<OwnedSemaphorePermit, ApiError> {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        self.bytes.clone().try_acquire_many_owned(n).map_err(|_| {
            metrics::counter!("gapless_ingest_body_budget_refusals_total").increment(1);
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                "the ingest holds as many request bytes as it may; retry shortly",
            )
        })
    }
}

/// A request body read into memory, with its share of the [`BodyBudget`].
pub struct ReadBody {
    /// The body.
    pub bytes: Bytes,
    /// Held until the body is dropped with the request.
    _budget: Option<OwnedSemaphorePermit>,
}

/// Reads `body` up to `limit` bytes (413 past it) against `budget`. With a `Content-Length`
/// the whole declared size is taken from the budget before a byte is read; without one, each
/// chunk as it arrives. A body that ends early or breaks is 400.
pub async fn read(
    headers: &HeaderMap,
    mut body: Body,
    limit: usize,
    budget: &BodyBudget,
) -> Result<ReadBody, ApiError> {
    let too_large = || {
        ApiError::too_large(
            "body_too_large",
            format!("the request body is larger than {limit} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let declared = declared.map(|n| n as usize);
    let mut held = match declared {
        Some(0) | None => None,
        Some(n) => match budget.take(n) {
            Ok(permit) => Some(permit),
            Err(busy) => return Err(refuse_after_draining(headers, body, limit, busy).await),
        },
    };
    let mut buf = BytesMut::with_capacity(declared.unwrap_or(0));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            ApiError::bad_request("unreadable_body", format!("the body broke off: {e}"))
        })?;
        let Ok(chunk) = frame.into_data() else {
            continue; // trailers
        };
        if buf.len() + chunk.len() > limit {
            return Err(too_large());
        }
        if declared.is_none() {
            let more = match budget.take(chunk.len()) {
                Ok(more) => more,
                Err(busy) => {
                    let rest = limit - buf.len() - chunk.len();
                    drop((buf, held));
                    return Err(refuse_after_draining(headers, body, rest, busy).await);
                }
            };
            match &mut held {
                Some(permit) => permit.merge(more),
                None => held = Some(more),
            }
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(ReadBody {
        bytes: buf.freeze(),
        _budget: held,
    })
}

/// How long a refused body is read and thrown away before its refusal is answered.
const DRAIN_FOR: Duration = Duration::from_secs(2);

/// Answers `refusal` once the rest of `body` (at most `limit` more bytes, for at most
/// [`DRAIN_FOR`]) has been read and dropped, one frame at a time, holding none of the budget.
///
/// Answered without reading, the refusal would be followed by the connection's close while
/// the producer is still writing the body; the kernel then resets the connection and most
/// HTTP clients report a broken pipe instead of the 503 and its `Retry-After`. A producer
/// that sent `Expect: 100-continue` has not sent its body: it is answered at once (hyper
/// sends `100 Continue` only when the body is read).
async fn refuse_after_draining(
    headers: &HeaderMap,
    mut body: Body,
    limit: usize,
    refusal: ApiError,
) -> ApiError {
    let expects_continue = headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if expects_continue {
        return refusal;
    }
    let drain = async {
        let mut read = 0usize;
        while let Some(Ok(frame)) = body.frame().await {
            read += frame.data_ref().map_or(0, Bytes::len);
            if read > limit {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_FOR, drain).await;
    refusal
}

/// One notification of a postcard batch, borrowed from the body: the wire layout of
/// `gapless_shared::batch::PostcardItem`.
#[derive(Deserialize)]
struct PostcardItemIn<'a> {
    user: &'a str,
    payload: &'a str,
    idempotency_key: Option<&'a str>,
}

/// The result of each item of a batch, in order: the item, or why it alone was refused.
pub type Items<'a> = Vec<Result<NewNotification<'a>, ApiError>>;

/// Decodes the body of `POST /v1/notifications`: malformed JSON is 400, the wrong shape 422,
/// a bad part of the item its own status.
pub fn decode_one<'a>(body: &'a [u8], limits: &Limits) -> Result<NewNotification<'a>, ApiError> {
    let text = std::str::from_utf8(body)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("body is not UTF-8: {e}")))?;
    parse_json_item(text, limits)
}

/// Decodes a batch body into one result per item. The whole body is refused (413) as soon as
/// it holds more than `limits.batch_items` items, and (400) when it is not the format at all.
pub fn decode_batch<'a>(
    format: Format,
    body: &'a [u8],
    limits: &Limits,
) -> Result<Items<'a>, ApiError> {
    let too_many = || {
        ApiError::too_large(
            "too_many_items",
            format!(
                "the batch holds more than {} items, the limit",
                limits.batch_items
            ),
        )
    };
    let over = Cell::new(false);
    let mut items = Items::new();
    match format {
        Format::Postcard => {
            let bad = |e: &dyn fmt::Display| {
                ApiError::bad_request("invalid_postcard", format!("not a postcard batch: {e}"))
            };
            // The envelope `PostcardBatch::V1(items)`: the variant index, then the sequence.
            let (version, rest): (u32, &[u8]) =
                postcard::take_from_bytes(body).map_err(|e| bad(&e))?;
            if version != 0 {
                return Err(bad(&format!("unknown batch version {version}")));
            }
            let mut de = postcard::Deserializer::from_bytes(rest);
            let seq = Limited::new(limits.batch_items, &over, |item: PostcardItemIn<'a>| {
                items.push(postcard_item(item, limits));
            });
            let decoded = seq.deserialize(&mut de);
            if over.get() {
                return Err(too_many());
            }
            decoded.map_err(|e| bad(&e))?;
            let rest = de.finalize().map_err(|e| bad(&e))?;
            if !rest.is_empty() {
                return Err(bad(&format!("{} bytes after the last item", rest.len())));
            }
        }
        Format::Json => {
            let text = utf8(body)?;
            let mut de = serde_json::Deserializer::from_str(text);
            let seq = Limited::new(limits.batch_items, &over, |raw: &'a RawValue| {
                items.push(parse_json_item(raw.get(), limits));
            });
            let decoded = seq.deserialize(&mut de).and_then(|_| de.end());
            if over.get() {
                return Err(too_many());
            }
            decoded.map_err(|e| {
                ApiError::bad_request(
                    "invalid_json",
                    format!("expected a JSON array of notifications: {e}"),
                )
            })?;
        }
        Format::Ndjson => {
            let text = utf8(body)?;
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                if items.len() == limits.batch_items {
                    return Err(too_many());
                }
                items.push(parse_json_item(line, limits));
            }
        }
    }
    Ok(items)
}

fn utf8(body: &[u8]) -> Result<&str, ApiError> {
    std::str::from_utf8(body)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("body is not UTF-8: {e}")))
}

/// A sequence visitor that hands each element to `each` and fails once it has seen more
/// than `max` (or is told up front it will: a postcard length prefix), setting `over` so
/// the caller can tell this refusal from a malformed body without reading error text.
struct Limited<'c, T, F> {
    /// Most elements accepted.
    max: usize,
    /// Set when the sequence was refused for its length.
    over: &'c Cell<bool>,
    /// Called with each element, in order.
    each: F,
    _element: PhantomData<fn() -> T>,
}

impl<'c, T, F> Limited<'c, T, F> {
    fn new(max: usize, over: &'c Cell<bool>, each: F) -> Self {
        Self {
            max,
            over,
            each,
            _element: PhantomData,
        }
    }
}

impl<'de, T: Deserialize<'de>, F: FnMut(T)> Visitor<'de> for Limited<'_, T, F> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a sequence of at most {} notifications", self.max)
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        if seq.size_hint().is_some_and(|n| n > self.max) {
            self.over.set(true);
            return Err(de::Error::custom("too many items"));
        }
        let mut n = 0usize;
        while let Some(element) = seq.next_element::<T>()? {
            n += 1;
            if n > self.max {
                self.over.set(true);
                return Err(de::Error::custom("too many items"));
            }
            (self.each)(element);
        }
        Ok(())
    }
}

impl<'de, T: Deserialize<'de>, F: FnMut(T)> DeserializeSeed<'de> for Limited<'_, T, F> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_seq(self)
    }
}

/// Parses one JSON item: malformed JSON is 400, the wrong shape 422.
fn parse_json_item<'a>(text: &'a str, limits: &Limits) -> Result<NewNotification<'a>, ApiError> {
    let item: Notification<'a> = serde_json::from_str(text).map_err(|e| {
        if e.is_syntax() || e.is_eof() {
            ApiError::bad_request("invalid_json", e.to_string())
        } else {
            ApiError::unprocessable(
                "invalid_notification",
                format!("expected {{\"user\", \"payload\", \"idempotency_key\"?}}: {e}"),
            )
        }
    })?;
    validate(&item.user, item.payload.get(), item.idempotency_key, limits)
}

/// One postcard item: its payload must be JSON text.
fn postcard_item<'a>(
    item: PostcardItemIn<'a>,
    limits: &Limits,
) -> Result<NewNotification<'a>, ApiError> {
    serde_json::from_str::<&RawValue>(item.payload)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("payload is not JSON: {e}")))?;
    validate(
        item.user,
        item.payload,
        item.idempotency_key.map(Cow::Borrowed),
        limits,
    )
}

/// Checks the parts of one item; the error carries the status a single append answers.
fn validate<'a>(
    user: &str,
    payload: &'a str,
    idempotency_key: Option<Cow<'a, str>>,
    limits: &Limits,
) -> Result<NewNotification<'a>, ApiError> {
    let user =
        UserId::parse(user).map_err(|e| ApiError::bad_request("invalid_user", e.to_string()))?;
    if payload.len() > limits.payload_bytes {
        return Err(ApiError::too_large(
            "payload_too_large",
            format!(
                "the payload is {} bytes, the limit is {}",
                payload.len(),
                limits.payload_bytes
            ),
        ));
    }
    if nesting_exceeds(payload, limits.payload_depth) {
        return Err(ApiError::unprocessable(
            "payload_too_deep",
            format!(
                "the payload nests arrays and objects more than {} deep; many JSON parsers \
                 in clients cannot read it",
                limits.payload_depth
            ),
        ));
    }
    if let Some(key) = &idempotency_key {
        validate_idempotency_key(key)
            .map_err(|e| ApiError::bad_request("invalid_idempotency_key", e.to_string()))?;
    }
    Ok(NewNotification {
        user,
        payload,
        idempotency_key,
    })
}

/// Whether valid JSON `text` nests arrays and objects deeper than `max`. One pass over the
/// bytes; brackets inside strings do not count.
fn nesting_exceeds(text: &str, max: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in text.as_bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use gapless_shared::batch::{PostcardBatch, PostcardItem};

    fn limits(items: usize) -> Limits {
        Limits {
            batch_items: items,
            ..Limits::default()
        }
    }

    fn codes<'a>(items: &'a Items<'_>) -> Vec<&'a str> {
        items
            .iter()
            .map(|r| r.as_ref().map_or_else(|e| e.body.code.as_ref(), |_| "ok"))
            .collect()
    }

    #[test]
    fn nesting_is_counted_outside_strings_only() {
        assert!(!nesting_exceeds(r#"{"a":[1,{"b":"[[[[[["}]}"#, 3));
        assert!(nesting_exceeds(r#"{"a":[1,{"b":[]}]}"#, 3));
        assert!(!nesting_exceeds(r#""\"[[[[""#, 1));
        assert!(nesting_exceeds(&"[".repeat(65), 64));
        assert!(!nesting_exceeds(
            &format!("{}{}", "[".repeat(64), "]".repeat(64)),
            64
        ));
    }

    #[test]
    fn every_format_decodes_to_the_same_items() {
        let json = br#"[{"user":"a","payload":1},{"user":"b c","payload":2}]"#;
        let ndjson = b"{\"user\":\"a\",\"payload\":1}\n\n{\"user\":\"b c\",\"payload\":2}\n";
        let item = |user: &str, payload: &str| PostcardItem {
            user: user.into(),
            payload: payload.into(),
            idempotency_key: None,
        };
        let postcard = PostcardBatch::V1(vec![item("a", "1"), item("b c", "2")]).encode();
        for (format, body) in [
            (Format::Json, &json[..]),
            (Format::Ndjson, &ndjson[..]),
            (Format::Postcard, &postcard[..]),
        ] {
            let items = decode_batch(format, body, &limits(10)).expect("decodes");
            assert_eq!(codes(&items), ["ok", "invalid_user"], "{format:?}");
        }
    }

    #[test]
    fn too_many_items_are_refused_before_the_rest_is_decoded() {
        let n = 100_000;
        let json = format!("[{}1]", "1,".repeat(n - 1));
        let ndjson = "1\n".repeat(n);
        let postcard = PostcardBatch::V1(vec![
            PostcardItem {
                user: "a".into(),
                payload: "1".into(),
                idempotency_key: None,
            };
            n
        ])
        .encode();
        for (format, body) in [
            (Format::Json, json.as_bytes()),
            (Format::Ndjson, ndjson.as_bytes()),
            (Format::Postcard, &postcard[..]),
        ] {
            let err = decode_batch(format, body, &limits(3)).expect_err("too many");
            assert_eq!(err.body.code, "too_many_items", "{format:?}");
        }
        // A postcard prefix claiming 2^60 items in a few bytes is refused without reading one
        // (the body cannot hold them: malformed).
        let mut huge = vec![0u8];
        huge.extend_from_slice(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x10]);
        let err = decode_batch(Format::Postcard, &huge, &limits(3)).expect_err("too many");
        assert_eq!(err.body.code, "invalid_postcard", "{}", err.body.message);
    }

    #[test]
    fn malformed_batches_and_trailing_bytes_are_refused() {
        let l = limits(10);
        let err = |format, body: &[u8]| decode_batch(format, body, &l).expect_err("refused");
        assert_eq!(err(Format::Json, b"[1,").body.code, "invalid_json");
        assert_eq!(err(Format::Json, b"[] []").body.code, "invalid_json");
        assert_eq!(err(Format::Json, b"{}").body.code, "invalid_json");
        let mut postcard = PostcardBatch::V1(vec![]).encode();
        postcard.push(7);
        assert_eq!(
            err(Format::Postcard, &postcard).body.code,
            "invalid_postcard"
        );
        assert_eq!(err(Format::Postcard, &[1, 0]).body.code, "invalid_postcard");
    }

    #[test]
    fn deep_payloads_are_refused_per_item() {
        let deep = format!("{}{}", "[".repeat(65), "]".repeat(65));
        let body = format!(r#"[{{"user":"a","payload":{deep}}},{{"user":"a","payload":[[1]]}}]"#);
        let items = decode_batch(Format::Json, body.as_bytes(), &limits(10)).expect("decodes");
        assert_eq!(codes(&items), ["payload_too_deep", "ok"]);
        let one = format!(r#"{{"user":"a","payload":{deep}}}"#);
        let err = decode_one(one.as_bytes(), &Limits::default()).expect_err("too deep");
        assert_eq!(
            (err.status, err.body.code.as_ref()),
            (StatusCode::UNPROCESSABLE_ENTITY, "payload_too_deep")
        );
    }
}
