//! `POST /sync/mutate`: a client's batch of transactions, each applied atomically and at most
//! once through `pg_sync.mutate_as`, which also enforces the user's groups in-database.

use super::{App, Identity, Refusal};
use crate::protocol::ErrorCode;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

/// The largest request body.
pub const MAX_BODY: usize = 1 << 20;
const MAX_TRANSACTIONS: usize = 100;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Request {
    client_id: String,
    transactions: Vec<Transaction>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Transaction {
    client_tx_id: String,
    ops: Value,
}

/// The protocol code for a SQLSTATE raised by `pg_sync.mutate_as`.
fn code_for(sqlstate: &str) -> &'static str {
    match sqlstate {
        "42501" => "forbidden",
        "42P01" => "unknown_model",
        "42703" => "unknown_column",
        "P0002" => "not_found",
        "55000" => "model_unavailable",
        "23505" | "23503" | "23514" | "23502" => "constraint",
        _ if sqlstate.starts_with("22") || sqlstate == "42804" => "invalid",
        _ => "error",
    }
}

/// A UUID in its usual text form (what clients generate: `crypto.randomUUID()`, uuid v4/v7).
fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

fn bad(message: &str, field: Option<String>) -> Response {
    Refusal::of(ErrorCode::BadRequest, message)
        .at(field)
        .into_response()
}

/// Why a whole batch could not be applied.
pub enum BatchError {
    /// The request is malformed (400): why, and which field.
    Bad(String, String),
    /// The database cannot be reached (503).
    Unavailable,
    /// The API key the request authenticated with is gone (revoked, moved to another user or
    /// re-hashed) as of a write's transaction (401): that write did nothing.
    KeyRevoked,
}

/// Applies each transaction of the batch for `user`; returns one result per transaction.
/// With an API key (`key`), each transaction checks in the database that the key still
/// authenticates `user`, in the write's own transaction (`mutate_with_key_statement`).
pub async fn apply(
    app: &App,
    user: &str,
    key: Option<&super::HeldKey>,
    request: &Request,
) -> Result<Vec<Value>, BatchError> {
    if request.client_id.is_empty() || request.client_id.len() > 200 {
        return Err(BatchError::Bad(
            "clientId must be 1 to 200 bytes".into(),
            "clientId".into(),
        ));
    }
    if request.transactions.is_empty() || request.transactions.len() > MAX_TRANSACTIONS {
        return Err(BatchError::Bad(
            format!("send 1 to {MAX_TRANSACTIONS} transactions"),
            "transactions".into(),
        ));
    }
    if let Some(i) = request
        .transactions
        .iter()
        .position(|tx| !is_uuid(&tx.client_tx_id))
    {
        return Err(BatchError::Bad(
            "clientTxId must be a UUID (8-4-4-4-12 hex digits)".into(),
            format!("transactions[{i}].clientTxId"),
        ));
    }
    let db = app.db.get().await.map_err(|_| BatchError::Unavailable)?;
    let statement = match key {
        None => crate::store::mutate_statement(&db).await,
        Some(_) => crate::store::mutate_with_key_statement(&db).await,
    }
    .map_err(|_| BatchError::Unavailable)?;
    let statement = &statement;
    // Pipelined on one connection: each transaction commits on its own, in order, and the
    // batch pays one round trip instead of one per transaction.
    let ops: Vec<String> = request
        .transactions
        .iter()
        .map(|tx| tx.ops.to_string())
        .collect();
    let db = &db;
    let outcomes = futures::future::join_all(request.transactions.iter().zip(&ops).map(
        |(tx, ops)| async move {
            match key {
                None => db
                    .query_one(
                        statement,
                        &[&user, &request.client_id, &tx.client_tx_id, ops],
                    )
                    .await
                    .map(Some),
                Some(k) => {
                    db.query_opt(
                        statement,
                        &[
                            &user,
                            &request.client_id,
                            &tx.client_tx_id,
                            ops,
                            &k.id,
                            &k.hash,
                        ],
                    )
                    .await
                }
            }
        },
    ))
    .await;
    let mut results = Vec::with_capacity(request.transactions.len());
    for (tx, outcome) in request.transactions.iter().zip(outcomes) {
        results.push(match outcome {
            // The key was gone in this write's transaction: it wrote nothing (the batch's
            // earlier transactions, applied before the revocation, are answered `duplicate`
            // when sent again with a valid key).
            Ok(None) => return Err(BatchError::KeyRevoked),
            Ok(Some(row)) => {
                let text: String = row.get(0);
                let first: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                let mut answer = json!({
                    "clientTxId": tx.client_tx_id,
                    "status": if first["duplicate"] == true { "duplicate" } else { "applied" },
                    "ops": first["ops"],
                    "changes": first["changes"],
                });
                // The applying transaction's full xid8 (also on a duplicate): the `txids`
                // entry of its change messages on /v1/shape (awaitTxId). Absent when the
                // stored result has none (at or above 2^53, `pg_sync_lww::JS_SAFE_LIMIT`).
                if first["txid"].is_number() {
                    answer["txid"] = first["txid"].clone();
                }
                answer
            }
            Err(e) => match e.as_db_error() {
                Some(db_err) => {
                    let mut r = json!({
                        "clientTxId": tx.client_tx_id,
                        "status": "rejected",
                        "code": code_for(db_err.code().code()),
                        "message": db_err.message(),
                    });
                    // pg_sync.mutate_as names the op (and field) in a JSON detail.
                    let at: Value = db_err
                        .detail()
                        .and_then(|d| serde_json::from_str(d).ok())
                        .unwrap_or(Value::Null);
                    if let Some(op) = at["op"].as_u64() {
                        r["op"] = op.into();
                        if let Some(field) = at["field"].as_str() {
                            r["field"] = field.into();
                        }
                    }
                    r
                }
                None => {
                    tracing::warn!(error = %e, "mutate failed");
                    return Err(BatchError::Unavailable);
                }
            },
        });
    }
    let c = &app.counters;
    for r in &results {
        let counter = match r["status"].as_str() {
            Some("applied") => &c.mutate_applied,
            Some("duplicate") => &c.mutate_duplicate,
            _ => &c.mutate_rejected,
        };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    Ok(results)
}

/// `Access-Control-Allow-Origin` for a request from `origin`, when the origins allowed to call
/// the API from a browser (`SYNC_SHAPE_CORS_ORIGINS`, shared with `/v1/shape`) include it: an app
/// served from another origin reads through `/v1/shape` and writes here.
fn allow_origin(app: &App, headers: &HeaderMap) -> Option<HeaderValue> {
    let origin = headers.get(header::ORIGIN)?.to_str().ok()?;
    let mut allowed = app.cfg.shape_cors_origins.split(',').map(str::trim);
    if allowed.clone().any(|a| a == "*") {
        Some(HeaderValue::from_static("*"))
    } else if allowed.any(|a| a == origin) {
        HeaderValue::from_str(origin).ok()
    } else {
        None
    }
}

/// Adds the CORS headers to any answer of `/sync/mutate` (refusals included, so a browser app
/// can read why).
pub async fn with_cors(
    State(app): State<Arc<App>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let allow = allow_origin(&app, request.headers());
    let mut response = next.run(request).await;
    if let Some(allow) = allow {
        let h = response.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allow);
        h.insert(header::VARY, HeaderValue::from_static("origin"));
    }
    response
}

/// `OPTIONS /sync/mutate`: the CORS preflight of a cross-origin POST (JSON body, Authorization).
pub async fn preflight(headers: HeaderMap) -> Response {
    super::cors_preflight(&headers, "POST, OPTIONS")
}

pub async fn mutate(
    State(app): State<Arc<App>>,
    identity: Identity,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    // A key answered from the cache of valid keys is confirmed in the database before it
    // writes: a revocation reaches the cache only once the replication stream has it.
    // (A looked-up key was checked in the database by this request already.)
    let held = identity.held_key();
    if let Some(held) = held.as_ref().filter(|_| identity.cached) {
        if let Err(refused) = held.confirm(&app).await {
            return refused.into_response();
        }
    }
    let user = identity.user;
    let body = match body {
        Ok(b) => b,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return Refusal::of(
                ErrorCode::TooLarge,
                &format!("the body exceeds {MAX_BODY} bytes"),
            )
            .into_response()
        }
        Err(_) => return bad("cannot read the request body", None),
    };
    let request: Request = match serde_path_to_error::deserialize(
        &mut serde_json::Deserializer::from_slice(&body),
    ) {
        Ok(r) => r,
        Err(e) => {
            let field = e.path().to_string();
            return bad(
                    &format!(
                        "expected {{\"clientId\": ..., \"transactions\": [{{\"clientTxId\": ..., \"ops\": [...]}}]}}: {}",
                        e.inner()
                    ),
                    (field != ".").then_some(field),
                );
        }
    };
    match apply(&app, &user, held.as_ref(), &request).await {
        Ok(results) => Json(json!({"results": results})).into_response(),
        Err(BatchError::Bad(why, field)) => bad(&why, Some(field)),
        Err(BatchError::Unavailable) => {
            Refusal::of(ErrorCode::Unavailable, "database unavailable; retry").into_response()
        }
        Err(BatchError::KeyRevoked) => Refusal::key_revoked().into_response(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn client_tx_ids_are_uuids() {
        assert!(super::is_uuid("8f9e7c1e-1111-4a2b-9c3d-000000000001"));
        assert!(super::is_uuid("8F9E7C1E-1111-4A2B-9C3D-00000000000A"));
        for bad in [
            "1",
            "",
            "8f9e7c1e11114a2b9c3d000000000001",
            "8f9e7c1e-1111-4a2b-9c3d-00000000000g",
            "8f9e7c1e-1111-4a2b-9c3d-0000000000011",
        ] {
            assert!(!super::is_uuid(bad), "{bad}");
        }
    }
}
