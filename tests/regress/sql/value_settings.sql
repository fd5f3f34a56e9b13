-- Captured values do not depend on the writer's output settings: a float written with
-- extra_float_digits = 0, money under another lc_monetary, an interval in sql_standard style,
-- bytea in escape form and a range under German dates all reach the log in the canonical form
-- that every reader (and every peer, whatever its own settings) parses back to the same value.
CREATE TABLE vs (id int PRIMARY KEY, f float8, r real, m money, i interval, b bytea,
                 d daterange, t timestamptz, fa float8[]);
SELECT pg_sync.register_table('vs');
BEGIN;
SET LOCAL extra_float_digits = 0;
SET LOCAL lc_monetary = 'de_DE.UTF-8';
SET LOCAL IntervalStyle = sql_standard;
SET LOCAL bytea_output = escape;
SET LOCAL DateStyle = 'German, DMY';
SET LOCAL TimeZone = 'America/New_York';
INSERT INTO vs VALUES (1, 0.30000000000000004, 1.1, 1234.5, '-1 years +2 mons -3 days 04:05:06.5',
                       '\x00ff41', '[2024-02-03,2024-03-02)', '2024-02-29 13:14:15.5+00',
                       '{0.30000000000000004,2.5e-7}');
-- The writer's session still prints in its own settings after the capture.
SELECT f, m, i, d FROM vs;
COMMIT;
-- The log holds the canonical texts.
SELECT data->'f' AS f, data->'r' AS r, data->>'m' AS m, data->>'i' AS i, data->>'b' AS b,
       data->>'d' AS d, (data->>'t')::timestamptz AT TIME ZONE 'UTC' AS t_utc, data->'fa' AS fa
  FROM pg_sync.sync_actions WHERE model = 'vs';
-- A reader in yet other settings parses the logged values back to the row's values.
BEGIN;
SET LOCAL IntervalStyle = iso_8601;
SET LOCAL DateStyle = 'SQL, MDY';
SELECT r.f = v.f AS f, r.r = v.r AS r, r.m = v.m AS m, r.i = v.i AS i, r.b = v.b AS b,
       r.d = v.d AS d, r.t = v.t AS t, r.fa = v.fa AS fa
  FROM vs v, pg_sync.sync_actions a, jsonb_populate_record(NULL::vs, a.data) r
 WHERE a.model = 'vs' AND v.id = 1;
COMMIT;
-- A receiver whose session prints money another way still reads the logged form: the merge
-- parses values under the canonical settings (lc_monetary C), on both apply paths.
BEGIN;
SET LOCAL lc_monetary = 'de_DE.UTF-8';
SELECT pg_sync.apply_remote(jsonb_build_object('model', 'vs', 'model_id', '2', 'action', 'I',
    'origin', 'peer-a', 'version', lpad(to_hex(pg_sync.hlc_now() + 1), 16, '0') || '@peer-a',
    'data', data || '{"id": 2}'))
  FROM pg_sync.sync_actions WHERE model = 'vs' AND model_id = '1';
SELECT pg_sync.apply_remote_set(jsonb_build_array(jsonb_build_object('model', 'vs', 'model_id', '3',
    'action', 'I', 'origin', 'peer-a', 'version', lpad(to_hex(pg_sync.hlc_now() + 1), 16, '0') || '@peer-a',
    'data', data || '{"id": 3}')))
  FROM pg_sync.sync_actions WHERE model = 'vs' AND model_id = '1';
SHOW lc_monetary;
COMMIT;
SELECT id, m = (SELECT m FROM vs WHERE id = 1) AS same_money, f = (SELECT f FROM vs WHERE id = 1) AS same_float
  FROM vs WHERE id > 1 ORDER BY id;
SELECT pg_sync.unregister_table('vs');
DROP TABLE vs;
