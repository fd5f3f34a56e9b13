//! Reading the sequenced log: the pages of `pg_sync.changes()` turned into deltas, how far a
//! page reaches, the retention horizon and the last sequenced sync id.

use crate::delta::Delta;
use std::sync::Arc;
use tokio_postgres::Client;

/// How many sync ids the next page after `after` covers on the way to `last`: at most `max`,
/// and computed in 64 bits (a gap past 2^31 must not wrap into a negative span).
pub fn page_span(after: i64, last: i64, max: i32) -> i32 {
    (last - after).clamp(0, i64::from(max)) as i32
}

/// Reads sequenced deltas with sync ids after+1 ..= after+span, of `groups` (None: all) plus
/// global models, and the membership changes of `member` (None: everyone's).
///
/// The rows are turned into deltas while the page streams in, a chunk at a time: a page read
/// whole and then built left the database idle while the worker built it, which was a third of
/// a replay's wall time (bench/replay.sh). One round trip: the statement goes out with its
/// parameter types (no prepare), and is planned for these arguments as before.
pub async fn changes(
    db: &Client,
    after: i64,
    groups: Option<&[String]>,
    span: i32,
    member: Option<&str>,
) -> Result<Vec<Arc<Delta>>, tokio_postgres::Error> {
    use futures::TryStreamExt;
    use tokio_postgres::types::{ToSql, Type};
    // A reader for one user gets that user's membership changes only, filtered inside the
    // page read: with 10,000 users each subscribing from 0, everyone's was 10,000 x 10,000
    // rows turned into deltas and thrown away (the fan-out bench's set-up took over ten
    // minutes).
    let params: [(&(dyn ToSql + Sync), Type); 4] = [
        (&after, Type::INT8),
        (&groups, Type::TEXT_ARRAY),
        (&span, Type::INT4),
        (&member, Type::TEXT),
    ];
    let rows = db
        .query_typed_raw(
            "SELECT sync_id, global, model, model_id, action, data::text, version, group_id, prev_group_id,
                    moved::text, client_id, client_tx_id::text
               FROM pg_sync.changes($1, $2, $3, $4)",
            params,
        )
        .await?;
    futures::pin_mut!(rows);
    // Set when this read ends, however it ends: chunks still waiting for a builder then skip
    // their build (a page whose reader is gone, or whose read failed, costs no build time that
    // live pages and the sequencer's republish would wait behind).
    let abandoned = Abandoned::default();
    let mut chunk = Vec::new();
    let mut built = Vec::new();
    while let Some(row) = rows.try_next().await? {
        chunk.push(row);
        if chunk.len() == CHUNK_ROWS {
            built.push(build_apart(std::mem::take(&mut chunk), &abandoned));
        }
    }
    let mut page = if built.is_empty() && chunk.len() <= BLOCKING_PAGE_ROWS {
        build(&chunk)
    } else {
        if !chunk.is_empty() {
            built.push(build_apart(chunk, &abandoned));
        }
        let mut page = Vec::new();
        for part in built {
            page.extend(
                part.await
                    .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic())),
            );
        }
        page
    };
    // pg_sync.changes() read alone returns its rows by sync id, but the planner cannot know
    // that, and an ORDER BY here sorted every page again in the database (a quarter of a
    // replay page's time there). Sorting here costs one pass over rows already in order,
    // and keeps the order whatever plan the function gets.
    page.sort_by_key(|d| d.sync_id);
    Ok(page)
}

/// Rows of a page built per chunk (`build_apart`), so the first are built while the rest
/// stream in.
const CHUNK_ROWS: usize = 512;

/// Deltas of `changes`' rows.
fn build(rows: &[tokio_postgres::Row]) -> Vec<Arc<Delta>> {
    rows.iter()
        .map(|r| {
            let sync_id: i64 = r.get(0);
            let global: bool = r.get(1);
            // The columns are lent from the row, not copied: owned, they were ten
            // allocations per action before the frame was written (the worker's main cost
            // in a replay after the page read).
            Arc::new(Delta::from_text(sync_id, global, |c| {
                r.get::<_, Option<&str>>(column(c)?)
            }))
        })
        .collect()
}

/// `build` off the async runtime, started now: a page of thousands of wide rows is seconds of
/// CPU in a debug build and a good part of one in release, and built on a runtime thread it
/// stalls every task scheduled there (two replaying clients held /healthz up for 2 s). At most
/// (cores - 1) chunks are built at once (at least one), so many clients replaying together
/// leave a core to everything else (/healthz, live delivery): six replays at once still held
/// /healthz up for 230 ms without this bound. A chunk whose page read has ended by the time
/// it gets a builder (`Abandoned`) is not built.
fn build_apart(
    rows: Vec<tokio_postgres::Row>,
    abandoned: &Abandoned,
) -> tokio::task::JoinHandle<Vec<Arc<Delta>>> {
    static BUILDERS: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    let builders = BUILDERS.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        tokio::sync::Semaphore::new(cores.saturating_sub(1).max(1))
    });
    let gone = abandoned.0.clone();
    tokio::spawn(async move {
        let _turn = builders.acquire().await.expect("never closed");
        if gone.load(std::sync::atomic::Ordering::Relaxed) {
            return Vec::new();
        }
        tokio::task::spawn_blocking(move || build(&rows))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    })
}

/// Whether the page read that spawned chunk builds has ended (set on drop: its result was
/// taken, or it was dropped or failed; the builds of a taken page have all finished by then).
#[derive(Default)]
struct Abandoned(Arc<std::sync::atomic::AtomicBool>);

impl Drop for Abandoned {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Where `Delta::from_text`'s column `name` is in a row of `changes`' select list.
fn column(name: &str) -> Option<usize> {
    Some(match name {
        "model" => 2,
        "model_id" => 3,
        "action" => 4,
        "data" => 5,
        "version" => 6,
        "group_id" => 7,
        "prev_group_id" => 8,
        // `moved::text` is 'true' or 'false': `from_text` reads both spellings.
        "moved" => 9,
        "client_id" => 10,
        "client_tx_id" => 11,
        _ => return None,
    })
}

/// Pages with more rows than this are turned into deltas off the async runtime.
const BLOCKING_PAGE_ROWS: usize = 64;

/// The retention horizon: sync ids at or below it are gone.
pub async fn horizon(db: &Client) -> Result<i64, tokio_postgres::Error> {
    Ok(db
        .query_one("SELECT pg_sync.retention_horizon()", &[])
        .await?
        .get(0))
}

/// The highest sync id the sequencer has persisted (0 before the first).
pub async fn last_sync_id(db: &Client) -> Result<i64, tokio_postgres::Error> {
    Ok(db
        .query_one("SELECT pg_sync.last_sync_id()", &[])
        .await?
        .get(0))
}

#[cfg(test)]
mod tests {
    use super::page_span;

    #[test]
    fn page_span_is_bounded_and_never_wraps() {
        assert_eq!(page_span(0, 10, 5_000), 10);
        assert_eq!(page_span(10, 10, 5_000), 0);
        assert_eq!(page_span(0, 1 << 40, 5_000), 5_000);
        assert_eq!(page_span(0, 3_000_000_000, 5_000), 5_000);
        assert_eq!(page_span(1, 1 + (1 << 32) + 7, 5_000), 5_000);
        assert_eq!(page_span(20, 10, 5_000), 0);
    }
}
