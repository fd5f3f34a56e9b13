//! Sequencing proper: assigns consecutive sync ids to committed transactions, persists them to
//! `pg_sync.commit_order` (once the transactions are visible), publishes them to the hub, and
//! only then acknowledges them; reads persisted ranges back (`changes`, `publish_from_db`) and
//! keeps the hub's keys and groups in line with the database.

use super::session::{ReadyTxn, Session};
use super::{SequencerError, LARGE_PAGE, VISIBILITY_WAIT_MAX};
use crate::delta::Delta;
use crate::hub::{MembershipChange, Published};
use pgwire_replication::ReplicationClient;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Persists a batch of streamed transactions once all of them are visible (see `persist`):
/// $1 xids (xid8 text), $2 action counts, $3 commit LSNs, $4 commit times (Postgres epoch,
/// microseconds), $5 the first sync id, $6 the committing xids as the stream names them, $7
/// how many of $8 are each transaction's `commit_order.group_ids` (-1: NULL), $8 those groups,
/// one transaction's after another's, $9 each transaction's `commit_order.first_action_id`
/// (NULL elements: its action ids are not contiguous, see `TxnIds`).
///
/// Its commit is asynchronous (`synchronous_commit = off` for this transaction only): the
/// ids are published once the persist is visible, without waiting for its WAL flush, and the
/// slot is acknowledged only once the server's flush position has passed it (`confirm`). It
/// returns the WAL insert position (above every earlier persist's commit) and the flush
/// position. With a synchronous standby configured the commit waits as configured: a standby
/// promoted after a failover must have every id clients saw (the new worker's backlog pass
/// would order a lost tail by another rule).
const PERSIST_SQL: &str = "WITH u AS (
       SELECT x::xid8 AS x, c, l::pg_lsn AS l, t, o, gn, fa,
              (sum(GREATEST(gn, 0)) OVER (ORDER BY o) - GREATEST(gn, 0))::int AS gs
         FROM unnest($1::text[], $2::int[], $3::text[], $4::bigint[], $7::int[], $9::bigint[])
              WITH ORDINALITY AS u(x, c, l, t, gn, fa, o)),
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
       INSERT INTO pg_sync.commit_order (xid, first_sync_id, action_count, commit_lsn, committed_at, group_ids,
                                         first_action_id)
       SELECT x, $5 + sum(c) OVER (ORDER BY o) - c, c, l, to_timestamp((t + 946684800000000)::float8 / 1e6),
              CASE WHEN gn >= 0 THEN ($8::text[])[gs + 1 : gs + gn] END, fa
         FROM k WHERE NOT known AND (SELECT visible FROM v))
     SELECT (SELECT visible FROM v), ARRAY(SELECT x::text FROM k WHERE known),
            pg_current_wal_insert_lsn()::text, pg_current_wal_flush_lsn()::text,
            set_config('synchronous_commit',
                       CASE WHEN current_setting('synchronous_standby_names') = '' THEN 'off'
                            ELSE current_setting('synchronous_commit') END, true)";

/// Visibility re-checks made at once (one round trip each) before `persist` sleeps between them.
const IMMEDIATE_RETRIES: u32 = 3;

impl Session<'_> {
    /// Closes the sessions of API keys that no longer exist (called before publishing a gap:
    /// a key revoked in it gets none of it).
    pub(super) async fn revoke_gone_keys(&self) -> Result<(), SequencerError> {
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
    pub(super) async fn reconcile_groups(&self, at: i64) -> Result<(), SequencerError> {
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
                       JOIN pg_sync.sync_actions a ON a.xid = m.xid AND a.id = m.action_id
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
    #[allow(clippy::too_many_arguments)] // the statement's columns, one slice each
    pub(super) async fn persist(
        &mut self,
        xids: &[String],
        stream_xids: &[i64],
        counts: &[i32],
        lsns: &[String],
        times: &[i64],
        groups: (&[i32], &[&str]),
        first_ids: &[Option<i64>],
    ) -> Result<std::collections::HashSet<String>, SequencerError> {
        let started = Instant::now();
        let mut waits = 0u32;
        // Prepared once per session: a statement sent as text is parsed and described in a
        // round trip of its own before every execution (on a loaded machine each round trip
        // is a wake-up of the backend, and this is on every commit's way to the clients).
        let stmt = match &self.persist_stmt {
            Some(stmt) => stmt.clone(),
            None => {
                let stmt = self.db.prepare(PERSIST_SQL).await?;
                self.persist_stmt = Some(stmt.clone());
                stmt
            }
        };
        loop {
            let row = self
                .db
                .query_one(
                    &stmt,
                    &[
                        &xids,
                        &counts,
                        &lsns,
                        &times,
                        &self.next_sync_id,
                        &stream_xids,
                        &groups.0,
                        &groups.1,
                        &first_ids,
                    ],
                )
                .await?;
            let lsn = |i: usize| {
                pgwire_replication::Lsn::parse(&row.get::<_, String>(i))
                    .unwrap_or(pgwire_replication::Lsn::ZERO)
            };
            self.saw_wal(lsn(2), lsn(3));
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
            // The committer leaves the proc array right after its commit record is flushed, so
            // the window is normally microseconds and an immediate second look (one round
            // trip) usually finds it closed: no timer in the way (a 1 ms sleep cost 1-2 ms).
            if waits <= IMMEDIATE_RETRIES {
                tokio::task::yield_now().await;
                continue;
            }
            tokio::time::sleep(Duration::from_millis(if waits < 100 { 1 } else { 10 })).await;
        }
    }

    /// Persists, publishes, then acknowledges everything pending.
    pub(super) async fn flush(&mut self, repl: &ReplicationClient) -> Result<(), SequencerError> {
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
        let mut pending = std::mem::take(&mut self.pending);
        self.pending_actions = 0;
        // Each transaction's deltas, built while it streamed, get their ids below.
        let mut actions: Vec<Vec<super::session::Action>> = pending
            .iter_mut()
            .map(|t| std::mem::take(&mut t.txn.actions))
            .collect();
        let started = std::time::Instant::now();
        // Persisted in one round trip: transactions a backlog pass already sequenced (known by
        // their xid) are skipped by the statement, which names them; the others get
        // consecutive ids in commit order, exactly as assigned below.
        let mut xids = vec![];
        let mut stream_xids = vec![];
        let mut counts = vec![];
        let mut lsns = vec![];
        let mut times = vec![];
        let mut group_counts = vec![];
        let mut groups: Vec<&str> = vec![];
        let mut first_ids: Vec<Option<i64>> = vec![];
        for txn in &pending {
            if txn.commit_lsn <= self.last_commit_lsn || txn.count == 0 {
                // A registration change wakes every held `/v1/shape` request, which reads the
                // registry again at once: streamed before it is visible (see `persist`), it
                // would find the old registration and hold on, with no other wake to come.
                // So it is waited for as the persisted ones are (the statement's $6 only).
                // Likewise a key revocation: published, it empties the hub's cache of valid
                // keys, and a lookup that then still saw the key would put it back.
                let revokes = txn.all_keys_revoked || !txn.revoked_keys.is_empty();
                if (txn.registry_changed || revokes) && txn.commit_lsn > self.last_commit_lsn {
                    stream_xids.push(i64::from(txn.stream_xid));
                }
                continue;
            }
            xids.push(txn.xid.clone().unwrap_or_default());
            stream_xids.push(i64::from(txn.stream_xid));
            counts.push(txn.count as i32);
            lsns.push(txn.commit_lsn.to_pg_string());
            times.push(txn.committed_at_us);
            match txn.groups.get() {
                Some(gs) => {
                    group_counts.push(gs.len() as i32);
                    groups.extend(gs.iter().map(String::as_str));
                }
                None => group_counts.push(-1),
            }
            first_ids.push(txn.ids.first());
        }
        let known: std::collections::HashSet<String> = if stream_xids.is_empty() {
            Default::default()
        } else {
            self.persist(
                &xids,
                &stream_xids,
                &counts,
                &lsns,
                &times,
                (&group_counts, &groups),
                &first_ids,
            )
            .await?
        };
        let mut firsts = vec![];
        let mut assigned: Vec<(i64, &ReadyTxn, Vec<super::session::Action>)> = vec![];
        for (txn, actions) in pending.iter().zip(actions.iter_mut()) {
            if txn.commit_lsn <= self.last_commit_lsn
                || txn.xid.as_ref().is_some_and(|x| known.contains(x))
            {
                assigned.push((0, txn, vec![])); // sequenced already: only its memberships matter now
                continue;
            }
            if txn.count == 0 {
                assigned.push((0, txn, vec![]));
                continue;
            }
            let first = self.next_sync_id;
            self.next_sync_id += txn.count as i64;
            firsts.push((first, txn.count as u64));
            assigned.push((first, txn, std::mem::take(actions)));
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
        for (first, txn, mut actions) in assigned {
            if first == 0 {
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
                self.publish_large(first, txn).await?;
                continue;
            }
            // In log order (a stable sort, as before: the action ids are unique anyway).
            actions.sort_by_key(|a| a.id);
            let mut deltas = Vec::with_capacity(actions.len());
            for (i, action) in actions.into_iter().enumerate() {
                if first + (i as i64) <= self.skip_through {
                    // Delivered before a crash of Postgres lost its persist (see `Hold`).
                    continue;
                }
                deltas.push(Arc::new(action.delta.sequence(first + i as i64)));
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
            // Acknowledged once this flush's persist is durable (a flush that persisted
            // nothing waits only for the ones before it).
            let bound = if xids.is_empty() {
                Some(pgwire_replication::Lsn::ZERO)
            } else {
                None
            };
            self.queue_ack(repl, last.end_lsn, bound);
            self.confirm(Some(repl));
            // Everything below a keepalive that came with these pending is flushed now.
            let mut done = last.end_lsn.max(self.caught_up);
            self.processed = self.processed.max(done);
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
    pub(super) async fn publish_large(
        &mut self,
        first: i64,
        txn: &ReadyTxn,
    ) -> Result<(), SequencerError> {
        let last = first + txn.count as i64 - 1;
        self.publish_from_db(first, last, txn.revoked_keys.clone())
            .await
    }

    /// Publishes the persisted sync ids `first..=last`, read back page by page (membership
    /// changes at their positions); the revocations ride on the first page.
    pub(super) async fn publish_from_db(
        &self,
        first: i64,
        last: i64,
        mut revoked_keys: Vec<String>,
    ) -> Result<(), SequencerError> {
        // Ids delivered before a crash of Postgres lost their persists are not sent again.
        let mut after = (first - 1).max(self.skip_through);
        while after < last {
            let span = crate::store::page_span(after, last, LARGE_PAGE);
            let deltas = crate::store::changes(&self.db, after, None, span, None).await?;
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
        assert_eq!(crate::store::page_span(0, 10, 5_000), 10);
        assert_eq!(crate::store::page_span(10, 10, 5_000), 0);
        assert_eq!(crate::store::page_span(0, 1 << 40, 5_000), 5_000);
        // (last - after) as i32 was negative here, and the paging loop never ended.
        assert_eq!(crate::store::page_span(0, 3_000_000_000, 5_000), 5_000);
        assert_eq!(crate::store::page_span(1, 1 + (1 << 32) + 7, 5_000), 5_000);
        assert_eq!(crate::store::page_span(20, 10, 5_000), 0);
    }
}
