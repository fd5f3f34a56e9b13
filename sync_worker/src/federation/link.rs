//! The receiver's end of links: one task per enabled peer with direction `pull` or `both`
//! (the registry is polled, so removal or disable closes a link within about a second). A
//! task dials the peer's `/federation/v1/ws`, authenticates both ways, subscribes from the
//! durable cursor (`peer_cursors`) and applies each batch with `apply_peer_batch` (which
//! moves the cursor in the applying transaction), acking after commit; it reconnects with
//! backoff.

use super::frames::{close, Frame, PROTO};
use super::{
    auth, auth_failed_event, db_text, event, metrics, probe, report, sqlstate, wall_ms, Report,
    PATH, PROBE, REGISTRY_POLL,
};
use crate::api::App;
use crate::replication::sequencer::{HolderReplies, Walsender, WALSENDER_COLUMNS};
use crate::store;
use futures::{SinkExt, StreamExt};
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_postgres::Client;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Frames the receiver lets the sender have in flight.
const WINDOW: u32 = 8;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a leader without the replication slot lets another worker stream it before it hands
/// the federation lock over to that worker.
const LEAD_WITHOUT_SLOT: Duration = Duration::from_secs(5);
/// A walsender of another worker counts as streaming the slot while its `reply_time` changed
/// this recently by this worker's clock (a live worker replies every 200 ms streaming, every
/// second idle): one left by a worker that is gone (its connection dropped unseen) stops
/// counting this long after its last reply was seen, or after it was first seen.
const STREAMING_REPLIED_WITHIN: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
const REPORT_EVERY: Duration = Duration::from_secs(1);
/// Parked changes are re-applied this often (their cause, e.g. a missing parent row or a
/// version too far in the future, may have cleared).
const RETRY_QUARANTINE_EVERY: Duration = Duration::from_secs(60);
const LIVENESS: Duration = Duration::from_secs(60);
const MAX_FRAME_BYTES: usize = 1 << 30;
/// How long the `fed_*_pause_*` failpoints hold a handshake or probe (tests only).
const FAILPOINT_PAUSE: Duration = Duration::from_secs(5);

struct Running {
    fingerprint: (String, String),
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// Keeps one link task per pulled peer until `shutdown`.
pub async fn run(app: Arc<App>, mut shutdown: watch::Receiver<bool>) {
    let mut running: HashMap<String, Running> = HashMap::new();
    let mut probing: HashMap<String, JoinHandle<()>> = HashMap::new();
    let mut db: Option<Client> = None;
    // The session holding the federation lock: links run only while it is alive and holds the lock.
    let mut lock: Option<Client> = None;
    // A standby keeps its session and asks again on it each tick (not a new session per tick).
    let mut asking: Option<Client> = None;
    let mut standing_by = false;
    // Since when this worker, leading, has seen another worker stream the replication slot.
    let mut slot_gone_since: Option<Instant> = None;
    // What this worker has seen of the replies of another worker's walsender holding the slot.
    let mut holder: Option<HolderReplies> = None;
    let url = app.cfg.database_url.clone();
    let lock_name = lock_session_name(app.status.replication_name.as_str());
    let mut tick = tokio::time::interval(REGISTRY_POLL);
    let mut retried = Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => break,
        }
        if db.as_ref().is_none_or(|c| c.is_closed()) {
            db = store::connect(&url).await.ok();
        }
        let Some(c) = db.as_ref() else { continue };
        // Federation runs in the worker whose sequencer streams the slot: its senders are woken
        // by that worker's publishes (a leader elsewhere would only poll). So a worker without
        // the slot does not ask for the lock while another worker's walsender streams it, and
        // a leader without the slot hands the lock over once another worker has streamed it for
        // LEAD_WITHOUT_SLOT. With no other worker streaming (one worker whose replication
        // reconnects, perhaps while its own walsender of the dropped connection lingers, or
        // whose slot cannot be streamed, or whose predecessor's walsender lingers: a walsender
        // counts only while its worker replies) this one leads as before: receiving needs no
        // slot, and its senders fall back to polling.
        let status = &app.status;
        let holds_slot = status.slot_held.load(std::sync::atomic::Ordering::Acquire);
        let elsewhere = if holds_slot {
            holder = None;
            Elsewhere::No
        } else {
            slot_streamed_elsewhere(
                c,
                &app.cfg.slot,
                status.replication_name.as_str(),
                &mut holder,
            )
            .await
        };
        let streamed_elsewhere = elsewhere == Elsewhere::Streams;
        if lock.is_some() && streamed_elsewhere {
            let since = *slot_gone_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= LEAD_WITHOUT_SLOT {
                stand_by(c, &mut standing_by, Standby::HandOver).await;
                // Links stopped before the lock goes: the next leader may start them at once.
                super::set_leading(&url, false);
                stop_all(&mut running).await;
                lock = None;
            }
        } else {
            slot_gone_since = None;
        }
        if lock.as_ref().is_none_or(|l| l.is_closed()) {
            // Lost (or never had) the lock's session: stop the links before anyone else may
            // start them, then try to take it.
            super::set_leading(&url, false);
            stop_all(&mut running).await;
            lock = None;
            if streamed_elsewhere {
                // That worker leads (or will): ask again next tick.
                stand_by(c, &mut standing_by, Standby::SlotStreamed).await;
                continue;
            }
            if elsewhere == Elsewhere::Unheard {
                // Either another worker's (its next reply is seen within a second) or a gone
                // one's (none is): known within STREAMING_REPLIED_WITHIN of first seeing it.
                continue;
            }
            if asking.as_ref().is_none_or(|a| a.is_closed()) {
                asking = store::connect_holding(&url, &lock_name).await.ok();
            }
            if let Some(l) = asking.take() {
                match l
                    .query_one("SELECT pg_sync.try_federation_lock()", &[])
                    .await
                    .map(|r| r.get::<_, bool>(0))
                {
                    Ok(true) => {
                        if standing_by {
                            tracing::info!(
                                "federation: the other worker is gone; taking over the links"
                            );
                            event(c, "(self)", "leading", json!({"pid": std::process::id()})).await;
                        }
                        standing_by = false;
                        lock = Some(l);
                        super::set_leading(&url, true);
                    }
                    Ok(false) => {
                        // Our own earlier lock session (its connection dropped, the server
                        // unaware) is no other worker: ended, and asked again next tick.
                        if !end_own_lock_session(&l, &lock_name).await {
                            stand_by(c, &mut standing_by, Standby::LockTaken).await;
                        }
                        asking = Some(l);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "federation: cannot take the federation lock")
                    }
                }
            }
            if lock.is_none() {
                continue;
            }
        }
        let rows = match c
            .query(
                // A new secret re-authenticates the link: it is part of the fingerprint.
                // So does resync_peer (its event): the link restarts and joins by snapshot.
                "SELECT p.name, p.url, p.created_at::text || ' ' || coalesce(s.rotated_at::text, '')
                        || ' ' || coalesce((SELECT max(e.at)::text FROM pg_sync.peer_events e
                                             WHERE e.peer = p.name AND e.event = 'resync'), '')
                   FROM pg_sync.peers p LEFT JOIN pg_sync.peer_secrets s ON s.peer = p.name
                  WHERE p.enabled AND p.direction IN ('pull', 'both')",
                &[],
            )
            .await
        {
            Ok(rows) => rows,
            Err(e) => {
                tracing::debug!(error = %e, "federation: cannot read the peer registry");
                continue;
            }
        };
        // Connection tests asked for by pg_sync.test_peer: one probe per peer at a time.
        probing.retain(|_, task: &mut JoinHandle<()>| !task.is_finished());
        if let Ok(asked) = c
            .query(
                "SELECT q.peer, q.requested_at::text FROM pg_sync.peer_probes q JOIN pg_sync.peers p ON p.name = q.peer
                  WHERE q.requested_at IS NOT NULL AND (q.checked_at IS NULL OR q.checked_at < q.requested_at)",
                &[],
            )
            .await
        {
            for row in asked {
                let (name, requested_at): (String, String) = (row.get(0), row.get(1));
                // A probe still running for an earlier request does not answer this one (its
                // result is older): the next tick starts one when it has finished.
                probing
                    .entry(name.clone())
                    .or_insert_with(|| tokio::spawn(probe_peer(app.clone(), name, requested_at)));
            }
        }
        if retried.elapsed() >= RETRY_QUARANTINE_EVERY {
            retried = Instant::now();
            retry_quarantined(c).await;
        }
        let wanted: HashMap<String, (String, String)> = rows
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect();
        running.retain(|name, link| {
            let keep = wanted.get(name) == Some(&link.fingerprint);
            if !keep {
                tracing::info!(peer = %name, "federation: closing the link (peer removed, disabled or changed)");
                let _ = link.stop.send(true);
            }
            keep
        });
        for (name, fingerprint) in wanted {
            if running.contains_key(&name) {
                continue; // a finished task (invalidated) stays finished until the peer changes
            }
            let (stop, stopped) = watch::channel(false);
            let task = tokio::spawn(link(app.clone(), name.clone(), stopped));
            running.insert(
                name,
                Running {
                    fingerprint,
                    stop,
                    task,
                },
            );
        }
    }
    stop_all(&mut running).await;
    super::set_leading(&url, false);
}

/// Whether another worker's walsender streams the slot (see `slot_streamed_elsewhere`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Elsewhere {
    No,
    /// A walsender first seen lately whose `reply_time` has not been seen to change yet:
    /// another worker's (it changes within a second) or a gone one's (it never does). Neither
    /// counted nor ignored until that is known, at most `STREAMING_REPLIED_WITHIN`.
    Unheard,
    Streams,
}

/// Whether another worker's walsender streams the slot now: the slot's walsender, whose
/// `application_name` is not this worker's (`ours`, `sequencer::ReplicationName`), and whose
/// `reply_time` was seen to change within `STREAMING_REPLIED_WITHIN` by this worker's clock
/// (`holder`, sampled each tick: the value is the replying worker's clock, so it is never
/// compared with another clock). This worker's own, of a session whose connection dropped, may
/// hold the slot until the next session ends it; so may one of a worker gone the same way
/// (this worker's predecessor, restarted with a new id), whose `reply_time` changes no more;
/// its slot creation or SQL peek makes the slot active from a client backend, not a walsender.
/// A role that may not see walsenders' details (neither `pg_read_all_stats` nor superuser:
/// `state` reads NULL) counts every other walsender.
async fn slot_streamed_elsewhere(
    c: &Client,
    slot: &str,
    ours: &str,
    holder: &mut Option<HolderReplies>,
) -> Elsewhere {
    let seen = c
        .query_opt(
            &format!(
                "SELECT {WALSENDER_COLUMNS}, r.state IS NULL,
                        (extract(epoch FROM r.reply_time) * 1000000)::int8
                   FROM pg_catalog.pg_replication_slots s
                   JOIN pg_catalog.pg_stat_replication r ON r.pid = s.active_pid
                  WHERE s.slot_name = $1 AND r.application_name IS DISTINCT FROM $2"
            ),
            &[&slot, &ours],
        )
        .await;
    let Ok(Some(row)) = seen else {
        *holder = None;
        return Elsewhere::No;
    };
    let walsender = Walsender::from_row(&row, 0);
    let (hidden, reply): (bool, Option<i64>) = (row.get(2), row.get(3));
    if hidden {
        *holder = None;
        return Elsewhere::Streams;
    }
    let replies = HolderReplies::observe(holder, walsender, reply);
    match (
        replies.heard(),
        replies.silent_for() < STREAMING_REPLIED_WITHIN,
    ) {
        (true, true) => Elsewhere::Streams,
        (false, true) => Elsewhere::Unheard,
        (_, false) => Elsewhere::No,
    }
}

/// The `application_name` of this worker's federation lock session: its replication
/// connections' (`pg_sync_worker` and the worker's id) and ` federation`.
fn lock_session_name(replication_name: &str) -> String {
    format!("{replication_name} federation")
}

/// When the federation lock is held by a session of this worker's own (`name`) other than
/// `asking`: one whose connection dropped without the server noticing (it would hold the lock
/// until TCP keepalive ends it), ends it. True when one was signalled. The worker's own
/// sessions run as its role, so no privilege beyond that is needed.
async fn end_own_lock_session(asking: &Client, name: &str) -> bool {
    let ended = asking
        .query_one(
            // pg_sync's lock (pg_sync/src/leader.rs): classid 0x70675f73, objid 0x796e6366.
            "SELECT coalesce(bool_or(pg_catalog.pg_terminate_backend(a.pid)), false)
               FROM pg_catalog.pg_locks l JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid
              WHERE l.locktype = 'userlock' AND l.granted
                AND l.database = (SELECT oid FROM pg_catalog.pg_database
                                   WHERE datname = pg_catalog.current_database())
                AND l.classid = '1885822835'::oid AND l.objid = '2037277542'::oid
                AND a.application_name = $1 AND a.pid <> pg_catalog.pg_backend_pid()",
            &[&name],
        )
        .await
        .map(|r| r.get::<_, bool>(0));
    match ended {
        Ok(true) => {
            tracing::warn!("federation: the federation lock is held by this worker's own earlier session (its connection dropped); ending it");
            true
        }
        Ok(false) => false,
        Err(e) => {
            tracing::warn!(error = %e, "federation: cannot end this worker's own earlier lock session");
            false
        }
    }
}

/// Why this worker stands by.
enum Standby {
    /// It led, and another worker has streamed the slot for `LEAD_WITHOUT_SLOT`.
    HandOver,
    /// Another worker streams the slot: this one does not ask for the lock.
    SlotStreamed,
    /// Another worker holds the federation lock.
    LockTaken,
}

/// Stands this worker by: the `standby` event (peer `(self)`, `pid`, and `reason` `slot` when
/// another worker streams the slot), recorded and logged once per stretch of standing by.
async fn stand_by(c: &Client, standing_by: &mut bool, why: Standby) {
    if std::mem::replace(standing_by, true) {
        return;
    }
    let pid = std::process::id();
    let detail = match why {
        Standby::HandOver => {
            tracing::warn!("federation: another worker streams the replication slot; handing the links over to it");
            json!({"pid": pid, "reason": "slot"})
        }
        Standby::SlotStreamed => {
            tracing::warn!("federation: another worker streams the replication slot of this database; standing by");
            json!({"pid": pid, "reason": "slot"})
        }
        Standby::LockTaken => {
            tracing::warn!(
                "federation: another worker runs the links of this database; standing by"
            );
            json!({"pid": pid})
        }
    };
    event(c, "(self)", "standby", detail).await;
}

/// Stops every link task and waits for them (their sessions close).
async fn stop_all(running: &mut HashMap<String, Running>) {
    for (_, link) in running.drain() {
        let _ = link.stop.send(true);
        let _ = link.task.await;
    }
}

enum Outcome {
    /// Reconnect after the backoff; `progressed`: the session authenticated (reset backoff).
    Retry { progressed: bool },
    /// Stopped, removed, shutting down, or invalidated: the task ends.
    Stop,
}

async fn link(app: Arc<App>, name: String, mut stop: watch::Receiver<bool>) {
    let mut backoff = BACKOFF_MIN;
    // During a rotation the peer may not know our new secret yet: after a refusal, the next
    // attempt proves the previous secret (and the one after, the new one again).
    let mut use_previous = false;
    let mut shutdown = app.shutdown.clone();
    loop {
        let outcome = session(&app, &name, &mut stop, &mut use_previous, false).await;
        metrics::link(&name, "in").closed();
        match outcome {
            Outcome::Stop => return,
            Outcome::Retry { progressed } => {
                if progressed {
                    backoff = BACKOFF_MIN;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// The TLS client configuration for `wss://` peers, built once: the web PKI roots plus the
/// certificates in `SYNC_PEER_CA_FILE`. An unreadable file is logged and leaves the web roots
/// (so a private peer fails to verify, visibly in `last_error`, rather than the worker failing).
fn peer_tls(app: &App) -> Arc<rustls::ClientConfig> {
    static TLS: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    TLS.get_or_init(|| {
        let ca = app.cfg.peer_ca_file.as_deref();
        Arc::new(crate::tls::peer_config(ca).unwrap_or_else(|e| {
            tracing::error!(error = %e, "federation: cannot read SYNC_PEER_CA_FILE; trusting the web PKI roots only");
            crate::tls::peer_config(None).expect("the web PKI roots load")
        }))
    })
    .clone()
}

/// A connection test (`pg_sync.test_peer`) for the request made at `requested_at`: one
/// handshake as the receiver, then hang up. A probe that could not record anything (the
/// database failed mid-way, or the handshake ended before a result) still answers its request,
/// with no result but the error, so it is not retried forever. It answers that request only: a
/// later one (the caller may have changed the peer meanwhile) waits for the next probe.
async fn probe_peer(app: Arc<App>, name: String, requested_at: String) {
    let (_keep, mut stop) = watch::channel(false);
    let mut use_previous = false;
    let _ = session(&app, &name, &mut stop, &mut use_previous, true).await;
    if crate::failpoint::fire("fed_probe_pause_before_finish") {
        tokio::time::sleep(FAILPOINT_PAUSE).await;
    }
    if let Ok(db) = store::connect(&app.cfg.database_url).await {
        let _ = db
            .execute(
                "UPDATE pg_sync.peer_probes
                    SET checked_at = $2::timestamptz, reachable = NULL, auth_ok = NULL, node_id = NULL,
                        proto = NULL, extension_version = NULL, worker_version = NULL, rtt_ms = NULL,
                        clock_offset_ms = NULL, models_sent = NULL, models_compatible = NULL,
                        error = 'the test did not complete'
                  WHERE peer = $1 AND (checked_at IS NULL OR checked_at < $2::timestamptz)",
                &[&name, &requested_at],
            )
            .await;
    }
}

/// Refuses the peer during authentication: an `auth_failed` event (`detail`, never a secret),
/// the link's state with `error`, and a close with `code` and `reason`.
#[allow(clippy::too_many_arguments)]
async fn refuse(
    db: &Client,
    name: &str,
    lane: &str,
    ws: &mut Ws,
    detail: serde_json::Value,
    error: &str,
    code: u16,
    reason: &str,
) {
    auth_failed_event(db, name, detail).await;
    report(
        db,
        name,
        lane,
        state_report("auth_failed", None, Some(error)),
    )
    .await;
    close_ws(ws, code, reason).await;
}

async fn close_ws(ws: &mut Ws, code: u16, reason: &str) {
    let _ = ws
        .close(Some(CloseFrame {
            code: CloseCode::from(code),
            reason: reason.to_owned().into(),
        }))
        .await;
}

/// The next frame, unless the peer is silent (not even a ping) for `wait`: Ok(frame), or
/// Err(why), with a close frame's code if any.
async fn recv(ws: &mut Ws, wait: Duration) -> Result<Frame, (Option<u16>, String)> {
    loop {
        match tokio::time::timeout(wait, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                return Frame::parse(&t).map_err(|e| (None, format!("malformed frame: {e}")))
            }
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            Ok(Some(Ok(Message::Close(Some(f))))) => {
                return Err((Some(f.code.into()), f.reason.to_string()))
            }
            Ok(Some(Ok(_))) => return Err((None, "unexpected frame".into())),
            Ok(Some(Err(e))) => return Err((None, e.to_string())),
            Ok(None) => return Err((None, "connection closed".into())),
            Err(_) => return Err((None, "timed out".into())),
        }
    }
}

fn state_report<'a>(state: &'a str, connected: Option<bool>, error: Option<&'a str>) -> Report<'a> {
    Report {
        state,
        connected,
        peer_last_sync_id: None,
        applied: 0,
        changed: 0,
        last_error: error,
    }
}

/// One connection to the peer: handshake, then (a join and) the stream. `probe_only`: a
/// connection test for `pg_sync.test_peer`, which hangs up after the handshake and reports no
/// link state (its lane is PROBE).
async fn session(
    app: &App,
    name: &str,
    stop: &mut watch::Receiver<bool>,
    use_previous: &mut bool,
    probe_only: bool,
) -> Outcome {
    let retry = Outcome::Retry { progressed: false };
    let lane = if probe_only { PROBE } else { "in" };
    let db = match store::connect(&app.cfg.database_url).await {
        Ok(db) => db,
        Err(e) => {
            tracing::warn!(peer = name, error = %e, "federation: database unavailable");
            return retry;
        }
    };
    // Everything this handshake tests, read in one statement as of `as_of` (its start, on the
    // database's clock). Results carry it as their `checked_at`: a handshake that read the
    // peer's configuration before a test_peer request never answers that request, however
    // late it records (the caller may have changed the peer in between). A request's
    // requested_at is its transaction's start, before it commits: the request this read saw
    // goes with the results too, and only that one is answered by them.
    let config = db
        .query_opt(
            "SELECT pg_sync.node_id(), p.url, p.node_id, s.secret, s.previous_secret, now()::text,
                    (SELECT q.requested_at::text FROM pg_sync.peer_probes q WHERE q.peer = p.name)
               FROM pg_sync.peers p JOIN pg_sync.peer_secrets s ON s.peer = p.name
              WHERE p.name = $1",
            &[&name],
        )
        .await;
    let (me, url, pinned, secret, previous, as_of, seen): (
        String,
        String,
        Option<String>,
        String,
        Option<String>,
        String,
        Option<String>,
    ) = match config {
        Ok(Some(row)) => (
            row.get(0),
            row.get(1),
            row.get(2),
            row.get(3),
            row.get(4),
            row.get(5),
            row.get(6),
        ),
        Ok(None) => return Outcome::Stop,
        Err(_) => return retry,
    };
    let record_probe = |result| probe(&db, name, &as_of, seen.as_deref(), result);
    report(
        &db,
        name,
        lane,
        state_report("connecting", Some(false), None),
    )
    .await;
    let endpoint = format!("{}{PATH}", url.trim_end_matches('/'));
    let mut ws = match tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        tokio_tungstenite::connect_async_tls_with_config(
            endpoint.as_str(),
            Some(
                // One frame is one or more whole source transactions: a large transaction is a
                // large frame (tungstenite's defaults would refuse it forever).
                WebSocketConfig::default()
                    .max_message_size(Some(MAX_FRAME_BYTES))
                    .max_frame_size(Some(MAX_FRAME_BYTES)),
            ),
            true,
            // wss:// verifies the peer's certificate against the web PKI roots and
            // SYNC_PEER_CA_FILE; ws:// stays plain.
            Some(tokio_tungstenite::Connector::Rustls(peer_tls(app))),
        ),
    )
    .await
    {
        Ok(Ok((ws, _))) => ws,
        Ok(Err(e)) => {
            let msg = format!("connect: {e}");
            record_probe(json!({"reachable": false, "error": msg})).await;
            report(
                &db,
                name,
                lane,
                state_report("connecting", None, Some(&msg)),
            )
            .await;
            return retry;
        }
        Err(_) => {
            record_probe(json!({"reachable": false, "error": "connect: timed out"})).await;
            report(
                &db,
                name,
                lane,
                state_report("connecting", None, Some("connect: timed out")),
            )
            .await;
            return retry;
        }
    };
    let (s, sn) = match recv(&mut ws, HANDSHAKE_TIMEOUT).await {
        Ok(Frame::Challenge {
            proto: PROTO,
            node_id,
            nonce,
        }) if auth::valid_nonce(&nonce) => (node_id, nonce),
        other => {
            let msg = format!("expected a challenge: {other:?}");
            record_probe(json!({"reachable": true, "error": msg})).await;
            report(
                &db,
                name,
                lane,
                state_report("connecting", None, Some(&msg)),
            )
            .await;
            close_ws(&mut ws, close::PROTOCOL, "expected challenge").await;
            return retry;
        }
    };
    // Refuses the peer that answered the challenge: the probe's result (with `auth_ok` when
    // known) has the same error as the link's `auth_failed` state.
    let refuse_answered = async |ws: &mut Ws,
                                 auth_ok: Option<bool>,
                                 detail: serde_json::Value,
                                 error: &str,
                                 code: u16,
                                 reason: &str| {
        let mut result = json!({"reachable": true, "node_id": s, "proto": PROTO, "error": error});
        if let Some(ok) = auth_ok {
            result["auth_ok"] = ok.into();
        }
        record_probe(result).await;
        refuse(&db, name, lane, ws, detail, error, code, reason).await;
    };
    if s == me {
        refuse_answered(
            &mut ws,
            None,
            json!({"direction": "in", "node_id": s, "reason": "self_link"}),
            "self-link: the peer has this node's node id",
            close::FORBIDDEN,
            "self-link",
        )
        .await;
        return retry;
    }
    if let Some(p) = pinned.as_deref().filter(|p| *p != s) {
        refuse_answered(
            &mut ws,
            None,
            json!({"direction": "in", "node_id": s, "pinned": p, "reason": "node_id_mismatch"}),
            "the peer's node id differs from the pinned one",
            close::FORBIDDEN,
            "node id differs from the pinned one",
        )
        .await;
        return retry;
    }
    let rn = auth::nonce();
    let proving = match previous.as_ref().filter(|_| *use_previous) {
        Some(p) => p,
        None => &secret,
    };
    let hello = Frame::Auth {
        node_id: me.clone(),
        nonce: rn.clone(),
        mac: auth::mac(proving, auth::RECEIVER_TAG, &me, &s, &sn, &rn),
    };
    let (sent_at, sent_wall) = (Instant::now(), wall_ms());
    if ws.send(Message::text(hello.to_text())).await.is_err() {
        return retry;
    }
    let (epoch, head) = match recv(&mut ws, HANDSHAKE_TIMEOUT).await {
        Ok(Frame::Welcome {
            mac,
            epoch,
            last_sync_id,
            info,
        }) => {
            let rtt_ms = sent_at.elapsed().as_secs_f64() * 1000.0;
            let proved = [Some(secret), previous]
                .into_iter()
                .flatten()
                .any(|k| auth::verify(&k, auth::SENDER_TAG, &me, &s, &sn, &rn, &mac));
            if !proved {
                refuse_answered(
                    &mut ws,
                    Some(false),
                    json!({"direction": "in", "node_id": s, "reason": "peer_bad_mac"}),
                    "the peer failed to prove the shared secret",
                    close::AUTH_FAILED,
                    "authentication failed",
                )
                .await;
                return retry;
            }
            // The peer's clock read at about the middle of the round trip.
            let info = info.unwrap_or_default();
            let offset = info["time_ms"]
                .as_f64()
                .map(|t| t - (sent_wall + rtt_ms / 2.0));
            if !probe_only && crate::failpoint::fire("fed_link_pause_before_probe_record") {
                tokio::time::sleep(FAILPOINT_PAUSE).await;
            }
            record_probe(
                json!({"reachable": true, "auth_ok": true, "node_id": s, "proto": PROTO,
                       "extension_version": info["extension_version"],
                       "worker_version": info["worker_version"], "rtt_ms": rtt_ms,
                       "clock_offset_ms": offset, "models_sent": info["models"]}),
            )
            .await;
            if probe_only {
                close_ws(&mut ws, 1000, "connection test").await;
                return Outcome::Stop;
            }
            (epoch, last_sync_id)
        }
        Err((Some(code), reason)) if code == close::AUTH_FAILED || code == close::FORBIDDEN => {
            if code == close::AUTH_FAILED {
                *use_previous = !*use_previous && previous.is_some();
            }
            auth_failed_event(
                &db,
                name,
                json!({"direction": "in", "node_id": s, "reason": "refused_by_peer", "code": code, "message": reason}),
            )
            .await;
            let msg = format!("refused by the peer ({code}): {reason}");
            report(
                &db,
                name,
                lane,
                state_report("auth_failed", None, Some(&msg)),
            )
            .await;
            // 4502: the peer verified our secret, then refused (direction, node id).
            record_probe(
                json!({"reachable": true, "auth_ok": code == close::FORBIDDEN, "node_id": s,
                       "proto": PROTO, "error": msg}),
            )
            .await;
            return retry;
        }
        other => {
            let msg = format!("expected welcome: {other:?}");
            report(
                &db,
                name,
                lane,
                state_report("connecting", None, Some(&msg)),
            )
            .await;
            return retry;
        }
    };
    if let Err(e) = db
        .execute("SELECT pg_sync.pin_peer($1, $2)", &[&name, &s])
        .await
    {
        let msg = e
            .as_db_error()
            .map_or_else(|| e.to_string(), |d| d.message().to_owned());
        refuse(
            &db,
            name,
            lane,
            &mut ws,
            json!({"direction": "in", "node_id": s, "reason": msg}),
            &msg,
            close::FORBIDDEN,
            "node id refused",
        )
        .await;
        return retry;
    }
    // Join by snapshot when the peer is new here (bootstrap 'snapshot'), must resync, or a
    // join is in progress; otherwise stream from the cursor.
    let cursor = db
        .query_one(
            "SELECT c.last_sync_id, c.peer_epoch,
                    j.peer_node_id IS NOT NULL OR c.state = 'resync_required'
                      OR (c.peer_node_id IS NULL AND p.bootstrap = 'snapshot'),
                    CASE WHEN j.peer_epoch = $2 THEN j.w END
               FROM pg_sync.peers p
               LEFT JOIN pg_sync.peer_cursors c ON c.peer_node_id = $1
               LEFT JOIN pg_sync.peer_joins j ON j.peer_node_id = $1
              WHERE p.name = $3",
            &[&s, &epoch, &name],
        )
        .await;
    let (after, cursor_epoch, joining, resume_w): (Option<i64>, Option<String>, bool, Option<i64>) =
        match cursor {
            Ok(row) => (row.get(0), row.get(1), row.get(2), row.get(3)),
            Err(_) => return retry,
        };
    let after = if joining {
        match join(&db, &mut ws, name, &epoch, resume_w).await {
            Ok(w) => w,
            Err(msg) => {
                tracing::warn!(peer = name, error = %msg, "federation: snapshot join interrupted");
                report(
                    &db,
                    name,
                    "in",
                    state_report("bootstrapping", Some(false), Some(&msg)),
                )
                .await;
                return Outcome::Retry { progressed: true };
            }
        }
    } else {
        if cursor_epoch.as_deref().is_some_and(|e| e != epoch) {
            return invalidated(&db, &mut ws, name, cursor_epoch.as_deref(), &epoch).await;
        }
        after.unwrap_or(0)
    };
    let sub = Frame::Subscribe {
        after,
        window: WINDOW,
    };
    if ws.send(Message::text(sub.to_text())).await.is_err() {
        return retry;
    }
    tracing::info!(peer = name, node_id = %s, after, head, "federation: receiving");
    event(
        &db,
        name,
        "connected",
        json!({"direction": "in", "node_id": s, "after": after}),
    )
    .await;
    let l = metrics::link(name, "in");
    l.up.set(1);
    l.lag_actions.set((head - after).max(0));
    let mut state = if head > after {
        "catching_up"
    } else {
        "streaming"
    };
    report(
        &db,
        name,
        "in",
        Report {
            state,
            connected: Some(true),
            peer_last_sync_id: Some(head),
            applied: 0,
            changed: 0,
            last_error: None,
        },
    )
    .await;
    let progressed = Outcome::Retry { progressed: true };
    let mut shutdown = app.shutdown.clone();
    let (mut applied, mut changed, mut head) = (0i64, 0i64, head);
    let mut reported = Instant::now();
    loop {
        let frame = tokio::select! {
            // The sender pings every 10 s: a silent minute means a dead connection.
            f = recv(&mut ws, LIVENESS) => f,
            _ = stop.changed() => {
                close_ws(&mut ws, close::PEER_GONE, "peer removed or disabled on the receiver").await;
                return Outcome::Stop;
            }
            _ = shutdown.changed() => {
                close_ws(&mut ws, close::GOING_AWAY, "receiver shutting down").await;
                report(&db, name, "in", state_report("connecting", Some(false), Some("receiver shut down"))).await;
                return Outcome::Stop;
            }
        };
        match frame {
            Ok(Frame::Batch {
                from,
                to,
                epoch: batch_epoch,
                last_sync_id,
                changes,
            }) => {
                // First-hop changes (minted by the peer itself) measure write-to-apply delay.
                let minted: Vec<f64> = versions(changes.get())
                    .iter()
                    .filter_map(|v| metrics::minted_ms(v.as_deref()?, &s))
                    .collect();
                // Applied as the text that came: rows may nest deeper than serde_json parses.
                let changes = changes.get();
                crate::failpoint::crash("fed_crash_before_apply");
                let started = Instant::now();
                let res = db
                    .query_one(
                        "SELECT pg_sync.apply_peer_batch($1, $2, $3, $4, $5::text::jsonb)::text",
                        &[&name, &batch_epoch, &from, &to, &changes],
                    )
                    .await;
                let took = started.elapsed().as_secs_f64();
                l.applied(changes.len(), took, &res);
                match res {
                    Ok(row) => {
                        // Committed (autocommit): now it may be acknowledged.
                        crate::failpoint::crash("fed_crash_after_commit");
                        let answer: serde_json::Value =
                            serde_json::from_str(&row.get::<_, String>(0)).unwrap_or_default();
                        applied += answer["applied"].as_i64().unwrap_or(0);
                        changed += answer["changed"].as_i64().unwrap_or(0);
                        head = head.max(last_sync_id);
                        let now = wall_ms();
                        for ms in &minted {
                            l.observe_delay((now - ms) / 1000.0);
                        }
                        l.batches.inc();
                        l.applied.inc_by(answer["applied"].as_u64().unwrap_or(0));
                        l.changed.inc_by(answer["changed"].as_u64().unwrap_or(0));
                        l.lag_actions.set((head - to).max(0));
                        if ws
                            .send(Message::text(Frame::Ack { to }.to_text()))
                            .await
                            .is_err()
                        {
                            return progressed;
                        }
                        crate::failpoint::crash("fed_crash_after_ack");
                        let now_state = if to >= head {
                            "streaming"
                        } else {
                            "catching_up"
                        };
                        if now_state != state || reported.elapsed() >= REPORT_EVERY {
                            state = now_state;
                            reported = Instant::now();
                            report(
                                &db,
                                name,
                                "in",
                                Report {
                                    state,
                                    connected: None,
                                    peer_last_sync_id: Some(head),
                                    applied,
                                    changed,
                                    last_error: None,
                                },
                            )
                            .await;
                            (applied, changed) = (0, 0);
                        }
                    }
                    Err(e) if sqlstate(&e) == Some("PS001") => {
                        // A gap: the sender skipped ahead of our cursor; re-subscribe from it.
                        event(&db, name, "gap", json!({"from": from, "to": to})).await;
                        close_ws(&mut ws, 1000, "gap; re-subscribing").await;
                        return progressed;
                    }
                    Err(e) if sqlstate(&e) == Some("PS002") => {
                        return invalidated(
                            &db,
                            &mut ws,
                            name,
                            cursor_epoch.as_deref(),
                            &batch_epoch,
                        )
                        .await;
                    }
                    Err(e) => {
                        let msg = e.as_db_error().map_or_else(
                            || e.to_string(),
                            |d| format!("{}: {}", d.code().code(), d.message()),
                        );
                        tracing::warn!(peer = name, error = %msg, "federation: applying a batch failed");
                        report(&db, name, "in", state_report("stalled", None, Some(&msg))).await;
                        close_ws(&mut ws, close::INTERNAL, "apply failed; retrying").await;
                        return progressed;
                    }
                }
            }
            Ok(Frame::Error { code, message }) => {
                if code == "resync_required" {
                    event(
                        &db,
                        name,
                        "resync_required",
                        json!({"direction": "in", "after": after}),
                    )
                    .await;
                    // Re-bootstrap by snapshot: the link restarts and joins (writes made here
                    // meanwhile stay: the merge is a join).
                    if let Err(e) = db.execute("SELECT pg_sync.resync_peer($1)", &[&name]).await {
                        tracing::warn!(peer = name, error = %e, "federation: cannot start a resync");
                    }
                }
                let msg = format!("{code}: {message}");
                // The sender no longer holds the log after our cursor: only a re-bootstrap
                // (resync_peer) moves this link again, so say so rather than "stalled".
                let state = if code == "resync_required" {
                    "resync_required"
                } else {
                    "stalled"
                };
                report(
                    &db,
                    name,
                    "in",
                    state_report(state, Some(false), Some(&msg)),
                )
                .await;
                return retry;
            }
            Ok(other) => {
                let msg = format!("unexpected frame {other:?}");
                close_ws(&mut ws, close::PROTOCOL, "unexpected frame").await;
                report(
                    &db,
                    name,
                    "in",
                    state_report("connecting", Some(false), Some(&msg)),
                )
                .await;
                return progressed;
            }
            Err((code, reason)) => {
                let msg = match code {
                    Some(c) => format!("closed by the peer ({c}): {reason}"),
                    None => reason,
                };
                report(
                    &db,
                    name,
                    "in",
                    state_report("connecting", Some(false), Some(&msg)),
                )
                .await;
                return progressed;
            }
        }
    }
}

/// The `version` of each change in a batch's `changes` (None where it has none), read
/// without making a tree of the rows (their other fields are skipped at any depth).
fn versions(changes: &str) -> Vec<Option<String>> {
    #[derive(serde::Deserialize)]
    struct Change {
        version: Option<String>,
    }
    serde_json::from_str::<Vec<Change>>(changes)
        .map(|cs| cs.into_iter().map(|c| c.version).collect())
        .unwrap_or_default()
}

/// Rows per snapshot page a receiver asks for.
const SNAPSHOT_PAGE: u32 = 1000;

/// Joins the peer by snapshot on an authenticated link: asks for W (resuming `resume_w`, the
/// W of our join in progress, if the peer still holds its log), then merges the peer's state
/// page by page, each page committed with the join's position (`apply_peer_snapshot`), and
/// finally moves the cursors (`finish_peer_join`). Returns W, where the log continues.
async fn join(
    db: &Client,
    ws: &mut Ws,
    name: &str,
    epoch: &str,
    resume_w: Option<i64>,
) -> Result<i64, String> {
    report(
        db,
        name,
        "in",
        state_report("bootstrapping", Some(true), None),
    )
    .await;
    let ask = Frame::Join { resume_w };
    ws.send(Message::text(ask.to_text()))
        .await
        .map_err(|e| e.to_string())?;
    let (w, cursors) = match recv(ws, LIVENESS).await {
        Ok(Frame::JoinStart {
            w,
            epoch: e,
            cursors,
        }) if e == epoch => (w, cursors),
        other => return Err(format!("expected join_start: {other:?}")),
    };
    let pos = db
        .query_one(
            "SELECT pg_sync.begin_peer_join($1, $2, $3, $4::text::jsonb)::text",
            &[&name, &epoch, &w, &cursors.to_string()],
        )
        .await
        .map_err(|e| db_text(&e))?;
    let pos: serde_json::Value = serde_json::from_str(&pos.get::<_, String>(0)).unwrap_or_default();
    let (mut model, mut model_id) = (
        pos["after_model"].as_str().unwrap_or_default().to_owned(),
        pos["after_model_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    );
    tracing::info!(
        peer = name,
        w,
        resumed = pos["resumed"].as_bool(),
        "federation: joining by snapshot"
    );
    loop {
        let ask = Frame::Snapshot {
            after_model: model.clone(),
            after_model_id: model_id.clone(),
            limit: SNAPSHOT_PAGE,
        };
        ws.send(Message::text(ask.to_text()))
            .await
            .map_err(|e| e.to_string())?;
        let (rows, done) = match recv(ws, LIVENESS).await {
            Ok(Frame::SnapshotPage { rows, done }) => (rows, done),
            other => return Err(format!("expected snapshot_page: {other:?}")),
        };
        let rows = rows.get();
        let started = Instant::now();
        let res = db
            .query_one(
                "SELECT pg_sync.apply_peer_snapshot($1, $2, $3, $4, $5::text::jsonb)::text",
                &[&name, &w, &model, &model_id, &rows],
            )
            .await;
        let took = started.elapsed().as_secs_f64();
        metrics::link(name, "in").applied(rows.len(), took, &res);
        let answer: serde_json::Value = match res {
            Ok(row) => serde_json::from_str(&row.get::<_, String>(0)).unwrap_or_default(),
            Err(e) => return Err(db_text(&e)),
        };
        model = answer["after_model"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        model_id = answer["after_model_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if done {
            break;
        }
    }
    db.execute("SELECT pg_sync.finish_peer_join($1, $2)", &[&name, &w])
        .await
        .map_err(|e| db_text(&e))?;
    Ok(w)
}

/// The sender's log identity changed (restored, replaced): its sync ids may repeat, so the
/// link stops (`invalidated`) until the peer is re-added or re-bootstrapped.
async fn invalidated(
    db: &Client,
    ws: &mut Ws,
    name: &str,
    ours: Option<&str>,
    theirs: &str,
) -> Outcome {
    event(
        db,
        name,
        "epoch_changed",
        json!({"cursor_epoch": ours, "peer_epoch": theirs}),
    )
    .await;
    report(
        db,
        name,
        "in",
        state_report(
            "invalidated",
            Some(false),
            Some("the peer's log epoch changed: re-bootstrap (remove and add the peer)"),
        ),
    )
    .await;
    close_ws(ws, 1000, "epoch changed").await;
    Outcome::Stop
}

/// `retry_quarantined` for every pulled peer with parked changes.
async fn retry_quarantined(db: &Client) {
    let res = db
        .query(
            "SELECT p.name, pg_sync.retry_quarantined(p.name)
               FROM pg_sync.peers p
              WHERE p.enabled AND p.direction IN ('pull', 'both')
                AND EXISTS (SELECT 1 FROM pg_sync.peer_quarantine q WHERE q.peer_node_id = p.node_id)",
            &[],
        )
        .await;
    match res {
        Ok(rows) => {
            for r in rows {
                let (peer, left): (String, i64) = (r.get(0), r.get(1));
                tracing::info!(peer, left, "federation: retried quarantined changes");
            }
        }
        Err(e) => tracing::warn!(error = %e, "federation: retrying quarantined changes failed"),
    }
}
