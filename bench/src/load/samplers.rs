//! What is sampled while the load runs: every process's memory and CPU from /proc and the
//! merged latencies, once a second into the timeline (with a progress line), and Redis's
//! round trip every 50 ms.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::live::{Live, Shared, hist_percentiles, lock};
use super::report::{ProcessSummary, Tick};
use super::traffic::ProducerMeters;
use super::workers::Worker;
use crate::fleet::Fleet;
use crate::stats::{cpu_seconds, percentiles, rss_kib};
use crate::target::Target;

/// What the sampler watches: fleet processes (re-read each tick: edges restart), the
/// workers and this process.
pub(super) struct ProcessList {
    /// The fleet's processes; the storm refreshes them after restarting the edges.
    pub(super) fleet: Arc<Mutex<Vec<(String, u32)>>>,
    /// The workers and this process.
    pub(super) fixed: Vec<(String, u32)>,
}

pub(super) fn process_list(target: &Target, workers: &[Worker]) -> ProcessList {
    let mut fixed: Vec<(String, u32)> = workers
        .iter()
        .filter_map(|w| w.child.id().map(|p| (w.name.clone(), p)))
        .collect();
    fixed.push(("bench".into(), std::process::id()));
    fixed.push((PID1.into(), 1));
    ProcessList {
        fleet: Arc::new(Mutex::new(
            target.fleet.as_ref().map(Fleet::pids).unwrap_or_default(),
        )),
        fixed,
    }
}

/// Samples every second until `stop`; returns each process's summary.
pub(super) async fn sample_timeline(
    started: Instant,
    live: Shared,
    timeline: Arc<Mutex<Vec<Tick>>>,
    processes: ProcessList,
    meters: Arc<ProducerMeters>,
    stop: CancellationToken,
    n: usize,
) -> Vec<ProcessSummary> {
    use std::collections::BTreeMap;
    let mut cpu_last: BTreeMap<(String, u32), f64> = BTreeMap::new();
    let mut summary: BTreeMap<String, (u64, f64, f64, u32)> = BTreeMap::new();
    let mut last = Instant::now();
    let mut pid1_was_busy = false;
    let mut interval = tokio::time::interval(Duration::from_secs(1));
    interval.tick().await;
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    loop {
        let stopping = tokio::select! {
            _ = interval.tick() => false,
            () = stop.cancelled() => true,
        };
        let dt = last.elapsed().as_secs_f64().max(1e-3);
        last = Instant::now();
        let mut pids = processes.fixed.clone();
        pids.extend(
            processes
                .fleet
                .lock()
                .expect("pids lock is never poisoned")
                .iter()
                .cloned(),
        );
        let mut procs = Vec::new();
        for (name, pid) in pids {
            let rss = rss_kib(pid).unwrap_or(0);
            let cpu_now = cpu_seconds(pid);
            let pct = match (cpu_now, cpu_last.get(&(name.clone(), pid))) {
                (Some(now), Some(before)) => 100.0 * (now - before) / dt,
                _ => 0.0,
            };
            if let Some(now) = cpu_now {
                cpu_last.insert((name.clone(), pid), now);
            }
            let s = summary.entry(name.clone()).or_insert((0, 0.0, 0.0, 0));
            s.0 = s.0.max(rss);
            s.1 += pct;
            s.2 = s.2.max(pct);
            s.3 += 1;
            procs.push((name, rss, (pct * 10.0).round() / 10.0));
        }
        let pid1_busy = pid1_busy(&procs);
        let tick = {
            let mut l = lock(&live);
            let p = hist_percentiles(&l.interval);
            if l.measuring {
                l.measured_ticks += 1;
                if !pid1_busy && !pid1_was_busy {
                    l.quiet_ticks += 1;
                    let Live {
                        quiet, interval, ..
                    } = &mut *l;
                    // Same bounds: adding cannot fail.
                    let _ = quiet.add(&*interval);
                }
            }
            pid1_was_busy = pid1_busy;
            l.interval.reset();
            let rtt = percentiles(std::mem::take(&mut l.rtt_interval));
            Tick {
                t: (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
                connections: l.sum(|w| w.open),
                sent: meters.sent.load(Ordering::Relaxed),
                delivered: l.sum(|w| w.delivered),
                p50_ms: p.p50,
                p99_ms: p.p99,
                p999_ms: p.p999,
                max_ms: p.max,
                redis_rtt_p99_ms: rtt.p99,
                producer_lag_ms: meters.lag_us.swap(0, Ordering::Relaxed) as f64 / 1000.0,
                processes: procs,
                event: l.event.take(),
            }
        };
        let edges_mib: u64 = tick
            .processes
            .iter()
            .filter(|p| p.0.starts_with("edge"))
            .map(|p| p.1)
            .sum::<u64>()
            >> 10;
        let line = format!(
            "[{:>5.0} s] connections {:>6}/{n}  sent {:>8}  delivered {:>8}  p99 {:>7.2} ms  p99.9 {:>7.2} ms  edges RSS {edges_mib} MiB{}",
            tick.t,
            tick.connections,
            tick.sent,
            tick.delivered,
            tick.p99_ms,
            tick.p999_ms,
            tick.event
                .as_deref()
                .map(|e| format!("  [{e}]"))
                .unwrap_or_default()
        );
        if terminal {
            eprint!("\r{line}\x1b[K");
        } else if tick.event.is_some() || (tick.t as u64).is_multiple_of(5) {
            eprintln!("{line}");
        }
        timeline
            .lock()
            .expect("timeline lock is never poisoned")
            .push(tick);
        if stopping {
            if terminal {
                eprintln!();
            }
            return summary
                .into_iter()
                .map(|(name, (rss, sum, peak, count))| ProcessSummary {
                    name,
                    peak_rss_kib: rss,
                    cpu_mean_pct: (10.0 * sum / f64::from(count.max(1))).round() / 10.0,
                    cpu_peak_pct: (peak * 10.0).round() / 10.0,
                })
                .collect();
        }
    }
}

/// PID 1's name among the sampled processes. On this project's VM, PID 1 is the sandbox's
/// agent (`/process_api`, nice -10), which walks every open file descriptor of every process
/// about every 3.1 s: at 200,000 sockets that is ~170 ms of a core in the kernel, during
/// which the system under test has one core instead of two (BENCHMARKS.md). On an ordinary
/// host PID 1 is init and stays quiet.
pub(super) const PID1: &str = "pid 1";

/// CPU (% of a core over a second) above which PID 1 counts as busy in that second.
pub(super) const PID1_BUSY_PCT: f64 = 5.0;

/// Whether PID 1 was busy in a tick whose per-process samples are `processes`.
pub(super) fn pid1_busy(processes: &[(String, u64, f64)]) -> bool {
    processes
        .iter()
        .any(|(name, _, pct)| name == PID1 && *pct > PID1_BUSY_PCT)
}

/// Redis PING every 50 ms until `stop`.
pub(super) async fn sample_rtt(url: String, live: Shared, stop: CancellationToken) {
    // On a cluster: the round trip to its first seed node.
    let first = url.split(',').next().unwrap_or_default();
    let Ok(client) = redis::Client::open(first) else {
        return;
    };
    let mut conn = None;
    while !stop.is_cancelled() {
        if conn.is_none() {
            conn = client.get_multiplexed_async_connection().await.ok();
        }
        if let Some(c) = conn.as_mut() {
            let started = std::time::Instant::now();
            let ok = tokio::time::timeout(
                Duration::from_secs(1),
                redis::cmd("PING").query_async::<String>(c),
            )
            .await
            .is_ok_and(|r| r.is_ok());
            if ok {
                let ms = started.elapsed().as_secs_f64() * 1000.0;
                let mut l = lock(&live);
                l.rtt_interval.push(ms);
                l.rtt_all.push(ms);
            } else {
                conn = None;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
