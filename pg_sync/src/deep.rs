//! `deep::Jsonb`: jsonb read into and written from a serde_json tree at any nesting depth (the
//! type every row value of pg_sync goes through: SQL arguments and results, SPI reads, the
//! capture trigger's row read), and `deep::same`, the equality of such trees.
//!
//! serde_json parses at most 128 levels (`pgrx::JsonB` fails deeper values with XX000), while
//! jsonb nests thousands. A value is read as its `jsonb_out` text (as `pgrx::JsonB` does); text
//! serde_json parses is taken as it is (no second pass). Deeper text is cut first: every array
//! or object opened below depth `CUT` of the document is kept as its raw text inside a string
//! marked with this backend's random token (`marker`), and written back by `jsonb_in` as that
//! raw JSON again (`to_text`). A marked string never collides with a user string: it starts
//! with NUL, which no jsonb string can hold (`jsonb_in` refuses `\u0000`), followed by 128
//! random bits; and were one ever to reach `jsonb_in` unsubstituted, it would fail, not store.
//!
//! Where the cut falls depends on the depth of the value in its document, so one deep value
//! read from two documents may be two different trees: compare values with `same` (Postgres'
//! jsonb equality when either side holds a marked string), never with `==`.

use pgrx::callconv::{Arg, ArgAbi, BoxRet, FcInfo};
use pgrx::datum::Datum;
use pgrx::nullable::Nullable;
use pgrx::pg_sys;
use pgrx::pgrx_sql_entity_graph::metadata::{
    ArgumentError, ReturnsError, ReturnsRef, SqlMappingRef, SqlTranslatable, TypeOrigin,
};
use pgrx::{direct_function_call, direct_function_call_as_datum, FromDatum, IntoDatum};
use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::Value;
use std::cell::Cell;
use std::ffi::{CStr, CString};

/// Arrays and objects opened deeper than this (from the document's root) are kept as raw text
/// when the document is too deep for serde_json. Well below serde_json's 128: the trees built
/// from a cut document are embedded into larger documents (a batch of changes) and read again.
pub const CUT: usize = 64;

/// A `jsonb` value of any depth as a serde_json tree (see the module comment).
#[derive(Debug, Clone, PartialEq)]
pub struct Jsonb(pub Value);

thread_local! {
    /// This backend's marker prefix (NUL, token, `:`), made on first use.
    static MARKER: std::cell::OnceCell<String> = const { std::cell::OnceCell::new() };
    /// A deep value was cut in this backend: writes look for marked strings.
    static CUT_SEEN: Cell<bool> = const { Cell::new(false) };
}

/// The prefix of a marked string: NUL, `pg_sync.deep.`, 32 random hex digits, `:`.
fn marker() -> String {
    MARKER.with(|m| {
        m.get_or_init(|| {
            let mut bytes = [0u8; 16];
            // SAFETY: a buffer of the given length.
            let ok = unsafe { pg_sys::pg_strong_random(bytes.as_mut_ptr().cast(), bytes.len()) };
            if !ok {
                pgrx::error!("pg_sync: no strong random bytes for the deep-jsonb marker");
            }
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            format!("\u{0}pg_sync.deep.{hex}:")
        })
        .clone()
    })
}

/// Parses `jsonb_out` text: as serde_json does when it can, else cut (see the module comment).
pub fn parse(text: &str) -> Value {
    match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) if e.to_string().starts_with("recursion limit exceeded") => {
            let marker = marker();
            CUT_SEEN.with(|s| s.set(true));
            serde_json::from_str(&cut(text, &marker))
                .unwrap_or_else(|e| panic!("pg_sync: a cut jsonb text is no JSON: {e}"))
        }
        Err(e) => panic!("a text version of jsonb must be a valid json: {e}"),
    }
}

/// `text` with every array or object opened deeper than `CUT` replaced by a JSON string: the
/// marker followed by its raw text. Iterative: any depth.
fn cut(text: &str, marker: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len() + 64);
    let mut depth = 0usize;
    let mut copied = 0;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'"' => {
                i = string_end(b, i);
                continue;
            }
            b'[' | b'{' if depth == CUT => {
                let end = container_end(b, i);
                out.push_str(&text[copied..i]);
                let mut s = String::with_capacity(marker.len() + end - i);
                s.push_str(marker);
                s.push_str(&text[i..end]);
                out.push_str(&serde_json::to_string(&s).expect("a string serializes"));
                copied = end;
                i = end;
                continue;
            }
            b'[' | b'{' => depth += 1,
            b']' | b'}' => depth -= 1,
            _ => {}
        }
        i += 1;
    }
    out.push_str(&text[copied..]);
    out
}

/// The index after the string whose opening quote is at `start`.
fn string_end(b: &[u8], start: usize) -> usize {
    let mut i = start + 1;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'"' => return i + 1,
            _ => i += 1,
        }
    }
    b.len()
}

/// The index after the array or object that opens at `start`.
fn container_end(b: &[u8], start: usize) -> usize {
    let mut depth = 0usize;
    let mut i = start;
    while i < b.len() {
        match b[i] {
            b'"' => {
                i = string_end(b, i);
                continue;
            }
            b'[' | b'{' => depth += 1,
            b']' | b'}' => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    b.len()
}

/// The JSON text of `v`, marked strings written as the raw JSON they hold.
pub fn to_text(v: &Value) -> String {
    if !CUT_SEEN.with(Cell::get) {
        return serde_json::to_string(v).expect("a JSON value serializes");
    }
    let marker = marker();
    serde_json::to_string(&Out(v, &marker)).expect("a JSON value serializes")
}

/// Serializes a tree with its marked strings as raw JSON.
struct Out<'a>(&'a Value, &'a str);

impl Serialize for Out<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Value::String(t) => match t.strip_prefix(self.1) {
                Some(raw) => RawValue::from_string(raw.to_owned())
                    .map_err(serde::ser::Error::custom)?
                    .serialize(s),
                None => t.serialize(s),
            },
            Value::Array(a) => {
                let mut seq = s.serialize_seq(Some(a.len()))?;
                for v in a {
                    seq.serialize_element(&Out(v, self.1))?;
                }
                seq.end()
            }
            Value::Object(o) => {
                let mut map = s.serialize_map(Some(o.len()))?;
                for (k, v) in o {
                    map.serialize_entry(k, &Out(v, self.1))?;
                }
                map.end()
            }
            other => other.serialize(s),
        }
    }
}

/// Whether `v` holds a marked string.
fn has_marker(v: &Value, marker: &str) -> bool {
    match v {
        Value::String(t) => t.starts_with(marker),
        Value::Array(a) => a.iter().any(|v| has_marker(v, marker)),
        Value::Object(o) => o.values().any(|v| has_marker(v, marker)),
        _ => false,
    }
}

/// Whether two values are the same JSON value, however each was cut.
pub fn same(a: Option<&Value>, b: Option<&Value>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => {
            if a == b {
                return true;
            }
            if !CUT_SEEN.with(Cell::get) {
                return false;
            }
            let marker = marker();
            if !has_marker(a, &marker) && !has_marker(b, &marker) {
                return false;
            }
            let x = Jsonb(a.clone()).into_datum();
            let y = Jsonb(b.clone()).into_datum();
            // SAFETY: jsonb_eq on two non-null jsonb datums.
            unsafe { direct_function_call::<bool>(pg_sys::jsonb_eq, &[x, y]) }.unwrap_or(false)
        }
        (None, None) => true,
        _ => false,
    }
}

impl FromDatum for Jsonb {
    unsafe fn from_polymorphic_datum(
        datum: pg_sys::Datum,
        is_null: bool,
        _: pg_sys::Oid,
    ) -> Option<Jsonb> {
        if is_null {
            return None;
        }
        // As pgrx::JsonB reads it: jsonb_out's text, then serde_json (here, `parse`).
        unsafe {
            let varlena = datum.cast_mut_ptr();
            let detoasted = pg_sys::pg_detoast_datum_packed(varlena);
            let cstr = direct_function_call::<&CStr>(pg_sys::jsonb_out, &[Some(detoasted.into())])
                .expect("datum must refer to a valid jsonb varlena");
            let value = parse(
                cstr.to_str()
                    .expect("a text version of the jsonb must be valid utf-8"),
            );
            pg_sys::pfree(cstr.as_ptr() as *mut std::ffi::c_void);
            if detoasted != varlena {
                pg_sys::pfree(detoasted.cast());
            }
            Some(Jsonb(value))
        }
    }
}

impl IntoDatum for Jsonb {
    fn into_datum(self) -> Option<pg_sys::Datum> {
        let cstring = CString::new(to_text(&self.0))
            .expect("a text version of jsonb must contain no null terminator");
        // SAFETY: jsonb_in on a NUL-terminated string.
        unsafe { direct_function_call_as_datum(pg_sys::jsonb_in, &[Some(cstring.as_ptr().into())]) }
    }

    fn type_oid() -> pg_sys::Oid {
        pg_sys::JSONBOID
    }
}

// SAFETY: read from a jsonb datum with FromDatum, as pgrx::JsonB is.
unsafe impl<'fcx> ArgAbi<'fcx> for Jsonb {
    unsafe fn unbox_arg_unchecked(arg: Arg<'_, 'fcx>) -> Self {
        let index = arg.index();
        unsafe { arg.unbox_arg_using_from_datum() }
            .unwrap_or_else(|| panic!("argument {index} must not be null"))
    }

    unsafe fn unbox_nullable_arg(arg: Arg<'_, 'fcx>) -> Nullable<Self> {
        unsafe { arg.unbox_arg_using_from_datum() }.into()
    }
}

// SAFETY: returns the datum IntoDatum made, as pgrx::JsonB does.
unsafe impl BoxRet for Jsonb {
    unsafe fn box_into<'fcx>(self, fcinfo: &mut FcInfo<'fcx>) -> Datum<'fcx> {
        match self.into_datum() {
            Some(datum) => unsafe { fcinfo.return_raw_datum(datum) },
            None => fcinfo.return_null(),
        }
    }
}

// SAFETY: maps to jsonb, the type it reads and writes.
unsafe impl SqlTranslatable for Jsonb {
    const TYPE_IDENT: &'static str = pgrx::pgrx_resolved_type!(Jsonb);
    const TYPE_ORIGIN: TypeOrigin = TypeOrigin::External;
    const ARGUMENT_SQL: Result<SqlMappingRef, ArgumentError> = Ok(SqlMappingRef::literal("jsonb"));
    const RETURN_SQL: Result<ReturnsRef, ReturnsError> =
        Ok(ReturnsRef::One(SqlMappingRef::literal("jsonb")));
}
