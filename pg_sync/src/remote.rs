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
use pg_sync_lww::merge::{self, Change, Dml, Kind, State};
use pg_sync_lww::version::{validate_node_id, Version};
use pgrx::prelude::*;
use pgrx::{pg_sys, JsonB, PgOid};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap};

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

fn field<'a>(obj: &'a Map<String, Value>, name: &str, ctx: &str) -> &'a Value {
    obj.get(name).filter(|v| !v.is_null()).unwrap_or_else(|| {
        errors::invalid(
            format!("{ctx}change is missing \"{name}\""),
            "Pass to_jsonb() of a pg_sync.sync_actions row from the other node.",
        )
    })
}

fn string_field<'a>(obj: &'a Map<String, Value>, name: &str, ctx: &str) -> &'a str {
    field(obj, name, ctx).as_str().unwrap_or_else(|| {
        errors::invalid(
            format!("{ctx}\"{name}\" must be a string"),
            "See pg_sync.sync_actions for the shape.",
        )
    })
}

fn parse_version(text: &str, what: &str, ctx: &str) -> Version {
    Version::parse(text).unwrap_or_else(|why| {
        errors::invalid(
            format!("{ctx}invalid version in {what}: {why}"),
            "Versions look like 0193a8f2c4d10003@node-id.",
        )
    })
}

/// Applies one change; returns whether it changed anything.
fn apply_one(raw: &Value, ctx: &str, models: &mut HashMap<String, Model>) -> bool {
    let Some(obj) = raw.as_object() else {
        errors::invalid(
            format!("{ctx}a change must be a JSON object"),
            "Pass to_jsonb() of a sync_actions row.",
        );
    };
    let model_name = string_field(obj, "model", ctx);
    let model_id = string_field(obj, "model_id", ctx);
    let action = string_field(obj, "action", ctx);
    let origin = string_field(obj, "origin", ctx);
    if let Err(why) = validate_node_id(origin) {
        errors::invalid(
            format!("{ctx}invalid origin: {why}"),
            "origin is the node id that made the change.",
        );
    }
    let version_text = string_field(obj, "version", ctx);
    let version = parse_version(version_text, "\"version\"", ctx);
    let moved = match obj.get("moved") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => errors::invalid(
            format!("{ctx}\"moved\" must be a boolean"),
            "See pg_sync.sync_actions.",
        ),
    };
    let kind = match (action, moved) {
        ("I", false) => Kind::Insert,
        ("I", true) | ("U", _) => Kind::Columns,
        ("D", false) => Kind::Delete,
        ("D", true) => Kind::Ignore,
        _ => errors::invalid(
            format!("{ctx}\"action\" must be \"I\", \"U\" or \"D\""),
            "See pg_sync.sync_actions.",
        ),
    };

    if !models.contains_key(model_name) {
        models.insert(model_name.to_owned(), Model::lookup(model_name));
    }
    let model = &models[model_name];
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
    let key = model.key_object(model_id, &row_ctx);

    let per_column = match obj.get("versions") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => errors::invalid(
            format!("{row_ctx}\"versions\" must be an object"),
            "See pg_sync.sync_actions.",
        ),
    };
    let mut columns = BTreeMap::new();
    let mut newest = version.clone();
    if kind != Kind::Delete && kind != Kind::Ignore {
        let data = match field(obj, "data", ctx) {
            Value::Object(m) => m,
            _ => errors::invalid(
                format!("{row_ctx}\"data\" must be an object"),
                "See pg_sync.sync_actions.",
            ),
        };
        for (col, value) in data {
            model.check_column(col, &row_ctx);
            if model.is_key(col) {
                continue; // keys are immutable; the row is addressed by model_id
            }
            let v = match per_column.get(col) {
                None => version.clone(),
                Some(Value::String(s)) => {
                    parse_version(s, &format!("\"versions\".{col}"), &row_ctx)
                }
                Some(_) => errors::invalid(
                    format!("{row_ctx}versions must be strings"),
                    "See pg_sync.sync_actions.",
                ),
            };
            if v > newest {
                newest = v.clone();
            }
            columns.insert(col.clone(), (value.clone(), v.to_string()));
        }
    }

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

    let change = Change {
        kind,
        version: version.to_string(),
        columns,
    };
    apply_change(model, model_id, &key, &change, origin)
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

fn load_state(model: &str, model_id: &str) -> Option<State> {
    let v = model::run(
        "SELECT pg_catalog.jsonb_build_object('created', created, 'deleted', deleted,
                                              'versions', versions, 'pending', pending)
           FROM pg_sync.row_state
          WHERE model = $1 OPERATOR(pg_catalog.->>) 'm' AND model_id = $1 OPERATOR(pg_catalog.->>) 'i'
            FOR UPDATE",
        &[PgOid::from(pg_sys::JSONBOID)],
        vec![JsonB(serde_json::json!({"m": model, "i": model_id}))],
    )?;
    let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
    let versions = v
        .get("versions")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, x)| Some((k.clone(), x.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default();
    let pending = v
        .get("pending")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    Some(State {
        created: s("created"),
        deleted: s("deleted"),
        versions,
        pending,
    })
}

fn store_state(model: &str, model_id: &str, state: &State) {
    let versions: Map<String, Value> = state
        .versions
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let doc = serde_json::json!({
        "m": model, "i": model_id, "c": state.created, "d": state.deleted,
        "v": versions, "p": if state.pending.is_empty() { Value::Null } else { Value::Object(state.pending.clone()) },
        "x": state.max_version(),
    });
    model::run(
        "INSERT INTO pg_sync.row_state AS s (model, model_id, created, deleted, versions, pending, max_version)
         SELECT $1->>'m', $1->>'i', $1->>'c', $1->>'d', $1->'v',
                CASE WHEN pg_catalog.jsonb_typeof($1->'p') = 'object' THEN $1->'p' END, $1->>'x'
         ON CONFLICT (model, model_id) DO UPDATE SET
           created = EXCLUDED.created, deleted = EXCLUDED.deleted, versions = EXCLUDED.versions,
           pending = EXCLUDED.pending, max_version = EXCLUDED.max_version
         RETURNING NULL::pg_catalog.jsonb",
        &[PgOid::from(pg_sys::JSONBOID)],
        vec![JsonB(doc)],
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
    let state = load_state(&model.name, model_id).unwrap_or_else(|| State {
        // A row that predates registration (or was written with capture disabled) is live at
        // the zero version.
        created: current.as_ref().map(|_| String::new()),
        ..State::default()
    });
    let outcome = merge::merge(&state, current.as_ref(), change);
    if !outcome.changed() {
        return false;
    }
    {
        let _remote = capture::enter_remote(RemoteContext {
            origin: origin.to_owned(),
            created: outcome.state.created.clone(),
            deleted: outcome.state.deleted.clone(),
            versions: outcome.state.versions.clone(),
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
    store_state(&model.name, model_id, &outcome.state);
    true
}
