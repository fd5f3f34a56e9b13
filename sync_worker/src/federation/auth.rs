//! The link's mutual challenge-response: HMAC-SHA256 over a direction tag, both node ids and
//! both nonces. Each side's MAC has its own tag, so neither can be reflected back as the
//! other's; S's nonce is fresh per connection, so nothing recorded can be replayed.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Tag of the receiver's MAC (R proves itself to S).
pub const RECEIVER_TAG: &str = "pg_sync-fed-v1 receiver";
/// Tag of the sender's MAC (S proves itself to R).
pub const SENDER_TAG: &str = "pg_sync-fed-v1 sender";

pub const NONCE_BYTES: usize = 32;

/// A fresh random nonce, hex.
pub fn nonce() -> String {
    let mut b = [0u8; NONCE_BYTES];
    getrandom::getrandom(&mut b).expect("the OS random source works");
    hex(&b)
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn keyed(secret: &str, tag: &str, receiver: &str, sender: &str, sn: &str, rn: &str) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    // Length-prefixed fields: no two different tuples hash the same bytes.
    for field in [tag, receiver, sender, sn, rn] {
        m.update(&(field.len() as u32).to_be_bytes());
        m.update(field.as_bytes());
    }
    m
}

/// The MAC, hex: `HMAC-SHA256(secret, tag, R, S, S's nonce, R's nonce)`.
pub fn mac(secret: &str, tag: &str, receiver: &str, sender: &str, sn: &str, rn: &str) -> String {
    hex(&keyed(secret, tag, receiver, sender, sn, rn)
        .finalize()
        .into_bytes())
}

/// Whether `given` (hex) is the MAC under `secret`; compared in constant time.
pub fn verify(
    secret: &str,
    tag: &str,
    receiver: &str,
    sender: &str,
    sn: &str,
    rn: &str,
    given: &str,
) -> bool {
    match unhex(given) {
        Some(bytes) => keyed(secret, tag, receiver, sender, sn, rn)
            .verify_slice(&bytes)
            .is_ok(),
        None => false,
    }
}

/// A nonce is well formed: hex of `NONCE_BYTES` bytes (a short one would weaken freshness).
pub fn valid_nonce(n: &str) -> bool {
    unhex(n).is_some_and(|b| b.len() == NONCE_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_verify_only_with_the_same_secret_tag_ids_and_nonces() {
        let (sn, rn) = (nonce(), nonce());
        assert!(valid_nonce(&sn) && sn != rn);
        const SECRET: &str = "s3cret-s3cret-16";
        let m = mac(SECRET, RECEIVER_TAG, "b", "a", &sn, &rn);
        // `m` checked with the receiver id, sender id and challenge nonce of the call.
        let verifies = |secret, tag, (receiver, sender), sn: &str, given: &str| {
            verify(secret, tag, receiver, sender, sn, &rn, given)
        };
        assert!(verifies(SECRET, RECEIVER_TAG, ("b", "a"), &sn, &m));
        assert!(!verifies(
            "other-secret-16!",
            RECEIVER_TAG,
            ("b", "a"),
            &sn,
            &m
        ));
        // Reflected as the sender's MAC, swapped ids, another challenge: all refused.
        assert!(!verifies(SECRET, SENDER_TAG, ("b", "a"), &sn, &m));
        assert!(!verifies(SECRET, RECEIVER_TAG, ("a", "b"), &sn, &m));
        assert!(!verifies(SECRET, RECEIVER_TAG, ("b", "a"), &nonce(), &m));
        assert!(!verifies(SECRET, RECEIVER_TAG, ("b", "a"), &sn, "zz"));
        // Field boundaries matter: ("ab","c") is not ("a","bc").
        assert_ne!(
            mac("k", RECEIVER_TAG, "ab", "c", &sn, &rn),
            mac("k", RECEIVER_TAG, "a", "bc", &sn, &rn)
        );
    }

    #[test]
    fn known_vector() {
        // Pins the byte layout (so both ends of a mixed-version link agree): computed
        // independently with Python's hmac over u32-BE length-prefixed fields.
        assert_eq!(
            mac("key", RECEIVER_TAG, "r", "s", "00", "11"),
            "f14f69132e7a4d5f839f6ba8925a067171d203282ea05605490e703b222c273b"
        );
        assert!(!valid_nonce("00"));
    }
}
