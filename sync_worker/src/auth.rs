//! Client authentication: a bearer JWT (HS256 secret or RS256 public key) whose `sub` is the
//! user id. Tokens are never logged; failures say only why in general terms.

use jsonwebtoken::{decode, Algorithm, DecodingKey, Validation};
use serde::Deserialize;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AuthError {
    #[error("missing bearer token")]
    Missing,
    #[error("token expired")]
    Expired,
    #[error("invalid token")]
    Invalid,
}

impl AuthError {
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing_token",
            AuthError::Expired => "token_expired",
            AuthError::Invalid => "invalid_token",
        }
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
}

pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl Verifier {
    pub fn hs256(secret: &[u8]) -> Verifier {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 5;
        Verifier {
            key: DecodingKey::from_secret(secret),
            validation,
        }
    }

    pub fn rs256(pem: &[u8]) -> anyhow::Result<Verifier> {
        let mut validation = Validation::new(Algorithm::RS256);
        validation.leeway = 5;
        Ok(Verifier {
            key: DecodingKey::from_rsa_pem(pem)?,
            validation,
        })
    }

    /// The user id of a valid token.
    pub fn verify(&self, token: &str) -> Result<String, AuthError> {
        match decode::<Claims>(token, &self.key, &self.validation) {
            Ok(data) if !data.claims.sub.is_empty() && data.claims.sub.len() <= 256 => {
                Ok(data.claims.sub)
            }
            Ok(_) => Err(AuthError::Invalid),
            Err(e) if matches!(e.kind(), jsonwebtoken::errors::ErrorKind::ExpiredSignature) => {
                Err(AuthError::Expired)
            }
            Err(_) => Err(AuthError::Invalid),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde::Serialize;

    #[derive(Serialize)]
    struct C<'a> {
        sub: &'a str,
        exp: u64,
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
        let v = Verifier::hs256(b"secret");
        assert_eq!(
            v.verify(&token(b"secret", "alice", now() + 60)),
            Ok("alice".into())
        );
        assert_eq!(
            v.verify(&token(b"other", "alice", now() + 60)),
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
