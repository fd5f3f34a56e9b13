//! `pg_sync.apply_remote_set(changes jsonb)`: the set-based apply of a peer batch, the fast path
//! of `apply_peer_batch`. Same result as `apply_remote` change by change (same table rows, same
//! `row_state`, same log rows with the peer's versions and origin, state-only merges logged),
//! in a handful of statements per batch instead of about six per change:
//!
//! 1. lock every key's table row with one statement per model, in key order (models in name
//!    order), then the `row_state` rows the keys have (one locking read in id order): table
//!    rows before states, the order local writers take them in, and sorted, so two concurrent
//!    applies cannot deadlock on each other. Keys without a state row get no placeholder (the
//!    per-change path's `state::lock` inserts one): a catch-up of new rows would write each
//!    state row twice; their state rows are inserted once, at step 4, and a concurrent writer
//!    of such a key fails that insert (or the table insert) and with it the set path. Those keys
//!    are locked last, in pg_sync's own lock space (`lock_new_keys`), so two applies inserting
//!    them cannot deadlock;
//! 2. merge in Rust, change by change in batch order, from the loaded states and rows;
//! 3. write the table with one INSERT / UPDATE / DELETE per model, kind and column set, each
//!    row with its own remote context (`capture::RemoteSet`) so the capture trigger records it
//!    as the per-change path does; a key changed several times in the batch is written in
//!    rounds (its n-th change in round n, its row re-read before each round);
//! 4. store the merged states: one upsert for keys that had a state row, one insert for the
//!    others, which raises (55000) if a concurrent writer inserted any of them meanwhile.
//!
//! What the set path cannot reproduce exactly it leaves to the per-change path: it returns NULL
//! before writing anything for a model with user triggers or rules (they may write other rows,
//! or change the written values), forced row security, a partitioned table, any foreign key (in
//! it or referencing it), a unique index other than the key's or an exclusion constraint (step
//! 3 writes in key order per model and kind, not in batch order, so such a constraint could pass
//! or fail other changes than the per-change path), or a key column of a type whose `=` is not
//! its canonical text's (`set_capable`), and when `pg_sync.set_apply` is off; after locking
//! (nothing written yet), also when a key with no state and no row has a change the per-change
//! path refuses as below the tombstone GC horizon (`state::below_gc_horizon`, 72000). An error
//! (a bad change, or a write the table did not take as planned, 55000) fails the whole call: `apply_peer_batch` then applies the batch change by
//! change in subtransactions and parks exactly the failing changes, as it always did.

use crate::capture::{self, RemoteContext, RemoteSet};
use crate::clock;
use crate::deep::Jsonb;
use crate::errors;
use crate::model::{self, Model};
use crate::owner;
use crate::peers;
use crate::remote::{self, Prepared, Target, MAX_BATCH};
use crate::settings;
use crate::state;
use pg_sync_lww::merge::{self, Dml, Outcome, State};
use pgrx::prelude::*;
use pgrx::{pg_sys, PgOid};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap};

/// One key of the batch.
struct Key {
    model: String,
    id: String,
    key: Map<String, Value>,
    /// Its changes, as indexes into the batch, in batch order.
    changes: Vec<usize>,
    state: State,
    current: Option<Map<String, Value>>,
    /// A merge changed its state: stored at the end.
    changed: bool,
    /// `row_state` held a row for it when its states were locked (stored with an update); a key
    /// without one gets its first state row with the final insert.
    recorded: bool,
}

/// One row write of a round.
struct Write {
    id: String,
    /// The row for `jsonb_populate_recordset`: key columns and, for inserts and updates, the
    /// written columns.
    row: Map<String, Value>,
    ctx: RemoteContext,
}

/// A state-only merge: key index, change index, outcome, the row at the merge.
type StateOnly = (usize, usize, Outcome, Option<Map<String, Value>>);

/// A round's writes to one model.
#[derive(Default)]
struct Writes {
    state_only: Vec<StateOnly>,
    deletes: Vec<Write>,
    /// By written column set.
    updates: BTreeMap<Vec<String>, Vec<Write>>,
    inserts: BTreeMap<Vec<String>, Vec<Write>>,
}

/// The body of `pg_sync.apply_remote_set()`: how many changes changed something, or `None`
/// (SQL NULL) when the batch must go change by change (see the module comment).
pub fn apply_remote_set(changes: Jsonb) -> Option<i64> {
    if !settings::set_apply() {
        return None;
    }
    let Value::Array(items) = changes.0 else {
        return None;
    };
    if items.is_empty() || items.len() > MAX_BATCH {
        return None;
    }
    let mut names: Vec<&str> = items
        .iter()
        .filter_map(|i| i.get("model").and_then(Value::as_str))
        .collect();
    names.sort_unstable();
    names.dedup();
    if !names.iter().all(|name| set_capable(name)) {
        return None;
    }
    let mut targets: HashMap<String, Target> = HashMap::new();
    let batch: Vec<Prepared> = items
        .iter()
        .enumerate()
        .map(|(i, item)| remote::prepare(item, &format!("change {i}: "), &mut targets))
        .collect();

    // The keys, in first-appearance order, and each change's key and round.
    let mut keys: Vec<Key> = Vec::new();
    let mut index: HashMap<(&str, &str), usize> = HashMap::new();
    let mut key_of = Vec::with_capacity(batch.len());
    let mut round_of = Vec::with_capacity(batch.len());
    for (i, p) in batch.iter().enumerate() {
        let k = *index
            .entry((p.model_name.as_str(), p.model_id.as_str()))
            .or_insert_with(|| {
                keys.push(Key {
                    model: p.model_name.clone(),
                    id: p.model_id.clone(),
                    key: p.key.clone(),
                    changes: Vec::new(),
                    state: State::default(),
                    current: None,
                    changed: false,
                    recorded: false,
                });
                keys.len() - 1
            });
        round_of.push(keys[k].changes.len());
        keys[k].changes.push(i);
        key_of.push(k);
    }
    // Each model's keys, models in name order (the lock order).
    let mut by_model: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (k, key) in keys.iter().enumerate() {
        by_model.entry(key.model.clone()).or_default().push(k);
    }

    // 1. Locks: table rows, then states; a key the table did not hold may have been inserted
    // (and committed) by a local writer until its state was locked, so look again after.
    for (name, ks) in &by_model {
        let mut rows = lock_rows(&targets[name].model, &keys, ks);
        for &k in ks {
            keys[k].current = rows.remove(&keys[k].id);
        }
    }
    for (name, ks) in &by_model {
        let mut stored = lock_states(name, &keys, ks);
        for &k in ks {
            if let Some(found) = stored.remove(&keys[k].id) {
                keys[k].recorded = true;
                keys[k].state = found.unwrap_or_default();
            }
        }
    }
    for (name, ks) in &by_model {
        // Only a key with a state row can have been inserted since: a local insert records its
        // state in its own transaction, and one that has not committed by now makes this
        // batch's insert of the key (table row, or first state row) fail (see `store_states`).
        let missing: Vec<usize> = ks
            .iter()
            .copied()
            .filter(|&k| keys[k].current.is_none() && keys[k].recorded)
            .collect();
        if !missing.is_empty() {
            let mut rows = lock_rows(&targets[name].model, &keys, &missing);
            for k in missing {
                keys[k].current = rows.remove(&keys[k].id);
            }
        }
    }
    // A key with no state and no row met by a change at or below the tombstone GC horizon:
    // the per-change path refuses that change (72000) and `apply_peer_batch` parks it. Nothing
    // is written yet: declining leaves the whole batch to that path, which refuses exactly the
    // changes it would (declining when a later change of the key is the stale one, after an
    // earlier change gave it a state, is merely slower).
    let mut horizon = state::Horizon::default();
    if keys.iter().any(|k| {
        k.state == State::default()
            && k.current.is_none()
            && k.changes
                .iter()
                .any(|&i| state::below_gc_horizon(&batch[i].change, &mut horizon))
    }) {
        return None;
    }
    // Keys without a state row have no row lock to order two applies inserting them (each
    // inserts them in its own model and round order): lock them here, last and in one order,
    // so a second apply of any of them waits for this one before it writes anything.
    lock_new_keys(&keys);
    // A row without recorded state is live at the zero version if the table holds it.
    for key in keys.iter_mut() {
        if key.state == State::default() {
            key.state = state::unrecorded(key.current.is_some());
        }
    }

    // Writes go model by model in the batch's order of first appearance (parents before
    // children when the batch has them in that order).
    let mut model_order: Vec<&str> = Vec::new();
    for p in &batch {
        if !model_order.contains(&p.model_name.as_str()) {
            model_order.push(&p.model_name);
        }
    }
    let rounds = keys.iter().map(|k| k.changes.len()).max().unwrap_or(0);
    let mut changed = 0i64;
    for round in 0..rounds {
        if round > 0 {
            // Re-read what earlier rounds wrote (defaults and all), as the next change's merge
            // would see it.
            for (name, ks) in &by_model {
                let again: Vec<usize> = ks
                    .iter()
                    .copied()
                    .filter(|&k| keys[k].changes.len() > round)
                    .collect();
                if again.is_empty() {
                    continue;
                }
                let mut rows = lock_rows(&targets[name].model, &keys, &again);
                for k in again {
                    keys[k].current = rows.remove(&keys[k].id);
                }
            }
        }
        // 2. Merge this round's changes in batch order.
        let mut plan: HashMap<String, Writes> = HashMap::new();
        for (i, p) in batch.iter().enumerate() {
            if round_of[i] != round {
                continue;
            }
            let k = key_of[i];
            let target = &targets[&p.model_name];
            let model = &target.model;
            let key = &mut keys[k];
            let outcome = merge::merge(&key.state, key.current.as_ref(), &p.change);
            if settings::log_conflicts() {
                remote::log_conflicts(
                    &model.name,
                    &p.model_id,
                    &key.state,
                    key.current.as_ref(),
                    &p.change,
                    &outcome,
                    &p.origin,
                );
            }
            if !outcome.changed() {
                continue;
            }
            remote::check_skew(&p.newest, &p.row_ctx);
            clock::observe(p.newest.hlc);
            changed += 1;
            key.state = outcome.state.clone();
            key.changed = true;
            let w = plan.entry(p.model_name.clone()).or_default();
            let ctx = |written: Map<String, Value>, outcome: &Outcome| RemoteContext {
                relid: target.relid,
                model_id: p.model_id.clone(),
                depth: capture::trigger_depth() + 1,
                origin: p.origin.clone(),
                state: outcome.state.clone(),
                won: outcome.won.clone(),
                created_won: outcome.created_won,
                written,
            };
            match &outcome.dml {
                Dml::None => w
                    .state_only
                    .push((k, i, outcome.clone(), key.current.clone())),
                Dml::Insert(row) => {
                    let row = remote::insert_values(model, row, &p.key);
                    let cols = row.keys().cloned().collect();
                    let ctx = ctx(row.clone(), &outcome);
                    w.inserts.entry(cols).or_default().push(Write {
                        id: p.model_id.clone(),
                        row,
                        ctx,
                    });
                }
                Dml::Update(cols) => {
                    let names = cols.keys().cloned().collect();
                    let mut row = cols.clone();
                    row.extend(p.key.clone());
                    let ctx = ctx(cols.clone(), &outcome);
                    w.updates.entry(names).or_default().push(Write {
                        id: p.model_id.clone(),
                        row,
                        ctx,
                    });
                }
                Dml::Delete => {
                    let ctx = ctx(Map::new(), &outcome);
                    w.deletes.push(Write {
                        id: p.model_id.clone(),
                        row: p.key.clone(),
                        ctx,
                    });
                }
            }
        }
        // 3. Write this round.
        for name in &model_order {
            if let Some(w) = plan.remove(*name) {
                write(&targets[*name], w, &keys, &batch);
            }
        }
    }
    // 4. The merged states.
    store_states(&keys);
    Some(changed)
}

/// Key column types whose SQL equality is the equality of their canonical text (the set path
/// finds a locked row by that text, the per-change path by `=`): integers, numeric (its
/// canonical text drops the scale), uuid, bool, bytea, dates and timestamps, and text types under
/// a deterministic collation. Anything else (citext, interval, floats, domains, arrays, ...)
/// goes change by change.
const TEXT_EQUAL_KEY_TYPES: &str =
    "'{int2,int4,int8,numeric,uuid,bool,bytea,date,timestamp,timestamptz,text,varchar,bpchar}'";

/// Whether the set path writes `model`'s table exactly as the per-change path would. Besides
/// the writes of triggers, rules and FK actions, it declines where the order of the writes
/// matters: the set path writes per model and kind in key order, not in batch order, so a
/// unique index other than the key's, an exclusion constraint, or a foreign key on either side
/// could fail a change the set path lets through (or the other way round).
fn set_capable(model: &str) -> bool {
    let sql = format!(
        "SELECT pg_catalog.to_jsonb(c.relkind OPERATOR(pg_catalog.=) 'r' AND NOT c.relhasrules
                AND NOT c.relforcerowsecurity
                AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t
                                 WHERE t.tgrelid OPERATOR(pg_catalog.=) c.oid AND NOT t.tgisinternal
                                   AND t.tgname::pg_catalog.text NOT LIKE 'pg\\_sync\\_%')
                AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint f
                                 WHERE f.contype OPERATOR(pg_catalog.=) 'f'
                                   AND (f.confrelid OPERATOR(pg_catalog.=) c.oid
                                        OR f.conrelid OPERATOR(pg_catalog.=) c.oid))
                AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint x
                                 WHERE x.contype OPERATOR(pg_catalog.=) 'x'
                                   AND x.conrelid OPERATOR(pg_catalog.=) c.oid)
                AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_index i
                                 WHERE i.indrelid OPERATOR(pg_catalog.=) c.oid
                                   AND (i.indisunique OR i.indisexclusion)
                                   AND (i.indexprs IS NOT NULL OR i.indpred IS NOT NULL
                                        OR i.indisexclusion
                                        OR ARRAY(SELECT a.attname::pg_catalog.text
                                                   FROM pg_catalog.pg_attribute a
                                                  WHERE a.attrelid OPERATOR(pg_catalog.=) c.oid
                                                    AND a.attnum OPERATOR(pg_catalog.=) ANY (i.indkey::pg_catalog.int2[])
                                                  ORDER BY 1)
                                           OPERATOR(pg_catalog.<>)
                                           ARRAY(SELECT k FROM pg_catalog.unnest(r.pk_columns) AS k ORDER BY 1)))
                AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                                  JOIN pg_catalog.pg_type y ON y.oid OPERATOR(pg_catalog.=) a.atttypid
                                  LEFT JOIN pg_catalog.pg_collation o ON o.oid OPERATOR(pg_catalog.=) a.attcollation
                                 WHERE a.attrelid OPERATOR(pg_catalog.=) c.oid
                                   AND a.attname::pg_catalog.text OPERATOR(pg_catalog.=) ANY (r.pk_columns)
                                   AND (y.typnamespace OPERATOR(pg_catalog.<>) 'pg_catalog'::pg_catalog.regnamespace
                                        OR y.typname::pg_catalog.text OPERATOR(pg_catalog.<>) ALL ({TEXT_EQUAL_KEY_TYPES}::pg_catalog.text[])
                                        OR NOT coalesce(o.collisdeterministic, true))))
           FROM pg_sync.registry r JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) r.rel
          WHERE r.model OPERATOR(pg_catalog.=) ($1 OPERATOR(pg_catalog.->>) 'm')"
    );
    model::run(
        &sql,
        &[PgOid::from(pg_sys::JSONBOID)],
        vec![Jsonb(json!({"m": model}))],
    )
    .and_then(|v| v.as_bool())
    .unwrap_or(false)
}

fn quoted<'a>(cols: impl IntoIterator<Item = &'a String>, prefix: &str) -> String {
    cols.into_iter()
        .map(|c| format!("{prefix}{}", spi::quote_identifier(c)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Locks the table rows of keys `ks` (of one model) in key order; returns the live ones' synced
/// columns by model id.
fn lock_rows(model: &Model, keys: &[Key], ks: &[usize]) -> HashMap<String, Map<String, Value>> {
    // One index lookup per key, in key order: the keys sorted first (a subquery with ORDER BY
    // stays a separate, sorted input), each row locked by a LATERAL subquery on its key. A join
    // leaves the plan to the planner, which (the generic plan estimates 100 keys) may hash the
    // whole table for every batch.
    let sql = format!(
        "WITH l AS (SELECT r.* FROM (SELECT {xk} FROM pg_catalog.jsonb_populate_recordset(NULL::{t}, $1) AS x
                                       ORDER BY {xk}) AS x,
                      LATERAL (SELECT {cols} FROM {t} AS t WHERE ({tk}) = ({xk}) FOR UPDATE OF t) AS r)
         SELECT pg_catalog.jsonb_object_agg({id}, pg_catalog.to_jsonb(l.*)) FROM l",
        cols = quoted(&model.columns, "t."),
        t = model.table,
        tk = quoted(&model.key, "t."),
        xk = quoted(&model.key, "x."),
        id = model.key_text_expr(),
    );
    let arg = Value::Array(
        ks.iter()
            .map(|&k| Value::Object(keys[k].key.clone()))
            .collect(),
    );
    match model.run(&sql, &[PgOid::from(pg_sys::JSONBOID)], vec![Jsonb(arg)]) {
        Some(Value::Object(rows)) => rows
            .into_iter()
            .filter_map(|(id, row)| match row {
                Value::Object(row) => Some((id, row)),
                _ => None,
            })
            .collect(),
        _ => HashMap::new(),
    }
}

/// Locks the `row_state` rows of keys `ks` (of model `name`) that have one, in id order; returns
/// them by model id (`None` for an empty placeholder row, the same as no state). Keys without a
/// row get no placeholder (unlike `state::lock`): their first state row is inserted with the
/// merged state at the end, and a concurrent writer of such a key makes that insert, or the
/// table insert before it, fail the batch into the per-change path (`store_states`).
fn lock_states(name: &str, keys: &[Key], ks: &[usize]) -> HashMap<String, Option<State>> {
    let mut ids: Vec<&str> = ks.iter().map(|&k| keys[k].id.as_str()).collect();
    ids.sort_unstable();
    let arg = Jsonb(json!({"m": name, "i": ids}));
    // row_state is the owner's; the statement is fixed and fully qualified.
    let found = owner::as_owner(|| {
        model::run(
            // One index lookup per id, in id order (the ids come sorted); see `lock_rows`.
            "WITH l AS (SELECT s.model_id, pg_catalog.to_jsonb(s.*) AS j
                          FROM pg_catalog.jsonb_array_elements_text($1 OPERATOR(pg_catalog.->) 'i') AS i(i),
                          LATERAL (SELECT * FROM pg_sync.row_state r
                                    WHERE r.model OPERATOR(pg_catalog.=) ($1 OPERATOR(pg_catalog.->>) 'm')
                                      AND r.model_id OPERATOR(pg_catalog.=) i.i
                                      FOR UPDATE OF r) AS s)
             SELECT pg_catalog.jsonb_object_agg(l.model_id, l.j) FROM l",
            &[PgOid::from(pg_sys::JSONBOID)],
            vec![arg],
        )
    });
    match found {
        Some(Value::Object(rows)) => rows
            .into_iter()
            .map(|(id, s)| {
                let state = state::from_json(&s);
                (id, state)
            })
            .collect(),
        _ => HashMap::new(),
    }
}

/// Locks, until the transaction ends, the keys without a state row (no placeholder marks them)
/// in a lock space of pg_sync's own (the `userlock` tag type, as `leader`, field4 "pg" / "pk":
/// no application's advisory lock collides with it), so two applies sharing such keys cannot
/// deadlock on them. Every lock entry is in the shared lock table (sized by
/// max_locks_per_transaction), so a key is locked by itself only in a batch with at most
/// `NEW_KEYS_ONE_BY_ONE` of them: first a gate lock, shared, then the keys' locks in tag order.
/// A larger batch (a catch-up of many new rows) takes the gate alone, exclusive: it runs one
/// after the other with any apply that inserts new keys, and never holds more than one entry.
/// Tags are hashes: a collision only makes an apply wait for another that does not need to.
fn lock_new_keys(keys: &[Key]) {
    const NEW_KEYS_ONE_BY_ONE: usize = 64;
    let mut tags: Vec<(u32, u32)> = keys
        .iter()
        .filter(|k| !k.recorded)
        .map(|k| {
            // FNV-1a: the same tag in every backend.
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for b in k.model.bytes().chain([0]).chain(k.id.bytes()) {
                h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
            }
            ((h >> 32) as u32, h as u32)
        })
        .collect();
    if tags.is_empty() {
        return;
    }
    tags.sort_unstable();
    tags.dedup();
    let lock = |(hi, lo): (u32, u32), kind: u16, mode: u32| {
        let tag = pg_sys::LOCKTAG {
            // SAFETY: a plain read of a backend global.
            locktag_field1: unsafe { pg_sys::MyDatabaseId }.to_u32(),
            locktag_field2: hi,
            locktag_field3: lo,
            locktag_field4: kind,
            locktag_type: pg_sys::LockTagType::LOCKTAG_USERLOCK as u8,
            locktag_lockmethodid: pg_sys::USER_LOCKMETHOD as u8,
        };
        // SAFETY: a transaction lock on a tag of our own (released at commit or abort, as
        // pg_advisory_xact_lock's); it waits, and the deadlock detector sees the wait.
        unsafe { pg_sys::LockAcquire(&tag, mode as i32, false, false) };
    };
    if tags.len() > NEW_KEYS_ONE_BY_ONE {
        lock((0, 0), 0x7067, pg_sys::ExclusiveLock);
        return;
    }
    lock((0, 0), 0x7067, pg_sys::ShareLock);
    for t in tags {
        lock(t, 0x706b, pg_sys::ExclusiveLock);
    }
}

/// Stores the merged state of every key a merge changed: one upsert for keys that had a state
/// row, one insert for keys that had none. A key without one got it from a concurrent writer
/// since its states were locked only if that writer had not committed then (it would have been
/// locked), so the insert waits for it and finds the row: fewer rows inserted than planned
/// raise (55000) and `apply_peer_batch` applies the batch change by change, which merges with
/// what that writer committed.
fn store_states(keys: &[Key]) {
    // A key without a state row that no merge changed gets the empty row the per-change path's
    // lock placeholder leaves (the same as no row; stored so both paths leave the same rows).
    let mut rows: Vec<&Key> = keys.iter().filter(|k| k.changed || !k.recorded).collect();
    if rows.is_empty() {
        return;
    }
    rows.sort_by(|a, b| (&a.model, &a.id).cmp(&(&b.model, &b.id)));
    let empty = State::default();
    let doc = |k: &Key| {
        let s = if k.changed { &k.state } else { &empty };
        json!({
            "m": k.model, "i": k.id, "c": s.created, "d": s.deleted,
            "v": s.versions,
            "p": if s.pending.is_empty() { Value::Null } else { Value::Object(s.pending.clone()) },
            "x": s.max_version(),
        })
    };
    let (old, new): (Vec<&Key>, Vec<&Key>) = rows.into_iter().partition(|k| k.recorded);
    let types = [PgOid::from(pg_sys::JSONBOID)];
    owner::as_owner(|| {
        if !old.is_empty() {
            model::run(
                "INSERT INTO pg_sync.row_state AS s (model, model_id, created, deleted, versions, pending, max_version)
                 SELECT x.m, x.i, x.c, x.d, x.v,
                        CASE WHEN pg_catalog.jsonb_typeof(x.p) OPERATOR(pg_catalog.=) 'object' THEN x.p END, x.x
                   FROM pg_catalog.jsonb_to_recordset($1) AS x(m text, i text, c text, d text, v jsonb, p jsonb, x text)
                 ON CONFLICT (model, model_id) DO UPDATE SET
                   created = EXCLUDED.created, deleted = EXCLUDED.deleted, versions = EXCLUDED.versions,
                   pending = EXCLUDED.pending, max_version = EXCLUDED.max_version",
                &types,
                vec![Jsonb(Value::Array(old.iter().map(|k| doc(k)).collect()))],
            );
        }
        if !new.is_empty() {
            let inserted = model::run(
                "WITH w AS (INSERT INTO pg_sync.row_state (model, model_id, created, deleted, versions, pending, max_version)
                            SELECT x.m, x.i, x.c, x.d, x.v,
                                   CASE WHEN pg_catalog.jsonb_typeof(x.p) OPERATOR(pg_catalog.=) 'object' THEN x.p END, x.x
                              FROM pg_catalog.jsonb_to_recordset($1) AS x(m text, i text, c text, d text, v jsonb, p jsonb, x text)
                            ON CONFLICT (model, model_id) DO NOTHING RETURNING 1)
                 SELECT pg_catalog.to_jsonb(pg_catalog.count(*)) FROM w",
                &types,
                vec![Jsonb(Value::Array(new.iter().map(|k| doc(k)).collect()))],
            )
            .and_then(|v| v.as_u64())
            .unwrap_or(0) as usize;
            if inserted != new.len() {
                errors::raise(
                    PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    format!(
                        "the set-based apply found {} of {} new keys' states written concurrently",
                        new.len() - inserted,
                        new.len()
                    ),
                    "apply_peer_batch applies such a batch change by change.",
                );
            }
        }
    });
}

/// Writes one round's changes to one model: state-only logs, then one DELETE, one UPDATE per
/// column set, one INSERT per column set.
fn write(target: &Target, w: Writes, keys: &[Key], batch: &[Prepared]) {
    let model = &target.model;
    for (k, i, outcome, current) in &w.state_only {
        // No write, so no capture: log what the merge raised, or relays never forward it.
        let key = &keys[*k];
        let group = match current {
            Some(_) => model.group_of(&key.key).flatten(),
            None => None,
        };
        peers::log_state_only(
            model,
            &key.id,
            &key.key,
            outcome,
            &batch[*i].origin,
            current.as_ref(),
            group,
        );
    }
    let t = &model.table;
    let on_key = format!(
        "({}) = ({})",
        quoted(&model.key, "t."),
        quoted(&model.key, "x.")
    );
    if !w.deletes.is_empty() {
        let sql = format!(
            "WITH w AS (DELETE FROM {t} AS t USING pg_catalog.jsonb_populate_recordset(NULL::{t}, $1) AS x
                         WHERE {on_key} RETURNING 1)
             SELECT pg_catalog.to_jsonb(pg_catalog.count(*)) FROM w"
        );
        run_writes(target, &sql, w.deletes);
    }
    for (cols, writes) in w.updates {
        let set = cols
            .iter()
            .map(|c| {
                let c = spi::quote_identifier(c);
                format!("{c} = x.{c}")
            })
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "WITH w AS (UPDATE {t} AS t SET {set}
                          FROM pg_catalog.jsonb_populate_recordset(NULL::{t}, $1) AS x
                         WHERE {on_key} RETURNING 1)
             SELECT pg_catalog.to_jsonb(pg_catalog.count(*)) FROM w"
        );
        run_writes(target, &sql, writes);
    }
    for (cols, writes) in w.inserts {
        let cols = quoted(&cols, "");
        let sql = format!(
            "WITH w AS (INSERT INTO {t} ({cols}) OVERRIDING SYSTEM VALUE
                        SELECT {cols} FROM pg_catalog.jsonb_populate_recordset(NULL::{t}, $1)
                        RETURNING 1)
             SELECT pg_catalog.to_jsonb(pg_catalog.count(*)) FROM w"
        );
        run_writes(target, &sql, writes);
    }
}

/// Runs one set-based write with each row's remote context. A row the statement did not write,
/// or whose capture did not take its context, would leave the table or the log other than the
/// merge decided: raise (55000), and `apply_peer_batch` applies the batch change by change.
fn run_writes(target: &Target, sql: &str, mut writes: Vec<Write>) {
    // Key order: the order the statement meets (and locks index entries of) the rows.
    writes.sort_by(|a, b| a.id.cmp(&b.id));
    let expected = writes.len();
    let mut rows = Vec::with_capacity(expected);
    let mut contexts = HashMap::with_capacity(expected);
    for w in writes {
        rows.push(Value::Object(w.row));
        contexts.insert(w.id, w.ctx);
    }
    let guard = capture::enter_remote_set(RemoteSet {
        relid: target.relid,
        depth: capture::trigger_depth() + 1,
        rows: contexts,
    });
    let written = target
        .model
        .run(
            sql,
            &[PgOid::from(pg_sys::JSONBOID)],
            vec![Jsonb(Value::Array(rows))],
        )
        .and_then(|v| v.as_u64())
        .unwrap_or(0) as usize;
    let untaken = capture::remote_set_left();
    drop(guard);
    if written != expected || untaken != 0 {
        errors::raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!(
                "the set-based apply of model \"{}\" wrote {written} of {expected} rows ({untaken} not captured as planned)",
                target.model.name
            ),
            "apply_peer_batch applies such a batch change by change.",
        );
    }
}
