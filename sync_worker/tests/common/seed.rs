//! The seed of the seeded randomized tests: shared by the integration tests (through `common`)
//! and the library's own unit tests (`hub.rs` includes this file by path).

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
