//! The bootstrap's queries: one registered model as the snapshot sees it, the keyset SELECT of
//! the rows a user may see (in key order, resumable after a key), and reading ids and keys
//! back from what was written.

use super::cursor::Key;
use crate::api::row_json::{self, Column};
use crate::store::quote_ident as quote;
use serde_json::value::RawValue;

/// One registered model as the snapshot sees it.
pub(super) struct Model {
    pub(super) name: String,
    table: String,
    group: Option<String>,
    key: Vec<String>,
    /// The columns clients see (all but the excluded ones), in table order.
    pub(super) columns: Vec<Column>,
    /// The column whose value is the model id, for a one-column key of a simple kind;
    /// otherwise the id is the first select-list item, made by `pg_sync.key_text`.
    id_column: Option<usize>,
}

impl Model {
    pub(super) fn new(
        name: String,
        table: String,
        group: Option<String>,
        key: Vec<String>,
        columns: Vec<Column>,
    ) -> Model {
        let id_column = match key.as_slice() {
            [k] => columns
                .iter()
                .position(|c| &c.name == k && c.kind.is_own_text()),
            _ => None,
        };
        Model {
            name,
            table,
            group,
            key,
            columns,
            id_column,
        }
    }

    /// Where the columns start in a selected row.
    pub(super) fn first_column(&self) -> usize {
        usize::from(self.id_column.is_none())
    }

    /// The rows of this model the user may see (`$1`: the user's groups), in key order, after
    /// `$2` (a key as jsonb, or NULL), and with `limited`, at most `$3`. (No LIMIT when none is
    /// asked for: a Limit node costs the backend about 30 ns a row, and the plan is the same.)
    pub(super) fn select(&self, after: bool, limited: bool) -> String {
        let key_cols = |prefix: &str| {
            self.key
                .iter()
                .map(|k| format!("{prefix}.{}", quote(k)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut items: Vec<String> = vec![];
        if self.id_column.is_none() {
            let parts = self
                .key
                .iter()
                // The log's ids: each key column's canonical text (independent of this session's
                // DateStyle, TimeZone, ...), as the capture trigger writes them.
                .map(|k| format!("pg_sync.canonical_text(t.{})", quote(k)))
                .collect::<Vec<_>>()
                .join(", ");
            items.push(format!("pg_sync.key_text(ARRAY[{parts}])::text"));
        }
        items.extend(self.columns.iter().map(|c| c.kind.expr(&quote(&c.name))));
        let group = match &self.group {
            Some(g) => crate::store::group_filter(
                g,
                self.columns
                    .iter()
                    .any(|c| &c.name == g && c.kind.is_own_text()),
            ),
            None => "$1::text[] IS NOT NULL".into(),
        };
        let (from, keyset) = if after {
            (
                format!(
                    ", jsonb_populate_record(NULL::{}, $2::text::jsonb) c",
                    self.table
                ),
                format!(" AND ({}) > ({})", key_cols("t"), key_cols("c")),
            )
        } else {
            (String::new(), " AND $2::text IS NULL".into())
        };
        format!(
            "SELECT {items}
               FROM {table} t{from}
              WHERE {group}{keyset}
              ORDER BY {order}{limit}",
            items = items.join(", "),
            table = self.table,
            order = key_cols("t"),
            limit = if limited {
                "\n              LIMIT $3"
            } else {
                ""
            },
        )
    }

    /// Writes the model id of a selected row as a JSON string.
    pub(super) fn write_id(&self, out: &mut Vec<u8>, row: &tokio_postgres::Row) {
        match self.id_column {
            Some(i) => row_json::write_own_text(out, self.columns[i].kind, row, i),
            // A key's text is never NULL.
            None => row_json::write_value(out, row_json::Kind::Text, row, 0),
        }
    }

    /// The key of a row (`{column: value}`), from its `data`. Only the key columns' values are
    /// read, as text (`Key`): the others are skipped without recursion, and so are the key's
    /// own values, so no value, however deeply nested (jsonb nests far deeper than
    /// serde_json's recursion limit), can make the key unreadable, and none (serde_json's
    /// private marker objects) is read as another. `Err` (a key column missing, or `data`
    /// not JSON) is never turned into some other key: a wrong cursor would skip rows.
    pub(super) fn key_of(&self, data: &[u8]) -> Result<Key, String> {
        let mut de = serde_json::Deserializer::from_slice(data);
        let key = serde::Deserializer::deserialize_map(&mut de, KeyColumns(&self.key))
            .and_then(|key| de.end().map(|()| key))
            .map_err(|e| format!("the key of a row of {} is unreadable: {e}", self.name))?;
        match self.key.iter().find(|k| !key.contains_key(*k)) {
            Some(k) => Err(format!(
                "a row of {} has no key column {k:?} in its data",
                self.name
            )),
            None => Ok(key),
        }
    }
}

/// Takes the key columns' members of a row's `data` object, each as its JSON text in the form
/// serde_json writes (`write_canonical`, without recursion), and skips the rest (`IgnoredAny`:
/// serde_json skips a value iteratively, at any depth).
struct KeyColumns<'k>(&'k [String]);

impl<'de> serde::de::Visitor<'de> for KeyColumns<'_> {
    type Value = Key;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a row's data object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut members: A,
    ) -> Result<Self::Value, A::Error> {
        use serde::de::Error as _;
        let mut key = Key::new();
        while let Some(name) = members.next_key::<String>()? {
            if self.0.contains(&name) {
                let raw: Box<RawValue> = members.next_value()?;
                let mut text = String::new();
                crate::delta::write_canonical(&mut text, raw.get(), false)
                    .ok_or_else(|| A::Error::custom("a key value is not JSON"))?;
                key.insert(name, RawValue::from_string(text).map_err(A::Error::custom)?);
            } else {
                members.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(key: Key) -> String {
        serde_json::to_string(&key).unwrap()
    }

    /// A key as a cursor carries it is the very bytes it was when keys were read as
    /// `serde_json::Value`s (cursors handed out then resume alike, and read back alike).
    #[test]
    fn keys_are_written_as_their_values_were() {
        let m = Model::new(
            "t".into(),
            "t".into(),
            None,
            vec!["k".into(), "a".into()],
            vec![
                Column::new("k".into(), 3802, false),
                Column::new("a".into(), 25, false),
            ],
        );
        for v in [
            "1.50",
            "-0",
            "1e5",
            "1.5E-3",
            "99999999999999999999999",
            r#""q\"\\ \/ \u00e9 \u001f \n é""#,
            "null",
            "true",
            r#"{"bb": {"z": 1, "a": [2, {"d": 3, "c": 4}]}, "a": "x", "a": "y"}"#,
            r#"[1, "2", {"": 3}]"#,
        ] {
            let data = format!(r#"{{"k": {v}, "x": 1, "a": "s"}}"#);
            let want: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(&format!(r#"{{"k": {v}, "a": "s"}}"#)).unwrap();
            let want = serde_json::to_string(&want).unwrap();
            assert_eq!(m.key_of(data.as_bytes()).map(text), Ok(want), "{v}");
        }
    }

    #[test]
    fn keyset_query_orders_and_resumes_by_the_whole_key() {
        let m = Model::new(
            "t".into(),
            "public.t".into(),
            Some("org".into()),
            vec!["a".into(), "b\"x".into()],
            vec![
                Column::new("a".into(), 23, false),
                Column::new("b\"x".into(), 25, false),
                Column::new("at".into(), 1184, false),
            ],
        );
        let q = m.select(true, true);
        assert!(q.ends_with("LIMIT $3"), "{q}");
        assert!(!m.select(true, false).contains("LIMIT"));
        assert!(q.starts_with(r#"SELECT pg_sync.key_text(ARRAY[pg_sync.canonical_text(t."a"), pg_sync.canonical_text(t."b""x")])::text, t."a", t."b""x"::text, to_jsonb(t."at")::text"#), "{q}");
        assert_eq!(m.first_column(), 1);
        let single = Model::new(
            "s".into(),
            "s".into(),
            None,
            vec!["id".into()],
            vec![Column::new("id".into(), 20, false)],
        );
        assert_eq!(single.id_column, Some(0), "an int8 key is its own id");
        assert!(
            single.select(false, true).starts_with("SELECT t.\"id\"\n"),
            "{}",
            single.select(false, true)
        );
        assert!(
            q.contains(r#"(t."a", t."b""x") > (c."a", c."b""x")"#),
            "{q}"
        );
        assert!(q.contains(r#"ORDER BY t."a", t."b""x""#), "{q}");
        assert_eq!(
            m.key_of(br#"{"a": 1, "b\"x": "z", "v": 3}"#).map(text),
            Ok(r#"{"a":1,"b\"x":"z"}"#.into())
        );
    }

    /// A row's other columns may nest deeper than serde_json parses (jsonb nests to thousands of
    /// levels); its key is read all the same. What cannot be read is an error, never a
    /// default key.
    #[test]
    fn the_key_is_read_past_values_of_any_depth() {
        let m = Model::new(
            "docs".into(),
            "docs".into(),
            None,
            vec!["id".into(), "at".into()],
            vec![
                Column::new("id".into(), 23, false),
                Column::new("doc".into(), 3802, false),
                Column::new("at".into(), 25, false),
            ],
        );
        let deep = |n| {
            format!(
                "{}1{}",
                "[{\"x\": \"]}\\\"\", \"y\": ".repeat(n),
                "}]".repeat(n)
            )
        };
        let data = format!(r#"{{"id": 7, "doc": {}, "at": "b\u0022"}}"#, deep(5_000));
        assert_eq!(
            m.key_of(data.as_bytes()).map(text),
            Ok(r#"{"at":"b\"","id":7}"#.into())
        );
        // A key past serde_json's recursion limit, and one it would read as a number.
        let deep_key = format!(r#"{{"id": 7, "at": {}}}"#, deep(200));
        let compact = deep(200).replace(": ", ":").replace(", ", ",");
        assert_eq!(
            m.key_of(deep_key.as_bytes()).map(text),
            Ok(format!(r#"{{"at":{compact},"id":7}}"#))
        );
        let marker = br#"{"id": 7, "at": {"$serde_json::private::Number": "5"}}"#;
        assert_eq!(
            m.key_of(marker).map(text),
            Ok(r#"{"at":{"$serde_json::private::Number":"5"},"id":7}"#.into())
        );
        let e = m.key_of(br#"{"id": 7, "doc": null}"#).unwrap_err();
        assert_eq!(e, r#"a row of docs has no key column "at" in its data"#);
        assert!(m.key_of(br#"{"id": 7, "at": 1"#).is_err());
    }
}
