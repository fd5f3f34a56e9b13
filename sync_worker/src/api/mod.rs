//! The HTTP side: one port for `WS /sync/ws`, `GET /healthz` and `GET /metrics`.

pub mod admission;
pub mod bootstrap;
pub mod http;
pub mod mutate;
pub mod penalty;
pub mod row_json;
pub mod shape;
pub mod stream;
pub mod ws;

use crate::auth::Verifier;
use crate::config::Config;
use crate::hub::Hub;
use crate::protocol::ErrorCode;
use crate::replication::sequencer::Status;
use crate::store::Db;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::watch;

pub struct App {
    pub cfg: Arc<Config>,
    pub hub: Arc<Hub>,
    pub status: Arc<Status>,
    pub verifier: Verifier,
    pub db: Db,
    pub shutdown: watch::Receiver<bool>,
    pub counters: Counters,
    /// Bootstraps streaming at once (each holds a database connection and a snapshot).
    pub bootstrap_slots: Arc<tokio::sync::Semaphore>,
    /// Turns to read a page of the log for a client (`admission`): replay's bounded share.
    pub replay: admission::Admission,
    /// Users whose session was closed for malformed messages, refused new sessions a while.
    pub penalties: penalty::Penalties,
    /// API keys the database did not know (a repeated bad key costs no query).
    pub unknown_keys: crate::auth::UnknownKeys,
    /// `/v1/shape`'s own connections.
    pub shape: shape::Shared,
    /// Upgraded WebSocket sessions: they outlive their HTTP connection's task, so the drain at
    /// shutdown waits for them here (each sends its close frame, "resume after N").
    pub sessions: tokio_util::task::TaskTracker,
}

/// What the client API has done, for `/metrics`.
#[derive(Default)]
pub struct Counters {
    pub bootstraps: std::sync::atomic::AtomicU64,
    pub bootstrap_rows: std::sync::atomic::AtomicU64,
    pub mutate_applied: std::sync::atomic::AtomicU64,
    pub mutate_duplicate: std::sync::atomic::AtomicU64,
    pub mutate_rejected: std::sync::atomic::AtomicU64,
}

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/sync/ws", get(ws::upgrade))
        .route("/sync/deltas", get(http::deltas))
        .route(
            "/sync/bootstrap",
            get(bootstrap::bootstrap).layer(
                // Fastest: a bootstrap is large and the worker's CPU is shared.
                tower_http::compression::CompressionLayer::new()
                    .gzip(true)
                    .quality(tower_http::CompressionLevel::Fastest),
            ),
        )
        .route("/sync/sse", get(http::sse))
        .route(
            "/sync/mutate",
            axum::routing::post(mutate::mutate)
                .options(mutate::preflight)
                .layer(axum::extract::DefaultBodyLimit::max(mutate::MAX_BODY))
                .layer(axum::middleware::from_fn_with_state(
                    app.clone(),
                    mutate::with_cors,
                )),
        )
        .route(
            crate::federation::PATH,
            get(crate::federation::send::upgrade),
        )
        .route("/v1/shape", get(shape::shape).options(shape::preflight))
        .route("/healthz", get(healthz))
        .route("/demo", get(demo))
        .route("/demo.js", get(demo_js))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            error(
                ErrorCode::NotFound,
                "no such endpoint (see docs/protocol.md)",
            )
        })
        .method_not_allowed_fallback(|| async {
            error(
                ErrorCode::MethodNotAllowed,
                "this endpoint does not take that method",
            )
        })
        .with_state(app)
}

/// Who a request acts for: the user, the API key it used (if any), and when its JWT expires
/// (a session must not outlive it).
pub struct Identity {
    pub user: String,
    pub key: Option<String>,
    /// The API key's stored hash (with `key`).
    pub key_hash: Option<Vec<u8>>,
    pub expires: Option<std::time::SystemTime>,
    /// The API key was found in the hub's cache of valid keys, not in the database: a write
    /// confirms it there first (`HeldKey::valid`), since a revocation reaches the cache only
    /// through the replication stream, moments after it commits.
    pub cached: bool,
    /// When the API key was checked (the cache's generation then).
    pub checked: Option<crate::auth::Ticket>,
}

impl Identity {
    /// The API key this request authenticated with, to check later that it still does.
    pub fn held_key(&self) -> Option<HeldKey> {
        Some(HeldKey {
            id: self.key.clone()?,
            user: self.user.clone(),
            hash: self.key_hash.clone()?,
            checked: self.checked,
        })
    }
}

/// An API key as a session authenticated with it. A session that missed the replication
/// stream's word on its key (a lagged receiver) asks the database whether the key still
/// authenticates it: the same id, hash and user. The id alone would keep a key that was moved
/// to another user (or re-hashed) streaming the first user's data. Keys have no expiry.
#[derive(Clone, Debug)]
pub struct HeldKey {
    /// `pg_sync.api_keys.id`.
    pub id: String,
    pub user: String,
    pub hash: Vec<u8>,
    /// When the request checked it (`Identity::checked`).
    pub checked: Option<crate::auth::Ticket>,
}

impl HeldKey {
    pub async fn valid(&self, app: &App) -> Result<bool, String> {
        let db = app.db.get().await.map_err(|e| e.to_string())?;
        db.query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_sync.api_keys
                             WHERE id::text = $1 AND user_id = $2 AND key_hash = $3)",
            &[&self.id, &self.user, &self.hash],
        )
        .await
        .map(|r| r.get(0))
        .map_err(|e| e.to_string())
    }

    /// `valid` before a write under the key (`/sync/mutate` with a cached key, a WebSocket
    /// `mutate`): the refusal when the key is gone or cannot be checked now. The write's own
    /// transaction checks the key again (`store::mutate_with_key_statement`, its row locked
    /// `FOR KEY SHARE`): that one closes the race with a revocation (a revoked key gets the same
    /// 401 / close 4401 from it alone); this one says why when the key cannot be checked (a lock
    /// on `pg_sync.api_keys` past the `lock_timeout`) before any transaction of the batch runs:
    /// the write's own check would fail as "database unavailable" while preparing its
    /// statement, or answer each transaction `rejected` once the statement is prepared.
    pub async fn confirm(&self, app: &App) -> Result<(), Refusal> {
        match self.valid(app).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(Refusal::key_revoked()),
            Err(_) => Err(Refusal::key_unchecked()),
        }
    }
}

impl axum::extract::FromRequestParts<Arc<App>> for Identity {
    type Rejection = Refusal;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        app: &Arc<App>,
    ) -> Result<Self, Refusal> {
        let query =
            axum::extract::Query::<std::collections::HashMap<String, String>>::try_from_uri(
                &parts.uri,
            )
            .map(|q| q.0)
            .unwrap_or_default();
        authenticate(app, &parts.headers, &query).await
    }
}

/// Authenticates a request from `Authorization: Bearer …` or `?token=`: a JWT, or an API key
/// (`pgs_…`). Refusals are 401 (503 when the key cannot be checked).
pub async fn authenticate(
    app: &App,
    headers: &axum::http::HeaderMap,
    query: &std::collections::HashMap<String, String>,
) -> Result<Identity, Refusal> {
    let token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned)
        .or_else(|| query.get("token").cloned());
    let Some(token) = token else {
        return Err(Refusal::of(
            ErrorCode::MissingToken,
            "send Authorization: Bearer <jwt or api key> or ?token=",
        ));
    };
    if !token.starts_with("pgs_") {
        return match app.verifier.verify(&token) {
            Ok(v) => Ok(Identity {
                user: v.user,
                key: None,
                key_hash: None,
                expires: Some(v.expires),
                cached: false,
                checked: None,
            }),
            Err(e) => Err(Refusal::of(e.code(), &e.to_string())),
        };
    }
    // Strings that cannot be keys, and keys the database just said it does not know, are
    // refused without a query: an unauthenticated flood must not cost the database.
    if !crate::auth::is_api_key_shaped(&token) {
        return Err(Refusal::key_revoked());
    }
    // A key found before and not revoked since needs no lookup: valid keys never wait behind
    // the budget that floods of unknown keys use up.
    let hash = crate::auth::key_hash(&token);
    if let (Some(known), ticket) = app.hub.known_keys.get(&hash) {
        return Ok(Identity {
            user: known.user,
            key: Some(known.id),
            key_hash: Some(hash.to_vec()),
            expires: None,
            cached: true,
            checked: Some(ticket),
        });
    }
    if app.unknown_keys.contains(&token) {
        return Err(Refusal::key_revoked());
    }
    // Distinct well-formed bad keys are bounded by a lookup budget that only found keys give
    // back: past it, no query, and the client is asked to retry.
    let Some(lookup) = app.unknown_keys.begin_lookup().await else {
        return Err(Refusal::of(
            ErrorCode::Busy,
            "too many API key lookups; retry after a second",
        )
        .with_status(StatusCode::TOO_MANY_REQUESTS));
    };
    // Only a lookup that sent no query (no pool connection) gives its token back on failure:
    // a query that failed (a statement timeout, a lost connection) still cost the database.
    let unavailable = |e: String| {
        tracing::warn!(error = %e, "api key lookup failed");
        Err(Refusal::key_unchecked())
    };
    let db = match app.db.get().await {
        Ok(db) => db,
        Err(e) => {
            lookup.found();
            return unavailable(e.to_string());
        }
    };
    // Before the query: a revocation published while it runs keeps its answer out of the cache.
    let ticket = app.hub.known_keys.ticket();
    let found = db
        .query_opt(
            "SELECT user_id, id::text, key_hash FROM pg_sync.api_keys WHERE key_hash = sha256(convert_to($1, 'UTF8'))",
            &[&token],
        )
        .await;
    drop(db);
    match found {
        Ok(Some(row)) => {
            lookup.found();
            let identity = Identity {
                user: row.get(0),
                key: Some(row.get(1)),
                key_hash: Some(row.get(2)),
                expires: None,
                cached: false,
                checked: Some(ticket),
            };
            if crate::failpoint::fire("key_lookup_pause") {
                // Tests: the key is revoked (and that published) while this lookup is in
                // flight, between its "valid" and its insert.
                tokio::time::sleep(std::time::Duration::from_secs(3)).await;
            }
            app.hub.known_keys.insert(
                ticket,
                hash,
                crate::auth::KnownKey {
                    user: identity.user.clone(),
                    id: identity.key.clone().unwrap_or_default(),
                },
            );
            Ok(identity)
        }
        Ok(None) => {
            drop(lookup);
            app.unknown_keys.insert(&token);
            Err(Refusal::key_revoked())
        }
        Err(e) => unavailable(e.to_string()),
    }
}

/// A channel as a response body stream. Fused: a body layer (compression) may poll once
/// more after the end.
pub fn receiver_stream<T>(
    rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = Result<T, std::convert::Infallible>> {
    use futures::StreamExt;
    futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (Ok(item), rx))
    })
    .fuse()
}

/// The answer to a CORS preflight (204) allowing `methods` and the headers asked for
/// (`authorization, content-type` when none are named), cached a day; the caller adds the
/// allowed origin.
pub fn cors_preflight(headers: &axum::http::HeaderMap, methods: &'static str) -> Response {
    use axum::http::{header, HeaderValue};
    let mut response = StatusCode::NO_CONTENT.into_response();
    let requested = headers
        .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
        .cloned()
        .unwrap_or(HeaderValue::from_static("authorization, content-type"));
    let h = response.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static(methods),
    );
    h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, requested);
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("86400"),
    );
    response
}

/// A JSON error body: `{"code": ..., "message": ...}`, with the code's HTTP status.
pub fn error(code: ErrorCode, message: &str) -> Response {
    Refusal::of(code, message).into_response()
}

/// A refused request: what the client sees (status, code, message), nothing internal.
#[derive(Debug)]
pub struct Refusal {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
    /// The request field the refusal is about (`transactions[2].clientTxId`), when known.
    pub field: Option<String>,
}

impl Refusal {
    /// A refusal with `code`'s HTTP status.
    pub fn of(code: ErrorCode, message: &str) -> Refusal {
        Refusal {
            status: code.status(),
            code,
            message: message.to_owned(),
            field: None,
        }
    }

    /// 401 `invalid_api_key`: the API key is unknown, or was revoked (or moved to another user,
    /// or re-hashed).
    pub fn key_revoked() -> Refusal {
        Refusal::of(ErrorCode::InvalidApiKey, "unknown or revoked API key")
    }

    /// 503 `unavailable`: the API key cannot be checked now.
    pub fn key_unchecked() -> Refusal {
        Refusal::of(
            ErrorCode::Unavailable,
            "cannot check the API key now; retry",
        )
    }

    /// A refusal by protocol word (an unknown word is reported as "internal") with its own
    /// status; `of` is the usual form.
    pub fn new(status: StatusCode, code: &str, message: &str) -> Refusal {
        Refusal::of(ErrorCode::parse(code), message).with_status(status)
    }

    /// The same refusal with another status than its code's (`busy` as 429 where the client
    /// itself asks too often).
    pub fn with_status(mut self, status: StatusCode) -> Refusal {
        self.status = status;
        self
    }

    pub fn at(mut self, field: Option<String>) -> Refusal {
        self.field = field;
        self
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut body = serde_json::json!({"code": self.code.as_str(), "message": self.message});
        if let Some(field) = self.field {
            body["field"] = field.into();
        }
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
        }
        response
    }
}

/// The demo page (`make run`): a shared task list that bootstraps, stays live and writes.
async fn demo() -> axum::response::Html<&'static str> {
    axum::response::Html(include_str!("../../static/demo.html"))
}

/// The demo page's script: clients/js/demo/demo.mjs bundled with TanStack DB
/// (scripts/build-demo.sh).
async fn demo_js() -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/javascript; charset=utf-8",
        )],
        include_str!("../../static/demo.js"),
    )
}

async fn healthz(State(app): State<Arc<App>>) -> Response {
    let slot = app
        .status
        .slot_problem
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    if let Some(problem) = slot {
        return error(
            ErrorCode::SlotInvalid,
            &format!("replication slot is {problem}"),
        );
    }
    if !app.status.streaming.load(Ordering::Acquire) {
        return error(ErrorCode::NotStreaming, "replication is not streaming");
    }
    Json(serde_json::json!({"status": "ok", "lastSyncId": app.hub.published()})).into_response()
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let s = &app.status;
    let m = &app.hub.metrics;
    let c = &app.counters;
    let server = s.server_lsn.load(Ordering::Relaxed);
    let acked = s.acked_lsn.load(Ordering::Relaxed);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let last_commit = s.last_commit_unix_ms.load(Ordering::Relaxed);
    let lag_s = if last_commit > 0 {
        (now_ms - last_commit).max(0) as f64 / 1000.0
    } else {
        0.0
    };
    let slot_ok = s
        .slot_problem
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .is_none();
    use crate::metrics::{counter, float_counter, gauge, labelled_counter};
    let (pool_open, pool_idle) = app.db.usage();
    let families = vec![
        gauge(
            "pg_sync_replication_streaming",
            "Whether the replication stream is open.",
            s.streaming.load(Ordering::Relaxed) as u8 as f64,
        ),
        gauge(
            "pg_sync_replication_lag_bytes",
            "WAL bytes the server has that are not acknowledged yet.",
            server.saturating_sub(acked) as f64,
        ),
        gauge(
            "pg_sync_replication_lag_seconds",
            "Seconds since the last sequenced commit.",
            lag_s,
        ),
        gauge(
            "pg_sync_slot_ok",
            "Whether the replication slot is usable.",
            slot_ok as u8 as f64,
        ),
        counter(
            "pg_sync_reconnects_total",
            "Replication sessions restarted.",
            s.reconnects.load(Ordering::Relaxed),
        ),
        counter(
            "pg_sync_sequencer_panics_total",
            "Replication sessions that panicked.",
            s.panics.load(Ordering::Relaxed),
        ),
        gauge(
            "pg_sync_last_sync_id",
            "The last published sync id.",
            app.hub.published() as f64,
        ),
        counter(
            "pg_sync_sequenced_actions_total",
            "Actions given a sync id.",
            s.sequenced_actions.load(Ordering::Relaxed),
        ),
        counter(
            "pg_sync_sequencer_reassigned_ids_total",
            "Published sync ids assigned again after a crash of Postgres lost their persist (same ids, same actions).",
            s.reassigned_ids.load(Ordering::Relaxed),
        ),
        gauge(
            "pg_sync_durable_sync_id",
            "Every sync id up to this one is flushed to the WAL; the slot is acknowledged only up to it.",
            s.durable_sync_id.load(Ordering::Relaxed) as f64,
        ),
        counter(
            "pg_sync_sequencer_visibility_waits_total",
            "Flushes that waited for a streamed transaction to become visible to new snapshots.",
            s.visibility_waits.load(Ordering::Relaxed),
        ),
        counter(
            "pg_sync_deltas_published_total",
            "Deltas published to the hub.",
            m.deltas_published.load(Ordering::Relaxed),
        ),
        counter(
            "pg_sync_deliveries_total",
            "Deltas queued for subscribers.",
            m.deliveries.load(Ordering::Relaxed),
        ),
        gauge(
            "pg_sync_replay_pages_waiting",
            "Replay pages waiting for a turn to be read (SYNC_REPLAY_PERMITS at once).",
            app.replay.waiting() as f64,
        ),
        counter(
            "pg_sync_replay_turns_total",
            "Pages of the log read for clients (replays, /sync/deltas, /v1/shape).",
            app.replay.turns.load(Ordering::Relaxed),
        ),
        float_counter(
            "pg_sync_replay_rest_seconds_total",
            "Time replay turns rested while live deliveries flowed (SYNC_REPLAY_SHARE_PERCENT).",
            app.replay.rested_us.load(Ordering::Relaxed) as f64 / 1e6,
        ),
        gauge(
            "pg_sync_subscribers",
            "Live subscribers.",
            app.hub.subscriber_count() as f64,
        ),
        gauge(
            "pg_sync_api_keys_cached",
            "Valid API keys held in memory (answered without a database lookup).",
            app.hub.known_keys.len() as f64,
        ),
        counter(
            "pg_sync_slow_consumer_closes_total",
            "Connections cut off for not reading.",
            m.slow_cutoffs.load(Ordering::Relaxed),
        ),
        counter(
            "pg_sync_subscriber_fallbacks_total",
            "Live subscribers that fell behind and went back to paging from the log.",
            m.fallbacks.load(Ordering::Relaxed),
        ),
        counter(
            "pg_sync_bootstraps_total",
            "Bootstraps started.",
            c.bootstraps.load(Ordering::Relaxed),
        ),
        counter(
            "pg_sync_bootstrap_rows_total",
            "Rows sent by bootstraps.",
            c.bootstrap_rows.load(Ordering::Relaxed),
        ),
        labelled_counter(
            "pg_sync_mutate_transactions_total",
            "Client transactions by outcome.",
            "status",
            &[
                ("applied", c.mutate_applied.load(Ordering::Relaxed)),
                ("duplicate", c.mutate_duplicate.load(Ordering::Relaxed)),
                ("rejected", c.mutate_rejected.load(Ordering::Relaxed)),
            ],
        ),
        gauge(
            "pg_sync_db_pool_connections",
            "Connections the API pool holds open.",
            pool_open as f64,
        ),
        gauge(
            "pg_sync_db_pool_idle",
            "Open pooled connections not in use.",
            pool_idle as f64,
        ),
    ];
    let body = crate::metrics::render(families, &m.latency);
    (
        [(axum::http::header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
        body,
    )
        .into_response()
}
