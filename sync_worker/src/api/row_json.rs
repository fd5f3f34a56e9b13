//! Rows as JSON objects equal to Postgres' `to_jsonb(row)` (the form deltas carry), with the
//! cheap conversions done here instead of in the database backend: integers and booleans come
//! in binary, strings and numerics as text and are written here; every other type is still
//! rendered by `to_jsonb(column)`, so its form is exactly Postgres'.

use tokio_postgres::Row;

/// How a column is fetched and written.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    Int2,
    Int4,
    Int8,
    Bool,
    /// text, varchar, name, uuid: a JSON string of the text form.
    Text,
    /// numeric: a JSON number, or a string for NaN and the infinities (as `to_jsonb`).
    Numeric,
    /// jsonb: its text form is already JSON.
    Jsonb,
    /// date, timestamp, and timestamptz when the session's time zone is UTC: binary, written
    /// as `to_jsonb` does (XSD form).
    Date,
    Timestamp,
    TimestamptzUtc,
    /// anything else: `to_jsonb(column)` renders it.
    Other,
}

impl Kind {
    /// The kind of a column of type `type_oid`; `utc`: the session's time zone is UTC.
    pub fn of(type_oid: u32, utc: bool) -> Kind {
        match type_oid {
            1082 => Kind::Date,
            1114 => Kind::Timestamp,
            1184 if utc => Kind::TimestamptzUtc,
            21 => Kind::Int2,
            23 => Kind::Int4,
            20 => Kind::Int8,
            16 => Kind::Bool,
            25 | 1043 | 19 | 2950 => Kind::Text,
            1700 => Kind::Numeric,
            3802 => Kind::Jsonb,
            _ => Kind::Other,
        }
    }

    /// The select-list expression for the (quoted) column `col` of the row alias `t`.
    pub fn expr(self, col: &str) -> String {
        match self {
            Kind::Int2
            | Kind::Int4
            | Kind::Int8
            | Kind::Bool
            | Kind::Date
            | Kind::Timestamp
            | Kind::TimestamptzUtc => format!("t.{col}"),
            Kind::Text | Kind::Numeric | Kind::Jsonb => format!("t.{col}::text"),
            Kind::Other => format!("to_jsonb(t.{col})::text"),
        }
    }

    /// Whether the model id of a one-column key of this kind is this column's value as text.
    pub fn is_own_text(self) -> bool {
        matches!(self, Kind::Int2 | Kind::Int4 | Kind::Int8 | Kind::Text)
    }
}

pub struct Column {
    pub name: String,
    pub kind: Kind,
    /// `,"name":`, escaped once (the comma before it included: one copy per column).
    key_json: String,
}

impl Column {
    pub fn new(name: String, type_oid: u32, utc: bool) -> Column {
        let mut key_json = format!(
            ",{}",
            serde_json::to_string(&name).expect("a string serializes")
        );
        key_json.push(':');
        Column {
            kind: Kind::of(type_oid, utc),
            name,
            key_json,
        }
    }
}

/// The value of an integer column (`Int2`, `Int4`, `Int8`) widened to i64; `None` for NULL.
fn integer(kind: Kind, row: &Row, idx: usize) -> Option<i64> {
    match kind {
        Kind::Int2 => row.get::<_, Option<i16>>(idx).map(i64::from),
        Kind::Int4 => row.get::<_, Option<i32>>(idx).map(i64::from),
        _ => row.get::<_, Option<i64>>(idx),
    }
}

fn int(out: &mut Vec<u8>, v: Option<i64>) {
    match v {
        Some(v) => push_int(out, v),
        None => out.extend_from_slice(b"null"),
    }
}

/// "00".."99": two digits per table read (a bootstrap formats a few numbers per row, and digit
/// by digit with a copy each, they were a fifth of its CPU; issue 11).
const PAIRS: &[u8; 200] = b"0001020304050607080910111213141516171819\
2021222324252627282930313233343536373839\
4041424344454647484950515253545556575859\
6061626364656667686970717273747576777879\
8081828384858687888990919293949596979899";

/// A small stack buffer a value is formatted in before one copy into the output.
struct Scratch {
    b: [u8; 48],
    n: usize,
}

impl Scratch {
    fn new() -> Scratch {
        Scratch { b: [0; 48], n: 0 }
    }

    fn byte(&mut self, c: u8) {
        self.b[self.n] = c;
        self.n += 1;
    }

    /// Byte by byte: these are a few bytes, for which a `memcpy` call costs more.
    fn bytes(&mut self, s: &[u8]) {
        for &c in s {
            self.byte(c);
        }
    }

    /// Two digits of `v` (< 100).
    fn two(&mut self, v: u64) {
        let i = v as usize * 2;
        self.b[self.n] = PAIRS[i];
        self.b[self.n + 1] = PAIRS[i + 1];
        self.n += 2;
    }

    /// `v` in decimal, zero-padded to at least `width` digits (at most 20).
    fn padded(&mut self, mut v: u64, width: usize) {
        let mut digits = [b'0'; 20];
        let mut at = digits.len();
        while v >= 100 {
            let i = (v % 100) as usize * 2;
            v /= 100;
            at -= 2;
            digits[at] = PAIRS[i];
            digits[at + 1] = PAIRS[i + 1];
        }
        if v >= 10 {
            let i = v as usize * 2;
            at -= 2;
            digits[at] = PAIRS[i];
            digits[at + 1] = PAIRS[i + 1];
        } else if v > 0 {
            at -= 1;
            digits[at] = b'0' + v as u8;
        }
        self.bytes(&digits[at.min(digits.len() - width)..]);
    }

    /// Copies the formatted bytes to `out`: the whole buffer, then cut back to them. A copy of
    /// a fixed size is a few vector moves, while one of a length known only at run time is a
    /// `memcpy` call, which cost more than the formatting here (issue 11 profile).
    fn done(&self, out: &mut Vec<u8>) {
        let len = out.len() + self.n;
        out.extend_from_slice(&self.b);
        out.truncate(len);
    }
}

/// Appends `v` in decimal (as `{v}` would, without the formatting machinery: a bootstrap
/// writes a few of these per row).
fn push_int(out: &mut Vec<u8>, v: i64) {
    let mut s = Scratch::new();
    if v < 0 {
        s.byte(b'-');
    }
    s.padded(v.unsigned_abs(), 1);
    s.done(out);
}

/// Appends `v` in decimal, zero-padded to at least `width` digits.
#[cfg(test)]
fn push_padded(out: &mut Vec<u8>, v: u64, width: usize) {
    let mut s = Scratch::new();
    s.padded(v, width);
    s.done(out);
}

/// Writes `s` (text already checked to be UTF-8, see `Utf8`) as a JSON string, escaped exactly
/// as `serde_json` escapes (`\"`, `\\`, `\b`, `\f`, `\n`, `\r`, `\t`, other control characters as
/// `\u00xx`, nothing else): only these ASCII bytes are ever replaced.
pub fn write_json_str(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'"');
    let mut start = 0;
    for (i, &c) in s.iter().enumerate() {
        let escaped: &[u8] = match c {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0..=0x1f => {
                out.extend_from_slice(&s[start..i]);
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(&[
                    b'\\',
                    b'u',
                    b'0',
                    b'0',
                    HEX[usize::from(c >> 4)],
                    HEX[usize::from(c & 0xf)],
                ]);
                start = i + 1;
                continue;
            }
            _ => continue,
        };
        out.extend_from_slice(&s[start..i]);
        out.extend_from_slice(escaped);
        start = i + 1;
    }
    out.extend_from_slice(&s[start..]);
    out.push(b'"');
}

/// Writes the value of `row[idx]` (a column of kind `kind`) as JSON.
pub fn write_value(out: &mut Vec<u8>, kind: Kind, row: &Row, idx: usize) {
    match kind {
        Kind::Int2 | Kind::Int4 | Kind::Int8 => int(out, integer(kind, row, idx)),
        Kind::Bool => out.extend_from_slice(match row.get::<_, Option<bool>>(idx) {
            Some(true) => b"true",
            Some(false) => b"false",
            None => b"null",
        }),
        Kind::Text => match row.get::<_, Option<Utf8<'_>>>(idx) {
            Some(Utf8(s)) => write_json_str(out, s),
            None => out.extend_from_slice(b"null"),
        },
        Kind::Numeric => match row.get::<_, Option<Binary<'_>>>(idx) {
            Some(Binary(s)) => write_numeric(out, s),
            None => out.extend_from_slice(b"null"),
        },
        Kind::Date | Kind::Timestamp | Kind::TimestamptzUtc => {
            match row.get::<_, Option<Binary<'_>>>(idx) {
                Some(Binary(raw)) => write_datetime(out, kind, raw),
                None => out.extend_from_slice(b"null"),
            }
        }
        // Text forms that are JSON already (`::text` of jsonb, `to_jsonb(..)::text`).
        Kind::Jsonb | Kind::Other => match row.get::<_, Option<Utf8<'_>>>(idx) {
            Some(Utf8(s)) => out.extend_from_slice(s),
            None => out.extend_from_slice(b"null"),
        },
    }
}

/// A value's binary wire form, whatever its type.
struct Binary<'a>(&'a [u8]);

/// A text value's bytes, checked to be UTF-8. A UTF-8 database can hold text that is not (the
/// server sends it as stored): written as is, the row line would not be JSON and its cursor
/// key unreadable, so the rows after it would be lost on resume. Refused instead, as
/// `Row::get::<&str>` did: the bootstrap fails (no `end`), and the client retries.
struct Utf8<'a>(&'a [u8]);

impl<'a> tokio_postgres::types::FromSql<'a> for Utf8<'a> {
    fn from_sql(
        _: &tokio_postgres::types::Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        std::str::from_utf8(raw)?;
        Ok(Utf8(raw))
    }

    fn accepts(_: &tokio_postgres::types::Type) -> bool {
        true
    }
}

impl<'a> tokio_postgres::types::FromSql<'a> for Binary<'a> {
    fn from_sql(
        _: &tokio_postgres::types::Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Binary(raw))
    }

    fn accepts(_: &tokio_postgres::types::Type) -> bool {
        true
    }
}

/// Days since 2000-01-01 to a proleptic Gregorian (year, month, day); year 0 is 1 BC.
fn civil(days: i64) -> (i64, u32, u32) {
    // Howard Hinnant's civil_from_days, shifted from 1970 to 2000.
    let z = days + 10_957 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Writes a date, timestamp or timestamptz (binary: days or microseconds since 2000-01-01)
/// as `to_jsonb` does: `YYYY-MM-DD[THH:MM:SS[.ffffff][+00:00]][ BC]`, or `infinity`.
fn write_datetime(out: &mut Vec<u8>, kind: Kind, raw: &[u8]) {
    let (days, micros) = if kind == Kind::Date {
        let d = i32::from_be_bytes(raw.try_into().expect("a date is 4 bytes"));
        match d {
            i32::MAX => return out.extend_from_slice(b"\"infinity\""),
            i32::MIN => return out.extend_from_slice(b"\"-infinity\""),
            d => (i64::from(d), None),
        }
    } else {
        let us = i64::from_be_bytes(raw.try_into().expect("a timestamp is 8 bytes"));
        match us {
            i64::MAX => return out.extend_from_slice(b"\"infinity\""),
            i64::MIN => return out.extend_from_slice(b"\"-infinity\""),
            us => (
                us.div_euclid(86_400_000_000),
                Some(us.rem_euclid(86_400_000_000)),
            ),
        }
    };
    let (y, m, d) = civil(days);
    let year = if y > 0 { y } else { 1 - y };
    // Formatted whole in a stack buffer, then copied once (at most 38 bytes: a 7-digit year).
    let mut s = Scratch::new();
    s.byte(b'"');
    if year < 10_000 {
        s.two(year as u64 / 100);
        s.two(year as u64 % 100);
    } else {
        s.padded(year.unsigned_abs(), 4);
    }
    s.byte(b'-');
    s.two(m.into());
    s.byte(b'-');
    s.two(d.into());
    if let Some(us) = micros {
        let (secs, frac) = ((us / 1_000_000) as u64, (us % 1_000_000) as u64);
        s.byte(b'T');
        s.two(secs / 3600);
        s.byte(b':');
        s.two(secs / 60 % 60);
        s.byte(b':');
        s.two(secs % 60);
        if frac != 0 {
            // Six digits, less the trailing zeros.
            let (mut frac, mut width) = (frac, 6);
            while frac % 10 == 0 {
                frac /= 10;
                width -= 1;
            }
            s.byte(b'.');
            s.padded(frac, width);
        }
        if kind == Kind::TimestamptzUtc {
            s.bytes(b"+00:00");
        }
    }
    if y <= 0 {
        s.bytes(b" BC");
    }
    s.byte(b'"');
    s.done(out);
}

/// numeric's text form is a JSON number except for NaN and the infinities.
fn write_numeric(out: &mut Vec<u8>, s: &[u8]) {
    if matches!(s, b"NaN" | b"Infinity" | b"-Infinity") {
        out.push(b'"');
        out.extend_from_slice(s);
        out.push(b'"');
    } else {
        out.extend_from_slice(s);
    }
}

/// Writes the columns `row[first..]` as one JSON object.
pub fn write_object(out: &mut Vec<u8>, columns: &[Column], row: &Row, first: usize) {
    let start = out.len();
    for (i, c) in columns.iter().enumerate() {
        out.extend_from_slice(c.key_json.as_bytes());
        write_value(out, c.kind, row, first + i);
    }
    // The first column's comma becomes the opening brace.
    match out.len() - start {
        0 => out.push(b'{'),
        _ => out[start] = b'{',
    }
    out.push(b'}');
}

/// Writes the model id of a one-column key of an `is_own_text` kind (its text form) as a JSON
/// string.
pub fn write_own_text(out: &mut Vec<u8>, kind: Kind, row: &Row, idx: usize) {
    if let Kind::Int2 | Kind::Int4 | Kind::Int8 = kind {
        let n = integer(kind, row, idx).expect("a key column is never NULL");
        out.push(b'"');
        push_int(out, n);
        out.push(b'"');
    } else {
        let Utf8(s) = row.get(idx);
        write_json_str(out, s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_expressions() {
        assert_eq!(Kind::of(20, false), Kind::Int8);
        assert_eq!(Kind::of(1184, true), Kind::TimestamptzUtc);
        assert_eq!(Kind::of(1184, false), Kind::Other, "other zones: to_jsonb");
        assert_eq!(
            Kind::of(1042, true),
            Kind::Other,
            "bpchar keeps its padding"
        );
        assert_eq!(
            Kind::of(114, true),
            Kind::Other,
            "json is normalized by to_jsonb"
        );
        assert_eq!(Kind::Other.expr("\"a\""), "to_jsonb(t.\"a\")::text");
        assert_eq!(Kind::Text.expr("\"a\""), "t.\"a\"::text");
        assert!(Kind::Int4.is_own_text() && !Kind::Numeric.is_own_text());
    }

    #[test]
    fn numerics_that_are_not_json_numbers_are_strings() {
        for (text, json) in [
            ("1.50", "1.50"),
            ("-3", "-3"),
            ("NaN", "\"NaN\""),
            ("-Infinity", "\"-Infinity\""),
        ] {
            let mut out = vec![];
            write_numeric(&mut out, text.as_bytes());
            assert_eq!(String::from_utf8(out).unwrap(), json);
        }
    }

    #[test]
    fn datetimes_are_written_as_to_jsonb_does() {
        let ts = |kind, us: i64| {
            let mut out = vec![];
            write_datetime(&mut out, kind, &us.to_be_bytes());
            String::from_utf8(out).unwrap()
        };
        let date = |d: i32| {
            let mut out = vec![];
            write_datetime(&mut out, Kind::Date, &d.to_be_bytes());
            String::from_utf8(out).unwrap()
        };
        assert_eq!(ts(Kind::Timestamp, 0), r#""2000-01-01T00:00:00""#);
        assert_eq!(
            ts(Kind::TimestamptzUtc, 1_500_000),
            r#""2000-01-01T00:00:01.5+00:00""#
        );
        assert_eq!(ts(Kind::Timestamp, -1), r#""1999-12-31T23:59:59.999999""#);
        assert_eq!(ts(Kind::Timestamp, 10), r#""2000-01-01T00:00:00.00001""#);
        assert_eq!(
            ts(Kind::Timestamp, 86_399_100_000),
            r#""2000-01-01T23:59:59.1""#
        );
        assert_eq!(ts(Kind::Timestamp, i64::MAX), r#""infinity""#);
        assert_eq!(date(0), r#""2000-01-01""#);
        assert_eq!(date(-730_119), r#""0001-01-01""#);
        assert_eq!(date(-730_120), r#""0001-12-31 BC""#);
        assert_eq!(date(2_921_940), r#""10000-01-01""#);
        assert_eq!(date(i32::MIN), r#""-infinity""#);
        assert_eq!(date(60), r#""2000-03-01""#, "2000 is a leap year");
    }

    /// Dates and timestamps in binary next to what Postgres 15's `to_jsonb` prints for them
    /// (`tests/fixtures/pg_datetime_jsonb.sql`, TimeZone UTC): BC years, years past 9999, the
    /// infinities, leap days, every count of fraction digits.
    #[test]
    fn datetimes_equal_postgres_to_jsonb() {
        let mut n = 0;
        for line in include_str!("../../tests/fixtures/pg_datetime_jsonb.txt").lines() {
            let mut f = line.splitn(3, ' ');
            let (kind, hex, want) = (f.next().unwrap(), f.next().unwrap(), f.next().unwrap());
            let raw: Vec<u8> = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
            let kind = match kind {
                "ts" => Kind::Timestamp,
                "tz" => Kind::TimestamptzUtc,
                _ => Kind::Date,
            };
            let mut out = vec![];
            write_datetime(&mut out, kind, &raw);
            assert_eq!(String::from_utf8(out).unwrap(), want, "{kind:?} {hex}");
            n += 1;
        }
        assert!(n > 1000);
    }

    #[test]
    fn integers_are_written_as_display_does() {
        for v in [0, 7, -7, 10, -100, 1_000_000, i64::MAX, i64::MIN] {
            let mut out = vec![];
            push_int(&mut out, v);
            assert_eq!(String::from_utf8(out).unwrap(), v.to_string());
        }
        let mut out = vec![];
        push_padded(&mut out, 12345, 4);
        push_padded(&mut out, 7, 2);
        push_padded(&mut out, 0, 2);
        assert_eq!(out, b"123450700");
    }

    #[test]
    fn strings_are_escaped_as_serde_json_does() {
        let mut all: String = (0u8..128).map(char::from).collect();
        all.push_str("é 😀 \u{2028} \u{7f} end\\\"");
        for s in [all.as_str(), "", "plain", "\"", "a\u{1f}b\u{0}"] {
            let mut out = vec![];
            write_json_str(&mut out, s.as_bytes());
            assert_eq!(
                String::from_utf8(out).unwrap(),
                serde_json::to_string(s).unwrap()
            );
        }
    }

    #[test]
    fn column_names_are_escaped_once() {
        let c = Column::new("we\"ird".into(), 25, true);
        assert_eq!(c.key_json, r#","we\"ird":"#);
    }
}

/// The encoder of 29f6423 (before issue 11), for the differential tests (review rev14d): a
/// frozen oracle kept with the tests, outside the product's sources.
#[cfg(test)]
#[path = "../../tests/oracle/row_json_old_29f6423.rs"]
mod old;

#[cfg(test)]
#[path = "row_json_differential_tests.rs"]
mod differential;
