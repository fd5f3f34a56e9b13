//! The sequencer: the one place sync ids are assigned.
//!
//! Transactions arrive in commit order. Each one's `sync_actions` rows get consecutive sync ids
//! (in action id order); batches of transactions are persisted to `pg_sync.commit_order` in one
//! statement, then published to the hub, and only then is their end LSN acknowledged to
//! Postgres. After a crash the slot replays from the last acknowledged LSN; transactions at or
//! below the last persisted commit LSN are skipped, and the rest get the same ids again, because
//! ids follow from the persisted counter and the commit order alone.

use super::pgoutput::{Decoder, Message, Row};
use crate::config::Config;
use crate::delta::Delta;
use crate::hub::{Hub, MembershipChange, Published};
use futures::FutureExt;
use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_postgres::Client;

/// What health and metrics read about replication.
#[derive(Default)]
pub struct Status {
    pub streaming: AtomicBool,
    pub acked_lsn: AtomicU64,
    /// Every transaction whose commit is below this LSN has been sequenced and published.
    pub processed_lsn: AtomicU64,
    pub server_lsn: AtomicU64,
    pub last_commit_unix_ms: AtomicI64,
    pub sequenced_actions: AtomicU64,
    pub reconnects: AtomicU64,
    /// Replication sessions that panicked (each was restarted).
    pub panics: AtomicU64,
    pub slot_problem: Mutex<Option<String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum SequencerError {
    #[error("database error")]
    Db(#[from] tokio_postgres::Error),
    #[error("replication stream error")]
    Stream(#[from] pgwire_replication::PgWireError),
    #[error("cannot decode the replication stream")]
    Decode(#[from] super::pgoutput::DecodeError),
    #[error("replication slot {0:?} is invalidated (wal_status = lost); drop it and resynchronize clients")]
    SlotLost(String),
    #[error("the pg_sync extension is not installed in this database")]
    NoExtension,
    #[error("invalid database url")]
    Url,
    #[error("failpoint {0} fired")]
    Failpoint(&'static str),
}

const FLUSH_AFTER: Duration = Duration::from_millis(5);
const FLUSH_ACTIONS: usize = 5_000;
const LARGE_PAGE: i32 = 5_000;
const REGISTRY_POLL: Duration = Duration::from_secs(1);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Microseconds between the Unix and Postgres epochs.
const PG_EPOCH_US: i64 = 946_684_800_000_000;

/// A control connection. With `sslmode=require` (or `prefer`) the connection is encrypted;
/// like libpq's `require`, the server certificate is not verified.
pub async fn connect(url: &str) -> Result<Client, SequencerError> {
    let mut config: tokio_postgres::Config = url.parse()?;
    // An unreachable database must fail a request, not hang it.
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    let client = if matches!(
        config.get_ssl_mode(),
        tokio_postgres::config::SslMode::Disable
    ) {
        let (client, conn) = config.connect(tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "control connection ended");
            }
        });
        client
    } else {
        let tls = tokio_postgres_rustls::MakeRustlsConnect::new(crate::tls::require_config());
        let (client, conn) = config.connect(tls).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "control connection ended");
            }
        });
        client
    };
    Ok(client)
}

/// Creates the publication and the slot when missing; reports an invalidated slot.
/// Returns whether the publication carries everything the sequencer follows (the registry,
/// updates and truncations); a publication this role may not alter is used as it is.
async fn ensure_setup(db: &Client, cfg: &Config, status: &Status) -> Result<bool, SequencerError> {
    let mut complete = true;
    if db
        .query_opt("SELECT 1 FROM pg_extension WHERE extname = 'pg_sync'", &[])
        .await?
        .is_none()
    {
        return Err(SequencerError::NoExtension);
    }
    // The registry is published too: a re-registration (an UPDATE) changes which models are
    // global, and live fan-out must follow it in commit order. Updates and truncations are
    // published so that membership and API key changes made that way reach the hub.
    let publication = crate::db::quote_ident(&cfg.publication);
    match db
        .query_opt(
            "SELECT pubupdate AND pubtruncate FROM pg_publication WHERE pubname = $1",
            &[&cfg.publication],
        )
        .await?
    {
        None => {
            let sql = format!(
                "CREATE PUBLICATION {publication} FOR TABLE pg_sync.sync_actions, pg_sync.group_memberships, \
                 pg_sync.api_keys, pg_sync.registry WITH (publish = 'insert, update, delete, truncate')"
            );
            db.batch_execute(&sql).await?;
            tracing::info!(publication = %cfg.publication, "created publication");
        }
        Some(row) => {
            let mut alter = vec![];
            for table in ["api_keys", "registry"] {
                let listed = db
                    .query_opt(
                        "SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = 'pg_sync' AND tablename = $2",
                        &[&cfg.publication, &table],
                    )
                    .await?
                    .is_some();
                if !listed {
                    alter.push(format!(
                        "ALTER PUBLICATION {publication} ADD TABLE pg_sync.{table}"
                    ));
                }
            }
            if !row.get::<_, bool>(0) {
                alter.push(format!(
                    "ALTER PUBLICATION {publication} SET (publish = 'insert, update, delete, truncate')"
                ));
            }
            for sql in alter {
                match db.batch_execute(&sql).await {
                    Ok(()) => {}
                    // Only its owner may alter a publication made by someone else.
                    Err(e)
                        if e.code()
                            == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) =>
                    {
                        complete = false;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            if !complete {
                tracing::warn!(
                    publication = %cfg.publication,
                    "the publication lacks pg_sync.registry, pg_sync.api_keys, updates or truncations and this role may not \
                     alter it; registry changes are re-read every second and membership or key changes made by UPDATE or \
                     TRUNCATE reach live sessions only on reconnect: ALTER it as its owner (see the worker's ensure_setup)"
                );
            }
        }
    }
    match db
        .query_opt(
            "SELECT coalesce(wal_status, '') FROM pg_replication_slots WHERE slot_name = $1",
            &[&cfg.slot],
        )
        .await?
    {
        None => {
            db.query_one(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&cfg.slot],
            )
            .await?;
            tracing::info!(slot = %cfg.slot, "created replication slot");
        }
        Some(row) => {
            let wal_status: String = row.get(0);
            if wal_status == "lost" {
                *status
                    .slot_problem
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some("lost".into());
                return Err(SequencerError::SlotLost(cfg.slot.clone()));
            }
        }
    }
    *status
        .slot_problem
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = None;
    take_over_stale_slot(db, cfg).await?;
    Ok(complete)
}

/// A walsender whose peer died without closing the connection (a crashed host, a network
/// partition) holds the slot until `wal_sender_timeout`. When the slot's holder has not
/// replied for `SYNC_SLOT_TAKEOVER_SECS`, it is terminated so this worker can stream now; a
/// live holder (another worker replies every 200 ms) is left alone, and this worker keeps
/// retrying.
async fn take_over_stale_slot(db: &Client, cfg: &Config) -> Result<(), SequencerError> {
    if cfg.slot_takeover_secs == 0 {
        return Ok(());
    }
    let stale = db
        .query_opt(
            "SELECT s.active_pid,
                    extract(epoch FROM now() - coalesce(r.reply_time, r.backend_start, now()))::float8
               FROM pg_replication_slots s
               LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid
              WHERE s.slot_name = $1 AND s.active",
            &[&cfg.slot],
        )
        .await?;
    let Some(row) = stale else { return Ok(()) };
    let (pid, silent_secs): (i32, f64) = (row.get(0), row.get(1));
    if silent_secs < cfg.slot_takeover_secs as f64 {
        return Ok(());
    }
    tracing::warn!(
        slot = %cfg.slot,
        pid,
        silent_secs,
        "the replication slot is held by a walsender whose peer has not replied; terminating it"
    );
    let signalled: bool = db
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await?
        .get(0);
    if !signalled {
        tracing::warn!(pid, "could not terminate the stale walsender");
        return Ok(());
    }
    // Wait (briefly) for the slot to be released.
    for _ in 0..50 {
        let active: bool = db
            .query_one(
                "SELECT coalesce((SELECT active FROM pg_replication_slots WHERE slot_name = $1), false)",
                &[&cfg.slot],
            )
            .await?
            .get(0);
        if !active {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// `encrypted`: whether the control connection negotiated TLS (what `sslmode=prefer` found).
fn replication_config(cfg: &Config, encrypted: bool) -> Result<ReplicationConfig, SequencerError> {
    let pg: tokio_postgres::Config = cfg.database_url.parse().map_err(|_| SequencerError::Url)?;
    let host = match pg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    let password = pg
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    let mut rc = ReplicationConfig::new(
        host,
        pg.get_user().unwrap_or("postgres"),
        password,
        pg.get_dbname().unwrap_or("postgres"),
        cfg.slot.clone(),
        cfg.publication.clone(),
    )
    .with_port(port)
    .with_status_interval(Duration::from_millis(200))
    .with_application_name("pg_sync_worker");
    let tls = match pg.get_ssl_mode() {
        tokio_postgres::config::SslMode::Disable => false,
        tokio_postgres::config::SslMode::Require => true,
        // `prefer`: encrypt when the server offered it to the control connection.
        _ => encrypted,
    };
    if tls {
        rc = rc.with_tls(pgwire_replication::TlsConfig::require());
    }
    Ok(rc)
}

struct OpenTxn {
    commit_lsn: Lsn,
    actions: Vec<Row>,
    count: usize,
    large: bool,
    xid: Option<String>,
    memberships: Vec<MembershipChange>,
    revoked_keys: Vec<String>,
    /// Registry changes, in order: (model, whether it is now global); `None` when the stream
    /// did not say (a deleted registration): the registry is read again.
    registry: Vec<Option<(String, bool)>>,
    /// TRUNCATE of the memberships: every user leaves every group (before `memberships`).
    memberships_reset: bool,
    /// TRUNCATE of the API keys: every key session is closed.
    all_keys_revoked: bool,
}

/// A committed transaction waiting to be sequenced.
struct ReadyTxn {
    end_lsn: Lsn,
    committed_at_us: i64,
    txn: OpenTxn,
}

impl std::ops::Deref for ReadyTxn {
    type Target = OpenTxn;

    fn deref(&self) -> &OpenTxn {
        &self.txn
    }
}

struct Session<'a> {
    cfg: &'a Config,
    db: Client,
    hub: &'a Hub,
    status: &'a Status,
    next_sync_id: i64,
    last_commit_lsn: Lsn,
    globals: HashMap<String, bool>,
    /// Registry changes arrive in the stream; if not (a publication we may not alter), the
    /// registry is read again at most every REGISTRY_POLL.
    registry_streamed: bool,
    globals_read_at: Instant,
    pending: Vec<ReadyTxn>,
    pending_actions: usize,
    pending_since: Option<Instant>,
    /// A fence message seen while transactions were pending; processed once they are.
    fence: Option<Lsn>,
}

/// The chain of causes below an error, for logs (never row values: database errors here come
/// from pg_sync's own statements).
fn causes(e: &dyn std::error::Error) -> String {
    let mut out = vec![];
    let mut next = e.source();
    while let Some(cause) = next {
        out.push(cause.to_string());
        next = cause.source();
    }
    out.join(": ")
}

/// Runs replication until `shutdown` flips, reconnecting with backoff after failures.
pub async fn run(
    cfg: Arc<Config>,
    hub: Arc<Hub>,
    status: Arc<Status>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let started = Instant::now();
        // A panic in a session must not leave the worker looking healthy with nobody
        // sequencing: it ends the session like an error does (health says not streaming), and
        // the next session starts from what is persisted.
        let result = std::panic::AssertUnwindSafe(session(&cfg, &hub, &status, &mut shutdown))
            .catch_unwind()
            .await;
        status.streaming.store(false, Ordering::Release);
        match result {
            Ok(Ok(())) => return,
            Ok(Err(e)) => {
                status.reconnects.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, cause = %causes(&e), "replication session ended; reconnecting");
            }
            Err(panic) => {
                status.reconnects.fetch_add(1, Ordering::Relaxed);
                status.panics.fetch_add(1, Ordering::Relaxed);
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                tracing::error!(panic = %what, "replication session panicked; reconnecting");
            }
        }
        if started.elapsed() > Duration::from_secs(30) {
            backoff = Duration::from_millis(200);
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

async fn session(
    cfg: &Config,
    hub: &Hub,
    status: &Status,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), SequencerError> {
    let db = connect(&cfg.database_url).await?;
    let registry_streamed = ensure_setup(&db, cfg, status).await?;
    let row = db
        .query_one(
            "SELECT pg_sync.last_sync_id(), coalesce((SELECT max(commit_lsn) FROM pg_sync.commit_order), '0/0')::text",
            &[],
        )
        .await?;
    let last_sync_id: i64 = row.get(0);
    let last_lsn: String = row.get(1);
    let mut s = Session {
        cfg,
        db,
        hub,
        status,
        next_sync_id: last_sync_id + 1,
        last_commit_lsn: Lsn::parse(&last_lsn).unwrap_or(Lsn::ZERO),
        globals: HashMap::new(),
        registry_streamed,
        globals_read_at: Instant::now(),
        pending: vec![],
        pending_actions: 0,
        pending_since: None,
        fence: None,
    };
    s.load_globals().await?;
    // What a previous session persisted but could not publish (it failed in between) reaches
    // live subscribers now, before anything newer.
    let published = hub.published();
    if !hub.catch_up(last_sync_id) {
        // Those transactions' membership changes were lost with the session that persisted
        // them: the database's memberships now go first, so a removed user gets none of it.
        s.refresh_memberships().await?;
        s.publish_from_db(published + 1, last_sync_id, vec![], vec![])
            .await?;
    }
    s.sequence_backlog().await?;
    let encrypted: bool =
        s.db.query_one(
            "SELECT coalesce((SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), false)",
            &[],
        )
        .await?
        .get(0);
    let mut repl = ReplicationClient::connect(replication_config(cfg, encrypted)?).await?;
    status.streaming.store(true, Ordering::Release);
    tracing::info!(slot = %cfg.slot, last_sync_id, "replication streaming");
    let mut decoder = Decoder::default();
    let mut open: Option<OpenTxn> = None;
    loop {
        let wait = match s.pending_since {
            Some(t) => FLUSH_AFTER.saturating_sub(t.elapsed()),
            None => Duration::from_secs(3600),
        };
        let event = tokio::select! {
            ev = repl.recv() => ev?,
            _ = tokio::time::sleep(wait) => { s.flush(&repl).await?; continue; }
            _ = shutdown.changed() => {
                // Drain: what is complete is persisted, published and acknowledged.
                s.flush(&repl).await?;
                let _ = tokio::time::timeout(Duration::from_secs(2), repl.shutdown()).await;
                return Ok(());
            }
        };
        let Some(event) = event else {
            s.flush(&repl).await?;
            return Ok(());
        };
        match event {
            ReplicationEvent::Begin { final_lsn, .. } => {
                open = Some(OpenTxn {
                    commit_lsn: final_lsn,
                    actions: vec![],
                    count: 0,
                    large: false,
                    xid: None,
                    memberships: vec![],
                    revoked_keys: vec![],
                    registry: vec![],
                    memberships_reset: false,
                    all_keys_revoked: false,
                });
            }
            ReplicationEvent::XLogData { data, .. } => {
                let msg = decoder.decode(&data)?;
                if let Some(txn) = open.as_mut() {
                    s.absorb(txn, msg);
                }
            }
            ReplicationEvent::Commit {
                lsn,
                end_lsn,
                commit_time_micros,
            } => {
                let Some(txn) = open.take() else { continue };
                debug_assert_eq!(txn.commit_lsn, lsn);
                s.status
                    .last_commit_unix_ms
                    .store((commit_time_micros + PG_EPOCH_US) / 1000, Ordering::Relaxed);
                s.pending_actions += txn.count;
                s.pending.push(ReadyTxn {
                    end_lsn,
                    committed_at_us: commit_time_micros,
                    txn,
                });
                s.pending_since.get_or_insert_with(Instant::now);
                if s.pending_actions >= FLUSH_ACTIONS {
                    s.flush(&repl).await?;
                }
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                s.status
                    .server_lsn
                    .store(wal_end.as_u64(), Ordering::Relaxed);
                if open.is_none() && s.pending.is_empty() {
                    s.ack(&repl, wal_end);
                    s.status
                        .processed_lsn
                        .fetch_max(wal_end.as_u64(), Ordering::Release);
                }
            }
            ReplicationEvent::Message {
                transactional: false,
                lsn,
                ..
            } => {
                // A fence (pg_logical_emit_message): every commit before it has arrived.
                if s.pending.is_empty() {
                    s.status
                        .processed_lsn
                        .fetch_max(lsn.as_u64(), Ordering::Release);
                } else {
                    s.fence = Some(s.fence.map_or(lsn, |f| f.max(lsn)));
                }
            }
            ReplicationEvent::Message { .. } => {}
            ReplicationEvent::StoppedAt { .. } => {
                s.flush(&repl).await?;
                return Ok(());
            }
        }
    }
}

impl Session<'_> {
    /// Sequences committed actions that the slot will never stream: those written before the
    /// slot existed (or while no slot held them). Transactions committed while the worker was
    /// down are not among them: the slot streams those, in commit order, and only the stream
    /// knows that order, so they are left to it. Which unsequenced transactions the slot will
    /// stream is read by peeking at the slot (not consuming it) in the snapshot the backlog is
    /// taken from; the rest go first, ordered by their first action (before the slot existed
    /// there is no commit order to read). One that is streamed anyway is recognised by its xid
    /// and skipped.
    async fn sequence_backlog(&mut self) -> Result<(), SequencerError> {
        let any: bool = self
            .db
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_sync.sync_actions a
                                 WHERE NOT EXISTS (SELECT 1 FROM pg_sync.commit_order c WHERE c.xid = a.xid))",
                &[],
            )
            .await?
            .get(0);
        if !any {
            return Ok(());
        }
        let first = self.next_sync_id;
        // One snapshot for both: every transaction it sees committed before the peek's end.
        self.db
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
            .await?;
        let result = async {
            // Taken before the snapshot (LOCK takes none): a remap of restored xids (the
            // extension's xid_guard.rs, which holds this lock until it commits) is either
            // seen whole or waits for this pass; otherwise this pass could write commit order
            // rows for the xids it just moved.
            self.db
                .batch_execute("LOCK TABLE pg_sync.commit_order IN SHARE ROW EXCLUSIVE MODE")
                .await?;
            let streamed: Vec<i64> = self
                .db
                .query_one(
                    "SELECT coalesce(array_agg(DISTINCT p.xid::text::bigint), '{}')
                       FROM pg_logical_slot_peek_binary_changes($1::text::name, NULL, NULL,
                            'proto_version', '1', 'publication_names', $2::text) p",
                    &[&self.cfg.slot, &crate::db::quote_ident(&self.cfg.publication)],
                )
                .await?
                .get(0);
            // The stream names 32-bit xids; the log keeps xid8 (epoch and xid).
            self.db
                .execute(
                    "INSERT INTO pg_sync.commit_order (xid, first_sync_id, action_count, commit_lsn, committed_at)
                     SELECT xid, $1 + sum(n) OVER (ORDER BY first_id) - n, n, '0/0', now()
                       FROM (SELECT a.xid, min(a.id) AS first_id, count(*)::int AS n
                               FROM pg_sync.sync_actions a
                              WHERE NOT EXISTS (SELECT 1 FROM pg_sync.commit_order c WHERE c.xid = a.xid)
                              GROUP BY a.xid) s
                      WHERE (s.xid::text::bigint % 4294967296) <> ALL ($2::bigint[])",
                    &[&first, &streamed],
                )
                .await
        }
        .await;
        let n = match result {
            Ok(n) => {
                self.db.batch_execute("COMMIT").await?;
                n
            }
            Err(e) => {
                let _ = self.db.batch_execute("ROLLBACK").await;
                return Err(e.into());
            }
        };
        if n == 0 {
            return Ok(());
        }
        let last: i64 = self
            .db
            .query_one("SELECT pg_sync.last_sync_id()", &[])
            .await?
            .get(0);
        tracing::info!(transactions = n, first, last, "sequenced backlog");
        // The backlog's membership changes never stream: take the database's.
        self.refresh_memberships().await?;
        self.publish_from_db(first, last, vec![], vec![]).await?;
        self.next_sync_id = last + 1;
        Ok(())
    }

    /// Gives the hub the current groups of every user it tracks, and closes the sessions of
    /// API keys that no longer exist.
    async fn refresh_memberships(&self) -> Result<(), SequencerError> {
        let keys = self.hub.keys();
        if !keys.is_empty() {
            let live: std::collections::HashSet<String> = self
                .db
                .query(
                    "SELECT id::text FROM pg_sync.api_keys WHERE id = ANY ($1::text[]::uuid[])",
                    &[&keys],
                )
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let revoked_keys: Vec<String> =
                keys.into_iter().filter(|k| !live.contains(k)).collect();
            if !revoked_keys.is_empty() {
                self.hub.publish(&[Published {
                    revoked_keys,
                    ..Published::default()
                }]);
            }
        }
        let users = self.hub.users();
        if users.is_empty() {
            return Ok(());
        }
        let rows = self
            .db
            .query(
                "SELECT user_id, array_agg(group_id) FROM pg_sync.group_memberships
                  WHERE user_id = ANY ($1) GROUP BY user_id",
                &[&users],
            )
            .await?;
        let fresh: HashMap<String, Vec<String>> =
            rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        self.hub.refresh_groups(&fresh);
        Ok(())
    }

    async fn load_globals(&mut self) -> Result<(), SequencerError> {
        let rows = self
            .db
            .query(
                "SELECT model, group_column IS NULL FROM pg_sync.registry",
                &[],
            )
            .await?;
        self.globals = rows
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, bool>(1)))
            .collect();
        self.globals_read_at = Instant::now();
        Ok(())
    }

    fn absorb(&mut self, txn: &mut OpenTxn, msg: Message) {
        match msg {
            Message::Insert { relation, row } if relation.namespace == "pg_sync" => {
                match relation.name.as_str() {
                    "sync_actions" => {
                        if txn.xid.is_none() {
                            txn.xid = row.get("xid").cloned().flatten();
                        }
                        txn.count += 1;
                        if txn.actions.len() < self.cfg.txn_buffer {
                            txn.actions.push(row);
                        } else {
                            // Bounded memory: a huge transaction is re-read from the database.
                            txn.large = true;
                            txn.actions = vec![];
                        }
                    }
                    "group_memberships" => txn.memberships.extend(membership(&row, true)),
                    "registry" => txn.registry.push(registration(&row)),
                    _ => {}
                }
            }
            Message::Update { relation, old, row } if relation.namespace == "pg_sync" => {
                match relation.name.as_str() {
                    "registry" => txn.registry.push(registration(&row)),
                    // The old key comes only when the key (user, group) changed: a move.
                    "group_memberships" => {
                        if let Some(old) = old {
                            txn.memberships.extend(membership(&old, false));
                            txn.memberships.extend(membership(&row, true));
                        }
                    }
                    // A key whose hash, user or id changed no longer stands for its sessions;
                    // any other edit (a label) leaves them be. The old row comes whole
                    // (REPLICA IDENTITY FULL); without it nothing tells what changed, so the
                    // key's sessions are closed, to be safe.
                    "api_keys" => {
                        let same = |c: &str| {
                            old.as_ref().is_some_and(|o| {
                                o.get(c)
                                    .is_some_and(|v| v.is_some() && Some(v) == row.get(c))
                            })
                        };
                        if !(same("id") && same("user_id") && same("key_hash")) {
                            txn.revoked_keys
                                .extend(old.and_then(|o| o.get("id").cloned().flatten()));
                            txn.revoked_keys.extend(row.get("id").cloned().flatten());
                        }
                    }
                    _ => {}
                }
            }
            Message::Truncate { relations } => {
                for r in relations.iter().filter(|r| r.namespace == "pg_sync") {
                    match r.name.as_str() {
                        "group_memberships" => {
                            // Everything before it in this transaction is moot.
                            txn.memberships.clear();
                            txn.memberships_reset = true;
                        }
                        "api_keys" => txn.all_keys_revoked = true,
                        _ => {}
                    }
                }
            }
            Message::Delete { relation, key } if relation.namespace == "pg_sync" => {
                match relation.name.as_str() {
                    "group_memberships" => txn.memberships.extend(membership(&key, false)),
                    "api_keys" => txn.revoked_keys.extend(key.get("id").cloned().flatten()),
                    "registry" => txn.registry.push(None),
                    _ => {}
                }
            }
            _ => {}
        }
    }

    fn ack(&self, repl: &ReplicationClient, lsn: Lsn) {
        repl.update_applied_lsn(lsn);
        self.status
            .acked_lsn
            .fetch_max(lsn.as_u64(), Ordering::Relaxed);
    }

    /// Persists, publishes, then acknowledges everything pending.
    async fn flush(&mut self, repl: &ReplicationClient) -> Result<(), SequencerError> {
        self.pending_since = None;
        if self.pending.is_empty() {
            return Ok(());
        }
        if crate::failpoint::fire("panic_in_flush") {
            panic!("failpoint panic_in_flush");
        }
        let pending = std::mem::take(&mut self.pending);
        self.pending_actions = 0;
        // Transactions the backlog pass already sequenced are not sequenced again.
        let candidates: Vec<String> = pending
            .iter()
            .filter(|t| t.count > 0)
            .filter_map(|t| t.xid.clone())
            .collect();
        let known: std::collections::HashSet<String> = if candidates.is_empty() {
            Default::default()
        } else {
            self.db
                .query(
                    "SELECT xid::text FROM pg_sync.commit_order WHERE xid = ANY ($1::text[]::xid8[])",
                    &[&candidates],
                )
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect()
        };
        let mut xids = vec![];
        let mut firsts = vec![];
        let mut counts = vec![];
        let mut lsns = vec![];
        let mut times = vec![];
        let mut assigned: Vec<(i64, &ReadyTxn)> = vec![];
        for txn in &pending {
            if txn.commit_lsn <= self.last_commit_lsn
                || txn.xid.as_ref().is_some_and(|x| known.contains(x))
            {
                assigned.push((0, txn)); // sequenced already: only its memberships matter now
                continue;
            }
            if txn.count == 0 {
                assigned.push((0, txn));
                continue;
            }
            let first = self.next_sync_id;
            self.next_sync_id += txn.count as i64;
            xids.push(txn.xid.clone().unwrap_or_default());
            firsts.push(first);
            counts.push(txn.count as i32);
            lsns.push(txn.commit_lsn.to_pg_string());
            times.push(txn.committed_at_us);
            assigned.push((first, txn));
        }
        if !firsts.is_empty() {
            self.db
                .execute(
                    "INSERT INTO pg_sync.commit_order (xid, first_sync_id, action_count, commit_lsn, committed_at)
                     SELECT x::xid8, f, c, l::pg_lsn, to_timestamp((t + 946684800000000)::float8 / 1e6)
                       FROM unnest($1::text[], $2::bigint[], $3::int[], $4::text[], $5::bigint[]) AS u(x, f, c, l, t)",
                    &[&xids, &firsts, &counts, &lsns, &times],
                )
                .await?;
        }
        if crate::failpoint::fire("after_persist") {
            return Err(SequencerError::Failpoint("after_persist"));
        }
        // Holds persisted ids unpublished for a while (not the first transaction's, so a test
        // can have one published first).
        if firsts.first().is_some_and(|f| *f > 1) && crate::failpoint::fire("stall_after_persist") {
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        // Persisted: now clients may see these ids.
        if !self.registry_streamed && self.globals_read_at.elapsed() >= REGISTRY_POLL {
            self.load_globals().await?;
        }
        let mut batch = vec![];
        for (first, txn) in &assigned {
            // Which models are global changes with the registry, in commit order.
            for change in &txn.registry {
                match change {
                    Some((model, global)) => {
                        self.globals.insert(model.clone(), *global);
                    }
                    None => self.load_globals().await?,
                }
            }
            if *first == 0 {
                batch.push(Published {
                    last_sync_id: 0,
                    deltas: vec![],
                    memberships: txn.memberships.clone(),
                    revoked_keys: txn.revoked_keys.clone(),
                    memberships_reset: txn.memberships_reset,
                    all_keys_revoked: txn.all_keys_revoked,
                });
                continue;
            }
            if txn.large {
                // Its truncations go first, as the membership changes do in publish_large.
                batch.push(Published {
                    memberships_reset: txn.memberships_reset,
                    all_keys_revoked: txn.all_keys_revoked,
                    ..Published::default()
                });
                self.hub.publish(&std::mem::take(&mut batch));
                self.publish_large(*first, txn).await?;
                continue;
            }
            let mut rows: Vec<&Row> = txn.actions.iter().collect();
            rows.sort_by_key(|r| {
                r.get("id")
                    .cloned()
                    .flatten()
                    .and_then(|v| v.parse::<i64>().ok())
                    .unwrap_or(0)
            });
            let mut deltas = Vec::with_capacity(rows.len());
            for (i, row) in rows.into_iter().enumerate() {
                let model = row.get("model").cloned().flatten().unwrap_or_default();
                let global = self.global(&model).await?;
                deltas.push(Arc::new(Delta::from_columns(
                    first + i as i64,
                    global,
                    |c| row.get(c).cloned().flatten(),
                )));
            }
            let last = if txn.count > 0 {
                first + txn.count as i64 - 1
            } else {
                0
            };
            batch.push(Published {
                last_sync_id: last,
                deltas,
                memberships: txn.memberships.clone(),
                revoked_keys: txn.revoked_keys.clone(),
                memberships_reset: txn.memberships_reset,
                all_keys_revoked: txn.all_keys_revoked,
            });
        }
        self.hub.publish(&batch);
        self.status.sequenced_actions.fetch_add(
            firsts.iter().zip(&counts).map(|(_, c)| *c as u64).sum(),
            Ordering::Relaxed,
        );
        if let Some(last) = pending.last() {
            self.last_commit_lsn = self.last_commit_lsn.max(last.commit_lsn);
            self.ack(repl, last.end_lsn);
            let mut done = last.end_lsn;
            if let Some(fence) = self.fence.take() {
                done = done.max(fence);
            }
            self.status
                .processed_lsn
                .fetch_max(done.as_u64(), Ordering::Release);
        }
        Ok(())
    }

    async fn global(&mut self, model: &str) -> Result<bool, SequencerError> {
        if !self.globals.contains_key(model) {
            self.load_globals().await?;
        }
        Ok(self.globals.get(model).copied().unwrap_or(false))
    }

    /// Publishes a transaction too large to hold, page by page from the database.
    async fn publish_large(&mut self, first: i64, txn: &ReadyTxn) -> Result<(), SequencerError> {
        let last = first + txn.count as i64 - 1;
        self.publish_from_db(
            first,
            last,
            txn.memberships.clone(),
            txn.revoked_keys.clone(),
        )
        .await
    }

    /// Publishes the persisted sync ids `first..=last`, read back page by page; the membership
    /// changes and revocations ride on the first page.
    async fn publish_from_db(
        &self,
        first: i64,
        last: i64,
        mut memberships: Vec<MembershipChange>,
        mut revoked_keys: Vec<String>,
    ) -> Result<(), SequencerError> {
        let mut after = first - 1;
        while after < last {
            let span = page_span(after, last, LARGE_PAGE);
            let deltas = changes(&self.db, after, None, span).await?;
            after += span as i64;
            self.hub.publish(&[Published {
                last_sync_id: after,
                deltas,
                memberships: std::mem::take(&mut memberships),
                revoked_keys: std::mem::take(&mut revoked_keys),
                ..Published::default()
            }]);
        }
        Ok(())
    }
}

/// How many sync ids the next page after `after` covers on the way to `last`: at most `max`,
/// and computed in 64 bits (a gap past 2^31 must not wrap into a negative span).
pub fn page_span(after: i64, last: i64, max: i32) -> i32 {
    (last - after).clamp(0, i64::from(max)) as i32
}

/// A registry row as streamed: its model and whether it is global (no group column). `None`
/// when the group column is not in the row (unchanged TOAST, never for a short name).
fn registration(row: &Row) -> Option<(String, bool)> {
    let model = row.get("model").cloned().flatten()?;
    let group_column = row.get("group_column")?;
    Some((model, group_column.is_none()))
}

fn membership(row: &Row, joined: bool) -> Option<MembershipChange> {
    Some(MembershipChange {
        user_id: row.get("user_id").cloned().flatten()?,
        group_id: row.get("group_id").cloned().flatten()?,
        joined,
    })
}

/// Reads sequenced deltas with sync ids after+1 ..= after+span, of `groups` (None: all) plus
/// global models.
pub async fn changes(
    db: &Client,
    after: i64,
    groups: Option<&[String]>,
    span: i32,
) -> Result<Vec<Arc<Delta>>, tokio_postgres::Error> {
    let rows = db
        .query(
            "SELECT sync_id, global, model, model_id, action, data::text, version, group_id, prev_group_id,
                    moved::text, client_id, client_tx_id::text
               FROM pg_sync.changes($1, $2, $3)",
            &[&after, &groups, &span],
        )
        .await?;
    let rows_len = rows.len();
    const NAMES: [&str; 10] = [
        "model",
        "model_id",
        "action",
        "data",
        "version",
        "group_id",
        "prev_group_id",
        "moved",
        "client_id",
        "client_tx_id",
    ];
    let build = move || -> Vec<Arc<Delta>> {
        rows.iter()
            .map(|r| {
                let sync_id: i64 = r.get(0);
                let global: bool = r.get(1);
                Arc::new(Delta::from_columns(sync_id, global, |c| {
                    let i = NAMES.iter().position(|n| *n == c)?;
                    r.get::<_, Option<String>>(i + 2).map(|v| {
                        if c == "moved" {
                            if v == "true" {
                                "t".into()
                            } else {
                                "f".into()
                            }
                        } else {
                            v
                        }
                    })
                }))
            })
            .collect()
    };
    // A page of thousands of wide rows is seconds of CPU in a debug build and a good part of
    // one in release: built on a runtime thread it stalls every task scheduled there (two
    // replaying clients held /healthz up for 2 s). Large pages are built on the blocking pool.
    if rows_len > BLOCKING_PAGE_ROWS {
        // At most (cores - 1) pages are built at once (at least one), so many clients replaying
        // together leave a core to everything else (/healthz, live delivery): six replays at
        // once still held /healthz up for 230 ms without this bound.
        static BUILDERS: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
        let builders = BUILDERS.get_or_init(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            tokio::sync::Semaphore::new(cores.saturating_sub(1).max(1))
        });
        let _turn = builders.acquire().await.expect("never closed");
        Ok(tokio::task::spawn_blocking(build)
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic())))
    } else {
        Ok(build())
    }
}

/// Pages with more rows than this are turned into deltas off the async runtime.
const BLOCKING_PAGE_ROWS: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_spans_never_wrap() {
        assert_eq!(page_span(0, 10, 5_000), 10);
        assert_eq!(page_span(10, 10, 5_000), 0);
        assert_eq!(page_span(0, 1 << 40, 5_000), 5_000);
        // (last - after) as i32 was negative here, and the paging loop never ended.
        assert_eq!(page_span(0, 3_000_000_000, 5_000), 5_000);
        assert_eq!(page_span(1, 1 + (1 << 32) + 7, 5_000), 5_000);
        assert_eq!(page_span(20, 10, 5_000), 0);
    }
}
