//! What the drill injects and when: the kinds of fault, their order, and the record of each
//! injection (when, how long until every device held everything acknowledged before it).

use serde::Serialize;

/// The kinds of fault, in schedule order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub(super) enum Fault {
    EdgeKill,
    EdgeDrain,
    RedisKill,
    PubsubKill,
    SlowConsumer,
    Blackhole,
    SlotMigration,
    PrimaryFailover,
}

impl Fault {
    /// It needs the processes the drill started (to kill, restart or reconfigure them).
    pub(super) fn needs_fleet(self) -> bool {
        matches!(
            self,
            Fault::EdgeKill
                | Fault::EdgeDrain
                | Fault::RedisKill
                | Fault::SlotMigration
                | Fault::PrimaryFailover
        )
    }
}

/// The fault kinds in schedule order: on a cluster, with a slot migration and a failover.
pub(super) fn schedule(cluster: bool) -> Vec<Fault> {
    let mut faults = vec![
        Fault::EdgeKill,
        Fault::PubsubKill,
        Fault::EdgeDrain,
        Fault::Blackhole,
        Fault::RedisKill,
        Fault::SlowConsumer,
    ];
    if cluster {
        faults.insert(2, Fault::SlotMigration);
        faults.insert(5, Fault::PrimaryFailover);
    }
    faults
}

/// One injected fault.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Injection {
    pub(super) kind: Fault,
    pub(super) at_ms: u64,
    /// Until every device held everything acknowledged before the injection; `None` if that
    /// never happened before the next fault.
    pub(super) recovered_ms: Option<u64>,
    pub(super) note: String,
}
