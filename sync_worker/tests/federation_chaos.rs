//! Federation under faults: three clusters and three workers on loopback, every link through a
//! TCP proxy the test cuts, freezes, delays or makes one-way, workers killed (kill -9, or
//! aborted at failpoints around apply commit and ack) and Postgres backends crashed mid-apply.
//! Each scenario ends at a quiescence barrier and checks convergence (rows and per-row LWW
//! state equal on every node) and exactly-once (nothing logged twice, no log growth after
//! quiescence, nothing parked unless the scenario parks it).
//!
//! `FEDCHAOS_SEED` replays the randomized run; `FEDCHAOS_ROUNDS` lengthens it (`make soak`).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

mod common;
#[path = "common/fed.rs"]
mod fed;
use fed::*;

/// Random writes on one node: inserts, column updates, deletes, re-inserts and multi-row
/// transactions over a small key space (so nodes collide on rows and columns).
fn random_writes(c: &mut pg_sync_tests::postgres::Client, who: &str, rng: &mut Rng, n: usize) {
    // Rows a transaction adds are new: their ids carry this call's tag.
    let tag = rng.below(1 << 40);
    for i in 0..n {
        let id = format!("k{}", rng.below(24));
        let v = rng.below(1000);
        let sql = match rng.below(7) {
            0 | 1 => format!(
                "INSERT INTO items VALUES ('{id}', '{who}{i}', {v}, 'g{}') ON CONFLICT (id) DO NOTHING",
                v % 3
            ),
            2 => format!("UPDATE items SET a = '{who}{i}' WHERE id = '{id}'"),
            3 => format!("UPDATE items SET b = {v} WHERE id = '{id}'"),
            4 => format!("UPDATE items SET grp = 'g{}' WHERE id = '{id}'", v % 3),
            5 => format!("DELETE FROM items WHERE id = '{id}'"),
            _ => format!(
                "BEGIN;
                 INSERT INTO items VALUES ('{id}', '{who}{i}', {v}, 'g1') ON CONFLICT (id) DO NOTHING;
                 UPDATE items SET b = b + 1 WHERE id = '{id}';
                 INSERT INTO items SELECT '{who}-{tag}-{i}-' || g, 'x', g, 'g2' FROM generate_series(1, 3) g;
                 COMMIT;"
            ),
        };
        // A local transaction and an applying batch touching the same rows in another order
        // can deadlock; like any application, retry the loser (and say so).
        let mut tries = 0;
        while let Err(e) = c.batch_execute(&sql) {
            let code = e.code().map(|c| c.code().to_owned());
            let _ = c.batch_execute("ROLLBACK");
            tries += 1;
            if tries < 5 && matches!(code.as_deref(), Some("40P01" | "40001")) {
                eprintln!("{who}: retrying after {code:?}: {e:?}");
                continue;
            }
            panic!(
                "{who}: {sql}: {e}: {:?}",
                e.as_db_error().map(|d| (d.code(), d.message(), d.where_()))
            );
        }
    }
}

/// Writes concurrently on every node (one thread and connection each).
fn concurrent_writes(m: &Mesh, seed: u64, per_node: usize) {
    std::thread::scope(|s| {
        for (k, n) in m.nodes.iter().enumerate() {
            let url = n.cluster.url("app");
            let who = n.name.clone();
            s.spawn(move || {
                let mut c =
                    pg_sync_tests::postgres::Client::connect(&url, pg_sync_tests::postgres::NoTls)
                        .unwrap();
                let mut rng = Rng(seed.wrapping_mul(31).wrapping_add(k as u64 + 1));
                random_writes(&mut c, &who, &mut rng, per_node);
            });
        }
    });
}

fn check_all(m: &mut Mesh) {
    m.quiesce();
    m.assert_converged("items");
    m.assert_exactly_once();
    m.assert_no_quarantine();
}

/// Full mesh, concurrent writes on all three nodes with uneven link delays; then different
/// columns of one row edited on two nodes while their links are frozen: both edits survive.
#[test]
fn full_mesh_under_concurrent_writes() {
    let mut m = Mesh::start("fc_mesh", &["a", "b", "c"], ITEMS, &Mesh::full(3));
    m.proxy("a", "b")
        .set(|f| f.delay = Duration::from_millis(20));
    m.proxy("c", "a")
        .set(|f| f.delay = Duration::from_millis(5));
    concurrent_writes(&m, 7, 150);
    check_all(&mut m);

    m.node("a")
        .exec("INSERT INTO items VALUES ('dc', 'a0', 0, 'g1')");
    m.quiesce();
    for p in m.proxies.values() {
        p.set(|f| f.freeze_data = true);
    }
    m.node("a")
        .exec("UPDATE items SET a = 'from-a' WHERE id = 'dc'");
    m.node("b").exec("UPDATE items SET b = 42 WHERE id = 'dc'");
    m.node("c")
        .exec("UPDATE items SET grp = 'g2' WHERE id = 'dc'");
    m.heal_all();
    check_all(&mut m);
    assert_eq!(
        m.node("c")
            .text("SELECT a || '/' || b || '/' || grp FROM items WHERE id = 'dc'"),
        "from-a/42/g2"
    );
}

/// A chain A – B – C (A and C never linked): B relays everything, including the state-only
/// merges (a column newer than B's tombstone, kept pending; a tombstone raised by a later
/// delete), so C ends with the same per-row state as A and B.
#[test]
fn relay_chain_forwards_state_only_merges() {
    let mut m = Mesh::start(
        "fc_chain",
        &["a", "b", "c"],
        ITEMS,
        &Mesh::pairs(&[(0, 1), (1, 2)]),
    );
    m.node("a").exec(
        "INSERT INTO items VALUES ('p', 'a', 1, 'g1'), ('t', 'a', 2, 'g1'), ('q', 'a', 3, 'g1')",
    );
    m.quiesce();
    // A and B apart: B deletes, then A (not knowing) edits a column and deletes another row
    // B deleted earlier. Healed, B holds a pending value and a raised tombstone it must relay.
    m.proxy("a", "b").cut();
    m.proxy("b", "a").cut();
    m.node("b").exec("DELETE FROM items WHERE id IN ('p', 't')");
    std::thread::sleep(Duration::from_millis(20));
    m.node("a")
        .exec("UPDATE items SET a = 'late' WHERE id = 'p'");
    m.node("a").exec("DELETE FROM items WHERE id = 't'");
    m.node("c").exec("UPDATE items SET b = 30 WHERE id = 'q'");
    m.quiesce();
    m.heal_all();
    check_all(&mut m);
    // The pending value is visible in C's row state, relayed by B.
    let pending = m.node("c").text(
        "SELECT pending IS NOT NULL OR versions ? 'a' FROM pg_sync.row_state WHERE model = 'items' AND model_id = 'p'",
    );
    assert_eq!(pending, "true");
    // A re-insert everywhere after: the row comes back with the same values on all nodes.
    m.node("c")
        .exec("INSERT INTO items VALUES ('p', 'again', 9, 'g2')");
    concurrent_writes(&m, 3, 60);
    check_all(&mut m);
}

/// kill -9 of a receiver's worker before applying a batch, between the apply's commit and its
/// ack, and after the ack (failpoints abort the process there), each while A's backlog flows:
/// after a restart the cursor resumes, nothing is lost, nothing applied or logged twice.
#[test]
fn receiver_killed_around_commit_and_ack() {
    let mut m = Mesh::start("fc_kill", &["a", "b"], ITEMS, &Mesh::full(2));
    for (round, fp) in [
        "fed_crash_before_apply@2",
        "fed_crash_after_commit@1",
        "fed_crash_after_ack@1",
    ]
    .into_iter()
    .enumerate()
    {
        m.node("b").kill9();
        // About 2,400 sync ids: three batches (a batch spans about 1,000).
        for t in 0..30 {
            m.node("a").exec(&format!(
                "INSERT INTO items SELECT 'r{round}-{t}-' || g, 'k', g, 'g' || (g % 3) FROM generate_series(1, 80) g"
            ));
        }
        m.node("b").exec(&format!(
            "UPDATE items SET a = 'b{round}' WHERE id LIKE 'r0-1-%'"
        ));
        let before = m.node("b").cursor("a");
        m.node("b").spawn_worker(&[("SYNC_FAILPOINTS", fp)]);
        let node = m.node("b");
        wait_for(
            &format!("B's worker to abort at {fp}"),
            Duration::from_secs(60),
            || node.worker_exited(),
        );
        let at = m.node("b").cursor("a");
        let head = m.node("a").last_sync_id();
        eprintln!("{fp}: B's cursor for A went {before} → {at} of {head}");
        assert!(at < head, "{fp}: B applied everything before the failpoint");
        m.node("b").start_worker(&[]);
        check_all(&mut m);
        for node in ["a", "b"] {
            let (x, y) = (
                m.node("a").int(&format!(
                    "SELECT count(*) FROM pg_sync.sync_actions WHERE version LIKE '%@{node}'"
                )),
                m.node("b").int(&format!(
                    "SELECT count(*) FROM pg_sync.sync_actions WHERE version LIKE '%@{node}'"
                )),
            );
            assert_eq!(
                x, y,
                "{fp}: actions minted by {node} differ between A and B"
            );
        }
    }
    // B's cursor for A counts each applied action once.
    let applied = m
        .node("b")
        .int("SELECT applied FROM pg_sync.peer_cursors WHERE peer_node_id = 'a'");
    let sent = m.node("a").int(
        "SELECT count(*) FROM pg_sync.sync_actions WHERE NOT (version LIKE '%@b' AND versions IS NULL)",
    );
    assert!(applied <= sent, "B counted {applied} applied of {sent}");
}

/// A partition with writes on every side (C cut off both ways; then a one-way partition where
/// A's frames to B are held while B's acks flow), healed: everything converges.
#[test]
fn partitions_with_writes_on_both_sides() {
    let mut m = Mesh::start("fc_part", &["a", "b", "c"], ITEMS, &Mesh::full(3));
    concurrent_writes(&m, 11, 40);
    m.quiesce();
    m.isolate("c");
    concurrent_writes(&m, 12, 80);
    // The majority side converges by itself meanwhile.
    m.quiesce();
    m.assert_converged_among("items", &["a", "b"]);
    m.heal_all();
    check_all(&mut m);

    m.proxy("a", "b").set(|f| f.freeze_data = true);
    m.proxy("b", "a").set(|f| f.freeze_acks = true);
    concurrent_writes(&m, 13, 60);
    std::thread::sleep(Duration::from_millis(500));
    m.heal_all();
    check_all(&mut m);
}

/// Hub and spoke: B and C link only through A. A's worker is killed -9 while both spokes
/// write, and A's Postgres is restarted too; after A returns, all three converge.
#[test]
fn hub_and_spoke_with_the_hub_killed() {
    let mut m = Mesh::start(
        "fc_hub",
        &["a", "b", "c"],
        ITEMS,
        &Mesh::pairs(&[(0, 1), (0, 2)]),
    );
    concurrent_writes(&m, 21, 40);
    m.node("a").kill9();
    concurrent_writes(&m, 22, 60);
    m.node("a").cluster.restart();
    m.node("a").reconnect();
    m.node("a").start_worker(&[]);
    check_all(&mut m);
}

/// A change from C carrying a version far ahead of B's clock is parked in B's quarantine with
/// 22008, while C's cursor moves past it and A's writes keep flowing to B; retried with a
/// larger allowed skew, it applies and all converge.
#[test]
fn far_future_version_is_quarantined_and_the_link_flows() {
    // C only sends to B; A and B are peered both ways.
    let mut m = Mesh::start(
        "fc_skew",
        &["a", "b", "c"],
        ITEMS,
        &[(0, 1), (1, 0), (2, 1)],
    );
    m.node("c")
        .exec("INSERT INTO items VALUES ('ok', 'c', 1, 'g1')");
    m.quiesce();
    // C takes a change from a (forged) node 10 minutes ahead; its own clock follows it.
    let base = m.node("c").int("SELECT pg_sync.hlc_now()");
    let ahead = (base as u64) + ((10 * 60 * 1000u64) << 16);
    m.node("c").exec(&format!(
        "SET pg_sync.max_clock_skew = '1h';
         SELECT pg_sync.apply_remote('{{\"model\": \"items\", \"model_id\": \"future\", \"action\": \"I\",
             \"version\": \"{ahead:016x}@x\", \"origin\": \"x\",
             \"data\": {{\"id\": \"future\", \"a\": \"f\", \"b\": 1, \"grp\": \"g1\"}}}}'::jsonb);
         RESET pg_sync.max_clock_skew;"
    ));
    m.node("a")
        .exec("INSERT INTO items VALUES ('after', 'a', 2, 'g1')");
    m.quiesce();
    let b = m.node("b");
    assert_eq!(
        b.text("SELECT string_agg(sqlstate, ',') FROM pg_sync.peer_quarantine"),
        "22008"
    );
    assert_eq!(
        b.int("SELECT count(*) FROM items WHERE id IN ('ok', 'after')"),
        2
    );
    assert_eq!(b.int("SELECT count(*) FROM items WHERE id = 'future'"), 0);
    assert!(b
        .text("SELECT string_agg(event, ',') FROM pg_sync.peer_events WHERE peer = 'c'")
        .contains("quarantined"));
    assert_eq!(
        b.text("SELECT open_quarantine FROM pg_sync.peer_status WHERE peer = 'c'"),
        "1"
    );
    b.exec("SET pg_sync.max_clock_skew = '1h'; SELECT pg_sync.retry_quarantined('c'); RESET pg_sync.max_clock_skew;");
    assert_eq!(b.int("SELECT count(*) FROM pg_sync.peer_quarantine"), 0);
    // B relays it to A, whose clock refuses it the same way: parked there, retried there.
    m.quiesce();
    let a = m.node("a");
    assert_eq!(
        a.text("SELECT string_agg(sqlstate, ',') FROM pg_sync.peer_quarantine"),
        "22008"
    );
    a.exec("SET pg_sync.max_clock_skew = '1h'; SELECT pg_sync.retry_quarantined('b'); RESET pg_sync.max_clock_skew;");
    m.quiesce();
    m.assert_no_quarantine();
    // C only sends: A and B hold everything.
    m.assert_converged_among("items", &["a", "b"]);
    m.assert_exactly_once();
}

/// A row nested 124 levels deep (jsonb nests thousands) federates, both ways and by snapshot,
/// and the link flows on after it. The link once parsed each frame into a tree, which
/// serde_json refuses past 127 levels: a batch is 4 levels around a column's value (frame,
/// `changes`, change, `data`), so the receiver refused this row's frame and retried the same
/// batch forever (nothing written after it arrived either). 124 is the deepest the receiving
/// extension's `apply_remote_set` parses (array, change, `data`: 127 levels); see
/// `a_row_nested_300_levels_federates` for deeper rows.
#[test]
fn a_deeply_nested_row_federates_and_the_link_flows_on() {
    deep_row_federates("fc_deep", 124);
}

/// Review of fedfix16: the receiving extension parsed changes into serde_json trees too
/// (`pgrx::JsonB`): a row nested deeper than about 125 levels failed its apply with XX000,
/// which `apply_peer_batch` took for transient, so the link retried that batch forever.
#[test]
fn a_row_nested_300_levels_federates() {
    deep_row_federates("fc_deep300", 300);
}

/// Past what serde_json parses at all: the extension keeps levels below its cut as raw text
/// (`pg_sync/src/deep.rs`).
#[test]
fn a_row_nested_2000_levels_federates() {
    deep_row_federates("fc_deep2000", 2000);
}

/// A change whose apply raises an internal error (XX000; here a trigger of B's, as a value the
/// extension could not read once did) is parked in B's quarantine with its SQLSTATE, and the
/// link flows on: XX000 once counted as transient, and B retried the same batch forever.
#[test]
fn an_internal_error_of_a_change_is_quarantined_and_the_link_flows() {
    let mut m = Mesh::start("fc_xx000", &["a", "b"], ITEMS, &[(0, 1)]);
    m.node("b").exec(
        "CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.id = 'bad' THEN
                 RAISE EXCEPTION 'an internal error' USING ERRCODE = 'XX000';
             END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER boom BEFORE INSERT ON items FOR EACH ROW EXECUTE FUNCTION boom();",
    );
    m.node("a")
        .exec("INSERT INTO items VALUES ('bad', 'a', 1, 'g1')");
    m.node("a")
        .exec("INSERT INTO items VALUES ('after', 'a', 2, 'g1')");
    m.quiesce_within(Duration::from_secs(30));
    let b = m.node("b");
    assert_eq!(
        b.text("SELECT string_agg(sqlstate, ',') FROM pg_sync.peer_quarantine"),
        "XX000"
    );
    assert_eq!(b.int("SELECT count(*) FROM items WHERE id = 'after'"), 1);
    assert_eq!(b.int("SELECT count(*) FROM items WHERE id = 'bad'"), 0);
    b.exec("DROP TRIGGER boom ON items; SELECT pg_sync.retry_quarantined('a');");
    m.assert_no_quarantine();
    m.assert_converged_among("items", &["a", "b"]);
    m.assert_exactly_once();
}

/// A row with a jsonb value nested `depth` levels goes A→B, then back from B (another value
/// at that depth), then by snapshot (B joins A again), with rows written after it following.
fn deep_row_federates(name: &str, depth: usize) {
    let schema = format!(
        "{ITEMS} CREATE TABLE docs (id text PRIMARY KEY, doc jsonb);
                 SELECT pg_sync.register_table('docs', federation => 'both');"
    );
    let mut m = Mesh::start(name, &["a", "b"], &schema, &Mesh::full(2));
    let deep =
        |leaf: u32| format!("(repeat('[', {depth}) || '{leaf}' || repeat(']', {depth}))::jsonb");
    m.node("a")
        .exec(&format!("INSERT INTO docs VALUES ('deep', {})", deep(1)));
    m.node("a")
        .exec("INSERT INTO items VALUES ('after', 'a', 1, 'g0')");
    m.quiesce_within(Duration::from_secs(30));
    let doc = "SELECT coalesce((SELECT md5(doc::text) FROM docs WHERE id = 'deep'), 'none')";
    let at_a = m.node("a").text(doc);
    assert_eq!(m.node("b").text(doc), at_a, "the deep row at B");
    assert_eq!(
        m.node("b")
            .int("SELECT count(*) FROM items WHERE id = 'after'"),
        1,
        "the row written after it at B"
    );
    // Back from B; then B joins A again by snapshot (its pages carry the row).
    m.node("b").exec(&format!(
        "UPDATE docs SET doc = {} WHERE id = 'deep'",
        deep(2)
    ));
    m.quiesce_within(Duration::from_secs(30));
    let at_b = m.node("b").text(doc);
    assert_ne!(at_b, at_a);
    assert_eq!(
        m.node("a").text(doc),
        at_b,
        "B's change of the deep row at A"
    );
    m.node("b").exec("SELECT pg_sync.resync_peer('a')");
    m.node("a")
        .exec("INSERT INTO items VALUES ('after_join', 'a', 1, 'g0')");
    wait_for("B has joined A again", Duration::from_secs(30), || {
        m.node("b")
            .int("SELECT count(*) FROM items WHERE id = 'after_join'")
            == 1
    });
    m.quiesce_within(Duration::from_secs(30));
    m.assert_no_quarantine();
    m.assert_converged("docs");
    m.assert_converged("items");
    m.assert_exactly_once();
}

/// Equal HLC values from two (forged) nodes x and y, injected on different nodes so each node
/// sees them in another order: ties break the same way everywhere.
#[test]
fn equal_hlc_ties_in_every_arrival_order() {
    let mut m = Mesh::start("fc_ties", &["a", "b", "c"], ITEMS, &Mesh::full(3));
    m.proxy("a", "c")
        .set(|f| f.delay = Duration::from_millis(30));
    m.proxy("c", "b")
        .set(|f| f.delay = Duration::from_millis(15));
    let base = m.node("b").int("SELECT pg_sync.hlc_now()") + (1 << 16);
    let change = |id: &str, action: &str, node: &str, a: &str| {
        format!(
            "SELECT pg_sync.apply_remote('{{\"model\": \"items\", \"model_id\": \"{id}\", \"action\": \"{action}\",
                \"version\": \"{base:016x}@{node}\", \"origin\": \"{node}\",
                \"data\": {{\"id\": \"{id}\", \"a\": \"{a}\", \"b\": 1, \"grp\": \"g1\"}}}}'::jsonb)"
        )
    };
    // Every ordered pair of nodes gets the two tied writes of one row, one each.
    let names = ["a", "b", "c"];
    for (i, x) in names.iter().enumerate() {
        for (j, y) in names.iter().enumerate() {
            let id = format!("tie-{x}{y}");
            m.node(x).exec(&change(&id, "I", "x", "from-x"));
            if i != j {
                m.node(y).exec(&change(&id, "I", "y", "from-y"));
            }
        }
    }
    // A tied update and delete of one row on two nodes.
    m.node("a").exec(&change("tie-ud", "I", "x", "base"));
    m.quiesce();
    m.node("a").exec(
        &change("tie-ud", "U", "z", "upd")
            .replace(&format!("{base:016x}@z"), &format!("{:016x}@z", base + 5)),
    );
    m.node("c").exec(
        &change("tie-ud", "D", "w", "")
            .replace(&format!("{base:016x}@w"), &format!("{:016x}@w", base + 5)),
    );
    check_all(&mut m);
    for id in ["tie-ab", "tie-ba", "tie-cc", "tie-ac"] {
        // x < y: the larger node id wins the tie.
        let a = m
            .node("b")
            .text(&format!("SELECT a FROM items WHERE id = '{id}'"));
        if id == "tie-cc" {
            assert_eq!(a, "from-x");
        } else {
            assert_eq!(a, "from-y", "{id}");
        }
    }
}

/// A parent and child table with a foreign key, written on A, reach C only through B: the
/// link's causal order keeps parents first, so nothing is parked on the way. Rows written
/// before the links start reach B and C by snapshot join, which goes model by model in name
/// order (children before parents): the join retries what it parked once all pages are in.
#[test]
fn foreign_key_order_through_a_relay() {
    let schema = "CREATE TABLE parents (id text PRIMARY KEY, name text);
         CREATE TABLE children (id text PRIMARY KEY, parent text NOT NULL REFERENCES parents, v int);
         SELECT pg_sync.register_table('parents', federation => 'both');
         SELECT pg_sync.register_table('children', federation => 'both');
         INSERT INTO parents SELECT 'pre' || g, 'before the join' FROM generate_series(1, 5) g;
         INSERT INTO children SELECT 'pre' || g || '-' || k, 'pre' || g, k FROM generate_series(1, 5) g, generate_series(1, 3) k;";
    let mut m = Mesh::start(
        "fc_fk",
        &["a", "b", "c"],
        schema,
        &Mesh::pairs(&[(0, 1), (1, 2)]),
    );
    m.proxy("b", "c")
        .set(|f| f.delay = Duration::from_millis(10));
    for i in 0..40 {
        m.node("a")
            .exec(&format!("INSERT INTO parents VALUES ('p{i}', 'n{i}')"));
        m.node("a").exec(&format!(
            "INSERT INTO children SELECT 'c{i}-' || g, 'p{i}', g FROM generate_series(1, 3) g"
        ));
        if i % 5 == 4 {
            m.node("a").exec(&format!(
                "DELETE FROM children WHERE parent = 'p{}'; DELETE FROM parents WHERE id = 'p{}'",
                i - 2,
                i - 2
            ));
        }
    }
    m.quiesce();
    m.assert_no_quarantine();
    m.assert_converged("parents");
    m.assert_converged("children");
    m.assert_exactly_once();
    assert_eq!(
        m.node("c").int("SELECT count(*) FROM children"),
        (32 + 5) * 3
    );
}

/// A 100k-row transaction on A reaches B in one local transaction: a reader on B sees none or
/// all of it. B's Postgres backend applying it is killed -9 mid-apply first (the server
/// restarts through crash recovery); the worker re-applies from its durable cursor.
#[test]
fn large_transaction_applied_atomically_through_a_crash() {
    let mut m = Mesh::start("fc_big", &["a", "b"], ITEMS, &Mesh::full(2));
    m.node("a").exec(
        "INSERT INTO items SELECT 'big' || g, 'v', g, 'g' || (g % 7) FROM generate_series(1, 100000) g",
    );
    // Crash B's Postgres while it applies the batch.
    let started = Instant::now();
    let b = m.node("b");
    let pid = loop {
        let pid = b.int(
            "SELECT coalesce(max(pid), 0) FROM pg_stat_activity
              WHERE query LIKE '%apply_peer_batch%' AND state = 'active' AND pid <> pg_backend_pid()",
        );
        if pid != 0 {
            break pid;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "no apply seen");
        std::thread::sleep(Duration::from_millis(20));
    };
    std::thread::sleep(Duration::from_millis(300));
    let _ = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status();
    eprintln!("killed B's applying backend {pid}");
    std::thread::sleep(Duration::from_secs(1));
    m.node("b").reconnect();
    // Meanwhile a reader on B sees all or nothing.
    let b = m.node("b");
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let n = b.int("SELECT count(*) FROM items");
        assert!(
            n == 0 || n == 100_000,
            "B showed {n} of the transaction's rows"
        );
        if n == 100_000 {
            break;
        }
        assert!(Instant::now() < deadline, "B never applied the transaction");
        std::thread::sleep(Duration::from_millis(50));
    }
    m.quiesce_within(Duration::from_secs(180));
    m.assert_exactly_once();
    m.assert_no_quarantine();
    assert_eq!(
        m.node("a")
            .text("SELECT md5(string_agg(id || a || b || grp, ',' ORDER BY id)) FROM items"),
        m.node("b")
            .text("SELECT md5(string_agg(id || a || b || grp, ',' ORDER BY id)) FROM items")
    );
}

/// Random writes on all nodes with random link cuts, freezes, delays, kill -9s and failpoint
/// aborts; healed, everything converges exactly once. Prints its seed (`FEDCHAOS_SEED`
/// replays it; `FEDCHAOS_ROUNDS` runs longer).
#[test]
fn seeded_random_chaos() {
    let seed = common::seed_from_env("FEDCHAOS_SEED");
    let rounds: u64 = std::env::var("FEDCHAOS_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(16);
    eprintln!("seeded_random_chaos: FEDCHAOS_SEED={seed} FEDCHAOS_ROUNDS={rounds}");
    let mut rng = Rng(seed);
    let mut m = Mesh::start("fc_rand", &["a", "b", "c"], ITEMS, &Mesh::full(3));
    let links: Vec<(usize, usize)> = m.links.clone();
    for round in 0..rounds {
        let (s, r) = links[rng.below(links.len() as u64) as usize];
        let what = rng.below(8);
        let p = &m.proxies[&(s, r)];
        match what {
            0 => p.cut(),
            1 => p.set(|f| f.freeze_data = true),
            2 => p.set(|f| f.freeze_acks = true),
            3 => p.set(|f| f.delay = Duration::from_millis(25)),
            4 | 5 => p.heal(),
            6 => m.nodes[r].kill9(),
            _ => {
                let fp = [
                    "fed_crash_before_apply@2",
                    "fed_crash_after_commit@2",
                    "fed_crash_after_ack@2",
                ][rng.below(3) as usize];
                m.nodes[r].spawn_worker(&[("SYNC_FAILPOINTS", fp)]);
            }
        }
        eprintln!("round {round}: {:?} on {s}→{r}", what);
        concurrent_writes(&m, seed ^ round, 20);
        // Restart dead workers now and then (a failpoint worker may still be running).
        for n in &mut m.nodes {
            if n.worker.is_none() || (rng.below(2) == 0 && n.worker_exited()) {
                n.spawn_worker(&[]);
            }
        }
    }
    m.heal_all();
    // Fresh workers everywhere: one still armed with a failpoint would abort once the healed
    // links reach it, after this point.
    for n in &mut m.nodes {
        n.start_worker(&[]);
    }
    m.quiesce_within(Duration::from_secs(120));
    m.assert_converged("items");
    m.assert_exactly_once();
    m.assert_no_quarantine();
    eprintln!("seeded_random_chaos: converged (FEDCHAOS_SEED={seed})");
}

/// A hand-driven receiver against A's sender endpoint: a correct MAC is welcomed (and A
/// proves itself back); the same `auth` frame replayed on a new connection (another
/// challenge) is refused; so are a wrong secret and a dialer with A's own node id; each
/// failure is recorded without the secret.
#[test]
fn replayed_auth_wrong_secret_and_self_link_are_refused() {
    use futures::{SinkExt, StreamExt};
    use sync_worker::federation::{auth, frames::close, frames::Frame, PATH};
    use tokio_tungstenite::tungstenite::Message;

    let mut m = Mesh::start("fc_auth", &["a"], ITEMS, &[]);
    let secret = "the-r-secret-0123456789";
    m.node("a").exec(&format!(
        "SELECT pg_sync.add_peer('r', 'ws://127.0.0.1:1', '{secret}', direction => 'push')"
    ));
    let url = format!("ws://127.0.0.1:{}{PATH}", m.nodes[0].port);
    // One handshake: the challenge's nonce, then `answer` builds the auth frame from it;
    // returns the nonce and what came back (a frame, or the close code).
    let attempt = |answer: &dyn Fn(&str) -> Frame| -> (String, Result<Frame, u16>) {
        block_on(async {
            // A healthy worker takes the federation lock on its link task's first round (up
            // to REGISTRY_POLL later, more on a loaded machine); until then it answers every
            // link with a standby close. Mesh::start waits for links, and this mesh has none.
            let deadline = Instant::now() + Duration::from_secs(30);
            let (mut ws, sn) = loop {
                let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
                    .await
                    .unwrap();
                match ws.next().await {
                    Some(Ok(Message::Text(t))) => match Frame::parse(&t).unwrap() {
                        Frame::Challenge { nonce, node_id, .. } => {
                            assert_eq!(node_id, "a");
                            break (ws, nonce);
                        }
                        other => panic!("expected a challenge: {other:?}"),
                    },
                    Some(Ok(Message::Close(Some(f))))
                        if u16::from(f.code) == close::STANDBY && Instant::now() < deadline =>
                    {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    other => panic!("expected a challenge: {other:?}"),
                }
            };
            ws.send(Message::text(answer(&sn).to_text())).await.unwrap();
            let back = loop {
                match ws.next().await {
                    Some(Ok(Message::Text(t))) => break Ok(Frame::parse(&t).unwrap()),
                    Some(Ok(Message::Close(Some(f)))) => break Err(u16::from(f.code)),
                    Some(Ok(_)) => continue,
                    other => panic!("connection ended without a close frame: {other:?}"),
                }
            };
            (sn, back)
        })
    };
    let rn = auth::nonce();
    let honest = |sn: &str| Frame::Auth {
        node_id: "r".into(),
        nonce: rn.clone(),
        mac: auth::mac(secret, auth::RECEIVER_TAG, "r", "a", sn, &rn),
    };
    let (sn1, back) = attempt(&honest);
    match back {
        Ok(Frame::Welcome { mac, .. }) => assert!(
            auth::verify(secret, auth::SENDER_TAG, "r", "a", &sn1, &rn, &mac),
            "A's proof does not verify"
        ),
        other => panic!("expected welcome: {other:?}"),
    }
    // The recorded auth frame, replayed against a fresh challenge.
    let recorded = honest(&sn1);
    let (sn2, back) = attempt(&|_| recorded.clone());
    assert_ne!(sn1, sn2, "the sender repeated a nonce");
    assert_eq!(
        back,
        Err(close::AUTH_FAILED),
        "a replayed auth frame was accepted"
    );
    let (_, back) = attempt(&|sn| Frame::Auth {
        node_id: "r".into(),
        nonce: rn.clone(),
        mac: auth::mac(
            "not-the-secret-000000",
            auth::RECEIVER_TAG,
            "r",
            "a",
            sn,
            &rn,
        ),
    });
    assert_eq!(back, Err(close::AUTH_FAILED));
    let (_, back) = attempt(&|sn| Frame::Auth {
        node_id: "a".into(),
        nonce: rn.clone(),
        mac: auth::mac(secret, auth::RECEIVER_TAG, "a", "a", sn, &rn),
    });
    assert_eq!(back, Err(close::FORBIDDEN));
    let a = m.node("a");
    let events = a.text(
        "SELECT string_agg(event || ':' || (detail->>'reason'), ',' ORDER BY id) FROM pg_sync.peer_events WHERE event = 'auth_failed'",
    );
    assert!(
        events.contains("bad_mac") && events.contains("self_link"),
        "{events}"
    );
    assert_eq!(
        a.int(&format!(
            "SELECT count(*) FROM pg_sync.peer_events WHERE detail::text LIKE '%{secret}%' OR detail::text LIKE '%not-the-secret%'"
        )),
        0
    );
}

/// Rows of `items` on a node whose id starts with `prefix`.
fn count_like(n: &mut Node, prefix: &str) -> i64 {
    n.int(&format!(
        "SELECT count(*) FROM items WHERE id LIKE '{prefix}%'"
    ))
}

/// kill -9 of the sender's worker mid-frame (a 3,000-row transaction crossing a slowed link is
/// cut off part way) and mid-batch (the receiver is applying the frame, blocked on a row lock,
/// when the sender dies, so its ack is lost): the receiver never shows part of a source
/// transaction, and after the sender returns nothing is lost, applied or logged twice.
#[test]
fn sender_killed_mid_frame_and_mid_batch() {
    let mut m = Mesh::start("fc_skill", &["a", "b"], ITEMS, &Mesh::full(2));
    m.node("a")
        .exec("INSERT INTO items VALUES ('warm', 'a', 0, 'g0')");
    m.quiesce();

    // Mid-frame: A → B slowed (100 ms per chunk); A dies once about half the frame (about 1 MB,
    // one frame: a batch never splits a transaction) crossed.
    m.proxy("a", "b")
        .set(|f| f.delay = Duration::from_millis(100));
    let base = m.proxy("a", "b").data_bytes.load(Ordering::Relaxed);
    m.node("a").exec(
        "INSERT INTO items SELECT 'big' || g, repeat('x', 100), g, 'g1' FROM generate_series(1, 3000) g",
    );
    {
        let p = m.proxy("a", "b").data_bytes.clone();
        wait_for(
            "part of the frame to cross",
            Duration::from_secs(60),
            || p.load(Ordering::Relaxed) - base > 500 * 1024,
        );
    }
    // The link goes down with the worker, so what A had already written into its socket
    // (a graceful close would still deliver it) is lost with it, as on a real crash: B got part
    // of the frame, then the connection ended.
    m.proxy("a", "b").cut();
    m.node("a").kill9();
    m.proxy("a", "b").heal();
    let crossed = m.proxy("a", "b").data_bytes.load(Ordering::Relaxed) - base;
    eprintln!("killed A's worker after {crossed} bytes of the frame");
    // B writes meanwhile; it holds none of A's transaction while A is down.
    m.node("b")
        .exec("INSERT INTO items VALUES ('b-while-a-down', 'b', 1, 'g0')");
    for _ in 0..10 {
        assert_eq!(
            count_like(m.node("b"), "big"),
            0,
            "B shows part of A's transaction"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    m.node("a").start_worker(&[]);
    check_all(&mut m);
    assert_eq!(count_like(m.node("b"), "big"), 3000);

    // Mid-batch: B's apply of A's next transaction waits on a row B's test session locks; A's
    // worker dies meanwhile, then the lock goes and B's apply commits with no one to ack to.
    let url = m.node("b").cluster.url("app");
    let mut locker =
        pg_sync_tests::postgres::Client::connect(&url, pg_sync_tests::postgres::NoTls).unwrap();
    locker
        .batch_execute("BEGIN; SELECT * FROM items WHERE id = 'warm' FOR UPDATE")
        .unwrap();
    m.node("a").exec(
        "BEGIN;
         INSERT INTO items SELECT 'mid' || g, 'm', g, 'g2' FROM generate_series(1, 2000) g;
         UPDATE items SET b = 7 WHERE id = 'warm';
         COMMIT;",
    );
    let started = Instant::now();
    loop {
        let waiting = m.node("b").int(
            "SELECT count(*) FROM pg_stat_activity
              WHERE query LIKE '%apply_peer_batch%' AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()",
        );
        if waiting > 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "B's apply never waited"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(count_like(m.node("b"), "mid"), 0);
    m.node("a").kill9();
    std::thread::sleep(Duration::from_millis(300));
    locker.batch_execute("COMMIT").unwrap();
    wait_for(
        "B's apply to commit without the sender",
        Duration::from_secs(30),
        || {
            let n = count_like(m.node("b"), "mid");
            assert!(n == 0 || n == 2000, "B showed {n} of 2000 rows");
            n == 2000
        },
    );
    m.node("b")
        .exec("UPDATE items SET a = 'b-edit' WHERE id = 'mid7'");
    m.node("a").start_worker(&[]);
    check_all(&mut m);
    assert_eq!(
        m.node("a")
            .text("SELECT a || '/' || b FROM items WHERE id = 'mid7'"),
        "b-edit/7"
    );
}

/// A second sync_worker started against B's database while the first runs: it stands by (no
/// receiver link, its sender endpoint refuses with 4506, a `standby` event), so nothing is
/// applied or sent twice; when the first is killed -9 it takes over and the links flow.
#[test]
fn two_workers_on_one_database() {
    let mut m = Mesh::start("fc_twin", &["a", "b"], ITEMS, &Mesh::full(2));
    m.node("a")
        .exec("INSERT INTO items VALUES ('one', 'a', 1, 'g0')");
    m.quiesce();
    let twin_port = common::free_port();
    let twin = common::Worker::start_with(&m.nodes[1].cluster, "app", twin_port, &[]);
    std::thread::sleep(Duration::from_secs(2));
    concurrent_writes(&m, 41, 60);
    check_all(&mut m);
    // A served one link to B (B's first worker), never a second one from the twin.
    assert_eq!(
        m.node("a").int(
            "SELECT count(*) FROM pg_sync.peer_events
              WHERE peer = 'b' AND event = 'connected' AND detail->>'direction' = 'out'"
        ),
        1,
        "A's sender served B more than once"
    );
    let metrics = block_on(common::http_get(twin_port, "/metrics"))
        .map(|(_, b)| b)
        .unwrap_or_default();
    assert!(
        !metrics.contains("pg_sync_peer_up{direction=\"in\",peer=\"a\"} 1"),
        "the twin pulls from A:\n{metrics}"
    );
    assert_eq!(
        m.node("b")
            .int("SELECT count(*) FROM pg_sync.peer_events WHERE event = 'standby'"),
        1,
        "the twin did not say it stands by"
    );
    // The twin's sender endpoint refuses a dialer.
    let refused = block_on(async {
        use futures::StreamExt;
        let url = format!(
            "ws://127.0.0.1:{twin_port}{}",
            sync_worker::federation::PATH
        );
        let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str()).await.ok()?;
        loop {
            match ws.next().await {
                Some(Ok(tokio_tungstenite::tungstenite::Message::Close(Some(f)))) => {
                    return Some(u16::from(f.code))
                }
                Some(Ok(_)) => continue,
                _ => return None,
            }
        }
    });
    assert_eq!(
        refused,
        Some(sync_worker::federation::frames::close::STANDBY)
    );
    // The first worker dies: the twin takes over both directions (A now dials the twin).
    m.node("b").kill9();
    m.proxy("b", "a").set_upstream(twin_port);
    m.node("b").port = twin_port;
    m.node("b").worker = Some(twin);
    concurrent_writes(&m, 42, 40);
    check_all(&mut m);
    assert!(
        m.node("b").int(
            "SELECT count(*) FROM pg_sync.peer_events WHERE event = 'connected' AND detail->>'direction' = 'in'"
        ) >= 2
    );
}

/// Federation runs in the worker that streams the replication slot (review rev13c): its
/// senders are woken by that worker's publishes. Here B's federation-lock session is ended
/// again and again while a twin worker (which cannot get the slot) stands by: the twin never
/// takes the links, B's first worker takes its lock back, and with the fallback poll set to an
/// hour B's writes still reach A (only a publish can wake the sender). Before, the twin took
/// the lock at the first chance, and its sender, never woken, delivered nothing.
#[test]
fn federation_stays_with_the_worker_that_streams_the_slot() {
    const LONG_POLL: &[(&str, &str)] = &[("SYNC_FEDERATION_POLL_MS", "3600000")];
    let mut m = mesh_where_b_wrote("fc_colead", LONG_POLL);
    let twin_port = common::free_port();
    // (Not healthy: it cannot stream the slot the first worker holds.)
    let twin = common::Worker::start_with(&m.nodes[1].cluster, "app", twin_port, LONG_POLL);
    std::thread::sleep(Duration::from_secs(2));
    let first_port = m.nodes[1].port;
    // Each end of the lock's session is a race for the lock between the two workers' next
    // ticks (the twin used to win about every other time): 20 of them.
    for round in 0..20 {
        end_b_lock_session(&mut m);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            assert!(
                !leads(twin_port),
                "round {round}: the twin (no slot) took the links"
            );
            if leads(first_port) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: B's first worker never led again"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // Let the links settle (the receivers' first reads found nothing new), then write: only
    // the first worker's publishes can wake its sender.
    for round in 0..2 {
        std::thread::sleep(Duration::from_secs(2));
        m.node("b").exec(&format!(
            "INSERT INTO items VALUES ('after{round}', 'b', 2, 'g0')"
        ));
        wait_for("B's write to reach A", Duration::from_secs(20), || {
            m.node("a").int(&format!(
                "SELECT count(*) FROM items WHERE id = 'after{round}'"
            )) == 1
        });
    }
    assert_eq!(
        m.node("b")
            .int("SELECT count(*) FROM pg_sync.peer_events WHERE event = 'leading'"),
        0,
        "the twin took over while the first worker lived"
    );
    drop(twin);
    m.assert_no_quarantine();
}

/// A partition past the retention cap: C is cut off while A and B write more than
/// SYNC_PEER_MAX_LAG (300) sync ids and compact down to one action; both release C
/// (`resync_required`). Healed, C's links are told `resync_required`, C resyncs (resync_peer)
/// by snapshot and converges, keeping what it wrote meanwhile. Then a `resync_peer` by hand
/// under writes brings the link back the same way.
#[test]
fn partition_beyond_the_retention_cap() {
    let env = [
        ("SYNC_RETENTION_MAX_ACTIONS", "1"),
        ("SYNC_COMPACT_INTERVAL_SECS", "1"),
        ("SYNC_PEER_MAX_LAG", "300"),
    ];
    let mut m = Mesh::start_with("fc_cap", &["a", "b", "c"], ITEMS, &Mesh::full(3), &env);
    concurrent_writes(&m, 31, 30);
    check_all(&mut m);
    m.isolate("c");
    for t in 0..5 {
        for n in ["a", "b"] {
            m.node(n).exec(&format!(
                "INSERT INTO items SELECT '{n}{t}-' || g, '{n}', g, 'g' || (g % 3) FROM generate_series(1, 40) g"
            ));
        }
    }
    concurrent_writes(&m, 32, 20);
    m.node("c")
        .exec("INSERT INTO items VALUES ('c-partitioned', 'c', 1, 'g1')");
    for n in ["a", "b"] {
        let node = m.node(n);
        wait_for(
            &format!("{n} to release C"),
            Duration::from_secs(60),
            || {
                node.text("SELECT resync_required FROM pg_sync.peer_status WHERE peer = 'c'")
                    == "true"
            },
        );
        assert_eq!(
            node.text(
                "SELECT detail->>'reason' FROM pg_sync.peer_events WHERE peer = 'c' AND event = 'resync_required'"
            ),
            "lag_cap"
        );
    }
    // The log C needs goes with the next compactions.
    for n in ["a", "b"] {
        let node = m.node(n);
        wait_for(
            &format!("{n} to compact past C's cursor"),
            Duration::from_secs(30),
            || {
                let c_at =
                    node.int("SELECT acked_sync_id FROM pg_sync.peer_holds WHERE peer = 'c'");
                node.int("SELECT pg_sync.retention_horizon()") > c_at
            },
        );
    }
    m.heal_all();
    concurrent_writes(&m, 33, 20);
    check_all(&mut m);
    assert_eq!(
        m.node("a")
            .int("SELECT count(*) FROM items WHERE id = 'c-partitioned'"),
        1
    );
    let c = m.node("c");
    for peer in ["a", "b"] {
        let ev = c.text(&format!(
            "SELECT string_agg(event, ',' ORDER BY id) FROM pg_sync.peer_events WHERE peer = '{peer}'"
        ));
        for e in ["resync_required", "resync", "joined"] {
            assert!(
                ev.contains(e),
                "{e} missing from C's events for {peer}: {ev}"
            );
        }
    }
    for n in ["a", "b"] {
        assert_eq!(
            m.node(n)
                .text("SELECT resync_required FROM pg_sync.peer_status WHERE peer = 'c'"),
            "false",
            "{n} holds its log for C again"
        );
    }
    // By hand, under writes: B re-bootstraps from A and carries on.
    let joins = m
        .node("b")
        .int("SELECT count(*) FROM pg_sync.peer_events WHERE peer = 'a' AND event = 'joined'");
    m.node("b").exec("SELECT pg_sync.resync_peer('a')");
    concurrent_writes(&m, 34, 30);
    {
        let b = m.node("b");
        wait_for("B's join to finish", Duration::from_secs(60), || {
            b.int("SELECT count(*) FROM pg_sync.peer_events WHERE peer = 'a' AND event = 'joined'")
                > joins
        });
    }
    check_all(&mut m);
}

/// Schema mismatch: B's `items` lacks column `b`, C's `notes.body` is an integer. A's changes
/// that do not fit are parked with their SQLSTATE (42703 undefined column, 22P02 invalid text)
/// and a `quarantined` event, while the other model keeps flowing on the same link; once the
/// schema is fixed, `retry_quarantined` applies them and every node converges.
#[test]
fn schema_mismatch_is_quarantined_and_retried() {
    let schema = "CREATE TABLE items (id text PRIMARY KEY, a text, b int, grp text);
         CREATE TABLE notes (id text PRIMARY KEY, body text);
         SELECT pg_sync.register_table('items', group_column => 'grp', federation => 'both');
         SELECT pg_sync.register_table('notes', federation => 'both');";
    let mut m = Mesh::start(
        "fc_schema",
        &["a", "b", "c"],
        schema,
        &Mesh::pairs(&[(0, 1), (0, 2)]),
    );
    m.node("b").exec("ALTER TABLE items DROP COLUMN b");
    m.node("c")
        .exec("ALTER TABLE notes ALTER COLUMN body TYPE int USING 0");
    m.node("a").exec(
        "INSERT INTO items VALUES ('s1', 'x', 5, 'g1');
         INSERT INTO notes VALUES ('n1', 'hello');",
    );
    m.quiesce();
    m.node("a").exec(
        "INSERT INTO items VALUES ('s2', 'y', 6, 'g1');
         INSERT INTO notes VALUES ('n2', 'world');
         UPDATE items SET a = 'x2' WHERE id = 's1';",
    );
    m.quiesce();
    for (n, model, code, flowing) in [
        ("b", "items", "42703", "notes"),
        ("c", "notes", "22P02", "items"),
    ] {
        let node = m.node(n);
        assert_eq!(
            node.text(
                "SELECT string_agg(DISTINCT sqlstate || ' ' || (change->>'model'), ',') FROM pg_sync.peer_quarantine"
            ),
            format!("{code} {model}"),
            "{n}'s quarantine"
        );
        assert!(
            node.int("SELECT count(*) FROM pg_sync.peer_events WHERE event = 'quarantined'") > 0
        );
        assert_eq!(
            node.int(&format!("SELECT count(*) FROM {flowing}")),
            2,
            "{n}: {flowing} stopped flowing"
        );
        assert!(node.int("SELECT open_quarantine FROM pg_sync.peer_status WHERE peer = 'a'") > 0);
    }
    let msg = m
        .node("b")
        .text("SELECT min(message) FROM pg_sync.peer_quarantine");
    assert!(msg.contains("\"b\""), "the message names the column: {msg}");
    // Fixed, retried: applied.
    m.node("b").exec("ALTER TABLE items ADD COLUMN b int");
    m.node("c")
        .exec("ALTER TABLE notes ALTER COLUMN body TYPE text");
    for n in ["b", "c"] {
        assert_eq!(m.node(n).int("SELECT pg_sync.retry_quarantined('a')"), 0);
    }
    m.node("c")
        .exec("UPDATE notes SET body = 'from-c' WHERE id = 'n2'");
    check_all(&mut m);
    m.assert_converged("notes");
    assert_eq!(
        m.node("b")
            .text("SELECT a || '/' || b FROM items WHERE id = 's1'"),
        "x2/5"
    );
}

/// The federation mode of a model changed while the link runs, writes on both sides: the
/// sender sends what was logged while it sent (push/both) and nothing logged while it did not,
/// whatever the receiver's lag when the mode changed; the receiver takes what arrives while it
/// takes (pull/both) and skips (without parking) what arrives while it does not.
#[test]
fn federation_modes_toggled_while_the_link_runs() {
    let mut m = Mesh::start("fc_modes", &["a", "b"], ITEMS, &Mesh::full(2));
    let mode = |m: &mut Mesh, n: &str, f: &str| {
        m.node(n).exec(&format!(
            "SELECT pg_sync.register_table('items', group_column => 'grp', federation => '{f}')"
        ));
    };
    let has = |m: &mut Mesh, n: &str, id: &str| -> bool {
        m.node(n)
            .int(&format!("SELECT count(*) FROM items WHERE id = '{id}'"))
            == 1
    };
    m.node("a")
        .exec("INSERT INTO items VALUES ('m0', 'a', 0, 'g0')");
    m.quiesce();
    // Sender side, with B lagging (A's frames held): m1 logged while A sends, m2 while A only
    // pulls, m3 after A sends again; then m4 while it sends and m5 after it stopped.
    m.proxy("a", "b").set(|f| f.freeze_data = true);
    m.node("a")
        .exec("INSERT INTO items VALUES ('m1', 'a', 1, 'g0')");
    mode(&mut m, "a", "pull");
    m.node("a")
        .exec("INSERT INTO items VALUES ('m2', 'a', 2, 'g0')");
    m.node("b")
        .exec("INSERT INTO items VALUES ('b1', 'b', 1, 'g0')");
    mode(&mut m, "a", "both");
    m.node("a")
        .exec("INSERT INTO items VALUES ('m3', 'a', 3, 'g0')");
    m.node("a")
        .exec("INSERT INTO items VALUES ('m4', 'a', 4, 'g0')");
    mode(&mut m, "a", "pull");
    m.node("a")
        .exec("INSERT INTO items VALUES ('m5', 'a', 5, 'g0')");
    m.proxy("a", "b").heal();
    m.quiesce();
    for (id, sent) in [
        ("m1", true),
        ("m2", false),
        ("m3", true),
        ("m4", true),
        ("m5", false),
    ] {
        assert_eq!(has(&mut m, "b", id), sent, "{id} on B");
    }
    assert!(has(&mut m, "a", "b1"), "A (pull) took B's write");
    mode(&mut m, "a", "both");

    // Receiver side: B stops taking (push: it only sends), then takes again.
    mode(&mut m, "b", "push");
    m.node("a")
        .exec("INSERT INTO items VALUES ('r1', 'a', 1, 'g0')");
    m.node("b")
        .exec("INSERT INTO items VALUES ('b2', 'b', 2, 'g0')");
    m.quiesce();
    mode(&mut m, "b", "both");
    m.node("a")
        .exec("INSERT INTO items VALUES ('r2', 'a', 2, 'g0')");
    m.quiesce();
    assert!(!has(&mut m, "b", "r1"), "B took r1 while in push mode");
    assert!(has(&mut m, "b", "r2"));
    assert!(has(&mut m, "a", "b2"), "B (push) sent b2");
    // Off on B: neither direction, while both sides write.
    mode(&mut m, "b", "off");
    m.node("a")
        .exec("INSERT INTO items VALUES ('o1', 'a', 1, 'g0')");
    m.node("b")
        .exec("INSERT INTO items VALUES ('o2', 'b', 2, 'g0')");
    m.quiesce();
    mode(&mut m, "b", "both");
    m.node("a")
        .exec("INSERT INTO items VALUES ('o3', 'a', 3, 'g0')");
    m.node("b")
        .exec("INSERT INTO items VALUES ('o4', 'b', 4, 'g0')");
    m.quiesce();
    assert!(!has(&mut m, "b", "o1") && !has(&mut m, "a", "o2"));
    assert!(has(&mut m, "b", "o3") && has(&mut m, "a", "o4"));
    // Nothing parked: a mode is a choice, not a failure.
    m.assert_no_quarantine();
    m.assert_exactly_once();
}

/// One soak statement on `id`: an insert, column update, delete or upsert, chosen by `pick`.
fn soak_statement(who: &str, i: u64, id: &str, pick: u64, v: u64) -> String {
    match pick {
        0..=29 => format!(
            "INSERT INTO items VALUES ('{id}', '{who}{i}', {v}, 'g{}') ON CONFLICT (id) DO NOTHING",
            v % 3
        ),
        30..=49 => format!("UPDATE items SET a = '{who}{i}' WHERE id = '{id}'"),
        50..=69 => format!("UPDATE items SET b = b + 1 WHERE id = '{id}'"),
        70..=74 => format!("UPDATE items SET grp = 'g{}' WHERE id = '{id}'", v % 3),
        75..=89 => format!("DELETE FROM items WHERE id = '{id}'"),
        _ => format!(
            "INSERT INTO items VALUES ('{id}', '{who}{i}', {v}, 'g1')
             ON CONFLICT (id) DO UPDATE SET a = excluded.a, b = excluded.b"
        ),
    }
}

/// What one node's soak writer did.
#[derive(Default, Debug)]
struct SoakWrites {
    writes: u64,
    transactions: u64,
    retries: u64,
}

/// Paced writes on one node until `until`: `rate` statements a second (caught up as fast as
/// the node allows when behind), grouped per 20 ms tick into one transaction of at most 25,
/// over `keys` keys shared by every node plus 16 hot ones (same-row conflicts across nodes).
fn soak_writer(
    url: &str,
    who: &str,
    seed: u64,
    rate: u64,
    keys: u64,
    until: Instant,
) -> SoakWrites {
    let mut c =
        pg_sync_tests::postgres::Client::connect(url, pg_sync_tests::postgres::NoTls).unwrap();
    let mut rng = Rng(seed);
    let mut out = SoakWrites::default();
    let start = Instant::now();
    while Instant::now() < until {
        let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
        if out.writes >= due {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        let n = (due - out.writes).min(25);
        let sql: Vec<String> = (0..n)
            .map(|k| {
                let key = if rng.below(5) == 0 {
                    rng.below(16)
                } else {
                    rng.below(keys)
                };
                soak_statement(
                    who,
                    out.writes + k,
                    &format!("k{key}"),
                    rng.below(100),
                    rng.below(1000),
                )
            })
            .collect();
        // Several statements in one simple query run as one transaction. A local transaction
        // and an applying batch touching the same rows in another order can deadlock; like any
        // application, retry the loser, after a random pause; a transaction that keeps losing
        // is split into one-statement transactions (a 25-row one lost 10 times in a row once).
        let joined = sql.join(";\n");
        let mut tries = 0;
        let mut txns = 1;
        while let Err(e) = c.batch_execute(&joined) {
            soak_retryable(who, &e);
            tries += 1;
            out.retries += 1;
            std::thread::sleep(Duration::from_millis(5 + rng.below(50)));
            if tries >= 3 {
                txns = sql.len() as u64;
                for one in &sql {
                    let mut again = 0;
                    while let Err(e) = c.batch_execute(one) {
                        soak_retryable(who, &e);
                        again += 1;
                        out.retries += 1;
                        assert!(again < 50, "{who}: one statement deadlocked 50 times: {e}");
                        std::thread::sleep(Duration::from_millis(5 + rng.below(50)));
                    }
                }
                break;
            }
        }
        out.writes += n;
        out.transactions += txns;
    }
    out
}

/// Panics unless `e` is a deadlock or serialization failure (the retryable losers).
fn soak_retryable(who: &str, e: &pg_sync_tests::postgres::Error) {
    let code = e.code().map(|c| c.code().to_owned());
    if !matches!(code.as_deref(), Some("40P01" | "40001")) {
        panic!(
            "{who}: {e}: {:?}",
            e.as_db_error().map(|d| (d.code(), d.message(), d.where_()))
        );
    }
}

/// The worker's resident set in KiB (None once the process is gone).
fn vm_rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn median(v: &[u64]) -> u64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// The three-region soak (issue 10, `make bench-soak`; not in `make test`): three clusters and
/// three workers in full mesh, `SOAK_RATE` (500) writes a second on every node for
/// `SOAK_SECONDS` (600) over a shared key space, a random directed link cut for 1–8 s every
/// 3–15 s (seeded: `SOAK_SEED` replays), each worker's VmRSS sampled every 10 s. Then every
/// link healed, a quiescence barrier, and the checks: rows and per-row LWW state equal on every
/// node, nothing logged twice, no log growth after quiescence, nothing quarantined, and each
/// worker's RSS flat (last-minute median at most 1.5x the first minute's + 8 MiB).
#[test]
#[ignore]
fn three_region_soak() {
    let seconds = env_u64("SOAK_SECONDS", 600);
    let rate = env_u64("SOAK_RATE", 500);
    let keys = env_u64("SOAK_KEYS", 5000);
    let seed = env_u64(
        "SOAK_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1,
    );
    eprintln!("soak: SOAK_SEED={seed} SOAK_SECONDS={seconds} SOAK_RATE={rate} SOAK_KEYS={keys}");
    let mut m = Mesh::start_with(
        "soak",
        &["a", "b", "c"],
        ITEMS,
        &Mesh::full(3),
        // Per-batch debug logging at 1,500 writes/s would be the soak's biggest cost.
        &[("RUST_LOG", "sync_worker=warn")],
    );
    let pids: Vec<u32> = m
        .nodes
        .iter()
        .map(|n| n.worker.as_ref().unwrap().child.id())
        .collect();
    let mut rng = Rng(seed);
    let start = Instant::now();
    let until = start + Duration::from_secs(seconds);
    // (seconds since start, RSS KiB per worker)
    let mut rss: Vec<(u64, Vec<u64>)> = vec![];
    let mut cuts: Vec<String> = vec![];
    let writes: Vec<SoakWrites> = std::thread::scope(|s| {
        let writers: Vec<_> = m
            .nodes
            .iter()
            .enumerate()
            .map(|(k, n)| {
                let url = n.cluster.url("app");
                let who = n.name.clone();
                let seed = seed.wrapping_mul(31).wrapping_add(k as u64 + 1);
                s.spawn(move || soak_writer(&url, &who, seed, rate, keys, until))
            })
            .collect();
        // (link, healed at)
        let mut open: Vec<((usize, usize), Instant)> = vec![];
        let mut next_cut = start + Duration::from_secs(3 + rng.below(13));
        let mut next_sample = start;
        while Instant::now() < until {
            let now = Instant::now();
            open.retain(|&(l, at)| {
                if now >= at {
                    m.proxies[&l].heal();
                }
                now < at
            });
            if now >= next_cut {
                let l = m.links[rng.below(m.links.len() as u64) as usize];
                let secs = 1 + rng.below(8);
                if !open.iter().any(|&(o, _)| o == l) {
                    m.proxies[&l].cut();
                    open.push((l, now + Duration::from_secs(secs)));
                    cuts.push(format!(
                        "{}s {}→{} {secs}s",
                        (now - start).as_secs(),
                        m.nodes[l.0].name,
                        m.nodes[l.1].name
                    ));
                }
                next_cut = now + Duration::from_secs(3 + rng.below(13));
            }
            if now >= next_sample {
                let t = (now - start).as_secs();
                let sample: Vec<u64> = pids
                    .iter()
                    .map(|&p| vm_rss_kib(p).expect("a worker died during the soak"))
                    .collect();
                eprintln!("soak: t={t}s rss KiB {sample:?}");
                rss.push((t, sample));
                next_sample += Duration::from_secs(10);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        writers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let end = Instant::now();
    m.heal_all();
    m.quiesce_within(Duration::from_secs(600));
    let converge = end.elapsed();
    let after: Vec<u64> = pids.iter().map(|&p| vm_rss_kib(p).unwrap_or(0)).collect();
    let logs: Vec<i64> = m
        .nodes
        .iter_mut()
        .map(|n| n.int("SELECT count(*) FROM pg_sync.sync_actions"))
        .collect();
    let rows = m.nodes[0].int("SELECT count(*) FROM items");

    eprintln!("soak summary (SOAK_SEED={seed}):");
    eprintln!("  ran {seconds} s at {rate} writes/s offered per node, {keys} keys (+16 hot)");
    for (n, w) in m.nodes.iter().zip(&writes) {
        eprintln!(
            "  {}: offered {} achieved {} ({:.0}/s) in {} transactions, {} deadlock retries",
            n.name,
            rate * seconds,
            w.writes,
            w.writes as f64 / seconds as f64,
            w.transactions,
            w.retries
        );
    }
    eprintln!("  link cuts: {} ({})", cuts.len(), cuts.join(", "));
    eprintln!(
        "  converged {:.1} s after the writes stopped",
        converge.as_secs_f64()
    );
    eprintln!("  items rows {rows}; sync_actions per node {logs:?}");
    let mut grew = vec![];
    for (i, n) in m.nodes.iter().enumerate() {
        let series: Vec<u64> = rss.iter().map(|(_, s)| s[i]).collect();
        let first: Vec<u64> = rss
            .iter()
            .filter(|(t, _)| *t < 60)
            .map(|(_, s)| s[i])
            .collect();
        let last: Vec<u64> = rss
            .iter()
            .filter(|(t, _)| *t + 60 >= seconds)
            .map(|(_, s)| s[i])
            .collect();
        let (f, l) = (median(&first), median(&last));
        let bound = f * 3 / 2 + 8 * 1024;
        eprintln!(
            "  worker {} RSS KiB: first-minute median {f}, last-minute median {l} (bound {bound}), after quiescence {}; series {series:?}",
            n.name, after[i]
        );
        if l > bound {
            grew.push(format!("{}: {f} → {l} KiB", n.name));
        }
    }
    m.assert_converged("items");
    m.assert_exactly_once();
    m.assert_no_quarantine();
    assert!(grew.is_empty(), "worker memory grew: {}", grew.join("; "));
    eprintln!("soak: converged, exactly once, memory flat (SOAK_SEED={seed})");
}

/// Review rev14a F1: a lone worker whose replication session flaps (its walsender is ended
/// again and again, e.g. a flaky replication path; the sequencer's backoff reaches 10 s) keeps
/// leading: with no other worker streaming the slot there is nobody to hand the links to (it
/// once recorded `standby` and `leading` for a second worker that never existed, and inbound
/// federation, which needs no slot, stopped meanwhile).
#[test]
fn a_lone_worker_whose_replication_flaps_keeps_federation() {
    let mut m = mesh_where_b_wrote("fc_flap", &[]);
    let url = m.nodes[1].cluster.url("app");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flapper = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut c =
                pg_sync_tests::postgres::Client::connect(&url, pg_sync_tests::postgres::NoTls)
                    .unwrap();
            let mut ended = 0;
            while !stop.load(Ordering::Relaxed) {
                ended += c
                    .query_one(
                        "SELECT count(*) FILTER (WHERE pg_terminate_backend(active_pid))
                           FROM pg_replication_slots WHERE slot_name = 'pg_sync' AND active",
                        &[],
                    )
                    .map(|r| r.get::<_, i64>(0))
                    .unwrap_or(0);
                std::thread::sleep(Duration::from_millis(100));
            }
            ended
        })
    };
    // Inbound federation at B (A→B) does not need B's slot: watch whether it keeps running,
    // until the sequencer's backoff has reached 10 s (seven failed sessions: 0.2 s doubling)
    // and then for longer than `LEAD_WITHOUT_SLOT` (5 s) into that 10 s wait.
    let started = Instant::now();
    let mut in_down_at = None;
    let mut capped_at: Option<Instant> = None;
    while started.elapsed() < Duration::from_secs(35)
        && capped_at.is_none_or(|at| at.elapsed() < Duration::from_secs(7))
    {
        if capped_at.is_none() && reconnects(m.node("b").port) >= 7 {
            capped_at = Some(Instant::now());
        }
        let metrics = m.node("b").metrics();
        if in_down_at.is_none()
            && !metrics.contains("pg_sync_peer_up{direction=\"in\",peer=\"a\"} 1")
        {
            in_down_at = Some(started.elapsed());
        }
        if m.node("b")
            .int("SELECT count(*) FROM pg_sync.peer_events WHERE event = 'standby'")
            > 0
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    let ended = flapper.join().unwrap();
    // Streaming again: the worker takes the lock back.
    wait_for("B leads again", Duration::from_secs(40), || {
        leads(m.node("b").port)
    });
    let events = self_events(&mut m);
    eprintln!(
        "walsenders ended: {ended}; A→B link first seen down after {in_down_at:?}; B's (self) events:\n{events}"
    );
    assert_eq!(
        events, "",
        "a lone worker recorded standby/leading (there is no other worker)"
    );
}

/// Review rev14a F2: when the leading worker dies, the standby takes the lock within about half a
/// second (docs/federation.md), not once its own sequencer's backoff (up to 10 s) lets it take
/// the slot: it asks as soon as no other worker's walsender streams the slot. Three failovers.
#[test]
fn the_standby_leads_soon_after_the_first_worker_dies() {
    let mut m = mesh_where_b_wrote("fc_failover", &[]);
    let mut leader = m.node("b").worker.take().unwrap();
    let mut took = vec![];
    for round in 0..3 {
        let twin_port = common::free_port();
        let since = reconnects(leader.port);
        let mut twin = common::Worker::start_with(&m.nodes[1].cluster, "app", twin_port, &[]);
        // The two may have raced for the slot after the last kill: federation follows the one
        // that streams it, so either may lead now, but exactly one. The other's replication
        // sessions fail (the slot is held), each sleeping twice as long as the last (0.2 s up
        // to 10 s): it is killed right after a failure past its sixth in a row, when it sleeps
        // at least 6.4 s, so a standby that took the lock only at its next attempt would lead
        // too late. (Failed sessions are counted in a row: none of them streamed.)
        let backing_off =
            |total: u64, before: u64| total >= before + 6 || (total > before && total >= 7);
        wait_for(
            "one worker leading, the other backing off",
            Duration::from_secs(90),
            || {
                let (l, t) = (leads(leader.port), leads(twin_port));
                (l && backing_off(reconnects(twin_port), 0))
                    || (t && backing_off(reconnects(leader.port), since))
            },
        );
        let (l, t) = (leads(leader.port), leads(twin_port));
        assert!(l != t, "round {round}: leading: first {l}, twin {t}");
        if t {
            std::mem::swap(&mut leader, &mut twin);
        }
        let standby_port = twin.port;
        leader.kill9();
        let killed = Instant::now();
        while !leads(standby_port) {
            assert!(
                killed.elapsed() < Duration::from_secs(40),
                "the twin never led"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        took.push(killed.elapsed());
        leader = twin;
    }
    eprintln!("the twin pulled from A this long after the leader was killed: {took:?}");
    drop(leader);
    assert!(
        took.iter().all(|t| *t < Duration::from_secs(2)),
        "federation failed over in {took:?} (docs: the standby takes the lock within about half a second)"
    );
}

/// A two-node full mesh (`a`, `b`, workers run with `env`) in which B wrote a row that A has.
fn mesh_where_b_wrote(test: &str, env: &[(&str, &str)]) -> Mesh {
    let mut m = Mesh::start_with(test, &["a", "b"], ITEMS, &Mesh::full(2), env);
    m.node("b")
        .exec("INSERT INTO items VALUES ('before', 'b', 1, 'g0')");
    m.quiesce();
    m
}

/// B's worker killed, and its walsender gone: nothing streams B's slot.
fn stop_b(m: &mut Mesh) {
    m.node("b").kill9();
    wait_for("the old walsender to go", Duration::from_secs(10), || {
        m.node("b")
            .int("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'pg_sync' AND active")
            == 0
    });
}

/// B's `(self)` events (a worker's `standby` / `leading` notes), one a line, oldest first.
fn self_events(m: &mut Mesh) -> String {
    m.node("b").text(
        "SELECT coalesce(string_agg(format('%s %s %s', at, event, detail), E'\n' ORDER BY at), '')
           FROM pg_sync.peer_events WHERE peer = '(self)'",
    )
}

/// The `pg_sync_reconnects_total` of the worker at `port` (0 when it does not answer).
fn reconnects(port: u16) -> u64 {
    block_on(common::http_get(port, "/metrics"))
        .map(|(_, b)| b)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("pg_sync_reconnects_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Whether B's worker at `port` leads federation (its link from A is up).
fn leads(port: u16) -> bool {
    block_on(common::http_get(port, "/metrics"))
        .map(|(_, b)| b)
        .unwrap_or_default()
        .contains("pg_sync_peer_up{direction=\"in\",peer=\"a\"} 1")
}

/// Review rev14a F4: only another worker's walsender counts as "another worker streams the
/// slot": a lone worker whose sequencer is creating the slot (which waits for running
/// transactions) or peeking at it (the backlog peek path) from a client backend records no
/// `standby` / `leading` events.
#[test]
fn a_lone_worker_creating_its_slot_does_not_report_another_worker() {
    let mut m = mesh_where_b_wrote("fc_selfslot", &[]);
    stop_b(&mut m);
    // The slot is gone (dropped by the operator, or this is the first start): the worker
    // creates it, and the creation waits for this open transaction.
    m.node("b")
        .exec("SELECT pg_drop_replication_slot('pg_sync')");
    let mut open = pg_sync_tests::postgres::Client::connect(
        &m.nodes[1].cluster.url("app"),
        pg_sync_tests::postgres::NoTls,
    )
    .unwrap();
    open.batch_execute("BEGIN; SELECT pg_current_xact_id();")
        .unwrap();
    m.node("b").spawn_worker(&[]);
    std::thread::sleep(Duration::from_secs(4));
    let holder = m.node("b").text(
        "SELECT coalesce((SELECT format('active %s, pid %s: %s', s.active, s.active_pid, a.query)
                            FROM pg_replication_slots s LEFT JOIN pg_stat_activity a ON a.pid = s.active_pid
                           WHERE s.slot_name = 'pg_sync'), 'no slot')",
    );
    open.batch_execute("COMMIT").unwrap();
    wait_for("B leads", Duration::from_secs(30), || {
        leads(m.node("b").port)
    });
    let events = self_events(&mut m);
    eprintln!("the slot while the worker started: {holder}\nB's (self) events:\n{events}");
    assert_eq!(
        events, "",
        "a lone worker said another worker holds its slot"
    );
}

/// Review rev14a F5: a slot that cannot be streamed (here invalidated, `wal_status` 'lost', by
/// `max_slot_wal_keep_size` while the worker was down) does not stop federation on that node:
/// with no other worker streaming the slot, the worker leads, and A's changes are applied.
#[test]
fn a_lost_slot_does_not_stop_inbound_federation() {
    let mut m = mesh_where_b_wrote("fc_lostslot", &[]);
    stop_b(&mut m);
    m.node("b")
        .exec("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'");
    m.node("b").exec("SELECT pg_reload_conf()");
    for i in 0..4 {
        m.node("b").exec(&format!(
            "CREATE TABLE IF NOT EXISTS wal_filler (x int); INSERT INTO wal_filler SELECT generate_series(1, 20000); SELECT pg_switch_wal(); CHECKPOINT; -- {i}"
        ));
    }
    let wal_status = m.node("b").text(
        "SELECT coalesce(wal_status, 'none') FROM pg_replication_slots WHERE slot_name = 'pg_sync'",
    );
    assert_eq!(wal_status, "lost", "the slot was not invalidated");
    m.node("b").spawn_worker(&[]);
    m.node("a")
        .exec("INSERT INTO items VALUES ('from_a', 'a', 1, 'g0')");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut arrived = false;
    while Instant::now() < deadline {
        if m.node("b")
            .int("SELECT count(*) FROM items WHERE id = 'from_a'")
            == 1
        {
            arrived = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let events = self_events(&mut m);
    let up = m
        .node("b")
        .metrics()
        .lines()
        .filter(|l| l.starts_with("pg_sync_peer_up"))
        .collect::<Vec<_>>()
        .join("\n");
    let alive = m.node("b").worker.as_ref().is_some_and(|w| w.alive());
    let health = block_on(common::http_get(m.nodes[1].port, "/healthz"))
        .map(|(s, b)| format!("{s} {b}"))
        .unwrap_or_default();
    eprintln!("A's write reached B: {arrived}; B's worker alive: {alive}, /healthz: {health}; B's (self) events: {events:?}; B's peer_up:\n{up}");
    m.node("b").kill9();
    assert!(
        arrived,
        "A's write never reached B (B's slot is lost; federation never led)"
    );
}

/// A lone worker whose replication connection drops without the server noticing (the walsender
/// lingers, holding the slot, until `wal_sender_timeout`) knows that walsender for its own
/// (`application_name` with the worker's id). Before, federation took it for another worker
/// streaming the slot: the worker handed its links over to nobody and stood by until the
/// walsender went (up to a minute), and its sequencer could not stream meanwhile either (up to
/// `SYNC_SLOT_TAKEOVER_SECS`, 30 s). Now the next replication session terminates it at once,
/// and federation keeps running while it lingers. The connection drops seven times in a row, so
/// the sequencer's backoff (0.2 s doubling, at most 10 s) leaves the last walsenders lingering
/// past `LEAD_WITHOUT_SLOT` (5 s) before the next session starts.
#[test]
fn a_lone_workers_own_lingering_walsender_is_not_another_worker() {
    // B's worker reaches its Postgres through a proxy that can drop its replication connection.
    let (mut m, pg, _) = lone_worker_behind_a_proxy("fc_ownwal");
    // The walsender streaming B's slot for B's worker, if any ('' if none).
    let holder = |m: &mut Mesh| {
        m.node("b").text(
            "SELECT r.pid FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid
              WHERE s.slot_name = 'pg_sync' AND r.application_name LIKE 'pg_sync_worker %'",
        )
    };
    let mut dropped: Vec<String> = vec![];
    let mut streamed_again = vec![];
    let mut last_drop = Instant::now();
    for round in 0..7 {
        // A new session streams (the one before terminated the last one's walsender, still
        // lingering: the wait for a new holder is well below the 30 s stale-slot takeover).
        loop {
            let pid = holder(&mut m);
            if !pid.is_empty() && !dropped.contains(&pid) {
                dropped.push(pid);
                break;
            }
            assert!(
                last_drop.elapsed() < Duration::from_secs(20),
                "round {round}: B's worker did not stream again within 20 s after its replication connection dropped \
                 (its own walsender {pid:?} still holds the slot; it streamed again after {streamed_again:?})"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        if round > 0 {
            streamed_again.push(last_drop.elapsed());
        }
        pg.drop_replication();
        last_drop = Instant::now();
    }
    // The last walsender lingers, holding the slot, while the sequencer waits out its backoff.
    std::thread::sleep(Duration::from_secs(1));
    let lingering = dropped.last().unwrap().clone();
    assert_eq!(
        holder(&mut m),
        lingering,
        "the dropped connection's walsender does not linger (the scenario is not reproduced)"
    );
    // Past LEAD_WITHOUT_SLOT with the worker's own walsender holding the slot: inbound
    // federation (which needs no slot) still runs.
    std::thread::sleep(Duration::from_secs(5));
    m.node("a")
        .exec("INSERT INTO items VALUES ('from_a', 'a', 1, 'g0')");
    let sent = Instant::now();
    let mut arrived = None;
    while sent.elapsed() < Duration::from_secs(3) {
        if m.node("b")
            .int("SELECT count(*) FROM items WHERE id = 'from_a'")
            == 1
        {
            arrived = Some(sent.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let still = holder(&mut m);
    // Then the next session terminates it and streams: B's writes reach A again.
    m.node("b")
        .exec("INSERT INTO items VALUES ('from_b', 'b', 1, 'g0')");
    wait_for("B's write at A", Duration::from_secs(25), || {
        m.node("a")
            .int("SELECT count(*) FROM items WHERE id = 'from_b'")
            == 1
    });
    let left = m.node("b").int(&format!(
        "SELECT count(*) FROM pg_stat_activity WHERE pid IN ({})",
        dropped.join(", ")
    ));
    let events = m.node("b").text(
        "SELECT coalesce(string_agg(format('%s %s %s', at, event, detail), E'\n' ORDER BY at), '')
           FROM pg_sync.peer_events WHERE peer = '(self)'",
    );
    eprintln!(
        "B's walsenders dropped: {dropped:?}; streamed again after {streamed_again:?}; A's write reached B after \
         {arrived:?} (slot held by {still:?} then); B's write reached A {:?} after the last drop; {left} of them left; \
         B's (self) events:\n{events}",
        last_drop.elapsed()
    );
    assert!(
        arrived.is_some(),
        "A's write did not reach B within 3 s while B's own lingering walsender held the slot"
    );
    assert_eq!(
        events, "",
        "a lone worker took its own lingering walsender for another worker"
    );
    assert_eq!(
        left, 0,
        "B's worker left walsenders of its dropped connections (pids {dropped:?}) running"
    );
}

/// B's worker started through a `PgProxy` (its old worker killed first), leading.
fn lone_worker_behind_a_proxy(name: &str) -> (Mesh, PgProxy, String) {
    let mut m = Mesh::start(name, &["a", "b"], ITEMS, &Mesh::full(2));
    m.node("b")
        .exec("INSERT INTO items VALUES ('before', 'b', 1, 'g0')");
    m.quiesce();
    let pg = m.pg_proxy(m.idx("b"));
    m.node("b").kill9();
    wait_for("the old walsender to go", Duration::from_secs(10), || {
        m.node("b")
            .int("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'pg_sync' AND active")
            == 0
    });
    let url = format!("host=127.0.0.1 port={} user=postgres dbname=app", pg.port);
    m.node("b").start_worker(&[("DATABASE_URL", &url)]);
    wait_for("B leads", Duration::from_secs(30), || {
        leads(m.node("b").port)
    });
    (m, pg, url)
}

/// Review rev15b F1: the same network failure that leaves the worker's walsender lingering
/// (its end of the connections dropped, the server's ends open) leaves its federation lock
/// session lingering too: the worker's own old session still holds the lock, so the lone worker
/// records `standby` (another worker runs the links) and inbound federation stops until the
/// server notices the dead connection (TCP keepalive: two hours by default). Now the lock
/// session carries the worker's id (`application_name`), and the worker ends its own earlier
/// session when it finds it holding the lock.
#[test]
fn a_lone_worker_whose_connections_all_drop_keeps_leading() {
    let (mut m, pg, _) = lone_worker_behind_a_proxy("fc_alldrop");
    pg.drop_all();
    let dropped = Instant::now();
    let mut led_again = None;
    std::thread::sleep(Duration::from_secs(1));
    while dropped.elapsed() < Duration::from_secs(25) {
        if leads(m.node("b").port) {
            led_again = Some(dropped.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let holders = m.node("b").text(
        "SELECT coalesce(string_agg(format('%s %s %s', pid, backend_type, application_name), '; '), '')
           FROM pg_stat_activity WHERE pid IN (SELECT pid FROM pg_locks WHERE locktype = 'userlock')",
    );
    let events = self_events(&mut m);
    eprintln!(
        "B led again after {led_again:?}; lock held by: {holders}; B's (self) events:\n{events}"
    );
    assert!(
        led_again.is_some(),
        "B's lone worker did not lead again within 25 s (the lock is held by its own lingering session: {holders})"
    );
    assert_eq!(
        events, "",
        "a lone worker took its own lingering lock session for another worker"
    );
}

/// Review rev15b F2: the id is drawn at each start, so a worker restarted after its replication
/// connection dropped (the walsender lingering) takes its predecessor's walsender for another
/// worker: it stood by until its sequencer streamed, once `SYNC_SLOT_TAKEOVER_SECS` (30 s) had
/// passed. Now only a walsender whose worker replied lately counts as another worker streaming.
#[test]
fn a_restarted_worker_is_not_held_off_by_its_predecessors_walsender() {
    let (mut m, pg, url) = lone_worker_behind_a_proxy("fc_restartwal");
    // Killed before its sequencer's next session (200 ms backoff) could end the walsender.
    pg.drop_replication();
    m.node("b").kill9();
    let lingering = m.node("b").int(
        "SELECT count(*) FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid
          WHERE s.slot_name = 'pg_sync' AND r.application_name LIKE 'pg_sync_worker %'",
    );
    assert_eq!(
        lingering, 1,
        "the dropped connection's walsender does not linger (the scenario is not reproduced)"
    );
    let restarted = Instant::now();
    m.node("b").spawn_worker(&[("DATABASE_URL", &url)]);
    let mut led = None;
    while restarted.elapsed() < Duration::from_secs(45) {
        if leads(m.node("b").port) {
            led = Some(restarted.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let events = self_events(&mut m);
    eprintln!("the restarted worker led after {led:?}; B's (self) events:\n{events}");
    assert!(
        led.is_some_and(|t| t < Duration::from_secs(10)),
        "the restarted worker led only after {led:?} (its predecessor's walsender held the slot)"
    );
    assert_eq!(
        events, "",
        "a restarted lone worker took its predecessor's walsender for another worker"
    );
}

/// Ends the session holding B's federation lock (a race for it between B's workers follows).
fn end_b_lock_session(m: &mut Mesh) {
    m.node("b").exec(
        "SELECT pg_terminate_backend(pid) FROM pg_locks
          WHERE locktype = 'userlock' AND classid = 1885822835::oid AND granted
            AND pid <> pg_backend_pid()",
    );
    std::thread::sleep(Duration::from_millis(200));
}

/// The `application_name` of the session holding B's federation lock ('' if none).
fn b_lock_holder(m: &mut Mesh) -> String {
    m.node("b").text(
        "SELECT coalesce((SELECT a.application_name FROM pg_locks l
                            JOIN pg_stat_activity a ON a.pid = l.pid
                           WHERE l.locktype = 'userlock' AND l.classid = 1885822835::oid
                             AND l.objid = 2037277542::oid AND l.granted), '')",
    )
}

/// The `application_name` of the walsender streaming B's slot ('' if none).
fn b_slot_streamer(m: &mut Mesh) -> String {
    m.node("b").text(
        "SELECT coalesce((SELECT r.application_name FROM pg_replication_slots s
                            JOIN pg_stat_replication r ON r.pid = s.active_pid
                           WHERE s.slot_name = 'pg_sync'), '')",
    )
}

/// Review rev16a F1: `pg_stat_replication.reply_time` is the time the *replying worker*
/// stamped on its status update (its own clock, `pgwire_replication::current_pg_timestamp`),
/// not the server's. B's first worker, whose host clock is 15 s slow (below
/// `SYNC_SLOT_TAKEOVER_SECS`, so its slot is not taken from it), streams the slot and leads; a
/// twin with a true clock stands by. Each end of the lock's session is a race between them:
/// the twin, reading the streaming worker's replies as 15 s old, counts no other worker
/// streaming, asks for the lock, wins about every other race, and then never hands the links
/// back (it never sees the streamer as streaming). The same setup with both clocks true is
/// `federation_stays_with_the_worker_that_streams_the_slot`, which passes.
#[test]
fn a_slot_streaming_worker_with_a_slow_clock_keeps_federation() {
    let lib = common::clock_skew_library();
    const LONG_POLL: &[(&str, &str)] = &[("SYNC_FEDERATION_POLL_MS", "3600000")];
    let mut m = mesh_where_b_wrote("fc_slowclock", LONG_POLL);
    // B's first worker again, its clock 15 s slow.
    let mut slow: Vec<(&str, &str)> = LONG_POLL.to_vec();
    slow.push(("LD_PRELOAD", &lib));
    slow.push(("PG_SYNC_TEST_CLOCK_SKEW_SECS", "-15"));
    stop_b(&mut m);
    m.node("b").start_worker(&slow);
    let first_port = m.nodes[1].port;
    wait_for("B's slow worker leads", Duration::from_secs(30), || {
        leads(first_port)
    });
    let age = m.node("b").text(
        "SELECT round(extract(epoch FROM clock_timestamp() - reply_time))::text
           FROM pg_stat_replication LIMIT 1",
    );
    eprintln!("the streaming worker's reply_time is {age} s behind the server's clock");
    let twin_port = common::free_port();
    let twin = common::Worker::start_with(&m.nodes[1].cluster, "app", twin_port, LONG_POLL);
    std::thread::sleep(Duration::from_secs(2));
    for round in 0..20 {
        end_b_lock_session(&mut m);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if leads(twin_port) {
                // Given LEAD_WITHOUT_SLOT (5 s) and more, it should hand the links back.
                std::thread::sleep(Duration::from_secs(15));
                let (holder, streamer) = (b_lock_holder(&mut m), b_slot_streamer(&mut m));
                panic!(
                    "round {round}: the twin (no slot) took the links, and 15 s later still \
                     holds them: lock held by {holder:?}, slot streamed by {streamer:?} \
                     (reply_time {age} s behind)"
                );
            }
            if leads(first_port) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: B's first worker never led again"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    drop(twin);
}

/// Review rev16a F2: the worker keeps when it started as `now()::text` and reads it back with
/// `$4::text::timestamptz`. Outside DateStyle ISO the text carries the zone's abbreviation,
/// which Postgres reads by its own table: with `TimeZone = 'Asia/Shanghai'` and DateStyle
/// `SQL` the text says `CST`, read back as US Central time: "started" lies 14 hours ahead. No
/// walsender's reply is then "after this worker started", so no other worker ever counts as
/// streaming: a worker leading without the slot never hands the links to the worker that
/// streams it. Here the slot is moved from the leader to the other worker (its walsender
/// ended until the other worker gets the slot); the leader must hand over within
/// `LEAD_WITHOUT_SLOT` (5 s) and a little. (With DateStyle ISO, as the mesh starts, it does.)
#[test]
fn a_leader_without_the_slot_hands_over_under_a_non_iso_datestyle() {
    leader_follows_the_slot(
        "fc_datestyle",
        "ALTER DATABASE app SET timezone = 'Asia/Shanghai';
         ALTER DATABASE app SET datestyle = 'SQL, MDY'",
    );
}

/// B's two workers (its first, restarted after `settings`, and a twin); the slot moved to the
/// worker not leading; the leader must hand the links over to it.
fn leader_follows_the_slot(name: &str, settings: &str) {
    const LONG_POLL: &[(&str, &str)] = &[("SYNC_FEDERATION_POLL_MS", "3600000")];
    let mut m = mesh_where_b_wrote(name, LONG_POLL);
    m.node("b").exec(settings);
    stop_b(&mut m);
    m.node("b").start_worker(LONG_POLL);
    let first_port = m.nodes[1].port;
    wait_for("B's first worker leads", Duration::from_secs(30), || {
        leads(first_port)
    });
    let twin_port = common::free_port();
    let twin = common::Worker::start_with(&m.nodes[1].cluster, "app", twin_port, LONG_POLL);
    std::thread::sleep(Duration::from_secs(2));
    let holder = b_lock_holder(&mut m);
    assert!(!holder.is_empty(), "someone leads");
    // End the leader's walsender until the other worker streams the slot.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let streamer = b_slot_streamer(&mut m);
        if !streamer.is_empty() && format!("{streamer} federation") != holder {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the other worker never got the slot"
        );
        m.node("b").exec(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
              WHERE slot_name = 'pg_sync' AND active",
        );
        std::thread::sleep(Duration::from_millis(1500));
    }
    let moved = Instant::now();
    loop {
        let (holder, streamer) = (b_lock_holder(&mut m), b_slot_streamer(&mut m));
        if !streamer.is_empty() && holder == format!("{streamer} federation") {
            eprintln!("handed over after {:?}", moved.elapsed());
            break;
        }
        assert!(
            moved.elapsed() < Duration::from_secs(20),
            "20 s after the slot moved, the leader still runs the links without it: lock held \
             by {holder:?}, slot streamed by {streamer:?}; self events:\n{}",
            self_events(&mut m)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(twin);
}
