//! The seed and generator of the seeded randomized tests: shared by the integration tests
//! (through `common`) and the library's own unit tests (`lib.rs` includes this file by path).

/// The seed of a randomized test: `var` from the environment (to replay a printed run), else
/// the clock (odd, so an xorshift state is never zero). The caller prints it.
pub fn seed_from_env(var: &str) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        })
}

/// xorshift64 from `state` (not zero): each call `next(n)` answers a number below `n`. The
/// same seed gives the same sequence, so a printed seed replays a run.
pub fn xorshift(mut state: u64) -> impl FnMut(u64) -> u64 {
    move |n| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % n
    }
}
