//! What the load generators share.

use std::time::{SystemTime, UNIX_EPOCH};

/// An HS256 JWT for `user`, valid two hours.
pub fn token(secret: &str, user: &str) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 7200;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"sub": user, "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// Now, in unix milliseconds (what the writers put in each row's `ts`).
pub fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        * 1000.0
}

/// The `ts` number inside a delta frame, without a full parse.
pub fn ts_of(frame: &str) -> Option<f64> {
    let at = frame.find("\"ts\":")? + 5;
    let rest = &frame[at..];
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    rest[..end].trim().parse().ok()
}

/// A delivery latency histogram that many subscriber tasks record into at once: 0.1 ms buckets
/// up to 10 s (the last bucket takes everything slower).
pub struct Histogram {
    buckets: Vec<std::sync::atomic::AtomicU64>,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new()
    }
}

impl Histogram {
    const BUCKETS: usize = 100_000;

    pub fn new() -> Histogram {
        Histogram {
            buckets: (0..Self::BUCKETS)
                .map(|_| std::sync::atomic::AtomicU64::new(0))
                .collect(),
        }
    }

    /// Records one latency in milliseconds (negative clock skew counts as 0).
    pub fn record_ms(&self, ms: f64) {
        let tenths = (ms * 10.0).max(0.0) as usize;
        self.buckets[tenths.min(Self::BUCKETS - 1)]
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// How many latencies were recorded.
    pub fn count(&self) -> u64 {
        self.buckets
            .iter()
            .map(|b| b.load(std::sync::atomic::Ordering::Relaxed))
            .sum()
    }

    /// The `p` quantile (0..=1) in milliseconds, to the bucket; NaN when nothing was recorded.
    pub fn percentile(&self, p: f64) -> f64 {
        let want = (self.count() as f64 * p).ceil() as u64;
        let mut seen = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            seen += b.load(std::sync::atomic::Ordering::Relaxed);
            if seen >= want && want > 0 {
                return i as f64 / 10.0;
            }
        }
        f64::NAN
    }
}

/// Clock ticks per second of the times in /proc.
fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// From a /proc `stat` file (a process's or a thread's): its own CPU seconds (utime + stime) and
/// its reaped children's (cutime + cstime).
pub fn stat_cpu(path: &str) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(path).ok()?;
    // The fields after the command, which may hold spaces and parentheses.
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let tick = clock_ticks();
    Some(((n(11) + n(12)) / tick, (n(13) + n(14)) / tick))
}

/// The whole machine's CPU seconds from /proc/stat's first line, by state: user, nice, system,
/// idle, iowait, irq, softirq, steal.
pub fn machine_cpu_states() -> [f64; 8] {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let mut states = [0.0; 8];
    let fields = stat.lines().next().unwrap_or("").split_whitespace().skip(1);
    for (state, v) in states.iter_mut().zip(fields) {
        *state = v.parse::<f64>().unwrap_or(0.0) / clock_ticks();
    }
    states
}

#[cfg(test)]
mod tests {
    #[test]
    fn cpu_times_are_read_from_proc() {
        let spin = std::time::Instant::now();
        while spin.elapsed() < std::time::Duration::from_millis(50) {}
        let (own, reaped) = super::stat_cpu("/proc/self/stat").expect("our own stat");
        assert!(own > 0.0 && reaped >= 0.0, "{own} {reaped}");
        let states = super::machine_cpu_states();
        assert!(states.iter().sum::<f64>() > 0.0 && states.iter().all(|s| *s >= 0.0));
    }
}
