//! Decoding of the pgoutput messages pg_sync needs: Relation, Insert, Update and Delete (text
//! format).
//! Begin and Commit arrive as events of the transport client; everything else is skipped.

use bytes::Buf;
use std::collections::HashMap;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("truncated pgoutput message")]
    Truncated,
    #[error("invalid utf-8 in pgoutput message")]
    Utf8,
    #[error("change for unknown relation {0}")]
    UnknownRelation(u32),
    #[error("unexpected tuple kind {0:?}")]
    TupleKind(u8),
    #[error("negative count or length {0} in pgoutput message")]
    Negative(i64),
}

#[derive(Debug)]
pub struct Relation {
    pub namespace: String,
    pub name: String,
    /// Shared with every decoded row (a row holds the list, not a copy of it).
    pub columns: Arc<[Arc<str>]>,
}

/// One column of a decoded tuple.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cell {
    Null,
    /// An unchanged TOAST value of an update: absent from the row.
    Unchanged,
    /// The value's text: `Row::text[start..end]`.
    Text(u32, u32),
}

/// A row in text format, by column (NULL as `None`); an unchanged TOAST value of an update is
/// absent. The values of one row share one string and the relation's column names: decoding a
/// row costs two allocations, not a map with a key and a string per column (that was about a
/// third of the worker's CPU draining a backlog).
#[derive(Debug, Clone)]
pub struct Row {
    columns: Arc<[Arc<str>]>,
    text: String,
    cells: Vec<Cell>,
}

impl Row {
    /// The column `name`: `None` when the row does not have it (unknown column, unchanged
    /// TOAST value), `Some(None)` for NULL.
    pub fn get(&self, name: &str) -> Option<Option<&str>> {
        let i = self.columns.iter().position(|c| &**c == name)?;
        match *self.cells.get(i)? {
            Cell::Null => Some(None),
            Cell::Unchanged => None,
            Cell::Text(start, end) => Some(Some(&self.text[start as usize..end as usize])),
        }
    }

    /// The column's text; `None` for NULL and for a column the row does not have.
    pub fn text(&self, name: &str) -> Option<&str> {
        self.get(name).flatten()
    }

    /// Whether the row has the column (an unchanged TOAST value is absent).
    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// `get` by the column's position (`Positions`).
    pub fn at(&self, i: Option<usize>) -> Option<Option<&str>> {
        match *self.cells.get(i?)? {
            Cell::Null => Some(None),
            Cell::Unchanged => None,
            Cell::Text(start, end) => Some(Some(&self.text[start as usize..end as usize])),
        }
    }
}

/// The positions of `N` named columns in a relation's rows, found once per relation (a `Row::get`
/// by name is a search through the column names; the tail reads ten columns of every action).
pub struct Positions<const N: usize> {
    names: [&'static str; N],
    /// The column list the positions were found in (a new Relation message makes a new one).
    columns: Option<Arc<[Arc<str>]>>,
    at: [Option<usize>; N],
}

impl<const N: usize> Positions<N> {
    pub fn new(names: [&'static str; N]) -> Self {
        Positions {
            names,
            columns: None,
            at: [None; N],
        }
    }

    /// The named columns of `row`, in the order given to `new`: what `row.get(name)` answers.
    pub fn get<'r>(&mut self, row: &'r Row) -> [Option<Option<&'r str>>; N] {
        if !self
            .columns
            .as_ref()
            .is_some_and(|c| Arc::ptr_eq(c, &row.columns))
        {
            self.at = self
                .names
                .map(|n| row.columns.iter().position(|c| &**c == n));
            self.columns = Some(row.columns.clone());
        }
        self.at.map(|i| row.at(i))
    }
}

#[derive(Debug)]
pub enum Message {
    Insert {
        relation: Arc<Relation>,
        row: Row,
    },
    /// An update: the old key when the key changed (or the old row with REPLICA IDENTITY
    /// FULL), and the new row.
    Update {
        relation: Arc<Relation>,
        old: Option<Row>,
        row: Row,
    },
    /// TRUNCATE of these relations (those this session knows).
    Truncate {
        relations: Vec<Arc<Relation>>,
    },
    Delete {
        relation: Arc<Relation>,
        key: Row,
    },
    Other,
}

/// Keeps the relation cache of one replication session.
#[derive(Default)]
pub struct Decoder {
    relations: HashMap<u32, Arc<Relation>>,
}

fn cstr(buf: &mut &[u8]) -> Result<String, DecodeError> {
    let end = buf
        .iter()
        .position(|b| *b == 0)
        .ok_or(DecodeError::Truncated)?;
    let s = std::str::from_utf8(&buf[..end])
        .map_err(|_| DecodeError::Utf8)?
        .to_owned();
    buf.advance(end + 1);
    Ok(s)
}

fn need(buf: &[u8], n: usize) -> Result<(), DecodeError> {
    if buf.len() < n {
        Err(DecodeError::Truncated)
    } else {
        Ok(())
    }
}

/// A count read from the stream: negative is an error, never a huge `usize`.
fn count(n: i64) -> Result<usize, DecodeError> {
    usize::try_from(n).map_err(|_| DecodeError::Negative(n))
}

fn tuple(buf: &mut &[u8], relation: &Relation) -> Result<Row, DecodeError> {
    need(buf, 2)?;
    let n = count(buf.get_i16().into())?;
    let mut cells = Vec::with_capacity(n.min(relation.columns.len()));
    // Sized for this row's values: they follow in the message (lengths and kinds aside).
    let mut text = String::with_capacity(buf.len());
    for i in 0..n {
        need(buf, 1)?;
        let kind = buf.get_u8();
        let cell = match kind {
            b'n' => Cell::Null,
            b'u' => Cell::Unchanged,
            b't' | b'b' => {
                need(buf, 4)?;
                let len = count(buf.get_i32().into())?;
                need(buf, len)?;
                let v = std::str::from_utf8(&buf[..len]).map_err(|_| DecodeError::Utf8)?;
                let start = text.len();
                // A column past the relation's is dropped below.
                if i < relation.columns.len() {
                    text.push_str(v);
                }
                let end = text.len();
                buf.advance(len);
                // A tuple is at most 1 GB: its offsets fit.
                Cell::Text(start as u32, end as u32)
            }
            other => return Err(DecodeError::TupleKind(other)),
        };
        if i < relation.columns.len() {
            cells.push(cell);
        }
    }
    Ok(Row {
        columns: relation.columns.clone(),
        text,
        cells,
    })
}

impl Decoder {
    fn relation(&self, oid: u32) -> Result<Arc<Relation>, DecodeError> {
        self.relations
            .get(&oid)
            .cloned()
            .ok_or(DecodeError::UnknownRelation(oid))
    }

    pub fn decode(&mut self, data: &[u8]) -> Result<Message, DecodeError> {
        let mut buf = data;
        need(buf, 1)?;
        let tag = buf.get_u8();
        match tag {
            b'R' => {
                need(buf, 4)?;
                let oid = buf.get_u32();
                let namespace = cstr(&mut buf)?;
                let name = cstr(&mut buf)?;
                need(buf, 3)?;
                let _replica_identity = buf.get_u8();
                let n = count(buf.get_i16().into())?;
                let mut columns: Vec<Arc<str>> = Vec::with_capacity(n.min(buf.len()));
                for _ in 0..n {
                    need(buf, 1)?;
                    let _flags = buf.get_u8();
                    columns.push(cstr(&mut buf)?.into());
                    need(buf, 8)?;
                    let _type = buf.get_u32();
                    let _typmod = buf.get_i32();
                }
                self.relations.insert(
                    oid,
                    Arc::new(Relation {
                        namespace,
                        name,
                        columns: columns.into(),
                    }),
                );
                Ok(Message::Other)
            }
            b'I' => {
                need(buf, 5)?;
                let oid = buf.get_u32();
                let relation = self.relation(oid)?;
                let _new = buf.get_u8();
                let row = tuple(&mut buf, &relation)?;
                Ok(Message::Insert { relation, row })
            }
            b'U' => {
                need(buf, 5)?;
                let oid = buf.get_u32();
                let relation = self.relation(oid)?;
                let mut kind = buf.get_u8();
                let mut old = None;
                if kind == b'K' || kind == b'O' {
                    old = Some(tuple(&mut buf, &relation)?);
                    need(buf, 1)?;
                    kind = buf.get_u8();
                }
                if kind != b'N' {
                    return Err(DecodeError::TupleKind(kind));
                }
                let row = tuple(&mut buf, &relation)?;
                Ok(Message::Update { relation, old, row })
            }
            b'T' => {
                need(buf, 5)?;
                let n = buf.get_u32() as usize;
                let _options = buf.get_u8();
                need(buf, n.saturating_mul(4))?;
                let relations = (0..n)
                    .filter_map(|_| self.relations.get(&buf.get_u32()).cloned())
                    .collect();
                Ok(Message::Truncate { relations })
            }
            b'D' => {
                need(buf, 5)?;
                let oid = buf.get_u32();
                let relation = self.relation(oid)?;
                let _kind = buf.get_u8();
                let key = tuple(&mut buf, &relation)?;
                Ok(Message::Delete { relation, key })
            }
            _ => Ok(Message::Other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    /// A relation message for `pg_sync.<table>` with text columns (`flags`: 1 a key column).
    fn relation(id: u32, table: &str, columns: &[impl AsRef<str>], flags: u8) -> Vec<u8> {
        let mut b = vec![b'R'];
        b.put_u32(id);
        b.extend_from_slice(format!("pg_sync\0{table}\0").as_bytes());
        b.put_u8(b'd');
        b.put_i16(columns.len() as i16);
        for name in columns {
            b.put_u8(flags);
            b.extend_from_slice(name.as_ref().as_bytes());
            b.put_u8(0);
            b.put_u32(25);
            b.put_i32(-1);
        }
        b
    }

    fn relation_msg() -> Vec<u8> {
        relation(42, "group_memberships", &["user_id", "group_id"], 1)
    }

    /// A tuple message up to its columns: `kind` (`I`, `U`, `D`), the relation id, the tuple's
    /// tag (`N` new, `K` key) and its column count.
    fn tuple_msg(kind: u8, relation: u32, tag: u8, columns: i16) -> Vec<u8> {
        let mut b = vec![kind];
        b.put_u32(relation);
        b.put_u8(tag);
        b.put_i16(columns);
        b
    }

    /// A text column value.
    fn put_text(b: &mut Vec<u8>, value: &[u8]) {
        b.put_u8(b't');
        b.put_i32(value.len() as i32);
        b.extend_from_slice(value);
    }

    #[test]
    fn decodes_relation_then_insert_and_delete() {
        let mut d = Decoder::default();
        assert!(matches!(d.decode(&relation_msg()).unwrap(), Message::Other));
        let mut ins = tuple_msg(b'I', 42, b'N', 2);
        put_text(&mut ins, b"alice");
        ins.put_u8(b'n');
        match d.decode(&ins).unwrap() {
            Message::Insert { relation, row } => {
                assert_eq!(relation.name, "group_memberships");
                assert_eq!(row.get("user_id"), Some(Some("alice")));
                assert_eq!(row.get("group_id"), Some(None));
                assert_eq!(row.get("nope"), None);
            }
            other => panic!("unexpected {other:?}"),
        }
        let mut del = tuple_msg(b'D', 42, b'K', 1);
        put_text(&mut del, b"x");
        assert!(matches!(d.decode(&del).unwrap(), Message::Delete { .. }));
    }

    #[test]
    fn rejects_truncated_and_unknown() {
        let mut d = Decoder::default();
        let msg = relation_msg();
        for cut in 1..msg.len() {
            assert!(d.decode(&msg[..cut]).is_err(), "cut at {cut}");
        }
        let ins = tuple_msg(b'I', 7, b'N', 0);
        assert!(matches!(
            d.decode(&ins),
            Err(DecodeError::UnknownRelation(7))
        ));
    }

    #[test]
    fn negative_counts_are_errors_not_panics() {
        let mut d = Decoder::default();
        // A relation with -1 columns.
        let mut rel = vec![b'R'];
        rel.put_u32(9);
        rel.extend_from_slice(b"pg_sync\0x\0");
        rel.put_u8(b'd');
        rel.put_i16(-1);
        assert!(matches!(d.decode(&rel), Err(DecodeError::Negative(-1))));
        d.decode(&relation_msg()).unwrap();
        // A tuple with -2 columns.
        let ins = tuple_msg(b'I', 42, b'N', -2);
        assert!(matches!(d.decode(&ins), Err(DecodeError::Negative(-2))));
        // A value with a negative length.
        let mut ins = tuple_msg(b'I', 42, b'N', 1);
        ins.put_u8(b't');
        ins.put_i32(-5);
        assert!(matches!(d.decode(&ins), Err(DecodeError::Negative(-5))));
    }

    #[test]
    fn updates_give_the_new_row_and_leave_unchanged_toast_out() {
        let mut d = Decoder::default();
        d.decode(&relation_msg()).unwrap();
        let mut upd = tuple_msg(b'U', 42, b'K', 1);
        put_text(&mut upd, b"old");
        upd.put_u8(b'N');
        upd.put_i16(2);
        upd.put_u8(b'u');
        upd.put_u8(b'n');
        match d.decode(&upd).unwrap() {
            Message::Update { row, old, .. } => {
                assert!(!row.contains("user_id"), "unchanged toast is absent");
                assert_eq!(row.get("group_id"), Some(None));
                assert_eq!(old.unwrap().text("user_id"), Some("old"));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    /// `Row::get` answers as c5ec34a's map did (column -> `Option<String>`, unchanged TOAST
    /// absent, columns past the relation's dropped), for tuples with fewer, as many and more
    /// cells than the relation has columns, of every kind, and across a relation message that
    /// changes the columns mid-stream (a row decoded before keeps the names it had).
    #[test]
    fn rows_answer_as_the_old_map_did() {
        let mut next = crate::test_seed::xorshift(0x9e37_79b9_7f4a_7c15);
        const VALUES: [&str; 5] = ["", "x", "é😀", "{\"a\": 1}", "\u{1}\"\\"];
        let mut d = Decoder::default();
        // The row as decoded, the old map of it, the relation's columns then.
        type Decoded = (Row, HashMap<String, Option<String>>, Vec<String>);
        let mut before: Option<Decoded> = None;
        // One resolver across every relation (as the tail keeps one for the session): it must
        // find the positions again whenever the relation changed, and answer as `get` does.
        const NAMES: [&str; 7] = ["id", "data", "", "a", "é", "nope", "ID"];
        let mut positions = Positions::new(NAMES);
        for _ in 0..2000 {
            let cols: Vec<String> = (0..next(5))
                .map(|i| ["id", "data", "", "a", "é"][(i + next(2)) as usize % 5].to_owned())
                .collect();
            // Postgres never sends a relation with two columns of one name.
            let mut cols = cols;
            cols.dedup();
            let mut seen = std::collections::HashSet::new();
            cols.retain(|c| seen.insert(c.clone()));
            d.decode(&relation(7, "sync_actions", &cols, 0)).unwrap();
            let n = next(7) as usize;
            let mut ins = tuple_msg(b'I', 7, b'N', n as i16);
            let mut old_map = HashMap::new();
            for i in 0..n {
                let value = match next(4) {
                    0 => {
                        ins.put_u8(b'n');
                        Some(None)
                    }
                    1 => {
                        ins.put_u8(b'u');
                        None
                    }
                    k => {
                        let v = VALUES[next(5) as usize];
                        ins.put_u8(if k == 2 { b't' } else { b'b' });
                        ins.put_i32(v.len() as i32);
                        ins.extend_from_slice(v.as_bytes());
                        Some(Some(v.to_owned()))
                    }
                };
                if let (Some(name), Some(value)) = (cols.get(i), value) {
                    old_map.insert(name.clone(), value);
                }
            }
            let Message::Insert { row, .. } = d.decode(&ins).unwrap() else {
                panic!("an insert");
            };
            let check = |row: &Row, map: &HashMap<String, Option<String>>, cols: &[String]| {
                for name in cols.iter().map(String::as_str).chain(["nope", "ID"]) {
                    let old = map.get(name).map(|v| v.as_deref());
                    assert_eq!(row.get(name), old, "{name:?} of {cols:?}");
                    assert_eq!(row.text(name), old.flatten());
                    assert_eq!(row.contains(name), old.is_some());
                }
            };
            check(&row, &old_map, &cols);
            if let Some((row, map, cols)) = &before {
                check(row, map, cols);
                let old = positions.get(row);
                assert_eq!(old, NAMES.map(|n| row.get(n)), "{cols:?} (a row before)");
            }
            for _ in 0..2 {
                let now = positions.get(&row);
                assert_eq!(now, NAMES.map(|n| row.get(n)), "{cols:?}");
            }
            before = Some((row, old_map, cols));
        }
    }

    #[test]
    fn truncate_names_its_relations() {
        let mut d = Decoder::default();
        d.decode(&relation_msg()).unwrap();
        let mut t = vec![b'T'];
        t.put_u32(2);
        t.put_u8(0);
        t.put_u32(42);
        t.put_u32(77);
        match d.decode(&t).unwrap() {
            Message::Truncate { relations } => {
                assert_eq!(relations.len(), 1);
                assert_eq!(relations[0].name, "group_memberships");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(d.decode(&t[..8]).is_err());
    }
}
