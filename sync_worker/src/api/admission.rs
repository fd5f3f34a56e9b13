//! Admission of replay work: every page of the log read for a client (WebSocket and SSE
//! replays, `/sync/deltas`, `/v1/shape` changes) is read and built under a turn taken here. At
//! most `permits` pages are in the works at once however many clients replay, so replay holds
//! a bounded share of the database and the worker, and what is not replay (the sequencer, the
//! hub's live fan-out, `/healthz`, auth, and a live subscriber catching up after its queue
//! overflowed) never waits here. Users take turns: each user has at most one page waiting for
//! a permit or being read (its other pages, on any of its connections, queue behind it; a
//! free permit does not let one user read two pages at once), and the permits go out first
//! come, first served, so N users replaying at once each get about 1/N of the replay share. A client that replays again and again slows itself, and other
//! replays by its share, never live delivery.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, SemaphorePermit};

pub struct Admission {
    permits: Semaphore,
    size: usize,
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
    _permit: SemaphorePermit<'a>,
    _user: UserSlot<'a>,
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
    pub fn new(permits: usize, pool: usize) -> Admission {
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

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Semaphore>>> {
        self.users.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for `user`'s turn to read a page. Cancel-safe: dropped while waiting, it leaves
    /// the line (callers race it with the session's revocation).
    pub async fn enter(&self, user: &str) -> Turn<'_> {
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
        self.turns.fetch_add(1, Ordering::Relaxed);
        Turn {
            _permit: permit,
            _user: slot,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Admission;
    use std::sync::{Arc, Mutex};

    /// With one permit held, user a queues three pages and user b one after them: b's page
    /// goes second, not behind all of a's (first come, first served per page would make it
    /// fourth); all four get their turn.
    #[tokio::test]
    async fn users_take_turns_and_every_page_gets_one() {
        let admission = Arc::new(Admission::new(1, 8));
        assert_eq!(admission.size(), 1);
        let order = Arc::new(Mutex::new(vec![]));
        let first = admission.enter("x").await;
        let mut tasks = vec![];
        for (n, user) in ["a1", "a2", "a3", "b1"].into_iter().enumerate() {
            let (line, order) = (admission.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let _turn = line.enter(&user[..1]).await;
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
        let admission = Admission::new(1, 8);
        let held = admission.enter("a").await;
        let gone =
            tokio::time::timeout(std::time::Duration::from_millis(20), admission.enter("b")).await;
        assert!(gone.is_err(), "no permit while one is held");
        assert_eq!(admission.waiting(), 0);
        drop(held);
        assert!(admission.lock().is_empty());
        let _next = admission.enter("c").await;
    }

    #[test]
    fn sized_from_the_cores_below_the_pool() {
        assert_eq!(Admission::new(3, 8).size(), 3);
        assert_eq!(Admission::new(0, 1).size(), 1);
        assert_eq!(Admission::new(0, 2).size(), 1);
    }

    /// One page per user in the works (review rev16c F2 found the docs saying "waiting"; the
    /// design is "waiting or being read"): with a permit free, a user's second page still
    /// waits for its first, and another user's page takes the free permit at once.
    #[tokio::test]
    async fn a_user_reads_one_page_at_a_time_and_a_free_permit_goes_to_another_user() {
        let admission = Admission::new(2, 8);
        let running = admission.enter("a").await;
        let wait = std::time::Duration::from_millis(300);
        let second = tokio::time::timeout(wait, admission.enter("a")).await;
        assert!(second.is_err(), "a user read two pages at once");
        let other = tokio::time::timeout(wait, admission.enter("b")).await;
        assert!(
            other.is_ok(),
            "a permit was free, yet another user's page waited"
        );
        drop(running);
        let again = tokio::time::timeout(wait, admission.enter("a")).await;
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
        let huge = std::panic::catch_unwind(|| Admission::new(1 << 62, 8).size());
        assert!(huge.is_ok(), "SYNC_REPLAY_PERMITS=2^62 panics");
        assert!(
            Admission::new(16, 8).size() < 8,
            "16 permits over a pool of 8"
        );
    }
}
