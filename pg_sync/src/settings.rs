//! Every setting (GUC) of pg_sync, in one place.
//!
//! - `pg_sync.node_id` (superuser, text): this node's id in versions and `origin`. Empty means a
//!   default derived from the cluster's system identifier and the database oid, unique per
//!   database; set it explicitly on federated nodes (and after cloning a data directory).
//! - `pg_sync.max_clock_skew` (superuser, milliseconds, default 60000): how far ahead of the local
//!   wall clock a remote version may be before `apply_remote` rejects it.
//! - `pg_sync.test_clock_offset` (superuser, milliseconds, default 0): shifts the wall clock the
//!   HLC reads. For tests of clock steps only.
//! - `pg_sync.log_conflicts` (superuser, boolean, default off): `apply_remote` records in
//!   `pg_sync.conflicts` each incoming column value that lost to a newer one from another node.
//! - `pg_sync.set_apply` (superuser, boolean, default on): `apply_peer_batch` applies a batch
//!   set-based (`remote_set`) where it can; off applies it change by change (the reference path,
//!   for comparisons and as an escape hatch).
//! - `pg_sync.restoring` (superuser, boolean, default off): a restore session (`pg_restore`,
//!   a `pg_dump` script) sets it so the memberships it restores are not logged again (the log is
//!   restored with them). Superuser only: a writer of memberships must not be able to change
//!   them unlogged (REVIEW rev2 F1). Read by `pg_sync.log_membership()` in SQL.
//! - `pg_sync.gc_horizon_check` (any role, boolean, default on): `apply_remote` refuses (72000)
//!   an insert or column change for a row with no state and no table row when a version it
//!   carries is at or below the tombstone GC horizon (`state::below_gc_horizon`). Off
//!   lets an operator apply such a change on purpose (`retry_quarantined`); a snapshot join
//!   (`apply_peer_page`) turns it off for its pages, which are states, not changes. Any role:
//!   a caller of `apply_remote` can already write any version, so the check protects against
//!   late changes, not against the caller.

use crate::errors;
use pg_sync_lww::version::validate_node_id;
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};
use std::cell::RefCell;
use std::ffi::{CStr, CString};

static NODE_ID: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static MAX_CLOCK_SKEW_MS: GucSetting<i32> = GucSetting::<i32>::new(60_000);
static TEST_CLOCK_OFFSET_MS: GucSetting<i32> = GucSetting::<i32>::new(0);
static LOG_CONFLICTS: GucSetting<bool> = GucSetting::<bool>::new(false);
static RESTORING: GucSetting<bool> = GucSetting::<bool>::new(false);
static SET_APPLY: GucSetting<bool> = GucSetting::<bool>::new(true);
static GC_HORIZON_CHECK: GucSetting<bool> = GucSetting::<bool>::new(true);

pub fn define() {
    GucRegistry::define_bool_guc(
        c"pg_sync.gc_horizon_check",
        c"Refuse remote changes of unknown rows at or below the tombstone GC horizon.",
        c"Off applies them (an operator's decision, then pg_sync.retry_quarantined); snapshot joins turn it off for their pages.",
        &GC_HORIZON_CHECK,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"pg_sync.log_conflicts",
        c"Record remote column values that lost to a newer value from another node.",
        c"apply_remote inserts one row per lost column into pg_sync.conflicts (no values).",
        &LOG_CONFLICTS,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"pg_sync.set_apply",
        c"Apply peer batches set-based where possible.",
        c"Off applies every peer batch change by change (slower; the same result).",
        &SET_APPLY,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"pg_sync.restoring",
        c"This session restores a dump: membership changes are not logged again.",
        c"Set by a superuser for pg_restore or a pg_dump script (PGOPTIONS='-c pg_sync.restoring=on'); the log is restored with the memberships.",
        &RESTORING,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"pg_sync.node_id",
        c"This node's id in LWW versions and the origin of captured changes.",
        c"Letters, digits, '_', '-', '.', ':'; at most 63 bytes. Empty derives one from the system identifier and database oid.",
        &NODE_ID,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_sync.max_clock_skew",
        c"How far ahead of local time a remote version may be before it is rejected.",
        c"apply_remote refuses changes whose clock is further in the future than this.",
        &MAX_CLOCK_SKEW_MS,
        0,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"pg_sync.test_clock_offset",
        c"Test only: shifts the wall clock that the hybrid logical clock reads.",
        c"Used by tests that step the clock back; leave at 0.",
        &TEST_CLOCK_OFFSET_MS,
        i32::MIN,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_MS,
    );
}

pub fn log_conflicts() -> bool {
    LOG_CONFLICTS.get()
}

pub fn gc_horizon_check() -> bool {
    GC_HORIZON_CHECK.get()
}

pub fn set_apply() -> bool {
    SET_APPLY.get()
}

pub fn max_clock_skew_ms() -> u64 {
    MAX_CLOCK_SKEW_MS.get().max(0) as u64
}

pub fn test_clock_offset_ms() -> i64 {
    TEST_CLOCK_OFFSET_MS.get() as i64
}

thread_local! {
    /// (the GUC's value when last resolved, resolved node id): re-resolved when the value
    /// changes. Compared by content: a new string may reuse a freed one's address.
    static NODE_CACHE: RefCell<Option<(Vec<u8>, String)>> = const { RefCell::new(None) };
}

/// This node's id, validated. Cheap on the hot path: resolved again only when the setting moves.
pub fn node_id() -> String {
    // SAFETY: reading the GUC's current string; Postgres owns it and it lives until the next SET.
    let raw = unsafe { *NODE_ID.as_ptr() };
    let current: &[u8] = if raw.is_null() {
        &[]
    } else {
        unsafe { CStr::from_ptr(raw) }.to_bytes()
    };
    let cached = NODE_CACHE.with(|cache| match &*cache.borrow() {
        Some((value, id)) if value.as_slice() == current => Some(id.clone()),
        _ => None,
    });
    if let Some(id) = cached {
        return id;
    }
    let id = if current.is_empty() {
        default_node_id()
    } else {
        let s = String::from_utf8_lossy(current).into_owned();
        if let Err(why) = validate_node_id(&s) {
            errors::invalid(
                format!("invalid pg_sync.node_id: {why}"),
                "Set pg_sync.node_id to a short identifier such as 'eu-west-1'.",
            );
        }
        s
    };
    NODE_CACHE.with(|cache| *cache.borrow_mut() = Some((current.to_vec(), id.clone())));
    id
}

fn default_node_id() -> String {
    // SAFETY: plain reads of backend globals.
    let (sysid, db) = unsafe {
        (
            pgrx::pg_sys::GetSystemIdentifier(),
            pgrx::pg_sys::MyDatabaseId,
        )
    };
    format!("{sysid:x}.{}", db.to_u32())
}
