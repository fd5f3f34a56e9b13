//! `pg_sync.compact(horizon)`: drops sequenced actions at or below a sync id, folding each
//! affected row's LWW state into `row_state` first so merges keep working, and records the
//! horizon so readers can tell a client to bootstrap again instead of serving a gap.

use crate::errors;
use crate::model::{self, Model};
use crate::state;
use pgrx::{pg_sys, JsonB, PgOid};
use serde_json::{json, Value};
use std::collections::HashMap;

pub fn compact(horizon: i64) -> i64 {
    let jsonb = [PgOid::from(pg_sys::JSONBOID)];
    let arg = || vec![JsonB(json!({"h": horizon}))];
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
    let rows = model::run(
        "SELECT coalesce(pg_catalog.jsonb_agg(DISTINCT pg_catalog.jsonb_build_array(a.model, a.model_id)), '[]')
           FROM pg_sync.sync_actions a JOIN pg_sync.commit_order c ON c.xid = a.xid
          WHERE c.first_sync_id + c.action_count - 1 <= ($1->>'h')::bigint",
        &jsonb,
        arg(),
    )
    .unwrap_or(Value::Null);
    let mut models: HashMap<String, Option<Model>> = HashMap::new();
    for pair in rows.as_array().into_iter().flatten() {
        let (Some(name), Some(id)) = (pair[0].as_str(), pair[1].as_str()) else {
            continue;
        };
        let model = models
            .entry(name.to_owned())
            .or_insert_with(|| lookup(name));
        if let Some(model) = model {
            let key = model.key_object(id, "");
            let folded = state::fold(name, id, model.exists(&key), &model.key);
            state::store(name, id, &folded);
        }
    }
    let deleted = model::run(
        "WITH gone AS (
           DELETE FROM pg_sync.sync_actions a USING pg_sync.commit_order c
            WHERE c.xid = a.xid AND c.first_sync_id + c.action_count - 1 <= ($1->>'h')::bigint
           RETURNING 1),
         tx AS (
           DELETE FROM pg_sync.commit_order c WHERE c.first_sync_id + c.action_count - 1 <= ($1->>'h')::bigint),
         h AS (
           INSERT INTO pg_sync.retention AS r (only_row, horizon, compacted_at)
           VALUES (true, ($1->>'h')::bigint, now())
           ON CONFLICT (only_row) DO UPDATE
              SET horizon = GREATEST(r.horizon, EXCLUDED.horizon), compacted_at = now())
         SELECT pg_catalog.to_jsonb(count(*)) FROM gone",
        &jsonb,
        arg(),
    );
    deleted.and_then(|v| v.as_i64()).unwrap_or(0)
}

/// The model, or `None` when it is no longer registered (its history just goes).
fn lookup(name: &str) -> Option<Model> {
    let exists = model::run(
        "SELECT pg_catalog.to_jsonb(EXISTS (SELECT 1 FROM pg_sync.registry WHERE model = $1->>'m'))",
        &[PgOid::from(pg_sys::JSONBOID)],
        vec![JsonB(json!({"m": name}))],
    );
    (exists == Some(Value::Bool(true))).then(|| Model::lookup(name))
}
