//! Plain HTTP reads of the stream: `GET /sync/deltas` (a page) and `GET /sync/sse` (Server-Sent
//! Events with the same subscribe-after-N semantics as the WebSocket; `Last-Event-ID` resumes).

use super::stream::{self, ReplayError};
use super::{error, App, Identity, Refusal};
use crate::hub::Outbound;
use crate::protocol::ErrorCode;
use crate::store;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

const PAGE_SPAN: i32 = 5_000;
/// How long one `/sync/deltas` request reads pages at most.
const READ_BUDGET: Duration = Duration::from_secs(2);
const MAX_LIMIT: usize = 10_000;

/// Parses a cursor; `Err` is the 400/409 response.
fn cursor(app: &App, raw: Option<&str>) -> Result<i64, Refusal> {
    let after = match raw {
        None | Some("") => 0,
        Some(s) => match s.parse::<i64>() {
            Ok(n) if n >= 0 => n,
            _ => {
                return Err(Refusal::of(
                    ErrorCode::BadCursor,
                    "after must be 0 or a sync id",
                ))
            }
        },
    };
    let Some(watermark) = app.hub.watermark() else {
        // Right after a start the watermark is not known: a valid cursor must not be told
        // to re-bootstrap.
        return Err(Refusal::of(
            ErrorCode::Unavailable,
            "the worker is starting; retry",
        ));
    };
    if after > watermark {
        return Err(Refusal::of(
            ErrorCode::CursorAhead,
            "after is beyond the last sync id; re-bootstrap",
        ));
    }
    Ok(after)
}

/// `GET /sync/deltas?after=N&limit=M`: `{"deltas": [...], "lastSyncId": L, "hasMore": bool}`;
/// continue with `after=L`.
pub async fn deltas(
    State(app): State<Arc<App>>,
    identity: Identity,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let held = identity.held_key();
    let user = identity.user;
    let after = match cursor(&app, q.get("after").map(String::as_str)) {
        Ok(a) => a,
        Err(refused) => return refused.into_response(),
    };
    let limit = match q.get("limit").map(|s| s.parse::<usize>()) {
        None => 1_000,
        Some(Ok(n)) if (1..=MAX_LIMIT).contains(&n) => n,
        Some(_) => return error(ErrorCode::BadLimit, "limit must be 1 to 10000"),
    };
    let through = app.hub.published();
    let Some(groups) = stream::load_groups(&app, &user, through).await else {
        return error(ErrorCode::Unavailable, "database unavailable; retry");
    };
    // Each page is read under a turn of replay's admission (as a WebSocket replay's), with a
    // pooled connection taken once the turn is had: a request waiting for its turn holds none.
    let mut turn = app.replay.enter(&user, through - after).await;
    let Ok(db) = app.db.get().await else {
        return error(ErrorCode::Unavailable, "database unavailable; retry");
    };
    turn.reading();
    let horizon = match db.track(stream::horizon(&db)).await {
        Ok(h) => h,
        Err(_) => return error(ErrorCode::Unavailable, "database unavailable; retry"),
    };
    if after > 0 && after < horizon {
        return error(ErrorCode::ResyncRequired, &stream::compacted(horizon));
    }
    let joins = match db
        .track(stream::joins(&db, &user, after.max(horizon), through))
        .await
    {
        Ok(j) => j,
        Err(e) => {
            tracing::warn!(error = %e, "membership read failed");
            return error(ErrorCode::Unavailable, "database unavailable; retry");
        }
    };
    drop((db, turn));
    let mut frames: Vec<String> = vec![];
    let mut cursor = after.max(horizon);
    // A request reads for at most READ_BUDGET (then answers `hasMore` from where it got): a
    // user whose groups are sparse in a long log would otherwise hold the request through
    // every page of it, each taking a turn (and, far behind while live deliveries flow, a
    // rest).
    let started = std::time::Instant::now();
    'pages: while cursor < through
        && (cursor == after.max(horizon) || started.elapsed() < READ_BUDGET)
    {
        let span = store::page_span(cursor, through, PAGE_SPAN);
        let mut turn = app.replay.enter(&user, through - cursor).await;
        let Ok(db) = app.db.get().await else {
            return error(ErrorCode::Unavailable, "database unavailable; retry");
        };
        turn.reading();
        let page = match db
            .track(store::changes(
                &db,
                cursor,
                Some(&groups),
                span,
                Some(&user),
            ))
            .await
        {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "deltas read failed");
                return error(ErrorCode::Unavailable, "database unavailable; retry");
            }
        };
        for d in page
            .into_iter()
            .filter(|d| stream::visible(d, &user, &joins))
        {
            frames.push(d.frame.as_str().to_owned());
            if frames.len() == limit {
                cursor = d.sync_id;
                break 'pages;
            }
        }
        cursor += i64::from(span);
    }
    // Read after the pages: a compaction that took rows from them is seen (never a gap).
    let Ok(db) = app.db.get().await else {
        return error(ErrorCode::Unavailable, "database unavailable; retry");
    };
    match db.track(stream::horizon(&db)).await {
        Ok(now) if now > after.max(horizon) => {
            return error(ErrorCode::ResyncRequired, &stream::compacted(now))
        }
        Ok(_) => {}
        Err(_) => return error(ErrorCode::Unavailable, "database unavailable; retry"),
    }
    // A key revoked (and the revocation published) since it was checked gets none of it.
    if let Some(refused) = stream::recheck_refusal(&app, held.as_ref()).await {
        return refused;
    }
    let body = format!(
        "{{\"deltas\":[{}],\"lastSyncId\":{cursor},\"hasMore\":{}}}",
        frames.join(","),
        cursor < through
    );
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// `GET /sync/sse?after=N` (or `Last-Event-ID: N`): the WebSocket's frames as SSE `data:`
/// lines; deltas carry `id: <syncId>` so a reconnecting EventSource resumes by itself.
pub async fn sse(
    State(app): State<Arc<App>>,
    identity: Identity,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let raw = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| q.get("after").cloned());
    let after = match cursor(&app, raw.as_deref()) {
        Ok(a) => a,
        Err(refused) => return refused.into_response(),
    };
    let held = identity.held_key();
    let Identity {
        user, key, expires, ..
    } = identity;
    let Some((mut sub, registration)) = stream::register(&app, &user, key.as_deref()).await else {
        return error(ErrorCode::Unavailable, "database unavailable; retry");
    };
    if !stream::recheck_key(&app, held.as_ref()).await {
        return Refusal::key_unchecked().into_response();
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(256);
    let mut shutdown = app.shutdown.clone();
    tokio::spawn(async move {
        let _registration = registration;
        let delta =
            |sync_id: i64, frame: &str| Event::default().id(sync_id.to_string()).data(frame);
        let through = match sse_replay(&app, &user, sub.id, after, &tx, false).await {
            Ok(through) => through,
            Err(e) => {
                sse_replay_failed(&tx, &sub, e, after).await;
                return;
            }
        };
        let caught_up = serde_json::json!({"type": "caught_up", "syncId": through}).to_string();
        if tx.send(Event::default().data(caught_up)).await.is_err() {
            return;
        }
        let mut position = through;
        // The stream ends when the token does; the client reconnects with a fresh one.
        let expiry = stream::token_expiry(expires);
        tokio::pin!(expiry);
        loop {
            let event = tokio::select! {
                _ = &mut expiry => {
                    let frame = json!({"type": "error", "code": ErrorCode::TokenExpired.as_str(), "message": format!("token expired; reconnect with a fresh token and resume after {position}")});
                    let _ = tx.send(Event::default().data(frame.to_string())).await;
                    return;
                }
                out = sub.rx.recv() => match out {
                    Some(Outbound::Delta { sync_id, frame }) => {
                        position = position.max(sync_id);
                        delta(sync_id, frame.as_str())
                    }
                    Some(Outbound::Membership { group_id, joined, sync_id }) => membership(&mut position, group_id, joined, sync_id),
                    None => {
                        let cut = sub.cutoff.lock().unwrap_or_else(|p| p.into_inner()).clone();
                        let reason = cut.map(|c| c.reason).unwrap_or_else(|| "dropped".into());
                        let _ = tx
                            .send(Event::default().data(
                                serde_json::json!({"type": "error", "code": ErrorCode::Closed.as_str(), "message": format!("{reason}; resume after {position}")}).to_string(),
                            ))
                            .await;
                        return;
                    }
                },
                _ = sub.lagged.notified() => {
                    // The queue filled: send what is queued, page the rest, go live again.
                    // Then the membership changes it could not queue, before the paging.
                    let queued = std::iter::from_fn(|| sub.rx.try_recv().ok()).collect::<Vec<_>>();
                    for out in queued.into_iter().chain(app.hub.missed_memberships(sub.id)) {
                        let event = match out {
                            Outbound::Delta { sync_id, frame } => {
                                position = position.max(sync_id);
                                delta(sync_id, frame.as_str())
                            }
                            Outbound::Membership { group_id, joined, sync_id } => membership(&mut position, group_id, joined, sync_id),
                        };
                        if tx.send(event).await.is_err() {
                            return;
                        }
                    }
                    match sse_replay(&app, &user, sub.id, position, &tx, true).await {
                        Ok(through) => position = position.max(through),
                        Err(e) => {
                            sse_replay_failed(&tx, &sub, e, position).await;
                            return;
                        }
                    }
                    continue;
                }
                _ = tx.closed() => return,
                _ = shutdown.changed() => return,
            };
            if tx.send(event).await.is_err() {
                return;
            }
        }
    });
    Sse::new(super::receiver_stream(rx))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// A queued membership change as an SSE event. One from the log is a position like a delta's
/// (it carries `id:`); one the log does not hold is told at the stream's position.
fn membership(position: &mut i64, group_id: String, joined: bool, sync_id: Option<i64>) -> Event {
    let frame = json!({"type": "membership", "groupId": group_id, "joined": joined, "syncId": sync_id.unwrap_or(*position)});
    match sync_id {
        Some(id) => {
            *position = (*position).max(id);
            Event::default().id(id.to_string()).data(frame.to_string())
        }
        None => Event::default().data(frame.to_string()),
    }
}

/// Replays what `user` may see after `after` as SSE events and makes the subscriber live;
/// returns the sync id the client is then caught up to.
async fn sse_replay(
    app: &App,
    user: &str,
    id: u64,
    after: i64,
    tx: &tokio::sync::mpsc::Sender<Event>,
    catch_up: bool,
) -> Result<i64, ReplayError> {
    let mut replay = stream::Replay::start(app, user, id, after).await?;
    if catch_up {
        replay = replay.catch_up();
    }
    let mut next = replay.next_page().await?;
    while let Some(page) = next {
        let write = async {
            for d in page {
                tx.send(
                    Event::default()
                        .id(d.sync_id.to_string())
                        .data(d.frame.as_str()),
                )
                .await
                .map_err(|_| ReplayError::Sink)?;
            }
            Ok::<(), ReplayError>(())
        };
        // As over WebSocket: the next page is read while this one is sent.
        let (written, fetched) = stream::overlap(write, replay.next_page()).await;
        written?;
        next = fetched.await_page().await?;
        // Read ahead: a key revoked while the last page was sent stops it here.
        next = replay.admit(next)?;
    }
    Ok(replay.through)
}

/// The `error` event that ends an SSE stream whose replay failed.
async fn sse_replay_failed(
    tx: &tokio::sync::mpsc::Sender<Event>,
    sub: &crate::hub::Subscription,
    error: ReplayError,
    position: i64,
) {
    let frame = match error {
        ReplayError::Sink | ReplayError::Stalled => return,
        ReplayError::Expired(horizon) => {
            json!({"type": "error", "code": ErrorCode::ResyncRequired.as_str(), "message": stream::compacted(horizon)})
        }
        ReplayError::Dropped => {
            let reason = sub
                .cut()
                .map(|c| c.reason)
                .unwrap_or_else(|| "dropped".into());
            json!({"type": "error", "code": ErrorCode::Closed.as_str(), "message": reason})
        }
        ReplayError::NotReady => {
            json!({"type": "error", "code": ErrorCode::Unavailable.as_str(), "message": "the worker is starting; retry"})
        }
        ReplayError::Db(e) => {
            tracing::warn!(error = %e, "sse replay failed");
            json!({"type": "error", "code": ErrorCode::Unavailable.as_str(), "message": format!("replay failed; retry after {position}")})
        }
    };
    let _ = tx.send(Event::default().data(frame.to_string())).await;
}
