//! What the worker's integration tests share: the worker binary as a child process, a free
//! port, plain HTTP requests and tokens, scratch directories and a private test PKI.
#![allow(dead_code)]

mod seed;

use pg_sync_tests::Cluster;
#[allow(unused_imports)] // not every test binary runs a seeded test
pub use seed::{seed_from_env, xorshift};
use serde_json::json;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const SECRET: &str = "e2e-secret";
pub struct Worker {
    pub child: Child,
    pub port: u16,
}

impl Worker {
    pub fn start(cluster: &Cluster, db: &str, port: u16) -> Worker {
        Self::start_with(cluster, db, port, &[])
    }

    /// Starts the worker on a free port and waits until it is healthy.
    pub async fn started(cluster: &Cluster, db: &str) -> Worker {
        let worker = Self::start(cluster, db, free_port());
        worker.wait_healthy().await;
        worker
    }

    /// `started` with extra environment.
    pub async fn started_with(cluster: &Cluster, db: &str, env: &[(&str, &str)]) -> Worker {
        let worker = Self::start_with(cluster, db, free_port(), env);
        worker.wait_healthy().await;
        worker
    }

    pub fn start_with(cluster: &Cluster, db: &str, port: u16, env: &[(&str, &str)]) -> Worker {
        // `env` last: a test may override the defaults (e.g. DATABASE_URL with options).
        let child = Command::new(env!("CARGO_BIN_EXE_sync_worker"))
            .env("DATABASE_URL", cluster.url(db))
            .env("SYNC_LISTEN", format!("127.0.0.1:{port}"))
            .env("SYNC_JWT_SECRET", SECRET)
            .env("RUST_LOG", "sync_worker=debug")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start sync_worker");
        Worker { child, port }
    }

    /// SIGTERM, and the exit status once it has drained (`None` if it has not exited within
    /// 20 s, twice the worker's drain deadline).
    pub fn terminate(&mut self) -> Option<i32> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn kill9(&mut self) {
        let _ = Command::new("kill")
            .args(["-9", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }

    /// True while the worker process runs (not exited, not a zombie awaiting `wait`).
    pub fn alive(&self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .ok()
            .and_then(|s| {
                let state = s.rsplit_once(") ")?.1.chars().next()?;
                Some(state != 'Z' && state != 'X')
            })
            .unwrap_or(false)
    }

    pub async fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // A worker that exited (e.g. its port was taken) is not healthy, whatever else
            // answers on its port.
            assert!(
                self.alive(),
                "the worker on port {} exited before becoming healthy (its log is above)",
                self.port
            );
            if http_get(self.port, "/healthz")
                .await
                .map(|(s, _)| s == 200)
                .unwrap_or(false)
                && self.alive()
            {
                return;
            }
            assert!(Instant::now() < deadline, "worker never became healthy");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port no other server of this process is given (see `pg_sync_tests::free_port`).
pub use pg_sync_tests::free_port;

/// One HTTP/1.1 request over a fresh connection; returns the status and the raw body.
/// An HTTP response: status, header block, and the body (de-chunked).
pub struct Reply {
    pub status: u16,
    pub headers: String,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// One HTTP/1.1 request over a fresh connection.
pub async fn raw_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &str,
) -> std::io::Result<Reply> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{extra}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    // A refused oversized body may close the connection before it is all written.
    let _ = s.write_all(body.as_bytes()).await;
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw).await;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(raw.len(), |i| i + 4);
    let headers = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = headers
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let mut reply = Reply {
        status,
        headers,
        body: raw[split..].to_vec(),
    };
    if reply.header("transfer-encoding") == Some("chunked") {
        reply.body = dechunk(&reply.body);
    }
    Ok(reply)
}

/// The payload of a chunked body (as much of it as arrived).
fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = vec![];
    while let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&raw[..eol])
            .ok()
            .and_then(|l| usize::from_str_radix(l.split(';').next()?.trim(), 16).ok());
        let Some(size) = size.filter(|&n| n > 0) else {
            break;
        };
        let data = &raw[eol + 2..];
        let take = size.min(data.len());
        out.extend_from_slice(&data[..take]);
        raw = data.get(take + 2..).unwrap_or_default();
    }
    out
}

pub async fn request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &str,
) -> std::io::Result<(u16, String)> {
    let r = raw_request(port, method, path, headers, body).await?;
    Ok((r.status, String::from_utf8_lossy(&r.body).into_owned()))
}

pub async fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    request(port, "GET", path, &[], "").await
}

pub async fn http_get_with(port: u16, path: &str, headers: &[(&str, String)]) -> (u16, String) {
    request(port, "GET", path, headers, "")
        .await
        .expect("request")
}

pub async fn http_post(
    port: u16,
    path: &str,
    headers: &[(&str, String)],
    body: &str,
) -> (u16, String) {
    request(port, "POST", path, headers, body)
        .await
        .expect("request")
}

pub fn token(user: &str, exp_offset: i64, secret: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        + exp_offset;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": user, "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// An `Authorization` header with a valid JWT for `user`.
pub fn bearer(user: &str) -> Vec<(&'static str, String)> {
    vec![(
        "Authorization",
        format!("Bearer {}", token(user, 3600, SECRET)),
    )]
}

/// Runs the openssl command line in `dir` (the tests' certificates), failing with its stderr.
pub fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A test's scratch directory (`pg_sync_{name}_{pid}` under the system temp directory), empty
/// when made and removed when the guard drops, also when the test fails: tests keep throwaway
/// CA keys and config files with secrets there. Derefs to its path.
pub struct Scratch(std::path::PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("pg_sync_{name}_{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl std::ops::Deref for Scratch {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The tests' private PKI, made with the openssl command line in `dir`: a P-256 CA (`ca.pem`,
/// `ca.key`, made once per directory) and a leaf it signed (`{leaf}.pem`, `{leaf}.key`) for
/// server authentication with subjectAltName `san` (e.g. `IP:127.0.0.1`).
pub fn test_pki_for(dir: &std::path::Path, leaf: &str, san: &str) {
    if !dir.join("ca.pem").exists() {
        test_ca(dir, "ca", "/CN=pg_sync test CA");
    }
    test_leaf(
        dir,
        leaf,
        &format!("/CN={leaf}"),
        &format!("{leaf}.pem"),
        san,
    );
}

/// A self-signed P-256 CA, `{name}.pem` and `{name}.key` in `dir`.
pub fn test_ca(dir: &std::path::Path, name: &str, subject: &str) {
    let (key, pem) = (format!("{name}.key"), format!("{name}.pem"));
    new_p256_key(dir, &["-x509", "-days", "2"], &key, &pem, subject);
}

/// A P-256 key `{leaf}.key` and its request `{leaf}.csr` (`subject`), signed by the CA in `dir`
/// into `cert` (`sign_leaf`).
pub fn test_leaf(dir: &std::path::Path, leaf: &str, subject: &str, cert: &str, san: &str) {
    let (key, csr) = (format!("{leaf}.key"), format!("{leaf}.csr"));
    new_p256_key(dir, &[], &key, &csr, subject);
    sign_leaf(dir, leaf, cert, san);
}

/// `openssl req` with a new unencrypted P-256 key into `key`, and into `out` a request for
/// `subject` (or with `-x509` in `extra`, a self-signed certificate).
fn new_p256_key(dir: &std::path::Path, extra: &[&str], key: &str, out: &str, subject: &str) {
    let args = [
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ][..],
        extra,
        &["-keyout", key, "-out", out, "-subj", subject],
    ]
    .concat();
    openssl(dir, &args);
}

/// Signs `{leaf}.csr` with the CA in `dir` (`ca.pem`, `ca.key`) into `cert`: a server
/// certificate with subjectAltName `san`. Called again with another `san`, it rotates the
/// certificate and keeps the key.
pub fn sign_leaf(dir: &std::path::Path, leaf: &str, cert: &str, san: &str) {
    std::fs::write(
        dir.join("ext.cnf"),
        format!("subjectAltName={san}\nbasicConstraints=critical,CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n"),
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{leaf}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            cert,
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
}

/// A rustls client configuration trusting only the CA in `ca_file` (PEM).
pub fn tls_client(ca_file: &std::path::Path) -> std::sync::Arc<tokio_rustls::rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca_file).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    std::sync::Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// `GET path` over https to 127.0.0.1:`port`, verifying the server against `ca_file`:
/// the status and body (the connection is closed after the response).
pub async fn https_get(
    port: u16,
    ca_file: &std::path::Path,
    path: &str,
) -> std::io::Result<(u16, String)> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(tls_client(ca_file))
        .connect(name, tcp)
        .await?;
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut out = vec![];
    // A peer that closes without close_notify is an error for rustls; what was read counts.
    let _ = tls.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no HTTP response: {text:?}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// An `LD_PRELOAD` library that moves the wall clock (`CLOCK_REALTIME`, `gettimeofday`,
/// `time`) of the process it is loaded into by `PG_SYNC_TEST_CLOCK_SKEW_SECS` seconds; the
/// monotonic clock is left alone. Built with `cc` once per test process.
pub fn clock_skew_library() -> String {
    let dir = std::env::temp_dir().join(format!("pg_sync_clock_skew_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (src, lib) = (dir.join("skew.c"), dir.join("skew.so"));
    if !lib.exists() {
        std::fs::write(
            &src,
            r#"#define _GNU_SOURCE
#include <stdlib.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>
static long skew(void) { const char *s = getenv("PG_SYNC_TEST_CLOCK_SKEW_SECS"); return s ? atol(s) : 0; }
int clock_gettime(clockid_t id, struct timespec *ts) {
    int r = (int)syscall(SYS_clock_gettime, id, ts);
    if (r == 0 && (id == CLOCK_REALTIME || id == CLOCK_REALTIME_COARSE)) ts->tv_sec += skew();
    return r;
}
int gettimeofday(struct timeval *tv, void *tz) {
    struct timespec ts; int r = clock_gettime(CLOCK_REALTIME, &ts); (void)tz;
    if (tv) { tv->tv_sec = ts.tv_sec; tv->tv_usec = ts.tv_nsec / 1000; }
    return r;
}
time_t time(time_t *t) {
    struct timespec ts; clock_gettime(CLOCK_REALTIME, &ts); if (t) *t = ts.tv_sec; return ts.tv_sec;
}
"#,
        )
        .unwrap();
        let ok = std::process::Command::new("cc")
            .args(["-shared", "-fPIC", "-O2", "-o"])
            .arg(&lib)
            .arg(&src)
            .status()
            .expect("cc");
        assert!(ok.success(), "cc failed");
    }
    lib.display().to_string()
}
