//! Federation links, the worker's part: the sender endpoint `GET /federation/v1/ws` (`send`),
//! the receiver tasks that dial each pulled peer and apply its log (`link`), the frames and the
//! HMAC handshake. The extension holds the registry, cursors and apply (docs/federation.md).

pub mod auth;
pub mod frames;
pub mod link;
pub mod metrics;
pub mod send;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio_postgres::Client;

/// Where a sender serves links, on the worker's listener.
pub const PATH: &str = "/federation/v1/ws";

/// The lane of a connection test (`pg_sync.test_peer`): it reports no link state.
pub const PROBE: &str = "probe";

/// How often the registry is read (removal or disable closes a link within about this).
pub const REGISTRY_POLL: Duration = Duration::from_millis(500);

/// The holder of the federation lock (per database, `pg_sync.try_federation_lock()`: pg_sync's
/// own lock, not in the application's advisory-lock keys) runs federation: one worker per
/// database sends and receives; a second one started against the same database stands by (no
/// links, its sender endpoint refuses with 4506) and takes over when the holder's session ends.
/// These are the databases (by URL) whose federation lock this process holds.
static LEADING: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Whether this process runs federation for `database_url` (holds the federation lock).
pub fn leading(database_url: &str) -> bool {
    LEADING
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .any(|u| u == database_url)
}

pub(crate) fn set_leading(database_url: &str, on: bool) {
    let mut g = LEADING.lock().unwrap_or_else(|p| p.into_inner());
    g.retain(|u| u != database_url);
    if on {
        g.push(database_url.to_owned());
    }
}

/// Records a `peer_events` row. Never pass secrets or row values in `detail`.
pub async fn event(db: &Client, peer: &str, event: &str, detail: serde_json::Value) {
    if let Err(e) = db
        .execute(
            "INSERT INTO pg_sync.peer_events (peer, event, detail) VALUES ($1, $2, $3::text::jsonb)",
            &[&peer, &event, &detail.to_string()],
        )
        .await
    {
        tracing::warn!(peer, event, error = %e, "could not record a peer event");
    }
}

/// Auth failures are recorded at most once per `AUTH_EVENT_EVERY` per peer, direction and
/// reason (and logged every
/// time), so a misconfigured or hostile dialer cannot flood `peer_events`.
const AUTH_EVENT_EVERY: Duration = Duration::from_secs(5);
static AUTH_EVENTS: Mutex<Option<HashMap<String, Instant>>> = Mutex::new(None);

pub async fn auth_failed_event(db: &Client, peer: &str, detail: serde_json::Value) {
    tracing::warn!(peer, %detail, "federation link authentication failed");
    let direction = if detail["direction"] == "in" {
        "in"
    } else {
        "out"
    };
    metrics::link(peer, direction).auth_failures.inc();
    // Per peer, direction and reason: one kind of failure must not hide another.
    let key = format!("{peer}\n{direction}\n{}", detail["reason"]);
    let due = {
        let mut g = AUTH_EVENTS.lock().unwrap_or_else(|p| p.into_inner());
        let map = g.get_or_insert_with(HashMap::new);
        let now = Instant::now();
        match map.get(&key) {
            Some(t) if now.duration_since(*t) < AUTH_EVENT_EVERY => false,
            _ => {
                map.insert(key, now);
                true
            }
        }
    };
    if due {
        event(db, peer, "auth_failed", detail).await;
    }
}

/// What a link reports into `pg_sync.peer_links`.
pub struct Report<'a> {
    pub state: &'a str,
    /// Some(true): connected now (connected_since = now()); Some(false): not connected.
    pub connected: Option<bool>,
    pub peer_last_sync_id: Option<i64>,
    pub applied: i64,
    pub changed: i64,
    pub last_error: Option<&'a str>,
}

/// Upserts the link's row (direction `in` or `out`); a removed peer's row cannot be written
/// (the foreign key), which is fine: the link is closing.
pub async fn report(db: &Client, peer: &str, direction: &str, r: Report<'_>) {
    if direction == PROBE {
        return;
    }
    let connected: Option<bool> = r.connected;
    let res = db
        .execute(
            "INSERT INTO pg_sync.peer_links AS l (peer, direction, state, connected_since,
                    peer_last_sync_id, applied, changed, last_error, updated_at)
             VALUES ($1, $2, $3, CASE WHEN $4::boolean THEN now() END, $5, $6, $7, $8, now())
             ON CONFLICT (peer, direction) DO UPDATE SET
                 state = EXCLUDED.state,
                 connected_since = CASE WHEN $4::boolean IS NULL THEN l.connected_since
                                        ELSE EXCLUDED.connected_since END,
                 peer_last_sync_id = coalesce(EXCLUDED.peer_last_sync_id, l.peer_last_sync_id),
                 applied = l.applied + EXCLUDED.applied,
                 changed = l.changed + EXCLUDED.changed,
                 last_error = CASE WHEN EXCLUDED.state IN ('streaming', 'catching_up') AND $8 IS NULL
                                   THEN NULL ELSE coalesce($8, l.last_error) END,
                 updated_at = now()",
            &[
                &peer,
                &direction,
                &r.state,
                &connected,
                &r.peer_last_sync_id,
                &r.applied,
                &r.changed,
                &r.last_error,
            ],
        )
        .await;
    if let Err(e) = res {
        tracing::debug!(peer, direction, error = %e, "could not report link state");
    }
}

/// This node's id and log epoch.
pub async fn identity(db: &Client) -> Result<(String, String), tokio_postgres::Error> {
    let row = db
        .query_one("SELECT pg_sync.node_id(), pg_sync.epoch()", &[])
        .await?;
    Ok((row.get(0), row.get(1)))
}

pub use crate::store::db_text;

/// The SQLSTATE of a database error, if it is one.
pub fn sqlstate(e: &tokio_postgres::Error) -> Option<&str> {
    e.as_db_error().map(|d| d.code().code())
}

/// Wall-clock milliseconds since the epoch (for the clock offset `test_peer` reports).
pub fn wall_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// Records a handshake's outcome for `pg_sync.test_peer` (`pg_sync.record_peer_probe`).
/// `checked_at`: when the handshake read the configuration it tested (the database's clock),
/// which decides the requests it answers and whether it replaces the recorded result;
/// `requested_at`: the test_peer request that read saw (only that one is answered).
pub async fn probe(
    db: &Client,
    peer: &str,
    checked_at: &str,
    requested_at: Option<&str>,
    mut result: serde_json::Value,
) {
    result["checked_at"] = serde_json::Value::from(checked_at);
    result["requested_at"] = serde_json::Value::from(requested_at);
    if let Err(e) = db
        .execute(
            "SELECT pg_sync.record_peer_probe($1, $2::text::jsonb)",
            &[&peer, &result.to_string()],
        )
        .await
    {
        tracing::debug!(peer, error = %e, "could not record a probe");
    }
}
