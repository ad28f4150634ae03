//! User ids and idempotency keys, as the ingest (request bodies) and the edge (token `sub`,
//! device ids) read them from the network, before they become parts of Redis key names.
//!
//! Input: `user` or `user\tidempotency key` (without a tab, the text is both).
//! Property: `UserId::parse` accepts exactly 1..=128 bytes of `[A-Za-z0-9._:@-]` and keeps
//! the text as it was; `validate_idempotency_key` accepts exactly 1..=200 bytes of visible
//! ASCII; every key built from a valid user (and key) hashes to that user's Redis Cluster
//! slot, i.e. its hash tag is the user id.
#![no_main]

use gapless_shared::ids::{UserId, validate_idempotency_key};
use gapless_shared::keys::{self, UserKeys};
use libfuzzer_sys::fuzz_target;

/// The part of a key Redis Cluster hashes: the text between the first `{` and the first `}`
/// after it when that is not empty, else the whole key.
fn hash_tag(key: &str) -> &str {
    if let Some(open) = key.find('{')
        && let Some(len) = key[open + 1..].find('}')
        && len > 0
    {
        return &key[open + 1..open + 1 + len];
    }
    key
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (user, key) = text.split_once('\t').unwrap_or((text, text));

    let user_ok = (1..=128).contains(&user.len())
        && user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:@-".contains(&b));
    let parsed = UserId::parse(user);
    assert_eq!(
        parsed.is_ok(),
        user_ok,
        "UserId::parse({user:?}) = {parsed:?}"
    );

    let key_ok = (1..=200).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic());
    let checked = validate_idempotency_key(key);
    assert_eq!(
        checked.is_ok(),
        key_ok,
        "validate_idempotency_key({key:?}) = {checked:?}"
    );

    let Ok(id) = parsed else {
        return;
    };
    assert_eq!(id.as_str(), user);
    assert_eq!(id.to_string(), user);
    let k = UserKeys::new(&id);
    for name in [&k.meta, &k.stream, &k.registry, &k.acks] {
        assert_eq!(hash_tag(name), user, "{name} is not in the user's slot");
    }
    assert_eq!(k.meta, keys::meta(&id));
    assert_eq!(k.stream, keys::stream(&id));
    if key_ok {
        let name = UserKeys::idempotency(&id, key);
        assert_eq!(hash_tag(&name), user, "{name} is not in the user's slot");
        assert!(name.ends_with(key));
    }
});
