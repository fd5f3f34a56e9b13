-- Shared by every test in the schedule: the extension and a helper that shows an error's
-- SQLSTATE, message and hint instead of aborting.
CREATE EXTENSION pg_sync;
CREATE FUNCTION err(q text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE s text; m text; h text;
BEGIN
    EXECUTE q;
    RETURN 'no error';
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS s = RETURNED_SQLSTATE, m = MESSAGE_TEXT, h = PG_EXCEPTION_HINT;
    RETURN s || ': ' || m || coalesce(' | hint: ' || nullif(h, ''), '');
END $$;
-- Versions differ between runs; tests print how they compare, never the values.
SELECT pg_sync.node_id();
SELECT pg_sync.hlc_now() < pg_sync.hlc_now() AS hlc_increases;
SELECT pg_sync.version_hlc(pg_sync.next_version()) > 0 AS version_parses;
SELECT err($$SELECT pg_sync.version_hlc('nonsense')$$);
SELECT abs(extract(epoch FROM pg_sync.hlc_to_timestamptz(pg_sync.hlc_now()) - clock_timestamp())) < 5 AS hlc_is_wall_time;
