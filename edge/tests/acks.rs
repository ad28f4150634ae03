//! The ack Functions the edge flushes positions with (`gapless_ack_users`, and since schema 4
//! `gapless_ack_devices`): several users per call, each position written only in the log's
//! current epoch and never moved back; stamped with the time, and expired when unused.

mod common;

use common::System;

async fn fcall(
    conn: &mut gapless_shared::store::Store,
    keys: &[&str],
    args: &[&str],
) -> redis::RedisResult<i64> {
    redis::cmd("FCALL")
        .arg("gapless_ack_users")
        .arg(keys.len())
        .arg(keys)
        .arg(args)
        .query_async(conn)
        .await
}

async fn hget(conn: &mut gapless_shared::store::Store, key: &str, field: &str) -> Option<String> {
    redis::cmd("HGET")
        .arg(key)
        .arg(field)
        .query_async(conn)
        .await
        .expect("HGET")
}

#[tokio::test]
async fn positions_of_several_users_are_written_in_one_call_and_never_move_back() {
    let sys = System::start().await;
    let (ea, _) = sys.send("ua", serde_json::json!(1)).await;
    let (eb, _) = sys.send("ub", serde_json::json!(1)).await;
    let mut conn = sys.redis_conn().await;
    let keys = [
        "gl:{ua}:m",
        "gl:{ua}:a",
        "gl:{ub}:m",
        "gl:{ub}:a",
        "gl:{uc}:m",
        "gl:{uc}:a",
    ];

    // ua: two devices; ub: one device, and one position of another epoch (ignored); uc has
    // no log (ignored).
    let written = fcall(
        &mut conn,
        &keys,
        &[
            "2", "p1", &ea, "5", "p2", &ea, "3", "2", "p1", &eb, "7", "p9", "old", "4", "1", "p1",
            "x", "1",
        ],
    )
    .await
    .expect("FCALL");
    assert_eq!(written, 3);
    assert_eq!(
        hget(&mut conn, "gl:{ua}:a", "p1").await,
        Some(format!("{ea}:5"))
    );
    assert_eq!(
        hget(&mut conn, "gl:{ua}:a", "p2").await,
        Some(format!("{ea}:3"))
    );
    assert_eq!(
        hget(&mut conn, "gl:{ub}:a", "p1").await,
        Some(format!("{eb}:7"))
    );
    assert_eq!(hget(&mut conn, "gl:{ub}:a", "p9").await, None);
    assert_eq!(hget(&mut conn, "gl:{uc}:a", "p1").await, None);

    // A late flush cannot rewind a position.
    let written = fcall(&mut conn, &keys[..2], &["1", "p1", &ea, "2"])
        .await
        .expect("FCALL");
    assert_eq!(written, 0);
    assert_eq!(
        hget(&mut conn, "gl:{ua}:a", "p1").await,
        Some(format!("{ea}:5"))
    );

    // A malformed layout is refused before anything is written.
    for args in [
        vec!["2", "p1", ea.as_str(), "9"],
        vec!["1", "p1", ea.as_str(), "9", "extra"],
        vec!["x"],
    ] {
        let e = fcall(&mut conn, &keys[..2], &args)
            .await
            .expect_err("refused");
        assert!(e.to_string().contains("gapless_ack_users"), "{e}");
    }
    assert!(
        fcall(&mut conn, &keys[..3], &["0"]).await.is_err(),
        "odd key count"
    );
    assert_eq!(
        hget(&mut conn, "gl:{ua}:a", "p1").await,
        Some(format!("{ea}:5"))
    );
}

#[tokio::test]
async fn a_new_epoch_replaces_old_positions_and_a_late_flush_of_the_old_epoch_cannot() {
    let sys = System::start().await;
    let (old, _) = sys.send("ue", serde_json::json!(1)).await;
    let mut conn = sys.redis_conn().await;
    let keys = ["gl:{ue}:m", "gl:{ue}:a"];
    assert_eq!(
        fcall(&mut conn, &keys, &["1", "p1", &old, "4"])
            .await
            .expect("FCALL"),
        1
    );

    // The log is lost and starts over under a new epoch.
    let _: () = redis::cmd("DEL")
        .arg("gl:{ue}:m")
        .query_async(&mut conn)
        .await
        .expect("DEL");
    let (new, seq) = sys.send("ue", serde_json::json!(2)).await;
    assert_ne!(new, old);
    assert_eq!(seq, 1);
    // A start marker, as an edge writes for a device that came before any log.
    let _: () = redis::cmd("HSET")
        .arg("gl:{ue}:a")
        .arg("p4")
        .arg(":0")
        .query_async(&mut conn)
        .await
        .expect("HSET");

    // p1's stored position is of the old epoch: one of the new epoch replaces it, though
    // its seq is lower; p4's marker gives way to a real position.
    let written = fcall(&mut conn, &keys, &["2", "p1", &new, "1", "p4", &new, "1"])
        .await
        .expect("FCALL");
    assert_eq!(written, 2);
    assert_eq!(
        hget(&mut conn, "gl:{ue}:a", "p1").await,
        Some(format!("{new}:1"))
    );
    assert_eq!(
        hget(&mut conn, "gl:{ue}:a", "p4").await,
        Some(format!("{new}:1"))
    );

    // A late flush of the old epoch, however far ahead, replaces nothing and creates nothing.
    let written = fcall(&mut conn, &keys, &["2", "p1", &old, "9", "p3", &old, "9"])
        .await
        .expect("FCALL");
    assert_eq!(written, 0);
    assert_eq!(
        hget(&mut conn, "gl:{ue}:a", "p1").await,
        Some(format!("{new}:1"))
    );
    assert_eq!(hget(&mut conn, "gl:{ue}:a", "p3").await, None);

    // gapless_ack, the one-user form, follows the same rules.
    let written: i64 = redis::cmd("FCALL")
        .arg("gapless_ack")
        .arg(2)
        .arg(&keys)
        .arg(&["p1", &old, "10", "p1", &new, "1", "p1", &new, "3"])
        .query_async(&mut conn)
        .await
        .expect("FCALL gapless_ack");
    assert_eq!(written, 1);
    assert_eq!(
        hget(&mut conn, "gl:{ue}:a", "p1").await,
        Some(format!("{new}:3"))
    );
}

async fn fcall_devices(
    conn: &mut gapless_shared::store::Store,
    ttl_s: &str,
    keys: &[&str],
    args: &[&str],
) -> redis::RedisResult<i64> {
    redis::cmd("FCALL")
        .arg("gapless_ack_devices")
        .arg(keys.len())
        .arg(keys)
        .arg(ttl_s)
        .arg(args)
        .query_async(conn)
        .await
}

#[tokio::test]
async fn positions_are_stamped_and_unused_ones_expire_as_new_devices_come() {
    let sys = System::start().await;
    let (e, _) = sys.send("ua", serde_json::json!(1)).await;
    let mut conn = sys.redis_conn().await;
    let keys = ["gl:{ua}:m", "gl:{ua}:a"];
    let now = gapless_shared::now_ms() / 1000;
    // A position last written long ago, one just now, one from before schema 4 (no time)
    // and a start marker.
    for (device, value) in [
        ("gone", format!("{e}:1:{}", now - 40 * 24 * 3600)),
        ("recent", format!("{e}:1:{now}")),
        ("legacy", format!("{e}:1")),
        ("marker", ":0".to_owned()),
    ] {
        redis::cmd("HSET")
            .arg(keys[1])
            .arg(device)
            .arg(value)
            .query_async::<()>(&mut conn)
            .await
            .expect("HSET");
    }
    // An existing device moving forward adds no device: nothing is expired.
    let ttl = (30 * 24 * 3600).to_string();
    assert_eq!(
        fcall_devices(&mut conn, &ttl, &keys, &["1", "recent", &e, "1"]).await,
        Ok(0),
        "not ahead: not written"
    );
    assert!(hget(&mut conn, keys[1], "gone").await.is_some());
    // A new device: its position is stamped, and the unused one goes.
    assert_eq!(
        fcall_devices(&mut conn, &ttl, &keys, &["1", "fresh", &e, "1"]).await,
        Ok(1)
    );
    let fresh = hget(&mut conn, keys[1], "fresh").await.expect("written");
    let stamp: u64 = fresh
        .rsplit(':')
        .next()
        .and_then(|t| t.parse().ok())
        .expect("a time");
    assert!(stamp >= now && stamp <= now + 60, "{fresh}");
    assert_eq!(hget(&mut conn, keys[1], "gone").await, None, "expired");
    for kept in ["recent", "legacy", "marker"] {
        assert!(
            hget(&mut conn, keys[1], kept).await.is_some(),
            "{kept} is kept"
        );
    }
    // A TTL of 0 expires nothing; a bad one is refused before any write.
    redis::cmd("HSET")
        .arg(keys[1])
        .arg("gone")
        .arg(format!("{e}:1:1"))
        .query_async::<()>(&mut conn)
        .await
        .expect("HSET");
    fcall_devices(&mut conn, "0", &keys, &["1", "another", &e, "1"])
        .await
        .expect("written");
    assert!(hget(&mut conn, keys[1], "gone").await.is_some());
    assert!(
        fcall_devices(&mut conn, "x", &keys, &["1", "third", &e, "1"])
            .await
            .is_err()
    );
    assert_eq!(hget(&mut conn, keys[1], "third").await, None);
}

#[tokio::test]
async fn a_stamped_position_resumes_like_any_other() {
    let sys = System::start().await;
    let edge = sys.edge(sys.edge_config("edge-stamp")).await;
    let (_, _) = sys.send("alice", serde_json::json!(1)).await;
    sys.send("alice", serde_json::json!(2)).await;
    let mut c = common::Client::connect(&edge.ws_url(), "alice", "phone", (None, Some(0))).await;
    assert_eq!(c.take(2).await, vec![1, 2], "each acked");
    c.close().await;
    let mut conn = sys.redis_conn().await;
    common::eventually(
        "the position is stored",
        std::time::Duration::from_secs(10),
        || {
            let mut conn = conn.clone();
            async move {
                hget(&mut conn, "gl:{alice}:a", "phone")
                    .await
                    .is_some_and(|v| v.split(':').count() == 3)
            }
        },
    )
    .await;
    let stored = hget(&mut conn, "gl:{alice}:a", "phone")
        .await
        .expect("stored");
    assert!(stored.contains(":2:"), "{stored}");
    sys.send("alice", serde_json::json!(3)).await;
    let mut c = common::Client::connect(&edge.ws_url(), "alice", "phone", (None, None)).await;
    assert_eq!(
        c.take(1).await,
        vec![3],
        "resumed from the stamped position"
    );
}
