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
pub async fn changes(
    db: &Client,
    after: i64,
    groups: Option<&[String]>,
    span: i32,
    member: Option<&str>,
) -> Result<Vec<Arc<Delta>>, tokio_postgres::Error> {
    read(db, after, groups, span, member, None).await
}

/// `changes`, or with `limit` only the first `limit` rows of the page in sync id order.
async fn read(
    db: &Client,
    after: i64,
    groups: Option<&[String]>,
    span: i32,
    member: Option<&str>,
    limit: Option<i64>,
) -> Result<Vec<Arc<Delta>>, tokio_postgres::Error> {
    // A reader for one user gets that user's membership changes only, filtered inside the
    // page read: with 10,000 users each subscribing from 0, everyone's was 10,000 x 10,000
    // rows turned into deltas and thrown away (the fan-out bench's set-up took over ten
    // minutes).
    const SELECT: &str = "SELECT sync_id, global, model, model_id, action, data::text, version, group_id, prev_group_id,
                    moved::text, client_id, client_tx_id::text
               FROM pg_sync.changes($1, $2, $3, $4)";
    let rows = match limit {
        None => db.query(SELECT, &[&after, &groups, &span, &member]).await?,
        // Ordered in the database, so the rows kept are the page's first ones whatever plan
        // the function gets (a top-N sort of what the span holds for the reader).
        Some(limit) => {
            let sql = format!("{SELECT} ORDER BY sync_id LIMIT $5");
            db.query(&sql, &[&after, &groups, &span, &member, &limit])
                .await?
        }
    };
    let rows_len = rows.len();
    let build = move || -> Vec<Arc<Delta>> {
        let mut page: Vec<Arc<Delta>> = rows
            .iter()
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
            .collect();
        // pg_sync.changes() read alone returns its rows by sync id, but the planner cannot know
        // that, and an ORDER BY here sorted every page again in the database (a quarter of a
        // replay page's time there). Sorting here costs one pass over rows already in order,
        // and keeps the order whatever plan the function gets.
        page.sort_by_key(|d| d.sync_id);
        page
    };
    // A page of thousands of wide rows is seconds of CPU in a debug build and a good part of
    // one in release: built on a runtime thread it stalls every task scheduled there (two
    // replaying clients held /healthz up for 2 s). Large pages are built on the blocking pool.
    if rows_len > BLOCKING_PAGE_ROWS {
        // At most (cores - 1) pages are built at once (at least one), so many clients replaying
        // together leave a core to everything else (/healthz, live delivery): six replays at
        // once still held /healthz up for 230 ms without this bound.
        static BUILDERS: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
        let builders = BUILDERS.get_or_init(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            tokio::sync::Semaphore::new(cores.saturating_sub(1).max(1))
        });
        let _turn = builders.acquire().await.expect("never closed");
        Ok(tokio::task::spawn_blocking(build)
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic())))
    } else {
        Ok(build())
    }
}

/// Pages through the log for one reader, with a span that follows how dense the reader's rows
/// are. A page of `BASE_SPAN` sync ids holds at most that many rows; for a reader of a few
/// groups it holds few (1 group of 100: about 50), and a replay from 0 of a 100k-id log was 20
/// page reads, each with its own statement, planning and horizon check, where a reader of every
/// group needs the same 20 for 100 times the rows (the hostile bench's revoked-key cycle:
/// bench/RESULTS.md). So after a sparse page the next one spans more ids, up to `MAX_SPAN`, at
/// most `GROWTH` times the last; a page wider than `BASE_SPAN` is cut at `BASE_SPAN` rows in
/// sync id order, and then reaches only to its last row. A page's rows stay bounded, and its
/// database work too: at most `MAX_SPAN / BASE_SPAN` times its rows, once, when a sparse range
/// turns dense, after which the span shrinks back.
#[derive(Debug, Clone)]
pub struct Pager {
    span: i32,
}

impl Default for Pager {
    fn default() -> Self {
        Pager { span: BASE_SPAN }
    }
}

/// The span of a first page, and the most rows any page holds.
pub const BASE_SPAN: i32 = 5_000;
/// The widest span a page grows to.
const MAX_SPAN: i32 = 16 * BASE_SPAN;
/// How many times wider than the last page the next one may be.
const GROWTH: i64 = 4;

impl Pager {
    /// The next page after `after`, reaching at most to `through`: its deltas (unfiltered by
    /// `visible`, in sync id order) and the sync id it reached, where the next page starts.
    pub async fn next(
        &mut self,
        db: &Client,
        after: i64,
        through: i64,
        groups: Option<&[String]>,
        member: Option<&str>,
    ) -> Result<(Vec<Arc<Delta>>, i64), tokio_postgres::Error> {
        let span = page_span(after, through, self.span);
        let limit = (span > BASE_SPAN).then_some(i64::from(BASE_SPAN));
        let page = read(db, after, groups, span, member, limit).await?;
        let reached = match (limit, page.last()) {
            (Some(limit), Some(last)) if page.len() as i64 >= limit => last.sync_id,
            _ => after + i64::from(span),
        };
        self.span = next_span(span, reached - after, page.len());
        Ok((page, reached))
    }
}

/// The span after a page of `span` ids that covered `covered` of them with `rows` rows: the
/// span that would hold `BASE_SPAN` rows at that density, within `BASE_SPAN ..= MAX_SPAN` and at
/// most `GROWTH` times `span`.
fn next_span(span: i32, covered: i64, rows: usize) -> i32 {
    let ideal = covered.max(1) * i64::from(BASE_SPAN) / (rows as i64).max(1);
    let cap = (i64::from(span) * GROWTH).min(i64::from(MAX_SPAN));
    ideal.clamp(i64::from(BASE_SPAN), cap.max(i64::from(BASE_SPAN))) as i32
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
    use super::{next_span, page_span, BASE_SPAN, MAX_SPAN};

    #[test]
    fn the_span_follows_the_readers_density_within_bounds() {
        // Dense (every id a row): stays at the base.
        assert_eq!(next_span(BASE_SPAN, 5_000, 5_000), BASE_SPAN);
        // One row in 100: grows, at most 4 times a page, up to the widest span.
        assert_eq!(next_span(BASE_SPAN, 5_000, 50), 4 * BASE_SPAN);
        assert_eq!(next_span(4 * BASE_SPAN, 20_000, 200), MAX_SPAN);
        assert_eq!(next_span(MAX_SPAN, 80_000, 0), MAX_SPAN);
        // A wide page cut at BASE_SPAN rows after 8,000 ids: 8,000 ids hold that many.
        assert_eq!(next_span(MAX_SPAN, 8_000, 5_000), 8_000);
        // Denser than one row per id (never: one action per sync id) or a short last page.
        assert_eq!(next_span(BASE_SPAN, 10, 5_000), BASE_SPAN);
        assert_eq!(next_span(BASE_SPAN, 3, 0), 15_000);
    }

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
