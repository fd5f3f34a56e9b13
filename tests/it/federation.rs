//! Federation in the extension across real databases: a relay (A→B→C, C fed only B's log)
//! converges also when B's merges change only row state (a raised tombstone, pending values),
//! which B must log for C to see them; and a mesh linked through the peer functions the worker
//! uses (peer_changes, apply_peer_batch) converges.

use pg_sync_tests::postgres::Client;
use pg_sync_tests::{Cluster, Rng};

fn node(cluster: &Cluster, db: &str, node: &str) -> Client {
    cluster.create_node_db(
        db,
        node,
        "CREATE TABLE items (id int PRIMARY KEY, a text, b int, grp text);
         SELECT pg_sync.register_table('items', group_column => 'grp');",
    )
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

/// An insert from another node that wins over a live row and moves it to another group: the
/// relay must log it as an insert (not only the moved pair, which peers merge as column
/// writes), or C keeps the older `created` and a delete between the two versions later removes
/// the row on C alone. (Found by sync_worker/tests/federation_chaos.rs, relay chain.)
#[test]
fn relay_forwards_an_insert_that_moves_a_live_row() {
    let cluster = Cluster::start("relay_move", &[]);
    let mut b = node(&cluster, "move_b", "node-b");
    let mut c = node(&cluster, "move_c", "node-c");
    let (mut b_mark, mut c_mark) = (0i64, 0i64);
    b.batch_execute("INSERT INTO items VALUES (1, 'b', 1, 'g1')")
        .unwrap();
    relay(&mut b, &mut b_mark, &mut c);
    relay(&mut c, &mut c_mark, &mut b);
    let base: i64 = b.query_one("SELECT pg_sync.hlc_now()", &[]).unwrap().get(0);
    let v = |k: i64| format!("{:016x}@node-x", base + k);
    // Node x re-inserted the row (it had deleted it) in group g2; only B hears of it.
    apply(
        &mut b,
        &serde_json::json!({"model": "items", "model_id": "1", "action": "I", "version": v(10),
                            "origin": "node-x", "data": {"id": 1, "a": "x", "b": 2, "grp": "g2"}}),
    );
    relay(&mut b, &mut b_mark, &mut c);
    assert_eq!(state(&mut b), state(&mut c), "C's state differs from B's");
    // A delete between the two inserts (from node y) leaves the row on both.
    let delete = serde_json::json!({"model": "items", "model_id": "1", "action": "D",
                                    "version": v(5), "origin": "node-y", "data": {"id": 1}});
    apply(&mut b, &delete);
    apply(&mut c, &delete);
    assert_eq!(
        state(&mut b),
        state(&mut c),
        "B and C diverged after the delete"
    );
    assert!(state(&mut c).0.contains("\"x\""), "the row is gone on C");
}

/// A change too far ahead is refused (22008), but once applied (with a larger allowed skew, as
/// `retry_quarantined` under a raised setting does) its echo from a peer is a no-op, not a
/// refusal: otherwise every relay parks a copy of a change this node already holds.
#[test]
fn an_echo_of_an_accepted_future_change_is_not_refused() {
    let cluster = Cluster::start("skew_echo", &[]);
    let mut b = node(&cluster, "skew_b", "node-b");
    let base: i64 = b.query_one("SELECT pg_sync.hlc_now()", &[]).unwrap().get(0);
    let ahead = base as u64 + ((10 * 60 * 1000u64) << 16);
    let change = serde_json::json!({"model": "items", "model_id": "1", "action": "I",
        "version": format!("{ahead:016x}@node-x"), "origin": "node-x",
        "data": {"id": 1, "a": "f", "b": 1, "grp": "g"}});
    let refused = b
        .execute(
            "SELECT pg_sync.apply_remote($1::text::jsonb)",
            &[&change.to_string()],
        )
        .unwrap_err();
    assert_eq!(refused.code().map(|c| c.code()), Some("22008"));
    b.batch_execute("SET pg_sync.max_clock_skew = '1h'")
        .unwrap();
    apply(&mut b, &change);
    b.batch_execute("RESET pg_sync.max_clock_skew").unwrap();
    let n: i64 = b
        .query_one(
            "SELECT pg_sync.apply_remote($1::text::jsonb)",
            &[&change.to_string()],
        )
        .unwrap_or_else(|e| panic!("the echo was refused: {e}"))
        .get(0);
    assert_eq!(n, 0);
}

/// xorshift: reproducible randomness without a dependency.
const MESH: [&str; 3] = ["mesh-a", "mesh-b", "mesh-c"];

/// Sequences the committed, unsequenced transactions of a node's log, as the worker's
/// sequencer does.
fn sequence(c: &mut Client) {
    c.batch_execute(
        "INSERT INTO pg_sync.commit_order (xid, first_sync_id, action_count, commit_lsn, committed_at)
         SELECT xid, pg_sync.last_sync_id() + sum(n) OVER (ORDER BY first_id) - n + 1, n, '0/0', now()
           FROM (SELECT a.xid, min(a.id) AS first_id, count(*)::int AS n FROM pg_sync.sync_actions a
                  WHERE a.xid NOT IN (SELECT xid FROM pg_sync.commit_order) GROUP BY a.xid) s",
    )
    .unwrap();
}

/// One pull of the link from `nodes[s]` to `nodes[r]`, as the worker would run it: the
/// receiver's cursor, the sender's filtered log up to a batch end (whole source transactions,
/// small batches so several are needed), one apply_peer_batch.
/// Returns whether the receiver's cursor moved.
fn pump(nodes: &mut [Client], s: usize, r: usize) -> bool {
    let cursor: i64 = nodes[r]
        .query_one(
            "SELECT coalesce((SELECT last_sync_id FROM pg_sync.peer_cursors WHERE peer_node_id = $1), 0)",
            &[&MESH[s]],
        )
        .unwrap()
        .get(0);
    sequence(&mut nodes[s]);
    let row = nodes[s]
        .query_one(
            "SELECT e, pg_sync.epoch(),
                    (SELECT coalesce(jsonb_agg(to_jsonb(c) ORDER BY c.sync_id), '[]')::text
                       FROM pg_sync.peer_changes($1, $2, (e - $2)::int) c)
               FROM pg_sync.batch_end($2, 7) e",
            &[&MESH[r], &cursor],
        )
        .unwrap();
    let (last, epoch, changes): (i64, String, String) = (row.get(0), row.get(1), row.get(2));
    if last <= cursor {
        return false;
    }
    let status: String = nodes[r]
        .query_one(
            "SELECT pg_sync.apply_peer_batch($1, $2, $3, $4, $5::text::jsonb) ->> 'status'",
            &[&MESH[s], &epoch, &cursor, &last, &changes],
        )
        .unwrap()
        .get(0);
    assert_eq!(status, "applied");
    true
}

/// The three MESH nodes (databases `{prefix}_a`, `_b`, `_c` in one cluster), each a pinned
/// peer of the other two; the links are driven by hand (`peer_changes`, `apply_peer_batch`),
/// so the URLs lead nowhere.
fn mesh_nodes(cluster: &Cluster, prefix: &str) -> Vec<Client> {
    let mut nodes: Vec<Client> = MESH
        .iter()
        .map(|n| node(cluster, &format!("{prefix}_{}", &n[5..]), n))
        .collect();
    for (i, c) in nodes.iter_mut().enumerate() {
        for (j, other) in MESH.iter().enumerate() {
            if i != j {
                c.execute(
                    "SELECT pg_sync.add_peer($1, 'ws://127.0.0.1:1', 'a-secret-of-16-chars'),
                            pg_sync.pin_peer($1, $1)",
                    &[other],
                )
                .unwrap();
            }
        }
    }
    nodes
}

fn mesh_writes(c: &mut Client, rng: &mut Rng, n: usize) {
    for _ in 0..n {
        let id = rng.below(10) as i32;
        let v = rng.below(1000) as i32;
        let sql = match rng.below(6) {
            0 | 1 => format!(
                "INSERT INTO items VALUES ({id}, 'a{v}', {v}, 'g{}') ON CONFLICT (id) DO NOTHING",
                v % 3
            ),
            2 => format!("UPDATE items SET a = 'u{v}' WHERE id = {id}"),
            3 => format!("UPDATE items SET b = {v} WHERE id = {id}"),
            4 => format!("UPDATE items SET grp = 'g{}' WHERE id = {id}", v % 3),
            _ => format!("DELETE FROM items WHERE id = {id}"),
        };
        c.batch_execute(&sql).unwrap();
    }
}

fn mesh_snapshot(c: &mut Client) -> (String, String) {
    let row = c
        .query_one(
            "SELECT (SELECT coalesce(jsonb_agg(to_jsonb(t) ORDER BY id), '[]')::text FROM items t),
                    (SELECT jsonb_agg(pg_sync.row_version_state('items', g::text) ORDER BY g)::text
                       FROM generate_series(0, 9) g)",
            &[],
        )
        .unwrap();
    (row.get(0), row.get(1))
}

/// How many actions the node logged more than once. One write's registers may arrive apart (a
/// group move's I brings its columns, the original insert later raises `created`), so one
/// version can head two different actions; the same action twice is a duplicate.
fn actions_logged_twice(c: &mut Client) -> i64 {
    c.query_one(
        "SELECT count(*) FROM (SELECT 1 FROM pg_sync.sync_actions
           GROUP BY model_id, action, moved, version, data, versions HAVING count(*) > 1) d",
        &[],
    )
    .unwrap()
    .get(0)
}

/// Three nodes linked through add_peer / peer_changes / apply_peer_batch: with the A–C links
/// down for a while (everything relayed by B) and then a full mesh, all converge, no action is
/// logged twice on a node, and after quiescence no log grows.
#[test]
fn mesh_through_peer_functions_converges() {
    let cluster = Cluster::start("mesh", &[]);
    for seed in [11u64, 4242, 5] {
        let mut nodes = mesh_nodes(&cluster, &format!("mesh_{seed}"));
        let mut rng = Rng(seed);
        for round in 0..6 {
            for c in nodes.iter_mut() {
                mesh_writes(c, &mut rng, 15);
            }
            // Rounds 0..3: A–C down, the other links pull at random.
            for _ in 0..4 {
                let (s, r) = (rng.below(3) as usize, rng.below(3) as usize);
                if s != r && (round >= 3 || s + r != 2) {
                    pump(&mut nodes, s, r);
                }
            }
        }
        // Quiescence: pull every link until none moves; first with A–C still down.
        for ac_up in [false, true] {
            for _ in 0..20 {
                let mut moved = false;
                for s in 0..3 {
                    for r in 0..3 {
                        if s != r && (ac_up || s + r != 2) {
                            moved |= pump(&mut nodes, s, r);
                        }
                    }
                }
                if !moved {
                    break;
                }
            }
        }
        let snaps: Vec<(String, String)> = nodes.iter_mut().map(mesh_snapshot).collect();
        for (i, s) in snaps.iter().enumerate().skip(1) {
            assert_eq!(s.0, snaps[0].0, "seed {seed}: rows of {} differ", MESH[i]);
            assert_eq!(s.1, snaps[0].1, "seed {seed}: states of {} differ", MESH[i]);
        }
        for (i, c) in nodes.iter_mut().enumerate() {
            let twice = actions_logged_twice(c);
            if twice > 0 {
                let dump: String = c
                    .query_one(
                        "SELECT jsonb_agg(to_jsonb(s) - 'xid' - 'created_at' ORDER BY id)::text FROM pg_sync.sync_actions s
                          WHERE version IN (SELECT version FROM pg_sync.sync_actions
                                             GROUP BY model_id, action, moved, version, data, versions
                                             HAVING count(*) > 1)",
                        &[],
                    )
                    .unwrap()
                    .get(0);
                panic!("seed {seed}: {} logged an action twice: {dump}", MESH[i]);
            }
            let parked: i64 = c
                .query_one("SELECT count(*) FROM pg_sync.peer_quarantine", &[])
                .unwrap()
                .get(0);
            assert_eq!(parked, 0, "seed {seed}: {} quarantined changes", MESH[i]);
        }
        let before: Vec<i64> = nodes.iter_mut().map(last_id).collect();
        for s in 0..3 {
            for r in 0..3 {
                if s != r {
                    pump(&mut nodes, s, r);
                }
            }
        }
        let after: Vec<i64> = nodes.iter_mut().map(last_id).collect();
        assert_eq!(before, after, "seed {seed}: a log grew after quiescence");
    }
}

/// Pulls every link among `nodes` (all pairs, or those `up` allows) until none moves.
fn quiesce(nodes: &mut [Client], up: impl Fn(usize, usize) -> bool) {
    for _ in 0..50 {
        let mut moved = false;
        for s in 0..nodes.len() {
            for r in 0..nodes.len() {
                if s != r && up(s, r) {
                    moved |= pump(nodes, s, r);
                }
            }
        }
        if !moved {
            return;
        }
    }
    panic!("the mesh did not quiesce");
}

fn json(
    c: &mut Client,
    sql: &str,
    params: &[&(dyn pg_sync_tests::postgres::types::ToSql + Sync)],
) -> serde_json::Value {
    let text: String = c
        .query_one(&format!("SELECT ({sql})::text"), params)
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0);
    serde_json::from_str(&text).unwrap()
}

/// One snapshot page from `nodes[s]` to `nodes[r]` (the receiver's join position, a page of
/// `lim` rows, apply_peer_snapshot), as the worker runs it. Returns whether the state is done.
fn snapshot_page(nodes: &mut [Client], s: usize, r: usize, w: i64, lim: i32) -> bool {
    let pos = json(
        &mut nodes[r],
        "SELECT jsonb_build_object('m', after_model, 'id', after_model_id) FROM pg_sync.peer_joins WHERE peer_node_id = $1",
        &[&MESH[s]],
    );
    let (m, id) = (pos["m"].as_str().unwrap(), pos["id"].as_str().unwrap());
    let page = json(
        &mut nodes[s],
        "SELECT coalesce(jsonb_agg(to_jsonb(x)), '[]') FROM pg_sync.peer_snapshot($1, $2, $3, $4) x",
        &[&MESH[r], &m, &id, &lim],
    );
    let n = page.as_array().unwrap().len();
    let status = json(
        &mut nodes[r],
        "SELECT pg_sync.apply_peer_snapshot($1, $2, $3, $4, $5::text::jsonb) -> 'status'",
        &[&MESH[s], &w, &m, &id, &page.to_string()],
    );
    assert_eq!(status, "applied");
    n < lim as usize
}

/// Begins (or resumes) a join of `nodes[r]` from `nodes[s]`: returns W.
fn begin_join(nodes: &mut [Client], s: usize, r: usize, resume: Option<i64>) -> (i64, bool) {
    sequence(&mut nodes[s]);
    let start = json(
        &mut nodes[s],
        "SELECT pg_sync.peer_join_start($1, $2)",
        &[&MESH[r], &resume],
    );
    let w = start["w"].as_i64().unwrap();
    let pos = json(
        &mut nodes[r],
        "SELECT pg_sync.begin_peer_join($1, $2, $3, $4::text::jsonb)",
        &[
            &MESH[s],
            &start["epoch"].as_str().unwrap(),
            &w,
            &start["cursors"].to_string(),
        ],
    );
    (w, pos["resumed"].as_bool().unwrap())
}

fn converged(nodes: &mut [Client], what: &str) {
    let snaps: Vec<(String, String)> = nodes.iter_mut().map(mesh_snapshot).collect();
    for (i, s) in snaps.iter().enumerate().skip(1) {
        assert_eq!(s.0, snaps[0].0, "{what}: rows of {} differ", MESH[i]);
        assert_eq!(s.1, snaps[0].1, "{what}: states of {} differ", MESH[i]);
    }
}

/// Joining by snapshot: C joins A's state (paged, 3 rows a page) while A and B keep writing
/// and exchanging; the join is killed mid-page (the page's transaction is lost) and resumed
/// where the last committed page left off; then C continues from W on A's log and from the start
/// of B's log (A's cursor for B is not taken over), and all three converge with nothing logged
/// twice. Then a partition beyond the retention cap: A releases C, compacts, C's pull gets
/// PS003; resync_peer and a new join bring C back, keeping the writes C made meanwhile.
#[test]
fn join_by_snapshot_resumes_and_resyncs_past_the_cap() {
    let cluster = Cluster::start("join", &[]);
    let mut nodes = mesh_nodes(&cluster, "join");
    // A and B only, with deletes, column edits and group moves.
    let mut rng = Rng(77);
    for _ in 0..4 {
        mesh_writes(&mut nodes[0], &mut rng, 20);
        mesh_writes(&mut nodes[1], &mut rng, 20);
        quiesce(&mut nodes, |s, r| s != 2 && r != 2);
    }
    // Some of B's log A has not applied yet: C must get it from B, after A's cursor for B.
    mesh_writes(&mut nodes[1], &mut rng, 10);
    sequence(&mut nodes[1]);

    let (w, resumed) = begin_join(&mut nodes, 0, 2, None);
    assert!(!resumed);
    // Under load: A and B write and exchange between pages.
    let mut pages = 0;
    while !snapshot_page(&mut nodes, 0, 2, w, 3) {
        pages += 1;
        mesh_writes(&mut nodes[0], &mut rng, 3);
        mesh_writes(&mut nodes[1], &mut rng, 3);
        pump(&mut nodes, 0, 1);
        if pages == 2 {
            // A kill mid-page: the page's transaction never commits.
            let killed_at = json(
                &mut nodes[2],
                "SELECT to_jsonb(j) - 'updated_at' - 'started_at' FROM pg_sync.peer_joins j",
                &[],
            );
            let (m, id) = (
                killed_at["after_model"].as_str().unwrap().to_owned(),
                killed_at["after_model_id"].as_str().unwrap().to_owned(),
            );
            let page = json(
                &mut nodes[0],
                "SELECT coalesce(jsonb_agg(to_jsonb(x)), '[]') FROM pg_sync.peer_snapshot($1, $2, $3, 3) x",
                &[&MESH[2], &m, &id],
            );
            {
                let mut tx = nodes[2].transaction().unwrap();
                tx.execute(
                    "SELECT pg_sync.apply_peer_snapshot($1, $2, $3, $4, $5::text::jsonb)",
                    &[&MESH[0], &w, &m, &id, &page.to_string()],
                )
                .unwrap();
                // Dropped without a commit: rolled back, as a killed session's would be.
            }
            let resume = json(&mut nodes[2], "SELECT w FROM pg_sync.peer_joins", &[]).as_i64();
            let (w2, resumed) = begin_join(&mut nodes, 0, 2, resume);
            assert_eq!((w2, resumed), (w, true), "the join resumes at its W");
            let now = json(
                &mut nodes[2],
                "SELECT to_jsonb(j) - 'updated_at' - 'started_at' FROM pg_sync.peer_joins j",
                &[],
            );
            assert_eq!(
                now, killed_at,
                "the join resumes after the last committed page"
            );
        }
    }
    assert!(pages >= 3, "the state took {pages} pages");
    let b_cursor_on_a = json(
        &mut nodes[2],
        "SELECT (cursors -> 0 ->> 'last_sync_id')::bigint FROM pg_sync.peer_joins",
        &[],
    );
    let finished = json(
        &mut nodes[2],
        "SELECT pg_sync.finish_peer_join($1, $2)",
        &[&MESH[0], &w],
    );
    assert_eq!(finished.as_i64(), Some(w));
    let cursors = json(
        &mut nodes[2],
        "SELECT jsonb_object_agg(peer_node_id, last_sync_id) FROM pg_sync.peer_cursors",
        &[],
    );
    assert_eq!(cursors[MESH[0]].as_i64(), Some(w));
    assert!(
        b_cursor_on_a.as_i64().is_some(),
        "A reported its cursor for B"
    );
    assert_eq!(
        cursors[MESH[1]],
        serde_json::Value::Null,
        "C's cursor for B is not taken from A's: A's snapshot need not carry all of B's log"
    );
    quiesce(&mut nodes, |_, _| true);
    converged(&mut nodes, "after the join");

    // Partition beyond the cap: C is cut from A (both ways) and B; A holds for C, then
    // releases it past the cap and compacts. C writes meanwhile.
    let c_acked: i64 = nodes[0]
        .query_one("SELECT pg_sync.last_sync_id()", &[])
        .unwrap()
        .get(0);
    nodes[0]
        .execute("SELECT pg_sync.peer_ack($1, $2)", &[&MESH[2], &c_acked])
        .unwrap();
    for _ in 0..3 {
        mesh_writes(&mut nodes[0], &mut rng, 20);
        mesh_writes(&mut nodes[1], &mut rng, 10);
        mesh_writes(&mut nodes[2], &mut rng, 5);
        quiesce(&mut nodes, |s, r| s != 2 && r != 2);
    }
    sequence(&mut nodes[0]);
    json(
        &mut nodes[0],
        "SELECT pg_sync.compact(pg_sync.last_sync_id())",
        &[],
    );
    let held = json(&mut nodes[0], "SELECT pg_sync.retention_horizon()", &[]);
    assert_eq!(held.as_i64(), Some(c_acked), "compaction stops at C's hold");
    let released = json(
        &mut nodes[0],
        "SELECT jsonb_agg(x) FROM pg_sync.release_lagging_peers(5) x",
        &[],
    );
    assert_eq!(released, serde_json::json!([MESH[2]]));
    json(
        &mut nodes[0],
        "SELECT pg_sync.compact(pg_sync.last_sync_id())",
        &[],
    );
    let cursor: i64 = nodes[2]
        .query_one(
            "SELECT last_sync_id FROM pg_sync.peer_cursors WHERE peer_node_id = $1",
            &[&MESH[0]],
        )
        .unwrap()
        .get(0);
    let err = nodes[0]
        .query(
            "SELECT * FROM pg_sync.peer_changes($1, $2, 10)",
            &[&MESH[2], &cursor],
        )
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("PS003"), "{err}");
    // Resync: C joins A again (one page), then everything flows.
    nodes[2]
        .execute("SELECT pg_sync.resync_peer($1)", &[&MESH[0]])
        .unwrap();
    let (w, _) = begin_join(&mut nodes, 0, 2, None);
    while !snapshot_page(&mut nodes, 0, 2, w, 1000) {}
    nodes[2]
        .execute("SELECT pg_sync.finish_peer_join($1, $2)", &[&MESH[0], &w])
        .unwrap();
    let hold = json(
        &mut nodes[0],
        "SELECT jsonb_build_array(resync_required, out_hold) FROM pg_sync.peer_status WHERE peer = $1",
        &[&MESH[2]],
    );
    assert_eq!(
        hold,
        serde_json::json!([false, w]),
        "C holds A's log again from W"
    );
    quiesce(&mut nodes, |_, _| true);
    converged(&mut nodes, "after the resync");
    for c in nodes.iter_mut() {
        let twice = actions_logged_twice(c);
        assert_eq!(twice, 0, "an action was logged twice");
    }
}
