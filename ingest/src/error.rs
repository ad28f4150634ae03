//! API errors: an HTTP status and the JSON body `{"error":{"code":…,"message":…}}`
//! (DESIGN.md §4).

use std::borrow::Cow;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
pub use gapless_shared::api::ErrorBody;
use gapless_shared::api::ErrorEnvelope;
use gapless_shared::store::StoreError;
use gapless_shared::telemetry::LogThrottle;

/// Seconds a client is asked to wait when Redis is unavailable.
const RETRY_AFTER_SECS: &str = "1";

/// An error answer of the API.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Body.
    pub body: ErrorBody,
    /// `Retry-After` seconds, for 429 and 503 (503 without one says 1).
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error with `status`, `code` and `message`.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            body: ErrorBody {
                code: Cow::Borrowed(code),
                message: message.into(),
            },
            retry_after: None,
        }
    }

    /// The answer, with `Connection: close`: for a connection that must not carry another
    /// request (its body was not read, or it has no place in the connection budget).
    pub fn closing(self) -> Response {
        let mut response = self.into_response();
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        response
    }

    /// The same error, asking the client to wait `secs` before retrying.
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    /// 400 with `code`.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 413 with `code`.
    pub fn too_large(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, code, message)
    }

    /// 422 with `code`.
    pub fn unprocessable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        // An outage is logged once, by the probe of `gapless_shared::health`; here each
        // request's failure is a debug line. A refusal is not an outage: once per interval.
        static REFUSED: LogThrottle = LogThrottle::new();
        static UNREPLICATED: LogThrottle = LogThrottle::new();
        match &e {
            StoreError::Unavailable(msg) => {
                tracing::debug!(error = %msg, "Redis is unavailable; answering 503");
            }
            StoreError::Redis(msg) => REFUSED.log(|suppressed| {
                tracing::warn!(error = %msg, suppressed, "Redis refused a request; answering 500");
            }),
            StoreError::NotReplicated { wanted, acked } => UNREPLICATED.log(|suppressed| {
                tracing::warn!(
                    wanted,
                    acked,
                    suppressed,
                    "appends not on enough replicas; answering 503"
                );
            }),
        }
        match e {
            StoreError::Unavailable(msg) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!(
                    "storage is unavailable, so this is not acknowledged; a call that timed out \
                     may still have been written: retry later with an idempotency key, which \
                     never appends twice ({msg})"
                ),
            ),
            StoreError::Redis(msg) => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "store_error",
                format!("storage refused the request: {msg}"),
            ),
            StoreError::NotReplicated { wanted, acked } => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_replicated",
                format!(
                    "written, but not safe yet: {acked} of the {wanted} replicas asked for hold it, so a failover now could lose it; \
                     retry with the same idempotency key (it answers the original seq and appends nothing)"
                ),
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response =
            (self.status, axum::Json(ErrorEnvelope { error: self.body })).into_response();
        let retry_after = match (self.retry_after, self.status) {
            (Some(secs), _) => Some(HeaderValue::from(secs)),
            (None, StatusCode::SERVICE_UNAVAILABLE) => {
                Some(HeaderValue::from_static(RETRY_AFTER_SECS))
            }
            _ => None,
        };
        if let Some(value) = retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        response
    }
}
