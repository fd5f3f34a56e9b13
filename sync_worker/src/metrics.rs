//! `/metrics` in the Prometheus text format, written by the `prometheus` crate: the latency
//! histograms of one worker (`Latency`, owned by its hub), the counters and gauges that their
//! owners keep as atomics (sequencer status, hub, API), read at scrape time into families of
//! the documented names, and the federation links' series (`federation::metrics`).

use prometheus::core::Collector;
use prometheus::proto::MetricFamily;
use prometheus::{Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts};
use std::time::Instant;

/// Buckets (seconds) of the latency histograms: 1 ms to 60 s.
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// One worker's latency histograms.
pub struct Latency {
    /// A replay (WS, SSE) from its first page to live.
    pub replay: Histogram,
    /// A bootstrap response from its first row to its end frame.
    pub bootstrap: Histogram,
    /// One sequencer flush: persisting a batch of transactions and publishing it to the hub.
    pub flush: Histogram,
    /// A transaction from its commit in Postgres to its deltas being queued for every live
    /// subscriber of their groups.
    pub delivery: Histogram,
}

fn histogram(name: &str, help: &str) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(BUCKETS.to_vec()))
        .expect("a valid histogram")
}

impl Default for Latency {
    fn default() -> Latency {
        Latency {
            replay: histogram(
                "pg_sync_replay_seconds",
                "Replays from the first page to live (WebSocket and SSE).",
            ),
            bootstrap: histogram(
                "pg_sync_bootstrap_seconds",
                "Bootstrap responses from the snapshot's first row to the end frame.",
            ),
            flush: histogram(
                "pg_sync_flush_seconds",
                "Sequencer flushes: persisting a batch of transactions and publishing it.",
            ),
            delivery: histogram(
                "pg_sync_delivery_seconds",
                "Transactions from their commit to their deltas being queued for live subscribers.",
            ),
        }
    }
}

impl Latency {
    /// A flush that started at `started` and published transactions committed at
    /// `committed_at_us` (Postgres epoch microseconds).
    pub fn flushed(&self, started: Instant, committed_at_us: impl Iterator<Item = i64>) {
        self.flush.observe(started.elapsed().as_secs_f64());
        let now_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0);
        for t in committed_at_us {
            // Clocks of the database and worker hosts may differ: never negative.
            let unix_us = t + crate::replication::sequencer::PG_EPOCH_US;
            self.delivery
                .observe((now_us - unix_us).max(0) as f64 / 1_000_000.0);
        }
    }

    fn families(&self) -> Vec<MetricFamily> {
        [&self.replay, &self.bootstrap, &self.flush, &self.delivery]
            .into_iter()
            .flat_map(|h| h.collect())
            .collect()
    }
}

/// A counter family with one value (read from an atomic someone else owns).
pub fn counter(name: &str, help: &str, value: u64) -> MetricFamily {
    let c = IntCounter::with_opts(Opts::new(name, help)).expect("a valid counter");
    c.inc_by(value);
    c.collect().remove(0)
}

/// A counter family of seconds (or any fractional total) with one value.
pub fn float_counter(name: &str, help: &str, value: f64) -> MetricFamily {
    let c = prometheus::Counter::with_opts(Opts::new(name, help)).expect("a valid counter");
    c.inc_by(value.max(0.0));
    c.collect().remove(0)
}

/// A gauge family with one value.
pub fn gauge(name: &str, help: &str, value: f64) -> MetricFamily {
    let g = Gauge::with_opts(Opts::new(name, help)).expect("a valid gauge");
    g.set(value);
    g.collect().remove(0)
}

/// A counter family with one label.
pub fn labelled_counter(
    name: &str,
    help: &str,
    label: &str,
    values: &[(&str, u64)],
) -> MetricFamily {
    let c = IntCounterVec::new(Opts::new(name, help), &[label]).expect("a valid counter");
    for (v, n) in values {
        c.with_label_values(&[v]).inc_by(*n);
    }
    c.collect().remove(0)
}

/// The exposition of `families`, then the latency histograms and the federation series.
pub fn render(mut families: Vec<MetricFamily>, latency: &Latency) -> String {
    families.extend(latency.families());
    families.extend(crate::federation::metrics::families());
    let mut out = vec![];
    prometheus::TextEncoder::new()
        .encode(&families, &mut out)
        .expect("the text encoder writes to memory");
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_and_histograms_in_the_text_format() {
        let latency = Latency::default();
        latency.flush.observe(0.003);
        latency.flushed(Instant::now(), [0i64].into_iter());
        let text = render(
            vec![
                counter("pg_sync_x_total", "x", 3),
                gauge("pg_sync_y", "y", 1.5),
                labelled_counter("pg_sync_z_total", "z", "status", &[("applied", 2)]),
            ],
            &latency,
        );
        assert!(
            text.contains("# TYPE pg_sync_x_total counter\npg_sync_x_total 3\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE pg_sync_y gauge\npg_sync_y 1.5\n"),
            "{text}"
        );
        assert!(
            text.contains("pg_sync_z_total{status=\"applied\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE pg_sync_flush_seconds histogram"),
            "{text}"
        );
        assert!(
            text.contains("pg_sync_flush_seconds_bucket{le=\"0.005\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("pg_sync_flush_seconds_count 2\n"), "{text}");
        // A commit at the Postgres epoch was delivered long ago: in the +Inf bucket only.
        assert!(
            text.contains("pg_sync_delivery_seconds_bucket{le=\"60\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("pg_sync_delivery_seconds_count 1\n"),
            "{text}"
        );
        assert!(text.contains("pg_sync_replay_seconds_count 0\n"), "{text}");
    }
}
