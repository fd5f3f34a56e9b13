//! Secrets from a config file stay out of `--help` and of TOML syntax errors, and
//! `sslmode=verify-ca` without `sslrootcert` is refused as libpq does (review rev6 D1, D2, D3).

use std::process::Command;

mod common;
use common::{test_pki_for, Scratch};

const PASSWORD: &str = "S3cretPW_rev6";
const JWT: &str = "TOPSECRETJWT_rev6";

/// Writes `text` to `name` in a scratch directory of its own (one per test: they run in
/// parallel); the file lives as long as the returned guard.
fn config_file(name: &str, text: &str) -> (Scratch, std::path::PathBuf) {
    let dir = Scratch::new(&format!("config_secrets_{name}"));
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

fn run(args: &[&str], config: &std::path::Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_sync_worker"))
        .args(args)
        .env_remove("DATABASE_URL")
        .env_remove("SYNC_JWT_SECRET")
        .env("SYNC_CONFIG", config)
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The file's values become clap defaults, which clap would print in `--help`
/// (`hide_env_values` hides only environment values): they are hidden.
#[test]
fn help_does_not_print_config_file_secrets() {
    let (_scratch, path) = config_file(
        "help.toml",
        &format!(
            "database_url = \"postgres://app:{PASSWORD}@127.0.0.1:1/db\"\njwt_secret = \"{JWT}\"\n"
        ),
    );
    let help = run(&["--help"], &path);
    assert!(
        !help.contains(PASSWORD),
        "--help printed the DB password:\n{help}"
    );
    assert!(
        !help.contains(JWT),
        "--help printed the JWT secret:\n{help}"
    );
}

/// toml's parse error quotes the offending line (an unterminated string on the database_url
/// line would put the password in the startup error): only line, column and message are shown.
#[test]
fn toml_syntax_error_does_not_print_secrets() {
    let (_scratch, path) = config_file(
        "bad.toml",
        &format!("database_url = \"postgres://app:{PASSWORD}@127.0.0.1:1/db\njwt_secret = \"x\"\n"),
    );
    let out = run(&[], &path);
    assert!(out.contains("invalid config file"), "{out}");
    assert!(
        !out.contains(PASSWORD),
        "the config error printed the DB password:\n{out}"
    );
}

/// libpq: `sslmode=verify-ca`/`verify-full` without a root certificate file is an error. Falling
/// back to the web PKI roots would let verify-ca (no name check) accept any certificate a public
/// CA issued for any domain.
#[test]
fn verify_ca_without_root_cert_is_refused() {
    let (_, tls) =
        sync_worker::tls::split_database_url("host=127.0.0.1 sslmode=verify-ca").unwrap();
    assert_eq!(tls.root_cert, None);
    let config = tls.client_config();
    assert!(
        config.is_err(),
        "verify-ca with no sslrootcert was accepted (web PKI roots, any host name)"
    );
}

/// The worker's output when started with `env` (and the config file), or a panic if it is still
/// running after 20 s (a configuration error must stop it at startup).
fn run_env(env: &[(&str, &str)], config: &std::path::Path) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sync_worker"))
        .env_remove("DATABASE_URL")
        .env_remove("SYNC_JWT_SECRET")
        .env("SYNC_CONFIG", config)
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the worker did not stop on a bad configuration");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// TLS on the listener: the certificate without the key (or the key without the certificate)
/// is refused at startup; a missing, non-PEM or mismatched file is an error naming the file,
/// and a broken key file never has its contents printed.
#[test]
fn listener_tls_config_errors_are_clear() {
    let (_scratch, base) = config_file(
        "tls.toml",
        "database_url = \"postgres://app@127.0.0.1:1/db\"\njwt_secret = \"x\"\nlisten = \"127.0.0.1:0\"\n",
    );
    let dir = base.parent().unwrap().to_path_buf();
    let out = run_env(&[("SYNC_TLS_CERT_FILE", "/nonexistent/cert.pem")], &base);
    assert!(out.contains("tls_key_file"), "{out}");
    let out = run_env(&[("SYNC_TLS_KEY_FILE", "/nonexistent/key.pem")], &base);
    assert!(out.contains("tls_cert_file"), "{out}");

    let missing = run_env(
        &[
            ("SYNC_TLS_CERT_FILE", "/nonexistent/cert.pem"),
            ("SYNC_TLS_KEY_FILE", "/nonexistent/key.pem"),
        ],
        &base,
    );
    assert!(missing.contains("/nonexistent/cert.pem"), "{missing}");

    // A real certificate, a key that is not its own, and a key file whose base64 is broken
    // around a secret-looking body.
    test_pki_for(&dir, "good", "IP:127.0.0.1");
    test_pki_for(&dir, "other", "IP:127.0.0.1");
    const KEY_BODY: &str = "S3CRETKEYMATERIAL!!not*base64";
    let bad_key = dir.join("bad.key");
    std::fs::write(
        &bad_key,
        format!("-----BEGIN PRIVATE KEY-----\n{KEY_BODY}\n-----END PRIVATE KEY-----\n"),
    )
    .unwrap();
    let cert = dir.join("good.pem");
    let out = run_env(
        &[
            ("SYNC_TLS_CERT_FILE", cert.to_str().unwrap()),
            ("SYNC_TLS_KEY_FILE", bad_key.to_str().unwrap()),
        ],
        &base,
    );
    assert!(out.contains(bad_key.to_str().unwrap()), "{out}");
    assert!(
        !out.contains("S3CRET"),
        "the key file's contents were printed:\n{out}"
    );

    // The key given as the certificate: no certificate in it, named.
    let key = dir.join("good.key");
    let out = run_env(
        &[
            ("SYNC_TLS_CERT_FILE", key.to_str().unwrap()),
            ("SYNC_TLS_KEY_FILE", key.to_str().unwrap()),
        ],
        &base,
    );
    assert!(out.contains("no CERTIFICATE"), "{out}");
    assert!(!out.contains("BEGIN"), "{out}");

    // A key that is not the certificate's.
    let other = dir.join("other.key");
    let out = run_env(
        &[
            ("SYNC_TLS_CERT_FILE", cert.to_str().unwrap()),
            ("SYNC_TLS_KEY_FILE", other.to_str().unwrap()),
        ],
        &base,
    );
    assert!(out.contains("cannot be used together"), "{out}");

    // An unreadable peer CA file stops the worker too, instead of failing every wss:// link.
    let out = run_env(&[("SYNC_PEER_CA_FILE", "/nonexistent/ca.pem")], &base);
    assert!(
        out.contains("peer_ca_file") && out.contains("/nonexistent/ca.pem"),
        "{out}"
    );
}

/// A bad `SYNC_TOMBSTONE_MIN_AGE` stops the worker at startup with the key's name (it used to
/// start and fail every GC pass with a warning); `OFF` in any case is accepted.
#[test]
fn bad_tombstone_min_age_is_a_startup_error() {
    let (_scratch, base) = config_file(
        "gc.toml",
        "database_url = \"postgres://app@127.0.0.1:1/db\"\njwt_secret = \"x\"\nlisten = \"127.0.0.1:0\"\n",
    );
    let out = run_env(&[("SYNC_TOMBSTONE_MIN_AGE", "7 dayz")], &base);
    assert!(out.contains("SYNC_TOMBSTONE_MIN_AGE"), "{out}");
    assert!(out.contains("7 dayz"), "{out}");
}
