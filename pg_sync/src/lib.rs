//! pg_sync: change capture with last-writer-wins versions, inside Postgres.
//!
//! `_PG_init` does its steps in a fixed order: settings, then shared memory (only while
//! `shared_preload_libraries` is processed; without it the clock refuses with a hint), then the
//! relcache callback that keeps the capture trigger's parsed registrations fresh.

use pgrx::prelude::*;

mod actions;
mod canonical;
mod capture;
mod clock;
mod deep;
mod errors;
mod exact;
mod leader;
mod model;
mod mutate;
mod owner;
mod peers;
mod remote;
mod remote_set;
mod retention;
mod settings;
mod state;
mod state_direct;
mod xid_guard;

::pgrx::pg_module_magic!();

extension_sql_file!("../../sql/schema.sql", name = "schema", bootstrap);
extension_sql_file!("../../sql/registry.sql", name = "registry", finalize);
// Federation's tables and functions (sql/federation.sql); its plpgsql reads registry.sql's
// functions only when called, so its place before the finalize file does not matter.
extension_sql_file!("../../sql/federation.sql", name = "federation");

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    settings::define();
    // SAFETY: reading a postmaster global during library load.
    if unsafe { pgrx::pg_sys::process_shared_preload_libraries_in_progress } {
        clock::init_shmem();
    }
    // SAFETY: registering a callback that only clears backend-local caches.
    unsafe {
        pgrx::pg_sys::CacheRegisterRelcacheCallback(
            Some(capture::invalidate),
            pgrx::pg_sys::Datum::from(0usize),
        );
    }
    actions::batch::init();
}

/// Every SQL-callable function, in the extension's schema.
#[pg_schema]
mod pg_sync {
    use crate::deep::Jsonb;
    use pgrx::prelude::*;
    use pgrx::{pg_sys, Uuid};

    /// Takes this database's federation leader lock for the session, without waiting: true
    /// when this session holds it. The worker runs federation links only while it holds it.
    #[pg_extern(volatile, parallel_unsafe)]
    fn try_federation_lock() -> bool {
        crate::leader::try_lock()
    }

    /// A fresh HLC value (unix milliseconds << 16 | counter), strictly above every value before it.
    #[pg_extern(volatile, parallel_unsafe)]
    fn hlc_now() -> i64 {
        crate::clock::tick() as i64
    }

    /// A fresh version for this node, as stored in `sync_actions.version`.
    #[pg_extern(volatile, parallel_unsafe)]
    fn next_version() -> String {
        crate::clock::next_version().to_string()
    }

    /// This node's id (`pg_sync.node_id`, or the derived default).
    #[pg_extern(stable, parallel_safe)]
    fn node_id() -> String {
        crate::settings::node_id()
    }

    /// The canonical key text for key column texts: the text itself for one column, a JSON
    /// array of the texts for several.
    #[pg_extern(immutable, parallel_safe, strict)]
    fn key_text(parts: Vec<String>) -> String {
        crate::model::key_text(parts)
    }

    /// The text form pg_sync identifies a key or group value by: the type's output under fixed
    /// settings (DateStyle ISO, TimeZone UTC, IntervalStyle postgres, extra_float_digits 1,
    /// lc_monetary C, bytea_output hex), whatever the session's.
    #[pg_extern(stable, parallel_restricted, strict)]
    fn canonical_text(value: pgrx::AnyElement) -> String {
        // SAFETY: a non-null value of the type Postgres says it has.
        unsafe { crate::canonical::output_of_type(value.oid(), value.datum()) }
    }

    /// The HLC part of a version string.
    #[pg_extern(immutable, parallel_safe, strict)]
    fn version_hlc(version: &str) -> i64 {
        match pg_sync_lww::version::Version::parse(version) {
            Ok(v) => v.hlc as i64,
            Err(why) => crate::errors::invalid(
                format!("invalid version: {why}"),
                "Versions look like 0193a8f2c4d10003@node-id.",
            ),
        }
    }

    /// A row's current LWW state (from row_state): liveness, created/deleted and per-column versions.
    #[pg_extern(volatile, parallel_unsafe)]
    fn row_version_state(model: &str, model_id: &str) -> Jsonb {
        Jsonb(crate::state::describe(model, model_id))
    }

    /// Merges changes captured on another node (one `to_jsonb(sync_actions row)`, or an array).
    #[pg_extern(volatile, parallel_unsafe)]
    fn apply_remote(change: Option<Jsonb>) -> i64 {
        let Some(change) = change else {
            crate::errors::raise(
                PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
                "pg_sync.apply_remote: change must not be null",
                "Pass to_jsonb() of a sync_actions row, or an array of them.",
            );
        };
        // Values are parsed as they were captured: in canonical form (canonical::VALUE_INPUT).
        crate::canonical::with_input_settings(crate::canonical::VALUE_INPUT, || {
            crate::remote::apply_remote(change)
        })
    }

    /// The set-based apply of a peer batch (an array of changes, as `apply_remote` takes): how
    /// many changed something, or NULL when the batch must be applied change by change.
    #[pg_extern(volatile, parallel_unsafe)]
    fn apply_remote_set(changes: Option<Jsonb>) -> Option<i64> {
        let changes = changes?;
        crate::canonical::with_input_settings(crate::canonical::VALUE_INPUT, || {
            crate::remote_set::apply_remote_set(changes)
        })
    }

    /// Applies a client's batch of writes atomically, once per (client_id, client_tx_id).
    #[pg_extern(volatile, parallel_unsafe)]
    fn mutate(client_id: Option<&str>, client_tx_id: Option<Uuid>, ops: Option<Jsonb>) -> Jsonb {
        let (Some(client_id), Some(client_tx_id), Some(ops)) = (client_id, client_tx_id, ops)
        else {
            crate::errors::raise(
                PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
                "pg_sync.mutate: client_id, client_tx_id and ops must not be null",
                "Every client transaction needs its client id and a unique transaction id.",
            );
        };
        crate::mutate::mutate(client_id, client_tx_id, ops, None)
    }

    /// `mutate` on behalf of a client user: every op must stay within the user's groups
    /// (42501 otherwise). This is what the worker calls for `POST /sync/mutate`.
    #[pg_extern(volatile, parallel_unsafe)]
    fn mutate_as(
        user_id: Option<&str>,
        client_id: Option<&str>,
        client_tx_id: Option<Uuid>,
        ops: Option<Jsonb>,
    ) -> Jsonb {
        let (Some(user), Some(client_id), Some(client_tx_id), Some(ops)) =
            (user_id, client_id, client_tx_id, ops)
        else {
            crate::errors::raise(
                PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
                "pg_sync.mutate_as: user_id, client_id, client_tx_id and ops must not be null",
                "Pass the authenticated user and the client's transaction.",
            );
        };
        crate::mutate::mutate(client_id, client_tx_id, ops, Some(user))
    }

    /// Compacts the log: actions at or below `horizon` (a sync id) go (row states live in
    /// row_state, independent of the log). Returns how many actions were removed.
    #[pg_extern(volatile, parallel_unsafe, strict)]
    fn compact(horizon: i64) -> i64 {
        crate::retention::compact(horizon)
    }

    /// The registry write of `register_table`: checks that the caller owns the table and may
    /// call `register_table`, then writes as `pgsync_owner`. Returns false when the table is
    /// registered under another model name (nothing changes).
    #[pg_extern(volatile, parallel_unsafe)]
    fn registry_put(
        rel: pg_sys::Oid,
        model: &str,
        pk_columns: Vec<String>,
        group_column: Option<&str>,
        excluded_columns: Vec<String>,
        federation: &str,
    ) -> bool {
        crate::owner::registry_put(
            rel,
            model,
            pk_columns,
            group_column,
            excluded_columns,
            federation,
        )
    }

    /// Rows of a registered table read as its owner (see `owner::owner_rows`): by model ids, or
    /// the next `lim` rows after `after_id` in key order.
    #[pg_extern(volatile, parallel_unsafe)]
    fn owner_rows(
        model: &str,
        ids: Option<Vec<String>>,
        after_id: Option<&str>,
        lim: Option<i32>,
        lock: default!(bool, false),
    ) -> Jsonb {
        crate::owner::owner_rows(model, ids, after_id, lim, lock)
    }

    /// The registry write of `unregister_table`, with the same checks as `registry_put`.
    #[pg_extern(volatile, parallel_unsafe, strict)]
    fn registry_disable(rel: pg_sys::Oid) -> bool {
        crate::owner::registry_disable(rel)
    }

    /// AFTER ROW trigger installed by register_table().
    #[pg_trigger]
    fn capture<'a>(
        trigger: &'a pgrx::PgTrigger<'a>,
    ) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, PgHeapTupleError> {
        crate::capture::capture(trigger);
        Ok(None)
    }

    /// BEFORE TRUNCATE trigger installed by register_table().
    #[pg_trigger]
    fn refuse_truncate<'a>(
        trigger: &'a pgrx::PgTrigger<'a>,
    ) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, PgHeapTupleError> {
        crate::capture::refuse_truncate(trigger);
        Ok(None)
    }
}
