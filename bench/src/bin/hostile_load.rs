//! Fan-out under attack: N normal WebSocket subscribers (as in fanout_load) measure
//! commit-to-receive latency while, in alternate phases, 100 hostile connections run beside them:
//! a third flood bad frames (text and binary, closed 4400, reconnect), a third use API keys that
//! are revoked under them (closed 4401, a new key, again), a third subscribe from 0 and stop
//! reading (cut off 4008 after 30 s, reconnect). Per phase, CPU is read from /proc for every
//! process that could be the cost: the worker, each kind of Postgres process (the worker's
//! walsender and pooled backends, pgbench's, this generator's, background and exited ones),
//! pgbench, this generator and its attacker thread, and the machine as a whole.
//!
//! Usage: hostile_load PORT SECRET SUBSCRIBERS SECONDS ROUNDS WORKER_PID DATABASE_URL [KINDS]
//! (user uI is normal subscriber I, users hI the hostile ones; memberships are set up by the
//! caller). KINDS is a comma list of `frames`, `revoked`, `stalled` (default all three): hostile
//! connection I runs kind I % 3 and is left out if that kind is not listed, so one kind alone is
//! its third of the 100. The worker's pooled connections are recognised by application_name
//! `sync_worker`, pgbench's by `pgbench`. Prints `READY` once every normal subscriber is caught
//! up, waits for a line on stdin, then runs ROUNDS rounds of a quiet phase and a hostile phase
//! of SECONDS each, and prints one JSON line per phase.

use futures::{SinkExt, StreamExt};
use pg_sync_bench::{now_ms, stat_cpu, token, ts_of, Histogram};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncBufReadExt;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const HOSTILE: usize = 100;
const IDLE: usize = usize::MAX;
const KINDS: [&str; 3] = ["frames", "revoked", "stalled"];
/// The attackers' runtime thread (its CPU is reported apart from the measuring subscribers').
static ATTACKER_TID: AtomicI32 = AtomicI32::new(0);

struct Stats {
    /// One histogram per phase.
    phases: Vec<Histogram>,
    /// The phase being measured (`IDLE`: none).
    phase: AtomicUsize,
    hostile: AtomicBool,
    closed: AtomicU64,
    /// What the hostile connections got: 4400 closes, 4401 closes, 4008 closes, other ends.
    bad_frame_closes: AtomicU64,
    revoked_closes: AtomicU64,
    stalled_cutoffs: AtomicU64,
    other_ends: AtomicU64,
    /// Handshakes of the `revoked` kind refused before the upgrade: HTTP status -> count.
    revoked_refused: std::sync::Mutex<std::collections::BTreeMap<u16, u64>>,
    /// Handshakes of the `frames` kind refused (the penalty box after a 4400: 429).
    frames_refused: AtomicU64,
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

async fn connect(port: u16, bearer: &str, rcvbuf: Option<u32>) -> Option<Ws> {
    connect_status(port, bearer, rcvbuf).await.ok()
}

/// A WebSocket, or the HTTP status the handshake was refused with (None: no answer).
async fn connect_status(port: u16, bearer: &str, rcvbuf: Option<u32>) -> Result<Ws, Option<u16>> {
    let socket = tokio::net::TcpSocket::new_v4().map_err(|_| None)?;
    if let Some(n) = rcvbuf {
        socket.set_recv_buffer_size(n).map_err(|_| None)?;
    }
    let stream = socket
        .connect(([127, 0, 0, 1], port).into())
        .await
        .map_err(|_| None)?;
    let mut req = format!("ws://127.0.0.1:{port}/sync/ws")
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("Authorization", format!("Bearer {bearer}").parse().unwrap());
    match tokio_tungstenite::client_async(req, stream).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(Some(r.status().as_u16())),
        Err(_) => Err(None),
    }
}

async fn subscriber(
    port: u16,
    secret: Arc<String>,
    user: String,
    stats: Arc<Stats>,
    ready: tokio::sync::mpsc::Sender<()>,
) {
    let jwt = token(&secret, &user);
    let mut ws = loop {
        match connect(port, &jwt, None).await {
            Some(ws) => break ws,
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    ws.send(Message::Text(r#"{"type":"subscribe","after":0}"#.into()))
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
                let phase = stats.phase.load(Ordering::Relaxed);
                if phase == IDLE {
                    continue;
                }
                if let Some(ts) = ts_of(t.as_str()) {
                    stats.phases[phase].record_ms(now_ms() - ts);
                }
            }
            Ok(Message::Close(_)) | Err(_) => break,
            _ => {}
        }
    }
    stats.closed.fetch_add(1, Ordering::Relaxed);
}

/// The close code a hostile connection ends with (None: reset, or still open after `wait`).
async fn close_code(ws: &mut Ws, wait: Duration) -> Option<u16> {
    tokio::time::timeout(wait, async {
        while let Some(m) = ws.next().await {
            match m {
                Ok(Message::Close(Some(f))) => return Some(u16::from(f.code)),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
        None
    })
    .await
    .unwrap_or(None)
}

async fn wait_hostile(stats: &Stats) {
    while !stats.hostile.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Floods junk frames (text and binary, 100 a second) until closed, then reconnects.
async fn bad_frames(port: u16, jwt: String, stats: Arc<Stats>) {
    loop {
        wait_hostile(&stats).await;
        let mut ws = match connect_status(port, &jwt, None).await {
            Ok(ws) => ws,
            Err(status) => {
                if status == Some(429) {
                    stats.frames_refused.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let mut n = 0u32;
        loop {
            let frame = if n.is_multiple_of(2) {
                Message::Text("{\"type\":\"nope\"".into())
            } else {
                Message::Binary(vec![0xff; 64].into())
            };
            n += 1;
            if ws.send(frame).await.is_err() || n > 40 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        match close_code(&mut ws, Duration::from_secs(5)).await {
            Some(4400) => stats.bad_frame_closes.fetch_add(1, Ordering::Relaxed),
            _ => stats.other_ends.fetch_add(1, Ordering::Relaxed),
        };
    }
}

/// Subscribes with a fresh API key, has it revoked, and waits for the close; again.
async fn revoked(port: u16, user: String, db: Arc<tokio_postgres::Client>, stats: Arc<Stats>) {
    loop {
        wait_hostile(&stats).await;
        let Ok(row) = db
            .query_one(
                "SELECT id::text, key FROM pg_sync.create_api_key($1)",
                &[&user],
            )
            .await
        else {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        let (id, key): (String, String) = (row.get(0), row.get(1));
        let mut ws = match connect_status(port, &key, None).await {
            Ok(ws) => ws,
            Err(status) => {
                // (The key is left unrevoked: it was never used.)
                *stats
                    .revoked_refused
                    .lock()
                    .unwrap()
                    .entry(status.unwrap_or(0))
                    .or_default() += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // From 0 (the attack as designed), or, for attributing its cost only, from the log's
        // end (HOSTILE_REVOKED_FROM=last: the revocation without the replay).
        let mut after = 0i64;
        if std::env::var("HOSTILE_REVOKED_FROM").as_deref() == Ok("last") {
            if let Ok(row) = db.query_one("SELECT pg_sync.last_sync_id()", &[]).await {
                after = row.get(0);
            }
        }
        let subscribe = format!(r#"{{"type":"subscribe","after":{after}}}"#);
        let _ = ws.send(Message::Text(subscribe.into())).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let _ = db
            .execute("SELECT pg_sync.revoke_api_key($1::text::uuid)", &[&id])
            .await;
        match close_code(&mut ws, Duration::from_secs(10)).await {
            Some(4401) => stats.revoked_closes.fetch_add(1, Ordering::Relaxed),
            _ => stats.other_ends.fetch_add(1, Ordering::Relaxed),
        };
    }
}

/// Subscribes from 0 over a 4 KiB receive window and never reads; holds the connection until
/// the phase ends (or the worker cuts it off), then starts again.
async fn stalled(port: u16, jwt: String, stats: Arc<Stats>) {
    loop {
        wait_hostile(&stats).await;
        let Some(mut ws) = connect(port, &jwt, Some(4096)).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let _ = ws
            .send(Message::Text(r#"{"type":"subscribe","after":0}"#.into()))
            .await;
        while stats.hostile.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Reading now drains what was buffered and shows whether the worker cut it off.
        if close_code(&mut ws, Duration::from_millis(200)).await == Some(4008) {
            stats.stalled_cutoffs.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A process's CPU time so far, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    stat_cpu(&format!("/proc/{pid}/stat")).map_or(0.0, |c| c.0)
}

/// Busy and total CPU seconds of the whole machine (/proc/stat; idle and iowait are not busy).
fn machine_busy_total() -> (f64, f64) {
    let states = pg_sync_bench::machine_cpu_states();
    let total: f64 = states.iter().sum();
    (total - states[3] - states[4], total)
}

/// The pgbench processes the caller (the bench script) started beside this one.
fn pgbench_pids() -> Vec<u32> {
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { libc::getppid() }.to_string();
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let comm = stat.split_once('(').and_then(|(_, r)| r.rsplit_once(')'));
        if let Some((comm, rest)) = comm {
            if comm == "pgbench" && rest.split_whitespace().nth(1) == Some(parent.as_str()) {
                pids.push(pid);
            }
        }
    }
    pids
}

/// CPU seconds so far, per process, with the category each one is reported under.
struct CpuSnap {
    /// pid -> (category, seconds) of every Postgres process of the cluster.
    pg: HashMap<i32, (&'static str, f64)>,
    /// The postmaster's reaped children (backends that exited).
    exited: f64,
    /// Fixed processes and threads: category -> seconds.
    fixed: HashMap<&'static str, f64>,
    machine: (f64, f64),
    at: std::time::Instant,
}

async fn cpu_snap(db: &tokio_postgres::Client, worker: u32, own_pg: &[i32]) -> CpuSnap {
    let rows = db
        .query(
            "SELECT pid, coalesce(backend_type, ''), coalesce(application_name, '')
               FROM pg_stat_activity",
            &[],
        )
        .await
        .unwrap_or_default();
    let mut pg = HashMap::new();
    let mut postmaster = 0;
    for r in rows {
        let (pid, kind, app): (i32, String, String) = (r.get(0), r.get(1), r.get(2));
        let category = if kind == "walsender" {
            "pg_walsender"
        } else if app == "sync_worker" {
            "pg_worker_backends"
        } else if app.starts_with("pgbench") {
            "pg_pgbench_backends"
        } else if own_pg.contains(&pid) || app == "hostile_load" {
            "pg_loadgen_backends"
        } else {
            "pg_other"
        };
        let path = format!("/proc/{pid}/stat");
        if let Some((cpu, _)) = stat_cpu(&path) {
            pg.insert(pid, (category, cpu));
        }
        if postmaster == 0 {
            let stat = std::fs::read_to_string(&path).unwrap_or_default();
            let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
            postmaster = after
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
        }
    }
    let postmaster_cpu = stat_cpu(&format!("/proc/{postmaster}/stat")).unwrap_or_default();
    pg.insert(postmaster, ("pg_other", postmaster_cpu.0));
    let mut fixed = HashMap::new();
    fixed.insert("worker", cpu_seconds(worker));
    fixed.insert(
        "pgbench",
        pgbench_pids().into_iter().map(cpu_seconds).sum::<f64>(),
    );
    fixed.insert("loadgen", stat_cpu("/proc/self/stat").map_or(0.0, |c| c.0));
    let tid = ATTACKER_TID.load(Ordering::Relaxed);
    fixed.insert(
        "loadgen_attackers",
        stat_cpu(&format!("/proc/self/task/{tid}/stat")).map_or(0.0, |c| c.0),
    );
    CpuSnap {
        pg,
        exited: postmaster_cpu.1,
        fixed,
        machine: machine_busy_total(),
        at: std::time::Instant::now(),
    }
}

/// Cores used per category between two snapshots. A Postgres process that exited in between
/// counts under `pg_exited` (its whole life less what the first snapshot saw of it).
fn cpu_between(a: &CpuSnap, b: &CpuSnap) -> serde_json::Value {
    let secs = b.at.duration_since(a.at).as_secs_f64();
    let mut cores: HashMap<&'static str, f64> = HashMap::new();
    for (pid, (category, cpu)) in &b.pg {
        let before = a.pg.get(pid).map_or(0.0, |p| p.1);
        *cores.entry(category).or_default() += cpu - before;
    }
    let gone: f64 =
        a.pg.iter()
            .filter(|(pid, _)| !b.pg.contains_key(pid))
            .map(|(_, p)| p.1)
            .sum();
    cores.insert("pg_exited", (b.exited - a.exited - gone).max(0.0));
    for (category, cpu) in &b.fixed {
        cores.insert(
            category,
            cpu - a.fixed.get(category).copied().unwrap_or(0.0),
        );
    }
    let mut out = serde_json::Map::new();
    for (category, cpu) in cores {
        out.insert(category.into(), serde_json::json!(cpu / secs));
    }
    let (busy, total) = (b.machine.0 - a.machine.0, b.machine.1 - a.machine.1);
    let cores_n = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    out.insert(
        "machine_busy".into(),
        serde_json::json!(if total > 0.0 {
            busy / total * cores_n
        } else {
            0.0
        }),
    );
    serde_json::Value::Object(out)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let port: u16 = args[1].parse().unwrap();
    let secret = Arc::new(args[2].clone());
    let subscribers: usize = args[3].parse().unwrap();
    let seconds: u64 = args[4].parse().unwrap();
    let rounds: usize = args[5].parse().unwrap();
    let worker: u32 = args[6].parse().unwrap();
    let url = format!("{} application_name=hostile_load", args[7]);
    let kinds: Vec<String> = args
        .get(8)
        .map_or("frames,revoked,stalled", |k| k.as_str())
        .split(',')
        .map(|k| k.trim().to_string())
        .collect();
    if let Some(k) = kinds.iter().find(|k| !KINDS.contains(&k.as_str())) {
        panic!("unknown hostile kind {k:?} (known: {KINDS:?})");
    }
    // The attackers' connection (API keys made and revoked) and the one reading
    // pg_stat_activity for the CPU figures.
    let (db, attack_conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("database");
    let db = Arc::new(db);
    let (meter, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("database");
    tokio::spawn(conn);
    let mut own_pg = Vec::new();
    tokio::spawn(attack_conn);
    for c in [&*db, &meter] {
        let row = c.query_one("SELECT pg_backend_pid()", &[]).await.unwrap();
        own_pg.push(row.get::<_, i32>(0));
    }
    let stats = Arc::new(Stats {
        phases: (0..rounds * 2).map(|_| Histogram::new()).collect(),
        phase: AtomicUsize::new(IDLE),
        hostile: false.into(),
        closed: AtomicU64::new(0),
        bad_frame_closes: AtomicU64::new(0),
        revoked_closes: AtomicU64::new(0),
        stalled_cutoffs: AtomicU64::new(0),
        other_ends: AtomicU64::new(0),
        revoked_refused: Default::default(),
        frames_refused: Default::default(),
    });
    let (tx, mut rx) = tokio::sync::mpsc::channel(subscribers);
    let limit = Arc::new(tokio::sync::Semaphore::new(256));
    for i in 0..subscribers {
        let permit = limit.clone().acquire_owned().await.unwrap();
        let (secret, stats, tx) = (secret.clone(), stats.clone(), tx.clone());
        let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(subscriber(port, secret, format!("u{i}"), stats, ready_tx));
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
    // The hostile connections run on threads of their own at the lowest CPU priority: their
    // client-side work must not delay the normal subscribers' measuring in this same process
    // (real attackers have machines of their own). Their rate is paced, not CPU-bound.
    let attackers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .on_thread_start(|| {
            // SAFETY: setpriority on the calling thread (0 = this thread on Linux); gettid has
            // no preconditions.
            unsafe {
                libc::setpriority(libc::PRIO_PROCESS, 0, 19);
                ATTACKER_TID.store(libc::gettid(), Ordering::Relaxed);
            }
        })
        .build()
        .unwrap();
    for i in 0..HOSTILE {
        if !kinds.iter().any(|k| k == KINDS[i % 3]) {
            continue;
        }
        let (stats, user) = (stats.clone(), format!("h{i}"));
        match i % 3 {
            0 => attackers.spawn(bad_frames(port, token(&secret, &user), stats)),
            1 => attackers.spawn(revoked(port, user, db.clone(), stats)),
            _ => attackers.spawn(stalled(port, token(&secret, &user), stats)),
        };
    }
    println!("READY");
    let mut line = String::new();
    tokio::io::BufReader::new(tokio::io::stdin())
        .read_line(&mut line)
        .await
        .unwrap();
    for round in 0..rounds {
        for hostile in [false, true] {
            let phase = round * 2 + usize::from(hostile);
            stats.hostile.store(hostile, Ordering::Relaxed);
            // Let the phase settle (connections come up or go) before measuring it.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let cpu0 = cpu_seconds(worker);
            let snap0 = cpu_snap(&meter, worker, &own_pg).await;
            let start = std::time::Instant::now();
            stats.phase.store(phase, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_secs(seconds)).await;
            stats.phase.store(IDLE, Ordering::Relaxed);
            let elapsed = start.elapsed().as_secs_f64();
            let cpu = (cpu_seconds(worker) - cpu0) / elapsed;
            let cores = cpu_between(&snap0, &cpu_snap(&meter, worker, &own_pg).await);
            let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
            let loadavg: Vec<&str> = loadavg.split_whitespace().take(3).collect();
            let h = &stats.phases[phase];
            let (deliveries, p50) = (h.count(), h.percentile(0.50));
            let p99 = h.percentile(0.99);
            let p999 = h.percentile(0.999);
            println!(
                "{}",
                serde_json::json!({
                    "round": round,
                    "hostile": hostile,
                    "deliveries_per_s": deliveries as f64 / elapsed,
                    "p50_ms": p50,
                    "p99_ms": p99,
                    "p999_ms": p999,
                    "worker_cpu": cpu,
                    "cores": cores,
                    "loadavg": loadavg.join(" "),
                    "kinds": kinds.join(","),
                    "normal_closed": stats.closed.load(Ordering::Relaxed),
                    "bad_frame_closes": stats.bad_frame_closes.load(Ordering::Relaxed),
                    "revoked_closes": stats.revoked_closes.load(Ordering::Relaxed),
                    "stalled_cutoffs": stats.stalled_cutoffs.load(Ordering::Relaxed),
                    "other_ends": stats.other_ends.load(Ordering::Relaxed),
                    "revoked_refused": format!("{:?}", stats.revoked_refused.lock().unwrap()),
                    "frames_refused": stats.frames_refused.load(Ordering::Relaxed),
                })
            );
        }
    }
    std::process::exit(0);
}
