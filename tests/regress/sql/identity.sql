-- One row, one identity: the model id and group id of a row do not depend on the writer's
-- DateStyle, TimeZone, IntervalStyle, extra_float_digits, lc_monetary or bytea_output (also for
-- types the canonicalizer has no list entry for: ranges print under all the fixed settings).

-- Every supported key type, as key and as group column, one table each.
CREATE TABLE mx_types (typ text PRIMARY KEY, val text NOT NULL);
INSERT INTO mx_types VALUES
  ('int2', '-7'), ('int4', '42'), ('int8', '9223372036854775807'),
  ('numeric', '12345678901234567890.000100'), ('text', 'Ünï "code"'), ('varchar', 'x y'),
  ('uuid', 'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11'), ('bool', 'true'), ('date', '2024-02-29'),
  ('timestamp', '2024-02-29 13:14:15.5'), ('timestamptz', '2024-02-29 13:14:15.5+00'),
  ('time', '13:14:15.25'), ('interval', '-1 years +2 mons -3 days 04:05:06.5'),
  ('float4', '1.1'), ('float8', '0.30000000000000004'), ('money', '1234.5'), ('bytea', '\x00ff41'),
  ('timetz', '13:14:15.25+05:30'), ('daterange', '[2024-02-29,2024-03-02)'),
  ('tstzrange', '[2024-02-29 13:14:15.5+00,2024-03-01 00:00:00+00)');
SET DateStyle = 'ISO, MDY';
SET TimeZone = 'UTC';
DO $$
DECLARE t record;
BEGIN
    FOR t IN SELECT * FROM mx_types LOOP
        EXECUTE format('CREATE TABLE %I (k %s PRIMARY KEY, g %s NOT NULL, v int NOT NULL DEFAULT 0)',
                       'mx_' || t.typ, t.typ, t.typ);
        PERFORM pg_sync.register_table(('mx_' || t.typ)::regclass, group_column => 'g');
        EXECUTE format('INSERT INTO %I (k, g) VALUES (%L, %L)', 'mx_' || t.typ, t.val, t.val);
    END LOOP;
END $$;
-- Composite keys mixing them; the group is an interval.
CREATE TABLE mx_composite (a date, b float8, c interval, d timestamptz, e bytea, f int, g interval,
                           v int NOT NULL DEFAULT 0, PRIMARY KEY (a, b, c, d, e, f));
SELECT pg_sync.register_table('mx_composite', group_column => 'g');
INSERT INTO mx_composite (a, b, c, d, e, f, g)
VALUES ('2024-02-29', 0.1, '1 day 02:00:00', '2024-02-29 23:30:00+00', '\x00ff', 7, '36 hours');
RESET DateStyle;
RESET TimeZone;

-- Write every row under many combinations of the settings: an update, then a delete and
-- re-insert of the same row, each time.
DO $$
DECLARE
    datestyles text[] := '{"ISO, MDY","SQL, DMY","German","Postgres, YMD","ISO, DMY"}';
    zones text[] := '{UTC,America/New_York,Asia/Kolkata,Pacific/Chatham}';
    intervalstyles text[] := '{postgres,sql_standard,iso_8601,postgres_verbose}';
    digits text[] := '{1,0,3,-15,2}';
    monetary text[] := '{C,de_DE.UTF-8,POSIX}';
    bytea_outputs text[] := '{hex,escape}';
    t text;
BEGIN
    FOR i IN 0..11 LOOP
        PERFORM set_config('DateStyle', datestyles[1 + i % 5], true);
        PERFORM set_config('TimeZone', zones[1 + i % 4], true);
        PERFORM set_config('IntervalStyle', intervalstyles[1 + (i / 2) % 4], true);
        PERFORM set_config('extra_float_digits', digits[1 + i % 5], true);
        PERFORM set_config('lc_monetary', monetary[1 + i % 3], true);
        PERFORM set_config('bytea_output', bytea_outputs[1 + (i / 3) % 2], true);
        FOR t IN SELECT 'mx_' || typ FROM mx_types UNION ALL SELECT 'mx_composite' LOOP
            EXECUTE format('UPDATE %I SET v = v + 1', t);
            EXECUTE format('WITH d AS (DELETE FROM %I RETURNING *) INSERT INTO %I SELECT * FROM d', t, t);
        END LOOP;
    END LOOP;
END $$;

-- Exactly one model id and one group id per row, in canonical form.
SELECT model, count(*) AS actions, count(DISTINCT model_id) AS ids, count(DISTINCT group_id) AS groups,
       min(model_id) AS model_id, min(group_id) AS group_id
  FROM pg_sync.sync_actions WHERE model LIKE 'mx\_%' GROUP BY model ORDER BY model;

-- Compaction folds each row once, under its one id.
INSERT INTO pg_sync.commit_order (xid, first_sync_id, action_count, commit_lsn, committed_at)
SELECT xid, pg_sync.last_sync_id() + sum(n) OVER (ORDER BY first_id) - n + 1, n, '0/0', now()
  FROM (SELECT a.xid, min(a.id) AS first_id, count(*)::int AS n FROM pg_sync.sync_actions a
         WHERE NOT EXISTS (SELECT 1 FROM pg_sync.commit_order c WHERE c.xid = a.xid) GROUP BY a.xid) s;
SELECT pg_sync.compact(pg_sync.last_sync_id()) > 0 AS compacted;
SELECT model, model_id, created > deleted AS live FROM pg_sync.row_state
 WHERE model IN ('mx_date', 'mx_timestamptz', 'mx_interval', 'mx_bytea') ORDER BY model;

-- Canonical ids find their rows from any session: peers' updates and client updates by id.
SET DateStyle = 'German';
SET TimeZone = 'Pacific/Chatham';
SET IntervalStyle = 'sql_standard';
SET extra_float_digits = 0;
SET bytea_output = 'escape';
SELECT pg_sync.apply_remote(pg_catalog.jsonb_build_array(
  pg_catalog.jsonb_build_object('model', 'mx_composite', 'action', 'U', 'origin', 'peer',
    'model_id', '["2024-02-29","0.1","1 day 02:00:00","2024-02-29 23:30:00+00","\\x00ff","7"]',
    'data', '{"v": 100}'::jsonb, 'version', pg_sync.next_version()),
  pg_catalog.jsonb_build_object('model', 'mx_timestamptz', 'action', 'U', 'origin', 'peer',
    'model_id', '2024-02-29 13:14:15.5+00', 'data', '{"v": 100}'::jsonb, 'version', pg_sync.next_version()),
  pg_catalog.jsonb_build_object('model', 'mx_interval', 'action', 'U', 'origin', 'peer',
    'model_id', '-10 mons -3 days +04:05:06.5', 'data', '{"v": 100}'::jsonb, 'version', pg_sync.next_version()))) AS applied;
SELECT pg_sync.mutate('c-matrix', gen_random_uuid(), '[
  {"model": "mx_date", "action": "U", "id": "2024-02-29", "data": {"v": 100}},
  {"model": "mx_float8", "action": "U", "id": 0.30000000000000004, "data": {"v": 100}},
  {"model": "mx_bytea", "action": "U", "id": "\\x00ff41", "data": {"v": 100}},
  {"model": "mx_timestamp", "action": "U", "id": "2024-02-29T13:14:15.5", "data": {"v": 100}}]') -> 'ops';
RESET ALL;
SELECT (SELECT v FROM mx_composite) AS composite, (SELECT v FROM mx_timestamptz) AS timestamptz,
       (SELECT v FROM mx_interval) AS "interval", (SELECT v FROM mx_date) AS date,
       (SELECT v FROM mx_float8) AS float8, (SELECT v FROM mx_bytea) AS bytea,
       (SELECT v FROM mx_timestamp) AS "timestamp";

-- pg_sync.canonical_text gives the same text in any session.
SET DateStyle = 'SQL, DMY';
SET TimeZone = 'Asia/Kolkata';
SET IntervalStyle = 'iso_8601';
SET extra_float_digits = -10;
SET bytea_output = 'escape';
SELECT pg_sync.canonical_text('2024-02-29 13:14:15.5+00'::timestamptz) AS tz,
       pg_sync.canonical_text('2 days 1 hour'::interval) AS iv,
       pg_sync.canonical_text(0.1::float8 * 3) AS f8,
       pg_sync.canonical_text('\x00ff'::bytea) AS by,
       pg_sync.canonical_text(ARRAY['2024-01-02'::date]) AS arr,
       pg_sync.canonical_text(ROW(1.5::float4, '2024-01-02'::date)) AS rec;
-- The session's own settings are untouched.
SELECT '2024-02-29 13:14:15.5+00'::timestamptz AS tz_after, '\x00ff'::bytea AS by_after,
       current_setting('DateStyle') AS datestyle, current_setting('TimeZone') AS timezone;
RESET ALL;

-- Ids that peers send are parsed by the key column's type and printed canonically, so a
-- tombstone for id 1 blocks a stale insert sent as "01", and an upper-case uuid is the row
-- with the lower-case id.
CREATE TABLE ids (id int PRIMARY KEY, title text);
SELECT pg_sync.register_table('ids');
SELECT pg_sync.apply_remote('[
  {"model": "ids", "model_id": "1", "action": "I", "data": {"id": 1, "title": "one"}, "version": "0000000000010000@peer", "origin": "peer"},
  {"model": "ids", "model_id": "1", "action": "D", "data": {"id": 1}, "version": "0000000000030000@peer", "origin": "peer"},
  {"model": "ids", "model_id": "01", "action": "I", "data": {"id": 1, "title": "stale"}, "version": "0000000000020000@peer", "origin": "peer"},
  {"model": "ids", "model_id": " 1", "action": "U", "data": {"title": "stale too"}, "version": "0000000000020001@peer", "origin": "peer"}
]') AS applied;
SELECT count(*) AS resurrected FROM ids;
SELECT model_id, action FROM pg_sync.sync_actions WHERE model = 'ids' ORDER BY id;
SELECT model_id FROM pg_sync.row_state WHERE model = 'ids';
SELECT err($$SELECT pg_sync.apply_remote('{"model": "ids", "model_id": "one", "action": "I", "data": {"id": 1}, "version": "0000000000040000@peer", "origin": "peer"}')$$);
SELECT err($$SELECT pg_sync.apply_remote('{"model": "ids", "model_id": "99999999999", "action": "I", "data": {"id": 1}, "version": "0000000000040000@peer", "origin": "peer"}')$$);
CREATE TABLE uids (id uuid, at date, note text, PRIMARY KEY (id, at));
SELECT pg_sync.register_table('uids');
SET DateStyle = 'SQL, DMY';
SELECT pg_sync.apply_remote('{"model": "uids", "model_id": "[\"A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11\",\"2024-02-29\"]", "action": "I", "data": {"id": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "at": "2024-02-29", "note": "n"}, "version": "0000000000010000@peer", "origin": "peer"}') AS applied;
RESET DateStyle;
SELECT model_id FROM pg_sync.sync_actions WHERE model = 'uids';

-- mutate ids too: "01" is row 1, and key values in data compare canonically.
SELECT pg_sync.mutate('c-ids', gen_random_uuid(), '[
  {"model": "ids", "action": "I", "id": "02", "data": {"title": "two"}},
  {"model": "ids", "action": "U", "id": 2, "data": {"id": "002", "title": "deux"}}]') -> 'ops';
SELECT * FROM ids;
SELECT err($$SELECT pg_sync.mutate('c-ids', gen_random_uuid(), '[{"model": "ids", "action": "U", "id": "2x", "data": {"title": "t"}}]')$$);

-- The node id follows its setting, also when a new value lands at a freed value's address.
SET pg_sync.node_id = 'node-aaa';
SELECT pg_sync.node_id();
SET pg_sync.node_id = 'node-bbb';
SET pg_sync.node_id = 'node-ccc';
SELECT pg_sync.node_id();
RESET pg_sync.node_id;
SELECT pg_sync.node_id();

-- numeric equality ignores the scale: 1.0, 1.00 and 1 are one key (and 2.50, 2.5 one group),
-- in capture, in ids from peers and clients, and in group checks.
CREATE TABLE nums (id numeric PRIMARY KEY, grp numeric, v text);
SELECT pg_sync.register_table('nums', 'grp');
INSERT INTO nums VALUES (1.0, 2.50, 'a'), (10, 0.0, 'b'), (-0.50, -3.000, 'c');
SELECT pg_sync.apply_remote(jsonb_build_object(
    'model', 'nums', 'model_id', '1.00', 'action', 'U', 'origin', 'node-x',
    'version', lpad(to_hex(pg_sync.hlc_now() + 1000), 16, '0') || '@node-x',
    'data', '{"v": "peer"}'::jsonb)) AS applied;
SELECT pg_sync.mutate('c', gen_random_uuid(), '[{"model": "nums", "action": "U", "id": "10.000", "data": {"v": "client"}}]')->>'status' AS mutated;
SELECT id, grp, v FROM nums ORDER BY id;
SELECT model_id, action, group_id, origin FROM pg_sync.sync_actions WHERE model = 'nums' ORDER BY id;
SELECT model_id FROM pg_sync.row_state WHERE model = 'nums' ORDER BY model_id;
