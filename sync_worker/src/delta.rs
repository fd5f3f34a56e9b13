//! A sequenced change as clients see it: serialized once, shared by all its recipients.

use axum::extract::ws::Utf8Bytes;
use serde_json::{json, Value};

#[derive(Debug, Clone)]
pub struct Delta {
    pub sync_id: i64,
    pub model: String,
    /// The row's group; `None` with `global` false means the row is in no group (nobody sees it).
    pub group_id: Option<String>,
    /// The model has no group column: everyone sees it.
    pub global: bool,
    /// The protocol v1 `delta` frame (reference-counted: recipients share the bytes).
    pub frame: Utf8Bytes,
}

impl Delta {
    /// Builds a delta from a `sync_actions` row given as text columns (as pgoutput and
    /// `pg_sync.changes()` both provide them).
    pub fn from_columns(sync_id: i64, global: bool, col: impl Fn(&str) -> Option<String>) -> Delta {
        let parse = |name: &str| -> Value {
            col(name)
                .and_then(|t| serde_json::from_str(&t).ok())
                .unwrap_or(Value::Null)
        };
        let text = |name: &str| col(name).map(Value::String).unwrap_or(Value::Null);
        let model = col("model").unwrap_or_default();
        let group_id = col("group_id");
        let frame = json!({
            "type": "delta",
            "syncId": sync_id,
            "model": model,
            "modelId": text("model_id"),
            "action": text("action"),
            "data": parse("data"),
            "version": text("version"),
            "groupId": group_id,
            "prevGroupId": text("prev_group_id"),
            "moved": col("moved").as_deref() == Some("t") || col("moved").as_deref() == Some("true"),
            "clientId": text("client_id"),
            "clientTxId": text("client_tx_id"),
        })
        .to_string();
        Delta {
            sync_id,
            model,
            group_id,
            global,
            frame: frame.into(),
        }
    }
}
