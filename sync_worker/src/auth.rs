//! Client authentication: a bearer JWT (HS256 secret or RS256 public key) whose `sub` is the
//! user id, checked for `exp`, `nbf` and (when configured) `aud` and `iss`; and the API-key
//! caches: valid keys by hash (`KnownKeys`, kept current by the hub) and unknown keys with the
//! lookup budget (`UnknownKeys`). Tokens and key hashes are never logged; failures say only
//! why in general terms.

use jsonwebtoken::{decode, Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AuthError {
    #[error("missing bearer token")]
    Missing,
    #[error("token expired")]
    Expired,
    #[error("token not valid yet (nbf)")]
    NotYetValid,
    #[error("invalid token")]
    Invalid,
}

impl AuthError {
    pub fn code(&self) -> crate::protocol::ErrorCode {
        use crate::protocol::ErrorCode;
        match self {
            AuthError::Missing => ErrorCode::MissingToken,
            AuthError::Expired => ErrorCode::TokenExpired,
            AuthError::Invalid | AuthError::NotYetValid => ErrorCode::InvalidToken,
        }
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
}

/// The claims a deployment may pin (`SYNC_JWT_AUDIENCE`, `SYNC_JWT_ISSUER`): when set, a token
/// must carry it.
#[derive(Debug, Clone, Default)]
pub struct Expect {
    pub audience: Option<String>,
    pub issuer: Option<String>,
}

/// Seconds of clock skew tolerated on `exp` and `nbf`.
const LEEWAY: u64 = 5;

/// A verified token: who, and until when the session it opens may last.
#[derive(Debug, PartialEq)]
pub struct Verified {
    pub user: String,
    pub expires: SystemTime,
}

pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

fn validation(alg: Algorithm, expect: &Expect) -> Validation {
    let mut v = Validation::new(alg);
    v.leeway = LEEWAY;
    v.validate_nbf = true;
    if let Some(aud) = &expect.audience {
        v.set_audience(&[aud]);
        v.required_spec_claims.insert("aud".into());
    }
    if let Some(iss) = &expect.issuer {
        v.set_issuer(&[iss]);
        v.required_spec_claims.insert("iss".into());
    }
    v
}

impl Verifier {
    pub fn hs256(secret: &[u8], expect: &Expect) -> Verifier {
        Verifier {
            key: DecodingKey::from_secret(secret),
            validation: validation(Algorithm::HS256, expect),
        }
    }

    pub fn rs256(pem: &[u8], expect: &Expect) -> anyhow::Result<Verifier> {
        Ok(Verifier {
            key: DecodingKey::from_rsa_pem(pem)?,
            validation: validation(Algorithm::RS256, expect),
        })
    }

    /// The user id of a valid token, and when the token expires.
    pub fn verify(&self, token: &str) -> Result<Verified, AuthError> {
        use jsonwebtoken::errors::ErrorKind;
        match decode::<Claims>(token, &self.key, &self.validation) {
            Ok(data) if !data.claims.sub.is_empty() && data.claims.sub.len() <= 256 => {
                Ok(Verified {
                    user: data.claims.sub,
                    expires: UNIX_EPOCH
                        + Duration::from_secs(data.claims.exp.saturating_add(LEEWAY)),
                })
            }
            Ok(_) => Err(AuthError::Invalid),
            Err(e) if matches!(e.kind(), ErrorKind::ExpiredSignature) => Err(AuthError::Expired),
            Err(e) if matches!(e.kind(), ErrorKind::ImmatureSignature) => {
                Err(AuthError::NotYetValid)
            }
            Err(_) => Err(AuthError::Invalid),
        }
    }
}

/// Whether `token` has the shape of a key `pg_sync.create_api_key` makes (`pgs_` and 64
/// lowercase hex digits): anything else is refused without asking the database.
pub fn is_api_key_shaped(token: &str) -> bool {
    token.len() == 68
        && token.starts_with("pgs_")
        && token[4..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The hash `pg_sync.api_keys.key_hash` stores for `token` (SHA-256 of its UTF-8 bytes).
pub fn key_hash(token: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(token.as_bytes()).into()
}

/// An API key the database found: whose it is, and its row's id (its hash is the cache's key).
#[derive(Clone, Debug, PartialEq)]
pub struct KnownKey {
    pub user: String,
    /// `pg_sync.api_keys.id`.
    pub id: String,
}

/// When a key was checked (`KnownKeys::ticket`): a lookup may put what it read into the cache
/// only if nothing was revoked since it began.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket(u64);

/// Valid API keys, by hash, so a valid key needs no lookup (and so never waits behind the
/// budget for unknown keys). Kept current by the replication stream: the hub removes a key
/// when a transaction that deletes, truncates or re-points it is published, which is when the
/// key's live sessions are closed. So the cache answers only while this worker's replication
/// session is streaming with a publication that carries every revocation of a key (`trust`:
/// deletes, updates and truncations of `pg_sync.api_keys`, unfiltered, every column) and was
/// heard from lately (`heard`: a link that dies silently ends no session at once): a worker
/// that does not hold the slot (a second worker on the database) or whose stream is down or
/// silent sees no revocation, and looks every key up. Every revocation and every change of trust moves a
/// generation; a lookup takes a `Ticket` before its query and may insert only if the
/// generation has not moved since, so a revocation that commits and is published while a
/// lookup for the key is in flight cannot be overwritten by that lookup's stale "valid".
/// Bounded: past KNOWN_KEYS_MAX an arbitrary entry goes (it is looked up again when used).
pub struct KnownKeys {
    inner: std::sync::Mutex<Known>,
    /// When the replication stream was last heard from (milliseconds since `born`): a message
    /// on it, or a probe that found its walsender replied to lately. The memory answers only
    /// within KNOWN_KEYS_FRESH of it: a link that died silently sends no revocation, and its
    /// session may not end at once.
    born: std::time::Instant,
    heard_ms: std::sync::atomic::AtomicU64,
}

#[derive(Default)]
struct Known {
    generation: u64,
    trusted: bool,
    by_hash: std::collections::HashMap<[u8; 32], KnownKey>,
    /// Key id to hash: revocations name ids.
    by_id: std::collections::HashMap<String, [u8; 32]>,
}

impl Known {
    fn forget_all(&mut self) {
        self.generation += 1;
        self.by_hash = Default::default();
        self.by_id = Default::default();
    }
}

const KNOWN_KEYS_MAX: usize = 50_000;
/// How long after the stream was last heard from the memory still answers (the sequencer
/// probes it every second).
const KNOWN_KEYS_FRESH: Duration = Duration::from_secs(5);

impl Default for KnownKeys {
    fn default() -> Self {
        KnownKeys {
            inner: std::sync::Mutex::new(Known::default()),
            born: std::time::Instant::now(),
            heard_ms: Default::default(),
        }
    }
}

impl KnownKeys {
    fn lock(&self) -> std::sync::MutexGuard<'_, Known> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The key with this hash, if it is known valid (never while untrusted), and the ticket of
    /// the answer.
    pub fn get(&self, hash: &[u8; 32]) -> (Option<KnownKey>, Ticket) {
        let fresh = self
            .now_ms()
            .saturating_sub(self.heard_ms.load(std::sync::atomic::Ordering::Acquire))
            <= KNOWN_KEYS_FRESH.as_millis() as u64;
        let known = self.lock();
        let key = (known.trusted && fresh)
            .then(|| known.by_hash.get(hash).cloned())
            .flatten();
        (key, Ticket(known.generation))
    }

    fn now_ms(&self) -> u64 {
        self.born.elapsed().as_millis() as u64
    }

    /// The replication stream was heard from just now (see `heard_ms`).
    pub fn heard(&self) {
        self.heard_ms
            .fetch_max(self.now_ms(), std::sync::atomic::Ordering::Release);
    }

    /// Taken before a lookup's query is sent.
    pub fn ticket(&self) -> Ticket {
        Ticket(self.lock().generation)
    }

    /// Whether nothing was revoked (and trust did not change) since `ticket`.
    pub fn unchanged_since(&self, ticket: Ticket) -> bool {
        self.lock().generation == ticket.0
    }

    /// Remembers a key the database found with a query sent after `ticket` was taken: only
    /// when trusted and nothing was revoked since (then what the query read is still true).
    pub fn insert(&self, ticket: Ticket, hash: [u8; 32], key: KnownKey) -> bool {
        let mut known = self.lock();
        if !known.trusted || known.generation != ticket.0 {
            return false;
        }
        if known.by_hash.len() >= KNOWN_KEYS_MAX && !known.by_hash.contains_key(&hash) {
            if let Some(old) = known.by_hash.keys().next().copied() {
                if let Some(gone) = known.by_hash.remove(&old) {
                    known.by_id.remove(&gone.id);
                }
            }
        }
        // A key id has one hash: an id seen with another one (re-hashed) drops the old entry.
        if let Some(prev) = known.by_id.insert(key.id.clone(), hash) {
            if prev != hash {
                known.by_hash.remove(&prev);
            }
        }
        known.by_hash.insert(hash, key);
        true
    }

    /// Keys revoked (deleted, re-pointed to another user or hash) by a published transaction.
    pub fn revoke<'a>(&self, ids: impl IntoIterator<Item = &'a str>) {
        let mut known = self.lock();
        known.generation += 1;
        for id in ids {
            if let Some(hash) = known.by_id.remove(id) {
                known.by_hash.remove(&hash);
            }
        }
    }

    /// Every key revoked (the table was truncated).
    pub fn revoke_all(&self) {
        self.lock().forget_all();
    }

    /// Whether revocations reach this cache from now on (the replication session is
    /// streaming and follows `pg_sync.api_keys`). Either way it starts empty: what it held
    /// was kept current by a stream that is gone, or by none.
    pub fn trust(&self, trusted: bool) {
        let mut known = self.lock();
        if known.trusted == trusted && !trusted {
            return;
        }
        known.forget_all();
        known.trusted = trusted;
        drop(known);
        if trusted {
            self.heard();
        }
    }

    /// Keys held (for tests and metrics).
    pub fn len(&self) -> usize {
        self.lock().by_hash.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// API keys the database said it does not know, remembered for a while so that repeating a
/// bad key costs no query. Bounded: when full, expired entries go, then everything. Distinct
/// bad keys are bounded too: every lookup takes a token from a bucket (a burst of
/// UNKNOWN_LOOKUP_BURST, refilled at UNKNOWN_LOOKUP_RATE a second) before it runs, and only a
/// key found gives its token back, so unknown keys cost at most that many queries however many
/// a flood brings, and at most UNKNOWN_LOOKUP_BURST lookups hold a pool connection at once.
/// A lookup that finds no token while others run waits (up to LOOKUP_WAIT) for them to end:
/// found keys give theirs back within a query's time, so many valid keys connecting at once
/// (a worker restart) all get in. With none running, it is refused at once.
pub struct UnknownKeys {
    seen: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
    /// Lookup tokens left and when they were counted (`None`: a full bucket), and the lookups
    /// running.
    budget: std::sync::Mutex<(Option<(f64, std::time::Instant)>, usize)>,
    /// Woken when a lookup ends.
    ended: tokio::sync::Notify,
}

impl Default for UnknownKeys {
    fn default() -> Self {
        UnknownKeys {
            seen: Default::default(),
            budget: Default::default(),
            ended: tokio::sync::Notify::new(),
        }
    }
}

const UNKNOWN_KEYS_MAX: usize = 10_000;
const UNKNOWN_KEY_TTL: Duration = Duration::from_secs(60);
const UNKNOWN_LOOKUP_BURST: f64 = 5.0;
const UNKNOWN_LOOKUP_RATE: f64 = 1.0;
const LOOKUP_WAIT: Duration = Duration::from_secs(2);

/// A running lookup (its token taken). Dropped without `found`, its token stays spent (an
/// unknown key, or a request that went away); it always wakes the lookups waiting for a token.
pub struct Lookup<'a> {
    keys: &'a UnknownKeys,
    found: bool,
}

impl Lookup<'_> {
    /// The key was found (or no query was sent: no pool connection): its token goes back.
    pub fn found(mut self) {
        self.found = true;
    }
}

impl Drop for Lookup<'_> {
    fn drop(&mut self) {
        {
            let mut budget = self.keys.budget.lock().unwrap_or_else(|p| p.into_inner());
            budget.1 -= 1;
            if self.found {
                if let Some((left, _)) = budget.0.as_mut() {
                    *left = (*left + 1.0).min(UNKNOWN_LOOKUP_BURST);
                }
            }
        }
        self.keys.ended.notify_waiters();
    }
}

/// What `try_take` saw.
enum Take {
    Taken,
    /// No token, and this many lookups running.
    Empty(usize),
}

impl UnknownKeys {
    /// Takes a lookup token if there is one.
    fn try_take(&self) -> Take {
        let mut budget = self.budget.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        let (left, at) = budget.0.unwrap_or((UNKNOWN_LOOKUP_BURST, now));
        let left = (left + now.duration_since(at).as_secs_f64() * UNKNOWN_LOOKUP_RATE)
            .min(UNKNOWN_LOOKUP_BURST);
        // Tokens held by running lookups do not count against the burst's cap, so the running
        // lookups are capped too: slow queries must not let refills add up to a pool's worth.
        if left < 1.0 || budget.1 >= UNKNOWN_LOOKUP_BURST as usize {
            budget.0 = Some((left, now));
            return Take::Empty(budget.1);
        }
        budget.0 = Some((left - 1.0, now));
        budget.1 += 1;
        Take::Taken
    }

    /// Starts a lookup: takes a token, waiting while other lookups run (one may give its token
    /// back), up to LOOKUP_WAIT. `None`: no token (the caller refuses without a query, asking
    /// to retry later).
    pub async fn begin_lookup(&self) -> Option<Lookup<'_>> {
        let deadline = tokio::time::Instant::now() + LOOKUP_WAIT;
        loop {
            // Registered before the check, so a lookup ending in between is not missed.
            let ended = self.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            match self.try_take() {
                Take::Taken => {
                    return Some(Lookup {
                        keys: self,
                        found: false,
                    })
                }
                Take::Empty(0) => return None,
                Take::Empty(_) => {}
            }
            // Woken by a lookup's end, or to look again as the bucket refills.
            let wake = deadline.min(tokio::time::Instant::now() + Duration::from_millis(250));
            if tokio::time::timeout_at(wake, ended).await.is_err()
                && tokio::time::Instant::now() >= deadline
            {
                return None;
            }
        }
    }

    pub fn contains(&self, key: &str) -> bool {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.get(key)
            .is_some_and(|at| at.elapsed() < UNKNOWN_KEY_TTL)
    }

    pub fn insert(&self, key: &str) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() >= UNKNOWN_KEYS_MAX {
            seen.retain(|_, at| at.elapsed() < UNKNOWN_KEY_TTL);
            if seen.len() >= UNKNOWN_KEYS_MAX {
                seen.clear();
            }
        }
        seen.insert(key.to_owned(), std::time::Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde::Serialize;

    /// Review rev13b: unknown keys arriving together (each lookup starting before any
    /// returns) start at most the burst plus what refills while they wait: a token is taken
    /// when a lookup starts, not when it ends.
    #[tokio::test]
    async fn unknown_keys_arriving_together_start_at_most_the_burst() {
        let keys = UnknownKeys::default();
        let began = std::time::Instant::now();
        let started = futures::future::join_all((0..32).map(|_| async {
            let lookup = keys.begin_lookup().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
            lookup.is_some() // dropped unfound: an unknown key
        }))
        .await
        .into_iter()
        .filter(|&ok| ok)
        .count();
        let allowed = UNKNOWN_LOOKUP_BURST as usize + began.elapsed().as_secs_f64().ceil() as usize;
        assert!(
            started <= allowed,
            "{started} lookups of unknown keys started in {:?} (burst {UNKNOWN_LOOKUP_BURST}, then 1 a second: {allowed})",
            began.elapsed()
        );
    }

    #[tokio::test]
    async fn unknown_key_lookups_are_bounded_and_found_keys_give_theirs_back() {
        let keys = UnknownKeys::default();
        // Valid keys arriving together (each found after a short query) all get a token,
        // though there are more of them than the burst.
        let found = futures::future::join_all((0..24).map(|_| async {
            let lookup = keys.begin_lookup().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
            lookup.map(Lookup::found).is_some()
        }))
        .await;
        assert!(
            found.iter().all(|&ok| ok),
            "valid keys connecting at once all look up"
        );
        // Unknown keys one after another: the burst, then refused at once (none running).
        for _ in 0..UNKNOWN_LOOKUP_BURST as usize {
            assert!(keys.begin_lookup().await.is_some());
        }
        let t = std::time::Instant::now();
        assert!(keys.begin_lookup().await.is_none(), "the burst is spent");
        assert!(
            t.elapsed() < Duration::from_millis(100),
            "refused without waiting"
        );
    }

    /// Review rev13d: slow lookups (a locked table, a busy pool) must not add up, refill after
    /// refill, to more than the burst running at once.
    #[tokio::test]
    async fn slow_lookups_never_run_more_than_the_burst_at_once() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        let keys = std::sync::Arc::new(UnknownKeys::default());
        let running = std::sync::Arc::new(AtomicUsize::new(0));
        let most = std::sync::Arc::new(AtomicUsize::new(0));
        // Requests arriving every 100 ms for 3.5 s, each lookup taking 3 s.
        let mut tasks = Vec::new();
        for _ in 0..35 {
            let (keys, running, most) = (keys.clone(), running.clone(), most.clone());
            tasks.push(tokio::spawn(async move {
                if let Some(lookup) = keys.begin_lookup().await {
                    most.fetch_max(running.fetch_add(1, SeqCst) + 1, SeqCst);
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    running.fetch_sub(1, SeqCst);
                    drop(lookup);
                }
            }));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for t in tasks {
            t.await.unwrap();
        }
        let most = most.load(SeqCst);
        assert!(
            most <= UNKNOWN_LOOKUP_BURST as usize,
            "{most} lookups ran at once"
        );
    }

    fn known(user: &str, id: &str) -> KnownKey {
        KnownKey {
            user: user.into(),
            id: id.into(),
        }
    }

    /// A valid key is remembered only while revocations reach the cache, and a revocation
    /// published while a lookup was in flight keeps that lookup's stale "valid" out.
    #[test]
    fn known_keys_are_trusted_only_while_followed_and_revocations_win_over_lookups() {
        let keys = KnownKeys::default();
        let (h1, h2) = (key_hash("pgs_1"), key_hash("pgs_2"));
        // Untrusted (no stream): nothing is remembered.
        assert!(!keys.insert(keys.ticket(), h1, known("alice", "k1")));
        keys.trust(true);
        assert!(keys.insert(keys.ticket(), h1, known("alice", "k1")));
        assert_eq!(keys.get(&h1).0, Some(known("alice", "k1")));
        // A lookup of k2 in flight while k1 (any key) is revoked: its answer is not kept.
        let before = keys.ticket();
        keys.revoke(["k1"]);
        assert_eq!(keys.get(&h1).0, None, "a revoked key is gone at once");
        assert!(
            !keys.insert(before, h1, known("alice", "k1")),
            "stale lookup"
        );
        assert!(!keys.unchanged_since(before));
        assert!(keys.insert(keys.ticket(), h2, known("bob", "k2")));
        // A re-hashed id drops its old hash.
        let h3 = key_hash("pgs_3");
        assert!(keys.insert(keys.ticket(), h3, known("bob", "k2")));
        assert_eq!(keys.get(&h2).0, None);
        // Truncation, and a stream that ends, forget everything; an untrusted cache answers
        // nothing.
        let t = keys.ticket();
        keys.revoke_all();
        assert!(keys.is_empty());
        assert!(!keys.insert(t, h1, known("alice", "k1")));
        assert!(keys.insert(keys.ticket(), h1, known("alice", "k1")));
        keys.trust(false);
        assert_eq!(keys.get(&h1).0, None);
        assert!(!keys.insert(keys.ticket(), h1, known("alice", "k1")));
        // Bounded.
        keys.trust(true);
        for i in 0..KNOWN_KEYS_MAX + 10 {
            keys.insert(
                keys.ticket(),
                key_hash(&format!("pgs_{i}")),
                known("u", &format!("id{i}")),
            );
        }
        assert_eq!(keys.len(), KNOWN_KEYS_MAX);
        assert_eq!(keys.lock().by_id.len(), KNOWN_KEYS_MAX);
    }

    #[test]
    fn key_hash_is_what_the_database_stores() {
        // = encode(sha256(convert_to('pgs_abc', 'UTF8')), 'hex') (sha256sum agrees)
        let hex: String = key_hash("pgs_abc")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            hex,
            "e762db1435da2d1bf0ae00935b20e1db3e216118900d9c8730a170bb70b42f50"
        );
    }

    #[derive(Serialize)]
    struct C<'a> {
        sub: &'a str,
        exp: u64,
    }

    #[derive(Serialize, Clone, Copy)]
    struct Full<'a> {
        sub: &'a str,
        exp: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        nbf: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        aud: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        iss: Option<&'a str>,
    }

    fn full(claims: &Full) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(b"secret"),
        )
        .unwrap()
    }

    #[test]
    fn nbf_aud_and_iss_are_enforced_and_exp_is_reported() {
        let plain = Verifier::hs256(b"secret", &Expect::default());
        let base = Full {
            sub: "alice",
            exp: now() + 60,
            nbf: None,
            aud: None,
            iss: None,
        };
        let early = Full {
            nbf: Some(now() + 600),
            ..base
        };
        assert_eq!(plain.verify(&full(&early)), Err(AuthError::NotYetValid));
        let ok = plain
            .verify(&full(&Full {
                nbf: Some(now() - 10),
                ..base
            }))
            .unwrap();
        assert_eq!(ok.user, "alice");
        let exp = ok.expires.duration_since(UNIX_EPOCH).unwrap().as_secs();
        assert!(exp >= now() + 60 && exp <= now() + 60 + LEEWAY + 1, "{exp}");

        let pinned = Verifier::hs256(
            b"secret",
            &Expect {
                audience: Some("sync".into()),
                issuer: Some("https://auth.example".into()),
            },
        );
        let good = Full {
            aud: Some("sync"),
            iss: Some("https://auth.example"),
            ..base
        };
        assert!(pinned.verify(&full(&good)).is_ok());
        for bad in [
            Full { aud: None, ..good },
            Full { iss: None, ..good },
            Full {
                aud: Some("other"),
                ..good
            },
            Full {
                iss: Some("https://evil.example"),
                ..good
            },
        ] {
            assert_eq!(pinned.verify(&full(&bad)), Err(AuthError::Invalid));
        }
    }

    #[test]
    fn api_key_shape_and_the_unknown_key_cache() {
        let key = format!("pgs_{}", "0123456789abcdef".repeat(4));
        assert!(is_api_key_shaped(&key));
        assert!(!is_api_key_shaped("pgs_"));
        assert!(!is_api_key_shaped(&key.to_uppercase()));
        assert!(!is_api_key_shaped(&format!("{key}0")));
        assert!(!is_api_key_shaped(&format!("pgs_{}", "g".repeat(64))));
        let unknown = UnknownKeys::default();
        assert!(!unknown.contains(&key));
        unknown.insert(&key);
        assert!(unknown.contains(&key));
        for i in 0..UNKNOWN_KEYS_MAX + 5 {
            unknown.insert(&format!("k{i}"));
        }
        assert!(unknown.seen.lock().unwrap().len() <= UNKNOWN_KEYS_MAX);
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn token(secret: &[u8], sub: &str, exp: u64) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &C { sub, exp },
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    #[test]
    fn accepts_valid_refuses_forged_expired_and_garbage() {
        let v = Verifier::hs256(b"secret", &Expect::default());
        assert_eq!(
            v.verify(&token(b"secret", "alice", now() + 60))
                .map(|v| v.user),
            Ok("alice".into())
        );
        assert_eq!(
            v.verify(&token(b"other", "alice", now() + 60))
                .map(|v| v.user),
            Err(AuthError::Invalid)
        );
        assert_eq!(
            v.verify(&token(b"secret", "alice", now() - 3600)),
            Err(AuthError::Expired)
        );
        assert_eq!(
            v.verify(&token(b"secret", "", now() + 60)),
            Err(AuthError::Invalid)
        );
        assert_eq!(v.verify("not.a.jwt"), Err(AuthError::Invalid));
        let none = format!("{}.{}.", "eyJhbGciOiJub25lIn0", "eyJzdWIiOiJhbGljZSJ9");
        assert_eq!(v.verify(&none), Err(AuthError::Invalid));
    }
}
