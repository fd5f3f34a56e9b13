//! `GET /sync/bootstrap`: an NDJSON snapshot of every row the user may see, consistent with a
//! sync id W: subscribing after W then yields exactly the changes the snapshot lacks.
//!
//! The snapshot S is a REPEATABLE READ transaction. A fence message written after S is taken
//! lies above the commit of every transaction S sees; once the sequencer has passed the fence,
//! every such transaction is sequenced, and W is the highest sync id among those S sees.
//! Postgres can make a transaction visible before one that committed earlier, so S is only
//! used when the transactions up to W are exactly the ones it sees; otherwise a new snapshot is
//! taken (that window is microseconds wide).

use super::{error, App, Identity};
use crate::replication::sequencer;
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::json;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

const ATTEMPTS: usize = 5;
const FENCE_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn bootstrap(
    State(app): State<Arc<App>>,
    Identity { user, .. }: Identity,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let only: Option<Vec<String>> = q
        .get("models")
        .map(|m| m.split(',').map(str::to_owned).collect());
    let unavailable = || {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "cannot take a consistent snapshot now; retry",
        )
    };
    let Ok(control) = app.db.get().await else {
        return unavailable();
    };
    for _ in 0..ATTEMPTS {
        let Ok(snap) = sequencer::connect(&app.cfg.database_url).await else {
            return unavailable();
        };
        match consistent_point(&app, &control, &snap).await {
            Ok(Some(through)) => return stream(app, user, only, snap, through).await,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "bootstrap snapshot failed");
                return unavailable();
            }
        }
    }
    unavailable()
}

/// Opens the snapshot on `snap` and returns its sync id, or `None` to try again.
async fn consistent_point(
    app: &App,
    control: &tokio_postgres::Client,
    snap: &tokio_postgres::Client,
) -> Result<Option<i64>, String> {
    let e = |e: tokio_postgres::Error| e.to_string();
    snap.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .map_err(e)?;
    let row = snap
        .query_one(
            "SELECT pg_current_snapshot()::text, pg_snapshot_xmin(pg_current_snapshot())::text",
            &[],
        )
        .await
        .map_err(e)?;
    let (snapshot, xmin): (String, String) = (row.get(0), row.get(1));
    let fence: String = control
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
    let row = control
        .query_one(
            "WITH c AS (
               SELECT xid, first_sync_id, first_sync_id + action_count - 1 AS last_id
                 FROM pg_sync.commit_order WHERE commit_lsn < $1::text::pg_lsn),
             w AS (
               SELECT GREATEST(coalesce(max(last_id), 0), pg_sync.retention_horizon()) AS w
                 FROM c WHERE xid < $2::text::xid8 OR pg_visible_in_snapshot(xid, $3::text::pg_snapshot))
             SELECT w, EXISTS (
               SELECT 1 FROM c, w
                WHERE c.first_sync_id <= w.w AND c.xid >= $2::text::xid8
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

fn line(v: serde_json::Value) -> Bytes {
    let mut s = v.to_string();
    s.push('\n');
    Bytes::from(s)
}

/// Streams the snapshot: a `bootstrap` line, one `row` line per visible row, an `end` line.
async fn stream(
    app: Arc<App>,
    user: String,
    only: Option<Vec<String>>,
    snap: tokio_postgres::Client,
    through: i64,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    let _ = app;
    tokio::spawn(async move {
        let result = async {
            let models = snap
                .query(
                    "SELECT r.model, r.rel::text, r.group_column, r.excluded_columns,
                            (SELECT string_agg(format('format(''%%s'', %I)', k), ', ') FROM unnest(r.pk_columns) k)
                       FROM pg_sync.registry r
                      WHERE r.enabled AND ($1::text[] IS NULL OR r.model = ANY ($1))
                      ORDER BY r.model",
                    &[&only],
                )
                .await?;
            let names: Vec<String> = models.iter().map(|m| m.get(0)).collect();
            if tx.send(line(json!({"type": "bootstrap", "syncId": through, "models": names}))).await.is_err() {
                return Ok(0);
            }
            let groups: Vec<String> = snap
                .query("SELECT group_id FROM pg_sync.group_memberships WHERE user_id = $1", &[&user])
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let mut rows = 0u64;
            for m in &models {
                let (model, table, group, excluded, key): (String, String, Option<String>, Vec<String>, String) =
                    (m.get(0), m.get(1), m.get(2), m.get(3), m.get(4));
                let filter = match &group {
                    Some(g) => format!("WHERE format('%s', t.{}) = ANY ($1)", quote(g)),
                    None => "WHERE $1::text[] IS NOT NULL".into(),
                };
                let sql = format!(
                    "SELECT pg_sync.key_text(ARRAY[{key}])::text, (to_jsonb(t) - $2::text[])::text FROM {table} t {filter}"
                );
                let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&groups, &excluded];
                let stream = snap.query_raw(&sql, params).await?;
                futures::pin_mut!(stream);
                while let Some(row) = stream.next().await {
                    let row = row?;
                    let (id, data): (String, String) = (row.get(0), row.get(1));
                    let data: serde_json::Value = serde_json::from_str(&data).unwrap_or_default();
                    rows += 1;
                    if tx.send(line(json!({"type": "row", "model": model, "id": id, "data": data}))).await.is_err() {
                        return Ok(rows);
                    }
                }
            }
            snap.batch_execute("COMMIT").await?;
            Ok::<u64, tokio_postgres::Error>(rows)
        }
        .await;
        let last = match result {
            Ok(rows) => json!({"type": "end", "syncId": through, "rows": rows}),
            Err(e) => {
                tracing::warn!(error = %e, "bootstrap failed");
                json!({"type": "error", "code": "unavailable", "message": "bootstrap failed; retry"})
            }
        };
        let _ = tx.send(line(last)).await;
    });
    let body = Body::from_stream(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    }));
    ([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response()
}

fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}
