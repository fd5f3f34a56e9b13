//! Federation support in the extension: logging of state-only merges, so that relays forward
//! every register a merge raised (the SQL surface of federation is `sql/federation.sql`).
//!
//! A merge that changes a row's registers without a write to the table (a newer tombstone for a
//! dead row, column values newer than the tombstone kept as pending, a raised `created` of a row
//! whose columns are all newer) fires no capture trigger, so it would reach no action and a
//! relay would never forward it: A→B→C would diverge for good. `log_state_only` writes the
//! action such a merge stands for, with the versions that won, and nothing that did not win (a
//! version is logged once per node).

use crate::deep::Jsonb;
use crate::model::{self, Model};
use crate::owner;
use pg_sync_lww::merge::Outcome;
use pgrx::{pg_sys, PgOid};
use serde_json::{json, Map, Value};

/// An action to log: kind, data, version, per-column versions that differ from it.
type Logged = (&'static str, Map<String, Value>, String, Map<String, Value>);

/// Logs the actions for a merge that changed `outcome.state` but makes no write to the table:
/// a `D` when the tombstone was raised, an `I` when `created` was raised (with the columns that
/// won), else a `U` with the columns that won (values from pending, their own versions).
/// `group` is the row's group when the table holds the row; a dead row's actions carry none, so
/// clients (who select by group) never see values of a row they do not hold.
pub fn log_state_only(
    model: &Model,
    model_id: &str,
    key: &Map<String, Value>,
    outcome: &Outcome,
    origin: &str,
    current: Option<&Map<String, Value>>,
    group: Option<String>,
) {
    // As capture logs it: '' for a grouped model's row without a group, NULL only for a
    // global model (replay tells them apart by the log row alone).
    let group = model.group.as_ref().map(|_| group.unwrap_or_default());
    let state = &outcome.state;
    let mut actions: Vec<Logged> = Vec::new();
    if outcome.deleted_won {
        let version = state.deleted.clone().unwrap_or_default();
        actions.push(("D", key.clone(), version, Map::new()));
    }
    if let (true, Some(row)) = (outcome.created_won, current) {
        // A live row whose columns are all newer than the raised insert: the whole row, each
        // column with its own version, so the action is the row's full state.
        let created = state.created.clone().unwrap_or_default();
        let mut data: Map<String, Value> = row
            .iter()
            .filter(|(c, _)| model.columns.contains(c))
            .map(|(c, v)| (c.clone(), v.clone()))
            .collect();
        let versions = data
            .keys()
            .filter(|c| !model.is_key(c))
            .map(|c| (c.clone(), state.effective(c)))
            .filter(|(_, v)| *v != created)
            .map(|(c, v)| (c, Value::String(v)))
            .collect();
        data.extend(key.clone());
        actions.push(("I", data, created, versions));
    } else if outcome.created_won || !outcome.won.is_empty() {
        let mut data = key.clone();
        for c in outcome.won.keys() {
            if let Some(v) = state.pending.get(c) {
                data.insert(c.clone(), v.clone());
            }
        }
        let version = if outcome.created_won {
            state.created.clone().unwrap_or_default()
        } else {
            outcome
                .won
                .values()
                .max_by(|a, b| pg_sync_lww::version::cmp_text(a, b))
                .cloned()
                .unwrap_or_default()
        };
        let versions: Map<String, Value> = outcome
            .won
            .iter()
            .filter(|(_, v)| **v != version)
            .map(|(c, v)| (c.clone(), Value::String(v.clone())))
            .collect();
        let action = if outcome.created_won { "I" } else { "U" };
        actions.push((action, data, version, versions));
    }
    for (action, data, version, versions) in actions {
        let doc = json!({
            "m": model.name, "i": model_id, "a": action, "d": data, "v": version,
            "vs": if versions.is_empty() { Value::Null } else { Value::Object(versions) },
            "o": origin, "g": group,
        });
        // The log is the owner's; the statement is fixed and fully qualified.
        owner::as_owner(|| {
            model::run(
                "INSERT INTO pg_sync.sync_actions (model, model_id, action, data, version, versions, origin, group_id)
                 SELECT $1 OPERATOR(pg_catalog.->>) 'm', $1 OPERATOR(pg_catalog.->>) 'i',
                        $1 OPERATOR(pg_catalog.->>) 'a', $1 OPERATOR(pg_catalog.->) 'd',
                        $1 OPERATOR(pg_catalog.->>) 'v',
                        CASE WHEN pg_catalog.jsonb_typeof($1 OPERATOR(pg_catalog.->) 'vs') OPERATOR(pg_catalog.=) 'object'
                             THEN $1 OPERATOR(pg_catalog.->) 'vs' END,
                        $1 OPERATOR(pg_catalog.->>) 'o', $1 OPERATOR(pg_catalog.->>) 'g'",
                &[PgOid::from(pg_sys::JSONBOID)],
                vec![Jsonb(doc)],
            )
        });
    }
}
