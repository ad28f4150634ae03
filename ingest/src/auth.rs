//! Who may append, and how fast (DESIGN.md §4): `Authorization: Bearer <api key>`, failed
//! attempts limited per source address, requests and items limited per API key.
//!
//! Order of the checks, each answering before the next is tried: an address over its
//! failure rate gets 429 before its credentials are looked at (so guessing keys is no faster
//! than that rate); a missing or malformed header is 401, an unknown key 403 (both count as
//! failures); a key over its request rate gets 429; then the connection is established in
//! the listener's budget. The item rate is spent by the handlers once a body is decoded.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use gapless_shared::config::Secret;
use gapless_shared::listener::Admission;
use gapless_shared::rate::{AuthFailures, KeyedLimit, Rate, retry_after_secs};
use gapless_shared::telemetry::LogThrottle;

use crate::error::ApiError;

/// Rates of the ingest's limits.
#[derive(Debug, Clone, Copy)]
pub struct RateLimits {
    /// Requests per API key.
    pub key_requests: Rate,
    /// Items (notifications) per API key.
    pub key_items: Rate,
    /// Failed authentications per source address.
    pub auth_failures: Rate,
}

impl Default for RateLimits {
    fn default() -> Self {
        Self {
            key_requests: Rate::new(10_000, 1),
            key_items: Rate::new(1_000_000, 1),
            auth_failures: Rate::new(10, 5),
        }
    }
}

/// Which configured key a request authenticated with (its index), put into the request's
/// extensions for the handlers' item limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(usize);

/// The API keys and the limits around them.
pub struct Guard {
    /// Accepted API keys; never empty.
    keys: Vec<Secret>,
    /// Requests per key.
    requests: KeyedLimit<KeyId>,
    /// Items per key.
    items: KeyedLimit<KeyId>,
    /// Failed attempts per source address.
    failures: AuthFailures<IpAddr>,
}

impl Guard {
    /// A guard of `keys` with `limits`.
    pub fn new(keys: Vec<Secret>, limits: RateLimits) -> Self {
        Self {
            keys,
            requests: KeyedLimit::new(limits.key_requests),
            items: KeyedLimit::new(limits.key_items),
            failures: AuthFailures::new(limits.auth_failures),
        }
    }

    /// The configured key matching `presented`, compared in constant time with each.
    fn find(&self, presented: &str) -> Option<KeyId> {
        let mut found = None;
        for (i, key) in self.keys.iter().enumerate() {
            if constant_time_eq(key.expose().as_bytes(), presented.as_bytes()) {
                found = Some(KeyId(i));
            }
        }
        found
    }

    /// Spends `n` items of `key`'s rate, or 429.
    pub fn spend_items(&self, key: Option<KeyId>, n: usize) -> Result<(), ApiError> {
        let Some(key) = key else { return Ok(()) };
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        self.items
            .check_n(&key, n)
            .map_err(|wait| rate_limited("items", wait))
    }

    /// Forgets the state of keys and addresses quiet for a while; run periodically.
    pub fn forget_idle(&self) {
        self.requests.forget_idle();
        self.items.forget_idle();
        self.failures.forget_idle();
    }

    /// Counts a failure of `source`; the answer is 429 instead of `refusal` once it goes
    /// over the rate.
    fn failed(&self, source: Option<IpAddr>, refusal: ApiError) -> Response {
        metrics::counter!("gapless_ingest_auth_failures_total", "reason" => refusal.body.code.clone())
            .increment(1);
        // At most one line per interval: a flood of bad keys must not flood the log.
        static LOG: LogThrottle = LogThrottle::new();
        LOG.log(|suppressed| {
            tracing::info!(
                source = %source.map_or_else(|| "-".to_owned(), |ip| ip.to_string()),
                code = %refusal.body.code,
                suppressed,
                "request refused: {}",
                refusal.body.message
            )
        });
        match source.map(|ip| self.failures.failed(&ip)) {
            Some(Err(wait)) => too_many_failures(wait).into_response(),
            _ => refusal.into_response(),
        }
    }
}

/// Runs [`Guard::forget_idle`] every minute.
pub async fn forget_idle_loop(guard: Arc<Guard>, stop: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = tick.tick() => guard.forget_idle(),
            () = stop.cancelled() => return,
        }
    }
}

fn rate_limited(what: &str, wait: Duration) -> ApiError {
    metrics::counter!("gapless_ingest_rate_limited_total", "limit" => what.to_owned()).increment(1);
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        format!("this API key is over its {what} rate; retry after the Retry-After seconds"),
    )
    .retry_after(retry_after_secs(wait))
}

fn too_many_failures(wait: Duration) -> ApiError {
    static LOG: LogThrottle = LogThrottle::new();
    LOG.log(|suppressed| {
        tracing::warn!(
            suppressed,
            "an address failed authentication too often; answering 429"
        )
    });
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_auth_failures",
        "too many failed authentications from this address; retry after the Retry-After seconds",
    )
    .retry_after(retry_after_secs(wait))
}

/// The middleware of every `/v1` route; see the module docs for the order of the checks.
pub async fn authenticate(
    State(guard): State<Arc<Guard>>,
    mut request: Request,
    next: Next,
) -> Response {
    let admission = request.extensions().get::<Admission>().cloned();
    let source = admission.as_ref().map(Admission::source);
    if let Some(ip) = source
        && let Err(wait) = guard.failures.admit(&ip)
    {
        metrics::counter!("gapless_ingest_auth_failures_total", "reason" => "too_many_auth_failures")
            .increment(1);
        return too_many_failures(wait).into_response();
    }
    // The status page is opened by a browser, which can present a key only by HTTP Basic
    // authentication (the key as the password): there a missing key asks the browser for it.
    let challenge = request.uri().path() == "/status";
    let Some(value) = request.headers().get(header::AUTHORIZATION) else {
        let mut refused = guard.failed(
            source,
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing `Authorization: Bearer <api key>` header",
            ),
        );
        if challenge && refused.status() == StatusCode::UNAUTHORIZED {
            refused.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static(
                    "Basic realm=\"gapless status: any user name, the API key as password\", charset=\"UTF-8\"",
                ),
            );
        }
        return refused;
    };
    let Some(presented) = value.to_str().ok().and_then(presented_key) else {
        return guard.failed(
            source,
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "the Authorization header must be `Bearer <api key>` (or, from a browser, Basic \
                 with the key as the password)",
            ),
        );
    };
    let presented = presented.as_str();
    let Some(key) = guard.find(presented) else {
        return guard.failed(
            source,
            ApiError::new(StatusCode::FORBIDDEN, "forbidden", "unknown API key"),
        );
    };
    if let Err(wait) = guard.requests.check(&key) {
        return rate_limited("request", wait).into_response();
    }
    // A producer with a valid key: its connection leaves the unauthenticated budget.
    if let Some(admission) = &admission
        && admission.establish().is_err()
    {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_connections",
            "the ingest holds as many connections as it may; retry shortly",
        )
        .closing();
    }
    request.extensions_mut().insert(key);
    next.run(request).await
}

/// The key of an `Authorization` value: `Bearer <key>`, or `Basic <base64 of user:key>` (a
/// browser's; the user name is ignored). Schemes are case-insensitive (RFC 9110 §11.1).
fn presented_key(value: &str) -> Option<String> {
    use base64::Engine;
    let (scheme, credentials) = value.split_once(' ')?;
    let credentials = credentials.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(credentials.to_owned());
    }
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(credentials)
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (_, key) = decoded.split_once(':')?;
    Some(key.to_owned())
}

/// Compares without an early exit on the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_comes_as_bearer_or_as_the_password_of_basic() {
        assert_eq!(presented_key("Bearer k1").as_deref(), Some("k1"));
        assert_eq!(presented_key("bearer  k1 ").as_deref(), Some("k1"));
        // base64("anyone:k1")
        assert_eq!(presented_key("Basic YW55b25lOmsx").as_deref(), Some("k1"));
        assert_eq!(presented_key("basic YW55b25lOmsx").as_deref(), Some("k1"));
        assert_eq!(presented_key("Basic not-base64!"), None);
        assert_eq!(
            presented_key("Basic YW55b25l"),
            None,
            "no colon: no password"
        );
        assert_eq!(presented_key("Digest k1"), None);
        assert_eq!(presented_key("k1"), None);
    }

    #[test]
    fn keys_are_found_by_value_only() {
        let guard = Guard::new(
            vec![Secret::new("one"), Secret::new("two")],
            RateLimits::default(),
        );
        assert_eq!(guard.find("two"), Some(KeyId(1)));
        assert_eq!(guard.find("tw"), None);
        assert_eq!(guard.find(""), None);
    }

    #[test]
    fn items_over_the_key_rate_are_refused_with_a_wait() {
        let guard = Guard::new(
            vec![Secret::new("k")],
            RateLimits {
                key_items: Rate::new(100, 1),
                ..RateLimits::default()
            },
        );
        let key = Some(KeyId(0));
        guard.spend_items(key, 60).expect("within the burst");
        let err = guard.spend_items(key, 60).expect_err("over it");
        assert_eq!(
            (err.status, err.body.code.as_ref()),
            (StatusCode::TOO_MANY_REQUESTS, "rate_limited")
        );
        assert!(err.retry_after.is_some_and(|s| s >= 1));
        guard
            .spend_items(None, 1_000_000)
            .expect("no key, no limit");
    }
}
