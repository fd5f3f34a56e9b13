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
    static ROOT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ROOT.get_or_init(|| {
        Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout.starts_with(b"0\n"))
            .unwrap_or(false)
    })
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
/// below the ephemeral range, which neither draws from: each claimed by this process for its
/// whole life (see `PortClaims`), so no other test process on the machine hands it out too, and
/// only after a bind shows it free now.
pub fn free_port() -> u16 {
    static CLAIMS: std::sync::OnceLock<PortClaims> = std::sync::OnceLock::new();
    CLAIMS
        .get_or_init(|| {
            PortClaims::new(
                std::env::temp_dir().join("pg_sync_test_ports"),
                std::process::id(),
            )
        })
        .claim()
        // No room below the ephemeral range (a machine configured so): the racy way is all
        // there is.
        .unwrap_or_else(|| {
            TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .expect("a free port")
        })
}

/// Hands out ports from 10000 up to the ephemeral range, each at most once across all the
/// processes on this machine that share `dir`: a port is this process's once it holds an
/// exclusive `flock` on `dir/<port>`, which it keeps (the file stays open) until it exits. The
/// kernel drops the lock with the process, however it ends, so nothing is ever stale; the files
/// are never removed (removing one while another process opens it would let two processes
/// lock two different files of the same name). A port some other program listens on, or a
/// server a dead test process left running, fails the bind check and is skipped. The scan
/// starts at an offset from `seed` (the pid), so processes side by side rarely try the same
/// ports first; that only saves lock attempts, the claim is what makes them distinct.
pub struct PortClaims {
    dir: PathBuf,
    offset: u32,
    /// The next port to try, counted from `offset`, and the claims held (their files open).
    state: std::sync::Mutex<(u32, Vec<std::fs::File>)>,
}

impl PortClaims {
    const FIRST: u32 = 10_000;

    pub fn new(dir: PathBuf, seed: u32) -> PortClaims {
        PortClaims {
            dir,
            offset: seed.wrapping_mul(7_919),
            state: std::sync::Mutex::new((0, Vec::new())),
        }
    }

    /// A port no other holder of a claim in `dir` has (nor this one before), free now; `None`
    /// when the ephemeral range leaves no room below it.
    pub fn claim(&self) -> Option<u16> {
        let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
            .unwrap_or(32_768)
            .min(u32::from(u16::MAX));
        if ephemeral_low <= Self::FIRST + 1_000 {
            return None;
        }
        let span = ephemeral_low - Self::FIRST;
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (next, held) = &mut *state;
        for _ in 0..span {
            let port = (Self::FIRST + self.offset.wrapping_add(*next) % span) as u16;
            *next += 1;
            let Some(lock) = self.lock(port) else {
                continue;
            };
            // Kept even when the bind fails (something else listens there): this process
            // never tries the port again.
            held.push(lock);
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return Some(port);
            }
        }
        panic!(
            "no port left to claim between {} and {ephemeral_low}",
            Self::FIRST
        )
    }

    /// `dir/<port>` open and exclusively locked by this claim; `None` if another holds it.
    fn lock(&self, port: u16) -> Option<std::fs::File> {
        if !self.dir.is_dir() {
            std::fs::create_dir_all(&self.dir).expect("create the port claims directory");
            // Shared by every user's test processes, as /tmp is (a lock file is created by the
            // first to claim its port and kept).
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o1777));
        }
        let path = self.dir.join(port.to_string());
        // A file another user created can still be locked read-only (flock needs no write).
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .or_else(|_| std::fs::File::open(&path))
            .unwrap_or_else(|e| panic!("open the port claim {}: {e}", path.display()));
        match file.try_lock() {
            Ok(()) => Some(file),
            Err(std::fs::TryLockError::WouldBlock) => None,
            Err(std::fs::TryLockError::Error(e)) => {
                panic!("lock the port claim {}: {e}", path.display())
            }
        }
    }
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
        track(&cluster.dir, &cluster.bindir);
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
        match template(&cluster.bindir) {
            Some(t) => copy_tree(&t, &data),
            None => cluster.initdb(&data),
        }
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

    fn initdb(&self, data: &Path) {
        self.run(self.bindir.join("initdb"), &initdb_args(data));
    }

    fn run(&self, program: PathBuf, args: &[&str]) -> Output {
        let mut cmd = server_command(program);
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

/// How every test cluster is initialized (`-D` first).
fn initdb_args(data: &Path) -> [&str; 9] {
    [
        "-D",
        path(data),
        "-U",
        "postgres",
        "--auth=trust",
        "--no-sync",
        "-E",
        "UTF8",
        "--locale=C.UTF-8",
    ]
}

/// `cp -a from to`: file modes and owners kept (a data directory is 0700 and, as root, owned
/// by `postgres`).
fn copy_tree(from: &Path, to: &Path) {
    let ok = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "copy {} to {}", from.display(), to.display());
}

/// A data directory fresh from `initdb` (with this file's arguments, by the Postgres of
/// `bindir`), made once per machine and kept with the build (`target/<profile>/
/// pg_sync_test_templates`, which `cargo clean` removes): a test cluster starts from a copy of
/// it (0.15 s) instead of its own initdb (1.3 s, some 300 times per `make test`). Copies share
/// the template's system identifier, so two clusters' databases of the same OID have the same
/// *default* `pg_sync.node_id` (derived from both): a test that needs distinct node ids sets
/// them (federation refuses the default anyway); the log epoch stays distinct (its random part
/// is made by `CREATE EXTENSION`). The key covers what initdb reads besides its arguments that
/// the suites could notice (`TZ`: the `timezone` it writes). `None` (each cluster runs initdb)
/// with `PG_SYNC_TEST_INITDB=1`, or when the template directory cannot be written; a failing
/// initdb or copy fails the test, as initdb per cluster did.
fn template(bindir: &Path) -> Option<PathBuf> {
    static TEMPLATE: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    if std::env::var_os("PG_SYNC_TEST_INITDB").is_some_and(|v| v == "1") {
        return None;
    }
    TEMPLATE.get_or_init(|| make_template(bindir)).clone()
}

fn make_template(bindir: &Path) -> Option<PathBuf> {
    use std::hash::{Hash, Hasher};
    let version = Command::new(bindir.join("initdb"))
        .arg("--version")
        .output()
        .ok()?;
    let mut key = std::collections::hash_map::DefaultHasher::new();
    (
        bindir,
        &version.stdout,
        initdb_args(Path::new("")),
        is_root(),
        std::env::var_os("TZ"),
    )
        .hash(&mut key);
    // The build's own directory: target/<profile>/deps/<test binary>.
    let exe = std::env::current_exe().ok()?;
    let root = exe.parent()?.parent()?.join("pg_sync_test_templates");
    let dir = root.join(format!("{:016x}", key.finish()));
    let data = dir.join("data");
    if data.join("global/pg_control").is_file() {
        return Some(data);
    }
    // initdb in a test cluster's directory (the server's user can write there), copied into
    // a private name and renamed into place: a template is whole once it has its name, and of
    // processes making it at once, the first rename wins and the others' copies are dropped.
    let scratch = Cluster::empty("template");
    scratch.initdb(&scratch.data());
    std::fs::create_dir_all(&root).ok()?;
    let staging = root.join(format!(
        "staging_{}_{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&staging).ok()?;
    copy_tree(&scratch.data(), &staging.join("data"));
    drop(scratch);
    if std::fs::rename(&staging, &dir).is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    data.join("global/pg_control").is_file().then_some(data)
}

impl Drop for Cluster {
    fn drop(&mut self) {
        LIVE.lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(dir, _)| dir != &self.dir);
        stop_and_remove(&self.dir, &self.bindir);
    }
}

/// The clusters of this process that have not been dropped (directory, bindir). A test stopped
/// by a signal runs no `Drop`: nextest sends SIGTERM to a test past its timeout (then SIGKILL
/// 10 s later), Ctrl-C sends SIGINT, and a postmaster (detached by `pg_ctl`) would outlive
/// it. On the first of those signals, a thread sends SIGTERM to this process's children (its
/// workers), stops and removes every cluster listed here, then the process exits (128 + the
/// signal).
static LIVE: std::sync::Mutex<Vec<(PathBuf, PathBuf)>> = std::sync::Mutex::new(Vec::new());

fn track(dir: &Path, bindir: &Path) {
    static HANDLER: std::sync::Once = std::sync::Once::new();
    HANDLER.call_once(|| {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGTERM, SIGINT]) else {
            return;
        };
        std::thread::spawn(move || {
            if let Some(signal) = signals.forever().next() {
                terminate_children();
                let live = std::mem::take(&mut *LIVE.lock().unwrap_or_else(|e| e.into_inner()));
                for (dir, bindir) in &live {
                    stop_and_remove(dir, bindir);
                }
                eprintln!(
                    "pg_sync_tests: signal {signal}: stopped and removed {} cluster(s)",
                    live.len()
                );
                std::process::exit(128 + signal);
            }
        });
    });
    LIVE.lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((dir.to_path_buf(), bindir.to_path_buf()));
}

/// SIGTERM to every live child of this process (the tests' workers, node, Chromium): they are
/// not in a process group a signal to the test reaches when only the test is signalled.
fn terminate_children() {
    let me = std::process::id().to_string();
    let children: Vec<String> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().into_string().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // pid (comm) state ppid ...: comm may hold spaces and parentheses.
            let ppid = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?;
            (ppid == me).then_some(pid)
        })
        .collect();
    if !children.is_empty() {
        let _ = Command::new("kill").arg("-TERM").args(&children).output();
    }
}

/// `program` run as the server's user: through `runuser -u postgres` when this is root.
fn server_command(program: PathBuf) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// `pg_ctl stop -m immediate` of the cluster in `dir`, then its directory removed (kept with
/// `PG_SYNC_KEEP_CLUSTERS`).
fn stop_and_remove(dir: &Path, bindir: &Path) {
    let data = dir.join("data");
    let _ = server_command(bindir.join("pg_ctl"))
        .args(["-D", path(&data), "stop", "-m", "immediate", "-w"])
        .output();
    if std::env::var_os("PG_SYNC_KEEP_CLUSTERS").is_none() {
        let _ = std::fs::remove_dir_all(dir);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Two processes' claims never hand out the same port, though they scan from the same
    /// start and neither binds what it got. (Two `PortClaims` on one directory stand for two
    /// processes: `flock` locks taken through two opens of a file conflict within a process as
    /// they do across processes.) A claim ends with its holder: nothing is left stale.
    #[test]
    fn two_processes_never_claim_the_same_port() {
        let dir =
            std::env::temp_dir().join(format!("pg_sync_test_port_claims_{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (a, b) = (
            PortClaims::new(dir.clone(), 1),
            PortClaims::new(dir.clone(), 1),
        );
        let mut seen = std::collections::HashSet::new();
        let mut of_a = vec![];
        for _ in 0..50 {
            for (claims, name) in [(&a, "a"), (&b, "b")] {
                let port = claims.claim().expect("room below the ephemeral range");
                assert!(
                    seen.insert(port),
                    "port {port} handed out twice (to {name})"
                );
                if name == "a" {
                    of_a.push(port);
                }
            }
        }
        assert!(
            b.lock(of_a[0]).is_none(),
            "a's port is locked while a lives"
        );
        drop(a);
        assert!(
            b.lock(of_a[0]).is_some(),
            "a's port is free to claim once a is gone"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
