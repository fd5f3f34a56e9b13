//! `pg_sync.apply_remote(change jsonb)`: merges changes captured on another node.
//!
//! A change is `to_jsonb()` of the other node's `sync_actions` row (or an array of them). Each is
//! validated, checked against `pg_sync.max_clock_skew`, observed by the local HLC (receive rule),
//! merged per column with `merge::merge`, and applied to the table in "remote mode", so the
//! capture trigger records it with the remote versions and origin instead of minting new ones.

use crate::capture::{self, RemoteContext};
use crate::clock;
use crate::errors;
use crate::model::{self, Model};
use crate::settings;
use crate::state;
use pg_sync_lww::merge::{self, Change, Dml};
use pg_sync_lww::version::validate_node_id;
use pgrx::prelude::*;
use pgrx::{pg_sys, JsonB, PgOid};
use serde_json::{Map, Value};
use std::collections::HashMap;

/// The largest batch one call accepts.
const MAX_BATCH: usize = 100_000;

/// The body of `pg_sync.apply_remote()`: returns how many changes changed something.
pub fn apply_remote(change: JsonB) -> i64 {
    let mut models: HashMap<String, Model> = HashMap::new();
    match change.0 {
        Value::Array(items) => {
            if items.len() > MAX_BATCH {
                errors::invalid(
                    format!(
                        "a batch holds at most {MAX_BATCH} changes, got {}",
                        items.len()
                    ),
                    "Split the batch.",
                );
            }
            let mut applied = 0;
            for (i, item) in items.iter().enumerate() {
                applied += apply_one(item, &format!("change {i}: "), &mut models) as i64;
            }
            applied
        }
        other => apply_one(&other, "", &mut models) as i64,
    }
}

/// Applies one change; returns whether it changed anything.
fn apply_one(raw: &Value, ctx: &str, models: &mut HashMap<String, Model>) -> bool {
    let Some(obj) = raw.as_object() else {
        errors::invalid(
            format!("{ctx}a change must be a JSON object"),
            "Pass to_jsonb() of a sync_actions row.",
        );
    };
    let text = |name: &str| state::required_str(obj, name, ctx).to_owned();
    let model_name = text("model");
    let model_id = text("model_id");
    let origin = text("origin");
    if let Err(why) = validate_node_id(&origin) {
        errors::invalid(
            format!("{ctx}invalid origin: {why}"),
            "origin is the node id that made the change.",
        );
    }
    if !models.contains_key(&model_name) {
        models.insert(model_name.clone(), Model::lookup(&model_name));
    }
    let model = &models[&model_name];
    if !model.enabled || matches!(model.federation.as_str(), "off" | "push") {
        errors::raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!(
                "{ctx}model \"{model_name}\" does not accept remote changes (federation = {}{})",
                model.federation,
                if model.enabled { "" } else { ", unregistered" }
            ),
            "Register the table with federation => 'pull' or 'both' to merge changes from peers.",
        );
    }
    let row_ctx = format!("{ctx}model \"{model_name}\" id {model_id:?}: ");
    // One row, one id: "01" and "1" (or an upper-case uuid) name the same row and share its
    // state and tombstone.
    let model_id = model.canonical_id(&model_id, &row_ctx);
    let key = model.key_object(&model_id, &row_ctx);
    let parsed = state::parse_action(obj, &row_ctx, |c| model.is_key(c));
    if let Some(data) = obj.get("data").and_then(Value::as_object) {
        for col in data.keys() {
            model.check_column(col, &row_ctx);
        }
    }
    let newest = parsed
        .columns
        .values()
        .map(|(_, v)| v)
        .fold(&parsed.version, |m, v| if v > m { v } else { m });

    // Reject versions from too far in the future before they can drag the clock along.
    let now = clock::wall_ms();
    let limit = now.saturating_add(settings::max_clock_skew_ms());
    if newest.physical_ms() > limit {
        errors::raise(
            PgSqlErrorCode::ERRCODE_DATETIME_FIELD_OVERFLOW,
            format!(
                "{row_ctx}version from node \"{}\" is {} ms ahead of this node's clock, beyond pg_sync.max_clock_skew ({} ms)",
                newest.node,
                newest.physical_ms() - now,
                settings::max_clock_skew_ms()
            ),
            "Fix the clock of the sending node, or raise pg_sync.max_clock_skew.",
        );
    }
    clock::observe(newest.hlc);
    apply_change(model, &model_id, &key, &parsed.change(), &origin)
}

fn lock_row(model: &str, model_id: &str) {
    // Serializes concurrent merges of one row, including rows that do not exist yet.
    model::run(
        "SELECT pg_catalog.to_jsonb(pg_catalog.pg_advisory_xact_lock(\
           pg_catalog.hashtextextended(($1 OPERATOR(pg_catalog.->>) 'm') OPERATOR(pg_catalog.||) ':' \
             OPERATOR(pg_catalog.||) ($1 OPERATOR(pg_catalog.->>) 'i'), 7061)))",
        &[PgOid::from(pg_sys::JSONBOID)],
        vec![JsonB(serde_json::json!({"m": model, "i": model_id}))],
    );
}

fn apply_change(
    model: &Model,
    model_id: &str,
    key: &Map<String, Value>,
    change: &Change,
    origin: &str,
) -> bool {
    lock_row(&model.name, model_id);
    let current = model.select_for_update(key);
    let state = state::fold(&model.name, model_id, current.is_some(), &model.key);
    let outcome = merge::merge(&state, current.as_ref(), change);
    if !outcome.changed() {
        return false;
    }
    {
        let _remote = capture::enter_remote(RemoteContext {
            origin: origin.to_owned(),
            state: outcome.state.clone(),
            won: outcome.won.clone(),
            created_won: outcome.created_won,
        });
        match &outcome.dml {
            Dml::None => {}
            Dml::Insert(row) => {
                let mut row = row.clone();
                row.extend(key.clone());
                model.insert(&row);
            }
            Dml::Update(cols) => {
                model.update(key, cols);
            }
            Dml::Delete => {
                model.delete(key);
            }
        }
    }
    // The action rows just written fold back into this same state, so the cache only needs
    // what the log cannot express: merges with no table change, values waiting while the row
    // is not live, and a newer insert over a live row (recorded as a group move if it also
    // moved the row, which folds as column writes only).
    let logged = match outcome.dml {
        Dml::None => false,
        Dml::Update(_) => !outcome.created_won,
        Dml::Insert(_) | Dml::Delete => true,
    };
    if !logged || !outcome.state.pending.is_empty() {
        state::store(&model.name, model_id, &outcome.state);
    }
    true
}
