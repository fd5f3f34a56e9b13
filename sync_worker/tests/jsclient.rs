//! The TypeScript client package (`clients/js`) with the real, unmodified TanStack DB,
//! electric-db-collection and offline-transactions libraries, against a real cluster and worker:
//! builds the package, then runs its `node --test` suite (clients/js/test), which reads through
//! `/v1/shape`, writes through `/sync/mutate` and checks Postgres with psql.

mod common;
use common::*;
use pg_sync_tests::Cluster;
use std::path::PathBuf;
use std::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tanstack_collections_and_offline_transactions_in_node() {
    let package = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../clients/js");
    assert!(
        package.join("node_modules/@tanstack/db").exists(),
        "clients/js has no node_modules: run `make deps` (npm ci in clients/js)"
    );
    let built = tokio::task::block_in_place(|| {
        Command::new("node_modules/.bin/tsup")
            .arg("--silent")
            .current_dir(&package)
            .status()
            .expect("run tsup")
    });
    assert!(built.success(), "building clients/js failed: {built}");

    let cluster = tokio::task::block_in_place(|| Cluster::start("jsclient", &[]));
    tokio::task::block_in_place(|| {
        // xid epoch 2: every txid the suite waits for is a full xid8 above 2^32.
        cluster.set_xid_epoch(2);
        cluster
            .create_db("app")
            .batch_execute(
                "CREATE TABLE todos (id int PRIMARY KEY, title text, project text, n bigint);
                 SELECT pg_sync.register_table('todos', group_column => 'project');
                 SELECT pg_sync.add_member('alice', 'p1'), pg_sync.add_member('bob', 'p2');
                 INSERT INTO todos VALUES (100, 'bobs', 'p2', NULL), (101, 'alices', 'p1', 42),
                                          (102, 'big', 'p1', 9007199254740993);",
            )
            .expect("schema")
    });
    let worker = Worker::started(&cluster, "app").await;
    let status = tokio::task::block_in_place(|| {
        Command::new("node")
            .args([
                "--test",
                "--test-concurrency=1",
                // Once the tests are done: a stopped ShapeStream's last long-poll request can
                // keep the event loop alive for a minute.
                "--test-force-exit",
                "test/unit.test.mjs",
                "test/collection.test.mjs",
                "test/offline.test.mjs",
            ])
            .current_dir(&package)
            .env("PG_SYNC_URL", format!("http://127.0.0.1:{}", worker.port))
            .env("PG_SYNC_TOKEN", token("alice", 3600, SECRET))
            .env("DATABASE_URL", cluster.url("app"))
            .env("PSQL", cluster.bindir().join("psql"))
            .status()
            .expect("run node")
    });
    assert!(
        status.success(),
        "the Node tests of clients/js failed: {status}"
    );
}
