//! Replay load: one WebSocket client subscribes after sync id 0 and reads the whole log until
//! `caught_up`, counting the deltas it got.
//!
//! Usage: replay_load PORT SECRET USER
//! Prints one JSON line: deltas, seconds (subscribe sent to caught_up read), deltas_per_s.

use futures::{SinkExt, StreamExt};
use pg_sync_bench::token;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (port, secret, user) = (&args[1], &args[2], &args[3]);
    let mut req = format!("ws://127.0.0.1:{port}/sync/ws")
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "Authorization",
        format!("Bearer {}", token(secret, user)).parse().unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let started = Instant::now();
    ws.send(Message::Text(r#"{"type":"subscribe","after":0}"#.into()))
        .await
        .unwrap();
    let mut deltas = 0u64;
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(120), ws.next())
            .await
            .expect("a frame within 120 s");
        match msg {
            Some(Ok(Message::Text(t))) => {
                // A frame per delta today; counted per occurrence in case frames get batched.
                deltas += t.matches("\"type\":\"delta\"").count() as u64;
                if t.contains("\"type\":\"caught_up\"") {
                    break;
                }
            }
            Some(Ok(_)) => {}
            other => panic!("the stream ended before caught_up: {other:?}"),
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({"deltas": deltas, "seconds": seconds, "deltas_per_s": deltas as f64 / seconds})
    );
}
