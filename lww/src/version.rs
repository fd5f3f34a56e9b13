//! LWW versions: a hybrid-logical-clock value paired with the node id that minted it.
//!
//! Text form: sixteen lowercase hex digits of the HLC, `@`, then the node id, e.g.
//! `0193a8f2c4d10003@eu-west`. Because the HLC part has a fixed width, comparing two version
//! strings byte by byte gives the same order as comparing (hlc, node id) pairs, so SQL can order
//! versions with plain text comparison. The empty string is the "zero" version, below all others.

use std::cmp::Ordering;
use std::fmt;

/// The widest node id we accept, in bytes.
pub const MAX_NODE_ID_LEN: usize = 63;

/// Bits of an HLC value that hold the logical counter; the rest hold unix milliseconds.
pub const COUNTER_BITS: u32 = 16;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Version {
    pub hlc: u64,
    pub node: String,
}

impl Version {
    pub fn new(hlc: u64, node: &str) -> Self {
        Version {
            hlc,
            node: node.to_owned(),
        }
    }

    /// Parses the text form. Returns a short reason on failure (no input echoed back).
    pub fn parse(s: &str) -> Result<Version, &'static str> {
        let (hlc, node) = s
            .split_once('@')
            .ok_or("missing '@' between clock and node id")?;
        if hlc.len() != 16
            || !hlc
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        {
            return Err("clock part must be 16 lowercase hex digits");
        }
        validate_node_id(node)?;
        let hlc = u64::from_str_radix(hlc, 16).map_err(|_| "clock part is not hex")?;
        Ok(Version {
            hlc,
            node: node.to_owned(),
        })
    }

    /// Unix milliseconds of the physical part.
    pub fn physical_ms(&self) -> u64 {
        self.hlc >> COUNTER_BITS
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}@{}", self.hlc, self.node)
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        self.hlc
            .cmp(&other.hlc)
            .then_with(|| self.node.as_bytes().cmp(other.node.as_bytes()))
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Node ids are short identifiers: letters, digits, `_`, `-`, `.` and `:`.
pub fn validate_node_id(node: &str) -> Result<(), &'static str> {
    if node.is_empty() {
        return Err("node id is empty");
    }
    if node.len() > MAX_NODE_ID_LEN {
        return Err("node id is longer than 63 bytes");
    }
    if !node
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
    {
        return Err("node id may only hold letters, digits, '_', '-', '.' and ':'");
    }
    Ok(())
}

/// Compares two version strings that are either empty (zero) or valid text forms.
pub fn cmp_text(a: &str, b: &str) -> Ordering {
    // Fixed-width clock part makes the byte order the version order; see the module docs.
    a.as_bytes().cmp(b.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trip_and_order_agree() {
        let a = Version::new(0x0193_a8f2_c4d1_0003, "a");
        let b = Version::new(0x0193_a8f2_c4d1_0003, "b");
        let c = Version::new(0x0193_a8f2_c4d1_0004, "a");
        for v in [&a, &b, &c] {
            assert_eq!(&Version::parse(&v.to_string()).unwrap(), v);
        }
        assert!(a < b && b < c);
        assert_eq!(cmp_text(&a.to_string(), &b.to_string()), Ordering::Less);
        assert_eq!(cmp_text(&b.to_string(), &c.to_string()), Ordering::Less);
        assert_eq!(cmp_text("", &a.to_string()), Ordering::Less);
    }

    #[test]
    fn tie_breaks_by_node_bytes() {
        let x = Version::new(7, "node-10");
        let y = Version::new(7, "node-9");
        assert!(x < y, "byte order, not numeric order");
        assert_eq!(x.cmp(&y), cmp_text(&x.to_string(), &y.to_string()));
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "abc",
            "0193a8f2c4d10003",
            "0193A8F2C4D10003@a",
            "193a8f2c4d10003@a",
            "0193a8f2c4d10003@",
            "0193a8f2c4d10003@a b",
            "0193a8f2c4d1000g@a",
        ] {
            assert!(Version::parse(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(validate_node_id(&"x".repeat(64)).is_err());
        assert!(validate_node_id("eu-west.1:a_b").is_ok());
    }
}
