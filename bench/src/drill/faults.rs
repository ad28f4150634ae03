//! Injecting one fault into the running system: real processes killed, drained or
//! restarted, pub/sub connections killed, a proxy blackholing connections, devices frozen
//! while their user is flooded, a user's slot migrated or its primary failed over.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, bail};
use gapless_shared::ids::UserId;
use gapless_shared::process::RedisCluster;
use gapless_shared::store::Store;
use tokio::time::Instant;

use super::device::DeviceShared;
use super::ledger::Ledger;
use super::proxy::Proxy;
use super::schedule::Fault;
use crate::fleet::FleetRedis;
use crate::producer::{notification, payload};
use crate::stats::rss_kib;
use crate::target::Target;

/// The fleet's cluster, or an error saying the fault needs one.
pub(super) fn cluster(target: &mut Target, kind: Fault) -> anyhow::Result<&mut RedisCluster> {
    match &mut target.fleet(kind)?.redis {
        FleetRedis::Cluster(cluster) => Ok(cluster),
        FleetRedis::Single(_) => bail!("{kind:?} needs a Redis Cluster (--cluster)"),
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn inject(
    kind: Fault,
    edge: usize,
    target: &mut Target,
    store: &Store,
    proxies: &[Proxy],
    shared: &[Arc<DeviceShared>],
    users: &[String],
    slow_user: &str,
    hb: u64,
    slow_growth: &mut u64,
    start: &Instant,
    ledger: &Ledger,
) -> anyhow::Result<String> {
    match kind {
        Fault::EdgeKill => {
            let fleet = target.fleet(kind)?;
            fleet.kill_edge(edge);
            tokio::time::sleep(Duration::from_millis(500)).await;
            fleet.restart_edge(edge).await?;
            Ok(format!("SIGKILL edge-{edge}, restarted after 500 ms"))
        }
        Fault::EdgeDrain => {
            let fleet = target.fleet(kind)?;
            let (took, ok) = fleet.term_edge(edge).await?;
            fleet.restart_edge(edge).await?;
            if !ok {
                bail!("edge-{edge} did not exit cleanly on SIGTERM");
            }
            Ok(format!(
                "SIGTERM edge-{edge}: exited in {} ms, restarted",
                took.as_millis()
            ))
        }
        Fault::RedisKill => {
            let user = &users[edge % users.len()];
            match &mut target.fleet(kind)?.redis {
                FleetRedis::Single(redis) => {
                    redis.kill();
                    tokio::time::sleep(Duration::from_millis(1000)).await;
                    redis.restart()?;
                    Ok("SIGKILL redis, restarted after 1 s (AOF, fsync always)".into())
                }
                FleetRedis::Cluster(cluster) => tokio::task::block_in_place(|| {
                    let owner = cluster.owner_of(cluster.slot_of_user(&UserId::parse(user)?)?)?;
                    let promoted = cluster.kill_primary(owner)?;
                    cluster.node_mut(owner).restart()?;
                    cluster.wait_stable()?;
                    Ok(format!(
                        "SIGKILL of node {owner}, the primary of {user}'s slot; node {promoted} promoted, node {owner} restarted as its replica"
                    ))
                }),
            }
        }
        Fault::SlotMigration => {
            let user = &users[edge % users.len()];
            let cluster = cluster(target, kind)?;
            tokio::task::block_in_place(|| {
                let slot = cluster.slot_of_user(&UserId::parse(user)?)?;
                let from = cluster.owner_of(slot)?;
                let to = cluster.other_primary(from).context("another primary")?;
                cluster.move_slot(slot, to)?;
                Ok(format!(
                    "moved slot {slot} ({user}) from node {from} to node {to}"
                ))
            })
        }
        Fault::PrimaryFailover => {
            let user = &users[edge % users.len()];
            let cluster = cluster(target, kind)?;
            tokio::task::block_in_place(|| {
                let owner = cluster.owner_of(cluster.slot_of_user(&UserId::parse(user)?)?)?;
                let promoted = cluster.failover(owner)?;
                Ok(format!(
                    "CLUSTER FAILOVER: node {promoted} took over {user}'s slot from node {owner}"
                ))
            })
        }
        Fault::PubsubKill => {
            // Every primary: on a cluster each edge's subscription is at its channel's shard.
            let timeout = Duration::from_secs(2);
            let mut killed = 0u64;
            for primary in store.clone().primaries(timeout).await? {
                killed += store
                    .clone()
                    .on_node::<u64>(
                        &primary,
                        redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub"),
                        timeout,
                    )
                    .await?;
            }
            Ok(format!("CLIENT KILL TYPE pubsub: {killed} connections"))
        }
        Fault::Blackhole => {
            let n = proxies[edge % proxies.len()]
                .blackhole(Duration::from_millis(3 * hb))
                .await;
            Ok(format!(
                "blackholed {n} connections behind proxy {edge} for {} ms",
                3 * hb
            ))
        }
        Fault::SlowConsumer => {
            // Freeze the slow user's devices and flood the user with large notifications.
            let freeze_ms = 6 * hb;
            let until = start.elapsed().as_millis() as u64 + freeze_ms;
            for (i, s) in shared.iter().enumerate() {
                if users[i % users.len()] == slow_user {
                    s.freeze_until_ms.store(until, Ordering::Relaxed);
                }
            }
            // Edge memory can only be sampled for edges this drill started.
            let edge_pids = target.edge_pids();
            let before: Vec<u64> = edge_pids.iter().map(|p| rss_kib(*p).unwrap_or(0)).collect();
            let ingest = target.ingest(Duration::from_secs(10))?;
            let pad = payload(&serde_json::json!({"pad": "x".repeat(16 << 10)}));
            let items: Vec<_> = (0..300)
                .map(|_| notification(slow_user, &pad, None))
                .collect();
            // What the ingest acknowledges goes to the ledger: the frozen devices must get
            // all of it once they resume.
            let mut flooded = 0;
            for _ in 0..4 {
                let Ok(results) = ingest.append_batch(&items).await else {
                    continue;
                };
                let at = start.elapsed().as_millis() as u64;
                let mut ledger = ledger.lock().expect("ledger lock is never poisoned");
                for appended in results.into_iter().flatten() {
                    flooded += 1;
                    ledger.entry(slow_user.to_owned()).or_default().push((
                        appended.seq,
                        appended.epoch,
                        at,
                    ));
                }
            }
            let sample_until = Instant::now() + Duration::from_millis(freeze_ms);
            let mut peak = before.clone();
            while Instant::now() < sample_until {
                for (p, pid) in peak.iter_mut().zip(&edge_pids) {
                    *p = (*p).max(rss_kib(*pid).unwrap_or(0));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let growth = peak
                .iter()
                .zip(&before)
                .map(|(p, b)| p.saturating_sub(*b))
                .max()
                .unwrap_or(0);
            *slow_growth = (*slow_growth).max(growth);
            Ok(format!(
                "froze {slow_user}'s devices {freeze_ms} ms, flooded {flooded} x 16 KiB; edge RSS +{growth} KiB"
            ))
        }
    }
}
