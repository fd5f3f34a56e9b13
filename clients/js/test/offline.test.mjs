// @tanstack/offline-transactions on pg_sync, with the real libraries: writes made offline are
// persisted in the outbox, survive a restart (a new collection and executor on the same
// storage), are replayed when online again, one answer is lost on purpose, and Postgres holds
// each write exactly once.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { mkdtempSync, readFileSync, writeFileSync, existsSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createCollection } from '@tanstack/db'
import { startOfflineExecutor } from '@tanstack/offline-transactions'
import { pgSyncCollectionOptions } from '../dist/index.js'
import { pgSyncOfflineMutationFn, clientTxIdForKey } from '../dist/offline.js'
import { url, headers, sql, until } from './helpers.mjs'

/** The outbox in a JSON file: what IndexedDB is in a browser (kept across "reloads"). */
class FileStorage {
  constructor(path) {
    this.path = path
  }
  read() {
    return existsSync(this.path) ? JSON.parse(readFileSync(this.path, `utf8`)) : {}
  }
  async get(key) {
    return this.read()[key] ?? null
  }
  async set(key, value) {
    const all = this.read()
    all[key] = value
    writeFileSync(this.path, JSON.stringify(all))
  }
  async delete(key) {
    const all = this.read()
    delete all[key]
    writeFileSync(this.path, JSON.stringify(all))
  }
  async keys() {
    return Object.keys(this.read())
  }
  async clear() {
    writeFileSync(this.path, `{}`)
  }
}

/** A switchable connectivity signal (the browser's online/offline events). */
class Connectivity {
  constructor(online) {
    this.online = online
    this.subscribers = new Set()
  }
  subscribe(cb) {
    this.subscribers.add(cb)
    return () => this.subscribers.delete(cb)
  }
  notifyOnline() {
    for (const cb of this.subscribers) cb()
  }
  isOnline() {
    return this.online
  }
  set(online) {
    this.online = online
    if (online) this.notifyOnline()
  }
  dispose() {
    this.subscribers.clear()
  }
}

const leader = {
  requestLeadership: async () => true,
  releaseLeadership: () => {},
  isLeader: () => true,
  onLeadershipChange: () => () => {},
}

/** One "page load": a collection and an executor on the given storage. */
function boot(storage, connectivity, fetchImpl) {
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
    mutationFns: {
      sync: pgSyncOfflineMutationFn({ url, headers, fetch: fetchImpl, txidTimeout: 8_000 }),
    },
    storage,
    onlineDetector: connectivity,
    leaderElection: leader,
    jitter: false,
  })
  return { todos, executor }
}

function offlineWrite(executor, todos, fn) {
  const tx = executor.createOfflineTransaction({ mutationFnName: `sync`, autoCommit: false })
  tx.mutate(() => fn(todos))
  tx.commit().catch(() => undefined)
  return tx
}

test(`offline writes survive a restart and apply exactly once`, async () => {
  const dir = mkdtempSync(join(tmpdir(), `pg-sync-offline-`))
  const storage = new FileStorage(join(dir, `outbox.json`))
  // Rows this test owns.
  sql(`INSERT INTO todos VALUES (201, 'to edit', 'p1'), (202, 'to delete', 'p1')`)

  // Load 1: offline. Writes are optimistic and land in the outbox; nothing reaches the server.
  let posts = 0
  const counting = (...args) => {
    posts++
    return fetch(...args)
  }
  const conn1 = new Connectivity(true)
  const first = boot(storage, conn1, counting)
  await first.executor.waitForInit()
  await first.todos.preload()
  await until(() => first.todos.get(202), 10_000, `the seeded rows`)
  conn1.set(false)
  offlineWrite(first.executor, first.todos, (t) => t.insert({ id: 200, title: `made offline`, project: `p1` }))
  offlineWrite(first.executor, first.todos, (t) =>
    t.update(201, (d) => {
      d.title = `edited offline`
    }),
  )
  offlineWrite(first.executor, first.todos, (t) => t.delete(202))
  assert.equal(first.todos.get(200)?.title, `made offline`, `optimistic`)
  await until(async () => (await storage.keys()).length === 3, 5_000, `the outbox`)
  const outbox = await first.executor.peekOutbox()
  assert.equal(outbox.length, 3)
  const txIds = await Promise.all(outbox.map((t) => clientTxIdForKey(t.idempotencyKey)))
  assert.equal(posts, 0, `nothing sent while offline`)
  assert.deepEqual(sql(`SELECT count(*) FROM todos WHERE id = 200`), [`0`])

  // The page is closed: no executor, no collection; the outbox stays in storage.
  first.executor.dispose()
  await first.todos.cleanup()

  // Load 2: online again. The update's first answer is lost on purpose (the request reaches the
  // server, the response does not reach the client), so it is sent again. An update, because
  // applying it twice would show (a second insert would be refused by the primary key).
  let lost = 0
  const losing = async (...args) => {
    const response = await fetch(...args)
    if (lost === 0 && String(args[1]?.body).includes(`"action":"U"`)) {
      lost++
      await response.text()
      throw new TypeError(`network error (answer lost on purpose)`)
    }
    return response
  }
  const conn2 = new Connectivity(true)
  const second = boot(storage, conn2, losing)
  await second.executor.waitForInit()
  // The restored outbox shows its writes optimistically until they are confirmed.
  await second.todos.preload()
  await until(async () => (await storage.keys()).length === 0, 30_000, `the outbox to drain`)
  assert.equal(lost, 1, `one answer was lost`)

  assert.deepEqual(sql(`SELECT id, title FROM todos WHERE id IN (200, 201, 202) ORDER BY id`), [
    `200|made offline`,
    `201|edited offline`,
  ])
  // Each client transaction applied exactly once: one logged action per transaction, and one
  // idempotency record each.
  const ids = txIds.map((t) => `'${t}'`).join(`,`)
  assert.deepEqual(
    sql(`SELECT count(*), count(DISTINCT client_tx_id) FROM pg_sync.sync_actions WHERE client_tx_id IN (${ids})`),
    [`3|3`],
  )
  assert.deepEqual(sql(`SELECT count(*) FROM pg_sync.client_transactions WHERE client_tx_id IN (${ids})`), [`3`])
  await until(
    () =>
      second.todos.get(200)?.title === `made offline` &&
      second.todos.get(201)?.title === `edited offline` &&
      !second.todos.has(202),
    10_000,
    `the collection to converge`,
  )
  second.executor.dispose()
  await second.todos.cleanup()
})
