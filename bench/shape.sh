#!/usr/bin/env bash
# Initial sync of BOOTSTRAP_ROWS rows (default 1000000) three ways in one run: the real
# @electric-sql/client through `GET /v1/shape` (Node, parses every message by the schema, one
# round), our own `GET /sync/bootstrap`, and `COPY ... TO STDOUT` (bench/src/bin/api_load.rs,
# which only counts bytes; medians of 3 interleaved rounds). Needs tests/shape's npm packages.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
source "$here/bench/lib.sh"
rows=${BOOTSTRAP_ROWS:-1000000}
cargo build --release -q -p sync_worker -p pg_sync_bench
bench_cluster shape "shared_buffers = '1GB'"
psql_b -d bench <<SQL
CREATE EXTENSION pg_sync;
CREATE TABLE items (id bigint PRIMARY KEY, grp text NOT NULL, title text NOT NULL,
                    done boolean NOT NULL, n integer, updated_at timestamptz NOT NULL);
INSERT INTO items SELECT g, 'g1', 'item number ' || g, g % 3 = 0, g % 1000, now() FROM generate_series(1, $rows) g;
SELECT pg_sync.register_table('items', group_column => 'grp');
SELECT pg_sync.add_member('u1', 'g1');
VACUUM ANALYZE items;
SQL
start_worker
wait_healthy
token=$(python3 - <<'PY'
import base64, hashlib, hmac, json, time
b = lambda d: base64.urlsafe_b64encode(d).rstrip(b"=").decode()
head = b(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
body = b(json.dumps({"sub": "u1", "exp": int(time.time()) + 3600}).encode())
sig = b(hmac.new(b"bench", f"{head}.{body}".encode(), hashlib.sha256).digest())
print(f"{head}.{body}.{sig}")
PY
)
shape=$(node "$here/bench/shape_client.mjs" "http://127.0.0.1:$wport/v1/shape" "$token" items)
others=$("$here/target/release/api_load" bootstrap "$wport" bench u1 "$(bench_url)" \
  "SELECT * FROM items WHERE grp = 'g1'")
report=$(python3 - "$shape" "$others" <<PY
import json, statistics, sys
shape = json.loads(sys.argv[1])
runs = json.loads(sys.argv[2])
def med(what, key):
    return statistics.median(r[key] for r in runs if r["what"] == what)
copy_s, boot_s = med("copy", "secs"), med("bootstrap", "secs")
assert shape["rows"] == $rows, shape
print("## $(date -u +%Y-%m-%dT%H:%MZ): \`bash bench/shape.sh\` (BOOTSTRAP_ROWS=$rows, commit $(git -C "$here" rev-parse --short HEAD))")
print()
print("Machine: $(nproc) cores shared with other sessions; Postgres, the worker and the client share it.")
print("Same 6-column table as bench/bootstrap.sh. /v1/shape: one run of the real @electric-sql/client 1.5.28")
print("in Node (ShapeStream, every message parsed by the schema header). Others: medians of 3 rounds, bytes counted only.")
print()
print("| run | rows/s | ratio to COPY |")
print("|---|---|---|")
print(f"| COPY (SELECT * ...) TO STDOUT | {$rows / copy_s:,.0f} | 1.00 |")
print(f"| GET /sync/bootstrap | {$rows / boot_s:,.0f} | {copy_s / boot_s:.2f} |")
print(f"| GET /v1/shape, @electric-sql/client in Node | {$rows / shape['secs']:,.0f} | {copy_s / shape['secs']:.2f} |")
PY
)
echo "$report"
printf '\n%s\n' "$report" >>"$here/bench/RESULTS.md"
