//! Differential tests (review rev14d): the issue 11 row encoder against the one it replaced
//! (`sync_worker/tests/oracle/row_json_old_29f6423.rs`, a copy of 29f6423's `row_json.rs`), over
//! edge cases and seeded random values. The claim under test: the output is byte-for-byte the old
//! encoder's for every value that can reach it.

use super::old;
use super::*;

/// splitmix64: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// A value of random magnitude (all digit counts equally likely-ish).
    fn wide(&mut self) -> u64 {
        let shift = self.below(64);
        self.next() >> shift
    }
}

/// What an encoder produced: its bytes, or that it panicked.
fn run(f: impl FnOnce(&mut Vec<u8>)) -> Result<Vec<u8>, String> {
    let mut out = b"prefix:".to_vec();
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut out)))
        .map(|()| out)
        .map_err(|e| {
            e.downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        })
}

fn show(r: &Result<Vec<u8>, String>) -> String {
    match r {
        Ok(b) => format!("{:?}", String::from_utf8_lossy(b)),
        Err(p) => format!("panic: {p}"),
    }
}

#[test]
fn differential_integers_match_the_old_encoder() {
    let mut values: Vec<i64> = vec![
        0,
        1,
        -1,
        9,
        10,
        -10,
        99,
        100,
        -100,
        i64::from(i16::MIN),
        i64::from(i16::MAX),
        i64::from(i32::MIN),
        i64::from(i32::MAX),
        i64::MIN,
        i64::MAX,
        i64::MIN + 1,
        i64::MAX - 1,
    ];
    for p in 0..19 {
        let t = 10i64.pow(p);
        values.extend([t - 1, t, t + 1, -t + 1, -t, -t - 1]);
    }
    let mut rng = Rng(0x5eed_0001);
    for _ in 0..300_000 {
        values.push(rng.wide() as i64);
    }
    let mut diffs = vec![];
    for v in values {
        let (a, b) = (run(|o| old::push_int(o, v)), run(|o| push_int(o, v)));
        if a != b || a.as_ref().ok().map(|o| &o[7..]) != Some(v.to_string().as_bytes()) {
            diffs.push(format!("{v}: old {} new {}", show(&a), show(&b)));
        }
    }
    for width in 1..=20 {
        for _ in 0..5_000 {
            let v = rng.wide();
            let (a, b) = (
                run(|o| old::push_padded(o, v, width)),
                run(|o| push_padded(o, v, width)),
            );
            if a != b {
                diffs.push(format!(
                    "{v} width {width}: old {} new {}",
                    show(&a),
                    show(&b)
                ));
            }
        }
        let (a, b) = (
            run(|o| old::push_padded(o, 0, width)),
            run(|o| push_padded(o, 0, width)),
        );
        if a != b {
            diffs.push(format!(
                "0 width {width}: old {} new {}",
                show(&a),
                show(&b)
            ));
        }
    }
    assert!(
        diffs.is_empty(),
        "{} differences: {:#?}",
        diffs.len(),
        &diffs[..diffs.len().min(20)]
    );
}

const KINDS: [Kind; 3] = [Kind::Date, Kind::Timestamp, Kind::TimestamptzUtc];
const DAY_US: i64 = 86_400_000_000;
/// Postgres' range: 4714-11-24 BC .. 5874897-12-31 (dates), .. 294276-12-31 (timestamps).
const PG_MIN_DAY: i64 = -2_451_545;
const PG_MAX_DATE: i64 = 2_147_483_494;
const PG_MIN_TS: i64 = -211_813_488_000_000_000;
const PG_END_TS: i64 = 9_223_371_331_200_000_000 - 1;

fn old_kind(k: Kind) -> old::Kind {
    match k {
        Kind::Date => old::Kind::Date,
        Kind::Timestamp => old::Kind::Timestamp,
        Kind::TimestamptzUtc => old::Kind::TimestamptzUtc,
        _ => unreachable!(),
    }
}

/// The wire form of `v` as a `kind` value (days for a date, microseconds otherwise).
fn raw(kind: Kind, v: i64) -> Vec<u8> {
    if kind == Kind::Date {
        (v as i32).to_be_bytes().to_vec()
    } else {
        v.to_be_bytes().to_vec()
    }
}

#[test]
fn differential_datetimes_match_the_old_encoder() {
    let mut days: Vec<i64> = vec![
        0,
        -1,
        1,
        PG_MIN_DAY,
        PG_MIN_DAY - 1,
        PG_MAX_DATE,
        i64::from(i32::MIN),
        i64::from(i32::MAX),
        i64::from(i32::MIN) + 1,
        i64::from(i32::MAX) - 1,
    ];
    // Around every year boundary with 4, 5, 6 and 7 digits, AD and BC (year 0 is 1 BC),
    // including where the new code switches from two pairs to `padded` (9999 / 10000).
    for y in [
        1i64, 0, -1, 99, 100, 999, 1000, 9998, 9999, 10_000, 10_001, 99_999, 100_000, 999_999,
        1_000_000, 5_874_897, -9998, -9999, -10_000, -10_001, -99_999, -100_000, -4713, -4714,
        -5_000_000,
    ] {
        // 2000-01-01 is day 0; 146097 days per 400 years.
        let d = (y - 2000) * 146_097 / 400;
        days.extend((-400..400).map(|k| d + k));
    }
    let mut rng = Rng(0x5eed_0002);
    for _ in 0..200_000 {
        days.push(PG_MIN_DAY + rng.below((PG_MAX_DATE - PG_MIN_DAY) as u64) as i64);
        days.push(rng.next() as i32 as i64);
    }
    let mut micros: Vec<i64> = vec![
        0,
        -1,
        1,
        999_999,
        1_000_000,
        DAY_US - 1,
        DAY_US,
        -DAY_US,
        PG_MIN_TS,
        PG_END_TS,
        i64::MIN + 1,
        i64::MAX - 1,
        i64::MIN,
        i64::MAX,
    ];
    for &d in &days {
        let base = d.saturating_mul(DAY_US);
        micros
            .extend([0, DAY_US - 1, 999_999, 500_000, 3_599_000_001].map(|o| base.wrapping_add(o)));
    }
    for _ in 0..300_000 {
        micros.push(PG_MIN_TS.wrapping_add(rng.below(PG_END_TS.abs_diff(PG_MIN_TS)) as i64));
        micros.push(rng.next() as i64);
        // every fraction length
        let f = 10i64.pow(rng.below(7) as u32);
        micros.push((rng.next() as i64 / 1_000_000) * 1_000_000 + f * rng.below(10) as i64);
    }
    let mut diffs = vec![];
    let mut longest = 0;
    let mut check = |kind: Kind, v: i64| {
        let r = raw(kind, v);
        let (a, b) = (
            run(|o| old::write_datetime(o, old_kind(kind), &r)),
            run(|o| write_datetime(o, kind, &r)),
        );
        if let Ok(b) = &b {
            longest = longest.max(b.len() - 7);
        }
        if a != b {
            diffs.push(format!("{kind:?} {v}: old {} new {}", show(&a), show(&b)));
        }
    };
    for &d in &days {
        check(Kind::Date, d);
    }
    for &us in &micros {
        for kind in &KINDS[1..] {
            check(*kind, us);
        }
    }
    assert!(
        diffs.is_empty(),
        "{} differences: {:#?}",
        diffs.len(),
        &diffs[..diffs.len().min(20)]
    );
    assert!(
        longest <= 48,
        "a value needed {longest} bytes of the 48-byte buffer"
    );
    eprintln!("longest datetime: {longest} bytes");
}

/// The old encoder's text: `row.get::<&str>` (UTF-8 checked; a failure panics in `Row::get`)
/// then `serde_json::to_writer`.
fn old_text(out: &mut Vec<u8>, raw: &[u8]) {
    let s = std::str::from_utf8(raw).expect("old encoder: Row::get::<&str> fails (panics)");
    serde_json::to_writer(&mut *out, s).expect("a string serializes");
}

fn random_string(rng: &mut Rng, len: usize) -> String {
    const SPECIAL: &[char] = &[
        '\u{0}',
        '\u{7f}',
        '\u{80}',
        '\u{9f}',
        '\u{a0}',
        '\u{ad}',
        '\u{2028}',
        '\u{2029}',
        '\u{feff}',
        '\u{fffd}',
        '\u{ffff}',
        '\u{10000}',
        '\u{1f600}',
        '\u{10ffff}',
        '\u{d7ff}',
        '\u{e000}',
        '"',
        '\\',
        '/',
        '\u{8}',
        '\u{c}',
        '\n',
        '\r',
        '\t',
        '\u{1b}',
        '\u{1f}',
    ];
    (0..len)
        .map(|_| match rng.below(6) {
            0 => char::from(rng.below(0x80) as u8),
            1 => char::from_u32(0x80 + rng.below(0x780) as u32).unwrap(),
            2 => char::from_u32(0x800 + rng.below(0xd800 - 0x800) as u32).unwrap(),
            3 => char::from_u32(0xe000 + rng.below(0x2000) as u32).unwrap(),
            4 => char::from_u32(0x10000 + rng.below(0x100000) as u32).unwrap(),
            _ => SPECIAL[rng.below(SPECIAL.len() as u64) as usize],
        })
        .collect()
}

#[test]
fn differential_strings_match_the_old_encoder() {
    let mut rng = Rng(0x5eed_0003);
    let mut inputs: Vec<String> = vec![
        String::new(),
        (0u8..=0x7f).map(char::from).collect(),
        "\"".repeat(10_000),
        "\\".repeat(10_000),
        "\u{1}".repeat(10_000),
        "x".repeat(1 << 20),
        "😀".repeat(1 << 16),
    ];
    for b in 0u8..=0x7f {
        inputs.push(char::from(b).to_string());
        inputs.push(format!("a{}b", char::from(b)));
    }
    for _ in 0..20_000 {
        let len = rng.below(64) as usize;
        inputs.push(random_string(&mut rng, len));
    }
    for _ in 0..50 {
        inputs.push(random_string(&mut rng, 100_000));
    }
    let mut diffs = vec![];
    for s in &inputs {
        let (a, b) = (
            run(|o| old_text(o, s.as_bytes())),
            run(|o| write_json_str(o, s.as_bytes())),
        );
        if a != b {
            diffs.push(format!(
                "{:?}: old {} new {}",
                s.chars().take(40).collect::<String>(),
                show(&a),
                show(&b)
            ));
        }
    }
    assert!(
        diffs.is_empty(),
        "{} differences: {:#?}",
        diffs.len(),
        &diffs[..diffs.len().min(20)]
    );
}

/// Byte strings that are not UTF-8 (a Latin-1 "café"; an encoded surrogate; an overlong NUL; a
/// cut 4-byte sequence) reach the encoder from a UTF-8 database holding corrupt text, which
/// Postgres sends to a UTF-8 client unchecked (e2e
/// `corrupt_text_breaks_the_bootstrap_off_and_writes_no_line_that_is_not_json`). The old encoder
/// refused them (`Row::get::<&str>`), and so does the new one's text reader (`Utf8`): a line
/// with them would not be JSON (RFC 8259 §8.1: JSON text is UTF-8). Valid text passes.
#[test]
fn invalid_utf8_text_is_refused_before_it_is_written() {
    use tokio_postgres::types::{FromSql, Type};
    let cases: [&[u8]; 6] = [
        b"caf\xe9",
        b"\xff",
        b"\xed\xa0\x80",
        b"\xc0\x80",
        b"\xf0\x9f\x98",
        b"ok\x80\"",
    ];
    for raw in cases {
        assert!(
            super::Utf8::from_sql(&Type::TEXT, raw).is_err(),
            "{raw:x?} was accepted"
        );
    }
    for ok in ["caf\u{e9}", "", "\u{10ffff}", "a\"b"] {
        assert!(
            super::Utf8::from_sql(&Type::TEXT, ok.as_bytes()).is_ok(),
            "{ok:?}"
        );
    }
}

#[test]
fn differential_numerics_and_column_keys_match_the_old_encoder() {
    let mut rng = Rng(0x5eed_0004);
    let mut inputs: Vec<String> = [
        "0",
        "-0",
        "0.000",
        "1.50",
        "NaN",
        "Infinity",
        "-Infinity",
        "nan",
        "infinity",
        "1e30",
        "-123456789012345678901234567890.1234567890123456789012345",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for _ in 0..10_000 {
        inputs.push(format!("{}.{}", rng.next() as i64, rng.next()));
    }
    for s in &inputs {
        let (a, b) = (
            run(|o| old::write_numeric(o, s)),
            run(|o| write_numeric(o, s.as_bytes())),
        );
        assert_eq!(a, b, "numeric {s}");
    }
    let mut names: Vec<String> = vec!["".into(), "we\"ird".into(), "é".into(), "a\\b\n".into()];
    for _ in 0..5_000 {
        let len = rng.below(20) as usize;
        names.push(random_string(&mut rng, len));
    }
    for n in names {
        let (a, b) = (
            old::Column::new(n.clone(), 25, true),
            Column::new(n.clone(), 25, true),
        );
        assert_eq!(format!(",{}", a.key_json), b.key_json, "column {n:?}");
    }
}
