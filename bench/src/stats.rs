//! Percentiles of recorded samples.

use serde::Serialize;

/// Summary of a set of durations, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize)]
pub struct Percentiles {
    /// Median.
    #[serde(deserialize_with = "f64_or_nan")]
    pub p50: f64,
    /// 90th percentile.
    #[serde(deserialize_with = "f64_or_nan")]
    pub p90: f64,
    /// 99th percentile.
    #[serde(deserialize_with = "f64_or_nan")]
    pub p99: f64,
    /// 99.9th percentile.
    #[serde(deserialize_with = "f64_or_nan")]
    pub p999: f64,
    /// Largest.
    #[serde(deserialize_with = "f64_or_nan")]
    pub max: f64,
}

/// Percentiles of `samples_ms` (nearest rank); zeros when there are none.
pub fn percentiles(mut samples_ms: Vec<f64>) -> Percentiles {
    if samples_ms.is_empty() {
        return Percentiles {
            p50: 0.0,
            p90: 0.0,
            p99: 0.0,
            p999: 0.0,
            max: 0.0,
        };
    }
    samples_ms.sort_by(f64::total_cmp);
    let at = |q: f64| {
        let rank = ((q * samples_ms.len() as f64).ceil() as usize).clamp(1, samples_ms.len());
        samples_ms[rank - 1]
    };
    Percentiles {
        p50: at(0.50),
        p90: at(0.90),
        p99: at(0.99),
        p999: at(0.999),
        max: samples_ms[samples_ms.len() - 1],
    }
}

/// Median of `values`; 0 when empty.
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// CPU time (user + system) a process has used so far, in seconds, from `/proc/<pid>/stat`.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // USER_HZ is 100 on every Linux this runs on.
    Some((utime + stime) / 100.0)
}

/// Resident memory of a process, KiB, from `/proc/<pid>/status`.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// An f64 as written by serde_json, which writes NaN and infinities as `null`: read back as
/// NaN.
pub fn f64_or_nan<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(<Option<f64> as serde::Deserialize>::deserialize(d)?.unwrap_or(f64::NAN))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let p = percentiles((1..=1000).map(f64::from).collect());
        assert_eq!(
            (p.p50, p.p90, p.p99, p.p999, p.max),
            (500.0, 900.0, 990.0, 999.0, 1000.0)
        );
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
