//! Client authentication: a bearer JWT (HS256 secret or RS256 public key) whose `sub` is the
//! user id, checked for `exp`, `nbf` and (when configured) `aud` and `iss`. Tokens are never
//! logged; failures say only why in general terms.

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

/// API keys the database said it does not know, remembered for a while so that repeating a
/// bad key costs no query. Bounded: when full, expired entries go, then everything. Distinct
/// bad keys are bounded too: a lookup may start only while the budget has a token, and only a
/// lookup that finds nothing spends one, so unknown keys cost at most UNKNOWN_LOOKUP_BURST
/// (plus the lookups in flight) queries at once and UNKNOWN_LOOKUP_RATE a second however many
/// a flood brings, while valid keys never use the budget up: many clients connecting at once
/// (after a worker restart) all get in. Lookups in flight are capped by LOOKUPS_IN_FLIGHT.
pub struct UnknownKeys {
    seen: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
    /// Lookup tokens left and when they were counted (`None`: a full bucket).
    budget: std::sync::Mutex<Option<(f64, std::time::Instant)>>,
    in_flight: tokio::sync::Semaphore,
}

impl Default for UnknownKeys {
    fn default() -> Self {
        UnknownKeys {
            seen: Default::default(),
            budget: Default::default(),
            in_flight: tokio::sync::Semaphore::new(LOOKUPS_IN_FLIGHT),
        }
    }
}

const UNKNOWN_KEYS_MAX: usize = 10_000;
const UNKNOWN_KEY_TTL: Duration = Duration::from_secs(60);
const UNKNOWN_LOOKUP_BURST: f64 = 5.0;
const UNKNOWN_LOOKUP_RATE: f64 = 1.0;
const LOOKUPS_IN_FLIGHT: usize = 16;

impl UnknownKeys {
    /// The budget's tokens now (refilled at UNKNOWN_LOOKUP_RATE up to the burst), under its lock.
    fn tokens(budget: &mut Option<(f64, std::time::Instant)>, now: std::time::Instant) -> f64 {
        let (left, at) = budget.unwrap_or((UNKNOWN_LOOKUP_BURST, now));
        (left + now.duration_since(at).as_secs_f64() * UNKNOWN_LOOKUP_RATE)
            .min(UNKNOWN_LOOKUP_BURST)
    }

    /// A lookup may start: the budget has a token and one of the LOOKUPS_IN_FLIGHT slots is
    /// free (waited for). `None`: the budget is spent (the caller refuses without a query,
    /// asking to retry later). The slot is held until the returned permit drops.
    pub async fn begin_lookup(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        let has_token = || {
            let mut budget = self.budget.lock().unwrap_or_else(|p| p.into_inner());
            Self::tokens(&mut budget, std::time::Instant::now()) >= 1.0
        };
        if !has_token() {
            return None;
        }
        let permit = self.in_flight.acquire().await.ok()?;
        // Checked again: unknown keys may have spent the budget while this one waited.
        has_token().then_some(permit)
    }

    /// A lookup found nothing: it spends a token (never below zero, so a flood that ends
    /// leaves a budget that refills within a second or so).
    pub fn spend_lookup(&self) {
        let mut budget = self.budget.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        let left = Self::tokens(&mut budget, now);
        *budget = Some(((left - 1.0).max(0.0), now));
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

    /// Review rev13b: unknown keys arriving together (each lookup starts before any returns)
    /// may start at most the burst, and after one second's refill about one more. The budget is
    /// checked at the start and spent at the end (clamped at zero), so every lookup that starts
    /// before the first returns passes: LOOKUPS_IN_FLIGHT per refill.
    #[tokio::test]
    async fn unknown_keys_arriving_together_start_at_most_the_burst() {
        let keys = UnknownKeys::default();
        let mut started = 0;
        for round in 0..2 {
            if round > 0 {
                // One token back.
                tokio::time::sleep(Duration::from_millis(1050)).await;
            }
            let held: Vec<_> =
                futures::future::join_all((0..LOOKUPS_IN_FLIGHT).map(|_| keys.begin_lookup()))
                    .await;
            let n = held.iter().filter(|p| p.is_some()).count();
            // Each found nothing.
            for _ in 0..n {
                keys.spend_lookup();
            }
            started += n;
        }
        assert!(
            started <= UNKNOWN_LOOKUP_BURST as usize + 1,
            "{started} lookups of unknown keys started (burst {UNKNOWN_LOOKUP_BURST}, then 1 a second)"
        );
    }

    #[tokio::test]
    async fn unknown_key_lookups_are_bounded_and_found_keys_spend_nothing() {
        let keys = UnknownKeys::default();
        // Found keys (no spend): any number, one after another or LOOKUPS_IN_FLIGHT at once.
        let held: Vec<_> =
            futures::future::join_all((0..LOOKUPS_IN_FLIGHT).map(|_| keys.begin_lookup())).await;
        assert!(
            held.iter().all(Option::is_some),
            "valid keys connecting at once all look up"
        );
        drop(held);
        for _ in 0..3 * UNKNOWN_LOOKUP_BURST as usize {
            assert!(
                keys.begin_lookup().await.is_some(),
                "a found key spends nothing"
            );
        }
        // Unknown keys spend the burst, then lookups are refused until it refills.
        for _ in 0..UNKNOWN_LOOKUP_BURST as usize {
            assert!(keys.begin_lookup().await.is_some());
            keys.spend_lookup();
        }
        assert!(keys.begin_lookup().await.is_none(), "the burst is spent");
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
