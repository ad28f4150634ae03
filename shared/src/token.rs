//! Device tokens (DESIGN.md §5): the claims gapless reads and HS256 minting. The edge
//! verifies them (`gapless_edge::auth`); `gapless token`, `gapless dev`, the bench and the
//! tests mint them here.

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};

/// Shortest HS256 secret accepted: 256 bits, the hash's own size (RFC 7518 §3.2).
pub const MIN_HS256_SECRET: usize = 32;

/// The claims gapless reads.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    /// The user.
    pub sub: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// The device, optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Not valid before, seconds since the Unix epoch; checked when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Issued at, seconds since the Unix epoch; a time in the future is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
}

/// Mints an HS256 token for `user` (and `device`), valid for `ttl` from now.
pub fn mint_hs256(
    secret: &str,
    user: &str,
    device: Option<&str>,
    ttl: std::time::Duration,
) -> String {
    let now = crate::now_ms() / 1000;
    let claims = Claims {
        sub: user.to_owned(),
        exp: now + ttl.as_secs(),
        device: device.map(str::to_owned),
        nbf: None,
        iat: Some(now),
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 signing of plain claims cannot fail")
}
