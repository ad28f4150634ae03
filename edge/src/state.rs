//! What every session and endpoint of the edge shares ([`EdgeState`]), and the handles of the
//! metrics counted on every delivery and ack.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use gapless_shared::ids::UserId;
use gapless_shared::rate::{AuthFailures, KeyedLimit};
use gapless_shared::store::Store;

use crate::acks::AckBook;
use crate::auth::Verifier;
use crate::config::Config;
use crate::hub::{Hub, Kind};
use crate::reader::Reader;
use crate::registry::Registry;

/// Everything the edge's tasks share.
pub struct EdgeState {
    /// Settings.
    pub config: Config,
    /// Local connections.
    pub hub: Arc<Hub>,
    /// Coalescing stream reader.
    pub reader: Reader,
    /// Registry leases.
    pub registry: Registry,
    /// Ack positions.
    pub acks: AckBook,
    /// Token checks.
    pub(crate) verifier: Verifier,
    /// Failed authentications per source address.
    pub(crate) auth_failures: AuthFailures<IpAddr>,
    /// Connection attempts per user.
    pub(crate) user_connects: KeyedLimit<UserId>,
    /// Set when draining: new connections are refused.
    pub(crate) draining: AtomicBool,
    /// Shared Redis connection (readiness, drain).
    pub(crate) conn: Store,
    /// The metrics counted on every delivery and ack.
    pub(crate) hot: HotMetrics,
    /// Sessions opened and ended, for the periodic log line of [`crate::report`].
    pub(crate) tally: Tally,
}

/// Sessions and deliveries since the start, for [`crate::report`].
#[derive(Debug, Default)]
pub(crate) struct Tally {
    /// Sessions opened, per transport (indexed by [`Kind::index`]).
    pub opened: [std::sync::atomic::AtomicU64; 3],
    /// Sessions ended, per transport.
    pub ended: [std::sync::atomic::AtomicU64; 3],
    /// Notifications handed to a transport (live and replayed).
    pub delivered: std::sync::atomic::AtomicU64,
    /// Latencies of live deliveries.
    pub latency: gapless_shared::status::LatencyBuckets,
}

/// Handles of the metrics counted on every delivery and ack, registered once: `counter!`
/// and `histogram!` build their key and look it up in the registry on every call.
pub(crate) struct HotMetrics {
    /// Per transport, indexed by [`Kind::index`].
    per_transport: [TransportMetrics; 3],
    /// `gapless_edge_delivery_latency_seconds`: the entry's ingest time to its hand-over to
    /// the transport, for live deliveries (a replayed entry's age is the device's absence).
    pub delivery_latency: metrics::Histogram,
}

/// The hot metrics of one transport (label `transport`).
pub(crate) struct TransportMetrics {
    /// `gapless_edge_connects_total`.
    pub connects: metrics::Counter,
    /// `gapless_edge_delivered_total{path="live"}`.
    pub delivered_live: metrics::Counter,
    /// `gapless_edge_delivered_total{path="replay"}`.
    pub delivered_replay: metrics::Counter,
    /// `gapless_edge_acks_total`.
    pub acks: metrics::Counter,
}

impl HotMetrics {
    /// Registers the handles with the installed recorder, and every other counter of the
    /// edge at zero under each label it can carry (see
    /// [`gapless_shared::telemetry::zero_counter`]).
    pub fn register() -> Self {
        use gapless_shared::telemetry::zero_counter;
        for kind in Kind::ALL {
            let t = kind.label();
            // `crate::delivery::End::label`.
            for reason in [
                "client_closed",
                "protocol_violation",
                "heartbeat_timeout",
                "slow_consumer",
                "draining",
                "write_failed",
                "replaced",
            ] {
                zero_counter(
                    "gapless_edge_disconnects_total",
                    &[("reason", reason), ("transport", t)],
                );
            }
            for reason in ["gap_trimmed", "epoch_changed"] {
                zero_counter(
                    "gapless_edge_resets_total",
                    &[("reason", reason), ("transport", t)],
                );
            }
        }
        for reason in ["user_cap", "user_connect_rate"] {
            zero_counter("gapless_edge_refused_total", &[("reason", reason)]);
        }
        for reason in [
            "unauthorized",
            "invalid_query",
            "invalid_device",
            "too_many_auth_failures",
        ] {
            zero_counter("gapless_edge_auth_failures_total", &[("reason", reason)]);
        }
        for result in ["ok", "undecodable"] {
            zero_counter("gapless_edge_wakeups_total", &[("result", result)]);
        }
        for outcome in ["empty", "messages"] {
            zero_counter("gapless_edge_polls_total", &[("outcome", outcome)]);
        }
        for op in ["ack", "read", "registry", "sweep"] {
            zero_counter("gapless_redis_errors_total", &[("op", op)]);
        }
        for name in [
            "gapless_edge_hint_overflows_total",
            "gapless_edge_sweep_catches_total",
            "gapless_edge_subscriptions_total",
            "gapless_edge_resubscriptions_total",
        ] {
            zero_counter(name, &[]);
        }
        let of = |kind: Kind| {
            let t = kind.label();
            TransportMetrics {
                connects: metrics::counter!("gapless_edge_connects_total", "transport" => t),
                delivered_live: metrics::counter!("gapless_edge_delivered_total", "path" => "live", "transport" => t),
                delivered_replay: metrics::counter!("gapless_edge_delivered_total", "path" => "replay", "transport" => t),
                acks: metrics::counter!("gapless_edge_acks_total", "transport" => t),
            }
        };
        Self {
            per_transport: Kind::ALL.map(of),
            delivery_latency: metrics::histogram!("gapless_edge_delivery_latency_seconds"),
        }
    }

    /// The metrics of `kind`.
    pub fn of(&self, kind: Kind) -> &TransportMetrics {
        &self.per_transport[kind.index()]
    }
}

/// What every handler gets: the shared state, and the tracker the drain waits on.
pub type AppState = (Arc<EdgeState>, tokio_util::task::TaskTracker);
