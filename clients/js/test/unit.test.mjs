// The package's pure parts: ops from TanStack mutations, the wire JSON of writes, the parser and
// the idempotency key to client transaction id mapping.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { opFor, toWireJson, pgSyncParser, parseBytea, clientTxIdFor } from '../dist/index.js'
import { clientTxIdForKey } from '../dist/offline.js'

const todos = { model: `todos`, primaryKey: [`id`] }
const pairs = { model: `pairs`, primaryKey: [`a`, `b`] }

test(`ops: whole row on insert, changed non-key columns on update, key on delete`, () => {
  assert.deepEqual(opFor({ type: `insert`, modified: { id: 1, title: `t` } }, todos), {
    model: `todos`,
    action: `I`,
    data: { id: 1, title: `t` },
  })
  assert.deepEqual(
    opFor({ type: `update`, original: { id: 1, title: `t` }, changes: { id: 1, title: `u` } }, todos),
    { model: `todos`, action: `U`, id: 1, data: { title: `u` } },
  )
  assert.deepEqual(opFor({ type: `delete`, original: { a: `x`, b: 2n, c: 1 } }, pairs), {
    model: `pairs`,
    action: `D`,
    id: [`x`, `2`],
  })
  assert.throws(() => opFor({ type: `delete`, original: { title: `no key` } }, todos), /key column "id"/)
})

test(`writes: BigInt, Date and bytes in the forms Postgres reads`, () => {
  const json = toWireJson({ n: 9007199254740993n, at: new Date(`2024-02-29T13:14:15.500Z`), b: new Uint8Array([0, 255, 65]) })
  assert.deepEqual(JSON.parse(json), { n: `9007199254740993`, at: `2024-02-29T13:14:15.500Z`, b: `\\x00ff41` })
})

test(`parser: int8 a number when exact, else its decimal string (JSON-safe); bytea on request`, () => {
  assert.equal(pgSyncParser.int8(`42`), 42)
  assert.equal(pgSyncParser.int8(`-9007199254740991`), -9007199254740991)
  assert.equal(pgSyncParser.int8(`9007199254740993`), `9007199254740993`)
  assert.equal(pgSyncParser.int8(`-9223372036854775808`), `-9223372036854775808`)
  // The offline outbox serialises rows with JSON.stringify: a BigInt would throw there.
  assert.equal(JSON.stringify({ n: pgSyncParser.int8(`9007199254740993`) }), `{"n":"9007199254740993"}`)
  assert.deepEqual(parseBytea(`\\x00ff41`), new Uint8Array([0, 255, 65]))
})

test(`client transaction ids: a UUID key as is, any other key the same UUID every time`, async () => {
  const uuid = `8f9e7c1e-1111-4a2b-9c3d-000000000001`
  assert.equal(await clientTxIdForKey(uuid), uuid)
  assert.equal(await clientTxIdForKey(uuid.toUpperCase()), uuid)
  const a = await clientTxIdForKey(`order-17`)
  assert.match(a, /^[0-9a-f]{8}-[0-9a-f]{4}-8[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/)
  assert.equal(await clientTxIdForKey(`order-17`), a)
  assert.notEqual(await clientTxIdForKey(`order-18`), a)
  assert.equal(clientTxIdFor(uuid), uuid)
  assert.notEqual(clientTxIdFor(`not-a-uuid`), `not-a-uuid`)
})

test(`one copy of @tanstack/db is installed (collections and transactions of two copies do not mix)`, async () => {
  const { readdirSync } = await import(`node:fs`)
  const copies = readdirSync(new URL(`../node_modules`, import.meta.url), { recursive: true })
    .map(String)
    .filter((p) => p.replaceAll(`\\`, `/`).endsWith(`@tanstack/db/package.json`))
  assert.deepEqual(copies, [`@tanstack/db/package.json`])
})
