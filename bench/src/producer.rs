//! The one way the bench and the drill talk to the ingest: typed on [`gapless_shared::api`],
//! so a request is built from [`Notification`]s and an answer read as [`BatchAnswer`] and
//! [`Appended`], never as hand-written JSON or untyped values. What to send and how often
//! is the scenario's; how a request is made and its answer read is here.

use std::time::Duration;

use bytes::Bytes;
use gapless_shared::api::{Appended, BatchAnswer, ErrorBody, ErrorEnvelope, Notification};
use serde_json::value::RawValue;

/// A batch answer read per item: the appended item, or why it alone was refused.
pub type ItemResults = Vec<Result<Appended, ErrorBody>>;

/// Why a request got no answer to read.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No HTTP answer: refused, reset or timed out.
    #[error("no answer from the ingest: {0}")]
    Transport(#[from] reqwest::Error),
    /// An answer other than 200, with its error body when it had one.
    #[error("the ingest answered {status}{}", .error.as_ref().map(|e| format!(": {} ({})", e.code, e.message)).unwrap_or_default())]
    Refused {
        /// The HTTP status.
        status: reqwest::StatusCode,
        /// `{"error":…}`, when the body was one.
        error: Option<ErrorBody>,
    },
    /// A batch answer without one result per item.
    #[error("the ingest answered {got} results for {sent} items")]
    Mismatch {
        /// Items sent.
        sent: usize,
        /// Results answered.
        got: usize,
    },
}

/// Batch body encodings the ingest reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// A JSON array of items.
    Json,
    /// One item object per line.
    Ndjson,
    /// `gapless_shared::batch::PostcardBatch::V1`.
    Postcard,
}

impl Format {
    /// Its `Content-Type`.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Json => "application/json",
            Format::Ndjson => "application/x-ndjson",
            Format::Postcard => "application/x-postcard",
        }
    }
}

/// An ingest and the key to use it. Cheap to clone (one HTTP connection pool).
#[derive(Debug, Clone)]
pub struct Ingest {
    http: reqwest::Client,
    base: String,
    api_key: String,
}

impl Ingest {
    /// The ingest at `base` (`http://host:port`), every request bounded by `timeout`.
    pub fn new(base: &str, api_key: &str, timeout: Duration) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder().timeout(timeout).build()?;
        Ok(Self::with_client(http, base, api_key))
    }

    /// The same over a client made elsewhere (bound to a source address, say).
    pub fn with_client(http: reqwest::Client, base: &str, api_key: &str) -> Self {
        Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
            api_key: api_key.to_owned(),
        }
    }

    /// `POST /v1/notifications`: one notification.
    pub async fn append(&self, item: &Notification<'_>) -> Result<Appended, SendError> {
        let body = serde_json::to_vec(item).expect("a notification always serialises");
        let answer = self
            .post("/v1/notifications", Format::Json, body.into())
            .await?;
        Ok(answer.json().await?)
    }

    /// `POST /v1/notifications/batch` as a JSON array; one result per item, in order.
    pub async fn append_batch(&self, items: &[Notification<'_>]) -> Result<ItemResults, SendError> {
        let body = serde_json::to_vec(items).expect("notifications always serialise");
        let results = self.send_batch(Format::Json, body.into()).await?;
        if results.len() != items.len() {
            return Err(SendError::Mismatch {
                sent: items.len(),
                got: results.len(),
            });
        }
        Ok(results)
    }

    /// `POST /v1/notifications/batch` of a body already encoded as `format` (built once,
    /// sent many times); one result per item, in order.
    pub async fn send_batch(&self, format: Format, body: Bytes) -> Result<ItemResults, SendError> {
        let answer = self.post("/v1/notifications/batch", format, body).await?;
        let answer: BatchAnswer = answer.json().await?;
        Ok(answer
            .results
            .into_iter()
            .map(gapless_shared::api::ItemResult::into_result)
            .collect())
    }

    /// POSTs `body`; the answer when it is a 200.
    async fn post(
        &self,
        path: &str,
        format: Format,
        body: Bytes,
    ) -> Result<reqwest::Response, SendError> {
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.api_key)
            .header(reqwest::header::CONTENT_TYPE, format.content_type())
            .body(body)
            .send()
            .await?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let error = response.json::<ErrorEnvelope>().await.ok().map(|e| e.error);
        Err(SendError::Refused { status, error })
    }
}

/// A payload made from any serialisable value, for [`Notification::payload`].
pub fn payload(value: &impl serde::Serialize) -> Box<RawValue> {
    serde_json::value::to_raw_value(value).expect("a payload always serialises")
}

/// A notification of `user` with `payload`, and its idempotency key when one is given.
pub fn notification<'a>(
    user: &'a str,
    payload: &'a RawValue,
    idempotency_key: Option<&'a str>,
) -> Notification<'a> {
    Notification {
        user: user.into(),
        payload,
        idempotency_key: idempotency_key.map(Into::into),
    }
}
