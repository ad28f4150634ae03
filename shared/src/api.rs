//! The ingest's HTTP request and answer types (DESIGN.md §4): what the ingest decodes and
//! answers, and what producers (the bench, the tests, a Rust producer) send and read. One
//! definition for both sides, so a field renamed on one cannot drift from the other.
//!
//! In the order a producer meets them: [`Notification`] (a request item), [`Appended`] and
//! [`BatchAnswer`] (the answers), [`ErrorEnvelope`] (every refusal), then the read answers
//! [`History`], [`Presence`], [`Devices`] and [`Status`].

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::health::HealthSnapshot;
use crate::status::Connections;

/// One notification as a producer writes it in JSON: the body of `POST /v1/notifications`,
/// one item of a JSON-array or NDJSON batch. Borrowed, so the ingest decodes it without
/// copying the payload; a producer lends it what it owns
/// (`serde_json::value::to_raw_value` makes the payload).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(
    feature = "openapi",
    derive(utoipa::ToSchema),
    schema(as = NotificationIn)
)]
pub struct Notification<'a> {
    /// The recipient: 1..=128 bytes of `A-Z a-z 0-9 . _ : @ -` (borrowed unless the JSON
    /// string holds escapes).
    #[serde(borrow)]
    #[cfg_attr(
        feature = "openapi",
        schema(value_type = String, min_length = 1, max_length = 128, pattern = "^[A-Za-z0-9._:@-]{1,128}$")
    )]
    pub user: Cow<'a, str>,
    /// Any JSON value, delivered as it is.
    #[serde(borrow)]
    #[cfg_attr(feature = "openapi", schema(value_type = Value))]
    pub payload: &'a RawValue,
    /// A repeated key appends nothing and answers the original seq (kept 24 h).
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "openapi",
        schema(value_type = Option<String>, min_length = 1, max_length = 200, pattern = "^[!-~]{1,200}$")
    )]
    pub idempotency_key: Option<Cow<'a, str>>,
}

/// The answer for one appended (or recognised duplicate) notification: the body of a
/// single append's 200, one result of a batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Appended {
    /// Recipient.
    pub user: String,
    /// Epoch of the user's log.
    pub epoch: String,
    /// Sequence number given to the notification (the original one for a duplicate).
    pub seq: u64,
    /// True when the idempotency key had been seen: nothing was appended.
    pub duplicate: bool,
}

/// The error half of a JSON error body, also used per item in batch results.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    /// Stable machine-readable code.
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub code: Cow<'static, str>,
    /// Human-readable explanation.
    pub message: String,
}

/// The body of every error answer: `{"error":{"code":…,"message":…}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema), schema(as = Error))]
pub struct ErrorEnvelope {
    /// What went wrong.
    pub error: ErrorBody,
}

/// One entry of a batch answer: the appended item, or why it alone was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum ItemResult {
    /// Appended (or a recognised duplicate).
    Ok(Appended),
    /// Refused; its neighbours are not.
    Err {
        /// Why.
        error: ErrorBody,
    },
}

impl ItemResult {
    /// The appended item, or the refusal.
    pub fn into_result(self) -> Result<Appended, ErrorBody> {
        match self {
            ItemResult::Ok(appended) => Ok(appended),
            ItemResult::Err { error } => Err(error),
        }
    }
}

/// The answer of a batch: one result per item, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BatchAnswer {
    /// One per item of the request, in its order.
    pub results: Vec<ItemResult>,
}

/// One retained notification.
#[derive(Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema), schema(as = HistoryEntry))]
pub struct HistoryEntry {
    /// Sequence number.
    pub seq: u64,
    /// Ingest time, ms.
    pub ts: u64,
    /// The producer's JSON.
    #[cfg_attr(feature = "openapi", schema(value_type = Value))]
    pub payload: Box<RawValue>,
}

/// `GET /v1/users/{user}/notifications`: a page of a user's log.
#[derive(Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct History {
    /// The user.
    pub user: String,
    /// Epoch of the log; `null` when the user has no log.
    pub epoch: Option<String>,
    /// Last assigned seq (0 when the user has no log).
    pub last_seq: u64,
    /// Retained entries after the requested seq, oldest first.
    pub notifications: Vec<HistoryEntry>,
}

/// One connected device (a device connected twice, to two edges or twice to one, is listed
/// once per connection).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Connected {
    /// The device.
    pub device: String,
    /// The edge that holds the connection.
    pub edge: String,
    /// `websocket`, `sse` or `poll`.
    pub transport: String,
    /// When the connection opened (a long-poll device: when its latest poll began), ms since
    /// the Unix epoch.
    pub since: u64,
}

/// `GET /v1/users/{user}/presence`.
#[derive(Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Presence {
    /// The user.
    pub user: String,
    /// Its connections now, oldest first.
    pub devices: Vec<Connected>,
}

/// One device's delivery status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Device {
    /// The device.
    pub device: String,
    /// Epoch of its stored position; `null` when it connected before the user had a log and
    /// has acknowledged nothing since.
    pub epoch: Option<String>,
    /// Everything up to this seq of `epoch` is acknowledged.
    pub acked: u64,
    /// Notifications of the current epoch it has not acknowledged (all of them when its
    /// position is of another epoch).
    pub behind: u64,
    /// Now for a connected device; else when its position was last written (its last ack
    /// that moved it), ms since the Unix epoch; `null` when unknown (written before schema 4).
    pub last_seen: Option<u64>,
    /// Connected now (see [`Presence`]).
    pub connected: bool,
    /// With `?seq=N`: whether seq N of the current epoch is acknowledged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acknowledged: Option<bool>,
}

/// `GET /v1/users/{user}/devices`.
#[derive(Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Devices {
    /// The user.
    pub user: String,
    /// The log's epoch; `null` when the user has no log.
    pub epoch: Option<String>,
    /// Last assigned seq (0 when the user has no log).
    pub last_seq: u64,
    /// Every device with a stored position, then connected devices that have none yet; by
    /// device id.
    pub devices: Vec<Device>,
}

/// One edge on the status page.
#[derive(Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EdgeRow {
    /// The edge.
    pub edge: String,
    /// Open sessions by transport, at its last report.
    pub connections: Connections,
    /// Deliveries per second at its last report.
    pub delivered_per_s: f64,
    /// p99 of live deliveries at its last report, ms.
    pub p99_ms: Option<f64>,
    /// Draining at its last report.
    pub draining: bool,
    /// How long ago it last reported, ms (a dead edge's grows).
    pub silent_ms: u64,
    /// Time left on its registry lease (`gl:edge:<id>`), ms; `None` when it has none (it
    /// died, or Redis lost it).
    pub lease_ttl_ms: Option<u64>,
    /// When it started, ms since the Unix epoch.
    pub started: u64,
}

/// Figures over the whole fleet.
#[derive(Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Totals {
    /// Devices connected (sessions open) on edges that reported in the last 5 s.
    pub connections: u64,
    /// Sessions by transport, likewise.
    pub by_transport: Connections,
    /// Deliveries per second, likewise.
    pub delivered_per_s: f64,
    /// The highest p99 of those edges, ms.
    pub p99_ms: Option<f64>,
}

/// The answering ingest's own figures.
#[derive(Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct IngestFigures {
    /// Notifications appended per second over the last second.
    pub appends_per_s: f64,
}

/// `GET /v1/status`.
#[derive(Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Status {
    /// When this was read, ms since the Unix epoch.
    pub at: u64,
    /// The answering ingest.
    pub ingest: IngestFigures,
    /// Redis as that ingest's probe found it.
    pub redis: HealthSnapshot,
    /// The fleet.
    pub totals: Totals,
    /// Each edge that reported in the last hour, by id.
    pub edges: Vec<EdgeRow>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_answer_reads_back_items_and_refusals_in_order() {
        let text = r#"{"results":[{"user":"u","epoch":"e","seq":3,"duplicate":false},
            {"error":{"code":"payload_too_large","message":"too big"}}]}"#;
        let answer: BatchAnswer = serde_json::from_str(text).expect("the ingest's layout");
        let results: Vec<_> = answer
            .results
            .into_iter()
            .map(ItemResult::into_result)
            .collect();
        assert_eq!(results[0].as_ref().map(|a| a.seq), Ok(3));
        assert_eq!(
            results[1].as_ref().map_err(|e| e.code.as_ref()),
            Err("payload_too_large")
        );
    }

    #[test]
    fn a_notification_borrows_its_payload_and_round_trips() {
        let payload = serde_json::value::to_raw_value(&serde_json::json!({"a": [1, 2]}))
            .expect("a JSON value");
        let item = Notification {
            user: "alice".into(),
            payload: &payload,
            idempotency_key: None,
        };
        let text = serde_json::to_string(&item).expect("serialises");
        assert_eq!(text, r#"{"user":"alice","payload":{"a":[1,2]}}"#);
        let back: Notification<'_> = serde_json::from_str(&text).expect("reads back");
        assert_eq!(back.payload.get(), r#"{"a":[1,2]}"#);
        assert!(matches!(back.user, Cow::Borrowed("alice")));
    }
}
