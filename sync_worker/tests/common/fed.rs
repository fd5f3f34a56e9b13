//! The federation chaos harness: N clusters and N workers on loopback, one TCP proxy per
//! directed link (cut, freeze, delay, one-way), worker restarts with failpoints, a quiescence
//! barrier, a convergence checker (table contents and per-row LWW state) and exactly-once
//! checks. Blocking (the `postgres` client); the proxies run on the harness's own runtime.
#![allow(dead_code)]

use super::common::{free_port, http_get, Worker};
use pg_sync_tests::postgres::Client;
use pg_sync_tests::Cluster;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What a proxy does to its link right now.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Fault {
    /// Connections are closed and new ones dropped at once (a refused, reset link).
    pub cut: bool,
    /// Bytes from the sender (frames) are held, connections stay open (a black hole).
    pub freeze_data: bool,
    /// Bytes from the receiver (auth, acks) are held.
    pub freeze_acks: bool,
    /// Added before each chunk is forwarded, both ways.
    pub delay: Duration,
    /// Bumped by `cut`: pumps of older connections end.
    generation: u64,
}

/// A TCP proxy for one directed link S → R: R dials the proxy, which dials S's worker.
pub struct Proxy {
    pub port: u16,
    state: watch::Sender<Fault>,
    /// Bytes forwarded from the sender (frames) so far, over every connection.
    pub data_bytes: Arc<AtomicU64>,
    /// The sender's worker port, read at each new connection.
    upstream: Arc<AtomicU16>,
}

impl Proxy {
    fn start(rt: &tokio::runtime::Runtime, upstream: u16) -> Proxy {
        let std = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std.set_nonblocking(true).unwrap();
        let port = std.local_addr().unwrap().port();
        let (state, _) = watch::channel(Fault::default());
        let rx = state.subscribe();
        let data_bytes = Arc::new(AtomicU64::new(0));
        let counted = data_bytes.clone();
        let upstream = Arc::new(AtomicU16::new(upstream));
        let to = upstream.clone();
        rt.spawn(async move {
            let listener = TcpListener::from_std(std).unwrap();
            loop {
                let Ok((down, _)) = listener.accept().await else {
                    continue;
                };
                let mut rx = rx.clone();
                let counted = counted.clone();
                let upstream = to.load(Ordering::Relaxed);
                tokio::spawn(async move {
                    let f = rx.borrow_and_update().clone();
                    if f.cut {
                        return; // dropped: the dialer sees the connection reset
                    }
                    let Ok(up) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                        return;
                    };
                    let _ = down.set_nodelay(true);
                    let _ = up.set_nodelay(true);
                    let (dr, dw) = down.into_split();
                    let (ur, uw) = up.into_split();
                    let g = f.generation;
                    let acks = tokio::spawn(pump(dr, uw, rx.clone(), g, None));
                    pump(ur, dw, rx, g, Some(counted)).await;
                    acks.abort();
                });
            }
        });
        Proxy {
            port,
            state,
            data_bytes,
            upstream,
        }
    }

    /// Points new connections at another worker port (a second worker on the same database).
    pub fn set_upstream(&self, port: u16) {
        self.upstream.store(port, Ordering::Relaxed);
    }

    pub fn set(&self, change: impl FnOnce(&mut Fault)) {
        self.state.send_modify(|f| {
            let was_cut = f.cut;
            change(f);
            if f.cut && !was_cut {
                f.generation += 1;
            }
        });
    }

    pub fn cut(&self) {
        self.set(|f| f.cut = true);
    }

    pub fn heal(&self) {
        self.set(|f| {
            let g = f.generation;
            *f = Fault::default();
            f.generation = g;
        });
    }
}

/// Forwards one direction of a proxied connection while the link's fault allows it.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut rx: watch::Receiver<Fault>,
    generation: u64,
    // Some(counter): this is the sender's direction (frames), counted.
    data: Option<Arc<AtomicU64>>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = rx.changed() => {
                if rx.borrow().generation != generation {
                    return;
                }
                continue;
            }
        };
        // Hold the chunk while this direction is frozen; a cut ends the connection.
        loop {
            let f = rx.borrow_and_update().clone();
            if f.generation != generation {
                return;
            }
            let frozen = if data.is_some() {
                f.freeze_data
            } else {
                f.freeze_acks
            };
            if !frozen {
                if !f.delay.is_zero() {
                    tokio::time::sleep(f.delay).await;
                }
                break;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
        if let Some(c) = &data {
            c.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

/// A TCP proxy between a worker and its Postgres that tells replication connections (their
/// startup packet has a `replication` parameter) from the others, and can drop the worker's end
/// of those while it keeps Postgres's end open and unread: their walsenders linger, holding the
/// slot, as after a network failure the server did not see (until `wal_sender_timeout`).
pub struct PgProxy {
    pub port: u16,
    /// Bumped by `drop_replication` (`.0`: replication connections made before are dropped)
    /// and `drop_all` (both: every connection made before is dropped).
    generation: watch::Sender<(u64, u64)>,
}

impl PgProxy {
    fn start(rt: &tokio::runtime::Runtime, upstream: u16) -> PgProxy {
        let std = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std.set_nonblocking(true).unwrap();
        let port = std.local_addr().unwrap().port();
        let (generation, rx) = watch::channel((0u64, 0u64));
        // Postgres's ends of the dropped connections, kept open until the runtime ends.
        let lingering = Arc::new(std::sync::Mutex::new(Vec::<TcpStream>::new()));
        rt.spawn(async move {
            let listener = TcpListener::from_std(std).unwrap();
            loop {
                let Ok((down, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(pg_connection(down, upstream, rx.clone(), lingering.clone()));
            }
        });
        PgProxy { port, generation }
    }

    /// Drops the worker's end of every replication connection open now.
    pub fn drop_replication(&self) {
        self.generation.send_modify(|g| g.0 += 1);
    }

    /// Drops the worker's end of every connection open now (replication, pool, federation
    /// lock), keeping Postgres's ends open: a network failure the server did not see.
    pub fn drop_all(&self) {
        self.generation.send_modify(|g| {
            g.0 += 1;
            g.1 += 1;
        });
    }
}

/// Forwards one connection of a `PgProxy`.
async fn pg_connection(
    mut down: TcpStream,
    upstream: u16,
    mut generation: watch::Receiver<(u64, u64)>,
    lingering: Arc<std::sync::Mutex<Vec<TcpStream>>>,
) {
    let born = *generation.borrow_and_update();
    let Ok(mut up) = TcpStream::connect(("127.0.0.1", upstream)).await else {
        return;
    };
    let _ = down.set_nodelay(true);
    let _ = up.set_nodelay(true);
    // The startup packet, after any SSL or GSS encryption request (which the test clusters
    // refuse with one byte: the startup packet follows in the clear).
    let replication = loop {
        let mut head = [0u8; 8];
        if down.read_exact(&mut head).await.is_err() {
            return;
        }
        let len = u32::from_be_bytes(head[..4].try_into().unwrap()) as usize;
        let code = u32::from_be_bytes(head[4..].try_into().unwrap());
        let mut body = vec![0u8; len.saturating_sub(8)];
        if down.read_exact(&mut body).await.is_err()
            || up.write_all(&head).await.is_err()
            || up.write_all(&body).await.is_err()
        {
            return;
        }
        if code == 80_877_103 || code == 80_877_104 {
            let mut answer = [0u8; 1];
            if up.read_exact(&mut answer).await.is_err() || down.write_all(&answer).await.is_err() {
                return;
            }
            continue;
        }
        // Parameters: name, value, name, value, ..., then an empty name.
        let fields: Vec<&[u8]> = body.split(|b| *b == 0).collect();
        break fields.chunks(2).any(|kv| kv[0] == b"replication");
    };
    let dropped = tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut down, &mut up) => false,
        r = generation.wait_for(|g| if replication { g.0 != born.0 } else { g.1 != born.1 }) => r.is_ok(),
    };
    if dropped {
        drop(down);
        lingering.lock().unwrap().push(up);
    }
}

pub const ITEMS: &str = "CREATE TABLE items (id text PRIMARY KEY, a text, b int, grp text);
     SELECT pg_sync.register_table('items', group_column => 'grp', federation => 'both');";

pub struct Node {
    pub name: String,
    pub cluster: Cluster,
    pub db: Client,
    /// The worker's listener (kept across restarts: peers' proxies dial it).
    pub port: u16,
    pub worker: Option<Worker>,
}

impl Node {
    pub fn exec(&mut self, sql: &str) {
        let name = &self.name;
        self.db
            .batch_execute(sql)
            .unwrap_or_else(|e| panic!("{name}: {sql}: {e}"));
    }

    /// The first column of the first row, as text ('' for NULL).
    pub fn text(&mut self, sql: &str) -> String {
        let name = &self.name;
        self.db
            .query_one(&format!("SELECT ({sql})::text"), &[])
            .unwrap_or_else(|e| panic!("{name}: {sql}: {e}"))
            .get::<_, Option<String>>(0)
            .unwrap_or_default()
    }

    pub fn int(&mut self, sql: &str) -> i64 {
        self.text(sql).parse().unwrap_or(0)
    }

    pub fn last_sync_id(&mut self) -> i64 {
        self.int("SELECT pg_sync.last_sync_id()")
    }

    /// Committed actions the worker has not sequenced yet (no sync id, so no peer can have
    /// them): quiescence needs none, or a slow sequencer looks like a settled log.
    pub fn unsequenced(&mut self) -> i64 {
        self.int(
            "SELECT count(*) FROM pg_sync.sync_actions a
              WHERE NOT EXISTS (SELECT 1 FROM pg_sync.commit_order c WHERE c.xid = a.xid)",
        )
    }

    /// How much of `peer`'s log this node has applied.
    pub fn cursor(&mut self, peer: &str) -> i64 {
        self.int(&format!(
            "SELECT coalesce((SELECT last_sync_id FROM pg_sync.peer_cursors WHERE peer_node_id = '{peer}'), 0)"
        ))
    }

    /// The table's rows and the rows' LWW state (lock placeholders left out), as text.
    pub fn state(&mut self, table: &str) -> (String, String) {
        let rows = self.text(&format!(
            "SELECT coalesce(jsonb_agg(to_jsonb(t) ORDER BY id), '[]') FROM {table} t"
        ));
        let lww = self.text(&format!(
            "SELECT coalesce(jsonb_agg(jsonb_build_array(model_id, created, deleted, versions, pending)
                                       ORDER BY model_id), '[]')
               FROM pg_sync.row_state
              WHERE model = '{table}' AND (created IS NOT NULL OR deleted IS NOT NULL OR versions <> '{{}}')"
        ));
        (rows, lww)
    }

    /// Starts (or restarts) the worker, with `env` (e.g. failpoints), and waits until healthy.
    pub fn start_worker(&mut self, env: &[(&str, &str)]) {
        self.worker = None;
        let w = Worker::start_with(&self.cluster, "app", self.port, env);
        block_on(w.wait_healthy());
        self.worker = Some(w);
    }

    /// Starts the worker without waiting (it may be meant to die at a failpoint).
    pub fn spawn_worker(&mut self, env: &[(&str, &str)]) {
        self.worker = None;
        self.worker = Some(Worker::start_with(&self.cluster, "app", self.port, env));
    }

    pub fn kill9(&mut self) {
        if let Some(mut w) = self.worker.take() {
            w.kill9();
        }
    }

    /// True once the worker process has exited by itself (a failpoint aborted it).
    pub fn worker_exited(&mut self) -> bool {
        self.worker
            .as_mut()
            .is_none_or(|w| matches!(w.child.try_wait(), Ok(Some(_))))
    }

    pub fn metrics(&self) -> String {
        block_on(http_get(self.port, "/metrics"))
            .map(|(_, b)| b)
            .unwrap_or_default()
    }

    /// Reconnects the test's session (after the server restarted).
    pub fn reconnect(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match pg_sync_tests::postgres::Client::connect(
                &self.cluster.url("app"),
                pg_sync_tests::postgres::NoTls,
            ) {
                Ok(c) => {
                    self.db = c;
                    return;
                }
                Err(e) => {
                    assert!(Instant::now() < deadline, "{}: reconnect: {e}", self.name);
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }
}

pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

pub fn secret(x: &str, y: &str) -> String {
    let (p, q) = if x < y { (x, y) } else { (y, x) };
    format!("secret-{p}-{q}-0123456789")
}

/// The nodes, their links (S → R, by index) and one proxy per link.
pub struct Mesh {
    pub nodes: Vec<Node>,
    pub links: Vec<(usize, usize)>,
    pub proxies: BTreeMap<(usize, usize), Proxy>,
    rt: Arc<tokio::runtime::Runtime>,
    started: Instant,
}

impl Mesh {
    /// Every directed link between every pair.
    pub fn full(n: usize) -> Vec<(usize, usize)> {
        let mut v = vec![];
        for s in 0..n {
            for r in 0..n {
                if s != r {
                    v.push((s, r));
                }
            }
        }
        v
    }

    /// Both directions of each pair.
    pub fn pairs(p: &[(usize, usize)]) -> Vec<(usize, usize)> {
        p.iter().flat_map(|&(x, y)| [(x, y), (y, x)]).collect()
    }

    /// Clusters named `names` (each node's `pg_sync.node_id` is its name), each with `schema`
    /// in database `app`, peered along `links` through proxies; workers started.
    pub fn start(test: &str, names: &[&str], schema: &str, links: &[(usize, usize)]) -> Mesh {
        Self::start_with(test, names, schema, links, &[])
    }

    pub fn start_with(
        test: &str,
        names: &[&str],
        schema: &str,
        links: &[(usize, usize)],
        env: &[(&str, &str)],
    ) -> Mesh {
        let started = Instant::now();
        let rt = Arc::new(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap(),
        );
        let mut nodes: Vec<Node> = names
            .iter()
            .map(|&name| {
                let cluster = Cluster::start(&format!("{test}_{name}"), &[]);
                let db = cluster.create_node_db("app", name, schema);
                Node {
                    name: name.to_owned(),
                    cluster,
                    db,
                    port: free_port(),
                    worker: None,
                }
            })
            .collect();
        let proxies: BTreeMap<(usize, usize), Proxy> = links
            .iter()
            .map(|&(s, r)| ((s, r), Proxy::start(&rt, nodes[s].port)))
            .collect();
        let n = nodes.len();
        for x in 0..n {
            for y in 0..n {
                let (pull, push) = (proxies.get(&(y, x)), links.contains(&(x, y)));
                let direction = match (pull.is_some(), push) {
                    (true, true) => "both",
                    (true, false) => "pull",
                    (false, true) => "push",
                    (false, false) => continue,
                };
                // X dials Y's proxy for the link Y → X; a push-only peer is never dialed.
                let url = pull.map_or_else(
                    || "ws://127.0.0.1:1".to_owned(),
                    |p| format!("ws://127.0.0.1:{}", p.port),
                );
                let (xn, yn) = (nodes[x].name.clone(), nodes[y].name.clone());
                nodes[x].exec(&format!(
                    "SELECT pg_sync.add_peer('{yn}', '{url}', '{}', direction => '{direction}')",
                    secret(&xn, &yn)
                ));
            }
        }
        for node in &mut nodes {
            node.start_worker(env);
        }
        // Every link up (its receiver joined: it has a cursor for the sender) before the
        // scenario starts, so a scenario's first fault does not race the links' first connect.
        let deadline = Instant::now() + Duration::from_secs(60);
        for &(s, r) in links {
            let sender = nodes[s].name.clone();
            while nodes[r].int(&format!(
                "SELECT count(*) FROM pg_sync.peer_cursors WHERE peer_node_id = '{sender}'"
            )) == 0
            {
                if Instant::now() >= deadline {
                    explain_links(&mut nodes);
                    panic!("link {sender}→{} never came up", nodes[r].name);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Mesh {
            nodes,
            links: links.to_vec(),
            proxies,
            rt,
            started,
        }
    }

    /// A `PgProxy` in front of node `i`'s Postgres (a worker given its port reaches it there).
    pub fn pg_proxy(&self, i: usize) -> PgProxy {
        PgProxy::start(&self.rt, self.nodes[i].cluster.port)
    }

    pub fn idx(&self, name: &str) -> usize {
        self.nodes.iter().position(|n| n.name == name).unwrap()
    }

    pub fn node(&mut self, name: &str) -> &mut Node {
        let i = self.idx(name);
        &mut self.nodes[i]
    }

    pub fn proxy(&self, s: &str, r: &str) -> &Proxy {
        &self.proxies[&(self.idx(s), self.idx(r))]
    }

    /// Cuts every link to and from `name`.
    pub fn isolate(&self, name: &str) {
        let i = self.idx(name);
        for (&(s, r), p) in &self.proxies {
            if s == i || r == i {
                p.cut();
            }
        }
    }

    pub fn heal_all(&self) {
        for p in self.proxies.values() {
            p.heal();
        }
    }

    /// The links that are not cut (the barrier waits only for those).
    pub fn live_links(&self) -> Vec<(usize, usize)> {
        self.links
            .iter()
            .copied()
            .filter(|l| {
                let f = self.proxies[l].state.borrow();
                !f.cut && !f.freeze_data && !f.freeze_acks
            })
            .collect()
    }

    /// The quiescence barrier: every live link's receiver has applied its sender's whole log,
    /// and a second look finds no node's log moved. Panics (with the lags) after `within`.
    pub fn quiesce_within(&mut self, within: Duration) {
        let links = self.live_links();
        let deadline = Instant::now() + within;
        let mut settled = 0;
        let mut last: Vec<i64> = vec![];
        loop {
            let heads: Vec<i64> = self.nodes.iter_mut().map(|n| n.last_sync_id()).collect();
            let unsequenced: Vec<String> = self
                .nodes
                .iter_mut()
                .filter_map(|n| {
                    let k = n.unsequenced();
                    (k > 0).then(|| format!("{}: {k} unsequenced", n.name))
                })
                .collect();
            let lags: Vec<String> = links
                .iter()
                .filter_map(|&(s, r)| {
                    let sname = self.nodes[s].name.clone();
                    let at = self.nodes[r].cursor(&sname);
                    (at != heads[s])
                        .then(|| format!("{}→{}: {at}/{}", sname, self.nodes[r].name, heads[s]))
                })
                .collect();
            let lags: Vec<String> = lags.into_iter().chain(unsequenced).collect();
            if lags.is_empty() && heads == last {
                settled += 1;
                if settled >= 2 {
                    return;
                }
            } else {
                settled = 0;
            }
            last = heads;
            assert!(
                Instant::now() < deadline,
                "no quiescence within {within:?}: {}",
                lags.join(", ")
            );
            std::thread::sleep(Duration::from_millis(150));
        }
    }

    pub fn quiesce(&mut self) {
        self.quiesce_within(Duration::from_secs(90));
    }

    /// Every node (or those in `only`) holds the same rows and the same per-row LWW state.
    pub fn assert_converged_among(&mut self, table: &str, only: &[&str]) {
        let states: Vec<(String, (String, String))> = self
            .nodes
            .iter_mut()
            .filter(|n| only.is_empty() || only.contains(&n.name.as_str()))
            .map(|n| (n.name.clone(), n.state(table)))
            .collect();
        let Some((name, f)) = states.first() else {
            return;
        };
        for (other, s) in &states[1..] {
            if f != s {
                // What each node parked and went through explains most divergences.
                let names: Vec<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
                for n in &names {
                    self.explain_quarantine(n);
                }
                panic!(
                    "{table}: {name} and {other} differ:\nrows only on {name}: {}\nrows only on {other}: {}\nstate only on {name}: {}\nstate only on {other}: {}",
                    missing_from(&f.0, &s.0),
                    missing_from(&s.0, &f.0),
                    missing_from(&f.1, &s.1),
                    missing_from(&s.1, &f.1),
                );
            }
        }
    }

    pub fn assert_converged(&mut self, table: &str) {
        self.assert_converged_among(table, &[]);
    }

    /// Exactly once: no node logged an action twice or parked anything; and after quiescence
    /// no node's log grows (echoes died out).
    pub fn assert_exactly_once(&mut self) {
        for i in 0..self.nodes.len() {
            let n = &mut self.nodes[i];
            let twice = n.int(
                "SELECT count(*) FROM (SELECT 1 FROM pg_sync.sync_actions
                   GROUP BY model, model_id, action, moved, version, data, versions HAVING count(*) > 1) d",
            );
            assert_eq!(twice, 0, "{} logged an action twice", n.name);
            // Every logged action brings at least one (column, version) pair, or tombstone
            // version, that the row's earlier actions on this node did not: a merge that
            // changed nothing logged nothing. (A relayed merge may carry old versions along
            // with new ones; an action made only of old ones is a duplicate.)
            let again = n.text(
                "WITH p AS (
                   SELECT s.id, s.model, s.model_id, k.col,
                          CASE WHEN k.col LIKE '(%' THEN s.version
                               ELSE coalesce(s.versions ->> k.col, s.version) END AS v
                     FROM pg_sync.sync_actions s,
                          LATERAL jsonb_object_keys(CASE
                              WHEN s.action = 'D' AND s.moved THEN '{\"(moved)\": 0}'::jsonb
                              WHEN s.action = 'D' THEN '{\"(deleted)\": 0}'::jsonb
                              WHEN s.action = 'I' AND NOT s.moved THEN s.data || '{\"(created)\": 0}'
                              ELSE s.data END) AS k(col))
                 SELECT string_agg(to_jsonb(s)::text, E'\n' ORDER BY s.id)
                   FROM pg_sync.sync_actions s
                  WHERE NOT EXISTS (SELECT 1 FROM p WHERE p.id = s.id
                                       AND NOT EXISTS (SELECT 1 FROM p q
                                                        WHERE q.model = p.model AND q.model_id = p.model_id
                                                          AND q.col = p.col AND q.v = p.v AND q.id < p.id))",
            );
            if !again.is_empty() {
                let name = n.name.clone();
                let id: String = again
                    .split("\"model_id\": \"")
                    .nth(1)
                    .unwrap_or("")
                    .split('"')
                    .next()
                    .unwrap_or("")
                    .to_owned();
                let mut hist = String::new();
                for o in &mut self.nodes {
                    let h = o.text(&format!(
                        "SELECT string_agg(format('%s %s %s v=%s vs=%s data=%s', id, origin, action, version, versions, data), E'\\n' ORDER BY id)
                           FROM pg_sync.sync_actions WHERE model_id = '{id}'"));
                    hist += &format!("--- {} ---\n{h}\n", o.name);
                }
                panic!("{name} logged an action with nothing new:\n{again}\n{hist}");
            }
        }
        // Actions logged, with compaction's horizon: a node compacting meanwhile (a scenario
        // with SYNC_RETENTION_MAX_ACTIONS) shrinks its log, which is not growth.
        let log =
            "SELECT count(*)::text || '/' || pg_sync.retention_horizon() FROM pg_sync.sync_actions";
        let heads: Vec<i64> = self.nodes.iter_mut().map(|n| n.last_sync_id()).collect();
        let logs: Vec<String> = self.nodes.iter_mut().map(|n| n.text(log)).collect();
        std::thread::sleep(Duration::from_millis(1500));
        let heads2: Vec<i64> = self.nodes.iter_mut().map(|n| n.last_sync_id()).collect();
        let logs2: Vec<String> = self.nodes.iter_mut().map(|n| n.text(log)).collect();
        assert_eq!(heads, heads2, "a log grew after quiescence");
        for (i, (x, y)) in logs.iter().zip(&logs2).enumerate() {
            let split = |v: &str| -> (i64, i64) {
                let (c, h) = v.split_once('/').unwrap_or(("0", "0"));
                (c.parse().unwrap_or(0), h.parse().unwrap_or(0))
            };
            let ((c1, h1), (c2, h2)) = (split(x), split(y));
            assert!(
                c2 <= c1 && (h1 != h2 || c1 == c2),
                "{}'s log grew after quiescence (actions/horizon {x} then {y})",
                self.nodes[i].name
            );
        }
    }

    pub fn assert_no_quarantine(&mut self) {
        for i in 0..self.nodes.len() {
            let parked = self.nodes[i].text(
                "SELECT coalesce(string_agg(sqlstate || ' ' || message, '; '), '') FROM pg_sync.peer_quarantine",
            );
            let name = self.nodes[i].name.clone();
            if !parked.is_empty() {
                self.explain_quarantine(&name);
            }
            assert_eq!(parked, "", "{name} quarantined changes");
        }
    }

    /// For a failed check: what `at` parked, its peer events and cursors.
    fn explain_quarantine(&mut self, at: &str) {
        let n = self.node(at);
        let parked = n.text(
            "SELECT coalesce(string_agg(format('%s %s %s', q.sync_id, q.sqlstate, left(q.change::text, 300)), E'\n' ORDER BY q.sync_id), '')
               FROM pg_sync.peer_quarantine q",
        );
        let events = n.text(
            "SELECT coalesce(string_agg(format('%s %s %s', e.at, e.event, e.detail), E'\n' ORDER BY e.at), '') FROM pg_sync.peer_events e",
        );
        let cursors = n.text(
            "SELECT coalesce(string_agg(format('%s %s', peer_node_id, last_sync_id), ', '), '') FROM pg_sync.peer_cursors",
        );
        eprintln!("{at} parked:\n{parked}\n{at} events:\n{events}\n{at} cursors: {cursors}");
    }
}

/// For a mesh whose links did not come up: each node's worker (alive or not), link states and
/// last errors, and peer events.
fn explain_links(nodes: &mut [Node]) {
    for n in nodes {
        let alive = n.worker.as_ref().is_some_and(|w| w.alive());
        // (A broken test session must not hide the failure this explains.)
        if n.db.is_closed() {
            eprintln!("{}: the test's session is closed", n.name);
            continue;
        }
        let links = n.text(
            "SELECT coalesce(string_agg(format('%s %s %s since %s: %s', l.peer, l.direction, l.state,
                                               l.connected_since, l.last_error), E'\n' ORDER BY l.peer, l.direction), '')
               FROM pg_sync.peer_links l",
        );
        let events = n.text(
            "SELECT coalesce(string_agg(format('%s %s %s %s', e.at, e.peer, e.event, e.detail), E'\n' ORDER BY e.at), '')
               FROM pg_sync.peer_events e",
        );
        eprintln!(
            "{} (worker on port {}, alive: {alive}) links:\n{links}\n{} events:\n{events}",
            n.name, n.port, n.name
        );
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        // Workers before clusters (Node's field order drops the cluster first otherwise).
        for n in &mut self.nodes {
            n.worker = None;
        }
        eprintln!("mesh ran {:?}", self.started.elapsed());
        // Deadlocks the servers reported (with both sides' statements), for the record.
        for n in &self.nodes {
            let log =
                std::fs::read_to_string(n.cluster.dir.join("postgres.log")).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            for (i, l) in lines.iter().enumerate() {
                if l.contains("deadlock detected") {
                    eprintln!(
                        "{}: {}",
                        n.name,
                        lines[i..(i + 8).min(lines.len())].join("\n")
                    );
                }
            }
        }
    }
}

/// xorshift64*: reproducible randomness without a dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Polls `done` until true or `within` passes.
pub fn wait_for(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The elements of JSON array `x` that `y` lacks, as text.
fn missing_from(x: &str, y: &str) -> String {
    let parse = |t: &str| -> Vec<String> {
        serde_json::from_str::<Vec<serde_json::Value>>(t)
            .unwrap_or_default()
            .iter()
            .map(|v| v.to_string())
            .collect()
    };
    let ys = parse(y);
    parse(x)
        .into_iter()
        .filter(|e| !ys.contains(e))
        .take(20)
        .collect::<Vec<_>>()
        .join(" ")
}
