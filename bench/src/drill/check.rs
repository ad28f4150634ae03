//! The verdict: every device's log checked against what the ingest acknowledged (the
//! ledger). A notification acknowledged and not received is lost; a seq not above the last
//! one on a connection is out of order, and one past the next a gap; a repeat is allowed
//! only after an app restart, and only of what was not stored as acknowledged. Each
//! violation is attributed to the last fault injected before it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use serde::Serialize;

use super::device::DeviceLog;
use super::ledger::ProducerStats;
use super::schedule::{Fault, Injection};
use crate::stats::median;

/// A table row.
#[derive(Debug, Serialize)]
pub(super) struct Row {
    pub(super) fault: Fault,
    pub(super) injected: usize,
    pub(super) survived: usize,
    pub(super) lost: usize,
    pub(super) out_of_order: usize,
    pub(super) bad_duplicates: usize,
    pub(super) recover_ms_median: f64,
    pub(super) recover_ms_max: u64,
}

/// What the devices of one transport saw.
#[derive(Debug, Default, Serialize)]
pub(super) struct TransportRow {
    /// `websocket`, `sse` or `poll`.
    pub(super) transport: &'static str,
    pub(super) devices: usize,
    pub(super) connects: u64,
    pub(super) delivered: u64,
    pub(super) lost: usize,
    pub(super) out_of_order: usize,
    pub(super) bad_duplicates: usize,
    pub(super) wire_duplicates: u64,
    pub(super) client_gaps: u64,
    pub(super) resets: usize,
}

/// The drill's result.
#[derive(Debug, Serialize)]
pub(super) struct Report {
    pub(super) duration_s: u64,
    pub(super) devices: usize,
    pub(super) users: usize,
    pub(super) edges: usize,
    pub(super) rate_per_s: f64,
    pub(super) acknowledged: u64,
    pub(super) delivered: u64,
    pub(super) producer_retries: u64,
    pub(super) producer_deduplicated: u64,
    pub(super) lost: usize,
    pub(super) out_of_order: usize,
    pub(super) non_contiguous: usize,
    pub(super) bad_duplicates: usize,
    pub(super) allowed_duplicates: usize,
    pub(super) wire_duplicates: u64,
    pub(super) client_gaps: u64,
    pub(super) resets: usize,
    pub(super) slow_consumer_edge_rss_growth_kib: u64,
    pub(super) memory_bound_kib: u64,
    /// Lost, out of order and disallowed duplicates before any fault was injected.
    pub(super) before_first_fault: [usize; 3],
    pub(super) rows: Vec<Row>,
    /// The same counts per transport of the devices.
    pub(super) transports: Vec<TransportRow>,
    pub(super) injections: Vec<Injection>,
}

/// Edge RSS growth during the slow-consumer fault above which the drill fails.
pub(super) const MEMORY_BOUND_KIB: u64 = 256 << 10;

/// What the drill ran, for the report.
#[derive(Debug, Clone, Copy)]
pub(super) struct Setting {
    /// Seconds of faults.
    pub(super) duration_s: u64,
    /// Devices, users and edges.
    pub(super) devices: usize,
    pub(super) users: usize,
    pub(super) edges: usize,
    /// Notifications per second.
    pub(super) rate_per_s: f64,
}

/// What the run produced, for [`check`].
pub(super) struct Evidence<'a> {
    /// The fault kinds the target could suffer.
    pub(super) applicable: &'a [Fault],
    /// What the ingest acknowledged: user -> (seq, epoch, ms since the start).
    pub(super) ledger: &'a HashMap<String, Vec<(u64, String, u64)>>,
    /// What each device received.
    pub(super) logs: &'a [DeviceLog],
    /// What was injected, in order.
    pub(super) injections: Vec<Injection>,
    /// Edge RSS growth during the slow-consumer fault, KiB.
    pub(super) slow_growth: u64,
    /// The producers' counters.
    pub(super) producers: &'a [ProducerStats],
}

/// Checks every device's log against the ledger.
pub(super) fn check(setting: Setting, evidence: Evidence<'_>) -> Report {
    let Evidence {
        applicable,
        ledger,
        logs,
        injections,
        slow_growth,
        producers,
    } = evidence;
    // Violations, each with the time it is attributed to.
    let mut lost_at: Vec<u64> = Vec::new();
    let mut disorder_at: Vec<u64> = Vec::new();
    let mut bad_dup_at: Vec<u64> = Vec::new();
    let mut non_contiguous = 0usize;
    let mut allowed_duplicates = 0usize;
    let mut delivered = 0u64;
    let mut transports: Vec<TransportRow> = Vec::new();
    for log in logs {
        let before = (lost_at.len(), disorder_at.len(), bad_dup_at.len());
        delivered += log.received.len() as u64;
        // Per connection: strictly increasing within an epoch, and contiguous.
        let mut last: Option<(u32, Arc<str>, u64)> = None;
        for r in &log.received {
            if let Some((conn, epoch, seq)) = &last
                && *conn == r.conn
                && **epoch == *r.epoch
            {
                if r.seq <= *seq {
                    disorder_at.push(r.at_ms);
                } else if r.seq != seq + 1 {
                    non_contiguous += 1;
                    disorder_at.push(r.at_ms);
                }
            }
            last = Some((r.conn, r.epoch.clone(), r.seq));
        }
        // Duplicates: only after an app restart, and only of what was not stored as acked.
        let floors: BTreeMap<u32, u64> = log.forgets.iter().copied().collect();
        let mut seen: HashSet<(Arc<str>, u64)> = HashSet::new();
        for r in &log.received {
            if !seen.insert((r.epoch.clone(), r.seq)) {
                let floor = floors.range(..=r.conn).next_back().map(|(_, f)| *f);
                match floor {
                    Some(f) if r.seq > f => allowed_duplicates += 1,
                    _ => bad_dup_at.push(r.at_ms),
                }
            }
        }
        // No loss: every acknowledged seq of the user, in the epoch the device is in.
        if let Some(acked) = ledger.get(&log.user) {
            let got: HashSet<(&str, u64)> =
                log.received.iter().map(|r| (&*r.epoch, r.seq)).collect();
            for (seq, epoch, at) in acked {
                if !got.contains(&(epoch.as_str(), *seq)) {
                    lost_at.push(*at);
                }
            }
        }
        let name = log.transport.name();
        let row = match transports.iter().position(|t| t.transport == name) {
            Some(k) => &mut transports[k],
            None => {
                transports.push(TransportRow {
                    transport: name,
                    ..TransportRow::default()
                });
                transports.last_mut().expect("just pushed")
            }
        };
        row.devices += 1;
        row.connects += u64::from(log.connects);
        row.delivered += log.received.len() as u64;
        row.lost += lost_at.len() - before.0;
        row.out_of_order += disorder_at.len() - before.1;
        row.bad_duplicates += bad_dup_at.len() - before.2;
        row.wire_duplicates += log.wire_duplicates;
        row.client_gaps += log.client_gaps;
        row.resets += log.resets.len();
    }
    transports.sort_by_key(|t| t.transport);
    // Attribute each violation to the last fault injected before it.
    // Violations before the first fault count under `None`.
    let attribute = |times: &[u64]| -> HashMap<Option<Fault>, usize> {
        let mut by = HashMap::new();
        for t in times {
            let kind = injections
                .iter()
                .rev()
                .find(|i| i.at_ms <= *t)
                .map(|i| i.kind);
            *by.entry(kind).or_insert(0) += 1;
        }
        by
    };
    let (lost_by, disorder_by, dup_by) = (
        attribute(&lost_at),
        attribute(&disorder_at),
        attribute(&bad_dup_at),
    );
    let rows = applicable
        .iter()
        .map(|kind| {
            let of_kind: Vec<&Injection> = injections.iter().filter(|i| i.kind == *kind).collect();
            let times: Vec<f64> = of_kind
                .iter()
                .filter_map(|i| i.recovered_ms.map(|m| m as f64))
                .collect();
            let lost = lost_by.get(&Some(*kind)).copied().unwrap_or(0);
            let out_of_order = disorder_by.get(&Some(*kind)).copied().unwrap_or(0);
            let bad_duplicates = dup_by.get(&Some(*kind)).copied().unwrap_or(0);
            Row {
                fault: *kind,
                injected: of_kind.len(),
                survived: if lost + out_of_order + bad_duplicates == 0 {
                    times.len()
                } else {
                    0
                },
                lost,
                out_of_order,
                bad_duplicates,
                recover_ms_median: median(&times),
                recover_ms_max: of_kind
                    .iter()
                    .filter_map(|i| i.recovered_ms)
                    .max()
                    .unwrap_or(0),
            }
        })
        .collect();
    let before_first_fault = [
        lost_by.get(&None).copied().unwrap_or(0),
        disorder_by.get(&None).copied().unwrap_or(0),
        dup_by.get(&None).copied().unwrap_or(0),
    ];
    Report {
        before_first_fault,
        duration_s: setting.duration_s,
        devices: setting.devices,
        users: setting.users,
        edges: setting.edges,
        rate_per_s: setting.rate_per_s,
        acknowledged: producers.iter().map(|p| p.acknowledged).sum(),
        delivered,
        producer_retries: producers.iter().map(|p| p.retries).sum(),
        producer_deduplicated: producers.iter().map(|p| p.deduplicated).sum(),
        lost: lost_at.len(),
        out_of_order: disorder_at.len(),
        non_contiguous,
        bad_duplicates: bad_dup_at.len(),
        allowed_duplicates,
        wire_duplicates: logs.iter().map(|l| l.wire_duplicates).sum(),
        client_gaps: logs.iter().map(|l| l.client_gaps).sum(),
        resets: logs.iter().map(|l| l.resets.len()).sum(),
        slow_consumer_edge_rss_growth_kib: slow_growth,
        memory_bound_kib: MEMORY_BOUND_KIB,
        rows,
        transports,
        injections,
    }
}

pub(super) fn print(r: &Report) {
    println!(
        "drill: {} s of faults, {} devices of {} users on {} edges, {} notifications/s",
        r.duration_s, r.devices, r.users, r.edges, r.rate_per_s
    );
    println!(
        "acknowledged {} notifications, delivered {} (to all devices), producer retries {}, retried writes recognised by idempotency key {}",
        r.acknowledged, r.delivered, r.producer_retries, r.producer_deduplicated
    );
    println!();
    println!(
        "| fault | injected | survived | lost | out of order | duplicates (not allowed) | recovery p50 ms | recovery max ms |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for row in &r.rows {
        println!(
            "| {:?} | {} | {} | {} | {} | {} | {:.0} | {} |",
            row.fault,
            row.injected,
            row.survived,
            row.lost,
            row.out_of_order,
            row.bad_duplicates,
            row.recover_ms_median,
            row.recover_ms_max
        );
    }
    let [lost, disorder, dups] = r.before_first_fault;
    println!("| (before the first fault) | - | - | {lost} | {disorder} | {dups} | - | - |");
    println!();
    println!(
        "lost {}, out of order {} (of which gaps within a connection {}), duplicates not allowed {}, duplicates allowed (unacked, after an app restart) {}, wire duplicates dropped by the client {}, gaps the client caught {}, resets {}",
        r.lost,
        r.out_of_order,
        r.non_contiguous,
        r.bad_duplicates,
        r.allowed_duplicates,
        r.wire_duplicates,
        r.client_gaps,
        r.resets
    );
    println!();
    println!(
        "| transport | devices | connects | delivered | lost | out of order | duplicates (not allowed) | wire duplicates | client gaps | resets |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for t in &r.transports {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            t.transport,
            t.devices,
            t.connects,
            t.delivered,
            t.lost,
            t.out_of_order,
            t.bad_duplicates,
            t.wire_duplicates,
            t.client_gaps,
            t.resets
        );
    }
    println!();
    println!(
        "edge memory during the slow-consumer fault: +{} KiB (bound {} KiB)",
        r.slow_consumer_edge_rss_growth_kib, r.memory_bound_kib
    );
    let failed = r
        .rows
        .iter()
        .filter(|row| row.lost + row.out_of_order + row.bad_duplicates > 0 || row.injected == 0)
        .count()
        + usize::from(r.before_first_fault.iter().sum::<usize>() > 0);
    for i in &r.injections {
        println!(
            "  {:>7} ms {:?}: {} (recovered in {})",
            i.at_ms,
            i.kind,
            i.note,
            i.recovered_ms
                .map_or_else(|| "never".to_owned(), |m| format!("{m} ms"))
        );
    }
    // Over the fault kinds and the time before the first fault: passed when nothing was
    // lost, reordered or duplicated (and, for a kind, when it was injected).
    println!(
        "drill: {} passed, {} failed",
        (r.rows.len() + 1).saturating_sub(failed),
        failed
    );
}

#[cfg(test)]
mod tests {
    use super::super::device::Received;
    use super::*;

    const SETTING: Setting = Setting {
        duration_s: 10,
        devices: 1,
        users: 1,
        edges: 2,
        rate_per_s: 1.0,
    };

    /// A device of user `u` that received `(connection, seq)` in this order, at 100 ms
    /// apart, all of epoch `e`; `forgets`: its app restarts.
    fn log(received: &[(u32, u64)], forgets: &[(u32, u64)]) -> DeviceLog {
        DeviceLog {
            user: "u".into(),
            received: received
                .iter()
                .enumerate()
                .map(|(i, &(conn, seq))| Received {
                    conn,
                    epoch: Arc::from("e"),
                    seq,
                    at_ms: 100 * i as u64,
                })
                .collect(),
            forgets: forgets.to_vec(),
            ..DeviceLog::default()
        }
    }

    /// Seqs 1..=n of user `u` acknowledged, seq s at `s * 100` ms.
    fn ledger(n: u64) -> HashMap<String, Vec<(u64, String, u64)>> {
        HashMap::from([(
            "u".to_owned(),
            (1..=n).map(|s| (s, "e".to_owned(), s * 100)).collect(),
        )])
    }

    fn run(
        ledger: &HashMap<String, Vec<(u64, String, u64)>>,
        log: DeviceLog,
        injections: Vec<Injection>,
    ) -> Report {
        let logs = [log];
        check(
            SETTING,
            Evidence {
                applicable: &[Fault::EdgeKill, Fault::RedisKill],
                ledger,
                logs: &logs,
                injections,
                slow_growth: 0,
                producers: &[],
            },
        )
    }

    fn counts(r: &Report) -> [usize; 5] {
        [
            r.lost,
            r.out_of_order,
            r.non_contiguous,
            r.bad_duplicates,
            r.allowed_duplicates,
        ]
    }

    #[test]
    fn an_exact_history_passes() {
        let r = run(&ledger(3), log(&[(1, 1), (1, 2), (2, 3)], &[]), Vec::new());
        assert_eq!(counts(&r), [0; 5]);
        assert_eq!(r.delivered, 3);
    }

    #[test]
    fn an_acknowledged_seq_never_received_is_lost() {
        let r = run(&ledger(3), log(&[(1, 1), (1, 2)], &[]), Vec::new());
        assert_eq!(counts(&r), [1, 0, 0, 0, 0]);
        assert_eq!(r.transports[0].lost, 1);
    }

    #[test]
    fn a_seq_out_of_order_or_skipped_on_a_connection_is_caught() {
        // 3 after 1 skips 2 (not contiguous); 2 after 3 goes back.
        let r = run(&ledger(3), log(&[(1, 1), (1, 3), (1, 2)], &[]), Vec::new());
        assert_eq!(counts(&r), [0, 2, 1, 0, 0]);
        // Across connections a resume may start anywhere after the position: no disorder.
        let r = run(&ledger(3), log(&[(1, 1), (1, 2), (2, 3)], &[]), Vec::new());
        assert_eq!(r.out_of_order, 0);
    }

    #[test]
    fn a_repeat_is_allowed_only_after_a_restart_and_above_the_stored_ack() {
        // The app restarted before connection 2 with ack 1 stored: 2 and 3 may come again.
        let allowed = log(&[(1, 1), (1, 2), (1, 3), (2, 2), (2, 3)], &[(2, 1)]);
        assert_eq!(
            counts(&run(&ledger(3), allowed, Vec::new())),
            [0, 0, 0, 0, 2]
        );
        // Seq 1 was stored as acknowledged: delivering it again is a violation.
        let below = log(&[(1, 1), (1, 2), (2, 1), (2, 2)], &[(2, 1)]);
        assert_eq!(counts(&run(&ledger(2), below, Vec::new())), [0, 0, 0, 1, 1]);
        // Without a restart, any repeat is one.
        let no_restart = log(&[(1, 1), (1, 2), (2, 2)], &[]);
        assert_eq!(
            counts(&run(&ledger(2), no_restart, Vec::new())),
            [0, 0, 0, 1, 0]
        );
    }

    #[test]
    fn violations_count_against_the_last_fault_before_them() {
        let injections = vec![
            Injection {
                kind: Fault::EdgeKill,
                at_ms: 150,
                recovered_ms: Some(40),
                note: String::new(),
            },
            Injection {
                kind: Fault::RedisKill,
                at_ms: 10_000,
                recovered_ms: Some(90),
                note: String::new(),
            },
        ];
        // Seq 1 (acknowledged at 100 ms) lost before any fault, seq 3 (300 ms) after the
        // edge kill; the Redis kill saw nothing go wrong.
        let r = run(&ledger(3), log(&[(1, 2)], &[]), injections);
        assert_eq!(r.lost, 2);
        assert_eq!(r.before_first_fault, [1, 0, 0]);
        let row = |kind| r.rows.iter().find(|row| row.fault == kind).expect("a row");
        assert_eq!(
            (row(Fault::EdgeKill).lost, row(Fault::EdgeKill).survived),
            (1, 0)
        );
        assert_eq!(
            (row(Fault::RedisKill).lost, row(Fault::RedisKill).survived),
            (0, 1)
        );
        assert_eq!(row(Fault::RedisKill).recover_ms_max, 90);
    }
}
