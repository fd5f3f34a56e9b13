// Where the real @electric-sql/client spends its initial-sync time per row: its own
// MessageParser (taken from the pinned package in tests/shape, not modified) on N rows in
// /v1/shape's snapshot form, against a plain JSON.parse, the same rows without
// `headers.relation`, and values parsed after a plain JSON.parse. Node only, no server.
// Usage: node bench/shape_parse.mjs [rows]   (needs `npm ci` in tests/shape)
import { readFileSync, readdirSync } from 'node:fs'
import { fileURLToPath } from 'node:url'
const dist = fileURLToPath(new URL('../tests/shape/node_modules/@electric-sql/client/dist/', import.meta.url))
const chunk = readdirSync(dist).find((f) => /^chunk-.*\.mjs$/.test(f) && readFileSync(dist + f, 'utf8').includes('var MessageParser'))
const src = readFileSync(dist + chunk, 'utf8') + '\nexport { MessageParser as __MessageParser };\n'
const { __MessageParser: MessageParser } = await import('data:text/javascript,' + encodeURIComponent(src))
const N = Number(process.argv[2] || 100000)
// bench/shape.sh's table, as the worker sends it.
const schema = { id: { type: 'int8', pk_index: 0, not_null: true }, grp: { type: 'text', not_null: true },
  title: { type: 'text', not_null: true }, done: { type: 'bool', not_null: true }, n: { type: 'int4' },
  updated_at: { type: 'timestamptz', not_null: true } }
const row = (i, rel) => JSON.stringify({ headers: rel ? { operation: 'insert', relation: ['public', 'items'] } : { operation: 'insert' },
  key: `"public"."items"/"${i}"`, value: { id: `${i}`, grp: 'g1', title: `item number ${i}`, done: i % 3 ? 'false' : 'true', n: `${i % 1000}`, updated_at: '2026-11-30 06:00:00.123456+00' } })
const text = (rel) => '[' + Array.from({ length: N }, (_, i) => row(i + 1, rel)).join(',') + ']'
const withRel = text(true), noRel = text(false)
const p = new MessageParser({ int8: (v) => { const n = Number(v); return Number.isSafeInteger(n) ? n : v } })
const time = (name, f) => {
  const ts = []
  for (let r = 0; r < 5; r++) { const t = performance.now(); f(); ts.push(performance.now() - t) }
  ts.sort((a, b) => a - b)
  console.log(`| ${name} | ${ts[0].toFixed(0)} / ${ts[2].toFixed(0)} / ${ts[4].toFixed(0)} | ${(N / ts[2] * 1000).toFixed(0)} |`)
}
console.log(`${N} rows; bytes/row ${(withRel.length / N).toFixed(0)} (without relation ${(noRel.length / N).toFixed(0)})`)
console.log(`| parse | ms min / median / max (5) | rows/s (median) |\n|---|---|---|`)
time('JSON.parse, no reviver', () => JSON.parse(withRel))
time('client MessageParser.parse', () => p.parse(withRel, schema))
time('client MessageParser.parse, no headers.relation', () => p.parse(noRel, schema))
time('JSON.parse, then the client\'s value parsing per row', () => { for (const m of JSON.parse(withRel)) p.transformMessageValue(m.value, schema) })
