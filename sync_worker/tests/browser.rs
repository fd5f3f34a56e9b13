//! Headless Chromium (playwright-core, installed by `make deps`) against a real cluster and
//! worker: the demo page (`/demo`), where two pages show each other's changes and a change made
//! in psql shows in both (tests/browser/demo.mjs); and a page built from clients/js (TanStack DB
//! with offline-transactions on real IndexedDB) whose offline writes apply exactly once, then
//! the same page served from another origin (CORS) reading live over SSE
//! (tests/browser/tanstack.mjs).

mod common;
use common::*;
use pg_sync_tests::Cluster;
use std::path::PathBuf;
use std::process::Command;

/// One Chromium at a time: two at once on a small machine make both time out.
static CHROMIUM: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_page_shows_other_pages_and_psql_changes_in_chromium() {
    let _one = CHROMIUM.lock().await;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let script = root.join("tests/browser/demo.mjs");
    // The page's script is built from clients/js and committed: it must be what the sources
    // build to now.
    let fresh = std::env::temp_dir().join(format!("pg_sync_demo_{}.js", std::process::id()));
    let built = tokio::task::block_in_place(|| {
        Command::new("bash")
            .arg(root.join("scripts/build-demo.sh"))
            .arg(&fresh)
            .status()
            .expect("run scripts/build-demo.sh")
    });
    assert!(built.success(), "scripts/build-demo.sh failed: {built}");
    let current = std::fs::read(&fresh).unwrap() == include_bytes!("../static/demo.js");
    let _ = std::fs::remove_file(&fresh);
    assert!(
        current,
        "sync_worker/static/demo.js is stale: run scripts/build-demo.sh"
    );
    assert!(
        root.join("tests/browser/node_modules/playwright-core")
            .exists(),
        "playwright-core is missing: run `make deps` (npm ci in tests/browser)"
    );
    let cluster = tokio::task::block_in_place(|| Cluster::start("browser", &[]));
    tokio::task::block_in_place(|| {
        cluster
            .create_db("demo")
            .batch_execute(include_str!("../../sql/demo.sql"))
            .expect("demo schema")
    });
    let port = free_port();
    let worker = Worker::start(&cluster, "demo", port);
    worker.wait_healthy().await;
    let screenshot = root.join("target/browser-demo.png");
    let status = tokio::task::block_in_place(|| {
        Command::new("node")
            .arg(&script)
            .env(
                "DEMO_URL",
                format!(
                    "http://127.0.0.1:{port}/demo?token={}",
                    token("demo-user", 3600, SECRET)
                ),
            )
            .env("DATABASE_URL", cluster.url("demo"))
            .env("PSQL", cluster.bindir().join("psql"))
            .env("SCREENSHOT", &screenshot)
            .status()
            .expect("run node")
    });
    assert!(status.success(), "the browser test failed: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tanstack_offline_writes_survive_a_reload_and_apply_once_in_chromium() {
    let _one = CHROMIUM.lock().await;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let package = root.join("clients/js");
    assert!(
        root.join("tests/browser/node_modules/playwright-core")
            .exists()
            && package.join("node_modules/@tanstack/db").exists(),
        "npm packages are missing: run `make deps` (npm ci in tests/browser and clients/js)"
    );
    // The package, then a page bundled from it with the real libraries.
    let bundle = package.join("dist-test/page.js");
    tokio::task::block_in_place(|| {
        for (tool, args) in [
            ("node_modules/.bin/tsup", vec!["--silent"]),
            (
                "node_modules/.bin/esbuild",
                vec![
                    "test/browser/page.mjs",
                    "--bundle",
                    "--format=esm",
                    "--log-level=warning",
                    "--outfile=dist-test/page.js",
                ],
            ),
        ] {
            let status = Command::new(tool)
                .args(args)
                .current_dir(&package)
                .status()
                .expect("run the bundler");
            assert!(status.success(), "{tool} failed: {status}");
        }
    });
    let cluster = tokio::task::block_in_place(|| Cluster::start("browser_tanstack", &[]));
    tokio::task::block_in_place(|| {
        cluster
            .create_db("app")
            .batch_execute(
                "CREATE TABLE todos (id int PRIMARY KEY, title text, project text);
                 SELECT pg_sync.register_table('todos', group_column => 'project');
                 SELECT pg_sync.add_member('alice', 'p1'), pg_sync.add_member('bob', 'p2');
                 INSERT INTO todos VALUES (100, 'bobs', 'p2'), (101, 'alices', 'p1');",
            )
            .expect("schema")
    });
    let worker = Worker::started(&cluster, "app").await;
    let status = tokio::task::block_in_place(|| {
        Command::new("node")
            .arg(root.join("tests/browser/tanstack.mjs"))
            .env("APP_URL", format!("http://127.0.0.1:{}", worker.port))
            .env("TOKEN", token("alice", 3600, SECRET))
            .env("BUNDLE", &bundle)
            .env("DATABASE_URL", cluster.url("app"))
            .env("PSQL", cluster.bindir().join("psql"))
            .status()
            .expect("run node")
    });
    assert!(
        status.success(),
        "the TanStack browser test failed: {status}"
    );
}
