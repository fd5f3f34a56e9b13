//! `pg_sync.compact(horizon)`: drops sequenced actions at or below a sync id and records the
//! horizon so readers can tell a client to bootstrap again instead of serving a gap. Merges never
//! read the log (row states live in `row_state`), so the actions can simply go.

use crate::deep::Jsonb;
use crate::errors;
use crate::model;
use pgrx::{pg_sys, PgOid};
use serde_json::json;

pub fn compact(horizon: i64) -> i64 {
    let jsonb = [PgOid::from(pg_sys::JSONBOID)];
    let arg = || vec![Jsonb(json!({"h": horizon}))];
    let last = model::run(
        "SELECT pg_catalog.to_jsonb(pg_sync.last_sync_id())",
        &jsonb,
        arg(),
    )
    .and_then(|v| v.as_i64())
    .unwrap_or(0);
    if horizon < 0 || horizon > last {
        errors::invalid(
            format!("horizon {horizon} is outside 0..={last} (the sequenced log)"),
            "Compact up to a sync id the worker has already sequenced.",
        );
    }
    // Only whole transactions go: every action of a compacted transaction is at or below it.
    // Row states are kept current by every writer (see `state`), so nothing needs folding first
    // and no row is read or locked: compaction cannot race the rows' writers.
    // Peers' retention holds (`peer_retention_hold`, sql/federation.sql) lower the horizon:
    // nothing a peer this node sends to has not acknowledged goes, unless the peer was released
    // for lagging past the cap. Read in this statement's snapshot; a later subscribe that moves
    // a hold back finds its cursor below the horizon and is told to resync (never a gap).
    let deleted = model::run(
        "WITH lim AS (
           SELECT LEAST(($1->>'h')::bigint, coalesce(pg_sync.peer_retention_hold(), ($1->>'h')::bigint)) AS h),
         gone AS (
           DELETE FROM pg_sync.sync_actions a USING pg_sync.commit_order c, lim
            WHERE c.xid = a.xid AND c.first_sync_id + c.action_count - 1 <= lim.h
           RETURNING a.id, a.model),
         members AS (
           DELETE FROM pg_sync.membership_log m
            WHERE m.action_id IN (SELECT gone.id FROM gone WHERE gone.model = '$membership')),
         tx AS (
           DELETE FROM pg_sync.commit_order c USING lim WHERE c.first_sync_id + c.action_count - 1 <= lim.h),
         h AS (
           INSERT INTO pg_sync.retention AS r (only_row, horizon, compacted_at)
           SELECT true, lim.h, now() FROM lim
           ON CONFLICT (only_row) DO UPDATE
              SET horizon = GREATEST(r.horizon, EXCLUDED.horizon), compacted_at = now())
         SELECT pg_catalog.to_jsonb(count(*)) FROM gone",
        &jsonb,
        arg(),
    );
    deleted.and_then(|v| v.as_i64()).unwrap_or(0)
}
