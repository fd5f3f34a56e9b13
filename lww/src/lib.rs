//! Last-writer-wins versions and the per-row merge, as pure functions. The pg_sync extension
//! runs them in-database; keeping them free of Postgres lets them be tested exhaustively.
//! Also the one limit the extension and its worker share on what clients read as numbers
//! (`JS_SAFE_LIMIT`).

pub mod merge;
pub mod version;

/// 2^53 = Number.MAX_SAFE_INTEGER + 1: the first integer that is not a safe JavaScript integer
/// (a client cannot tell it from 2^53 + 1, which reads as the same number). A transaction id at or
/// above it is left out of what clients read as a number: `/sync/mutate`'s `txid` (stored by
/// the extension's `mutate`), `/v1/shape`'s `txids` and its `snapshot-end` (the worker).
pub const JS_SAFE_LIMIT: i64 = 1 << 53;

#[cfg(test)]
mod tests {
    #[test]
    fn the_js_safe_limit_is_one_past_number_max_safe_integer() {
        assert_eq!(super::JS_SAFE_LIMIT, 9_007_199_254_740_992);
        assert_eq!(
            super::JS_SAFE_LIMIT as f64 + 1.0,
            super::JS_SAFE_LIMIT as f64
        );
    }
}
