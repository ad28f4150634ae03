//! The edge's table of local connections, by user: who is connected here, and the per-connection
//! state other tasks touch (wakeup hints, heartbeat, close requests). Free of transport types:
//! a connection's outbound items are [`Out`]s, which each transport renders its own way.
//!
//! Sharded by user so the wakeup dispatcher, the sweep and connecting clients rarely meet on
//! one lock; every critical section is a map lookup or a vector push.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use gapless_shared::ids::UserId;
use gapless_shared::protocol::ServerMessage;
use gapless_shared::wakeup::WakeItem;
use tokio::sync::{Notify, mpsc};

/// Hints one connection keeps before it stops keeping them and reads the stream instead.
const MAX_HINTS: usize = 64;

/// The transport a connection uses: for metrics, the heartbeat's rules and the per-device caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `GET /v1/ws`.
    WebSocket,
    /// `GET /v1/sse`.
    Sse,
    /// A held `GET /v1/poll`.
    Poll,
}

impl Kind {
    /// Every kind, in the order of [`Kind::index`].
    pub const ALL: [Kind; 3] = [Kind::WebSocket, Kind::Sse, Kind::Poll];

    /// Label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            Kind::WebSocket => "ws",
            Kind::Sse => "sse",
            Kind::Poll => "poll",
        }
    }

    /// Name in the producer API (presence): `websocket`, `sse`, `poll`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::WebSocket => "websocket",
            Kind::Sse => "sse",
            Kind::Poll => "poll",
        }
    }

    /// Position in [`Kind::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// True when the client sends on the connection itself (acks, pongs), so silence means
    /// it is gone; SSE and poll clients only listen.
    pub fn listens_back(self) -> bool {
        self == Kind::WebSocket
    }
}

/// What a connection's transport writes, in order. Boxed: a connection's channel allocates
/// a block of slots up front, and a `ServerMessage` slot (88 bytes) made an idle WebSocket
/// cost 1.4 KiB more than the encoded frames queued before (BENCHMARKS.md); a box is 8.
#[derive(Debug, Clone, PartialEq)]
pub enum Out {
    /// A protocol message (welcome, notification, reset, ping).
    Message(Box<ServerMessage>),
    /// The last item: the edge ends the connection, saying why.
    Close(Box<Closing>),
}

impl Out {
    /// A protocol message.
    pub fn message(msg: ServerMessage) -> Self {
        Out::Message(Box::new(msg))
    }

    /// The last item.
    pub fn close(closing: Closing) -> Self {
        Out::Close(Box::new(closing))
    }

    /// The message, unless this is a ping or the close: what a poll answers with.
    pub fn into_answer(self) -> Option<ServerMessage> {
        match self {
            Out::Message(m) if *m == ServerMessage::Ping => None,
            Out::Message(m) => Some(*m),
            Out::Close(_) => None,
        }
    }
}

/// How the edge ends a connection, in transport-neutral terms: a WebSocket sends it as a
/// close frame, SSE as a final event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closing {
    /// WebSocket close code (1008, 1012, 1013, 4001, …).
    pub code: u16,
    /// Human-readable reason.
    pub reason: String,
    /// When the client should reconnect (a drain's hint), ms.
    pub reconnect_ms: Option<u64>,
}

/// Why the edge closes a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Nothing heard from the client for two heartbeat intervals.
    HeartbeatTimeout,
    /// The socket accepted nothing for the slow-consumer timeout.
    SlowConsumer,
    /// The edge is draining; reconnect after the given delay (ms).
    Draining(u64),
    /// Writing to the socket failed.
    WriteFailed,
    /// A newer connection of the same device took its place (the device's cap).
    Replaced,
}

impl CloseReason {
    /// Label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            CloseReason::HeartbeatTimeout => "heartbeat_timeout",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::Draining(_) => "draining",
            CloseReason::WriteFailed => "write_failed",
            CloseReason::Replaced => "replaced",
        }
    }
}

/// Wakeup hints waiting for a session.
#[derive(Debug, Default)]
pub struct Hints {
    /// Hints in arrival order.
    pub items: VecDeque<WakeItem>,
    /// Hints were dropped (the queue was full): the session must read the stream.
    pub overflowed: bool,
}

/// State of one connection shared between its session and the edge's other tasks.
#[derive(Debug)]
pub struct Conn {
    /// Unique within the process.
    pub id: u64,
    /// The authenticated user.
    pub user: UserId,
    /// The device.
    pub device: String,
    /// The transport.
    pub kind: Kind,
    /// Last time a frame arrived from the client, on the [`monotonic_ms`] clock.
    pub last_seen: AtomicU64,
    /// Last time frames were written to the client (or a ping queued for it), on the
    /// [`monotonic_ms`] clock: the heartbeat pings only connections quiet for most of an
    /// interval.
    pub last_sent: AtomicU64,
    /// Items to the connection's transport, for others than the session (pings). Weak: the
    /// session holds the only strong sender, so when the session ends the channel closes,
    /// the transport writes what is queued and ends. (A strong sender here kept every
    /// writer, and its socket, alive after its session had ended.)
    pub outbound: mpsc::WeakSender<Out>,
    /// Wakeup hints; bounded by [`MAX_HINTS`].
    hints: Mutex<Hints>,
    /// Wakes the session: new hints or a close request.
    pub wake: Notify,
    /// A close requested by another task (heartbeat, drain, writer).
    close: Mutex<Option<CloseReason>>,
    /// The session's delivery position (epoch, last seq handed to the writer), mirrored for
    /// the sweep.
    position: Mutex<(Option<String>, u64)>,
}

impl Conn {
    /// A connection's shared state.
    pub fn new(
        id: u64,
        user: UserId,
        device: String,
        kind: Kind,
        outbound: mpsc::WeakSender<Out>,
    ) -> Self {
        Self {
            id,
            user,
            device,
            kind,
            last_seen: AtomicU64::new(monotonic_ms()),
            last_sent: AtomicU64::new(monotonic_ms()),
            outbound,
            hints: Mutex::new(Hints::default()),
            wake: Notify::new(),
            close: Mutex::new(None),
            position: Mutex::new((None, 0)),
        }
    }

    /// Mirrors the session's position for the sweep.
    pub fn set_position(&self, epoch: Option<&str>, seq: u64) {
        let mut position = self
            .position
            .lock()
            .expect("position lock is never poisoned");
        if position.0.as_deref() != epoch {
            position.0 = epoch.map(str::to_owned);
        }
        position.1 = seq;
    }

    /// The session's position: its epoch and the last seq handed to its transport.
    pub fn position(&self) -> (Option<String>, u64) {
        self.position
            .lock()
            .expect("position lock is never poisoned")
            .clone()
    }

    /// True when the log at (`epoch`, `seq`) holds something this connection was not sent.
    pub fn is_behind(&self, epoch: &str, seq: u64) -> bool {
        let position = self
            .position
            .lock()
            .expect("position lock is never poisoned");
        position.0.as_deref() != Some(epoch) || position.1 < seq
    }

    /// Queues a hint for the session; past [`MAX_HINTS`] the queue is dropped and the session
    /// reads the stream instead, so memory stays bounded whatever the wakeup rate.
    pub fn hint(&self, item: WakeItem) {
        {
            let mut hints = self.hints.lock().expect("hint lock is never poisoned");
            if hints.items.len() >= MAX_HINTS {
                hints.items.clear();
                hints.overflowed = true;
                metrics::counter!("gapless_edge_hint_overflows_total").increment(1);
            } else if !hints.overflowed {
                hints.items.push_back(item);
            }
        }
        self.wake.notify_one();
    }

    /// Takes the queued hints.
    pub fn take_hints(&self) -> Hints {
        std::mem::take(&mut *self.hints.lock().expect("hint lock is never poisoned"))
    }

    /// Asks the session to close; the first reason wins.
    pub fn request_close(&self, reason: CloseReason) {
        let mut close = self.close.lock().expect("close lock is never poisoned");
        if close.is_none() {
            *close = Some(reason);
        }
        drop(close);
        self.wake.notify_one();
    }

    /// The requested close, if any.
    pub fn close_requested(&self) -> Option<CloseReason> {
        *self.close.lock().expect("close lock is never poisoned")
    }

    /// Records that the client was heard from.
    pub fn touch(&self) {
        self.last_seen.store(monotonic_ms(), Ordering::Relaxed);
    }

    /// Records that frames went to the client.
    pub fn mark_sent(&self) {
        self.last_sent.store(monotonic_ms(), Ordering::Relaxed);
    }
}

pub use gapless_shared::monotonic_ms;

type Shard = Mutex<HashMap<UserId, Vec<Arc<Conn>>>>;

/// Local connections by user.
pub struct Hub {
    /// Connections by user, spread over [`Hub::SHARDS`] locks.
    shards: Vec<Shard>,
    /// Sessions per user from the upgrade to their end (a session is in `shards` only once
    /// it has resumed), for the per-user cap; sharded like `shards`.
    sessions: Vec<Mutex<HashMap<UserId, usize>>>,
    /// Picks a user's shard.
    hasher: RandomState,
    /// Next connection id.
    next_id: AtomicU64,
    /// Most connections of one device; adding one more closes the oldest.
    max_per_device: usize,
}

/// A session's place in its user's cap (see [`Hub::reserve`]); released on drop.
pub struct Reservation {
    /// The hub whose count holds the place.
    hub: Arc<Hub>,
    /// The user.
    user: UserId,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut sessions = self.hub.sessions[self.hub.shard_index(&self.user)]
            .lock()
            .expect("hub lock is never poisoned");
        if let Some(n) = sessions.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                sessions.remove(&self.user);
            }
        }
    }
}

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}

impl Hub {
    /// Locks the connections are spread over; also the slots of the timer wheel that
    /// heartbeats and sweeps turn (one shard per tick, so no tick touches every connection).
    pub const SHARDS: usize = 64;

    /// An empty hub without a per-device cap.
    pub fn new() -> Self {
        Self::with_device_cap(usize::MAX)
    }

    /// An empty hub holding at most `max_per_device` connections of one device.
    pub fn with_device_cap(max_per_device: usize) -> Self {
        Self {
            shards: (0..Self::SHARDS).map(|_| Mutex::default()).collect(),
            sessions: (0..Self::SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
            next_id: AtomicU64::new(1),
            max_per_device: max_per_device.max(1),
        }
    }

    /// Takes a place among `user`'s sessions here, unless it already has `max`: then the new
    /// session is refused (a user's devices are independent, so a new one must not close
    /// another's connection; one device's excess is handled by [`Hub::add`]).
    pub fn reserve(self: &Arc<Self>, user: &UserId, max: usize) -> Option<Reservation> {
        let mut sessions = self.sessions[self.shard_index(user)]
            .lock()
            .expect("hub lock is never poisoned");
        let n = sessions.entry(user.clone()).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Reservation {
            hub: self.clone(),
            user: user.clone(),
        })
    }

    /// A fresh connection id.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn shard_index(&self, user: &UserId) -> usize {
        (self.hasher.hash_one(user) as usize) % Self::SHARDS
    }

    fn shard(&self, user: &UserId) -> &Shard {
        &self.shards[self.shard_index(user)]
    }

    /// Adds a connection; true when it is the user's first here. When its device already
    /// has the most connections allowed, the oldest of them are asked to close
    /// ([`CloseReason::Replaced`]): a device that reconnects (a network switch) must get in
    /// even while its old connection still looks alive. A device holds one poll at a time:
    /// a new poll replaces the device's held one, whatever the cap.
    pub fn add(&self, conn: Arc<Conn>) -> bool {
        let mut replaced = Vec::new();
        let first = {
            let mut shard = self
                .shard(&conn.user)
                .lock()
                .expect("hub lock is never poisoned");
            let conns = shard.entry(conn.user.clone()).or_default();
            let mut same: Vec<&Arc<Conn>> =
                conns.iter().filter(|c| c.device == conn.device).collect();
            same.sort_by_key(|c| c.id);
            if conn.kind == Kind::Poll {
                replaced.extend(
                    same.iter()
                        .filter(|c| c.kind == Kind::Poll)
                        .map(|c| (*c).clone()),
                );
                same.retain(|c| c.kind != Kind::Poll);
            }
            let excess = (same.len() + 1).saturating_sub(self.max_per_device);
            replaced.extend(same.into_iter().take(excess).cloned());
            conns.push(conn);
            conns.len() == 1
        };
        for old in replaced {
            old.request_close(CloseReason::Replaced);
        }
        first
    }

    /// Removes a connection; true when it was the user's last here.
    pub fn remove(&self, conn: &Conn) -> bool {
        let mut shard = self
            .shard(&conn.user)
            .lock()
            .expect("hub lock is never poisoned");
        let Some(conns) = shard.get_mut(&conn.user) else {
            return false;
        };
        conns.retain(|c| c.id != conn.id);
        if conns.is_empty() {
            shard.remove(&conn.user);
            true
        } else {
            false
        }
    }

    /// The user's local connections.
    pub fn conns_of(&self, user: &UserId) -> Vec<Arc<Conn>> {
        self.shard(user)
            .lock()
            .expect("hub lock is never poisoned")
            .get(user)
            .cloned()
            .unwrap_or_default()
    }

    /// Users with at least one local connection.
    pub fn users(&self) -> Vec<UserId> {
        (0..Self::SHARDS)
            .flat_map(|i| self.shard_users(i))
            .collect()
    }

    /// Every local connection.
    pub fn conns(&self) -> Vec<Arc<Conn>> {
        (0..Self::SHARDS)
            .flat_map(|i| self.shard_conns(i))
            .collect()
    }

    /// The connections of shard `i` (of [`Hub::SHARDS`]).
    pub fn shard_conns(&self, i: usize) -> Vec<Arc<Conn>> {
        self.shards[i % Self::SHARDS]
            .lock()
            .expect("hub lock is never poisoned")
            .values()
            .flat_map(|conns| conns.iter().cloned())
            .collect()
    }

    /// The users of shard `i` (of [`Hub::SHARDS`]).
    pub fn shard_users(&self, i: usize) -> Vec<UserId> {
        self.shards[i % Self::SHARDS]
            .lock()
            .expect("hub lock is never poisoned")
            .keys()
            .cloned()
            .collect()
    }

    /// Number of local connections.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                s.lock()
                    .expect("hub lock is never poisoned")
                    .values()
                    .map(Vec::len)
                    .sum::<usize>()
            })
            .sum()
    }

    /// Local connections per transport, indexed by [`Kind::index`].
    pub fn len_by_kind(&self) -> [usize; 3] {
        let mut counts = [0; 3];
        for shard in &self.shards {
            for conns in shard.lock().expect("hub lock is never poisoned").values() {
                for c in conns {
                    counts[c.kind.index()] += 1;
                }
            }
        }
        counts
    }

    /// The device's connections here.
    pub fn device_conns(&self, user: &UserId, device: &str) -> Vec<Arc<Conn>> {
        self.shard(user)
            .lock()
            .expect("hub lock is never poisoned")
            .get(user)
            .map(|conns| {
                conns
                    .iter()
                    .filter(|c| c.device == device)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// True when nobody is connected.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
