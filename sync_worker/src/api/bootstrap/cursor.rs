//! The bootstrap cursor: where a bootstrap stands and what it covers, as the opaque,
//! URL-safe token of the protocol (and its parsing, which refuses anything tampered with).

use base64::Engine as _;
use serde::{Deserialize, Serialize};

const MAX_CURSOR_BYTES: usize = 16 * 1024;

/// A row's key: each key column's value as JSON text, in the form serde_json writes it
/// (`crate::delta::write_canonical`), ordered by column name. Held as text, not as a
/// `serde_json::Value`: a jsonb key may nest deeper than serde_json parses, or be an object
/// serde_json would read as something else (its private markers), and a cursor must resume
/// after that very key. For any other value the text is what the `Value` serialized to, so
/// cursors are the same bytes as when keys were `Value`s, and those still decode.
pub(super) type Key = std::collections::BTreeMap<String, Box<serde_json::value::RawValue>>;

/// Where a bootstrap stands, and what it covers: the opaque `cursor` of the protocol.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct Cursor {
    /// The sync id the bootstrap is consistent with: the client subscribes after it.
    #[serde(rename = "w")]
    pub(super) sync_id: i64,
    /// The model to go on with; rows of earlier models (by name) are done.
    #[serde(rename = "m")]
    pub(super) model: String,
    /// The key (`{column: value}`) of the last row sent of `model`; `None`: none sent yet.
    #[serde(rename = "k", default, skip_serializing_if = "Option::is_none")]
    pub(super) key: Option<Key>,
    /// The `models` filter of the request, if any.
    #[serde(rename = "f", default, skip_serializing_if = "Option::is_none")]
    pub(super) models: Option<Vec<String>>,
    /// The `groups` filter of the request, if any.
    #[serde(rename = "g", default, skip_serializing_if = "Option::is_none")]
    pub(super) groups: Option<Vec<String>>,
    /// The `limit` of the request, if any: the default for the next one.
    #[serde(rename = "l", default, skip_serializing_if = "Option::is_none")]
    pub(super) limit: Option<u64>,
    /// Whose bootstrap it is: rows before the position were that user's, so another user's
    /// cursor would skip rows of theirs.
    #[serde(rename = "u")]
    pub(super) user: String,
}

impl Cursor {
    pub(super) fn encode(&self) -> String {
        let json = serde_json::to_vec(self).expect("a cursor serializes");
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
    }

    pub(super) fn decode(s: &str) -> Option<Cursor> {
        if s.len() > MAX_CURSOR_BYTES {
            return None;
        }
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s)
            .ok()?;
        serde_json::from_slice::<Cursor>(&json)
            .ok()
            .filter(|c| c.sync_id >= 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_refuse_tampering() {
        let c = Cursor {
            sync_id: 42,
            model: "tasks".into(),
            key: Some(serde_json::from_str(r#"{"id": "a\"b", "n": 1.50}"#).unwrap()),
            models: Some(vec!["tasks".into()]),
            groups: None,
            limit: Some(10),
            user: "alice".into(),
        };
        let s = c.encode();
        assert!(s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        let back = Cursor::decode(&s).unwrap();
        assert_eq!(back.encode(), s);
        assert_eq!(back.key.unwrap()["n"].get(), "1.50");
        assert!(Cursor::decode("not a cursor").is_none());
        assert!(Cursor::decode("").is_none());
        let negative =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"w":-1,"m":"x","u":"a"}"#);
        assert!(Cursor::decode(&negative).is_none());
        assert!(Cursor::decode(&"A".repeat(MAX_CURSOR_BYTES + 4)).is_none());
    }
}
