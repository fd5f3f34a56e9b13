//! Last-writer-wins versions and the per-row merge, as pure functions. The pg_sync extension
//! runs them in-database; keeping them free of Postgres lets them be tested exhaustively.

pub mod merge;
pub mod version;
