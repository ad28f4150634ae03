//! The Server-Sent Events transport (DESIGN.md §5.1): `GET /v1/sse` naming the position
//! (`epoch`, `after`), the stream decoded by [`super::event_stream`] into the same messages
//! as WebSocket frames, and acks posted to `/v1/ack`.
//!
//! Acks are cumulative, so at most one is in flight per connection: [`SseConnection::ack`]
//! notes the highest seq wanted and starts a request only when none is in flight;
//! [`SseConnection::next`] drives that request while it waits for the stream and, when it
//! lands, sends the highest seq noted meanwhile. A failed ack is logged and does not end the
//! stream: it travels on its own TCP connection, so its failure says nothing of the
//! stream's; the next ack covers it (cumulative), and so does the position every resume
//! names.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use gapless_shared::protocol::{self, DrainHint, ServerMessage, close};
use reqwest::header::{ACCEPT, CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use reqwest::{StatusCode, Url};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::event_stream::{EventStream, SseEvent};
use super::{Failure, Incoming, Resume, http};
use crate::config::ClientConfig;
use crate::disconnect::Disconnect;

/// An ack request in flight; resolves when the edge answered it.
type AckFuture = Pin<Box<dyn Future<Output = Result<(), Failure>> + Send>>;

/// One SSE stream and its acks.
pub(crate) struct SseConnection {
    /// The stream: the answer to `GET /v1/sse`, read chunk by chunk.
    response: reqwest::Response,
    /// What was received and not yet made into events.
    events: EventStream,
    /// Silence after which the edge is presumed gone: heartbeat + grace (any bytes count,
    /// `: ping` comments included).
    deadline: Duration,
    /// When bytes last arrived.
    heard: Instant,
    /// Epoch of the last notification or reset received (else of the resume): acks name it.
    epoch: Option<String>,
    /// Where acks go, with the credentials and the pool of the stream.
    acks: Acks,
}

/// The ack side of a stream: `POST /v1/ack`, one request at a time.
struct Acks {
    /// The shared HTTP client of this local address.
    http: reqwest::Client,
    /// `/v1/ack` of the stream's edge.
    url: Url,
    /// `Bearer <token>`.
    bearer: HeaderValue,
    /// How long one ack request may take (the connect timeout).
    timeout: Duration,
    /// Highest seq the state machine acked.
    wanted: u64,
    /// Highest seq sent (in flight or answered).
    sent: u64,
    /// The request in flight, if any; dropped (cancelled) with the connection.
    in_flight: Option<AckFuture>,
}

/// The body of `POST /v1/ack`.
#[derive(Serialize)]
struct AckBody<'a> {
    epoch: &'a str,
    seq: u64,
}

/// The data of `event: reconnect` (the edge drains).
#[derive(Deserialize)]
struct Reconnect {
    delay_ms: Option<u64>,
}

/// The data of `event: close`.
#[derive(Deserialize)]
struct Close {
    code: u16,
    #[serde(default)]
    reason: String,
}

impl SseConnection {
    /// Opens the stream at `resume` and reads its `welcome`, within the connect timeout.
    /// Returns the edge and device the welcome names.
    pub(crate) async fn open(
        config: &ClientConfig,
        url: &str,
        resume: Resume,
    ) -> Result<(Self, String, String), Failure> {
        let mut stream_url = http::endpoint(url, "/v1/sse")?;
        {
            let mut query = stream_url.query_pairs_mut();
            if let Some(epoch) = &resume.epoch {
                query.append_pair("epoch", epoch);
            }
            if let Some(after) = resume.after {
                query.append_pair("after", &after.to_string());
            }
        }
        let client = http::client(config)?;
        let bearer = http::bearer(config)?;
        let request = http::authorized(client.get(stream_url), &bearer)
            .header(ACCEPT, "text/event-stream")
            .header(CACHE_CONTROL, "no-cache");
        let started = Instant::now();
        let response = tokio::time::timeout(config.connect_timeout, request.send())
            .await
            .map_err(|_| Failure::from("connect timed out"))?
            .map_err(|e| format!("connect failed: {}", http::describe(&e)))?;
        if response.status() != StatusCode::OK {
            let left = config.connect_timeout.saturating_sub(started.elapsed());
            return Err(http::refusal(response, left).await);
        }
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if !content_type.starts_with("text/event-stream") {
            return Err(Failure::protocol(format!(
                "expected text/event-stream, got {content_type:?}"
            )));
        }
        let mut conn = Self {
            response,
            events: EventStream::default(),
            // Until the welcome: what is left of the connect timeout.
            deadline: config.connect_timeout.saturating_sub(started.elapsed()),
            heard: Instant::now(),
            epoch: resume.epoch,
            acks: Acks {
                http: client,
                url: http::endpoint(url, "/v1/ack")?,
                bearer,
                timeout: config.connect_timeout,
                wanted: 0,
                sent: 0,
                in_flight: None,
            },
        };
        let event = conn.event().await?;
        let (edge, device, heartbeat_ms) = match (event.kind.as_str(), conn.decode(&event)?) {
            (
                "welcome",
                ServerMessage::Welcome {
                    edge,
                    device,
                    heartbeat_ms,
                    ..
                },
            ) => (edge, device, heartbeat_ms),
            (kind, other) => {
                return Err(Failure::protocol(format!(
                    "expected welcome, got {kind} event {other:?}"
                )));
            }
        };
        conn.deadline = Duration::from_millis(heartbeat_ms) + config.heartbeat_grace;
        // `/v1/ack` needs the device named: a device the edge made up for this stream (no
        // claim in the token, no `?device=`) is named in the query. A token's claim wins
        // over the query at the edge, so naming it again is harmless.
        if !conn.acks.url.query_pairs().any(|(k, _)| k == "device") {
            conn.acks
                .url
                .query_pairs_mut()
                .append_pair("device", &device);
        }
        Ok((conn, edge, device))
    }

    /// Notes an ack; sent now if no ack is in flight, else when the one in flight lands.
    pub(crate) fn ack(&mut self, seq: u64) {
        self.acks.wanted = self.acks.wanted.max(seq);
        if self.acks.in_flight.is_none() {
            self.acks.send(self.epoch.as_deref());
        }
    }

    /// Lets an ack in flight land (for at most a second), then drops the stream.
    pub(crate) async fn close(mut self) {
        if let Some(ack) = self.acks.in_flight.take() {
            let _ = tokio::time::timeout(Duration::from_secs(1), ack).await;
        }
    }

    /// The next notification, reset or end of the stream.
    pub(crate) async fn next(&mut self) -> Result<Incoming, Failure> {
        loop {
            let event = self.event().await?;
            match event.kind.as_str() {
                "notification" | "reset" => match self.decode(&event)? {
                    ServerMessage::Notification(n) => {
                        if self.epoch.as_deref() != Some(n.epoch.as_str()) {
                            self.epoch = Some(n.epoch.clone());
                        }
                        return Ok(Incoming::Notification(n));
                    }
                    ServerMessage::Reset {
                        epoch,
                        first_seq,
                        reason,
                    } => {
                        self.epoch = Some(epoch.clone());
                        return Ok(Incoming::Reset {
                            epoch,
                            first_seq,
                            reason,
                        });
                    }
                    other => {
                        return Err(Failure::protocol(format!(
                            "{} event carries {other:?}",
                            event.kind
                        )));
                    }
                },
                "reconnect" => {
                    let hint: Reconnect = serde_json::from_str(&event.data)
                        .map_err(|e| Failure::protocol(format!("bad reconnect event: {e}")))?;
                    let ms = hint.delay_ms.or(self.events.retry()).unwrap_or(0);
                    return Ok(Incoming::Closed {
                        code: close::RESTART,
                        reason: DrainHint {
                            reconnect_in_ms: ms,
                        }
                        .reason(),
                        retry_in: Some(Duration::from_millis(ms)),
                    });
                }
                "close" => {
                    let close: Close = serde_json::from_str(&event.data)
                        .map_err(|e| Failure::protocol(format!("bad close event: {e}")))?;
                    return Ok(Incoming::Closed {
                        code: close.code,
                        reason: close.reason,
                        retry_in: None,
                    });
                }
                "welcome" => return Err(Failure::protocol("a second welcome")),
                // Event types of later versions.
                _ => continue,
            }
        }
    }

    /// A message of the shared protocol, from an event's data.
    fn decode(&self, event: &SseEvent) -> Result<ServerMessage, Failure> {
        protocol::from_json::<ServerMessage>(&event.data)
            .map_err(|e| Failure::protocol(format!("bad {} event: {e}", event.kind)))
    }

    /// The next event of the stream, within the deadline; drives the ack in flight
    /// meanwhile.
    async fn event(&mut self) -> Result<SseEvent, Failure> {
        loop {
            if let Some(event) = self
                .events
                .next()
                .map_err(|e| Failure::protocol(format!("bad event stream: {e}")))?
            {
                return Ok(event);
            }
            let silence = tokio::time::sleep_until(self.heard + self.deadline);
            tokio::select! {
                biased;
                landed = land(&mut self.acks.in_flight) => {
                    self.acks.in_flight = None;
                    if let Err(failure) = landed {
                        tracing::debug!(reason = %failure.reason, "ack not taken");
                    }
                    if self.acks.wanted > self.acks.sent {
                        self.acks.send(self.epoch.as_deref());
                    }
                }
                chunk = self.response.chunk() => match chunk {
                    Ok(Some(bytes)) => {
                        self.heard = Instant::now();
                        self.events.feed(&bytes);
                    }
                    Ok(None) => return Err("the edge ended the stream".into()),
                    Err(e) => {
                        return Err(format!("stream failed: {}", http::describe(&e)).into());
                    }
                },
                () = silence => {
                    return Err(format!("nothing from the edge for {:?}", self.deadline).into());
                }
            }
        }
    }
}

/// The answer to the ack in flight; never resolves when none is. Cancel-safe: the request
/// stays in `in_flight` until it resolves.
async fn land(in_flight: &mut Option<AckFuture>) -> Result<(), Failure> {
    match in_flight {
        Some(ack) => ack.await,
        None => std::future::pending().await,
    }
}

impl Acks {
    /// Starts `POST /v1/ack` of the highest seq wanted. Without an epoch nothing was
    /// received yet, so there is nothing to ack.
    fn send(&mut self, epoch: Option<&str>) {
        let Some(epoch) = epoch else {
            return;
        };
        let seq = self.wanted;
        let request = http::authorized(self.http.post(self.url.clone()), &self.bearer)
            .timeout(self.timeout)
            .json(&AckBody { epoch, seq });
        self.sent = seq;
        self.in_flight = Some(Box::pin(async move {
            let response = request
                .send()
                .await
                .map_err(|e| format!("ack failed: {}", http::describe(&e)))?;
            if response.status().is_success() {
                Ok(())
            } else {
                // The refusal names the ack's position in its message.
                let mut failure = http::refusal(response, Duration::from_secs(1)).await;
                if let Disconnect::Refused { message, .. } = &mut failure.reason {
                    *message = format!("ack {seq}: {message}");
                }
                Err(failure)
            }
        }));
    }
}
