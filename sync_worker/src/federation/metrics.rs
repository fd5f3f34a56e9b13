//! Per-peer link counters for `/metrics`, kept in one process-wide table (links come and go
//! with the registry; a removed peer's counters stay until restart, as Prometheus expects).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

#[derive(Default, Clone)]
pub struct Link {
    pub up: bool,
    pub lag_actions: i64,
    pub batches: u64,
    pub applied: u64,
    pub changed: u64,
    pub bytes: u64,
    pub reconnects: u64,
    pub auth_failures: u64,
    pub apply_seconds_sum: f64,
    pub errors: BTreeMap<String, u64>,
    /// Write-to-apply delay of first-hop changes (`observe_delay`): per-bucket counts (not
    /// cumulative), sum and count.
    pub delay_buckets: [u64; DELAY_BUCKETS.len()],
    pub delay_sum: f64,
    pub delay_count: u64,
}

/// Upper bounds (seconds) of the write-to-apply delay histogram's buckets (+Inf is implied).
pub const DELAY_BUCKETS: [f64; 13] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

impl Link {
    /// One change's write-to-apply delay: this node's commit of the apply minus the physical
    /// time of the version its origin minted (a skewed clock can make it negative: counted as 0).
    pub fn observe_delay(&mut self, seconds: f64) {
        let seconds = seconds.max(0.0);
        if let Some(i) = DELAY_BUCKETS.iter().position(|&le| seconds <= le) {
            self.delay_buckets[i] += 1;
        }
        self.delay_sum += seconds;
        self.delay_count += 1;
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

/// Keyed by (peer, direction `in`/`out`).
static LINKS: Mutex<BTreeMap<(String, &'static str), Link>> = Mutex::new(BTreeMap::new());

/// Updates the counters of one link.
pub fn with(peer: &str, direction: &'static str, f: impl FnOnce(&mut Link)) {
    let mut g = LINKS.lock().unwrap_or_else(|p| p.into_inner());
    f(g.entry((peer.to_owned(), direction)).or_default());
}

/// A series: name, Prometheus type, and how to read it from a link.
type Series = (&'static str, &'static str, fn(&Link) -> String);

/// The Prometheus text for every link seen since start.
pub fn render() -> String {
    let g = LINKS.lock().unwrap_or_else(|p| p.into_inner());
    let mut out = String::new();
    let series: [Series; 9] = [
        ("pg_sync_peer_up", "gauge", |l| (l.up as u8).to_string()),
        ("pg_sync_peer_lag_actions", "gauge", |l| {
            l.lag_actions.to_string()
        }),
        ("pg_sync_peer_batches_total", "counter", |l| {
            l.batches.to_string()
        }),
        ("pg_sync_peer_applied_total", "counter", |l| {
            l.applied.to_string()
        }),
        ("pg_sync_peer_changed_total", "counter", |l| {
            l.changed.to_string()
        }),
        ("pg_sync_peer_bytes_total", "counter", |l| {
            l.bytes.to_string()
        }),
        ("pg_sync_peer_reconnects_total", "counter", |l| {
            l.reconnects.to_string()
        }),
        ("pg_sync_peer_auth_failures_total", "counter", |l| {
            l.auth_failures.to_string()
        }),
        ("pg_sync_peer_apply_seconds_sum", "counter", |l| {
            format!("{:.6}", l.apply_seconds_sum)
        }),
    ];
    for (name, kind, value) in series {
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for ((peer, dir), l) in g.iter() {
            let _ = writeln!(
                out,
                "{name}{{peer=\"{peer}\",direction=\"{dir}\"}} {}",
                value(l)
            );
        }
    }
    let _ = writeln!(out, "# TYPE pg_sync_peer_write_to_apply_seconds histogram");
    for ((peer, dir), l) in g.iter().filter(|(_, l)| l.delay_count > 0) {
        let mut cumulative = 0;
        for (le, n) in DELAY_BUCKETS.iter().zip(l.delay_buckets) {
            cumulative += n;
            let _ = writeln!(
                out,
                "pg_sync_peer_write_to_apply_seconds_bucket{{peer=\"{peer}\",direction=\"{dir}\",le=\"{le}\"}} {cumulative}"
            );
        }
        let labels = format!("peer=\"{peer}\",direction=\"{dir}\"");
        let _ = writeln!(
            out,
            "pg_sync_peer_write_to_apply_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
            l.delay_count
        );
        let _ = writeln!(
            out,
            "pg_sync_peer_write_to_apply_seconds_sum{{{labels}}} {:.6}",
            l.delay_sum
        );
        let _ = writeln!(
            out,
            "pg_sync_peer_write_to_apply_seconds_count{{{labels}}} {}",
            l.delay_count
        );
    }
    let _ = writeln!(out, "# TYPE pg_sync_peer_errors_total counter");
    for ((peer, dir), l) in g.iter() {
        for (code, n) in &l.errors {
            let _ = writeln!(
                out,
                "pg_sync_peer_errors_total{{peer=\"{peer}\",direction=\"{dir}\",code=\"{code}\"}} {n}"
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn renders_per_link_series() {
        super::with("zz-test", "in", |l| {
            l.up = true;
            l.batches += 2;
            *l.errors.entry("PS001".into()).or_default() += 1;
        });
        let text = super::render();
        assert!(text.contains("pg_sync_peer_up{peer=\"zz-test\",direction=\"in\"} 1"));
        assert!(text.contains("pg_sync_peer_batches_total{peer=\"zz-test\",direction=\"in\"} 2"));
        assert!(text.contains(
            "pg_sync_peer_errors_total{peer=\"zz-test\",direction=\"in\",code=\"PS001\"} 1"
        ));
    }

    #[test]
    fn write_to_apply_delays_form_a_cumulative_histogram() {
        super::with("zz-delay", "in", |l| {
            for s in [0.003, 0.2, 0.2, 7.0, 120.0, -1.0] {
                l.observe_delay(s);
            }
        });
        let text = super::render();
        let line = |le: &str| {
            format!("pg_sync_peer_write_to_apply_seconds_bucket{{peer=\"zz-delay\",direction=\"in\",le=\"{le}\"}} ")
        };
        for (le, n) in [("0.005", 2), ("0.25", 4), ("10", 5), ("60", 5), ("+Inf", 6)] {
            assert!(text.contains(&format!("{}{n}\n", line(le))), "{le}: {text}");
        }
        assert!(text.contains(
            "pg_sync_peer_write_to_apply_seconds_count{peer=\"zz-delay\",direction=\"in\"} 6"
        ));
        assert_eq!(super::minted_ms("0000000000010003@a", "a"), Some(1.0));
        assert_eq!(super::minted_ms("0000000000010003@a", "b"), None);
        assert_eq!(super::minted_ms("nonsense", "a"), None);
    }
}
