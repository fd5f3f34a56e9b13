//! The capture trigger: turns each row change of a registered table into action rows and LWW
//! row state, inside the writing transaction.
//!
//! `register_table` installs `pg_sync.capture()` as the AFTER ROW trigger `pg_sync_capture`. The
//! trigger takes nothing from its arguments: it reads the table's registration from
//! `pg_sync.registry` by the relation's oid (or its nearest registered partition ancestor), and
//! refuses to run on anything else, so attaching it to another table cannot forge actions. The
//! parsed registration is cached per relation and dropped on relcache invalidation (ALTER TABLE,
//! re-registration, which recreates the trigger).
//!
//! Local writes mint a fresh version from the shared HLC, record it in the row's state
//! (`state::record_local`, which re-mints if the state is already at or above it) and write the
//! action row. The one write `apply_remote` makes runs in "remote mode": the versions and origin
//! come from the merge, and `apply_remote` stores the row state. Remote mode applies only to
//! that write (same relation, same key, fired by apply_remote's own statement); FK cascades and
//! other triggers it sets off are local writes.
//!
//! Privileges (see `owner`): the row's JSON is built here, as the writing user. The action row
//! goes straight into the heap (`actions`), a key's first state row too (`state_direct`); only
//! fixed statements (the row-state upsert/update, the log INSERT when the log table was altered,
//! the membership check) run as `pgsync_owner`.
//!
//! Layering: capture sits above `state`, `state_direct`, `actions` and `model` (key ids are
//! `model::key_text`); none of them imports capture.

use crate::actions;
use crate::clock;
use crate::deep::Jsonb;
use crate::errors;
use crate::model;
use crate::owner;
use crate::settings;
use crate::state::{self, Local};
use pg_sync_lww::merge::State;
use pg_sync_lww::version;
use pgrx::datum::DatumWithOid;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient};
use pgrx::PgOid;
use serde_json::{Map, Value};
use std::cell::{Cell, RefCell};
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
    /// The column values apply_remote writes (as JSON): a BEFORE trigger that writes other
    /// values makes a local write of those columns (`record_trigger_changes`).
    pub written: Map<String, Value>,
}

/// The per-row contexts of one set-based statement of `remote_set` (one INSERT, UPDATE or
/// DELETE writing many keys of one relation, each key at most once): the trigger takes each
/// row's own context by its key, so every row is recorded with its peer's versions and origin.
pub struct RemoteSet {
    pub relid: pg_sys::Oid,
    pub depth: i32,
    pub rows: HashMap<String, RemoteContext>,
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
    static REMOTE_SET: RefCell<Option<RemoteSet>> = const { RefCell::new(None) };
    static CLIENT: RefCell<Option<ClientContext>> = const { RefCell::new(None) };
    static CONFIGS: RefCell<HashMap<pg_sys::Oid, std::rc::Rc<TableConfig>>> = RefCell::new(HashMap::new());
    /// Bumped when every cached registration is stale (a full relcache reset, or an
    /// invalidation that arrived while `CONFIGS` was borrowed).
    static GENERATION: Cell<u64> = const { Cell::new(0) };
    /// Bumped by every relcache invalidation: a registration built while it moved may be stale
    /// and is used once, not cached.
    static INVALIDATIONS: Cell<u64> = const { Cell::new(0) };
    static PLANS: RefCell<Option<Plans>> = const { RefCell::new(None) };
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
    let set = REMOTE_SET.with(|r| r.borrow().as_ref().map(|s| (s.relid, s.depth)));
    if let Some((oid, depth)) = set {
        if oid != relid || depth != trigger_depth() {
            return None;
        }
        let id = model_id();
        return REMOTE_SET.with(|r| r.borrow_mut().as_mut().and_then(|s| s.rows.remove(&id)));
    }
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

/// Sets the per-row contexts of one set-based statement (see `RemoteSet`).
pub fn enter_remote_set(set: RemoteSet) -> ContextGuard {
    REMOTE_SET.with(|r| *r.borrow_mut() = Some(set));
    ContextGuard(|| REMOTE_SET.with(|r| *r.borrow_mut() = None))
}

/// How many contexts of the current set-based statement no row has taken.
pub fn remote_set_left() -> usize {
    REMOTE_SET.with(|r| r.borrow().as_ref().map_or(0, |s| s.rows.len()))
}

pub fn enter_client(ctx: ClientContext) -> ContextGuard {
    CLIENT.with(|c| *c.borrow_mut() = Some(ctx));
    ContextGuard(|| CLIENT.with(|c| *c.borrow_mut() = None))
}

/// Relcache invalidation callback: forget the relation's parsed registration (all of them on a
/// full reset). Never waits on a borrow: Postgres can deliver invalidations while a registration
/// is being built (its catalog reads accept them).
#[pg_guard]
pub unsafe extern "C-unwind" fn invalidate(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    INVALIDATIONS.with(|n| n.set(n.get().wrapping_add(1)));
    actions::invalidate(relid);
    crate::state_direct::invalidate(relid);
    let removed = relid != pg_sys::InvalidOid
        && CONFIGS.with(|c| match c.try_borrow_mut() {
            Ok(mut c) => {
                c.remove(&relid);
                true
            }
            Err(_) => false,
        });
    if !removed {
        GENERATION.with(|g| g.set(g.get().wrapping_add(1)));
    }
}

/// A registration as the trigger sees it, resolved against the table's current columns.
struct TableConfig {
    /// The `pg_sync_capture` trigger this registration was checked against.
    tgoid: pg_sys::Oid,
    /// `GENERATION` when built.
    generation: u64,
    /// The registered relation: the table itself, or the partitioned table it is a partition of.
    rel: pg_sys::Oid,
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
    /// Captured columns whose `to_jsonb` form may lose something (`exact`).
    exact: crate::exact::Columns,
    /// Settings the captured columns' `to_jsonb` form depends on: set canonically around it.
    json_settings: u8,
}

/// A table's row in `pg_sync.registry`.
struct Registration {
    rel: pg_sys::Oid,
    model: String,
    key: Vec<String>,
    group: Option<String>,
    excluded: Vec<String>,
}

/// The enabled registration of `relid` or of its nearest partition ancestor. Runs as the owner
/// (the registry is the owner's), with every name and operator schema-qualified.
fn registration(relid: pg_sys::Oid) -> Option<Registration> {
    owner::as_owner(|| {
        Spi::connect(|client| {
            let rows = client
                .select(
                    "SELECT r.rel::pg_catalog.oid, r.model, r.pk_columns, r.group_column,
                            r.excluded_columns
                       FROM (SELECT $1, 0::pg_catalog.int8
                             UNION ALL
                             -- A partition's ancestors, itself first; nothing for other tables.
                             SELECT * FROM pg_catalog.pg_partition_ancestors($1) WITH ORDINALITY)
                            AS a(relid, depth)
                       JOIN pg_sync.registry r
                         ON r.rel::pg_catalog.oid OPERATOR(pg_catalog.=) a.relid::pg_catalog.oid
                      WHERE r.enabled
                      ORDER BY a.depth
                      LIMIT 1",
                    None,
                    &[unsafe { pgrx::datum::DatumWithOid::new(relid, pg_sys::REGCLASSOID) }],
                )
                .unwrap_or_else(|e| panic!("pg_sync: cannot read the registry: {e}"));
            let row = rows.into_iter().next()?;
            let get = |i: usize| -> Option<String> { row.get::<String>(i).ok().flatten() };
            let list = |i: usize| -> Vec<String> {
                row.get::<Vec<String>>(i).ok().flatten().unwrap_or_default()
            };
            Some(Registration {
                rel: row.get::<pg_sys::Oid>(1).ok().flatten()?,
                model: get(2)?,
                key: list(3),
                group: get(4),
                excluded: list(5),
            })
        })
    })
}

/// Refuses to capture (09000, triggered action exception): the trigger is not pg_sync's own
/// capture trigger on a registered table.
fn refuse(message: String, hint: &str) -> ! {
    errors::raise(
        PgSqlErrorCode::ERRCODE_TRIGGERED_ACTION_EXCEPTION,
        message,
        hint.to_owned(),
    )
}

fn check_event(trigger: &pg_sys::Trigger, event: u32, table: impl Fn() -> String) {
    // SAFETY: the trigger name is a valid C string owned by the relcache entry.
    let name = unsafe { CStr::from_ptr(trigger.tgname) };
    let row_after = event & pg_sys::TRIGGER_EVENT_ROW != 0
        && event & pg_sys::TRIGGER_EVENT_TIMINGMASK == pg_sys::TRIGGER_EVENT_AFTER;
    if name != c"pg_sync_capture" || !row_after {
        refuse(
            format!(
                "pg_sync.capture() may only run as the AFTER ROW trigger pg_sync_capture (fired by \"{}\" on \"{}\")",
                name.to_string_lossy(),
                table()
            ),
            "pg_sync.register_table() installs the capture trigger; do not create it yourself.",
        );
    }
}

impl TableConfig {
    unsafe fn build(
        relid: pg_sys::Oid,
        trigger: &pg_sys::Trigger,
        tupdesc: pg_sys::TupleDesc,
        table: &str,
        generation: u64,
    ) -> TableConfig {
        let Some(reg) = registration(relid) else {
            refuse(
                format!("table \"{table}\" is not registered with pg_sync"),
                "pg_sync.capture() only runs on tables registered with pg_sync.register_table().",
            );
        };
        if reg.rel != relid && !trigger.tgisclone {
            refuse(
                format!("trigger on \"{table}\" is not pg_sync's capture trigger of its registered parent"),
                "pg_sync.register_table() installs the capture trigger; do not create it yourself.",
            );
        }
        if reg.key.is_empty() {
            refuse(
                format!("the registration of \"{table}\" has no key"),
                "Call pg_sync.register_table() again.",
            );
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
        let key: Vec<usize> = reg.key.iter().map(|c| find(c)).collect();
        let group = reg.group.as_deref().map(find);
        let mut excluded: Vec<usize> = reg.excluded.iter().map(|c| find(c)).collect();
        excluded.extend(generated.iter().filter(|i| !key.contains(i)));
        let captured: Vec<usize> = (0..natts)
            .filter(|i| names[*i].is_some() && !excluded.contains(i))
            .collect();
        let drop_excluded = excluded.iter().filter_map(|i| names[*i].clone()).collect();
        let drop_non_key = (0..natts)
            .filter(|i| !key.contains(i))
            .filter_map(|i| names[i].clone())
            .collect();
        // The settings the captured columns' JSON depends on (canonical::json_depends_on_type).
        let mut json_settings = 0;
        for &i in &captured {
            json_settings |= crate::canonical::json_depends_on_type(types[i]);
        }
        let mut output_fn = vec![pg_sys::InvalidOid; natts];
        for &i in key.iter().chain(group.iter()) {
            let mut func = pg_sys::InvalidOid;
            let mut varlena = false;
            unsafe { pg_sys::getTypeOutputInfo(types[i], &mut func, &mut varlena) };
            output_fn[i] = func;
        }
        // SAFETY: the trigger's own descriptor, in the writing transaction.
        let exact = unsafe { crate::exact::Columns::of(tupdesc, &captured) };
        TableConfig {
            tgoid: trigger.tgoid,
            generation,
            rel: reg.rel,
            model: reg.model,
            names,
            key,
            group,
            captured,
            drop_excluded,
            drop_non_key,
            output_fn,
            typlen,
            typbyval,
            exact,
            json_settings,
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
    /// the key columns' text forms (see `model::key_text`).
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
        model::key_text(parts)
    }

    fn group(&self, cfg: &TableConfig) -> Option<String> {
        cfg.group.and_then(|i| self.text(cfg, i))
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
// Nothing here resolves through the caller's search_path or calls user code: the data arrives
// as finished jsonb, and the uuid cast is found by type.
const ACTION_VALUES: &str = "$1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12";

fn prepare_plans(client: &SpiClient<'_>) -> Plans {
    let text = PgOid::from(pg_sys::TEXTOID);
    let args = [
        text,
        text,
        text,
        PgOid::from(pg_sys::JSONBOID),
        text,
        PgOid::from(pg_sys::JSONBOID),
        text,
        text,
        text,
        PgOid::from(pg_sys::BOOLOID),
        text,
        PgOid::from(pg_sys::UUIDOID),
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

/// `to_jsonb(row) - drop`, evaluated here in the writer's security context: `to_jsonb` calls
/// user-defined casts to json, which must never run with the log owner's rights. Direct function
/// calls, no SQL: no extra statement per row and nothing resolved by name.
unsafe fn row_json(row: &Row, tupdesc: pg_sys::TupleDesc, drop: &[String]) -> pg_sys::Datum {
    unsafe {
        let record = pg_sys::heap_copy_tuple_as_datum(row.tuple, tupdesc);
        let mut to_jsonb: pg_sys::FmgrInfo = std::mem::zeroed();
        pg_sys::fmgr_info(pg_sys::Oid::from(pg_sys::F_TO_JSONB), &mut to_jsonb);
        // to_jsonb(anyelement) reads its argument's type from the call expression.
        let arg = pg_sys::makeNullConst((*tupdesc).tdtypeid, -1, pg_sys::InvalidOid);
        let args = pg_sys::lappend(std::ptr::null_mut(), arg.cast());
        to_jsonb.fn_expr = pg_sys::makeFuncExpr(
            pg_sys::Oid::from(pg_sys::F_TO_JSONB),
            pg_sys::JSONBOID,
            args,
            pg_sys::InvalidOid,
            pg_sys::InvalidOid,
            pg_sys::CoercionForm::COERCE_EXPLICIT_CALL,
        )
        .cast();
        let json = pg_sys::FunctionCall1Coll(&mut to_jsonb, pg_sys::InvalidOid, record);
        if drop.is_empty() {
            return json;
        }
        let names = drop
            .to_vec()
            .into_datum()
            .expect("a text array is not null");
        let mut minus: pg_sys::FmgrInfo = std::mem::zeroed();
        pg_sys::fmgr_info(
            pg_sys::Oid::from(pg_sys::F_JSONB_DELETE_JSONB__TEXT),
            &mut minus,
        );
        pg_sys::FunctionCall2Coll(&mut minus, pg_sys::InvalidOid, json, names)
    }
}

/// Where `group_id` is in `ACTION_COLUMNS`.
const GROUP_DATUM: usize = 7;

/// Column types of `ACTION_COLUMNS`, in order (`client_tx_id` is passed as uuid here).
const ACTION_TYPES: [pg_sys::Oid; 12] = [
    pg_sys::TEXTOID,
    pg_sys::TEXTOID,
    pg_sys::TEXTOID,
    pg_sys::JSONBOID,
    pg_sys::TEXTOID,
    pg_sys::JSONBOID,
    pg_sys::TEXTOID,
    pg_sys::TEXTOID,
    pg_sys::TEXTOID,
    pg_sys::BOOLOID,
    pg_sys::TEXTOID,
    pg_sys::UUIDOID,
];

/// The action's column values (`ACTION_COLUMNS` order) as datums, `None` for NULL. Computed as
/// the writer: `row_json` may call user-defined casts.
fn action_datums(
    a: &Action<'_>,
    cfg: &TableConfig,
    tupdesc: pg_sys::TupleDesc,
) -> [Option<pg_sys::Datum>; 12] {
    let model = cfg.model.as_str();
    let (client_id, client_tx_id) = CLIENT.with(|c| match &*c.borrow() {
        Some(c) => (Some(c.client_id.clone()), Some(c.client_tx_id.clone())),
        None => (None, None),
    });
    // SAFETY: the tuple belongs to the trigger's relation, whose descriptor this is.
    let data = crate::canonical::with_output_settings(cfg.json_settings, || unsafe {
        row_json(a.row, tupdesc, &a.drop)
    });
    // SAFETY: the row is deformed with this descriptor; `data` is its jsonb.
    let data = unsafe {
        cfg.exact
            .add_to(data, &cfg.names, &a.row.values, &a.row.nulls, |i| {
                !a.drop.iter().any(|d| Some(d) == cfg.names[i].as_ref())
            })
    };
    let versions = match &a.versions {
        Some(v) if !v.is_empty() => Jsonb(Value::Object(v.clone())).into_datum(),
        _ => None,
    };
    // uuid_in is the built-in input function: an invalid id raises 22P02 as the cast did.
    let client_tx_id = client_tx_id.map(|t| {
        let t = std::ffi::CString::new(t).unwrap_or_default();
        // SAFETY: a built-in input function applied to a NUL-terminated string.
        unsafe {
            pg_sys::OidInputFunctionCall(
                pg_sys::Oid::from(pg_sys::F_UUID_IN),
                t.as_ptr().cast_mut(),
                pg_sys::UUIDOID,
                -1,
            )
        }
    });
    [
        model.into_datum(),
        a.model_id.into_datum(),
        a.action.into_datum(),
        Some(data),
        a.version.as_str().into_datum(),
        versions,
        a.origin.into_datum(),
        a.group.as_deref().into_datum(),
        a.prev_group.as_deref().into_datum(),
        a.moved.into_datum(),
        client_id.into_datum(),
        client_tx_id,
    ]
}

/// Writes one action. Its values are computed as the writer; then the row goes straight into the
/// heap (`actions::insert`), or, if the log table was altered, through the plain INSERT as the
/// log's owner.
fn write_plain(cfg: &TableConfig, a: &Action<'_>, tupdesc: pg_sys::TupleDesc) {
    let mut datums = action_datums(a, cfg, tupdesc);
    // A grouped model's row without a group is logged with group '' (no user is in it): NULL
    // means "global model" in the log, so replay judges each row by the registration it was
    // captured under, not by the registry now. One byte, only for group-less rows.
    if cfg.group.is_some() && datums[GROUP_DATUM].is_none() {
        datums[GROUP_DATUM] = "".into_datum();
    }
    let mut direct = actions::Values { datums: [None; 15] };
    // ACTION_COLUMNS are the log's columns 1..=12 (after id, before xid and created_at).
    direct.datums[1..13].copy_from_slice(&datums);
    if !actions::insert(&direct) {
        let args: Vec<DatumWithOid<'_>> = datums
            .iter()
            .zip(ACTION_TYPES)
            .map(|(d, oid)| match d {
                // SAFETY: each datum is of its column's type.
                Some(d) => unsafe { DatumWithOid::new(*d, oid) },
                None => DatumWithOid::null_oid(oid),
            })
            .collect();
        owner::as_owner(|| {
            with_plans(|plans| {
                Spi::connect_mut(|client| {
                    client
                        .update(&plans.plain, None, &args)
                        .unwrap_or_else(|e| panic!("pg_sync: {e}"));
                })
            })
        });
    }
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
    // SAFETY: as above.
    let relid = unsafe { (*td.tg_relation).rd_id };
    let table = || trigger.table_name().unwrap_or_default();
    check_event(tg_trigger, td.tg_event, table);
    let cfg = config(relid, tg_trigger, tupdesc, table);
    let event = td.tg_event;
    let is_insert = event & pg_sys::TRIGGER_EVENT_OPMASK == pg_sys::TRIGGER_EVENT_INSERT;
    let is_delete = event & pg_sys::TRIGGER_EVENT_OPMASK == pg_sys::TRIGGER_EVENT_DELETE;
    // apply_remote writes the registered relation; for a partitioned one the trigger fires on
    // the leaf partition the row lands in, so match on the registration, not the firing leaf.
    let remote = take_remote(cfg.rel, || unsafe {
        Row::deform(td.tg_trigtuple, tupdesc).model_id(&cfg)
    });
    // Put the remote context back for the next row of the same statement, even on error. A
    // set-based statement's contexts are one per key and written once: never put back.
    struct Putback(Option<RemoteContext>);
    impl Drop for Putback {
        fn drop(&mut self) {
            let from_set = REMOTE_SET.with(|r| r.borrow().is_some());
            if let Some(ctx) = self.0.take().filter(|_| !from_set) {
                REMOTE.with(|r| *r.borrow_mut() = Some(ctx));
            }
        }
    }
    let remote = Putback(remote);
    let node = settings::node_id();

    unsafe {
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
                        group: group.clone(),
                        prev_group: None,
                        moved: false,
                    };
                    write_plain(&cfg, &a, tupdesc);
                    if is_insert {
                        record_trigger_changes(
                            &cfg,
                            ctx,
                            td.tg_relation,
                            None,
                            &row,
                            &model_id,
                            group,
                            &node,
                        );
                    }
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
            let halves = [
                (
                    "D",
                    Local::Delete,
                    &old_id,
                    &old,
                    &cfg.drop_non_key,
                    old_group,
                ),
                (
                    "I",
                    Local::Insert,
                    &new_id,
                    &new,
                    &cfg.drop_excluded,
                    new_group,
                ),
            ];
            for (kind, what, id, image, drop, group) in halves {
                let version =
                    state::record_local(&cfg.model, id, what, clock::next_version().to_string());
                let a = Action::new(kind, id, image, drop.clone(), version, origin, group);
                write_plain(&cfg, &a, tupdesc);
            }
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
                // An insert that won over the live row is logged as an insert even when it
                // also moves the row: peers merge a moved `I` as column writes only, so a
                // relay would not raise their `created` and their row state (and later their
                // rows) would diverge. The moved `D` above still tells the old group's clients.
                let a = if ctx.created_won {
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
                        moved: false,
                    }
                } else if moved {
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
                record_trigger_changes(
                    &cfg,
                    ctx,
                    td.tg_relation,
                    Some(&old),
                    &new,
                    &new_id,
                    new.group(&cfg),
                    &node,
                );
            }
        }
    }
}

/// A BEFORE ROW trigger may have written other values than `apply_remote` did (or, on an
/// update, changed other columns too). Those columns hold this node's values, not the peer's, so
/// they are recorded as a local write at a fresh version (above the peer's: the clock observed
/// it) instead of under the peer's version, which would leave the nodes diverged for good.
/// Only tables with BEFORE ROW triggers for the event pay for the comparison.
///
/// # Safety
/// `rel` is the trigger's relation and `old`/`new` tuples of it.
#[allow(clippy::too_many_arguments)]
unsafe fn record_trigger_changes(
    cfg: &TableConfig,
    ctx: &RemoteContext,
    rel: pg_sys::Relation,
    old: Option<&Row>,
    new: &Row,
    model_id: &str,
    group: Option<String>,
    node: &str,
) {
    // SAFETY: the relation and its trigger descriptor are open while the trigger runs.
    let (trigdesc, tupdesc) = unsafe { ((*rel).trigdesc, (*rel).rd_att) };
    let has_before = !trigdesc.is_null()
        && unsafe {
            if old.is_some() {
                (*trigdesc).trig_update_before_row
            } else {
                (*trigdesc).trig_insert_before_row
            }
        };
    if !has_before {
        return;
    }
    let captured = |c: &str| cfg.captured.iter().any(|&i| cfg.name(i) == c);
    let mut changed: Vec<&str> = Vec::new();
    if !ctx.written.is_empty() {
        // The written values as this table's types print them in JSON (the same session, so
        // the same time zone and styles as the row's own JSON below).
        // SAFETY: the relation's row type exists; the name is palloc'd.
        let typname = unsafe {
            CStr::from_ptr(pg_sys::format_type_be_qualified((*tupdesc).tdtypeid))
                .to_string_lossy()
                .into_owned()
        };
        let intended = crate::model::run(
            &format!(
                "SELECT pg_catalog.to_jsonb(r.*) FROM pg_catalog.jsonb_populate_record(NULL::{typname}, $1) r"
            ),
            &[PgOid::from(pg_sys::JSONBOID)],
            vec![Jsonb(Value::Object(ctx.written.clone()))],
        );
        // SAFETY: the tuple belongs to this relation.
        let actual = unsafe { Jsonb::from_datum(row_json(new, tupdesc, &[]), false) }.map(|j| j.0);
        if let (Some(Value::Object(intended)), Some(Value::Object(actual))) = (intended, actual) {
            changed.extend(
                ctx.written.keys().map(String::as_str).filter(|c| {
                    captured(c) && !crate::deep::same(intended.get(*c), actual.get(*c))
                }),
            );
        }
    }
    if let Some(old) = old {
        for &i in &cfg.captured {
            let name = cfg.name(i);
            if ctx.written.contains_key(name) || changed.contains(&name) {
                continue;
            }
            let differs = match (old.nulls[i], new.nulls[i]) {
                (true, true) => false,
                // SAFETY: both are non-null datums of column i.
                (false, false) => !unsafe { same_image(cfg, i, old.values[i], new.values[i]) },
                _ => true,
            };
            if differs {
                changed.push(name);
            }
        }
    }
    if changed.is_empty() {
        return;
    }
    let version = state::record_local(
        &cfg.model,
        model_id,
        Local::Columns(&changed),
        clock::next_version().to_string(),
    );
    let a = Action {
        action: "U",
        model_id,
        row: new,
        drop: cfg.drop_all_but(&changed),
        version,
        versions: None,
        origin: node,
        group,
        prev_group: None,
        moved: false,
    };
    write_plain(cfg, &a, tupdesc);
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
        // The memberships are the owner's; the statement is fixed and fully qualified.
        let member = owner::as_owner(|| {
            crate::model::run(
                "SELECT pg_catalog.to_jsonb(EXISTS (SELECT FROM pg_sync.group_memberships m
              WHERE m.user_id OPERATOR(pg_catalog.=) ($1 OPERATOR(pg_catalog.->>) 'u')
                AND m.group_id OPERATOR(pg_catalog.=) ($1 OPERATOR(pg_catalog.->>) 'g')))",
                &[PgOid::from(pg_sys::JSONBOID)],
                vec![Jsonb(serde_json::json!({"u": user, "g": group}))],
            )
        });
        if member != Some(Value::Bool(true)) {
            forbid(format!(
                "a row of model \"{}\" would be written outside the user's groups",
                cfg.model
            ));
        }
    }
}

/// The cached registration of `relid`, checked against the firing trigger; built on a miss.
fn config(
    relid: pg_sys::Oid,
    trigger: &pg_sys::Trigger,
    tupdesc: pg_sys::TupleDesc,
    table: impl Fn() -> String,
) -> std::rc::Rc<TableConfig> {
    let generation = GENERATION.with(Cell::get);
    let cached = CONFIGS.with(|c| c.borrow().get(&relid).cloned());
    if let Some(cfg) = cached {
        if cfg.generation == generation && cfg.tgoid == trigger.tgoid {
            return cfg;
        }
    }
    let seen = INVALIDATIONS.with(Cell::get);
    // Built without holding a borrow: the registry read and type lookups accept invalidations.
    let cfg = std::rc::Rc::new(unsafe {
        TableConfig::build(relid, trigger, tupdesc, &table(), generation)
    });
    if INVALIDATIONS.with(Cell::get) == seen {
        CONFIGS.with(|c| c.borrow_mut().insert(relid, cfg.clone()));
    }
    cfg
}

/// BEFORE TRUNCATE: a truncate would drop rows without a trace in the log. Refuses only while
/// the table (or a partition ancestor) is registered: a guard left on a detached partition, or
/// attached to any other table, lets TRUNCATE through.
pub fn refuse_truncate(trigger: &pgrx::PgTrigger<'_>) {
    // SAFETY: Postgres hands a valid TriggerData to a trigger function.
    let relid = unsafe { (*trigger.trigger_data().tg_relation).rd_id };
    if registration(relid).is_none() {
        return;
    }
    let table = trigger.table_name().unwrap_or_default();
    errors::raise(
        PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
        format!("TRUNCATE is not allowed on \"{table}\": it is synced by pg_sync"),
        "Use DELETE so every removal is captured, or call pg_sync.unregister_table() first.",
    )
}
