//! Named failpoints for tests: `SYNC_FAILPOINTS=name,name@N` makes each named point fail once:
//! at its first hit, or with `@N` at its N-th. Production runs never set it; the check is one
//! lookup in a map read at start-up.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

/// Armed points and the hits left before each fires.
fn armed() -> &'static Mutex<HashMap<String, u64>> {
    static ARMED: OnceLock<Mutex<HashMap<String, u64>>> = OnceLock::new();
    ARMED.get_or_init(|| {
        let names = std::env::var("SYNC_FAILPOINTS").unwrap_or_default();
        Mutex::new(
            names
                .split(',')
                .filter(|n| !n.is_empty())
                .map(|n| match n.split_once('@') {
                    Some((name, at)) => (name.to_owned(), at.parse().unwrap_or(1).max(1)),
                    None => (n.to_owned(), 1),
                })
                .collect(),
        )
    })
}

/// True when an armed point is reached for the hit it is armed for (then it is disarmed).
pub fn fire(name: &str) -> bool {
    let mut armed = armed().lock().unwrap_or_else(|p| p.into_inner());
    match armed.get_mut(name) {
        Some(left) if *left > 1 => {
            *left -= 1;
            false
        }
        Some(_) => {
            armed.remove(name);
            true
        }
        None => false,
    }
}

/// Ends the process at once when `name` fires, as a kill -9 at that point would (no drain, no
/// close frames, no destructors).
pub fn crash(name: &str) {
    if fire(name) {
        tracing::warn!(failpoint = name, "failpoint: aborting the process");
        std::process::abort();
    }
}
