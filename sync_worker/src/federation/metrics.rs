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
}
