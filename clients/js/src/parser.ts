// Parsing of `/v1/shape` values. pg_sync sends every value as Postgres' text output (UTC
// timestamps, ISO dates, hex bytea), and @electric-sql/client parses by the `electric-schema`
// header: its defaults cover bool, int2/int4, float4/float8, json/jsonb and arrays of them.
// This parser changes int8 only, so rows stay plain JSON (TanStack DB's offline outbox and
// `/sync/mutate` serialise with JSON, which has no BigInt, and TanStack DB keys are strings or
// numbers).

/** `int8` as a number when it is exactly representable, else its decimal string (exact, JSON-
 * safe, a valid collection key, and what `/sync/mutate` accepts back). Every other type keeps
 * the client's default. */
export function parseInt8(value: string): number | string {
  const n = Number(value)
  return Number.isSafeInteger(n) ? n : value
}

/** `bytea` (`\x0aff`) as bytes; opt in with `parser: { ...pgSyncParser, bytea: parseBytea }`.
 * Writes accept Uint8Array back (sent as `\x` hex). */
export function parseBytea(value: string): Uint8Array {
  const hex = value.startsWith(`\\x`) ? value.slice(2) : value
  const out = new Uint8Array(hex.length / 2)
  for (let i = 0; i < out.length; i++) out[i] = parseInt(hex.slice(2 * i, 2 * i + 2), 16)
  return out
}

/** The `parser` for ShapeStream / electricCollectionOptions' `shapeOptions`. Types that
 * stay strings on purpose: numeric (exact decimal), timestamptz/timestamp/date/time (ISO text,
 * what `new Date()` and Postgres both read), uuid, text, bytea (`\x` hex), interval. */
export const pgSyncParser = {
  int8: parseInt8,
} as const
