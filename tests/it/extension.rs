//! The extension against real clusters: convergence of three nodes through apply_remote,
//! concurrent writers, and clock safety across crashes with the wall clock stepped back.

use pg_sync_tests::postgres::Client;
use pg_sync_tests::{Cluster, Rng};
use std::process::Command;

/// xorshift: reproducible randomness without a dependency.
const NODES: [&str; 3] = ["node-a", "node-b", "node-c"];

fn setup_node(cluster: &Cluster, db: &str, node: &str) -> Client {
    cluster.create_node_db(
        db,
        node,
        "CREATE TABLE items (id int PRIMARY KEY, a text, b int, c numeric, grp text);
         SELECT pg_sync.register_table('items', group_column => 'grp');",
    )
}

fn random_writes(c: &mut Client, rng: &mut Rng, n: usize) {
    for _ in 0..n {
        let id = rng.below(12) as i32;
        let v = rng.below(1000) as i32;
        let sql = match rng.below(6) {
            0 | 1 => format!(
                "INSERT INTO items VALUES ({id}, 'a{v}', {v}, {v}.5, 'g{}') ON CONFLICT (id) DO NOTHING",
                v % 3
            ),
            2 => format!("UPDATE items SET a = 'u{v}' WHERE id = {id}"),
            3 => format!("UPDATE items SET b = {v}, c = c + 1 WHERE id = {id}"),
            4 => format!("UPDATE items SET grp = 'g{}' WHERE id = {id}", v % 3),
            _ => format!("DELETE FROM items WHERE id = {id}"),
        };
        c.batch_execute(&sql).unwrap();
    }
}

/// The actions a node originated, as JSON objects.
fn own_actions(c: &mut Client, node: &str) -> Vec<serde_json::Value> {
    let row = c
        .query_one(
            "SELECT coalesce(jsonb_agg(to_jsonb(s) ORDER BY id), '[]')::text FROM pg_sync.sync_actions s WHERE origin = $1",
            &[&node],
        )
        .unwrap();
    let text: String = row.get(0);
    serde_json::from_str::<Vec<serde_json::Value>>(&text).unwrap()
}

fn apply(c: &mut Client, batch: &[serde_json::Value]) {
    if batch.is_empty() {
        return;
    }
    let text = serde_json::Value::Array(batch.to_vec()).to_string();
    c.execute("SELECT pg_sync.apply_remote($1::text::jsonb)", &[&text])
        .unwrap();
}

fn snapshot(c: &mut Client) -> (String, String) {
    let rows: String = c
        .query_one(
            "SELECT coalesce(jsonb_agg(to_jsonb(t) ORDER BY id), '[]')::text FROM items t",
            &[],
        )
        .unwrap()
        .get(0);
    let states: String = c
        .query_one(
            "SELECT jsonb_agg(pg_sync.row_version_state('items', g::text) ORDER BY g)::text
               FROM generate_series(0, 11) g",
            &[],
        )
        .unwrap()
        .get(0);
    (rows, states)
}

#[test]
fn three_nodes_converge_through_apply_remote_in_any_order() {
    let cluster = Cluster::start("converge", &[]);
    for seed in [7u64, 42, 1234, 31_337, 2024, 987_654_321] {
        let dbs: Vec<String> = NODES
            .iter()
            .map(|n| format!("conv_{seed}_{}", n.replace('-', "_")))
            .collect();
        let mut clients: Vec<Client> = NODES
            .iter()
            .zip(&dbs)
            .map(|(node, db)| setup_node(&cluster, db, node))
            .collect();
        let mut rng = Rng(seed);
        // Rounds of local writes, each followed by a partial, shuffled, duplicated exchange.
        for round in 0..4 {
            for c in clients.iter_mut() {
                random_writes(c, &mut rng, 25);
            }
            let all: Vec<Vec<serde_json::Value>> = NODES
                .iter()
                .enumerate()
                .map(|(i, n)| own_actions(&mut clients[i], n))
                .collect();
            for (target, client) in clients.iter_mut().enumerate() {
                let mut batch: Vec<serde_json::Value> = vec![];
                for (source, actions) in all.iter().enumerate() {
                    if source == target {
                        continue;
                    }
                    for a in actions {
                        // Last round: everything; earlier rounds: a random part.
                        if round == 3 || rng.below(2) == 0 {
                            batch.push(a.clone());
                        }
                        if rng.below(5) == 0 {
                            batch.push(a.clone()); // a duplicate
                        }
                    }
                }
                for i in (1..batch.len()).rev() {
                    batch.swap(i, rng.below(i as u64 + 1) as usize);
                }
                for chunk in batch.chunks(1 + rng.below(40) as usize) {
                    apply(client, chunk);
                }
            }
        }
        let snaps: Vec<(String, String)> = clients.iter_mut().map(snapshot).collect();
        assert!(
            snaps[0].0.len() > 2,
            "seed {seed}: no rows survived; the test would prove nothing"
        );
        for (i, s) in snaps.iter().enumerate().skip(1) {
            assert_eq!(
                s.0, snaps[0].0,
                "seed {seed}: rows of {} differ from {}",
                NODES[i], NODES[0]
            );
            assert_eq!(
                s.1, snaps[0].1,
                "seed {seed}: versions of {} differ from {}",
                NODES[i], NODES[0]
            );
        }
        // Applying everything once more changes nothing anywhere.
        let all: Vec<serde_json::Value> = (0..3)
            .flat_map(|i| own_actions(&mut clients[i], NODES[i]))
            .collect();
        for (i, c) in clients.iter_mut().enumerate() {
            let others: Vec<_> = all
                .iter()
                .filter(|a| a["origin"] != NODES[i])
                .cloned()
                .collect();
            let text = serde_json::Value::Array(others).to_string();
            let changed: i64 = c
                .query_one("SELECT pg_sync.apply_remote($1::text::jsonb)", &[&text])
                .unwrap()
                .get(0);
            assert_eq!(changed, 0, "seed {seed}: re-applying changed {}", NODES[i]);
        }
    }
}

fn pgbench(cluster: &Cluster, db: &str, script: &str, clients: u32, transactions: u32) {
    let path = cluster.dir.join(format!("bench_{}.sql", transactions));
    std::fs::write(&path, script).unwrap();
    let out = Command::new(cluster.bindir().join("pgbench"))
        .args([
            "-n",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-p",
            &cluster.port.to_string(),
        ])
        .args([
            "-c",
            &clients.to_string(),
            "-j",
            "2",
            "-t",
            &transactions.to_string(),
            "-f",
        ])
        .arg(&path)
        .arg(db)
        .output()
        .expect("pgbench runs");
    assert!(
        out.status.success(),
        "pgbench failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn concurrent_writers_get_increasing_unique_versions() {
    let cluster = Cluster::start("concurrency", &[]);
    let mut c = cluster.create_db("conc");
    c.batch_execute(
        "CREATE TABLE hot (id int PRIMARY KEY, n int NOT NULL DEFAULT 0, who text);
         INSERT INTO hot SELECT g, 0, NULL FROM generate_series(1, 4) g;
         SELECT pg_sync.register_table('hot');
         CREATE TABLE ticks (hlc bigint);",
    )
    .unwrap();
    pgbench(
        &cluster,
        "conc",
        "\\set id random(1, 4)\n\
         UPDATE hot SET n = n + 1, who = :client_id::text WHERE id = :id;\n\
         INSERT INTO ticks SELECT pg_sync.hlc_now() FROM generate_series(1, 3);\n",
        8,
        250,
    );
    // Row locks order writers of one row, so per row the action ids follow commit order.
    let bad: i64 = c
        .query_one(
            "SELECT count(*) FROM (
               SELECT version COLLATE \"C\" AS v,
                      lag(version COLLATE \"C\") OVER (PARTITION BY model_id ORDER BY id) AS prev
                 FROM pg_sync.sync_actions) s
              WHERE prev IS NOT NULL AND v <= prev",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(bad, 0, "a row's version did not increase in commit order");
    let (updates, distinct): (i64, i64) = {
        let r = c
            .query_one("SELECT count(*), count(DISTINCT version) FROM pg_sync.sync_actions WHERE action = 'U'", &[])
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(updates, 8 * 250);
    assert_eq!(distinct, updates, "two writes shared a version");
    let (ticks, distinct_ticks): (i64, i64) = {
        let r = c
            .query_one("SELECT count(*), count(DISTINCT hlc) FROM ticks", &[])
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(ticks, 8 * 250 * 3);
    assert_eq!(
        distinct_ticks, ticks,
        "the HLC repeated a value across backends"
    );
    // The counter column agrees with the log: no update was lost or doubled.
    let sum: i64 = c
        .query_one("SELECT sum(n)::bigint FROM hot", &[])
        .unwrap()
        .get(0);
    assert_eq!(sum, updates);
}

fn max_local_hlc(c: &mut Client) -> i64 {
    c.query_one(
        "SELECT max(pg_sync.version_hlc(version)) FROM pg_sync.sync_actions",
        &[],
    )
    .unwrap()
    .get(0)
}

#[test]
fn versions_stay_above_history_after_crash_with_clock_stepped_back() {
    let cluster = Cluster::start("clock", &[]);
    let mut c = cluster.create_db("clk");
    c.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, v int);
         SELECT pg_sync.register_table('t');
         INSERT INTO t SELECT g, g FROM generate_series(1, 100) g;
         UPDATE t SET v = v + 1;",
    )
    .unwrap();
    let before = max_local_hlc(&mut c);
    drop(c);
    assert!(
        cluster.data().join("pg_sync_hlc").exists(),
        "the high-water mark was never persisted"
    );

    // kill -9 of the whole server, then start with the wall clock an hour behind.
    cluster.pg_ctl(&["stop", "-m", "immediate", "-w"]);
    cluster.configure(&["pg_sync.test_clock_offset = '-1h'"]);
    cluster.pg_ctl(&["start", "-w", "-t", "60"]);
    let mut c = cluster.connect("clk");
    let wall_now: i64 = c
        .query_one(
            "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(
        (before >> 16) > wall_now - 3_600_000 + 60_000,
        "the clock step is not visible to the test"
    );
    c.batch_execute("UPDATE t SET v = v + 1; INSERT INTO t VALUES (1000, 0);")
        .unwrap();
    let first_after: i64 = c
        .query_one(
            "SELECT min(pg_sync.version_hlc(version)) FROM pg_sync.sync_actions
              WHERE id > (SELECT max(id) - 101 FROM pg_sync.sync_actions)",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(
        first_after > before,
        "a version after the restart ({first_after}) is not above history ({before})"
    );
    let hlc: i64 = c.query_one("SELECT pg_sync.hlc_now()", &[]).unwrap().get(0);
    assert!(hlc > before);

    // A clean restart keeps the guarantee as well.
    let before = max_local_hlc(&mut c);
    drop(c);
    cluster.restart();
    let mut c = cluster.connect("clk");
    c.batch_execute("UPDATE t SET v = v + 1 WHERE id = 1")
        .unwrap();
    assert!(max_local_hlc(&mut c) > before);
}

#[test]
fn clock_refuses_without_preload_with_a_hint() {
    let cluster = Cluster::start("nopreload", &["shared_preload_libraries = ''"]);
    let mut c = cluster.create_db("np");
    let err = c.query_one("SELECT pg_sync.hlc_now()", &[]).unwrap_err();
    let db = err.as_db_error().expect("a database error");
    assert_eq!(db.code().code(), "55000");
    assert!(db
        .hint()
        .unwrap_or_default()
        .contains("shared_preload_libraries"));
}
