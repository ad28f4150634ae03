//! The transports devices connect over (DESIGN.md §5, §5.1), each driving the
//! [`delivery`](crate::delivery) core through its small interface: [`ws`] (WebSocket, both
//! ways), [`sse`] (Server-Sent Events, with acks by `POST /v1/ack`) and [`poll`]
//! (long-polling). What they share lives here: the credentials check every endpoint starts
//! with ([`authenticate`]), the JSON error answers, and position parsing.

pub mod poll;
pub mod sse;
pub mod ws;

use std::time::Duration;

use axum::Json;
use axum::extract::Extension;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use gapless_shared::ids::UserId;
use gapless_shared::listener::Admission;
use gapless_shared::rate::retry_after_secs;
use gapless_shared::telemetry::LogThrottle;
use serde::Deserialize;
use std::sync::atomic::Ordering;

use crate::auth;
use crate::delivery::{self, Resume};
use crate::hub::{Kind, Reservation};
use crate::reader::Page;
use crate::state::EdgeState;

/// A refused request: rendered as `{"error":{"code":…,"message":…}}` with its status; 503
/// and 429 carry `Retry-After`.
#[derive(Debug)]
pub struct Refused {
    /// The status.
    pub status: StatusCode,
    /// Machine-readable code.
    pub code: &'static str,
    /// What went wrong, for people.
    pub message: String,
    /// `Retry-After`, s (429 and 503 get 1 unless set).
    pub retry_after: Option<u64>,
    /// Ask the client to close the connection (the listener's budget is full).
    pub close: bool,
}

impl Refused {
    /// A refusal with `status`, `code` and `message`.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
            close: false,
        }
    }
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            Json(serde_json::json!({"error": {"code": self.code, "message": self.message}})),
        )
            .into_response();
        let retry = self.retry_after.or(matches!(
            self.status,
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS
        )
        .then_some(1));
        if let Some(secs) = retry {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.close {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

/// A JSON error answer (see [`Refused`]).
pub fn refuse(status: StatusCode, code: &'static str, message: &str) -> Response {
    Refused::new(status, code, message).into_response()
}

/// 429 with `Retry-After` rounded up from `wait`, logged at most once per 10 s.
pub fn too_many(code: &'static str, message: &str, wait: Duration) -> Refused {
    static LOG: LogThrottle = LogThrottle::new();
    LOG.log(|suppressed| tracing::warn!(code, suppressed, "connection refused with 429"));
    Refused {
        retry_after: Some(retry_after_secs(wait)),
        ..Refused::new(StatusCode::TOO_MANY_REQUESTS, code, message)
    }
}

/// The 429 of an address over its failed-authentication rate.
fn locked_out(wait: Duration) -> Refused {
    too_many(
        "too_many_auth_failures",
        "too many failed authentications from this address",
        wait,
    )
}

/// The credentials a request may carry in its query (browsers cannot set headers).
#[derive(Debug, Default, Deserialize)]
pub struct Credentials {
    /// The JWT.
    pub token: Option<String>,
    /// The device, when the token names none.
    pub device: Option<String>,
}

/// What an endpoint asks of [`authenticate`] beyond the token.
#[derive(Debug, Clone, Copy)]
pub struct Admit {
    /// Count the request against the user's connection rate (a new connection, not a poll
    /// or an ack).
    pub connect_rate: bool,
    /// Take a place in the user's connection cap, held by the returned [`Authed`].
    pub reserve: bool,
    /// The request needs a named device (poll, ack): a made-up one could never resume.
    pub device_required: bool,
}

impl Admit {
    /// A new connection (WebSocket, SSE stream): counts against the user's connection rate
    /// and takes a place in the cap; a device without an id is given one.
    pub const CONNECTION: Self = Self {
        connect_rate: true,
        reserve: true,
        device_required: false,
    };
    /// A long-poll: holds a place in the cap while it is held, but is not a new
    /// connection; the device must be named to resume on its next poll.
    pub const POLL: Self = Self {
        connect_rate: false,
        reserve: true,
        device_required: true,
    };
    /// An ack over HTTP: holds nothing, names the device whose position it moves.
    pub const ACK: Self = Self {
        connect_rate: false,
        reserve: false,
        device_required: true,
    };
}

/// An authenticated request.
pub struct Authed {
    /// The token's user.
    pub user: UserId,
    /// The device: the token's claim, else `?device=`, else made up.
    pub device: String,
    /// The edge made the device id up.
    pub assigned: bool,
    /// The places the connection holds (the user's cap, the listener's established budget);
    /// released on drop.
    pub places: (Option<Reservation>, Option<Admission>),
}

/// A source address for a log line (`-` when the listener gave none).
fn display_source(source: Option<std::net::IpAddr>) -> String {
    source.map_or_else(|| "-".to_owned(), |ip| ip.to_string())
}

/// Checks a request's credentials in the order every endpoint shares: draining, the source's
/// failure rate, the token (`Authorization: Bearer` or `?token=`), the device, the user's
/// connection rate and cap, and the listener's established budget. Every refusal is a JSON
/// answer; refusals of credentials count against the source address.
pub fn authenticate(
    state: &EdgeState,
    admission: Option<Extension<Admission>>,
    headers: &HeaderMap,
    query: Option<Credentials>,
    admit: Admit,
) -> Result<Authed, Refused> {
    if state.draining.load(Ordering::SeqCst) {
        return Err(Refused::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "this edge is draining; connect to another",
        ));
    }
    let admission = admission.map(|Extension(a)| a);
    let source = admission.as_ref().map(Admission::source);
    // An address over its failure rate is refused before its token is looked at.
    if let Some(ip) = source
        && let Err(wait) = state.auth_failures.admit(&ip)
    {
        metrics::counter!("gapless_edge_auth_failures_total", "reason" => "too_many_auth_failures")
            .increment(1);
        return Err(locked_out(wait));
    }
    // Refusals of credentials count against the address.
    let failed = |status, code: &'static str, message: &str| {
        metrics::counter!("gapless_edge_auth_failures_total", "reason" => code).increment(1);
        // At most one line per interval: a flood of bad tokens must not flood the log.
        static LOG: LogThrottle = LogThrottle::new();
        LOG.log(|suppressed| {
            tracing::info!(source = %display_source(source), code, suppressed, "connection refused: {message}")
        });
        match source.map(|ip| state.auth_failures.failed(&ip)) {
            Some(Err(wait)) => locked_out(wait),
            _ => Refused::new(status, code, message),
        }
    };
    let Some(query) = query else {
        return Err(failed(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "malformed query string",
        ));
    };
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim().to_owned())
        .or(query.token);
    let Some(token) = token else {
        return Err(failed(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            &auth::AuthError::Missing.to_string(),
        ));
    };
    let (user, claimed_device) = match state.verifier.verify(&token) {
        Ok(v) => v,
        Err(e) => {
            return Err(failed(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                &e.to_string(),
            ));
        }
    };
    // The token's device claim wins over the query: a device bound into a token cannot be
    // swapped by whoever holds the URL.
    let named = claimed_device.or(query.device);
    let assigned = named.is_none();
    let device = match named {
        Some(d) => match UserId::parse(&d) {
            Ok(_) => d,
            Err(e) => {
                return Err(failed(
                    StatusCode::BAD_REQUEST,
                    "invalid_device",
                    &auth::AuthError::BadDevice(e).to_string(),
                ));
            }
        },
        None if admit.device_required => {
            return Err(Refused::new(
                StatusCode::BAD_REQUEST,
                "device_required",
                "name the device (a `device` claim in the token, or ?device=): its position is kept per device",
            ));
        }
        None => format!("d-{:016x}", rand::random::<u64>()),
    };
    let place = take_places(state, &user, admit, admission.as_ref())?;
    Ok(Authed {
        user,
        device,
        assigned,
        places: (place, admission),
    })
}

/// What a verified client takes before it is served: a connect under its user's rate, a
/// place under its user's cap (as `admit` asks), and its connection's move from the
/// listener's unauthenticated budget to the established one, held until the connection ends.
fn take_places(
    state: &EdgeState,
    user: &UserId,
    admit: Admit,
    admission: Option<&Admission>,
) -> Result<Option<Reservation>, Refused> {
    if admit.connect_rate
        && let Err(wait) = state.user_connects.check(user)
    {
        metrics::counter!("gapless_edge_refused_total", "reason" => "user_connect_rate")
            .increment(1);
        return Err(too_many(
            "too_many_connects",
            "this user connects too often; retry after the Retry-After seconds",
            wait,
        ));
    }
    let place = if admit.reserve {
        let Some(place) = state
            .hub
            .reserve(user, state.config.max_connections_per_user)
        else {
            metrics::counter!("gapless_edge_refused_total", "reason" => "user_cap").increment(1);
            return Err(too_many(
                "too_many_connections",
                &format!(
                    "this user already has {} connections at this edge",
                    state.config.max_connections_per_user
                ),
                Duration::from_secs(5),
            ));
        };
        Some(place)
    } else {
        None
    };
    if let Some(a) = admission
        && a.establish().is_err()
    {
        return Err(Refused {
            close: true,
            ..Refused::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_connections",
                "this edge holds as many connections as it may; retry shortly or connect to another",
            )
        });
    }
    Ok(place)
}

/// Parses a position `<epoch>:<seq>` (an SSE event id).
pub fn parse_event_id(s: &str) -> Option<(String, u64)> {
    let (epoch, seq) = s.trim().rsplit_once(':')?;
    if epoch.is_empty() || epoch.len() > 128 {
        return None;
    }
    Some((epoch.to_owned(), seq.parse().ok()?))
}

/// The SSE event id of a position.
pub fn event_id(epoch: &str, seq: u64) -> String {
    format!("{epoch}:{seq}")
}

/// Checks a position a request names against the log before anything starts: `after`
/// beyond the last seq of the current epoch is a 409 (the client claims what was never
/// sent). A position in another epoch is fine: delivery starts with a reset.
pub fn check_named(named: &Option<(String, u64)>, position: &Page) -> Result<(), Refused> {
    if let (Some((epoch, after)), Some(current)) = (named, &position.epoch)
        && epoch == current
        && *after > position.last_seq
    {
        return Err(Refused::new(
            StatusCode::CONFLICT,
            "position_ahead",
            format!(
                "seq {after} is beyond the last seq of epoch {epoch} ({}); resume from a position you received",
                position.last_seq
            ),
        ));
    }
    Ok(())
}

/// Where a request names delivery to start: `epoch` needs `after`; `after` alone is the
/// WebSocket's `{"after": n}` (see [`delivery::resume_start`]).
pub fn named_resume(epoch: Option<String>, after: Option<u64>) -> Result<Resume, Refused> {
    match (epoch, after) {
        (Some(epoch), _) if epoch.is_empty() || epoch.len() > 128 => Err(Refused::new(
            StatusCode::BAD_REQUEST,
            "invalid_epoch",
            "epoch must be 1..=128 characters",
        )),
        (Some(_), None) => Err(Refused::new(
            StatusCode::BAD_REQUEST,
            "invalid_position",
            "epoch needs after: the last seq processed in it",
        )),
        (epoch, after) => Ok(Resume { epoch, after }),
    }
}

/// The position read an HTTP session starts from (before it registers, see
/// [`delivery::deliver`]), once: 503 when Redis does not answer, 409 for a named position
/// beyond the log ([`check_named`]). A named position in the current epoch is acknowledged
/// (stored like an ack, and counted as one of `kind`): the client says it processed
/// everything up to it.
pub async fn start_position(
    state: &EdgeState,
    authed: &Authed,
    resume: &Resume,
    kind: Kind,
) -> Result<Page, Response> {
    let position = delivery::read_position_once(state, &authed.user, &authed.device)
        .await
        .map_err(|e| unavailable(&e))?;
    let named = resume.epoch.clone().zip(resume.after);
    check_named(&named, &position).map_err(IntoResponse::into_response)?;
    if let Some((epoch, after)) = &named
        && position.epoch.as_ref() == Some(epoch)
    {
        state
            .acks
            .record(&authed.user, &authed.device, epoch, *after);
        state.hot.of(kind).acks.increment(1);
    }
    Ok(position)
}

/// The 503 of a position read Redis did not answer.
pub fn unavailable(error: &gapless_shared::store::StoreError) -> Response {
    tracing::debug!(%error, "position read failed");
    refuse(
        StatusCode::SERVICE_UNAVAILABLE,
        "redis_unavailable",
        "the log cannot be read right now; retry shortly",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_round_trip_and_garbage_is_refused() {
        let id = event_id("1764250000000-0", 17);
        assert_eq!(parse_event_id(&id), Some(("1764250000000-0".into(), 17)));
        assert_eq!(parse_event_id("e:1:2"), Some(("e:1".into(), 2)));
        for bad in [
            "",
            "17",
            ":17",
            "e:",
            "e:-1",
            "e:x",
            "e:18446744073709551616",
        ] {
            assert_eq!(parse_event_id(bad), None, "{bad:?}");
        }
    }
}
