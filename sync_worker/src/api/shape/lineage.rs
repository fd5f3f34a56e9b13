//! Whether a `/v1/shape` snapshot may carry Electric's `snapshot-end` on this database's lineage
//! (system identifier, timeline).
//!
//! A client compares a txid it waits for against every snapshot it has seen. After a failover to
//! an asynchronous standby, or a restore into another cluster, the new server's xid counter is
//! behind: it can hand out again an xid the old one acknowledged for a write it never got, and a
//! snapshot of it would call that write visible (the offline outbox would drop it). So
//! `snapshot-end` goes out only once the lineage is known, and not within
//! `SYNC_SHAPE_LINEAGE_GRACE_SECS` of a change of it: a client's wait for a txid then times out
//! (TanStack DB's default `txidTimeout` is 10 s) and it retries the write, which is deduplicated.
//!
//! The lineage last seen is recorded in `pg_sync.lineage` with the time it last changed. A
//! promoted standby holds the old primary's row (replicated) and a restore the dumped one, so
//! both show the change to the first worker that looks; the recorded time keeps the grace
//! across worker restarts.

use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio_postgres::Client;

/// A server's lineage: system identifier and current timeline.
pub type Id = (i64, i64);

/// The lineage last checked against `pg_sync.lineage`, and from when `snapshot-end` may go out.
#[derive(Default)]
pub struct Lineage {
    seen: Mutex<Option<(Id, Instant)>>,
}

/// The live lineage, read in the snapshot's own transaction (the same server as its xids). The
/// timeline is the WAL insert timeline (the first 8 hex digits of the current WAL file name):
/// it changes at promotion, while `pg_control_checkpoint()` shows it only after the next
/// checkpoint. Both functions are executable by any role.
pub const LIVE_SQL: &str = "(SELECT system_identifier FROM pg_control_system()),
     ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::bigint";

impl Lineage {
    /// The answer for `live` without a query, when it is the lineage checked last.
    pub fn cached(&self, live: Id) -> Option<bool> {
        match *self.seen.lock().unwrap_or_else(|p| p.into_inner()) {
            Some((id, from)) if id == live => Some(Instant::now() >= from),
            _ => None,
        }
    }

    /// Whether a snapshot read on a server of lineage `live` may carry its visibility. Checks
    /// (and records) the lineage in the database through `db` when `live` is not the one
    /// checked last; on any failure, no.
    pub async fn settled(&self, db: &Client, live: Id, grace: Duration) -> bool {
        if let Some(answer) = self.cached(live) {
            return answer;
        }
        let known = *self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let remaining = match record(db, live, grace).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot check the database lineage; shape snapshots go without snapshot-end");
                return false;
            }
        };
        // A change seen while running counts too (the recorded row may already be the new one).
        let remaining = if known.is_some() { grace } else { remaining };
        if remaining > Duration::ZERO {
            tracing::warn!(system_identifier = live.0, timeline = live.1, grace_secs = remaining.as_secs(),
                "the database's lineage changed (failover or restore): shape snapshots go without snapshot-end for a while");
        }
        let from = Instant::now() + remaining;
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some((live, from));
        remaining.is_zero()
    }
}

/// Records `live` in `pg_sync.lineage` (a first row: no change; a different row: changed now)
/// and returns how much of the grace after the last recorded change is left.
async fn record(db: &Client, live: Id, grace: Duration) -> Result<Duration, tokio_postgres::Error> {
    let row = db
        .query_one(
            "WITH old AS (SELECT changed_at FROM pg_sync.lineage),
                  put AS (
                INSERT INTO pg_sync.lineage AS l (system_identifier, timeline, changed_at)
                VALUES ($1, $2, NULL)
                ON CONFLICT (one) DO UPDATE SET system_identifier = EXCLUDED.system_identifier,
                       timeline = EXCLUDED.timeline, changed_at = now()
                 WHERE (l.system_identifier, l.timeline)
                       IS DISTINCT FROM (EXCLUDED.system_identifier, EXCLUDED.timeline)
                RETURNING changed_at)
             SELECT extract(epoch FROM greatest(
                        coalesce((SELECT changed_at FROM put), (SELECT changed_at FROM old))
                          + make_interval(secs => $3) - now(),
                        interval '0'))::float8",
            &[&live.0, &live.1, &(grace.as_secs_f64())],
        )
        .await?;
    let left: Option<f64> = row.get(0);
    Ok(Duration::from_secs_f64(left.unwrap_or(0.0).max(0.0)))
}
