//! What edges record about devices for producers to read (DESIGN.md §4, presence and delivery
//! status): each open connection in `gl:{user}:p`, and the ack positions of `gl:{user}:a`.
//!
//! `gl:{user}:p` is a hash with one field per connection, `<edge id>/<connection id>` (a
//! long-poll device has one field per edge, `<edge id>/poll:<device>`, rewritten by each of
//! its polls), whose value is an [`Entry`] in JSON. An edge writes the field when the
//! connection opens and deletes it when it ends; the fields of an edge that died are left
//! behind, and a reader counts an entry only while its edge holds a lease for the user in
//! `gl:{user}:r` (and, for a poll, until its `until`), deleting those it finds dead.

use serde::{Deserialize, Serialize};

use crate::ids::UserId;

/// `gl:{user}:p`: the user's open connections.
pub fn key(user: &UserId) -> String {
    format!("gl:{{{}}}:p", user.as_str())
}

/// The field of one connection.
pub fn field(edge: &str, connection: u64) -> String {
    format!("{edge}/{connection}")
}

/// The field of a long-polling device on one edge.
pub fn poll_field(edge: &str, device: &str) -> String {
    format!("{edge}/poll:{device}")
}

/// How long the hash outlives the last write to it: the fields of a crashed edge do not
/// outlive their user's connections by more than this. Each edge rewrites the expiry with
/// each connection, and for its connected users every [`KEY_TTL_REFRESH_ROUNDS`] lease
/// refreshes.
pub const KEY_TTL_MS: u64 = 24 * 3600 * 1000;

/// Lease refresh rounds between two refreshes of the hash's expiry by an edge.
pub const KEY_TTL_REFRESH_ROUNDS: u64 = 60;

/// One connection, as its edge wrote it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The device.
    pub device: String,
    /// The edge that holds it.
    pub edge: String,
    /// `websocket`, `sse` or `poll`.
    pub transport: String,
    /// When the connection opened (a poll: when its latest poll began), ms since the Unix
    /// epoch.
    pub since: u64,
    /// A poll only: until when the device counts as connected without another poll, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<u64>,
}

impl Entry {
    /// Whether the entry counts at `now_ms`, given the lease expiry (ms) its edge holds for
    /// the user, if any.
    pub fn is_live(&self, lease_until: Option<u64>, now_ms: u64) -> bool {
        lease_until.is_some_and(|until| until > now_ms)
            && self.until.is_none_or(|until| until > now_ms)
    }
}

/// A device's stored ack position (`gl:{user}:a`): `<epoch>:<seq>`, or `<epoch>:<seq>:<unix
/// s>` since schema 4 (the time of the write); `:0` marks a device that connected before its
/// user had a log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// The epoch the seq belongs to; empty for the marker.
    pub epoch: String,
    /// Everything up to it is acknowledged.
    pub seq: u64,
    /// When it was written, Unix seconds (schema 4 on).
    pub written_s: Option<u64>,
}

impl Position {
    /// Parses a stored position; `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        let (epoch, rest) = s.split_once(':')?;
        let (seq, written_s) = match rest.split_once(':') {
            Some((seq, written)) => (seq, Some(written.parse::<u64>().ok()?)),
            None => (rest, None),
        };
        Some(Self {
            epoch: epoch.to_owned(),
            seq: seq.parse().ok()?,
            written_s,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_parse() {
        let p = |s| Position::parse(s).map(|p| (p.epoch, p.seq, p.written_s));
        assert_eq!(p("ab:17"), Some(("ab".into(), 17, None)));
        assert_eq!(
            p("ab:17:1764250000"),
            Some(("ab".into(), 17, Some(1_764_250_000)))
        );
        assert_eq!(p(":0"), Some((String::new(), 0, None)));
        assert_eq!(p("ab:17:garbage"), None);
        assert_eq!(p("ab:17:1:2"), None);
        assert_eq!(p("ab"), None);
        assert_eq!(p("ab:x"), None);
    }

    #[test]
    fn an_entry_counts_while_its_edge_holds_the_lease_and_a_poll_until_its_end() {
        let ws = Entry {
            device: "phone".into(),
            edge: "e1".into(),
            transport: "websocket".into(),
            since: 1,
            until: None,
        };
        assert!(ws.is_live(Some(200), 100));
        assert!(!ws.is_live(Some(100), 100), "the lease ran out");
        assert!(!ws.is_live(None, 100), "the edge left the registry");
        let poll = Entry {
            until: Some(150),
            transport: "poll".into(),
            ..ws
        };
        assert!(poll.is_live(Some(200), 100));
        assert!(!poll.is_live(Some(200), 150), "no poll since");
    }
}
