-- Values to_jsonb cannot carry (a JSON null, array lower bounds, a json column's own text,
-- composites) keep their exact text under the captured row's "" entry (docs/extension.md,
-- "Exact texts"); rows without such values have none. apply_remote reads both forms.
BEGIN;
SET LOCAL timezone = 'Asia/Kolkata';
CREATE TYPE xpair AS (a int, j jsonb, t timestamptz);
CREATE TABLE exact (id int PRIMARY KEY, j json, jb jsonb, arr int[], md int[], p xpair,
                    pa xpair[], plain text);
SELECT pg_sync.register_table('exact');
INSERT INTO exact VALUES
  (1, '{"b":1,  "a":2}', 'null', '[2:3]={1,2}', '[0:1][1:2]={{1,2},{3,4}}',
   ROW(1, 'null', '2024-01-01 00:00+02'), ARRAY[ROW(2, NULL, NULL)]::xpair[], 'x'),
  (2, NULL, '{"a": null}', '{1,2}', '{{1,2},{3,4}}', NULL, NULL, NULL),
  (3, 'null', NULL, '{}', NULL, ROW(NULL, NULL, NULL), '{}', 'y');
-- Only the changed lossy columns get an entry; an update of plain columns gets none.
UPDATE exact SET jb = 'null', plain = 'z' WHERE id = 2;
UPDATE exact SET plain = 'w' WHERE id = 1;
SELECT model_id, action, data FROM pg_sync.sync_actions WHERE model = 'exact' ORDER BY id;
-- Toasted values: a long array with lower bound 0 gets its entry (read from a slice of its
-- header), a long jsonb is no JSON null and gets none.
INSERT INTO exact (id, jb, arr)
SELECT 4, jsonb_build_object('big', (SELECT jsonb_agg(md5(g::text)) FROM generate_series(1, 5000) g)),
       '[0:0]={0}'::int[] || (SELECT array_agg(g) FROM generate_series(1, 100000) g);
-- (Stored over 2 kB: out of line, as toasting leaves nothing larger in the row.)
SELECT pg_column_size(arr) > 2048 AS arr_toasted, pg_column_size(jb) > 2048 AS jb_toasted,
       array_lower(arr, 1) AS lower FROM exact WHERE id = 4;
SELECT data -> '' ? 'jb' AS jb_entry, left(data -> '' ->> 'arr', 20) AS arr_entry,
       length(data -> '' ->> 'arr') = length(e.arr::text) AS arr_whole
  FROM pg_sync.sync_actions a, exact e
 WHERE a.model = 'exact' AND a.model_id = '4' AND e.id = 4;
-- The entry holds each value's col::text under UTC (whatever the writer's time zone).
SET LOCAL timezone = 'UTC';
SET LOCAL DateStyle = 'ISO, MDY';
SELECT count(*) AS entries, bool_and(x.value = CASE x.key
         WHEN 'j' THEN e.j::text WHEN 'jb' THEN e.jb::text WHEN 'arr' THEN e.arr::text
         WHEN 'md' THEN e.md::text WHEN 'p' THEN e.p::text WHEN 'pa' THEN e.pa::text END) AS exact
  FROM pg_sync.sync_actions a JOIN exact e ON a.model_id = e.id::text,
       jsonb_each_text(a.data -> '') x
 WHERE a.model = 'exact' AND a.action = 'I';
-- apply_remote takes a change with the entry (it is no column) and one without (older log rows).
SELECT pg_sync.apply_remote(jsonb_build_array(
  jsonb_build_object('model', 'exact', 'model_id', m.id::text, 'action', 'I', 'origin', 'peer-a',
    'version', lpad(to_hex(pg_sync.hlc_now() + 1), 16, '0') || '@peer-a',
    'data', (CASE WHEN m.with_entry THEN a.data ELSE a.data - '' END) || jsonb_build_object('id', m.id::int))))
  FROM pg_sync.sync_actions a,
       LATERAL (VALUES (10, true), (11, false)) m(id, with_entry)
 WHERE a.model = 'exact' AND a.action = 'I' AND a.model_id = '1';
SELECT id, j, jb, arr, md, p, pa FROM exact WHERE id >= 10 ORDER BY id;
ROLLBACK;
