//! The sequencer: the one place sync ids are assigned.
//!
//! Transactions arrive in commit order. Each one's `sync_actions` rows get consecutive sync ids
//! (in action id order); batches of transactions are persisted to `pg_sync.commit_order` in one
//! statement (an asynchronous commit: no WAL flush awaited), published to the hub as soon as
//! the persist is visible, and their end LSN is acknowledged to Postgres only once the server's
//! WAL flush position has passed the persist's commit. After a crash the slot replays from the
//! last acknowledged LSN; transactions at or below the last persisted commit LSN are skipped,
//! and the rest get the same ids again, because ids follow from the persisted counter and the
//! commit order alone. A persist lost with a crash of Postgres is thereby redone with the same
//! ids; until it is, the hub holds its watermark (no replay reads the hole, no cursor is judged
//! against the lower database counter). See docs/durability.md.
//!
//! The work is split by what it owns:
//! - `setup`: the publication, the slot and the replication connection's configuration;
//! - `session`: one replication session: the stream loop, its events, and what is acknowledged;
//! - `sequencing`: assigning, persisting and publishing sync ids for streamed transactions
//!   (and reading them back: `changes`);
//! - `backlog`: actions the slot will never stream (written before it existed), sequenced first.

mod backlog;
mod sequencing;
mod session;
mod setup;

pub use crate::store::{changes, page_span};
pub use session::run;
pub use setup::connect;

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What health and metrics read about replication.
#[derive(Default)]
pub struct Status {
    pub streaming: AtomicBool,
    /// This worker's replication session has the slot (the server accepted its
    /// START_REPLICATION; cleared when the session ends). Federation prefers the worker that
    /// holds it (federation/link.rs).
    pub slot_held: AtomicBool,
    /// The `application_name` of this worker's replication connections (see `ReplicationName`).
    pub replication_name: ReplicationName,
    pub acked_lsn: AtomicU64,
    /// Every transaction whose commit is below this LSN has been sequenced and published.
    pub processed_lsn: AtomicU64,
    pub server_lsn: AtomicU64,
    pub last_commit_unix_ms: AtomicI64,
    pub sequenced_actions: AtomicU64,
    /// Every sync id up to this one is durable (its persist's commit is flushed); published
    /// ids above it could be lost with a crash of Postgres (see `session::Unconfirmed`).
    pub durable_sync_id: AtomicI64,
    /// Published sync ids assigned again after a crash of Postgres lost their persist.
    pub reassigned_ids: AtomicU64,
    /// Flushes that waited for a streamed transaction to become visible to new snapshots.
    pub visibility_waits: AtomicU64,
    pub reconnects: AtomicU64,
    /// Replication sessions that panicked (each was restarted).
    pub panics: AtomicU64,
    pub slot_problem: Mutex<Option<String>>,
    /// What the last session setup saw of the walsender holding the slot
    /// (`setup::take_over_stale_slot`).
    pub slot_holder: Mutex<Option<HolderReplies>>,
}

/// A walsender, told apart from a later backend that reuses its pid by when it started
/// (`pg_stat_replication.backend_start` in microseconds since the epoch; NULL to a role that may
/// not see it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Walsender {
    pub pid: i32,
    pub started: Option<i64>,
}

/// The columns `Walsender::from_row` reads, of `pg_stat_replication` as `r`.
pub const WALSENDER_COLUMNS: &str = "r.pid, (extract(epoch FROM r.backend_start) * 1000000)::int8";

impl Walsender {
    /// Reads `WALSENDER_COLUMNS` at `at` and `at + 1`.
    pub fn from_row(row: &tokio_postgres::Row, at: usize) -> Walsender {
        Walsender {
            pid: row.get(at),
            started: row.get(at + 1),
        }
    }
}

/// What this worker has seen of the `pg_stat_replication.reply_time` of the walsender holding
/// a slot. That column is the time the *replying client* stamped on its last status update (by
/// its host's wall clock, which may be off by any amount), so it is never compared with any
/// clock: only whether it changed, and when (by this worker's monotonic clock). A walsender
/// whose client replies (every 200 ms to a second) shows a new value at each sample; one whose
/// client is gone keeps its last.
pub struct HolderReplies {
    walsender: Walsender,
    reply: Option<i64>,
    first_seen: Instant,
    changed: Option<Instant>,
}

impl HolderReplies {
    /// Records a sample of the holder `walsender` (its `reply_time` in microseconds since the
    /// epoch, NULL before its first reply or to a role that may not see it) into `seen`, which
    /// is started over when the holder is another walsender, also one that took over the pid of
    /// the one seen before (review rev16d F4: a new walsender on a reused pid inherited the
    /// history of the gone one, so a live holder could count as silent, or a silent one as
    /// heard).
    pub fn observe(
        seen: &mut Option<HolderReplies>,
        walsender: Walsender,
        reply: Option<i64>,
    ) -> &Self {
        let now = Instant::now();
        match seen {
            Some(s) if s.walsender == walsender => {
                if s.reply != reply {
                    s.reply = reply;
                    s.changed = Some(now);
                }
            }
            _ => {
                *seen = Some(HolderReplies {
                    walsender,
                    reply,
                    first_seen: now,
                    changed: None,
                })
            }
        }
        seen.as_ref().expect("just set")
    }

    /// Whether its `reply_time` has been seen to change (else only one value is known).
    pub fn heard(&self) -> bool {
        self.changed.is_some()
    }

    /// How long, by this worker's clock, its `reply_time` has not changed (since it was first
    /// seen, when it has not changed yet).
    pub fn silent_for(&self) -> Duration {
        self.changed.unwrap_or(self.first_seen).elapsed()
    }
}

/// The `application_name` of this worker's replication connections: `pg_sync_worker` and an id
/// drawn when the worker starts, so a walsender tells which worker it serves. One whose session
/// ended without the server noticing (the connection dropped on the way: it lingers until
/// `wal_sender_timeout`) still holds the slot, but it is this worker's own: federation does not
/// take it for another worker streaming the slot (federation/link.rs), and the next session
/// terminates it at once instead of waiting for it (`setup::take_over_stale_slot`). Another
/// worker's walsenders carry another id.
pub struct ReplicationName(String);

impl Default for ReplicationName {
    fn default() -> ReplicationName {
        let mut b = [0u8; 8];
        getrandom::getrandom(&mut b).expect("the OS random source works");
        ReplicationName(format!("pg_sync_worker {:016x}", u64::from_le_bytes(b)))
    }
}

impl ReplicationName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SequencerError {
    #[error("database error")]
    Db(#[from] tokio_postgres::Error),
    #[error("replication stream error")]
    Stream(#[from] pgwire_replication::PgWireError),
    #[error("cannot decode the replication stream")]
    Decode(#[from] super::pgoutput::DecodeError),
    #[error("replication slot {0:?} is invalidated (wal_status = lost); drop it and resynchronize clients")]
    SlotLost(String),
    #[error("the pg_sync extension is not installed in this database")]
    NoExtension,
    #[error("invalid database url")]
    Url,
    #[error("database TLS configuration: {0}")]
    Tls(String),
    #[error("streamed transactions were still not visible to new snapshots after {0:?} (a synchronous standby holding their commits?); restarting the session")]
    NotVisible(Duration),
    #[error("failpoint {0} fired")]
    Failpoint(&'static str),
    #[error("more than {HOLD_ACTIONS} actions streamed before the backlog was resolved; peeking at the slot instead")]
    HoldOverflow,
    #[error("this session's walsender no longer holds the replication slot (the link died silently?); reconnecting")]
    WalsenderGone,
    #[error(
        "the publication no longer carries every revocation of an API key; restarting the session"
    )]
    PublicationChanged,
    #[error("the control connection did not answer a stream probe within {0:?}")]
    ProbeTimeout(Duration),
}

/// Under continuous load, how long committed transactions may wait to be batched at most;
/// when the stream has nothing more ready they are persisted and published at once.
const FLUSH_AFTER: Duration = Duration::from_millis(5);
/// How long a flush waits for streamed transactions to become visible before the session
/// restarts (see `persist`).
const VISIBILITY_WAIT_MAX: Duration = Duration::from_secs(10);
const FLUSH_ACTIONS: usize = 5_000;
/// Actions decoded but not sequenced while the start-up backlog is being told apart from what
/// the slot streams (see `Unresolved`); past it the session restarts and peeks at the slot.
const HOLD_ACTIONS: usize = 250_000;
const LARGE_PAGE: i32 = 5_000;

/// How long after the last look at the server's WAL flush position the sequencer looks again,
/// while persists wait to be known durable (their slot acknowledgement waits for it).
const FLUSH_POLL: Duration = Duration::from_millis(100);

/// How often a streaming session asks the server whether its walsender still holds the slot
/// and has heard from this worker lately (`Session::probe_stream`): a replication link can die
/// without the worker's socket noticing, and the memory of valid API keys is trusted only while
/// the stream is known alive (`KnownKeys::heard`).
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// A probe the control connection does not answer within this ends the session.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// The walsender's `reply_time` must have been seen to change (a status update from this
/// worker, sent at least every second, `replication_config`) within this, by this worker's
/// monotonic clock, for a probe to count as hearing from the stream.
const REPLY_FRESH: Duration = Duration::from_secs(3);

/// Microseconds between the Unix and Postgres epochs.
pub const PG_EPOCH_US: i64 = 946_684_800_000_000;

#[cfg(test)]
mod tests {
    use super::*;

    /// A walsender that took over the pid of a gone one starts its own history: neither the
    /// silence nor the replies of the gone one count for it (review rev16d F4).
    #[test]
    fn a_walsender_reusing_a_pid_starts_its_own_history() {
        let gone = Walsender {
            pid: 4242,
            started: Some(1_000),
        };
        let mut seen = None;
        HolderReplies::observe(&mut seen, gone, Some(1));
        assert!(HolderReplies::observe(&mut seen, gone, Some(2)).heard());
        let later = Walsender {
            pid: 4242,
            started: Some(2_000),
        };
        let replies = HolderReplies::observe(&mut seen, later, Some(2));
        assert!(
            !replies.heard(),
            "the later walsender has not been heard yet"
        );
        assert!(replies.silent_for() < Duration::from_secs(1));
        // The same walsender sampled again keeps its history.
        assert!(HolderReplies::observe(&mut seen, later, Some(3)).heard());
    }
}
