//! Named failpoints for tests: `SYNC_FAILPOINTS=name,name` makes each named point fail once.
//! Production runs never set it; the check is one lookup in a set read at start-up.

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

fn armed() -> &'static Mutex<HashSet<String>> {
    static ARMED: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    ARMED.get_or_init(|| {
        let names = std::env::var("SYNC_FAILPOINTS").unwrap_or_default();
        Mutex::new(
            names
                .split(',')
                .filter(|n| !n.is_empty())
                .map(str::to_owned)
                .collect(),
        )
    })
}

/// True the first time an armed point is reached (then it is disarmed).
pub fn fire(name: &str) -> bool {
    armed()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(name)
}
