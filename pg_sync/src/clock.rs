//! The hybrid logical clock, shared by every backend of the cluster.
//!
//! An HLC value packs unix milliseconds in the high bits and a logical counter in the low
//! `COUNTER_BITS`. The current value lives in shared memory and only ever grows (compare-and-swap),
//! so versions are unique and monotonic across concurrent backends.
//!
//! Restart safety: no value is handed out unless it is at or below a high-water mark that has
//! already been written and fsynced to `pg_sync_hlc` in the data directory. The mark runs a
//! window ahead of the clock, so the file is written about once per window, not once per write.
//! At start the clock resumes from the mark, so even a wall clock stepped back across a restart
//! cannot produce a version at or below one issued before it.
//!
//! The mark file covers crashes of this data directory only. After a failover to a standby, a
//! point-in-time recovery or a restore from a dump, the database holds versions the mark never
//! saw. So before a backend first mints a version, the clock observes the highest version stored
//! in its database (log and row state), once per database per server start (a small table of
//! observed databases in shared memory; a standby does not count, its data is still moving).

use crate::errors;
use crate::owner;
use crate::settings;
use crate::xid_guard;
use pg_sync_lww::version::{Version, COUNTER_BITS};
use pgrx::prelude::*;
use pgrx::{PGRXSharedMemory, PgAtomic, PgLwLock};
use std::cell::Cell;
use std::fs;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

const HWM_FILE: &str = "pg_sync_hlc";
const HWM_TMP: &str = "pg_sync_hlc.tmp";
/// How far ahead of the clock the persisted mark is pushed each time it is written.
const HWM_WINDOW: u64 = 10_000 << COUNTER_BITS;

/// How many databases' stored versions the shared table remembers as observed; past that, each
/// new backend of a further database observes them again (correct, only slower).
const OBSERVED_DBS: usize = 64;

pub struct ClockShared {
    hlc: AtomicU64,
    persisted: AtomicU64,
    initialized: AtomicBool,
    /// Oids of databases whose stored maximum version the clock has observed (0: free).
    observed: [AtomicU32; OBSERVED_DBS],
}

// SAFETY: only atomics, valid in shared memory without further initialization.
unsafe impl PGRXSharedMemory for ClockShared {}

impl Default for ClockShared {
    fn default() -> Self {
        ClockShared {
            hlc: AtomicU64::new(0),
            persisted: AtomicU64::new(0),
            initialized: AtomicBool::new(false),
            observed: [const { AtomicU32::new(0) }; OBSERVED_DBS],
        }
    }
}

pub static CLOCK: PgAtomic<ClockShared> = unsafe { PgAtomic::new(c"pg_sync_clock") };
/// Serializes writes of the high-water-mark file; holds the value last written.
static HWM_LOCK: PgLwLock<u64> = unsafe { PgLwLock::new(c"pg_sync_clock_hwm") };

static PRELOADED: AtomicBool = AtomicBool::new(false);

/// Called from `_PG_init` while `shared_preload_libraries` is being processed.
pub fn init_shmem() {
    pgrx::pg_shmem_init!(CLOCK);
    pgrx::pg_shmem_init!(HWM_LOCK);
    PRELOADED.store(true, Ordering::Relaxed);
}

fn shared() -> &'static ClockShared {
    if !PRELOADED.load(Ordering::Relaxed) {
        errors::raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "pg_sync must be loaded through shared_preload_libraries",
            "Add pg_sync to shared_preload_libraries in postgresql.conf and restart the server.",
        );
    }
    let clock = CLOCK.get();
    if !clock.initialized.load(Ordering::Acquire) {
        load_persisted(clock);
    }
    clock
}

/// Reads the high-water mark once per cluster start (the first backend to use the clock).
fn load_persisted(clock: &ClockShared) {
    let mut guard = HWM_LOCK.exclusive();
    if clock.initialized.load(Ordering::Acquire) {
        return;
    }
    let mark = match fs::read_to_string(HWM_FILE) {
        Ok(text) => match text.trim().parse::<u64>() {
            Ok(v) => v,
            Err(_) => {
                pgrx::warning!(
                    "pg_sync: {HWM_FILE} is unreadable; the clock starts from wall time"
                );
                0
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => {
            pgrx::warning!("pg_sync: cannot read {HWM_FILE}: {e}; the clock starts from wall time");
            0
        }
    };
    *guard = mark;
    clock.persisted.store(mark, Ordering::Release);
    clock.hlc.fetch_max(mark, Ordering::AcqRel);
    clock.initialized.store(true, Ordering::Release);
}

/// Makes sure `value` is covered by a durable high-water mark before it is used.
fn ensure_persisted(clock: &ClockShared, value: u64) {
    if value <= clock.persisted.load(Ordering::Acquire) {
        return;
    }
    let mut guard = HWM_LOCK.exclusive();
    if value <= *guard {
        return;
    }
    let mark = value.saturating_add(HWM_WINDOW);
    if let Err(e) = write_mark(mark) {
        drop(guard);
        errors::raise(
            PgSqlErrorCode::ERRCODE_IO_ERROR,
            format!("pg_sync: cannot persist the clock high-water mark: {e}"),
            "Check free space and permissions of the data directory.",
        );
    }
    *guard = mark;
    clock.persisted.store(mark, Ordering::Release);
}

fn write_mark(mark: u64) -> std::io::Result<()> {
    {
        let mut f = fs::File::create(HWM_TMP)?;
        writeln!(f, "{mark}")?;
        f.sync_all()?;
    }
    fs::rename(HWM_TMP, HWM_FILE)?;
    // Make the rename itself durable.
    fs::File::open(".")?.sync_all()
}

/// Wall-clock milliseconds, shifted by the test-only `pg_sync.test_clock_offset`.
pub fn wall_ms() -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    (now + settings::test_clock_offset_ms()).max(0) as u64
}

/// What this backend knows of its database's stored versions (see `observe_stored`).
#[derive(Clone, Copy, PartialEq)]
enum Observed {
    No,
    /// Observed while the server was a standby: enough until it is promoted, then again.
    InRecovery,
    Yes,
}

thread_local! {
    static OBSERVED_HERE: Cell<Observed> = const { Cell::new(Observed::No) };
}

/// Raises the clock to the highest version stored in this database, once per database per
/// server start. One scan of the log and the row state: their versions are not indexed.
fn observe_stored(clock: &ClockShared) {
    let seen = OBSERVED_HERE.with(Cell::get);
    if seen == Observed::Yes {
        return;
    }
    // SAFETY: plain reads of backend globals.
    let (db, in_recovery) =
        unsafe { (pg_sys::MyDatabaseId.to_u32(), pg_sys::RecoveryInProgress()) };
    if in_recovery && seen == Observed::InRecovery {
        return;
    }
    if clock
        .observed
        .iter()
        .any(|s| s.load(Ordering::Acquire) == db)
    {
        OBSERVED_HERE.with(|o| o.set(Observed::Yes));
        return;
    }
    // Only versions within pg_sync.max_clock_skew of wall time count: one stored far in the
    // future (a corrupted or forged row) must not drag the clock, and its persisted mark, to the
    // end of its range. Versions are 16 hex digits, '@', node id: their first 16 characters
    // compare as numbers under the C collation.
    let bound = format!("{:016x}", limit());
    let stored = owner::as_owner(|| {
        owner::with_fixed_search_path(|| {
            // A read-only statement: `Spi::get_two_with_args` would assign a transaction id,
            // which a standby cannot (the clock is asked there too, e.g. `hlc_now()`).
            Spi::connect(|client| {
                client
                    .select(
                        "WITH v(version) AS (
                   SELECT a.version FROM pg_sync.sync_actions a
                   UNION ALL SELECT s.max_version FROM pg_sync.row_state s)
                 SELECT pg_catalog.max(v.version COLLATE \"C\")
                          FILTER (WHERE pg_catalog.left(v.version, 16) COLLATE \"C\" <= $1),
                        pg_catalog.bool_or(pg_catalog.left(v.version, 16) COLLATE \"C\" > $1)
                   FROM v",
                        Some(1),
                        &[bound.as_str().into()],
                    )?
                    .first()
                    .get_two::<String, bool>()
            })
        })
    })
    .unwrap_or((None, None));
    if stored.1 == Some(true) {
        pgrx::warning!(
            "pg_sync: this database stores versions beyond pg_sync.max_clock_skew ahead of the clock; the clock ignores them"
        );
    }
    if let Some(v) = stored.0.as_deref().and_then(|t| Version::parse(t).ok()) {
        clock.hlc.fetch_max(v.hlc, Ordering::AcqRel);
        ensure_persisted(clock, v.hlc);
    }
    if in_recovery {
        // A standby's data is still moving: observe again once it is promoted.
        OBSERVED_HERE.with(|o| o.set(Observed::InRecovery));
        return;
    }
    for slot in &clock.observed {
        match slot.compare_exchange(0, db, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => break,
            Err(seen) if seen == db => break,
            Err(_) => {}
        }
    }
    OBSERVED_HERE.with(|o| o.set(Observed::Yes));
}

/// Next local event: strictly above every value handed out so far (and every version stored in
/// this database), and at least wall time.
pub fn tick() -> u64 {
    let clock = shared();
    observe_stored(clock);
    // A version is minted to be written to the log: its xids must be this cluster's first.
    xid_guard::ensure_own_xids();
    let physical = wall_ms() << COUNTER_BITS;
    let mut current = clock.hlc.load(Ordering::Acquire);
    let next = loop {
        let Some(bumped) = current.checked_add(1) else {
            exhausted()
        };
        let next = bumped.max(physical);
        match clock
            .hlc
            .compare_exchange_weak(current, next, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => break next,
            Err(seen) => current = seen,
        }
    };
    ensure_persisted(clock, next);
    next
}

/// The highest HLC value the clock takes from a stored or received version: wall time plus
/// `pg_sync.max_clock_skew`, last counter value of that millisecond.
pub fn limit() -> u64 {
    let ms = wall_ms()
        .saturating_add(settings::max_clock_skew_ms())
        .min(u64::MAX >> COUNTER_BITS);
    (ms << COUNTER_BITS) | ((1 << COUNTER_BITS) - 1)
}

/// Raises 22008 unless `hlc` is within `limit()`: such a version would move the clock (and its
/// persisted mark) ahead for every database of the cluster.
pub fn check_skew(hlc: u64, what: &str) {
    if hlc > limit() {
        errors::raise(
            PgSqlErrorCode::ERRCODE_DATETIME_FIELD_OVERFLOW,
            format!(
                "{what} holds a version further ahead of this node's clock than pg_sync.max_clock_skew ({} ms)",
                settings::max_clock_skew_ms()
            ),
            "A stored version this far ahead is corrupted or forged: inspect it with \
             pg_sync.row_version_state(model, model_id) and repair pg_sync.row_state, or fix the \
             node's clock or raise pg_sync.max_clock_skew if it is right.",
        );
    }
}

/// The clock is at the end of its range (only reachable through a persisted mark from before
/// versions were bounded).
fn exhausted() -> ! {
    errors::raise(
        PgSqlErrorCode::ERRCODE_DATETIME_FIELD_OVERFLOW,
        "pg_sync's clock reached the end of its range",
        "Stop the server, remove the pg_sync_hlc file from the data directory if it holds a \
         value far in the future, and remove stored versions that are far ahead of wall time.",
    )
}

/// HLC receive rule: after this, every local tick is above `remote`.
pub fn observe(remote: u64) {
    let clock = shared();
    // A received version is about to be written to the log (apply_remote).
    xid_guard::ensure_own_xids();
    clock.hlc.fetch_max(remote, Ordering::AcqRel);
    ensure_persisted(clock, remote);
}

/// The current value without advancing it.
#[allow(dead_code)]
pub fn peek() -> u64 {
    shared().hlc.load(Ordering::Acquire)
}

/// A fresh version for a local write.
pub fn next_version() -> Version {
    Version {
        hlc: tick(),
        node: settings::node_id(),
    }
}
