//! The edge's entries in the Redis registry (DESIGN.md §3): `gl:{user}:r` holds this edge's id
//! with a lease while a device of the user is connected here, and `gl:edge:<id>` says the edge
//! is alive. Leases are refreshed in pipelined batches by one task, not per connection.
//!
//! The same task writes each connection's presence entry (`gl:{user}:p`, see
//! [`gapless_shared::presence`]) when it opens and deletes it when it ends, in the same
//! pipelines: what `GET /v1/users/{user}/presence` reads.

use std::sync::Arc;
use std::time::Duration;

use gapless_shared::ids::UserId;
use gapless_shared::store::{Shard, Store, StoreError};
use gapless_shared::{keys, presence};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::hub::Hub;

/// Users per pipeline of a refresh.
const REFRESH_CHUNK: usize = 1000;

enum Op {
    /// Register the user; answer when written (or failed).
    Add(UserId, oneshot::Sender<()>),
    /// Unregister the user.
    Remove(UserId),
    /// Write a connection's presence entry (field, JSON entry).
    Join(UserId, String, String),
    /// Delete a connection's presence entry (field).
    Leave(UserId, String),
}

/// Handle to the registry task. Cheap to clone.
#[derive(Clone)]
pub struct Registry {
    /// Operations, applied in order. Unbounded: at most one add and one remove per
    /// connection lifetime are ever queued.
    tx: mpsc::UnboundedSender<Op>,
}

/// What the registry task needs.
pub struct RegistryTask {
    /// Shared Redis connection.
    pub conn: Store,
    /// This edge.
    pub edge_id: String,
    /// Lease length.
    pub lease: Duration,
    /// Bound of a Redis call.
    pub timeout: Duration,
    /// Local connections, for refreshes.
    pub hub: Arc<Hub>,
}

impl Registry {
    /// Starts the task; it ends when `shutdown` is cancelled.
    pub fn spawn(task: RegistryTask, shutdown: CancellationToken) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(task, rx, shutdown));
        Self { tx }
    }

    /// Registers the user here; returns once Redis has it (or the write failed: the next
    /// refresh retries, and the sweep covers the gap).
    pub async fn add(&self, user: UserId) {
        let (done, rx) = oneshot::channel();
        if self.tx.send(Op::Add(user, done)).is_ok() {
            let _ = rx.await;
        }
    }

    /// Unregisters the user here (its last local connection closed).
    pub fn remove(&self, user: UserId) {
        let _ = self.tx.send(Op::Remove(user));
    }

    /// Records `entry` as the connection `field` of `user` (written with the next batch; a
    /// failed write is not retried: presence is a view, and the connection's next event
    /// rewrites nothing, so it shows up at the user's next connection).
    pub fn join(&self, user: UserId, field: String, entry: &presence::Entry) {
        let Ok(json) = serde_json::to_string(entry) else {
            return;
        };
        let _ = self.tx.send(Op::Join(user, field, json));
    }

    /// Deletes the connection `field` of `user`.
    pub fn leave(&self, user: UserId, field: String) {
        let _ = self.tx.send(Op::Leave(user, field));
    }
}

async fn run(task: RegistryTask, mut rx: mpsc::UnboundedReceiver<Op>, shutdown: CancellationToken) {
    // Every user's lease is refreshed once per third of the lease, one hub shard per tick:
    // 100,000 users are a trickle of writes, not a burst that stalls Redis every period.
    let mut refresh = tokio::time::interval(task.lease / 3 / Hub::SHARDS as u32);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut slot = 0;
    let mut round: u64 = 0;
    loop {
        tokio::select! {
            op = rx.recv() => {
                let Some(op) = op else { return };
                let mut ops = vec![op];
                while let Ok(op) = rx.try_recv() {
                    ops.push(op);
                }
                apply(&task, ops).await;
            }
            _ = refresh.tick() => {
                slot = (slot + 1) % Hub::SHARDS;
                if slot == 0 {
                    round += 1;
                }
                let presence_too = round.is_multiple_of(presence::KEY_TTL_REFRESH_ROUNDS);
                refresh_shard(&task, slot, presence_too).await;
            }
            () = shutdown.cancelled() => return,
        }
    }
}

fn lease_until(lease: Duration) -> u64 {
    gapless_shared::now_ms() + lease.as_millis() as u64
}

/// The commands that add (or refresh) this edge's entry for `user`, with their shard.
fn add_cmds(cmds: &mut Vec<(Shard, redis::Cmd)>, task: &RegistryTask, user: &UserId, until: u64) {
    let registry = keys::registry(user);
    let shard = task.conn.shard_of(user);
    let mut add = redis::cmd("ZADD");
    add.arg(&registry).arg(until).arg(&task.edge_id);
    // The set outlives no lease by much: a crashed edge's entries vanish with it.
    let mut expire = redis::cmd("PEXPIRE");
    expire.arg(&registry).arg(2 * task.lease.as_millis() as u64);
    cmds.push((shard, add));
    cmds.push((shard, expire));
}

/// The command that sets the expiry of `user`'s presence hash.
fn presence_expiry(user: &UserId) -> redis::Cmd {
    let mut expire = redis::cmd("PEXPIRE");
    expire.arg(presence::key(user)).arg(presence::KEY_TTL_MS);
    expire
}

/// Runs registry commands, one pipeline per shard; `Err` when a pipeline or a command failed.
async fn execute(task: &RegistryTask, cmds: Vec<(Shard, redis::Cmd)>) -> Result<(), StoreError> {
    if cmds.is_empty() {
        return Ok(());
    }
    for reply in task.conn.run_per_shard(cmds, task.timeout).await? {
        reply.map_err(StoreError::from_redis)?;
    }
    Ok(())
}

async fn apply(task: &RegistryTask, ops: Vec<Op>) {
    let until = lease_until(task.lease);
    let mut cmds = Vec::new();
    let mut waiting = Vec::new();
    for op in ops {
        match op {
            Op::Add(user, done) => {
                add_cmds(&mut cmds, task, &user, until);
                waiting.push(done);
            }
            // A connection of the user may have arrived since its last one closed (its
            // add queued before this remove): then the entry stays.
            Op::Remove(user) if !task.hub.conns_of(&user).is_empty() => {}
            Op::Join(user, field, entry) => {
                let key = presence::key(&user);
                let mut set = redis::cmd("HSET");
                set.arg(&key).arg(field).arg(entry);
                cmds.push((task.conn.shard_of(&user), set));
                cmds.push((task.conn.shard_of(&user), presence_expiry(&user)));
            }
            Op::Leave(user, field) => {
                let mut del = redis::cmd("HDEL");
                del.arg(presence::key(&user)).arg(field);
                cmds.push((task.conn.shard_of(&user), del));
            }
            Op::Remove(user) => {
                let mut rem = redis::cmd("ZREM");
                rem.arg(keys::registry(&user)).arg(&task.edge_id);
                cmds.push((task.conn.shard_of(&user), rem));
            }
        }
    }
    let result = execute(task, cmds).await;
    if let Err(e) = result {
        metrics::counter!("gapless_redis_errors_total", "op" => "registry").increment(1);
        gapless_shared::health::log_failure(
            e.is_unavailable(),
            &e,
            "registry update failed; the next refresh retries",
        );
    }
    for done in waiting {
        let _ = done.send(());
    }
}

/// Refreshes the leases of one hub shard's users, and with `presence_too` the expiry of their
/// presence hashes.
async fn refresh_shard(task: &RegistryTask, slot: usize, presence_too: bool) {
    let until = lease_until(task.lease);
    let users = task.hub.shard_users(slot);
    let lease_key = keys::edge_lease(&task.edge_id);
    let mut lease = redis::cmd("SET");
    lease
        .arg(&lease_key)
        .arg(gapless_shared::now_ms())
        .arg("PX")
        .arg(task.lease.as_millis() as u64);
    let mut cmds = vec![(task.conn.shard_of_key(&lease_key), lease)];
    for chunk in users.chunks(REFRESH_CHUNK) {
        for user in chunk {
            add_cmds(&mut cmds, task, user, until);
            if presence_too {
                cmds.push((task.conn.shard_of(user), presence_expiry(user)));
            }
        }
        if let Err(e) = execute(task, std::mem::take(&mut cmds)).await {
            metrics::counter!("gapless_redis_errors_total", "op" => "registry").increment(1);
            gapless_shared::health::log_failure(
                e.is_unavailable(),
                &e,
                "registry refresh failed; retrying next period",
            );
            return;
        }
    }
    let _ = execute(task, cmds).await;
}

/// Removes every entry of this edge (at the end of a drain): its lease, its status report
/// (a stopped edge leaves the status page; a dead one stays, silent), and its users'
/// registry entries.
pub async fn leave(conn: &Store, edge_id: &str, timeout: Duration, users: &[UserId]) {
    let lease_key = keys::edge_lease(edge_id);
    let status_key = keys::edge_status(edge_id);
    let mut del = redis::cmd("DEL");
    del.arg(&lease_key);
    let mut del_status = redis::cmd("DEL");
    del_status.arg(&status_key);
    let mut rem = redis::cmd("ZREM");
    rem.arg(keys::EDGES).arg(edge_id);
    let mut cmds = vec![
        (conn.shard_of_key(&lease_key), del),
        (conn.shard_of_key(&status_key), del_status),
        (conn.shard_of_key(keys::EDGES), rem),
    ];
    for chunk in users.chunks(REFRESH_CHUNK) {
        for user in chunk {
            let mut rem = redis::cmd("ZREM");
            rem.arg(keys::registry(user)).arg(edge_id);
            cmds.push((conn.shard_of(user), rem));
        }
        let _ = conn.run_per_shard(std::mem::take(&mut cmds), timeout).await;
    }
    if !cmds.is_empty() {
        let _ = conn.run_per_shard(cmds, timeout).await;
    }
}
