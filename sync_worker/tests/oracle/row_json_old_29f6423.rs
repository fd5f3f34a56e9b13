//! Test-only copy of `sync_worker/src/api/row_json.rs` as of 29f6423 (before issue 11's
//! encoder rework), for the differential tests in `src/api/row_json_differential_tests.rs`
//! (review rev14d), which include it as `row_json::old` in unit-test builds only: not a test
//! target of its own (cargo builds only `tests/*.rs` and `tests/*/main.rs` as those).
#![allow(dead_code)]

// Rows as JSON objects equal to Postgres' `to_jsonb(row)` (the form deltas carry), with the
// cheap conversions done here instead of in the database backend: integers and booleans come
// in binary, strings and numerics as text and are written here; every other type is still
// rendered by `to_jsonb(column)`, so its form is exactly Postgres'.

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
    pub(crate) key_json: String,
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
pub(crate) fn integer(kind: Kind, row: &Row, idx: usize) -> Option<i64> {
    match kind {
        Kind::Int2 => row.get::<_, Option<i16>>(idx).map(i64::from),
        Kind::Int4 => row.get::<_, Option<i32>>(idx).map(i64::from),
        _ => row.get::<_, Option<i64>>(idx),
    }
}

pub(crate) fn int(out: &mut Vec<u8>, v: Option<i64>) {
    match v {
        Some(v) => push_int(out, v),
        None => out.extend_from_slice(b"null"),
    }
}

/// Appends `v` in decimal (as `{v}` would, without the formatting machinery: a bootstrap
/// writes a few of these per row).
pub(crate) fn push_int(out: &mut Vec<u8>, v: i64) {
    if v < 0 {
        out.push(b'-');
    }
    push_padded(out, v.unsigned_abs(), 1);
}

/// Appends `v` in decimal, zero-padded to at least `width` digits.
pub(crate) fn push_padded(out: &mut Vec<u8>, mut v: u64, width: usize) {
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
pub(crate) fn civil(days: i64) -> (i64, u32, u32) {
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
pub(crate) fn write_datetime(out: &mut Vec<u8>, kind: Kind, raw: &[u8]) {
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
pub(crate) fn write_numeric(out: &mut Vec<u8>, s: &str) {
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
