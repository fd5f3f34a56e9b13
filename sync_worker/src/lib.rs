//! sync_worker: tails pg_sync's action log over logical replication, sequences it in commit
//! order, and fans it out live over WebSocket to the sync groups each user belongs to.
//! The binary only wires this library together, so tests run the real server on port 0.

pub mod api;
pub mod auth;
pub mod config;
pub mod db;
pub mod delta;
pub mod failpoint;
pub mod federation;
pub mod hub;
pub mod protocol;
pub mod replication;
pub mod tls;

use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
use tokio::sync::watch;

/// Runs the worker on `listener` until `shutdown` flips: replication and the API, then a drain
/// (the sequencer persists and acknowledges what is complete; sessions close with 1001).
pub async fn serve(
    cfg: config::Config,
    listener: TcpListener,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let verifier = match (&cfg.jwt_secret, &cfg.jwt_public_key_file) {
        (Some(secret), _) => auth::Verifier::hs256(secret.as_bytes()),
        (None, Some(path)) => auth::Verifier::rs256(&std::fs::read(path)?)?,
        (None, None) => anyhow::bail!("no JWT secret or public key configured"),
    };
    let cfg = Arc::new(cfg);
    let hub = Arc::new(hub::Hub::new(cfg.subscriber_queue, 0));
    let status = Arc::new(replication::sequencer::Status::default());
    let replication = tokio::spawn(replication::sequencer::run(
        cfg.clone(),
        hub.clone(),
        status.clone(),
        shutdown.clone(),
    ));
    let app = Arc::new(api::App {
        db: db::Db::new(cfg.database_url.clone(), cfg.db_connections),
        cfg: cfg.clone(),
        hub,
        status,
        verifier,
        shutdown: shutdown.clone(),
        counters: Default::default(),
        bootstrap_slots: Arc::new(tokio::sync::Semaphore::new(cfg.max_bootstraps.max(1))),
    });
    if app.cfg.retention != "off" || app.cfg.retention_max_actions > 0 {
        tokio::spawn(compaction(app.clone(), shutdown.clone()));
    }
    tokio::spawn(federation::link::run(app.clone(), shutdown.clone()));
    let mut stop = shutdown.clone();
    let server = axum::serve(listener, api::router(app)).with_graceful_shutdown(async move {
        let _ = stop.wait_for(|s| *s).await;
    });
    // Connections get DRAIN_TIMEOUT to finish after shutdown begins (a client that stopped
    // reading a response must not hold the worker up); then they are dropped.
    let mut deadline = shutdown.clone();
    tokio::select! {
        served = std::future::IntoFuture::into_future(server) => served?,
        _ = async move {
            let _ = deadline.wait_for(|s| *s).await;
            tokio::time::sleep(DRAIN_TIMEOUT).await;
        } => tracing::warn!(?DRAIN_TIMEOUT, "connections still open after shutdown began; dropping them"),
    }
    let _ = replication.await;
    Ok(())
}

/// Compacts the log on a schedule (`SYNC_RETENTION`, `SYNC_COMPACT_INTERVAL_SECS`).
async fn compaction(app: Arc<api::App>, mut shutdown: watch::Receiver<bool>) {
    let every = std::time::Duration::from_secs(app.cfg.compact_interval_secs.max(1));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
        // By age and by size: whichever horizon is higher wins.
        let age = (app.cfg.retention != "off").then_some(app.cfg.retention.as_str());
        let size =
            (app.cfg.retention_max_actions > 0).then_some(app.cfg.retention_max_actions as i64);
        let result = match app.db.get().await {
            Ok(db) => db
                .query_one(
                    "SELECT CASE WHEN $1::text IS NULL THEN 0 ELSE pg_sync.compact_older_than($1::text::interval) END
                          + CASE WHEN $2::bigint IS NULL THEN 0 ELSE pg_sync.compact_to_size($2::bigint) END",
                    &[&age, &size],
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
    }
}
