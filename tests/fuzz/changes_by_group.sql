-- Randomized differential check of pg_sync.changes(): the page read "by group"
-- (commit_order_group_idx / commit_order_shared_idx), the page read by walking the span, and the
-- function as installed, against a naive reference (every action numbered by its
-- transaction's first_sync_id and rank), over random logs. Usage:
--   psql -v seed=0.42 -v rounds=40 -f tests/fuzz/changes_by_group.sql   (in a fresh pg_sync db)
\set ON_ERROR_STOP 1
SELECT setseed(:seed);
SELECT set_config('fz.rounds', :'rounds', false);
\echo seed :seed
-- The two ways forced: the body with the threshold (span / 64) replaced by 0 (always walk)
-- or by int max (always by group).
CREATE SCHEMA fw; CREATE SCHEMA fg;
DO $$
DECLARE src text := (SELECT prosrc FROM pg_proc WHERE oid = 'pg_sync.changes(bigint,text[],integer,text)'::regprocedure);
        th text := '(changes.span OPERATOR(pg_catalog./) 64)';
BEGIN
  IF strpos(src, th) = 0 THEN RAISE EXCEPTION 'threshold not found'; END IF;
  EXECUTE format($f$CREATE FUNCTION %s.changes(after bigint, groups text[], span integer, member text)
    RETURNS TABLE (sync_id bigint, id bigint, model text, model_id text, action text, data jsonb,
               version text, versions jsonb, origin text, group_id text, prev_group_id text,
               moved boolean, client_id text, client_tx_id uuid, global boolean)
    LANGUAGE sql STABLE AS %L$f$, 'fw', replace(src, th, '(0)'));
  EXECUTE format($f$CREATE FUNCTION %s.changes(after bigint, groups text[], span integer, member text)
    RETURNS TABLE (sync_id bigint, id bigint, model text, model_id text, action text, data jsonb,
               version text, versions jsonb, origin text, group_id text, prev_group_id text,
               moved boolean, client_id text, client_tx_id uuid, global boolean)
    LANGUAGE sql STABLE AS %L$f$, 'fg', replace(src, th, '(2147483647)'));
END $$;

CREATE FUNCTION fz_ref(after bigint, groups text[], span int, member text) RETURNS text[]
LANGUAGE sql AS $$
  SELECT coalesce(array_agg(s || ':' || id ORDER BY s), '{}') FROM (
    SELECT c.first_sync_id + row_number() OVER (PARTITION BY c.xid ORDER BY a.id) - 1 AS s, c.action_count,
           row_number() OVER (PARTITION BY c.xid ORDER BY a.id) AS rk, a.*
      FROM pg_sync.commit_order c JOIN pg_sync.sync_actions a ON a.xid = c.xid) x
   WHERE rk <= action_count AND s > after AND s <= after + span
     AND (groups IS NULL OR group_id IS NULL OR group_id = ANY (groups) OR model = '$membership')
     AND (member IS NULL OR model <> '$membership' OR model_id = member)
$$;

-- A random log: n transactions, sizes mostly 1-3, some up to 300; actions in groups g0..g(k-1),
-- '' , global (NULL) or $membership of u0..u3. group_ids as the sequencer sets them, or NULL
-- (not summarised), sometimes; action_count sometimes above the actions' count.
CREATE FUNCTION fz_log(n int, k int) RETURNS void LANGUAGE plpgsql AS $$
DECLARE nxt bigint := 1; sz int; g text; x xid8; gids text[]; cnt int;
BEGIN
  DELETE FROM pg_sync.commit_order; DELETE FROM pg_sync.sync_actions;
  FOR t IN 1..n LOOP
    x := (1000000 + t)::text::xid8;
    sz := CASE WHEN random() < 0.05 THEN 1 + (random() * 300)::int ELSE 1 + (random() * 2)::int END;
    g := 'g' || (random() * (k - 1))::int;
    FOR i IN 1..sz LOOP
      INSERT INTO pg_sync.sync_actions (model, model_id, action, data, version, origin, group_id, xid)
      SELECT CASE WHEN r < 0.04 THEN '$membership' ELSE 'm' END,
             CASE WHEN r < 0.04 THEN 'u' || (random() * 3)::int ELSE t || '.' || i END, 'I', '{}', '1', 'o',
             CASE WHEN r < 0.04 THEN g WHEN r < 0.07 THEN NULL WHEN r < 0.09 THEN ''
                  WHEN r < 0.25 THEN 'g' || (random() * (k - 1))::int ELSE g END, x
        FROM (SELECT random() AS r) q;
    END LOOP;
    SELECT CASE WHEN bool_or(a.group_id IS NULL OR a.model = '$membership') OR count(DISTINCT a.group_id) > 32
                THEN NULL ELSE array_agg(DISTINCT a.group_id) END INTO gids
      FROM pg_sync.sync_actions a WHERE a.xid = x;
    IF random() < 0.05 THEN gids := NULL; END IF;
    cnt := sz + CASE WHEN random() < 0.03 THEN 1 + (random() * 3)::int ELSE 0 END;
    INSERT INTO pg_sync.commit_order (xid, first_sync_id, action_count, commit_lsn, committed_at, group_ids)
    VALUES (x, nxt, cnt, '0/0', now(), gids);
    nxt := nxt + cnt;
  END LOOP;
END $$;

CREATE FUNCTION fz_page(sch text, after bigint, groups text[], span int, member text) RETURNS text[]
LANGUAGE plpgsql AS $$
DECLARE r text[];
BEGIN
  EXECUTE format('SELECT coalesce(array_agg(c.sync_id || '':'' || c.id), ''{}'') FROM %I.changes($1, $2, $3, $4) c', sch)
    INTO r USING after, groups, span, member;
  RETURN r;
END $$;

CREATE TABLE fz_bad (round int, after bigint, groups text[], span int, member text, way text, got text[], want text[]);
DO $$
DECLARE last bigint; after bigint; groups text[]; span int; member text; want text[]; got text[];
        k int; checks int := 0;
BEGIN
  FOR round IN 1..current_setting('fz.rounds')::int LOOP
    k := 2 + (random() * 30)::int;
    PERFORM fz_log(20 + (random() * 400)::int, k);
    IF random() < 0.5 THEN ANALYZE pg_sync.commit_order; END IF;
    last := (SELECT max(first_sync_id + action_count - 1) FROM pg_sync.commit_order);
    FOR q IN 1..60 LOOP
      after := (random() * last)::bigint - 5;
      span := (ARRAY[1, 2, 63, 64, 65, 127, 128, 129, 200, 1000, 5000, 0, -1, -64, -200])[1 + (random() * 14)::int];
      IF random() < 0.3 THEN span := 1 + (random() * 3000)::int; END IF;
      groups := CASE (random() * 9)::int
        WHEN 0 THEN NULL WHEN 1 THEN '{}'
        WHEN 2 THEN ARRAY['g' || (random() * k)::int]
        WHEN 3 THEN ARRAY['g' || (random() * k)::int, 'g' || (random() * k)::int, NULL]
        WHEN 4 THEN ARRAY['g' || (random() * k)::int, 'g' || (random() * k)::int]
        WHEN 5 THEN ARRAY[['g' || (random() * k)::int, 'g' || (random() * k)::int], ['', 'g1']]
        WHEN 6 THEN ARRAY['g1', 'g1', 'g1']
        WHEN 7 THEN ARRAY[NULL]::text[]
        ELSE (SELECT array_agg('g' || i) FROM generate_series(0, (random() * k)::int) i) END;
      member := CASE WHEN random() < 0.5 THEN NULL ELSE 'u' || (random() * 3)::int END;
      want := fz_ref(after, groups, span, member);
      got := fz_page('fw', after, groups, span, member);
      IF got IS DISTINCT FROM want THEN INSERT INTO fz_bad VALUES (round, after, groups, span, member, 'walk', got, want); END IF;
      got := fz_page('fg', after, groups, span, member);
      IF got IS DISTINCT FROM want THEN INSERT INTO fz_bad VALUES (round, after, groups, span, member, 'bygroup', got, want); END IF;
      got := fz_page('pg_sync', after, groups, span, member);
      IF got IS DISTINCT FROM want THEN INSERT INTO fz_bad VALUES (round, after, groups, span, member, 'installed', got, want); END IF;
      checks := checks + 1;
    END LOOP;
  END LOOP;
  RAISE NOTICE 'pages checked: %, mismatches: %', checks, (SELECT count(*) FROM fz_bad);
END $$;
SELECT round, after, groups, span, member, way, cardinality(got) AS got_n, cardinality(want) AS want_n,
       got[1:6] AS got, want[1:6] AS want FROM fz_bad ORDER BY round, after LIMIT 30;
