//! Fan-out load: N WebSocket subscribers spread over G groups, each measuring commit-to-receive
//! latency from the `ts` (unix ms, set at insert) in every delta's data.
//!
//! Usage: fanout_load PORT SECRET SUBSCRIBERS SECONDS [AFTER] (user uI is subscriber I;
//! memberships are set up by the caller; each subscribes after sync id AFTER, default 0)
//! Prints `READY` once every subscriber is caught up, then waits for a line on stdin to start
//! measuring for SECONDS, then prints one JSON line with the results.

use futures::{SinkExt, StreamExt};
use pg_sync_bench::{now_ms, token, ts_of, Histogram};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncBufReadExt;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

struct Stats {
    latency: Histogram,
    deliveries: AtomicU64,
    measuring: std::sync::atomic::AtomicBool,
    closed: AtomicU64,
}

async fn subscriber(
    port: u16,
    secret: Arc<String>,
    user: String,
    stats: Arc<Stats>,
    ready: tokio::sync::mpsc::Sender<()>,
    after: i64,
) {
    let mut req = format!("ws://127.0.0.1:{port}/sync/ws")
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "Authorization",
        format!("Bearer {}", token(&secret, &user)).parse().unwrap(),
    );
    let mut ws = loop {
        match tokio_tungstenite::connect_async(req.clone()).await {
            Ok((ws, _)) => break ws,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    ws.send(Message::Text(
        format!(r#"{{"type":"subscribe","after":{after}}}"#).into(),
    ))
    .await
    .unwrap();
    let mut ready = Some(ready);
    while let Some(msg) = ws.next().await {
        match msg {
            Ok(Message::Text(t)) => {
                if let Some(r) = ready.take_if(|_| t.contains("\"caught_up\"")) {
                    let _ = r.send(()).await;
                    continue;
                }
                if !stats.measuring.load(Ordering::Relaxed) {
                    continue;
                }
                if let Some(ts) = ts_of(t.as_str()) {
                    stats.latency.record_ms(now_ms() - ts);
                    stats.deliveries.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(Message::Close(_)) | Err(_) => break,
            _ => {}
        }
    }
    stats.closed.fetch_add(1, Ordering::Relaxed);
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let port: u16 = args[1].parse().unwrap();
    let secret = Arc::new(args[2].clone());
    let subscribers: usize = args[3].parse().unwrap();
    let seconds: u64 = args[4].parse().unwrap();
    let after: i64 = args.get(5).map_or(0, |a| a.parse().unwrap());
    let stats = Arc::new(Stats {
        latency: Histogram::new(),
        deliveries: AtomicU64::new(0),
        measuring: false.into(),
        closed: AtomicU64::new(0),
    });
    let (tx, mut rx) = tokio::sync::mpsc::channel(subscribers);
    let limit = Arc::new(tokio::sync::Semaphore::new(256));
    for i in 0..subscribers {
        let permit = limit.clone().acquire_owned().await.unwrap();
        let (secret, stats, tx) = (secret.clone(), stats.clone(), tx.clone());
        let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(subscriber(
            port,
            secret,
            format!("u{i}"),
            stats,
            ready_tx,
            after,
        ));
        tokio::spawn(async move {
            if ready_rx.recv().await.is_some() {
                let _ = tx.send(()).await;
            }
            drop(permit);
        });
    }
    for _ in 0..subscribers {
        rx.recv().await.unwrap();
    }
    println!("READY");
    let mut line = String::new();
    tokio::io::BufReader::new(tokio::io::stdin())
        .read_line(&mut line)
        .await
        .unwrap();
    stats.measuring.store(true, Ordering::Relaxed);
    let start = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stats.measuring.store(false, Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    let deliveries = stats.deliveries.load(Ordering::Relaxed);
    println!(
        "{}",
        serde_json::json!({
            "deliveries": deliveries,
            "deliveries_per_s": deliveries as f64 / elapsed,
            "p50_ms": stats.latency.percentile(0.50),
            "p99_ms": stats.latency.percentile(0.99),
            "p999_ms": stats.latency.percentile(0.999),
            "closed": stats.closed.load(Ordering::Relaxed),
        })
    );
    std::process::exit(0);
}
