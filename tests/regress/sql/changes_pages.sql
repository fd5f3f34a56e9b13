-- pg_sync.changes() paging: every page of a range, read with any span and resumed at any sync
-- id (inside a transaction too), concatenates to the log numbered by transaction commit order
-- and action id order, filtered by group and by member. The reference numbering here is the
-- definition (a window over each whole transaction); the function pages without one, so this
-- pins its positions and its order (the pages are concatenated in the order the function
-- returns its rows, with no ORDER BY).
CREATE FUNCTION cp_seq() RETURNS void LANGUAGE sql AS $$
  INSERT INTO pg_sync.commit_order (xid, first_sync_id, action_count, commit_lsn, committed_at)
  SELECT xid, pg_sync.last_sync_id() + sum(n) OVER (ORDER BY first_id) - n + 1, n, '0/0', now()
    FROM (SELECT a.xid, min(a.id) AS first_id, count(*)::int AS n FROM pg_sync.sync_actions a
           WHERE NOT EXISTS (SELECT 1 FROM pg_sync.commit_order c WHERE c.xid = a.xid) GROUP BY a.xid) s
$$;
SELECT cp_seq();  -- what earlier tests left unsequenced
CREATE TEMP TABLE cp_mark AS SELECT pg_sync.last_sync_id() AS at;
CREATE TABLE cp_t (id int PRIMARY KEY, grp text);
SELECT pg_sync.register_table('cp_t', group_column => 'grp');
CREATE TABLE cp_global (id int PRIMARY KEY);
SELECT pg_sync.register_table('cp_global');

-- A small transaction; then one of 2,600 actions over three groups, with membership changes of
-- two users in its middle and ids it burned in a rolled-back subtransaction (gaps inside the
-- transaction); then a global one and one more small one.
INSERT INTO cp_t SELECT g, 'cp_g' || (g % 3) FROM generate_series(1, 3) g;
BEGIN;
INSERT INTO cp_t SELECT g, 'cp_g' || (g % 3) FROM generate_series(100, 1299) g;
SELECT pg_sync.add_member('cp_u1', 'cp_g1');
SAVEPOINT s;
INSERT INTO cp_t SELECT g, 'cp_g0' FROM generate_series(5000, 5099) g;
ROLLBACK TO s;
SELECT pg_sync.add_member('cp_u2', 'cp_g2');
UPDATE cp_t SET grp = 'cp_g2' WHERE id BETWEEN 100 AND 199;
DELETE FROM cp_t WHERE id BETWEEN 1200 AND 1299;
SELECT pg_sync.remove_member('cp_u1', 'cp_g1');
INSERT INTO cp_t SELECT g, 'cp_g' || (g % 3) FROM generate_series(2000, 3195) g;
COMMIT;
INSERT INTO cp_global SELECT generate_series(1, 4);
INSERT INTO cp_t VALUES (9, 'cp_g1'), (10, 'cp_g0');
SELECT cp_seq();

-- The reference: the range's actions numbered by the definition, as 'sync_id:id' in order.
CREATE FUNCTION cp_reference(groups text[], member text) RETURNS text[] LANGUAGE sql AS $$
  SELECT array_agg(n.sync_id || ':' || n.id ORDER BY n.sync_id)
    FROM (SELECT c.first_sync_id + row_number() OVER (PARTITION BY a.xid ORDER BY a.id) - 1 AS sync_id, a.*
            FROM pg_sync.commit_order c JOIN pg_sync.sync_actions a ON a.xid = c.xid
           WHERE c.first_sync_id + c.action_count - 1 > (SELECT at FROM cp_mark)) n
   WHERE n.sync_id > (SELECT at FROM cp_mark) AND n.sync_id <= pg_sync.last_sync_id()
     AND (groups IS NULL OR n.group_id IS NULL OR n.group_id = ANY (groups) OR n.model = '$membership')
     AND (member IS NULL OR n.model <> '$membership' OR n.model_id = member)
$$;
-- The pages from `after` on with `span`, concatenated in the order changes() returns them.
CREATE FUNCTION cp_pages(after bigint, span int, groups text[], member text) RETURNS text[]
LANGUAGE plpgsql AS $$
DECLARE
    got text[] := '{}';
    page text[];
BEGIN
    WHILE after < pg_sync.last_sync_id() LOOP
        IF member IS NULL THEN
            SELECT array_agg(c.sync_id || ':' || c.id) INTO page FROM pg_sync.changes(after, groups, span) c;
        ELSE
            SELECT array_agg(c.sync_id || ':' || c.id) INTO page FROM pg_sync.changes(after, groups, span, member) c;
        END IF;
        got := got || coalesce(page, '{}');
        after := after + span;
    END LOOP;
    RETURN got;
END $$;

SELECT cardinality(cp_reference(NULL, NULL)) AS actions,
       (SELECT max(action_count) FROM pg_sync.commit_order) AS largest_transaction;
-- Every span: pages that start and end inside the large transaction, one action per page, a
-- page holding the whole range.
SELECT s.span, g.groups, m.member,
       cp_pages((SELECT at FROM cp_mark), s.span, g.groups, m.member) = cp_reference(g.groups, m.member) AS pages_match
  FROM (VALUES (7), (1000), (1001), (5000)) s(span),
       (VALUES (NULL::text[]), ('{cp_g1}'), ('{cp_g0,cp_g2}')) g(groups),
       (VALUES (NULL::text), ('cp_u1'), ('nobody')) m(member)
UNION ALL
SELECT 1, g.groups, g.member,
       cp_pages((SELECT at FROM cp_mark), 1, g.groups, g.member) = cp_reference(g.groups, g.member)
  FROM (VALUES (NULL::text[], NULL::text), ('{cp_g1}', 'cp_u1')) g(groups, member)
 ORDER BY 1, 2, 3;
-- Resumed mid-transaction: from every 25th sync id inside the large one, the rest of the log
-- in pages of 997 matches the reference's tail.
SELECT count(*) AS resumptions,
       count(*) FILTER (WHERE cp_pages(r, 997, '{cp_g1}', 'cp_u2')
                              = (SELECT coalesce(array_agg(x), '{}') FROM unnest(cp_reference('{cp_g1}', 'cp_u2')) x
                                  WHERE split_part(x, ':', 1)::bigint > r)) AS matched
  FROM generate_series((SELECT at FROM cp_mark) + 2, pg_sync.last_sync_id(), 25) r;

-- The member filter keeps only that user's membership rows, and every other row.
SELECT c.model_id, c.action, c.group_id
  FROM pg_sync.changes((SELECT at FROM cp_mark), NULL, 100000, 'cp_u1') c
 WHERE c.model = '$membership' ORDER BY c.sync_id;
SELECT (SELECT count(*) FROM pg_sync.changes((SELECT at FROM cp_mark), NULL, 100000) WHERE model <> '$membership')
     = (SELECT count(*) FROM pg_sync.changes((SELECT at FROM cp_mark), NULL, 100000, 'nobody')) AS others_kept,
       (SELECT count(*) FROM pg_sync.changes((SELECT at FROM cp_mark), NULL, 100000, 'nobody') WHERE model = '$membership') AS nobodys;
-- A page's columns are the 3-argument form's, in both forms.
SELECT (SELECT array_agg(c ORDER BY c.sync_id) FROM pg_sync.changes((SELECT at FROM cp_mark) + 1500, '{cp_g2}', 40) c)
     = (SELECT array_agg(c ORDER BY c.sync_id) FROM pg_sync.changes((SELECT at FROM cp_mark) + 1500, '{cp_g2}', 40, NULL) c) AS same_rows;
-- A span of 0 or less is an empty page, also inside a transaction (not an error).
SELECT (SELECT count(*) FROM pg_sync.changes((SELECT at FROM cp_mark) + 1500, NULL, -1)) AS negative_span,
       (SELECT count(*) FROM pg_sync.changes((SELECT at FROM cp_mark) + 1500, NULL, 0)) AS zero_span;
-- Neither form is callable by PUBLIC.
SELECT p.oid::regprocedure AS function, has_function_privilege('public', p.oid, 'EXECUTE') AS public_execute
  FROM pg_proc p WHERE p.proname = 'changes' AND p.pronamespace = 'pg_sync'::regnamespace ORDER BY 1::text;
-- The 3-argument form calls the 4-argument one, and Postgres checks EXECUTE on both: a role
-- needs both (as registry.sql and docs/extension.md say).
CREATE ROLE cp_reader;
GRANT USAGE ON SCHEMA pg_sync TO cp_reader;
GRANT pgsync_owner TO cp_reader;
GRANT EXECUTE ON FUNCTION pg_sync.changes(bigint, text[], integer) TO cp_reader;
SET ROLE cp_reader;
SELECT err($$SELECT count(*) FROM pg_sync.changes(0, NULL, 10)$$);
RESET ROLE;
GRANT EXECUTE ON FUNCTION pg_sync.changes(bigint, text[], integer, text) TO cp_reader;
SET ROLE cp_reader;
SELECT count(*) >= 0 AS both_granted FROM pg_sync.changes(0, NULL, 10);
RESET ROLE;
REVOKE ALL ON FUNCTION pg_sync.changes(bigint, text[], integer), pg_sync.changes(bigint, text[], integer, text) FROM cp_reader;
REVOKE USAGE ON SCHEMA pg_sync FROM cp_reader;
REVOKE pgsync_owner FROM cp_reader;
DROP ROLE cp_reader;

-- commit_order.first_action_id (the sequencer sets it when a transaction's action ids are
-- contiguous): changes() then numbers those transactions' actions by id instead of ranking
-- them. The same log read both ways gives the same pages. More transactions first: a large one
-- with contiguous ids (memberships in its middle), one whose rolled-back savepoint left a hole
-- (its first_action_id stays NULL), small ones.
BEGIN;
INSERT INTO cp_t SELECT g, 'cp_g' || (g % 3) FROM generate_series(4000, 4899) g;
SELECT pg_sync.add_member('cp_u1', 'cp_g0');
UPDATE cp_t SET grp = 'cp_g1' WHERE id BETWEEN 4000 AND 4099;
SELECT pg_sync.remove_member('cp_u2', 'cp_g2');
DELETE FROM cp_t WHERE id BETWEEN 4800 AND 4899;
COMMIT;
BEGIN;
INSERT INTO cp_t SELECT g, 'cp_g1' FROM generate_series(6000, 6099) g;
SAVEPOINT s;
INSERT INTO cp_t SELECT g, 'cp_g1' FROM generate_series(6100, 6149) g;
ROLLBACK TO s;
INSERT INTO cp_t SELECT g, 'cp_g2' FROM generate_series(6200, 6299) g;
COMMIT;
INSERT INTO cp_global SELECT generate_series(5, 7);
INSERT INTO cp_t VALUES (11, 'cp_g2');
SELECT cp_seq();
-- The pages as ranked (every first_action_id NULL), kept.
CREATE TEMP TABLE cp_cases AS
SELECT s.span, g.groups, m.member
  FROM (VALUES (7), (100), (1001), (5000)) s(span),
       (VALUES (NULL::text[]), ('{cp_g1}'), ('{cp_g0,cp_g2}')) g(groups),
       (VALUES (NULL::text), ('cp_u1'), ('nobody')) m(member);
CREATE TEMP TABLE cp_ranked AS
SELECT k.*, cp_pages((SELECT at FROM cp_mark), k.span, k.groups, k.member) AS pages FROM cp_cases k;
CREATE TEMP TABLE cp_ranked_resumed AS
SELECT r, cp_pages(r, 997, '{cp_g1}', 'cp_u2') AS pages
  FROM generate_series((SELECT at FROM cp_mark) + 2, pg_sync.last_sync_id(), 25) r;
-- The sequencer's rule: the lowest id when the ids fill lowest .. highest.
UPDATE pg_sync.commit_order c SET first_action_id = s.first_id
  FROM (SELECT a.xid, CASE WHEN max(a.id) - min(a.id) = count(*) - 1 THEN min(a.id) END AS first_id
          FROM pg_sync.sync_actions a GROUP BY a.xid) s
 WHERE s.xid = c.xid AND c.first_sync_id > (SELECT at FROM cp_mark);
-- The two transactions with a rolled-back savepoint are the ones without.
SELECT action_count, first_action_id IS NOT NULL AS contiguous
  FROM pg_sync.commit_order WHERE first_sync_id > (SELECT at FROM cp_mark) ORDER BY first_sync_id;
SELECT count(*) AS cases,
       count(*) FILTER (WHERE cp_pages((SELECT at FROM cp_mark), k.span, k.groups, k.member) = k.pages) AS same_as_ranked,
       count(*) FILTER (WHERE k.pages = cp_reference(k.groups, k.member)) AS ranked_match_reference
  FROM cp_ranked k;
SELECT count(*) AS resumptions,
       count(*) FILTER (WHERE cp_pages(k.r, 997, '{cp_g1}', 'cp_u2') = k.pages) AS same_as_ranked
  FROM cp_ranked_resumed k;
-- Resumed at every sync id of the large contiguous transaction and around it (pages of 13,
-- up to 40 past the resumption): the rows and sync ids are the reference's.
SELECT count(*) AS resumptions,
       count(*) FILTER (WHERE (SELECT coalesce(array_agg(c.sync_id || ':' || c.id), '{}')
                                 FROM pg_sync.changes(r, NULL, 13) c)
                              = (SELECT coalesce(array_agg(x), '{}') FROM unnest(cp_reference(NULL, NULL)) x
                                  WHERE split_part(x, ':', 1)::bigint > r
                                    AND split_part(x, ':', 1)::bigint <= r + 13)) AS matched
  FROM generate_series((SELECT min(first_sync_id) - 2 FROM pg_sync.commit_order WHERE action_count > 1000
                                                                          AND first_action_id IS NOT NULL),
                       (SELECT max(first_sync_id + action_count) FROM pg_sync.commit_order WHERE action_count > 1000
                                                                          AND first_action_id IS NOT NULL)) r;
-- A span of 0 or less is still an empty page.
SELECT (SELECT count(*) FROM pg_sync.changes(pg_sync.last_sync_id() - 300, NULL, -1)) AS negative_span,
       (SELECT count(*) FROM pg_sync.changes(pg_sync.last_sync_id() - 300, NULL, 0)) AS zero_span;
DROP TABLE cp_cases, cp_ranked, cp_ranked_resumed;

SELECT pg_sync.unregister_table('cp_t');
SELECT pg_sync.unregister_table('cp_global');
DROP TABLE cp_t, cp_global;
DROP FUNCTION cp_seq(), cp_reference(text[], text), cp_pages(bigint, int, text[], text);
