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
    /// The protocol v1 `delta` frame (reference-counted: recipients share the bytes); for a
    /// membership change, its `membership` frame.
    pub frame: Utf8Bytes,
    /// A membership change (an action of `MEMBERSHIP_MODEL`): the user who joined or left
    /// `group_id`. Only that user's streams carry it.
    pub member: Option<Member>,
}

/// The reserved model of membership actions in the log (`pg_sync.log_membership()`).
pub const MEMBERSHIP_MODEL: &str = "$membership";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub user_id: String,
    pub joined: bool,
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
        // '' is a grouped model's row without a group (nobody's): v1 shows it as null.
        let group_id = col("group_id").filter(|g| !g.is_empty());
        if model == MEMBERSHIP_MODEL {
            let joined = col("action").as_deref() == Some("J");
            let frame = json!({
                "type": "membership",
                "groupId": group_id,
                "joined": joined,
                "syncId": sync_id,
            })
            .to_string();
            return Delta {
                sync_id,
                model,
                group_id,
                global: false,
                frame: frame.into(),
                member: Some(Member {
                    user_id: col("model_id").unwrap_or_default(),
                    joined,
                }),
            };
        }
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
            member: None,
        }
    }
}
