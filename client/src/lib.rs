//! gapless-client: a Rust client for the gapless edge protocol (DESIGN.md §5 and §5.1).
//!
//! It keeps the device's position (epoch and last processed seq) itself, so it can resume
//! from it on any edge after any disconnect; drops the duplicates at-least-once delivery may
//! bring; acks what the application processed; watches heartbeats; reconnects with
//! exponential backoff and full jitter; and surfaces `reset` to the application.
//!
//! It speaks every transport of the edge ([`Transport`]): the WebSocket, Server-Sent Events
//! and long-polling. `config` holds how it connects ([`ClientConfig`]); `connection` one
//! module per transport behind one `Connection` the state machine here drives; the state
//! machine (position, duplicates, gaps, resets, backoff) is the same for all three, and
//! every disconnect says why ([`Disconnect`], in `disconnect`).
//!
//! ```no_run
//! # async fn demo() {
//! use gapless_client::{Client, ClientConfig, Event};
//! let config = ClientConfig::new(vec!["ws://127.0.0.1:8080/v1/ws".into()], "<jwt>".into());
//! // Or over SSE (`http://127.0.0.1:8080/v1/sse`, derived from the same URL):
//! // config.transport = gapless_client::Transport::Sse;
//! let mut client = Client::new(config, None);
//! loop {
//!     match client.next_event().await {
//!         Event::Notification(n) => {
//!             println!("{} {}", n.seq, n.payload);
//!             client.ack(n.seq); // processed: the edge may forget it
//!         }
//!         Event::Reset { first_seq, .. } => println!("history lost before {first_seq}"),
//!         other => println!("{other:?}"),
//!     }
//! }
//! # }
//! ```
#![forbid(unsafe_code)]

mod config;
mod connection;
mod disconnect;

use std::time::Duration;

use gapless_shared::protocol::{Notification, ResetReason};
use rand::Rng;

pub use config::{ClientConfig, Transport};
pub use disconnect::Disconnect;
pub use gapless_shared::protocol::Codec;

use connection::{Connection, Failure, Incoming, Resume};

/// Where the device stands: the epoch of its log and the last seq it processed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Position {
    /// Epoch; `None` before the first notification.
    pub epoch: Option<String>,
    /// Last processed seq within `epoch`.
    pub seq: u64,
}

/// What the application sees.
#[derive(Debug, Clone)]
pub enum Event {
    /// Connected and resumed on `edge`.
    Connected {
        /// The edge.
        edge: String,
        /// The device id the edge knows this client by.
        device: String,
    },
    /// The next notification, in order, never one already delivered.
    Notification(Notification),
    /// The edge could not serve the exact gap; notifications go on from `first_seq`.
    Reset {
        /// The current epoch.
        epoch: String,
        /// The first seq that follows.
        first_seq: u64,
        /// Why.
        reason: ResetReason,
    },
    /// The connection ended; the client reconnects by itself after `retry_in`.
    Disconnected {
        /// What happened.
        reason: Disconnect,
        /// Delay before the next attempt.
        retry_in: Duration,
    },
}

/// Counters of what the client absorbed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Notifications delivered to the application.
    pub delivered: u64,
    /// Duplicates dropped (seq already delivered).
    pub duplicates: u64,
    /// Gaps the client detected itself (a seq past the next): it reconnected to resume.
    pub gaps: u64,
    /// Connections established.
    pub connects: u64,
}

/// A gapless client. Drive it with [`next_event`](Self::next_event).
pub struct Client {
    /// How to connect.
    config: ClientConfig,
    /// Last notification delivered to the application.
    position: Position,
    /// Highest seq acked to the edge.
    acked: u64,
    /// Highest seq the application acked, to send at the next chance.
    ack_wanted: u64,
    /// The current connection; `None` between connections.
    conn: Option<Connection>,
    /// Failed attempts in a row, for the backoff.
    failures: u32,
    /// A delay the server asked for (drain hint: WebSocket close 1012, SSE `reconnect`),
    /// used once.
    server_delay: Option<Duration>,
    /// Resumed at least once: from then on a client without an epoch resumes with
    /// `after: 0`, so the edge continues from where this device started, not from a later
    /// live end.
    started: bool,
    /// What was absorbed.
    stats: Stats,
}

impl Client {
    /// A client starting from `start` (`None`: let the edge use the stored ack, else the
    /// live end).
    pub fn new(config: ClientConfig, start: Option<Position>) -> Self {
        Self {
            config,
            position: start.unwrap_or_default(),
            acked: 0,
            ack_wanted: 0,
            conn: None,
            failures: 0,
            server_delay: None,
            started: false,
            stats: Stats::default(),
        }
    }

    /// The device's position.
    pub fn position(&self) -> &Position {
        &self.position
    }

    /// What the client absorbed so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Marks everything up to `seq` processed; sent with the next read or write (WebSocket:
    /// an `ack` frame; SSE: `POST /v1/ack`, at most one in flight, the latest seq when it
    /// lands). Over long-polling the next poll's position acknowledges instead, and it names
    /// every notification handed out before the application asked for the next event: there,
    /// asking for the next event acknowledges (as the position of every reconnect's resume
    /// does on all transports).
    pub fn ack(&mut self, seq: u64) {
        self.ack_wanted = self.ack_wanted.max(seq.min(self.position.seq));
    }

    /// Drops the connection now without a close frame (HTTP transports: drops the request),
    /// as a vanished network does; the next call reconnects.
    pub fn disconnect(&mut self) {
        self.conn = None;
    }

    /// Closes the connection cleanly (WebSocket: close frame 1000; SSE: lets the ack in
    /// flight land, then ends the stream; poll: ends the held poll); the next call
    /// reconnects.
    pub async fn close(&mut self) {
        if let Some(conn) = self.conn.take() {
            conn.close().await;
        }
    }

    /// Resets the TCP connection (RST), as a crashed device or middlebox does; the next call
    /// reconnects. For simulations. Over SSE and poll the request is dropped, which closes
    /// its TCP connection without a reset (the HTTP client holds the socket).
    pub fn abort(&mut self) {
        if let Some(conn) = self.conn.take() {
            conn.abort();
        }
    }

    /// The next event. Reconnects as needed; never returns an error: failures become
    /// [`Event::Disconnected`] and a retry.
    pub async fn next_event(&mut self) -> Event {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                match self.open().await {
                    Ok(event) => return event,
                    Err(reason) => return self.lost(reason),
                }
            };
            if self.ack_wanted > self.acked {
                let seq = self.ack_wanted;
                if let Err(e) = conn.ack(seq).await {
                    return self.lost(e);
                }
                self.acked = seq;
            }
            match conn.next().await {
                Err(e) => return self.lost(e),
                Ok(Incoming::Closed {
                    code,
                    reason,
                    retry_in,
                }) => {
                    self.server_delay = retry_in;
                    return self.lost(Disconnect::Closed { code, reason }.into());
                }
                Ok(Incoming::Reset {
                    epoch,
                    first_seq,
                    reason,
                }) => {
                    self.position = Position {
                        epoch: Some(epoch.clone()),
                        seq: first_seq.saturating_sub(1),
                    };
                    self.acked = self.acked.min(self.position.seq);
                    self.ack_wanted = self.ack_wanted.min(self.position.seq);
                    return Event::Reset {
                        epoch,
                        first_seq,
                        reason,
                    };
                }
                Ok(Incoming::Notification(n)) => {
                    let same_epoch = self.position.epoch.as_deref() == Some(n.epoch.as_str());
                    if same_epoch && n.seq <= self.position.seq {
                        self.stats.duplicates += 1;
                        continue;
                    }
                    if same_epoch && n.seq != self.position.seq + 1 {
                        // The edge promises contiguous seqs: a jump is a fault somewhere.
                        // Resume from what we have rather than skip.
                        self.stats.gaps += 1;
                        return self.lost(
                            Disconnect::Gap {
                                expected: self.position.seq + 1,
                                got: n.seq,
                            }
                            .into(),
                        );
                    }
                    if !same_epoch {
                        if self.position.epoch.is_some() {
                            // A new epoch without a reset first would be an edge fault.
                            self.stats.gaps += 1;
                            return self
                                .lost(Disconnect::EpochWithoutReset { epoch: n.epoch }.into());
                        }
                        self.position.epoch = Some(n.epoch.clone());
                        // A first notification of seq 0 would break the edge's promise
                        // (seqs start at 1); nothing before it can be acknowledged.
                        self.acked = n.seq.saturating_sub(1);
                        self.ack_wanted = self.acked;
                    }
                    self.position.seq = n.seq;
                    self.stats.delivered += 1;
                    return Event::Notification(n);
                }
            }
        }
    }

    async fn open(&mut self) -> Result<Event, Failure> {
        let Some(url) = pick(&self.config.urls) else {
            return Err(Failure::config("no edge URL configured"));
        };
        let resume = match (&self.position.epoch, self.started) {
            (Some(epoch), _) => Resume {
                epoch: Some(epoch.clone()),
                after: Some(self.position.seq),
            },
            (None, true) => Resume {
                epoch: None,
                after: Some(0),
            },
            (None, false) => Resume::default(),
        };
        let (conn, edge, device) = Connection::open(&self.config, &url, resume).await?;
        self.conn = Some(conn);
        self.failures = 0;
        self.started = true;
        // The edge counts an explicit resume position as acknowledged.
        self.acked = if self.position.epoch.is_some() {
            self.position.seq
        } else {
            0
        };
        self.stats.connects += 1;
        Ok(Event::Connected { edge, device })
    }

    /// Drops the connection and says when the next attempt comes: the edge's drain hint
    /// once, else the backoff, after at least a refusal's `Retry-After` (jittered by the
    /// backoff, so refused clients do not all come back at once).
    fn lost(&mut self, failure: Failure) -> Event {
        self.conn = None;
        self.failures = self.failures.saturating_add(1);
        let jittered = || {
            backoff(
                self.config.backoff_min,
                self.config.backoff_max,
                self.failures,
            )
        };
        let retry_in = match (self.server_delay.take(), failure.retry_after) {
            (Some(hint), _) => hint,
            (None, Some(after)) => after + jittered(),
            (None, None) => jittered(),
        };
        Event::Disconnected {
            reason: failure.reason,
            retry_in,
        }
    }

    /// Waits out a [`Event::Disconnected`]'s delay (a convenience for simple loops).
    pub async fn wait(retry_in: Duration) {
        tokio::time::sleep(retry_in).await;
    }
}

/// Full-jitter exponential backoff: uniform in [0, min(max, min * 2^(attempt-1))].
pub fn backoff(min: Duration, max: Duration, attempt: u32) -> Duration {
    let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(20));
    let bound = min.saturating_mul(factor).min(max);
    let ms = bound.as_millis() as u64;
    Duration::from_millis(rand::thread_rng().gen_range(0..=ms))
}

fn pick(urls: &[String]) -> Option<String> {
    if urls.is_empty() {
        return None;
    }
    Some(urls[rand::thread_rng().gen_range(0..urls.len())].clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded_and_grows() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(2));
        for attempt in 1..40 {
            let d = backoff(min, max, attempt);
            let bound = (100u64 << (attempt - 1).min(20)).min(2000);
            assert!(d.as_millis() as u64 <= bound, "{attempt}: {d:?}");
        }
    }
}
