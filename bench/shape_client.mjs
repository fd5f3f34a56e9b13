// Initial sync through GET /v1/shape. Default: the real @electric-sql/client (tests/shape's
// copy), counting the rows of the first up-to-date. `raw`: the same requests (chunk after
// chunk, following electric-offset) read as text and not parsed: what the worker and the
// transport cost without the client's parsing. Prints {"what":..,"secs":..,"rows":..,"bytes":..}.
// Usage: node bench/shape_client.mjs URL TOKEN TABLE [client|raw] [ROWS (raw: for the report)]
import { pathToFileURL } from 'node:url'
import { dirname, join } from 'node:path'

const here = dirname(new URL(import.meta.url).pathname)
const [url, token, table, mode = 'client', expected = '0'] = process.argv.slice(2)
const headers = { Authorization: `Bearer ${token}` }
const started = performance.now()
let rows = 0
let bytes = 0
if (mode === 'raw') {
  let offset = '-1'
  let handle
  for (;;) {
    const u = new URL(url)
    u.searchParams.set('table', table)
    u.searchParams.set('offset', offset)
    if (handle) u.searchParams.set('handle', handle)
    const res = await fetch(u, { headers })
    if (res.status !== 200) throw new Error(`status ${res.status}: ${await res.text()}`)
    bytes += (await res.text()).length
    handle = res.headers.get('electric-handle')
    offset = res.headers.get('electric-offset')
    if (res.headers.has('electric-up-to-date')) break
  }
  rows = Number(expected)
} else {
  const { ShapeStream } = await import(
    pathToFileURL(join(here, '../tests/shape/node_modules/@electric-sql/client/dist/index.mjs')).href
  )
  const ac = new AbortController()
  await new Promise((resolve, reject) => {
    const stream = new ShapeStream({
      url,
      params: { table },
      headers,
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
  ac.abort()
}
const secs = (performance.now() - started) / 1000
console.log(JSON.stringify({ what: mode, secs, rows, bytes }))
process.exit(0)
