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

/// The condition "the group column `col` of the row `t` is one of the user's groups (`$1`,
/// `text[]`)", as the bootstrap and `/v1/shape` read rows. A group id is the column's text form
/// (`pg_sync.canonical_text`); `own_text` says the column's `::text` already is that, without
/// the call. Compared in the database's default collation, which is deterministic (bytewise
/// equality): under the column's own collation, a nondeterministic one would make 'Team' equal
/// 'team' and hand one group's rows to the other's members. Named in the statement, not read
/// from the catalog beforehand: a collation changed in between would not be seen. An index of a
/// default-collation column stays usable.
pub fn group_filter(col: &str, own_text: bool) -> String {
    let text = if own_text {
        format!("t.{}::text", quote_ident(col))
    } else {
        format!("pg_sync.canonical_text(t.{})", quote_ident(col))
    };
    format!("({text} COLLATE pg_catalog.\"default\") = ANY ($1)")
}
