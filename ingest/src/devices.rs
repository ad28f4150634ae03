//! What a producer can ask about a user's devices (DESIGN.md §4): who is connected now
//! (`GET /v1/users/{user}/presence`) and how far each device has acknowledged
//! (`GET /v1/users/{user}/devices[?seq=N]`). Both read only Redis, what the edges recorded
//! (see [`gapless_shared::presence`]): the user's presence hash, registry and ack positions,
//! one pipeline of O(devices) work; neither asks an edge.

use std::collections::HashMap;
use std::time::Duration;

pub use gapless_shared::api::{Connected, Device, Devices, Presence};
use gapless_shared::ids::UserId;
use gapless_shared::presence::{self, Entry, Position};
use gapless_shared::store::{Store, StoreError, with_timeout};
use gapless_shared::{keys, now_ms};

/// The live connections of `user`, and the fields of dead ones (to delete).
async fn connections(
    conn: &mut Store,
    timeout: Duration,
    user: &UserId,
) -> Result<(Vec<Connected>, Vec<String>), StoreError> {
    let key = presence::key(user);
    let mut pipe = redis::pipe();
    pipe.cmd("HGETALL")
        .arg(&key)
        .cmd("ZRANGE")
        .arg(keys::registry(user))
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES");
    let (fields, leases): (HashMap<String, String>, Vec<(String, f64)>) =
        with_timeout(timeout, pipe.query_async(conn)).await?;
    let leases: HashMap<String, u64> = leases
        .into_iter()
        .map(|(edge, until)| (edge, until as u64))
        .collect();
    let now = now_ms();
    let mut live = Vec::new();
    let mut dead = Vec::new();
    for (field, value) in fields {
        match serde_json::from_str::<Entry>(&value) {
            Ok(entry) if entry.is_live(leases.get(&entry.edge).copied(), now) => {
                live.push(Connected {
                    device: entry.device,
                    edge: entry.edge,
                    transport: entry.transport,
                    since: entry.since,
                });
            }
            // A dead edge's entry, an ended poll, or a value no edge writes.
            _ => dead.push(field),
        }
    }
    live.sort_by(|a, b| (a.since, &a.device).cmp(&(b.since, &b.device)));
    Ok((live, dead))
}

/// Deletes the fields of dead connections; best effort (the next read finds them again, and
/// the hash expires with its user's last connection).
async fn prune(conn: &mut Store, timeout: Duration, user: &UserId, dead: Vec<String>) {
    if dead.is_empty() {
        return;
    }
    let mut del = redis::cmd("HDEL");
    del.arg(presence::key(user)).arg(dead);
    let _ = with_timeout(timeout, del.query_async::<u64>(conn)).await;
}

/// Who of `user` is connected now.
pub async fn presence(
    conn: &mut Store,
    timeout: Duration,
    user: &UserId,
) -> Result<Presence, StoreError> {
    let (devices, dead) = connections(conn, timeout, user).await?;
    prune(conn, timeout, user, dead).await;
    Ok(Presence {
        user: user.as_str().to_owned(),
        devices,
    })
}

/// Every known device of `user` and how far it acknowledged; with `seq`, whether each
/// acknowledged that seq of the current epoch.
pub async fn devices(
    conn: &mut Store,
    timeout: Duration,
    user: &UserId,
    seq: Option<u64>,
) -> Result<Devices, StoreError> {
    let mut pipe = redis::pipe();
    pipe.cmd("HMGET")
        .arg(keys::meta(user))
        .arg("epoch")
        .arg("seq")
        .cmd("HGETALL")
        .arg(keys::acks(user));
    let ((epoch, last_seq), positions): ((Option<String>, Option<u64>), HashMap<String, String>) =
        with_timeout(timeout, pipe.query_async(&mut *conn)).await?;
    let (connected, dead) = connections(conn, timeout, user).await?;
    prune(conn, timeout, user, dead).await;
    let last_seq = last_seq.unwrap_or(0);
    let now = now_ms();
    let online: std::collections::HashSet<&str> =
        connected.iter().map(|c| c.device.as_str()).collect();
    let mut devices: Vec<Device> = positions
        .iter()
        .filter_map(|(device, stored)| {
            let position = Position::parse(stored)?;
            let current = epoch.as_deref() == Some(position.epoch.as_str());
            let acked_now = if current { position.seq } else { 0 };
            let connected = online.contains(device.as_str());
            Some(Device {
                device: device.clone(),
                epoch: (!position.epoch.is_empty()).then(|| position.epoch.clone()),
                acked: position.seq,
                behind: last_seq.saturating_sub(acked_now),
                last_seen: if connected {
                    Some(now)
                } else {
                    position.written_s.map(|s| s * 1000)
                },
                connected,
                acknowledged: seq.map(|n| current && position.seq >= n),
            })
        })
        .collect();
    // A device connected now that never acknowledged anything has no position yet.
    for device in &online {
        if !positions.contains_key(*device) {
            devices.push(Device {
                device: (*device).to_owned(),
                epoch: None,
                acked: 0,
                behind: last_seq,
                last_seen: Some(now),
                connected: true,
                acknowledged: seq.map(|_| false),
            });
        }
    }
    devices.sort_by(|a, b| a.device.cmp(&b.device));
    Ok(Devices {
        user: user.as_str().to_owned(),
        epoch,
        last_seq,
        devices,
    })
}
