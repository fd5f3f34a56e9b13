//! The LWW merge, as a pure function of a row's state and one incoming change.
//!
//! A row's state is a set of LWW registers:
//! - `created`: the highest version of a whole-row insert;
//! - `deleted`: the highest version of a delete (the tombstone);
//! - one register per column: the value of the highest-versioned write to it.
//!
//! The row is live iff `created > deleted`. An insert writes every column at its version, and so
//! does a delete (with no value), so a column's effective version is
//! `max(versions[c], created, deleted)` and `versions` keeps only entries above
//! `max(created, deleted)`: that canonical form makes equal histories give byte-equal states.
//! While the row is not live, values of columns newer than the tombstone wait in `pending`, so a
//! later insert that resurrects the row merges with them exactly as if they had arrived after it.
//!
//! Each register merges by `max`, so the merge is idempotent, commutative and associative: any
//! node may apply any change, any number of times, in any order.

use crate::version::cmp_text;
use serde_json::{Map, Value};
use std::cmp::Ordering;
use std::collections::BTreeMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Whole-row insert: raises `created`, writes its columns.
    Insert,
    /// Column writes only (an update, or the insert half of a group move).
    Columns,
    /// Tombstone: raises `deleted`.
    Delete,
    /// The delete half of a group move: nothing for peers to do.
    Ignore,
}

#[derive(Clone, Debug)]
pub struct Change {
    pub kind: Kind,
    pub version: String,
    /// column -> (value, version)
    pub columns: BTreeMap<String, (Value, String)>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct State {
    pub created: Option<String>,
    pub deleted: Option<String>,
    pub versions: BTreeMap<String, String>,
    pub pending: Map<String, Value>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Dml {
    None,
    /// Insert the whole row (without key columns; the caller adds them).
    Insert(Map<String, Value>),
    /// Update these columns.
    Update(Map<String, Value>),
    Delete,
}

#[derive(Clone, Debug)]
pub struct Outcome {
    pub state: State,
    pub dml: Dml,
    /// Columns that won, with their versions.
    pub won: BTreeMap<String, String>,
    pub created_won: bool,
    pub deleted_won: bool,
}

impl Outcome {
    /// Whether anything about the row changed.
    pub fn changed(&self) -> bool {
        !self.won.is_empty() || self.created_won || self.deleted_won
    }
}

pub fn gt(a: &str, b: &str) -> bool {
    cmp_text(a, b) == Ordering::Greater
}

fn max_opt(a: Option<&str>, b: Option<&str>) -> Option<String> {
    match (a, b) {
        (Some(x), Some(y)) => Some(if gt(y, x) { y } else { x }.to_owned()),
        (x, y) => x.or(y).map(str::to_owned),
    }
}

pub fn is_live(created: Option<&str>, deleted: Option<&str>) -> bool {
    match (created, deleted) {
        (Some(c), Some(d)) => gt(c, d),
        (Some(_), None) => true,
        (None, _) => false,
    }
}

impl State {
    pub fn live(&self) -> bool {
        is_live(self.created.as_deref(), self.deleted.as_deref())
    }

    fn base(&self) -> String {
        max_opt(self.created.as_deref(), self.deleted.as_deref()).unwrap_or_default()
    }

    /// The version of the write that currently owns column `c`.
    pub fn effective(&self, c: &str) -> String {
        let base = self.base();
        match self.versions.get(c) {
            Some(v) if gt(v, &base) => v.clone(),
            _ => base,
        }
    }

    /// The highest version this row has seen.
    pub fn max_version(&self) -> String {
        let base = self.base();
        self.versions
            .values()
            .fold(base, |m, v| if gt(v, &m) { v.clone() } else { m })
    }
}

/// Merges `change` into `state`. `current` is the table's row while the row is live.
pub fn merge(state: &State, current: Option<&Map<String, Value>>, change: &Change) -> Outcome {
    let was_live = state.live();
    let mut next = state.clone();
    let mut created_won = false;
    let mut deleted_won = false;
    match change.kind {
        Kind::Insert => {
            if next
                .created
                .as_deref()
                .is_none_or(|c| gt(&change.version, c))
            {
                next.created = Some(change.version.clone());
                created_won = true;
            }
        }
        Kind::Delete => {
            if next
                .deleted
                .as_deref()
                .is_none_or(|d| gt(&change.version, d))
            {
                next.deleted = Some(change.version.clone());
                deleted_won = true;
            }
        }
        Kind::Columns | Kind::Ignore => {}
    }
    let mut won = BTreeMap::new();
    let mut won_values = Map::new();
    if change.kind != Kind::Ignore {
        for (col, (value, version)) in &change.columns {
            if gt(version, &state.effective(col)) {
                next.versions.insert(col.clone(), version.clone());
                won.insert(col.clone(), version.clone());
                won_values.insert(col.clone(), value.clone());
            }
        }
    }
    // Canonical form: only entries above max(created, deleted).
    let base = next.base();
    next.versions.retain(|_, v| gt(v, &base));
    let now_live = next.live();

    let dml = match (was_live, now_live) {
        (true, true) if won_values.is_empty() => Dml::None,
        (true, true) => Dml::Update(won_values.clone()),
        (true, false) => Dml::Delete,
        (false, true) => {
            let mut row = state.pending.clone();
            row.extend(won_values.clone());
            Dml::Insert(row)
        }
        (false, false) => Dml::None,
    };
    next.pending = if now_live {
        Map::new()
    } else {
        // Values of columns that outlive the tombstone wait here for a resurrecting insert.
        next.versions
            .keys()
            .filter_map(|c| {
                let value = won_values
                    .get(c)
                    .or_else(|| state.pending.get(c))
                    .or_else(|| {
                        if was_live {
                            current.and_then(|r| r.get(c))
                        } else {
                            None
                        }
                    })?;
                Some((c.clone(), value.clone()))
            })
            .collect()
    };
    Outcome {
        state: next,
        dml,
        won,
        created_won,
        deleted_won,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::version::Version;

    fn v(hlc: u64, node: &str) -> String {
        Version::new(hlc, node).to_string()
    }

    fn change(kind: Kind, version: &str, cols: &[(&str, i64)]) -> Change {
        Change {
            kind,
            version: version.to_owned(),
            columns: cols
                .iter()
                .map(|(c, x)| (c.to_string(), (Value::from(*x), version.to_owned())))
                .collect(),
        }
    }

    /// A node: the row state plus the table row, driven the way apply_remote drives them.
    #[derive(Clone, Default, Debug, PartialEq)]
    struct Node {
        state: State,
        row: Option<Map<String, Value>>,
    }

    impl Node {
        fn apply(&mut self, c: &Change) {
            let out = merge(&self.state, self.row.as_ref(), c);
            match out.dml {
                Dml::None => {}
                Dml::Insert(r) => self.row = Some(r),
                Dml::Update(cols) => self.row.as_mut().expect("live row").extend(cols),
                Dml::Delete => self.row = None,
            }
            self.state = out.state;
            assert_eq!(self.row.is_some(), self.state.live());
        }
    }

    #[test]
    fn newer_wins_ties_by_node_and_reapply_is_noop() {
        let mut n = Node::default();
        n.apply(&change(Kind::Insert, &v(1, "a"), &[("x", 1), ("y", 1)]));
        n.apply(&change(Kind::Columns, &v(5, "a"), &[("x", 2)]));
        n.apply(&change(Kind::Columns, &v(5, "b"), &[("x", 3)]));
        n.apply(&change(Kind::Columns, &v(4, "z"), &[("x", 9), ("y", 4)]));
        let row = n.row.clone().unwrap();
        assert_eq!(row["x"], Value::from(3));
        assert_eq!(row["y"], Value::from(4));
        let before = n.clone();
        n.apply(&change(Kind::Columns, &v(5, "b"), &[("x", 3)]));
        assert_eq!(n, before);
    }

    #[test]
    fn older_update_does_not_resurrect_newer_insert_does() {
        let mut n = Node::default();
        n.apply(&change(Kind::Insert, &v(1, "a"), &[("x", 1)]));
        n.apply(&change(Kind::Delete, &v(3, "a"), &[]));
        n.apply(&change(Kind::Columns, &v(2, "b"), &[("x", 5)]));
        assert!(n.row.is_none());
        n.apply(&change(Kind::Insert, &v(2, "b"), &[("x", 6)]));
        assert!(
            n.row.is_none(),
            "an insert older than the tombstone stays dead"
        );
        n.apply(&change(Kind::Insert, &v(4, "b"), &[("x", 7)]));
        assert_eq!(n.row.unwrap()["x"], Value::from(7));
    }

    #[test]
    fn column_newer_than_tombstone_survives_resurrection() {
        // delete@3 races an update x@5; an insert@4 resurrects: x must come from the update.
        let orders: [[usize; 4]; 4] = [[0, 1, 2, 3], [0, 2, 1, 3], [0, 3, 2, 1], [0, 2, 3, 1]];
        let changes = [
            change(Kind::Insert, &v(1, "a"), &[("x", 1), ("y", 1)]),
            change(Kind::Delete, &v(3, "a"), &[]),
            change(Kind::Columns, &v(5, "b"), &[("x", 5)]),
            change(Kind::Insert, &v(4, "c"), &[("x", 4), ("y", 4)]),
        ];
        let mut results = vec![];
        for order in orders {
            let mut n = Node::default();
            for i in order {
                n.apply(&changes[i]);
            }
            results.push(n);
        }
        for r in &results {
            assert_eq!(r, &results[0]);
        }
        let row = results[0].row.clone().unwrap();
        assert_eq!(
            (row["x"].clone(), row["y"].clone()),
            (Value::from(5), Value::from(4))
        );
    }

    /// Random histories over one row, applied in random orders with duplicates, converge.
    #[test]
    fn converges_in_any_order_with_duplicates() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let nodes = ["a", "b", "c"];
        let cols = ["x", "y", "z"];
        for _ in 0..500 {
            let mut changes = vec![];
            for i in 0..(2 + rnd(8)) {
                let version = v(1 + rnd(6) * 3 + i % 2, nodes[rnd(3) as usize]);
                let kind = match rnd(4) {
                    0 => Kind::Insert,
                    1 => Kind::Delete,
                    _ => Kind::Columns,
                };
                let picked: Vec<(&str, i64)> = match kind {
                    Kind::Insert => cols.iter().map(|c| (*c, rnd(100) as i64)).collect(),
                    Kind::Delete => vec![],
                    _ => vec![(cols[rnd(3) as usize], rnd(100) as i64)],
                };
                let mut c = change(kind, &version, &picked);
                // Same version, same writer: same content (a version identifies one write).
                if let Some(prev) = changes.iter().find(|p: &&Change| p.version == version) {
                    c = prev.clone();
                }
                changes.push(c);
            }
            let mut reference: Option<Node> = None;
            for _ in 0..6 {
                let mut order: Vec<usize> = (0..changes.len()).collect();
                for i in (1..order.len()).rev() {
                    order.swap(i, rnd(i as u64 + 1) as usize);
                }
                for _ in 0..rnd(3) {
                    order.push(rnd(changes.len() as u64) as usize);
                }
                let mut n = Node::default();
                for i in order {
                    n.apply(&changes[i]);
                }
                match &reference {
                    None => reference = Some(n),
                    Some(r) => assert_eq!(
                        (
                            &r.row,
                            &r.state.created,
                            &r.state.deleted,
                            &r.state.versions
                        ),
                        (
                            &n.row,
                            &n.state.created,
                            &n.state.deleted,
                            &n.state.versions
                        ),
                        "histories diverged: {changes:?}"
                    ),
                }
            }
        }
    }
}
