//! Device tokens (JWTs), as the edge reads them from `Authorization: Bearer` or `?token=` at
//! the WebSocket upgrade, checked by an HS256 `Verifier`.
//!
//! Property: `verify` never panics, and the fuzzer cannot forge: the only tokens it may
//! accept are ones minted with the secret for `alice` (the seed corpus holds such tokens;
//! the target also mints one with a 1 h lifetime). Any accepted token must be exactly
//! `<header>.<claims>.<signature>` with the signature being the canonical base64url HMAC of
//! its own first two segments under the secret: a mutated token that still verifies
//! (trailing bytes, a non-canonical signature encoding, a fourth segment...) is a failure,
//! and so is any other subject or a device claim.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use gapless_edge::auth::{JwtKey, Verifier};
use gapless_shared::config::Secret;
use gapless_shared::token::mint_hs256;
use jsonwebtoken::{Algorithm, EncodingKey};
use libfuzzer_sys::fuzz_target;

/// The target's secret (the seed tokens are signed with it): 44 bytes.
const SECRET: &str = "gapless-fuzz-hs256-secret-0123456789abcdefgh";

struct Fixture {
    verifier: Verifier,
    /// A token minted at start-up, valid for an hour.
    minted: String,
    key: EncodingKey,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let verifier = Verifier::new(&JwtKey::Hs256(Secret::new(SECRET)))
            .expect("the fuzz secret is a valid HS256 key");
        let minted = mint_hs256(SECRET, "alice", None, Duration::from_secs(3600));
        let (user, device) = verifier
            .verify(&minted)
            .expect("a freshly minted token verifies");
        assert_eq!(user.as_str(), "alice");
        assert_eq!(device, None);
        Fixture {
            verifier,
            minted,
            key: EncodingKey::from_secret(SECRET.as_bytes()),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    let Ok((user, device)) = f.verifier.verify(token) else {
        return;
    };
    if token == f.minted {
        return;
    }
    let segments: Vec<&str> = token.split('.').collect();
    assert_eq!(
        segments.len(),
        3,
        "accepted a token without exactly 3 segments: {token:?}"
    );
    let signing_input = format!("{}.{}", segments[0], segments[1]);
    let signature = jsonwebtoken::crypto::sign(signing_input.as_bytes(), &f.key, Algorithm::HS256)
        .expect("HMAC signing cannot fail");
    assert_eq!(
        segments[2], signature,
        "accepted a token whose signature segment is not the canonical one: {token:?}"
    );
    assert_eq!(
        user.as_str(),
        "alice",
        "accepted a token for another user: {token:?}"
    );
    assert_eq!(
        device, None,
        "accepted a device claim no seed has: {token:?}"
    );
});
