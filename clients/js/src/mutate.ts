// The write path: turns TanStack DB pending mutations into pg_sync ops and posts them to
// `POST /sync/mutate`, one client transaction each, keyed by a UUID the caller chooses.

/** A header value, or a function giving it per request (e.g. a fresh access token). */
export type HeaderValue = string | (() => string | Promise<string>)

/** Where and as whom to write. */
export interface PgSyncConnection {
  /** The worker's base URL, e.g. `https://sync.example.com` (no trailing path). */
  url: string
  /** Request headers, typically `{ Authorization: () => `Bearer ${token()}` }`. */
  headers?: Record<string, HeaderValue>
  /**
   * The `clientId` of mutate requests. Exactly-once is per (user, clientId, clientTxId), so it
   * must be the same across reloads for an offline replay to be recognised; the default is a
   * constant, which is safe because transaction ids are random UUIDs.
   */
  clientId?: string
  /** A fetch implementation (default: the global one). */
  fetch?: typeof fetch
}

/** One op of a client transaction, as `pg_sync.mutate` takes it. */
export interface PgSyncOp {
  model: string
  action: `I` | `U` | `D`
  id?: unknown
  data?: Record<string, unknown>
}

/** The result of one client transaction, as `POST /sync/mutate` answers it. */
export interface PgSyncTxResult {
  clientTxId: string
  status: `applied` | `duplicate` | `rejected`
  /** How many change messages the transaction made (0: none will come back). */
  changes?: number
  /**
   * The applying transaction's full 64-bit xid (epoch included; absent at or above 2^53), also
   * on a duplicate: what `/v1/shape` change messages carry in `headers.txids` and its
   * `snapshot-end` compares (TanStack DB's `awaitTxId`).
   */
  txid?: number
  ops?: Array<{ model: string; id: string; action: string; status: string }>
  code?: string
  message?: string
  op?: number
  field?: string
}

/** Which model a collection writes, and its key columns (in the table's key order). */
export interface PgSyncModel {
  model: string
  primaryKey: Array<string>
}

/** The server refused the transaction (`status: "rejected"`): retrying cannot help. */
export class PgSyncRejectedError extends Error {
  readonly result: PgSyncTxResult
  constructor(result: PgSyncTxResult) {
    super(
      `pg_sync refused the write (${result.code ?? `error`}): ${result.message ?? ``}`,
    )
    this.name = `PgSyncRejectedError`
    this.result = result
  }
}

/** The request failed as a whole: `status` 0 for a network error. `retriable` says whether a
 * later attempt may succeed (network, 401, 408, 429, 5xx). */
export class PgSyncRequestError extends Error {
  readonly status: number
  readonly retriable: boolean
  readonly body: unknown
  constructor(status: number, message: string, body?: unknown) {
    super(message)
    this.name = `PgSyncRequestError`
    this.status = status
    this.body = body
    this.retriable =
      status === 0 || status === 401 || status === 408 || status === 429 || status >= 500
  }
}

export const DEFAULT_CLIENT_ID = `pg-sync-js`

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i

/** A client transaction id: `preferred` when it is a UUID, else a fresh one. */
export function clientTxIdFor(preferred?: string): string {
  return preferred && UUID.test(preferred) ? preferred : crypto.randomUUID()
}

/** Resolves header values (functions are called per request). */
export async function resolveHeaders(
  headers: Record<string, HeaderValue> | undefined,
): Promise<Record<string, string>> {
  const out: Record<string, string> = {}
  for (const [k, v] of Object.entries(headers ?? {})) {
    out[k] = typeof v === `function` ? await v() : v
  }
  return out
}

/** JSON for a write: BigInt as a decimal string, Date as ISO 8601, bytes as `\x` hex (what
 * Postgres' input functions accept). */
export function toWireJson(value: unknown): string {
  return JSON.stringify(value, function (this: unknown, key: string, v: unknown) {
    // `v` has already been through Date.prototype.toJSON; the holder has the original.
    const original = (this as Record<string, unknown>)[key]
    if (typeof original === `bigint`) return original.toString()
    if (original instanceof Uint8Array) {
      return `\\x` + Array.from(original, (b) => b.toString(16).padStart(2, `0`)).join(``)
    }
    return v
  })
}

function keyOf(row: Record<string, unknown>, m: PgSyncModel): unknown {
  const parts = m.primaryKey.map((k) => {
    const v = row[k]
    if (v === undefined || v === null) {
      throw new Error(`pg_sync: ${m.model}: key column "${k}" is missing from the row`)
    }
    return typeof v === `bigint` ? v.toString() : v
  })
  return parts.length === 1 ? parts[0] : parts
}

/** The op for one TanStack DB pending mutation. Inserts send the whole row (keys included),
 * updates only the changed non-key columns, deletes only the key. */
export function opFor(
  mutation: {
    type: string
    original: unknown
    modified: unknown
    changes: unknown
  },
  m: PgSyncModel,
): PgSyncOp {
  switch (mutation.type) {
    case `insert`:
      return { model: m.model, action: `I`, data: { ...(mutation.modified as object) } }
    case `update`: {
      const original = mutation.original as Record<string, unknown>
      const data: Record<string, unknown> = {}
      for (const [k, v] of Object.entries((mutation.changes ?? {}) as object)) {
        if (!m.primaryKey.includes(k)) data[k] = v
      }
      return { model: m.model, action: `U`, id: keyOf(original, m), data }
    }
    case `delete`:
      return {
        model: m.model,
        action: `D`,
        id: keyOf(mutation.original as Record<string, unknown>, m),
      }
    default:
      throw new Error(`pg_sync: unknown mutation type "${mutation.type}"`)
  }
}

/** Posts one client transaction and returns its result; throws PgSyncRejectedError when the
 * server refused it and PgSyncRequestError when the request failed. */
export async function postTransaction(
  conn: PgSyncConnection,
  clientTxId: string,
  ops: Array<PgSyncOp>,
): Promise<PgSyncTxResult> {
  const doFetch = conn.fetch ?? globalThis.fetch
  const body = toWireJson({
    clientId: conn.clientId ?? DEFAULT_CLIENT_ID,
    transactions: [{ clientTxId, ops }],
  })
  let response: Response
  try {
    response = await doFetch(`${conn.url.replace(/\/+$/, ``)}/sync/mutate`, {
      method: `POST`,
      headers: { ...(await resolveHeaders(conn.headers)), "content-type": `application/json` },
      body,
    })
  } catch (e) {
    throw new PgSyncRequestError(0, `pg_sync: mutate request failed: ${String(e)}`)
  }
  const text = await response.text()
  let parsed: unknown
  try {
    parsed = JSON.parse(text)
  } catch {
    parsed = text
  }
  if (!response.ok) {
    const message =
      (parsed as { message?: string } | undefined)?.message ?? response.statusText
    throw new PgSyncRequestError(
      response.status,
      `pg_sync: mutate answered ${response.status}: ${message}`,
      parsed,
    )
  }
  const result = (parsed as { results?: Array<PgSyncTxResult> }).results?.[0]
  if (!result) {
    throw new PgSyncRequestError(response.status, `pg_sync: mutate answered no result`, parsed)
  }
  if (result.status === `rejected`) throw new PgSyncRejectedError(result)
  return result
}
