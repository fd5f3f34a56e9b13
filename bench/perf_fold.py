#!/usr/bin/env python3
"""Folds `perf script` output (stdin) into OUT.folded (flamegraph.pl / inferno input: one
stack per line, root first, and its sample count) and writes OUT.txt, a summary of the top
symbols by inclusive and by self samples. The profile scripts in bench/ share it.

Usage: perf script -i DATA | python3 bench/perf_fold.py OUT [TOP_INCLUSIVE [TOP_SELF]]"""
import collections
import sys

out = sys.argv[1]
top_incl = int(sys.argv[2]) if len(sys.argv) > 2 else 45
top_self = int(sys.argv[3]) if len(sys.argv) > 3 else 30

stacks = collections.Counter()
frames = []
for line in sys.stdin:
    line = line.rstrip("\n")
    if not line:
        if frames:
            stacks[";".join(reversed(frames))] += 1
        frames = []
    elif line.startswith(("\t", " ")):
        parts = line.split()
        sym = parts[1] if len(parts) > 1 else "?"
        frames.append(sym.split("+0x")[0])
    # else: the sample's header line
if frames:
    stacks[";".join(reversed(frames))] += 1

self_, total, n = collections.Counter(), collections.Counter(), 0
with open(out + ".folded", "w") as f:
    for stack, count in stacks.most_common():
        print(stack, count, file=f)
        n += count
        names = stack.split(";")
        self_[names[-1]] += count
        for name in set(names):
            total[name] += count
with open(out + ".txt", "w") as f:
    print(f"samples: {n}", file=f)
    print(f"\n# inclusive (top {top_incl})", file=f)
    for name, c in total.most_common(top_incl):
        print(f"{100 * c / n:6.1f}%  {name}", file=f)
    print(f"\n# self (top {top_self})", file=f)
    for name, c in self_.most_common(top_self):
        print(f"{100 * c / n:6.1f}%  {name}", file=f)
