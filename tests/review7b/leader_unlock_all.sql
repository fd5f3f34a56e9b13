-- The federation leader lock is a session lock of the user lock method: pg_advisory_unlock_all()
-- and DISCARD ALL (a pool's reset query) release it silently in the holding session.
CREATE EXTENSION IF NOT EXISTS pg_sync;
SELECT pg_sync.try_federation_lock();
SELECT locktype, classid, objid, mode FROM pg_locks WHERE locktype = 'userlock' AND pid = pg_backend_pid();
SELECT pg_advisory_unlock_all();
SELECT count(*) AS still_held FROM pg_locks WHERE locktype = 'userlock' AND pid = pg_backend_pid();
SELECT pg_sync.try_federation_lock();
DISCARD ALL;
SELECT count(*) AS still_held_after_discard FROM pg_locks WHERE locktype = 'userlock' AND pid = pg_backend_pid();
