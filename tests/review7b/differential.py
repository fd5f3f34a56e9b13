#!/usr/bin/env python3
"""Seeded differential test: random peer batches applied set-based (apply_remote_set, tables
d?_s) and change by change (pg_sync.set_apply = off, apply_remote, tables d?_c) from the same
starting state in one database, then table rows, row_state, sync_actions (per key, in order)
and conflicts are compared. Usage: differential.py PSQL_ARGS... (env SEED, BATCHES)."""
import json, os, random, subprocess, sys

seed = int(os.environ.get("SEED", random.randrange(1 << 30)))
batches = int(os.environ.get("BATCHES", "40"))
print(f"seed={seed}", flush=True)
rnd = random.Random(seed)
psql = sys.argv[1:]

def run(sql, check=False):
    p = subprocess.run(psql + ["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql],
                       capture_output=True, text=True)
    if check and p.returncode:
        sys.exit(f"setup failed: {p.stderr}")
    return p.returncode, p.stdout.strip(), p.stderr.strip()

setup = """
CREATE EXTENSION IF NOT EXISTS pg_sync;
SET client_min_messages = warning;
SELECT pg_sync.add_peer('sp', 'ws://127.0.0.1:1', 'a-secret-of-16-chars');
CREATE TABLE base AS SELECT pg_sync.hlc_now() AS hlc;
"""
for sfx in ("s", "c"):
    setup += f"""
CREATE TABLE da_{sfx} (id text PRIMARY KEY, a text, b int DEFAULT 7, grp text);
SELECT pg_sync.register_table('da_{sfx}', group_column => 'grp');
CREATE TABLE db_{sfx} (k1 int, k2 uuid, v numeric, w text DEFAULT 'dw', PRIMARY KEY (k1, k2));
SELECT pg_sync.register_table('db_{sfx}');
"""
run(setup, check=True)
_, base, _ = run("SELECT hlc FROM base", check=True)
base = int(base)
run("UPDATE pg_sync.registry SET federation = 'both'")
run("SET pg_sync.log_conflicts = on")

UU = ["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A12"]
nodes = ["p1", "p2", "p3"]

def version():
    k = rnd.randrange(1, 60)
    return f"{base + (k << 16) + rnd.choice([0, 0, 1]):016x}@{rnd.choice(nodes)}"

def change(sid):
    m = rnd.choice(["da", "db"])
    act = rnd.choice("IIUUD")
    if m == "da":
        mid = rnd.choice(["1", "2", "3", "4"])
        cols = {"a": lambda: rnd.choice(["x", "y", None]), "b": lambda: rnd.choice([1, 2, None]),
                "grp": lambda: rnd.choice(["g", "h"])}
        key = {"id": mid}
    else:
        k1, k2 = rnd.choice([1, 2]), rnd.choice(UU)
        mid = json.dumps([rnd.choice([str(k1), f"0{k1}"]), k2], separators=(",", ":"))
        cols = {"v": lambda: rnd.choice(["1.0", "1", "2.50", None]), "w": lambda: rnd.choice(["p", "q", None])}
        key = {"k1": k1, "k2": k2.lower()}
    data = {}
    if act == "D":
        data = dict(key)
    else:
        for c in rnd.sample(list(cols), rnd.randrange(1, len(cols) + 1)):
            data[c] = cols[c]()
        if act == "I":
            data.update(key)
    ch = {"sync_id": sid, "model": m, "model_id": mid, "action": act, "version": version(),
          "origin": rnd.choice(nodes), "data": data}
    if act != "D" and rnd.random() < 0.3:
        ch["versions"] = {c: version() for c in data if c not in key}
    return ch

def for_sfx(batch, sfx):
    out = []
    for c in batch:
        c = dict(c); c["model"] = f"{c['model']}_{sfx}"; out.append(c)
    return json.dumps(out).replace("'", "''")

def snapshot(sfx):
    q = f"""SET pg_sync.log_conflicts = on;
    SELECT json_build_object(
     'da', (SELECT json_agg(t ORDER BY id) FROM da_{sfx} t),
     'db', (SELECT json_agg(t ORDER BY k1, k2) FROM db_{sfx} t),
     'state', (SELECT json_agg(json_build_array(left(model, 2), model_id, created, deleted, versions, pending, max_version) ORDER BY model, model_id)
                 FROM pg_sync.row_state WHERE model LIKE '%\\_{sfx}'),
     'log', (SELECT json_agg(json_build_array(left(model, 2), model_id, action, data, version, versions, origin, group_id, prev_group_id, moved) ORDER BY model, model_id, id)
               FROM pg_sync.sync_actions WHERE model LIKE '%\\_{sfx}'),
     'conflicts', (SELECT json_agg(json_build_array(left(model, 2), model_id, column_name, kept_version, lost_version, origin) ORDER BY model, model_id, id)
               FROM pg_sync.conflicts WHERE model LIKE '%\\_{sfx}'))"""
    rc, out, err = run(q)
    return json.loads(out) if rc == 0 else err

bad = 0
sid = 0
ok = 0
errs_seen = {}
for b in range(batches):
    batch = []
    for _ in range(rnd.randrange(1, 9)):
        sid += 1
        batch.append(change(sid))
    rs, outs, errs = run(f"SET pg_sync.log_conflicts = on; SELECT pg_sync.apply_remote_set('{for_sfx(batch, 's')}')")
    rc, outc, errc = run(f"SET pg_sync.log_conflicts = on; SET pg_sync.set_apply = off; SELECT pg_sync.apply_remote('{for_sfx(batch, 'c')}')")
    ok += rs == 0
    if rs:
        errs_seen[errs.splitlines()[0][:80]] = errs_seen.get(errs.splitlines()[0][:80], 0) + 1
    s, c = snapshot("s"), snapshot("c")
    if (rs == 0) != (rc == 0) or s != c or (rs == 0 and outs.splitlines()[-1:] != outc.splitlines()[-1:]):
        bad += 1
        print(f"--- batch {b} diverges (seed {seed})")
        print("batch:", json.dumps(batch))
        print("set:", rs, outs, errs[:300]); print("chg:", rc, outc, errc[:300])
        for k in ("da", "db", "state", "log", "conflicts"):
            if isinstance(s, dict) and isinstance(c, dict) and s.get(k) != c.get(k):
                print(f"  {k} set: {json.dumps(s.get(k))}\n  {k} chg: {json.dumps(c.get(k))}")
        break
print(f"seed={seed} batches={b + 1} applied_ok={ok} divergent={bad} errors={errs_seen}")
sys.exit(1 if bad else 0)
