//! A row's LWW state, folded from the log.
//!
//! Local writes only append to `sync_actions`; they do not touch `row_state`, which keeps the
//! write path to one insert. A row's state is `row_state` (the state as of action `folded_id`,
//! written by `apply_remote`) with every later action of the row merged in. Merging is
//! order-independent and idempotent, so folding the log gives exactly the state the writes made.
//! Writers of one row are serialized by its row lock (or, for rows that do not exist, the key's
//! unique index and `apply_remote`'s advisory lock), so a row's later actions always have
//! higher ids than the ones already folded.

use crate::errors;
use crate::model;
use pg_sync_lww::merge::{self, Change, Kind, State};
use pg_sync_lww::version::Version;
use pgrx::{pg_sys, JsonB, PgOid};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

/// What a `sync_actions` row (as JSON) asks a merge to do.
pub struct Parsed {
    pub kind: Kind,
    pub version: Version,
    /// column -> (value, version); a column whose version is empty (the zero version) is left out.
    pub columns: BTreeMap<String, (Value, Version)>,
}

/// Parses the merge-relevant fields of an action. `ctx` prefixes error messages; `is_key` skips
/// key columns (keys are immutable and carry no version).
pub fn parse_action(obj: &Map<String, Value>, ctx: &str, is_key: impl Fn(&str) -> bool) -> Parsed {
    let string = |name: &str| required_str(obj, name, ctx);
    let version = parse_version(string("version"), "\"version\"", ctx);
    let moved = match obj.get("moved") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => errors::invalid(
            format!("{ctx}\"moved\" must be a boolean"),
            "See pg_sync.sync_actions.",
        ),
    };
    let kind = match (string("action"), moved) {
        ("I", false) => Kind::Insert,
        ("I", true) | ("U", _) => Kind::Columns,
        ("D", false) => Kind::Delete,
        ("D", true) => Kind::Ignore,
        _ => errors::invalid(
            format!("{ctx}\"action\" must be \"I\", \"U\" or \"D\""),
            "See pg_sync.sync_actions.",
        ),
    };
    let per_column = match obj.get("versions") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => errors::invalid(
            format!("{ctx}\"versions\" must be an object"),
            "See pg_sync.sync_actions.",
        ),
    };
    let mut columns = BTreeMap::new();
    if matches!(kind, Kind::Insert | Kind::Columns) {
        let data = match obj.get("data") {
            Some(Value::Object(m)) => m,
            None | Some(Value::Null) => errors::invalid(
                format!("{ctx}change is missing \"data\""),
                "Pass to_jsonb() of a pg_sync.sync_actions row from the other node.",
            ),
            Some(_) => errors::invalid(
                format!("{ctx}\"data\" must be an object"),
                "See pg_sync.sync_actions.",
            ),
        };
        for (col, value) in data {
            if is_key(col) {
                continue;
            }
            let v = match per_column.get(col) {
                None => version.clone(),
                Some(Value::String(s)) if s.is_empty() => continue,
                Some(Value::String(s)) => parse_version(s, &format!("\"versions\".{col}"), ctx),
                Some(_) => errors::invalid(
                    format!("{ctx}versions must be strings"),
                    "See pg_sync.sync_actions.",
                ),
            };
            columns.insert(col.clone(), (value.clone(), v));
        }
    }
    Parsed {
        kind,
        version,
        columns,
    }
}

/// A string field a `sync_actions` row must have; raises 22023 naming it otherwise.
pub fn required_str<'a>(obj: &'a Map<String, Value>, name: &str, ctx: &str) -> &'a str {
    match obj.get(name) {
        Some(Value::String(s)) => s,
        None | Some(Value::Null) => errors::invalid(
            format!("{ctx}change is missing \"{name}\""),
            "Pass to_jsonb() of a pg_sync.sync_actions row from the other node.",
        ),
        Some(_) => errors::invalid(
            format!("{ctx}\"{name}\" must be a string"),
            "See pg_sync.sync_actions for the shape.",
        ),
    }
}

pub fn parse_version(text: &str, what: &str, ctx: &str) -> Version {
    Version::parse(text).unwrap_or_else(|why| {
        errors::invalid(
            format!("{ctx}invalid version in {what}: {why}"),
            "Versions look like 0193a8f2c4d10003@node-id.",
        )
    })
}

impl Parsed {
    pub fn change(&self) -> Change {
        Change {
            kind: self.kind,
            version: self.version.to_string(),
            columns: self
                .columns
                .iter()
                .map(|(c, (v, ver))| (c.clone(), (v.clone(), ver.to_string())))
                .collect(),
        }
    }
}

fn strings(v: Option<&Value>) -> Option<String> {
    v.and_then(Value::as_str).map(str::to_owned)
}

/// The row's current state. `exists` says whether the table holds the row now: a row with no
/// recorded state and no captured history that exists predates capture, and is live at the zero
/// version.
pub fn fold(model_name: &str, model_id: &str, exists: bool, key: &[String]) -> State {
    let doc = model::run(
        "WITH s AS (SELECT * FROM pg_sync.row_state
                     WHERE model = $1 OPERATOR(pg_catalog.->>) 'm' AND model_id = $1 OPERATOR(pg_catalog.->>) 'i')
         SELECT pg_catalog.jsonb_build_object(
           'state', (SELECT pg_catalog.to_jsonb(s) FROM s),
           'actions', (SELECT pg_catalog.jsonb_agg(pg_catalog.to_jsonb(a) ORDER BY a.id)
                         FROM pg_sync.sync_actions a
                        WHERE a.model = $1 OPERATOR(pg_catalog.->>) 'm'
                          AND a.model_id = $1 OPERATOR(pg_catalog.->>) 'i'
                          AND a.id > coalesce((SELECT folded_id FROM s), 0)))",
        &[PgOid::from(pg_sys::JSONBOID)],
        vec![JsonB(json!({"m": model_name, "i": model_id}))],
    )
    .unwrap_or(Value::Null);
    let actions = doc
        .get("actions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut state = match doc.get("state").filter(|s| !s.is_null()) {
        Some(s) => State {
            created: strings(s.get("created")),
            deleted: strings(s.get("deleted")),
            versions: s
                .get("versions")
                .and_then(Value::as_object)
                .map(|m| {
                    m.iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                        .collect()
                })
                .unwrap_or_default(),
            pending: s
                .get("pending")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default(),
        },
        None if exists || !actions.is_empty() => State {
            created: Some(String::new()),
            ..State::default()
        },
        None => State::default(),
    };
    let ctx = format!("log of model \"{model_name}\": ");
    for action in &actions {
        let Some(obj) = action.as_object() else {
            continue;
        };
        let parsed = parse_action(obj, &ctx, |c| key.iter().any(|k| k == c));
        state = merge::merge(&state, None, &parsed.change()).state;
    }
    state
}

/// Stores `state` as folded through the row's newest action.
pub fn store(model_name: &str, model_id: &str, state: &State) {
    let versions: Map<String, Value> = state
        .versions
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let doc = json!({
        "m": model_name, "i": model_id, "c": state.created, "d": state.deleted, "v": versions,
        "p": if state.pending.is_empty() { Value::Null } else { Value::Object(state.pending.clone()) },
        "x": state.max_version(),
    });
    model::run(
        "INSERT INTO pg_sync.row_state AS s (model, model_id, created, deleted, versions, pending, max_version, folded_id)
         SELECT $1->>'m', $1->>'i', $1->>'c', $1->>'d', $1->'v',
                CASE WHEN pg_catalog.jsonb_typeof($1->'p') = 'object' THEN $1->'p' END, $1->>'x',
                coalesce((SELECT max(a.id) FROM pg_sync.sync_actions a
                           WHERE a.model = $1->>'m' AND a.model_id = $1->>'i'), 0)
         ON CONFLICT (model, model_id) DO UPDATE SET
           created = EXCLUDED.created, deleted = EXCLUDED.deleted, versions = EXCLUDED.versions,
           pending = EXCLUDED.pending, max_version = EXCLUDED.max_version, folded_id = EXCLUDED.folded_id
         RETURNING NULL::pg_catalog.jsonb",
        &[PgOid::from(pg_sys::JSONBOID)],
        vec![JsonB(doc)],
    );
}

/// `pg_sync.row_version_state(model, model_id)`: the folded state as JSON, for inspection.
pub fn describe(model_name: &str, model_id: &str) -> Value {
    let m = model::Model::lookup(model_name);
    let key = m.key_object(model_id, "");
    let exists = m.exists(&key);
    let state = fold(model_name, model_id, exists, &m.key);
    json!({
        "live": state.live(),
        "created": state.created,
        "deleted": state.deleted,
        "versions": state.versions,
        "max_version": state.max_version(),
    })
}
