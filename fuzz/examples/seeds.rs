//! Writes the committed seed corpora under `fuzz/seeds/<target>/` from the real encoders:
//! `cargo run --manifest-path fuzz/Cargo.toml --example seeds` (re-run when a wire format
//! changes; the files are committed, the fuzzers' working corpora under `fuzz/corpus/` are
//! not).

use std::path::{Path, PathBuf};
use std::time::Duration;

use gapless_shared::batch::{PostcardBatch, PostcardItem};
use gapless_shared::protocol::{ClientMessage, Notification, ResetReason, ServerMessage, to_json};
use gapless_shared::token::mint_hs256;
use gapless_shared::wakeup::{WakeItem, Wakeup};
use serde_json::value::RawValue;

/// The same secret as `fuzz_targets/token.rs`.
const TOKEN_SECRET: &str = "gapless-fuzz-hs256-secret-0123456789abcdefgh";

struct Seeds {
    dir: PathBuf,
    n: usize,
}

impl Seeds {
    fn new(root: &Path, target: &str) -> Self {
        let dir = root.join(target);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the seed dir");
        Self { dir, n: 0 }
    }

    fn add(&mut self, name: &str, bytes: impl AsRef<[u8]>) {
        self.n += 1;
        let path = self.dir.join(format!("{:02}-{name}", self.n));
        std::fs::write(path, bytes).expect("write a seed");
    }
}

fn client_messages() -> Vec<(&'static str, ClientMessage)> {
    vec![
        (
            "resume",
            ClientMessage::Resume {
                epoch: Some("m3k2q9-1a2b".into()),
                after: Some(16),
            },
        ),
        (
            "resume-empty",
            ClientMessage::Resume {
                epoch: None,
                after: None,
            },
        ),
        (
            "resume-after",
            ClientMessage::Resume {
                epoch: None,
                after: Some(u64::MAX),
            },
        ),
        ("ack", ClientMessage::Ack { seq: 17 }),
        ("ack-big", ClientMessage::Ack { seq: 1 << 40 }),
        ("pong", ClientMessage::Pong),
    ]
}

fn raw(json: &str) -> Box<RawValue> {
    RawValue::from_string(json.to_owned()).expect("valid JSON")
}

fn server_messages() -> Vec<(&'static str, ServerMessage)> {
    vec![
        (
            "welcome",
            ServerMessage::Welcome {
                user: "alice".into(),
                device: "phone".into(),
                edge: "edge-1".into(),
                heartbeat_ms: 30_000,
            },
        ),
        (
            "notification",
            ServerMessage::Notification(Notification {
                seq: 17,
                epoch: "m3k2q9-1a2b".into(),
                ts: 1_764_250_000_000,
                payload: raw(r#"{"title":"hi","n":[1,2.5,null,true],"s":"\u00e9\n"}"#),
            }),
        ),
        (
            "notification-scalar",
            ServerMessage::Notification(Notification {
                seq: 1,
                epoch: "e".into(),
                ts: 0,
                payload: raw(r#""just a string""#),
            }),
        ),
        (
            "reset-trimmed",
            ServerMessage::Reset {
                epoch: "m3k2q9-1a2b".into(),
                first_seq: 120,
                reason: ResetReason::GapTrimmed,
            },
        ),
        (
            "reset-epoch",
            ServerMessage::Reset {
                epoch: "m3k2qa-ffff".into(),
                first_seq: 1,
                reason: ResetReason::EpochChanged,
            },
        ),
        ("ping", ServerMessage::Ping),
    ]
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");

    let mut s = Seeds::new(&root, "client_json");
    for (name, m) in client_messages() {
        s.add(&format!("{name}.json"), to_json(&m));
    }
    s.add(
        "resume-reordered.json",
        r#"{"after":3,"type":"resume","epoch":"e"}"#,
    );
    s.add("ack-spaces.json", " {\"type\" : \"ack\", \"seq\" : 0 } ");
    s.add("ack-unknown-field.json", r#"{"type":"ack","seq":1,"x":2}"#);
    s.add(
        "resume-null.json",
        r#"{"type":"resume","epoch":null,"after":null}"#,
    );
    s.add(
        "escaped.json",
        r#"{"type":"resume","epoch":"\u0065\ud83d\ude00"}"#,
    );

    let mut s = Seeds::new(&root, "server_json");
    for (name, m) in server_messages() {
        s.add(&format!("{name}.json"), to_json(&m));
    }
    s.add(
        "notification-spaces.json",
        r#"{ "type":"notification", "payload" : [ 1 , {"a" : "b"} ] , "seq":2,"epoch":"e","ts":3}"#,
    );
    s.add("ping-extra.json", r#"{"type":"ping","seq":1}"#);
    s.add("welcome-missing.json", r#"{"type":"welcome","user":"a"}"#);

    let mut s = Seeds::new(&root, "client_postcard");
    for (name, m) in client_messages() {
        s.add(&format!("{name}.bin"), m.to_postcard());
    }

    let mut s = Seeds::new(&root, "server_postcard");
    for (name, m) in server_messages() {
        s.add(&format!("{name}.bin"), m.to_postcard());
    }

    let mut s = Seeds::new(&root, "wakeup");
    let item = |user: &str, seq: u64, payload: Option<&str>| WakeItem {
        user: user.into(),
        epoch: "m3k2q9-1a2b".into(),
        seq,
        ts: 1_764_250_000_000 + seq,
        payload: payload.map(str::to_owned),
    };
    s.add("empty.bin", Wakeup::V1(vec![]).encode());
    s.add(
        "one.bin",
        Wakeup::V1(vec![item("alice", 1, Some(r#"{"a":1}"#))]).encode(),
    );
    s.add(
        "three.bin",
        Wakeup::V1(vec![
            item("alice", 2, None),
            item("bob@example.com", 9, Some("[1,2,3]")),
            item("alice", 3, Some(r#""x""#)),
        ])
        .encode(),
    );

    let mut s = Seeds::new(&root, "postcard_batch");
    let pitem = |user: &str, payload: &str, key: Option<&str>| PostcardItem {
        user: user.into(),
        payload: payload.into(),
        idempotency_key: key.map(str::to_owned),
    };
    s.add("empty.bin", PostcardBatch::V1(vec![]).encode());
    s.add(
        "two.bin",
        PostcardBatch::V1(vec![
            pitem("alice", r#"{"title":"hi"}"#, Some("order-17")),
            pitem("bob", "[1,2]", None),
        ])
        .encode(),
    );
    s.add(
        "bad-user.bin",
        PostcardBatch::V1(vec![pitem("a b", "1", None)]).encode(),
    );

    let mut s = Seeds::new(&root, "ids");
    for (name, text) in [
        ("plain", "alice"),
        ("email", "alice@example.com"),
        ("all-chars", "a.b_c-d@e:F9"),
        ("with-key", "user:42\torder-17/retry#2"),
        ("braces-key", "bob\t{x}y"),
        ("space", "a b"),
        ("unicode", "é"),
        ("long", &"x".repeat(128)),
        ("too-long", &"x".repeat(129)),
    ] {
        s.add(name, text);
    }

    let mut s = Seeds::new(&root, "entry_id");
    for (name, text) in [
        ("schema1", "17-0"),
        ("schema2", "17-1764250000000"),
        ("max", "18446744073709551615-18446744073709551615"),
        ("overflow", "18446744073709551616-0"),
        ("no-dash", "17"),
        ("plus", "+17-0"),
        ("position", "m3k2q9-1a2b:17"),
        ("position-colons", "e:1:2"),
        ("position-schema4", "m3k2q9-1a2b:17:1764250000"),
        ("position-start", ":0"),
    ] {
        s.add(name, text);
    }

    let mut s = Seeds::new(&root, "token");
    let hour = mint_hs256(TOKEN_SECRET, "alice", None, Duration::from_secs(3600));
    let century = mint_hs256(
        TOKEN_SECRET,
        "alice",
        None,
        Duration::from_secs(100 * 365 * 86_400),
    );
    s.add("alice-1h", &hour);
    s.add("alice-100y", &century);
    let parts: Vec<&str> = century.split('.').collect();
    s.add(
        "alg-none",
        format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.", parts[1]),
    );
    s.add(
        "alg-hs512",
        format!(
            "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzUxMiJ9.{}.{}",
            parts[1], parts[2]
        ),
    );
    s.add("trailing-dot", format!("{century}."));
    s.add("trailing-space", format!("{century} "));
    let mut flipped = century.clone();
    let last = flipped.pop().expect("non-empty");
    flipped.push(if last == 'A' { 'B' } else { 'A' });
    s.add("bad-signature", flipped);
    s.add(
        "other-secret",
        mint_hs256(
            "another-secret-of-32-bytes-at-least",
            "alice",
            None,
            Duration::from_secs(3600),
        ),
    );
    s.add(
        "device",
        mint_hs256(TOKEN_SECRET, "alice", Some("phone"), Duration::from_secs(1)),
    );
    s.add("garbage", "not a token");

    let mut s = Seeds::new(&root, "batch_body");
    let tagged = |tag: u8, body: &[u8]| {
        let mut v = vec![tag];
        v.extend_from_slice(body);
        v
    };
    s.add(
        "json",
        tagged(
            0,
            br#"[{"user":"alice","payload":{"title":"hi"},"idempotency_key":"k1"},{"user":"b c","payload":2}]"#,
        ),
    );
    s.add("json-empty", tagged(0, b"[]"));
    s.add(
        "json-deep",
        tagged(0, br#"[{"user":"a","payload":[[[[[[[[[1]]]]]]]]]}]"#),
    );
    s.add(
        "ndjson",
        tagged(1, b"{\"user\":\"a\",\"payload\":1}\n\n{\"user\":\"b\",\"payload\":\"\\u00e9\"}\r\n{\"user\":\"c\"}\n"),
    );
    s.add(
        "postcard",
        tagged(
            2,
            &PostcardBatch::V1(vec![
                pitem("alice", r#"{"title":"hi"}"#, Some("order-17")),
                pitem("bob", "not json", None),
                pitem("carol", " [1] ", None),
            ])
            .encode(),
        ),
    );
    s.add(
        "json-huge-number",
        tagged(0, br#"[{"user":"a","payload":[1e99999,-0.0e-99999]}]"#),
    );
    s.add(
        "one",
        tagged(
            3,
            br#"{"user":"alice","payload":{"a":[1,2]},"idempotency_key":"x"}"#,
        ),
    );
    s.add(
        "one-escaped",
        tagged(
            3,
            br#"{"user":"\u0061lice","payload":"x","idempotency_key":"\u006b"}"#,
        ),
    );
    println!("seeds written under {}", root.display());
}
