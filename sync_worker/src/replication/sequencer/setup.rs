//! Setup of a replication session: the control connection, the publication and the slot
//! (created when missing, an invalidated one reported, a stale holder taken over), and the
//! replication connection's configuration.

use super::{HolderReplies, SequencerError, Status, Walsender, WALSENDER_COLUMNS};
use crate::config::Config;
use pgwire_replication::ReplicationConfig;
use std::time::Duration;
use tokio_postgres::Client;

/// A control connection (`db::connect`: TLS as the URL's `sslmode` says).
pub async fn connect(url: &str) -> Result<Client, SequencerError> {
    crate::store::connect(url)
        .await
        .map_err(SequencerError::from)
}

impl From<crate::store::ConnectError> for SequencerError {
    fn from(e: crate::store::ConnectError) -> SequencerError {
        match e {
            crate::store::ConnectError::Db(e) => SequencerError::Db(e),
            crate::store::ConnectError::Url(_) => SequencerError::Url,
            crate::store::ConnectError::Tls(why) => SequencerError::Tls(why),
        }
    }
}

/// Creates the publication and the slot when missing; reports an invalidated slot.
/// Returns whether the publication carries everything the sequencer follows (the registry,
/// and every revocation of an API key: `follows_every_key_change`); a publication this role
/// may not alter is used as it is.
pub(super) async fn ensure_setup(
    db: &Client,
    cfg: &Config,
    status: &Status,
) -> Result<bool, SequencerError> {
    let mut complete = true;
    if db
        .query_opt("SELECT 1 FROM pg_extension WHERE extname = 'pg_sync'", &[])
        .await?
        .is_none()
    {
        return Err(SequencerError::NoExtension);
    }
    // Deletes, updates and truncations are published so that API key revocations made that
    // way reach the hub. Memberships and the registry no longer need to be (kept for publications made
    // before): membership changes are actions in the log (pg_sync.log_membership()), and each
    // action says whether it is global (a NULL group id), so re-registrations need no stream.
    let publication = crate::store::quote_ident(&cfg.publication);
    match db
        .query_opt(
            "SELECT pubinsert AND pubupdate AND pubdelete AND pubtruncate FROM pg_publication WHERE pubname = $1",
            &[&cfg.publication],
        )
        .await?
    {
        None => {
            let sql = format!(
                "CREATE PUBLICATION {publication} FOR TABLE pg_sync.sync_actions, pg_sync.group_memberships, \
                 pg_sync.api_keys, pg_sync.registry WITH (publish = 'insert, update, delete, truncate')"
            );
            db.batch_execute(&sql).await?;
            tracing::info!(publication = %cfg.publication, "created publication");
        }
        Some(row) => {
            let mut alter = vec![];
            for table in ["api_keys", "registry"] {
                let listed = db
                    .query_opt(
                        "SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = 'pg_sync' AND tablename = $2",
                        &[&cfg.publication, &table],
                    )
                    .await?
                    .is_some();
                if !listed {
                    alter.push(format!(
                        "ALTER PUBLICATION {publication} ADD TABLE pg_sync.{table}"
                    ));
                }
            }
            if !row.get::<_, bool>(0) {
                alter.push(format!(
                    "ALTER PUBLICATION {publication} SET (publish = 'insert, update, delete, truncate')"
                ));
            }
            for sql in alter {
                match db.batch_execute(&sql).await {
                    Ok(()) => {}
                    // Only its owner may alter a publication made by someone else.
                    Err(e)
                        if e.code()
                            == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) =>
                    {
                        complete = false;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            if !complete {
                tracing::warn!(
                    publication = %cfg.publication,
                    "the publication lacks pg_sync.registry, pg_sync.api_keys, updates or truncations and this role may not \
                     alter it; API key changes made by UPDATE or TRUNCATE reach live sessions only on reconnect: ALTER it as its owner (see the worker's ensure_setup)"
                );
            }
        }
    }
    match db
        .query_opt(
            "SELECT coalesce(wal_status, '') FROM pg_replication_slots WHERE slot_name = $1",
            &[&cfg.slot],
        )
        .await?
    {
        None => {
            db.query_one(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&cfg.slot],
            )
            .await?;
            tracing::info!(slot = %cfg.slot, "created replication slot");
        }
        Some(row) => {
            let wal_status: String = row.get(0);
            if wal_status == "lost" {
                *status
                    .slot_problem
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some("lost".into());
                return Err(SequencerError::SlotLost(cfg.slot.clone()));
            }
        }
    }
    *status
        .slot_problem
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = None;
    take_over_stale_slot(db, cfg, status).await?;
    Ok(complete && follows_every_key_change(db, cfg).await?)
}

/// Whether the publication, as it is now, streams every revocation of an API key: deletes
/// (`pg_sync.revoke_api_key`), updates (a re-pointed user or hash) and truncations of
/// `pg_sync.api_keys`, every row (no row filter) with every column (no column list), so that
/// the hub's memory of valid keys may be trusted. Inserts are not needed (a new key is not a
/// revocation). Read at every session start: a publication altered by hand (or made by
/// someone else, which this role may not alter) is seen as it is.
async fn follows_every_key_change(db: &Client, cfg: &Config) -> Result<bool, SequencerError> {
    let follows: Option<bool> = db
        .query_one(
            &format!("SELECT {}", follows_keys_sql("$1")),
            &[&cfg.publication],
        )
        .await?
        .get(0);
    let follows = follows == Some(true);
    if !follows {
        tracing::warn!(
            publication = %cfg.publication,
            "the publication does not carry every delete, update and truncation of every row and column of pg_sync.api_keys: \
             valid API keys are not kept in memory (every request looks its key up)"
        );
    }
    Ok(follows)
}

/// A walsender whose peer died without closing the connection (a crashed host, a network
/// partition) holds the slot until `wal_sender_timeout`. When it is this worker's own (`ours`,
/// the `application_name` of this worker's replication connections: an earlier session's, whose
/// connection dropped; sessions run one at a time, so it serves none now), it is terminated at
/// once, whatever `SYNC_SLOT_TAKEOVER_SECS` says. Another worker's is terminated only once its
/// `reply_time` has not changed for `SYNC_SLOT_TAKEOVER_SECS` by this worker's clock
/// (`HolderReplies`, kept in `status` across session attempts; the value is the replying
/// client's clock, never compared with the server's), so this worker can stream now; a live
/// holder (another worker replies every 200 ms, whatever its clock says) is left alone, and
/// this worker keeps retrying. A holder that is not a walsender (a slot creation or SQL peek)
/// is left alone. To a role that may not see walsenders' details (neither `pg_read_all_stats`
/// nor superuser) `reply_time` reads NULL: a live holder cannot be told from a gone one, so
/// another worker's walsender is never terminated then (review rev16d F1: it was, after
/// `SYNC_SLOT_TAKEOVER_SECS`, live or not); the server's `wal_sender_timeout` ends a gone one.
async fn take_over_stale_slot(
    db: &Client,
    cfg: &Config,
    status: &Status,
) -> Result<(), SequencerError> {
    let ours = status.replication_name.as_str();
    let stale = db
        .query_opt(
            &format!(
                "SELECT {WALSENDER_COLUMNS},
                        (extract(epoch FROM r.reply_time) * 1000000)::int8,
                        coalesce(r.application_name = $2, false)
                   FROM pg_replication_slots s
                   JOIN pg_stat_replication r ON r.pid = s.active_pid
                  WHERE s.slot_name = $1 AND s.active"
            ),
            &[&cfg.slot, &ours],
        )
        .await?;
    let observed = {
        let mut seen = status.slot_holder.lock().unwrap_or_else(|p| p.into_inner());
        match stale {
            Some(row) => {
                let walsender = Walsender::from_row(&row, 0);
                let reply: Option<i64> = row.get(2);
                let replies = HolderReplies::observe(&mut seen, walsender, reply);
                Some((
                    walsender,
                    reply,
                    replies.silent_for().as_secs_f64(),
                    row.get::<_, bool>(3),
                ))
            }
            // No holder, or one that is not a walsender (left alone).
            None => {
                *seen = None;
                None
            }
        }
    };
    let Some((walsender, reply, silent_secs, own)) = observed else {
        return Ok(());
    };
    let pid = walsender.pid;
    // Asked again as it is signalled, in one statement: the walsender seen (the same pid and
    // start: never a backend that took the pid over meanwhile) still holds the slot, and (for
    // another worker's) its `reply_time` is still the one judged silent (review rev16d F4).
    let signalled: bool = if own {
        tracing::warn!(
            slot = %cfg.slot,
            pid,
            silent_secs,
            "the replication slot is held by this worker's own walsender of an earlier session (its connection dropped); terminating it"
        );
        terminate_holder(db, &cfg.slot, walsender, Some(ours), None).await?
    } else {
        if reply.is_none()
            || cfg.slot_takeover_secs == 0
            || silent_secs < cfg.slot_takeover_secs as f64
        {
            return Ok(());
        }
        tracing::warn!(
            slot = %cfg.slot,
            pid,
            silent_secs,
            "the replication slot is held by a walsender whose peer has not replied; terminating it"
        );
        terminate_holder(db, &cfg.slot, walsender, None, reply).await?
    };
    if !signalled {
        tracing::warn!(pid, "could not terminate the stale walsender");
        return Ok(());
    }
    // Wait (briefly) for the slot to be released.
    for _ in 0..50 {
        let active: bool = db
            .query_one(
                "SELECT coalesce((SELECT active FROM pg_replication_slots WHERE slot_name = $1), false)",
                &[&cfg.slot],
            )
            .await?
            .get(0);
        if !active {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Terminates `walsender` if it still holds `slot` (the same pid and start), still serves
/// `application` (when given) and still shows `reply` as its `reply_time` (when given): all
/// checked in the statement that signals it. True when it was signalled.
async fn terminate_holder(
    db: &Client,
    slot: &str,
    walsender: Walsender,
    application: Option<&str>,
    reply: Option<i64>,
) -> Result<bool, SequencerError> {
    Ok(db
        .query_one(
            "SELECT coalesce((SELECT pg_terminate_backend(r.pid)
                                FROM pg_replication_slots s
                                JOIN pg_stat_replication r ON r.pid = s.active_pid
                               WHERE s.slot_name = $1 AND r.pid = $2
                                 AND (extract(epoch FROM r.backend_start) * 1000000)::int8
                                     IS NOT DISTINCT FROM $3
                                 AND ($4::text IS NULL OR r.application_name = $4)
                                 AND ($5::int8 IS NULL
                                      OR (extract(epoch FROM r.reply_time) * 1000000)::int8 = $5)),
                             false)",
            &[
                &slot,
                &walsender.pid,
                &walsender.started,
                &application,
                &reply,
            ],
        )
        .await?
        .get(0))
}

/// A scalar subquery: whether the publication named by the text parameter `param` carries
/// every revocation of an API key (`follows_every_key_change`); NULL when it does not list
/// `pg_sync.api_keys`.
pub(super) fn follows_keys_sql(param: &str) -> String {
    format!(
        "(SELECT p.pubdelete AND p.pubupdate AND p.pubtruncate AND t.rowfilter IS NULL
                 AND t.attnames @> ARRAY(SELECT attname FROM pg_attribute
                                          WHERE attrelid = 'pg_sync.api_keys'::regclass
                                            AND attnum > 0 AND NOT attisdropped)
            FROM pg_publication p
            JOIN pg_publication_tables t ON t.pubname = p.pubname
           WHERE p.pubname = {param} AND t.schemaname = 'pg_sync' AND t.tablename = 'api_keys')"
    )
}

/// `encrypted`: whether the control connection negotiated TLS (what `sslmode=prefer` found);
/// `name`: the connection's `application_name` (`Status::replication_name`).
pub(super) fn replication_config(
    cfg: &Config,
    encrypted: bool,
    name: &str,
) -> Result<ReplicationConfig, SequencerError> {
    let target = crate::store::Target::parse(&cfg.database_url)?;
    let pg = &target.config;
    let host = match pg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    let password = pg
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    let mut rc = ReplicationConfig::new(
        host.clone(),
        pg.get_user().unwrap_or("postgres"),
        password,
        pg.get_dbname().unwrap_or("postgres"),
        cfg.slot.clone(),
        cfg.publication.clone(),
    )
    .with_port(port)
    .with_status_interval(Duration::from_millis(200))
    // Idle, a status update every second (not the default 10 s): the session's probe reads
    // the walsender's last reply to know the link is alive (`Session::probe_stream`).
    .with_wakeup_interval(Duration::from_secs(1))
    .with_application_name(name);
    if let Some(tls) = target.tls.replication_config(&host, encrypted) {
        rc = rc.with_tls(tls);
    }
    Ok(rc)
}
