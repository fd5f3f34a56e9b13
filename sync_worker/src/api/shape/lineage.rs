//! Whether a `/v1/shape` snapshot may carry Electric's `snapshot-end` on this database's lineage
//! (system identifier, timeline).
//!
//! A client compares a txid it waits for against every snapshot and change it has seen. After a
//! failover to an asynchronous standby, or a restore into another cluster, the new server's xid
//! counter is behind: it can hand out again an xid the old one acknowledged for a write it never
//! got, and a snapshot of it (or a change with that xid) would confirm that write. So
//! `snapshot-end` goes out only once the lineage is known, and not within
//! `SYNC_SHAPE_LINEAGE_GRACE_SECS` of a change of it: a client's wait for a txid then times out
//! (TanStack DB's default `txidTimeout` is 10 s); the offline executor retries the write, which
//! is deduplicated.
//!
//! The lineage last seen is recorded in `pg_sync.lineage` with the time it last changed. A
//! promoted standby holds the old primary's row (replicated) and a restore the dumped one, so
//! both show the change to the first worker that looks; the recorded time keeps the grace
//! across worker restarts. An operator starts a grace by hand (`UPDATE pg_sync.lineage SET
//! changed_at = now()`, docs/clients.md) after a restore the lineage does not show (a physical
//! copy on the same timeline); the worker reads the row again at most `RECHECK` after it last
//! did, so it sees that within a few seconds.
//!
//! Within the grace the log's changes go without `txids` too (`read_log`): a new primary's
//! transaction can have the xid of a write the old one acknowledged and lost.

use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio_postgres::Client;

/// A server's lineage: system identifier and current timeline.
pub type Id = (i64, i64);

/// How long an answer is taken from memory before the stored row is read again (a grace started
/// by hand shows up within this).
pub const RECHECK: Duration = Duration::from_secs(5);

/// The lineage last checked against `pg_sync.lineage`, and from when `snapshot-end` may go out.
#[derive(Default)]
pub struct Lineage {
    seen: Mutex<Option<Seen>>,
}

#[derive(Clone, Copy)]
struct Seen {
    id: Id,
    /// The end of the grace.
    from: Instant,
    /// When the stored row was read.
    checked: Instant,
}

/// The live lineage, read in the snapshot's own transaction (the same server as its xids). The
/// timeline is the WAL insert timeline (the first 8 hex digits of the current WAL file name):
/// it changes at promotion, while `pg_control_checkpoint()` shows it only after the next
/// checkpoint. Both functions are executable by any role.
pub const LIVE_SQL: &str = "(SELECT system_identifier FROM pg_control_system()),
     ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::bigint";

/// The grace left after `changed_at` (NULL: none), in seconds; `$3` is the grace. At most the
/// grace: a `changed_at` in the future (the database's clock stepped back) is set to now by
/// `record`, never waited out.
const REMAINING_SQL: &str = "extract(epoch FROM least(greatest(
        l.changed_at + make_interval(secs => $3) - now(), interval '0'),
        make_interval(secs => $3)))::float8";

impl Lineage {
    /// The answer for `live` without a query, when it is the lineage checked last, less than
    /// `RECHECK` ago.
    pub fn cached(&self, live: Id) -> Option<bool> {
        let seen = *self.seen.lock().unwrap_or_else(|p| p.into_inner());
        match seen {
            Some(s) if s.id == live && s.checked.elapsed() < RECHECK => {
                Some(Instant::now() >= s.from)
            }
            _ => None,
        }
    }

    /// Whether data read on a server of lineage `live` may name its xids (`snapshot-end`, the
    /// changes' `txids`). Checks (and records) the lineage in the database through `db` when
    /// `cached` has no answer; on any failure, no.
    pub async fn settled(&self, db: &Client, live: Id, grace: Duration) -> bool {
        if let Some(answer) = self.cached(live) {
            return answer;
        }
        let known = *self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let remaining = match check(db, live, grace).await {
            Ok(r) => r.min(grace),
            Err(e) => {
                tracing::warn!(error = %e, "cannot check the database lineage; shape data goes without txids and snapshot-end");
                return false;
            }
        };
        // A change seen while running counts too (the recorded row may already be the new one).
        // A re-read may lengthen a grace (a forced one) but never shorten it: the stored time
        // is the database's clock, which may step forward (review rev13b).
        let now = Instant::now();
        let remaining = match known {
            Some(k) if k.id != live => grace,
            Some(k) => remaining.max(k.from.saturating_duration_since(now)),
            None => remaining,
        };
        let was_in_grace = known.is_some_and(|k| k.id == live && now < k.from);
        if !remaining.is_zero() && !was_in_grace {
            tracing::warn!(system_identifier = live.0, timeline = live.1, grace_secs = remaining.as_secs(),
                "the database's lineage changed (failover or restore) or a grace was started: shape data goes without txids and snapshot-end for a while");
        }
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(Seen {
            id: live,
            from: now + remaining,
            checked: now,
        });
        remaining.is_zero()
    }
}

/// The grace left for `live`: read from the stored row when it holds `live` (no write), else
/// `record`ed.
async fn check(db: &Client, live: Id, grace: Duration) -> Result<Duration, tokio_postgres::Error> {
    let row = db
        .query_opt(
            &format!(
                "SELECT l.system_identifier = $1 AND l.timeline = $2
                        AND NOT coalesce(l.changed_at > now(), false), {REMAINING_SQL}
                   FROM pg_sync.lineage l"
            ),
            &[&live.0, &live.1, &grace.as_secs_f64()],
        )
        .await?;
    match row {
        Some(row) if row.get::<_, bool>(0) => Ok(secs(row.get(1))),
        _ => record(db, live, grace).await,
    }
}

/// Records `live` in `pg_sync.lineage` (a first row: no change; a different row: changed now; a
/// change time in the future: now) and returns how much of the grace after the last recorded
/// change is left. One statement that always updates: a session that waits on another's update
/// of the row reads the row as that one left it (the change time it set), never its own
/// snapshot's older row.
async fn record(db: &Client, live: Id, grace: Duration) -> Result<Duration, tokio_postgres::Error> {
    let row = db
        .query_one(
            &format!(
                "INSERT INTO pg_sync.lineage AS l (system_identifier, timeline, changed_at)
                 VALUES ($1, $2, NULL)
                 ON CONFLICT (one) DO UPDATE SET
                   changed_at = CASE
                     WHEN (l.system_identifier, l.timeline)
                          IS DISTINCT FROM (EXCLUDED.system_identifier, EXCLUDED.timeline)
                       THEN now()
                     WHEN l.changed_at > now() THEN now()
                     ELSE l.changed_at END,
                   system_identifier = EXCLUDED.system_identifier,
                   timeline = EXCLUDED.timeline
                 RETURNING {REMAINING_SQL}"
            ),
            &[&live.0, &live.1, &grace.as_secs_f64()],
        )
        .await?;
    Ok(secs(row.get(0)))
}

fn secs(left: Option<f64>) -> Duration {
    Duration::from_secs_f64(left.unwrap_or(0.0).max(0.0))
}
