//! The federation leader lock: the one worker per database that runs federation links holds it
//! for as long as its session lives (sync_worker/src/federation).
//!
//! It is a session lock in the user lock method (like advisory locks, released when the session
//! ends) but with the `userlock` tag type, which no SQL function takes: an application's
//! `pg_advisory_lock` keys can neither collide with it nor block it, and a role without EXECUTE
//! on `pg_sync.try_federation_lock()` cannot take it to stop federation (any role can take any
//! advisory lock). It shows in `pg_locks` as `locktype = 'userlock'`, `classid` 0x70675f73,
//! `objid` 0x796e6366 ("pg_syncf").

use pgrx::pg_sys;

/// Takes this database's federation lock for the session, without waiting. True when this
/// session holds it (also when it already did).
pub fn try_lock() -> bool {
    let tag = pg_sys::LOCKTAG {
        // SAFETY: a plain read of a backend global.
        locktag_field1: unsafe { pg_sys::MyDatabaseId }.to_u32(),
        locktag_field2: 0x7067_5f73,
        locktag_field3: 0x796e_6366,
        locktag_field4: 0,
        locktag_type: pg_sys::LockTagType::LOCKTAG_USERLOCK as u8,
        locktag_lockmethodid: pg_sys::USER_LOCKMETHOD as u8,
    };
    // SAFETY: a session lock on a tag of our own; dontWait returns instead of sleeping, and
    // session locks of the user lock method are released when the backend exits.
    let got = unsafe { pg_sys::LockAcquire(&tag, pg_sys::ExclusiveLock as i32, true, true) };
    got != pg_sys::LockAcquireResult::LOCKACQUIRE_NOT_AVAIL
}
