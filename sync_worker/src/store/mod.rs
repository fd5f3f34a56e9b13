//! The bottom layer: owns every connection to the database (`pool`), reading the sequenced log
//! (`log`: `changes`, the retention horizon, `last_sync_id`) and SQL identifier quoting. It
//! imports nothing from the layers above it (`replication`, `hub`, `api`, `federation`), so
//! each of them can use it without an import circle.

pub mod log;
pub mod pool;

pub use log::{changes, horizon, last_sync_id, page_span};
pub use pool::{
    connect, connect_holding, db_text, mutate_statement, mutate_with_key_statement, Conn,
    ConnectError, Db, PoolError, PoolLimits, Target, CONNECT_TIMEOUT,
};

/// `ident` as a quoted SQL identifier.
pub fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}
