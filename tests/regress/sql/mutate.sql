-- mutate applies a client's batch atomically, once per (client_id, client_tx_id).
CREATE TABLE tasks (id uuid PRIMARY KEY, title text NOT NULL, done boolean NOT NULL DEFAULT false, team text, secret text);
SELECT pg_sync.register_table('tasks', group_column => 'team', exclude => '{secret}');
CREATE TABLE seq_items (id serial PRIMARY KEY, label text);
SELECT pg_sync.register_table('seq_items');

SELECT pg_sync.mutate('client-1', '00000000-0000-0000-0000-000000000001', '[
  {"model": "tasks", "action": "I", "id": "11111111-1111-1111-1111-111111111111", "data": {"title": "write", "team": "t1"}},
  {"model": "tasks", "action": "I", "data": {"id": "22222222-2222-2222-2222-222222222222", "title": "test", "team": "t1"}},
  {"model": "tasks", "action": "U", "id": "11111111-1111-1111-1111-111111111111", "data": {"done": true}},
  {"model": "seq_items", "action": "I", "data": {"label": "server keyed"}},
  {"model": "tasks", "action": "D", "id": "33333333-3333-3333-3333-333333333333"}
]') - 'txid' AS mutate;
SELECT id, title, done, team FROM tasks ORDER BY id;
-- The actions carry the client's ids, so the client can drop its optimistic copies.
SELECT model, action, client_id, client_tx_id FROM pg_sync.sync_actions
 WHERE model IN ('tasks', 'seq_items') ORDER BY id;

-- A replay returns the first result and changes nothing.
SELECT pg_sync.mutate('client-1', '00000000-0000-0000-0000-000000000001', '[
  {"model": "tasks", "action": "U", "id": "11111111-1111-1111-1111-111111111111", "data": {"title": "changed by replay"}}
]') ->> 'status' AS replay;
-- txid: the applying transaction's full xid8 (what /v1/shape's change messages list in
-- headers.txids), stored with the result, so a replay names the transaction that applied it.
SELECT pg_sync.mutate('client-1', '00000000-0000-0000-0000-000000000001', '[
  {"model": "tasks", "action": "D", "id": "11111111-1111-1111-1111-111111111111"}]') -> 'txid'
  = ALL (SELECT pg_catalog.to_jsonb(xid::text::bigint) FROM pg_sync.sync_actions
          WHERE client_id = 'client-1' AND client_tx_id = '00000000-0000-0000-0000-000000000001')
  AS replay_names_the_applying_xid;
SELECT jsonb_typeof(pg_sync.mutate('client-4', gen_random_uuid(), '[
  {"model": "tasks", "action": "D", "id": "33333333-3333-3333-3333-333333333333"}]') -> 'txid') AS no_op_has_a_txid_too;
SELECT title FROM tasks WHERE id = '11111111-1111-1111-1111-111111111111';
SELECT count(*) AS actions FROM pg_sync.sync_actions WHERE model = 'tasks';
-- The same tx id from another client is a different transaction.
SELECT pg_sync.mutate('client-2', '00000000-0000-0000-0000-000000000001', '[
  {"model": "tasks", "action": "U", "id": "22222222-2222-2222-2222-222222222222", "data": {"done": true}}]') ->> 'status';
-- `changes` counts the deltas a transaction made; a write that changes nothing makes none,
-- so a client knows no delta will come back for it. A replay reports the first count.
SELECT pg_sync.mutate('client-3', '00000000-0000-0000-0000-000000000009', '[
  {"model": "tasks", "action": "U", "id": "22222222-2222-2222-2222-222222222222", "data": {"done": true}}]') -> 'changes' AS no_op;
SELECT pg_sync.mutate('client-3', '00000000-0000-0000-0000-000000000010', '[
  {"model": "tasks", "action": "U", "id": "22222222-2222-2222-2222-222222222222", "data": {"done": false}},
  {"model": "tasks", "action": "U", "id": "22222222-2222-2222-2222-222222222222", "data": {"done": true}}]') -> 'changes' AS two;
SELECT pg_sync.mutate('client-3', '00000000-0000-0000-0000-000000000010', '[
  {"model": "tasks", "action": "U", "id": "22222222-2222-2222-2222-222222222222", "data": {"done": false}}]') -> 'changes' AS replayed;
-- Writes outside mutate carry no client id.
UPDATE tasks SET title = 'plain sql' WHERE id = '22222222-2222-2222-2222-222222222222';
SELECT client_id FROM pg_sync.sync_actions ORDER BY id DESC LIMIT 1;

-- Atomic: a failing op undoes the whole batch, and the tx id stays free for a corrected retry.
SELECT err($$SELECT pg_sync.mutate('client-1', '00000000-0000-0000-0000-000000000002', '[
  {"model": "tasks", "action": "I", "id": "44444444-4444-4444-4444-444444444444", "data": {"title": "partial", "team": "t1"}},
  {"model": "tasks", "action": "U", "id": "55555555-5555-5555-5555-555555555555", "data": {"done": true}}]')$$);
SELECT count(*) AS partial_rows FROM tasks WHERE id = '44444444-4444-4444-4444-444444444444';
SELECT pg_sync.mutate('client-1', '00000000-0000-0000-0000-000000000002', '[
  {"model": "tasks", "action": "I", "id": "44444444-4444-4444-4444-444444444444", "data": {"title": "retried", "team": "t1"}}]') ->> 'status';

-- Bad input.
SELECT err($$SELECT pg_sync.mutate('', gen_random_uuid(), '[{"model": "tasks", "action": "D", "id": "x"}]')$$);
SELECT err($$SELECT pg_sync.mutate('c', gen_random_uuid(), '[]')$$);
SELECT err($$SELECT pg_sync.mutate('c', gen_random_uuid(), '{"model": "tasks"}')$$);
SELECT err($$SELECT pg_sync.mutate('c', gen_random_uuid(), '[1]')$$);
SELECT err($$SELECT pg_sync.mutate('c', gen_random_uuid(), '[{"model": "ghost", "action": "I", "data": {}}]')$$);
SELECT err($$SELECT pg_sync.mutate('c', gen_random_uuid(), '[{"model": "tasks", "action": "X", "id": "x"}]')$$);
SELECT err($$SELECT pg_sync.mutate('c', gen_random_uuid(), '[{"model": "tasks", "action": "I", "data": {"title": "t", "nope": 1}}]')$$);
SELECT err($$SELECT pg_sync.mutate('c', gen_random_uuid(), '[{"model": "tasks", "action": "I", "data": {"title": "t", "secret": "x"}}]')$$);
SELECT err($$SELECT pg_sync.mutate('c', gen_random_uuid(), '[{"model": "tasks", "action": "I", "id": "66666666-6666-6666-6666-666666666666", "data": {"title": 5, "done": "maybe"}}]')$$);
SELECT err($$SELECT pg_sync.mutate('c', gen_random_uuid(), '[{"model": "tasks", "action": "I", "id": "not-a-uuid", "data": {"title": "t"}}]')$$);
SELECT err($$SELECT pg_sync.mutate('c', gen_random_uuid(), '[{"model": "tasks", "action": "I", "id": "66666666-6666-6666-6666-666666666666", "data": {"title": null}}]')$$);
SELECT err($$SELECT pg_sync.mutate('c', gen_random_uuid(), '[{"model": "tasks", "action": "U", "data": {"done": true}}]')$$);
SELECT err($$SELECT pg_sync.mutate('c', gen_random_uuid(), '[{"model": "tasks", "action": "U", "id": {"a": 1}, "data": {"done": true}}]')$$);
SELECT err($$SELECT pg_sync.mutate('c', gen_random_uuid(), '[{"model": "tasks", "action": "U", "id": "11111111-1111-1111-1111-111111111111", "data": {"id": "22222222-2222-2222-2222-222222222222"}}]')$$);
SELECT err($$SELECT pg_sync.mutate('c', gen_random_uuid(), '[{"model": "tasks", "action": "D", "id": "11111111-1111-1111-1111-111111111111", "data": {"x": 1}}]')$$);
SELECT err($$SELECT pg_sync.mutate('c', gen_random_uuid(), '[{"model": "tasks", "action": "D", "id": "11111111-1111-1111-1111-111111111111", "extra": 1}]')$$);
SELECT err($$SELECT pg_sync.mutate('c', NULL, '[{"model": "tasks", "action": "D", "id": "x"}]')$$);
SELECT count(*) AS tasks_after_bad_input FROM tasks;

-- mutate_as: the same, on behalf of a client user, within the user's groups only.
SELECT pg_sync.add_member('carol', 't1');
SELECT pg_sync.mutate_as('carol', 'c-phone', '00000000-0000-0000-0000-0000000000c1', '[
  {"model": "tasks", "action": "I", "id": "c1c1c1c1-0000-0000-0000-000000000001", "data": {"title": "carol", "team": "t1"}}]') ->> 'status';
SELECT err($$SELECT pg_sync.mutate_as('carol', 'c-phone', gen_random_uuid(), '[
  {"model": "tasks", "action": "I", "id": "c1c1c1c1-0000-0000-0000-000000000002", "data": {"title": "elsewhere", "team": "t9"}}]')$$);
SELECT err($$SELECT pg_sync.mutate_as('carol', 'c-phone', gen_random_uuid(), '[
  {"model": "tasks", "action": "I", "id": "c1c1c1c1-0000-0000-0000-000000000003", "data": {"title": "no team"}}]')$$);
SELECT err($$SELECT pg_sync.mutate_as('carol', 'c-phone', gen_random_uuid(), '[
  {"model": "tasks", "action": "U", "id": "c1c1c1c1-0000-0000-0000-000000000001", "data": {"team": "t9"}}]')$$);
SELECT err($$SELECT pg_sync.mutate_as('dave', 'd-phone', gen_random_uuid(), '[
  {"model": "tasks", "action": "D", "id": "c1c1c1c1-0000-0000-0000-000000000001"}]')$$);
SELECT err($$SELECT pg_sync.mutate_as('carol', 'c-phone', gen_random_uuid(), '[
  {"model": "seq_items", "action": "I", "data": {"label": "global"}}]')$$);
SELECT err($$SELECT pg_sync.mutate_as(NULL, 'c', gen_random_uuid(), '[]')$$);
SELECT title, team FROM tasks WHERE id::text LIKE 'c1c1c1c1%';

-- Column names that are also the aliases of internal queries (r, t, c) change nothing.
CREATE TABLE odd (id int PRIMARY KEY, r text, t text, c text, team text);
SELECT pg_sync.register_table('odd', group_column => 'team');
SELECT pg_sync.mutate_as('carol', 'c-phone', gen_random_uuid(), '[
  {"model": "odd", "action": "I", "id": 1, "data": {"r": "r1", "t": "t1", "c": "c1", "team": "t1"}},
  {"model": "odd", "action": "U", "id": 1, "data": {"r": "r2"}}]') -> 'changes' AS changes;
SELECT err($$SELECT pg_sync.mutate_as('carol', 'c-phone', gen_random_uuid(), '[
  {"model": "odd", "action": "U", "id": 1, "data": {"team": "t9"}}]')$$);
SELECT pg_sync.mutate_as('carol', 'c-phone', gen_random_uuid(), '[
  {"model": "odd", "action": "D", "id": 1}]') -> 'ops' -> 0 ->> 'status' AS deleted;

-- Errors of an op carry {"op": N, "field": ...} as DETAIL (Postgres' own detail, which can
-- quote values, is dropped).
DO $$
DECLARE d text;
BEGIN
    PERFORM pg_sync.mutate('c', gen_random_uuid(), '[
      {"model": "odd", "action": "I", "id": 5, "data": {"r": "x", "team": "t1"}},
      {"model": "odd", "action": "U", "id": 5, "data": {"nope": 1}}]');
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS d = PG_EXCEPTION_DETAIL;
    RAISE NOTICE 'detail: %', d;
END $$;
DO $$
DECLARE d text;
BEGIN
    PERFORM pg_sync.mutate('c', gen_random_uuid(), '[
      {"model": "odd", "action": "I", "id": 1, "data": {"team": "t1"}},
      {"model": "odd", "action": "I", "id": 1, "data": {"team": "t1"}}]');
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS d = PG_EXCEPTION_DETAIL;
    RAISE NOTICE 'detail: %', d;
END $$;
