//! `GET /v1/shape`: Electric's HTTP Shape API over pg_sync's models, so `@electric-sql/client`
//! (and what is built on it) works against pg_sync unchanged. See docs/clients.md.
//!
//! A shape is one registered model, optionally narrowed to some of its groups (`where` on the
//! group column) and columns, as one user may see it. Offsets are sync ids: `<syncId>_0` means
//! "everything through sync id N". `offset=-1` answers a consistent snapshot at a sync id W (the
//! bootstrap's snapshot machinery) with offset `W_0`; later requests answer the log after their
//! offset (`pg_sync.changes`, scoped to the user's groups when read), up to the published
//! watermark, which is always a transaction boundary: only then is the body `up-to-date`.
//!
//! A handle is `<fingerprint>-<nonce>`: the fingerprint hashes what the client's copy depends on
//! (user, registration, columns and types, the groups the shape covers), the nonce is random, so
//! a handle is never issued twice. A request whose fingerprint no longer matches, whose offset
//! lies before the retention horizon or beyond the watermark, gets a 409 with a new handle.

use super::{bootstrap, App, Refusal};
use crate::store;
use crate::store::quote_ident as quote;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use pg_sync_lww::JS_SAFE_LIMIT;
use serde_json::{json, Value};
use sha2::Digest;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::{Client, SimpleQueryMessage};

mod lineage;

/// Values are what `col::text` gives under these settings (Electric's wire form). Snapshot
/// and log reads both use them, so one value has one text in both. lc_monetary is C because
/// the log holds money as captured, canonically (`$12.50`): the log read parses it back, which
/// under another lc_monetary fails (22P02).
const SETTINGS: &str = "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, MDY'; \
     SET IntervalStyle = 'postgres'; SET bytea_output = 'hex'; SET extra_float_digits = 1; \
     SET lc_monetary = 'C'";
const PAGE_SPAN: i32 = 5_000;
/// A delta response stops at the first page end past this many messages (not up to date then).
const MAX_MESSAGES: usize = 10_000;
/// One request reads at most this many pages of the log (`PAGE_SPAN` sync ids each) ...
const MAX_PAGES: usize = 20;
/// ... or for about this long: the answer then carries the offset reached (no up-to-date) and
/// the client asks again from there, so an old offset never costs one long request.
const READ_BUDGET: Duration = Duration::from_secs(2);
/// A snapshot answer ends at the first row past this many bytes; the client asks for the next
/// chunk with the offset it got (`W_k`), as Electric's snapshot chunks. Bounded answers keep the
/// client's response text far below V8's string limit (512 MB: one answer for a few million
/// rows could never be read in Node) and let it parse one chunk while the next is produced.
const CHUNK_BYTES: usize = 4 * 1024 * 1024;
/// Chunks produced ahead of the client's requests (its prefetch asks for two ahead).
const CHUNKS_AHEAD: usize = 2;
const SSE_KEEPALIVE: Duration = Duration::from_secs(15);
/// An SSE response ends after this long; the client reconnects from its last offset.
const SSE_MAX: Duration = Duration::from_secs(300);
const ATTEMPTS: usize = 5;

const EXPOSED: &str = "electric-offset, electric-handle, electric-schema, electric-cursor, \
     electric-up-to-date, retry-after";

/// Connections with `SETTINGS` applied, for the log reads (the shared pool keeps the server's
/// settings, which other endpoints rely on).
pub struct Shared {
    slots: Vec<tokio::sync::Mutex<Option<Arc<Client>>>>,
    next: AtomicUsize,
    /// Snapshots being read chunk by chunk, by the handle they were issued with.
    snapshots: std::sync::Mutex<HashMap<String, Arc<Session>>>,
    /// The database's lineage, checked before a snapshot carries `snapshot-end`.
    lineage: lineage::Lineage,
}

/// One chunked snapshot: its chunks, produced ahead by the task that reads the snapshot.
struct Session {
    w: i64,
    chunks: tokio::sync::Mutex<Chunks>,
    /// When a request last took a chunk (the session ends `STALL_TIMEOUT` after).
    used: std::sync::Mutex<Instant>,
}

struct Chunks {
    rx: tokio::sync::mpsc::Receiver<Chunk>,
    /// Chunks taken so far: the next request must carry offset `W_<taken>`.
    taken: u64,
}

/// A complete JSON array of snapshot rows; the `last` one ends with the up-to-date.
struct Chunk {
    body: Bytes,
    last: bool,
}

impl Default for Shared {
    fn default() -> Shared {
        Shared {
            slots: (0..2).map(|_| tokio::sync::Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
            snapshots: Default::default(),
            lineage: Default::default(),
        }
    }
}

async fn conn(app: &App) -> Result<Arc<Client>, String> {
    let s = &app.shape;
    let i = s.next.fetch_add(1, Ordering::Relaxed) % s.slots.len();
    let mut slot = s.slots[i].lock().await;
    if let Some(c) = slot.as_ref().filter(|c| !c.is_closed()) {
        return Ok(c.clone());
    }
    let c = store::connect(&app.cfg.database_url)
        .await
        .map_err(|e| e.to_string())?;
    c.batch_execute(SETTINGS).await.map_err(|e| e.to_string())?;
    let c = Arc::new(c);
    *slot = Some(c.clone());
    Ok(c)
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Offset {
    Start,
    Now,
    At(i64),
    /// `W_k` (k >= 1): the snapshot at W, after its first k chunks.
    Chunk(i64, u64),
}

/// What one request asks for.
#[derive(Debug, Clone)]
struct Params {
    table: String,
    filter: Option<String>,
    params: HashMap<usize, String>,
    columns: Option<Vec<String>>,
    offset: Offset,
    handle: Option<String>,
    live: bool,
    sse: bool,
    cursor: Option<String>,
}

fn bad(message: &str) -> Refusal {
    Refusal::new(StatusCode::BAD_REQUEST, "bad_request", message)
}

fn parse(q: &HashMap<String, String>) -> Result<Params, Refusal> {
    let table = q
        .get("table")
        .filter(|t| !t.is_empty())
        .ok_or_else(|| bad("table is required: a registered model or schema.table"))?
        .clone();
    let offset = match q.get("offset").map(String::as_str) {
        None | Some("-1") => Offset::Start,
        Some("now") => Offset::Now,
        Some(o) => match o
            .split_once('_')
            .map(|(n, k)| (n.parse::<i64>(), k.parse::<u64>()))
        {
            Some((Ok(n), Ok(0))) if n >= 0 => Offset::At(n),
            Some((Ok(n), Ok(k))) if n >= 0 && k > 0 => Offset::Chunk(n, k),
            _ => {
                return Err(bad(
                    "offset must be -1, now, or an offset this server issued",
                ))
            }
        },
    };
    let truthy = |k: &str| q.get(k).is_some_and(|v| v == "true");
    let live = truthy("live");
    let sse = live && (truthy("live_sse") || truthy("experimental_live_sse"));
    if q.get("replica").is_some_and(|r| r != "default") {
        return Err(bad(
            "replica=full is not supported: updates carry the changed columns and the key",
        ));
    }
    if q.get("log").is_some_and(|l| l != "full") {
        return Err(bad("only log=full is supported"));
    }
    if q.keys().any(|k| k.starts_with("subset__")) {
        return Err(bad("subset snapshots (subset__*) are not supported"));
    }
    if live && matches!(offset, Offset::Start | Offset::Chunk(..)) {
        return Err(bad(
            "live=true needs the offset of an up-to-date answer (not -1 or a snapshot chunk)",
        ));
    }
    let handle = q.get("handle").filter(|h| !h.is_empty()).cloned();
    if matches!(offset, Offset::At(_) | Offset::Chunk(..)) && handle.is_none() {
        return Err(bad(
            "an offset other than -1 or now needs the handle it came with",
        ));
    }
    let mut params = HashMap::new();
    for (k, v) in q {
        if let Some(n) = k.strip_prefix("params[").and_then(|r| r.strip_suffix(']')) {
            let n: usize = n
                .parse()
                .map_err(|_| bad("params keys are params[1], params[2], ..."))?;
            params.insert(n, v.clone());
        }
    }
    let columns = match q.get("columns") {
        None => None,
        Some(c) => Some(
            identifiers(c)
                .ok_or_else(|| bad("columns must be a comma-separated list of column names"))?,
        ),
    };
    Ok(Params {
        table,
        filter: q.get("where").filter(|w| !w.trim().is_empty()).cloned(),
        params,
        columns,
        offset,
        handle,
        live,
        sse,
        cursor: q.get("cursor").cloned(),
    })
}

/// Tokens of a `where` clause: the small grammar we accept.
#[derive(Debug, PartialEq, Clone)]
enum Token {
    Ident(String),
    Str(String),
    Param(usize),
    Eq,
    In,
    Open,
    Close,
    Comma,
}

fn tokens(s: &str) -> Option<Vec<Token>> {
    let b: Vec<char> = s.chars().collect();
    let mut out = vec![];
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            c if c.is_whitespace() => i += 1,
            '=' => {
                out.push(Token::Eq);
                i += 1
            }
            '(' => {
                out.push(Token::Open);
                i += 1
            }
            ')' => {
                out.push(Token::Close);
                i += 1
            }
            ',' => {
                out.push(Token::Comma);
                i += 1
            }
            '\'' | '"' => {
                let mut v = String::new();
                i += 1;
                loop {
                    let ch = *b.get(i)?;
                    if ch == c {
                        if b.get(i + 1) == Some(&c) {
                            v.push(c);
                            i += 2;
                            continue;
                        }
                        i += 1;
                        break;
                    }
                    v.push(ch);
                    i += 1;
                }
                out.push(if c == '"' {
                    Token::Ident(v)
                } else {
                    Token::Str(v)
                });
            }
            '$' => {
                let start = i + 1;
                i = start;
                while i < b.len() && b[i].is_ascii_digit() {
                    i += 1;
                }
                out.push(Token::Param(
                    b[start..i].iter().collect::<String>().parse().ok()?,
                ));
            }
            c if c.is_ascii_digit() || c == '-' => {
                let start = i;
                i += 1;
                while i < b.len() && (b[i].is_ascii_digit() || b[i] == '.') {
                    i += 1;
                }
                out.push(Token::Str(b[start..i].iter().collect()));
            }
            c if c.is_alphabetic() || c == '_' => {
                let start = i;
                while i < b.len() && (b[i].is_alphanumeric() || b[i] == '_' || b[i] == '$') {
                    i += 1;
                }
                let word: String = b[start..i].iter().collect();
                if word.eq_ignore_ascii_case("in") {
                    out.push(Token::In)
                } else {
                    // Unquoted identifiers fold to lower case, as in SQL.
                    out.push(Token::Ident(word.to_lowercase()))
                }
            }
            _ => return None,
        }
    }
    Some(out)
}

/// The group ids a `where` selects: `col = v` or `col IN (v, ...)`, `col` the group column,
/// each `v` a literal or `$n`.
fn where_groups(
    filter: &str,
    group: Option<&str>,
    params: &HashMap<usize, String>,
) -> Result<Vec<String>, Refusal> {
    let unsupported = || {
        bad(&match group {
            Some(g) => format!(
                "where supports only the group column: {g} = $1 or {g} IN ($1, $2, ...) \
                 (literals or params[n]); filter other columns in the client"
            ),
            None => "where is not supported on a model without a group column".into(),
        })
    };
    let group = group.ok_or_else(unsupported)?;
    let toks = tokens(filter).ok_or_else(unsupported)?;
    let value = |t: &Token| -> Result<String, Refusal> {
        match t {
            Token::Str(s) => Ok(s.clone()),
            Token::Param(n) => params
                .get(n)
                .cloned()
                .ok_or_else(|| bad(&format!("where uses ${n} but params[{n}] is missing"))),
            _ => Err(unsupported()),
        }
    };
    match toks.as_slice() {
        [Token::Ident(c), Token::Eq, v] if c == group => Ok(vec![value(v)?]),
        [Token::Ident(c), Token::In, Token::Open, rest @ .., Token::Close] if c == group => {
            let mut out = vec![];
            for (i, t) in rest.iter().enumerate() {
                if i % 2 == 1 {
                    if *t != Token::Comma {
                        return Err(unsupported());
                    }
                } else {
                    out.push(value(t)?);
                }
            }
            if out.is_empty() || rest.len() % 2 == 0 {
                return Err(unsupported());
            }
            Ok(out)
        }
        _ => Err(unsupported()),
    }
}

/// A comma-separated identifier list (quoted identifiers keep their case and commas).
fn identifiers(s: &str) -> Option<Vec<String>> {
    let toks = tokens(s)?;
    let mut out = vec![];
    for (i, t) in toks.iter().enumerate() {
        match (i % 2, t) {
            (0, Token::Ident(n)) => out.push(n.clone()),
            (1, Token::Comma) => {}
            _ => return None,
        }
    }
    (!out.is_empty() && toks.len() % 2 == 1).then_some(out)
}

#[derive(Clone)]
struct Col {
    name: String,
    /// Electric's `type`: the type's name (the element type's for arrays).
    typname: String,
    /// `format_type`: what casts back to the column's type.
    format: String,
    not_null: bool,
    dims: i32,
}

/// A registered model as the catalog describes it now.
#[derive(Clone)]
struct Model {
    name: String,
    schema: String,
    table: String,
    /// Quoted `schema.table`.
    rel: String,
    oid: u32,
    group: Option<String>,
    pk: Vec<String>,
    /// `registered_at` and the registry row's xmin: any re-registration or change of it.
    registered: String,
    cols: Vec<Col>,
}

impl Model {
    async fn load(db: &Client, table: &str) -> Result<Option<Model>, String> {
        // to_regclass raises on a malformed name; such a name is no model anyway.
        let rel: Option<u32> = if table.len() <= 200 {
            db.query_one(
                "SELECT (SELECT r.rel::oid FROM pg_sync.registry r
                          WHERE r.enabled AND r.model = $1)",
                &[&table],
            )
            .await
            .map_err(|e| e.to_string())?
            .get(0)
        } else {
            None
        };
        let rel = match rel {
            Some(r) => Some(r),
            None => match db
                .query_one(
                    "SELECT (SELECT r.rel::oid FROM pg_sync.registry r
                              WHERE r.enabled AND r.rel = to_regclass($1))",
                    &[&table],
                )
                .await
            {
                Ok(row) => row.get(0),
                Err(e) if e.as_db_error().is_some() => None,
                Err(e) => return Err(e.to_string()),
            },
        };
        let Some(rel) = rel else { return Ok(None) };
        let row = db
            .query_opt(
                "SELECT r.model, n.nspname::text, c.relname::text, r.group_column,
                        r.pk_columns::text[], r.registered_at::text || '/' || r.xmin::text, cols.names, cols.types,
                        cols.formats, cols.not_null, cols.dims
                   FROM pg_sync.registry r
                   JOIN pg_class c ON c.oid = r.rel
                   JOIN pg_namespace n ON n.oid = c.relnamespace,
                   LATERAL (
                     SELECT array_agg(a.attname::text ORDER BY a.attnum) AS names,
                            array_agg(CASE WHEN t.typcategory = 'A' AND t.typelem <> 0
                                           THEN et.typname ELSE t.typname END::text
                                      ORDER BY a.attnum) AS types,
                            array_agg(format_type(a.atttypid, a.atttypmod) ORDER BY a.attnum) AS formats,
                            array_agg(a.attnotnull ORDER BY a.attnum) AS not_null,
                            array_agg(CASE WHEN t.typcategory = 'A' AND t.typelem <> 0
                                           THEN greatest(a.attndims, 1) ELSE 0 END ORDER BY a.attnum) AS dims
                       FROM pg_attribute a
                       JOIN pg_type t ON t.oid = a.atttypid
                       LEFT JOIN pg_type et ON et.oid = t.typelem
                      WHERE a.attrelid = r.rel AND a.attnum > 0 AND NOT a.attisdropped
                        AND a.attname <> ALL (r.excluded_columns)) cols
                  WHERE r.rel = $1::oid AND r.enabled",
                &[&rel],
            )
            .await
            .map_err(|e| e.to_string())?;
        let Some(row) = row else { return Ok(None) };
        let names: Vec<String> = row.get(6);
        let types: Vec<String> = row.get(7);
        let formats: Vec<String> = row.get(8);
        let not_null: Vec<bool> = row.get(9);
        let dims: Vec<i32> = row.get(10);
        let cols = (0..names.len())
            .map(|i| Col {
                name: names[i].clone(),
                typname: types[i].clone(),
                format: formats[i].clone(),
                not_null: not_null[i],
                dims: dims[i],
            })
            .collect();
        let (schema, table): (String, String) = (row.get(1), row.get(2));
        Ok(Some(Model {
            name: row.get(0),
            rel: format!("{}.{}", quote(&schema), quote(&table)),
            schema,
            table,
            oid: rel,
            group: row.get(3),
            pk: row.get(4),
            registered: row.get(5),
            cols,
        }))
    }

    /// The key of a row in Electric's form: `"schema"."table"/"v1"/"v2"`.
    fn key(&self, pk_values: &[&str]) -> String {
        let mut k = format!(
            "\"{}\".\"{}\"",
            self.schema.replace('"', "\"\""),
            self.table.replace('"', "\"\"")
        );
        for v in pk_values {
            k.push_str("/\"");
            k.push_str(&v.replace('/', "//"));
            k.push('"');
        }
        k
    }

    fn relation(&self) -> Value {
        json!([self.schema, self.table])
    }
}

/// The shape as one request resolved it.
#[derive(Clone)]
struct Shape {
    user: String,
    model: Model,
    /// Indexes into `model.cols`, in the order they are sent.
    selected: Vec<usize>,
    /// For each key column, its position in `selected`.
    pk_pos: Vec<usize>,
    /// The groups whose rows the shape holds (sorted); `None`: a model without groups.
    groups: Option<Vec<String>>,
    fingerprint: String,
}

impl Shape {
    fn schema_header(&self) -> String {
        let mut schema = serde_json::Map::new();
        for &i in &self.selected {
            let c = &self.model.cols[i];
            let mut info = json!({"type": c.typname});
            if let Some(p) = self.model.pk.iter().position(|k| *k == c.name) {
                info["pk_index"] = p.into();
            }
            if c.not_null {
                info["not_null"] = true.into();
            }
            if c.dims > 0 {
                info["dims"] = c.dims.into();
            }
            schema.insert(c.name.clone(), info);
        }
        Value::Object(schema).to_string()
    }

    fn new_handle(&self) -> String {
        let mut nonce = [0u8; 8];
        getrandom::getrandom(&mut nonce).expect("the OS random source works");
        format!("{}-{}", self.fingerprint, hex(&nonce))
    }

    fn handle_matches(&self, handle: &str) -> bool {
        handle.split_once('-').map(|(f, _)| f) == Some(self.fingerprint.as_str())
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

async fn resolve(app: &App, user: &str, p: &Params) -> Result<Shape, Refusal> {
    let unavailable = |e: String| {
        tracing::warn!(error = %e, "shape lookup failed");
        unavailable("database unavailable; retry")
    };
    let db = app.db.get().await.map_err(|e| unavailable(e.to_string()))?;
    let model = db
        .track(Model::load(&db, &p.table))
        .await
        .map_err(unavailable)?
        .ok_or_else(|| {
            bad(&format!(
                "table {:?} is not a registered model (see pg_sync.tables())",
                p.table
            ))
        })?;
    let selected: Vec<usize> = match &p.columns {
        None => (0..model.cols.len()).collect(),
        Some(names) => {
            let mut out = vec![];
            for n in names {
                let i = model
                    .cols
                    .iter()
                    .position(|c| &c.name == n)
                    .ok_or_else(|| {
                        bad(&format!(
                            "column {n:?} is not a synced column of this model"
                        ))
                    })?;
                if !out.contains(&i) {
                    out.push(i);
                }
            }
            out
        }
    };
    let mut pk_pos = vec![];
    for k in &model.pk {
        let pos = selected
            .iter()
            .position(|&i| &model.cols[i].name == k)
            .ok_or_else(|| bad(&format!("columns must include the key column {k:?}")))?;
        pk_pos.push(pos);
    }
    let groups = match &model.group {
        None => {
            if p.filter.is_some() {
                where_groups("", None, &p.params)?;
            }
            None
        }
        Some(g) => {
            let wanted = match &p.filter {
                Some(f) => Some(where_groups(f, Some(g), &p.params)?),
                None => None,
            };
            let rows = db
                .query(
                    "SELECT group_id FROM pg_sync.group_memberships WHERE user_id = $1",
                    &[&user],
                )
                .await
                .map_err(|e| unavailable(e.to_string()))?;
            let mut mine: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
            if let Some(w) = wanted {
                mine.retain(|g| w.contains(g));
            }
            mine.sort();
            mine.dedup();
            Some(mine)
        }
    };
    let mut h = sha2::Sha256::new();
    let mut put = |s: &str| {
        h.update(s.as_bytes());
        h.update([0]);
    };
    put(user);
    put(&model.name);
    put(&model.oid.to_string());
    put(&model.registered);
    for &i in &selected {
        put(&model.cols[i].name);
        put(&model.cols[i].format);
    }
    put(if groups.is_some() { "groups" } else { "global" });
    for g in groups.iter().flatten() {
        put(g);
    }
    let fingerprint = hex(&h.finalize()[..8]);
    Ok(Shape {
        user: user.to_owned(),
        model,
        selected,
        pk_pos,
        groups,
        fingerprint,
    })
}

fn unavailable(message: &str) -> Refusal {
    Refusal::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
}

/// CORS headers for a request from `origin` (none when the origin is not allowed).
fn cors(app: &App, req: &HeaderMap) -> Vec<(HeaderName, HeaderValue)> {
    let origin = req.get(header::ORIGIN).and_then(|o| o.to_str().ok());
    let allowed: Vec<&str> = app
        .cfg
        .shape_cors_origins
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let allow = if allowed.contains(&"*") {
        Some("*".to_owned())
    } else {
        origin.filter(|o| allowed.contains(o)).map(str::to_owned)
    };
    let Some(allow) = allow.and_then(|a| HeaderValue::from_str(&a).ok()) else {
        return vec![];
    };
    vec![
        (header::ACCESS_CONTROL_ALLOW_ORIGIN, allow),
        (
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static(EXPOSED),
        ),
    ]
}

/// Headers every `/v1/shape` answer carries: answers are per user and never cached.
fn finish(app: &App, req: &HeaderMap, mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::VARY,
        HeaderValue::from_static("authorization, origin"),
    );
    if resp.status() == StatusCode::SERVICE_UNAVAILABLE {
        resp.headers_mut()
            .entry(header::RETRY_AFTER)
            .or_insert(HeaderValue::from_static("1"));
    }
    for (k, v) in cors(app, req) {
        resp.headers_mut().insert(k, v);
    }
    resp
}

/// `OPTIONS /v1/shape`: the CORS preflight.
pub async fn preflight(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let resp = super::cors_preflight(&headers, "GET, HEAD, OPTIONS");
    finish(&app, &headers, resp)
}

/// A 2xx answer with Electric's headers.
struct Answer<'a> {
    handle: &'a str,
    offset: i64,
    /// Non-zero for a snapshot chunk's offset `offset_chunk`.
    chunk: u64,
    schema: Option<String>,
    cursor: Option<String>,
    up_to_date: bool,
}

impl Answer<'_> {
    fn into_response(self, content_type: &'static str, body: Body) -> Response {
        let mut resp = Response::new(body);
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        let mut set = |k: &'static str, v: &str| {
            if let Ok(v) = HeaderValue::from_str(v) {
                h.insert(HeaderName::from_static(k), v);
            }
        };
        set("electric-handle", self.handle);
        set(
            "electric-offset",
            &format!("{}_{}", self.offset, self.chunk),
        );
        if let Some(s) = &self.schema {
            set("electric-schema", s);
        }
        if let Some(c) = &self.cursor {
            set("electric-cursor", c);
        }
        if self.up_to_date {
            set("electric-up-to-date", "");
        }
        resp
    }
}

/// The live cursor: a value that differs from the one the client sent (it only busts caches).
fn next_cursor(sent: Option<&str>) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    match sent.and_then(|s| s.parse::<u64>().ok()) {
        Some(s) if s >= now => (s + 1).to_string(),
        _ => now.to_string(),
    }
}

fn up_to_date(sync_id: i64) -> String {
    json!({"headers": {"control": "up-to-date", "global_last_seen_lsn": sync_id.to_string()}})
        .to_string()
}

/// A 409: the client's copy cannot be continued; it starts over with `handle`.
fn must_refetch(handle: &str) -> Response {
    let mut resp = (
        StatusCode::CONFLICT,
        [(header::CONTENT_TYPE, "application/json")],
        r#"[{"headers":{"control":"must-refetch"}}]"#,
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(handle) {
        resp.headers_mut()
            .insert(HeaderName::from_static("electric-handle"), v);
    }
    resp
}

/// `GET /v1/shape`.
pub async fn shape(State(app): State<Arc<App>>, headers: HeaderMap, uri: Uri) -> Response {
    let resp = answer(&app, &headers, &uri).await;
    finish(&app, &headers, resp)
}

async fn answer(app: &Arc<App>, headers: &HeaderMap, uri: &Uri) -> Response {
    let q = axum::extract::Query::<HashMap<String, String>>::try_from_uri(uri)
        .map(|q| q.0)
        .unwrap_or_default();
    let p = match parse(&q) {
        Ok(p) => p,
        Err(r) => return r.into_response(),
    };
    // Subscribed before the key is checked: a key revoked from here on ends a held request.
    let revocations = app.hub.revocations();
    // Subscribed before the registration is read (`resolve`): a re-registration published
    // from here on wakes the held request, which then finds its fingerprint changed. (Taken
    // after the read, a wake sent in between was lost and the request held to its deadline.)
    let wakes = p.live.then(|| app.hub.touched());
    let identity = match super::authenticate(app, headers, &q).await {
        Ok(i) => i,
        Err(r) => return r.into_response(),
    };
    let shape = match resolve(app, &identity.user, &p).await {
        Ok(s) => s,
        Err(r) => return r.into_response(),
    };
    if p.live && crate::failpoint::fire("shape_pause_after_resolve") {
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let watch = identity.held_key().map(|key| KeyWatch {
        key,
        rx: revocations,
    });
    let Some(watermark) = app.hub.watermark() else {
        return unavailable("the worker is starting; retry").into_response();
    };
    match p.offset {
        Offset::Start => snapshot(app.clone(), shape).await,
        Offset::Chunk(w, k) => match p.handle.as_deref() {
            Some(h) if shape.handle_matches(h) => next_chunk(app, &shape, h, w, k).await,
            _ => must_refetch(&shape.new_handle()),
        },
        Offset::Now => {
            let handle = match &p.handle {
                Some(h) if shape.handle_matches(h) => h.clone(),
                _ => shape.new_handle(),
            };
            let a = Answer {
                handle: &handle,
                offset: watermark,
                chunk: 0,
                schema: (!p.live).then(|| shape.schema_header()),
                cursor: p.live.then(|| next_cursor(p.cursor.as_deref())),
                up_to_date: true,
            };
            a.into_response(
                "application/json",
                Body::from(format!("[{}]", up_to_date(watermark))),
            )
        }
        Offset::At(after) => {
            let handle = p.handle.clone().unwrap_or_default();
            if !shape.handle_matches(&handle) || after > watermark {
                return must_refetch(&shape.new_handle());
            }
            if p.sse {
                return sse(
                    app.clone(),
                    shape,
                    handle,
                    after,
                    p.clone(),
                    identity.expires,
                    watch,
                    wakes,
                );
            }
            changes(app, &shape, &handle, after, &p, watch, wakes).await
        }
    }
}

/// One page of the log as Electric messages.
struct Page {
    messages: Vec<String>,
    /// Sync id the page reaches.
    end: i64,
}

/// Reads the shape's changes in (`after`, `through`], at most about `MAX_MESSAGES`, `MAX_PAGES`
/// pages or `READ_BUDGET`.
/// `Ok(None)`: the log before `after` was compacted (the client must refetch).
async fn read_log(
    app: &App,
    shape: &Shape,
    after: i64,
    through: i64,
) -> Result<Option<Page>, String> {
    held(app)?;
    let db = conn(app).await?;
    let row = db
        .query_one(
            &format!("SELECT pg_sync.retention_horizon(), {}", lineage::LIVE_SQL),
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    let horizon: i64 = row.get(0);
    if after < horizon {
        return Ok(None);
    }
    // Within the grace after a lineage change the changes name no xid: the new primary may have
    // handed out again the xid of a write the old one acknowledged and lost, and a client waiting
    // for that txid would take this change for it (TanStack DB checks the txids it has seen).
    let live: lineage::Id = (row.get(1), row.get(2));
    let grace = Duration::from_secs(app.cfg.shape_lineage_grace_secs);
    // `settled` answers from memory when it can (a connection is at hand here anyway).
    let named = app.shape.lineage.settled(&db, live, grace).await;
    let m = &shape.model;
    let mut items = vec![];
    for (pos, &i) in shape.selected.iter().enumerate() {
        let c = &m.cols[i];
        let lit = sql_literal(&c.name);
        // Capture stores SQL NULL and JSON null alike as JSON null, which
        // `jsonb_populate_record` makes SQL NULL. A NOT NULL json/jsonb column holds no SQL
        // NULL, so its value is the captured JSON text (`null` stays the text `null`, as the
        // snapshot sends it; the client refuses a null in a not_null column).
        // (Rows captured before exact texts existed; see below for the others.)
        let json_text = c.not_null && c.dims == 0 && matches!(c.typname.as_str(), "json" | "jsonb");
        let from_json = if json_text {
            format!("(c.data -> {lit})::text")
        } else {
            format!("r.{}::text", quote(&c.name))
        };
        // A value whose JSON form loses something (a JSON null, array bounds, a json text,
        // composites) comes with its exact text under the key '' (docs/extension.md): read back
        // through the type, so it prints under this session's settings like the snapshot.
        let from_data = format!(
            "coalesce((c.data -> '' ->> {lit})::{}::text, {from_json})",
            c.format
        );
        match shape.pk_pos.iter().position(|&p| p == pos) {
            // Updates carry only the changed columns: the key comes from the model id.
            Some(k) => {
                let id = if m.pk.len() == 1 {
                    "c.model_id".to_owned()
                } else {
                    format!("(c.model_id::jsonb ->> {k})")
                };
                items.push(format!(
                    "true, CASE WHEN c.data ? {lit} THEN {from_data} ELSE ({id})::{}::text END",
                    c.format
                ));
            }
            None => items.push(format!("c.data ? {lit}, {from_data}")),
        }
    }
    let sql = format!(
        "SELECT c.sync_id, c.action, {txid}, {items}
           FROM pg_sync.changes($1, $2, $3) c
           -- The action's transaction: the one holding its sync id (the log has no index on id).
           CROSS JOIN LATERAL (SELECT o.xid FROM pg_sync.commit_order o
                                WHERE o.first_sync_id <= c.sync_id
                                ORDER BY o.first_sync_id DESC LIMIT 1) a
           LEFT JOIN LATERAL jsonb_populate_record(NULL::{rel}, c.data) r ON true
          WHERE c.model = $4
          ORDER BY c.sync_id",
        items = items.join(", "),
        rel = m.rel,
        txid = txid_sql(),
    );
    let stmt = db.prepare(&sql).await.map_err(|e| e.to_string())?;
    let relation = m.relation();
    let mut messages = vec![];
    let mut cursor = after;
    let started = Instant::now();
    let max_pages = if crate::failpoint::fire("shape_one_page") {
        1
    } else {
        MAX_PAGES
    };
    let mut pages = 0;
    while cursor < through
        && messages.len() < MAX_MESSAGES
        && pages < max_pages
        && (pages == 0 || started.elapsed() < READ_BUDGET)
    {
        pages += 1;
        let span = store::page_span(cursor, through, PAGE_SPAN);
        // Read and turned into messages under a turn of replay's admission (`admission`).
        let _turn = app
            .replay
            .enter(&shape.user, app.hub.published() - cursor)
            .await;
        let rows = db
            .query(&stmt, &[&cursor, &shape.groups, &span, &m.name])
            .await
            .map_err(|e| e.to_string())?;
        for row in &rows {
            let sync_id: i64 = row.get(0);
            let action: &str = row.get(1);
            let txids: Vec<i64> = row
                .get::<_, Option<i64>>(2)
                .filter(|_| named)
                .into_iter()
                .collect();
            let mut value = serde_json::Map::new();
            let mut pk: Vec<&str> = vec![""; m.pk.len()];
            let mut non_key = 0;
            for (pos, &i) in shape.selected.iter().enumerate() {
                let present: bool = row.get(3 + 2 * pos);
                let text: Option<&str> = row.get(4 + 2 * pos);
                let key = shape.pk_pos.iter().position(|&p| p == pos);
                if let Some(k) = key {
                    pk[k] = text.unwrap_or_default();
                }
                if action == "D" && key.is_none() {
                    continue;
                }
                if present {
                    non_key += usize::from(key.is_none());
                    value.insert(
                        m.cols[i].name.clone(),
                        text.map_or(Value::Null, |t| Value::String(t.to_owned())),
                    );
                }
            }
            let operation = match action {
                "I" => "insert",
                "U" if non_key == 0 => continue,
                "U" => "update",
                _ => "delete",
            };
            messages.push(
                json!({
                    "headers": {"operation": operation, "relation": relation,
                                "lsn": sync_id.to_string(), "op_position": 0, "txids": txids},
                    "key": m.key(&pk),
                    "value": value,
                })
                .to_string(),
            );
        }
        cursor += i64::from(span);
    }
    // Read after the pages: a compaction that took rows from them is seen (never a gap).
    let now: i64 = db
        .query_one("SELECT pg_sync.retention_horizon()", &[])
        .await
        .map_err(|e| e.to_string())?
        .get(0);
    if now > after {
        return Ok(None);
    }
    held(app)?;
    Ok(Some(Page {
        messages,
        end: cursor.min(through),
    }))
}

/// While the hub holds its watermark (a crash of Postgres lost published ids, not assigned
/// again yet) the log has a hole below `through`: a read from it would answer an offset past
/// changes it never sends (they are not published again). Checked before and after a read.
fn held(app: &App) -> Result<(), String> {
    match app.hub.watermark() {
        Some(_) => Ok(()),
        None => Err("the watermark is held (published ids are being assigned again); retry".into()),
    }
}

/// A change's txid: its transaction's full xid8 (epoch included), as `/sync/mutate`'s `txid` and
/// `snapshot-end`, so one never wraps against another. NULL (left out of `txids`) at or above
/// 2^53 (`JS_SAFE_LIMIT`), which a JS number cannot hold: xids that pg_sync remapped after a
/// restore (2^62 and up, docs/extension.md); no client waits for those.
fn txid_sql() -> String {
    format!("CASE WHEN a.xid::text::bigint < {JS_SAFE_LIMIT} THEN a.xid::text::bigint END")
}

fn sql_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A non-SSE answer from the log after `after` (long-polled when `live`).
async fn changes(
    app: &Arc<App>,
    shape: &Shape,
    handle: &str,
    mut after: i64,
    p: &Params,
    mut watch: Option<KeyWatch>,
    wakes: Option<tokio::sync::broadcast::Receiver<Arc<crate::hub::Touched>>>,
) -> Response {
    let hold = Duration::from_secs(app.cfg.shape_long_poll_secs);
    let deadline = tokio::time::Instant::now() + hold;
    let mut wakes = wakes.unwrap_or_else(|| app.hub.touched());
    let mut shutdown = app.shutdown.clone();
    loop {
        // Holds the read back a while (tests: a crash of Postgres happens meanwhile).
        if crate::failpoint::fire("shape_read_pause") {
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        let through = app.hub.published();
        let page = match read_log(app, shape, after, through).await {
            Ok(Some(page)) => page,
            Ok(None) => return must_refetch(&shape.new_handle()),
            Err(e) => {
                tracing::warn!(error = %e, "shape log read failed");
                return unavailable("database unavailable; retry").into_response();
            }
        };
        // Checked after the read: nothing written after a revocation goes out under the key.
        match key_revoked(app, &mut watch).await {
            Ok(false) => {}
            Ok(true) => return revoked_key(),
            Err(e) => {
                tracing::warn!(error = %e, "api key check failed");
                return Refusal::key_unchecked().into_response();
            }
        }
        let caught_up = page.end >= through;
        if !p.live || !page.messages.is_empty() || !caught_up {
            return respond_messages(shape, handle, page, caught_up, p);
        }
        after = through;
        tokio::select! {
            woke = next_wake(&mut wakes, shape) => if !woke { break },
            _ = tokio::time::sleep_until(deadline) => break,
            _ = shutdown.changed() => break,
        }
        // The user's groups may have changed with that publish.
        if let Ok(now) = fingerprint_now(app, shape, p).await {
            if now != shape.fingerprint {
                return must_refetch(&shape.new_handle());
            }
        }
    }
    respond_messages(
        shape,
        handle,
        Page {
            messages: vec![],
            end: after,
        },
        true,
        p,
    )
}

/// Waits for a publish that may concern `shape` (its model, its user's memberships, or
/// everyone's); false when the hub is gone. Subscribed before the held request read the
/// watermark, so no publish after that read is missed (earlier ones only wake it needlessly).
/// Cancel-safe: what it skipped concerned other shapes.
async fn next_wake(
    wakes: &mut tokio::sync::broadcast::Receiver<Arc<crate::hub::Touched>>,
    shape: &Shape,
) -> bool {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        match wakes.recv().await {
            Ok(t)
                if t.everyone
                    || t.models.contains(&shape.model.name)
                    || t.members.contains(&shape.user) =>
            {
                return true
            }
            Ok(_) => continue,
            Err(RecvError::Lagged(_)) => return true,
            Err(RecvError::Closed) => return false,
        }
    }
}

/// The API key a request was authenticated with, and the hub's revocations.
struct KeyWatch {
    key: super::HeldKey,
    rx: tokio::sync::broadcast::Receiver<crate::hub::Revoked>,
}

/// Whether the watched key was revoked since the request was authenticated (`None`, a JWT,
/// never is). Revocations the receiver missed (it lagged behind a burst of other keys'
/// revocations) are settled by the database, as a new request would be: a valid key must not
/// get a 401 because others were revoked.
async fn key_revoked(app: &App, watch: &mut Option<KeyWatch>) -> Result<bool, String> {
    use crate::hub::Revoked;
    use tokio::sync::broadcast::error::TryRecvError;
    let Some(w) = watch else { return Ok(false) };
    let mut missed = false;
    loop {
        match w.rx.try_recv() {
            Ok(Revoked::All) => return Ok(true),
            Ok(Revoked::Key(k)) if k == w.key.id => return Ok(true),
            Ok(Revoked::Key(_)) => continue,
            Err(TryRecvError::Lagged(_)) => missed = true,
            Err(TryRecvError::Empty | TryRecvError::Closed) => break,
        }
    }
    if !missed {
        return Ok(false);
    }
    // The same id, hash and user as authenticated: a key moved to another user keeps its id
    // and hash.
    Ok(!w.key.valid(app).await?)
}

/// The answer to a request whose API key was revoked while it was held (what a new request
/// with the key gets).
fn revoked_key() -> Response {
    Refusal::key_revoked().into_response()
}

/// The fingerprint the shape would have now (the user's groups may have changed).
async fn fingerprint_now(app: &App, shape: &Shape, p: &Params) -> Result<String, Refusal> {
    resolve(app, &shape.user, p).await.map(|s| s.fingerprint)
}

fn respond_messages(
    shape: &Shape,
    handle: &str,
    page: Page,
    caught_up: bool,
    p: &Params,
) -> Response {
    let mut body =
        String::with_capacity(page.messages.iter().map(|m| m.len() + 1).sum::<usize>() + 64);
    body.push('[');
    for m in &page.messages {
        if body.len() > 1 {
            body.push(',');
        }
        body.push_str(m);
    }
    if caught_up {
        if body.len() > 1 {
            body.push(',');
        }
        body.push_str(&up_to_date(page.end));
    }
    body.push(']');
    Answer {
        handle,
        offset: page.end,
        chunk: 0,
        schema: (!p.live).then(|| shape.schema_header()),
        cursor: p.live.then(|| next_cursor(p.cursor.as_deref())),
        up_to_date: caught_up,
    }
    .into_response("application/json", Body::from(body))
}

/// `offset=-1`: every row of the shape in one consistent snapshot at a sync id W, then
/// `up-to-date` at `W_0`.
async fn snapshot(app: Arc<App>, shape: Shape) -> Response {
    let wait = Duration::from_secs(app.cfg.bootstrap_wait_secs);
    let Ok(Ok(permit)) =
        tokio::time::timeout(wait, app.bootstrap_slots.clone().acquire_owned()).await
    else {
        return Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            "too many snapshots at once; retry shortly",
        )
        .into_response();
    };
    let failed = |e: String| {
        tracing::warn!(error = %e, "shape snapshot failed");
        unavailable("cannot take a consistent snapshot now; retry").into_response()
    };
    // No pooled connection is held here: consistent_point takes one per query, never across
    // its fence wait.
    for _ in 0..ATTEMPTS {
        let snap = match store::connect(&app.cfg.database_url).await {
            Ok(s) => s,
            Err(e) => return failed(e.to_string()),
        };
        if let Err(e) = snap.batch_execute(SETTINGS).await {
            return failed(e.to_string());
        }
        match bootstrap::consistent_point(&app, &snap).await {
            Ok(Some(w)) => {
                let (handle, session) =
                    stream_snapshot(app.clone(), permit, shape.clone(), snap, w);
                return take_chunk(&app, &shape, &handle, &session, 0).await;
            }
            Ok(None) => continue,
            Err(e) => return failed(e),
        }
    }
    failed("no consistent snapshot after retries".into())
}

/// Types whose `::text` is the group id pg_sync records (`canonical_text`) without a call.
const OWN_TEXT: &[&str] = &[
    "text",
    "character varying",
    "integer",
    "bigint",
    "smallint",
    "uuid",
];

fn stream_snapshot(
    app: Arc<App>,
    permit: tokio::sync::OwnedSemaphorePermit,
    shape: Shape,
    snap: Client,
    w: i64,
) -> (String, Arc<Session>) {
    let handle = shape.new_handle();
    let m = &shape.model;
    let items: Vec<String> = shape
        .selected
        .iter()
        .map(|&i| format!("t.{}::text", quote(&m.cols[i].name)))
        .collect();
    let filter = match &m.group {
        None => "$1::text[] IS NULL".to_owned(),
        // As the bootstrap (`bootstrap::query::Model::select`).
        Some(g) => crate::store::group_filter(
            g,
            m.cols
                .iter()
                .any(|c| &c.name == g && OWN_TEXT.contains(&c.format.as_str())),
        ),
    };
    let sql = format!(
        "SELECT {} FROM {} t WHERE {filter}",
        items.join(", "),
        m.rel
    );
    let (tx, rx) = tokio::sync::mpsc::channel::<Chunk>(CHUNKS_AHEAD);
    let session = Arc::new(Session {
        w,
        chunks: tokio::sync::Mutex::new(Chunks { rx, taken: 0 }),
        used: std::sync::Mutex::new(Instant::now()),
    });
    app.shape
        .snapshots
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(handle.clone(), session.clone());
    tokio::spawn(reap(app.clone(), handle.clone(), Arc::downgrade(&session)));
    tokio::spawn(async move {
        let _permit = permit;
        // As /sync/bootstrap: a client that asks for no chunk for `STALL_TIMEOUT`, or has not
        // taken them all by `DEADLINE`, loses the snapshot (its next chunk request gets a 409),
        // and dropping `snap` ends the snapshot and frees the slot.
        let deadline = if crate::failpoint::fire("shape_snapshot_deadline") {
            Instant::now()
        } else {
            Instant::now() + bootstrap::DEADLINE
        };
        let mut shutdown = app.shutdown.clone();
        let m = &shape.model;
        let mut prefix = br#"{"headers":{"operation":"insert","relation":"#.to_vec();
        prefix.extend_from_slice(m.relation().to_string().as_bytes());
        prefix.extend_from_slice(br#"},"key":"#);
        let names: Vec<String> = shape
            .selected
            .iter()
            .map(|&i| Value::from(m.cols[i].name.clone()).to_string())
            .collect();
        let mut buf: Vec<u8> = Vec::with_capacity(CHUNK_BYTES + 64 * 1024);
        buf.push(b'[');
        let visibility = snapshot_end(&app, &snap).await;
        let rows = match snap.query_raw(&sql, [&shape.groups]).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "shape snapshot query failed");
                return;
            }
        };
        futures::pin_mut!(rows);
        let mut count = 0u64;
        let mut in_chunk = 0usize;
        while let Some(row) = rows.next().await {
            let Ok(row) = row else {
                // The session ends without its last chunk: the next request gets a 409.
                return;
            };
            if in_chunk > 0 {
                buf.push(b',');
            }
            count += 1;
            in_chunk += 1;
            buf.extend_from_slice(&prefix);
            let pk: Vec<&str> = shape
                .pk_pos
                .iter()
                .map(|&p| row.get::<_, Option<&str>>(p).unwrap_or_default())
                .collect();
            serde_json::to_writer(&mut buf, &m.key(&pk)).expect("a string serializes");
            buf.extend_from_slice(br#","value":{"#);
            for (pos, name) in names.iter().enumerate() {
                if pos > 0 {
                    buf.push(b',');
                }
                buf.extend_from_slice(name.as_bytes());
                buf.push(b':');
                match row.get::<_, Option<&str>>(pos) {
                    Some(v) => serde_json::to_writer(&mut buf, v).expect("a string serializes"),
                    None => buf.extend_from_slice(b"null"),
                }
            }
            buf.extend_from_slice(b"}}");
            if buf.len() >= CHUNK_BYTES {
                buf.push(b']');
                let body = Bytes::from(std::mem::replace(
                    &mut buf,
                    Vec::with_capacity(CHUNK_BYTES + 64 * 1024),
                ));
                buf.push(b'[');
                in_chunk = 0;
                let chunk = Chunk { body, last: false };
                if !send_chunk(&tx, chunk, deadline, &mut shutdown).await {
                    return;
                }
            }
        }
        let _ = snap.batch_execute("COMMIT").await;
        drop(snap);
        app.counters
            .bootstrap_rows
            .fetch_add(count, Ordering::Relaxed);
        if in_chunk > 0 {
            buf.push(b',');
        }
        if let Some(end) = visibility {
            buf.extend_from_slice(end.as_bytes());
            buf.push(b',');
        }
        buf.extend_from_slice(up_to_date(w).as_bytes());
        buf.push(b']');
        let chunk = Chunk {
            body: Bytes::from(buf),
            last: true,
        };
        send_chunk(&tx, chunk, deadline, &mut shutdown).await;
    });
    (handle, session)
}

/// Electric's `snapshot-end` control message for the snapshot `snap` reads (its xmin, xmax and
/// in-progress xids): full xid8 values, the txid space of `/sync/mutate`'s `txid` and the log's
/// `txids`. A write committed before the snapshot comes with its rows and never again in the log
/// after W, so a client waiting for its txid (TanStack DB's `awaitTxId`, the offline outbox after
/// a reload) learns here that it has it; without this it waited out its whole timeout.
/// `None` (the client then waits for the txid as before) when:
/// - the snapshot's xmax is at or above 2^53 (`JS_SAFE_LIMIT`: a JS number cannot hold it);
/// - the database's lineage is unknown or changed within the grace (`lineage`): after a failover
///   or a restore, xids may be handed out again;
/// - the read fails: it runs under a savepoint, so the snapshot goes on without it.
async fn snapshot_end(app: &App, snap: &Client) -> Option<String> {
    // (Tests: the read fails, as it would for a role refused one of its functions.)
    let fail = if crate::failpoint::fire("shape_visibility_fails") {
        "1 / 0"
    } else {
        "1"
    };
    // One round trip: the savepoint, the read and its release go as one simple-query batch (an
    // error skips the rest of it; the savepoint is then rolled back to).
    let sql = format!(
        "SAVEPOINT visibility;
         SELECT pg_snapshot_xmin(s)::text, pg_snapshot_xmax(s)::text,
                array_to_string(ARRAY(SELECT pg_snapshot_xip(s)::text), ','), {}
           FROM pg_current_snapshot() s WHERE {fail} = 1;
         RELEASE SAVEPOINT visibility",
        lineage::LIVE_SQL
    );
    let read = async {
        let rows = match snap.simple_query(&sql).await {
            Ok(rows) => rows,
            Err(e) => {
                snap.batch_execute("ROLLBACK TO SAVEPOINT visibility")
                    .await
                    .map_err(|e| e.to_string())?;
                return Err(e.to_string());
            }
        };
        let row = rows
            .into_iter()
            .find_map(|m| match m {
                SimpleQueryMessage::Row(r) => Some(r),
                _ => None,
            })
            .ok_or("no row")?;
        let int = |i: usize| -> Result<i64, String> {
            row.get(i)
                .unwrap_or_default()
                .parse::<i64>()
                .map_err(|e| e.to_string())
        };
        let xip = match row.get(2).unwrap_or_default() {
            "" => vec![],
            list => list
                .split(',')
                .map(|x| x.parse::<i64>().map_err(|e| e.to_string()))
                .collect::<Result<Vec<i64>, String>>()?,
        };
        Ok::<_, String>((int(0)?, int(1)?, xip, (int(3)?, int(4)?)))
    };
    let (xmin, xmax, xip, live): (i64, i64, Vec<i64>, lineage::Id) = read
        .await
        .map_err(|e| tracing::warn!(error = %e, "shape snapshot visibility query failed"))
        .ok()?;
    if xmax >= JS_SAFE_LIMIT {
        return None;
    }
    let settled = match app.shape.lineage.cached(live) {
        Some(answer) => answer,
        None => {
            let db = conn(app)
                .await
                .map_err(|e| tracing::warn!(error = %e, "cannot check the database lineage"))
                .ok()?;
            let grace = Duration::from_secs(app.cfg.shape_lineage_grace_secs);
            app.shape.lineage.settled(&db, live, grace).await
        }
    };
    if !settled {
        return None;
    }
    let text = |x: i64| x.to_string();
    Some(
        json!({"headers": {"control": "snapshot-end", "xmin": text(xmin), "xmax": text(xmax),
                            "xip_list": xip.into_iter().map(text).collect::<Vec<_>>()}})
        .to_string(),
    )
}

/// Ends a chunked snapshot session no request has taken a chunk from for `STALL_TIMEOUT`.
async fn reap(app: Arc<App>, handle: String, session: std::sync::Weak<Session>) {
    loop {
        tokio::time::sleep(bootstrap::STALL_TIMEOUT / 4).await;
        let Some(s) = session.upgrade() else { return };
        let idle = s.used.lock().unwrap_or_else(|p| p.into_inner()).elapsed();
        if idle >= bootstrap::STALL_TIMEOUT {
            forget(&app, &handle, &s);
            return;
        }
    }
}

/// Removes `session` (if it is still the one under `handle`).
fn forget(app: &App, handle: &str, session: &Arc<Session>) {
    let mut all = app
        .shape
        .snapshots
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if all.get(handle).is_some_and(|s| Arc::ptr_eq(s, session)) {
        all.remove(handle);
    }
}

/// The answer with the snapshot's chunk `k` (`k` chunks were taken before). A session that is
/// gone (stalled, past its deadline, failed, another worker's) or a chunk out of turn (a
/// retried request whose chunk was already taken) is a 409: the client starts over.
async fn take_chunk(
    app: &App,
    shape: &Shape,
    handle: &str,
    session: &Arc<Session>,
    k: u64,
) -> Response {
    let mut chunks = session.chunks.lock().await;
    *session.used.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    if chunks.taken != k {
        drop(chunks);
        forget(app, handle, session);
        return must_refetch(&shape.new_handle());
    }
    let chunk = tokio::time::timeout(bootstrap::STALL_TIMEOUT, chunks.rx.recv()).await;
    let Ok(Some(chunk)) = chunk else {
        drop(chunks);
        forget(app, handle, session);
        return must_refetch(&shape.new_handle());
    };
    chunks.taken += 1;
    *session.used.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    if chunk.last {
        drop(chunks);
        forget(app, handle, session);
    }
    Answer {
        handle,
        offset: session.w,
        chunk: if chunk.last { 0 } else { k + 1 },
        schema: Some(shape.schema_header()),
        cursor: None,
        up_to_date: chunk.last,
    }
    .into_response("application/json", Body::from(chunk.body))
}

/// `offset=W_k`: the next chunk of the snapshot issued with `handle`.
async fn next_chunk(app: &App, shape: &Shape, handle: &str, w: i64, k: u64) -> Response {
    let session = app
        .shape
        .snapshots
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(handle)
        .cloned();
    match session {
        Some(s) if s.w == w => take_chunk(app, shape, handle, &s, k).await,
        _ => must_refetch(&shape.new_handle()),
    }
}

/// Sends one snapshot chunk; false when the client has gone, took nothing for
/// `STALL_TIMEOUT`, the `deadline` passed, or the worker is shutting down.
async fn send_chunk(
    tx: &tokio::sync::mpsc::Sender<Chunk>,
    chunk: Chunk,
    deadline: Instant,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
) -> bool {
    // Checked first: a send into a channel with room completes even with a zero timeout, so a
    // client that keeps up would otherwise hold its slot and snapshot past the deadline.
    if Instant::now() >= deadline {
        return false;
    }
    let wait = bootstrap::STALL_TIMEOUT.min(deadline.saturating_duration_since(Instant::now()));
    tokio::select! {
        biased;
        sent = tokio::time::timeout(wait, tx.send(chunk)) => matches!(sent, Ok(Ok(()))),
        _ = shutdown.wait_for(|s| *s) => false,
    }
}

/// `live=true&live_sse=true`: the changes after `after` as Server-Sent Events, one message per
/// event, an `up-to-date` (carrying the sync id it is up to) after each batch, and keep-alive
/// comments. Ends after `SSE_MAX` or when the token expires (the client reconnects from its
/// last offset), or when the shape's groups change (the reconnect then gets the 409).
#[allow(clippy::too_many_arguments)] // what the request resolved, handed over as it is
fn sse(
    app: Arc<App>,
    shape: Shape,
    handle: String,
    after: i64,
    p: Params,
    expires: Option<std::time::SystemTime>,
    mut watch: Option<KeyWatch>,
    wakes: Option<tokio::sync::broadcast::Receiver<Arc<crate::hub::Touched>>>,
) -> Response {
    let answer = Answer {
        handle: &handle,
        offset: after,
        chunk: 0,
        schema: None,
        cursor: Some(next_cursor(p.cursor.as_deref())),
        up_to_date: false,
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    let resp = answer.into_response(
        "text/event-stream",
        Body::from_stream(super::receiver_stream(rx)),
    );
    // A test sees a keep-alive without waiting 15 s.
    let keepalive = if crate::failpoint::fire("shape_fast_keepalive") {
        Duration::from_secs(1)
    } else {
        SSE_KEEPALIVE
    };
    tokio::spawn(async move {
        let deadline = Instant::now() + SSE_MAX;
        let mut wakes = wakes.unwrap_or_else(|| app.hub.touched());
        let mut shutdown = app.shutdown.clone();
        let mut after = after;
        let mut first = true;
        // The stream ends when the token does; the client reconnects with a fresh one.
        let expiry = super::stream::token_expiry(expires);
        tokio::pin!(expiry);
        loop {
            let through = app.hub.published();
            let page = match read_log(&app, &shape, after, through).await {
                Ok(Some(page)) => page,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "shape log read failed");
                    return;
                }
            };
            // The stream ends when the key is revoked: the reconnect gets the 401.
            // (A failed check ends it too: the reconnect authenticates again.)
            if !matches!(key_revoked(&app, &mut watch).await, Ok(false)) {
                return;
            }
            let caught_up = page.end >= through;
            let mut out = String::new();
            for m in &page.messages {
                out.push_str("data: ");
                out.push_str(m);
                out.push_str("\n\n");
            }
            if caught_up && (first || !page.messages.is_empty()) {
                out.push_str("data: ");
                out.push_str(&up_to_date(page.end));
                out.push_str("\n\n");
            }
            first = false;
            after = page.end;
            if !out.is_empty() && tx.send(Bytes::from(out)).await.is_err() {
                return;
            }
            if !caught_up {
                continue;
            }
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                tokio::select! {
                    woke = next_wake(&mut wakes, &shape) => if woke { break } else { return },
                    _ = tokio::time::sleep(keepalive.min(left)) => {
                        if Instant::now() >= deadline {
                            return;
                        }
                        if tx.send(Bytes::from_static(b": keep-alive\n\n")).await.is_err() {
                            return;
                        }
                    }
                    _ = shutdown.changed() => return,
                    _ = tx.closed() => return,
                    _ = &mut expiry => return,
                }
            }
            match fingerprint_now(&app, &shape, &p).await {
                Ok(now) if now == shape.fingerprint => {}
                _ => return,
            }
        }
    });
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn where_accepts_only_the_group_column() {
        let params: HashMap<usize, String> = [(1, "a".into()), (2, "b".into())].into();
        let g = Some("project_id");
        assert_eq!(where_groups("project_id = $1", g, &params).unwrap(), ["a"]);
        assert_eq!(
            where_groups(r#""project_id" IN ($1, 'it''s', 7)"#, g, &params).unwrap(),
            ["a", "it's", "7"]
        );
        assert_eq!(
            where_groups("PROJECT_ID in ($2)", g, &params).unwrap(),
            ["b"]
        );
        for refused in [
            "title = 'x'",
            "project_id = $1 AND title = 'x'",
            "project_id IN ()",
            "project_id IN ($1,)",
            "project_id <> $1",
            "project_id = $3",
            "lower(project_id) = $1",
            r#""Project_id" = $1"#,
        ] {
            assert!(where_groups(refused, g, &params).is_err(), "{refused}");
        }
        assert!(where_groups("id = 1", None, &params).is_err());
    }

    #[test]
    fn offsets_columns_and_keys() {
        let q = |s: &[(&str, &str)]| -> HashMap<String, String> {
            s.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let p = parse(&q(&[("table", "t"), ("offset", "12_0"), ("handle", "h")])).unwrap();
        assert_eq!(p.offset, Offset::At(12));
        // `W_k`: the snapshot at W after its first k chunks (live needs an up-to-date offset).
        let p = parse(&q(&[("table", "t"), ("offset", "12_1"), ("handle", "h")])).unwrap();
        assert_eq!(p.offset, Offset::Chunk(12, 1));
        assert!(parse(&q(&[
            ("table", "t"),
            ("offset", "12_1"),
            ("handle", "h"),
            ("live", "true")
        ]))
        .is_err());
        assert!(parse(&q(&[("table", "t"), ("offset", "12_x"), ("handle", "h")])).is_err());
        assert!(parse(&q(&[("table", "t"), ("offset", "12_0")])).is_err());
        let p = parse(&q(&[
            ("table", "t"),
            ("offset", "5_0"),
            ("handle", "h"),
            ("live", "true"),
            ("live_sse", "true"),
        ]))
        .unwrap();
        assert!(p.live && p.sse);
        assert_eq!(
            identifiers(r#"id, "Title","a,b""#).unwrap(),
            ["id", "Title", "a,b"]
        );
        assert_eq!(identifiers("id,,x"), None);
        let m = Model {
            name: "t".into(),
            schema: "public".into(),
            table: "to\"dos".into(),
            rel: String::new(),
            oid: 0,
            group: None,
            pk: vec!["a".into(), "b".into()],
            registered: String::new(),
            cols: vec![],
        };
        assert_eq!(m.key(&["x/y", "2"]), r#""public"."to""dos"/"x//y"/"2""#);
    }
}
