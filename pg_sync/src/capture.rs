//! The capture trigger: turns each row change of a registered table into action rows and LWW
//! row state, inside the writing transaction.
//!
//! `register_table` installs `pg_sync.capture()` as an AFTER ROW trigger whose arguments carry the
//! table's registration: `model, group_column ('' = none), number of key columns, key columns...,
//! excluded columns...`. Reading them from the trigger costs nothing per row; the parsed form is
//! cached per trigger and dropped on any relcache invalidation (ALTER TABLE, re-registration).
//!
//! Local writes mint a fresh version from the shared HLC, record it in the row's state
//! (`state::record_local`, which re-mints if the state is already at or above it) and write the
//! action row. The one write `apply_remote` makes runs in "remote mode": the versions and origin
//! come from the merge, and `apply_remote` stores the row state. Remote mode applies only to
//! that write (same relation, same key, fired by apply_remote's own statement); FK cascades and
//! other triggers it sets off are local writes.

use crate::clock;
use crate::errors;
use crate::settings;
use crate::state::{self, Local};
use pg_sync_lww::merge::State;
use pg_sync_lww::version;
use pgrx::datum::DatumWithOid;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient};
use pgrx::{JsonB, PgOid};
use serde_json::{Map, Value};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::ffi::CStr;

/// What a change applied by `apply_remote` asks the trigger to record.
pub struct RemoteContext {
    /// The relation, key and trigger depth of the one write this context is for.
    pub relid: pg_sys::Oid,
    pub model_id: String,
    pub depth: i32,
    pub origin: String,
    /// The row's state after the merge.
    pub state: State,
    /// Columns that won the merge, with their versions.
    pub won: BTreeMap<String, String>,
    /// The change raised the created version of a row that stays live.
    pub created_won: bool,
}

/// A client's identity, set by `mutate` for the writes of one client transaction.
pub struct ClientContext {
    pub client_id: String,
    pub client_tx_id: String,
    /// The user `mutate_as` writes for: every row written while it is set, also by cascades and
    /// triggers, must be in one of the user's groups (see `authorize_user_write`).
    pub user: Option<String>,
}

thread_local! {
    static REMOTE: RefCell<Option<RemoteContext>> = const { RefCell::new(None) };
    static CLIENT: RefCell<Option<ClientContext>> = const { RefCell::new(None) };
    /// Parsed registrations by trigger oid, valid while their generation is `GENERATION`.
    static CONFIGS: RefCell<(u64, HashMap<pg_sys::Oid, std::rc::Rc<TableConfig>>)> = RefCell::new((0, HashMap::new()));
    /// Bumped by every relcache invalidation. A counter rather than clearing the map: an
    /// invalidation can arrive from inside a catalog lookup while the map is in use.
    static GENERATION: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    static PLANS: RefCell<Option<Plans>> = const { RefCell::new(None) };
    static OWNER: RefCell<Option<pg_sys::Oid>> = const { RefCell::new(None) };
    /// Actions this backend has written, ever: a difference of two readings counts the
    /// actions written in between (see `written`).
    static WRITTEN: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Clears a thread-local context when dropped, also when an ERROR unwinds past it.
pub struct ContextGuard(fn());

impl Drop for ContextGuard {
    fn drop(&mut self) {
        (self.0)()
    }
}

/// The current trigger nesting depth (`pg_trigger_depth()`).
pub fn trigger_depth() -> i32 {
    // SAFETY: pg_trigger_depth reads a backend global and ignores its argument.
    let d = unsafe { pg_sys::pg_trigger_depth(std::ptr::null_mut()) };
    d.value() as i32
}

/// Takes the remote context if it is for this write: the relation and key apply_remote writes,
/// fired directly by its statement (one trigger level below where apply_remote entered it).
/// Anything else fired while it is set (FK cascades, other triggers' writes) is local.
fn take_remote(relid: pg_sys::Oid, model_id: impl FnOnce() -> String) -> Option<RemoteContext> {
    let (oid, depth) = REMOTE.with(|r| r.borrow().as_ref().map(|c| (c.relid, c.depth)))?;
    if oid != relid || depth != trigger_depth() {
        return None;
    }
    let id = model_id();
    REMOTE.with(|r| {
        let mut r = r.borrow_mut();
        if r.as_ref().is_some_and(|c| c.model_id == id) {
            r.take()
        } else {
            None
        }
    })
}

pub fn enter_remote(ctx: RemoteContext) -> ContextGuard {
    REMOTE.with(|r| *r.borrow_mut() = Some(ctx));
    ContextGuard(|| REMOTE.with(|r| *r.borrow_mut() = None))
}

pub fn enter_client(ctx: ClientContext) -> ContextGuard {
    CLIENT.with(|c| *c.borrow_mut() = Some(ctx));
    ContextGuard(|| CLIENT.with(|c| *c.borrow_mut() = None))
}

/// Relcache invalidation callback: forget every parsed registration.
#[pg_guard]
pub unsafe extern "C-unwind" fn invalidate(_arg: pg_sys::Datum, _relid: pg_sys::Oid) {
    GENERATION.with(|g| g.set(g.get().wrapping_add(1)));
    // Never panics: when the owner is being read right now, the reader stores a fresh value.
    OWNER.with(|o| {
        if let Ok(mut o) = o.try_borrow_mut() {
            *o = None;
        }
    });
}

/// The parsed registration of a capture trigger, cached until the next relcache invalidation.
/// No borrow is held while parsing: parsing reads the catalogs, which can deliver invalidations.
fn table_config(
    tg_trigger: &pg_sys::Trigger,
    tupdesc: pg_sys::TupleDesc,
) -> std::rc::Rc<TableConfig> {
    let tgoid = tg_trigger.tgoid;
    let generation = GENERATION.with(|g| g.get());
    let cached = CONFIGS.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != generation {
            *c = (generation, HashMap::new());
        }
        c.1.get(&tgoid).cloned()
    });
    if let Some(cfg) = cached {
        return cfg;
    }
    // SAFETY: the trigger and descriptor Postgres handed to this trigger call.
    let cfg = std::rc::Rc::new(unsafe { TableConfig::build(tg_trigger, tupdesc) });
    // Cache it only if no invalidation arrived while it was built (it may be stale then).
    if GENERATION.with(|g| g.get()) == generation {
        CONFIGS.with(|c| {
            let mut c = c.borrow_mut();
            if c.0 == generation {
                c.1.insert(tgoid, cfg.clone());
            }
        });
    }
    cfg
}

/// A registration as the trigger sees it, resolved against the table's current columns.
struct TableConfig {
    model: String,
    /// Column names by attribute index; `None` for dropped columns.
    names: Vec<Option<String>>,
    key: Vec<usize>,
    group: Option<usize>,
    /// Attribute indexes whose changes are captured (not dropped, not excluded).
    captured: Vec<usize>,
    /// Names removed from `to_jsonb(row)` to keep only captured columns.
    drop_excluded: Vec<String>,
    /// Names removed from `to_jsonb(row)` to keep only the key.
    drop_non_key: Vec<String>,
    /// Output function oids by attribute index (filled for key and group columns).
    output_fn: Vec<pg_sys::Oid>,
    typlen: Vec<i16>,
    typbyval: Vec<bool>,
}

impl TableConfig {
    unsafe fn build(trigger: &pg_sys::Trigger, tupdesc: pg_sys::TupleDesc) -> TableConfig {
        let args: Vec<String> = (0..trigger.tgnargs as usize)
            .map(|i| {
                unsafe { CStr::from_ptr(*trigger.tgargs.add(i)) }
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        let bad = || -> ! {
            errors::raise(
                PgSqlErrorCode::ERRCODE_TRIGGERED_ACTION_EXCEPTION,
                "pg_sync.capture() was installed with malformed arguments",
                "Install capture with pg_sync.register_table(), not CREATE TRIGGER.",
            )
        };
        if args.len() < 4 {
            bad();
        }
        let nkey: usize = args[2].parse().unwrap_or_else(|_| bad());
        if nkey == 0 || args.len() < 3 + nkey {
            bad();
        }
        let natts = unsafe { (*tupdesc).natts } as usize;
        let mut names = Vec::with_capacity(natts);
        let mut typlen = Vec::with_capacity(natts);
        let mut typbyval = Vec::with_capacity(natts);
        let mut types = Vec::with_capacity(natts);
        let mut generated = Vec::new();
        for i in 0..natts {
            let att = unsafe { &*(*tupdesc).attrs.as_ptr().add(i) };
            if att.attgenerated != 0 && !att.attisdropped {
                // Every node computes its generated columns itself (and refuses values for them).
                generated.push(i);
            }
            typlen.push(att.attlen);
            typbyval.push(att.attbyval);
            types.push(att.atttypid);
            if att.attisdropped {
                names.push(None);
            } else {
                let name = unsafe { CStr::from_ptr(att.attname.data.as_ptr()) };
                names.push(Some(name.to_string_lossy().into_owned()));
            }
        }
        let find = |col: &str| -> usize {
            names.iter().position(|n| n.as_deref() == Some(col)).unwrap_or_else(|| {
                errors::raise(
                    PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
                    format!("column \"{col}\" registered with pg_sync no longer exists"),
                    "Call pg_sync.register_table() again after renaming or dropping registered columns.",
                )
            })
        };
        let key: Vec<usize> = args[3..3 + nkey].iter().map(|c| find(c)).collect();
        let group = if args[1].is_empty() {
            None
        } else {
            Some(find(&args[1]))
        };
        let mut excluded: Vec<usize> = args[3 + nkey..].iter().map(|c| find(c)).collect();
        excluded.extend(generated.iter().filter(|i| !key.contains(i)));
        let captured: Vec<usize> = (0..natts)
            .filter(|i| names[*i].is_some() && !excluded.contains(i))
            .collect();
        let drop_excluded = excluded.iter().filter_map(|i| names[*i].clone()).collect();
        let drop_non_key = (0..natts)
            .filter(|i| !key.contains(i))
            .filter_map(|i| names[i].clone())
            .collect();
        let mut output_fn = vec![pg_sys::InvalidOid; natts];
        for &i in key.iter().chain(group.iter()) {
            let mut func = pg_sys::InvalidOid;
            let mut varlena = false;
            unsafe { pg_sys::getTypeOutputInfo(types[i], &mut func, &mut varlena) };
            output_fn[i] = func;
        }
        TableConfig {
            model: args[0].clone(),
            names,
            key,
            group,
            captured,
            drop_excluded,
            drop_non_key,
            output_fn,
            typlen,
            typbyval,
        }
    }

    fn name(&self, i: usize) -> &str {
        self.names[i].as_deref().unwrap_or_default()
    }

    /// Each captured non-key column's effective version in `state` ("" for the zero version).
    fn effective_versions(&self, state: &State) -> BTreeMap<String, String> {
        self.captured
            .iter()
            .filter(|i| !self.key.contains(i))
            .map(|&i| (self.name(i).to_owned(), state.effective(self.name(i))))
            .collect()
    }

    /// Names of every column except `keep`.
    fn drop_all_but(&self, keep: &[&str]) -> Vec<String> {
        self.names
            .iter()
            .flatten()
            .filter(|n| !keep.contains(&n.as_str()))
            .cloned()
            .collect()
    }
}

/// A deformed row.
struct Row {
    values: Vec<pg_sys::Datum>,
    nulls: Vec<bool>,
    tuple: pg_sys::HeapTuple,
}

impl Row {
    unsafe fn deform(tuple: pg_sys::HeapTuple, tupdesc: pg_sys::TupleDesc) -> Row {
        let natts = unsafe { (*tupdesc).natts } as usize;
        let mut values = vec![pg_sys::Datum::from(0usize); natts];
        let mut nulls = vec![false; natts];
        unsafe {
            pg_sys::heap_deform_tuple(tuple, tupdesc, values.as_mut_ptr(), nulls.as_mut_ptr())
        };
        Row {
            values,
            nulls,
            tuple,
        }
    }

    fn text(&self, cfg: &TableConfig, i: usize) -> Option<String> {
        if self.nulls[i] {
            return None;
        }
        // SAFETY: output function of the column's own type, applied to a non-null value.
        // Canonical text: one row has one identity whatever the writer's DateStyle, TimeZone,
        // float digits, ... (see `canonical`).
        Some(unsafe { crate::canonical::output(cfg.output_fn[i], self.values[i]) })
    }

    /// The row's key as text: the key column's text form, or for a composite key a JSON array of
    /// the key columns' text forms (see `key_text`).
    fn model_id(&self, cfg: &TableConfig) -> String {
        let parts: Vec<String> = cfg
            .key
            .iter()
            .map(|&i| {
                self.text(cfg, i).unwrap_or_else(|| {
                    errors::raise(
                        PgSqlErrorCode::ERRCODE_NOT_NULL_VIOLATION,
                        format!(
                            "key column \"{}\" of model \"{}\" is null",
                            cfg.name(i),
                            cfg.model
                        ),
                        "Registered tables are identified by their primary key.",
                    )
                })
            })
            .collect();
        key_text(parts)
    }

    fn group(&self, cfg: &TableConfig) -> Option<String> {
        cfg.group.and_then(|i| self.text(cfg, i))
    }
}

/// Canonical text of a key: the single column's text, or a compact JSON array of texts.
pub fn key_text(mut parts: Vec<String>) -> String {
    if parts.len() == 1 {
        parts.pop().unwrap_or_default()
    } else {
        Value::Array(parts.into_iter().map(Value::String).collect()).to_string()
    }
}

/// Byte-image equality of two non-null datums of one attribute (detoasting varlenas).
unsafe fn same_image(cfg: &TableConfig, i: usize, a: pg_sys::Datum, b: pg_sys::Datum) -> bool {
    if cfg.typbyval[i] {
        return a == b;
    }
    match cfg.typlen[i] {
        -1 => unsafe {
            let pa = a.cast_mut_ptr::<pg_sys::varlena>();
            let pb = b.cast_mut_ptr::<pg_sys::varlena>();
            if pa == pb {
                return true;
            }
            let da = pg_sys::pg_detoast_datum_packed(pa);
            let db = pg_sys::pg_detoast_datum_packed(pb);
            pgrx::varlena::varlena_to_byte_slice(da) == pgrx::varlena::varlena_to_byte_slice(db)
        },
        -2 => unsafe { CStr::from_ptr(a.cast_mut_ptr()) == CStr::from_ptr(b.cast_mut_ptr()) },
        n => unsafe {
            let n = n as usize;
            std::slice::from_raw_parts(a.cast_mut_ptr::<u8>(), n)
                == std::slice::from_raw_parts(b.cast_mut_ptr::<u8>(), n)
        },
    }
}

/// One action row to write.
struct Action<'a> {
    action: &'static str,
    model_id: &'a str,
    row: &'a Row,
    drop: Vec<String>,
    version: String,
    versions: Option<Map<String, Value>>,
    origin: &'a str,
    group: Option<String>,
    prev_group: Option<String>,
    moved: bool,
}

impl<'a> Action<'a> {
    /// A plain action: every column in its data at `version`, not part of a move.
    fn new(
        action: &'static str,
        model_id: &'a str,
        row: &'a Row,
        drop: Vec<String>,
        version: String,
        origin: &'a str,
        group: Option<String>,
    ) -> Self {
        Action {
            action,
            model_id,
            row,
            drop,
            version,
            versions: None,
            origin,
            group,
            prev_group: None,
            moved: false,
        }
    }
}

struct Plans {
    /// Inserts one action row.
    plain: OwnedPreparedStatement,
}

const ACTION_COLUMNS: &str = "model, model_id, action, data, version, versions, origin, group_id, \
     prev_group_id, moved, client_id, client_tx_id";
const ACTION_VALUES: &str =
    "$1, $2, $3, pg_catalog.to_jsonb($4) OPERATOR(pg_catalog.-) $5, $6, $7, \
     $8, $9, $10, $11, $12, $13::pg_catalog.uuid";

fn prepare_plans(client: &SpiClient<'_>) -> Plans {
    let text = PgOid::from(pg_sys::TEXTOID);
    let args = [
        text,
        text,
        text,
        PgOid::from(pg_sys::RECORDOID),
        PgOid::from(pg_sys::TEXTARRAYOID),
        text,
        PgOid::from(pg_sys::JSONBOID),
        text,
        text,
        text,
        PgOid::from(pg_sys::BOOLOID),
        text,
        text,
    ];
    let sql =
        format!("INSERT INTO pg_sync.sync_actions ({ACTION_COLUMNS}) VALUES ({ACTION_VALUES})");
    let plain = client
        .prepare_mut(&sql, &args)
        .unwrap_or_else(|e| panic!("pg_sync: cannot prepare capture statement: {e}"))
        .keep();
    Plans { plain }
}

fn with_plans<R>(f: impl FnOnce(&Plans) -> R) -> R {
    PLANS.with(|p| {
        if p.borrow().is_none() {
            let plans = Spi::connect(prepare_plans);
            *p.borrow_mut() = Some(plans);
        }
        f(p.borrow().as_ref().expect("plans prepared"))
    })
}

/// Runs `f` as the owner of the pg_sync tables, so application roles need no privileges on the
/// log while they cannot write it directly either.
fn as_owner<R>(f: impl FnOnce() -> R) -> R {
    let owner = OWNER.with(|o| {
        if let Some(owner) = *o.borrow() {
            return owner;
        }
        let owner = Spi::get_one::<pg_sys::Oid>(
            "SELECT extowner FROM pg_catalog.pg_extension WHERE extname = 'pg_sync'",
        )
        .ok()
        .flatten()
        .expect("the pg_sync extension exists");
        *o.borrow_mut() = Some(owner);
        owner
    });
    let mut saved_user = pg_sys::InvalidOid;
    let mut saved_ctx = 0;
    // SAFETY: save and switch the current user; an ERROR's abort restores it, so does the guard.
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_ctx);
        pg_sys::SetUserIdAndSecContext(
            owner,
            saved_ctx | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32,
        );
    }
    struct Restore(pg_sys::Oid, i32);
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: restores what was saved above.
            unsafe { pg_sys::SetUserIdAndSecContext(self.0, self.1) };
        }
    }
    let _restore = Restore(saved_user, saved_ctx);
    f()
}

fn action_args<'a>(
    cfg: &'a TableConfig,
    a: &'a Action<'a>,
    tupdesc: pg_sys::TupleDesc,
) -> Vec<DatumWithOid<'a>> {
    let (client_id, client_tx_id) = CLIENT.with(|c| match &*c.borrow() {
        Some(c) => (Some(c.client_id.clone()), Some(c.client_tx_id.clone())),
        None => (None, None),
    });
    // SAFETY: the tuple belongs to the trigger's relation, whose descriptor this is.
    let record = unsafe { pg_sys::heap_copy_tuple_as_datum(a.row.tuple, tupdesc) };
    vec![
        cfg.model.as_str().into(),
        a.model_id.into(),
        a.action.into(),
        unsafe { DatumWithOid::new(record, pg_sys::RECORDOID) },
        a.drop.clone().into(),
        a.version.as_str().into(),
        match &a.versions {
            Some(v) if !v.is_empty() => JsonB(Value::Object(v.clone())).into(),
            _ => DatumWithOid::null::<JsonB>(),
        },
        a.origin.into(),
        a.group.clone().into(),
        a.prev_group.clone().into(),
        a.moved.into(),
        client_id.into(),
        client_tx_id.into(),
    ]
}

fn write_plain(cfg: &TableConfig, a: &Action<'_>, tupdesc: pg_sys::TupleDesc) {
    let args = action_args(cfg, a, tupdesc);
    with_plans(|plans| {
        Spi::connect_mut(|client| {
            client
                .update(&plans.plain, None, &args)
                .unwrap_or_else(|e| panic!("pg_sync: {e}"));
        })
    });
    WRITTEN.with(|w| w.set(w.get() + 1));
}

/// How many actions this backend has written so far.
pub fn written() -> u64 {
    WRITTEN.with(|w| w.get())
}

fn versions_object(map: &BTreeMap<String, String>, except: &str) -> Map<String, Value> {
    map.iter()
        .filter(|(_, v)| v.as_str() != except)
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect()
}

fn max_of<'a>(versions: impl Iterator<Item = &'a String>) -> String {
    versions
        .max_by(|a, b| version::cmp_text(a, b))
        .cloned()
        .unwrap_or_default()
}

/// The body of `pg_sync.capture()`.
pub fn capture(trigger: &pgrx::PgTrigger<'_>) {
    let td = trigger.trigger_data();
    // SAFETY: Postgres hands a valid TriggerData to a trigger function.
    let (tg_trigger, tupdesc) = unsafe { (&*td.tg_trigger, (*td.tg_relation).rd_att) };
    let cfg = table_config(tg_trigger, tupdesc);
    let event = td.tg_event;
    let is_insert = event & pg_sys::TRIGGER_EVENT_OPMASK == pg_sys::TRIGGER_EVENT_INSERT;
    let is_delete = event & pg_sys::TRIGGER_EVENT_OPMASK == pg_sys::TRIGGER_EVENT_DELETE;
    // SAFETY: as above.
    let relid = unsafe { (*td.tg_relation).rd_id };
    let remote = take_remote(relid, || unsafe {
        Row::deform(td.tg_trigtuple, tupdesc).model_id(&cfg)
    });
    // Put the remote context back for the next row of the same statement, even on error.
    struct Putback(Option<RemoteContext>);
    impl Drop for Putback {
        fn drop(&mut self) {
            if let Some(ctx) = self.0.take() {
                REMOTE.with(|r| *r.borrow_mut() = Some(ctx));
            }
        }
    }
    let remote = Putback(remote);
    let node = settings::node_id();

    as_owner(|| unsafe {
        if is_insert || is_delete {
            let row = Row::deform(td.tg_trigtuple, tupdesc);
            let model_id = row.model_id(&cfg);
            let group = row.group(&cfg);
            match &remote.0 {
                None => {
                    authorize_user_write(&cfg, &[group.as_deref()]);
                    let (action, drop, what) = if is_insert {
                        ("I", cfg.drop_excluded.clone(), Local::Insert)
                    } else {
                        ("D", cfg.drop_non_key.clone(), Local::Delete)
                    };
                    let version = state::record_local(
                        &cfg.model,
                        &model_id,
                        what,
                        clock::next_version().to_string(),
                    );
                    let a = Action {
                        action,
                        model_id: &model_id,
                        row: &row,
                        drop,
                        version,
                        versions: None,
                        origin: &node,
                        group,
                        prev_group: None,
                        moved: false,
                    };
                    write_plain(&cfg, &a, tupdesc);
                }
                Some(ctx) => {
                    let (action, drop, version, versions) = if is_insert {
                        let created = ctx.state.created.clone().unwrap_or_default();
                        let versions = versions_object(&ctx.state.versions, &created);
                        ("I", cfg.drop_excluded.clone(), created, Some(versions))
                    } else {
                        (
                            "D",
                            cfg.drop_non_key.clone(),
                            ctx.state.deleted.clone().unwrap_or_default(),
                            None,
                        )
                    };
                    let a = Action {
                        action,
                        model_id: &model_id,
                        row: &row,
                        drop,
                        version,
                        versions,
                        origin: &ctx.origin,
                        group,
                        prev_group: None,
                        moved: false,
                    };
                    write_plain(&cfg, &a, tupdesc);
                }
            }
            return;
        }

        // UPDATE
        let old = Row::deform(td.tg_trigtuple, tupdesc);
        let new = Row::deform(td.tg_newtuple, tupdesc);
        if remote.0.is_none() && client_user().is_some() {
            // Before the no-change exit: a write of excluded columns is a write too.
            authorize_user_write(
                &cfg,
                &[old.group(&cfg).as_deref(), new.group(&cfg).as_deref()],
            );
        }
        let changed: Vec<&str> = match &remote.0 {
            Some(ctx) => ctx.won.keys().map(String::as_str).collect(),
            None => cfg
                .captured
                .iter()
                .copied()
                .filter(|&i| match (old.nulls[i], new.nulls[i]) {
                    (true, true) => false,
                    (false, false) => !same_image(&cfg, i, old.values[i], new.values[i]),
                    _ => true,
                })
                .map(|i| cfg.name(i))
                .collect(),
        };
        if changed.is_empty() && remote.0.as_ref().is_none_or(|c| !c.created_won) {
            return;
        }
        let old_id = old.model_id(&cfg);
        let new_id = new.model_id(&cfg);
        let old_group = old.group(&cfg);
        let new_group = new.group(&cfg);
        let origin = remote
            .0
            .as_ref()
            .map(|c| c.origin.as_str())
            .unwrap_or(node.as_str());

        if old_id != new_id {
            // A key change is a delete of the old row and an insert of the new one.
            if remote.0.is_some() {
                errors::raise(
                    PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                    format!(
                        "a remote change may not change the key of model \"{}\"",
                        cfg.model
                    ),
                    "Keys are immutable across nodes; delete and insert instead.",
                );
            }
            let version = state::record_local(
                &cfg.model,
                &old_id,
                Local::Delete,
                clock::next_version().to_string(),
            );
            let d = Action::new(
                "D",
                &old_id,
                &old,
                cfg.drop_non_key.clone(),
                version,
                origin,
                old_group,
            );
            write_plain(&cfg, &d, tupdesc);
            let version = state::record_local(
                &cfg.model,
                &new_id,
                Local::Insert,
                clock::next_version().to_string(),
            );
            let i = Action::new(
                "I",
                &new_id,
                &new,
                cfg.drop_excluded.clone(),
                version,
                origin,
                new_group,
            );
            write_plain(&cfg, &i, tupdesc);
            return;
        }

        let moved = old_group != new_group;
        match &remote.0 {
            None => {
                // A move's delete half changes no state: both halves record as column writes.
                let before = moved.then(|| state::load(&cfg.model, &new_id, true));
                let version = state::record_local(
                    &cfg.model,
                    &new_id,
                    Local::Columns(&changed),
                    clock::next_version().to_string(),
                );
                if !moved {
                    let a = Action {
                        action: "U",
                        model_id: &new_id,
                        row: &new,
                        drop: cfg.drop_all_but(&changed),
                        version,
                        versions: None,
                        origin,
                        group: new_group,
                        prev_group: None,
                        moved: false,
                    };
                    write_plain(&cfg, &a, tupdesc);
                } else {
                    // A move: a delete for the old group, then the whole row for the new one.
                    let d = Action {
                        action: "D",
                        model_id: &new_id,
                        row: &old,
                        drop: cfg.drop_non_key.clone(),
                        version: version.clone(),
                        versions: None,
                        origin,
                        group: old_group.clone(),
                        prev_group: None,
                        moved: true,
                    };
                    // The whole row carries each column's own version, so peers merge it exactly.
                    let before = before.unwrap_or_default();
                    let mut effective = cfg.effective_versions(&before);
                    for c in &changed {
                        effective.insert(c.to_string(), version.clone());
                    }
                    write_plain(&cfg, &d, tupdesc);
                    let i = Action {
                        action: "I",
                        model_id: &new_id,
                        row: &new,
                        drop: cfg.drop_excluded.clone(),
                        versions: Some(versions_object(&effective, &version)),
                        version,
                        origin,
                        group: new_group,
                        prev_group: old_group,
                        moved: true,
                    };
                    write_plain(&cfg, &i, tupdesc);
                }
            }
            Some(ctx) => {
                let created = ctx.state.created.clone().unwrap_or_default();
                let newest = max_of(ctx.won.values());
                if moved {
                    let d = Action {
                        action: "D",
                        model_id: &new_id,
                        row: &old,
                        drop: cfg.drop_non_key.clone(),
                        version: newest.clone(),
                        versions: None,
                        origin,
                        group: old_group.clone(),
                        prev_group: None,
                        moved: true,
                    };
                    write_plain(&cfg, &d, tupdesc);
                }
                let a = if moved {
                    Action {
                        action: "I",
                        model_id: &new_id,
                        row: &new,
                        drop: cfg.drop_excluded.clone(),
                        versions: Some(versions_object(
                            &cfg.effective_versions(&ctx.state),
                            &newest,
                        )),
                        version: newest,
                        origin,
                        group: new_group,
                        prev_group: old_group,
                        moved,
                    }
                } else if ctx.created_won {
                    Action {
                        action: "I",
                        model_id: &new_id,
                        row: &new,
                        drop: cfg.drop_excluded.clone(),
                        versions: Some(versions_object(&ctx.state.versions, &created)),
                        version: created,
                        origin,
                        group: new_group,
                        prev_group: if moved { old_group } else { None },
                        moved,
                    }
                } else {
                    let version = max_of(ctx.won.values());
                    Action {
                        action: "U",
                        model_id: &new_id,
                        row: &new,
                        drop: cfg.drop_all_but(&changed),
                        versions: Some(versions_object(&ctx.won, &version)),
                        version,
                        origin,
                        group: new_group,
                        prev_group: None,
                        moved: false,
                    }
                };
                write_plain(&cfg, &a, tupdesc);
            }
        }
    });
}

fn client_user() -> Option<String> {
    CLIENT.with(|c| c.borrow().as_ref().and_then(|c| c.user.clone()))
}

/// Raises 42501 when `mutate_as` set a user and a row it writes is (or was) outside the user's
/// groups. Enforced here, where every written row is seen, because the JSON `mutate_as` checked
/// is not the row written: BEFORE triggers may rewrite the group, and cascades and triggers write
/// other rows. Global models are read-only for clients, also through such indirect writes.
fn authorize_user_write(cfg: &TableConfig, groups: &[Option<&str>]) {
    let Some(user) = client_user() else {
        return;
    };
    let forbid = |why: String| -> ! {
        errors::raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            why,
            "Clients may write only rows of the sync groups they belong to; triggers and cascades that a client's write fires are held to the same groups.",
        )
    };
    if cfg.group.is_none() {
        forbid(format!(
            "model \"{}\" is global and read-only for clients",
            cfg.model
        ));
    }
    for group in groups {
        let Some(group) = group else {
            forbid(format!(
                "a row of model \"{}\" without a group cannot be written by a client",
                cfg.model
            ));
        };
        let member = crate::model::run(
            "SELECT pg_catalog.to_jsonb(EXISTS (SELECT FROM pg_sync.group_memberships m
              WHERE m.user_id OPERATOR(pg_catalog.=) ($1 OPERATOR(pg_catalog.->>) 'u')
                AND m.group_id OPERATOR(pg_catalog.=) ($1 OPERATOR(pg_catalog.->>) 'g')))",
            &[PgOid::from(pg_sys::JSONBOID)],
            vec![JsonB(serde_json::json!({"u": user, "g": group}))],
        );
        if member != Some(Value::Bool(true)) {
            forbid(format!(
                "a row of model \"{}\" would be written outside the user's groups",
                cfg.model
            ));
        }
    }
}

/// BEFORE TRUNCATE: a truncate would drop rows without a trace in the log.
pub fn refuse_truncate(trigger: &pgrx::PgTrigger<'_>) -> ! {
    let table = trigger.table_name().unwrap_or_default();
    errors::raise(
        PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
        format!("TRUNCATE is not allowed on \"{table}\": it is synced by pg_sync"),
        "Use DELETE so every removal is captured, or call pg_sync.unregister_table() first.",
    )
}
