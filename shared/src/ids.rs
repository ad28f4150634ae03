//! Validated identifiers that come from the network: user ids and idempotency keys.
//!
//! Both end up inside Redis key names, so both are checked before anything touches Redis.

use std::fmt;

/// Longest user id, in bytes (DESIGN.md §3).
pub const MAX_USER_ID_LEN: usize = 128;
/// Longest idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 200;

/// Why an identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The id is empty.
    #[error("{0} must not be empty")]
    Empty(&'static str),
    /// The id is longer than allowed.
    #[error("{what} is {len} bytes long, the limit is {max}")]
    TooLong {
        /// Which id.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The id holds a byte outside the allowed set.
    #[error("{what} may only contain {allowed}")]
    BadCharacter {
        /// Which id.
        what: &'static str,
        /// The allowed set, for the message.
        allowed: &'static str,
    },
}

/// A user id: 1..=128 bytes of `[A-Za-z0-9._:@-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(
    feature = "openapi",
    derive(utoipa::ToSchema),
    schema(value_type = String, min_length = 1, max_length = 128, pattern = "^[A-Za-z0-9._:@-]{1,128}$")
)]
pub struct UserId(String);

impl UserId {
    /// Checks `s` and wraps it.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        const WHAT: &str = "user id";
        if s.is_empty() {
            return Err(IdError::Empty(WHAT));
        }
        if s.len() > MAX_USER_ID_LEN {
            return Err(IdError::TooLong {
                what: WHAT,
                len: s.len(),
                max: MAX_USER_ID_LEN,
            });
        }
        let ok = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'@' | b'-');
        if !s.bytes().all(ok) {
            return Err(IdError::BadCharacter {
                what: WHAT,
                allowed: "A-Z a-z 0-9 . _ : @ -",
            });
        }
        Ok(Self(s.to_owned()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks an idempotency key: 1..=200 bytes of visible ASCII (no spaces or control bytes).
pub fn validate_idempotency_key(key: &str) -> Result<(), IdError> {
    const WHAT: &str = "idempotency key";
    if key.is_empty() {
        return Err(IdError::Empty(WHAT));
    }
    if key.len() > MAX_IDEMPOTENCY_KEY_LEN {
        return Err(IdError::TooLong {
            what: WHAT,
            len: key.len(),
            max: MAX_IDEMPOTENCY_KEY_LEN,
        });
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(IdError::BadCharacter {
            what: WHAT,
            allowed: "visible ASCII characters",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_alphabet() {
        for ok in ["a", "alice", "user:42", "a.b_c-d@e.f", &"x".repeat(128)] {
            assert!(UserId::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn refuses_everything_else() {
        assert_eq!(UserId::parse(""), Err(IdError::Empty("user id")));
        assert!(matches!(
            UserId::parse(&"x".repeat(129)),
            Err(IdError::TooLong { len: 129, .. })
        ));
        for bad in ["a b", "a{b}", "é", "a/b", "a\n", "a*"] {
            assert!(
                matches!(UserId::parse(bad), Err(IdError::BadCharacter { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn idempotency_keys() {
        assert!(validate_idempotency_key("order-17/retry#2").is_ok());
        assert!(validate_idempotency_key("").is_err());
        assert!(validate_idempotency_key("a b").is_err());
        assert!(validate_idempotency_key(&"k".repeat(201)).is_err());
    }
}
