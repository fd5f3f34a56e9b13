// Initial sync through GET /v1/shape with the real @electric-sql/client (tests/shape's copy):
// counts the rows of the first up-to-date and prints {"what":"shape","secs":..,"rows":..}.
// Usage: node bench/shape_client.mjs URL TOKEN TABLE
import { pathToFileURL } from 'node:url'
import { dirname, join } from 'node:path'

const here = dirname(new URL(import.meta.url).pathname)
const { ShapeStream } = await import(
  pathToFileURL(join(here, '../tests/shape/node_modules/@electric-sql/client/dist/index.mjs')).href
)
const [url, token, table] = process.argv.slice(2)
const ac = new AbortController()
const started = performance.now()
let rows = 0
await new Promise((resolve, reject) => {
  const stream = new ShapeStream({
    url,
    params: { table },
    headers: { Authorization: `Bearer ${token}` },
    signal: ac.signal,
    onError: (e) => reject(e),
  })
  stream.subscribe((msgs) => {
    for (const m of msgs) {
      if (m.headers.operation === 'insert') rows++
      if (m.headers.control === 'up-to-date') resolve()
    }
  })
})
const secs = (performance.now() - started) / 1000
ac.abort()
console.log(JSON.stringify({ what: 'shape', secs, rows }))
process.exit(0)
