-- apply_remote merges per column by version; it is idempotent and order-independent, keeps
-- tombstones, rejects versions too far ahead, and never loses a local write's ordering.
CREATE TABLE notes (id text PRIMARY KEY, body text, stars int, board text);
SELECT pg_sync.register_table('notes', group_column => 'board');
CREATE TABLE base AS SELECT pg_sync.hlc_now() AS hlc;
-- v(k, node): a version k ticks after the base, from node.
CREATE FUNCTION v(k int, node text) RETURNS text LANGUAGE sql AS
  $$ SELECT lpad(to_hex((SELECT hlc FROM base) + k), 16, '0') || '@' || node $$;
CREATE FUNCTION ch(action text, id text, ver text, data jsonb, extra jsonb DEFAULT '{}') RETURNS jsonb
  LANGUAGE sql AS $$ SELECT jsonb_build_object('model', 'notes', 'model_id', id, 'action', action,
      'version', ver, 'origin', split_part(ver, '@', 2), 'data', data) || extra $$;

-- Insert from a peer, then a concurrent pair of updates: the higher version wins per column.
SELECT pg_sync.apply_remote(ch('I', 'n1', v(10, 'peer-a'), '{"id": "n1", "body": "hello", "stars": 1, "board": "b1"}'));
SELECT pg_sync.apply_remote(ch('U', 'n1', v(20, 'peer-b'), '{"body": "from b"}'));
SELECT pg_sync.apply_remote(ch('U', 'n1', v(20, 'peer-a'), '{"body": "from a", "stars": 2}'));
SELECT * FROM notes;
-- Re-applying anything is a no-op (returns 0, records nothing new).
SELECT count(*) AS actions_before FROM pg_sync.sync_actions WHERE model = 'notes';
SELECT pg_sync.apply_remote(jsonb_build_array(
  ch('I', 'n1', v(10, 'peer-a'), '{"id": "n1", "body": "hello", "stars": 1, "board": "b1"}'),
  ch('U', 'n1', v(20, 'peer-b'), '{"body": "from b"}'),
  ch('U', 'n1', v(20, 'peer-a'), '{"body": "from a", "stars": 2}')));
SELECT count(*) AS actions_after FROM pg_sync.sync_actions WHERE model = 'notes';
-- Applied changes are recorded with their remote origin and versions (so never echoed back).
SELECT action, data, origin, version = v(10, 'peer-a') AS v10, versions FROM pg_sync.sync_actions
 WHERE model = 'notes' ORDER BY id;

-- Tombstones: a delete beats older updates, a late older update cannot resurrect the row,
-- an older insert cannot either, and a newer insert does.
SELECT pg_sync.apply_remote(ch('D', 'n1', v(30, 'peer-a'), '{"id": "n1"}'));
SELECT pg_sync.apply_remote(ch('U', 'n1', v(25, 'peer-b'), '{"stars": 5}'));
SELECT pg_sync.apply_remote(ch('I', 'n1', v(28, 'peer-b'), '{"id": "n1", "body": "old insert", "stars": 0, "board": "b1"}'));
SELECT count(*) AS n1_rows FROM notes WHERE id = 'n1';
-- An update newer than the tombstone waits; a newer insert resurrects the row and keeps it.
SELECT pg_sync.apply_remote(ch('U', 'n1', v(50, 'peer-b'), '{"stars": 50}'));
SELECT count(*) AS n1_rows FROM notes WHERE id = 'n1';
SELECT pg_sync.apply_remote(ch('I', 'n1', v(40, 'peer-a'), '{"id": "n1", "body": "reborn", "stars": 40, "board": "b1"}'));
SELECT * FROM notes WHERE id = 'n1';

-- Order independence: the same changes to another row, in reverse, give the same result.
SELECT pg_sync.apply_remote(ch('I', 'n2', v(40, 'peer-a'), '{"id": "n2", "body": "reborn", "stars": 40, "board": "b1"}'));
SELECT pg_sync.apply_remote(ch('U', 'n2', v(50, 'peer-b'), '{"stars": 50}'));
SELECT pg_sync.apply_remote(ch('I', 'n2', v(28, 'peer-b'), '{"id": "n2", "body": "old insert", "stars": 0, "board": "b1"}'));
SELECT pg_sync.apply_remote(ch('U', 'n2', v(25, 'peer-b'), '{"stars": 5}'));
SELECT pg_sync.apply_remote(ch('D', 'n2', v(30, 'peer-a'), '{"id": "n2"}'));
SELECT pg_sync.apply_remote(ch('U', 'n2', v(20, 'peer-a'), '{"body": "from a", "stars": 2}'));
SELECT pg_sync.apply_remote(ch('U', 'n2', v(20, 'peer-b'), '{"body": "from b"}'));
SELECT pg_sync.apply_remote(ch('I', 'n2', v(10, 'peer-a'), '{"id": "n2", "body": "hello", "stars": 1, "board": "b1"}'));
SELECT a.body = b.body AND a.stars = b.stars AS same_row FROM notes a, notes b WHERE a.id = 'n1' AND b.id = 'n2';
SELECT pg_sync.row_version_state('notes', 'n1') = pg_sync.row_version_state('notes', 'n2') AS same_state;

-- Ties between equal clocks go by node id.
SELECT pg_sync.apply_remote(ch('U', 'n1', v(60, 'peer-b'), '{"body": "tie b"}'));
SELECT pg_sync.apply_remote(ch('U', 'n1', v(60, 'peer-a'), '{"body": "tie a"}'));
SELECT body FROM notes WHERE id = 'n1';

-- A delete of a row never seen leaves a tombstone, so the older insert arriving later stays dead.
SELECT pg_sync.apply_remote(ch('D', 'n3', v(70, 'peer-a'), '{"id": "n3"}'));
SELECT pg_sync.apply_remote(ch('I', 'n3', v(65, 'peer-b'), '{"id": "n3", "body": "late", "stars": 0, "board": "b1"}'));
SELECT count(*) AS n3_rows FROM notes WHERE id = 'n3';

-- A local write after remote ones always gets a higher version than the row's current one,
-- even when the remote version ran ahead of the local clock (within the allowed skew).
SELECT pg_sync.apply_remote(ch('U', 'n1', lpad(to_hex((extract(epoch FROM clock_timestamp() + interval '30 seconds') * 1000)::bigint << 16), 16, '0') || '@peer-z', '{"body": "from the future"}'));
UPDATE notes SET body = 'local' WHERE id = 'n1';
SELECT (SELECT version FROM pg_sync.sync_actions WHERE model_id = 'n1' AND origin = pg_sync.node_id() ORDER BY id DESC LIMIT 1)
       > (SELECT version FROM pg_sync.sync_actions WHERE model_id = 'n1' AND origin = 'peer-z') AS local_above_remote;
SELECT body FROM notes WHERE id = 'n1';

-- A group move from a peer: delete for the old board, whole row for the new one.
SELECT pg_sync.apply_remote(ch('U', 'n2', v(90, 'peer-a'), '{"board": "b2"}'));
SELECT action, group_id, prev_group_id, moved, data ? 'body' AS whole_row
  FROM pg_sync.sync_actions WHERE model_id = 'n2' ORDER BY id DESC LIMIT 2;
-- The moved pair applied elsewhere: the delete half is ignored, the insert half merges columns.
SELECT pg_sync.apply_remote(ch('D', 'n1', v(95, 'peer-a'), '{"id": "n1"}', '{"moved": true}'));
SELECT count(*) AS n1_rows FROM notes WHERE id = 'n1';

-- Too far in the future: rejected, naming the row, nothing applied.
SET pg_sync.max_clock_skew = '1s';
SELECT regexp_replace(err(format('SELECT pg_sync.apply_remote(%L)', ch('U', 'n2',
  lpad(to_hex((extract(epoch FROM clock_timestamp() + interval '1 hour') * 1000)::bigint << 16), 16, '0') || '@peer-x',
  '{"body": "time traveller"}'))), 'is 3\d{6} ms ahead', 'is about 3600000 ms ahead') AS err;
RESET pg_sync.max_clock_skew;
SELECT body FROM notes WHERE id = 'n2';

-- Malformed, mistyped and inconsistent payloads: clear errors, nothing applied.
SELECT err($$SELECT pg_sync.apply_remote('"just a string"')$$);
SELECT err($$SELECT pg_sync.apply_remote(NULL)$$);
SELECT err($$SELECT pg_sync.apply_remote('{"model": "notes"}')$$);
SELECT err(format('SELECT pg_sync.apply_remote(%L)', ch('X', 'n2', v(1, 'p'), '{}')));
SELECT err(format('SELECT pg_sync.apply_remote(%L)', ch('U', 'n2', 'not-a-version', '{"body": "x"}', '{"origin": "p"}')));
SELECT err(format('SELECT pg_sync.apply_remote(%L)', ch('U', 'n2', v(1, 'bad node!'), '{"body": "x"}')));
SELECT err(format('SELECT pg_sync.apply_remote(%L)', ch('U', 'n2', v(100, 'p'), '"not an object"')));
SELECT err(format('SELECT pg_sync.apply_remote(%L)', ch('U', 'n2', v(100, 'p'), '{"nope": 1}')));
SELECT err(format('SELECT pg_sync.apply_remote(%L)', ch('U', 'n2', v(100, 'p'), '{"stars": "many"}')));
SELECT err(format('SELECT pg_sync.apply_remote(%L)', ch('U', 'n2', v(100, 'p'), '{"body": 1}', '{"versions": {"body": 7}}')));
SELECT err(format('SELECT pg_sync.apply_remote(%L)', ch('U', 'n2', v(100, 'p'), '{"body": 1}', '{"moved": "yes"}')));
SELECT err(format('SELECT pg_sync.apply_remote(%L)', jsonb_set(ch('U', 'n2', v(100, 'p'), '{"body": "x"}'), '{model}', '"ghost"')));
-- A batch with one bad change applies none of it.
SELECT err(format('SELECT pg_sync.apply_remote(%L)', jsonb_build_array(
  ch('U', 'n2', v(100, 'p'), '{"body": "first"}'), ch('U', 'n2', v(101, 'p'), '{"stars": "bad"}'))));
SELECT body, stars FROM notes WHERE id = 'n2';
-- Federation 'push' tables do not accept remote changes.
CREATE TABLE pushed (id int PRIMARY KEY, x int);
SELECT pg_sync.register_table('pushed', federation => 'push');
SELECT err(format('SELECT pg_sync.apply_remote(%L)', jsonb_set(ch('U', '1', v(100, 'p'), '{"x": 1}'), '{model}', '"pushed"')));
