//! What every streaming endpoint (WebSocket, SSE) shares: registering a subscriber with its
//! groups, and the replay-then-live seam (no gap, no duplicate).

use super::App;
use crate::delta::Delta;
use crate::hub::{GoLive, Load, Subscription};
use crate::store;
use std::collections::HashMap;
use std::sync::Arc;

const REPLAY_SPAN: i32 = 5_000;

/// Unregisters the subscriber however the stream ends.
pub struct Registration(Arc<App>, u64);

impl Drop for Registration {
    fn drop(&mut self) {
        self.0.hub.unregister(self.1);
    }
}

/// The groups of `user` as of sync id `at` (what the hub has published), from the database:
/// the memberships now, with each group whose membership changed after `at` (an action not
/// sequenced yet, or sequenced above `at`) taken as it was before its first such change. The
/// hub's view must not run ahead of its position: a join committed but not yet published would
/// otherwise be in the groups already, so its deltas from before it would be delivered and its
/// `membership` frame, a no-op when it is published, never sent. One membership's changes
/// commit in action id order (its row lock serializes them).
pub async fn load_groups(app: &App, user: &str, at: i64) -> Option<Vec<String>> {
    let db = app
        .db
        .get()
        .await
        .map_err(|e| tracing::warn!(error = %e, "cannot load memberships"))
        .ok()?;
    let rows = db
        .query(
            "WITH later AS (
                 SELECT DISTINCT ON (m.group_id) m.group_id, m.joined
                   FROM pg_sync.membership_log m
                   JOIN pg_sync.sync_actions a ON a.xid = m.xid AND a.id = m.action_id
                   LEFT JOIN pg_sync.commit_order c ON c.xid = a.xid
                  WHERE m.user_id = $1
                    AND (c.xid IS NULL
                         OR c.first_sync_id + (SELECT count(*) FROM pg_sync.sync_actions b
                                                WHERE b.xid = a.xid AND b.id < a.id) > $2)
                  ORDER BY m.group_id, m.action_id)
             SELECT g.group_id FROM pg_sync.group_memberships g
              WHERE g.user_id = $1 AND g.group_id NOT IN (SELECT l.group_id FROM later l)
             UNION
             SELECT l.group_id FROM later l WHERE NOT l.joined",
            &[&user, &at],
        )
        .await
        .map_err(|e| tracing::warn!(error = %e, "cannot load memberships"))
        .ok()?;
    Some(rows.iter().map(|r| r.get(0)).collect())
}

/// Registers a subscriber (not live yet) and makes sure the hub knows the user's groups.
/// `None` when the database cannot be reached.
pub async fn register(
    app: &Arc<App>,
    user: &str,
    key: Option<&str>,
) -> Option<(Subscription, Registration)> {
    let (sub, mut load) = app.hub.register(user, key);
    let registration = Registration(app.clone(), sub.id);
    loop {
        match load {
            Load::Ready => break,
            // Another connection of this user is loading them: its result is ours.
            Load::Wait => load = app.hub.wait_loaded(user, sub.id).await,
            Load::Must => {
                // Released however the load ends short of `set_groups`: a failure, or this
                // future dropped mid-load (a client gone), so waiters never wait forever.
                let claim = LoadClaim {
                    app,
                    user,
                    id: sub.id,
                };
                // At least where the claim started: changes published after it are pending
                // and applied on top (per group, the last change wins either way).
                let groups = load_groups(app, user, app.hub.published()).await?;
                std::mem::forget(claim);
                app.hub.set_groups(user, groups);
                break;
            }
        }
    }
    Some((sub, registration))
}

/// Closes a session registered under an API key that was revoked after the request checked it
/// but before the session registered with the hub (which then had no session of the key to
/// close): when any revocation was published since the check, the key is looked at again in
/// the database, and if it is gone its revocation is published once more, which closes this
/// session (4401) and any other of the key's. False when the key could not be checked (the
/// database is unavailable): the caller ends the session with a retryable refusal (close 1011,
/// or 503) rather than serve a key that may be revoked.
#[must_use]
pub async fn recheck_key(app: &App, held: Option<&super::HeldKey>) -> bool {
    match recheck(app, held).await {
        Recheck::Valid => true,
        Recheck::Revoked(held) => {
            app.hub.publish(&[crate::hub::Published {
                revoked_keys: vec![held.id.clone()],
                ..Default::default()
            }]);
            true
        }
        Recheck::Unknown => false,
    }
}

/// What `recheck` found.
pub enum Recheck<'a> {
    /// A JWT, a key checked with nothing revoked since, or a key the database still has.
    Valid,
    /// Gone from the database (or moved to another user, or re-hashed).
    Revoked(&'a super::HeldKey),
    /// The database could not say.
    Unknown,
}

/// Whether the API key a request was checked with still authenticates it: looked at again in
/// the database only when a revocation was published since the check (`HeldKey::checked`),
/// which the caller's subscription to revocations, made before, may have missed.
pub async fn recheck<'a>(app: &App, held: Option<&'a super::HeldKey>) -> Recheck<'a> {
    let Some(held) = held else {
        return Recheck::Valid;
    };
    let Some(checked) = held.checked else {
        return Recheck::Valid;
    };
    if app.hub.known_keys.unchanged_since(checked) {
        return Recheck::Valid;
    }
    match held.valid(app).await {
        Ok(true) => Recheck::Valid,
        Ok(false) => Recheck::Revoked(held),
        Err(e) => {
            tracing::warn!(error = %e, "cannot check a request's API key again");
            Recheck::Unknown
        }
    }
}

/// `recheck` as an HTTP answer: `None` to go on, else the refusal (401 `invalid_api_key`, or
/// 503 `unavailable`).
pub async fn recheck_refusal(
    app: &App,
    held: Option<&super::HeldKey>,
) -> Option<axum::response::Response> {
    use axum::response::IntoResponse;
    match recheck(app, held).await {
        Recheck::Valid => None,
        Recheck::Revoked(_) => Some(super::Refusal::key_revoked().into_response()),
        Recheck::Unknown => Some(super::Refusal::key_unchecked().into_response()),
    }
}

/// A claimed group load: dropped before `set_groups`, it lets a waiting connection of the
/// user load them instead.
struct LoadClaim<'a> {
    app: &'a App,
    user: &'a str,
    id: u64,
}

impl Drop for LoadClaim<'_> {
    fn drop(&mut self) {
        self.app.hub.load_failed(self.user, self.id);
    }
}

pub enum ReplayError {
    /// The client went away.
    Sink,
    /// The client stopped reading (a write timed out).
    Stalled,
    Db(String),
    /// The cursor is older than the retention horizon: the client must bootstrap again.
    Expired(i64),
    /// The hub dropped the subscriber (its API key was revoked): see its cutoff.
    Dropped,
    /// The watermark is not known yet (the worker is starting): retry.
    NotReady,
}

/// Replays, page by page, everything `user` may see after `after` up to the published
/// watermark, then makes the subscriber live and pages on to the watermark at that instant
/// (deltas after it are queued for the subscriber meanwhile). `next_page` returns `None` once
/// that is done; `through` is then the sync id the client is caught up to.
pub struct Replay<'a> {
    app: &'a App,
    user: &'a str,
    id: u64,
    cursor: i64,
    pub through: i64,
    live: bool,
    /// The user's joins in the range (start, joins_upto]: group -> sync id of the last one.
    /// `joins_upto` is at least the position of the groups each page filters by.
    joins: Joins,
    joins_upto: i64,
    /// A live subscriber's catch-up after its queue overflowed (`catch_up`): no admission.
    catch_up: bool,
    /// When the replay began, until it is live (`pg_sync_replay_seconds`).
    started: Option<std::time::Instant>,
}

/// Group -> the sync id of the user's last join of it in a replayed range.
pub type Joins = HashMap<String, i64>;

/// The user's joins after `after` up to `upto` (`pg_sync.member_joins`). Prepared once per
/// pooled connection: the function is inlined into this statement, so after a few calls the
/// connection runs one plan for it, not a planning per replay page (which was most of a
/// call's time: the read itself is an index probe or two).
pub async fn joins(
    db: &deadpool_postgres::Object,
    user: &str,
    after: i64,
    upto: i64,
) -> Result<Joins, tokio_postgres::Error> {
    let statement = db
        .prepare_cached("SELECT group_id, sync_id FROM pg_sync.member_joins($1, $2, $3)")
        .await?;
    Ok(db
        .query(&statement, &[&user, &after, &upto])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// Whether a replayed `d` goes to `user`: the user's own membership changes, global deltas,
/// and deltas of its groups (the page's filter) from where the user was in them: none of a
/// group from before the user's last join of it in the range (its join frame tells the client
/// to fetch that group's rows).
pub fn visible(d: &Delta, user: &str, joins: &Joins) -> bool {
    if let Some(m) = &d.member {
        return m.user_id == user;
    }
    d.global
        || d.group_id
            .as_ref()
            .and_then(|g| joins.get(g))
            .is_none_or(|joined| d.sync_id > *joined)
}

impl<'a> Replay<'a> {
    /// `after` 0 means from the start of the retained log.
    pub async fn start(
        app: &'a App,
        user: &'a str,
        id: u64,
        after: i64,
    ) -> Result<Replay<'a>, ReplayError> {
        let through = app.hub.watermark().ok_or(ReplayError::NotReady)?;
        let db = pooled(app).await?;
        let horizon = db.track(horizon(&db)).await?;
        drop(db);
        if after > 0 && after < horizon {
            return Err(ReplayError::Expired(horizon));
        }
        Ok(Replay {
            app,
            user,
            id,
            cursor: after.max(horizon),
            through,
            live: false,
            joins: Joins::new(),
            joins_upto: after.max(horizon),
            catch_up: false,
            started: Some(std::time::Instant::now()),
        })
    }

    pub async fn next_page(&mut self) -> Result<Option<Vec<Arc<Delta>>>, ReplayError> {
        loop {
            if self.cursor < self.through {
                // Holds a page back a while (tests: a replay that started before a crash of
                // Postgres reads its next page after it).
                if crate::failpoint::fire("replay_page_pause") {
                    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
                }
                // A revoked session stops at the next page, not at the end of the replay.
                if !self.app.hub.is_registered(self.id) {
                    return Err(ReplayError::Dropped);
                }
                // The page is read and built under a turn (`admission`): many replays at once
                // share a bounded slice of the database and the worker. A session dropped
                // while it waits (its key revoked) leaves the line at once, so it is closed
                // promptly, not when its turn comes.
                // A live subscriber catching up after its queue overflowed takes no turn:
                // live delivery never waits for other users' replays (review rev16c F1), and
                // its range is what live delivery would have sent.
                let mut _turn = if self.catch_up {
                    // Live delivery by other means: replays far behind keep pacing themselves.
                    self.app.hub.note_live_delivery();
                    None
                } else {
                    let dropped = self
                        .app
                        .hub
                        .dropped_signal(self.id)
                        .ok_or(ReplayError::Dropped)?;
                    Some(tokio::select! {
                        turn = self.app.replay.enter(self.user, self.app.hub.published() - self.cursor) => turn,
                        () = dropped.notified() => return Err(ReplayError::Dropped),
                    })
                };
                if !self.app.hub.is_registered(self.id) {
                    return Err(ReplayError::Dropped);
                }
                // Holds a turn a long while (tests: replays and revocations queued behind it).
                if crate::failpoint::fire("replay_turn_hold") {
                    tokio::time::sleep(std::time::Duration::from_secs(10)).await;
                }
                // The page's groups are the hub's now, which hold every join published so far,
                // beyond `through` too: the joins are read up to the same position, so a group
                // joined while the replay pages has its join here and none of its deltas from
                // before it pass (REVIEW rev2 F2).
                let (groups, groups_at) = self.app.hub.groups_and_position(self.user);
                // A pooled connection per page, not per replay: between pages the session
                // writes to its socket, and a slow reader must not hold a connection.
                let db = pooled(self.app).await?;
                if let Some(turn) = _turn.as_mut() {
                    turn.reading();
                }
                let upto = self.through.max(groups_at);
                if self.joins_upto < upto {
                    let more = db
                        .track(joins(&db, self.user, self.joins_upto, upto))
                        .await
                        .map_err(|e| ReplayError::Db(e.to_string()))?;
                    for (g, at) in more {
                        let last = self.joins.entry(g).or_insert(at);
                        *last = (*last).max(at);
                    }
                    self.joins_upto = upto;
                }
                // While the hub holds its watermark (a crash of Postgres lost published ids
                // and they are not assigned again yet) the database has a hole below what was
                // published: a page read from it would move the cursor past ids that are never
                // delivered live again. Checked before and after the read.
                if self.app.hub.watermark().is_none() {
                    return Err(ReplayError::NotReady);
                }
                let span = store::page_span(self.cursor, self.through, REPLAY_SPAN);
                let mut page = db
                    .track(store::changes(
                        &db,
                        self.cursor,
                        Some(&groups),
                        span,
                        Some(self.user),
                    ))
                    .await
                    .map_err(|e| ReplayError::Db(e.to_string()))?;
                // Membership changes come in order with the deltas, each user's own only.
                page.retain(|d| visible(d, self.user, &self.joins));
                // Compaction may have passed the cursor: never serve a gap. The horizon is read
                // after the page, so a compaction that committed before the page was read (and
                // took rows from it) is seen.
                let horizon = db.track(horizon(&db)).await?;
                if horizon > self.cursor {
                    return Err(ReplayError::Expired(horizon));
                }
                if self.app.hub.watermark().is_none() {
                    return Err(ReplayError::NotReady);
                }
                self.cursor += span as i64;
                return Ok(Some(page));
            }
            if self.live {
                if let Some(t) = self.started.take() {
                    let replay = &self.app.hub.metrics.latency.replay;
                    replay.observe(t.elapsed().as_secs_f64());
                }
                return Ok(None);
            }
            match self.app.hub.go_live(self.id) {
                // Pages on to where live delivery starts: a bounded range, so writes that keep
                // coming cannot hold the subscriber in replay forever.
                GoLive::Live(from) => {
                    self.live = true;
                    self.through = self.through.max(from);
                }
                GoLive::Gone => return Err(ReplayError::Dropped),
            }
        }
    }
}

impl Replay<'_> {
    /// This replay is a live subscriber's catch-up after its queue overflowed: its pages take
    /// no admission turn (live delivery never waits for replays).
    pub fn catch_up(mut self) -> Self {
        self.catch_up = true;
        self
    }

    /// A page `overlap` read ahead, once the page before it is written: it goes out only if
    /// the session is still registered. Its read checked that before the write ended, so a key
    /// revoked meanwhile would otherwise get one more full page after the revocation; this is
    /// the same check `next_page` makes before a read (the expiry check needs none: what was
    /// read was not compacted yet).
    pub fn admit(
        &self,
        page: Option<Vec<Arc<Delta>>>,
    ) -> Result<Option<Vec<Arc<Delta>>>, ReplayError> {
        if page.is_some() && !self.app.hub.is_registered(self.id) {
            return Err(ReplayError::Dropped);
        }
        Ok(page)
    }
}

async fn pooled(app: &App) -> Result<store::Conn, ReplayError> {
    app.db
        .get()
        .await
        .map_err(|e| ReplayError::Db(e.to_string()))
}

/// Runs `write` (a replay page going out) and `fetch` (reading the next page) at once, and
/// returns when `write` is done: with its result, and `fetch`'s (finished, or still running
/// to be awaited). A failed write is returned at once; the caller then drops `fetch`, and a
/// statement it has in flight is cancelled with its connection (`store::Conn`).
pub async fn overlap<W: std::future::Future, F: std::future::Future>(
    write: W,
    fetch: F,
) -> (W::Output, Fetched<F>) {
    let mut fetch = Box::pin(fetch);
    let mut done = None;
    tokio::pin!(write);
    let written = loop {
        tokio::select! {
            w = &mut write => break w,
            f = &mut fetch, if done.is_none() => done = Some(f),
        }
    };
    (written, Fetched { fetch, done })
}

/// The next page of `overlap`: read already, or still being read.
pub struct Fetched<F: std::future::Future> {
    fetch: std::pin::Pin<Box<F>>,
    done: Option<F::Output>,
}

impl<F: std::future::Future> Fetched<F> {
    pub async fn await_page(self) -> F::Output {
        match self.done {
            Some(out) => out,
            None => self.fetch.await,
        }
    }
}

/// Resolves when a session's token expires (never for `None`): WS and SSE sessions end then.
pub async fn token_expiry(expires: Option<std::time::SystemTime>) {
    match expires {
        Some(at) => {
            let left = at
                .duration_since(std::time::SystemTime::now())
                .unwrap_or_default();
            tokio::time::sleep(left).await
        }
        None => std::future::pending().await,
    }
}

/// What a client whose cursor is older than the horizon is told.
pub fn compacted(horizon: i64) -> String {
    format!("the log before sync id {horizon} was compacted; bootstrap again")
}

/// The retention horizon: sync ids at or below it are gone.
pub async fn horizon(db: &tokio_postgres::Client) -> Result<i64, ReplayError> {
    store::horizon(db)
        .await
        .map_err(|e| ReplayError::Db(e.to_string()))
}
