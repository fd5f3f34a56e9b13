//! Configuration: a TOML file, then the environment, then flags (each overriding the last).
//! Secrets (the JWT secret, the database password) never appear in logs or `Debug` output.

use clap::Parser;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Postgres' `statement_timeout` is an int of milliseconds: 2147483647 ms, in whole seconds.
pub const MAX_STATEMENT_TIMEOUT_SECS: u64 = i32::MAX as u64 / 1000;

#[derive(Parser, Clone)]
#[command(
    name = "sync_worker",
    version,
    about = "pg_sync's worker: replication, sequencing and live fan-out"
)]
pub struct Config {
    /// Postgres connection URL or key=value string (the database with the pg_sync extension).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// Address for HTTP, WebSocket and metrics.
    #[arg(long, env = "SYNC_LISTEN", default_value = "127.0.0.1:8787")]
    pub listen: SocketAddr,
    /// HS256 secret for client JWTs.
    #[arg(long, env = "SYNC_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// PEM file with an RS256 public key for client JWTs.
    #[arg(long, env = "SYNC_JWT_PUBLIC_KEY_FILE")]
    pub jwt_public_key_file: Option<PathBuf>,
    /// When set, client JWTs must carry this `aud`.
    #[arg(long, env = "SYNC_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// When set, client JWTs must carry this `iss`.
    #[arg(long, env = "SYNC_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Logical replication slot the worker owns.
    #[arg(long, env = "SYNC_SLOT", default_value = "pg_sync")]
    pub slot: String,
    /// Publication over pg_sync's tables, created when missing.
    #[arg(long, env = "SYNC_PUBLICATION", default_value = "pg_sync")]
    pub publication: String,
    /// Terminate the walsender holding our slot when its peer has been silent this long (0: never).
    #[arg(long, env = "SYNC_SLOT_TAKEOVER_SECS", default_value_t = 30)]
    pub slot_takeover_secs: u64,
    /// Bootstraps streaming at once; more wait (up to SYNC_BOOTSTRAP_WAIT_SECS, then 503 busy).
    #[arg(long, env = "SYNC_MAX_BOOTSTRAPS", default_value_t = 16)]
    pub max_bootstraps: usize,
    /// How long a bootstrap waits for a free slot before it is told to retry.
    #[arg(long, env = "SYNC_BOOTSTRAP_WAIT_SECS", default_value_t = 30)]
    pub bootstrap_wait_secs: u64,
    /// Database connections the API pool holds at most (auth, group loads, replay pages,
    /// mutations); each request uses one alone, so a long one never delays another's.
    #[arg(long, env = "SYNC_DB_CONNECTIONS", default_value_t = 8)]
    pub db_connections: usize,
    /// Pages of the log read for clients at once (replays, `/sync/deltas`, `/v1/shape`); more
    /// wait their turn, users taking turns. 0: half the cores, at least 1 and fewer than
    /// SYNC_DB_CONNECTIONS. Replay then holds a bounded share of the database and the worker,
    /// and live delivery never waits for it.
    #[arg(long, env = "SYNC_REPLAY_PERMITS", default_value_t = 0)]
    pub replay_permits: usize,
    /// While live deliveries flow (one was delivered in the last second), replay pages far
    /// behind the head keep the permits busy at most this percent of the time in total: after
    /// a page that took d, the next such page waits d x (100 / percent - 1) / permits (at
    /// most 1 s owed). Reads at the head are never paced; with nothing live, pages run back to
    /// back. 100: never wait. See api/admission.rs.
    #[arg(
        long,
        env = "SYNC_REPLAY_SHARE_PERCENT",
        default_value_t = 25,
        value_parser = clap::value_parser!(u64).range(1..=100)
    )]
    pub replay_share_percent: u64,
    /// How long a request waits for a pooled connection when all are busy (then 503).
    #[arg(long, env = "SYNC_DB_WAIT_SECS", default_value_t = 10)]
    pub db_wait_secs: u64,
    /// `statement_timeout` of the pooled connections, in seconds (0: none; at most 2147483,
    /// Postgres' limit in milliseconds: a larger value would make every connection fail).
    #[arg(
        long,
        env = "SYNC_DB_STATEMENT_TIMEOUT_SECS",
        default_value_t = 30,
        value_parser = clap::value_parser!(u64).range(0..=MAX_STATEMENT_TIMEOUT_SECS)
    )]
    pub db_statement_timeout_secs: u64,
    /// Frames a live subscriber may have queued; one that falls further behind pages from the log.
    #[arg(long, env = "SYNC_SUBSCRIBER_QUEUE", default_value_t = 4096)]
    pub subscriber_queue: usize,
    /// Seconds a user whose WebSocket session was closed for malformed messages (4400) is
    /// refused new WebSocket sessions (429 `busy`, Retry-After); 0: never.
    #[arg(
        long,
        env = "SYNC_BAD_CLIENT_PENALTY_SECS",
        default_value_t = 10,
        value_parser = clap::value_parser!(u64).range(0..=3600)
    )]
    pub bad_client_penalty_secs: u64,
    /// Largest client message, in bytes.
    #[arg(long, env = "SYNC_MAX_MESSAGE_BYTES", default_value_t = 64 * 1024)]
    pub max_message_bytes: usize,
    /// Actions of one transaction held in memory; larger transactions are re-read from the database.
    #[arg(long, env = "SYNC_TXN_BUFFER", default_value_t = 10_000)]
    pub txn_buffer: usize,
    /// Keep the sequenced log this long (a Postgres interval, e.g. '7 days'); 'off' keeps it all.
    #[arg(long, env = "SYNC_RETENTION", default_value = "7 days")]
    pub retention: String,
    /// Keep at most this many of the newest sequenced actions (0: no size limit).
    #[arg(long, env = "SYNC_RETENTION_MAX_ACTIONS", default_value_t = 0)]
    pub retention_max_actions: u64,
    /// Seconds between compactions.
    #[arg(long, env = "SYNC_COMPACT_INTERVAL_SECS", default_value_t = 3600)]
    pub compact_interval_secs: u64,
    /// Tombstone GC after each compaction: dead rows' states (tombstones, pending values) older
    /// than this (a Postgres interval) that every peer has acknowledged go
    /// (`pg_sync.gc_tombstones`); 'off' (any case) keeps them all. Checked at startup
    /// (`tombstone_min_age`): read as "off" or a valid interval.
    #[arg(long, env = "SYNC_TOMBSTONE_MIN_AGE", default_value = "7 days", value_parser = tombstone_min_age)]
    pub tombstone_min_age: String,
    /// Retention cap for federated peers, in sync ids: compaction keeps the log a peer this
    /// node sends to has not acknowledged, unless it lags more than this (then the peer is
    /// released and must resync). 0: no cap (hold for as long as the peer lags).
    #[arg(long, env = "SYNC_PEER_MAX_LAG", default_value_t = 10_000_000)]
    pub peer_max_lag: u64,
    /// PEM file of extra CA certificates trusted for `wss://` peers (besides the web PKI roots),
    /// e.g. a private CA that signed the peers' certificates.
    #[arg(long, env = "SYNC_PEER_CA_FILE")]
    pub peer_ca_file: Option<PathBuf>,
    /// PEM certificate chain (leaf first) for TLS on the listener: https:// and wss://
    /// (set with SYNC_TLS_KEY_FILE; reloaded on SIGHUP or when the files change).
    #[arg(long, env = "SYNC_TLS_CERT_FILE")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of SYNC_TLS_CERT_FILE (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "SYNC_TLS_KEY_FILE")]
    pub tls_key_file: Option<PathBuf>,
    /// How long `GET /v1/shape?live=true` holds a request with nothing new (Electric's long-poll).
    #[arg(long, env = "SYNC_SHAPE_LONG_POLL_SECS", default_value_t = 20)]
    pub shape_long_poll_secs: u64,
    /// How long after the database's lineage (system identifier, timeline) changed, by a
    /// failover or a restore, `/v1/shape` snapshots go without Electric's `snapshot-end` and
    /// changes without `txids`: xids may be handed out again then. Keep it well above clients'
    /// txid timeouts (10 s).
    #[arg(long, env = "SYNC_SHAPE_LINEAGE_GRACE_SECS", default_value_t = 120)]
    pub shape_lineage_grace_secs: u64,
    /// Origins allowed to call `/v1/shape` from a browser (comma-separated; `*`: any).
    #[arg(long, env = "SYNC_SHAPE_CORS_ORIGINS", default_value = "*")]
    pub shape_cors_origins: String,
    /// Optional TOML file with the same keys as the flags (database_url, listen, ...).
    #[arg(long, short = 'c', env = "SYNC_CONFIG")]
    pub config: Option<PathBuf>,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("database", &redact_url(&self.database_url))
            .field("listen", &self.listen)
            .field(
                "jwt_secret",
                &self.jwt_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("jwt_public_key_file", &self.jwt_public_key_file)
            .field("jwt_audience", &self.jwt_audience)
            .field("jwt_issuer", &self.jwt_issuer)
            .field("slot", &self.slot)
            .field("publication", &self.publication)
            .field("db_connections", &self.db_connections)
            .field("replay_permits", &self.replay_permits)
            .field("replay_share_percent", &self.replay_share_percent)
            .field("subscriber_queue", &self.subscriber_queue)
            .field("bad_client_penalty_secs", &self.bad_client_penalty_secs)
            .field("peer_ca_file", &self.peer_ca_file)
            .field("tls_cert_file", &self.tls_cert_file)
            .field("tls_key_file", &self.tls_key_file)
            .finish()
    }
}

/// The URL without its password, for logs.
pub fn redact_url(url: &str) -> String {
    let parsed = crate::tls::split_database_url(url)
        .ok()
        .and_then(|(rest, tls)| Some((rest.parse::<tokio_postgres::Config>().ok()?, tls)));
    match parsed {
        Some((c, tls)) => format!(
            "host={:?} port={:?} user={:?} dbname={:?} sslmode={:?}",
            c.get_hosts(),
            c.get_ports(),
            c.get_user(),
            c.get_dbname(),
            tls.mode
        ),
        None => "<unparsable>".into(),
    }
}

/// The config file named by `--config FILE`, `--config=FILE`, `-c FILE` or `-cFILE` (flags win
/// over `SYNC_CONFIG`).
fn config_file_arg(args: &[String]) -> Option<PathBuf> {
    let mut it = args.iter().skip(1);
    while let Some(arg) = it.next() {
        if arg == "--" {
            break;
        }
        if arg == "--config" || arg == "-c" {
            return it.next().map(PathBuf::from);
        }
        if let Some(v) = arg.strip_prefix("--config=") {
            return Some(PathBuf::from(v));
        }
        if let Some(v) = arg.strip_prefix("-c").filter(|v| !v.is_empty()) {
            return Some(PathBuf::from(v.strip_prefix('=').unwrap_or(v)));
        }
    }
    None
}

/// The settings of a config file, as (flag id, value): each key must be one of the flags'
/// names (snake_case), so a typo is an error naming the key rather than a setting silently
/// ignored.
fn file_settings(text: &str) -> anyhow::Result<Vec<(String, String)>> {
    use clap::CommandFactory;
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        // toml's Display quotes the offending source line, which may hold a secret (the
        // database password, the JWT secret): report only where and what.
        let message = e.message();
        match e.span() {
            Some(span) => {
                let (line, column) = line_column(text, span.start);
                anyhow::anyhow!("TOML syntax error at line {line}, column {column}: {message}")
            }
            None => anyhow::anyhow!("TOML syntax error: {message}"),
        }
    })?;
    let cmd = Config::command();
    let mut out = vec![];
    for (key, value) in table {
        if key == "config" || !cmd.get_arguments().any(|a| a.get_id().as_str() == key) {
            anyhow::bail!("unknown key {key:?} (keys are the flags' names in snake_case, e.g. database_url, listen)");
        }
        let value = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(_) | toml::Value::Float(_) | toml::Value::Boolean(_) => {
                value.to_string()
            }
            _ => anyhow::bail!("key {key:?} must be a string, number or boolean"),
        };
        out.push((key, value));
    }
    Ok(out)
}

/// 1-based line and column (in characters) of byte offset `at` in `text`.
fn line_column(text: &str, at: usize) -> (usize, usize) {
    let mut at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    (line, column)
}

/// Units of a Postgres interval the worker accepts in `SYNC_TOMBSTONE_MIN_AGE` (each one
/// Postgres reads, any case).
const INTERVAL_UNITS: &[&str] = &[
    "us",
    "usec",
    "usecs",
    "microsecond",
    "microseconds",
    "ms",
    "msec",
    "msecs",
    "millisecond",
    "milliseconds",
    "s",
    "sec",
    "secs",
    "second",
    "seconds",
    "m",
    "min",
    "mins",
    "minute",
    "minutes",
    "h",
    "hr",
    "hrs",
    "hour",
    "hours",
    "d",
    "day",
    "days",
    "w",
    "week",
    "weeks",
    "mon",
    "mons",
    "month",
    "months",
    "y",
    "yr",
    "yrs",
    "year",
    "years",
];

/// `SYNC_TOMBSTONE_MIN_AGE`: "off" (any case) as "off", or a non-negative interval of
/// `<number> <unit>` terms ("7 days", "1 day 12 hours", "90s"), a subset of Postgres' syntax
/// that Postgres always accepts. Checked at startup, so a typo stops the worker with the key's
/// name instead of failing every GC pass with a warning.
fn tombstone_min_age(value: &str) -> Result<String, String> {
    let v = value.trim();
    if v.eq_ignore_ascii_case("off") {
        return Ok("off".to_owned());
    }
    let bad = || {
        format!(
            "SYNC_TOMBSTONE_MIN_AGE (tombstone_min_age) must be 'off' or an interval of \
             <number> <unit> terms such as '7 days' or '1 day 12 hours', got {value:?}"
        )
    };
    let mut rest = v;
    let mut terms = 0;
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if n == 0 || rest[..n].parse::<f64>().is_err() {
            return Err(bad());
        }
        rest = rest[n..].trim_start();
        let u = rest
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(rest.len());
        if !INTERVAL_UNITS.contains(&rest[..u].to_ascii_lowercase().as_str()) {
            return Err(bad());
        }
        rest = rest[u..].trim_start();
        terms += 1;
    }
    if terms == 0 {
        return Err(bad());
    }
    Ok(v.to_owned())
}

impl Config {
    /// Flags, then environment, then the config file (if named), then defaults: the file's
    /// values become the flags' defaults, so clap layers them under the environment and the
    /// command line. Nothing is written to the environment (no `set_var`).
    pub fn load() -> anyhow::Result<Config> {
        let args: Vec<String> = std::env::args().collect();
        let file =
            config_file_arg(&args).or_else(|| std::env::var_os("SYNC_CONFIG").map(PathBuf::from));
        let config = Config::from_args_and_file(args, file.as_deref())?;
        if config.jwt_secret.is_none() && config.jwt_public_key_file.is_none() {
            anyhow::bail!("set SYNC_JWT_SECRET (HS256) or SYNC_JWT_PUBLIC_KEY_FILE (RS256): clients must authenticate");
        }
        crate::tls_listener::check_pair(
            config.tls_cert_file.as_deref(),
            config.tls_key_file.as_deref(),
        )?;
        Ok(config)
    }

    fn from_args_and_file(
        args: Vec<String>,
        file: Option<&std::path::Path>,
    ) -> anyhow::Result<Config> {
        use clap::{CommandFactory, FromArgMatches};
        let mut cmd = Config::command();
        if let Some(file) = file {
            let text = std::fs::read_to_string(file)
                .map_err(|e| anyhow::anyhow!("cannot read config file {}: {e}", file.display()))?;
            let settings = file_settings(&text)
                .map_err(|e| anyhow::anyhow!("invalid config file {}: {e}", file.display()))?;
            for (key, value) in settings {
                // Loaded once per process: clap's defaults are `'static`.
                let value: &'static str = Box::leak(value.into_boxed_str());
                // Hidden from `--help`: the file may hold secrets (the database password, the
                // JWT secret), and clap prints defaults (`hide_env_values` covers only the
                // environment).
                cmd = cmd.mut_arg(key, |a| {
                    a.default_value(value)
                        .hide_default_value(true)
                        .required(false)
                });
            }
        }
        let matches = cmd.try_get_matches_from(args).unwrap_or_else(|e| e.exit());
        Ok(Config::from_arg_matches(&matches)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        std::iter::once("sync_worker")
            .chain(a.iter().copied())
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn every_spelling_of_the_config_flag_is_found() {
        let want = Some(PathBuf::from("w.toml"));
        assert_eq!(config_file_arg(&args(&["--config", "w.toml"])), want);
        assert_eq!(config_file_arg(&args(&["--config=w.toml"])), want);
        assert_eq!(config_file_arg(&args(&["-c", "w.toml"])), want);
        assert_eq!(config_file_arg(&args(&["-cw.toml"])), want);
        assert_eq!(
            config_file_arg(&args(&["--listen", "x", "--config=w.toml"])),
            want
        );
        assert_eq!(config_file_arg(&args(&["--listen", "x"])), None);
        assert_eq!(config_file_arg(&args(&["--", "--config=w.toml"])), None);
    }

    #[test]
    fn config_file_keys_are_flags_and_unknown_keys_are_errors() {
        let got = file_settings(
            "database_url = \"postgres://x\"\nsubscriber_queue = 64\njwt_audience = \"sync\"\n",
        )
        .unwrap();
        assert_eq!(
            got,
            [
                ("database_url".to_string(), "postgres://x".to_string()),
                ("jwt_audience".into(), "sync".into()),
                ("subscriber_queue".into(), "64".into()),
            ]
        );
        let err = file_settings("subscriber_queu = 64\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("subscriber_queu"), "{err}");
        assert!(file_settings("config = \"other.toml\"\n").is_err());
        assert!(file_settings("listen = [1]\n").is_err());
    }

    #[test]
    fn tombstone_min_age_is_off_or_an_interval() {
        for off in ["off", "OFF", " Off "] {
            assert_eq!(tombstone_min_age(off).unwrap(), "off");
        }
        for ok in [
            "7 days",
            "1 day 12 hours",
            "90s",
            "1.5 DAYS",
            "7days",
            "30 min",
        ] {
            assert_eq!(tombstone_min_age(ok).unwrap(), ok.trim());
        }
        for bad in [
            "",
            "7",
            "days",
            "7 dayz",
            "-1 day",
            "7 days ago",
            "of",
            "1 day;",
            "P7D",
        ] {
            let err = tombstone_min_age(bad).unwrap_err();
            assert!(err.contains("SYNC_TOMBSTONE_MIN_AGE"), "{bad:?}: {err}");
        }
        // Through clap, as at startup.
        let err = Config::try_parse_from(args(&[
            "--database-url",
            "host=x",
            "--tombstone-min-age",
            "7 dayz",
        ]))
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("SYNC_TOMBSTONE_MIN_AGE"), "{err}");
        let c = Config::try_parse_from(args(&[
            "--database-url",
            "host=x",
            "--tombstone-min-age",
            "OFF",
        ]))
        .unwrap();
        assert_eq!(c.tombstone_min_age, "off");
    }

    #[test]
    fn flags_override_the_file_which_overrides_defaults() {
        let dir = std::env::temp_dir().join(format!("sync_worker_config_{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("w.toml");
        // Keys whose variables the test environment does not set.
        std::fs::write(
            &file,
            "database_url = \"host=f\"\nsubscriber_queue = 64\nmax_bootstraps = 3\n",
        )
        .unwrap();
        let c = Config::from_args_and_file(
            args(&["--max-bootstraps", "5", "--config", "w.toml"]),
            Some(&file),
        )
        .unwrap();
        assert_eq!(c.database_url, "host=f");
        assert_eq!(c.subscriber_queue, 64);
        assert_eq!(c.max_bootstraps, 5);
        assert_eq!(c.txn_buffer, 10_000);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
