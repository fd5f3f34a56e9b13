//! The bootstrap's writer: streams the snapshot as NDJSON chunks (`bootstrap`, `row`,
//! `cursor`, `end` lines) and ends it for a client that stalls, a deadline, a revoked key or
//! a shutdown, with a cursor to resume from where one applies.

use super::cursor::{Cursor, Key};
use super::query::Model;
use super::Request;
use crate::api::row_json::{self, Column};
use crate::api::App;
use crate::protocol::ErrorCode;
use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::json;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A `cursor` line every this many rows, so a broken stream resumes close to where it broke.
const CHECKPOINT_ROWS: u64 = 1_000;
/// Rows are sent in chunks of about this many bytes.
const CHUNK_BYTES: usize = 32 * 1024;
/// Rows between two shutdown/deadline checks when chunks fill slowly (small rows).
const CHECK_ROWS: u64 = 256;
/// A client that takes no data for this long is dropped: a bootstrap holds a snapshot (and so
/// holds back vacuum) while it streams.
pub(crate) const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// However fast it reads, a bootstrap ends after this long with a cursor to resume from: a
/// trickling reader cannot hold a bootstrap slot (and a snapshot) indefinitely.
pub(crate) const DEADLINE: Duration = Duration::from_secs(300);

/// An API key and the hub's revocations, subscribed before the key was checked.
pub(crate) type KeyWatch = Option<(
    crate::api::HeldKey,
    tokio::sync::broadcast::Receiver<crate::hub::Revoked>,
)>;

/// Whether the watched key was revoked. `None` (a JWT, which expires by itself) never is.
/// Revocations the receiver missed (it lagged behind a burst of other keys' revocations) are
/// settled by the database, as a new request would be: a valid key must not lose its stream
/// because others were revoked. If the database cannot say, the key counts as revoked (the
/// client resumes from its last cursor and re-authenticates).
pub(crate) async fn key_revoked(app: &App, watch: &mut KeyWatch) -> bool {
    use crate::hub::Revoked;
    use tokio::sync::broadcast::error::TryRecvError;
    let Some((key, rx)) = watch else {
        return false;
    };
    let mut missed = false;
    loop {
        match rx.try_recv() {
            Ok(Revoked::All) => return true,
            Ok(Revoked::Key(k)) if k == key.id => return true,
            Ok(Revoked::Key(_)) => continue,
            Err(TryRecvError::Lagged(_)) => missed = true,
            Err(TryRecvError::Empty | TryRecvError::Closed) => break,
        }
    }
    if !missed {
        return false;
    }
    // The same id, hash and user as authenticated: a key moved to another user keeps its id.
    !matches!(key.valid(app).await, Ok(true))
}

/// Buffers NDJSON lines into chunks for the response body.
struct Out {
    tx: tokio::sync::mpsc::Sender<Bytes>,
    buf: Vec<u8>,
    shutdown: tokio::sync::watch::Receiver<bool>,
    /// When the bootstrap stops (`DEADLINE` after it started).
    deadline: Instant,
    /// Settles missed revocations (`key_revoked`).
    app: Arc<App>,
    /// The API key the bootstrap was authenticated with, and the hub's revocations.
    watch: KeyWatch,
    /// Where the `data` of the last row sent of the current model is.
    last: Last,
    /// That `data`, once the chunk holding it was sent (`Last::Kept`).
    kept: Vec<u8>,
}

/// Where the `data` of the last row sent of the current model is: its key is the resume
/// point, parsed only when a cursor is written (copying it out of every row cost more).
enum Last {
    /// No row of this model sent yet.
    None,
    /// In `Out::buf`, at this range.
    Buffered(std::ops::Range<usize>),
    /// In `Out::kept`.
    Kept,
}

impl Out {
    fn push_json(&mut self, v: serde_json::Value) {
        serde_json::to_writer(&mut self.buf, &v).expect("JSON serializes");
        self.buf.push(b'\n');
    }

    /// Writes a `row` line; it is now the last row sent.
    /// `prefix`: the line's start up to its id, `{"type":"row","model":<model>,"id":` (made once
    /// per model, copied in one go).
    fn push_row(&mut self, model: &Model, prefix: &str, row: &tokio_postgres::Row) {
        self.buf.extend_from_slice(prefix.as_bytes());
        model.write_id(&mut self.buf, row);
        self.buf.extend_from_slice(b",\"data\":");
        let start = self.buf.len();
        row_json::write_object(&mut self.buf, &model.columns, row, model.first_column());
        self.last = Last::Buffered(start..self.buf.len());
        self.buf.extend_from_slice(b"}\n");
    }

    /// The key of the last row sent of `model`; `None` if none was sent yet; `Err` when it
    /// cannot be read (`Failure::Unkeyable`).
    fn last_key(&self, model: &Model) -> Result<Option<Key>, String> {
        let key = match &self.last {
            Last::None => return Ok(None),
            Last::Buffered(data) => model.key_of(&self.buf[data.clone()]),
            Last::Kept => model.key_of(&self.kept),
        };
        key.map(Some)
    }

    /// Whether the key this bootstrap streams under was revoked (or revocations were missed):
    /// the stream then ends without its `end` line, and resuming it needs a valid key.
    async fn revoked(&mut self) -> bool {
        key_revoked(&self.app, &mut self.watch).await
    }

    /// Sends what is buffered once it is a chunk (or now, with `force`); `Err` when the
    /// client has gone, has taken nothing for `STALL_TIMEOUT` (or by the deadline), or the worker is shutting down
    /// while the client is not taking data (it resumes from its last `cursor` line).
    async fn flush(&mut self, force: bool) -> Result<(), ()> {
        if self.buf.is_empty() || (!force && self.buf.len() < CHUNK_BYTES) {
            return Ok(());
        }
        if crate::failpoint::fire("bootstrap_flush_pause") {
            tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        }
        if self.revoked().await {
            return Err(());
        }
        if let Last::Buffered(data) = &self.last {
            self.kept.clear();
            self.kept.extend_from_slice(&self.buf[data.clone()]);
            self.last = Last::Kept;
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
    /// The last row's key cannot be read back for a cursor (`Model::key_of`): the stream ends
    /// with an error rather than a cursor that would resume elsewhere.
    Unkeyable(String),
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
pub(super) async fn stream(
    app: Arc<App>,
    permit: tokio::sync::OwnedSemaphorePermit,
    user: String,
    watch: KeyWatch,
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
            app: app.clone(),
            watch,
            last: Last::None,
            kept: Vec::new(),
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
                "type": "error", "code": ErrorCode::ShuttingDown.as_str(), "cursor": c.encode(),
                "message": "the server is shutting down; resume with this cursor"
            }),
            Err(Failure::Deadline(c)) => json!({
                "type": "error", "code": ErrorCode::Deadline.as_str(), "cursor": c.encode(),
                "message": "the bootstrap ran for its time limit; resume with this cursor"
            }),
            Err(Failure::Unkeyable(e)) => {
                tracing::error!(error = %e, "bootstrap cannot write a cursor");
                json!({"type": "error", "code": ErrorCode::Internal.as_str(), "message": "a row's key cannot be written into a cursor"})
            }
            Err(Failure::Db(e)) => {
                tracing::warn!(error = %e, "bootstrap failed");
                json!({"type": "error", "code": ErrorCode::Unavailable.as_str(), "message": "bootstrap failed; resume from the last cursor or retry"})
            }
        };
        out.push_json(last);
        let _ = out.flush(true).await;
    });
    let body = Body::from_stream(crate::api::receiver_stream(rx));
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
        let after_text = after.map(|k| serde_json::to_string(k).expect("a key serializes"));
        let prefix = format!(
            "{{\"type\":\"row\",\"model\":{},\"id\":",
            serde_json::to_string(&m.name).expect("a string serializes")
        );
        // One row more than the limit allows tells whether there is more.
        let room = req.limit.map(|l| (l - rows) as i64 + 1);
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            vec![&groups, &after_text];
        if let Some(room) = &room {
            params.push(room);
        }
        let select = m.select(after.is_some(), room.is_some());
        let stream = snap.query_raw(&select, params).await?;
        futures::pin_mut!(stream);
        out.last = Last::None;
        let resume_at = |out: &Out| -> Result<Option<Key>, String> {
            Ok(out.last_key(m)?.or_else(|| after.cloned()))
        };
        while let Some(row) = stream.next().await {
            let row = row?;
            if req.limit == Some(rows) {
                let key = resume_at(out).map_err(Failure::Unkeyable)?;
                out.flush(true).await.map_err(gone)?;
                return Ok((rows, Some(cursor_at(m, key))));
            }
            out.push_row(m, &prefix, &row);
            rows += 1;
            if rows.is_multiple_of(CHECKPOINT_ROWS) {
                let c = cursor_at(m, out.last_key(m).map_err(Failure::Unkeyable)?);
                out.push_json(json!({"type": "cursor", "cursor": c.encode()}));
            }
            // Checked once a chunk is full or every `CHECK_ROWS` rows (not for every row): the
            // rows of at most one chunk go out after a shutdown or the deadline, each still ahead
            // of the cursor, and a bootstrap whose visible rows are small or sparse still stops
            // at its deadline.
            if out.buf.len() < CHUNK_BYTES && !rows.is_multiple_of(CHECK_ROWS) {
                continue;
            }
            if *out.shutdown.borrow() {
                // Everything written so far goes out; the rest is the cursor's.
                let key = resume_at(out).map_err(Failure::Unkeyable)?;
                out.flush(true).await.map_err(gone)?;
                return Err(Failure::ShuttingDown(cursor_at(m, key)));
            }
            if Instant::now() >= out.deadline {
                let key = resume_at(out).map_err(Failure::Unkeyable)?;
                out.flush(true).await.map_err(gone)?;
                return Err(Failure::Deadline(cursor_at(m, key)));
            }
            out.flush(false).await.map_err(gone)?;
        }
    }
    snap.batch_execute("COMMIT").await?;
    Ok((rows, None))
}
