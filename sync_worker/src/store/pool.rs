//! The store's connections, every one the worker opens: `connect` opens one control connection
//! as the database URL says (TLS per `sslmode`, verified under `verify-ca`/`verify-full`; a
//! connect timeout), `connect_holding` one for a session whose life holds a lock (named, with
//! TCP keepalives), and `Db`
//! is the API's pool (deadpool-postgres) for short reads and mutations: auth, group loads,
//! replay pages, `/sync/mutate`. Each checkout is exclusive, so a long mutate batch or a slow
//! query holds one connection and never delays the queries of other users queued behind it
//! on a shared pipeline; compaction, bootstrap snapshots and federation links open their own.

use crate::tls::DbTls;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row, Statement, ToStatement};

/// How long a connection attempt may take when the URL sets no `connect_timeout`: an
/// unreachable database must fail a request, not hang it.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("invalid database url: {0}")]
    Url(String),
    #[error("database TLS configuration: {0}")]
    Tls(String),
    #[error("database error")]
    Db(#[from] tokio_postgres::Error),
}

/// A database URL taken apart: what tokio-postgres connects with, and how TLS is verified.
pub struct Target {
    pub config: tokio_postgres::Config,
    pub tls: DbTls,
    rustls: Option<rustls::ClientConfig>,
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, ConnectError> {
        let (rest, tls) = crate::tls::split_database_url(url).map_err(ConnectError::Url)?;
        // The parse error would quote the URL (and its password): say only that it is invalid.
        let mut config: tokio_postgres::Config = rest
            .parse()
            .map_err(|_| ConnectError::Url("not a Postgres URL or key=value string".into()))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        let rustls = tls.client_config().map_err(ConnectError::Tls)?;
        Ok(Target {
            config,
            tls,
            rustls,
        })
    }

    async fn connect(&self) -> Result<Client, ConnectError> {
        Ok(match &self.rustls {
            None => {
                let (client, conn) = self.config.connect(tokio_postgres::NoTls).await?;
                tokio::spawn(log_end(conn));
                client
            }
            Some(tls) => {
                let tls = tokio_postgres_rustls::MakeRustlsConnect::new(tls.clone());
                let (client, conn) = self.config.connect(tls).await?;
                tokio::spawn(log_end(conn));
                client
            }
        })
    }
}

async fn log_end(conn: impl std::future::Future<Output = Result<(), tokio_postgres::Error>>) {
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "control connection ended");
    }
}

/// A control connection (see `Target`).
pub async fn connect(url: &str) -> Result<Client, ConnectError> {
    Target::parse(url)?.connect().await
}

/// TCP keepalives of a `connect_holding` session: idle this long, then a probe this often,
/// dead after this many unanswered.
const HOLDING_KEEPALIVE: (Duration, Duration, u32) =
    (Duration::from_secs(30), Duration::from_secs(10), 3);

/// A control connection for a session whose life holds something (the federation lock): it
/// carries `application_name` (so the worker can tell its own sessions), and TCP keepalives on
/// both ends (`HOLDING_KEEPALIVE`), so when the network between them fails unseen, each end
/// finds the session dead within about a minute rather than the system's two hours. (Not on
/// a Unix socket, where the server ignores the settings: that connection cannot fail unseen.)
pub async fn connect_holding(url: &str, application_name: &str) -> Result<Client, ConnectError> {
    let (idle, interval, count) = HOLDING_KEEPALIVE;
    let mut target = Target::parse(url)?;
    target
        .config
        .application_name(application_name)
        .keepalives(true)
        .keepalives_idle(idle)
        .keepalives_interval(interval)
        .keepalives_retries(count);
    let client = target.connect().await?;
    client
        .batch_execute(&format!(
            "SET tcp_keepalives_idle = {}; SET tcp_keepalives_interval = {}; SET tcp_keepalives_count = {count}",
            idle.as_secs(),
            interval.as_secs()
        ))
        .await?;
    Ok(client)
}

/// A database error as operators need it: `SQLSTATE: message (hint: ...)`. tokio_postgres's
/// Display prints only "db error" for a server error. DETAIL is left out: it may carry row
/// values (e.g. "Failing row contains ...").
pub fn db_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => match d.hint() {
            Some(h) => format!("{}: {} (hint: {h})", d.code().code(), d.message()),
            None => format!("{}: {}", d.code().code(), d.message()),
        },
        None => e.to_string(),
    }
}

/// A pooled connection, returned to the pool when dropped, unless it is dropped with a
/// statement still in flight (the request was cancelled: its client went away). Fast
/// recycling checks only `is_closed`, so such a connection would go back with the statement
/// running, and the next user's query would queue behind it until the lock or statement
/// timeout. Instead the running statement is cancelled and the connection discarded.
/// Queries made through `Conn`'s own methods, or inside `Conn::track`, are counted.
pub struct Conn {
    obj: Option<deadpool_postgres::Object>,
    in_flight: AtomicUsize,
    cancel: Canceller,
}

/// How to reach the server for a cancel request (with the pool's TLS).
#[derive(Clone)]
enum Canceller {
    Plain,
    Tls(std::sync::Arc<rustls::ClientConfig>),
}

impl Canceller {
    async fn cancel(self, token: tokio_postgres::CancelToken) {
        let done = match self {
            Canceller::Plain => token.cancel_query(tokio_postgres::NoTls).await,
            Canceller::Tls(tls) => {
                let tls = tokio_postgres_rustls::MakeRustlsConnect::new((*tls).clone());
                token.cancel_query(tls).await
            }
        };
        if let Err(e) = done {
            tracing::debug!(error = %db_text(&e), "cancelling an abandoned statement failed");
        }
    }
}

/// Decrements the in-flight count only when the query completes (not when it is dropped).
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn start(n: &'a AtomicUsize) -> InFlight<'a> {
        n.fetch_add(1, Ordering::AcqRel);
        InFlight(n)
    }
    fn done(self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Conn {
    fn object(&self) -> &deadpool_postgres::Object {
        self.obj
            .as_ref()
            .expect("a Conn holds its object until dropped")
    }

    /// Runs `work` (queries on this connection through a `&Client`) counted as in flight:
    /// if it is dropped before completing, the connection is not reused.
    pub async fn track<F: Future>(&self, work: F) -> F::Output {
        let guard = InFlight::start(&self.in_flight);
        let out = work.await;
        guard.done();
        out
    }

    pub async fn query<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, tokio_postgres::Error> {
        self.track(self.object().query(statement, params)).await
    }

    pub async fn query_one<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, tokio_postgres::Error> {
        self.track(self.object().query_one(statement, params)).await
    }

    pub async fn query_opt<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, tokio_postgres::Error> {
        self.track(self.object().query_opt(statement, params)).await
    }

    pub async fn execute<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, tokio_postgres::Error> {
        self.track(self.object().execute(statement, params)).await
    }

    pub async fn batch_execute(&self, sql: &str) -> Result<(), tokio_postgres::Error> {
        self.track(self.object().batch_execute(sql)).await
    }

    pub async fn prepare_cached(&self, sql: &str) -> Result<Statement, tokio_postgres::Error> {
        self.track(self.object().prepare_cached(sql)).await
    }
}

impl std::ops::Deref for Conn {
    type Target = deadpool_postgres::Object;
    fn deref(&self) -> &deadpool_postgres::Object {
        self.object()
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let Some(obj) = self.obj.take() else { return };
        if *self.in_flight.get_mut() == 0 || obj.is_closed() {
            return; // back to the pool (a closed one is discarded by recycling)
        }
        // Abandoned mid-statement: cancel it so its locks and backend are freed, and keep the
        // connection out of the pool (it would answer the abandoned statement first).
        let token = obj.cancel_token();
        drop(deadpool_postgres::Object::take(obj));
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(self.cancel.clone().cancel(token));
            }
            Err(_) => tracing::debug!("no runtime to cancel an abandoned statement"),
        }
    }
}

/// `pg_sync.mutate_as(user, client_id, client_tx_id, ops)`, prepared once per connection.
pub async fn mutate_statement(conn: &Conn) -> Result<Statement, tokio_postgres::Error> {
    conn.prepare_cached("SELECT pg_sync.mutate_as($1, $2, $3::text::uuid, $4::text::jsonb)::text")
        .await
}

/// `mutate_as` for a request authenticated with an API key: the key (id, user and hash, as
/// `HeldKey::valid`) is locked `FOR KEY SHARE` in the write's own transaction, so a revocation
/// committed before it leaves no row and nothing is written (no row comes back), and one
/// committing meanwhile waits for the write. Prepared once per connection.
pub async fn mutate_with_key_statement(conn: &Conn) -> Result<Statement, tokio_postgres::Error> {
    conn.prepare_cached(
        "SELECT pg_sync.mutate_as(k.user_id, $2, $3::text::uuid, $4::text::jsonb)::text
           FROM (SELECT user_id FROM pg_sync.api_keys
                  WHERE id::text = $5 AND user_id = $1 AND key_hash = $6 FOR KEY SHARE) k",
    )
    .await
}

/// Why no pooled connection was handed out.
#[derive(Debug, thiserror::Error)]
#[error("no database connection: {0}")]
pub struct PoolError(String);

pub struct Db {
    pool: deadpool_postgres::Pool,
    cancel: Canceller,
}

/// Limits of the API pool (`SYNC_DB_*`).
#[derive(Clone, Copy, Debug)]
pub struct PoolLimits {
    pub size: usize,
    /// How long a checkout waits for a busy pool before the request is answered "unavailable".
    pub wait: Duration,
    /// Each statement on a pooled connection (Postgres `statement_timeout`; zero: none).
    pub statement: Duration,
}

impl Db {
    pub fn new(url: &str, limits: PoolLimits) -> Result<Db, ConnectError> {
        let mut target = Target::parse(url)?;
        if !limits.statement.is_zero() {
            let ms = limits.statement.as_millis();
            let options = match target.config.get_options() {
                Some(o) if !o.is_empty() => format!("{o} -c statement_timeout={ms}"),
                _ => format!("-c statement_timeout={ms}"),
            };
            target.config.options(options);
        }
        let create = target
            .config
            .get_connect_timeout()
            .copied()
            .unwrap_or(CONNECT_TIMEOUT);
        let manager_config = deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        };
        let cancel = match &target.rustls {
            None => Canceller::Plain,
            Some(tls) => Canceller::Tls(std::sync::Arc::new(tls.clone())),
        };
        let manager = match target.rustls {
            None => deadpool_postgres::Manager::from_config(
                target.config,
                tokio_postgres::NoTls,
                manager_config,
            ),
            Some(tls) => deadpool_postgres::Manager::from_config(
                target.config,
                tokio_postgres_rustls::MakeRustlsConnect::new(tls),
                manager_config,
            ),
        };
        let pool = deadpool_postgres::Pool::builder(manager)
            .max_size(limits.size.max(1))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .create_timeout(Some(create))
            .wait_timeout(Some(limits.wait))
            .build()
            .map_err(|e| ConnectError::Url(e.to_string()))?;
        Ok(Db { pool, cancel })
    }

    pub async fn get(&self) -> Result<Conn, PoolError> {
        let obj = self.pool.get().await.map_err(|e| {
            // The cause (timeout, refused, authentication) without the URL.
            PoolError(match e {
                deadpool_postgres::PoolError::Backend(e) => db_text(&e),
                other => other.to_string(),
            })
        })?;
        Ok(Conn {
            obj: Some(obj),
            in_flight: AtomicUsize::new(0),
            cancel: self.cancel.clone(),
        })
    }

    /// Connections open and connections idle, for `/metrics`.
    pub fn usage(&self) -> (usize, usize) {
        let s = self.pool.status();
        (s.size, s.available)
    }
}
