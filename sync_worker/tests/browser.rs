//! The demo page (`/demo`) in headless Chromium: two pages show each other's changes, and a
//! change made in psql shows in both. The browser side is tests/browser/demo.mjs
//! (playwright-core, installed by `make deps`); this test gives it a real cluster and worker.

mod common;
use common::*;
use pg_sync_tests::Cluster;
use std::path::PathBuf;
use std::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_page_shows_other_pages_and_psql_changes_in_chromium() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let script = root.join("tests/browser/demo.mjs");
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
