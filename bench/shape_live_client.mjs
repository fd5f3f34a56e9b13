// Live delivery through GET /v1/shape with the real @electric-sql/client (tests/shape's copy):
// one ShapeStream (long-poll, or SSE with `sse`), synced first, then for SECONDS after a line on
// stdin measures now - ts (the writer's clock at insert, unix ms) of every insert it receives.
// Prints READY when up to date, then {"what":MODE,"deliveries":..,"p50_ms":..,"p99_ms":..}.
// Usage: node bench/shape_live_client.mjs URL TOKEN TABLE longpoll|sse SECONDS
import { pathToFileURL } from 'node:url'
import { dirname, join } from 'node:path'
import { createInterface } from 'node:readline'

const here = dirname(new URL(import.meta.url).pathname)
const { ShapeStream } = await import(
  pathToFileURL(join(here, '../tests/shape/node_modules/@electric-sql/client/dist/index.mjs')).href
)
const [url, token, table, mode, seconds] = process.argv.slice(2)
const lat = []
let measuring = false
let ready = false
const stream = new ShapeStream({
  url,
  params: { table },
  headers: { Authorization: `Bearer ${token}` },
  liveSse: mode === 'sse',
  onError: (e) => {
    console.error('shape error', e)
    process.exit(1)
  },
})
stream.subscribe((msgs) => {
  const now = Date.now()
  for (const m of msgs) {
    if (measuring && m.headers.operation === 'insert') lat.push(now - Number(m.value.ts))
    if (!ready && m.headers.control === 'up-to-date') {
      ready = true
      console.log('READY')
    }
  }
})
const rl = createInterface({ input: process.stdin })
rl.once('line', () => {
  measuring = true
  setTimeout(() => {
    measuring = false
    lat.sort((a, b) => a - b)
    const pct = (p) => (lat.length ? lat[Math.min(lat.length - 1, Math.ceil(p * lat.length) - 1)] : null)
    console.log(JSON.stringify({ what: mode, deliveries: lat.length, p50_ms: pct(0.5), p99_ms: pct(0.99) }))
    process.exit(0)
  }, Number(seconds) * 1000)
})
