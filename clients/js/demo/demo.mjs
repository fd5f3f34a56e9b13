// The demo page's script (`/demo`, `make run`), written the way an app uses pg_sync: a TanStack
// DB collection on /v1/shape with writes through /sync/mutate (this package), and an offline
// outbox (@tanstack/offline-transactions, IndexedDB) so writes made offline survive a reload and
// apply once. Bundled into sync_worker/static/demo.js by scripts/build-demo.sh.
import { createCollection } from '@tanstack/db'
import { startOfflineExecutor } from '@tanstack/offline-transactions'
import { pgSyncCollectionOptions } from '../dist/index.js'
import { pgSyncOfflineMutationFn } from '../dist/offline.js'

const params = new URLSearchParams(location.search)
const token = params.get(`token`)
const project = params.get(`project`) || `demo`
const store = window.sessionStorage
if (!store.getItem(`pg_sync_client`)) store.setItem(`pg_sync_client`, `demo-` + crypto.randomUUID())
const clientId = store.getItem(`pg_sync_client`)
const url = location.origin
const headers = { Authorization: `Bearer ${token}` }
const $ = (id) => document.getElementById(id)
const status = (s) => ($(`status`).textContent = s)
$(`project`).textContent = `(project ${project})`

const tasks = createCollection(
  pgSyncCollectionOptions({ id: `tasks`, url, headers, clientId, model: `tasks`, getKey: (t) => t.id }),
)
const executor = startOfflineExecutor({
  collections: { tasks },
  mutationFns: { sync: pgSyncOfflineMutationFn({ url, headers, clientId }) },
})

// Every write is an offline transaction: shown at once, kept in the outbox until the server
// has applied it and its change came back through the shape.
function write(fn) {
  const tx = executor.createOfflineTransaction({ mutationFnName: `sync`, autoCommit: false })
  tx.mutate(fn)
  tx.commit().catch((e) => status(`write rejected: ${e.message}`))
}

function render() {
  const ul = $(`tasks`)
  ul.replaceChildren()
  ;[...tasks.values()]
    .filter((t) => t.project_id === project)
    .sort((a, b) => String(a.title).localeCompare(String(b.title)))
    .forEach((t) => {
      const li = document.createElement(`li`)
      li.dataset.id = t.id
      // Not yet confirmed: the collection still shows it from a pending transaction.
      const pending = tasks._state.optimisticUpserts.has(t.id)
      li.className = (t.done ? `done` : ``) + (pending ? ` pending` : ``)
      const box = document.createElement(`input`)
      box.type = `checkbox`
      box.checked = !!t.done
      box.onchange = () => write(() => tasks.update(t.id, (d) => void (d.done = box.checked)))
      const span = document.createElement(`span`)
      span.textContent = t.title
      const del = document.createElement(`button`)
      del.className = `delete`
      del.title = `delete`
      del.textContent = `×`
      del.onclick = () => write(() => tasks.delete(t.id))
      li.append(box, span, del)
      ul.append(li)
    })
}

let live = false
async function showStatus() {
  const queued = executor.isOfflineEnabled ? (await executor.peekOutbox()).length : 0
  if (!navigator.onLine || (queued > 0 && !live)) status(`offline: ${queued} change(s) queued`)
  else if (live) status(queued > 0 ? `live, sending ${queued} change(s)` : `live`)
}

$(`add`).onsubmit = (e) => {
  e.preventDefault()
  const title = $(`title`)
  const row = { id: crypto.randomUUID(), title: title.value, project_id: project, done: false }
  write(() => tasks.insert(row))
  title.value = ``
}

if (!token) status(`open this page with ?token=<token printed by make run>`)
else {
  tasks.subscribeChanges(render)
  Promise.all([executor.waitForInit(), tasks.preload()]).then(
    () => {
      live = true
      render()
      showStatus()
      setInterval(showStatus, 250)
    },
    (e) => status(String(e)),
  )
}
