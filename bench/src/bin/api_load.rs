//! Load for the client API benchmarks, each side by side with its baseline in one run.
//!
//! `api_load bootstrap PORT SECRET USER DATABASE_URL SQL`: streams `GET /sync/bootstrap` (plain,
//! then gzip) and `COPY (SQL) TO STDOUT` over one connection, three rounds interleaved
//! (`BOOTSTRAP_ROUNDS`); prints one JSON line with rows, bytes, seconds (and with
//! `BOOTSTRAP_CPU_PIDS`, worker and cluster CPU seconds) of each run, and the CPU seconds the
//! whole machine was busy, its steal time and this client's own CPU during it.
//!
//! `api_load bootstrap_only PORT SECRET USER` and `api_load copy_only DATABASE_URL SQL`: one run
//! of one side (for a profile).
//!
//! `api_load mutate PORT SECRET USER DATABASE_URL TABLE GROUP SECONDS CLIENTS BATCH ID_BASE`: single-row
//! inserts into TABLE for SECONDS each way: plain `INSERT`s, one transaction each, from one
//! connection; then `POST /sync/mutate` from CLIENTS keep-alive connections, BATCH
//! transactions (one insert op each) per request. Prints one JSON line: transactions/s and
//! latency percentiles of each.

use pg_sync_bench::token;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

async fn db(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to the database");
    tokio::spawn(conn);
    client
}

/// One bootstrap over HTTP/1.0 (the body ends at close, no chunk framing): (rows, bytes).
async fn bootstrap(port: u16, token: &str, gzip: bool) -> (u64, u64) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let enc = if gzip {
        "Accept-Encoding: gzip\r\n"
    } else {
        ""
    };
    s.write_all(
        format!("GET /sync/bootstrap HTTP/1.0\r\nAuthorization: Bearer {token}\r\n{enc}\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    let mut bytes = 0u64;
    let mut tail: Vec<u8> = vec![];
    loop {
        let n = s.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        bytes += n as u64;
        tail.extend_from_slice(&buf[..n]);
        if tail.len() > 8192 {
            tail.drain(..tail.len() - 4096);
        }
    }
    if gzip {
        return (0, bytes);
    }
    // The `end` line says how many rows were sent.
    let text = String::from_utf8_lossy(&tail);
    let end = text
        .lines()
        .rev()
        .find(|l| l.contains("\"type\":\"end\""))
        .expect("an end line");
    let v: serde_json::Value = serde_json::from_str(end).unwrap();
    (v["rows"].as_u64().unwrap(), bytes)
}

async fn copy(url: &str, sql: &str) -> (u64, u64) {
    use futures::StreamExt;
    let c = db(url).await;
    let stream = c
        .copy_out(&format!("COPY ({sql}) TO STDOUT"))
        .await
        .unwrap();
    futures::pin_mut!(stream);
    let (mut rows, mut bytes) = (0u64, 0u64);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        bytes += chunk.len() as u64;
        rows += chunk.iter().filter(|&&b| b == b'\n').count() as u64;
    }
    (rows, bytes)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn latencies(mut v: Vec<f64>) -> serde_json::Value {
    v.sort_by(|a, b| a.total_cmp(b));
    serde_json::json!({"p50_ms": percentile(&v, 0.5), "p99_ms": percentile(&v, 0.99), "max_ms": v.last().copied().unwrap_or(0.0)})
}

/// A keep-alive HTTP/1.1 connection for JSON POSTs.
struct Http {
    r: BufReader<TcpStream>,
    auth: String,
}

impl Http {
    async fn post(&mut self, path: &str, body: &str) -> (u16, String) {
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.auth,
            body.len()
        );
        self.r.get_mut().write_all(req.as_bytes()).await.unwrap();
        let mut line = String::new();
        self.r.read_line(&mut line).await.unwrap();
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut len = 0usize;
        loop {
            line.clear();
            self.r.read_line(&mut line).await.unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().unwrap();
                }
            }
        }
        let mut body = vec![0u8; len];
        self.r.read_exact(&mut body).await.unwrap();
        (status, String::from_utf8(body).unwrap())
    }
}

#[allow(clippy::too_many_arguments)]
async fn mutate_client(
    port: u16,
    token: String,
    table: String,
    group: String,
    first_id: i64,
    batch: usize,
    until: Instant,
) -> (u64, Vec<f64>) {
    let s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.set_nodelay(true).unwrap();
    let mut http = Http {
        r: BufReader::new(s),
        auth: token,
    };
    let client_id = format!("bench-{first_id}");
    let (mut id, mut done, mut lat) = (first_id, 0u64, vec![]);
    while Instant::now() < until {
        let txs: Vec<serde_json::Value> = (0..batch)
            .map(|k| {
                let i = id + k as i64;
                serde_json::json!({
                    "clientTxId": format!("00000000-0000-4000-8000-{i:012}"),
                    "ops": [{"model": table, "action": "I", "id": i,
                             "data": {"grp": group, "title": format!("task {i}"), "done": false}}]})
            })
            .collect();
        id += batch as i64;
        let body = serde_json::json!({"clientId": client_id, "transactions": txs}).to_string();
        let t = Instant::now();
        let (status, reply) = http.post("/sync/mutate", &body).await;
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(status, 200, "{reply}");
        let reply: serde_json::Value = serde_json::from_str(&reply).unwrap();
        let results = reply["results"].as_array().unwrap();
        assert_eq!(results.len(), batch);
        for r in results {
            assert!(
                r["status"] == "applied" && r["changes"] == 1,
                "every transaction applies and makes one delta: {r}"
            );
        }
        done += batch as u64;
    }
    (done, lat)
}

async fn run_mutate(args: &[String]) {
    let port: u16 = args[0].parse().unwrap();
    let token = token(&args[1], &args[2]);
    let (url, table, group) = (&args[3], &args[4], &args[5]);
    let secs: u64 = args[6].parse().unwrap();
    let clients: usize = args[7].parse().unwrap();
    let batch: usize = args[8].parse().unwrap();
    // Ids of this run start here (runs share a table).
    let base: i64 = args[9].parse().unwrap();

    // Baseline: the same rows by plain SQL, one transaction per insert, one connection.
    let c = db(url).await;
    let insert = c
        .prepare(&format!(
            "INSERT INTO {table} (id, grp, title, done) VALUES ($1, $2, $3, false)"
        ))
        .await
        .unwrap();
    let until = Instant::now() + Duration::from_secs(secs);
    let (mut id, mut lat) = (base, vec![]);
    let start = Instant::now();
    while Instant::now() < until {
        let t = Instant::now();
        c.execute(&insert, &[&id, group, &format!("task {id}")])
            .await
            .unwrap();
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
        id += 1;
    }
    let sql_tps = lat.len() as f64 / start.elapsed().as_secs_f64();
    let sql_lat = latencies(lat);

    let until = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|k| {
            tokio::spawn(mutate_client(
                port,
                token.clone(),
                table.clone(),
                group.clone(),
                base + 1_000_000_000 + k as i64 * 100_000_000,
                batch,
                until,
            ))
        })
        .collect();
    let (mut txns, mut lat) = (0u64, vec![]);
    for h in handles {
        let (n, l) = h.await.unwrap();
        txns += n;
        lat.extend(l);
    }
    let api_tps = txns as f64 / start.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "sql_tps": sql_tps, "sql_latency": sql_lat,
            "mutate_tps": api_tps, "mutate_request_latency": latencies(lat),
            "clients": clients, "batch": batch,
        })
    );
}

/// CPU seconds (user + system) `pid` used, with its reaped children's.
fn cpu_secs(pid: u32) -> f64 {
    pg_sync_bench::stat_cpu(&format!("/proc/{pid}/stat")).map_or(0.0, |(own, reaped)| own + reaped)
}

/// CPU seconds the whole machine spent busy (all cores: user, nice, system, irq, softirq,
/// steal) and, of those, steal (the hypervisor ran someone else): with the worker's, the
/// cluster's and this client's own, what is left is other processes' load during a run.
fn machine_cpu() -> (f64, f64) {
    let [user, nice, system, _idle, _iowait, irq, softirq, steal] =
        pg_sync_bench::machine_cpu_states();
    (user + nice + system + irq + softirq + steal, steal)
}

/// CPU seconds the whole cluster used: the postmaster with its reaped children (backends that
/// ended) and its live children.
fn cluster_cpu(postmaster: u32) -> f64 {
    let mut total = cpu_secs(postmaster);
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let ppid = stat[stat.rfind(')').unwrap_or(0) + 2..].split(' ').nth(1);
        if ppid == Some(&postmaster.to_string()) {
            total += cpu_secs(pid);
        }
    }
    total
}

/// `BOOTSTRAP_ROUNDS` rounds (default 3) of COPY, bootstrap and gzip bootstrap. With
/// `BOOTSTRAP_CPU_PIDS="WORKER POSTMASTER"`, each run also reports the CPU seconds the worker
/// and the cluster used during it.
async fn run_bootstrap(args: &[String]) {
    let port: u16 = args[0].parse().unwrap();
    let token = token(&args[1], &args[2]);
    let (url, sql) = (&args[3], &args[4]);
    let rounds: usize = std::env::var("BOOTSTRAP_ROUNDS").map_or(3, |r| r.parse().unwrap());
    let pids: Vec<u32> = std::env::var("BOOTSTRAP_CPU_PIDS")
        .map(|p| p.split_whitespace().map(|p| p.parse().unwrap()).collect())
        .unwrap_or_default();
    let cpu = || {
        let (machine, steal) = machine_cpu();
        let me = cpu_secs(std::process::id());
        match pids.as_slice() {
            [worker, postmaster] => (
                cpu_secs(*worker),
                cluster_cpu(*postmaster),
                machine,
                steal,
                me,
            ),
            _ => (0.0, 0.0, machine, steal, me),
        }
    };
    let mut runs = vec![];
    type Cpu = (f64, f64, f64, f64, f64);
    let mut record = |what: &str, rows: Option<u64>, bytes: u64, t: Instant, before: Cpu| {
        let after = cpu();
        let mut run = serde_json::json!({"what": what, "bytes": bytes, "secs": t.elapsed().as_secs_f64(),
            "worker_cpu": after.0 - before.0, "pg_cpu": after.1 - before.1,
            "machine_cpu": after.2 - before.2, "steal": after.3 - before.3, "client_cpu": after.4 - before.4});
        if let Some(rows) = rows {
            run["rows"] = rows.into();
        }
        runs.push(run);
    };
    for _ in 0..rounds {
        let (before, t) = (cpu(), Instant::now());
        let (rows, bytes) = copy(url, sql).await;
        record("copy", Some(rows), bytes, t, before);
        let (before, t) = (cpu(), Instant::now());
        let (rows, bytes) = bootstrap(port, &token, false).await;
        record("bootstrap", Some(rows), bytes, t, before);
        let (before, t) = (cpu(), Instant::now());
        let (_, bytes) = bootstrap(port, &token, true).await;
        record("bootstrap_gzip", None, bytes, t, before);
    }
    println!("{}", serde_json::Value::Array(runs));
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("bootstrap") if args.len() == 6 => run_bootstrap(&args[1..]).await,
        // One run of one side, for a profile (bench/bootstrap_profile.sh).
        Some("bootstrap_only") if args.len() == 4 => {
            let token = token(&args[2], &args[3]);
            println!(
                "{:?}",
                bootstrap(args[1].parse().unwrap(), &token, false).await
            );
        }
        Some("copy_only") if args.len() == 3 => println!("{:?}", copy(&args[1], &args[2]).await),
        Some("mutate") if args.len() == 11 => run_mutate(&args[1..]).await,
        _ => {
            eprintln!("usage: see the comment at the top of bench/src/bin/api_load.rs");
            std::process::exit(2);
        }
    }
}
