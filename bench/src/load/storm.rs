//! The storm: every edge SIGKILLed at once and restarted, timed until every device has
//! reconnected and caught up with exact gaps.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::time::Instant;

use super::live::{Shared, lock};
use super::report::Storm;
use crate::target::Target;

/// Kills every edge with SIGKILL, restarts them, and times the recovery.
pub(super) async fn run_storm(
    target: &mut Target,
    live: &Shared,
    sent: &AtomicU64,
    fleet_pids: &Mutex<Vec<(String, u32)>>,
    n: u64,
) -> anyhow::Result<Storm> {
    let fleet = target.fleet.as_mut().context("the storm needs the fleet")?;
    let connects_before = lock(live).sum(|w| w.connects);
    let killed = Instant::now();
    for i in 0..fleet.edges.len() {
        fleet.kill_edge(i);
    }
    lock(live).mark("every edge SIGKILLed".into());
    for i in 0..fleet.edges.len() {
        fleet.spawn_edge(i)?;
    }
    for i in 0..fleet.edges.len() {
        let url = fleet.edges[i].http_url.clone();
        fleet.wait_ready(&url).await?;
    }
    let edges_back_s = killed.elapsed().as_secs_f64();
    *fleet_pids.lock().expect("pids lock is never poisoned") = fleet.pids();
    lock(live).mark("edges restarted".into());
    let deadline = killed + Duration::from_secs(180);
    // Every device reconnected: each has a new connection, and all are open.
    let all_resumed_s = loop {
        let (open, connects) = {
            let l = lock(live);
            (l.sum(|w| w.open), l.sum(|w| w.connects))
        };
        if open >= n && connects >= connects_before + n {
            break killed.elapsed().as_secs_f64();
        }
        if Instant::now() > deadline {
            bail!("storm: only {open} of {n} connections back after 180 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    lock(live).mark("all resumed".into());
    // Everything acknowledged up to that moment delivered.
    let due = sent.load(Ordering::Relaxed);
    let caught_up_s = loop {
        if lock(live).sum(|w| w.delivered) >= due {
            break killed.elapsed().as_secs_f64();
        }
        if Instant::now() > deadline {
            bail!("storm: the backlog was not delivered within 180 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    lock(live).mark("caught up".into());
    Ok(Storm {
        connections: n,
        edges_back_s,
        all_resumed_s,
        caught_up_s,
        reconnects: lock(live).sum(|w| w.connects) - connects_before,
    })
}
