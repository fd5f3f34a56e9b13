//! Keeps the log's transaction ids (`sync_actions.xid`, `commit_order.xid`) unique after a
//! restore from another cluster.
//!
//! The log groups actions by the xid8 of the transaction that wrote them, and the sequencer keys
//! the commit order by it. A dump restored into another cluster brings the old cluster's xids;
//! once the new cluster's counter reaches them, new transactions would share xids with restored
//! ones (a primary-key collision in `commit_order`, old and new actions mixed in `changes()`).
//!
//! So before a backend first writes to the log of its database, it looks for stored xids this
//! cluster could still hand out: a row that is visible but whose xid is not a transaction visible
//! in the same snapshot (at or past its xmax, in progress, or this transaction's own) cannot have
//! been written by that transaction here, so it came from elsewhere. Every such xid, in both
//! tables alike, is shifted by one constant (a multiple of 2^32, so the 32-bit xid the
//! replication stream names stays the same) to at least `REMAPPED_BASE` and above every stored
//! xid: injective, order-preserving among the shifted, and out of reach of this cluster's
//! counter (2^62 is 2^30 wraparounds away). Xids already at or above `REMAPPED_BASE` were
//! remapped before and are left alone.
//!
//! The check is a few index probes per table, once per backend: a backend remembers that its
//! database's log was clean once a check found nothing; after a remap the next transaction
//! checks again (the remapping one may still roll back). A remap rolled back to a savepoint is
//! not redone in the same transaction (its locks went with it): the next transaction redoes it. Every path that inserts into the log mints or observes a
//! version first (`clock::tick`, `clock::observe`), and both run this check before the insert.

use crate::errors;
use crate::owner;
use pgrx::prelude::*;
use std::cell::Cell;

/// Xids at or above this value are remapped ones, never handed out by a cluster: 2^62.
pub const REMAPPED_BASE: &str = "4611686018427387904";

thread_local! {
    /// This backend found its database's log free of foreign xids.
    static CLEAN: Cell<bool> = const { Cell::new(false) };
    /// The top-level transaction id that remapped last (0: none). It neither checks again nor
    /// declares the log clean (it may still roll the remap back): the next transaction checks.
    static REMAPPED_IN: Cell<u32> = const { Cell::new(0) };
}

/// `col` holds an xid that no transaction of this cluster visible to the statement's snapshot
/// wrote: the snapshot's xmax or later, in progress, or this transaction's own (which has not
/// written to the log yet, see the module comment). Remapped xids are excluded.
fn foreign(col: &str) -> String {
    format!(
        "({col} < '{REMAPPED_BASE}'::xid8
          AND ({col} >= pg_snapshot_xmax(pg_current_snapshot())
               OR {col} = pg_current_xact_id_if_assigned()
               OR {col} IN (SELECT pg_snapshot_xip(pg_current_snapshot()))))"
    )
}

/// Index probes only, whatever the statistics say (a log written by a few big transactions has
/// few distinct xids, and the planner would scan it whole for an `=` probe): the lowest stored
/// xid from the snapshot's xmax up, and the next stored xid from each in-progress one.
fn check_sql() -> String {
    let next = |t: &str, from: &str| {
        format!("(SELECT t.xid FROM pg_sync.{t} t WHERE t.xid >= {from} ORDER BY t.xid LIMIT 1)")
    };
    let xmax = "pg_snapshot_xmax(pg_current_snapshot())";
    format!(
        "SELECT coalesce({a} < '{REMAPPED_BASE}'::xid8, false)
             OR coalesce({c} < '{REMAPPED_BASE}'::xid8, false)
             OR EXISTS (
                  SELECT 1 FROM (SELECT pg_snapshot_xip(pg_current_snapshot())
                                 UNION ALL SELECT pg_current_xact_id_if_assigned()) p(x)
                   WHERE p.x IS NOT NULL AND ({pa} = p.x OR {pc} = p.x))",
        a = next("sync_actions", xmax),
        c = next("commit_order", xmax),
        pa = next("sync_actions", "p.x"),
        pc = next("commit_order", "p.x"),
    )
}

/// One statement, one snapshot: the xids to move, the shift, and both updates. Runs while this
/// transaction holds both tables against other writers.
fn remap_sql() -> String {
    format!(
        "WITH f AS (
           SELECT xid FROM pg_sync.sync_actions WHERE {fa}
           UNION SELECT xid FROM pg_sync.commit_order WHERE {fc}),
         d AS (
           SELECT ceil((greatest('{REMAPPED_BASE}'::numeric,
                                 greatest((SELECT max(xid) FROM pg_sync.sync_actions),
                                          (SELECT max(xid) FROM pg_sync.commit_order))::text::numeric + 1)
                        - (SELECT min(xid) FROM f)::text::numeric) / 4294967296) * 4294967296 AS shift),
         ua AS (
           UPDATE pg_sync.sync_actions a SET xid = (a.xid::text::numeric + d.shift)::text::xid8
             FROM d WHERE a.xid IN (SELECT xid FROM f) RETURNING 1),
         uc AS (
           UPDATE pg_sync.commit_order c SET xid = (c.xid::text::numeric + d.shift)::text::xid8
             FROM d WHERE c.xid IN (SELECT xid FROM f) RETURNING 1),
         -- membership_log names its actions by (xid, action_id), the log's key: moved alike.
         um AS (
           UPDATE pg_sync.membership_log m SET xid = (m.xid::text::numeric + d.shift)::text::xid8
             FROM d WHERE m.xid IN (SELECT xid FROM f) RETURNING 1)
         SELECT (SELECT count(*) FROM f),
                (SELECT count(*) FROM ua) + (SELECT count(*) FROM uc) + (SELECT count(*) FROM um)",
        fa = foreign("xid"),
        fc = foreign("xid"),
    )
}

/// Remaps foreign xids in this database's log, unless this backend already found it clean.
/// Must run before the calling transaction inserts into the log.
pub fn ensure_own_xids() {
    if CLEAN.with(Cell::get) {
        return;
    }
    // SAFETY: plain reads of backend state.
    if unsafe { pg_sys::RecoveryInProgress() } {
        return; // a standby writes nothing; checked again once promoted
    }
    // SAFETY: reads the current transaction's id without assigning one.
    let top = unsafe { pg_sys::GetTopTransactionIdIfAny() }.into_inner();
    if top != 0 && REMAPPED_IN.with(Cell::get) == top {
        // This transaction remapped and holds both tables until it ends; checking again would
        // take its own actions, written since, for foreign ones.
        return;
    }
    let found =
        owner::as_owner(|| owner::with_fixed_search_path(|| Spi::get_one::<bool>(&check_sql())));
    // No log (the extension's tables are missing or unreadable) is not this module's to report.
    let Ok(found) = found else { return };
    if found != Some(true) {
        CLEAN.with(|c| c.set(true));
        return;
    }
    let (xids, rows) = owner::as_owner(|| {
        owner::with_fixed_search_path(|| {
            // Writers and the sequencer wait until this transaction ends, so no row moves, and
            // no commit_order row is written for an xid, between the snapshot and the update.
            Spi::run(
                "LOCK TABLE pg_sync.sync_actions, pg_sync.commit_order IN SHARE ROW EXCLUSIVE MODE",
            )?;
            Spi::get_two::<i64, i64>(&remap_sql())
        })
    })
    .unwrap_or_else(|e| {
        errors::raise(
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            format!("pg_sync: cannot remap transaction ids restored from another cluster: {e}"),
            "Retry the write; the log's xids are checked again by the next writer.",
        )
    });
    // SAFETY: the update above assigned this transaction an id.
    let top = unsafe { pg_sys::GetTopTransactionIdIfAny() }.into_inner();
    REMAPPED_IN.with(|r| r.set(top));
    if xids.unwrap_or(0) > 0 {
        pgrx::log!(
            "pg_sync: remapped {} transaction ids ({} log rows) restored from another cluster above {REMAPPED_BASE}",
            xids.unwrap_or(0),
            rows.unwrap_or(0)
        );
    }
}
