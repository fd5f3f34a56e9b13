//! Admission of replay work: every page of the log read for a client (WebSocket and SSE
//! replays, `/sync/deltas`, `/v1/shape` changes) is read and built under a turn taken here. At
//! most `permits` pages are in the works at once however many clients replay, so replay holds
//! a bounded share of the database and the worker, and what is not replay (the sequencer, the
//! hub's live fan-out, `/healthz`, auth, and a live subscriber catching up after its queue
//! overflowed) never waits here. Users take turns: each user has at most one page waiting for
//! a permit or being read (its other pages, on any of its connections, queue behind it; a
//! free permit does not let one user read two pages at once), and the permits go out first
//! come, first served, so N users replaying at once each get about 1/N of the replay share. A
//! client that replays again and again slows itself, and other replays by its share, never
//! live delivery.
//!
//! While live deliveries flow, replay far behind the head of the log is also paced: such
//! pages keep the permits busy at most `share_percent` of the time in total (a page that took
//! d, once its connection was had, owes a rest of d x (100 / percent - 1) / permits before the
//! next paced turn starts; at most `MAX_REST` is owed at once). Without it the permits are
//! work-conserving, and clients that replay again and again keep a permit's database backend
//! busy all the time, on a machine whose CPU live delivery (the walsender, the sequencer, the
//! writers' backends, the fan-out) needs too. Pages that start within `PACE_FROM` sync ids of
//! the published watermark are reads at the head (a `/v1/shape` live request, a session's
//! last page before it goes live, a `/sync/deltas` poll): they neither rest nor owe a rest.
//! With no live delivery in the last second, pages run back to back.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, SemaphorePermit};
use tokio::time::Instant;

/// How long without a live delivery before replay stops pacing itself.
const LIVE_WINDOW: Duration = Duration::from_secs(1);
/// The most rest owed at once: a page held a long time (a slow database) does not stop replay
/// for several times as long.
const MAX_REST: Duration = Duration::from_secs(1);

/// Pages starting fewer sync ids than this behind the published watermark are not paced.
pub const PACE_FROM: i64 = 5_000;

/// Says whether live deliveries flow now (the hub delivered within `LIVE_WINDOW`).
pub type Live = Box<dyn Fn(Duration) -> bool + Send + Sync>;

pub struct Admission {
    permits: Semaphore,
    size: usize,
    /// Percent of the time a permit may be busy while live deliveries flow (100: no rest).
    share_percent: u64,
    live: Live,
    /// Replay rests until then: pages read while live deliveries flowed owe it.
    rest_until: Mutex<Option<Instant>>,
    /// Time replay turns spent resting, in microseconds (for `/metrics`).
    pub rested_us: AtomicU64,
    /// Per user with a page waiting or being read: one permit, held through the turn, so the
    /// user's pages queue here and only one of them waits in `permits`' queue or is read.
    /// Removed when the last one is done.
    users: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// Pages waiting for a turn now, and turns taken (for `/metrics`).
    waiting: AtomicU64,
    pub turns: AtomicU64,
}

/// The right to read and build one page of the log; released when dropped.
pub struct Turn<'a> {
    admission: &'a Admission,
    /// Far behind the head: the page owes a rest (see the module's first lines).
    paced: bool,
    started: Instant,
    _permit: SemaphorePermit<'a>,
    _user: UserSlot<'a>,
}

impl Turn<'_> {
    /// The page's reading starts now (its pooled connection was had): the wait for the
    /// connection is not charged as the page's work.
    pub fn reading(&mut self) {
        self.started = Instant::now();
    }
}

impl Drop for Turn<'_> {
    /// Before the permit goes: the page's rest is owed by the next turn.
    fn drop(&mut self) {
        let a = self.admission;
        if !self.paced || a.share_percent >= 100 || !(a.live)(LIVE_WINDOW) {
            return;
        }
        let busy = self.started.elapsed();
        // Spread over the permits: `size` pages at once owe one page's rest between them.
        let owed = (busy
            .min(MAX_REST * 100)
            .mul_f64((100 - a.share_percent) as f64 / a.share_percent as f64)
            / u32::try_from(a.size).unwrap_or(u32::MAX))
        .min(MAX_REST);
        let now = Instant::now();
        let mut until = a.rest_until.lock().unwrap_or_else(|p| p.into_inner());
        let from = until.filter(|t| *t > now).unwrap_or(now);
        *until = Some((from + owed).min(now + MAX_REST));
    }
}

/// A user's place in line (its own semaphore's permit once held); the user's entry is removed
/// when no page of the user waits or runs any more, however the wait ended (a client gone
/// drops its future mid-wait).
struct UserSlot<'a> {
    admission: &'a Admission,
    user: String,
    queue: Option<Arc<Semaphore>>,
    held: Option<OwnedSemaphorePermit>,
}

impl Drop for UserSlot<'_> {
    fn drop(&mut self) {
        // The permit and this clone first: the count then says who else is in line.
        self.held.take();
        self.queue.take();
        let mut users = self.admission.lock();
        if users
            .get(&self.user)
            .is_some_and(|q| Arc::strong_count(q) == 1)
        {
            users.remove(&self.user);
        }
    }
}

/// Counts a page waiting for its turn until the wait ends.
struct Waiting<'a>(&'a AtomicU64);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Admission {
    /// `permits` pages at once; 0 sizes it from the machine: half the cores. Either way at
    /// least one and fewer than the API pool's `pool` connections when the pool has two or
    /// more, so replays never hold them all (auth and group loads need one); a larger
    /// `permits` is lowered to that, with a warning.
    /// `share_percent` (1 to 100) paces turns while `live` says live deliveries flow.
    pub fn new(permits: usize, pool: usize, share_percent: u64, live: Live) -> Admission {
        let below_pool = pool.saturating_sub(1).max(1);
        let size = if permits > 0 {
            if permits > below_pool {
                tracing::warn!(
                    replay_permits = permits,
                    pool,
                    "replay_permits lowered to {below_pool}: replays must leave a pooled connection to everything else"
                );
            }
            permits.min(below_pool)
        } else {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            (cores / 2).min(below_pool).max(1)
        };
        Admission {
            permits: Semaphore::new(size),
            size,
            share_percent: share_percent.clamp(1, 100),
            live,
            rest_until: Mutex::new(None),
            rested_us: AtomicU64::new(0),
            users: Mutex::new(HashMap::new()),
            waiting: AtomicU64::new(0),
            turns: AtomicU64::new(0),
        }
    }

    /// Pages that may be read at once.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Pages waiting for a turn now.
    pub fn waiting(&self) -> u64 {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Waits out the rest earlier pages owe (with a permit held: the next page of any user
    /// waits too). Owed only while live deliveries flow; cancel-safe.
    async fn rest(&self) {
        loop {
            let until = *self.rest_until.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            match until {
                Some(t) if t > now && (self.live)(LIVE_WINDOW) => {
                    tokio::time::sleep_until(t).await;
                    let us = u64::try_from(t.duration_since(now).as_micros()).unwrap_or(u64::MAX);
                    self.rested_us.fetch_add(us, Ordering::Relaxed);
                }
                _ => return,
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Semaphore>>> {
        self.users.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for `user`'s turn to read a page that starts `behind` sync ids behind the
    /// published watermark (paced from `PACE_FROM` on). Cancel-safe: dropped while waiting, it
    /// leaves the line (callers race it with the session's revocation).
    pub async fn enter(&self, user: &str, behind: i64) -> Turn<'_> {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let _waiting = Waiting(&self.waiting);
        let queue = self
            .lock()
            .entry(user.to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(1)))
            .clone();
        let mut slot = UserSlot {
            admission: self,
            user: user.to_owned(),
            queue: Some(queue.clone()),
            held: None,
        };
        slot.held = Some(queue.acquire_owned().await.expect("never closed"));
        let permit = self.permits.acquire().await.expect("never closed");
        let paced = behind >= PACE_FROM;
        if paced {
            self.rest().await;
        }
        self.turns.fetch_add(1, Ordering::Relaxed);
        Turn {
            admission: self,
            paced,
            started: Instant::now(),
            _permit: permit,
            _user: slot,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Admission, Live, MAX_REST, PACE_FROM};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;
    use tokio::time::Instant;

    /// A page far behind the head (paced while live deliveries flow).
    const FAR: i64 = PACE_FROM;

    fn unpaced(permits: usize, pool: usize) -> Admission {
        Admission::new(permits, pool, 100, Box::new(|_| true))
    }

    /// Paced at `percent`, live deliveries flowing while the returned flag is set.
    fn paced(permits: usize, percent: u64) -> (Admission, Arc<AtomicBool>) {
        let flowing = Arc::new(AtomicBool::new(true));
        let f = flowing.clone();
        let live: Live = Box::new(move |_| f.load(Ordering::Relaxed));
        (Admission::new(permits, 8, percent, live), flowing)
    }

    /// At 25 %, a page that took 40 ms owes 120 ms: the next turn (another user's too)
    /// starts no sooner; the rest is counted for `/metrics`.
    #[tokio::test(start_paused = true)]
    async fn while_live_deliveries_flow_a_page_owes_its_rest() {
        let (admission, _) = paced(1, 25);
        let turn = admission.enter("a", FAR).await;
        tokio::time::sleep(Duration::from_millis(40)).await;
        drop(turn);
        let asked = Instant::now();
        let _next = admission.enter("b", FAR).await;
        let waited = asked.elapsed();
        assert!(
            waited >= Duration::from_millis(119) && waited <= Duration::from_millis(130),
            "waited {waited:?}, owed 120 ms"
        );
        assert!(admission.rested_us.load(Ordering::Relaxed) >= 119_000);
    }

    /// A page at the head (fewer than `PACE_FROM` ids behind) neither waits out a rest nor
    /// owes one: live-ish reads are never slowed by replays.
    #[tokio::test(start_paused = true)]
    async fn a_page_at_the_head_neither_rests_nor_owes_a_rest() {
        let (admission, _) = paced(1, 25);
        let turn = admission.enter("a", FAR).await;
        tokio::time::sleep(Duration::from_millis(40)).await;
        drop(turn);
        let asked = Instant::now();
        let head = admission.enter("b", PACE_FROM - 1).await;
        assert_eq!(asked.elapsed(), Duration::ZERO, "a read at the head waited");
        tokio::time::sleep(Duration::from_millis(400)).await;
        drop(head);
        // Only the far page's 120 ms were owed, and they have passed.
        let asked = Instant::now();
        drop(admission.enter("c", FAR).await);
        assert_eq!(
            asked.elapsed(),
            Duration::ZERO,
            "a read at the head owed a rest"
        );
    }

    /// The wait for a pooled connection (before `reading`) is not charged as the page's work.
    #[tokio::test(start_paused = true)]
    async fn only_the_reading_is_charged() {
        let (admission, _) = paced(1, 50);
        let mut turn = admission.enter("a", FAR).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        turn.reading();
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(turn);
        let asked = Instant::now();
        drop(admission.enter("b", FAR).await);
        let waited = asked.elapsed();
        assert!(
            waited >= Duration::from_millis(19) && waited <= Duration::from_millis(25),
            "waited {waited:?}, owed 20 ms"
        );
    }

    /// Two permits: two pages at once owe one page's rest between them (each permit is
    /// still busy at most its share of the time).
    #[tokio::test(start_paused = true)]
    async fn the_rest_is_spread_over_the_permits() {
        let (admission, _) = paced(2, 50);
        let (a, b) = (
            admission.enter("a", FAR).await,
            admission.enter("b", FAR).await,
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop((a, b));
        let asked = Instant::now();
        let _next = admission.enter("c", FAR).await;
        let waited = asked.elapsed();
        assert!(
            waited >= Duration::from_millis(99) && waited <= Duration::from_millis(110),
            "waited {waited:?}: 2 x 100 ms at 50 % over 2 permits owe 100 ms"
        );
    }

    /// With no live delivery, pages run back to back; a page held very long owes at most
    /// `MAX_REST`.
    #[tokio::test(start_paused = true)]
    async fn no_rest_without_live_deliveries_and_never_more_than_the_cap() {
        let (admission, flowing) = paced(1, 25);
        flowing.store(false, Ordering::Relaxed);
        let turn = admission.enter("a", FAR).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(turn);
        let asked = Instant::now();
        drop(admission.enter("a", FAR).await);
        assert_eq!(asked.elapsed(), Duration::ZERO, "rested with nothing live");

        flowing.store(true, Ordering::Relaxed);
        let turn = admission.enter("a", FAR).await;
        tokio::time::sleep(Duration::from_secs(60)).await;
        drop(turn);
        let asked = Instant::now();
        let _next = admission.enter("a", FAR).await;
        let waited = asked.elapsed();
        assert!(
            waited <= MAX_REST + Duration::from_millis(5),
            "waited {waited:?}"
        );
        assert!(
            waited >= MAX_REST - Duration::from_millis(5),
            "waited {waited:?}"
        );
    }

    /// A turn given up while it rests (its client went away) frees the permit and its user's
    /// place in line.
    #[tokio::test(start_paused = true)]
    async fn a_rest_given_up_leaves_the_line() {
        let (admission, _) = paced(1, 10);
        let turn = admission.enter("a", FAR).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(turn);
        let gone = tokio::time::timeout(Duration::from_millis(50), admission.enter("b", FAR)).await;
        assert!(gone.is_err(), "the rest (900 ms) was not owed");
        assert_eq!(admission.waiting(), 0);
        assert!(admission.lock().is_empty(), "b left the line");
        assert_eq!(admission.permits.available_permits(), 1);
    }

    /// With one permit held, user a queues three pages and user b one after them: b's page
    /// goes second, not behind all of a's (first come, first served per page would make it
    /// fourth); all four get their turn.
    #[tokio::test]
    async fn users_take_turns_and_every_page_gets_one() {
        let admission = Arc::new(unpaced(1, 8));
        assert_eq!(admission.size(), 1);
        let order = Arc::new(Mutex::new(vec![]));
        let first = admission.enter("x", FAR).await;
        let mut tasks = vec![];
        for (n, user) in ["a1", "a2", "a3", "b1"].into_iter().enumerate() {
            let (line, order) = (admission.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let _turn = line.enter(&user[..1], FAR).await;
                order.lock().unwrap().push(user);
                tokio::task::yield_now().await;
            }));
            // Each is in line before the next comes.
            while admission.waiting() < n as u64 + 1 {
                tokio::task::yield_now().await;
            }
        }
        drop(first);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), ["a1", "b1", "a2", "a3"]);
        assert_eq!(admission.waiting(), 0);
        assert!(admission.lock().is_empty(), "no user left in line");
    }

    /// A page whose wait is given up (its client went away) leaves the line: the user's entry
    /// goes, and the next page gets the permit.
    #[tokio::test]
    async fn a_wait_given_up_leaves_the_line() {
        let admission = unpaced(1, 8);
        let held = admission.enter("a", FAR).await;
        let gone = tokio::time::timeout(
            std::time::Duration::from_millis(20),
            admission.enter("b", FAR),
        )
        .await;
        assert!(gone.is_err(), "no permit while one is held");
        assert_eq!(admission.waiting(), 0);
        drop(held);
        assert!(admission.lock().is_empty());
        let _next = admission.enter("c", FAR).await;
    }

    #[test]
    fn sized_from_the_cores_below_the_pool() {
        assert_eq!(unpaced(3, 8).size(), 3);
        assert_eq!(unpaced(0, 1).size(), 1);
        assert_eq!(unpaced(0, 2).size(), 1);
    }

    /// One page per user in the works (review rev16c F2 found the docs saying "waiting"; the
    /// design is "waiting or being read"): with a permit free, a user's second page still
    /// waits for its first, and another user's page takes the free permit at once.
    #[tokio::test]
    async fn a_user_reads_one_page_at_a_time_and_a_free_permit_goes_to_another_user() {
        let admission = unpaced(2, 8);
        let running = admission.enter("a", FAR).await;
        let wait = std::time::Duration::from_millis(300);
        let second = tokio::time::timeout(wait, admission.enter("a", FAR)).await;
        assert!(second.is_err(), "a user read two pages at once");
        let other = tokio::time::timeout(wait, admission.enter("b", FAR)).await;
        assert!(
            other.is_ok(),
            "a permit was free, yet another user's page waited"
        );
        drop(running);
        let again = tokio::time::timeout(wait, admission.enter("a", FAR)).await;
        assert!(
            again.is_ok(),
            "the user's next page waited after its first was done"
        );
    }

    /// rev16c-F3: SYNC_REPLAY_PERMITS is taken as given: a value above tokio's
    /// `Semaphore::MAX_PERMITS` panics when the worker starts (not a config error), and one
    /// at or above SYNC_DB_CONNECTIONS lets replays hold every pooled connection, which the
    /// sizing exists to prevent ("auth and group loads need one").
    #[test]
    fn explicit_permits_are_kept_below_the_pool_and_never_panic() {
        let huge = std::panic::catch_unwind(|| unpaced(1 << 62, 8).size());
        assert!(huge.is_ok(), "SYNC_REPLAY_PERMITS=2^62 panics");
        assert!(unpaced(16, 8).size() < 8, "16 permits over a pool of 8");
    }
}
