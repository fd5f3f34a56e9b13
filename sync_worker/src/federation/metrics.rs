//! Per-peer link series for `/metrics` (the `prometheus` crate), labelled by peer and
//! direction (`in`/`out`), in one process-wide set (links come and go with the registry; a
//! removed peer's series stay until restart, as Prometheus expects).

use prometheus::core::Collector;
use prometheus::proto::MetricFamily;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
};
use std::sync::LazyLock;

/// Upper bounds (seconds) of the write-to-apply delay histogram's buckets (+Inf is implied).
pub const DELAY_BUCKETS: [f64; 13] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

const LABELS: &[&str] = &["peer", "direction"];

struct Series {
    up: IntGaugeVec,
    lag_actions: IntGaugeVec,
    batches: IntCounterVec,
    applied: IntCounterVec,
    changed: IntCounterVec,
    bytes: IntCounterVec,
    reconnects: IntCounterVec,
    auth_failures: IntCounterVec,
    apply_seconds: HistogramVec,
    write_to_apply: HistogramVec,
    errors: IntCounterVec,
}

fn counters(name: &str, help: &str) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), LABELS).expect("a valid counter")
}

fn gauges(name: &str, help: &str) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), LABELS).expect("a valid gauge")
}

static SERIES: LazyLock<Series> = LazyLock::new(|| {
    Series {
    up: gauges("pg_sync_peer_up", "Whether the link is connected."),
    lag_actions: gauges(
        "pg_sync_peer_lag_actions",
        "Sync ids the receiver is behind the sender's last one.",
    ),
    batches: counters("pg_sync_peer_batches_total", "Batches sent or applied."),
    applied: counters("pg_sync_peer_applied_total", "Changes applied from the peer."),
    changed: counters(
        "pg_sync_peer_changed_total",
        "Applied changes that won the merge and changed a row.",
    ),
    bytes: counters("pg_sync_peer_bytes_total", "Bytes of change data sent or applied."),
    reconnects: counters("pg_sync_peer_reconnects_total", "Links that closed."),
    auth_failures: counters(
        "pg_sync_peer_auth_failures_total",
        "Failed link authentications.",
    ),
    apply_seconds: HistogramVec::new(
        HistogramOpts::new(
            "pg_sync_peer_apply_seconds",
            "Time to apply one batch or snapshot page from the peer.",
        ),
        LABELS,
    )
    .expect("a valid histogram"),
    write_to_apply: HistogramVec::new(
        HistogramOpts::new(
            "pg_sync_peer_write_to_apply_seconds",
            "First-hop changes: this node's clock after the apply committed minus the physical time of the change's version.",
        )
        .buckets(DELAY_BUCKETS.to_vec()),
        LABELS,
    )
    .expect("a valid histogram"),
    errors: IntCounterVec::new(
        Opts::new("pg_sync_peer_errors_total", "Failed applies by SQLSTATE."),
        &["peer", "direction", "code"],
    )
    .expect("a valid counter"),
}
});

/// One link's series.
pub struct Link {
    peer: String,
    direction: &'static str,
    pub up: IntGauge,
    pub lag_actions: IntGauge,
    pub batches: IntCounter,
    pub applied: IntCounter,
    pub changed: IntCounter,
    pub bytes: IntCounter,
    pub reconnects: IntCounter,
    pub auth_failures: IntCounter,
}

/// The series of the link with `peer` in `direction` (`in` or `out`).
pub fn link(peer: &str, direction: &'static str) -> Link {
    let s = &*SERIES;
    let l = [peer, direction];
    Link {
        peer: peer.to_owned(),
        direction,
        up: s.up.with_label_values(&l),
        lag_actions: s.lag_actions.with_label_values(&l),
        batches: s.batches.with_label_values(&l),
        applied: s.applied.with_label_values(&l),
        changed: s.changed.with_label_values(&l),
        bytes: s.bytes.with_label_values(&l),
        reconnects: s.reconnects.with_label_values(&l),
        auth_failures: s.auth_failures.with_label_values(&l),
    }
}

impl Link {
    /// A link that closed.
    pub fn closed(&self) {
        self.up.set(0);
        self.reconnects.inc();
    }

    /// One change's write-to-apply delay: this node's commit of the apply minus the physical
    /// time of the version its origin minted (a skewed clock can make it negative: counted as 0).
    pub fn observe_delay(&self, seconds: f64) {
        self.write_to_apply().observe(seconds.max(0.0));
    }

    fn write_to_apply(&self) -> Histogram {
        SERIES
            .write_to_apply
            .with_label_values(&[&self.peer, self.direction])
    }

    /// One apply (a batch or a snapshot page) of `bytes` that took `seconds`; a failed one is
    /// counted by its SQLSTATE (`connection` when the database did not answer).
    pub fn applied<T>(&self, bytes: usize, seconds: f64, res: &Result<T, tokio_postgres::Error>) {
        self.bytes.inc_by(bytes as u64);
        SERIES
            .apply_seconds
            .with_label_values(&[&self.peer, self.direction])
            .observe(seconds);
        if let Err(e) = res {
            let code = crate::federation::sqlstate(e).unwrap_or("connection");
            SERIES
                .errors
                .with_label_values(&[&self.peer, self.direction, code])
                .inc();
        }
    }
}

/// The physical milliseconds of a version (`<16 hex digits of HLC>@node`; the low 16 bits of
/// the HLC are its counter), if it was minted by `node`.
pub fn minted_ms(version: &str, node: &str) -> Option<f64> {
    let (hlc, by) = version.split_once('@')?;
    if by != node || hlc.len() != 16 {
        return None;
    }
    u64::from_str_radix(hlc, 16).ok().map(|h| (h >> 16) as f64)
}

/// Every link's series seen since start.
pub fn families() -> Vec<MetricFamily> {
    let s = &*SERIES;
    let mut out: Vec<MetricFamily> = vec![];
    for c in [
        &s.batches,
        &s.applied,
        &s.changed,
        &s.bytes,
        &s.reconnects,
        &s.auth_failures,
        &s.errors,
    ] {
        out.extend(c.collect());
    }
    out.extend(s.up.collect());
    out.extend(s.lag_actions.collect());
    out.extend(s.apply_seconds.collect());
    out.extend(s.write_to_apply.collect());
    // A vector no link has touched yet yields an empty family, which the encoder refuses.
    out.retain(|f| !f.get_metric().is_empty());
    out
}

#[cfg(test)]
mod tests {
    fn render() -> String {
        crate::metrics::render(vec![], &Default::default())
    }

    #[test]
    fn renders_per_link_series() {
        let l = super::link("zz-test", "in");
        l.up.set(1);
        l.batches.inc_by(2);
        l.applied::<()>(10, 0.1, &Ok(()));
        let text = render();
        assert!(text.contains("pg_sync_peer_up{direction=\"in\",peer=\"zz-test\"} 1"));
        assert!(text.contains("pg_sync_peer_batches_total{direction=\"in\",peer=\"zz-test\"} 2"));
        assert!(text.contains("pg_sync_peer_bytes_total{direction=\"in\",peer=\"zz-test\"} 10"));
        assert!(
            text.contains("pg_sync_peer_apply_seconds_sum{direction=\"in\",peer=\"zz-test\"} 0.1")
        );
    }

    #[test]
    fn write_to_apply_delays_form_a_cumulative_histogram() {
        let l = super::link("zz-delay", "in");
        for s in [0.003, 0.2, 0.2, 7.0, 120.0, -1.0] {
            l.observe_delay(s);
        }
        let text = render();
        let line = |le: &str| {
            format!("pg_sync_peer_write_to_apply_seconds_bucket{{direction=\"in\",peer=\"zz-delay\",le=\"{le}\"}} ")
        };
        for (le, n) in [("0.005", 2), ("0.25", 4), ("10", 5), ("60", 5), ("+Inf", 6)] {
            assert!(text.contains(&format!("{}{n}\n", line(le))), "{le}: {text}");
        }
        assert!(text.contains(
            "pg_sync_peer_write_to_apply_seconds_count{direction=\"in\",peer=\"zz-delay\"} 6"
        ));
        assert_eq!(super::minted_ms("0000000000010003@a", "a"), Some(1.0));
        assert_eq!(super::minted_ms("0000000000010003@a", "b"), None);
        assert_eq!(super::minted_ms("nonsense", "a"), None);
    }
}
