//! Writes `pg_sync.sync_actions` rows without the executor.
//!
//! Every captured row writes one or two action rows. Through SPI each is a full executor
//! start-up and shut-down (most of what a captured row cost); here the tuple is formed in Rust
//! and inserted with `simple_heap_insert` plus plain `index_insert`s, the same WAL and the same
//! visibility as the INSERT it replaces. What that needs beyond the tuple (the table's oid, its
//! layout, each index's `IndexInfo`) is looked up once per relcache invalidation of the log, not
//! per row: `CatalogTupleInsert` rebuilt every index's `IndexInfo` and a slot for each row. The column defaults are filled
//! here: `id` from the identity sequence, `xid` as `pg_current_xact_id()`, `created_at` as
//! `now()`.
//!
//! No permission check runs (the heap is written directly), so no switch to `pgsync_owner` is
//! needed either, and nothing user-defined is evaluated: the values arrive as finished datums
//! computed as the writer by the caller. The direct path is used only while the table looks
//! exactly as pg_sync created it (known columns, no triggers, no CHECK constraints, only plain
//! indexes without expressions, predicates, exclusion or deferred uniqueness; one that a
//! concurrent CREATE INDEX or REINDEX has not made ready for inserts gets no entries, as from the
//! executor); otherwise the caller falls back to its SPI INSERT, which honours whatever was
//! added.

use pgrx::pg_sys;
use std::cell::Cell;
use std::ffi::CStr;

extern "C-unwind" {
    // commands/sequence.h; exported by the server. Permissions are pg_sync's own business here:
    // the identity sequence belongs to the log, which only pg_sync writes.
    fn nextval_internal(relid: pg_sys::Oid, check_permissions: bool) -> i64;
}

/// `nextval` of the log's identity sequence, with an ERROR turned into a Rust panic.
unsafe fn nextval(seq: pg_sys::Oid) -> i64 {
    // SAFETY: a plain call into the server, guarded like pgrx's own bindings.
    unsafe { pg_sys::ffi::pg_guard_ffi_boundary(|| nextval_internal(seq, false)) }
}

/// The columns of `sync_actions` as `sql/schema.sql` creates them, in the order `Values` holds
/// them.
const COLUMNS: [Col; 15] = [
    // An identity column has no pg_attrdef default.
    col(c"id", pg_sys::INT8OID, true, false, NONE),
    col(c"model", pg_sys::TEXTOID, true, false, DEFAULT),
    col(c"model_id", pg_sys::TEXTOID, true, false, DEFAULT),
    col(c"action", pg_sys::TEXTOID, true, false, DEFAULT),
    col(c"data", pg_sys::JSONBOID, true, false, NONE),
    col(c"version", pg_sys::TEXTOID, true, false, C),
    col(c"versions", pg_sys::JSONBOID, false, false, NONE),
    col(c"origin", pg_sys::TEXTOID, true, false, DEFAULT),
    col(c"group_id", pg_sys::TEXTOID, false, false, DEFAULT),
    col(c"prev_group_id", pg_sys::TEXTOID, false, false, DEFAULT),
    col(c"moved", pg_sys::BOOLOID, true, true, NONE),
    col(c"client_id", pg_sys::TEXTOID, false, false, DEFAULT),
    col(c"client_tx_id", pg_sys::UUIDOID, false, false, NONE),
    col(c"xid", pg_sys::XID8OID, true, true, NONE),
    col(c"created_at", pg_sys::TIMESTAMPTZOID, true, true, NONE),
];
const ID: usize = 0;
const XID: usize = 13;
const CREATED_AT: usize = 14;

/// The most indexes the direct path maintains (pg_sync creates two); a log with more goes
/// through SQL.
const MAX_INDEXES: usize = 4;

/// What the direct path needs to know about the log table, checked once per relcache entry.
#[derive(Clone, Copy)]
struct Target {
    relid: pg_sys::Oid,
    /// 0-based attribute index of each of `COLUMNS`.
    att: [usize; 15],
    /// The identity sequence of `id`.
    seq: pg_sys::Oid,
    /// The table is as pg_sync created it: the direct path applies.
    direct: bool,
    /// The log's indexes (all plain, see `plain_layout`) with their `IndexInfo`, built in
    /// `INFO_CONTEXT`; `nindexes` of them are set. An index not ready for inserts has a null
    /// `IndexInfo` and gets no entries; it is listed so that its own invalidation (when it
    /// becomes ready, which invalidates the index, not the table) makes the layout be checked
    /// again.
    indexes: [(pg_sys::Oid, *mut pg_sys::IndexInfo); MAX_INDEXES],
    nindexes: usize,
}

thread_local! {
    static TARGET: Cell<Option<Target>> = const { Cell::new(None) };
    /// Holds the `IndexInfo`s of `TARGET`; reset only when a new `Target` is checked (never from
    /// the invalidation callback, which may run while an insert uses them).
    static INFO_CONTEXT: Cell<pg_sys::MemoryContext> = const { Cell::new(std::ptr::null_mut()) };
}

/// Relcache invalidation: forget the checked layout when the log table, one of its indexes (or
/// everything) changes. Never borrows, so it is safe whenever Postgres delivers invalidations.
pub fn invalidate(relid: pg_sys::Oid) {
    TARGET.with(|t| {
        let ours = |t: Target| {
            t.relid == relid || t.indexes[..t.nindexes].iter().any(|&(oid, _)| oid == relid)
        };
        if relid == pg_sys::InvalidOid || t.get().is_some_and(ours) {
            t.set(None);
        }
    });
}

/// One action row's values, without the defaults (`id`, `xid`, `created_at`); `None` is NULL.
/// Datums must be of the columns' types (text, jsonb, bool, uuid).
pub struct Values {
    pub datums: [Option<pg_sys::Datum>; 15],
}

/// A column as pg_sync creates it: type, NOT NULL, whether it has a default, collation. The
/// direct paths write raw datums of these types and fill the defaults themselves, so a column
/// altered in any of these ways must send the write back to SQL.
#[derive(Clone, Copy)]
pub(crate) struct Col {
    pub name: &'static CStr,
    pub typ: pg_sys::Oid,
    pub not_null: bool,
    pub has_default: bool,
    pub collation: pg_sys::Oid,
}

pub(crate) const fn col(
    name: &'static CStr,
    typ: pg_sys::Oid,
    not_null: bool,
    has_default: bool,
    collation: pg_sys::Oid,
) -> Col {
    Col {
        name,
        typ,
        not_null,
        has_default,
        collation,
    }
}

const NONE: pg_sys::Oid = pg_sys::InvalidOid;
const DEFAULT: pg_sys::Oid = pg_sys::DEFAULT_COLLATION_OID;
pub(crate) const C: pg_sys::Oid = pg_sys::C_COLLATION_OID;

/// Checks that the open relation is as pg_sync created it for a direct write: a plain table
/// without row-level security whose live columns are exactly `columns` (same types, NOT NULL,
/// defaults and collations; none generated; their attribute indexes go to `att`), without
/// triggers or CHECK constraints, whose indexes are all plain (no expressions, predicates,
/// exclusion or deferred uniqueness, so keys are formed from columns and checked at once).
pub(crate) unsafe fn plain_layout(
    rel: pg_sys::Relation,
    columns: &[Col],
    att: &mut [usize],
) -> bool {
    // SAFETY: as the caller's.
    unsafe { layout(rel, columns, att, false) }
}

/// `plain_layout`, where `unready_ok` lets an index that is not ready for inserts pass (the
/// first phase of a CREATE INDEX or REINDEX CONCURRENTLY has committed it, or a DROP INDEX
/// CONCURRENTLY is removing it): the executor gives such an index no entries, and the command
/// building it takes the rows of transactions that did not know it from the heap.
unsafe fn layout(
    rel: pg_sys::Relation,
    columns: &[Col],
    att: &mut [usize],
    unready_ok: bool,
) -> bool {
    unsafe {
        let desc = (*rel).rd_att;
        let natts = (*desc).natts as usize;
        att.fill(usize::MAX);
        let mut direct = (*(*rel).rd_rel).relkind == pg_sys::RELKIND_RELATION as std::ffi::c_char
            && !(*(*rel).rd_rel).relrowsecurity
            && (*rel).trigdesc.is_null()
            && ((*desc).constr.is_null() || (*(*desc).constr).num_check == 0);
        for i in 0..natts {
            let a = &*(*desc).attrs.as_ptr().add(i);
            if a.attisdropped {
                continue;
            }
            let name = CStr::from_ptr(a.attname.data.as_ptr());
            match columns.iter().position(|c| c.name == name) {
                Some(k) => {
                    let c = &columns[k];
                    if a.atttypid != c.typ
                        || a.attnotnull != c.not_null
                        || a.atthasdef != c.has_default
                        || a.attgenerated != 0
                        || a.attcollation != c.collation
                    {
                        direct = false;
                    }
                    att[k] = i;
                }
                // A column pg_sync does not know: its default must come from an INSERT.
                None => direct = false,
            }
        }
        if att.contains(&usize::MAX) {
            direct = false;
        }
        if direct {
            let list = pg_sys::RelationGetIndexList(rel);
            if !list.is_null() {
                for k in 0..(*list).length as usize {
                    let oid = (*(*list).elements.add(k)).oid_value;
                    let idx = pg_sys::index_open(oid, pg_sys::AccessShareLock as i32);
                    let form = &*(*idx).rd_index;
                    let plain = (unready_ok && !form.indisready)
                        || (form.indimmediate
                            && !form.indisexclusion
                            && form.indisready
                            && form.indislive
                            && pg_sys::RelationGetIndexExpressions(idx).is_null()
                            && pg_sys::RelationGetIndexPredicate(idx).is_null());
                    pg_sys::index_close(idx, pg_sys::AccessShareLock as i32);
                    if !plain {
                        direct = false;
                        break;
                    }
                }
            }
        }
        direct
    }
}

/// Checks the open log relation and records its layout and its indexes' `IndexInfo`s.
unsafe fn check(rel: pg_sys::Relation) -> Target {
    unsafe {
        let relid = (*rel).rd_id;
        let mut att = [usize::MAX; 15];
        let mut direct = layout(rel, &COLUMNS, &mut att, true);
        let mut seq = pg_sys::InvalidOid;
        if direct {
            seq = pg_sys::getIdentitySequence(relid, (att[ID] + 1) as pg_sys::AttrNumber, true);
            direct = seq != pg_sys::InvalidOid;
        }
        let mut indexes = [(pg_sys::InvalidOid, std::ptr::null_mut()); MAX_INDEXES];
        let mut nindexes = 0;
        if direct {
            let context = info_context();
            // Nothing uses the previous Target's IndexInfos any more: it was invalidated.
            pg_sys::MemoryContextReset(context);
            let old = pg_sys::MemoryContextSwitchTo(context);
            let list = pg_sys::RelationGetIndexList(rel);
            let n = if list.is_null() {
                0
            } else {
                (*list).length as usize
            };
            if n > MAX_INDEXES {
                direct = false;
            } else {
                for (k, slot) in indexes.iter_mut().enumerate().take(n) {
                    let oid = (*(*list).elements.add(k)).oid_value;
                    let idx = pg_sys::index_open(oid, pg_sys::RowExclusiveLock as i32);
                    let info = if (*(*idx).rd_index).indisready {
                        pg_sys::BuildIndexInfo(idx)
                    } else {
                        std::ptr::null_mut()
                    };
                    *slot = (oid, info);
                    pg_sys::index_close(idx, pg_sys::NoLock as i32);
                }
                nindexes = n;
            }
            pg_sys::MemoryContextSwitchTo(old);
        }
        Target {
            relid,
            att,
            seq,
            direct,
            indexes,
            nindexes,
        }
    }
}

/// The long-lived context `Target`'s `IndexInfo`s live in, created on first use.
fn info_context() -> pg_sys::MemoryContext {
    long_lived_context(&INFO_CONTEXT, c"pg_sync log indexes")
}

/// The memory context held in `slot`, created on first use (named `name`, a child of
/// TopMemoryContext, for the backend's lifetime): where a checked `Target` keeps its
/// `IndexInfo`s (here and in `state_direct`).
pub(crate) fn long_lived_context(
    slot: &'static std::thread::LocalKey<Cell<pg_sys::MemoryContext>>,
    name: &'static std::ffi::CStr,
) -> pg_sys::MemoryContext {
    slot.with(|c| {
        if c.get().is_null() {
            // SAFETY: a child of TopMemoryContext, for the backend's lifetime.
            let context = unsafe {
                pg_sys::AllocSetContextCreateInternal(
                    pg_sys::TopMemoryContext,
                    name.as_ptr(),
                    0,
                    1024,
                    8192,
                )
            };
            c.set(context);
        }
        c.get()
    })
}

/// Opens `pg_sync.<name>` with `lock`, by the oid `cached` from an earlier open when there is
/// one (no catalog lookup by name per row). `fresh` is true when that oid could not be trusted:
/// not cached, or the table's cached layout was invalidated while locking it (so it may have
/// been dropped and the oid reused); the caller then checks the layout again. `None` when the
/// table does not exist.
pub(crate) unsafe fn open_cached(
    name: &CStr,
    cached: impl Fn() -> Option<pg_sys::Oid>,
    lock: pg_sys::LOCKMODE,
) -> Option<(pg_sys::Relation, bool)> {
    unsafe {
        if let Some(relid) = cached() {
            // try_: a dropped table's oid (invalidation not yet seen) is not an ERROR.
            // relation_: Postgres 13 has no try_table_open, and the layout checks refuse
            // anything but a plain table.
            let rel = pg_sys::try_relation_open(relid, lock);
            if !rel.is_null() {
                // The lock processed pending invalidations: still cached means unchanged.
                if cached() == Some(relid) {
                    return Some((rel, false));
                }
                pg_sys::table_close(rel, pg_sys::NoLock as i32);
            }
        }
        let relid = relid_of(name)?;
        let rel = pg_sys::try_relation_open(relid, lock);
        (!rel.is_null()).then_some((rel, true))
    }
}

/// The oid of `pg_sync.<name>`, `None` when the extension's schema or table is missing.
pub(crate) fn relid_of(name: &CStr) -> Option<pg_sys::Oid> {
    // SAFETY: syscache lookups by name; missing_ok.
    unsafe {
        let nsp = pg_sys::get_namespace_oid(c"pg_sync".as_ptr(), true);
        if nsp == pg_sys::InvalidOid {
            return None;
        }
        let rel = pg_sys::get_relname_relid(name.as_ptr(), nsp);
        (rel != pg_sys::InvalidOid).then_some(rel)
    }
}

/// Opens the log for writing and returns it with its checked layout; `None` (nothing open) when
/// the table is missing.
unsafe fn open_target() -> Option<(pg_sys::Relation, Target)> {
    unsafe {
        let cached = || TARGET.with(Cell::get).map(|t| t.relid);
        let (rel, fresh) = open_cached(c"sync_actions", cached, pg_sys::RowExclusiveLock as i32)?;
        // After the lock: pending invalidations of the table have been processed.
        let target = match TARGET.with(Cell::get) {
            Some(t) if !fresh && t.relid == (*rel).rd_id => t,
            _ => {
                let t = check(rel);
                TARGET.with(|c| c.set(Some(t)));
                t
            }
        };
        Some((rel, target))
    }
}

/// Captures one action row for the direct write; returns false (having written nothing) when
/// the table is not as pg_sync created it and the caller must use its SQL INSERT instead.
///
/// The row gets its id, xid and timestamp now (so ids keep capture order), but on Postgres 14
/// and later it is only formed here and queued (`batch`); the queue goes into the heap in one
/// multi-insert at the end of the statement.
pub fn insert(values: &Values) -> bool {
    // SAFETY: the relation is opened and locked as an INSERT would; the tuple is formed against
    // its own descriptor, with datums of the columns' types; the index entries are formed from
    // the same datums (the indexes are plain: columns only).
    unsafe {
        let Some((rel, target)) = open_target() else {
            return false;
        };
        if !target.direct {
            pg_sys::table_close(rel, pg_sys::NoLock as i32);
            return false;
        }
        let desc = (*rel).rd_att;
        let natts = (*desc).natts as usize;
        let mut datums = vec![pg_sys::Datum::from(0usize); natts];
        let mut nulls = vec![true; natts];
        for (k, v) in values.datums.iter().enumerate() {
            if let Some(d) = v {
                datums[target.att[k]] = *d;
                nulls[target.att[k]] = false;
            }
        }
        let id = nextval(target.seq);
        datums[target.att[ID]] = pg_sys::Datum::from(id);
        nulls[target.att[ID]] = false;
        let xid = pg_sys::GetTopFullTransactionId().value;
        datums[target.att[XID]] = pg_sys::Datum::from(xid);
        nulls[target.att[XID]] = false;
        datums[target.att[CREATED_AT]] =
            pg_sys::Datum::from(pg_sys::GetCurrentTransactionStartTimestamp());
        nulls[target.att[CREATED_AT]] = false;
        if batch::enabled() {
            let tuple = batch::form(desc, &mut datums, &mut nulls);
            pg_sys::table_close(rel, pg_sys::NoLock as i32);
            batch::push(tuple);
            return true;
        }
        let tuple = pg_sys::heap_form_tuple(desc, datums.as_mut_ptr(), nulls.as_mut_ptr());
        pg_sys::simple_heap_insert(rel, tuple);
        insert_index_entries(rel, &target, &datums, &nulls, &mut (*tuple).t_self);
        pg_sys::heap_freetuple(tuple);
        pg_sys::table_close(rel, pg_sys::NoLock as i32);
    }
    true
}

/// The log row's entries in every index of `target`, keys taken from its column values.
///
/// # Safety
/// `rel` open and locked for writing, `target` its checked layout, `tid` the heap tuple's.
unsafe fn insert_index_entries(
    rel: pg_sys::Relation,
    target: &Target,
    datums: &[pg_sys::Datum],
    nulls: &[bool],
    tid: pg_sys::ItemPointer,
) {
    // SAFETY: as the caller's.
    unsafe { insert_index_entries_of(rel, target, &mut [(datums, nulls, tid)].into_iter()) }
}

/// The entries of every row in `rows` (column values and heap tid) in every index of `target`,
/// each index opened once for all of them.
///
/// # Safety
/// As `insert_index_entries`, for every row.
unsafe fn insert_index_entries_of<'a>(
    rel: pg_sys::Relation,
    target: &Target,
    rows: &mut dyn ExactSizeIterator<Item = (&'a [pg_sys::Datum], &'a [bool], pg_sys::ItemPointer)>,
) {
    // What CatalogIndexInsert does, with the IndexInfos kept and the keys taken from the
    // datums: no slot, no FormIndexDatum (no expressions), no ResultRelInfo per row.
    unsafe {
        let mut keys = [pg_sys::Datum::from(0usize); pg_sys::INDEX_MAX_KEYS as usize];
        let mut key_nulls = [false; pg_sys::INDEX_MAX_KEYS as usize];
        let mut idxs = [std::ptr::null_mut(); MAX_INDEXES];
        for (i, &(oid, info)) in target.indexes[..target.nindexes].iter().enumerate() {
            // Not ready for inserts: no entries (see `Target::indexes`).
            if !info.is_null() {
                idxs[i] = pg_sys::index_open(oid, pg_sys::RowExclusiveLock as i32);
            }
        }
        for (datums, nulls, tid) in rows {
            for (i, &(_, info)) in target.indexes[..target.nindexes].iter().enumerate() {
                if info.is_null() {
                    continue;
                }
                let idx: pg_sys::Relation = idxs[i];
                let n = (*info).ii_NumIndexAttrs as usize;
                for k in 0..n {
                    let a = (*info).ii_IndexAttrNumbers[k] as usize - 1;
                    keys[k] = datums[a];
                    key_nulls[k] = nulls[a];
                }
                let unique = if (*(*idx).rd_index).indisunique {
                    pg_sys::IndexUniqueCheck::UNIQUE_CHECK_YES
                } else {
                    pg_sys::IndexUniqueCheck::UNIQUE_CHECK_NO
                };
                index_insert(idx, &mut keys, &mut key_nulls, tid, rel, unique, info);
            }
        }
        for &idx in idxs[..target.nindexes].iter().filter(|i| !i.is_null()) {
            pg_sys::index_close(idx, pg_sys::NoLock as i32);
        }
    }
}

/// Statement-level batching of the direct log writes (Postgres 14 and later).
///
/// Captured rows are queued, each tagged with the subtransaction that captured it, and written
/// with one `multi_insert` (one WAL record per heap page instead of one per row) at the end of
/// every executor run (`ExecutorFinish`, after the AFTER triggers that capture), around every
/// utility statement (COPY fires its triggers there; DDL must find no rows queued) and before
/// commit or prepare. Only the current subtransaction's rows are written at such a point: a
/// parent's rows are never written inside a child, whose rollback would take them along. A
/// subtransaction's commit hands its rows to its parent; its rollback drops them, so a rolled-back
/// savepoint leaks nothing; a transaction's end drops whatever is left. The log's readers are
/// unaffected: they read committed transactions, and the sequencer orders a transaction's
/// actions by id, which the rows got when captured. Every later statement sees all of a
/// statement's rows. A query started by a trigger in the middle of the capturing statement sees
/// the rows flushed so far: any query ends in `ExecutorFinish`, which writes the current
/// subtransaction's queue, so the trigger of row N of a statement sees rows 1..N-1 (flushed by
/// the previous trigger's query) but not its own row (captured by an AFTER trigger that may fire
/// after it, and queued until the next flush point). Row at a time, it saw rows 1..N.
#[cfg(not(feature = "pg13"))]
pub(crate) mod batch {
    use super::*;
    use std::cell::RefCell;

    /// At most this many rows wait: a longer statement writes them in chunks.
    const MAX_ROWS: usize = 1000;

    thread_local! {
        /// The queued rows (formed in `CONTEXT`) with the subtransaction that captured each.
        static QUEUE: RefCell<Vec<(pg_sys::SubTransactionId, pg_sys::HeapTuple)>> =
            const { RefCell::new(Vec::new()) };
        /// Holds the queued tuples; reset whenever the queue is empty again.
        static CONTEXT: Cell<pg_sys::MemoryContext> = const { Cell::new(std::ptr::null_mut()) };
    }

    pub fn enabled() -> bool {
        true
    }

    fn context() -> pg_sys::MemoryContext {
        CONTEXT.with(|c| {
            if c.get().is_null() {
                // SAFETY: a child of TopMemoryContext, for the backend's lifetime.
                let context = unsafe {
                    pg_sys::AllocSetContextCreateInternal(
                        pg_sys::TopMemoryContext,
                        c"pg_sync queued log rows".as_ptr(),
                        0,
                        8192,
                        8 * 1024 * 1024,
                    )
                };
                c.set(context);
            }
            c.get()
        })
    }

    /// Forms the row in the queue's memory.
    ///
    /// # Safety
    /// `desc` the log's descriptor; datums of its columns' types.
    pub unsafe fn form(
        desc: pg_sys::TupleDesc,
        datums: &mut [pg_sys::Datum],
        nulls: &mut [bool],
    ) -> pg_sys::HeapTuple {
        unsafe {
            let old = pg_sys::MemoryContextSwitchTo(context());
            let tuple = pg_sys::heap_form_tuple(desc, datums.as_mut_ptr(), nulls.as_mut_ptr());
            pg_sys::MemoryContextSwitchTo(old);
            tuple
        }
    }

    /// Queues a formed row for the current subtransaction; writes the queue when full.
    pub fn push(tuple: pg_sys::HeapTuple) {
        // SAFETY: reads backend state.
        let sub = unsafe { pg_sys::GetCurrentSubTransactionId() };
        let full = QUEUE.with(|q| {
            let mut q = q.borrow_mut();
            q.push((sub, tuple));
            q.len() >= MAX_ROWS
        });
        if full {
            flush();
        }
    }

    /// Writes the current subtransaction's queued rows (in capture order): one multi-insert into
    /// the heap, then each row's index entries.
    pub fn flush() {
        // SAFETY: reads backend state.
        unsafe {
            // Nothing is written in a failed transaction (its rows were dropped when it
            // failed) or outside one.
            if !pg_sys::IsTransactionState() || pg_sys::IsAbortedTransactionBlockState() {
                return;
            }
        }
        // SAFETY: reads backend state.
        let sub = unsafe { pg_sys::GetCurrentSubTransactionId() };
        let mine: Vec<pg_sys::HeapTuple> = QUEUE.with(|q| {
            let mut q = q.borrow_mut();
            if !q.iter().any(|(s, _)| *s == sub) {
                return Vec::new();
            }
            let (mine, rest): (Vec<_>, Vec<_>) = q.drain(..).partition(|(s, _)| *s == sub);
            *q = rest;
            mine.into_iter().map(|(_, t)| t).collect()
        });
        if mine.is_empty() {
            return;
        }
        // SAFETY: the log opened and locked as an INSERT would; the tuples were formed against
        // its descriptor, which cannot have changed since: every utility statement writes the
        // queue first, and other sessions' DDL waits for this transaction's lock.
        unsafe {
            let Some((rel, target)) = open_target() else {
                crate::errors::raise(
                    pgrx::PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
                    "pg_sync: the log table pg_sync.sync_actions is gone with captured rows queued",
                    "Do not drop pg_sync's tables; reinstall the extension.",
                );
            };
            if !target.direct {
                pg_sys::table_close(rel, pg_sys::NoLock as i32);
                crate::errors::raise(
                    pgrx::PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    "pg_sync: the log table pg_sync.sync_actions changed with captured rows queued",
                    "Alter pg_sync's tables in a transaction of their own.",
                );
            }
            let natts = (*(*rel).rd_att).natts as usize;
            // The slots describe their tuples with a private copy of the log's descriptor: a copy
            // is not reference-counted (`tdrefcount` -1), so making and dropping a slot does not
            // pin it in the resource owner (a hashed remember and forget per row, about 7% of a
            // bulk insert). The copy lives in the statement's memory until after the slots are
            // dropped.
            let desc = pg_sys::CreateTupleDescCopy((*rel).rd_att);
            // Each slot owns its tuple (`shouldFree`): the multi-insert's materialize step is
            // then a no-op instead of a copy of every row, and dropping the slot frees it.
            let mut slots: Vec<*mut pg_sys::TupleTableSlot> = mine
                .iter()
                .map(|&t| {
                    let slot = pg_sys::MakeSingleTupleTableSlot(desc, &pg_sys::TTSOpsHeapTuple);
                    pg_sys::ExecStoreHeapTuple(t, slot, true);
                    slot
                })
                .collect();
            if let [t] = mine[..] {
                // One row (a single-row statement): a plain insert's WAL record is 8 bytes
                // smaller than a multi-insert's.
                pg_sys::simple_heap_insert(rel, t);
                (*slots[0]).tts_tid = (*t).t_self;
            } else {
                let am = (*rel).rd_tableam;
                let multi_insert = (*am)
                    .multi_insert
                    .expect("heap access method multi-inserts");
                multi_insert(
                    rel,
                    slots.as_mut_ptr(),
                    slots.len() as i32,
                    pg_sys::GetCurrentCommandId(true),
                    0,
                    std::ptr::null_mut(),
                );
            }
            insert_index_entries_of(
                rel,
                &target,
                &mut slots.iter().map(|&slot| {
                    pg_sys::slot_getallattrs(slot);
                    (
                        std::slice::from_raw_parts((*slot).tts_values, natts),
                        std::slice::from_raw_parts((*slot).tts_isnull, natts) as &[bool],
                        &mut (*slot).tts_tid as pg_sys::ItemPointer,
                    )
                }),
            );
            for slot in slots {
                // Frees the slot's tuple too (stored with shouldFree).
                pg_sys::ExecDropSingleTupleTableSlot(slot);
            }
            pg_sys::FreeTupleDesc(desc);
            pg_sys::table_close(rel, pg_sys::NoLock as i32);
        }
        reset_if_empty();
    }

    /// Drops the rows of subtransaction `sub` and of its children (which have larger ids).
    fn drop_from(sub: pg_sys::SubTransactionId) {
        QUEUE.with(|q| {
            q.borrow_mut().retain(|&(s, t)| {
                if s >= sub {
                    // SAFETY: allocated in CONTEXT by form; no longer referenced.
                    unsafe { pg_sys::heap_freetuple(t) };
                    false
                } else {
                    true
                }
            })
        });
        reset_if_empty();
    }

    fn reset_if_empty() {
        if QUEUE.with(|q| q.borrow().is_empty()) {
            CONTEXT.with(|c| {
                if !c.get().is_null() {
                    // SAFETY: nothing refers to the queue's memory any more.
                    unsafe { pg_sys::MemoryContextReset(c.get()) };
                }
            });
        }
    }

    /// Forgets every queued row without touching the heap (the transaction is over).
    fn clear() {
        QUEUE.with(|q| q.borrow_mut().clear());
        reset_if_empty();
    }

    #[pgrx::pg_guard]
    unsafe extern "C-unwind" fn on_xact(
        event: pg_sys::XactEvent::Type,
        _arg: *mut std::ffi::c_void,
    ) {
        use pg_sys::XactEvent::*;
        match event {
            XACT_EVENT_PRE_COMMIT | XACT_EVENT_PARALLEL_PRE_COMMIT | XACT_EVENT_PRE_PREPARE => {
                flush()
            }
            // Nothing queued survives the transaction, whichever way it ended.
            XACT_EVENT_COMMIT
            | XACT_EVENT_PARALLEL_COMMIT
            | XACT_EVENT_ABORT
            | XACT_EVENT_PARALLEL_ABORT
            | XACT_EVENT_PREPARE => clear(),
            _ => {}
        }
    }

    #[pgrx::pg_guard]
    unsafe extern "C-unwind" fn on_subxact(
        event: pg_sys::SubXactEvent::Type,
        my: pg_sys::SubTransactionId,
        parent: pg_sys::SubTransactionId,
        _arg: *mut std::ffi::c_void,
    ) {
        use pg_sys::SubXactEvent::*;
        match event {
            // The committed child's rows are the parent's now, written by it.
            SUBXACT_EVENT_COMMIT_SUB => QUEUE.with(|q| {
                for e in q.borrow_mut().iter_mut() {
                    if e.0 >= my {
                        e.0 = parent;
                    }
                }
            }),
            SUBXACT_EVENT_ABORT_SUB => drop_from(my),
            _ => {}
        }
    }

    // The hooks call the next hook or the standard function unguarded, through their own
    // declarations: pgrx's guarded bindings would turn an ERROR raised inside (by any trigger,
    // any utility statement) into a Rust panic and raise it again, which loses its CONTEXT
    // lines. Their own frames hold nothing to drop, so an ERROR's longjmp may cross them; only
    // `flush_guarded` runs Rust code, behind its own guard.
    extern "C-unwind" {
        #[link_name = "standard_ExecutorFinish"]
        fn raw_standard_executor_finish(query: *mut pg_sys::QueryDesc);
        #[link_name = "standard_ProcessUtility"]
        #[allow(clippy::too_many_arguments)]
        fn raw_standard_process_utility(
            pstmt: *mut pg_sys::PlannedStmt,
            query: *const std::ffi::c_char,
            read_only_tree: bool,
            context: pg_sys::ProcessUtilityContext::Type,
            params: pg_sys::ParamListInfo,
            env: *mut pg_sys::QueryEnvironment,
            dest: *mut pg_sys::DestReceiver,
            qc: *mut pg_sys::QueryCompletion,
        );
    }

    static mut PREV_FINISH: pg_sys::ExecutorFinish_hook_type = None;
    static mut PREV_UTILITY: pg_sys::ProcessUtility_hook_type = None;

    #[pgrx::pg_guard]
    extern "C-unwind" fn flush_guarded() {
        flush();
    }

    unsafe extern "C-unwind" fn executor_finish(query: *mut pg_sys::QueryDesc) {
        unsafe {
            match PREV_FINISH {
                Some(prev) => prev(query),
                None => raw_standard_executor_finish(query),
            }
        }
        flush_guarded();
    }

    #[allow(clippy::too_many_arguments)]
    unsafe extern "C-unwind" fn process_utility(
        pstmt: *mut pg_sys::PlannedStmt,
        query: *const std::ffi::c_char,
        read_only_tree: bool,
        context: pg_sys::ProcessUtilityContext::Type,
        params: pg_sys::ParamListInfo,
        env: *mut pg_sys::QueryEnvironment,
        dest: *mut pg_sys::DestReceiver,
        qc: *mut pg_sys::QueryCompletion,
    ) {
        flush_guarded();
        unsafe {
            match PREV_UTILITY {
                Some(prev) => prev(pstmt, query, read_only_tree, context, params, env, dest, qc),
                None => raw_standard_process_utility(
                    pstmt,
                    query,
                    read_only_tree,
                    context,
                    params,
                    env,
                    dest,
                    qc,
                ),
            }
        }
        flush_guarded();
    }

    /// Installs the hooks and callbacks; once, from `_PG_init`.
    pub fn init() {
        // SAFETY: library load, single-threaded; the previous hooks are chained.
        unsafe {
            PREV_FINISH = pg_sys::ExecutorFinish_hook;
            pg_sys::ExecutorFinish_hook = Some(executor_finish);
            PREV_UTILITY = pg_sys::ProcessUtility_hook;
            pg_sys::ProcessUtility_hook = Some(process_utility);
            pg_sys::RegisterXactCallback(Some(on_xact), std::ptr::null_mut());
            pg_sys::RegisterSubXactCallback(Some(on_subxact), std::ptr::null_mut());
        }
    }
}

/// Postgres 13: no batching (its utility hook differs); every row is written at once.
#[cfg(feature = "pg13")]
pub(crate) mod batch {
    pub fn enabled() -> bool {
        false
    }
    pub unsafe fn form(
        _desc: pgrx::pg_sys::TupleDesc,
        _datums: &mut [pgrx::pg_sys::Datum],
        _nulls: &mut [bool],
    ) -> pgrx::pg_sys::HeapTuple {
        unreachable!()
    }
    pub fn push(_tuple: pgrx::pg_sys::HeapTuple) {}
    pub fn init() {}
}

/// `index_insert` of one entry (Postgres 14 added the `indexUnchanged` hint: false, this is an
/// insert). Returns false only for `UNIQUE_CHECK_PARTIAL` when the key may be a duplicate.
///
/// # Safety
/// Open, locked index and heap relations; `tid` the heap tuple's; `info` the index's.
pub(crate) unsafe fn index_insert(
    idx: pg_sys::Relation,
    keys: &mut [pg_sys::Datum],
    nulls: &mut [bool],
    tid: pg_sys::ItemPointer,
    heap: pg_sys::Relation,
    unique: pg_sys::IndexUniqueCheck::Type,
    info: *mut pg_sys::IndexInfo,
) -> bool {
    unsafe {
        pg_sys::index_insert(
            idx,
            keys.as_mut_ptr(),
            nulls.as_mut_ptr(),
            tid,
            heap,
            unique,
            #[cfg(not(feature = "pg13"))]
            false,
            info,
        )
    }
}
