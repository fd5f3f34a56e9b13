//! Registered models as `apply_remote` and `mutate` see them, and the row-level statements both
//! run against the user's tables. Values travel as JSON and are converted with
//! `jsonb_populate_record`, the inverse of the `to_jsonb` mapping that capture uses. It also owns
//! the model id: `key_text`, the canonical text of a key.
//!
//! Layering (no import circle): `capture` uses `state`, `state_direct`, `actions` and this
//! module; `state` uses `state_direct` and this module; `state_direct` uses `actions`; this
//! module uses only `canonical`, `owner` and `errors`, never the capture side.

use crate::deep::Jsonb;
use crate::errors;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::spi::OwnedPreparedStatement;
use pgrx::PgOid;
use serde_json::{Map, Value};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

pub struct Model {
    pub name: String,
    /// The table's owner: every statement on the table runs as it (`owner::as_table_owner`).
    pub owner: pg_sys::Oid,
    /// The table as a quoted, schema-qualified name.
    pub table: String,
    pub key: Vec<String>,
    /// Each key column's type and typmod, to parse ids into canonical text.
    pub key_types: Vec<(pg_sys::Oid, i32)>,
    /// The group column's type and typmod, to compare group ids canonically.
    pub group_type: Option<(pg_sys::Oid, i32)>,
    /// Columns whose values are synced (neither excluded nor dropped).
    pub columns: Vec<String>,
    /// Columns the table has but does not sync (excluded or generated): a peer's value for one
    /// is skipped, whereas a column the table lacks is a schema mismatch.
    pub unsynced: Vec<String>,
    pub federation: String,
    pub enabled: bool,
    /// The group column; `None` for a global model.
    pub group: Option<String>,
}

impl Model {
    /// Looks a model up in the registry; raises 42P01 when it is not registered.
    pub fn lookup(name: &str) -> Model {
        // A cached plan: mutate looks models up on every call.
        let found = run(
            "SELECT pg_catalog.jsonb_build_object(
                        't', pg_catalog.format('%I.%I', n.nspname, c.relname), 'k', r.pk_columns,
                        'c', ARRAY(SELECT a.attname::text FROM pg_catalog.pg_attribute a
                                    WHERE a.attrelid = r.rel AND a.attnum > 0 AND NOT a.attisdropped
                                      AND a.attgenerated = ''
                                      AND a.attname <> ALL (r.excluded_columns)
                                    ORDER BY a.attnum),
                        'x', ARRAY(SELECT a.attname::text FROM pg_catalog.pg_attribute a
                                    WHERE a.attrelid = r.rel AND a.attnum > 0 AND NOT a.attisdropped
                                      AND (a.attgenerated <> '' OR a.attname = ANY (r.excluded_columns))),
                        'f', r.federation, 'e', r.enabled, 'g', r.group_column,
                        'o', c.relowner::pg_catalog.int8,
                        'kt', (SELECT pg_catalog.jsonb_agg(pg_catalog.jsonb_build_array(
                                        a.atttypid::pg_catalog.int8, a.atttypmod) ORDER BY k.o)
                                 FROM pg_catalog.unnest(r.pk_columns) WITH ORDINALITY AS k(n, o)
                                 JOIN pg_catalog.pg_attribute a
                                   ON a.attrelid = r.rel AND a.attname = k.n AND NOT a.attisdropped),
                        'gt', (SELECT pg_catalog.jsonb_build_array(a.atttypid::pg_catalog.int8, a.atttypmod)
                                 FROM pg_catalog.pg_attribute a
                                WHERE a.attrelid = r.rel AND a.attname = r.group_column
                                  AND NOT a.attisdropped))
               FROM pg_sync.registry r
               JOIN pg_catalog.pg_class c ON c.oid = r.rel
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
              WHERE r.model = $1->>'m'",
            &[PgOid::from(pg_sys::JSONBOID)],
            vec![Jsonb(serde_json::json!({"m": name}))],
        );
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        };
        let row = found.map(|r| {
            (
                r["t"].as_str().unwrap_or_default().to_owned(),
                strings(&r["k"]),
                strings(&r["c"]),
                r["f"].as_str().unwrap_or_default().to_owned(),
                r["e"].as_bool().unwrap_or(false),
                r["g"].as_str().map(str::to_owned),
                r["kt"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(type_of)
                    .collect::<Vec<_>>(),
                Some(&r["gt"]).filter(|t| t.is_array()).map(type_of),
                pg_sys::Oid::from(r["o"].as_u64().unwrap_or_default() as u32),
                strings(&r["x"]),
            )
        });
        let Some((
            table,
            key,
            columns,
            federation,
            enabled,
            group,
            key_types,
            group_type,
            owner,
            unsynced,
        )) = row
        else {
            errors::raise(
                PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
                format!("model \"{name}\" is not registered"),
                "pg_sync.tables() lists the registered models.",
            );
        };
        if key_types.len() != key.len() {
            errors::raise(
                PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
                format!("a key column of model \"{name}\" no longer exists"),
                "Call pg_sync.register_table() again after changing the primary key.",
            );
        }
        Model {
            name: name.to_owned(),
            owner,
            table,
            key,
            key_types,
            group_type,
            columns,
            unsynced,
            federation,
            enabled,
            group,
        }
    }

    /// The current row's group as text, locking the row; `None` when there is no such row,
    /// `Some(None)` when its group is NULL.
    pub fn group_of(&self, key: &Map<String, Value>) -> Option<Option<String>> {
        let col = spi::quote_identifier(self.group.as_deref()?);
        let sql = format!(
            "SELECT pg_catalog.jsonb_build_array(pg_sync.canonical_text({col})) FROM {t} WHERE {cond} FOR UPDATE",
            t = self.table,
            cond = self.key_condition(1)
        );
        let found = self.run(&sql, &[PgOid::from(pg_sys::JSONBOID)], vec![jsonb(key)])?;
        Some(found.get(0).and_then(Value::as_str).map(str::to_owned))
    }

    /// Runs a statement on the table as its owner, in a security-restricted operation: what
    /// it fires (triggers, defaults, casts, check functions) is the owner's code and must not
    /// run with the caller's rights. The caller needs no privilege on the table.
    pub(crate) fn run(&self, sql: &str, types: &[PgOid], args: Vec<Jsonb>) -> Option<Value> {
        crate::owner::as_table_owner(self.owner, || run(sql, types, args))
    }

    pub fn is_key(&self, col: &str) -> bool {
        self.key.iter().any(|k| k == col)
    }

    /// Raises 42703 unless `col` is a synced column of this model.
    pub fn check_column(&self, col: &str, context: &str) {
        if !self.columns.iter().any(|c| c == col) {
            errors::raise(
                PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
                format!(
                    "{context}model \"{}\" has no synced column \"{col}\"",
                    self.name
                ),
                "Use the column names of the registered table; excluded columns cannot be written.",
            );
        }
    }

    /// Splits a model id (see `key_text`) into `{key column: text}`.
    pub fn key_object(&self, model_id: &str, context: &str) -> Map<String, Value> {
        let parts = self.key_parts(model_id, context);
        self.key
            .iter()
            .cloned()
            .zip(parts.into_iter().map(Value::String))
            .collect()
    }

    /// The canonical form of a model id from a peer or client: each part parsed as its key
    /// column's type and printed canonically (`"01"` is `"1"` for an integer key). Raises 22P02
    /// when a part is no value of its column's type, 22023 when the shape is wrong.
    pub fn canonical_id(&self, model_id: &str, context: &str) -> String {
        let parts = self.key_parts(model_id, context);
        key_text(self.canonical_parts(parts, context))
    }

    fn canonical_parts(&self, parts: Vec<String>, context: &str) -> Vec<String> {
        parts
            .into_iter()
            .zip(&self.key_types)
            .zip(&self.key)
            .map(|((p, &(typid, typmod)), col)| {
                crate::canonical::reparse(
                    typid,
                    typmod,
                    &p,
                    &format!("{context}id part for key column \"{col}\""),
                )
            })
            .collect()
    }

    /// The canonical text of a JSON value given for the group column (a string or number);
    /// `None` for other JSON.
    pub fn canonical_group_value(&self, v: &Value, context: &str) -> Option<String> {
        let text = match v {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            _ => return None,
        };
        let (typid, typmod) = self.group_type?;
        Some(crate::canonical::reparse(
            typid,
            typmod,
            &text,
            &format!("{context}the group column in data"),
        ))
    }

    /// The canonical text of a JSON value given for key column `col` (a string or number).
    pub fn canonical_key_value(&self, col: &str, v: &Value, context: &str) -> Option<String> {
        let i = self.key.iter().position(|k| k == col)?;
        let text = match v {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            _ => return None,
        };
        let (typid, typmod) = self.key_types[i];
        Some(crate::canonical::reparse(
            typid,
            typmod,
            &text,
            &format!("{context}key column \"{col}\" in data"),
        ))
    }

    fn key_parts(&self, model_id: &str, context: &str) -> Vec<String> {
        if self.key.len() == 1 {
            vec![model_id.to_owned()]
        } else {
            match serde_json::from_str::<Vec<String>>(model_id) {
                Ok(p) if p.len() == self.key.len() => p,
                _ => errors::invalid(
                    format!(
                        "{context}model_id of model \"{}\" must be a JSON array of {} strings",
                        self.name,
                        self.key.len()
                    ),
                    "Composite keys are written as a JSON array of each key column's text form.",
                ),
            }
        }
    }

    /// The model id for a client-supplied id: a string or number, or an array for composite keys.
    pub fn model_id_from_json(&self, id: &Value, context: &str) -> String {
        let scalar = |v: &Value| match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        };
        let parts: Option<Vec<String>> = match (id, self.key.len()) {
            (Value::Array(items), n) if n > 1 && items.len() == n => {
                items.iter().map(scalar).collect()
            }
            (v, 1) => scalar(v).map(|s| vec![s]),
            _ => None,
        };
        match parts {
            Some(p) => key_text(self.canonical_parts(p, context)),
            None => errors::invalid(
                format!("{context}invalid id for model \"{}\"", self.name),
                format!(
                    "Give the id as a string or number{}.",
                    if self.key.len() > 1 {
                        ", in an array with one element per key column"
                    } else {
                        ""
                    }
                ),
            ),
        }
    }

    fn key_condition(&self, param: usize) -> String {
        let cols = self
            .key
            .iter()
            .map(spi::quote_identifier)
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "({cols}) = (SELECT {cols} FROM pg_catalog.jsonb_populate_record(NULL::{t}, ${param}))",
            t = self.table
        )
    }

    pub(crate) fn key_text_expr(&self) -> String {
        let parts = self
            .key
            .iter()
            .map(|k| format!("pg_sync.canonical_text({})", spi::quote_identifier(k)))
            .collect::<Vec<_>>()
            .join(", ");
        format!("(pg_sync.key_text(ARRAY[{parts}]) COLLATE pg_catalog.\"C\")")
    }

    fn quoted(cols: &Map<String, Value>) -> String {
        cols.keys()
            .map(spi::quote_identifier)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The live row's synced columns, locked for update; `None` if there is no such row.
    pub fn select_for_update(&self, key: &Map<String, Value>) -> Option<Map<String, Value>> {
        let cols = self
            .columns
            .iter()
            .map(spi::quote_identifier)
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "SELECT pg_catalog.to_jsonb(r.*) FROM (SELECT {cols} FROM {t} WHERE {cond} FOR UPDATE) r",
            t = self.table,
            cond = self.key_condition(1)
        );
        match self.run(&sql, &[PgOid::from(pg_sys::JSONBOID)], vec![jsonb(key)]) {
            Some(Value::Object(m)) => Some(m),
            _ => None,
        }
    }

    /// Whether the table holds a row with this key (without locking it).
    pub fn exists(&self, key: &Map<String, Value>) -> bool {
        let sql = format!(
            "SELECT 'true'::pg_catalog.jsonb FROM {t} WHERE {cond}",
            t = self.table,
            cond = self.key_condition(1)
        );
        self.run(&sql, &[PgOid::from(pg_sys::JSONBOID)], vec![jsonb(key)])
            .is_some()
    }

    /// Inserts a row; returns its model id.
    pub fn insert(&self, row: &Map<String, Value>) -> String {
        self.insert_with(row, "")
    }

    /// Inserts a row with the values given even for GENERATED ALWAYS identity columns (a peer's
    /// row keeps the values its origin assigned); returns whether a row went in (a BEFORE
    /// trigger may skip it).
    pub fn insert_overriding(&self, row: &Map<String, Value>) -> bool {
        let cols = Self::quoted(row);
        let sql = format!(
            "INSERT INTO {t} ({cols}) OVERRIDING SYSTEM VALUE SELECT {cols} FROM pg_catalog.jsonb_populate_record(NULL::{t}, $1) \
             RETURNING 'true'::pg_catalog.jsonb",
            t = self.table,
        );
        self.run(&sql, &[PgOid::from(pg_sys::JSONBOID)], vec![jsonb(row)])
            .is_some()
    }

    fn insert_with(&self, row: &Map<String, Value>, overriding: &str) -> String {
        let cols = Self::quoted(row);
        let sql = format!(
            "INSERT INTO {t} ({cols}) {overriding}SELECT {cols} FROM pg_catalog.jsonb_populate_record(NULL::{t}, $1) \
             RETURNING pg_catalog.to_jsonb({id})",
            t = self.table,
            id = self.key_text_expr()
        );
        match self.run(&sql, &[PgOid::from(pg_sys::JSONBOID)], vec![jsonb(row)]) {
            Some(Value::String(id)) => id,
            _ => String::new(),
        }
    }

    /// Updates columns of a row; returns whether the row existed.
    pub fn update(&self, key: &Map<String, Value>, cols: &Map<String, Value>) -> bool {
        let names = Self::quoted(cols);
        let sql = format!(
            "UPDATE {t} SET ({names}) = (SELECT {names} FROM pg_catalog.jsonb_populate_record(NULL::{t}, $1)) \
             WHERE {cond} RETURNING 'true'::pg_catalog.jsonb",
            t = self.table,
            cond = self.key_condition(2)
        );
        let types = [PgOid::from(pg_sys::JSONBOID), PgOid::from(pg_sys::JSONBOID)];
        self.run(&sql, &types, vec![jsonb(cols), jsonb(key)])
            .is_some()
    }

    /// Deletes a row; returns whether it existed.
    pub fn delete(&self, key: &Map<String, Value>) -> bool {
        let sql = format!(
            "DELETE FROM {t} WHERE {cond} RETURNING 'true'::pg_catalog.jsonb",
            t = self.table,
            cond = self.key_condition(1)
        );
        self.run(&sql, &[PgOid::from(pg_sys::JSONBOID)], vec![jsonb(key)])
            .is_some()
    }
}

/// Canonical text of a key (a model id): the single column's text, or a compact JSON array of
/// texts. Capture mints ids with it and `Model::canonical_id` re-forms peers' ids with it.
pub fn key_text(mut parts: Vec<String>) -> String {
    if parts.len() == 1 {
        parts.pop().unwrap_or_default()
    } else {
        Value::Array(parts.into_iter().map(Value::String).collect()).to_string()
    }
}

/// `[type oid, typmod]` as the registry query returns it.
fn type_of(t: &Value) -> (pg_sys::Oid, i32) {
    let oid = t[0].as_u64().unwrap_or_default() as u32;
    let typmod = t[1].as_i64().unwrap_or(-1) as i32;
    (pg_sys::Oid::from(oid), typmod)
}

fn jsonb(m: &Map<String, Value>) -> Jsonb {
    Jsonb(Value::Object(m.clone()))
}

const PLAN_CACHE_LIMIT: usize = 512;

thread_local! {
    static STATEMENTS: RefCell<HashMap<String, Rc<OwnedPreparedStatement>>> = RefCell::new(HashMap::new());
}

/// Runs a cached prepared statement returning at most one jsonb value.
///
/// Re-entrant: the statement's triggers (capture, which folds a moved row's state) run
/// statements through here too, so no borrow of the cache is held while one executes; the `Rc`
/// keeps the plan alive even if a nested call clears the cache.
pub fn run(sql: &str, types: &[PgOid], args: Vec<Jsonb>) -> Option<Value> {
    let cached = STATEMENTS.with(|cache| cache.borrow().get(sql).cloned());
    let stmt = match cached {
        Some(stmt) => stmt,
        None => {
            let stmt = Spi::connect(|client| client.prepare_mut(sql, types).map(|p| p.keep()))
                .unwrap_or_else(|e| panic!("pg_sync: cannot prepare statement: {e}"));
            let stmt = Rc::new(stmt);
            STATEMENTS.with(|cache| {
                let mut cache = cache.borrow_mut();
                if cache.len() >= PLAN_CACHE_LIMIT {
                    cache.clear();
                }
                cache.insert(sql.to_owned(), stmt.clone());
            });
            stmt
        }
    };
    let args: Vec<pgrx::datum::DatumWithOid> = args.into_iter().map(Into::into).collect();
    Spi::connect_mut(|client| {
        let t = client
            .update(&*stmt, None, &args)
            .unwrap_or_else(|e| panic!("pg_sync: {e}"));
        if t.is_empty() {
            None
        } else {
            t.first().get_one::<Jsonb>().ok().flatten().map(|j| j.0)
        }
    })
}
