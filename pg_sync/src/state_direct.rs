//! The first `row_state` row of a key, inserted without the executor.
//!
//! Nearly every captured insert creates its key's `row_state` row. Through SPI that is an
//! `INSERT ... ON CONFLICT` with a full executor start-up per row; here it is the same
//! speculative insertion the executor performs for it (insert the tuple speculatively, insert its
//! index entries, confirm, or super-delete on a conflict), with a minimal executor state. Anything but a clean insert (the key has state, or another transaction
//! inserted it meanwhile) writes nothing here and leaves it to `record_local`'s SQL upsert,
//! which waits, compares versions and updates exactly as before.
//!
//! Like `actions`, this writes the heap directly: no permission check, no switch to
//! `pgsync_owner`, nothing user-defined evaluated (the key index compares with the built-in
//! text operators), and only while the table is as pg_sync created it.

use crate::actions;
use pgrx::pg_sys;
use pgrx::{IntoDatum, JsonB};
use std::cell::Cell;
use std::ffi::CStr;

const COLUMNS: [&CStr; 7] = [
    c"model",
    c"model_id",
    c"created",
    c"deleted",
    c"versions",
    c"pending",
    c"max_version",
];

#[derive(Clone, Copy)]
struct Target {
    relid: pg_sys::Oid,
    att: [usize; 7],
    direct: bool,
}

thread_local! {
    static TARGET: Cell<Option<Target>> = const { Cell::new(None) };
}

/// Relcache invalidation: forget the checked layout of `row_state` (or everything).
pub fn invalidate(relid: pg_sys::Oid) {
    TARGET.with(|t| {
        if relid == pg_sys::InvalidOid || t.get().is_some_and(|t| t.relid == relid) {
            t.set(None);
        }
    });
}

/// Inserts the key's first state for a local insert at `version` (created and max_version at
/// it, no column versions, no tombstone, nothing pending). Returns false, having written
/// nothing, when the key already has a `row_state` row (committed or not) or the table was
/// altered: the caller's upsert handles those.
#[cfg(feature = "pg13")]
pub fn insert_new(_model: &str, _model_id: &str, _version: &str) -> bool {
    // Postgres 13's index-insertion API differs; its executor path (the upsert) is used.
    false
}

/// See above.
#[cfg(not(feature = "pg13"))]
pub fn insert_new(model: &str, model_id: &str, version: &str) -> bool {
    let Some(relid) = actions::relid_of(c"row_state") else {
        return false;
    };
    // SAFETY: mirrors ExecInsert's ON CONFLICT path for a relation opened and locked as an INSERT
    // would; the slot is filled with datums of the columns' types. An ERROR anywhere aborts the
    // (sub)transaction, which releases the relation, indexes, speculative lock and memory.
    unsafe {
        let rel = pg_sys::table_open(relid, pg_sys::RowExclusiveLock as i32);
        let target = match TARGET.with(Cell::get) {
            Some(t) if t.relid == relid => t,
            _ => {
                let mut att = [usize::MAX; 7];
                let direct = actions::plain_layout(rel, &COLUMNS, &mut att);
                let t = Target { relid, att, direct };
                TARGET.with(|c| c.set(Some(t)));
                t
            }
        };
        if !target.direct {
            pg_sys::table_close(rel, pg_sys::NoLock as i32);
            return false;
        }
        let estate = pg_sys::CreateExecutorState();
        let rri = pg_sys::palloc0(std::mem::size_of::<pg_sys::ResultRelInfo>())
            .cast::<pg_sys::ResultRelInfo>();
        pg_sys::InitResultRelInfo(rri, rel, 1, std::ptr::null_mut(), 0);
        // speculative: also sets up what the unique pre-check and conflict check need.
        pg_sys::ExecOpenIndices(rri, true);
        let slot = pg_sys::table_slot_create(rel, std::ptr::null_mut());
        pg_sys::ExecClearTuple(slot);
        let natts = (*(*rel).rd_att).natts as usize;
        let values = std::slice::from_raw_parts_mut((*slot).tts_values, natts);
        let nulls = std::slice::from_raw_parts_mut((*slot).tts_isnull, natts);
        nulls.fill(true);
        let datums = [
            model.into_datum(),
            model_id.into_datum(),
            version.into_datum(),
            None,
            JsonB(serde_json::Value::Object(Default::default())).into_datum(),
            None,
            version.into_datum(),
        ];
        for (k, d) in datums.into_iter().enumerate() {
            if let Some(d) = d {
                values[target.att[k]] = d;
                nulls[target.att[k]] = false;
            }
        }
        pg_sys::ExecStoreVirtualTuple(slot);

        // No pre-check of the key index (the executor's ExecCheckIndexConstraints): it is a
        // second descent of the index on every insert, and a key without state is the common
        // case. A key with state (committed or not) shows up as a conflict of the speculative
        // insertion, which is then super-deleted; the upsert takes it from there.
        let xid = pg_sys::GetCurrentTransactionId();
        let token = pg_sys::SpeculativeInsertionLockAcquire(xid);
        let am = (*rel).rd_tableam;
        let insert = (*am)
            .tuple_insert_speculative
            .expect("heap access method inserts speculatively");
        insert(
            rel,
            slot,
            pg_sys::GetCurrentCommandId(true),
            0,
            std::ptr::null_mut(),
            token,
        );
        let mut conflict = false;
        insert_index_tuples(rri, slot, estate, &mut conflict);
        let complete = (*am)
            .tuple_complete_speculative
            .expect("heap access method completes speculative inserts");
        complete(rel, slot, token, !conflict);
        pg_sys::SpeculativeInsertionLockRelease(xid);
        let inserted = !conflict;
        pg_sys::ExecDropSingleTupleTableSlot(slot);
        pg_sys::ExecCloseIndices(rri);
        pg_sys::FreeExecutorState(estate);
        pg_sys::table_close(rel, pg_sys::NoLock as i32);
        inserted
    }
}

#[cfg(any(feature = "pg14", feature = "pg15"))]
unsafe fn insert_index_tuples(
    rri: *mut pg_sys::ResultRelInfo,
    slot: *mut pg_sys::TupleTableSlot,
    estate: *mut pg_sys::EState,
    conflict: &mut bool,
) {
    unsafe {
        pg_sys::ExecInsertIndexTuples(
            rri,
            slot,
            estate,
            false,
            true,
            conflict,
            std::ptr::null_mut(),
        );
    }
}

#[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15")))]
// Postgres 16 added `onlySummarizing`.
unsafe fn insert_index_tuples(
    rri: *mut pg_sys::ResultRelInfo,
    slot: *mut pg_sys::TupleTableSlot,
    estate: *mut pg_sys::EState,
    conflict: &mut bool,
) {
    unsafe {
        pg_sys::ExecInsertIndexTuples(
            rri,
            slot,
            estate,
            false,
            true,
            conflict,
            std::ptr::null_mut(),
            false,
        );
    }
}
