//! The transport-independent delivery core (DESIGN.md §1.3–1.5, §5, §5.1): where a device
//! starts, replay in pages, live hints, resets, acks and the slow-consumer deadline. Every
//! transport (`transport::{ws, sse, poll}`) drives it the same way: it opens a session
//! ([`open`]), says where the client asked to start ([`Resume`]) with the position read made
//! before registering ([`read_position`]), runs [`deliver`] with its [`Inbound`] side, and
//! ends with [`finish`]. What the core hands out are [`Out`] items on a bounded channel; the
//! transport renders them (frames, SSE events, a JSON array) and owns the socket.
//!
//! Delivery is driven by one number, `sent` (the last seq handed to the transport, within
//! `epoch`), and the stream is the truth. Wakeup hints only say the log moved: a hint whose
//! payload is exactly the next seq is sent as is, anything else makes the session read the
//! stream from `sent + 1`. So the seam between replay and live delivery cannot gap, repeat or
//! reorder: both paths extend the same `sent`.
//!
//! The channel to the transport is the flow control of a replay: a transport that takes
//! nothing for the slow-consumer timeout while messages wait ends the session (1013 on a
//! WebSocket), and its notifications wait in the stream for its resume.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use gapless_shared::ids::UserId;
use gapless_shared::presence;
use gapless_shared::protocol::{
    ClientMessage, DrainHint, Notification, ResetReason, ServerMessage, close,
};
use gapless_shared::store::StoreError;
use gapless_shared::wakeup::WakeItem;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::frame::Violation;
use crate::hub::{CloseReason, Closing, Conn, Kind, Out};
use crate::reader::{Page, ReadOp};
use crate::state::{EdgeState, TransportMetrics};

/// How a session ended, for logs and metrics.
#[derive(Debug)]
pub enum End {
    /// The client closed, the socket ended, or (poll) the request was answered.
    ClientGone,
    /// The client broke the protocol.
    Violation(Violation),
    /// The edge closed it.
    Closed(CloseReason),
    /// The transport is gone (socket failed).
    WriterGone,
}

impl End {
    /// Label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            End::ClientGone => "client_closed",
            End::Violation(_) => "protocol_violation",
            End::Closed(reason) => reason.label(),
            End::WriterGone => "write_failed",
        }
    }

    /// What the client is told on the way out; `None` when it cannot hear it.
    pub fn closing(&self) -> Option<Closing> {
        let (code, reason, reconnect_ms) = match self {
            End::Violation(v) => (v.code, v.reason.clone(), None),
            End::Closed(CloseReason::Draining(ms)) => (
                close::RESTART,
                DrainHint {
                    reconnect_in_ms: *ms,
                }
                .reason(),
                Some(*ms),
            ),
            End::Closed(CloseReason::HeartbeatTimeout) => (
                close::POLICY,
                "no frame from the client for two heartbeat intervals".to_owned(),
                None,
            ),
            End::Closed(CloseReason::SlowConsumer) => (
                close::TRY_AGAIN,
                "slow consumer: the client took nothing in time; resume later".to_owned(),
                None,
            ),
            End::Closed(CloseReason::Replaced) => (
                close::REPLACED,
                "replaced by a newer connection of this device".to_owned(),
                None,
            ),
            End::Closed(CloseReason::WriteFailed) | End::WriterGone | End::ClientGone => {
                return None;
            }
        };
        Some(Closing {
            code,
            reason,
            reconnect_ms,
        })
    }
}

/// The client's side of a connection, as the core sees it.
pub trait Inbound: Send {
    /// The next protocol message from the client (a WebSocket's acks and pongs), or how the
    /// connection ended. Transports without a way back (SSE, poll) only ever end. Must be
    /// cancel-safe: it is polled in a `select!`.
    fn next(&mut self) -> impl Future<Output = Result<ClientMessage, End>> + Send;
}

/// Where the client asked to start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resume {
    /// The epoch of the client's position.
    pub epoch: Option<String>,
    /// The last seq it processed.
    pub after: Option<u64>,
}

/// A session's shared state and its channel to the transport. The receiver goes to the
/// transport; the session holds the only strong sender (see [`Conn::outbound`]).
pub fn open(
    state: &EdgeState,
    user: UserId,
    device: String,
    kind: Kind,
) -> (Arc<Conn>, mpsc::Sender<Out>, mpsc::Receiver<Out>) {
    let (tx, rx) = mpsc::channel(state.config.outbound_queue);
    let conn = Arc::new(Conn::new(
        state.hub.next_id(),
        user,
        device,
        kind,
        tx.downgrade(),
    ));
    state.hot.of(kind).connects.increment(1);
    state.tally.opened[kind.index()].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tracing::debug!(user = %conn.user, device = conn.device, transport = kind.label(), "client connected");
    (conn, tx, rx)
}

/// Ends a session: tells the client why (best effort, the transport may be stuck on a
/// client that reads nothing), counts it, leaves the hub and asks for the ack flush. A
/// WebSocket or SSE connection that was its user's last here leaves the registry; a poll
/// keeps its user's lease until it expires, so the user's next poll (and any device of it
/// between two polls) is still woken here at once.
pub async fn finish(state: &EdgeState, conn: &Conn, tx: mpsc::Sender<Out>, end: &End) {
    if let Some(closing) = end.closing() {
        let _ =
            tokio::time::timeout(Duration::from_millis(200), tx.send(Out::close(closing))).await;
    }
    drop(tx);
    match end {
        End::ClientGone => {
            tracing::debug!(user = %conn.user, device = conn.device, transport = conn.kind.label(), "client disconnected")
        }
        other => {
            tracing::debug!(user = %conn.user, device = conn.device, transport = conn.kind.label(), end = ?other, "connection closed")
        }
    }
    state.tally.ended[conn.kind.index()].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    metrics::counter!(
        "gapless_edge_disconnects_total",
        "reason" => end.label(),
        "transport" => conn.kind.label()
    )
    .increment(1);
    // A poll's entry stays for its `until` (the device polls again at once), like its lease.
    if conn.kind != Kind::Poll {
        state
            .registry
            .leave(conn.user.clone(), presence_field(state, conn));
    }
    if state.hub.remove(conn) && conn.kind != Kind::Poll {
        state.registry.remove(conn.user.clone());
    }
    state.acks.flush_soon();
}

/// The connection's field in its user's presence hash.
fn presence_field(state: &EdgeState, conn: &Conn) -> String {
    match conn.kind {
        Kind::Poll => presence::poll_field(&state.config.edge_id, &conn.device),
        _ => presence::field(&state.config.edge_id, conn.id),
    }
}

/// Records the connection in its user's presence hash (DESIGN.md §4, presence); a long-poll
/// device counts as connected for one lease after each poll begins.
fn join_presence(state: &EdgeState, conn: &Conn) {
    let now = gapless_shared::now_ms();
    let entry = presence::Entry {
        device: conn.device.clone(),
        edge: state.config.edge_id.clone(),
        transport: conn.kind.name().to_owned(),
        since: now,
        until: (conn.kind == Kind::Poll).then(|| now + state.config.lease.as_millis() as u64),
    };
    state
        .registry
        .join(conn.user.clone(), presence_field(state, conn), &entry);
}

/// Where delivery stands, and what is queued to go out.
struct Delivery {
    /// Epoch `sent` belongs to; `None` while the client has no position and no log exists.
    epoch: Option<String>,
    /// Last seq handed to the writer.
    sent: u64,
    /// Highest cumulative ack.
    acked: u64,
    /// Highest seq known to exist in `epoch` (from hints and reads).
    target: u64,
    /// The stream must be read from the next seq (hint gap, overflow, unknown epoch…).
    must_read: bool,
    /// A hint asked for a read while one was in flight: that read may predate what the hint
    /// announced (a log created, an epoch changed), so its page must not end the reading.
    reread: bool,
    /// A reset to announce before the next notification.
    pending_reset: Option<ResetReason>,
    /// After a reset, acks of the old numbering may still be in flight: tolerate, once.
    tolerate_stale_ack: bool,
    /// Messages ready for the writer, in order.
    queue: VecDeque<ServerMessage>,
    /// Still reading what the client missed (for metrics).
    replaying: bool,
    /// The last seq queued by the replay: what is sent up to it counts as replayed, not
    /// live, even when it goes out after the replay's reading ended.
    replay_through: u64,
    /// Earliest time of the next read after a Redis failure.
    retry_at: Option<Instant>,
}

impl Delivery {
    /// Nowhere yet: [`deliver`] sets the start.
    fn new() -> Self {
        Self {
            epoch: None,
            sent: 0,
            acked: 0,
            target: 0,
            must_read: false,
            reread: false,
            pending_reset: None,
            tolerate_stale_ack: false,
            queue: VecDeque::new(),
            replaying: true,
            replay_through: 0,
            retry_at: None,
        }
    }

    /// Seq of the last notification queued or sent.
    fn last_queued(&self) -> u64 {
        self.queue
            .iter()
            .rev()
            .find_map(|m| match m {
                ServerMessage::Notification(n) => Some(n.seq),
                _ => None,
            })
            .unwrap_or(self.sent)
    }

    /// Books a message the transport has just taken: the position it moves to, and the
    /// delivery or reset metrics.
    fn handed(
        &mut self,
        msg: &ServerMessage,
        state: &EdgeState,
        conn: &Conn,
        metrics: &TransportMetrics,
    ) {
        match msg {
            ServerMessage::Notification(n) => {
                self.sent = n.seq;
                state.tally.delivered.fetch_add(1, Ordering::Relaxed);
                if n.seq <= self.replay_through {
                    metrics.delivered_replay.increment(1);
                } else {
                    // Live only: a replay's age is how long the device was away.
                    metrics.delivered_live.increment(1);
                    let latency = gapless_shared::now_ms().saturating_sub(n.ts) as f64 / 1000.0;
                    state.hot.delivery_latency.record(latency);
                    state.tally.latency.record(latency);
                }
            }
            ServerMessage::Reset {
                first_seq, reason, ..
            } => {
                // Nothing before first_seq can be acked in the numbering that follows.
                self.sent = first_seq.saturating_sub(1);
                self.acked = self.sent;
                self.tolerate_stale_ack = true;
                let label = match reason {
                    ResetReason::GapTrimmed => "gap_trimmed",
                    ResetReason::EpochChanged => "epoch_changed",
                };
                metrics::counter!(
                    "gapless_edge_resets_total",
                    "reason" => label,
                    "transport" => conn.kind.label()
                )
                .increment(1);
            }
            _ => {}
        }
    }

    /// Applies wakeup hints. `reading` says a stream read is in flight, whose result may
    /// already hold what a hint carries: then hints only move the target.
    fn apply_hints(&mut self, items: VecDeque<WakeItem>, overflowed: bool, reading: bool) {
        let asked = self.must_read;
        self.apply_hints_inner(items, overflowed, reading);
        if reading && self.must_read && !asked {
            self.reread = true;
        }
    }

    fn apply_hints_inner(&mut self, items: VecDeque<WakeItem>, overflowed: bool, reading: bool) {
        if overflowed {
            self.must_read = true;
        }
        for item in items {
            if self.epoch.as_deref() != Some(item.epoch.as_str()) {
                let fresh = self.epoch.is_none() && self.sent == 0 && self.queue.is_empty();
                if fresh && !reading && !self.must_read {
                    // A client without a position, connected before the log existed: the new
                    // log is simply where it starts.
                    self.epoch = Some(item.epoch.clone());
                } else {
                    self.must_read = true;
                    continue;
                }
            }
            self.target = self.target.max(item.seq);
            let next = self.last_queued() + 1;
            match item.payload {
                Some(payload) if item.seq == next && !reading && !self.must_read => {
                    match RawValue::from_string(payload) {
                        Ok(payload) => {
                            self.queue
                                .push_back(ServerMessage::Notification(Notification {
                                    seq: item.seq,
                                    epoch: item.epoch,
                                    ts: item.ts,
                                    payload,
                                }))
                        }
                        Err(_) => self.must_read = true,
                    }
                }
                _ if item.seq >= next => self.must_read = true,
                _ => {}
            }
        }
    }

    /// Applies a page read from `sent + 1`.
    fn apply_page(&mut self, page: Page, page_size: usize) {
        let reread = std::mem::take(&mut self.reread);
        let Some(current) = page.epoch else {
            // No log (never created, or gone): nothing to send until one appears, which a
            // hint or the sweep will announce (unless one did during this read).
            self.must_read = reread;
            return;
        };
        if self.epoch.as_deref() != Some(current.as_str()) {
            if self.epoch.is_some() {
                self.pending_reset = Some(ResetReason::EpochChanged);
            }
            self.epoch = Some(current);
            self.sent = 0;
            self.target = page.last_seq;
            self.must_read = true;
            return;
        }
        if page.last_seq < self.sent {
            // The client is ahead of the log (a position from a log that lost its tail): its
            // numbering no longer holds, start it over.
            self.pending_reset = Some(ResetReason::EpochChanged);
            self.sent = 0;
            self.target = page.last_seq;
            self.must_read = true;
            return;
        }
        self.target = self.target.max(page.last_seq);
        let full = page.entries.len() >= page_size;
        match page.entries.first() {
            Some(first) if first.seq > self.sent + 1 => {
                self.pending_reset.get_or_insert(ResetReason::GapTrimmed);
                self.sent = first.seq - 1;
            }
            None if page.last_seq > self.sent => {
                // Everything after `sent` is gone from the stream.
                self.pending_reset.get_or_insert(ResetReason::GapTrimmed);
                self.sent = page.last_seq;
            }
            _ => {}
        }
        let epoch = self.epoch.clone().unwrap_or_default();
        if let Some(reason) = self.pending_reset.take() {
            self.queue.push_back(ServerMessage::Reset {
                epoch: epoch.clone(),
                first_seq: self.sent + 1,
                reason,
            });
        }
        let mut last = self.sent;
        for entry in page.entries {
            if entry.seq != last + 1 {
                // A hole inside the stream cannot come from the append; stop here and read
                // again from the last contiguous seq.
                break;
            }
            last = entry.seq;
            self.queue
                .push_back(ServerMessage::Notification(Notification {
                    seq: entry.seq,
                    epoch: epoch.clone(),
                    ts: entry.ts,
                    payload: entry.payload,
                }));
        }
        self.must_read = full || last < self.target || reread;
        if self.replaying {
            self.replay_through = last;
        }
        if !self.must_read {
            self.replaying = false;
        }
    }
}

/// Delivers the user's stream to the session until it ends: registers it (hub, then the
/// registry lease), starts where [`resume_start`] says, then replays and follows the log.
/// `position` must have been read before this call: an append after the registration wakes
/// the session, and one before it is in a read made after `position`, so even a device
/// starting at the live end misses nothing. `assigned` says the edge made the device id up
/// (the client named none): such a device's position is stored only once it acks, so a
/// client that never names its device leaves nothing behind in Redis.
pub async fn deliver<I: Inbound>(
    state: &EdgeState,
    conn: &Arc<Conn>,
    tx: &mpsc::Sender<Out>,
    inbound: &mut I,
    position: Page,
    resume: Resume,
    assigned: bool,
) -> End {
    let config = &state.config;
    let metrics = state.hot.of(conn.kind);
    let (mut d, mut start_stored) = start(state, conn, &position, resume, assigned).await;

    let mut reading: Option<oneshot::Receiver<Result<Page, StoreError>>> = None;
    // Last time the transport took a message, or the queue was empty.
    let mut progress_at = Instant::now();
    loop {
        if let Some(reason) = conn.close_requested() {
            return End::Closed(reason);
        }
        if !start_stored && let Some(epoch) = &d.epoch {
            state.acks.record(&conn.user, &conn.device, epoch, d.acked);
            start_stored = true;
        }
        if d.queue.is_empty() {
            progress_at = Instant::now();
        }
        let retry_wait = d.retry_at.filter(|t| *t > Instant::now());
        // One timer for both deadlines: every timer is stored inline in each session's future,
        // and the timer is only made when a deadline is set.
        let slow_at = (!d.queue.is_empty()).then(|| progress_at + config.slow_consumer);
        let timer_at = match (slow_at, retry_wait) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if d.must_read && d.queue.is_empty() && reading.is_none() && retry_wait.is_none() {
            reading = Some(state.reader.request(ReadOp::Range {
                user: conn.user.clone(),
                from: d.sent + 1,
                count: config.replay_page,
            }));
        }
        tokio::select! {
            biased;
            () = conn.wake.notified() => {
                let hints = conn.take_hints();
                d.apply_hints(hints.items, hints.overflowed, reading.is_some());
            }
            msg = inbound.next() => match msg {
                Err(end) => return end,
                Ok(ClientMessage::Pong) => {}
                Ok(ClientMessage::Ack { seq }) => {
                    if let Err(v) = ack(state, conn, &mut d, seq) {
                        return End::Violation(v);
                    }
                }
                Ok(ClientMessage::Resume { .. }) => {
                    return End::Violation(Violation::new(
                        close::POLICY,
                        "resume may be sent once, right after welcome",
                    ));
                }
            },
            page = async { reading.as_mut().expect("guarded by is_some").await }, if reading.is_some() => {
                reading = None;
                match page {
                    Ok(Ok(page)) => {
                        d.retry_at = None;
                        d.apply_page(page, config.replay_page);
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "stream read failed; retrying");
                        d.retry_at = Some(Instant::now() + Duration::from_millis(250));
                    }
                    Err(_) => d.retry_at = Some(Instant::now() + Duration::from_millis(250)),
                }
            }
            permit = tx.reserve(), if !d.queue.is_empty() => {
                let Ok(permit) = permit else { return End::WriterGone };
                let msg = d.queue.pop_front().expect("guarded by !is_empty");
                d.handed(&msg, state, conn, metrics);
                permit.send(Out::message(msg));
                progress_at = Instant::now();
                conn.set_position(d.epoch.as_deref(), d.sent);
            }
            () = async { tokio::time::sleep_until(timer_at.expect("guarded by is_some")).await }, if timer_at.is_some() => {
                // The transport took nothing for the slow-consumer timeout; else a retry is due.
                if slow_at.is_some_and(|t| Instant::now() >= t) {
                    return End::Closed(CloseReason::SlowConsumer);
                }
            }
        }
    }
}

/// Registers the session (hub, presence, then the registry lease) and sets where its
/// delivery starts: after the client's position where [`resume_start`] accepts it, else at
/// the live end as of `position`. Also says whether that start is stored already: a device
/// starting before its user has a log adopts the log's first epoch from seq 0 when it
/// appears (perhaps from the hints taken here), and that start is stored like any ack once
/// it is known, so an app that restarts before acking anything (and so resumes without a
/// position) gets the log from its first entry rather than from a later live end.
async fn start(
    state: &EdgeState,
    conn: &Arc<Conn>,
    position: &Page,
    resume: Resume,
    assigned: bool,
) -> (Delivery, bool) {
    let mut d = Delivery::new();
    // Every session waits for its user's lease, not only the user's first here: a second
    // device whose first read ran while the first device's lease was still being written
    // would miss a wakeup for an append made in between, and wait for the sweep.
    state.hub.add(conn.clone());
    join_presence(state, conn);
    state.registry.add(conn.user.clone()).await;
    match resume_start(resume.epoch, resume.after, position) {
        Some((epoch, after)) => {
            d.epoch = Some(epoch);
            d.sent = after;
            d.acked = after;
            d.target = after;
            d.must_read = true;
        }
        None => {
            // A new device starts at the live end as of the position read; what was appended
            // since (before the registration took effect) is read right away. The start is
            // stored as the device's ack position, so a reconnect before its first
            // notification resumes from here rather than from a later live end.
            d.epoch = position.epoch.clone();
            d.sent = position.last_seq;
            d.acked = position.last_seq;
            d.target = position.last_seq;
            d.must_read = true;
            d.replaying = false;
            match &d.epoch {
                _ if assigned => {}
                Some(epoch) => state.acks.record(&conn.user, &conn.device, epoch, d.sent),
                None => state.acks.record_start(&conn.user, &conn.device),
            }
        }
    }
    conn.set_position(d.epoch.as_deref(), d.sent);
    let start_stored = d.epoch.is_some() || assigned;
    // Hints that arrived while the position was read.
    let hints = conn.take_hints();
    d.apply_hints(hints.items, hints.overflowed, false);
    (d, start_stored)
}

/// Reads the log's state and the device's stored ack, retrying while Redis is unavailable
/// (the client waits, connected; only a close request ends the wait).
pub async fn read_position(state: &EdgeState, conn: &Arc<Conn>) -> Result<Page, End> {
    loop {
        let mut rx = state.reader.request(ReadOp::Position {
            user: conn.user.clone(),
            device: conn.device.clone(),
        });
        let answer = loop {
            tokio::select! {
                r = &mut rx => break r,
                () = conn.wake.notified() => {
                    if let Some(reason) = conn.close_requested() {
                        return Err(End::Closed(reason));
                    }
                }
            }
        };
        match answer {
            Ok(Ok(page)) => return Ok(page),
            Ok(Err(e)) => tracing::debug!(error = %e, "position read failed; retrying"),
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        if let Some(reason) = conn.close_requested() {
            return Err(End::Closed(reason));
        }
    }
}

/// Reads the log's state and the device's stored ack once, within the Redis timeout: for
/// HTTP requests, which answer 503 rather than wait.
pub async fn read_position_once(
    state: &EdgeState,
    user: &UserId,
    device: &str,
) -> Result<Page, StoreError> {
    let rx = state.reader.request(ReadOp::Position {
        user: user.clone(),
        device: device.to_owned(),
    });
    match tokio::time::timeout(state.config.redis.command_timeout, rx).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(_)) => Err(StoreError::stopped("the reader")),
        Err(_) => Err(StoreError::timeout(state.config.redis.command_timeout)),
    }
}

/// Where a resuming device starts, from what it sent and what Redis holds (DESIGN.md §1.5):
/// an explicit (epoch, after); `after` alone (a device that connected before but never got
/// a notification, so knows no epoch): its stored position in the current epoch if there is
/// one, else `after` in the current epoch; nothing: its stored position. `None` means the
/// live end.
pub fn resume_start(
    epoch: Option<String>,
    after: Option<u64>,
    position: &Page,
) -> Option<(String, u64)> {
    let stored = position
        .ack
        .clone()
        .filter(|(e, _)| Some(e) == position.epoch.as_ref());
    match (epoch, after) {
        (Some(epoch), after) => Some((epoch, after.unwrap_or(0))),
        (None, Some(after)) => match stored {
            Some((e, seq)) => Some((e, seq.max(after))),
            None => position.epoch.clone().map(|e| (e, after)),
        },
        // A start marker (`:0`, stored when the device connected before any log existed):
        // the start of the log, whichever one exists now.
        (None, None) => match position.ack.clone() {
            Some((e, _)) if e.is_empty() => position.epoch.clone().map(|e| (e, 0)),
            stored => stored,
        },
    }
}

/// Applies a cumulative ack.
fn ack(state: &EdgeState, conn: &Conn, d: &mut Delivery, seq: u64) -> Result<(), Violation> {
    if seq > d.sent {
        if d.tolerate_stale_ack {
            d.tolerate_stale_ack = false;
            return Ok(());
        }
        return Err(Violation::new(
            close::POLICY,
            format!("ack {seq} is beyond the last seq sent ({})", d.sent),
        ));
    }
    d.tolerate_stale_ack = false;
    state.hot.of(conn.kind).acks.increment(1);
    if seq > d.acked {
        d.acked = seq;
        if let Some(epoch) = &d.epoch {
            state.acks.record(&conn.user, &conn.device, epoch, seq);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reader::Entry;

    fn delivery(epoch: Option<&str>, sent: u64) -> Delivery {
        Delivery {
            epoch: epoch.map(str::to_owned),
            sent,
            acked: sent,
            target: sent,
            must_read: true,
            ..Delivery::new()
        }
    }

    fn page(epoch: &str, last_seq: u64, seqs: impl IntoIterator<Item = u64>) -> Page {
        Page {
            epoch: Some(epoch.to_owned()),
            last_seq,
            entries: seqs
                .into_iter()
                .map(|seq| Entry {
                    seq,
                    ts: 1,
                    payload: RawValue::from_string(seq.to_string()).expect("json"),
                })
                .collect(),
            ack: None,
        }
    }

    fn hint(epoch: &str, seq: u64, payload: Option<&str>) -> WakeItem {
        WakeItem {
            user: "u".into(),
            epoch: epoch.into(),
            seq,
            ts: 1,
            payload: payload.map(str::to_owned),
        }
    }

    /// What the queue holds: notification seqs, and resets as (first_seq, reason).
    fn queued(d: &Delivery) -> Vec<String> {
        d.queue
            .iter()
            .map(|m| match m {
                ServerMessage::Notification(n) => n.seq.to_string(),
                ServerMessage::Reset {
                    first_seq, reason, ..
                } => format!("reset {first_seq} {reason:?}"),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn where_a_resume_starts() {
        let log = |epoch: Option<&str>, ack: Option<(&str, u64)>| Page {
            epoch: epoch.map(str::to_owned),
            last_seq: 9,
            entries: Vec::new(),
            ack: ack.map(|(e, s)| (e.to_owned(), s)),
        };
        let at = |e: &str, s: u64| Some((e.to_owned(), s));
        // Explicit position wins.
        assert_eq!(
            resume_start(Some("x".into()), Some(4), &log(Some("e"), Some(("e", 7)))),
            at("x", 4)
        );
        // After alone: the stored position in the current epoch, else the current epoch.
        assert_eq!(
            resume_start(None, Some(0), &log(Some("e"), Some(("e", 7)))),
            at("e", 7)
        );
        assert_eq!(
            resume_start(None, Some(0), &log(Some("e"), Some(("old", 7)))),
            at("e", 0)
        );
        assert_eq!(resume_start(None, Some(0), &log(None, None)), None);
        // Nothing: the stored position (even of another epoch: that becomes a reset), else
        // the live end.
        assert_eq!(
            resume_start(None, None, &log(Some("e"), Some(("old", 7)))),
            at("old", 7)
        );
        assert_eq!(resume_start(None, None, &log(Some("e"), None)), None);
        // A start marker from before any log: the start of the current log, else the live end.
        assert_eq!(
            resume_start(None, None, &log(Some("e"), Some(("", 0)))),
            at("e", 0)
        );
        assert_eq!(resume_start(None, None, &log(None, Some(("", 0)))), None);
    }

    #[test]
    fn a_page_continuing_the_position_is_queued_in_order() {
        let mut d = delivery(Some("e"), 3);
        d.apply_page(page("e", 6, 4..=6), 200);
        assert_eq!(queued(&d), ["4", "5", "6"]);
        assert!(!d.must_read, "caught up");
        assert!(!d.replaying);
        assert_eq!(
            d.replay_through, 6,
            "sent later, 4..=6 still count as replayed"
        );
    }

    #[test]
    fn a_full_page_or_a_known_later_seq_keeps_reading() {
        let mut d = delivery(Some("e"), 0);
        d.apply_page(page("e", 10, 1..=3), 3);
        assert!(d.must_read, "the page was full");
        let mut d = delivery(Some("e"), 0);
        d.target = 9;
        d.apply_page(page("e", 3, 1..=3), 200);
        assert!(d.must_read, "a hint announced 9");
    }

    #[test]
    fn trimmed_entries_are_announced_with_a_reset_before_delivery_goes_on() {
        let mut d = delivery(Some("e"), 5);
        d.apply_page(page("e", 300, 101..=103), 3);
        assert_eq!(queued(&d), ["reset 101 GapTrimmed", "101", "102", "103"]);
        // Everything after the position gone: the reset names the next seq to come.
        let mut d = delivery(Some("e"), 5);
        d.apply_page(page("e", 40, []), 200);
        assert_eq!(queued(&d), ["reset 41 GapTrimmed"]);
    }

    #[test]
    fn a_changed_epoch_rereads_from_the_start_and_resets() {
        let mut d = delivery(Some("old"), 17);
        d.apply_page(page("new", 4, [18]), 200);
        assert!(
            d.queue.is_empty(),
            "entries read at the old position are dropped"
        );
        assert_eq!(
            (d.epoch.as_deref(), d.sent, d.must_read),
            (Some("new"), 0, true)
        );
        d.apply_page(page("new", 4, 1..=4), 200);
        assert_eq!(queued(&d), ["reset 1 EpochChanged", "1", "2", "3", "4"]);
    }

    #[test]
    fn a_hint_during_a_read_that_predates_the_log_is_not_lost() {
        // A new user's device: the read in flight was issued before the log existed, the
        // hint of its first entry arrives meanwhile, then the read answers "no log".
        let mut d = delivery(None, 0);
        d.must_read = false;
        d.apply_hints([hint("new", 1, Some("1"))].into(), false, true);
        d.apply_page(
            Page {
                epoch: None,
                last_seq: 0,
                entries: Vec::new(),
                ack: None,
            },
            200,
        );
        assert!(d.must_read, "read again: the hint said a log appeared");
        // The next reads adopt the log, then deliver its first entry.
        d.apply_page(page("new", 1, [1]), 200);
        d.apply_page(page("new", 1, [1]), 200);
        assert_eq!(queued(&d), ["1"]);
        assert!(!d.must_read && !d.reread);
        // The same for an epoch that changed during the read.
        let mut d = delivery(Some("old"), 5);
        d.must_read = false;
        d.apply_hints([hint("new", 1, None)].into(), false, true);
        d.apply_page(page("old", 5, []), 200);
        assert!(d.must_read, "the read predates the new epoch");
    }

    #[test]
    fn a_client_without_a_position_adopts_a_new_log_silently() {
        let mut d = delivery(None, 0);
        d.apply_page(page("new", 2, []), 200);
        d.apply_page(page("new", 2, 1..=2), 200);
        assert_eq!(queued(&d), ["1", "2"]);
        let mut d = delivery(None, 0);
        d.must_read = false;
        d.apply_hints([hint("new", 1, Some("{}"))].into(), false, false);
        assert_eq!(queued(&d), ["1"]);
    }

    #[test]
    fn a_client_ahead_of_the_log_is_told_to_start_over() {
        let mut d = delivery(Some("e"), 50);
        d.apply_page(page("e", 20, []), 200);
        assert_eq!(
            (d.sent, d.pending_reset),
            (0, Some(ResetReason::EpochChanged))
        );
        d.apply_page(page("e", 20, 1..=2), 2);
        assert_eq!(queued(&d)[0], "reset 1 EpochChanged");
    }

    #[test]
    fn a_hole_inside_a_page_stops_delivery_before_it() {
        let mut d = delivery(Some("e"), 0);
        d.apply_page(page("e", 5, [1, 2, 4, 5]), 200);
        assert_eq!(queued(&d), ["1", "2"]);
        assert!(d.must_read);
    }

    #[test]
    fn hints_take_the_fast_path_only_for_the_next_seq_with_its_payload() {
        let mut d = delivery(Some("e"), 3);
        d.must_read = false;
        d.apply_hints(
            [
                hint("e", 4, Some("4")),
                hint("e", 5, Some("5")),
                hint("e", 3, Some("3")),
            ]
            .into(),
            false,
            false,
        );
        assert_eq!(queued(&d), ["4", "5"], "in order, the old one ignored");
        assert!(!d.must_read);
        d.apply_hints([hint("e", 7, Some("7"))].into(), false, false);
        assert_eq!(queued(&d), ["4", "5"], "6 is missing: read instead");
        assert!(d.must_read);
        assert_eq!(d.target, 7);
    }

    #[test]
    fn hints_without_payload_during_a_read_or_after_an_overflow_force_a_read() {
        let mut d = delivery(Some("e"), 3);
        d.must_read = false;
        d.apply_hints([hint("e", 4, None)].into(), false, false);
        assert!(d.must_read && d.queue.is_empty());
        let mut d = delivery(Some("e"), 3);
        d.must_read = false;
        d.apply_hints([hint("e", 4, Some("4"))].into(), false, true);
        assert!(
            d.must_read && d.queue.is_empty(),
            "a read in flight may hold 4 already"
        );
        let mut d = delivery(Some("e"), 3);
        d.must_read = false;
        d.apply_hints(VecDeque::new(), true, false);
        assert!(d.must_read);
        let mut d = delivery(Some("e"), 3);
        d.must_read = false;
        d.apply_hints([hint("other", 1, Some("1"))].into(), false, false);
        assert!(
            d.must_read && d.queue.is_empty(),
            "another epoch: read to find out"
        );
    }
}
