//! `pg_sync.apply_remote(change jsonb)`: merges changes captured on another node.
//!
//! A change is `to_jsonb()` of the other node's `sync_actions` row (or an array of them). Each is
//! validated, merged per column with `merge::merge` and, when it changes something, checked
//! against `pg_sync.max_clock_skew`, observed by the local HLC (receive rule) and applied to the table in "remote mode", so the
//! capture trigger records it with the remote versions and origin instead of minting new ones.
//!
//! Merges of one row serialize on its `row_state` row (`state::lock`; for a key the table does
//! not hold, first tried as `state::insert_first` of the merged state), taken after the table
//! row's lock, the order local writers take them in; the merge reads only that state, never the
//! log. Columns this node does not sync (excluded or generated) are skipped with a WARNING
//! naming them; a column the table lacks (never added, or dropped) fails the change with 42703,
//! so a peer batch parks it until the schema is fixed instead of losing the value.

use crate::capture::{self, RemoteContext};
use crate::clock;
use crate::deep::Jsonb;
use crate::errors;
use crate::model::{self, Model};
use crate::settings;
use crate::state;
use pg_sync_lww::merge::{self, Change, Dml};
use pg_sync_lww::version::{validate_node_id, Version};
use pgrx::prelude::*;
use pgrx::{pg_sys, PgOid};
use serde_json::{Map, Value};
use std::collections::HashMap;

/// The largest batch one call accepts.
pub(crate) const MAX_BATCH: usize = 100_000;

/// The body of `pg_sync.apply_remote()`: returns how many changes changed something.
pub fn apply_remote(change: Jsonb) -> i64 {
    let mut models: HashMap<String, Target> = HashMap::new();
    let mut horizon = state::Horizon::default();
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
                applied +=
                    apply_one(item, &format!("change {i}: "), &mut models, &mut horizon) as i64;
            }
            applied
        }
        other => apply_one(&other, "", &mut models, &mut horizon) as i64,
    }
}

/// A registered model and its relation.
pub(crate) struct Target {
    pub(crate) model: Model,
    pub(crate) relid: pg_sys::Oid,
}

impl Target {
    pub(crate) fn lookup(name: &str) -> Target {
        let model = Model::lookup(name);
        let relid = model::run(
            "SELECT pg_catalog.to_jsonb(r.rel::pg_catalog.oid::pg_catalog.int8) FROM pg_sync.registry r
              WHERE r.model OPERATOR(pg_catalog.=) ($1 OPERATOR(pg_catalog.->>) 'm')",
            &[PgOid::from(pg_sys::JSONBOID)],
            vec![Jsonb(serde_json::json!({"m": name}))],
        )
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
        Target {
            model,
            relid: pg_sys::Oid::from(relid as u32),
        }
    }
}

/// One validated change, ready to merge.
pub(crate) struct Prepared {
    pub(crate) model_name: String,
    /// Canonical.
    pub(crate) model_id: String,
    pub(crate) key: Map<String, Value>,
    pub(crate) change: Change,
    /// The newest version the change carries (checked against the clock skew bound).
    pub(crate) newest: Version,
    pub(crate) origin: String,
    /// Error message prefix naming the change and its row.
    pub(crate) row_ctx: String,
}

/// Applies one change; returns whether it changed anything.
fn apply_one(
    raw: &Value,
    ctx: &str,
    models: &mut HashMap<String, Target>,
    horizon: &mut state::Horizon,
) -> bool {
    let p = prepare(raw, ctx, models);
    apply_change(&models[&p.model_name], &p, horizon)
}

/// Validates one change (raising what the per-change path raises) and looks its model up.
pub(crate) fn prepare(raw: &Value, ctx: &str, models: &mut HashMap<String, Target>) -> Prepared {
    let Some(obj) = raw.as_object() else {
        errors::invalid(
            format!("{ctx}a change must be a JSON object"),
            "Pass to_jsonb() of a sync_actions row.",
        );
    };
    // A captured row's exact texts (`exact`) are no column: the merge writes the JSON form, as
    // for log rows written before they existed.
    let stripped;
    let obj = match obj.get("data").and_then(Value::as_object) {
        Some(d) if d.contains_key(crate::exact::KEY) => {
            let mut o = obj.clone();
            if let Some(Value::Object(d)) = o.get_mut("data") {
                crate::exact::strip(d);
            }
            stripped = o;
            &stripped
        }
        _ => obj,
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
        models.insert(model_name.clone(), Target::lookup(&model_name));
    }
    let target = &models[&model_name];
    let model = &target.model;
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
    let mut parsed = state::parse_action(obj, &row_ctx, |c| model.is_key(c));
    let unknown: Vec<&str> = obj
        .get("data")
        .and_then(Value::as_object)
        .into_iter()
        .flat_map(|data| data.keys())
        .filter(|c| !model.is_key(c) && !model.columns.contains(c))
        .map(String::as_str)
        .collect();
    let missing: Vec<&str> = unknown
        .iter()
        .copied()
        .filter(|c| !model.unsynced.iter().any(|u| u == c))
        .collect();
    if !missing.is_empty() {
        // A column this table lacks: the peer's schema is ahead (or differs). Skipping it would
        // lose the value for good (nothing re-sends it once the column is added), so the change
        // fails: a peer batch parks it and retry_quarantined applies it after the fix.
        errors::raise(
            PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
            format!(
                "{row_ctx}the table has no column {}: the peer's schema differs",
                missing
                    .iter()
                    .map(|c| format!("\"{c}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            "Add the column here (then pg_sync.retry_quarantined(peer)), or exclude it on the sending node.",
        );
    }
    if !unknown.is_empty() {
        // Excluded or generated here: not synced by this node, skipped.
        // Names only: values are the application's data and stay out of the server log.
        pgrx::warning!(
            "pg_sync: {row_ctx}skipped columns this node does not sync: {}",
            unknown.join(", ")
        );
        parsed.columns.retain(|c, _| !unknown.contains(&c.as_str()));
    }
    let newest = parsed
        .columns
        .values()
        .map(|(_, v)| v)
        .fold(&parsed.version, |m, v| if v > m { v } else { m })
        .clone();
    Prepared {
        model_name,
        model_id,
        key,
        change: parsed.change(),
        newest,
        origin,
        row_ctx,
    }
}

fn apply_change(target: &Target, p: &Prepared, horizon: &mut state::Horizon) -> bool {
    let (model_id, key, change, row_ctx) =
        (p.model_id.as_str(), &p.key, &p.change, p.row_ctx.as_str());
    let model = &target.model;
    // Table row first, then its state: the order local writers lock them in (the trigger runs
    // with the table row locked).
    let mut current = model.select_for_update(key);
    if current.is_none() {
        // A key the table does not hold, most likely new (a catch-up's inserts): merge as if it
        // had no state and insert that first state, one write instead of a placeholder and an
        // update. The insert is the lock: it conflicts (after waiting for the writer) when the
        // key has a state row, committed or not, so a local writer that inserted the row since
        // the look above (its trigger records the state) sends this change the placeholder way
        // below, and one that inserts the row later waits for this transaction in its trigger
        // (holding its unique index entry: if this apply then inserts the same key, it waits for
        // that entry and one of the two fails with 40P01, as on the placeholder way).
        let unrecorded = state::unrecorded(false);
        let outcome = merge::merge(&unrecorded, None, change);
        if outcome.changed() && state::insert_first(&model.name, model_id, &outcome.state) {
            // Look again, as the placeholder way does after its lock: a row written without a
            // state (capture disabled) may have been committed since the first look.
            current = model.select_for_update(key);
            if current.is_none() {
                // The horizon only now: the insert waited for a GC pass that dropped this key's
                // tombstone, so the read sees that pass's horizon. The error rolls back the
                // state inserted with the statement (or the batch's subtransaction).
                if state::below_gc_horizon(change, horizon) {
                    state::refuse_below_gc_horizon(row_ctx);
                }
                return write_merged(target, p, unrecorded, None, outcome, true);
            }
            // A row with no state: merge it as live at the zero version (the placeholder way's
            // `unrecorded(true)`) and store that state over the one just inserted.
            let state = state::unrecorded(true);
            let outcome = merge::merge(&state, current.as_ref(), change);
            return write_merged(target, p, state, current, outcome, false);
        }
    }
    // A key the table does not hold may be inserted locally until the state is locked, so look
    // again after.
    let stored = state::lock(&model.name, model_id);
    if current.is_none() {
        current = model.select_for_update(key);
    }
    // No state and no row: a new row, or one whose tombstone GC dropped. A change at or below
    // the GC horizon may be the latter's late write, which the tombstone would have beaten.
    if stored.is_none() && current.is_none() && state::below_gc_horizon(change, horizon) {
        state::refuse_below_gc_horizon(row_ctx);
    }
    let state = stored.unwrap_or_else(|| state::unrecorded(current.is_some()));
    let outcome = merge::merge(&state, current.as_ref(), change);
    write_merged(target, p, state, current, outcome, false)
}

/// The rest of `apply_change` once the row and its state are locked and merged: the conflict
/// log, the skew check and the clock, the state (unless `stored`: `insert_first` wrote it, and
/// an error below rolls it back) and the table write.
fn write_merged(
    target: &Target,
    p: &Prepared,
    state: merge::State,
    current: Option<Map<String, Value>>,
    outcome: merge::Outcome,
    stored: bool,
) -> bool {
    let (model_id, key, change, newest, origin, row_ctx) = (
        p.model_id.as_str(),
        &p.key,
        &p.change,
        &p.newest,
        p.origin.as_str(),
        p.row_ctx.as_str(),
    );
    let model = &target.model;
    if settings::log_conflicts() {
        log_conflicts(
            &model.name,
            model_id,
            &state,
            current.as_ref(),
            change,
            &outcome,
            origin,
        );
    }
    if !outcome.changed() {
        // Already merged (an echo of a change applied before, e.g. by retry_quarantined with
        // a larger skew): nothing to store and no clock to move, so no skew to refuse; parking
        // it would show an open quarantine for a change this node holds.
        return false;
    }
    check_skew(newest, row_ctx);
    clock::observe(newest.hlc);
    // Stored before the write: triggers it fires may write this row locally (recording their
    // own, newer versions on top), which storing afterwards would overwrite.
    if !stored {
        state::store(&model.name, model_id, &outcome.state);
    }
    if outcome.dml == Dml::None {
        // No write, so no capture: log what the merge raised, or relays never forward it.
        let group = match current {
            Some(_) => model.group_of(key).flatten(),
            None => None,
        };
        crate::peers::log_state_only(
            model,
            model_id,
            key,
            &outcome,
            origin,
            current.as_ref(),
            group,
        );
        return true;
    }
    let insert_row = match &outcome.dml {
        Dml::Insert(row) => insert_values(model, row, key),
        _ => Map::new(),
    };
    let touched = {
        let _remote = capture::enter_remote(RemoteContext {
            relid: target.relid,
            model_id: model_id.to_owned(),
            depth: capture::trigger_depth() + 1,
            origin: origin.to_owned(),
            state: outcome.state.clone(),
            won: outcome.won.clone(),
            created_won: outcome.created_won,
            written: match &outcome.dml {
                Dml::Update(cols) => cols.clone(),
                _ => insert_row.clone(),
            },
        });
        match &outcome.dml {
            Dml::None => true,
            Dml::Insert(_) => model.insert_overriding(&insert_row),
            Dml::Update(cols) => model.update(key, cols),
            Dml::Delete => model.delete(key),
        }
    };
    if !touched {
        // A BEFORE trigger or a policy skipped the write: the table does not hold what the merge
        // decided, so the state goes back to what it was and the change does not count.
        pgrx::warning!(
            "pg_sync: {row_ctx}the table's triggers or policies skipped the merged write; change not applied"
        );
        state::store(&model.name, model_id, &state);
        return false;
    }
    true
}

/// Rejects versions from too far in the future before they can drag the clock along (or be
/// stored): 22008.
pub(crate) fn check_skew(newest: &Version, row_ctx: &str) {
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
}

/// The optional conflict log (`pg_sync.log_conflicts`): each incoming column value that lost to
/// a newer register minted by another node (a column version, or the tombstone of a dead row),
/// one row in `pg_sync.conflicts` with both versions and no values. Losing to a newer write of
/// the same node is not a conflict (a late relay of an older write), nor is an equal version
/// (an echo), nor a loss to an equal value.
pub(crate) fn log_conflicts(
    model: &str,
    model_id: &str,
    state: &merge::State,
    current: Option<&Map<String, Value>>,
    change: &Change,
    outcome: &merge::Outcome,
    origin: &str,
) {
    let node = |v: &str| {
        v.rsplit_once('@')
            .map(|(_, n)| n.to_owned())
            .unwrap_or_default()
    };
    let lost: Vec<Value> = change
        .columns
        .iter()
        .filter(|(col, _)| !outcome.won.contains_key(*col))
        .filter_map(|(col, (value, version))| {
            let kept = match current {
                Some(row) if !crate::deep::same(row.get(col), Some(value)) => state.effective(col),
                Some(_) => return None,
                None => state.deleted.clone()?,
            };
            (merge::gt(&kept, version) && node(&kept) != node(version)).then(|| {
                serde_json::json!({"model": model, "model_id": model_id, "column_name": col,
                                   "kept_version": kept, "lost_version": version, "origin": origin})
            })
        })
        .collect();
    if lost.is_empty() {
        return;
    }
    model::run(
        "INSERT INTO pg_sync.conflicts (model, model_id, column_name, kept_version, lost_version, origin)
         SELECT x.model, x.model_id, x.column_name, x.kept_version, x.lost_version, x.origin
           FROM pg_catalog.jsonb_to_recordset($1) AS x(model text, model_id text, column_name text,
                                                        kept_version text, lost_version text, origin text)",
        &[PgOid::from(pg_sys::JSONBOID)],
        vec![Jsonb(Value::Array(lost))],
    );
}

/// The values of an insert `merge` decided on (`Dml::Insert`) for the row with `key`: values
/// waiting for a resurrecting insert may name columns dropped since, which are left out.
pub(crate) fn insert_values(
    model: &Model,
    row: &Map<String, Value>,
    key: &Map<String, Value>,
) -> Map<String, Value> {
    let mut values: Map<String, Value> = row
        .iter()
        .filter(|(c, _)| model.columns.contains(c))
        .map(|(c, v)| (c.clone(), v.clone()))
        .collect();
    values.extend(key.clone());
    values
}
