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
    /// `"name":`, escaped once.
    key_json: String,
}

impl Column {
    pub fn new(name: String, type_oid: u32, utc: bool) -> Column {
        let mut key_json = serde_json::to_string(&name).expect("a string serializes");
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

/// Appends `v` in decimal (as `{v}` would, without the formatting machinery: a bootstrap
/// writes a few of these per row).
fn push_int(out: &mut Vec<u8>, v: i64) {
    if v < 0 {
        out.push(b'-');
    }
    push_padded(out, v.unsigned_abs(), 1);
}

/// Appends `v` in decimal, zero-padded to at least `width` digits.
fn push_padded(out: &mut Vec<u8>, mut v: u64, width: usize) {
    let mut digits = [b'0'; 20];
    let mut at = digits.len();
    while v > 0 {
        at -= 1;
        digits[at] = b'0' + (v % 10) as u8;
        v /= 10;
    }
    out.extend_from_slice(&digits[at.min(digits.len() - width)..]);
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
        Kind::Text => match row.get::<_, Option<&str>>(idx) {
            Some(s) => serde_json::to_writer(&mut *out, s).expect("a string serializes"),
            None => out.extend_from_slice(b"null"),
        },
        Kind::Numeric => match row.get::<_, Option<&str>>(idx) {
            Some(s) => write_numeric(out, s),
            None => out.extend_from_slice(b"null"),
        },
        Kind::Date | Kind::Timestamp | Kind::TimestamptzUtc => {
            match row.get::<_, Option<Binary<'_>>>(idx) {
                Some(Binary(raw)) => write_datetime(out, kind, raw),
                None => out.extend_from_slice(b"null"),
            }
        }
        Kind::Jsonb | Kind::Other => match row.get::<_, Option<&str>>(idx) {
            Some(s) => out.extend_from_slice(s.as_bytes()),
            None => out.extend_from_slice(b"null"),
        },
    }
}

/// A value's binary wire form, whatever its type.
struct Binary<'a>(&'a [u8]);

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
    out.push(b'"');
    push_padded(out, year.unsigned_abs(), 4);
    out.push(b'-');
    push_padded(out, m.into(), 2);
    out.push(b'-');
    push_padded(out, d.into(), 2);
    if let Some(us) = micros {
        let (secs, frac) = ((us / 1_000_000) as u64, (us % 1_000_000) as u64);
        out.push(b'T');
        push_padded(out, secs / 3600, 2);
        out.push(b':');
        push_padded(out, secs / 60 % 60, 2);
        out.push(b':');
        push_padded(out, secs % 60, 2);
        if frac != 0 {
            // Six digits, less the trailing zeros.
            let (mut frac, mut width) = (frac, 6);
            while frac % 10 == 0 {
                frac /= 10;
                width -= 1;
            }
            out.push(b'.');
            push_padded(out, frac, width);
        }
        if kind == Kind::TimestamptzUtc {
            out.extend_from_slice(b"+00:00");
        }
    }
    if y <= 0 {
        out.extend_from_slice(b" BC");
    }
    out.push(b'"');
}

/// numeric's text form is a JSON number except for NaN and the infinities.
fn write_numeric(out: &mut Vec<u8>, s: &str) {
    if matches!(s, "NaN" | "Infinity" | "-Infinity") {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        out.extend_from_slice(s.as_bytes());
    }
}

/// Writes the columns `row[first..]` as one JSON object.
pub fn write_object(out: &mut Vec<u8>, columns: &[Column], row: &Row, first: usize) {
    out.push(b'{');
    for (i, c) in columns.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(c.key_json.as_bytes());
        write_value(out, c.kind, row, first + i);
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
        let s: &str = row.get(idx);
        serde_json::to_writer(&mut *out, s).expect("a string serializes");
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
            write_numeric(&mut out, text);
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
    fn column_names_are_escaped_once() {
        let c = Column::new("we\"ird".into(), 25, true);
        assert_eq!(c.key_json, r#""we\"ird":"#);
    }
}
