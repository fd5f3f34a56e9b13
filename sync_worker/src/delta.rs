//! A sequenced change as clients see it: serialized once, shared by all its recipients.

use axum::extract::ws::Utf8Bytes;
use serde_json::Value;

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
        // Written straight into one string (no JSON tree but for `data`, which is normalized
        // through serde_json as before), keys in the order serde_json's map gives them, so the
        // frame is byte for byte what `json!(..).to_string()` made: this runs once per action
        // on the tail's hot path.
        fn put_str(out: &mut String, v: Option<&str>) {
            match v {
                Some(v) => out.push_str(&serde_json::to_string(v).unwrap_or_default()),
                None => out.push_str("null"),
            }
        }
        let model = col("model").unwrap_or_default();
        // '' is a grouped model's row without a group (nobody's): v1 shows it as null.
        let group_id = col("group_id").filter(|g| !g.is_empty());
        if model == MEMBERSHIP_MODEL {
            let joined = col("action").as_deref() == Some("J");
            let frame = serde_json::json!({
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
        let mut data = col("data")
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .unwrap_or(Value::Null);
        // The exact texts of a captured row (key '', docs/extension.md) are for `/v1/shape`:
        // v1 rows stay in `to_jsonb` form, as `/sync/bootstrap` sends them.
        if let Value::Object(m) = &mut data {
            m.remove("");
        }
        let moved = matches!(col("moved").as_deref(), Some("t") | Some("true"));
        let mut frame = String::with_capacity(256);
        frame.push_str("{\"action\":");
        put_str(&mut frame, col("action").as_deref());
        frame.push_str(",\"clientId\":");
        put_str(&mut frame, col("client_id").as_deref());
        frame.push_str(",\"clientTxId\":");
        put_str(&mut frame, col("client_tx_id").as_deref());
        frame.push_str(",\"data\":");
        frame.push_str(&data.to_string());
        frame.push_str(",\"groupId\":");
        put_str(&mut frame, group_id.as_deref());
        frame.push_str(",\"model\":");
        put_str(&mut frame, Some(&model));
        frame.push_str(",\"modelId\":");
        put_str(&mut frame, col("model_id").as_deref());
        frame.push_str(",\"moved\":");
        frame.push_str(if moved { "true" } else { "false" });
        frame.push_str(",\"prevGroupId\":");
        put_str(&mut frame, col("prev_group_id").as_deref());
        frame.push_str(",\"syncId\":");
        frame.push_str(&sync_id.to_string());
        frame.push_str(",\"type\":\"delta\",\"version\":");
        put_str(&mut frame, col("version").as_deref());
        frame.push('}');
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The frame is exactly what the JSON tree made before it was written by hand.
    #[test]
    fn frames_are_byte_for_byte_the_json_tree() {
        let cols = |c: &str| -> Option<String> {
            match c {
                "model" => Some("todos".into()),
                "model_id" => Some("4\"2".into()),
                "action" => Some("U".into()),
                "data" => Some(r#"{"z": 1.5, "a": [1, "x\u00e9\n"], "m": null}"#.into()),
                "version" => Some("7".into()),
                "group_id" => Some("p\\1".into()),
                "moved" => Some("t".into()),
                _ => None,
            }
        };
        let d = Delta::from_columns(42, false, cols);
        let want = json!({
            "type": "delta",
            "syncId": 42,
            "model": "todos",
            "modelId": "4\"2",
            "action": "U",
            "data": serde_json::from_str::<Value>(r#"{"z": 1.5, "a": [1, "x\u00e9\n"], "m": null}"#).unwrap(),
            "version": "7",
            "groupId": "p\\1",
            "prevGroupId": Value::Null,
            "moved": true,
            "clientId": Value::Null,
            "clientTxId": Value::Null,
        })
        .to_string();
        assert_eq!(d.frame.as_str(), want);
        let bad = Delta::from_columns(1, true, |c| (c == "data").then(|| "{".to_string()));
        assert!(bad.frame.as_str().contains("\"data\":null"));
        assert!(bad.frame.as_str().contains("\"moved\":false"));
    }

    /// A captured row's exact texts (key "") stay out of v1 frames.
    #[test]
    fn frames_drop_the_exact_texts() {
        let d = Delta::from_columns(1, true, |c| match c {
            "data" => {
                Some(r#"{"a": [1, 2], "j": null, "": {"a": "[2:3]={1,2}", "j": "null"}}"#.into())
            }
            _ => None,
        });
        assert!(
            d.frame.as_str().contains(r#""data":{"a":[1,2],"j":null},"#),
            "{}",
            d.frame
        );
    }
}
