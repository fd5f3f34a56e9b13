// The TanStack DB collection on pg_sync, with the real libraries: optimistic insert, update and
// delete confirmed by the txid coming back through /v1/shape, and a refused write rolled back.
import { test, after } from 'node:test'
import assert from 'node:assert/strict'
import { createCollection } from '@tanstack/db'
import { pgSyncCollectionOptions, postTransaction, PgSyncRejectedError } from '../dist/index.js'
import { url, headers, sql, until } from './helpers.mjs'

const collections = []
after(async () => {
  for (const c of collections) await c.cleanup()
})

function todos(id, shapeOptions) {
  const c = createCollection(
    pgSyncCollectionOptions({
      id,
      url,
      headers,
      model: `todos`,
      getKey: (row) => row.id,
      shapeOptions,
      // The write must come back well within this, or the test fails.
      txidTimeout: 8_000,
    }),
  )
  collections.push(c)
  return c
}

test(`optimistic insert, update and delete are confirmed by txid`, async () => {
  const c = todos(`todos-confirmed`)
  await c.preload()
  // alice sees her group's row (p1), not bob's (p2).
  assert.equal(c.get(101)?.title, `alices`)
  assert.equal(c.get(100), undefined)
  // int8 through pgSyncParser: a number when exact, else its decimal string (never a rounded
  // number, never a BigInt, which JSON cannot serialise).
  assert.equal(c.get(101)?.n, 42)
  assert.equal(c.get(102)?.n, `9007199254740993`)

  const ins = c.insert({ id: 1, title: `first`, project: `p1` })
  assert.equal(c.get(1)?.title, `first`, `shown before the server answers`)
  assert.equal(ins.state, `persisting`)
  await ins.isPersisted.promise
  // Persisted means the handler's txid was seen on the shape: the row is synced, not optimistic.
  assert.equal(ins.state, `completed`)
  assert.deepEqual(sql(`SELECT title, project FROM todos WHERE id = 1`), [`first|p1`])
  assert.equal(c.get(1)?.title, `first`)
  assert.equal(c._state.optimisticUpserts.size, 0, `no optimistic row left`)

  const upd = c.update(1, (d) => {
    d.title = `second`
  })
  assert.equal(c.get(1)?.title, `second`)
  await upd.isPersisted.promise
  assert.deepEqual(sql(`SELECT title FROM todos WHERE id = 1`), [`second`])
  assert.equal(c._state.syncedData.get(1)?.title, `second`, `the synced row has the update`)

  const del = c.delete(1)
  assert.equal(c.get(1), undefined)
  await del.isPersisted.promise
  assert.deepEqual(sql(`SELECT count(*) FROM todos WHERE id = 1`), [`0`])
  assert.equal(c._state.syncedData.has(1), false, `the synced row is gone`)
})

test(`a refused write is rolled back`, async () => {
  const c = todos(`todos-refused`)
  await c.preload()
  // alice is no member of p2.
  const ins = c.insert({ id: 2, title: `not mine`, project: `p2` })
  assert.equal(c.get(2)?.title, `not mine`)
  await assert.rejects(ins.isPersisted.promise, (e) => {
    assert.ok(e instanceof PgSyncRejectedError, String(e))
    assert.equal(e.result.code, `forbidden`)
    return true
  })
  assert.equal(c.get(2), undefined, `rolled back`)
  assert.deepEqual(sql(`SELECT count(*) FROM todos WHERE id = 2`), [`0`])

  // An update moving her row into p2: refused, the row shows its old value again.
  const upd = c.update(101, (d) => {
    d.project = `p2`
    d.title = `moved`
  })
  assert.equal(c.get(101)?.title, `moved`)
  await assert.rejects(upd.isPersisted.promise, PgSyncRejectedError)
  await until(() => c.get(101)?.title === `alices`, 5_000, `the rollback`)
  assert.deepEqual(sql(`SELECT title, project FROM todos WHERE id = 101`), [`alices|p1`])

  // A change made elsewhere still arrives after the refusals.
  sql(`UPDATE todos SET title = 'from psql' WHERE id = 101`)
  await until(() => c.get(101)?.title === `from psql`, 10_000, `the psql change`)
})

test(`writes are confirmed over SSE too (liveSse)`, async () => {
  const c = todos(`todos-sse`, { liveSse: true })
  await c.preload()
  const ins = c.insert({ id: 3, title: `over sse`, project: `p1` })
  await ins.isPersisted.promise
  assert.equal(c._state.syncedData.get(3)?.title, `over sse`)
  const del = c.delete(3)
  await del.isPersisted.promise
  assert.equal(c._state.syncedData.has(3), false)
  assert.deepEqual(sql(`SELECT count(*) FROM todos WHERE id = 3`), [`0`])
})

test(`a write committed before the snapshot is confirmed by the snapshot (snapshot-end)`, async () => {
  // Its change comes with the snapshot rows and never again in the log after it: only the
  // snapshot's visibility (Electric's snapshot-end) tells awaitTxId that the collection has it.
  // (What a page reloaded with a queued offline write waits for.)
  const result = await postTransaction({ url, headers }, crypto.randomUUID(), [
    { model: `todos`, action: `I`, data: { id: 4, title: `before the snapshot`, project: `p1` } },
  ])
  assert.equal(result.status, `applied`)
  // The suite's cluster is in xid epoch 2: a full xid8 (a 32-bit txid would be below 2^32).
  assert.ok(result.txid > 2 ** 33, `txid ${result.txid}`)
  const c = todos(`todos-after-write`)
  await c.preload()
  assert.equal(c.get(4)?.title, `before the snapshot`)
  assert.equal(await c.utils.awaitTxId(result.txid, 2_000), true)
  // A txid the snapshot does not cover is still waited for: one far ahead times out.
  await assert.rejects(c.utils.awaitTxId(result.txid + 1_000_000, 300))
  sql(`DELETE FROM todos WHERE id = 4`)
})
