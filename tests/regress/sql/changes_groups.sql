-- pg_sync.changes() skips the transactions whose commit_order.group_ids name none of the
-- reader's groups (NULL: always read), and returns exactly what it returns without the lists.
-- The lists are set here the way the worker's sequencer sets them (cg_group_ids).
CREATE FUNCTION cg_group_ids(x xid8) RETURNS text[] LANGUAGE sql AS $$
  SELECT CASE WHEN bool_or(a.group_id IS NULL OR a.model = '$membership') OR count(DISTINCT a.group_id) > 32
              THEN NULL ELSE array_agg(DISTINCT a.group_id) END
    FROM pg_sync.sync_actions a WHERE a.xid = x
$$;
CREATE FUNCTION cg_seq() RETURNS void LANGUAGE sql AS $$
  INSERT INTO pg_sync.commit_order (xid, first_sync_id, action_count, commit_lsn, committed_at, group_ids)
  SELECT xid, pg_sync.last_sync_id() + sum(n) OVER (ORDER BY first_id) - n + 1, n, '0/0', now(), cg_group_ids(xid)
    FROM (SELECT a.xid, min(a.id) AS first_id, count(*)::int AS n FROM pg_sync.sync_actions a
           WHERE NOT EXISTS (SELECT 1 FROM pg_sync.commit_order c WHERE c.xid = a.xid) GROUP BY a.xid) s
$$;
SELECT cg_seq();  -- what earlier tests left unsequenced
CREATE TEMP TABLE cg_mark AS SELECT pg_sync.last_sync_id() AS at;
CREATE TABLE cg_t (id int PRIMARY KEY, grp text);
SELECT pg_sync.register_table('cg_t', group_column => 'grp');
CREATE TABLE cg_global (id int PRIMARY KEY);
SELECT pg_sync.register_table('cg_global');

-- One-group transactions of four groups; one of three groups; one with a row in no group ('');
-- a global one; a membership change alone and one beside a group's rows; one of 40 groups
-- (past the list's 32); a move from cg_g1 to cg_g2 (logged under cg_g2).
INSERT INTO cg_t VALUES (1, 'cg_g1');
INSERT INTO cg_t VALUES (2, 'cg_g2');
INSERT INTO cg_t VALUES (3, 'cg_g3');
INSERT INTO cg_t VALUES (4, 'cg_g4');
INSERT INTO cg_t VALUES (5, 'cg_g1'), (6, 'cg_g2'), (7, 'cg_g3');
INSERT INTO cg_t VALUES (8, '');
INSERT INTO cg_global VALUES (1);
SELECT pg_sync.add_member('cg_u1', 'cg_g1');
BEGIN;
INSERT INTO cg_t VALUES (9, 'cg_g4');
SELECT pg_sync.add_member('cg_u2', 'cg_g4');
COMMIT;
INSERT INTO cg_t SELECT g, 'cg_m' || g FROM generate_series(100, 139) g;
UPDATE cg_t SET grp = 'cg_g2' WHERE id = 1;
INSERT INTO cg_t VALUES (10, 'cg_g1');
SELECT cg_seq();

-- The lists as written: one per transaction, in commit order.
SELECT c.first_sync_id - (SELECT at FROM cg_mark) AS at, c.action_count, c.group_ids
  FROM pg_sync.commit_order c WHERE c.first_sync_id > (SELECT at FROM cg_mark) ORDER BY 1;

-- Every reader's pages equal the pages read with no lists at all (every transaction read).
CREATE FUNCTION cg_pages(span int, groups text[], member text) RETURNS text[]
LANGUAGE plpgsql AS $$
DECLARE
    after bigint := (SELECT at FROM cg_mark);
    got text[] := '{}';
    page text[];
BEGIN
    WHILE after < pg_sync.last_sync_id() LOOP
        SELECT array_agg(c.sync_id || ':' || c.id) INTO page FROM pg_sync.changes(after, groups, span, member) c;
        got := got || coalesce(page, '{}');
        after := after + span;
    END LOOP;
    RETURN got;
END $$;
CREATE TEMP TABLE cg_readers AS
SELECT s.span, g.groups, m.member, cg_pages(s.span, g.groups, m.member) AS pages
  FROM (VALUES (1), (3), (1000)) s(span),
       (VALUES (NULL::text[]), ('{}'), ('{cg_g1}'), ('{cg_g4}'), ('{cg_g2,cg_g3}'), ('{cg_m120}'), ('{""}'),
               ('{cg_nowhere}'), ('{NULL,cg_g3}'), ('{cg_g1,cg_g1}')) g(groups),
       (VALUES (NULL::text), ('cg_u2')) m(member);
CREATE TEMP TABLE cg_saved AS SELECT xid, group_ids FROM pg_sync.commit_order WHERE group_ids IS NOT NULL;
UPDATE pg_sync.commit_order SET group_ids = NULL WHERE group_ids IS NOT NULL;
SELECT r.span, r.groups, r.member, cardinality(r.pages) AS rows,
       r.pages = cg_pages(r.span, r.groups, r.member) AS same_without_lists
  FROM cg_readers r ORDER BY r.span, r.groups::text NULLS FIRST, r.member NULLS FIRST;
UPDATE pg_sync.commit_order c SET group_ids = s.group_ids FROM cg_saved s WHERE s.xid = c.xid;

-- The list is trusted: a transaction listed under another group is not read for its own
-- group's reader (what makes the sequencer's lists part of the contract).
UPDATE pg_sync.commit_order SET group_ids = '{cg_elsewhere}'
 WHERE group_ids = '{cg_g4}' AND first_sync_id > (SELECT at FROM cg_mark);
SELECT c.model_id FROM pg_sync.changes((SELECT at FROM cg_mark), '{cg_g4}', 1000, 'cg_u2') c ORDER BY c.sync_id;
UPDATE pg_sync.commit_order SET group_ids = '{cg_g4}' WHERE group_ids = '{cg_elsewhere}';
SELECT c.model_id FROM pg_sync.changes((SELECT at FROM cg_mark), '{cg_g4}', 1000, 'cg_u2') c ORDER BY c.sync_id;

-- And a skipped transaction costs no read of its actions: a reader of cg_g3 probes the log for
-- the transactions listing cg_g3 and those with no list (global, membership, 40 groups) only.
SELECT count(*) FILTER (WHERE c.group_ids IS NULL OR 'cg_g3' = ANY (c.group_ids)) AS probed,
       count(*) AS in_range
  FROM pg_sync.commit_order c WHERE c.first_sync_id > (SELECT at FROM cg_mark);
CREATE FUNCTION cg_probes(plan json) RETURNS bigint LANGUAGE sql AS $$
  WITH RECURSIVE n(node) AS (SELECT plan -> 0 -> 'Plan'
                             UNION ALL SELECT p FROM n, json_array_elements(n.node -> 'Plans') p)
  SELECT sum((node ->> 'Actual Loops')::bigint) FROM n
   WHERE node ->> 'Relation Name' = 'sync_actions' AND node ->> 'Alias' IN ('b', 'bc')
$$;
DO $$
DECLARE plan json;
BEGIN
  EXECUTE format('EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF, FORMAT JSON) SELECT * FROM pg_sync.changes(%s, ''{cg_g3}'', 1000)',
                 (SELECT at FROM cg_mark)) INTO plan;
  RAISE NOTICE 'transactions whose actions were read: %', cg_probes(plan);
END $$;

-- A page's cost follows what its reader can see, not its span: over 2,000 one-row
-- transactions in 100 groups, a reader of one or two groups reads the commit_order rows of its
-- groups' transactions and of those listing none or several (commit_order_group_idx and
-- commit_order_shared_idx, one descent per group), not the span's 2,000; a reader of every
-- group (groups NULL) or of a short span walks the span. `read` counts the commit_order rows
-- the page's scans returned or filtered out (the lower-bound probe aside).
CREATE PROCEDURE cg_many() LANGUAGE plpgsql AS $$
BEGIN
    FOR i IN 1..2000 LOOP
        INSERT INTO cg_t VALUES (1000 + i, 'cg_h' || (i % 100));
        COMMIT;
    END LOOP;
END $$;
UPDATE cg_mark SET at = pg_sync.last_sync_id();
CALL cg_many();
INSERT INTO cg_global VALUES (2);
SELECT cg_seq();
ANALYZE pg_sync.commit_order;
CREATE FUNCTION cg_read(groups text[], span int) RETURNS TABLE (read bigint, visible bigint, in_span bigint)
LANGUAGE plpgsql AS $$
DECLARE plan json;
BEGIN
    EXECUTE format('EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF, FORMAT JSON) SELECT * FROM pg_sync.changes(%s, %L, %s)',
                   (SELECT at FROM cg_mark), groups, span) INTO plan;
    RETURN QUERY
    WITH RECURSIVE n(node) AS (SELECT plan -> 0 -> 'Plan'
                               UNION ALL SELECT p FROM n, json_array_elements(n.node -> 'Plans') p)
    SELECT (SELECT sum(((node ->> 'Actual Rows')::bigint + coalesce((node ->> 'Rows Removed by Filter')::bigint, 0))
                       * (node ->> 'Actual Loops')::bigint)::bigint FROM n
             WHERE node ->> 'Relation Name' = 'commit_order' AND node ->> 'Parent Relationship' <> 'InitPlan'),
           count(*) FILTER (WHERE groups IS NULL OR c.group_ids IS NULL OR c.group_ids && groups),
           count(*)
      FROM pg_sync.commit_order c
     WHERE c.first_sync_id > (SELECT at FROM cg_mark) AND c.first_sync_id <= (SELECT at FROM cg_mark) + span;
END $$;
SELECT g.groups, s.span, r.*
  FROM (VALUES ('{cg_h5}'::text[]), ('{cg_h5,cg_h7}'), (NULL)) g(groups), (VALUES (2001), (20)) s(span),
       cg_read(g.groups, s.span) r
 ORDER BY s.span DESC, g.groups NULLS LAST;

-- member_joins() is inlined into the statement that calls it (no SET clause): planned with it,
-- which the worker prepares once per connection, not planned again inside every call.
DO $$
DECLARE plan json;
BEGIN
  EXECUTE 'EXPLAIN (COSTS OFF, FORMAT JSON) SELECT * FROM pg_sync.member_joins(''cg_u2'', 0, 10)' INTO plan;
  RAISE NOTICE 'member_joins inlined: %', plan::text NOT LIKE '%Function Scan%';
END $$;

SELECT pg_sync.remove_member('cg_u1', 'cg_g1');
SELECT pg_sync.remove_member('cg_u2', 'cg_g4');
SELECT pg_sync.unregister_table('cg_t');
SELECT pg_sync.unregister_table('cg_global');
DROP TABLE cg_t, cg_global;
DROP FUNCTION cg_seq(), cg_group_ids(xid8), cg_pages(int, text[], text), cg_probes(json), cg_read(text[], int);
DROP PROCEDURE cg_many();
