//! The federation link's frames: JSON text frames tagged by `type`, in the order a link uses
//! them (challenge, auth, welcome, then either join/snapshot pages or straight to subscribe,
//! then batch/ack), plus `error`. See
//! docs/federation.md, "The link protocol".

use serde::{Deserialize, Serialize};

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
    /// for R (`changes` may be empty: the range still moves R's cursor).
    Batch {
        from: i64,
        to: i64,
        epoch: String,
        last_sync_id: i64,
        changes: serde_json::Value,
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
    /// S → R: rows of `pg_sync.peer_snapshot` (each `model`, `model_id`, `changes`); `done` when
    /// fewer than the limit came (the state is complete). Then R subscribes after W.
    SnapshotPage { rows: serde_json::Value, done: bool },
}

impl Frame {
    pub fn to_text(&self) -> String {
        serde_json::to_string(self).expect("frames serialize")
    }

    pub fn parse(text: &str) -> Result<Frame, serde_json::Error> {
        serde_json::from_str(text)
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
                changes: json!([{"sync_id": 4}]),
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
                rows: json!([]),
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
                // Numbers keep their text (arbitrary_precision): the receiver applies them as sent.
                assert_eq!(changes.to_string(), r#"[{"data":{"a":1.50},"sync_id":2}]"#);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unknown_types_and_fields_are_refused() {
        assert!(Frame::parse(r#"{"type":"nope"}"#).is_err());
        assert!(Frame::parse(r#"{"type":"ack","to":1,"extra":2}"#).is_err());
        assert!(Frame::parse(r#"{"type":"ack"}"#).is_err());
        assert!(Frame::parse("not json").is_err());
    }
}
