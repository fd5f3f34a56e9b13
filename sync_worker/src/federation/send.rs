//! The sender's end of a link, `GET /federation/v1/ws`: challenges the dialer, checks its MAC
//! against the peer's secret (or the previous one during a rotation), proves itself back, then
//! streams `peer_changes` after the receiver's cursor, one frame per `batch_end` range (whole
//! source transactions), never more than the receiver's window unacknowledged.

use super::frames::{batch_text, close, Frame, PROTO};
use super::{
    auth, auth_failed_event, event, identity, metrics, report, sqlstate, Report, REGISTRY_POLL,
};
use crate::api::App;
use crate::store;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use serde_json::json;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::Client;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Sync ids per batch (rounded up to whole source transactions by `batch_end`).
const SPAN: i32 = 1000;
/// The most frames a receiver may ask to have in flight.
pub const MAX_WINDOW: u32 = 64;
/// How often a caught-up link looks for new commits on its own. The sequencer's publishes wake
/// it at once (`Hub::advanced`) when this worker also sequences; this poll is the fallback for
/// a wake-up that never comes (a federation leader whose twin worker holds the slot);
/// tests lengthen it (`SYNC_FEDERATION_POLL_MS`) to prove delivery does not wait for it.
const POLL: Duration = Duration::from_millis(50);

/// A positive number from the environment variable `name` (test and benchmark knobs only).
fn knob(name: &str) -> Option<u64> {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&n| n > 0)
}

/// The fallback poll interval: `POLL`, or `SYNC_FEDERATION_POLL_MS` (tests only).
fn poll_every() -> Duration {
    knob("SYNC_FEDERATION_POLL_MS").map_or(POLL, Duration::from_millis)
}
/// Frames read at the head of the log (a caught-up link: everything ready fitted) that may be
/// in flight at once. While one is unacknowledged, what commits meanwhile waits for its ack and
/// goes in one frame, so a receiver busy applying gets fewer, larger frames instead of a queue
/// of small ones (each apply costs a round trip and a commit whatever its size). A backlog
/// (full-span frames) still fills the receiver's window.
const HEAD_FRAMES: usize = 1;

/// `HEAD_FRAMES`, or `SYNC_FEDERATION_HEAD_FRAMES` (benchmarks and tests only).
fn head_frames() -> usize {
    knob("SYNC_FEDERATION_HEAD_FRAMES").map_or(HEAD_FRAMES, |n| n as usize)
}
/// `peer_links` is written at most this often while streaming.
const REPORT_EVERY: Duration = Duration::from_secs(1);
/// Pings keep a quiet link's liveness visible both ways; a receiver silent for `LIVENESS`
/// (no ack, no pong) is taken for dead, so a half-open connection does not hold a link.
const PING_EVERY: Duration = Duration::from_secs(10);
const LIVENESS: Duration = Duration::from_secs(60);
/// The most state rows a receiver may ask for in one snapshot page.
pub const SNAPSHOT_PAGE_MAX: u32 = 10_000;

pub async fn upgrade(State(app): State<Arc<App>>, ws: WebSocketUpgrade) -> Response {
    ws.on_upgrade(move |socket| serve(app, socket))
}

async fn close_with(ws: &mut WebSocket, code: u16, reason: &str) {
    let _ = ws
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        })))
        .await;
}

/// The next text frame within `wait`, parsed; None on timeout, close or garbage.
async fn recv(ws: &mut WebSocket, wait: Duration) -> Option<Frame> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, ws.recv()).await {
            Ok(Some(Ok(Message::Text(t)))) => return Frame::parse(&t).ok(),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            _ => return None,
        }
    }
}

struct Peer {
    name: String,
    node_id: Option<String>,
    enabled: bool,
    direction: String,
    secret: String,
}

async fn serve(app: Arc<App>, mut ws: WebSocket) {
    if !super::leading(&app.cfg.database_url) {
        // Another worker runs federation for this database (or this one has not taken the
        // lock yet): serving a link here would send the log twice.
        return close_with(
            &mut ws,
            close::STANDBY,
            "standby: another worker serves federation for this database",
        )
        .await;
    }
    let db = match store::connect(&app.cfg.database_url).await {
        Ok(db) => db,
        Err(e) => {
            tracing::warn!(error = %e, "federation: database unavailable");
            return close_with(&mut ws, close::INTERNAL, "database unavailable").await;
        }
    };
    let (me, epoch) = match identity(&db).await {
        Ok(x) => x,
        Err(e) => {
            tracing::warn!(error = %e, "federation: cannot read this node's identity");
            return close_with(&mut ws, close::INTERNAL, "node identity unavailable").await;
        }
    };
    let Some(peer) = handshake(&db, &mut ws, &me, &epoch).await else {
        return;
    };
    let r = peer.node_id.clone().unwrap_or_default();
    // A joining receiver first reads our state page by page (it applies each page between its
    // requests, so it gets LIVENESS per page), then subscribes after the join's W.
    let mut wait = HANDSHAKE_TIMEOUT;
    let (after, window) = loop {
        match recv(&mut ws, wait).await {
            Some(Frame::Subscribe { after, window }) if after >= 0 => {
                break (after, window.clamp(1, MAX_WINDOW))
            }
            Some(Frame::Join { resume_w }) => {
                wait = LIVENESS;
                if let Err(why) = join_start(&db, &mut ws, &peer.name, &r, resume_w).await {
                    return close_with(&mut ws, close::INTERNAL, why).await;
                }
            }
            Some(Frame::Snapshot {
                after_model,
                after_model_id,
                limit,
            }) => {
                let limit = limit.clamp(1, SNAPSHOT_PAGE_MAX) as i32;
                let page = db
                    .query_one(
                        "SELECT coalesce(jsonb_agg(to_jsonb(s) ORDER BY s.model COLLATE \"C\", s.model_id COLLATE \"C\"), '[]')::text, count(*)
                           FROM pg_sync.peer_snapshot($1, $2, $3, $4) s",
                        &[&r, &after_model, &after_model_id, &limit],
                    )
                    .await;
                let (rows, n): (String, i64) = match page {
                    Ok(row) => (row.get(0), row.get(1)),
                    Err(e) => {
                        tracing::warn!(peer = %peer.name, error = %e, "federation: reading a snapshot page failed");
                        return close_with(&mut ws, close::INTERNAL, "snapshot unavailable").await;
                    }
                };
                metrics::link(&peer.name, "out")
                    .bytes
                    .inc_by(rows.len() as u64);
                let text = format!(
                    r#"{{"type":"snapshot_page","rows":{rows},"done":{}}}"#,
                    n < i64::from(limit)
                );
                if ws.send(Message::Text(text.into())).await.is_err() {
                    return;
                }
            }
            _ => return close_with(&mut ws, close::PROTOCOL, "expected subscribe").await,
        }
    };
    tracing::info!(peer = %peer.name, node_id = %r, after, window, "federation: sending");
    event(
        &db,
        &peer.name,
        "connected",
        json!({"direction": "out", "node_id": r, "after": after}),
    )
    .await;
    report(
        &db,
        &peer.name,
        "out",
        Report {
            state: "streaming",
            connected: Some(true),
            peer_last_sync_id: Some(after),
            applied: 0,
            changed: 0,
            last_error: None,
        },
    )
    .await;
    metrics::link(&peer.name, "out").up.set(1);
    // The receiver's cursor is what it holds of our log from now on (it may have moved back,
    // e.g. after a re-bootstrap); acks move it forward.
    if let Err(msg) = hold(&db, &peer.name, after, true).await {
        metrics::link(&peer.name, "out").up.set(0);
        report(
            &db,
            &peer.name,
            "out",
            Report {
                state: "stalled",
                connected: Some(false),
                peer_last_sync_id: None,
                applied: 0,
                changed: 0,
                last_error: Some(&msg),
            },
        )
        .await;
        return close_with(&mut ws, close::INTERNAL, "cannot hold the log").await;
    }
    let why = stream(&app, &db, &mut ws, &peer, &r, &epoch, after, window).await;
    metrics::link(&peer.name, "out").closed();
    tracing::info!(peer = %peer.name, why, "federation: sender link closed");
    report(
        &db,
        &peer.name,
        "out",
        Report {
            state: "disconnected",
            connected: Some(false),
            peer_last_sync_id: None,
            applied: 0,
            changed: 0,
            last_error: Some(why),
        },
    )
    .await;
}

/// Challenge, verify the receiver, prove ourselves, pin its node id. None: refused (closed).
async fn handshake(db: &Client, ws: &mut WebSocket, me: &str, epoch: &str) -> Option<Peer> {
    let sn = auth::nonce();
    let challenge = Frame::Challenge {
        proto: PROTO,
        node_id: me.to_owned(),
        nonce: sn.clone(),
    };
    if ws
        .send(Message::Text(challenge.to_text().into()))
        .await
        .is_err()
    {
        return None;
    }
    let Some(Frame::Auth {
        node_id: r,
        nonce: rn,
        mac,
    }) = recv(ws, HANDSHAKE_TIMEOUT).await
    else {
        close_with(ws, close::PROTOCOL, "expected auth").await;
        return None;
    };
    if !auth::valid_nonce(&rn) || r.is_empty() {
        close_with(ws, close::PROTOCOL, "malformed auth").await;
        return None;
    }
    if r == me {
        auth_failed_event(
            db,
            "(self)",
            json!({"direction": "out", "node_id": r, "reason": "self_link"}),
        )
        .await;
        close_with(
            ws,
            close::FORBIDDEN,
            "self-link: the dialer has this node's node id",
        )
        .await;
        return None;
    }
    // The peer pinned to this node id first, then unpinned peers (first contact), then the
    // rest (to tell a pinned-id mismatch from a wrong secret).
    let rows = match db
        .query(
            "SELECT p.name, p.node_id, p.enabled, p.direction, s.secret, s.previous_secret
               FROM pg_sync.peers p JOIN pg_sync.peer_secrets s ON s.peer = p.name
              ORDER BY (p.node_id IS NOT DISTINCT FROM $1) DESC, (p.node_id IS NULL) DESC, p.name",
            &[&r],
        )
        .await
    {
        Ok(rows) => rows,
        Err(e) => {
            tracing::warn!(error = %e, "federation: cannot read the peer registry");
            close_with(ws, close::INTERNAL, "peer registry unavailable").await;
            return None;
        }
    };
    let matched = rows.iter().find_map(|row| {
        let secrets: [Option<String>; 2] = [Some(row.get(4)), row.get(5)];
        secrets
            .into_iter()
            .flatten()
            .find(|s| auth::verify(s, auth::RECEIVER_TAG, &r, me, &sn, &rn, &mac))
            .map(|secret| Peer {
                name: row.get(0),
                node_id: row.get(1),
                enabled: row.get(2),
                direction: row.get(3),
                secret,
            })
    });
    let Some(mut peer) = matched else {
        let label = rows
            .iter()
            .find(|row| row.get::<_, Option<String>>(1).as_deref() == Some(r.as_str()))
            .map_or_else(|| "(unknown)".to_owned(), |row| row.get(0));
        auth_failed_event(
            db,
            &label,
            json!({"direction": "out", "node_id": r, "reason": "bad_mac"}),
        )
        .await;
        close_with(ws, close::AUTH_FAILED, "authentication failed").await;
        return None;
    };
    if let Some(pinned) = peer.node_id.as_deref().filter(|p| *p != r) {
        auth_failed_event(
            db,
            &peer.name,
            json!({"direction": "out", "node_id": r, "pinned": pinned, "reason": "node_id_mismatch"}),
        )
        .await;
        close_with(
            ws,
            close::FORBIDDEN,
            "node id differs from the one pinned for this peer",
        )
        .await;
        return None;
    }
    if !peer.enabled {
        close_with(ws, close::PEER_GONE, "peer disabled on the sender").await;
        return None;
    }
    if peer.direction == "pull" {
        close_with(
            ws,
            close::FORBIDDEN,
            "the sender does not send to this peer (direction pull)",
        )
        .await;
        return None;
    }
    if let Err(e) = db
        .execute("SELECT pg_sync.pin_peer($1, $2)", &[&peer.name, &r])
        .await
    {
        let msg = e
            .as_db_error()
            .map_or_else(|| e.to_string(), |d| d.message().to_owned());
        auth_failed_event(
            db,
            &peer.name,
            json!({"direction": "out", "node_id": r, "reason": msg}),
        )
        .await;
        close_with(ws, close::FORBIDDEN, "node id refused").await;
        return None;
    }
    peer.node_id = Some(r.clone());
    let (last, extension_version, models): (i64, Option<String>, Vec<String>) = match db
        .query_one(
            "SELECT pg_sync.last_sync_id(),
                    (SELECT extversion FROM pg_extension WHERE extname = 'pg_sync'),
                    ARRAY(SELECT r.model FROM pg_sync.registry r, pg_sync.peers p
                           WHERE p.name = $1 AND r.enabled AND r.federation IN ('push', 'both')
                             AND (p.models IS NULL OR r.model = ANY (p.models)) ORDER BY 1)",
            &[&peer.name],
        )
        .await
    {
        Ok(row) => (row.get(0), row.get(1), row.get(2)),
        Err(_) => {
            close_with(ws, close::INTERNAL, "log unavailable").await;
            return None;
        }
    };
    let welcome = Frame::Welcome {
        mac: auth::mac(&peer.secret, auth::SENDER_TAG, &r, me, &sn, &rn),
        epoch: epoch.to_owned(),
        last_sync_id: last,
        info: Some(json!({
            "extension_version": extension_version,
            "worker_version": env!("CARGO_PKG_VERSION"),
            "time_ms": super::wall_ms(),
            "models": models,
        })),
    };
    if ws
        .send(Message::Text(welcome.to_text().into()))
        .await
        .is_err()
    {
        return None;
    }
    Some(peer)
}

/// Starts (or resumes) a receiver's snapshot join: fixes W, holds the log after it, and sends
/// W, our epoch and our peer cursors (`pg_sync.peer_join_start`, one transaction).
async fn join_start(
    db: &Client,
    ws: &mut WebSocket,
    peer: &str,
    r: &str,
    resume_w: Option<i64>,
) -> Result<(), &'static str> {
    let answer = db
        .query_one(
            "SELECT pg_sync.peer_join_start($1, $2)::text",
            &[&r, &resume_w],
        )
        .await;
    let answer: serde_json::Value = match answer {
        Ok(row) => serde_json::from_str(&row.get::<_, String>(0)).unwrap_or_default(),
        Err(e) => {
            tracing::warn!(peer, error = %e, "federation: starting a snapshot join failed");
            return Err("cannot start the join");
        }
    };
    let f = Frame::JoinStart {
        w: answer["w"].as_i64().unwrap_or(0),
        epoch: answer["epoch"].as_str().unwrap_or_default().to_owned(),
        cursors: answer["cursors"].clone(),
    };
    tracing::info!(
        peer,
        w = answer["w"].as_i64(),
        resumed = answer["resumed"].as_bool(),
        "federation: snapshot join"
    );
    ws.send(Message::Text(f.to_text().into()))
        .await
        .map_err(|_| "receiver gone")
}

/// Records the receiver's acknowledgement for the retention hold (`pg_sync.peer_ack`). A
/// failed ack only delays the hold (compaction holds at the older ack), so it is logged; a
/// failed hold at subscribe leaves the log unheld for the peer, so the caller closes the link
/// (the receiver retries) rather than stream while compaction may pass the peer's cursor.
async fn hold(db: &Client, peer: &str, acked: i64, at_subscribe: bool) -> Result<(), String> {
    db.execute(
        "SELECT pg_sync.peer_ack($1, $2, $3)",
        &[&peer, &acked, &at_subscribe],
    )
    .await
    .map(|_| ())
    .map_err(|e| {
        let msg = super::db_text(&e);
        tracing::error!(peer, acked, error = %msg, "federation: recording the peer's ack failed (is EXECUTE on pg_sync.peer_ack granted to the worker's role?)");
        msg
    })
}

/// The next range after `sent` for node `r`: (end, last sync id, changes JSON), read in one
/// statement (one snapshot). None when caught up.
async fn next_batch(
    db: &Client,
    r: &str,
    sent: i64,
) -> Result<Option<(i64, i64, String)>, tokio_postgres::Error> {
    let row = db
        .query_one(
            "SELECT e, pg_sync.last_sync_id(),
                    CASE WHEN e > $2 THEN
                        (SELECT coalesce(jsonb_agg(to_jsonb(c) ORDER BY c.sync_id), '[]')::text
                           FROM pg_sync.peer_changes($1, $2, (e - $2)::int) c) END
               FROM pg_sync.batch_end($2, $3) e",
            &[&r, &sent, &SPAN],
        )
        .await?;
    let end: i64 = row.get(0);
    Ok((end > sent).then(|| (end, row.get(1), row.get(2))))
}

/// Streams until the link ends; returns why.
#[allow(clippy::too_many_arguments)]
async fn stream(
    app: &App,
    db: &Client,
    ws: &mut WebSocket,
    peer: &Peer,
    r: &str,
    epoch: &str,
    after: i64,
    window: u32,
) -> &'static str {
    let mut sent = after;
    let mut inflight: VecDeque<i64> = VecDeque::new();
    let mut acked = after;
    // What the retention hold records (`peer_ack`), at most once per REPORT_EVERY.
    let mut held = after;
    let mut reported = Instant::now();
    // Subscribed before the first read, so a publish after that read still wakes us.
    let mut published = app.hub.advanced();
    let mut wakes_open = true;
    let mut poll = tokio::time::interval(poll_every());
    // A poll missed while the window was full fires once, not as a burst of reads.
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut registry = tokio::time::interval(REGISTRY_POLL);
    let mut shutdown = app.shutdown.clone();
    let mut ping = tokio::time::interval(PING_EVERY);
    let mut heard = Instant::now();
    // Whether the log may hold more to send: set at the start, by a publish, an ack (the
    // window reopened) or the fallback poll; pings, pongs and registry checks leave it.
    let mut check = true;
    // Whether the last frame sent reached the head of the log (see `HEAD_FRAMES`).
    let mut at_head = false;
    let head_limit = head_frames().min(window as usize);
    loop {
        while check
            && inflight.len() < window as usize
            && !(at_head && inflight.len() >= head_limit)
        {
            match next_batch(db, r, sent).await {
                Ok(None) => {
                    check = false;
                    break;
                }
                Ok(Some((to, last, changes))) => {
                    at_head = to >= last;
                    let text = batch_text(sent, to, epoch, last, &changes);
                    let l = metrics::link(&peer.name, "out");
                    l.batches.inc();
                    l.bytes.inc_by(text.len() as u64);
                    l.lag_actions.set((last - acked).max(0));
                    if ws.send(Message::Text(text.into())).await.is_err() {
                        return "receiver gone";
                    }
                    sent = to;
                    inflight.push_back(to);
                }
                Err(e) if sqlstate(&e) == Some("PS003") => {
                    event(
                        db,
                        &peer.name,
                        "resync_required",
                        json!({"direction": "out", "after": sent}),
                    )
                    .await;
                    let f = Frame::Error {
                        code: "resync_required".into(),
                        message: "the log after the receiver's cursor is compacted".into(),
                    };
                    let _ = ws.send(Message::Text(f.to_text().into())).await;
                    close_with(ws, close::RESYNC_REQUIRED, "resync required").await;
                    return "resync required";
                }
                Err(e) => {
                    tracing::warn!(peer = %peer.name, error = %e, "federation: reading the log failed");
                    let code = if matches!(sqlstate(&e), Some("55000" | "42704")) {
                        close::PEER_GONE
                    } else {
                        close::INTERNAL
                    };
                    close_with(ws, code, "the sender cannot read its log for this peer").await;
                    return "log read failed";
                }
            }
        }
        tokio::select! {
            _ = ping.tick() => {
                if heard.elapsed() > LIVENESS {
                    close_with(ws, close::PROTOCOL, "receiver silent").await;
                    return "receiver silent";
                }
                if ws.send(Message::Ping(Default::default())).await.is_err() {
                    return "receiver gone";
                }
            }
            msg = ws.recv() => match msg {
                Some(Ok(Message::Text(t))) => match Frame::parse(&t) {
                    Ok(Frame::Ack { to }) if to <= sent => {
                        heard = Instant::now();
                        while inflight.front().is_some_and(|&f| f <= to) {
                            inflight.pop_front();
                        }
                        acked = acked.max(to);
                        check = true;
                        if reported.elapsed() >= REPORT_EVERY {
                            reported = Instant::now();
                            let _ = hold(db, &peer.name, acked, false).await;
                            held = acked;
                            report(db, &peer.name, "out", Report {
                                state: "streaming",
                                connected: None,
                                peer_last_sync_id: Some(acked),
                                applied: 0,
                                changed: 0,
                                last_error: None,
                            })
                            .await;
                        }
                    }
                    _ => {
                        close_with(ws, close::PROTOCOL, "expected ack").await;
                        return "protocol error";
                    }
                },
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => heard = Instant::now(),
                Some(Ok(Message::Binary(_))) => {
                    close_with(ws, close::PROTOCOL, "binary frames are not used").await;
                    return "protocol error";
                }
                _ => return "receiver closed",
            },
            // New sync ids published: read and send them now, when the loop above would read
            // (an ack reopens the window or releases the head frame, and sets `check` itself).
            woke = published.changed(), if wakes_open
                && inflight.len() < window as usize
                && !(at_head && inflight.len() >= head_limit) =>
            {
                match woke {
                    Ok(()) => check = true,
                    // No hub any more: the poll alone drives the link.
                    Err(_) => wakes_open = false,
                }
            }
            _ = poll.tick(), if inflight.len() < window as usize => {
                check = true;
                // A quiet link still records its last ack, so the hold does not lag behind.
                if acked > held && reported.elapsed() >= REPORT_EVERY {
                    reported = Instant::now();
                    let _ = hold(db, &peer.name, acked, false).await;
                    held = acked;
                }
            }
            _ = registry.tick() => {
                if !super::leading(&app.cfg.database_url) {
                    // This worker lost the federation lock: the one that took it serves.
                    close_with(ws, close::STANDBY, "standby: another worker serves federation for this database").await;
                    return "standby";
                }
                let still = db
                    .query_opt(
                        "SELECT 1 FROM pg_sync.peers WHERE name = $1 AND enabled
                            AND direction <> 'pull' AND node_id IS NOT DISTINCT FROM $2",
                        &[&peer.name, &r],
                    )
                    .await;
                if matches!(still, Ok(None)) {
                    close_with(ws, close::PEER_GONE, "peer removed or disabled on the sender").await;
                    return "peer removed or disabled";
                }
            }
            _ = shutdown.changed() => {
                close_with(ws, close::GOING_AWAY, "sender shutting down").await;
                return "shutting down";
            }
        }
    }
}
