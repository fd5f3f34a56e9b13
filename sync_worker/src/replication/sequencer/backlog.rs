//! The start-up backlog: unsequenced actions the slot will never stream (written before it
//! existed, or while no slot held them). They are told apart from what the slot streams, either
//! by following the stream (`Unresolved`) or by peeking at the slot, and sequenced first.

use super::session::Session;
use super::{SequencerError, HOLD_ACTIONS};
use pgwire_replication::{Lsn, ReplicationEvent};
use std::sync::atomic::Ordering;

/// What `Session::watch_backlog` found.
pub(super) enum Backlog {
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
pub(super) struct Unresolved {
    pub(super) end: Lsn,
    /// Their xids' low 32 bits (what the stream names).
    pub(super) candidates: std::collections::HashSet<u32>,
    pub(super) seen: std::collections::HashSet<u32>,
}

impl Session<'_> {
    /// Follows the stream while the backlog is unresolved, and says when it is resolved.
    pub(super) fn watch_backlog(&mut self, event: &ReplicationEvent) -> Backlog {
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
    pub(super) async fn find_backlog(&mut self) -> Result<(), SequencerError> {
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
    /// show. Before the slot existed there is no commit order to read, but action ids are drawn
    /// from the log's identity sequence (cache 1, so one order for every backend) when a change
    /// is captured, inside its transaction: a transaction that wrote a row after another
    /// committed its own write of it drew its last id after all of the other's. Ordered by
    /// their highest action id, two transactions that wrote one row are in commit order, so
    /// clients fold it to what the table holds. Not by version: a merged change
    /// (`apply_remote`) is logged with the peer's version, which can be below versions an
    /// earlier-committed local transaction minted; and not by the first action (the one that
    /// started first would go first; after a failover the backlog is the old worker's
    /// unsequenced tail, concurrent transactions).
    pub(super) async fn resolve_backlog(&mut self) -> Result<(), SequencerError> {
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
                    "INSERT INTO pg_sync.commit_order (xid, first_sync_id, action_count, commit_lsn, committed_at,
                                                       first_action_id)
                     SELECT xid, $1 + sum(n) OVER (ORDER BY last_id) - n, n, '0/0', now(), first_id
                       FROM (SELECT a.xid, max(a.id) AS last_id, count(*)::int AS n,
                                    -- (contiguous ids, as the stream's `TxnIds`; else NULL)
                                    CASE WHEN max(a.id) - min(a.id) = count(*) - 1 THEN min(a.id) END AS first_id
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
    pub(super) async fn finish_backlog(
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
    pub(super) async fn published_backlog(
        &mut self,
        first: i64,
        n: u64,
    ) -> Result<(), SequencerError> {
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
    /// action id). One that is streamed anyway is recognised by its xid and skipped.
    pub(super) async fn sequence_backlog_peeked(&mut self) -> Result<(), SequencerError> {
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
                    &[&self.cfg.slot, &crate::store::quote_ident(&self.cfg.publication)],
                )
                .await?
                .get(0);
            // The stream names 32-bit xids; the log keeps xid8 (epoch and xid).
            self.db
                .execute(
                    "INSERT INTO pg_sync.commit_order (xid, first_sync_id, action_count, commit_lsn, committed_at,
                                                       first_action_id)
                     SELECT xid, $1 + sum(n) OVER (ORDER BY last_id) - n, n, '0/0', now(), first_id
                       FROM (SELECT a.xid, max(a.id) AS last_id, count(*)::int AS n,
                                    -- (contiguous ids, as the stream's `TxnIds`; else NULL)
                                    CASE WHEN max(a.id) - min(a.id) = count(*) - 1 THEN min(a.id) END AS first_id
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
}
