//! One replication session: connects, resolves what a previous session left (a persisted but
//! unpublished gap, the start-up backlog), then follows the stream: decodes each transaction,
//! hands committed ones to sequencing in batches, and acknowledges what is done. `run` restarts
//! sessions after failures.

use super::backlog::{Backlog, Unresolved};
use super::setup::{connect, ensure_setup, replication_config};
use super::{
    HolderReplies, SequencerError, Status, Walsender, FLUSH_ACTIONS, FLUSH_AFTER, FLUSH_POLL,
    PG_EPOCH_US, PROBE_EVERY, PROBE_TIMEOUT, REPLY_FRESH, WALSENDER_COLUMNS,
};
use crate::config::Config;
use crate::delta::{Delta, Unsequenced, COLUMNS};
use crate::hub::Hub;
use crate::replication::pgoutput::{Decoder, Message, Positions};
use futures::FutureExt;
use pgwire_replication::{Lsn, ReplicationClient, ReplicationEvent};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_postgres::Client;

/// The columns of a `sync_actions` row the tail reads: the delta's (`COLUMNS`), `id`, `xid`.
const ACTION_COLUMNS: [&str; 12] = {
    let mut names = [""; 12];
    let mut i = 0;
    while i < COLUMNS.len() {
        names[i] = COLUMNS[i];
        i += 1;
    }
    names[10] = "id";
    names[11] = "xid";
    names
};

/// A streamed action: its delta, built while the stream is decoded (only the sync id is
/// missing), and its id in the log (the order of a transaction's actions).
pub(super) struct Action {
    pub(super) id: i64,
    pub(super) delta: Unsequenced,
}

pub(super) struct OpenTxn {
    pub(super) commit_lsn: Lsn,
    pub(super) actions: Vec<Action>,
    pub(super) count: usize,
    pub(super) large: bool,
    pub(super) xid: Option<String>,
    /// The committing transaction's own xid as the stream names it (low 32 bits). The log
    /// rows' `xid` column is not always it: a restore keeps the old cluster's, and xid_guard
    /// remaps those above 2^62.
    pub(super) stream_xid: u32,
    pub(super) revoked_keys: Vec<String>,
    /// TRUNCATE of the API keys: every key session is closed.
    pub(super) all_keys_revoked: bool,
    /// A registration changed (`register_table` again, `unregister_table`): held `/v1/shape`
    /// requests wake to answer their 409.
    pub(super) registry_changed: bool,
    /// Its actions' groups, persisted as `commit_order.group_ids` (see `TxnGroups`).
    pub(super) groups: TxnGroups,
    /// Its actions' ids, persisted as `commit_order.first_action_id` (see `TxnIds`).
    pub(super) ids: TxnIds,
}

/// The ids of a transaction's actions as far as `pg_sync.changes()` needs them: the lowest,
/// persisted as `commit_order.first_action_id` when they are contiguous (first .. first + n - 1
/// for its n actions, nothing between), so that a page computes an action's sync id from its
/// id (first_sync_id + id - first_action_id) instead of ranking the transaction's actions.
/// Not contiguous (NULL: ranked as before) when an id between them is not one of its actions:
/// a rolled-back savepoint's, or another transaction's drawn in between. Also when an action
/// came without a readable id, or with another xid than the first one's (a restored log's rows).
#[derive(Debug, Default, Clone, PartialEq)]
pub(super) struct TxnIds {
    min: i64,
    max: i64,
    n: i64,
    /// An action without a readable id, or of another xid: never contiguous.
    broken: bool,
}

impl TxnIds {
    /// Takes in one action's id (`None`: unreadable) and whether its xid is the transaction's.
    pub(super) fn add(&mut self, id: Option<i64>, same_xid: bool) {
        match id {
            Some(id) if same_xid && !self.broken => {
                if self.n == 0 {
                    (self.min, self.max) = (id, id);
                } else {
                    self.min = self.min.min(id);
                    self.max = self.max.max(id);
                }
                self.n += 1;
            }
            _ => self.broken = true,
        }
    }

    /// `commit_order.first_action_id`: the lowest id when the `n` ids (distinct: the log's key
    /// refuses an id twice within a transaction) fill min .. max exactly; else `None` (NULL).
    pub(super) fn first(&self) -> Option<i64> {
        (!self.broken && self.n > 0 && self.max.checked_sub(self.min) == Some(self.n - 1))
            .then_some(self.min)
    }
}

/// The groups of a transaction's actions as `pg_sync.changes()` filters them, persisted in
/// `commit_order.group_ids` so that a page for a reader of other groups does not read the
/// transaction's actions at all. `None` (NULL: always read) once the transaction has a global
/// action (no group id), a membership change (passed to its member whatever the reader's
/// groups), more than `MAX_TXN_GROUPS` groups, or a group id longer than
/// `MAX_LISTED_GROUP_BYTES`. A missing group would hide that group's
/// actions from its readers: every action counted is taken in, past the buffer too.
#[derive(Debug, Default, Clone, PartialEq)]
pub(super) struct TxnGroups(Option<Vec<String>>);

/// More groups than this in one transaction: `commit_order.group_ids` is NULL (always read).
pub(super) const MAX_TXN_GROUPS: usize = 32;

/// A group id longer than this (in bytes) is not listed: the list is NULL (always read). A
/// one-group list is a key of `commit_order_group_idx`, and btree refuses an entry over 2,704
/// bytes: a longer, incompressible id failed the sequencer's insert and stopped sequencing for
/// good (review rev15d F1). `commit_order`'s CHECK states the same bound.
pub(super) const MAX_LISTED_GROUP_BYTES: usize = 512;

impl TxnGroups {
    pub(super) fn new() -> TxnGroups {
        TxnGroups(Some(vec![]))
    }

    /// Takes in one action's model and group id.
    pub(super) fn add(&mut self, model: Option<&str>, group: Option<&str>) {
        let Some(groups) = self.0.as_mut() else {
            return;
        };
        match group {
            Some(g)
                if model != Some(crate::delta::MEMBERSHIP_MODEL)
                    && g.len() <= MAX_LISTED_GROUP_BYTES =>
            {
                if groups.iter().any(|have| have == g) {
                    return;
                }
                if groups.len() < MAX_TXN_GROUPS {
                    groups.push(g.to_owned());
                    return;
                }
                self.0 = None;
            }
            _ => self.0 = None,
        }
    }

    /// The list to persist; `None` for NULL.
    pub(super) fn get(&self) -> Option<&[String]> {
        self.0.as_deref()
    }
}

impl OpenTxn {
    /// Takes in one streamed action (its `ACTION_COLUMNS`), holding at most `txn_buffer` of
    /// them: a bigger transaction is re-read from the database when it is published.
    pub(super) fn take_action(&mut self, v: &[Option<&str>; 12], txn_buffer: usize) {
        if self.xid.is_none() {
            self.xid = v[11].map(str::to_owned);
        }
        self.count += 1;
        self.groups.add(v[0], v[5]);
        let id = v[10].and_then(|id| id.parse::<i64>().ok());
        self.ids
            .add(id, v[11].is_some() && v[11] == self.xid.as_deref());
        if self.large {
            // Re-read from the database (`publish_large`): building its deltas now would be
            // a JSON pass over every action thrown away, and holding them memory it must not
            // take.
            return;
        }
        if self.actions.len() < txn_buffer {
            // Global is what the action says (no group id), as replay judges it: never the
            // registry now, which a re-registration may have changed since.
            let global = v[5].is_none();
            let delta_columns = [v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9]];
            self.actions.push(Action {
                id: id.unwrap_or(0),
                delta: Delta::unsequenced(global, &delta_columns),
            });
        } else {
            // Bounded memory: a huge transaction is re-read from the database.
            self.large = true;
            self.actions = vec![];
        }
    }
}

/// A committed transaction waiting to be sequenced.
pub(super) struct ReadyTxn {
    pub(super) end_lsn: Lsn,
    pub(super) committed_at_us: i64,
    pub(super) txn: OpenTxn,
}

impl std::ops::Deref for ReadyTxn {
    type Target = OpenTxn;

    fn deref(&self) -> &OpenTxn {
        &self.txn
    }
}

pub(super) struct Session<'a> {
    pub(super) cfg: &'a Config,
    pub(super) db: Client,
    pub(super) hub: &'a Hub,
    pub(super) status: &'a Status,
    pub(super) next_sync_id: i64,
    pub(super) last_commit_lsn: Lsn,
    pub(super) pending: Vec<ReadyTxn>,
    pub(super) pending_actions: usize,
    pub(super) pending_since: Option<Instant>,
    /// A fence message seen while transactions were pending; processed once they are.
    pub(super) fence: Option<Lsn>,
    /// The start-up backlog not yet told apart from what the slot streams.
    pub(super) unresolved: Option<Unresolved>,
    /// `PERSIST_SQL`, prepared on this session's connection.
    pub(super) persist_stmt: Option<tokio_postgres::Statement>,
    /// Acknowledgements waiting for their persists to be durable.
    pub(super) acks: Acks,
    /// When the flush position was last read.
    pub(super) flush_seen: Instant,
    /// Set while what clients may have seen is not all in the database (see `Hold`).
    pub(super) hold: Option<Hold>,
    /// Sync ids up to this one were delivered to live subscribers before a crash of Postgres
    /// lost some of their persists: assigned again, they are not delivered a second time.
    pub(super) skip_through: i64,
    /// Every transaction committed below this LSN has been sequenced in this session.
    pub(super) processed: Lsn,
    /// A keepalive's position that arrived with transactions pending: processed once they are.
    pub(super) caught_up: Lsn,
    /// Where `ACTION_COLUMNS` are in the log's rows.
    pub(super) columns: Positions<12>,
    /// The publication carries every change of `pg_sync.api_keys` (`ensure_setup`).
    pub(super) follows_keys: bool,
    /// What `probe_stream` has seen of this session's walsender's `reply_time`.
    pub(super) replies: std::sync::Mutex<Option<HolderReplies>>,
}

/// A slot acknowledgement (`ack`) that waits until the WAL is flushed past `bound` (the commit
/// of the persist it depends on is below `bound`; `None` until a later statement read the
/// insert position). Persists commit asynchronously: the slot must never be confirmed past a
/// transaction whose persist a crash could still lose, or that transaction would not stream
/// again and the start-up backlog pass would sequence it by another rule (its highest action
/// id), which can differ from commit order, so the ids clients saw could name other actions.
struct Unconfirmed {
    bound: Option<Lsn>,
    ack: Lsn,
    /// The last sync id assigned when it was queued.
    last_id: i64,
}

/// The acknowledgements waiting for the WAL flush (`Unconfirmed`), oldest first, and the
/// server's flush position as last read.
pub(super) struct Acks {
    waiting: VecDeque<Unconfirmed>,
    flushed: Lsn,
}

impl Acks {
    /// What a session starts from (persisted by an earlier session, perhaps asynchronously:
    /// sync ids up to `last_id`) counts as durable once the WAL is flushed past `inserted`.
    pub(super) fn new(inserted: Lsn, last_id: i64, flushed: Lsn) -> Acks {
        Acks {
            waiting: VecDeque::from([Unconfirmed {
                bound: Some(inserted),
                ack: Lsn::ZERO,
                last_id,
            }]),
            flushed,
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// Queues `ack` (sync ids up to `last_id` assigned) until the WAL is flushed past `bound`
    /// and past every earlier one's; `Some(Lsn::ZERO)` when it depends on no persist of its
    /// own. Returns it when it may be sent at once.
    pub(super) fn queue(&mut self, ack: Lsn, bound: Option<Lsn>, last_id: i64) -> Option<Lsn> {
        if bound == Some(Lsn::ZERO) {
            if self.waiting.is_empty() {
                return Some(ack);
            }
            // Rides with the one before it.
            if let Some(back) = self.waiting.back_mut() {
                if back.bound == Some(Lsn::ZERO) {
                    back.ack = back.ack.max(ack);
                    back.last_id = back.last_id.max(last_id);
                    return None;
                }
            }
        }
        self.waiting.push_back(Unconfirmed {
            bound,
            ack,
            last_id,
        });
        None
    }

    /// A statement read the WAL insert position `inserted` (above the commit of every persist
    /// that returned before it was sent) and the flush position `flushed`.
    pub(super) fn saw_wal(&mut self, inserted: Lsn, flushed: Lsn) {
        for u in self.waiting.iter_mut() {
            if u.bound.is_none() {
                u.bound = Some(inserted);
            }
        }
        self.flushed = self.flushed.max(flushed);
    }

    /// Takes what is durable now: the acknowledgement to send (`Lsn::ZERO`: none) and the
    /// sync id every id up to which is durable.
    pub(super) fn confirm(&mut self) -> (Lsn, Option<i64>) {
        let mut ack = Lsn::ZERO;
        let mut durable = None;
        while let Some(u) = self.waiting.front() {
            if u.bound.is_none_or(|b| b > self.flushed) {
                break;
            }
            ack = ack.max(u.ack);
            durable = Some(u.last_id);
            self.waiting.pop_front();
        }
        (ack, durable)
    }
}

/// Clients may hold ids the database does not have (yet): a crash of Postgres lost persists
/// this worker had published (the hub still held them, `through`), or this worker started
/// fresh after a crash of both and clients come back with cursors from before. The slot
/// streams the lost transactions again (never acknowledged) and they get the same ids; until
/// every transaction committed below `end` (the server's flush position at the session's
/// start, above every transaction streamed before the crash) is sequenced again, the hub's
/// watermark stays unknown: replays and cursor checks answer "not ready; retry".
pub(super) struct Hold {
    pub(super) end: Lsn,
    pub(super) through: i64,
    /// The error for a re-stream short of `through` was logged.
    pub(super) short_logged: bool,
}

/// What a hold does once the stream has been sequenced through `processed` with ids up to
/// `last` assigned.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Settle {
    /// The stream is not past the hold's end yet.
    Wait,
    /// Past it, but fewer ids than were published came back: the hole stays held.
    Short,
    Release,
}

impl Hold {
    pub(super) fn settles(&self, processed: Lsn, last: i64) -> Settle {
        if processed < self.end {
            Settle::Wait
        } else if last < self.through {
            Settle::Short
        } else {
            Settle::Release
        }
    }
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
        status.slot_held.store(false, Ordering::Release);
        // No revocation reaches the hub until the next session streams.
        hub.known_keys.trust(false);
        match result {
            Ok(Ok(())) => return,
            Ok(Err(e)) => {
                hold_if_undurable(&hub, &status);
                status.reconnects.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, cause = %causes(&e), "replication session ended; reconnecting");
            }
            Err(panic) => {
                hold_if_undurable(&hub, &status);
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

/// After a session failed: when ids were published whose persists are not known to be durable,
/// Postgres may have crashed and lost them; no replay may read the database's hole below the
/// watermark until the next session knows (see `Hold`).
fn hold_if_undurable(hub: &Hub, status: &Status) {
    if hub.published() > status.durable_sync_id.load(Ordering::Acquire) {
        hub.hold();
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
    let follows_keys = ensure_setup(&db, cfg, status).await?;
    let row = db
        .query_one(
            "SELECT pg_sync.last_sync_id(), coalesce((SELECT max(commit_lsn) FROM pg_sync.commit_order), '0/0')::text,
                    pg_current_wal_flush_lsn()::text, pg_current_wal_insert_lsn()::text",
            &[],
        )
        .await?;
    let last_sync_id: i64 = row.get(0);
    let last_lsn: String = row.get(1);
    let flushed_at_start = Lsn::parse(&row.get::<_, String>(2)).unwrap_or(Lsn::ZERO);
    let inserted_at_start = Lsn::parse(&row.get::<_, String>(3)).unwrap_or(Lsn::ZERO);
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
        persist_stmt: None,
        acks: Acks::new(inserted_at_start, last_sync_id, flushed_at_start),
        flush_seen: Instant::now(),
        hold: None,
        skip_through: 0,
        processed: Lsn::ZERO,
        caught_up: Lsn::ZERO,
        columns: Positions::new(ACTION_COLUMNS),
        follows_keys,
        replies: std::sync::Mutex::new(None),
    };
    s.confirm(None);
    // What a previous session persisted but could not publish (it failed in between) reaches
    // live subscribers now, before anything newer.
    let published = hub.published();
    if !hub.is_known() || last_sync_id < published {
        // A fresh worker cannot know what clients saw before a crash of Postgres and of the
        // worker before it; a running one knows it published up to `published`. Either way
        // the hub waits until the stream has been sequenced past where the server's WAL was
        // flushed (above every transaction streamed before any crash).
        if hub.is_known() {
            tracing::warn!(
                published,
                last_sync_id,
                "published sync ids are missing from the database (Postgres crashed before their persist was flushed); holding the watermark until they are assigned again"
            );
            hub.hold();
            s.skip_through = published;
            status
                .reassigned_ids
                .fetch_add((published - last_sync_id) as u64, Ordering::Relaxed);
        }
        s.hold = Some(Hold {
            end: flushed_at_start,
            through: if hub.is_known() { published } else { 0 },
            short_logged: false,
        });
    } else {
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
        // Held after a failed session: nothing it published is missing.
        hub.release(last_sync_id);
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
    // Holds the stream back a while (tests: clients come back before anything is sequenced
    // again after a crash).
    if crate::failpoint::fire("stall_before_streaming") {
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let mut repl = ReplicationClient::connect(replication_config(
        cfg,
        encrypted,
        status.replication_name.as_str(),
    )?)
    .await?;
    // Held from here on (connect returns before the server accepted START_REPLICATION): every
    // transaction committed later streams in this session, the slot is ours (one walsender at a
    // time), and federation may run here (its senders are woken by this worker's publishes). A
    // worker whose slot is held by another ends the session here, never looking as if it
    // streamed.
    tokio::select! {
        started = repl.wait_started() => started?,
        _ = shutdown.changed() => {
            let _ = tokio::time::timeout(Duration::from_secs(2), repl.shutdown()).await;
            return Ok(());
        }
    }
    status.slot_held.store(true, Ordering::Release);
    // This session's walsender (the slot is held by it now), which `probe_stream` looks for.
    let walsender: Option<Walsender> =
        s.db.query_opt(
            &format!(
                "SELECT {WALSENDER_COLUMNS}
                   FROM pg_replication_slots s
                   JOIN pg_stat_replication r ON r.pid = s.active_pid
                  WHERE s.slot_name = $1"
            ),
            &[&cfg.slot],
        )
        .await?
        .map(|r| Walsender::from_row(&r, 0));
    let mut next_probe = tokio::time::Instant::now() + PROBE_EVERY;
    if s.unresolved.is_none() && s.hold.is_none() {
        s.streaming();
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
        // Acknowledgements wait for the WAL flush: looked at again shortly when no persist
        // (which reads it too) did meanwhile.
        let poll_at = (!s.acks.is_empty()).then(|| s.flush_seen + FLUSH_POLL);
        let flush_poll = async {
            match poll_at {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending::<()>().await,
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
            _ = idle_flush => { s.flush(&st.repl).await?; s.settle(); continue; }
            _ = flush_poll => { s.poll_flushed(&st.repl).await?; continue; }
            _ = tokio::time::sleep_until(next_probe) => {
                s.probe_stream(walsender).await?;
                next_probe = tokio::time::Instant::now() + PROBE_EVERY;
                continue;
            }
        };
        // Anything from the stream (a keepalive too) shows the link is alive.
        hub.known_keys.heard();
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
            if s.hold.is_none() {
                s.streaming();
            }
        }
        if s.handle(&mut st, event).await? {
            return Ok(());
        }
        s.settle();
    }
}

/// The replication stream and the transaction being received from it.
pub(super) struct Stream {
    pub(super) repl: ReplicationClient,
    pub(super) decoder: Decoder,
    pub(super) open: Option<OpenTxn>,
}

impl Session<'_> {
    /// Handles one stream event; true when the stream ended.
    pub(super) async fn handle(
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
                    groups: TxnGroups::new(),
                    ids: TxnIds::default(),
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
                // The walsender sends one when it has sent everything (it waits for more WAL):
                // every transaction committed below `wal_end` has arrived. With some of them
                // pending, the position counts as processed once they are flushed (the idle
                // flush follows at once). Dropped, it would not: on an idle server the next
                // keepalive may come only once more WAL is flushed (up to `wal_writer_delay`
                // later, 10 s in the crash tests), and a hold waiting for the stream to pass its
                // end waited that long (CI failure on dedd422). Not flushed here: under load
                // the walsender sends one each time it catches up, and a flush per keepalive
                // cut batches 5x (fan-out bench).
                if st.open.is_none() && self.unresolved.is_none() && !self.pending.is_empty() {
                    self.caught_up = self.caught_up.max(wal_end);
                }
                if st.open.is_none() && self.pending.is_empty() && self.unresolved.is_none() {
                    self.queue_ack(&st.repl, wal_end, Some(Lsn::ZERO));
                    self.processed = self.processed.max(wal_end);
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

    /// Takes in one decoded message of an open transaction: its actions (membership changes
    /// among them) and its API key changes. The memberships and the registry, where a
    /// publication still carries them, are not followed: the log says all the hub needs.
    pub(super) fn absorb(&mut self, txn: &mut OpenTxn, msg: Message) {
        let ours = |r: &crate::replication::pgoutput::Relation, name: &str| {
            r.namespace == "pg_sync" && r.name == name
        };
        match msg {
            Message::Insert { relation, row } if ours(&relation, "sync_actions") => {
                let v = self.columns.get(&row).map(Option::flatten);
                txn.take_action(&v, self.cfg.txn_buffer);
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
                        .extend(old.as_ref().and_then(|o| o.text("id")).map(str::to_owned));
                    txn.revoked_keys.extend(row.text("id").map(str::to_owned));
                }
            }
            Message::Truncate { relations } if relations.iter().any(|r| ours(r, "api_keys")) => {
                txn.all_keys_revoked = true;
            }
            Message::Delete { relation, key } if ours(&relation, "api_keys") => {
                txn.revoked_keys.extend(key.text("id").map(str::to_owned));
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

    /// Queues the acknowledgement of `ack` until the WAL is flushed past `bound` (and past
    /// every earlier one's), or sends it at once when nothing waits.
    pub(super) fn queue_ack(&mut self, repl: &ReplicationClient, ack: Lsn, bound: Option<Lsn>) {
        if let Some(ack) = self.acks.queue(ack, bound, self.next_sync_id - 1) {
            self.ack(repl, ack);
        }
    }

    /// Everything a statement reading `pg_current_wal_insert_lsn()` = `inserted` found: the
    /// persists committed before it have their bound; `flushed` is the WAL flush position.
    pub(super) fn saw_wal(&mut self, inserted: Lsn, flushed: Lsn) {
        self.acks.saw_wal(inserted, flushed);
        self.flush_seen = Instant::now();
    }

    /// Sends the acknowledgements whose persists are durable now.
    pub(super) fn confirm(&mut self, repl: Option<&ReplicationClient>) {
        let (ack, durable) = self.acks.confirm();
        if let Some(id) = durable {
            self.status.durable_sync_id.store(id, Ordering::Release);
        }
        if let Some(repl) = repl.filter(|_| ack > Lsn::ZERO) {
            self.ack(repl, ack);
        }
    }

    /// Reads the server's WAL positions (one cheap round trip) and acknowledges what is durable.
    pub(super) async fn poll_flushed(
        &mut self,
        repl: &ReplicationClient,
    ) -> Result<(), SequencerError> {
        let row = self
            .db
            .query_one(
                "SELECT pg_current_wal_insert_lsn()::text, pg_current_wal_flush_lsn()::text",
                &[],
            )
            .await?;
        let lsn = |i: usize| Lsn::parse(&row.get::<_, String>(i)).unwrap_or(Lsn::ZERO);
        self.saw_wal(lsn(0), lsn(1));
        self.confirm(Some(repl));
        Ok(())
    }

    /// Ends a hold once the stream is sequenced past its end (see `Hold`).
    pub(super) fn settle(&mut self) {
        let Some(h) = &self.hold else { return };
        if self.unresolved.is_some() || !self.pending.is_empty() {
            return;
        }
        let last = self.next_sync_id - 1;
        match h.settles(self.processed, last) {
            Settle::Wait => return,
            Settle::Short => {
                // Ids follow from the counter and the commit order alone, so the re-stream
                // assigns every lost id again; short of them, releasing would let replays
                // read the hole and skip ids clients never get again. Kept held (said once).
                if !h.short_logged {
                    tracing::error!(
                        last,
                        published = h.through,
                        "after a crash of Postgres the stream was sequenced past where it started below what was published; keeping the watermark held"
                    );
                }
                if let Some(h) = &mut self.hold {
                    h.short_logged = true;
                }
                return;
            }
            Settle::Release => {}
        }
        if h.through > 0 {
            tracing::info!(
                last,
                published = h.through,
                "the ids lost with a crash of Postgres are assigned again; watermark released"
            );
        }
        self.hold = None;
        self.hub.release(last);
        self.streaming();
    }

    /// Everything is sequenced as it streams from here on: health says so, and the hub's
    /// cache of valid API keys may answer (every revocation committed from now on is
    /// published to it, when the publication carries every change of `pg_sync.api_keys`).
    fn streaming(&self) {
        if !self.status.streaming.load(Ordering::Acquire) {
            self.hub.known_keys.trust(self.follows_keys);
            self.status.streaming.store(true, Ordering::Release);
        }
    }

    /// Asks the server whether the stream is alive: this session's walsender still holds the
    /// slot (else the session ends: a link that died silently leaves the worker waiting for
    /// messages forever while the server ended its side at `wal_sender_timeout`), and it had a
    /// status update from this worker lately (then the key memory counts as fresh; otherwise
    /// it stops answering until the stream is heard from again, `KnownKeys::heard`). A
    /// publication altered since the session started so that it no longer carries every
    /// revocation of a key ends the session too (the next one looks at it again).
    async fn probe_stream(&self, walsender: Option<Walsender>) -> Result<(), SequencerError> {
        let sql = format!(
            "SELECT s.active_pid, (extract(epoch FROM r.backend_start) * 1000000)::int8,
                    (extract(epoch FROM r.reply_time) * 1000000)::int8, {}
               FROM pg_replication_slots s
               LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid
              WHERE s.slot_name = $1",
            super::setup::follows_keys_sql("$2")
        );
        let row = tokio::time::timeout(
            PROBE_TIMEOUT,
            self.db
                .query_opt(&sql, &[&self.cfg.slot, &self.cfg.publication]),
        )
        .await
        .map_err(|_| SequencerError::ProbeTimeout(PROBE_TIMEOUT))??;
        let (holder, reply, follows) = row
            .map(|r| {
                (
                    r.get::<_, Option<i32>>(0).map(|pid| Walsender {
                        pid,
                        started: r.get(1),
                    }),
                    r.get::<_, Option<i64>>(2),
                    r.get::<_, Option<bool>>(3),
                )
            })
            .unwrap_or((None, None, None));
        if self.follows_keys && follows != Some(true) {
            return Err(SequencerError::PublicationChanged);
        }
        let Some(ours) = walsender else {
            return Ok(());
        };
        // Another walsender on the same pid (this one ended, a later one started) is not ours.
        if holder != Some(ours) {
            return Err(SequencerError::WalsenderGone);
        }
        // `reply_time` is stamped by this worker's wall clock, which may differ from the
        // server's: only whether it changed lately, by this worker's monotonic clock, counts.
        let fresh = {
            let mut seen = self.replies.lock().unwrap_or_else(|p| p.into_inner());
            let replies = HolderReplies::observe(&mut seen, ours, reply);
            reply.is_some() && replies.heard() && replies.silent_for() < REPLY_FRESH
        };
        if fresh {
            self.hub.known_keys.heard();
        }
        Ok(())
    }

    pub(super) fn ack(&self, repl: &ReplicationClient, lsn: Lsn) {
        repl.update_applied_lsn(lsn);
        self.status
            .acked_lsn
            .fetch_max(lsn.as_u64(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `absorb` reads the group by its position (5) and the id and xid after the delta's.
    #[test]
    fn action_columns_are_the_deltas_then_id_and_xid() {
        assert_eq!(ACTION_COLUMNS[..10], COLUMNS);
        assert_eq!(ACTION_COLUMNS[5], "group_id");
        assert_eq!(ACTION_COLUMNS[10..], ["id", "xid"]);
    }

    /// A transaction's groups for `commit_order.group_ids`: distinct, in first-seen order; NULL
    /// (always read) for a global action, a membership change, or past MAX_TXN_GROUPS.
    #[test]
    fn a_transactions_groups_are_listed_or_null() {
        let mut g = TxnGroups::new();
        for group in ["b", "a", "b", ""] {
            g.add(Some("todos"), Some(group));
        }
        assert_eq!(g.get(), Some(&["b".to_string(), "a".into(), "".into()][..]));
        let mut global = g.clone();
        global.add(Some("announcements"), None);
        assert_eq!(global.get(), None);
        global.add(Some("todos"), Some("c"));
        assert_eq!(global.get(), None, "NULL stays NULL");
        let mut member = TxnGroups::new();
        member.add(Some(crate::delta::MEMBERSHIP_MODEL), Some("a"));
        assert_eq!(member.get(), None);
        let mut many = TxnGroups::new();
        for i in 0..MAX_TXN_GROUPS {
            many.add(Some("todos"), Some(&format!("g{i}")));
        }
        assert_eq!(many.get().map(<[String]>::len), Some(MAX_TXN_GROUPS));
        many.add(Some("todos"), Some("g0"));
        assert_eq!(many.get().map(<[String]>::len), Some(MAX_TXN_GROUPS));
        many.add(Some("todos"), Some("one more"));
        assert_eq!(many.get(), None);
        let mut long = TxnGroups::new();
        long.add(Some("todos"), Some(&"x".repeat(MAX_LISTED_GROUP_BYTES)));
        assert_eq!(
            long.get().map(<[String]>::len),
            Some(1),
            "at the bound: listed"
        );
        long.add(Some("todos"), Some(&"y".repeat(MAX_LISTED_GROUP_BYTES + 1)));
        assert_eq!(long.get(), None, "past the bound: NULL");
    }

    /// `commit_order.first_action_id`: set only when the transaction's ids are exactly
    /// first .. first + n - 1, in any order; a hole (a rolled-back savepoint, another
    /// transaction's id between), an unreadable id or another xid gives NULL.
    #[test]
    fn a_transactions_first_action_id_only_when_its_ids_are_contiguous() {
        let ids = |list: &[i64]| {
            let mut t = TxnIds::default();
            for id in list {
                t.add(Some(*id), true);
            }
            t
        };
        assert_eq!(TxnIds::default().first(), None, "no actions");
        assert_eq!(ids(&[7]).first(), Some(7));
        assert_eq!(ids(&[7, 8, 9]).first(), Some(7));
        assert_eq!(ids(&[9, 7, 8]).first(), Some(7), "any order");
        assert_eq!(ids(&[7, 9]).first(), None, "8 rolled back with a savepoint");
        assert_eq!(ids(&[7, 8, 10, 11]).first(), None);
        assert_eq!(ids(&[7, 8, 9, 11]).first(), None, "a hole before the last");
        let mut unreadable = ids(&[7, 8]);
        unreadable.add(None, true);
        assert_eq!(unreadable.first(), None);
        unreadable.add(Some(9), true);
        assert_eq!(unreadable.first(), None, "stays NULL");
        let mut other_xid = ids(&[7]);
        other_xid.add(Some(8), false);
        assert_eq!(other_xid.first(), None);
        assert_eq!(ids(&[i64::MIN, i64::MAX]).first(), None, "no overflow");
        // Through take_action, past the buffer too (a large transaction is re-read, but its
        // ids are all counted).
        let mut txn = OpenTxn {
            commit_lsn: Lsn::ZERO,
            actions: vec![],
            count: 0,
            large: false,
            xid: None,
            stream_xid: 7,
            revoked_keys: vec![],
            all_keys_revoked: false,
            registry_changed: false,
            groups: TxnGroups::new(),
            ids: TxnIds::default(),
        };
        for id in ["41", "42", "43", "44"] {
            let mut v: [Option<&str>; 12] = [None; 12];
            v[0] = Some("todos");
            v[10] = Some(id);
            v[11] = Some("1234");
            txn.take_action(&v, 2);
        }
        assert!(txn.large);
        assert_eq!(txn.ids.first(), Some(41));
        let mut v: [Option<&str>; 12] = [None; 12];
        v[10] = Some("46");
        v[11] = Some("1234");
        txn.take_action(&v, 2);
        assert_eq!(txn.ids.first(), None, "45 is missing");
    }

    /// Once a transaction is past the buffer (re-read from the database when published), none
    /// of its later actions is built or held: before, the buffer filled again after each
    /// overflow, building a delta for every action of a huge transaction only to drop it.
    #[test]
    fn a_transaction_past_the_buffer_holds_and_builds_nothing_more() {
        let mut txn = OpenTxn {
            commit_lsn: Lsn::ZERO,
            actions: vec![],
            count: 0,
            large: false,
            xid: None,
            stream_xid: 7,
            revoked_keys: vec![],
            all_keys_revoked: false,
            registry_changed: false,
            groups: TxnGroups::new(),
            ids: TxnIds::default(),
        };
        let ids: Vec<String> = (1..=7).map(|i| i.to_string()).collect();
        for id in &ids {
            let mut v: [Option<&str>; 12] = [None; 12];
            v[0] = Some("todos");
            v[1] = Some(id);
            v[2] = Some("I");
            v[3] = Some(r#"{"a": 1}"#);
            v[10] = Some(id);
            v[11] = Some("1234");
            txn.take_action(&v, 2);
            if txn.count <= 2 {
                assert!(!txn.large);
                assert_eq!(txn.actions.len(), txn.count);
            } else {
                assert!(txn.large, "past the buffer at action {id}");
                assert!(
                    txn.actions.is_empty(),
                    "holds {} actions at action {id}",
                    txn.actions.len()
                );
            }
        }
        assert_eq!(txn.count, 7);
        assert_eq!(txn.xid.as_deref(), Some("1234"));
    }

    /// The slot is acknowledged past a transaction only once the WAL is flushed past its
    /// persist's commit, in order, and a persist's bound is only known from a later statement.
    #[test]
    fn acknowledgements_wait_for_the_wal_flush_past_their_persist() {
        let lsn = Lsn::from_u64;
        // Started from ids up to 3, persisted below WAL position 100; flushed to 90.
        let mut acks = Acks::new(lsn(100), 3, lsn(90));
        assert_eq!(acks.confirm(), (Lsn::ZERO, None));
        // A keepalive with nothing pending waits behind it.
        assert_eq!(acks.queue(lsn(150), Some(Lsn::ZERO), 3), None);
        // A flush persisted ids 4-5 for transactions ending at 200; where its commit is, is
        // not known yet.
        assert_eq!(acks.queue(lsn(200), None, 5), None);
        // The next statement reads the insert position 500 (above that commit), flush 110.
        acks.saw_wal(lsn(500), lsn(110));
        assert_eq!(
            acks.confirm(),
            (lsn(150), Some(3)),
            "the start and the keepalive, not the persist"
        );
        // Flushed to 400: still below the persist's bound.
        acks.saw_wal(lsn(600), lsn(400));
        assert_eq!(acks.confirm(), (Lsn::ZERO, None), "persist not flushed yet");
        // A later keepalive waits behind it.
        assert_eq!(acks.queue(lsn(250), Some(Lsn::ZERO), 5), None);
        assert_eq!(acks.confirm(), (Lsn::ZERO, None));
        acks.saw_wal(lsn(600), lsn(500));
        assert_eq!(acks.confirm(), (lsn(250), Some(5)));
        assert!(acks.is_empty());
        // Nothing waiting: a keepalive is acknowledged at once.
        assert_eq!(acks.queue(lsn(300), Some(Lsn::ZERO), 5), Some(lsn(300)));
    }

    /// A hold ends only past its end and with every published id assigned again: a re-stream
    /// that came back short keeps the hole from replays (REVIEW8_d S2).
    #[test]
    fn a_hold_is_released_only_with_every_published_id_back() {
        let lsn = Lsn::from_u64;
        let hold = Hold {
            end: lsn(100),
            through: 5,
            short_logged: false,
        };
        assert_eq!(hold.settles(lsn(99), 5), Settle::Wait);
        assert_eq!(hold.settles(lsn(100), 3), Settle::Short);
        assert_eq!(hold.settles(lsn(100), 5), Settle::Release);
        assert_eq!(hold.settles(lsn(200), 6), Settle::Release);
        // A fresh worker (nothing published it knows of) releases past the end.
        let fresh = Hold {
            end: lsn(100),
            through: 0,
            short_logged: false,
        };
        assert_eq!(fresh.settles(lsn(100), 0), Settle::Release);
    }
}
