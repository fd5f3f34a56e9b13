//! A throwaway Postgres cluster per test: private port, private directory, removed on drop.
//!
//! Runs `initdb`/`pg_ctl` as the `postgres` OS user when the tests run as root (Postgres refuses
//! root), directly otherwise. The binaries come from `PG_CONFIG` (default: the Postgres 15 one).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

pub use postgres;

pub struct Cluster {
    pub dir: PathBuf,
    pub port: u16,
    bindir: PathBuf,
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

fn pg_bindir() -> PathBuf {
    let pg_config = std::env::var("PG_CONFIG")
        .unwrap_or_else(|_| "/usr/lib/postgresql/15/bin/pg_config".into());
    let out = Command::new(&pg_config)
        .arg("--bindir")
        .output()
        .expect("pg_config runs");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// A loopback port for a server to be started later (a cluster, a worker). A port picked with
/// `bind(127.0.0.1:0)` and released is back in the kernel's ephemeral range, where the next
/// `bind(0)` (a test's proxy) or outgoing connection can take it before the server binds it: the
/// server then fails to start, or its health check reaches the proxy instead. So ports come from
/// below the ephemeral range, which neither draws from, each handed out once per process (a
/// counter from a per-process offset, so test processes running side by side rarely meet), and
/// only after a bind shows it free now.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const FIRST: u32 = 10_000;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    if ephemeral_low > FIRST + 1_000 {
        let span = ephemeral_low - FIRST;
        let offset = std::process::id().wrapping_mul(7_919) % span;
        for _ in 0..span {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let port = (FIRST + (offset + n) % span) as u16;
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl Cluster {
    /// initdb and start a cluster with pg_sync preloaded and logical WAL, plus `extra` settings.
    pub fn start(name: &str, extra: &[&str]) -> Cluster {
        Self::start_with(name, extra, |_| {})
    }

    /// A fresh private directory (owned by the server's user when run as root) and a free
    /// port, with nothing in them yet: `start_with` runs initdb there, `standby_of` a base backup.
    fn empty(name: &str) -> Cluster {
        let dir = std::env::temp_dir().join(format!(
            "pg_sync_test_{name}_{}_{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create cluster dir");
        let cluster = Cluster {
            dir,
            port: free_port(),
            bindir: pg_bindir(),
        };
        if is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&cluster.dir)
                .status();
            assert!(
                ok.map(|s| s.success()).unwrap_or(false),
                "chown of the cluster dir"
            );
        }
        cluster
    }

    /// Like `start`, running `prepare` on the data directory (as the test user; files are
    /// handed to the server's user afterwards) before the server starts.
    pub fn start_with(name: &str, extra: &[&str], prepare: impl FnOnce(&Path)) -> Cluster {
        let cluster = Cluster::empty(name);
        let data = cluster.data();
        cluster.run(
            cluster.bindir.join("initdb"),
            &[
                "-D",
                path(&data),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ],
        );
        let mut conf = vec![
            format!("port = {}", cluster.port),
            "listen_addresses = '127.0.0.1'".into(),
            format!("unix_socket_directories = '{}'", cluster.dir.display()),
            "shared_preload_libraries = 'pg_sync'".into(),
            "wal_level = logical".into(),
            "max_connections = 120".into(),
            "fsync = off".into(),
            "log_min_messages = warning".into(),
        ];
        conf.extend(extra.iter().map(|s| s.to_string()));
        let conf_path = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path).expect("read postgresql.conf");
        text.push('\n');
        text.push_str(&conf.join("\n"));
        text.push('\n');
        std::fs::write(&conf_path, text).expect("write postgresql.conf");
        prepare(&data);
        if is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&data)
                .status();
            assert!(
                ok.map(|s| s.success()).unwrap_or(false),
                "chown of the data dir"
            );
        }
        cluster.pg_ctl(&["start", "-w", "-t", "60"]);
        cluster
    }

    /// A streaming standby of `primary` (`pg_basebackup -R`, which also copies the primary's
    /// files such as pg_sync's clock mark), started with `extra` settings; promote it with
    /// `pg_ctl(&["promote", "-w"])`.
    pub fn standby_of(primary: &Cluster, name: &str, extra: &[&str]) -> Cluster {
        let cluster = Cluster::empty(name);
        let data = cluster.data();
        let port = primary.port.to_string();
        cluster.run(
            cluster.bindir.join("pg_basebackup"),
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
                "-D",
                path(&data),
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
                "--no-sync",
            ],
        );
        let mut lines = vec![
            format!("port = {}", cluster.port),
            format!("unix_socket_directories = '{}'", cluster.dir.display()),
        ];
        lines.extend(extra.iter().map(|s| s.to_string()));
        cluster.configure(&lines.iter().map(String::as_str).collect::<Vec<_>>());
        cluster.pg_ctl(&["start", "-w", "-t", "60"]);
        cluster
    }

    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn run(&self, program: PathBuf, args: &[&str]) -> Output {
        let mut cmd = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        // Rust backtraces in a server's error details would reach clients; keep them out.
        let out = cmd
            .args(args)
            .current_dir(&self.dir)
            .env_remove("RUST_BACKTRACE")
            .output()
            .expect("run a Postgres binary");
        assert!(
            out.status.success(),
            "{:?} failed: {}{}",
            args,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    pub fn pg_ctl(&self, args: &[&str]) {
        let data = self.data();
        let log = self.dir.join("postgres.log");
        let mut all = vec!["-D", path(&data), "-l", path(&log)];
        all.extend_from_slice(args);
        self.run(self.bindir.join("pg_ctl"), &all);
    }

    /// Stops the cluster, sets its next xid's epoch (`pg_resetwal -e`), and starts it again:
    /// xid8 values (`pg_current_xact_id()`) are then above `epoch` * 2^32.
    pub fn set_xid_epoch(&self, epoch: u32) {
        self.pg_ctl(&["stop", "-w", "-m", "fast", "-t", "60"]);
        let data = self.data();
        let epoch = epoch.to_string();
        self.run(
            self.bindir.join("pg_resetwal"),
            &["-e", &epoch, "-D", path(&data)],
        );
        self.pg_ctl(&["start", "-w", "-t", "60"]);
    }

    pub fn restart(&self) {
        self.pg_ctl(&["restart", "-w", "-m", "fast", "-t", "60"]);
    }

    /// Appends settings to postgresql.conf (they apply at the next restart or reload).
    pub fn configure(&self, lines: &[&str]) {
        let conf_path = self.data().join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path).expect("read postgresql.conf");
        for l in lines {
            text.push_str(l);
            text.push('\n');
        }
        std::fs::write(conf_path, text).expect("write postgresql.conf");
    }

    pub fn url(&self, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={db}",
            self.port
        )
    }

    pub fn connect(&self, db: &str) -> postgres::Client {
        postgres::Client::connect(&self.url(db), postgres::NoTls)
            .expect("connect to the test cluster")
    }

    /// Creates a database with the extension installed.
    pub fn create_db(&self, db: &str) -> postgres::Client {
        let mut admin = self.connect("postgres");
        admin
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .expect("create database");
        let mut c = self.connect(db);
        c.batch_execute("CREATE EXTENSION pg_sync")
            .expect("create extension");
        c
    }

    /// `create_db` for a federation node: the database's `pg_sync.node_id` is `node` before the
    /// extension is created (every later session, a worker's too, has it); then `schema` runs.
    pub fn create_node_db(&self, db: &str, node: &str, schema: &str) -> postgres::Client {
        let mut admin = self.connect("postgres");
        // Two statements: CREATE DATABASE refuses to run in a multi-statement batch.
        admin
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .expect("create database");
        admin
            .batch_execute(&format!(
                "ALTER DATABASE {db} SET pg_sync.node_id = '{node}'"
            ))
            .expect("set the node id");
        let mut c = self.connect(db);
        c.batch_execute(&format!("CREATE EXTENSION pg_sync; {schema}"))
            .expect("create extension and schema");
        c
    }

    pub fn bindir(&self) -> &Path {
        &self.bindir
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let data = self.data();
        let mut cmd = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"])
                .arg(self.bindir.join("pg_ctl"));
            c
        } else {
            Command::new(self.bindir.join("pg_ctl"))
        };
        let _ = cmd
            .args(["-D", path(&data), "stop", "-m", "immediate", "-w"])
            .output();
        if std::env::var_os("PG_SYNC_KEEP_CLUSTERS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The randomized tests' generator (xorshift64): small, seeded, and the same on every machine,
/// so a failing seed printed by a test replays its run.
pub struct Rng(pub u64);

impl Rng {
    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}
