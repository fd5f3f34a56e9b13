//! `pg_sync.mutate(client_id, client_tx_id, ops)`: a client's batch of writes, applied atomically
//! and exactly once per (client_id, client_tx_id).
//!
//! The first call records its result in `pg_sync.client_transactions` in the same transaction as
//! the writes; a replay finds that row and returns the first result with `"duplicate": true`,
//! changing nothing. A concurrent replay waits on the first one's unique-key insert.
//! Both carry `txid`, the applying transaction's full 64-bit xid (`pg_current_xact_id()`): what
//! `/v1/shape`'s change messages list in `headers.txids` and what TanStack DB's `awaitTxId` waits
//! for. It is stored with the result, so a replay answers with the xid of the transaction that
//! really applied the writes.
//! Transactions are keyed by (user, client_id, client_tx_id): `mutate_as` for user U sees only
//! U's transactions (a tx id seen in a shared group replays nothing of another user's), and
//! plain `mutate` has a namespace of its own (user_id '').

use crate::capture::{self, ClientContext};
use crate::deep::Jsonb;
use crate::errors;
use crate::model::{self, Model};
use pg_sync_lww::JS_SAFE_LIMIT;
use pgrx::prelude::*;
use pgrx::{pg_sys, PgOid, Uuid};
use serde_json::{json, Map, Value};
use std::collections::HashMap;

/// The most operations one client transaction may carry.
const MAX_OPS: usize = 10_000;
const MAX_CLIENT_ID: usize = 200;

/// The body of `pg_sync.mutate()`.
pub fn mutate(client_id: &str, client_tx_id: Uuid, ops: Jsonb, user: Option<&str>) -> Jsonb {
    if client_id.is_empty() || client_id.len() > MAX_CLIENT_ID {
        errors::invalid(
            format!("client_id must be 1 to {MAX_CLIENT_ID} bytes"),
            "Use a stable identifier per client installation.",
        );
    }
    let ops = match ops.0 {
        Value::Array(ops) if !ops.is_empty() && ops.len() <= MAX_OPS => ops,
        Value::Array(ops) if ops.is_empty() => {
            errors::invalid("ops must not be empty", "Send at least one operation.")
        }
        Value::Array(_) => errors::invalid(
            format!("a client transaction holds at most {MAX_OPS} ops"),
            "Split it.",
        ),
        _ => errors::invalid(
            "ops must be a JSON array",
            r#"Pass [{"model": ..., "action": "I"|"U"|"D", "id": ..., "data": {...}}, ...]."#,
        ),
    };
    if user == Some("") {
        errors::invalid(
            "user_id must not be empty",
            "Pass the id of the authenticated user the write is made for.",
        );
    }
    let tx = client_tx_id.to_string();
    let ns = user.unwrap_or_default();
    let ident = Jsonb(json!({"u": ns, "c": client_id, "t": tx}));
    let jsonb_arg = [PgOid::from(pg_sys::JSONBOID)];
    let claimed = model::run(
        "INSERT INTO pg_sync.client_transactions (user_id, client_id, client_tx_id, result)
         VALUES ($1->>'u', $1->>'c', ($1->>'t')::pg_catalog.uuid, '{}')
         ON CONFLICT (user_id, client_id, client_tx_id) DO NOTHING
         RETURNING 'true'::pg_catalog.jsonb",
        &jsonb_arg,
        vec![Jsonb(ident.0.clone())],
    );
    if claimed.is_none() {
        let first = model::run(
            "SELECT result FROM pg_sync.client_transactions
              WHERE user_id = $1->>'u' AND client_id = $1->>'c'
                AND client_tx_id = ($1->>'t')::pg_catalog.uuid",
            &jsonb_arg,
            vec![Jsonb(ident.0.clone())],
        );
        let mut first = match first {
            Some(Value::Object(m)) => m,
            _ => Map::new(),
        };
        first.insert("status".into(), "duplicate".into());
        first.insert("duplicate".into(), true.into());
        return Jsonb(Value::Object(first));
    }

    let mut models: HashMap<String, Model> = HashMap::new();
    let mut results = Vec::with_capacity(ops.len());
    let before = capture::written();
    {
        let _client = capture::enter_client(ClientContext {
            client_id: client_id.to_owned(),
            client_tx_id: tx.clone(),
            user: user.map(str::to_owned),
        });
        for (i, op) in ops.iter().enumerate() {
            let models = &mut models;
            let result = PgTryBuilder::new(std::panic::AssertUnwindSafe(|| {
                apply_op(op, &format!("op {i}: "), models, user)
            }))
            .catch_others(|e| rethrow_at(e, i))
            .execute();
            results.push(result);
        }
    }
    let result = json!({
        "status": "applied",
        "duplicate": false,
        "clientId": client_id,
        "clientTxId": tx,
        "ops": results,
        // Deltas this transaction made (each carries clientTxId); 0: none will come back.
        "changes": capture::written() - before,
    });
    // txid: the full 64-bit xid (epoch included), a JSON number, in the one txid space of the
    // Electric-compatible surface (/v1/shape's `txids` and `snapshot-end`): xid8 values never
    // wrap, so a snapshot seen before a 32-bit wraparound never calls a later write visible.
    // Left out at or above 2^53 (`JS_SAFE_LIMIT`), which a JS number cannot hold (no live counter
    // gets there).
    static STORE_RESULT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "UPDATE pg_sync.client_transactions
                SET result = ($1->'r') OPERATOR(pg_catalog.||) (SELECT CASE
                    WHEN x OPERATOR(pg_catalog.<) {JS_SAFE_LIMIT}
                    THEN pg_catalog.jsonb_build_object('txid', x) ELSE '{{}}' END
                    FROM (SELECT pg_catalog.pg_current_xact_id()::pg_catalog.text::pg_catalog.int8) t(x))
              WHERE user_id = $1->>'u' AND client_id = $1->>'c'
                AND client_tx_id = ($1->>'t')::pg_catalog.uuid
             RETURNING result"
        )
    });
    let stored = model::run(
        &STORE_RESULT,
        &jsonb_arg,
        vec![Jsonb(
            json!({"u": ns, "c": client_id, "t": tx, "r": result}),
        )],
    );
    Jsonb(stored.unwrap_or(result))
}

thread_local! {
    /// The field of the op being checked or applied (`model`, `id`, `data.title`, ...).
    static FIELD: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Notes which field of the op the next error would be about.
fn at(field: Option<String>) {
    FIELD.with(|f| *f.borrow_mut() = field);
}

/// Re-raises an error of op `op` with the op (and field, when known) as a JSON DETAIL
/// `{"op": N, "field": "data.title"}`, so callers can point at it. Postgres' own detail is
/// dropped: it can quote row values.
fn rethrow_at(e: pg_sys::panic::CaughtError, op: usize) -> ! {
    use pg_sys::panic::{CaughtError, ErrorReport};
    let report = match &e {
        CaughtError::PostgresError(r)
        | CaughtError::ErrorReport(r)
        | CaughtError::RustPanic { ereport: r, .. } => r,
    };
    let prefix = format!("op {op}: ");
    let message = match report.message() {
        m if m.starts_with(&prefix) => m.to_owned(),
        m => format!("{prefix}{m}"),
    };
    let field = FIELD.with(|f| f.borrow_mut().take());
    ErrorReport::new(report.sql_error_code(), message, "pg_sync")
        .set_detail(json!({"op": op, "field": field}).to_string())
        .set_hint(report.hint().unwrap_or_default().to_owned())
        .report(PgLogLevel::ERROR);
    unreachable!("ERROR does not return")
}

fn apply_op(
    op: &Value,
    ctx: &str,
    models: &mut HashMap<String, Model>,
    user: Option<&str>,
) -> Value {
    let shape = r#"An op is {"model": ..., "action": "I"|"U"|"D", "id": ..., "data": {...}}."#;
    at(None);
    let Some(op) = op.as_object() else {
        errors::invalid(format!("{ctx}an op must be a JSON object"), shape);
    };
    for k in op.keys() {
        if !matches!(k.as_str(), "model" | "action" | "id" | "data") {
            at(Some(k.clone()));
            errors::invalid(format!("{ctx}unknown field \"{k}\""), shape);
        }
    }
    at(Some("model".into()));
    let Some(name) = op.get("model").and_then(Value::as_str) else {
        errors::invalid(format!("{ctx}\"model\" must be a string"), shape);
    };
    at(Some("action".into()));
    let action = match op.get("action").and_then(Value::as_str) {
        Some(a @ ("I" | "U" | "D")) => a,
        _ => errors::invalid(
            format!("{ctx}\"action\" must be \"I\", \"U\" or \"D\""),
            shape,
        ),
    };
    at(Some("model".into()));
    if !models.contains_key(name) {
        models.insert(name.to_owned(), Model::lookup(name));
    }
    let model = &models[name];
    if !model.enabled {
        errors::raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("{ctx}model \"{name}\" is unregistered"),
            "Register the table again with pg_sync.register_table().",
        );
    }
    at(Some("data".into()));
    let data = match (op.get("data"), action) {
        (Some(Value::Object(m)), "I" | "U") => m.clone(),
        (None | Some(Value::Null), "D") => Map::new(),
        (Some(Value::Object(m)), "D") if m.is_empty() => Map::new(),
        (_, "D") => errors::invalid(
            format!("{ctx}a delete takes no \"data\" (or an empty one)"),
            shape,
        ),
        _ => errors::invalid(format!("{ctx}\"data\" must be an object"), shape),
    };
    for col in data.keys() {
        at(Some(format!("data.{col}")));
        model.check_column(col, ctx);
    }
    at(Some("id".into()));
    let id = match op.get("id") {
        Some(v) if !v.is_null() => Some(model.model_id_from_json(v, ctx)),
        _ if action == "I" => None,
        _ => errors::invalid(format!("{ctx}\"id\" is required for \"{action}\""), shape),
    };
    let key = id.as_deref().map(|id| model.key_object(id, ctx));
    // Key values in data must agree with the id; keys never change through mutate.
    if let Some(key) = &key {
        for (k, v) in key {
            if let Some(given) = data.get(k) {
                at(Some(format!("data.{k}")));
                let given_text = model.canonical_key_value(k, given, ctx);
                if given_text.as_deref() != v.as_str() {
                    errors::invalid(
                        format!("{ctx}key column \"{k}\" in data disagrees with \"id\""),
                        "Keys are immutable: delete the row and insert a new one.",
                    );
                }
            }
        }
    }
    if let Some(user) = user {
        at(model.group.as_ref().map(|g| format!("data.{g}")));
        authorize(model, action, &data, key.as_ref(), user, ctx);
    }
    at(None);
    let (model_id, status) = match action {
        "I" => {
            let mut row = data;
            if let Some(key) = key {
                row.extend(key);
            }
            (model.insert(&row), "applied")
        }
        "U" => {
            let key = key.expect("id checked");
            let cols: Map<String, Value> =
                data.into_iter().filter(|(k, _)| !model.is_key(k)).collect();
            if cols.is_empty() {
                errors::invalid(
                    format!("{ctx}an update needs at least one non-key column"),
                    shape,
                );
            }
            if !model.update(&key, &cols) {
                errors::raise(
                    PgSqlErrorCode::ERRCODE_NO_DATA_FOUND,
                    format!("{ctx}model \"{name}\" has no row with this id"),
                    "The row may have been deleted; re-read it before updating.",
                );
            }
            (id.unwrap_or_default(), "applied")
        }
        _ => {
            let existed = model.delete(&key.expect("id checked"));
            (
                id.unwrap_or_default(),
                if existed { "applied" } else { "not_found" },
            )
        }
    };
    json!({"model": name, "id": model_id, "action": action, "status": status})
}

/// Raises 42501 unless `user` may make this write: rows only in groups the user belongs to, for
/// the row as it is (locked) and as it will be; global models are read-only for clients.
fn authorize(
    model: &Model,
    action: &str,
    data: &Map<String, Value>,
    key: Option<&Map<String, Value>>,
    user: &str,
    ctx: &str,
) {
    let forbid = |why: String| -> ! {
        errors::raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("{ctx}{why}"),
            "Clients may write only rows of the sync groups they belong to.",
        )
    };
    let Some(group_col) = model.group.as_deref() else {
        forbid(format!(
            "model \"{}\" is global and read-only for clients",
            model.name
        ));
    };
    let member = |group: &str| -> bool {
        matches!(
            model::run(
                "SELECT pg_catalog.to_jsonb(EXISTS (SELECT 1 FROM pg_sync.group_memberships
                  WHERE user_id = $1->>'u' AND group_id = $1->>'g'))",
                &[PgOid::from(pg_sys::JSONBOID)],
                vec![Jsonb(json!({"u": user, "g": group}))],
            ),
            Some(Value::Bool(true))
        )
    };
    if action != "I" {
        if let Some(current) = key.and_then(|k| model.group_of(k)) {
            match current {
                Some(g) if member(&g) => {}
                _ => forbid("not a member of the row's group".into()),
            }
        }
    }
    // The group the row will be in, when this write sets it, as its canonical group id.
    let target = match data.get(group_col) {
        Some(v) => Some(
            model
                .canonical_group_value(v, ctx)
                .unwrap_or_else(|| forbid("the row's group must be a string or number".into())),
        ),
        None if action == "I" => forbid(format!(
            "an insert must set the group column \"{group_col}\""
        )),
        None => None,
    };
    if let Some(g) = target {
        if !member(&g) {
            forbid("not a member of the target group".into());
        }
    }
}
