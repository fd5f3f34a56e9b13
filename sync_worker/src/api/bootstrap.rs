//! `GET /sync/bootstrap`: an NDJSON snapshot of every row the user may see, consistent with a
//! sync id W: subscribing after W then yields exactly the changes the snapshot lacks.
//!
//! The snapshot S is a REPEATABLE READ transaction. A fence message written after S is taken
//! lies above the commit of every transaction S sees; once the sequencer has passed the fence,
//! every such transaction is sequenced, and W is the highest sync id among those S sees.
//! Postgres can make a transaction visible before one that committed earlier, so S is only
//! used when the transactions up to W are exactly the ones it sees; otherwise a new snapshot is
//! taken (that window is microseconds wide).
//!
//! Rows stream model by model in key order, so a position (model, last key) is a resume point.
//! A cursor carries W and that position. A resumed request reads the rest from a newer snapshot
//! S' (any snapshot sees every transaction up to W), and the client still subscribes after W:
//! the changes in (W, S'] then arrive for rows that already show them, and applying a delta is
//! idempotent (`I` sets the whole row, `U` sets the named columns, `D` removes), so the client
//! ends where the database is, with nothing missed.

use super::row_json::{self, Column};
use super::{error, App, Identity, Refusal};
use crate::store;
use crate::store::quote_ident as quote;
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

const ATTEMPTS: usize = 5;
/// Opens the (read-only, repeatable-read) snapshot a bootstrap reads.
const SNAPSHOT: &str = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY";
const FENCE_TIMEOUT: Duration = Duration::from_secs(10);
/// A `cursor` line every this many rows, so a broken stream resumes close to where it broke.
const CHECKPOINT_ROWS: u64 = 1_000;
/// Rows are sent in chunks of about this many bytes.
const CHUNK_BYTES: usize = 32 * 1024;
const MAX_LIMIT: u64 = 1_000_000;
const MAX_CURSOR_BYTES: usize = 16 * 1024;
/// A client that takes no data for this long is dropped: a bootstrap holds a snapshot (and so
/// holds back vacuum) while it streams.
pub(crate) const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// However fast it reads, a bootstrap ends after this long with a cursor to resume from: a
/// trickling reader cannot hold a bootstrap slot (and a snapshot) indefinitely.
pub(crate) const DEADLINE: Duration = Duration::from_secs(300);

/// Where a bootstrap stands, and what it covers: the opaque `cursor` of the protocol.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct Cursor {
    /// The sync id the bootstrap is consistent with: the client subscribes after it.
    #[serde(rename = "w")]
    sync_id: i64,
    /// The model to go on with; rows of earlier models (by name) are done.
    #[serde(rename = "m")]
    model: String,
    /// The key (`{column: value}`) of the last row sent of `model`; `None`: none sent yet.
    #[serde(rename = "k", default, skip_serializing_if = "Option::is_none")]
    key: Option<serde_json::Map<String, serde_json::Value>>,
    /// The `models` filter of the request, if any.
    #[serde(rename = "f", default, skip_serializing_if = "Option::is_none")]
    models: Option<Vec<String>>,
    /// The `groups` filter of the request, if any.
    #[serde(rename = "g", default, skip_serializing_if = "Option::is_none")]
    groups: Option<Vec<String>>,
    /// The `limit` of the request, if any: the default for the next one.
    #[serde(rename = "l", default, skip_serializing_if = "Option::is_none")]
    limit: Option<u64>,
    /// Whose bootstrap it is: rows before the position were that user's, so another user's
    /// cursor would skip rows of theirs.
    #[serde(rename = "u")]
    user: String,
}

impl Cursor {
    fn encode(&self) -> String {
        let json = serde_json::to_vec(self).expect("a cursor serializes");
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
    }

    fn decode(s: &str) -> Option<Cursor> {
        if s.len() > MAX_CURSOR_BYTES {
            return None;
        }
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s)
            .ok()?;
        serde_json::from_slice::<Cursor>(&json)
            .ok()
            .filter(|c| c.sync_id >= 0)
    }
}

/// What one request asks for.
struct Request {
    models: Option<Vec<String>>,
    groups: Option<Vec<String>>,
    limit: Option<u64>,
    resume: Option<Cursor>,
}

fn list(raw: Option<&String>) -> Option<Vec<String>> {
    raw.map(|m| {
        m.split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    })
}

fn parse(q: &HashMap<String, String>) -> Result<Request, Refusal> {
    let limit = match q.get("limit").map(|s| s.parse::<u64>()) {
        None => None,
        Some(Ok(n)) if (1..=MAX_LIMIT).contains(&n) => Some(n),
        Some(_) => {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                "bad_limit",
                "limit must be 1 to 1000000",
            ))
        }
    };
    let resume = match q.get("cursor") {
        None => None,
        Some(raw) => Some(Cursor::decode(raw).ok_or_else(|| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                "bad_cursor",
                "cursor must be one given by a bootstrap response, unchanged",
            )
        })?),
    };
    // A resumed bootstrap covers what the first request asked for, and pages by the same
    // limit unless it gives its own.
    let (models, groups) = match &resume {
        Some(c) => (c.models.clone(), c.groups.clone()),
        None => (list(q.get("models")), list(q.get("groups"))),
    };
    Ok(Request {
        models,
        groups,
        limit: limit.or(resume.as_ref().and_then(|c| c.limit)),
        resume,
    })
}

pub async fn bootstrap(
    State(app): State<Arc<App>>,
    Identity { user, key, .. }: Identity,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    // Subscribed before anything is read: a key revoked from here on ends the stream.
    let watch = key.map(|k| (k, app.hub.revocations()));
    let req = match parse(&q) {
        Ok(r) => r,
        Err(refused) => return refused.into_response(),
    };
    if req.resume.as_ref().is_some_and(|c| c.user != user) {
        return Refusal::new(
            StatusCode::BAD_REQUEST,
            "bad_cursor",
            "this cursor belongs to another user's bootstrap",
        )
        .into_response();
    }
    let unavailable = || {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "cannot take a consistent snapshot now; retry",
        )
    };
    // Each bootstrap holds a connection and a snapshot while it streams: only so many at once.
    let wait = Duration::from_secs(app.cfg.bootstrap_wait_secs);
    let Ok(Ok(permit)) =
        tokio::time::timeout(wait, app.bootstrap_slots.clone().acquire_owned()).await
    else {
        let mut busy = error(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            "too many bootstraps at once; retry shortly",
        );
        busy.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        return busy;
    };
    let Ok(control) = app.db.get().await else {
        return unavailable();
    };
    if let (Some(models), None) = (&req.models, &req.resume) {
        let unknown: Option<Vec<String>> = match control
            .query_one(
                "SELECT array_agg(m ORDER BY m) FROM unnest($1::text[]) m
                  WHERE NOT EXISTS (SELECT 1 FROM pg_sync.registry r WHERE r.model = m AND r.enabled)",
                &[models],
            )
            .await
        {
            Ok(row) => row.get(0),
            Err(_) => return unavailable(),
        };
        if let Some(unknown) = unknown {
            let why = format!("not registered: {}", unknown.join(", "));
            return Refusal::new(StatusCode::BAD_REQUEST, "unknown_model", &why)
                .at(Some("models".into()))
                .into_response();
        }
    }
    if let Some(c) = &req.resume {
        let through = c.sync_id;
        return match resume_point(&app, &control, c).await {
            Ok(snap) => stream(app.clone(), permit, user, watch, req, snap, through).await,
            Err(refused) => refused.into_response(),
        };
    }
    // Not held through the attempts: consistent_point takes its own for each query.
    drop(control);
    for _ in 0..ATTEMPTS {
        let Ok(snap) = store::connect(&app.cfg.database_url).await else {
            return unavailable();
        };
        match consistent_point(&app, &snap).await {
            Ok(Some(through)) => {
                return stream(app.clone(), permit, user, watch, req, snap, through).await
            }
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "bootstrap snapshot failed");
                return unavailable();
            }
        }
    }
    unavailable()
}

/// Checks a resumed bootstrap's sync id against the log and opens a snapshot for the rest.
async fn resume_point(
    app: &App,
    control: &tokio_postgres::Client,
    c: &Cursor,
) -> Result<tokio_postgres::Client, Refusal> {
    let unavailable = |e: String| {
        tracing::warn!(error = %e, "bootstrap resume failed");
        Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "cannot take a snapshot now; retry",
        )
    };
    let Some(watermark) = app.hub.watermark() else {
        return Err(unavailable("the worker is starting".into()));
    };
    if c.sync_id > watermark {
        return Err(Refusal::new(
            StatusCode::CONFLICT,
            "cursor_ahead",
            "the cursor's sync id is beyond the last sync id; bootstrap again",
        ));
    }
    let horizon = super::stream::horizon(control).await.map_err(|e| match e {
        super::stream::ReplayError::Db(e) => unavailable(e),
        _ => unavailable("cannot read the retention horizon".into()),
    })?;
    if c.sync_id < horizon {
        let why = super::stream::compacted(horizon);
        return Err(Refusal::new(StatusCode::GONE, "resync_required", &why));
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
pub(super) async fn consistent_point(
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

/// One registered model as the snapshot sees it.
struct Model {
    name: String,
    table: String,
    group: Option<String>,
    key: Vec<String>,
    /// The columns clients see (all but the excluded ones), in table order.
    columns: Vec<Column>,
    /// The column whose value is the model id, for a one-column key of a simple kind;
    /// otherwise the id is the first select-list item, made by `pg_sync.key_text`.
    id_column: Option<usize>,
}

impl Model {
    fn new(
        name: String,
        table: String,
        group: Option<String>,
        key: Vec<String>,
        columns: Vec<Column>,
    ) -> Model {
        let id_column = match key.as_slice() {
            [k] => columns
                .iter()
                .position(|c| &c.name == k && c.kind.is_own_text()),
            _ => None,
        };
        Model {
            name,
            table,
            group,
            key,
            columns,
            id_column,
        }
    }

    /// Where the columns start in a selected row.
    fn first_column(&self) -> usize {
        usize::from(self.id_column.is_none())
    }

    /// The rows of this model the user may see (`$1`: the user's groups), in key order, after
    /// `$2` (a key as jsonb, or NULL), at most `$3`.
    fn select(&self, after: bool) -> String {
        let key_cols = |prefix: &str| {
            self.key
                .iter()
                .map(|k| format!("{prefix}.{}", quote(k)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut items: Vec<String> = vec![];
        if self.id_column.is_none() {
            let parts = self
                .key
                .iter()
                // The log's ids: each key column's canonical text (independent of this session's
                // DateStyle, TimeZone, ...), as the capture trigger writes them.
                .map(|k| format!("pg_sync.canonical_text(t.{})", quote(k)))
                .collect::<Vec<_>>()
                .join(", ");
            items.push(format!("pg_sync.key_text(ARRAY[{parts}])::text"));
        }
        items.extend(self.columns.iter().map(|c| c.kind.expr(&quote(&c.name))));
        // A group id is the column's text form; a cast gives it without format() where the
        // two agree.
        let group = match &self.group {
            Some(g)
                if self
                    .columns
                    .iter()
                    .any(|c| &c.name == g && c.kind.is_own_text()) =>
            {
                format!("t.{}::text = ANY ($1)", quote(g))
            }
            Some(g) => format!("pg_sync.canonical_text(t.{}) = ANY ($1)", quote(g)),
            None => "$1::text[] IS NOT NULL".into(),
        };
        let (from, keyset) = if after {
            (
                format!(
                    ", jsonb_populate_record(NULL::{}, $2::text::jsonb) c",
                    self.table
                ),
                format!(" AND ({}) > ({})", key_cols("t"), key_cols("c")),
            )
        } else {
            (String::new(), " AND $2::text IS NULL".into())
        };
        format!(
            "SELECT {items}
               FROM {table} t{from}
              WHERE {group}{keyset}
              ORDER BY {order}
              LIMIT $3",
            items = items.join(", "),
            table = self.table,
            order = key_cols("t"),
        )
    }

    /// Writes the model id of a selected row as a JSON string.
    fn write_id(&self, out: &mut Vec<u8>, row: &tokio_postgres::Row) {
        match self.id_column {
            Some(i) => row_json::write_own_text(out, self.columns[i].kind, row, i),
            None => serde_json::to_writer(out, row.get::<_, &str>(0)).expect("a string serializes"),
        }
    }

    /// The key of a row, from its `data`.
    fn key_of(&self, data: &[u8]) -> serde_json::Map<String, serde_json::Value> {
        let mut row: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(data).unwrap_or_default();
        self.key
            .iter()
            .map(|k| (k.clone(), row.remove(k).unwrap_or_default()))
            .collect()
    }
}

/// An API key and the hub's revocations, subscribed before the key was checked.
pub(crate) type KeyWatch = Option<(
    String,
    tokio::sync::broadcast::Receiver<crate::hub::Revoked>,
)>;

/// Whether the watched key was revoked (or revocations were missed, which counts as revoked:
/// the client re-authenticates). `None` (a JWT, which expires by itself) is never revoked.
pub(crate) fn key_revoked(watch: &mut KeyWatch) -> bool {
    use crate::hub::Revoked;
    use tokio::sync::broadcast::error::TryRecvError;
    let Some((key, rx)) = watch else {
        return false;
    };
    loop {
        match rx.try_recv() {
            Ok(Revoked::All) | Err(TryRecvError::Lagged(_)) => return true,
            Ok(Revoked::Key(k)) if k == *key => return true,
            Ok(Revoked::Key(_)) => continue,
            Err(TryRecvError::Empty | TryRecvError::Closed) => return false,
        }
    }
}

/// Buffers NDJSON lines into chunks for the response body.
struct Out {
    tx: tokio::sync::mpsc::Sender<Bytes>,
    buf: Vec<u8>,
    shutdown: tokio::sync::watch::Receiver<bool>,
    /// When the bootstrap stops (`DEADLINE` after it started).
    deadline: Instant,
    /// The API key the bootstrap was authenticated with, and the hub's revocations.
    watch: Option<(
        String,
        tokio::sync::broadcast::Receiver<crate::hub::Revoked>,
    )>,
}

impl Out {
    fn push_json(&mut self, v: serde_json::Value) {
        serde_json::to_writer(&mut self.buf, &v).expect("JSON serializes");
        self.buf.push(b'\n');
    }

    /// Writes a `row` line; returns where its `data` object lies in the buffer.
    fn push_row(
        &mut self,
        model: &Model,
        model_json: &str,
        row: &tokio_postgres::Row,
    ) -> std::ops::Range<usize> {
        self.buf.extend_from_slice(b"{\"type\":\"row\",\"model\":");
        self.buf.extend_from_slice(model_json.as_bytes());
        self.buf.extend_from_slice(b",\"id\":");
        model.write_id(&mut self.buf, row);
        self.buf.extend_from_slice(b",\"data\":");
        let start = self.buf.len();
        row_json::write_object(&mut self.buf, &model.columns, row, model.first_column());
        let data = start..self.buf.len();
        self.buf.extend_from_slice(b"}\n");
        data
    }

    /// Whether the key this bootstrap streams under was revoked (or revocations were missed):
    /// the stream then ends without its `end` line, and resuming it needs a valid key.
    fn revoked(&mut self) -> bool {
        key_revoked(&mut self.watch)
    }

    /// Sends what is buffered once it is a chunk (or now, with `force`); `Err` when the
    /// client has gone, has taken nothing for `STALL_TIMEOUT` (or by the deadline), or the worker is shutting down
    /// while the client is not taking data (it resumes from its last `cursor` line).
    async fn flush(&mut self, force: bool) -> Result<(), ()> {
        if self.buf.is_empty() || (!force && self.buf.len() < CHUNK_BYTES) {
            return Ok(());
        }
        if self.revoked() {
            return Err(());
        }
        let chunk = Bytes::from(std::mem::take(&mut self.buf));
        self.buf.reserve(CHUNK_BYTES + 1024);
        let mut shutdown = self.shutdown.clone();
        tokio::select! {
            biased;
            sent = tokio::time::timeout(
                STALL_TIMEOUT.min(self.deadline.saturating_duration_since(Instant::now())),
                self.tx.send(chunk),
            ) => match sent {
                Ok(Ok(())) => Ok(()),
                _ => Err(()),
            },
            _ = shutdown.wait_for(|s| *s) => Err(()),
        }
    }
}

enum Failure {
    ClientGone,
    Db(tokio_postgres::Error),
    /// The worker is shutting down: the client resumes from this cursor.
    ShuttingDown(Cursor),
    /// The bootstrap ran for `DEADLINE`: the client resumes from this cursor.
    Deadline(Cursor),
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Self {
        Failure::Db(e)
    }
}

/// Streams the snapshot: a `bootstrap` line, `row` lines with a `cursor` line every
/// `CHECKPOINT_ROWS` rows, and an `end` line (with a cursor when `limit` cut it short).
async fn stream(
    app: Arc<App>,
    permit: tokio::sync::OwnedSemaphorePermit,
    user: String,
    watch: Option<(
        String,
        tokio::sync::broadcast::Receiver<crate::hub::Revoked>,
    )>,
    req: Request,
    snap: tokio_postgres::Client,
    through: i64,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(8);
    tokio::spawn(async move {
        let mut out = Out {
            tx,
            buf: Vec::with_capacity(CHUNK_BYTES + 1024),
            shutdown: app.shutdown.clone(),
            deadline: if crate::failpoint::fire("bootstrap_deadline") {
                Instant::now()
            } else {
                Instant::now() + DEADLINE
            },
            watch,
        };
        let _permit = permit;
        app.counters.bootstraps.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let last = match send_rows(&mut out, &user, &req, &snap, through).await {
            Ok((rows, rest)) => {
                let bootstrap = &app.hub.metrics.latency.bootstrap;
                bootstrap.observe(started.elapsed().as_secs_f64());
                app.counters
                    .bootstrap_rows
                    .fetch_add(rows, Ordering::Relaxed);
                let mut end = json!({"type": "end", "syncId": through, "rows": rows, "hasMore": rest.is_some()});
                if let Some(c) = rest {
                    end["cursor"] = c.encode().into();
                }
                end
            }
            Err(Failure::ClientGone) => return,
            Err(Failure::ShuttingDown(c)) => json!({
                "type": "error", "code": "shutting_down", "cursor": c.encode(),
                "message": "the server is shutting down; resume with this cursor"
            }),
            Err(Failure::Deadline(c)) => json!({
                "type": "error", "code": "deadline", "cursor": c.encode(),
                "message": "the bootstrap ran for its time limit; resume with this cursor"
            }),
            Err(Failure::Db(e)) => {
                tracing::warn!(error = %e, "bootstrap failed");
                json!({"type": "error", "code": "unavailable", "message": "bootstrap failed; resume from the last cursor or retry"})
            }
        };
        out.push_json(last);
        let _ = out.flush(true).await;
    });
    let body = Body::from_stream(super::receiver_stream(rx));
    ([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response()
}

/// Sends the rows; returns how many, and the cursor of the rest when `limit` stopped it.
async fn send_rows(
    out: &mut Out,
    user: &str,
    req: &Request,
    snap: &tokio_postgres::Client,
    through: i64,
) -> Result<(u64, Option<Cursor>), Failure> {
    let gone = |_| Failure::ClientGone;
    let start = req.resume.as_ref();
    // timestamptz is written here only when the session's zone is UTC (to_jsonb's form
    // depends on the zone).
    let utc: bool = snap
        .query_one(
            "SELECT current_setting('TimeZone') = ANY ('{UTC,Etc/UTC,GMT,Etc/GMT,UCT,Etc/UCT,Universal,Etc/Universal,Zulu,Etc/Zulu,GMT0,Etc/GMT0,Etc/GMT+0,Etc/GMT-0,Greenwich,Etc/Greenwich}')",
            &[],
        )
        .await?
        .get(0);
    let models: Vec<Model> = snap
        .query(
            "SELECT r.model, r.rel::text, r.group_column, r.pk_columns::text[], c.names, c.types
               FROM pg_sync.registry r,
                    LATERAL (SELECT array_agg(a.attname::text ORDER BY a.attnum) AS names,
                                    array_agg(a.atttypid ORDER BY a.attnum) AS types
                               FROM pg_attribute a
                              WHERE a.attrelid = r.rel AND a.attnum > 0 AND NOT a.attisdropped
                                AND a.attname <> ALL (r.excluded_columns)) c
              WHERE r.enabled AND ($1::text[] IS NULL OR r.model = ANY ($1))
                AND ($2::text IS NULL OR r.model >= $2)
                AND ($3::text[] IS NULL OR r.group_column IS NOT NULL)
              ORDER BY r.model",
            &[&req.models, &start.map(|c| &c.model), &req.groups],
        )
        .await?
        .iter()
        .map(|m| {
            let (names, types): (Vec<String>, Vec<u32>) = (m.get(4), m.get(5));
            let columns = names
                .into_iter()
                .zip(types)
                .map(|(n, t)| Column::new(n, t, utc))
                .collect();
            Model::new(m.get(0), m.get(1), m.get(2), m.get(3), columns)
        })
        .collect();
    let names: Vec<&str> = models.iter().map(|m| m.name.as_str()).collect();
    out.push_json(json!({"type": "bootstrap", "syncId": through, "models": names, "resumed": start.is_some()}));
    out.flush(true).await.map_err(gone)?;
    let mut groups: Vec<String> = snap
        .query(
            "SELECT group_id FROM pg_sync.group_memberships WHERE user_id = $1",
            &[&user],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if let Some(only) = &req.groups {
        groups.retain(|g| only.contains(g));
    }
    let cursor_at = |model: &Model, key| Cursor {
        sync_id: through,
        model: model.name.clone(),
        key,
        models: req.models.clone(),
        groups: req.groups.clone(),
        limit: req.limit,
        user: user.to_owned(),
    };
    let mut rows = 0u64;
    for m in &models {
        let after = start
            .filter(|c| c.model == m.name)
            .and_then(|c| c.key.as_ref());
        let after_text = after.map(|k| serde_json::Value::Object(k.clone()).to_string());
        let model_json = serde_json::to_string(&m.name).expect("a string serializes");
        // One row more than the limit allows tells whether there is more.
        let room = req.limit.map_or(i64::MAX, |l| (l - rows) as i64 + 1);
        let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            vec![&groups, &after_text, &room];
        let stream = snap.query_raw(&m.select(after.is_some()), params).await?;
        futures::pin_mut!(stream);
        // The data of the last row sent of this model: its key is parsed only when needed.
        let mut last: Option<Vec<u8>> = None;
        while let Some(row) = stream.next().await {
            let row = row?;
            if req.limit == Some(rows) {
                let key = match &last {
                    Some(data) => Some(m.key_of(data)),
                    None => after.cloned(),
                };
                out.flush(true).await.map_err(gone)?;
                return Ok((rows, Some(cursor_at(m, key))));
            }
            let data = out.push_row(m, &model_json, &row);
            rows += 1;
            let kept = last.get_or_insert_with(Vec::new);
            kept.clear();
            kept.extend_from_slice(&out.buf[data]);
            if rows.is_multiple_of(CHECKPOINT_ROWS) {
                let c = cursor_at(m, Some(m.key_of(kept)));
                out.push_json(json!({"type": "cursor", "cursor": c.encode()}));
            }
            if *out.shutdown.borrow() {
                // Everything written so far goes out; the rest is the cursor's.
                out.flush(true).await.map_err(gone)?;
                return Err(Failure::ShuttingDown(cursor_at(m, Some(m.key_of(kept)))));
            }
            if Instant::now() >= out.deadline {
                out.flush(true).await.map_err(gone)?;
                return Err(Failure::Deadline(cursor_at(m, Some(m.key_of(kept)))));
            }
            out.flush(false).await.map_err(gone)?;
        }
    }
    snap.batch_execute("COMMIT").await?;
    Ok((rows, None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_refuse_tampering() {
        let c = Cursor {
            sync_id: 42,
            model: "tasks".into(),
            key: Some(serde_json::from_str(r#"{"id": "a\"b", "n": 1.50}"#).unwrap()),
            models: Some(vec!["tasks".into()]),
            groups: None,
            limit: Some(10),
            user: "alice".into(),
        };
        let s = c.encode();
        assert!(s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_eq!(Cursor::decode(&s), Some(c));
        assert_eq!(Cursor::decode("not a cursor"), None);
        assert_eq!(Cursor::decode(""), None);
        let negative =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"w":-1,"m":"x","u":"a"}"#);
        assert_eq!(Cursor::decode(&negative), None);
        assert_eq!(Cursor::decode(&"A".repeat(MAX_CURSOR_BYTES + 4)), None);
    }

    #[test]
    fn keyset_query_orders_and_resumes_by_the_whole_key() {
        let m = Model::new(
            "t".into(),
            "public.t".into(),
            Some("org".into()),
            vec!["a".into(), "b\"x".into()],
            vec![
                Column::new("a".into(), 23, false),
                Column::new("b\"x".into(), 25, false),
                Column::new("at".into(), 1184, false),
            ],
        );
        let q = m.select(true);
        assert!(q.starts_with(r#"SELECT pg_sync.key_text(ARRAY[pg_sync.canonical_text(t."a"), pg_sync.canonical_text(t."b""x")])::text, t."a", t."b""x"::text, to_jsonb(t."at")::text"#), "{q}");
        assert_eq!(m.first_column(), 1);
        let single = Model::new(
            "s".into(),
            "s".into(),
            None,
            vec!["id".into()],
            vec![Column::new("id".into(), 20, false)],
        );
        assert_eq!(single.id_column, Some(0), "an int8 key is its own id");
        assert!(
            single.select(false).starts_with("SELECT t.\"id\"\n"),
            "{}",
            single.select(false)
        );
        assert!(
            q.contains(r#"(t."a", t."b""x") > (c."a", c."b""x")"#),
            "{q}"
        );
        assert!(q.contains(r#"ORDER BY t."a", t."b""x""#), "{q}");
        assert_eq!(
            m.key_of(br#"{"a": 1, "b\"x": "z", "v": 3}"#),
            serde_json::from_str::<serde_json::Map<_, _>>(r#"{"a": 1, "b\"x": "z"}"#).unwrap()
        );
    }
}
