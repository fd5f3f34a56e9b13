//! pg_dump / pg_restore of a database using pg_sync into a fresh database of another cluster:
//! data, registry, log, horizon and sync-id counter come back intact, captured writes keep
//! working, and the restored node's clock, even stepped an hour back, mints versions above every
//! restored one. The same for a standby promoted after failover.

use pg_sync_tests::postgres::Client;
use pg_sync_tests::Cluster;
use std::path::Path;
use std::process::Command;

/// Sequences every unsequenced transaction, as the worker does.
const SEQUENCE_ALL: &str = "
    INSERT INTO pg_sync.commit_order (xid, first_sync_id, action_count, commit_lsn, committed_at)
    SELECT xid, pg_sync.last_sync_id() + sum(n) OVER (ORDER BY first_id) - n + 1, n, '0/0', now()
      FROM (SELECT a.xid, min(a.id) AS first_id, count(*)::int AS n FROM pg_sync.sync_actions a
             WHERE NOT EXISTS (SELECT 1 FROM pg_sync.commit_order c WHERE c.xid = a.xid)
             GROUP BY a.xid) s";

/// Everything that must survive, as text.
fn snapshot(c: &mut Client) -> Vec<String> {
    [
        "SELECT string_agg(format('%s=%s/%s', id, v, grp), ',' ORDER BY id) FROM items",
        "SELECT string_agg(format('%s:%s:%s:%s:%s', rel, model, pk_columns, group_column, enabled), ',' ORDER BY model)
           FROM pg_sync.registry",
        "SELECT string_agg(format('%s/%s/%s/%s/%s/%s', id, model_id, action, data, version, group_id), ',' ORDER BY id)
           FROM pg_sync.sync_actions",
        "SELECT string_agg(format('%s/%s', first_sync_id, action_count), ',' ORDER BY first_sync_id)
           FROM pg_sync.commit_order",
        "SELECT string_agg(format('%s/%s', model_id, max_version), ',' ORDER BY model_id) FROM pg_sync.row_state",
        "SELECT string_agg(format('%s/%s', user_id, group_id), ',' ORDER BY user_id, group_id)
           FROM pg_sync.group_memberships",
        "SELECT format('horizon %s, last %s', pg_sync.retention_horizon(), pg_sync.last_sync_id())",
    ]
    .iter()
    .map(|q| {
        c.query_one(*q, &[])
            .unwrap()
            .get::<_, Option<String>>(0)
            .unwrap_or_default()
    })
    .collect()
}

fn run(program: &Path, args: &[&str]) {
    run_with(program, args, &[]);
}

fn run_with(program: &Path, args: &[&str], env: &[(&str, &str)]) {
    let out = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run a Postgres client binary");
    assert!(
        out.status.success(),
        "{} {:?} failed: {}{}",
        program.display(),
        args,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `pg_dump -Fc` of database `db`, into the cluster's directory.
fn dump(source: &Cluster, db: &str) -> std::path::PathBuf {
    let file = source.dir.join(format!("{db}.dump"));
    let port = source.port.to_string();
    run(
        &source.bindir().join("pg_dump"),
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            "-Fc",
            "-f",
            file.to_str().unwrap(),
            db,
        ],
    );
    file
}

/// Creates database `db` in `target` and `pg_restore`s `file` into it, as a restore session
/// (`pg_sync.restoring`, superuser only): the restored memberships come with their log and are
/// not logged again (without it the restore logs them anew and its log rows collide).
fn restore(target: &Cluster, db: &str, file: &str) {
    target
        .connect("postgres")
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .unwrap();
    let port = target.port.to_string();
    run_with(
        &target.bindir().join("pg_restore"),
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            "--exit-on-error",
            "-d",
            db,
            file,
        ],
        &[("PGOPTIONS", "-c pg_sync.restoring=on")],
    );
}

fn max_hlc(c: &mut Client, filter: &str) -> i64 {
    c.query_one(
        &format!("SELECT max(pg_sync.version_hlc(version)) FROM pg_sync.sync_actions {filter}"),
        &[],
    )
    .unwrap()
    .get(0)
}

#[test]
fn dump_and_restore_keep_log_counter_and_clock() {
    let source = Cluster::start("dump_src", &["pg_sync.node_id = 'node-a'"]);
    let mut c = source.create_db("src");
    c.batch_execute(&format!(
        "CREATE TABLE items (id int PRIMARY KEY, v text, grp text);
         SELECT pg_sync.register_table('items', group_column => 'grp');
         INSERT INTO items SELECT g, 'v' || g, 'g' || (g % 3) FROM generate_series(1, 20) g;
         UPDATE items SET v = v || '!' WHERE id <= 5;
         SELECT pg_sync.add_member('alice', 'g1');
         {SEQUENCE_ALL};
         SELECT pg_sync.compact(pg_sync.last_sync_id() - 3);
         UPDATE items SET grp = 'g9' WHERE id = 7;
         DELETE FROM items WHERE id = 8;
         {SEQUENCE_ALL};"
    ))
    .unwrap();
    let before = snapshot(&mut c);
    assert!(
        before[6].starts_with("horizon ") && !before[6].starts_with("horizon 0"),
        "the source has a horizon: {}",
        before[6]
    );
    let restored_max = max_hlc(&mut c, "");
    drop(c);

    let file = dump(&source, "src");
    let file = file.to_str().unwrap();

    // A fresh cluster whose wall clock is an hour behind the source's. The clock only takes
    // stored versions within pg_sync.max_clock_skew of wall time (a far-future version is
    // refused, see the state regress test), so this node's operator raised it to cover the hour.
    let target = Cluster::start(
        "dump_dst",
        &[
            "pg_sync.node_id = 'node-a'",
            "pg_sync.test_clock_offset = '-1h'",
            "pg_sync.max_clock_skew = '2h'",
        ],
    );
    restore(&target, "dst", file);
    let mut c = target.connect("dst");
    assert_eq!(
        snapshot(&mut c),
        before,
        "the restore changed pg_sync's state"
    );

    // Captured writes work: fresh action ids, and versions above everything restored.
    let last_id: i64 = c
        .query_one("SELECT max(id) FROM pg_sync.sync_actions", &[])
        .unwrap()
        .get(0);
    c.batch_execute(
        "INSERT INTO items VALUES (100, 'new', 'g1');
         UPDATE items SET v = 'changed' WHERE id = 1;",
    )
    .unwrap();
    let new_rows: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_sync.sync_actions WHERE id > $1",
            &[&last_id],
        )
        .unwrap()
        .get(0);
    assert_eq!(
        new_rows, 2,
        "both writes were captured after the last restored action"
    );
    let newest = max_hlc(&mut c, &format!("WHERE id > {last_id}"));
    let oldest_new: i64 = c
        .query_one(
            "SELECT min(pg_sync.version_hlc(version)) FROM pg_sync.sync_actions WHERE id > $1",
            &[&last_id],
        )
        .unwrap()
        .get(0);
    assert!(newest >= oldest_new);
    assert!(
        oldest_new > restored_max,
        "a version minted after the restore ({oldest_new}) is not above the restored ones ({restored_max})"
    );
    let state: String = c
        .query_one(
            "SELECT pg_sync.row_version_state('items', '1')->>'live'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(state, "true");
}

fn last_sync_id(c: &mut Client) -> i64 {
    c.query_one("SELECT pg_sync.last_sync_id()", &[])
        .unwrap()
        .get(0)
}

/// Numeric value of an xid8 expression.
fn xid(c: &mut Client, expr: &str) -> i64 {
    c.query_one(&format!("SELECT ({expr})::text::bigint"), &[])
        .unwrap()
        .get(0)
}

/// Uses up transaction ids, one committed transaction each, until the next one is at least
/// `target`.
fn burn_xids_to(c: &mut Client, target: i64) {
    c.batch_execute(&format!(
        "DO $$ BEGIN
           WHILE pg_current_xact_id()::text::bigint < {target} - 1 LOOP COMMIT; END LOOP;
         END $$"
    ))
    .unwrap();
}

#[test]
fn restore_into_a_cluster_behind_the_dumped_xids_keeps_log_xids_unique() {
    // The source has used a few thousand transaction ids more than a fresh cluster, then writes
    // in separate transactions, some sequenced, the last ones not.
    let source = Cluster::start("xid_src", &["pg_sync.node_id = 'node-a'"]);
    let mut c = source.create_db("src");
    let start = xid(&mut c, "pg_current_xact_id()");
    burn_xids_to(&mut c, start + 5000);
    c.batch_execute(
        "CREATE TABLE items (id int PRIMARY KEY, v text, grp text);
         SELECT pg_sync.register_table('items', group_column => 'grp');",
    )
    .unwrap();
    for i in 1..=10 {
        c.batch_execute(&format!(
            "INSERT INTO items VALUES ({i}, 'v', 'g1'), ({}, 'v', 'g1')",
            i + 100
        ))
        .unwrap();
    }
    // A membership change, sequenced, and one that is not: membership_log names its actions by
    // (xid, action_id), so the remap must move its xids with the log's.
    c.batch_execute("SELECT pg_sync.add_member('alice', 'g1')")
        .unwrap();
    c.batch_execute(SEQUENCE_ALL).unwrap();
    for i in 1..=5 {
        c.batch_execute(&format!("UPDATE items SET v = 'w' WHERE id = {i}"))
            .unwrap();
    }
    c.batch_execute("SELECT pg_sync.add_member('bob', 'g1')")
        .unwrap();
    drop(c);
    let file = dump(&source, "src");

    let target = Cluster::start("xid_dst", &["pg_sync.node_id = 'node-a'"]);
    restore(&target, "dst", file.to_str().unwrap());
    let mut c = target.connect("dst");
    let (lo, hi) = (
        xid(&mut c, "SELECT min(xid) FROM pg_sync.sync_actions"),
        xid(&mut c, "SELECT max(xid) FROM pg_sync.sync_actions"),
    );
    let now = xid(&mut c, "pg_current_xact_id()");
    assert!(
        now + 1000 < lo,
        "the target ({now}) is behind the restored xids ({lo}..{hi})"
    );
    let last_restored: i64 = c
        .query_one("SELECT max(id) FROM pg_sync.sync_actions", &[])
        .unwrap()
        .get(0);

    // The target's counter runs through the restored range, every transaction there capturing
    // a write, from this backend and from another one.
    burn_xids_to(&mut c, lo - 6);
    // The first writer remaps, but rolls back: the next one remaps again. That one writes twice
    // in one transaction: its own first action is not taken for a restored one.
    c.batch_execute(
        "BEGIN; UPDATE items SET v = 'r' WHERE id = 1; ROLLBACK;
         BEGIN; UPDATE items SET v = 's' WHERE id = 1; UPDATE items SET v = 's' WHERE id = 2; COMMIT;",
    )
    .unwrap();
    c.batch_execute(&format!(
        "DO $$ BEGIN
           WHILE pg_current_xact_id()::text::bigint <= {hi} + 2 LOOP
             UPDATE items SET v = v || '.' WHERE id = 200 + pg_current_xact_id()::text::bigint % 2;
             IF NOT FOUND THEN
               INSERT INTO items VALUES (200, 'n', 'g1'), (201, 'n', 'g1');
             END IF;
             COMMIT;
           END LOOP;
         END $$"
    ))
    .unwrap();
    let mut other = target.connect("dst");
    other
        .batch_execute("UPDATE items SET v = 'x' WHERE id = 1")
        .unwrap();

    let shared: i64 = c
        .query_one(
            "SELECT count(DISTINCT o.xid) FROM pg_sync.sync_actions o JOIN pg_sync.sync_actions n
                ON n.xid = o.xid AND o.id <= $1 AND n.id > $1",
            &[&last_restored],
        )
        .unwrap()
        .get(0);
    assert_eq!(shared, 0, "new transactions reused restored xids");
    let (moved_new, kept_old): (i64, i64) = {
        let r = c
            .query_one(
                "SELECT count(*) FILTER (WHERE id > $1 AND xid >= '4611686018427387904'),
                        count(*) FILTER (WHERE id <= $1 AND xid < '4611686018427387904')
                   FROM pg_sync.sync_actions",
                &[&last_restored],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(
        (moved_new, kept_old),
        (0, 0),
        "only the restored xids are moved, all of them"
    );
    let new_actions: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_sync.sync_actions WHERE id > $1",
            &[&last_restored],
        )
        .unwrap()
        .get(0);
    assert!(
        new_actions > (hi - lo),
        "the writes were captured: {new_actions}"
    );
    let (memberships, orphaned): (i64, i64) = {
        let r = c
            .query_one(
                "SELECT count(*),
                        count(*) FILTER (WHERE NOT EXISTS (
                            SELECT 1 FROM pg_sync.sync_actions a
                             WHERE a.xid = m.xid AND a.id = m.action_id))
                   FROM pg_sync.membership_log m",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(
        (memberships, orphaned),
        (2, 0),
        "membership_log rows whose (xid, action_id) names no action after the remap"
    );

    // The sequencer's backlog pass, as the worker runs it (its 32-bit comparison with the
    // stream's xids, nothing streamed here): every transaction, restored unsequenced or new, gets
    // one commit order row, and each commit order row holds exactly the actions it sequenced.
    let first = last_sync_id(&mut c) + 1;
    c.execute(
        "INSERT INTO pg_sync.commit_order (xid, first_sync_id, action_count, commit_lsn, committed_at)
         SELECT xid, $1 + sum(n) OVER (ORDER BY first_id) - n, n, '0/0', now()
           FROM (SELECT a.xid, min(a.id) AS first_id, count(*)::int AS n
                   FROM pg_sync.sync_actions a
                  WHERE NOT EXISTS (SELECT 1 FROM pg_sync.commit_order c WHERE c.xid = a.xid)
                  GROUP BY a.xid) s
          WHERE (s.xid::text::bigint % 4294967296) <> ALL ($2::bigint[])",
        &[&first, &Vec::<i64>::new()],
    )
    .unwrap();
    let mismatched: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_sync.commit_order c
              WHERE c.action_count <> (SELECT count(*) FROM pg_sync.sync_actions a WHERE a.xid = c.xid)",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(
        mismatched, 0,
        "commit order rows that do not match their actions"
    );
    let (unsequenced, ids, distinct): (i64, i64, i64) = {
        let r = c
            .query_one(
                "SELECT (SELECT count(*) FROM pg_sync.sync_actions a
                          WHERE NOT EXISTS (SELECT 1 FROM pg_sync.commit_order c WHERE c.xid = a.xid)),
                        (SELECT count(*) FROM pg_sync.changes(0, NULL, 1000)),
                        (SELECT count(DISTINCT sync_id) FROM pg_sync.changes(0, NULL, 1000))",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1), r.get(2))
    };
    assert_eq!(unsequenced, 0);
    let total: i64 = c
        .query_one("SELECT count(*) FROM pg_sync.sync_actions", &[])
        .unwrap()
        .get(0);
    assert_eq!(
        (ids, distinct),
        (total, total),
        "changes() lists every action once"
    );
}

/// The highest HLC stored in the log and the row state.
fn max_stored_hlc(c: &mut Client) -> i64 {
    c.query_one(
        "SELECT max(pg_sync.version_hlc(v)) FROM (SELECT version FROM pg_sync.sync_actions
          UNION ALL SELECT max_version FROM pg_sync.row_state) s(v)",
        &[],
    )
    .unwrap()
    .get(0)
}

/// The version of the newest action in the log.
fn last_action_hlc(c: &mut Client) -> i64 {
    c.query_one(
        "SELECT pg_sync.version_hlc(version) FROM pg_sync.sync_actions ORDER BY id DESC LIMIT 1",
        &[],
    )
    .unwrap()
    .get(0)
}

/// Failover (the same recovery end as a point-in-time recovery): a standby's copy of the clock's
/// high-water mark is as old as its base backup, so the versions it replayed since are above
/// it. Promoted, with its wall clock an hour behind, it must still mint above all of them, in
/// a session that was already open (and asked the clock) while it was a standby and in a new
/// one.
#[test]
fn a_promoted_standby_mints_versions_above_everything_it_replayed() {
    let skew = "pg_sync.max_clock_skew = '3h'";
    let primary = Cluster::start("failover_primary", &[skew]);
    let mut p = primary.create_db("fo");
    p.batch_execute(
        "CREATE TABLE items (id int PRIMARY KEY, v text);
         SELECT pg_sync.register_table('items');
         INSERT INTO items SELECT g, 'before' FROM generate_series(1, 10) g;",
    )
    .unwrap();
    let standby = Cluster::standby_of(
        &primary,
        "failover_standby",
        &[skew, "pg_sync.test_clock_offset = '-1h'"],
    );
    let mut early = standby.connect("fo");
    let in_recovery: bool = early
        .query_one("SELECT pg_is_in_recovery()", &[])
        .unwrap()
        .get(0);
    assert!(in_recovery);
    // The clock, asked on the standby, observes what the standby holds so far.
    let asked: i64 = early
        .query_one("SELECT pg_sync.hlc_now()", &[])
        .unwrap()
        .get(0);
    // The primary writes on after the backup with its clock half an hour ahead: versions above
    // the mark the standby copied, and above what the early session observed.
    p.batch_execute(
        "SET pg_sync.test_clock_offset = '30min';
         UPDATE items SET v = 'after';
         INSERT INTO items VALUES (11, 'after');",
    )
    .unwrap();
    let primary_max = max_stored_hlc(&mut p);
    assert!(primary_max > asked);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let replayed: i64 = early
            .query_one("SELECT count(*) FROM items WHERE v = 'after'", &[])
            .unwrap()
            .get(0);
        if replayed == 11 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the standby did not replay"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(max_stored_hlc(&mut early), primary_max);
    drop(p);
    primary.pg_ctl(&["stop", "-m", "immediate", "-w"]);
    standby.pg_ctl(&["promote", "-w", "-t", "60"]);

    // New keys: a write to a row with state would be re-minted above that row's version anyway.
    early
        .batch_execute("INSERT INTO items VALUES (20, 'promoted')")
        .unwrap();
    let first = last_action_hlc(&mut early);
    assert!(
        first > primary_max,
        "a version minted after promotion ({first}) is not above the replayed ones ({primary_max})"
    );
    let mut late = standby.connect("fo");
    late.batch_execute("INSERT INTO items VALUES (12, 'promoted')")
        .unwrap();
    let second = last_action_hlc(&mut late);
    assert!(second > first);
}
