//! `commit_order.group_ids` (the groups of a transaction's actions, which `changes()` uses to
//! skip transactions a reader has no rows in) and `member_joins()` (joins counted only for
//! transactions overlapping the range): the sequencer's lists checked against what the log
//! holds, and `changes()` / `member_joins()` against the same reads without the shortcuts, over a
//! workload of the cases the lists could get wrong (written by review rev14c).

use pg_sync_tests::postgres::Client;
use pg_sync_tests::Cluster;
use std::time::{Duration, Instant};

mod common;
use common::*;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn healthy(w: &Worker) {
    rt().block_on(w.wait_healthy());
}

/// A cluster with database `app` (pg_sync created) and `schema` run in it.
fn app_db(test: &str, schema: &str) -> (Cluster, Client) {
    let cluster = Cluster::start(test, &[]);
    let mut db = cluster.create_db("app");
    db.batch_execute(schema).unwrap();
    (cluster, db)
}

/// A worker on `app` whose sequencer buffers `txn_buffer` transactions, once healthy.
fn healthy_worker(cluster: &Cluster, txn_buffer: u32) -> Worker {
    let worker = Worker::start_with(
        cluster,
        "app",
        free_port(),
        &[("SYNC_TXN_BUFFER", &txn_buffer.to_string())],
    );
    healthy(&worker);
    worker
}

fn wait_sequenced(db: &mut Client) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n: i64 = db
            .query_one(
                "SELECT count(*) FROM pg_sync.sync_actions a
                  WHERE NOT EXISTS (SELECT 1 FROM pg_sync.commit_order c WHERE c.xid = a.xid)",
                &[],
            )
            .unwrap()
            .get(0);
        if n == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{n} actions not sequenced");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every list the sequencer wrote covers every group of its transaction's actions in the log
/// (no global or membership action, no group missing), and every reader's pages, for several
/// spans and group sets, equal the pages read with every list NULL; member_joins() equals the
/// formula before the diff over every (after, upto) range of the log.
#[test]
fn group_lists_cover_the_log_and_change_no_page() {
    let (cluster, mut db) = app_db(
        "group_lists_lists",
        "CREATE TABLE todos (id int PRIMARY KEY, title text, project text);
         SELECT pg_sync.register_table('todos', group_column => 'project');
         CREATE TABLE notes (id int PRIMARY KEY, body text, grp text);
         SELECT pg_sync.register_table('notes');
         -- Grouped by the row's own id: a key change is a delete in one group and an insert in another.
         CREATE TABLE docs (id text PRIMARY KEY, body text);
         SELECT pg_sync.register_table('docs', group_column => 'id');
         -- Before the worker's slot exists: sequenced by the backlog pass.
         INSERT INTO todos VALUES (1000, 'backlog', 'p1');
         SELECT pg_sync.add_member('alice', 'p1');",
    );
    let long = "L".repeat(3000);
    let mut worker = healthy_worker(&cluster, 5);
    let txns: Vec<String> = vec![
        "INSERT INTO todos VALUES (1, 'a', 'p1')".into(),
        "INSERT INTO todos VALUES (2, 'b', 'p2'), (3, 'c', NULL)".into(),
        // moves, within a transaction and across
        "BEGIN; INSERT INTO todos VALUES (4, 'd', 'p1'); UPDATE todos SET project = 'p2' WHERE id = 4; COMMIT".into(),
        "UPDATE todos SET project = 'p3' WHERE id IN (1, 2)".into(),
        "UPDATE todos SET project = NULL WHERE id = 1".into(),
        // key change, delete
        "UPDATE todos SET id = 5 WHERE id = 2".into(),
        "DELETE FROM todos WHERE id = 3".into(),
        "INSERT INTO docs VALUES ('k1', 'x')".into(),
        "UPDATE docs SET id = 'k2' WHERE id = 'k1'".into(),
        // rolled-back subtransactions
        "BEGIN; INSERT INTO todos VALUES (6, 'e', 'p1'); SAVEPOINT s; INSERT INTO todos VALUES (7, 'f', 'gone');
         ROLLBACK TO SAVEPOINT s; INSERT INTO todos VALUES (8, 'g', 'p4'); COMMIT".into(),
        "DO $$ BEGIN BEGIN INSERT INTO todos VALUES (9, 'h', 'gone2'); RAISE EXCEPTION 'x';
         EXCEPTION WHEN others THEN NULL; END; INSERT INTO todos VALUES (10, 'i', 'p1'); END $$".into(),
        // past the transaction buffer (5), its last action in another group
        "INSERT INTO todos SELECT 100 + g, 'big', CASE WHEN g < 19 THEN 'p2' ELSE 'p5' END FROM generate_series(0, 19) g".into(),
        "BEGIN; INSERT INTO todos SELECT 200 + g, 'big2', 'p1' FROM generate_series(0, 9) g; UPDATE todos SET project = 'p6' WHERE id = 209; COMMIT".into(),
        // unicode, long, empty-looking, odd characters
        "INSERT INTO todos VALUES (11, 'u', 'ü-グループ'), (12, 'q', '{a,\"b\"}'), (13, 'n', 'NULL'), (14, 's', ' ')".into(),
        format!("INSERT INTO todos VALUES (15, 'long', '{long}')"),
        format!("INSERT INTO todos VALUES (16, 'long2', '{long}x'), (17, 'p1 too', 'p1')"),
        // 33 groups, then exactly 32
        "INSERT INTO todos SELECT 300 + g, 'many', 'm' || g FROM generate_series(0, 32) g".into(),
        "INSERT INTO todos SELECT 400 + g, 'many', 'n' || g FROM generate_series(0, 31) g".into(),
        // global; re-registration global -> grouped -> global, writes in the same transactions
        "INSERT INTO notes VALUES (1, 'global', 'p1')".into(),
        "BEGIN; SELECT pg_sync.unregister_table('notes'); SELECT pg_sync.register_table('notes', group_column => 'grp');
         INSERT INTO notes VALUES (2, 'grouped', 'p1'); COMMIT".into(),
        "INSERT INTO notes VALUES (3, 'grouped', 'p7')".into(),
        "BEGIN; UPDATE notes SET grp = 'p8' WHERE id = 3; SELECT pg_sync.unregister_table('notes'); SELECT pg_sync.register_table('notes');
         INSERT INTO notes VALUES (4, 'global again', 'p1'); COMMIT".into(),
        // memberships, alone and with rows
        "SELECT pg_sync.add_member('bob', 'p2')".into(),
        "BEGIN; INSERT INTO todos VALUES (18, 'j', 'p2'); SELECT pg_sync.add_member('bob', 'p3'); INSERT INTO todos VALUES (19, 'k', 'p3'); COMMIT".into(),
        "BEGIN; SELECT pg_sync.remove_member('bob', 'p2'); SELECT pg_sync.add_member('bob', 'p2'); COMMIT".into(),
    ];
    for (i, sql) in txns.iter().enumerate() {
        db.batch_execute(sql)
            .unwrap_or_else(|e| panic!("txn {i}: {e}"));
        if i == 12 {
            // a kill -9 mid-way: the rest streams to the next worker (and a backlog of what
            // committed while it was down)
            worker.kill9();
            db.batch_execute("INSERT INTO todos VALUES (20, 'down', 'p9'); INSERT INTO todos VALUES (21, 'down', 'p1')")
                .unwrap();
            worker = healthy_worker(&cluster, 5);
        }
    }
    wait_sequenced(&mut db);

    // 1. The lists against the log.
    let bad: Vec<String> = db
        .query(
            "SELECT c.first_sync_id || ' ' || c.group_ids::text || ' logged ' ||
                    (SELECT string_agg(coalesce(a.model || ':' || a.group_id, a.model || ':NULL'), ',' ORDER BY a.id)
                       FROM pg_sync.sync_actions a WHERE a.xid = c.xid)
               FROM pg_sync.commit_order c
              WHERE c.group_ids IS NOT NULL
                AND (EXISTS (SELECT 1 FROM pg_sync.sync_actions a WHERE a.xid = c.xid
                              AND (a.group_id IS NULL OR a.model = '$membership' OR NOT a.group_id = ANY (c.group_ids)))
                     OR cardinality(c.group_ids) > 32
                     OR c.action_count <> (SELECT count(*) FROM pg_sync.sync_actions a WHERE a.xid = c.xid))",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(bad.is_empty(), "lists missing a logged group: {bad:#?}");
    let listed: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_sync.commit_order WHERE group_ids IS NOT NULL",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(listed > 10, "the workload wrote lists ({listed})");

    // 2. Pages with the lists equal pages without them.
    db.batch_execute(
        "CREATE TABLE rv_readers (groups text[], member text);
         INSERT INTO rv_readers
         SELECT g, m FROM (SELECT ARRAY[x] AS g FROM (SELECT DISTINCT group_id x FROM pg_sync.sync_actions WHERE group_id IS NOT NULL) s
                           UNION ALL VALUES (NULL::text[]), ('{}'), ('{p1,p2}'), ('{NULL,p3}'), ('{nowhere}'),
                                            ((SELECT array_agg(DISTINCT group_id) FROM pg_sync.sync_actions))) gs,
                          (VALUES (NULL::text), ('bob')) ms(m);
         CREATE FUNCTION rv_pages(span int, groups text[], member text) RETURNS text[] LANGUAGE plpgsql AS $$
         DECLARE after bigint := 0; got text[] := '{}'; page text[];
         BEGIN
             WHILE after < pg_sync.last_sync_id() LOOP
                 SELECT array_agg(c.sync_id || ':' || c.id ORDER BY c.sync_id) INTO page FROM pg_sync.changes(after, groups, span, member) c;
                 got := got || coalesce(page, '{}');
                 after := after + span;
             END LOOP;
             RETURN got;
         END $$;
         CREATE TABLE rv_with AS SELECT s.span, r.groups, r.member, rv_pages(s.span, r.groups, r.member) AS pages
           FROM rv_readers r, (VALUES (1), (2), (7), (1000)) s(span);
         CREATE TABLE rv_saved AS SELECT xid, group_ids FROM pg_sync.commit_order;
         UPDATE pg_sync.commit_order SET group_ids = NULL;",
    )
    .unwrap();
    let diff: Vec<String> = db
        .query(
            "SELECT w.span || ' ' || coalesce(w.groups::text, 'NULL') || ' ' || coalesce(w.member, 'NULL')
               FROM rv_with w WHERE w.pages IS DISTINCT FROM rv_pages(w.span, w.groups, w.member)",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    db.batch_execute("UPDATE pg_sync.commit_order c SET group_ids = s.group_ids FROM rv_saved s WHERE s.xid = c.xid")
        .unwrap();
    assert!(diff.is_empty(), "pages differ with the lists: {diff:#?}");

    // 3. member_joins() against the formula before the diff, every range.
    let diff: Vec<String> = db
        .query(
            "WITH old AS (
               SELECT u.user_id, r.after, r.upto, j.group_id, max(j.sync_id) AS sync_id
                 FROM (VALUES ('alice'), ('bob')) u(user_id),
                      (SELECT a, b FROM generate_series(0, pg_sync.last_sync_id()) a, generate_series(0, pg_sync.last_sync_id()) b WHERE a <= b) r(after, upto),
                      LATERAL (SELECT m.group_id,
                                      c.first_sync_id + (SELECT count(*) FROM pg_sync.sync_actions b
                                                          WHERE b.xid = a.xid AND b.id < a.id) AS sync_id
                                 FROM pg_sync.membership_log m
                                 JOIN pg_sync.sync_actions a ON a.xid = m.xid AND a.id = m.action_id
                                 JOIN pg_sync.commit_order c ON c.xid = a.xid
                                WHERE m.user_id = u.user_id AND m.joined) j
                WHERE j.sync_id > r.after AND j.sync_id <= r.upto
                GROUP BY 1, 2, 3, 4),
             new AS (
               SELECT u.user_id, r.after, r.upto, j.group_id, j.sync_id
                 FROM (VALUES ('alice'), ('bob')) u(user_id),
                      (SELECT a, b FROM generate_series(0, pg_sync.last_sync_id()) a, generate_series(0, pg_sync.last_sync_id()) b WHERE a <= b) r(after, upto),
                      LATERAL pg_sync.member_joins(u.user_id, r.after, r.upto) j)
             SELECT format('%s %s..%s %s %s', coalesce(o.user_id, n.user_id), coalesce(o.after, n.after), coalesce(o.upto, n.upto),
                           o.sync_id, n.sync_id)
               FROM old o FULL JOIN new n USING (user_id, after, upto, group_id)
              WHERE o.sync_id IS DISTINCT FROM n.sync_id
              LIMIT 20",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        diff.is_empty(),
        "member_joins differs from before: {diff:#?}"
    );
    drop(worker);
}

/// Concurrent writers, so that the sequencer's batches hold many transactions with lists of
/// different lengths and NULLs between them (PERSIST_SQL's $7/$8 offsets), with a kill -9 of
/// the worker in the middle: every list written is exactly the set of its transaction's groups
/// in the log (or NULL where the log has a global or membership action or over 32 groups, or
/// a backlog pass wrote it).
#[test]
fn concurrent_batches_list_exactly_their_transactions_groups() {
    let (cluster, mut db) = app_db(
        "group_lists_batches",
        "CREATE TABLE todos (id int PRIMARY KEY, title text, project text);
         SELECT pg_sync.register_table('todos', group_column => 'project');
         CREATE TABLE notes (id int PRIMARY KEY, body text);
         SELECT pg_sync.register_table('notes');",
    );
    let mut worker = healthy_worker(&cluster, 4);
    let url = cluster.url("app");
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let url = url.clone();
            std::thread::spawn(move || {
                let mut c = pg_sync_tests::postgres::Client::connect(&url, pg_sync_tests::postgres::NoTls).unwrap();
                for i in 0..250 {
                    let base = w * 100_000 + i * 100;
                    let kind = (i * 7 + w) % 9;
                    let sql = match kind {
                        0 => format!("INSERT INTO todos VALUES ({base}, 'a', 'g{}')", i % 13),
                        1 => format!("INSERT INTO todos SELECT {base} + g, 'b', 'g' || ((g * 5 + {i}) % 13) FROM generate_series(0, {}) g", i % 7),
                        2 => format!("INSERT INTO todos VALUES ({base}, 'c', 'g1'); INSERT INTO notes VALUES ({base}, 'n')"),
                        3 => format!("INSERT INTO todos SELECT {base} + g, 'd', 'w{w}m' || g FROM generate_series(0, 33) g"),
                        4 => format!("SELECT pg_sync.add_member('u{w}_{i}', 'g{}')", i % 13),
                        5 => format!("BEGIN; INSERT INTO todos VALUES ({base}, 'e', 'g2'); SAVEPOINT s;
                                      INSERT INTO todos VALUES ({base} + 1, 'f', 'rolled{w}'); ROLLBACK TO s;
                                      UPDATE todos SET project = 'g{}' WHERE id = {base}; COMMIT", i % 13),
                        6 => format!("INSERT INTO todos SELECT {base} + g, 'h', 'w{w}n' || g FROM generate_series(0, 31) g"),
                        7 => format!("INSERT INTO todos VALUES ({base}, 'i', NULL), ({base} + 1, 'j', 'ü{}')", i % 3),
                        _ => format!("INSERT INTO todos VALUES ({base}, 'k', 'g3'); DELETE FROM todos WHERE id = {base}"),
                    };
                    let sql = if sql.starts_with("BEGIN") { sql } else { format!("BEGIN; {sql}; COMMIT") };
                    c.batch_execute(&sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    worker.kill9();
    std::thread::sleep(Duration::from_millis(500));
    worker = Worker::start_with(&cluster, "app", free_port(), &[("SYNC_TXN_BUFFER", "4")]);
    for w in writers {
        w.join().unwrap();
    }
    healthy(&worker);
    wait_sequenced(&mut db);
    let (listed, null): (i64, i64) = {
        let r = db
            .query_one(
                "SELECT count(*) FILTER (WHERE group_ids IS NOT NULL), count(*) FILTER (WHERE group_ids IS NULL)
                   FROM pg_sync.commit_order",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    let bad: Vec<String> = db
        .query(
            "WITH x AS (
               SELECT c.xid, c.first_sync_id, c.group_ids, c.commit_lsn,
                      (SELECT CASE WHEN bool_or(a.group_id IS NULL OR a.model = '$membership') OR count(DISTINCT a.group_id) > 32
                                   THEN NULL ELSE array_agg(DISTINCT a.group_id ORDER BY a.group_id) END
                         FROM pg_sync.sync_actions a WHERE a.xid = c.xid) AS want
                 FROM pg_sync.commit_order c)
             SELECT format('at %s: listed %s, log %s', x.first_sync_id, x.group_ids, x.want)
               FROM x
              WHERE x.group_ids IS NOT NULL
                AND (x.want IS NULL OR NOT (x.group_ids @> x.want AND x.want @> x.group_ids)
                     OR cardinality(x.group_ids) <> cardinality(x.want))
              LIMIT 20",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    eprintln!("commit_order rows: {listed} with a list, {null} NULL");
    assert!(
        bad.is_empty(),
        "lists that are not their transactions' groups: {bad:#?}"
    );
    // The stream's lists where the log calls for one (NULL only from backlog passes: commit_lsn 0/0).
    let missing: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_sync.commit_order c
              WHERE c.group_ids IS NULL AND c.commit_lsn <> '0/0'
                AND NOT EXISTS (SELECT 1 FROM pg_sync.sync_actions a WHERE a.xid = c.xid
                                 AND (a.group_id IS NULL OR a.model = '$membership'))
                AND (SELECT count(DISTINCT a.group_id) FROM pg_sync.sync_actions a WHERE a.xid = c.xid) <= 32",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(missing, 0, "streamed transactions left without a list");
    drop(worker);
}

/// A list `changes()` would misread (it probes `group_ids[1]`): one not based at 1, 2-D, or with
/// a NULL element names a group but would hide its transaction from that group's readers, so
/// the table refuses it (review rev14c F1).
#[test]
fn lists_changes_would_misread_are_refused() {
    let cluster = Cluster::start("group_lists_check", &[]);
    let mut db = cluster.create_db("app");
    for list in ["[0:0]={g}", "{{g}}", "{g,NULL}"] {
        let err = db
            .batch_execute(&format!(
                "INSERT INTO pg_sync.commit_order (xid, first_sync_id, action_count, commit_lsn, committed_at, group_ids)
                 VALUES ('1', 1, 1, '0/0', now(), '{list}')"
            ))
            .expect_err(list);
        assert_eq!(
            err.as_db_error().map(|e| e.code().code()),
            Some("23514"),
            "{list}: {err}"
        );
    }
    db.batch_execute(
        "INSERT INTO pg_sync.commit_order (xid, first_sync_id, action_count, commit_lsn, committed_at, group_ids)
         VALUES ('1', 1, 1, '0/0', now(), '{g,h}'), ('2', 2, 1, '0/0', now(), '{}'), ('3', 3, 1, '0/0', now(), NULL)",
    )
    .unwrap();
}

/// Many subtransactions (past the 64 a backend caches, so the WAL assigns them to their top
/// transaction), every other one rolled back, each writing in its own group: the list is
/// exactly the committed ones' groups (when at most 32), the pages unchanged.
#[test]
fn many_subtransactions_some_rolled_back_list_only_what_committed() {
    let (cluster, mut db) = app_db(
        "group_lists_subxacts",
        "CREATE TABLE todos (id int PRIMARY KEY, title text, project text);
         SELECT pg_sync.register_table('todos', group_column => 'project');",
    );
    let worker = healthy_worker(&cluster, 8);
    for (n, modulo) in [(100, 4), (100, 8), (40, 2)] {
        db.batch_execute(&format!(
            "DO $$ BEGIN
               FOR i IN 1..{n} LOOP
                 BEGIN
                   INSERT INTO todos VALUES ({n} * 1000 + {modulo} * 100000 + i, 'x', 's{modulo}_' || (i % {modulo}));
                   IF i % 2 = 1 THEN RAISE EXCEPTION 'roll back'; END IF;
                 EXCEPTION WHEN raise_exception THEN NULL;
                 END;
               END LOOP;
             END $$"
        ))
        .unwrap();
    }
    wait_sequenced(&mut db);
    let rows: Vec<String> = db
        .query(
            "SELECT c.action_count || ' ' || coalesce(c.group_ids::text, 'NULL') || ' log ' ||
                    (SELECT count(*) || ' ' || array_agg(DISTINCT a.group_id)::text FROM pg_sync.sync_actions a WHERE a.xid = c.xid)
               FROM pg_sync.commit_order c ORDER BY c.first_sync_id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    eprintln!("{rows:#?}");
    let bad: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_sync.commit_order c
              WHERE c.action_count <> (SELECT count(*) FROM pg_sync.sync_actions a WHERE a.xid = c.xid)
                 OR c.group_ids IS NULL
                 OR NOT c.group_ids @> (SELECT array_agg(a.group_id) FROM pg_sync.sync_actions a WHERE a.xid = c.xid)
                 OR NOT (SELECT array_agg(a.group_id) FROM pg_sync.sync_actions a WHERE a.xid = c.xid) @> c.group_ids",
            &[],
        )
        .unwrap()
        .get(0);
    drop(worker);
    assert_eq!(bad, 0, "lists or counts that are not the log's");
}

/// A transaction whose rows are all in one group with a long group id (about 3 kB that does
/// not compress: ids are the application's column values, nothing bounds their length) is
/// sequenced, and so is everything committed after it. commit_order_group_idx indexes
/// `group_ids[1]`, and a btree entry holds at most 2704 bytes: the sequencer's INSERT into
/// commit_order fails on it, and every later transaction waits behind it (written by review
/// rev15d).
#[test]
fn long_group_id_does_not_stop_the_sequencer() {
    let cluster = Cluster::start("group_lists_long_id", &[]);
    let mut db = cluster.create_db("app");
    db.batch_execute(
        "CREATE TABLE todos (id int PRIMARY KEY, title text, project text);
         SELECT pg_sync.register_table('todos', group_column => 'project');",
    )
    .unwrap();
    let worker = Worker::start_with(&cluster, "app", free_port(), &[]);
    healthy(&worker);
    // Three transactions (one statement each).
    for sql in [
        "INSERT INTO todos VALUES (1, 'a', 'p1')",
        "INSERT INTO todos VALUES (2, 'long', (SELECT string_agg(md5(i::text), '') FROM generate_series(1, 100) i))",
        "INSERT INTO todos VALUES (3, 'after', 'p1')",
    ] {
        db.execute(sql, &[]).unwrap();
    }
    wait_sequenced(&mut db);
    drop(worker);
}
