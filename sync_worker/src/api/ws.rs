//! `WS /sync/ws`, protocol v1 (see docs/protocol.md).
//!
//! Authentication happens at the handshake (`Authorization: Bearer …` or `?token=`). The client
//! sends `{"type":"subscribe","after":N}`; the server replays what it may see after N from the
//! database, switches to live with no gap and no duplicate, and says `caught_up`. Problems with a
//! message get an `error` frame and harm nobody else; a slow consumer is closed with 4008 and the
//! sync id to resume after.

use super::stream::{self, ReplayError};
use super::{App, Identity};
use crate::hub::Outbound;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use futures::SinkExt;
use serde::Deserialize;
use serde_json::json;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::protocol::{close, ErrorCode};

const SOCKET_BUFFER: usize = 4 * 1024;
/// Queued frames written per flush.
const WRITE_BATCH: usize = 256;
const HEARTBEAT: Duration = Duration::from_secs(15);
const MAX_BAD_MESSAGES: u32 = 20;
/// A write (a batch of frames, a replay page) the client does not take within this is a
/// client that stopped reading: it is cut off (4008) and may resume.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

pub async fn upgrade(
    State(app): State<Arc<App>>,
    identity: Identity,
    ws: WebSocketUpgrade,
) -> Response {
    let held = identity.held_key();
    let Identity {
        user, key, expires, ..
    } = identity;
    if let Some(left) = app.penalties.left(&user) {
        let secs = left.as_secs() + 1;
        let mut refused = super::Refusal::of(
            ErrorCode::Busy,
            &format!(
                "this user's last session sent too many malformed messages; retry after {secs} s"
            ),
        )
        .with_status(axum::http::StatusCode::TOO_MANY_REQUESTS)
        .into_response();
        refused.headers_mut().insert(
            axum::http::header::RETRY_AFTER,
            axum::http::HeaderValue::from(secs),
        );
        return refused;
    }
    let max = app.cfg.max_message_bytes;
    // Small socket buffers: an idle subscriber should cost kilobytes, not the 128 KiB defaults.
    ws.max_message_size(max)
        .max_frame_size(max)
        .read_buffer_size(SOCKET_BUFFER)
        .write_buffer_size(SOCKET_BUFFER)
        .on_upgrade(move |socket| {
            // Counted until the session ends: a shutdown waits for its close frame.
            let open = app.sessions.token();
            async move {
                session(app, user, key, held, expires, socket).await;
                drop(open);
            }
        })
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ClientMessage {
    Subscribe {
        after: i64,
    },
    Ping,
    /// The body of `POST /sync/mutate`, answered with `mutate_result`.
    Mutate(super::mutate::Request),
}

fn frame(value: serde_json::Value) -> Message {
    Message::Text(value.to_string().into())
}

fn error_frame(code: ErrorCode, message: &str) -> Message {
    frame(json!({"type": "error", "code": code.as_str(), "message": message}))
}

/// Sends `code` and completes the closing handshake (RFC 6455 §7.1.1): frames the client sent
/// before it saw our Close are read and dropped until its Close arrives, the stream ends or
/// CLOSE_TIMEOUT passes. Dropping the socket with unread data would make the kernel answer with a
/// reset, which can destroy the Close frame before the client reads it.
async fn close_with(socket: &mut WebSocket, code: u16, reason: String) {
    let handshake = async {
        let frame = Message::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from(reason),
        }));
        if socket.send(frame).await.is_err() {
            return;
        }
        while let Some(Ok(msg)) = socket.recv().await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
        }
    };
    // A peer that stopped reading, or keeps writing, must not hold the connection open.
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, handshake).await;
}

/// A queued frame as sent; moves `position` past a delta.
fn outbound(out: Outbound, position: &mut i64) -> Message {
    match out {
        Outbound::Delta { sync_id, frame } => {
            *position = (*position).max(sync_id);
            Message::Text(frame)
        }
        Outbound::Membership {
            group_id,
            joined,
            sync_id,
        } => {
            // A change from the log is a position like a delta's (everything before it was
            // sent); one the log does not hold is told at the connection's position.
            *position = (*position).max(sync_id.unwrap_or(0));
            frame(json!({
                "type": "membership", "groupId": group_id, "joined": joined, "syncId": *position
            }))
        }
    }
}

/// Replays what `user` may see after `after` into the socket, page by page, and makes the
/// subscriber live; returns the sync id the client is then caught up to. A page that cannot be
/// written within WRITE_TIMEOUT ends it (`Stalled`).
async fn replay(
    app: &App,
    user: &str,
    id: u64,
    after: i64,
    socket: &mut WebSocket,
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
                socket.feed(Message::Text(d.frame.clone())).await?;
            }
            socket.flush().await
        };
        // The next page is read while this one is written: the database and the socket each
        // took about half of a replay's time, one after the other (bench/replay.sh).
        let (written, fetched) = stream::overlap(
            tokio::time::timeout(WRITE_TIMEOUT, write),
            replay.next_page(),
        )
        .await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(ReplayError::Sink),
            Err(_) => return Err(ReplayError::Stalled),
        }
        next = fetched.await_page().await?;
        // Read ahead: a key revoked while the last page was written stops it here.
        next = replay.admit(next)?;
    }
    Ok(replay.through)
}

/// Whether a write timed at WRITE_TIMEOUT (`written`) went out. If not, the session ends: a
/// failed socket just closes; a client that took nothing for WRITE_TIMEOUT is cut off as a slow
/// consumer (what a stalled replay gets).
async fn sent<E>(
    app: &App,
    socket: &mut WebSocket,
    sub: &crate::hub::Subscription,
    written: Result<Result<(), E>, tokio::time::error::Elapsed>,
    position: i64,
) -> bool {
    match written {
        Ok(Ok(())) => true,
        Ok(Err(_)) => false,
        Err(_) => {
            replay_failed(app, socket, sub, ReplayError::Stalled, position).await;
            false
        }
    }
}

/// Tells the client why its replay ended (the caller then ends the session).
async fn replay_failed(
    app: &App,
    socket: &mut WebSocket,
    sub: &crate::hub::Subscription,
    error: ReplayError,
    position: i64,
) {
    match error {
        ReplayError::Sink => {}
        ReplayError::Stalled => {
            app.hub.metrics.slow_cutoffs.fetch_add(1, Ordering::Relaxed);
            close_with(
                socket,
                close::SLOW_CONSUMER,
                format!("slow consumer; resume after {position}"),
            )
            .await;
        }
        ReplayError::Expired(horizon) => {
            let why = super::stream::compacted(horizon);
            let _ = socket
                .send(error_frame(ErrorCode::ResyncRequired, &why))
                .await;
            close_with(socket, close::RESYNC, "resync required".into()).await;
        }
        ReplayError::Dropped => close_dropped(socket, sub, position).await,
        ReplayError::NotReady => {
            let _ = socket
                .send(error_frame(
                    ErrorCode::Unavailable,
                    "the worker is starting; retry",
                ))
                .await;
            close_with(socket, close::INTERNAL, "not ready; retry".into()).await;
        }
        ReplayError::Db(e) => {
            tracing::warn!(error = %e, "replay failed");
            close_with(
                socket,
                close::INTERNAL,
                format!("replay failed; retry after {position}"),
            )
            .await;
        }
    }
}

/// Closes with the code the hub dropped the subscriber for (4401 for a revoked key).
async fn close_dropped(socket: &mut WebSocket, sub: &crate::hub::Subscription, position: i64) {
    let (code, why) = sub
        .cut()
        .map(|c| (c.code, c.reason))
        .unwrap_or((close::INTERNAL, "dropped".into()));
    close_with(socket, code, format!("{why}; resume after {position}")).await;
}

async fn session(
    app: Arc<App>,
    user: String,
    key: Option<String>,
    held: Option<super::HeldKey>,
    expires: Option<std::time::SystemTime>,
    mut socket: WebSocket,
) {
    let Some((mut sub, _registration)) = stream::register(&app, &user, key.as_deref()).await else {
        close_with(&mut socket, close::INTERNAL, "database unavailable".into()).await;
        return;
    };
    if !stream::recheck_key(&app, held.as_ref()).await {
        close_with(
            &mut socket,
            close::INTERNAL,
            "cannot check the api key now; retry".into(),
        )
        .await;
        return;
    }
    // A JWT session ends when its token does (4402); the client reconnects with a fresh one.
    let expiry = stream::token_expiry(expires);
    tokio::pin!(expiry);
    // The futures of the rarely firing branches live across iterations: made afresh each time,
    // every delivery registered and removed a waiter on the shutdown channel (shared by every
    // connection) and on both notifies, a lock round trip each, 100k times a second in the
    // fan-out bench.
    let mut shutdown_rx = app.shutdown.clone();
    let shutdown = shutdown_rx.changed();
    tokio::pin!(shutdown);
    let (lagged, dropped) = (sub.lagged.clone(), sub.dropped.clone());
    let lagged_fired = lagged.notified();
    tokio::pin!(lagged_fired);
    let dropped_fired = dropped.notified();
    tokio::pin!(dropped_fired);
    let mut subscribed = false;
    // The sync id this client can resume after.
    let mut position: i64 = 0;
    let mut bad = 0u32;
    let mut ping = tokio::time::interval(HEARTBEAT);
    let mut last_pong = Instant::now();
    loop {
        tokio::select! {
            msg = socket.recv() => {
                let msg = match msg {
                    Some(Ok(msg)) => msg,
                    Some(Err(e)) => {
                        let too_big = e
                            .into_inner()
                            .downcast::<tungstenite::Error>()
                            .is_ok_and(|e| matches!(*e, tungstenite::Error::Capacity(_)));
                        if too_big {
                            let limit = app.cfg.max_message_bytes;
                            close_with(&mut socket, close::TOO_BIG, format!("message larger than {limit} bytes")).await;
                        }
                        break;
                    }
                    None => break,
                };
                match msg {
                    Message::Text(text) => {
                        let parsed = serde_json::from_str::<ClientMessage>(text.as_str());
                        let reply = match parsed {
                            Ok(ClientMessage::Subscribe { after }) if subscribed => {
                                let _ = after;
                                Some(error_frame(ErrorCode::AlreadySubscribed, "this connection is already subscribed"))
                            }
                            Ok(ClientMessage::Subscribe { after }) if after < 0 => {
                                Some(error_frame(ErrorCode::BadCursor, "after must be 0 or a sync id"))
                            }
                            Ok(ClientMessage::Subscribe { after }) => {
                                let Some(watermark) = app.hub.watermark() else {
                                    let _ = socket.send(error_frame(ErrorCode::Unavailable, "the worker is starting; retry")).await;
                                    close_with(&mut socket, close::INTERNAL, "not ready; retry".into()).await;
                                    break;
                                };
                                if after > watermark {
                                    let _ = socket.send(error_frame(ErrorCode::CursorAhead, "after is beyond the last sync id; re-bootstrap")).await;
                                    close_with(&mut socket, close::CURSOR_AHEAD, "cursor ahead of the log".into()).await;
                                    break;
                                }
                                match replay(&app, &user, sub.id, after, &mut socket, false).await {
                                    Ok(through) => {
                                        subscribed = true;
                                        // No ping went out during the replay (its pages did,
                                        // each within WRITE_TIMEOUT): a long one is not a
                                        // silent peer (review rev16c F4).
                                        last_pong = Instant::now();
                                        ping.reset();
                                        position = through;
                                        Some(frame(json!({"type": "caught_up", "syncId": through})))
                                    }
                                    Err(e) => {
                                        replay_failed(&app, &mut socket, &sub, e, after).await;
                                        break;
                                    }
                                }
                            }
                            Ok(ClientMessage::Ping) => Some(frame(json!({"type": "pong"}))),
                            Ok(ClientMessage::Mutate(request)) => {
                                if !app.hub.is_registered(sub.id) {
                                    // Dropped by the hub (revoked key): it may not write either.
                                    close_dropped(&mut socket, &sub, position).await;
                                    break;
                                }
                                // Revoked (or moved to another user, or re-hashed), and the
                                // replication stream has not said so yet; or not known valid
                                // (the check failed): nothing is written (as HTTP's 503).
                                let confirmed = match held.as_ref() {
                                    Some(k) => k.confirm(&app).await,
                                    None => Ok(()),
                                };
                                Some(match confirmed {
                                    Err(refused) if refused.code == ErrorCode::InvalidApiKey => {
                                        close_with(&mut socket, close::REVOKED, format!("api key revoked; resume after {position}")).await;
                                        break;
                                    }
                                    Err(refused) => error_frame(refused.code, &refused.message),
                                    Ok(()) => match super::mutate::apply(&app, &user, held.as_ref(), &request).await {
                                        Ok(results) => frame(json!({"type": "mutate_result", "results": results})),
                                        Err(super::mutate::BatchError::KeyRevoked) => {
                                            close_with(&mut socket, close::REVOKED, format!("api key revoked; resume after {position}")).await;
                                            break;
                                        }
                                        Err(super::mutate::BatchError::Bad(why, field)) => frame(
                                            json!({"type": "error", "code": ErrorCode::BadRequest.as_str(), "message": why, "field": field}),
                                        ),
                                        Err(super::mutate::BatchError::Unavailable) => {
                                            error_frame(ErrorCode::Unavailable, "database unavailable; retry")
                                        }
                                    }
                                })
                            }
                            Err(_) => {
                                bad += 1;
                                Some(error_frame(ErrorCode::BadMessage, "expected {\"type\":\"subscribe\",\"after\":N} or {\"type\":\"ping\"}"))
                            }
                        };
                        if let Some(reply) = reply {
                            let written = tokio::time::timeout(WRITE_TIMEOUT, socket.send(reply)).await;
                            if !sent(&app, &mut socket, &sub, written, position).await {
                                break;
                            }
                        }
                        if bad > MAX_BAD_MESSAGES {
                            app.penalties.punish(&user);
                            close_with(&mut socket, close::BAD_INPUT, "too many malformed messages".into()).await;
                            break;
                        }
                    }
                    Message::Binary(_) => {
                        bad += 1;
                        // A flood of binary frames counts like one of malformed text frames.
                        if bad > MAX_BAD_MESSAGES {
                            app.penalties.punish(&user);
                            close_with(&mut socket, close::BAD_INPUT, "too many malformed messages".into()).await;
                            break;
                        }
                        if socket.send(error_frame(ErrorCode::BadMessage, "binary frames are not part of protocol v1")).await.is_err() {
                            break;
                        }
                    }
                    Message::Pong(_) => last_pong = Instant::now(),
                    Message::Ping(_) => {}
                    Message::Close(_) => break,
                }
            }
            out = sub.rx.recv(), if subscribed => {
                let Some(first) = out else {
                    close_dropped(&mut socket, &sub, position).await;
                    break;
                };
                // Everything already queued goes out in one write; a client that does not
                // take it within WRITE_TIMEOUT has stopped reading and is cut off.
                let write = async {
                    let mut next = Some(first);
                    let mut batched = 0;
                    while let Some(out) = next.take() {
                        socket.feed(outbound(out, &mut position)).await?;
                        batched += 1;
                        if batched < WRITE_BATCH {
                            next = sub.rx.try_recv().ok();
                        }
                    }
                    socket.flush().await
                };
                let written = tokio::time::timeout(WRITE_TIMEOUT, write).await;
                if !sent(&app, &mut socket, &sub, written, position).await {
                    break;
                }
            }
            _ = &mut lagged_fired, if subscribed => {
                lagged_fired.set(lagged.notified());
                // The queue filled (a large transaction, a slow network): send what is queued,
                // page the rest from the log, and go live again, without the client noticing.
                let write = async {
                    while let Ok(out) = sub.rx.try_recv() {
                        socket.feed(outbound(out, &mut position)).await?;
                    }
                    // Then the membership changes it could not queue, before the paging.
                    for out in app.hub.missed_memberships(sub.id) {
                        socket.feed(outbound(out, &mut position)).await?;
                    }
                    socket.flush().await
                };
                let written = tokio::time::timeout(WRITE_TIMEOUT, write).await;
                if !sent(&app, &mut socket, &sub, written, position).await {
                    break;
                }
                match replay(&app, &user, sub.id, position, &mut socket, true).await {
                    Ok(through) => {
                        position = position.max(through);
                        last_pong = Instant::now();
                        ping.reset();
                    }
                    Err(e) => {
                        replay_failed(&app, &mut socket, &sub, e, position).await;
                        break;
                    }
                }
            }
            _ = &mut dropped_fired => {
                // Revoked (or cut off): close now, even before a subscribe or mid-idle.
                close_dropped(&mut socket, &sub, position).await;
                break;
            }
            _ = &mut expiry => {
                close_with(&mut socket, close::TOKEN_EXPIRED, format!("token expired; reconnect with a fresh token and resume after {position}")).await;
                break;
            }
            _ = ping.tick() => {
                if last_pong.elapsed() > HEARTBEAT * 3 {
                    close_with(&mut socket, close::HEARTBEAT, "heartbeat timeout".into()).await;
                    break;
                }
                let written = tokio::time::timeout(WRITE_TIMEOUT, socket.send(Message::Ping(Default::default()))).await;
                if !sent(&app, &mut socket, &sub, written, position).await {
                    break;
                }
            }
            _ = &mut shutdown => {
                if crate::failpoint::fire("slow_shutdown_close") {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                close_with(&mut socket, close::GOING_AWAY, format!("server shutting down; resume after {position}")).await;
                break;
            }
        }
    }
}
