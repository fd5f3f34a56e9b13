//! Secrets from a config file stay out of `--help` and of TOML syntax errors, and
//! `sslmode=verify-ca` without `sslrootcert` is refused as libpq does (review rev6 D1, D2, D3).

use std::process::Command;

const PASSWORD: &str = "S3cretPW_rev6";
const JWT: &str = "TOPSECRETJWT_rev6";

fn config_file(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("config_secrets_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
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
    let path = config_file(
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
    let path = config_file(
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
