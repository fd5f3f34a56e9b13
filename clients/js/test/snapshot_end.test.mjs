// Review rev12d's reproduction (snapshot_end_wrap.mjs), as a check of what the worker sends now:
// `snapshot-end` and every txid are full xid8 values (epoch included), compared by
// @electric-sql/client's isVisibleInSnapshot (which TanStack DB's awaitTxId runs against every
// snapshot a collection has seen). The failover case is not a logic-level question any more:
// the worker withholds `snapshot-end` after a lineage change (the Rust test
// shape::shape_snapshot_end_is_withheld_after_a_failover_for_the_grace).
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { isVisibleInSnapshot } from '@electric-sql/client'

// What sync_worker's snapshot_end() emits for a pg_current_snapshot() with these xid8 values
// (none when xmax is at or above 2^53), and what /sync/mutate answers as txid.
const snapshotEnd = (xmin, xmax, xip = []) =>
  BigInt(xmax) >= 2n ** 53n
    ? null
    : { xmin: String(xmin), xmax: String(xmax), xip_list: xip.map(String) }
const txid = (xid8) => Number(xid8)

test(`a collection loaded shortly before a 32-bit xid wrap does not confirm writes made after it`, () => {
  const s = snapshotEnd(4294960000n, 4294960005n)
  // After the wrap the tab writes: xid8 2^32 + 100 (32-bit txid 100 before the fix).
  assert.equal(isVisibleInSnapshot(txid(4294967296n + 100n), s), false)
  // One committed before the snapshot is confirmed.
  assert.equal(isVisibleInSnapshot(txid(4294959999n), s), true)
})

test(`a write after the snapshot in the same epoch is not visible; one before is`, () => {
  const e = 2n << 32n
  const s = snapshotEnd(e + 5000n, e + 5003n, [e + 5001n])
  assert.equal(isVisibleInSnapshot(txid(e + 5001n), s), false)
  assert.equal(isVisibleInSnapshot(txid(e + 5003n), s), false)
  assert.equal(isVisibleInSnapshot(txid(e + 5002n), s), true)
  assert.equal(isVisibleInSnapshot(txid(e + 4999n), s), true)
})

test(`txids up to 2^53 - 1 compare exactly; at 2^53 no snapshot-end is sent`, () => {
  const top = 2n ** 53n - 1n
  const s = snapshotEnd(top - 2n, top, [top - 1n])
  assert.equal(isVisibleInSnapshot(txid(top - 1n), s), false)
  assert.equal(isVisibleInSnapshot(txid(top), s), false)
  assert.equal(isVisibleInSnapshot(txid(top - 2n), s), true)
  assert.equal(snapshotEnd(2n ** 62n, 2n ** 62n + 1n), null)
})
