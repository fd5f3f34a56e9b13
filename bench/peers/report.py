"""The markdown report of bench/peers/run.sh from its results.jsonl (one JSON object a line).

Every figure is min / median / max over the rounds; every ratio is taken within a round (both
systems measured in the same round), then min / median / max of those ratios.
"""

import json
import statistics
import sys

(path, started, runs, secs, drain, rows, commit, zero_version, node_version, listeners,
 load) = sys.argv[1:]
drain_ms = float(drain) * 1000
res = [json.loads(line) for line in open(path) if line.strip()]
rounds = sorted({r["run"] for r in res})


def pick(**kw):
    return {r["run"]: r for r in res if all(r.get(k) == v for k, v in kw.items())}


def mmm(values, fmt):
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    out = [fmt(min(vals)), fmt(statistics.median(vals)), fmt(max(vals))]
    missing = len(values) - len(vals)
    return " / ".join(out) + (f" ({missing} round(s) without a figure)" if missing else "")


def ms(v):
    return f"{v:,.1f}" if v < 100 else f"{v:,.0f}"


def ratio(v):
    return f"{v:,.1f}x" if v < 100 else f"{v:,.0f}x"


lines, goals = [], []


def fmt3(v):
    return "-" if v is None else f"{v:.3f}"


def fmt_opt(v):
    return "-" if v is None else f"{v:.1f}"


def row(label, zero, ours, lower_bound, fmt, goal=10.0):
    """zero, ours: {run: value or None}; None for Zero means 'more than lower_bound'."""
    ratios, bounded = [], False
    for run in rounds:
        z, o = zero.get(run), ours.get(run)
        if o is None or o <= 0:
            ratios.append(None)
            continue
        if z is None:
            z, bounded = lower_bound, True
        ratios.append(z / o)
    if goal is None and any(v is None or v <= 0 for v in list(zero.values()) + list(ours.values())):
        # A difference of RSS samples within their noise (<= 0) has no meaningful ratio.
        ratios = [None] * len(rounds)
    zs = [zero.get(r) for r in rounds]
    zero_txt = mmm(zs, fmt)
    if any(z is None for z in zs):
        zero_txt = mmm([lower_bound if z is None else z for z in zs], fmt) + \
            f" (rounds with rows still missing after the {drain} s drain count as {fmt(lower_bound)}: a floor)"
    got = [r for r in ratios if r is not None]
    if goal is None:
        verdict = "(memory: no goal)"
    else:
        met = len(got) == len(rounds) and min(got) >= goal
        goals.append((label, met, min(got) if got else None))
        verdict = "yes" if met else "**no**"
    lines.append(f"| {label} | {zero_txt} | {mmm([ours.get(r) for r in rounds], fmt)} | "
                 f"{mmm(ratios, ratio)}{' (floor)' if bounded else ''} | {verdict} |")


lines.append(f"## {started}: `make bench-peers` (`bash bench/peers/run.sh`: PEERS_RUNS={runs} "
             f"PEERS_SECONDS={secs} PEERS_DRAIN={drain} PEERS_CATCHUP_ROWS={rows})")
lines.append("")
lines.append(f"Commit {commit}. pg_sync (release build) vs Zero `@rocicorp/zero` {zero_version} on Node "
             f"{node_version} (install and configuration: bench/peers/README.md), one private Postgres 15 "
             f"cluster, {len(rounds)} rounds, the system measured first alternating between rounds. "
             f"Machine: 2 cores (load average at the end: {load}; anything else running is for "
             f"the notes to say). Listeners of both systems: {listeners}.")
lines.append("Latency is now - the writer's clock at insert, in ms, over every row delivered to every "
             f"client during {secs} s of pgbench -R writes plus up to {drain} s of drain; a row not "
             "delivered by then ranks above every delivered one. Ratios are Zero ÷ pg_sync within a "
             "round (higher = pg_sync ahead); goal: at least 10x in every round.")
lines.append("")
lines.append("| figure | Zero min / median / max | pg_sync min / median / max | Zero ÷ pg_sync min / median / max | goal met in every round |")
lines.append("|---|---|---|---|---|")

for rate, n in [(100, 1), (1000, 1), (100, 100), (1000, 100)]:
    z, o = pick(kind="latency", system="zero", rate=rate, clients=n), pick(kind="latency", system="pg_sync", rate=rate, clients=n)
    for p in ("p50_ms", "p99_ms"):
        row(f"{rate:,} writes/s, {n} client{'s' if n > 1 else ''}: {p[:3]} ms",
            {k: v[p] for k, v in z.items()}, {k: v[p] for k, v in o.items()}, drain_ms, ms)

z, o = pick(kind="catchup", system="zero"), pick(kind="catchup", system="pg_sync")
# The last commit is taken as psql's return, a few ms after it: a client that had every row by
# then measures <= 0. Such a figure counts as 1 ms (the ratio is then a floor).
early = [k for k, v in o.items() if v["catchup_s"] is not None and v["catchup_s"] < 0.001]
row(f"catch-up of {int(rows):,} rows in 1,000-row transactions: last commit to client has all, s"
    + (f" (pg_sync had all rows before psql returned in {len(early)} round(s): counted as 0.001 s)" if early else ""),
    {k: v["catchup_s"] for k, v in z.items()},
    {k: (max(v["catchup_s"], 0.001) if v["catchup_s"] is not None else None) for k, v in o.items()}, 600.0,
    lambda v: f"{v:,.3f}")

def rss(system, n):
    return {k: v["rss_mib"] for k, v in pick(kind="latency", system=system, rate=100, clients=n).items()}


def per_client(system):
    one, hundred = rss(system, 1), rss(system, 100)
    return {k: (hundred[k] - one[k]) / 99 * 1024 for k in one if k in hundred}


mem_lines = []
for label, z, o, fmt in [
    ("RSS with 1 connected client, MiB", rss("zero", 1), rss("pg_sync", 1), lambda v: f"{v:,.1f}"),
    ("RSS with 100 connected clients, MiB", rss("zero", 100), rss("pg_sync", 100), lambda v: f"{v:,.1f}"),
    ("memory per connected client: (RSS@100 - RSS@1) / 99, KiB", per_client("zero"), per_client("pg_sync"),
     lambda v: f"{v:,.0f}"),
    (f"RSS at the end of {secs} s of 100 writes/s to 100 clients, MiB",
     {k: v["rss_end_mib"] for k, v in pick(kind="latency", system="zero", rate=100, clients=100).items()},
     {k: v["rss_end_mib"] for k, v in pick(kind="latency", system="pg_sync", rate=100, clients=100).items()},
     lambda v: f"{v:,.1f}"),
    (f"RSS at the end of {secs} s of 1,000 writes/s to 100 clients, MiB",
     {k: v["rss_end_mib"] for k, v in pick(kind="latency", system="zero", rate=1000, clients=100).items()},
     {k: v["rss_end_mib"] for k, v in pick(kind="latency", system="pg_sync", rate=1000, clients=100).items()},
     lambda v: f"{v:,.1f}"),
]:
    row(label, z, o, 0.0, fmt, goal=None)

# The writer: plain table vs capture, each round's pair.
plain, captured = pick(kind="writer", table="plain"), pick(kind="writer", table="captured")
wr = {r: plain[r]["writer_s"] / captured[r]["writer_s"] for r in rounds if r in plain and r in captured}
lines.append("")
lines.append(f"The writer's own time for {int(rows):,} rows in 1,000-row transactions (one psql connection, "
             "a CHECKPOINT before each, plain and captured alternating first):")
lines.append("")
lines.append("| writer | min / median / max s | plain ÷ captured (throughput of capture vs plain) min / median / max | goal ≥ 0.85 in every round |")
lines.append("|---|---|---|---|")
wmet = bool(wr) and min(wr.values()) >= 0.85
lines.append(f"| plain table (`events_plain`, in no publication) | {mmm([plain[r]['writer_s'] for r in rounds if r in plain], lambda v: f'{v:.2f}')} | | |")
lines.append(f"| through pg_sync's capture (`events`) | {mmm([captured[r]['writer_s'] for r in rounds if r in captured], lambda v: f'{v:.2f}')} | "
             f"{mmm(list(wr.values()), lambda v: f'{v:.2f}x')} | {'yes' if wmet else '**no**'} |")
zc, oc = pick(kind="catchup", system="zero"), pick(kind="catchup", system="pg_sync")
lines.append(f"| (during catch-up) into Zero's plain `events_zero`, zero-cache reading | {mmm([zc[r]['writer_s'] for r in rounds if r in zc], lambda v: f'{v:.2f}')} | | |")
lines.append(f"| (during catch-up) into pg_sync's `events`, the worker reading | {mmm([oc[r]['writer_s'] for r in rounds if r in oc], lambda v: f'{v:.2f}')} | | |")

lines.append("")
lines.append("Per round (latency p50 / p99 ms, missing rows, RSS after connecting / after the writes, CPU of the measuring client process; catch-up s; writer s):")
lines.append("")
lines.append("```")
for r in res:
    if r["kind"] == "latency":
        lines.append(f"round {r['run']} {r['system']:7} {r['rate']:>5}/s x{r['clients']:<3} tps {r['tps']:8.1f} rows {r['written']:6} "
                     f"p50 {fmt_opt(r['p50_ms'])} p99 {fmt_opt(r['p99_ms'])} delivered {r['deliveries']} missing {r['missing']} "
                     f"rss {r['rss_mib']}/{r['rss_end_mib']} MiB client cpu {fmt_opt(r.get('client_cpu_s'))} s")
    elif r["kind"] == "catchup":
        lines.append(f"round {r['run']} {r['system']:7} catch-up {fmt3(r['catchup_s'])} s (rows {r['rows']}), writer {r['writer_s']} s")
    else:
        lines.append(f"round {r['run']} writer {r['table']:8} {r['writer_s']} s")
lines.append("```")
missed = [f"{label} (worst round {ratio(m) if m is not None else '-'})" for label, met, m in goals if not met]
if not wmet:
    missed.append(f"writer through capture {min(wr.values()):.2f}x of plain (goal 0.85x)" if wr else "writer: no data")
lines.append("")
lines.append("Goals missed: " + ("; ".join(missed) if missed else "none") + ".")
print("\n".join(lines))
