//! Exact texts of the values `to_jsonb` cannot carry: the `""` entry of a captured row's JSON.
//!
//! Captured rows are `to_jsonb(row)`, which loses a few things for good: a JSON `null` in a
//! json/jsonb column reads back as SQL NULL, an array's lower bounds (`'[2:3]={1,2}'` becomes
//! `[1,2]`), a json column's own text (spacing, key order, duplicate keys), and the same inside
//! composites and arrays of json or composites. Readers that need the value itself (the
//! `/v1/shape` value is `col::text`) would serve another value than the table holds.
//!
//! So a row whose JSON loses something also carries, under the key `""` (never a column name:
//! Postgres refuses zero-length identifiers), an object of those columns' text output under the
//! canonical settings (`canonical::output`: UTC, ISO dates, hex bytea):
//! `{"id": 1, "a": [1, 2], "": {"a": "[2:3]={1,2}"}}`. Only such rows pay, and only for such
//! columns: plain arrays only when a lower bound is not 1, jsonb only for a JSON `null`; json,
//! composites and arrays of json, jsonb or composites always (their JSON form can hide either).
//! The entry lists only columns that are in the action's data and not SQL NULL.
//!
//! Readers: `/v1/shape` prefers the entry's text; `/sync/*` frames drop the entry (their rows are
//! `to_jsonb` form, as `/sync/bootstrap` sends them); `apply_remote` ignores it. Log rows written
//! before the entry existed have none and are read as before.

use crate::deep::Jsonb;
use pgrx::pg_sys;
use pgrx::prelude::*;
use serde_json::{Map, Value};

/// The key of the entry in a captured row's JSON.
pub const KEY: &str = "";

#[derive(Clone, Copy, PartialEq, Debug)]
enum When {
    /// Always: json, composites, arrays of json, jsonb or composites.
    Always,
    /// jsonb: only a JSON `null`.
    JsonbNull,
    /// Arrays of other types: only when a lower bound is not 1.
    Bounds,
}

/// The columns of one table whose JSON form may lose something.
#[derive(Default)]
pub struct Columns {
    /// (attribute index, when, output function).
    cols: Vec<(usize, When, pg_sys::Oid)>,
}

/// Whether and when a value of `typid` needs its exact text.
///
/// # Safety
/// Catalog lookups: inside a transaction.
unsafe fn when(typid: pg_sys::Oid) -> Option<When> {
    unsafe {
        let base = pg_sys::getBaseType(typid);
        match base {
            pg_sys::JSONOID => return Some(When::Always),
            pg_sys::JSONBOID => return Some(When::JsonbNull),
            _ => {}
        }
        if pg_sys::type_is_rowtype(base) {
            return Some(When::Always);
        }
        let elem = pg_sys::get_element_type(base);
        if elem == pg_sys::InvalidOid {
            return None;
        }
        Some(match when(elem) {
            Some(_) => When::Always,
            None => When::Bounds,
        })
    }
}

impl Columns {
    /// The columns among `captured` (attribute indexes of `tupdesc`) that may need their text.
    ///
    /// # Safety
    /// `tupdesc` is a valid descriptor; inside a transaction.
    pub unsafe fn of(tupdesc: pg_sys::TupleDesc, captured: &[usize]) -> Columns {
        let mut cols = vec![];
        for &i in captured {
            // SAFETY: i is an attribute index of the descriptor.
            let typid = unsafe { (*(*tupdesc).attrs.as_ptr().add(i)).atttypid };
            // SAFETY: catalog lookups in a transaction.
            if let Some(w) = unsafe { when(typid) } {
                let mut func = pg_sys::InvalidOid;
                let mut varlena = false;
                unsafe { pg_sys::getTypeOutputInfo(typid, &mut func, &mut varlena) };
                cols.push((i, w, func));
            }
        }
        Columns { cols }
    }

    /// `data` with the `""` entry added when some value in it needs its exact text.
    /// `in_data(i)`: attribute `i` is in the action's data.
    ///
    /// # Safety
    /// `values`/`nulls` are a deformed row of the descriptor `of` saw; `data` is a jsonb datum.
    pub unsafe fn add_to(
        &self,
        data: pg_sys::Datum,
        names: &[Option<String>],
        values: &[pg_sys::Datum],
        nulls: &[bool],
        in_data: impl Fn(usize) -> bool,
    ) -> pg_sys::Datum {
        let mut texts = Map::new();
        for &(i, w, func) in &self.cols {
            if nulls[i] || !in_data(i) {
                continue;
            }
            // SAFETY: a non-null datum of the column's own type.
            let needed = match w {
                When::Always => true,
                When::JsonbNull => unsafe { is_jsonb_null(values[i]) },
                When::Bounds => unsafe { has_other_bounds(values[i]) },
            };
            if needed {
                // SAFETY: the column type's output function on a non-null value of it.
                let text = unsafe { crate::canonical::output(func, values[i]) };
                let name = names[i].clone().unwrap_or_default();
                texts.insert(name, Value::String(text));
            }
        }
        if texts.is_empty() {
            return data;
        }
        let mut entry = Map::new();
        entry.insert(KEY.to_owned(), Value::Object(texts));
        let entry = Jsonb(Value::Object(entry))
            .into_datum()
            .expect("jsonb is not null");
        // SAFETY: jsonb || jsonb, both non-null jsonb datums.
        unsafe {
            let mut concat: pg_sys::FmgrInfo = std::mem::zeroed();
            pg_sys::fmgr_info(pg_sys::Oid::from(pg_sys::F_JSONB_CONCAT), &mut concat);
            pg_sys::FunctionCall2Coll(&mut concat, pg_sys::InvalidOid, data, entry)
        }
    }
}

/// A jsonb that is the JSON scalar `null`. Only a tiny inline datum can be one, so nothing is
/// fetched or decompressed to tell (`to_jsonb` already read the value once).
///
/// # Safety
/// `value` is a non-null jsonb datum.
unsafe fn is_jsonb_null(value: pg_sys::Datum) -> bool {
    unsafe {
        let raw = value.cast_mut_ptr::<pg_sys::varlena>();
        // header + one JEntry: 8 bytes; anything longer (or out of line) is not a bare null.
        if pgrx::varlena::varatt_is_1b_e(raw)
            || pgrx::varlena::varatt_is_4b_c(raw)
            || pgrx::varlena::varsize_any_exhdr(raw) > 8
        {
            return false;
        }
        let out = pg_sys::OidOutputFunctionCall(pg_sys::Oid::from(pg_sys::F_JSONB_OUT), value);
        let null = std::ffi::CStr::from_ptr(out).to_bytes() == b"null";
        pg_sys::pfree(out.cast());
        null
    }
}

/// An array with a lower bound other than 1 in some dimension. Reads only the array's header
/// (a slice: a toasted array is not fetched whole a second time).
///
/// # Safety
/// `value` is a non-null array datum.
unsafe fn has_other_bounds(value: pg_sys::Datum) -> bool {
    // ArrayType's fields after the length word, then dims[ndim] and lbound[ndim] (MAXDIM 6).
    const HEADER: usize = std::mem::size_of::<pg_sys::ArrayType>() - 4 + 2 * 4 * 6;
    unsafe {
        let arr = pg_sys::pg_detoast_datum_slice(value.cast_mut_ptr(), 0, HEADER as i32)
            .cast::<pg_sys::ArrayType>();
        let ndim = ((*arr).ndim as usize).min(6);
        // ARR_LBOUND: the lower bounds follow the dimensions, right after the header.
        let dims = arr
            .cast::<u8>()
            .add(std::mem::size_of::<pg_sys::ArrayType>()) as *const i32;
        let other = (0..ndim).any(|d| dims.add(ndim + d).read_unaligned() != 1);
        pg_sys::pfree(arr.cast());
        other
    }
}

/// `data` without the `""` entry (a reader that wants the JSON form only).
pub fn strip(data: &mut Map<String, Value>) {
    data.remove(KEY);
}
