-- Retention holds for peers: compaction keeps what a peer this node sends to has not
-- acknowledged; past the cap (release_lagging_peers) the peer stops holding, gets a
-- resync_required event and PS003 from peer_changes until it re-bootstraps and acks past it.
CREATE TABLE hold_t (id text PRIMARY KEY, v text);
SELECT pg_sync.register_table('hold_t', federation => 'both');
SELECT pg_sync.add_peer('h1', 'ws://127.0.0.1:1', 'a-secret-of-16-chars');
SELECT pg_sync.add_peer('h2', 'ws://127.0.0.1:2', 'a-secret-of-16-chars', direction => 'pull');
SELECT pg_sync.pin_peer('h1', 'h1'), pg_sync.pin_peer('h2', 'h2');
-- Ten source transactions, sequenced as the worker's sequencer does.
CREATE FUNCTION hold_seq() RETURNS void LANGUAGE sql AS $$
  INSERT INTO pg_sync.commit_order (xid, first_sync_id, action_count, commit_lsn, committed_at)
  SELECT xid, pg_sync.last_sync_id() + 1
              + coalesce(sum(count(*)) OVER (ORDER BY min(id) ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0),
         count(*), '0/0', now()
    FROM pg_sync.sync_actions WHERE xid NOT IN (SELECT xid FROM pg_sync.commit_order) GROUP BY xid $$;
SELECT hold_seq();  -- what earlier tests left unsequenced
CREATE TABLE hstart AS SELECT pg_sync.last_sync_id() AS s;
DO $$ BEGIN FOR i IN 1..10 LOOP INSERT INTO hold_t VALUES ('k' || i, 'v'); COMMIT; END LOOP; END $$;
SELECT hold_seq();
SELECT pg_sync.last_sync_id() - (SELECT s FROM hstart) AS logged;
-- No acknowledgement yet: nothing is held.
SELECT pg_sync.peer_retention_hold() AS hold;
-- h1 subscribes after 2 (relative), then acks 4: the hold is its ack.
SELECT pg_sync.peer_ack('h1', (SELECT s FROM hstart) + 2, at_subscribe => true) - (SELECT s FROM hstart) AS acked;
SELECT pg_sync.peer_ack('h1', (SELECT s FROM hstart) + 4) - (SELECT s FROM hstart) AS acked;
-- An older ack does not move it back; a subscribe does (the receiver's cursor is what it holds).
SELECT pg_sync.peer_ack('h1', (SELECT s FROM hstart) + 3) - (SELECT s FROM hstart) AS acked;
SELECT pg_sync.peer_retention_hold() - (SELECT s FROM hstart) AS hold;
SELECT regexp_replace(err($$SELECT pg_sync.peer_ack('h1', pg_sync.last_sync_id() + 1)$$), '\y\d+\y', 'N', 'g') AS err;
SELECT err($$SELECT pg_sync.peer_ack('nope', 1)$$);
-- A pull-only peer (this node does not send to it) holds nothing.
SELECT pg_sync.peer_ack('h2', (SELECT s FROM hstart)) - (SELECT s FROM hstart) AS h2_acked;
SELECT pg_sync.peer_retention_hold() - (SELECT s FROM hstart) AS hold;
-- Compaction asked to go to the end stops at the hold: h1 can still read after its ack.
SELECT pg_sync.compact(pg_sync.last_sync_id()) > 0 AS compacted;
SELECT pg_sync.retention_horizon() - (SELECT s FROM hstart) AS horizon;
SELECT count(*) AS h1_gets FROM pg_sync.peer_changes('h1', (SELECT s FROM hstart) + 4, 100);
SELECT pg_sync.compact_to_size(0) AS compacted, pg_sync.retention_horizon() - (SELECT s FROM hstart) AS horizon;
-- A disabled peer still holds (disabling is a pause).
SELECT pg_sync.set_peer('h1', enabled => false);
SELECT pg_sync.peer_retention_hold() - (SELECT s FROM hstart) AS hold;
SELECT pg_sync.set_peer('h1', enabled => true);
-- The cap: 6 behind the end, a cap of 6 keeps it, a cap of 5 releases it (once).
SELECT pg_sync.release_lagging_peers(6) AS released;
SELECT pg_sync.release_lagging_peers(5) AS released;
SELECT pg_sync.release_lagging_peers(5) AS released;
SELECT err($$SELECT pg_sync.release_lagging_peers(-1)$$);
SELECT peer, state, out_hold - (SELECT s FROM hstart) AS out_hold, resync_required FROM pg_sync.peer_status ORDER BY peer;
SELECT event, detail - 'acked' AS detail, (detail ->> 'acked')::bigint - (SELECT s FROM hstart) AS acked
  FROM pg_sync.peer_events WHERE peer = 'h1' AND event = 'resync_required';
-- Released, h1 no longer holds: compaction goes to the end, and h1 is told to resync even from
-- a cursor whose log would still be there.
SELECT pg_sync.peer_retention_hold() AS hold;
SELECT regexp_replace(err($$SELECT * FROM pg_sync.peer_changes('h1', pg_sync.last_sync_id() - 1, 10)$$), '\y\d+\y', 'N', 'g') AS err;
SELECT pg_sync.compact(pg_sync.last_sync_id()) AS compacted;
SELECT pg_sync.retention_horizon() = pg_sync.last_sync_id() AS at_end;
-- After a re-bootstrap h1 subscribes at the log's end (at or past where it was released): the
-- release ends, it holds again and reads on.
INSERT INTO hold_t VALUES ('k11', 'v');
SELECT hold_seq();
SELECT pg_sync.peer_ack('h1', pg_sync.last_sync_id() - 1, at_subscribe => true) = pg_sync.last_sync_id() - 1 AS resumed;
SELECT resync_required FROM pg_sync.peer_status WHERE peer = 'h1';
SELECT event, detail ->> 'direction' AS direction FROM pg_sync.peer_events WHERE peer = 'h1' AND event = 'hold_resumed';
SELECT count(*) AS h1_gets FROM pg_sync.peer_changes('h1', pg_sync.last_sync_id() - 1, 100);
SELECT pg_sync.peer_retention_hold() = pg_sync.last_sync_id() - 1 AS holds_again;
-- test_peer asks the worker (it records a request) and shows the last result; the worker's
-- record_peer_probe fills it in, with the models this node takes and whether the peer sends them.
SELECT peer_name, checked_at IS NULL AS never_checked, requested_at IS NOT NULL AS requested FROM pg_sync.test_peer('h1');
SELECT pg_sync.record_peer_probe('h1', '{"reachable": true, "auth_ok": true, "node_id": "h1", "proto": 1,
  "extension_version": "0.1.0", "worker_version": "0.1.0", "rtt_ms": 1.5, "clock_offset_ms": -2,
  "models_sent": ["hold_t", "other"]}');
-- The result answers the request (fresh); this call places the next request.
SELECT peer_name, checked_at >= requested_at AS fresh, reachable, auth_ok, node_id, proto, rtt_ms, clock_offset_ms,
       models_sent, 'hold_t' = ANY (models_taken) AS takes_hold_t, models_compatible, error FROM pg_sync.test_peer('h1');
SELECT checked_at < requested_at AS pending FROM pg_sync.peer_probes WHERE peer = 'h1';
-- While a request is pending, calling again does not move it.
SELECT requested_at = (SELECT requested_at FROM pg_sync.peer_probes WHERE peer = 'h1') AS same_request
  FROM pg_sync.test_peer('h1');
SELECT pg_sync.set_peer('h1', models => '{hold_t}');
SELECT pg_sync.record_peer_probe('h1', '{"reachable": true, "auth_ok": true, "models_sent": ["hold_t"]}');
SELECT models_taken, models_compatible FROM pg_sync.test_peer('h1');
SELECT pg_sync.record_peer_probe('h1', '{"reachable": true, "auth_ok": true, "models_sent": []}');
SELECT models_taken, models_compatible FROM pg_sync.test_peer('h1');
SELECT pg_sync.record_peer_probe('h1', '{"reachable": false, "error": "connect: refused"}');
SELECT reachable, auth_ok, models_compatible, error FROM pg_sync.test_peer('h1');
-- checked_at is when the worker's handshake read the configuration it tested: one read before
-- the pending request replaces an older result but does not answer the request; one older than
-- the recorded result changes nothing (a link's handshake may finish after a newer probe).
SELECT pg_sync.record_peer_probe('h1', jsonb_build_object('reachable', true, 'auth_ok', true,
         'checked_at', checked_at + (requested_at - checked_at) / 2))
  FROM pg_sync.peer_probes WHERE peer = 'h1';
SELECT reachable, auth_ok, error, checked_at < requested_at AS pending FROM pg_sync.peer_probes WHERE peer = 'h1';
SELECT pg_sync.record_peer_probe('h1', jsonb_build_object('reachable', false, 'error', 'late',
         'checked_at', checked_at - interval '1 second'))
  FROM pg_sync.peer_probes WHERE peer = 'h1';
SELECT reachable, auth_ok, error, checked_at < requested_at AS pending FROM pg_sync.peer_probes WHERE peer = 'h1';
SELECT pg_sync.record_peer_probe('h1', '{"reachable": true, "auth_ok": false, "error": "refused by the peer (4501)"}');
SELECT reachable, auth_ok, error, checked_at >= requested_at AS answered FROM pg_sync.peer_probes WHERE peer = 'h1';
-- A request is answered only by a handshake that saw it: requested_at is the caller's
-- transaction start, but a handshake sees the request (and a configuration change made with
-- it, e.g. set_peer) only once it commits. A result recorded after that start, before the
-- request, does not answer it:
BEGIN;
SELECT pg_sync.record_peer_probe('h1', jsonb_build_object('reachable', false, 'error', 'read after the start',
         'checked_at', clock_timestamp(), 'requested_at', requested_at))
  FROM pg_sync.peer_probes WHERE peer = 'h1';
SELECT error, checked_at >= requested_at AS answered FROM pg_sync.test_peer('h1');
COMMIT;
SELECT error, checked_at >= requested_at AS answered FROM pg_sync.peer_probes WHERE peer = 'h1';
-- One that saw the request (it passes the requested_at it read with the configuration)
-- answers it.
SELECT pg_sync.record_peer_probe('h1', jsonb_build_object('reachable', true, 'auth_ok', true, 'error', 'saw it',
         'checked_at', clock_timestamp(), 'requested_at', requested_at))
  FROM pg_sync.peer_probes WHERE peer = 'h1';
SELECT error, checked_at >= requested_at AS answered FROM pg_sync.peer_probes WHERE peer = 'h1';
-- One that read before the request committed (it saw the previous request) does not answer it,
-- however late its checked_at.
CREATE TEMP TABLE seen AS SELECT requested_at FROM pg_sync.peer_probes WHERE peer = 'h1';
BEGIN;
SELECT error, checked_at >= requested_at AS answered FROM pg_sync.test_peer('h1');
SELECT pg_sync.record_peer_probe('h1', jsonb_build_object('reachable', false, 'error', 'read before the commit',
         'checked_at', clock_timestamp(), 'requested_at', (SELECT requested_at FROM seen)));
COMMIT;
SELECT error, checked_at >= requested_at AS answered FROM pg_sync.peer_probes WHERE peer = 'h1';
SELECT pg_sync.record_peer_probe('h1', jsonb_build_object('reachable', true, 'auth_ok', true, 'error', 'saw it',
         'checked_at', clock_timestamp(), 'requested_at', requested_at))
  FROM pg_sync.peer_probes WHERE peer = 'h1';
SELECT error, checked_at >= requested_at AS answered FROM pg_sync.peer_probes WHERE peer = 'h1';
DROP TABLE seen;
SELECT err($$SELECT * FROM pg_sync.test_peer('nope')$$);
-- resync_peer: the cursor is marked for a snapshot join (any join in progress is dropped); a
-- push-only peer is refused. The join functions check their peer and position.
SELECT pg_sync.resync_peer('h1');
SELECT state, last_sync_id FROM pg_sync.peer_cursors WHERE peer_node_id = 'h1';
SELECT pg_sync.set_peer('h1', direction => 'push');
SELECT err($$SELECT pg_sync.resync_peer('h1')$$);
SELECT pg_sync.set_peer('h1', direction => 'both');
SELECT err($$SELECT pg_sync.apply_peer_snapshot('h1', 5, '', '', '[]')$$);
SELECT err($$SELECT pg_sync.finish_peer_join('h1', 5)$$);
SELECT err($$SELECT pg_sync.begin_peer_join('h1', 'e', -1, '[]')$$);
-- A cursor list that is not what peer_join_start answers is refused.
SELECT err($$SELECT pg_sync.begin_peer_join('h1', 'e', 5, '[{"node_id": "h2", "epoch": "e2", "last_sync_id": -7}]')$$);
SELECT err($$SELECT pg_sync.begin_peer_join('h1', 'e', 5, '[{"node_id": 1, "epoch": "e2", "last_sync_id": 7}]')$$);
SELECT err($$SELECT pg_sync.begin_peer_join('h1', 'e', 5, '["h2"]')$$);
-- The peer's cursor for h2 does not become this node's (review rev1 #02): after the join,
-- there is no cursor for h2 (it was none before), so nothing of h2's log is skipped.
SELECT pg_sync.begin_peer_join('h1', 'e', 5, '[{"node_id": "h2", "epoch": "e2", "last_sync_id": 7}]');
SELECT pg_sync.begin_peer_join('h1', 'e', 5, '[]') ->> 'resumed' AS resumed;
SELECT pg_sync.apply_peer_snapshot('h1', 5, 'x', 'y', '[]') ->> 'status' AS wrong_position;
SELECT pg_sync.apply_peer_snapshot('h1', 5, '', '', '[]') ->> 'status' AS empty_page;
SELECT pg_sync.finish_peer_join('h1', 5);
SELECT peer_node_id, peer_epoch, last_sync_id, state FROM pg_sync.peer_cursors ORDER BY 1;
SELECT count(*) AS joins FROM pg_sync.peer_joins;
SELECT event, detail FROM pg_sync.peer_events WHERE peer = 'h1' AND event IN ('resync', 'bootstrapping', 'joined') ORDER BY id;
-- The sender's join start holds the log at W for the peer, and its snapshot lists the rows.
SELECT (pg_sync.peer_join_start('h1') ->> 'w')::bigint = pg_sync.last_sync_id() AS w_is_end;
SELECT pg_sync.peer_retention_hold() = pg_sync.last_sync_id() AS holds_w;
SELECT model, model_id, jsonb_array_length(changes) AS changes, changes -> 0 ->> 'action' AS first
  FROM pg_sync.peer_snapshot('h1', '', '', 3);
SELECT count(*) AS rest FROM pg_sync.peer_snapshot('h1', 'hold_t', 'k3');
DELETE FROM hold_t WHERE id = 'k1';
SELECT model_id, jsonb_path_query_array(changes, '$[*].action') AS actions
  FROM pg_sync.peer_snapshot('h1', '', '', 1);
-- The optional conflict log: off by default; on, a remote column value that loses to a newer
-- one from another node is recorded (versions, no values), once per lost column.
CREATE TABLE cbase AS SELECT pg_sync.hlc_now() AS hlc;
CREATE FUNCTION cv(k int, node text) RETURNS text LANGUAGE sql AS
  $$ SELECT lpad(to_hex((SELECT hlc FROM cbase) + k), 16, '0') || '@' || node $$;
CREATE FUNCTION cch(action text, ver text, data jsonb) RETURNS jsonb LANGUAGE sql AS
  $$ SELECT jsonb_build_object('model', 'hold_t', 'model_id', 'c1', 'action', action, 'version', ver,
                               'origin', split_part(ver, '@', 2), 'data', data) $$;
SELECT pg_sync.apply_remote(cch('I', cv(10, 'p1'), '{"id": "c1", "v": "a"}'));
SELECT pg_sync.apply_remote(cch('U', cv(30, 'p1'), '{"v": "newer"}'));
SELECT pg_sync.apply_remote(cch('U', cv(20, 'p2'), '{"v": "lost, not logged"}'));
SELECT count(*) AS logged_while_off FROM pg_sync.conflicts;
SET pg_sync.log_conflicts = on;
SELECT pg_sync.apply_remote(cch('U', cv(21, 'p2'), '{"v": "concurrent"}'));
-- Not conflicts: an older write of the same node (a late relay), an echo, an equal value.
SELECT pg_sync.apply_remote(cch('U', cv(25, 'p1'), '{"v": "superseded"}'));
SELECT pg_sync.apply_remote(cch('U', cv(30, 'p1'), '{"v": "newer"}'));
SELECT pg_sync.apply_remote(cch('U', cv(22, 'p3'), '{"v": "newer"}'));
-- A newer write wins: not a conflict here (the loser is recorded where it loses).
SELECT pg_sync.apply_remote(cch('U', cv(40, 'p2'), '{"v": "p2 wins"}'));
-- An update that loses to a delete from another node.
SELECT pg_sync.apply_remote(cch('D', cv(50, 'p1'), '{"id": "c1"}'));
SELECT pg_sync.apply_remote(cch('U', cv(45, 'p3'), '{"v": "too late"}'));
RESET pg_sync.log_conflicts;
SELECT model, model_id, column_name,
       (SELECT k FROM generate_series(0, 60) k, unnest(ARRAY['p1', 'p2', 'p3']) n WHERE cv(k, n) = kept_version) AS kept,
       (SELECT k FROM generate_series(0, 60) k, unnest(ARRAY['p1', 'p2', 'p3']) n WHERE cv(k, n) = lost_version) AS lost,
       origin
  FROM pg_sync.conflicts ORDER BY id;
DROP FUNCTION cch(text, text, jsonb), cv(int, text);
DROP TABLE cbase;
-- A snapshot page and announce read application tables as the table's owner (in a
-- security-restricted operation), never as the worker or administrator calling them: a cast to
-- json that the table's owner wrote runs with the owner's rights only (review rev1 #01).
SELECT pg_sync.add_peer('fedp', 'ws://127.0.0.1:3', 'a-secret-of-16-chars', direction => 'push');
SELECT pg_sync.pin_peer('fedp', 'fedp');
CREATE ROLE fed_mig;
GRANT CREATE ON SCHEMA public TO fed_mig;
GRANT EXECUTE ON FUNCTION pg_sync.register_table(regclass, text, text, text[], text) TO fed_mig;
SET ROLE fed_mig;
CREATE TYPE fed_mood AS ENUM ('ok');
CREATE TABLE fed_loot (who text, what text);
CREATE FUNCTION fed_mood_json(fed_mood) RETURNS json LANGUAGE plpgsql AS $$
BEGIN
  BEGIN
    INSERT INTO public.fed_loot SELECT current_user, 'secrets: ' || count(*) FROM pg_sync.peer_secrets;
  EXCEPTION WHEN OTHERS THEN
    INSERT INTO public.fed_loot VALUES (current_user, SQLSTATE);
  END;
  RETURN to_json($1::text);
END $$;
CREATE CAST (fed_mood AS json) WITH FUNCTION fed_mood_json(fed_mood);
CREATE TABLE fed_t (id text PRIMARY KEY, m fed_mood);
SELECT pg_sync.register_table('fed_t', federation => 'both');
INSERT INTO fed_t VALUES ('a', 'ok');
CREATE TABLE fed_t2 (id text PRIMARY KEY, m fed_mood);
INSERT INTO fed_t2 VALUES ('z', 'ok');
SELECT pg_sync.register_table('fed_t2', federation => 'both');
TRUNCATE fed_loot;
RESET ROLE;
-- What the worker does for a joining peer, and what add_peer's hint tells an administrator.
SELECT model_id, changes -> 0 -> 'data' AS data FROM pg_sync.peer_snapshot('fedp') WHERE model LIKE 'fed_t%';
SELECT pg_sync.announce('fed_t2');
SELECT model_id, changes -> 0 -> 'data' AS data FROM pg_sync.peer_snapshot('fedp') WHERE model LIKE 'fed_t%';
SELECT who, what, count(*) FROM fed_loot GROUP BY 1, 2 ORDER BY 1, 2;
-- A worker role that is no superuser, with the grants docs/extension.md lists ("What the
-- worker's role needs", the federation part), runs the sender's and the receiver's join and
-- the hold functions (rev1 #05); the rest of this file's join runs as it.
CREATE ROLE fed_wrk;
GRANT pgsync_owner TO fed_wrk;
GRANT EXECUTE ON FUNCTION pg_sync.apply_remote(jsonb), pg_sync.last_sync_id(), pg_sync.retention_horizon()
      TO fed_wrk;
GRANT EXECUTE ON FUNCTION pg_sync.apply_peer_batch(text, text, bigint, bigint, jsonb),
      pg_sync.apply_remote_set(jsonb),
      pg_sync.peer_changes(text, bigint, integer), pg_sync.batch_end(bigint, integer),
      pg_sync.pin_peer(text, text), pg_sync.epoch(), pg_sync.transient_sqlstate(text),
      pg_sync.retry_quarantined(text), pg_sync.peer_or_raise(text),
      pg_sync.quarantine_change(text, bigint, jsonb, text, text),
      pg_sync.peer_ack(text, bigint, boolean), pg_sync.release_lagging_peers(bigint),
      pg_sync.peer_join_start(text, bigint), pg_sync.peer_snapshot(text, text, text, integer),
      pg_sync.owner_rows(text, text[], text, integer, boolean),
      pg_sync.begin_peer_join(text, text, bigint, jsonb),
      pg_sync.apply_peer_snapshot(text, bigint, text, text, jsonb),
      pg_sync.finish_peer_join(text, bigint), pg_sync.resync_peer(text),
      pg_sync.record_peer_probe(text, jsonb), pg_sync.try_federation_lock() TO fed_wrk;
SET ROLE fed_wrk;
SELECT pg_sync.try_federation_lock() AS leading;
SELECT model_id FROM pg_sync.peer_snapshot('fedp') WHERE model LIKE 'fed_t%';
SELECT count(*) AS released FROM pg_sync.release_lagging_peers(1000000000);
-- A join retried at the same W (peer_join_start with resume_w) logs join_started for the new
-- join and its first resume only, not for every retry (rev1 #04).
SELECT (pg_sync.peer_join_start('fedp') ->> 'w')::bigint AS fed_w \gset
SELECT pg_sync.peer_join_start('fedp', :fed_w) ->> 'resumed' AS resumed;
SELECT pg_sync.peer_join_start('fedp', :fed_w) ->> 'resumed' AS again, pg_sync.peer_join_start('fedp', :fed_w) ->> 'resumed' AS and_again;
SELECT detail ->> 'resumed' AS resumed, count(*) AS join_started FROM pg_sync.peer_events WHERE peer = 'fedp' AND event = 'join_started' GROUP BY 1 ORDER BY 1;
-- The lag cap spares a peer whose join is in progress (rev1 #06): it acks nothing until the
-- join ends. Its subscribe after W ends that; from then on the cap applies again.
RESET ROLE;
INSERT INTO fed_t SELECT 'j' || i, 'ok' FROM generate_series(1, 3) i;
SELECT hold_seq();
SET ROLE fed_wrk;
SELECT count(*) AS fedp_released FROM pg_sync.release_lagging_peers(1) r WHERE r = 'fedp';
SELECT pg_sync.peer_ack('fedp', :fed_w, at_subscribe => true) = :fed_w AS subscribed_after_w;
SELECT count(*) AS fedp_released FROM pg_sync.release_lagging_peers(1) r WHERE r = 'fedp';
RESET ROLE;
-- One bad row does not stop a join (rev1 #04): a page whose rows this node refuses (a CHECK
-- only this node has, a version far beyond the clock skew) is applied row by row; the bad rows
-- are parked in peer_quarantine (negative keys: snapshot rows have no sync id), the join moves
-- past the page, and retry_quarantined applies them once they can be.
CREATE TABLE fed_chk (id text PRIMARY KEY, v text CHECK (v <> 'bad'));
SELECT pg_sync.register_table('fed_chk', federation => 'both');
SELECT pg_sync.add_peer('fedq', 'ws://127.0.0.1:4', 'a-secret-of-16-chars', direction => 'pull');
SELECT pg_sync.pin_peer('fedq', 'fedq');
SET ROLE fed_wrk;
SELECT pg_sync.begin_peer_join('fedq', 'eq', 0, '[]') ->> 'resumed' AS resumed;
SELECT pg_sync.apply_peer_snapshot('fedq', 0, '', '', $$[
  {"model": "fed_chk", "model_id": "a", "changes": [{"model": "fed_chk", "model_id": "a", "action": "I", "data": {"id": "a", "v": "ok"}, "version": "0193a8f2c4d10003@fedq", "origin": "fedq"}]},
  {"model": "fed_chk", "model_id": "b", "changes": [{"model": "fed_chk", "model_id": "b", "action": "I", "data": {"id": "b", "v": "bad"}, "version": "0193a8f2c4d10004@fedq", "origin": "fedq"}]},
  {"model": "fed_chk", "model_id": "c", "changes": [{"model": "fed_chk", "model_id": "c", "action": "I", "data": {"id": "c", "v": "ok"}, "version": "7fffa8f2c4d10003@fedq", "origin": "fedq"}]},
  {"model": "fed_chk", "model_id": "d", "changes": [{"model": "fed_chk", "model_id": "d", "action": "I", "data": {"id": "d", "v": "ok"}, "version": "0193a8f2c4d10005@fedq", "origin": "fedq"}]}
]$$) - 'after_model' AS applied;
SELECT after_model, after_model_id, rows, pages FROM pg_sync.peer_joins WHERE peer_node_id = 'fedq';
SELECT sync_id < 0 AS snapshot_key, sqlstate, regexp_replace(message, '\d{6,}', 'N', 'g') AS message, change -> 0 ->> 'model_id' AS model_id
  FROM pg_sync.peer_quarantine WHERE peer_node_id = 'fedq' ORDER BY model_id;
SELECT event, detail - 'join_w' AS detail FROM pg_sync.peer_events WHERE peer = 'fedq' AND event = 'quarantined';
RESET ROLE;
SELECT id, v FROM fed_chk ORDER BY id;
ALTER TABLE fed_chk DROP CONSTRAINT fed_chk_v_check;
SELECT pg_sync.retry_quarantined('fedq') AS remaining;
SELECT id, v FROM fed_chk ORDER BY id;
SELECT pg_sync.finish_peer_join('fedq', 0);
DELETE FROM pg_sync.peer_quarantine WHERE peer_node_id = 'fedq';
SELECT pg_sync.unregister_table('fed_chk'), pg_sync.remove_peer('fedq');
DROP TABLE fed_chk;
DROP OWNED BY fed_wrk;
DROP ROLE fed_wrk;
-- A live state whose table row is gone is sent without an insert, not as a key-only live row
-- (rev1 #08); a row that predates its registration (registered after the peer was added) and
-- was then updated goes as a U of its updated columns, never as an I with version '' (rev1
-- #03), with a WARNING that names the model and the announce hint.
CREATE TABLE fed_u (id int PRIMARY KEY, v text NOT NULL);
SELECT pg_sync.register_table('fed_u', federation => 'both');
INSERT INTO fed_u VALUES (1, 'one'), (2, 'two');
SELECT pg_sync.unregister_table('fed_u');
DELETE FROM fed_u WHERE id = 2;
INSERT INTO fed_u VALUES (3, 'three');
SELECT pg_sync.register_table('fed_u', federation => 'both');
UPDATE fed_u SET v = 'drei' WHERE id = 3;
SELECT model_id, created = '' AS unrecorded, deleted IS NULL AS live FROM pg_sync.row_state WHERE model = 'fed_u' ORDER BY 1;
SELECT model_id, jsonb_path_query_array(changes, '$[*].action') AS actions,
       jsonb_path_query_array(changes, '$[*].data') AS data,
       jsonb_path_query_array(changes, '$[*].version ? (@ == "")') AS empty_versions
  FROM pg_sync.peer_snapshot('fedp') WHERE model = 'fed_u' ORDER BY 1;
SELECT pg_sync.unregister_table('fed_u');
DROP TABLE fed_u;
SELECT pg_sync.unregister_table('fed_t'), pg_sync.unregister_table('fed_t2'), pg_sync.remove_peer('fedp');
DROP TABLE fed_t, fed_t2, fed_loot;
DROP CAST (fed_mood AS json);
DROP FUNCTION fed_mood_json(fed_mood);
DROP TYPE fed_mood;
REVOKE CREATE ON SCHEMA public FROM fed_mig;
REVOKE EXECUTE ON FUNCTION pg_sync.register_table(regclass, text, text, text[], text) FROM fed_mig;
DROP ROLE fed_mig;
-- pg_dump keeps federation's data tables, the conflict log and the snapshot quarantine keys'
-- sequence included (rev1 #12).
SELECT c::regclass::text AS dumped FROM pg_extension e, unnest(e.extconfig) c
 WHERE e.extname = 'pg_sync' AND c::regclass::text ~ '^pg_sync\.(conflicts|snapshot_quarantine)' ORDER BY 1;
-- Removing a peer drops its hold.
SELECT pg_sync.remove_peer('h1'), pg_sync.remove_peer('h2');
SELECT count(*) AS holds, (SELECT count(*) FROM pg_sync.peer_probes) AS probes FROM pg_sync.peer_holds;
SELECT pg_sync.unregister_table('hold_t');
DROP TABLE hold_t, hstart;
DROP FUNCTION hold_seq();
