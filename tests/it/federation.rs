//! Federation in the extension across real databases: a relay (A→B→C, C fed only B's log)
//! converges also when B's merges change only row state (a raised tombstone, pending values),
//! which B must log for C to see them.

use pg_sync_tests::postgres::Client;
use pg_sync_tests::Cluster;

fn node(cluster: &Cluster, db: &str, node: &str) -> Client {
    let mut admin = cluster.connect("postgres");
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .unwrap();
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {db} SET pg_sync.node_id = '{node}'"
        ))
        .unwrap();
    let mut c = cluster.connect(db);
    c.batch_execute(
        "CREATE EXTENSION pg_sync;
         CREATE TABLE items (id int PRIMARY KEY, a text, b int, grp text);
         SELECT pg_sync.register_table('items', group_column => 'grp');",
    )
    .unwrap();
    c
}

fn last_id(c: &mut Client) -> i64 {
    c.query_one("SELECT coalesce(max(id), 0) FROM pg_sync.sync_actions", &[])
        .unwrap()
        .get(0)
}

/// Feeds `from`'s actions logged after `*mark` to `to`, in log order (as a link would), and
/// moves the mark.
fn relay(from: &mut Client, mark: &mut i64, to: &mut Client) {
    let text: String = from
        .query_one(
            "SELECT coalesce(jsonb_agg(to_jsonb(s) ORDER BY id), '[]')::text FROM pg_sync.sync_actions s WHERE id > $1",
            &[&*mark],
        )
        .unwrap()
        .get(0);
    *mark = last_id(from);
    to.execute("SELECT pg_sync.apply_remote($1::text::jsonb)", &[&text])
        .unwrap();
}

fn apply(c: &mut Client, change: &serde_json::Value) {
    c.execute(
        "SELECT pg_sync.apply_remote($1::text::jsonb)",
        &[&change.to_string()],
    )
    .unwrap();
}

fn state(c: &mut Client) -> (String, String) {
    let row = c
        .query_one(
            "SELECT (SELECT coalesce(jsonb_agg(to_jsonb(t) ORDER BY id), '[]')::text FROM items t),
                    (pg_sync.row_version_state('items', '1') - 'live')::text",
            &[],
        )
        .unwrap();
    (row.get(0), row.get(1))
}

#[test]
fn relay_forwards_state_only_merges() {
    let cluster = Cluster::start("relay", &[]);
    let mut a = node(&cluster, "relay_a", "node-a");
    let mut b = node(&cluster, "relay_b", "node-b");
    let mut c = node(&cluster, "relay_c", "node-c");
    let (mut a_mark, mut b_mark) = (0i64, 0i64);

    a.batch_execute("INSERT INTO items VALUES (1, 'a', 1, 'g')")
        .unwrap();
    relay(&mut a, &mut a_mark, &mut b);
    relay(&mut b, &mut b_mark, &mut c);
    a.batch_execute("DELETE FROM items WHERE id = 1").unwrap();
    relay(&mut a, &mut a_mark, &mut b);
    relay(&mut b, &mut b_mark, &mut c);

    // Versions of a fourth node x, above everything so far (B's clock has seen A's delete).
    let base: i64 = b.query_one("SELECT pg_sync.hlc_now()", &[]).unwrap().get(0);
    let v = |k: i64| format!("{:016x}@node-x", base + k);
    let change = |action: &str, version: String, data: serde_json::Value| {
        serde_json::json!({"model": "items", "model_id": "1", "action": action,
                           "version": version, "origin": "node-x", "data": data})
    };
    // Only B hears of a newer tombstone and of a column newer than it; C hears B.
    apply(&mut b, &change("D", v(10), serde_json::json!({"id": 1})));
    apply(
        &mut b,
        &change("U", v(30), serde_json::json!({"a": "late"})),
    );
    relay(&mut b, &mut b_mark, &mut c);
    assert_eq!(
        state(&mut b),
        state(&mut c),
        "C's state differs from B's after relaying B's log"
    );

    // An insert above the tombstone at 10 (and below the pending column at 30) reaches B and C
    // directly: both resurrect the row with the pending value.
    let insert = change(
        "I",
        v(20),
        serde_json::json!({"id": 1, "a": "ins", "b": 9, "grp": "g"}),
    );
    apply(&mut b, &insert);
    apply(&mut c, &insert);
    let (rows_b, state_b) = state(&mut b);
    assert!(
        rows_b.contains("\"late\""),
        "B resurrected without the pending value: {rows_b}"
    );
    assert_eq!((rows_b, state_b), state(&mut c), "B and C diverged");
    // Quiescence: relaying again changes nothing and logs nothing new on C.
    let before = last_id(&mut c);
    relay(&mut b, &mut b_mark, &mut c);
    assert_eq!(last_id(&mut c), before, "an echo grew C's log");
}
