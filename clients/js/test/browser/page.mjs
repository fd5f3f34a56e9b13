// A page built from the package (bundled by esbuild with the real TanStack DB libraries) for
// the headless Chromium test (tests/browser/tanstack.mjs): a todos collection on /v1/shape and an
// offline executor with its default storage (IndexedDB), leader election (Web Locks) and
// connectivity (online/offline events). The test drives it through `window.app`. Query
// parameters: `token`; `worker` (the worker's origin, default the page's own: another origin
// makes every request cross-origin, CORS); `sse=1` (live updates over SSE, `liveSse`).
import { createCollection } from '@tanstack/db'
import { startOfflineExecutor } from '@tanstack/offline-transactions'
import { pgSyncCollectionOptions } from '../../dist/index.js'
import { pgSyncOfflineMutationFn } from '../../dist/offline.js'

const query = new URLSearchParams(location.search)
const token = query.get(`token`)
const url = query.get(`worker`) ?? location.origin
const sse = query.get(`sse`) === `1`
const headers = { Authorization: `Bearer ${token}` }

const todos = createCollection(
  pgSyncCollectionOptions({
    id: `todos`,
    url,
    headers,
    model: `todos`,
    getKey: (row) => row.id,
    txidTimeout: 8_000,
    ...(sse ? { shapeOptions: { liveSse: true } } : {}),
  }),
)
const executor = startOfflineExecutor({
  collections: { todos },
  mutationFns: { sync: pgSyncOfflineMutationFn({ url, headers, txidTimeout: 8_000 }) },
})

function write(fn) {
  const tx = executor.createOfflineTransaction({ mutationFnName: `sync`, autoCommit: false })
  tx.mutate(() => fn(todos))
  tx.commit().catch((e) => console.warn(`write failed: ${e}`))
}

window.app = {
  ready: (async () => {
    await executor.waitForInit()
    await todos.preload()
    return executor.storageDiagnostic.message
  })(),
  insert: (id, title) => write((t) => t.insert({ id, title, project: `p1` })),
  rename: (id, title) =>
    write((t) =>
      t.update(id, (d) => {
        d.title = title
      }),
    ),
  rows: () =>
    [...todos.values()].map((r) => `${r.id}|${r.title}`).sort(),
  outbox: async () => (await executor.peekOutbox()).length,
  // What a test that times out prints: each queued write's attempts and last error.
  outboxState: async () =>
    (await executor.peekOutbox()).map((t) => ({
      keys: t.keys,
      retryCount: t.retryCount,
      lastError: t.lastError?.message,
      nextAttemptInMs: t.nextAttemptAt - Date.now(),
    })),
}
