//! pg_sync's side of bench/peers (the side-by-side with Zero): WebSocket subscribers on the real
//! v1 protocol, the same measurements as `bench/peers/zero_client.mjs` makes for Zero.
//!
//! `peers_load latency PORT SECRET CLIENTS AFTER`: users u0..u{CLIENTS-1} subscribe after sync id
//! AFTER; prints `READY` once all are caught up, then reads stdin: `go` starts measuring now - ts
//! (the writer's clock at insert, unix ms, in the row's `ts`) of every delta; `stop ROWS
//! DRAIN_SECS` waits until every client has ROWS measured deltas (or DRAIN_SECS passed) and
//! prints one JSON line: deliveries, expected, missing, p50_ms, p99_ms. A row still missing at the
//! end is counted as missing, ranked above every delivered one (a percentile among them is null).
//!
//! `peers_load catchup PORT SECRET USER AFTER ROWS TIMEOUT_SECS`: one subscriber; prints `READY`
//! once caught up, then `{"rows":N,"done_ms":unix_ms}` when ROWS deltas have arrived live
//! (`done_ms` null if TIMEOUT_SECS passed first).

use futures::{SinkExt, StreamExt};
use pg_sync_bench::token;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::AsyncBufReadExt;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        * 1000.0
}

/// The `ts` number inside a delta frame, without a full parse.
fn ts_of(frame: &str) -> Option<f64> {
    let at = frame.find("\"ts\":")? + 5;
    let rest = &frame[at..];
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    rest[..end].trim().parse().ok()
}

/// Connects as `user`, subscribes after `after` and returns once `caught_up` has arrived.
async fn subscribe(port: u16, secret: &str, user: &str, after: u64) -> Ws {
    let mut req = format!("ws://127.0.0.1:{port}/sync/ws")
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "Authorization",
        format!("Bearer {}", token(secret, user)).parse().unwrap(),
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
    while let Some(Ok(msg)) = ws.next().await {
        if let Message::Text(t) = msg {
            if t.contains("\"caught_up\"") {
                return ws;
            }
        }
    }
    panic!("{user}: connection ended before caught_up");
}

/// User + system CPU time of this process so far, in seconds.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(ru.ru_utime) + secs(ru.ru_stime)
}

struct Client {
    count: AtomicU64,
    lat: Mutex<Vec<f64>>,
}

async fn latency(args: &[String]) {
    let port: u16 = args[0].parse().unwrap();
    let secret = Arc::new(args[1].clone());
    let clients: usize = args[2].parse().unwrap();
    let after: u64 = args[3].parse().unwrap();
    let measuring = Arc::new(AtomicBool::new(false));
    let mut all = Vec::new();
    let mut ready = Vec::new();
    for i in 0..clients {
        let c = Arc::new(Client {
            count: AtomicU64::new(0),
            lat: Mutex::new(Vec::new()),
        });
        all.push(c.clone());
        let (secret, measuring) = (secret.clone(), measuring.clone());
        let (tx, rx) = tokio::sync::oneshot::channel();
        ready.push(rx);
        tokio::spawn(async move {
            let mut ws = subscribe(port, &secret, &format!("u{i}"), after).await;
            let _ = tx.send(());
            while let Some(Ok(msg)) = ws.next().await {
                let Message::Text(t) = msg else { continue };
                if !measuring.load(Ordering::Relaxed) {
                    continue;
                }
                if let Some(ts) = ts_of(t.as_str()) {
                    c.lat.lock().unwrap().push(now_ms() - ts);
                    c.count.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    for rx in ready {
        rx.await.unwrap();
    }
    println!("READY");
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["go"] => measuring.store(true, Ordering::Relaxed),
            ["stop", rows, drain] => {
                let rows: u64 = rows.parse().unwrap();
                let deadline =
                    tokio::time::Instant::now() + Duration::from_secs(drain.parse().unwrap());
                while tokio::time::Instant::now() < deadline
                    && all.iter().any(|c| c.count.load(Ordering::Relaxed) < rows)
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                measuring.store(false, Ordering::Relaxed);
                let delivered: u64 = all
                    .iter()
                    .map(|c| c.count.load(Ordering::Relaxed).min(rows))
                    .sum();
                let mut lat: Vec<f64> = all
                    .iter()
                    .flat_map(|c| c.lat.lock().unwrap().clone())
                    .collect();
                lat.sort_by(f64::total_cmp);
                // Missing rows rank above every delivered one: a percentile that falls among
                // them is null (not delivered within the drain), never a number.
                let missing = rows * clients as u64 - delivered;
                let n = lat.len() + missing as usize;
                let pct = |p: f64| {
                    let i = ((p * n as f64).ceil() as usize).clamp(1, n.max(1)) - 1;
                    lat.get(i).copied()
                };
                println!(
                    "{}",
                    serde_json::json!({
                        "deliveries": lat.len(),
                        "expected": rows * clients as u64,
                        "missing": missing,
                        "p50_ms": pct(0.50),
                        "p99_ms": pct(0.99),
                        "client_cpu_s": cpu_seconds(),
                    })
                );
                break;
            }
            _ => {}
        }
    }
    std::process::exit(0);
}

async fn catchup(args: &[String]) {
    let port: u16 = args[0].parse().unwrap();
    let after: u64 = args[3].parse().unwrap();
    let want: u64 = args[4].parse().unwrap();
    let timeout = Duration::from_secs(args[5].parse().unwrap());
    let mut ws = subscribe(port, &args[1], &args[2], after).await;
    println!("READY");
    let deadline = tokio::time::Instant::now() + timeout;
    let mut rows = 0u64;
    while rows < want {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) if t.contains("\"type\":\"delta\"") => rows += 1,
            Ok(Some(Ok(_))) => {}
            _ => break,
        }
    }
    let done = (rows >= want).then(now_ms);
    println!("{}", serde_json::json!({"rows": rows, "done_ms": done}));
    std::process::exit(0);
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("latency") => latency(&args[1..]).await,
        Some("catchup") => catchup(&args[1..]).await,
        _ => {
            eprintln!("usage: peers_load latency PORT SECRET CLIENTS AFTER | catchup PORT SECRET USER AFTER ROWS TIMEOUT_SECS");
            std::process::exit(2);
        }
    }
}
