//! The bootstrap's snapshot: the consistent point W a new snapshot answers for (through the
//! sequencer's fence), and the snapshot a resumed bootstrap reads the rest from.

use super::cursor::Cursor;
use crate::api::{App, Refusal};
use crate::protocol::ErrorCode;
use crate::store;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Opens the (read-only, repeatable-read) snapshot a bootstrap reads.
const SNAPSHOT: &str = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY";
const FENCE_TIMEOUT: Duration = Duration::from_secs(10);

/// Checks a resumed bootstrap's sync id against the log and opens a snapshot for the rest.
pub(super) async fn resume_point(
    app: &App,
    control: &tokio_postgres::Client,
    c: &Cursor,
) -> Result<tokio_postgres::Client, Refusal> {
    let unavailable = |e: String| {
        tracing::warn!(error = %e, "bootstrap resume failed");
        Refusal::of(ErrorCode::Unavailable, "cannot take a snapshot now; retry")
    };
    let Some(watermark) = app.hub.watermark() else {
        return Err(unavailable("the worker is starting".into()));
    };
    if c.sync_id > watermark {
        return Err(Refusal::of(
            ErrorCode::CursorAhead,
            "the cursor's sync id is beyond the last sync id; bootstrap again",
        ));
    }
    let horizon = crate::api::stream::horizon(control)
        .await
        .map_err(|e| match e {
            crate::api::stream::ReplayError::Db(e) => unavailable(e),
            _ => unavailable("cannot read the retention horizon".into()),
        })?;
    if c.sync_id < horizon {
        let why = crate::api::stream::compacted(horizon);
        return Err(Refusal::of(ErrorCode::ResyncRequired, &why));
    }
    let snap = store::connect(&app.cfg.database_url)
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    snap.batch_execute(SNAPSHOT)
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    Ok(snap)
}

/// Opens the snapshot on `snap` and returns its sync id, or `None` to try again.
/// The fence and the log read each take a pooled connection just for their query: none is
/// held through the fence wait (up to FENCE_TIMEOUT while the sequencer lags), or a few
/// bootstraps would take the whole pool from other users' short requests.
pub(in crate::api) async fn consistent_point(
    app: &App,
    snap: &tokio_postgres::Client,
) -> Result<Option<i64>, String> {
    let e = |e: tokio_postgres::Error| e.to_string();
    snap.batch_execute(SNAPSHOT).await.map_err(e)?;
    let row = snap
        .query_one(
            "SELECT pg_current_snapshot()::text, pg_snapshot_xmin(pg_current_snapshot())::text",
            &[],
        )
        .await
        .map_err(e)?;
    let (snapshot, xmin): (String, String) = (row.get(0), row.get(1));
    let fence: String = app
        .db
        .get()
        .await
        .map_err(|e| e.to_string())?
        .query_one(
            "SELECT pg_logical_emit_message(false, 'pg_sync_fence', '')::text",
            &[],
        )
        .await
        .map_err(e)?
        .get(0);
    let fence_lsn = pgwire_replication::Lsn::parse(&fence)
        .map_err(|e| e.to_string())?
        .as_u64();
    let deadline = Instant::now() + FENCE_TIMEOUT;
    while app.status.processed_lsn.load(Ordering::Acquire) < fence_lsn {
        if Instant::now() > deadline {
            return Err("the sequencer did not pass the fence in time".into());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Xids from 2^62 up are restored ones the extension moved out of this cluster's range
    // (xid_guard.rs): committed history, though no snapshot calls them visible.
    let row = app
        .db
        .get()
        .await
        .map_err(|e| e.to_string())?
        .query_one(
            "WITH c AS (
               SELECT xid, first_sync_id, first_sync_id + action_count - 1 AS last_id
                 FROM pg_sync.commit_order WHERE commit_lsn < $1::text::pg_lsn),
             w AS (
               SELECT GREATEST(coalesce(max(last_id), 0), pg_sync.retention_horizon()) AS w
                 FROM c WHERE xid < $2::text::xid8 OR xid >= '4611686018427387904'::xid8
                              OR pg_visible_in_snapshot(xid, $3::text::pg_snapshot))
             SELECT w, EXISTS (
               SELECT 1 FROM c, w
                WHERE c.first_sync_id <= w.w AND c.xid >= $2::text::xid8
                  AND c.xid < '4611686018427387904'::xid8
                  AND NOT pg_visible_in_snapshot(c.xid, $3::text::pg_snapshot))
               FROM w",
            &[&fence, &xmin, &snapshot],
        )
        .await
        .map_err(e)?;
    let (through, torn): (i64, bool) = (row.get(0), row.get(1));
    if torn {
        snap.batch_execute("ROLLBACK").await.map_err(e)?;
        return Ok(None);
    }
    Ok(Some(through))
}
