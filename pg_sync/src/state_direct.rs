//! The first `row_state` row of a key, inserted without the executor.
//!
//! Nearly every captured insert creates its key's `row_state` row. Through SPI that is an
//! `INSERT ... ON CONFLICT` with a full executor start-up per row; here it is a plain heap
//! insert whose key index entry is checked for uniqueness without waiting or raising
//! (`UNIQUE_CHECK_PARTIAL`, what a deferred unique constraint uses): the btree reports whether
//! another live or in-progress row holds the key, under the same leaf lock as the insert, so two
//! inserters of one key can never both see none. On a conflict (the key has state, or another
//! transaction, e.g. `apply_remote`'s placeholder, is inserting it) the new tuple is deleted
//! again and `record_local`'s SQL upsert takes over, which waits, compares versions and updates
//! exactly as before. No speculative insertion: it cost a lock-manager round trip and a confirm
//! WAL record (48 B) per captured row to make the rare conflict cheaper.
//!
//! Like `actions`, this writes the heap directly: no permission check, no switch to
//! `pgsync_owner`, nothing user-defined evaluated (the key index compares with the built-in
//! text operators), and only while the table is as pg_sync created it.

use crate::actions::{self, col, Col, C};
use crate::deep::Jsonb;
use pgrx::pg_sys;
use pgrx::{FromDatum, IntoDatum};
use std::cell::Cell;

/// The columns of `row_state` as `sql/schema.sql` creates them.
const COLUMNS: [Col; 7] = [
    col(c"model", pg_sys::TEXTOID, true, false, C),
    col(c"model_id", pg_sys::TEXTOID, true, false, C),
    col(c"created", pg_sys::TEXTOID, false, false, C),
    col(c"deleted", pg_sys::TEXTOID, false, false, C),
    col(
        c"versions",
        pg_sys::JSONBOID,
        true,
        true,
        pg_sys::InvalidOid,
    ),
    col(
        c"pending",
        pg_sys::JSONBOID,
        false,
        false,
        pg_sys::InvalidOid,
    ),
    col(c"max_version", pg_sys::TEXTOID, true, false, C),
];

#[derive(Clone, Copy)]
struct Target {
    relid: pg_sys::Oid,
    att: [usize; 7],
    direct: bool,
    /// The primary key index on (model, model_id), for finding a key's row.
    pkey: pg_sys::Oid,
    /// The primary key's `IndexInfo` (in `INFO_CONTEXT`) when it is the table's only index:
    /// the plain first insert maintains that one index itself. Null otherwise (the first state
    /// row then goes through SQL).
    pkey_info: *mut pg_sys::IndexInfo,
}

thread_local! {
    static TARGET: Cell<Option<Target>> = const { Cell::new(None) };
    /// Holds `TARGET`'s `IndexInfo`; reset only when a new `Target` is checked (never from the
    /// invalidation callback, which may run while an insert uses it).
    static INFO_CONTEXT: Cell<pg_sys::MemoryContext> = const { Cell::new(std::ptr::null_mut()) };
}

/// Relcache invalidation: forget the checked layout of `row_state` (or everything).
pub fn invalidate(relid: pg_sys::Oid) {
    TARGET.with(|t| {
        if relid == pg_sys::InvalidOid || t.get().is_some_and(|t| t.relid == relid) {
            t.set(None);
        }
    });
}

/// Opens `row_state` for writing, by its cached oid when its layout is cached (see
/// `actions::open_cached`); a fresh open forgets the cached layout so `target` checks it again.
unsafe fn open() -> Option<pg_sys::Relation> {
    unsafe {
        let cached = || TARGET.with(Cell::get).map(|t| t.relid);
        let (rel, fresh) =
            actions::open_cached(c"row_state", cached, pg_sys::RowExclusiveLock as i32)?;
        if fresh {
            TARGET.with(|t| t.set(None));
        }
        Some(rel)
    }
}

/// An empty jsonb object (`'{}'`), built once: every first state row and every delete writes
/// one, and building it through serde cost a few percent of a captured insert.
fn empty_object() -> pg_sys::Datum {
    thread_local! {
        static EMPTY: Cell<Option<pg_sys::Datum>> = const { Cell::new(None) };
    }
    EMPTY.with(|e| match e.get() {
        Some(d) => d,
        None => {
            // SAFETY: copied into TopMemoryContext, kept for the backend's lifetime; readers only
            // copy it into tuples.
            let d = unsafe {
                let old = pg_sys::MemoryContextSwitchTo(pg_sys::TopMemoryContext);
                let d = Jsonb(serde_json::Value::Object(Default::default()))
                    .into_datum()
                    .expect("jsonb");
                pg_sys::MemoryContextSwitchTo(old);
                d
            };
            e.set(Some(d));
            d
        }
    })
}

/// The long-lived context `Target`'s `IndexInfo` lives in, created on first use.
fn info_context() -> pg_sys::MemoryContext {
    actions::long_lived_context(&INFO_CONTEXT, c"pg_sync state index")
}

/// The checked layout of the open `row_state` relation.
unsafe fn target(rel: pg_sys::Relation) -> Target {
    unsafe {
        let relid = (*rel).rd_id;
        if let Some(t) = TARGET.with(Cell::get).filter(|t| t.relid == relid) {
            return t;
        }
        let mut att = [usize::MAX; 7];
        let direct = actions::plain_layout(rel, &COLUMNS, &mut att);
        let mut pkey = pg_sys::InvalidOid;
        if direct {
            let oid = pg_sys::RelationGetPrimaryKeyIndex(rel);
            if oid != pg_sys::InvalidOid {
                let idx = pg_sys::index_open(oid, pg_sys::AccessShareLock as i32);
                let form = &*(*idx).rd_index;
                let keys = form.indkey.values.as_slice(form.indnkeyatts as usize);
                if form.indnkeyatts == 2
                    && keys[0] as usize == att[0] + 1
                    && keys[1] as usize == att[1] + 1
                {
                    pkey = oid;
                }
                pg_sys::index_close(idx, pg_sys::AccessShareLock as i32);
            }
        }
        let mut pkey_info = std::ptr::null_mut();
        if pkey != pg_sys::InvalidOid {
            let list = pg_sys::RelationGetIndexList(rel);
            if !list.is_null() && (*list).length == 1 {
                let context = info_context();
                // Nothing uses the previous Target's IndexInfo any more: it was invalidated.
                pg_sys::MemoryContextReset(context);
                let old = pg_sys::MemoryContextSwitchTo(context);
                let idx = pg_sys::index_open(pkey, pg_sys::RowExclusiveLock as i32);
                pkey_info = pg_sys::BuildIndexInfo(idx);
                pg_sys::index_close(idx, pg_sys::NoLock as i32);
                pg_sys::MemoryContextSwitchTo(old);
            }
        }
        let t = Target {
            relid,
            att,
            direct,
            pkey,
            pkey_info,
        };
        TARGET.with(|c| c.set(Some(t)));
        t
    }
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
    // SAFETY: the relation and its one index are opened and locked as an INSERT would; the tuple
    // is formed against the table's own descriptor with datums of the columns' types and its key
    // entry from the same datums (the index is the plain (model, model_id) key). An ERROR
    // anywhere aborts the (sub)transaction, which releases the relation, index and memory.
    unsafe {
        let Some(rel) = open() else {
            return false;
        };
        let target = target(rel);
        if !target.direct || target.pkey_info.is_null() {
            pg_sys::table_close(rel, pg_sys::NoLock as i32);
            return false;
        }
        let desc = (*rel).rd_att;
        let natts = (*desc).natts as usize;
        let mut values = vec![pg_sys::Datum::from(0usize); natts];
        let mut nulls = vec![true; natts];
        let datums = [
            model.into_datum(),
            model_id.into_datum(),
            version.into_datum(),
            None,
            Some(empty_object()),
            None,
            version.into_datum(),
        ];
        for (k, d) in datums.into_iter().enumerate() {
            if let Some(d) = d {
                values[target.att[k]] = d;
                nulls[target.att[k]] = false;
            }
        }
        let tuple = pg_sys::heap_form_tuple(desc, values.as_mut_ptr(), nulls.as_mut_ptr());
        pg_sys::simple_heap_insert(rel, tuple);
        let info = target.pkey_info;
        let mut keys = [pg_sys::Datum::from(0usize); pg_sys::INDEX_MAX_KEYS as usize];
        let mut key_nulls = [false; pg_sys::INDEX_MAX_KEYS as usize];
        for k in 0..(*info).ii_NumIndexAttrs as usize {
            let a = (*info).ii_IndexAttrNumbers[k] as usize - 1;
            keys[k] = values[a];
            key_nulls[k] = nulls[a];
        }
        let idx = pg_sys::index_open(target.pkey, pg_sys::RowExclusiveLock as i32);
        // PARTIAL: no wait and no error on a duplicate, only the answer (the entry goes in
        // either way, as for a deferred constraint).
        let unique = actions::index_insert(
            idx,
            &mut keys,
            &mut key_nulls,
            &mut (*tuple).t_self,
            rel,
            pg_sys::IndexUniqueCheck::UNIQUE_CHECK_PARTIAL,
            info,
        );
        pg_sys::index_close(idx, pg_sys::NoLock as i32);
        if !unique {
            // Another row (live, or being inserted) holds the key: take ours back. The delete
            // needs a command id after the insert's to see its own tuple; the upsert that
            // follows then sees neither it nor its dead key entry.
            pg_sys::CommandCounterIncrement();
            pg_sys::simple_heap_delete(rel, &mut (*tuple).t_self);
        }
        pg_sys::heap_freetuple(tuple);
        pg_sys::table_close(rel, pg_sys::NoLock as i32);
        unique
    }
}

/// What a local update or delete writes into an existing `row_state` row.
pub enum Change<'a> {
    /// A delete: the tombstone at the version; column versions and pending values reset.
    Delete,
    /// Column writes: these columns' versions (a jsonb object) merged in.
    Columns(&'a serde_json::Map<String, serde_json::Value>),
}

/// Records a local update or delete at `version` in the key's existing `row_state` row, the
/// same as `record_local`'s UPDATE statements, without the executor. Returns false, having
/// written nothing, whenever the statement's own handling is needed: no row for the key, a row
/// at or above `version` (the caller re-mints), a row changed or locked concurrently (the
/// UPDATE waits and re-checks; here the wait is only for the lock, then anything but a clean
/// update goes back to SQL), a transaction snapshot (REPEATABLE READ and above: the UPDATE's
/// visibility rules), or a table altered since pg_sync created it.
#[cfg(any(feature = "pg14", feature = "pg15"))]
pub fn update_existing(model: &str, model_id: &str, change: Change<'_>, version: &str) -> bool {
    // SAFETY: a relation opened and locked as an UPDATE would; an index scan under a registered
    // snapshot; the table AM's own update, which waits for row locks. An ERROR aborts the
    // (sub)transaction, which releases all of it.
    unsafe {
        if pg_sys::XactIsoLevel >= pg_sys::XACT_REPEATABLE_READ as i32 {
            return false;
        }
        let Some(rel) = open() else {
            return false;
        };
        let target = target(rel);
        if !target.direct || target.pkey == pg_sys::InvalidOid {
            pg_sys::table_close(rel, pg_sys::NoLock as i32);
            return false;
        }
        // What an SQL statement here would see: this transaction's earlier writes (also this
        // command's, e.g. the state row an earlier row of the statement inserted) and the
        // latest commits.
        pg_sys::CommandCounterIncrement();
        let snapshot = pg_sys::RegisterSnapshot(pg_sys::GetLatestSnapshot());
        let idx = pg_sys::index_open(target.pkey, pg_sys::RowExclusiveLock as i32);
        let mut keys: [pg_sys::ScanKeyData; 2] = std::mem::zeroed();
        let model_d = model.into_datum().expect("text");
        let id_d = model_id.into_datum().expect("text");
        for (k, d) in [model_d, id_d].into_iter().enumerate() {
            pg_sys::ScanKeyInit(
                &mut keys[k],
                (k + 1) as pg_sys::AttrNumber,
                pg_sys::BTEqualStrategyNumber as pg_sys::StrategyNumber,
                pg_sys::regproc::from(pg_sys::F_TEXTEQ),
                d,
            );
        }
        let scan = pg_sys::index_beginscan(rel, idx, snapshot, 2, 0);
        pg_sys::index_rescan(scan, keys.as_mut_ptr(), 2, std::ptr::null_mut(), 0);
        let old = pg_sys::table_slot_create(rel, std::ptr::null_mut());
        let found =
            pg_sys::index_getnext_slot(scan, pg_sys::ScanDirection::ForwardScanDirection, old);
        pg_sys::index_endscan(scan);
        let mut updated = false;
        if found {
            pg_sys::slot_getallattrs(old);
            let natts = (*(*rel).rd_att).natts as usize;
            let ov = std::slice::from_raw_parts((*old).tts_values, natts);
            let on = std::slice::from_raw_parts((*old).tts_isnull, natts);
            let text = |k: usize| -> Option<String> {
                let i = target.att[k];
                if on[i] {
                    None
                } else {
                    String::from_datum(ov[i], false)
                }
            };
            // WHERE max_version < $3 (COLLATE "C": bytewise).
            let above = text(6).is_some_and(|m| m.as_bytes() < version.as_bytes());
            if above {
                let new = pg_sys::table_slot_create(rel, std::ptr::null_mut());
                pg_sys::ExecClearTuple(new);
                let nv = std::slice::from_raw_parts_mut((*new).tts_values, natts);
                let nn = std::slice::from_raw_parts_mut((*new).tts_isnull, natts);
                nv.copy_from_slice(ov);
                nn.copy_from_slice(on);
                let mut set = |k: usize, d: Option<pg_sys::Datum>| {
                    let i = target.att[k];
                    nn[i] = d.is_none();
                    nv[i] = d.unwrap_or(pg_sys::Datum::from(0usize));
                };
                // created = COALESCE(created, ''): a row with no state predates capture.
                set(
                    2,
                    Some(text(2).unwrap_or_default().into_datum().expect("text")),
                );
                match change {
                    Change::Delete => {
                        set(3, version.into_datum());
                        set(4, Some(empty_object()));
                    }
                    Change::Columns(cols) => {
                        let add = Jsonb(serde_json::Value::Object(cols.clone()))
                            .into_datum()
                            .expect("jsonb");
                        let merged = pg_sys::OidFunctionCall2Coll(
                            pg_sys::Oid::from(pg_sys::F_JSONB_CONCAT),
                            pg_sys::InvalidOid,
                            ov[target.att[4]],
                            add,
                        );
                        set(4, Some(merged));
                    }
                }
                set(5, None);
                set(6, version.into_datum());
                pg_sys::ExecStoreVirtualTuple(new);
                let mut tmfd: pg_sys::TM_FailureData = std::mem::zeroed();
                let mut lockmode: pg_sys::LockTupleMode::Type = 0;
                let mut update_indexes = false;
                let am = (*rel).rd_tableam;
                let update = (*am).tuple_update.expect("heap access method updates");
                let result = update(
                    rel,
                    &mut (*old).tts_tid,
                    new,
                    pg_sys::GetCurrentCommandId(true),
                    snapshot,
                    std::ptr::null_mut(),
                    true,
                    &mut tmfd,
                    &mut lockmode,
                    &mut update_indexes,
                );
                updated = result == pg_sys::TM_Result::TM_Ok;
                if updated && update_indexes {
                    // Not a HOT update: the new version needs its own index entries.
                    let estate = pg_sys::CreateExecutorState();
                    let rri = pg_sys::palloc0(std::mem::size_of::<pg_sys::ResultRelInfo>())
                        .cast::<pg_sys::ResultRelInfo>();
                    pg_sys::InitResultRelInfo(rri, rel, 0, std::ptr::null_mut(), 0);
                    pg_sys::ExecOpenIndices(rri, false);
                    let mut conflict = false;
                    // update = false: the "index unchanged" hint reads the statement's range
                    // table, which there is none of; it is only a hint.
                    pg_sys::ExecInsertIndexTuples(
                        rri,
                        new,
                        estate,
                        false,
                        false,
                        &mut conflict,
                        std::ptr::null_mut(),
                    );
                    pg_sys::ExecCloseIndices(rri);
                    pg_sys::FreeExecutorState(estate);
                }
                pg_sys::ExecDropSingleTupleTableSlot(new);
            }
        }
        pg_sys::ExecDropSingleTupleTableSlot(old);
        pg_sys::index_close(idx, pg_sys::NoLock as i32);
        pg_sys::UnregisterSnapshot(snapshot);
        pg_sys::table_close(rel, pg_sys::NoLock as i32);
        updated
    }
}

/// See above; other Postgres versions use the SQL statements.
#[cfg(not(any(feature = "pg14", feature = "pg15")))]
pub fn update_existing(_model: &str, _model_id: &str, _change: Change<'_>, _version: &str) -> bool {
    false
}
