//! sync_worker: tails pg_sync's action log over logical replication, sequences it in commit
//! order, and fans it out live over WebSocket to the sync groups each user belongs to.
//! The binary only wires this library together, so tests run the real server on port 0.

pub mod api;
pub mod auth;
pub mod config;
pub mod delta;
pub mod failpoint;
pub mod federation;
pub mod hub;
pub mod metrics;
pub mod protocol;
pub mod replication;
pub mod store;
pub mod tls;
pub mod tls_listener;

/// The seed and generator of the seeded randomized unit tests (shared with the integration
/// tests, whose `common` has the same file).
#[cfg(test)]
#[path = "../tests/common/seed.rs"]
mod test_seed;

/// The store's old name: `replication/` still says `crate::store::` (its split is under way in
/// another branch); everything else says `store`.
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection may take to send a request head, counted from when it opens (or its
/// previous response ended): an idle or Slowloris connection is closed then, and holds no
/// socket or task beyond it. axum::serve sets no timer, so hyper's timeout never fired.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest request head (request line and headers): hyper rescans its whole buffer for the
/// head's end on every read, so its default (up to its 400 KiB buffer) let each client burn CPU
/// quadratically; past this a request is refused with 431.
const MAX_HEAD_BYTES: usize = 64 * 1024;
use tokio::sync::watch;

/// Runs the worker on `listener` until `shutdown` flips: replication and the API, then a drain
/// (the sequencer persists and acknowledges what is complete; sessions close with 1001).
pub async fn serve(
    cfg: config::Config,
    listener: TcpListener,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let expect = auth::Expect {
        audience: cfg.jwt_audience.clone(),
        issuer: cfg.jwt_issuer.clone(),
    };
    let verifier = match (&cfg.jwt_secret, &cfg.jwt_public_key_file) {
        (Some(secret), _) => auth::Verifier::hs256(secret.as_bytes(), &expect),
        (None, Some(path)) => auth::Verifier::rs256(&std::fs::read(path)?, &expect)?,
        (None, None) => anyhow::bail!("no JWT secret or public key configured"),
    };
    // Unusable certificate files stop the worker now, naming the file.
    let tls = tls_listener::ServerTls::from_config(&cfg)?;
    if let Some(ca) = &cfg.peer_ca_file {
        // Otherwise every wss:// link would fail later with the same error.
        tls::peer_config(Some(ca)).map_err(|e| anyhow::anyhow!("peer_ca_file: {e}"))?;
    }
    if let Some(tls) = &tls {
        tls.spawn_reloader(shutdown.clone());
    }
    // A URL that cannot be used (a bad sslmode, an unreadable sslrootcert) stops the worker
    // now, with the reason, instead of failing every connection later.
    let db = store::Db::new(
        &cfg.database_url,
        store::PoolLimits {
            size: cfg.db_connections,
            wait: Duration::from_secs(cfg.db_wait_secs.max(1)),
            statement: Duration::from_secs(cfg.db_statement_timeout_secs),
        },
    )?;
    let cfg = Arc::new(cfg);
    let hub = Arc::new(hub::Hub::new(cfg.subscriber_queue));
    let status = Arc::new(replication::sequencer::Status::default());
    let replication = tokio::spawn(replication::sequencer::run(
        cfg.clone(),
        hub.clone(),
        status.clone(),
        shutdown.clone(),
    ));
    let live = hub.clone();
    let app = Arc::new(api::App {
        db,
        cfg: cfg.clone(),
        hub,
        status,
        verifier,
        shutdown: shutdown.clone(),
        counters: Default::default(),
        bootstrap_slots: Arc::new(tokio::sync::Semaphore::new(cfg.max_bootstraps.max(1))),
        replay: api::admission::Admission::new(
            cfg.replay_permits,
            cfg.db_connections,
            cfg.replay_share_percent,
            Box::new(move |window| live.delivered_within(window)),
        ),
        penalties: api::penalty::Penalties::new(cfg.bad_client_penalty_secs),
        unknown_keys: Default::default(),
        shape: Default::default(),
        sessions: Default::default(),
    });
    if app.cfg.retention != "off" || app.cfg.retention_max_actions > 0 {
        tokio::spawn(compaction(app.clone(), shutdown.clone()));
    }
    tokio::spawn(federation::link::run(app.clone(), shutdown.clone()));
    let sessions = app.sessions.clone();
    let server = accept(listener, tls, api::router(app), shutdown.clone());
    // The HTTP connections, then the WebSocket sessions they upgraded to.
    let server = async move {
        server.await;
        sessions.close();
        sessions.wait().await;
    };
    // Connections get DRAIN_TIMEOUT to finish after shutdown begins (a client that stopped
    // reading a response must not hold the worker up); then they are dropped.
    let mut deadline = shutdown.clone();
    tokio::select! {
        () = server => {}
        _ = async move {
            let _ = deadline.wait_for(|s| *s).await;
            tokio::time::sleep(DRAIN_TIMEOUT).await;
        } => tracing::warn!(?DRAIN_TIMEOUT, "connections still open after shutdown began; dropping them"),
    }
    let _ = replication.await;
    Ok(())
}

/// Serves `router` on `listener` until `shutdown` flips, then until every connection has
/// finished (each is told to end after its current request; upgraded sockets end on their own
/// shutdown signal). HTTP/1.1 with upgrades, with a deadline for each request head.
async fn accept(
    listener: TcpListener,
    tls: Option<tls_listener::ServerTls>,
    router: axum::Router,
    shutdown: watch::Receiver<bool>,
) {
    // Every connection task holds a clone; `closed()` resolves once all are gone.
    let (open_tx, open_rx) = watch::channel(());
    let mut stop = shutdown.clone();
    loop {
        let (io, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: keep serving what is open, and
                    // do not spin on the error.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.wait_for(|s| *s) => break,
        };
        let _ = io.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let stop = shutdown.clone();
        let open = open_rx.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _open = open;
            match tls {
                // The handshake counts against the request-head deadline: a client that
                // opens a connection and sends nothing holds it no longer than over HTTP.
                Some(tls) => {
                    if let Some(io) = tls.accept(io, HEADER_READ_TIMEOUT).await {
                        serve_connection(io, service, stop).await;
                    }
                }
                None => serve_connection(io, service, stop).await,
            }
        });
    }
    drop(open_rx);
    open_tx.closed().await;
}

/// One connection, plain or TLS: HTTP/1.1 with upgrades, with a deadline for each request
/// head, told to end after its current request when `stop` flips.
async fn serve_connection<I>(
    io: I,
    service: hyper_util::service::TowerToHyperService<axum::Router>,
    mut stop: watch::Receiver<bool>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use hyper_util::rt::{TokioIo, TokioTimer};
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_header_size(MAX_HEAD_BYTES)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = stop.wait_for(|s| *s) => conn.as_mut().graceful_shutdown(),
    }
    let _ = conn.await;
}

/// Compacts the log on a schedule (`SYNC_RETENTION`, `SYNC_COMPACT_INTERVAL_SECS`).
/// It has a connection of its own: a long compaction (or one waiting on a lock) must not hold
/// up authentication, group loads and replays queued behind it on the shared ones.
async fn compaction(app: Arc<api::App>, mut shutdown: watch::Receiver<bool>) {
    let every = std::time::Duration::from_secs(app.cfg.compact_interval_secs.max(1));
    let mut own: Option<tokio_postgres::Client> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
        // By age and by size, whichever horizon is higher, but never past what is published:
        // a client may hold any published sync id as its cursor, and ids persisted but not yet
        // published (nor acknowledged to the slot) must stay for a restarted session to find.
        let Some(published) = app.hub.watermark() else {
            continue;
        };
        let age = (app.cfg.retention != "off").then_some(app.cfg.retention.as_str());
        let size =
            (app.cfg.retention_max_actions > 0).then_some(app.cfg.retention_max_actions as i64);
        if own.as_ref().is_none_or(|c| c.is_closed()) {
            own = store::connect(&app.cfg.database_url)
                .await
                .map_err(|e| tracing::warn!(error = %e, "compaction cannot connect"))
                .ok();
        }
        // Peers lagging past SYNC_PEER_MAX_LAG stop holding the log (and are told to resync);
        // the others hold it: pg_sync.compact never goes past their acknowledgements.
        if let (Some(db), true) = (own.as_ref(), app.cfg.peer_max_lag > 0) {
            let cap = i64::try_from(app.cfg.peer_max_lag).unwrap_or(i64::MAX);
            match db
                .query("SELECT pg_sync.release_lagging_peers($1)", &[&cap])
                .await
            {
                Ok(rows) => {
                    for row in rows {
                        let peer: String = row.get(0);
                        tracing::warn!(peer, cap, "federation: peer lagged past SYNC_PEER_MAX_LAG; released (it must resync)");
                    }
                }
                Err(e) => {
                    // Compacting now could pass the hold of a peer we could not judge (a
                    // missing EXECUTE grant fails every time: see docs/extension.md, "What the
                    // worker's role needs"): skip this round, loudly.
                    tracing::error!(
                        error = %federation::db_text(&e),
                        "releasing lagging peers failed; compaction skipped"
                    );
                    continue;
                }
            }
        }
        let result = match own.as_ref().ok_or("no connection") {
            Ok(db) => db
                .query_one(
                    "WITH t AS (
                       SELECT LEAST(GREATEST(
                                CASE WHEN $1::text IS NULL THEN 0 ELSE coalesce(
                                  (SELECT max(first_sync_id + action_count - 1) FROM pg_sync.commit_order
                                    WHERE committed_at < now() - $1::text::interval), 0) END,
                                CASE WHEN $2::bigint IS NULL THEN 0
                                     ELSE GREATEST(pg_sync.last_sync_id() - $2::bigint, 0) END),
                              $3::bigint) AS h)
                     SELECT CASE WHEN h > pg_sync.retention_horizon() THEN pg_sync.compact(h) ELSE 0 END FROM t",
                    &[&age, &size, &published],
                )
                .await
                .map(|r| r.get::<_, i64>(0))
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match result {
            Ok(0) => {}
            Ok(n) => tracing::info!(actions = n, "compacted the log"),
            Err(e) => tracing::warn!(error = %e, "compaction failed"),
        }
        // Then the tombstones every peer has acknowledged (pg_sync.gc_tombstones holds them
        // for peers, links and joins; each pass collects what the previous one marked).
        if let (Some(db), true) = (own.as_ref(), app.cfg.tombstone_min_age != "off") {
            match db
                .query_one(
                    "SELECT pg_sync.gc_tombstones($1::text::interval)",
                    &[&app.cfg.tombstone_min_age],
                )
                .await
            {
                Ok(row) => match row.get::<_, i64>(0) {
                    0 => {}
                    n => tracing::info!(states = n, "collected tombstones"),
                },
                Err(e) => tracing::warn!(
                    error = %federation::db_text(&e),
                    "tombstone GC failed"
                ),
            }
        }
    }
}
