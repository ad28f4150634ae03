//! The accept side of the ingest and the edge: TCP connections served over HTTP/1.1 within
//! two connection budgets, with back-off on accept errors and three timeouts.
//!
//! Modelled on mini-redis's `Listener` (a bound on connections and back-off when `accept`
//! fails), with what a public server also needs:
//! - **Pending** connections (accepted, not yet authenticated) get a short deadline
//!   (`unauth_timeout`), a cap per source address and a global cap; when the global cap is
//!   full the oldest pending connection is evicted, so a flood from some addresses cannot
//!   starve the others. A connection over its address's cap is closed at once.
//! - **Established** connections (a request or WebSocket upgrade whose credentials the
//!   server verified, see [`Admission::establish`]) are capped below the process's open-file
//!   limit; past the cap, establishing fails and the server answers 503 with `Retry-After`.
//! - **Timeouts**: a request head must arrive within `header_timeout` of its first byte, a
//!   keep-alive connection idle for `idle_timeout` is closed; the request timeout (body read
//!   included) is a layer of each router.
//!
//! Budgets, refusals and timeouts are counted in `/metrics` (`gapless_listener_*`) and
//! logged at `warn`, at most once per 10 s per kind.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::io;
use std::net::IpAddr;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::telemetry::LogThrottle;

/// Limits of the accept side.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// A request head must be complete this long after its first byte.
    pub header_timeout: Duration,
    /// A keep-alive connection with no request for this long is closed.
    pub idle_timeout: Duration,
    /// A whole request, body read included (applied by the routers' timeout layer).
    pub request_timeout: Duration,
    /// A write to the socket that makes no progress for this long closes the connection: a
    /// client that reads nothing of a streamed answer (an SSE stream) must not hold it.
    pub write_timeout: Duration,
    /// A connection must be established (authenticated) this long after it was accepted.
    pub unauth_timeout: Duration,
    /// Pending connections in all; the oldest is evicted to admit a new one.
    pub max_pending: usize,
    /// Pending connections of one source address; more are closed at once.
    pub max_pending_per_source: usize,
    /// Established connections; past it, establishing fails (503).
    pub max_established: usize,
}

impl ListenerConfig {
    /// Descriptors kept free of both budgets for Redis connections, files and the listener.
    pub const RESERVED_FILES: usize = 256;

    /// Defaults, with the established cap set below this process's open-file limit:
    /// the limit less the pending cap and [`Self::RESERVED_FILES`].
    pub fn new() -> Self {
        let max_pending = 1024;
        Self {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(10),
            unauth_timeout: Duration::from_secs(10),
            max_pending,
            max_pending_per_source: 256,
            max_established: default_established(open_file_limit(), max_pending),
        }
    }
}

impl Default for ListenerConfig {
    fn default() -> Self {
        Self::new()
    }
}

/// The listener's settings as flags, `GAPLESS_*` variables and config file keys; flattened
/// into each server's arguments.
#[derive(Debug, Default, Clone, clap::Args, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerArgs {
    /// A request head must be complete this long after its first byte, ms [default: 10000].
    #[arg(long, env = "GAPLESS_HEADER_TIMEOUT_MS")]
    pub header_timeout_ms: Option<u64>,
    /// A keep-alive connection with no request for this long is closed, ms [default: 60000].
    #[arg(long, env = "GAPLESS_IDLE_TIMEOUT_MS")]
    pub idle_timeout_ms: Option<u64>,
    /// Bound of one request, body read included; past it the answer is 408, ms
    /// [default: 30000].
    #[arg(long, env = "GAPLESS_REQUEST_TIMEOUT_MS")]
    pub request_timeout_ms: Option<u64>,
    /// A write to a connection's socket that makes no progress for this long closes it (a
    /// client that stopped reading a streamed answer), ms [default: 10000].
    #[arg(long, env = "GAPLESS_WRITE_TIMEOUT_MS")]
    pub write_timeout_ms: Option<u64>,
    /// A connection that has not authenticated this long after it was accepted is closed,
    /// ms [default: 10000].
    #[arg(long, env = "GAPLESS_UNAUTH_TIMEOUT_MS")]
    pub unauth_timeout_ms: Option<u64>,
    /// Connections accepted but not yet authenticated, in all; when full the oldest is
    /// closed to admit a new one [default: 1024].
    #[arg(long, env = "GAPLESS_MAX_PENDING")]
    pub max_pending: Option<usize>,
    /// Unauthenticated connections of one source address; more are closed at once (raise it
    /// behind a proxy or load balancer, whose address every connection shares) [default: 256].
    #[arg(long, env = "GAPLESS_MAX_PENDING_PER_SOURCE")]
    pub max_pending_per_source: Option<usize>,
    /// Authenticated connections (WebSocket sessions, keep-alive producer connections); past
    /// it new ones are answered 503 with Retry-After [default: the open-file limit less
    /// --max-pending and 256].
    #[arg(long, env = "GAPLESS_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
}

impl ListenerArgs {
    /// Each setting from `self`, else from `other` (the config file).
    pub fn or(self, other: ListenerArgs) -> ListenerArgs {
        ListenerArgs {
            header_timeout_ms: self.header_timeout_ms.or(other.header_timeout_ms),
            idle_timeout_ms: self.idle_timeout_ms.or(other.idle_timeout_ms),
            request_timeout_ms: self.request_timeout_ms.or(other.request_timeout_ms),
            write_timeout_ms: self.write_timeout_ms.or(other.write_timeout_ms),
            unauth_timeout_ms: self.unauth_timeout_ms.or(other.unauth_timeout_ms),
            max_pending: self.max_pending.or(other.max_pending),
            max_pending_per_source: self.max_pending_per_source.or(other.max_pending_per_source),
            max_connections: self.max_connections.or(other.max_connections),
        }
    }

    /// Validates the settings over the defaults.
    pub fn into_config(self) -> Result<ListenerConfig, crate::config::ConfigError> {
        use crate::config::positive;
        let ms = |setting, v: Option<u64>| {
            v.map(|n| positive(setting, n).map(Duration::from_millis))
                .transpose()
        };
        let count = |setting, v: Option<usize>| v.map(|n| positive(setting, n)).transpose();
        let mut c = ListenerConfig::new();
        if let Some(d) = ms("--header-timeout-ms", self.header_timeout_ms)? {
            c.header_timeout = d;
        }
        if let Some(d) = ms("--idle-timeout-ms", self.idle_timeout_ms)? {
            c.idle_timeout = d;
        }
        if let Some(d) = ms("--request-timeout-ms", self.request_timeout_ms)? {
            c.request_timeout = d;
        }
        if let Some(d) = ms("--write-timeout-ms", self.write_timeout_ms)? {
            c.write_timeout = d;
        }
        if let Some(d) = ms("--unauth-timeout-ms", self.unauth_timeout_ms)? {
            c.unauth_timeout = d;
        }
        if let Some(n) = count("--max-pending", self.max_pending)? {
            c.max_pending = n;
            c.max_established = default_established(open_file_limit(), n);
        }
        if let Some(n) = count("--max-pending-per-source", self.max_pending_per_source)? {
            c.max_pending_per_source = n;
        }
        if let Some(n) = count("--max-connections", self.max_connections)? {
            c.max_established = n;
        }
        Ok(c)
    }
}

/// The established cap that leaves room for the pending cap and the reserve.
pub fn default_established(open_files: usize, max_pending: usize) -> usize {
    open_files
        .saturating_sub(max_pending + ListenerConfig::RESERVED_FILES)
        .max(64)
}

/// The soft open-file limit of this process (`/proc/self/limits`), or 1024 if unreadable.
pub fn open_file_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|soft| soft.parse().ok())
        })
        .unwrap_or(1024)
}

/// Why a connection was turned away or closed by the listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Its source address already holds its share of pending connections.
    SourceCap,
    /// It was the oldest pending connection when the pending budget was full.
    Evicted,
    /// The established budget is full.
    EstablishedCap,
    /// It did not authenticate within the deadline.
    Unauthenticated,
    /// It did not authenticate within the deadline, but every request it sent was answered
    /// and it sits idle: a scraper's or a health checker's keep-alive connection to a public
    /// endpoint (`/metrics`, `/healthz`). Closed gracefully; logged at `debug`, not `warn`.
    UnauthenticatedIdle,
    /// Its request head took too long.
    HeaderTimeout,
    /// It sat idle too long.
    Idle,
    /// Its socket accepted no byte of an answer for the write timeout.
    WriteStalled,
}

impl Refusal {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::SourceCap => "source_cap",
            Refusal::Evicted => "evicted",
            Refusal::EstablishedCap => "established_cap",
            Refusal::Unauthenticated => "unauthenticated_timeout",
            Refusal::UnauthenticatedIdle => "unauthenticated_idle",
            Refusal::HeaderTimeout => "header_timeout",
            Refusal::Idle => "idle_timeout",
            Refusal::WriteStalled => "write_timeout",
        }
    }

    /// Kinds of refusal (the variants are numbered from 0).
    const COUNT: usize = 8;

    /// Every kind, in number order.
    const ALL: [Refusal; Refusal::COUNT] = [
        Refusal::SourceCap,
        Refusal::Evicted,
        Refusal::EstablishedCap,
        Refusal::Unauthenticated,
        Refusal::UnauthenticatedIdle,
        Refusal::HeaderTimeout,
        Refusal::Idle,
        Refusal::WriteStalled,
    ];
}

const PENDING: u8 = 0;
const ESTABLISHED: u8 = 1;
const EVICTED: u8 = 2;

/// The two budgets, shared by the accept loop and every connection.
struct Budgets {
    /// The caps.
    config: ListenerConfig,
    /// Pending connections by source and in admission order.
    pending: Mutex<Pending>,
    /// Established connections now.
    established: AtomicUsize,
    /// One throttle per [`Refusal`], indexed by it.
    throttles: [LogThrottle; Refusal::COUNT],
}

#[derive(Default)]
struct Pending {
    /// Pending connections in all.
    count: usize,
    /// Pending connections per source address (no zero entries).
    per_source: HashMap<IpAddr, usize>,
    /// Admission order, oldest first; entries of connections no longer pending are
    /// skipped when met and compacted away when they outnumber the live ones.
    order: VecDeque<Weak<Slot>>,
}

impl Budgets {
    fn refused(&self, why: Refusal, source: IpAddr) {
        metrics::counter!("gapless_listener_refused_total", "reason" => why.label()).increment(1);
        if why == Refusal::UnauthenticatedIdle {
            tracing::debug!(%source, "idle unauthenticated keep-alive connection closed");
            return;
        }
        self.throttles[why as usize].log(|suppressed| {
            tracing::warn!(
                reason = why.label(),
                %source,
                suppressed,
                "connection refused or closed by the listener's limits"
            );
        });
    }

    fn gauges(&self, pending: usize) {
        metrics::gauge!("gapless_listener_connections", "state" => "pending").set(pending as f64);
        metrics::gauge!("gapless_listener_connections", "state" => "established")
            .set(self.established.load(Ordering::Relaxed) as f64);
    }

    /// Admits a new connection from `source` as pending, evicting the oldest pending one
    /// when the budget is full.
    fn admit(self: &Arc<Self>, source: IpAddr) -> Result<Arc<Slot>, Refusal> {
        let mut p = self
            .pending
            .lock()
            .expect("listener lock is never poisoned");
        if p.per_source.get(&source).copied().unwrap_or(0) >= self.config.max_pending_per_source {
            return Err(Refusal::SourceCap);
        }
        while p.count >= self.config.max_pending {
            let Some(oldest) = p.order.pop_front() else {
                break;
            };
            let Some(oldest) = oldest.upgrade() else {
                continue;
            };
            if oldest
                .state
                .compare_exchange(PENDING, EVICTED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                p.leave(oldest.source);
                oldest.evicted.notify_one();
                self.refused(Refusal::Evicted, oldest.source);
            }
        }
        let slot = Arc::new(Slot {
            budgets: Arc::downgrade(self),
            source,
            admitted: Instant::now(),
            state: AtomicU8::new(PENDING),
            evicted: Notify::new(),
            activity: Arc::new(Activity::new()),
        });
        p.count += 1;
        *p.per_source.entry(source).or_default() += 1;
        p.order.push_back(Arc::downgrade(&slot));
        if p.order.len() > 2 * p.count + 1024 {
            p.order.retain(|w| {
                w.upgrade()
                    .is_some_and(|s| s.state.load(Ordering::Acquire) == PENDING)
            });
        }
        self.gauges(p.count);
        Ok(slot)
    }
}

impl Pending {
    fn leave(&mut self, source: IpAddr) {
        self.count = self.count.saturating_sub(1);
        if let Some(n) = self.per_source.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&source);
            }
        }
    }
}

/// One accepted connection's place in the budgets; released when the last handle drops
/// (the connection task's, or an upgraded session's).
struct Slot {
    /// The budgets it counts against (weak: a slot outliving the listener releases nothing).
    budgets: Weak<Budgets>,
    /// The peer's address.
    source: IpAddr,
    /// When it was accepted.
    admitted: Instant,
    /// `PENDING`, `ESTABLISHED` or `EVICTED`, changed under the budgets' lock.
    state: AtomicU8,
    /// Notified once when the slot is evicted; the connection task closes the socket.
    evicted: Notify,
    /// What the connection is doing, for the header and idle timeouts.
    activity: Arc<Activity>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let Some(budgets) = self.budgets.upgrade() else {
            return;
        };
        let mut p = budgets
            .pending
            .lock()
            .expect("listener lock is never poisoned");
        match self.state.load(Ordering::Acquire) {
            PENDING => p.leave(self.source),
            ESTABLISHED => {
                budgets.established.fetch_sub(1, Ordering::AcqRel);
            }
            _ => {}
        }
        budgets.gauges(p.count);
    }
}

/// A connection's handle, put into every request's extensions by [`serve`]: handlers
/// establish it once its credentials are verified, and an upgraded WebSocket keeps a clone
/// for as long as it lives, which keeps its place in the established budget.
#[derive(Clone)]
pub struct Admission(Arc<Slot>);

impl Admission {
    /// The peer's address.
    pub fn source(&self) -> IpAddr {
        self.0.source
    }

    /// Moves the connection from the pending budget to the established one: it is no
    /// longer subject to the authentication deadline nor evictable. Fails when the
    /// established budget is full (answer 503 with `Retry-After` and close), or when the
    /// connection was evicted meanwhile. Establishing twice is a no-op.
    pub fn establish(&self) -> Result<(), Refusal> {
        let slot = &self.0;
        let Some(budgets) = slot.budgets.upgrade() else {
            return Ok(());
        };
        let mut p = budgets
            .pending
            .lock()
            .expect("listener lock is never poisoned");
        match slot.state.load(Ordering::Acquire) {
            ESTABLISHED => Ok(()),
            EVICTED => Err(Refusal::Evicted),
            _ => {
                if budgets.established.load(Ordering::Acquire) >= budgets.config.max_established {
                    drop(p);
                    budgets.refused(Refusal::EstablishedCap, slot.source);
                    return Err(Refusal::EstablishedCap);
                }
                slot.state.store(ESTABLISHED, Ordering::Release);
                budgets.established.fetch_add(1, Ordering::AcqRel);
                p.leave(slot.source);
                budgets.gauges(p.count);
                Ok(())
            }
        }
    }
}

const IDLE: u8 = 0;
const HEAD: u8 = 1;
const BUSY: u8 = 2;

/// Where a connection is between requests: idle (since when), reading a head (since its
/// first byte), or serving requests (how many).
struct Activity {
    /// `IDLE`, `HEAD` or `BUSY`.
    state: AtomicU8,
    /// When the current state began, ms since the listener's epoch.
    since_ms: AtomicU64,
    /// Requests being served.
    busy: AtomicUsize,
    /// Requests begun on the connection, ever.
    begun: AtomicU64,
    /// Since when a write has been waiting for the socket, ms since the listener's epoch;
    /// 0 while writes make progress.
    write_stalled_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            state: AtomicU8::new(IDLE),
            since_ms: AtomicU64::new(crate::monotonic_ms()),
            busy: AtomicUsize::new(0),
            begun: AtomicU64::new(0),
            write_stalled_ms: AtomicU64::new(0),
        }
    }

    /// A write returned: `Pending` starts (or continues) a stall, anything else ends it.
    fn wrote<T>(&self, polled: &Poll<T>) {
        if polled.is_pending() {
            if self.write_stalled_ms.load(Ordering::Relaxed) == 0 {
                self.write_stalled_ms
                    .store(crate::monotonic_ms().max(1), Ordering::Relaxed);
            }
        } else if self.write_stalled_ms.load(Ordering::Relaxed) != 0 {
            self.write_stalled_ms.store(0, Ordering::Relaxed);
        }
    }

    /// How long the current write has waited for the socket.
    fn write_stall(&self) -> Duration {
        match self.write_stalled_ms.load(Ordering::Relaxed) {
            0 => Duration::ZERO,
            since => Duration::from_millis(crate::monotonic_ms().saturating_sub(since)),
        }
    }

    /// Bytes arrived: an idle connection starts reading a head.
    fn bytes_read(&self) {
        if self.state.load(Ordering::Relaxed) == IDLE
            && self
                .state
                .compare_exchange(IDLE, HEAD, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            self.since_ms
                .store(crate::monotonic_ms(), Ordering::Release);
        }
    }

    /// A request's head was parsed: it is being served until the guard drops.
    fn begin(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::AcqRel);
        self.begun.fetch_add(1, Ordering::AcqRel);
        self.state.store(BUSY, Ordering::Release);
        Busy(self.clone())
    }

    /// The state and how long it has lasted.
    fn current(&self) -> (u8, Duration) {
        let since = self.since_ms.load(Ordering::Acquire);
        (
            self.state.load(Ordering::Acquire),
            Duration::from_millis(crate::monotonic_ms().saturating_sub(since)),
        )
    }
}

/// Marks a request in progress; dropping the last one makes the connection idle.
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        if self.0.busy.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0
                .since_ms
                .store(crate::monotonic_ms(), Ordering::Release);
            self.0.state.store(IDLE, Ordering::Release);
        }
    }
}

/// A TCP stream that tells its [`Activity`] when bytes arrive and when writes stall.
struct Tracked {
    /// The socket.
    inner: TcpStream,
    /// The connection's activity.
    activity: Arc<Activity>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.bytes_read();
        }
        polled
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.activity.wrote(&polled);
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.activity.wrote(&polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accept queue length asked of the kernel (it caps it at `net.core.somaxconn`): a
/// reconnect storm or a flood arrives faster than one accept loop takes connections, and
/// a SYN that finds the queue full waits a second for its retransmission.
pub const BACKLOG: u32 = 4096;

/// Binds `addr` for [`serve`], with address reuse and a [`BACKLOG`]-long accept queue.
pub fn bind(addr: std::net::SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Serves `service` on `listener` until `shutdown` fires, then stops accepting, lets each
/// connection finish its request in flight, and returns once they have all closed (the
/// caller bounds that wait). Upgraded connections leave the listener's care at the upgrade.
pub async fn serve<S, B>(
    listener: TcpListener,
    service: S,
    config: ListenerConfig,
    shutdown: CancellationToken,
) -> io::Result<()>
where
    S: tower::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    for why in Refusal::ALL {
        crate::telemetry::zero_counter(
            "gapless_listener_refused_total",
            &[("reason", why.label())],
        );
    }
    crate::telemetry::zero_counter("gapless_listener_accept_errors_total", &[]);
    for (budget, value) in [
        ("pending", config.max_pending),
        ("pending_per_source", config.max_pending_per_source),
        ("established", config.max_established),
    ] {
        metrics::gauge!("gapless_listener_limit", "budget" => budget).set(value as f64);
    }
    let budgets = Arc::new(Budgets {
        config: config.clone(),
        pending: Mutex::new(Pending::default()),
        established: AtomicUsize::new(0),
        throttles: Default::default(),
    });
    let accept_errors = LogThrottle::default();
    let connections = TaskTracker::new();
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => {
                backoff = Duration::from_millis(5);
                accepted
            }
            Err(e) if is_per_connection(&e) => continue,
            Err(e) => {
                // Out of descriptors or memory: wait for some to free up, as mini-redis
                // does, but never give up serving.
                metrics::counter!("gapless_listener_accept_errors_total").increment(1);
                accept_errors.log(|suppressed| {
                    tracing::warn!(error = %e, suppressed, backoff_ms = backoff.as_millis() as u64, "accept failed; backing off");
                });
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = shutdown.cancelled() => break,
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let slot = match budgets.admit(peer.ip()) {
            Ok(slot) => slot,
            Err(why) => {
                budgets.refused(why, peer.ip());
                drop(stream);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        connections.spawn(connection(
            stream,
            slot,
            service.clone(),
            config.clone(),
            shutdown.clone(),
        ));
    }
    connections.close();
    connections.wait().await;
    Ok(())
}

/// Accept errors that concern one connection only (it was reset before we took it).
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}

/// Serves one connection until it ends, is evicted, or overstays a deadline.
async fn connection<S, B>(
    stream: TcpStream,
    slot: Arc<Slot>,
    service: S,
    config: ListenerConfig,
    shutdown: CancellationToken,
) where
    S: tower::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let activity = slot.activity.clone();
    let admission = Admission(slot.clone());
    let handler = hyper::service::service_fn(move |mut request: Request<Incoming>| {
        let busy = admission.0.activity.begin();
        request.extensions_mut().insert(admission.clone());
        let response = service.clone().oneshot(request);
        async move {
            // The request is served until its answer's body is done (a streamed answer, an
            // SSE stream, is not an idle connection): the body holds the guard.
            response.await.map(|r| {
                r.map(|body| {
                    http_body_util::BodyExt::map_frame(body, move |frame| {
                        let _serving = &busy;
                        frame
                    })
                })
            })
        }
    });
    let io = TokioIo::new(Tracked {
        inner: stream,
        activity: activity.clone(),
    });
    let mut conn = pin!(
        hyper::server::conn::http1::Builder::new()
            .keep_alive(true)
            .serve_connection(io, handler)
            .with_upgrades()
    );
    let mut draining = false;
    // Deadlines are checked lazily: at least every quarter of the shortest timeout, so a
    // connection overstays one by at most that much.
    let tick = config
        .header_timeout
        .min(config.idle_timeout)
        .min(config.unauth_timeout)
        .min(config.write_timeout)
        / 4;
    loop {
        tokio::select! {
            _ = conn.as_mut() => return,
            () = slot.evicted.notified() => return,
            () = shutdown.cancelled(), if !draining => {
                conn.as_mut().graceful_shutdown();
                draining = true;
            }
            () = tokio::time::sleep(tick) => {
                let Some(budgets) = slot.budgets.upgrade() else { continue };
                let why = overstayed(&slot, &activity, &config);
                if let Some(why) = why {
                    budgets.refused(why, slot.source);
                    if matches!(why, Refusal::Idle | Refusal::UnauthenticatedIdle) {
                        // Nothing in flight: closing loses nothing.
                        conn.as_mut().graceful_shutdown();
                        draining = true;
                        continue;
                    }
                    return;
                }
            }
        }
    }
}

/// The deadline a connection has passed, if any.
fn overstayed(slot: &Slot, activity: &Activity, config: &ListenerConfig) -> Option<Refusal> {
    if slot.state.load(Ordering::Acquire) == PENDING
        && slot.admitted.elapsed() > config.unauth_timeout
        && activity.busy.load(Ordering::Acquire) == 0
    {
        // A connection whose every request was answered, between two of them, is a public
        // endpoint's client (a scraper); one that never finished a request is not.
        let (state, _) = activity.current();
        if state == IDLE && activity.begun.load(Ordering::Acquire) > 0 {
            return Some(Refusal::UnauthenticatedIdle);
        }
        return Some(Refusal::Unauthenticated);
    }
    if activity.write_stall() > config.write_timeout {
        return Some(Refusal::WriteStalled);
    }
    match activity.current() {
        (HEAD, d) if d > config.header_timeout => Some(Refusal::HeaderTimeout),
        (IDLE, d) if d > config.idle_timeout => Some(Refusal::Idle),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budgets(max_pending: usize, per_source: usize, established: usize) -> Arc<Budgets> {
        Arc::new(Budgets {
            config: ListenerConfig {
                max_pending,
                max_pending_per_source: per_source,
                max_established: established,
                ..ListenerConfig::new()
            },
            pending: Mutex::new(Pending::default()),
            established: AtomicUsize::new(0),
            throttles: Default::default(),
        })
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    fn pending(b: &Budgets) -> usize {
        b.pending.lock().expect("lock").count
    }

    #[test]
    fn a_source_over_its_share_is_refused_while_others_are_admitted() {
        let b = budgets(100, 2, 10);
        let _one = b.admit(ip(1)).expect("first");
        let _two = b.admit(ip(1)).expect("second");
        assert_eq!(b.admit(ip(1)).err(), Some(Refusal::SourceCap));
        let _other = b.admit(ip(2)).expect("another address");
        assert_eq!(pending(&b), 3);
    }

    #[test]
    fn a_full_pending_budget_evicts_its_oldest_member() {
        let b = budgets(2, 10, 10);
        let first = b.admit(ip(1)).expect("first");
        let second = b.admit(ip(1)).expect("second");
        let third = b.admit(ip(2)).expect("third evicts the first");
        assert_eq!(first.state.load(Ordering::Acquire), EVICTED);
        assert_eq!(second.state.load(Ordering::Acquire), PENDING);
        assert_eq!(pending(&b), 2);
        // Established connections are not evictable.
        Admission(second.clone()).establish().expect("room");
        let fourth = b.admit(ip(3)).expect("room again");
        let _fifth = b.admit(ip(3)).expect("fifth evicts the third");
        assert_eq!(third.state.load(Ordering::Acquire), EVICTED);
        assert_eq!(fourth.state.load(Ordering::Acquire), PENDING);
        assert_eq!(second.state.load(Ordering::Acquire), ESTABLISHED);
        drop(first);
        assert_eq!(pending(&b), 2, "an evicted slot releases nothing twice");
    }

    #[test]
    fn establishing_moves_between_budgets_and_stops_at_the_cap() {
        let b = budgets(10, 10, 1);
        let a = Admission(b.admit(ip(1)).expect("a"));
        let c = Admission(b.admit(ip(1)).expect("c"));
        a.establish().expect("room for one");
        a.establish().expect("twice is a no-op");
        assert_eq!(c.establish(), Err(Refusal::EstablishedCap));
        assert_eq!((pending(&b), b.established.load(Ordering::Acquire)), (1, 1));
        drop(a);
        assert_eq!(b.established.load(Ordering::Acquire), 0);
        c.establish().expect("the freed place");
    }

    #[test]
    fn the_admission_order_is_compacted() {
        let b = budgets(10_000, 10_000, 10_000);
        for _ in 0..5_000 {
            let a = Admission(b.admit(ip(1)).expect("admitted"));
            a.establish().expect("room");
        }
        assert!(b.pending.lock().expect("lock").order.len() <= 1024 + 2);
    }

    #[test]
    fn listener_settings_flatten_into_a_server_file_that_still_refuses_typos() {
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            #[allow(dead_code)]
            listen: Option<String>,
            #[serde(flatten)]
            listener: ListenerArgs,
        }
        let file: File = toml::from_str("listen = \"x\"\nmax_pending = 5\nidle_timeout_ms = 7\n")
            .expect("valid");
        assert_eq!(file.listener.max_pending, Some(5));
        let c = file.listener.into_config().expect("valid");
        assert_eq!(
            (c.max_pending, c.idle_timeout),
            (5, Duration::from_millis(7))
        );
        let typo = toml::from_str::<File>("max_pendin = 5\n").expect_err("typo");
        assert!(typo.to_string().contains("max_pendin"), "{typo}");
        let zero = ListenerArgs {
            max_pending: Some(0),
            ..ListenerArgs::default()
        };
        assert!(zero.into_config().is_err());
    }

    #[test]
    fn every_refusal_has_its_log_throttle() {
        assert_eq!(
            Refusal::WriteStalled as usize + 1,
            Refusal::COUNT,
            "WriteStalled is the last variant"
        );
    }

    #[test]
    fn the_established_default_leaves_room_below_the_file_limit() {
        assert_eq!(default_established(20_000, 1024), 20_000 - 1024 - 256);
        assert_eq!(default_established(100, 1024), 64);
        assert!(open_file_limit() >= 64);
    }
}
