//! What the processes say about themselves at the end of a run: the stage latencies from
//! each server's Prometheus histograms (read with `prometheus-parse`), and Redis's
//! `INFO commandstats` (read with redis-rs's `InfoDict`).

use std::collections::BTreeMap;
use std::time::Duration;

use prometheus_parse::{Scrape, Value};

use super::report::Stage;
use crate::target::Target;

/// A stage of the delivery path: its name, the processes that time it, the histogram and
/// the label (name, value) its series carry.
type StageSource = (
    &'static str,
    Kind,
    &'static str,
    Option<(&'static str, &'static str)>,
);

/// The stages of the delivery path.
const STAGES: &[StageSource] = &[
    (
        "ingest: batch request (parse, append, publish)",
        Kind::Ingest,
        "gapless_ingest_request_duration_seconds",
        Some(("route", "/v1/notifications/batch")),
    ),
    (
        "ingest: Redis append pipeline (Function calls)",
        Kind::Ingest,
        "gapless_redis_duration_seconds",
        Some(("op", "append")),
    ),
    (
        "ingest: Redis append transactions (native)",
        Kind::Ingest,
        "gapless_redis_duration_seconds",
        Some(("op", "append_native")),
    ),
    (
        "edge: entry's ingest time to handed to the socket writer",
        Kind::Edge,
        "gapless_edge_delivery_latency_seconds",
        None,
    ),
    (
        "edge: Redis stream reads",
        Kind::Edge,
        "gapless_redis_duration_seconds",
        Some(("op", "read")),
    ),
    (
        "edge: Redis ack flushes",
        Kind::Edge,
        "gapless_redis_duration_seconds",
        Some(("op", "ack")),
    ),
];

/// Which processes a stage's histogram is summed over.
#[derive(Clone, Copy)]
enum Kind {
    Ingest,
    Edge,
}

/// The delivery path's stages from the services' /metrics histograms (summed over edges).
pub(super) async fn stages(target: &Target) -> Vec<Stage> {
    let http = reqwest::Client::new();
    let fetch = |base: String| {
        let http = http.clone();
        async move {
            let r = http.get(format!("{base}/metrics")).send().await.ok()?;
            parse(&r.text().await.ok()?)
        }
    };
    let ingest: Vec<Scrape> = fetch(target.ingest_url.clone()).await.into_iter().collect();
    let mut edges = Vec::new();
    for url in &target.edge_urls {
        let base = url
            .replacen("ws://", "http://", 1)
            .replacen("wss://", "https://", 1)
            .trim_end_matches("/v1/ws")
            .to_owned();
        edges.extend(fetch(base).await);
    }
    STAGES
        .iter()
        .filter_map(|&(stage, kind, name, label)| {
            let scrapes = match kind {
                Kind::Ingest => &ingest,
                Kind::Edge => &edges,
            };
            let (count, p50, p99) = histogram_quantiles(scrapes, name, label)?;
            Some(Stage {
                stage: stage.to_owned(),
                count,
                p50_ms: p50 * 1000.0,
                p99_ms: p99 * 1000.0,
            })
        })
        .collect()
}

/// A /metrics answer, parsed.
fn parse(text: &str) -> Option<Scrape> {
    Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).ok()
}

/// (count, p50, p99) of the histogram `name`, its buckets summed over every series of every
/// scrape that carries `label` (every series when `None`), as bucket upper bounds.
fn histogram_quantiles(
    scrapes: &[Scrape],
    name: &str,
    label: Option<(&str, &str)>,
) -> Option<(u64, f64, f64)> {
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    let series = scrapes
        .iter()
        .flat_map(|s| &s.samples)
        .filter(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)));
    for sample in series {
        let Value::Histogram(counts) = &sample.value else {
            continue;
        };
        for c in counts {
            match buckets.iter_mut().find(|b| b.0 == c.less_than) {
                Some(b) => b.1 += c.count,
                None => buckets.push((c.less_than, c.count)),
            }
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let at = |q: f64| {
        buckets
            .iter()
            .find(|b| b.1 >= q * total)
            .map_or(f64::INFINITY, |b| b.0)
    };
    Some((total as u64, at(0.5), at(0.99)))
}

/// Redis's `INFO commandstats`: (command, calls, µs per call, total s), busiest first;
/// summed over every node of a cluster (`urls` comma-separated; replicas count the
/// commands they replay).
pub(super) async fn command_stats(urls: &str) -> Vec<(String, u64, f64, f64)> {
    let mut totals: BTreeMap<String, (u64, f64)> = BTreeMap::new();
    for url in urls.split(',') {
        let info = async {
            let client = redis::Client::open(url).ok()?;
            let mut conn = client.get_multiplexed_async_connection().await.ok()?;
            redis::cmd("INFO")
                .arg("commandstats")
                .query_async::<redis::InfoDict>(&mut conn)
                .await
                .ok()
        };
        let Ok(Some(info)) = tokio::time::timeout(Duration::from_secs(2), info).await else {
            continue;
        };
        add_command_stats(&info, &mut totals);
    }
    let mut stats: Vec<(String, u64, f64, f64)> = totals
        .into_iter()
        .map(|(name, (calls, usec))| (name, calls, usec / calls.max(1) as f64, usec / 1e6))
        .collect();
    stats.sort_by(|a, b| b.3.total_cmp(&a.3));
    stats
}

/// Adds each `cmdstat_<command>:calls=…,usec=…,…` of `info` to `totals` (calls, µs).
fn add_command_stats(info: &redis::InfoDict, totals: &mut BTreeMap<String, (u64, f64)>) {
    for (key, value) in info.iter() {
        let Some(command) = key.strip_prefix("cmdstat_") else {
            continue;
        };
        let Ok(fields) = redis::from_redis_value_ref::<String>(value) else {
            continue;
        };
        let field = |name: &str| {
            fields
                .split(',')
                .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
                .and_then(|v| v.parse::<f64>().ok())
        };
        if let (Some(calls), Some(usec)) = (field("calls"), field("usec")) {
            let total = totals.entry(command.to_owned()).or_default();
            total.0 += calls as u64;
            total.1 += usec;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_sum_their_series_and_give_quantiles() {
        let text = "# TYPE x histogram\n\
                    x_bucket{op=\"a\",le=\"0.001\"} 50\nx_bucket{op=\"a\",le=\"0.002\"} 99\n\
                    x_bucket{op=\"a\",le=\"+Inf\"} 100\nx_sum{op=\"a\"} 0.1\nx_count{op=\"a\"} 100\n\
                    x_bucket{op=\"b\",le=\"0.001\"} 7\nx_bucket{op=\"b\",le=\"0.002\"} 7\n\
                    x_bucket{op=\"b\",le=\"+Inf\"} 7\nx_sum{op=\"b\"} 0.001\nx_count{op=\"b\"} 7\n";
        let scrapes = [parse(text).expect("the exposition format")];
        assert_eq!(
            histogram_quantiles(&scrapes, "x", Some(("op", "a"))),
            Some((100, 0.001, 0.002))
        );
        assert_eq!(
            histogram_quantiles(&scrapes, "x", None),
            Some((107, 0.001, 0.002))
        );
        assert_eq!(histogram_quantiles(&scrapes, "y", None), None);
    }

    #[test]
    fn command_stats_add_up_across_nodes() {
        let info = redis::InfoDict::new;
        let mut totals = BTreeMap::new();
        let node = "# Commandstats\r\ncmdstat_fcall:calls=10,usec=600,usec_per_call=60.00,rejected_calls=0,failed_calls=0\r\ncmdstat_ping:calls=3,usec=3,usec_per_call=1.00\r\n";
        add_command_stats(&info(node), &mut totals);
        add_command_stats(&info(node), &mut totals);
        assert_eq!(totals.get("fcall"), Some(&(20, 1200.0)));
        assert_eq!(totals.get("ping"), Some(&(6, 6.0)));
    }
}
