//! The privilege boundary: the `pgsync_owner` role, which owns the log and the registry, and the
//! few places that act as it.
//!
//! Application roles hold no privileges on `pg_sync` tables. The capture trigger switches to
//! `pgsync_owner` only around statements whose text and arguments are fixed by pg_sync (the
//! action insert, registry and log reads): every value that user code could influence (the
//! row's JSON, which calls user-defined casts to json; key text from output functions) is
//! computed before, in the writer's own security context. The switch also sets
//! `SECURITY_RESTRICTED_OPERATION`, and statements that resolve operators through the caller's
//! `search_path` run with a fixed one (`with_fixed_search_path`).
//!
//! Registration goes through `registry_put`/`registry_disable`: the caller must own the table and
//! be allowed to call `register_table`/`unregister_table`; only then is the registry written as
//! `pgsync_owner`.

use crate::errors;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::ffi::CStr;

/// The role that owns pg_sync's tables; created by the extension script when missing.
pub const OWNER_ROLE: &CStr = c"pgsync_owner";

/// The owner role's oid. Looked up each time (a syscache hit): a cached oid would outlive a
/// DROP EXTENSION, DROP ROLE and CREATE EXTENSION in another session.
fn owner_oid() -> pg_sys::Oid {
    // SAFETY: a catalog lookup by name; missing_ok returns InvalidOid instead of raising.
    let oid = unsafe { pg_sys::get_role_oid(OWNER_ROLE.as_ptr(), true) };
    if oid == pg_sys::InvalidOid {
        errors::raise(
            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            "role \"pgsync_owner\" does not exist",
            "pg_sync's tables belong to the NOLOGIN role pgsync_owner; reinstall the extension \
             (DROP EXTENSION pg_sync; CREATE EXTENSION pg_sync) to create it.",
        );
    }
    oid
}

/// Runs `f` as `pgsync_owner` in a security-restricted operation. Only statements fixed by
/// pg_sync may run inside: nothing that evaluates user-defined functions, casts or operators.
pub fn as_owner<R>(f: impl FnOnce() -> R) -> R {
    as_role(owner_oid(), f)
}

/// Runs `f` as `table_owner` (the owner of the application table a statement writes) in a
/// security-restricted operation, like logical replication's apply as table owner, REFRESH
/// MATERIALIZED VIEW and autovacuum: the table's triggers, column defaults, check and domain
/// functions and json casts are the owner's code and run with the owner's rights, never with
/// the caller's (the worker is a member of `pgsync_owner`).
pub fn as_table_owner<R>(table_owner: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    if table_owner == pg_sys::InvalidOid {
        errors::raise(
            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            "the owner of a registered table was not found",
            "Call pg_sync.register_table() again.",
        );
    }
    as_role(table_owner, f)
}

fn as_role<R>(role: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    let mut saved_user = pg_sys::InvalidOid;
    let mut saved_ctx = 0;
    // SAFETY: save and switch the current user; an ERROR's abort restores it, so does the guard.
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_ctx);
        pg_sys::SetUserIdAndSecContext(
            role,
            saved_ctx
                | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32
                | pg_sys::SECURITY_RESTRICTED_OPERATION as i32,
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

/// Runs `f` with `search_path = pg_catalog, pg_temp`, for statements (shared with other modules)
/// that name operators without a schema: under the caller's path, a user-created operator in an
/// earlier schema would be chosen. Cached plans notice the different path and are re-planned.
pub fn with_fixed_search_path<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: the same save/set/restore that a function's SET clause does; an ERROR's
    // (sub)transaction abort pops the GUC nest level as well.
    let level = unsafe {
        let level = pg_sys::NewGUCNestLevel();
        pg_sys::set_config_option(
            c"search_path".as_ptr(),
            c"pg_catalog, pg_temp".as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            pgrx::PgLogLevel::ERROR as i32,
            false,
        );
        level
    };
    struct Pop(i32);
    impl Drop for Pop {
        fn drop(&mut self) {
            // While an ERROR unwinds, the (sub)transaction abort pops the level itself.
            if !std::thread::panicking() {
                // SAFETY: pops the nest level pushed above, restoring the previous value.
                unsafe { pg_sys::AtEOXact_GUC(true, self.0) };
            }
        }
    }
    let _pop = Pop(level);
    f()
}

/// Raises 42501 unless the current user owns `rel` and may call `gate` (a function signature).
fn check_caller(rel: pg_sys::Oid, gate: &str) {
    let allowed = Spi::get_one_with_args::<bool>(
        "SELECT pg_catalog.pg_has_role(c.relowner, 'USAGE')
                AND pg_catalog.has_function_privilege($2, 'EXECUTE')
           FROM pg_catalog.pg_class c WHERE c.oid OPERATOR(pg_catalog.=) $1",
        &[rel.into(), gate.into()],
    )
    .ok()
    .flatten()
    .unwrap_or(false);
    if !allowed {
        errors::raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            "permission denied to change the pg_sync registration of this table",
            format!("Only the table's owner can, and only with EXECUTE on {gate}."),
        );
    }
}

const REGISTER: &str = "pg_sync.register_table(pg_catalog.regclass, pg_catalog.text, \
     pg_catalog.text, pg_catalog.text[], pg_catalog.text)";
const UNREGISTER: &str = "pg_sync.unregister_table(pg_catalog.regclass)";

/// `pg_sync.registry_put(...)`: the registry write of `register_table`, as `pgsync_owner`.
pub fn registry_put(
    rel: pg_sys::Oid,
    model: &str,
    pk: Vec<String>,
    group_column: Option<&str>,
    exclude: Vec<String>,
    federation: &str,
) -> bool {
    check_caller(rel, REGISTER);
    validate(rel, model, &pk, group_column, &exclude, federation);
    let written = as_owner(|| {
        Spi::connect_mut(|client| {
            let args = [
                rel.into(),
                model.into(),
                pk.into(),
                group_column.into(),
                exclude.into(),
                federation.into(),
            ];
            client
                .update(
                    "INSERT INTO pg_sync.registry AS r
                            (rel, model, pk_columns, group_column, excluded_columns, federation, enabled)
                     VALUES ($1, $2, $3, $4, $5, $6, true)
                     ON CONFLICT ON CONSTRAINT registry_pkey DO UPDATE
                        SET pk_columns = EXCLUDED.pk_columns, group_column = EXCLUDED.group_column,
                            excluded_columns = EXCLUDED.excluded_columns,
                            federation = EXCLUDED.federation, enabled = true
                      WHERE r.model OPERATOR(pg_catalog.=) EXCLUDED.model
                     RETURNING true",
                    None,
                    &args,
                )
                .map(|t| !t.is_empty())
                .unwrap_or_else(|e| panic!("pg_sync: {e}"))
        })
    });
    invalidate(rel);
    written
}

/// Makes every backend drop its cached registration of `rel` (capture caches it per relation,
/// flushed by relcache invalidation) at the end of this transaction.
fn invalidate(rel: pg_sys::Oid) {
    // SAFETY: queues a relcache invalidation; a missing relation is ignored.
    unsafe { pg_sys::CacheInvalidateRelcacheByRelid(rel) };
}

/// What `register_table` checks, checked again here: `registry_put` is callable directly (by
/// PUBLIC; it checks ownership itself), so nothing but a valid registration may be written.
fn validate(
    rel: pg_sys::Oid,
    model: &str,
    pk: &[String],
    group_column: Option<&str>,
    exclude: &[String],
    federation: &str,
) {
    let problem = with_fixed_search_path(|| {
        Spi::get_one_with_args::<String>(
            "SELECT CASE
               WHEN c.oid IS NULL THEN 'missing'
               WHEN c.relkind NOT IN ('r', 'p') THEN 'kind'
               WHEN c.relpersistence = 't' THEN 'temporary'
               WHEN c.relnamespace = 'pg_sync'::pg_catalog.regnamespace THEN 'own'
               WHEN $2 IS DISTINCT FROM (
                      SELECT pg_catalog.array_agg(a.attname::pg_catalog.text ORDER BY k.ord)
                        FROM pg_catalog.pg_index i
                        CROSS JOIN LATERAL pg_catalog.unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
                        JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                       WHERE i.indrelid = c.oid AND i.indisprimary) THEN 'pk'
               WHEN $3 IS NOT NULL AND NOT EXISTS (
                      SELECT 1 FROM pg_catalog.pg_attribute a
                       WHERE a.attrelid = c.oid AND a.attname = $3 AND a.attnum > 0
                         AND NOT a.attisdropped) THEN 'group'
               WHEN EXISTS (
                      SELECT 1 FROM pg_catalog.unnest($4) e
                       WHERE e IS NULL OR e = ANY ($2) OR e = $3 OR NOT EXISTS (
                             SELECT 1 FROM pg_catalog.pg_attribute a
                              WHERE a.attrelid = c.oid AND a.attname = e AND a.attnum > 0
                                AND NOT a.attisdropped)) THEN 'exclude'
               WHEN $5 NOT IN ('push', 'pull', 'both', 'off') THEN 'federation'
               WHEN $6 !~ '^[A-Za-z_][A-Za-z0-9_]{0,62}$' THEN 'model'
             END
             FROM (SELECT $1::pg_catalog.oid) AS x(oid)
             LEFT JOIN pg_catalog.pg_class c ON c.oid = x.oid",
            &[
                rel.into(),
                pk.to_vec().into(),
                group_column.into(),
                exclude.to_vec().into(),
                federation.into(),
                model.into(),
            ],
        )
    })
    .unwrap_or_else(|e| panic!("pg_sync: {e}"));
    let Some(problem) = problem else { return };
    let (code, message) = match problem.as_str() {
        "missing" => (
            PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
            "the table does not exist",
        ),
        "kind" => (
            PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE,
            "not an ordinary or partitioned table",
        ),
        "temporary" => (
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            "a temporary table cannot be registered",
        ),
        "own" => (
            PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE,
            "pg_sync's own tables cannot be registered",
        ),
        "pk" => (
            PgSqlErrorCode::ERRCODE_INVALID_TABLE_DEFINITION,
            "pk_columns must be the table's primary key columns, in order",
        ),
        "group" => (
            PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
            "the group column does not exist",
        ),
        "exclude" => (
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "an excluded column does not exist, or is a key or the group column",
        ),
        "federation" => (
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "invalid federation mode",
        ),
        _ => (
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "invalid model name",
        ),
    };
    errors::raise(
        code,
        format!("pg_sync.registry_put: {message}"),
        "Register tables with pg_sync.register_table(), which derives and checks these values.",
    );
}

/// `pg_sync.registry_disable(rel)`: the registry write of `unregister_table`.
pub fn registry_disable(rel: pg_sys::Oid) -> bool {
    check_caller(rel, UNREGISTER);
    let written = as_owner(|| {
        Spi::connect_mut(|client| {
            client
                .update(
                    "UPDATE pg_sync.registry r SET enabled = false
                      WHERE r.rel OPERATOR(pg_catalog.=) $1 AND r.enabled RETURNING true",
                    None,
                    &[rel.into()],
                )
                .map(|t| !t.is_empty())
                .unwrap_or_else(|e| panic!("pg_sync: {e}"))
        })
    });
    invalidate(rel);
    written
}

/// `pg_sync.owner_rows(model, ids, after_id, lim, lock)`: rows of a registered table as
/// `[{"id": model id, "data": row JSON minus excluded columns, "grp": group text}]`, read as
/// the table's owner in a security-restricted operation. Federation's snapshot and announce
/// read application tables through it: `to_jsonb` calls the column types' casts to json and the
/// key text calls output functions, the owner's code, which must never run with the caller's
/// (the worker's or an administrator's) rights. With `ids`, the rows of those model ids (missing
/// ones are left out); without, at most `lim` rows after `after_id` in key order (the next
/// page), locked FOR UPDATE when `lock`. The statement's text is built here from the registry,
/// never taken from the caller.
pub fn owner_rows(
    model: &str,
    ids: Option<Vec<String>>,
    after_id: Option<&str>,
    lim: Option<i32>,
    lock: bool,
) -> crate::deep::Jsonb {
    // The catalog reads run as the caller (fixed statements, nothing user-defined evaluated).
    let meta = with_fixed_search_path(|| {
        Spi::get_one_with_args::<crate::deep::Jsonb>(
            "SELECT pg_catalog.jsonb_build_object(
                  'tbl', r.rel::pg_catalog.regclass::pg_catalog.text,
                  'owner', c.relowner::pg_catalog.int8,
                  'ex', pg_catalog.to_jsonb(r.excluded_columns),
                  'grp', CASE WHEN r.group_column IS NULL THEN 'NULL::text'
                              ELSE pg_catalog.format('pg_sync.canonical_text(t.%I)', r.group_column) END,
                  'mid', '(pg_sync.key_text(ARRAY[' OPERATOR(pg_catalog.||) (
                          SELECT pg_catalog.string_agg(pg_catalog.format('pg_sync.canonical_text(t.%I)', k.c), ', ' ORDER BY k.o)
                            FROM pg_catalog.unnest(r.pk_columns) WITH ORDINALITY AS k(c, o)) OPERATOR(pg_catalog.||) ']) COLLATE pg_catalog.\"C\")',
                  'cols', (SELECT pg_catalog.string_agg(pg_catalog.format('t.%I', k.c), ', ' ORDER BY k.o)
                             FROM pg_catalog.unnest(r.pk_columns) WITH ORDINALITY AS k(c, o)),
                  'vals', (SELECT pg_catalog.string_agg(pg_catalog.format('(%s)::%s',
                                    CASE WHEN pg_catalog.cardinality(r.pk_columns) OPERATOR(pg_catalog.=) 1 THEN '$ID'
                                         ELSE pg_catalog.format('($ID::pg_catalog.jsonb OPERATOR(pg_catalog.->>) %s)', k.o OPERATOR(pg_catalog.-) 1) END,
                                    pg_catalog.format_type(a.atttypid, a.atttypmod)), ', ' ORDER BY k.o)
                             FROM pg_catalog.unnest(r.pk_columns) WITH ORDINALITY AS k(c, o)
                             JOIN pg_catalog.pg_attribute a
                               ON a.attrelid OPERATOR(pg_catalog.=) r.rel AND a.attname OPERATOR(pg_catalog.=) k.c
                              AND NOT a.attisdropped),
                  'nkey', pg_catalog.cardinality(r.pk_columns))
               FROM pg_sync.registry r JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) r.rel
              WHERE r.model OPERATOR(pg_catalog.=) $1 AND r.enabled",
            &[model.into()],
        )
    })
    .unwrap_or_else(|e| panic!("pg_sync: {e}"));
    let Some(crate::deep::Jsonb(meta)) = meta else {
        errors::raise(
            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            format!("model \"{model}\" is not registered"),
            "See pg_sync.tables() for the registered models.",
        );
    };
    let s = |k: &str| meta[k].as_str().unwrap_or_default().to_owned();
    let (tbl, grp, mid, cols, vals) = (s("tbl"), s("grp"), s("mid"), s("cols"), s("vals"));
    if vals.is_empty() || meta["nkey"].as_u64() != Some(vals.split("$ID").count() as u64 - 1) {
        errors::raise(
            PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
            format!("a key column of model \"{model}\" no longer exists"),
            "Call pg_sync.register_table() again after changing the primary key.",
        );
    }
    let excluded: Vec<String> = meta["ex"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    let owner = pg_sys::Oid::from(meta["owner"].as_u64().unwrap_or_default() as u32);
    let row = format!(
        "pg_catalog.jsonb_build_object('id', {mid}, 'data', pg_catalog.to_jsonb(t.*) OPERATOR(pg_catalog.-) $2, 'grp', {grp})"
    );
    let sql = match ids {
        Some(_) => format!(
            "SELECT coalesce(pg_catalog.jsonb_agg({row} ORDER BY s.o), '[]')
               FROM pg_catalog.unnest($1::pg_catalog.text[]) WITH ORDINALITY AS s(id, o)
               JOIN {tbl} t ON ({cols}) OPERATOR(pg_catalog.=) ({v}) AND {mid} OPERATOR(pg_catalog.=) s.id",
            v = vals.replace("$ID", "s.id")
        ),
        None => format!(
            "SELECT coalesce(pg_catalog.jsonb_agg(x.j), '[]') FROM (
               SELECT {row} AS j FROM {tbl} t {cond} ORDER BY {cols} LIMIT $4 {lock}) x",
            cond = if after_id.is_some() {
                format!(
                    "WHERE ({cols}) OPERATOR(pg_catalog.>) ({v})",
                    v = vals.replace("$ID", "$3")
                )
            } else {
                String::new()
            },
            lock = if lock { "FOR UPDATE OF t" } else { "" }
        ),
    };
    let lim = lim.unwrap_or(1000).max(1);
    let args = [
        ids.unwrap_or_default().into(),
        excluded.into(),
        after_id.into(),
        lim.into(),
    ];
    let rows = as_table_owner(owner, || {
        with_fixed_search_path(|| {
            Spi::connect_mut(|client| {
                client
                    .update(&sql, None, &args)?
                    .first()
                    .get_one::<crate::deep::Jsonb>()
            })
        })
    })
    .unwrap_or_else(|e| panic!("pg_sync: {e}"));
    rows.unwrap_or(crate::deep::Jsonb(serde_json::json!([])))
}
