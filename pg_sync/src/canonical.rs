//! One text per value, whatever the session's settings: the text form of key and group values
//! (model ids, group ids) and the parsing of ids that clients and peers send.
//!
//! Output functions of dates, times, intervals, floats, money and bytea follow DateStyle,
//! TimeZone, IntervalStyle, extra_float_digits, lc_monetary and bytea_output, so the same row
//! written from two sessions would otherwise get two identities. Values of those types (and of
//! types we cannot vouch for: arrays, composites, ranges, user types) are printed and parsed
//! under fixed settings, set in a GUC nest level only when the session differs from them.
//! Integers, numeric, text, uuid, bool, enums and json print the same everywhere and take the
//! plain path; numeric is printed without trailing fractional zeros (equal values, one text).
//!
//! Known limits (equal values with several texts, so several ids): intervals that are equal
//! but spelled differently ('1 day' = '24:00:00'), float -0 and 0, and types whose equality is
//! not their text's (citext, arrays or composites of numeric).

use crate::errors;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::ffi::{CStr, CString};

/// Settings a type's text form depends on (bit set).
const DATESTYLE: u8 = 1;
const TIMEZONE: u8 = 2;
const INTERVALSTYLE: u8 = 4;
const FLOAT_DIGITS: u8 = 8;
const MONETARY: u8 = 16;
const BYTEA: u8 = 32;
const ALL: u8 = 63;

/// The canonical value of each setting, in bit order.
const CANONICAL: [(u8, &CStr, &CStr); 6] = [
    (DATESTYLE, c"DateStyle", c"ISO, MDY"),
    (TIMEZONE, c"TimeZone", c"UTC"),
    (INTERVALSTYLE, c"IntervalStyle", c"postgres"),
    (FLOAT_DIGITS, c"extra_float_digits", c"1"),
    (MONETARY, c"lc_monetary", c"C"),
    (BYTEA, c"bytea_output", c"hex"),
];

/// The settings the text form of values printed by `output_fn` depends on.
pub fn depends_on(output_fn: pg_sys::Oid) -> u8 {
    match output_fn.to_u32() {
        pg_sys::F_INT2OUT
        | pg_sys::F_INT4OUT
        | pg_sys::F_INT8OUT
        | pg_sys::F_NUMERIC_OUT
        | pg_sys::F_TEXTOUT
        | pg_sys::F_VARCHAROUT
        | pg_sys::F_BPCHAROUT
        | pg_sys::F_NAMEOUT
        | pg_sys::F_CHAROUT
        | pg_sys::F_UUID_OUT
        | pg_sys::F_BOOLOUT
        | pg_sys::F_OIDOUT
        | pg_sys::F_ENUM_OUT
        | pg_sys::F_JSON_OUT
        | pg_sys::F_JSONB_OUT
        | pg_sys::F_INET_OUT
        | pg_sys::F_CIDR_OUT
        | pg_sys::F_MACADDR_OUT
        | pg_sys::F_MACADDR8_OUT => 0,
        pg_sys::F_DATE_OUT
        | pg_sys::F_TIMESTAMP_OUT
        | pg_sys::F_TIME_OUT
        | pg_sys::F_TIMETZ_OUT => DATESTYLE,
        pg_sys::F_TIMESTAMPTZ_OUT => DATESTYLE | TIMEZONE,
        pg_sys::F_INTERVAL_OUT => INTERVALSTYLE,
        pg_sys::F_FLOAT4OUT | pg_sys::F_FLOAT8OUT => FLOAT_DIGITS,
        pg_sys::F_CASH_OUT => MONETARY,
        pg_sys::F_BYTEAOUT => BYTEA,
        _ => ALL,
    }
}

/// The settings `to_jsonb` of a value printed by `output_fn` depends on: those of its text form,
/// except that dates and timestamps are written in ISO form whatever DateStyle says (their
/// offsets follow TimeZone, but name the same instant). A float printed with
/// `extra_float_digits <= 0`, money in the writer's `lc_monetary`, an interval in `sql_standard`
/// style or a range in German dates would otherwise reach the log and every reader as text
/// that loses digits or that another session cannot parse.
pub fn json_depends_on(output_fn: pg_sys::Oid) -> u8 {
    match output_fn.to_u32() {
        pg_sys::F_DATE_OUT | pg_sys::F_TIMESTAMP_OUT | pg_sys::F_TIMESTAMPTZ_OUT => 0,
        _ => depends_on(output_fn),
    }
}

/// The settings `to_jsonb` of a column of type `typid` depends on. A user type (oid at or above
/// `FirstNormalObjectId`, itself, as a domain's base type or an array's element type) may have a
/// user cast to json that `to_jsonb` calls instead of its output function, and that cast may read
/// any setting: all of them.
pub fn json_depends_on_type(typid: pg_sys::Oid) -> u8 {
    let user = |t: pg_sys::Oid| t.to_u32() >= pg_sys::FirstNormalObjectId;
    // SAFETY: catalog lookups of an existing column's type, in a transaction.
    unsafe {
        let base = pg_sys::getBaseType(typid);
        let elem = pg_sys::get_element_type(base);
        if user(base) || (elem != pg_sys::InvalidOid && user(pg_sys::getBaseType(elem))) {
            return ALL;
        }
        let mut func = pg_sys::InvalidOid;
        let mut varlena = false;
        pg_sys::getTypeOutputInfo(typid, &mut func, &mut varlena);
        json_depends_on(func)
    }
}

/// Runs `f` (which prints values, e.g. `to_jsonb` of a row) with the output settings in
/// `needed` at their canonical values, set only when the session differs from them.
pub fn with_output_settings<R>(needed: u8, f: impl FnOnce() -> R) -> R {
    with_settings(needed, false, f)
}

/// Settings that decide how captured values parse back (`jsonb_populate_record` in merges):
/// money's text follows lc_monetary on input too. The other settings' canonical output parses
/// the same under any value (ISO dates, postgres-style intervals, hex bytea, exact floats).
pub const VALUE_INPUT: u8 = MONETARY;

/// Runs `f` (which parses captured values) with the input settings in `needed` at their
/// canonical values, set only when the session differs from them. Triggers that `f`'s writes
/// fire see those settings too, as they would under a function's SET clause.
pub fn with_input_settings<R>(needed: u8, f: impl FnOnce() -> R) -> R {
    with_settings(needed, true, f)
}

/// Zones that are UTC at every instant: ISO output prints only the numeric offset, so they print
/// timestamps exactly as UTC does.
const UTC_NAMES: [&CStr; 10] = [
    c"UTC",
    c"Etc/UTC",
    c"GMT",
    c"Etc/GMT",
    c"UCT",
    c"Etc/UCT",
    c"Universal",
    c"Etc/Universal",
    c"Zulu",
    c"Etc/Zulu",
];

/// Which of `needed` the session has away from its canonical value. Output only looks at the
/// date style; parsing (`input`) also at the field order, which reads ambiguous dates.
fn differing(needed: u8, input: bool) -> u8 {
    let mut off = 0;
    // SAFETY: plain reads of backend globals and of GUC values Postgres owns.
    unsafe {
        if needed & DATESTYLE != 0
            && (pg_sys::DateStyle != pg_sys::USE_ISO_DATES as i32
                || (input && pg_sys::DateOrder != pg_sys::DATEORDER_MDY as i32))
        {
            off |= DATESTYLE;
        }
        if needed & TIMEZONE != 0 {
            let name = pg_sys::pg_get_timezone_name(pg_sys::session_timezone);
            if name.is_null() || !UTC_NAMES.contains(&CStr::from_ptr(name)) {
                off |= TIMEZONE;
            }
        }
        if needed & INTERVALSTYLE != 0 && pg_sys::IntervalStyle != pg_sys::INTSTYLE_POSTGRES as i32
        {
            off |= INTERVALSTYLE;
        }
        // Every positive value prints floats in their shortest exact form.
        if needed & FLOAT_DIGITS != 0 && pg_sys::extra_float_digits <= 0 {
            off |= FLOAT_DIGITS;
        }
        // No exported global holds these two: compare the settings' text.
        for &(bit, name, value) in CANONICAL.iter().filter(|c| c.0 & (MONETARY | BYTEA) != 0) {
            if needed & bit != 0 {
                let now = pg_sys::GetConfigOption(name.as_ptr(), false, false);
                if now.is_null() || CStr::from_ptr(now) != value {
                    off |= bit;
                }
            }
        }
    }
    off
}

/// Runs `f` with the settings in `needed` at their canonical values. The settings are set in a
/// nest level of their own and restored after `f`; an ERROR in `f` restores them with the
/// (sub)transaction it aborts.
fn with_settings<R>(needed: u8, input: bool, f: impl FnOnce() -> R) -> R {
    let off = differing(needed, input);
    if off == 0 {
        return f();
    }
    // SAFETY: the same sequence a function's SET clause uses (fmgr_security_definer).
    let level = unsafe { pg_sys::NewGUCNestLevel() };
    for (bit, name, value) in CANONICAL {
        if off & bit != 0 {
            unsafe {
                pg_sys::set_config_option(
                    name.as_ptr(),
                    value.as_ptr(),
                    pg_sys::GucContext::PGC_USERSET,
                    pg_sys::GucSource::PGC_S_SESSION,
                    pg_sys::GucAction::GUC_ACTION_SAVE,
                    true,
                    0,
                    false,
                )
            };
        }
    }
    let r = f();
    unsafe { pg_sys::AtEOXact_GUC(true, level) };
    r
}

/// The canonical text of a non-null value printed by `output_fn`.
///
/// # Safety
/// `value` must be a valid datum of a type whose output function is `output_fn`.
pub unsafe fn output(output_fn: pg_sys::Oid, value: pg_sys::Datum) -> String {
    with_settings(depends_on(output_fn), false, || unsafe {
        print(output_fn, value)
    })
}

unsafe fn print(output_fn: pg_sys::Oid, value: pg_sys::Datum) -> String {
    let s = unsafe {
        let out = pg_sys::OidOutputFunctionCall(output_fn, value);
        let s = CStr::from_ptr(out).to_string_lossy().into_owned();
        pg_sys::pfree(out.cast());
        s
    };
    if output_fn.to_u32() == pg_sys::F_NUMERIC_OUT {
        strip_scale(s)
    } else {
        s
    }
}

/// A numeric's text without trailing fractional zeros: numeric equality ignores the scale
/// (`1.0 = 1.00`), its output keeps it, so one key would otherwise have one id per scale.
/// numeric_out never uses an exponent; NaN and infinities have no '.'.
fn strip_scale(mut s: String) -> String {
    if s.contains('.') {
        let kept = s.trim_end_matches('0').trim_end_matches('.').len();
        s.truncate(kept);
        if s == "-0" {
            s = "0".to_owned();
        }
    }
    s
}

/// The canonical text of a value of any type (`pg_sync.canonical_text`).
///
/// # Safety
/// `value` must be a valid non-null datum of type `typid`.
pub unsafe fn output_of_type(typid: pg_sys::Oid, value: pg_sys::Datum) -> String {
    let mut func = pg_sys::InvalidOid;
    let mut varlena = false;
    unsafe {
        pg_sys::getTypeOutputInfo(typid, &mut func, &mut varlena);
        output(func, value)
    }
}

/// Parses `text` as a value of the column type (`typid`, `typmod`) under the canonical settings
/// and prints it back canonically: `"01"` becomes `"1"` for an integer key, an upper-case uuid
/// becomes lower-case. Raises 22P02 with `what` and a hint when `text` is no such value.
pub fn reparse(typid: pg_sys::Oid, typmod: i32, text: &str, what: &str) -> String {
    let bad = || -> ! {
        // SAFETY: names an existing type; the name is palloc'd text.
        let typname = unsafe { CStr::from_ptr(pg_sys::format_type_be(typid)) }
            .to_string_lossy()
            .into_owned();
        errors::raise(
            PgSqlErrorCode::ERRCODE_INVALID_TEXT_REPRESENTATION,
            format!("{what} is not a valid {typname}"),
            "Send key and group values in their columns' text forms, as pg_sync.sync_actions holds them (model_id, group_id).",
        )
    };
    let Ok(c) = CString::new(text) else { bad() };
    let (mut infunc, mut ioparam, mut outfunc, mut varlena) = (
        pg_sys::InvalidOid,
        pg_sys::InvalidOid,
        pg_sys::InvalidOid,
        false,
    );
    // SAFETY: catalog lookups of an existing column type.
    unsafe {
        pg_sys::getTypeInputInfo(typid, &mut infunc, &mut ioparam);
        pg_sys::getTypeOutputInfo(typid, &mut outfunc, &mut varlena);
    }
    PgTryBuilder::new(std::panic::AssertUnwindSafe(|| {
        with_settings(depends_on(outfunc), true, || unsafe {
            let datum =
                pg_sys::OidInputFunctionCall(infunc, c.as_ptr().cast_mut(), ioparam, typmod);
            print(outfunc, datum)
        })
    }))
    .catch_others(|e| {
        // Data exceptions (22xxx) and domain checks (23xxx) mean a bad id; anything else
        // (a cancel, out of memory) goes on as it was.
        let class = match &e {
            pg_sys::panic::CaughtError::PostgresError(r)
            | pg_sys::panic::CaughtError::ErrorReport(r)
            | pg_sys::panic::CaughtError::RustPanic { ereport: r, .. } => {
                r.sql_error_code() as i32 & 0xFFF
            }
        };
        // MAKE_SQLSTATE class bits of "22" and "23".
        if class == 2 + (2 << 6) || class == 2 + (3 << 6) {
            bad()
        }
        e.rethrow()
    })
    .execute()
}
