//! The penalty box: a user whose WebSocket session was closed for malformed messages (4400)
//! opens no other WebSocket session for `SYNC_BAD_CLIENT_PENALTY_SECS`: its upgrades are
//! refused with 429 `busy` and a `Retry-After` of the time left. Without it, a client that
//! floods bad frames and reconnects at once makes the worker pay, tens of times a second, a
//! handshake, a session and a load of the user's groups from the database; refused, a
//! reconnect costs the credential check alone. Other users are not affected, nor the user's
//! sessions already open, nor the user's HTTP requests.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Users boxed at once at most; past it, expired entries are dropped, and if all are still
/// boxed, a new one is not (the box must not become a way to grow the worker's memory).
const MAX_USERS: usize = 65_536;

pub struct Penalties {
    penalty: Duration,
    until: Mutex<HashMap<String, Instant>>,
}

impl Penalties {
    /// Boxes for `secs` seconds (0: never).
    pub fn new(secs: u64) -> Penalties {
        Penalties {
            penalty: Duration::from_secs(secs),
            until: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.until.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `user`'s session was closed for malformed messages: boxed from now on.
    pub fn punish(&self, user: &str) {
        if self.penalty.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut until = self.lock();
        if until.len() >= MAX_USERS {
            until.retain(|_, t| *t > now);
        }
        if until.len() < MAX_USERS || until.contains_key(user) {
            until.insert(user.to_owned(), now + self.penalty);
        }
    }

    /// How long `user` stays boxed, if it is.
    pub fn left(&self, user: &str) -> Option<Duration> {
        let mut until = self.lock();
        let t = *until.get(user)?;
        let now = Instant::now();
        if t > now {
            return Some(t - now);
        }
        until.remove(user);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::{Penalties, MAX_USERS};
    use std::time::Duration;

    #[test]
    fn a_punished_user_is_boxed_for_the_penalty_and_no_one_else_is() {
        let p = Penalties::new(10);
        assert_eq!(p.left("mallory"), None);
        p.punish("mallory");
        let left = p.left("mallory").expect("boxed");
        assert!(left > Duration::from_secs(9) && left <= Duration::from_secs(10));
        assert_eq!(p.left("alice"), None);
    }

    #[test]
    fn zero_boxes_no_one_and_an_expired_box_is_forgotten() {
        let never = Penalties::new(0);
        never.punish("mallory");
        assert_eq!(never.left("mallory"), None);
        let p = Penalties::new(10);
        p.lock().insert(
            "mallory".into(),
            std::time::Instant::now() - Duration::from_secs(1),
        );
        assert_eq!(p.left("mallory"), None);
        assert!(p.lock().is_empty());
    }

    /// The box is bounded: past `MAX_USERS` boxed at once, a new user is not boxed (one
    /// already boxed is boxed again), and expired entries make room.
    #[test]
    fn the_box_never_holds_more_than_its_bound() {
        let p = Penalties::new(10);
        for i in 0..MAX_USERS {
            p.punish(&format!("u{i}"));
        }
        p.punish("one too many");
        assert_eq!(p.lock().len(), MAX_USERS);
        assert_eq!(p.left("one too many"), None);
        p.punish("u0");
        assert!(p.left("u0").is_some());
        for t in p.lock().values_mut() {
            *t = std::time::Instant::now() - Duration::from_secs(1);
        }
        p.punish("one too many");
        assert!(p.left("one too many").is_some());
        assert_eq!(p.lock().len(), 1);
    }
}
