//! `GET /sync/bootstrap`: an NDJSON snapshot of every row the user may see, consistent with a
//! sync id W: subscribing after W then yields exactly the changes the snapshot lacks. This
//! module owns the request (parsing, admission, the handler); `cursor` owns the resume token,
//! `snapshot` the consistent point W and the snapshot transaction, `query` the per-model
//! keyset SELECT, and `writer` the NDJSON stream and its limits (stall, deadline, revocation).
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

mod cursor;
mod query;
mod snapshot;
mod writer;

use super::{error, App, Identity, Refusal};
use crate::protocol::ErrorCode;
use crate::store;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use cursor::Cursor;
use snapshot::resume_point;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use writer::stream;

pub(super) use snapshot::consistent_point;
pub(crate) use writer::{DEADLINE, STALL_TIMEOUT};

const ATTEMPTS: usize = 5;
const MAX_LIMIT: u64 = 1_000_000;

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
            return Err(Refusal::of(
                ErrorCode::BadLimit,
                "limit must be 1 to 1000000",
            ))
        }
    };
    let resume = match q.get("cursor") {
        None => None,
        Some(raw) => Some(Cursor::decode(raw).ok_or_else(|| {
            Refusal::of(
                ErrorCode::BadCursor,
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
    identity: Identity,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    // Subscribed before anything is read: a key revoked from here on ends the stream.
    let watch = identity.held_key().map(|k| (k, app.hub.revocations()));
    // A revocation published between the key's check and that subscription is not in it.
    if let Some(refused) = super::stream::recheck_refusal(&app, watch.as_ref().map(|w| &w.0)).await
    {
        return refused;
    }
    let user = identity.user;
    let req = match parse(&q) {
        Ok(r) => r,
        Err(refused) => return refused.into_response(),
    };
    if req.resume.as_ref().is_some_and(|c| c.user != user) {
        return Refusal::of(
            ErrorCode::BadCursor,
            "this cursor belongs to another user's bootstrap",
        )
        .into_response();
    }
    let unavailable = || {
        error(
            ErrorCode::Unavailable,
            "cannot take a consistent snapshot now; retry",
        )
    };
    // Each bootstrap holds a connection and a snapshot while it streams: only so many at once.
    let wait = Duration::from_secs(app.cfg.bootstrap_wait_secs);
    let Ok(Ok(permit)) =
        tokio::time::timeout(wait, app.bootstrap_slots.clone().acquire_owned()).await
    else {
        let mut busy = error(
            ErrorCode::Busy,
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
            return Refusal::of(ErrorCode::UnknownModel, &why)
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
