//! Redis key and channel names (DESIGN.md §3), in one place.
//!
//! Every per-user key carries the hash tag `{user}`, so all of a user's keys live in one
//! Redis Cluster slot and the append Function can touch them atomically. Edge channels carry
//! the tag `{edge id}` so a sharded publish goes to one shard.

use crate::ids::UserId;

/// Key holding the applied migration version.
pub const SCHEMA: &str = "gl:schema";

/// Stream entry field holding the notification payload (JSON text).
pub const FIELD_PAYLOAD: &str = "p";
/// Stream entry field holding the ingest time, milliseconds since the Unix epoch (schema 1;
/// schema 2 puts it in the entry id, see [`entry_ts`]).
pub const FIELD_TS: &str = "t";
/// Stream entry field holding the idempotency key, when the producer gave one.
pub const FIELD_IDEMPOTENCY_KEY: &str = "k";

/// The keys of one user, built once per request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserKeys {
    /// `gl:{user}:m`: hash with `epoch` and `seq` (last assigned).
    pub meta: String,
    /// `gl:{user}:s`: the user's stream, entry ids `<seq>-<ingest ms>` (schema 1: `<seq>-0`).
    pub stream: String,
    /// `gl:{user}:r`: sorted set of edge ids holding a connection, score = lease expiry (ms).
    pub registry: String,
    /// `gl:{user}:a`: hash of device id -> `<epoch>:<last acked seq>`.
    pub acks: String,
}

impl UserKeys {
    /// The keys of `user`.
    pub fn new(user: &UserId) -> Self {
        Self {
            meta: meta(user),
            stream: stream(user),
            registry: registry(user),
            acks: acks(user),
        }
    }

    /// `gl:{user}:i:<key>`: idempotency key -> `<epoch>:<seq>`, with expiry.
    pub fn idempotency(user: &UserId, key: &str) -> String {
        format!("gl:{{{}}}:i:{key}", user.as_str())
    }
}

/// `gl:{user}:m` alone, for a hot path that needs only it (see [`UserKeys`]).
pub fn meta(user: &UserId) -> String {
    format!("gl:{{{}}}:m", user.as_str())
}

/// `gl:{user}:s` alone.
pub fn stream(user: &UserId) -> String {
    format!("gl:{{{}}}:s", user.as_str())
}

/// `gl:{user}:r` alone.
pub fn registry(user: &UserId) -> String {
    format!("gl:{{{}}}:r", user.as_str())
}

/// `gl:{user}:a` alone.
pub fn acks(user: &UserId) -> String {
    format!("gl:{{{}}}:a", user.as_str())
}

/// `gl:edge:<edge id>`: the edge's liveness lease.
pub fn edge_lease(edge: &str) -> String {
    format!("gl:edge:{edge}")
}

/// `gl:edge:<edge id>:status`: what the edge last reported about itself (JSON of
/// [`crate::status::EdgeStatus`]), for the ingest's status page.
pub fn edge_status(edge: &str) -> String {
    format!("gl:edge:{edge}:status")
}

/// `gl:edges`: sorted set of the edges that report a status, score = when they last did
/// (ms since the Unix epoch).
pub const EDGES: &str = "gl:edges";

/// `gl:wake:{<edge id>}`: the channel on which the ingest wakes an edge.
pub fn wake_channel(edge: &str) -> String {
    format!("gl:wake:{{{edge}}}")
}

/// The smallest stream entry id of a sequence number (`<seq>-0`): where a range from that
/// seq starts.
pub fn entry_id(seq: u64) -> String {
    format!("{seq}-0")
}

/// Sequence number of a stream entry id, or `None` if the id is not one of ours. Entries are
/// written as `<seq>-<ingest ms>` (schema 2; the second part carries the ingest time, which
/// saves a field per entry) or `<seq>-0` with the time in field `t` (schema 1).
pub fn parse_entry_id(id: &str) -> Option<u64> {
    let (seq, rest) = id.split_once('-')?;
    rest.parse::<u64>().ok()?;
    seq.parse().ok()
}

/// Ingest time (ms) carried by a stream entry id, if it carries one (`<seq>-<ms>`, not
/// `<seq>-0`).
pub fn entry_ts(id: &str) -> Option<u64> {
    let (_, ms) = id.split_once('-')?;
    ms.parse().ok().filter(|ms| *ms > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_keys_share_one_hash_tag() {
        let user = UserId::parse("alice@example.com").expect("valid id");
        let keys = UserKeys::new(&user);
        assert_eq!(keys.meta, "gl:{alice@example.com}:m");
        assert_eq!(keys.stream, "gl:{alice@example.com}:s");
        assert_eq!(keys.registry, "gl:{alice@example.com}:r");
        assert_eq!(keys.acks, "gl:{alice@example.com}:a");
        assert_eq!(
            UserKeys::idempotency(&user, "order-7"),
            "gl:{alice@example.com}:i:order-7"
        );
    }

    #[test]
    fn edge_names() {
        assert_eq!(edge_lease("e1"), "gl:edge:e1");
        assert_eq!(wake_channel("e1"), "gl:wake:{e1}");
    }

    #[test]
    fn entry_ids_round_trip() {
        assert_eq!(entry_id(17), "17-0");
        assert_eq!(parse_entry_id("17-0"), Some(17));
        assert_eq!(parse_entry_id("17-1764250000000"), Some(17));
        assert_eq!(entry_ts("17-1764250000000"), Some(1_764_250_000_000));
        assert_eq!(entry_ts("17-0"), None);
        assert_eq!(parse_entry_id("17-x"), None);
        assert_eq!(parse_entry_id("x-0"), None);
        assert_eq!(parse_entry_id("17"), None);
    }
}
