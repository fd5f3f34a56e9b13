#!/usr/bin/env bash
# In-database cost of applying one peer batch (issue 10, catch-up apply rate), without the
# worker: on one private cluster, APPLY_BATCHES batches of APPLY_ROWS (1000) new rows each, three ways,
# alternated batch by batch (the one that goes first rotates):
#   set    pg_sync.apply_peer_batch() of APPLY_ROWS insert changes from a pinned peer (the set-based
#          apply, pg_sync.apply_remote_set; the batch JSON is read from a table, so the
#          argument's jsonb_in is not in the time);
#   local  INSERT ... SELECT of the same kind of rows into a registered table (capture trigger);
#   plain  the same INSERT ... SELECT into a table pg_sync does not know.
# APPLY_OLD=1 adds `old`: the same batches change by change (pg_sync.set_apply = off).
# APPLY_TRIG=1 adds `trig`: the same batches into a table with a user AFTER INSERT trigger
# stamping each row into an unregistered table (bench/federation.sh's probe), which the set
# path declines, so apply_peer_batch applies it change by change.
# Each statement is its own transaction; psql's \timing (round trip and commit) per batch.
# Prints min / median / max ms per batch and each kind's ratio to `local`.
# APPLY_PERF=1 runs only `set` (APPLY_PERF=KIND: that kind) and records `perf record -g` of its backend: folded stacks and a
# top-symbols summary to bench/flamegraphs/apply_set_COMMIT.{folded,txt} (needs perf and root).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
source "$here/scripts/cluster.sh"
batches=${APPLY_BATCHES:-20}
rows=${APPLY_ROWS:-1000}
kinds="set local plain"
[ -n "${APPLY_OLD:-}" ] && kinds="$kinds old"
[ -n "${APPLY_TRIG:-}" ] && kinds="$kinds trig"
if [ -n "${APPLY_PERF:-}" ]; then
  kinds=set
  [ "$APPLY_PERF" = 1 ] || kinds=$APPLY_PERF
fi

work=$(mktemp -d /tmp/pg_sync_apply_batch.XXXXXX)
chmod 755 "$work"
port=$(free_port)
cleanup() { cluster_stop "$work/pg" immediate; rm -rf "$work"; }
trap cleanup EXIT
trap "exit 143" INT TERM
cluster_init "$work/pg" "$port" "pg_sync.node_id = 'b'" "fsync = off"
cluster_start "$work/pg"
q() { "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d postgres "$@"; }

q -v nb="$batches" -v nr="$rows" >/dev/null <<'SQL'
CREATE EXTENSION pg_sync;
CREATE TABLE items (id text PRIMARY KEY, a text, b int, grp text);
CREATE TABLE items_old (LIKE items INCLUDING ALL);
CREATE TABLE items_local (LIKE items INCLUDING ALL);
CREATE TABLE items_plain (LIKE items INCLUDING ALL);
CREATE TABLE items_trig (LIKE items INCLUDING ALL);
CREATE TABLE trig_stamps (id text PRIMARY KEY, at timestamptz);
CREATE FUNCTION stamp() RETURNS trigger LANGUAGE plpgsql SET search_path = public AS $$
BEGIN INSERT INTO trig_stamps VALUES (NEW.id, clock_timestamp()); RETURN NULL; END $$;
CREATE TRIGGER stamp AFTER INSERT ON items_trig FOR EACH ROW EXECUTE FUNCTION stamp();
SELECT pg_sync.register_table('items', group_column => 'grp');
SELECT pg_sync.register_table('items_old', group_column => 'grp');
SELECT pg_sync.register_table('items_local', group_column => 'grp');
SELECT pg_sync.register_table('items_trig', group_column => 'grp');
SELECT pg_sync.add_peer('pa', 'ws://127.0.0.1:1', 'a-secret-of-16-chars');
SELECT pg_sync.pin_peer('pa', 'pa');
SELECT pg_sync.add_peer('po', 'ws://127.0.0.1:2', 'b-secret-of-16-chars');
SELECT pg_sync.pin_peer('po', 'po');
SELECT pg_sync.add_peer('pt', 'ws://127.0.0.1:3', 'c-secret-of-16-chars');
SELECT pg_sync.pin_peer('pt', 'pt');
-- The batches as the sender's log would carry them: to_jsonb of sync_actions rows.
CREATE TABLE batches AS
  SELECT n, m, jsonb_agg(jsonb_build_object(
           'sync_id', (n - 1) * :nr + g, 'model', m, 'model_id', 'k' || ((n - 1) * :nr + g),
           'action', 'I', 'origin', o,
           'version', lpad(to_hex(pg_sync.hlc_now() + g), 16, '0') || '@' || o, 'versions', NULL,
           'group_id', 'g' || (g % 50),
           'data', jsonb_build_object('id', 'k' || ((n - 1) * :nr + g), 'a', md5(g::text), 'b', g,
                                      'grp', 'g' || (g % 50))) ORDER BY g) AS b
    FROM generate_series(1, :nb) n, generate_series(1, :nr) g,
         (VALUES ('items', 'pa'), ('items_old', 'po'), ('items_trig', 'pt')) AS x(m, o)
   GROUP BY n, m;
SQL

script=$work/run.sql
{
  echo '\timing on'
  read -ra ks <<<"$kinds"
  for n in $(seq 1 "$batches"); do
    r=$(((n - 1) % ${#ks[@]}))
    order="${ks[*]:r} ${ks[*]:0:r}"
    lo=$(((n - 1) * rows + 1)) hi=$((n * rows))
    for k in $order; do
      echo "\\echo kind $k"
      case $k in
        set) echo "SELECT pg_sync.apply_peer_batch('pa', 'E', $((lo - 1)), $hi, b) IS NOT NULL FROM batches WHERE n = $n AND m = 'items';" ;;
        old)
          echo "\\echo kind skip"
          echo "SET pg_sync.set_apply = off;"
          echo "\\echo kind old"
          echo "SELECT pg_sync.apply_peer_batch('po', 'E', $((lo - 1)), $hi, b) IS NOT NULL FROM batches WHERE n = $n AND m = 'items_old';"
          echo "\\echo kind skip"
          echo "RESET pg_sync.set_apply;"
          ;;
        trig) echo "SELECT pg_sync.apply_peer_batch('pt', 'E', $((lo - 1)), $hi, b) IS NOT NULL FROM batches WHERE n = $n AND m = 'items_trig';" ;;
        local) echo "INSERT INTO items_local SELECT 'k' || g, md5(g::text), g, 'g' || (g % 50) FROM generate_series($lo, $hi) g;" ;;
        plain) echo "INSERT INTO items_plain SELECT 'k' || g, md5(g::text), g, 'g' || (g % 50) FROM generate_series($lo, $hi) g;" ;;
      esac
    done
  done
} >"$script"

if [ -n "${APPLY_PERF:-}" ]; then
  # The script's own backend, from its first statement (it sleeps until perf has attached).
  { echo "SELECT pg_sleep(2);"; cat "$script"; } >"$script.perf"
  q -At -f "$script.perf" >"$work/out.txt" 2>&1 &
  client=$!
  sleep 1
  pid=$(q -tAc "SELECT pid FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(2);'")
  perf record -q -F 999 --call-graph dwarf,32768 -o "$work/perf.data" -p "$pid" 2>/dev/null &
  perf_pid=$!
  wait "$client"
  kill -INT "$perf_pid"
  wait "$perf_pid" || true
  out="$here/bench/flamegraphs/apply_${kinds}_$(git -C "$here" rev-parse --short HEAD)"
  # Folded stacks (flamegraph.pl / inferno input) and a top-symbols summary, as
  # bench/capture_profile.sh writes them.
  perf script -i "$work/perf.data" 2>/dev/null | python3 "$here/bench/perf_fold.py" "$out" 60 30
  echo "wrote $out.folded and $out.txt" >&2
else
  q -At -f "$script" >"$work/out.txt" 2>&1
fi

python3 - "$work/out.txt" <<'PY'
import sys, statistics, os
times, kind = {}, None
for line in open(sys.argv[1]):
    if line.startswith("kind "):
        kind = line.split()[1]
    elif line.startswith("Time: ") and kind != "skip":
        times.setdefault(kind, []).append(float(line.split()[1]))
local = statistics.median(times["local"]) if "local" in times else None
print("kind batches min_ms median_ms max_ms median/local  (load: %s)" % " ".join(open("/proc/loadavg").read().split()[:3]))
for k, v in sorted(times.items()):
    m = statistics.median(v)
    print("%s %d %.1f %.1f %.1f %s" % (k, len(v), min(v), m, max(v), "%.2f" % (m / local) if local else "-"))
PY
# A set-based apply that failed into the per-change path logs a 'quarantined' event (count 0):
# such a run measured the fallback, not the set path.
q -At -c "SELECT 'rows applied: ' || (SELECT count(*) FROM items) || ' set, ' || (SELECT count(*) FROM items_old)
                 || ' old, ' || (SELECT count(*) FROM items_trig) || ' trig (' || (SELECT count(*) FROM trig_stamps)
                 || ' stamped); fallbacks: ' || (SELECT count(*) FROM pg_sync.peer_events WHERE event = 'quarantined')"
