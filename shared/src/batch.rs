//! The producer-facing batch wire formats of the ingest API (DESIGN.md §4) that are not JSON.
//!
//! `application/x-postcard` batch bodies are a [`PostcardBatch`]: a version envelope around the
//! items. Postcard is not self-describing, so the payload travels as JSON text.

use serde::{Deserialize, Serialize};

use crate::protocol::{PostcardError, postcard_whole};

/// One notification to append, as a producer sends it in a postcard batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostcardItem {
    /// The user.
    pub user: String,
    /// The payload, as JSON text.
    pub payload: String,
    /// Optional idempotency key.
    pub idempotency_key: Option<String>,
}

/// Postcard envelope of a batch body; variants are appended, never reordered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PostcardBatch {
    /// Version 1.
    V1(Vec<PostcardItem>),
}

impl PostcardBatch {
    /// Encodes a batch body.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("postcard encoding into a Vec cannot fail")
    }

    /// Decodes a batch body.
    pub fn decode(bytes: &[u8]) -> Result<Self, PostcardError> {
        postcard_whole(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_round_trip() {
        let b = PostcardBatch::V1(vec![PostcardItem {
            user: "alice".into(),
            payload: r#"{"a":1}"#.into(),
            idempotency_key: Some("k1".into()),
        }]);
        assert_eq!(PostcardBatch::decode(&b.encode()).expect("decode"), b);
        assert!(PostcardBatch::decode(&[0x00, 0x05]).is_err());
        let mut trailing = b.encode();
        trailing.push(0);
        assert!(matches!(
            PostcardBatch::decode(&trailing),
            Err(PostcardError::Trailing(1))
        ));
    }
}
