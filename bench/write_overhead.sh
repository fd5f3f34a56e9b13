#!/usr/bin/env bash
# `make bench`: write overhead of capture and apply_remote throughput, each against its baseline
# in the same run, on a private cluster. Prints a markdown report and appends it to
# bench/RESULTS.md. Knobs: BENCH_SECONDS (per pgbench run, default 10), BENCH_CLIENTS (4).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
source "$here/scripts/cluster.sh"
secs=${BENCH_SECONDS:-10}
clients=${BENCH_CLIENTS:-4}

work=$(mktemp -d /tmp/pg_sync_bench.XXXXXX)
chmod 755 "$work"
port=$(free_port)
cleanup() { cluster_stop "$work/pg" immediate; rm -rf "$work"; }
trap cleanup EXIT
cluster_init "$work/pg" "$port" "pg_sync.node_id = 'bench'" "shared_buffers = '512MB'" "max_wal_size = '4GB'" \
  "checkpoint_timeout = '30min'"
cluster_start "$work/pg"
psql_b() { "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres "$@"; }
psql_b -d postgres -c "CREATE DATABASE bench" -c "CREATE DATABASE peer"
psql_b -d bench <<'SQL'
CREATE EXTENSION pg_sync;
CREATE TABLE t_plain   (id bigserial PRIMARY KEY, a text, b int, g text);
CREATE TABLE t_synced  (LIKE t_plain INCLUDING ALL);
CREATE TABLE t_plpgsql (LIKE t_plain INCLUDING ALL);
ALTER TABLE t_synced ALTER id SET DEFAULT nextval('t_plain_id_seq');
ALTER TABLE t_plpgsql ALTER id SET DEFAULT nextval('t_plain_id_seq');
SELECT pg_sync.register_table('t_synced', group_column => 'g');
-- What people write by hand today: a PL/pgSQL trigger logging the same row shape.
CREATE TABLE hand_log (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, model text, model_id text,
  action text, data jsonb, version text, origin text, group_id text, xid xid8 DEFAULT pg_current_xact_id(),
  created_at timestamptz DEFAULT now());
CREATE FUNCTION hand_capture() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE d jsonb;
BEGIN
  IF TG_OP = 'INSERT' THEN d := to_jsonb(NEW);
  ELSIF TG_OP = 'UPDATE' THEN
    SELECT jsonb_object_agg(n.key, n.value) INTO d FROM jsonb_each(to_jsonb(NEW)) n
      JOIN jsonb_each(to_jsonb(OLD)) o USING (key) WHERE n.value IS DISTINCT FROM o.value;
    IF d IS NULL THEN RETURN NULL; END IF;
  ELSE d := jsonb_build_object('id', OLD.id);
  END IF;
  INSERT INTO hand_log (model, model_id, action, data, version, origin, group_id)
  VALUES (TG_TABLE_NAME, coalesce(NEW.id, OLD.id)::text, left(TG_OP, 1), d,
          lpad(to_hex((extract(epoch FROM clock_timestamp()) * 1000)::bigint << 16), 16, '0') || '@bench',
          'bench', coalesce(NEW.g, OLD.g));
  RETURN NULL;
END $$;
CREATE TRIGGER hand_capture AFTER INSERT OR UPDATE OR DELETE ON t_plpgsql FOR EACH ROW EXECUTE FUNCTION hand_capture();
INSERT INTO t_plain (a, b, g) SELECT 'row ' || i, i, 'g' || (i % 10) FROM generate_series(1, 10000) i;
INSERT INTO t_synced (id, a, b, g) SELECT id, a, b, g FROM t_plain;
INSERT INTO t_plpgsql (id, a, b, g) SELECT id, a, b, g FROM t_plain;
VACUUM ANALYZE;
SQL

run_pgbench() { # table workload synchronous_commit -> "tps wal_bytes_per_tx"
  local table=$1 workload=$2 sc=$3 script="$work/$1_$2.sql"
  if [ "$workload" = insert ]; then
    printf "INSERT INTO %s (a, b, g) VALUES ('new row', 1, 'g' || (random() * 9)::int);\n" "$table" >"$script"
  else
    printf "\\\\set id random(1, 10000)\nUPDATE %s SET b = b + 1 WHERE id = :id;\n" "$table" >"$script"
  fi
  local lsn0 lsn1 out tps txs
  lsn0=$(psql_b -d bench -tAc "SELECT pg_current_wal_insert_lsn()")
  out=$(PGOPTIONS="-c synchronous_commit=$sc" "$PG_BIN/pgbench" -n -h 127.0.0.1 -p "$port" -U postgres \
        -c "$clients" -j 2 -T "$secs" -f "$script" bench 2>&1)
  lsn1=$(psql_b -d bench -tAc "SELECT pg_current_wal_insert_lsn()")
  tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' <<<"$out" | head -1)
  txs=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' <<<"$out")
  echo "$tps $(psql_b -d bench -tAc "SELECT round(('$lsn1'::pg_lsn - '$lsn0'::pg_lsn) / greatest($txs, 1))")"
}

report="$work/report.md"
{
  echo "## $(date -u +%Y-%m-%dT%H:%MZ): \`make bench\` (BENCH_SECONDS=$secs BENCH_CLIENTS=$clients)"
  echo
  echo "Machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $("$PG_BIN/postgres" --version), release build."
  echo
  echo "### Write overhead (pgbench, $clients clients, ${secs}s each, one run per cell)"
  echo
  echo "| workload | synchronous_commit | unregistered tps | pg_sync tps | PL/pgSQL trigger tps | pg_sync / unregistered | pg_sync / PL/pgSQL | WAL B/tx unregistered | WAL B/tx pg_sync | WAL B/tx PL/pgSQL |"
  echo "|---|---|---|---|---|---|---|---|---|---|"
} >"$report"
for sc in on off; do
  for workload in insert update; do
    read -r p_tps p_wal < <(run_pgbench t_plain "$workload" "$sc")
    read -r s_tps s_wal < <(run_pgbench t_synced "$workload" "$sc")
    read -r h_tps h_wal < <(run_pgbench t_plpgsql "$workload" "$sc")
    r1=$(python3 -c "print(f'{$s_tps/$p_tps:.2f}')")
    r2=$(python3 -c "print(f'{$s_tps/$h_tps:.2f}')")
    echo "| $workload | $sc | $p_tps | $s_tps | $h_tps | $r1 | $r2 | $p_wal | $s_wal | $h_wal |" >>"$report"
  done
done

# Bulk statements: one INSERT ... SELECT of many rows, where the per-row trigger cost dominates
# (pgbench's single-row transactions are dominated by commits). Three rounds, interleaved.
bulk=${BENCH_BULK_ROWS:-100000}
declare -A bulk_s
for round in 1 2 3; do
  for table in t_plain t_synced t_plpgsql; do
    t0=$(date +%s.%N)
    psql_b -d bench -c "SET synchronous_commit = off" \
      -c "INSERT INTO $table (a, b, g) SELECT 'bulk ' || i, i, 'g' || (i % 10) FROM generate_series(1, $bulk) i"
    t1=$(date +%s.%N)
    bulk_s[$table]="${bulk_s[$table]:-} $(python3 -c "print($t1 - $t0)")"
  done
done
{
  echo
  echo "### Bulk INSERT ... SELECT of $bulk rows (synchronous_commit off, median of 3)"
  echo
  python3 - <<PY
import statistics
s = {t: statistics.median(float(x) for x in v.split()) for t, v in
     {"t_plain": "${bulk_s[t_plain]}", "t_synced": "${bulk_s[t_synced]}", "t_plpgsql": "${bulk_s[t_plpgsql]}"}.items()}
print("| table | rows/s | vs unregistered |")
print("|---|---|---|")
for t, name in [("t_plain", "unregistered"), ("t_synced", "pg_sync"), ("t_plpgsql", "PL/pgSQL trigger")]:
    print(f"| {name} | {$bulk / s[t]:,.0f} | {s['t_plain'] / s[t]:.2f} |")
print()
print(f"pg_sync / PL/pgSQL: {s['t_plpgsql'] / s['t_synced']:.2f}")
PY
} >>"$report"

# apply_remote: the captured rows of 20k inserts merged into a peer, against INSERT ... ON CONFLICT.
rows=20000
psql_b -d peer -c "CREATE EXTENSION pg_sync" -c "SET pg_sync.node_id = 'peer'" \
  -c "CREATE TABLE t_synced (id bigint PRIMARY KEY, a text, b int, g text)" \
  -c "SELECT pg_sync.register_table('t_synced', group_column => 'g')" \
  -c "CREATE TABLE t_upsert (id bigint PRIMARY KEY, a text, b int, g text)"
psql_b -d bench -c "TRUNCATE pg_sync.sync_actions" \
  -c "INSERT INTO t_synced (a, b, g) SELECT 'remote ' || i, i, 'g' || (i % 10) FROM generate_series(1, $rows) i"
psql_b -d bench -tAc "COPY (SELECT jsonb_agg(to_jsonb(s) ORDER BY id) FROM pg_sync.sync_actions s GROUP BY id / 1000) TO STDOUT" >"$work/batches.jsonl"
python3 - "$work/batches.jsonl" >"$work/load.sql" <<'PY'
import sys
for line in open(sys.argv[1]):
    q = line.strip().replace("\\\\", "\\").replace("'", "''")
    print(f"SELECT pg_sync.apply_remote('{q}'::jsonb);")
PY
python3 - "$work/batches.jsonl" >"$work/upsert.sql" <<'PY'
import sys
for line in open(sys.argv[1]):
    q = line.strip().replace("\\\\", "\\").replace("'", "''")
    print("INSERT INTO t_upsert SELECT (r->'data'->>'id')::bigint, r->'data'->>'a', (r->'data'->>'b')::int, r->'data'->>'g' "
          f"FROM jsonb_array_elements('{q}'::jsonb) r ON CONFLICT (id) DO UPDATE SET a = EXCLUDED.a, b = EXCLUDED.b, g = EXCLUDED.g;")
PY
t0=$(date +%s.%N); psql_b -d peer -f "$work/load.sql" >/dev/null; t1=$(date +%s.%N)
psql_b -d peer -f "$work/upsert.sql" >/dev/null; t2=$(date +%s.%N)
applied=$(psql_b -d peer -tAc "SELECT count(*) FROM t_synced")
upserted=$(psql_b -d peer -tAc "SELECT count(*) FROM t_upsert")
{
  echo
  echo "### apply_remote ($rows inserts from another node, batches of 1000, one connection)"
  echo
  python3 - <<PY
a = $rows / ($t1 - $t0); u = $rows / ($t2 - $t1)
print("| path | rows applied | rows/s |")
print("|---|---|---|")
print(f"| pg_sync.apply_remote | $applied | {a:,.0f} |")
print(f"| INSERT ... ON CONFLICT (baseline) | $upserted | {u:,.0f} |")
print()
print(f"apply_remote / baseline: {a/u:.2f}")
PY
  echo
} >>"$report"
cat "$report"
cat "$report" >>"$here/bench/RESULTS.md"
