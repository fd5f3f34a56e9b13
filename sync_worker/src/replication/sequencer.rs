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
    /// Flushes that waited for a streamed transaction to become visible to new snapshots.
    pub visibility_waits: AtomicU64,
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
    #[error("database TLS configuration: {0}")]
    Tls(String),
    #[error("streamed transactions were still not visible to new snapshots after {0:?} (a synchronous standby holding their commits?); restarting the session")]
    NotVisible(Duration),
    #[error("failpoint {0} fired")]
    Failpoint(&'static str),
    #[error("more than {HOLD_ACTIONS} actions streamed before the backlog was resolved; peeking at the slot instead")]
    HoldOverflow,
}

/// Under continuous load, how long committed transactions may wait to be batched at most;
/// when the stream has nothing more ready they are persisted and published at once.
const FLUSH_AFTER: Duration = Duration::from_millis(5);
/// How long a flush waits for streamed transactions to become visible before the session
/// restarts (see `persist`).
const VISIBILITY_WAIT_MAX: Duration = Duration::from_secs(10);
const FLUSH_ACTIONS: usize = 5_000;
/// Actions decoded but not sequenced while the start-up backlog is being told apart from what
/// the slot streams (see `Unresolved`); past it the session restarts and peeks at the slot.
const HOLD_ACTIONS: usize = 250_000;
const LARGE_PAGE: i32 = 5_000;

/// Microseconds between the Unix and Postgres epochs.
pub const PG_EPOCH_US: i64 = 946_684_800_000_000;

/// A control connection (`db::connect`: TLS as the URL's `sslmode` says).
pub async fn connect(url: &str) -> Result<Client, SequencerError> {
    crate::db::connect(url).await.map_err(SequencerError::from)
}

impl From<crate::db::ConnectError> for SequencerError {
    fn from(e: crate::db::ConnectError) -> SequencerError {
        match e {
            crate::db::ConnectError::Db(e) => SequencerError::Db(e),
            crate::db::ConnectError::Url(_) => SequencerError::Url,
            crate::db::ConnectError::Tls(why) => SequencerError::Tls(why),
        }
    }
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
    // Updates and truncations are published so that API key changes made that way reach the
    // hub. Memberships and the registry no longer need to be (kept for publications made
    // before): membership changes are actions in the log (pg_sync.log_membership()), and each
    // action says whether it is global (a NULL group id), so re-registrations need no stream.
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
                     alter it; API key changes made by UPDATE or TRUNCATE reach live sessions only on reconnect: ALTER it as its owner (see the worker's ensure_setup)"
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
    let target = crate::db::Target::parse(&cfg.database_url)?;
    let pg = &target.config;
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
        host.clone(),
        pg.get_user().unwrap_or("postgres"),
        password,
        pg.get_dbname().unwrap_or("postgres"),
        cfg.slot.clone(),
        cfg.publication.clone(),
    )
    .with_port(port)
    .with_status_interval(Duration::from_millis(200))
    .with_application_name("pg_sync_worker");
    if let Some(tls) = target.tls.replication_config(&host, encrypted) {
        rc = rc.with_tls(tls);
    }
    Ok(rc)
}

struct OpenTxn {
    commit_lsn: Lsn,
    actions: Vec<Row>,
    count: usize,
    large: bool,
    xid: Option<String>,
    /// The committing transaction's own xid as the stream names it (low 32 bits). The log
    /// rows' `xid` column is not always it: a restore keeps the old cluster's, and xid_guard
    /// remaps those above 2^62.
    stream_xid: u32,
    revoked_keys: Vec<String>,
    /// TRUNCATE of the API keys: every key session is closed.
    all_keys_revoked: bool,
    /// A registration changed (`register_table` again, `unregister_table`): held `/v1/shape`
    /// requests wake to answer their 409.
    registry_changed: bool,
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
    pending: Vec<ReadyTxn>,
    pending_actions: usize,
    pending_since: Option<Instant>,
    /// A fence message seen while transactions were pending; processed once they are.
    fence: Option<Lsn>,
    /// The start-up backlog not yet told apart from what the slot streams.
    unresolved: Option<Unresolved>,
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
    // Set when a session held too much of the stream to resolve the backlog: the next one
    // peeks at the slot instead.
    let mut peek = false;
    loop {
        let started = Instant::now();
        // A panic in a session must not leave the worker looking healthy with nobody
        // sequencing: it ends the session like an error does (health says not streaming), and
        // the next session starts from what is persisted.
        let result =
            std::panic::AssertUnwindSafe(session(&cfg, &hub, &status, &mut shutdown, &mut peek))
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
    peek: &mut bool,
) -> Result<(), SequencerError> {
    let db = connect(&cfg.database_url).await?;
    ensure_setup(&db, cfg, status).await?;
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
        pending: vec![],
        pending_actions: 0,
        pending_since: None,
        fence: None,
        unresolved: None,
    };
    // What a previous session persisted but could not publish (it failed in between) reaches
    // live subscribers now, before anything newer.
    let published = hub.published();
    if !hub.catch_up(last_sync_id) {
        // The gap's membership changes are log actions: publishing applies each at its
        // position. Reconciling with the database's memberships first would apply a join
        // inside the gap before the gap's earlier deltas of that group (REVIEW rev2 F3).
        // A key revoked in the gap gets none of it: revocations are not positional.
        s.revoke_gone_keys().await?;
        s.publish_from_db(published + 1, last_sync_id, vec![])
            .await?;
        s.reconcile_groups(last_sync_id).await?;
    }
    if std::mem::take(peek) {
        s.sequence_backlog_peeked().await?;
    } else {
        s.find_backlog().await?;
    }
    let encrypted: bool =
        s.db.query_one(
            "SELECT coalesce((SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), false)",
            &[],
        )
        .await?
        .get(0);
    let repl = ReplicationClient::connect(replication_config(cfg, encrypted)?).await?;
    if s.unresolved.is_none() {
        status.streaming.store(true, Ordering::Release);
    }
    tracing::info!(slot = %cfg.slot, last_sync_id, "replication streaming");
    let mut st = Stream {
        repl,
        decoder: Decoder::default(),
        open: None,
    };
    loop {
        // Adaptive batching: committed transactions wait only while the stream has more ready
        // (under load, what arrives during one persist round trip is the next batch); when
        // nothing is ready they are persisted and published at once. No fixed wait.
        let idle_flush = async {
            if s.pending.is_empty() || s.unresolved.is_some() {
                std::future::pending::<()>().await
            }
        };
        let event = tokio::select! {
            biased;
            _ = shutdown.changed() => {
                // Drain: what is complete is persisted, published and acknowledged (unless the
                // backlog is unresolved: then it streams again next time).
                s.flush(&st.repl).await?;
                let _ = tokio::time::timeout(Duration::from_secs(2), st.repl.shutdown()).await;
                return Ok(());
            }
            ev = st.repl.recv() => ev?,
            _ = idle_flush => { s.flush(&st.repl).await?; continue; }
        };
        let Some(event) = event else {
            s.flush(&st.repl).await?;
            return Ok(());
        };
        // While the backlog is unresolved, transactions are decoded as they stream (so decoding
        // overlaps the walsender's) but not sequenced: `flush` waits for the resolution.
        let resolved = match s.watch_backlog(&event) {
            Backlog::Unresolved => false,
            Backlog::Resolved => true,
            Backlog::Overflow => {
                *peek = true;
                return Err(SequencerError::HoldOverflow);
            }
        };
        if matches!(event, ReplicationEvent::KeepAlive { .. })
            && s.unresolved.is_some()
            && !resolved
        {
            // Nothing may be acknowledged before the backlog is sequenced.
            continue;
        }
        if resolved {
            s.resolve_backlog().await?;
            status.streaming.store(true, Ordering::Release);
        }
        if s.handle(&mut st, event).await? {
            return Ok(());
        }
    }
}

/// The replication stream and the transaction being received from it.
struct Stream {
    repl: ReplicationClient,
    decoder: Decoder,
    open: Option<OpenTxn>,
}

/// What `Session::watch_backlog` found.
enum Backlog {
    Unresolved,
    /// The backlog can be told apart now (`resolve_backlog`).
    Resolved,
    /// Too much streamed while unresolved: the next session peeks at the slot instead.
    Overflow,
}

/// Unsequenced transactions found at a session's start (committed before `end`) that the slot
/// may or may not stream: those it streams are sequenced from the stream, in commit order; the
/// rest (committed before the slot could see them) are the backlog and go first. Which is which
/// is known once the stream has passed `end` (or has shown every one of them), so streamed
/// transactions are decoded but not sequenced until then (at most HOLD_ACTIONS actions). This replaces a peek at the slot, which decoded the slot's whole
/// pending WAL a second time before streaming (it cost the tail about 40%).
struct Unresolved {
    end: Lsn,
    /// Their xids' low 32 bits (what the stream names).
    candidates: std::collections::HashSet<u32>,
    seen: std::collections::HashSet<u32>,
}

impl Session<'_> {
    /// Handles one stream event; true when the stream ended.
    async fn handle(
        &mut self,
        st: &mut Stream,
        event: ReplicationEvent,
    ) -> Result<bool, SequencerError> {
        match event {
            ReplicationEvent::Begin { final_lsn, xid, .. } => {
                st.open = Some(OpenTxn {
                    commit_lsn: final_lsn,
                    actions: vec![],
                    count: 0,
                    large: false,
                    xid: None,
                    stream_xid: xid,
                    revoked_keys: vec![],
                    all_keys_revoked: false,
                    registry_changed: false,
                });
            }
            ReplicationEvent::XLogData { data, .. } => {
                let msg = st.decoder.decode(&data)?;
                if let Some(txn) = st.open.as_mut() {
                    self.absorb(txn, msg);
                }
            }
            ReplicationEvent::Commit {
                lsn,
                end_lsn,
                commit_time_micros,
            } => {
                let Some(txn) = st.open.take() else {
                    return Ok(false);
                };
                debug_assert_eq!(txn.commit_lsn, lsn);
                self.status
                    .last_commit_unix_ms
                    .store((commit_time_micros + PG_EPOCH_US) / 1000, Ordering::Relaxed);
                self.pending_actions += txn.count;
                self.pending.push(ReadyTxn {
                    end_lsn,
                    committed_at_us: commit_time_micros,
                    txn,
                });
                let since = *self.pending_since.get_or_insert_with(Instant::now);
                // Batches are bounded in size and, under continuous load, in delay.
                if self.pending_actions >= FLUSH_ACTIONS || since.elapsed() >= FLUSH_AFTER {
                    self.flush(&st.repl).await?;
                }
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                self.status
                    .server_lsn
                    .store(wal_end.as_u64(), Ordering::Relaxed);
                if st.open.is_none() && self.pending.is_empty() {
                    self.ack(&st.repl, wal_end);
                    self.status
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
                if self.pending.is_empty() {
                    self.status
                        .processed_lsn
                        .fetch_max(lsn.as_u64(), Ordering::Release);
                } else {
                    self.fence = Some(self.fence.map_or(lsn, |f| f.max(lsn)));
                }
            }
            ReplicationEvent::Message { .. } => {}
            ReplicationEvent::StoppedAt { .. } => {
                self.flush(&st.repl).await?;
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Follows the stream while the backlog is unresolved, and says when it is resolved.
    fn watch_backlog(&mut self, event: &ReplicationEvent) -> Backlog {
        let Some(u) = self.unresolved.as_mut() else {
            return Backlog::Unresolved;
        };
        let done = match event {
            // Everything up to the server's position has been sent.
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                self.status
                    .server_lsn
                    .store(wal_end.as_u64(), Ordering::Relaxed);
                *wal_end >= u.end
            }
            ReplicationEvent::Begin { xid, .. } => {
                u.seen.insert(*xid);
                false
            }
            ReplicationEvent::Commit { end_lsn, .. } => {
                *end_lsn >= u.end || u.candidates.iter().all(|x| u.seen.contains(x))
            }
            _ => false,
        };
        if done {
            Backlog::Resolved
        } else if self.pending_actions > HOLD_ACTIONS {
            Backlog::Overflow
        } else {
            Backlog::Unresolved
        }
    }

    /// Finds the unsequenced transactions at the start of a session (see `Unresolved`).
    async fn find_backlog(&mut self) -> Result<(), SequencerError> {
        // One statement, one snapshot: the end position is read after it was taken, so every
        // candidate committed before it.
        let row = self
            .db
            .query_one(
                "SELECT (SELECT array_agg(DISTINCT a.xid::text) FROM pg_sync.sync_actions a
                          WHERE NOT EXISTS (SELECT 1 FROM pg_sync.commit_order c WHERE c.xid = a.xid)),
                        pg_current_wal_lsn()::text",
                &[],
            )
            .await?;
        let Some(xids) = row.get::<_, Option<Vec<String>>>(0) else {
            return Ok(());
        };
        let end = Lsn::parse(&row.get::<_, String>(1)).unwrap_or(Lsn::ZERO);
        let candidates = xids
            .iter()
            .map(|xid| (xid.parse::<u64>().unwrap_or(0) % (1 << 32)) as u32)
            .collect();
        self.unresolved = Some(Unresolved {
            end,
            candidates,
            seen: Default::default(),
        });
        Ok(())
    }

    /// Sequences the backlog once the stream told it apart: the candidates the stream did not
    /// show. Before the slot existed there is no commit order to read, but a transaction that
    /// wrote a row after another committed its own write of it minted every version after all
    /// of the other's (one clock per cluster): ordered by their highest version, two
    /// transactions that wrote one row are in commit order, so clients fold it to what the
    /// table holds (by their first action, the one that started first would go first; after a
    /// failover the backlog is the old worker's unsequenced tail, concurrent transactions).
    async fn resolve_backlog(&mut self) -> Result<(), SequencerError> {
        let Some(u) = self.unresolved.take() else {
            return Ok(());
        };
        // By the low 32 bits, which a remap of restored xids (xid_guard.rs) keeps: one that
        // ran since the candidates were read is still matched.
        let backlog: Vec<i64> = u
            .candidates
            .iter()
            .filter(|low| !u.seen.contains(*low))
            .map(|low| i64::from(*low))
            .collect();
        if backlog.is_empty() {
            return Ok(());
        }
        let first = self.next_sync_id;
        self.db.batch_execute("BEGIN").await?;
        let result = async {
            // As in the peeked pass: a concurrent remap of restored xids is seen whole.
            self.db
                .batch_execute("LOCK TABLE pg_sync.commit_order IN SHARE ROW EXCLUSIVE MODE")
                .await?;
            self.db
                .execute(
                    "INSERT INTO pg_sync.commit_order (xid, first_sync_id, action_count, commit_lsn, committed_at)
                     SELECT xid, $1 + sum(n) OVER (ORDER BY last_version, first_id) - n, n, '0/0', now()
                       FROM (SELECT a.xid, min(a.id) AS first_id, max(a.version) AS last_version, count(*)::int AS n
                               FROM pg_sync.sync_actions a
                              WHERE (a.xid::text::bigint % 4294967296) = ANY ($2::bigint[])
                                AND NOT EXISTS (SELECT 1 FROM pg_sync.commit_order c WHERE c.xid = a.xid)
                              GROUP BY a.xid) s",
                    &[&first, &backlog],
                )
                .await
        }
        .await;
        self.finish_backlog(first, result).await
    }

    /// Ends a backlog pass's transaction (COMMIT when its statements succeeded, else
    /// ROLLBACK) and publishes the `n` ids it assigned from `first`.
    async fn finish_backlog(
        &mut self,
        first: i64,
        result: Result<u64, tokio_postgres::Error>,
    ) -> Result<(), SequencerError> {
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
        self.published_backlog(first, n).await
    }

    /// Publishes the `n` backlog transactions sequenced from sync id `first` on.
    async fn published_backlog(&mut self, first: i64, n: u64) -> Result<(), SequencerError> {
        if n == 0 {
            return Ok(());
        }
        let last: i64 = self
            .db
            .query_one("SELECT pg_sync.last_sync_id()", &[])
            .await?
            .get(0);
        tracing::info!(transactions = n, first, last, "sequenced backlog");
        // The backlog's membership changes are among its actions, applied at their
        // positions; the reconciliation comes after them, as of where they left the hub.
        self.revoke_gone_keys().await?;
        self.publish_from_db(first, last, vec![]).await?;
        self.reconcile_groups(last).await?;
        self.next_sync_id = last + 1;
        Ok(())
    }

    /// Sequences committed actions that the slot will never stream: those written before the
    /// slot existed (or while no slot held them). Transactions committed while the worker was
    /// down are not among them: the slot streams those, in commit order, and only the stream
    /// knows that order, so they are left to it. Which unsequenced transactions the slot will
    /// stream is read by peeking at the slot (not consuming it) in the snapshot the backlog is
    /// taken from; the rest go first, ordered as in `resolve_backlog` (by their highest
    /// version). One that is streamed anyway is recognised by its xid
    /// and skipped.
    async fn sequence_backlog_peeked(&mut self) -> Result<(), SequencerError> {
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
                     SELECT xid, $1 + sum(n) OVER (ORDER BY last_version, first_id) - n, n, '0/0', now()
                       FROM (SELECT a.xid, min(a.id) AS first_id, max(a.version) AS last_version, count(*)::int AS n
                               FROM pg_sync.sync_actions a
                              WHERE NOT EXISTS (SELECT 1 FROM pg_sync.commit_order c WHERE c.xid = a.xid)
                              GROUP BY a.xid) s
                      WHERE (s.xid::text::bigint % 4294967296) <> ALL ($2::bigint[])",
                    &[&first, &streamed],
                )
                .await
        }
        .await;
        self.finish_backlog(first, result).await
    }

    /// Closes the sessions of API keys that no longer exist (called before publishing a gap:
    /// a key revoked in it gets none of it).
    async fn revoke_gone_keys(&self) -> Result<(), SequencerError> {
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
        Ok(())
    }

    /// Gives the hub the groups of every user it tracks as of sync id `at` (where the hub's
    /// publishing has got to: changes sequenced above it, or not yet, are taken as before
    /// them). Every membership change is logged and applied at its position, so this changes
    /// nothing unless a change escaped the log (a trigger disabled by the owner); called after
    /// publishing, never before, so it cannot run ahead of the position (REVIEW rev2 F3).
    async fn reconcile_groups(&self, at: i64) -> Result<(), SequencerError> {
        let users = self.hub.users();
        if users.is_empty() {
            return Ok(());
        }
        // `stream::load_groups` for many users: the memberships now, each whose membership
        // changed after `at` taken as it was before its first such change.
        let rows = self
            .db
            .query(
                "WITH later AS (
                     SELECT DISTINCT ON (m.user_id, m.group_id) m.user_id, m.group_id, m.joined
                       FROM pg_sync.membership_log m
                       JOIN pg_sync.sync_actions a ON a.id = m.action_id
                       LEFT JOIN pg_sync.commit_order c ON c.xid = a.xid
                      WHERE m.user_id = ANY ($1)
                        AND (c.xid IS NULL
                             OR c.first_sync_id + (SELECT count(*) FROM pg_sync.sync_actions b
                                                    WHERE b.xid = a.xid AND b.id < a.id) > $2)
                      ORDER BY m.user_id, m.group_id, m.action_id),
                 at_pos AS (
                     SELECT g.user_id, g.group_id FROM pg_sync.group_memberships g
                      WHERE g.user_id = ANY ($1)
                        AND NOT EXISTS (SELECT 1 FROM later l
                                         WHERE l.user_id = g.user_id AND l.group_id = g.group_id)
                     UNION
                     SELECT l.user_id, l.group_id FROM later l WHERE NOT l.joined)
                 SELECT user_id, array_agg(group_id) FROM at_pos GROUP BY user_id",
                &[&users, &at],
            )
            .await?;
        let fresh: HashMap<String, Vec<String>> =
            rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        self.hub.refresh_groups(&fresh);
        Ok(())
    }

    /// Takes in one decoded message of an open transaction: its actions (membership changes
    /// among them) and its API key changes. The memberships and the registry, where a
    /// publication still carries them, are not followed: the log says all the hub needs.
    fn absorb(&mut self, txn: &mut OpenTxn, msg: Message) {
        let ours =
            |r: &super::pgoutput::Relation, name: &str| r.namespace == "pg_sync" && r.name == name;
        match msg {
            Message::Insert { relation, row } if ours(&relation, "sync_actions") => {
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
            // A key whose hash, user or id changed no longer stands for its sessions; any
            // other edit (a label) leaves them be. The old row comes whole (REPLICA IDENTITY
            // FULL); without it nothing tells what changed, so the key's sessions are closed,
            // to be safe.
            Message::Update { relation, old, row } if ours(&relation, "api_keys") => {
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
            Message::Truncate { relations } if relations.iter().any(|r| ours(r, "api_keys")) => {
                txn.all_keys_revoked = true;
            }
            Message::Delete { relation, key } if ours(&relation, "api_keys") => {
                txn.revoked_keys.extend(key.get("id").cloned().flatten());
            }
            Message::Insert { relation, .. }
            | Message::Update { relation, .. }
            | Message::Delete { relation, .. }
                if ours(&relation, "registry") =>
            {
                txn.registry_changed = true;
            }
            Message::Truncate { relations } if relations.iter().any(|r| ours(r, "registry")) => {
                txn.registry_changed = true;
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

    /// Persists the sync ids of `xids` (consecutive from `next_sync_id`, in this order) in one
    /// statement, and returns the xids a backlog pass had sequenced already (skipped).
    ///
    /// Decoding can deliver a commit before the committing backend has left the proc array (it
    /// flushes its commit record first), so a transaction can be streamed here while snapshots
    /// still see it in progress. Ids persisted then would name actions a reader cannot see yet:
    /// `changes()` would return the range with a hole, and a peer or a replaying client would
    /// move its cursor past actions it never got. So the statement persists nothing until every
    /// one of the transactions is visible in its own snapshot (then in every later one too),
    /// and the sequencer asks again shortly.
    async fn persist(
        &self,
        xids: &[String],
        stream_xids: &[i64],
        counts: &[i32],
        lsns: &[String],
        times: &[i64],
    ) -> Result<std::collections::HashSet<String>, SequencerError> {
        let started = Instant::now();
        let mut waits = 0u32;
        loop {
            let row = self
                .db
                .query_one(
                    "WITH u AS (
                       SELECT x::xid8 AS x, c, l::pg_lsn AS l, t, o
                         FROM unnest($1::text[], $2::int[], $3::text[], $4::bigint[]) WITH ORDINALITY AS u(x, c, l, t, o)),
                     -- The committing transactions' own xids: the stream's 32 bits widened
                     -- by the epoch of the newest xid8 below this snapshot's xmax that has them.
                     v AS (
                       SELECT coalesce(bool_and(pg_visible_in_snapshot(
                                (m.xmax - ((m.xmax % 4294967296 - s.x + 4294967296) % 4294967296))::text::xid8,
                                pg_current_snapshot())), true) AS visible
                         FROM unnest($6::bigint[]) AS s(x),
                              (SELECT pg_snapshot_xmax(pg_current_snapshot())::text::numeric AS xmax) m),
                     k AS (
                       SELECT u.*, EXISTS (SELECT 1 FROM pg_sync.commit_order co WHERE co.xid = u.x) AS known FROM u),
                     ins AS (
                       INSERT INTO pg_sync.commit_order (xid, first_sync_id, action_count, commit_lsn, committed_at)
                       SELECT x, $5 + sum(c) OVER (ORDER BY o) - c, c, l, to_timestamp((t + 946684800000000)::float8 / 1e6)
                         FROM k WHERE NOT known AND (SELECT visible FROM v))
                     SELECT (SELECT visible FROM v), ARRAY(SELECT x::text FROM k WHERE known)",
                    &[
                        &xids,
                        &counts,
                        &lsns,
                        &times,
                        &self.next_sync_id,
                        &stream_xids,
                    ],
                )
                .await?;
            if row.get::<_, bool>(0) {
                if waits > 0 {
                    tracing::debug!(
                        waits,
                        waited_ms = started.elapsed().as_millis() as u64,
                        "sequencer: waited for streamed transactions to become visible"
                    );
                }
                return Ok(row.get::<_, Vec<String>>(1).into_iter().collect());
            }
            waits += 1;
            self.status.visibility_waits.fetch_add(1, Ordering::Relaxed);
            // Normally microseconds; as long as a synchronous standby keeps the committer
            // waiting. Bounded, so the session restarts (and a shutdown gets through) instead
            // of waiting here for good: what is pending is unacknowledged and streams again.
            if started.elapsed() >= VISIBILITY_WAIT_MAX {
                return Err(SequencerError::NotVisible(started.elapsed()));
            }
            tokio::time::sleep(Duration::from_millis(if waits < 100 { 1 } else { 10 })).await;
        }
    }

    /// Persists, publishes, then acknowledges everything pending.
    async fn flush(&mut self, repl: &ReplicationClient) -> Result<(), SequencerError> {
        if self.unresolved.is_some() {
            // Nothing is sequenced before the backlog (it goes first); unacknowledged, what is
            // pending streams again after a restart.
            return Ok(());
        }
        self.pending_since = None;
        if self.pending.is_empty() {
            return Ok(());
        }
        if crate::failpoint::fire("panic_in_flush") {
            panic!("failpoint panic_in_flush");
        }
        let pending = std::mem::take(&mut self.pending);
        self.pending_actions = 0;
        let started = std::time::Instant::now();
        // Persisted in one round trip: transactions a backlog pass already sequenced (known by
        // their xid) are skipped by the statement, which names them; the others get
        // consecutive ids in commit order, exactly as assigned below.
        let mut xids = vec![];
        let mut stream_xids = vec![];
        let mut counts = vec![];
        let mut lsns = vec![];
        let mut times = vec![];
        for txn in &pending {
            if txn.commit_lsn <= self.last_commit_lsn || txn.count == 0 {
                continue;
            }
            xids.push(txn.xid.clone().unwrap_or_default());
            stream_xids.push(i64::from(txn.stream_xid));
            counts.push(txn.count as i32);
            lsns.push(txn.commit_lsn.to_pg_string());
            times.push(txn.committed_at_us);
        }
        let known: std::collections::HashSet<String> = if xids.is_empty() {
            Default::default()
        } else {
            self.persist(&xids, &stream_xids, &counts, &lsns, &times)
                .await?
        };
        let mut firsts = vec![];
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
            firsts.push((first, txn.count as u64));
            assigned.push((first, txn));
        }
        if crate::failpoint::fire("after_persist") {
            return Err(SequencerError::Failpoint("after_persist"));
        }
        // Holds persisted ids unpublished for a while (not the first transaction's, so a test
        // can have one published first).
        if firsts.first().is_some_and(|f| f.0 > 1) && crate::failpoint::fire("stall_after_persist")
        {
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        // Persisted: now clients may see these ids.
        let mut batch = vec![];
        for (first, txn) in &assigned {
            if *first == 0 {
                // Sequenced (and published) already: its membership changes came with it.
                batch.push(Published {
                    revoked_keys: txn.revoked_keys.clone(),
                    all_keys_revoked: txn.all_keys_revoked,
                    ..Published::default()
                });
                continue;
            }
            if txn.large {
                // Its key revocations go first, as they do in publish_large.
                batch.push(Published {
                    all_keys_revoked: txn.all_keys_revoked,
                    ..Published::default()
                });
                self.hub.publish(&std::mem::take(&mut batch));
                self.publish_large(*first, txn).await?;
                continue;
            }
            let mut rows: Vec<&Row> = txn.actions.iter().collect();
            // Each key read once (not a cloned string per comparison).
            rows.sort_by_cached_key(|r| {
                r.get("id")
                    .and_then(|v| v.as_deref())
                    .and_then(|v| v.parse::<i64>().ok())
                    .unwrap_or(0)
            });
            let mut deltas = Vec::with_capacity(rows.len());
            for (i, row) in rows.into_iter().enumerate() {
                // Global is what the action says (no group id), as replay judges it: never the
                // registry now, which a re-registration may have changed since.
                let global = row.get("group_id").is_none_or(|g| g.is_none());
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
            batch.extend(at_positions(
                deltas,
                last,
                txn.revoked_keys.clone(),
                txn.all_keys_revoked,
            ));
        }
        self.hub.publish(&batch);
        let latency = &self.hub.metrics.latency;
        latency.flushed(started, pending.iter().map(|t| t.committed_at_us));
        if pending.iter().any(|t| t.registry_changed) {
            self.hub.wake_all();
        }
        self.status
            .sequenced_actions
            .fetch_add(firsts.iter().map(|f| f.1).sum(), Ordering::Relaxed);
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

    /// Publishes a transaction too large to hold, page by page from the database.
    async fn publish_large(&mut self, first: i64, txn: &ReadyTxn) -> Result<(), SequencerError> {
        let last = first + txn.count as i64 - 1;
        self.publish_from_db(first, last, txn.revoked_keys.clone())
            .await
    }

    /// Publishes the persisted sync ids `first..=last`, read back page by page (membership
    /// changes at their positions); the revocations ride on the first page.
    async fn publish_from_db(
        &self,
        first: i64,
        last: i64,
        mut revoked_keys: Vec<String>,
    ) -> Result<(), SequencerError> {
        let mut after = first - 1;
        while after < last {
            let span = page_span(after, last, LARGE_PAGE);
            let deltas = changes(&self.db, after, None, span, None).await?;
            after += span as i64;
            self.hub.publish(&at_positions(
                deltas,
                after,
                std::mem::take(&mut revoked_keys),
                false,
            ));
        }
        Ok(())
    }
}

/// How many sync ids the next page after `after` covers on the way to `last`: at most `max`,
/// and computed in 64 bits (a gap past 2^31 must not wrap into a negative span).
pub fn page_span(after: i64, last: i64, max: i32) -> i32 {
    (last - after).clamp(0, i64::from(max)) as i32
}

/// A sequenced transaction (or page of one) as the hub takes it: each membership change in it
/// (an action of `MEMBERSHIP_MODEL`) applies at its own position, so the deltas after it go in
/// a part of their own that carries it first. Key revocations go first; the last part moves
/// the watermark to `last_sync_id`.
fn at_positions(
    deltas: Vec<Arc<Delta>>,
    last_sync_id: i64,
    revoked_keys: Vec<String>,
    all_keys_revoked: bool,
) -> Vec<Published> {
    let mut parts = vec![Published {
        revoked_keys,
        all_keys_revoked,
        ..Published::default()
    }];
    for d in deltas {
        let Some(member) = &d.member else {
            parts.last_mut().expect("one part").deltas.push(d);
            continue;
        };
        if !parts.last().expect("one part").deltas.is_empty() {
            parts.push(Published::default());
        }
        parts
            .last_mut()
            .expect("one part")
            .memberships
            .push(MembershipChange {
                user_id: member.user_id.clone(),
                group_id: d.group_id.clone().unwrap_or_default(),
                joined: member.joined,
                sync_id: Some(d.sync_id),
            });
    }
    parts.last_mut().expect("one part").last_sync_id = last_sync_id;
    parts
}

/// Reads sequenced deltas with sync ids after+1 ..= after+span, of `groups` (None: all) plus
/// global models, and the membership changes of `member` (None: everyone's).
pub async fn changes(
    db: &Client,
    after: i64,
    groups: Option<&[String]>,
    span: i32,
    member: Option<&str>,
) -> Result<Vec<Arc<Delta>>, tokio_postgres::Error> {
    // `pg_sync.changes()` returns every user's membership changes; a reader for one user drops
    // the others here, in the database, not after shipping and decoding them: with 10,000
    // users each subscribing from 0, that was 10,000 x 10,000 rows turned into deltas and thrown
    // away (the fan-out bench's set-up took over ten minutes).
    let rows = db
        .query(
            "SELECT sync_id, global, model, model_id, action, data::text, version, group_id, prev_group_id,
                    moved::text, client_id, client_tx_id::text
               FROM pg_sync.changes($1, $2, $3)
              WHERE $4::text IS NULL OR model <> '$membership' OR model_id = $4
              ORDER BY sync_id",
            &[&after, &groups, &span, &member],
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

    /// A membership change applies at its own position: the deltas before it go out before
    /// it, those after it after it; the last part moves the watermark.
    #[test]
    fn membership_changes_split_a_transaction_at_their_positions() {
        let row = |id: i64, model: &str, action: &str, group: &str| {
            let (model, action, group) = (model.to_owned(), action.to_owned(), group.to_owned());
            Arc::new(Delta::from_columns(id, false, move |c| match c {
                "model" => Some(model.clone()),
                "model_id" => Some("u".into()),
                "action" => Some(action.clone()),
                "group_id" => Some(group.clone()),
                _ => None,
            }))
        };
        let parts = at_positions(
            vec![
                row(5, "todos", "I", "a"),
                row(6, crate::delta::MEMBERSHIP_MODEL, "J", "b"),
                row(7, crate::delta::MEMBERSHIP_MODEL, "L", "a"),
                row(8, "todos", "I", "b"),
            ],
            8,
            vec!["k".into()],
            false,
        );
        let shape: Vec<String> = parts
            .iter()
            .map(|p| {
                let deltas: Vec<String> = p.deltas.iter().map(|d| d.sync_id.to_string()).collect();
                let members: Vec<String> = p
                    .memberships
                    .iter()
                    .map(|m| {
                        format!(
                            "{}{}@{:?}",
                            if m.joined { "+" } else { "-" },
                            m.group_id,
                            m.sync_id
                        )
                    })
                    .collect();
                format!(
                    "[{}] d[{}] last {}",
                    members.join(" "),
                    deltas.join(" "),
                    p.last_sync_id
                )
            })
            .collect();
        assert_eq!(
            shape,
            ["[] d[5] last 0", "[+b@Some(6) -a@Some(7)] d[8] last 8"]
        );
        assert_eq!(parts[0].revoked_keys, ["k"]);
        // Its frame is a membership frame at its own sync id.
        let m: serde_json::Value =
            serde_json::from_str(row(6, "$membership", "J", "b").frame.as_str()).unwrap();
        assert_eq!(
            m,
            serde_json::json!({"type": "membership", "groupId": "b", "joined": true, "syncId": 6})
        );
    }

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
