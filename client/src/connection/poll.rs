//! The long-polling transport (DESIGN.md §5.1): a "connection" is a loop of
//! `GET /v1/poll?epoch=…&after=…&wait_ms=…&limit=…`, each answered with a JSON array of the
//! same messages as WebSocket frames, or `[]` when nothing came within `wait_ms`.
//!
//! `open` makes the first poll without waiting (`wait_ms=0`), so a refusal fails the open as
//! a refused WebSocket handshake does, and the edge and device (the `Gapless-Edge` and
//! `Gapless-Device` headers) are known at once. `next` hands out the messages of the last
//! answer one by one and polls again once they are all handed out.
//!
//! Acks: a poll's `epoch`/`after` is both where the answer starts and an ack (the edge
//! stores it like a WebSocket ack). The next poll names the last message handed out, since
//! the state machine asks for the next message only once the application asked for the
//! next event, and in this client a notification handed to the application counts as
//! processed when the application asks for the next event: what every transport's resume
//! already says after a reconnect. So [`PollConnection::ack`] sends nothing. Naming only
//! what the application acked instead would make the edge answer the unacked messages
//! again, at once and for ever, to an application that does not ack.

use std::time::Duration;

use gapless_shared::protocol::{self, ServerMessage};
use reqwest::header::HeaderValue;
use reqwest::{StatusCode, Url};
use tokio::time::Instant;

use super::{Failure, Incoming, Resume, http};
use crate::config::ClientConfig;

/// Longest wait of one poll; shorter when the edge's heartbeat is (so a vanished edge is
/// noticed within the same deadline as on the other transports).
const MAX_WAIT: Duration = Duration::from_millis(25_000);

/// Messages per answer (the edge's default).
const LIMIT: u32 = 100;

/// Largest answer read: `LIMIT` notifications of the largest payload ingest accepts fit
/// many times over; past it the edge is broken.
const MAX_ANSWER: usize = 64 << 20;

/// Empty answers in a row that come back well before their wait, after which the loop stops
/// (with the backoff of a lost connection) instead of polling in a hot loop: another poll of
/// the same device ends each of ours at once.
const MAX_QUICK_EMPTIES: u8 = 3;

/// One device's loop of long polls.
pub(crate) struct PollConnection {
    /// The shared HTTP client of this local address.
    http: reqwest::Client,
    /// `/v1/poll` of the edge, with the configured query; the position and wait are added
    /// per poll.
    url: Url,
    /// `Bearer <token>`.
    bearer: HeaderValue,
    /// `wait_ms` of every poll after the first.
    wait: Duration,
    /// Allowed past `wait` for an answer: the client's heartbeat grace.
    grace: Duration,
    /// The last answer's messages not yet handed out.
    buffered: std::vec::IntoIter<ServerMessage>,
    /// The position the next poll names: the last message handed out (else the resume).
    cursor: Resume,
    /// Empty answers in a row that came back before half their wait.
    quick_empties: u8,
}

impl PollConnection {
    /// Makes the first poll at `resume`. Returns the edge and device the answer names.
    pub(crate) async fn open(
        config: &ClientConfig,
        url: &str,
        resume: Resume,
    ) -> Result<(Self, String, String), Failure> {
        let mut conn = Self {
            http: http::client(config)?,
            url: http::endpoint(url, "/v1/poll")?,
            bearer: http::bearer(config)?,
            wait: Duration::ZERO,
            grace: config.heartbeat_grace,
            buffered: Vec::new().into_iter(),
            cursor: resume,
            quick_empties: 0,
        };
        let answer = conn.poll(Duration::ZERO, config.connect_timeout).await?;
        let header = |name: &str| {
            answer
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let (Some(edge), Some(device)) = (header("gapless-edge"), header("gapless-device")) else {
            return Err(Failure::protocol(
                "the poll answer names no Gapless-Edge and Gapless-Device",
            ));
        };
        let heartbeat = header("gapless-heartbeat-ms")
            .and_then(|h| h.parse().ok())
            .map_or(MAX_WAIT, Duration::from_millis);
        conn.wait = heartbeat.min(MAX_WAIT);
        conn.buffered = answer.messages.into_iter();
        Ok((conn, edge, device))
    }

    /// Acks travel with the next poll (see the module docs): nothing to send.
    pub(crate) fn ack(&mut self, _seq: u64) {}

    /// The next notification or reset: buffered, else from the next poll (polling again
    /// after empty answers).
    pub(crate) async fn next(&mut self) -> Result<Incoming, Failure> {
        loop {
            for message in self.buffered.by_ref() {
                match message {
                    ServerMessage::Notification(n) => {
                        if self.cursor.epoch.as_deref() != Some(n.epoch.as_str()) {
                            self.cursor.epoch = Some(n.epoch.clone());
                            self.cursor.after = Some(n.seq);
                        } else {
                            self.cursor.after = Some(self.cursor.after.unwrap_or(0).max(n.seq));
                        }
                        return Ok(Incoming::Notification(n));
                    }
                    ServerMessage::Reset {
                        epoch,
                        first_seq,
                        reason,
                    } => {
                        self.cursor = Resume {
                            epoch: Some(epoch.clone()),
                            after: Some(first_seq.saturating_sub(1)),
                        };
                        return Ok(Incoming::Reset {
                            epoch,
                            first_seq,
                            reason,
                        });
                    }
                    ServerMessage::Ping => continue,
                    ServerMessage::Welcome { .. } => {
                        return Err(Failure::protocol("a welcome in a poll"));
                    }
                }
            }
            // Everything handed out: release the answer's memory before waiting.
            self.buffered = Vec::new().into_iter();
            let started = Instant::now();
            let answer = self.poll(self.wait, self.wait + self.grace).await?;
            if answer.messages.is_empty() && started.elapsed() < self.wait / 2 {
                self.quick_empties += 1;
                if self.quick_empties >= MAX_QUICK_EMPTIES {
                    return Err(
                        "the edge ends every poll at once (another poll of this device?)".into(),
                    );
                }
            } else {
                self.quick_empties = 0;
            }
            self.buffered = answer.messages.into_iter();
        }
    }

    /// One poll at the cursor, waiting up to `wait` for messages; the whole exchange within
    /// `timeout`.
    async fn poll(&self, wait: Duration, timeout: Duration) -> Result<Answer, Failure> {
        let mut url = self.url.clone();
        {
            let mut query = url.query_pairs_mut();
            if let Some(epoch) = &self.cursor.epoch {
                query.append_pair("epoch", epoch);
            }
            if let Some(after) = self.cursor.after {
                query.append_pair("after", &after.to_string());
            }
            query
                .append_pair("wait_ms", &wait.as_millis().to_string())
                .append_pair("limit", &LIMIT.to_string());
        }
        let exchange = async {
            let mut response = http::authorized(self.http.get(url), &self.bearer)
                .send()
                .await
                .map_err(|e| format!("poll failed: {}", http::describe(&e)))?;
            if response.status() != StatusCode::OK {
                return Err(http::refusal(response, Duration::from_secs(1)).await);
            }
            let headers = std::mem::take(response.headers_mut());
            let mut body = Vec::new();
            while let Some(chunk) = response
                .chunk()
                .await
                .map_err(|e| format!("poll answer failed: {}", http::describe(&e)))?
            {
                if body.len() + chunk.len() > MAX_ANSWER {
                    return Err(Failure::protocol(format!(
                        "poll answer longer than {MAX_ANSWER} bytes"
                    )));
                }
                body.extend_from_slice(&chunk);
            }
            let text = std::str::from_utf8(&body).map_err(|_| "poll answer is not UTF-8")?;
            let messages = protocol::from_json::<Vec<ServerMessage>>(text)
                .map_err(|e| Failure::protocol(format!("bad poll answer: {e}")))?;
            Ok(Answer { headers, messages })
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| Failure::from(format!("no poll answer within {timeout:?}")))?
    }
}

/// One poll's answer.
struct Answer {
    /// Its headers (the first poll's name the edge, the device and the heartbeat).
    headers: reqwest::header::HeaderMap,
    /// The messages, in order.
    messages: Vec<ServerMessage>,
}
