-- Column values map to JSON as to_jsonb() maps them; numeric keeps every digit.
SET timezone = 'UTC';
CREATE TABLE typed (
  id uuid PRIMARY KEY, t text, i2 smallint, i4 int, i8 bigint, n numeric, f float8, b boolean,
  ts timestamptz, d date, j jsonb, arr int[], tarr text[], by bytea, nothing text);
SELECT pg_sync.register_table('typed');
INSERT INTO typed VALUES (
  '8c0e5a8e-6f4e-4a61-9b7a-4d0f3a7f2b11', 'hé "quoted"', 32767, 2147483647, 9223372036854775807,
  123456789012345678901234567890.123456789012345678901234567890, 1.5, true,
  '2024-02-29 13:14:15.123456+00', '2024-02-29', '{"nested": [1, {"a": null}]}', '{1,2,3}',
  '{"a b",NULL}', '\x00ff', NULL);
SELECT model_id, jsonb_pretty(data) FROM pg_sync.sync_actions WHERE model = 'typed';
-- The numeric survives a round trip through the action log exactly.
SELECT (data->>'n')::numeric = n AS numeric_exact FROM pg_sync.sync_actions, typed WHERE model = 'typed';
-- Updating to NULL and to the same value.
UPDATE typed SET nothing = 'x', i4 = i4;
UPDATE typed SET nothing = NULL;
SELECT action, data FROM pg_sync.sync_actions WHERE model = 'typed' ORDER BY id;
-- Large (toasted) values compare by content.
UPDATE typed SET t = repeat('long ', 100000);
UPDATE typed SET t = repeat('long ', 100000);
UPDATE typed SET b = false;
SELECT action, ARRAY(SELECT jsonb_object_keys(data)) AS columns FROM pg_sync.sync_actions
 WHERE model = 'typed' AND action = 'U' ORDER BY id;
