//! What the workers, the producers and the samplers report, merged as the run goes, and
//! the latency summaries read from it.

use std::sync::{Arc, Mutex};

use hdrhistogram::Histogram;

use super::worker::TickReport;
use crate::stats::{Percentiles, percentiles};

/// What the workers and the producers report, merged.
pub(super) struct Live {
    /// Latest counters of each worker.
    pub(super) workers: Vec<TickReport>,
    /// Latencies since the last timeline tick.
    pub(super) interval: Histogram<u64>,
    /// Latencies of the measured phase.
    pub(super) phase: Histogram<u64>,
    /// Latencies of the whole run.
    pub(super) all: Histogram<u64>,
    /// Latencies of the measured phase's seconds in which PID 1 stayed quiet (and in the
    /// second before): see [`PID1`].
    pub(super) quiet: Histogram<u64>,
    /// Seconds of the measured phase, and how many of them went into `quiet`.
    pub(super) measured_ticks: u64,
    pub(super) quiet_ticks: u64,
    /// Recording into `phase`.
    pub(super) measuring: bool,
    /// Redis round trips since the last tick, ms.
    pub(super) rtt_interval: Vec<f64>,
    /// Redis round trips of the run, ms.
    pub(super) rtt_all: Vec<f64>,
    /// An event to label the next tick with.
    pub(super) event: Option<String>,
}

impl Live {
    /// Nothing merged yet from `procs` workers.
    pub(super) fn new(procs: usize) -> Self {
        Self {
            workers: (0..procs).map(|_| TickReport::default()).collect(),
            interval: super::worker::histogram(),
            phase: super::worker::histogram(),
            all: super::worker::histogram(),
            quiet: super::worker::histogram(),
            measured_ticks: 0,
            quiet_ticks: 0,
            measuring: false,
            rtt_interval: Vec::new(),
            rtt_all: Vec::new(),
            event: None,
        }
    }

    pub(super) fn sum(&self, f: impl Fn(&TickReport) -> u64) -> u64 {
        self.workers.iter().map(f).sum()
    }

    pub(super) fn mark(&mut self, event: String) {
        self.event = Some(match self.event.take() {
            Some(e) => format!("{e}; {event}"),
            None => event,
        });
    }
}

pub(super) type Shared = Arc<Mutex<Live>>;

pub(super) fn lock(live: &Shared) -> std::sync::MutexGuard<'_, Live> {
    live.lock().expect("live lock is never poisoned")
}

/// Percentiles of a µs histogram, in ms.
pub(super) fn hist_percentiles(h: &Histogram<u64>) -> Percentiles {
    if h.is_empty() {
        return percentiles(Vec::new());
    }
    let ms = |us: u64| us as f64 / 1000.0;
    Percentiles {
        p50: ms(h.value_at_quantile(0.50)),
        p90: ms(h.value_at_quantile(0.90)),
        p99: ms(h.value_at_quantile(0.99)),
        p999: ms(h.value_at_quantile(0.999)),
        max: ms(h.max()),
    }
}

/// The latency distribution in log-spaced buckets: (upper bound ms, count).
pub(super) fn distribution(h: &Histogram<u64>) -> Vec<(f64, u64)> {
    if h.is_empty() {
        return Vec::new();
    }
    h.iter_log(100, 1.25)
        .filter(|v| v.count_since_last_iteration() > 0 || v.percentile() < 100.0)
        .map(|v| {
            (
                v.value_iterated_to() as f64 / 1000.0,
                v.count_since_last_iteration(),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::worker;
    use super::*;

    #[test]
    fn hdr_percentiles_are_in_ms() {
        let mut h = worker::histogram();
        for us in 1..=1000u64 {
            h.record(us * 10).expect("in range");
        }
        let p = hist_percentiles(&h);
        assert!((p.p50 - 5.0).abs() < 0.05, "{p:?}");
        assert!((p.max - 10.0).abs() < 0.05, "{p:?}");
        assert!(!distribution(&h).is_empty());
    }
}
