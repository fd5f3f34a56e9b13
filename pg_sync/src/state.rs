//! A row's LWW state, kept current in `pg_sync.row_state`.
//!
//! Every writer keeps `row_state` current as it writes, so reading a row's state is one index
//! lookup and never reads the log: a merge does bounded work however long the row's history,
//! and compaction only deletes actions. Local writes go through `record_local` (called by the
//! capture trigger, serialized with other writers of the row by the table row lock, or for an
//! absent key by its unique index); `apply_remote` locks the `row_state` row with `lock`, merges
//! and writes the result back with `store`. A row with no `row_state` row (or only the
//! placeholder `lock` inserts) has no recorded state: it is live at the zero version if the
//! table holds it (it predates capture), otherwise unknown.

use crate::clock;
use crate::deep::Jsonb;
use crate::errors;
use crate::model;
use crate::owner;
use pg_sync_lww::merge::{Change, Kind, State};
use pg_sync_lww::version::Version;
use pgrx::datum::DatumWithOid;
use pgrx::spi::OwnedPreparedStatement;
use pgrx::{pg_sys, PgOid, Spi};
use serde_json::{json, Map, Value};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

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

thread_local! {
    /// This module's prepared statements. Separate from `model::run`'s cache, and never borrowed
    /// while a statement runs: the capture trigger runs these inside statements `model::run`
    /// executes (apply_remote's and mutate's DML, and the FK cascades they fire).
    static PLANS: RefCell<HashMap<&'static str, Rc<OwnedPreparedStatement>>> = RefCell::new(HashMap::new());
}

/// This module's prepared statement for `sql`, prepared on first use.
fn plan(sql: &'static str, types: &[PgOid]) -> Rc<OwnedPreparedStatement> {
    let plan = PLANS.with(|p| p.borrow().get(sql).cloned());
    plan.unwrap_or_else(|| {
        let plan = Rc::new(
            Spi::connect(|client| client.prepare_mut(sql, types).map(|p| p.keep()))
                .unwrap_or_else(|e| panic!("pg_sync: cannot prepare statement: {e}")),
        );
        PLANS.with(|p| p.borrow_mut().insert(sql, plan.clone()));
        plan
    })
}

/// `INSERT INTO row_state ... SELECT` of a state document (`state_doc`, parameter `$1`) followed
/// by `$conflict`: the one column mapping both writers of a whole state (`insert_first`,
/// `store`) share, so it cannot drift between them.
macro_rules! insert_state_doc {
    ($conflict:literal) => {
        concat!(
            "INSERT INTO pg_sync.row_state AS s (model, model_id, created, deleted, versions, pending, max_version)
             SELECT $1 OPERATOR(pg_catalog.->>) 'm', $1 OPERATOR(pg_catalog.->>) 'i',
                    $1 OPERATOR(pg_catalog.->>) 'c', $1 OPERATOR(pg_catalog.->>) 'd',
                    $1 OPERATOR(pg_catalog.->) 'v',
                    CASE WHEN pg_catalog.jsonb_typeof($1 OPERATOR(pg_catalog.->) 'p') OPERATOR(pg_catalog.=) 'object'
                         THEN $1 OPERATOR(pg_catalog.->) 'p' END,
                    $1 OPERATOR(pg_catalog.->>) 'x'",
            $conflict
        )
    };
}

/// Runs one of this module's statements; returns the first column of its first row, if any.
fn run(sql: &'static str, types: &[PgOid], args: &[DatumWithOid<'_>]) -> Option<Value> {
    let plan = plan(sql, types);
    // row_state is the owner's; these statements are fixed and fully qualified.
    owner::as_owner(|| {
        Spi::connect_mut(|client| {
            let t = client
                .update(&*plan, None, args)
                .unwrap_or_else(|e| panic!("pg_sync: {e}"));
            if t.is_empty() {
                None
            } else {
                t.first().get_one::<Jsonb>().ok().flatten().map(|j| j.0)
            }
        })
    })
}

/// Runs one of this module's statements; returns how many rows it processed.
fn run_count(sql: &'static str, types: &[PgOid], args: &[DatumWithOid<'_>]) -> usize {
    let plan = plan(sql, types);
    owner::as_owner(|| {
        Spi::connect_mut(|client| {
            client
                .update(&*plan, None, args)
                .unwrap_or_else(|e| panic!("pg_sync: {e}"))
                .len()
        })
    })
}

fn text2() -> [PgOid; 2] {
    [PgOid::from(pg_sys::TEXTOID), PgOid::from(pg_sys::TEXTOID)]
}

/// A stored `row_state` row as a `State`; `None` for no recorded state (the placeholder `lock`
/// inserts is the empty state).
pub(crate) fn from_json(s: &Value) -> Option<State> {
    if s.is_null() {
        return None;
    }
    let state = State {
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
    };
    (state != State::default()).then_some(state)
}

/// The state a row without recorded state has: live at the zero version when the table holds
/// it (it predates capture), nothing otherwise.
pub fn unrecorded(exists: bool) -> State {
    if exists {
        State {
            created: Some(String::new()),
            ..State::default()
        }
    } else {
        State::default()
    }
}

/// The row's current state (one index lookup; safe inside the capture trigger).
pub fn load(model_name: &str, model_id: &str, exists: bool) -> State {
    let found = run(
        "SELECT pg_catalog.to_jsonb(s.*) FROM pg_sync.row_state s
          WHERE s.model OPERATOR(pg_catalog.=) $1 AND s.model_id OPERATOR(pg_catalog.=) $2",
        &text2(),
        &[model_name.into(), model_id.into()],
    );
    found
        .as_ref()
        .and_then(from_json)
        .unwrap_or_else(|| unrecorded(exists))
}

/// Locks the row's `row_state` row for `apply_remote`, inserting an empty placeholder when there
/// is none, so merges of one row serialize with each other and with local writes (whose
/// `record_local` waits for this lock), also for keys the table does not hold. Returns the
/// stored state, `None` when there is none.
///
/// A row that another transaction inserted meanwhile (the insert below waits for it and
/// conflicts) can be gone again before the select after it (a GC pass deleted it, committed in
/// between): then neither statement holds a lock, so it starts over. Each round needs another
/// transaction to commit an insert and a delete of the row in that window, so it settles at
/// once in practice; one that does not raises 40001 (transient: a peer batch is retried).
pub fn lock(model_name: &str, model_id: &str) -> Option<State> {
    let select = || {
        run(
            "SELECT pg_catalog.to_jsonb(s.*) FROM pg_sync.row_state s
              WHERE s.model OPERATOR(pg_catalog.=) $1 AND s.model_id OPERATOR(pg_catalog.=) $2
                FOR UPDATE",
            &text2(),
            &[model_name.into(), model_id.into()],
        )
    };
    for _ in 0..LOCK_ROUNDS {
        // (After a conflict: another transaction inserted it meanwhile and has committed, so
        // this statement's snapshot sees it, unless it went again since.)
        if let Some(found) = select() {
            return from_json(&found);
        }
        let inserted = run(
            "INSERT INTO pg_sync.row_state (model, model_id, max_version) VALUES ($1, $2, '')
             ON CONFLICT (model, model_id) DO NOTHING RETURNING 'null'::pg_catalog.jsonb",
            &text2(),
            &[model_name.into(), model_id.into()],
        );
        if inserted.is_some() {
            return None;
        }
    }
    errors::raise(
        pgrx::PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE,
        format!(
            "could not lock the state of a row of model \"{model_name}\": it was inserted and deleted concurrently {LOCK_ROUNDS} times"
        ),
        "Retry the transaction (the worker retries a peer batch).",
    )
}

/// Stores a key's first state, which `lock` plus `store` would do in two writes, and so locks
/// it; false (nothing written) when the key has a `row_state` row (the insert waits for a
/// concurrent inserter to finish first).
pub fn insert_first(model_name: &str, model_id: &str, state: &State) -> bool {
    run(
        insert_state_doc!(
            " ON CONFLICT (model, model_id) DO NOTHING RETURNING 'true'::pg_catalog.jsonb"
        ),
        &[PgOid::from(pg_sys::JSONBOID)],
        &[Jsonb(state_doc(model_name, model_id, state)).into()],
    )
    .is_some()
}

/// How many times `lock` starts over before it gives up.
const LOCK_ROUNDS: usize = 16;

/// The tombstone GC horizon (`pg_sync.tombstone_gc.horizon`): the highest version of a state
/// `gc_tombstones` dropped, `""` before any. Read at most once per apply call (`get`), and only
/// when a change meets a key with no state and no table row once its state is locked (`lock`'s
/// placeholder or `insert_first`): both wait for a GC pass that deleted the key's tombstone, so
/// the first read sees that pass's horizon.
#[derive(Default)]
pub struct Horizon(Option<String>);

impl Horizon {
    pub fn get(&mut self) -> &str {
        self.0.get_or_insert_with(|| {
            run(
                "SELECT pg_catalog.to_jsonb(g.horizon) FROM pg_sync.tombstone_gc g",
                &[],
                &[],
            )
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
        })
    }
}

/// Whether `change`, met by a row with no state and no table row, may be one whose tombstone
/// GC dropped (`pg_sync.gc_horizon_check`): an insert or column change carrying a version at or
/// below the horizon. Such a change lost to the dropped state (wholly, or the columns below the
/// tombstone) and would now bring the row or its values back. A delete cannot bring anything
/// back (it records a tombstone again) and is not refused. Versions compare as text (C order),
/// as `row_state.max_version` and the horizon do.
pub fn below_gc_horizon(change: &Change, horizon: &mut Horizon) -> bool {
    if !matches!(change.kind, Kind::Insert | Kind::Columns) || !crate::settings::gc_horizon_check()
    {
        return false;
    }
    let oldest = change
        .columns
        .values()
        .map(|(_, v)| v.as_str())
        .fold(change.version.as_str(), |m, v| if v < m { v } else { m });
    let h = horizon.get();
    !h.is_empty() && oldest.as_bytes() <= h.as_bytes()
}

/// Raises 72000 (snapshot_too_old: the change is older than what this node still knows about
/// the row) for a change `below_gc_horizon`; a peer batch parks it in `peer_quarantine`.
pub fn refuse_below_gc_horizon(row_ctx: &str) -> ! {
    errors::raise(
        pgrx::PgSqlErrorCode::ERRCODE_SNAPSHOT_TOO_OLD,
        format!(
            "{row_ctx}change of a row this node has no state for, at or below the tombstone GC horizon: the row may have been deleted here and its tombstone collected"
        ),
        "If the row should come back, apply it on purpose: SET pg_sync.gc_horizon_check = off, then pg_sync.retry_quarantined(peer); otherwise delete it from pg_sync.peer_quarantine.",
    )
}

/// A state as the JSON document `store` and `insert_first` take apart.
fn state_doc(model_name: &str, model_id: &str, state: &State) -> Value {
    let versions: Map<String, Value> = state
        .versions
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    json!({
        "m": model_name, "i": model_id, "c": state.created, "d": state.deleted, "v": versions,
        "p": if state.pending.is_empty() { Value::Null } else { Value::Object(state.pending.clone()) },
        "x": state.max_version(),
    })
}

/// Stores `state` as the row's current state (the caller holds the row's `lock`).
pub fn store(model_name: &str, model_id: &str, state: &State) {
    let doc = state_doc(model_name, model_id, state);
    run(
        insert_state_doc!(
            " ON CONFLICT (model, model_id) DO UPDATE SET
               created = EXCLUDED.created, deleted = EXCLUDED.deleted, versions = EXCLUDED.versions,
               pending = EXCLUDED.pending, max_version = EXCLUDED.max_version"
        ),
        &[PgOid::from(pg_sys::JSONBOID)],
        &[Jsonb(doc).into()],
    );
}

/// What a local write does to its row's state.
#[derive(Clone, Copy)]
pub enum Local<'a> {
    Insert,
    Delete,
    /// Column writes (an update, or a group move: its delete half changes nothing).
    Columns(&'a [&'a str]),
}

/// Records a local write at `version` in the row's state and returns the version it was recorded
/// at: `version`, or a fresh one if the row's state already holds a version at or above it (a
/// merge committed between minting and this write), so a local write is always above the row's
/// current state. The capture trigger writes its action rows with the returned version.
///
/// A local write's version is above everything in the state, so the merge reduces to: an insert
/// or delete resets the per-column versions (they all fall below it) and the pending values,
/// column writes set their columns' versions.
pub fn record_local(model_name: &str, model_id: &str, what: Local<'_>, version: String) -> String {
    // One small statement per kind: an upsert's executor setup (its projections) is most of
    // what this costs per row, so each statement carries only the expressions its kind needs.
    let (update, upsert) = match what {
        Local::Insert => (None, RECORD_INSERT),
        Local::Delete => (Some(UPDATE_DELETE), UPSERT_DELETE),
        Local::Columns(_) => (Some(UPDATE_COLUMNS), UPSERT_COLUMNS),
    };
    let types = [
        PgOid::from(pg_sys::TEXTOID),
        PgOid::from(pg_sys::TEXTOID),
        PgOid::from(pg_sys::TEXTOID),
        PgOid::from(pg_sys::JSONBOID),
    ];
    let mut version = version;
    for attempt in 0..8 {
        let versions = match what {
            Local::Columns(cols) => cols
                .iter()
                .map(|c| (c.to_string(), Value::String(version.clone())))
                .collect(),
            _ => Map::new(),
        };
        let args = || -> [DatumWithOid<'_>; 4] {
            [
                model_name.into(),
                model_id.into(),
                version.as_str().into(),
                Jsonb(Value::Object(versions.clone())).into(),
            ]
        };
        // Inserts usually find no state: their first state row goes in without the executor
        // (the upsert below handles a key that has state).
        if attempt == 0
            && matches!(what, Local::Insert)
            && crate::state_direct::insert_new(model_name, model_id, &version)
        {
            return version;
        }
        // Updates and deletes of rows with state (nearly all): a plain HOT update, cheaper than
        // an upsert's speculative insertion and tuple lock. Inserts usually find no state.
        if let (0, Some(update)) = (attempt, update) {
            // Without the executor first; it defers to the statement whenever that has more to
            // do than a plain update (no row, a version not above it, a concurrent change).
            let change = match what {
                Local::Delete => crate::state_direct::Change::Delete,
                _ => crate::state_direct::Change::Columns(&versions),
            };
            if crate::state_direct::update_existing(model_name, model_id, change, &version)
                || run_count(update, &types, &args()) > 0
            {
                return version;
            }
        }
        if run_count(upsert, &types, &args()) > 0 {
            return version;
        }
        // The row's state is at or above our version: move the clock past it and mint again.
        let current = load(model_name, model_id, true).max_version();
        if let Ok(v) = Version::parse(&current) {
            // Never beyond the skew bound: a corrupted or forged state must not move the clock.
            clock::check_skew(v.hlc, &format!("the state of model \"{model_name}\""));
            clock::observe(v.hlc);
        }
        version = clock::next_version().to_string();
    }
    errors::raise(
        pgrx::PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
        format!("could not version a write of model \"{model_name}\" above its current state"),
        "Report this: the row's recorded state is ahead of the node's clock.",
    )
}

// `record_local`'s statements: $1 model, $2 model_id, $3 the write's version, $4 the versions
// of the columns it writes. Each refuses a version not above the row's current one. A row with
// no state that is updated or deleted predates capture (created at the zero version); a
// placeholder left by `lock` has created NULL, which the same COALESCE fixes.
const RECORD_INSERT: &str =
    "INSERT INTO pg_sync.row_state AS s (model, model_id, created, max_version) VALUES ($1, $2, $3, $3)
     ON CONFLICT (model, model_id) DO UPDATE SET
       created = EXCLUDED.created, versions = '{}', pending = NULL, max_version = EXCLUDED.max_version
     WHERE s.max_version OPERATOR(pg_catalog.<) EXCLUDED.max_version";
const UPDATE_DELETE: &str = "UPDATE pg_sync.row_state s SET
       created = COALESCE(s.created, ''), deleted = $3, versions = '{}', pending = NULL, max_version = $3
     WHERE s.model OPERATOR(pg_catalog.=) $1 AND s.model_id OPERATOR(pg_catalog.=) $2
       AND s.max_version OPERATOR(pg_catalog.<) ($3 COLLATE pg_catalog.\"C\")";
const UPSERT_DELETE: &str =
    "INSERT INTO pg_sync.row_state AS s (model, model_id, created, deleted, max_version)
     VALUES ($1, $2, '', $3, $3)
     ON CONFLICT (model, model_id) DO UPDATE SET
       created = COALESCE(s.created, ''), deleted = EXCLUDED.deleted, versions = '{}', pending = NULL,
       max_version = EXCLUDED.max_version
     WHERE s.max_version OPERATOR(pg_catalog.<) EXCLUDED.max_version";
const UPDATE_COLUMNS: &str = "UPDATE pg_sync.row_state s SET
       created = COALESCE(s.created, ''), versions = s.versions OPERATOR(pg_catalog.||) $4,
       pending = NULL, max_version = $3
     WHERE s.model OPERATOR(pg_catalog.=) $1 AND s.model_id OPERATOR(pg_catalog.=) $2
       AND s.max_version OPERATOR(pg_catalog.<) ($3 COLLATE pg_catalog.\"C\")";
const UPSERT_COLUMNS: &str =
    "INSERT INTO pg_sync.row_state AS s (model, model_id, created, versions, max_version)
     VALUES ($1, $2, '', $4, $3)
     ON CONFLICT (model, model_id) DO UPDATE SET
       created = COALESCE(s.created, ''), versions = s.versions OPERATOR(pg_catalog.||) EXCLUDED.versions,
       pending = NULL, max_version = EXCLUDED.max_version
     WHERE s.max_version OPERATOR(pg_catalog.<) EXCLUDED.max_version";

/// `pg_sync.row_version_state(model, model_id)`: the row's state as JSON, for inspection.
pub fn describe(model_name: &str, model_id: &str) -> Value {
    let m = model::Model::lookup(model_name);
    let key = m.key_object(model_id, "");
    let exists = m.exists(&key);
    let state = load(model_name, model_id, exists);
    json!({
        "live": state.live(),
        "created": state.created,
        "deleted": state.deleted,
        "versions": state.versions,
        "max_version": state.max_version(),
    })
}
