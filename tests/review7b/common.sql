\set ON_ERROR_STOP 0
CREATE EXTENSION IF NOT EXISTS pg_sync;
SELECT pg_sync.add_peer('sp', 'ws://127.0.0.1:1', 'a-secret-of-16-chars');
SELECT pg_sync.pin_peer('sp', 'sp');
CREATE TABLE sbase AS SELECT pg_sync.hlc_now() AS hlc;
CREATE FUNCTION sv(k int, node text) RETURNS text LANGUAGE sql AS
  $$ SELECT lpad(to_hex((SELECT hlc FROM sbase) + k), 16, '0') || '@' || node $$;
CREATE FUNCTION ch(s int, m text, action text, id text, k int, node text, data jsonb, extra jsonb DEFAULT '{}')
  RETURNS jsonb LANGUAGE sql AS $$
    SELECT jsonb_build_object('sync_id', s, 'model', m, 'model_id', id, 'action', action,
      'version', sv(k, node), 'origin', node, 'data', data) || extra $$;
