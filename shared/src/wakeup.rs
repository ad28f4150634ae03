//! Wakeups: the ingest's hint to an edge that users it holds have new entries (DESIGN.md §1.2).
//!
//! One message per edge per ingest request, published on [`crate::keys::wake_channel`],
//! postcard-encoded in a version envelope. A wakeup is a hint: the stream stays the truth, so
//! an edge that loses, reorders or sees a wakeup twice only reads the stream.

use serde::{Deserialize, Serialize};

use crate::protocol::{PostcardError, postcard_whole};

/// One appended entry an edge may want to deliver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WakeItem {
    /// The user.
    pub user: String,
    /// Epoch of the user's log.
    pub epoch: String,
    /// The appended seq.
    pub seq: u64,
    /// Ingest time, ms.
    pub ts: u64,
    /// The payload (JSON text) when it was small enough to ride along.
    pub payload: Option<String>,
}

/// Postcard envelope of a wakeup message; variants are appended, never reordered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Wakeup {
    /// Version 1: the appended entries, in append order per user.
    V1(Vec<WakeItem>),
}

impl Wakeup {
    /// Encodes the message.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("postcard encoding into a Vec cannot fail")
    }

    /// Decodes a message.
    pub fn decode(bytes: &[u8]) -> Result<Self, PostcardError> {
        postcard_whole(bytes)
    }

    /// The entries of the message.
    pub fn items(&self) -> &[WakeItem] {
        match self {
            Wakeup::V1(items) => items,
        }
    }

    /// The entries of the message, owned.
    pub fn into_items(self) -> Vec<WakeItem> {
        match self {
            Wakeup::V1(items) => items,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wakeups_round_trip() {
        let w = Wakeup::V1(vec![
            WakeItem {
                user: "alice".into(),
                epoch: "e".into(),
                seq: 3,
                ts: 9,
                payload: Some("{}".into()),
            },
            WakeItem {
                user: "bob".into(),
                epoch: "f".into(),
                seq: 1,
                ts: 9,
                payload: None,
            },
        ]);
        assert_eq!(Wakeup::decode(&w.encode()).expect("decode"), w);
        assert!(Wakeup::decode(&[0x07]).is_err());
        let mut trailing = w.encode();
        trailing.extend_from_slice(b"xyz");
        assert!(matches!(
            Wakeup::decode(&trailing),
            Err(PostcardError::Trailing(3))
        ));
    }
}
