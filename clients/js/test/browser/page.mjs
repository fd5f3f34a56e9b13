// A page built from the package (bundled by esbuild with the real TanStack DB libraries) for
// the headless Chromium test (tests/browser/tanstack.mjs): a todos collection on /v1/shape and an
// offline executor with its default storage (IndexedDB), leader election (Web Locks) and
// connectivity (online/offline events). The test drives it through `window.app`.
import { createCollection } from '@tanstack/db'
import { startOfflineExecutor } from '@tanstack/offline-transactions'
import { pgSyncCollectionOptions } from '../../dist/index.js'
import { pgSyncOfflineMutationFn } from '../../dist/offline.js'

const token = new URLSearchParams(location.search).get(`token`)
const url = location.origin
const headers = { Authorization: `Bearer ${token}` }

const todos = createCollection(
  pgSyncCollectionOptions({
    id: `todos`,
    url,
    headers,
    model: `todos`,
    getKey: (row) => row.id,
    txidTimeout: 8_000,
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
}
