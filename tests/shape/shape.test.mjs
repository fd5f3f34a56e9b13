// The real, unmodified @electric-sql/client against pg_sync's GET /v1/shape (run by
// sync_worker/tests/shape.rs, which starts the cluster and the worker and sets the environment).
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { execFileSync, spawn } from 'node:child_process'
import { ShapeStream, Shape } from '@electric-sql/client'

const { SHAPE_URL, TOKEN, PSQL, DATABASE_URL } = process.env
const SEED = Number(process.env.SEED ?? 1)
const headers = { Authorization: `Bearer ${TOKEN}` }

function sql(q) {
  return execFileSync(PSQL, [DATABASE_URL, '-XAtq', '-v', 'ON_ERROR_STOP=1', '-c', q], {
    encoding: 'utf8',
  }).trim()
}

/** The rows alice may see now, as the client parses them. */
function visible() {
  const json = sql(`SELECT coalesce(json_agg(json_build_object('id', id, 'title', title, 'project', project, 'n', n) ORDER BY id), '[]')
                      FROM todos WHERE project IN (SELECT group_id FROM pg_sync.group_memberships WHERE user_id = 'alice')`)
  return JSON.parse(json)
}

const byId = (rows) => [...rows].sort((a, b) => a.id - b.id)

async function waitFor(what, cond, ms = 20_000) {
  const deadline = Date.now() + ms
  let last
  while (Date.now() < deadline) {
    last = await cond()
    if (last === true) return
    await new Promise((r) => setTimeout(r, 50))
  }
  assert.fail(`${what}: not reached in ${ms} ms (${typeof last === 'string' ? last : ''})`)
}

function same(rows) {
  const norm = (r) => JSON.stringify([r.id, r.title, r.project, r.n])
  const want = visible().map(norm)
  const got = byId(rows).map(norm)
  if (want.join() === got.join()) return true
  const missing = want.filter((r) => !got.includes(r))
  const extra = got.filter((r) => !want.includes(r))
  return `missing ${missing.slice(0, 5).join(' ')} extra ${extra.slice(0, 5).join(' ')}`
}

function open(opts = {}) {
  const ac = new AbortController()
  const stream = new ShapeStream({
    url: SHAPE_URL,
    params: { table: 'todos', ...(opts.params ?? {}) },
    headers,
    signal: ac.signal,
    liveSse: opts.sse ?? false,
    ...(opts.resume ?? {}),
  })
  return { stream, close: () => { ac.abort(); stream.unsubscribeAll() } }
}

let nextId = 1_000_000
const newId = () => nextId++

test('initial sync under concurrent writes, then live changes (long-poll and SSE)', { timeout: 120_000 }, async () => {
  sql(`INSERT INTO todos SELECT i, 'seed ' || i, 'p' || (1 + i % 3), 0 FROM generate_series(1, 3000) i`)
  const writer = spawn(PSQL, [DATABASE_URL, '-Xq', '-v', 'ON_ERROR_STOP=1', '-c', `
    DO $$ BEGIN
      FOR i IN 1..150 LOOP
        INSERT INTO todos VALUES (10000 + i, 'w' || i, 'p' || (1 + i % 3), i);
        UPDATE todos SET n = n + 1, title = 'u' || i WHERE id = i * 7;
        DELETE FROM todos WHERE id = i * 11;
        COMMIT;
        PERFORM pg_sleep(0.004);
      END LOOP;
    END $$;`], { stdio: 'inherit' })
  const exited = new Promise((r) => writer.on('exit', r))
  const { stream, close } = open()
  const shape = new Shape(stream)
  try {
    await shape.rows
    const code = await exited
    assert.equal(code, 0, 'the writer succeeded')
    await waitFor('converged after concurrent writes', () => same(shape.currentRows))
    assert.ok(shape.currentRows.every((r) => typeof r.id === 'number' && typeof r.n === 'number'),
      'int4 columns parse as numbers (schema header)')
    // Live: insert, update, delete, and a move out of alice's groups.
    const a = newId()
    sql(`INSERT INTO todos VALUES (${a}, 'live', 'p1', 1)`)
    await waitFor('live insert', () => same(shape.currentRows))
    sql(`UPDATE todos SET title = 'edited', n = 2 WHERE id = ${a}`)
    await waitFor('live update', () => same(shape.currentRows))
    sql(`UPDATE todos SET project = 'p3' WHERE id = ${a}`)
    await waitFor('live move out', () => same(shape.currentRows))
    sql(`DELETE FROM todos WHERE id = 3`)
    await waitFor('live delete', () => same(shape.currentRows))
  } finally {
    close()
  }
  // SSE mode sees the same.
  const sse = open({ sse: true })
  const sseShape = new Shape(sse.stream)
  try {
    await sseShape.rows
    await waitFor('sse initial', () => same(sseShape.currentRows))
    const b = newId()
    sql(`INSERT INTO todos VALUES (${b}, 'via sse', 'p2', 5)`)
    await waitFor('sse insert', () => same(sseShape.currentRows))
    sql(`UPDATE todos SET n = 6 WHERE id = ${b}`)
    await waitFor('sse update', () => same(sseShape.currentRows))
  } finally {
    sse.close()
  }
})

test('resume from a saved offset and handle: nothing missed, nothing twice', { timeout: 60_000 }, async () => {
  const rows = new Map()
  const inserts = new Map()
  const apply = (msgs) => {
    for (const m of msgs) {
      const op = m.headers?.operation
      if (op === 'insert') {
        inserts.set(m.key, (inserts.get(m.key) ?? 0) + 1)
        rows.set(m.key, { ...m.value })
      } else if (op === 'update') {
        rows.set(m.key, { ...rows.get(m.key), ...m.value })
      } else if (op === 'delete') {
        rows.delete(m.key)
      } else if (m.headers?.control === 'must-refetch') {
        assert.fail('no refetch expected here')
      }
    }
  }
  const first = open()
  first.stream.subscribe(apply)
  await waitFor('first session synced', () => first.stream.isUpToDate && same([...rows.values()]))
  const x = newId()
  sql(`INSERT INTO todos VALUES (${x}, 'before pause', 'p1', 0)`)
  await waitFor('first session live', () => same([...rows.values()]))
  first.close()
  await new Promise((r) => setTimeout(r, 100))
  const saved = { offset: first.stream.lastOffset, handle: first.stream.shapeHandle }
  assert.match(saved.offset, /^\d+_0$/)
  // Written while no client listens.
  const y = newId()
  sql(`INSERT INTO todos VALUES (${y}, 'while away', 'p2', 0)`)
  sql(`UPDATE todos SET n = 42 WHERE id = ${x}`)
  sql(`DELETE FROM todos WHERE id = (SELECT min(id) FROM todos WHERE project = 'p1')`)
  const second = open({ resume: saved })
  second.stream.subscribe(apply)
  try {
    await waitFor('resumed', () => second.stream.isUpToDate && same([...rows.values()]))
    assert.equal(second.stream.shapeHandle, saved.handle, 'the same shape went on')
    for (const [key, n] of inserts) assert.equal(n, 1, `${key} inserted ${n} times`)
    assert.equal(rows.get(`"public"."todos"/"${x}"`).n, 42)
  } finally {
    second.close()
  }
})

test('must-refetch: the client recovers from a group change and a compaction', { timeout: 60_000 }, async () => {
  const { stream, close } = open()
  const shape = new Shape(stream)
  let refetches = 0
  stream.subscribe((msgs) => {
    refetches += msgs.filter((m) => m.headers?.control === 'must-refetch').length
  })
  sql(`INSERT INTO todos VALUES (${newId()}, 'in p2', 'p2', 0)`)
  try {
    await shape.rows
    await waitFor('synced', () => same(shape.currentRows))
    assert.ok(shape.currentRows.some((r) => r.project === 'p2'))
    sql(`SELECT pg_sync.remove_member('alice', 'p2')`)
    await waitFor('left p2', () => same(shape.currentRows))
    assert.ok(refetches >= 1, 'a 409 made the client refetch')
    sql(`SELECT pg_sync.add_member('alice', 'p2')`)
    await waitFor('joined p2 again', () => same(shape.currentRows))
    // A client resuming from before the retention horizon: the log it needs is gone.
    close()
    await new Promise((r) => setTimeout(r, 100))
    const saved = { offset: stream.lastOffset, handle: stream.shapeHandle }
    sql(`INSERT INTO todos VALUES (${newId()}, 'while away', 'p1', 0)`)
    await waitFor('sequenced', () => Number(sql('SELECT pg_sync.last_sync_id()')) > parseInt(saved.offset))
    sql(`SELECT pg_sync.compact(pg_sync.last_sync_id())`)
    const resumed = open({ resume: saved })
    const again = new Shape(resumed.stream)
    let refetched = 0
    resumed.stream.subscribe((msgs) => {
      refetched += msgs.filter((m) => m.headers?.control === 'must-refetch').length
    })
    try {
      await waitFor('recovered after compaction', () => refetched >= 1 && same(again.currentRows))
      assert.notEqual(resumed.stream.shapeHandle, saved.handle, 'a new handle')
    } finally {
      resumed.close()
    }
  } finally {
    close()
  }
})

// mulberry32: a small seeded generator, so a failing run can be replayed with SEED.
function rng(seed) {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6d2b79f5) >>> 0
    let t = a
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}

for (const sse of [false, true]) {
  test(`randomized writes and memberships match what alice may see (seed ${SEED}, ${sse ? 'SSE' : 'long-poll'})`, { timeout: 120_000 }, async () => {
    const rand = rng(SEED + (sse ? 1000 : 0))
    const pick = (xs) => xs[Math.floor(rand() * xs.length)]
    const { stream, close } = open({ sse })
    const shape = new Shape(stream)
    try {
      await shape.rows
      for (let round = 0; round < 30; round++) {
        const stmts = []
        const ops = 1 + Math.floor(rand() * 6)
        for (let i = 0; i < ops; i++) {
          const r = rand()
          const id = `(SELECT id FROM todos ORDER BY md5(id::text || '${round}-${i}') LIMIT 1)`
          if (r < 0.35) stmts.push(`INSERT INTO todos VALUES (${newId()}, 'r${round}', '${pick(['p1', 'p2', 'p3'])}', ${round})`)
          else if (r < 0.6) stmts.push(`UPDATE todos SET n = n + 1, title = 't${round}' WHERE id = ${id}`)
          else if (r < 0.75) stmts.push(`UPDATE todos SET project = '${pick(['p1', 'p2', 'p3'])}' WHERE id = ${id}`)
          else if (r < 0.9) stmts.push(`DELETE FROM todos WHERE id = ${id}`)
          else if (r < 0.95) stmts.push(`SELECT pg_sync.add_member('alice', '${pick(['p1', 'p2', 'p3'])}')`)
          else stmts.push(`SELECT pg_sync.remove_member('alice', '${pick(['p2', 'p3'])}')`)
        }
        // Half the rounds are one transaction, half statement by statement.
        if (rand() < 0.5) sql(`BEGIN; ${stmts.join('; ')}; COMMIT`)
        else for (const s of stmts) sql(s)
        if (rand() < 0.2) await waitFor(`round ${round}`, () => same(shape.currentRows))
      }
      await waitFor('converged', () => same(shape.currentRows))
    } finally {
      close()
      sql(`SELECT pg_sync.add_member('alice', 'p1'), pg_sync.add_member('alice', 'p2'), pg_sync.remove_member('alice', 'p3')`)
    }
  })
}
