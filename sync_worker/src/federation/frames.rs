//! The federation link's frames: JSON text frames tagged by `type`, in the order a link uses
//! them (challenge, auth, welcome, then either join/snapshot pages or straight to subscribe,
//! then batch/ack), plus `error`. See
//! docs/federation.md, "The link protocol". Row data (a batch's `changes`, a snapshot page's
//! `rows`) is carried as the JSON text it came in (`Raw`), never made a tree of: jsonb nests far
//! deeper than serde_json's recursion limit (128), and a link must carry any row Postgres holds.

use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// The link protocol version carried in `challenge`.
pub const PROTO: u32 = 1;

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Frame {
    /// S → R, first: S's node id and a fresh nonce (hex).
    Challenge {
        proto: u32,
        node_id: String,
        nonce: String,
    },
    /// R → S: R's node id, R's nonce and its MAC over both (see `auth::mac`).
    Auth {
        node_id: String,
        nonce: String,
        mac: String,
    },
    /// S → R: S's MAC (proves S holds the secret too), S's log epoch and last sync id.
    Welcome {
        mac: String,
        epoch: String,
        last_sync_id: i64,
        /// S's versions, wall clock and the models it sends R, for `pg_sync.test_peer`:
        /// `extension_version`, `worker_version`, `time_ms`, `models`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        info: Option<serde_json::Value>,
    },
    /// R → S: stream the log after `after`, at most `window` batches unacknowledged.
    Subscribe { after: i64, window: u32 },
    /// S → R: the sync ids `from+1 ..= to` of S's log (whole source transactions), filtered
    /// for R (`changes`, a JSON array, may be empty: the range still moves R's cursor).
    /// Parsed by `Frame::parse` (`BatchFrame`), not by the derived deserializer.
    #[serde(skip_deserializing)]
    Batch {
        from: i64,
        to: i64,
        epoch: String,
        last_sync_id: i64,
        changes: Raw,
    },
    /// R → S: everything up to `to` is applied and committed.
    Ack { to: i64 },
    /// Either side, before closing: a machine-readable code and a message.
    Error { code: String, message: String },
    /// R → S, instead of `subscribe`: R joins by snapshot (it is new, or must resync).
    /// `resume_w`: the W of R's join in progress, to resume it while S still holds its log.
    Join { resume_w: Option<i64> },
    /// S → R: the join's log position W (S holds its log after W for R), S's epoch and S's
    /// peer cursors, read together (`pg_sync.peer_join_start`).
    JoinStart {
        w: i64,
        epoch: String,
        cursors: serde_json::Value,
    },
    /// R → S: the next page of S's state after (`after_model`, `after_model_id`).
    Snapshot {
        after_model: String,
        after_model_id: String,
        limit: u32,
    },
    /// S → R: rows of `pg_sync.peer_snapshot` (each `model`, `model_id`, `changes`), a JSON
    /// array; `done` when fewer than the limit came (the state is complete). Then R subscribes
    /// after W. Parsed by `Frame::parse` (`SnapshotPageFrame`).
    #[serde(skip_deserializing)]
    SnapshotPage { rows: Raw, done: bool },
}

/// JSON text carried as it is: checked to be one JSON value (without recursion, so at any
/// depth), never parsed into a tree.
#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(transparent)]
pub struct Raw(Box<RawValue>);

impl Raw {
    /// `text` if it is one JSON value.
    pub fn new(text: String) -> Result<Raw, serde_json::Error> {
        RawValue::from_string(text).map(Raw)
    }

    pub fn get(&self) -> &str {
        self.0.get()
    }
}

impl PartialEq for Raw {
    fn eq(&self, other: &Raw) -> bool {
        self.get() == other.get()
    }
}

/// A frame's tag, read first (its other fields skipped without recursion).
#[derive(Deserialize)]
struct Tag<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
}

/// A `batch` frame as sent: row data raw. (The derived deserializer of an internally tagged
/// enum buffers every field as a tree first, which both caps the depth and refuses `RawValue`.)
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchFrame {
    #[serde(rename = "type")]
    _type: IgnoredAny,
    from: i64,
    to: i64,
    epoch: String,
    last_sync_id: i64,
    changes: Raw,
}

/// A `snapshot_page` frame as sent (see `BatchFrame`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotPageFrame {
    #[serde(rename = "type")]
    _type: IgnoredAny,
    rows: Raw,
    done: bool,
}

impl Frame {
    pub fn to_text(&self) -> String {
        serde_json::to_string(self).expect("frames serialize")
    }

    /// A frame from its text. The frames that carry row data are read with their rows raw, at
    /// any depth; the others (small, shallow) as the derived deserializer reads them.
    pub fn parse(text: &str) -> Result<Frame, serde_json::Error> {
        let tag: Tag = serde_json::from_str(text)?;
        Ok(match &*tag.kind {
            "batch" => {
                let f: BatchFrame = serde_json::from_str(text)?;
                Frame::Batch {
                    from: f.from,
                    to: f.to,
                    epoch: f.epoch,
                    last_sync_id: f.last_sync_id,
                    changes: f.changes,
                }
            }
            "snapshot_page" => {
                let f: SnapshotPageFrame = serde_json::from_str(text)?;
                Frame::SnapshotPage {
                    rows: f.rows,
                    done: f.done,
                }
            }
            _ => serde_json::from_str(text)?,
        })
    }
}

/// A `batch` frame around `changes`, a JSON array as the database rendered it (not parsed and
/// re-rendered on the sender's hot path).
pub fn batch_text(from: i64, to: i64, epoch: &str, last_sync_id: i64, changes: &str) -> String {
    format!(
        r#"{{"type":"batch","from":{from},"to":{to},"epoch":{},"last_sync_id":{last_sync_id},"changes":{changes}}}"#,
        serde_json::Value::from(epoch)
    )
}

/// WebSocket close codes of a federation link (4500-4599, apart from the client protocol's).
pub mod close {
    /// The MAC did not verify (wrong secret, or an unknown node).
    pub const AUTH_FAILED: u16 = 4501;
    /// Authenticated but refused: a self-link, a node id other than the pinned one, or a peer
    /// this node does not send to.
    pub const FORBIDDEN: u16 = 4502;
    /// A malformed or unexpected frame, or a handshake timeout.
    pub const PROTOCOL: u16 = 4503;
    /// The log the receiver needs is compacted: it must re-bootstrap.
    pub const RESYNC_REQUIRED: u16 = 4504;
    /// The peer was removed or disabled on this node.
    pub const PEER_GONE: u16 = 4505;
    /// This worker stands by: another worker runs federation for its database.
    pub const STANDBY: u16 = 4506;
    pub const GOING_AWAY: u16 = 1001;
    pub const INTERNAL: u16 = 1011;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn frames_round_trip_with_their_type_tag() {
        let frames = [
            Frame::Challenge {
                proto: PROTO,
                node_id: "a".into(),
                nonce: "00ff".into(),
            },
            Frame::Auth {
                node_id: "b".into(),
                nonce: "11".into(),
                mac: "ab".into(),
            },
            Frame::Welcome {
                mac: "cd".into(),
                epoch: "1.1.x".into(),
                last_sync_id: 9,
                info: None,
            },
            Frame::Welcome {
                mac: "cd".into(),
                epoch: "1.1.x".into(),
                last_sync_id: 9,
                info: Some(json!({"time_ms": 1, "models": ["m"]})),
            },
            Frame::Subscribe {
                after: 3,
                window: 8,
            },
            Frame::Batch {
                from: 3,
                to: 5,
                epoch: "1.1.x".into(),
                last_sync_id: 9,
                changes: Raw::new(r#"[{"sync_id":4}]"#.into()).unwrap(),
            },
            Frame::Ack { to: 5 },
            Frame::Error {
                code: "resync_required".into(),
                message: "compacted".into(),
            },
            Frame::Join { resume_w: Some(4) },
            Frame::Join { resume_w: None },
            Frame::JoinStart {
                w: 9,
                epoch: "1.1.x".into(),
                cursors: json!([{"node_id": "c", "epoch": "e", "last_sync_id": 3}]),
            },
            Frame::Snapshot {
                after_model: "m".into(),
                after_model_id: "k".into(),
                limit: 10,
            },
            Frame::SnapshotPage {
                rows: Raw::new("[]".into()).unwrap(),
                done: true,
            },
        ];
        for f in frames {
            let text = f.to_text();
            assert_eq!(Frame::parse(&text).unwrap(), f, "{text}");
        }
        assert_eq!(
            serde_json::to_value(Frame::Ack { to: 7 }).unwrap(),
            json!({"type": "ack", "to": 7})
        );
    }

    #[test]
    fn batch_text_is_a_batch_frame() {
        let t = batch_text(1, 4, "e\"1", 9, r#"[{"sync_id":2,"data":{"a":1.50}}]"#);
        match Frame::parse(&t).unwrap() {
            Frame::Batch {
                from,
                to,
                epoch,
                last_sync_id,
                changes,
            } => {
                assert_eq!((from, to, epoch.as_str(), last_sync_id), (1, 4, "e\"1", 9));
                // The text as sent (numbers too): the receiver applies it as it came.
                assert_eq!(changes.get(), r#"[{"sync_id":2,"data":{"a":1.50}}]"#);
            }
            other => panic!("{other:?}"),
        }
    }

    /// jsonb nests far deeper than serde_json makes trees of (128 levels): a batch or snapshot
    /// page carrying such a row parses all the same, its rows as sent.
    #[test]
    fn row_data_parses_at_any_depth() {
        for depth in [127, 128, 129, 300, 20_000] {
            let doc = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
            let changes = format!(r#"[{{"sync_id":2,"data":{{"doc":{doc}}}}}]"#);
            match Frame::parse(&batch_text(1, 2, "e", 2, &changes)) {
                Ok(Frame::Batch { changes: c, .. }) => assert_eq!(c.get(), changes, "{depth}"),
                other => panic!("depth {depth}: {other:?}"),
            }
            let page = format!(r#"{{"type":"snapshot_page","rows":{changes},"done":false}}"#);
            match Frame::parse(&page) {
                Ok(Frame::SnapshotPage { rows, done }) => {
                    assert_eq!((rows.get(), done), (changes.as_str(), false), "{depth}")
                }
                other => panic!("depth {depth}: {other:?}"),
            }
        }
        // Still one JSON value, and nothing else.
        assert!(Frame::parse(&batch_text(1, 2, "e", 2, "[[]")).is_err());
        assert!(Raw::new("[] []".into()).is_err());
    }

    #[test]
    fn unknown_types_and_fields_are_refused() {
        assert!(Frame::parse(r#"{"type":"nope"}"#).is_err());
        assert!(Frame::parse(r#"{"type":"ack","to":1,"extra":2}"#).is_err());
        assert!(Frame::parse(r#"{"type":"ack"}"#).is_err());
        let batch = r#"{"type":"batch","from":1,"to":2,"epoch":"e","last_sync_id":2,"changes":[]"#;
        assert!(Frame::parse(&format!("{batch}}}")).is_ok());
        assert!(Frame::parse(&format!(r#"{batch},"extra":1}}"#)).is_err());
        assert!(Frame::parse(r#"{"type":"batch","from":1,"changes":[]}"#).is_err());
        assert!(Frame::parse(r#"{"type":"snapshot_page","rows":[],"done":true,"x":0}"#).is_err());
        assert!(Frame::parse("not json").is_err());
    }
}
