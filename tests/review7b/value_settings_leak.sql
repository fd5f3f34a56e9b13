-- Does a captured row's JSON depend on the writer's session settings?
\i common.sql
CREATE TYPE cf AS (f float8, m money, t timestamptz);
CREATE DOMAIN dmoney AS money;
CREATE DOMAIN dts AS timestamptz;
CREATE DOMAIN dfl AS float8;
CREATE DOMAIN dint AS interval;
CREATE TABLE vs (id int PRIMARY KEY, ma money[], dm dmoney, dmarr dmoney[], c cf, carr cf[], r tstzrange,
  d dts, f dfl, iv dint, iva interval[], b bytea, barr bytea[], ts timestamp, tsa timestamptz[], fa float4[]);
SELECT pg_sync.register_table('vs');
CREATE FUNCTION ins(i int) RETURNS void LANGUAGE sql AS $$
INSERT INTO vs VALUES (i, '{1,2}', 3, '{4}', ROW(0.1, 7, '2024-01-02 03:04:05+00'),
  ARRAY[ROW(0.1, 7, '2024-01-02 03:04:05+00')::cf], tstzrange('2024-01-02 03:04:05+00', '2024-02-02 00:00:00+00'),
  '2024-01-02 03:04:05+00', 0.1, '1 day 2 hours', '{"1 day 2 hours"}', '\xdead', '{"\\xdead"}',
  '2024-01-02 03:04:05', '{"2024-01-02 03:04:05+00"}', '{0.1}') $$;
SELECT ins(1);
SET DateStyle = 'SQL, DMY'; SET TimeZone = 'Asia/Kolkata'; SET IntervalStyle = 'sql_standard';
SET extra_float_digits = -3; SET lc_monetary = 'de_DE.UTF-8'; SET bytea_output = 'escape';
SELECT ins(2);
RESET ALL;
SELECT key, a.value AS v1, b.value AS v2
  FROM (SELECT data FROM pg_sync.sync_actions WHERE model = 'vs' AND model_id = '1') x1,
       (SELECT data FROM pg_sync.sync_actions WHERE model = 'vs' AND model_id = '2') x2,
       LATERAL jsonb_each(x1.data) a JOIN LATERAL jsonb_each(x2.data) b USING (key)
 WHERE a.value IS DISTINCT FROM b.value AND key <> 'id';
